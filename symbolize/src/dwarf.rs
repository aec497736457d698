//! Reads DWARF line tables and inlined-function trees into flat, sorted rows.
//!
//! Each compilation unit is read on its own (a few at a time, in parallel, merged in unit
//! order as they finish, so that only a bounded number of units' rows are held apart);
//! names are resolved through `DW_AT_specification` / `DW_AT_abstract_origin` chains, also
//! into other units and into a supplementary (dwz) file, and demangled once per DIE.
//!
//! [`UnitMap`] says which units hold code at an address (`.debug_aranges`, else each
//! unit's own ranges), so that the first addresses asked about can be answered from their
//! units alone ([`read_for`]) while the whole file is read in the background.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use gimli::{AttributeValue, DebugInfoOffset, EndianSlice, LittleEndian};
use object::{Object, ObjectSection, SectionFlags};

use crate::{demangle, DwarfError, ElfSymbols};

type R<'a> = EndianSlice<'a, LittleEndian>;

/// Marks a line row that ends a sequence (no line information from here on).
pub(crate) const END: u32 = u32::MAX;
/// Most rows (lines plus function ranges) read from one file.
pub(crate) const MAX_ROWS: usize = 256 << 20;
/// Longest reference chain followed for a name.
const MAX_NAME_HOPS: usize = 16;
/// Longest function range kept (longer ones are garbage or tombstones).
pub(crate) const MAX_RANGE: u64 = 1 << 30;
/// Deepest inline nesting kept.
pub(crate) const MAX_INLINE_DEPTH: usize = 64;

/// One row of a line table. Packed to 20 bytes: millions are held while a large file is
/// read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(C, packed(4))]
pub(crate) struct LineRow {
    pub addr: u64,
    /// String index of the file path, or [`END`].
    pub file: u32,
    pub line: u32,
    pub discriminator: u32,
}

/// One address range of a function (depth 0) or of an inlined call (depth ≥ 1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct FuncRow {
    pub lo: u64,
    pub hi: u64,
    pub depth: u32,
    /// String index of the (demangled) name.
    pub name: u32,
    /// Where the inlined call was made (depth ≥ 1): string index of the file, or [`END`].
    /// For a function (depth 0): its compilation unit's name.
    pub call_file: u32,
    pub call_line: u32,
}

/// Everything read from one file's DWARF, addresses sorted.
#[derive(Clone, Debug, Default)]
pub(crate) struct RawDebugInfo {
    pub strings: Vec<Arc<str>>,
    pub lines: Vec<LineRow>,
    pub funcs: Vec<FuncRow>,
}

impl RawDebugInfo {
    /// Sorts function ranges by depth, then start, longest first.
    pub fn sort(&mut self) {
        self.funcs.sort_by_key(|f| (f.depth, f.lo, std::cmp::Reverse(f.hi)));
    }
}

/// The bytes of a file the DWARF is read from: a mapped file, or a copy in memory.
pub(crate) type FileBytes = Arc<dyn AsRef<[u8]> + Send + Sync>;

/// Where one section's uncompressed bytes are.
enum SectionBytes {
    /// In the file itself (not compressed): a byte range of it.
    InFile(std::ops::Range<usize>),
    /// Inflated from a compressed section.
    Inflated(Vec<u8>),
}

/// Uncompressed DWARF sections of one file. Sections stored uncompressed are read from the
/// file's own bytes (pages the system can drop and read again); compressed ones are
/// inflated once.
pub(crate) struct Sections {
    file: FileBytes,
    data: HashMap<gimli::SectionId, SectionBytes>,
}

impl Sections {
    /// Finds (and decompresses, zlib or zstd) every DWARF section of `obj`, which was parsed
    /// from `file`'s bytes, at most `max_total` bytes uncompressed in all (a compression
    /// bomb is refused, not inflated).
    pub fn load(obj: &object::File<'_>, file: &FileBytes, max_total: u64) -> Result<Self, DwarfError> {
        let bytes: &[u8] = (**file).as_ref();
        let base = bytes.as_ptr() as usize;
        let mut data = HashMap::new();
        let mut total = 0u64;
        for id in [
            gimli::SectionId::DebugAbbrev,
            gimli::SectionId::DebugAddr,
            gimli::SectionId::DebugAranges,
            gimli::SectionId::DebugInfo,
            gimli::SectionId::DebugLine,
            gimli::SectionId::DebugLineStr,
            gimli::SectionId::DebugRanges,
            gimli::SectionId::DebugRngLists,
            gimli::SectionId::DebugStr,
            gimli::SectionId::DebugStrOffsets,
        ] {
            let Some(section) = obj.section_by_name(id.name()) else { continue };
            let compressed =
                section.compressed_data().map_err(|source| DwarfError::Section { section: id, source })?;
            total = total.saturating_add(compressed.uncompressed_size);
            if total > max_total {
                return Err(DwarfError::TooLarge { section: id, size: total, max: max_total });
            }
            let stored = compressed.data;
            let start = (stored.as_ptr() as usize).wrapping_sub(base);
            let in_file = compressed.format == object::CompressionFormat::None
                && start.checked_add(stored.len()).is_some_and(|end| end <= bytes.len());
            let section_bytes = if in_file {
                SectionBytes::InFile(start..start + stored.len())
            } else {
                let inflated =
                    compressed.decompress().map_err(|source| DwarfError::Section { section: id, source })?;
                SectionBytes::Inflated(inflated.into_owned())
            };
            data.insert(id, section_bytes);
        }
        Ok(Sections { file: file.clone(), data })
    }

    fn bytes(&self, id: gimli::SectionId) -> &[u8] {
        match self.data.get(&id) {
            Some(SectionBytes::InFile(r)) => (*self.file).as_ref().get(r.clone()).unwrap_or(&[]),
            Some(SectionBytes::Inflated(v)) => v,
            None => &[],
        }
    }

    /// Uncompressed size of a section (0 when absent).
    pub fn len(&self, id: gimli::SectionId) -> usize {
        self.bytes(id).len()
    }

    fn dwarf(&self) -> gimli::Dwarf<R<'_>> {
        let load = |id: gimli::SectionId| -> Result<R<'_>, ()> {
            Ok(EndianSlice::new(self.bytes(id), LittleEndian))
        };
        gimli::Dwarf::load(load).expect("loading from memory cannot fail")
    }
}

/// Most DWARF bytes (uncompressed, all sections) accepted from a file of `file_len` bytes:
/// 64 times its size plus 64 MiB, and never more than [`crate::MAX_DWARF_SECTION`].
pub(crate) fn budget(file_len: usize) -> u64 {
    (file_len as u64).saturating_mul(64).saturating_add(64 << 20).min(crate::MAX_DWARF_SECTION)
}

/// Address ranges of the executable sections of the file the code runs from: rows outside
/// them (discarded sections tombstoned to 0 or -1 by the linker) are dropped.
pub(crate) fn text_ranges(file: &object::File<'_>) -> Vec<(u64, u64)> {
    let mut v: Vec<(u64, u64)> = file
        .sections()
        .filter(|s| match s.flags() {
            SectionFlags::Elf { sh_flags } => sh_flags & u64::from(object::elf::SHF_EXECINSTR) != 0,
            _ => false,
        })
        .filter(|s| s.address() != 0 && s.size() != 0)
        .map(|s| (s.address(), s.address().saturating_add(s.size())))
        .collect();
    v.sort_unstable();
    v
}

fn in_text(text: &[(u64, u64)], addr: u64) -> bool {
    let i = text.partition_point(|r| r.0 <= addr);
    i > 0 && addr < text[i - 1].1
}

/// Reads every unit's line rows and function ranges. `text` limits the addresses kept
/// (empty: keep everything but address 0). `symbols` (the file's symbol table) names the
/// out-of-line functions as binutils does: see [`outer_name`].
pub(crate) fn read(
    main: &Sections,
    sup: Option<&Sections>,
    text: &[(u64, u64)],
    symbols: Option<&ElfSymbols>,
) -> Result<RawDebugInfo, DwarfError> {
    let never = AtomicBool::new(false);
    let raw = read_bounded(main, sup, text, symbols, &Bounds::default(), &never, &mut || {})?;
    Ok(raw.expect("never cancelled"))
}

/// How [`read_bounded`] spreads its work and its memory.
pub(crate) struct Bounds {
    /// Threads reading units.
    pub threads: usize,
    /// Units read ahead of the oldest one not yet merged (their rows are held apart until
    /// it is).
    pub ahead: usize,
    /// `release` is called each time units of this many `.debug_info` bytes were merged.
    pub release_every: usize,
}

impl Default for Bounds {
    fn default() -> Self {
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).clamp(1, 16);
        Bounds { threads, ahead: threads, release_every: 8 << 20 }
    }
}

/// [`read`] with bounded memory: units are read by `bounds.threads` threads at most
/// `bounds.ahead` units ahead of the merge, and `release` is called every
/// `bounds.release_every` bytes of units merged (to give back the file's pages read so
/// far). `None` when `cancel` was set before the end.
pub(crate) fn read_bounded(
    main: &Sections,
    sup: Option<&Sections>,
    text: &[(u64, u64)],
    symbols: Option<&ElfSymbols>,
    bounds: &Bounds,
    cancel: &AtomicBool,
    release: &mut (dyn FnMut() + Send),
) -> Result<Option<RawDebugInfo>, DwarfError> {
    let mut dwarf = main.dwarf();
    if let Some(sup) = sup {
        dwarf.set_sup(sup.dwarf());
    }
    let ctx = Ctx::new(&dwarf, symbols)?;
    let n = ctx.headers.len();
    struct Merge<'r> {
        /// Units merged so far (the next to merge).
        done: usize,
        /// Units read, waiting for the ones before them.
        waiting: BTreeMap<usize, UnitRows>,
        acc: Accumulator,
        error: Option<DwarfError>,
        since_release: usize,
        release: &'r mut (dyn FnMut() + Send),
    }
    let state = Mutex::new(Merge {
        done: 0,
        waiting: BTreeMap::new(),
        acc: Accumulator::default(),
        error: None,
        since_release: 0,
        release,
    });
    let merged = Condvar::new();
    let next = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let ahead = bounds.ahead.max(1);
    let worker = || loop {
        let i = next.fetch_add(1, Ordering::Relaxed);
        if i >= n {
            return;
        }
        {
            let mut st = state.lock().expect("merge lock");
            while i >= st.done + ahead && !stop.load(Ordering::Relaxed) && !cancel.load(Ordering::Relaxed) {
                st = merged.wait(st).expect("merge lock");
            }
        }
        if stop.load(Ordering::Relaxed) || cancel.load(Ordering::Relaxed) {
            return;
        }
        let rows = read_unit(&ctx, ctx.headers[i], text, None, cancel);
        let mut st = state.lock().expect("merge lock");
        match rows {
            Ok(rows) => {
                st.waiting.insert(i, rows);
            }
            Err(e) => {
                st.error.get_or_insert(e);
                stop.store(true, Ordering::Relaxed);
            }
        }
        while st.error.is_none() {
            let done = st.done;
            let Some(rows) = st.waiting.remove(&done) else { break };
            if let Err(e) = st.acc.add(&rows) {
                st.error = Some(e);
                stop.store(true, Ordering::Relaxed);
                break;
            }
            st.since_release += ctx.headers[done].length_including_self();
            st.done += 1;
            if st.since_release >= bounds.release_every {
                st.since_release = 0;
                (st.release)();
            }
        }
        merged.notify_all();
    };
    std::thread::scope(|scope| {
        for _ in 1..bounds.threads.clamp(1, n.max(1)) {
            scope.spawn(worker);
        }
        worker();
    });
    let st = state.into_inner().expect("merge lock");
    if let Some(e) = st.error {
        return Err(e);
    }
    if cancel.load(Ordering::Relaxed) || st.done < n {
        return Ok(None);
    }
    (st.release)();
    Ok(Some(st.acc.finish()))
}

/// Which compilation units hold code at which addresses: `.debug_aranges`, and for units
/// it does not list, the unit's own `DW_AT_ranges` or `DW_AT_low_pc`/`DW_AT_high_pc`.
pub(crate) struct UnitMap {
    /// (start, end, unit number), sorted by start.
    ranges: Vec<(u64, u64, usize)>,
    /// Units with no known ranges: read for every address.
    anywhere: Vec<usize>,
    /// `.debug_info` bytes of each unit.
    sizes: Vec<usize>,
}

/// Most units without known ranges for which [`UnitMap`] is still worth building.
const MAX_UNITS_ANYWHERE: usize = 4;

impl UnitMap {
    /// The map of `main`'s units, or `None` when too many units have no known ranges.
    pub fn new(main: &Sections) -> Result<Option<Self>, DwarfError> {
        let dwarf = main.dwarf();
        let mut offsets = Vec::new();
        let mut sizes = Vec::new();
        let mut units = dwarf.units();
        while let Some(h) = units.next()? {
            offsets.push(h.offset().0);
            sizes.push(h.length_including_self());
        }
        let unit_at = |off: DebugInfoOffset<usize>| offsets.binary_search(&off.0).ok();
        let mut ranges = Vec::new();
        let mut listed = vec![false; offsets.len()];
        let mut sets = dwarf.debug_aranges.headers();
        while let Some(set) = sets.next()? {
            let Some(u) = unit_at(set.debug_info_offset()) else { continue };
            listed[u] = true;
            let mut entries = set.entries();
            while let Some(e) = entries.next()? {
                let r = e.range();
                if r.begin < r.end {
                    ranges.push((r.begin, r.end, u));
                }
            }
        }
        let mut anywhere = Vec::new();
        let mut units = dwarf.units();
        let mut u = 0;
        while let Some(h) = units.next()? {
            if !listed[u] {
                let unit = dwarf.unit(h)?;
                let mut cursor = unit.entries();
                let mut found = false;
                if let Some(root) = cursor.next_dfs()? {
                    for r in die_ranges(&dwarf, &unit, root)? {
                        if r.begin < r.end {
                            ranges.push((r.begin, r.end, u));
                            found = true;
                        }
                    }
                }
                if !found {
                    anywhere.push(u);
                    if anywhere.len() > MAX_UNITS_ANYWHERE {
                        return Ok(None);
                    }
                }
            }
            u += 1;
        }
        ranges.sort_unstable();
        Ok(Some(UnitMap { ranges, anywhere, sizes }))
    }

    /// The units holding code somewhere in `[lo, hi]`, in unit order.
    fn units_in(&self, lo: u64, hi: u64) -> impl Iterator<Item = usize> + '_ {
        let upto = self.ranges.partition_point(|r| r.0 <= hi);
        self.ranges[..upto].iter().filter(move |r| r.1 > lo).map(|r| r.2).chain(self.anywhere.iter().copied())
    }

    /// `.debug_info` bytes of unit `u`.
    pub fn unit_size(&self, u: usize) -> usize {
        self.sizes.get(u).copied().unwrap_or(0)
    }
}

/// Most units [`read_for`] reads for one batch of addresses.
pub(crate) const MAX_UNITS_FOR: usize = 8;

/// What [`read`] would give for the addresses `addrs` (sorted, deduplicated), read from
/// the units that hold code there only: every line row of those units, and the function
/// ranges that contain one of `addrs`. A unit whose line table may end a sequence between
/// an address and the row in force there is read too, so each address gets the same line
/// row as from the whole file. `None` when more than [`MAX_UNITS_FOR`] units or `max_bytes`
/// bytes of `.debug_info` would be read.
pub(crate) fn read_for(
    main: &Sections,
    sup: Option<&Sections>,
    map: &UnitMap,
    text: &[(u64, u64)],
    symbols: Option<&ElfSymbols>,
    addrs: &[u64],
    max_bytes: usize,
) -> Result<Option<RawDebugInfo>, DwarfError> {
    let mut dwarf = main.dwarf();
    if let Some(sup) = sup {
        dwarf.set_sup(sup.dwarf());
    }
    let ctx = Ctx::new(&dwarf, symbols)?;
    let never = AtomicBool::new(false);
    let mut wanted: BTreeSet<usize> = addrs.iter().flat_map(|&a| map.units_in(a, a)).collect();
    let mut read: BTreeMap<usize, UnitRows> = BTreeMap::new();
    loop {
        let too_many = wanted.len() > MAX_UNITS_FOR
            || wanted.iter().map(|&u| map.unit_size(u)).sum::<usize>() > max_bytes
            || wanted.iter().any(|&u| u >= ctx.headers.len());
        if too_many {
            return Ok(None);
        }
        for &u in &wanted {
            if let std::collections::btree_map::Entry::Vacant(e) = read.entry(u) {
                e.insert(read_unit(&ctx, ctx.headers[u], text, Some(addrs), &never)?);
            }
        }
        let mut acc = Accumulator::default();
        for rows in read.values() {
            acc.add(rows)?;
        }
        let raw = acc.finish();
        // Another unit's sequence ending between the row in force and the address would
        // end that row's reach: read every unit with code in between.
        let mut more = false;
        for &a in addrs {
            let i = raw.lines.partition_point(|r| r.addr <= a);
            let Some(from) = i.checked_sub(1).map(|i| raw.lines[i].addr) else { continue };
            for u in map.units_in(from, a) {
                more |= wanted.insert(u);
            }
        }
        if !more {
            // An address's answer needs only the row in force there, and rows up to it.
            let mut raw = raw;
            let mut keep = vec![false; raw.lines.len()];
            for &a in addrs {
                // The row in force, and the next row: the block cut from them reaches `a`.
                let end = raw.lines.partition_point(|r| r.addr <= a);
                let from = end.saturating_sub(1);
                let to = (end + 1).min(raw.lines.len());
                keep[from..to].iter_mut().for_each(|k| *k = true);
            }
            let mut i = 0;
            raw.lines.retain(|_| {
                i += 1;
                keep[i - 1]
            });
            return Ok(Some(raw));
        }
    }
}

/// The name of an out-of-line function's range that starts at the symbol `symbol`
/// (mangled), given what DWARF says of the function: its mangled linkage name, and whether
/// its unit's language mangles names. Binutils' and llvm-symbolizer's choice where they
/// agree, with binutils' spelling of clone suffixes:
/// - a symbol that is the linkage name with a suffix (`.constprop.0`, `.isra.0`, `.part.0`,
///   `.cold`) is a clone of the function: the symbol, demangled
///   (`f(int) [clone .constprop.0]`);
/// - without a linkage name (a static C++ function), in a language that mangles names, the
///   symbol, demangled (`ns::f(int)` rather than DWARF's `f`);
/// - otherwise `None`: DWARF's own name stands (C, where a symbol may be an alias).
pub(crate) fn outer_name(symbol: &str, linkage: Option<&str>, mangles: bool) -> Option<String> {
    match linkage {
        Some(l) => symbol
            .strip_prefix(l)
            .is_some_and(|suffix| suffix.len() > 1 && suffix.starts_with('.'))
            .then(|| demangle(symbol)),
        None if mangles && !symbol.is_empty() => Some(demangle(symbol)),
        None => None,
    }
}

/// Whether names of `language` are mangled in symbol tables (binutils' test for looking a
/// function's symbol up when DWARF gives only its plain name).
fn mangles(language: Option<gimli::DwLang>) -> bool {
    matches!(
        language,
        Some(
            gimli::DW_LANG_C_plus_plus
                | gimli::DW_LANG_C_plus_plus_03
                | gimli::DW_LANG_C_plus_plus_11
                | gimli::DW_LANG_C_plus_plus_14
                | gimli::DW_LANG_C_plus_plus_17
                | gimli::DW_LANG_C_plus_plus_20
                | gimli::DW_LANG_ObjC_plus_plus
                | gimli::DW_LANG_Rust
                | gimli::DW_LANG_D
                | gimli::DW_LANG_Java
        )
    )
}

struct Ctx<'a, 'd> {
    dwarf: &'a gimli::Dwarf<R<'d>>,
    headers: Vec<gimli::UnitHeader<R<'d>>>,
    sup_headers: Vec<gimli::UnitHeader<R<'d>>>,
    symbols: Option<&'a ElfSymbols>,
}

impl<'a, 'd> Ctx<'a, 'd> {
    fn new(dwarf: &'a gimli::Dwarf<R<'d>>, symbols: Option<&'a ElfSymbols>) -> Result<Self, DwarfError> {
        let collect = |d: &gimli::Dwarf<R<'d>>| -> Result<Vec<_>, DwarfError> {
            let mut v = Vec::new();
            let mut it = d.units();
            while let Some(h) = it.next()? {
                v.push(h);
            }
            Ok(v)
        };
        let headers = collect(dwarf)?;
        let sup_headers = match dwarf.sup() {
            Some(s) => collect(s)?,
            None => Vec::new(),
        };
        Ok(Ctx { dwarf, headers, sup_headers, symbols })
    }
}

/// One unit's rows with its own string numbering.
#[derive(Default)]
struct UnitRows {
    strings: Vec<Arc<str>>,
    lines: Vec<LineRow>,
    funcs: Vec<FuncRow>,
}

struct Interner {
    map: HashMap<Arc<str>, u32>,
    strings: Vec<Arc<str>>,
}

impl Interner {
    fn new() -> Self {
        Interner { map: HashMap::new(), strings: Vec::new() }
    }
    fn intern(&mut self, s: &str) -> u32 {
        if let Some(&i) = self.map.get(s) {
            return i;
        }
        let a: Arc<str> = Arc::from(s);
        let i = self.strings.len() as u32;
        self.strings.push(a.clone());
        self.map.insert(a, i);
        i
    }
}

/// A function DIE's name (string number) and its linkage name as DWARF has it (mangled).
type FunctionName = (Option<u32>, Option<Arc<str>>);

/// Per-unit reader state: other units opened for cross-unit references, resolved names.
struct UnitReader<'c, 'a, 'd> {
    ctx: &'c Ctx<'a, 'd>,
    others: HashMap<(bool, usize), gimli::Unit<R<'d>>>,
    names: HashMap<(bool, usize), FunctionName>,
    strings: Interner,
}

/// DIEs read between two looks at the cancel flag.
const CANCEL_EVERY: usize = 4096;

/// One unit's rows. With `want` (sorted addresses), only the function ranges that contain
/// one of them are kept (and named). Set, `cancel` ends the reading early (the rows are then
/// incomplete and the caller drops them).
fn read_unit<'d>(
    ctx: &Ctx<'_, 'd>,
    header: gimli::UnitHeader<R<'d>>,
    text: &[(u64, u64)],
    want: Option<&[u64]>,
    cancel: &AtomicBool,
) -> Result<UnitRows, DwarfError> {
    let dwarf = ctx.dwarf;
    let unit = dwarf.unit(header)?;
    let mut rd = UnitReader { ctx, others: HashMap::new(), names: HashMap::new(), strings: Interner::new() };
    let keep = |addr: u64| if text.is_empty() { addr != 0 } else { in_text(text, addr) };
    // A row inside the executable sections, or a sequence end just past one.
    let keep_row = |addr: u64, end: bool| keep(addr) || (end && addr > 0 && keep(addr - 1));

    // Line table.
    let mut lines = Vec::new();
    let mut file_names: HashMap<u64, u32> = HashMap::new();
    if let Some(program) = unit.line_program.clone() {
        let mut rows = program.rows();
        let mut seq: Vec<LineRow> = Vec::new();
        while let Some((header, row)) = rows.next_row()? {
            if row.end_sequence() {
                // Rows at the end address cover nothing; rows outside the code are garbage.
                seq.retain(|r| r.addr < row.address() && keep_row(r.addr, false));
                if !seq.is_empty() && keep_row(row.address(), true) {
                    lines.append(&mut seq);
                    lines.push(LineRow { addr: row.address(), file: END, line: 0, discriminator: 0 });
                }
                seq.clear();
                continue;
            }
            let fi = row.file_index();
            let file = match file_names.get(&fi) {
                Some(&f) => f,
                None => {
                    let f = file_path(dwarf, &unit, header, fi).map_or(END, |p| rd.strings.intern(&p));
                    file_names.insert(fi, f);
                    f
                }
            };
            seq.push(LineRow {
                addr: row.address(),
                file,
                line: row.line().map_or(0, |l| l.get().min(u64::from(u32::MAX - 1)) as u32),
                discriminator: row.discriminator().min(u64::from(u32::MAX)) as u32,
            });
            if lines.len() + seq.len() > MAX_ROWS {
                return Err(DwarfError::TooManyRows { max: MAX_ROWS });
            }
        }
    }

    // Function and inlined-call ranges. A function's `call_file` holds its unit's name,
    // which stands in for the file where the line table has no row.
    let cu_name = match unit.name {
        Some(n) => rd.strings.intern(&n.to_string_lossy()),
        None => END,
    };
    let mut funcs = Vec::new();
    let mut stack: Vec<(isize, u32)> = Vec::new(); // (DIE depth, inline depth)
    let mut cursor = unit.entries();
    let mut language = None;
    let mut seen = 0usize;
    while let Some(entry) = cursor.next_dfs()? {
        seen += 1;
        if seen.is_multiple_of(CANCEL_EVERY) && cancel.load(Ordering::Relaxed) {
            break;
        }
        let die_depth = entry.depth();
        if die_depth == 0 {
            if let Some(AttributeValue::Language(l)) = entry.attr_value(gimli::DW_AT_language) {
                language = Some(l);
            }
        }
        while stack.last().is_some_and(|&(d, _)| d >= die_depth) {
            stack.pop();
        }
        let tag = entry.tag();
        let depth = match tag {
            gimli::DW_TAG_subprogram => 0,
            gimli::DW_TAG_inlined_subroutine => match stack.last() {
                Some(&(_, d)) if (d as usize) < MAX_INLINE_DEPTH => d + 1,
                _ => continue,
            },
            _ => continue,
        };
        if entry.has_children() {
            stack.push((die_depth, depth));
        }
        let ranges = die_ranges(dwarf, &unit, entry)?;
        let mut first = true;
        let mut name = END;
        let mut linkage: Option<Arc<str>> = None;
        let (mut call_file, mut call_line) = (if depth == 0 { cu_name } else { END }, 0);
        for r in ranges {
            if r.begin >= r.end || r.end - r.begin > MAX_RANGE || !keep(r.begin) {
                continue;
            }
            if let Some(w) = want {
                let i = w.partition_point(|&a| a < r.begin);
                if w.get(i).is_none_or(|&a| a >= r.end) {
                    continue;
                }
            }
            if first {
                first = false;
                let off = entry.offset().to_debug_info_offset(&unit.header).map(|o| o.0);
                let (n, l) = rd.name_of(&unit, entry, off.map(|o| (false, o)))?;
                name = n.unwrap_or(END);
                linkage = l;
                if depth > 0 {
                    if let Some(f) = entry.attr(gimli::DW_AT_call_file).and_then(|a| a.udata_value()) {
                        call_file = match file_names.get(&f) {
                            Some(&s) => s,
                            None => unit
                                .line_program
                                .as_ref()
                                .and_then(|p| file_path(dwarf, &unit, p.header(), f))
                                .map_or(END, |p| rd.strings.intern(&p)),
                        };
                    }
                    call_line = entry
                        .attr(gimli::DW_AT_call_line)
                        .and_then(|a| a.udata_value())
                        .map_or(0, |l| l.min(u64::from(u32::MAX - 1)) as u32);
                }
            }
            let mut range_name = name;
            if depth == 0 {
                let sym = ctx.symbols.and_then(|s| s.raw_at(r.begin));
                if let Some(n) = sym.and_then(|s| outer_name(s, linkage.as_deref(), mangles(language))) {
                    range_name = rd.strings.intern(&n);
                }
            }
            funcs.push(FuncRow { lo: r.begin, hi: r.end, depth, name: range_name, call_file, call_line });
            if funcs.len() > MAX_ROWS {
                return Err(DwarfError::TooManyRows { max: MAX_ROWS });
            }
        }
    }
    Ok(UnitRows { strings: rd.strings.strings, lines, funcs })
}

/// Most ranges read from one `DW_AT_ranges` list.
const MAX_RANGES_PER_DIE: usize = 1 << 16;

/// A DIE's address ranges: `DW_AT_ranges`, or `DW_AT_low_pc` with `DW_AT_high_pc` (an
/// address, or a length checked for overflow; gimli's own helper adds without a check).
fn die_ranges(
    dwarf: &gimli::Dwarf<R<'_>>,
    unit: &gimli::Unit<R<'_>>,
    entry: &gimli::DebuggingInformationEntry<R<'_>>,
) -> Result<Vec<gimli::Range>, DwarfError> {
    let mut low = None;
    let mut high = None;
    let mut size = None;
    for attr in entry.attrs() {
        match attr.name() {
            gimli::DW_AT_low_pc => low = dwarf.attr_address(unit, attr.value())?,
            gimli::DW_AT_high_pc => match attr.value() {
                AttributeValue::Udata(n) => size = Some(n),
                v => high = dwarf.attr_address(unit, v)?,
            },
            gimli::DW_AT_ranges => {
                let mut out = Vec::new();
                if let Some(mut list) = dwarf.attr_ranges(unit, attr.value())? {
                    while let Some(r) = list.next()? {
                        out.push(r);
                        if out.len() >= MAX_RANGES_PER_DIE {
                            break;
                        }
                    }
                }
                return Ok(out);
            }
            _ => {}
        }
    }
    let end = match (low, size, high) {
        (Some(l), Some(n), _) => l.checked_add(n),
        (Some(_), None, h) => h,
        _ => None,
    };
    Ok(match (low, end) {
        (Some(begin), Some(end)) => vec![gimli::Range { begin, end }],
        _ => Vec::new(),
    })
}

fn file_path(
    dwarf: &gimli::Dwarf<R<'_>>,
    unit: &gimli::Unit<R<'_>>,
    header: &gimli::LineProgramHeader<R<'_>>,
    index: u64,
) -> Option<String> {
    let file = header.file(index)?;
    let name = dwarf.attr_string(unit, file.path_name()).ok()?.to_string_lossy().into_owned();
    if name.starts_with('/') {
        return Some(name);
    }
    let mut path = String::new();
    if let Some(dir) = file.directory(header) {
        let dir = dwarf.attr_string(unit, dir).ok()?.to_string_lossy().into_owned();
        if !dir.starts_with('/') {
            if let Some(comp) = &unit.comp_dir {
                path.push_str(&comp.to_string_lossy());
                if !path.is_empty() && !path.ends_with('/') && !dir.is_empty() {
                    path.push('/');
                }
            }
        }
        path.push_str(&dir);
    }
    if !path.is_empty() && !path.ends_with('/') {
        path.push('/');
    }
    path.push_str(&name);
    Some(path)
}

impl<'c, 'a, 'd> UnitReader<'c, 'a, 'd> {
    /// The name of a function DIE: the demangled linkage name found along its
    /// specification/abstract-origin chain, else the first plain name on it; and the
    /// linkage name as DWARF has it (mangled), if any.
    fn name_of(
        &mut self,
        unit: &gimli::Unit<R<'d>>,
        entry: &gimli::DebuggingInformationEntry<R<'d>>,
        key: Option<(bool, usize)>,
    ) -> Result<FunctionName, DwarfError> {
        if let Some(k) = key {
            if let Some(n) = self.names.get(&k) {
                return Ok(n.clone());
            }
        }
        let mut linkage: Option<String> = None;
        let mut plain: Option<(String, usize)> = None;
        self.walk_names(unit, entry, false, &mut linkage, &mut plain, 0)?;
        let n = match (&linkage, plain) {
            (Some(l), _) => Some(self.strings.intern(&demangle(l))),
            (None, Some((p, _))) => Some(self.strings.intern(&p)),
            (None, None) => None,
        };
        let n = (n, linkage.map(|l| Arc::from(l.as_str())));
        if let Some(k) = key {
            self.names.insert(k, n.clone());
        }
        Ok(n)
    }

    fn walk_names(
        &mut self,
        unit: &gimli::Unit<R<'d>>,
        entry: &gimli::DebuggingInformationEntry<R<'d>>,
        in_sup: bool,
        linkage: &mut Option<String>,
        plain: &mut Option<(String, usize)>,
        hops: usize,
    ) -> Result<(), DwarfError> {
        let dwarf = if in_sup { self.ctx.dwarf.sup().unwrap_or(self.ctx.dwarf) } else { self.ctx.dwarf };
        let mut next: Option<AttributeValue<R<'d>>> = None;
        for attr in entry.attrs() {
            match attr.name() {
                gimli::DW_AT_linkage_name | gimli::DW_AT_MIPS_linkage_name => {
                    if let Ok(s) = dwarf.attr_string(unit, attr.value()) {
                        *linkage = Some(s.to_string_lossy().into_owned());
                        return Ok(());
                    }
                }
                gimli::DW_AT_name if plain.is_none() => {
                    if let Ok(s) = dwarf.attr_string(unit, attr.value()) {
                        *plain = Some((s.to_string_lossy().into_owned(), hops));
                    }
                }
                gimli::DW_AT_specification | gimli::DW_AT_abstract_origin => {
                    next = Some(attr.value());
                }
                _ => {}
            }
        }
        if hops >= MAX_NAME_HOPS {
            return Ok(());
        }
        let Some(target) = next else { return Ok(()) };
        match target {
            AttributeValue::UnitRef(off) => {
                let e = unit.entry(off)?;
                self.walk_names(unit, &e, in_sup, linkage, plain, hops + 1)
            }
            AttributeValue::DebugInfoRef(off) => self.follow(off, in_sup, linkage, plain, hops),
            AttributeValue::DebugInfoRefSup(off) => self.follow(off, true, linkage, plain, hops),
            _ => Ok(()),
        }
    }

    fn follow(
        &mut self,
        off: DebugInfoOffset<usize>,
        in_sup: bool,
        linkage: &mut Option<String>,
        plain: &mut Option<(String, usize)>,
        hops: usize,
    ) -> Result<(), DwarfError> {
        let headers = if in_sup { &self.ctx.sup_headers } else { &self.ctx.headers };
        let i = headers.partition_point(|h| h.offset().0 <= off.0);
        let Some(header) = i.checked_sub(1).map(|i| &headers[i]) else { return Ok(()) };
        let start = header.offset().0;
        let key = (in_sup, start);
        if !self.others.contains_key(&key) {
            let dwarf = if in_sup { self.ctx.dwarf.sup().unwrap_or(self.ctx.dwarf) } else { self.ctx.dwarf };
            let u = dwarf.unit(*header)?;
            self.others.insert(key, u);
        }
        let unit = self.others.remove(&key).expect("just inserted");
        let result = match off.to_unit_offset(&unit.header) {
            Some(uoff) => match unit.entry(uoff) {
                Ok(e) => self.walk_names(&unit, &e, in_sup, linkage, plain, hops + 1),
                Err(e) => Err(e.into()),
            },
            None => Ok(()),
        };
        self.others.insert(key, unit);
        result
    }
}

/// Units' rows merged into one numbering of strings, in the order the units are added.
#[derive(Default)]
struct Accumulator {
    strings: Option<Interner>,
    lines: Vec<LineRow>,
    funcs: Vec<FuncRow>,
}

impl Accumulator {
    fn add(&mut self, part: &UnitRows) -> Result<(), DwarfError> {
        if self.lines.len() + self.funcs.len() + part.lines.len() + part.funcs.len() > MAX_ROWS {
            return Err(DwarfError::TooManyRows { max: MAX_ROWS });
        }
        let global = self.strings.get_or_insert_with(Interner::new);
        let remap: Vec<u32> = part.strings.iter().map(|s| global.intern(s)).collect();
        let m = |i: u32| if i == END { END } else { remap[i as usize] };
        self.lines.extend(part.lines.iter().map(|r| LineRow { file: m(r.file), ..*r }));
        self.funcs.extend(part.funcs.iter().map(|f| FuncRow {
            name: m(f.name),
            call_file: m(f.call_file),
            ..*f
        }));
        Ok(())
    }

    fn finish(self) -> RawDebugInfo {
        let mut lines = self.lines;
        // Sequence ends sort before rows that start at the same address; among rows at one
        // address the last one read wins (the line tables' own order is kept by the stable
        // sort).
        lines.sort_by_key(|r| (r.addr, r.file != END));
        let mut kept = 0usize;
        for i in 0..lines.len() {
            let r = lines[i];
            if let Some(last) = kept.checked_sub(1).map(|k| lines[k]).filter(|l| l.addr == r.addr) {
                if r.file == END {
                    continue;
                }
                if last.file != END {
                    lines[kept - 1] = r;
                    continue;
                }
            }
            lines[kept] = r;
            kept += 1;
        }
        lines.truncate(kept);
        lines.shrink_to_fit();
        let mut funcs = self.funcs;
        funcs.shrink_to_fit();
        let strings = self.strings.map(|s| s.strings).unwrap_or_default();
        RawDebugInfo { strings, lines, funcs }
    }
}
