//! Compiles DWARF call frame information (`.eh_frame`, `.debug_frame`) of x86-64 ELF files
//! into compact, sorted unwind tables that an in-kernel stack walker can search within BPF
//! map limits, and walks stacks with them.
//!
//! - [`layout`] (`no_std`): the table's byte layout, its lookup and the single-frame
//!   [`step`](layout::step) rule — one definition for the BPF walker, [`walk`] and the tests.
//! - [`UnwindTable`]: a compiled table ([`UnwindTable::compile_file`]), its statistics,
//!   its serialization, and an on-disk [`cache`].
//!
//! ```no_run
//! use unwound_unwind_tables::{UnwindTable, layout::CfaKind};
//!
//! let table = UnwindTable::compile_file("/usr/lib/x86_64-linux-gnu/libc.so.6".as_ref())?;
//! println!("{} DWARF rows → {} entries, {} bytes", table.stats().dwarf_rows,
//!          table.stats().entries, table.byte_size());
//! let rule = table.lookup(0x27200).expect("covered");
//! assert_ne!(rule.cfa_kind(), Some(CfaKind::Gap));
//! # Ok::<(), unwound_unwind_tables::Error>(())
//! ```
#![cfg_attr(not(feature = "std"), no_std)]
#![warn(missing_docs)]

pub mod layout;

#[cfg(feature = "std")]
pub mod cache;
#[cfg(feature = "std")]
mod compile;
#[cfg(feature = "std")]
mod table;
#[cfg(feature = "std")]
pub mod walk;

#[cfg(feature = "std")]
pub use compile::{compile_elf, compile_file, compile_with, table_from_rows, CfiSource, MAX_FILE_SIZE};
#[cfg(feature = "std")]
pub use table::{Entries, Stats, UnwindTable};

/// What went wrong compiling or loading a table.
#[cfg(feature = "std")]
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: std::path::PathBuf,
        /// The system's reason.
        #[source]
        source: std::io::Error,
    },
    /// Not an ELF file this crate handles.
    #[error("not a usable x86-64 ELF file: {0}")]
    Elf(String),
    /// Larger than [`MAX_FILE_SIZE`].
    #[error("file of {size} bytes is over the size limit")]
    TooLarge {
        /// Its size.
        size: u64,
    },
    /// Neither `.eh_frame` nor `.debug_frame`.
    #[error("no call frame information (.eh_frame or .debug_frame)")]
    NoCfi,
    /// The CFI section is malformed.
    #[error("malformed call frame information: {0}")]
    Dwarf(String),
    /// A count exceeds what the format or this crate allows.
    #[error("too many {0} for one table")]
    Limit(&'static str),
    /// Serialized bytes are not a table of this format version.
    #[error("not a valid unwind table: {0}")]
    Format(&'static str),
}
