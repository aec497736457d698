//! `unwound tables FILE`: compile an ELF file's unwind tables; summary, JSON or dump.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context as _;
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
        let unsupported: Vec<String> = s.unsupported.iter().map(|(k, v)| format!("\"{k}\":{v}")).collect();
        writeln!(
            out,
            "{{\"file\":{:?},\"dwarf_rows\":{},\"entries\":{},\"padding_entries\":{},\"pages\":{},\"rules\":{},\"bytes\":{bytes},\"bytes_per_dwarf_row\":{:.4},\"entries_per_dwarf_row\":{:.4},\"unsupported\":{{{}}},\"rbp_undefined\":{},\"compile_ms\":{:.3}}}",
            args.file.display().to_string(),
            s.dwarf_rows,
            s.entries,
            s.padding_entries,
            table.pages().len(),
            table.rules().len(),
            per_row(bytes as f64),
            per_row(s.entries as f64),
            unsupported.join(","),
            s.rbp_undefined,
            elapsed.as_secs_f64() * 1e3,
        )?;
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
