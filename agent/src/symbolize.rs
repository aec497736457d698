//! `unwound symbolize`: addresses of an ELF file or a process to functions, files, lines
//! and inlined frames.

use std::io::{BufRead, Write};
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::ValueEnum;
use unwound_symbolize::{addr2line_text, Frame, Miss, Options, Resolution, Symbolizer};

/// Output formats of `unwound symbolize`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum SymFormat {
    /// Exactly what binutils `addr2line -f -i -C` prints (with `-a`, `addr2line -a -f -i -C`).
    Addr2line,
    /// One JSON object per address, one per line.
    Json,
    /// `ADDR function file:line`, inlined frames indented below.
    Text,
}

#[derive(clap::Args, Debug)]
#[command(group(clap::ArgGroup::new("source").required(true).args(["elf", "pid"])))]
pub struct SymbolizeArgs {
    /// An ELF file; addresses are the file's own virtual addresses.
    #[arg(short, long, value_name = "FILE")]
    pub elf: Option<PathBuf>,
    /// A running process; addresses are absolute addresses in it.
    #[arg(short, long, value_name = "PID")]
    pub pid: Option<u32>,
    /// Addresses, hex (with or without 0x). None: read them from stdin, one per line.
    #[arg(value_name = "ADDR")]
    pub addrs: Vec<String>,
    /// Output format.
    #[arg(short, long, value_enum, default_value_t = SymFormat::Text)]
    pub format: SymFormat,
    /// Print each address before its frames (as `addr2line -a`).
    #[arg(short = 'a', long)]
    pub addresses: bool,
    /// Shorthand for `--format json`.
    #[arg(long, conflicts_with = "format")]
    pub json: bool,
    /// Where compiled debuginfo indexes are cached. Default: `$XDG_CACHE_HOME/unwound/symbols`.
    #[arg(long, value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Keep indexes in memory only.
    #[arg(long, conflicts_with = "cache_dir")]
    pub no_cache: bool,
    /// Memory budget for decompressed debuginfo, in MiB.
    #[arg(long, default_value_t = 512, value_name = "MIB")]
    pub memory_budget: u64,
    /// Extra directory searched for separate debug files (repeatable; /usr/lib/debug is
    /// always searched).
    #[arg(long = "debug-dir", value_name = "DIR")]
    pub debug_dirs: Vec<PathBuf>,
}

pub fn parse_addr(s: &str) -> Result<u64> {
    let t = s.trim();
    let h = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")).unwrap_or(t);
    u64::from_str_radix(h, 16).with_context(|| format!("bad address {t:?}: expected hex"))
}

pub fn options(
    cache_dir: Option<PathBuf>,
    no_cache: bool,
    budget_mib: u64,
    debug_dirs: &[PathBuf],
) -> Options {
    // A command-line tool: indexes cached for the user, debuginfod from DEBUGINFOD_URLS.
    let mut o = Options::from_env();
    if no_cache {
        o.cache_dir = None;
    } else if let Some(d) = cache_dir {
        o.cache_dir = Some(d);
    }
    o.memory_budget = usize::try_from(budget_mib.saturating_mul(1 << 20)).unwrap_or(usize::MAX);
    o.debug_dirs.extend(debug_dirs.iter().cloned());
    o
}

pub fn run(args: &SymbolizeArgs) -> Result<()> {
    let mut texts = args.addrs.clone();
    if texts.is_empty() {
        for line in std::io::stdin().lock().lines() {
            let line = line.context("reading addresses from stdin")?;
            if !line.trim().is_empty() {
                texts.push(line);
            }
        }
    }
    let addrs = texts.iter().map(|t| parse_addr(t)).collect::<Result<Vec<u64>>>()?;
    let s =
        Symbolizer::new(options(args.cache_dir.clone(), args.no_cache, args.memory_budget, &args.debug_dirs));
    let results = match (&args.elf, args.pid) {
        (Some(elf), None) => s.symbolize_elf(elf, &addrs)?,
        (None, Some(pid)) => s.symbolize_pid(pid, &addrs)?,
        _ => bail!("give exactly one of --elf and --pid"),
    };
    let format = if args.json { SymFormat::Json } else { args.format };
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    for (addr, r) in addrs.iter().zip(&results) {
        match format {
            SymFormat::Addr2line => out.write_all(addr2line_text(*addr, r, args.addresses).as_bytes())?,
            SymFormat::Json => writeln!(out, "{}", json(*addr, r))?,
            SymFormat::Text => write_text(&mut out, *addr, r)?,
        }
    }
    out.flush()?;
    Ok(())
}

fn frame_json(f: &Frame) -> serde_json::Value {
    serde_json::json!({
        "function": f.function.as_deref(),
        "file": f.file.as_deref(),
        "line": f.line,
        "discriminator": f.discriminator,
    })
}

fn json(addr: u64, r: &Resolution) -> String {
    let v = match r {
        Ok(sym) => serde_json::json!({
            "address": format!("0x{addr:x}"),
            "frames": sym.frames.iter().map(frame_json).collect::<Vec<_>>(),
        }),
        Err(miss) => serde_json::json!({
            "address": format!("0x{addr:x}"),
            "frames": [],
            "miss": miss_name(miss),
            "reason": miss.to_string(),
        }),
    };
    v.to_string()
}

pub fn miss_name(m: &Miss) -> &'static str {
    match m {
        Miss::NotMapped => "not_mapped",
        Miss::Anonymous => "anonymous",
        Miss::OutsideSegments => "outside_segments",
        Miss::Unreadable(_) | Miss::NotAFile { .. } | Miss::Replaced { .. } => "unreadable",
        Miss::NoSymbol => "no_symbol",
        _ => "other",
    }
}

fn write_text(out: &mut impl Write, addr: u64, r: &Resolution) -> std::io::Result<()> {
    match r {
        Ok(sym) => {
            for (i, f) in sym.frames.iter().enumerate() {
                let lead = if i == 0 { format!("{addr:#x}") } else { "  (inlined by)".to_string() };
                write!(out, "{lead} {}", f.function.as_deref().unwrap_or("??"))?;
                if let Some(file) = &f.file {
                    write!(out, " {file}:{}", f.line)?;
                }
                writeln!(out)?;
            }
            Ok(())
        }
        Err(miss) => writeln!(out, "{addr:#x} ?? ({miss})"),
    }
}
