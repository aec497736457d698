//! Helpers shared by the end-to-end tests: building and starting fixtures, reading the
//! manifest, running the real agent, reading folded output.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

#[allow(unused_imports)]
pub use unwound_fixtures::{
    build_fixtures, expand, fixtures_dir, manifest, matches_leaf, start, workspace_root, Fixture, Manifest,
    Running,
};

/// True when this process may load BPF programs. Without privileges a plain `cargo test`
/// skips with a printed reason; under CI (CI set) it fails instead.
pub fn bpf_available(test: &str) -> bool {
    let root = unsafe { libc::geteuid() } == 0;
    if root {
        return true;
    }
    if std::env::var_os("CI").is_some() {
        panic!("{test}: needs root to load BPF programs, and CI must run these tests");
    }
    eprintln!("SKIPPED {test}: needs root (CAP_BPF + CAP_PERFMON) to load BPF; run as root to include it");
    false
}

pub struct AgentRun {
    pub status: std::process::ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

pub fn unwound(args: &[&str]) -> AgentRun {
    let out = Command::new(env!("CARGO_BIN_EXE_unwound")).args(args).output().expect("run unwound");
    AgentRun {
        status: out.status,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Serializes the tests of one binary that profile many processes, so they do not share
/// the 2 CPUs (and their samples) with each other.
pub fn exclusive() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// The start of a test that loads BPF and runs fixtures: `None` when BPF is unavailable
/// outside CI (with a printed reason; in CI it fails); else the lock that keeps such tests
/// apart, and the built fixtures' directory.
pub fn bpf_fixture_test(test: &str) -> Option<(std::sync::MutexGuard<'static, ()>, PathBuf)> {
    if !bpf_available(test) {
        return None;
    }
    let guard = exclusive();
    Some((guard, build_fixtures()))
}

/// Records the given processes for `seconds` at `hz` into a folded file and returns it.
pub fn record_folded(pids: &[u32], seconds: f64, hz: u32, dir: &Path) -> (Vec<FoldedStack>, AgentRun) {
    record_folded_with(pids, seconds, hz, dir, &[])
}

/// [`record_folded`] with extra agent flags.
pub fn record_folded_with(
    pids: &[u32],
    seconds: f64,
    hz: u32,
    dir: &Path,
    extra: &[&str],
) -> (Vec<FoldedStack>, AgentRun) {
    let out = dir.join("profile.folded");
    let mut args: Vec<String> = vec!["record".into()];
    args.extend(extra.iter().map(|s| s.to_string()));
    for p in pids {
        args.push("--pid".into());
        args.push(p.to_string());
    }
    args.extend(["--duration".into(), seconds.to_string(), "--frequency".into(), hz.to_string()]);
    args.extend(["--output".into(), out.display().to_string()]);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let run = unwound(&refs);
    assert!(run.status.success(), "unwound record failed: {}", run.stderr);
    let text = std::fs::read_to_string(&out).expect("folded output written");
    (parse_folded(&text), run)
}

#[derive(Debug, Clone)]
pub struct FoldedStack {
    pub process: String,
    /// Root first.
    pub user: Vec<String>,
    /// Root first, without the `_[k]` suffix.
    pub kernel: Vec<String>,
    pub count: u64,
}

pub fn parse_folded(text: &str) -> Vec<FoldedStack> {
    text.lines()
        .map(|line| {
            let (stack, count) = line.rsplit_once(' ').expect("folded line has a count");
            let count: u64 = count.parse().expect("folded count is a number");
            let mut frames = stack.split(';');
            let process = frames.next().unwrap().to_string();
            let mut user = Vec::new();
            let mut kernel = Vec::new();
            // Inlined functions (`_[i]`) are the symbolizer's business, not the walker's:
            // the chains below are matched on real frames.
            // Python frames (`_[py]`) are matched by their function names.
            for f in frames.filter(|f| !f.ends_with("_[i]")).map(|f| f.strip_suffix("_[py]").unwrap_or(f)) {
                match f.strip_suffix("_[k]") {
                    Some(k) => kernel.push(k.to_string()),
                    None => {
                        assert!(kernel.is_empty(), "user frame after kernel frames in {line}");
                        user.push(f.to_string())
                    }
                }
            }
            FoldedStack { process, user, kernel, count }
        })
        .collect()
}

/// Per process: (samples, samples whose user stack matches).
pub fn shares(
    stacks: &[FoldedStack],
    pattern: &BTreeMap<String, Vec<String>>,
) -> BTreeMap<String, (u64, u64)> {
    let mut out: BTreeMap<String, (u64, u64)> = pattern.keys().map(|k| (k.clone(), (0, 0))).collect();
    for s in stacks {
        if let Some(p) = pattern.get(&s.process) {
            let e = out.get_mut(&s.process).unwrap();
            e.0 += s.count;
            if matches_leaf(&s.user, p) {
                e.1 += s.count;
            }
        }
    }
    out
}

pub fn settle(ms: u64) {
    std::thread::sleep(Duration::from_millis(ms));
}

#[cfg(test)]
mod tests {}
