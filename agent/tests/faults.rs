//! End to end, real BPF: faults injected into a running agent. Each ends in a counted
//! reason and one clear line, and the agent keeps sampling: stopped while its ring fills, a
//! table budget far too small, its output's filesystem full and then freed, cache
//! directories unwritable or holding garbage, killed mid-write, processes that vanish
//! while they are read, thousands of threads in one process.

mod common;

use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// A running agent whose stderr and stdout (the JSON summary) go to files.
struct Agent {
    child: Child,
    stderr: PathBuf,
    stdout: PathBuf,
}

struct Ended {
    status: std::process::ExitStatus,
    stderr: String,
    summary: serde_json::Value,
}

impl Ended {
    fn get(&self, key: &str) -> u64 {
        self.summary.get(key).and_then(serde_json::Value::as_u64).unwrap_or(0)
    }
}

impl Agent {
    /// Starts `unwound record ARGS --json-summary` with `env` and waits until it samples.
    fn start(logs: &Path, args: &[&str], env: &[(&str, &Path)]) -> Agent {
        let stderr = logs.join("agent.stderr");
        let stdout = logs.join("agent.json");
        let child = Command::new(env!("CARGO_BIN_EXE_unwound"))
            .arg("record")
            .args(args)
            .arg("--json-summary")
            .envs(env.iter().map(|(k, v)| (k, v.as_os_str())))
            .stdout(std::fs::File::create(&stdout).unwrap())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .expect("run unwound");
        let mut agent = Agent { child, stderr, stdout };
        agent.wait_for("unwound: sampling", Duration::from_secs(90));
        agent
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    fn signal(&self, signal: i32) {
        assert_eq!(unsafe { libc::kill(self.pid(), signal) }, 0, "kill {signal}");
    }

    /// Waits until the agent's stderr holds `text` (it must not exit meanwhile).
    fn wait_for(&mut self, text: &str, within: Duration) {
        let deadline = Instant::now() + within;
        while !self.stderr().contains(text) {
            if let Ok(Some(s)) = self.child.try_wait() {
                panic!("the agent exited ({s}) before printing {text:?}: {}", self.stderr());
            }
            assert!(Instant::now() < deadline, "no {text:?} from the agent in {within:?}: {}", self.stderr());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGINT (the agent writes its last profile and its summary), then its end.
    fn stop(mut self) -> Ended {
        self.signal(libc::SIGINT);
        let status = self.child.wait().unwrap();
        let stdout = std::fs::read_to_string(&self.stdout).unwrap_or_default();
        Ended {
            status,
            stderr: self.stderr(),
            summary: serde_json::from_str(stdout.trim()).unwrap_or(serde_json::Value::Null),
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The agent's last `so far:` line (one per `--every` interval).
fn last_so_far(stderr: &str) -> String {
    stderr.lines().rev().find(|l| l.starts_with("unwound: so far:")).unwrap_or_default().to_string()
}

/// Lines the agent printed that are neither progress nor the summary.
fn complaints(stderr: &str) -> Vec<&str> {
    stderr
        .lines()
        .filter(|l| l.starts_with("error") || l.starts_with("warning") || l.contains("panicked"))
        .collect()
}

/// A tmpfs mounted for the test's life.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, options: &str) -> Tmpfs {
        std::fs::create_dir_all(at).unwrap();
        let status =
            Command::new("mount").args(["-t", "tmpfs", "-o", options, "unwound-test"]).arg(at).status();
        assert!(status.is_ok_and(|s| s.success()), "mount -t tmpfs -o {options} {}", at.display());
        Tmpfs(at.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Profiles (visible files) in `dir` whose name starts with `stem`, oldest first.
fn profiles(dir: &Path, stem: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with(stem))
        .collect();
    v.sort();
    v
}

/// Stopped (SIGSTOP) for 10 s while two deep stacks fill its sample ring: the kernel side
/// counts every sample it could not queue, the agent says so in its next interval's line,
/// and the profile after the pause holds the fixtures' samples again.
#[test]
fn stopped_for_ten_seconds_it_counts_ring_drops_and_goes_on() {
    let Some((_guard, dir)) = bpf_fixture_test("stopped_for_ten_seconds") else { return };
    let deep: Vec<Running> = (0..2).map(|_| start(&dir, "recurse_fp", &["500".to_string()])).collect();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("cpu.folded");
    let (a, b) = (deep[0].pid().to_string(), deep[1].pid().to_string());
    let mut agent = Agent::start(
        tmp.path(),
        &["--pid", &a, "--pid", &b, "--every", "3", "-o", out.to_str().unwrap()],
        &[],
    );
    agent.wait_for("unwound: so far:", Duration::from_secs(10));
    let before = last_so_far(&agent.stderr());
    agent.signal(libc::SIGSTOP);
    std::thread::sleep(Duration::from_secs(10));
    agent.signal(libc::SIGCONT);
    // Every interval missed is written on waking; then one more whole interval.
    std::thread::sleep(Duration::from_secs(8));
    let last_profile = profiles(tmp.path(), "cpu-").pop().expect("a profile after the pause");
    let end = agent.stop();
    assert!(end.status.success(), "{}", end.stderr);
    let dropped = end.get("dropped_ring_full");
    assert!(dropped > 0, "a stopped agent's ring filled, yet no drop was counted: {}", end.summary);
    let line = last_so_far(&end.stderr);
    assert!(
        line.contains("dropped_ring_full="),
        "the drops are in the interval's line: {line} (before: {before})"
    );
    assert!(end.stderr.contains(&format!("dropped: dropped_ring_full={dropped}")), "{}", end.stderr);
    assert_eq!(end.get("profiles_failed"), 0);
    // 3 s intervals over ~21 s: none lost.
    assert!(end.get("profiles") >= 6, "{}", end.summary);
    let after = parse_folded(&std::fs::read_to_string(&last_profile).unwrap());
    let deep_samples: u64 =
        after.iter().filter(|s| s.user.iter().any(|f| f == "c_recurse_leaf")).map(|s| s.count).sum();
    assert!(
        deep_samples > 50,
        "the agent samples again after SIGCONT: {} has {deep_samples}",
        last_profile.display()
    );
    println!("stopped 10 s: {dropped} samples dropped (ring full), counted; {line}");
}

/// A table budget of 4 KiB holds no table of a program: each one that does not fit is
/// counted and said, the walk falls back to frame pointers, and the agent samples on.
#[test]
fn a_table_budget_far_too_small_is_counted_and_the_agent_samples_on() {
    let Some((_guard, dir)) = bpf_fixture_test("table_budget_too_small") else { return };
    let f = start(&dir, "chain_nofp", &[]);
    settle(100);
    let tmp = tempfile::tempdir().unwrap();
    let (stacks, run) = record_folded_with(
        &[f.pid()],
        2.0,
        199,
        tmp.path(),
        &["--table-memory", "0.004", "--no-table-cache", "--json-summary"],
    );
    let summary: serde_json::Value = serde_json::from_str(run.stdout.trim()).unwrap();
    let full = summary["tables_full"].as_u64().unwrap_or(0);
    assert!(full > 0, "tables that did not fit are counted: {summary}");
    assert!(run.stderr.contains(&format!("did not fit {full}")), "and said: {}", run.stderr);
    let samples: u64 = stacks.iter().filter(|s| s.process.starts_with("chain")).map(|s| s.count).sum();
    assert!(samples > 50, "the agent still samples the process: {samples}");
    println!("table budget 4 KiB: {full} tables did not fit, {samples} samples kept");
}

/// The output's filesystem full: the interval's profile is not written (one error line,
/// counted), no temporary file is left, recording goes on; once space is freed the next
/// interval is written, and the run ends saying how many could not be.
#[test]
fn a_full_filesystem_fails_one_profile_and_the_next_is_written() {
    let Some((_guard, dir)) = bpf_fixture_test("full_filesystem") else { return };
    let f = start(&dir, "chain_fp", &[]);
    let tmp = tempfile::tempdir().unwrap();
    let mnt = tmp.path().join("out");
    let _fs = Tmpfs::mount(&mnt, "size=64k");
    let filler = mnt.join("filler");
    {
        let mut file = std::fs::File::create(&filler).unwrap();
        let block = [0u8; 4096];
        while std::io::Write::write_all(&mut file, &block).is_ok() {}
    }
    let out = mnt.join("cpu.folded");
    let pid = f.pid().to_string();
    let mut agent =
        Agent::start(tmp.path(), &["--pid", &pid, "--every", "2", "-o", out.to_str().unwrap()], &[]);
    agent.wait_for("failed 1;", Duration::from_secs(10));
    let full = agent.stderr();
    assert!(profiles(&mnt, "cpu-").is_empty(), "nothing written to a full filesystem");
    assert!(profiles(&mnt, ".").is_empty(), "no temporary file left: {:?}", profiles(&mnt, "."));
    std::fs::remove_file(&filler).unwrap();
    agent.wait_for("profiles written 1,", Duration::from_secs(10));
    let end = agent.stop();
    let error = complaints(&full).into_iter().find(|l| {
        l.starts_with(&format!("error: cannot write {}/cpu-", mnt.display()))
            && l.contains("No space left on device")
    });
    assert!(error.is_some(), "one clear line: {full}");
    assert!(end.get("profiles_failed") >= 1 && end.get("profiles") >= 2, "{}", end.summary);
    let written = profiles(&mnt, "cpu-");
    // The last one may hold only the moment before SIGINT.
    assert!(written.iter().any(|p| std::fs::metadata(p).unwrap().len() > 0), "{written:?}");
    // The run says, last, that profiles were lost.
    assert!(!end.status.success());
    assert!(end.stderr.trim_end().ends_with("profiles could not be written"), "{}", end.stderr);
    println!("full filesystem: {:?}; then {} written", error.unwrap(), end.get("profiles"));
}

/// Records chain_nofp for 2 s with `XDG_CACHE_HOME` at `cache`: its stacks and the run.
fn record_with_cache(dir: &Path, cache: &Path, logs: &Path) -> (Vec<FoldedStack>, AgentRun) {
    let f = start(dir, "chain_nofp", &[]);
    settle(100);
    let out = logs.join("profile.folded");
    let o = Command::new(env!("CARGO_BIN_EXE_unwound"))
        .args(["record", "--pid", &f.pid().to_string(), "-d", "2", "-F", "199", "--json-summary", "-o"])
        .arg(&out)
        .env("XDG_CACHE_HOME", cache)
        .output()
        .unwrap();
    let run = AgentRun {
        status: o.status,
        stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
    };
    assert!(run.status.success(), "{}", run.stderr);
    (parse_folded(&std::fs::read_to_string(&out).unwrap()), run)
}

/// Samples of chain_nofp whose stack reaches c_chain_c from main (walked and named).
fn whole_chains(stacks: &[FoldedStack]) -> (u64, u64) {
    let all: u64 = stacks.iter().filter(|s| s.process.starts_with("chain")).map(|s| s.count).sum();
    let whole: u64 = stacks
        .iter()
        .filter(|s| s.process.starts_with("chain"))
        .filter(|s| s.user.windows(4).any(|w| w == ["main", "c_chain_a", "c_chain_b", "c_chain_c"]))
        .map(|s| s.count)
        .sum();
    (whole, all)
}

/// Cache directories on a read-only filesystem, then holding garbage where every cached
/// table and index was: the stacks are walked and named as with a good cache, and each
/// damaged file is counted as rebuilt.
#[test]
fn unwritable_or_garbage_caches_are_worked_around() {
    let Some((_guard, dir)) = bpf_fixture_test("unwritable_or_garbage_caches") else { return };
    let tmp = tempfile::tempdir().unwrap();
    let ro = tmp.path().join("ro");
    let _fs = Tmpfs::mount(&ro, "ro,size=64k");
    let (stacks, run) = record_with_cache(&dir, &ro, tmp.path());
    let (whole, all) = whole_chains(&stacks);
    assert!(whole * 10 >= all * 9 && all > 100, "read-only cache: {whole} of {all} whole\n{}", run.stderr);
    let warnings = complaints(&run.stderr);
    assert!(
        warnings.len() == 2 && warnings.iter().all(|l| l.contains("Read-only file system")),
        "one line for each cache: {warnings:?}"
    );
    let summary: serde_json::Value = serde_json::from_str(run.stdout.trim()).unwrap();
    assert_eq!(summary["caches_unwritable"].as_u64(), Some(2), "{summary}");
    println!("read-only cache: {whole}/{all} whole; {warnings:?}");

    let cache = tmp.path().join("cache");
    record_with_cache(&dir, &cache, tmp.path());
    let mut damaged = 0;
    for entry in walk(&cache) {
        let len = std::fs::metadata(&entry).unwrap().len() as usize;
        // Half of each file kept, then garbage: a truncated or overwritten cache entry.
        let mut bytes = std::fs::read(&entry).unwrap();
        bytes.truncate(len / 2);
        bytes.extend(std::iter::repeat_n(0xa5u8, len / 2));
        std::fs::write(&entry, bytes).unwrap();
        damaged += 1;
    }
    std::fs::write(cache.join("unwound/tables/garbage.zst"), b"not a table").unwrap();
    assert!(damaged > 0, "the first run cached something in {}", cache.display());
    let (stacks, run) = record_with_cache(&dir, &cache, tmp.path());
    let (whole, all) = whole_chains(&stacks);
    assert!(whole * 10 >= all * 9 && all > 100, "damaged cache: {whole} of {all} whole\n{}", run.stderr);
    let summary: serde_json::Value = serde_json::from_str(run.stdout.trim()).unwrap();
    assert_eq!(summary["table_cache_hits"].as_u64(), Some(0), "no damaged table is used: {summary}");
    let tables_damaged = walk(&cache.join("unwound/tables")).len() as u64 - 1;
    assert!(
        summary["table_cache_rebuilt"].as_u64().is_some_and(|n| n >= 1 && n <= tables_damaged),
        "the damaged table files rebuilt are counted (at most the {tables_damaged} damaged): {summary}"
    );
    println!("damaged cache ({damaged} files): {whole}/{all} whole; {summary}");
}

/// Every file under `dir`.
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                todo.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out
}

/// Killed (SIGKILL) again and again around the moment it writes a profile: every profile
/// in the output directory is whole (its gzip stream ends with a matching checksum), a
/// temporary file never takes a profile's name, the next run removes the dead runs'
/// temporary files, and caches written meanwhile are read back or rebuilt.
#[test]
fn killed_mid_write_it_leaves_no_half_written_file() {
    let Some((_guard, dir)) = bpf_fixture_test("killed_mid_write") else { return };
    let f = start(&dir, "chain_nofp", &[]);
    let tmp = tempfile::tempdir().unwrap();
    let out_dir = tmp.path().join("out");
    std::fs::create_dir(&out_dir).unwrap();
    let cache = tmp.path().join("cache");
    let out = out_dir.join("cpu.pb.gz");
    let pid = f.pid().to_string();
    let args = ["--pid", &pid, "--every", "1", "-o", out.to_str().unwrap()];
    for round in 0..6u64 {
        let agent = Agent::start(tmp.path(), &args, &[("XDG_CACHE_HOME", &cache)]);
        // Around the first interval's end, when the profile is symbolized and written.
        std::thread::sleep(Duration::from_millis(1000 + round * 7));
        agent.signal(libc::SIGKILL);
        drop(agent);
    }
    for p in profiles(&out_dir, "cpu-") {
        let mut text = Vec::new();
        let read = flate2::read::GzDecoder::new(std::fs::File::open(&p).unwrap()).read_to_end(&mut text);
        assert!(read.is_ok() && !text.is_empty(), "{} is whole: {read:?}", p.display());
    }
    // A run killed mid-write for certain: its temporary file, half a profile, under a pid
    // that is gone.
    let mut gone = Command::new("true").spawn().unwrap();
    gone.wait().unwrap();
    std::fs::write(
        out_dir.join(format!(".cpu-20260101T000000Z.pb.gz.unwound-{}.tmp", gone.id())),
        b"\x1f\x8b\x08\x00 half a gzip stream",
    )
    .unwrap();
    let stale = profiles(&out_dir, ".").len();
    let agent = Agent::start(tmp.path(), &args, &[("XDG_CACHE_HOME", &cache)]);
    std::thread::sleep(Duration::from_millis(1500));
    let end = agent.stop();
    assert!(end.status.success(), "{}", end.stderr);
    assert!(
        profiles(&out_dir, ".").is_empty(),
        "temporary files of killed runs are removed: {stale} were there"
    );
    assert!(
        end.stderr.contains(&format!("removed {stale} temporary files of earlier runs that ended mid-write")),
        "{}",
        end.stderr
    );
    let written = profiles(&out_dir, "cpu-");
    assert!(!written.is_empty());
    for p in &written {
        let mut text = Vec::new();
        flate2::read::GzDecoder::new(std::fs::File::open(p).unwrap()).read_to_end(&mut text).unwrap();
    }
    println!("killed 6 times: {} profiles, all whole; {stale} temporary files removed", written.len());
}

/// Whole machine while 600 processes live ~1 ms each: most are gone before the agent reads
/// their /proc entries. Nothing fails; what could not be read is counted.
#[test]
fn processes_that_vanish_mid_read_are_counted() {
    let Some((_guard, dir)) = bpf_fixture_test("vanishing_processes") else { return };
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("cpu.folded");
    let agent = Agent::start(tmp.path(), &["-F", "499", "-o", out.to_str().unwrap()], &[]);
    for i in 0..600 {
        let binary = if i % 2 == 0 { "short_nofp" } else { "short_other_nofp" };
        let _ = Command::new(dir.join(binary)).arg("100000").stdout(Stdio::null()).status();
    }
    let end = agent.stop();
    assert!(end.status.success(), "{}", end.stderr);
    assert!(end.get("exec_events") >= 600, "each exec is seen: {}", end.summary);
    assert!(end.get("received") > 0);
    let bad: Vec<&str> = complaints(&end.stderr).into_iter().filter(|l| !l.starts_with("warning")).collect();
    assert!(bad.is_empty(), "no error for a vanished process: {bad:?}");
    let stacks = parse_folded(&std::fs::read_to_string(&out).unwrap());
    let short: u64 = stacks.iter().filter(|s| s.process.starts_with("short")).map(|s| s.count).sum();
    assert!(short > 0, "the short processes are sampled");
    println!(
        "600 vanishing processes: {short} samples; files unresolved {}, symbol errors {}",
        end.get("files_unresolved"),
        end.get("symbol_errors")
    );
}

/// One process with 3,000 threads, most asleep, one spinning: followed and sampled like any
/// other, and the agent's memory stays small.
#[test]
fn thousands_of_threads_in_one_process() {
    let Some((_guard, _dir)) = bpf_fixture_test("thousands_of_threads") else { return };
    const THREADS: usize = 3000;
    let python = if Path::new("/usr/bin/python3").exists() { "/usr/bin/python3" } else { "python3" };
    let script = format!(
        "import threading,time,zlib,sys\nthreading.stack_size(65536)\n\
         def sleeper():\n    while True: time.sleep(1)\n\
         for _ in range({THREADS}): threading.Thread(target=sleeper, daemon=True).start()\n\
         print('ready', flush=True)\n\
         while True: zlib.compress(b'x' * 65536)\n"
    );
    let mut py = Command::new(python).args(["-c", &script]).stdout(Stdio::piped()).spawn().unwrap();
    let mut ready = [0u8; 6];
    py.stdout.as_mut().unwrap().read_exact(&mut ready).unwrap();
    let pid = py.id();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let threads: usize =
        status.lines().find_map(|l| l.strip_prefix("Threads:")).unwrap().trim().parse().unwrap();
    assert!(threads > THREADS, "{threads} threads");
    let tmp = tempfile::tempdir().unwrap();
    let result =
        std::panic::catch_unwind(|| record_folded_with(&[pid], 3.0, 199, tmp.path(), &["--json-summary"]));
    let _ = py.kill();
    let _ = py.wait();
    let (stacks, run) = result.unwrap();
    let summary: serde_json::Value = serde_json::from_str(run.stdout.trim()).unwrap();
    let samples: u64 = stacks.iter().map(|s| s.count).sum();
    assert!(samples > 100, "the spinning thread is sampled: {samples}\n{}", run.stderr);
    let rss = summary["agent_max_rss_kib"].as_u64().unwrap();
    assert!(rss < 200 << 10, "agent peak RSS {rss} KiB");
    println!("{threads} threads: {samples} samples, agent peak RSS {} MiB", rss >> 10);
}
