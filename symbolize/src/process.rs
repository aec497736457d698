//! One model of a process's code, shared by the walker (tables), the agent (capture now,
//! symbolize later), the symbolizer and the reference walker.
//!
//! - [`FileIdentity`]: what makes two mappings the same object (device and inode; a pseudo
//!   mapping such as `[vdso]` by its name).
//! - [`MappedObject`]: a mapping's object opened *while the process lives*: through
//!   `/proc/PID/map_files` (works for deleted and replaced files and other mount
//!   namespaces), else through `/proc/PID/root` only when that path still has the mapped
//!   inode; the vDSO copied from the process's memory. Held open, it can be read after the
//!   process has exited.
//! - [`CapturedAddress`]: an address as (object, file offset), which stays true after the
//!   process, or the address space layout, is gone.
//! - [`lookup_address`]: the address to look up for a stack's frame (a return address
//!   names the instruction after the call).
//! - [`MAPS_REFRESH_INTERVAL`]: how often a process's mappings may be read again because
//!   its samples show an address outside the ones known.

use std::fs::File;
use std::os::unix::fs::{FileExt as _, MetadataExt as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::{Error, LoadSegments, Mapping};

/// Least time between two re-reads of one process's `/proc/PID/maps` prompted by its
/// samples (a pc outside the mappings known: a library loaded since).
pub const MAPS_REFRESH_INTERVAL: Duration = Duration::from_millis(200);

/// Most JIT addresses of one snapshot whose first-seen name is kept.
pub const MAX_JIT_NAMES: usize = 1 << 16;

/// Anonymous executable memory: where JIT code lives.
fn is_jit_code(m: &Mapping) -> bool {
    m.path.is_none() && m.executable
}

/// Most bytes of a pseudo mapping (the vDSO is 8 KiB) copied from a process's memory.
pub const MAX_MEMORY_OBJECT: u64 = 1 << 20;

/// What makes two mappings, in one process or several, the same object.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FileIdentity {
    /// A file, by its device (`major:minor` as `/proc/PID/maps` prints it) and inode: the
    /// same file under any path, in any process or mount namespace.
    Inode {
        /// `major:minor`.
        device: String,
        /// Inode number.
        inode: u64,
    },
    /// A pseudo mapping without a file (`[vdso]`), by its name: one kernel maps one vDSO.
    Pseudo(PathBuf),
}

impl FileIdentity {
    /// The identity of `m`'s object; `None` for anonymous memory.
    pub fn of(m: &Mapping) -> Option<Self> {
        let path = m.path.as_ref()?;
        Some(if m.inode == 0 {
            FileIdentity::Pseudo(path.clone())
        } else {
            FileIdentity::Inode { device: m.device.clone(), inode: m.inode }
        })
    }
}

impl std::fmt::Display for FileIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FileIdentity::Inode { device, inode } => write!(f, "{device}:{inode}"),
            FileIdentity::Pseudo(p) => write!(f, "{}", p.display()),
        }
    }
}

/// What a file was when it was opened: device, inode, size and change times. Two stamps
/// differ when a file was rewritten in place, or when a file deleted and freed gave its
/// inode number to a new one: a cache keyed by [`FileIdentity`] checks the stamp before it
/// reuses what it computed from the old file (a table, symbols), so the old file's answers
/// are never given for the new one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FileStamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i128,
    ctime_ns: i128,
}

impl FileStamp {
    fn of(md: &std::fs::Metadata) -> Self {
        let ns = |s: i64, n: i64| i128::from(s) * 1_000_000_000 + i128::from(n);
        FileStamp {
            dev: md.dev(),
            ino: md.ino(),
            size: md.size(),
            mtime_ns: ns(md.mtime(), md.mtime_nsec()),
            ctime_ns: ns(md.ctime(), md.ctime_nsec()),
        }
    }

    /// The stamp of the file `pid`'s mapping `m` maps now (a `stat` through
    /// `/proc/PID/map_files`, else `/proc/PID/root`); `None` for pseudo mappings and
    /// anonymous memory, or when neither can be read.
    pub fn of_mapping(pid: u32, m: &Mapping) -> Option<Self> {
        if m.is_pseudo() || m.path.is_none() {
            return None;
        }
        let md = std::fs::metadata(format!("/proc/{pid}/map_files/{}", m.map_files_name())).ok().or_else(
            || {
                let p = m.path.as_ref()?.to_string_lossy().into_owned();
                std::fs::metadata(format!("/proc/{pid}/root{}", p.strip_suffix(" (deleted)").unwrap_or(&p)))
                    .ok()
            },
        )?;
        (md.ino() == m.inode).then(|| Self::of(&md))
    }
}

/// The bytes of a [`MappedObject`]: the file mapped read-only, or the copy of a pseudo
/// mapping.
pub enum ObjectBytes {
    /// A file, mapped.
    Mapped(memmap2::Mmap),
    /// A copy from the process's memory.
    Memory(Arc<[u8]>),
}

impl std::ops::Deref for ObjectBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            ObjectBytes::Mapped(m) => m,
            ObjectBytes::Memory(b) => b,
        }
    }
}

#[derive(Debug)]
enum Source {
    File(File),
    Memory(Arc<[u8]>),
}

/// A mapping's object, opened while its process lived (see the module docs).
#[derive(Debug)]
pub struct MappedObject {
    identity: FileIdentity,
    path: PathBuf,
    source: Source,
    stamp: Option<FileStamp>,
}

impl MappedObject {
    /// Opens the object of `pid`'s mapping `m`: its file through `/proc/PID/map_files`,
    /// else through `/proc/PID/root` if that path still holds the mapped inode (a path
    /// that names a newer file, after an upgrade, is refused: its offsets would give wrong
    /// names); `[vdso]` copied from the process's memory. Other pseudo mappings and
    /// anonymous memory have no object.
    pub fn open(pid: u32, m: &Mapping) -> Result<Self, Error> {
        let identity = FileIdentity::of(m).ok_or_else(|| not_an_object(pid, m))?;
        let path = m.path.clone().unwrap_or_default();
        if m.is_pseudo() {
            if path.as_os_str() != "[vdso]" {
                return Err(not_an_object(pid, m));
            }
            let mem = format!("/proc/{pid}/mem");
            let io = |source| Error::Io { path: PathBuf::from(&mem), source };
            let f = File::open(&mem).map_err(io)?;
            let mut b = vec![0u8; m.end.saturating_sub(m.start).min(MAX_MEMORY_OBJECT) as usize];
            f.read_exact_at(&mut b, m.start).map_err(io)?;
            return Ok(MappedObject { identity, path, source: Source::Memory(b.into()), stamp: None });
        }
        let via_map_files = PathBuf::from(format!("/proc/{pid}/map_files/{}", m.map_files_name()));
        let file = match File::open(&via_map_files) {
            Ok(f) => f,
            Err(_) => {
                let plain = path.to_string_lossy();
                let plain = plain.strip_suffix(" (deleted)").unwrap_or(&plain);
                let via_root = PathBuf::from(format!("/proc/{pid}/root{plain}"));
                let f =
                    File::open(&via_root).map_err(|source| Error::Io { path: via_root.clone(), source })?;
                let md = f.metadata().map_err(|source| Error::Io { path: via_root.clone(), source })?;
                if md.ino() != m.inode {
                    return Err(Error::Replaced { path, pid });
                }
                f
            }
        };
        let stamp = file.metadata().ok().map(|md| FileStamp::of(&md));
        Ok(MappedObject { identity, path, source: Source::File(file), stamp })
    }

    /// An object from a file opened by other means (found by path and checked to be the
    /// file `identity` names, e.g. after its process is gone): `path` is for display.
    pub fn from_file(file: File, path: PathBuf, identity: FileIdentity) -> Self {
        let stamp = file.metadata().ok().map(|md| FileStamp::of(&md));
        MappedObject { identity, path, source: Source::File(file), stamp }
    }

    /// The file's stamp when it was opened (`None` for a copy from memory).
    pub fn stamp(&self) -> Option<FileStamp> {
        self.stamp
    }

    /// Its identity.
    pub fn identity(&self) -> &FileIdentity {
        &self.identity
    }

    /// The path the process mapped it under (` (deleted)` kept), for display.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The open file (`None` for a copy from memory).
    pub fn file(&self) -> Option<&File> {
        match &self.source {
            Source::File(f) => Some(f),
            Source::Memory(_) => None,
        }
    }

    /// A path that opens the same file from this process while the object lives
    /// (`/proc/self/fd/N`), for readers that take a path; `None` for a copy from memory.
    pub fn read_path(&self) -> Option<PathBuf> {
        use std::os::fd::AsRawFd as _;
        self.file().map(|f| PathBuf::from(format!("/proc/self/fd/{}", f.as_raw_fd())))
    }

    /// Its bytes: the file mapped read-only, or the copy.
    pub fn bytes(&self) -> Result<ObjectBytes, Error> {
        match &self.source {
            // SAFETY: a read-only private mapping; the file is one the process maps anyway.
            // A writer truncating it under us could fault the reader (as it could fault the
            // process itself); unwound's readers map only code they profile.
            Source::File(f) => unsafe { memmap2::Mmap::map(f) }
                .map(ObjectBytes::Mapped)
                .map_err(|source| Error::Io { path: self.path.clone(), source }),
            Source::Memory(b) => Ok(ObjectBytes::Memory(b.clone())),
        }
    }

    /// Its load segments (program headers), to turn file offsets into its own addresses.
    pub fn load_segments(&self) -> Result<LoadSegments, Error> {
        match &self.source {
            Source::File(_) => LoadSegments::open(self.read_path().unwrap_or_default()),
            Source::Memory(b) => LoadSegments::from_bytes(&self.path, b),
        }
    }
}

fn not_an_object(pid: u32, m: &Mapping) -> Error {
    Error::NotAnObject { pid, start: m.start, path: m.path.clone() }
}

/// An address captured while its process lived, to symbolize later: which object, and
/// where in its file.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CapturedAddress {
    /// The object.
    pub file: FileIdentity,
    /// Offset in the object's file (for a pseudo mapping: from its start).
    pub file_offset: u64,
}

impl CapturedAddress {
    /// `addr` of a process whose mapping `m` holds it; `None` for anonymous memory or an
    /// address outside `m`.
    pub fn capture(m: &Mapping, addr: u64) -> Option<Self> {
        if !(m.start..m.end).contains(&addr) {
            return None;
        }
        let offset = if m.is_pseudo() { addr - m.start } else { m.file_offset(addr) };
        Some(CapturedAddress { file: FileIdentity::of(m)?, file_offset: offset })
    }
}

/// The address to look up for frame `index` of a stack, innermost first: the sampled pc
/// itself (frame 0), else the return address minus one, which lies in the call instruction
/// (the return address itself may be the first byte of the next function, or of another
/// line).
pub const fn lookup_address(index: usize, addr: u64) -> u64 {
    if index == 0 {
        addr
    } else {
        addr.wrapping_sub(1)
    }
}

/// A mapped object with what is read from it on demand: its load segments (cheap, enough
/// to place an address) and its symbol table (read only when DWARF has no name).
#[derive(Debug)]
pub struct ObjectInfo {
    object: MappedObject,
    symbols: std::sync::OnceLock<Option<crate::ElfSymbols>>,
    segments: std::sync::OnceLock<Option<LoadSegments>>,
}

impl ObjectInfo {
    /// Wraps an opened object; nothing is read yet.
    pub fn new(object: MappedObject) -> Self {
        ObjectInfo { object, symbols: Default::default(), segments: Default::default() }
    }

    /// The object.
    pub fn object(&self) -> &MappedObject {
        &self.object
    }

    /// Its symbol table, read on first use (`None` when it cannot be read).
    pub fn symbols(&self) -> Option<&crate::ElfSymbols> {
        self.symbols
            .get_or_init(|| match self.object.read_path() {
                Some(path) => crate::ElfSymbols::open(path).ok(),
                None => self
                    .object
                    .bytes()
                    .ok()
                    .and_then(|b| crate::ElfSymbols::from_bytes(self.object.path(), &b).ok()),
            })
            .as_ref()
    }

    /// The object's own address of file offset `offset`, from its load segments (or its
    /// symbol table, if already read).
    pub fn file_offset_to_vaddr(&self, offset: u64) -> Option<u64> {
        if let Some(Some(s)) = self.symbols.get() {
            return s.file_offset_to_vaddr(offset);
        }
        self.segments.get_or_init(|| self.object.load_segments().ok()).as_ref()?.file_offset_to_vaddr(offset)
    }

    /// Whether its segments or symbols, once needed, could not be read.
    pub fn unreadable(&self) -> bool {
        matches!(self.symbols.get(), Some(None)) || matches!(self.segments.get(), Some(None))
    }
}

/// A process's mappings when last read, and the object of each executable one.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// The mappings.
    pub maps: crate::ProcessMaps,
    refreshed: Option<std::time::Instant>,
    /// Per executable mapping's start: its object (`None`: it has none, or it could not be
    /// opened).
    pub objects: std::collections::HashMap<u64, Option<Arc<ObjectInfo>>>,
    /// Names of its JIT code, from its runtime's perf map (`None`: it has none).
    pub perf_map: Option<crate::PerfMap>,
    perf_map_read: Option<std::time::Instant>,
    /// The name each JIT address had when it was first seen: a runtime reuses code space,
    /// and the map's later entry for a range names later code, not what ran then.
    jit_names: std::collections::HashMap<u64, crate::name::Name>,
}

impl Snapshot {
    /// The mapping holding `addr` and its object.
    pub fn find(&self, addr: u64) -> Option<(&Mapping, Option<&Arc<ObjectInfo>>)> {
        let m = self.maps.find(addr)?;
        Some((m, self.objects.get(&m.start).and_then(|o| o.as_ref())))
    }

    /// The perf map's name for `addr` in anonymous executable memory (JIT code): the name
    /// it had when a stack holding it was first observed, else the map's now; `None` for
    /// any other address, or one no entry covers.
    pub fn jit_name(&self, addr: u64) -> Option<&crate::name::Name> {
        let m = self.maps.find(addr)?;
        if !is_jit_code(m) {
            return None;
        }
        self.jit_names.get(&addr).or_else(|| self.perf_map.as_ref()?.lookup(addr))
    }

    /// Reads the perf map again (what was appended) when an address in JIT code has no
    /// name yet, at most every [`MAPS_REFRESH_INTERVAL`].
    fn name_jit_code(&mut self, pid: u32, addrs: &[u64], now: std::time::Instant) {
        // Looked up as a stack's frames are (a return address one byte back).
        let jit: Vec<u64> = addrs
            .iter()
            .enumerate()
            .map(|(i, &a)| lookup_address(i, a))
            .filter(|&a| !self.jit_names.contains_key(&a) && self.maps.find(a).is_some_and(is_jit_code))
            .collect();
        if jit.is_empty() {
            return;
        }
        let unnamed = jit.iter().any(|&a| self.perf_map.as_ref().is_none_or(|p| p.lookup(a).is_none()));
        if unnamed && self.perf_map_read.is_none_or(|t| now.duration_since(t) >= MAPS_REFRESH_INTERVAL) {
            self.perf_map_read = Some(now);
            let map = self.perf_map.get_or_insert_with(Default::default);
            if !matches!(map.refresh(pid), Ok(true)) && map.is_empty() {
                self.perf_map = None;
            }
        }
        let Some(map) = &self.perf_map else { return };
        for a in jit {
            // Bounded: past the cap, later addresses are named from the map as it is then.
            if self.jit_names.len() >= MAX_JIT_NAMES {
                break;
            }
            if let Some(name) = map.lookup(a) {
                self.jit_names.insert(a, name.clone());
            }
        }
    }
}

/// Capture now, symbolize later: the mappings of each process (per program image, as a
/// process that calls `execve` gets new ones) read when its first addresses are seen, and
/// each executable mapping's object opened then, while the process lives, shared between
/// processes by [`FileIdentity`] and [`FileStamp`]. A snapshot is read again (at most
/// every [`MAPS_REFRESH_INTERVAL`]) when an address falls outside it.
#[derive(Debug, Default)]
pub struct Snapshots {
    processes: std::collections::HashMap<(u32, u32), Snapshot>,
    /// Perf maps of snapshots forgotten, and their stats.
    retired_perf_maps: (u64, crate::PerfMapStats),
    objects: std::collections::HashMap<(FileIdentity, Option<FileStamp>), Option<Arc<ObjectInfo>>>,
    open_errors: u64,
}

impl Snapshots {
    /// No snapshots.
    pub fn new() -> Self {
        Self::default()
    }

    /// A stack of `pid` (in its program image `generation`) was seen, its user frames
    /// innermost first (the sampled pc, then return addresses): snapshots the process the
    /// first time, and again when a frame is outside the snapshot; names the stack's JIT
    /// frames from the runtime's perf map as it is now (see [`Snapshot::jit_name`], which
    /// takes the address as [`lookup_address`] gives it).
    pub fn observe(&mut self, pid: u32, generation: u32, addrs: &[u64]) {
        let key = (pid, generation);
        let now = std::time::Instant::now();
        if let Some(p) = self.processes.get_mut(&key) {
            let outside = addrs.iter().any(|&a| p.maps.find(a).is_none());
            if !outside || p.refreshed.is_some_and(|t| now.duration_since(t) < MAPS_REFRESH_INTERVAL) {
                p.name_jit_code(pid, addrs, now);
                return;
            }
        }
        let Ok(maps) = crate::ProcessMaps::read(pid) else {
            // Exited already: keep what there was, or an empty snapshot.
            self.processes
                .entry(key)
                .or_insert_with(|| Snapshot { refreshed: Some(now), ..Default::default() });
            return;
        };
        let old = self.processes.remove(&key).unwrap_or_default();
        let mut objects = old.objects;
        for m in maps.iter().filter(|m| m.executable && m.path.is_some()) {
            if let std::collections::hash_map::Entry::Vacant(v) = objects.entry(m.start) {
                v.insert(self.open(pid, m));
            }
        }
        let mut snapshot = Snapshot {
            maps,
            refreshed: Some(now),
            objects,
            perf_map: old.perf_map,
            perf_map_read: old.perf_map_read,
            jit_names: old.jit_names,
        };
        snapshot.name_jit_code(pid, addrs, now);
        self.processes.insert(key, snapshot);
    }

    fn open(&mut self, pid: u32, m: &Mapping) -> Option<Arc<ObjectInfo>> {
        let key = (FileIdentity::of(m)?, FileStamp::of_mapping(pid, m));
        if let Some(o) = self.objects.get(&key) {
            return o.clone();
        }
        let opened = match MappedObject::open(pid, m) {
            Ok(object) => Some(Arc::new(ObjectInfo::new(object))),
            // `[stack]`, `[vsyscall]`: nothing to symbolize, nothing wrong.
            Err(Error::NotAnObject { .. }) => None,
            Err(_) => {
                self.open_errors += 1;
                None
            }
        };
        self.objects.insert(key, opened.clone());
        opened
    }

    /// The snapshot of `pid`'s program image `generation`.
    pub fn get(&self, pid: u32, generation: u32) -> Option<&Snapshot> {
        self.processes.get(&(pid, generation))
    }

    /// Keeps the snapshots `keep(pid, generation)` wants, and the objects they still map.
    pub fn retain(&mut self, mut keep: impl FnMut(u32, u32) -> bool) {
        let retired = &mut self.retired_perf_maps;
        self.processes.retain(|&(pid, generation), p| {
            let kept = keep(pid, generation);
            if let (false, Some(m)) = (kept, &p.perf_map) {
                retired.0 += 1;
                retired.1.add(&m.stats());
            }
            kept
        });
        let open_errors = &mut self.open_errors;
        self.objects.retain(|_, o| match o {
            Some(o) if Arc::strong_count(o) > 1 => true,
            Some(o) => {
                // Still counted in `errors` once forgotten.
                *open_errors += u64::from(o.unreadable());
                false
            }
            // Kept, so that an object that cannot be opened is tried and counted once.
            None => true,
        });
    }

    /// The perf maps read (JIT names) and what their reading kept and left out, summed
    /// over the snapshots held.
    pub fn perf_maps(&self) -> (u64, crate::PerfMapStats) {
        let (mut maps, mut total) = self.retired_perf_maps;
        for m in self.processes.values().filter_map(|p| p.perf_map.as_ref()) {
            maps += 1;
            total.add(&m.stats());
        }
        (maps, total)
    }

    /// Objects that could not be opened, or whose segments or symbols, once needed, could
    /// not be read.
    pub fn errors(&self) -> u64 {
        self.open_errors + self.objects.values().flatten().filter(|o| o.unreadable()).count() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ProcessMaps;

    fn own_mapping_of(addr: u64) -> Mapping {
        ProcessMaps::read(std::process::id()).unwrap().find(addr).cloned().expect("mapped")
    }

    #[test]
    fn a_code_address_is_captured_as_its_file_offset() {
        let pc = a_code_address_is_captured_as_its_file_offset as fn() as usize as u64;
        let m = own_mapping_of(pc);
        let c = CapturedAddress::capture(&m, pc).unwrap();
        let md = std::fs::metadata("/proc/self/exe").unwrap();
        assert!(matches!(&c.file, FileIdentity::Inode { inode, .. } if *inode == md.ino()), "{c:?}");
        // The file offset maps back to the same instruction through the ELF's segments.
        let object = MappedObject::open(std::process::id(), &m).unwrap();
        let vaddr = object.load_segments().unwrap().file_offset_to_vaddr(c.file_offset).unwrap();
        let bias = pc - vaddr;
        assert_eq!(bias % 4096, 0, "load bias {bias:#x} is page aligned");
        assert!(CapturedAddress::capture(&m, m.end).is_none());
    }

    #[test]
    fn the_vdso_is_copied_from_memory_and_is_elf() {
        let maps = ProcessMaps::read(std::process::id()).unwrap();
        let Some(m) = maps.iter().find(|m| m.path.as_deref() == Some(Path::new("[vdso]"))) else {
            return;
        };
        let object = MappedObject::open(std::process::id(), m).unwrap();
        assert_eq!(object.identity(), &FileIdentity::Pseudo("[vdso]".into()));
        assert!(object.file().is_none() && object.read_path().is_none());
        assert_eq!(&object.bytes().unwrap()[..4], b"\x7fELF");
        assert!(object.load_segments().is_ok());
    }

    #[test]
    fn anonymous_and_other_pseudo_mappings_have_no_object() {
        let maps = ProcessMaps::read(std::process::id()).unwrap();
        if let Some(stack) = maps.iter().find(|m| m.path.as_deref() == Some(Path::new("[stack]"))) {
            assert!(matches!(MappedObject::open(std::process::id(), stack), Err(Error::NotAnObject { .. })));
        }
        let anon = Mapping {
            start: 0x1000,
            end: 0x2000,
            executable: true,
            offset: 0,
            device: "00:00".into(),
            inode: 0,
            path: None,
        };
        assert!(FileIdentity::of(&anon).is_none());
        assert!(CapturedAddress::capture(&anon, 0x1800).is_none());
        assert!(MappedObject::open(std::process::id(), &anon).is_err());
    }

    #[test]
    fn a_file_rewritten_under_its_identity_has_another_stamp() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("object");
        std::fs::write(&path, vec![1u8; 8192]).unwrap();
        let file = std::fs::File::open(&path).unwrap();
        // SAFETY: a private read-only map of our own temporary file.
        let map = unsafe { memmap2::Mmap::map(&file) }.unwrap();
        let m = own_mapping_of(map.as_ptr() as u64);
        let object = MappedObject::open(std::process::id(), &m).unwrap();
        assert_eq!(object.stamp(), FileStamp::of_mapping(std::process::id(), &m), "unchanged");
        // Rewritten in place: same device and inode (the same FileIdentity), new contents.
        std::thread::sleep(Duration::from_millis(20));
        std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(4096).unwrap();
        assert_eq!(FileIdentity::of(&own_mapping_of(map.as_ptr() as u64)), Some(object.identity().clone()));
        assert_ne!(object.stamp(), FileStamp::of_mapping(std::process::id(), &m), "rewritten");
        drop(map);
    }

    #[test]
    fn snapshots_open_each_object_once_and_forget_what_no_process_maps() {
        let pid = std::process::id();
        let pc = snapshots_open_each_object_once_and_forget_what_no_process_maps as fn() as usize as u64;
        let mut s = Snapshots::new();
        s.observe(pid, 0, &[pc]);
        s.observe(pid, 1, &[pc]);
        let (m0, o0) = s.get(pid, 0).unwrap().find(pc).unwrap();
        let (_, o1) = s.get(pid, 1).unwrap().find(pc).unwrap();
        assert!(Arc::ptr_eq(o0.unwrap(), o1.unwrap()), "one object for both snapshots");
        let offset = CapturedAddress::capture(m0, pc).unwrap().file_offset;
        assert!(o0.unwrap().file_offset_to_vaddr(offset).is_some());
        assert_eq!(s.errors(), 0);
        s.retain(|_, g| g == 1);
        assert!(s.get(pid, 0).is_none() && s.get(pid, 1).is_some());
        s.retain(|_, _| false);
        assert!(s.objects.values().all(|o| o.is_none()), "objects no snapshot maps are closed");
    }

    #[test]
    fn return_addresses_are_looked_up_one_byte_back() {
        assert_eq!(lookup_address(0, 0x1000), 0x1000);
        assert_eq!(lookup_address(1, 0x1000), 0xfff);
        assert_eq!(lookup_address(7, 0), u64::MAX);
    }
}
