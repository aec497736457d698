//! The FDE list: every FDE of a CFI section in address order, from `.eh_frame_hdr`'s search
//! table read in place or from a walk over the section's records.

use rustc_hash::FxHashMap as HashMap;

use gimli::{BaseAddresses, UnwindSection};
use rayon::prelude::*;

use super::cie::{cie_info, CieInfo};
use super::encoding::{read_encoded, read_range, read_u32, skip_encoded, uleb, SectionAt};
use super::{prefetch, MAX_FDES, R};
use crate::{DwarfError, Error};

/// A 32-bit initial length that announces a 64-bit DWARF record.
const DWARF64_LENGTH: u32 = 0xffff_ffff;
/// The CIE id of `.debug_frame` CIEs (`.eh_frame`'s is 0).
const DEBUG_FRAME_CIE_ID: u32 = 0xffff_ffff;

/// An FDE, 8 bytes: its range end, CIE and instructions are found again from its record
/// when it is evaluated (the list of every FDE is the largest buffer besides the output).
#[derive(Clone, Copy, Debug)]
pub(super) struct Fde {
    /// Start address minus the lowest executable section's address.
    pub(super) start: u32,
    /// Section offset of the FDE's record.
    pub(super) rec: u32,
}

impl Fde {
    /// The section offset of the FDE's CIE.
    #[inline]
    pub(super) fn cie(&self, data: &[u8], eh_frame: bool) -> Option<u32> {
        let body = self.rec as usize + 4;
        let id = u32::from_le_bytes(data.get(body..body + 4)?.try_into().ok()?);
        Some(if eh_frame { (body as u32).wrapping_sub(id) } else { id })
    }

    /// The FDE's start address as its record says, its range length and its instructions'
    /// section offsets `[start, end)`.
    #[inline]
    pub(super) fn body(
        &self,
        data: &[u8],
        cie: &CieInfo,
        sec: &SectionAt<'_>,
    ) -> Option<(u64, u64, usize, usize)> {
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
pub(super) fn fde_fields(
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
pub(super) struct Parts {
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

    pub(super) fn len(&self) -> usize {
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
pub(super) enum FdeList<'a> {
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
    pub(super) fn len(&self) -> usize {
        match self {
            FdeList::Owned(p) => p.len(),
            FdeList::Hdr { table, .. } => table.len() / 8,
        }
    }

    /// FDEs `from..to` (each `None` where the list has no usable FDE) into `out`, cleared.
    pub(super) fn range(&self, from: usize, to: usize, out: &mut Vec<Option<Fde>>) {
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
pub(super) struct Records {
    /// Every FDE with a non-empty range in the file's code, in section order.
    parts: Parts,
    /// FDE records of any kind (a header search table that lists as many can be used).
    fde_records: usize,
    /// FDE records left out as malformed or as outside the file's code.
    skipped: u64,
    /// Every CIE an FDE names, parsed once; `None` when unusable.
    pub(super) cies: HashMap<u32, Option<CieInfo>>,
    /// Why the walk stopped before the section's end, and where.
    fault: Option<(usize, Fault)>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Fault {
    /// A 64-bit length (unsupported).
    Dwarf64,
    /// A record longer than the rest of the section (counted as an FDE record when it is
    /// one).
    PastEnd,
}

/// How a walk over part of a section ended.
pub(super) enum Walk {
    /// At the first record at or after the part's end.
    At(usize),
    /// At the section's end or its terminator.
    End,
    /// At a record it cannot step over (recorded in [`Records::fault`]).
    Fault,
}

/// A CFI section whose records are walked.
pub(super) struct Section<'w, S> {
    pub(super) section: &'w S,
    pub(super) bases: &'w BaseAddresses,
    pub(super) data: &'w [u8],
    pub(super) addr: u64,
    pub(super) eh_frame: bool,
    /// The lowest code address (FDE starts are kept relative to it).
    pub(super) code_base: u64,
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
            if len == DWARF64_LENGTH {
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
    pub(super) fn count_fdes(&self) -> usize {
        let mut n = 0;
        let mut pos = 0usize;
        while let (Some(len), Some(id)) = (read_u32(self.data, pos), read_u32(self.data, pos + 4)) {
            if len == 0 && self.eh_frame || len == DWARF64_LENGTH {
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
            DEBUG_FRAME_CIE_ID
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
    pub(super) fn records(&self, mut hints: Vec<u32>, expected: usize) -> Records {
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

/// How far ahead of a walk over the records their bytes are prefetched.
pub(super) const WALK_AHEAD: usize = 512;

/// Parts a walk over a section's records is split into, at most.
pub(super) const RECORD_PARTS: usize = 16;

/// Pair `i` of an `.eh_frame_hdr` search table (datarel sdata4).
pub(super) fn hdr_pair(table: &[u8], i: usize, hdr_addr: u64) -> Option<(u64, u64)> {
    let b = table.get(i * 8..i * 8 + 8)?;
    let loc = i32::from_le_bytes(b[..4].try_into().ok()?);
    let fde = i32::from_le_bytes(b[4..].try_into().ok()?);
    Some((hdr_addr.wrapping_add(loc as i64 as u64), hdr_addr.wrapping_add(fde as i64 as u64)))
}

/// The `.eh_frame_hdr` search table (pairs of datarel sdata4 values), when the header is
/// version 1 and has one.
pub(super) fn hdr_table(hdr: &[u8]) -> Option<&[u8]> {
    let &[version, ptr_enc, count_enc, table_enc] = hdr.first_chunk::<4>()?;
    if version != 1
        || count_enc != gimli::DW_EH_PE_udata4.0
        || table_enc != gimli::DW_EH_PE_datarel.0 | gimli::DW_EH_PE_sdata4.0
    {
        return None;
    }
    let mut p = 4;
    skip_encoded(hdr, &mut p, ptr_enc)?;
    let n = u32::from_le_bytes(hdr.get(p..p + 4)?.try_into().ok()?) as usize;
    hdr.get(p + 4..p + 4 + n.checked_mul(8)?)
}

/// Up to `RECORD_PARTS - 1` FDE record offsets named by the search table, spread over it:
/// where a parallel walk of the records may start its parts.
pub(super) fn hdr_hints(table: &[u8], hdr_addr: u64, eh_addr: u64) -> Vec<u32> {
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
pub(super) fn fdes_by_hdr<'a>(
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

/// Every FDE of `records` with a non-empty range, sorted by start address, and how many
/// were left out as malformed; an error when the walk over the records stopped at one it
/// could not step over.
pub(super) fn fdes_by_scan(records: Records) -> Result<(Parts, u64), Error> {
    match records.fault {
        Some((pos, Fault::Dwarf64)) => return Err(DwarfError::Dwarf64 { offset: pos }.into()),
        Some((pos, Fault::PastEnd)) => return Err(DwarfError::PastEnd { offset: pos }.into()),
        None => {}
    }
    let out = records.parts;
    if out.len() > MAX_FDES {
        return Err(Error::TooManyFdes { count: out.len() });
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compile::encoding::PCREL_SDATA4;
    use gimli::{EhFrame, LittleEndian};
    use proptest::prelude::*;

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
                    let (def_cfa, offset_ra) = (gimli::DW_CFA_def_cfa.0, gimli::DW_CFA_offset.0 | 16);
                    body.extend([
                        0,
                        0,
                        0,
                        0,
                        1,
                        b'z',
                        b'R',
                        0,
                        1,
                        0x78,
                        16,
                        1,
                        PCREL_SDATA4,
                        def_cfa,
                        7,
                        8,
                        offset_ra,
                        1,
                    ]);
                }
                Some((start, range, pad)) => {
                    let Some(c) = cie else { continue };
                    body.extend(((at + 4 - c) as u32).to_le_bytes());
                    let field = addr + at as u64 + 8;
                    body.extend((u64::from(start).wrapping_sub(field) as u32).to_le_bytes());
                    body.extend(range.to_le_bytes());
                    // aug 0; advance 1; def_cfa_offset 16; padding nops.
                    body.extend([0, gimli::DW_CFA_advance_loc.0 | 1, gimli::DW_CFA_def_cfa_offset.0, 16]);
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
