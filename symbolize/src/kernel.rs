use std::io::Write;
use std::path::{Path, PathBuf};

use crate::Error;

/// A kernel symbol found for an address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelSymbol<'a> {
    /// Symbol name.
    pub name: &'a str,
    /// The module it belongs to, `None` for the kernel image.
    pub module: Option<&'a str>,
    /// How far into the symbol the address is.
    pub offset: u64,
}

/// Largest kallsyms text read (from `/proc` or a cache file): 256 MiB.
const MAX_KALLSYMS: usize = 256 << 20;
/// Magic and version of a cached symbol list.
const CACHE_MAGIC: &[u8; 12] = b"unwound-ksy3";
/// Symbols per block of a cache file. Blocks are compressed apart, and a load decompresses
/// only those its addresses fall in: a profile's kernel frames touch a few dozen of the
/// kernel's hundred-odd blocks, and the whole list (5 MiB for 120,000 symbols) took
/// longer to decompress than the rest of a short recording's finish.
const CACHE_BLOCK: usize = 1024;

/// One symbol: address, name as a range of `names`, module index + 1 (0 = kernel image).
#[derive(Clone, Copy, Debug)]
struct Entry {
    addr: u64,
    name: u32,
    name_len: u32,
    module: u32,
}

/// The running kernel's text symbols, from `/proc/kallsyms`.
#[derive(Clone, Debug, Default)]
pub struct KernelSymbols {
    entries: Vec<Entry>,
    names: String,
    modules: Vec<Box<str>>,
    /// For a list read in part from a cache, the address ranges it holds every symbol of
    /// (sorted, apart); empty for a whole list.
    spans: Vec<(u64, u64)>,
}

impl KernelSymbols {
    /// Reads `/proc/kallsyms`.
    pub fn load() -> Result<Self, Error> {
        Self::load_from(Path::new("/proc/kallsyms"))
    }

    /// Reads a file in the format of `/proc/kallsyms`.
    pub fn load_from(path: &Path) -> Result<Self, Error> {
        Self::from_text(&read_capped(path)?)
    }

    /// [`KernelSymbols::parse`], where text without one usable address means hidden ones.
    fn from_text(text: &str) -> Result<Self, Error> {
        let syms = Self::parse(text);
        if syms.entries.is_empty() && !text.is_empty() {
            return Err(Error::KernelAddressesHidden);
        }
        Ok(syms)
    }

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

    /// Parses kallsyms text. Only text symbols (`t`/`T`, and `w`/`W`) with a non-zero
    /// address are kept.
    ///
    /// ```
    /// let k = unwound_symbolize::KernelSymbols::parse(
    ///     "ffffffff81000000 T _stext\nffffffff81000100 t do_thing\nffffffffc0000000 t modfn\t[kvm]\n",
    /// );
    /// let s = k.lookup(0xffffffff81000105).unwrap();
    /// assert_eq!((s.name, s.offset), ("do_thing", 5));
    /// assert_eq!(k.lookup(0xffffffffc0000010).unwrap().module, Some("kvm"));
    /// ```
    pub fn parse(text: &str) -> Self {
        let mut syms = KernelSymbols::default();
        syms.names.reserve(text.len() / 3);
        let mut module_ids: std::collections::HashMap<&str, u32> = std::collections::HashMap::new();
        for line in text.lines() {
            let mut f = line.split_ascii_whitespace();
            let (Some(addr), Some(kind), Some(name)) = (f.next(), f.next(), f.next()) else { continue };
            if !matches!(kind, "t" | "T" | "w" | "W") {
                continue;
            }
            let Ok(addr) = u64::from_str_radix(addr, 16) else { continue };
            if addr == 0
                || name.len() > u32::MAX as usize
                || syms.names.len() > (u32::MAX as usize - name.len())
            {
                continue;
            }
            let module = match f.next().map(|m| m.trim_start_matches('[').trim_end_matches(']')) {
                None => 0,
                Some(m) => *module_ids.entry(m).or_insert_with(|| {
                    syms.modules.push(m.into());
                    syms.modules.len() as u32
                }),
            };
            syms.entries.push(Entry {
                addr,
                name: syms.names.len() as u32,
                name_len: name.len() as u32,
                module,
            });
            syms.names.push_str(name);
        }
        let names = &syms.names;
        let name_of = |e: &Entry| &names[e.name as usize..(e.name + e.name_len) as usize];
        syms.entries.sort_unstable_by(|a, b| {
            a.addr.cmp(&b.addr).then_with(|| name_of(a).cmp(name_of(b))).then(a.module.cmp(&b.module))
        });
        syms.entries.dedup_by_key(|e| e.addr);
        syms
    }

    /// Number of symbols.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when nothing was read.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The address of the text symbol `name` (the first, when several share it).
    ///
    /// ```
    /// let k = unwound_symbolize::KernelSymbols::parse("ffffffff81000100 t do_thing\n");
    /// assert_eq!(k.address_of("do_thing"), Some(0xffffffff81000100));
    /// ```
    pub fn address_of(&self, name: &str) -> Option<u64> {
        self.entries.iter().find(|e| self.name_of(e) == name).map(|e| e.addr)
    }

    /// Index of the symbol at or before `addr`.
    fn index_at(&self, addr: u64) -> Option<usize> {
        if !self.spans.is_empty() {
            let k = self.spans.partition_point(|s| s.0 <= addr).checked_sub(1)?;
            if addr >= self.spans[k].1 {
                return None; // in a part of the list not read
            }
        }
        self.entries.partition_point(|e| e.addr <= addr).checked_sub(1)
    }

    fn name_of(&self, e: &Entry) -> &str {
        &self.names[e.name as usize..(e.name + e.name_len) as usize]
    }

    fn module_of(&self, e: &Entry) -> Option<&str> {
        e.module.checked_sub(1).map(|m| &*self.modules[m as usize])
    }

    /// The symbol at or before `addr`.
    pub fn lookup(&self, addr: u64) -> Option<KernelSymbol<'_>> {
        let e = &self.entries[self.index_at(addr)?];
        Some(KernelSymbol { name: self.name_of(e), module: self.module_of(e), offset: addr - e.addr })
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

/// A file's text, refusing more than [`MAX_KALLSYMS`] bytes.
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

fn read_capped(path: &Path) -> Result<String, Error> {
    use std::io::Read;
    let io = |source| Error::Io { path: PathBuf::from(path), source };
    let mut text = String::new();
    std::fs::File::open(path)
        .map_err(io)?
        .take(MAX_KALLSYMS as u64 + 1)
        .read_to_string(&mut text)
        .map_err(io)?;
    if text.len() > MAX_KALLSYMS {
        let too_large = std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("more than the {MAX_KALLSYMS}-byte limit for kernel symbol lists"),
        );
        return Err(io(too_large));
    }
    Ok(text)
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

#[cfg(test)]
mod tests {
    use super::*;

    const IMAGE: &str = "ffffffff81000000 T _stext\nffffffff81000100 t do_thing\nffffffff81000200 T other\n\
                         ffffffff81000300 T _etext\n";
    const MODULE: &str = "ffffffffc0001000 t mod_a\t[m1]\nffffffffc0001100 t mod_b\t[m1]\n";
    const BPF: &str = "ffffffffc0005000 t bpf_prog_0123456789abcdef_walk\t[bpf]\n";

    struct Sources {
        dir: tempfile::TempDir,
    }

    impl Sources {
        fn new(kallsyms: &str, modules: &str) -> Self {
            let s = Sources { dir: tempfile::tempdir().unwrap() };
            s.set("kallsyms", kallsyms);
            s.set("modules", modules);
            s.set("boot_id", "4b5c6d7e-0000-4000-8000-000000000001\n");
            s
        }
        fn set(&self, name: &str, text: &str) {
            std::fs::write(self.dir.path().join(name), text).unwrap();
        }
        fn load(&self, addresses: &[u64]) -> KernelSymbols {
            let p = |n: &str| self.dir.path().join(n);
            KernelSymbols::load_cached_from(
                &p("kallsyms"),
                &p("modules"),
                &p("boot_id"),
                &p("sys-module"),
                &p("cache"),
                addresses,
            )
            .unwrap()
        }
        fn cache_files(&self) -> Vec<String> {
            let mut v: Vec<String> = std::fs::read_dir(self.dir.path().join("cache"))
                .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
                .unwrap_or_default();
            v.sort();
            v
        }
    }

    const M1: &str = "m1 16384 0 - Live 0xffffffffc0001000\n";

    #[test]
    fn a_module_rebuilt_at_the_same_size_and_address_misses_the_cache() {
        let s = Sources::new(&format!("{IMAGE}{MODULE}"), M1);
        let notes = s.dir.path().join("sys-module/m1/notes");
        std::fs::create_dir_all(&notes).unwrap();
        std::fs::write(notes.join(".note.gnu.build-id"), b"build one").unwrap();
        assert_eq!(s.load(&[0xffffffffc0001050]).lookup(0xffffffffc0001050).unwrap().name, "mod_a");
        let first = s.cache_files();
        assert_eq!(first.len(), 1);
        // rmmod m1; insmod m1.ko of another build: the same /proc/modules line.
        std::fs::write(notes.join(".note.gnu.build-id"), b"build two").unwrap();
        s.set("kallsyms", &format!("{IMAGE}{}", MODULE.replace("mod_a", "mod_renamed")));
        let after = s.load(&[0xffffffffc0001050]);
        assert_eq!(after.lookup(0xffffffffc0001050).unwrap().name, "mod_renamed");
        let second = s.cache_files();
        assert_eq!(second.len(), 1, "the old key's file is replaced: {second:?}");
        assert_ne!(first, second, "a second key");
    }

    #[test]
    fn a_second_load_reads_the_cache_when_it_covers_every_address() {
        let s = Sources::new(&format!("{IMAGE}{MODULE}{BPF}"), M1);
        let first = s.load(&[0xffffffff81000105]);
        assert_eq!(first.lookup(0xffffffff81000105).unwrap().name, "do_thing");
        assert_eq!(s.cache_files().len(), 1);
        // The source changes behind the cache's back: a covered address still gets the
        // cached name, proof that the cache was read.
        s.set("kallsyms", &format!("{}{MODULE}{BPF}", IMAGE.replace("do_thing", "renamed")));
        let second = s.load(&[0xffffffff81000105, 0xffffffffc0001050]);
        assert_eq!(second.lookup(0xffffffff81000105).unwrap().name, "do_thing");
        assert_eq!(second.lookup(0xffffffffc0001050).unwrap().module, Some("m1"));
        // BPF programs are never cached.
        assert!(second.lookup(0xffffffffc0005010).unwrap().name != "bpf_prog_0123456789abcdef_walk");
    }

    #[test]
    fn an_address_the_cache_does_not_cover_is_read_from_the_source() {
        let s = Sources::new(&format!("{IMAGE}{MODULE}{BPF}"), M1);
        s.load(&[]);
        s.set("kallsyms", &format!("{}{MODULE}{BPF}", IMAGE.replace("do_thing", "renamed")));
        // In the BPF program: past the module's last symbol, so not covered.
        let k = s.load(&[0xffffffffc0005010]);
        assert_eq!(k.lookup(0xffffffffc0005010).unwrap().name, "bpf_prog_0123456789abcdef_walk");
        assert_eq!(k.lookup(0xffffffff81000105).unwrap().name, "renamed");
        // Past the image's last symbol is not covered either.
        s.set("kallsyms", &format!("{}{MODULE}{BPF}", IMAGE.replace("do_thing", "again")));
        assert_eq!(s.load(&[0xffffffff81000400]).lookup(0xffffffff81000105).unwrap().name, "again");
    }

    #[test]
    fn new_modules_or_a_new_boot_start_a_new_cache() {
        let s = Sources::new(&format!("{IMAGE}{MODULE}"), M1);
        s.load(&[]);
        let before = s.cache_files();
        s.set("kallsyms", &format!("{}{MODULE}", IMAGE.replace("do_thing", "renamed")));
        s.set("modules", &format!("{M1}m2 4096 0 - Live 0xffffffffc0009000\n"));
        assert_eq!(s.load(&[0xffffffff81000105]).lookup(0xffffffff81000105).unwrap().name, "renamed");
        let after = s.cache_files();
        assert_eq!(after.len(), 1, "the old key's file is removed: {after:?}");
        assert_ne!(before, after);
        s.set("kallsyms", &format!("{}{MODULE}", IMAGE.replace("do_thing", "rebooted")));
        s.set("boot_id", "4b5c6d7e-0000-4000-8000-000000000002\n");
        assert_eq!(s.load(&[0xffffffff81000105]).lookup(0xffffffff81000105).unwrap().name, "rebooted");
    }

    #[test]
    fn a_modules_use_count_does_not_change_the_key_but_a_loading_module_stops_caching() {
        let s = Sources::new(&format!("{IMAGE}{MODULE}"), M1);
        s.load(&[]);
        let before = s.cache_files();
        s.set("kallsyms", &format!("{}{MODULE}", IMAGE.replace("do_thing", "renamed")));
        s.set("modules", "m1 16384 3 kvm_amd, Live 0xffffffffc0001000\n");
        assert_eq!(s.load(&[0xffffffff81000105]).lookup(0xffffffff81000105).unwrap().name, "do_thing");
        assert_eq!(s.cache_files(), before);
        // A module in the middle of loading: read live, nothing written.
        std::fs::remove_dir_all(s.dir.path().join("cache")).unwrap();
        s.set("modules", &format!("{M1}m3 4096 0 - Loading 0xffffffffc0020000\n"));
        assert_eq!(s.load(&[0xffffffff81000105]).lookup(0xffffffff81000105).unwrap().name, "renamed");
        assert!(s.cache_files().is_empty(), "{:?}", s.cache_files());
    }

    #[test]
    fn a_damaged_cache_is_rebuilt_not_trusted() {
        let s = Sources::new(&format!("{IMAGE}{MODULE}"), M1);
        s.load(&[]);
        let file = s.dir.path().join("cache").join(&s.cache_files()[0]);
        let good = std::fs::read(&file).unwrap();
        s.set("kallsyms", &format!("{}{MODULE}", IMAGE.replace("do_thing", "renamed")));
        for damaged in [good[..good.len() / 2].to_vec(), b"junk".to_vec(), Vec::new()] {
            std::fs::write(&file, &damaged).unwrap();
            assert_eq!(s.load(&[0xffffffff81000105]).lookup(0xffffffff81000105).unwrap().name, "renamed");
            assert!(std::fs::read(&file).unwrap().starts_with(CACHE_MAGIC), "rewritten");
        }
    }

    #[test]
    fn the_cache_format_round_trips_and_rejects_damage() {
        let k = KernelSymbols::parse(&format!("{IMAGE}{MODULE}{BPF}"));
        let b = k.to_bytes();
        let back = KernelSymbols::from_bytes(&b).unwrap();
        for a in [0xffffffff81000000, 0xffffffff81000105, 0xffffffffc0001050, 0xffffffffc0005010, 1] {
            assert_eq!(back.lookup(a), k.lookup(a), "at {a:#x}");
        }
        for len in 0..b.len() {
            assert!(KernelSymbols::from_bytes(&b[..len]).is_none(), "truncated to {len}");
        }
        for i in 0..b.len() {
            let mut d = b.clone();
            d[i] ^= 0x80;
            let _ = KernelSymbols::from_bytes(&d); // any answer but a panic
        }
    }

    /// A kernel image of `n` symbols 0x100 apart, `f{i}` at 0xffffffff81000000 + 0x100 i.
    fn many(n: usize, prefix: &str) -> String {
        (0..n).map(|i| format!("{:x} t {prefix}{i}\n", 0xffffffff81000000u64 + 0x100 * i as u64)).collect()
    }

    #[test]
    fn a_cached_list_is_read_by_block_and_answers_only_where_it_was_read() {
        let n = 5 * CACHE_BLOCK + 17;
        let s = Sources::new(&many(n, "f"), "");
        let at = |i: usize| 0xffffffff81000000u64 + 0x100 * i as u64;
        s.load(&[]);
        // Renamed behind the cache: names from the cache prove it was read.
        s.set("kallsyms", &many(n, "g"));
        // One address in block 1, one on block 2's last symbol (block 3 is then read for
        // what follows it), one in block 5 (the last, short one; its last symbol has no
        // successor, so that one address is read from the source).
        let wanted = [at(CACHE_BLOCK + 5) + 3, at(3 * CACHE_BLOCK - 1) + 9, at(5 * CACHE_BLOCK + 2)];
        let k = s.load(&wanted);
        assert_eq!(k.lookup(wanted[0]).unwrap().name, format!("f{}", CACHE_BLOCK + 5));
        assert_eq!(k.lookup(wanted[0]).unwrap().offset, 3);
        assert_eq!(k.lookup(wanted[1]).unwrap().name, format!("f{}", 3 * CACHE_BLOCK - 1));
        assert_eq!(k.lookup(wanted[2]).unwrap().name, format!("f{}", 5 * CACHE_BLOCK + 2));
        assert!(k.covers(wanted[1]), "the next block was read");
        // Blocks 0 and 4 were not read: no answer rather than a neighbour's.
        assert_eq!(k.lookup(at(10)), None);
        assert_eq!(k.lookup(at(4 * CACHE_BLOCK + 10)), None);
        assert_eq!(k.len(), 4 * CACHE_BLOCK - CACHE_BLOCK + 17, "blocks 1, 2, 3 and 5");
        // The last symbol of all is not covered (nothing follows it): the source answers.
        let last = s.load(&[at(n - 1) + 1]);
        assert_eq!(last.lookup(at(n - 1) + 1).unwrap().name, format!("g{}", n - 1));
    }

    #[test]
    fn a_damaged_block_is_not_trusted() {
        let n = 3 * CACHE_BLOCK;
        let s = Sources::new(&many(n, "f"), "");
        s.load(&[]);
        let file = s.dir.path().join("cache").join(&s.cache_files()[0]);
        let good = std::fs::read(&file).unwrap();
        s.set("kallsyms", &many(n, "g"));
        let a = 0xffffffff81000000u64 + 0x100 * (CACHE_BLOCK as u64 + 7);
        // Bytes all over the file (magic, directory, blocks) flipped in turn: each answer
        // is the cached name or the source's, never a damaged one.
        // Every symbol of block 1 is looked up each time.
        let block1: Vec<u64> =
            (CACHE_BLOCK..2 * CACHE_BLOCK).map(|i| 0xffffffff81000000 + 0x100 * i as u64 + 1).collect();
        for flip in (0..good.len()).step_by(5) {
            let mut d = good.clone();
            d[flip] ^= 0x41;
            std::fs::write(&file, &d).unwrap();
            let k = s.load(&block1);
            for (j, &b) in block1.iter().enumerate() {
                let name = k.lookup(b).unwrap().name;
                let i = CACHE_BLOCK + j;
                assert!(name == format!("f{i}") || name == format!("g{i}"), "byte {flip} flipped: {name}");
            }
        }
        // Cut short: the directory no longer matches, the source answers, the file is rewritten.
        std::fs::write(&file, &good[..good.len() - 1]).unwrap();
        assert_eq!(s.load(&[a]).lookup(a).unwrap().name, format!("g{}", CACHE_BLOCK + 7));
        assert!(std::fs::read(&file).unwrap().len() >= good.len() - 1);
    }

    #[test]
    fn hidden_addresses_are_an_error() {
        let s = Sources::new("0000000000000000 T _stext\n0000000000000000 t do_thing\n", M1);
        let p = |n: &str| s.dir.path().join(n);
        let r = KernelSymbols::load_cached_from(
            &p("kallsyms"),
            &p("modules"),
            &p("boot_id"),
            &p("sys-module"),
            &p("cache"),
            &[1],
        );
        assert!(matches!(r, Err(Error::KernelAddressesHidden)), "{r:?}");
    }

    /// On the running kernel (root only): wherever the cacheable part of /proc/kallsyms
    /// (image and live modules, no BPF programs) says it covers an address, it gives the
    /// answer a full read gives - over the image, the modules, and the BPF programs'
    /// neighbourhood. And a second load_cached agrees with the first.
    #[test]
    fn the_running_kernels_cached_symbols_agree_with_proc_kallsyms() {
        let Ok(live) = KernelSymbols::load() else {
            eprintln!("skipped: /proc/kallsyms hides addresses here (not root)");
            return;
        };
        let modules = std::fs::read_to_string("/proc/modules").unwrap_or_default();
        let names = modules.lines().filter_map(|l| l.split(' ').next()).collect();
        let cacheable = live.cacheable(&names);
        let step = live.entries.len() / 3000 + 1;
        let mut covered = 0;
        for (i, e) in
            live.entries.iter().enumerate().filter(|(i, _)| i % step == 0 || live.entries[*i].module != 0)
        {
            // Inside the symbol, and just before it (the previous symbol's tail).
            for a in [e.addr + 1, e.addr.wrapping_sub(1)] {
                if cacheable.covers(a) {
                    covered += 1;
                    assert_eq!(cacheable.lookup(a), live.lookup(a), "at {a:#x} (entry {i})");
                }
            }
        }
        assert!(covered > 1000, "only {covered} addresses covered");
        let dir = tempfile::tempdir().unwrap();
        let sample: Vec<u64> = live.entries.iter().step_by(step).map(|e| e.addr + 1).collect();
        let first = KernelSymbols::load_cached(dir.path(), &sample).unwrap();
        let second = KernelSymbols::load_cached(dir.path(), &sample).unwrap();
        for &a in &sample {
            assert_eq!(first.lookup(a), second.lookup(a), "at {a:#x}");
        }
    }
}
