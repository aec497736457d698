//! The errors of reading a symbol source: [`Error`] for a file or `/proc` entry, and
//! [`DwarfError`] for the DWARF inside a file.

use std::path::PathBuf;

use crate::{MAX_ELF_SIZE, MAX_SYMBOLS};

/// What went wrong while reading a symbol source.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The file or `/proc` entry could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// What was being read.
        path: PathBuf,
        /// The system's reason.
        #[source]
        source: std::io::Error,
    },
    /// The file could not be parsed as an object file.
    #[error("{path} is not a usable ELF file: {source}")]
    Elf {
        /// The file.
        path: PathBuf,
        /// The parser's reason.
        #[source]
        source: object::read::Error,
    },
    /// The file is an object file of another format (PE, Mach-O, ...).
    #[error("{path} is not a usable ELF file: not ELF")]
    NotElf {
        /// The file.
        path: PathBuf,
    },
    /// The file has more than [`MAX_SYMBOLS`] function symbols.
    #[error("{path} is not a usable ELF file: more than {MAX_SYMBOLS} function symbols")]
    TooManySymbols {
        /// The file.
        path: PathBuf,
    },
    /// The file's DWARF could not be read.
    #[error("{path} is not a usable ELF file: {source}")]
    Dwarf {
        /// The file holding the DWARF (the binary, or its separate debug file).
        path: PathBuf,
        /// What is wrong with it.
        #[source]
        source: DwarfError,
    },
    /// The file is larger than [`MAX_ELF_SIZE`].
    #[error("{path} is {size} bytes, more than the {MAX_ELF_SIZE}-byte limit")]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// Its size.
        size: u64,
    },
    /// Without `/proc/PID/map_files` (it needs CAP_SYS_ADMIN) a mapping's path names a
    /// newer file than the one mapped (an upgrade): its offsets would give wrong names.
    #[error("{} was replaced since process {pid} mapped it (and /proc/{pid}/map_files needs CAP_SYS_ADMIN)", path.display())]
    Replaced {
        /// The path as mapped.
        path: PathBuf,
        /// The process.
        pid: u32,
    },
    /// A mapping with no object to open: anonymous memory, or a pseudo mapping other than
    /// `[vdso]` (`[stack]`, `[vsyscall]`).
    #[error("the mapping at {start:#x} of process {pid} ({}) has no object file", path.as_deref().map_or("anonymous".into(), |p| p.display().to_string()))]
    NotAnObject {
        /// The process.
        pid: u32,
        /// The mapping's start.
        start: u64,
        /// Its path, if any.
        path: Option<PathBuf>,
    },
    /// `/proc/kallsyms` shows only zero addresses (kernel.kptr_restrict, or not root).
    #[error("kernel symbol addresses are hidden: run as root or set kernel.kptr_restrict=0")]
    KernelAddressesHidden,
}

/// What is wrong with a file's DWARF.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DwarfError {
    /// The DWARF is malformed (gimli's reason).
    #[error(transparent)]
    Malformed(#[from] gimli::Error),
    /// A DWARF section could not be read or decompressed.
    #[error("{}: {source}", section.name())]
    Section {
        /// The section.
        section: gimli::SectionId,
        /// The object reader's reason.
        #[source]
        source: object::read::Error,
    },
    /// The DWARF sections are larger, uncompressed, than this file is allowed
    /// (a compression bomb is refused, not inflated).
    #[error(
        "DWARF sections up to {} are {size} bytes uncompressed, more than the {max}-byte limit for this file",
        section.name()
    )]
    TooLarge {
        /// The section whose size went past the limit.
        section: gimli::SectionId,
        /// Uncompressed bytes of the sections up to and including it.
        size: u64,
        /// The limit for this file.
        max: u64,
    },
    /// More line rows and function ranges than one file may have.
    #[error("more than {max} line rows and function ranges")]
    TooManyRows {
        /// The limit.
        max: usize,
    },
}
