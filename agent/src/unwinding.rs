//! Unwind tables for the kernel walker: compiled per mapped file (shared by every process
//! that maps it), packed into the walker's shared arrays, and each process's executable
//! mappings pointed at them.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use anyhow::Context as _;
use aya::maps::{Array, HashMap as BpfHashMap, IterableMap as _, MapData};
use aya::{Ebpf, EbpfLoader};
use object::{Object, ObjectSegment};
use unwound_stackwalk_abi::{
    MappingEntry, ProcMappings, RuleCacheSlot, TableInfo, CHUNKS_MAP, CHUNK_ENTRIES, MAX_MAPPINGS,
    MAX_TABLES, NO_TABLE, PAGES_MAP, PROCS_MAP, RULES_MAP, RULE_CACHE_SLOTS, TABLES_MAP,
};
use unwound_symbolize::{Mapping, ProcessMaps};
use unwound_unwind_tables::cache::{CacheOutcome, TableCache};
use unwound_unwind_tables::{compile_elf, UnwindTable};

/// Writes `values` to slots `first..` of an array map: one `BPF_MAP_UPDATE_BATCH` call for
/// all of them (a table has hundreds of pages and records: a syscall each was most of the
/// cost of loading one), or one update per slot where the kernel has no batch updates.
fn write_array<V: aya::Pod>(map: &mut Array<MapData, V>, first: u32, values: &[V]) -> anyhow::Result<()> {
    use std::os::fd::{AsFd as _, AsRawFd as _};
    const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
    if values.is_empty() {
        return Ok(());
    }
    let keys: Vec<u32> = (0..values.len() as u32).map(|i| first + i).collect();
    /// `union bpf_attr`'s `batch` member.
    #[repr(C)]
    struct BatchAttr {
        in_batch: u64,
        out_batch: u64,
        keys: u64,
        values: u64,
        count: u32,
        map_fd: u32,
        elem_flags: u64,
        flags: u64,
    }
    let mut attr = BatchAttr {
        in_batch: 0,
        out_batch: 0,
        keys: keys.as_ptr() as u64,
        values: values.as_ptr() as u64,
        count: values.len() as u32,
        map_fd: map.map().fd().as_fd().as_raw_fd() as u32,
        elem_flags: 0,
        flags: 0,
    };
    // SAFETY: `keys` and `values` hold `count` keys and values of the map's sizes (u32 keys,
    // values of the map's value type, contiguous) and outlive the call; the kernel reads
    // them and writes only `attr.count`.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_UPDATE_BATCH,
            &mut attr as *mut BatchAttr,
            std::mem::size_of::<BatchAttr>() as libc::c_uint,
        )
    };
    if r == 0 {
        return Ok(());
    }
    let err = std::io::Error::last_os_error();
    match err.raw_os_error() {
        // No batch updates in this kernel (524: the kernel's own ENOTSUPP): slot by slot.
        Some(libc::EINVAL | libc::EOPNOTSUPP | libc::ENOSYS | 524) => {
            for (k, v) in keys.iter().zip(values) {
                map.set(*k, *v, 0)?;
            }
            Ok(())
        }
        _ => Err(anyhow::Error::new(err).context("cannot write unwind tables into the walker's maps")),
    }
}

/// A compiled table and where its segments put file offsets.
struct Compiled {
    /// What it is shared under: the file's build-id, else its device, inode and path.
    key: String,
    table: UnwindTable,
    /// (file offset, file size, vaddr, executable) of each load segment.
    segments: Vec<(u64, u64, u64, bool)>,
}

impl Compiled {
    /// The bias of an executable mapping of `[offset, offset + len)`: the executable
    /// segment it maps decides (a page-aligned mapping may begin inside the preceding
    /// read-only segment, whose vaddr − offset differs).
    fn bias(&self, start: u64, offset: u64, len: u64) -> Option<u64> {
        let seg = self
            .segments
            .iter()
            .find(|(o, s, _, x)| *x && *o < offset + len && offset < o + s)
            .or_else(|| self.segments.iter().find(|(o, s, _, _)| offset >= *o && offset - o < *s))?;
        let (o, _, v, _) = *seg;
        // pc = start + (file_offset − offset); vaddr = file_offset − o + v.
        Some(start.wrapping_sub(offset).wrapping_add(o).wrapping_sub(v))
    }
}

type FileKey = (String, u64, String);

/// Counts for the summary.
#[derive(Default, Debug, Clone)]
pub struct TableStats {
    /// Tables uploaded (a table evicted and uploaded again counts twice).
    pub tables: u64,
    pub processes: u64,
    pub compile_failures: u64,
    /// Tables read from the on-disk cache instead of compiled.
    pub cache_hits: u64,
    /// Files whose table another file with the same build-id already had.
    pub shared_by_build_id: u64,
    /// Tables that could not be uploaded: larger than the whole budget, or nothing left to
    /// evict.
    pub full: u64,
    /// Tables evicted to make room (least recently sampled first).
    pub evicted: u64,
    /// Bytes of the tables resident now.
    pub bytes: u64,
    /// Peak of `bytes`.
    pub peak_bytes: u64,
    /// Kernel memory of the table maps (what `--table-memory` bounds).
    pub map_bytes: u64,
    /// Kernel memory of the walker's per-CPU rule cache (fixed: slots × CPUs).
    pub rule_cache_bytes: u64,
}

/// Tables compiled before the walker is loaded, to size its arrays.
pub struct TablePlan {
    files: HashMap<FileKey, Option<Arc<Compiled>>>,
    /// Each process's maps, parsed and as read (the agent compares the text to notice
    /// changes).
    procs: Vec<(u32, ProcessMaps, String)>,
    compiler: Compiler,
    pub stats: TableStats,
}

fn file_key(m: &Mapping) -> FileKey {
    let path = m.path.as_ref().map(|p| p.to_string_lossy().into_owned()).unwrap_or_default();
    if m.inode == 0 {
        (String::new(), 0, path)
    } else {
        (m.device.clone(), m.inode, String::new())
    }
}

/// Compiles tables, once per build-id: the same file under another inode (a container's
/// copy of a library) shares the first one's table.
#[derive(Default)]
struct Compiler {
    cache: Option<TableCache>,
    by_id: HashMap<String, Arc<Compiled>>,
}

impl Compiler {
    /// A mapping's table; a file that should have one and does not is counted.
    fn compile(&mut self, pid: u32, m: &Mapping, stats: &mut TableStats) -> Option<Arc<Compiled>> {
        let c = self.compile_mapping(pid, m, stats);
        if c.is_none() && !m.is_pseudo() {
            stats.compile_failures += 1;
        }
        c
    }

    fn compile_mapping(&mut self, pid: u32, m: &Mapping, stats: &mut TableStats) -> Option<Arc<Compiled>> {
        let bytes: Vec<u8>;
        let map;
        let data: &[u8] = if m.path.as_deref() == Some(Path::new("[vdso]")) {
            let f = std::fs::File::open(format!("/proc/{pid}/mem")).ok()?;
            let mut b = vec![0u8; (m.end - m.start).min(1 << 20) as usize];
            f.read_exact_at(&mut b, m.start).ok()?;
            bytes = b;
            &bytes
        } else if m.is_pseudo() {
            return None;
        } else {
            let f = std::fs::File::open(format!("/proc/{pid}/map_files/{}", m.map_files_name())).ok()?;
            // SAFETY: read-only private map of a file that is mapped by the process anyway.
            map = unsafe { memmap2::Mmap::map(&f) }.ok()?;
            &map
        };
        let file = object::File::parse(data).ok()?;
        let build_id = file
            .build_id()
            .ok()
            .flatten()
            .map(|id| id.iter().map(|b| format!("{b:02x}")).collect::<String>());
        if let Some(c) = build_id.as_ref().and_then(|id| self.by_id.get(id)) {
            stats.shared_by_build_id += 1;
            return Some(c.clone());
        }
        let table = match &self.cache {
            Some(c) => {
                let (table, outcome) = c.get_or_compile_elf(data).ok()?;
                stats.cache_hits += u64::from(outcome == CacheOutcome::Hit);
                table
            }
            None => compile_elf(data).ok()?,
        };
        let segments = file
            .segments()
            .map(|s| {
                let (o, sz) = s.file_range();
                let exec =
                    matches!(s.flags(), object::SegmentFlags::Elf { p_flags } if p_flags & object::elf::PF_X != 0);
                (o, sz, s.address(), exec)
            })
            .filter(|s| s.1 > 0)
            .collect();
        let (dev, ino, path) = file_key(m);
        let key = build_id.clone().unwrap_or_else(|| format!("{dev}:{ino}:{path}"));
        let c = Arc::new(Compiled { key, table, segments });
        if let Some(id) = build_id {
            self.by_id.insert(id, c.clone());
        }
        Some(c)
    }
}

impl TablePlan {
    /// Compiles the tables of every executable mapping of `pids` (or reads them from
    /// `cache`, keyed by build-id).
    pub fn new(pids: &[u32], cache: Option<TableCache>) -> Self {
        let mut plan = TablePlan {
            files: HashMap::new(),
            procs: Vec::new(),
            compiler: Compiler { cache, by_id: HashMap::new() },
            stats: TableStats::default(),
        };
        for &pid in pids {
            let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/maps")) else { continue };
            let maps = ProcessMaps::parse(&text);
            for m in maps.iter().filter(|m| m.executable && m.path.is_some()) {
                if let std::collections::hash_map::Entry::Vacant(v) = plan.files.entry(file_key(m)) {
                    v.insert(plan.compiler.compile(pid, m, &mut plan.stats));
                }
            }
            plan.procs.push((pid, maps, text));
        }
        plan
    }

    /// The maps text of every planned process, by pid.
    pub fn maps_texts(&self) -> HashMap<u32, String> {
        self.procs.iter().map(|(pid, _, text)| (*pid, text.clone())).collect()
    }

    /// Sizes the walker's table arrays: what the plan needs plus room for tables compiled
    /// while recording (new processes, libraries loaded later), at most `budget` bytes in
    /// all. Tables beyond the budget evict the least recently sampled ones.
    pub fn size_loader(&self, loader: &mut EbpfLoader<'_>, headroom_mib: u64, budget: u64) {
        let (mut pages, mut chunks, mut rules) = (0u64, 0u64, 0u64);
        for c in self.files.values().flatten() {
            pages += c.table.pages().len() as u64;
            chunks += (c.table.entries().len() as u64).div_ceil(CHUNK_ENTRIES as u64);
            rules += c.table.rules().len() as u64;
        }
        // Headroom split like the tables of a typical process: 5% pages, 80% chunks, 15%
        // rule records (16 bytes each in the kernel) by bytes.
        let split = |bytes: u64| {
            (bytes * 5 / 100 / 8, bytes * 80 / 100 / (CHUNK_ENTRIES as u64 * 4), bytes * 15 / 100 / 16)
        };
        let extra = split(headroom_mib << 20);
        let (mut pages, mut chunks, mut rules) =
            (pages + extra.0 + 1, chunks + extra.1 + 1, rules + extra.2 + 1);
        if array_bytes(pages, chunks, rules) > budget {
            (pages, chunks, rules) = split(budget);
            (pages, chunks, rules) = (pages.max(1), chunks.max(1), rules.max(1));
        }
        loader.map_max_entries(PAGES_MAP, pages.min(u64::from(u32::MAX)) as u32);
        loader.map_max_entries(CHUNKS_MAP, chunks.min(u64::from(u32::MAX)) as u32);
        loader.map_max_entries(RULES_MAP, rules.min(u64::from(u32::MAX)) as u32);
    }
}

/// Bytes of the three shared table arrays with these many values.
fn array_bytes(pages: u64, chunks: u64, rules: u64) -> u64 {
    // A rule record is 12 bytes; the kernel stores array values 8-aligned, so 16.
    pages * 8 + chunks * CHUNK_ENTRIES as u64 * 4 + rules * 16
}

/// The free runs of one shared array: first fit, neighbours merged when a run is freed.
#[derive(Debug)]
struct Extents {
    /// start → length.
    free: BTreeMap<u32, u32>,
}

impl Extents {
    fn new(cap: u32) -> Self {
        let mut free = BTreeMap::new();
        if cap > 0 {
            free.insert(0, cap);
        }
        Extents { free }
    }

    /// The start of `n` free values, now taken.
    fn take(&mut self, n: u32) -> Option<u32> {
        if n == 0 {
            return Some(0);
        }
        let (&start, &len) = self.free.iter().find(|(_, &len)| len >= n)?;
        self.free.remove(&start);
        if len > n {
            self.free.insert(start + n, len - n);
        }
        Some(start)
    }

    fn give_back(&mut self, start: u32, n: u32) {
        if n == 0 {
            return;
        }
        let (mut s, mut len) = (start, n);
        if let Some((&ps, &pl)) = self.free.range(..start).next_back() {
            if ps + pl == start {
                self.free.remove(&ps);
                (s, len) = (ps, len + pl);
            }
        }
        if let Some(nl) = self.free.remove(&(start + n)) {
            len += nl;
        }
        self.free.insert(s, len);
    }
}

/// A table in the shared arrays.
struct Resident {
    key: String,
    info: TableInfo,
    chunks: u32,
    rules: u32,
    bytes: u64,
    /// Processes whose mappings point at it.
    users: HashSet<u32>,
    /// Sample tick when it was last used by a process that has since gone.
    last: u64,
}

/// A process as the walker sees it.
struct Proc {
    entries: Vec<MappingEntry>,
    /// Some of its mappings lost their table to eviction.
    evicted: bool,
}

/// Loaded tables and the maps they live in. Tables are shared by every process that maps
/// the same file; when the arrays are full, the tables least recently sampled make room
/// (those of exited processes first), and processes that lost one get it back when their
/// samples show it missing.
pub struct TableLoader {
    /// Resident tables by [`Compiled::key`].
    files: HashMap<String, u32>,
    compiled: HashMap<FileKey, Option<Arc<Compiled>>>,
    compiler: Compiler,
    resident: HashMap<u32, Resident>,
    free_ids: Vec<u32>,
    next_id: u32,
    tables: Array<MapData, TableInfo>,
    pages: Array<MapData, [u8; 8]>,
    chunks: Array<MapData, [u32; CHUNK_ENTRIES]>,
    rules: Array<MapData, [u8; 12]>,
    procs: BpfHashMap<MapData, u32, ProcMappings>,
    pages_free: Extents,
    chunks_free: Extents,
    rules_free: Extents,
    walked: HashMap<u32, Proc>,
    /// Sample counter, and the tick of each process's last sample.
    tick: u64,
    sampled: HashMap<u32, u64>,
    /// Last generation written to a process entry.
    generation: u32,
    pub stats: TableStats,
}

impl TableLoader {
    /// Takes the table maps out of the loaded object and uploads the plan.
    pub fn new(ebpf: &mut Ebpf, plan: TablePlan) -> anyhow::Result<Self> {
        let take = |ebpf: &mut Ebpf, name: &str| {
            ebpf.take_map(name).with_context(|| format!("BPF object has no {name} map"))
        };
        let tables: Array<MapData, TableInfo> = Array::try_from(take(ebpf, TABLES_MAP)?)?;
        let pages: Array<MapData, [u8; 8]> = Array::try_from(take(ebpf, PAGES_MAP)?)?;
        let chunks: Array<MapData, [u32; CHUNK_ENTRIES]> = Array::try_from(take(ebpf, CHUNKS_MAP)?)?;
        let rules: Array<MapData, [u8; 12]> = Array::try_from(take(ebpf, RULES_MAP)?)?;
        let procs: BpfHashMap<MapData, u32, ProcMappings> = BpfHashMap::try_from(take(ebpf, PROCS_MAP)?)?;
        let cap = (pages.len(), chunks.len(), rules.len());
        let mut loader = TableLoader {
            files: HashMap::new(),
            compiled: plan.files,
            compiler: plan.compiler,
            resident: HashMap::new(),
            free_ids: Vec::new(),
            next_id: 0,
            tables,
            pages,
            chunks,
            rules,
            procs,
            pages_free: Extents::new(cap.0),
            chunks_free: Extents::new(cap.1),
            rules_free: Extents::new(cap.2),
            walked: HashMap::new(),
            tick: 0,
            sampled: HashMap::new(),
            generation: 0,
            stats: plan.stats,
        };
        loader.stats.map_bytes =
            array_bytes(u64::from(cap.0), u64::from(cap.1), u64::from(cap.2)) + u64::from(MAX_TABLES) * 24;
        // The walker's per-CPU rule cache: fixed, outside the table budget.
        let cpus = aya::util::nr_cpus().map_or(1, |n| n as u64);
        loader.stats.rule_cache_bytes =
            cpus * u64::from(RULE_CACHE_SLOTS) * std::mem::size_of::<RuleCacheSlot>() as u64;
        for (pid, maps, _) in plan.procs {
            loader.add_process(pid, &maps)?;
        }
        Ok(loader)
    }

    /// A sample of `pid` arrived: its tables are in use.
    pub fn sampled(&mut self, pid: u32) {
        self.tick += 1;
        self.sampled.insert(pid, self.tick);
    }

    /// Whether some of `pid`'s mappings lost their table to eviction.
    pub fn lost_tables(&self, pid: u32) -> bool {
        self.walked.get(&pid).is_some_and(|p| p.evicted)
    }

    /// Points `pid`'s mappings at their tables (compiling and uploading new ones).
    pub fn add_process(&mut self, pid: u32, maps: &ProcessMaps) -> anyhow::Result<()> {
        self.release(pid);
        // Its tables are the ones to keep while the process is being set up.
        self.sampled(pid);
        let mut entries: Vec<MappingEntry> = Vec::new();
        let mut evicted = false;
        for m in maps.iter().filter(|m| m.executable && m.path.is_some()) {
            let key = file_key(m);
            let compiled = match self.compiled.get(&key) {
                Some(c) => c.clone(),
                None => {
                    let c = self.compiler.compile(pid, m, &mut self.stats);
                    self.compiled.insert(key.clone(), c.clone());
                    c
                }
            };
            let mut entry = MappingEntry { start: m.start, end: m.end, bias: 0, table: NO_TABLE, flags: 0 };
            if let Some(c) = compiled {
                let id = match self.files.get(&c.key) {
                    Some(&id) => Some(id),
                    None => self.upload(&c.key, &c.table, pid)?,
                };
                let offset = if m.path.as_deref() == Some(Path::new("[vdso]")) { 0 } else { m.offset };
                match (id, c.bias(m.start, offset, m.end - m.start)) {
                    (Some(id), Some(bias)) => {
                        entry.table = id;
                        entry.bias = bias;
                        if let Some(r) = self.resident.get_mut(&id) {
                            r.users.insert(pid);
                        }
                    }
                    (None, _) => evicted = true,
                    _ => {}
                }
            }
            entries.push(entry);
        }
        entries.sort_by_key(|e| e.start);
        entries.truncate(MAX_MAPPINGS);
        self.write_process(pid, &entries)?;
        self.walked.insert(pid, Proc { entries, evicted });
        self.stats.processes += 1;
        Ok(())
    }

    /// A generation no process entry has had (the walker's cached rules of an entry are
    /// keyed by its generation, so each write makes them stale).
    fn next_generation(&mut self) -> u32 {
        self.generation = self.generation.wrapping_add(1).max(1);
        self.generation
    }

    fn write_process(&mut self, pid: u32, entries: &[MappingEntry]) -> anyhow::Result<()> {
        let mut value = ProcMappings {
            count: entries.len() as u32,
            generation: self.next_generation(),
            mappings: [MappingEntry::default(); MAX_MAPPINGS],
        };
        value.mappings[..entries.len()].copy_from_slice(entries);
        self.procs.insert(pid, value, 0).context("cannot add a process to the walker")
    }

    /// Forgets a process that exited; its tables stay until the room is needed.
    pub fn remove_process(&mut self, pid: u32) {
        let _ = self.procs.remove(&pid);
        self.release(pid);
        self.walked.remove(&pid);
        self.sampled.remove(&pid);
    }

    fn release(&mut self, pid: u32) {
        let last = self.sampled.get(&pid).copied().unwrap_or(0);
        for r in self.resident.values_mut() {
            if r.users.remove(&pid) {
                r.last = r.last.max(last);
            }
        }
    }

    /// When a table was last used: the latest sample of a process using it.
    fn last_use(&self, r: &Resident) -> u64 {
        r.users.iter().map(|p| self.sampled.get(p).copied().unwrap_or(0)).max().unwrap_or(0).max(r.last)
    }

    /// Evicts the least recently used table that `keep` does not use; false when there is
    /// none.
    fn evict_one(&mut self, keep: u32) -> anyhow::Result<bool> {
        let victim = self
            .resident
            .iter()
            .filter(|(_, r)| !r.users.contains(&keep))
            .min_by_key(|(id, r)| (self.last_use(r), **id))
            .map(|(id, _)| *id);
        let Some(id) = victim else { return Ok(false) };
        let r = self.resident.remove(&id).expect("resident");
        // Processes stop pointing at it before its room is reused.
        for pid in &r.users {
            if let Some(p) = self.walked.get_mut(pid) {
                for e in p.entries.iter_mut().filter(|e| e.table == id) {
                    e.table = NO_TABLE;
                    e.bias = 0;
                }
                p.evicted = true;
                let entries = p.entries.clone();
                self.write_process(*pid, &entries)?;
            }
        }
        self.files.remove(&r.key);
        self.pages_free.give_back(r.info.page_start, r.info.pages);
        self.chunks_free.give_back(r.info.chunk_start, r.chunks);
        self.rules_free.give_back(r.info.rule_start, r.rules);
        self.free_ids.push(id);
        self.stats.evicted += 1;
        self.stats.bytes -= r.bytes;
        Ok(true)
    }

    /// Room for a table in the three arrays and an id, evicting as needed.
    fn make_room(
        &mut self,
        npages: u32,
        nchunks: u32,
        nrules: u32,
        keep: u32,
    ) -> anyhow::Result<Option<(u32, u32, u32, u32)>> {
        loop {
            let id = self.free_ids.last().copied().or((self.next_id < MAX_TABLES).then_some(self.next_id));
            if let Some(id) = id {
                if let Some(p) = self.pages_free.take(npages) {
                    if let Some(c) = self.chunks_free.take(nchunks) {
                        if let Some(r) = self.rules_free.take(nrules) {
                            if self.free_ids.last() == Some(&id) {
                                self.free_ids.pop();
                            } else {
                                self.next_id += 1;
                            }
                            return Ok(Some((id, p, c, r)));
                        }
                        self.chunks_free.give_back(c, nchunks);
                    }
                    self.pages_free.give_back(p, npages);
                }
            }
            if !self.evict_one(keep)? {
                return Ok(None);
            }
        }
    }

    /// Copies a table into the shared arrays; `None` when it cannot fit (counted).
    fn upload(&mut self, key: &str, t: &UnwindTable, for_pid: u32) -> anyhow::Result<Option<u32>> {
        let npages = t.pages().len() as u32;
        let nchunks = (t.entries().len() as u32).div_ceil(CHUNK_ENTRIES as u32);
        let nrules = t.rules().len() as u32;
        let Some((id, page_start, chunk_start, rule_start)) =
            self.make_room(npages, nchunks, nrules, for_pid)?
        else {
            self.stats.full += 1;
            return Ok(None);
        };
        let info = TableInfo { base: t.base(), pages: npages, page_start, chunk_start, rule_start };
        let pages: Vec<[u8; 8]> = t
            .pages()
            .iter()
            .map(|p| {
                let mut v = [0u8; 8];
                v[..4].copy_from_slice(&p.first.to_le_bytes());
                v[4..6].copy_from_slice(&p.count.to_le_bytes());
                v[6..].copy_from_slice(&p.start_rule.to_le_bytes());
                v
            })
            .collect();
        write_array(&mut self.pages, info.page_start, &pages)?;
        drop(pages);
        let chunks: Vec<[u32; CHUNK_ENTRIES]> = t
            .entries()
            .chunks()
            .iter()
            .map(|chunk| {
                let mut v = [0u32; CHUNK_ENTRIES];
                v[..chunk.len()].copy_from_slice(chunk);
                v
            })
            .collect();
        write_array(&mut self.chunks, info.chunk_start, &chunks)?;
        drop(chunks);
        let rules: Vec<[u8; 12]> = t
            .dictionary()
            .map(|d| {
                let mut v = [0u8; 12];
                v[0] = d.rule.cfa;
                v[1] = d.rule.rbp;
                v[2] = d.rule.rbp_slot as u8;
                v[3] = d.rule.aux as u8;
                v[4..8].copy_from_slice(&d.rule.cfa_offset.to_le_bytes());
                v[8..].copy_from_slice(&d.run.0.to_le_bytes());
                v
            })
            .collect();
        write_array(&mut self.rules, info.rule_start, &rules)?;
        self.tables.set(id, info, 0)?;
        let bytes = t.byte_size() as u64;
        self.resident.insert(
            id,
            Resident {
                key: key.to_string(),
                info,
                chunks: nchunks,
                rules: nrules,
                bytes,
                users: HashSet::new(),
                last: self.tick,
            },
        );
        self.files.insert(key.to_string(), id);
        self.stats.tables += 1;
        self.stats.bytes += bytes;
        self.stats.peak_bytes = self.stats.peak_bytes.max(self.stats.bytes);
        Ok(Some(id))
    }
}

#[cfg(test)]
mod tests {
    use super::Extents;

    #[test]
    fn extents_take_first_fit_and_merge_what_is_given_back() {
        let mut e = Extents::new(10);
        assert_eq!(e.take(4), Some(0));
        assert_eq!(e.take(4), Some(4));
        assert_eq!(e.take(4), None, "only 2 left");
        e.give_back(0, 4);
        assert_eq!(e.take(3), Some(0), "first fit");
        e.give_back(4, 4);
        e.give_back(0, 3);
        // 0..3, 3..4, 4..8 and 8..10 are free again: one run.
        assert_eq!(e.free.len(), 1, "{:?}", e.free);
        assert_eq!(e.take(10), Some(0));
        assert_eq!(e.take(0), Some(0), "empty runs always fit");
    }
}
