//! The [`Symbolizer`]: addresses in, frames with function, file, line and inline chain out.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use object::Object;
use rayon::prelude::*;

use crate::cache::{self, DirEntry, Packed};
use crate::debuginfo::{self, DebugSource, Debuginfod};
use crate::dwarf;
use crate::index::{self, Block, Lookup};
use crate::name::Name;
use crate::{ElfSymbols, Error, Mapping, ProcessMaps, MAX_ELF_SIZE};

/// Largest MiniDebugInfo (`.gnu_debugdata`) accepted, decompressed.
pub const MAX_MINI_DEBUGINFO: u64 = 512 << 20;
/// Most DWARF bytes accepted from one file, all sections together, uncompressed (and never
/// more than 64 times the file's size plus 64 MiB).
pub const MAX_DWARF_SECTION: u64 = 4 << 30;

/// How a [`Symbolizer`] finds debugging information and how much memory it may keep.
#[derive(Clone, Debug)]
pub struct Options {
    /// Where compiled indexes are stored (zstd-compressed, one file per build-id); `None`
    /// keeps them in memory only (still compressed).
    pub cache_dir: Option<PathBuf>,
    /// Most bytes of decompressed index blocks kept in memory across all binaries; the
    /// least recently used blocks are dropped beyond it and read back when needed. Names in
    /// answers share their block's strings: answers kept by the caller keep those strings
    /// (not the rest of the block) alive beyond the budget.
    pub memory_budget: usize,
    /// Directories searched for separate debug files (`.build-id/xx/yyyy.debug`, debuglink).
    pub debug_dirs: Vec<PathBuf>,
    /// A debuginfod client, tried when no local debug file is found.
    pub debuginfod: Option<Debuginfod>,
}

/// The default cache directory: `$XDG_CACHE_HOME/unwound` or `~/.cache/unwound`.
pub fn default_cache_dir() -> Option<PathBuf> {
    std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME").filter(|v| !v.is_empty()).map(|h| PathBuf::from(h).join(".cache"))
        })
        .map(|d| d.join("unwound"))
}

impl Default for Options {
    /// Cache under [`default_cache_dir`]`/symbols`, 512 MiB budget, `/usr/lib/debug`, and
    /// debuginfod from `DEBUGINFOD_URLS`.
    fn default() -> Self {
        let cache = default_cache_dir();
        Options {
            cache_dir: cache.as_ref().map(|d| d.join("symbols")),
            memory_budget: 512 << 20,
            debug_dirs: vec![PathBuf::from("/usr/lib/debug")],
            debuginfod: cache.and_then(|d| Debuginfod::from_env(d.join("debuginfod"))),
        }
    }
}

/// One frame of a symbolized address.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Frame {
    /// Demangled function name; `None` when neither DWARF nor a symbol table names it.
    pub function: Option<Name>,
    /// Source file path, as the compiler recorded it (joined with its directory).
    pub file: Option<Name>,
    /// Source line; 0 when unknown.
    pub line: u32,
    /// The line table's discriminator (0 when none), for the innermost frame only.
    pub discriminator: u32,
}

/// Everything known about one address: frames innermost first (the inlined callee, then
/// its callers, ending with the function the code belongs to). Never empty.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Symbolized {
    /// Innermost first.
    pub frames: Vec<Frame>,
}

impl Symbolized {
    /// The text binutils `addr2line -f -i -C` prints for this address (with `-a` when
    /// `with_address`): per frame the function (or `??`) and `file:line` (`??` for no file,
    /// `?` for line 0, the innermost line's discriminator repeated on every frame, as
    /// binutils does).
    ///
    /// ```
    /// use unwound_symbolize::{Frame, Name, Symbolized};
    /// let s = Symbolized { frames: vec![Frame { function: Some(Name::from("main")),
    ///     file: Some(Name::from("/src/a.c")), line: 4, discriminator: 0 }] };
    /// assert_eq!(s.addr2line_text(0x1150, true), "0x0000000000001150\nmain\n/src/a.c:4\n");
    /// ```
    pub fn addr2line_text(&self, addr: u64, with_address: bool) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        if with_address {
            let _ = writeln!(out, "0x{addr:016x}");
        }
        let discriminator = self.frames.first().map_or(0, |f| f.discriminator);
        for f in &self.frames {
            let _ = writeln!(out, "{}", f.function.as_deref().unwrap_or("??"));
            let _ = write!(out, "{}:", f.file.as_deref().unwrap_or("??"));
            let _ = if f.line == 0 { write!(out, "?") } else { write!(out, "{}", f.line) };
            if discriminator != 0 {
                let _ = write!(out, " (discriminator {discriminator})");
            }
            out.push('\n');
        }
        out
    }
}

/// The `addr2line -f -i -C` text for any result: a miss prints `??` and `??:0`.
pub fn addr2line_text(addr: u64, r: &Resolution, with_address: bool) -> String {
    match r {
        Ok(s) => s.addr2line_text(addr, with_address),
        Err(_) if with_address => format!("0x{addr:016x}\n??\n??:0\n"),
        Err(_) => "??\n??:0\n".to_string(),
    }
}

/// Why an address could not be symbolized.
#[derive(Clone, Debug, PartialEq, Eq, Hash, thiserror::Error)]
#[non_exhaustive]
pub enum Miss {
    /// No mapping of the process holds the address.
    #[error("address not mapped")]
    NotMapped,
    /// Anonymous executable memory (JIT code) with no `/tmp/perf-PID.map` entry.
    #[error("anonymous memory with no perf map entry")]
    Anonymous,
    /// The address is not inside any loadable segment of the file.
    #[error("address outside the file's segments")]
    OutsideSegments,
    /// The binary could not be read or parsed.
    #[error("{0}")]
    Unreadable(String),
    /// Neither DWARF nor the symbol tables cover the address.
    #[error("no symbol covers the address")]
    NoSymbol,
}

/// One answer per input address.
pub type Resolution = Result<Symbolized, Miss>;

/// Counts, for reports.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Indexes built from DWARF.
    pub indexes_built: u64,
    /// Indexes opened from the on-disk cache.
    pub cache_hits: u64,
    /// Cache files found corrupt, truncated or of an old version (and rebuilt).
    pub cache_rebuilt: u64,
    /// Blocks decompressed.
    pub blocks_loaded: u64,
    /// Blocks dropped to stay within the memory budget.
    pub blocks_evicted: u64,
    /// Bytes of decompressed blocks in memory now.
    pub resident_bytes: u64,
    /// debuginfod requests that failed (connection, timeout, server error); after the first,
    /// this symbolizer asks the servers no more.
    pub debuginfod_errors: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct FileId {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: i64,
    mtime_ns: i64,
}

enum Store {
    Disk(File),
    Memory(Vec<Packed>),
}

struct Binary {
    id: u64,
    /// `/proc/self/fd/N` of `_elf_file`: the file stays readable for lazy symbol loading
    /// even after the process it came from exited or the path was replaced.
    elf_path: PathBuf,
    _elf_file: File,
    /// A block failed to load (damaged cache file): no more loads from this index.
    failed: std::sync::atomic::AtomicBool,
    debug: DebugSource,
    dir: Vec<DirEntry>,
    store: Store,
    cache_path: Option<PathBuf>,
    segments: crate::LoadSegments,
    symbols: OnceLock<Option<ElfSymbols>>,
}

impl Binary {
    fn symbols(&self) -> Option<&ElfSymbols> {
        self.symbols.get_or_init(|| symbols_for(&self.elf_path, &self.debug)).as_ref()
    }

    fn block_of(&self, addr: u64) -> Option<usize> {
        let i = self.dir.partition_point(|d| d.span.start <= addr).checked_sub(1)?;
        (addr < self.dir[i].span.end).then_some(i)
    }

    fn load(&self, i: usize) -> Result<Lookup, cache::Corrupt> {
        let block = match &self.store {
            Store::Disk(f) => cache::read_block(f, &self.dir[i])?,
            Store::Memory(p) => cache::unpack(&p[i].bytes, p[i].raw_len, p[i].crc)?,
        };
        Ok(Lookup::new(&block))
    }

    fn file_offset_to_vaddr(&self, off: u64) -> Option<u64> {
        self.segments.file_offset_to_vaddr(off)
    }
}

struct Lru {
    blocks: lru::LruCache<(u64, u32), Arc<Lookup>>,
    bytes: usize,
}

/// Symbolizes addresses of ELF files and processes. `Send + Sync`: share one across
/// threads; batches run on rayon's pool, one task per binary.
///
/// ```no_run
/// use unwound_symbolize::{Options, Symbolizer};
///
/// let s = Symbolizer::new(Options::default());
/// for r in s.symbolize_elf("/usr/bin/ls", &[0x4a10]).unwrap() {
///     match r {
///         Ok(sym) => {
///             for f in &sym.frames {
///                 println!("{} {}:{}", f.function.as_deref().unwrap_or("??"),
///                          f.file.as_deref().unwrap_or("??"), f.line);
///             }
///         }
///         Err(miss) => println!("?? ({miss})"),
///     }
/// }
/// ```
pub struct Symbolizer {
    options: Options,
    binaries: Mutex<HashMap<FileId, Arc<Binary>>>,
    /// One build at a time per cache key (two paths to one build-id build once).
    building: Mutex<HashMap<String, Arc<Mutex<()>>>>,
    lru: Mutex<Lru>,
    next_id: AtomicU64,
    stats: Mutex<Stats>,
    /// A debuginfod request failed: the servers are down or unreachable, and each further
    /// request would wait out the timeout again.
    debuginfod_down: std::sync::atomic::AtomicBool,
}

impl Symbolizer {
    /// A symbolizer with the given options. Nothing is read until the first lookup.
    pub fn new(options: Options) -> Self {
        Symbolizer {
            options,
            binaries: Mutex::new(HashMap::new()),
            building: Mutex::new(HashMap::new()),
            lru: Mutex::new(Lru { blocks: lru::LruCache::unbounded(), bytes: 0 }),
            next_id: AtomicU64::new(1),
            stats: Mutex::new(Stats::default()),
            debuginfod_down: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Counters so far.
    pub fn stats(&self) -> Stats {
        let mut s = *self.stats.lock().expect("stats lock");
        s.resident_bytes = self.lru.lock().expect("lru lock").bytes as u64;
        s
    }

    /// Where the DWARF of the ELF file at `path` comes from (reads and indexes it if needed).
    pub fn debug_source(&self, path: impl AsRef<Path>) -> Result<DebugSource, Error> {
        Ok(self.binary(path.as_ref())?.debug.clone())
    }

    /// Symbolizes file virtual addresses of the ELF file at `path`: one result per address,
    /// in input order. An error is returned only when the file itself cannot be used.
    pub fn symbolize_elf(&self, path: impl AsRef<Path>, addrs: &[u64]) -> Result<Vec<Resolution>, Error> {
        let bin = self.binary(path.as_ref())?;
        Ok(self.run(&bin, addrs))
    }

    /// Symbolizes absolute addresses of process `pid`. Binaries are opened through
    /// `/proc/PID/map_files` (deleted or replaced files, other mount namespaces), falling
    /// back to `/proc/PID/root`; JIT code through `/tmp/perf-PID.map`.
    pub fn symbolize_pid(&self, pid: u32, addrs: &[u64]) -> Result<Vec<Resolution>, Error> {
        let maps = ProcessMaps::read(pid)?;
        let mut out: Vec<Option<Resolution>> = vec![None; addrs.len()];
        // Group by mapping.
        let mut groups: HashMap<u64, (&Mapping, Vec<usize>)> = HashMap::new();
        for (i, &a) in addrs.iter().enumerate() {
            match maps.find(a) {
                Some(m) => groups.entry(m.start).or_insert_with(|| (m, Vec::new())).1.push(i),
                None => out[i] = Some(Err(Miss::NotMapped)),
            }
        }
        let mut perf_map: Option<Vec<(u64, u64, Name)>> = None;
        let groups: Vec<(&Mapping, Vec<usize>)> = groups.into_values().collect();
        let results: Vec<Vec<(usize, Resolution)>> = groups
            .par_iter()
            .map(|(m, idx)| self.symbolize_mapping(pid, m, idx.iter().map(|&i| (i, addrs[i])).collect()))
            .collect();
        for (i, r) in results.into_iter().flatten() {
            out[i] = Some(r);
        }
        // Anonymous memory: perf map.
        for (i, r) in out.iter_mut().enumerate() {
            if matches!(r, Some(Err(Miss::Anonymous))) {
                let map = perf_map.get_or_insert_with(|| read_perf_map(pid));
                let a = addrs[i];
                let j = map.partition_point(|e| e.0 <= a);
                if let Some(e) = j.checked_sub(1).map(|j| &map[j]).filter(|e| a < e.0.saturating_add(e.1)) {
                    *r = Some(Ok(Symbolized {
                        frames: vec![Frame {
                            function: Some(e.2.clone()),
                            file: None,
                            line: 0,
                            discriminator: 0,
                        }],
                    }));
                }
            }
        }
        Ok(out.into_iter().map(|r| r.unwrap_or(Err(Miss::NotMapped))).collect())
    }

    fn symbolize_mapping(&self, pid: u32, m: &Mapping, addrs: Vec<(usize, u64)>) -> Vec<(usize, Resolution)> {
        let fail = |miss: Miss| addrs.iter().map(|&(i, _)| (i, Err(miss.clone()))).collect();
        let Some(path) = &m.path else { return fail(Miss::Anonymous) };
        if m.is_pseudo() {
            return fail(Miss::Unreadable(format!("{} is not a file", path.display())));
        }
        let via_map_files = PathBuf::from(format!("/proc/{pid}/map_files/{}", m.map_files_name()));
        let bin = match self.binary(&via_map_files) {
            Ok(b) => b,
            Err(_) => {
                let plain = path.to_string_lossy();
                let plain = plain.strip_suffix(" (deleted)").unwrap_or(&plain);
                let via_root = PathBuf::from(format!("/proc/{pid}/root{plain}"));
                // Without map_files (no CAP_SYS_ADMIN) the path may name a newer file than
                // the one mapped (an upgrade): its offsets would give wrong names.
                if std::fs::metadata(&via_root).is_ok_and(|md| m.inode != 0 && md.ino() != m.inode) {
                    return fail(Miss::Unreadable(format!(
                        "{} was replaced since it was mapped (and /proc/{pid}/map_files needs CAP_SYS_ADMIN)",
                        path.display()
                    )));
                }
                match self.binary(&via_root) {
                    Ok(b) => b,
                    Err(e) => return fail(Miss::Unreadable(e.to_string())),
                }
            }
        };
        let mut vaddrs = Vec::with_capacity(addrs.len());
        let mut out = Vec::with_capacity(addrs.len());
        let mut keep = Vec::with_capacity(addrs.len());
        for &(i, a) in &addrs {
            match bin.file_offset_to_vaddr(m.file_offset(a)) {
                Some(v) => {
                    vaddrs.push(v);
                    keep.push(i);
                }
                None => out.push((i, Err(Miss::OutsideSegments))),
            }
        }
        out.extend(keep.into_iter().zip(self.run(&bin, &vaddrs)));
        out
    }

    /// Looks up sorted, deduplicated addresses and hands the answers back in input order.
    fn run(&self, bin: &Arc<Binary>, addrs: &[u64]) -> Vec<Resolution> {
        let mut order: Vec<(u64, u32)> = addrs.iter().enumerate().map(|(i, &a)| (a, i as u32)).collect();
        order.sort_unstable();
        let n = order.len();
        let mut out: Vec<Option<Resolution>> = vec![None; n];
        // A pipeline over the sorted batch: an address's block is loaded and its search keys
        // fetched `KEYS_AHEAD` places before its lookup, its region found and fetched
        // `REGION_AHEAD` places before, its chain of frames `CHAIN_AHEAD` places before; the
        // lookups then wait on memory side by side instead of in turn. `window` holds the
        // blocks of the addresses in flight (few: the batch is sorted).
        const KEYS_AHEAD: usize = 12;
        const REGION_AHEAD: usize = 6;
        const CHAIN_AHEAD: usize = 2;
        let mut block_at: Vec<Option<usize>> = vec![None; n];
        let mut region_at: Vec<Option<usize>> = vec![None; n];
        let mut window: Window = Default::default();
        for step in 0..n + KEYS_AHEAD {
            if let Some(&(a, _)) = order.get(step) {
                let bi = bin.block_of(a);
                block_at[step] = bi;
                if let Some(bi) = bi {
                    if window.back().is_none_or(|w| w.0 != bi) {
                        window.push_back((bi, self.block(bin, bi)));
                    }
                    if let Some(b) = &window.back().expect("pushed").1 {
                        b.prefetch_keys(a);
                    }
                }
            }
            if let Some(j) = (step + REGION_AHEAD).checked_sub(KEYS_AHEAD).filter(|&j| j < n) {
                if let Some(b) = find(&window, block_at[j]) {
                    region_at[j] = b.region_index(order[j].0);
                    if let Some(r) = region_at[j] {
                        b.prefetch_region(r);
                    }
                }
            }
            if let Some(j) = (step + CHAIN_AHEAD).checked_sub(KEYS_AHEAD).filter(|&j| j < n) {
                if let (Some(b), Some(r)) = (find(&window, block_at[j]), region_at[j]) {
                    b.prefetch_chain(r);
                }
            }
            let Some(k) = step.checked_sub(KEYS_AHEAD) else { continue };
            // Blocks of addresses already answered leave the window.
            if let Some(bi) = block_at[k] {
                while window.len() > 1 && window.front().is_some_and(|w| w.0 < bi) {
                    window.pop_front();
                }
            }
            let (a, i) = order[k];
            let i = i as usize;
            if k > 0 && order[k - 1].0 == a {
                // A repeat copies the answer.
                out[i] = out[order[k - 1].1 as usize].clone();
                continue;
            }
            out[i] = Some(self.lookup(bin, a, find(&window, block_at[k]), region_at[k]));
        }
        out.into_iter().map(|r| r.expect("every address answered")).collect()
    }

    /// The answer for `addr`, in `block` (loaded) and `region` when a batch found it ahead.
    fn lookup(
        &self,
        bin: &Arc<Binary>,
        addr: u64,
        block: Option<&Lookup>,
        region: Option<usize>,
    ) -> Resolution {
        let mut frames: Vec<Frame> = Vec::new();
        let mut found_fn = false;
        if let Some(b) = block {
            found_fn =
                region.or_else(|| b.region_index(addr)).is_some_and(|r| b.lookup_region(r, &mut frames));
        }
        if !found_fn {
            // Not in a DWARF function: the symbol table names it (assembly, stripped DWARF).
            let sym = bin.symbols().and_then(|s| s.lookup(addr));
            let name = sym.as_ref().map(|s| Name::from(s.name));
            let sym_file = sym.as_ref().and_then(|s| s.file).map(Name::from);
            match (frames.first_mut(), name) {
                (Some(f), name) if name.is_some() || f.file.is_some() => {
                    f.function = name;
                    if f.file.is_none() {
                        f.file = sym_file;
                    }
                }
                (None, Some(name)) => {
                    frames.push(Frame { function: Some(name), file: sym_file, line: 0, discriminator: 0 })
                }
                _ => return Err(Miss::NoSymbol),
            }
        }
        Ok(Symbolized { frames })
    }

    fn block(&self, bin: &Arc<Binary>, i: usize) -> Option<Arc<Lookup>> {
        if bin.failed.load(Ordering::Relaxed) {
            return None;
        }
        let key = (bin.id, i as u32);
        if let Some(b) = self.lru.lock().expect("lru lock").blocks.get(&key) {
            return Some(b.clone());
        }
        let block = match bin.load(i) {
            Ok(b) => Arc::new(b),
            Err(_) => {
                // A cache file damaged after it was opened: forget it so the next open
                // rebuilds it; this lookup falls back to the symbol table.
                if bin.failed.swap(true, Ordering::Relaxed) {
                    return None;
                }
                if let Some(p) = &bin.cache_path {
                    let _ = std::fs::remove_file(p);
                }
                self.binaries.lock().expect("binaries lock").retain(|_, b| b.id != bin.id);
                self.stats.lock().expect("stats lock").cache_rebuilt += 1;
                return None;
            }
        };
        let size = block.heap_bytes();
        let mut evicted = 0;
        {
            let mut lru = self.lru.lock().expect("lru lock");
            if lru.blocks.put(key, block.clone()).is_none() {
                lru.bytes += size;
            }
            while lru.bytes > self.options.memory_budget && lru.blocks.len() > 1 {
                match lru.blocks.pop_lru() {
                    Some((_, b)) => {
                        lru.bytes = lru.bytes.saturating_sub(b.heap_bytes());
                        evicted += 1;
                    }
                    None => break,
                }
            }
        }
        let mut st = self.stats.lock().expect("stats lock");
        st.blocks_loaded += 1;
        st.blocks_evicted += evicted;
        Some(block)
    }

    fn binary(&self, path: &Path) -> Result<Arc<Binary>, Error> {
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
        let elf_err = |reason: String| Error::Elf { path: path.to_path_buf(), reason };
        if fid.size > MAX_ELF_SIZE {
            return Err(Error::TooLarge { path: path.to_path_buf(), size: fid.size });
        }
        let file = File::open(path).map_err(io)?;
        // SAFETY: read-only private map; see `ElfSymbols::open`.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io)?;
        let obj = object::File::parse(&*map).map_err(|e| elf_err(e.to_string()))?;
        if obj.format() != object::BinaryFormat::Elf {
            return Err(elf_err("not ELF".into()));
        }
        let segments = crate::LoadSegments::of(&obj);
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
            failed: std::sync::atomic::AtomicBool::new(false),
            debug: DebugSource::None,
            dir: Vec::new(),
            store: Store::Memory(Vec::new()),
            cache_path: cache_path.clone(),
            segments,
            symbols: OnceLock::new(),
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
        let (debug, blocks) = self.build(path, &obj, map.len())?;
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
    fn build(
        &self,
        path: &Path,
        obj: &object::File<'_>,
        len: usize,
    ) -> Result<(DebugSource, Vec<Block>), Error> {
        let text = dwarf::text_ranges(obj);
        let dwarf_err = |p: &Path, e: dwarf::DwarfError| Error::Elf { path: p.to_path_buf(), reason: e.0 };
        if debuginfo::has_dwarf(obj) {
            let sections = dwarf::Sections::load(obj, dwarf::budget(len)).map_err(|e| dwarf_err(path, e))?;
            let mut raw = dwarf::read(&sections, None, &text).map_err(|e| dwarf_err(path, e))?;
            return Ok((DebugSource::Embedded, index::build_blocks(&mut raw)));
        }
        let mut source = debuginfo::find_separate(obj, path, &self.options.debug_dirs);
        if source.is_none() {
            let down = self.debuginfod_down.load(Ordering::Relaxed);
            if let (Some(d), Some(id), false) =
                (&self.options.debuginfod, obj.build_id().ok().flatten(), down)
            {
                match d.fetch(id) {
                    Ok(p) => source = Some(DebugSource::Debuginfod(p)),
                    Err(debuginfo::DebuginfodError::Request { .. }) => {
                        self.debuginfod_down.store(true, Ordering::Relaxed);
                        self.stats.lock().expect("stats lock").debuginfod_errors += 1;
                    }
                    // Not found, too large, the wrong file: an answer about this file only.
                    Err(_) => {}
                }
            }
        }
        let Some(source) = source else { return Ok((DebugSource::None, Vec::new())) };
        let dpath = source.path().expect("separate sources have a path").to_path_buf();
        let io = |source| Error::Io { path: dpath.clone(), source };
        let dfile = File::open(&dpath).map_err(io)?;
        // SAFETY: read-only private map; see `ElfSymbols::open`.
        let dmap = unsafe { memmap2::Mmap::map(&dfile) }.map_err(io)?;
        let dobj = object::File::parse(&*dmap)
            .map_err(|e| Error::Elf { path: dpath.clone(), reason: e.to_string() })?;
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
        let mut raw =
            dwarf::read(&sections, sup_sections.as_ref(), &text).map_err(|e| dwarf_err(&dpath, e))?;
        Ok((source, index::build_blocks(&mut raw)))
    }
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

fn fnv(values: &[u64]) -> u64 {
    crate::fnv(values.iter().flat_map(|v| v.to_le_bytes()))
}

/// Largest perf map read.
const MAX_PERF_MAP: u64 = 64 << 20;

/// `/tmp/perf-PID.map` as the process sees it (its root, its own pid number): `START SIZE
/// NAME` lines, hex, sorted by start. Only a regular file, at most [`MAX_PERF_MAP`] bytes,
/// opened without blocking (a FIFO planted there cannot hang us).
fn read_perf_map(pid: u32) -> Vec<(u64, u64, Name)> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let ns_pid = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("NSpid:"))
                .and_then(|v| v.split_whitespace().last()?.parse::<u32>().ok())
        })
        .unwrap_or(pid);
    let path = format!("/proc/{pid}/root/tmp/perf-{ns_pid}.map");
    let Ok(f) = std::fs::OpenOptions::new().read(true).custom_flags(libc_o_nonblock()).open(&path) else {
        return Vec::new();
    };
    if !f.metadata().is_ok_and(|m| m.is_file()) {
        return Vec::new();
    }
    let mut text = String::new();
    if f.take(MAX_PERF_MAP).read_to_string(&mut text).is_err() {
        return Vec::new();
    }
    let mut v: Vec<(u64, u64, Name)> = text
        .lines()
        .filter_map(|l| {
            let mut it = l.splitn(3, ' ');
            let start = u64::from_str_radix(it.next()?.trim_start_matches("0x"), 16).ok()?;
            let size = u64::from_str_radix(it.next()?.trim_start_matches("0x"), 16).ok()?;
            Some((start, size, Name::from(it.next()?.trim())))
        })
        .collect();
    v.sort_by_key(|e| e.0);
    v
}

/// `O_NONBLOCK` on Linux (all architectures this crate targets).
const fn libc_o_nonblock() -> i32 {
    0o4000
}

/// Blocks of the addresses a batch has in flight, by block number, in address order.
type Window = std::collections::VecDeque<(usize, Option<Arc<Lookup>>)>;

/// The loaded block `bi` of the window.
fn find(window: &Window, bi: Option<usize>) -> Option<&Lookup> {
    let bi = bi?;
    window.iter().find(|w| w.0 == bi).and_then(|w| w.1.as_deref())
}
