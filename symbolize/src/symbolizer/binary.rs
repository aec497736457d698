//! Opening a binary: its index read from the on-disk cache, or built from DWARF (the
//! file's own, a separate debug file, a debuginfod download) and then cached.

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

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

/// One opened binary: its index directory and blocks, and its symbol tables (read when
/// DWARF has no answer).
pub(super) struct Binary {
    pub(super) id: u64,
    /// `/proc/self/fd/N` of `_elf_file`: the file stays readable for lazy symbol loading
    /// even after the process it came from exited or the path was replaced.
    elf_path: PathBuf,
    _elf_file: File,
    /// A block failed to load (damaged cache file): no more loads from this index.
    pub(super) failed: AtomicBool,
    pub(super) debug: DebugSource,
    dir: Vec<DirEntry>,
    store: Store,
    pub(super) cache_path: Option<PathBuf>,
    segments: LoadSegments,
    symbols: OnceLock<Option<ElfSymbols>>,
    /// The functions `.eh_frame` delimits, read when no symbol covers an address.
    bounds: OnceLock<FunctionBounds>,
}

impl Binary {
    pub(super) fn symbols(&self) -> Option<&ElfSymbols> {
        self.symbols.get_or_init(|| symbols_for(&self.elf_path, &self.debug)).as_ref()
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

    pub(super) fn block_of(&self, addr: u64) -> Option<usize> {
        let i = self.dir.partition_point(|d| d.span.start <= addr).checked_sub(1)?;
        (addr < self.dir[i].span.end).then_some(i)
    }

    pub(super) fn load(&self, i: usize) -> Result<Lookup, cache::Corrupt> {
        let block = match &self.store {
            Store::Disk(f) => cache::read_block(f, &self.dir[i])?,
            Store::Memory(p) => cache::unpack(&p[i].bytes, p[i].raw_len, p[i].crc)?,
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
        if let Some(b) = self.binaries.lock().expect("binaries lock").get(&fid) {
            return Ok(b.clone());
        }
        let bin = Arc::new(self.open(path, &fid)?);
        Ok(self.binaries.lock().expect("binaries lock").entry(fid).or_insert(bin).clone())
    }

    fn open(&self, path: &Path, fid: &FileId) -> Result<Binary, Error> {
        let io = |source| Error::Io { path: path.to_path_buf(), source };
        if fid.size > MAX_ELF_SIZE {
            return Err(Error::TooLarge { path: path.to_path_buf(), size: fid.size });
        }
        let file = File::open(path).map_err(io)?;
        // SAFETY: read-only private map; see `ElfSymbols::open`.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io)?;
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
            elf_path,
            _elf_file: kept,
            failed: AtomicBool::new(false),
            debug: DebugSource::None,
            dir: Vec::new(),
            store: Store::Memory(Vec::new()),
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
                        bin.dir = dir;
                        bin.debug = debug;
                        bin.store = Store::Disk(f);
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
        let (debug, blocks, symbols) = self.build(path, &obj, map.len())?;
        if let Some(symbols) = symbols {
            let _ = bin.symbols.set(symbols);
        }
        self.stats.lock().expect("stats lock").indexes_built += 1;
        let packed: Vec<Packed> = blocks.par_iter().map(cache::pack).collect();
        bin.debug = debug;
        bin.dir = dir_of(&packed);
        // "No debuginfo" is not cached: a debug package installed later must be found.
        let cacheable = bin.debug != DebugSource::None;
        if let Some(cp) = cache_path.as_ref().filter(|_| cacheable) {
            if cache::write_file(cp, &source_meta(&bin.debug), &packed).is_ok() {
                // Indexes of older versions of this layout are never read again.
                if let Some(dir) = cp.parent() {
                    for v in 1..cache::VERSION {
                        let _ = std::fs::remove_file(dir.join(format!("{key}.v{v}.symidx")));
                    }
                }
                if let Ok(f) = File::open(cp) {
                    if let Ok((dir, _)) = read_cached(&f) {
                        if dir.len() == packed.len() {
                            bin.dir = dir;
                            bin.store = Store::Disk(f);
                            return Ok(bin);
                        }
                    }
                }
            }
        }
        bin.store = Store::Memory(packed);
        Ok(bin)
    }

    /// Finds the DWARF for `obj` and indexes it.
    fn build(&self, path: &Path, obj: &object::File<'_>, len: usize) -> Result<Built, Error> {
        let text = dwarf::text_ranges(obj);
        let dwarf_err = |p: &Path, source: DwarfError| Error::Dwarf { path: p.to_path_buf(), source };
        if debuginfo::has_dwarf(obj) {
            let sections = dwarf::Sections::load(obj, dwarf::budget(len)).map_err(|e| dwarf_err(path, e))?;
            let symbols = symbols_for(path, &DebugSource::Embedded);
            let mut raw =
                dwarf::read(&sections, None, &text, symbols.as_ref()).map_err(|e| dwarf_err(path, e))?;
            return Ok((DebugSource::Embedded, index::build_blocks(&mut raw), Some(symbols)));
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
        let Some(source) = source else { return Ok((DebugSource::None, Vec::new(), None)) };
        let dpath = source.path().expect("separate sources have a path").to_path_buf();
        let io = |source| Error::Io { path: dpath.clone(), source };
        let dfile = File::open(&dpath).map_err(io)?;
        // SAFETY: read-only private map; see `ElfSymbols::open`.
        let dmap = unsafe { memmap2::Mmap::map(&dfile) }.map_err(io)?;
        let dobj =
            object::File::parse(&*dmap).map_err(|source| Error::Elf { path: dpath.clone(), source })?;
        let sections =
            dwarf::Sections::load(&dobj, dwarf::budget(dmap.len())).map_err(|e| dwarf_err(&dpath, e))?;
        let sup_path = debuginfo::find_supplementary(&dobj, &dpath, &self.options.debug_dirs);
        let sup_map = match &sup_path {
            Some(p) => File::open(p).ok().and_then(|f| unsafe { memmap2::Mmap::map(&f) }.ok()),
            None => None,
        };
        let sup_obj = sup_map.as_ref().and_then(|m| object::File::parse(&**m).ok());
        let sup_sections = match &sup_obj {
            Some(o) => Some(
                dwarf::Sections::load(o, dwarf::budget(sup_map.as_ref().map_or(0, |m| m.len())))
                    .map_err(|e| dwarf_err(&dpath, e))?,
            ),
            None => None,
        };
        let text = if text.is_empty() { dwarf::text_ranges(&dobj) } else { text };
        let symbols = symbols_for(path, &source);
        let mut raw = dwarf::read(&sections, sup_sections.as_ref(), &text, symbols.as_ref())
            .map_err(|e| dwarf_err(&dpath, e))?;
        Ok((source, index::build_blocks(&mut raw), Some(symbols)))
    }
}

/// A built index: where the DWARF came from, its blocks, and the symbol tables read for it
/// (`None` when none were read).
type Built = (DebugSource, Vec<Block>, Option<Option<ElfSymbols>>);

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
