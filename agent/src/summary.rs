//! The end-of-run summary: one block of lines for people, one JSON object for tools.

use std::path::PathBuf;
use std::time::Duration;

use unwound_stackwalk::{Counter, TableStats};

use crate::record::max_rss_kib;

pub(crate) struct Summary {
    pub(crate) counters: Vec<(Counter, u64)>,
    pub(crate) received: u64,
    pub(crate) malformed: u64,
    /// Stacks over every profile written.
    pub(crate) stacks: usize,
    /// Profiles written and kept, oldest first; profiles that could not be written.
    pub(crate) profiles: Vec<PathBuf>,
    pub(crate) profiles_written: u64,
    pub(crate) profiles_failed: u64,
    pub(crate) seconds: f64,
    pub(crate) cpus: usize,
    pub(crate) ring_bytes: u32,
    pub(crate) agent_cpu: Duration,
    /// The agent's CPU before sampling (tables, BPF load and verification), while
    /// sampling, and after (symbolization, the profile).
    pub(crate) cpu_phases: [Duration; 3],
    pub(crate) walker_programs: Vec<(&'static str, Option<u32>)>,
    pub(crate) symbol_errors: u64,
    /// Perf maps read for JIT names, and what their reading left out.
    pub(crate) perf_maps: (u64, unwound_symbolize::PerfMapStats),
    pub(crate) execs: u64,
    pub(crate) exits: u64,
    pub(crate) event_programs: Vec<(&'static str, Option<u32>)>,
    pub(crate) symbolize_time: Duration,
    pub(crate) symbol_stats: unwound_symbolize::Stats,
    pub(crate) bpf_run: Option<(u64, u64)>,
    pub(crate) tables: Option<TableStats>,
    /// CPython processes walked, left out by reason, and frames whose code object could
    /// not be read.
    pub(crate) python: (Option<unwound_stackwalk::PythonStats>, u64),
    /// Whether the table walker is off although tables were asked for (the kernel refused
    /// the segments probed at load).
    pub(crate) tables_off: bool,
    /// The running kernel's release (`uname -r`).
    pub(crate) kernel: String,
    /// Cache directories that could not be written.
    pub(crate) caches_unwritable: u64,
}

impl Summary {
    fn get(&self, c: Counter) -> u64 {
        self.counters.iter().find(|(k, _)| *k == c).map_or(0, |(_, v)| *v)
    }

    pub(crate) fn print(&self, ended_early: Option<&str>) {
        let fired = self.get(Counter::Samples);
        let mut dropped: Vec<String> = self
            .counters
            .iter()
            .filter(|(c, v)| c.is_drop() && *v > 0)
            .map(|(c, v)| format!("{}={v}", c.name()))
            .collect();
        if self.malformed > 0 {
            dropped.push(format!("malformed_record={}", self.malformed));
        }
        let dropped = if dropped.is_empty() { "none".to_string() } else { dropped.join(" ") };
        if let Some(why) = ended_early {
            eprintln!("unwound: stopped after {:.1} s: {why}", self.seconds);
        }
        let wrote = match self.profiles.as_slice() {
            [one] if self.profiles_written == 1 => one.display().to_string(),
            [first, .., last] if self.profiles_written == self.profiles.len() as u64 => {
                format!("{} profiles, {} … {}", self.profiles_written, first.display(), last.display())
            }
            [first, ..] => format!(
                "{} profiles, the newest {} kept: {} … {}",
                self.profiles_written,
                self.profiles.len(),
                first.display(),
                self.profiles.last().unwrap_or(first).display()
            ),
            [] => "no profile".to_string(),
        };
        let failed = match self.profiles_failed {
            0 => String::new(),
            n => format!(" ({n} could not be written)"),
        };
        eprintln!(
            "unwound: wrote {wrote}{failed} — {} samples in {} stacks; dropped: {dropped} (sample ring {} KiB)",
            self.received,
            self.stacks,
            self.ring_bytes >> 10
        );
        eprintln!(
            "unwound: {fired} perf samples fired ({:.1}/s per CPU; idle {}, other processes {}); user walks truncated {}, ended at a bad frame pointer {}; kernel threads {}",
            fired as f64 / self.seconds.max(1e-9) / self.cpus.max(1) as f64,
            self.get(Counter::Idle),
            self.get(Counter::Filtered),
            self.get(Counter::UserTruncated),
            self.get(Counter::UserWalkFailed),
            self.get(Counter::KernelThread),
        );
        eprintln!(
            "unwound: agent CPU {:.3} s ({:.2}% of one CPU; start-up {:.3} s, sampling {:.3} s, finish {:.3} s), peak RSS {} MiB; walker programs (verified instructions): {}{}",
            self.agent_cpu.as_secs_f64(),
            100.0 * self.agent_cpu.as_secs_f64() / self.seconds.max(1e-9),
            self.cpu_phases[0].as_secs_f64(),
            self.cpu_phases[1].as_secs_f64(),
            self.cpu_phases[2].as_secs_f64(),
            max_rss_kib() / 1024,
            self.walker_programs
                .iter()
                .map(|(name, n)| format!("{name} ({})", n.map_or("?".to_string(), |n| n.to_string())))
                .collect::<Vec<_>>()
                .join(", "),
            if self.symbol_errors > 0 {
                format!("; {} files unreadable for symbols", self.symbol_errors)
            } else {
                String::new()
            },
        );
        let events: Vec<String> = self
            .event_programs
            .iter()
            .map(|(e, n)| format!("{e} ({} insns)", n.map_or("?".to_string(), |n| n.to_string())))
            .collect();
        eprintln!(
            "unwound: processes followed: {} exec events, {} exits; event programs: {}",
            self.execs,
            self.exits,
            if events.is_empty() { "none".to_string() } else { events.join(", ") }
        );
        if self.tables_off {
            eprintln!(
                "unwound: unwind tables: off (the kernel refuses their map segments); frame pointers only"
            );
        }
        if let Some(t) = &self.tables {
            eprintln!("unwound: unwind tables (in segments, admitted by kernel {}): {t}", self.kernel);
        }
        if let (Some(py), unnamed) = &self.python {
            if py.processes > 0 || !py.disabled.is_empty() {
                let left: Vec<String> = py.disabled.iter().map(|(r, n)| format!("{n} {r}")).collect();
                eprintln!(
                    "unwound: Python: {} processes walked for Python frames; left out: {}; frames whose code object could not be read: {unnamed}",
                    py.processes,
                    if left.is_empty() { "none".to_string() } else { left.join(", ") }
                );
            }
        }
        let (maps, pm) = self.perf_maps;
        if maps > 0 {
            eprintln!(
                "unwound: JIT names: {maps} perf maps, {} entries ({} rewrote code named before); left out: malformed {}, too large {}, past the caps {}",
                pm.entries, pm.replaced, pm.malformed, pm.too_large, pm.dropped
            );
        }
        let st = &self.symbol_stats;
        eprintln!(
            "unwound: symbolized in {:.3} s: debuginfo indexes built {}, from cache {}, damaged caches rebuilt {}; {} blocks loaded, {} evicted, {} KiB resident; binaries closed once unused {} ({} open)",
            self.symbolize_time.as_secs_f64(),
            st.indexes_built,
            st.cache_hits,
            st.cache_rebuilt,
            st.blocks_loaded,
            st.blocks_evicted,
            st.resident_bytes / 1024,
            st.binaries_released,
            st.binaries_open,
        );
        if st.debuginfod_errors > 0 {
            eprintln!(
                "unwound: a debuginfod request failed (DEBUGINFOD_URLS); the servers were not asked again in this run"
            );
        }
    }

    pub(crate) fn json(&self) -> String {
        use serde_json::{json, Map, Value};
        let mut m: Map<String, Value> =
            self.counters.iter().map(|(c, v)| (c.name().to_string(), json!(v))).collect();
        let secs = |d: Duration, places: i32| {
            let f = 10f64.powi(places);
            json!((d.as_secs_f64() * f).round() / f)
        };
        let mut put = |k: &str, v: Value| {
            m.insert(k.to_string(), v);
        };
        put("received", json!(self.received));
        put("malformed_record", json!(self.malformed));
        put("stacks", json!(self.stacks));
        put("profiles", json!(self.profiles_written));
        put("profiles_failed", json!(self.profiles_failed));
        put("seconds", secs(Duration::from_secs_f64(self.seconds), 3));
        put("cpus", json!(self.cpus));
        put("ring_buffer_bytes", json!(self.ring_bytes));
        put("agent_cpu_seconds", secs(self.agent_cpu, 4));
        for (name, d) in ["startup", "sampling", "finish"].iter().zip(self.cpu_phases) {
            put(&format!("agent_{name}_cpu_seconds"), secs(d, 4));
        }
        put("agent_max_rss_kib", json!(max_rss_kib()));
        put("verified_instructions", json!(self.walker_programs.first().and_then(|p| p.1)));
        put("walker", json!(self.walker_programs.first().map_or("", |p| p.0)));
        put("symbol_errors", json!(self.symbol_errors));
        let (maps, pm) = self.perf_maps;
        put("perf_maps", json!(maps));
        put("perf_map_entries", json!(pm.entries));
        put("perf_map_replaced", json!(pm.replaced));
        put("perf_map_malformed", json!(pm.malformed));
        put("perf_map_too_large", json!(pm.too_large));
        put("perf_map_dropped", json!(pm.dropped));
        put("exec_events", json!(self.execs));
        put("exit_events", json!(self.exits));
        let st = &self.symbol_stats;
        put("symbolize_seconds", secs(self.symbolize_time, 4));
        put("symbol_indexes_built", json!(st.indexes_built));
        put("symbol_cache_hits", json!(st.cache_hits));
        put("symbol_cache_rebuilt", json!(st.cache_rebuilt));
        put("symbol_blocks_evicted", json!(st.blocks_evicted));
        put("symbol_resident_bytes", json!(st.resident_bytes));
        put("symbol_binaries_released", json!(st.binaries_released));
        put("symbol_binaries_open", json!(st.binaries_open));
        put("debuginfod_errors", json!(st.debuginfod_errors));
        for (k, v) in self.tables.iter().flat_map(TableStats::named) {
            put(k, json!(v));
        }
        put("kernel", json!(self.kernel));
        put("caches_unwritable", json!(self.caches_unwritable));
        let (py, unnamed) = &self.python;
        put("python_processes", json!(py.as_ref().map_or(0, |p| p.processes)));
        put("python_disabled", json!(py.as_ref().map(|p| p.disabled.clone()).unwrap_or_default()));
        put("python_frames_unnamed", json!(unnamed));
        let maps = match (&self.tables, self.tables_off) {
            (Some(_), _) => "segments",
            (None, true) => "refused by the kernel",
            (None, false) => "off",
        };
        put("table_maps", json!(maps));
        if let Some((runs, ns)) = self.bpf_run {
            put("bpf_runs", json!(runs));
            put("bpf_run_time_ns", json!(ns));
        }
        Value::Object(m).to_string()
    }
}
