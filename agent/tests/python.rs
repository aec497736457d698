//! End to end, real BPF: CPython processes (Debian's stripped /usr/bin/python3.11, pyenv's
//! 3.11, 3.12 and 3.13) show their Python frames in place of the interpreter's, with the
//! native frames below (zlib's deflate) and above (Py_RunMain) kept. The expected stacks are
//! written from `fixtures/python/spin_compress.py`.

mod common;

use std::path::PathBuf;
use std::process::{Command, Stdio};

use common::*;

/// The interpreters on this machine kind: Debian's, then pyenv's 3.11-3.13.
fn interpreters() -> Vec<PathBuf> {
    let mut v = vec![PathBuf::from("/usr/bin/python3.11")];
    let root = Command::new("pyenv")
        .arg("root")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    let versions = root.map(|r| PathBuf::from(r).join("versions"));
    for minor in ["3.11", "3.12", "3.13"] {
        let found = versions.as_ref().and_then(|d| std::fs::read_dir(d).ok()).and_then(|entries| {
            entries.flatten().map(|e| e.path()).find(|p| {
                p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with(&format!("{minor}.")))
            })
        });
        if let Some(dir) = found {
            v.push(dir.join("bin/python3"));
        }
    }
    v.retain(|p| p.exists());
    v
}

#[test]
fn python_frames_replace_the_interpreters_and_keep_native_frames_around_them() {
    let Some((_guard, _)) =
        bpf_fixture_test("python_frames_replace_the_interpreters_and_keep_native_frames_around_them")
    else {
        return;
    };
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fixtures/python/spin_compress.py");
    let interpreters = interpreters();
    assert!(interpreters.len() >= 4, "expected Debian's and pyenv's 3.11-3.13: {interpreters:?}");
    let mut failures = Vec::new();
    for python in &interpreters {
        let mut child =
            Command::new(python).arg(&script).arg("60").stdout(Stdio::null()).spawn().expect("run python");
        settle(700);
        let tmp = tempfile::tempdir().unwrap();
        let (stacks, run) = record_folded(&[child.id()], 3.0, 499, tmp.path());
        // The same process in pprof: Python frames carry their file and line (the lines of
        // `leaf`'s loop in spin_compress.py, read from the script itself).
        let pb = tmp.path().join("profile.pb.gz");
        let pid = child.id().to_string();
        let rec = unwound(&["record", "--pid", &pid, "--duration", "1", "--output", pb.to_str().unwrap()]);
        let raw =
            Command::new("go").args(["tool", "pprof", "-raw"]).arg(&pb).output().expect("go tool pprof");
        let raw = String::from_utf8_lossy(&raw.stdout);
        let _ = child.kill();
        let _ = child.wait();
        let source = std::fs::read_to_string(&script).unwrap();
        let line_of = |text: &str| source.lines().position(|l| l.contains(text)).map(|i| i + 1).unwrap();
        let leaf_lines = [line_of("for i in range(n):"), line_of("s += i * i")];
        let located = leaf_lines.iter().any(|n| {
            raw.lines().any(|l| l.contains(" leaf ") && l.contains(&format!("spin_compress.py:{n}")))
        });
        if !located {
            failures.push(format!(
                "{}: no location `leaf spin_compress.py:{leaf_lines:?}` in pprof\n{}\n{raw}",
                python.display(),
                rec.stderr
            ));
        }
        let total: u64 = stacks.iter().map(|s| s.count).sum();
        let has = |s: &FoldedStack, seq: &[&str]| s.user.windows(seq.len()).any(|w| w == seq);
        let count =
            |f: &dyn Fn(&FoldedStack) -> bool| stacks.iter().filter(|s| f(s)).map(|s| s.count).sum::<u64>();
        let python_frames = count(&|s| has(s, &["<module>", "outer"]));
        let spin = count(&|s| has(s, &["<module>", "outer", "middle", "leaf"]));
        let deflate = count(&|s| has(s, &["<module>", "outer"]) && s.user.iter().any(|f| f == "deflate"));
        let eval_left = count(&|s| s.user.iter().any(|f| f.starts_with("_PyEval_EvalFrameDefault")));
        // Native frames above the Python ones: the interpreter's own start.
        let rooted = count(&|s| has(s, &["Py_RunMain"]) && has(s, &["<module>", "outer"]));
        let line = format!(
            "{}: {total} samples; <module>;outer {python_frames}, …;middle;leaf {spin}, outer…deflate {deflate}, under Py_RunMain {rooted}, _PyEval_EvalFrameDefault left {eval_left}",
            python.display()
        );
        eprintln!("{line}");
        let ok = total >= 300
            && python_frames as f64 >= 0.95 * total as f64
            && spin >= total / 10
            && deflate >= total / 20
            // Below Py_RunMain: all but the samples taken in glibc's `__tls_get_addr`, whose
            // hand-written fast path has no CFI and keeps no frame pointer (3.12+ reach the
            // thread state through it): their native walk stops there, marked.
            && rooted as f64 >= 0.85 * python_frames as f64
            && eval_left as f64 <= 0.02 * total as f64;
        if !ok {
            failures.push(format!("{line}\n{}", run.stderr));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Whether `seq` appears in `frames` in order (not necessarily adjacent).
fn in_order(frames: &[String], seq: &[&str]) -> bool {
    let mut it = frames.iter();
    seq.iter().all(|want| it.any(|f| f == want))
}

#[test]
fn every_kind_of_python_thread_has_its_chain() {
    let Some((_guard, _)) = bpf_fixture_test("every_kind_of_python_thread_has_its_chain") else { return };
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fixtures/python/threads_spin.py");
    // Thread (its name) → (chain in order, least share of its samples), from threads_spin.py.
    let deep: Vec<&str> = std::iter::once("<lambda>").chain(std::iter::repeat_n("deep", 101)).collect();
    let expected: Vec<(&str, Vec<&str>, f64)> = vec![
        ("py_deep", deep, 0.90),
        ("py_gen", vec!["gen_consumer", "gen"], 0.90),
        ("py_sorted", vec!["run.<locals>.body", "sort_user"], 0.90),
        ("py_sorted", vec!["sort_user", "key_fn"], 0.50),
        ("py_unicode", vec!["run.<locals>.body", "grüße"], 0.90),
        ("py_nogil", vec!["run.<locals>.body", "compress_loop"], 0.90),
        ("py_nogil", vec!["compress_loop", "deflate"], 0.50),
    ];
    let mut failures = Vec::new();
    for python in interpreters() {
        let mut child =
            Command::new(&python).arg(&script).arg("6").stdout(Stdio::null()).spawn().expect("run python");
        settle(800);
        let tmp = tempfile::tempdir().unwrap();
        let (stacks, run) = record_folded(&[child.id()], 3.0, 499, tmp.path());
        let _ = child.kill();
        let _ = child.wait();
        for (thread, chain, least) in &expected {
            let of: Vec<&FoldedStack> = stacks.iter().filter(|s| s.process == *thread).collect();
            let total: u64 = of.iter().map(|s| s.count).sum();
            let good: u64 = of.iter().filter(|s| in_order(&s.user, chain)).map(|s| s.count).sum();
            let share = good as f64 / total.max(1) as f64;
            let shown =
                if chain.len() > 4 { format!("<lambda>;deep×{}", chain.len() - 1) } else { chain.join(";") };
            eprintln!(
                "{}: {thread:10} {good:4}/{total:4} = {:5.1}%  {shown}",
                python.display(),
                100.0 * share
            );
            if total < 30 || share < *least {
                failures.push(format!(
                    "{} {thread}: {good}/{total} with {shown}\n{}",
                    python.display(),
                    run.stderr
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
