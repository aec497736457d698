//! [`PythonBinary`]: what the interpreter's ELF file says about it, read without touching
//! a process (version, symbols, field offsets, where the pthread key lives); and the
//! thread-specific-data layout of glibc.

use std::fs::File;
use std::path::{Path, PathBuf};

use object::{Object, ObjectSegment, ObjectSymbol};

use super::info::{PyProcInfo, NO_OFFSET};
use super::{DisableReason, PythonError, PythonVersion};
use crate::{LoadSegments, MAX_ELF_SIZE};

/// The interpreter symbols this module reads (all exported, so `.dynsym` of a stripped
/// interpreter has them).
const RUNTIME: &str = "_PyRuntime";
const VERSION: &str = "Py_Version";
const CODE_TYPE: &str = "PyCode_Type";
const NONE: &str = "_Py_NoneStruct";
const GET_THIS_THREAD_STATE: &str = "PyGILState_GetThisThreadState";

/// Bytes of `_Py_DebugOffsets` (3.13) read: up to and including `unicode_object`.
const DEBUG_OFFSETS_LEN: usize = 71 * 8;

/// An ELF file holding a CPython 3.11–3.13 runtime (`_PyRuntime`), the interpreter's
/// executable or its `libpython`, as read from the file alone.
#[derive(Clone, Debug)]
pub struct PythonBinary {
    path: PathBuf,
    version: PythonVersion,
    segments: LoadSegments,
    runtime: u64,
    runtime_size: u64,
    py_none: u64,
    code_type: u64,
    offsets: PyProcInfo,
    key_ref: Option<KeyRef>,
}

/// Where `PyGILState_GetThisThreadState` takes the pthread key from, as decoded from its
/// first instructions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum KeyRef {
    /// `mov key(%rip),%edi`: the key's own file virtual address (static interpreters).
    Direct { key_vaddr: u64 },
    /// `mov got(%rip),%rax; lea off(%rax),%reg`: a GOT slot that must hold `&_PyRuntime`,
    /// and the offset of `autoTSSkey` in it (shared libpython).
    ViaGot { got_vaddr: u64, offset: u32 },
}

impl PythonBinary {
    /// Reads the ELF file at `path`. `Ok(None)` when it holds no Python runtime (no
    /// `.PyRuntime` section or no `_PyRuntime` symbol); an error when it cannot be read
    /// or parsed, or [`PythonError::Disabled`] when it is a Python this module does not
    /// support or whose layout fails a check.
    pub fn open(path: impl AsRef<Path>) -> Result<Option<Self>, PythonError> {
        let path = path.as_ref();
        let io = |source| PythonError::File(crate::Error::Io { path: path.to_path_buf(), source });
        let file = File::open(path).map_err(io)?;
        let size = file.metadata().map_err(io)?.len();
        if size > MAX_ELF_SIZE {
            return Err(PythonError::File(crate::Error::TooLarge { path: path.to_path_buf(), size }));
        }
        // SAFETY: read-only private map; a file truncated under us would fault, the risk
        // every mmap-based ELF reader takes.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io)?;
        Self::from_bytes(path, &map)
    }

    /// Like [`open`](Self::open), for an ELF image in memory; `path` names it in errors.
    pub fn from_bytes(path: impl AsRef<Path>, data: &[u8]) -> Result<Option<Self>, PythonError> {
        let path = path.as_ref();
        let elf = crate::elf::parse_elf(path, data).map_err(PythonError::File)?;
        let symbols = Symbols::of(&elf);
        let Some((runtime, runtime_size)) = symbols.runtime else { return Ok(None) };
        let disabled = |reason| PythonError::Disabled { binary: path.to_path_buf(), reason };
        let need = |v: Option<u64>, name| v.ok_or(disabled(DisableReason::MissingSymbol { name }));
        // Py_Version is new in 3.11.
        let version_at = symbols.version.ok_or(disabled(DisableReason::UnsupportedVersion { version: 0 }))?;
        let code_type = need(symbols.code_type, CODE_TYPE)?;
        let py_none = need(symbols.py_none, NONE)?;
        let read = |vaddr: u64, len: usize| -> Result<&[u8], PythonError> {
            file_bytes(&elf, vaddr, len).ok_or(disabled(DisableReason::UnreadableData { vaddr }))
        };
        let hex = u32_at(read(version_at, 4)?, 0).unwrap_or(0);
        let version = PythonVersion::from_hex(hex);
        let mut offsets = match (version.major, version.minor) {
            (3, 11) => table_311(),
            (3, 12) => table_312(),
            (3, 13) => debug_offsets(read(runtime, DEBUG_OFFSETS_LEN)?, version).map_err(disabled)?,
            _ => return Err(disabled(DisableReason::UnsupportedVersion { version: hex })),
        };
        offsets.version = hex;
        if let Some(sizes) = known_runtime_sizes(version) {
            if !sizes.contains(&runtime_size) {
                return Err(disabled(DisableReason::UnknownRuntimeSize { size: runtime_size }));
            }
        }
        // PyTypeObject.tp_basicsize (after ob_refcnt, ob_type, ob_size, tp_name).
        let basicsize = u64_at(read(code_type, 40)?, 32).unwrap_or(0);
        if basicsize != u64::from(offsets.code_adaptive) {
            return Err(disabled(DisableReason::CodeLayoutMismatch));
        }
        let key_ref = match symbols.get_this_thread_state {
            Some(at) => decode_key_ref(read(at, 48)?, at),
            None => None,
        };
        if let Some(KeyRef::Direct { key_vaddr }) = key_ref {
            if key_vaddr.checked_sub(runtime) != Some(u64::from(offsets.runtime_tss_key)) {
                return Err(disabled(DisableReason::TssKeyMismatch));
            }
        }
        if let Some(KeyRef::ViaGot { offset, .. }) = key_ref {
            if offset.checked_add(4) != Some(offsets.runtime_tss_key) {
                return Err(disabled(DisableReason::TssKeyMismatch));
            }
        }
        Ok(Some(PythonBinary {
            path: path.to_path_buf(),
            version,
            segments: LoadSegments::of(&elf),
            runtime,
            runtime_size,
            py_none,
            code_type,
            offsets,
            key_ref,
        }))
    }

    /// The file this was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The interpreter's version (`Py_Version`).
    pub fn version(&self) -> PythonVersion {
        self.version
    }

    /// The file virtual address of `_PyRuntime`, and the symbol's size.
    pub fn runtime(&self) -> (u64, u64) {
        (self.runtime, self.runtime_size)
    }

    /// The field offsets of this interpreter ([`PyProcInfo`] with its addresses and the
    /// process-specific pthread key left 0): from `_Py_DebugOffsets` on 3.13, from this
    /// module's table on 3.11/3.12 (each checked against the file).
    pub fn offsets(&self) -> PyProcInfo {
        self.offsets
    }

    /// True when the location of the pthread key was decoded from
    /// `PyGILState_GetThisThreadState`'s code (and agreed with the offsets); false when
    /// the table's offset is used unchecked.
    pub fn tss_key_decoded(&self) -> bool {
        self.key_ref.is_some()
    }

    pub(crate) fn segments(&self) -> &LoadSegments {
        &self.segments
    }

    pub(crate) fn key_ref(&self) -> Option<KeyRef> {
        self.key_ref
    }

    pub(crate) fn symbol_vaddrs(&self) -> (u64, u64, u64) {
        (self.runtime, self.py_none, self.code_type)
    }
}

#[derive(Default)]
struct Symbols {
    runtime: Option<(u64, u64)>,
    version: Option<u64>,
    code_type: Option<u64>,
    py_none: Option<u64>,
    get_this_thread_state: Option<u64>,
}

impl Symbols {
    /// The symbols, from `.dynsym`, then `.symtab` for what `.dynsym` lacks. A file whose
    /// `.dynsym` has no `_PyRuntime` and that has no `.PyRuntime` section is not searched
    /// further (a large non-Python binary costs one `.dynsym` pass).
    fn of(elf: &object::File<'_>) -> Self {
        let mut s = Symbols::default();
        s.collect(elf.dynamic_symbols());
        let complete = s.runtime.is_some()
            && s.version.is_some()
            && s.code_type.is_some()
            && s.py_none.is_some()
            && s.get_this_thread_state.is_some();
        if !complete && (s.runtime.is_some() || elf.section_by_name(".PyRuntime").is_some()) {
            s.collect(elf.symbols());
        }
        s
    }

    fn collect<'d: 'f, 'f>(&mut self, symbols: impl Iterator<Item = object::Symbol<'d, 'f>>) {
        let s = self;
        for sym in symbols {
            if sym.is_undefined() || sym.address() == 0 {
                continue;
            }
            let Ok(name) = sym.name() else { continue };
            let slot = match name {
                RUNTIME => {
                    s.runtime.get_or_insert((sym.address(), sym.size()));
                    continue;
                }
                VERSION => &mut s.version,
                CODE_TYPE => &mut s.code_type,
                NONE => &mut s.py_none,
                GET_THIS_THREAD_STATE => &mut s.get_this_thread_state,
                _ => continue,
            };
            slot.get_or_insert(sym.address());
        }
    }
}

/// `len` initialised bytes of the file at its virtual address `vaddr`.
fn file_bytes<'d>(elf: &object::File<'d>, vaddr: u64, len: usize) -> Option<&'d [u8]> {
    elf.segments().find_map(|seg| seg.data_range(vaddr, len as u64).ok().flatten())
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at.checked_add(4)?)?.try_into().ok()?))
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at.checked_add(8)?)?.try_into().ok()?))
}

/// `st_size` of `_PyRuntime` in the builds whose layout the 3.11/3.12 tables were checked
/// against (gdb `ptype /o`): Debian 3.11.2 and pyenv 3.11.7 (166688), pyenv 3.12.1 (459944).
fn known_runtime_sizes(version: PythonVersion) -> Option<&'static [u64]> {
    match version.minor {
        11 => Some(&[166_688]),
        12 => Some(&[459_944]),
        _ => None,
    }
}

/// Fields common to 3.11–3.13 that no table or debug offsets disagree on.
fn common() -> PyProcInfo {
    PyProcInfo {
        object_type: 8,
        tstate_next: 8,
        runtime_interpreters_head: 40,
        code_filename: 112,
        code_name: 120,
        code_qualname: 128,
        code_linetable: 136,
        unicode_length: 16,
        unicode_state: 32,
        bytes_size: 16,
        bytes_data: 32,
        frame_read_size: 72,
        ..PyProcInfo::default()
    }
}

/// CPython 3.11 (x86-64, default build): `Include/internal/pycore_frame.h`,
/// `pycore_runtime.h`, `cpython/pystate.h`, `cpython/code.h`.
fn table_311() -> PyProcInfo {
    PyProcInfo {
        runtime_tss_key: 0x250 + 4,
        interp_threads_head: 16,
        tstate_thread_id: 152,
        tstate_native_thread_id: 160,
        tstate_frame: 56,
        cframe_current_frame: 8,
        frame_code: 32,
        frame_previous: 48,
        frame_instr: 56,
        frame_is_entry: 68,
        frame_owner: 69,
        owner_cstack: NO_OFFSET,
        code_firstlineno: 72,
        code_adaptive: 184,
        unicode_ascii_data: 48,
        unicode_compact_data: 72,
        ..common()
    }
}

/// CPython 3.12 (x86-64, default build).
fn table_312() -> PyProcInfo {
    PyProcInfo {
        runtime_tss_key: 0x608 + 4,
        interp_threads_head: 72,
        tstate_thread_id: 136,
        tstate_native_thread_id: 144,
        tstate_frame: 56,
        cframe_current_frame: 0,
        frame_code: 0,
        frame_previous: 8,
        frame_instr: 56,
        frame_is_entry: NO_OFFSET,
        frame_owner: 70,
        owner_cstack: 3,
        code_firstlineno: 68,
        code_adaptive: 192,
        unicode_ascii_data: 40,
        unicode_compact_data: 56,
        ..common()
    }
}

/// CPython 3.13 from the `_Py_DebugOffsets` at the start of `_PyRuntime` (`bytes`, read
/// from the file: the struct is statically initialised). `autoTSSkey` is not among them:
/// its offset (0x870) is ours, checked against `PyGILState_GetThisThreadState`.
fn debug_offsets(bytes: &[u8], version: PythonVersion) -> Result<PyProcInfo, DisableReason> {
    let field = |i: usize| u64_at(bytes, i * 8).ok_or(DisableReason::DebugOffsetsMissing);
    if bytes.get(..8) != Some(b"xdebugpy".as_slice()) {
        return Err(DisableReason::DebugOffsetsMissing);
    }
    let table_version = PythonVersion::from_hex(u32::try_from(field(1)?).unwrap_or(0));
    if (table_version.major, table_version.minor) != (version.major, version.minor) {
        return Err(DisableReason::DebugOffsetsMismatch);
    }
    if field(2)? != 0 {
        return Err(DisableReason::FreeThreaded);
    }
    // Every offset we use must be small: a corrupt table is refused, not followed.
    let off = |i: usize| -> Result<u32, DisableReason> {
        let v = field(i)?;
        u32::try_from(v).ok().filter(|v| *v < 1 << 16).ok_or(DisableReason::DebugOffsetsMismatch)
    };
    let info = PyProcInfo {
        runtime_tss_key: 0x870 + 4,
        runtime_interpreters_head: off(5)?,
        interp_threads_head: off(9)?,
        tstate_next: off(21)?,
        tstate_frame: off(23)?,
        tstate_thread_id: off(24)?,
        tstate_native_thread_id: off(25)?,
        cframe_current_frame: NO_OFFSET,
        frame_previous: off(29)?,
        frame_code: off(30)?,
        frame_instr: off(31)?,
        frame_owner: off(33)?,
        frame_is_entry: NO_OFFSET,
        owner_cstack: 3,
        code_filename: off(35)?,
        code_name: off(36)?,
        code_qualname: off(37)?,
        code_linetable: off(38)?,
        code_firstlineno: off(39)?,
        code_adaptive: off(43)?,
        object_type: off(45)?,
        bytes_size: off(65)?,
        bytes_data: off(66)?,
        unicode_state: off(68)?,
        unicode_length: off(69)?,
        unicode_ascii_data: off(70)?,
        // PyCompactUnicodeObject adds utf8_length and utf8 to PyASCIIObject.
        unicode_compact_data: off(70)? + 16,
        ..PyProcInfo::default()
    };
    let header = [info.frame_previous, info.frame_code, info.frame_instr].into_iter().max().unwrap_or(0) + 8;
    Ok(PyProcInfo { frame_read_size: header.max(info.frame_owner + 1).next_multiple_of(8), ..info })
}

/// Decodes the two shapes of `PyGILState_GetThisThreadState`'s start that name the
/// pthread key: `mov disp(%rip),%edi` (the key itself; static builds) and
/// `mov disp(%rip),%rax` (a GOT slot) followed by `lea off(%rax),%r` (shared libpython).
fn decode_key_ref(code: &[u8], vaddr: u64) -> Option<KeyRef> {
    let rip_target = |at: usize, len: usize| -> Option<u64> {
        let disp = i32::from_le_bytes(code.get(at + len - 4..at + len)?.try_into().ok()?);
        vaddr.checked_add((at + len) as u64)?.checked_add_signed(i64::from(disp))
    };
    let mut got = None;
    let mut i = 0;
    while i + 7 <= code.len() {
        match code[i..] {
            // mov disp32(%rip),%edi
            [0x8b, 0x3d, ..] => return rip_target(i, 6).map(|key_vaddr| KeyRef::Direct { key_vaddr }),
            // mov disp32(%rip),%rax
            [0x48, 0x8b, 0x05, ..] => {
                got = rip_target(i, 7);
                i += 7;
            }
            // lea disp32(%rax),%reg
            [0x48, 0x8d, modrm, a, b, c, d, ..] if modrm & 0xc7 == 0x80 => {
                let got_vaddr = got?;
                let offset = u32::from_le_bytes([a, b, c, d]);
                return Some(KeyRef::ViaGot { got_vaddr, offset });
            }
            // Skip what else the two shapes hold, instruction by instruction.
            [0x48, 0x83, 0x3d, ..] => i += 8, // cmpq $imm8,disp32(%rip)
            [0x48, 0x83, 0xb8, ..] => i += 8, // cmpq $imm8,disp32(%rax)
            [0x53, ..] => i += 1,             // push %rbx
            [0x0f, 0x84, ..] => i += 6,       // je rel32
            [0x74, ..] => i += 2,             // je rel8
            _ => return None,
        }
    }
    None
}

/// Where glibc keeps a thread's value for a pthread key, decoded from
/// `__pthread_getspecific`: for `key < max_key`, the value is at
/// `fsbase + first_slot + 16 * key` (the `%fs:0x10` self-pointer is the `%fs` base).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TsdLayout {
    /// Keys below this use the thread descriptor's first-level array.
    pub max_key: u32,
    /// Offset from `%fs` base of key 0's value (`specific_1stblock[0].data`).
    pub first_slot: u64,
}

impl TsdLayout {
    /// Reads the layout from the glibc `libc.so.6` at `path`, by decoding
    /// `__pthread_getspecific`'s fast path. [`PythonError::Disabled`] with
    /// [`DisableReason::TsdLayoutUnknown`] when the code is not the expected shape.
    pub fn of_glibc(path: impl AsRef<Path>) -> Result<Self, PythonError> {
        let path = path.as_ref();
        let data = std::fs::read(path)
            .map_err(|source| PythonError::File(crate::Error::Io { path: path.to_path_buf(), source }))?;
        let elf = crate::elf::parse_elf(path, &data).map_err(PythonError::File)?;
        let unknown =
            || PythonError::Disabled { binary: path.to_path_buf(), reason: DisableReason::TsdLayoutUnknown };
        let at = elf
            .dynamic_symbols()
            .chain(elf.symbols())
            .find(|s| {
                matches!(s.name(), Ok("__pthread_getspecific" | "pthread_getspecific")) && !s.is_undefined()
            })
            .map(|s| s.address())
            .ok_or_else(unknown)?;
        let code = file_bytes(&elf, at, 32).ok_or_else(unknown)?;
        decode_getspecific(code).ok_or_else(unknown)
    }
}

/// glibc 2.34+ x86-64 `__pthread_getspecific` fast path:
/// `cmp $max-1,%edi; ja; mov %edi,%eax; add $base,%rax; shl $4,%rax; add %fs:0x10,%rax;
/// mov data(%rax),%rdx`.
fn decode_getspecific(code: &[u8]) -> Option<TsdLayout> {
    match *code {
        [0x83, 0xff, last, 0x77, _, 0x89, 0xf8, 0x48, 0x83, 0xc0, base, 0x48, 0xc1, 0xe0, 0x04, 0x64, 0x48, 0x03, 0x04, 0x25, 0x10, 0, 0, 0, 0x48, 0x8b, 0x50, data, ..]
            if base < 0x80 && data < 0x80 =>
        {
            Some(TsdLayout {
                max_key: u32::from(last) + 1,
                first_slot: u64::from(base) * 16 + u64::from(data),
            })
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_both_key_shapes() {
        // Debian 3.11.2 (static): cmpq $0,…(%rip); je; mov 0x563d50(%rip),%edi at 0x4f7c3e.
        let code = [
            0x48, 0x83, 0x3d, 0x50, 0x3d, 0x56, 0x00, 0x00, 0x0f, 0x84, 0x1f, 0xc8, 0xf2, 0xff, 0x8b, 0x3d,
            0x50, 0x3d, 0x56, 0x00, 0xe9, 0xa7, 0x8a, 0xf2, 0xff,
        ];
        assert_eq!(decode_key_ref(&code, 0x4f7c30), Some(KeyRef::Direct { key_vaddr: 0xa5b994 }));
        // pyenv 3.13.0 (shared): mov 0x256be9(%rip),%rax; push %rbx; lea 0x870(%rax),%rbx.
        let code = [
            0x48, 0x8b, 0x05, 0xe9, 0x6b, 0x25, 0x00, 0x53, 0x48, 0x8d, 0x98, 0x70, 0x08, 0x00, 0x00, 0x48,
            0x89,
        ];
        assert_eq!(
            decode_key_ref(&code, 0x2940c0),
            Some(KeyRef::ViaGot { got_vaddr: 0x4eacb0, offset: 0x870 })
        );
        assert_eq!(decode_key_ref(&[0xc3; 16], 0), None);
        assert_eq!(decode_key_ref(&[], 0), None);
    }

    #[test]
    fn decodes_glibc_236_getspecific() {
        let code = [
            0x83, 0xff, 0x1f, 0x77, 0x3b, 0x89, 0xf8, 0x48, 0x83, 0xc0, 0x31, 0x48, 0xc1, 0xe0, 0x04, 0x64,
            0x48, 0x03, 0x04, 0x25, 0x10, 0x00, 0x00, 0x00, 0x48, 0x8b, 0x50, 0x08,
        ];
        assert_eq!(decode_getspecific(&code), Some(TsdLayout { max_key: 32, first_slot: 0x318 }));
        assert_eq!(decode_getspecific(&code[..20]), None);
    }
}
