//! Turns addresses into functions, source lines and inlined frames, for profilers.
//!
//! [`Symbolizer`] is the main entry. Give it [`Options`] (where debugging information may
//! be found, how much memory to keep) and ask it about addresses: file virtual addresses
//! of an ELF file ([`Symbolizer::symbolize_elf`]) or absolute addresses of a running
//! process ([`Symbolizer::symbolize_pid`]). Each address gets one [`Resolution`]: the
//! [`Symbolized`] frames, innermost (inlined) first, or the [`Miss`] that says why there
//! are none.
//!
//! The answers come from DWARF line tables and inline trees (the binary's own, a separate
//! debug file found by build-id or `.gnu_debuglink`, or a debuginfod download), compiled
//! once per binary into block indexes that are cached zstd-compressed on disk per build-id
//! and kept in memory under an LRU byte budget; where DWARF has no function, from the
//! symbol tables. A file with much DWARF is indexed on a thread of its own, in bounded
//! memory; until its index is ready, a small batch of addresses is answered from the
//! compilation units that hold them (the same answers), and a larger one waits.
//!
//! ```
//! use unwound_symbolize::{Options, Symbolizer};
//!
//! #[inline(never)]
//! fn some_function() {}
//!
//! // Options::default() reads no environment variable and asks no server.
//! let symbolizer = Symbolizer::new(Options::default());
//! let addr = some_function as fn() as usize as u64;
//! let answers = symbolizer.symbolize_pid(std::process::id(), &[addr])?;
//! let symbolized = answers[0].as_ref().expect("a function of this program");
//! // Innermost first: the last frame is the function the code belongs to.
//! let outer = symbolized.frames.last().unwrap();
//! assert!(outer.function.as_deref().unwrap().ends_with("some_function"));
//! # Ok::<(), unwound_symbolize::Error>(())
//! ```
//!
//! Lower-level sources, each its own type:
//! - [`ElfSymbols`]: the function symbols of one ELF file (`.symtab` and `.dynsym`), and the
//!   file's load segments, so an address inside a running process can be mapped back to the
//!   file's own virtual addresses ([`LoadSegments`] reads only the segments).
//! - [`ProcessMaps`]: a process's memory mappings from `/proc/PID/maps`, which turn an
//!   absolute address into (file, file offset).
//! - [`KernelSymbols`]: the running kernel's symbols from `/proc/kallsyms`, modules included.
//!
//! ```no_run
//! use unwound_symbolize::{ElfSymbols, ProcessMaps};
//!
//! # fn main() -> Result<(), unwound_symbolize::Error> {
//! let maps = ProcessMaps::read(std::process::id())?;
//! # #[inline(never)] fn some_function() {}
//! let addr = some_function as fn() as usize as u64;
//! let mapping = maps.find(addr).expect("main is mapped");
//! let elf = ElfSymbols::open(mapping.path.as_ref().unwrap())?;
//! let vaddr = elf.file_offset_to_vaddr(mapping.file_offset(addr)).unwrap();
//! let symbol = elf.lookup(vaddr).unwrap();
//! assert!(symbol.name.ends_with("some_function"));
//! # Ok(()) }
//! ```
//!
//! # Cargo features
//!
//! Both are on by default.
//! - `debuginfod`: the debuginfod client's HTTP stack. Without it the crate has no network
//!   code: a [`Debuginfod`] finds only files already in its download cache, and
//!   [`Debuginfod::fetch`] otherwise fails with [`DebuginfodError::NotBuiltIn`].
//! - `libiberty-demangle`: C++ names demangled by the C++ runtime's `__cxa_demangle`
//!   (libiberty's demangler, so names match `nm -C` and `addr2line -C`); links libstdc++.
//!   Without it C++ names go through the pure-Rust `cpp_demangle` crate (see [`demangle`]).
//!
//! # Threads
//!
//! Every public type is `Send + Sync`: one [`Symbolizer`] is meant to be shared across
//! threads, and its batches run on rayon's pool, one task per binary.
#![warn(missing_docs)]

mod cache;
mod debuginfo;
mod demangle;
mod dwarf;
mod eh_frame;
mod elf;
mod error;
mod index;
mod kernel;
mod maps;
mod name;
mod options;
mod perf_map;
pub mod process;
pub mod python;
mod resolution;
mod symbolizer;

pub use debuginfo::{hex as build_id_hex, DebugSource, Debuginfod, DebuginfodError, RequestError};
pub use demangle::demangle;
pub use elf::{ElfSymbols, LoadSegments, Symbol};
pub use error::{DwarfError, Error};
pub use kernel::{KernelSymbol, KernelSymbols};
pub use maps::{Mapping, ProcessMaps};
pub use name::Name;
pub use options::{default_cache_dir, Options};
pub use perf_map::{
    jit_source, PerfMap, PerfMapStats, MAX_PERF_MAP_BYTES, MAX_PERF_MAP_ENTRIES, MAX_PERF_MAP_ENTRY_SIZE,
};
pub use process::{
    CapturedAddress, FileIdentity, FileStamp, MappedObject, ObjectBytes, ObjectInfo, Snapshot, Snapshots,
};
pub use resolution::{addr2line_text, Frame, Miss, NameSource, Resolution, Symbolized};
pub use symbolizer::{Stats, Symbolizer, MAX_DWARF_SECTION, MAX_MINI_DEBUGINFO};

/// Largest ELF file this crate will map (4 GiB): anything larger is refused, not parsed.
pub const MAX_ELF_SIZE: u64 = 4 << 30;
/// Most symbols kept from one file.
pub const MAX_SYMBOLS: usize = 16 << 20;

// The promise of the crate doc: every public type can be shared across threads.
const _: fn() = || {
    fn shareable<T: Send + Sync>() {}
    shareable::<Symbolizer>();
    shareable::<Options>();
    shareable::<Stats>();
    shareable::<Resolution>();
    shareable::<Symbolized>();
    shareable::<Frame>();
    shareable::<NameSource>();
    shareable::<Name>();
    shareable::<Miss>();
    shareable::<Error>();
    shareable::<DwarfError>();
    shareable::<DebugSource>();
    shareable::<Debuginfod>();
    shareable::<DebuginfodError>();
    shareable::<RequestError>();
    shareable::<ElfSymbols>();
    shareable::<LoadSegments>();
    shareable::<Symbol<'static>>();
    shareable::<ProcessMaps>();
    shareable::<Mapping>();
    shareable::<KernelSymbols>();
    shareable::<KernelSymbol<'static>>();
};

/// 64-bit FNV-1a of `bytes`: cache keys (stable across runs and machines).
fn fnv(bytes: impl IntoIterator<Item = u8>) -> u64 {
    bytes.into_iter().fold(0xcbf29ce484222325, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100000001b3))
}

/// Entry points for the fuzz targets (`fuzz/`): not part of the API.
#[doc(hidden)]
pub mod fuzzing {
    use object::Object;

    /// Arbitrary bytes as an ELF file with DWARF: index it, round-trip every block through
    /// its compressed encoding, look addresses up. Never panics.
    pub fn dwarf_index(data: &[u8]) {
        let bytes: crate::dwarf::FileBytes = std::sync::Arc::new(data.to_vec());
        // Parsed again from the copy: the sections are found by their place in it.
        let Ok(obj) = object::File::parse((*bytes).as_ref()) else { return };
        let Ok(sections) = crate::dwarf::Sections::load(&obj, &bytes, 16 << 20) else { return };
        let text = crate::dwarf::text_ranges(&obj);
        let Ok(mut raw) = crate::dwarf::read(&sections, None, &text, None) else { return };
        let blocks = crate::index::build_blocks(&mut raw);
        let mut frames = Vec::new();
        for b in &blocks {
            let p = crate::cache::pack(b);
            let back = crate::cache::unpack(&p.bytes, p.raw_len, p.crc).expect("own encoding decodes");
            assert_eq!(&back, b);
            let b = crate::index::Lookup::new(b);
            for a in [
                b.start,
                b.start.wrapping_add(1),
                b.end.wrapping_sub(1),
                (b.start / 2).wrapping_add(b.end / 2),
            ] {
                frames.clear();
                let _ = b.region_index(a).map(|i| b.lookup_region(i, &mut frames));
            }
        }
        let _ = obj.build_id();
        let _ = crate::ElfSymbols::mini_debuginfo("fuzz", data, 1 << 20, true);
    }

    /// Arbitrary bytes as a stored index block (raw and as a zstd frame). Never panics.
    pub fn index_block(data: &[u8]) {
        let mut frames = Vec::new();
        if let Ok(b) = crate::cache::decode_block(data) {
            let b = crate::index::Lookup::new(&b);
            for a in [b.start, b.end.wrapping_sub(1), b.start.wrapping_add(17)] {
                frames.clear();
                let _ = b.region_index(a).map(|i| b.lookup_region(i, &mut frames));
            }
        }
        let _ = crate::cache::unpack(data, 1 << 20, crc32fast::hash(data));
    }
}
