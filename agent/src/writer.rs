//! Writing profiles: symbolize what the collector holds, write it atomically in the chosen
//! format, name `--every` intervals, keep the newest `--keep`.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use unwound_symbolize::KernelSymbols;

use crate::output::{self, ProfileMeta};
use crate::profile::Collector;
use crate::{Format, RecordArgs};

/// Symbolizes what a collector holds and writes it as one profile; the symbolizer (and
/// its decompressed debuginfo) is kept from one profile to the next.
pub(crate) struct ProfileWriter {
    pub(crate) format: Format,
    pub(crate) symbolizer: unwound_symbolize::Symbolizer,
    kernel_cache: Option<PathBuf>,
    keep: Option<usize>,
    /// Profiles written, oldest first (those deleted by `--keep` left out), and how many
    /// were written in all.
    pub(crate) written: Vec<PathBuf>,
    pub(crate) count: u64,
    /// Profiles that could not be written.
    pub(crate) failed: u64,
    /// Stacks over every profile written.
    pub(crate) stacks: usize,
    pub(crate) symbolize_time: Duration,
    frequency: u64,
}

impl ProfileWriter {
    pub(crate) fn new(args: &RecordArgs, format: Format) -> Self {
        let options = crate::symbolize::options(
            args.symbol_cache_dir.clone(),
            args.no_symbol_cache,
            args.symbol_memory,
            &args.debug_dirs,
        );
        ProfileWriter {
            format,
            kernel_cache: options.cache_dir.clone(),
            symbolizer: unwound_symbolize::Symbolizer::new(options),
            keep: args.keep.map(|k| usize::try_from(k).unwrap_or(usize::MAX)),
            written: Vec::new(),
            count: 0,
            failed: 0,
            stacks: 0,
            symbolize_time: Duration::ZERO,
            frequency: args.frequency,
        }
    }

    /// Writes one interval's profile, named after `output` and `start`; a profile that
    /// cannot be written is reported and counted, and recording goes on.
    pub(crate) fn write_interval(
        &mut self,
        collector: &Collector,
        output: &Path,
        length: Duration,
        start: SystemTime,
    ) {
        let path = interval_path(output, start);
        if let Err(err) = self.write(collector, &path, length, start) {
            eprintln!("{}", crate::error_line(&err));
            self.failed += 1;
        }
    }

    /// Writes `collector`'s stacks to `path`: a profile of `length` from `start`.
    pub(crate) fn write(
        &mut self,
        collector: &Collector,
        path: &Path,
        length: Duration,
        start: SystemTime,
    ) -> anyhow::Result<()> {
        let kernel = if collector.has_kernel_frames() {
            // Cached beside the debuginfo indexes (per boot and module set); only the
            // blocks holding these addresses are read.
            let loaded = match &self.kernel_cache {
                Some(dir) => KernelSymbols::load_cached(dir, &collector.kernel_addresses()),
                None => KernelSymbols::load(),
            };
            loaded.unwrap_or_else(|e| {
                eprintln!("warning: kernel frames stay unsymbolized: {e}");
                KernelSymbols::default()
            })
        } else {
            KernelSymbols::default()
        };
        let symbolize_started = Instant::now();
        let stacks = collector.symbolize(&kernel, &self.symbolizer);
        self.symbolize_time += symbolize_started.elapsed();
        let meta = ProfileMeta {
            frequency: self.frequency,
            duration_ns: length.as_nanos() as u64,
            start_unix_ns: start.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as i64),
        };
        write_atomically(path, |out| match self.format {
            Format::Folded => output::write_folded(out, &stacks),
            Format::Svg => output::write_svg(out, &stacks, &meta),
            Format::Pprof => output::write_pprof(out, &stacks, &meta),
        })?;
        self.stacks += stacks.len();
        self.written.push(path.to_path_buf());
        self.count += 1;
        if let Some(keep) = self.keep {
            while self.written.len() > keep {
                let old = self.written.remove(0);
                if let Err(e) = std::fs::remove_file(&old) {
                    if e.kind() != std::io::ErrorKind::NotFound {
                        eprintln!("warning: cannot delete old profile {}: {e}", old.display());
                    }
                }
            }
        }
        Ok(())
    }
}

/// `output` with the interval's start time (UTC, to the second) before its extension:
/// `dir/cpu.pb.gz` → `dir/cpu-20261202T065000Z.pb.gz`; a name taken already gets `-2`, `-3`…
fn interval_path(output: &Path, start: SystemTime) -> PathBuf {
    let name = output.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    // The extension starts at the first dot that does not start the name (`.pb.gz`).
    let (stem, ext) = match name.char_indices().skip(1).find(|&(_, c)| c == '.') {
        Some((i, _)) => name.split_at(i),
        None => (name.as_str(), ""),
    };
    let secs = start.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let stamp = utc_stamp(secs);
    let dir = output_dir(output);
    let mut path = dir.join(format!("{stem}-{stamp}{ext}"));
    let mut n = 2;
    while path.exists() {
        path = dir.join(format!("{stem}-{stamp}-{n}{ext}"));
        n += 1;
    }
    path
}

/// `YYYYMMDDTHHMMSSZ` for seconds since the Unix epoch (RFC 3339 in UTC, without its
/// separators).
fn utc_stamp(secs: u64) -> String {
    let t = UNIX_EPOCH + Duration::from_secs(secs);
    humantime::format_rfc3339_seconds(t).to_string().replace(['-', ':'], "")
}

pub(crate) fn output_dir(output: &Path) -> PathBuf {
    match output.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Writes to a temporary file beside `path` and renames it into place, so a failure never
/// leaves a half-written profile.
fn write_atomically(
    path: &Path,
    write: impl FnOnce(&mut dyn Write) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let dir = output_dir(path);
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{name}.unwound-{}.tmp", std::process::id()));
    let result = (|| {
        let file = File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
        let mut out = BufWriter::new(file);
        write(&mut out)?;
        let file = out.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_agree_with_date() {
        // Epoch, leap days (2000 is a leap year, 2100 is not), year ends, far future.
        for secs in
            [0u64, 951_782_400, 951_868_799, 4_107_542_400, 1_798_761_599, 1_796_196_600, 32_503_680_000]
        {
            let out = std::process::Command::new("date")
                .args(["-u", "-d", &format!("@{secs}"), "+%Y%m%dT%H%M%SZ"])
                .output()
                .expect("run date");
            let want = String::from_utf8_lossy(&out.stdout).trim().to_string();
            assert_eq!(utc_stamp(secs), want, "at {secs}");
        }
    }

    #[test]
    fn interval_names_keep_the_extension_and_never_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let at = UNIX_EPOCH + Duration::from_secs(1_796_194_200); // 2026-12-02T06:50:00Z
        let name = |out: &str| {
            interval_path(&dir.path().join(out), at).file_name().unwrap().to_string_lossy().into_owned()
        };
        assert_eq!(name("cpu.pb.gz"), "cpu-20261202T065000Z.pb.gz");
        assert_eq!(name("flame.svg"), "flame-20261202T065000Z.svg");
        assert_eq!(name("plain"), "plain-20261202T065000Z");
        assert_eq!(name(".hidden.folded"), ".hidden-20261202T065000Z.folded");
        std::fs::write(dir.path().join("cpu-20261202T065000Z.pb.gz"), b"").unwrap();
        assert_eq!(name("cpu.pb.gz"), "cpu-20261202T065000Z-2.pb.gz");
        std::fs::write(dir.path().join("cpu-20261202T065000Z-2.pb.gz"), b"").unwrap();
        assert_eq!(name("cpu.pb.gz"), "cpu-20261202T065000Z-3.pb.gz");
    }
}
