//! `unwound record`: load the walker, sample, aggregate, symbolize, write.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context as _};
use unwound_stackwalk::{Notice, TableOptions, Walker, WalkerBuilder};
use unwound_stackwalk_abi::{MAX_PIDS, MAX_USER_FRAMES};

use crate::summary::Summary;
use crate::writer::{output_dir, ProfileWriter};
use crate::WalkerKind;
use crate::{Format, RecordArgs};
use unwound_stackwalk::profile::Collector;

const POLL_INTERVAL_MS: i32 = 100;

/// Records as `args` say; the exit status is 0, or the profiled command's.
pub fn run(args: &RecordArgs) -> anyhow::Result<u8> {
    let format = resolve_format(&args.output, args.format)?;
    check_args(args)?;
    // Before any progress line: a user without the privileges or the kernel gets one line.
    unwound_stackwalk::check_privileges()?;
    for line in crate::privileges::missing() {
        eprintln!("{line}");
    }
    unwound_stackwalk::check_kernel(
        &unwound_stackwalk::kernel_release(),
        Path::new("/sys/kernel/btf/vmlinux").exists(),
    )?;
    let cpu_before = cpu_time();
    let stats_guard = if args.bpf_stats { Some(unwound_stackwalk::enable_bpf_stats()?) } else { None };
    let caches_unwritable = check_cache_dirs(args);
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
    // The programs are loaded and attached and the command started: from here on the agent
    // needs only what it uses while sampling.
    match crate::privileges::drop_all_but_kept() {
        Ok(kept) => eprintln!(
            "unwound: capabilities kept: {} (every other one dropped)",
            crate::privileges::names(&kept)
        ),
        Err(e) => eprintln!("warning: {e}; running with the capabilities it was given"),
    }
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
    let writer = ProfileWriter::new(args, format);
    // With --every, each interval is symbolized and written on a thread of its own while
    // this one goes on draining the ring: a slow symbolization (a new binary's debuginfo
    // indexed) does not leave samples to fill the ring and be dropped. Two intervals may
    // wait; a third waits here.
    let (to_writer, writer_thread) = match every {
        Some(_) => {
            let (tx, rx) = std::sync::mpsc::sync_channel::<IntervalJob>(2);
            let output = args.output.clone();
            let mut writer = writer;
            let thread = std::thread::Builder::new()
                .name("unwound-writer".into())
                .spawn(move || {
                    for job in rx {
                        let write = std::panic::AssertUnwindSafe(|| {
                            writer.write_interval(&job.interval, &output, job.length, job.start)
                        });
                        if std::panic::catch_unwind(write).is_err() {
                            // A bug, not the input: counted like a profile that could not be
                            // written, and the run goes on.
                            eprintln!("error: the profile of an interval could not be written (the writer failed)");
                            writer.failed += 1;
                        }
                        drop(job.interval);
                        writer.after_interval();
                        eprintln!(
                            "unwound: so far: profiles written {}, failed {}; samples received {}; dropped: {}",
                            writer.count, writer.failed, job.received, job.dropped
                        );
                    }
                    writer
                })
                .context("cannot start the profile writer's thread")?;
            (Some(tx), WriterHome::Thread(thread))
        }
        None => (None, WriterHome::Here(Box::new(writer))),
    };
    let deadline = duration.map(|d| started + d);
    let mut ended_early = None;
    let mut exit_status = None;
    let mut last_refresh = Instant::now();
    // The current profile's start. With --every, profiles start on a fixed grid from the
    // recording's start, whatever each write took.
    let mut interval = (started, started_wall);
    // An error ends the recording, but the intervals already handed to the writer are
    // written (and counted) before it is reported.
    let mut failure: Option<anyhow::Error> = None;
    while deadline.is_none_or(|d| Instant::now() < d) && !stop.load(Ordering::Relaxed) {
        // Woken at the next interval's end or the deadline, whichever is first.
        let wake = [deadline, every.map(|e| interval.0 + e)].into_iter().flatten().min();
        let wait = wake.map_or(POLL_INTERVAL_MS, |w| {
            w.saturating_duration_since(Instant::now()).as_millis().clamp(1, POLL_INTERVAL_MS as u128) as i32
        });
        if let Err(e) = drain(&mut session, &mut collector, wait) {
            failure = Some(e);
            break;
        }
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
        if let (Some(e), Some(tx)) = (every.filter(|&e| Instant::now() >= interval.0 + e), &to_writer) {
            let job = IntervalJob {
                interval: collector.take_interval(),
                length: e,
                start: interval.1,
                received: collector.samples,
                dropped: dropped_so_far(&session, &collector),
            };
            if tx.send(job).is_err() {
                failure = Some(anyhow::anyhow!("the profile writer's thread ended"));
                break;
            }
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
    if failure.is_none() {
        failure = drain(&mut session, &mut collector, 0).err();
    }
    drop(to_writer);
    let writer = match writer_thread {
        WriterHome::Here(w) => Some(*w),
        WriterHome::Thread(t) => t.join().ok(),
    };
    if let Some(e) = failure {
        return Err(e);
    }
    let mut writer = writer.context("the profile writer's thread failed")?;
    let counters = session.counters()?;
    let bpf_run = session.run_stats();
    drop(stats_guard);

    let last = collector.take_interval();
    if every.is_some() {
        // Like every other interval's: the run's summary is printed even if it failed.
        writer.write_interval(&last, &args.output, ended - interval.0, interval.1);
    } else {
        writer.write(&last, &args.output, ended - interval.0, interval.1)?;
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
        perf_maps: collector.perf_maps(),
        execs: collector.execs,
        event_programs: session.programs().events.clone(),
        exits: collector.exits,
        symbolize_time: writer.symbolize_time,
        symbol_stats: writer.symbol_stats(),
        bpf_run,
        tables: session.table_stats().cloned(),
        python: (session.python_stats().cloned(), collector.python_unnamed),
        tables_off: session.tables_refused_by_kernel(),
        kernel: unwound_stackwalk::kernel_release(),
        caches_unwritable,
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

/// An interval handed to the writer's thread, with the run's counters when it ended.
struct IntervalJob {
    interval: unwound_stackwalk::profile::Interval,
    length: Duration,
    start: SystemTime,
    received: u64,
    dropped: String,
}

/// Where the profile writer lives: on this thread, or (with `--every`) on its own.
enum WriterHome {
    Here(Box<ProfileWriter>),
    Thread(std::thread::JoinHandle<ProfileWriter>),
}

/// The samples dropped so far, by reason (`none` if none), for the line each `--every`
/// interval prints once written: a service's log shows each interval's profile and every
/// sample dropped, as it happens.
fn dropped_so_far(session: &Walker, collector: &Collector) -> String {
    let counters = match session.counters() {
        Ok(c) => c,
        Err(e) => return format!("unknown (cannot read the walker's counters: {e})"),
    };
    let mut dropped: Vec<String> = counters
        .iter()
        .filter(|(c, v)| c.is_drop() && *v > 0)
        .map(|(c, v)| format!("{}={v}", c.name()))
        .collect();
    if collector.malformed > 0 {
        dropped.push(format!("malformed_record={}", collector.malformed));
    }
    if dropped.is_empty() {
        "none".to_string()
    } else {
        dropped.join(" ")
    }
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

/// The directory compiled unwind tables are cached in, if any.
fn table_cache_dir(args: &RecordArgs) -> Option<std::path::PathBuf> {
    if args.no_table_cache || args.no_tables {
        return None;
    }
    args.table_cache_dir.clone().or_else(|| unwound_symbolize::default_cache_dir().map(|d| d.join("tables")))
}

/// Says, one line each, which cache directories cannot be written (the run goes on without
/// keeping what it compiles there); returns how many.
fn check_cache_dirs(args: &RecordArgs) -> u64 {
    let symbols = crate::symbolize::options(
        args.symbol_cache_dir.clone(),
        args.no_symbol_cache,
        args.symbol_memory,
        &args.debug_dirs,
    )
    .cache_dir;
    let mut unwritable = 0;
    for (what, dir) in [("unwind tables", table_cache_dir(args)), ("debuginfo indexes", symbols)] {
        let Some(dir) = dir else { continue };
        let probe = dir.join(format!(".unwound-probe-{}", std::process::id()));
        let written = std::fs::create_dir_all(&dir).and_then(|()| std::fs::write(&probe, b""));
        let _ = std::fs::remove_file(&probe);
        if let Err(e) = written {
            eprintln!(
                "warning: cannot write the {what} cache in {}: {e}; they are built afresh and not kept",
                dir.display()
            );
            unwritable += 1;
        }
    }
    unwritable
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
            cache_dir: table_cache_dir(args),
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

pub(crate) fn max_rss_kib() -> u64 {
    unwound_stackwalk::usage::own().max_rss_kib
}

/// User + system CPU time of this process.
fn cpu_time() -> Duration {
    unwound_stackwalk::usage::own().cpu
}
