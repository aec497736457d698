//! What can go wrong compiling a table ([`Error`]), in the CFI itself ([`DwarfError`]) and
//! reading a serialized one ([`FormatError`]).

use std::path::PathBuf;

use crate::{MAX_FDES, MAX_FILE_SIZE};

/// What went wrong compiling or loading a table.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The system's reason.
        #[source]
        source: std::io::Error,
    },
    /// Not an ELF file the object parser can read.
    #[error("not a usable x86-64 ELF file: {0}")]
    Elf(#[source] object::read::Error),
    /// An ELF file for another architecture.
    #[error("not a usable x86-64 ELF file: unsupported architecture {0:?}")]
    Architecture(object::Architecture),
    /// A section's contents could not be read (or decompressed).
    #[error("cannot read section {section}: {source}")]
    Section {
        /// The section's name.
        section: &'static str,
        /// The object parser's reason.
        #[source]
        source: object::read::Error,
    },
    /// The file is larger than [`MAX_FILE_SIZE`].
    #[error("file of {size} bytes is over the size limit of {MAX_FILE_SIZE}")]
    TooLarge {
        /// Its size.
        size: u64,
    },
    /// A CFI section is larger, uncompressed, than its 32-bit record offsets can address.
    #[error("section {section} of {size} bytes is over the 4 GiB limit")]
    SectionTooLarge {
        /// The section's name.
        section: &'static str,
        /// Its uncompressed size.
        size: u64,
    },
    /// Neither `.eh_frame` nor `.debug_frame`.
    #[error("no call frame information (.eh_frame or .debug_frame)")]
    NoCfi,
    /// The CFI section is malformed.
    #[error("malformed call frame information: {0}")]
    Dwarf(#[from] DwarfError),
    /// More FDEs than [`MAX_FDES`].
    #[error("{count} FDEs, more than the {MAX_FDES} one table may have")]
    TooManyFdes {
        /// How many the file has.
        count: usize,
    },
    /// The rows span more pages than a table's 32-bit page count can index.
    #[error("too large an address range for one table")]
    AddressRange,
    /// Rows given to [`table_from_rows`](crate::table_from_rows) that are not sorted by
    /// start, or end before they start.
    #[error("row {index} is out of order or ends before it starts")]
    UnsortedRows {
        /// The index of the first such row.
        index: usize,
    },
    /// Serialized bytes are not a table of this format version.
    #[error("not a valid unwind table: {0}")]
    Format(#[from] FormatError),
}

/// How a file's call frame information is malformed, beyond what is counted as
/// [`Unsupported::Malformed`](crate::layout::Unsupported::Malformed) rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DwarfError {
    /// A record with a 64-bit DWARF length (unsupported).
    #[error("64-bit DWARF CFI record at {offset:#x} (not supported)")]
    Dwarf64 {
        /// The record's offset in its section.
        offset: usize,
    },
    /// A record whose length runs past the section's end.
    #[error("record at {offset:#x} runs past the section end")]
    PastEnd {
        /// The record's offset in its section.
        offset: usize,
    },
    /// An FDE record read differently by two passes over the section (the file changed
    /// while it was read).
    #[error("inconsistent FDE records")]
    InconsistentFdes,
}

/// Why serialized bytes are not a table of this format version.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FormatError {
    /// Not [`MAGIC`](crate::layout::MAGIC).
    #[error("bad magic")]
    Magic,
    /// Another [`FORMAT_VERSION`](crate::layout::FORMAT_VERSION).
    #[error("other format version")]
    Version,
    /// Shorter than the header.
    #[error("short")]
    Short,
    /// The length is not the one the header's counts give.
    #[error("length does not match the header")]
    Length,
    /// No rules, or more than [`MAX_RULES`](crate::layout::MAX_RULES).
    #[error("rule count")]
    RuleCount,
    /// A page's entries lie outside the entries, straddle a chunk, or its start rule is
    /// not in the dictionary.
    #[error("page index out of range")]
    PageIndex,
    /// A rule whose CFA or rbp kind byte is no kind.
    #[error("unknown rule kind")]
    RuleKind,
    /// A run with bits outside its layout or inconsistent fields.
    #[error("bad run")]
    Run,
    /// A page's start rule is a record with a run.
    #[error("page start rule with a run")]
    StartRuleRun,
    /// An entry naming a record outside the dictionary, or with reserved bits set.
    #[error("entry out of range")]
    Entry,
}
