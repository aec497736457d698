//! The compiled tables agree with binutils' `readelf --debug-dump=frames-interp`: the CFA
//! rule, the return-address rule and the rbp rule are the ones readelf prints, compared in
//! readelf's own notation (`UnwindRule`'s `Display`).
//!
//! - System ELF files: at the start address of every row (or a sample of them). CI checks
//!   a deterministic sample of ≥ 50 files from /usr/lib/x86_64-linux-gnu and /usr/bin. The
//!   full sweep: `UNWOUND_FULL_SWEEP=1 cargo test --release -p unwound-unwind-tables --test
//!   readelf -- --nocapture`.
//! - The fixtures (C, C++ and Rust, with and without frame pointers, start-up code and PLT
//!   included): at every instruction `objdump -d` lists inside a row.

use std::path::{Path, PathBuf};
use std::process::Command;

use unwound_unwind_tables::layout::{CfaKind, UnwindRule};
use unwound_unwind_tables::UnwindTable;

#[derive(Debug)]
struct Row {
    loc: u64,
    /// Where the row ends: the next row of its FDE, or the FDE's end.
    end: u64,
    cfa: String,
    rbp: String,
    ra: String,
}

/// Rows of every FDE readelf prints for `.eh_frame`.
fn readelf_rows(path: &Path) -> Option<Vec<Row>> {
    let out = Command::new("readelf").arg("--debug-dump=frames-interp").arg(path).output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut rows: Vec<Row> = Vec::new();
    let mut columns: Vec<String> = Vec::new();
    let mut in_eh_frame = false;
    let mut skip = false;
    let mut fde_end = 0u64;
    let mut fde_first_row = 0usize;
    for line in text.lines() {
        if line.starts_with("Contents of the .eh_frame section") {
            in_eh_frame = true;
            continue;
        }
        if line.starts_with("Contents of the") {
            in_eh_frame = false;
        }
        if !in_eh_frame {
            continue;
        }
        let t = line.trim_start();
        if t.starts_with("LOC") {
            columns = t.split_whitespace().map(str::to_string).collect();
            continue;
        }
        if line.contains(" FDE ") || line.contains(" CIE") || line.contains("ZERO terminator") {
            columns.clear();
            fde_first_row = rows.len();
            // FDEs of discarded code keep address 0 (e.g. after --gc-sections); nothing
            // runs there and no FDE table lists them.
            skip = line.contains(" CIE") || line.contains(" pc=0000000000000000..");
            fde_end = line
                .split(" pc=")
                .nth(1)
                .and_then(|r| r.split("..").nth(1))
                .and_then(|e| u64::from_str_radix(e.trim(), 16).ok())
                .unwrap_or(0);
            continue;
        }
        if skip {
            continue;
        }
        if columns.is_empty() {
            continue;
        }
        let f: Vec<&str> = t.split_whitespace().collect();
        if f.len() != columns.len() || u64::from_str_radix(f[0], 16).is_err() {
            continue;
        }
        // readelf also prints a row that starts at the FDE's end (an empty range; glibc's
        // PLT FDEs end with a CFA expression there): no address has that rule.
        if u64::from_str_radix(f[0], 16).unwrap() >= fde_end {
            continue;
        }
        let get = |name: &str| columns.iter().position(|c| c == name).map(|i| f[i].to_string());
        let loc = u64::from_str_radix(f[0], 16).unwrap();
        // A row ends where the next row of its FDE starts.
        if rows.len() > fde_first_row {
            if let Some(prev) = rows.last_mut() {
                prev.end = loc;
            }
        }
        rows.push(Row {
            loc,
            end: fde_end,
            cfa: get("CFA").unwrap_or_default(),
            rbp: get("rbp").unwrap_or_else(|| "u".into()),
            ra: get("ra").unwrap_or_else(|| "u".into()),
        });
    }
    Some(rows)
}

/// Whether our rule means what readelf's row says, column by column in readelf's notation
/// (`rsp+8`, `c-16`, `u`). One documented equivalence inside pop runs: after `pop rbp` its
/// saved slot is still intact up to the return (ours `c-N`, readelf `u`). A push run keeps
/// each row's rbp exactly.
fn agrees(ours: &UnwindRule, r: &Row) -> Result<(), String> {
    let text = ours.to_string();
    let (cfa, rbp) = text.split_once(' ').ok_or_else(|| format!("{text:?} is not two columns"))?;
    let kind = ours.cfa_kind().ok_or_else(|| format!("corrupt rule {ours:?}"))?;
    if r.ra == "u" {
        return if kind == CfaKind::EndOfStack {
            Ok(())
        } else {
            Err(format!("ra undefined but ours {text}"))
        };
    }
    if r.ra != "c-8" {
        return if matches!(kind, CfaKind::Unsupported | CfaKind::Signal) {
            Ok(())
        } else {
            Err(format!("ra {} but ours {text}", r.ra))
        };
    }
    let cfa_ok = if r.cfa.starts_with("rsp") || r.cfa.starts_with("rbp") {
        cfa == r.cfa
    } else if r.cfa == "exp" {
        matches!(
            kind,
            CfaKind::Plt | CfaKind::DerefRsp | CfaKind::DerefRbp | CfaKind::Signal | CfaKind::Unsupported
        )
    } else {
        kind == CfaKind::Unsupported
    };
    if !cfa_ok {
        return Err(format!("CFA {} but ours {text}", r.cfa));
    }
    if matches!(kind, CfaKind::Signal | CfaKind::Unsupported) {
        return Ok(());
    }
    let rbp_ok = match (rbp, r.rbp.as_str()) {
        (ours, theirs) if ours.starts_with('c') => {
            ours == theirs
                // The pop-run equivalence (rsp-based CFA only).
                || (theirs == "u" && kind == CfaKind::Rsp)
        }
        ("u", theirs) => theirs == "u" || theirs == "s",
        ("undef", theirs) => theirs.strip_prefix('c').is_none_or(|v| v.parse::<i64>().is_err()),
        _ => false,
    };
    if !rbp_ok {
        return Err(format!("rbp {} but ours {text}", r.rbp));
    }
    Ok(())
}

fn check_file(path: &Path, max_rows: usize) -> Option<(usize, usize)> {
    let table = match UnwindTable::compile_file(path) {
        Ok(t) => t,
        Err(_) => return None, // not x86-64 ELF, no CFI: readelf has nothing to compare either
    };
    let rows = readelf_rows(path)?;
    if rows.is_empty() {
        return None;
    }
    let stride = rows.len().div_ceil(max_rows).max(1);
    let (mut checked, mut bad) = (0, 0);
    for r in rows.iter().step_by(stride) {
        checked += 1;
        let ours = table.lookup(r.loc).unwrap_or(UnwindRule::GAP);
        if let Err(e) = agrees(&ours, r) {
            bad += 1;
            if bad <= 3 {
                eprintln!("  {}: {:#x}: {e}", path.display(), r.loc);
            }
        }
    }
    Some((checked, bad))
}

fn candidates() -> Vec<PathBuf> {
    let mut files = Vec::new();
    for dir in ["/usr/lib/x86_64-linux-gnu", "/usr/bin"] {
        let Ok(rd) = std::fs::read_dir(dir) else { continue };
        for e in rd.flatten() {
            let p = e.path();
            let Ok(m) = std::fs::metadata(&p) else { continue };
            if !m.is_file() || m.len() < 4096 {
                continue;
            }
            let mut magic = [0u8; 4];
            if std::fs::File::open(&p).and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic)).is_ok()
                && magic == *b"\x7fELF"
            {
                files.push(p);
            }
        }
    }
    files.sort();
    files.dedup();
    files
}

#[test]
fn tables_agree_with_readelf() {
    let full = std::env::var_os("UNWOUND_FULL_SWEEP").is_some();
    let mut files = candidates();
    if !full {
        // A deterministic sample of small and mid-sized files, plus the libraries the
        // project cares about most.
        files.retain(|p| std::fs::metadata(p).map(|m| m.len() < 8 << 20).unwrap_or(false));
        let stride = (files.len() / 70).max(1);
        files = files.into_iter().step_by(stride).collect();
        for must in ["/usr/lib/x86_64-linux-gnu/libc.so.6", "/usr/lib/x86_64-linux-gnu/libstdc++.so.6"] {
            files.push(PathBuf::from(must));
        }
    }
    let max_rows = if full { usize::MAX } else { 3000 };
    let (mut nfiles, mut checked, mut bad) = (0, 0, 0);
    for f in &files {
        if let Some((c, b)) = check_file(f, max_rows) {
            nfiles += 1;
            checked += c;
            bad += b;
        }
    }
    eprintln!("{nfiles} files, {checked} rows checked, {bad} disagree");
    assert!(nfiles >= 50, "only {nfiles} comparable files");
    assert_eq!(bad, 0, "{bad} of {checked} rows disagree with readelf");
}

/// Instruction starts `objdump -d` lists in `path`, padding (`nop`, `int3`) left out: no
/// code reaches the padding after a jump or return, where a table may already give the
/// next row's rule.
fn instructions(path: &Path) -> Vec<u64> {
    let out = Command::new("objdump").arg("-d").arg(path).output().expect("objdump runs");
    assert!(out.status.success(), "objdump -d {}", path.display());
    let mut starts = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        // "  1040:\te8 7b 01 00 00       \tcall   11c0 <c_chain_a>"; a long encoding
        // continues on a line without the third field.
        let mut f = line.split('\t');
        let (Some(addr), Some(_bytes), Some(asm)) = (f.next(), f.next(), f.next()) else { continue };
        let Some(addr) = addr.trim().strip_suffix(':').and_then(|a| u64::from_str_radix(a, 16).ok()) else {
            continue;
        };
        let mnemonic = asm.split_whitespace().find(|w| !["cs", "ds", "data16", "rex.W"].contains(w));
        if mnemonic.is_some_and(|m| m.starts_with("nop") || m == "int3" || asm.starts_with("xchg   %ax,%ax"))
        {
            continue;
        }
        starts.push(addr);
    }
    starts
}

fn fixtures() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let st = Command::new("make").args(["-s", "-C"]).arg(root.join("fixtures")).status().unwrap();
    assert!(st.success(), "building the fixtures");
    let mut files: Vec<PathBuf> = std::fs::read_dir(root.join("target/fixtures"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| std::fs::read(p).is_ok_and(|b| b.starts_with(b"\x7fELF")))
        .collect();
    files.sort();
    files
}

#[test]
fn fixture_tables_agree_with_readelf_at_every_instruction() {
    let (mut nfiles, mut checked, mut bad) = (0, 0, 0);
    for path in fixtures() {
        let table = UnwindTable::compile_file(&path).unwrap();
        let rows = readelf_rows(&path).unwrap();
        let code = instructions(&path);
        assert!(!rows.is_empty() && !code.is_empty(), "{}: no rows or no code", path.display());
        nfiles += 1;
        for r in &rows {
            let from = code.partition_point(|&a| a < r.loc);
            for &pc in code[from..].iter().take_while(|&&a| a < r.end) {
                checked += 1;
                let ours = table.lookup(pc).unwrap_or(UnwindRule::GAP);
                if let Err(e) = agrees(&ours, r) {
                    bad += 1;
                    if bad <= 10 {
                        eprintln!("  {}: {pc:#x} (row at {:#x}): {e}", path.display(), r.loc);
                    }
                }
            }
        }
    }
    eprintln!("{nfiles} fixtures, {checked} instructions checked, {bad} disagree");
    assert!(nfiles >= 20 && checked >= 2000, "{nfiles} fixtures, {checked} instructions");
    assert_eq!(bad, 0, "{bad} of {checked} instructions disagree with readelf");
}
