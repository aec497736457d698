//! The kernel walker on this machine, side by side in one run (root needed):
//!
//! 1. BPF cost per sample and per frame by stack depth, frame-pointer walk vs table walk
//!    (in `bpf_loop`, and carried by tail calls as on kernels before 5.17), from kernel BPF
//!    statistics (`run_time_ns / run_cnt`).
//! 2. Overhead: a CPU-bound workload on every CPU with no profiler, with `unwound record`
//!    and with `perf record --call-graph dwarf`, at 99 Hz and 999 Hz.
//! 3. Agent peak RSS and BPF map memory with the tables of libc, libstdc++ and libLLVM-22.
//!
//! And `-- jit`: BPF cost per sample of JIT code (Node, CPython's perf trampolines) against
//! native code walked with tables.
//!
//! `cargo build --release && make -C fixtures && cargo bench -p unwound-benches --bench walker`

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

fn agent() -> PathBuf {
    let p = root().join("target/release/unwound");
    assert!(p.exists(), "build the agent first: cargo build --release");
    p
}

fn fixture(name: &str) -> PathBuf {
    let p = root().join("target/fixtures").join(name);
    assert!(p.exists(), "build the fixtures first: make -C fixtures");
    p
}

/// One field of the agent's JSON summary.
fn field(json: &str, key: &str) -> f64 {
    let pat = format!("\"{key}\":");
    json.split(&pat)
        .nth(1)
        .and_then(|r| r.split([',', '}']).next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(f64::NAN)
}

fn record(args: &[&str]) -> String {
    record_with(&agent(), args)
}

/// The agents the cost section compares: this build's, and with `UNWOUND_BENCH_BASELINE`
/// set to another build's `unwound` (an earlier commit's), that one too, in the same rounds.
fn agents() -> Vec<(&'static str, PathBuf)> {
    let mut v = vec![("this", agent())];
    if let Some(b) = std::env::var_os("UNWOUND_BENCH_BASELINE") {
        v.push(("baseline", PathBuf::from(b)));
    }
    v
}

fn record_with(agent: &std::path::Path, args: &[&str]) -> String {
    let out = Command::new(agent)
        .arg("record")
        .args(args)
        .args(["--json-summary", "--output", "/tmp/unwound-bench.folded"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).lines().last().unwrap_or_default().to_string()
}

struct Killed(Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn bpf_cost() {
    // Interleaved rounds, medians shown: this VM's speed drifts over minutes.
    let rounds = 3;
    println!("\n1. BPF cost per sample (999 Hz, 4 s, one process, kernel BPF statistics), medians of {rounds} rounds");
    let agents = agents();
    println!(
        "{:>7} {:>11} {:>9} {:>10} {:>12} {:>12}  ns/frame* by round",
        "frames", "walker", "agent", "samples", "ns/sample", "ns/frame*"
    );
    let walkers = [
        ("fp", "recurse_fp", "same", vec!["--no-tables"]),
        ("tables", "recurse_nofp", "same", vec!["--walker", "loop"]),
        ("tables-4fn", "recurse_nofp", "mixed", vec!["--walker", "loop"]),
        ("tail", "recurse_nofp", "same", vec!["--walker", "tail-calls"]),
        ("tail-4fn", "recurse_nofp", "mixed", vec!["--walker", "tail-calls"]),
    ];
    let depths = [16u32, 64, 256];
    // (depth, walker, agent) → (samples, ns per sample) of each round.
    type Rounds = Vec<(f64, f64)>;
    let mut got: std::collections::HashMap<(u32, &str, &str), Rounds> = Default::default();
    for _ in 0..rounds {
        for depth in depths {
            for ((walker, bin, mode, flags), (agent_name, agent)) in
                walkers.iter().flat_map(|w| agents.iter().map(move |a| (w, a)))
            {
                // main + leaf + libc start-up frames ≈ 5 beyond the recursion.
                let arg = (depth - 5).to_string();
                let p = Killed(Command::new(fixture(bin)).args([arg.as_str(), mode]).spawn().unwrap());
                std::thread::sleep(Duration::from_millis(200));
                let pid = p.0.id().to_string();
                let mut a = vec!["--pid", &pid, "--duration", "4", "--frequency", "999", "--bpf-stats"];
                a.extend(flags.iter());
                let j = record_with(agent, &a);
                let (ns, emitted) = (field(&j, "bpf_run_time_ns"), field(&j, "emitted"));
                got.entry((depth, walker, agent_name)).or_default().push((emitted, ns / emitted));
            }
        }
    }
    for depth in depths {
        for ((walker, ..), (agent_name, _)) in walkers.iter().flat_map(|w| agents.iter().map(move |a| (w, a)))
        {
            let r = &got[&(depth, *walker, *agent_name)];
            let per_sample = median(r.iter().map(|x| x.1).collect());
            let samples = median(r.iter().map(|x| x.0).collect());
            let (per_frame, by_round) = if depth == 16 {
                (f64::NAN, String::new())
            } else {
                let base = &got[&(16, *walker, *agent_name)];
                let frames = f64::from(depth - 16);
                let each: Vec<String> =
                    r.iter().zip(base).map(|(d, b)| format!("{:.1}", (d.1 - b.1) / frames)).collect();
                ((per_sample - median(base.iter().map(|x| x.1).collect())) / frames, each.join(" "))
            };
            println!(
                "{depth:>7} {walker:>11} {agent_name:>9} {samples:>10.0} {per_sample:>12.0} {per_frame:>12.1}  {by_round}"
            );
        }
    }
    println!("  * extra cost per frame over the 16-frame walk (of the medians; by round: of that round's)");
    println!("  tables/tail: one function recursing (every frame's pc the same: the walker's");
    println!("  one-entry rule cache answers); -4fn: four functions on four pages calling each");
    println!("  other in a cycle (no two adjacent frames share a pc: every frame is looked up).");
}

/// BPF cost per sample of JIT-heavy processes (Node's JIT code, CPython's perf trampolines)
/// against native code walked with tables, at similar depths, in interleaved rounds.
fn jit_cost() {
    let rounds = 3;
    println!("\n1b. BPF cost per sample, JIT against native (999 Hz, 4 s, one process), medians of {rounds} rounds");
    println!(
        "{:>28} {:>10} {:>12} {:>14} {:>10}",
        "workload", "samples", "ns/sample", "frames/sample", "ns/frame"
    );
    let py = std::env::var_os("HOME")
        .map(|h| PathBuf::from(h).join(".pyenv/versions"))
        .and_then(|d| std::fs::read_dir(d).ok())
        .and_then(|d| d.filter_map(|e| e.ok()).find(|e| e.file_name().to_string_lossy().starts_with("3.12")))
        .map(|e| e.path().join("bin/python3.12"));
    let jit = root().join("fixtures/jit");
    let mut workloads: Vec<(&str, Vec<String>)> = vec![
        ("native tables (recurse_nofp 40)", vec![fixture("recurse_nofp").display().to_string(), "40".into()]),
        (
            "node --perf-basic-prof fib",
            vec![
                "node".into(),
                "--perf-basic-prof".into(),
                jit.join("fib.js").display().to_string(),
                "30".into(),
            ],
        ),
    ];
    if let Some(py) = py {
        workloads.push((
            "python3.12 -X perf fib",
            vec![
                py.display().to_string(),
                "-X".into(),
                "perf".into(),
                jit.join("fib.py").display().to_string(),
                "30".into(),
            ],
        ));
    }
    let mut got: std::collections::HashMap<&str, Vec<(f64, f64, f64)>> = Default::default();
    for _ in 0..rounds {
        for (name, argv) in &workloads {
            let p = Killed(Command::new(&argv[0]).args(&argv[1..]).stdout(Stdio::null()).spawn().unwrap());
            std::thread::sleep(Duration::from_millis(1500));
            let pid = p.0.id().to_string();
            let j = record(&["--pid", &pid, "--duration", "4", "--frequency", "999", "--bpf-stats"]);
            let _ = std::fs::remove_file(format!("/tmp/perf-{pid}.map"));
            let emitted = field(&j, "emitted");
            let frames = field(&j, "table_frames") + field(&j, "fallback_frames");
            got.entry(name).or_default().push((
                emitted,
                field(&j, "bpf_run_time_ns") / emitted,
                frames / emitted,
            ));
        }
    }
    for (name, _) in &workloads {
        let r = &got[name];
        let (samples, ns, frames) = (
            median(r.iter().map(|x| x.0).collect()),
            median(r.iter().map(|x| x.1).collect()),
            median(r.iter().map(|x| x.2).collect()),
        );
        println!("{name:>28} {samples:>10.0} {ns:>12.0} {frames:>14.1} {:>10.1}", ns / frames);
    }
    println!(
        "  frames/sample: table and frame-pointer steps of the walk (the JIT frames are frame-pointer steps;"
    );
    println!("  CPython's trampolines take their fixed rule, counted as table steps)");
}

fn throughput_run(seconds: f64) -> (Vec<Killed>, f64) {
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let kids = (0..cpus)
        .map(|_| {
            Killed(
                Command::new(fixture("throughput_nofp"))
                    .arg(seconds.to_string())
                    .stdout(Stdio::piped())
                    .spawn()
                    .unwrap(),
            )
        })
        .collect();
    (kids, seconds)
}

fn finish(kids: Vec<Killed>) -> f64 {
    let mut total = 0.0;
    for mut k in kids {
        let out =
            std::mem::replace(&mut k.0, Command::new("true").spawn().unwrap()).wait_with_output().unwrap();
        total += String::from_utf8_lossy(&out.stdout).trim().parse::<f64>().unwrap_or(0.0);
    }
    total
}

/// CPU seconds of a finished child (user + system), from wait4.
fn child_cpu(mut c: Child) -> f64 {
    let pid = c.id() as libc::pid_t;
    let mut status = 0;
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::wait4(pid, &mut status, 0, &mut ru) };
    let _ = c.try_wait();
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    t(ru.ru_utime) + t(ru.ru_stime)
}

/// On-CPU time of every thread of a live process, in seconds (`/proc/PID/task/*/schedstat`,
/// nanosecond resolution, unlike the tick-based `stat`).
fn live_cpu(pid: u32) -> f64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return f64::NAN };
    let mut ns = 0u64;
    for t in tasks.flatten() {
        let s = std::fs::read_to_string(t.path().join("schedstat")).unwrap_or_default();
        ns += s.split_whitespace().next().and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    }
    ns as f64 / 1e9
}

/// `unwound sample-cost`, started before a profiler so that it is an old process by the
/// time the window opens: it times every cpu-clock sample's interrupt handler, whichever
/// profiler takes it.
/// `unwound sample-cost` running; killed when dropped (a panic must not leave its
/// tracepoints attached).
struct SampleCost(Option<Child>);

impl SampleCost {
    fn start() -> Self {
        let c = Command::new(agent())
            .args(["sample-cost", "--json", "--duration", "600"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Its SIGUSR1 handler must be in place before the first mark.
        std::thread::sleep(Duration::from_millis(500));
        SampleCost(Some(c))
    }

    fn pid(&self) -> libc::pid_t {
        self.0.as_ref().map_or(0, |c| c.id() as libc::pid_t)
    }

    /// Asks for the totals so far (a JSON line on its stdout).
    fn mark(&self) {
        unsafe { libc::kill(self.pid(), libc::SIGUSR1) };
        std::thread::sleep(Duration::from_millis(60));
    }

    /// (samples, kernel seconds) between the two marks; NaN, with its error shown, when
    /// sample-cost could not measure.
    fn window(mut self) -> (f64, f64) {
        unsafe { libc::kill(self.pid(), libc::SIGINT) };
        let Some(child) = self.0.take() else { return (f64::NAN, f64::NAN) };
        let out = child.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let lines: Vec<&str> = text.lines().collect();
        let [a, b, ..] = lines[..] else {
            eprintln!("sample-cost measured nothing: {}", String::from_utf8_lossy(&out.stderr).trim());
            return (f64::NAN, f64::NAN);
        };
        (field(b, "samples") - field(a, "samples"), (field(b, "kernel_ns") - field(a, "kernel_ns")) / 1e9)
    }
}

impl Drop for SampleCost {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// One run of the workload under a profiler, as the overhead table shows it.
#[derive(Clone, Copy, Default)]
struct Profiled {
    iterations: f64,
    samples: f64,
    /// Kernel time of the samples' interrupt handlers in the window.
    kernel: f64,
    /// The profiler's own threads in the window.
    process: f64,
    /// The profiler from start to exit, plus `kernel`.
    whole: f64,
    /// perf: `whole` plus `perf script`'s CPU (its stacks exist only then).
    with_script: f64,
    /// unwound: debuginfo indexes built for binaries seen for the first time, and the
    /// symbolization time of the run.
    indexed: f64,
    symbolize: f64,
    /// unwound: the agent's CPU before, while and after sampling.
    phases: [f64; 3],
}

/// The window of a profiler `pid` started `settle_ms` before it opens: the workload's
/// iterations, the profiler's CPU in it, and the samples and their kernel time.
fn window(cost: SampleCost, pid: u32, settle_ms: u64, secs: f64) -> (f64, f64, f64, f64) {
    std::thread::sleep(Duration::from_millis(settle_ms));
    let before = live_cpu(pid);
    cost.mark();
    let (kids, _) = throughput_run(secs);
    let iterations = finish(kids);
    cost.mark();
    let process = live_cpu(pid) - before;
    let (samples, kernel) = cost.window();
    (iterations, process, samples, kernel)
}

/// `unwound record` on every CPU (tables for every process) at `hz`; the workload starts
/// once the agent is sampling, so start-up and the final symbolization are outside the
/// window.
fn profiled_unwound(hz: u32, secs: f64) -> Profiled {
    let hz_s = hz.to_string();
    let cost = SampleCost::start();
    let agent = Command::new(agent())
        .args([
            "record",
            "--duration",
            &(secs + 3.0).to_string(),
            "--frequency",
            &hz_s,
            "--json-summary",
            "--output",
            "/tmp/unwound-bench.pb.gz",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let (iterations, process, samples, kernel) = window(cost, agent.id(), 1500, secs);
    let out = agent.wait_with_output().unwrap();
    let j = String::from_utf8_lossy(&out.stdout).to_string();
    let whole = field(&j, "agent_cpu_seconds") + kernel;
    Profiled {
        iterations,
        samples,
        kernel,
        process,
        whole,
        with_script: whole,
        indexed: field(&j, "symbol_indexes_built"),
        symbolize: field(&j, "symbolize_seconds"),
        phases: ["startup", "sampling", "finish"].map(|p| field(&j, &format!("agent_{p}_cpu_seconds"))),
    }
}

/// `perf record --call-graph dwarf -a` at `hz` over the same window, then `perf script`.
fn profiled_perf(hz: u32, secs: f64) -> Profiled {
    profiled_perf_with(hz, secs, &["--call-graph", "dwarf"])
}

fn profiled_perf_no_stack(hz: u32, secs: f64) -> Profiled {
    profiled_perf_with(hz, secs, &[])
}

fn profiled_perf_with(hz: u32, secs: f64, stacks: &[&str]) -> Profiled {
    let hz_s = hz.to_string();
    let cost = SampleCost::start();
    let perf = Command::new("perf")
        .args(["record", "-q", "-e", "cpu-clock", "-F", &hz_s])
        .args(stacks)
        .args(["-a", "-o", "/tmp/unwound-bench-perf.data", "--", "sleep", &(secs + 2.0).to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let (iterations, process, samples, kernel) = window(cost, perf.id(), 1000, secs);
    let whole = child_cpu(perf) + kernel;
    // perf's stacks exist only once `perf script` (or `perf report`) has unwound each
    // sample's stack copy: the step unwound does in the kernel while recording.
    let script = Command::new("perf")
        .args(["script", "-i", "/tmp/unwound-bench-perf.data"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let with_script = whole + child_cpu(script);
    Profiled { iterations, samples, kernel, process, whole, with_script, ..Profiled::default() }
}

/// A profiler's run of the workload at a rate, for a duration.
type ProfiledRun = fn(u32, f64) -> Profiled;

/// The profilers and rates the overhead and long-run sections compare, each unwound run
/// followed by perf's at the same rate.
const PROFILERS: [(&str, u32, ProfiledRun); 6] = [
    ("unwound", 99, profiled_unwound),
    ("perf dwarf", 99, profiled_perf),
    ("unwound", 999, profiled_unwound),
    ("perf dwarf", 999, profiled_perf),
    // The floor every cpu-clock sampler pays on this machine: the sampling interrupt with
    // no stack taken at all (perf's own sample record only).
    ("perf no stack", 99, profiled_perf_no_stack),
    ("perf no stack", 999, profiled_perf_no_stack),
];

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn overhead() {
    let secs = 8.0;
    // Rounds of (unwound 99, perf 99, unwound 999, perf 999) between runs without a
    // profiler: this VM's speed drifts by a few percent over minutes, more than the
    // effect measured, so each run is compared with the unprofiled runs on either side
    // of its round and the medians over the rounds are shown.
    let rounds = 3;
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1) as f64;
    println!(
        "\n2. Overhead: throughput_nofp on each of {cpus} CPUs for {secs} s, medians of {rounds} rounds"
    );
    // A first run compiles the tables and debuginfo indexes it has not cached (after a
    // rebuild, or the first time on a machine); the runs below read them from the caches.
    // `sample-cost` runs beside every measured run (it is the agent's own binary, large
    // and with debuginfo), so it runs here too: else the first measured run pays for it.
    let warm_cost = SampleCost::start();
    let (kids, _) = throughput_run(3.0);
    let j = record(&["--duration", "2"]);
    finish(kids);
    drop(warm_cost);
    println!(
        "  (warm-up: unwound's first run, 2 s, agent CPU {:.3} s: tables and debuginfo indexes cached)",
        field(&j, "agent_cpu_seconds")
    );
    let mut none = vec![finish(throughput_run(secs).0)];
    let mut runs: Vec<Vec<(Profiled, f64)>> = vec![Vec::new(); PROFILERS.len()];
    for round in 0..rounds {
        // Each round starts at another configuration, and each run is compared with the
        // unprofiled throughput interpolated to its place between the round's two
        // unprofiled runs: a steady drift then biases no configuration.
        let order: Vec<usize> = (0..PROFILERS.len()).map(|i| (i + round) % PROFILERS.len()).collect();
        let got: Vec<(usize, Profiled)> = order
            .iter()
            .map(|&c| {
                let (_, hz, f) = PROFILERS[c];
                (c, f(hz, secs))
            })
            .collect();
        let after = finish(throughput_run(secs).0);
        let before = none.last().copied().unwrap_or(after);
        none.push(after);
        let slots = (PROFILERS.len() + 1) as f64;
        for (place, (c, p)) in got.into_iter().enumerate() {
            let base = before + (after - before) * (place + 1) as f64 / slots;
            runs[c].push((p, 1.0 - p.iterations / base));
        }
    }
    let (lo, hi) = none.iter().fold((f64::MAX, f64::MIN), |(l, h), &n| (l.min(n), h.max(n)));
    println!(
        "  without a profiler: {} runs, {:.0}..{:.0} iterations (spread {:.2}%)",
        none.len(),
        lo,
        hi,
        (hi / lo - 1.0) * 100.0
    );
    println!(
        "{:<20} {:>9} {:>8} {:>10} {:>11} {:>11} {:>11} {:>11}  slowdown by round",
        "profiler", "slowdown", "samples", "kernel/smp", "kernel", "process", "window", "whole run"
    );
    let mut medians = Vec::new();
    let mut per_sample = Vec::new();
    for ((name, hz, _), r) in PROFILERS.iter().zip(&runs) {
        let m = |f: fn(&Profiled) -> f64| median(r.iter().map(|(p, _)| f(p)).collect());
        let slow = median(r.iter().map(|(_, s)| *s).collect());
        let (samples, kernel, process, whole) =
            (m(|p| p.samples), m(|p| p.kernel), m(|p| p.process), m(|p| p.whole));
        let by_round: Vec<String> = r.iter().map(|(_, s)| format!("{:.2}%", s * 100.0)).collect();
        println!(
            "{:<20} {:>8.2}% {samples:>8.0} {:>8.0}ns {kernel:>10.4}s {process:>10.4}s {:>10.4}s {whole:>10.4}s  {}",
            format!("{name} {hz} Hz"),
            slow * 100.0,
            kernel / samples.max(1.0) * 1e9,
            kernel + process,
            by_round.join(" ")
        );
        if name.starts_with("perf") {
            println!("{:<20} {:>76.4}s", "  + perf script", m(|p| p.with_script));
        } else {
            let [a, b, c] = [0, 1, 2].map(|i| median(r.iter().map(|(p, _)| p.phases[i]).collect()));
            println!("  (agent CPU: start-up {a:.4} s, sampling {b:.4} s, finish {c:.4} s)");
        }
        // A binary first sampled in a run (the bench itself, say) has its debuginfo
        // indexed then, once: part of that whole run, shown so it is not taken for the rate.
        for (i, (p, _)) in r.iter().enumerate() {
            if p.indexed > 0.0 {
                println!(
                    "  (round {}: indexed the debuginfo of {} binaries seen for the first time, {:.3} s of symbolization)",
                    i + 1,
                    p.indexed,
                    p.symbolize
                );
            }
        }
        medians.push((kernel + process, whole, m(|p| p.with_script), m(|p| p.with_script - p.whole)));
        per_sample.push(kernel / samples.max(1.0) * 1e9);
    }
    // Above the floor: what taking the stack costs each profiler per sample.
    for (k, hz) in [(0usize, 99), (2, 999)] {
        let floor = per_sample[4 + k / 2];
        println!(
            "  {hz} Hz, kernel per sample above the no-stack floor ({floor:.0} ns): unwound {:.0} ns, perf dwarf {:.0} ns (ratio {:.2})",
            per_sample[k] - floor,
            per_sample[k + 1] - floor,
            (per_sample[k] - floor) / (per_sample[k + 1] - floor)
        );
    }
    for (k, hz) in [(0usize, 99), (2, 999)] {
        let ((ow, owhole, ..), (pw, pwhole, pscript, script)) = (medians[k], medians[k + 1]);
        println!(
            "  {hz} Hz, whole run: unwound / perf record = {:.2}; unwound / (perf record + perf script) = {:.2}",
            owhole / pwhole,
            owhole / pscript
        );
        // Without the fixed costs of starting and finishing (both sides): the window, with
        // perf script's whole CPU charged to perf's window (its stacks are made there).
        println!(
            "  {hz} Hz, window: unwound / perf record = {:.2}; unwound / (perf record + perf script) = {:.2}",
            ow / pw,
            ow / (pw + script)
        );
    }
    println!("  kernel: every cpu-clock sample's interrupt handler while the workload ran, timed by");
    println!("  `unwound sample-cost` (unwound: the walk in BPF; perf: its 8 KiB stack copies and");
    println!("  output) - charged to the sampled tasks, not to the profiler's process.");
    println!("  process: the profiler's own threads in the window; window = kernel + process.");
    println!("  whole run: the process from start to exit (unwound: tables, symbolization, pprof;");
    println!("  perf: build-ids) plus the window's kernel time; + perf script: perf's stacks exist");
    println!("  only once `perf script` has unwound its stack copies, as unwound does while recording.");
}

/// Whole runs of a longer recording, one per profiler and rate: with the overhead
/// section's shorter ones, how the whole-run ratio moves with the recording's length (each
/// profiler's fixed start-up and finish against its cost per second).
fn long_runs() {
    let secs: f64 =
        std::env::var("UNWOUND_BENCH_LONG_SECS").ok().and_then(|v| v.parse().ok()).unwrap_or(60.0);
    println!("\n2b. Whole runs of a {secs} s recording (throughput_nofp on every CPU), one run each");
    // Caches warm when this section runs alone.
    record(&["--duration", "1"]);
    println!(
        "{:<20} {:>11} {:>11} {:>14}  agent CPU: start-up, sampling, finish",
        "profiler", "window", "whole run", "+ perf script"
    );
    let mut got = Vec::new();
    for (name, hz, f) in PROFILERS {
        let p = f(hz, secs);
        let phases = if name == "unwound" {
            format!("{:.4} s, {:.4} s, {:.4} s", p.phases[0], p.phases[1], p.phases[2])
        } else {
            String::new()
        };
        println!(
            "{:<20} {:>10.4}s {:>10.4}s {:>13.4}s  {phases}",
            format!("{name} {hz} Hz"),
            p.kernel + p.process,
            p.whole,
            p.with_script
        );
        got.push(p);
    }
    for (k, hz) in [(0usize, 99), (2, 999)] {
        let (o, p) = (got[k], got[k + 1]);
        println!(
            "  {hz} Hz, whole {secs} s run: unwound / perf record = {:.3}; unwound / (perf record + perf script) = {:.3}",
            o.whole / p.whole,
            o.whole / p.with_script
        );
    }
}

fn memory() {
    println!("\n3. Agent memory with the tables of libc, libstdc++ and libLLVM-22 (a process mapping them)");
    let p = Killed(
        Command::new("python3")
            .args(["-c", "import ctypes, time; ctypes.CDLL('libLLVM.so.22.1'); time.sleep(60)"])
            .spawn()
            .unwrap(),
    );
    std::thread::sleep(Duration::from_millis(800));
    let pid = p.0.id().to_string();
    println!(
        "{:>10} {:>12} {:>14} {:>14} {:>10} {:>14}",
        "tables", "table KiB", "BPF map KiB", "map peak KiB", "segments", "agent RSS KiB"
    );
    let j = record(&["--pid", &pid, "--duration", "2"]);
    println!(
        "{:>10} {:>12.0} {:>14.0} {:>14.0} {:>10} {:>14}",
        field(&j, "tables"),
        field(&j, "table_bytes") / 1024.0,
        field(&j, "table_map_bytes") / 1024.0,
        field(&j, "table_map_peak_bytes") / 1024.0,
        field(&j, "table_segments_created"),
        field(&j, "agent_max_rss_kib")
    );
    println!("  BPF map KiB: the table segments held, the outer arrays and the table directory.");
}

/// Starts processes as fast as two threads can for `secs` (each `short_nofp`, spinning
/// ~0.1 ms in a chain without frame pointers): the processes started.
fn exec_storm(secs: f64) -> u64 {
    let stop = std::time::Instant::now() + Duration::from_secs_f64(secs);
    let bin = fixture("short_nofp");
    let threads: Vec<_> = (0..2)
        .map(|_| {
            let bin = bin.clone();
            std::thread::spawn(move || {
                let mut n = 0u64;
                while std::time::Instant::now() < stop {
                    let _ = Command::new(&bin).arg("100000").stdout(Stdio::null()).status();
                    n += 1;
                }
                n
            })
        })
        .collect();
    threads.into_iter().map(|t| t.join().unwrap()).sum()
}

/// Agent CPU and BPF time per sample under an exec storm (two threads starting short
/// no-frame-pointer processes back to back, over 1,000 a second here), whole machine at
/// 499 Hz, beside `perf record -a --call-graph dwarf` on the same storm and the storm alone,
/// in interleaved rounds.
fn exec_cost() {
    let rounds = 3;
    let secs = 8.0;
    println!("\n5. Exec storm: whole machine, 499 Hz, {secs} s, medians of {rounds} rounds");
    let (mut alone, mut ours, mut perf) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..rounds {
        alone.push((exec_storm(secs) as f64 / secs, 0.0, 0.0, 0.0));
        // unwound: its own CPU (user + system) and the kernel's BPF statistics.
        let agent = Command::new(agent())
            .args([
                "record",
                "-F",
                "499",
                "--bpf-stats",
                "--json-summary",
                "-o",
                "/tmp/unwound-bench-exec.folded",
            ])
            .args(["--duration", &(secs + 1.0).to_string()])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(2500)); // start-up: tables, BPF load
        let execs = exec_storm(secs - 1.5) as f64 / (secs - 1.5);
        let pid = agent.id();
        let out = agent.wait_with_output().unwrap();
        let j = String::from_utf8_lossy(&out.stdout).lines().last().unwrap_or_default().to_string();
        let _ = pid;
        let per_sample = field(&j, "bpf_run_time_ns") / field(&j, "bpf_runs");
        let cpu = field(&j, "agent_cpu_seconds") - field(&j, "agent_startup_cpu_seconds");
        ours.push((execs, cpu, per_sample, field(&j, "kernel_map_walks") / field(&j, "emitted")));
        // perf: its own CPU recording, then `perf script` (its unwinding).
        let rec = Command::new("perf")
            .args(["record", "-q", "-e", "cpu-clock", "-F", "499", "--call-graph", "dwarf", "-a"])
            .args(["-o", "/tmp/unwound-bench-perf.data", "--", "sleep", &(secs - 1.0).to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(500));
        let execs = exec_storm(secs - 1.5) as f64 / (secs - 1.5);
        let rec_cpu = child_cpu(rec);
        let script = Command::new("perf")
            .args(["script", "--no-inline", "-i", "/tmp/unwound-bench-perf.data"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        perf.push((execs, rec_cpu, child_cpu(script), 0.0));
    }
    let m =
        |v: &[(f64, f64, f64, f64)], i: usize| median(v.iter().map(|x| [x.0, x.1, x.2, x.3][i]).collect());
    println!("{:>22} {:>10} {:>14} {:>16}", "", "execs/s", "profiler CPU s", "");
    println!("{:>22} {:>10.0} {:>14} {:>16}", "storm alone", m(&alone, 0), "-", "");
    println!(
        "{:>22} {:>10.0} {:>14.3} {:>10.0} ns/sample BPF, {:.0}% of records walked through the kernel's view",
        "unwound",
        m(&ours, 0),
        m(&ours, 1),
        m(&ours, 2),
        100.0 * m(&ours, 3)
    );
    println!(
        "{:>22} {:>10.0} {:>14.3} {:>10.3} s more for perf script",
        "perf --call-graph dwarf",
        m(&perf, 0),
        m(&perf, 1),
        m(&perf, 2)
    );
    println!("  profiler CPU: unwound's process after start-up (sampling, following, symbolizing at");
    println!("  the end); perf's `perf record` process (its stacks need `perf script` on top,");
    println!("  here with --no-inline: inline expansion runs addr2line over every busy library)");
}

/// A Python program spinning `depth` frames deep (distinct functions f0 → f1 → …), or
/// parked (`sleep`) there.
fn python_at_depth(python: &str, depth: u32, spin: bool) -> Killed {
    let body = if spin {
        "while True:\n        sum(i * i for i in range(1000))"
    } else {
        "import time; time.sleep(3600)"
    };
    let mut src = String::new();
    for i in 0..depth {
        let next = if i + 1 == depth { "leaf()".to_string() } else { format!("f{}()", i + 1) };
        src.push_str(&format!("def f{i}():\n    {next}\n"));
    }
    src.push_str(&format!("def leaf():\n    {body}\nf0()\n"));
    Killed(Command::new(python).args(["-c", &src]).spawn().unwrap())
}

/// BPF cost per sample of a CPython process 10 and 100 Python frames deep (3.12, spinning),
/// beside a native one walked with tables at a similar depth; and the userspace cost of
/// reading one new code object (names, line table) from a live process.
fn python_cost() {
    let rounds = 3;
    let python = "/usr/bin/python3.11";
    println!("\n6. Python: BPF ns per sample at 999 Hz, 4 s, medians of {rounds} rounds ({python})");
    let mut got: std::collections::HashMap<(&str, u32), Vec<f64>> = Default::default();
    for _ in 0..rounds {
        for depth in [10u32, 100] {
            let p = python_at_depth(python, depth, true);
            std::thread::sleep(Duration::from_millis(500));
            let pid = p.0.id().to_string();
            let j = record(&["--pid", &pid, "--duration", "4", "--frequency", "999", "--bpf-stats"]);
            got.entry(("python", depth))
                .or_default()
                .push(field(&j, "bpf_run_time_ns") / field(&j, "emitted"));
            drop(p);
            // Native: the recursion fixture at a similar depth of its own frames.
            let arg = depth.to_string();
            let n =
                Killed(Command::new(fixture("recurse_nofp")).args([arg.as_str(), "mixed"]).spawn().unwrap());
            std::thread::sleep(Duration::from_millis(200));
            let pid = n.0.id().to_string();
            let j = record(&["--pid", &pid, "--duration", "4", "--frequency", "999", "--bpf-stats"]);
            got.entry(("native", depth))
                .or_default()
                .push(field(&j, "bpf_run_time_ns") / field(&j, "emitted"));
        }
    }
    println!("{:>8} {:>22} {:>22}", "depth", "python ns/sample", "native ns/sample");
    for depth in [10u32, 100] {
        println!(
            "{depth:>8} {:>22.0} {:>22.0}",
            median(got[&("python", depth)].clone()),
            median(got[&("native", depth)].clone())
        );
    }
    println!("  python: that many Python frames (plus the interpreter's ~15 native frames);");
    println!("  native: recurse_nofp with that many frames of its own, four functions in a cycle");
    // Reading new code objects: a process parked 300 distinct functions deep, walked by the
    // reference walker with an empty cache each time.
    let p = python_at_depth(python, 300, false);
    std::thread::sleep(Duration::from_millis(800));
    let pid = p.0.id();
    let process = unwound_symbolize::python::PythonProcess::detect(pid).unwrap().expect("a CPython process");
    let mut per_code = Vec::new();
    for _ in 0..5 {
        let mut cache = unwound_symbolize::python::CodeCache::new(1 << 12);
        let t = std::time::Instant::now();
        let stacks = process.stacks_with(&mut cache).unwrap();
        let frames: usize = stacks.iter().map(|s| s.frames.len()).sum();
        per_code.push(t.elapsed().as_secs_f64() * 1e6 / frames as f64);
    }
    println!(
        "  a new code object read (names, line table; through process_vm_readv): {:.1} µs median of 5 (300 frames each)",
        median(per_code)
    );
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        println!("walker: bench");
        return;
    }
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("the walker benchmarks load BPF programs: run as root");
        return;
    }
    // `cargo bench --bench walker -- overhead` runs one section (cost, overhead, long,
    // memory).
    let only: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
    let run = |name: &str| only.is_empty() || only.iter().any(|o| o == name);
    if run("cost") {
        bpf_cost();
    }
    if run("jit") {
        jit_cost();
    }
    if run("overhead") {
        overhead();
    }
    if run("long") {
        long_runs();
    }
    if run("memory") {
        memory();
    }
    if run("exec") {
        exec_cost();
    }
    if run("python") {
        python_cost();
    }
}
