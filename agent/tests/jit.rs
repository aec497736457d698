//! JIT code, end to end with real BPF: Node compiles JavaScript into anonymous executable
//! memory and names it in `/tmp/perf-PID.map` (`--perf-basic-prof`). The walker takes a
//! frame-pointer step through that memory and goes on into node's own code with tables;
//! the agent names the JIT frames from the perf map. Checked against `perf record -g` /
//! `perf script` on the same process at the same time.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::{Command, Stdio};

use common::*;

/// What `perf script` shows of a JIT workload.
struct PerfView {
    /// JIT frame names (those starting with the prefix, without the `+0xOFF` perf adds).
    names: BTreeMap<String, u64>,
    samples: u64,
    /// Samples with a JIT frame named.
    named: u64,
    /// Samples with a JIT frame named whose walk reached the root (or libc's start).
    rooted: u64,
}

fn perf_jit_names(
    pid: u32,
    seconds: u32,
    dir: &std::path::Path,
    prefix: &str,
    call_graph: &str,
    root: &str,
) -> PerfView {
    let data = dir.join("perf.data");
    let status = Command::new("perf")
        .args([
            "record",
            "-q",
            "-e",
            "cpu-clock",
            "-F",
            "499",
            "--call-graph",
            call_graph,
            "-p",
            &pid.to_string(),
            "-o",
        ])
        .arg(&data)
        .args(["--", "sleep", &seconds.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("run perf record");
    assert!(status.success(), "perf record failed");
    let out = Command::new("perf").args(["script", "-i"]).arg(&data).output().expect("run perf script");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut view = PerfView { names: BTreeMap::new(), samples: 0, named: 0, rooted: 0 };
    // One block per sample: a header line, then its frames innermost first.
    for block in text.split("\n\n").filter(|b| b.contains("cpu-clock")) {
        view.samples += 1;
        let mut frames = Vec::new();
        for line in block.lines().skip(1) {
            let Some(rest) = line.trim_start().split_once(' ').map(|(_, r)| r) else { continue };
            if let Some(name) = rest.strip_suffix(')').and_then(|r| r.rsplit_once(" (")).map(|(n, _)| n) {
                frames.push(name.rsplit_once("+0x").map_or(name, |(n, _)| n).to_string());
            }
        }
        let jit: Vec<&String> = frames.iter().filter(|f| f.starts_with(prefix)).collect();
        for f in &jit {
            *view.names.entry(f.to_string()).or_insert(0) += 1;
        }
        if !jit.is_empty() {
            view.named += 1;
            // perf's frame-pointer walk ends inside libc (no frame pointers there): a stack
            // that reaches libc's start of the program or thread counts as rooted.
            let ends = [root, "__libc_start_call_main", "start_thread"];
            view.rooted += u64::from(frames.iter().any(|f| ends.contains(&f.as_str())));
        }
    }
    view
}

/// Runs `command` (a JIT workload of about 12 s), records it with unwound and `perf record
/// --call-graph CALL_GRAPH` at the same time, and checks: ≥ 90% of samples have frames
/// named `prefix…` from the perf map and a stack walked through them to `root`; every JIT
/// name perf shows we show, and every one we show the runtime wrote; each of `hot`
/// appears; unnamed JIT frames stay rare.
#[allow(clippy::too_many_arguments)]
fn jit_stacks_like_perf(
    test: &str,
    command: &mut Command,
    prefix: &str,
    hot: &[&str],
    call_graph: &'static str,
    root: &str,
    before: impl FnOnce(u32),
) {
    let Some((_guard, _)) = bpf_fixture_test(test) else { return };
    let child = command
        .stdout(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("{test}: cannot run {command:?}: {e}"));
    let child = Running { child, name: "jit".into() };
    let pid = child.pid();
    // The runtime compiles (or sets up its trampolines) in its first second.
    settle(1500);
    before(pid);
    let tmp = tempfile::tempdir().unwrap();
    let perf_dir = tmp.path().to_path_buf();
    let perf_prefix = prefix.to_string();
    let perf_root = root.to_string();
    let perf =
        std::thread::spawn(move || perf_jit_names(pid, 4, &perf_dir, &perf_prefix, call_graph, &perf_root));
    let (stacks, run) = record_folded_with(&[pid], 4.0, 499, tmp.path(), &["--json-summary"]);
    let perf = perf.join().unwrap();
    let (perf_names, perf_samples) = (&perf.names, perf.samples);
    // pprof, read back by Go's own reader: the JIT functions by name, with the source file
    // and line the name holds (V8, CPython).
    let pb = tmp.path().join("jit.pb.gz");
    let rec = unwound(&[
        "record",
        "--pid",
        &pid.to_string(),
        "--duration",
        "1.5",
        "--output",
        pb.to_str().unwrap(),
    ]);
    assert!(rec.status.success(), "{}", rec.stderr);
    let raw = Command::new("go").args(["tool", "pprof", "-raw"]).arg(&pb).output().expect("go tool pprof");
    let raw = String::from_utf8_lossy(&raw.stdout);
    drop(child);
    // The runtime's own view: the names it wrote.
    let map_path = format!("/tmp/perf-{pid}.map");
    let map = std::fs::read_to_string(&map_path).unwrap_or_default();
    let _ = std::fs::remove_file(&map_path);
    let written: BTreeSet<&str> = map.lines().filter_map(|l| l.splitn(3, ' ').nth(2)).collect();

    let total: u64 = stacks.iter().map(|s| s.count).sum();
    let named = |s: &&FoldedStack| s.user.iter().any(|f| f.starts_with(prefix));
    let with_jit: u64 = stacks.iter().filter(named).map(|s| s.count).sum();
    // The walk went through the JIT frames and on to the runtime's native root.
    let rooted: u64 = stacks
        .iter()
        .filter(named)
        .filter(|s| {
            s.user.first().is_some_and(|f| f == root) && !s.user.iter().any(|f| f.starts_with("[unwind"))
        })
        .map(|s| s.count)
        .sum();
    let mut ours: BTreeMap<String, u64> = BTreeMap::new();
    for s in &stacks {
        for f in s.user.iter().filter(|f| f.starts_with(prefix)) {
            *ours.entry(f.clone()).or_insert(0) += s.count;
        }
    }
    eprintln!("{}", run.stderr);
    eprintln!(
        "unwound: {total} samples, {with_jit} with JIT frames named, {rooted} of those rooted at {root}"
    );
    eprintln!(
        "perf:    {perf_samples} samples, {} with JIT frames named, {} of those rooted at {root}; JIT names {perf_names:?}",
        perf.named, perf.rooted
    );
    eprintln!("unwound: JIT names {ours:?}");
    assert!(total >= 500, "only {total} samples");
    // The perf map's reading is counted (and, here, nothing in it was left out).
    let summary: serde_json::Value =
        serde_json::from_str(run.stdout.lines().last().unwrap_or_default()).expect("JSON summary");
    assert!(summary["perf_maps"].as_u64() >= Some(1), "no perf map counted: {summary}");
    assert!(summary["perf_map_entries"].as_u64() > Some(0), "{summary}");
    assert_eq!(summary["perf_map_malformed"], 0, "{summary}");
    assert!(with_jit as f64 >= 0.9 * total as f64, "JIT frames named in {with_jit} of {total} samples");
    assert!(
        rooted as f64 >= 0.9 * total as f64,
        "{rooted} of {total} samples walked through JIT code to {root}"
    );
    // Every name perf shows, we show (perf's walk may reach fewer frames: with stack copies
    // it stops where the copy ends); every name we show is one the runtime wrote.
    let ours_set: BTreeSet<&String> = ours.keys().collect();
    let perf_set: BTreeSet<&String> = perf_names.keys().collect();
    assert!(perf_set.is_subset(&ours_set), "names only perf shows: {:?}", perf_set.difference(&ours_set));
    assert!(!perf_set.is_empty(), "perf named no JIT frame");
    for n in &ours_set {
        assert!(written.contains(n.as_str()), "{n} is not in the runtime's perf map");
    }
    for h in hot {
        assert!(ours.keys().any(|n| n.starts_with(h)), "no {h} frame: {ours:?}");
        let name = ours.keys().find(|n| n.starts_with(h)).unwrap();
        let located = match unwound_symbolize::jit_source(name) {
            Some((file, line)) => format!("{name} {file}:{line} "),
            None => format!("{name} "),
        };
        assert!(raw.contains(&located), "pprof has no location `{located}`:\n{raw}");
    }
    // JIT code no entry names stays the runtime's anonymous region (`[anon]+0x…`), never a
    // neighbour's name; here the runtime names what it runs.
    let unnamed: u64 =
        stacks.iter().filter(|s| s.user.iter().any(|f| f.starts_with("[anon]+"))).map(|s| s.count).sum();
    assert!(unnamed as f64 <= 0.05 * total as f64, "{unnamed} of {total} samples with unnamed JIT frames");
}

#[test]
fn node_jit_frames_are_walked_through_and_named_like_perf_does() {
    let script = workspace_root().join("fixtures/jit/fib.js");
    jit_stacks_like_perf(
        "node_jit_frames_are_walked_through_and_named_like_perf_does",
        // (V8 writes an isolate log into its working directory: not into the checkout.)
        Command::new("node").current_dir(std::env::temp_dir()).arg("--perf-basic-prof").arg(script).arg("12"),
        "JS:",
        &["JS:*fib", "JS:*work"],
        // V8 keeps frame pointers in its JIT code and builtins: perf's own walk reaches them.
        "fp",
        "_start",
        |_| {},
    );
}

/// pyenv's CPython 3.12 (on this machine kind; `PYENV_ROOT` or `~/.pyenv`).
fn python312() -> PathBuf {
    let root = std::env::var_os("PYENV_ROOT")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".pyenv")))
        .expect("HOME");
    let versions =
        std::fs::read_dir(root.join("versions")).expect("pyenv's versions (CPython 3.12 is needed)");
    let mut found: Vec<PathBuf> = versions
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("3.12"))
        .map(|e| e.path().join("bin/python3.12"))
        .filter(|p| p.exists())
        .collect();
    found.sort();
    found.pop().expect("pyenv has no CPython 3.12")
}

#[test]
fn python_perf_trampolines_are_walked_through_and_named_like_perf_does() {
    let script = workspace_root().join("fixtures/jit/fib.py");
    jit_stacks_like_perf(
        "python_perf_trampolines_are_walked_through_and_named_like_perf_does",
        Command::new(python312()).args(["-X", "perf"]).arg(script).arg("12"),
        "py::",
        &["py::fib:", "py::work:", "py::main:"],
        // CPython is built without frame pointers: perf needs its stack copies to get past
        // the interpreter to the trampolines.
        "dwarf",
        "_start",
        |_| {},
    );
}

#[test]
fn java_compiled_frames_are_walked_through_and_named_like_perf_does() {
    let test = "java_compiled_frames_are_walked_through_and_named_like_perf_does";
    let classes = tempfile::tempdir().unwrap();
    let status = Command::new("javac")
        .arg("-d")
        .arg(classes.path())
        .arg(workspace_root().join("fixtures/jit/Fib.java"))
        .status()
        .expect("javac (OpenJDK 17 is on this machine kind)");
    assert!(status.success(), "javac failed");
    jit_stacks_like_perf(
        test,
        Command::new("java")
            .arg("-XX:+PreserveFramePointer")
            .arg("-cp")
            .arg(classes.path())
            .args(["Fib", "12"]),
        "int Fib.",
        &["int Fib.fib(int)"],
        // HotSpot keeps frame pointers in compiled code with PreserveFramePointer.
        "fp",
        // Java's main method runs on a thread the launcher starts.
        "clone3",
        // HotSpot writes its perf map when asked (JDK 17), once: after tiered compilation
        // has settled on C2 code for the hot methods (code compiled after it has no name).
        |pid| {
            settle(2500);
            let out =
                Command::new("jcmd").arg(pid.to_string()).arg("Compiler.perfmap").output().expect("jcmd");
            assert!(out.status.success(), "jcmd Compiler.perfmap: {}", String::from_utf8_lossy(&out.stderr));
        },
    );
}
