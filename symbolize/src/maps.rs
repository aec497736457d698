//! [`ProcessMaps`]: a process's memory mappings, from `/proc/PID/maps`.

use std::path::PathBuf;

use crate::Error;

/// One line of `/proc/PID/maps`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mapping {
    /// First address.
    pub start: u64,
    /// One past the last address.
    pub end: u64,
    /// Executable.
    pub executable: bool,
    /// Offset in the file of `start`.
    pub offset: u64,
    /// Device (`major:minor`, as the kernel prints it).
    pub device: String,
    /// Inode; 0 for anonymous mappings.
    pub inode: u64,
    /// The backing file's path, or `None` for anonymous memory. Pseudo-paths such as
    /// `[vdso]` and `[stack]` are kept as written, as is a ` (deleted)` suffix.
    pub path: Option<PathBuf>,
}

impl Mapping {
    /// The offset in the backing file of `addr` (which must lie in the mapping).
    pub fn file_offset(&self, addr: u64) -> u64 {
        addr.wrapping_sub(self.start).wrapping_add(self.offset)
    }

    /// True for `[vdso]`, `[vsyscall]` and the like.
    pub fn is_pseudo(&self) -> bool {
        self.path.as_ref().is_some_and(|p| p.as_os_str().as_encoded_bytes().starts_with(b"["))
    }

    /// True when the kernel marks the file as deleted or replaced since it was mapped.
    pub fn is_deleted(&self) -> bool {
        self.path.as_ref().is_some_and(|p| p.as_os_str().as_encoded_bytes().ends_with(b" (deleted)"))
    }

    /// The name `/proc/PID/map_files/` gives this mapping: it opens the mapped file even
    /// when it was deleted or lives in another mount namespace.
    pub fn map_files_name(&self) -> String {
        format!("{:x}-{:x}", self.start, self.end)
    }

    /// The file name without its directory (and without ` (deleted)`), for display.
    pub fn short_name(&self) -> String {
        match &self.path {
            None => "[anon]".to_string(),
            Some(p) => {
                let s = p.to_string_lossy();
                let s = s.strip_suffix(" (deleted)").unwrap_or(&s);
                s.rsplit('/').next().unwrap_or(s).to_string()
            }
        }
    }
}

/// A process's memory mappings, sorted by address.
#[derive(Clone, Debug, Default)]
pub struct ProcessMaps {
    mappings: Vec<Mapping>,
}

impl ProcessMaps {
    /// Reads `/proc/PID/maps`.
    pub fn read(pid: u32) -> Result<Self, Error> {
        let path = PathBuf::from(format!("/proc/{pid}/maps"));
        let text = std::fs::read_to_string(&path).map_err(|source| Error::Io { path, source })?;
        Ok(Self::parse(&text))
    }

    /// Parses the text of a `/proc/PID/maps` file; malformed lines are skipped.
    ///
    /// ```
    /// let maps = unwound_symbolize::ProcessMaps::parse(
    ///     "55d0c0a00000-55d0c0a01000 r-xp 00001000 fe:01 1234   /usr/bin/true\n\
    ///      7ffd1c9f0000-7ffd1c9f2000 r-xp 00000000 00:00 0      [vdso]\n",
    /// );
    /// let m = maps.find(0x55d0c0a00010).unwrap();
    /// assert_eq!(m.file_offset(0x55d0c0a00010), 0x1010);
    /// assert!(maps.find(0x7ffd1c9f0000).unwrap().is_pseudo());
    /// assert!(maps.find(0x1000).is_none());
    /// ```
    pub fn parse(text: &str) -> Self {
        let mut mappings: Vec<Mapping> = text.lines().filter_map(parse_line).collect();
        mappings.sort_by_key(|m| m.start);
        ProcessMaps { mappings }
    }

    /// The mapping that contains `addr`.
    pub fn find(&self, addr: u64) -> Option<&Mapping> {
        let i = self.mappings.partition_point(|m| m.start <= addr).checked_sub(1)?;
        let m = &self.mappings[i];
        (addr < m.end).then_some(m)
    }

    /// True when no mapping was read (the process had exited).
    pub fn is_empty(&self) -> bool {
        self.mappings.is_empty()
    }

    /// All mappings, by address.
    pub fn iter(&self) -> impl Iterator<Item = &Mapping> {
        self.mappings.iter()
    }
}

fn parse_line(line: &str) -> Option<Mapping> {
    let mut fields = line.splitn(6, ' ').filter(|f| !f.is_empty());
    let range = fields.next()?;
    let perms = fields.next()?;
    let offset = u64::from_str_radix(fields.next()?, 16).ok()?;
    let device = fields.next()?.to_string();
    let inode = fields.next()?.parse().ok()?;
    let path = fields.next().map(str::trim_start).filter(|p| !p.is_empty()).map(PathBuf::from);
    let (start, end) = range.split_once('-')?;
    let start = u64::from_str_radix(start, 16).ok()?;
    let end = u64::from_str_radix(end, 16).ok()?;
    if end <= start {
        return None;
    }
    Some(Mapping {
        start,
        end,
        executable: perms.as_bytes().get(2) == Some(&b'x'),
        offset,
        device,
        inode,
        path,
    })
}
