//! Finding the DWARF for a binary: in the file itself, by build-id under debug directories,
//! by `.gnu_debuglink` (CRC checked), or from debuginfod servers (build-id checked).

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use object::{Object, ObjectSection};

/// Where a binary's debugging information came from.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum DebugSource {
    /// The binary's own DWARF sections.
    Embedded,
    /// `DIR/.build-id/xx/yyyy.debug` under a debug directory.
    BuildId(PathBuf),
    /// The file named by `.gnu_debuglink`, its CRC matching.
    DebugLink(PathBuf),
    /// Downloaded from a debuginfod server (and cached at this path).
    Debuginfod(PathBuf),
    /// No DWARF was found: function names come from the symbol tables only.
    None,
}

impl DebugSource {
    /// The separate debug file, if there is one.
    pub fn path(&self) -> Option<&Path> {
        match self {
            DebugSource::BuildId(p) | DebugSource::DebugLink(p) | DebugSource::Debuginfod(p) => Some(p),
            _ => None,
        }
    }
}

/// A client for debuginfod servers (`GET URL/buildid/HEX/debuginfo`).
///
/// Downloads are capped in size and time, stored under `cache_dir`, and used only when the
/// downloaded file's build-id is the one asked for.
#[derive(Clone, Debug)]
pub struct Debuginfod {
    /// Server base URLs, tried in order.
    pub urls: Vec<String>,
    /// Time allowed for connecting and for each read.
    pub timeout: Duration,
    /// Largest file accepted.
    pub max_size: u64,
    /// Where downloaded files are kept, by build-id.
    pub cache_dir: PathBuf,
    /// How long a build-id that no server has is not asked for again: a marker
    /// `{build-id}.miss` in `cache_dir` keeps the answer across runs (elfutils' client keeps
    /// misses for 600 s). Zero asks every time.
    pub miss_ttl: Duration,
}

/// Why a debuginfod fetch failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DebuginfodError {
    /// No server had the file.
    #[error("no debuginfod server has build-id {0}")]
    NotFound(String),
    /// A request failed (connection, timeout, HTTP status other than 404, the response
    /// cut short): the server is down or unreachable.
    #[error("debuginfod request to {url} failed: {source}")]
    Request {
        /// What was requested.
        url: String,
        /// What went wrong.
        #[source]
        source: RequestError,
    },
    /// The server sent more than [`Debuginfod::max_size`] bytes.
    #[error("debuginfod file for {build_id} is larger than {max} bytes")]
    TooLarge {
        /// Requested build-id.
        build_id: String,
        /// The cap.
        max: u64,
    },
    /// The file the server sent is not the one asked for.
    #[error("debuginfod sent a file with build-id {got} for {wanted}")]
    WrongBuildId {
        /// Requested build-id.
        wanted: String,
        /// The file's build-id (empty if it has none or is not ELF).
        got: String,
    },
    /// This crate was built without its `debuginfod` feature: it has no HTTP client, and
    /// only files already in the download cache are found.
    #[error("unwound-symbolize was built without its `debuginfod` feature")]
    NotBuiltIn,
    /// The download could not be stored.
    #[error("cannot store debuginfod download in {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The system's reason.
        #[source]
        source: std::io::Error,
    },
}

/// Why a request to a debuginfod server failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RequestError {
    /// The server answered with an error status (404, "not found", is not an error).
    #[error("HTTP status {0}")]
    Status(u16),
    /// No answer: the connection failed or timed out (the HTTP client's reason).
    #[error("{0}")]
    Transport(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The response could not be read to its end, or not written to the download cache.
    #[error("reading the response: {0}")]
    Read(#[source] std::io::Error),
}

/// Hex spelling of a build-id.
pub fn hex(id: &[u8]) -> String {
    id.iter().map(|b| format!("{b:02x}")).collect()
}

impl Debuginfod {
    /// A client for the servers in `DEBUGINFOD_URLS` (space separated), or `None` when the
    /// variable is unset or empty. 10 s timeout, 2 GiB cap, misses kept 10 minutes.
    pub fn from_env(cache_dir: impl Into<PathBuf>) -> Option<Self> {
        let urls: Vec<String> = std::env::var("DEBUGINFOD_URLS")
            .ok()?
            .split_whitespace()
            .map(|u| u.trim_end_matches('/').to_string())
            .collect();
        (!urls.is_empty()).then(|| Debuginfod {
            urls,
            timeout: Duration::from_secs(10),
            max_size: 2 << 30,
            cache_dir: cache_dir.into(),
            miss_ttl: Duration::from_secs(600),
        })
    }

    /// The debuginfo file for `build_id`: from the download cache, or fetched (with the
    /// `debuginfod` feature; without it, [`DebuginfodError::NotBuiltIn`]).
    pub fn fetch(&self, build_id: &[u8]) -> Result<PathBuf, DebuginfodError> {
        let id = hex(build_id);
        let dest = self.cache_dir.join(format!("{id}.debug"));
        if dest.exists() && file_build_id(&dest).as_deref() == Some(build_id) {
            return Ok(dest);
        }
        let miss = self.cache_dir.join(format!("{id}.miss"));
        if self.recent_miss(&miss) {
            return Err(DebuginfodError::NotFound(id));
        }
        let got = self.download(build_id, id, dest);
        match &got {
            // Every server answered "not found": remembered (best effort; a marker that
            // cannot be written only means asking again).
            Err(DebuginfodError::NotFound(_))
                if !self.miss_ttl.is_zero() && std::fs::create_dir_all(&self.cache_dir).is_ok() =>
            {
                let _ = File::create(&miss);
            }
            Ok(_) => {
                let _ = std::fs::remove_file(&miss);
            }
            _ => {}
        }
        got
    }

    /// Whether the marker says no server had the file less than `miss_ttl` ago (a marker
    /// dated in the future is not trusted).
    fn recent_miss(&self, marker: &Path) -> bool {
        if self.miss_ttl.is_zero() {
            return false;
        }
        let Ok(modified) = std::fs::metadata(marker).and_then(|m| m.modified()) else { return false };
        std::time::SystemTime::now().duration_since(modified).is_ok_and(|age| age < self.miss_ttl)
    }

    #[cfg(not(feature = "debuginfod"))]
    fn download(&self, _build_id: &[u8], _id: String, _dest: PathBuf) -> Result<PathBuf, DebuginfodError> {
        Err(DebuginfodError::NotBuiltIn)
    }

    #[cfg(feature = "debuginfod")]
    fn download(&self, build_id: &[u8], id: String, dest: PathBuf) -> Result<PathBuf, DebuginfodError> {
        let agent =
            ureq::AgentBuilder::new().timeout_connect(self.timeout).timeout_read(self.timeout).build();
        let mut last = DebuginfodError::NotFound(id.clone());
        for base in &self.urls {
            let url = format!("{base}/buildid/{id}/debuginfo");
            let resp = match agent.get(&url).call() {
                Ok(r) => r,
                Err(ureq::Error::Status(404, _)) => continue,
                Err(ureq::Error::Status(status, _)) => {
                    last = DebuginfodError::Request { url, source: RequestError::Status(status) };
                    continue;
                }
                Err(ureq::Error::Transport(t)) => {
                    last = DebuginfodError::Request { url, source: RequestError::Transport(Box::new(t)) };
                    continue;
                }
            };
            if resp
                .header("content-length")
                .and_then(|l| l.parse::<u64>().ok())
                .is_some_and(|l| l > self.max_size)
            {
                return Err(DebuginfodError::TooLarge { build_id: id, max: self.max_size });
            }
            let io = |source| DebuginfodError::Io { path: dest.clone(), source };
            std::fs::create_dir_all(&self.cache_dir).map_err(io)?;
            // A fresh temporary file in the cache directory, removed unless kept.
            let mut tmp = match tempfile::Builder::new().prefix(".debuginfod-").tempfile_in(&self.cache_dir) {
                Ok(t) => t,
                Err(e) => return Err(io(e)),
            };
            let copied = std::io::copy(&mut resp.into_reader().take(self.max_size + 1), tmp.as_file_mut())
                .and_then(|n| tmp.as_file().sync_all().map(|_| n));
            let n = match copied {
                Ok(n) => n,
                Err(e) => {
                    last = DebuginfodError::Request { url, source: RequestError::Read(e) };
                    continue;
                }
            };
            if n > self.max_size {
                return Err(DebuginfodError::TooLarge { build_id: id, max: self.max_size });
            }
            let got = file_build_id(tmp.path()).unwrap_or_default();
            if got != build_id {
                return Err(DebuginfodError::WrongBuildId { wanted: id, got: hex(&got) });
            }
            tmp.persist(&dest).map_err(|e| io(e.error))?;
            return Ok(dest);
        }
        Err(last)
    }
}

/// The build-id of the ELF file at `path`.
pub(crate) fn file_build_id(path: &Path) -> Option<Vec<u8>> {
    let file = File::open(path).ok()?;
    // SAFETY: read-only private map; see `ElfSymbols::open`.
    let map = unsafe { memmap2::Mmap::map(&file) }.ok()?;
    let obj = object::File::parse(&*map).ok()?;
    obj.build_id().ok().flatten().map(<[u8]>::to_vec)
}

/// True when the object has a non-empty `.debug_info` with contents in the file.
pub(crate) fn has_dwarf(obj: &object::File<'_>) -> bool {
    obj.section_by_name(gimli::SectionId::DebugInfo.name())
        .is_some_and(|s| s.size() > 0 && s.compressed_file_range().is_ok_and(|r| r.compressed_size > 0))
}

/// Looks for a separate debug file for `obj` (read from `path`), in this order: build-id
/// under each of `dirs`, then `.gnu_debuglink` next to the file, in its `.debug/`, and under
/// each of `dirs` mirrored. Each candidate is checked (build-id equal, or CRC equal).
pub(crate) fn find_separate(obj: &object::File<'_>, path: &Path, dirs: &[PathBuf]) -> Option<DebugSource> {
    if let Some(id) = obj.build_id().ok().flatten().filter(|id| id.len() >= 2) {
        let h = hex(id);
        for d in dirs {
            let p = d.join(".build-id").join(&h[..2]).join(format!("{}.debug", &h[2..]));
            if file_build_id(&p).as_deref() == Some(id) {
                return Some(DebugSource::BuildId(p));
            }
        }
    }
    if let Ok(Some((name, crc))) = obj.gnu_debuglink() {
        let name = Path::new(std::str::from_utf8(name).ok()?);
        if name.components().count() != 1 {
            return None; // a bare file name only
        }
        let real = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
        let dir = real.parent().unwrap_or(Path::new("/"));
        let mut candidates = vec![dir.join(name), dir.join(".debug").join(name)];
        for d in dirs {
            candidates.push(d.join(dir.strip_prefix("/").unwrap_or(dir)).join(name));
        }
        for c in candidates {
            if c != real && file_crc(&c) == Some(crc) {
                return Some(DebugSource::DebugLink(c));
            }
        }
    }
    None
}

/// The `.gnu_debugaltlink` (dwz supplementary file) of a debug file, if it names one that
/// exists with the right build-id.
pub(crate) fn find_supplementary(
    obj: &object::File<'_>,
    debug_path: &Path,
    dirs: &[PathBuf],
) -> Option<PathBuf> {
    let (name, id) = obj.gnu_debugaltlink().ok().flatten()?;
    let name = Path::new(std::str::from_utf8(name).ok()?);
    let base = debug_path.parent().unwrap_or(Path::new("/"));
    let mut candidates = vec![base.join(name)];
    let h = hex(id);
    if h.len() > 2 {
        for d in dirs {
            candidates.push(d.join(".build-id").join(&h[..2]).join(format!("{}.debug", &h[2..])));
        }
    }
    candidates.into_iter().find(|c| file_build_id(c).as_deref() == Some(id))
}

fn file_crc(path: &Path) -> Option<u32> {
    let mut f = File::open(path).ok()?;
    let mut h = crc32fast::Hasher::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = f.read(&mut buf).ok()?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Some(h.finalize())
}
