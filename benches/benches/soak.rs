//! The agent's soak: `unwound record --every 60 --keep 3` on the whole machine for an hour
//! (or SECONDS) under long-lived processes and churn (≥ 500 execs/s of short processes,
//! some that `dlopen`, some with threads), its resources sampled every 10 s.
//!
//! ```text
//! cargo build --release -p unwound-agent && make -C fixtures    # as root
//! cargo bench -p unwound-benches --bench soak -- [SECONDS] [--agent PATH] [--rate EXECS_PER_S]
//!     [--out DIR] [--fixtures DIR] [--agent-arg ARG]…
//! ```
//!
//! Prints a table, minute by minute: the agent's RSS, open descriptors, BPF map memory
//! (memlock of its map descriptors), CPU and the profiles it wrote; then the run's
//! summary and the goals: after the first five minutes RSS within 10%, descriptors and
//! map memory flat, no profile lost, dropped samples ≤ 0.1%, each counted. Exits 1 when a
//! goal is missed. Not a CI test: CI runs its short version, `agent/tests/soak.rs`.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Minutes of warm-up left out of the flatness goals.
const WARM_UP_MIN: u64 = 5;
const SAMPLE_EVERY: Duration = Duration::from_secs(10);

struct Options {
    seconds: u64,
    agent: PathBuf,
    fixtures: PathBuf,
    out: PathBuf,
    rate: u64,
    /// More `unwound record` arguments.
    agent_args: Vec<String>,
}

fn options() -> Options {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_path_buf();
    let mut o = Options {
        seconds: 3600,
        agent: root.join("target/release/unwound"),
        fixtures: root.join("target/fixtures"),
        out: std::env::temp_dir().join(format!("unwound-soak-{}", std::process::id())),
        rate: 600,
        agent_args: Vec::new(),
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = |name: &str| args.next().unwrap_or_else(|| panic!("{name} needs a value"));
        match a.as_str() {
            // Passed by `cargo bench`.
            "--bench" => {}
            "--agent" => o.agent = PathBuf::from(value("--agent")),
            "--fixtures" => o.fixtures = PathBuf::from(value("--fixtures")),
            "--out" => o.out = PathBuf::from(value("--out")),
            "--rate" => o.rate = value("--rate").parse().expect("--rate: execs per second"),
            "--agent-arg" => o.agent_args.push(value("--agent-arg")),
            s => o.seconds = s.parse().unwrap_or_else(|_| panic!("unknown argument {s:?}")),
        }
    }
    o
}

/// One look at the agent's resources.
#[derive(Clone, Copy, Debug, Default)]
struct Sample {
    at: f64,
    rss_kib: u64,
    fds: u64,
    map_bytes: u64,
    /// User + system CPU, in clock ticks.
    cpu_ticks: u64,
}

fn read_sample(pid: u32, at: f64) -> Option<Sample> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    // utime and stime are fields 14 and 15; the slice starts at field 3.
    let cpu_ticks = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    let mut fds = 0;
    let mut map_bytes = 0;
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.flatten() {
        fds += 1;
        let is_map = std::fs::read_link(entry.path()).is_ok_and(|t| t.as_os_str() == "anon_inode:bpf-map");
        if !is_map {
            continue;
        }
        let info =
            std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{}", entry.file_name().to_string_lossy()))
                .unwrap_or_default();
        map_bytes += info
            .lines()
            .find_map(|l| l.strip_prefix("memlock:"))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0);
    }
    Some(Sample { at, rss_kib, fds, map_bytes, cpu_ticks })
}

/// The agent's latest `so far:` line: (profiles written, failed, received, dropped).
fn so_far(stderr: &str) -> Option<(u64, u64, u64, u64)> {
    let line = stderr.lines().rev().find(|l| l.starts_with("unwound: so far:"))?;
    let num_after = |key: &str| -> Option<u64> {
        let rest = &line[line.find(key)? + key.len()..];
        rest.trim_start().split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
    };
    let dropped_part = line.split("dropped:").nth(1).unwrap_or("");
    let dropped =
        dropped_part.split_whitespace().filter_map(|kv| kv.split_once('=')?.1.parse::<u64>().ok()).sum();
    Some((num_after("profiles written")?, num_after("failed")?, num_after("samples received")?, dropped))
}

/// Processes that run the whole soak: a C program spinning in a chain of functions (on a
/// 20% duty cycle, so the machine is not all its) and a Python loop.
fn long_lived(o: &Options, stop: &Arc<AtomicBool>) -> Vec<Child> {
    let chain =
        Command::new(o.fixtures.join("chain_nofp")).stdout(Stdio::null()).spawn().expect("run chain_nofp");
    let python = Command::new(python())
        .args([
            "-c",
            "import time,zlib\nwhile True:\n t=time.time()\n while time.time()-t<0.02: zlib.compress(b'x'*4096)\n time.sleep(0.08)",
        ])
        .spawn()
        .expect("run python3");
    let pid = chain.id() as i32;
    let stop = Arc::clone(stop);
    std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            unsafe { libc::kill(pid, libc::SIGCONT) };
            std::thread::sleep(Duration::from_millis(100));
            unsafe { libc::kill(pid, libc::SIGSTOP) };
            std::thread::sleep(Duration::from_millis(400));
        }
        unsafe { libc::kill(pid, libc::SIGCONT) };
    });
    vec![chain, python]
}

fn python() -> &'static str {
    // The system's interpreter, not a version manager's shim script.
    if Path::new("/usr/bin/python3").exists() {
        "/usr/bin/python3"
    } else {
        "python3"
    }
}

/// Churn: `rate` short processes a second over a few threads; every 200th a process that
/// `dlopen`s a library (killed after 2 s), every 100th a Python process with four threads.
fn churn(o: &Options, stop: &Arc<AtomicBool>, execs: &Arc<AtomicU64>) -> Vec<std::thread::JoinHandle<()>> {
    const WORKERS: u64 = 3;
    (0..WORKERS)
        .map(|w| {
            let stop = Arc::clone(stop);
            let execs = Arc::clone(execs);
            let short = o.fixtures.join(if w == 2 { "short_other_nofp" } else { "short_nofp" });
            let dlopen = o.fixtures.join("dlopen_nofp");
            let per_worker = Duration::from_secs_f64(WORKERS as f64 / o.rate as f64);
            std::thread::spawn(move || {
                let mut next = Instant::now();
                let mut n = 0u64;
                let mut slow: Vec<(Child, Instant)> = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    if w == 0 && n.is_multiple_of(200) {
                        if let Ok(c) = Command::new(&dlopen).stdout(Stdio::null()).stderr(Stdio::null()).spawn() {
                            slow.push((c, Instant::now() + Duration::from_secs(2)));
                        }
                    } else if w == 1 && n.is_multiple_of(100) {
                        let threads = "import threading,time\ndef f():\n t=time.time()\n while time.time()-t<0.2: pass\nts=[threading.Thread(target=f) for _ in range(4)]\n[t.start() for t in ts]\n[t.join() for t in ts]";
                        if let Ok(c) = Command::new(python()).args(["-c", threads]).spawn() {
                            slow.push((c, Instant::now() + Duration::from_secs(5)));
                        }
                    } else {
                        let _ = Command::new(&short).arg("20000").stdout(Stdio::null()).status();
                    }
                    execs.fetch_add(1, Ordering::Relaxed);
                    slow.retain_mut(|(c, kill_at)| {
                        if Instant::now() >= *kill_at {
                            let _ = c.kill();
                        }
                        !matches!(c.try_wait(), Ok(Some(_)))
                    });
                    next += per_worker;
                    let now = Instant::now();
                    if next > now {
                        std::thread::sleep(next - now);
                    } else if now - next > Duration::from_secs(1) {
                        next = now; // behind: do not burst to catch up
                    }
                }
                for (mut c, _) in slow {
                    let _ = c.kill();
                    let _ = c.wait();
                }
            })
        })
        .collect()
}

fn main() {
    let o = options();
    assert!(o.agent.exists(), "no agent at {} (cargo build --release -p unwound-agent)", o.agent.display());
    assert!(
        o.fixtures.join("short_nofp").exists(),
        "no fixtures in {} (make -C fixtures)",
        o.fixtures.display()
    );
    std::fs::create_dir_all(&o.out).expect("create the output directory");
    let stderr_path = o.out.join("agent.stderr");
    let stdout_path = o.out.join("agent.json");
    let mut agent = Command::new(&o.agent)
        .args(["record", "--every", "60", "--keep", "3", "--json-summary", "-o"])
        .arg(o.out.join("cpu.pb.gz"))
        .args(&o.agent_args)
        .stdout(std::fs::File::create(&stdout_path).unwrap())
        .stderr(std::fs::File::create(&stderr_path).unwrap())
        .spawn()
        .expect("run the agent");
    let pid = agent.id();
    let wait_start = Instant::now();
    while !std::fs::read_to_string(&stderr_path).unwrap_or_default().contains("unwound: sampling") {
        if let Ok(Some(s)) = agent.try_wait() {
            panic!("the agent exited ({s}): {}", std::fs::read_to_string(&stderr_path).unwrap_or_default());
        }
        assert!(wait_start.elapsed() < Duration::from_secs(300), "the agent did not start sampling");
        std::thread::sleep(Duration::from_millis(100));
    }
    println!(
        "soak: agent pid {pid} ({}), {} s, churn {} execs/s, output in {}",
        o.agent.display(),
        o.seconds,
        o.rate,
        o.out.display()
    );
    let stop = Arc::new(AtomicBool::new(false));
    let execs = Arc::new(AtomicU64::new(0));
    let mut long = long_lived(&o, &stop);
    let workers = churn(&o, &stop, &execs);

    let tick = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let started = Instant::now();
    let mut samples: Vec<Sample> = Vec::new();
    let mut seen: BTreeSet<String> = BTreeSet::new();
    let mut minute_start: Option<(Sample, u64)> = None;
    let csv_path = o.out.join("samples.csv");
    let mut csv = String::from("seconds,rss_kib,fds,map_bytes,cpu_ticks,execs,profiles_seen\n");
    println!(
        "{:>4} {:>9} {:>5} {:>10} {:>6} {:>9} {:>7} {:>9} {:>9} {:>8}",
        "min", "RSS MiB", "fds", "map KiB", "CPU%", "profiles", "failed", "received", "dropped", "execs/s"
    );
    let mut next = started + SAMPLE_EVERY;
    let deadline = started + Duration::from_secs(o.seconds);
    while Instant::now() < deadline {
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
        next += SAMPLE_EVERY;
        if let Ok(Some(s)) = agent.try_wait() {
            println!("soak: the agent exited early: {s}");
            break;
        }
        let Some(s) = read_sample(pid, started.elapsed().as_secs_f64()) else { break };
        for e in std::fs::read_dir(&o.out).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with("cpu-") && name.ends_with(".pb.gz") {
                seen.insert(name);
            }
        }
        let n_execs = execs.load(Ordering::Relaxed);
        csv.push_str(&format!(
            "{:.0},{},{},{},{},{},{}\n",
            s.at,
            s.rss_kib,
            s.fds,
            s.map_bytes,
            s.cpu_ticks,
            n_execs,
            seen.len()
        ));
        let _ = std::fs::write(&csv_path, &csv);
        samples.push(s);
        let (first, execs0) = *minute_start.get_or_insert((s, n_execs));
        if s.at - first.at >= 59.0 {
            let stderr = std::fs::read_to_string(&stderr_path).unwrap_or_default();
            let (written, failed, received, dropped) = so_far(&stderr).unwrap_or_default();
            let span = s.at - first.at;
            println!(
                "{:>4.0} {:>9.1} {:>5} {:>10.0} {:>6.2} {:>9} {:>7} {:>9} {:>9} {:>8.0}",
                s.at / 60.0,
                s.rss_kib as f64 / 1024.0,
                s.fds,
                s.map_bytes as f64 / 1024.0,
                100.0 * (s.cpu_ticks - first.cpu_ticks) as f64 / tick / span,
                written.max(seen.len() as u64),
                failed,
                received,
                dropped,
                (n_execs - execs0) as f64 / span,
            );
            minute_start = Some((s, n_execs));
        }
    }
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        let _ = w.join();
    }
    for c in &mut long {
        let _ = c.kill();
        let _ = c.wait();
    }
    unsafe { libc::kill(pid as i32, libc::SIGINT) };
    let status = agent.wait().expect("wait for the agent");
    let stderr = std::fs::read_to_string(&stderr_path).unwrap_or_default();
    let summary: serde_json::Value =
        serde_json::from_str(std::fs::read_to_string(&stdout_path).unwrap_or_default().trim())
            .unwrap_or_default();
    let elapsed = started.elapsed().as_secs_f64();
    println!(
        "soak: agent ended: {status}; {} execs ({:.0}/s)",
        execs.load(Ordering::Relaxed),
        execs.load(Ordering::Relaxed) as f64 / elapsed
    );
    for line in stderr
        .lines()
        .filter(|l| {
            l.starts_with("unwound: wrote")
                || l.starts_with("unwound: agent CPU")
                || l.starts_with("error")
                || l.starts_with("warning")
        })
        .take(40)
    {
        println!("  {line}");
    }

    let get = |k: &str| summary.get(k).and_then(serde_json::Value::as_u64).unwrap_or(0);
    let received = get("received");
    let dropped = get("dropped_ring_full") + get("dropped_no_scratch") + get("malformed_record");
    let profiles = get("profiles");
    let failed = get("profiles_failed");
    // One profile per whole minute of sampling, and the last partial one.
    let expected = (elapsed / 60.0).floor() as u64;
    let warm: Vec<&Sample> = samples.iter().filter(|s| s.at >= (WARM_UP_MIN * 60) as f64).collect();
    let range = |f: fn(&Sample) -> u64| -> (u64, u64) {
        (warm.iter().map(|s| f(s)).min().unwrap_or(0), warm.iter().map(|s| f(s)).max().unwrap_or(0))
    };
    let (rss_lo, rss_hi) = range(|s| s.rss_kib);
    let (fd_lo, fd_hi) = range(|s| s.fds);
    let (map_lo, map_hi) = range(|s| s.map_bytes);
    let mut goals: Vec<(String, bool)> = vec![
        (
            format!(
                "RSS after {WARM_UP_MIN} min within 10%: {:.1}–{:.1} MiB",
                rss_lo as f64 / 1024.0,
                rss_hi as f64 / 1024.0
            ),
            !warm.is_empty() && rss_hi as f64 <= rss_lo as f64 * 1.10,
        ),
        (format!("descriptors after {WARM_UP_MIN} min flat: {fd_lo}–{fd_hi}"), fd_hi <= fd_lo + 4),
        (
            format!("BPF map memory after {WARM_UP_MIN} min flat: {}–{} KiB", map_lo >> 10, map_hi >> 10),
            map_hi <= map_lo + map_lo / 20,
        ),
        (
            format!("no profile lost: {profiles} written (≥ {expected}), {failed} failed"),
            profiles >= expected && failed == 0,
        ),
        (
            format!(
                "dropped samples ≤ 0.1%: {dropped} of {} ({:.4}%)",
                received + dropped,
                100.0 * dropped as f64 / (received + dropped).max(1) as f64
            ),
            dropped * 1000 <= received + dropped,
        ),
        (format!("the agent exited cleanly: {status}"), status.success()),
    ];
    if received == 0 {
        goals.push(("a summary was printed with samples".to_string(), false));
    }
    let mut ok = true;
    for (what, met) in &goals {
        println!("{} {what}", if *met { "PASS" } else { "FAIL" });
        ok &= met;
    }
    println!("soak: samples every 10 s in {}", csv_path.display());
    std::process::exit(if ok { 0 } else { 1 });
}
