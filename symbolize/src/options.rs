//! [`Options`]: where a [`crate::Symbolizer`] looks for debugging information and how much
//! memory it may keep.

use std::path::PathBuf;

use crate::Debuginfod;

/// How a [`Symbolizer`](crate::Symbolizer) finds debugging information and how much memory
/// it may keep.
///
/// [`Options::default`] reads no environment variable and asks no server: indexes kept in
/// memory only, `/usr/lib/debug` searched for debug files, no debuginfod.
/// [`Options::from_env`] is what a command-line tool wants: an on-disk cache under the
/// user's cache directory and the debuginfod servers of `DEBUGINFOD_URLS`.
///
/// ```
/// use unwound_symbolize::Options;
///
/// let o = Options::default();
/// assert!(o.cache_dir.is_none() && o.debuginfod.is_none());
/// ```
#[derive(Clone, Debug)]
pub struct Options {
    /// Where compiled indexes are stored (zstd-compressed, one file per build-id); `None`
    /// keeps them in memory only (still compressed).
    pub cache_dir: Option<PathBuf>,
    /// Most bytes of decompressed index blocks kept in memory across all binaries; the
    /// least recently used blocks are dropped beyond it and read back when needed. Names in
    /// answers share their block's strings: answers kept by the caller keep those strings
    /// (not the rest of the block) alive beyond the budget.
    pub memory_budget: usize,
    /// Directories searched for separate debug files (`.build-id/xx/yyyy.debug`, debuglink).
    pub debug_dirs: Vec<PathBuf>,
    /// A debuginfod client, tried when no local debug file is found. Without the
    /// `debuginfod` feature it finds only files already in its download cache.
    pub debuginfod: Option<Debuginfod>,
}

/// The default memory budget: 512 MiB of decompressed index blocks.
const DEFAULT_MEMORY_BUDGET: usize = 512 << 20;

/// Where distributions install separate debug files.
const SYSTEM_DEBUG_DIR: &str = "/usr/lib/debug";

impl Default for Options {
    /// No on-disk cache, a 512 MiB budget, `/usr/lib/debug`, no debuginfod. Reads no
    /// environment variable.
    fn default() -> Self {
        Options {
            cache_dir: None,
            memory_budget: DEFAULT_MEMORY_BUDGET,
            debug_dirs: vec![PathBuf::from(SYSTEM_DEBUG_DIR)],
            debuginfod: None,
        }
    }
}

impl Options {
    /// The options a profiler run by a user wants, from the environment: indexes cached
    /// under [`default_cache_dir`]`/symbols` (from `XDG_CACHE_HOME` or `HOME`), a 512 MiB
    /// budget, `/usr/lib/debug`, and the debuginfod servers of `DEBUGINFOD_URLS`
    /// ([`Debuginfod::from_env`]; downloads kept under [`default_cache_dir`]`/debuginfod`).
    /// Without a cache directory (neither variable set) indexes stay in memory and
    /// debuginfod is not used.
    pub fn from_env() -> Self {
        let cache = default_cache_dir();
        Options {
            cache_dir: cache.as_ref().map(|d| d.join("symbols")),
            debuginfod: cache.and_then(|d| Debuginfod::from_env(d.join("debuginfod"))),
            ..Options::default()
        }
    }
}

/// The default cache directory: `$XDG_CACHE_HOME/unwound` or `~/.cache/unwound`.
pub fn default_cache_dir() -> Option<PathBuf> {
    std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME").filter(|v| !v.is_empty()).map(|h| PathBuf::from(h).join(".cache"))
        })
        .map(|d| d.join("unwound"))
}
