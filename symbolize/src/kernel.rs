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

/// The running kernel's text symbols, from `/proc/kallsyms`.
#[derive(Clone, Debug, Default)]
pub struct KernelSymbols {
    entries: Vec<(u64, Box<str>, Option<Box<str>>)>,
}

impl KernelSymbols {
    /// Reads `/proc/kallsyms`.
    pub fn load() -> Result<Self, Error> {
        Self::load_from(Path::new("/proc/kallsyms"))
    }

    /// Reads a file in the format of `/proc/kallsyms`.
    pub fn load_from(path: &Path) -> Result<Self, Error> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| Error::Io { path: PathBuf::from(path), source })?;
        let syms = Self::parse(&text);
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
        let mut entries: Vec<(u64, Box<str>, Option<Box<str>>)> = Vec::new();
        for line in text.lines() {
            let mut f = line.split_ascii_whitespace();
            let (Some(addr), Some(kind), Some(name)) = (f.next(), f.next(), f.next()) else { continue };
            if !matches!(kind, "t" | "T" | "w" | "W") {
                continue;
            }
            let Ok(addr) = u64::from_str_radix(addr, 16) else { continue };
            if addr == 0 {
                continue;
            }
            let module = f.next().map(|m| m.trim_start_matches('[').trim_end_matches(']').into());
            entries.push((addr, name.into(), module));
        }
        entries.sort_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.cmp(&b.1)));
        entries.dedup_by_key(|e| e.0);
        KernelSymbols { entries }
    }

    /// Number of symbols.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when nothing was read.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The symbol at or before `addr`.
    pub fn lookup(&self, addr: u64) -> Option<KernelSymbol<'_>> {
        let i = self.entries.partition_point(|e| e.0 <= addr).checked_sub(1)?;
        let (start, name, module) = &self.entries[i];
        Some(KernelSymbol { name, module: module.as_deref(), offset: addr - start })
    }
}
