//! Compiling unwind tables, side by side on the same files in one run:
//! - `unwound`: `unwound_unwind_tables::compile_file` (parallel, all cores);
//! - `gimli_baseline`: single-threaded gimli, every FDE's `UnwindTable` rows iterated —
//!   what peers do before their own encoding;
//! - `readelf`: `readelf --debug-dump=frames-interp FILE > /dev/null`.
//!
//! After the timings it prints, per file, our peak heap beyond the mapped file next to the
//! table's size (counting allocator).
//!
//! `cargo bench -p unwound-benches --bench unwind_tables`

use std::alloc::{GlobalAlloc, Layout, System};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use criterion::{criterion_group, BenchmarkId, Criterion};

struct Counting;
static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let p = System.alloc(l);
        if !p.is_null() {
            let now = CURRENT.fetch_add(l.size(), Ordering::Relaxed) + l.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        System.dealloc(p, l);
        CURRENT.fetch_sub(l.size(), Ordering::Relaxed);
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

const FILES: &[(&str, &str)] = &[
    ("libc", "/usr/lib/x86_64-linux-gnu/libc.so.6"),
    ("libstdc++", "/usr/lib/x86_64-linux-gnu/libstdc++.so.6"),
    ("python3", "/usr/bin/python3.11"),
    ("gdb", "/usr/bin/gdb"),
    ("libLLVM-22", "/usr/lib/llvm-22/lib/libLLVM.so.22.1"),
];

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("compile");
    g.sample_size(10).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(3));
    for (name, path) in FILES {
        if !std::path::Path::new(path).exists() {
            eprintln!("skipping {name}: {path} missing");
            continue;
        }
        let file = std::fs::File::open(path).unwrap();
        let map = unsafe { memmap2::Mmap::map(&file) }.unwrap();
        g.bench_with_input(BenchmarkId::new("unwound", name), &map, |b, m| {
            b.iter(|| unwound_unwind_tables::compile_elf(m).unwrap())
        });
        g.bench_with_input(BenchmarkId::new("gimli_baseline", name), &map, |b, m| {
            b.iter(|| unwound_benches::gimli_rows(m))
        });
        g.bench_with_input(BenchmarkId::new("readelf", name), path, |b, p| {
            b.iter(|| {
                // readelf exits 1 after printing warnings about some files; its work is done.
                Command::new("readelf")
                    .arg("--debug-dump=frames-interp")
                    .arg(p)
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .unwrap()
            })
        });
    }
    g.finish();
}

fn memory() {
    println!("\npeak heap while compiling (beyond the mapped file):");
    println!("{:<12} {:>12} {:>12} {:>8}", "file", "peak heap", "table bytes", "ratio");
    for (name, path) in FILES {
        if !std::path::Path::new(path).exists() {
            continue;
        }
        let base = CURRENT.load(Ordering::Relaxed);
        PEAK.store(base, Ordering::Relaxed);
        let t = unwound_unwind_tables::compile_file(path.as_ref()).unwrap();
        let peak = PEAK.load(Ordering::Relaxed) - base;
        let size = t.byte_size();
        println!("{name:<12} {peak:>12} {size:>12} {:>8.2}", peak as f64 / size as f64);
    }
}

criterion_group!(benches, bench);

fn main() {
    benches();
    memory();
    Criterion::default().configure_from_args().final_summary();
}
