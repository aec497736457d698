//! The walker on Debian 12's own kernel (6.1), booted for real under qemu (TCG emulation):
//! `scripts/setup.sh` unpacks Debian's 6.1 cloud kernel into `~/.cache/unwound/kernel`
//! (`UNWOUND_KERNEL_DIR` overrides), `scripts/boot-kernel.sh` boots it with an initramfs of
//! the agent, its libraries and the fixtures, and the fixtures' stacks are checked against
//! the manifest with the threshold the 6.18 tests use, for each walker.
//!
//! Needs no BPF on this machine (the guest kernel loads the programs), but qemu and the
//! kernel: without them a plain `cargo test` skips with a printed reason, under CI it fails.

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;

use common::*;

/// Debian's 6.1 kernel image unpacked by `scripts/setup.sh`.
fn debian_6_1_kernel() -> Option<PathBuf> {
    let dir = std::env::var_os("UNWOUND_KERNEL_DIR")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/unwound/kernel")))?;
    let mut found: Vec<PathBuf> = std::fs::read_dir(&dir)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("vmlinuz-6.1.") && n.ends_with("-cloud-amd64"))
        })
        .collect();
    found.sort();
    found.pop()
}

fn have(tool: &str) -> bool {
    Command::new("sh").args(["-c", &format!("command -v {tool}")]).output().is_ok_and(|o| o.status.success())
}

/// The kernel, or `None` (skipped with a printed reason) when qemu or the kernel is missing
/// outside CI; under CI a missing piece fails the test.
fn older_kernel_test(test: &str) -> Option<PathBuf> {
    let kernel = debian_6_1_kernel();
    let missing = match (&kernel, have("qemu-system-x86_64") && have("busybox") && have("cpio")) {
        (None, _) => Some("Debian's 6.1 kernel is not in ~/.cache/unwound/kernel"),
        (_, false) => Some("qemu-system-x86_64, busybox or cpio is not installed"),
        _ => None,
    };
    if let Some(why) = missing {
        if std::env::var_os("CI").is_some() {
            panic!("{test}: {why}; scripts/setup.sh installs them, and CI must run this test");
        }
        eprintln!("SKIPPED {test}: {why} (scripts/setup.sh installs them)");
        return None;
    }
    kernel
}

/// One walker's run inside the guest.
#[derive(Default, Debug)]
struct GuestRun {
    status: String,
    stderr: String,
    json: String,
    folded: String,
}

/// Splits the guest's output into its runs: `=== walker W` starts one, `=== status`,
/// `=== stderr`, `=== json` and `=== folded` start its parts.
fn parse_guest_output(text: &str) -> BTreeMap<String, GuestRun> {
    let mut runs: BTreeMap<String, GuestRun> = BTreeMap::new();
    let mut walker = String::new();
    let mut part = "";
    for line in text.lines().map(|l| l.trim_end_matches('\r')) {
        if let Some(rest) = line.strip_prefix("=== ") {
            match rest.split_once(' ') {
                Some(("walker", w)) => {
                    walker = w.to_string();
                    runs.entry(walker.clone()).or_default();
                    part = "";
                }
                Some(("status", s)) => runs.entry(walker.clone()).or_default().status = s.to_string(),
                _ => part = if rest == "stderr" || rest == "json" || rest == "folded" { rest } else { "" },
            }
            continue;
        }
        let Some(run) = runs.get_mut(&walker) else { continue };
        let target = match part {
            "stderr" => &mut run.stderr,
            "json" => &mut run.json,
            "folded" => &mut run.folded,
            _ => continue,
        };
        target.push_str(line);
        target.push('\n');
    }
    runs
}

fn json_value(json: &str) -> serde_json::Value {
    serde_json::from_str(json.trim()).unwrap_or_else(|e| panic!("summary is not JSON ({e}): {json}"))
}

#[test]
fn both_walkers_give_full_chains_on_debian_12s_6_1_kernel() {
    let test = "both_walkers_give_full_chains_on_debian_12s_6_1_kernel";
    let Some(kernel) = older_kernel_test(test) else { return };
    let fixtures = build_fixtures();
    let manifest = manifest();

    // The guest starts every fixture, lets the slow starters settle (dlopen loads its
    // library 1.5 s in), then records them with each walker in turn.
    let mut script = String::from("#!/bin/sh\nuname -r\ncd /tmp\npids=\"\"\n");
    let mut patterns = BTreeMap::new();
    let mut settle_ms = 200;
    for f in &manifest.fixture {
        settle_ms = settle_ms.max(f.settle_ms + 300);
        for v in &f.variants {
            let binary = f.binary(v);
            script.push_str(&format!(
                "{} {} >/dev/null 2>&1 &\npids=\"$pids --pid $!\"\n",
                fixtures.join(&binary).display(),
                f.args.join(" ")
            ));
            patterns.insert(binary, expand(&f.stack));
        }
    }
    let unwound = env!("CARGO_BIN_EXE_unwound");
    script.push_str(&format!("sleep {:.1}\n", settle_ms as f64 / 1000.0));
    for walker in ["loop", "tail-calls", "auto"] {
        script.push_str(&format!(
            "echo '=== walker {walker}'\n\
             {unwound} record $pids --walker {walker} --duration 6 --frequency 499 --json-summary \
             --no-table-cache --output /tmp/{walker}.folded >/tmp/{walker}.json 2>/tmp/{walker}.err\n\
             echo \"=== status $?\"\n\
             echo '=== stderr'; cat /tmp/{walker}.err\n\
             echo '=== json'; cat /tmp/{walker}.json\n\
             echo '=== folded'; cat /tmp/{walker}.folded\n"
        ));
    }
    script.push_str("echo '=== end'\n");

    let (release, text) = run_in_guest(&kernel, &script);
    let release = release.as_str();

    let runs = parse_guest_output(&text);
    let mut failures = Vec::new();
    for (walker, program) in
        [("loop", "on_cpu_sample"), ("tail-calls", "on_cpu_sample_tail"), ("auto", "on_cpu_sample")]
    {
        let run = runs.get(walker).unwrap_or_else(|| panic!("no run of the {walker} walker in:\n{text}"));
        eprintln!("--- {walker} walker on {release}:\n{}", run.stderr);
        assert_eq!(
            run.status.trim(),
            "0",
            "unwound record --walker {walker} failed on {release}:\n{}",
            run.stderr
        );
        let json = json_value(&run.json);
        // `auto` must take what this kernel supports: bpf_loop (5.17+), and the segments.
        assert_eq!(json["walker"], program, "--walker {walker} on {release} ran {}", json["walker"]);
        assert_eq!(json["kernel"], release, "summary's kernel");
        assert_eq!(json["table_maps"], "segments", "table maps on {release}: {}", run.json);
        assert_eq!(json["tables_refused"], 0, "tables refused on {release}: {}", run.stderr);
        assert!(json["tables"].as_u64().unwrap_or(0) > 0, "no table uploaded on {release}: {}", run.stderr);
        let stacks = parse_folded(&run.folded);
        let shares = shares(&stacks, &patterns);
        eprintln!("{:<16} {:>8} {:>8} {:>8}  walker", "fixture", "samples", "complete", "share");
        for (name, &(total, matched)) in &shares {
            let share = if total == 0 { 0.0 } else { matched as f64 / total as f64 };
            eprintln!("{name:<16} {total:>8} {matched:>8} {:>7.1}%  {walker}", share * 100.0);
            if total < 100 {
                failures.push(format!("{walker}: {name}: only {total} samples"));
            } else if share < 0.95 {
                let mut seen: Vec<&FoldedStack> = stacks.iter().filter(|s| &s.process == name).collect();
                seen.sort_by_key(|s| std::cmp::Reverse(s.count));
                let top: Vec<String> =
                    seen.iter().take(2).map(|s| format!("{} ×{}", s.user.join(";"), s.count)).collect();
                failures.push(format!(
                    "{walker}: {name}: full chain on {:.1}% of samples, want ≥ 95%; most seen: {top:?}",
                    share * 100.0
                ));
            }
        }
    }
    assert!(failures.is_empty(), "on kernel {release}:\n{}", failures.join("\n"));
}

/// Boots the 6.1 kernel with `script` as the guest's /run.sh and the agent and fixtures in
/// its initramfs; the kernel release and the guest's output once it printed `=== end`.
fn run_in_guest(kernel: &std::path::Path, script: &str) -> (String, String) {
    let tmp = tempfile::tempdir().unwrap();
    let run_sh = tmp.path().join("run.sh");
    std::fs::write(&run_sh, script).unwrap();
    let (out, console) = (tmp.path().join("out.txt"), tmp.path().join("console.txt"));
    let started = std::time::Instant::now();
    let status = Command::new(workspace_root().join("scripts/boot-kernel.sh"))
        .arg(kernel)
        .args([&run_sh, &out, &console])
        .arg(env!("CARGO_BIN_EXE_unwound"))
        .arg(build_fixtures())
        .env("UNWOUND_QEMU_TIMEOUT", "300")
        .status()
        .expect("run scripts/boot-kernel.sh");
    let text = std::fs::read_to_string(&out).unwrap_or_default();
    let console_text = std::fs::read_to_string(&console).unwrap_or_default();
    eprintln!("qemu ({}) finished in {:.1} s: {status}", kernel.display(), started.elapsed().as_secs_f64());
    let tail: Vec<&str> = console_text.lines().rev().take(40).collect();
    assert!(
        status.success() && text.contains("=== end"),
        "the guest did not finish its runs.\n--- its output:\n{text}\n--- its console (tail):\n{}",
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    );
    let release = text.lines().next().unwrap_or("").trim().to_string();
    assert!(release.starts_with("6.1."), "the guest runs kernel {release:?}, not 6.1");
    (release, text)
}

/// The faults of `faults.rs` that touch the kernel, on 6.1: the agent stopped while the
/// sample ring fills (the kernel counts the drops, the agent reports them and samples on
/// once continued), and a table budget far too small (the segments the kernel would need
/// are refused by the budget, counted, and the walk falls back to frame pointers).
#[test]
fn faults_that_touch_the_kernel_are_counted_on_debian_12s_6_1_kernel() {
    let test = "faults_that_touch_the_kernel_are_counted_on_debian_12s_6_1_kernel";
    let Some(kernel) = older_kernel_test(test) else { return };
    let fixtures = build_fixtures();
    let unwound = env!("CARGO_BIN_EXE_unwound");
    let f = |name: &str| fixtures.join(name).display().to_string();
    let script = format!(
        "#!/bin/sh\nuname -r\ncd /tmp\n\
         {deep} 500 >/dev/null 2>&1 &\np1=$!\n{deep} 500 >/dev/null 2>&1 &\np2=$!\n\
         {chain} >/dev/null 2>&1 &\np3=$!\nsleep 0.5\nmkdir -p /tmp/stopped\n\
         echo '=== walker stopped'\n\
         {unwound} record --pid $p1 --pid $p2 --every 2 --duration 20 --frequency 49 --json-summary \
         --no-table-cache --output /tmp/stopped/cpu.folded >/tmp/s.json 2>/tmp/s.err &\n\
         a=$!\ni=0\nwhile ! grep -q 'so far' /tmp/s.err && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done\n\
         kill -STOP $a\nsleep 10\nkill -CONT $a\nwait $a\n\
         echo \"=== status $?\"\necho '=== stderr'; cat /tmp/s.err\necho '=== json'; cat /tmp/s.json\n\
         echo '=== folded'; cat $(ls /tmp/stopped/cpu-*.folded | tail -n 3)\n\
         echo '=== walker budget'\n\
         {unwound} record --pid $p3 --duration 4 --frequency 499 --table-memory 0.004 --no-table-cache \
         --json-summary --output /tmp/b.folded >/tmp/b.json 2>/tmp/b.err\n\
         echo \"=== status $?\"\necho '=== stderr'; cat /tmp/b.err\necho '=== json'; cat /tmp/b.json\n\
         echo '=== folded'; cat /tmp/b.folded\necho '=== end'\n",
        deep = f("recurse_fp"),
        chain = f("chain_nofp"),
    );
    let (release, text) = run_in_guest(&kernel, &script);
    let runs = parse_guest_output(&text);

    let stopped = runs.get("stopped").unwrap_or_else(|| panic!("no stopped-agent run in:\n{text}"));
    eprintln!("--- agent stopped 10 s on {release}:\n{}", stopped.stderr);
    assert_eq!(stopped.status.trim(), "0", "the stopped agent failed on {release}:\n{}", stopped.stderr);
    let json = json_value(&stopped.json);
    let dropped = json["dropped_ring_full"].as_u64().unwrap_or(0);
    assert!(dropped > 0, "a stopped agent's ring filled on {release}, yet no drop was counted: {json}");
    assert!(
        stopped.stderr.contains(&format!("dropped: dropped_ring_full={dropped}")),
        "the drops are told on {release}:\n{}",
        stopped.stderr
    );
    assert_eq!(json["profiles_failed"], 0, "{json}");
    assert!(json["profiles"].as_u64().unwrap_or(0) >= 7, "2 s intervals over 20 s, none lost: {json}");
    let last: u64 = parse_folded(&stopped.folded)
        .iter()
        .filter(|s| s.user.iter().any(|f| f == "c_recurse_leaf"))
        .map(|s| s.count)
        .sum();
    assert!(
        last > 0,
        "the agent samples again once continued, on {release}: last profiles\n{}",
        stopped.folded
    );

    let budget = runs.get("budget").unwrap_or_else(|| panic!("no small-budget run in:\n{text}"));
    eprintln!("--- table budget of 4 KiB on {release}:\n{}", budget.stderr);
    assert_eq!(budget.status.trim(), "0", "the agent failed on {release}:\n{}", budget.stderr);
    let json = json_value(&budget.json);
    assert!(json["tables_full"].as_u64().unwrap_or(0) > 0, "tables that did not fit are counted: {json}");
    assert_eq!(json["tables"], 0, "no table fits 4 KiB: {json}");
    let chain: u64 =
        parse_folded(&budget.folded).iter().filter(|s| s.process == "chain_nofp").map(|s| s.count).sum();
    assert!(
        chain > 100,
        "the agent samples on by frame pointers on {release}: {chain} samples of chain_nofp"
    );
}

#[test]
fn guest_output_is_split_by_walker_and_part() {
    let text =
        "6.1.0\n=== walker loop\n=== status 0\r\n=== stderr\nwarn\n=== json\n{\"a\":1}\n=== folded\np;a 3\n\
                === walker auto\n=== status 1\n=== end\n";
    let runs = parse_guest_output(text);
    assert_eq!(runs.len(), 2);
    assert_eq!(runs["loop"].status, "0");
    assert_eq!(runs["loop"].stderr, "warn\n");
    assert_eq!(runs["loop"].json, "{\"a\":1}\n");
    assert_eq!(runs["loop"].folded, "p;a 3\n");
    assert_eq!(runs["auto"].status, "1");
    assert!(runs["auto"].folded.is_empty());
}
