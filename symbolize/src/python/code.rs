//! Code objects read from a live process ([`CodeObject`]) and their cache ([`CodeCache`]).

use std::num::NonZeroUsize;
use std::sync::Arc;

use super::info::{code_checksum, PyProcInfo};
use super::linetable::line_for_instruction;
use super::memory::RemoteMemory;
use super::{ObjectProblem, PythonError};

/// Most bytes of one string read (a longer name is cut, and ends with `…`).
pub const MAX_STRING_BYTES: usize = 1024;
/// Most bytes of one location table read (a longer one is cut: later units have no line).
pub const MAX_LINETABLE_BYTES: usize = 64 * 1024;

/// What names one code object: read from the process once, then cached.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CodeObject {
    /// `co_qualname`, e.g. `Worker.run.<locals>.inner`.
    pub qualname: String,
    /// `co_filename`, as the interpreter has it (often absolute).
    pub filename: String,
    /// `co_firstlineno`.
    pub firstlineno: i32,
    /// [`code_checksum`] of the object when it was read.
    pub checksum: u64,
    linetable: Box<[u8]>,
}

impl CodeObject {
    /// Reads the code object at `code` in process `pid`. Checks that it is a code object
    /// (`ob_type == PyCode_Type`) and, when `checksum` is given, that it is still the one
    /// the checksum was taken from ([`ObjectProblem::Stale`] otherwise).
    pub fn read(pid: u32, info: &PyProcInfo, code: u64, checksum: Option<u64>) -> Result<Self, PythonError> {
        let mem = RemoteMemory { pid };
        let header = CodeHeader::read(&mem, info, code)?;
        if checksum.is_some_and(|c| c != header.checksum) {
            return Err(PythonError::InvalidObject { addr: code, problem: ObjectProblem::Stale });
        }
        let qualname = read_str(&mem, info, header.qualname)?;
        let filename = read_str(&mem, info, header.filename)?;
        let linetable = read_bytes(&mem, info, header.linetable, MAX_LINETABLE_BYTES)?;
        Ok(CodeObject {
            qualname,
            filename,
            firstlineno: header.firstlineno,
            checksum: header.checksum,
            linetable: linetable.into_boxed_slice(),
        })
    }

    /// The source line of the instruction at `index` code units (see
    /// [`PyProcInfo::instruction_index`]): −1 (not started) gives `co_firstlineno`; `None`
    /// for an instruction with no line.
    pub fn line(&self, index: i64) -> Option<u32> {
        if index < 0 {
            return u32::try_from(self.firstlineno).ok();
        }
        line_for_instruction(&self.linetable, self.firstlineno, index)
    }

    /// The location table as read (at most [`MAX_LINETABLE_BYTES`]).
    pub fn linetable(&self) -> &[u8] {
        &self.linetable
    }

    /// Bytes this entry holds, for cache budgets.
    fn weight(&self) -> usize {
        std::mem::size_of::<Self>() + self.qualname.len() + self.filename.len() + self.linetable.len()
    }
}

/// The fields of a code object's fixed part that name it.
pub(crate) struct CodeHeader {
    pub(crate) firstlineno: i32,
    pub(crate) filename: u64,
    pub(crate) qualname: u64,
    pub(crate) linetable: u64,
    pub(crate) checksum: u64,
}

impl CodeHeader {
    /// One read of the code object's fixed fields; fails unless `ob_type == PyCode_Type`.
    pub(crate) fn read(mem: &RemoteMemory, info: &PyProcInfo, code: u64) -> Result<Self, PythonError> {
        let fields = [
            info.object_type,
            info.code_firstlineno,
            info.code_filename,
            info.code_qualname,
            info.code_linetable,
        ];
        let len = fields.iter().map(|f| *f as usize + 8).max().unwrap_or(0);
        let bytes = mem.vec(code, len)?;
        let u64_at = |at: u32| {
            let at = at as usize;
            bytes.get(at..at + 8).map_or(0, |b| u64::from_le_bytes(b.try_into().unwrap_or_default()))
        };
        if u64_at(info.object_type) != info.code_type {
            return Err(PythonError::InvalidObject { addr: code, problem: ObjectProblem::NotCode });
        }
        let firstlineno = u64_at(info.code_firstlineno) as u32;
        let (filename, qualname) = (u64_at(info.code_filename), u64_at(info.code_qualname));
        Ok(CodeHeader {
            firstlineno: firstlineno as i32,
            filename,
            qualname,
            linetable: u64_at(info.code_linetable),
            checksum: code_checksum(firstlineno, filename, qualname),
        })
    }
}

/// A `str` object's text, as UTF-8 (compact strings only: every name and file name of a
/// code object is one). At most [`MAX_STRING_BYTES`] are read.
pub(crate) fn read_str(mem: &RemoteMemory, info: &PyProcInfo, addr: u64) -> Result<String, PythonError> {
    let bad = |problem| PythonError::InvalidObject { addr, problem };
    let length = mem.u64(mem.at(addr, info.unicode_length)?)?;
    let state = mem.u32(mem.at(addr, info.unicode_state)?)?;
    let kind = (state >> 2) & 7;
    let compact = state & (1 << 5) != 0;
    let ascii = state & (1 << 6) != 0;
    if !compact {
        return Err(bad(ObjectProblem::NotCompactString));
    }
    if !matches!(kind, 1 | 2 | 4) || (ascii && kind != 1) {
        return Err(bad(ObjectProblem::BadStringKind));
    }
    let kind = kind as usize;
    let data = if ascii { info.unicode_ascii_data } else { info.unicode_compact_data };
    let max_chars = MAX_STRING_BYTES / kind;
    let chars = usize::try_from(length).unwrap_or(usize::MAX).min(max_chars);
    let raw = mem.vec(mem.at(addr, data)?, chars * kind)?;
    let mut text: String = match kind {
        1 => raw.iter().map(|&b| char::from(b)).collect(),
        2 => raw
            .chunks_exact(2)
            .map(|c| char::from_u32(u32::from(u16::from_le_bytes([c[0], c[1]]))).unwrap_or('\u{fffd}'))
            .collect(),
        _ => raw
            .chunks_exact(4)
            .map(|c| char::from_u32(u32::from_le_bytes([c[0], c[1], c[2], c[3]])).unwrap_or('\u{fffd}'))
            .collect(),
    };
    if (chars as u64) < length {
        text.push('…');
    }
    Ok(text)
}

/// A `bytes` object's contents, at most `max` of them.
fn read_bytes(mem: &RemoteMemory, info: &PyProcInfo, addr: u64, max: usize) -> Result<Vec<u8>, PythonError> {
    let size = mem.u64(mem.at(addr, info.bytes_size)?)?;
    let len = usize::try_from(size).unwrap_or(usize::MAX).min(max);
    mem.vec(mem.at(addr, info.bytes_data)?, len)
}

/// Code objects by (pid, address), least recently used dropped first, each checked
/// against the sample's [`code_checksum`] so a freed and reused address is read again.
///
/// ```no_run
/// use unwound_symbolize::python::{CodeCache, PythonProcess};
/// # fn main() -> Result<(), unwound_symbolize::python::PythonError> {
/// let process = PythonProcess::detect(1234)?.expect("a Python process");
/// let mut cache = CodeCache::new(4096);
/// # let (code, instr, checksum) = (0, 0, 0);
/// let object = cache.get(process.pid(), process.info(), code, checksum)?;
/// let line = object.line(process.info().instruction_index(code, instr).unwrap_or(-1));
/// println!("{} ({}:{line:?})", object.qualname, object.filename);
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct CodeCache {
    entries: lru::LruCache<(u32, u64), Arc<CodeObject>>,
    bytes: usize,
    stats: CodeCacheStats,
}

/// Counters of a [`CodeCache`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CodeCacheStats {
    /// Answers from the cache.
    pub hits: u64,
    /// Code objects read from a process.
    pub reads: u64,
    /// Cached entries found stale (their checksum differed from the sample's) and read again.
    pub replaced: u64,
}

impl CodeCache {
    /// A cache of at most `capacity` code objects (at least 1).
    pub fn new(capacity: usize) -> Self {
        let capacity = NonZeroUsize::new(capacity).unwrap_or(NonZeroUsize::MIN);
        CodeCache { entries: lru::LruCache::new(capacity), bytes: 0, stats: CodeCacheStats::default() }
    }

    /// The code object at `code` in process `pid` whose [`code_checksum`] is `checksum`:
    /// from the cache, or read from the process (and cached). An error when the process
    /// cannot be read, the address holds no code object, or the code object there is not
    /// the one `checksum` was taken from ([`ObjectProblem::Stale`]).
    pub fn get(
        &mut self,
        pid: u32,
        info: &PyProcInfo,
        code: u64,
        checksum: u64,
    ) -> Result<Arc<CodeObject>, PythonError> {
        if let Some(hit) = self.entries.get(&(pid, code)) {
            if hit.checksum == checksum {
                self.stats.hits += 1;
                return Ok(Arc::clone(hit));
            }
            self.stats.replaced += 1;
        }
        let object = Arc::new(CodeObject::read(pid, info, code, Some(checksum))?);
        self.stats.reads += 1;
        self.bytes += object.weight();
        if let Some((_, old)) = self.entries.push((pid, code), Arc::clone(&object)) {
            self.bytes -= old.weight();
        }
        Ok(object)
    }

    /// Drops every entry of process `pid` (it exited).
    pub fn forget_process(&mut self, pid: u32) {
        let keys: Vec<_> = self.entries.iter().filter(|((p, _), _)| *p == pid).map(|(k, _)| *k).collect();
        for k in keys {
            if let Some(old) = self.entries.pop(&k) {
                self.bytes -= old.weight();
            }
        }
    }

    /// Drops every entry of the processes `gone` names (they exited): one pass over the
    /// cache for any number of them.
    pub fn forget_processes(&mut self, gone: impl Fn(u32) -> bool) {
        let keys: Vec<_> = self.entries.iter().filter(|((p, _), _)| gone(*p)).map(|(k, _)| *k).collect();
        for k in keys {
            if let Some(old) = self.entries.pop(&k) {
                self.bytes -= old.weight();
            }
        }
    }

    /// Entries held.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Approximate bytes held by the entries.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Hits, reads and replacements so far.
    pub fn stats(&self) -> CodeCacheStats {
        self.stats
    }
}

/// A NUL-terminated C string of at most `max` bytes (cut there), read without crossing
/// into a page the string does not reach.
pub(crate) fn read_str_c(mem: &RemoteMemory, addr: u64, max: usize) -> Result<String, PythonError> {
    let mut out = Vec::new();
    let mut at = addr;
    while out.len() < max {
        let to_page_end = (4096 - (at % 4096)) as usize;
        let chunk = mem.vec(at, to_page_end.min(max - out.len()))?;
        if let Some(nul) = chunk.iter().position(|&b| b == 0) {
            out.extend_from_slice(&chunk[..nul]);
            break;
        }
        out.extend_from_slice(&chunk);
        at += chunk.len() as u64;
    }
    Ok(String::from_utf8_lossy(&out).into_owned())
}
