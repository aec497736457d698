//! [`ElfSymbols`]: the function symbols of one ELF file, and [`LoadSegments`]: where its
//! file offsets land in its virtual addresses.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use object::{Object, ObjectSection, ObjectSegment, ObjectSymbol, SymbolKind};

use crate::{demangle, Error, NameSource, MAX_ELF_SIZE, MAX_SYMBOLS};

/// A function symbol found for an address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Symbol<'a> {
    /// Demangled name.
    pub name: &'a str,
    /// The symbol's start, a file virtual address.
    pub address: u64,
    /// How far into the symbol the looked-up address is.
    pub offset: u64,
    /// The source file the symbol table attributes it to (the `STT_FILE` symbol before it,
    /// as binutils reads it), if any.
    pub file: Option<&'a str>,
}

#[derive(Clone, Debug)]
struct Entry {
    address: u64,
    size: u64,
    /// The name as the symbol table has it (mangled).
    name: Box<str>,
    /// Demangled on first lookup: most of a file's symbols are never looked up, and
    /// demangling them all took a tenth of the agent's CPU.
    demangled: std::sync::OnceLock<Box<str>>,
    file: Option<Arc<str>>,
    /// The table it came from.
    origin: NameSource,
}

/// Collects at most `max` bytes; more is an error.
struct CappedWriter {
    buf: Vec<u8>,
    max: u64,
}

impl std::io::Write for CappedWriter {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        if self.buf.len() as u64 + b.len() as u64 > self.max {
            return Err(std::io::Error::other("MiniDebugInfo larger than the cap"));
        }
        self.buf.extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// address, size, binding rank (0 global, 1 weak, 2 local), name, source file, table
type RawSym = (u64, u64, u8, String, Option<Arc<str>>, NameSource);

#[derive(Clone, Copy, Debug)]
struct LoadSegment {
    file_offset: u64,
    file_size: u64,
    vaddr: u64,
    executable: bool,
}

/// The load segments of an ELF file: where its file offsets (as `/proc/PID/maps` gives
/// them) land in its own virtual addresses. Reading them touches only the program headers,
/// not the symbol tables, so it is cheap for any size of binary.
///
/// ```no_run
/// let segments = unwound_symbolize::LoadSegments::open("/usr/bin/true")?;
/// println!("{:?}", segments.file_offset_to_vaddr(0x2000));
/// # Ok::<(), unwound_symbolize::Error>(())
/// ```
#[derive(Clone, Debug, Default)]
pub struct LoadSegments(Vec<LoadSegment>);

impl LoadSegments {
    /// Reads the load segments of the ELF file at `path`.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, Error> {
        let path = path.as_ref();
        let map = map_elf(path)?;
        Self::from_bytes(path, &map)
    }

    /// Reads the load segments of an ELF image held in memory; `name` is used in errors.
    pub fn from_bytes(name: impl AsRef<Path>, data: &[u8]) -> Result<Self, Error> {
        Ok(Self::of(&parse_elf(name.as_ref(), data)?))
    }

    pub(crate) fn of(file: &object::File<'_>) -> Self {
        LoadSegments(
            file.segments()
                .filter_map(|s| {
                    let (file_offset, file_size) = s.file_range();
                    let executable = matches!(s.flags(), object::SegmentFlags::Elf { p_flags } if p_flags & object::elf::PF_X != 0);
                    (file_size > 0).then_some(LoadSegment { file_offset, file_size, vaddr: s.address(), executable })
                })
                .collect(),
        )
    }

    /// The file's own virtual address of file offset `offset`, through the load segment
    /// that holds it.
    pub fn file_offset_to_vaddr(&self, offset: u64) -> Option<u64> {
        self.0
            .iter()
            .find(|s| offset >= s.file_offset && offset - s.file_offset < s.file_size)
            .map(|s| s.vaddr.wrapping_add(offset - s.file_offset))
    }

    /// The load bias of a mapping at `start` of the file's bytes `[offset, offset + len)`
    /// (`/proc/PID/maps`' start, offset and length): what is added to the file's own
    /// addresses to give the process's. The executable segment the mapping holds decides:
    /// a page-aligned mapping may begin inside the read-only segment before it, whose
    /// `vaddr − offset` differs. `None` when no segment overlaps the mapping.
    pub fn bias(&self, start: u64, offset: u64, len: u64) -> Option<u64> {
        let end = offset.saturating_add(len);
        let seg = self
            .0
            .iter()
            .find(|s| {
                s.executable && s.file_offset < end && offset < s.file_offset.saturating_add(s.file_size)
            })
            .or_else(|| {
                self.0.iter().find(|s| offset >= s.file_offset && offset - s.file_offset < s.file_size)
            })?;
        // pc = start + (file_offset − offset); vaddr = file_offset − seg.offset + seg.vaddr.
        Some(start.wrapping_sub(offset).wrapping_add(seg.file_offset).wrapping_sub(seg.vaddr))
    }
}

/// Maps the ELF file at `path` read-only, refusing one larger than [`MAX_ELF_SIZE`].
fn map_elf(path: &Path) -> Result<memmap2::Mmap, Error> {
    let io = |source| Error::Io { path: path.to_path_buf(), source };
    let file = File::open(path).map_err(io)?;
    let size = file.metadata().map_err(io)?.len();
    if size > MAX_ELF_SIZE {
        return Err(Error::TooLarge { path: path.to_path_buf(), size });
    }
    // SAFETY: the map is read-only and private; a file truncated under us would fault
    // (SIGBUS), the same risk every mmap-based ELF reader takes.
    unsafe { memmap2::Mmap::map(&file) }.map_err(io)
}

/// Parses `data` (read from `path`) as an ELF file.
pub(crate) fn parse_elf<'d>(path: &Path, data: &'d [u8]) -> Result<object::File<'d>, Error> {
    let file = object::File::parse(data).map_err(|source| Error::Elf { path: path.to_path_buf(), source })?;
    if file.format() != object::BinaryFormat::Elf {
        return Err(Error::NotElf { path: path.to_path_buf() });
    }
    Ok(file)
}

/// The function symbols and load segments of one ELF file.
///
/// Symbols come from `.symtab` and `.dynsym`. Where several names share an address (aliases
/// such as `__libc_malloc`/`malloc`), the choice is deterministic: a global symbol over a
/// weak one over a local one, then the name without leading underscores, then the shorter,
/// then the lexically first.
#[derive(Clone, Debug)]
pub struct ElfSymbols {
    path: PathBuf,
    entries: Vec<Entry>,
    segments: LoadSegments,
    build_id: Option<Vec<u8>>,
}

impl ElfSymbols {
    /// Reads the symbols of the ELF file at `path`.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, Error> {
        Self::open_with(path.as_ref(), false)
    }

    /// Like [`ElfSymbols::open`], but where several names share an address the one binutils
    /// (`addr2line`) reports wins: a local symbol over a global over a weak one, then the
    /// first in the symbol table.
    pub fn open_like_binutils(path: impl AsRef<Path>) -> Result<Self, Error> {
        Self::open_with(path.as_ref(), true)
    }

    fn open_with(path: &Path, binutils: bool) -> Result<Self, Error> {
        Self::parse(path, &map_elf(path)?, binutils)
    }

    /// Reads the symbols of an ELF image held in memory (a vDSO copied from a process).
    /// `name` is used in errors.
    pub fn from_bytes(name: impl AsRef<Path>, data: &[u8]) -> Result<Self, Error> {
        Self::parse(name.as_ref(), data, false)
    }

    /// Adds the function symbols of `other` at addresses this table has none for (the
    /// symbol table of a MiniDebugInfo section beside a stripped file's `.dynsym`).
    pub fn merge(&mut self, other: ElfSymbols) {
        let have: std::collections::HashSet<u64> = self.entries.iter().map(|e| e.address).collect();
        self.entries.extend(other.entries.into_iter().filter(|e| !have.contains(&e.address)));
        self.entries.sort_by_key(|e| e.address);
    }

    /// The symbols of the MiniDebugInfo (`.gnu_debugdata`: an xz-compressed ELF file holding
    /// the symbol table a stripped binary dropped) of the ELF image `data`, if it has one.
    /// At most `max` bytes are decompressed.
    pub fn mini_debuginfo(name: impl AsRef<Path>, data: &[u8], max: u64, binutils: bool) -> Option<Self> {
        let file = object::File::parse(data).ok()?;
        let section = file.section_by_name(".gnu_debugdata")?;
        let xz = section.data().ok()?;
        let mut out = CappedWriter { buf: Vec::new(), max };
        lzma_rs::xz_decompress(&mut std::io::BufReader::new(xz), &mut out).ok()?;
        let mut symbols = Self::parse(name.as_ref(), &out.buf, binutils).ok()?;
        for e in &mut symbols.entries {
            e.origin = NameSource::MiniDebugInfo;
        }
        Some(symbols)
    }

    fn parse(path: &Path, data: &[u8], binutils: bool) -> Result<Self, Error> {
        let file = parse_elf(path, data)?;
        let mut raw: Vec<RawSym> = Vec::new();
        // binutils' reading of STT_FILE symbols: a function takes the last file symbol
        // before it, unless it is global and that file symbol came after other symbols.
        #[derive(PartialEq)]
        enum FileState {
            Nothing,
            Symbol,
            FileAfterSymbol,
        }
        let mut state = FileState::Nothing;
        let mut current_file: Option<Arc<str>> = None;
        for (n, sym) in file.symbols().map(|s| (0, s)).chain(file.dynamic_symbols().map(|s| (1, s))) {
            if n == 0 && sym.kind() == SymbolKind::File {
                if state == FileState::Symbol {
                    state = FileState::FileAfterSymbol;
                }
                current_file = sym.name().ok().filter(|s| !s.is_empty()).map(Arc::from);
                continue;
            }
            if n == 0 && state == FileState::Nothing {
                state = FileState::Symbol;
            }
            if sym.kind() != SymbolKind::Text || sym.is_undefined() || sym.address() == 0 {
                continue;
            }
            let src = match n {
                0 if sym.is_local() || state != FileState::FileAfterSymbol => current_file.clone(),
                _ => None,
            };
            let Ok(name) = sym.name() else { continue };
            if name.is_empty() {
                continue;
            }
            let rank = if sym.is_global() && !sym.is_weak() {
                0
            } else if sym.is_weak() {
                1
            } else {
                2
            };
            // A symbol without a size ends where its section ends at the latest.
            let size = match (sym.size(), sym.section_index()) {
                (0, Some(i)) => file
                    .section_by_index(i)
                    .ok()
                    .map(|s| s.address().saturating_add(s.size()).saturating_sub(sym.address()))
                    .unwrap_or(0),
                (n, _) => n,
            };
            let origin = if n == 0 { NameSource::SymbolTable } else { NameSource::DynamicSymbol };
            raw.push((sym.address(), size, rank, name.to_string(), src, origin));
            if raw.len() > MAX_SYMBOLS {
                return Err(Error::TooManySymbols { path: path.to_path_buf() });
            }
        }
        if binutils {
            // The choice `addr2line` makes among names of one address (found by comparing
            // with it on glibc's debug symbols and Rust's folded functions): a local name
            // over a global one over a weak one; among equals the first in the table. The
            // stable sort keeps table order.
            raw.sort_by_key(|r| r.0);
            let class = |rank: u8| match rank {
                2 => 0, // local
                0 => 1, // global
                _ => 2, // weak
            };
            let mut chosen: Vec<RawSym> = Vec::with_capacity(raw.len());
            for r in raw.drain(..) {
                match chosen.last_mut() {
                    Some(c) if c.0 == r.0 => {
                        let size = c.1.max(r.1);
                        if class(r.2) < class(c.2) {
                            *c = r;
                        }
                        c.1 = size;
                    }
                    _ => chosen.push(r),
                }
            }
            raw = chosen;
        } else {
            raw.sort_by(|a, b| {
                a.0.cmp(&b.0)
                    .then(a.2.cmp(&b.2))
                    .then(a.3.starts_with('_').cmp(&b.3.starts_with('_')))
                    .then(a.3.len().cmp(&b.3.len()))
                    .then(a.3.cmp(&b.3))
                    .then(b.1.cmp(&a.1))
            });
        }
        let mut entries: Vec<Entry> = Vec::with_capacity(raw.len());
        for (address, size, _, name, file, origin) in raw {
            if let Some(last) = entries.last_mut() {
                if last.address == address {
                    last.size = last.size.max(size);
                    continue;
                }
            }
            entries.push(Entry {
                address,
                size,
                name: name.into_boxed_str(),
                demangled: std::sync::OnceLock::new(),
                file,
                origin,
            });
        }
        let segments = LoadSegments::of(&file);
        let build_id = file.build_id().ok().flatten().map(|b| b.to_vec());
        Ok(ElfSymbols { path: path.to_path_buf(), entries, segments, build_id })
    }

    /// Where the symbols were read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The GNU build-id note, if the file has one.
    pub fn build_id(&self) -> Option<&[u8]> {
        self.build_id.as_deref()
    }

    /// Number of distinct function addresses.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when the file has no function symbols (fully stripped).
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Turns an offset in the file (as `/proc/PID/maps` gives it) into the file's own
    /// virtual address, through the load segment that holds it.
    pub fn file_offset_to_vaddr(&self, offset: u64) -> Option<u64> {
        self.segments.file_offset_to_vaddr(offset)
    }

    /// The name, as the symbol table has it (mangled), of the symbol that starts exactly at
    /// `vaddr`.
    pub(crate) fn raw_at(&self, vaddr: u64) -> Option<&str> {
        let i = self.entries.partition_point(|e| e.address < vaddr);
        self.entries.get(i).filter(|e| e.address == vaddr).map(|e| &*e.name)
    }

    /// The function that contains `vaddr`. A symbol with a size covers exactly that range;
    /// one without a size (hand-written assembly) covers up to the next symbol.
    pub fn lookup(&self, vaddr: u64) -> Option<Symbol<'_>> {
        self.lookup_sized(vaddr).map(|(s, _, _)| s)
    }

    /// [`ElfSymbols::lookup`], with the symbol's size (0 when the table gives none) and the
    /// table it came from.
    pub(crate) fn lookup_sized(&self, vaddr: u64) -> Option<(Symbol<'_>, u64, NameSource)> {
        let i = self.entries.partition_point(|e| e.address <= vaddr).checked_sub(1)?;
        let e = &self.entries[i];
        let offset = vaddr - e.address;
        let covered = if e.size > 0 {
            offset < e.size
        } else {
            self.entries.get(i + 1).is_none_or(|n| vaddr < n.address)
        };
        covered.then(|| {
            let s = Symbol {
                name: e.demangled.get_or_init(|| demangle(&e.name).into_boxed_str()),
                address: e.address,
                offset,
                file: e.file.as_deref(),
            };
            (s, e.size, e.origin)
        })
    }
}
