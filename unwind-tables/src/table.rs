use std::collections::BTreeMap;
use std::path::Path;

use crate::layout::*;
use crate::{Error, FormatError};

/// Counts that describe a compiled table.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// DWARF rows read (one per address range of every FDE's evaluated table).
    pub dwarf_rows: u64,
    /// Entries, padding excluded.
    pub entries: u64,
    /// Zero entries that keep every page inside one chunk.
    pub padding_entries: u64,
    /// Rows whose rule could not be expressed, by reason (reasons without rows left out).
    pub unsupported: BTreeMap<Unsupported, u64>,
    /// Rows whose rbp rule was unexpressible (rbp then reads as undefined).
    pub rbp_undefined: u64,
}

/// A table's entries in chunks of [`CHUNK_ENTRIES`] (the last may be shorter): the unit the
/// in-kernel walker stores (one map value each), and what lets a table be assembled without
/// holding a second copy of its entries.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Entries {
    chunks: Vec<Vec<u32>>,
    len: usize,
}

const CHUNK: usize = CHUNK_ENTRIES as usize;

impl Entries {
    /// Number of entries, padding included.
    pub fn len(&self) -> usize {
        self.len
    }
    /// True when there are none.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// The chunks: every one but the last holds exactly [`CHUNK_ENTRIES`] entries.
    pub fn chunks(&self) -> &[Vec<u32>] {
        &self.chunks
    }
    /// Entry `i` (global index, as `PageEntry::first` counts).
    pub fn get(&self, i: usize) -> Option<u32> {
        self.chunks.get(i / CHUNK)?.get(i % CHUNK).copied()
    }
    /// The `count` entries of a page starting at global index `first`.
    pub fn page(&self, first: u32, count: u16) -> Option<&[u32]> {
        page_entries(&self.chunks, first, count)
    }
    /// Every entry in order, padding included.
    pub fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        self.chunks.iter().flatten().copied()
    }

    /// Appends an entry; a new chunk gets room for `hint` entries (at most a chunk).
    #[inline]
    pub(crate) fn push(&mut self, v: u32, hint: usize) {
        if self.chunks.last().is_none_or(|c| c.len() == CHUNK) {
            self.chunks.push(Vec::with_capacity(hint.clamp(1, CHUNK)));
        }
        self.chunks.last_mut().unwrap().push(v);
        self.len += 1;
    }
    /// Appends entries in order, as [`push`](Self::push) one by one would.
    pub(crate) fn extend(&mut self, mut vals: &[u32], hint: usize) {
        while !vals.is_empty() {
            if self.chunks.last().is_none_or(|c| c.len() == CHUNK) {
                self.chunks.push(Vec::with_capacity(hint.clamp(1, CHUNK)));
            }
            let last = self.chunks.last_mut().unwrap();
            let n = vals.len().min(CHUNK - last.len());
            last.extend_from_slice(&vals[..n]);
            self.len += n;
            vals = &vals[n..];
        }
    }
    pub(crate) fn last_mut(&mut self) -> Option<&mut u32> {
        self.chunks.last_mut().and_then(|c| c.last_mut())
    }
    /// Removes the entries from global index `first` (inside the last chunk) to the end.
    pub(crate) fn split_off(&mut self, first: usize) -> Vec<u32> {
        let Some(last) = self.chunks.last_mut() else { return Vec::new() };
        let start = self.len - last.len();
        let moved = last.split_off(first.saturating_sub(start).min(last.len()));
        self.len -= moved.len();
        moved
    }
    /// Fills the last chunk with zero entries; returns how many.
    pub(crate) fn pad_chunk(&mut self) -> usize {
        let Some(last) = self.chunks.last_mut() else { return 0 };
        let pad = CHUNK - last.len();
        last.resize(CHUNK, 0);
        self.len += pad;
        pad
    }
    /// Drops the spare room of the last chunk.
    pub(crate) fn shrink(&mut self) {
        if let Some(last) = self.chunks.last_mut() {
            last.shrink_to_fit();
        }
    }
}

/// A compiled unwind table for one ELF file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnwindTable {
    base: u64,
    pages: Vec<PageEntry>,
    entries: Entries,
    rules: Vec<UnwindRule>,
    runs: Vec<Run>,
    stats: Stats,
}

impl UnwindTable {
    /// Compiles the CFI of the ELF file at `path`.
    pub fn compile_file(path: &Path) -> Result<Self, Error> {
        crate::compile_file(path)
    }

    pub(crate) fn empty(stats: Stats) -> Self {
        UnwindTable {
            base: 0,
            pages: Vec::new(),
            entries: Entries::default(),
            rules: vec![UnwindRule::GAP],
            runs: vec![Run::NONE],
            stats,
        }
    }

    pub(crate) fn from_parts(
        base: u64,
        pages: Vec<PageEntry>,
        entries: Entries,
        rules: Vec<UnwindRule>,
        runs: Vec<Run>,
        stats: Stats,
    ) -> Self {
        UnwindTable { base, pages, entries, rules, runs, stats }
    }

    /// Statistics of the compilation.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// A view for lookups.
    pub fn view(&self) -> TableView<'_, Vec<u32>> {
        TableView {
            base: self.base,
            pages: &self.pages,
            chunks: &self.entries.chunks,
            rules: &self.rules,
            runs: &self.runs,
        }
    }

    /// The rule at file virtual address `pc`; `None` outside the covered range.
    pub fn lookup(&self, pc: u64) -> Option<UnwindRule> {
        self.view().lookup(pc)
    }

    /// File virtual address of the first page.
    pub fn base(&self) -> u64 {
        self.base
    }
    /// The page index.
    pub fn pages(&self) -> &[PageEntry] {
        &self.pages
    }
    /// The packed entries, padding included.
    pub fn entries(&self) -> &Entries {
        &self.entries
    }
    /// The rules of the dictionary records.
    pub fn rules(&self) -> &[UnwindRule] {
        &self.rules
    }
    /// The runs of the dictionary records (record i = `rules()[i]` + `runs()[i]`).
    pub fn runs(&self) -> &[Run] {
        &self.runs
    }
    /// The dictionary records as the in-kernel walker stores them.
    pub fn dictionary(&self) -> impl ExactSizeIterator<Item = DictEntry> + '_ {
        self.rules.iter().zip(&self.runs).map(|(&rule, &run)| DictEntry { rule, run })
    }

    /// Bytes of the serialized table, everything included.
    pub fn byte_size(&self) -> usize {
        HEADER_SIZE + self.pages.len() * 8 + self.entries.len() * 4 + self.rules.len() * 12
    }

    /// Every entry as (start, end, rule) with file virtual addresses, runs expanded into
    /// their rows, in address order. `end` is the next entry's start (or the page end).
    pub fn rows(&self) -> Vec<(u64, u64, UnwindRule)> {
        let mut out: Vec<(u64, u64, UnwindRule)> = Vec::new();
        let push = |out: &mut Vec<(u64, u64, UnwindRule)>, at: u64, rule: UnwindRule| {
            if let Some(last) = out.last_mut() {
                last.1 = at;
            }
            out.push((at, at, rule));
        };
        for (pi, p) in self.pages.iter().enumerate() {
            // Wrapping: a table read from bytes may place its pages anywhere.
            let page_base = self.base.wrapping_add((pi as u64) << PAGE_SHIFT);
            let Some(page) = self.entries.page(p.first, p.count) else { continue };
            for (i, &raw) in page.iter().enumerate() {
                let e = Entry::decode(raw);
                let (rule, run) = (self.rules[e.rule as usize], self.runs[e.rule as usize]);
                let mut at = page_base.wrapping_add(u64::from(e.page_offset));
                for step in 0..=run.steps() {
                    push(&mut out, at, run.apply(rule, step));
                    if step < run.steps() {
                        at = at.wrapping_add(u64::from(run.step_bytes(step)));
                    }
                }
                if e.restore {
                    let before = if i == 0 {
                        self.rules[p.start_rule as usize]
                    } else {
                        let prev = Entry::decode(page[i - 1]);
                        self.runs[prev.rule as usize].final_rule(self.rules[prev.rule as usize])
                    };
                    push(&mut out, at.wrapping_add(1), before);
                }
            }
        }
        if let Some(last) = out.last_mut() {
            last.1 = last.0;
        }
        out
    }

    /// Serializes: header, pages, entries, rules, runs (the layout in [`crate::layout`]).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.byte_size());
        let h = TableHeader {
            magic: MAGIC,
            version: FORMAT_VERSION,
            flags: 0,
            base: self.base,
            pages: self.pages.len() as u32,
            entries: self.entries.len() as u32,
            rules: self.rules.len() as u32,
            reserved: 0,
        };
        out.extend_from_slice(&h.magic);
        out.extend_from_slice(&h.version.to_le_bytes());
        out.extend_from_slice(&h.flags.to_le_bytes());
        out.extend_from_slice(&h.base.to_le_bytes());
        out.extend_from_slice(&h.pages.to_le_bytes());
        out.extend_from_slice(&h.entries.to_le_bytes());
        out.extend_from_slice(&h.rules.to_le_bytes());
        out.extend_from_slice(&h.reserved.to_le_bytes());
        for p in &self.pages {
            out.extend_from_slice(&p.to_le_bytes());
        }
        for e in self.entries.iter() {
            out.extend_from_slice(&e.to_le_bytes());
        }
        for r in &self.rules {
            out.extend_from_slice(&r.to_bits().to_le_bytes());
        }
        for r in &self.runs {
            out.extend_from_slice(&r.0.to_le_bytes());
        }
        out
    }

    /// Reads a serialized table, checking every count and index against the bytes.
    /// Statistics other than the entry count are not stored and read back as zero.
    pub fn from_bytes(b: &[u8]) -> Result<Self, Error> {
        use FormatError as F;
        let u16_at = |o: usize| b.get(o..o + 2).map(|s| u16::from_le_bytes([s[0], s[1]]));
        let u32_at = |o: usize| b.get(o..o + 4).map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]));
        let u64_at = |o: usize| Some(u64::from_le_bytes(*b.get(o..o + 8)?.first_chunk()?));
        if b.get(0..4) != Some(&MAGIC[..]) {
            return Err(F::Magic.into());
        }
        if u16_at(4) != Some(FORMAT_VERSION) {
            return Err(F::Version.into());
        }
        let base = u64_at(8).ok_or(F::Short)?;
        let (np, ne, nr) = (
            u32_at(16).ok_or(F::Short)? as usize,
            u32_at(20).ok_or(F::Short)? as usize,
            u32_at(24).ok_or(F::Short)? as usize,
        );
        let need = HEADER_SIZE as u64 + np as u64 * 8 + ne as u64 * 4 + nr as u64 * 12;
        if need != b.len() as u64 {
            return Err(F::Length.into());
        }
        if nr == 0 || nr > MAX_RULES {
            return Err(F::RuleCount.into());
        }
        // Every read below is inside the length just checked.
        let mut o = HEADER_SIZE;
        let mut pages = Vec::with_capacity(np);
        for _ in 0..np {
            let p = PageEntry::from_le_bytes(u64_at(o).ok_or(F::Short)?.to_le_bytes());
            if p.first as usize + p.count as usize > ne
                || p.start_rule as usize >= nr
                || (p.count > 0 && (p.first % CHUNK_ENTRIES) + u32::from(p.count) > CHUNK_ENTRIES)
            {
                return Err(F::PageIndex.into());
            }
            pages.push(p);
            o += 8;
        }
        let mut entries = Entries::default();
        for i in 0..ne {
            entries.push(u32_at(o).ok_or(F::Short)?, ne - i);
            o += 4;
        }
        let mut rules = Vec::with_capacity(nr);
        for _ in 0..nr {
            let r = UnwindRule::from_bits(u64_at(o).ok_or(F::Short)?);
            if r.cfa_kind().is_none() || r.rbp_kind().is_none() {
                return Err(F::RuleKind.into());
            }
            rules.push(r);
            o += 8;
        }
        let mut runs = Vec::with_capacity(nr);
        for _ in 0..nr {
            let r = Run(u32_at(o).ok_or(F::Short)?);
            if !r.is_valid() {
                return Err(F::Run.into());
            }
            runs.push(r);
            o += 4;
        }
        for p in &pages {
            if runs[p.start_rule as usize] != Run::NONE {
                return Err(F::StartRuleRun.into());
            }
            for &e in entries.page(p.first, p.count).ok_or(F::PageIndex)? {
                let d = Entry::decode(e);
                if d.rule as usize >= nr || e & RESERVED_ENTRY_BITS != 0 {
                    return Err(F::Entry.into());
                }
            }
        }
        let stats = Stats { entries: pages.iter().map(|p| u64::from(p.count)).sum(), ..Stats::default() };
        Ok(UnwindTable { base, pages, entries, rules, runs, stats })
    }
}
