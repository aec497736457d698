//! `Symbolizer::release_unused`: binaries no lookup used since the previous call are
//! closed, their decompressed blocks dropped, and they answer the same when opened again.

use std::path::{Path, PathBuf};
use std::process::Command;

use unwound_symbolize::{Options, Symbolizer};

fn fixture(name: &str) -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/fixtures").join(name);
    assert!(p.exists(), "fixtures missing: run `make -C fixtures` (scripts/test.sh does)");
    p
}

fn opts(cache: Option<&Path>) -> Options {
    Options { cache_dir: cache.map(Path::to_path_buf), debuginfod: None, ..Options::default() }
}

/// Start addresses of the defined functions (by `nm`), and a few bytes into each.
fn addrs_of(path: &Path) -> Vec<u64> {
    let out = Command::new("nm").arg("--defined-only").arg(path).output().expect("nm");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let a = u64::from_str_radix(f.next()?, 16).ok()?;
            matches!(f.next()?, "T" | "t").then_some(a)
        })
        .flat_map(|a| [a, a + 3])
        .collect()
}

/// This process's open file descriptors on `file`, or on files under it (a directory).
fn fds_on(file: &Path) -> usize {
    let file = file.canonicalize().unwrap();
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|target| target.starts_with(&file))
        .count()
}

#[test]
fn release_unused_closes_only_the_binary_not_used_since() {
    let (used, unused) = (fixture("rs_chain_nofp"), fixture("cpp_chain_nofp"));
    let (used_addrs, unused_addrs) = (addrs_of(&used), addrs_of(&unused));
    let dir = tempfile::tempdir().unwrap();
    let s = Symbolizer::new(opts(Some(dir.path())));
    let used_before = s.symbolize_elf(&used, &used_addrs).unwrap();
    let unused_before = s.symbolize_elf(&unused, &unused_addrs).unwrap();
    assert!(unused_before.iter().filter(|r| r.is_ok()).count() > unused_addrs.len() / 2);
    assert_eq!(s.stats().binaries_open, 2);
    let fds_before = (fds_on(&unused), fds_on(dir.path()));
    assert!(fds_before.0 >= 1, "the binary's file is open");
    assert_eq!(fds_before.1, 2, "both index files are open");

    // Both were used since the symbolizer was made.
    assert_eq!(s.release_unused(), 0);
    assert_eq!(s.stats().binaries_released, 0);
    assert_eq!(s.symbolize_elf(&used, &used_addrs).unwrap(), used_before);
    assert_eq!(s.release_unused(), 1);
    let st = s.stats();
    assert_eq!((st.binaries_released, st.binaries_open), (1, 1));
    // Its file and its index file are closed; the other's index file is still open.
    assert_eq!(fds_on(&unused), 0, "the released binary's file is still open");
    assert_eq!(fds_on(dir.path()), 1, "index files open");

    // Opened again (from the cache), with the same answers.
    assert_eq!(s.symbolize_elf(&unused, &unused_addrs).unwrap(), unused_before);
    assert_eq!(s.stats().binaries_open, 2);
    assert_eq!(s.symbolize_elf(&used, &used_addrs).unwrap(), used_before);
}

#[test]
fn released_binary_leaves_no_resident_blocks() {
    let bin = fixture("cpp_clones");
    let addrs = addrs_of(&bin);
    let s = Symbolizer::new(opts(None));
    let before = s.symbolize_elf(&bin, &addrs).unwrap();
    let st = s.stats();
    assert!(st.resident_bytes > 0 && st.blocks_loaded > 0, "{st:?}");
    assert_eq!(s.release_unused(), 0);
    assert!(s.stats().resident_bytes > 0);
    assert_eq!(s.release_unused(), 1);
    let st = s.stats();
    assert_eq!((st.resident_bytes, st.binaries_open, st.binaries_released), (0, 0, 1), "{st:?}");
    // Nothing left to release.
    assert_eq!(s.release_unused(), 0);
    assert_eq!(s.symbolize_elf(&bin, &addrs).unwrap(), before);
    assert!(s.stats().resident_bytes > 0);
}

/// Batches running while binaries are released get the answers they get alone.
#[test]
fn release_unused_during_batches() {
    let bins: Vec<PathBuf> = ["rs_chain_nofp", "cpp_clones", "chain_O0"].map(fixture).into();
    let addrs: Vec<Vec<u64>> = bins.iter().map(|b| addrs_of(b)).collect();
    let want: Vec<_> = bins
        .iter()
        .zip(&addrs)
        .map(|(b, a)| Symbolizer::new(opts(None)).symbolize_elf(b, a).unwrap())
        .collect();
    // A budget of a few blocks: blocks are evicted and loaded again too.
    let s = Symbolizer::new(Options { memory_budget: 64 << 10, ..opts(None) });
    let done = std::sync::atomic::AtomicBool::new(false);
    let released = std::thread::scope(|scope| {
        let releaser = scope.spawn(|| {
            let mut n = 0;
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                n += s.release_unused();
                std::thread::yield_now();
            }
            n
        });
        let workers: Vec<_> = (0..bins.len())
            .map(|t| {
                let (s, bins, addrs, want) = (&s, &bins, &addrs, &want);
                scope.spawn(move || {
                    for round in 0..30 {
                        let i = (t + round) % bins.len();
                        assert_eq!(
                            s.symbolize_elf(&bins[i], &addrs[i]).unwrap(),
                            want[i],
                            "{}",
                            bins[i].display()
                        );
                    }
                })
            })
            .collect();
        for w in workers {
            w.join().unwrap();
        }
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        releaser.join().unwrap()
    });
    assert!(released > 0, "no binary was released");
    assert_eq!(s.stats().binaries_released, released as u64);
    s.release_unused();
    s.release_unused();
    assert_eq!((s.stats().binaries_open, s.stats().resident_bytes), (0, 0));
}
