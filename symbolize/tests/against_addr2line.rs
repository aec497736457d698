//! The Symbolizer checked against binutils `addr2line -a -f -i -C` (exact text) and
//! `llvm-symbolizer-22` (frames, lines, file names) on the fixtures, on programs built here
//! with `-g -O2` (C, C++ with templates, Rust), on a copy with zstd-compressed debug
//! sections, and on libc through its separate debuginfo (libc6-dbg).

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use object::{Object, ObjectSymbol, SymbolKind};
use unwound_symbolize::{addr2line_text, Options, Symbolizer};

fn fixtures() -> PathBuf {
    let d = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/fixtures");
    assert!(d.join("chain_nofp").exists(), "fixtures missing: run `make -C fixtures` (scripts/test.sh does)");
    d
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
}

/// Builds the test programs once per test process.
fn programs() -> &'static Path {
    static DIR: std::sync::OnceLock<tempfile::TempDir> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/programs");
        let o = |n: &str| dir.path().join(n);
        run(Command::new("gcc").args(["-g", "-O2", "-o"]).arg(o("inl")).arg(src.join("inl.c")));
        run(Command::new("g++").args(["-g", "-O2", "-o"]).arg(o("tmpl")).arg(src.join("tmpl.cpp")));
        run(Command::new("rustc")
            .args(["-g", "-C", "opt-level=2", "--edition", "2021", "-o"])
            .arg(o("iter"))
            .arg(src.join("iter.rs")));
        run(Command::new("objcopy").arg("--compress-debug-sections=zstd").arg(o("tmpl")).arg(o("tmpl_zstd")));
        dir
    })
    .path()
}

/// Addresses inside function symbols of `symbols_from`, spread by a fixed-seed generator.
fn sample(symbols_from: &Path, n: usize) -> Vec<u64> {
    let data = std::fs::read(symbols_from).unwrap();
    let obj = object::File::parse(&*data).unwrap();
    let funcs: Vec<(u64, u64)> = obj
        .symbols()
        .filter(|s| s.kind() == SymbolKind::Text && s.size() > 0 && s.address() > 0)
        .map(|s| (s.address(), s.size()))
        .collect();
    assert!(!funcs.is_empty(), "{} has no function symbols", symbols_from.display());
    let mut x: u64 = 0x9e3779b97f4a7c15;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut v: Vec<u64> = (0..n)
        .map(|_| {
            let (a, s) = funcs[(next() % funcs.len() as u64) as usize];
            a + next() % s
        })
        .collect();
    v.sort_unstable();
    v.dedup();
    v
}

fn tool_output(cmd: &mut Command, addrs: &[u64]) -> String {
    let mut child = cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().expect("oracle tool");
    let input: String = addrs.iter().map(|a| format!("{a:#x}\n")).collect();
    let mut stdin = child.stdin.take().unwrap();
    let writer = std::thread::spawn(move || stdin.write_all(input.as_bytes()));
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap().unwrap();
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// binutils' answer per address: the exact text block.
fn addr2line(file: &Path, addrs: &[u64]) -> HashMap<u64, String> {
    let text = tool_output(Command::new("addr2line").args(["-a", "-f", "-i", "-C", "-e"]).arg(file), addrs);
    let mut map = HashMap::new();
    let mut cur: Option<(u64, String)> = None;
    for line in text.lines() {
        if line.len() == 18 && line.starts_with("0x") {
            if let Some((a, t)) = cur.take() {
                map.insert(a, t);
            }
            let a = u64::from_str_radix(&line[2..], 16).unwrap();
            cur = Some((a, format!("{line}\n")));
        } else if let Some((_, t)) = cur.as_mut() {
            t.push_str(line);
            t.push('\n');
        }
    }
    if let Some((a, t)) = cur {
        map.insert(a, t);
    }
    map
}

/// (line, file name) per frame, innermost first, as llvm-symbolizer reports them.
type Locs = Vec<(u32, String)>;

fn base(path: &str) -> String {
    path.rsplit('/').next().unwrap_or(path).to_string()
}

fn llvm(file: &Path, addrs: &[u64]) -> Vec<Locs> {
    let text = tool_output(
        Command::new("llvm-symbolizer-22").arg(format!("--obj={}", file.display())).arg("--inlining"),
        addrs,
    );
    text.split("\n\n")
        .filter(|b| !b.trim().is_empty())
        .map(|b| {
            b.lines()
                .skip(1)
                .step_by(2)
                .map(|l| {
                    let mut p = l.rsplitn(3, ':');
                    let _col = p.next();
                    let line = p.next().and_then(|l| l.parse().ok()).unwrap_or(0);
                    let f = p.next().unwrap_or("??");
                    (line, if f == "??" { String::new() } else { base(f) })
                })
                .collect()
        })
        .collect()
}

struct Agreement {
    addrs: usize,
    /// Exactly binutils' text.
    binutils: usize,
    /// Differs from binutils only in file paths, where llvm-symbolizer agrees with us:
    /// binutils 2.40 prints DWARF 5 line-table file 1 as file 0 (the unit's primary file).
    binutils_file_bug: usize,
    /// Differs from binutils only by clone suffixes of out-of-line functions
    /// (`[clone .isra.0]`, `main.cold`) that binutils drops where DWARF has the function's
    /// linkage name or the address is inside an inlined call; llvm-symbolizer names those
    /// functions by their symbol as we do (`tests/cpp_names.rs` checks the names).
    binutils_clone_suffix: usize,
    llvm: usize,
}

/// A function name without GCC's clone suffixes: ` [clone .constprop.0]` as libiberty
/// prints them in C++ names, `.cold` or `.part.0` at the end of an unmangled one.
fn without_clone_suffix(name: &str) -> String {
    let mut out = name.to_string();
    while let Some(i) = out.find(" [clone .") {
        let Some(j) = out[i..].find(']') else { break };
        out.replace_range(i..i + j + 1, "");
    }
    if !out.contains('(') {
        for suffix in [".cold", ".part.", ".isra.", ".constprop."] {
            if let Some(i) = out.find(suffix) {
                out.truncate(i);
            }
        }
    }
    out
}

/// The text with every function name's clone suffixes removed.
fn without_clone_suffixes(text: &str) -> Vec<String> {
    text.lines()
        .enumerate()
        .map(|(i, l)| if i % 2 == 1 { without_clone_suffix(l) } else { l.to_string() })
        .collect()
}

/// The text with every `file:line` reduced to its line.
fn without_files(text: &str) -> Vec<String> {
    text.lines()
        .enumerate()
        .map(
            |(i, l)| {
                if i % 2 == 0 && i > 0 {
                    l.rsplit(':').next().unwrap_or(l).to_string()
                } else {
                    l.to_string()
                }
            },
        )
        .collect()
}

fn compare(file: &Path, symbols_from: &Path, n: usize) -> Agreement {
    let addrs = sample(symbols_from, n);
    let s = Symbolizer::new(Options { cache_dir: None, ..Options::default() });
    let ours = s.symbolize_elf(file, &addrs).unwrap();
    let theirs = addr2line(file, &addrs);
    let lv = llvm(file, &addrs);
    assert_eq!(lv.len(), addrs.len(), "llvm-symbolizer answered every address");
    let (mut b, mut bf, mut bc, mut l) = (0, 0, 0, 0);
    let mut shown = 0;
    for (i, (&a, r)) in addrs.iter().zip(&ours).enumerate() {
        let text = addr2line_text(a, r, true);
        let mine: Locs = match r {
            Ok(s) => {
                s.frames.iter().map(|f| (f.line, f.file.as_deref().map(base).unwrap_or_default())).collect()
            }
            Err(_) => vec![(0, String::new())],
        };
        let llvm_agrees = mine == lv[i];
        if llvm_agrees {
            l += 1;
        }
        let t = theirs.get(&a).map_or("", |s| s.as_str());
        if t == text {
            b += 1;
        } else if llvm_agrees && without_files(t) == without_files(&text) {
            bf += 1;
        } else if llvm_agrees && without_clone_suffixes(t) == without_clone_suffixes(&text) {
            bc += 1;
        } else if llvm_agrees
            && without_files(&without_clone_suffixes(t).join("\n"))
                == without_files(&without_clone_suffixes(&text).join("\n"))
        {
            // Both: binutils' file-index bug in a clone.
            bf += 1;
        } else if shown < 3 {
            shown += 1;
            eprintln!("{}: binutils\n{t}ours\n{text}", file.display());
        }
    }
    let ag = Agreement {
        addrs: addrs.len(),
        binutils: b,
        binutils_file_bug: bf,
        binutils_clone_suffix: bc,
        llvm: l,
    };
    let pct = |n: usize| 100.0 * n as f64 / ag.addrs as f64;
    eprintln!(
        "{}: {} addresses, addr2line exact {:.2}% (+{:.2}% binutils file-index bug, +{:.2}% clone suffixes \
         binutils drops), llvm-symbolizer {:.2}%",
        file.display(),
        ag.addrs,
        pct(b),
        pct(bf),
        pct(bc),
        pct(l)
    );
    ag
}

/// `exact`: the share of binutils' exact text, clone suffixes aside.
fn assert_rates(ag: &Agreement, binutils: f64, exact: f64, llvm: f64) {
    assert!(ag.addrs >= 100, "too few sampled addresses: {}", ag.addrs);
    let b = (ag.binutils + ag.binutils_file_bug + ag.binutils_clone_suffix) as f64 / ag.addrs as f64;
    let l = ag.llvm as f64 / ag.addrs as f64;
    assert!(b >= binutils, "addr2line agreement {b:.4} below {binutils}");
    let e = (ag.binutils + ag.binutils_clone_suffix) as f64 / ag.addrs as f64;
    assert!(e >= exact, "exact addr2line text {e:.4} below {exact}");
    assert!(l >= llvm, "llvm-symbolizer agreement {l:.4} below {llvm}");
}

#[test]
fn fixtures_agree() {
    let d = fixtures();
    for name in
        ["chain_nofp", "chain_O0", "cpp_chain_nofp", "rs_chain_nofp", "qsort_nofp", "libunwound_plt_nofp.so"]
    {
        let f = d.join(name);
        assert_rates(&compare(&f, &f, 1500), 0.99, 0.95, 0.99);
    }
}

#[test]
fn optimized_programs_agree() {
    let p = programs();
    // Template names come out as binutils spells them only through libiberty's demangler.
    let cpp = cfg!(feature = "libiberty-demangle");
    for name in ["inl", "tmpl", "iter", "tmpl_zstd"].into_iter().filter(|n| cpp || !n.starts_with("tmpl")) {
        let f = p.join(name);
        assert_rates(&compare(&f, &f, 3000), 0.99, 0.95, 0.99);
    }
}

#[test]
fn zstd_compressed_sections_give_the_same_answers() {
    let p = programs();
    let addrs = sample(&p.join("tmpl"), 2000);
    let s = Symbolizer::new(Options { cache_dir: None, ..Options::default() });
    let plain = s.symbolize_elf(p.join("tmpl"), &addrs).unwrap();
    let zstd = s.symbolize_elf(p.join("tmpl_zstd"), &addrs).unwrap();
    assert_eq!(plain, zstd);
    assert!(
        plain.iter().filter(|r| r.as_ref().is_ok_and(|s| s.frames[0].line > 0)).count() > addrs.len() / 2
    );
}

/// libc through libc6-dbg: glibc's assembly gives one piece of code several
/// `DW_TAG_subprogram`s (one per label: `__geteuid`, `__GI___geteuid`, `geteuid`,
/// `__GI_geteuid`), and binutils names it by the last. binutils 2.40 reads some DWARF 5
/// file indexes of this libc differently (llvm-symbolizer and we agree with each other
/// there), which the exact rate counts against us.
#[test]
fn libc_through_separate_debuginfo() {
    let libc = Path::new("/lib/x86_64-linux-gnu/libc.so.6");
    let s = Symbolizer::new(Options { cache_dir: None, ..Options::default() });
    let src = s.debug_source(libc).unwrap();
    let debug = src.path().expect("libc6-dbg installed (scripts/setup.sh)").to_path_buf();
    let ag = compare(libc, &debug, 3000);
    assert_rates(&ag, 0.99, 0.90, 0.99);
}
