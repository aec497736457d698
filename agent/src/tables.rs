//! `unwound tables FILE`: compile an ELF file's unwind tables; summary, JSON or dump.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context as _;
use serde_json::json;
use unwound_unwind_tables::UnwindTable;

#[derive(clap::Args, Debug)]
pub struct TablesArgs {
    /// The ELF file (executable, shared library, vDSO image).
    pub file: PathBuf,
    /// Print one JSON object: dwarf_rows, entries, bytes, unsupported (reason → count), ...
    #[arg(long, conflicts_with = "dump")]
    pub json: bool,
    /// Print one line per table row: `START END CFA RBP` (hex file virtual addresses; CFA
    /// and RBP in readelf's frames-interp notation, other rules named).
    #[arg(long)]
    pub dump: bool,
}

pub fn run(args: &TablesArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    let table = UnwindTable::compile_file(&args.file)
        .with_context(|| format!("cannot compile unwind tables of {}", args.file.display()))?;
    let elapsed = started.elapsed();
    let s = table.stats();
    let bytes = table.byte_size() as u64;
    let per_row = |v: f64| if s.dwarf_rows == 0 { 0.0 } else { v / s.dwarf_rows as f64 };
    let mut out = std::io::stdout().lock();
    if args.dump {
        for (start, end, rule) in table.rows() {
            if start == end {
                continue;
            }
            writeln!(out, "{start:x} {end:x} {rule}")?;
        }
        return Ok(());
    }
    if args.json {
        let unsupported: serde_json::Map<String, serde_json::Value> =
            s.unsupported.iter().map(|(reason, n)| (reason.name().to_string(), json!(n))).collect();
        let summary = json!({
            "file": args.file.display().to_string(),
            "dwarf_rows": s.dwarf_rows,
            "entries": s.entries,
            "padding_entries": s.padding_entries,
            "pages": table.pages().len(),
            "rules": table.rules().len(),
            "bytes": bytes,
            "bytes_per_dwarf_row": crate::rounded(per_row(bytes as f64), 4),
            "entries_per_dwarf_row": crate::rounded(per_row(s.entries as f64), 4),
            "unsupported": unsupported,
            "rbp_undefined": s.rbp_undefined,
            "compile_ms": crate::rounded(elapsed.as_secs_f64() * 1e3, 3),
        });
        writeln!(out, "{summary}")?;
        return Ok(());
    }
    let unsupported: u64 = s.unsupported.values().sum();
    writeln!(out, "{}", args.file.display())?;
    writeln!(out, "  DWARF rows       {}", s.dwarf_rows)?;
    writeln!(out, "  entries          {} ({:.3} per DWARF row)", s.entries, per_row(s.entries as f64))?;
    writeln!(
        out,
        "  bytes            {bytes} ({:.3} per DWARF row; {} pages, {} rules, {} padding entries)",
        per_row(bytes as f64),
        table.pages().len(),
        table.rules().len(),
        s.padding_entries
    )?;
    writeln!(out, "  unsupported      {unsupported}")?;
    for (k, v) in &s.unsupported {
        writeln!(out, "    {k:<16} {v}")?;
    }
    writeln!(out, "  compiled in      {:.1} ms", elapsed.as_secs_f64() * 1e3)?;
    Ok(())
}
