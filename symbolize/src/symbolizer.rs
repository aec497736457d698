//! The [`Symbolizer`]: addresses in, frames with function, file, line and inline chain out.
//!
//! - `binary`: opening a binary: its index from the on-disk cache, or built from the DWARF
//!   of the file or of a separate debug file;
//! - `lookup`: answering a batch of file addresses from a binary's index blocks;
//! - `process`: addresses of a running process, through its mappings and perf map.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::debuginfo::DebugSource;
use crate::index::Lookup;
use crate::{Error, Options, Resolution};

mod binary;
mod lookup;
mod process;

use binary::{Binary, FileId};

/// Largest MiniDebugInfo (`.gnu_debugdata`) accepted, decompressed.
pub const MAX_MINI_DEBUGINFO: u64 = 512 << 20;
/// Most DWARF bytes accepted from one file, all sections together, uncompressed (and never
/// more than 64 times the file's size plus 64 MiB).
pub const MAX_DWARF_SECTION: u64 = 4 << 30;

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
    /// Binaries closed by [`Symbolizer::release_unused`].
    pub binaries_released: u64,
    /// Binaries open now (each with its file, index and symbols).
    pub binaries_open: u64,
}

/// Decompressed blocks of every binary, by (binary, block), and their bytes in all.
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
    /// Calls of `release_unused` so far; a binary records it when a lookup takes it. Read
    /// and changed under the `binaries` lock.
    epoch: AtomicU64,
    stats: Mutex<Stats>,
    /// A debuginfod request failed: the servers are down or unreachable, and each further
    /// request would wait out the timeout again.
    debuginfod_down: std::sync::atomic::AtomicBool,
    /// `.debug_info` bytes from which a file is indexed in the background (tests lower it).
    lazy_dwarf: usize,
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
            epoch: AtomicU64::new(0),
            stats: Mutex::new(Stats::default()),
            debuginfod_down: std::sync::atomic::AtomicBool::new(false),
            lazy_dwarf: binary::LAZY_DWARF,
        }
    }

    /// Counters so far.
    pub fn stats(&self) -> Stats {
        let mut s = *self.stats.lock().expect("stats lock");
        s.resident_bytes = self.lru.lock().expect("lru lock").bytes as u64;
        s.binaries_open = self.binaries.lock().expect("binaries lock").len() as u64;
        s
    }

    /// Closes every binary that no lookup used since the previous call (or since the
    /// symbolizer was made, on the first call), and drops its decompressed blocks; returns
    /// how many were closed. Call it now and then (say once a minute) in a long-running
    /// process, or binaries that come and go (builds, upgrades) keep their files and memory
    /// open forever.
    ///
    /// A binary a batch is using now, or whose index is being built in the background, is
    /// kept. A released binary is opened again by its next lookup, from the on-disk cache
    /// when there is one, with the same answers. Safe to call while other threads
    /// symbolize.
    pub fn release_unused(&self) -> usize {
        let released: Vec<Arc<Binary>> = {
            // Lock order: `binaries`, then `lru`; nothing takes them the other way round.
            let mut binaries = self.binaries.lock().expect("binaries lock");
            let epoch = self.epoch.fetch_add(1, Ordering::Relaxed);
            let unused: Vec<FileId> = binaries
                .iter()
                .filter(|(_, b)| {
                    b.last_used.load(Ordering::Relaxed) < epoch && Arc::strong_count(b) == 1 && !b.building()
                })
                .map(|(fid, _)| *fid)
                .collect();
            let released = unused.iter().filter_map(|fid| binaries.remove(fid)).collect();
            // The blocks of every binary no longer open, those dropped earlier after an
            // error included.
            let open: HashSet<u64> = binaries.values().map(|b| b.id).collect();
            let mut lru = self.lru.lock().expect("lru lock");
            let stale: Vec<(u64, u32)> =
                lru.blocks.iter().map(|(k, _)| *k).filter(|(id, _)| !open.contains(id)).collect();
            for k in stale {
                if let Some(b) = lru.blocks.pop(&k) {
                    lru.bytes = lru.bytes.saturating_sub(b.heap_bytes());
                }
            }
            released
        };
        // Build locks no open is waiting for.
        self.building.lock().expect("building lock").retain(|_, l| Arc::strong_count(l) > 1);
        self.stats.lock().expect("stats lock").binaries_released += released.len() as u64;
        // Their files are closed here, outside the locks.
        released.len()
    }

    /// Where the DWARF of the ELF file at `path` comes from (reads and indexes it if needed).
    pub fn debug_source(&self, path: impl AsRef<Path>) -> Result<DebugSource, Error> {
        Ok(self.binary(path.as_ref())?.debug.clone())
    }

    /// Symbolizes file virtual addresses of the ELF file at `path`: one result per address,
    /// in input order. An error is returned only when the file itself cannot be used.
    pub fn symbolize_elf(&self, path: impl AsRef<Path>, addrs: &[u64]) -> Result<Vec<Resolution>, Error> {
        let bin = self.binary(path.as_ref())?;
        self.run(&bin, addrs)
    }
}
