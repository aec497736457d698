//! The groups' entries joined into one table: the shared dictionary sorted, the page index
//! with its start rules, and chunk padding so no page straddles a chunk.

use rayon::prelude::*;

use super::builder::{GroupOut, GROUP_BLOCK};
use super::dictionary::Dictionary;
use crate::layout::*;
use crate::{Entries, Error, Stats, UnwindTable};

/// Joins the groups' entries into one table: global rule dictionary, page index with
/// start rules, chunk padding.
pub(super) fn stitch(mut outs: Vec<GroupOut>, mut dict: Dictionary) -> Result<UnwindTable, Error> {
    let mut stats = Stats::default();
    let (mut lo, mut hi) = (u64::MAX, 0u64);
    for o in &outs {
        if o.page_overflow {
            return Err(Error::AddressRange);
        }
        if let (Some(f), Some(l)) = (o.page_runs.first(), o.page_runs.last()) {
            lo = lo.min(f.page() << PAGE_SHIFT);
            hi = hi.max(l.page() << PAGE_SHIFT);
        }
        stats.dwarf_rows += o.rows;
        for (i, n) in o.unsupported.iter().enumerate() {
            if let Some(r) = Unsupported::from_u8(i as u8) {
                *stats.unsupported.entry(r).or_default() += n;
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
        return Err(Error::AddressRange);
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
        *stats.unsupported.entry(Unsupported::DictionaryFull).or_default() += dict_full;
    }
    entries.shrink();
    stats.entries = entries.len() as u64 - stats.padding_entries;
    Ok(UnwindTable::from_parts(base, pages, entries, rules, runs, stats))
}

/// A group's entries, read in order in [`GROUP_BLOCK`] blocks, each block freed once read.
pub(super) struct GroupEntries {
    blocks: Vec<Vec<u32>>,
    /// The block being read, and the entries read so far.
    block: Vec<u32>,
    read: usize,
    len: usize,
}

impl GroupEntries {
    pub(super) fn new(blocks: Vec<Vec<u32>>) -> Self {
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
pub(super) struct PageStarts {
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
pub(super) fn make_room(entries: &mut Entries, p: &mut PageEntry, more: usize, remaining: usize) -> u64 {
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
