//! `unwound record`: load the walker, sample, aggregate, symbolize, write.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context as _};
use aya::maps::{Array, HashMap as BpfHashMap, PerCpuArray, ProgramArray, RingBuf};
use aya::programs::perf_event::{PerfEventConfig, PerfEventScope, SamplePolicy, SoftwareEvent};
use aya::programs::PerfEvent;
use aya::util::online_cpus;
use aya::{Ebpf, EbpfLoader};
use unwound_stackwalk_abi::{
    Counter, Counters, WalkerConfig, CONFIG_MAP, COUNTERS_MAP, EXEC_PROGRAM, EXIT_PROGRAM, FLAG_EVENT_EXEC,
    FLAG_EVENT_EXIT, FP_TAIL_PROGRAM, MAX_PIDS, MAX_USER_FRAMES, PIDS_MAP, SAMPLES_MAP, SAMPLE_PROGRAM,
    SAMPLE_TAIL_PROGRAM, TABLE_TAIL_PROGRAM, TAIL_SLOT_FP, TAIL_SLOT_TABLES, WALK_PROGS_MAP,
};
use unwound_symbolize::KernelSymbols;

use crate::output::{self, ProfileMeta};
use crate::profile::Collector;
use crate::unwinding::{SegmentsRefused, TableLoader, TablePlan, TableStats};
use crate::WalkerKind;
use crate::{Format, RecordArgs};

/// The walker, built from `stackwalk-ebpf/` by `scripts/build-bpf.sh`.
pub(crate) static BPF_OBJECT: &[u8] = aya::include_bytes_aligned!("../bpf/stackwalk.bpf.o");

const POLL_INTERVAL_MS: i32 = 100;

/// Records as `args` say; the exit status is 0, or the profiled command's.
pub fn run(args: &RecordArgs) -> anyhow::Result<u8> {
    let format = resolve_format(&args.output, args.format)?;
    check_args(args)?;
    check_privileges()?;
    check_kernel(&kernel_release(), Path::new("/sys/kernel/btf/vmlinux").exists())?;
    let cpu_before = cpu_time();

    let stats_guard = if args.bpf_stats {
        Some(
            aya::sys::enable_stats(aya::sys::Stats::RunTime)
                .context("cannot enable kernel BPF statistics")?,
        )
    } else {
        None
    };
    let mut session = Session::start(args)?;
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
    let cpus = session.cpus;
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
        session.drain(&mut collector, wait)?;
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
    session.drain(&mut collector, 0)?;
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
        ring_bytes: session.ring_bytes,
        agent_cpu: cpu,
        cpu_phases,
        walker_programs: session.walker_programs.clone(),
        symbol_errors: collector.symbol_errors(),
        execs: collector.execs,
        event_programs: session.event_instructions.clone(),
        exits: collector.exits,
        symbolize_time: writer.symbolize_time,
        symbol_stats: writer.symbolizer.stats(),
        bpf_run,
        tables: session.tables.as_ref().map(|t| t.stats.clone()),
        tables_off: session.tables_off.clone(),
        kernel: kernel_release(),
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

/// Loading BPF and opening perf events needs CAP_BPF + CAP_PERFMON (or CAP_SYS_ADMIN).
pub(crate) fn check_privileges() -> anyhow::Result<()> {
    const CAP_SYS_ADMIN: u32 = 21;
    const CAP_PERFMON: u32 = 38;
    const CAP_BPF: u32 = 39;
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let caps = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0);
    let has = |c: u32| caps & (1u64 << c) != 0;
    if has(CAP_SYS_ADMIN) || (has(CAP_BPF) && has(CAP_PERFMON)) {
        return Ok(());
    }
    bail!(
        "unwound needs root (or CAP_BPF and CAP_PERFMON) to load its BPF program and open perf events; run it with sudo"
    )
}

/// The oldest kernel the walker loads on: `bpf_task_pt_regs` (a sample taken in the kernel
/// keeps its user stack) came in 5.15; `bpf_loop` (5.17) is optional, the tail-call walker
/// stands in for it.
const OLDEST_KERNEL: (u32, u32) = (5, 15);

/// One clear error for a kernel the walker cannot run on (too old, or without BTF), rather
/// than a verifier log or silently incomplete stacks. Tested: 6.18 natively, Debian 12's
/// 6.1 under qemu (agent/tests/older_kernel.rs).
fn check_kernel(release: &str, has_btf: bool) -> anyhow::Result<()> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit()).map(|p| p.parse::<u32>().ok());
    if let (Some(Some(major)), Some(Some(minor))) = (parts.next(), parts.next()) {
        if (major, minor) < OLDEST_KERNEL {
            bail!(
                "kernel {release} is older than {}.{}, the oldest unwound's walker runs on (it needs bpf_task_pt_regs); 5.17 or newer walks in one program",
                OLDEST_KERNEL.0,
                OLDEST_KERNEL.1
            );
        }
    }
    if !has_btf {
        bail!(
            "kernel {release} has no BTF (/sys/kernel/btf/vmlinux is missing; CONFIG_DEBUG_INFO_BTF=y is needed by the walker's helpers)"
        );
    }
    Ok(())
}

/// Least and most bytes of the sample ring.
const RING_MIN_BYTES: u64 = 256 << 10;
const RING_MAX_BYTES: u64 = 64 << 20;

/// The sample ring's size for `cpus` CPUs sampled at `hz`: five seconds of 1 KiB records
/// (a 120-frame stack; most are a few hundred bytes), a power of two between 256 KiB and
/// 64 MiB. The agent drains it every 100 ms and is woken when it is a quarter full; the
/// slack is for the agent's pauses between drains (a large table compiled, a profile of
/// `--every` symbolized), and a small machine does not hold a large machine's ring.
fn ring_bytes(cpus: usize, hz: u64) -> u32 {
    let want = (cpus as u64).saturating_mul(hz).saturating_mul(5 << 10);
    want.clamp(RING_MIN_BYTES, RING_MAX_BYTES).next_power_of_two() as u32
}

/// Lets the walker sample `pid` while its pid filter is on.
fn add_to_pid_filter(ebpf: &mut Ebpf, pid: u32) -> anyhow::Result<()> {
    let mut pids: BpfHashMap<_, u32, u8> =
        BpfHashMap::try_from(ebpf.map_mut(PIDS_MAP).context("BPF object has no PIDS map")?)?;
    pids.insert(pid, 1, 0).context("cannot add the pid filter")?;
    Ok(())
}

/// Every process to walk with tables: the selected ones, or all with a user address space.
fn table_targets(args: &RecordArgs) -> Vec<u32> {
    if !args.pids.is_empty() || !args.command.is_empty() {
        // A command's process gets its tables once it has exec'ed (`Session::follow`).
        return args.pids.clone();
    }
    let me = std::process::id();
    let mut pids: Vec<u32> = std::fs::read_dir("/proc")
        .map(|rd| rd.flatten().filter_map(|e| e.file_name().to_str()?.parse().ok()).collect())
        .unwrap_or_default();
    pids.retain(|&p| p != me && std::fs::metadata(format!("/proc/{p}/exe")).is_ok());
    pids.sort_unstable();
    pids
}

/// Each program of the walker with its verified instructions, the sampling program first,
/// and the tail-call walker's program array when that is the walker.
type Walker = (Vec<(&'static str, Option<u32>)>, Option<ProgramArray<aya::maps::MapData>>);

/// Loads the sampling program: the `bpf_loop` walker, or (forced, or where the kernel
/// refuses `bpf_loop`) the walker that goes on by tail calls.
fn load_walker(ebpf: &mut Ebpf, kind: WalkerKind) -> anyhow::Result<Walker> {
    fn load(ebpf: &mut Ebpf, name: &'static str) -> anyhow::Result<Option<u32>> {
        let program: &mut PerfEvent = ebpf
            .program_mut(name)
            .with_context(|| format!("BPF object has no {name} program"))?
            .try_into()?;
        program.load().with_context(|| format!("the kernel's verifier rejected {name}"))?;
        Ok(program.info().ok().and_then(|i| i.verified_instruction_count()))
    }
    if kind != WalkerKind::TailCalls {
        match load(ebpf, SAMPLE_PROGRAM) {
            Ok(n) => return Ok((vec![(SAMPLE_PROGRAM, n)], None)),
            Err(e) if kind == WalkerKind::Loop => {
                return Err(e.context("a kernel ≥ 5.17 is needed for --walker loop"));
            }
            Err(e) => eprintln!("unwound: walking with tail calls: {e:#}"),
        }
    }
    let mut counts = Vec::new();
    for name in [TABLE_TAIL_PROGRAM, FP_TAIL_PROGRAM] {
        counts.push((name, load(ebpf, name)?));
    }
    let mut slots: ProgramArray<aya::maps::MapData> = ProgramArray::try_from(
        ebpf.take_map(WALK_PROGS_MAP).with_context(|| format!("BPF object has no {WALK_PROGS_MAP} map"))?,
    )?;
    for (slot, name) in [(TAIL_SLOT_TABLES, TABLE_TAIL_PROGRAM), (TAIL_SLOT_FP, FP_TAIL_PROGRAM)] {
        let program: &PerfEvent = ebpf.program(name).context("tail program vanished")?.try_into()?;
        slots.set(slot, program.fd()?, 0).with_context(|| format!("cannot chain {name}"))?;
    }
    counts.insert(0, (SAMPLE_TAIL_PROGRAM, load(ebpf, SAMPLE_TAIL_PROGRAM)?));
    Ok((counts, Some(slots)))
}

struct Session {
    ebpf: Ebpf,
    tables: Option<TableLoader>,
    /// Processes with tables, and the text of their maps when last read.
    known: std::collections::HashMap<u32, String>,
    /// When each process was last re-read on demand.
    recent: std::collections::HashMap<u32, Instant>,
    /// The --pid selection (empty: every process).
    selected: Vec<u32>,
    ring: RingBuf<aya::maps::MapData>,
    links: Vec<aya::programs::perf_event::PerfEventLinkId>,
    cpus: usize,
    /// The sample ring's size, as sized at load.
    ring_bytes: u32,
    /// Each program of the walker and its verified instructions, the attached sampling
    /// program (`bpf_loop` or tail-call walker) first.
    walker_programs: Vec<(&'static str, Option<u32>)>,
    /// Verified instructions of the exec/exit event programs that are attached.
    event_instructions: Vec<(&'static str, Option<u32>)>,
    /// The tail-call walker's program array, kept while the programs run.
    _walk_programs: Option<ProgramArray<aya::maps::MapData>>,
    /// Why tables are off although they were asked for (the kernel refused segments).
    tables_off: Option<String>,
}

impl Session {
    fn start(args: &RecordArgs) -> anyhow::Result<Self> {
        raise_memlock_limit();
        let plan = if args.no_tables {
            None
        } else {
            let targets = table_targets(args);
            let t = Instant::now();
            eprintln!("unwound: compiling unwind tables for {} processes…", targets.len());
            let cache = if args.no_table_cache {
                None
            } else {
                args.table_cache_dir
                    .clone()
                    .or_else(|| unwound_symbolize::default_cache_dir().map(|d| d.join("tables")))
                    .map(unwound_unwind_tables::cache::TableCache::new)
            };
            let plan = TablePlan::new(&targets, cache);
            eprintln!("unwound: unwind tables ready in {:.2} s", t.elapsed().as_secs_f64());
            Some(plan)
        };
        let cpus = online_cpus().map_err(|(path, e)| anyhow!("cannot read {path}: {e}"))?;
        let ring_bytes = ring_bytes(cpus.len(), args.frequency);
        let mut loader = EbpfLoader::new();
        loader.map_max_entries(SAMPLES_MAP, ring_bytes);
        // The pid filter holds the --pid processes and a command's; 1 is the least a map takes.
        loader.map_max_entries(
            PIDS_MAP,
            (args.pids.len() + usize::from(!args.command.is_empty())).max(1) as u32,
        );
        let table_budget = (args.table_memory * (1u64 << 20) as f64) as u64;
        if let Some(p) = &plan {
            p.size_loader(&mut loader, table_budget);
        }
        let mut ebpf = loader.load(BPF_OBJECT).map_err(|e| {
            anyhow!("the kernel refused unwound's BPF maps: {e} (a kernel ≥ 5.17 with BTF is needed)")
        })?;
        let mut known = std::collections::HashMap::new();
        let mut tables_off = None;
        let tables = match plan {
            Some(p) => {
                let texts = p.maps_texts();
                match TableLoader::new(&mut ebpf, p, table_budget) {
                    Ok(t) => {
                        known = texts;
                        Some(t)
                    }
                    Err(e) if e.is::<SegmentsRefused>() => {
                        eprintln!(
                            "warning: unwind tables are off for this run: {e:#} (kernel {}); stacks of code without frame pointers end at their first frame ([unwind: no table])",
                            kernel_release()
                        );
                        tables_off = Some(e.to_string());
                        None
                    }
                    Err(e) => return Err(e),
                }
            }
            None => None,
        };
        {
            let mut config: Array<_, WalkerConfig> =
                Array::try_from(ebpf.map_mut(CONFIG_MAP).context("BPF object has no CONFIG map")?)?;
            let value = WalkerConfig {
                filter_pids: u32::from(!args.pids.is_empty() || !args.command.is_empty()),
                max_user_frames: args.max_frames,
                follow_processes: u32::from(tables.is_some()),
                ring_wakeup_bytes: ring_bytes / 4,
            };
            config.set(0, value, 0).context("cannot configure the walker")?;
        }
        {
            for &pid in &args.pids {
                add_to_pid_filter(&mut ebpf, pid)?;
            }
        }
        let ring = RingBuf::try_from(ebpf.take_map(SAMPLES_MAP).context("BPF object has no SAMPLES map")?)?;
        let (walker_programs, walk_programs) = load_walker(&mut ebpf, args.walker)?;
        let sample_program = walker_programs[0].0;
        let mut event_instructions: Vec<(&'static str, Option<u32>)> = Vec::new();
        // Exec and exit events (raw tracepoints: no tracefs needed), ordered with the samples
        // in the same ring. Without them processes are still followed from their samples and
        // a periodic scan.
        for (name, event) in [(EXEC_PROGRAM, "sched_process_exec"), (EXIT_PROGRAM, "sched_process_exit")] {
            let attached = ebpf
                .program_mut(name)
                .context("BPF object lacks an event program")
                .and_then(|p| <&mut aya::programs::RawTracePoint>::try_from(p).map_err(anyhow::Error::from))
                .and_then(|p| {
                    p.load()?;
                    p.attach(event)?;
                    Ok(p.info().ok().and_then(|i| i.verified_instruction_count()))
                });
            match attached {
                Ok(n) => event_instructions.push((event, n)),
                Err(e) => eprintln!("warning: not following {event} events: {e:#}"),
            }
        }
        let program: &mut PerfEvent =
            ebpf.program_mut(sample_program).context("BPF object has no sampling program")?.try_into()?;
        let mut links = Vec::with_capacity(cpus.len());
        for cpu in &cpus {
            let link = program
                .attach(
                    PerfEventConfig::Software(SoftwareEvent::CpuClock),
                    PerfEventScope::AllProcessesOneCpu { cpu: *cpu },
                    SamplePolicy::Frequency(args.frequency),
                    true,
                )
                .map_err(|e| {
                    anyhow!(
                        "cannot open a cpu-clock perf event on CPU {cpu}: {e:#} (check kernel.perf_event_paranoid and that perf events are enabled)"
                    )
                })?;
            links.push(link);
        }
        Ok(Session {
            ebpf,
            tables,
            known,
            recent: std::collections::HashMap::new(),
            selected: args.pids.clone(),
            ring,
            links,
            cpus: cpus.len(),
            ring_bytes,
            walker_programs,
            event_instructions,
            _walk_programs: walk_programs,
            tables_off,
        })
    }

    /// Samples `pid` too (the pid filter is on) and gives it tables.
    fn follow(&mut self, pid: u32) -> anyhow::Result<()> {
        add_to_pid_filter(&mut self.ebpf, pid)?;
        self.selected.push(pid);
        // The program and its loader get tables before its first samples rather than
        // after them. `spawn` returns while the kernel may still be mapping the new image
        // (a vfork parent is released when the old address space is dropped), so this
        // waits, briefly, for the mapping the kernel makes last: the vDSO of the new image.
        // Not counted against the rate limit: the libraries the loader maps next come from
        // the first samples that reach them.
        let own = std::fs::read_link("/proc/self/exe").ok();
        let deadline = Instant::now() + Duration::from_millis(100);
        while Instant::now() < deadline {
            let exe = std::fs::read_link(format!("/proc/{pid}/exe")).ok();
            let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default();
            if exe.is_none() || (exe != own && maps.contains("[vdso]")) {
                break;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        self.refresh(pid);
        Ok(())
    }

    /// A sample came from a process without tables, or from a pc outside its known
    /// mappings (a library loaded since): re-read its maps now, at most every 200 ms.
    fn refresh_one(&mut self, pid: u32) {
        if self.tables.is_none() {
            return;
        }
        if !self.selected.is_empty() && !self.selected.contains(&pid) {
            return;
        }
        let now = Instant::now();
        if self.recent.get(&pid).is_some_and(|t| now.duration_since(*t) < Duration::from_millis(200)) {
            return;
        }
        self.recent.insert(pid, now);
        self.refresh(pid);
    }

    /// Re-reads `pid`'s maps and gives its new mappings tables.
    fn refresh(&mut self, pid: u32) {
        let Some(tables) = self.tables.as_mut() else { return };
        let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/maps")) else { return };
        if self.known.get(&pid) == Some(&text) && !tables.lost_tables(pid) {
            return;
        }
        let maps = unwound_symbolize::ProcessMaps::parse(&text);
        if tables.add_process(pid, &maps).is_ok() {
            self.known.insert(pid, text);
        }
    }

    /// Forgets processes that exited (once a second). New processes and new mappings
    /// (dlopen) are picked up as their first samples arrive (`refresh_one`), so nothing
    /// here re-reads every process's maps.
    fn prune_exited(&mut self) {
        let Some(tables) = self.tables.as_mut() else { return };
        let gone: Vec<u32> =
            self.known.keys().copied().filter(|p| !Path::new(&format!("/proc/{p}")).exists()).collect();
        for pid in gone {
            tables.remove_process(pid);
            self.known.remove(&pid);
            self.recent.remove(&pid);
        }
    }

    /// Waits up to `timeout_ms` for samples, then reads all there are.
    fn drain(&mut self, collector: &mut Collector, timeout_ms: i32) -> anyhow::Result<()> {
        if timeout_ms > 0 {
            let mut fds = libc::pollfd { fd: self.ring.as_raw_fd(), events: libc::POLLIN, revents: 0 };
            // SAFETY: one valid pollfd.
            let r = unsafe { libc::poll(&mut fds, 1, timeout_ms) };
            if r < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    return Err(e).context("cannot wait for samples");
                }
            }
        }
        let mut stale: Vec<u32> = Vec::new();
        while let Some(item) = self.ring.next() {
            let Some(header) = collector.add(&item) else { continue };
            if header.flags & FLAG_EVENT_EXIT != 0 {
                if let Some(tables) = self.tables.as_mut() {
                    tables.remove_process(header.pid);
                }
                self.known.remove(&header.pid);
                self.recent.remove(&header.pid);
                stale.retain(|&p| p != header.pid);
                continue;
            }
            if header.flags & FLAG_EVENT_EXEC != 0 {
                // A new program: its mappings replace the old ones now, not at the next
                // rate-limited refresh.
                self.recent.remove(&header.pid);
                if !stale.contains(&header.pid) {
                    stale.push(header.pid);
                }
                continue;
            }
            if let Some(tables) = self.tables.as_mut() {
                let pid = header.pid;
                tables.sampled(pid);
                let unknown = !self.known.contains_key(&pid) && header.user_len > 0;
                // A walk that found no table where the process lost one to eviction.
                let lost = header.walk_end != unwound_stackwalk_abi::WALK_COMPLETE && tables.lost_tables(pid);
                if (unknown || lost || header.walk_end == unwound_stackwalk_abi::WALK_UNKNOWN_MAPPING)
                    && !stale.contains(&pid)
                {
                    stale.push(pid);
                }
            }
        }
        for pid in stale {
            self.refresh_one(pid);
        }
        Ok(())
    }

    fn detach(&mut self) {
        if let Ok(program) = self
            .ebpf
            .program_mut(self.walker_programs[0].0)
            .context("")
            .and_then(|p| <&mut PerfEvent>::try_from(p).map_err(anyhow::Error::from))
        {
            for link in self.links.drain(..) {
                let _ = program.detach(link);
            }
        }
    }

    /// (runs, total ns) from the program's fdinfo, when kernel BPF statistics are on.
    fn run_stats(&self) -> Option<(u64, u64)> {
        use std::os::fd::{AsFd, AsRawFd};
        let program: &PerfEvent = self.ebpf.program(self.walker_programs[0].0)?.try_into().ok()?;
        let fd = program.fd().ok()?.as_fd().as_raw_fd();
        let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).ok()?;
        let field = |name: &str| {
            info.lines().find_map(|l| l.strip_prefix(name)).and_then(|v| v.trim().parse::<u64>().ok())
        };
        Some((field("run_cnt:")?, field("run_time_ns:")?))
    }

    fn counters(&self) -> anyhow::Result<Vec<(Counter, u64)>> {
        let map: PerCpuArray<_, Counters> =
            PerCpuArray::try_from(self.ebpf.map(COUNTERS_MAP).context("BPF object has no COUNTERS map")?)?;
        let per_cpu = map.get(&0, 0).context("cannot read the walker's counters")?;
        Ok(Counter::ALL.iter().map(|&c| (c, per_cpu.iter().map(|cpu| cpu[c as usize]).sum())).collect())
    }
}

/// A flag that SIGINT or SIGTERM sets (Ctrl-C stops early; the work so far is kept).
pub(crate) fn stop_on_signals() -> anyhow::Result<Arc<AtomicBool>> {
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, Arc::clone(&stop)).context("cannot install signal handler")?;
    }
    Ok(stop)
}

pub(crate) fn raise_memlock_limit() {
    // Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK; later ones to the cgroup.
    let limit = libc::rlimit { rlim_cur: libc::RLIM_INFINITY, rlim_max: libc::RLIM_INFINITY };
    // SAFETY: plain syscall with a valid pointer; failure is harmless on newer kernels.
    unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &limit) };
    // Every mapped file stays open until the end of the run (for its DWARF): allow as many
    // descriptors as the hard limit does.
    // SAFETY: getrlimit fills the struct; setrlimit reads it.
    unsafe {
        let mut files: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut files) == 0 && files.rlim_cur < files.rlim_max {
            files.rlim_cur = files.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &files);
        }
    }
}

/// Peak resident set size of this process, KiB.
/// The running kernel's release, as `uname -r` prints it.
fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map_or_else(|_| "unknown".into(), |s| s.trim().to_string())
}

/// `s` as a JSON string.
fn json_string(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into())
}

fn max_rss_kib() -> u64 {
    // SAFETY: getrusage fills the struct.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    u.ru_maxrss as u64
}

/// User + system CPU time of this process.
fn cpu_time() -> Duration {
    // SAFETY: getrusage fills the struct.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(u.ru_utime) + tv(u.ru_stime)
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
    /// Why the table walker is off although tables were asked for (the kernel refused the
    /// segments probed at load).
    tables_off: Option<String>,
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
        if let Some(why) = &self.tables_off {
            eprintln!("unwound: unwind tables: off ({why}); frame pointers only");
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
        let mut fields: Vec<String> =
            self.counters.iter().map(|(c, v)| format!("\"{}\":{v}", c.name())).collect();
        fields.push(format!("\"received\":{}", self.received));
        fields.push(format!("\"malformed_record\":{}", self.malformed));
        fields.push(format!("\"stacks\":{}", self.stacks));
        fields.push(format!("\"profiles\":{}", self.profiles_written));
        fields.push(format!("\"profiles_failed\":{}", self.profiles_failed));
        fields.push(format!("\"seconds\":{:.3}", self.seconds));
        fields.push(format!("\"cpus\":{}", self.cpus));
        fields.push(format!("\"ring_buffer_bytes\":{}", self.ring_bytes));
        fields.push(format!("\"agent_cpu_seconds\":{:.4}", self.agent_cpu.as_secs_f64()));
        for (name, d) in ["startup", "sampling", "finish"].iter().zip(self.cpu_phases) {
            fields.push(format!("\"agent_{name}_cpu_seconds\":{:.4}", d.as_secs_f64()));
        }
        fields.push(format!("\"agent_max_rss_kib\":{}", max_rss_kib()));
        fields.push(format!(
            "\"verified_instructions\":{}",
            self.walker_programs.first().and_then(|p| p.1).map_or("null".to_string(), |n| n.to_string())
        ));
        fields.push(format!("\"walker\":\"{}\"", self.walker_programs.first().map_or("", |p| p.0)));
        fields.push(format!("\"symbol_errors\":{}", self.symbol_errors));
        fields.push(format!("\"exec_events\":{},\"exit_events\":{}", self.execs, self.exits));
        let st = &self.symbol_stats;
        fields.push(format!(
            "\"symbolize_seconds\":{:.4},\"symbol_indexes_built\":{},\"symbol_cache_hits\":{},\"symbol_cache_rebuilt\":{},\"symbol_blocks_evicted\":{},\"debuginfod_errors\":{}",
            self.symbolize_time.as_secs_f64(),
            st.indexes_built,
            st.cache_hits,
            st.cache_rebuilt,
            st.blocks_evicted,
            st.debuginfod_errors
        ));
        if let Some(t) = &self.tables {
            fields.push(format!(
                "\"tables\":{},\"table_processes\":{},\"table_bytes\":{},\"table_peak_bytes\":{},\"table_map_bytes\":{},\"table_map_peak_bytes\":{},\"table_segments_created\":{},\"table_segments_dropped\":{},\"rule_cache_bytes\":{},\"table_compile_failures\":{},\"tables_full\":{},\"tables_refused\":{},\"tables_evicted\":{},\"table_cache_hits\":{},\"table_build_id_shares\":{}",
                t.tables, t.processes, t.bytes, t.peak_bytes, t.map_bytes, t.peak_map_bytes, t.segments_created, t.segments_dropped, t.rule_cache_bytes, t.compile_failures, t.full, t.refused, t.evicted, t.cache_hits, t.shared_by_build_id
            ));
        }
        fields.push(format!("\"kernel\":{}", json_string(&self.kernel)));
        fields.push(format!(
            "\"table_maps\":{}",
            json_string(match (&self.tables, &self.tables_off) {
                (Some(_), _) => "segments",
                (None, Some(_)) => "refused by the kernel",
                (None, None) => "off",
            })
        ));
        if let Some((runs, ns)) = self.bpf_run {
            fields.push(format!("\"bpf_runs\":{runs},\"bpf_run_time_ns\":{ns}"));
        }
        format!("{{{}}}", fields.join(","))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernels_too_old_or_without_btf_get_one_clear_error() {
        assert!(check_kernel("6.1.0-57-cloud-amd64", true).is_ok());
        assert!(check_kernel("5.15.0-91-generic", true).is_ok());
        assert!(check_kernel("6.18.0", true).is_ok());
        let old = check_kernel("5.10.0-30-amd64", true).unwrap_err().to_string();
        assert!(old.contains("5.10.0-30-amd64") && old.contains("older than 5.15"), "{old}");
        let old = check_kernel("4.19.0", true).unwrap_err().to_string();
        assert!(old.contains("older than 5.15"), "{old}");
        let no_btf = check_kernel("6.1.0", false).unwrap_err().to_string();
        assert!(no_btf.contains("no BTF"), "{no_btf}");
        // A release that does not parse is not refused for its version.
        assert!(check_kernel("weird", true).is_ok());
    }

    #[test]
    fn ring_is_sized_to_cpus_and_rate() {
        // A 2-CPU machine at 99 Hz: 5 s of 1 KiB records is 990 KiB, rounded up.
        assert_eq!(ring_bytes(2, 99), 1 << 20);
        // Small: the floor. Large: the cap. Always a power of two (the kernel requires
        // a power-of-two number of pages).
        assert_eq!(ring_bytes(1, 1), 256 << 10);
        assert_eq!(ring_bytes(4096, 10_000), 64 << 20);
        assert_eq!(ring_bytes(usize::MAX, u64::MAX), 64 << 20);
        for (cpus, hz) in [(1, 99), (2, 999), (64, 99), (64, 999), (3, 4000), (96, 49)] {
            let b = ring_bytes(cpus, hz);
            assert!(b.is_power_of_two() && b.is_multiple_of(4096), "{cpus} CPUs at {hz} Hz: {b}");
            assert!(u64::from(b) >= (cpus as u64 * hz * 5120).min(64 << 20), "{cpus} CPUs at {hz} Hz: {b}");
        }
        // More CPUs or a higher rate never shrink it.
        assert!(ring_bytes(64, 99) > ring_bytes(2, 99) && ring_bytes(2, 999) > ring_bytes(2, 99));
    }

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
