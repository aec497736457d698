//! The binary interface between unwound's BPF stack walker (`stackwalk-ebpf`) and the
//! userspace programs that load it and read its output. One definition, used by both sides:
//! the BPF program builds this crate `no_std`, userspace with the `user` feature (which
//! implements `aya::Pod` for the types it reads from and writes to maps).
//!
//! # What the walker produces
//!
//! For every `cpu-clock` sample of a task that passes the filter, the walker writes one
//! variable-length record to the ring buffer named [`SAMPLES_MAP`]: a [`SampleHeader`]
//! followed by `kernel_len` kernel return addresses (innermost first) and then
//! `user_len` user addresses (innermost first; the first is the interrupted pc, the others
//! are return addresses). [`SampleRecord::parse`] reads one.
//!
//! ```
//! use unwound_stackwalk_abi::{SampleHeader, SampleRecord};
//!
//! let header = SampleHeader { pid: 42, tid: 43, cpu: 1, flags: 0, kernel_len: 1, user_len: 2,
//!     comm: *b"spin\0\0\0\0\0\0\0\0\0\0\0\0", ..SampleHeader::default() };
//! let mut bytes = header.as_bytes().to_vec();
//! for frame in [0xffff_ffff_8100_0000u64, 0x401000, 0x401234] {
//!     bytes.extend_from_slice(&frame.to_ne_bytes());
//! }
//! let record = SampleRecord::parse(&bytes).unwrap();
//! assert_eq!(record.header.pid, 42);
//! assert_eq!(record.kernel, [0xffff_ffff_8100_0000]);
//! assert_eq!(record.user, [0x401000, 0x401234]);
//! assert_eq!(record.comm(), "spin");
//! ```
#![no_std]
#![warn(missing_docs)]
/// Most user frames one sample can hold (peers keep 127 to 200).
pub const MAX_USER_FRAMES: usize = 512;
/// Most kernel frames one sample can hold: the kernel's own default for
/// `kernel.perf_event_max_stack`.
pub const MAX_KERNEL_FRAMES: usize = 127;
/// Capacity of the frame area of one record.
pub const MAX_FRAMES: usize = MAX_USER_FRAMES + MAX_KERNEL_FRAMES;

/// Name of the ring buffer map that carries [`SampleHeader`] records.
pub const SAMPLES_MAP: &str = "SAMPLES";
/// Name of the per-CPU array of event counters: one entry, a [`Counters`] per CPU.
pub const COUNTERS_MAP: &str = "COUNTERS";

/// The event counters of one CPU, indexed by [`Counter`]: the one value of [`COUNTERS_MAP`].
/// One value rather than one map entry per counter, so that a sample's half-dozen increments
/// share one pointer lookup and three cache lines (at 99 Hz every sample finds them cold).
pub type Counters = [u64; COUNTER_SLOTS as usize];
/// Name of the single-entry array holding the [`WalkerConfig`].
pub const CONFIG_MAP: &str = "CONFIG";
/// Name of the hash map of process ids (`u32` → `u8`) to sample when filtering.
pub const PIDS_MAP: &str = "PIDS";
/// Name of the perf-event program that takes samples.
pub const SAMPLE_PROGRAM: &str = "on_cpu_sample";
/// The sampling program for kernels without `bpf_loop` (before 5.17): it walks
/// [`TAIL_STEPS`] frames, then continues in [`TABLE_TAIL_PROGRAM`] or [`FP_TAIL_PROGRAM`]
/// by tail calls through [`WALK_PROGS_MAP`].
pub const SAMPLE_TAIL_PROGRAM: &str = "on_cpu_sample_tail";
/// Continues a table walk for [`TAIL_STEPS`] more frames (slot [`TAIL_SLOT_TABLES`]).
pub const TABLE_TAIL_PROGRAM: &str = "walk_tables_tail";
/// Continues a frame-pointer walk for [`TAIL_STEPS`] more frames (slot [`TAIL_SLOT_FP`]).
pub const FP_TAIL_PROGRAM: &str = "walk_fp_tail";
/// Program array of the tail-call walker.
pub const WALK_PROGS_MAP: &str = "WALK_PROGS";
/// Slot of [`TABLE_TAIL_PROGRAM`] in [`WALK_PROGS_MAP`].
pub const TAIL_SLOT_TABLES: u32 = 0;
/// Slot of [`FP_TAIL_PROGRAM`] in [`WALK_PROGS_MAP`].
pub const TAIL_SLOT_FP: u32 = 1;
/// Frames walked per program of the tail-call walker: with the kernel's limit of 33 tail
/// calls, 34 programs walk up to 544 frames, more than [`MAX_USER_FRAMES`].
pub const TAIL_STEPS: u32 = 16;
/// Name of the tracepoint program on `syscalls:sys_exit_mmap`: the mapping a successful
/// `mmap` made (or grew) is looked up (`bpf_find_vma`) and, if executable, recorded in
/// [`KPROCS_MAP`] — as `perf record` learns of mappings, when they are made. The program
/// and interpreter `execve` maps are recorded by [`EXEC_PROGRAM`].
pub const MMAP_PROGRAM: &str = "on_mmap";
/// The tracepoint [`MMAP_PROGRAM`] attaches to (category, name).
pub const MMAP_TRACEPOINT: (&str, &str) = ("syscalls", "sys_exit_mmap");
/// Name of the `sched:sched_process_fork` raw tracepoint program: a new process starts
/// with its parent's entry in [`KPROCS_MAP`] (a forked child maps what its parent maps).
pub const FORK_PROGRAM: &str = "on_fork";
/// Name of the `sched:sched_process_exec` tracepoint program.
pub const EXEC_PROGRAM: &str = "on_exec";
/// Name of the `sched:sched_process_exit` tracepoint program.
pub const EXIT_PROGRAM: &str = "on_exit";
/// Raw tracepoint `hrtimer_expire_entry` (`unwound sample-cost`): a `cpu-clock` sample's
/// interrupt handler starts.
pub const SAMPLE_COST_ENTER_PROGRAM: &str = "sample_cost_enter";
/// Raw tracepoint `hrtimer_expire_exit`: adds the sample's kernel time to [`SAMPLE_COST_MAP`].
pub const SAMPLE_COST_EXIT_PROGRAM: &str = "sample_cost_exit";
/// Per-CPU `u64` slots: 0 the start time of the sample in progress, 1 total ns, 2 samples,
/// 3 the timer (`struct hrtimer *`) of the sample in progress.
pub const SAMPLE_COST_MAP: &str = "SAMPLE_COST";
/// `u64` slots: 0 the address of `perf_swevent_hrtimer`, 1 the offset of `function` in
/// `struct hrtimer`.
pub const SAMPLE_COST_TARGET_MAP: &str = "SAMPLE_COST_TARGET";
/// Capacity of [`PIDS_MAP`].
pub const MAX_PIDS: u32 = 4096;

/// `SampleHeader::flags`: the user stack had more frames than the walker's limit; the
/// outermost ones are missing.
pub const FLAG_USER_TRUNCATED: u32 = 1 << 0;
/// `SampleHeader::flags`: the task had no user registers (a kernel thread).
pub const FLAG_NO_USER: u32 = 1 << 1;
/// `SampleHeader::flags`: the sample interrupted the task in kernel mode.
pub const FLAG_IN_KERNEL: u32 = 1 << 2;
/// `SampleHeader::flags`: the kernel stack could not be taken.
pub const FLAG_KERNEL_STACK_FAILED: u32 = 1 << 3;
/// `SampleHeader::flags`: the frame-pointer walk stopped at a frame it could not read or
/// that did not move up the stack, before reaching the end of the stack.
pub const FLAG_USER_WALK_FAILED: u32 = 1 << 4;
/// `SampleHeader::flags`: not a sample but an event: the process called `execve` (a new
/// program image from this point on). No frames follow.
pub const FLAG_EVENT_EXEC: u32 = 1 << 5;
/// `SampleHeader::flags`: not a sample but an event: the process exited (its main thread
/// ended). No frames follow.
pub const FLAG_EVENT_EXIT: u32 = 1 << 6;
/// `SampleHeader::flags`: not a sample but an event: the process mapped code of a file the
/// agent has not identified (not in [`FILES_MAP`]). A [`FileEvent`] follows the header.
/// Exec events carry a [`FileEvent`] too (the new program's file and the path it was
/// executed by) where the kernel gives them.
pub const FLAG_EVENT_FILE: u32 = 1 << 7;
/// `SampleHeader::flags`: some frames were found in the kernel's view of the process
/// beyond the [`MAX_RECORD_FILES`] mappings a record carries; those frames have no file.
pub const FLAG_FILES_FULL: u32 = 1 << 8;
/// Any event flag.
pub const FLAG_EVENTS: u32 = FLAG_EVENT_EXEC | FLAG_EVENT_EXIT | FLAG_EVENT_FILE;

/// Fixed-size head of every sample record.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SampleHeader {
    /// Process id (the kernel's tgid).
    pub pid: u32,
    /// Thread id (the kernel's pid).
    pub tid: u32,
    /// CPU the sample was taken on.
    pub cpu: u32,
    /// `FLAG_*` bits.
    pub flags: u32,
    /// Kernel time of the sample, `bpf_ktime_get_ns`.
    pub time_ns: u64,
    /// Number of kernel frames that follow the header.
    pub kernel_len: u16,
    /// Number of user frames that follow the kernel frames.
    pub user_len: u16,
    /// How the user walk ended, a `WALK_*` code.
    pub walk_end: u16,
    /// Number of [`RecordFile`]s that follow the user frames: the mappings the walker
    /// found in the kernel's own view of the process (see [`KPROCS_MAP`]) for frames its
    /// per-process entry did not cover, so they can be named after the process is gone.
    pub files: u16,
    /// The thread's command name, NUL-padded.
    pub comm: [u8; 16],
    /// Number of [`PyFrameRecord`]s that follow the files: the thread's Python frames,
    /// innermost first (see [`PY_PROCS_MAP`]).
    pub py_len: u16,
    /// How the Python walk went, a `PY_*` code (0: the process is not walked for Python).
    pub py_status: u16,
    /// Always 0.
    pub pad: u32,
}

/// `SampleHeader::py_status`: the Python frames were walked to the end of the chain.
pub const PY_COMPLETE: u16 = 1;
/// The thread has no Python thread state (not a Python thread, or not yet).
pub const PY_NO_THREAD_STATE: u16 = 2;
/// A read of the interpreter's memory failed mid-chain (a frame being written, or paged
/// out): the frames before it are kept.
pub const PY_READ_FAILED: u16 = 3;
/// More than [`MAX_PY_FRAMES`] frames: the outermost ones are missing.
pub const PY_TRUNCATED: u16 = 4;

/// Most Python frames one sample holds.
pub const MAX_PY_FRAMES: usize = 256;
/// Name of the hash map tgid → [`PyProcInfo`] of the CPython processes walked for Python
/// frames (written by the agent once per process image; dropped by the kernel on exec and
/// exit).
pub const PY_PROCS_MAP: &str = "PY_PROCS";
/// Capacity of [`PY_PROCS_MAP`].
pub const MAX_PY_PROCS: u32 = 4096;
/// Marks an offset that does not exist in an interpreter version.
pub const PY_NO_OFFSET: u32 = u32::MAX;

/// One Python frame of a record: its code object, instruction pointer and the code object's
/// check value (`unwound_symbolize::python::code_checksum` of `co_firstlineno`,
/// `co_filename` and `co_qualname` as read at the sample).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PyFrameRecord {
    /// `PyCodeObject *`.
    pub code: u64,
    /// The frame's instruction pointer, with bit 0 set ([`PY_FRAME_ENTRY`]) on the last
    /// (outermost) frame that one `_PyEval_EvalFrameDefault` activation runs.
    pub instr: u64,
    /// The code object's check value.
    pub checksum: u64,
}

/// Bit 0 of [`PyFrameRecord::instr`] (instruction pointers are 2-aligned).
pub const PY_FRAME_ENTRY: u64 = 1;
/// Size of a [`PyFrameRecord`].
pub const PY_FRAME_SIZE: usize = core::mem::size_of::<PyFrameRecord>();

/// What the kernel needs to walk one CPython process's frames: the same layout as
/// `unwound_symbolize::python::PyProcInfo`, which documents each field.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[allow(missing_docs)]
pub struct PyProcInfo {
    pub runtime: u64,
    pub py_none: u64,
    pub code_type: u64,
    pub tss_slot: u64,
    pub version: u32,
    pub tss_key: u32,
    pub runtime_tss_key: u32,
    pub runtime_interpreters_head: u32,
    pub interp_threads_head: u32,
    pub tstate_next: u32,
    pub tstate_thread_id: u32,
    pub tstate_native_thread_id: u32,
    pub tstate_frame: u32,
    pub cframe_current_frame: u32,
    pub frame_code: u32,
    pub frame_previous: u32,
    pub frame_instr: u32,
    pub frame_owner: u32,
    pub frame_is_entry: u32,
    pub owner_cstack: u32,
    pub frame_read_size: u32,
    pub object_type: u32,
    pub code_firstlineno: u32,
    pub code_filename: u32,
    pub code_name: u32,
    pub code_qualname: u32,
    pub code_linetable: u32,
    pub code_adaptive: u32,
    pub unicode_length: u32,
    pub unicode_state: u32,
    pub unicode_ascii_data: u32,
    pub unicode_compact_data: u32,
    pub bytes_size: u32,
    pub bytes_data: u32,
}

const _: () = assert!(core::mem::size_of::<PyProcInfo>() == 4 * 8 + 30 * 4);

/// `SampleHeader::walk_end`: a frame-pointer walk (the process has no unwind tables loaded);
/// its completeness is not known.
pub const WALK_FRAME_POINTERS: u16 = 0;
/// The table walk reached the outermost frame: the stack is complete.
pub const WALK_COMPLETE: u16 = 1;
/// More frames than the limit; the outermost ones are missing.
pub const WALK_TRUNCATED: u16 = 2;
/// A pc had no unwind information and the frame-pointer fallback could not continue.
pub const WALK_NO_TABLE: u16 = 3;
/// The unwind rule at a pc is not supported.
pub const WALK_UNSUPPORTED: u16 = 4;
/// Reading the stack failed.
pub const WALK_MEMORY: u16 = 5;
/// A step did not move up the stack.
pub const WALK_BAD_CFA: u16 = 6;
/// A pc outside every known mapping of the process (a library loaded since the last scan).
pub const WALK_UNKNOWN_MAPPING: u16 = 7;

/// A short name for a `WALK_*` code, as the agent shows it (`[unwind: no table]`).
pub const fn walk_end_name(code: u16) -> &'static str {
    match code {
        WALK_FRAME_POINTERS => "frame pointers",
        WALK_COMPLETE => "complete",
        WALK_TRUNCATED => "truncated",
        WALK_NO_TABLE => "no table",
        WALK_UNSUPPORTED => "unsupported rule",
        WALK_MEMORY => "stack unreadable",
        WALK_BAD_CFA => "bad frame",
        WALK_UNKNOWN_MAPPING => "unknown mapping",
        _ => "?",
    }
}

/// Name of the hash map pid → [`ProcMappings`] of processes walked with tables.
pub const PROCS_MAP: &str = "PROCS";
/// Name of the array of [`TableInfo`], by table id.
pub const TABLES_MAP: &str = "TABLES";
/// Name of the array of maps that holds the page index records
/// (`unwound_unwind_tables::layout::PageEntry`), [`PAGE_SEGMENT`] to a segment.
///
/// The three shared table arrays are segmented: an outer `BPF_MAP_TYPE_ARRAY_OF_MAPS`
/// whose slots the agent fills with fixed-size inner arrays only as tables need them, so the
/// kernel memory held grows and shrinks with the tables loaded and nothing is allocated
/// ahead for tables that may never come. Value `i` is value `i % SEGMENT` of segment
/// `i / SEGMENT`; a table's run of values may cross segments.
pub const PAGES_MAP: &str = "PAGES";
/// Name of the array of maps that holds the entry chunks (`[u32; CHUNK_ENTRIES]`),
/// [`CHUNK_SEGMENT`] to a segment.
pub const CHUNKS_MAP: &str = "CHUNKS";
/// Name of the array of maps that holds the rule records
/// (`unwound_unwind_tables::layout::DictEntry`: a rule and its run, 12 bytes),
/// [`RULE_SEGMENT`] to a segment.
pub const RULES_MAP: &str = "RULES";
/// Page index records per segment of [`PAGES_MAP`] (8 bytes each: 64 KiB).
pub const PAGE_SEGMENT: u32 = 8192;
/// Chunks per segment of [`CHUNKS_MAP`] (16 KiB each: 64 KiB).
pub const CHUNK_SEGMENT: u32 = 4;
/// Rule records per segment of [`RULES_MAP`] (12 bytes, 16 as the kernel stores them:
/// 64 KiB).
pub const RULE_SEGMENT: u32 = 4096;
/// Name of the per-CPU array of one [`RuleCache`]: rules the table walker found lately,
/// by pc, so the frames every sample of a steady workload repeats skip the mapping search
/// and the table lookup (one slot read instead of five or six map reads).
pub const RULE_CACHE_MAP: &str = "RULE_CACHE";
/// Slots of [`RULE_CACHE_MAP`] per CPU (direct-mapped by pc and pid).
pub const RULE_CACHE_SLOTS: u32 = 1024;

/// One CPU's rule cache: the single value of [`RULE_CACHE_MAP`] (24 KiB). One value for
/// all slots, so that a probe costs one read of its slot, not also one of the map's
/// per-entry pointer array (a second cold cache line per frame at low sampling rates).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct RuleCache {
    /// The slots, indexed by [`rule_cache_slot`].
    pub slots: [RuleCacheSlot; RULE_CACHE_SLOTS as usize],
}

/// One slot of [`RULE_CACHE_MAP`]: the rule of `pc` in process `pid` while its mappings
/// are at `generation`. Only found rules are cached (never "no table" or "unknown
/// mapping", which the agent may fix at any time).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RuleCacheSlot {
    /// The pc looked up (a return address already made to point into its call).
    pub pc: u64,
    /// Process id (0: empty slot).
    pub pid: u32,
    /// [`ProcMappings::generation`] when the rule was found.
    pub generation: u32,
    /// The rule, as the walker's 8-byte rule.
    pub rule: u64,
}

/// The [`RULE_CACHE_MAP`] slot of `pc` in process `pid`.
#[inline(always)]
pub const fn rule_cache_slot(pid: u32, pc: u64) -> u32 {
    // Return addresses differ in their low bits; the pid spreads processes that map one
    // library at one address (fork, or the same layout) over different slots.
    let h = (pc ^ (pc >> 12) ^ ((pid as u64) << 3)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    ((h >> 40) as u32) & (RULE_CACHE_SLOTS - 1)
}

/// Most executable mappings tracked per process.
pub const MAX_MAPPINGS: usize = 256;
/// Most processes walked with tables at once.
pub const MAX_PROCS: u32 = 8192;
/// Most distinct tables loaded at once.
pub const MAX_TABLES: u32 = 8192;
/// `MappingEntry::table` when the mapping has no table (frame-pointer fallback).
pub const NO_TABLE: u32 = u32::MAX;
/// Entries per chunk value (one 16 KiB BPF map value).
pub const CHUNK_ENTRIES: usize = 4096;

/// One executable mapping of a process. A pc in `[start, end)` has file virtual address
/// `pc - bias` in the table `table`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MappingEntry {
    /// First address.
    pub start: u64,
    /// One past the last address.
    pub end: u64,
    /// pc − bias = file virtual address.
    pub bias: u64,
    /// Table id, or [`NO_TABLE`].
    pub table: u32,
    /// `MAPPING_*` bits (0: none).
    pub flags: u32,
}

/// [`MappingEntry::flags`]: the mapping (anonymous, no table) holds CPython's perf
/// trampolines (`python -X perf`, 3.12+) back to back from its start, each
/// [`PY_TRAMPOLINE_CODE`]: `sub $8,%rsp; call *%rcx; add $8,%rsp; ret`, no frame pointer,
/// no CFI. A pc at offset 4 to 9 of one (after the `sub`, before the `add` has run) has its
/// CFA at rsp + 16, anywhere else at rsp + 8; rbp is untouched.
pub const MAPPING_PY_TRAMPOLINES: u32 = 1;
/// The x86-64 code of one CPython perf trampoline (checked on 3.12 and 3.13: copies of it
/// fill the arena at this stride).
pub const PY_TRAMPOLINE_CODE: [u8; 11] = [0x48, 0x83, 0xec, 0x08, 0xff, 0xd1, 0x48, 0x83, 0xc4, 0x08, 0xc3];

/// A process's executable mappings, sorted by start.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ProcMappings {
    /// Mappings in use.
    pub count: u32,
    /// Changes (the agent's counter of writes) whenever this entry is written: rules the
    /// walker cached in [`RULE_CACHE_MAP`] under another generation are stale.
    pub generation: u32,
    /// When the agent read the mappings (`CLOCK_MONOTONIC` ns, as `bpf_ktime_get_ns`): an
    /// entry read before the process's current program image was made (its
    /// [`KernelMappings::created_ns`]) describes an older image, and is not used.
    pub read_ns: u64,
    /// The mappings, sorted by `start`.
    pub mappings: [MappingEntry; MAX_MAPPINGS],
}

/// Where one table lives in the shared arrays.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TableInfo {
    /// File virtual address of the table's page 0.
    pub base: u64,
    /// Number of pages.
    pub pages: u32,
    /// Index of page 0 in the pages array.
    pub page_start: u32,
    /// Index of the first chunk in the chunks array (page `first` counts from there).
    pub chunk_start: u32,
    /// Index of rule 0 in the rules array.
    pub rule_start: u32,
}

/// Size of [`SampleHeader`] in bytes.
pub const HEADER_SIZE: usize = core::mem::size_of::<SampleHeader>();

impl SampleHeader {
    /// The header's bytes in native order, as the walker writes them.
    pub fn as_bytes(&self) -> &[u8] {
        // SAFETY: repr(C), only integer fields and no padding (checked by the assertion
        // below), so every byte is initialised.
        unsafe { core::slice::from_raw_parts(self as *const Self as *const u8, HEADER_SIZE) }
    }
}

const _: () = assert!(HEADER_SIZE == 56);

/// Name of the hash map tgid → [`KernelMappings`]: each process's executable mappings as
/// the kernel made them, recorded by [`MMAP_PROGRAM`] (so a process is walkable from its
/// first sample, before the agent has read anything about it). Not preallocated.
pub const KPROCS_MAP: &str = "KPROCS";
/// Capacity of [`KPROCS_MAP`].
pub const MAX_KPROCS: u32 = 16384;
/// Executable mappings one [`KernelMappings`] holds.
pub const KERNEL_MAPPINGS: usize = 32;
/// Name of the hash map [`FileKey`] → [`FileTable`]: the files the agent has identified
/// (and holds open, so their inode numbers cannot be reused while listed), with their
/// tables.
pub const FILES_MAP: &str = "FILES";
/// Capacity of [`FILES_MAP`].
pub const MAX_FILES: u32 = 16384;
/// Name of the LRU hash map [`FileKey`] → last announcement time (ns): a file the agent
/// has not identified is announced ([`FLAG_EVENT_FILE`]) at most once a second.
pub const ANNOUNCED_MAP: &str = "ANNOUNCED";
/// Name of the single-entry array holding the [`KernelOffsets`].
pub const KERNEL_OFFSETS_MAP: &str = "KERNEL_OFFSETS";
/// Most [`RecordFile`]s in one record.
pub const MAX_RECORD_FILES: usize = 8;
/// Bytes of the name in a [`FileEvent`].
pub const FILE_EVENT_NAME: usize = 256;

/// `RecordFile::flags` and `KernelMapping::flags`: anonymous executable memory (no file).
pub const KMAP_ANON: u32 = 1;

/// A file as the kernel names it: the device of its superblock (the kernel's `dev_t`:
/// major << 20 | minor) and its inode number.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FileKey {
    /// `inode->i_sb->s_dev`.
    pub dev: u32,
    /// Always 0.
    pub pad: u32,
    /// `inode->i_ino`.
    pub ino: u64,
}

impl FileKey {
    /// The device as `/proc/PID/maps` prints it (`major:minor`, hex, two digits at least).
    pub fn device_text(&self) -> DeviceText {
        DeviceText(self.dev)
    }
}

/// [`FileKey::device_text`]'s `Display`.
#[derive(Clone, Copy, Debug)]
pub struct DeviceText(u32);

impl core::fmt::Display for DeviceText {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{:02x}:{:02x}", self.0 >> 20, self.0 & 0xf_ffff)
    }
}

/// What the walker needs of an identified file: its table, and how a mapping's file
/// offsets become the table's addresses.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FileTable {
    /// Table id, or [`NO_TABLE`] (identified, but nothing to walk it with).
    pub table: u32,
    /// Always 0.
    pub flags: u32,
    /// The executable load segment's `p_offset − p_vaddr`: a mapping at `start` of file
    /// offset `offset` has bias `start − offset + delta`.
    pub delta: u64,
}

/// One executable mapping as the kernel made it (see [`KPROCS_MAP`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelMapping {
    /// First address (0 with `end` 0: an empty slot).
    pub start: u64,
    /// One past the last address.
    pub end: u64,
    /// File offset of `start`.
    pub offset: u64,
    /// The file (zero for anonymous memory).
    pub file: FileKey,
    /// `KMAP_*` bits.
    pub flags: u32,
    /// Always 0.
    pub pad: u32,
}

/// A process's executable mappings as the kernel made them: the value of [`KPROCS_MAP`].
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct KernelMappings {
    /// The `mm_struct` they belong to: a process that has called `execve` since has
    /// another, and these no longer describe it.
    pub mm: u64,
    /// Slots in use (some may be empty, after an overlapping mapping replaced them).
    pub count: u32,
    /// Mappings left out because every slot was taken.
    pub overflow: u32,
    /// When the first mapping of this `mm` was recorded (`bpf_ktime_get_ns`).
    pub created_ns: u64,
    /// The mappings, in the order they were made.
    pub slots: [KernelMapping; KERNEL_MAPPINGS],
}

/// A mapping a record's frames were found in, from the kernel's view of the process: the
/// agent names those frames by file and offset, without `/proc`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RecordFile {
    /// First address.
    pub start: u64,
    /// One past the last address.
    pub end: u64,
    /// File offset of `start`.
    pub offset: u64,
    /// The file (zero for anonymous memory).
    pub file: FileKey,
    /// `KMAP_*` bits.
    pub flags: u32,
    /// Always 0.
    pub pad: u32,
}

/// Size of a [`RecordFile`] in bytes.
pub const RECORD_FILE_SIZE: usize = core::mem::size_of::<RecordFile>();
const _: () = assert!(RECORD_FILE_SIZE == 48);

/// What follows the header of a [`FLAG_EVENT_FILE`] or [`FLAG_EVENT_EXEC`] record.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct FileEvent {
    /// The mapping (for an exec: `start` and `end` 0, the program's file).
    pub file: RecordFile,
    /// NUL-terminated: the file's name (its last path component) for a mapping; the path
    /// `execve` was given for an exec.
    pub name: [u8; FILE_EVENT_NAME],
}

impl FileEvent {
    /// The name up to its first NUL, if UTF-8.
    pub fn name(&self) -> Option<&str> {
        let end = self.name.iter().position(|&b| b == 0).unwrap_or(FILE_EVENT_NAME);
        core::str::from_utf8(&self.name[..end]).ok()
    }
}

/// Byte offsets into the kernel's structures, read from its BTF by the agent (a Rust BPF
/// program has no CO-RE relocations): the single value of [`KERNEL_OFFSETS_MAP`]. The
/// kernel-side mapping view is off while `enabled` is 0.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelOffsets {
    /// Non-zero once the agent has filled the rest.
    pub enabled: u32,
    /// `task_struct.mm`.
    pub task_mm: u32,
    /// `task_struct.tgid`.
    pub task_tgid: u32,
    /// `task_struct.pid`.
    pub task_pid: u32,
    /// `task_struct.thread.fsbase` (the user `%fs` base: glibc's thread pointer).
    pub task_fsbase: u32,
    /// Always 0.
    pub pad: u32,
    /// `mm_struct.start_code` (the program's text, where `execve` mapped it).
    pub mm_start_code: u32,
    /// `vm_area_struct.vm_start`.
    pub vma_start: u32,
    /// `vm_area_struct.vm_end`.
    pub vma_end: u32,
    /// `vm_area_struct.vm_flags`.
    pub vma_flags: u32,
    /// `vm_area_struct.vm_pgoff`.
    pub vma_pgoff: u32,
    /// `vm_area_struct.vm_file`.
    pub vma_file: u32,
    /// `file.f_inode`.
    pub file_inode: u32,
    /// `file.f_path` + `path.dentry`.
    pub file_dentry: u32,
    /// `dentry.d_name` + `qstr.name`.
    pub dentry_name: u32,
    /// `inode.i_ino`.
    pub inode_ino: u32,
    /// `inode.i_sb`.
    pub inode_sb: u32,
    /// `super_block.s_dev`.
    pub sb_dev: u32,
    /// `linux_binprm.file`.
    pub binprm_file: u32,
    /// `linux_binprm.filename`.
    pub binprm_filename: u32,
}

/// The per-CPU scratch buffer a record is assembled in before it is copied to the ring
/// buffer (the 512-byte BPF stack cannot hold it).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct SampleBuffer {
    /// The record's header.
    pub header: SampleHeader,
    /// Kernel frames, then user frames, then (copied there when the record is written)
    /// its [`RecordFile`]s.
    pub frames: [u64; FRAME_AREA_WORDS],
    /// Frame-pointer walk state: the frame pointer of the next frame.
    pub walk_fp: u64,
    /// Frame-pointer walk state: index in `frames` of the next user frame.
    pub walk_index: u32,
    /// Frame-pointer walk state: user frames still allowed.
    pub walk_budget: u32,
    /// Table walk state: the frame's rip.
    pub walk_rip: u64,
    /// Table walk state: the frame's rsp.
    pub walk_rsp: u64,
    /// Table walk state: non-zero when rip is exact (not a return address).
    pub walk_exact: u32,
    /// Frames of this walk unwound by a table rule.
    pub table_frames: u32,
    /// Frames of this walk unwound by the frame-pointer fallback.
    pub fallback_frames: u32,
    /// Frames of this walk whose rule came from [`RULE_CACHE_MAP`].
    pub rule_cache_hits: u32,
    /// [`WalkerConfig::follow_processes`] of this sample's run.
    pub follow_processes: u32,
    /// Kept from sample to sample (this CPU's): when a record last woke the agent because
    /// it needs the agent (a pc outside the known mappings, a process without tables).
    pub needs_agent_woken_ns: u64,
    /// Table walk cache: id of `cached_table` (`NO_TABLE` when empty).
    pub cached_table_id: u32,
    /// Table walk cache: the mapping of the previous frame (consecutive frames are often in
    /// one object), so its lookup is skipped.
    pub cached_mapping: MappingEntry,
    /// Table walk cache: the table of `cached_mapping`.
    pub cached_table: TableInfo,
    /// Non-zero when this walk uses the unwind tables (the tail-call walker's programs
    /// need to know after the first one).
    pub table_walk: u32,
    /// The sampled process's [`ProcMappings::generation`] (table walks only): the key of
    /// its [`RULE_CACHE_MAP`] slots.
    pub generation: u32,
    /// Rule cache: the pc of the last table lookup of this walk (0: none). Recursion
    /// repeats return addresses; a repeated pc skips the lookup.
    pub last_pc: u64,
    /// Rule cache: the rule found for `last_pc`, as the walker's 8-byte rule.
    pub last_rule: u64,
    /// Stack window: user address of `stack_window[0]`.
    pub window_base: u64,
    /// Stack window: bytes it holds (0: none). The window runs from `window_base` to the
    /// end of that address's page.
    pub window_len: u64,
    /// Stack window: a copy of part of one user stack page. One helper call copies it; the
    /// frames in it are then read from here, not one helper call each.
    pub stack_window: [u64; STACK_WINDOW_WORDS],
    /// The sampled task's `mm_struct` (0: not read, or the kernel view is off).
    pub mm: u64,
    /// Non-zero when the process's [`KPROCS_MAP`] entry describes this `mm`.
    pub kernel_maps: u32,
    /// Non-zero when the mapping in `cached_mapping` came from the kernel's view: rules
    /// found through it are not cached across samples.
    pub cached_from_kernel: u32,
    /// The mappings this walk found in the kernel's view (`header.files` of them).
    pub files: [RecordFile; MAX_RECORD_FILES],
    /// The walker's entry for each of `files`.
    pub file_entries: [MappingEntry; MAX_RECORD_FILES],
    /// Python walk: the next frame's address (0: done).
    pub py_frame: u64,
    /// Python walk: index in `frames` of the first Python frame's first word.
    pub py_base: u32,
    /// Always 0.
    pub py_pad: u32,
}

/// Words of [`SampleBuffer::frames`]: the frames, and room for the record's files.
pub const FRAME_AREA_WORDS: usize =
    MAX_FRAMES + MAX_RECORD_FILES * RECORD_FILE_SIZE / 8 + MAX_PY_FRAMES * PY_FRAME_SIZE / 8;

/// Most bytes in the walker's stack window: one page, so a window that ends at a page
/// boundary never crosses the end of a mapping (a read that did would fail whole).
pub const STACK_WINDOW_BYTES: u64 = 4096;
/// [`STACK_WINDOW_BYTES`] in 8-byte words.
pub const STACK_WINDOW_WORDS: usize = (STACK_WINDOW_BYTES / 8) as usize;

/// Walker configuration, written by userspace into [`CONFIG_MAP`] before attaching.
///
/// Kept in a map rather than in `.rodata` globals: a constant loop bound makes the
/// verifier track exact values and explodes verification.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WalkerConfig {
    /// Non-zero: sample only the processes in [`PIDS_MAP`].
    pub filter_pids: u32,
    /// Most user frames to walk, at most [`MAX_USER_FRAMES`].
    pub max_user_frames: u32,
    /// Non-zero: the agent gives processes tables as they appear, so a sample of a process
    /// without tables (or of a pc outside its known mappings) wakes it early.
    pub follow_processes: u32,
    /// Bytes waiting in [`SAMPLES_MAP`] at which a record wakes the agent (it sizes the
    /// ring at load and sets a quarter of it); 0: [`DEFAULT_RING_BYTES`] / 4.
    pub ring_wakeup_bytes: u32,
}

/// Size of [`SAMPLES_MAP`] in the BPF object; the agent sizes the ring to the CPUs and
/// the sampling rate before loading.
pub const DEFAULT_RING_BYTES: u32 = 4 << 20;

/// Indices of the per-CPU event counters in [`COUNTERS_MAP`].
///
/// Every sample that fires increments `Samples`; every sample that does not reach
/// userspace increments exactly one `Dropped*` counter or `Idle`/`Filtered`.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Counter {
    /// The program ran.
    Samples = 0,
    /// The CPU was idle (pid 0): not a drop, nothing to profile.
    Idle,
    /// The task is not one of the selected processes.
    Filtered,
    /// Record written to the ring buffer.
    Emitted,
    /// Dropped: the ring buffer was full (userspace too slow).
    DroppedRingFull,
    /// Dropped: the per-CPU scratch buffer or configuration could not be read.
    DroppedNoScratch,
    /// Kept, but the user stack was cut at the frame limit.
    UserTruncated,
    /// Kept, but the frame-pointer walk stopped early (unreadable or non-ascending frame).
    UserWalkFailed,
    /// Kept, but the kernel stack could not be taken.
    KernelStackFailed,
    /// Kept, a kernel thread: kernel stack only.
    KernelThread,
    /// User walks done with unwind tables.
    TableWalks,
    /// Table walks that reached the outermost frame.
    TableWalkComplete,
    /// Table walks ended at a pc without unwind information (and no frame pointer).
    TableWalkNoTable,
    /// Table walks ended at an unsupported rule.
    TableWalkUnsupported,
    /// Table walks ended at an unreadable stack.
    TableWalkMemory,
    /// Table walks ended at a frame that did not move up the stack.
    TableWalkBadCfa,
    /// Table walks ended at a pc outside every known mapping.
    TableWalkUnknownMapping,
    /// Frames unwound by a table rule.
    TableFrames,
    /// Frames unwound by the frame-pointer fallback inside a table walk.
    FallbackFrames,
    /// Frames whose rule came from the per-CPU rule cache ([`RULE_CACHE_MAP`]).
    RuleCacheHits,
    /// Walks of a process the agent has not given an entry in [`PROCS_MAP`], through the
    /// kernel's view of its mappings ([`KPROCS_MAP`]).
    KernelMapWalks,
    /// Frames found in the kernel's view of a process's mappings.
    KernelMapFrames,
    /// Of those, frames in a file the agent has no table for yet (or none at all): a
    /// frame-pointer step.
    KernelMapNoTable,
    /// Samples of a process with neither entry: walked by frame pointers.
    NoMappings,
    /// Executable mappings left out of [`KPROCS_MAP`]: its process had every slot taken.
    KernelMapOverflow,
    /// Processes left out of [`KPROCS_MAP`]: it was full.
    KernelProcsFull,
    /// Files announced to the agent ([`FLAG_EVENT_FILE`]).
    FilesAnnounced,
    /// Records whose frames spanned more than [`MAX_RECORD_FILES`] kernel-found mappings.
    RecordFilesFull,
}

/// Number of [`Counter`] slots.
pub const COUNTER_SLOTS: u32 = 28;

impl Counter {
    /// Every counter, in index order.
    pub const ALL: [Counter; COUNTER_SLOTS as usize] = [
        Counter::Samples,
        Counter::Idle,
        Counter::Filtered,
        Counter::Emitted,
        Counter::DroppedRingFull,
        Counter::DroppedNoScratch,
        Counter::UserTruncated,
        Counter::UserWalkFailed,
        Counter::KernelStackFailed,
        Counter::KernelThread,
        Counter::TableWalks,
        Counter::TableWalkComplete,
        Counter::TableWalkNoTable,
        Counter::TableWalkUnsupported,
        Counter::TableWalkMemory,
        Counter::TableWalkBadCfa,
        Counter::TableWalkUnknownMapping,
        Counter::TableFrames,
        Counter::FallbackFrames,
        Counter::RuleCacheHits,
        Counter::KernelMapWalks,
        Counter::KernelMapFrames,
        Counter::KernelMapNoTable,
        Counter::NoMappings,
        Counter::KernelMapOverflow,
        Counter::KernelProcsFull,
        Counter::FilesAnnounced,
        Counter::RecordFilesFull,
    ];

    /// A short stable name, for summaries and JSON.
    pub const fn name(self) -> &'static str {
        match self {
            Counter::Samples => "samples",
            Counter::Idle => "idle",
            Counter::Filtered => "filtered",
            Counter::Emitted => "emitted",
            Counter::DroppedRingFull => "dropped_ring_full",
            Counter::DroppedNoScratch => "dropped_no_scratch",
            Counter::UserTruncated => "user_truncated",
            Counter::UserWalkFailed => "user_walk_failed",
            Counter::KernelStackFailed => "kernel_stack_failed",
            Counter::KernelThread => "kernel_thread",
            Counter::TableWalks => "table_walks",
            Counter::TableWalkComplete => "table_walk_complete",
            Counter::TableWalkNoTable => "table_walk_no_table",
            Counter::TableWalkUnsupported => "table_walk_unsupported",
            Counter::TableWalkMemory => "table_walk_memory",
            Counter::TableWalkBadCfa => "table_walk_bad_cfa",
            Counter::TableWalkUnknownMapping => "table_walk_unknown_mapping",
            Counter::TableFrames => "table_frames",
            Counter::FallbackFrames => "fallback_frames",
            Counter::RuleCacheHits => "rule_cache_hits",
            Counter::KernelMapWalks => "kernel_map_walks",
            Counter::KernelMapFrames => "kernel_map_frames",
            Counter::KernelMapNoTable => "kernel_map_no_table",
            Counter::NoMappings => "no_mappings",
            Counter::KernelMapOverflow => "kernel_map_overflow",
            Counter::KernelProcsFull => "kernel_procs_full",
            Counter::FilesAnnounced => "files_announced",
            Counter::RecordFilesFull => "record_files_full",
        }
    }

    /// True for the counters that mean a sample was lost.
    pub const fn is_drop(self) -> bool {
        matches!(self, Counter::DroppedRingFull | Counter::DroppedNoScratch)
    }
}

/// Why a byte slice is not a sample record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecordError {
    /// Shorter than a header.
    Short,
    /// The header promises more frames than the slice holds or than a record may have.
    BadLength,
}

/// One sample record read back from the ring buffer.
#[derive(Clone, Copy, Debug)]
pub struct SampleRecord<'a> {
    /// The header.
    pub header: SampleHeader,
    /// Kernel frames, innermost first (raw native-endian `u64`s).
    pub kernel: Frames<'a>,
    /// User frames, innermost first.
    pub user: Frames<'a>,
    /// The mappings some user frames were found in (see [`SampleHeader::files`]).
    pub files: Files<'a>,
    /// The thread's Python frames, innermost first (see [`SampleHeader::py_len`]).
    pub python: PyFrames<'a>,
    /// What follows an event's header (a [`FileEvent`] for file and exec events); empty
    /// for samples.
    pub payload: &'a [u8],
}

/// The [`PyFrameRecord`]s of a record.
#[derive(Clone, Copy, Debug)]
pub struct PyFrames<'a>(&'a [u8]);

impl<'a> PyFrames<'a> {
    /// Number of frames.
    pub fn len(&self) -> usize {
        self.0.len() / PY_FRAME_SIZE
    }
    /// True when there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    /// The frames, innermost first.
    pub fn iter(&self) -> impl Iterator<Item = PyFrameRecord> + 'a {
        self.0.chunks_exact(PY_FRAME_SIZE).map(|c| {
            // SAFETY: PY_FRAME_SIZE bytes; PyFrameRecord is plain integers.
            unsafe { core::ptr::read_unaligned(c.as_ptr() as *const PyFrameRecord) }
        })
    }
}

/// The [`RecordFile`]s of a record.
#[derive(Clone, Copy, Debug)]
pub struct Files<'a>(&'a [u8]);

impl<'a> Files<'a> {
    /// Number of files.
    pub fn len(&self) -> usize {
        self.0.len() / RECORD_FILE_SIZE
    }
    /// True when there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    /// The files, in the order the walk met them.
    pub fn iter(&self) -> impl Iterator<Item = RecordFile> + 'a {
        self.0.chunks_exact(RECORD_FILE_SIZE).map(|c| {
            // SAFETY: RECORD_FILE_SIZE bytes; RecordFile is plain integers.
            unsafe { core::ptr::read_unaligned(c.as_ptr() as *const RecordFile) }
        })
    }
}

/// A run of native-endian `u64` frame addresses inside a record.
#[derive(Clone, Copy, Debug)]
pub struct Frames<'a>(&'a [u8]);

impl<'a> Frames<'a> {
    /// Number of frames.
    pub fn len(&self) -> usize {
        self.0.len() / 8
    }
    /// True when there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    /// The addresses, innermost first.
    pub fn iter(&self) -> impl Iterator<Item = u64> + 'a {
        self.0.chunks_exact(8).map(|c| u64::from_ne_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
    }
}

impl<const N: usize> PartialEq<[u64; N]> for Frames<'_> {
    fn eq(&self, other: &[u64; N]) -> bool {
        self.len() == N && self.iter().zip(other.iter()).all(|(a, b)| a == *b)
    }
}

impl<'a> SampleRecord<'a> {
    /// Reads a record, checking every length against the slice and the format's limits.
    pub fn parse(bytes: &'a [u8]) -> Result<Self, RecordError> {
        if bytes.len() < HEADER_SIZE {
            return Err(RecordError::Short);
        }
        // SAFETY: length checked; SampleHeader is plain integers, any bit pattern is valid.
        let header: SampleHeader =
            unsafe { core::ptr::read_unaligned(bytes.as_ptr() as *const SampleHeader) };
        let k = header.kernel_len as usize;
        let u = header.user_len as usize;
        let f = header.files as usize;
        let frames_end = HEADER_SIZE + (k + u) * 8;
        let files_end = frames_end + f * RECORD_FILE_SIZE;
        let py = header.py_len as usize;
        let py_end = files_end + py * PY_FRAME_SIZE;
        if k > MAX_KERNEL_FRAMES
            || u > MAX_USER_FRAMES
            || f > MAX_RECORD_FILES
            || py > MAX_PY_FRAMES
            || bytes.len() < py_end
        {
            return Err(RecordError::BadLength);
        }
        let kernel = &bytes[HEADER_SIZE..HEADER_SIZE + k * 8];
        let user = &bytes[HEADER_SIZE + k * 8..frames_end];
        let files = &bytes[frames_end..files_end];
        let python = PyFrames(&bytes[files_end..py_end]);
        let payload = if header.flags & FLAG_EVENTS != 0 { &bytes[py_end..] } else { &[][..] };
        Ok(SampleRecord {
            header,
            kernel: Frames(kernel),
            user: Frames(user),
            files: Files(files),
            python,
            payload,
        })
    }

    /// The [`FileEvent`] of a file or exec event, when the record carries one.
    pub fn file_event(&self) -> Option<FileEvent> {
        if self.header.flags & (FLAG_EVENT_FILE | FLAG_EVENT_EXEC) == 0
            || self.payload.len() < core::mem::size_of::<FileEvent>()
        {
            return None;
        }
        // SAFETY: length checked; FileEvent is plain integers and bytes.
        Some(unsafe { core::ptr::read_unaligned(self.payload.as_ptr() as *const FileEvent) })
    }

    /// The command name up to its first NUL (lossy for non-UTF-8 bytes: `?`).
    pub fn comm(&self) -> &str {
        let end = self.header.comm.iter().position(|&b| b == 0).unwrap_or(16);
        core::str::from_utf8(&self.header.comm[..end]).unwrap_or("?")
    }
}

#[cfg(feature = "user")]
// SAFETY: repr(C) plain integers without padding.
unsafe impl aya::Pod for WalkerConfig {}
#[cfg(feature = "user")]
// SAFETY: repr(C) plain integers without padding.
unsafe impl aya::Pod for ProcMappings {}
#[cfg(feature = "user")]
// SAFETY: repr(C) plain integers without padding.
unsafe impl aya::Pod for TableInfo {}
#[cfg(feature = "user")]
// SAFETY: repr(C) plain integers without padding.
unsafe impl aya::Pod for FileKey {}
#[cfg(feature = "user")]
// SAFETY: repr(C) plain integers without padding.
unsafe impl aya::Pod for FileTable {}
#[cfg(feature = "user")]
// SAFETY: repr(C) plain integers without padding.
unsafe impl aya::Pod for KernelOffsets {}
#[cfg(feature = "user")]
// SAFETY: repr(C) plain integers without padding.
unsafe impl aya::Pod for KernelMappings {}
#[cfg(feature = "user")]
// SAFETY: repr(C) plain integers without padding.
unsafe impl aya::Pod for PyProcInfo {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_lengths_beyond_the_slice() {
        let h = SampleHeader { user_len: 3, ..Default::default() };
        let mut b = [0u8; HEADER_SIZE + 16];
        b[..HEADER_SIZE].copy_from_slice(h.as_bytes());
        assert_eq!(SampleRecord::parse(&b).unwrap_err(), RecordError::BadLength);
        assert_eq!(SampleRecord::parse(&b[..10]).unwrap_err(), RecordError::Short);
    }

    #[test]
    fn rejects_lengths_beyond_the_format() {
        let h = SampleHeader { kernel_len: MAX_KERNEL_FRAMES as u16 + 1, ..Default::default() };
        let mut b = [0u8; HEADER_SIZE + 8 * 200];
        b[..HEADER_SIZE].copy_from_slice(h.as_bytes());
        assert_eq!(SampleRecord::parse(&b).unwrap_err(), RecordError::BadLength);
    }

    #[test]
    fn counter_indices_match_all() {
        for (i, c) in Counter::ALL.iter().enumerate() {
            assert_eq!(*c as usize, i);
        }
    }
}
