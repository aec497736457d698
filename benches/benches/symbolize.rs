//! Symbolizing with lines and inlined frames, side by side in one run, on the same binary
//! and the same addresses:
//! - `unwound`: `unwound_symbolize::Symbolizer::symbolize_elf` (its on-disk index cache);
//! - `blazesym`: `blazesym::symbolize::Symbolizer` with code info and inlined functions, an
//!   `Elf` source with debug symbols;
//! - `addr2line`: `addr2line::Loader::find_frames` (the symbol table when DWARF has nothing).
//!
//! Input: the separate debuginfo of Debian's `ceph-mon` (package `ceph-mon-dbg`: GCC 12 C++,
//! DWARF 5, 279 MiB of DWARF once inflated), fetched and inflated by
//! `scripts/bench-input.sh`; another file with `UNWOUND_SYMBOLIZE_BENCH_BINARY`. Without
//! network the agent's own debug build stands in (about 70 MiB of DWARF, less than the
//! 100 MB the issue asks for). Addresses: 100k random offsets inside the
//! function symbols of its `.symtab` (a symbol picked uniformly, then an offset inside it;
//! fixed seed), the same for all three.
//!
//! 1. Warm lookups, one thread, batches of 10k after a warm-up pass over all addresses
//!    (criterion).
//! 2. First symbol of a fresh symbolizer: ours from a cache directory filled by an earlier
//!    symbolizer; the peers have no cache (median of a few runs; the OS page cache is warm).
//! 3. First symbol with no cache: ours with `cache_dir: None` and with an empty cache
//!    directory (the address is answered from the compilation units holding it; the whole
//!    index is then built on a thread of its own, until the symbolizer is dropped).
//! 4. Peak RSS (`VmHWM`) of each library doing the warm workload (open, then two passes
//!    over all addresses), each in a child process: this binary run again with
//!    `UNWOUND_SYMBOLIZE_BENCH_CHILD` set.
//!
//! It also checks that the three agree on the innermost frame's function and line (and on
//! the whole inline chain), and ends with a summary table.
//!
//! `cargo bench -p unwound-benches --bench symbolize`
//!
//! To profile one library's warm loop, run the bench binary as a child by hand, e.g.
//! `UNWOUND_SYMBOLIZE_BENCH_CHILD=unwound-cached UNWOUND_SYMBOLIZE_BENCH_CACHE=/tmp/c
//! UNWOUND_SYMBOLIZE_BENCH_PASSES=30 perf record -g target/release/deps/symbolize-HASH`
//! (modes: `unwound-cached`, `unwound-no-cache`, `unwound-empty-dir`, `blazesym`,
//! `addr2line`, `baseline`).

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use criterion::{criterion_group, BenchmarkId, Criterion, Throughput};
use object::{Object, ObjectSection, ObjectSymbol};

/// One line of the cold-start table: (wall, CPU) seconds.
fn print_cold(label: &str, (wall, cpu): (f64, f64)) {
    println!("  {label:<28} {:>10.2} ms wall {:>10.2} ms CPU", wall * 1e3, cpu * 1e3);
}

const N_ADDRS: usize = 100_000;
const BATCH: usize = 10_000;
const SEED: u64 = 0x756e_776f_756e_6421;
const BUDGET: usize = 512 << 20;
/// Runs of each cold measurement; the median is reported.
const COLD_RUNS: usize = 5;
/// Runs of the cold measurements that build a whole index.
const BUILD_RUNS: usize = 3;
const CHILD_ENV: &str = "UNWOUND_SYMBOLIZE_BENCH_CHILD";
const BINARY_ENV: &str = "UNWOUND_SYMBOLIZE_BENCH_BINARY";
const ADDRS_ENV: &str = "UNWOUND_SYMBOLIZE_BENCH_ADDRS";
const CACHE_ENV: &str = "UNWOUND_SYMBOLIZE_BENCH_CACHE";
/// Passes of a child over all addresses (2 unless set; more for profiling one library).
const PASSES_ENV: &str = "UNWOUND_SYMBOLIZE_BENCH_PASSES";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(d) if !d.is_empty() => root().join(d),
        _ => root().join("target"),
    }
}

/// The input: `UNWOUND_SYMBOLIZE_BENCH_BINARY` when set; else ceph-mon's debuginfo from
/// Debian (about 280 MiB of DWARF), fetched by `scripts/bench-input.sh` when missing; else,
/// when that cannot be fetched, the agent's own debug build (about 70 MiB of DWARF, built
/// when missing).
fn input_binary() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os(BINARY_ENV) {
        return Some(PathBuf::from(p));
    }
    let fetched = Command::new("bash").arg(root().join("scripts/bench-input.sh")).output();
    match fetched {
        Ok(o) if o.status.success() => {
            let p = PathBuf::from(String::from_utf8_lossy(&o.stdout).trim());
            if p.exists() {
                return Some(p);
            }
        }
        Ok(o) => println!(
            "scripts/bench-input.sh failed ({}): {}",
            o.status,
            String::from_utf8_lossy(&o.stderr).trim()
        ),
        Err(e) => println!("scripts/bench-input.sh: {e}"),
    }
    let p = target_dir().join("debug/unwound");
    if !p.exists() {
        println!("{} missing: running cargo build -p unwound-agent", p.display());
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let status = Command::new(cargo).args(["build", "-p", "unwound-agent"]).current_dir(root()).status();
        if !matches!(status, Ok(s) if s.success()) || !p.exists() {
            println!("skipping: could not build {} ({status:?})", p.display());
            return None;
        }
    }
    Some(p)
}

/// Bytes of `.debug_*` sections (as stored in the file).
fn dwarf_bytes(path: &Path) -> u64 {
    let data = std::fs::read(path).unwrap();
    let obj = object::File::parse(&*data).unwrap();
    obj.sections().filter(|s| s.name().is_ok_and(|n| n.starts_with(".debug_"))).map(|s| s.size()).sum()
}

fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// `N_ADDRS` addresses: a function symbol picked uniformly, then an offset inside it.
fn addresses(path: &Path) -> (Vec<u64>, usize) {
    let data = std::fs::read(path).unwrap();
    let obj = object::File::parse(&*data).unwrap();
    let mut syms: Vec<(u64, u64)> = obj
        .symbols()
        .filter(|s| s.kind() == object::SymbolKind::Text && s.size() > 0 && s.address() > 0)
        .map(|s| (s.address(), s.size()))
        .collect();
    syms.sort_unstable();
    syms.dedup_by_key(|s| s.0);
    let mut state = SEED;
    let addrs = (0..N_ADDRS)
        .map(|_| {
            let (a, size) = syms[(splitmix(&mut state) % syms.len() as u64) as usize];
            a + splitmix(&mut state) % size
        })
        .collect();
    (addrs, syms.len())
}

/// Every frame's function and line, innermost first (empty when nothing was found), for the
/// agreement check.
type Chain = Vec<(String, u32)>;

// --- the three libraries, each doing lines and inlined frames -------------------------

fn ours(cache: Option<&Path>) -> unwound_symbolize::Symbolizer {
    unwound_symbolize::Symbolizer::new(unwound_symbolize::Options {
        cache_dir: cache.map(Path::to_path_buf),
        memory_budget: BUDGET,
        debug_dirs: vec![],
        debuginfod: None,
    })
}

/// Frames produced, summed over the batch (every frame's name, file and line looked at).
fn ours_batch(s: &unwound_symbolize::Symbolizer, bin: &Path, addrs: &[u64]) -> usize {
    let mut n = 0;
    for r in s.symbolize_elf(bin, addrs).unwrap().iter().flatten() {
        for f in &r.frames {
            n += 1 + f.function.as_ref().map_or(0, |f| f.len()) + f.file.as_ref().map_or(0, |f| f.len());
            n += f.line as usize;
        }
    }
    n
}

fn ours_chains(s: &unwound_symbolize::Symbolizer, bin: &Path, addrs: &[u64]) -> Vec<Chain> {
    s.symbolize_elf(bin, addrs)
        .unwrap()
        .into_iter()
        .map(|r| {
            r.map_or(Vec::new(), |r| {
                r.frames
                    .into_iter()
                    .map(|f| (f.function.as_deref().unwrap_or("??").to_string(), f.line))
                    .collect()
            })
        })
        .collect()
}

fn blaze() -> blazesym::symbolize::Symbolizer {
    blazesym::symbolize::Symbolizer::builder().enable_code_info(true).enable_inlined_fns(true).build()
}

fn blaze_source(bin: &Path) -> blazesym::symbolize::source::Source<'static> {
    blazesym::symbolize::source::Source::Elf(blazesym::symbolize::source::Elf::new(bin))
}

fn blaze_batch(s: &blazesym::symbolize::Symbolizer, bin: &Path, addrs: &[u64]) -> usize {
    let src = blaze_source(bin);
    let code = |c: Option<&blazesym::symbolize::CodeInfo>| {
        c.map_or(0, |c| {
            c.file.len() + c.dir.as_ref().map_or(0, |d| d.as_os_str().len()) + c.line.unwrap_or(0) as usize
        })
    };
    let mut n = 0;
    for r in s.symbolize(&src, blazesym::symbolize::Input::VirtOffset(addrs)).unwrap() {
        if let blazesym::symbolize::Symbolized::Sym(sym) = r {
            n += 1 + sym.name.len() + code(sym.code_info.as_deref());
            for i in sym.inlined.iter() {
                n += 1 + i.name.len() + code(i.code_info.as_ref());
            }
        }
    }
    n
}

fn blaze_chains(s: &blazesym::symbolize::Symbolizer, bin: &Path, addrs: &[u64]) -> Vec<Chain> {
    let src = blaze_source(bin);
    let line = |c: Option<&blazesym::symbolize::CodeInfo>| c.and_then(|c| c.line).unwrap_or(0);
    s.symbolize(&src, blazesym::symbolize::Input::VirtOffset(addrs))
        .unwrap()
        .into_iter()
        .map(|r| match r {
            // Outermost first, each with the location inside it: the symbol holds the first
            // inlined call's site, the last inlined function the address's own location.
            blazesym::symbolize::Symbolized::Sym(sym) => {
                let mut chain: Chain = sym
                    .inlined
                    .iter()
                    .rev()
                    .map(|i| (i.name.to_string(), line(i.code_info.as_ref())))
                    .collect();
                chain.push((sym.name.to_string(), line(sym.code_info.as_deref())));
                chain
            }
            _ => Vec::new(),
        })
        .collect()
}

/// One frame from addr2line: demangled function, file, line.
type A2lFrame<'a> = (Option<Cow<'a, str>>, Option<&'a str>, u32);

/// One address's frames, innermost first.
fn a2l_frames(l: &addr2line::Loader, addr: u64) -> Vec<A2lFrame<'_>> {
    let mut out = Vec::new();
    if let Ok(mut frames) = l.find_frames(addr) {
        while let Ok(Some(f)) = frames.next() {
            let name =
                f.function.as_ref().and_then(|n| n.demangle().ok()).map(|c| Cow::Owned(c.into_owned()));
            let (file, line) = f.location.map_or((None, 0), |l| (l.file, l.line.unwrap_or(0)));
            out.push((name, file, line));
        }
    }
    if out.is_empty() {
        // What the addr2line tool does when DWARF has nothing: the symbol table.
        if let Some(name) = l.find_symbol(addr) {
            out.push((Some(addr2line::demangle_auto(Cow::Borrowed(name), None)), None, 0));
        }
    }
    out
}

fn a2l_batch(l: &addr2line::Loader, addrs: &[u64]) -> usize {
    let mut n = 0;
    for &a in addrs {
        for (name, file, line) in a2l_frames(l, a) {
            n += 1 + name.map_or(0, |n| n.len()) + file.map_or(0, str::len) + line as usize;
        }
    }
    n
}

fn a2l_chains(l: &addr2line::Loader, addrs: &[u64]) -> Vec<Chain> {
    addrs
        .iter()
        .map(|&a| {
            a2l_frames(l, a)
                .into_iter()
                .map(|(name, _, line)| (name.as_deref().unwrap_or("??").to_string(), line))
                .collect()
        })
        .collect()
}

// --- measurements ----------------------------------------------------------------------

/// Per-sample (iterations, time) of the warm benchmarks, for the summary.
static WARM: Mutex<Vec<(String, u64, Duration)>> = Mutex::new(Vec::new());

fn warm_rate(lib: &str) -> f64 {
    let w = WARM.lock().unwrap();
    let mut per_batch: Vec<f64> =
        w.iter().filter(|e| e.0 == lib && e.1 > 0).map(|e| e.2.as_secs_f64() / e.1 as f64).collect();
    if per_batch.is_empty() {
        return f64::NAN;
    }
    BATCH as f64 / median(&mut per_batch)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// CPU time of this process so far, all threads.
fn cpu_time() -> f64 {
    // SAFETY: getrusage fills the struct it is given.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    tv(u.ru_utime) + tv(u.ru_stime)
}

/// Medians of `runs` runs of `f` (which returns the wall time it measured itself): wall
/// seconds and CPU seconds (all threads, the run's set-up included).
fn cold(runs: usize, mut f: impl FnMut(usize) -> Duration) -> (f64, f64) {
    let (mut wall, mut cpu) = (Vec::new(), Vec::new());
    for i in 0..runs {
        let c = cpu_time();
        wall.push(f(i).as_secs_f64());
        cpu.push(cpu_time() - c);
    }
    (median(&mut wall), median(&mut cpu))
}

struct Setup {
    bin: PathBuf,
    addrs: Vec<u64>,
    /// A cache directory filled by an earlier symbolizer.
    cache: tempfile::TempDir,
}

fn warm(c: &mut Criterion, st: &Setup) -> [Vec<Chain>; 3] {
    let batches: Vec<&[u64]> = st.addrs.chunks(BATCH).collect();
    println!("\nwarm-up passes over all {} addresses", st.addrs.len());
    let t = Instant::now();
    let o = ours(Some(st.cache.path()));
    let ours_inner = ours_chains(&o, &st.bin, &st.addrs);
    println!("  unwound   {:>8.2} s (index from the cache, blocks decompressed)", t.elapsed().as_secs_f64());
    let s = o.stats();
    println!(
        "  unwound stats: cache hits {}, blocks loaded {}, evicted {}, resident {:.1} MiB",
        s.cache_hits,
        s.blocks_loaded,
        s.blocks_evicted,
        s.resident_bytes as f64 / (1 << 20) as f64
    );
    let t = Instant::now();
    let b = blaze();
    let blaze_inner = blaze_chains(&b, &st.bin, &st.addrs);
    println!("  blazesym  {:>8.2} s", t.elapsed().as_secs_f64());
    let t = Instant::now();
    let l = addr2line::Loader::new(&st.bin).unwrap();
    let a2l_inner = a2l_chains(&l, &st.addrs);
    println!("  addr2line {:>8.2} s", t.elapsed().as_secs_f64());

    let mut g = c.benchmark_group("warm_lookup");
    g.sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4))
        .throughput(Throughput::Elements(BATCH as u64));
    let mut run = |lib: &str, one: &mut dyn FnMut(&[u64]) -> usize| {
        let mut k = 0;
        g.bench_function(BenchmarkId::new(lib, format!("{BATCH}_addrs")), |bch| {
            bch.iter_custom(|iters| {
                let t = Instant::now();
                for _ in 0..iters {
                    std::hint::black_box(one(batches[k % batches.len()]));
                    k += 1;
                }
                let d = t.elapsed();
                WARM.lock().unwrap().push((lib.to_string(), iters, d));
                d
            })
        });
    };
    run("unwound", &mut |a| ours_batch(&o, &st.bin, a));
    run("blazesym", &mut |a| blaze_batch(&b, &st.bin, a));
    run("addr2line", &mut |a| a2l_batch(&l, a));
    g.finish();
    [ours_inner, blaze_inner, a2l_inner]
}

/// (wall, CPU) seconds to the first symbol.
struct Cold {
    ours_cached: (f64, f64),
    ours_none: (f64, f64),
    ours_empty_dir: (f64, f64),
    blazesym: (f64, f64),
    addr2line: (f64, f64),
}

fn first_symbol(st: &Setup) -> Cold {
    let a = |i: usize| st.addrs[i * 7919 % st.addrs.len()];
    println!("\nfirst symbol of a fresh symbolizer (median of {COLD_RUNS}; index builds: of {BUILD_RUNS})");
    let ours_cached = cold(COLD_RUNS, |i| {
        let t = Instant::now();
        let s = ours(Some(st.cache.path()));
        std::hint::black_box(ours_batch(&s, &st.bin, &[a(i)]));
        let d = t.elapsed();
        assert_eq!(s.stats().cache_hits, 1, "the cache was not used");
        d
    });
    print_cold("unwound, from the cache", ours_cached);
    let blazesym = cold(COLD_RUNS, |i| {
        let t = Instant::now();
        let s = blaze();
        std::hint::black_box(blaze_batch(&s, &st.bin, &[a(i)]));
        t.elapsed()
    });
    print_cold("blazesym", blazesym);
    let addr2line = cold(COLD_RUNS, |i| {
        let t = Instant::now();
        let l = addr2line::Loader::new(&st.bin).unwrap();
        std::hint::black_box(a2l_batch(&l, &[a(i)]));
        t.elapsed()
    });
    print_cold("addr2line", addr2line);
    let ours_none = cold(BUILD_RUNS, |i| {
        let t = Instant::now();
        let s = ours(None);
        std::hint::black_box(ours_batch(&s, &st.bin, &[a(i)]));
        t.elapsed()
    });
    print_cold("unwound, no cache (memory)", ours_none);
    let ours_empty_dir = cold(BUILD_RUNS, |i| {
        let dir = tempfile::tempdir().unwrap();
        let t = Instant::now();
        let s = ours(Some(dir.path()));
        std::hint::black_box(ours_batch(&s, &st.bin, &[a(i)]));
        t.elapsed()
    });
    print_cold("unwound, empty cache dir", ours_empty_dir);
    Cold { ours_cached, ours_none, ours_empty_dir, blazesym, addr2line }
}

/// A child's report: peak RSS, then the anonymous and file-backed RSS and the heap in use
/// (malloc's count) after its passes, in KiB, and the lookup rate of its passes after the
/// first.
#[derive(Clone, Copy, Default)]
struct ChildReport {
    hwm_kib: f64,
    anon_kib: f64,
    file_kib: f64,
    heap_kib: f64,
    rate: f64,
}

fn status_kib(status: &str, key: &str) -> f64 {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|r| r.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(f64::NAN)
}

/// Child side: the warm workload of one library, then its memory figures on stdout.
fn child(mode: &str) {
    // Run by hand (to profile one library), the child finds the binary and draws the
    // addresses itself.
    let Some(bin) = std::env::var_os(BINARY_ENV).map(PathBuf::from).or_else(input_binary) else { return };
    let addrs: Vec<u64> = match std::env::var_os(ADDRS_ENV) {
        Some(f) => std::fs::read(f)
            .unwrap()
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
            .collect(),
        None => addresses(&bin).0,
    };
    let cache = std::env::var_os(CACHE_ENV).map(PathBuf::from);
    let pass = |one: &mut dyn FnMut(&[u64]) -> usize| {
        let mut n = 0;
        for b in addrs.chunks(BATCH) {
            n += one(b);
        }
        std::hint::black_box(n);
    };
    let passes: usize = std::env::var(PASSES_ENV).ok().and_then(|v| v.parse().ok()).unwrap_or(2);
    // Measured while the library's state is still alive: the last pass's rate, then the
    // peak and current RSS.
    let twice = |one: &mut dyn FnMut(&[u64]) -> usize| {
        pass(one);
        let t = Instant::now();
        for _ in 1..passes {
            pass(one);
        }
        let rate = (passes - 1) as f64 * addrs.len() as f64 / t.elapsed().as_secs_f64();
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        // SAFETY: mallinfo2 only reads the allocator's counters (all arenas).
        let m = unsafe { libc::mallinfo2() };
        println!(
            "child {} {} {} {} {}",
            status_kib(&status, "VmHWM:"),
            status_kib(&status, "RssAnon:"),
            status_kib(&status, "RssFile:"),
            (m.uordblks + m.hblkhd) as f64 / 1024.0,
            rate
        );
    };
    match mode {
        "baseline" => twice(&mut |a| a.len()),
        "unwound-cached" | "unwound-empty-dir" => {
            let s = ours(cache.as_deref());
            twice(&mut |a| ours_batch(&s, &bin, a));
        }
        "unwound-no-cache" => {
            let s = ours(None);
            twice(&mut |a| ours_batch(&s, &bin, a));
        }
        "blazesym" => {
            let s = blaze();
            twice(&mut |a| blaze_batch(&s, &bin, a));
        }
        "addr2line" => {
            let l = addr2line::Loader::new(&bin).unwrap();
            twice(&mut |a| a2l_batch(&l, a));
        }
        m => panic!("unknown child mode {m}"),
    }
}

fn memory(st: &Setup) -> HashMap<&'static str, ChildReport> {
    let dir = tempfile::tempdir().unwrap();
    let addrs_file = dir.path().join("addrs");
    std::fs::write(&addrs_file, st.addrs.iter().flat_map(|a| a.to_le_bytes()).collect::<Vec<u8>>()).unwrap();
    let exe = std::env::current_exe().unwrap();
    println!("\npeak RSS doing the warm workload (open, two passes over all addresses), one process each");
    println!(
        "  (anon, file: RSS after the passes, the library still alive; heap: malloc's bytes in use then)"
    );
    println!(
        "  {:<18} {:>10} {:>10} {:>10} {:>10} {:>12}",
        "library", "VmHWM MiB", "anon MiB", "file MiB", "heap MiB", "2nd pass/s"
    );
    let mut out = HashMap::new();
    for mode in
        ["baseline", "unwound-cached", "unwound-no-cache", "unwound-empty-dir", "blazesym", "addr2line"]
    {
        let empty = tempfile::tempdir().unwrap();
        let mut cmd = Command::new(&exe);
        cmd.env(CHILD_ENV, mode).env(BINARY_ENV, &st.bin).env(ADDRS_ENV, &addrs_file);
        match mode {
            "unwound-cached" => cmd.env(CACHE_ENV, st.cache.path()),
            "unwound-empty-dir" => cmd.env(CACHE_ENV, empty.path()),
            _ => cmd.env_remove(CACHE_ENV),
        };
        let o = cmd.output().unwrap();
        let text = String::from_utf8_lossy(&o.stdout);
        let Some(line) = text.lines().find_map(|l| l.strip_prefix("child ")) else {
            println!("  {mode:<18} failed: {} {}", o.status, String::from_utf8_lossy(&o.stderr));
            continue;
        };
        let v: Vec<f64> = line.split(' ').map(|x| x.parse().unwrap_or(f64::NAN)).collect();
        let r = ChildReport { hwm_kib: v[0], anon_kib: v[1], file_kib: v[2], heap_kib: v[3], rate: v[4] };
        let rate = if mode == "baseline" { "-".to_string() } else { format!("{:.0}", r.rate) };
        println!(
            "  {mode:<18} {:>10.1} {:>10.1} {:>10.1} {:>10.1} {rate:>12}",
            r.hwm_kib / 1024.0,
            r.anon_kib / 1024.0,
            r.file_kib / 1024.0,
            r.heap_kib / 1024.0,
        );
        out.insert(mode, r);
    }
    out
}

/// Shares of addresses on which two libraries agree: (innermost function and line,
/// innermost function, every frame's function and line).
#[derive(Clone, Copy, Default)]
struct Agreement {
    innermost: f64,
    function: f64,
    chain: f64,
    /// The same inline depth and the same line in every frame: what remains when the
    /// demanglers' spellings (`0ul` or `(unsigned long)0`) are set aside.
    lines: f64,
}

fn agreement(chains: &[Vec<Chain>; 3], addrs: &[u64]) -> [Agreement; 3] {
    let [ours, blaze, a2l] = chains;
    let n = ours.len() as f64;
    let share = |p: &dyn Fn(&Chain) -> bool| ours.iter().filter(|c| p(c)).count() as f64 / n;
    println!(
        "
unwound's answers: {:.2} % found, {:.2} % with a line, {:.2} % with inlined frames",
        100.0 * share(&|c| !c.is_empty()),
        100.0 * share(&|c| c.first().is_some_and(|f| f.1 != 0)),
        100.0 * share(&|c| c.len() > 1)
    );
    println!(
        "agreement: innermost function+line, innermost function, whole chain (function+line each), \
         whole chain (lines only)"
    );
    let pairs: [(&str, &[Chain], &[Chain]); 3] = [
        ("unwound ~ addr2line", ours, a2l),
        ("unwound ~ blazesym", ours, blaze),
        ("blazesym ~ addr2line", blaze, a2l),
    ];
    let mut out = [Agreement::default(); 3];
    for (k, (name, x, y)) in pairs.iter().enumerate() {
        let count = |p: &dyn Fn(&Chain, &Chain) -> bool| {
            x.iter().zip(y.iter()).filter(|(a, b)| !a.is_empty() && p(a, b)).count() as f64 / n
        };
        out[k] = Agreement {
            innermost: count(&|a, b| a.first() == b.first()),
            function: count(&|a, b| a.first().map(|f| &f.0) == b.first().map(|f| &f.0)),
            chain: count(&|a, b| a == b),
            lines: count(&|a, b| a.len() == b.len() && a.iter().zip(b.iter()).all(|(f, g)| f.1 == g.1)),
        };
        println!(
            "  {name:<22} {:>7.2} % {:>7.2} % {:>7.2} % {:>7.2} %",
            100.0 * out[k].innermost,
            100.0 * out[k].function,
            100.0 * out[k].chain,
            100.0 * out[k].lines
        );
        let mut shown = 0;
        for (i, (a, b)) in x.iter().zip(y.iter()).enumerate() {
            if a.first() != b.first() && shown < 2 {
                shown += 1;
                println!("      innermost differs at {:#x}:\n        {a:?}\n        {b:?}", addrs[i]);
            }
        }
        shown = 0;
        for (i, (a, b)) in x.iter().zip(y.iter()).enumerate() {
            if a.first() == b.first() && a != b && shown < 2 {
                shown += 1;
                println!("      outer frames differ at {:#x}:\n        {a:?}\n        {b:?}", addrs[i]);
            }
        }
    }
    out
}

fn summary(dwarf: u64, cold: &Cold, mem: &HashMap<&str, ChildReport>, agree: &[Agreement; 3]) {
    let (wo, wb, wa) = (warm_rate("unwound"), warm_rate("blazesym"), warm_rate("addr2line"));
    let mib = |m: &str| mem.get(m).map_or(f64::NAN, |r| r.hwm_kib / 1024.0);
    let (mo, mn, me, mb, ma) = (
        mib("unwound-cached"),
        mib("unwound-no-cache"),
        mib("unwound-empty-dir"),
        mib("blazesym"),
        mib("addr2line"),
    );
    let ok = |b: bool| if b { "met" } else { "MISSED" };
    println!("\nsummary (input: {:.1} MiB of DWARF)", dwarf as f64 / (1 << 20) as f64);
    println!(
        "{:<40} {:>11} {:>11} {:>11} {:>8} {:>8}  goal",
        "", "unwound", "blazesym", "addr2line", "vs blaze", "vs a2l"
    );
    println!(
        "{:<40} {:>11.0} {:>11.0} {:>11.0} {:>7.2}x {:>7.2}x  >= 1.5 M/s, >= 2x: {}",
        "warm lookups, lines+inlines (addr/s/core)",
        wo,
        wb,
        wa,
        wo / wb,
        wo / wa,
        ok(wo >= 1.5e6 && wo >= 2.0 * wb && wo >= 2.0 * wa)
    );
    let (b, a) = (cold.blazesym, cold.addr2line);
    let cached_goal = format!("<= 10 ms: {}", ok(cold.ours_cached.0 <= 0.010));
    // (label, ours, blazesym, addr2line, goal), seconds.
    for (label, o, b, a, goal) in [
        ("first symbol, ours from cache (ms)", cold.ours_cached.0, b.0, a.0, cached_goal.as_str()),
        ("first symbol, no cache: memory (ms)", cold.ours_none.0, b.0, a.0, ""),
        ("first symbol, no cache: empty dir (ms)", cold.ours_empty_dir.0, b.0, a.0, ""),
        ("  the same, CPU ms, all threads", cold.ours_empty_dir.1, b.1, a.1, ""),
    ] {
        println!(
            "{:<40} {:>11.2} {:>11.2} {:>11.2} {:>7.2}x {:>7.2}x  {goal}",
            label,
            o * 1e3,
            b * 1e3,
            a * 1e3,
            o / b,
            o / a
        );
    }
    let low = mb.min(ma);
    for (label, v, goal) in [
        ("peak RSS, ours with cache (MiB)", mo, true),
        ("peak RSS, ours no cache, memory (MiB)", mn, true),
        ("peak RSS, ours no cache, empty dir (MiB)", me, false),
    ] {
        let g = if goal { format!("<= 0.5x lower peer: {}", ok(v <= 0.5 * low)) } else { String::new() };
        println!(
            "{:<40} {:>11.1} {:>11.1} {:>11.1} {:>7.2}x {:>7.2}x  {g}",
            label,
            v,
            mb,
            ma,
            v / mb,
            v / ma
        );
    }
    println!(
        "{:<40} {:>11} {:>11} {:>11}",
        "baseline child (addresses only, MiB)",
        format!("{:.1}", mib("baseline")),
        "",
        ""
    );
    for (label, k) in [("unwound ~ addr2line", 0), ("unwound ~ blazesym", 1), ("blazesym ~ addr2line", 2)] {
        println!(
            "agreement {label:<21} innermost function+line {:>6.2} %, whole inline chain {:>6.2} %, \
             its lines {:>6.2} %",
            100.0 * agree[k].innermost,
            100.0 * agree[k].chain,
            100.0 * agree[k].lines
        );
    }
    println!("(ratios: ours / peer; times are the median of repeated runs; warm rates one thread)");
}

fn bench(c: &mut Criterion) {
    let Some(bin) = input_binary() else { return };
    let dwarf = dwarf_bytes(&bin);
    let (addrs, nsyms) = addresses(&bin);
    println!(
        "input {}: {:.1} MiB of DWARF{}; {} addresses in {nsyms} function symbols",
        bin.display(),
        dwarf as f64 / (1 << 20) as f64,
        if dwarf < 100 << 20 { " (less than the 100 MB asked for)" } else { "" },
        addrs.len()
    );
    let cache = tempfile::tempdir().unwrap();
    let t = Instant::now();
    let s = ours(Some(cache.path()));
    // A batch this large waits for the whole index (a few addresses are answered from
    // their compilation units before it is built, and the cache is written after).
    std::hint::black_box(ours_batch(&s, &bin, &addrs[..BATCH]));
    let size: u64 = std::fs::read_dir(cache.path())
        .unwrap()
        .filter_map(|e| e.ok()?.metadata().ok())
        .map(|m| m.len())
        .sum();
    println!(
        "unwound cache filled in {:.2} s: {:.1} MiB on disk",
        t.elapsed().as_secs_f64(),
        size as f64 / (1 << 20) as f64
    );
    drop(s);
    let st = Setup { bin, addrs, cache };

    let chains = warm(c, &st);
    let agree = agreement(&chains, &st.addrs);
    let cold = first_symbol(&st);
    let mem = memory(&st);
    summary(dwarf, &cold, &mem, &agree);
}

criterion_group!(benches, bench);

fn main() {
    if let Ok(mode) = std::env::var(CHILD_ENV) {
        child(&mode);
        return;
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}
