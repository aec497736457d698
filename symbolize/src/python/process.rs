//! [`PythonProcess`]: a live CPython process, recognised and checked once, and the
//! userspace reference walker of its threads' Python stacks.

use std::path::{Path, PathBuf};

use super::binary::{KeyRef, PythonBinary, TsdLayout};
use super::code::{read_str_c, CodeCache, CodeHeader};
use super::info::{FrameClass, PyProcInfo, NO_OFFSET};
use super::memory::RemoteMemory;
use super::{DisableReason, PythonError, PythonVersion};
use crate::{Mapping, ProcessMaps};

/// Most Python frames the reference walker follows per thread (then `truncated`).
pub const MAX_FRAMES: usize = 4096;
/// Most thread states followed per interpreter.
pub const MAX_THREADS: usize = 4096;

/// `PyTypeObject.tp_members` (stable from 3.11 to 3.13).
const TP_MEMBERS: u64 = 240;
/// `sizeof(PyMemberDef)`: name, type, offset, flags, doc.
const MEMBER_DEF_SIZE: u64 = 40;

/// A CPython 3.11–3.13 process whose layout passed every check: what a walker needs
/// ([`info`](Self::info)) and a reference walker ([`stacks`](Self::stacks)).
#[derive(Clone, Debug)]
pub struct PythonProcess {
    pid: u32,
    binary: PythonBinary,
    info: PyProcInfo,
}

/// One Python frame, as named by the reference walker.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PyFrame {
    /// The code object's `co_qualname`.
    pub qualname: String,
    /// The code object's `co_filename`.
    pub file: String,
    /// The line of the instruction the frame is at (`None`: an instruction with no line).
    pub line: Option<u32>,
    /// The code object's address.
    pub code: u64,
    /// The instruction's index in code units ([`PyProcInfo::instruction_index`]).
    pub instruction: i64,
    /// The last (outermost) frame run by its `_PyEval_EvalFrameDefault` activation, i.e.
    /// called from C: 3.11's `is_entry`; on 3.12+ the frame a C-stack entry frame follows.
    pub entry: bool,
}

/// One thread's Python stack, innermost frame first.
#[derive(Debug)]
pub struct PyThreadStack {
    /// `native_thread_id`: the kernel TID in the process's PID namespace.
    pub native_tid: u32,
    /// The `PyThreadState` address.
    pub thread_state: u64,
    /// `thread_id`: the `pthread_t`, which is the thread's `%fs` base on x86-64 glibc.
    pub pthread: u64,
    /// The value of the interpreter's pthread key for this thread, read at `pthread +
    /// tss_slot` (what the kernel walker reads); equal to `thread_state` when the TSS path
    /// is right. `None` when the read failed.
    pub tss_thread_state: Option<u64>,
    /// The Python frames, innermost first (C-stack entry frames left out).
    pub frames: Vec<PyFrame>,
    /// More than [`MAX_FRAMES`] frames: the outermost are missing.
    pub truncated: bool,
    /// The walk stopped at a frame that could not be read or named (a thread that moved
    /// on while being read): `frames` holds those before it.
    pub error: Option<PythonError>,
}

/// A thread state found by following the interpreter's thread list.
#[derive(Clone, Copy, Debug)]
struct ThreadState {
    address: u64,
    native_tid: u32,
    pthread: u64,
}

/// A frame of the chain before naming.
struct RawFrame {
    code: u64,
    instr: u64,
    entry: bool,
}

impl PythonProcess {
    /// Recognises process `pid` as CPython 3.11–3.13 and checks what its frames will be
    /// read with. `Ok(None)` when no mapped file holds a Python runtime (or the process is
    /// gone); [`PythonError::Disabled`] with the reason when it does but a check fails.
    ///
    /// The runtime is looked for in mapped `libpython*` files first, then in the
    /// executable; files are opened through `/proc/PID/map_files` (else
    /// `/proc/PID/root/PATH`), so a deleted or containerised interpreter is the one read.
    pub fn detect(pid: u32) -> Result<Option<Self>, PythonError> {
        Detector::new().detect(pid)
    }
}

/// Detects CPython processes like [`PythonProcess::detect`], remembering what it read of
/// each interpreter binary and C library (by device, inode, size, and modification and
/// change times: a file replaced under a reused inode number differs in its change time),
/// so that a machine that starts Python processes many times a second has each file read
/// once, not once per process.
///
/// ```no_run
/// let mut detector = unwound_symbolize::python::Detector::new();
/// if let Ok(Some(p)) = detector.detect(1234) {
///     println!("CPython {:#x}", p.info().version);
/// }
/// ```
#[derive(Debug, Default)]
pub struct Detector {
    /// Each file's runtime (`None`: it holds none).
    binaries: std::collections::HashMap<FileKey, Option<PythonBinary>>,
    tsd: std::collections::HashMap<FileKey, TsdLayout>,
}

/// A file as read: device, inode, size, modification and change times (ns).
type FileKey = (u64, u64, u64, i64, i64, i64, i64);

/// Files remembered at most (each kind); beyond, the memory is started afresh.
const MAX_REMEMBERED_FILES: usize = 256;

fn file_key(path: &Path) -> Option<FileKey> {
    use std::os::unix::fs::MetadataExt as _;
    let md = std::fs::metadata(path).ok()?;
    Some((md.dev(), md.ino(), md.size(), md.mtime(), md.mtime_nsec(), md.ctime(), md.ctime_nsec()))
}

impl Detector {
    /// A detector that has read nothing yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// [`PythonProcess::detect`], with the files already read taken from memory.
    pub fn detect(&mut self, pid: u32) -> Result<Option<PythonProcess>, PythonError> {
        let maps = ProcessMaps::read(pid).map_err(|source| PythonError::Maps { pid, source })?;
        let exe = std::fs::read_link(format!("/proc/{pid}/exe")).ok();
        let mut candidates: Vec<&Mapping> = Vec::new();
        let libpython = maps.iter().filter(|m| m.short_name().starts_with("libpython"));
        let executable = maps.iter().filter(|m| m.path.is_some() && m.path == exe);
        for m in libpython.chain(executable) {
            if !candidates.iter().any(|c| same_file(c, m)) {
                candidates.push(m);
            }
        }
        for mapping in candidates {
            let path = open_path(pid, mapping);
            let key = file_key(&path);
            let binary = match key.and_then(|k| self.binaries.get(&k)) {
                Some(b) => b.clone(),
                None => {
                    let b = PythonBinary::open(&path)?;
                    if let Some(k) = key {
                        if self.binaries.len() >= MAX_REMEMBERED_FILES {
                            self.binaries.clear();
                        }
                        self.binaries.insert(k, b.clone());
                    }
                    b
                }
            };
            if let Some(binary) = binary {
                return PythonProcess::attach(pid, &maps, mapping, binary, self).map(Some);
            }
        }
        Ok(None)
    }

    /// The TSD layout of the C library at `path`.
    fn tsd_layout(&mut self, path: &Path) -> Result<TsdLayout, PythonError> {
        let key = file_key(path);
        if let Some(t) = key.and_then(|k| self.tsd.get(&k)) {
            return Ok(*t);
        }
        let t = TsdLayout::of_glibc(path)?;
        if let Some(k) = key {
            if self.tsd.len() >= MAX_REMEMBERED_FILES {
                self.tsd.clear();
            }
            self.tsd.insert(k, t);
        }
        Ok(t)
    }
}

impl PythonProcess {
    /// Checks `binary` (mapped at `mapping`) against the live process and fills the
    /// process-specific parts of its [`PyProcInfo`].
    fn attach(
        pid: u32,
        maps: &ProcessMaps,
        mapping: &Mapping,
        binary: PythonBinary,
        detector: &mut Detector,
    ) -> Result<Self, PythonError> {
        let mem = RemoteMemory { pid };
        let path = binary.path().to_path_buf();
        let disabled = |reason| PythonError::Disabled { binary: path.clone(), reason };
        // The executable segment decides the bias (see LoadSegments::bias).
        let exec = maps.iter().find(|m| m.executable && same_file(m, mapping)).unwrap_or(mapping);
        let bias = binary
            .segments()
            .bias(exec.start, exec.offset, exec.end - exec.start)
            .ok_or(disabled(DisableReason::UnreadableData { vaddr: 0 }))?;
        let (runtime, py_none, code_type) = binary.symbol_vaddrs();
        let mut info = PyProcInfo {
            runtime: runtime.wrapping_add(bias),
            py_none: py_none.wrapping_add(bias),
            code_type: code_type.wrapping_add(bias),
            ..binary.offsets()
        };

        if let Some(KeyRef::ViaGot { got_vaddr, .. }) = binary.key_ref() {
            if mem.u64(got_vaddr.wrapping_add(bias))? != info.runtime {
                return Err(disabled(DisableReason::TssKeyMismatch));
            }
        }
        let key_at = mem.at(info.runtime, info.runtime_tss_key)?;
        if mem.u32(key_at - 4)? == 0 {
            return Err(disabled(DisableReason::TssNotCreated));
        }
        info.tss_key = mem.u32(key_at)?;

        check_code_members(&mem, &info).map_err(|e| match e {
            PythonError::Read { .. } | PythonError::InvalidObject { .. } => {
                disabled(DisableReason::CodeLayoutMismatch)
            }
            other => other,
        })?;

        let libc = maps
            .iter()
            .find(|m| {
                let name = m.short_name();
                name == "libc.so.6" || (name.starts_with("libc-2.") && name.ends_with(".so"))
            })
            .ok_or(disabled(DisableReason::NoGlibc))?;
        let tsd = detector.tsd_layout(&open_path(pid, libc))?;
        if info.tss_key >= tsd.max_key {
            return Err(disabled(DisableReason::TssKeyTooLarge { key: info.tss_key }));
        }
        info.tss_slot = tsd.first_slot + 16 * u64::from(info.tss_key);

        let process = PythonProcess { pid, binary, info };
        process.self_test().map_err(|e| match e {
            PythonError::Read { .. } | PythonError::InvalidObject { .. } => {
                disabled(DisableReason::SelfTestFailed)
            }
            other => other,
        })?;
        Ok(process)
    }

    /// The main thread's (else the first) thread state must be its own pthread-key value,
    /// and its frames' code objects must be code objects.
    fn self_test(&self) -> Result<(), PythonError> {
        let threads = self.thread_states()?;
        let Some(t) = threads.iter().find(|t| t.native_tid == self.pid).or(threads.first()) else {
            return Err(self.disabled(DisableReason::NotInitialized));
        };
        let mem = self.memory();
        if mem.u64(t.pthread.wrapping_add(self.info.tss_slot))? != t.address {
            return Err(self.disabled(DisableReason::SelfTestFailed));
        }
        let (frames, _) = self.raw_frames(t.address, 64)?;
        for f in frames {
            CodeHeader::read(&mem, &self.info, f.code)?;
        }
        Ok(())
    }

    fn disabled(&self, reason: DisableReason) -> PythonError {
        PythonError::Disabled { binary: self.binary.path().to_path_buf(), reason }
    }

    /// The process.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The interpreter's version.
    pub fn version(&self) -> PythonVersion {
        self.binary.version()
    }

    /// The file holding `_PyRuntime` (as opened: a `/proc/PID/map_files` or
    /// `/proc/PID/root` path).
    pub fn binary_path(&self) -> &Path {
        self.binary.path()
    }

    /// The interpreter's file as read.
    pub fn binary(&self) -> &PythonBinary {
        &self.binary
    }

    /// What a walker needs: addresses and offsets, checked.
    pub fn info(&self) -> &PyProcInfo {
        &self.info
    }

    fn memory(&self) -> RemoteMemory {
        RemoteMemory { pid: self.pid }
    }

    /// The main interpreter's thread states (`interpreters.head → threads.head → next`).
    fn thread_states(&self) -> Result<Vec<ThreadState>, PythonError> {
        let mem = self.memory();
        let info = &self.info;
        let interp = mem.u64(mem.at(info.runtime, info.runtime_interpreters_head)?)?;
        if interp == 0 {
            return Ok(Vec::new());
        }
        let mut tstate = mem.u64(mem.at(interp, info.interp_threads_head)?)?;
        let mut out = Vec::new();
        while tstate != 0 && out.len() < MAX_THREADS {
            let native_tid = mem.u64(mem.at(tstate, info.tstate_native_thread_id)?)?;
            let pthread = mem.u64(mem.at(tstate, info.tstate_thread_id)?)?;
            out.push(ThreadState { address: tstate, native_tid: native_tid as u32, pthread });
            tstate = mem.u64(mem.at(tstate, info.tstate_next)?)?;
        }
        Ok(out)
    }

    /// The frame chain of thread state `tstate`, at most `max` Python frames, by
    /// [`PyProcInfo::classify_frame`]; true when cut at `max`.
    fn raw_frames(&self, tstate: u64, max: usize) -> Result<(Vec<RawFrame>, bool), PythonError> {
        let mem = self.memory();
        let info = &self.info;
        let mut frame = mem.u64(mem.at(tstate, info.tstate_frame)?)?;
        if info.cframe_current_frame != NO_OFFSET && frame != 0 {
            frame = mem.u64(mem.at(frame, info.cframe_current_frame)?)?;
        }
        let mut out = Vec::new();
        // Entry frames are not counted by `max`; bound the whole walk too.
        let mut steps = 0;
        while frame != 0 {
            if out.len() == max || steps == 2 * max {
                return Ok((out, true));
            }
            steps += 1;
            let header = mem.vec(frame, info.frame_read_size as usize)?;
            let bad = || PythonError::InvalidObject { addr: frame, problem: super::ObjectProblem::NotCode };
            match info.classify_frame(&header).ok_or_else(bad)? {
                FrameClass::Python { code, instr, entry } => out.push(RawFrame { code, instr, entry }),
                // 3.12+: the frame before an entry frame is its activation's last.
                FrameClass::CStackEntry => {
                    if let Some(last) = out.last_mut() {
                        last.entry = true;
                    }
                }
            }
            frame = info.previous_frame(&header).ok_or_else(bad)?;
        }
        Ok((out, false))
    }

    /// Every thread's Python stack, innermost frame first, read from the process with the
    /// same rules as the kernel walker (reference walker; the threads keep running, so a
    /// running thread's stack is a best effort). Code objects are named through a cache
    /// of this call's own.
    pub fn stacks(&self) -> Result<Vec<PyThreadStack>, PythonError> {
        self.stacks_with(&mut CodeCache::new(4096))
    }

    /// [`stacks`](Self::stacks), naming code objects through `cache`.
    pub fn stacks_with(&self, cache: &mut CodeCache) -> Result<Vec<PyThreadStack>, PythonError> {
        let mem = self.memory();
        let mut out = Vec::new();
        for t in self.thread_states()? {
            let tss_thread_state = mem.u64(t.pthread.wrapping_add(self.info.tss_slot)).ok();
            let mut stack = PyThreadStack {
                native_tid: t.native_tid,
                thread_state: t.address,
                pthread: t.pthread,
                tss_thread_state,
                frames: Vec::new(),
                truncated: false,
                error: None,
            };
            match self.raw_frames(t.address, MAX_FRAMES) {
                Ok((frames, truncated)) => {
                    stack.truncated = truncated;
                    for f in frames {
                        match self.name_frame(cache, &f) {
                            Ok(frame) => stack.frames.push(frame),
                            Err(e) => {
                                stack.error = Some(e);
                                break;
                            }
                        }
                    }
                }
                Err(e) => stack.error = Some(e),
            }
            out.push(stack);
        }
        Ok(out)
    }

    fn name_frame(&self, cache: &mut CodeCache, f: &RawFrame) -> Result<PyFrame, PythonError> {
        let header = CodeHeader::read(&self.memory(), &self.info, f.code)?;
        let object = cache.get(self.pid, &self.info, f.code, header.checksum)?;
        let instruction = self.info.instruction_index(f.code, f.instr).unwrap_or(-1);
        Ok(PyFrame {
            qualname: object.qualname.clone(),
            file: object.filename.clone(),
            line: object.line(instruction),
            code: f.code,
            instruction,
            entry: f.entry,
        })
    }
}

/// The code members the offsets name must be where `PyCode_Type.tp_members` says.
fn check_code_members(mem: &RemoteMemory, info: &PyProcInfo) -> Result<(), PythonError> {
    let members = mem.u64(info.code_type + TP_MEMBERS)?;
    let mut expected = [
        ("co_filename", info.code_filename, false),
        ("co_name", info.code_name, false),
        ("co_qualname", info.code_qualname, false),
        ("co_linetable", info.code_linetable, false),
        ("co_firstlineno", info.code_firstlineno, false),
    ];
    for i in 0..64 {
        let def = mem.vec(members + i * MEMBER_DEF_SIZE, MEMBER_DEF_SIZE as usize)?;
        let name_ptr = u64::from_le_bytes(def[0..8].try_into().unwrap_or_default());
        if name_ptr == 0 {
            break;
        }
        let offset = u64::from_le_bytes(def[16..24].try_into().unwrap_or_default());
        let name = read_str_c(mem, name_ptr, 32)?;
        for (member, at, seen) in expected.iter_mut() {
            if name.as_bytes() == member.as_bytes() {
                if offset != u64::from(*at) {
                    return Err(PythonError::InvalidObject {
                        addr: info.code_type,
                        problem: super::ObjectProblem::NotCode,
                    });
                }
                *seen = true;
            }
        }
    }
    if expected.iter().all(|(_, _, seen)| *seen) {
        Ok(())
    } else {
        Err(PythonError::InvalidObject { addr: info.code_type, problem: super::ObjectProblem::NotCode })
    }
}

fn same_file(a: &Mapping, b: &Mapping) -> bool {
    if a.inode != 0 || b.inode != 0 {
        a.inode == b.inode && a.device == b.device
    } else {
        a.path == b.path
    }
}

/// `/proc/PID/map_files/RANGE` when it opens (it needs `CAP_SYS_ADMIN`), else
/// `/proc/PID/root/PATH`.
fn open_path(pid: u32, m: &Mapping) -> PathBuf {
    let map_file = PathBuf::from(format!("/proc/{pid}/map_files/{}", m.map_files_name()));
    if std::fs::File::open(&map_file).is_ok() {
        return map_file;
    }
    let path = m.path.as_deref().unwrap_or(Path::new(""));
    let mut root = PathBuf::from(format!("/proc/{pid}/root"));
    root.push(path.strip_prefix("/").unwrap_or(path));
    root
}
