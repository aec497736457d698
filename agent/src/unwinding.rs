//! Unwind tables for the kernel walker: compiled per mapped file (shared by every process
//! that maps it), packed into the walker's shared arrays, and each process's executable
//! mappings pointed at them.

use std::collections::HashMap;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use anyhow::Context as _;
use aya::maps::{Array, HashMap as BpfHashMap, MapData};
use aya::{Ebpf, EbpfLoader};
use object::{Object, ObjectSegment};
use unwound_stackwalk_abi::{
    MappingEntry, ProcMappings, TableInfo, CHUNKS_MAP, CHUNK_ENTRIES, MAX_MAPPINGS, MAX_TABLES, NO_TABLE,
    PAGES_MAP, PROCS_MAP, RULES_MAP, TABLES_MAP,
};
use unwound_symbolize::{Mapping, ProcessMaps};
use unwound_unwind_tables::{compile_elf, UnwindTable};

/// A compiled table and where its segments put file offsets.
struct Compiled {
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
    pub tables: u64,
    pub processes: u64,
    pub compile_failures: u64,
    pub full: u64,
    pub bytes: u64,
    pub map_bytes: u64,
}

/// Tables compiled before the walker is loaded, to size its arrays.
pub struct TablePlan {
    files: HashMap<FileKey, Option<Arc<Compiled>>>,
    /// Each process's maps, parsed and as read (the agent compares the text to notice
    /// changes).
    procs: Vec<(u32, ProcessMaps, String)>,
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

fn compile_mapping(pid: u32, m: &Mapping) -> Option<Compiled> {
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
    let table = compile_elf(data).ok()?;
    let file = object::File::parse(data).ok()?;
    let segments = file
        .segments()
        .map(|s| {
            let (o, sz) = s.file_range();
            let exec = matches!(s.flags(), object::SegmentFlags::Elf { p_flags } if p_flags & object::elf::PF_X != 0);
            (o, sz, s.address(), exec)
        })
        .filter(|s| s.1 > 0)
        .collect();
    Some(Compiled { table, segments })
}

/// Compiles a mapping's table; a file that should have one and does not is counted.
fn compile_counted(pid: u32, m: &Mapping, stats: &mut TableStats) -> Option<Arc<Compiled>> {
    let c = compile_mapping(pid, m).map(Arc::new);
    if c.is_none() && !m.is_pseudo() {
        stats.compile_failures += 1;
    }
    c
}

impl TablePlan {
    /// Compiles the tables of every executable mapping of `pids`.
    pub fn new(pids: &[u32]) -> Self {
        let mut plan = TablePlan { files: HashMap::new(), procs: Vec::new(), stats: TableStats::default() };
        for &pid in pids {
            let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/maps")) else { continue };
            let maps = ProcessMaps::parse(&text);
            for m in maps.iter().filter(|m| m.executable && m.path.is_some()) {
                if let std::collections::hash_map::Entry::Vacant(v) = plan.files.entry(file_key(m)) {
                    v.insert(compile_counted(pid, m, &mut plan.stats));
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

    /// Sizes the walker's table arrays: what the plan needs, plus room for tables compiled
    /// while recording (new processes, libraries loaded later).
    pub fn size_loader(&self, loader: &mut EbpfLoader<'_>, headroom_mib: u64) {
        let (mut pages, mut chunks, mut rules) = (0u64, 0u64, 0u64);
        for c in self.files.values().flatten() {
            pages += c.table.pages().len() as u64;
            chunks += (c.table.entries().len() as u64).div_ceil(CHUNK_ENTRIES as u64);
            rules += c.table.rules().len() as u64;
        }
        // Headroom split like an average table: 2% pages, 95% chunks, 3% rules by bytes.
        let extra = headroom_mib << 20;
        let pages = pages + extra / 50 / 8 + 1;
        let chunks = chunks + extra * 95 / 100 / (CHUNK_ENTRIES as u64 * 4) + 1;
        let rules = rules + extra * 3 / 100 / 8 + 1;
        loader.map_max_entries(PAGES_MAP, pages.min(u64::from(u32::MAX)) as u32);
        loader.map_max_entries(CHUNKS_MAP, chunks.min(u64::from(u32::MAX)) as u32);
        loader.map_max_entries(RULES_MAP, rules.min(u64::from(u32::MAX)) as u32);
    }
}

/// Loaded tables and the maps they live in.
pub struct TableLoader {
    files: HashMap<FileKey, Option<u32>>,
    compiled: HashMap<FileKey, Option<Arc<Compiled>>>,
    infos: Vec<TableInfo>,
    tables: Array<MapData, TableInfo>,
    pages: Array<MapData, [u8; 8]>,
    chunks: Array<MapData, [u32; CHUNK_ENTRIES]>,
    rules: Array<MapData, [u8; 8]>,
    procs: BpfHashMap<MapData, u32, ProcMappings>,
    cap: (u32, u32, u32),
    next: (u32, u32, u32),
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
        let rules: Array<MapData, [u8; 8]> = Array::try_from(take(ebpf, RULES_MAP)?)?;
        let procs: BpfHashMap<MapData, u32, ProcMappings> = BpfHashMap::try_from(take(ebpf, PROCS_MAP)?)?;
        let cap = (pages.len(), chunks.len(), rules.len());
        let mut loader = TableLoader {
            files: HashMap::new(),
            compiled: plan.files,
            infos: Vec::new(),
            tables,
            pages,
            chunks,
            rules,
            procs,
            cap,
            next: (0, 0, 0),
            stats: plan.stats,
        };
        loader.stats.map_bytes = u64::from(cap.0) * 8
            + u64::from(cap.1) * CHUNK_ENTRIES as u64 * 4
            + u64::from(cap.2) * 8
            + u64::from(MAX_TABLES) * 24;
        for (pid, maps, _) in plan.procs {
            loader.add_process(pid, &maps)?;
        }
        Ok(loader)
    }

    /// Points `pid`'s mappings at their tables (compiling and uploading new ones).
    pub fn add_process(&mut self, pid: u32, maps: &ProcessMaps) -> anyhow::Result<()> {
        let mut entries: Vec<MappingEntry> = Vec::new();
        for m in maps.iter().filter(|m| m.executable && m.path.is_some()) {
            let key = file_key(m);
            let compiled = match self.compiled.get(&key) {
                Some(c) => c.clone(),
                None => {
                    let c = compile_counted(pid, m, &mut self.stats);
                    self.compiled.insert(key.clone(), c.clone());
                    c
                }
            };
            let mut entry = MappingEntry { start: m.start, end: m.end, bias: 0, table: NO_TABLE, flags: 0 };
            if let Some(c) = compiled {
                let id = match self.files.get(&key) {
                    Some(id) => *id,
                    None => {
                        let id = self.upload(&c.table)?;
                        self.files.insert(key, id);
                        id
                    }
                };
                let offset = if m.path.as_deref() == Some(Path::new("[vdso]")) { 0 } else { m.offset };
                if let (Some(id), Some(bias)) = (id, c.bias(m.start, offset, m.end - m.start)) {
                    entry.table = id;
                    entry.bias = bias;
                }
            }
            entries.push(entry);
        }
        entries.sort_by_key(|e| e.start);
        entries.truncate(MAX_MAPPINGS);
        let mut value = ProcMappings {
            count: entries.len() as u32,
            reserved: 0,
            mappings: [MappingEntry::default(); MAX_MAPPINGS],
        };
        value.mappings[..entries.len()].copy_from_slice(&entries);
        self.procs.insert(pid, value, 0).context("cannot add a process to the walker")?;
        self.stats.processes += 1;
        Ok(())
    }

    /// Forgets a process that exited.
    pub fn remove_process(&mut self, pid: u32) {
        let _ = self.procs.remove(&pid);
    }

    /// Copies a table into the shared arrays; `None` when they are full (counted).
    fn upload(&mut self, t: &UnwindTable) -> anyhow::Result<Option<u32>> {
        let npages = t.pages().len() as u32;
        let nchunks = (t.entries().len() as u32).div_ceil(CHUNK_ENTRIES as u32);
        let nrules = t.rules().len() as u32;
        let id = self.infos.len() as u32;
        if id >= MAX_TABLES
            || self.next.0 + npages > self.cap.0
            || self.next.1 + nchunks > self.cap.1
            || self.next.2 + nrules > self.cap.2
        {
            self.stats.full += 1;
            return Ok(None);
        }
        let info = TableInfo {
            base: t.base(),
            pages: npages,
            page_start: self.next.0,
            chunk_start: self.next.1,
            rule_start: self.next.2,
        };
        for (i, p) in t.pages().iter().enumerate() {
            let mut v = [0u8; 8];
            v[..4].copy_from_slice(&p.first.to_le_bytes());
            v[4..6].copy_from_slice(&p.count.to_le_bytes());
            v[6..].copy_from_slice(&p.start_rule.to_le_bytes());
            self.pages.set(info.page_start + i as u32, v, 0)?;
        }
        for (i, chunk) in t.entries().chunks(CHUNK_ENTRIES).enumerate() {
            let mut v = [0u32; CHUNK_ENTRIES];
            v[..chunk.len()].copy_from_slice(chunk);
            self.chunks.set(info.chunk_start + i as u32, v, 0)?;
        }
        for (i, r) in t.rules().iter().enumerate() {
            let mut v = [0u8; 8];
            v[0] = r.cfa;
            v[1] = r.rbp;
            v[2] = r.rbp_slot as u8;
            v[3] = r.aux as u8;
            v[4..].copy_from_slice(&r.cfa_offset.to_le_bytes());
            self.rules.set(info.rule_start + i as u32, v, 0)?;
        }
        self.tables.set(id, info, 0)?;
        self.infos.push(info);
        self.next = (self.next.0 + npages, self.next.1 + nchunks, self.next.2 + nrules);
        self.stats.tables += 1;
        self.stats.bytes += t.byte_size() as u64;
        Ok(Some(id))
    }
}
