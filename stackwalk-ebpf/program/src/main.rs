//! unwound's in-kernel stack walker.
//!
//! Attached to a `cpu-clock` software perf event on every online CPU. For each sample of a
//! selected task it takes the kernel stack, the task's *user* registers (from the task's
//! saved `pt_regs` when the sample interrupted it in kernel mode) and walks the user stack
//! (unwind tables, or frame pointers) in a bounded `bpf_loop`, then copies one
//! variable-length record to a ring buffer. Kernels without `bpf_loop` (before 5.17) get
//! `on_cpu_sample_tail` instead: 16 steps per program, the walk carried on by tail calls
//! (state in the per-CPU buffer), the record written by the program that ends the walk.
//!
//! Why a ring buffer of samples rather than counts aggregated in a map: a map keyed by
//! stack needs a fixed, preallocated worst case of distinct stacks and loses samples (or
//! wipes state) when it fills; a ring buffer only loses samples while userspace is behind,
//! each loss is counted, and records carry the pid, thread, CPU and time. Records are only
//! as long as the stack they carry (`bpf_ringbuf_output` with the used length), so a
//! 20-frame sample costs ~210 bytes, not the 3 KiB capacity. At 99 Hz per CPU that is a
//! few tens of KiB per second per CPU for the agent to fold.
//!
//! The record layout, the counters and the configuration live in `unwound-stackwalk-abi`.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::pt_regs,
    btf_maps::{Array as BtfArray, ArrayOfMaps},
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_task_btf, bpf_get_smp_processor_id,
        bpf_get_stack, bpf_ktime_get_ns, bpf_loop, bpf_probe_read_kernel, bpf_probe_read_kernel_str_bytes,
        bpf_probe_read_user, bpf_task_pt_regs,
    },
    macros::{btf_map, map, perf_event, raw_tracepoint, tracepoint},
    maps::{Array, HashMap, LruHashMap, PerCpuArray, ProgramArray, RingBuf},
    programs::{PerfEventContext, RawTracePointContext, TracePointContext},
    EbpfContext,
};
use unwound_stackwalk_abi::{
    rule_cache_slot, Counter, Counters, FileEvent, FileKey, FileTable, KernelMappings, KernelOffsets,
    MappingEntry, ProcMappings, PyProcInfo, RecordFile, RuleCache, SampleBuffer, SampleHeader, TableInfo,
    WalkerConfig, CHUNK_ENTRIES, CHUNK_SEGMENT, DEFAULT_RING_BYTES, FLAG_EVENT_EXEC, FLAG_EVENT_EXIT,
    FLAG_EVENT_FILE, FLAG_FILES_FULL, FLAG_IN_KERNEL, FLAG_KERNEL_STACK_FAILED, FLAG_NO_USER,
    FLAG_USER_TRUNCATED, FLAG_USER_WALK_FAILED, FRAME_AREA_WORDS, HEADER_SIZE, KERNEL_MAPPINGS, KMAP_ANON,
    MAPPING_PY_TRAMPOLINES, MAX_FILES, MAX_FRAMES, MAX_KERNEL_FRAMES, MAX_KPROCS, MAX_MAPPINGS, MAX_PIDS,
    MAX_PROCS, MAX_PY_FRAMES, MAX_PY_PROCS, MAX_RECORD_FILES, MAX_TABLES, MAX_USER_FRAMES, NO_TABLE,
    PAGE_SEGMENT, PY_COMPLETE, PY_FRAME_ENTRY, PY_FRAME_SIZE, PY_NO_OFFSET, PY_NO_THREAD_STATE,
    PY_READ_FAILED, PY_TRAMPOLINE_CODE, PY_TRUNCATED, RECORD_FILE_SIZE, RULE_CACHE_SLOTS, RULE_SEGMENT,
    STACK_WINDOW_BYTES, STACK_WINDOW_WORDS, TAIL_SLOT_FP, TAIL_SLOT_TABLES, TAIL_STEPS, WALK_BAD_CFA,
    WALK_COMPLETE, WALK_FRAME_POINTERS, WALK_MEMORY, WALK_NO_TABLE, WALK_TRUNCATED, WALK_UNKNOWN_MAPPING,
    WALK_UNSUPPORTED,
};
use unwound_unwind_tables::layout::{
    step, CfaKind, DictEntry, Entry, Memory, PageEntry, RbpKind, Registers, Step, StepError, UnwindRule,
    PAGE_SHIFT, PAGE_SIZE,
};

/// Sized by the agent at load to its CPUs and sampling rate (the size here is a default);
/// the agent drains it every 100 ms, and is woken early only when it is a quarter full.
#[map]
static SAMPLES: RingBuf = RingBuf::with_byte_size(DEFAULT_RING_BYTES, 0);

#[map]
static COUNTERS: PerCpuArray<Counters> = PerCpuArray::with_max_entries(1, 0);

#[map]
static CONFIG: Array<WalkerConfig> = Array::with_max_entries(1, 0);

#[map]
static PIDS: HashMap<u32, u8> = HashMap::with_max_entries(MAX_PIDS, 0);

#[map]
static SCRATCH: PerCpuArray<SampleBuffer> = PerCpuArray::with_max_entries(1, 0);

/// pid → executable mappings, for processes walked with unwind tables. Not preallocated.
#[map]
static PROCS: HashMap<u32, ProcMappings> = HashMap::with_max_entries(MAX_PROCS, BPF_F_NO_PREALLOC);

/// Rules found lately, per CPU (see `RULE_CACHE_MAP`): a steady workload's samples repeat
/// the same return addresses, and a slot read costs one cache line where the mapping search
/// and the table lookup touch five or six, cold at low sampling rates.
#[map]
static RULE_CACHE: PerCpuArray<RuleCache> = PerCpuArray::with_max_entries(1, 0);

#[map]
static TABLES: Array<TableInfo> = Array::with_max_entries(MAX_TABLES, 0);

/// The shared table arrays, in segments the agent creates as tables need them (see
/// `PAGES_MAP`); it sizes the outer arrays to its memory budget before loading (the 1s
/// here are placeholders).
///
/// Their values are declared to BTF as arrays of `u32`, not as the structs they hold
/// ([`PageEntry`], [`DictEntry`]): the agent creates each segment without BTF, and kernels
/// 5.15 to 6.1 admit a segment into an outer array only if its `timer_off` equals the
/// template's, which is -EINVAL without BTF or for an array value type but -ENOENT for a
/// struct value type without a `bpf_timer` (6.2 compares field records instead, both
/// empty). With a struct here every segment of PAGES and RULES was refused on Debian 12's
/// 6.1 kernel (`bpf_map_update_elem`: EINVAL), and no table reached the walker.
#[btf_map]
static PAGES: ArrayOfMaps<BtfArray<PageWords, { PAGE_SEGMENT as usize }>, 1> = ArrayOfMaps::new();
#[btf_map]
static CHUNKS: ArrayOfMaps<BtfArray<[u32; CHUNK_ENTRIES], { CHUNK_SEGMENT as usize }>, 1> =
    ArrayOfMaps::new();
#[btf_map]
static RULES: ArrayOfMaps<BtfArray<DictWords, { RULE_SEGMENT as usize }>, 1> = ArrayOfMaps::new();

/// A [`PageEntry`]'s bytes, as PAGES declares them.
type PageWords = [u32; 2];
/// A [`DictEntry`]'s bytes, as RULES declares them.
type DictWords = [u32; 3];
const _: () = assert!(core::mem::size_of::<PageWords>() == core::mem::size_of::<PageEntry>());
const _: () = assert!(core::mem::size_of::<DictWords>() == core::mem::size_of::<DictEntry>());
const _: () = assert!(core::mem::align_of::<DictEntry>() <= core::mem::align_of::<DictWords>());

/// The [`PageEntry`] in a PAGES value (`first`, then `count` and `start_rule` in the
/// second word's low and high halves: the struct's little-endian layout).
#[inline(always)]
fn page_entry(w: &PageWords) -> PageEntry {
    PageEntry { first: w[0], count: w[1] as u16, start_rule: (w[1] >> 16) as u16 }
}

/// tgid → the process's executable mappings as the kernel made them (see `on_mmap`).
#[map]
static KPROCS: HashMap<u32, KernelMappings> = HashMap::with_max_entries(MAX_KPROCS, BPF_F_NO_PREALLOC);

/// The files the agent has identified, with their tables (it holds each open while listed).
#[map]
static FILES: HashMap<FileKey, FileTable> = HashMap::with_max_entries(MAX_FILES, BPF_F_NO_PREALLOC);

/// Files announced lately (at most once a second each).
#[map]
static ANNOUNCED: LruHashMap<FileKey, u64> = LruHashMap::with_max_entries(4096, 0);

#[map]
static KERNEL_OFFSETS: Array<KernelOffsets> = Array::with_max_entries(1, 0);

/// Per-CPU room to build a new `KPROCS` value (too big for the BPF stack).
#[map]
static KSCRATCH: PerCpuArray<KernelMappings> = PerCpuArray::with_max_entries(1, 0);

/// tgid → how to walk its Python frames (CPython processes only; written by the agent).
#[map]
static PY_PROCS: HashMap<u32, PyProcInfo> = HashMap::with_max_entries(MAX_PY_PROCS, BPF_F_NO_PREALLOC);

/// An event record with a [`FileEvent`], built per CPU.
#[repr(C)]
struct FileEventRecord {
    header: SampleHeader,
    event: FileEvent,
}

#[map]
static EVENT_SCRATCH: PerCpuArray<FileEventRecord> = PerCpuArray::with_max_entries(1, 0);

/// The tail-call walker's continuation programs (kernels without `bpf_loop`).
#[map]
static WALK_PROGS: ProgramArray = ProgramArray::with_max_entries(2, 0);

const BPF_F_NO_PREALLOC: u32 = 1;
const BPF_RB_NO_WAKEUP: u64 = 1;
const BPF_RB_FORCE_WAKEUP: u64 = 2;
const BPF_RB_AVAIL_DATA: u64 = 0;
/// Least time between two wakeups of the agent for records it must act on, per CPU.
const NEEDS_AGENT_WAKE_NS: u64 = 10_000_000;

const RECORD_CAPACITY: usize = HEADER_SIZE + FRAME_AREA_WORDS * 8;
/// `VM_EXEC` of `vm_area_struct.vm_flags`.
const VM_EXEC: u64 = 0x4;
const PAGE_SHIFT_BITS: u64 = 12;
const ANNOUNCE_INTERVAL_NS: u64 = 1_000_000_000;
/// `mmap_region` returns an address, or `-errno` (the top 4095 values).
const MAX_ERRNO_ADDRESS: u64 = u64::MAX - 4095;

/// A `T` at kernel address `base + offset`, or zero when it cannot be read.
#[inline(always)]
unsafe fn kread<T: Copy + Default>(base: u64, offset: u32) -> T {
    if base == 0 {
        return T::default();
    }
    bpf_probe_read_kernel((base + u64::from(offset)) as *const T).unwrap_or_default()
}

/// The kernel's offsets, once the agent has filled them.
#[inline(always)]
fn offsets() -> Option<&'static KernelOffsets> {
    KERNEL_OFFSETS.get(0).filter(|o| o.enabled != 0)
}

/// The file of `file` (a `struct file *`), as the kernel names it.
#[inline(always)]
unsafe fn file_key(o: &KernelOffsets, file: u64) -> FileKey {
    let inode: u64 = kread(file, o.file_inode);
    let sb: u64 = kread(inode, o.inode_sb);
    FileKey { dev: kread(sb, o.sb_dev), pad: 0, ino: kread(inode, o.inode_ino) }
}

/// The current task's `mm_struct`.
#[inline(always)]
unsafe fn current_mm(o: &KernelOffsets) -> u64 {
    kread(aya_ebpf::helpers::generated::bpf_get_current_task(), o.task_mm)
}

#[inline(always)]
fn count(counter: Counter) {
    add(counter, 1);
}

#[inline(always)]
fn add(counter: Counter, n: u64) {
    if let Some(counters) = COUNTERS.get_ptr_mut(0) {
        // SAFETY: this CPU's counters; perf-event programs do not nest on one CPU. The
        // index is a constant below COUNTER_SLOTS.
        unsafe { (*counters)[counter as usize] += n };
    }
}

#[inline(always)]
fn is_user_mode(regs: &pt_regs) -> bool {
    regs.cs & 3 == 3
}

/// The interrupted task's user (rip, rsp, rbp), and whether the sample hit kernel mode.
#[inline(always)]
unsafe fn user_registers(ctx: &PerfEventContext) -> (Option<(u64, u64, u64)>, bool) {
    let regs = &(*ctx.ctx).regs;
    if is_user_mode(regs) {
        return (Some((regs.rip, regs.rsp, regs.rbp)), false);
    }
    let task = bpf_get_current_task_btf();
    if task.is_null() {
        return (None, true);
    }
    let saved = bpf_task_pt_regs(task) as *const pt_regs;
    if saved.is_null() {
        return (None, true);
    }
    match bpf_probe_read_kernel(saved) {
        // A kernel thread's saved frame is not a user-mode frame.
        Ok(r) if is_user_mode(&r) && r.rip != 0 => (Some((r.rip, r.rsp, r.rbp)), true),
        _ => (None, true),
    }
}

/// One frame-pointer step, called by `bpf_loop`. Returns 1 to stop.
unsafe extern "C" fn frame_pointer_step(_index: u64, _ctx: *mut core::ffi::c_void) -> i64 {
    let Some(buf) = SCRATCH.get_ptr_mut(0) else { return 1 };
    let buf = &mut *buf;
    let mut mem =
        UserMemory { base: &mut buf.window_base, len: &mut buf.window_len, window: &mut buf.stack_window };
    let fp = buf.walk_fp;
    if fp == 0 {
        return 1;
    }
    if buf.walk_budget == 0 {
        buf.header.flags |= FLAG_USER_TRUNCATED;
        return 1;
    }
    if fp & 7 != 0 {
        buf.header.flags |= FLAG_USER_WALK_FAILED;
        return 1;
    }
    // [fp] = caller's frame pointer, [fp + 8] = return address.
    let Some(record) = mem.read_u64_pair(fp) else {
        buf.header.flags |= FLAG_USER_WALK_FAILED;
        return 1;
    };
    let (next, ret) = (record[0], record[1]);
    if ret == 0 {
        return 1;
    }
    let index = buf.walk_index as usize;
    if index >= MAX_FRAMES {
        buf.header.flags |= FLAG_USER_TRUNCATED;
        return 1;
    }
    buf.frames[index] = ret;
    buf.walk_index += 1;
    buf.walk_budget -= 1;
    buf.header.user_len += 1;
    if next == 0 {
        return 1;
    }
    // Frames live at higher addresses than their callees; anything else is not a chain.
    if next <= fp {
        buf.header.flags |= FLAG_USER_WALK_FAILED;
        return 1;
    }
    buf.walk_fp = next;
    0
}

/// Reads the sampled process's stack for the shared step rule, through the per-CPU stack
/// window: the first read in a page copies the page from that address's cache line to its
/// end (one helper call, about as dear as an 8-byte read), and the frames in it are read
/// from the copy. A word that is not 8-aligned is read directly; a page that cannot be
/// copied is a failed read.
struct UserMemory<'a> {
    base: &'a mut u64,
    len: &'a mut u64,
    window: &'a mut [u64; STACK_WINDOW_WORDS],
}

impl UserMemory<'_> {
    /// The word at 8-aligned `addr`, from the window, refilled first when it does not hold
    /// `addr`: with `addr`'s page from `addr`'s cache line to the page's end (the stack
    /// below `addr` is not needed; callers' frames are above).
    #[inline(always)]
    fn windowed(&mut self, addr: u64) -> Option<u64> {
        let mut off = addr.wrapping_sub(*self.base);
        if off >= *self.len {
            if !self.refill(addr) {
                return None;
            }
            off = addr.wrapping_sub(*self.base);
        }
        self.window.get(((off >> 3) as usize) & (STACK_WINDOW_WORDS - 1)).copied()
    }

    /// Copies `addr`'s page into the window, from `addr`'s cache line; false (and an empty
    /// window) when it cannot be read.
    // Not inlined: a subprogram of its own keeps the helper call (which clobbers r1-r5)
    // out of the callers' register allocation; inlined into the table step, LLVM stored a
    // clobbered register on the failed-refill path (the verifier refused it). Reads from
    // the window stay inline: the call is paid once per page, not per frame.
    #[inline(never)]
    fn refill(&mut self, addr: u64) -> bool {
        let start = addr & !63;
        // 64..=4096 bytes, and visibly so to the verifier.
        let len = STACK_WINDOW_BYTES - (start & (STACK_WINDOW_BYTES - 1));
        // SAFETY: the destination is the window, at least `len` bytes long.
        let r = unsafe {
            aya_ebpf::helpers::generated::bpf_probe_read_user(
                self.window.as_mut_ptr() as *mut core::ffi::c_void,
                len as u32,
                start as *const core::ffi::c_void,
            )
        };
        if r != 0 {
            *self.len = 0;
            return false;
        }
        *self.base = start;
        *self.len = len;
        true
    }
}

impl Memory for UserMemory<'_> {
    #[inline(always)]
    fn read_u64(&mut self, addr: u64) -> Option<u64> {
        if addr & 7 == 0 {
            self.windowed(addr)
        } else {
            unsafe { bpf_probe_read_user(addr as *const u64).ok() }
        }
    }
    #[inline(always)]
    fn read_u64_pair(&mut self, addr: u64) -> Option<[u64; 2]> {
        // Both words in one page: the window; else two reads (each refills as needed).
        if addr & 7 == 0 {
            Some([self.windowed(addr)?, self.windowed(addr.wrapping_add(8))?])
        } else {
            unsafe { bpf_probe_read_user(addr as *const [u64; 2]).ok() }
        }
    }
}

#[inline(always)]
fn record_at(rule_start: u32, index: u16) -> Option<DictEntry> {
    let i = rule_start.wrapping_add(u32::from(index));
    let words = RULES.get_value(i / RULE_SEGMENT, &(i % RULE_SEGMENT))?;
    // SAFETY: a DictEntry is 12 bytes of plain integers (every bit pattern is a value the
    // step checks), no more aligned than the words it was written as.
    Some(unsafe { *(words as *const DictWords as *const DictEntry) })
}

/// The unwind rule for file virtual address `vaddr` in table `t`: a page index lookup,
/// one chunk lookup with a binary search inside it, and a rule record lookup.
#[inline(always)]
fn lookup_rule(t: &TableInfo, vaddr: u64) -> Option<UnwindRule> {
    let rel = vaddr.checked_sub(t.base)?;
    let raw = unwound_lookup_rule(
        rel,
        u64::from(t.pages) | (u64::from(t.page_start) << 32),
        u64::from(t.chunk_start) | (u64::from(t.rule_start) << 32),
    );
    if raw == NO_RULE {
        return None;
    }
    Some(UnwindRule::from_bits(raw))
}

/// What [`unwound_lookup_rule`] returns when it finds no rule (no valid rule has these
/// bytes: its CFA kind would be 255).
const NO_RULE: u64 = u64::MAX;

/// The table lookup of [`lookup_rule`] as a *global* BPF function, exported by the linker:
/// the verifier checks a global function once, on its own, where an inlined or static one
/// is walked again on every path of the table step that reaches it, each time through all
/// 13 halvings of the chunk search. Scalars in and out (a table's fields packed two to a
/// word; the rule's bytes, or [`NO_RULE`]).
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn unwound_lookup_rule(rel: u64, pages_and_start: u64, chunks_and_rules: u64) -> u64 {
    let t = TableInfo {
        base: 0,
        pages: pages_and_start as u32,
        page_start: (pages_and_start >> 32) as u32,
        chunk_start: chunks_and_rules as u32,
        rule_start: (chunks_and_rules >> 32) as u32,
    };
    match lookup_in(&t, rel) {
        Some(r) => r.to_bits(),
        None => NO_RULE,
    }
}

/// The rule at offset `rel` from table `t`'s page 0.
#[inline(always)]
fn lookup_in(t: &TableInfo, rel: u64) -> Option<UnwindRule> {
    let page = rel >> PAGE_SHIFT;
    if page >= u64::from(t.pages) {
        return None;
    }
    let p = t.page_start.wrapping_add(page as u32);
    let pe = page_entry(PAGES.get_value(p / PAGE_SEGMENT, &(p % PAGE_SEGMENT))?);
    let offset = (rel & (PAGE_SIZE - 1)) as u16;
    let global = (t.chunk_start as u64) * CHUNK_ENTRIES as u64 + u64::from(pe.first);
    let c = (global / CHUNK_ENTRIES as u64) as u32;
    let chunk = CHUNKS.get_value(c / CHUNK_SEGMENT, &(c % CHUNK_SEGMENT))?;
    let start = (global % CHUNK_ENTRIES as u64) as u32;
    let count = u32::from(pe.count);
    if count == 0 {
        return Some(record_at(t.rule_start, pe.start_rule)?.rule);
    }
    // Last entry with page_offset <= offset among chunk[start .. start + count]: a
    // branch-free binary search of at most 13 halvings (a page holds at most 4096
    // entries), ending once one candidate is left.
    let (mut base, mut n) = (0u32, count);
    for _ in 0..13 {
        if n <= 1 {
            break;
        }
        let half = n / 2;
        let raw = *chunk.get(((start + base + half) as usize) & (CHUNK_ENTRIES - 1))?;
        let le = ((i64::from(offset) - i64::from(raw & 0xfff)) >> 63) + 1;
        base += (i64::from(half) * le) as u32;
        n -= half;
    }
    let idx = ((start + base) as usize) & (CHUNK_ENTRIES - 1);
    let e = Entry::decode(*chunk.get(idx)?);
    if e.page_offset > offset {
        return Some(record_at(t.rule_start, pe.start_rule)?.rule);
    }
    let d = record_at(t.rule_start, e.rule)?;
    if e.restored_at(offset, d.run) {
        if base >= 1 {
            let prev = Entry::decode(*chunk.get((idx.wrapping_sub(1)) & (CHUNK_ENTRIES - 1))?);
            let p = record_at(t.rule_start, prev.rule)?;
            return Some(p.run.final_rule(p.rule));
        }
        return Some(record_at(t.rule_start, pe.start_rule)?.rule);
    }
    Some(d.run.apply(d.rule, d.run.steps_at(e.page_offset, offset)))
}

/// Looks `pc` up in the kernel's view of the sampled process (mappings found earlier in
/// this walk first) and makes it the walk's cached mapping, recording it in the record's
/// files. `Err` when the kernel's view does not hold it either.
#[inline(always)]
fn kernel_mapping(pc: u64) -> Result<(), ()> {
    if unwound_kernel_mapping(pc) == 0 {
        Ok(())
    } else {
        Err(())
    }
}

/// [`kernel_mapping`] as a *global* BPF function, exported by the linker (as
/// `unwound_lookup_rule`): checked once on its own, not again with every caller's state
/// (inlined, its two scans took the sampling program from 12 thousand verified
/// instructions to nearly 500 thousand). The walk's state is this CPU's `SCRATCH`.
/// Returns 0 when found.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn unwound_kernel_mapping(pc: u64) -> i64 {
    let Some(buf) = SCRATCH.get_ptr_mut(0) else { return 1 };
    // SAFETY: this CPU's scratch buffer; perf-event programs do not nest on one CPU.
    match unsafe { kernel_mapping_in(&mut *buf, pc) } {
        Ok(()) => 0,
        Err(()) => 1,
    }
}

#[inline(always)]
unsafe fn kernel_mapping_in(buf: &mut SampleBuffer, pc: u64) -> Result<(), ()> {
    let n = buf.header.files as usize;
    for i in 0..MAX_RECORD_FILES {
        if i >= n {
            break;
        }
        let f = &buf.files[i];
        if f.start <= pc && pc < f.end {
            let e = &buf.file_entries[i];
            buf.cached_mapping.start = e.start;
            buf.cached_mapping.end = e.end;
            buf.cached_mapping.bias = e.bias;
            buf.cached_mapping.table = e.table;
            buf.cached_mapping.flags = e.flags;
            buf.cached_from_kernel = 1;
            return Ok(());
        }
    }
    if buf.kernel_maps == 0 {
        buf.kernel_maps = 2;
        if let (Some(o), Some(kp)) = (offsets(), KPROCS.get(buf.header.pid)) {
            // SAFETY: a probe read of the current task.
            let mm = current_mm(o);
            if mm != 0 && kp.mm == mm {
                buf.kernel_maps = 1;
            }
        }
    }
    if buf.kernel_maps != 1 {
        return Err(());
    }
    let Some(kp) = KPROCS.get(buf.header.pid) else { return Err(()) };
    let used = if kp.count as usize > KERNEL_MAPPINGS { KERNEL_MAPPINGS } else { kp.count as usize };
    let mut found = KERNEL_MAPPINGS;
    for i in 0..KERNEL_MAPPINGS {
        if i >= used {
            break;
        }
        let m = &kp.slots[i];
        if m.start <= pc && pc < m.end {
            found = i;
            break;
        }
    }
    let Some(m) = kp.slots.get(found) else { return Err(()) };
    let (start, end, offset, file, flags) = (m.start, m.end, m.offset, m.file, m.flags);
    let mut entry = MappingEntry { start, end, bias: 0, table: NO_TABLE, flags: 0 };
    if flags & KMAP_ANON == 0 {
        if let Some(t) = FILES.get(file) {
            if t.table != NO_TABLE {
                entry.table = t.table;
                entry.bias = start.wrapping_sub(offset).wrapping_add(t.delta);
            }
        }
    }
    count(Counter::KernelMapFrames);
    if entry.table == NO_TABLE {
        count(Counter::KernelMapNoTable);
    }
    if n < MAX_RECORD_FILES {
        let f = &mut buf.files[n & (MAX_RECORD_FILES - 1)];
        f.start = start;
        f.end = end;
        f.offset = offset;
        f.file = file;
        f.flags = flags;
        f.pad = 0;
        let e = &mut buf.file_entries[n & (MAX_RECORD_FILES - 1)];
        e.start = start;
        e.end = end;
        e.bias = entry.bias;
        e.table = entry.table;
        e.flags = 0;
        buf.header.files += 1;
    } else {
        buf.header.flags |= FLAG_FILES_FULL;
    }
    buf.cached_mapping.start = start;
    buf.cached_mapping.end = end;
    buf.cached_mapping.bias = entry.bias;
    buf.cached_mapping.table = entry.table;
    buf.cached_mapping.flags = 0;
    buf.cached_from_kernel = 1;
    Ok(())
}

/// The mapping of `pc` in the agent's entry for the sampled process, made the walk's
/// cached mapping; `false` when the entry (if any) does not hold it.
#[inline(always)]
unsafe fn agent_mapping(buf: &mut SampleBuffer, pc: u64) -> bool {
    if buf.generation == 0 {
        return false;
    }
    let Some(procs) = PROCS.get_ptr(buf.header.pid) else { return false };
    let procs = &*procs;
    // The mapping that holds pc: branch-free binary search over the sorted starts.
    let mapped = if procs.count as usize > MAX_MAPPINGS { MAX_MAPPINGS as u32 } else { procs.count };
    if mapped == 0 {
        return false;
    }
    let (mut base, mut n) = (0u32, mapped);
    for _ in 0..9 {
        let half = n / 2;
        let Some(m) = procs.mappings.get(((base + half) as usize) & (MAX_MAPPINGS - 1)) else {
            return false;
        };
        let le = ((pc.wrapping_sub(m.start) as i64) >> 63) + 1;
        base += (i64::from(half) * le) as u32;
        n -= half;
    }
    let found =
        procs.mappings.get((base as usize) & (MAX_MAPPINGS - 1)).filter(|m| m.start <= pc && pc < m.end);
    let Some(m) = found else { return false };
    // Field by field: a whole-struct copy becomes a call to a memcpy subprogram, after
    // which LLVM may read a register the call clobbered (the verifier refuses it).
    buf.cached_mapping.start = m.start;
    buf.cached_mapping.end = m.end;
    buf.cached_mapping.bias = m.bias;
    buf.cached_mapping.table = m.table;
    buf.cached_mapping.flags = m.flags;
    buf.cached_from_kernel = 0;
    true
}

/// The rule of `pc` from the sampled process's mappings and tables (the walk's mapping and
/// table caches first; the agent's entry for the process, then the kernel's view):
/// `Ok(None)` when its mapping has no table, `Err` when no mapping holds it.
#[inline(always)]
unsafe fn find_rule(buf: &mut SampleBuffer, pc: u64) -> Result<Option<UnwindRule>, ()> {
    if !(buf.cached_mapping.start <= pc && pc < buf.cached_mapping.end)
        && !agent_mapping(buf, pc)
        && kernel_mapping(pc).is_err()
    {
        return Err(());
    }
    // Read back through volatile loads: `unwound_kernel_mapping` writes the cached mapping
    // through its own pointer to this buffer, which the compiler cannot see.
    let m = &buf.cached_mapping;
    let mapping = MappingEntry {
        start: core::ptr::read_volatile(&m.start),
        end: core::ptr::read_volatile(&m.end),
        bias: core::ptr::read_volatile(&m.bias),
        table: core::ptr::read_volatile(&m.table),
        flags: core::ptr::read_volatile(&m.flags),
    };
    if mapping.table == NO_TABLE && mapping.flags & MAPPING_PY_TRAMPOLINES != 0 {
        // CPython's perf trampolines (see MAPPING_PY_TRAMPOLINES): no frame pointer, a
        // fixed shape.
        let offset = pc.wrapping_sub(mapping.start) % PY_TRAMPOLINE_CODE.len() as u64;
        let cfa = if (4..10).contains(&offset) { 16 } else { 8 };
        return Ok(Some(UnwindRule::new(CfaKind::Rsp, cfa, RbpKind::Unchanged, 0)));
    }
    if mapping.table != NO_TABLE && mapping.table != buf.cached_table_id {
        match TABLES.get(mapping.table) {
            Some(t) => {
                buf.cached_table.base = t.base;
                buf.cached_table.pages = t.pages;
                buf.cached_table.page_start = t.page_start;
                buf.cached_table.chunk_start = t.chunk_start;
                buf.cached_table.rule_start = t.rule_start;
                buf.cached_table_id = mapping.table;
            }
            None => buf.cached_table_id = NO_TABLE,
        }
    }
    if mapping.table == NO_TABLE || mapping.table != buf.cached_table_id {
        return Ok(None);
    }
    Ok(lookup_rule(&buf.cached_table, pc.wrapping_sub(mapping.bias)))
}

/// One table (or frame-pointer fallback) step, called by `bpf_loop`. Returns 1 to stop.
unsafe extern "C" fn table_step(_index: u64, _ctx: *mut core::ffi::c_void) -> i64 {
    let Some(buf) = SCRATCH.get_ptr_mut(0) else { return 1 };
    let buf = &mut *buf;
    let pc = if buf.walk_exact != 0 { buf.walk_rip } else { buf.walk_rip.wrapping_sub(1) };
    let (pid, generation) = (buf.header.pid, buf.generation);
    // Recursion repeats a pc within one walk (`last_pc`); a steady workload repeats its
    // frames from sample to sample (the per-CPU rule cache, probed and filled with separate
    // lookups so no map pointer stays live across the table search).
    let rule = if pc == buf.last_pc {
        Some(UnwindRule::from_bits(buf.last_rule))
    } else {
        let key = rule_cache_slot(pid, pc) as usize & (RULE_CACHE_SLOTS as usize - 1);
        // Generation 0: no agent entry, nothing cached (rules found through the kernel's
        // view are not: its mappings change without a generation).
        let hit = match RULE_CACHE.get(0).map(|c| &c.slots[key]) {
            Some(c) if generation != 0 && c.pc == pc && c.pid == pid && c.generation == generation => {
                Some(c.rule)
            }
            _ => None,
        };
        let found = match hit {
            Some(raw) => {
                buf.rule_cache_hits += 1;
                Some(UnwindRule::from_bits(raw))
            }
            None => match find_rule(buf, pc) {
                Ok(Some(r)) => {
                    if buf.cached_from_kernel != 0 {
                        // not cached (see above)
                    } else if let Some(cache) = RULE_CACHE.get_ptr_mut(0) {
                        let c = &mut (*cache).slots[key];
                        c.pc = pc;
                        c.pid = pid;
                        c.generation = generation;
                        c.rule = r.to_bits();
                    }
                    Some(r)
                }
                Ok(None) => None,
                Err(()) => {
                    buf.header.walk_end = WALK_UNKNOWN_MAPPING;
                    return 1;
                }
            },
        };
        if let Some(r) = found {
            buf.last_pc = pc;
            buf.last_rule = r.to_bits();
        }
        found
    };
    let regs = Registers { rip: buf.walk_rip, rsp: buf.walk_rsp, rbp: buf.walk_fp };
    // The window's borrow ends with this block: written flat, LLVM stores a register that
    // a helper call clobbered and the verifier refuses the program ("R4 !read_ok").
    let result = {
        let mut mem = UserMemory {
            base: &mut buf.window_base,
            len: &mut buf.window_len,
            window: &mut buf.stack_window,
        };
        match rule {
            Some(r) if r.cfa != CfaKind::Gap as u8 => {
                buf.table_frames += 1;
                step(&r, &regs, &mut mem)
            }
            // No unwind information for this pc (JIT code, stripped CFI): a frame-pointer step.
            _ => {
                buf.fallback_frames += 1;
                let fp = regs.rbp;
                match mem.read_u64_pair(fp) {
                    Some([next_fp, ret]) if fp != 0 && fp & 7 == 0 && fp >= regs.rsp => {
                        if ret == 0 {
                            Step::End
                        } else {
                            Step::Caller {
                                regs: Registers { rip: ret, rsp: fp + 16, rbp: next_fp },
                                exact: false,
                            }
                        }
                    }
                    _ => Step::Failed(StepError::NoRule),
                }
            }
        }
    };
    let (next, exact) = match result {
        Step::Caller { regs, exact } => (regs, exact),
        Step::End => {
            buf.header.walk_end = WALK_COMPLETE;
            return 1;
        }
        Step::Failed(e) => {
            buf.header.walk_end = match e {
                StepError::NoRule => WALK_NO_TABLE,
                StepError::Unsupported => WALK_UNSUPPORTED,
                StepError::Memory => WALK_MEMORY,
                StepError::BadCfa => WALK_BAD_CFA,
                StepError::ZeroReturn => WALK_COMPLETE,
            };
            return 1;
        }
    };
    if buf.walk_budget == 0 {
        buf.header.walk_end = WALK_TRUNCATED;
        buf.header.flags |= FLAG_USER_TRUNCATED;
        return 1;
    }
    let index = buf.walk_index as usize;
    if index >= MAX_FRAMES {
        buf.header.walk_end = WALK_TRUNCATED;
        buf.header.flags |= FLAG_USER_TRUNCATED;
        return 1;
    }
    buf.frames[index] = next.rip;
    buf.walk_index += 1;
    buf.walk_budget -= 1;
    buf.header.user_len += 1;
    buf.walk_rip = next.rip;
    buf.walk_rsp = next.rsp;
    buf.walk_fp = next.rbp;
    buf.walk_exact = u32::from(exact);
    0
}

#[perf_event]
pub fn on_cpu_sample(ctx: PerfEventContext) -> u32 {
    unsafe {
        let Some((buf, walk)) = begin(&ctx) else { return 0 };
        match walk {
            Walk::Tables(budget) => {
                bpf_loop(budget + 1, table_step as *mut core::ffi::c_void, core::ptr::null_mut(), 0);
            }
            Walk::FramePointers(budget) => {
                bpf_loop(budget + 1, frame_pointer_step as *mut core::ffi::c_void, core::ptr::null_mut(), 0);
            }
            Walk::Nothing => {}
        }
        finish(buf);
    }
    0
}

/// The sampling program for kernels without `bpf_loop`: [`TAIL_STEPS`] frames here, then
/// the walk goes on in `walk_tables_tail` / `walk_fp_tail` by tail calls.
#[perf_event]
pub fn on_cpu_sample_tail(ctx: PerfEventContext) -> u32 {
    unsafe {
        let Some((buf, walk)) = begin(&ctx) else { return 0 };
        match walk {
            Walk::Tables(_) => continue_walk(&ctx, buf, table_step, TAIL_SLOT_TABLES),
            Walk::FramePointers(_) => continue_walk(&ctx, buf, frame_pointer_step, TAIL_SLOT_FP),
            Walk::Nothing => {}
        }
        finish(buf);
    }
    0
}

/// Tail-call walker: [`TAIL_STEPS`] more table frames.
#[perf_event]
pub fn walk_tables_tail(ctx: PerfEventContext) -> u32 {
    unsafe { resume_walk(&ctx, table_step, TAIL_SLOT_TABLES) };
    0
}

/// Tail-call walker: [`TAIL_STEPS`] more frame-pointer frames.
#[perf_event]
pub fn walk_fp_tail(ctx: PerfEventContext) -> u32 {
    unsafe { resume_walk(&ctx, frame_pointer_step, TAIL_SLOT_FP) };
    0
}

/// A tail-called program: the walk goes on from the per-CPU buffer; the program that
/// ends it writes the record.
#[inline(always)]
unsafe fn resume_walk(ctx: &PerfEventContext, step_fn: StepFn, slot: u32) {
    let Some(buf) = SCRATCH.get_ptr_mut(0) else { return };
    let buf = &mut *buf;
    continue_walk(ctx, buf, step_fn, slot);
    finish(buf);
}

type StepFn = unsafe extern "C" fn(u64, *mut core::ffi::c_void) -> i64;

/// Takes up to [`TAIL_STEPS`] steps; when the walk is not over, tail-calls the program in
/// `slot` to go on (and does not return). Past the kernel's tail-call limit the walk ends
/// here, marked truncated.
#[inline(always)]
unsafe fn continue_walk(ctx: &PerfEventContext, buf: &mut SampleBuffer, step_fn: StepFn, slot: u32) {
    let mut i = 0u64;
    while i < TAIL_STEPS as u64 {
        if step_fn(i, core::ptr::null_mut()) != 0 {
            return;
        }
        i += 1;
    }
    WALK_PROGS.tail_call(ctx, slot);
    // Still here: the tail-call limit (or an empty slot).
    buf.header.flags |= FLAG_USER_TRUNCATED;
    if buf.table_walk != 0 {
        buf.header.walk_end = WALK_TRUNCATED;
    }
}

/// The user walk a sample needs, with its frame budget.
enum Walk {
    Nothing,
    Tables(u32),
    FramePointers(u32),
}

/// Everything before the user walk: filters, header, kernel stack, user registers and the
/// walk's start state in the per-CPU buffer. `None` when the sample is not kept.
#[inline(always)]
unsafe fn begin(ctx: &PerfEventContext) -> Option<(&'static mut SampleBuffer, Walk)> {
    count(Counter::Samples);
    let pid = ctx.tgid();
    if pid == 0 {
        count(Counter::Idle);
        return None;
    }
    let Some(config) = CONFIG.get(0) else {
        count(Counter::DroppedNoScratch);
        return None;
    };
    if config.filter_pids != 0 && PIDS.get_ptr(pid).is_none() {
        count(Counter::Filtered);
        return None;
    }
    let max_user = config.max_user_frames;
    let follow = config.follow_processes;
    let Some(buf) = SCRATCH.get_ptr_mut(0) else {
        count(Counter::DroppedNoScratch);
        return None;
    };
    let buf = &mut *buf;
    buf.header.pid = pid;
    buf.header.tid = ctx.pid();
    buf.header.cpu = bpf_get_smp_processor_id();
    buf.header.time_ns = bpf_ktime_get_ns();
    buf.header.flags = 0;
    buf.header.kernel_len = 0;
    buf.header.user_len = 0;
    buf.header.walk_end = WALK_FRAME_POINTERS;
    buf.header.files = 0;
    buf.header.py_len = 0;
    buf.header.py_status = 0;
    buf.header.pad = 0;
    buf.header.comm = bpf_get_current_comm().unwrap_or([0; 16]);
    buf.table_walk = 0;
    buf.kernel_maps = 0;
    buf.cached_from_kernel = 0;

    // A sample that interrupted user code has no kernel stack: skip the helper.
    let copied = if is_user_mode(&(*ctx.ctx).regs) {
        0
    } else {
        bpf_get_stack(
            ctx.as_ptr(),
            buf.frames.as_mut_ptr() as *mut core::ffi::c_void,
            (MAX_KERNEL_FRAMES * 8) as u32,
            0,
        )
    };
    let mut kernel_len = 0usize;
    if copied < 0 {
        buf.header.flags |= FLAG_KERNEL_STACK_FAILED;
        count(Counter::KernelStackFailed);
    } else {
        kernel_len = (copied as usize) / 8;
        if kernel_len > MAX_KERNEL_FRAMES {
            kernel_len = MAX_KERNEL_FRAMES;
        }
    }
    buf.header.kernel_len = kernel_len as u16;

    let (user, in_kernel) = user_registers(ctx);
    if in_kernel {
        buf.header.flags |= FLAG_IN_KERNEL;
    }
    let Some((ip, sp, bp)) = user else {
        buf.header.flags |= FLAG_NO_USER;
        count(Counter::KernelThread);
        return Some((buf, Walk::Nothing));
    };
    if kernel_len < MAX_FRAMES {
        buf.frames[kernel_len] = ip;
        buf.header.user_len = 1;
    }
    let budget = if max_user as usize > MAX_USER_FRAMES { MAX_USER_FRAMES as u32 } else { max_user };
    buf.walk_fp = bp;
    buf.walk_rip = ip;
    buf.walk_rsp = sp;
    buf.walk_exact = 1;
    buf.window_len = 0;
    buf.last_pc = 0;
    buf.cached_mapping = MappingEntry::default();
    buf.cached_table_id = NO_TABLE;
    buf.table_frames = 0;
    buf.fallback_frames = 0;
    buf.rule_cache_hits = 0;
    buf.follow_processes = follow;
    buf.walk_index = kernel_len as u32 + 1;
    buf.walk_budget = budget.saturating_sub(1);
    // The agent's entry, unless it was read before the current program image was made
    // (read just before an execve, written after it).
    let stale = |p: *const unwound_stackwalk_abi::ProcMappings| match KPROCS.get_ptr(pid) {
        Some(kp) => (*kp).created_ns > (*p).read_ns,
        None => false,
    };
    if let Some(p) = PROCS.get_ptr(pid).filter(|&p| !stale(p)) {
        count(Counter::TableWalks);
        buf.table_walk = 1;
        buf.generation = (*p).generation;
        return Some((buf, Walk::Tables(budget)));
    }
    buf.generation = 0;
    // Not (yet) known to the agent: the kernel's own view of its mappings, when it
    // describes this program image.
    if let (Some(o), Some(kp)) = (offsets(), KPROCS.get_ptr(pid)) {
        let mm = current_mm(o);
        if mm != 0 && (*kp).mm == mm {
            buf.kernel_maps = 1;
            count(Counter::TableWalks);
            count(Counter::KernelMapWalks);
            buf.table_walk = 1;
            return Some((buf, Walk::Tables(budget)));
        }
    }
    count(Counter::NoMappings);
    Some((buf, Walk::FramePointers(budget)))
}

/// Everything after the user walk: its counters, then the record into the ring.
#[inline(always)]
unsafe fn finish(buf: &mut SampleBuffer) {
    if buf.table_walk != 0 {
        add(Counter::TableFrames, u64::from(buf.table_frames));
        add(Counter::FallbackFrames, u64::from(buf.fallback_frames));
        add(Counter::RuleCacheHits, u64::from(buf.rule_cache_hits));
        match buf.header.walk_end {
            WALK_COMPLETE => count(Counter::TableWalkComplete),
            // Truncation is counted below, from the flag every truncated walk sets.
            WALK_NO_TABLE => count(Counter::TableWalkNoTable),
            WALK_UNSUPPORTED => count(Counter::TableWalkUnsupported),
            WALK_MEMORY => count(Counter::TableWalkMemory),
            WALK_BAD_CFA => count(Counter::TableWalkBadCfa),
            WALK_UNKNOWN_MAPPING => count(Counter::TableWalkUnknownMapping),
            _ => {}
        }
    }
    if buf.header.flags & FLAG_USER_TRUNCATED != 0 {
        count(Counter::UserTruncated);
    }
    if buf.header.flags & FLAG_USER_WALK_FAILED != 0 {
        count(Counter::UserWalkFailed);
    }

    let frames = buf.header.kernel_len as usize + buf.header.user_len as usize;
    if buf.header.flags & FLAG_FILES_FULL != 0 {
        count(Counter::RecordFilesFull);
    }
    let nfiles = buf.header.files as usize;
    const FILE_WORDS: usize = RECORD_FILE_SIZE / 8;
    for i in 0..MAX_RECORD_FILES {
        if i >= nfiles {
            break;
        }
        let words = &*(&buf.files[i] as *const RecordFile as *const [u64; FILE_WORDS]);
        for (w, &word) in words.iter().enumerate() {
            let at = frames + i * FILE_WORDS + w;
            if at >= FRAME_AREA_WORDS {
                break;
            }
            buf.frames[at] = word;
        }
    }
    // The thread's Python frames, after the files.
    if buf.header.flags & FLAG_NO_USER == 0 {
        python_walk(buf, (frames + nfiles * FILE_WORDS) as u32);
    }
    let npy = buf.header.py_len as usize;
    let mut len = HEADER_SIZE + frames * 8 + nfiles * RECORD_FILE_SIZE + npy * PY_FRAME_SIZE;
    if len > RECORD_CAPACITY {
        len = RECORD_CAPACITY;
    }
    // A record the agent must act on (a pc outside the process's known mappings: dlopen;
    // a process it has not seen: started since) wakes it now, not at its next 100 ms
    // poll, at most every 10 ms per CPU: until it has re-read the process's maps, every
    // sample of that code is incomplete.
    let needs_agent = buf.header.walk_end == WALK_UNKNOWN_MAPPING
        || (buf.follow_processes != 0 && buf.table_walk == 0 && buf.header.flags & FLAG_NO_USER == 0);
    let mut wakeup = ring_wakeup(CONFIG.get(0).map_or(0, |c| c.ring_wakeup_bytes));
    if needs_agent && buf.header.time_ns.wrapping_sub(buf.needs_agent_woken_ns) >= NEEDS_AGENT_WAKE_NS {
        buf.needs_agent_woken_ns = buf.header.time_ns;
        wakeup = BPF_RB_FORCE_WAKEUP;
    }
    let bytes = core::slice::from_raw_parts(buf as *const SampleBuffer as *const u8, len);
    match SAMPLES.output::<[u8]>(bytes, wakeup) {
        Ok(()) => count(Counter::Emitted),
        Err(_) => count(Counter::DroppedRingFull),
    }
}

/// A `T` at user address `base + offset`, or `None` when it cannot be read.
#[inline(always)]
unsafe fn uread<T: Copy>(base: u64, offset: u32) -> Option<T> {
    if base == 0 || offset == PY_NO_OFFSET {
        return None;
    }
    bpf_probe_read_user((base + u64::from(offset)) as *const T).ok()
}

/// Walks the sampled thread's Python frames (a CPython process the agent described in
/// `PY_PROCS`) into the record from word `base` of the frame area: the thread state from
/// the thread's pthread key (`*(fsbase + tss_slot)`), then its frame chain, in a bounded
/// `bpf_loop`.
#[inline(always)]
unsafe fn python_walk(buf: &mut SampleBuffer, base: u32) {
    let Some(info) = PY_PROCS.get(buf.header.pid) else { return };
    let Some(o) = offsets() else { return };
    let fsbase: u64 = kread(aya_ebpf::helpers::generated::bpf_get_current_task(), o.task_fsbase);
    let tstate: u64 = uread(fsbase, info.tss_slot as u32).unwrap_or(0);
    if tstate == 0 {
        buf.header.py_status = PY_NO_THREAD_STATE;
        return;
    }
    let mut frame: u64 = uread(tstate, info.tstate_frame).unwrap_or(0);
    if info.cframe_current_frame != PY_NO_OFFSET && frame != 0 {
        frame = uread(frame, info.cframe_current_frame).unwrap_or(0);
    }
    buf.py_frame = frame;
    buf.py_base = base;
    buf.header.py_status = PY_COMPLETE;
    bpf_loop(MAX_PY_FRAMES as u32 + 1, python_step as *mut core::ffi::c_void, core::ptr::null_mut(), 0);
}

/// One Python frame, called by `bpf_loop`: a C-stack entry frame (3.12+) marks the frame
/// before it as its activation's last; a Python frame is written (code object, instruction
/// pointer, check value). Returns 1 to stop.
unsafe extern "C" fn python_step(_index: u64, _ctx: *mut core::ffi::c_void) -> i64 {
    let Some(buf) = SCRATCH.get_ptr_mut(0) else { return 1 };
    let buf = &mut *buf;
    let frame = buf.py_frame;
    if frame == 0 {
        return 1;
    }
    let Some(info) = PY_PROCS.get(buf.header.pid) else { return 1 };
    let n = buf.header.py_len as usize;
    let (Some(code), Some(instr), Some(previous)) = (
        uread::<u64>(frame, info.frame_code),
        uread::<u64>(frame, info.frame_instr),
        uread::<u64>(frame, info.frame_previous),
    ) else {
        buf.header.py_status = PY_READ_FAILED;
        return 1;
    };
    buf.py_frame = previous;
    if info.owner_cstack != PY_NO_OFFSET {
        let owner: u8 = uread(frame, info.frame_owner).unwrap_or(0);
        if u32::from(owner) == info.owner_cstack || code == info.py_none {
            // The frames before it (inner) are its activation's: the last one is marked.
            if n > 0 {
                let at = buf.py_base as usize + (n - 1) * 3 + 1;
                if let Some(w) = buf.frames.get_mut(at) {
                    *w |= PY_FRAME_ENTRY;
                }
            }
            return 0;
        }
    }
    if n >= MAX_PY_FRAMES {
        buf.header.py_status = PY_TRUNCATED;
        return 1;
    }
    let entry = match info.frame_is_entry {
        PY_NO_OFFSET => false,
        at => uread::<u8>(frame, at).unwrap_or(0) != 0,
    };
    let firstlineno: u32 = uread(code, info.code_firstlineno).unwrap_or(0);
    let filename: u64 = uread(code, info.code_filename).unwrap_or(0);
    let qualname: u64 = uread(code, info.code_qualname).unwrap_or(0);
    // unwound_symbolize::python::code_checksum
    let checksum = (filename ^ qualname.rotate_left(32) ^ (u64::from(firstlineno) << 1))
        .wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let at = buf.py_base as usize + n * 3;
    if at + 2 >= FRAME_AREA_WORDS {
        buf.header.py_status = PY_TRUNCATED;
        return 1;
    }
    buf.frames[at] = code;
    buf.frames[at + 1] = (instr & !PY_FRAME_ENTRY) | if entry { PY_FRAME_ENTRY } else { 0 };
    buf.frames[at + 2] = checksum;
    buf.header.py_len += 1;
    0
}

/// Wakes the agent only once the ring is a quarter full: the agent also drains it on a
/// timer, and a wakeup per record costs an irq_work (an IPI, a VM exit under a hypervisor)
/// and a context switch per sample.
#[inline(always)]
fn ring_wakeup(threshold: u32) -> u64 {
    let threshold = if threshold == 0 { DEFAULT_RING_BYTES / 4 } else { threshold };
    if SAMPLES.query(BPF_RB_AVAIL_DATA) >= u64::from(threshold) {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    }
}

/// Raw tracepoint `sched_process_exec` (no tracefs needed): the process now runs a new
/// program; the agent starts a new generation of its mappings (and tables) from this point
/// in the ring's order.
#[raw_tracepoint(tracepoint = "sched_process_exec")]
pub fn on_exec(ctx: RawTracePointContext) -> i32 {
    let pid = (bpf_get_current_pid_tgid() >> 32) as u32;
    // The agent's entry describes the old program: until it has read the new one, the
    // kernel's view (filled as the new program was mapped) walks it.
    let _ = PROCS.remove(pid);
    let _ = PY_PROCS.remove(pid);
    // sched_process_exec(struct task_struct *p, pid_t old_pid, struct linux_binprm *bprm)
    let bprm: u64 = ctx.arg(2);
    match offsets() {
        Some(o) if bprm != 0 => {
            // SAFETY: probe reads of the exec's binprm.
            unsafe {
                let file: u64 = kread(bprm, o.binprm_file);
                let name: u64 = kread(bprm, o.binprm_filename);
                let key = if file != 0 { file_key(o, file) } else { FileKey::default() };
                // What execve mapped, before the program's first instruction: its text
                // (`mm->start_code`) and the interpreter, where the task will start.
                let mm = current_mm(o);
                let text: u64 = kread(mm, o.mm_start_code);
                if text != 0 {
                    record_vma(o, text);
                }
                let task = bpf_get_current_task_btf();
                if !task.is_null() {
                    let regs = bpf_task_pt_regs(task) as *const pt_regs;
                    if let Ok(r) = bpf_probe_read_kernel(regs) {
                        if r.rip != 0 {
                            record_vma(o, r.rip);
                        }
                    }
                }
                file_event(FLAG_EVENT_EXEC, 0, 0, 0, key, name);
            }
        }
        _ => process_event(FLAG_EVENT_EXEC),
    }
    0
}

/// Tracepoint `syscalls:sys_exit_mmap`: the mapping a successful `mmap` made (or the one
/// it merged into) is recorded if executable.
#[tracepoint(category = "syscalls", name = "sys_exit_mmap")]
pub fn on_mmap(ctx: TracePointContext) -> u32 {
    let Some(o) = offsets() else { return 0 };
    // SAFETY: the tracepoint's record: `long ret` at 16 (its format file).
    let Ok(ret) = (unsafe { ctx.read_at::<u64>(16) }) else { return 0 };
    if ret > MAX_ERRNO_ADDRESS {
        return 0;
    }
    // SAFETY: helpers on the current task, in process context.
    unsafe { record_vma(o, ret) };
    0
}

/// Where `bpf_find_vma`'s callback leaves what it read, per CPU.
#[repr(C)]
struct VmaInfo {
    start: u64,
    end: u64,
    pgoff: u64,
    flags: u64,
    file: u64,
}

#[map]
static VMA_SCRATCH: PerCpuArray<VmaInfo> = PerCpuArray::with_max_entries(1, 0);

/// `bpf_find_vma`'s callback: reads the mapping's fields into `VMA_SCRATCH`.
unsafe extern "C" fn vma_found(
    _task: *mut core::ffi::c_void,
    vma: *mut core::ffi::c_void,
    _ctx: *mut core::ffi::c_void,
) -> i64 {
    let (Some(o), Some(v)) = (offsets(), VMA_SCRATCH.get_ptr_mut(0)) else { return 0 };
    let base = vma as u64;
    (*v).start = kread(base, o.vma_start);
    (*v).end = kread(base, o.vma_end);
    (*v).pgoff = kread(base, o.vma_pgoff);
    (*v).flags = kread(base, o.vma_flags);
    (*v).file = kread(base, o.vma_file);
    0
}

/// Records the current process's mapping at `addr`, if executable (process context only:
/// `bpf_find_vma` takes the mm's lock).
#[inline(always)]
unsafe fn record_vma(o: &KernelOffsets, addr: u64) {
    let Some(v) = VMA_SCRATCH.get_ptr_mut(0) else { return };
    (*v).end = 0;
    (*v).flags = 0;
    let task = bpf_get_current_task_btf();
    if task.is_null() {
        return;
    }
    aya_ebpf::helpers::generated::bpf_find_vma(
        task as *mut _,
        addr,
        vma_found as *mut core::ffi::c_void,
        core::ptr::null_mut(),
        0,
    );
    let (start, end, pgoff, flags, file) = ((*v).start, (*v).end, (*v).pgoff, (*v).flags, (*v).file);
    if end == 0 || flags & VM_EXEC == 0 {
        return;
    }
    add_mapping(o, start, end, pgoff << PAGE_SHIFT_BITS, file);
}

/// Adds executable mapping `[start, end)` at file offset `offset` of `file` (0:
/// anonymous) to the current process's `KPROCS` entry.
#[inline(never)]
unsafe fn add_mapping(o: &KernelOffsets, start: u64, end: u64, offset: u64, file: u64) {
    {
        let pid = (bpf_get_current_pid_tgid() >> 32) as u32;
        let mm = current_mm(o);
        if mm == 0 {
            return;
        }
        let key = if file != 0 { file_key(o, file) } else { FileKey::default() };
        let fresh = match KPROCS.get_ptr(pid) {
            Some(kp) => (*kp).mm != mm,
            None => true,
        };
        if fresh {
            // A new process image (or the first mapping seen of this process).
            let Some(scratch) = KSCRATCH.get_ptr_mut(0) else { return };
            (*scratch).mm = mm;
            (*scratch).created_ns = bpf_ktime_get_ns();
            (*scratch).count = 0;
            (*scratch).overflow = 0;
            if KPROCS.insert(pid, &*scratch, 0).is_err() {
                count(Counter::KernelProcsFull);
                return;
            }
        }
        let Some(kp) = KPROCS.get_ptr_mut(pid) else { return };
        let kp = &mut *kp;
        let used = if kp.count as usize > KERNEL_MAPPINGS { KERNEL_MAPPINGS } else { kp.count as usize };
        // The slots it overlaps are emptied and the first empty one taken: in a `bpf_loop`
        // (checked once; unrolled, the verifier walks every combination of the branches).
        let Some(scan) = MMAP_SCAN.get_ptr_mut(0) else { return };
        (*scan).pid = pid;
        (*scan).start = start;
        (*scan).end = end;
        (*scan).used = used as u32;
        (*scan).free = KERNEL_MAPPINGS as u32;
        bpf_loop(KERNEL_MAPPINGS as u32, mmap_slot as *mut core::ffi::c_void, core::ptr::null_mut(), 0);
        let mut free = (*scan).free as usize;
        if free >= KERNEL_MAPPINGS {
            if used >= KERNEL_MAPPINGS {
                kp.overflow += 1;
                count(Counter::KernelMapOverflow);
                return;
            }
            free = used;
            kp.count = used as u32 + 1;
        }
        let Some(m) = kp.slots.get_mut(free) else { return };
        // `end` last: a sample reading the slot meanwhile sees it empty.
        m.end = 0;
        m.start = start;
        m.offset = offset;
        m.file = key;
        m.flags = if file == 0 { KMAP_ANON } else { 0 };
        m.pad = 0;
        m.end = end;
        if file != 0 && FILES.get(key).is_none() {
            let now = bpf_ktime_get_ns();
            let recent = ANNOUNCED.get(key).is_some_and(|&t| now.wrapping_sub(t) < ANNOUNCE_INTERVAL_NS);
            if !recent {
                let _ = ANNOUNCED.insert(key, now, 0);
                count(Counter::FilesAnnounced);
                let dentry: u64 = kread(file, o.file_dentry);
                let name: u64 = kread(dentry, o.dentry_name);
                file_event(FLAG_EVENT_FILE, start, end, offset, key, name);
            }
        }
    }
}

/// `on_mmap`'s scan of a process's slots, per CPU.
#[repr(C)]
struct MmapScan {
    pid: u32,
    used: u32,
    free: u32,
    start: u64,
    end: u64,
}

#[map]
static MMAP_SCAN: PerCpuArray<MmapScan> = PerCpuArray::with_max_entries(1, 0);

/// One slot of `on_mmap`'s scan, called by `bpf_loop`: emptied if the new mapping overlaps
/// it; the first empty one noted. Returns 1 to stop.
unsafe extern "C" fn mmap_slot(index: u64, _ctx: *mut core::ffi::c_void) -> i64 {
    let Some(scan) = MMAP_SCAN.get_ptr_mut(0) else { return 1 };
    let scan = &mut *scan;
    if index >= u64::from(scan.used) {
        return 1;
    }
    let Some(kp) = KPROCS.get_ptr_mut(scan.pid) else { return 1 };
    let Some(m) = (*kp).slots.get_mut(index as usize) else { return 1 };
    if m.end != 0 && m.start < scan.end && scan.start < m.end {
        m.end = 0;
        m.start = 0;
    }
    if m.end == 0 && scan.free == KERNEL_MAPPINGS as u32 {
        scan.free = index as u32;
    }
    0
}

/// Raw tracepoint `sched_process_fork(struct task_struct *parent, struct task_struct
/// *child)`: a new process (not a thread) starts with its parent's kernel view, moved to
/// its own `mm`; a stale entry of a reused pid is dropped.
#[raw_tracepoint(tracepoint = "sched_process_fork")]
pub fn on_fork(ctx: RawTracePointContext) -> i32 {
    let Some(o) = offsets() else { return 0 };
    let parent: u64 = ctx.arg(0);
    let child: u64 = ctx.arg(1);
    // SAFETY: probe reads of the two tasks.
    unsafe {
        let tgid: u32 = kread(child, o.task_tgid);
        let tid: u32 = kread(child, o.task_pid);
        if tgid != tid || tgid == 0 {
            return 0; // a thread: it shares its process's entry
        }
        let child_mm: u64 = kread(child, o.task_mm);
        let parent_tgid: u32 = kread(parent, o.task_tgid);
        let parent_mm: u64 = kread(parent, o.task_mm);
        let copied = match KPROCS.get_ptr(parent_tgid) {
            Some(kp) if child_mm != 0 && (*kp).mm == parent_mm => KPROCS.insert(tgid, &*kp, 0).is_ok(),
            _ => false,
        };
        if !copied {
            let _ = KPROCS.remove(tgid);
            return 0;
        }
        if let Some(kp) = KPROCS.get_ptr_mut(tgid) {
            (*kp).mm = child_mm;
        }
    }
    0
}

/// Writes a [`FileEvent`] record for the current process: the mapping `[start, end)` at
/// file offset `offset` of `key`, and the kernel string at `name`.
#[inline(always)]
unsafe fn file_event(flag: u32, start: u64, end: u64, offset: u64, key: FileKey, name: u64) {
    let id = bpf_get_current_pid_tgid();
    let pid = (id >> 32) as u32;
    let Some(config) = CONFIG.get(0) else { return };
    if config.filter_pids != 0 && PIDS.get_ptr(pid).is_none() {
        return;
    }
    let Some(r) = EVENT_SCRATCH.get_ptr_mut(0) else { return };
    let r = &mut *r;
    r.header.pid = pid;
    r.header.tid = id as u32;
    r.header.cpu = bpf_get_smp_processor_id();
    r.header.flags = flag;
    r.header.time_ns = bpf_ktime_get_ns();
    r.header.kernel_len = 0;
    r.header.user_len = 0;
    r.header.walk_end = WALK_FRAME_POINTERS;
    r.header.files = 0;
    r.header.py_len = 0;
    r.header.py_status = 0;
    r.header.pad = 0;
    r.header.comm = bpf_get_current_comm().unwrap_or([0; 16]);
    r.event.file = RecordFile { start, end, offset, file: key, flags: 0, pad: 0 };
    r.event.name[0] = 0;
    if name != 0 {
        let _ = bpf_probe_read_kernel_str_bytes(name as *const u8, &mut r.event.name);
    }
    // A file announcement wakes the agent now (at most once a second per file, see
    // ANNOUNCED): until it has listed the file, every process mapping it falls back to
    // frame pointers.
    let wakeup =
        if flag == FLAG_EVENT_FILE { BPF_RB_FORCE_WAKEUP } else { ring_wakeup(config.ring_wakeup_bytes) };
    let _ = SAMPLES.output::<FileEventRecord>(r, wakeup);
}

/// Raw tracepoint `sched_process_exit`: reported once per process, when its main thread
/// exits.
#[raw_tracepoint(tracepoint = "sched_process_exit")]
pub fn on_exit(_ctx: RawTracePointContext) -> i32 {
    let id = bpf_get_current_pid_tgid();
    if (id >> 32) as u32 == id as u32 {
        let _ = KPROCS.remove((id >> 32) as u32);
        let _ = PY_PROCS.remove((id >> 32) as u32);
        process_event(FLAG_EVENT_EXIT);
    }
    0
}

/// Puts a frameless record for the current process in the sample ring, so that it is
/// ordered with the samples around it. Filtered like samples; a full ring drops it (the
/// agent's periodic scan catches up).
#[inline(always)]
fn process_event(flag: u32) {
    let id = bpf_get_current_pid_tgid();
    let pid = (id >> 32) as u32;
    let Some(config) = CONFIG.get(0) else { return };
    if config.filter_pids != 0 && PIDS.get_ptr(pid).is_none() {
        return;
    }
    let header = SampleHeader {
        pid,
        tid: id as u32,
        // SAFETY: helpers without preconditions.
        cpu: unsafe { bpf_get_smp_processor_id() },
        flags: flag,
        time_ns: unsafe { bpf_ktime_get_ns() },
        kernel_len: 0,
        user_len: 0,
        walk_end: WALK_FRAME_POINTERS,
        files: 0,
        comm: bpf_get_current_comm().unwrap_or([0; 16]),
        py_len: 0,
        py_status: 0,
        pad: 0,
    };
    let _ = SAMPLES.output::<SampleHeader>(&header, ring_wakeup(config.ring_wakeup_bytes));
}

/// Kernel time of every `cpu-clock` sample on this CPU, whoever takes it (this walker,
/// `perf record`, another profiler): slot 0 the entry time of the sample in progress,
/// 1 the total ns, 2 the count, 3 the timer of the sample in progress. Only `unwound
/// sample-cost` attaches the two programs below.
#[map]
static SAMPLE_COST: PerCpuArray<u64> = PerCpuArray::with_max_entries(4, 0);

/// Set by the agent: 0 the address of `perf_swevent_hrtimer` (the interrupt handler of
/// every software `cpu-clock` sampling event), 1 the byte offset of `function` in
/// `struct hrtimer` (from the kernel's BTF).
#[map]
static SAMPLE_COST_TARGET: Array<u64> = Array::with_max_entries(2, 0);

/// Raw tracepoint `hrtimer_expire_entry(struct hrtimer *, ktime_t *)`: an hrtimer's
/// callback starts; when it is the sampling handler, the sample's kernel work starts here.
#[raw_tracepoint(tracepoint = "hrtimer_expire_entry")]
pub fn sample_cost_enter(ctx: RawTracePointContext) -> i32 {
    let timer: u64 = ctx.arg(0);
    let (Some(&target), Some(&offset), Some(start), Some(owner)) = (
        SAMPLE_COST_TARGET.get(0),
        SAMPLE_COST_TARGET.get(1),
        SAMPLE_COST.get_ptr_mut(0),
        SAMPLE_COST.get_ptr_mut(3),
    ) else {
        return 0;
    };
    // SAFETY: a probe read of kernel memory (the timer's callback pointer) that may fail.
    let function = unsafe { bpf_probe_read_kernel((timer + offset) as *const u64) }.unwrap_or(0);
    if target != 0 && function == target {
        // SAFETY: per-CPU slots; hard-irq context, so nothing else on this CPU runs here.
        unsafe {
            *owner = timer;
            *start = bpf_ktime_get_ns();
        }
    }
    0
}

/// Raw tracepoint `hrtimer_expire_exit(struct hrtimer *)`: adds a sample's kernel time
/// (stack copies, BPF programs, output) to this CPU's total.
/// Only the exit of the timer that started the sample counts: the sampling handler runs in
/// hard-irq context, so no other hrtimer ends on this CPU between its entry and its exit,
/// and any other exit finds a start left over from a missed exit (the kernel does not run
/// this program inside itself) and clears it uncounted.
#[raw_tracepoint(tracepoint = "hrtimer_expire_exit")]
pub fn sample_cost_exit(ctx: RawTracePointContext) -> i32 {
    // SAFETY: helper without preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    let timer: u64 = ctx.arg(0);
    let (Some(start), Some(total), Some(n), Some(owner)) = (
        SAMPLE_COST.get_ptr_mut(0),
        SAMPLE_COST.get_ptr_mut(1),
        SAMPLE_COST.get_ptr_mut(2),
        SAMPLE_COST.get_ptr_mut(3),
    ) else {
        return 0;
    };
    // SAFETY: per-CPU slots, as above.
    unsafe {
        if *start != 0 {
            if *owner == timer && now >= *start {
                *total += now - *start;
                *n += 1;
            }
            *start = 0;
        }
    }
    0
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
