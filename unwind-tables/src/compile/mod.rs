//! DWARF CFI → table.
//!
//! The stages, one module each:
//! - [`fde_list`]: every FDE of the file in address order: `.eh_frame_hdr`'s search table
//!   read in place, or a walk over the section's records (in parallel parts);
//! - [`cie`]: what an FDE needs from its CIE, parsed once per CIE;
//! - [`cfi`]: the CFA programs evaluated (a fast path for the common opcodes, checked
//!   against the full decoder) and each row's state converted to an [`UnwindRule`];
//! - [`padding`]: whether the bytes between two functions are alignment padding;
//! - [`builder`]: a group's rows folded into entries (runs of pushes and pops, restore
//!   points);
//! - [`dictionary`]: the table's shared (rule, run) records;
//! - [`assemble`]: the groups' entries joined into pages and chunks;
//! - [`encoding`]: the LEB128 and `DW_EH_PE_*` readers they share.
//!
//! The groups of [`FDES_PER_GROUP`] FDEs run on the rayon pool ([`build`]).

mod assemble;
mod builder;
mod cfi;
mod cie;
mod dictionary;
mod encoding;
mod fde_list;
mod padding;

use rustc_hash::FxHashMap as HashMap;
use std::path::Path;
use std::sync::Mutex;

use gimli::{BaseAddresses, DebugFrame, EhFrame, EndianSlice, LittleEndian};
use object::{Object, ObjectSection, SectionFlags};
use rayon::prelude::*;

use crate::layout::*;
use crate::{DwarfError, Error, UnwindTable};

use assemble::stitch;
use builder::{dict_cache, Builder, DictCache, GroupOut};
use cfi::{evaluate_fde, Failure};
use cie::{CieInfo, CieLookup};
use dictionary::Dictionary;
use encoding::SectionAt;
use fde_list::{fdes_by_hdr, fdes_by_scan, hdr_hints, hdr_table, Fde, FdeList, Section};
use padding::Code;

/// The CFI sections as gimli reads them.
type R<'a> = EndianSlice<'a, LittleEndian>;

/// Largest ELF file compiled (4 GiB).
pub const MAX_FILE_SIZE: u64 = 4 << 30;
/// Most FDEs read from one file.
pub const MAX_FDES: usize = 16 << 20;
/// Largest gap between two FDEs taken as alignment padding when its bytes are all NOPs.
pub const MAX_PADDING: u64 = 64;

/// Where the call frame information comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CfiSource {
    /// `.eh_frame` (with `.eh_frame_hdr` when present, for an already sorted FDE list).
    EhFrame,
    /// `.debug_frame`.
    DebugFrame,
}

/// Compiles the CFI of the ELF file at `path`.
pub fn compile_file(path: &Path) -> Result<UnwindTable, Error> {
    let file = std::fs::File::open(path).map_err(|e| Error::Io { path: path.into(), source: e })?;
    let size = file.metadata().map_err(|e| Error::Io { path: path.into(), source: e })?.len();
    if size > MAX_FILE_SIZE {
        return Err(Error::TooLarge { size });
    }
    // SAFETY: read-only private map; truncation under us faults like for every mmap reader.
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::Io { path: path.into(), source: e })?;
    compile_elf(&map)
}

/// Compiles the CFI of an ELF image in memory: `.eh_frame` when present, else `.debug_frame`.
pub fn compile_elf(data: &[u8]) -> Result<UnwindTable, Error> {
    let file = object::File::parse(data).map_err(Error::Elf)?;
    if file.architecture() != object::Architecture::X86_64 {
        return Err(Error::Architecture(file.architecture()));
    }
    let source = if file.section_by_name(".eh_frame").is_some_and(|s| s.size() > 0) {
        CfiSource::EhFrame
    } else if file.section_by_name(".debug_frame").is_some() {
        CfiSource::DebugFrame
    } else {
        return Err(Error::NoCfi);
    };
    compile_with(&file, &file, source)
}

/// Compiles `cfi_file`'s CFI for the code of `code_file` (the same file, or the binary
/// whose separate debug file holds `.debug_frame`).
pub fn compile_with(
    code_file: &object::File<'_>,
    cfi_file: &object::File<'_>,
    source: CfiSource,
) -> Result<UnwindTable, Error> {
    let mut ranges = Vec::new();
    for s in code_file.sections() {
        if let SectionFlags::Elf { sh_flags } = s.flags() {
            if sh_flags & u64::from(object::elf::SHF_EXECINSTR) != 0 {
                if let Ok(d) = s.data() {
                    ranges.push((s.address(), d));
                }
            }
        }
    }
    // FDE starts are stored relative to the lowest code address.
    let code_base = ranges.iter().map(|r| r.0).min().unwrap_or(0);
    let code = Code { ranges };
    let text = code_file.section_by_name(".text").map_or(0, |s| s.address());
    let got = code_file.section_by_name(".got").map_or(0, |s| s.address());
    match source {
        CfiSource::EhFrame => {
            let eh = cfi_file.section_by_name(".eh_frame").ok_or(Error::NoCfi)?;
            let eh_data = eh.data().map_err(|source| Error::Section { section: ".eh_frame", source })?;
            let mut bases = BaseAddresses::default().set_eh_frame(eh.address()).set_text(text).set_got(got);
            let section = EhFrame::new(eh_data, LittleEndian);
            let hdr = cfi_file.section_by_name(".eh_frame_hdr");
            if let Some(h) = &hdr {
                bases = bases.set_eh_frame_hdr(h.address());
            }
            // The header's search table, read in place, when it lists exactly the records'
            // FDEs; else the records themselves (linkers may list only one FDE per start
            // address there: lld keeps an empty one and drops the real one).
            let table = hdr.as_ref().and_then(|h| Some((hdr_table(h.data().ok()?)?, h.address())));
            let hints = table.map_or_else(Vec::new, |(t, a)| hdr_hints(t, a, eh.address()));
            let walker = Section {
                section: &section,
                bases: &bases,
                data: eh_data,
                addr: eh.address(),
                eh_frame: true,
                code_base,
            };
            let expected = table.map_or_else(|| walker.count_fdes(), |(t, _)| t.len() / 8);
            let mut records = walker.records(hints, expected);
            let cies = std::mem::take(&mut records.cies);
            let sec = SectionAt { addr: eh.address(), bases: &bases };
            if let Some(list) =
                table.and_then(|(t, a)| fdes_by_hdr(t, a, &records, eh_data, eh.address(), code_base))
            {
                // Not held while the table is built; walked again in the rare case of a
                // search table that does not match its records.
                drop(records);
                if let Some(t) = build(eh_data, true, &cies, list, 0, code_base, &sec, &code)? {
                    return Ok(t);
                }
                records = walker.records(Vec::new(), expected);
            }
            let (v, skipped) = fdes_by_scan(records)?;
            build(eh_data, true, &cies, FdeList::Owned(v), skipped, code_base, &sec, &code)?
                .ok_or(DwarfError::InconsistentFdes.into())
        }
        CfiSource::DebugFrame => {
            let df = cfi_file.section_by_name(".debug_frame").ok_or(Error::NoCfi)?;
            // FDE records are located by 32-bit section offsets; a compressed section says
            // its size before it is inflated.
            let section = ".debug_frame";
            let size =
                df.compressed_data().map_err(|source| Error::Section { section, source })?.uncompressed_size;
            if size > u64::from(u32::MAX) {
                return Err(Error::SectionTooLarge { section, size });
            }
            let data = df.uncompressed_data().map_err(|source| Error::Section { section, source })?;
            let mut section = DebugFrame::new(&data, LittleEndian);
            section.set_address_size(8);
            let bases = BaseAddresses::default().set_text(text);
            let walker = Section {
                section: &section,
                bases: &bases,
                data: &data,
                addr: df.address(),
                eh_frame: false,
                code_base,
            };
            let mut records = walker.records(Vec::new(), walker.count_fdes());
            let cies = std::mem::take(&mut records.cies);
            let (fdes, skipped) = fdes_by_scan(records)?;
            let sec = SectionAt { addr: df.address(), bases: &bases };
            build(&data, false, &cies, FdeList::Owned(fdes), skipped, code_base, &sec, &code)?
                .ok_or(DwarfError::InconsistentFdes.into())
        }
    }
}

/// FDEs evaluated by one task.
const FDES_PER_GROUP: usize = 1024;

#[allow(clippy::too_many_arguments)]
fn build(
    data: &[u8],
    eh_frame: bool,
    cies: &HashMap<u32, Option<CieInfo>>,
    fdes: FdeList<'_>,
    skipped: u64,
    code_base: u64,
    sec: &SectionAt<'_>,
    code: &Code<'_>,
) -> Result<Option<UnwindTable>, Error> {
    let in_place = matches!(fdes, FdeList::Hdr { .. });
    let not_listed = std::sync::atomic::AtomicBool::new(false);
    // Groups of a fixed number of FDEs, not one per thread: the table (where a group ends,
    // a gap entry is written) is then the same on every machine.
    let n = fdes.len();
    let per = FDES_PER_GROUP;
    let shared = Mutex::new(Dictionary::new(MAX_RULES));
    let group = |(cache, list): &mut (DictCache, Vec<Option<Fde>>), g: usize| {
        let mut b = Builder::new(code, &shared, std::mem::take(cache));
        let mut stack = Vec::new();
        let mut lookup = CieLookup::new(cies);
        let end = ((g + 1) * per).min(n);
        fdes.range(g * per, end, list);
        for i in 0..list.len() {
            if not_listed.load(std::sync::atomic::Ordering::Relaxed) {
                break;
            }
            // Where FDE i + AHEAD starts, FDE i + AHEAD - 1 ends or its padding does.
            const AHEAD: usize = 4;
            if let Some(&Some(f)) = list.get(i + AHEAD) {
                code.prefetch_before(code_base + u64::from(f.start));
                prefetch(data, f.rec as usize);
                prefetch(data, f.rec as usize + 64);
            }
            let cie = list[i].and_then(|f| Some((f, f.cie(data, eh_frame)?)));
            let Some((f, Some(cie))) = cie.map(|(f, c)| (f, lookup.get(c))) else {
                if in_place {
                    // A pair that names no FDE of a known CIE.
                    not_listed.store(true, std::sync::atomic::Ordering::Relaxed);
                }
                continue;
            };
            match evaluate_fde(&f, code_base, &cie, data, sec, &mut stack, &mut b) {
                Ok(()) => {}
                Err(Failure::Malformed) => b.out.unsupported[Unsupported::Malformed as usize] += 1,
                Err(Failure::NotListed) => not_listed.store(true, std::sync::atomic::Ordering::Relaxed),
            }
        }
        let (mut out, c) = b.finish();
        *cache = c;
        if let Some(b) = out.entries.last_mut() {
            b.shrink_to_fit();
        }
        out.page_runs.shrink_to_fit();
        out
    };
    let state = || (dict_cache(n), Vec::with_capacity(per));
    let mut outs: Vec<GroupOut> = (0..n.div_ceil(per)).into_par_iter().map_init(state, group).collect();
    if shared.lock().unwrap_or_else(|p| p.into_inner()).overflow > 0 {
        // More records than the dictionary holds: which ones got in depended on the
        // threads' order. Again in address order, so the table is the same on every run.
        drop(outs);
        *shared.lock().unwrap_or_else(|p| p.into_inner()) = Dictionary::new(MAX_RULES);
        let mut s = state();
        outs = (0..n.div_ceil(per)).map(|g| group(&mut s, g)).collect();
    }
    drop(fdes);
    if not_listed.into_inner() {
        return Ok(None);
    }
    if let Some(first) = outs.first_mut() {
        first.unsupported[Unsupported::Malformed as usize] += skipped;
    }
    stitch(outs, shared.into_inner().unwrap_or_else(|p| p.into_inner())).map(Some)
}

/// Builds a table from rows `(start, end, rule)` sorted by start (for JIT code or tests).
/// Gaps between rows shorter than 16 bytes are taken as padding; longer ones get a gap
/// entry.
pub fn table_from_rows(rows: &[(u64, u64, UnwindRule)]) -> Result<UnwindTable, Error> {
    let code = Code { ranges: Vec::new() };
    let shared = Mutex::new(Dictionary::new(MAX_RULES));
    let mut b = Builder::new(&code, &shared, dict_cache(rows.len()));
    let mut last = 0;
    for (index, &(start, end, rule)) in rows.iter().enumerate() {
        if start < last || end < start {
            return Err(Error::UnsortedRows { index });
        }
        last = start;
        if end > start {
            b.row(start, end, rule);
        }
    }
    let (out, _) = b.finish();
    stitch(vec![out], shared.into_inner().unwrap_or_else(|p| p.into_inner()))
}

/// Asks the CPU to start loading `data[at]` into its cache, when `at` is in bounds. A
/// table is built far faster than a function's CFI record and its last code bytes arrive
/// from memory: without this, each function costs a cache miss or two.
#[inline]
fn prefetch(data: &[u8], at: usize) {
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (data, at);
    #[cfg(target_arch = "x86_64")]
    if let Some(byte) = data.get(at) {
        // SAFETY: a prefetch is only a hint (SSE, always on x86-64): it reads nothing into
        // the program, never faults, and the address is in bounds anyway.
        unsafe {
            core::arch::x86_64::_mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T0 }>(
                (byte as *const u8).cast(),
            )
        };
    }
}
