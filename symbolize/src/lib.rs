//! Turns addresses into functions, source lines and inlined frames for a profiler.
//!
//! [`Symbolizer`] is the main entry: DWARF lines and inline trees (the binary's own, a
//! separate debug file found by build-id or `.gnu_debuglink`, or a debuginfod download)
//! compiled into block indexes that are cached zstd-compressed on disk per build-id and
//! kept in memory under an LRU byte budget. It answers for ELF file addresses
//! ([`Symbolizer::symbolize_elf`]) and for process addresses
//! ([`Symbolizer::symbolize_pid`]).
//!
//! Lower-level sources, each its own type:
//! - [`ElfSymbols`]: the function symbols of one ELF file (`.symtab` and `.dynsym`), and the
//!   file's load segments, so an address inside a running process can be mapped back to the
//!   file's own virtual addresses.
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
#![warn(missing_docs)]

mod cache;
mod debuginfo;
mod dwarf;
mod elf;
mod index;
mod kernel;
mod maps;
mod name;
mod symbolizer;

pub use debuginfo::{hex as build_id_hex, DebugSource, Debuginfod, DebuginfodError};
pub use elf::{ElfSymbols, LoadSegments, Symbol};
pub use kernel::{KernelSymbol, KernelSymbols};

/// 64-bit FNV-1a of `bytes`: cache keys (stable across runs and machines).
fn fnv(bytes: impl IntoIterator<Item = u8>) -> u64 {
    bytes.into_iter().fold(0xcbf29ce484222325, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100000001b3))
}
pub use maps::{Mapping, ProcessMaps};
pub use name::Name;
pub use symbolizer::{
    addr2line_text, default_cache_dir, Frame, Miss, Options, Resolution, Stats, Symbolized, Symbolizer,
    MAX_DWARF_SECTION,
};

use std::path::PathBuf;

/// Largest ELF file this crate will map (4 GiB): anything larger is refused, not parsed.
pub const MAX_ELF_SIZE: u64 = 4 << 30;
/// Most symbols kept from one file.
pub const MAX_SYMBOLS: usize = 16 << 20;

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
    /// The file is not an ELF file this crate understands.
    #[error("{path} is not a usable ELF file: {reason}")]
    Elf {
        /// The file.
        path: PathBuf,
        /// The parser's reason.
        reason: String,
    },
    /// The file is larger than [`MAX_ELF_SIZE`].
    #[error("{path} is {size} bytes, more than the {MAX_ELF_SIZE}-byte limit")]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// Its size.
        size: u64,
    },
    /// `/proc/kallsyms` shows only zero addresses (kernel.kptr_restrict, or not root).
    #[error("kernel symbol addresses are hidden: run as root or set kernel.kptr_restrict=0")]
    KernelAddressesHidden,
}

/// Demangles a Rust (legacy or v0) or C++ (Itanium) symbol name; other names are returned
/// as they are. Rust hashes are left out. C++ names come out exactly as binutils' `nm -C` and
/// `addr2line -C` print them: they are demangled by libiberty's demangler, which the C++
/// runtime exports as `__cxa_demangle` (pure-Rust demanglers differ on `std::` abbreviations
/// and thunks).
///
/// ```
/// assert_eq!(unwound_symbolize::demangle("_ZN3foo3barE"), "foo::bar");
/// assert_eq!(unwound_symbolize::demangle("_ZN4fixt7chain_aEm"), "fixt::chain_a(unsigned long)");
/// assert_eq!(unwound_symbolize::demangle("_ZNSi6ignoreEv"), "std::istream::ignore()");
/// assert_eq!(unwound_symbolize::demangle("main"), "main");
/// ```
pub fn demangle(name: &str) -> String {
    if let Ok(d) = rustc_demangle::try_demangle(name) {
        return format!("{d:#}");
    }
    if name.starts_with("_Z") {
        if let Some(s) = cxa_demangle(name) {
            return s;
        }
        if let Ok(sym) = cpp_demangle::Symbol::new(name) {
            if let Ok(s) = sym.demangle() {
                return s;
            }
        }
    }
    name.to_string()
}

/// Longest name handed to the C++ runtime's demangler; longer ones go to `cpp_demangle`.
const MAX_CXA_NAME: usize = 16 * 1024;

fn cxa_demangle(name: &str) -> Option<String> {
    use std::ffi::{c_char, c_int, CStr, CString};
    extern "C" {
        fn __cxa_demangle(
            mangled: *const c_char,
            output: *mut c_char,
            length: *mut usize,
            status: *mut c_int,
        ) -> *mut c_char;
        fn free(p: *mut std::ffi::c_void);
    }
    if name.len() > MAX_CXA_NAME {
        return None;
    }
    let c = CString::new(name).ok()?;
    let mut status: c_int = 0;
    // SAFETY: NUL-terminated input; a null output buffer asks the runtime to allocate one,
    // which we free with the C allocator it came from.
    unsafe {
        let out = __cxa_demangle(c.as_ptr(), std::ptr::null_mut(), std::ptr::null_mut(), &mut status);
        if out.is_null() {
            return None;
        }
        let s = (status == 0).then(|| CStr::from_ptr(out).to_string_lossy().into_owned());
        free(out.cast());
        s
    }
}

/// Entry points for the fuzz targets (`fuzz/`): not part of the API.
#[doc(hidden)]
pub mod fuzzing {
    use object::Object;

    /// Arbitrary bytes as an ELF file with DWARF: index it, round-trip every block through
    /// its compressed encoding, look addresses up. Never panics.
    pub fn dwarf_index(data: &[u8]) {
        let Ok(obj) = object::File::parse(data) else { return };
        let Ok(sections) = crate::dwarf::Sections::load(&obj, 16 << 20) else { return };
        let text = crate::dwarf::text_ranges(&obj);
        let Ok(mut raw) = crate::dwarf::read(&sections, None, &text) else { return };
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
