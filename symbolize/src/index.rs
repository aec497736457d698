//! The symbolization index: DWARF lines and inline trees cut into self-contained address
//! blocks, each loadable, evictable and cacheable on its own.
//!
//! A block covers `[start, end)` and holds, with addresses relative to `start`:
//! - its own string table (function names already demangled, file paths already joined);
//! - the line rows that start in it, plus a copy of the row in force at `start`;
//! - one array of ranges per inline depth (0 = the function itself), each sorted by start,
//!   clipped to the block.
//!
//! On disk (see [`crate::cache`]) each block is one zstd frame with its own checksum, so the
//! first lookup in a cold process decompresses one block, not the whole index.
//!
//! A loaded block is turned into a [`Lookup`]: its addresses cut into regions with one
//! answer each, so that a lookup reads one search key chunk, one region and one chain of
//! frames, whatever the inline depth, and a batch can fetch all three ahead.

use std::sync::Arc;

use crate::dwarf::{FuncRow, LineRow, RawDebugInfo, END};
use crate::name::{Arena, Name};
use crate::{Frame, NameSource};

/// Line rows per block (the last block may hold fewer); tiny in unit tests so that ranges
/// are cut across blocks.
pub(crate) const BLOCK_LINES: usize = if cfg!(test) { 16 } else { 4 * 1024 };
/// Most blocks in one index.
pub(crate) const MAX_BLOCKS: usize = 1 << 20;
/// Most strings or rows in one block (checked when a block is read back from disk).
pub(crate) const MAX_BLOCK_ITEMS: usize = 1 << 24;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct BLine {
    pub off: u32,
    pub file: u32,
    pub line: u32,
    pub discriminator: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct BFunc {
    pub lo: u32,
    pub hi: u32,
    pub name: u32,
    /// Call site file of an inlined call; the unit name for a function (depth 0).
    pub call_file: u32,
    pub call_line: u32,
}

/// One block as cut from DWARF and stored (see [`crate::cache`]); lookups use the
/// [`Lookup`] form built from it when it is loaded.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Block {
    pub start: u64,
    pub end: u64,
    pub strings: Arena,
    pub lines: Vec<BLine>,
    pub levels: Vec<Vec<BFunc>>,
}

/// Sorted 32-bit keys with every 64th one copied into a small summary: a search is a binary
/// search over the summary (a few KiB that stays in cache) and then over 64 adjacent keys
/// (4 cache lines), instead of a dozen scattered cache misses.
#[derive(Debug, PartialEq, Eq)]
struct Keys {
    keys: Vec<u32>,
    summary: Vec<u32>,
}

const SUMMARY_STRIDE: usize = 64;

impl Keys {
    fn new(keys: Vec<u32>) -> Self {
        let summary = keys.iter().step_by(SUMMARY_STRIDE).copied().collect();
        Keys { keys, summary }
    }

    /// How many keys are `<= off` (the keys are sorted).
    fn upper(&self, off: u32) -> usize {
        let j = self.summary.partition_point(|&k| k <= off);
        if j == 0 {
            return 0;
        }
        let lo = (j - 1) * SUMMARY_STRIDE;
        let hi = (j * SUMMARY_STRIDE).min(self.keys.len());
        lo + self.keys[lo..hi].partition_point(|&k| k <= off)
    }

    /// Asks the CPU to fetch the 64 keys a search for `off` will read (the summary is
    /// searched now: it stays in cache).
    fn prefetch(&self, off: u32) {
        let j = self.summary.partition_point(|&k| k <= off);
        if j > 0 {
            let chunk = self.keys[(j - 1) * SUMMARY_STRIDE..].as_ptr();
            for line in 0..SUMMARY_STRIDE / 16 {
                prefetch(chunk.wrapping_add(line * 16));
            }
        }
    }

    fn heap_bytes(&self) -> usize {
        (self.keys.len() + self.summary.len()) * 4 + 48
    }
}

/// A hint to load the cache line at `p`; never faults, whatever the pointer.
#[inline(always)]
fn prefetch<T>(p: *const T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch is only a hint; it does not dereference the pointer, and the
    // SSE instruction exists on every x86-64 CPU.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p.cast());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// Where a block sits in the address space.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct BlockSpan {
    pub start: u64,
    pub end: u64,
}

impl Block {
    pub fn new(start: u64, end: u64, strings: Arena, lines: Vec<BLine>, levels: Vec<Vec<BFunc>>) -> Self {
        Block { start, end, strings, lines, levels }
    }
}

/// A string of a [`Lookup`]'s text: byte offset and length; `off == u32::MAX` for none.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Span {
    off: u32,
    len: u32,
}

const NO_SPAN: Span = Span { off: u32::MAX, len: 0 };

/// The answer for every address of one region: the innermost frame's location and the
/// chain of functions (`depth` frames from `chain`, outermost first; none when 0).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Region {
    file: Span,
    line: u32,
    discriminator: u32,
    chain: u32,
    depth: u32,
}

/// One function of a chain: its name, and where the next inner frame was called from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct ChainFrame {
    name: Span,
    call_file: Span,
    call_line: u32,
}

/// A block in the form lookups use, built when a block is loaded: the block's addresses cut
/// at every line row and range boundary into regions that each have one answer, so a lookup
/// is one key search, one region and one contiguous chain of frames (with string offsets in
/// place, not string numbers) — three cache misses however deep the inlining, each of which
/// a batch can fetch ahead.
#[derive(Debug)]
pub(crate) struct Lookup {
    pub start: u64,
    pub end: u64,
    text: Option<Arc<str>>,
    keys: Keys,
    regions: Vec<Region>,
    chains: Vec<ChainFrame>,
}

impl Lookup {
    pub fn new(b: &Block) -> Self {
        let span = |i: u32| -> Span {
            if i == END {
                return NO_SPAN;
            }
            b.strings.span(i).map_or(NO_SPAN, |(off, len)| Span { off, len })
        };
        // Every point where an answer may change, in order.
        let mut points: Vec<u32> =
            Vec::with_capacity(1 + b.lines.len() + 2 * b.levels.iter().map(Vec::len).sum::<usize>());
        points.push(0);
        points.extend(b.lines.iter().map(|l| l.off));
        for level in &b.levels {
            for f in level {
                points.push(f.lo);
                points.push(f.hi);
            }
        }
        // Sorted runs (rows by start, ends mostly in order): the stable sort merges runs.
        points.sort();
        points.dedup();

        let mut keys = Vec::with_capacity(points.len());
        let mut regions: Vec<Region> = Vec::with_capacity(points.len());
        let mut chains: Vec<ChainFrame> = Vec::new();
        // Keys are row numbers: a fast hash, no resistance to chosen keys needed.
        let mut chain_ids: rustc_hash::FxHashMap<Vec<u32>, u32> =
            rustc_hash::FxHashMap::with_capacity_and_hasher(
                b.levels.first().map_or(0, |l| 2 * l.len()),
                Default::default(),
            );
        let mut chain: Vec<u32> = Vec::with_capacity(b.levels.len());
        let mut last_chain: (Vec<u32>, u32) = (Vec::new(), 0);
        // Sweep: per array, how many rows start at or before the current point.
        let mut li = 0usize;
        let mut ci = vec![0usize; b.levels.len()];
        for &p in &points {
            while li < b.lines.len() && b.lines[li].off <= p {
                li += 1;
            }
            let line = li.checked_sub(1).map(|i| b.lines[i]).filter(|l| l.file != END);
            chain.clear();
            let mut parent: Option<&BFunc> = None;
            for (k, level) in b.levels.iter().enumerate() {
                while ci[k] < level.len() && level[ci[k]].lo <= p {
                    ci[k] += 1;
                }
                let Some(j) = find_range(level, ci[k], p, parent) else { break };
                chain.push(j as u32);
                parent = Some(&level[j]);
            }
            let (file, line_no, discriminator) = match (line, chain.first()) {
                (Some(l), _) => (span(l.file), l.line, l.discriminator),
                // No line row: the function's unit name, as binutils reports it.
                (None, Some(&j)) => (span(b.levels[0][j as usize].call_file), 0, 0),
                (None, None) => (NO_SPAN, 0, 0),
            };
            let id = if chain.is_empty() {
                0
            } else if chain == last_chain.0 {
                last_chain.1
            } else {
                let id = match chain_ids.get(chain.as_slice()) {
                    Some(&id) => id,
                    None => {
                        let id = chains.len() as u32;
                        for (k, &j) in chain.iter().enumerate() {
                            let f = &b.levels[k][j as usize];
                            chains.push(ChainFrame {
                                name: span(f.name),
                                call_file: span(f.call_file),
                                call_line: f.call_line,
                            });
                        }
                        chain_ids.insert(chain.clone(), id);
                        id
                    }
                };
                last_chain.0.clone_from(&chain);
                last_chain.1 = id;
                id
            };
            let r = Region { file, line: line_no, discriminator, chain: id, depth: chain.len() as u32 };
            if regions.last() != Some(&r) {
                keys.push(p);
                regions.push(r);
            }
        }
        regions.shrink_to_fit();
        chains.shrink_to_fit();
        Lookup {
            start: b.start,
            end: b.end,
            text: b.strings.text().cloned(),
            keys: Keys::new(keys),
            regions,
            chains,
        }
    }

    /// Approximate heap bytes held, for the memory budget.
    pub fn heap_bytes(&self) -> usize {
        std::mem::size_of::<Lookup>()
            + self.text.as_ref().map_or(0, |t| t.len() + 16)
            + self.keys.heap_bytes()
            + self.regions.len() * std::mem::size_of::<Region>()
            + self.chains.len() * std::mem::size_of::<ChainFrame>()
    }

    fn string(&self, s: Span) -> Option<Name> {
        if s.off == u32::MAX {
            return None;
        }
        Some(Name::slice(self.text.as_ref()?, s.off, s.len))
    }

    /// Whether `addr` lies in the block.
    pub fn contains(&self, addr: u64) -> bool {
        self.start <= addr && addr < self.end
    }

    /// The region holding `addr`, if it lies in the block.
    pub fn region_index(&self, addr: u64) -> Option<usize> {
        let off = addr.checked_sub(self.start).filter(|_| addr < self.end)? as u32;
        self.keys.upper(off).checked_sub(1)
    }

    /// First step of a batched lookup, some addresses ahead: fetches the search keys a
    /// lookup of `addr` will read, so that a batch overlaps its cache misses.
    pub fn prefetch_keys(&self, addr: u64) {
        if self.contains(addr) {
            self.keys.prefetch((addr - self.start) as u32);
        }
    }

    /// Second step, fewer addresses ahead (once the keys are cached): fetches region `i`.
    pub fn prefetch_region(&self, i: usize) {
        if let Some(r) = self.regions.get(i) {
            let r: *const Region = r;
            prefetch(r);
            prefetch(r.cast::<u8>().wrapping_add(std::mem::size_of::<Region>() - 1));
        }
    }

    /// Last step, an address or two ahead: fetches region `i`'s chain of frames.
    pub fn prefetch_chain(&self, i: usize) {
        if let Some(c) = self.regions.get(i).and_then(|r| self.chain(r)) {
            let bytes = std::mem::size_of_val(c);
            let p = c.as_ptr().cast::<u8>();
            for at in (0..bytes).step_by(64).chain(std::iter::once(bytes.saturating_sub(1))) {
                prefetch(p.wrapping_add(at));
            }
        }
    }

    fn chain(&self, r: &Region) -> Option<&[ChainFrame]> {
        self.chains.get(r.chain as usize..(r.chain as usize).checked_add(r.depth as usize)?)
    }

    /// The frames at `addr`, innermost first, and whether a function was found. Frames may
    /// be empty.
    #[cfg(test)]
    pub fn lookup(&self, addr: u64, frames: &mut Vec<Frame>) -> bool {
        self.region_index(addr).is_some_and(|i| self.lookup_region(i, frames))
    }

    /// The frames of region `i` (from [`Lookup::region_index`]), innermost first, and
    /// whether a function was found.
    pub fn lookup_region(&self, i: usize, frames: &mut Vec<Frame>) -> bool {
        let Some(r) = self.regions.get(i) else { return false };
        let mut file = self.string(r.file);
        let (mut line, mut discriminator) = (r.line, r.discriminator);
        let chain = self.chain(r).unwrap_or(&[]);
        frames.reserve_exact(chain.len().max(1));
        if chain.is_empty() {
            frames.push(Frame { function: None, file, line, discriminator, source: None });
            return false;
        }
        for f in chain.iter().rev() {
            let function = self.string(f.name);
            let source = function.as_ref().map(|_| NameSource::Dwarf);
            frames.push(Frame { function, file, line, discriminator, source });
            file = self.string(f.call_file);
            line = f.call_line;
            discriminator = 0;
        }
        true
    }
}

/// The row of `level` that holds `off` and lies inside `parent`, among the `upto` rows
/// starting at or before `off`. Ranges of one level do not overlap in well-formed DWARF;
/// where they do (identical code folded together), a few earlier ranges are tried too.
fn find_range(level: &[BFunc], upto: usize, off: u32, parent: Option<&BFunc>) -> Option<usize> {
    // Rows are sorted by start: once one starts before the parent, so do all before it.
    (upto.saturating_sub(8)..upto)
        .rev()
        .take_while(|&j| parent.is_none_or(|p| level[j].lo >= p.lo))
        .find(|&j| off < level[j].hi && parent.is_none_or(|p| level[j].hi <= p.hi))
}

/// A block being assembled.
#[derive(Default)]
struct Draft {
    start: u64,
    end: u64,
    strings: Vec<Arc<str>>,
    lines: Vec<BLine>,
    levels: Vec<Vec<BFunc>>,
}

/// Cuts what was read from DWARF into blocks.
pub(crate) fn build_blocks(raw: &mut RawDebugInfo) -> Vec<Block> {
    let mut blocks = Vec::new();
    build_blocks_with(raw, &mut |b| blocks.push(b));
    blocks
}

/// Cuts what was read from DWARF into blocks and hands each to `emit` as soon as it is
/// cut, in address order: only one block is assembled at a time.
pub(crate) fn build_blocks_with(raw: &mut RawDebugInfo, emit: &mut dyn FnMut(Block)) {
    raw.sort();
    let raw = &*raw;
    let lines = &raw.lines;
    let funcs = &raw.funcs;
    if lines.is_empty() && funcs.is_empty() {
        return;
    }
    let lo =
        lines.first().map_or(u64::MAX, |l| l.addr).min(funcs.iter().map(|f| f.lo).min().unwrap_or(u64::MAX));
    let hi = lines
        .last()
        .map_or(0, |l| l.addr.saturating_add(1))
        .max(funcs.iter().map(|f| f.hi).max().unwrap_or(0));
    let spans = block_spans(lines, funcs, lo, hi);

    // Rows of each depth (a sorted run of `funcs`): the next one not yet reached, and
    // those reached that may still reach into the block being cut (in row order).
    let mut depth_runs: Vec<std::ops::Range<usize>> = Vec::new();
    let mut at = 0;
    while at < funcs.len() {
        let d = funcs[at].depth;
        let end = at + funcs[at..].partition_point(|f| f.depth == d);
        depth_runs.push(at..end);
        at = end;
    }
    let mut next: Vec<usize> = depth_runs.iter().map(|r| r.start).collect();
    let mut active: Vec<Vec<usize>> = vec![Vec::new(); depth_runs.len()];

    for span in &spans {
        let mut block = Draft { start: span.start, end: span.end, ..Draft::default() };
        let mut local: std::collections::HashMap<u32, u32> = Default::default();
        let mut intern = |block: &mut Draft, g: u32| -> u32 {
            if g == END {
                return END;
            }
            *local.entry(g).or_insert_with(|| {
                block.strings.push(raw.strings[g as usize].clone());
                (block.strings.len() - 1) as u32
            })
        };
        let first = lines.partition_point(|l| l.addr < span.start);
        let last = lines.partition_point(|l| l.addr < span.end);
        // The row in force at the block's start.
        if first > 0 && lines.get(first).is_none_or(|l| l.addr > span.start) {
            let prev: LineRow = lines[first - 1];
            if prev.file != END {
                let file = intern(&mut block, prev.file);
                block.lines.push(BLine { off: 0, file, line: prev.line, discriminator: prev.discriminator });
            }
        }
        for l in &lines[first..last] {
            let file = intern(&mut block, l.file);
            block.lines.push(BLine {
                off: (l.addr - span.start) as u32,
                file,
                line: l.line,
                discriminator: l.discriminator,
            });
        }
        for (k, run) in depth_runs.iter().enumerate() {
            active[k].retain(|&j| funcs[j].hi > span.start);
            while next[k] < run.end && funcs[next[k]].lo < span.end {
                active[k].push(next[k]);
                next[k] += 1;
            }
            for &j in &active[k] {
                let f: &FuncRow = &funcs[j];
                let lo = f.lo.max(span.start);
                let hi = f.hi.min(span.end);
                if lo >= hi {
                    continue;
                }
                let name = intern(&mut block, f.name);
                let call_file = intern(&mut block, f.call_file);
                let depth = f.depth as usize;
                if block.levels.len() <= depth {
                    // A depth with no parent level in this block cannot be reached.
                    if block.levels.len() < depth {
                        continue;
                    }
                    block.levels.push(Vec::new());
                }
                let r = BFunc {
                    lo: (lo - span.start) as u32,
                    hi: (hi - span.start) as u32,
                    name,
                    call_file,
                    call_line: f.call_line,
                };
                let level = &mut block.levels[depth];
                match level.last_mut() {
                    // The same range twice (several labels of one piece of assembly, folded
                    // code): the last one read wins, as in binutils.
                    Some(l) if l.lo == r.lo && l.hi == r.hi => *l = r,
                    _ => level.push(r),
                }
            }
        }
        emit(Block::new(block.start, block.end, Arena::new(&block.strings), block.lines, block.levels));
    }
}

/// Where the blocks start and end: a block starts at every `BLOCK_LINES`-th line row, and
/// at any row or range start more than 3 GiB past the current block's start, so every
/// block spans at most 4 GiB (offsets are 32-bit) and no block covers a long empty
/// stretch. Ranges are at most 1 GiB long (see `dwarf::MAX_RANGE`), so one starting in a
/// block ends within its span. Lines count before ranges that start at the same address.
fn block_spans(lines: &[LineRow], funcs: &[FuncRow], lo: u64, hi: u64) -> Vec<BlockSpan> {
    const FAR: u64 = 3 << 30;
    let mut func_starts: Vec<u64> = funcs.iter().map(|f| f.lo).collect();
    func_starts.sort_unstable();
    let mut starts = vec![lo];
    let mut since = 0usize;
    let (mut li, mut fi) = (0, 0);
    loop {
        let (addr, is_line) = match (lines.get(li), func_starts.get(fi)) {
            (Some(l), Some(&f)) if l.addr <= f => (l.addr, true),
            (_, Some(&f)) => (f, false),
            (Some(l), None) => (l.addr, true),
            (None, None) => break,
        };
        if is_line {
            li += 1;
        } else {
            fi += 1;
        }
        let last = *starts.last().expect("non-empty");
        since += usize::from(is_line);
        if addr > last && ((is_line && since >= BLOCK_LINES) || addr - last >= FAR) {
            if starts.len() >= MAX_BLOCKS {
                break;
            }
            starts.push(addr);
            since = 0;
        }
    }
    let span_max = u64::from(u32::MAX);
    starts
        .iter()
        .enumerate()
        .map(|(i, &s)| {
            let next = starts.get(i + 1).copied().unwrap_or(hi);
            BlockSpan { start: s, end: next.min(s.saturating_add(span_max)) }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dwarf::{FuncRow, LineRow, RawDebugInfo};
    use proptest::prelude::*;

    /// The first, whole-index version of [`build_blocks`]: the oracle it is checked against.
    fn build_blocks_reference(raw: &mut RawDebugInfo) -> Vec<Block> {
        raw.sort();
        let raw = &*raw;
        let lines = &raw.lines;
        let funcs = &raw.funcs;
        if lines.is_empty() && funcs.is_empty() {
            return Vec::new();
        }
        let lo = lines
            .first()
            .map_or(u64::MAX, |l| l.addr)
            .min(funcs.iter().map(|f| f.lo).min().unwrap_or(u64::MAX));
        let hi = lines
            .last()
            .map_or(0, |l| l.addr.saturating_add(1))
            .max(funcs.iter().map(|f| f.hi).max().unwrap_or(0));
        // Block starts: every BLOCK_LINES-th line row, and any row or range start more than
        // 3 GiB past the current block's start, so every block spans at most 4 GiB (offsets
        // are 32-bit) and no block covers a long empty stretch. Ranges are at most 1 GiB long
        // (see `dwarf::MAX_RANGE`), so one starting in a block ends within its span.
        const FAR: u64 = 3 << 30;
        let mut points: Vec<(u64, bool)> = lines.iter().map(|l| (l.addr, true)).collect();
        points.extend(funcs.iter().map(|f| (f.lo, false)));
        points.sort_unstable_by_key(|p| p.0);
        let mut starts = vec![lo];
        let mut since = 0usize;
        for &(addr, is_line) in &points {
            let last = *starts.last().expect("non-empty");
            since += usize::from(is_line);
            if addr > last && ((is_line && since >= BLOCK_LINES) || addr - last >= FAR) {
                if starts.len() >= MAX_BLOCKS {
                    break;
                }
                starts.push(addr);
                since = 0;
            }
        }
        let span_max = u64::from(u32::MAX);
        let spans: Vec<BlockSpan> = starts
            .iter()
            .enumerate()
            .map(|(i, &s)| {
                let next = starts.get(i + 1).copied().unwrap_or(hi);
                BlockSpan { start: s, end: next.min(s.saturating_add(span_max)) }
            })
            .collect();

        let mut blocks: Vec<Draft> =
            spans.iter().map(|s| Draft { start: s.start, end: s.end, ..Draft::default() }).collect();
        // String remapping per block (global index → local index).
        let mut local: Vec<std::collections::HashMap<u32, u32>> = vec![Default::default(); blocks.len()];
        let mut intern = |b: usize, blocks: &mut [Draft], g: u32| -> u32 {
            if g == END {
                return END;
            }
            let map = &mut local[b];
            *map.entry(g).or_insert_with(|| {
                let block = &mut blocks[b];
                block.strings.push(raw.strings[g as usize].clone());
                (block.strings.len() - 1) as u32
            })
        };

        for (b, span) in spans.iter().enumerate() {
            let first = lines.partition_point(|l| l.addr < span.start);
            let last = lines.partition_point(|l| l.addr < span.end);
            // The row in force at the block's start.
            if first > 0 && lines.get(first).is_none_or(|l| l.addr > span.start) {
                let prev: LineRow = lines[first - 1];
                if prev.file != END {
                    let file = intern(b, &mut blocks, prev.file);
                    blocks[b].lines.push(BLine {
                        off: 0,
                        file,
                        line: prev.line,
                        discriminator: prev.discriminator,
                    });
                }
            }
            for l in &lines[first..last] {
                let file = intern(b, &mut blocks, l.file);
                blocks[b].lines.push(BLine {
                    off: (l.addr - span.start) as u32,
                    file,
                    line: l.line,
                    discriminator: l.discriminator,
                });
            }
        }

        for f in funcs {
            let f: &FuncRow = f;
            let first = spans.partition_point(|s| s.end <= f.lo);
            for (b, span) in spans.iter().enumerate().skip(first) {
                if span.start >= f.hi {
                    break;
                }
                let lo = f.lo.max(span.start);
                let hi = f.hi.min(span.end);
                if lo >= hi {
                    continue;
                }
                let name = intern(b, &mut blocks, f.name);
                let call_file = intern(b, &mut blocks, f.call_file);
                let block = &mut blocks[b];
                let depth = f.depth as usize;
                if block.levels.len() <= depth {
                    // A depth with no parent level in this block cannot be reached.
                    if block.levels.len() < depth {
                        continue;
                    }
                    block.levels.push(Vec::new());
                }
                let r = BFunc {
                    lo: (lo - span.start) as u32,
                    hi: (hi - span.start) as u32,
                    name,
                    call_file,
                    call_line: f.call_line,
                };
                let level = &mut block.levels[depth];
                match level.last_mut() {
                    // The same range twice (several labels of one piece of assembly, folded
                    // code): the last one read wins, as in binutils.
                    Some(l) if l.lo == r.lo && l.hi == r.hi => *l = r,
                    _ => level.push(r),
                }
            }
        }
        blocks
            .into_iter()
            .map(|b| Block::new(b.start, b.end, Arena::new(&b.strings), b.lines, b.levels))
            .collect()
    }

    /// Naive answer: the last line row at or before `addr` (none after a sequence end), and
    /// the chain of ranges holding `addr`, each inside the previous one.
    fn naive(raw: &RawDebugInfo, addr: u64) -> (Option<(u32, u32)>, Vec<u32>) {
        let line = raw
            .lines
            .iter()
            .rev()
            .find(|l| l.addr <= addr)
            .filter(|l| l.file != END)
            .map(|l| (l.file, l.line));
        let mut chain: Vec<&FuncRow> = Vec::new();
        for depth in 0.. {
            let parent = chain.last().copied();
            let found = raw
                .funcs
                .iter()
                .filter(|f| f.depth == depth && f.lo <= addr && addr < f.hi)
                .find(|f| parent.is_none_or(|p| f.lo >= p.lo && f.hi <= p.hi));
            match found {
                Some(f) => chain.push(f),
                None => break,
            }
        }
        (line, chain.iter().map(|f| f.name).collect())
    }

    fn raw_strategy() -> impl Strategy<Value = RawDebugInfo> {
        // Nested, non-overlapping ranges: functions of 64..512 bytes, inlined calls inside.
        (1usize..30, any::<u64>()).prop_map(|(nfuncs, seed)| {
            let mut x = seed | 1;
            let mut next = move |m: u64| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x % m.max(1)
            };
            let mut raw = RawDebugInfo::default();
            for i in 0..8 {
                raw.strings.push(std::sync::Arc::from(format!("s{i}").as_str()));
            }
            let mut at = 0x1000 + next(64);
            for _ in 0..nfuncs {
                let len = 64 + next(448);
                let (lo, hi) = (at, at + len);
                let mut push = |lo, hi, depth, name| {
                    raw.funcs.push(FuncRow { lo, hi, depth, name, call_file: 1, call_line: 7 })
                };
                push(lo, hi, 0, next(8) as u32);
                // A tree of inlined calls: up to three siblings per depth, each inside its
                // parent, up to four deep.
                let mut parents = vec![(lo, hi, 0u32)];
                while let Some((plo, phi, d)) = parents.pop() {
                    if d >= 4 {
                        continue;
                    }
                    let mut a = plo;
                    for _ in 0..next(4) {
                        if phi - a < 4 {
                            break;
                        }
                        let s = a + next((phi - a) / 2);
                        let e = (s + 1 + next(phi - s - 1)).min(phi);
                        push(s, e, d + 1, next(8) as u32);
                        parents.push((s, e, d + 1));
                        a = e;
                    }
                }
                let mut a = lo;
                while a < hi {
                    raw.lines.push(LineRow {
                        addr: a,
                        file: next(8) as u32,
                        line: next(100) as u32,
                        discriminator: 0,
                    });
                    a += 1 + next(40);
                }
                if next(3) == 0 {
                    raw.lines.push(LineRow { addr: hi, file: END, line: 0, discriminator: 0 });
                }
                at = hi + next(3) * 16;
            }
            raw.lines.sort_by_key(|r| (r.addr, r.file != END));
            raw.lines.dedup_by_key(|r| r.addr);
            raw
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn lookup_matches_naive_search(mut raw in raw_strategy(), probes in proptest::collection::vec(0u64..20_000, 64)) {
            let blocks = build_blocks(&mut raw);
            for p in probes {
                let addr = 0x1000 + p;
                let (want_line, want_chain) = naive(&raw, addr);
                let mut frames = Vec::new();
                let found = blocks.iter().find(|b| b.start <= addr && addr < b.end).is_some_and(|b| Lookup::new(b).lookup(addr, &mut frames));
                prop_assert_eq!(found, !want_chain.is_empty());
                if found {
                    let names: Vec<String> = frames.iter().rev().map(|f| f.function.as_deref().unwrap().to_string()).collect();
                    let want: Vec<String> = want_chain.iter().map(|&n| format!("s{n}")).collect();
                    prop_assert_eq!(names, want);
                    let inner = &frames[0];
                    // Without a line row the function's unit name (call_file 1) stands in.
                    let (file, line) = want_line.map_or(("s1".to_string(), 0), |(f, l)| (format!("s{f}"), l));
                    prop_assert_eq!(inner.file.as_deref(), Some(file.as_str()));
                    prop_assert_eq!(inner.line, line);
                }
            }
        }

        #[test]
        fn blocks_cut_one_at_a_time_are_the_whole_index_cut(raw in raw_strategy()) {
            let (mut a, mut b) = (raw.clone(), raw);
            prop_assert_eq!(build_blocks(&mut a), build_blocks_reference(&mut b));
        }

        #[test]
        fn blocks_round_trip_through_their_encoding(mut raw in raw_strategy()) {
            for b in build_blocks(&mut raw) {
                let p = crate::cache::pack(&b);
                let back = crate::cache::unpack(&p.bytes, p.raw_len, p.crc).unwrap();
                prop_assert_eq!(back, b);
            }
        }

        #[test]
        fn two_level_key_search_matches_partition_point(
            mut keys in proptest::collection::vec(0u32..5000, 0..1000),
            probes in proptest::collection::vec(0u32..5100, 32),
        ) {
            keys.sort_unstable();
            let k = Keys::new(keys.clone());
            for p in probes {
                prop_assert_eq!(k.upper(p), keys.partition_point(|&x| x <= p));
            }
        }

        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = crate::cache::decode_block(&data);
            let _ = crate::cache::unpack(&data, 4096, crc32fast::hash(&data));
        }
    }
}
