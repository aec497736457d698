//! Stripped binaries: code no symbol covers is grouped by the function its `.eh_frame`
//! record (FDE) delimits, so every address of one static function gets one answer, and no
//! address is named after an exported neighbour. Expected values come from `readelf`.

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;

use unwound_symbolize::{NameSource, Options, Resolution, Symbolizer};

fn readelf(args: &[&str], file: &Path) -> String {
    let out = Command::new("readelf").args(args).arg(file).output().expect("readelf");
    assert!(out.status.success(), "readelf {args:?} {}", file.display());
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// FDE ranges, as `readelf --debug-dump=frames` lists them.
fn fdes(file: &Path) -> Vec<(u64, u64)> {
    let mut v: Vec<(u64, u64)> = readelf(&["--debug-dump=frames"], file)
        .lines()
        .filter(|l| l.contains(" FDE "))
        .filter_map(|l| {
            let (a, b) = l.split("pc=").nth(1)?.trim().split_once("..")?;
            Some((u64::from_str_radix(a, 16).ok()?, u64::from_str_radix(b, 16).ok()?))
        })
        .filter(|r| r.0 != 0 && r.1 > r.0)
        .collect();
    v.sort_unstable();
    v
}

/// Defined function symbols (address, size, name) of `--syms` or `--dyn-syms`.
fn func_symbols(file: &Path, which: &str) -> Vec<(u64, u64, String)> {
    readelf(&[which, "-W"], file)
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            // Num: Value Size Type Bind Vis Ndx Name
            if f.len() < 8 || f[3] != "FUNC" || f[6] == "UND" {
                return None;
            }
            let size = if let Some(h) = f[2].strip_prefix("0x") {
                u64::from_str_radix(h, 16).ok()?
            } else {
                f[2].parse().ok()?
            };
            Some((u64::from_str_radix(f[1], 16).ok()?, size, f[7].split('@').next()?.to_string()))
        })
        .collect()
}

fn covered_by(syms: &[(u64, u64, String)], a: u64) -> bool {
    syms.iter().any(|s| s.0 <= a && a < s.0 + s.1.max(1))
}

/// Three addresses of each FDE: its start, middle and last byte.
fn probes(ranges: &[(u64, u64)]) -> Vec<(u64, (u64, u64))> {
    ranges.iter().flat_map(|&r| [r.0, r.0 + (r.1 - r.0) / 2, r.1 - 1].map(|a| (a, r))).collect()
}

fn eh_frame_start(r: &Resolution) -> Option<u64> {
    let f = r.as_ref().ok()?.frames.last()?;
    match f.source {
        Some(NameSource::EhFrame { start }) if f.function.is_none() => Some(start),
        _ => None,
    }
}

/// Debian's postgres (no `.symtab`, no debug file): its static functions are known only
/// from `.eh_frame`.
#[test]
fn distribution_binary_groups_static_functions_by_fde() {
    let Some(bin) = std::fs::read_dir("/usr/lib/postgresql")
        .ok()
        .and_then(|d| d.filter_map(|e| e.ok()).map(|e| e.path().join("bin/postgres")).find(|p| p.exists()))
    else {
        panic!("postgresql not installed (scripts/setup.sh installs it)");
    };
    assert!(!readelf(&["-S", "-W"], &bin).contains(".symtab"), "{} is not stripped", bin.display());
    let exported = func_symbols(&bin, "--dyn-syms");
    let all = fdes(&bin);
    // FDEs no exported symbol touches: static functions.
    let statics: Vec<(u64, u64)> = all
        .iter()
        .copied()
        .filter(|&(s, e)| !exported.iter().any(|x| x.0 < e && s < x.0 + x.1.max(1)))
        .step_by(7)
        .collect();
    assert!(statics.len() > 300, "{} static functions sampled", statics.len());
    let p = probes(&statics);
    let addrs: Vec<u64> = p.iter().map(|x| x.0).collect();
    let s = Symbolizer::new(Options { cache_dir: None, ..Options::default() });
    let answers = s.symbolize_elf(&bin, &addrs).unwrap();
    let mut per_fde: HashMap<(u64, u64), Vec<&Resolution>> = HashMap::new();
    for ((a, fde), r) in p.iter().zip(&answers) {
        assert_eq!(eh_frame_start(r), Some(fde.0), "{a:#x} in the static function at {:#x}: {r:?}", fde.0);
        per_fde.entry(*fde).or_default().push(r);
    }
    for (fde, rs) in per_fde {
        assert!(rs.windows(2).all(|w| w[0] == w[1]), "addresses of {:#x} answered differently", fde.0);
    }
    // Exported functions are still named by their symbol.
    let named: Vec<&(u64, u64, String)> = exported.iter().filter(|x| x.1 > 0).step_by(11).collect();
    let addrs: Vec<u64> = named.iter().map(|x| x.0 + x.1 / 2).collect();
    for (x, r) in named.iter().zip(s.symbolize_elf(&bin, &addrs).unwrap()) {
        let f = r.unwrap();
        let f = f.frames.last().unwrap();
        assert_eq!(f.source, Some(NameSource::DynamicSymbol));
        assert_eq!(f.function.as_deref(), Some(unwound_symbolize::demangle(&x.2).as_str()));
    }
}

/// The clone fixture stripped of every symbol: each address is grouped under the start of
/// the function the unstripped file's symbol table puts it in.
#[test]
fn stripped_fixture_groups_by_the_functions_of_its_symbol_table() {
    let d = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/fixtures");
    let (full, stripped) = (d.join("cpp_clones"), d.join("cpp_clones_stripped"));
    assert!(stripped.exists(), "fixtures missing: run `make -C fixtures` (scripts/test.sh does)");
    let syms: Vec<(u64, u64, String)> =
        func_symbols(&full, "--syms").into_iter().filter(|s| s.1 > 0).collect();
    let dynamic = func_symbols(&stripped, "--dyn-syms");
    let p = probes(&fdes(&stripped));
    let s = Symbolizer::new(Options { cache_dir: None, ..Options::default() });
    let answers = s.symbolize_elf(&stripped, &p.iter().map(|x| x.0).collect::<Vec<_>>()).unwrap();
    let mut checked = 0;
    for ((a, _), r) in p.iter().zip(&answers) {
        if covered_by(&dynamic, *a) {
            continue;
        }
        let Some(sym) = syms.iter().find(|s| s.0 <= *a && *a < s.0 + s.1) else { continue };
        assert_eq!(eh_frame_start(r), Some(sym.0), "{a:#x} in {} at {:#x}: {r:?}", sym.2, sym.0);
        checked += 1;
    }
    assert!(checked > 60, "only {checked} addresses checked");
}
