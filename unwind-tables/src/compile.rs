//! DWARF CFI → table.

use rustc_hash::FxHashMap as HashMap;
use std::path::Path;
use std::sync::Mutex;

use gimli::{BaseAddresses, DebugFrame, EhFrame, EndianSlice, LittleEndian, UnwindSection};
use object::{Object, ObjectSection, SectionFlags};
use rayon::prelude::*;

use crate::layout::*;
use crate::{Entries, Error, Stats, UnwindTable};

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

/// An FDE, 8 bytes: its range end, CIE and instructions are found again from its record
/// when it is evaluated (the list of every FDE is the largest buffer besides the output).
#[derive(Clone, Copy, Debug)]
struct Fde {
    /// Start address minus the lowest executable section's address.
    start: u32,
    /// Section offset of the FDE's record.
    rec: u32,
}

impl Fde {
    /// The section offset of the FDE's CIE.
    fn cie(&self, data: &[u8], eh_frame: bool) -> Option<u32> {
        let body = self.rec as usize + 4;
        let id = u32::from_le_bytes(data.get(body..body + 4)?.try_into().ok()?);
        Some(if eh_frame { (body as u32).wrapping_sub(id) } else { id })
    }

    /// The FDE's start address as its record says, its range length and its instructions'
    /// section offsets `[start, end)`.
    fn body(&self, data: &[u8], cie: &CieInfo, sec: &SectionAt<'_>) -> Option<(u64, u64, usize, usize)> {
        let rec = self.rec as usize;
        let len32 = u32::from_le_bytes(data.get(rec..rec + 4)?.try_into().ok()?);
        let next = (rec + 4).checked_add(len32 as usize)?;
        let (start, range, p) = fde_fields(data, rec + 8, cie, sec.addr, sec.bases)?;
        (p <= next && next <= data.len()).then_some((start, range, p, next))
    }
}

/// An FDE record's address fields, read from `at` (just past its CIE pointer) in a section
/// at `sec_addr`: its start, its range length, and where its instructions begin.
#[inline(always)]
fn fde_fields(
    data: &[u8],
    at: usize,
    cie: &CieInfo,
    sec_addr: u64,
    bases: &BaseAddresses,
) -> Option<(u64, u64, usize)> {
    let mut p = at;
    let field = sec_addr + p as u64;
    let start = read_encoded(data, &mut p, cie.encoding, field, bases, true)?;
    let range = read_range(data, &mut p, cie.encoding)?;
    if cie.augmented {
        let n = uleb(data, &mut p)?;
        p = p.checked_add(usize::try_from(n).ok()?)?;
    }
    Some((start, range, p))
}

/// A list of FDEs kept as the parts a walk found them in (joined, the parts and the whole
/// would be held at once).
#[derive(Default)]
struct Parts {
    parts: Vec<Vec<Fde>>,
    /// Where each part ends in the whole list.
    ends: Vec<usize>,
}

impl Parts {
    fn push(&mut self, mut part: Vec<Fde>) {
        if !part.is_empty() {
            part.shrink_to_fit();
            self.ends.push(self.len() + part.len());
            self.parts.push(part);
        }
    }

    fn len(&self) -> usize {
        self.ends.last().copied().unwrap_or(0)
    }

    fn iter(&self) -> impl Iterator<Item = &Fde> {
        self.parts.iter().flatten()
    }

    /// FDEs `from..to` appended to `out` (one search for the first part, not one per FDE).
    fn extend_range(&self, from: usize, to: usize, out: &mut Vec<Option<Fde>>) {
        let mut k = self.ends.partition_point(|&e| e <= from);
        let mut i = from;
        while i < to {
            let (Some(part), Some(&end)) = (self.parts.get(k), self.ends.get(k)) else { return };
            let start = end - part.len();
            let upto = to.min(end);
            out.extend(part[i - start..upto - start].iter().copied().map(Some));
            i = upto;
            k += 1;
        }
    }
}

/// The FDEs of a file in address order: the `.eh_frame_hdr` search table read in place
/// when it lists exactly the section's FDEs (no copy at all), else a list built by scanning
/// the records.
enum FdeList<'a> {
    Owned(Parts),
    /// `(initial location, FDE address)` pairs, `DW_EH_PE_datarel | sdata4` from the
    /// header's address; every pair checked against its record before use.
    Hdr {
        table: &'a [u8],
        hdr_addr: u64,
        eh_addr: u64,
        code_base: u64,
    },
}

impl FdeList<'_> {
    fn len(&self) -> usize {
        match self {
            FdeList::Owned(p) => p.len(),
            FdeList::Hdr { table, .. } => table.len() / 8,
        }
    }

    /// FDEs `from..to` (each `None` where the list has no usable FDE) into `out`, cleared.
    fn range(&self, from: usize, to: usize, out: &mut Vec<Option<Fde>>) {
        out.clear();
        match self {
            FdeList::Owned(p) => p.extend_range(from, to, out),
            FdeList::Hdr { table, hdr_addr, eh_addr, code_base } => out.extend((from..to).map(|i| {
                let (loc, fde) = hdr_pair(table, i, *hdr_addr)?;
                let start = u32::try_from(loc.checked_sub(*code_base)?).ok()?;
                Some(Fde { start, rec: u32::try_from(fde.checked_sub(*eh_addr)?).ok()? })
            })),
        }
    }
}

/// The records of a CFI section, found by their length fields, with each FDE's address
/// fields read on the way (the record is in cache then).
#[derive(Default)]
struct Records {
    /// Every FDE with a non-empty range in the file's code, in section order.
    parts: Parts,
    /// FDE records of any kind (a header search table that lists as many can be used).
    fde_records: usize,
    /// FDE records left out as malformed or as outside the file's code.
    skipped: u64,
    /// Every CIE an FDE names, parsed once; `None` when unusable.
    cies: HashMap<u32, Option<CieInfo>>,
    /// Why the walk stopped before the section's end, and where.
    fault: Option<(usize, Fault)>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fault {
    /// A 64-bit length (unsupported).
    Dwarf64,
    /// A record longer than the rest of the section (counted as an FDE record when it is
    /// one).
    PastEnd,
}

/// How a walk over part of a section ended.
enum Walk {
    /// At the first record at or after the part's end.
    At(usize),
    /// At the section's end or its terminator.
    End,
    /// At a record it cannot step over (recorded in [`Records::fault`]).
    Fault,
}

/// A CFI section whose records are walked.
struct Section<'w, S> {
    section: &'w S,
    bases: &'w BaseAddresses,
    data: &'w [u8],
    addr: u64,
    eh_frame: bool,
    /// The lowest code address (FDE starts are kept relative to it).
    code_base: u64,
}

impl<'a, S> Section<'_, S>
where
    S: UnwindSection<R<'a>> + Sync,
    S::Offset: gimli::UnwindOffset<usize>,
{
    /// Walks the records from offset `from` while before `to`, appending the FDEs to `fdes`
    /// and the rest of what it finds to `out`. A zero length ends `.eh_frame` and is
    /// padding in `.debug_frame`.
    fn walk(&self, from: usize, to: usize, out: &mut Records, fdes: &mut Vec<Fde>) -> Walk {
        let data = self.data;
        let mut pos = from;
        let mut last: Option<(u32, Option<CieInfo>)> = None;
        while pos < to {
            // Each record's length leads to the next: the next lines are asked for ahead,
            // or every record waits for memory.
            prefetch(data, pos + WALK_AHEAD);
            let (Some(len), Some(id)) = (read_u32(data, pos), read_u32(data, pos + 4)) else {
                return Walk::End;
            };
            if len == 0 {
                if self.eh_frame {
                    return Walk::End; // terminator
                }
                pos += 4;
                continue;
            }
            if len == 0xffff_ffff {
                out.fault = Some((pos, Fault::Dwarf64));
                return Walk::Fault;
            }
            let body = pos + 4;
            let Some(next) = body.checked_add(len as usize).filter(|&n| n <= data.len()) else {
                out.fde_records += usize::from(id != self.cie_id());
                out.fault = Some((pos, Fault::PastEnd));
                return Walk::Fault;
            };
            if id != self.cie_id() {
                out.fde_records += 1;
                let cie_off = if self.eh_frame { (body as u32).wrapping_sub(id) } else { id };
                let cie = match last {
                    Some((o, info)) if o == cie_off => info,
                    _ => {
                        let info = *out
                            .cies
                            .entry(cie_off)
                            .or_insert_with(|| cie_info(self.section, self.bases, cie_off as usize));
                        last = Some((cie_off, info));
                        info
                    }
                };
                match cie.and_then(|c| self.fde_range(c, body, next)) {
                    Some((Some(rel), start, range)) if range > 0 && start != 0 => {
                        // At most one per 8 bytes of a section below 4 GiB: bounded by the
                        // section. The limit is on the whole list, checked after the walk.
                        fdes.push(Fde { start: rel, rec: pos as u32 })
                    }
                    // Outside the 4 GiB above the lowest code section: no code of this file.
                    Some((None, start, range)) if range > 0 && start != 0 => out.skipped += 1,
                    Some(_) => {} // describes no code
                    None => out.skipped += 1,
                }
            }
            pos = next;
        }
        Walk::At(pos)
    }

    /// How many FDE records the section has, counted by a walk over their length fields
    /// alone (to allocate their list once).
    fn count_fdes(&self) -> usize {
        let mut n = 0;
        let mut pos = 0usize;
        while let (Some(len), Some(id)) = (read_u32(self.data, pos), read_u32(self.data, pos + 4)) {
            if len == 0 && self.eh_frame || len == 0xffff_ffff {
                break;
            }
            n += usize::from(len != 0 && id != self.cie_id());
            pos = pos.saturating_add(if len == 0 { 4 } else { 4 + len as usize });
        }
        n
    }

    fn cie_id(&self) -> u32 {
        if self.eh_frame {
            0
        } else {
            0xffff_ffff
        }
    }

    /// An FDE's start relative to the code base (`None` outside the 4 GiB above it), its
    /// start and its range, from the record body at `body` ending at `next`.
    fn fde_range(&self, c: CieInfo, body: usize, next: usize) -> Option<(Option<u32>, u64, u64)> {
        let (start, range, p) = fde_fields(self.data, body + 4, &c, self.addr, self.bases)?;
        start.checked_add(range)?;
        u32::try_from(range).ok()?;
        let rel = start.checked_sub(self.code_base).and_then(|r| u32::try_from(r).ok());
        (p <= next).then_some((rel, start, range))
    }

    /// Every record of the section, walked in parts in parallel when `hints` (offsets that
    /// may start records: the header search table's FDE pointers) give places to start.
    /// Each part must end exactly where the next starts, which makes that start a record
    /// the serial walk reaches too; when one does not, the section is walked again
    /// serially. The result is the serial walk's either way. `expected`: about how many
    /// FDEs the section has (for the lists' capacity), when known.
    fn records(&self, mut hints: Vec<u32>, expected: usize) -> Records {
        let len = self.data.len();
        hints.retain(|&h| h > 0 && (h as usize) < len);
        hints.sort_unstable();
        hints.dedup();
        let mut bounds = Vec::with_capacity(hints.len() + 2);
        bounds.push(0);
        bounds.extend(hints.iter().map(|&h| h as usize));
        bounds.push(len);
        let parts = bounds.len() - 1;
        let per_part = expected.min(MAX_FDES).div_ceil(parts) + expected / (parts * 32);
        let walked: Vec<(Records, Vec<Fde>, Walk)> = bounds
            .par_windows(2)
            .map(|w| {
                let (mut r, mut fdes) = (Records::default(), Vec::with_capacity(per_part));
                let walk = self.walk(w[0], w[1], &mut r, &mut fdes);
                (r, fdes, walk)
            })
            .collect();
        let mut all = Records::default();
        for ((r, fdes, walk), w) in walked.into_iter().zip(bounds.windows(2)) {
            all.parts.push(fdes);
            all.fde_records += r.fde_records;
            all.skipped += r.skipped;
            all.cies.extend(r.cies);
            match walk {
                Walk::At(p) if p == w[1] => {}
                Walk::At(_) if w[1] == len => break,
                Walk::At(_) => {
                    // Overshot the next part's start: that hint is no record of this walk.
                    drop(all);
                    let (mut r, mut fdes) = (Records::default(), Vec::with_capacity(per_part));
                    self.walk(0, len, &mut r, &mut fdes);
                    r.parts.push(fdes);
                    return r;
                }
                Walk::End => break,
                Walk::Fault => {
                    all.fault = r.fault;
                    break;
                }
            }
        }
        all
    }
}

fn read_u32(data: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(*data.get(at..at.checked_add(4)?)?.first_chunk()?))
}

/// How far ahead of a walk over the records their bytes are prefetched.
const WALK_AHEAD: usize = 512;

/// Parts a walk over a section's records is split into, at most.
const RECORD_PARTS: usize = 16;

/// Pair `i` of an `.eh_frame_hdr` search table (datarel sdata4).
fn hdr_pair(table: &[u8], i: usize, hdr_addr: u64) -> Option<(u64, u64)> {
    let b = table.get(i * 8..i * 8 + 8)?;
    let loc = i32::from_le_bytes(b[..4].try_into().ok()?);
    let fde = i32::from_le_bytes(b[4..].try_into().ok()?);
    Some((hdr_addr.wrapping_add(loc as i64 as u64), hdr_addr.wrapping_add(fde as i64 as u64)))
}

/// The `.eh_frame_hdr` search table (pairs of datarel sdata4 values), when the header is
/// version 1 and has one.
fn hdr_table(hdr: &[u8]) -> Option<&[u8]> {
    let &[version, ptr_enc, count_enc, table_enc] = hdr.first_chunk::<4>()?;
    if version != 1 || count_enc != 0x03 || table_enc != 0x3b {
        return None;
    }
    let mut p = 4;
    skip_encoded(hdr, &mut p, ptr_enc)?;
    let n = u32::from_le_bytes(hdr.get(p..p + 4)?.try_into().ok()?) as usize;
    hdr.get(p + 4..p + 4 + n.checked_mul(8)?)
}

/// Up to `RECORD_PARTS - 1` FDE record offsets named by the search table, spread over it:
/// where a parallel walk of the records may start its parts.
fn hdr_hints(table: &[u8], hdr_addr: u64, eh_addr: u64) -> Vec<u32> {
    let n = table.len() / 8;
    if n < 4 * RECORD_PARTS {
        return Vec::new();
    }
    (1..RECORD_PARTS)
        .filter_map(|k| {
            let (_, fde) = hdr_pair(table, k * n / RECORD_PARTS, hdr_addr)?;
            u32::try_from(fde.checked_sub(eh_addr)?).ok()
        })
        .collect()
}

/// The `.eh_frame_hdr` search table as the FDE list, when its shape can be trusted:
/// strictly increasing locations inside the 4 GiB above `code_base`, and as many pairs as
/// the section has FDE records. Each pair is checked against its record when the FDE is
/// evaluated (an FDE record whose own start is the pair's location); one that fails sends
/// the whole file back to a scan of the records. `None`: scan (lld, for one, lists one FDE
/// per address and drops others).
fn fdes_by_hdr<'a>(
    table: &'a [u8],
    hdr_addr: u64,
    records: &Records,
    data: &[u8],
    eh_addr: u64,
    code_base: u64,
) -> Option<FdeList<'a>> {
    let n = table.len() / 8;
    if records.fde_records != n || n > MAX_FDES {
        return None;
    }
    let mut last = None;
    for i in 0..n {
        let (loc, fde) = hdr_pair(table, i, hdr_addr)?;
        if last.is_some_and(|l| l >= loc) || loc < code_base || loc - code_base > u64::from(u32::MAX) {
            return None;
        }
        last = Some(loc);
        fde.checked_sub(eh_addr).filter(|&r| r < data.len() as u64)?;
    }
    Some(FdeList::Hdr { table, hdr_addr, eh_addr, code_base })
}

/// The bytes of NOP and trap padding sequences (`nop`, `int3`, the prefixes, opcode and
/// ModRM bytes of multi-byte `nopw`/`nopl`), indexed by byte.
const PADDING: [bool; 256] = {
    let mut map = [false; 256];
    let bytes = [0x90u8, 0xcc, 0x66, 0x2e, 0x0f, 0x1f, 0x00, 0x40, 0x44, 0x80, 0x84];
    let mut i = 0;
    while i < bytes.len() {
        map[bytes[i] as usize] = true;
        i += 1;
    }
    map
};

/// Where a CFI section is, to read its pc-relative fields.
struct SectionAt<'a> {
    addr: u64,
    bases: &'a BaseAddresses,
}

/// Reads an FDE's address range length (encoded like its start, never relative).
fn read_range(data: &[u8], pos: &mut usize, encoding: u8) -> Option<u64> {
    read_encoded(data, pos, encoding, 0, &BaseAddresses::default(), false)
}

/// Steps over a `DW_EH_PE_*` encoded value at `pos`.
fn skip_encoded(data: &[u8], pos: &mut usize, encoding: u8) -> Option<()> {
    let n = match encoding & 0x0f {
        0x00 | 0x04 | 0x0c => 8,
        0x02 | 0x0a => 2,
        0x03 | 0x0b => 4,
        0x01 => return uleb(data, pos).map(|_| ()),
        0x09 => return sleb(data, pos).map(|_| ()),
        _ => return None,
    };
    *pos = pos.checked_add(n).filter(|&e| e <= data.len())?;
    Some(())
}

/// Executable bytes by virtual address, to tell alignment padding from code without CFI.
struct Code<'a> {
    ranges: Vec<(u64, &'a [u8])>,
}

impl Code<'_> {
    fn bytes(&self, start: u64, end: u64) -> Option<&[u8]> {
        let (base, data) =
            self.ranges.iter().find(|(b, d)| start >= *b && end >= start && end - b <= d.len() as u64)?;
        data.get((start - base) as usize..(end - base) as usize)
    }
    /// Asks the CPU to start loading the code bytes just below `end`, where the gap and
    /// epilogue checks read.
    #[inline]
    fn prefetch_before(&self, end: u64) {
        if let Some((base, data)) = self.ranges.iter().find(|(b, d)| end > *b && end - b <= d.len() as u64) {
            let at = (end - base) as usize;
            prefetch(data, at.wrapping_sub(1));
            prefetch(data, at.wrapping_sub(65));
        }
    }

    /// True when `[at, next)` holds one instruction that leaves the function (`ret`,
    /// `rep ret`, `jmp`) and then only padding: no pc in `(at, next)` can be sampled.
    fn single_exit(&self, at: u64, next: u64) -> bool {
        if next == at + 1 {
            return true;
        }
        let Some(b) = self.bytes(at, next.min(at + 5)) else { return false };
        let len = match b {
            [0xc3, ..] => 1,
            [0xf3, 0xc3, ..] | [0xeb, ..] => 2,
            [0xe9, ..] if b.len() >= 5 => 5,
            _ => return false,
        };
        at + len <= next && self.is_padding(at + len, next)
    }

    /// True when every byte is part of a NOP or trap padding sequence.
    fn is_padding(&self, start: u64, end: u64) -> bool {
        if end <= start {
            return true;
        }
        if end - start > MAX_PADDING {
            return false;
        }
        // Most gaps are under 16 bytes: the 16 bytes up to `end`, checked without a branch
        // per byte (a loop of the gap's length costs a mispredicted exit per gap).
        if end - start <= 16 {
            if let Some(w) = self.bytes(end.wrapping_sub(16), end).filter(|_| end >= 16) {
                let skip = (16 - (end - start)) as usize;
                let bad = w
                    .iter()
                    .enumerate()
                    .fold(0u8, |bad, (i, &x)| bad | (!PADDING[usize::from(x)] as u8 & (i >= skip) as u8));
                return bad == 0;
            }
        }
        match self.bytes(start, end) {
            Some(b) => b.iter().all(|&x| PADDING[usize::from(x)]),
            None => end - start < 16,
        }
    }
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
    let file = object::File::parse(data).map_err(|e| Error::Elf(e.to_string()))?;
    if file.architecture() != object::Architecture::X86_64 {
        return Err(Error::Elf(format!("unsupported architecture {:?}", file.architecture())));
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
            let eh_data = eh.data().map_err(|e| Error::Elf(e.to_string()))?;
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
                .ok_or(Error::Dwarf("inconsistent FDE records".into()))
        }
        CfiSource::DebugFrame => {
            let df = cfi_file.section_by_name(".debug_frame").ok_or(Error::NoCfi)?;
            // FDE records are located by 32-bit section offsets; a compressed section says
            // its size before it is inflated.
            let size = df.compressed_data().map_err(|e| Error::Elf(e.to_string()))?.uncompressed_size;
            if size > u64::from(u32::MAX) {
                return Err(Error::TooLarge { size });
            }
            let data = df.uncompressed_data().map_err(|e| Error::Elf(e.to_string()))?;
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
                .ok_or(Error::Dwarf("inconsistent FDE records".into()))
        }
    }
}

/// The CIEs already parsed, with the last one looked up kept at hand: most FDEs share their
/// neighbour's CIE.
struct CieLookup<'m> {
    cies: &'m HashMap<u32, Option<CieInfo>>,
    last: Option<(u32, Option<CieInfo>)>,
}

impl<'m> CieLookup<'m> {
    fn new(cies: &'m HashMap<u32, Option<CieInfo>>) -> Self {
        CieLookup { cies, last: None }
    }
    /// The CIE at section offset `off`; `None` when it is unknown or unusable.
    #[inline]
    fn get(&mut self, off: u32) -> Option<CieInfo> {
        match self.last {
            Some((o, info)) if o == off => info,
            _ => {
                let info = self.cies.get(&off).copied().flatten();
                self.last = Some((off, info));
                info
            }
        }
    }
}

/// What an FDE needs from its CIE, parsed once per CIE.
#[derive(Clone, Copy)]
struct CieInfo {
    /// `DW_EH_PE_*` encoding of the FDE's address fields (`.debug_frame`: absolute u64).
    encoding: u8,
    /// The FDE has augmentation data (a 'z' augmentation).
    augmented: bool,
    code_align: u64,
    data_align: i64,
    signal: bool,
    initial: State,
}

fn cie_info<'a, S: UnwindSection<R<'a>>>(section: &S, bases: &BaseAddresses, offset: usize) -> Option<CieInfo>
where
    S::Offset: gimli::UnwindOffset<usize>,
{
    let cie = section.cie_from_offset(bases, S::Offset::from(offset)).ok()?;
    if cie.address_size() != 8 {
        return None;
    }
    // No encoding given: absolute pointers (`.debug_frame`, or `.eh_frame` without 'R').
    let encoding = cie.fde_address_encoding().map_or(0, |e| e.0);
    let mut st =
        State { cfa: Cfa::RegOffset(RSP, 8), last_reg: RSP, last_off: 8, rbp: Reg::Same, ra: Reg::Same };
    let init = st;
    let mut stack = Vec::new();
    let mut it = cie.instructions(section, bases);
    while let Some(ins) = it.next().ok()? {
        apply(&ins, &mut st, &init, &mut stack, cie.code_alignment_factor(), cie.data_alignment_factor())
            .ok()?;
    }
    Some(CieInfo {
        encoding,
        augmented: cie.augmentation().is_some(),
        code_align: cie.code_alignment_factor(),
        data_align: cie.data_alignment_factor(),
        signal: cie.is_signal_trampoline(),
        initial: st,
    })
}

/// Reads a `DW_EH_PE_*` encoded pointer at `pos`; `field_addr` is its address (for pcrel).
#[inline(always)]
fn read_encoded(
    data: &[u8],
    pos: &mut usize,
    encoding: u8,
    field_addr: u64,
    bases: &BaseAddresses,
    absolute: bool,
) -> Option<u64> {
    if encoding == 0x1b {
        // pcrel sdata4, what GCC and LLVM emit: the case below, read directly.
        let v = i32::from_le_bytes(data.get(*pos..pos.checked_add(4)?)?.try_into().ok()?) as i64 as u64;
        *pos += 4;
        return Some(if absolute { field_addr.wrapping_add(v) } else { v });
    }
    read_encoded_other(data, pos, encoding, field_addr, bases, absolute)
}

/// [`read_encoded`] for the encodings other than pcrel sdata4.
#[inline(never)]
fn read_encoded_other(
    data: &[u8],
    pos: &mut usize,
    encoding: u8,
    field_addr: u64,
    bases: &BaseAddresses,
    absolute: bool,
) -> Option<u64> {
    if encoding == 0xff || encoding & 0x80 != 0 {
        return None; // omitted or indirect: not in FDE address fields of sane files
    }
    let get = |pos: &mut usize, n: usize| -> Option<&[u8]> {
        let b = data.get(*pos..*pos + n)?;
        *pos += n;
        Some(b)
    };
    let raw: u64 = match encoding & 0x0f {
        0x00 => u64::from_le_bytes(get(pos, 8)?.try_into().ok()?),
        0x01 => uleb(data, pos)?,
        0x02 => u64::from(u16::from_le_bytes(get(pos, 2)?.try_into().ok()?)),
        0x03 => u64::from(u32::from_le_bytes(get(pos, 4)?.try_into().ok()?)),
        0x04 => u64::from_le_bytes(get(pos, 8)?.try_into().ok()?),
        0x09 => sleb(data, pos)? as u64,
        0x0a => i16::from_le_bytes(get(pos, 2)?.try_into().ok()?) as i64 as u64,
        0x0b => i32::from_le_bytes(get(pos, 4)?.try_into().ok()?) as i64 as u64,
        0x0c => u64::from_le_bytes(get(pos, 8)?.try_into().ok()?),
        _ => return None,
    };
    if !absolute {
        return Some(raw);
    }
    let base = match encoding & 0x70 {
        0x00 => 0,
        0x10 => field_addr,
        0x20 => bases.eh_frame.text?,
        0x30 => bases.eh_frame.data?,
        _ => return None,
    };
    Some(base.wrapping_add(raw))
}

/// Every FDE of `records` with a non-empty range, sorted by start address, and how many
/// were left out as malformed; an error when the walk over the records stopped at one it
/// could not step over.
fn fdes_by_scan(records: Records) -> Result<(Parts, u64), Error> {
    match records.fault {
        Some((_, Fault::Dwarf64)) => {
            return Err(Error::Dwarf("64-bit DWARF CFI records are not supported".into()))
        }
        Some((pos, Fault::PastEnd)) => {
            return Err(Error::Dwarf(format!("record at {pos:#x} runs past the section end")))
        }
        None => {}
    }
    let out = records.parts;
    if out.len() > MAX_FDES {
        return Err(Error::Limit("FDEs"));
    }
    // Linkers write the records in address order, as a rule: checked first.
    if out.iter().is_sorted_by_key(|f| (f.start, f.rec)) {
        return Ok((out, records.skipped));
    }
    let mut all = Vec::with_capacity(out.len());
    for p in out.parts {
        all.extend_from_slice(&p);
    }
    all.par_sort_unstable_by_key(|f| (f.start, f.rec));
    let mut sorted = Parts::default();
    sorted.push(all);
    Ok((sorted, records.skipped))
}

/// Entries per block of a group's output: blocks are freed one by one as the table is
/// assembled, so the group outputs and the table are never both whole.
const GROUP_BLOCK: usize = 256;

/// A run of a group's entries on one page: page number (< 2^44) in the high 44 bits, the
/// count (≤ 4096 entries fit a page) in the low 20. 8 bytes where a tuple takes 16.
#[derive(Clone, Copy)]
struct PageRun(u64);

impl PageRun {
    fn page(self) -> u64 {
        self.0 >> 20
    }
    fn count(self) -> usize {
        (self.0 & 0xf_ffff) as usize
    }
}

/// Output of one group of FDEs (contiguous in address order).
#[derive(Default)]
struct GroupOut {
    /// Entries naming records of the shared dictionary, in blocks of [`GROUP_BLOCK`].
    entries: Vec<Vec<u32>>,
    /// Runs of `entries` by page: (absolute page number, count).
    page_runs: Vec<PageRun>,
    /// An entry on a page above [`PageRun`]'s range (only from arbitrary rows).
    page_overflow: bool,
    rows: u64,
    unsupported: [u64; 8],
    rbp_undefined: u64,
}

struct Open {
    start: u64,
    base: UnwindRule,
    run: Run,
    restore: bool,
    /// Start of the last row in the run.
    last_row: u64,
    /// The rule in effect before this entry, and whether a restore to it is allowed.
    before: UnwindRule,
    may_restore: bool,
}

/// FDEs evaluated by one task.
const FDES_PER_GROUP: usize = 1024;

/// Slots of a thread's cache of shared dictionary lookups (16 bytes each), at most: a file
/// gets one slot per 32 FDEs, at least [`MIN_DICT_CACHE`] (a small file's distinct rules
/// are few, and its table is smaller than a large cache).
const DICT_CACHE: usize = 4096;
const MIN_DICT_CACHE: usize = 256;

/// A rule's fields packed into one word: equal words, equal rules (one comparison where
/// the derived `==` makes four, on the hottest paths of a build).
#[inline]
fn bits(rule: &UnwindRule) -> u64 {
    u64::from(rule.cfa)
        | u64::from(rule.rbp) << 8
        | u64::from(rule.rbp_slot as u8) << 16
        | u64::from(rule.aux as u8) << 24
        | u64::from(rule.cfa_offset as u32) << 32
}

/// A direct-mapped cache of shared dictionary lookups: `(rule, run, id)`, id `u16::MAX` =
/// empty. Kept by a thread from group to group (ids never change while the groups run).
type DictCache = Vec<(UnwindRule, Run, u16)>;

fn dict_cache(fdes: usize) -> DictCache {
    let slots = (fdes / 32).next_power_of_two().clamp(MIN_DICT_CACHE, DICT_CACHE);
    vec![(UnwindRule::GAP, Run::NONE, u16::MAX); slots]
}

struct Builder<'c> {
    code: &'c Code<'c>,
    out: GroupOut,
    /// The table's records, shared by the groups (one copy, not one per group).
    shared: &'c Mutex<Dictionary>,
    /// Cache of `shared` lookups.
    cache: DictCache,
    open: Option<Open>,
    /// Rule in effect at the end of the last row, and where that row ended.
    state: UnwindRule,
    last_end: Option<u64>,
    /// Page and restore bit of the last closed entry.
    last_closed: Option<(u64, bool)>,
    last_rule: Option<((UnwindRule, Run), u16)>,
}

impl<'c> Builder<'c> {
    fn new(code: &'c Code<'c>, shared: &'c Mutex<Dictionary>, cache: DictCache) -> Self {
        Builder {
            code,
            out: GroupOut::default(),
            shared,
            cache,
            open: None,
            state: UnwindRule::GAP,
            last_end: None,
            last_closed: None,
            last_rule: None,
        }
    }

    fn rule_id(&mut self, rule: (UnwindRule, Run)) -> u16 {
        if let Some((r, i)) = self.last_rule {
            if bits(&r.0) == bits(&rule.0) && r.1 == rule.1 {
                return i;
            }
        }
        let slot = Dictionary::slot_of(rule.0, rule.1, self.cache.len() - 1);
        let c = self.cache[slot];
        let i = if c.2 != u16::MAX && bits(&c.0) == bits(&rule.0) && c.1 == rule.1 {
            c.2
        } else {
            let i = self.shared.lock().unwrap_or_else(|p| p.into_inner()).id(rule.0, rule.1);
            self.cache[slot] = (rule.0, rule.1, i);
            i
        };
        self.last_rule = Some((rule, i));
        i
    }

    fn close(&mut self) {
        if let Some(o) = self.open.take() {
            let id = self.rule_id((o.base, o.run));
            // A record that did not fit the dictionary (id 1, `DictionaryFull`) has no run,
            // so it cannot place a restore point either.
            let restore = o.restore && id != 1;
            let e = Entry { page_offset: (o.start & (PAGE_SIZE - 1)) as u16, rule: id, restore };
            if self.out.entries.last().is_none_or(|b| b.len() == GROUP_BLOCK) {
                self.out.entries.push(Vec::with_capacity(GROUP_BLOCK));
            }
            self.out.entries.last_mut().unwrap().push(e.encode());
            let page = o.start >> PAGE_SHIFT;
            match self.out.page_runs.last_mut() {
                Some(r) if r.page() == page => *r = PageRun(r.0 + 1),
                _ if page >= 1 << 44 => self.out.page_overflow = true,
                _ => self.out.page_runs.push(PageRun(page << 20 | 1)),
            }
            self.last_closed = Some((o.start >> PAGE_SHIFT, o.restore));
        }
    }

    fn open_new(&mut self, start: u64, rule: UnwindRule) {
        self.close();
        // A restore may return to the state before this entry only when the lookup can
        // recompute it: from the previous entry of the same page (one without a restore bit
        // of its own), or from the page's start rule when this entry is the page's first.
        let page = start >> PAGE_SHIFT;
        let may_restore = match self.last_closed {
            Some((p, restore)) if p == page => !restore,
            Some(_) => true,
            None => false, // first entry of a group: the state before it is not known here
        };
        self.open = Some(Open {
            start,
            base: rule,
            run: Run::NONE,
            restore: false,
            last_row: start,
            before: self.state,
            may_restore,
        });
        self.state = rule;
    }

    /// Whether `rule` at `start` continues the open entry: one more push/pop step, or the
    /// restore after its `ret`.
    fn try_extend(&mut self, start: u64, rule: &UnwindRule) -> bool {
        let Some(o) = self.open.as_mut() else { return false };
        if o.restore || start >> PAGE_SHIFT != o.start >> PAGE_SHIFT {
            return false;
        }
        let dist = start - o.last_row;
        if o.run.steps() > 0
            && o.run.pops()
            && o.may_restore
            && bits(rule) == bits(&o.before)
            && self.code.single_exit(o.last_row, start)
        {
            o.restore = true;
            self.state = *rule;
            return true;
        }
        // (An addend is 0 in rules from DWARF; rows given to `table_from_rows` may set one,
        // and a run keeps its first row's.)
        if o.base.cfa != CfaKind::Rsp as u8 || rule.cfa != CfaKind::Rsp as u8 || rule.aux != o.base.aux {
            return false;
        }
        let delta = i64::from(rule.cfa_offset) - i64::from(self.state.cfa_offset);
        let dir_pops = match delta {
            8 => false,
            -8 => true,
            _ => return false,
        };
        let Some(run) = o.run.pushed(dist, dir_pops) else { return false };
        // rbp: in a push run each row's rbp rule is kept exactly (the run records the step
        // from which rbp is saved). In a pop run the saved slot at CFA + k stays intact up
        // to the return, so "saved at CFA + k" stays right after `pop rbp`.
        let (mut base, mut run) = (o.base, run);
        let same_rbp = rule.rbp == self.state.rbp && rule.rbp_slot == self.state.rbp_slot;
        let rbp_ok = if dir_pops {
            base.rbp == RbpKind::AtCfa as u8
                && ((rule.rbp == RbpKind::AtCfa as u8 && rule.rbp_slot == base.rbp_slot)
                    || rule.rbp == RbpKind::Unchanged as u8)
        } else if same_rbp {
            true
        } else if base.rbp == RbpKind::Unchanged as u8
            && self.state.rbp == RbpKind::Unchanged as u8
            && rule.rbp == RbpKind::AtCfa as u8
        {
            // `push %rbp` partway through the run: saved from this step on, exactly as
            // the rows say (the run never stands "unchanged" in for "saved").
            base.rbp = rule.rbp;
            base.rbp_slot = rule.rbp_slot;
            run = run.with_rbp_from(run.steps());
            true
        } else {
            false
        };
        if !rbp_ok {
            return false;
        }
        o.base = base;
        o.run = run;
        o.last_row = start;
        // `run.final_rule(base)`, known without applying the run: this row's CFA, and the
        // run's rbp rule (the row's own, but for "unchanged" after `pop %rbp` in a pop run).
        self.state = UnwindRule { rbp: base.rbp, rbp_slot: base.rbp_slot, ..*rule };
        debug_assert_eq!(self.state, run.final_rule(base));
        true
    }

    #[inline(always)]
    fn row(&mut self, start: u64, end: u64, rule: UnwindRule) {
        self.out.rows += 1;
        let mut start = start;
        if let Some(last_end) = self.last_end {
            if start < last_end {
                // Overlapping FDEs: the earlier one wins.
                if end <= last_end {
                    return;
                }
                start = last_end;
            } else if start > last_end && !self.code.is_padding(last_end, start) {
                self.open_new(last_end, UnwindRule::GAP);
            }
        }
        self.last_end = Some(end);
        if bits(&rule) == bits(&self.state)
            && self.open.as_ref().is_some_and(|o| o.start >> PAGE_SHIFT == start >> PAGE_SHIFT)
        {
            return;
        }
        if self.try_extend(start, &rule) {
            return;
        }
        self.open_new(start, rule);
    }

    /// The group's output, and the cache for the next group.
    fn finish(mut self) -> (GroupOut, DictCache) {
        if let Some(end) = self.last_end {
            self.open_new(end, UnwindRule::GAP);
        }
        self.close();
        (self.out, self.cache)
    }
}

/// A register's rule while evaluating CFI.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Reg {
    Same,
    Undefined,
    AtCfa(i64),
    Other,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Cfa {
    RegOffset(u16, i64),
    Expression(usize, usize),
}

/// The part of the CFI state the tables need: CFA, rbp, return address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct State {
    cfa: Cfa,
    /// Last register and offset set by a def_cfa* instruction: binutils' readelf and the
    /// GCC unwinder keep them across a CFA expression, and hand-written assembly (libgcrypt)
    /// relies on `def_cfa_register` after `def_cfa_expression`; the spec calls that invalid.
    last_reg: u16,
    last_off: i64,
    rbp: Reg,
    ra: Reg,
}

const RSP: u16 = 7;
const RBP: u16 = 6;
const RA: u16 = 16;
const MAX_STATE_STACK: usize = 64;

impl State {
    fn reg_mut(&mut self, r: u16) -> Option<&mut Reg> {
        match r {
            RBP => Some(&mut self.rbp),
            RA => Some(&mut self.ra),
            _ => None,
        }
    }
}

/// Evaluates one instruction; `initial` is the CIE's state (for DW_CFA_restore).
fn apply(
    ins: &gimli::CallFrameInstruction<usize>,
    st: &mut State,
    initial: &State,
    stack: &mut Vec<State>,
    _caf: u64,
    daf: i64,
) -> Result<(), ()> {
    use gimli::CallFrameInstruction as I;
    match *ins {
        I::DefCfa { register, offset } => {
            let off = i64::try_from(offset).map_err(|_| ())?;
            st.cfa = Cfa::RegOffset(register.0, off);
            st.last_reg = register.0;
            st.last_off = off;
        }
        I::DefCfaSf { register, factored_offset } => {
            let off = factored_offset.checked_mul(daf).ok_or(())?;
            st.cfa = Cfa::RegOffset(register.0, off);
            st.last_reg = register.0;
            st.last_off = off;
        }
        I::DefCfaRegister { register } => {
            st.cfa = Cfa::RegOffset(register.0, st.last_off);
            st.last_reg = register.0;
        }
        I::DefCfaOffset { offset } => {
            let off = i64::try_from(offset).map_err(|_| ())?;
            st.cfa = Cfa::RegOffset(st.last_reg, off);
            st.last_off = off;
        }
        I::DefCfaOffsetSf { factored_offset } => {
            let off = factored_offset.checked_mul(daf).ok_or(())?;
            st.cfa = Cfa::RegOffset(st.last_reg, off);
            st.last_off = off;
        }
        I::DefCfaExpression { expression } => st.cfa = Cfa::Expression(expression.offset, expression.length),
        I::Undefined { register } => {
            if let Some(r) = st.reg_mut(register.0) {
                *r = Reg::Undefined;
            }
        }
        I::SameValue { register } => {
            if let Some(r) = st.reg_mut(register.0) {
                *r = Reg::Same;
            }
        }
        I::Offset { register, factored_offset } => {
            let off = i64::try_from(factored_offset).ok().and_then(|f| f.checked_mul(daf)).ok_or(())?;
            if let Some(r) = st.reg_mut(register.0) {
                *r = Reg::AtCfa(off);
            }
        }
        I::OffsetExtendedSf { register, factored_offset } => {
            let off = factored_offset.checked_mul(daf).ok_or(())?;
            if let Some(r) = st.reg_mut(register.0) {
                *r = Reg::AtCfa(off);
            }
        }
        I::ValOffset { register, .. }
        | I::ValOffsetSf { register, .. }
        | I::Expression { register, .. }
        | I::ValExpression { register, .. }
        | I::Register { dest_register: register, .. } => {
            if let Some(r) = st.reg_mut(register.0) {
                *r = Reg::Other;
            }
        }
        I::Restore { register } => {
            let init = match register.0 {
                RBP => initial.rbp,
                RA => initial.ra,
                _ => return Ok(()),
            };
            if let Some(r) = st.reg_mut(register.0) {
                *r = init;
            }
        }
        I::RememberState => {
            if stack.len() >= MAX_STATE_STACK {
                return Err(());
            }
            stack.push(*st);
        }
        I::RestoreState => {
            // The CFA is not part of the remembered state in DWARF 2 unwinders and is in
            // later ones; GCC emits the same CFA either way. Follow the spec (DWARF 5):
            // the whole row is restored.
            *st = stack.pop().ok_or(())?;
        }
        I::ArgsSize { .. } | I::NegateRaState | I::Nop | I::SetLoc { .. } | I::AdvanceLoc { .. } => {}
    }
    Ok(())
}

fn convert_state(st: &State, section: &[u8], signal: bool, out: &mut GroupOut) -> UnwindRule {
    let unsupported = |out: &mut GroupOut, r: Unsupported| {
        out.unsupported[r as usize] += 1;
        UnwindRule::unsupported(r)
    };
    if signal {
        return UnwindRule::new(CfaKind::Signal, 0, RbpKind::Undefined, 0);
    }
    match st.ra {
        Reg::Undefined => return UnwindRule::new(CfaKind::EndOfStack, 0, RbpKind::Undefined, 0),
        Reg::AtCfa(-8) => {}
        _ => return unsupported(out, Unsupported::ReturnAddress),
    }
    let mut rule = match st.cfa {
        Cfa::RegOffset(reg, offset) => {
            let kind = match reg {
                RSP => CfaKind::Rsp,
                RBP => CfaKind::Rbp,
                _ => return unsupported(out, Unsupported::CfaRegister),
            };
            let Ok(off) = i32::try_from(offset) else { return unsupported(out, Unsupported::OffsetRange) };
            UnwindRule::new(kind, off, RbpKind::Unchanged, 0)
        }
        Cfa::Expression(offset, length) => {
            let bytes = section.get(offset..offset.saturating_add(length));
            match bytes.and_then(cfa_expression) {
                Some(r) => r,
                None => return unsupported(out, Unsupported::CfaExpression),
            }
        }
    };
    match st.rbp {
        Reg::Same => {}
        Reg::AtCfa(o) => match i8::try_from(o / 8) {
            Ok(slot) if o % 8 == 0 => {
                rule.rbp = RbpKind::AtCfa as u8;
                rule.rbp_slot = slot;
            }
            _ => return unsupported(out, Unsupported::OffsetRange),
        },
        Reg::Undefined => rule.rbp = RbpKind::Undefined as u8,
        Reg::Other => {
            out.rbp_undefined += 1;
            rule.rbp = RbpKind::Undefined as u8;
        }
    }
    rule
}

/// Decodes one CFA instruction at `pos` of `data` (raw bytes, faster than a general
/// reader); `None` at malformed or unknown opcodes.
fn decode(data: &[u8], pos: &mut usize, caf: u64, loc: u64) -> Option<gimli::CallFrameInstruction<usize>> {
    use gimli::{CallFrameInstruction as I, Register, UnwindExpression};
    let op = *data.get(*pos)?;
    *pos += 1;
    let reg = |pos: &mut usize| -> Option<Register> { u16::try_from(uleb(data, pos)?).ok().map(Register) };
    let block = |pos: &mut usize| -> Option<UnwindExpression<usize>> {
        let len = usize::try_from(uleb(data, pos)?).ok()?;
        let offset = *pos;
        *pos = pos.checked_add(len).filter(|&e| e <= data.len())?;
        Some(UnwindExpression { offset, length: len })
    };
    let advance = |delta: u64| Some(I::SetLoc { address: loc.checked_add(delta.checked_mul(caf)?)? });
    Some(match op >> 6 {
        1 => return advance(u64::from(op & 0x3f)),
        2 => I::Offset { register: Register(u16::from(op & 0x3f)), factored_offset: uleb(data, pos)? },
        3 => I::Restore { register: Register(u16::from(op & 0x3f)) },
        _ => match op {
            0x00 => I::Nop,
            0x02 => {
                let d = *data.get(*pos)?;
                *pos += 1;
                return advance(u64::from(d));
            }
            0x03 => {
                let d = u16::from_le_bytes(data.get(*pos..*pos + 2)?.try_into().ok()?);
                *pos += 2;
                return advance(u64::from(d));
            }
            0x04 => {
                let d = u32::from_le_bytes(data.get(*pos..*pos + 4)?.try_into().ok()?);
                *pos += 4;
                return advance(u64::from(d));
            }
            0x05 => I::Offset { register: reg(pos)?, factored_offset: uleb(data, pos)? },
            0x06 => I::Restore { register: reg(pos)? },
            0x07 => I::Undefined { register: reg(pos)? },
            0x08 => I::SameValue { register: reg(pos)? },
            0x09 => I::Register { dest_register: reg(pos)?, src_register: reg(pos)? },
            0x0a => I::RememberState,
            0x0b => I::RestoreState,
            0x0c => I::DefCfa { register: reg(pos)?, offset: uleb(data, pos)? },
            0x0d => I::DefCfaRegister { register: reg(pos)? },
            0x0e => I::DefCfaOffset { offset: uleb(data, pos)? },
            0x0f => I::DefCfaExpression { expression: block(pos)? },
            0x10 => I::Expression { register: reg(pos)?, expression: block(pos)? },
            0x11 => I::OffsetExtendedSf { register: reg(pos)?, factored_offset: sleb(data, pos)? },
            0x12 => I::DefCfaSf { register: reg(pos)?, factored_offset: sleb(data, pos)? },
            0x13 => I::DefCfaOffsetSf { factored_offset: sleb(data, pos)? },
            0x14 => I::ValOffset { register: reg(pos)?, factored_offset: uleb(data, pos)? },
            0x15 => I::ValOffsetSf { register: reg(pos)?, factored_offset: sleb(data, pos)? },
            0x16 => I::ValExpression { register: reg(pos)?, expression: block(pos)? },
            0x2e => I::ArgsSize { size: uleb(data, pos)? },
            0x2f => {
                let register = reg(pos)?;
                let off = i64::try_from(uleb(data, pos)?).ok()?;
                I::OffsetExtendedSf { register, factored_offset: -off }
            }
            _ => return None,
        },
    })
}

/// What [`fast_step`] did with the instruction at `pos`.
#[derive(Debug, PartialEq, Eq)]
enum Fast {
    /// `advance_loc` to this address (at most the FDE's end).
    Advance(u64),
    /// `def_cfa_offset`, applied: only the CFA and its last offset changed.
    CfaOffset,
    /// A rule for rbp or the return address, applied.
    Applied,
    /// Applied with no effect on the CFA, rbp or the return address (`nop`, another
    /// register's rule).
    Unaffected,
    /// Malformed operands, or an advance past the FDE's end.
    Malformed,
    /// Another opcode: left to `decode` and `apply`; `pos` is unchanged.
    Other,
}

/// The opcodes of nearly every row (`advance_loc`, `advance_loc1`, `advance_loc2`,
/// `offset`, `def_cfa_offset`, `restore`, `nop`), decoded and applied in one step: the same effect as
/// [`decode`] then [`apply`] (tested against them), one unpredictable branch instead of two.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn fast_step(
    ins: &[u8],
    pos: &mut usize,
    loc: u64,
    end: u64,
    st: &mut State,
    initial: &State,
    caf: u64,
    daf: i64,
) -> Fast {
    let Some(&op) = ins.get(*pos) else { return Fast::Other };
    let advance = |pos: &mut usize, delta: u64, len: usize| match delta
        .checked_mul(caf)
        .and_then(|d| loc.checked_add(d))
    {
        Some(a) if a <= end => {
            *pos += len;
            Fast::Advance(a)
        }
        _ => Fast::Malformed,
    };
    match op >> 6 {
        1 => advance(pos, u64::from(op & 0x3f), 1),
        2 => {
            let mut p = *pos + 1;
            let off =
                uleb_inline(ins, &mut p).and_then(|f| i64::try_from(f).ok()).and_then(|f| f.checked_mul(daf));
            let Some(off) = off else { return Fast::Malformed };
            *pos = p;
            match st.reg_mut(u16::from(op & 0x3f)) {
                Some(r) => {
                    *r = Reg::AtCfa(off);
                    Fast::Applied
                }
                None => Fast::Unaffected,
            }
        }
        3 => {
            *pos += 1;
            match u16::from(op & 0x3f) {
                RBP => st.rbp = initial.rbp,
                RA => st.ra = initial.ra,
                _ => return Fast::Unaffected,
            }
            Fast::Applied
        }
        _ => match op {
            0x00 => {
                *pos += 1;
                Fast::Unaffected
            }
            0x02 => match ins.get(*pos + 1) {
                Some(&d) => advance(pos, u64::from(d), 2),
                None => Fast::Malformed,
            },
            0x03 => match ins.get(*pos + 1..*pos + 3) {
                Some(d) => advance(pos, u64::from(u16::from_le_bytes([d[0], d[1]])), 3),
                None => Fast::Malformed,
            },
            0x0e => {
                let mut p = *pos + 1;
                let Some(off) = uleb_inline(ins, &mut p).and_then(|o| i64::try_from(o).ok()) else {
                    return Fast::Malformed;
                };
                *pos = p;
                st.cfa = Cfa::RegOffset(st.last_reg, off);
                st.last_off = off;
                Fast::CfaOffset
            }
            _ => Fast::Other,
        },
    }
}

/// Why an FDE was not evaluated to its end.
enum Failure {
    /// Its CFI is malformed (counted; the rows before the fault are kept).
    Malformed,
    /// The header search table's pair does not match this record: scan the records.
    NotListed,
}

/// Runs an FDE's CFI program from its CIE's initial state, feeding rows to the builder.
fn evaluate_fde(
    fde: &Fde,
    code_base: u64,
    cie: &CieInfo,
    data: &[u8],
    sec: &SectionAt<'_>,
    stack: &mut Vec<State>,
    b: &mut Builder<'_>,
) -> Result<(), Failure> {
    let (start, range, ins_start, ins_end) = fde.body(data, cie, sec).ok_or(Failure::Malformed)?;
    if code_base.checked_add(u64::from(fde.start)) != Some(start) {
        // Only a header search table that does not match its records gets here.
        return Err(Failure::NotListed);
    }
    if range == 0 || start == 0 {
        return Ok(()); // describes no code (a scan leaves these out)
    }
    if range > u64::from(u32::MAX) {
        return Err(Failure::NotListed);
    }
    let end = start.checked_add(range).ok_or(Failure::NotListed)?;
    let mut loc = start;
    let initial = cie.initial;
    let mut st = initial;
    stack.clear();
    let ins = data.get(ins_start..ins_end).ok_or(Failure::Malformed)?;
    let signal = cie.signal;
    let emit = |from: u64, to: u64, st: &State, b: &mut Builder<'_>| {
        if to > from {
            let rule = convert_state(st, data, signal, &mut b.out);
            b.row(from, to.min(end), rule);
        }
    };
    // The rule of `st` while it is a plain one (CFA = rsp or rbp + offset, nothing counted
    // when converted), kept up to date through `def_cfa_offset`; `None`: convert `st` again.
    let mut known: Option<UnwindRule> = None;
    let mut pos = 0usize;
    while pos < ins.len() {
        match fast_step(ins, &mut pos, loc, end, &mut st, &initial, cie.code_align, cie.data_align) {
            Fast::Advance(a) => {
                if a > loc {
                    let rule = match known {
                        Some(r) => r,
                        None => {
                            let r = convert_state(&st, data, signal, &mut b.out);
                            let plain = matches!(st.cfa, Cfa::RegOffset(..))
                                && (r.cfa == CfaKind::Rsp as u8 || r.cfa == CfaKind::Rbp as u8)
                                && st.rbp != Reg::Other;
                            known = plain.then_some(r);
                            r
                        }
                    };
                    debug_assert_eq!(rule, convert_state(&st, data, signal, &mut GroupOut::default()));
                    b.row(loc, a, rule);
                }
                loc = a;
                continue;
            }
            Fast::CfaOffset => {
                known = known.and_then(|r| {
                    let (kind, off) = match st.cfa {
                        Cfa::RegOffset(RSP, off) => (CfaKind::Rsp, off),
                        Cfa::RegOffset(RBP, off) => (CfaKind::Rbp, off),
                        _ => return None,
                    };
                    let cfa_offset = i32::try_from(off).ok()?;
                    (r.cfa == kind as u8).then_some(UnwindRule { cfa_offset, ..r })
                });
                continue;
            }
            Fast::Applied => {
                known = None;
                continue;
            }
            Fast::Unaffected => continue,
            Fast::Malformed => {
                emit(loc, end, &st, b);
                return Err(Failure::Malformed);
            }
            Fast::Other => {}
        }
        known = None;
        let Some(i) = decode(ins, &mut pos, cie.code_align, loc) else {
            emit(loc, end, &st, b);
            return Err(Failure::Malformed);
        };
        // Expressions are located relative to the instruction slice; make them section offsets.
        let i = match i {
            gimli::CallFrameInstruction::DefCfaExpression { expression } => {
                gimli::CallFrameInstruction::DefCfaExpression {
                    expression: gimli::UnwindExpression {
                        offset: expression.offset + ins_start,
                        length: expression.length,
                    },
                }
            }
            other => other,
        };
        if let gimli::CallFrameInstruction::SetLoc { address } = i {
            if address < loc || address > end {
                emit(loc, end, &st, b);
                return Err(Failure::Malformed);
            }
            emit(loc, address, &st, b);
            loc = address;
            continue;
        }
        if apply(&i, &mut st, &initial, stack, cie.code_align, cie.data_align).is_err() {
            emit(loc, end, &st, b);
            return Err(Failure::Malformed);
        }
    }
    emit(loc, end, &st, b);
    Ok(())
}

fn sleb(bytes: &[u8], pos: &mut usize) -> Option<i64> {
    let mut r: i64 = 0;
    let mut shift = 0;
    loop {
        let b = *bytes.get(*pos)?;
        *pos += 1;
        if shift < 64 {
            r |= i64::from(b & 0x7f) << shift;
        }
        shift += 7;
        if b & 0x80 == 0 {
            if shift < 64 && b & 0x40 != 0 {
                r |= -1i64 << shift;
            }
            return Some(r);
        }
        if shift > 70 {
            return None;
        }
    }
}

#[inline]
fn uleb(bytes: &[u8], pos: &mut usize) -> Option<u64> {
    uleb_inline(bytes, pos)
}

/// [`uleb`], always inlined: for the hot loop.
#[inline(always)]
fn uleb_inline(bytes: &[u8], pos: &mut usize) -> Option<u64> {
    // Nearly every operand fits one byte.
    if let Some(&b) = bytes.get(*pos).filter(|&&b| b < 0x80) {
        *pos += 1;
        return Some(u64::from(b));
    }
    uleb_long(bytes, pos)
}

#[inline(never)]
fn uleb_long(bytes: &[u8], pos: &mut usize) -> Option<u64> {
    let mut r: u64 = 0;
    let mut shift = 0;
    loop {
        let b = *bytes.get(*pos)?;
        *pos += 1;
        if shift < 64 {
            r |= u64::from(b & 0x7f) << shift;
        }
        shift += 7;
        if b & 0x80 == 0 {
            return Some(r);
        }
        if shift > 70 {
            return None;
        }
    }
}

/// Recognises the CFA expressions compilers emit on x86-64.
fn cfa_expression(e: &[u8]) -> Option<UnwindRule> {
    const BREG_RBP: u8 = 0x76;
    const BREG_RSP: u8 = 0x77;
    // GCC's PLT: breg7 8; breg16 0; lit15; and; lit11|lit10; ge; lit3; shl; plus
    if let [BREG_RSP, 8, 0x80, 0, 0x3f, 0x1a, lit @ (0x3a | 0x3b), 0x2a, 0x33, 0x24, 0x22] = e {
        return Some(UnwindRule::new(CfaKind::Plt, i32::from(*lit - 0x30), RbpKind::Unchanged, 0));
    }
    // *(reg + off) [+ k]
    let kind = match *e.first()? {
        BREG_RSP => CfaKind::DerefRsp,
        BREG_RBP => CfaKind::DerefRbp,
        _ => return None,
    };
    let mut pos = 1;
    let off = i32::try_from(sleb(e, &mut pos)?).ok()?;
    if e.get(pos) != Some(&0x06) {
        return None;
    }
    pos += 1;
    let add = match e.get(pos) {
        None => 0,
        Some(0x23) => {
            pos += 1;
            let k = i8::try_from(uleb(e, &mut pos)?).ok()?;
            if pos != e.len() {
                return None;
            }
            k
        }
        Some(_) => return None,
    };
    let mut r = UnwindRule::new(kind, off, RbpKind::Unchanged, 0);
    r.aux = add;
    Some(r)
}

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
    for &(start, end, rule) in rows {
        if start < last || end < start {
            return Err(Error::Format("rows not sorted"));
        }
        last = start;
        if end > start {
            b.row(start, end, rule);
        }
    }
    let (out, _) = b.finish();
    stitch(vec![out], shared.into_inner().unwrap_or_else(|p| p.into_inner()))
}

/// Joins the groups' entries into one table: global rule dictionary, page index with
/// start rules, chunk padding.
fn stitch(mut outs: Vec<GroupOut>, mut dict: Dictionary) -> Result<UnwindTable, Error> {
    let mut stats = Stats::default();
    let (mut lo, mut hi) = (u64::MAX, 0u64);
    for o in &outs {
        if o.page_overflow {
            return Err(Error::Limit("address range"));
        }
        if let (Some(f), Some(l)) = (o.page_runs.first(), o.page_runs.last()) {
            lo = lo.min(f.page() << PAGE_SHIFT);
            hi = hi.max(l.page() << PAGE_SHIFT);
        }
        stats.dwarf_rows += o.rows;
        for (i, n) in o.unsupported.iter().enumerate() {
            if let Some(r) = Unsupported::from_u8(i as u8) {
                *stats.unsupported.entry(r.name()).or_default() += n;
            }
        }
        stats.rbp_undefined += o.rbp_undefined;
    }
    stats.unsupported.retain(|_, v| *v > 0);
    if lo > hi {
        return Ok(UnwindTable::empty(stats));
    }
    let base = lo & !(PAGE_SIZE - 1);
    let npages = ((hi - base) >> PAGE_SHIFT) + 1;
    if npages > u64::from(u32::MAX) {
        return Err(Error::Limit("address range"));
    }
    let total: usize = outs.iter().flat_map(|o| &o.entries).map(Vec::len).sum();
    let mut pages = vec![PageEntry::default(); npages as usize];
    // Chunks are allocated as they fill, and each group's entries are freed once copied:
    // the entries are never held twice.
    let mut entries = Entries::default();
    let mut remaining = total;
    // Record ids were handed out in the groups' racing order: sorted, the table is the same
    // on every run. The groups' entries are renamed in place, in parallel.
    let map = dict.canonicalize(npages as usize);
    outs.par_iter_mut().flat_map(|o| o.entries.par_iter_mut()).for_each(|block| {
        for raw in block {
            *raw = Entry::packed_with_rule(*raw, map[Entry::packed_rule(*raw) as usize]);
        }
    });
    drop(map);
    // The rule each record ends in (before any restore), by record.
    let finals: Vec<UnwindRule> =
        dict.rules.iter().zip(&dict.runs).map(|(&r, &run)| run.final_rule(r)).collect();
    let base_page = base >> PAGE_SHIFT;
    let mut state = UnwindRule::GAP;
    let mut starts = PageStarts { next: 0, last: None };
    // Address of the last entry placed: a later group whose FDEs overlap an earlier one's
    // (crafted or broken CFI) must not put entries out of order.
    let mut last_at: Option<u64> = None;
    // Page offset of the last entry placed.
    let mut last_off = 0u16;
    for mut o in outs {
        let mut skipped_overlap = false;
        let mut group = GroupEntries::new(std::mem::take(&mut o.entries));
        'runs: for run in std::mem::take(&mut o.page_runs) {
            let abs_page = run.page();
            let page = abs_page - base_page;
            let count = run.count();
            // The usual run, placed whole: a group's entries only rise (its builder sees to
            // that), so a run that starts past every entry placed has none to skip or to
            // merge, and its page needs one chunk check. Else entry by entry, below.
            let first_at =
                group.peek().map(|r| (abs_page << PAGE_SHIFT) | u64::from(Entry::decode(r).page_offset));
            if !skipped_overlap
                && count > 0
                && group.left() >= count
                && first_at.is_some_and(|a| last_at.is_none_or(|l| a > l))
            {
                starts.fill(&mut pages, page, state, &mut dict, entries.len());
                let p = &mut pages[page as usize];
                stats.padding_entries += make_room(&mut entries, p, count, remaining);
                // Copied a block's part at a time.
                let mut left = count;
                while left > 0 {
                    let Some(part) = group.take(left) else { break 'runs };
                    entries.extend(part, remaining);
                    left -= part.len();
                    remaining = remaining.saturating_sub(part.len());
                    p.count += part.len() as u16;
                    // An entry with a restore bit leaves the rule before it in effect.
                    if let Some(&raw) = part.iter().rev().find(|&&r| !Entry::decode(r).restore) {
                        state = finals[Entry::packed_rule(raw) as usize];
                    }
                    last_off = part.last().map_or(last_off, |&r| Entry::decode(r).page_offset);
                    last_at = Some((abs_page << PAGE_SHIFT) | u64::from(last_off));
                }
                continue;
            }
            for _ in 0..count {
                let Some(&raw) = group.take(1).and_then(|p| p.first()) else { break 'runs };
                remaining = remaining.saturating_sub(1);
                let off = Entry::decode(raw).page_offset;
                let at = (abs_page << PAGE_SHIFT) | u64::from(off);
                if last_at.is_some_and(|l| at < l) {
                    // The earlier group's rows win over an overlapping FDE's.
                    skipped_overlap = true;
                    continue;
                }
                // Its restore point referred to an entry that was left out.
                let raw = if std::mem::take(&mut skipped_overlap) {
                    Entry { restore: false, ..Entry::decode(raw) }.encode()
                } else {
                    raw
                };
                last_at = Some(at);
                starts.fill(&mut pages, page, state, &mut dict, entries.len());
                let p = &mut pages[page as usize];
                let e = Entry::decode(raw);
                let after = if e.restore { state } else { finals[e.rule as usize] };
                // Two entries at one offset (a group's closing gap, then the next group's
                // first row): the later one holds.
                if p.count > 0 && last_off == off {
                    if let Some(l) = entries.last_mut() {
                        *l = raw;
                    }
                    state = after;
                    continue;
                }
                stats.padding_entries += make_room(&mut entries, p, 1, remaining);
                entries.push(raw, remaining + 1);
                last_off = off;
                p.count += 1;
                state = after;
            }
        }
    }
    let Dictionary { mut rules, mut runs, slots, overflow: dict_full, .. } = dict;
    drop(slots);
    rules.shrink_to_fit();
    runs.shrink_to_fit();
    if dict_full > 0 {
        *stats.unsupported.entry(Unsupported::DictionaryFull.name()).or_default() += dict_full;
    }
    entries.shrink();
    stats.entries = entries.len() as u64 - stats.padding_entries;
    Ok(UnwindTable::from_parts(base, pages, entries, rules, runs, stats))
}

/// A group's entries, read in order in [`GROUP_BLOCK`] blocks, each block freed once read.
struct GroupEntries {
    blocks: Vec<Vec<u32>>,
    /// The block being read, and the entries read so far.
    block: Vec<u32>,
    read: usize,
    len: usize,
}

impl GroupEntries {
    fn new(blocks: Vec<Vec<u32>>) -> Self {
        let len = blocks.iter().map(Vec::len).sum();
        GroupEntries { blocks, block: Vec::new(), read: 0, len }
    }
    /// Entries not read yet.
    fn left(&self) -> usize {
        self.len - self.read
    }
    /// The next entry, not read.
    fn peek(&self) -> Option<u32> {
        if self.read.is_multiple_of(GROUP_BLOCK) {
            self.blocks.get(self.read / GROUP_BLOCK)?.first().copied()
        } else {
            self.block.get(self.read % GROUP_BLOCK).copied()
        }
    }
    /// The next entries, at most `n`, from one block; `None` past the end.
    fn take(&mut self, n: usize) -> Option<&[u32]> {
        if self.read.is_multiple_of(GROUP_BLOCK) {
            self.block = std::mem::take(self.blocks.get_mut(self.read / GROUP_BLOCK)?);
        }
        let lo = self.read % GROUP_BLOCK;
        let part =
            self.block.get(lo..lo.saturating_add(n).min(self.block.len())).filter(|p| !p.is_empty())?;
        self.read += part.len();
        Some(part)
    }
}

/// The pages given their start rule and first entry so far, and the last start rule's
/// record (most pages start in the rule of the page before).
struct PageStarts {
    next: u64,
    last: Option<(UnwindRule, u16)>,
}

impl PageStarts {
    /// Gives the pages up to `page` their start rule, `state`, and their first entry, `len`
    /// (the entries placed so far).
    #[inline]
    fn fill(
        &mut self,
        pages: &mut [PageEntry],
        page: u64,
        state: UnwindRule,
        dict: &mut Dictionary,
        len: usize,
    ) {
        while self.next <= page {
            let p = &mut pages[self.next as usize];
            p.start_rule = match self.last {
                // Id 1 (the dictionary is full) is counted at every page, as before.
                Some((r, id)) if r == state && id != 1 => id,
                _ => {
                    let id = dict.id(state, Run::NONE);
                    self.last = Some((state, id));
                    id
                }
            };
            p.first = len as u32;
            self.next += 1;
        }
    }
}

/// A page's entries never straddle a chunk: when `more` entries would not fit the chunk of
/// page `p`'s first entry, its entries move to the next chunk. Returns the padding added.
#[inline]
fn make_room(entries: &mut Entries, p: &mut PageEntry, more: usize, remaining: usize) -> u64 {
    if (p.first % CHUNK_ENTRIES) as usize + usize::from(p.count) + more <= CHUNK_ENTRIES as usize {
        return 0;
    }
    let moved = entries.split_off(p.first as usize);
    let pad = entries.pad_chunk() as u64;
    p.first = entries.len() as u32;
    let hint = moved.len() + remaining + 1;
    for m in moved {
        entries.push(m, hint);
    }
    pad
}

/// The table's dictionary while it is assembled: records as the table stores them, and an
/// open-addressing index of 2-byte slots into them (a few KiB, where a hash map of the
/// 12-byte keys would take as much as the records themselves).
#[derive(Default)]
struct Dictionary {
    rules: Vec<UnwindRule>,
    runs: Vec<Run>,
    /// Record index + 1 per slot, 0 = empty; the length is a power of two.
    slots: Vec<u16>,
    overflow: u64,
    limit: usize,
}

impl Dictionary {
    /// A dictionary of at most `limit` records that starts with the gap rule (index 0) and
    /// the `DictionaryFull` rule (index 1).
    fn new(limit: usize) -> Self {
        let mut d = Dictionary { limit, ..Dictionary::default() };
        d.id(UnwindRule::GAP, Run::NONE);
        d.id(UnwindRule::unsupported(Unsupported::DictionaryFull), Run::NONE);
        d
    }

    /// Sorts the records (the gap and `DictionaryFull` rules stay first) and returns the
    /// old index → new index map.
    /// `room`: records expected to be added later (reserved now: growing by doubling would
    /// hold both buffers and leave up to half of the new one empty).
    fn canonicalize(&mut self, room: usize) -> Vec<u16> {
        let n = self.rules.len();
        let mut order: Vec<u16> = (0..n as u16).collect();
        order[2.min(n)..].sort_unstable_by_key(|&i| (self.rules[i as usize], self.runs[i as usize]));
        let cap = (n + room).min(self.limit.max(2));
        let mut rules = Vec::with_capacity(cap);
        rules.extend(order.iter().map(|&i| self.rules[i as usize]));
        self.rules = rules;
        let mut runs = Vec::with_capacity(cap);
        runs.extend(order.iter().map(|&i| self.runs[i as usize]));
        self.runs = runs;
        let mut map = vec![0u16; n];
        for (new, &old) in order.iter().enumerate() {
            map[old as usize] = new as u16;
        }
        drop(order);
        self.rebuild_slots(self.slots.len());
        map
    }

    fn rebuild_slots(&mut self, len: usize) {
        let mask = len.max(64) - 1;
        let mut slots = vec![0u16; mask + 1];
        for (r, (&rule, &run)) in self.rules.iter().zip(&self.runs).enumerate() {
            let mut i = Self::slot_of(rule, run, mask);
            while slots[i] != 0 {
                i = (i + 1) & mask;
            }
            slots[i] = r as u16 + 1;
        }
        self.slots = slots;
    }

    fn slot_of(rule: UnwindRule, run: Run, mask: usize) -> usize {
        let bits = bits(&rule);
        let h =
            (bits.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ u64::from(run.0)).wrapping_mul(0xff51_afd7_ed55_8ccd);
        (h >> 40) as usize & mask
    }

    /// The record's index; past [`MAX_RULES`] records, the index of the `DictionaryFull`
    /// rule (always index 1), counted.
    fn id(&mut self, rule: UnwindRule, run: Run) -> u16 {
        if self.slots.is_empty() {
            self.slots = vec![0; 64];
        }
        let mask = self.slots.len() - 1;
        let mut i = Self::slot_of(rule, run, mask);
        loop {
            match self.slots[i] {
                0 => break,
                s => {
                    let r = usize::from(s - 1);
                    if self.rules[r] == rule && self.runs[r] == run {
                        return r as u16;
                    }
                }
            }
            i = (i + 1) & mask;
        }
        if self.rules.len() >= self.limit.max(2) {
            self.overflow += 1;
            return 1;
        }
        let id = self.rules.len() as u16;
        self.rules.push(rule);
        self.runs.push(run);
        self.slots[i] = id + 1;
        // At most half full: rebuild at twice the size.
        if self.rules.len() * 2 > self.slots.len() {
            self.rebuild_slots(self.slots.len() * 2);
        }
        id
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn state(kind: u8, off: i64) -> State {
        let reg = |k: u8| match k % 4 {
            0 => Reg::Same,
            1 => Reg::Undefined,
            2 => Reg::AtCfa(-16),
            _ => Reg::Other,
        };
        State {
            cfa: if kind & 1 == 0 { Cfa::RegOffset(RSP, off) } else { Cfa::Expression(3, 5) },
            last_reg: if kind & 2 == 0 { RSP } else { RBP },
            last_off: off,
            rbp: reg(kind >> 2),
            ra: reg(kind >> 4),
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(5_000))]
        /// The windowed padding check answers as a byte-by-byte one: every byte of the gap a
        /// padding byte, with gaps near the start and end of a range and out of it.
        #[test]
        fn padding_check_is_bytewise(
            bytes in proptest::collection::vec(
                prop_oneof![Just(0x90u8), Just(0xcc), Just(0x0f), Just(0x1f), Just(0x00), any::<u8>()],
                0..80,
            ),
            base in 0u64..64,
            start in 0u64..150,
            len in 0u64..70,
        ) {
            let code = Code { ranges: vec![(base, &bytes[..])] };
            let end = start + len;
            let expected = if end <= start {
                true
            } else if len > MAX_PADDING {
                false
            } else if start >= base && end - base <= bytes.len() as u64 {
                bytes[(start - base) as usize..(end - base) as usize].iter().all(|&b| {
                    [0x90u8, 0xcc, 0x66, 0x2e, 0x0f, 0x1f, 0x00, 0x40, 0x44, 0x80, 0x84].contains(&b)
                })
            } else {
                len < 16
            };
            prop_assert_eq!(code.is_padding(start, end), expected);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(20_000))]
        /// `fast_step` does what `decode` followed by `apply` does, on any bytes: the same
        /// state, position, new location, and the same verdict on malformed input.
        #[test]
        fn fast_step_is_decode_then_apply(
            ins in proptest::collection::vec(any::<u8>(), 1..12),
            loc in any::<u64>(),
            span in prop_oneof![Just(0u64), 0..4096u64, any::<u64>()],
            caf in prop_oneof![Just(1u64), Just(4), any::<u64>()],
            daf in prop_oneof![Just(-8i64), Just(1), any::<i64>()],
            kind in any::<u8>(),
            off in prop_oneof![Just(8i64), any::<i64>()],
        ) {
            let end = loc.saturating_add(span);
            let initial = state(kind.rotate_left(3), 8);
            let before = state(kind, off);
            let (mut fast, mut fast_pos) = (before, 0usize);
            let got = fast_step(&ins, &mut fast_pos, loc, end, &mut fast, &initial, caf, daf);
            if got == Fast::Other {
                prop_assert_eq!((fast_pos, fast), (0, before));
                return Ok(());
            }
            // What the verdict promises was left alone.
            match got {
                Fast::Unaffected => prop_assert_eq!((fast.cfa, fast.rbp, fast.ra), (before.cfa, before.rbp, before.ra)),
                Fast::CfaOffset => {
                    prop_assert_eq!((fast.rbp, fast.ra, fast.last_reg), (before.rbp, before.ra, before.last_reg));
                    prop_assert_eq!(fast.cfa, Cfa::RegOffset(fast.last_reg, fast.last_off));
                }
                _ => {}
            }
            let got = match got {
                Fast::CfaOffset | Fast::Unaffected => Fast::Applied,
                other => other,
            };
            let (mut slow, mut slow_pos) = (before, 0usize);
            let want = match decode(&ins, &mut slow_pos, caf, loc) {
                None => Fast::Malformed,
                Some(gimli::CallFrameInstruction::SetLoc { address }) => {
                    if address < loc || address > end { Fast::Malformed } else { Fast::Advance(address) }
                }
                Some(i) => {
                    let mut stack = Vec::new();
                    match apply(&i, &mut slow, &initial, &mut stack, caf, daf) {
                        Ok(()) => Fast::Applied,
                        Err(()) => Fast::Malformed,
                    }
                }
            };
            prop_assert_eq!(&got, &want);
            if got != Fast::Malformed {
                prop_assert_eq!((fast_pos, fast), (slow_pos, slow));
            }
        }
    }

    /// A `.eh_frame` of CIEs and FDEs (pcrel sdata4 addresses) at address `addr`, from a
    /// plan of records: `None` a CIE, `Some((start, range, padding))` an FDE of the last
    /// CIE; then `tail` appended as is. Returns the bytes and each record's offset.
    fn eh_frame(addr: u64, plan: &[Option<(u32, u32, u8)>], tail: &[u8]) -> (Vec<u8>, Vec<usize>) {
        let (mut d, mut offs, mut cie) = (Vec::new(), Vec::new(), None);
        for rec in plan {
            let at = d.len();
            offs.push(at);
            let mut body = Vec::new();
            match *rec {
                None => {
                    cie = Some(at);
                    // id 0, version 1, "zR", code 1, data -8, ra 16, aug 1: pcrel|sdata4;
                    // def_cfa rsp+8, offset ra at cfa-8.
                    body.extend([0, 0, 0, 0, 1, b'z', b'R', 0, 1, 0x78, 16, 1, 0x1b, 0x0c, 7, 8, 0x90, 1]);
                }
                Some((start, range, pad)) => {
                    let Some(c) = cie else { continue };
                    body.extend(((at + 4 - c) as u32).to_le_bytes());
                    let field = addr + at as u64 + 8;
                    body.extend((u64::from(start).wrapping_sub(field) as u32).to_le_bytes());
                    body.extend(range.to_le_bytes());
                    // aug 0; advance 1; def_cfa_offset 16; padding nops.
                    body.extend([0, 0x41, 0x0e, 16]);
                    body.extend(std::iter::repeat_n(0, usize::from(pad)));
                }
            }
            d.extend((body.len() as u32).to_le_bytes());
            d.extend(body);
        }
        d.extend_from_slice(tail);
        (d, offs)
    }

    fn records_of(data: &[u8], addr: u64, hints: Vec<u32>) -> Records {
        let section = EhFrame::new(data, LittleEndian);
        let bases = BaseAddresses::default().set_eh_frame(addr);
        let s = Section { section: &section, bases: &bases, data, addr, eh_frame: true, code_base: 0x1000 };
        if hints.is_empty() {
            let (mut r, mut fdes) = (Records::default(), Vec::new());
            s.walk(0, data.len(), &mut r, &mut fdes);
            r.parts.push(fdes);
            r
        } else {
            s.records(hints, 0)
        }
    }

    /// What a walk found, comparable: FDEs, FDE records, skipped, fault, CIEs.
    type Summary = (Vec<(u32, u32)>, usize, u64, Option<(usize, Fault)>, usize);

    fn summary(r: &Records) -> Summary {
        let fdes = r.parts.iter().map(|f| (f.start, f.rec)).collect();
        (fdes, r.fde_records, r.skipped, r.fault, r.cies.len())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2_000))]
        /// The walk in parallel parts, from any hints (record starts, offsets inside
        /// records, past the end), finds what one serial walk finds: the same FDEs, counts,
        /// CIEs and fault, also over a section ending in a terminator, a 64-bit length or a
        /// record running past its end.
        #[test]
        fn parallel_walk_is_the_serial_walk(
            plan in proptest::collection::vec(
                prop_oneof![1 => Just(None), 12 => (0x1000u32..0x9000, 0u32..64, 0u8..9).prop_map(Some)],
                1..80,
            ),
            tail in prop_oneof![
                Just(vec![]),
                Just(vec![0, 0, 0, 0, 9, 9, 9, 9]),
                Just(vec![0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0]),
                Just(vec![0x40, 0, 0, 0, 1, 0, 0, 0]),
            ],
            picks in proptest::collection::vec((any::<bool>(), any::<prop::sample::Index>(), 0u32..40), 1..20),
        ) {
            let addr = 0x2_0000;
            let mut plan = plan;
            plan.insert(0, None);
            let (data, offs) = eh_frame(addr, &plan, &tail);
            let serial = records_of(&data, addr, Vec::new());
            // Record starts, or offsets a little past them (inside a record, or past the end).
            let hints = picks
                .iter()
                .map(|&(exact, i, d)| (i.get(&offs) + if exact { 0 } else { d as usize }) as u32)
                .collect();
            let parallel = records_of(&data, addr, hints);
            prop_assert_eq!(summary(&parallel), summary(&serial));
        }
    }

    proptest! {
        /// An FDE list kept in parts reads like the parts joined.
        #[test]
        fn parts_read_like_one_list(
            sizes in proptest::collection::vec(0usize..20, 0..12),
            from in 0usize..250,
            len in 0usize..60,
        ) {
            let mut parts = Parts::default();
            let mut whole = Vec::new();
            for (k, &n) in sizes.iter().enumerate() {
                let part: Vec<Fde> = (0..n).map(|i| Fde { start: (k * 100 + i) as u32, rec: i as u32 }).collect();
                whole.extend_from_slice(&part);
                parts.push(part);
            }
            prop_assert_eq!(parts.len(), whole.len());
            let list = FdeList::Owned(parts);
            let mut range = vec![None];
            // Each FDE alone, and none past the end.
            for i in 0..whole.len() + 3 {
                list.range(i, i + 1, &mut range);
                prop_assert_eq!(
                    range.first().copied().flatten().map(|f| (f.start, f.rec)),
                    whole.get(i).map(|f| (f.start, f.rec))
                );
            }
            // A range, as a group reads it: the FDEs of the whole list from `from`, up to
            // `from + len` or the list's end.
            list.range(from, from + len, &mut range);
            let expected: Vec<_> =
                whole.iter().skip(from).take(len).map(|f| (f.start, f.rec)).collect();
            let got: Vec<_> = range.iter().map(|f| f.map(|f| (f.start, f.rec))).collect();
            prop_assert_eq!(got, expected.into_iter().map(Some).collect::<Vec<_>>());
        }
    }
}
