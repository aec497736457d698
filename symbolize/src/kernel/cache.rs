//! The on-disk cache of the kernel's symbols: keyed by boot and loaded modules, stored in
//! zstd blocks of [`CACHE_BLOCK`] symbols after a directory of each block's first and last
//! address, so that a load decompresses only the blocks its addresses fall in.

use std::io::Write;
use std::path::{Path, PathBuf};

use super::{read_capped, Entry, KernelSymbols, MAX_KALLSYMS};
use crate::Error;

#[cfg(test)]
mod tests;

/// Magic and version of a cached symbol list.
const CACHE_MAGIC: &[u8; 12] = b"unwound-ksy3";
/// Symbols per block of a cache file. Blocks are compressed apart, and a load decompresses
/// only those its addresses fall in: a profile's kernel frames touch a few dozen of the
/// kernel's hundred-odd blocks, and the whole list (5 MiB for 120,000 symbols) took
/// longer to decompress than the rest of a short recording's finish.
const CACHE_BLOCK: usize = 1024;

impl KernelSymbols {
    /// The symbols for `addresses`, from a cache in `cache_dir` when it covers them all,
    /// else from `/proc/kallsyms` (then cached). Reading `/proc/kallsyms` costs tens of
    /// milliseconds of kernel time (every line is formatted on each read); the cache
    /// holds the kernel image's and modules' symbols, keyed by boot (`boot_id`) and the
    /// loaded modules (`/proc/modules`, with their addresses). BPF programs and ftrace
    /// trampolines come and go without changing either, so they are never cached: an
    /// address outside the cached image and modules is read from `/proc/kallsyms`.
    ///
    /// A list read from the cache holds only the blocks of symbols around `addresses`
    /// (a few hundred microseconds instead of decompressing every symbol); an address
    /// outside them finds no symbol rather than a wrong one.
    ///
    /// ```no_run
    /// let dir = std::env::temp_dir().join("unwound-kernel-doc");
    /// let k = unwound_symbolize::KernelSymbols::load_cached(&dir, &[0xffffffff81000000])?;
    /// println!("{:?}", k.lookup(0xffffffff81000000));
    /// # Ok::<(), unwound_symbolize::Error>(())
    /// ```
    pub fn load_cached(cache_dir: &Path, addresses: &[u64]) -> Result<Self, Error> {
        Self::load_cached_from(
            Path::new("/proc/kallsyms"),
            Path::new("/proc/modules"),
            Path::new("/proc/sys/kernel/random/boot_id"),
            Path::new("/sys/module"),
            cache_dir,
            addresses,
        )
    }

    /// [`KernelSymbols::load_cached`] with the sources named (for tests).
    fn load_cached_from(
        kallsyms: &Path,
        modules: &Path,
        boot_id: &Path,
        sys_module: &Path,
        cache_dir: &Path,
        addresses: &[u64],
    ) -> Result<Self, Error> {
        // A kernel built without module support has no /proc/modules.
        let modules_text = match read_capped(modules) {
            Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                Some(String::new())
            }
            other => other.ok(),
        };
        // Without a key nothing is cached: read the source.
        let (Ok(boot), Some(modules_text)) = (read_capped(boot_id), modules_text) else {
            return Self::load_from(kallsyms);
        };
        // Each module's name, size, state and address: not its use count or users, which
        // change while it stays where it is.
        let modules: Vec<Vec<&str>> = modules_text
            .lines()
            .map(|l| {
                let f: Vec<&str> = l.split_ascii_whitespace().collect();
                [0, 1, 4, 5].iter().filter_map(|&i| f.get(i).copied()).collect()
            })
            .collect();
        // A module rebuilt and loaded again often has the same size and address: its build
        // id (or, without one, its source version) tells the builds apart.
        let identity = modules
            .iter()
            .map(|m| {
                let build = m.first().map_or_else(Vec::new, |name| module_build(&sys_module.join(name)));
                format!("{} {}", m.join(" "), build.iter().map(|b| format!("{b:02x}")).collect::<String>())
            })
            .collect::<Vec<_>>()
            .join("\n");
        let key = crate::fnv(boot.bytes().chain([0]).chain(identity.bytes()));
        let path = cache_dir.join(format!("kallsyms-{key:016x}.zst"));
        let cached = read_cache(&path, addresses);
        match cached {
            Some(c) if addresses.iter().all(|&a| c.covers(a)) => return Ok(c),
            _ => {}
        }
        let live = Self::from_text(&read_capped(kallsyms)?)?;
        // A module still loading lists its init code too, in memory freed once it is live:
        // no cache then. A good cache stays as it is.
        let settled = modules.iter().all(|m| m.get(2) == Some(&"Live"));
        if cached.is_none() && settled {
            let names = modules.iter().filter_map(|m| m.first().copied()).collect();
            // A cache that cannot be written only costs the next run this read.
            let _ = write_cache(&path, &live.cacheable(&names));
        }
        Ok(live)
    }

    /// Whether `addr` lies between the first and last symbol of the kernel image or of one
    /// module: then no symbol missing from a cached list (a BPF program, a trampoline)
    /// can be the one at or before it.
    fn covers(&self, addr: u64) -> bool {
        // The next symbol belongs to the same object: addr is inside that object's range.
        self.index_at(addr)
            .is_some_and(|i| self.entries.get(i + 1).is_some_and(|n| n.module == self.entries[i].module))
    }

    /// Entries `range` as a list of their own (module numbers kept, no module names).
    fn slice(&self, range: std::ops::Range<usize>) -> KernelSymbols {
        let mut out = KernelSymbols::default();
        for e in &self.entries[range] {
            let name = self.name_of(e);
            out.entries.push(Entry { name: out.names.len() as u32, ..*e });
            out.names.push_str(name);
        }
        out
    }

    /// The symbols of the kernel image and of the modules in `modules` (not BPF programs
    /// or trampolines, which kallsyms lists as pseudo-modules).
    fn cacheable(&self, modules: &std::collections::HashSet<&str>) -> KernelSymbols {
        let mut out = KernelSymbols::default();
        let mut ids = vec![0u32; self.modules.len()];
        for e in &self.entries {
            let module = match e.module.checked_sub(1) {
                None => 0,
                Some(m) if !modules.contains(&*self.modules[m as usize]) => continue,
                Some(m) => {
                    if ids[m as usize] == 0 {
                        out.modules.push(self.modules[m as usize].clone());
                        ids[m as usize] = out.modules.len() as u32;
                    }
                    ids[m as usize]
                }
            };
            let name = self.name_of(e);
            out.entries.push(Entry {
                addr: e.addr,
                name: out.names.len() as u32,
                name_len: e.name_len,
                module,
            });
            out.names.push_str(name);
        }
        out
    }

    /// The cache file's payload (before compression): counts, entries, names, modules.
    fn to_bytes(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(12 + self.entries.len() * 20 + self.names.len());
        for n in [self.entries.len(), self.names.len(), self.modules.len()] {
            b.extend_from_slice(&(n as u32).to_le_bytes());
        }
        for e in &self.entries {
            b.extend_from_slice(&e.addr.to_le_bytes());
            for v in [e.name, e.name_len, e.module] {
                b.extend_from_slice(&v.to_le_bytes());
            }
        }
        b.extend_from_slice(self.names.as_bytes());
        for m in &self.modules {
            b.extend_from_slice(&(m.len() as u32).to_le_bytes());
            b.extend_from_slice(m.as_bytes());
        }
        b
    }

    /// Reads [`KernelSymbols::to_bytes`]; `None` on anything inconsistent.
    #[cfg(test)]
    fn from_bytes(b: &[u8]) -> Option<Self> {
        Self::from_bytes_with(b, 0)
    }

    /// [`KernelSymbols::from_bytes`] for one block of a cache file, whose entries may name
    /// any of the file's `file_modules` modules.
    fn from_bytes_with(b: &[u8], file_modules: usize) -> Option<Self> {
        let mut pos = 0usize;
        let mut take = |n: usize| -> Option<&[u8]> {
            let s = b.get(pos..pos.checked_add(n)?)?;
            pos += n;
            Some(s)
        };
        let u32_of = |s: &[u8]| u32::from_le_bytes(s.try_into().expect("4 bytes"));
        let (n, names_len, n_modules) =
            (u32_of(take(4)?) as usize, u32_of(take(4)?) as usize, u32_of(take(4)?) as usize);
        let raw = take(n.checked_mul(20)?)?;
        let names = std::str::from_utf8(take(names_len)?).ok()?.to_owned();
        let mut modules = Vec::with_capacity(n_modules.min(1 << 16));
        for _ in 0..n_modules {
            let len = u32_of(take(4)?) as usize;
            modules.push(std::str::from_utf8(take(len)?).ok()?.into());
        }
        let mut entries = Vec::with_capacity(n);
        for r in raw.chunks_exact(20) {
            let e = Entry {
                addr: u64::from_le_bytes(r[..8].try_into().expect("8 bytes")),
                name: u32_of(&r[8..12]),
                name_len: u32_of(&r[12..16]),
                module: u32_of(&r[16..20]),
            };
            let end = e.name.checked_add(e.name_len)? as usize;
            let sorted = entries.last().is_none_or(|p: &Entry| p.addr < e.addr);
            if !sorted
                || end > names.len()
                || !names.is_char_boundary(e.name as usize)
                || !names.is_char_boundary(end)
                || e.module as usize > modules.len().max(file_modules)
            {
                return None;
            }
            entries.push(e);
        }
        Some(KernelSymbols { entries, names, modules, spans: Vec::new() })
    }
}

/// What tells one build of a loaded module from another: its build-id note, else its
/// `srcversion`, else nothing (both are small; read capped).
fn module_build(dir: &Path) -> Vec<u8> {
    use std::io::Read;
    let read = |p: PathBuf| -> Option<Vec<u8>> {
        let mut v = Vec::new();
        std::fs::File::open(p).ok()?.take(4096).read_to_end(&mut v).ok()?;
        Some(v)
    };
    read(dir.join("notes/.note.gnu.build-id")).or_else(|| read(dir.join("srcversion"))).unwrap_or_default()
}

/// The cached symbols of the blocks `addresses` fall in (and of the block after, where
/// an address is at or past its block's last symbol: what follows it decides
/// [`KernelSymbols::covers`]). `None` when the file is missing, of another version or
/// damaged anywhere it is read.
fn read_cache(path: &Path, addresses: &[u64]) -> Option<KernelSymbols> {
    let bytes = std::fs::read(path).ok()?;
    let rest = bytes.strip_prefix(CACHE_MAGIC.as_slice())?;
    let mut pos = 0usize;
    let mut take = |n: usize| -> Option<&[u8]> {
        let s = rest.get(pos..pos.checked_add(n)?)?;
        pos += n;
        Some(s)
    };
    let u32_at = |s: &[u8]| u32::from_le_bytes(s.try_into().expect("4 bytes")) as usize;
    let u64_at = |s: &[u8]| u64::from_le_bytes(s.try_into().expect("8 bytes"));
    let (n_blocks, n_modules) = (u32_at(take(4)?), u32_at(take(4)?));
    let mut modules: Vec<Box<str>> = Vec::with_capacity(n_modules.min(1 << 16));
    for _ in 0..n_modules {
        let len = u32_at(take(4)?);
        modules.push(std::str::from_utf8(take(len)?).ok()?.into());
    }
    // Each block's first and last symbol's address and its compressed length.
    let mut blocks: Vec<(u64, u64, usize)> = Vec::with_capacity(n_blocks.min(1 << 20));
    for _ in 0..n_blocks {
        let (first, last, len) = (u64_at(take(8)?), u64_at(take(8)?), u32_at(take(4)?));
        if first > last || blocks.last().is_some_and(|b| b.1 >= first) {
            return None;
        }
        blocks.push((first, last, len));
    }
    let sum = crate::fnv(rest[..pos].iter().copied());
    if rest.get(pos..pos + 8)? != sum.to_le_bytes() {
        return None;
    }
    pos += 8;
    // Where each block's bytes start, after the directory.
    let mut at = Vec::with_capacity(blocks.len() + 1);
    at.push(pos);
    for b in &blocks {
        at.push(at.last()?.checked_add(b.2)?);
    }
    if *at.last()? != rest.len() || blocks.is_empty() {
        return None;
    }
    let mut wanted = vec![false; blocks.len()];
    for &a in addresses {
        let Some(k) = blocks.partition_point(|b| b.0 <= a).checked_sub(1) else { continue };
        wanted[k] = true;
        if a >= blocks[k].1 && k + 1 < blocks.len() {
            wanted[k + 1] = true;
        }
    }
    let mut z = zstd::bulk::Decompressor::new().ok()?;
    let mut raw = Vec::new();
    let mut out = KernelSymbols { modules, ..KernelSymbols::default() };
    for (k, b) in blocks.iter().enumerate().filter(|(k, _)| wanted[*k]) {
        // The frame says its size (as much as it may claim is capped): one buffer serves
        // every block.
        let src = &rest[at[k]..at[k + 1]];
        let size = zstd::zstd_safe::get_frame_content_size(src).ok()??;
        raw.clear();
        raw.reserve(usize::try_from(size).ok().filter(|&n| n <= MAX_KALLSYMS)?);
        z.decompress_to_buffer(src, &mut raw).ok()?;
        let block = KernelSymbols::from_bytes_with(&raw, out.modules.len())?;
        let (first, last) = (block.entries.first()?.addr, block.entries.last()?.addr);
        if (first, last) != (b.0, b.1) || block.entries.len() > CACHE_BLOCK {
            return None;
        }
        // Up to the next block's first symbol, every symbol is here.
        let end = blocks.get(k + 1).map_or(u64::MAX, |n| n.0);
        match out.spans.last_mut() {
            Some(s) if s.1 == first => s.1 = end,
            _ => out.spans.push((first, end)),
        }
        // Name offsets stay within u32 (the block's own are within its names).
        let base = u32::try_from(out.names.len()).ok()?;
        u32::try_from(out.names.len() + block.names.len()).ok()?;
        out.entries.extend(block.entries.iter().map(|e| Entry { name: base + e.name, ..*e }));
        out.names.push_str(&block.names);
    }
    if out.spans.is_empty() {
        // No address needed a symbol: an empty list that covers nothing.
        out.spans.push((0, 0));
    }
    Some(out)
}

/// Writes the list beside its final path and renames it into place; other boots' lists
/// in the directory are removed (never read again).
fn write_cache(path: &Path, syms: &KernelSymbols) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let mut tmp = tempfile::Builder::new().prefix(".kallsyms-").tempfile_in(dir)?;
    let mut head = CACHE_MAGIC.to_vec();
    let blocks = (0..syms.entries.len())
        .step_by(CACHE_BLOCK)
        .map(|i| {
            let block = syms.slice(i..(i + CACHE_BLOCK).min(syms.entries.len()));
            // With zstd's content checksum: a damaged block fails to decompress.
            let mut z = zstd::bulk::Compressor::new(3)?;
            z.set_parameter(zstd::zstd_safe::CParameter::ChecksumFlag(true))?;
            Ok((
                block.entries[0].addr,
                block.entries[block.entries.len() - 1].addr,
                z.compress(&block.to_bytes())?,
            ))
        })
        .collect::<std::io::Result<Vec<(u64, u64, Vec<u8>)>>>()?;
    for n in [blocks.len(), syms.modules.len()] {
        head.extend_from_slice(&(n as u32).to_le_bytes());
    }
    for m in &syms.modules {
        head.extend_from_slice(&(m.len() as u32).to_le_bytes());
        head.extend_from_slice(m.as_bytes());
    }
    for (first, last, z) in &blocks {
        head.extend_from_slice(&first.to_le_bytes());
        head.extend_from_slice(&last.to_le_bytes());
        head.extend_from_slice(&(z.len() as u32).to_le_bytes());
    }
    // The directory's checksum closes it.
    let sum = crate::fnv(head[CACHE_MAGIC.len()..].iter().copied());
    head.extend_from_slice(&sum.to_le_bytes());
    tmp.write_all(&head)?;
    for (.., z) in &blocks {
        tmp.write_all(z)?;
    }
    tmp.persist(path).map_err(|e| e.error)?;
    let keep = path.file_name();
    for old in std::fs::read_dir(dir)?.flatten() {
        let name = old.file_name();
        let n = name.to_string_lossy();
        let stale = n.starts_with("kallsyms-") && n.ends_with(".zst") && Some(name.as_os_str()) != keep;
        // A temporary file of a writer that died; another's in flight is seconds old.
        let orphan = n.starts_with(".kallsyms-")
            && old
                .metadata()
                .and_then(|m| m.modified())
                .is_ok_and(|t| t.elapsed().is_ok_and(|age| age > std::time::Duration::from_secs(3600)));
        if stale || orphan {
            let _ = std::fs::remove_file(old.path());
        }
    }
    Ok(())
}
