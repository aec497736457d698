//! Insta snapshots of the fixtures' symbolized output (the repository path redacted).

use std::path::Path;
use std::process::Command;

use unwound_symbolize::{addr2line_text, Options, Symbolizer};

fn symbolized(name: &str) -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().canonicalize().unwrap();
    let bin = root.join("target/fixtures").join(name);
    assert!(bin.exists(), "fixtures missing: run `make -C fixtures`");
    let nm = Command::new("nm").args(["-n", "--defined-only"]).arg(&bin).output().unwrap();
    // Start and start+5 of the fixture's own functions (not the C runtime's).
    let addrs: Vec<u64> = String::from_utf8_lossy(&nm.stdout)
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() == 3 && matches!(f[1], "T" | "W") && (f[2].contains("chain") || f[2] == "main"))
                .then(|| u64::from_str_radix(f[0], 16).unwrap())
        })
        .flat_map(|a| [a, a + 5])
        .collect();
    assert!(addrs.len() >= 8);
    let s = Symbolizer::new(Options { cache_dir: None, debuginfod: None, ..Options::default() });
    let out = s.symbolize_elf(&bin, &addrs).unwrap();
    let text: String = addrs.iter().zip(&out).map(|(&a, r)| addr2line_text(a, r, true)).collect();
    text.replace(root.to_str().unwrap(), "<repo>")
}

#[test]
fn c_chain() {
    insta::assert_snapshot!(symbolized("chain_nofp"));
}

#[test]
fn cpp_chain() {
    insta::assert_snapshot!(symbolized("cpp_chain_nofp"));
}
