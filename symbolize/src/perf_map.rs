//! JIT code's names: a runtime's perf map, `/tmp/perf-PID.map` (the perf convention: one
//! `START SIZE name` line per piece of generated code, START and SIZE in hex, appended as
//! the runtime compiles).
//!
//! Read as the process sees it (its root, its own pid number), bounded in bytes and
//! entries, never through a link, never blocking on a FIFO; entries written later win for
//! the range they cover (a runtime reuses code space); an address no entry covers has no
//! name, never a neighbour's.

use std::collections::BTreeMap;
use std::path::PathBuf;

use crate::name::Name;
use crate::Error;

/// Most bytes of a perf map read.
pub const MAX_PERF_MAP_BYTES: u64 = 256 << 20;
/// Most entries kept (a line past it is counted as dropped): about 130 MiB of index at this
/// cap (the perf_map benchmark), names held one allocation each.
pub const MAX_PERF_MAP_ENTRIES: usize = 1 << 20;
/// Largest size one entry may claim (larger is malformed: no code object is a GiB).
pub const MAX_PERF_MAP_ENTRY_SIZE: u64 = 1 << 30;

/// What a perf map's reading left out, by reason.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct PerfMapStats {
    /// Lines kept.
    pub entries: u64,
    /// Lines that are not `START SIZE name` (hex numbers, a name), or have a zero size.
    pub malformed: u64,
    /// Entries whose size exceeds [`MAX_PERF_MAP_ENTRY_SIZE`] or whose range wraps.
    pub too_large: u64,
    /// Lines beyond [`MAX_PERF_MAP_ENTRIES`] or [`MAX_PERF_MAP_BYTES`].
    pub dropped: u64,
    /// Ranges (or parts of them) hidden by entries written later.
    pub replaced: u64,
}

impl PerfMapStats {
    /// Adds `other`'s counts to these.
    pub fn add(&mut self, other: &PerfMapStats) {
        self.entries += other.entries;
        self.malformed += other.malformed;
        self.too_large += other.too_large;
        self.dropped += other.dropped;
        self.replaced += other.replaced;
    }
}

/// A perf map, indexed: non-overlapping ranges, each named by the last entry that covered
/// it.
#[derive(Clone, Debug, Default)]
pub struct PerfMap {
    /// start → (end, name); disjoint.
    ranges: BTreeMap<u64, (u64, Name)>,
    stats: PerfMapStats,
    /// Lines parsed so far (for the entry cap across incremental reads).
    lines: usize,
    /// The file read, (device, inode), and how many of its bytes were parsed (up to the
    /// last complete line): a later [`refresh`](Self::refresh) parses only what was appended.
    file: Option<(u64, u64)>,
    parsed: u64,
}

impl PerfMap {
    /// Parses a perf map's text (any bytes: invalid UTF-8 and junk lines are counted as
    /// malformed, never a panic).
    pub fn parse(text: &[u8]) -> Self {
        let mut map = PerfMap::default();
        map.add_lines(text);
        map
    }

    /// Parses more lines, after those parsed already.
    fn add_lines(&mut self, text: &[u8]) {
        let map = self;
        for line in text.split(|&b| b == b'\n') {
            if line.is_empty() {
                continue;
            }
            map.lines += 1;
            if map.lines > MAX_PERF_MAP_ENTRIES {
                map.stats.dropped += 1;
                continue;
            }
            match parse_line(line) {
                Some((start, size, name)) if size > 0 => {
                    let Some(end) = start.checked_add(size).filter(|_| size <= MAX_PERF_MAP_ENTRY_SIZE)
                    else {
                        map.stats.too_large += 1;
                        continue;
                    };
                    map.insert(start, end, name);
                    map.stats.entries += 1;
                }
                _ => map.stats.malformed += 1,
            }
        }
    }

    /// Covers `[start, end)` with `name`, clipping what earlier entries covered there.
    fn insert(&mut self, start: u64, end: u64, name: Name) {
        // Ranges that overlap [start, end): the one starting before start, and those
        // starting inside.
        let mut overlapping: Vec<u64> = self.ranges.range(start..end).map(|(&s, _)| s).collect();
        if let Some((&s, &(e, _))) = self.ranges.range(..start).next_back() {
            if e > start {
                overlapping.push(s);
            }
        }
        for s in overlapping {
            let (e, old) = self.ranges.remove(&s).expect("listed above");
            self.stats.replaced += 1;
            if s < start {
                self.ranges.insert(s, (start, old.clone()));
            }
            if e > end {
                self.ranges.insert(end, (e, old));
            }
        }
        self.ranges.insert(start, (end, name));
    }

    /// Reads the perf map of process `pid` as it sees it: `/proc/PID/root/tmp/perf-N.map`
    /// with N its pid in its own namespace. Only a regular file, not through a link (a
    /// link planted there would resolve against the reader's root, not the process's),
    /// opened without blocking; at most [`MAX_PERF_MAP_BYTES`] read. `Ok(None)` when the
    /// process has none.
    pub fn read(pid: u32) -> Result<Option<Self>, Error> {
        let mut map = PerfMap::default();
        Ok(map.refresh(pid)?.then_some(map))
    }

    /// Reads what the runtime appended since the last read (the whole file again if it was
    /// replaced or truncated); only complete lines are parsed. `Ok(false)` when the process
    /// has no perf map.
    pub fn refresh(&mut self, pid: u32) -> Result<bool, Error> {
        use std::io::{Read, Seek, SeekFrom};
        use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
        let ns_pid = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("NSpid:"))
                    .and_then(|v| v.split_whitespace().last()?.parse::<u32>().ok())
            })
            .unwrap_or(pid);
        let tmp = PathBuf::from(format!("/proc/{pid}/root/tmp"));
        // `/tmp` itself must be a directory of the process's tree, not a link out of it.
        if !std::fs::symlink_metadata(&tmp).is_ok_and(|m| m.is_dir()) {
            return Ok(false);
        }
        let path = tmp.join(format!("perf-{ns_pid}.map"));
        const O_NONBLOCK: i32 = 0o4000;
        const O_NOFOLLOW: i32 = 0o400000;
        let mut f =
            match std::fs::OpenOptions::new().read(true).custom_flags(O_NONBLOCK | O_NOFOLLOW).open(&path) {
                Ok(f) => f,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
                // ELOOP: the name is a link.
                Err(e) if e.raw_os_error() == Some(40) => return Ok(false),
                Err(source) => return Err(Error::Io { path, source }),
            };
        let io = |source| Error::Io { path: path.clone(), source };
        let md = f.metadata().map_err(io)?;
        if !md.is_file() {
            return Ok(false);
        }
        let file = Some((md.dev(), md.ino()));
        if file != self.file || md.len() < self.parsed {
            *self = PerfMap { file, ..PerfMap::default() };
        }
        let want = md.len().min(MAX_PERF_MAP_BYTES).saturating_sub(self.parsed);
        if want > 0 {
            f.seek(SeekFrom::Start(self.parsed)).map_err(io)?;
            let mut bytes = Vec::new();
            f.take(want).read_to_end(&mut bytes).map_err(io)?;
            // Up to the last complete line: the runtime may be writing the next one.
            let complete = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
            self.add_lines(&bytes[..complete]);
            self.parsed += complete as u64;
        }
        if md.len() > MAX_PERF_MAP_BYTES && self.parsed + 4096 >= MAX_PERF_MAP_BYTES {
            self.stats.dropped = self.stats.dropped.max(1);
        }
        Ok(true)
    }

    /// The name of the code holding `addr`, if an entry covers it.
    pub fn lookup(&self, addr: u64) -> Option<&Name> {
        let (_, (end, name)) = self.ranges.range(..=addr).next_back()?;
        (addr < *end).then_some(name)
    }

    /// What the reading kept and left out.
    pub fn stats(&self) -> PerfMapStats {
        self.stats
    }

    /// Disjoint named ranges.
    pub fn len(&self) -> usize {
        self.ranges.len()
    }

    /// No entry.
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }
}

/// The source file and line a JIT name carries, where the runtime writes one: V8's
/// `JS:*fn /path/app.js:LINE:COLUMN` (also `LazyCompile:~fn …`), CPython's
/// `py::qualname:/path/file.py` (no line: 0). `None` for names without one (HotSpot's).
pub fn jit_source(name: &str) -> Option<(&str, u32)> {
    if let Some(rest) = name.strip_prefix("py::") {
        let (_, file) = rest.split_once(':')?;
        return (!file.is_empty()).then_some((file, 0));
    }
    let (_, location) = name.split_once(' ')?;
    let mut parts = location.rsplitn(3, ':');
    let (_column, line, file) = (parts.next()?, parts.next()?, parts.next()?);
    let line: u32 = line.parse().ok()?;
    (!file.is_empty()).then_some((file, line))
}

fn parse_line(line: &[u8]) -> Option<(u64, u64, Name)> {
    let line = std::str::from_utf8(line).ok()?.trim_end_matches('\r');
    let mut it = line.splitn(3, ' ');
    let hex = |s: &str| {
        let s = s.strip_prefix("0x").unwrap_or(s);
        (!s.is_empty() && s.len() <= 16).then(|| u64::from_str_radix(s, 16).ok()).flatten()
    };
    let start = hex(it.next()?)?;
    let size = hex(it.next()?)?;
    let name = it.next()?.trim();
    (!name.is_empty()).then(|| (start, size, Name::from(name)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The tests that write this process's perf map, one at a time.
    static OWN_MAP: std::sync::Mutex<()> = std::sync::Mutex::new(());

    fn name(m: &PerfMap, a: u64) -> Option<String> {
        m.lookup(a).map(|n| n.to_string())
    }

    #[test]
    fn entries_name_their_ranges_and_nothing_else() {
        let m = PerfMap::parse(b"1000 100 JS:*fib /app.js:1:13\n0x2000 0x10 LazyCompile:~main\n");
        assert_eq!(name(&m, 0x1000).as_deref(), Some("JS:*fib /app.js:1:13"));
        assert_eq!(name(&m, 0x10ff).as_deref(), Some("JS:*fib /app.js:1:13"));
        assert_eq!(name(&m, 0x1100), None, "one past the end is not the entry's");
        assert_eq!(name(&m, 0xfff), None);
        assert_eq!(name(&m, 0x200f).as_deref(), Some("LazyCompile:~main"));
        assert_eq!(m.stats().entries, 2);
    }

    #[test]
    fn later_entries_win_for_the_range_they_cover() {
        // Code space reused: the middle of the first entry is rewritten, then all of it.
        let m = PerfMap::parse(b"1000 300 old\n1100 100 middle\n");
        assert_eq!(name(&m, 0x1000).as_deref(), Some("old"));
        assert_eq!(name(&m, 0x1150).as_deref(), Some("middle"));
        assert_eq!(name(&m, 0x1250).as_deref(), Some("old"));
        let m = PerfMap::parse(b"1100 100 a\n1300 100 b\n1000 500 all\n");
        for a in [0x1000, 0x1150, 0x1350, 0x14ff] {
            assert_eq!(name(&m, a).as_deref(), Some("all"), "{a:#x}");
        }
        assert_eq!(m.len(), 1);
        assert_eq!(m.stats().replaced, 2);
    }

    #[test]
    fn junk_huge_and_wrapping_entries_are_counted_not_kept() {
        let m = PerfMap::parse(
            b"zz 10 bad\n1000\n1000 10\n1000 0 empty\n\xff\xfe junk\n0 ffffffffff huge\nfffffffffffffff0 100 wraps\n1000 10 ok\n",
        );
        assert_eq!(m.stats().entries, 1);
        assert_eq!(m.stats().malformed, 5);
        assert_eq!(m.stats().too_large, 2);
        assert_eq!(name(&m, 0x1008).as_deref(), Some("ok"));
    }

    #[test]
    fn v8_and_cpython_names_carry_their_source() {
        assert_eq!(jit_source("JS:*fib /app/fib.js:3:13"), Some(("/app/fib.js", 3)));
        assert_eq!(jit_source("LazyCompile:~main /a b/x.js:10:2"), Some(("/a b/x.js", 10)));
        assert_eq!(jit_source("py::work.<locals>.<genexpr>:/tmp/fib.py"), Some(("/tmp/fib.py", 0)));
        assert_eq!(jit_source("int Fib.fib(int)"), None);
        assert_eq!(jit_source("JS:*fib /app/fib.js:x:13"), None);
        assert_eq!(jit_source("Builtin:ArgumentsAdaptorTrampoline"), None);
        assert_eq!(jit_source("py::nofile:"), None);
    }

    #[test]
    fn every_prefix_of_a_map_parses() {
        let text = b"1000 100 JS:*fib /app.js:1:13\n2000 10 x\n";
        for n in 0..text.len() {
            let _ = PerfMap::parse(&text[..n]);
        }
    }

    #[test]
    fn a_growing_map_is_read_where_it_was_left_off() {
        let _one = OWN_MAP.lock().unwrap_or_else(|e| e.into_inner());
        let pid = std::process::id();
        let path = format!("/tmp/perf-{pid}.map");
        std::fs::write(&path, "1000 10 first\n2000 10 par").unwrap();
        let mut m = PerfMap::read(pid).unwrap().unwrap();
        assert_eq!(name(&m, 0x1000).as_deref(), Some("first"));
        assert_eq!(name(&m, 0x2000), None, "an incomplete line waits");
        let mut f = std::fs::OpenOptions::new().append(true).open(&path).unwrap();
        std::io::Write::write_all(&mut f, b"tial\n1000 10 again\n").unwrap();
        assert!(m.refresh(pid).unwrap());
        assert_eq!(name(&m, 0x2000).as_deref(), Some("partial"));
        assert_eq!(name(&m, 0x1000).as_deref(), Some("again"), "appended entries win");
        assert_eq!(m.stats().entries, 3);
        // Replaced by a shorter file: read afresh.
        std::fs::write(&path, "3000 10 new\n").unwrap();
        assert!(m.refresh(pid).unwrap());
        std::fs::remove_file(&path).unwrap();
        assert_eq!((name(&m, 0x1000), name(&m, 0x3000).as_deref()), (None, Some("new")));
    }

    #[test]
    fn the_own_process_has_none_and_a_link_is_not_followed() {
        let _one = OWN_MAP.lock().unwrap_or_else(|e| e.into_inner());
        let pid = std::process::id();
        let path = format!("/tmp/perf-{pid}.map");
        assert!(PerfMap::read(pid).unwrap().is_none());
        std::os::unix::fs::symlink("/etc/passwd", &path).unwrap();
        let read = PerfMap::read(pid);
        std::fs::remove_file(&path).unwrap();
        assert!(!matches!(read, Ok(Some(_))), "a link must not be read: {read:?}");
        std::fs::write(&path, "1000 10 mine\n").unwrap();
        let read = PerfMap::read(pid);
        std::fs::remove_file(&path).unwrap();
        assert_eq!(name(&read.unwrap().unwrap(), 0x1000).as_deref(), Some("mine"));
    }
}
