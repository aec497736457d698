//! End to end, real BPF: profile every fixture with the real walker and check the stacks
//! against the manifest written from the fixtures' sources.

mod common;

use std::collections::BTreeMap;

use common::*;

#[test]
fn matcher_follows_the_manifest_rules() {
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    let pat = expand(&s(&["main", "f*2", "...", "leaf"]));
    assert!(matches_leaf(&s(&["_start", "main", "f", "f", "libc", "x", "leaf"]), &pat));
    assert!(!matches_leaf(&s(&["main", "f", "f", "leaf"]), &pat), "... needs one frame");
    assert!(!matches_leaf(&s(&["main", "f", "libc", "leaf"]), &pat));
    assert!(!matches_leaf(&s(&["main", "f", "f", "libc", "leaf", "extra"]), &pat));
}

#[test]
fn manifest_names_exist_in_the_fixture_binaries() {
    // The manifest is hand-written; binutils' nm (with its own demangler) confirms that
    // every expected function name is a real symbol of the fixture it names.
    let dir = build_fixtures();
    for f in manifest().fixture {
        for v in &f.variants {
            let mut out = String::new();
            for file in [dir.join(f.binary(v)), dir.join(format!("libunwound_plt_{v}.so"))] {
                if file.exists() {
                    let o = std::process::Command::new("nm").arg("-C").arg(&file).output().unwrap();
                    out.push_str(&String::from_utf8_lossy(&o.stdout));
                }
            }
            for name in expand(&f.stack).iter().filter(|n| *n != "...") {
                assert!(
                    out.lines().any(|l| l.splitn(3, ' ').nth(2) == Some(name.as_str())),
                    "{}: nm -C has no symbol {name}",
                    f.binary(v)
                );
            }
        }
    }
}

#[test]
fn frame_pointer_fixtures_have_their_full_chain() {
    let Some((_guard, _)) = bpf_fixture_test("frame_pointer_fixtures_have_their_full_chain") else { return };
    let manifest = manifest();
    let (running, patterns) = start_every_fixture(&manifest);
    settle(manifest.fixture.iter().map(|f| f.settle_ms).max().unwrap_or(0).max(100));
    let pids: Vec<u32> = running.iter().map(|r| r.pid()).collect();
    let tmp = tempfile::tempdir().unwrap();
    let (stacks, run) = record_folded_with(&pids, 5.0, 499, tmp.path(), &["--no-tables"]);
    eprintln!("{}", run.stderr);
    // ≥ 90% where frame pointers alone can recover the chain (see the manifest).
    let mut failures = print_and_check_shares(&manifest, &stacks, &patterns, "fp", |f, v| {
        (f.fp_complete && v != "nofp").then_some(0.90)
    });
    // Kernel stacks: the syscall fixture spends most of its time in read(2).
    for f in manifest.fixture.iter().filter(|f| f.kernel_frame.is_some()) {
        let want = f.kernel_frame.as_deref().unwrap();
        for v in &f.variants {
            let name = f.binary(v);
            let (total, with_kernel) =
                stacks.iter().filter(|s| s.process == name).fold((0, 0), |(t, k), s| {
                    (t + s.count, k + if s.kernel.iter().any(|k| k.contains(want)) { s.count } else { 0 })
                });
            eprintln!("{name}: {with_kernel}/{total} samples with a kernel frame *{want}*");
            if with_kernel * 2 < total {
                failures.push(format!(
                    "{name}: kernel frame *{want}* on {with_kernel}/{total} samples, want ≥ 50%"
                ));
            }
            // Samples taken in the kernel still carry the user chain (user registers come
            // from the task's saved frame).
            let user_ok: u64 = stacks
                .iter()
                .filter(|s| {
                    s.process == name && !s.kernel.is_empty() && matches_leaf(&s.user, &patterns[&name])
                })
                .map(|s| s.count)
                .sum();
            if f.fp_complete && v != "nofp" && user_ok * 10 < with_kernel * 9 {
                failures.push(format!(
                    "{name}: in-kernel samples with the full user chain {user_ok}/{with_kernel}"
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Starts every variant of every fixture; returns them with their expected chains by name.
fn start_every_fixture(manifest: &Manifest) -> (Vec<Running>, BTreeMap<String, Vec<String>>) {
    let dir = build_fixtures();
    let mut running = Vec::new();
    let mut patterns = BTreeMap::new();
    for f in &manifest.fixture {
        for v in &f.variants {
            running.push(start(&dir, &f.binary(v), &f.args));
            patterns.insert(f.binary(v), expand(&f.stack));
        }
    }
    (running, patterns)
}

/// Samples whose user stack ends, innermost, in the fixture's expected chain.
fn print_and_check_shares(
    manifest: &Manifest,
    stacks: &[FoldedStack],
    names: &BTreeMap<String, Vec<String>>,
    walker: &str,
    min_share: impl Fn(&Fixture, &str) -> Option<f64>,
) -> Vec<String> {
    let shares = shares(stacks, names);
    let mut failures = Vec::new();
    eprintln!("{:<16} {:>8} {:>8} {:>8}  walker", "fixture", "samples", "complete", "share");
    for f in &manifest.fixture {
        for v in &f.variants {
            let name = f.binary(v);
            let Some(&(total, matched)) = shares.get(&name) else { continue };
            let share = if total == 0 { 0.0 } else { matched as f64 / total as f64 };
            eprintln!("{name:<16} {total:>8} {matched:>8} {:>7.1}%  {walker}", share * 100.0);
            if total < 100 {
                failures.push(format!("{name}: only {total} samples"));
            } else if let Some(min) = min_share(f, v).filter(|m| share < *m) {
                failures.push(format!(
                    "{name}: full chain on {:.1}% of samples, want ≥ {:.0}%",
                    share * 100.0,
                    min * 100.0
                ));
            }
        }
    }
    failures
}

/// Records every fixture at once with `extra` flags and checks each gets its full chain on
/// ≥ 95% of its samples; returns the agent's run.
fn every_fixture_has_its_full_chain(walker: &str, extra: &[&str]) -> AgentRun {
    let manifest = manifest();
    let (running, patterns) = start_every_fixture(&manifest);
    // The signal fixture's timer fires after 10 ms; dlopen loads its library 1.5 s in,
    // while the agent is already recording.
    settle(200);
    let pids: Vec<u32> = running.iter().map(|r| r.pid()).collect();
    let tmp = tempfile::tempdir().unwrap();
    let (stacks, run) = record_folded_with(&pids, 6.0, 499, tmp.path(), extra);
    eprintln!("{}", run.stderr);
    let failures = print_and_check_shares(&manifest, &stacks, &patterns, walker, |_, _| Some(0.95));
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    run
}

#[test]
fn table_walker_gives_every_fixture_its_full_chain() {
    let Some((_guard, _)) = bpf_fixture_test("table_walker_gives_every_fixture_its_full_chain") else {
        return;
    };
    let run = every_fixture_has_its_full_chain("tables", &["--json-summary"]);
    // The fixtures repeat their frames from sample to sample: after its first sample a
    // process's frames come from the walker's per-CPU rule cache (and the chains above are
    // still complete, so the cached rules are the right ones).
    let json = summary_json(&run);
    // (A recursion's repeated frames are answered by the walk's own last-pc cache instead.)
    let (hits, frames, walks) =
        (json_u64(json, "rule_cache_hits"), json_u64(json, "table_frames"), json_u64(json, "table_walks"));
    eprintln!("rule cache: {hits} hits, {frames} table frames, {walks} table walks");
    assert!(hits <= frames, "more cache hits than table frames: {json}");
    assert!(hits >= 2 * walks, "the rule cache answered {hits} frames of {walks} walks: {json}");
    assert!(json_u64(json, "rule_cache_bytes") > 0, "rule cache memory not reported: {json}");
}

/// The walker for kernels without `bpf_loop` (forced here: this kernel has it): the same
/// fixtures, the same threshold, the walk carried from program to program by tail calls
/// (the 300-deep recursion needs 19 of them).
#[test]
fn the_tail_call_walker_gives_every_fixture_its_full_chain() {
    let Some((_guard, _)) = bpf_fixture_test("the_tail_call_walker_gives_every_fixture_its_full_chain")
    else {
        return;
    };
    let run = every_fixture_has_its_full_chain("tail calls", &["--walker", "tail-calls", "--json-summary"]);
    assert!(
        run.stdout.contains("\"walker\":\"on_cpu_sample_tail\""),
        "not the tail-call walker: {}",
        run.stdout
    );
}

#[test]
fn a_process_started_after_the_agent_gets_tables() {
    let Some((_guard, dir)) = bpf_fixture_test("a_process_started_after_the_agent_gets_tables") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    // A unique process name, so the whole-machine profile can be searched for it.
    std::fs::copy(dir.join("chain_nofp"), tmp.path().join("late_chain")).unwrap();
    let out = tmp.path().join("all.folded");
    let agent = std::process::Command::new(env!("CARGO_BIN_EXE_unwound"))
        .args(["record", "--duration", "5", "--frequency", "499", "--output"])
        .arg(&out)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    settle(1500);
    let late = start(tmp.path(), "late_chain", &[]);
    let output = agent.wait_with_output().unwrap();
    drop(late);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    let stacks = parse_folded(&std::fs::read_to_string(&out).unwrap());
    let (total, good) = c_chain_counts(&stacks, "late_chain");
    eprintln!("late_chain: {good}/{total} samples with the full chain\n{stderr}");
    assert!(total >= 100, "only {total} samples of the late process");
    assert!(good * 100 >= total * 95, "{good}/{total}");
}

#[test]
fn a_command_is_run_and_profiled_until_it_exits() {
    let Some((_guard, dir)) = bpf_fixture_test("a_command_is_run_and_profiled_until_it_exits") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("cmd.folded");
    let program = dir.join("throughput_nofp");
    let out_arg = out.display().to_string();
    let program_arg = program.display().to_string();
    // Something else busy at the same time, which the command's profile must leave out.
    let _other = start(&dir, "chain_nofp", &[]);
    let run = unwound(&[
        "record",
        "--frequency",
        "499",
        "--json-summary",
        "--output",
        &out_arg,
        "--",
        &program_arg,
        "2",
    ]);
    assert!(run.status.success(), "{}", run.stderr);
    assert!(run.stderr.contains("the command exited"), "{}", run.stderr);
    let json = summary_json(&run);
    let seconds: f64 = json.split("\"seconds\":").nth(1).unwrap().split(',').next().unwrap().parse().unwrap();
    assert!((1.5..4.0).contains(&seconds), "recorded {seconds} s of a 2 s command");
    let stacks = parse_folded(&std::fs::read_to_string(&out).unwrap());
    let others: Vec<&FoldedStack> = stacks.iter().filter(|s| s.process != "throughput_nofp").collect();
    assert!(others.is_empty(), "samples of other processes: {others:?}");
    // main → tp_a → … → tp_e, from the fixture's source; the walk starts with its first
    // samples, before the process has tables, so a few may fall short.
    let chain = expand(&["main", "tp_a", "tp_b", "tp_c", "tp_d", "tp_e"].map(String::from));
    let total: u64 = stacks.iter().map(|s| s.count).sum();
    let good: u64 = stacks.iter().filter(|s| matches_leaf(&s.user, &chain)).map(|s| s.count).sum();
    eprintln!("throughput_nofp as a command: {good}/{total} samples with the full chain");
    assert!(total >= 300, "only {total} samples in 2 s at 499 Hz");
    let short: Vec<&FoldedStack> = stacks.iter().filter(|s| !matches_leaf(&s.user, &chain)).collect();
    assert!(good * 100 >= total * 95, "{good}/{total} with the full chain; the others: {short:?}");

    // The command's exit status is unwound's, and a signal's is 128 + its number.
    let out2 = tmp.path().join("exit.folded").display().to_string();
    let run = unwound(&["record", "--output", &out2, "--", "sh", "-c", "exit 3"]);
    assert_eq!(run.status.code(), Some(3), "{}", run.stderr);
    let run = unwound(&["record", "--output", &out2, "--", "sh", "-c", "kill -TERM $$"]);
    assert_eq!(run.status.code(), Some(128 + 15), "{}", run.stderr);
}

#[test]
fn continuous_profiles_hold_their_own_intervals() {
    let Some((_guard, dir)) = bpf_fixture_test("continuous_profiles_hold_their_own_intervals") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    // Unique process names: one process for the first interval or two, another after it.
    for name in ["early_chain", "late_chain"] {
        std::fs::copy(dir.join("chain_nofp"), tmp.path().join(name)).unwrap();
    }
    let stamp_now = || {
        let out = std::process::Command::new("date").args(["-u", "+%Y%m%dT%H%M%SZ"]).output().unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    let before = stamp_now();
    let early = start(tmp.path(), "early_chain", &[]);
    let out = tmp.path().join("cpu.folded");
    let agent = std::process::Command::new(env!("CARGO_BIN_EXE_unwound"))
        .args(["record", "--every", "1", "--keep", "4", "--duration", "4.5", "--frequency", "199"])
        .args(["--json-summary", "--output"])
        .arg(&out)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    settle(1800);
    drop(early);
    let late = start(tmp.path(), "late_chain", &[]);
    let output = agent.wait_with_output().unwrap();
    drop(late);
    let after = stamp_now();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    let run = AgentRun {
        status: output.status,
        stdout: String::from_utf8_lossy(&output.stdout).into(),
        stderr: stderr.to_string(),
    };
    let json = summary_json(&run);
    // Four whole intervals and the last half second; the oldest deleted by --keep.
    assert_eq!(json_u64(json, "profiles"), 5, "{stderr}");
    let mut files: Vec<String> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("cpu-") && n.ends_with(".folded"))
        .collect();
    files.sort();
    assert_eq!(files.len(), 4, "--keep 4 left {files:?}");
    for f in &files {
        let stamp = &f["cpu-".len()..f.len() - ".folded".len()];
        assert!(before.as_str() <= stamp && stamp <= after.as_str(), "{f} not within {before}..{after}");
    }
    let profiles: Vec<Vec<FoldedStack>> =
        files.iter().map(|f| parse_folded(&std::fs::read_to_string(tmp.path().join(f)).unwrap())).collect();
    let counts: Vec<((u64, u64), (u64, u64))> = profiles
        .iter()
        .map(|p| (c_chain_counts(p, "early_chain"), c_chain_counts(p, "late_chain")))
        .collect();
    eprintln!("(early total, full), (late total, full) per kept profile: {counts:?}\n{stderr}");
    // The first process was stopped at least a second before the last two intervals began:
    // were a profile to hold more than its own interval, they would show it.
    for ((early, _), _) in &counts[2..] {
        assert_eq!(*early, 0, "a later profile holds samples of a process that had exited: {counts:?}");
    }
    let late: u64 = counts[1..].iter().map(|(_, (late, _))| late).sum();
    assert!(late >= 60, "too few samples of the process started later: {counts:?}");
    for (_, (late, good)) in &counts[1..] {
        assert!(good * 100 >= late * 95, "late_chain: {good}/{late} with the full chain: {profiles:?}");
    }
    let kept: u64 = profiles.iter().flatten().map(|s| s.count).sum();
    assert!(kept <= json_u64(json, "received"), "kept profiles hold more samples than were taken");
}

/// Each sample's (pid, frames root first) from `perf script --no-inline -F pid,ip,sym`.
fn perf_stacks(text: &str) -> Vec<(String, Vec<String>)> {
    let mut out = Vec::new();
    let mut cur: Option<(String, Vec<String>)> = None;
    for line in text.lines() {
        if line.trim().is_empty() {
            if let Some((comm, mut frames)) = cur.take() {
                frames.reverse();
                out.push((comm, frames));
            }
            continue;
        }
        // Sample lines start with a space and the pid; frame lines with a tab.
        if !line.starts_with('\t') {
            cur = Some((line.trim().to_string(), Vec::new()));
            continue;
        }
        if let Some((_, frames)) = cur.as_mut() {
            let mut f = line.split_whitespace();
            let _addr = f.next();
            let sym = f.collect::<Vec<_>>().join(" ");
            frames.push(sym);
        }
    }
    out
}

/// Function names as both tools can agree on them: C++ parameters dropped.
fn normalize(name: &str) -> String {
    let n = name.split('@').next().unwrap_or(name);
    match n.find('(') {
        Some(i) if i > 0 => n[..i].to_string(),
        _ => n.to_string(),
    }
}

/// Per stack of the fixture's own functions (root first, joined by `;`): its share.
fn own_stack_shares(stacks: &[Vec<String>], own: &[String]) -> BTreeMap<String, f64> {
    let mut counts: BTreeMap<String, u64> = BTreeMap::new();
    for s in stacks {
        let key: Vec<String> = s.iter().map(|f| normalize(f)).filter(|f| own.contains(f)).collect();
        *counts.entry(key.join(";")).or_default() += 1;
    }
    let total = stacks.len().max(1) as f64;
    counts.into_iter().map(|(k, v)| (k, v as f64 / total)).collect()
}

#[test]
fn stacks_agree_with_perf_dwarf_unwinding() {
    let Some((_guard, dir)) = bpf_fixture_test("stacks_agree_with_perf_dwarf_unwinding") else { return };
    let manifest = manifest();
    let chosen = ["chain", "cpp_chain", "rs_chain", "qsort", "signal", "plt"];
    let mut running = Vec::new();
    for f in manifest.fixture.iter().filter(|f| chosen.contains(&f.name.as_str())) {
        running.push((f, start(&dir, &f.binary("nofp"), &f.args)));
    }
    settle(200);
    let tmp = tempfile::tempdir().unwrap();
    let perf_data = tmp.path().join("perf.data");
    // The same workload, at the same time, sampled by both.
    let perf = std::process::Command::new("perf")
        .args(["record", "-q", "-e", "cpu-clock", "-F", "199", "--call-graph", "dwarf", "-a", "-o"])
        .arg(&perf_data)
        .args(["--", "sleep", "5"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("perf (linux-perf)");
    let pids: Vec<u32> = running.iter().map(|(_, r)| r.pid()).collect();
    let (ours, _) = record_folded(&pids, 5.0, 199, tmp.path());
    let status = perf.wait_with_output().unwrap().status;
    assert!(status.success(), "perf record failed");
    let script = std::process::Command::new("perf")
        .args(["script", "--no-inline", "-F", "pid,ip,sym", "-i"])
        .arg(&perf_data)
        .output()
        .unwrap();
    let theirs = perf_stacks(&String::from_utf8_lossy(&script.stdout));

    let mut failures = Vec::new();
    eprintln!(
        "{:<16} {:>7} {:>9} {:>7} {:>9}  top stack (ours / perf)",
        "fixture", "ours n", "complete", "perf n", "complete"
    );
    for (f, proc_) in &running {
        let name = f.binary("nofp");
        let pid = proc_.pid();
        let pattern: Vec<String> = expand(&f.stack).iter().map(|s| normalize(s)).collect();
        let own: Vec<String> = pattern.iter().filter(|p| *p != "...").cloned().collect();
        let mut ours_stacks = Vec::new();
        for s in ours.iter().filter(|s| s.process == name) {
            for _ in 0..s.count {
                ours_stacks.push(s.user.clone());
            }
        }
        let perf_stacks: Vec<Vec<String>> =
            theirs.iter().filter(|(p, _)| *p == pid.to_string()).map(|(_, s)| s.clone()).collect();
        let complete = |stacks: &[Vec<String>]| {
            let n = stacks
                .iter()
                .filter(|s| matches_leaf(&s.iter().map(|x| normalize(x)).collect::<Vec<_>>(), &pattern))
                .count();
            n as f64 / stacks.len().max(1) as f64
        };
        let (ours_c, perf_c) = (complete(&ours_stacks), complete(&perf_stacks));
        let (a, b) = (own_stack_shares(&ours_stacks, &own), own_stack_shares(&perf_stacks, &own));
        let top = a.iter().max_by(|x, y| x.1.total_cmp(y.1)).map(|(k, _)| k.clone()).unwrap_or_default();
        let (ta, tb) = (a.get(&top).copied().unwrap_or(0.0), b.get(&top).copied().unwrap_or(0.0));
        eprintln!(
            "{name:<16} {:>7} {:>8.1}% {:>7} {:>8.1}%  {:.1}% / {:.1}%",
            ours_stacks.len(),
            ours_c * 100.0,
            perf_stacks.len(),
            perf_c * 100.0,
            ta * 100.0,
            tb * 100.0
        );
        if perf_stacks.len() < 50 || ours_stacks.len() < 50 {
            failures.push(format!(
                "{name}: too few samples (ours {}, perf {})",
                ours_stacks.len(),
                perf_stacks.len()
            ));
            continue;
        }
        if ours_c + 0.005 < perf_c {
            failures.push(format!(
                "{name}: complete {:.1}% below perf's {:.1}%",
                ours_c * 100.0,
                perf_c * 100.0
            ));
        }
        for key in a.keys().chain(b.keys()) {
            let (x, y) = (a.get(key).copied().unwrap_or(0.0), b.get(key).copied().unwrap_or(0.0));
            if (x.max(y) >= 0.05) && (x - y).abs() > 0.05 {
                failures.push(format!("{name}: stack {key:?} ours {:.1}% perf {:.1}%", x * 100.0, y * 100.0));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// A process that replaces its program while recording (same pid): samples before the
/// exec are symbolized with the first program's mappings, samples after with the second's,
/// and the walker follows the new image without waiting for a periodic rescan.
#[test]
fn a_process_that_execs_keeps_both_programs_apart() {
    let Some((_guard, dir)) = bpf_fixture_test("a_process_that_execs_keeps_both_programs_apart") else {
        return;
    };
    let second = dir.join("cpp_chain_nofp").display().to_string();
    let running = start(&dir, "exec_after_nofp", &["1500".to_string(), second]);
    settle(100);
    let tmp = tempfile::tempdir().unwrap();
    let (stacks, run) = record_folded_with(&[running.pid()], 3.5, 199, tmp.path(), &["--json-summary"]);
    eprintln!("{}", run.stderr);
    let summary: serde_json::Value =
        serde_json::from_str(run.stdout.lines().last().expect("JSON summary")).expect("summary is JSON");
    assert!(summary["exec_events"].as_u64().unwrap() >= 1, "the exec was seen: {summary}");
    let share = |comm: &str, chain: &[&str]| {
        let pattern: Vec<String> = chain.iter().map(|s| s.to_string()).collect();
        let total: u64 = stacks.iter().filter(|s| s.process == comm).map(|s| s.count).sum();
        let good: u64 = stacks
            .iter()
            .filter(|s| s.process == comm && matches_leaf(&s.user, &pattern))
            .map(|s| s.count)
            .sum();
        eprintln!("{comm}: {good}/{total}");
        (total, good)
    };
    let (t1, g1) = share("exec_after_nofp", &["main", "exec_spin_a", "exec_spin_b"]);
    let (t2, g2) = share(
        "cpp_chain_nofp",
        &[
            "main",
            "cppfix::chain_a(unsigned long)",
            "cppfix::chain_b(unsigned long)",
            "cppfix::Spinner<int>::chain_c(int)",
        ],
    );
    assert!(t1 >= 100 && t2 >= 100, "samples of both programs: {t1}, {t2}");
    assert!(g1 as f64 >= 0.9 * t1 as f64, "first program's chain on {g1}/{t1}");
    assert!(g2 as f64 >= 0.9 * t2 as f64, "second program's chain on {g2}/{t2}");
}

/// (samples, samples whose user stack ends in the C chain fixture's chain) of `process`.
fn c_chain_counts(stacks: &[FoldedStack], process: &str) -> (u64, u64) {
    let chain = expand(&["main".into(), "c_chain_a".into(), "c_chain_b".into(), "c_chain_c".into()]);
    stacks
        .iter()
        .filter(|s| s.process == process)
        .fold((0, 0), |(t, g), s| (t + s.count, g + if matches_leaf(&s.user, &chain) { s.count } else { 0 }))
}

/// The agent's JSON summary line (`--json-summary`).
fn summary_json(run: &AgentRun) -> &str {
    run.stdout.lines().find(|l| l.starts_with('{')).expect("JSON summary")
}

/// The value of `"key":N` in the agent's JSON summary.
fn json_u64(json: &str, key: &str) -> u64 {
    let pat = format!("\"{key}\":");
    let at = json.find(&pat).unwrap_or_else(|| panic!("{key} missing from {json}")) + pat.len();
    json[at..].chars().take_while(char::is_ascii_digit).collect::<String>().parse().unwrap()
}

#[test]
fn a_table_budget_evicts_the_tables_not_sampled() {
    let Some((_guard, dir)) = bpf_fixture_test("a_table_budget_evicts_the_tables_not_sampled") else {
        return;
    };
    // An idle process with large tables (python3, asleep: never sampled), then a busy one
    // built without frame pointers. 0.3 MiB of table maps hold the busy process's tables
    // (its program, libc, ld.so, the vDSO) but not python's as well.
    let idle = Running {
        child: std::process::Command::new("python3")
            .args(["-c", "import time; time.sleep(120)"])
            .spawn()
            .expect("python3"),
        name: "python3".into(),
    };
    settle(300);
    let busy = start(&dir, "chain_nofp", &[]);
    settle(200);
    let tmp = tempfile::tempdir().unwrap();
    let budget = 0.3;
    let (stacks, run) = record_folded_with(
        &[idle.pid(), busy.pid()],
        4.0,
        499,
        tmp.path(),
        &["--table-memory", &budget.to_string(), "--json-summary"],
    );
    eprintln!("{}", run.stderr);
    let json = summary_json(&run);
    let evicted = json_u64(json, "tables_evicted") + json_u64(json, "tables_full");
    assert!(evicted > 0, "nothing was evicted or refused under a {budget} MiB budget: {json}");
    // The budget bounds the three shared table arrays; the table directory (8192 entries
    // of 24 bytes) comes on top.
    assert!(
        json_u64(json, "table_map_bytes") <= (budget * (1 << 20) as f64) as u64 + 8192 * 24,
        "table maps above the budget: {json}"
    );
    let (total, good) = c_chain_counts(&stacks, "chain_nofp");
    eprintln!("chain_nofp: {good}/{total} samples with the full chain; {json}");
    assert!(total >= 100, "only {total} samples of the busy process");
    // The idle process's tables are the ones evicted: the busy one keeps its stacks.
    assert!(good * 100 >= total * 95, "{good}/{total}");
    drop(busy);
    drop(idle);
}

#[test]
fn a_second_run_reads_its_tables_from_the_cache() {
    let Some((_guard, dir)) = bpf_fixture_test("a_second_run_reads_its_tables_from_the_cache") else {
        return;
    };
    let busy = start(&dir, "chain_nofp", &[]);
    settle(200);
    let cache = tempfile::tempdir().unwrap();
    let cache_dir = cache.path().display().to_string();
    let mut runs = Vec::new();
    for _ in 0..2 {
        let tmp = tempfile::tempdir().unwrap();
        let (stacks, run) = record_folded_with(
            &[busy.pid()],
            1.5,
            499,
            tmp.path(),
            &["--table-cache-dir", &cache_dir, "--json-summary"],
        );
        let json = summary_json(&run).to_string();
        runs.push((stacks, json));
    }
    let (first, second) = (&runs[0].1, &runs[1].1);
    assert_eq!(json_u64(first, "table_cache_hits"), 0, "an empty cache had tables: {first}");
    let tables = json_u64(second, "tables");
    assert!(tables >= 3, "{second}");
    assert_eq!(json_u64(second, "table_cache_hits"), tables, "not every table came from the cache: {second}");
    let cached = std::fs::read_dir(cache.path()).unwrap().count() as u64;
    assert_eq!(cached, tables, "one cache file per table");
    // The cached tables walk as well as compiled ones.
    let (total, good) = c_chain_counts(&runs[1].0, "chain_nofp");
    assert!(total >= 100 && good * 100 >= total * 95, "{good}/{total} full chains from cached tables");
}

#[test]
fn copies_of_one_binary_share_a_table_by_build_id() {
    let Some((_guard, dir)) = bpf_fixture_test("copies_of_one_binary_share_a_table_by_build_id") else {
        return;
    };
    // Two copies (two inodes, one build-id), as two containers would have them.
    let tmp = tempfile::tempdir().unwrap();
    for name in ["copy_a", "copy_b"] {
        std::fs::copy(dir.join("chain_nofp"), tmp.path().join(name)).unwrap();
    }
    let a = start(tmp.path(), "copy_a", &[]);
    let b = start(tmp.path(), "copy_b", &[]);
    settle(200);
    let out = tempfile::tempdir().unwrap();
    let (stacks, run) = record_folded_with(
        &[a.pid(), b.pid()],
        2.0,
        499,
        out.path(),
        &["--no-table-cache", "--json-summary"],
    );
    let json = summary_json(&run);
    // The program, libc, ld.so and the vDSO: four tables for both processes.
    assert!(json_u64(json, "table_build_id_shares") >= 1, "{json}");
    assert_eq!(json_u64(json, "tables"), 4, "{json}");
    for name in ["copy_a", "copy_b"] {
        let (total, good) = c_chain_counts(&stacks, name);
        assert!(total >= 100 && good * 100 >= total * 95, "{name}: {good}/{total}; {json}");
    }
}

/// `unwound sample-cost` times every cpu-clock sample's interrupt handler. While the agent
/// records alone, it must see the agent's samples (the kernel's own BPF statistics count
/// them) and at least the kernel's measured BPF run time, since the program runs inside
/// that handler.
#[test]
fn sample_cost_covers_the_walkers_own_run_time() {
    let Some((_guard, dir)) = bpf_fixture_test("sample_cost_covers_the_walkers_own_run_time") else {
        return;
    };
    let work = start(&dir, "chain_nofp", &[]);
    settle(200);
    // Killed when dropped: a failed assertion must not leave its tracepoints attached.
    let mut cost = Running {
        child: std::process::Command::new(env!("CARGO_BIN_EXE_unwound"))
            .args(["sample-cost", "--json", "--duration", "120"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("run unwound sample-cost"),
        name: "sample-cost".into(),
    };
    settle(500);
    let out = tempfile::tempdir().unwrap();
    let pid = work.pid().to_string();
    let profile = out.path().join("p.folded");
    let run = unwound(&[
        "record",
        "--pid",
        &pid,
        "--duration",
        "2",
        "--frequency",
        "499",
        "--bpf-stats",
        "--json-summary",
        "--output",
        profile.to_str().unwrap(),
    ]);
    assert!(run.status.success(), "{}", run.stderr);
    // Stopped once the agent is done: its whole run lies inside the measurement.
    unsafe { libc::kill(cost.pid() as libc::pid_t, libc::SIGINT) };
    let read = |pipe: Option<&mut dyn std::io::Read>| {
        let mut text = String::new();
        pipe.map(|p| p.read_to_string(&mut text));
        text
    };
    let stdout = read(cost.child.stdout.as_mut().map(|p| p as &mut dyn std::io::Read));
    let stderr = read(cost.child.stderr.as_mut().map(|p| p as &mut dyn std::io::Read));
    assert!(cost.child.wait().unwrap().success(), "{stderr}");
    let cost = stdout;
    let json = summary_json(&run);
    let (runs, bpf_ns) = (json_u64(json, "bpf_runs"), json_u64(json, "bpf_run_time_ns"));
    let (samples, kernel_ns) = (json_u64(&cost, "samples"), json_u64(&cost, "kernel_ns"));
    // Every program run is inside one timed handler (give or take one per CPU at the
    // edges). There can be more handler calls than runs: a timer that fires while its CPU
    // is idle may take no sample, and the fixture keeps only one of the CPUs busy.
    assert!(runs >= 500, "{json}");
    assert!(samples + 8 >= runs && samples <= 3 * runs + 8, "sample-cost {cost}; agent {json}");
    assert!(kernel_ns >= bpf_ns, "sample-cost {cost}; agent {json}");
    // ... and the handler's own work around the program is small next to a walk.
    assert!(kernel_ns <= bpf_ns * 4 + samples * 20_000, "sample-cost {cost}; agent {json}");
}

#[test]
fn tables_load_without_cap_sys_admin() {
    let Some((_guard, dir)) = bpf_fixture_test("tables_load_without_cap_sys_admin") else {
        return;
    };
    // CAP_BPF and CAP_PERFMON are what the agent needs; without CAP_SYS_ADMIN the kernel
    // refuses to reopen a map by id, so tables that share a segment must be written
    // through the handle kept when the segment was made.
    let busy = start(&dir, "chain_nofp", &[]);
    settle(200);
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("profile.folded");
    let run = std::process::Command::new("setpriv")
        .args(["--inh-caps=-sys_admin", "--bounding-set=-sys_admin", env!("CARGO_BIN_EXE_unwound"), "record"])
        .args(["--pid", &busy.pid().to_string(), "--duration", "2", "--frequency", "499", "--json-summary"])
        .arg("--output")
        .arg(&out)
        .output()
        .expect("setpriv (util-linux) runs the agent");
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "unwound without CAP_SYS_ADMIN failed: {stderr}");
    let json = String::from_utf8_lossy(&run.stdout).into_owned();
    let (tables, segments) = (json_u64(&json, "tables"), json_u64(&json, "table_segments_created"));
    assert_eq!(json_u64(&json, "tables_refused"), 0, "{stderr}");
    // Each table has runs in all three arrays: fewer segments than 3 per table means some
    // were written into a segment made for another.
    assert!(tables >= 2 && segments < 3 * tables, "{tables} tables in {segments} segments: none shared one");
    let stacks = parse_folded(&std::fs::read_to_string(&out).unwrap());
    let (total, good) = c_chain_counts(&stacks, "chain_nofp");
    assert!(total >= 100 && good * 100 >= total * 95, "{good}/{total} full chains");
    drop(busy);
}
