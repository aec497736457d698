//! [`KernelSymbols`]: the running kernel's text symbols, from `/proc/kallsyms`, modules
//! included. Reading them once costs tens of milliseconds of kernel time, so
//! [`KernelSymbols::load_cached`] (in `cache`) keeps them on disk per boot.

use std::path::{Path, PathBuf};

use crate::Error;

mod cache;

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
}

/// A file's text, refusing more than [`MAX_KALLSYMS`] bytes.
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
