//! Aggregation of the walker's samples and their symbolization: a [`Collector`] takes the
//! [`Event`]s of [`Walker::drain`](crate::Walker::drain) and gives symbolized [`Stack`]s,
//! whatever became of the processes sampled.
//!
//! Samples are counted by (process, thread name, raw kernel stack, raw user stack) while
//! recording. Frames the kernel found in its own view of the process come with their
//! mapping's file (device, inode) and offset: they are named from the file the walker
//! identified and holds open ([`Event::File`]), whether or not the process still lives.
//! For the other frames, the first time a process is seen its mappings are snapshotted and
//! every executable file it maps is opened through `/proc/PID/map_files` — at that moment
//! the process is alive, so a binary deleted or replaced on disk, or one inside a
//! container, is still the one that ran. A file's symbols are read from that descriptor at
//! the end, and only for files with sampled addresses. When a new stack holds an address
//! outside the snapshot (a library loaded later), the snapshot is refreshed, at most once
//! every 200 ms per process.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use crate::Event;
use rayon::prelude::*;
use unwound_stackwalk_abi::{
    walk_end_name, PyFrameRecord, RecordFile, KMAP_ANON, PY_FRAME_ENTRY, WALK_COMPLETE, WALK_FRAME_POINTERS,
};
use unwound_symbolize::process::lookup_address;
use unwound_symbolize::python::{CodeCache, CodeObject, PyProcInfo};
use unwound_symbolize::{
    FileIdentity, KernelSymbols, ObjectInfo, Snapshot, Snapshots, Symbolized, Symbolizer,
};

/// Key of an aggregated stack.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct StackKey {
    /// Process id.
    pub pid: u32,
    /// How many times the process had called `execve` when the sample was taken: each
    /// program image has its own mappings.
    pub generation: u32,
    /// Thread name (`;` replaced by `:`).
    pub comm: String,
    /// Kernel frames, innermost first.
    pub kernel: Box<[u64]>,
    /// User frames, innermost first; the first is the sampled pc.
    pub user: Box<[u64]>,
    /// How the user walk ended (`WALK_*`).
    pub walk_end: u16,
    /// The mappings the kernel found some user frames in.
    pub files: Box<[RecordFile]>,
    /// The thread's Python frames, innermost first.
    pub python: Box<[PyFrameRecord]>,
}

/// Where in the source a frame is: one per inlined function, innermost first.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct SourceLine {
    /// The function (inlined or not) this line is in.
    pub function: String,
    /// Empty when unknown.
    pub file: String,
    /// 0 when unknown.
    pub line: u32,
}

/// One symbolized frame.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Frame {
    /// Function name, or a placeholder such as `libfoo.so+0x1234` or `[unknown]`.
    pub name: String,
    /// The object it is in (`[kernel.kallsyms]` for the kernel).
    pub module: String,
    /// The address looked up: a file virtual address for user frames, the kernel address
    /// for kernel frames; 0 when nothing is known.
    pub address: u64,
    /// A kernel frame.
    pub kernel: bool,
    /// Source lines from DWARF, innermost (inlined) first; empty without debuginfo. The
    /// last one's function is `name`.
    pub lines: Vec<SourceLine>,
}

impl Frame {
    fn plain(name: String, module: String, address: u64, kernel: bool) -> Self {
        Frame { name, module, address, kernel, lines: Vec::new() }
    }

    /// Function names root first: the function, then what was inlined into it.
    pub fn names_root_first(&self) -> impl Iterator<Item = &str> {
        let inlined = self.lines.len().saturating_sub(1);
        std::iter::once(self.name.as_str())
            .chain(self.lines[..inlined].iter().rev().map(|l| l.function.as_str()))
    }
}

/// A symbolized stack, root first.
#[derive(Clone, Debug)]
pub struct Stack {
    /// Process id.
    pub pid: u32,
    /// Thread name.
    pub comm: String,
    /// Root first: user frames outermost to innermost, then kernel frames likewise.
    pub frames: Vec<Frame>,
    /// Samples with this stack.
    pub count: u64,
}

/// Counts raw samples and keeps what is needed to symbolize them later.
#[derive(Default)]
pub struct Collector {
    stacks: HashMap<StackKey, u64>,
    /// Mappings and their objects per (pid, generation).
    snapshots: Snapshots,
    /// Current generation per pid (absent: 0).
    generations: HashMap<u32, u32>,
    /// Files the walker identified, by identity: frames in `StackKey::files` are named
    /// from them.
    objects: HashMap<FileIdentity, Arc<ObjectInfo>>,
    /// Mappings the walker read, per (pid, generation): frames of a process that exited
    /// before its own snapshot was taken are placed with them.
    walker_maps: HashMap<(u32, u32), Arc<unwound_symbolize::ProcessMaps>>,
    /// CPython processes, by (pid, generation): how to read their code objects.
    python: HashMap<(u32, u32), PyProcInfo>,
    /// Code objects read so far (as their samples arrive: the process may not outlive them).
    code_cache: Option<CodeCache>,
    /// The code object of each (pid, generation, code, check value) sampled, `None` when
    /// unreadable.
    code_names: HashMap<(u32, u32, u64, u64), Option<Arc<CodeObject>>>,
    /// Files in `objects` that only the collector held at the last interval's end.
    orphaned: std::collections::HashSet<FileIdentity>,
    /// Processes whose exit was seen this interval.
    exited: std::collections::HashSet<u32>,
    /// Python frames whose code object could not be read.
    pub python_unnamed: u64,
    /// Samples added.
    pub samples: u64,
    /// `execve` and exit events seen.
    pub execs: u64,
    /// Exit events seen.
    pub exits: u64,
    /// Records that were neither samples nor known events.
    pub malformed: u64,
}

/// The module of Python frames (their files are in their source lines).
pub const PYTHON_MODULE: &str = "[python]";

/// Most code objects kept read (each a few hundred bytes).
const MAX_CODE_OBJECTS: usize = 1 << 13;

/// Root frame of a stack whose walk reached a return address outside executable memory.
pub const INVALID_FRAME: &str = "[unwind: invalid frame]";

impl Collector {
    /// An empty collector.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one of the walker's events. An exec event starts a new generation of the
    /// process: later samples are symbolized with the new program's mappings, earlier ones
    /// with the old.
    pub fn add(&mut self, event: &Event<'_>) {
        let record = match event {
            Event::Sample(s) => s.record,
            Event::Exec { pid, .. } => {
                self.execs += 1;
                *self.generations.entry(*pid).or_default() += 1;
                // A thread other than the leader exec'ed: the leader's exit came first, yet
                // the process lives on.
                self.exited.remove(pid);
                return;
            }
            Event::Exit { pid } => {
                self.exits += 1;
                // Its last samples came before this: a process given its pid next is another
                // generation, with mappings of its own.
                *self.generations.entry(*pid).or_default() += 1;
                self.exited.insert(*pid);
                return;
            }
            Event::File { object } => {
                self.objects.insert(object.object().identity().clone(), object.clone());
                return;
            }
            Event::Python { pid, info } => {
                let generation = self.generations.get(pid).copied().unwrap_or(0);
                self.python.insert((*pid, generation), *info);
                return;
            }
            Event::Maps { pid, maps } => {
                let generation = self.generations.get(pid).copied().unwrap_or(0);
                self.walker_maps.insert((*pid, generation), maps.clone());
                return;
            }
            _ => {
                self.malformed += 1;
                return;
            }
        };
        let pid = record.header.pid;
        self.samples += 1;
        let generation = self.generations.get(&pid).copied().unwrap_or(0);
        let key = StackKey {
            pid,
            generation,
            comm: record.comm().replace(';', ":"),
            kernel: record.kernel.iter().collect(),
            user: record.user.iter().collect(),
            walk_end: record.header.walk_end,
            files: record.files.iter().collect(),
            python: record.python.iter().collect(),
        };
        if let Some(count) = self.stacks.get_mut(&key) {
            *count += 1;
            return;
        }
        self.read_code_objects(&key);
        // The process's maps are read only for frames the kernel did not place.
        let placed = |(i, &a): (usize, &u64)| record_file(&key.files, lookup_address(i, a)).is_some();
        if !key.user.iter().enumerate().all(placed) {
            self.snapshots.observe(key.pid, key.generation, &key.user);
        }
        self.stacks.insert(key, 1);
    }

    /// Reads the code objects of a new stack's Python frames now, while the process lives.
    fn read_code_objects(&mut self, key: &StackKey) {
        let Some(info) = self.python.get(&(key.pid, key.generation)) else { return };
        let cache = self.code_cache.get_or_insert_with(|| CodeCache::new(MAX_CODE_OBJECTS));
        for f in key.python.iter() {
            if let std::collections::hash_map::Entry::Vacant(v) =
                self.code_names.entry((key.pid, key.generation, f.code, f.checksum))
            {
                let read = cache.get(key.pid, info, f.code, f.checksum).ok();
                self.python_unnamed += u64::from(read.is_none());
                v.insert(read);
            }
        }
    }
}

impl Interval {
    /// The frame of Python frame `f` of process `pid` in its program image `generation`.
    fn python_frame(&self, (pid, generation): (u32, u32), f: &PyFrameRecord) -> Frame {
        let named = self.code_names.get(&(pid, generation, f.code, f.checksum)).and_then(Option::as_ref);
        let (Some(code), Some(info)) = (named, self.python.get(&(pid, generation))) else {
            return Frame::plain(format!("[python {:#x}]", f.code), PYTHON_MODULE.into(), f.code, false);
        };
        let index = info.instruction_index(f.code, f.instr & !PY_FRAME_ENTRY).unwrap_or(-1);
        let line = code.line(index).unwrap_or(0);
        let mut frame =
            Frame::plain(code.qualname.clone(), file_name(Path::new(&code.filename)), f.code, false);
        frame.lines.push(SourceLine { function: code.qualname.clone(), file: code.filename.clone(), line });
        frame
    }

    /// `native` (root first) with each `_PyEval_EvalFrameDefault` frame replaced by the
    /// Python frames its activation ran: the groups of `python` (innermost first, each
    /// ending at a frame marked as its activation's last), innermost group to the
    /// innermost eval frame. Groups without an eval frame (the native walk stopped before
    /// it) go above the outermost one placed, or on top when none is.
    fn merge_python(&self, pid: (u32, u32), native: Vec<Frame>, python: &[PyFrameRecord]) -> Vec<Frame> {
        let mut groups: Vec<Vec<Frame>> = vec![Vec::new()];
        for f in python {
            groups.last_mut().expect("one group").push(self.python_frame(pid, f));
            if f.instr & PY_FRAME_ENTRY != 0 {
                groups.push(Vec::new());
            }
        }
        groups.retain(|g| !g.is_empty());
        let evals: Vec<usize> = (0..native.len())
            .rev()
            .filter(|&i| native[i].name.starts_with("_PyEval_EvalFrameDefault"))
            .collect();
        let placed = evals.len().min(groups.len());
        let mut out = Vec::with_capacity(native.len() + python.len());
        let mut rest = groups.split_off(placed);
        if placed == 0 {
            out.extend(native);
            for g in rest.into_iter() {
                out.extend(g.into_iter().rev());
            }
            return out;
        }
        for (i, frame) in native.into_iter().enumerate() {
            match evals[..placed].iter().position(|&e| e == i) {
                Some(g) => {
                    if g == placed - 1 {
                        // The outermost placed group: the groups beyond it ran above it.
                        for extra in rest.drain(..).rev() {
                            out.extend(extra.into_iter().rev());
                        }
                    }
                    out.extend(std::mem::take(&mut groups[g]).into_iter().rev());
                }
                None => out.push(frame),
            }
        }
        out
    }
}

impl Collector {
    /// Hands over the stacks counted so far, with what symbolizing them needs, as an
    /// [`Interval`] (to symbolize on another thread while this collector goes on), and
    /// forgets what only they needed: the mappings of processes that have exited or
    /// exec'ed since, and files neither the walker nor a process still known holds.
    /// Counters (`samples`, `execs`, …) keep running.
    pub fn take_interval(&mut self) -> Interval {
        let stacks = std::mem::take(&mut self.stacks);
        let processes: std::collections::HashSet<(u32, u32)> =
            stacks.keys().map(|k| (k.pid, k.generation)).collect();
        let snapshots = processes
            .iter()
            .filter_map(|&(pid, generation)| {
                Some(((pid, generation), self.snapshots.get(pid, generation)?.clone()))
            })
            .collect();
        let walker_maps =
            processes.iter().filter_map(|k| Some((*k, self.walker_maps.get(k)?.clone()))).collect();
        let python = processes.iter().filter_map(|k| Some((*k, *self.python.get(k)?))).collect();
        let interval = Interval {
            stacks,
            snapshots,
            objects: self.objects.clone(),
            walker_maps,
            python,
            code_names: std::mem::take(&mut self.code_names),
        };
        // The interval's own reference to each file is not one that keeps it.
        self.forget(1);
        interval
    }

    /// Forgets the stacks counted so far, and what only they needed (see
    /// [`Collector::take_interval`]).
    pub fn end_interval(&mut self) {
        self.forget(0);
    }

    /// [`Collector::end_interval`], with `extra` references to each file held by an
    /// interval just taken.
    fn forget(&mut self, extra: usize) {
        self.stacks = HashMap::new();
        // A file the walker no longer holds (it unlisted it), and no snapshot maps, is kept
        // one more interval, for samples taken before it was unlisted and read after.
        let orphaned = &mut self.orphaned;
        self.objects.retain(|identity, o| {
            if Arc::strong_count(o) > 1 + extra {
                orphaned.remove(identity);
                true
            } else {
                orphaned.insert(identity.clone())
            }
        });
        orphaned.retain(|identity| self.objects.contains_key(identity));
        let alive = |pid: u32| Path::new(&format!("/proc/{pid}")).exists();
        // Processes whose exit was seen go without a look at /proc (under churn, tens of
        // thousands an interval); the others (an exit missed while the ring was full) are
        // looked up. A pid given to a new process since is snapshotted afresh.
        let exited = std::mem::take(&mut self.exited);
        self.generations.retain(|&pid, _| !exited.contains(&pid) && alive(pid));
        let generations = &self.generations;
        self.snapshots.retain(|pid, generation| {
            !exited.contains(&pid) && generations.get(&pid).copied().unwrap_or(0) == generation && alive(pid)
        });
        self.walker_maps.retain(|&(pid, generation), _| {
            !exited.contains(&pid) && generations.get(&pid).copied().unwrap_or(0) == generation && alive(pid)
        });
        let gone: Vec<(u32, u32)> = self
            .python
            .keys()
            .copied()
            .filter(|&(pid, generation)| {
                exited.contains(&pid)
                    || generations.get(&pid).copied().unwrap_or(0) != generation
                    || !alive(pid)
            })
            .collect();
        for k in &gone {
            self.python.remove(k);
        }
        let gone: std::collections::HashSet<u32> = gone.into_iter().map(|(pid, _)| pid).collect();
        if let Some(cache) = self.code_cache.as_mut().filter(|_| !gone.is_empty()) {
            cache.forget_processes(|pid| gone.contains(&pid));
        }
        self.code_names = HashMap::new();
    }

    /// Mapped files that could not be opened, or whose symbols, once needed, could not be
    /// read.
    pub fn symbol_errors(&self) -> u64 {
        self.snapshots.errors()
    }

    /// Perf maps read for JIT names, and what their reading kept and left out.
    pub fn perf_maps(&self) -> (u64, unwound_symbolize::PerfMapStats) {
        self.snapshots.perf_maps()
    }
}

/// One interval's stacks and what symbolizing them needs, taken from a [`Collector`] by
/// [`Collector::take_interval`]: `Send`, so they can be symbolized and written on another
/// thread while the collector goes on draining the walker.
pub struct Interval {
    stacks: HashMap<StackKey, u64>,
    snapshots: HashMap<(u32, u32), Snapshot>,
    objects: HashMap<FileIdentity, Arc<ObjectInfo>>,
    walker_maps: HashMap<(u32, u32), Arc<unwound_symbolize::ProcessMaps>>,
    python: HashMap<(u32, u32), PyProcInfo>,
    code_names: HashMap<(u32, u32, u64, u64), Option<Arc<CodeObject>>>,
}

impl Interval {
    /// Samples in the interval.
    pub fn samples(&self) -> u64 {
        self.stacks.values().sum()
    }

    /// Whether any stack has kernel frames (kernel symbols are read only then: reading
    /// `/proc/kallsyms` costs a tenth of a second of CPU).
    pub fn has_kernel_frames(&self) -> bool {
        self.stacks.keys().any(|k| !k.kernel.is_empty())
    }

    /// Every distinct kernel address in the stacks, as looked up (return addresses one
    /// byte back, like user frames).
    pub fn kernel_addresses(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self
            .stacks
            .keys()
            .flat_map(|k| k.kernel.iter().enumerate().map(|(i, &a)| lookup_address(i, a)))
            .collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    /// Symbolizes every stack: user frames through `symbolizer` (DWARF lines and inlined
    /// frames, symbol tables otherwise), kernel frames through `kernel` (which may be
    /// empty when kernel symbols are unavailable).
    pub fn symbolize(&self, kernel: &KernelSymbols, symbolizer: &Symbolizer) -> Vec<Stack> {
        let resolved = self.resolve_user(symbolizer);
        let mut out: HashMap<(u32, String, Vec<Frame>), u64> = HashMap::new();
        for (key, &count) in &self.stacks {
            let process = self.snapshots.get(&(key.pid, key.generation));
            let mut frames = Vec::with_capacity(key.user.len() + key.kernel.len() + 1);
            // A return address outside executable memory means the walk went astray
            // (a frame without a frame pointer); it and everything above it are dropped
            // and the stack is marked, rather than shown as made-up callers.
            let table_walk = key.walk_end != WALK_FRAME_POINTERS;
            if table_walk && key.walk_end != WALK_COMPLETE && !key.user.is_empty() {
                frames.push(Frame::plain(
                    format!("[unwind: {}]", walk_end_name(key.walk_end)),
                    "[unknown]".into(),
                    0,
                    false,
                ));
            }
            let valid = match process {
                Some(p) if !p.maps.is_empty() && !table_walk && key.files.is_empty() => key
                    .user
                    .iter()
                    .position(|&a| !p.maps.find(a).is_some_and(|m| m.executable))
                    .unwrap_or(key.user.len()),
                _ => key.user.len(),
            };
            if valid < key.user.len() {
                frames.push(Frame::plain(INVALID_FRAME.into(), "[unknown]".into(), 0, false));
            }
            let user: Vec<Frame> = key.user[..valid]
                .iter()
                .enumerate()
                .rev()
                .map(|(i, &addr)| self.user_frame(key, process, lookup_address(i, addr), &resolved))
                .collect();
            if key.python.is_empty() {
                frames.extend(user);
            } else {
                frames.extend(self.merge_python((key.pid, key.generation), user, &key.python));
            }
            for (i, &addr) in key.kernel.iter().enumerate().rev() {
                let lookup = lookup_address(i, addr);
                frames.push(kernel_frame(kernel, lookup));
            }
            *out.entry((key.pid, key.comm.clone(), frames)).or_default() += count;
        }
        let mut stacks: Vec<Stack> =
            out.into_iter().map(|((pid, comm, frames), count)| Stack { pid, comm, frames, count }).collect();
        stacks.sort_by(|a, b| {
            b.count
                .cmp(&a.count)
                .then_with(|| a.pid.cmp(&b.pid))
                .then_with(|| a.frames.len().cmp(&b.frames.len()))
        });
        stacks
    }
}

/// Answers of the symbolizer per (file, file virtual address).
type Resolved = HashMap<(usize, u64), Symbolized>;

fn file_id(f: &Arc<ObjectInfo>) -> usize {
    Arc::as_ptr(f) as usize
}

impl Interval {
    /// Every user address of every stack, symbolized per file (files in parallel).
    fn resolve_user(&self, symbolizer: &Symbolizer) -> Resolved {
        let mut wanted: HashMap<usize, (Arc<ObjectInfo>, Vec<u64>)> = HashMap::new();
        for key in self.stacks.keys() {
            let p = self.snapshots.get(&(key.pid, key.generation));
            for (i, &addr) in key.user.iter().enumerate() {
                let lookup = lookup_address(i, addr);
                let Some((info, offset)) = self.place(key, p, &key.files, lookup) else { continue };
                if info.object().read_path().is_none() {
                    continue;
                }
                if let Some(v) = info.file_offset_to_vaddr(offset) {
                    wanted.entry(file_id(info)).or_insert_with(|| (info.clone(), Vec::new())).1.push(v);
                }
            }
        }
        wanted
            .into_par_iter()
            .flat_map_iter(|(id, (info, mut vaddrs))| {
                vaddrs.sort_unstable();
                vaddrs.dedup();
                let path = info.object().read_path().unwrap_or_default();
                let answers = symbolizer.symbolize_elf(&path, &vaddrs).unwrap_or_default();
                vaddrs
                    .into_iter()
                    .zip(answers)
                    .filter_map(move |(v, r)| r.ok().map(|s| ((id, v), s)))
                    .collect::<Vec<_>>()
            })
            .collect()
    }
}

/// A path's last component, as frames show their module.
fn file_name(path: &Path) -> String {
    let s = path.to_string_lossy();
    let s = s.strip_suffix(" (deleted)").unwrap_or(&s);
    s.rsplit('/').next().unwrap_or(s).to_string()
}

/// The record file that holds `addr`, if the kernel placed it.
fn record_file(files: &[RecordFile], addr: u64) -> Option<&RecordFile> {
    files.iter().find(|f| f.start <= addr && addr < f.end)
}

impl Interval {
    /// The object and file offset of user address `addr`: from the record's files (the
    /// kernel's view), else the process's snapshot.
    fn place<'a>(
        &'a self,
        key: &StackKey,
        process: Option<&'a Snapshot>,
        files: &[RecordFile],
        addr: u64,
    ) -> Option<(&'a Arc<ObjectInfo>, u64)> {
        if let Some(f) = record_file(files, addr) {
            if f.flags & KMAP_ANON != 0 {
                return None;
            }
            let identity =
                FileIdentity::Inode { device: f.file.device_text().to_string(), inode: f.file.ino };
            return Some((self.objects.get(&identity)?, addr - f.start + f.offset));
        }
        if let Some((m, Some(info))) = process.and_then(|p| p.find(addr)) {
            return Some((info, m.file_offset(addr)));
        }
        // The walker's reading of the process's maps, with the files it identified.
        let m = self.walker_maps.get(&(key.pid, key.generation))?.find(addr)?;
        Some((self.objects.get(&FileIdentity::of(m)?)?, m.file_offset(addr)))
    }

    fn user_frame(
        &self,
        key: &StackKey,
        process: Option<&Snapshot>,
        addr: u64,
        resolved: &Resolved,
    ) -> Frame {
        let unknown = Frame::plain("[unknown]".into(), "[unknown]".into(), 0, false);
        let placed = self.place(key, process, &key.files, addr);
        if let Some(f) = record_file(&key.files, addr) {
            return match placed {
                Some((info, offset)) => {
                    let module = file_name(info.object().path());
                    named_frame(info, module, offset, resolved)
                }
                // Anonymous memory (JIT code) is named by the process's perf map, if read.
                None if f.flags & KMAP_ANON != 0 => snapshot_frame(process, addr, resolved),
                None => unknown,
            };
        }
        if process.and_then(|p| p.find(addr)).is_none() {
            if let Some((info, offset)) = placed {
                return named_frame(info, file_name(info.object().path()), offset, resolved);
            }
        }
        snapshot_frame(process, addr, resolved)
    }
}

fn snapshot_frame(process: Option<&Snapshot>, addr: u64, resolved: &Resolved) -> Frame {
    let unknown = Frame::plain("[unknown]".into(), "[unknown]".into(), 0, false);
    let Some(p) = process else { return unknown };
    let Some((m, info)) = p.find(addr) else { return unknown };
    let module = m.short_name();
    let offset = m.file_offset(addr);
    if let Some(name) = p.jit_name(addr) {
        // JIT code, named by its runtime's perf map (with the source the name holds); the
        // address is the process's own.
        let mut frame = Frame::plain(name.to_string(), module, addr, false);
        if let Some((file, line)) = unwound_symbolize::jit_source(name.as_str()) {
            frame.lines.push(SourceLine { function: frame.name.clone(), file: file.to_string(), line });
        }
        return frame;
    }
    match info {
        Some(info) => named_frame(info, module, offset, resolved),
        None => Frame::plain(format!("{module}+{offset:#x}"), module, offset, false),
    }
}

/// The frame at file offset `offset` of `info`, from what the symbolizer answered.
fn named_frame(info: &Arc<ObjectInfo>, module: String, offset: u64, resolved: &Resolved) -> Frame {
    let Some(v) = info.file_offset_to_vaddr(offset) else {
        return Frame::plain(format!("{module}+{offset:#x}"), module, offset, false);
    };
    let fallback = || info.symbols()?.lookup(v).map(|s| s.name.to_string());
    match resolved.get(&(file_id(info), v)) {
        Some(sym) => {
            let lines: Vec<SourceLine> = sym
                .frames
                .iter()
                .map(|f| SourceLine {
                    function: f.function.as_deref().unwrap_or("??").to_string(),
                    file: f.file.as_deref().unwrap_or("").to_string(),
                    line: f.line,
                })
                .collect();
            let name = sym
                .frames
                .last()
                .and_then(|f| f.function.as_deref().map(str::to_string))
                // No symbol: one name per function `.eh_frame` delimits, so its samples add up.
                .or_else(|| {
                    let start = sym.frames.last()?.source?.function_start()?;
                    Some(format!("{module}+{start:#x}"))
                })
                .or_else(fallback)
                .unwrap_or_else(|| format!("{module}+{offset:#x}"));
            Frame { name, module, address: v, kernel: false, lines }
        }
        None => {
            let name = fallback().unwrap_or_else(|| format!("{module}+{offset:#x}"));
            Frame::plain(name, module, v, false)
        }
    }
}

fn kernel_frame(kernel: &KernelSymbols, addr: u64) -> Frame {
    match kernel.lookup(addr) {
        Some(s) => Frame::plain(
            s.name.to_string(),
            s.module.map_or_else(|| "[kernel.kallsyms]".to_string(), |m| format!("[{m}]")),
            addr,
            true,
        ),
        None => Frame::plain("[unknown]".into(), "[kernel.kallsyms]".into(), addr, true),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use unwound_symbolize::MappedObject;

    /// A file the walker identified, as its [`Event::File`] hands it over.
    fn identified(path: &str) -> Arc<ObjectInfo> {
        use std::os::unix::fs::MetadataExt as _;
        let file = std::fs::File::open(path).unwrap();
        let md = file.metadata().unwrap();
        let identity = FileIdentity::Inode { device: format!("{:x}", md.dev()), inode: md.ino() };
        Arc::new(ObjectInfo::new(MappedObject::from_file(file, path.into(), identity)))
    }

    /// Files are kept while the walker holds them, one interval more once it lets go (for
    /// samples taken before and read after), then closed.
    #[test]
    fn files_the_walker_let_go_are_kept_one_interval_then_closed() {
        let mut c = Collector::new();
        let (held, dropped) = (identified("/proc/self/exe"), identified("/bin/sh"));
        c.add(&Event::File { object: held.clone() });
        c.add(&Event::File { object: dropped.clone() });
        let weak = Arc::downgrade(&dropped);
        drop(dropped);
        let interval = c.take_interval();
        assert_eq!(interval.objects.len(), 2, "the interval names frames in both");
        drop(interval);
        assert_eq!(c.objects.len(), 2, "one interval's grace for the file let go");
        c.end_interval();
        assert_eq!(c.objects.len(), 1, "then it goes");
        assert!(weak.upgrade().is_none(), "and is closed");
        for _ in 0..3 {
            c.end_interval();
        }
        assert!(c.objects.contains_key(held.object().identity()), "the file still held stays");
    }
}
