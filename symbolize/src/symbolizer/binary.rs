//! Opening a binary: its index read from the on-disk cache, or built from DWARF (the
//! file's own, a separate debug file, a debuginfod download) and then cached.
//!
//! A file with little DWARF is indexed when it is opened. A file with much
//! ([`LAZY_DWARF`] bytes of `.debug_info` or more) is not: its first addresses are answered
//! from the compilation units that hold them ([`PendingDwarf`]), and the whole index is
//! built on a thread of its own, with bounded memory, then cached. A batch too large to
//! answer from its units waits for that index.

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};

use object::Object;
use rayon::prelude::*;

use super::{Symbolizer, MAX_MINI_DEBUGINFO};
use crate::cache::{self, DirEntry, Packed};
use crate::debuginfo::{self, DebugSource, DebuginfodError};
use crate::eh_frame::FunctionBounds;
use crate::index::{self, Block, Lookup};
use crate::{dwarf, DwarfError, ElfSymbols, Error, LoadSegments, MAX_ELF_SIZE};

/// A file's identity: the same path may name another file later, and two paths one file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) struct FileId {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: i64,
    mtime_ns: i64,
}

/// Where a binary's compressed index blocks are.
enum Store {
    Disk(File),
    Memory(Vec<Packed>),
}

/// A binary's index: the directory of its blocks and where they are.
struct Index {
    dir: Vec<DirEntry>,
    store: Store,
}

/// Files with at least this many bytes of `.debug_info` are indexed in the background,
/// their first addresses answered from their compilation units meanwhile.
pub(super) const LAZY_DWARF: usize = 32 << 20;

/// A binary's index, shared with the thread that builds it.
struct IndexSlot {
    index: OnceLock<Index>,
    state: Mutex<BuildState>,
    changed: Condvar,
    /// The binary was dropped: the build stops.
    cancel: AtomicBool,
}

enum BuildState {
    NotStarted,
    Running,
    Done,
    /// The build failed; the error goes to the first batch that waited for it.
    Failed(Option<Error>),
}

impl IndexSlot {
    fn new() -> Arc<Self> {
        Arc::new(IndexSlot {
            index: OnceLock::new(),
            state: Mutex::new(BuildState::NotStarted),
            changed: Condvar::new(),
            cancel: AtomicBool::new(false),
        })
    }

    fn ready(index: Index) -> Arc<Self> {
        let slot = Self::new();
        let _ = slot.index.set(index);
        *slot.state.lock().expect("index state lock") = BuildState::Done;
        slot
    }
}

/// The DWARF of a binary whose index is not built yet, and what its build needs.
pub(super) struct PendingDwarf {
    /// The mapped files the sections are read from (their pages are given back as the
    /// build goes).
    maps: Vec<Arc<memmap2::Mmap>>,
    main: dwarf::Sections,
    sup: Option<dwarf::Sections>,
    /// `None`: the units' ranges are unknown, or the file is small; every address waits
    /// for the whole index.
    units: Option<dwarf::UnitMap>,
    text: Vec<(u64, u64)>,
    /// The file the DWARF is in (for errors).
    path: PathBuf,
    symbols: Option<Arc<ElfSymbols>>,
    debug: DebugSource,
    cache_path: Option<PathBuf>,
    key: String,
}

impl PendingDwarf {
    /// Asks the system to drop the pages of the mapped files read so far: they are read
    /// again if needed, and do not add up in the process's memory.
    fn release_pages(&self) {
        for m in &self.maps {
            // SAFETY: the maps are private, read-only and never written through: dropping
            // their pages loses nothing; the next read faults them in from the file again.
            let _ = unsafe { m.unchecked_advise(memmap2::UncheckedAdvice::DontNeed) };
        }
    }

    /// The raw rows for the sorted, deduplicated `addrs`, read from their units only;
    /// `None` when they need too many units (or the units are not known).
    pub(super) fn read_for(&self, addrs: &[u64]) -> Option<dwarf::RawDebugInfo> {
        let units = self.units.as_ref()?;
        dwarf::read_for(
            &self.main,
            self.sup.as_ref(),
            units,
            &self.text,
            self.symbols.as_deref(),
            addrs,
            EARLY_MAX_BYTES,
        )
        .ok()
        .flatten()
    }

    /// Reads the whole DWARF into an index and caches it. `None` when `cancel` was set.
    fn build(&self, cancel: &AtomicBool) -> Result<Option<Index>, Error> {
        let dwarf_err = |source| Error::Dwarf { path: self.path.clone(), source };
        // Pages of the file read so far, and those of freed rows of units merged.
        let mut release = || {
            self.release_pages();
            give_back_free_memory();
        };
        let raw = dwarf::read_bounded(
            &self.main,
            self.sup.as_ref(),
            &self.text,
            self.symbols.as_deref(),
            &dwarf::Bounds::default(),
            cancel,
            &mut release,
        )
        .map_err(dwarf_err)?;
        let Some(mut raw) = raw else { return Ok(None) };
        // Blocks are compressed a batch at a time, as they are cut.
        const BATCH: usize = 64;
        let mut packed: Vec<Packed> = Vec::new();
        let mut batch: Vec<Block> = Vec::with_capacity(BATCH);
        index::build_blocks_with(&mut raw, &mut |b| {
            batch.push(b);
            if batch.len() >= BATCH {
                packed.par_extend(batch.par_iter().map(cache::pack));
                batch.clear();
                // The compressors' buffers, freed on other threads.
                give_back_free_memory();
            }
        });
        packed.par_extend(batch.par_iter().map(cache::pack));
        drop(batch);
        drop(raw);
        let index = store(self.cache_path.as_deref(), &self.key, &self.debug, packed);
        give_back_free_memory();
        Ok(Some(index))
    }
}

/// Gives the allocator's free pages back to the system: glibc keeps the pages of freed
/// small allocations (in every thread's arena) until asked, and a build frees many.
fn give_back_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks the allocator's own free lists; it is thread-safe.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Most `.debug_info` bytes read to answer a batch before the index is built.
const EARLY_MAX_BYTES: usize = 64 << 20;

/// The index of `packed` blocks: written to `cache_path` when given (and the DWARF was
/// found), then read from there; else kept in memory.
fn store(cache_path: Option<&Path>, key: &str, debug: &DebugSource, packed: Vec<Packed>) -> Index {
    let dir = dir_of(&packed);
    // "No debuginfo" is not cached: a debug package installed later must be found.
    let cacheable = *debug != DebugSource::None;
    if let Some(cp) = cache_path.filter(|_| cacheable) {
        if cache::write_file(cp, &source_meta(debug), &packed).is_ok() {
            // Indexes of older versions of this layout are never read again.
            if let Some(d) = cp.parent() {
                for v in 1..cache::VERSION {
                    let _ = std::fs::remove_file(d.join(format!("{key}.v{v}.symidx")));
                }
            }
            if let Ok(f) = File::open(cp) {
                if let Ok((disk_dir, _)) = read_cached(&f) {
                    if disk_dir.len() == packed.len() {
                        return Index { dir: disk_dir, store: Store::Disk(f) };
                    }
                }
            }
        }
    }
    Index { dir, store: Store::Memory(packed) }
}

/// One opened binary: its index directory and blocks, and its symbol tables (read when
/// DWARF has no answer).
pub(super) struct Binary {
    pub(super) id: u64,
    /// The symbolizer's `epoch` when a lookup last took this binary (see
    /// [`Symbolizer::release_unused`]).
    pub(super) last_used: AtomicU64,
    /// `/proc/self/fd/N` of `_elf_file`: the file stays readable for lazy symbol loading
    /// even after the process it came from exited or the path was replaced.
    elf_path: PathBuf,
    _elf_file: File,
    /// A block failed to load (damaged cache file): no more loads from this index.
    pub(super) failed: AtomicBool,
    pub(super) debug: DebugSource,
    index: Arc<IndexSlot>,
    /// The DWARF, until the index is built from it.
    pending: Mutex<Option<Arc<PendingDwarf>>>,
    pub(super) cache_path: Option<PathBuf>,
    segments: LoadSegments,
    symbols: OnceLock<Option<Arc<ElfSymbols>>>,
    /// The functions `.eh_frame` delimits, read when no symbol covers an address.
    bounds: OnceLock<FunctionBounds>,
}

impl Drop for Binary {
    fn drop(&mut self) {
        self.index.cancel.store(true, Ordering::Relaxed);
    }
}

impl Binary {
    pub(super) fn symbols(&self) -> Option<&ElfSymbols> {
        self.symbols.get_or_init(|| symbols_for(&self.elf_path, &self.debug).map(Arc::new)).as_deref()
    }

    /// Whether the index is built (or was read from the cache).
    pub(super) fn has_index(&self) -> bool {
        self.index.index.get().is_some()
    }

    /// Whether the index is being built in the background now.
    pub(super) fn building(&self) -> bool {
        matches!(*self.index.state.lock().expect("index state lock"), BuildState::Running)
    }

    /// The DWARF to answer from while the index is being built.
    pub(super) fn pending(&self) -> Option<Arc<PendingDwarf>> {
        if self.has_index() {
            return None;
        }
        self.pending.lock().expect("pending lock").clone()
    }

    /// Starts building the index on a thread of its own, if it is not built or being built.
    pub(super) fn start_build(&self) {
        let mut state = self.index.state.lock().expect("index state lock");
        if !matches!(*state, BuildState::NotStarted) {
            return;
        }
        let Some(pending) = self.pending.lock().expect("pending lock").clone() else { return };
        *state = BuildState::Running;
        drop(state);
        let slot = self.index.clone();
        let spawned = std::thread::Builder::new().name("unwound-symidx".into()).spawn({
            let slot = slot.clone();
            move || {
                let built = pending.build(&slot.cancel);
                drop(pending);
                let mut state = slot.state.lock().expect("index state lock");
                *state = match built {
                    Ok(Some(index)) => {
                        let _ = slot.index.set(index);
                        BuildState::Done
                    }
                    Ok(None) => BuildState::NotStarted,
                    Err(e) => BuildState::Failed(Some(e)),
                };
                slot.changed.notify_all();
            }
        });
        if let Err(source) = spawned {
            let path = self.elf_path.clone();
            *slot.state.lock().expect("index state lock") =
                BuildState::Failed(Some(Error::Io { path, source }));
            slot.changed.notify_all();
        }
    }

    /// Waits for the index (starting its build if needed); the build's error, if it failed.
    pub(super) fn wait_for_index(&self) -> Result<(), Error> {
        if !self.has_index() {
            self.start_build();
            let mut state = self.index.state.lock().expect("index state lock");
            while matches!(*state, BuildState::Running) {
                state = self.index.changed.wait(state).expect("index state lock");
            }
            if let BuildState::Failed(e) = &mut *state {
                return Err(e.take().unwrap_or_else(|| Error::Io {
                    path: self.elf_path.clone(),
                    source: std::io::Error::other("building the symbol index failed"),
                }));
            }
        }
        // The DWARF's maps are no longer needed.
        self.pending.lock().expect("pending lock").take();
        if self.has_index() {
            Ok(())
        } else {
            Err(Error::Io {
                path: self.elf_path.clone(),
                source: std::io::Error::other("the symbol index was not built"),
            })
        }
    }

    /// The FDE ranges of the binary's `.eh_frame` (empty when it cannot be read).
    pub(super) fn function_bounds(&self) -> &FunctionBounds {
        self.bounds.get_or_init(|| {
            let Ok(f) = File::open(&self.elf_path) else { return FunctionBounds::default() };
            // SAFETY: read-only private map; see `ElfSymbols::open`.
            let Ok(map) = (unsafe { memmap2::Mmap::map(&f) }) else { return FunctionBounds::default() };
            match object::File::parse(&*map) {
                Ok(obj) => FunctionBounds::of(&obj),
                Err(_) => FunctionBounds::default(),
            }
        })
    }

    /// The block holding `addr` (none until the index is built).
    pub(super) fn block_of(&self, addr: u64) -> Option<usize> {
        let dir = &self.index.index.get()?.dir;
        let i = dir.partition_point(|d| d.span.start <= addr).checked_sub(1)?;
        (addr < dir[i].span.end).then_some(i)
    }

    pub(super) fn load(&self, i: usize) -> Result<Lookup, cache::Corrupt> {
        let index = self.index.index.get().ok_or(cache::Corrupt("no index"))?;
        let entry = index.dir.get(i).ok_or(cache::Corrupt("no such block"))?;
        let block = match &index.store {
            Store::Disk(f) => cache::read_block(f, entry)?,
            Store::Memory(p) => {
                let p = p.get(i).ok_or(cache::Corrupt("no such block"))?;
                cache::unpack(&p.bytes, p.raw_len, p.crc)?
            }
        };
        Ok(Lookup::new(&block))
    }

    pub(super) fn file_offset_to_vaddr(&self, off: u64) -> Option<u64> {
        self.segments.file_offset_to_vaddr(off)
    }
}

impl Symbolizer {
    /// The binary at `path`, opened once per file identity.
    pub(super) fn binary(&self, path: &Path) -> Result<Arc<Binary>, Error> {
        let io = |source| Error::Io { path: path.to_path_buf(), source };
        let meta = std::fs::metadata(path).map_err(io)?;
        let fid = FileId {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime: meta.mtime(),
            mtime_ns: meta.mtime_nsec(),
        };
        // Marked used under the binaries lock, which `release_unused` holds.
        let used = |b: &Arc<Binary>| {
            b.last_used.store(self.epoch.load(Ordering::Relaxed), Ordering::Relaxed);
            b.clone()
        };
        if let Some(b) = self.binaries.lock().expect("binaries lock").get(&fid) {
            return Ok(used(b));
        }
        let bin = Arc::new(self.open(path, &fid)?);
        Ok(used(self.binaries.lock().expect("binaries lock").entry(fid).or_insert(bin)))
    }

    fn open(&self, path: &Path, fid: &FileId) -> Result<Binary, Error> {
        let io = |source| Error::Io { path: path.to_path_buf(), source };
        if fid.size > MAX_ELF_SIZE {
            return Err(Error::TooLarge { path: path.to_path_buf(), size: fid.size });
        }
        let file = File::open(path).map_err(io)?;
        // SAFETY: read-only private map; see `ElfSymbols::open`.
        let map = Arc::new(unsafe { memmap2::Mmap::map(&file) }.map_err(io)?);
        let obj = crate::elf::parse_elf(path, &map)?;
        let segments = LoadSegments::of(&obj);
        let build_id = obj.build_id().ok().flatten().map(<[u8]>::to_vec);
        let key = match &build_id {
            Some(id) => debuginfo::hex(id),
            None => format!(
                "noid-{:016x}",
                fnv(&[fid.dev, fid.ino, fid.size, fid.mtime as u64, fid.mtime_ns as u64])
            ),
        };
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let key_lock = self.building.lock().expect("building lock").entry(key.clone()).or_default().clone();
        let _building = key_lock.lock().expect("build lock");
        let cache_path =
            self.options.cache_dir.as_ref().map(|d| d.join(format!("{key}.v{}.symidx", cache::VERSION)));
        use std::os::fd::AsRawFd;
        let kept = file.try_clone().map_err(io)?;
        let elf_path = PathBuf::from(format!("/proc/self/fd/{}", kept.as_raw_fd()));
        let mut bin = Binary {
            id,
            last_used: AtomicU64::new(0),
            elf_path,
            _elf_file: kept,
            failed: AtomicBool::new(false),
            debug: DebugSource::None,
            index: IndexSlot::new(),
            pending: Mutex::new(None),
            cache_path: cache_path.clone(),
            segments,
            symbols: OnceLock::new(),
            bounds: OnceLock::new(),
        };
        if let Some(cp) = &cache_path {
            if let Ok(f) = File::open(cp) {
                match read_cached(&f) {
                    Ok((dir, debug)) => {
                        self.stats.lock().expect("stats lock").cache_hits += 1;
                        bin.debug = debug;
                        bin.index = IndexSlot::ready(Index { dir, store: Store::Disk(f) });
                        return Ok(bin);
                    }
                    Err(_) => {
                        let _ = std::fs::remove_file(cp);
                        self.stats.lock().expect("stats lock").cache_rebuilt += 1;
                    }
                }
            }
        }
        // Build from DWARF.
        let pending = self.find_dwarf(path, &obj, &map, cache_path, key)?;
        self.stats.lock().expect("stats lock").indexes_built += 1;
        let Some(pending) = pending else {
            bin.index = IndexSlot::ready(Index { dir: Vec::new(), store: Store::Memory(Vec::new()) });
            return Ok(bin);
        };
        bin.debug = pending.debug.clone();
        let _ = bin.symbols.set(pending.symbols.clone());
        if pending.units.is_some() {
            *bin.pending.get_mut().expect("pending lock") = Some(Arc::new(pending));
            return Ok(bin);
        }
        let never = AtomicBool::new(false);
        let index = pending.build(&never)?.expect("never cancelled");
        bin.index = IndexSlot::ready(index);
        Ok(bin)
    }

    /// Finds the DWARF for `obj` (mapped in `map`): `None` when there is none.
    fn find_dwarf(
        &self,
        path: &Path,
        obj: &object::File<'_>,
        map: &Arc<memmap2::Mmap>,
        cache_path: Option<PathBuf>,
        key: String,
    ) -> Result<Option<PendingDwarf>, Error> {
        let text = dwarf::text_ranges(obj);
        let dwarf_err = |p: &Path, source: DwarfError| Error::Dwarf { path: p.to_path_buf(), source };
        let bytes = |m: &Arc<memmap2::Mmap>| -> dwarf::FileBytes { m.clone() };
        if debuginfo::has_dwarf(obj) {
            let main = dwarf::Sections::load(obj, &bytes(map), dwarf::budget(map.len()))
                .map_err(|e| dwarf_err(path, e))?;
            let units = unit_map(&main, self.lazy_dwarf).map_err(|e| dwarf_err(path, e))?;
            return Ok(Some(PendingDwarf {
                maps: vec![map.clone()],
                main,
                sup: None,
                units,
                text,
                path: path.to_path_buf(),
                symbols: symbols_for(path, &DebugSource::Embedded).map(Arc::new),
                debug: DebugSource::Embedded,
                cache_path,
                key,
            }));
        }
        let mut source = debuginfo::find_separate(obj, path, &self.options.debug_dirs);
        if source.is_none() {
            let down = self.debuginfod_down.load(Ordering::Relaxed);
            if let (Some(d), Some(id), false) =
                (&self.options.debuginfod, obj.build_id().ok().flatten(), down)
            {
                match d.fetch(id) {
                    Ok(p) => source = Some(DebugSource::Debuginfod(p)),
                    Err(DebuginfodError::Request { .. }) => {
                        self.debuginfod_down.store(true, Ordering::Relaxed);
                        self.stats.lock().expect("stats lock").debuginfod_errors += 1;
                    }
                    // Built without a client: nothing to download, and no request failed.
                    Err(DebuginfodError::NotBuiltIn) => self.debuginfod_down.store(true, Ordering::Relaxed),
                    // Not found, too large, the wrong file: an answer about this file only.
                    Err(_) => {}
                }
            }
        }
        let Some(source) = source else { return Ok(None) };
        let dpath = source.path().expect("separate sources have a path").to_path_buf();
        let io = |source| Error::Io { path: dpath.clone(), source };
        let dfile = File::open(&dpath).map_err(io)?;
        // SAFETY: read-only private map; see `ElfSymbols::open`.
        let dmap = Arc::new(unsafe { memmap2::Mmap::map(&dfile) }.map_err(io)?);
        let dobj =
            object::File::parse(&**dmap).map_err(|source| Error::Elf { path: dpath.clone(), source })?;
        let main = dwarf::Sections::load(&dobj, &bytes(&dmap), dwarf::budget(dmap.len()))
            .map_err(|e| dwarf_err(&dpath, e))?;
        let mut maps = vec![dmap.clone()];
        let sup_path = debuginfo::find_supplementary(&dobj, &dpath, &self.options.debug_dirs);
        let sup_map = match &sup_path {
            // SAFETY: read-only private map; see `ElfSymbols::open`.
            Some(p) => File::open(p).ok().and_then(|f| unsafe { memmap2::Mmap::map(&f) }.ok()).map(Arc::new),
            None => None,
        };
        let sup_obj = sup_map.as_ref().and_then(|m| object::File::parse(&***m).ok());
        let sup = match (&sup_obj, &sup_map) {
            (Some(o), Some(m)) => {
                maps.push(m.clone());
                Some(
                    dwarf::Sections::load(o, &bytes(m), dwarf::budget(m.len()))
                        .map_err(|e| dwarf_err(&dpath, e))?,
                )
            }
            _ => None,
        };
        let text = if text.is_empty() { dwarf::text_ranges(&dobj) } else { text };
        let units = unit_map(&main, self.lazy_dwarf).map_err(|e| dwarf_err(&dpath, e))?;
        Ok(Some(PendingDwarf {
            maps,
            main,
            sup,
            units,
            text,
            path: dpath.clone(),
            symbols: symbols_for(path, &source).map(Arc::new),
            debug: source,
            cache_path,
            key,
        }))
    }
}

/// The units' address ranges of a file with `lazy_dwarf` bytes of `.debug_info` or more, to
/// be indexed in the background (`None` for a smaller one, or one whose units' ranges are not known).
fn unit_map(main: &dwarf::Sections, lazy_dwarf: usize) -> Result<Option<dwarf::UnitMap>, DwarfError> {
    if main.len(gimli::SectionId::DebugInfo) < lazy_dwarf {
        return Ok(None);
    }
    dwarf::UnitMap::new(main)
}

/// The symbols binutils would use: the separate debug file's full symbol table when there
/// is one (it keeps the local symbols a stripped binary lost), else the binary's own.
fn symbols_for(elf: &Path, debug: &DebugSource) -> Option<ElfSymbols> {
    let mut own = ElfSymbols::open_like_binutils(elf).ok();
    // MiniDebugInfo: the local function symbols of a stripped binary, xz-compressed.
    if let (Some(o), Ok(f)) = (own.as_mut(), File::open(elf)) {
        // SAFETY: read-only private map; see `ElfSymbols::open`.
        if let Ok(map) = unsafe { memmap2::Mmap::map(&f) } {
            if let Some(mini) = ElfSymbols::mini_debuginfo(elf, &map, MAX_MINI_DEBUGINFO, true) {
                o.merge(mini);
            }
        }
    }
    if let Some(d) = debug.path() {
        if let Ok(s) = ElfSymbols::open_like_binutils(d) {
            if own.as_ref().is_none_or(|o| s.len() >= o.len()) {
                return Some(s);
            }
        }
    }
    own
}

/// The directory of blocks stored one after the other in this order.
fn dir_of(packed: &[Packed]) -> Vec<DirEntry> {
    let mut offset = 0;
    packed
        .iter()
        .map(|p| {
            let d = DirEntry {
                span: p.span,
                offset,
                compressed_len: p.bytes.len() as u32,
                raw_len: p.raw_len,
                crc: p.crc,
            };
            offset += p.bytes.len() as u64;
            d
        })
        .collect()
}

/// The directory and debug source of an index file.
fn read_cached(f: &File) -> Result<(Vec<DirEntry>, DebugSource), cache::Corrupt> {
    let (meta, dir) = cache::read_directory(f)?;
    let debug = match meta.split_once(':') {
        Some(("embedded", _)) => DebugSource::Embedded,
        Some(("build-id", p)) => DebugSource::BuildId(p.into()),
        Some(("debuglink", p)) => DebugSource::DebugLink(p.into()),
        Some(("debuginfod", p)) => DebugSource::Debuginfod(p.into()),
        Some(("none", _)) => DebugSource::None,
        _ => return Err(cache::Corrupt("unknown debug source")),
    };
    Ok((dir, debug))
}

/// How the debug source is recorded in a cache file.
fn source_meta(s: &DebugSource) -> String {
    let path = s.path().map(|p| p.to_string_lossy().into_owned()).unwrap_or_default();
    let kind = match s {
        DebugSource::Embedded => "embedded",
        DebugSource::BuildId(_) => "build-id",
        DebugSource::DebugLink(_) => "debuglink",
        DebugSource::Debuginfod(_) => "debuginfod",
        _ => "none",
    };
    format!("{kind}:{path}")
}

/// The FNV-1a hash of `values`' little-endian bytes.
fn fnv(values: &[u64]) -> u64 {
    crate::fnv(values.iter().flat_map(|v| v.to_le_bytes()))
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::sync::Arc;

    use super::BuildState;
    use crate::{Options, Symbolizer};

    #[test]
    fn binaries_in_use_or_being_indexed_are_not_released() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/fixtures/cpp_chain_nofp");
        assert!(path.exists(), "fixtures missing: run `make -C fixtures` (scripts/test.sh does)");
        let mut s = Symbolizer::new(Options { cache_dir: None, debuginfod: None, ..Options::default() });
        // Indexed in the background.
        s.lazy_dwarf = 0;
        let bin = s.binary(&path).unwrap();
        assert!(!bin.has_index());
        assert_eq!(s.release_unused(), 0);
        // Held by a batch.
        assert_eq!(s.release_unused(), 0);
        let id = bin.id;
        // Being indexed.
        *bin.index.state.lock().unwrap() = BuildState::Running;
        drop(bin);
        assert_eq!(s.release_unused(), 0);
        let bin = s.binaries.lock().unwrap().values().next().unwrap().clone();
        *bin.index.state.lock().unwrap() = BuildState::NotStarted;
        let slot = Arc::clone(&bin.index);
        drop(bin);
        assert_eq!(s.release_unused(), 1);
        assert!(slot.cancel.load(std::sync::atomic::Ordering::Relaxed), "dropped, not cancelled");
        assert_ne!(s.binary(&path).unwrap().id, id, "not opened again");
    }
}
