//! Writing profiles: symbolize what the collector holds, label it, write it atomically in
//! the chosen format, hand it to the exporters, name `--every` intervals, keep the newest
//! `--keep`.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use unwound_export::{Auth, BaseUrl, Exporter, LabelResolver, RunLabels};
use unwound_symbolize::KernelSymbols;

use crate::output::{self, ProfileMeta};
use crate::{Format, RecordArgs};
use unwound_stackwalk::profile::{Interval, Stack};

/// `unwound record`'s labels and exports.
#[derive(clap::Args, Debug, Clone)]
pub struct ExportArgs {
    /// A label for every sample, in pprof and every export (repeatable, at most 16).
    #[arg(long = "label", value_name = "KEY=VALUE", value_parser = user_label)]
    pub labels: Vec<(String, String)>,
    /// The `service_name` of every sample. Default: the process's systemd service, else its
    /// container (`container/ID12`), else its name.
    #[arg(long, value_name = "NAME")]
    pub service_name: Option<String>,
    /// Push each profile to Grafana Pyroscope (`push.v1.PusherService/Push`) at URL.
    #[arg(long, value_name = "URL", value_parser = base_url)]
    pub pyroscope: Option<BaseUrl>,
    /// With `--pyroscope`: send `/ingest?format=pprof` requests instead of pushes (for
    /// servers that only take those).
    #[arg(long, requires = "pyroscope")]
    pub pyroscope_ingest: bool,
    /// Send each profile as OTLP profiles (`/v1development/profiles`, protobuf) to URL.
    #[arg(long, value_name = "URL", value_parser = base_url)]
    pub otlp: Option<BaseUrl>,
    /// Trust the CA certificates in this PEM file instead of the system's.
    #[arg(long, value_name = "PATH", value_parser = ca_file)]
    pub ca_file: Option<unwound_export::CaCertificates>,
    /// Send `Authorization: Bearer TOKEN` with the token in this file (or in
    /// `$UNWOUND_AUTH_TOKEN`).
    #[arg(long, value_name = "PATH", value_parser = bearer_file, conflicts_with = "basic_auth_file")]
    pub auth_token_file: Option<Auth>,
    /// Send basic credentials, `USER:PASSWORD` in this file (or in `$UNWOUND_BASIC_AUTH`).
    #[arg(long, value_name = "PATH", value_parser = basic_file)]
    pub basic_auth_file: Option<Auth>,
    /// Pyroscope tenant (`X-Scope-OrgID`).
    #[arg(long, value_name = "ID")]
    pub tenant: Option<String>,
    /// Keep profiles that could not be sent here (per backend, at most 64 MiB, 55 minutes)
    /// and send them when the backend answers again, also after a restart.
    #[arg(long, value_name = "DIR")]
    pub spool_dir: Option<PathBuf>,
    /// Longest wait for one request, and for the last profiles at the end, in seconds.
    #[arg(long, value_name = "SECONDS", default_value_t = 10.0, value_parser = crate::positive_seconds)]
    pub export_timeout: f64,
}

fn user_label(s: &str) -> Result<(String, String), String> {
    unwound_export::parse_user_label(s).map_err(|e| e.to_string())
}

fn base_url(s: &str) -> Result<BaseUrl, String> {
    BaseUrl::parse(s).map_err(|e| e.to_string())
}

fn ca_file(s: &str) -> Result<unwound_export::CaCertificates, String> {
    unwound_export::read_ca_file(Path::new(s)).map_err(|e| e.to_string())
}

fn read_secret(s: &str) -> Result<String, String> {
    std::fs::read_to_string(s).map_err(|e| format!("cannot read {s}: {e}"))
}

fn bearer_file(s: &str) -> Result<Auth, String> {
    Auth::bearer(&read_secret(s)?, s).map_err(|e| e.to_string())
}

fn basic_file(s: &str) -> Result<Auth, String> {
    Auth::basic(&read_secret(s)?, s).map_err(|e| e.to_string())
}

impl ExportArgs {
    /// Starts the exporters asked for; a setting that cannot be used is one error line and
    /// that part is left out.
    fn start(&self, run: &RunLabels) -> Option<Exporter> {
        use unwound_export::{Backend, ExportOptions, Protocol, SpoolOptions, TransportOptions};
        // Credentials from the environment when no file is given.
        let env_auth = || -> Option<Auth> {
            let (var, text) = ["UNWOUND_AUTH_TOKEN", "UNWOUND_BASIC_AUTH"]
                .into_iter()
                .find_map(|v| Some((v, std::env::var(v).ok()?)))?;
            let auth =
                if var == "UNWOUND_AUTH_TOKEN" { Auth::bearer(&text, var) } else { Auth::basic(&text, var) };
            auth.map_err(|e| eprintln!("error: {e}; sending without credentials")).ok()
        };
        let transport = TransportOptions {
            ca_certificates: self.ca_file.clone(),
            auth: self.auth_token_file.clone().or_else(|| self.basic_auth_file.clone()).or_else(env_auth),
            tenant: self.tenant.clone(),
            timeout: Duration::from_secs_f64(self.export_timeout),
        };
        let pyroscope =
            if self.pyroscope_ingest { Protocol::PyroscopeIngest } else { Protocol::PyroscopePush };
        let backends: Vec<Backend> = [(pyroscope, &self.pyroscope), (Protocol::Otlp, &self.otlp)]
            .into_iter()
            .filter_map(|(protocol, url)| {
                Some(Backend { protocol, url: url.clone()?, transport: transport.clone() })
            })
            .collect();
        if backends.is_empty() {
            return None;
        }
        let options =
            ExportOptions { spool: self.spool_dir.clone().map(SpoolOptions::new), ..Default::default() };
        Exporter::start(backends, run.clone(), options)
            .map_err(|e| eprintln!("error: {e}; profiles are not exported"))
            .ok()
    }
}

/// Symbolizes what a collector holds and writes it as one profile; the symbolizer (and
/// its decompressed debuginfo) is kept from one profile to the next.
pub(crate) struct ProfileWriter {
    pub(crate) format: Format,
    symbolizer: unwound_symbolize::Symbolizer,
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
    labels: RunLabels,
    resolver: LabelResolver,
    exporter: Option<Exporter>,
    export_timeout: Duration,
    /// Time spent labelling profiles and handing them to the exporters.
    pub(crate) export_time: Duration,
}

impl ProfileWriter {
    pub(crate) fn new(args: &RecordArgs, format: Format) -> Self {
        let labels = RunLabels::for_this_host(args.export.service_name.clone(), args.export.labels.clone())
            .unwrap_or_else(|e| {
                eprintln!("error: {e}; the run's labels are left out");
                RunLabels::for_this_host(None, Vec::new()).unwrap_or_default()
            });
        let options = crate::symbolize::options(
            args.symbol_cache_dir.clone(),
            args.no_symbol_cache,
            args.symbol_memory,
            &args.debug_dirs,
        );
        match remove_stale_temporaries(&args.output) {
            0 => {}
            n => eprintln!("unwound: removed {n} temporary files of earlier runs that ended mid-write"),
        }
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
            exporter: args.export.start(&labels),
            labels,
            resolver: LabelResolver::new(),
            export_timeout: Duration::from_secs_f64(args.export.export_timeout),
            export_time: Duration::ZERO,
        }
    }

    /// The labelled profile of `stacks`.
    fn labelled(&mut self, stacks: &[Stack], meta: &ProfileMeta) -> unwound_export::Profile {
        let mut labels: HashMap<(u32, &str), Arc<unwound_export::LabelSet>> = HashMap::new();
        let samples = stacks
            .iter()
            .map(|s| {
                let labels = labels.entry((s.pid, s.comm.as_str())).or_insert_with(|| {
                    Arc::new(self.labels.sample_labels(&self.resolver.process(s.pid), &s.comm))
                });
                unwound_export::Sample {
                    frames: s.frames.iter().map(export_frame).collect(),
                    count: s.count,
                    labels: Arc::clone(labels),
                }
            })
            .collect();
        self.resolver.retain(|pid| Path::new(&format!("/proc/{pid}")).exists());
        unwound_export::Profile {
            start_unix_ns: meta.start_unix_ns,
            duration_ns: meta.duration_ns,
            frequency_hz: meta.frequency,
            samples,
        }
    }

    /// Prints what the exporters have to say.
    fn print_export_notices(&self) {
        for n in self.exporter.iter().flat_map(Exporter::take_notices) {
            eprintln!("warning: export to {n}");
        }
    }

    /// Writes one interval's profile, named after `output` and `start`; a profile that
    /// cannot be written is reported and counted, and recording goes on.
    pub(crate) fn write_interval(
        &mut self,
        collector: &Interval,
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
        collector: &Interval,
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
        eprintln!("unwound: symbolizing (debuginfo indexes are built once and cached)…");
        let stacks = collector.symbolize(&kernel, &self.symbolizer);
        self.symbolize_time += symbolize_started.elapsed();
        let meta = ProfileMeta {
            frequency: self.frequency,
            duration_ns: length.as_nanos() as u64,
            start_unix_ns: start.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as i64),
        };
        let export_started = Instant::now();
        let labelled = Arc::new(self.labelled(&stacks, &meta));
        if let Some(exporter) = &self.exporter {
            exporter.export(Arc::clone(&labelled));
        }
        self.export_time += export_started.elapsed();
        self.print_export_notices();
        write_atomically(path, |out| match self.format {
            Format::Folded => output::write_folded(out, &stacks),
            Format::Svg => output::write_svg(out, &stacks, &meta),
            Format::Pprof => output::write_pprof(out, &labelled),
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

impl ProfileWriter {
    /// After each `--every` interval: binaries no longer sampled are closed, and memory
    /// the symbolization freed is given back to the system, so that an agent running for
    /// weeks stays the size of what the machine runs now.
    pub(crate) fn after_interval(&mut self) {
        self.symbolizer.release_unused();
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        // SAFETY: glibc's malloc_trim only returns free heap pages to the system.
        unsafe {
            libc::malloc_trim(0);
        }
    }

    /// The symbolizer's counts over the run.
    pub(crate) fn symbol_stats(&self) -> unwound_symbolize::Stats {
        self.symbolizer.stats()
    }
}

impl Drop for ProfileWriter {
    /// Sends what is still queued (at most `--export-timeout`) and says what each exporter
    /// did: the run's last step, after its summary.
    fn drop(&mut self) {
        let Some(exporter) = self.exporter.take() else { return };
        let wait = self.export_timeout + Duration::from_secs(1);
        self.print_export_notices();
        let (stats, notices) = exporter.finish(wait);
        for n in notices {
            eprintln!("warning: export to {n}");
        }
        for s in stats {
            eprintln!("unwound: export to {s}");
        }
        eprintln!(
            "unwound: labelling and queueing profiles for export took {:.1} ms",
            self.export_time.as_secs_f64() * 1e3
        );
    }
}

fn export_frame(f: &unwound_stackwalk::profile::Frame) -> unwound_export::Frame {
    unwound_export::Frame {
        function: f.name.clone(),
        module: f.module.clone(),
        address: f.address,
        kernel: f.kernel,
        lines: f
            .lines
            .iter()
            .map(|l| unwound_export::SourceLine {
                function: l.function.clone(),
                file: l.file.clone(),
                line: l.line,
            })
            .collect(),
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

/// The temporary file [`write_atomically`] writes `name` to before renaming it into place.
fn temporary_name(name: &str, pid: u32) -> String {
    format!(".{name}.unwound-{pid}.tmp")
}

/// Removes the temporary files of earlier runs in `output`'s directory that ended
/// mid-write (killed, or the machine lost power): those of processes no longer running.
/// Returns how many were removed.
pub(crate) fn remove_stale_temporaries(output: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(output_dir(output)) else { return 0 };
    let mut removed = 0;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .filter(|n| n.starts_with('.'))
            .and_then(|n| n.strip_suffix(".tmp"))
            .and_then(|n| n.rsplit_once(".unwound-"))
            .and_then(|(_, pid)| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if pid != std::process::id()
            && !Path::new(&format!("/proc/{pid}")).exists()
            && std::fs::remove_file(entry.path()).is_ok()
        {
            removed += 1;
        }
    }
    removed
}

/// Writes to a temporary file beside `path` and renames it into place, so a failure never
/// leaves a half-written profile.
fn write_atomically(
    path: &Path,
    write: impl FnOnce(&mut dyn Write) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let dir = output_dir(path);
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(temporary_name(&name, std::process::id()));
    let result = (|| {
        let file = File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
        let mut out = BufWriter::new(file);
        write(&mut out)?;
        let file = out.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        std::fs::rename(&tmp, path).map_err(anyhow::Error::from)
    })()
    .with_context(|| format!("cannot write {}", path.display()));
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
