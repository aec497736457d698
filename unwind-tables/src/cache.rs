//! On-disk cache of compiled tables, keyed by build-id (or a content hash when the file
//! has none), zstd-compressed and versioned. A cache file that is corrupt, truncated or
//! of another version is rebuilt, never trusted.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::layout::FORMAT_VERSION;
use crate::{Error, UnwindTable};

const CACHE_MAGIC: &[u8; 8] = b"UWTCACHE";

/// A directory of cached tables.
#[derive(Clone, Debug)]
pub struct TableCache {
    dir: PathBuf,
}

/// Whether [`TableCache::get_or_compile`] found the table or compiled it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum CacheOutcome {
    /// Read from the cache.
    Hit,
    /// Compiled and stored (no cache file of this format).
    Compiled,
    /// Compiled and stored in place of a cache file that could not be used (truncated,
    /// corrupt, or not a cache file): never trusted, and worth counting.
    Rebuilt,
}

impl TableCache {
    /// A cache in `dir` (created on first store).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        TableCache { dir: dir.into() }
    }

    /// The cache key of an ELF file: its GNU build-id in hex, or `c64-`, a 64-bit hash of
    /// its bytes and its length when it has none.
    pub fn key(data: &[u8]) -> String {
        use object::Object;
        if let Ok(f) = object::File::parse(data) {
            if let Ok(Some(id)) = f.build_id() {
                return id.iter().map(|b| format!("{b:02x}")).collect();
            }
        }
        format!("c64-{:016x}-{}", content_hash(data), data.len())
    }

    fn path_for(&self, key: &str) -> PathBuf {
        self.dir.join(format!("{key}.v{FORMAT_VERSION}.uwt.zst"))
    }

    /// The table of the ELF file at `path`, from the cache when a valid entry exists.
    pub fn get_or_compile(&self, path: &Path) -> Result<(UnwindTable, CacheOutcome), Error> {
        let data = std::fs::read(path).map_err(|e| Error::Io { path: path.into(), source: e })?;
        self.get_or_compile_elf(&data)
    }

    /// The table of an ELF image in memory (a mapped file), from the cache when a valid
    /// entry exists.
    ///
    /// ```no_run
    /// use unwound_unwind_tables::cache::{CacheOutcome, TableCache};
    /// let cache = TableCache::new("/tmp/unwound-tables");
    /// let data = std::fs::read("/usr/lib/x86_64-linux-gnu/libc.so.6").unwrap();
    /// let (table, outcome) = cache.get_or_compile_elf(&data).unwrap();
    /// println!("{} entries ({outcome:?})", table.entries().len());
    /// ```
    pub fn get_or_compile_elf(&self, data: &[u8]) -> Result<(UnwindTable, CacheOutcome), Error> {
        let key = Self::key(data);
        let file = self.path_for(&key);
        if let Some(t) = self.read(&file) {
            return Ok((t, CacheOutcome::Hit));
        }
        let damaged = file.exists();
        let table = crate::compile_elf(data)?;
        // A failed store costs only the next compile.
        if self.write(&file, &table).is_ok() {
            self.remove_other_versions(&key);
            self.remove_retired_keys(&key);
        }
        Ok((table, if damaged { CacheOutcome::Rebuilt } else { CacheOutcome::Compiled }))
    }

    /// Deletes this key's files of older format versions: they are never read again. Newer
    /// ones are left to the newer version that wrote them (two versions may share a cache
    /// during an upgrade).
    fn remove_other_versions(&self, key: &str) {
        for v in 1..FORMAT_VERSION {
            let _ = std::fs::remove_file(self.dir.join(format!("{key}.v{v}.uwt.zst")));
        }
    }

    /// Deletes the entries that files without a build-id had under the byte-wise FNV-1a
    /// keys before (`fnv-HASH-LEN`), of the same length as `key`'s file: those names are
    /// never read again, and computing the old hash to find the one would cost what the
    /// new key saves. Another file of that length loses only an entry never read again.
    fn remove_retired_keys(&self, key: &str) {
        let Some(len) = key.strip_prefix("c64-").and_then(|k| k.rsplit('-').next()) else { return };
        let Ok(dir) = std::fs::read_dir(&self.dir) else { return };
        let tail = format!("-{len}.v");
        for e in dir.flatten() {
            let name = e.file_name();
            let name = name.to_string_lossy();
            if name.starts_with("fnv-") && name.contains(&tail) && name.ends_with(".uwt.zst") {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }

    fn read(&self, file: &Path) -> Option<UnwindTable> {
        /// Most bytes a cache file may expand to.
        const MAX_EXPANDED: u64 = 1 << 30;
        let compressed = std::fs::read(file).ok()?;
        // 1 GiB cap on what a cache file may expand to; the buffer grows with what is
        // actually decompressed (a bulk decompression would reserve the whole cap).
        let mut raw = Vec::new();
        let decoder = zstd::stream::read::Decoder::new(&compressed[..]).ok()?;
        std::io::Read::read_to_end(&mut std::io::Read::take(decoder, MAX_EXPANDED + 1), &mut raw).ok()?;
        if raw.len() as u64 > MAX_EXPANDED {
            return None;
        }
        let body = raw.strip_prefix(&CACHE_MAGIC[..])?;
        let (sum, table) = body.split_at_checked(8)?;
        if u64::from_le_bytes(sum.try_into().ok()?) != checksum(table) {
            return None;
        }
        UnwindTable::from_bytes(table).ok()
    }

    fn write(&self, file: &Path, table: &UnwindTable) -> std::io::Result<()> {
        std::fs::create_dir_all(&self.dir)?;
        let bytes = table.to_bytes();
        let mut raw = Vec::with_capacity(bytes.len() + 16);
        raw.extend_from_slice(CACHE_MAGIC);
        raw.extend_from_slice(&checksum(&bytes).to_le_bytes());
        raw.extend_from_slice(&bytes);
        let compressed = zstd::bulk::compress(&raw, 3)?;
        let tmp = file.with_extension(format!("tmp{}", std::process::id()));
        let mut f = std::fs::File::create(&tmp)?;
        // No fsync: a file cut short by a crash fails its checksum and is rebuilt.
        f.write_all(&compressed)?;
        std::fs::rename(&tmp, file)
    }
}

/// A hash of a whole file, for files without a build-id (Go binaries of 100 MB and more
/// among them): 8-byte words in four independent lanes, multiplied and folded, so it runs
/// near memory speed where a byte-wise hash takes a cycle or more per byte. Stable across
/// runs and machines (it names cache files).
fn content_hash(data: &[u8]) -> u64 {
    const K: [u64; 4] =
        [0x9e37_79b9_7f4a_7c15, 0xc2b2_ae3d_27d4_eb4f, 0x1656_67b1_9e37_79f9, 0xff51_afd7_ed55_8ccd];
    let mix = |h: u64, w: u64, k: u64| {
        let x = (h ^ w).wrapping_mul(k);
        x ^ (x >> 29)
    };
    let mut lanes = K;
    let mut blocks = data.chunks_exact(32);
    for b in &mut blocks {
        for (i, lane) in lanes.iter_mut().enumerate() {
            let w = u64::from_le_bytes(b[i * 8..i * 8 + 8].try_into().unwrap());
            *lane = mix(*lane, w, K[i]);
        }
    }
    let mut h = lanes.iter().fold(data.len() as u64, |h, &l| mix(h, l, K[0]));
    for chunk in blocks.remainder().chunks(8) {
        let mut v = [0u8; 8];
        v[..chunk.len()].copy_from_slice(chunk);
        h = mix(h, u64::from_le_bytes(v), K[1]);
    }
    mix(h, h >> 32, K[2])
}

fn checksum(b: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for chunk in b.chunks(8) {
        let mut v = [0u8; 8];
        v[..chunk.len()].copy_from_slice(chunk);
        h = (h ^ u64::from_le_bytes(v)).wrapping_mul(0x100000001b3);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::content_hash;

    /// The hash itself takes the length and every byte, also of inputs shorter than one
    /// 32-byte block (the tail alone) and of zero bytes added at the end.
    #[test]
    fn content_hash_takes_every_byte_and_the_length() {
        let data: Vec<u8> = (0..77u32).map(|i| (i * 13 % 256) as u8).collect();
        for n in [0, 1, 7, 8, 9, 31, 32, 33, 64, 77] {
            let d = &data[..n];
            let mut padded = d.to_vec();
            padded.push(0);
            assert_ne!(content_hash(d), content_hash(&padded), "a zero byte added to {n} bytes");
            for at in 0..n {
                let mut v = d.to_vec();
                v[at] ^= 1;
                assert_ne!(content_hash(d), content_hash(&v), "byte {at} of {n}");
            }
        }
    }
}
