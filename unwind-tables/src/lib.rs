//! Compiles the DWARF call frame information (`.eh_frame`, `.debug_frame`) of x86-64 ELF
//! files into compact, sorted unwind tables that an in-kernel stack walker can search within
//! BPF map limits, and walks stacks with them.
//!
//! - [`UnwindTable`]: the main type. [`UnwindTable::compile_file`] (or [`compile_elf`] for
//!   bytes in memory) builds one, [`lookup`](UnwindTable::lookup) answers the
//!   [`UnwindRule`](layout::UnwindRule) at a file address, [`stats`](UnwindTable::stats)
//!   counts rows and what could not be expressed, and
//!   [`to_bytes`](UnwindTable::to_bytes)/[`from_bytes`](UnwindTable::from_bytes) serialize it.
//! - [`layout`] (`no_std`, the only module without the `std` feature): the byte layout, its
//!   lookup and the single-frame [`step`](layout::step) rule — one definition for the BPF
//!   walker, the reference walker ([`walk`]) and the tests.
//! - [`cache`]: compiled tables on disk, keyed by build-id.
//!
//! A table is immutable once built, and `Send + Sync`: compile it on one thread and look up
//! from many. Compilation itself runs on the rayon thread pool; the table it produces does
//! not depend on the number of threads.
//!
//! ```
//! use unwound_unwind_tables::layout::{step, CfaKind, Memory, Registers, Step};
//! use unwound_unwind_tables::UnwindTable;
//!
//! let table = UnwindTable::compile_file("/proc/self/exe".as_ref())?;
//! let stats = table.stats();
//! println!("{} DWARF rows → {} entries, {} bytes", stats.dwarf_rows, stats.entries, table.byte_size());
//!
//! // The ELF entry point (`_start`) marks itself as the outermost frame.
//! let elf = std::fs::read("/proc/self/exe").unwrap();
//! let entry = u64::from_le_bytes(elf[24..32].try_into().unwrap()); // e_entry
//! let rule = table.lookup(entry).expect("_start has CFI");
//! assert_eq!(rule.cfa_kind(), Some(CfaKind::EndOfStack));
//!
//! // A rule in readelf's notation, and one step with it over a stack of two words.
//! let rule = table.rows().into_iter().map(|(_, _, r)| r).find(|r| r.to_string() == "rsp+16 c-16");
//! let rule = rule.expect("a function that pushed rbp");
//! struct Stack([u64; 2]);
//! impl Memory for Stack {
//!     fn read_u64(&mut self, addr: u64) -> Option<u64> {
//!         self.0.get(addr.checked_sub(0x1000)? as usize / 8).copied()
//!     }
//! }
//! let regs = Registers { rip: 0x5555, rsp: 0x1000, rbp: 0x7 };
//! let Step::Caller { regs: caller, .. } = step(&rule, &regs, &mut Stack([0x2000, 0x4444])) else {
//!     panic!("no caller");
//! };
//! assert_eq!(caller, Registers { rip: 0x4444, rsp: 0x1010, rbp: 0x2000 });
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
mod error;
#[cfg(feature = "std")]
mod table;
#[cfg(feature = "std")]
pub mod walk;

#[cfg(feature = "std")]
pub use compile::{
    compile_elf, compile_file, compile_with, table_from_rows, CfiSource, MAX_FDES, MAX_FILE_SIZE, MAX_PADDING,
};
#[cfg(feature = "std")]
pub use error::{DwarfError, Error, FormatError};
#[cfg(feature = "std")]
pub use table::{Entries, Stats, UnwindTable};

/// What the docs say is shared between threads is.
#[cfg(feature = "std")]
const _: () = {
    const fn shared<T: Send + Sync>() {}
    shared::<UnwindTable>();
    shared::<Entries>();
    shared::<Stats>();
    shared::<cache::TableCache>();
    shared::<Error>();
    shared::<layout::UnwindRule>();
    shared::<layout::TableView<'static, Vec<u32>>>();
};
