//! Function names of optimized C++ (GCC's out-of-line clones: `.constprop.N`, `.isra.N`,
//! `.part.N`, `.cold`; static functions whose DWARF name is shorter than their symbol)
//! checked against binutils `addr2line -a -f -i -C` and `llvm-symbolizer-22` on addresses
//! spread over the whole text section.
//!
//! The two tools spell names with different demanglers (`> >` and `>>`, `[clone .isra.0]`
//! and `(.isra.0)`), so llvm-symbolizer's names are taken mangled (`--no-demangle`) and
//! demangled by binutils' `c++filt`. Where the tools disagree with each other (binutils
//! drops the clone suffix of a function whose DWARF has a linkage name; llvm-symbolizer
//! names the outermost frame of a `.cold` part by its symbol, `main.cold`), we can agree
//! with only one of them, so the goal is stated on the addresses where they agree.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use object::{Object, ObjectSection};
use unwound_symbolize::{Options, Symbolizer};

fn fixtures() -> PathBuf {
    let d = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/fixtures");
    assert!(d.join("cpp_clones").exists(), "fixtures missing: run `make -C fixtures` (scripts/test.sh does)");
    d
}

/// `n` addresses spread uniformly (fixed seed) over the executable sections of `file`.
fn sample_text(file: &Path, n: usize) -> Vec<u64> {
    let data = std::fs::read(file).unwrap();
    let obj = object::File::parse(&*data).unwrap();
    let text: Vec<(u64, u64)> = obj
        .sections()
        // A separate debug file keeps `.text` as NOBITS, at its addresses.
        .filter(|s| s.name().is_ok_and(|n| n == ".text") && s.address() != 0 && s.size() > 0)
        .map(|s| (s.address(), s.size()))
        .collect();
    assert!(!text.is_empty(), "{} has no .text", file.display());
    let total: u64 = text.iter().map(|t| t.1).sum();
    let mut x: u64 = 0x2545f4914f6cdd1d;
    let mut v: Vec<u64> = (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let mut off = x % total;
            for &(a, s) in &text {
                if off < s {
                    return a + off;
                }
                off -= s;
            }
            unreachable!()
        })
        .collect();
    v.sort_unstable();
    v.dedup();
    v
}

fn tool_output(cmd: &mut Command, input: String) -> String {
    let mut child =
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let mut stdin = child.stdin.take().unwrap();
    let writer = std::thread::spawn(move || stdin.write_all(input.as_bytes()));
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap().unwrap();
    assert!(out.status.success(), "{cmd:?} failed");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn addresses_in(addrs: &[u64]) -> String {
    addrs.iter().map(|a| format!("{a:#x}\n")).collect()
}

/// Function names per address, innermost first, from `addr2line -a -f -i -C`.
fn binutils(file: &Path, addrs: &[u64]) -> Vec<Vec<String>> {
    let text = tool_output(
        Command::new("addr2line").args(["-a", "-f", "-i", "-C", "-e"]).arg(file),
        addresses_in(addrs),
    );
    let mut out: Vec<Vec<String>> = Vec::new();
    let mut lines = text.lines().peekable();
    while let Some(l) = lines.next() {
        assert!(l.starts_with("0x"), "address line expected, got {l:?}");
        let mut names = Vec::new();
        while let Some(name) = lines.next_if(|l| !(l.len() == 18 && l.starts_with("0x"))) {
            names.push(name.to_string());
            lines.next(); // file:line
        }
        out.push(names);
    }
    assert_eq!(out.len(), addrs.len(), "addr2line answered every address");
    out
}

/// Function names per address, innermost first, from `llvm-symbolizer-22 --no-demangle`,
/// demangled by `c++filt`.
fn llvm(file: &Path, addrs: &[u64]) -> Vec<Vec<String>> {
    let text = tool_output(
        Command::new("llvm-symbolizer-22")
            .arg(format!("--obj={}", file.display()))
            .args(["--inlining", "--no-demangle"]),
        addresses_in(addrs),
    );
    let blocks: Vec<Vec<String>> = text
        .split("\n\n")
        .filter(|b| !b.trim().is_empty())
        .map(|b| b.lines().step_by(2).map(str::to_string).collect())
        .collect();
    assert_eq!(blocks.len(), addrs.len(), "llvm-symbolizer answered every address");
    let flat: String = blocks.iter().flatten().map(|n| format!("{n}\n")).collect();
    let demangled = tool_output(&mut Command::new("c++filt"), flat);
    let mut names = demangled.lines();
    blocks
        .iter()
        .map(|b| b.iter().map(|_| names.next().expect("c++filt line per name").to_string()).collect())
        .collect()
}

struct Agreement {
    addrs: usize,
    binutils: usize,
    llvm: usize,
    /// Addresses where binutils and llvm-symbolizer give the same names.
    tools_agree: usize,
    /// ... and we give them too.
    all_agree: usize,
    /// We give the names of one tool or the other.
    either: usize,
}

fn compare(file: &Path, n: usize) -> Agreement {
    let addrs = sample_text(file, n);
    let s = Symbolizer::new(Options { cache_dir: None, ..Options::default() });
    let ours: Vec<Vec<String>> = s
        .symbolize_elf(file, &addrs)
        .unwrap()
        .into_iter()
        .map(|r| match r {
            Ok(s) => s.frames.iter().map(|f| f.function.as_deref().unwrap_or("??").to_string()).collect(),
            Err(_) => vec!["??".to_string()],
        })
        .collect();
    let b = binutils(file, &addrs);
    let l = llvm(file, &addrs);
    let mut ag =
        Agreement { addrs: addrs.len(), binutils: 0, llvm: 0, tools_agree: 0, all_agree: 0, either: 0 };
    let mut shown = 0;
    for i in 0..addrs.len() {
        let (ob, ol, bl) = (ours[i] == b[i], ours[i] == l[i], b[i] == l[i]);
        ag.binutils += usize::from(ob);
        ag.llvm += usize::from(ol);
        ag.tools_agree += usize::from(bl);
        ag.all_agree += usize::from(bl && ob);
        ag.either += usize::from(ob || ol);
        if !(ob || ol) && shown < 4 {
            shown += 1;
            eprintln!(
                "{:#x}:\n  ours     {:?}\n  binutils {:?}\n  llvm     {:?}",
                addrs[i], ours[i], b[i], l[i]
            );
        }
    }
    let pct = |k: usize, of: usize| 100.0 * k as f64 / of.max(1) as f64;
    eprintln!(
        "{}: {} addresses; function names agree with addr2line {:.2}%, llvm-symbolizer {:.2}%, \
         one of them {:.2}%; the tools agree on {:.2}%, and we with them there on {:.2}%",
        file.display(),
        ag.addrs,
        pct(ag.binutils, ag.addrs),
        pct(ag.llvm, ag.addrs),
        pct(ag.either, ag.addrs),
        pct(ag.tools_agree, ag.addrs),
        pct(ag.all_agree, ag.tools_agree),
    );
    ag
}

fn assert_names(ag: &Agreement) {
    assert!(ag.addrs >= 500, "too few sampled addresses: {}", ag.addrs);
    assert!(ag.tools_agree * 2 >= ag.addrs, "the tools agree on too few addresses to judge");
    let where_tools_agree = ag.all_agree as f64 / ag.tools_agree as f64;
    assert!(
        where_tools_agree >= 0.99,
        "names agree with both tools on {where_tools_agree:.4} of their common answers"
    );
    let either = ag.either as f64 / ag.addrs as f64;
    assert!(either >= 0.99, "names agree with one tool or the other on only {either:.4}");
}

#[test]
fn clone_fixture_names_agree() {
    assert_names(&compare(&fixtures().join("cpp_clones"), 4000));
}

/// C++ at scale: the separate debug file of Debian's `ceph-mon` (the symbolize benchmark's
/// input, fetched by `scripts/bench-input.sh`; GCC 12, `-O2 -g`, libstdc++ and boost
/// templates, thousands of clones). Slow (binutils reads the whole file), so run on demand:
/// `cargo test -p unwound-symbolize --test cpp_names -- --ignored` (another file with
/// `UNWOUND_SYMBOLIZE_BENCH_BINARY`).
#[test]
#[ignore]
fn ceph_mon_names_agree() {
    if let Some(f) = std::env::var_os("UNWOUND_SYMBOLIZE_BENCH_BINARY") {
        return assert_names(&compare(Path::new(&f), 3000));
    }
    let out = Command::new("bash")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/bench-input.sh"))
        .output()
        .unwrap();
    assert!(out.status.success(), "scripts/bench-input.sh: {}", String::from_utf8_lossy(&out.stderr));
    let file = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    assert_names(&compare(&file, 3000));
}
