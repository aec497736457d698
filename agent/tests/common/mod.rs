//! Helpers shared by the end-to-end tests: building and starting fixtures, reading the
//! manifest, running the real agent, reading folded output.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use serde::Deserialize;

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

pub fn fixtures_dir() -> PathBuf {
    workspace_root().join("target").join("fixtures")
}

/// Builds every fixture (once per test binary) with the project's Makefile.
pub fn build_fixtures() -> PathBuf {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        let status = Command::new("make")
            .args(["-s", "-C"])
            .arg(workspace_root().join("fixtures"))
            .arg(format!("OUT={}", fixtures_dir().display()))
            .status()
            .expect("run make for the fixtures");
        assert!(status.success(), "building the fixtures failed");
    });
    fixtures_dir()
}

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

#[derive(Debug, Deserialize)]
pub struct Manifest {
    pub fixture: Vec<Fixture>,
}

#[derive(Debug, Deserialize, Clone)]
pub struct Fixture {
    pub name: String,
    pub lang: String,
    pub variants: Vec<String>,
    #[serde(default)]
    pub args: Vec<String>,
    pub stack: Vec<String>,
    pub fp_complete: bool,
    #[serde(default)]
    pub settle_ms: u64,
    pub kernel_frame: Option<String>,
}

impl Fixture {
    pub fn binary(&self, variant: &str) -> String {
        format!("{}_{}", self.name, variant)
    }
}

pub fn manifest() -> Manifest {
    let text = std::fs::read_to_string(workspace_root().join("fixtures/manifest.toml")).unwrap();
    toml::from_str(&text).expect("fixtures/manifest.toml parses")
}

/// A running fixture, killed when dropped.
pub struct Running {
    pub child: Child,
    pub name: String,
}

impl Running {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn start(dir: &Path, binary: &str, args: &[String]) -> Running {
    let mut tries = 0;
    loop {
        match Command::new(dir.join(binary)).args(args).stdin(Stdio::null()).stdout(Stdio::null()).spawn() {
            Ok(child) => return Running { child, name: binary.to_string() },
            // A just-copied binary is briefly "busy" while another test thread's fork still
            // holds its write descriptor (until that child execs).
            Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && tries < 100 => {
                tries += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("start fixture {binary}: {e}"),
        }
    }
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
            for f in frames.filter(|f| !f.ends_with("_[i]")) {
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

/// Expands `name*N` into N copies.
pub fn expand(pattern: &[String]) -> Vec<String> {
    let mut out = Vec::new();
    for p in pattern {
        match p.rsplit_once('*') {
            Some((name, n)) if n.chars().all(|c| c.is_ascii_digit()) && !n.is_empty() => {
                out.extend(std::iter::repeat_n(name.to_string(), n.parse().unwrap()))
            }
            _ => out.push(p.clone()),
        }
    }
    out
}

/// Whether the innermost user frames of `frames` (root first) are exactly `pattern`
/// (root first; "..." stands for one or more frames of any name).
pub fn matches_leaf(frames: &[String], pattern: &[String]) -> bool {
    fn rec(frames: &[String], pattern: &[String]) -> bool {
        // Both read from the leaf end.
        match pattern.split_last() {
            None => true,
            Some((p, rest)) if p == "..." => {
                (1..=frames.len()).any(|k| rec(&frames[..frames.len() - k], rest))
            }
            Some((p, rest)) => match frames.split_last() {
                Some((f, frest)) if f == p => rec(frest, rest),
                _ => false,
            },
        }
    }
    rec(frames, pattern)
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
