//! What a [`crate::Symbolizer`] answers for one address: [`Symbolized`] frames, or the
//! [`Miss`] that says why there are none.

use std::hash::{Hash, Hasher};
use std::path::PathBuf;
use std::sync::Arc;

use crate::name::Name;
use crate::Error;

/// One frame of a symbolized address.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Frame {
    /// Demangled function name; `None` when neither DWARF nor a symbol table names it.
    pub function: Option<Name>,
    /// Source file path, as the compiler recorded it (joined with its directory).
    pub file: Option<Name>,
    /// Source line; 0 when unknown.
    pub line: u32,
    /// The line table's discriminator (0 when none), for the innermost frame only.
    pub discriminator: u32,
    /// What named the function (or, for [`NameSource::EhFrame`], delimited it); `None`
    /// when nothing did.
    pub source: Option<NameSource>,
}

/// Where a frame's function name comes from.
///
/// Code no symbol covers (a static function of a stripped binary) is still delimited by the
/// `.eh_frame` record of its function: [`NameSource::EhFrame`] gives that function's start,
/// so a profiler can name every address of one function alike (`postgres+0x3efc80`) and
/// its samples add up in one frame. Such a frame has no `function` name of its own, as
/// binutils prints `??` for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum NameSource {
    /// DWARF debugging information (the function's or inlined call's DIE; an out-of-line
    /// clone's name is its symbol's, as binutils spells it).
    Dwarf,
    /// The ELF symbol table (`.symtab`), the file's own or its separate debug file's.
    SymbolTable,
    /// The dynamic symbol table (`.dynsym`): exported functions only.
    DynamicSymbol,
    /// The symbol table of the MiniDebugInfo (`.gnu_debugdata`) section.
    MiniDebugInfo,
    /// No symbol: the `.eh_frame` record (FDE) of the function holding the address, which
    /// starts at `start` (a file virtual address).
    EhFrame {
        /// The function's first address, as the FDE gives it.
        start: u64,
    },
    /// A perf map (`/tmp/perf-PID.map`) of a JIT compiler.
    PerfMap,
}

impl NameSource {
    /// The function's start when this source gives one: the FDE's start for
    /// [`NameSource::EhFrame`].
    pub fn function_start(&self) -> Option<u64> {
        match self {
            NameSource::EhFrame { start } => Some(*start),
            _ => None,
        }
    }
}

/// Everything known about one address: frames innermost first (the inlined callee, then
/// its callers, ending with the function the code belongs to). Never empty.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Symbolized {
    /// Innermost first.
    pub frames: Vec<Frame>,
}

impl Symbolized {
    /// The text binutils `addr2line -f -i -C` prints for this address (with `-a` when
    /// `with_address`): per frame the function (or `??`) and `file:line` (`??` for no file,
    /// `?` for line 0, the innermost line's discriminator repeated on every frame, as
    /// binutils does).
    ///
    /// ```
    /// use unwound_symbolize::{Frame, Name, NameSource, Symbolized};
    /// let s = Symbolized { frames: vec![Frame { function: Some(Name::from("main")),
    ///     file: Some(Name::from("/src/a.c")), line: 4, discriminator: 0,
    ///     source: Some(NameSource::Dwarf) }] };
    /// assert_eq!(s.addr2line_text(0x1150, true), "0x0000000000001150\nmain\n/src/a.c:4\n");
    /// ```
    pub fn addr2line_text(&self, addr: u64, with_address: bool) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        if with_address {
            let _ = writeln!(out, "0x{addr:016x}");
        }
        let discriminator = self.frames.first().map_or(0, |f| f.discriminator);
        for f in &self.frames {
            let _ = writeln!(out, "{}", f.function.as_deref().unwrap_or("??"));
            let _ = write!(out, "{}:", f.file.as_deref().unwrap_or("??"));
            let _ = if f.line == 0 { write!(out, "?") } else { write!(out, "{}", f.line) };
            if discriminator != 0 {
                let _ = write!(out, " (discriminator {discriminator})");
            }
            out.push('\n');
        }
        out
    }
}

/// The `addr2line -f -i -C` text for any result: a miss prints `??` and `??:0`.
pub fn addr2line_text(addr: u64, r: &Resolution, with_address: bool) -> String {
    match r {
        Ok(s) => s.addr2line_text(addr, with_address),
        Err(_) if with_address => format!("0x{addr:016x}\n??\n??:0\n"),
        Err(_) => "??\n??:0\n".to_string(),
    }
}

/// Why an address could not be symbolized.
///
/// Two misses are equal when they are the same variant with equal fields; for
/// [`Miss::Unreadable`], when the errors say the same.
#[derive(Clone, Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Miss {
    /// No mapping of the process holds the address.
    #[error("address not mapped")]
    NotMapped,
    /// Anonymous executable memory (JIT code) with no `/tmp/perf-PID.map` entry.
    #[error("anonymous memory with no perf map entry")]
    Anonymous,
    /// The address is not inside any loadable segment of the file.
    #[error("address outside the file's segments")]
    OutsideSegments,
    /// The mapping is a kernel-provided pseudo-file (`[vdso]`, `[vsyscall]`), not a file
    /// that can be opened.
    #[error("{path} is not a file")]
    NotAFile {
        /// The mapping's name, as `/proc/PID/maps` gives it.
        path: PathBuf,
    },
    /// The mapped file was replaced since it was mapped, and the mapped one cannot be
    /// opened (`/proc/PID/map_files` needs `CAP_SYS_ADMIN`): the new file's offsets would
    /// give wrong names.
    #[error("{path} was replaced since it was mapped (and /proc/{pid}/map_files needs CAP_SYS_ADMIN)")]
    Replaced {
        /// The mapped file's path.
        path: PathBuf,
        /// The process.
        pid: u32,
    },
    /// The binary could not be read or parsed. Shared by every address of the binary.
    #[error(transparent)]
    Unreadable(Arc<Error>),
    /// Neither DWARF, nor the symbol tables, nor an `.eh_frame` record covers the address.
    #[error("no symbol covers the address")]
    NoSymbol,
}

impl PartialEq for Miss {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Miss::NotAFile { path: a }, Miss::NotAFile { path: b }) => a == b,
            (Miss::Replaced { path: a, pid: p }, Miss::Replaced { path: b, pid: q }) => a == b && p == q,
            (Miss::Unreadable(a), Miss::Unreadable(b)) => Arc::ptr_eq(a, b) || a.to_string() == b.to_string(),
            // Every variant that holds data is matched above.
            (a, b) => std::mem::discriminant(a) == std::mem::discriminant(b),
        }
    }
}

impl Eq for Miss {}

impl Hash for Miss {
    fn hash<H: Hasher>(&self, state: &mut H) {
        std::mem::discriminant(self).hash(state);
        match self {
            Miss::NotAFile { path } => path.hash(state),
            Miss::Replaced { path, pid } => (path, pid).hash(state),
            Miss::Unreadable(e) => e.to_string().hash(state),
            _ => {}
        }
    }
}

/// One answer per input address.
pub type Resolution = Result<Symbolized, Miss>;
