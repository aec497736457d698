//! Python frames of CPython 3.11, 3.12 and 3.13 processes, read from outside the
//! interpreter.
//!
//! - [`PythonProcess::detect`] recognises a CPython process from its mappings and checks
//!   its layout, giving the [`PyProcInfo`] a walker needs (addresses and field offsets;
//!   the same struct the in-kernel walker uses).
//! - [`CodeCache`] names code objects (qualified name, file, line of an instruction),
//!   read with `process_vm_readv` and checked against a [`code_checksum`] taken when the
//!   frame was sampled.
//! - [`PythonProcess::stacks`] is the reference walker: every thread's Python stack,
//!   by the same rules ([`PyProcInfo::classify_frame`]) as the kernel walker.
//!
//! ```no_run
//! use unwound_symbolize::python::PythonProcess;
//! # fn main() -> Result<(), unwound_symbolize::python::PythonError> {
//! if let Some(process) = PythonProcess::detect(1234)? {
//!     for thread in process.stacks()? {
//!         println!("thread {}", thread.native_tid);
//!         for frame in &thread.frames {
//!             println!("  {} ({}:{:?})", frame.qualname, frame.file, frame.line);
//!         }
//!     }
//! }
//! # Ok(()) }
//! ```
//!
//! Offsets: on 3.13 from the interpreter's own `_Py_DebugOffsets` (the start of
//! `_PyRuntime`, read from the file); on 3.11 and 3.12 from this module's table, used only
//! when the file agrees (`_PyRuntime`'s size, `PyCode_Type.tp_basicsize`, the code members
//! `PyCode_Type.tp_members` names, the pthread key `PyGILState_GetThisThreadState` reads).
//! A thread finds its own `PyThreadState` through the interpreter's pthread key (glibc's
//! thread-specific data, decoded from `__pthread_getspecific`), which holds for every
//! thread whether it holds the GIL or not. Free-threaded builds, 3.10 and older, 3.14 and
//! newer, musl, and subinterpreters' threads are not supported: detection says why in a
//! [`DisableReason`].

mod binary;
mod code;
mod info;
mod linetable;
mod memory;
mod process;

use std::path::PathBuf;

pub use binary::{PythonBinary, TsdLayout};
pub use code::{CodeCache, CodeCacheStats, CodeObject, MAX_LINETABLE_BYTES, MAX_STRING_BYTES};
pub use info::{code_checksum, FrameClass, PyProcInfo, NO_OFFSET};
pub use linetable::line_for_instruction;
pub use process::{Detector, PyFrame, PyThreadStack, PythonProcess, MAX_FRAMES, MAX_THREADS};

/// A CPython version, from `Py_Version` (`PY_VERSION_HEX`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PythonVersion {
    /// 3.
    pub major: u8,
    /// 11, 12, 13.
    pub minor: u8,
    /// The patch release.
    pub micro: u8,
}

impl PythonVersion {
    /// From `PY_VERSION_HEX` (`0xMMmmppRS`: major, minor, micro, release level, serial).
    pub fn from_hex(hex: u32) -> Self {
        PythonVersion { major: (hex >> 24) as u8, minor: (hex >> 16) as u8, micro: (hex >> 8) as u8 }
    }
}

impl std::fmt::Display for PythonVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.micro)
    }
}

/// Why Python frames are not shown for a process that holds a Python runtime: a check
/// failed, so its memory is not followed. [`name`](Self::name) gives a counter name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum DisableReason {
    /// Not CPython 3.11, 3.12 or 3.13 (`PY_VERSION_HEX`).
    UnsupportedVersion {
        /// `Py_Version`; 0 when the file has none (3.10 and older).
        version: u32,
    },
    /// A free-threaded (no-GIL) build.
    FreeThreaded,
    /// A symbol this module reads is not in `.dynsym` or `.symtab`.
    MissingSymbol {
        /// The symbol.
        name: &'static str,
    },
    /// A symbol's initialised data is not in the file.
    UnreadableData {
        /// The file virtual address.
        vaddr: u64,
    },
    /// 3.13+: `_PyRuntime` does not start with a `_Py_DebugOffsets` (cookie `xdebugpy`).
    DebugOffsetsMissing,
    /// 3.13+: the `_Py_DebugOffsets` are for another version, or hold an implausible offset.
    DebugOffsetsMismatch,
    /// 3.11/3.12: `_PyRuntime`'s size is not one the offset table was checked against.
    UnknownRuntimeSize {
        /// `st_size` of `_PyRuntime`.
        size: u64,
    },
    /// The code object layout disagrees with the file or process (`PyCode_Type`'s
    /// `tp_basicsize` or `tp_members`).
    CodeLayoutMismatch,
    /// The pthread key's place, decoded from `PyGILState_GetThisThreadState`, is not the
    /// table's.
    TssKeyMismatch,
    /// The interpreter has not created its pthread key (`autoTSSkey`) yet.
    TssNotCreated,
    /// The pthread key is one glibc keeps outside the thread descriptor (≥ 32).
    TssKeyTooLarge {
        /// The key.
        key: u32,
    },
    /// No glibc `libc.so.6` is mapped (musl, static binaries).
    NoGlibc,
    /// glibc's `__pthread_getspecific` is not the shape this module decodes.
    TsdLayoutUnknown,
    /// The runtime has no interpreter or thread yet (starting up, or finalizing): try later.
    NotInitialized,
    /// Following the offsets in the live process did not give a thread state whose
    /// pthread-key value is itself, or a frame whose code is a code object.
    SelfTestFailed,
}

impl DisableReason {
    /// A stable snake_case name, for counters.
    pub fn name(&self) -> &'static str {
        match self {
            DisableReason::UnsupportedVersion { .. } => "unsupported_version",
            DisableReason::FreeThreaded => "free_threaded",
            DisableReason::MissingSymbol { .. } => "missing_symbol",
            DisableReason::UnreadableData { .. } => "unreadable_data",
            DisableReason::DebugOffsetsMissing => "debug_offsets_missing",
            DisableReason::DebugOffsetsMismatch => "debug_offsets_mismatch",
            DisableReason::UnknownRuntimeSize { .. } => "unknown_runtime_size",
            DisableReason::CodeLayoutMismatch => "code_layout_mismatch",
            DisableReason::TssKeyMismatch => "tss_key_mismatch",
            DisableReason::TssNotCreated => "tss_not_created",
            DisableReason::TssKeyTooLarge { .. } => "tss_key_too_large",
            DisableReason::NoGlibc => "no_glibc",
            DisableReason::TsdLayoutUnknown => "tsd_layout_unknown",
            DisableReason::NotInitialized => "not_initialized",
            DisableReason::SelfTestFailed => "self_test_failed",
        }
    }

    /// True when the same process may pass later ([`NotInitialized`](Self::NotInitialized),
    /// [`TssNotCreated`](Self::TssNotCreated)).
    pub fn is_transient(&self) -> bool {
        matches!(self, DisableReason::NotInitialized | DisableReason::TssNotCreated)
    }
}

impl std::fmt::Display for DisableReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DisableReason::UnsupportedVersion { version } => {
                write!(f, "unsupported Python version {version:#x}")
            }
            DisableReason::MissingSymbol { name } => write!(f, "no symbol {name}"),
            DisableReason::UnreadableData { vaddr } => write!(f, "no file data at {vaddr:#x}"),
            DisableReason::UnknownRuntimeSize { size } => write!(f, "_PyRuntime of unknown size {size}"),
            DisableReason::TssKeyTooLarge { key } => write!(f, "pthread key {key} is not in the first block"),
            other => f.write_str(&other.name().replace('_', " ")),
        }
    }
}

/// What is wrong with an object read from a Python process.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ObjectProblem {
    /// Its `ob_type` is not `PyCode_Type`.
    NotCode,
    /// The code object's [`code_checksum`] differs from the sample's: it was freed and
    /// its address reused since.
    Stale,
    /// A `str` that is not compact (a legacy string; code objects never hold one).
    NotCompactString,
    /// A `str` whose kind is not 1, 2 or 4 bytes per character.
    BadStringKind,
}

/// What went wrong while reading a Python process.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PythonError {
    /// The process's mappings could not be read (it exited, or no permission).
    #[error("cannot read the mappings of process {pid}: {source}")]
    Maps {
        /// The process.
        pid: u32,
        /// The reason.
        #[source]
        source: crate::Error,
    },
    /// An ELF file (the interpreter, libpython, libc) could not be read or parsed.
    #[error(transparent)]
    File(crate::Error),
    /// The process's memory could not be read at an address.
    #[error("cannot read {len} bytes at {addr:#x} in process {pid}: {source}")]
    Read {
        /// The process.
        pid: u32,
        /// The address.
        addr: u64,
        /// Bytes asked for.
        len: usize,
        /// The system's reason.
        #[source]
        source: std::io::Error,
    },
    /// The process holds a Python runtime whose frames are not followed.
    #[error("Python frames disabled for {}: {reason}", binary.display())]
    Disabled {
        /// The ELF file holding `_PyRuntime` (or libc, for the TSD layout).
        binary: PathBuf,
        /// Why.
        reason: DisableReason,
    },
    /// An object in the process is not what it should be.
    #[error("object at {addr:#x}: {problem:?}")]
    InvalidObject {
        /// Its address.
        addr: u64,
        /// What is wrong.
        problem: ObjectProblem,
    },
}

impl PythonError {
    /// The reason Python is disabled, for a [`PythonError::Disabled`].
    pub fn disable_reason(&self) -> Option<DisableReason> {
        match self {
            PythonError::Disabled { reason, .. } => Some(*reason),
            _ => None,
        }
    }
}

const _: fn() = || {
    fn shareable<T: Send + Sync>() {}
    shareable::<PythonProcess>();
    shareable::<PythonBinary>();
    shareable::<CodeCache>();
    shareable::<PythonError>();
};
