//! `unwound`: the reference agent. A thin binary over the workspace's crates.

mod output;
mod privileges;
mod record;
mod sample_cost;
mod summary;
mod symbolize;
mod tables;
mod writer;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser, Debug)]
#[command(name = "unwound", version, about = "eBPF CPU profiler for native code")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Profile the machine (or chosen processes) on CPU and write a profile.
    Record(Box<RecordArgs>),
    /// Compile an ELF file's unwind tables and summarize or dump them.
    Tables(tables::TablesArgs),
    /// Turn addresses of an ELF file or a process into functions, source lines and inlined
    /// frames (DWARF, separate debuginfo, debuginfod; indexes cached zstd-compressed).
    Symbolize(symbolize::SymbolizeArgs),
    /// Measure the kernel time each `cpu-clock` sample costs, whichever profiler takes it
    /// (unwound, `perf record`, …): raw tracepoints around the sampling interrupt handler.
    SampleCost(sample_cost::SampleCostArgs),
}

/// Output formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// gzipped pprof protobuf (`go tool pprof`).
    Pprof,
    /// Folded stacks, one line per stack (`flamegraph.pl`, inferno, speedscope).
    Folded,
    /// SVG flame graph.
    Svg,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum WalkerKind {
    /// `bpf_loop` where the kernel accepts it (≥ 5.17), else tail calls.
    Auto,
    /// One program, its walk in `bpf_loop`.
    Loop,
    /// The walk continued by tail calls, 16 frames per program.
    TailCalls,
}

#[derive(clap::Args, Debug)]
pub struct RecordArgs {
    /// Profile only this process (repeatable). Default: every process.
    #[arg(short, long = "pid", value_name = "PID")]
    pub pids: Vec<u32>,
    /// How long to record, in seconds (fractions allowed). Ctrl-C (or SIGTERM) stops
    /// early and still writes the profile. Default: 10, or until stopped with `--every`.
    #[arg(short, long, value_name = "SECONDS")]
    pub duration: Option<f64>,
    /// Continuous profiling: write a profile every SECONDS (at least 1), each holding the
    /// samples of its own interval, until `--duration` ends or the agent is stopped. Each
    /// file is named after `--output` with its interval's start (UTC) before the
    /// extension: `-o cpu.pb.gz --every 60` writes `cpu-20261202T065000Z.pb.gz`, …
    #[arg(long, value_name = "SECONDS", value_parser = interval_seconds)]
    pub every: Option<f64>,
    /// With `--every`: keep only the N newest profiles this run wrote, deleting older ones.
    #[arg(long, value_name = "N", requires = "every", value_parser = clap::value_parser!(u64).range(1..))]
    pub keep: Option<u64>,
    /// Samples per second on each CPU.
    #[arg(short = 'F', long, default_value_t = 99, value_name = "HZ")]
    pub frequency: u64,
    /// Where to write the profile.
    #[arg(short, long, value_name = "PATH")]
    pub output: PathBuf,
    /// Output format; by default taken from the output's extension
    /// (`.pb.gz`/`.pprof` → pprof, `.folded`/`.txt` → folded, `.svg` → svg).
    #[arg(short, long)]
    pub format: Option<Format>,
    /// Most user frames to walk per sample (1 to 512).
    #[arg(long, default_value_t = 512, value_name = "N")]
    pub max_frames: u32,
    /// Walk with frame pointers only: no unwind tables are compiled or loaded.
    #[arg(long)]
    pub no_tables: bool,
    /// How the walker's loop runs: `bpf_loop` (kernels ≥ 5.17), a chain of tail calls
    /// (older kernels), or `auto`: `bpf_loop` when the kernel accepts it.
    #[arg(long, value_enum, default_value_t = WalkerKind::Auto)]
    pub walker: WalkerKind,
    /// Where compiled unwind tables are cached, by build-id (zstd). Default:
    /// `$XDG_CACHE_HOME/unwound/tables`.
    #[arg(long, value_name = "DIR")]
    pub table_cache_dir: Option<PathBuf>,
    /// Compile every table afresh and store none.
    #[arg(long, conflicts_with = "table_cache_dir")]
    pub no_table_cache: bool,
    /// Most memory, in MiB (fractions allowed), of the walker's table maps. When tables do
    /// not fit, those least recently sampled are evicted (exited processes' first) and
    /// counted; a process that lost a table gets it back when it is sampled again.
    #[arg(long, default_value_t = 256.0, value_name = "MIB", value_parser = positive_mib)]
    pub table_memory: f64,
    /// Measure the BPF program's own run time (kernel BPF statistics) and report the
    /// mean cost per sample. Adds a clock read or two per sample while on.
    #[arg(long)]
    pub bpf_stats: bool,
    /// Print the summary as one JSON object on stdout as well.
    #[arg(long)]
    pub json_summary: bool,
    /// Where compiled debuginfo indexes are cached (zstd). Default:
    /// `$XDG_CACHE_HOME/unwound/symbols`.
    #[arg(long, value_name = "DIR")]
    pub symbol_cache_dir: Option<PathBuf>,
    /// Keep debuginfo indexes in memory only.
    #[arg(long, conflicts_with = "symbol_cache_dir")]
    pub no_symbol_cache: bool,
    /// Memory budget for decompressed debuginfo, in MiB.
    #[arg(long, default_value_t = 16, value_name = "MIB")]
    pub symbol_memory: u64,
    /// Extra directory searched for separate debug files (repeatable; /usr/lib/debug is
    /// always searched). debuginfod servers come from `DEBUGINFOD_URLS`.
    #[arg(long = "debug-dir", value_name = "DIR")]
    pub debug_dirs: Vec<PathBuf>,
    /// A command to run and profile, after `--`: its process and threads are sampled (not
    /// processes it starts), until it exits or `--duration` ends; unwound then exits with
    /// the command's status.
    #[arg(last = true, value_name = "COMMAND", conflicts_with = "pids")]
    pub command: Vec<std::ffi::OsString>,
    #[command(flatten, next_help_heading = "Labels and export")]
    pub export: writer::ExportArgs,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Record(args) => record::run(&args),
        Command::Tables(args) => tables::run(&args).map(|()| 0),
        Command::Symbolize(args) => symbolize::run(&args).map(|()| 0),
        Command::SampleCost(args) => sample_cost::run(&args).map(|()| 0),
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("{}", error_line(&e));
            ExitCode::FAILURE
        }
    }
}

/// An error and its causes on one line: `error: what: why: …`.
pub(crate) fn error_line(e: &anyhow::Error) -> String {
    let chain: Vec<String> = e.chain().map(|c| c.to_string()).collect();
    format!("error: {}", chain.join(": "))
}

/// `v` rounded to `decimals` decimal places, for JSON output that keeps the precision a
/// measurement has rather than every digit of an `f64`.
pub(crate) fn rounded(v: f64, decimals: i32) -> f64 {
    let scale = 10f64.powi(decimals);
    (v * scale).round() / scale
}

/// A finite number above zero, or an error naming `unit`.
fn positive(s: &str, unit: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 => Ok(v),
        _ => Err(format!("expected a positive number of {unit}, got {s:?}")),
    }
}

/// A profile interval: at least a second (files are named to the second), at most a year.
fn interval_seconds(s: &str) -> Result<f64, String> {
    positive_seconds(s).and_then(|v| {
        if v >= 1.0 {
            Ok(v)
        } else {
            Err(format!("expected at least 1 second, got {s:?}"))
        }
    })
}

/// A size in MiB that is a positive number.
fn positive_mib(s: &str) -> Result<f64, String> {
    positive(s, "MiB")
}

/// A duration in seconds that is a positive number, at most a year (longer ones overflow
/// the clock's arithmetic).
fn positive_seconds(s: &str) -> Result<f64, String> {
    const YEAR: f64 = 365.0 * 86400.0;
    positive(s, "seconds").and_then(|v| {
        if v <= YEAR {
            Ok(v)
        } else {
            Err(format!("expected at most a year ({YEAR} seconds), got {s:?}"))
        }
    })
}
