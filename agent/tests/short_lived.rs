//! End to end, real BPF: processes that live ~3 ms, built without frame pointers, run
//! hundreds of times while the agent samples the whole machine. The agent has never read
//! anything about any of these processes when their samples are taken: the walker finds
//! their mappings in its kernel-side view (recorded as `execve` and `mmap` make them, and
//! inherited on `fork`), and the agent names their frames from the files it identified,
//! after the processes are gone. A reused pid or a new file must never take an old name.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// The fixture's chain, root first, from `fixtures/src/short.c` (and glibc's start code).
const CHAIN: &[&str] =
    &["_start", "__libc_start_main_impl", "__libc_start_call_main", "main", "short_a", "short_b", "short_c"];
/// `short_other_nofp`'s: the same program built with other function names.
const OTHER: &[&str] =
    &["_start", "__libc_start_main_impl", "__libc_start_call_main", "main", "other_a", "other_b", "other_c"];

/// Runs of the fixture per test. The first processes of a program the agent has never seen
/// run before it has identified the file (its reaction time, tens of milliseconds, longer on
/// a loaded machine) and are walked by frame pointers: a fixed cost, spread over the runs.
const RUNS: u32 = 500;

struct Recorded {
    stacks: Vec<FoldedStack>,
    stderr: String,
    summary: serde_json::Value,
}

/// Records the whole machine at 499 Hz while `work` runs (from the moment the agent
/// samples), then stops the agent (SIGINT) and reads what it wrote.
fn record_while(work: impl FnOnce()) -> Recorded {
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
    work();
    std::thread::sleep(Duration::from_millis(300));
    // SIGINT: the agent stops early and writes its profile.
    Command::new("kill").args(["-INT", &agent.id().to_string()]).status().unwrap();
    let status = agent.wait().unwrap();
    let stderr = std::fs::read_to_string(&err).unwrap();
    assert!(status.success(), "agent failed: {stderr}");
    let stacks = parse_folded(&std::fs::read_to_string(&out).unwrap());
    let summary = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    Recorded { stacks, stderr, summary }
}

fn run(binary: &Path, args: &[&str]) {
    let status = Command::new(binary).args(args).stdout(Stdio::null()).status().expect("run fixture");
    assert!(status.success() || status.code() == Some(1), "{}: {status}", binary.display());
}

fn print_top(stacks: &[&FoldedStack]) {
    let mut by_count: Vec<&&FoldedStack> = stacks.iter().collect();
    by_count.sort_by_key(|s| std::cmp::Reverse(s.count));
    for s in by_count.iter().take(8) {
        eprintln!("{:5} {}", s.count, s.user.join(";"));
    }
}

/// Samples in the program's own code: not the dynamic loader before `main`, not exit, not
/// fork or wait (a pre-fork parent).
fn in_program(s: &FoldedStack) -> bool {
    const OUTSIDE: &[&str] =
        &["_dl_start", "_dl_fini", "__run_exit_handlers", "_Fork", "__GI___wait4", "__libc_fork"];
    !s.user.iter().any(|f| OUTSIDE.contains(&f.as_str()))
        && !s.kernel.iter().any(|f| f == "do_exit" || f == "begin_new_exec")
}

/// (samples in the program, of which with the whole `chain`).
fn chain_share(stacks: &[&FoldedStack], chain: &[&str]) -> (u64, u64) {
    let program: u64 = stacks.iter().filter(|s| in_program(s)).map(|s| s.count).sum();
    let full: u64 = stacks.iter().filter(|s| s.user == chain).map(|s| s.count).sum();
    (program, full)
}

/// Every frame of a sample that reached the program's leaf is one of `chain`'s (or a walk
/// marker): nothing is named after another program.
fn assert_only_own_names(stacks: &[&FoldedStack], chain: &[&str]) {
    let leaf = *chain.last().unwrap();
    for s in stacks.iter().filter(|s| s.user.last().map(String::as_str) == Some(leaf)) {
        for f in &s.user {
            assert!(chain.contains(&f.as_str()) || f.starts_with("[unwind:"), "frame {f} in {:?}", s.user);
        }
    }
}

#[test]
fn a_process_that_lives_milliseconds_has_its_full_named_chain() {
    let Some((_guard, dir)) = bpf_fixture_test("a_process_that_lives_milliseconds_has_its_full_named_chain")
    else {
        return;
    };
    let fixture = dir.join("short_nofp");
    let mut per_run = Duration::ZERO;
    let r = record_while(|| {
        let started = Instant::now();
        for _ in 0..RUNS {
            run(&fixture, &[]);
        }
        per_run = started.elapsed() / RUNS;
    });
    let ours: Vec<&FoldedStack> = r.stacks.iter().filter(|s| s.process == "short_nofp").collect();
    print_top(&ours);
    let (program, full) = chain_share(&ours, CHAIN);
    let total: u64 = ours.iter().map(|s| s.count).sum();
    eprintln!(
        "short_nofp ({per_run:?} a run, {RUNS} runs, 499 Hz): {full} of {program} samples in the program have the full named chain ({:.1}%); {total} samples in all",
        100.0 * full as f64 / program.max(1) as f64
    );
    assert!(program >= 100, "too few samples of the fixture to judge: {program}\n{}", r.stderr);
    assert!(full as f64 >= 0.90 * program as f64, "full chain on {full} of {program} samples\n{}", r.stderr);
    assert_only_own_names(&ours, CHAIN);
    for counter in ["kernel_map_walks", "files_listed"] {
        assert!(r.summary[counter].as_u64().unwrap_or(0) > 0, "{counter} is 0: {}", r.summary);
    }
}

#[test]
fn children_forked_without_exec_inherit_their_parents_walkability() {
    let Some((_guard, dir)) =
        bpf_fixture_test("children_forked_without_exec_inherit_their_parents_walkability")
    else {
        return;
    };
    let fixture = dir.join("short_nofp");
    // A pre-fork server's shape: one parent, children one after the other, no exec.
    let r = record_while(|| run(&fixture, &["3000000", &RUNS.to_string()]));
    let ours: Vec<&FoldedStack> = r.stacks.iter().filter(|s| s.process == "short_nofp").collect();
    print_top(&ours);
    let (program, full) = chain_share(&ours, CHAIN);
    eprintln!(
        "forked children: {full} of {program} samples in the program have the full named chain ({:.1}%)",
        100.0 * full as f64 / program.max(1) as f64
    );
    assert!(program >= 100, "too few samples to judge: {program}\n{}", r.stderr);
    assert!(full as f64 >= 0.90 * program as f64, "full chain on {full} of {program} samples\n{}", r.stderr);
    assert_only_own_names(&ours, CHAIN);
}

/// Runs `binary` as process `pid` (through `ns_last_pid`); false when another process took
/// the pid first.
fn run_as_pid(binary: &Path, pid: u32) -> bool {
    if std::fs::write("/proc/sys/kernel/ns_last_pid", (pid - 1).to_string()).is_err() {
        return false;
    }
    let mut child = Command::new(binary).stdout(Stdio::null()).spawn().expect("run fixture");
    let got = child.id();
    child.wait().unwrap();
    got == pid
}

#[test]
fn a_reused_pid_never_takes_the_previous_programs_names() {
    let Some((_guard, dir)) = bpf_fixture_test("a_reused_pid_never_takes_the_previous_programs_names") else {
        return;
    };
    let (a, b) = (dir.join("short_nofp"), dir.join("short_other_nofp"));
    let mut reused = 0;
    let r = record_while(|| {
        for i in 0..60u32 {
            // A pid well past the last one given, free now: two programs in turn under it.
            let read = |f: &str| std::fs::read_to_string(f).unwrap().trim().parse::<u32>().unwrap();
            let (last, max) = (read("/proc/sys/kernel/ns_last_pid"), read("/proc/sys/kernel/pid_max"));
            // Past the last pid given, or low again when that is near pid_max (pids wrap).
            let pid = if last + 300 < max { last + 100 + i } else { 1000 + 10 * i };
            if Path::new(&format!("/proc/{pid}")).exists() {
                continue;
            }
            if run_as_pid(&a, pid) && run_as_pid(&b, pid) {
                reused += 1;
            }
        }
    });
    assert!(reused >= 30, "pids were reused only {reused} times");
    let of = |comm: &str| r.stacks.iter().filter(|s| s.process == comm).collect::<Vec<_>>();
    // The command name is cut to 15 bytes.
    let (first, second) = (of("short_nofp"), of("short_other_nof"));
    print_top(&second);
    assert_only_own_names(&first, CHAIN);
    assert_only_own_names(&second, OTHER);
    for (stacks, chain, name) in [(&first, CHAIN, "short_nofp"), (&second, OTHER, "short_other_nofp")] {
        let (program, full) = chain_share(stacks, chain);
        eprintln!("{name} ({reused} pids each used by both): {full} of {program} with the full named chain");
        // The names are what this test is about; the share is the first test's (each
        // program's first runs here are walked before the agent has identified its file).
        assert!(program >= 30 && full >= 20, "{name}: {full} of {program}\n{}", r.stderr);
    }
}

#[test]
fn a_file_replaced_under_the_same_path_keeps_its_own_names() {
    let Some((_guard, dir)) = bpf_fixture_test("a_file_replaced_under_the_same_path_keeps_its_own_names")
    else {
        return;
    };
    use std::os::unix::fs::MetadataExt as _;
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("replaced");
    let mut inodes = Vec::new();
    let r = record_while(|| {
        // One program, then another written to the same path (a new inode: an upgrade), then
        // the first again: each run named by the file it ran.
        for (round, source) in
            ["short_nofp", "short_other_nofp", "short_nofp", "short_other_nofp"].iter().enumerate()
        {
            let _ = std::fs::remove_file(&path);
            std::fs::copy(dir.join(source), &path).unwrap();
            inodes.push(std::fs::metadata(&path).unwrap().ino());
            for _ in 0..60 {
                run(&path, &[]);
            }
            eprintln!("round {round}: {source} as inode {}", inodes[round]);
        }
    });
    let ours: Vec<&FoldedStack> = r.stacks.iter().filter(|s| s.process == "replaced").collect();
    print_top(&ours);
    // Every sample that reached one program's leaf has that program's chain only.
    let mut named = [0u64; 2];
    for s in &ours {
        match s.user.last().map(String::as_str) {
            Some("short_c") => {
                assert!(
                    s.user.iter().all(|f| CHAIN.contains(&f.as_str()) || f.starts_with("[unwind:")),
                    "{:?}",
                    s.user
                );
                named[0] += s.count;
            }
            Some("other_c") => {
                assert!(
                    s.user.iter().all(|f| OTHER.contains(&f.as_str()) || f.starts_with("[unwind:")),
                    "{:?}",
                    s.user
                );
                named[1] += s.count;
            }
            _ => {}
        }
    }
    eprintln!("samples named short_c: {}, other_c: {}", named[0], named[1]);
    assert!(named[0] >= 20 && named[1] >= 20, "each program named: {named:?}\n{}", r.stderr);
}

/// A stack walked to the program's start: through glibc's `__libc_start_call_main` (which
/// has symbols; the programs' own `_start` has none once stripped, as Debian's `as` is).
const ROOT: &str = "__libc_start_call_main";

/// What `perf script` shows of a `perf record --call-graph dwarf` run: per command name,
/// (samples, samples walked to [`ROOT`]).
fn perf_completeness(data: &Path) -> std::collections::BTreeMap<String, (u64, u64)> {
    let out = Command::new("perf")
        .args(["script", "--no-inline", "-F", "comm,ip,sym", "-i"])
        .arg(data)
        .output()
        .expect("perf script");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut by_comm = std::collections::BTreeMap::new();
    // One block per sample: the command name, then its frames innermost first.
    for block in text.split("\n\n") {
        let mut lines = block.lines().filter(|l| !l.trim().is_empty());
        let Some(comm) = lines.next() else { continue };
        let outermost =
            lines.next_back().and_then(|l| l.trim().split_once(' ')).map(|(_, sym)| sym.trim().to_string());
        let e: &mut (u64, u64) = by_comm.entry(comm.trim().to_string()).or_default();
        e.0 += 1;
        e.1 += u64::from(outermost.as_deref() == Some("_start"));
    }
    by_comm
}

#[test]
fn compile_tools_are_complete_at_least_as_often_as_perf_dwarf() {
    let Some((_guard, _dir)) = bpf_fixture_test("compile_tools_are_complete_at_least_as_often_as_perf_dwarf")
    else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/src/clones.cpp");
    let data = tmp.path().join("perf.data");
    let object = tmp.path().join("clones.o");
    // Both profilers sample the whole machine at 499 Hz over the same compiles: g++ runs
    // cc1plus (~1 s each) and as (tens of ms), Debian's own stripped binaries.
    let r = record_while(|| {
        let mut perf = Command::new("perf")
            .args(["record", "-q", "-a", "-e", "cpu-clock", "-F", "499", "--call-graph", "dwarf", "-o"])
            .arg(&data)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("run perf record");
        std::thread::sleep(Duration::from_secs(1));
        for _ in 0..10 {
            let status =
                Command::new("g++").args(["-O2", "-c"]).arg(&source).arg("-o").arg(&object).status().unwrap();
            assert!(status.success(), "g++ failed");
        }
        Command::new("kill").args(["-INT", &perf.id().to_string()]).status().unwrap();
        assert!(perf.wait().unwrap().success() || data.exists(), "perf record failed");
    });
    let perf = perf_completeness(&data);
    let ours = |comm: &str| {
        let of: Vec<&FoldedStack> = r.stacks.iter().filter(|s| s.process == comm).collect();
        let all: u64 = of.iter().map(|s| s.count).sum();
        let rooted: u64 = of.iter().filter(|s| s.user.iter().any(|f| f == ROOT)).map(|s| s.count).sum();
        (all, rooted)
    };
    let mut lines = Vec::new();
    for comm in ["cc1plus", "as", "g++"] {
        let (n, c) = ours(comm);
        let (pn, pc) = perf.get(comm).copied().unwrap_or((0, 0));
        let share = |c: u64, n: u64| c as f64 / n.max(1) as f64;
        lines.push(format!(
            "{comm:8} unwound {c}/{n} = {:.1}%   perf --call-graph dwarf {pc}/{pn} = {:.1}%",
            100.0 * share(c, n),
            100.0 * share(pc, pn)
        ));
        if comm != "g++" {
            assert!(n >= 10 && pn >= 10, "{comm}: too few samples to judge (ours {n}, perf {pn})");
            assert!(
                share(c, n) >= share(pc, pn),
                "{comm} complete less often than perf:\n{}",
                lines.join("\n")
            );
        }
    }
    eprintln!("share of samples walked to {ROOT}, same run:\n{}", lines.join("\n"));
}
