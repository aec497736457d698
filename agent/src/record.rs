//! `unwound record`: load the walker, sample, aggregate, symbolize, write.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context as _};
use unwound_stackwalk::{Counter, Notice, TableOptions, TableStats, Walker, WalkerBuilder};
use unwound_stackwalk_abi::{MAX_PIDS, MAX_USER_FRAMES};
use unwound_symbolize::KernelSymbols;

use crate::output::{self, ProfileMeta};
use crate::profile::Collector;
use crate::WalkerKind;
use crate::{Format, RecordArgs};

const POLL_INTERVAL_MS: i32 = 100;

/// Records as `args` say; the exit status is 0, or the profiled command's.
pub fn run(args: &RecordArgs) -> anyhow::Result<u8> {
    let format = resolve_format(&args.output, args.format)?;
    check_args(args)?;
    // Before any progress line: a user without the privileges or the kernel gets one line.
    unwound_stackwalk::check_privileges()?;
    unwound_stackwalk::check_kernel(
        &unwound_stackwalk::kernel_release(),
        Path::new("/sys/kernel/btf/vmlinux").exists(),
    )?;
    let cpu_before = cpu_time();
    let stats_guard = if args.bpf_stats { Some(unwound_stackwalk::enable_bpf_stats()?) } else { None };
    let mut session = start_walker(args)?;
    // The command starts once the walker is attached, so its first samples are taken.
    let mut command = match args.command.split_first() {
        Some((program, rest)) => {
            let child = std::process::Command::new(program)
                .args(rest)
                .spawn()
                .with_context(|| format!("cannot run {}", program.to_string_lossy()))?;
            session.follow(child.id())?;
            Some(child)
        }
        None => None,
    };
    let cpu_started = cpu_time();
    // The recording window starts once the walker is attached: compiling tables and
    // verifying the programs do not eat into --duration.
    let started = Instant::now();
    let started_wall = SystemTime::now();
    let cpus = session.cpus();
    let duration = record_duration(args);
    let every = args.every.map(Duration::from_secs_f64);
    let targets = match (&command, args.command.first()) {
        (Some(c), Some(program)) => format!("{} (pid {})", program.to_string_lossy(), c.id()),
        _ => describe_targets(&args.pids),
    };
    eprintln!(
        "unwound: sampling {targets} at {} Hz on {cpus} CPUs {}{} (Ctrl-C stops{})",
        args.frequency,
        duration.map_or(
            if command.is_some() { "until it exits" } else { "until stopped" }.to_string(),
            |d| format!("for {:.1} s", d.as_secs_f64())
        ),
        every.map_or(String::new(), |e| format!(", a profile every {:.0} s", e.as_secs_f64())),
        if every.is_some() { "" } else { " early" },
    );
    let stop = stop_on_signals()?;
    let mut collector = Collector::new();
    let mut writer = ProfileWriter::new(args, format);
    let deadline = duration.map(|d| started + d);
    let mut ended_early = None;
    let mut exit_status = None;
    let mut last_refresh = Instant::now();
    // The current profile's start. With --every, profiles start on a fixed grid from the
    // recording's start, whatever each write took.
    let mut interval = (started, started_wall);
    while deadline.is_none_or(|d| Instant::now() < d) && !stop.load(Ordering::Relaxed) {
        // Woken at the next interval's end or the deadline, whichever is first.
        let wake = [deadline, every.map(|e| interval.0 + e)].into_iter().flatten().min();
        let wait = wake.map_or(POLL_INTERVAL_MS, |w| {
            w.saturating_duration_since(Instant::now()).as_millis().clamp(1, POLL_INTERVAL_MS as u128) as i32
        });
        drain(&mut session, &mut collector, wait)?;
        if last_refresh.elapsed() >= Duration::from_secs(1) {
            session.prune_exited();
            last_refresh = Instant::now();
        }
        if !args.pids.is_empty() && args.pids.iter().all(|&p| !process_alive(p)) {
            ended_early = Some("every selected process exited");
            break;
        }
        if let Some(c) = command.as_mut() {
            if let Ok(Some(status)) = c.try_wait() {
                exit_status = Some(status);
                ended_early = Some("the command exited");
                break;
            }
        }
        if let Some(e) = every.filter(|&e| Instant::now() >= interval.0 + e) {
            // Samples taken meanwhile wait in the ring buffer for the next profile.
            writer.write_interval(&collector, &args.output, e, interval.1);
            collector.end_interval();
            interval = (interval.0 + e, interval.1 + e);
        }
    }
    if stop.load(Ordering::Relaxed) {
        ended_early = Some("interrupted");
    }
    let ended = Instant::now();
    let recorded = ended - started;
    let cpu_recorded = cpu_time();
    session.detach();
    drain(&mut session, &mut collector, 0)?;
    let counters = session.counters()?;
    let bpf_run = session.run_stats();
    drop(stats_guard);

    if every.is_some() {
        // Like every other interval's: the run's summary is printed even if it failed.
        writer.write_interval(&collector, &args.output, ended - interval.0, interval.1);
    } else {
        writer.write(&collector, &args.output, ended - interval.0, interval.1)?;
    }

    let cpu_end = cpu_time();
    let cpu = cpu_end.saturating_sub(cpu_before);
    let cpu_phases = [
        cpu_started.saturating_sub(cpu_before),
        cpu_recorded.saturating_sub(cpu_started),
        cpu_end.saturating_sub(cpu_recorded),
    ];
    let summary = Summary {
        counters,
        received: collector.samples,
        malformed: collector.malformed,
        stacks: writer.stacks,
        profiles: writer.written.clone(),
        profiles_written: writer.count,
        profiles_failed: writer.failed,
        seconds: recorded.as_secs_f64(),
        cpus,
        ring_bytes: session.ring_bytes(),
        agent_cpu: cpu,
        cpu_phases,
        walker_programs: session.programs().walker.clone(),
        symbol_errors: collector.symbol_errors(),
        execs: collector.execs,
        event_programs: session.programs().events.clone(),
        exits: collector.exits,
        symbolize_time: writer.symbolize_time,
        symbol_stats: writer.symbolizer.stats(),
        bpf_run,
        tables: session.table_stats().cloned(),
        tables_off: session.tables_refused_by_kernel(),
        kernel: unwound_stackwalk::kernel_release(),
    };
    summary.print(ended_early);
    if args.json_summary {
        println!("{}", summary.json());
    }
    if writer.failed > 0 {
        bail!("{} of {} profiles could not be written", writer.failed, writer.failed + writer.count);
    }
    if let (Some(c), None) = (&command, exit_status) {
        eprintln!("unwound: the command (pid {}) is still running", c.id());
    }
    Ok(exit_status.map_or(0, exit_code))
}

/// A child's status as a shell reports it: its exit code, or 128 + the signal that ended it.
fn exit_code(status: std::process::ExitStatus) -> u8 {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(c), _) => c as u8,
        (None, Some(sig)) => (128 + sig) as u8,
        (None, None) => 1,
    }
}

/// How long to record: `--duration`, else 10 s, or until stopped with `--every`, or until
/// the command exits.
fn record_duration(args: &RecordArgs) -> Option<Duration> {
    match args.duration {
        Some(d) => Some(Duration::from_secs_f64(d)),
        None if args.every.is_some() || !args.command.is_empty() => None,
        None => Some(Duration::from_secs(10)),
    }
}

/// Symbolizes what a collector holds and writes it as one profile; the symbolizer (and
/// its decompressed debuginfo) is kept from one profile to the next.
struct ProfileWriter {
    format: Format,
    symbolizer: unwound_symbolize::Symbolizer,
    kernel_cache: Option<PathBuf>,
    keep: Option<usize>,
    /// Profiles written, oldest first (those deleted by `--keep` left out), and how many
    /// were written in all.
    written: Vec<PathBuf>,
    count: u64,
    /// Profiles that could not be written.
    failed: u64,
    /// Stacks over every profile written.
    stacks: usize,
    symbolize_time: Duration,
    frequency: u64,
}

impl ProfileWriter {
    fn new(args: &RecordArgs, format: Format) -> Self {
        let options = crate::symbolize::options(
            args.symbol_cache_dir.clone(),
            args.no_symbol_cache,
            args.symbol_memory,
            &args.debug_dirs,
        );
        ProfileWriter {
            format,
            kernel_cache: options.cache_dir.clone(),
            symbolizer: unwound_symbolize::Symbolizer::new(options),
            keep: args.keep.map(|k| usize::try_from(k).unwrap_or(usize::MAX)),
            written: Vec::new(),
            count: 0,
            failed: 0,
            stacks: 0,
            symbolize_time: Duration::ZERO,
            frequency: args.frequency,
        }
    }

    /// Writes one interval's profile, named after `output` and `start`; a profile that
    /// cannot be written is reported and counted, and recording goes on.
    fn write_interval(&mut self, collector: &Collector, output: &Path, length: Duration, start: SystemTime) {
        let path = interval_path(output, start);
        if let Err(err) = self.write(collector, &path, length, start) {
            eprintln!("{}", crate::error_line(&err));
            self.failed += 1;
        }
    }

    /// Writes `collector`'s stacks to `path`: a profile of `length` from `start`.
    fn write(
        &mut self,
        collector: &Collector,
        path: &Path,
        length: Duration,
        start: SystemTime,
    ) -> anyhow::Result<()> {
        let kernel = if collector.has_kernel_frames() {
            // Cached beside the debuginfo indexes (per boot and module set); only the
            // blocks holding these addresses are read.
            let loaded = match &self.kernel_cache {
                Some(dir) => KernelSymbols::load_cached(dir, &collector.kernel_addresses()),
                None => KernelSymbols::load(),
            };
            loaded.unwrap_or_else(|e| {
                eprintln!("warning: kernel frames stay unsymbolized: {e}");
                KernelSymbols::default()
            })
        } else {
            KernelSymbols::default()
        };
        let symbolize_started = Instant::now();
        let stacks = collector.symbolize(&kernel, &self.symbolizer);
        self.symbolize_time += symbolize_started.elapsed();
        let meta = ProfileMeta {
            frequency: self.frequency,
            duration_ns: length.as_nanos() as u64,
            start_unix_ns: start.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as i64),
        };
        write_atomically(path, |out| match self.format {
            Format::Folded => output::write_folded(out, &stacks),
            Format::Svg => output::write_svg(out, &stacks, &meta),
            Format::Pprof => output::write_pprof(out, &stacks, &meta),
        })?;
        self.stacks += stacks.len();
        self.written.push(path.to_path_buf());
        self.count += 1;
        if let Some(keep) = self.keep {
            while self.written.len() > keep {
                let old = self.written.remove(0);
                if let Err(e) = std::fs::remove_file(&old) {
                    if e.kind() != std::io::ErrorKind::NotFound {
                        eprintln!("warning: cannot delete old profile {}: {e}", old.display());
                    }
                }
            }
        }
        Ok(())
    }
}

/// `output` with the interval's start time (UTC, to the second) before its extension:
/// `dir/cpu.pb.gz` → `dir/cpu-20261202T065000Z.pb.gz`; a name taken already gets `-2`, `-3`…
fn interval_path(output: &Path, start: SystemTime) -> PathBuf {
    let name = output.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    // The extension starts at the first dot that does not start the name (`.pb.gz`).
    let (stem, ext) = match name.char_indices().skip(1).find(|&(_, c)| c == '.') {
        Some((i, _)) => name.split_at(i),
        None => (name.as_str(), ""),
    };
    let secs = start.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let stamp = utc_stamp(secs);
    let dir = output_dir(output);
    let mut path = dir.join(format!("{stem}-{stamp}{ext}"));
    let mut n = 2;
    while path.exists() {
        path = dir.join(format!("{stem}-{stamp}-{n}{ext}"));
        n += 1;
    }
    path
}

/// `YYYYMMDDTHHMMSSZ` for seconds since the Unix epoch (proleptic Gregorian calendar).
fn utc_stamp(secs: u64) -> String {
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Days to a civil date, counting in 400-year eras of 146,097 days from 0000-03-01.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}{month:02}{day:02}T{:02}{:02}{:02}Z", rem / 3600, rem / 60 % 60, rem % 60)
}

/// False once the process is gone or a zombie (exited, not yet reaped by its parent).
fn process_alive(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return false };
    // The state follows the parenthesised command name, which may itself hold ')'.
    let state = stat.rsplit_once(')').and_then(|(_, rest)| rest.trim_start().chars().next());
    !matches!(state, Some('Z' | 'X') | None)
}

fn describe_targets(pids: &[u32]) -> String {
    match pids {
        [] => "every process".to_string(),
        [p] => format!("pid {p}"),
        ps => format!("{} processes", ps.len()),
    }
}

fn resolve_format(output: &Path, format: Option<Format>) -> anyhow::Result<Format> {
    if let Some(f) = format {
        return Ok(f);
    }
    let name = output.file_name().map(|n| n.to_string_lossy().to_lowercase()).unwrap_or_default();
    if name.ends_with(".pb.gz") || name.ends_with(".pprof") || name.ends_with(".pb") {
        Ok(Format::Pprof)
    } else if name.ends_with(".folded") || name.ends_with(".txt") || name.ends_with(".collapsed") {
        Ok(Format::Folded)
    } else if name.ends_with(".svg") {
        Ok(Format::Svg)
    } else {
        bail!(
            "cannot tell the output format from '{}': name it .pb.gz, .folded or .svg, or pass --format pprof|folded|svg",
            output.display()
        )
    }
}

fn check_args(args: &RecordArgs) -> anyhow::Result<()> {
    if let Some(d) = args.duration {
        if !(d.is_finite() && d > 0.0 && d <= 365.0 * 86400.0) {
            bail!("--duration must be a positive number of seconds, at most a year, got {d}");
        }
    }
    let max_rate = std::fs::read_to_string("/proc/sys/kernel/perf_event_max_sample_rate")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(100_000);
    if args.frequency == 0 || args.frequency > max_rate {
        bail!(
            "--frequency must be between 1 and {max_rate} Hz (kernel.perf_event_max_sample_rate), got {}",
            args.frequency
        );
    }
    if args.max_frames == 0 || args.max_frames as usize > MAX_USER_FRAMES {
        bail!("--max-frames must be between 1 and {MAX_USER_FRAMES}, got {}", args.max_frames);
    }
    if args.pids.len() > MAX_PIDS as usize {
        bail!("at most {MAX_PIDS} --pid options are supported, got {}", args.pids.len());
    }
    for pid in &args.pids {
        if *pid == 0 || !Path::new(&format!("/proc/{pid}")).exists() {
            bail!("no process with pid {pid} (check `ps -p {pid}`)");
        }
    }
    let dir = output_dir(&args.output);
    if !dir.is_dir() {
        bail!("cannot write {}: directory {} does not exist", args.output.display(), dir.display());
    }
    if args.output.is_dir() {
        bail!("cannot write {}: it is a directory", args.output.display());
    }
    Ok(())
}

fn output_dir(output: &Path) -> PathBuf {
    match output.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Compiles the start-up tables, loads and attaches the walker as `args` say, and prints
/// what it chose.
fn start_walker(args: &RecordArgs) -> anyhow::Result<Walker> {
    let mut builder = WalkerBuilder::new()
        .frequency(args.frequency)
        .max_frames(args.max_frames)
        .walker(match args.walker {
            WalkerKind::Auto => unwound_stackwalk::WalkerKind::Auto,
            WalkerKind::Loop => unwound_stackwalk::WalkerKind::Loop,
            WalkerKind::TailCalls => unwound_stackwalk::WalkerKind::TailCalls,
        })
        .tables((!args.no_tables).then(|| TableOptions {
            memory_bytes: (args.table_memory * (1u64 << 20) as f64) as u64,
            cache_dir: if args.no_table_cache {
                None
            } else {
                args.table_cache_dir
                    .clone()
                    .or_else(|| unwound_symbolize::default_cache_dir().map(|d| d.join("tables")))
            },
        }));
    for &pid in &args.pids {
        builder = builder.pid(pid);
    }
    if !args.command.is_empty() {
        builder = builder.follow_later(1);
    }
    if !args.no_tables {
        eprintln!("unwound: compiling unwind tables and loading the walker…");
    }
    let mut walker = builder.start()?;
    if !args.no_tables {
        eprintln!("unwound: unwind tables ready in {:.2} s", walker.table_setup_time().as_secs_f64());
    }
    print_notices(&mut walker);
    Ok(walker)
}

/// One line per notice from the walker.
fn print_notices(walker: &mut Walker) {
    for n in walker.take_notices() {
        match n {
            Notice::TailCalls(_) => eprintln!("unwound: {n}"),
            _ => eprintln!("warning: {n}"),
        }
    }
}

/// Waits up to `timeout_ms` for the walker's records, then counts all there are.
fn drain(walker: &mut Walker, collector: &mut Collector, timeout_ms: i32) -> anyhow::Result<()> {
    walker.drain(Duration::from_millis(timeout_ms.max(0) as u64), |event| collector.add(&event))?;
    print_notices(walker);
    Ok(())
}

/// A flag that SIGINT or SIGTERM sets (Ctrl-C stops early; the work so far is kept).
pub(crate) fn stop_on_signals() -> anyhow::Result<Arc<AtomicBool>> {
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, Arc::clone(&stop)).context("cannot install signal handler")?;
    }
    Ok(stop)
}

fn max_rss_kib() -> u64 {
    unwound_stackwalk::usage::own().max_rss_kib
}

/// User + system CPU time of this process.
fn cpu_time() -> Duration {
    unwound_stackwalk::usage::own().cpu
}

/// Writes to a temporary file beside `path` and renames it into place, so a failure never
/// leaves a half-written profile.
fn write_atomically(
    path: &Path,
    write: impl FnOnce(&mut dyn Write) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let dir = output_dir(path);
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{name}.unwound-{}.tmp", std::process::id()));
    let result = (|| {
        let file = File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
        let mut out = BufWriter::new(file);
        write(&mut out)?;
        let file = out.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

struct Summary {
    counters: Vec<(Counter, u64)>,
    received: u64,
    malformed: u64,
    /// Stacks over every profile written.
    stacks: usize,
    /// Profiles written and kept, oldest first; profiles that could not be written.
    profiles: Vec<PathBuf>,
    profiles_written: u64,
    profiles_failed: u64,
    seconds: f64,
    cpus: usize,
    ring_bytes: u32,
    agent_cpu: Duration,
    /// The agent's CPU before sampling (tables, BPF load and verification), while
    /// sampling, and after (symbolization, the profile).
    cpu_phases: [Duration; 3],
    walker_programs: Vec<(&'static str, Option<u32>)>,
    symbol_errors: u64,
    execs: u64,
    exits: u64,
    event_programs: Vec<(&'static str, Option<u32>)>,
    symbolize_time: Duration,
    symbol_stats: unwound_symbolize::Stats,
    bpf_run: Option<(u64, u64)>,
    tables: Option<TableStats>,
    /// Whether the table walker is off although tables were asked for (the kernel refused
    /// the segments probed at load).
    tables_off: bool,
    /// The running kernel's release (`uname -r`).
    kernel: String,
}

impl Summary {
    fn get(&self, c: Counter) -> u64 {
        self.counters.iter().find(|(k, _)| *k == c).map_or(0, |(_, v)| *v)
    }

    fn print(&self, ended_early: Option<&str>) {
        let fired = self.get(Counter::Samples);
        let mut dropped: Vec<String> = self
            .counters
            .iter()
            .filter(|(c, v)| c.is_drop() && *v > 0)
            .map(|(c, v)| format!("{}={v}", c.name()))
            .collect();
        if self.malformed > 0 {
            dropped.push(format!("malformed_record={}", self.malformed));
        }
        let dropped = if dropped.is_empty() { "none".to_string() } else { dropped.join(" ") };
        if let Some(why) = ended_early {
            eprintln!("unwound: stopped after {:.1} s: {why}", self.seconds);
        }
        let wrote = match self.profiles.as_slice() {
            [one] if self.profiles_written == 1 => one.display().to_string(),
            [first, .., last] if self.profiles_written == self.profiles.len() as u64 => {
                format!("{} profiles, {} … {}", self.profiles_written, first.display(), last.display())
            }
            [first, ..] => format!(
                "{} profiles, the newest {} kept: {} … {}",
                self.profiles_written,
                self.profiles.len(),
                first.display(),
                self.profiles.last().unwrap_or(first).display()
            ),
            [] => "no profile".to_string(),
        };
        let failed = match self.profiles_failed {
            0 => String::new(),
            n => format!(" ({n} could not be written)"),
        };
        eprintln!(
            "unwound: wrote {wrote}{failed} — {} samples in {} stacks; dropped: {dropped} (sample ring {} KiB)",
            self.received,
            self.stacks,
            self.ring_bytes >> 10
        );
        eprintln!(
            "unwound: {fired} perf samples fired ({:.1}/s per CPU; idle {}, other processes {}); user walks truncated {}, ended at a bad frame pointer {}; kernel threads {}",
            fired as f64 / self.seconds.max(1e-9) / self.cpus.max(1) as f64,
            self.get(Counter::Idle),
            self.get(Counter::Filtered),
            self.get(Counter::UserTruncated),
            self.get(Counter::UserWalkFailed),
            self.get(Counter::KernelThread),
        );
        eprintln!(
            "unwound: agent CPU {:.3} s ({:.2}% of one CPU; start-up {:.3} s, sampling {:.3} s, finish {:.3} s), peak RSS {} MiB; walker programs (verified instructions): {}{}",
            self.agent_cpu.as_secs_f64(),
            100.0 * self.agent_cpu.as_secs_f64() / self.seconds.max(1e-9),
            self.cpu_phases[0].as_secs_f64(),
            self.cpu_phases[1].as_secs_f64(),
            self.cpu_phases[2].as_secs_f64(),
            max_rss_kib() / 1024,
            self.walker_programs
                .iter()
                .map(|(name, n)| format!("{name} ({})", n.map_or("?".to_string(), |n| n.to_string())))
                .collect::<Vec<_>>()
                .join(", "),
            if self.symbol_errors > 0 {
                format!("; {} files unreadable for symbols", self.symbol_errors)
            } else {
                String::new()
            },
        );
        let events: Vec<String> = self
            .event_programs
            .iter()
            .map(|(e, n)| format!("{e} ({} insns)", n.map_or("?".to_string(), |n| n.to_string())))
            .collect();
        eprintln!(
            "unwound: processes followed: {} exec events, {} exits; event programs: {}",
            self.execs,
            self.exits,
            if events.is_empty() { "none".to_string() } else { events.join(", ") }
        );
        if self.tables_off {
            eprintln!(
                "unwound: unwind tables: off (the kernel refuses their map segments); frame pointers only"
            );
        }
        if let Some(t) = &self.tables {
            eprintln!(
                "unwound: unwind tables (in segments, admitted by kernel {}): {} uploaded for {} processes ({} from the cache, {} files shared by build-id), {} KiB resident (peak {} KiB) in {} KiB of BPF maps (peak {} KiB; segments created {}, dropped {}; + {} KiB of per-CPU rule cache); evicted {}, did not fit {}, refused by the kernel {}, could not compile {}",
                self.kernel,
                t.tables,
                t.processes,
                t.cache_hits,
                t.shared_by_build_id,
                t.bytes / 1024,
                t.peak_bytes / 1024,
                t.map_bytes / 1024,
                t.peak_map_bytes / 1024,
                t.segments_created,
                t.segments_dropped,
                t.rule_cache_bytes / 1024,
                t.evicted,
                t.full,
                t.refused,
                t.compile_failures
            );
        }
        let st = &self.symbol_stats;
        eprintln!(
            "unwound: symbolized in {:.3} s: debuginfo indexes built {}, from cache {}, damaged caches rebuilt {}; {} blocks loaded, {} evicted, {} KiB resident",
            self.symbolize_time.as_secs_f64(),
            st.indexes_built,
            st.cache_hits,
            st.cache_rebuilt,
            st.blocks_loaded,
            st.blocks_evicted,
            st.resident_bytes / 1024,
        );
        if st.debuginfod_errors > 0 {
            eprintln!(
                "unwound: a debuginfod request failed (DEBUGINFOD_URLS); the servers were not asked again in this run"
            );
        }
    }

    fn json(&self) -> String {
        use serde_json::{json, Map, Value};
        let mut m: Map<String, Value> =
            self.counters.iter().map(|(c, v)| (c.name().to_string(), json!(v))).collect();
        let secs = |d: Duration, places: i32| {
            let f = 10f64.powi(places);
            json!((d.as_secs_f64() * f).round() / f)
        };
        let mut put = |k: &str, v: Value| {
            m.insert(k.to_string(), v);
        };
        put("received", json!(self.received));
        put("malformed_record", json!(self.malformed));
        put("stacks", json!(self.stacks));
        put("profiles", json!(self.profiles_written));
        put("profiles_failed", json!(self.profiles_failed));
        put("seconds", secs(Duration::from_secs_f64(self.seconds), 3));
        put("cpus", json!(self.cpus));
        put("ring_buffer_bytes", json!(self.ring_bytes));
        put("agent_cpu_seconds", secs(self.agent_cpu, 4));
        for (name, d) in ["startup", "sampling", "finish"].iter().zip(self.cpu_phases) {
            put(&format!("agent_{name}_cpu_seconds"), secs(d, 4));
        }
        put("agent_max_rss_kib", json!(max_rss_kib()));
        put("verified_instructions", json!(self.walker_programs.first().and_then(|p| p.1)));
        put("walker", json!(self.walker_programs.first().map_or("", |p| p.0)));
        put("symbol_errors", json!(self.symbol_errors));
        put("exec_events", json!(self.execs));
        put("exit_events", json!(self.exits));
        let st = &self.symbol_stats;
        put("symbolize_seconds", secs(self.symbolize_time, 4));
        put("symbol_indexes_built", json!(st.indexes_built));
        put("symbol_cache_hits", json!(st.cache_hits));
        put("symbol_cache_rebuilt", json!(st.cache_rebuilt));
        put("symbol_blocks_evicted", json!(st.blocks_evicted));
        put("debuginfod_errors", json!(st.debuginfod_errors));
        if let Some(t) = &self.tables {
            for (k, v) in [
                ("tables", t.tables),
                ("table_processes", t.processes),
                ("table_bytes", t.bytes),
                ("table_peak_bytes", t.peak_bytes),
                ("table_map_bytes", t.map_bytes),
                ("table_map_peak_bytes", t.peak_map_bytes),
                ("table_segments_created", t.segments_created),
                ("table_segments_dropped", t.segments_dropped),
                ("rule_cache_bytes", t.rule_cache_bytes),
                ("table_compile_failures", t.compile_failures),
                ("tables_full", t.full),
                ("tables_refused", t.refused),
                ("tables_evicted", t.evicted),
                ("table_cache_hits", t.cache_hits),
                ("table_build_id_shares", t.shared_by_build_id),
            ] {
                put(k, json!(v));
            }
        }
        put("kernel", json!(self.kernel));
        let maps = match (&self.tables, self.tables_off) {
            (Some(_), _) => "segments",
            (None, true) => "refused by the kernel",
            (None, false) => "off",
        };
        put("table_maps", json!(maps));
        if let Some((runs, ns)) = self.bpf_run {
            put("bpf_runs", json!(runs));
            put("bpf_run_time_ns", json!(ns));
        }
        Value::Object(m).to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_agree_with_date() {
        // Epoch, leap days (2000 is a leap year, 2100 is not), year ends, far future.
        for secs in
            [0u64, 951_782_400, 951_868_799, 4_107_542_400, 1_798_761_599, 1_796_196_600, 32_503_680_000]
        {
            let out = std::process::Command::new("date")
                .args(["-u", "-d", &format!("@{secs}"), "+%Y%m%dT%H%M%SZ"])
                .output()
                .expect("run date");
            let want = String::from_utf8_lossy(&out.stdout).trim().to_string();
            assert_eq!(utc_stamp(secs), want, "at {secs}");
        }
    }

    #[test]
    fn interval_names_keep_the_extension_and_never_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let at = UNIX_EPOCH + Duration::from_secs(1_796_194_200); // 2026-12-02T06:50:00Z
        let name = |out: &str| {
            interval_path(&dir.path().join(out), at).file_name().unwrap().to_string_lossy().into_owned()
        };
        assert_eq!(name("cpu.pb.gz"), "cpu-20261202T065000Z.pb.gz");
        assert_eq!(name("flame.svg"), "flame-20261202T065000Z.svg");
        assert_eq!(name("plain"), "plain-20261202T065000Z");
        assert_eq!(name(".hidden.folded"), ".hidden-20261202T065000Z.folded");
        std::fs::write(dir.path().join("cpu-20261202T065000Z.pb.gz"), b"").unwrap();
        assert_eq!(name("cpu.pb.gz"), "cpu-20261202T065000Z-2.pb.gz");
        std::fs::write(dir.path().join("cpu-20261202T065000Z-2.pb.gz"), b"").unwrap();
        assert_eq!(name("cpu.pb.gz"), "cpu-20261202T065000Z-3.pb.gz");
    }
}
