//! Unwind tables for the kernel walker: compiled per mapped file (shared by every process
//! that maps it), packed into the walker's shared arrays, and each process's executable
//! mappings pointed at them.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::error::{Context as _, Error, Result};
use aya::maps::{Array, ArrayOfMaps, HashMap as BpfHashMap, IterableMap as _, MapData};
use aya::{Ebpf, EbpfLoader};
use object::Object;
use unwound_stackwalk_abi::{
    FileKey as KernelFileKey, FileTable, MappingEntry, ProcMappings, RecordFile, RuleCacheSlot, TableInfo,
    CHUNKS_MAP, CHUNK_ENTRIES, CHUNK_SEGMENT, FILES_MAP, MAPPING_PY_TRAMPOLINES, MAX_FILES, MAX_MAPPINGS,
    MAX_TABLES, NO_TABLE, PAGES_MAP, PAGE_SEGMENT, PROCS_MAP, PY_TRAMPOLINE_CODE, RULES_MAP,
    RULE_CACHE_SLOTS, RULE_SEGMENT, TABLES_MAP,
};
use unwound_symbolize::{
    build_id_hex, FileIdentity, FileStamp, LoadSegments, MappedObject, Mapping, ObjectBytes, ObjectInfo,
    ProcessMaps,
};
use unwound_unwind_tables::cache::{CacheOutcome, TableCache};
use unwound_unwind_tables::{compile_elf, UnwindTable};

/// Writes `values` to slots `first..` of an array map: one `BPF_MAP_UPDATE_BATCH` call for
/// all of them (a table has hundreds of pages and records: a syscall each was most of the
/// cost of loading one), or one update per slot where the kernel has no batch updates.
fn write_array<V: aya::Pod>(map: &mut Array<MapData, V>, first: u32, values: &[V]) -> Result<()> {
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
        _ => Err(Error::Io { what: "cannot write unwind tables into the walker's maps".into(), source: err }),
    }
}

/// A compiled table and where its segments put file offsets. The table itself is kept
/// only until it is uploaded (the kernel's copy is the one used; a userspace copy of every
/// resident table would double their memory): uploading it again, after an eviction,
/// reads it from the table cache or compiles it again.
struct Compiled {
    /// What it is shared under: the file's build-id, else its identity.
    key: String,
    table: std::sync::Mutex<Option<UnwindTable>>,
    segments: LoadSegments,
}

impl Compiled {
    /// The table, if not handed out yet.
    fn take_table(&self) -> Option<UnwindTable> {
        self.table.lock().map_or(None, |mut t| t.take())
    }

    /// Keeps a table that could not be uploaded (no room) for the next try, rather than
    /// reading it again for each process that maps the file.
    fn put_back(&self, table: UnwindTable) {
        if let Ok(mut t) = self.table.lock() {
            *t = Some(table);
        }
    }
}

/// Files (identity and stamp) whose table description is remembered: beyond this many,
/// those of tables not resident are forgotten (and read again if a process maps them).
const MAX_REMEMBERED: usize = 4096;

/// A listed file that no sample has walked through for this long, and whose table no
/// process the walker has read uses, is unlisted (its descriptor closed); the kernel announces it again
/// if a process maps it later.
const FILE_IDLE: Duration = Duration::from_secs(60);
/// A resident table that no process uses and no listed file points at is freed after
/// this long: an agent on a machine that keeps starting new programs holds the tables of
/// the ones still in use, not of every program ever run.
const TABLE_IDLE: Duration = Duration::from_secs(60);
/// How often [`TableLoader::expire`] looks.
const EXPIRE_EVERY: Duration = Duration::from_secs(10);

/// A mapped file as the table cache knows it: its identity and its stamp when the table
/// was compiled, so that a file rewritten in place, or a new file given a freed inode
/// number, is compiled anew rather than walked with the old file's table.
type FileKey = (FileIdentity, Option<FileStamp>);

/// What the walker's table loader did (see [`Walker::table_stats`](crate::Walker::table_stats)).
#[derive(Default, Debug, Clone)]
#[non_exhaustive]
pub struct TableStats {
    /// Tables uploaded (a table evicted and uploaded again counts twice).
    pub tables: u64,
    /// Processes whose mappings were pointed at tables.
    pub processes: u64,
    /// Mapped files that should have had a table and did not compile (unreadable, not
    /// ELF, no `.eh_frame`).
    pub compile_failures: u64,
    /// Tables read from the on-disk cache instead of compiled.
    pub cache_hits: u64,
    /// Files whose table another file with the same build-id already had.
    pub shared_by_build_id: u64,
    /// Tables that could not be uploaded: larger than the whole budget, or nothing left to
    /// evict.
    pub full: u64,
    /// Tables the kernel would not take: creating or writing a segment failed.
    pub refused: u64,
    /// Tables evicted to make room (least recently sampled first).
    pub evicted: u64,
    /// Bytes of the tables resident now.
    pub bytes: u64,
    /// Peak of `bytes`.
    pub peak_bytes: u64,
    /// Kernel memory of the table maps now: the segments held, the outer arrays and the
    /// table directory (`--table-memory` bounds the first two).
    pub map_bytes: u64,
    /// Peak of `map_bytes`.
    pub peak_map_bytes: u64,
    /// Segments of the table arrays created while recording.
    pub segments_created: u64,
    /// Segments dropped (their last table evicted).
    pub segments_dropped: u64,
    /// Kernel memory of the walker's per-CPU rule cache (fixed: slots × CPUs).
    pub rule_cache_bytes: u64,
    /// Files listed for the kernel's view of processes (identified, held open, with their
    /// table if they have one).
    pub files_listed: u64,
    /// Files the kernel announced that were found and identified.
    pub files_resolved: u64,
    /// Files the kernel announced that could not be found by any path (the process gone
    /// and the file not where its name says), or whose path held another file.
    pub files_unresolved: u64,
    /// Files not listed because the list was full.
    pub files_full: u64,
    /// Files unlisted after going unused (see [`Walker::prune_exited`](crate::Walker::prune_exited)).
    pub files_unlisted: u64,
    /// Tables freed after no process had used them for a while (not for room: those are
    /// `evicted`).
    pub expired: u64,
    /// Files listed now.
    pub files_held: u64,
    /// Table cache files found damaged (truncated, corrupt, garbage) and rebuilt.
    pub cache_rebuilt: u64,
}

impl TableStats {
    /// Every counter with its name in unwound's JSON summary, for tools that export them.
    pub fn named(&self) -> [(&'static str, u64); 23] {
        [
            ("table_cache_rebuilt", self.cache_rebuilt),
            ("files_unlisted", self.files_unlisted),
            ("files_held", self.files_held),
            ("tables_expired", self.expired),
            ("files_listed", self.files_listed),
            ("files_resolved", self.files_resolved),
            ("files_unresolved", self.files_unresolved),
            ("files_full", self.files_full),
            ("tables", self.tables),
            ("table_processes", self.processes),
            ("table_bytes", self.bytes),
            ("table_peak_bytes", self.peak_bytes),
            ("table_map_bytes", self.map_bytes),
            ("table_map_peak_bytes", self.peak_map_bytes),
            ("table_segments_created", self.segments_created),
            ("table_segments_dropped", self.segments_dropped),
            ("rule_cache_bytes", self.rule_cache_bytes),
            ("table_compile_failures", self.compile_failures),
            ("tables_full", self.full),
            ("tables_refused", self.refused),
            ("tables_evicted", self.evicted),
            ("table_cache_hits", self.cache_hits),
            ("table_build_id_shares", self.shared_by_build_id),
        ]
    }
}

impl std::fmt::Display for TableStats {
    /// One line: what was uploaded, the memory it holds, and what was left out, by reason.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} uploaded for {} processes ({} from the cache, {} damaged cache files rebuilt, {} files shared by build-id), {} KiB resident (peak {} KiB) in {} KiB of BPF maps (peak {} KiB; segments created {}, dropped {}; + {} KiB of per-CPU rule cache); evicted {}, did not fit {}, refused by the kernel {}, could not compile {}; unused for a minute: {} tables freed, {} files closed ({} held)",
            self.tables,
            self.processes,
            self.cache_hits,
            self.cache_rebuilt,
            self.shared_by_build_id,
            self.bytes / 1024,
            self.peak_bytes / 1024,
            self.map_bytes / 1024,
            self.peak_map_bytes / 1024,
            self.segments_created,
            self.segments_dropped,
            self.rule_cache_bytes / 1024,
            self.evicted,
            self.full,
            self.refused,
            self.compile_failures,
            self.expired,
            self.files_unlisted,
            self.files_held
        )
    }
}

/// Tables compiled before the walker is loaded, to size its arrays.
pub(crate) struct TablePlan {
    files: HashMap<FileKey, Option<Arc<Compiled>>>,
    /// Each process's maps, parsed and as read (the agent compares the text to notice
    /// changes).
    procs: Vec<(u32, ProcessMaps, String, u64)>,
    compiler: Compiler,
    pub stats: TableStats,
}

fn file_key(pid: u32, m: &Mapping) -> Option<FileKey> {
    Some((FileIdentity::of(m)?, FileStamp::of_mapping(pid, m)))
}

/// Whether anonymous executable mapping `m` of `pid` starts with CPython's perf
/// trampolines (`python -X perf`): the walker then steps them with their fixed rule, as
/// they keep no frame pointer (see `MAPPING_PY_TRAMPOLINES`). Two copies back to back, so
/// a single look-alike is not enough.
fn holds_py_trampolines(pid: u32, m: &Mapping) -> bool {
    use std::os::unix::fs::FileExt as _;
    let n = PY_TRAMPOLINE_CODE.len();
    if m.end.saturating_sub(m.start) < 2 * n as u64 {
        return false;
    }
    let mut code = [0u8; 22];
    std::fs::File::open(format!("/proc/{pid}/mem"))
        .and_then(|f| f.read_exact_at(&mut code, m.start))
        .is_ok_and(|()| code[..n] == PY_TRAMPOLINE_CODE && code[n..] == PY_TRAMPOLINE_CODE)
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
        let object = MappedObject::open(pid, m).ok()?;
        self.compile_object(&object, stats)
    }

    /// The table of an opened object.
    fn compile_object(&mut self, object: &MappedObject, stats: &mut TableStats) -> Option<Arc<Compiled>> {
        let data = object.bytes().ok()?;
        let file = object::File::parse(&*data).ok()?;
        let build_id = file.build_id().ok().flatten().map(build_id_hex);
        if let Some(c) = build_id.as_ref().and_then(|id| self.by_id.get(id)) {
            stats.shared_by_build_id += 1;
            return Some(c.clone());
        }
        let table = self.table_of(&data, stats)?;
        let segments = LoadSegments::from_bytes(object.path(), &data).ok()?;
        let key = build_id.clone().unwrap_or_else(|| format!("{}@{:?}", object.identity(), object.stamp()));
        let c = Arc::new(Compiled { key, table: std::sync::Mutex::new(Some(table)), segments });
        if let Some(id) = build_id {
            self.by_id.insert(id, c.clone());
        }
        Some(c)
    }

    /// The table of an ELF file's bytes: from the cache, else compiled (and stored).
    fn table_of(&self, data: &[u8], stats: &mut TableStats) -> Option<UnwindTable> {
        match &self.cache {
            Some(c) => {
                let (table, outcome) = c.get_or_compile_elf(data).ok()?;
                stats.cache_hits += u64::from(outcome == CacheOutcome::Hit);
                stats.cache_rebuilt += u64::from(outcome == CacheOutcome::Rebuilt);
                Some(table)
            }
            None => compile_elf(data).ok(),
        }
    }

    /// `c`'s table once more, from `object` (the same file: `c` was found for its
    /// identity and stamp, or for its build-id), when the first copy was uploaded and
    /// then evicted or expired.
    fn table_again(
        &self,
        c: &Compiled,
        bytes: impl FnOnce() -> Option<ObjectBytes>,
        stats: &mut TableStats,
    ) -> Option<UnwindTable> {
        if let Some(t) = c.take_table() {
            return Some(t);
        }
        let data = bytes()?;
        self.table_of(&data, stats)
    }

    /// Forgets the descriptions of files whose tables are not resident (`resident`) once
    /// there are too many.
    fn forget_some(&mut self, resident: &HashMap<String, u32>) {
        if self.by_id.len() > MAX_REMEMBERED {
            self.by_id.retain(|_, c| resident.contains_key(&c.key));
        }
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
            let read_ns = monotonic_ns();
            let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/maps")) else { continue };
            let maps = ProcessMaps::parse(&text);
            for m in maps.iter().filter(|m| m.executable) {
                let Some(key) = file_key(pid, m) else { continue };
                if let std::collections::hash_map::Entry::Vacant(v) = plan.files.entry(key) {
                    v.insert(plan.compiler.compile(pid, m, &mut plan.stats));
                }
            }
            plan.procs.push((pid, maps, text, read_ns));
        }
        plan
    }

    /// The maps text of every planned process, by pid.
    pub fn maps_texts(&self) -> HashMap<u32, String> {
        self.procs.iter().map(|(pid, _, text, _)| (*pid, text.clone())).collect()
    }

    /// Sizes the walker's segmented table arrays for a memory budget of `budget` bytes:
    /// each outer array gets slots for the whole budget in its own segments (which of the
    /// three the tables need most varies), and the budget is enforced on the segments
    /// actually held (see [`TableLoader`]).
    pub fn size_loader(&self, loader: &mut EbpfLoader<'_>, budget: u64) {
        for (name, seg) in [
            (PAGES_MAP, PAGE_SEGMENT_BYTES),
            (CHUNKS_MAP, CHUNK_SEGMENT_BYTES),
            (RULES_MAP, RULE_SEGMENT_BYTES),
        ] {
            loader.map_max_entries(name, outer_slots(budget, seg));
        }
    }
}

/// Kernel bytes of one segment of each table array (values are stored 8-aligned).
const PAGE_SEGMENT_BYTES: u64 = PAGE_SEGMENT as u64 * 8;
const CHUNK_SEGMENT_BYTES: u64 = CHUNK_SEGMENT as u64 * CHUNK_ENTRIES as u64 * 4;
const RULE_SEGMENT_BYTES: u64 = RULE_SEGMENT as u64 * 16;

/// Slots of an outer array of `seg`-byte segments for a `budget`: enough for the budget
/// in this array alone, at least one, and few enough that every value index fits a u32
/// (8,192 page records a segment: fewer than 2^19 slots).
fn outer_slots(budget: u64, seg: u64) -> u32 {
    budget.div_ceil(seg).clamp(1, (1 << 19) - 1) as u32
}

/// `BPF_MAP_DELETE_ELEM` on an array of maps (aya 0.14's `ArrayOfMaps` has no removal):
/// the slot is emptied and the inner map freed once the walker no longer reads it.
fn clear_slot(outer: &MapData, slot: u32) -> std::io::Result<()> {
    use std::os::fd::{AsFd as _, AsRawFd as _};
    const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
    /// `union bpf_attr`'s element member.
    #[repr(C)]
    struct ElemAttr {
        map_fd: u32,
        pad: u32,
        key: u64,
        value: u64,
        flags: u64,
    }
    let attr = ElemAttr {
        map_fd: outer.fd().as_fd().as_raw_fd() as u32,
        pad: 0,
        key: &slot as *const u32 as u64,
        value: 0,
        flags: 0,
    };
    // SAFETY: `key` points at a u32 key (the outer array's key size) that outlives the
    // call; the kernel only reads the attribute and the key.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_DELETE_ELEM,
            &attr as *const ElemAttr,
            std::mem::size_of::<ElemAttr>() as libc::c_uint,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The segments of `seg` values that `[first, first + n)` touches: (slot, its first value
/// in the segment, how many of its values are in it).
fn segment_parts(seg: u32, first: u32, n: u32) -> impl Iterator<Item = (usize, u32, u32)> {
    let end = first.saturating_add(n);
    let slots = if n == 0 { 0..0 } else { first / seg..end.div_ceil(seg) };
    slots.map(move |s| {
        let (lo, hi) = ((s * seg).max(first), s.saturating_add(1).saturating_mul(seg).min(end));
        (s as usize, lo - s * seg, hi - lo)
    })
}

/// One of the walker's segmented table arrays: value `i` is value `i % seg` of the inner
/// array in slot `i / seg` of an array of maps. Runs of values are taken first-fit from
/// the whole index space; a segment is created when a run first lands in it and dropped
/// when its last run is freed, so the kernel holds only what the tables loaded need.
struct Segmented<V: aya::Pod> {
    /// The array of maps (always `Map::ArrayOfMaps`).
    outer: aya::maps::Map,
    /// Values per segment.
    seg: u32,
    /// Kernel bytes per segment.
    seg_bytes: u64,
    free: Extents,
    /// Values in use in each segment.
    used: Vec<u32>,
    /// The segment in each slot, kept open: reopening one by id
    /// (`BPF_MAP_GET_FD_BY_ID`) needs CAP_SYS_ADMIN, which CAP_BPF alone does not give.
    held: Vec<Option<Array<MapData, V>>>,
    /// Segments created and dropped (held: the difference).
    created: u64,
    dropped: u64,
    /// Tests: creating a segment fails, as under memory pressure.
    #[cfg(test)]
    refuse_new: bool,
    _values: std::marker::PhantomData<V>,
}

impl<V: aya::Pod> Segmented<V> {
    fn new(mut outer: aya::maps::Map, seg: u32, seg_bytes: u64) -> Result<Self> {
        let slots = ArrayOfMaps::<&mut MapData, Array<MapData, V>>::try_from(&mut outer)?.len();
        Ok(Segmented {
            outer,
            seg,
            seg_bytes,
            free: Extents::new(slots.saturating_mul(seg)),
            used: vec![0; slots as usize],
            held: (0..slots).map(|_| None).collect(),
            created: 0,
            dropped: 0,
            #[cfg(test)]
            refuse_new: false,
            _values: std::marker::PhantomData,
        })
    }

    /// Whether the kernel admits a segment into this array: one is created, put in slot 0
    /// and taken out again. What a kernel compares between a segment and the outer array's
    /// template differs from version to version (see the BPF program's `PAGES`), so this is
    /// asked once at load rather than found out table by table.
    fn probe(&mut self) -> Result<()> {
        #[cfg(test)]
        if self.refuse_new {
            return Err(Error::Injected);
        }
        let inner = Array::<MapData, V>::create(self.seg, 0).context("cannot create a segment")?;
        self.outer()?.set(0, &inner, 0).context("cannot add a segment to an array of maps")?;
        if let aya::maps::Map::ArrayOfMaps(data) = &self.outer {
            clear_slot(data, 0).context("cannot take a segment out of an array of maps")?;
        }
        Ok(())
    }

    fn outer(&mut self) -> Result<ArrayOfMaps<&mut MapData, Array<MapData, V>>> {
        Ok(ArrayOfMaps::try_from(&mut self.outer)?)
    }

    fn parts(&self, first: u32, n: u32) -> impl Iterator<Item = (usize, u32, u32)> {
        segment_parts(self.seg, first, n)
    }

    /// Kernel bytes that holding `[first, first + n)` would add (segments not held yet).
    fn growth(&self, first: u32, n: u32) -> u64 {
        self.parts(first, n).filter(|&(s, _, _)| self.held[s].is_none()).count() as u64 * self.seg_bytes
    }

    /// Writes `values` at `first..` (a run from `free`), creating the segments it needs.
    /// On an error nothing stays taken: the run is free again and a segment made for it
    /// is dropped.
    fn put(&mut self, first: u32, values: &[V]) -> Result<()> {
        let total = values.len() as u32;
        let parts: Vec<_> = self.parts(first, total).collect();
        let mut done = 0u32;
        for (s, local, n) in parts {
            if let Err(e) = self.put_part(s, local, &values[done as usize..(done + n) as usize]) {
                self.give_back(first, done);
                if self.used[s] == 0 {
                    self.drop_segment(s);
                }
                self.free.give_back(first + done, total - done);
                return Err(e);
            }
            done += n;
        }
        Ok(())
    }

    fn put_part(&mut self, s: usize, local: u32, values: &[V]) -> Result<()> {
        if self.held[s].is_none() {
            #[cfg(test)]
            if self.refuse_new {
                return Err(Error::Injected);
            }
            let inner = Array::<MapData, V>::create(self.seg, 0)
                .context("cannot create a segment of the walker's table maps")?;
            self.outer()?
                .set(s as u32, &inner, 0)
                .context("cannot add a segment to the walker's table maps")?;
            self.held[s] = Some(inner);
            self.created += 1;
        }
        let inner = self.held[s].as_mut().expect("segment held");
        write_array(inner, local, values)?;
        self.used[s] += values.len() as u32;
        Ok(())
    }

    /// Empties slot `s` (its segment is freed once the walker no longer reads it); a slot
    /// that cannot be emptied keeps its segment, held and counted.
    fn drop_segment(&mut self, s: usize) {
        if self.held[s].is_none() {
            return;
        }
        if let aya::maps::Map::ArrayOfMaps(data) = &self.outer {
            if clear_slot(data, s as u32).is_ok() {
                self.held[s] = None;
                self.dropped += 1;
            }
        }
    }

    /// Frees `[first, first + n)`, dropping the segments left empty.
    fn give_back(&mut self, first: u32, n: u32) {
        let parts: Vec<_> = self.parts(first, n).collect();
        for (s, _, k) in parts {
            self.used[s] = self.used[s].saturating_sub(k);
            if self.used[s] == 0 {
                self.drop_segment(s);
            }
        }
        self.free.give_back(first, n);
    }

    /// Undoes a run of a table that could not be uploaded: `Less`, written before the
    /// failure (freed with its segments); `Greater`, only reserved; `Equal`, the write
    /// that failed, which gave its run back itself.
    fn undo(&mut self, (first, n): (u32, u32), stage: std::cmp::Ordering) {
        match stage {
            std::cmp::Ordering::Less => self.give_back(first, n),
            std::cmp::Ordering::Greater => self.free.give_back(first, n),
            std::cmp::Ordering::Equal => {}
        }
    }

    /// Kernel bytes a run of `n` values needs at the least (its segments, and the outer
    /// array).
    fn least_bytes(&self, n: u32) -> u64 {
        u64::from(n.div_ceil(self.seg)) * self.seg_bytes + self.used.len() as u64 * 8
    }

    /// Kernel bytes of the segments held and the outer array.
    fn bytes(&self) -> u64 {
        (self.created - self.dropped) * self.seg_bytes + self.used.len() as u64 * 8
    }
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
    /// The files listed with it in the kernel's file list.
    listed: HashSet<KernelFileKey>,
    /// Since when no process has used it and no listed file pointed at it.
    idle_since: Option<Instant>,
}

/// A process as the walker sees it.
struct Proc {
    entries: Vec<MappingEntry>,
    /// Some of its mappings lost their table to eviction.
    evicted: bool,
    /// When its maps were read.
    read_ns: u64,
}

/// Loaded tables and the maps they live in. Tables are shared by every process that maps
/// the same file; when the arrays are full, the tables least recently sampled make room
/// (those of exited processes first), and processes that lost one get it back when their
/// samples show it missing.
pub(crate) struct TableLoader {
    /// Resident tables by [`Compiled::key`].
    files: HashMap<String, u32>,
    compiled: HashMap<FileKey, Option<Arc<Compiled>>>,
    compiler: Compiler,
    resident: HashMap<u32, Resident>,
    free_ids: Vec<u32>,
    next_id: u32,
    tables: Array<MapData, TableInfo>,
    pages: Segmented<[u8; 8]>,
    chunks: Segmented<[u32; CHUNK_ENTRIES]>,
    rules: Segmented<[u8; 12]>,
    /// Most bytes of segments and outer arrays (`--table-memory`).
    budget: u64,
    procs: BpfHashMap<MapData, u32, ProcMappings>,
    walked: HashMap<u32, Proc>,
    /// Sample counter, and the tick of each process's last sample.
    tick: u64,
    sampled: HashMap<u32, u64>,
    /// Last generation written to a process entry.
    generation: u32,
    pub stats: TableStats,
    /// Told once, taken by the walker.
    pub(crate) notices: Vec<crate::Notice>,
    /// The kernel's list of identified files ([`FILES_MAP`]).
    files_map: BpfHashMap<MapData, KernelFileKey, FileTable>,
    /// What is listed there: each file held open while listed, so that its inode number
    /// cannot be given to another file meanwhile.
    listed: HashMap<KernelFileKey, Listed>,
    /// Files listed since the walker last took them (it hands them to its user, who names
    /// frames in them).
    pub(crate) new_files: Vec<Arc<ObjectInfo>>,
    /// When [`TableLoader::expire`] last looked.
    last_expire: Instant,
}

/// A file in the kernel's list.
struct Listed {
    /// Kept to hold the file open (and the inode number taken) while listed.
    _object: Arc<ObjectInfo>,
    table: u32,
    /// Its [`FileTable::delta`].
    delta: u64,
    /// When a sample was last walked through it, or a process mapping it was added.
    used: Instant,
}

/// Whether a map operation failed because the key was not there (it is gone, as wanted).
fn is_absent(e: &aya::maps::MapError) -> bool {
    matches!(e, aya::maps::MapError::KeyNotFound)
        || matches!(e, aya::maps::MapError::SyscallError(s) if s.io_error.raw_os_error() == Some(libc::ENOENT))
}

/// A mapping's file as the kernel names it (device `major:minor` as `/proc/PID/maps`
/// prints it, in the kernel's `dev_t` encoding).
pub(crate) fn kernel_file_key(m: &Mapping) -> Option<KernelFileKey> {
    if m.inode == 0 || m.path.is_none() {
        return None;
    }
    let (major, minor) = m.device.split_once(':')?;
    let (major, minor) = (u32::from_str_radix(major, 16).ok()?, u32::from_str_radix(minor, 16).ok()?);
    Some(KernelFileKey { dev: (major << 20) | (minor & 0xf_ffff), pad: 0, ino: m.inode })
}

/// `CLOCK_MONOTONIC` now, in ns: the clock of `bpf_ktime_get_ns`.
pub(crate) fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: a valid timespec to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64).wrapping_mul(1_000_000_000).wrapping_add(ts.tv_nsec as u64)
}

/// The kernel's `dev_t` of a userspace `st_dev`.
fn kernel_dev(st_dev: u64) -> u32 {
    let (major, minor) = (libc::major(st_dev), libc::minor(st_dev));
    (major << 20) | (minor & 0xf_ffff)
}

/// Library directories searched for a file the kernel announced by name only, after the
/// directory of the program that mapped it.
const LIBRARY_DIRS: &[&str] = &[
    "/lib/x86_64-linux-gnu",
    "/usr/lib/x86_64-linux-gnu",
    "/lib64",
    "/usr/lib64",
    "/lib",
    "/usr/lib",
    "/usr/local/lib",
];

/// Opens the file the kernel announced (`f`, named `name`, mapped by `pid`, which ran
/// `exe`): through the process's `map_files` while it lives, else by path, and only if the
/// file opened is the one the kernel named (device and inode, checked on the open file).
pub(crate) fn open_announced(
    pid: u32,
    f: &RecordFile,
    name: &str,
    exe: Option<&Path>,
) -> Option<MappedObject> {
    use std::os::unix::fs::MetadataExt as _;
    let mut candidates: Vec<std::path::PathBuf> = Vec::new();
    if f.start != 0 {
        candidates.push(format!("/proc/{pid}/map_files/{:x}-{:x}", f.start, f.end).into());
    }
    if name.starts_with('/') {
        candidates.push(name.into());
    } else if !name.is_empty() && !name.contains('/') {
        if let Some(dir) = exe.and_then(Path::parent) {
            candidates.push(dir.join(name));
        }
        candidates.extend(LIBRARY_DIRS.iter().map(|d| Path::new(d).join(name)));
    } else if !name.is_empty() {
        candidates.push(format!("/proc/{pid}/cwd/{name}").into());
    }
    for path in candidates {
        let Ok(file) = std::fs::File::open(&path) else { continue };
        let Ok(md) = file.metadata() else { continue };
        if md.is_file() && md.ino() == f.file.ino && kernel_dev(md.dev()) == f.file.dev {
            let identity =
                FileIdentity::Inode { device: f.file.device_text().to_string(), inode: f.file.ino };
            let shown = if path.starts_with("/proc") { Path::new(name).to_path_buf() } else { path };
            return Some(MappedObject::from_file(file, shown, identity));
        }
    }
    None
}

impl TableLoader {
    /// Takes the table maps out of the loaded object (sized by [`TablePlan::size_loader`]
    /// for the same `budget`) and uploads the plan.
    pub fn new(ebpf: &mut Ebpf, plan: TablePlan, budget: u64) -> Result<Self> {
        let take = |ebpf: &mut Ebpf, name: &str| ebpf.take_map(name).ok_or(Error::Object("table map"));
        let tables: Array<MapData, TableInfo> = Array::try_from(take(ebpf, TABLES_MAP)?)?;
        let pages = Segmented::new(take(ebpf, PAGES_MAP)?, PAGE_SEGMENT, PAGE_SEGMENT_BYTES)?;
        let chunks = Segmented::new(take(ebpf, CHUNKS_MAP)?, CHUNK_SEGMENT, CHUNK_SEGMENT_BYTES)?;
        let rules = Segmented::new(take(ebpf, RULES_MAP)?, RULE_SEGMENT, RULE_SEGMENT_BYTES)?;
        let procs: BpfHashMap<MapData, u32, ProcMappings> = BpfHashMap::try_from(take(ebpf, PROCS_MAP)?)?;
        let files_map: BpfHashMap<MapData, KernelFileKey, FileTable> =
            BpfHashMap::try_from(take(ebpf, FILES_MAP)?)?;
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
            budget,
            procs,
            walked: HashMap::new(),
            tick: 0,
            sampled: HashMap::new(),
            generation: 0,
            stats: plan.stats,
            notices: Vec::new(),
            files_map,
            listed: HashMap::new(),
            new_files: Vec::new(),
            last_expire: Instant::now(),
        };
        loader.probe_segments()?;
        loader.count_map_bytes();
        // The walker's per-CPU rule cache: fixed, outside the table budget.
        let cpus = aya::util::nr_cpus().map_or(1, |n| n as u64);
        loader.stats.rule_cache_bytes =
            cpus * u64::from(RULE_CACHE_SLOTS) * std::mem::size_of::<RuleCacheSlot>() as u64;
        for (pid, maps, _, read_ns) in plan.procs {
            loader.add_process(pid, &maps, read_ns)?;
        }
        Ok(loader)
    }

    /// Whether the kernel admits a segment into each table array (asked once, at load).
    fn probe_segments(&mut self) -> Result<()> {
        for (array, probe) in [
            (PAGES_MAP, self.pages.probe()),
            (CHUNKS_MAP, self.chunks.probe()),
            (RULES_MAP, self.rules.probe()),
        ] {
            probe.map_err(|e| Error::SegmentsRefused { array, source: Box::new(e) })?;
        }
        Ok(())
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
    pub fn add_process(&mut self, pid: u32, maps: &ProcessMaps, read_ns: u64) -> Result<()> {
        self.release(pid);
        // Its tables are the ones to keep while the process is being set up.
        self.sampled(pid);
        let mut entries: Vec<MappingEntry> = Vec::new();
        let mut evicted = false;
        for m in maps.iter().filter(|m| m.executable) {
            let Some(key) = file_key(pid, m) else {
                // Anonymous executable memory (JIT code): known to the walker without a
                // table, so a pc in it takes a frame-pointer step and the walk goes on, where
                // an unknown pc would end it.
                let flags = if holds_py_trampolines(pid, m) { MAPPING_PY_TRAMPOLINES } else { 0 };
                entries.push(MappingEntry { start: m.start, end: m.end, bias: 0, table: NO_TABLE, flags });
                continue;
            };
            // A file already identified and listed with its table (the process may be gone
            // by now, and its file no longer openable through it).
            let listed =
                kernel_file_key(m).and_then(|k| self.listed.get_mut(&k)).filter(|l| l.table != NO_TABLE);
            if let Some(l) = listed {
                l.used = Instant::now();
                let (id, bias) = (l.table, m.start.wrapping_sub(m.offset).wrapping_add(l.delta));
                if let Some(r) = self.resident.get_mut(&id) {
                    r.users.insert(pid);
                    entries.push(MappingEntry { start: m.start, end: m.end, bias, table: id, flags: 0 });
                    continue;
                }
            }
            let compiled = match self.compiled.get(&key) {
                Some(c) => c.clone(),
                None => {
                    let c = self.compiler.compile(pid, m, &mut self.stats);
                    // Not cached when the file could not be stamped (its process gone): the
                    // next process that maps it gets it compiled.
                    if c.is_some() || key.1.is_some() {
                        self.compiled.insert(key.clone(), c.clone());
                    }
                    c
                }
            };
            let mut entry = MappingEntry { start: m.start, end: m.end, bias: 0, table: NO_TABLE, flags: 0 };
            if let Some(c) = compiled {
                let id = match self.files.get(&c.key) {
                    Some(&id) => Some(id),
                    None => {
                        let again = || MappedObject::open(pid, m).ok()?.bytes().ok();
                        match self.compiler.table_again(&c, again, &mut self.stats) {
                            Some(t) => match self.upload(&c.key, &t, pid) {
                                Ok(id) => {
                                    if id.is_none() {
                                        c.put_back(t);
                                    }
                                    id
                                }
                                Err(e) => {
                                    self.forget_failed(pid);
                                    return Err(e);
                                }
                            },
                            None => None,
                        }
                    }
                };
                let offset = if m.path.as_deref() == Some(Path::new("[vdso]")) { 0 } else { m.offset };
                match (id, c.segments.bias(m.start, offset, m.end - m.start)) {
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
                if let Some(k) = kernel_file_key(m) {
                    let delta = c.segments.bias(0, 0, u64::MAX);
                    self.list(k, id.zip(delta), || MappedObject::open(pid, m).ok());
                }
            }
            entries.push(entry);
        }
        entries.sort_by_key(|e| e.start);
        entries.truncate(MAX_MAPPINGS);
        if let Err(e) = self.write_process(pid, &entries, read_ns) {
            self.forget_failed(pid);
            return Err(e);
        }
        self.walked.insert(pid, Proc { entries, evicted, read_ns });
        self.stats.processes += 1;
        Ok(())
    }

    /// Lists file `key` for the kernel's view of processes, with its table and delta
    /// (`None`: identified, but no table), opening it with `open` if it is not listed yet.
    fn list(
        &mut self,
        key: KernelFileKey,
        table: Option<(u32, u64)>,
        open: impl FnOnce() -> Option<MappedObject>,
    ) {
        let (id, delta) = table.unwrap_or((NO_TABLE, 0));
        if self.listed.get(&key).is_some_and(|l| l.table == id) {
            return;
        }
        if !self.listed.contains_key(&key) {
            if self.listed.len() >= MAX_FILES as usize {
                self.stats.files_full += 1;
                return;
            }
            let Some(object) = open() else { return };
            // Only the file the kernel names: a path may have been given to another since.
            if object.identity()
                != &(FileIdentity::Inode { device: key.device_text().to_string(), inode: key.ino })
            {
                return;
            }
            let object = Arc::new(ObjectInfo::new(object));
            self.new_files.push(object.clone());
            self.listed
                .insert(key, Listed { _object: object, table: NO_TABLE, delta: 0, used: Instant::now() });
            self.stats.files_listed += 1;
            self.stats.files_held = self.listed.len() as u64;
        }
        if self.files_map.insert(key, FileTable { table: id, flags: 0, delta }, 0).is_err() {
            return;
        }
        if let Some(l) = self.listed.get_mut(&key) {
            l.table = id;
            l.delta = delta;
        }
        if let Some(r) = self.resident.get_mut(&id) {
            r.listed.insert(key);
        }
    }

    /// Whether `key` is listed (identified) already.
    pub fn is_listed(&self, key: &KernelFileKey) -> bool {
        self.listed.contains_key(key)
    }

    /// A file the kernel announced: found, identified, its table compiled (or read from
    /// the cache) and uploaded, and listed. False when it could not be found.
    pub fn add_announced(
        &mut self,
        pid: u32,
        f: &RecordFile,
        name: &str,
        exe: Option<&Path>,
    ) -> Result<bool> {
        if self.is_listed(&f.file) {
            return Ok(true);
        }
        let Some(object) = open_announced(pid, f, name, exe) else {
            self.stats.files_unresolved += 1;
            return Ok(false);
        };
        self.stats.files_resolved += 1;
        let key = (object.identity().clone(), object.stamp());
        let compiled = match self.compiled.get(&key) {
            Some(c) => c.clone(),
            None => {
                let c = self.compiler.compile_object(&object, &mut self.stats);
                if c.is_none() {
                    self.stats.compile_failures += 1;
                }
                self.compiled.insert(key, c.clone());
                c
            }
        };
        let mut table = None;
        if let Some(c) = compiled {
            let id = match self.files.get(&c.key) {
                Some(&id) => Some(id),
                None => match self.compiler.table_again(&c, || object.bytes().ok(), &mut self.stats) {
                    Some(t) => {
                        let id = self.upload(&c.key, &t, 0)?;
                        if id.is_none() {
                            c.put_back(t);
                        }
                        id
                    }
                    None => None,
                },
            };
            table = id.zip(c.segments.bias(0, 0, u64::MAX));
        }
        self.list(f.file, table, || Some(object));
        Ok(true)
    }

    /// A generation no process entry has had (the walker's cached rules of an entry are
    /// keyed by its generation, so each write makes them stale).
    fn next_generation(&mut self) -> u32 {
        self.generation = self.generation.wrapping_add(1).max(1);
        self.generation
    }

    fn write_process(&mut self, pid: u32, entries: &[MappingEntry], read_ns: u64) -> Result<()> {
        let mut value = ProcMappings {
            count: entries.len() as u32,
            generation: self.next_generation(),
            read_ns,
            mappings: [MappingEntry::default(); MAX_MAPPINGS],
        };
        value.mappings[..entries.len()].copy_from_slice(entries);
        self.procs.insert(pid, value, 0).context("cannot add a process to the walker")
    }

    /// A process whose entry could not be written is not the walker's: no table counts it
    /// as a user, and no earlier entry of it is left for the kernel (its table ids could be
    /// freed and given to other files). Kept in `walked` (with no tables) if that entry
    /// cannot be removed, so that its exit removes it.
    fn forget_failed(&mut self, pid: u32) {
        self.release(pid);
        let gone = match self.procs.remove(&pid) {
            Ok(()) => true,
            Err(e) => is_absent(&e),
        };
        if gone {
            self.walked.remove(&pid);
        } else {
            self.walked.insert(pid, Proc { entries: Vec::new(), evicted: true, read_ns: 0 });
        }
    }

    /// Forgets a process that exited; its tables stay until no process has used them for
    /// a minute (see [`TableLoader::expire`]), or until their room is needed.
    pub fn remove_process(&mut self, pid: u32) {
        // Only processes the walker added have an entry and table users (most exits under
        // churn are of processes it never read: no syscall, no scan for them).
        if self.walked.contains_key(&pid) {
            let _ = self.procs.remove(&pid);
            self.release(pid);
            self.walked.remove(&pid);
        }
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
    fn evict_one(&mut self, keep: u32) -> Result<bool> {
        let victim = self
            .resident
            .iter()
            .filter(|(_, r)| !r.users.contains(&keep))
            .min_by_key(|(id, r)| (self.last_use(r), **id))
            .map(|(id, _)| *id);
        let Some(id) = victim else { return Ok(false) };
        if !self.drop_table(id) {
            return Ok(false);
        }
        self.stats.evicted += 1;
        Ok(true)
    }

    /// Frees resident table `id`: the processes and files pointing at it stop doing so
    /// first. False (and the table kept) when the kernel would still name it: an entry
    /// that can be neither rewritten nor removed.
    fn drop_table(&mut self, id: u32) -> bool {
        let Some(r) = self.resident.remove(&id) else { return false };
        let mut stuck = false;
        // Processes stop pointing at it before its room is reused.
        for pid in &r.users {
            if let Some(p) = self.walked.get_mut(pid) {
                for e in p.entries.iter_mut().filter(|e| e.table == id) {
                    e.table = NO_TABLE;
                    e.bias = 0;
                }
                p.evicted = true;
                let (entries, read_ns) = (p.entries.clone(), p.read_ns);
                if self.write_process(*pid, &entries, read_ns).is_err() {
                    // It must not point into room about to be reused: without its entry the
                    // walker falls back to frame pointers for it.
                    stuck |= self.procs.remove(pid).is_err_and(|e| !is_absent(&e));
                }
            }
        }
        // Files listed with it stop pointing at it before its room is reused too.
        for key in &r.listed {
            if self.files_map.insert(*key, FileTable { table: NO_TABLE, flags: 0, delta: 0 }, 0).is_err() {
                match self.files_map.remove(key) {
                    Err(e) if !is_absent(&e) => stuck = true,
                    _ => {
                        self.listed.remove(key);
                    }
                }
            } else if let Some(l) = self.listed.get_mut(key) {
                l.table = NO_TABLE;
            }
        }
        if stuck {
            // The kernel may still name it: its room and id stay taken (tried again later).
            self.resident.insert(id, r);
            return false;
        }
        self.files.remove(&r.key);
        self.pages.give_back(r.info.page_start, r.info.pages);
        self.chunks.give_back(r.info.chunk_start, r.chunks);
        self.rules.give_back(r.info.rule_start, r.rules);
        self.count_map_bytes();
        self.free_ids.push(id);
        self.stats.bytes -= r.bytes;
        true
    }

    /// A record's files were walked through: they are in use.
    pub fn touch(&mut self, files: impl Iterator<Item = RecordFile>) {
        if self.listed.is_empty() {
            return;
        }
        let now = Instant::now();
        for f in files {
            if let Some(l) = self.listed.get_mut(&f.file) {
                l.used = now;
            }
        }
    }

    /// Gives back what a machine's past programs held (call it now and then; it looks at
    /// most every 10 s): files listed for the kernel's view that no sample walked through
    /// for a minute, and whose table no process the walker has read uses, are unlisted and
    /// closed; tables no process
    /// has used, and no listed file pointed at, for a minute are freed; descriptions of
    /// files without a resident table are forgotten once there are many.
    pub fn expire(&mut self) {
        let now = Instant::now();
        if now.duration_since(self.last_expire) < EXPIRE_EVERY {
            return;
        }
        self.last_expire = now;
        let in_use = |l: &Listed| self.resident.get(&l.table).is_some_and(|r| !r.users.is_empty());
        let idle: Vec<KernelFileKey> = self
            .listed
            .iter()
            .filter(|(_, l)| now.duration_since(l.used) >= FILE_IDLE && !in_use(l))
            .map(|(k, _)| *k)
            .collect();
        for key in idle {
            self.unlist(key);
        }
        let mut expired = Vec::new();
        for (&id, r) in self.resident.iter_mut() {
            if !r.users.is_empty() || !r.listed.is_empty() {
                r.idle_since = None;
            } else if now.duration_since(*r.idle_since.get_or_insert(now)) >= TABLE_IDLE {
                expired.push(id);
            }
        }
        for id in expired {
            if self.drop_table(id) {
                self.stats.expired += 1;
            }
        }
        if self.compiled.len() > MAX_REMEMBERED {
            let files = &self.files;
            self.compiled.retain(|_, c| c.as_ref().is_some_and(|c| files.contains_key(&c.key)));
        }
        self.compiler.forget_some(&self.files);
        self.stats.files_held = self.listed.len() as u64;
    }

    /// Takes `key` out of the kernel's file list and closes it. Kept (and retried later)
    /// if the kernel's entry cannot be removed: the file is held open while the kernel
    /// names it, so that its inode number cannot pass to another file meanwhile.
    fn unlist(&mut self, key: KernelFileKey) {
        if let Err(e) = self.files_map.remove(&key) {
            if !is_absent(&e) {
                return;
            }
        }
        let Some(l) = self.listed.remove(&key) else { return };
        if let Some(r) = self.resident.get_mut(&l.table) {
            r.listed.remove(&key);
        }
        self.stats.files_unlisted += 1;
        self.stats.files_held = self.listed.len() as u64;
    }

    /// Bytes of the segments held and the outer arrays: what the budget bounds.
    fn held_bytes(&self) -> u64 {
        self.pages.bytes() + self.chunks.bytes() + self.rules.bytes()
    }

    fn count_map_bytes(&mut self) {
        let held = self.held_bytes();
        let s = &mut self.stats;
        s.map_bytes = held + u64::from(MAX_TABLES) * 24;
        s.peak_map_bytes = s.peak_map_bytes.max(s.map_bytes);
        s.segments_created = self.pages.created + self.chunks.created + self.rules.created;
        s.segments_dropped = self.pages.dropped + self.chunks.dropped + self.rules.dropped;
    }

    /// Room for a table in the three arrays and an id, within the budget, evicting as
    /// needed.
    fn make_room(
        &mut self,
        npages: u32,
        nchunks: u32,
        nrules: u32,
        keep: u32,
    ) -> Result<Option<(u32, u32, u32, u32)>> {
        loop {
            let id = self.free_ids.last().copied().or((self.next_id < MAX_TABLES).then_some(self.next_id));
            if let Some(id) = id {
                if let Some(p) = self.pages.free.take(npages) {
                    if let Some(c) = self.chunks.free.take(nchunks) {
                        if let Some(r) = self.rules.free.take(nrules) {
                            let grow = self.pages.growth(p, npages)
                                + self.chunks.growth(c, nchunks)
                                + self.rules.growth(r, nrules);
                            if self.held_bytes() + grow <= self.budget {
                                if self.free_ids.last() == Some(&id) {
                                    self.free_ids.pop();
                                } else {
                                    self.next_id += 1;
                                }
                                return Ok(Some((id, p, c, r)));
                            }
                            self.rules.free.give_back(r, nrules);
                        }
                        self.chunks.free.give_back(c, nchunks);
                    }
                    self.pages.free.give_back(p, npages);
                }
            }
            if !self.evict_one(keep)? {
                return Ok(None);
            }
        }
    }

    /// A table the kernel would not take (a segment it refused to create or fill, e.g.
    /// under memory pressure): its room and id are free again, the failure counted and the
    /// first one told; the table is left out like one that does not fit. `runs` are its
    /// (first, count) in pages, chunks and rules; `failed` the step that failed (0–2: that
    /// array's write, which gave its own run back; 3: the table directory).
    fn refused(&mut self, id: u32, runs: [(u32, u32); 3], failed: usize, e: Error) -> Result<Option<u32>> {
        self.pages.undo(runs[0], 0.cmp(&failed));
        self.chunks.undo(runs[1], 1.cmp(&failed));
        self.rules.undo(runs[2], 2.cmp(&failed));
        self.free_ids.push(id);
        self.stats.refused += 1;
        if self.stats.refused == 1 {
            self.notices.push(crate::Notice::TableRefused(e));
        }
        self.count_map_bytes();
        Ok(None)
    }

    /// Copies a table into the shared arrays; `None` when it cannot fit (counted).
    fn upload(&mut self, key: &str, t: &UnwindTable, for_pid: u32) -> Result<Option<u32>> {
        let npages = t.pages().len() as u32;
        let nchunks = (t.entries().len() as u32).div_ceil(CHUNK_ENTRIES as u32);
        let nrules = t.rules().len() as u32;
        // A run of n values holds at least n / seg segments, whatever else is evicted: a
        // table that cannot fit even alone evicts nothing.
        let alone = self.pages.least_bytes(npages)
            + self.chunks.least_bytes(nchunks)
            + self.rules.least_bytes(nrules);
        let room = if alone > self.budget { None } else { self.make_room(npages, nchunks, nrules, for_pid)? };
        let Some((id, page_start, chunk_start, rule_start)) = room else {
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
        let runs = [(page_start, npages), (chunk_start, nchunks), (rule_start, nrules)];
        if let Err(e) = self.pages.put(info.page_start, &pages) {
            return self.refused(id, runs, 0, e);
        }
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
        if let Err(e) = self.chunks.put(info.chunk_start, &chunks) {
            return self.refused(id, runs, 1, e);
        }
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
        if let Err(e) = self.rules.put(info.rule_start, &rules) {
            return self.refused(id, runs, 2, e);
        }
        self.count_map_bytes();
        if let Err(e) = self.tables.set(id, info, 0) {
            return self.refused(id, runs, 3, e.into());
        }
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
                listed: HashSet::new(),
                idle_since: None,
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
    use super::{monotonic_ns, segment_parts, Extents, TableLoader, TablePlan};
    use super::{CHUNK_ENTRIES, CHUNK_SEGMENT, MAX_TABLES, PAGE_SEGMENT, RULE_SEGMENT};
    use super::{EXPIRE_EVERY, FILE_IDLE, TABLE_IDLE};
    use aya::maps::{Array, MapData};
    use std::time::{Duration, Instant};
    use unwound_symbolize::ProcessMaps;
    use unwound_unwind_tables::{compile_elf, UnwindTable};

    /// The walker's maps, loaded for a table budget (no programs), or `None` without
    /// privileges (a failure under CI).
    fn loaded(budget: u64) -> Option<(aya::Ebpf, TableLoader)> {
        if unsafe { libc::geteuid() } != 0 {
            assert!(
                std::env::var_os("CI").is_none(),
                "needs root to create BPF maps, and CI must run this test"
            );
            eprintln!("SKIPPED: needs root to create BPF maps");
            return None;
        }
        crate::raise_memlock_limit();
        let plan = TablePlan::new(&[], None);
        let mut loader = aya::EbpfLoader::new();
        plan.size_loader(&mut loader, budget);
        let mut ebpf = loader.load(crate::BPF_OBJECT).expect("the walker's maps");
        let tables = TableLoader::new(&mut ebpf, plan, budget).expect("table loader");
        Some((ebpf, tables))
    }

    /// The table of this test binary (large: its tables span several segments).
    fn own_table() -> UnwindTable {
        compile_elf(&std::fs::read("/proc/self/exe").unwrap()).unwrap()
    }

    /// A system library this test process maps, and its table.
    fn library_table(name: &str) -> UnwindTable {
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        let path = maps
            .lines()
            .filter_map(|l| l.split_whitespace().nth(5))
            .find(|p| p.rsplit('/').next().is_some_and(|f| f.starts_with(name)))
            .unwrap_or_else(|| panic!("this process maps no {name}"))
            .to_string();
        compile_elf(&std::fs::read(&path).unwrap()).unwrap()
    }

    /// Value `i` of a segmented array, read back from the kernel.
    fn read_back<V: aya::Pod>(seg: &mut super::Segmented<V>, i: u32) -> V {
        let per = seg.seg;
        let inner: Array<MapData, V> = seg.outer().unwrap().get(&(i / per), 0).expect("segment held");
        inner.get(&(i % per), 0).expect("value")
    }

    #[test]
    fn segments_are_created_for_the_tables_in_them_and_dropped_with_them() {
        let Some((_ebpf, mut t)) = loaded(64 << 20) else { return };
        let (held0, map0) = (t.held_bytes(), t.stats.map_bytes);
        assert_eq!(t.stats.segments_created, 0, "nothing held before a table");
        let exe = own_table();
        let (npages, nrules) = (exe.pages().len() as u32, exe.rules().len() as u32);
        let nchunks = (exe.entries().len() as u32).div_ceil(CHUNK_ENTRIES as u32);
        assert!(nchunks > CHUNK_SEGMENT, "the table should span several chunk segments: {nchunks} chunks");
        let id = t.upload("exe", &exe, 1).unwrap().expect("the table fits 64 MiB");
        let expected = u64::from(
            npages.div_ceil(PAGE_SEGMENT) + nchunks.div_ceil(CHUNK_SEGMENT) + nrules.div_ceil(RULE_SEGMENT),
        );
        assert_eq!(t.stats.segments_created, expected);
        assert_eq!(t.held_bytes() - held0, expected * (64 << 10), "each segment is 64 KiB");
        assert_eq!(t.stats.map_bytes, t.held_bytes() + u64::from(MAX_TABLES) * 24);
        // The values landed where the walker looks: every page record, chunk and rule,
        // across the segment boundaries.
        let info = t.resident[&id].info;
        for (i, p) in exe.pages().iter().enumerate() {
            let v = read_back(&mut t.pages, info.page_start + i as u32);
            assert_eq!(u32::from_le_bytes(v[..4].try_into().unwrap()), p.first, "page {i}");
            assert_eq!(u16::from_le_bytes(v[4..6].try_into().unwrap()), p.count, "page {i}");
        }
        for (i, c) in exe.entries().chunks().iter().enumerate() {
            let v = read_back(&mut t.chunks, info.chunk_start + i as u32);
            assert_eq!(&v[..c.len()], &c[..], "chunk {i}");
        }
        for (i, d) in exe.dictionary().enumerate() {
            let v = read_back(&mut t.rules, info.rule_start + i as u32);
            assert_eq!(i32::from_le_bytes(v[4..8].try_into().unwrap()), d.rule.cfa_offset, "rule {i}");
        }
        // A second table shares the segments the first one left room in.
        let ld = library_table("libc.so");
        let before = t.stats.segments_created;
        t.upload("libc", &ld, 1).unwrap().expect("libc fits");
        let ld_chunks = (ld.entries().len() as u32).div_ceil(CHUNK_ENTRIES as u32);
        assert!(
            t.stats.segments_created - before < u64::from(ld_chunks.div_ceil(CHUNK_SEGMENT) + 2),
            "libc's pages and rules go into the part-filled segments"
        );
        // Evicting both drops every segment: the kernel holds what it held before.
        while t.evict_one(u32::MAX).unwrap() {}
        assert_eq!(t.stats.segments_dropped, t.stats.segments_created);
        assert_eq!((t.held_bytes(), t.stats.map_bytes), (held0, map0));
        assert!(t.stats.peak_map_bytes > map0);
    }

    /// What an exited program held goes once unused for a minute (the clock set back
    /// here): its files are unlisted from the kernel's list and closed, then its tables
    /// freed with their segments; while a process uses them, nothing goes.
    #[test]
    fn files_and_tables_of_programs_gone_expire_and_those_in_use_stay() {
        let Some((_ebpf, mut t)) = loaded(64 << 20) else { return };
        let held0 = t.held_bytes();
        let pid = std::process::id();
        let maps = ProcessMaps::read(pid).unwrap();
        t.add_process(pid, &maps, monotonic_ns()).unwrap();
        // Handed to the walker's user at its next drain (who holds them as long as it needs).
        t.new_files.clear();
        let (tables, files) = (t.resident.len(), t.listed.len());
        assert!(tables > 0 && files > 0, "this process's tables are up: {tables} tables, {files} files");
        let fds = || std::fs::read_dir("/proc/self/fd").unwrap().count();
        let long_ago = |d: Duration| Instant::now().checked_sub(d).expect("uptime");
        let age = |t: &mut TableLoader| {
            for l in t.listed.values_mut() {
                l.used = long_ago(FILE_IDLE * 2);
            }
            for r in t.resident.values_mut() {
                r.idle_since = r.idle_since.map(|_| long_ago(TABLE_IDLE * 2));
            }
            t.last_expire = long_ago(EXPIRE_EVERY * 2);
        };
        // In use: idle for minutes, yet kept.
        age(&mut t);
        t.expire();
        assert_eq!(
            (t.resident.len(), t.listed.len()),
            (tables, files),
            "a live process's tables and files stay"
        );
        assert_eq!((t.stats.expired, t.stats.files_unlisted), (0, 0));

        // Gone: the files are unlisted at once (idle already), the tables a minute after.
        t.remove_process(pid);
        let fds_before = fds();
        age(&mut t);
        t.expire();
        assert!(t.listed.is_empty(), "{} files still listed", t.listed.len());
        assert_eq!(t.stats.files_unlisted, files as u64);
        assert_eq!(t.files_map.keys().count(), 0, "the kernel's file list is empty");
        assert!(fds() < fds_before, "the unlisted files are closed: {} → {} descriptors", fds_before, fds());
        assert_eq!(t.resident.len(), tables, "tables wait a minute of being unused");
        age(&mut t);
        t.expire();
        assert!(t.resident.is_empty(), "{} tables still resident", t.resident.len());
        assert_eq!(t.stats.expired, tables as u64);
        assert_eq!(t.held_bytes(), held0, "their segments are dropped");
        assert_eq!(t.stats.evicted, 0, "expiry is not eviction");
    }

    #[test]
    fn a_segment_the_kernel_refuses_leaves_nothing_taken() {
        let Some((_ebpf, mut t)) = loaded(64 << 20) else { return };
        let held0 = t.held_bytes();
        let exe = own_table();
        // The pages go in, then a chunk segment is refused: the pages' segment is dropped
        // again and every run is free.
        t.chunks.refuse_new = true;
        assert_eq!(t.upload("exe", &exe, 1).unwrap(), None);
        assert_eq!(t.stats.refused, 1);
        assert!(t.stats.segments_created > 0, "the pages were written first");
        assert_eq!(t.stats.segments_dropped, t.stats.segments_created);
        assert_eq!(t.held_bytes(), held0);
        // Accepted again, the table takes the same id and the runs from the start.
        t.chunks.refuse_new = false;
        let id = t.upload("exe", &exe, 1).unwrap().expect("fits once segments are accepted");
        let info = t.resident[&id].info;
        assert_eq!((id, info.page_start, info.chunk_start, info.rule_start), (0, 0, 0, 0));
        let c = read_back(&mut t.chunks, 1);
        assert_eq!(&c[..exe.entries().chunks()[1].len()], &exe.entries().chunks()[1][..]);
    }

    #[test]
    fn a_kernel_that_refuses_segments_is_found_at_load() {
        let Some((_ebpf, mut t)) = loaded(64 << 20) else { return };
        // This kernel admits them (each array's probe put a segment in and took it out).
        t.probe_segments().expect("segments admitted");
        assert_eq!(t.stats.segments_created, 0, "a probe's segment is not a table's");
        t.rules.refuse_new = true;
        let e = t.probe_segments().unwrap_err().to_string();
        assert!(e.contains("refuses the walker's table segments") && e.contains(super::RULES_MAP), "{e}");
    }

    #[test]
    fn a_table_larger_than_the_budget_holds_no_segment() {
        // Room for four segments: libc's table (one segment of each array) fits, this test
        // binary's (two or more chunk segments besides) does not, even alone.
        let budget = (256 << 10) + 3 * 8 * 4;
        let Some((_ebpf, mut t)) = loaded(budget) else { return };
        let small = library_table("libc.so");
        let small_id = t.upload("libc", &small, 1).unwrap().expect("libc fits");
        let big = own_table();
        let chunk_segments =
            (big.entries().len() as u32).div_ceil(CHUNK_ENTRIES as u32).div_ceil(CHUNK_SEGMENT);
        assert!(chunk_segments >= 2, "{chunk_segments} chunk segments");
        assert_eq!(t.upload("exe", &big, 1).unwrap(), None);
        assert_eq!(t.stats.full, 1);
        assert!(t.resident.contains_key(&small_id), "a table that cannot fit even alone evicts nothing");
        assert_eq!(t.stats.evicted, 0);
        assert!(t.held_bytes() <= budget);
    }

    #[test]
    fn a_run_is_cut_at_segment_boundaries() {
        let parts = |first, n| segment_parts(4, first, n).collect::<Vec<_>>();
        assert_eq!(parts(0, 4), [(0, 0, 4)]);
        assert_eq!(parts(3, 2), [(0, 3, 1), (1, 0, 1)]);
        assert_eq!(parts(5, 9), [(1, 1, 3), (2, 0, 4), (3, 0, 2)]);
        assert_eq!(parts(8, 0), [], "an empty run touches no segment");
        assert_eq!(parts(5, 0), []);
        // Every value of a run is in exactly one part.
        for first in 0..13 {
            for n in 0..13 {
                let p = parts(first, n);
                assert_eq!(p.iter().map(|x| x.2).sum::<u32>(), n);
                let mut next = first;
                for &(s, local, k) in &p {
                    assert_eq!(s as u32 * 4 + local, next, "parts in order, contiguous");
                    assert!(local + k <= 4 && k > 0);
                    next += k;
                }
            }
        }
    }

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
