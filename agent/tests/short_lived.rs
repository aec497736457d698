//! End to end, real BPF: a process that lives ~3 ms, built without frame pointers, run
//! hundreds of times while the agent samples the whole machine. The agent has never read
//! anything about any of these processes when their samples are taken: the walker finds
//! their mappings in its kernel-side view (recorded as `execve` and `mmap` make them), and
//! the agent names their frames from the files it identified, after the processes are gone.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// The fixture's chain, root first, from `fixtures/src/short.c` (and glibc's start code).
const CHAIN: &[&str] =
    &["_start", "__libc_start_main_impl", "__libc_start_call_main", "main", "short_a", "short_b", "short_c"];

#[test]
fn a_process_that_lives_milliseconds_has_its_full_named_chain() {
    let Some((_guard, dir)) = bpf_fixture_test("a_process_that_lives_milliseconds_has_its_full_named_chain")
    else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("profile.folded");
    let err = tmp.path().join("stderr");
    let json = tmp.path().join("summary.json");
    let mut agent = Command::new(env!("CARGO_BIN_EXE_unwound"))
        .args(["record", "-F", "499", "-d", "120", "--json-summary", "-o"])
        .arg(&out)
        .stdout(std::fs::File::create(&json).unwrap())
        .stderr(std::fs::File::create(&err).unwrap())
        .spawn()
        .expect("run unwound");
    let deadline = Instant::now() + Duration::from_secs(90);
    while !std::fs::read_to_string(&err).unwrap_or_default().contains("sampling every process") {
        assert!(
            Instant::now() < deadline,
            "the agent did not start: {}",
            std::fs::read_to_string(&err).unwrap()
        );
        assert!(
            agent.try_wait().unwrap().is_none(),
            "the agent exited: {}",
            std::fs::read_to_string(&err).unwrap()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let fixture = dir.join("short_nofp");
    let started = Instant::now();
    for _ in 0..300 {
        let status = Command::new(&fixture).stdout(Stdio::null()).status().expect("run short_nofp");
        assert!(status.success() || status.code() == Some(1), "short_nofp: {status}");
    }
    let per_run = started.elapsed() / 300;
    std::thread::sleep(Duration::from_millis(300));
    // SIGINT: the agent stops early and writes its profile.
    Command::new("kill").args(["-INT", &agent.id().to_string()]).status().unwrap();
    let status = agent.wait().unwrap();
    let stderr = std::fs::read_to_string(&err).unwrap();
    assert!(status.success(), "agent failed: {stderr}");
    let stacks = parse_folded(&std::fs::read_to_string(&out).unwrap());
    let ours: Vec<&FoldedStack> = stacks.iter().filter(|s| s.process == "short_nofp").collect();
    // Samples before `main` (the dynamic loader at work) and after it (exit) are the
    // process's too, but not of the chain under test.
    let in_program = |s: &&&FoldedStack| {
        !s.user.iter().any(|f| f == "_dl_start" || f == "_dl_fini" || f == "__run_exit_handlers")
            && !s.kernel.iter().any(|f| f == "do_exit" || f == "begin_new_exec")
    };
    let total: u64 = ours.iter().map(|s| s.count).sum();
    let program: u64 = ours.iter().filter(in_program).map(|s| s.count).sum();
    let full: u64 = ours.iter().filter(|s| s.user == CHAIN).map(|s| s.count).sum();
    let mut by_count: Vec<&&FoldedStack> = ours.iter().collect();
    by_count.sort_by_key(|s| std::cmp::Reverse(s.count));
    for s in by_count.iter().take(8) {
        eprintln!("{:5} {}", s.count, s.user.join(";"));
    }
    eprintln!(
        "short_nofp ({per_run:?} a run, 300 runs, 499 Hz): {full} of {program} samples in the program have the full named chain ({:.1}%); {total} samples in all",
        100.0 * full as f64 / program.max(1) as f64
    );
    assert!(program >= 100, "too few samples of the fixture to judge: {program}\n{stderr}");
    assert!(full as f64 >= 0.90 * program as f64, "full chain on {full} of {program} samples\n{stderr}");
    // No frame of the fixture is named after anything but itself: every frame of every
    // sample that reached short_c is one of the chain's (or the kernel's).
    for s in ours.iter().filter(|s| s.user.last().map(String::as_str) == Some("short_c")) {
        for f in &s.user {
            assert!(
                CHAIN.contains(&f.as_str()) || f.starts_with("[unwind:"),
                "unexpected frame {f} in {:?}",
                s.user
            );
        }
    }
    let summary: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    for counter in ["kernel_map_walks", "files_listed"] {
        assert!(summary[counter].as_u64().unwrap_or(0) > 0, "{counter} is 0: {summary}");
    }
}
