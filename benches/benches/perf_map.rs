//! Reading JIT names: parsing and indexing a perf map (`/tmp/perf-PID.map`) of 100k and 1M
//! entries, as a busy V8 or HotSpot writes them, then looking addresses up.
//!
//! `cargo bench -p unwound-benches --bench perf_map`
//!
//! The maps are generated: names like V8's (`JS:*fn_N /app/src/file_M.js:L:C`), code
//! objects of 64 bytes to 4 KiB laid out one after another, and one entry in twenty
//! rewriting a range an earlier entry named (code space reused), which the index clips.
//! Time is the median of five runs; memory is the heap the index holds afterwards and the
//! peak while building it, counted by this binary's allocator.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use unwound_symbolize::PerfMap;

struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let now = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
        PEAK.fetch_max(now, Ordering::Relaxed);
        // SAFETY: forwarded as is.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: forwarded as is.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// A perf map of `n` entries and the addresses its code starts at.
fn generate(n: usize) -> (Vec<u8>, Vec<u64>) {
    let mut text = String::with_capacity(n * 48);
    let mut starts = Vec::with_capacity(n);
    let mut at = 0x7f00_0000_0000u64;
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for i in 0..n {
        let r = next();
        let size = 64 + (r % 4032);
        // One in twenty rewrites code space named before (a reused range).
        let start = if i > 100 && r % 20 == 0 { starts[(r as usize / 20) % starts.len()] } else { at };
        if start == at {
            at += size;
        }
        starts.push(start);
        text.push_str(&format!(
            "{start:x} {size:x} JS:*fn_{i} /app/src/file_{}.js:{}:{}\n",
            r % 500,
            r % 2000 + 1,
            r % 80 + 1
        ));
    }
    (text.into_bytes(), starts)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        println!("perf_map: bench");
        return;
    }
    println!(
        "{:>9} {:>9} {:>11} {:>11} {:>11} {:>12} {:>12}",
        "entries", "MiB text", "parse ms", "ns/entry", "lookups/s", "index MiB", "peak MiB"
    );
    for n in [100_000usize, 1_000_000] {
        let (text, starts) = generate(n);
        let mut times = Vec::new();
        let mut held = 0;
        let mut peak = 0;
        let mut map = PerfMap::default();
        for _ in 0..5 {
            drop(std::mem::take(&mut map));
            let before = LIVE.load(Ordering::Relaxed);
            PEAK.store(before, Ordering::Relaxed);
            let t = Instant::now();
            map = PerfMap::parse(&text);
            times.push(t.elapsed());
            held = LIVE.load(Ordering::Relaxed) - before;
            peak = PEAK.load(Ordering::Relaxed) - before;
        }
        assert_eq!(map.stats().entries as usize, n);
        let t = Instant::now();
        let mut found = 0usize;
        for &a in &starts {
            found += usize::from(map.lookup(a + 1).is_some());
        }
        let lookup = t.elapsed();
        assert_eq!(found, n, "every start is named");
        let parse = median(times);
        println!(
            "{n:>9} {:>9.1} {:>11.1} {:>11.0} {:>11.2e} {:>12.1} {:>12.1}",
            text.len() as f64 / (1 << 20) as f64,
            parse.as_secs_f64() * 1e3,
            parse.as_nanos() as f64 / n as f64,
            n as f64 / lookup.as_secs_f64(),
            held as f64 / (1 << 20) as f64,
            peak as f64 / (1 << 20) as f64,
        );
    }
}
