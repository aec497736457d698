//! The compiled tables agree with binutils' `readelf --debug-dump=frames-interp` on system
//! ELF files: at the start address of every row (or a sample of them) the CFA rule, the
//! return-address rule and the rbp rule are the ones readelf prints.
//!
//! CI checks a deterministic sample of ≥ 50 files from /usr/lib/x86_64-linux-gnu and
//! /usr/bin. The full sweep: `UNWOUND_FULL_SWEEP=1 cargo test --release -p
//! unwound-unwind-tables --test readelf -- --nocapture`.

use std::path::{Path, PathBuf};
use std::process::Command;

use unwound_unwind_tables::layout::{CfaKind, RbpKind, UnwindRule};
use unwound_unwind_tables::UnwindTable;

#[derive(Debug)]
struct Row {
    loc: u64,
    cfa: String,
    rbp: String,
    ra: String,
}

/// Rows of every FDE readelf prints for `.eh_frame`.
fn readelf_rows(path: &Path) -> Option<Vec<Row>> {
    let out = Command::new("readelf").arg("--debug-dump=frames-interp").arg(path).output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut rows = Vec::new();
    let mut columns: Vec<String> = Vec::new();
    let mut in_eh_frame = false;
    let mut skip = false;
    let mut fde_end = 0u64;
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
        rows.push(Row {
            loc: u64::from_str_radix(f[0], 16).unwrap(),
            cfa: get("CFA").unwrap_or_default(),
            rbp: get("rbp").unwrap_or_else(|| "u".into()),
            ra: get("ra").unwrap_or_else(|| "u".into()),
        });
    }
    Some(rows)
}

/// Whether our rule means what readelf's row says. Two documented equivalences inside
/// push/pop runs: during pushes rbp still holds the caller's value (ours "unchanged",
/// readelf "c-N"), and after `pop rbp` its saved slot is still intact (ours "c-N", readelf
/// "u").
fn agrees(ours: &UnwindRule, r: &Row) -> Result<(), String> {
    let kind = ours.cfa_kind().unwrap();
    if r.ra == "u" {
        return if kind == CfaKind::EndOfStack {
            Ok(())
        } else {
            Err(format!("ra undefined but ours {ours:?}"))
        };
    }
    if r.ra != "c-8" {
        return if kind == CfaKind::Unsupported || kind == CfaKind::Signal {
            Ok(())
        } else {
            Err(format!("ra {} but ours {ours:?}", r.ra))
        };
    }
    let cfa_ok = match r.cfa.split_once('+') {
        Some(("rsp", off)) => {
            kind == CfaKind::Rsp && off.parse::<i64>().ok() == Some(i64::from(ours.cfa_offset))
        }
        Some(("rbp", off)) => {
            kind == CfaKind::Rbp && off.parse::<i64>().ok() == Some(i64::from(ours.cfa_offset))
        }
        _ if r.cfa == "exp" => matches!(
            kind,
            CfaKind::Plt | CfaKind::DerefRsp | CfaKind::DerefRbp | CfaKind::Signal | CfaKind::Unsupported
        ),
        _ => kind == CfaKind::Unsupported,
    };
    if !cfa_ok {
        return Err(format!("CFA {} but ours {ours:?}", r.cfa));
    }
    if matches!(kind, CfaKind::Signal | CfaKind::Unsupported) {
        return Ok(());
    }
    let theirs_slot = r.rbp.strip_prefix('c').and_then(|v| v.parse::<i64>().ok());
    let rbp_ok = match (ours.rbp, theirs_slot, r.rbp.as_str()) {
        (x, Some(off), _) if x == RbpKind::AtCfa as u8 => ours.rbp_offset() == off,
        (x, None, "u" | "s") if x == RbpKind::Unchanged as u8 => true,
        // The pop-run equivalence (rsp-based CFA only): after `pop rbp` the saved slot still
        // holds the caller's rbp up to the return. A push run keeps each row's rbp exactly.
        (x, None, "u") if x == RbpKind::AtCfa as u8 && kind == CfaKind::Rsp => true,
        (x, None, _) if x == RbpKind::Undefined as u8 => true,
        _ => false,
    };
    if !rbp_ok {
        return Err(format!("rbp {} but ours {ours:?}", r.rbp));
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
