//! A whole-machine eBPF stack walker.
//!
//! A `cpu-clock` perf event samples every CPU; a BPF program walks the interrupted task's
//! user stack *in the kernel* — with frame pointers where code keeps them, with unwind
//! tables compiled from `.eh_frame` where it does not — takes its kernel stack, and writes
//! a record to a ring buffer. This crate owns that BPF program (embedded, built from
//! `stackwalk-ebpf/program`), loads it, compiles and uploads the unwind tables of the
//! processes it samples (sharing one table between every process that maps a file,
//! evicting the least recently sampled tables beyond a memory budget), follows processes
//! through `exec` and `exit`, and hands back typed [`Event`]s.
//!
//! What it does not do: symbolize (see `unwound-symbolize`) or aggregate. Addresses in a
//! [`Sample`] are raw; the first user frame is the sampled pc, the others return addresses.
//!
//! Loading BPF needs root, or CAP_BPF + CAP_PERFMON, on Linux ≥ 5.15 with BTF
//! ([`check_kernel`]).
//!
//! # Example
//!
//! Sample this process for a moment and count the samples whose stack was walked to its
//! root (returns early without the privileges to load BPF):
//!
//! ```
//! use std::time::{Duration, Instant};
//! use unwound_stackwalk::{Event, WalkerBuilder};
//!
//! # fn main() -> Result<(), unwound_stackwalk::Error> {
//! if unwound_stackwalk::check_privileges().is_err() {
//!     return Ok(()); // neither root nor CAP_BPF + CAP_PERFMON
//! }
//! let mut walker = WalkerBuilder::new().frequency(999).pid(std::process::id()).start()?;
//! let end = Instant::now() + Duration::from_millis(300);
//! while Instant::now() < end {
//!     std::hint::black_box(0); // on CPU, so sampled
//! }
//! let (mut samples, mut complete) = (0, 0);
//! walker.drain(Duration::ZERO, |event| {
//!     if let Event::Sample(s) = event {
//!         samples += 1;
//!         complete += u32::from(s.complete());
//!     }
//! })?;
//! assert!(samples > 0);
//! println!("{complete} of {samples} stacks walked to their root");
//! # Ok(())
//! # }
//! ```
//!
//! `examples/top.rs` is a small "top functions" tool over this crate and the symbolizer.
#![warn(missing_docs)]

mod btf;
mod error;
pub mod profile;
mod python;
pub mod sample_cost;
mod tables;
pub mod usage;

use std::collections::HashMap;
use std::os::fd::AsRawFd as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use aya::maps::{Array, HashMap as BpfHashMap, PerCpuArray, ProgramArray, RingBuf};
use aya::programs::perf_event::{
    PerfEventConfig, PerfEventLinkId, PerfEventScope, SamplePolicy, SoftwareEvent,
};
use aya::programs::{PerfEvent, RawTracePoint, TracePoint};
use aya::{Ebpf, EbpfLoader};
use error::Context as _;
pub use error::{Error, Result};
pub use python::PythonStats;
use std::sync::Arc;
pub use tables::TableStats;
use tables::{TableLoader, TablePlan};
pub use unwound_stackwalk_abi::{Counter, SampleHeader, SampleRecord};
use unwound_stackwalk_abi::{
    Counters, KernelOffsets, RecordFile, WalkerConfig, CONFIG_MAP, COUNTERS_MAP, EXEC_PROGRAM, EXIT_PROGRAM,
    FLAG_EVENT_EXEC, FLAG_EVENT_EXIT, FLAG_EVENT_FILE, FORK_PROGRAM, FP_TAIL_PROGRAM, KERNEL_OFFSETS_MAP,
    MAX_USER_FRAMES, MMAP_PROGRAM, MMAP_TRACEPOINT, PIDS_MAP, SAMPLES_MAP, SAMPLE_PROGRAM,
    SAMPLE_TAIL_PROGRAM, TABLE_TAIL_PROGRAM, TAIL_SLOT_FP, TAIL_SLOT_TABLES, WALK_COMPLETE, WALK_PROGS_MAP,
    WALK_UNKNOWN_MAPPING,
};
use unwound_symbolize::{ObjectInfo, ProcessMaps};
use unwound_unwind_tables::cache::TableCache;

/// The walker's BPF object, built from `stackwalk-ebpf/program` by `scripts/build-bpf.sh`
/// (committed; CI proves it matches its source).
pub static BPF_OBJECT: &[u8] = aya::include_bytes_aligned!("../bpf/stackwalk.bpf.o");

/// The oldest kernel the walker loads on: `bpf_task_pt_regs` (a sample taken in the
/// kernel keeps its user stack) came in 5.15; `bpf_loop` (5.17) is optional, the tail-call
/// walker stands in for it.
pub const OLDEST_KERNEL: (u32, u32) = (5, 15);

/// Least time between two re-reads of one process's mappings prompted by its samples (a
/// pc outside its known mappings, a table lost to eviction): the process model's, which
/// the agent's collector uses too.
pub use unwound_symbolize::process::MAPS_REFRESH_INTERVAL as REFRESH_INTERVAL;

/// How the in-kernel walk loops over frames.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum WalkerKind {
    /// `bpf_loop` where the kernel has it (≥ 5.17), else tail calls.
    #[default]
    Auto,
    /// One program, its walk in `bpf_loop` (kernels ≥ 5.17).
    Loop,
    /// The walk continued by tail calls, 16 frames per program.
    TailCalls,
}

/// Where tables come from and how much kernel memory they may take.
#[derive(Clone, Debug)]
pub struct TableOptions {
    /// Most bytes of the walker's table maps (segments and outer arrays). Beyond it the
    /// tables least recently sampled are evicted.
    pub memory_bytes: u64,
    /// Where compiled tables are cached by build-id (`None`: compile afresh, store none).
    pub cache_dir: Option<PathBuf>,
}

impl Default for TableOptions {
    /// 256 MiB, no cache.
    fn default() -> Self {
        TableOptions { memory_bytes: 256 << 20, cache_dir: None }
    }
}

/// Configures and starts a [`Walker`].
#[derive(Clone, Debug)]
pub struct WalkerBuilder {
    frequency: u64,
    pids: Vec<u32>,
    filter: bool,
    max_frames: u32,
    kind: WalkerKind,
    tables: Option<TableOptions>,
    follow_room: usize,
}

impl Default for WalkerBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl WalkerBuilder {
    /// 99 Hz, every process, 512 user frames, [`WalkerKind::Auto`], tables with
    /// [`TableOptions::default`].
    pub fn new() -> Self {
        WalkerBuilder {
            frequency: 99,
            pids: Vec::new(),
            filter: false,
            max_frames: MAX_USER_FRAMES as u32,
            kind: WalkerKind::Auto,
            tables: Some(TableOptions::default()),
            follow_room: 0,
        }
    }

    /// Samples per second per CPU.
    pub fn frequency(mut self, hz: u64) -> Self {
        self.frequency = hz.max(1);
        self
    }

    /// Samples only this process (repeatable); without any, every process.
    pub fn pid(mut self, pid: u32) -> Self {
        self.pids.push(pid);
        self.filter = true;
        self
    }

    /// Turns the pid filter on with room for `n` processes given to [`Walker::follow`]
    /// later (besides those given to [`pid`](Self::pid)), e.g. a command started once the
    /// walker runs.
    pub fn follow_later(mut self, n: usize) -> Self {
        self.filter = true;
        self.follow_room += n;
        self
    }

    /// User frames walked per sample (1 to 512).
    pub fn max_frames(mut self, n: u32) -> Self {
        self.max_frames = n.clamp(1, MAX_USER_FRAMES as u32);
        self
    }

    /// How the in-kernel walk loops.
    pub fn walker(mut self, kind: WalkerKind) -> Self {
        self.kind = kind;
        self
    }

    /// Unwind tables (`None`: frame pointers only).
    pub fn tables(mut self, tables: Option<TableOptions>) -> Self {
        self.tables = tables;
        self
    }

    /// Checks privileges and the kernel, compiles the tables of the processes to sample,
    /// loads and attaches the walker on every online CPU.
    pub fn start(self) -> Result<Walker> {
        check_privileges()?;
        check_kernel(&kernel_release(), Path::new("/sys/kernel/btf/vmlinux").exists())?;
        Walker::start(self)
    }
}

/// Something the walker wants its user to know that is not an error: what it chose, what
/// it left out. Each kind is reported once.
#[derive(Debug)]
#[non_exhaustive]
pub enum Notice {
    /// The kernel refused the `bpf_loop` walker: the walk goes on by tail calls.
    TailCalls(Error),
    /// Exec or exit events are not followed (processes are still picked up from their
    /// samples).
    NoProcessEvents {
        /// `sched_process_exec` or `sched_process_exit`.
        event: &'static str,
        /// Why.
        error: Error,
    },
    /// The kernel refuses the table segments (probed at load): frame pointers only.
    TablesOff(Error),
    /// The first table the kernel would not take; later ones are counted in
    /// [`TableStats::refused`].
    TableRefused(Error),
    /// CPython processes are not walked for Python frames.
    NoPython(Error),
    /// The kernel's own view of process mappings is off: processes are walked with tables
    /// only once the walker has read their maps (a process that lives a few milliseconds
    /// is walked by frame pointers).
    NoKernelMappings(Error),
}

impl std::fmt::Display for Notice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let chain = |e: &Error| {
            let mut s = e.to_string();
            let mut source = std::error::Error::source(e);
            while let Some(c) = source {
                s.push_str(": ");
                s.push_str(&c.to_string());
                source = c.source();
            }
            s
        };
        match self {
            Notice::TailCalls(e) => write!(f, "walking with tail calls: {}", chain(e)),
            Notice::NoProcessEvents { event, error } => write!(f, "not following {event} events: {}", chain(error)),
            Notice::TablesOff(e) => write!(
                f,
                "unwind tables are off for this run: {} (kernel {}); stacks of code without frame pointers end at their first frame ([unwind: no table])",
                chain(e),
                kernel_release()
            ),
            Notice::TableRefused(e) => {
                write!(f, "a table was left out (counted as refused from now on): {}", chain(e))
            }
            Notice::NoPython(e) => write!(f, "Python frames are off for this run: {}", chain(e)),
            Notice::NoKernelMappings(e) => write!(
                f,
                "short-lived processes are walked by frame pointers only (the kernel's view of their mappings is off): {}",
                chain(e)
            ),
        }
    }
}

/// One sampled stack, as the kernel walked it.
#[derive(Clone, Copy, Debug)]
pub struct Sample<'a> {
    /// The record: header, kernel frames and user frames, innermost first.
    pub record: SampleRecord<'a>,
}

impl Sample<'_> {
    /// Process id.
    pub fn pid(&self) -> u32 {
        self.record.header.pid
    }

    /// Whether the user walk reached the stack's root.
    pub fn complete(&self) -> bool {
        self.record.header.walk_end == WALK_COMPLETE
    }
}

/// What [`Walker::drain`] yields, in the order the kernel wrote them.
#[derive(Debug)]
#[non_exhaustive]
pub enum Event<'a> {
    /// A stack sample.
    Sample(Sample<'a>),
    /// A process called `execve`: later samples of `pid` are of the new program.
    Exec {
        /// The process.
        pid: u32,
        /// The record (its header's time orders it among the samples).
        header: SampleHeader,
    },
    /// A process exited.
    Exit {
        /// The process.
        pid: u32,
    },
    /// The walker read a process's mappings (to give it its per-process entry): its user
    /// can place the process's frames with them after it is gone (with the files of
    /// [`Event::File`]).
    Maps {
        /// The process.
        pid: u32,
        /// Its mappings, as read.
        maps: Arc<ProcessMaps>,
    },
    /// A CPython process the walker walks for Python frames from now on
    /// ([`SampleRecord::python`]): what its user needs to read the code objects the frames
    /// name.
    Python {
        /// The process.
        pid: u32,
        /// Where its interpreter's structures are.
        info: unwound_symbolize::python::PyProcInfo,
    },
    /// A file the walker has identified (opened, and checked to be the file the kernel
    /// names): frames the kernel found in it ([`SampleRecord::files`]) are named from it,
    /// whether or not their process still lives. Each file once.
    File {
        /// The file, held open.
        object: Arc<ObjectInfo>,
    },
    /// A record that does not parse (counted in [`Walker::malformed`]).
    Malformed,
}

/// Which program walks, with the verifier's instruction count for each of them.
#[derive(Clone, Debug)]
pub struct Programs {
    /// The attached sampling program first (`on_cpu_sample`, or `on_cpu_sample_tail` and its
    /// continuations), with verified instructions where the kernel reports them.
    pub walker: Vec<(&'static str, Option<u32>)>,
    /// The exec and exit event programs that are attached.
    pub events: Vec<(&'static str, Option<u32>)>,
}

/// Turns on the kernel's own view of process mappings: the offsets it needs from the
/// kernel's BTF, the `mmap` exit tracepoint and the fork tracepoint.
fn attach_kernel_view(ebpf: &mut Ebpf) -> Result<Vec<(&'static str, Option<u32>)>> {
    let raw = std::fs::read("/sys/kernel/btf/vmlinux").context("cannot read the kernel's BTF")?;
    let offsets: KernelOffsets = btf::kernel_offsets(&raw)
        .ok_or(Error::Object("task, mm, vma, file and inode members in the kernel's BTF"))?;
    mount_tracefs();
    let mut attached = Vec::new();
    let p = <&mut TracePoint>::try_from(ebpf.program_mut(MMAP_PROGRAM).ok_or(Error::Object("mmap program"))?)
        .context("not a tracepoint program")?;
    p.load().map_err(|e| Error::Verifier { program: MMAP_PROGRAM, source: Box::new(e) })?;
    p.attach(MMAP_TRACEPOINT.0, MMAP_TRACEPOINT.1).context("cannot attach to syscalls:sys_exit_mmap")?;
    attached.push(("sys_exit_mmap", p.info().ok().and_then(|i| i.verified_instruction_count())));
    let p =
        <&mut RawTracePoint>::try_from(ebpf.program_mut(FORK_PROGRAM).ok_or(Error::Object("fork program"))?)
            .context("not a raw tracepoint")?;
    p.load().map_err(|e| Error::Verifier { program: FORK_PROGRAM, source: Box::new(e) })?;
    p.attach("sched_process_fork").context("cannot attach to sched_process_fork")?;
    attached.push(("sched_process_fork", p.info().ok().and_then(|i| i.verified_instruction_count())));
    // Last: the programs stay idle until the offsets are in.
    let mut map: Array<_, KernelOffsets> =
        Array::try_from(ebpf.map_mut(KERNEL_OFFSETS_MAP).ok_or(Error::Object("KERNEL_OFFSETS map"))?)
            .context("cannot open the kernel offsets")?;
    map.set(0, offsets, 0).context("cannot set the kernel offsets")?;
    Ok(attached)
}

/// Mounts tracefs at `/sys/kernel/tracing` where nothing is mounted there (the `mmap`
/// tracepoint is found through it); failure is left to the attach to report.
fn mount_tracefs() {
    if Path::new("/sys/kernel/tracing/events").exists()
        || Path::new("/sys/kernel/debug/tracing/events").exists()
    {
        return;
    }
    // SAFETY: plain C strings; mount(2) has no other preconditions.
    unsafe {
        libc::mount(
            c"nodev".as_ptr(),
            c"/sys/kernel/tracing".as_ptr(),
            c"tracefs".as_ptr(),
            0,
            std::ptr::null(),
        );
    }
}

/// How long a process the kernel's view walks lives before the walker reads its maps for
/// a per-process entry (faster per frame, and rules cached across samples).
const PROMOTE_AFTER: Duration = Duration::from_secs(1);

/// Most executable paths remembered (processes that exit forget theirs).
const MAX_EXE_PATHS: usize = 1 << 16;

/// The running walker. Dropping it detaches everything.
pub struct Walker {
    ebpf: Ebpf,
    tables: Option<TableLoader>,
    /// Processes with tables, and the text of their maps when last read.
    known: HashMap<u32, String>,
    /// When each process was last re-read on demand.
    recent: HashMap<u32, Instant>,
    /// When each process not yet read was first sampled: one the kernel's view walks is
    /// read (for the faster per-process entry) only once it has lived a while.
    first_seen: HashMap<u32, Instant>,
    /// The path each process was last executed by (absolute), to find files it maps.
    exe_paths: HashMap<u32, PathBuf>,
    /// Mappings read since the last drain, handed out as [`Event::Maps`].
    new_maps: Vec<(u32, Arc<ProcessMaps>)>,
    /// CPython processes, walked for their Python frames.
    python: Option<python::Python>,
    /// The pid filter's processes (empty and `filter` false: every process).
    selected: Vec<u32>,
    ring: RingBuf<aya::maps::MapData>,
    links: Vec<PerfEventLinkId>,
    cpus: usize,
    ring_bytes: u32,
    programs: Programs,
    _walk_programs: Option<ProgramArray<aya::maps::MapData>>,
    tables_off: bool,
    notices: Vec<Notice>,
    malformed: u64,
    table_setup: Duration,
}

impl Walker {
    fn start(b: WalkerBuilder) -> Result<Self> {
        raise_memlock_limit();
        let t = Instant::now();
        let plan = b.tables.as_ref().map(|o| {
            let targets = table_targets(&b);
            TablePlan::new(&targets, o.cache_dir.clone().map(TableCache::new))
        });
        let table_setup = t.elapsed();
        let cpus =
            aya::util::online_cpus().map_err(|(path, e)| Error::Io { what: path.into(), source: e })?;
        let ring_bytes = ring_bytes(cpus.len(), b.frequency);
        let mut loader = EbpfLoader::new();
        loader.map_max_entries(SAMPLES_MAP, ring_bytes);
        // The pid filter holds exactly the processes asked for and those to be followed;
        // 1 is the least a map takes.
        loader.map_max_entries(PIDS_MAP, (b.pids.len() + b.follow_room).max(1) as u32);
        let budget = b.tables.as_ref().map_or(0, |o| o.memory_bytes);
        if let Some(p) = &plan {
            p.size_loader(&mut loader, budget);
        }
        let mut ebpf = loader.load(BPF_OBJECT).map_err(|e| Error::Load(Box::new(e)))?;
        let mut known = HashMap::new();
        let mut notices = Vec::new();
        let mut tables_off = false;
        let tables = match plan {
            Some(p) => {
                let texts = p.maps_texts();
                match TableLoader::new(&mut ebpf, p, budget) {
                    Ok(t) => {
                        known = texts;
                        Some(t)
                    }
                    Err(e @ Error::SegmentsRefused { .. }) => {
                        notices.push(Notice::TablesOff(e));
                        tables_off = true;
                        None
                    }
                    Err(e) => return Err(e),
                }
            }
            None => None,
        };
        {
            let mut config: Array<_, WalkerConfig> =
                Array::try_from(ebpf.map_mut(CONFIG_MAP).ok_or(Error::Object("CONFIG map"))?)
                    .context("cannot open the walker's configuration")?;
            let value = WalkerConfig {
                filter_pids: u32::from(b.filter),
                max_user_frames: b.max_frames,
                follow_processes: u32::from(tables.is_some()),
                ring_wakeup_bytes: ring_bytes / 4,
            };
            config.set(0, value, 0).context("cannot configure the walker")?;
        }
        for &pid in &b.pids {
            add_to_pid_filter(&mut ebpf, pid)?;
        }
        let python = match python::Python::new(&mut ebpf) {
            Ok(mut p) => {
                // Processes read before loading: looked at on the first drain.
                for (pid, text) in &known {
                    if text.contains("python") {
                        p.consider(*pid);
                    }
                }
                // Now, before sampling starts: the first samples carry Python frames too.
                p.found = p.detect_due();
                Some(p)
            }
            Err(e) => {
                notices.push(Notice::NoPython(e));
                None
            }
        };
        let ring = RingBuf::try_from(ebpf.take_map(SAMPLES_MAP).ok_or(Error::Object("SAMPLES map"))?)
            .context("cannot open the sample ring")?;
        let (walker_programs, walk_programs) = load_walker(&mut ebpf, b.kind, &mut notices)?;
        let sample_program = walker_programs[0].0;
        let mut events = Vec::new();
        // Exec and exit events (raw tracepoints: no tracefs needed), ordered with the samples
        // in the same ring. Without them processes are still followed from their samples and
        // a periodic scan.
        for (name, event) in [(EXEC_PROGRAM, "sched_process_exec"), (EXIT_PROGRAM, "sched_process_exit")] {
            let attached = (|| {
                let p = <&mut RawTracePoint>::try_from(
                    ebpf.program_mut(name).ok_or(Error::Object("event program"))?,
                )
                .context("not a raw tracepoint")?;
                p.load().map_err(|e| Error::Verifier { program: name, source: Box::new(e) })?;
                p.attach(event).context("cannot attach to the tracepoint")?;
                Ok::<_, Error>(p.info().ok().and_then(|i| i.verified_instruction_count()))
            })();
            match attached {
                Ok(n) => events.push((event, n)),
                Err(error) => notices.push(Notice::NoProcessEvents { event, error }),
            }
        }
        if tables.is_some() {
            match attach_kernel_view(&mut ebpf) {
                Ok(n) => events.extend(n),
                Err(e) => notices.push(Notice::NoKernelMappings(e)),
            }
        }
        let program = <&mut PerfEvent>::try_from(
            ebpf.program_mut(sample_program).ok_or(Error::Object("sampling program"))?,
        )
        .context("not a perf event program")?;
        let mut links = Vec::with_capacity(cpus.len());
        for &cpu in &cpus {
            let link = program
                .attach(
                    PerfEventConfig::Software(SoftwareEvent::CpuClock),
                    PerfEventScope::AllProcessesOneCpu { cpu },
                    SamplePolicy::Frequency(b.frequency),
                    true,
                )
                .map_err(|e| Error::PerfEvent { cpu, source: Box::new(e) })?;
            links.push(link);
        }
        Ok(Walker {
            ebpf,
            tables,
            known,
            recent: HashMap::new(),
            first_seen: HashMap::new(),
            exe_paths: HashMap::new(),
            new_maps: Vec::new(),
            python,
            selected: b.pids.clone(),
            ring,
            links,
            cpus: cpus.len(),
            ring_bytes,
            programs: Programs { walker: walker_programs, events },
            _walk_programs: walk_programs,
            tables_off,
            notices,
            malformed: 0,
            table_setup,
        })
    }

    /// CPython processes found and walked for Python frames, and those left out by reason.
    pub fn python_stats(&self) -> Option<&python::PythonStats> {
        self.python.as_ref().map(|p| &p.stats)
    }

    /// Online CPUs sampled.
    pub fn cpus(&self) -> usize {
        self.cpus
    }

    /// Bytes of the sample ring (sized to the CPUs and the rate: five seconds of 1 KiB
    /// records, a power of two from 256 KiB to 64 MiB).
    pub fn ring_bytes(&self) -> u32 {
        self.ring_bytes
    }

    /// The programs loaded and their verified instruction counts.
    pub fn programs(&self) -> &Programs {
        &self.programs
    }

    /// Table counters (`None` when the walker runs without tables).
    pub fn table_stats(&self) -> Option<&TableStats> {
        self.tables.as_ref().map(|t| &t.stats)
    }

    /// Whether tables were asked for but the kernel refused their map segments.
    pub fn tables_refused_by_kernel(&self) -> bool {
        self.tables_off
    }

    /// Time spent compiling (or reading from the cache) the start-up tables.
    pub fn table_setup_time(&self) -> Duration {
        self.table_setup
    }

    /// Records that did not parse.
    pub fn malformed(&self) -> u64 {
        self.malformed
    }

    /// Notices since the last call (each kind once per run).
    pub fn take_notices(&mut self) -> Vec<Notice> {
        if let Some(t) = self.tables.as_mut() {
            self.notices.append(&mut t.notices);
        }
        std::mem::take(&mut self.notices)
    }

    /// Samples `pid` too (with a pid filter) and gives it tables before its first samples.
    ///
    /// A just-spawned process may still be mapping its new image (`spawn` returns once the
    /// child is past `vfork`); this waits, up to 100 ms, for the mapping the kernel makes
    /// last, the vDSO of the new image.
    pub fn follow(&mut self, pid: u32) -> Result<()> {
        add_to_pid_filter(&mut self.ebpf, pid)?;
        self.selected.push(pid);
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
    /// mappings (a library loaded since): re-read its maps now, at most every
    /// [`REFRESH_INTERVAL`].
    fn refresh_one(&mut self, pid: u32) {
        if self.tables.is_none() || (!self.selected.is_empty() && !self.selected.contains(&pid)) {
            return;
        }
        let now = Instant::now();
        if self.recent.get(&pid).is_some_and(|t| now.duration_since(*t) < REFRESH_INTERVAL) {
            return;
        }
        self.recent.insert(pid, now);
        self.refresh(pid);
    }

    /// Re-reads `pid`'s maps and gives its new mappings tables.
    fn refresh(&mut self, pid: u32) {
        let Some(tables) = self.tables.as_mut() else { return };
        let read_ns = tables::monotonic_ns();
        let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/maps")) else { return };
        if self.known.get(&pid) == Some(&text) && !tables.lost_tables(pid) {
            return;
        }
        let maps = ProcessMaps::parse(&text);
        if let Some(py) = self.python.as_mut() {
            if text.contains("python") {
                py.consider(pid);
            }
        }
        if tables.add_process(pid, &maps, read_ns).is_ok() {
            self.known.insert(pid, text);
            self.new_maps.push((pid, Arc::new(maps)));
        } else {
            // Read again at its next sample.
            self.known.remove(&pid);
        }
    }

    /// Forgets processes that have exited (call it now and then, e.g. once a second: exit
    /// events cover most, this the rest), and gives back what programs no longer running
    /// held: files listed for the kernel's view of processes that no sample walked through
    /// for a minute are closed, tables unused for a minute freed. New processes and new
    /// mappings are picked up as their first samples arrive, so nothing here re-reads every
    /// process's maps.
    pub fn prune_exited(&mut self) {
        let alive = |p: &u32| Path::new(&format!("/proc/{p}")).exists();
        self.first_seen.retain(|p, _| alive(p));
        self.exe_paths.retain(|p, _| alive(p));
        let Some(tables) = self.tables.as_mut() else { return };
        tables.expire();
        let gone: Vec<u32> =
            self.known.keys().copied().filter(|p| !Path::new(&format!("/proc/{p}")).exists()).collect();
        for pid in gone {
            tables.remove_process(pid);
            self.known.remove(&pid);
            self.recent.remove(&pid);
        }
    }

    /// Waits up to `timeout` for records (none: no wait), then hands every record in the
    /// ring to `f`, in order, and keeps the tables in step with them (a process that exits
    /// releases its tables; one that execs, or whose samples show an unknown mapping or a
    /// table lost to eviction, has its maps re-read).
    pub fn drain(&mut self, timeout: Duration, mut f: impl FnMut(Event<'_>)) -> Result<()> {
        if !timeout.is_zero() {
            let mut fds = libc::pollfd { fd: self.ring.as_raw_fd(), events: libc::POLLIN, revents: 0 };
            let ms = timeout.as_millis().clamp(1, i32::MAX as u128) as i32;
            // SAFETY: one valid pollfd, for the duration of the call.
            let r = unsafe { libc::poll(&mut fds, 1, ms) };
            if r < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    return Err(Error::Io { what: "cannot wait for samples".into(), source: e });
                }
            }
        }
        let mut stale: Vec<u32> = Vec::new();
        let mut announced: Vec<(u32, RecordFile, String)> = Vec::new();
        while let Some(item) = self.ring.next() {
            let Ok(record) = SampleRecord::parse(&item) else {
                self.malformed += 1;
                f(Event::Malformed);
                continue;
            };
            let header = record.header;
            let pid = header.pid;
            if header.flags & FLAG_EVENT_EXIT != 0 {
                if let Some(tables) = self.tables.as_mut() {
                    tables.remove_process(pid);
                }
                self.known.remove(&pid);
                self.recent.remove(&pid);
                self.first_seen.remove(&pid);
                self.exe_paths.remove(&pid);
                if let Some(py) = self.python.as_mut() {
                    py.forget(pid);
                }
                stale.retain(|&p| p != pid);
                f(Event::Exit { pid });
                continue;
            }
            if header.flags & FLAG_EVENT_FILE != 0 {
                if let (Some(e), Some(tables)) = (record.file_event(), self.tables.as_ref()) {
                    if !tables.is_listed(&e.file.file) {
                        announced.push((pid, e.file, e.name().unwrap_or_default().to_string()));
                    }
                }
                continue;
            }
            if header.flags & FLAG_EVENT_EXEC != 0 {
                // A new program: the kernel dropped the process's entry (its mappings are
                // the old program's); the kernel's view walks it until it is read again.
                if let Some(tables) = self.tables.as_mut() {
                    tables.remove_process(pid);
                }
                self.known.remove(&pid);
                self.recent.remove(&pid);
                self.first_seen.remove(&pid);
                if let Some(py) = self.python.as_mut() {
                    py.forget(pid);
                }
                if let Some(e) = record.file_event() {
                    let name = e.name().unwrap_or_default().to_string();
                    // A Python program: looked at once its interpreter is up (retried).
                    if let Some(py) = self.python.as_mut().filter(|_| name.contains("python")) {
                        py.consider(pid);
                    }
                    if name.starts_with('/') {
                        if self.exe_paths.len() >= MAX_EXE_PATHS {
                            self.exe_paths.clear();
                        }
                        self.exe_paths.insert(pid, PathBuf::from(&name));
                    }
                    if self.tables.as_ref().is_some_and(|t| !t.is_listed(&e.file.file))
                        && e.file.file.ino != 0
                    {
                        announced.push((pid, e.file, name));
                    }
                }
                f(Event::Exec { pid, header });
                continue;
            }
            if let Some(tables) = self.tables.as_mut() {
                tables.sampled(pid);
                if header.files > 0 {
                    tables.touch(record.files.iter());
                }
                let mut unknown = !self.known.contains_key(&pid) && header.user_len > 0;
                if unknown && header.files > 0 && header.walk_end == WALK_COMPLETE {
                    // Walked whole through the kernel's view: read it only if it lives on.
                    let first = *self.first_seen.entry(pid).or_insert_with(Instant::now);
                    unknown = first.elapsed() >= PROMOTE_AFTER;
                }
                // A walk that found no table where the process lost one to eviction.
                let lost = header.walk_end != WALK_COMPLETE && tables.lost_tables(pid);
                if (unknown || lost || header.walk_end == WALK_UNKNOWN_MAPPING) && !stale.contains(&pid) {
                    stale.push(pid);
                }
            }
            f(Event::Sample(Sample { record }));
        }
        if let Some(tables) = self.tables.as_mut() {
            for (pid, file, name) in announced {
                let exe = self.exe_paths.get(&pid).map(PathBuf::as_path);
                tables.add_announced(pid, &file, &name, exe)?;
            }
        }
        for pid in stale {
            self.refresh_one(pid);
        }
        if let Some(tables) = self.tables.as_mut() {
            for object in std::mem::take(&mut tables.new_files) {
                f(Event::File { object });
            }
        }
        for (pid, maps) in std::mem::take(&mut self.new_maps) {
            f(Event::Maps { pid, maps });
        }
        if let Some(py) = self.python.as_mut() {
            for (pid, info) in py.detect_due() {
                f(Event::Python { pid, info });
            }
        }
        Ok(())
    }

    /// Stops sampling (records already in the ring can still be drained).
    pub fn detach(&mut self) {
        let Some(program) = self.ebpf.program_mut(self.programs.walker[0].0) else { return };
        let Ok(program) = <&mut PerfEvent>::try_from(program) else { return };
        for link in self.links.drain(..) {
            let _ = program.detach(link);
        }
    }

    /// (runs, total ns) of the sampling program, while kernel BPF statistics are on (see
    /// [`enable_bpf_stats`]).
    pub fn run_stats(&self) -> Option<(u64, u64)> {
        use std::os::fd::{AsFd, AsRawFd};
        let program: &PerfEvent = self.ebpf.program(self.programs.walker[0].0)?.try_into().ok()?;
        let fd = program.fd().ok()?.as_fd().as_raw_fd();
        let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).ok()?;
        let field = |name: &str| {
            info.lines().find_map(|l| l.strip_prefix(name)).and_then(|v| v.trim().parse::<u64>().ok())
        };
        Some((field("run_cnt:")?, field("run_time_ns:")?))
    }

    /// The walker's counters, summed over CPUs.
    pub fn counters(&self) -> Result<Vec<(Counter, u64)>> {
        let map: PerCpuArray<_, Counters> =
            PerCpuArray::try_from(self.ebpf.map(COUNTERS_MAP).ok_or(Error::Object("COUNTERS map"))?)
                .context("cannot open the walker's counters")?;
        let per_cpu = map.get(&0, 0).context("cannot read the walker's counters")?;
        Ok(Counter::ALL.iter().map(|&c| (c, per_cpu.iter().map(|cpu| cpu[c as usize]).sum())).collect())
    }
}

const _: () = {
    const fn send<T: Send>() {}
    send::<Walker>();
    send::<WalkerBuilder>();
};

/// Turns on the kernel's BPF run-time statistics while the guard lives (see
/// [`Walker::run_stats`]).
pub fn enable_bpf_stats() -> Result<std::os::fd::OwnedFd> {
    aya::sys::enable_stats(aya::sys::Stats::RunTime)
        .map_err(|e| Error::Io { what: "cannot enable kernel BPF statistics".into(), source: e.io_error })
}

/// Each program of the walker with its verified instructions, the sampling program first,
/// and the tail-call walker's program array when that is the walker.
type Loaded = (Vec<(&'static str, Option<u32>)>, Option<ProgramArray<aya::maps::MapData>>);

/// Loads the sampling program: the `bpf_loop` walker, or (forced, or where the kernel
/// refuses `bpf_loop`) the walker that goes on by tail calls.
fn load_walker(ebpf: &mut Ebpf, kind: WalkerKind, notices: &mut Vec<Notice>) -> Result<Loaded> {
    fn load(ebpf: &mut Ebpf, name: &'static str) -> Result<Option<u32>> {
        let program =
            <&mut PerfEvent>::try_from(ebpf.program_mut(name).ok_or(Error::Object("walker program"))?)
                .context("not a perf event")?;
        program.load().map_err(|e| Error::Verifier { program: name, source: Box::new(e) })?;
        Ok(program.info().ok().and_then(|i| i.verified_instruction_count()))
    }
    if kind != WalkerKind::TailCalls {
        match load(ebpf, SAMPLE_PROGRAM) {
            Ok(n) => return Ok((vec![(SAMPLE_PROGRAM, n)], None)),
            Err(e) if kind == WalkerKind::Loop => return Err(Error::NoBpfLoop(Box::new(e))),
            Err(e) => notices.push(Notice::TailCalls(e)),
        }
    }
    let mut counts = Vec::new();
    for name in [TABLE_TAIL_PROGRAM, FP_TAIL_PROGRAM] {
        counts.push((name, load(ebpf, name)?));
    }
    let mut slots: ProgramArray<aya::maps::MapData> =
        ProgramArray::try_from(ebpf.take_map(WALK_PROGS_MAP).ok_or(Error::Object("WALK_PROGS map"))?)
            .context("cannot open the walker's program array")?;
    for (slot, name) in [(TAIL_SLOT_TABLES, TABLE_TAIL_PROGRAM), (TAIL_SLOT_FP, FP_TAIL_PROGRAM)] {
        let program = <&PerfEvent>::try_from(ebpf.program(name).ok_or(Error::Object("tail program"))?)
            .context("not a perf event")?;
        let fd = program.fd().context("tail program not loaded")?;
        slots.set(slot, fd, 0).with_context(|| format!("cannot chain {name}"))?;
    }
    counts.insert(0, (SAMPLE_TAIL_PROGRAM, load(ebpf, SAMPLE_TAIL_PROGRAM)?));
    Ok((counts, Some(slots)))
}

/// Every process to give tables at start: the selected ones, or every process with a user
/// address space.
fn table_targets(b: &WalkerBuilder) -> Vec<u32> {
    if b.filter {
        // A process followed later gets its tables then (`Walker::follow`).
        return b.pids.clone();
    }
    let me = std::process::id();
    let mut pids: Vec<u32> = std::fs::read_dir("/proc")
        .map(|rd| rd.flatten().filter_map(|e| e.file_name().to_str()?.parse().ok()).collect())
        .unwrap_or_default();
    pids.retain(|&p| p != me && std::fs::metadata(format!("/proc/{p}/exe")).is_ok());
    pids.sort_unstable();
    pids
}

/// Lets the walker sample `pid` while its pid filter is on.
fn add_to_pid_filter(ebpf: &mut Ebpf, pid: u32) -> Result<()> {
    let mut pids: BpfHashMap<_, u32, u8> =
        BpfHashMap::try_from(ebpf.map_mut(PIDS_MAP).ok_or(Error::Object("PIDS map"))?)
            .context("cannot open the pid filter")?;
    pids.insert(pid, 1, 0).with_context(|| format!("cannot add pid {pid} to the walker's filter"))
}

/// Least and most bytes of the sample ring.
const RING_MIN_BYTES: u64 = 256 << 10;
const RING_MAX_BYTES: u64 = 64 << 20;

/// The sample ring's size for `cpus` CPUs sampled at `hz`: five seconds of 1 KiB records
/// (a 120-frame stack; most are a few hundred bytes), a power of two between 256 KiB and
/// 64 MiB. The agent drains it every 100 ms and is woken when it is a quarter full; the
/// slack is for its pauses between drains (a large table compiled, a profile symbolized),
/// and a small machine does not hold a large machine's ring.
fn ring_bytes(cpus: usize, hz: u64) -> u32 {
    let want = (cpus as u64).saturating_mul(hz).saturating_mul(5 << 10);
    want.clamp(RING_MIN_BYTES, RING_MAX_BYTES).next_power_of_two() as u32
}

/// Loading BPF and opening perf events needs CAP_BPF + CAP_PERFMON (or CAP_SYS_ADMIN).
pub fn check_privileges() -> Result<()> {
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
        Ok(())
    } else {
        Err(Error::Privileges)
    }
}

/// The running kernel's release, as `uname -r` prints it.
pub fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map_or_else(|_| "unknown".into(), |s| s.trim().to_string())
}

/// One clear error for a kernel the walker cannot run on (older than [`OLDEST_KERNEL`], or
/// without BTF), rather than a verifier log or silently incomplete stacks. Tested: 6.18
/// natively, Debian 12's 6.1 under qemu.
pub fn check_kernel(release: &str, has_btf: bool) -> Result<()> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit()).map(|p| p.parse::<u32>().ok());
    if let (Some(Some(major)), Some(Some(minor))) = (parts.next(), parts.next()) {
        if (major, minor) < OLDEST_KERNEL {
            return Err(Error::KernelTooOld { release: release.to_string() });
        }
    }
    if !has_btf {
        return Err(Error::NoBtf { release: release.to_string() });
    }
    Ok(())
}

/// Raises RLIMIT_MEMLOCK for kernels that still charge BPF maps to it (before 5.11; later
/// ones charge the memory cgroup), and the soft NOFILE limit to the hard one: the walker
/// keeps each table segment it made open, and a symbolizer each mapped file.
pub fn raise_memlock_limit() {
    let limit = libc::rlimit { rlim_cur: libc::RLIM_INFINITY, rlim_max: libc::RLIM_INFINITY };
    // SAFETY: plain syscall with a valid pointer; failure is harmless on newer kernels.
    unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &limit) };
    // SAFETY: getrlimit fills the struct; setrlimit reads it.
    unsafe {
        let mut files = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut files) == 0 && files.rlim_cur < files.rlim_max {
            files.rlim_cur = files.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &files);
        }
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
        let old = check_kernel("5.10.0-30-amd64", true).unwrap_err();
        assert!(matches!(&old, Error::KernelTooOld { release } if release == "5.10.0-30-amd64"));
        assert!(old.to_string().contains("older than 5.15"), "{old}");
        assert!(matches!(check_kernel("4.19.0", true), Err(Error::KernelTooOld { .. })));
        let no_btf = check_kernel("6.1.0", false).unwrap_err();
        assert!(matches!(no_btf, Error::NoBtf { .. }) && no_btf.to_string().contains("no BTF"));
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
}
