//! The agent as a user meets it: output formats read by real tools, and one clear line for
//! every mistake.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;

fn one_error_line(run: &AgentRun) -> String {
    assert!(!run.status.success(), "expected failure, got success: {}", run.stderr);
    let lines: Vec<&str> = run.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "want one line, got: {:?}", run.stderr);
    assert!(lines[0].starts_with("error: "), "{:?}", lines[0]);
    lines[0].to_string()
}

#[test]
fn unknown_pid_is_one_clear_line_and_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("x.folded");
    let run =
        unwound(&["record", "--pid", "999999999", "--duration", "1", "--output", out.to_str().unwrap()]);
    let line = one_error_line(&run);
    assert!(line.contains("no process with pid 999999999"), "{line}");
    assert!(std::fs::read_dir(tmp.path()).unwrap().next().is_none(), "something was written");
}

#[test]
fn bad_values_are_one_clear_line() {
    let tmp = tempfile::tempdir().unwrap();
    let out = |n: &str| tmp.path().join(n).display().to_string();
    for (args, want) in [
        (vec!["--duration", "0", "--output", &out("a.folded")], "--duration must be a positive"),
        (vec!["--frequency", "0", "--output", &out("a.folded")], "--frequency must be between 1 and"),
        (vec!["--frequency", "100000000", "--output", &out("a.folded")], "--frequency must be between 1 and"),
        (
            vec!["--max-frames", "9999", "--output", &out("a.folded")],
            "--max-frames must be between 1 and 512",
        ),
        (vec!["--output", &out("profile.unknown")], "cannot tell the output format"),
        (vec!["--output", "/nonexistent-dir/x.folded"], "directory /nonexistent-dir does not exist"),
    ] {
        let mut full = vec!["record"];
        full.extend(args.iter().copied());
        let line = one_error_line(&unwound(&full));
        assert!(line.contains(want), "{full:?}: {line}");
    }
    assert!(std::fs::read_dir(tmp.path()).unwrap().next().is_none());
}

#[test]
fn bad_flag_combinations_are_rejected_with_usage() {
    for (args, want) in [
        (vec!["--every", "0.5"], "invalid value '0.5' for '--every <SECONDS>': expected at least 1 second"),
        (vec!["--every", "0"], "expected a positive number of seconds"),
        (vec!["--keep", "3"], "the following required arguments were not provided:\n  --every <SECONDS>"),
        (vec!["--every", "60", "--keep", "0"], "invalid value '0' for '--keep <N>'"),
        (vec!["--pid", "1", "--", "true"], "'--pid <PID>' cannot be used with '[COMMAND]...'"),
    ] {
        let mut full = vec!["record", "--output", "/tmp/x.folded"];
        full.extend(args.iter().copied());
        let run = unwound(&full);
        assert_eq!(run.status.code(), Some(2), "{full:?}: {}", run.stderr);
        assert!(run.stderr.contains(want), "{full:?}: {}", run.stderr);
    }
}

#[test]
fn bad_flag_is_rejected_with_usage() {
    let run = unwound(&["record", "--no-such-flag", "--output", "/tmp/x.folded"]);
    assert_eq!(run.status.code(), Some(2));
    assert!(run.stderr.contains("unexpected argument '--no-such-flag'"), "{}", run.stderr);
}

#[test]
fn sample_cost_bad_values_and_no_privileges_are_clear() {
    for d in ["0", "-1", "soon", "inf"] {
        let run = unwound(&["sample-cost", &format!("--duration={d}")]);
        assert_eq!(run.status.code(), Some(2), "{d}: {}", run.stderr);
        assert!(run.stderr.contains("expected a positive number of seconds"), "{d}: {}", run.stderr);
    }
    // Past a year the clock's arithmetic would overflow: refused, not a panic.
    for d in ["1e20", "31536001"] {
        let run = unwound(&["sample-cost", "--duration", d]);
        assert_eq!(run.status.code(), Some(2), "{d}: {}", run.stderr);
        assert!(run.stderr.contains("expected at most a year"), "{d}: {}", run.stderr);
    }
    let run = unprivileged(&["sample-cost", "--duration", "1"]);
    assert!(one_error_line(&run).contains("needs root"), "{}", run.stderr);
}

/// The agent run as nobody with no capabilities (directly when the tests already run so).
fn unprivileged(args: &[&str]) -> AgentRun {
    if unsafe { libc::geteuid() } != 0 {
        return unwound(args);
    }
    let o = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all"])
        .arg(env!("CARGO_BIN_EXE_unwound"))
        .args(args)
        .output()
        .expect("setpriv (util-linux)");
    AgentRun {
        status: o.status,
        stdout: String::from_utf8_lossy(&o.stdout).into(),
        stderr: String::from_utf8_lossy(&o.stderr).into(),
    }
}

#[test]
fn without_privileges_it_says_how_to_fix() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::set_permissions(tmp.path(), std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    let out = tmp.path().join("x.folded");
    let run = unprivileged(&["record", "--duration", "1", "--output", out.to_str().unwrap()]);
    let line = one_error_line(&run);
    assert!(line.contains("needs root (or CAP_BPF and CAP_PERFMON)") && line.contains("sudo"), "{line}");
    assert!(!out.exists());
}

fn record_fixture(binary: &str, output: &Path, extra: &[&str]) -> AgentRun {
    let dir = build_fixtures();
    let f = start(&dir, binary, &[]);
    settle(100);
    let pid = f.pid().to_string();
    let mut args = vec!["record", "--pid", &pid, "--duration", "2", "--frequency", "199", "--output"];
    let out = output.display().to_string();
    args.push(&out);
    args.extend_from_slice(extra);
    let run = unwound(&args);
    assert!(run.status.success(), "{}", run.stderr);
    run
}

/// `go tool pprof -top` (plus `flags`) of a profile, with `home` as Go's cache home.
fn go_pprof_top(profile: &Path, flags: &[&str], home: &Path) -> String {
    let o = Command::new("go")
        .args(["tool", "pprof", "-top", "-symbolize=none"])
        .args(flags)
        .arg(profile)
        .env("HOME", home)
        .output()
        .expect("go tool pprof (Debian golang-go)");
    assert!(o.status.success(), "pprof failed: {}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn pprof_output_is_read_by_go_tool_pprof() {
    if !bpf_available("pprof_output_is_read_by_go_tool_pprof") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("profile.pb.gz");
    record_fixture("chain_fp", &out, &[]);
    let text = go_pprof_top(&out, &[], tmp.path());
    // The leaf has nearly all the flat time; the chain is there in cumulative time.
    let leaf =
        text.lines().find(|l| l.trim_end().ends_with(" c_chain_c")).unwrap_or_else(|| panic!("{text}"));
    let flat_pct: f64 = leaf.split_whitespace().nth(1).unwrap().trim_end_matches('%').parse().unwrap();
    assert!(flat_pct >= 90.0, "c_chain_c flat {flat_pct}%:\n{text}");
    for f in ["main", "c_chain_a", "c_chain_b"] {
        assert!(text.lines().any(|l| l.trim_end().ends_with(&format!(" {f}"))), "{f} missing:\n{text}");
    }
    assert!(text.contains("Type: cpu"), "{text}");
}

#[test]
fn svg_output_is_a_flame_graph() {
    if !bpf_available("svg_output_is_a_flame_graph") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("profile.svg");
    record_fixture("chain_fp", &out, &[]);
    let svg = std::fs::read_to_string(&out).unwrap();
    // Well-formed XML, by Python's parser.
    let ok = Command::new("python3")
        .args(["-c", "import sys, xml.dom.minidom; xml.dom.minidom.parse(sys.argv[1])"])
        .arg(&out)
        .status()
        .unwrap();
    assert!(ok.success(), "SVG is not well-formed XML");
    for f in ["chain_fp", "main", "c_chain_a", "c_chain_b", "c_chain_c"] {
        assert!(svg.contains(&format!("<title>{f} (")), "{f} has no box in the flame graph");
    }
}

#[test]
fn a_process_that_exits_mid_recording_keeps_its_samples() {
    if !bpf_available("a_process_that_exits_mid_recording_keeps_its_samples") {
        return;
    }
    let _guard = exclusive();
    let dir = build_fixtures();
    let mut f = start(&dir, "chain_fp", &[]);
    let pid = f.pid();
    let killer = std::thread::spawn(move || {
        // Long enough for the agent to start (tables, BPF load) and take ~200 samples.
        settle(2500);
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    });
    let tmp = tempfile::tempdir().unwrap();
    let (stacks, run) = record_folded(&[pid], 10.0, 199, tmp.path());
    killer.join().unwrap();
    let _ = f.child.wait();
    assert!(run.stderr.contains("every selected process exited"), "{}", run.stderr);
    let chain = expand(&["main".into(), "c_chain_a".into(), "c_chain_b".into(), "c_chain_c".into()]);
    let good: u64 = stacks.iter().filter(|s| matches_leaf(&s.user, &chain)).map(|s| s.count).sum();
    assert!(good >= 100, "only {good} symbolized samples before exit: {stacks:?}");
}

#[test]
fn a_deleted_binary_is_still_symbolized() {
    if !bpf_available("a_deleted_binary_is_still_symbolized") {
        return;
    }
    let dir = build_fixtures();
    let tmp = tempfile::tempdir().unwrap();
    let copy = tmp.path().join("chain_deleted");
    std::fs::copy(dir.join("chain_fp"), &copy).unwrap();
    let running = start(tmp.path(), "chain_deleted", &[]);
    settle(100);
    std::fs::remove_file(&copy).unwrap();
    let (stacks, _) = record_folded(&[running.pid()], 2.0, 199, tmp.path());
    let chain = expand(&["main".into(), "c_chain_a".into(), "c_chain_b".into(), "c_chain_c".into()]);
    let total: u64 = stacks.iter().map(|s| s.count).sum();
    let good: u64 = stacks.iter().filter(|s| matches_leaf(&s.user, &chain)).map(|s| s.count).sum();
    assert!(total > 0 && good * 10 >= total * 9, "{good}/{total}: {stacks:?}");
}

#[test]
fn tables_command_summarizes_dumps_and_reports_json() {
    let libc = "/usr/lib/x86_64-linux-gnu/libc.so.6";
    let json = unwound(&["tables", libc, "--json"]);
    assert!(json.status.success(), "{}", json.stderr);
    let line = json.stdout.trim();
    for key in ["\"dwarf_rows\":", "\"entries\":", "\"bytes\":", "\"unsupported\":{"] {
        assert!(line.contains(key), "{key} missing: {line}");
    }
    let rows: u64 = line.split("\"dwarf_rows\":").nth(1).unwrap().split(',').next().unwrap().parse().unwrap();
    // readelf prints a row where an advance changes something; DWARF rows (gimli's count,
    // one per advance) are at least that many and, in compiled code, not many more.
    let readelf = Command::new("readelf").args(["--debug-dump=frames-interp", libc]).output().unwrap();
    let readelf_rows = String::from_utf8_lossy(&readelf.stdout)
        .lines()
        .filter(|l| l.len() > 16 && l.as_bytes()[16] == b' ' && u64::from_str_radix(&l[..16], 16).is_ok())
        .count() as u64;
    assert!(
        rows >= readelf_rows * 95 / 100 && rows <= readelf_rows * 115 / 100,
        "rows {rows} vs readelf's {readelf_rows}"
    );

    let dump = unwound(&["tables", libc, "--dump"]);
    assert!(dump.status.success());
    let mut n = 0;
    let mut prev_end = 0u64;
    for l in dump.stdout.lines() {
        let f: Vec<&str> = l.split(' ').collect();
        assert_eq!(f.len(), 4, "{l}");
        let (s, e) = (u64::from_str_radix(f[0], 16).unwrap(), u64::from_str_radix(f[1], 16).unwrap());
        assert!(s < e && s >= prev_end, "{l}");
        prev_end = e;
        let cfa_ok = f[2].starts_with("rsp+")
            || f[2].starts_with("rbp+")
            || f[2].starts_with("plt(")
            || f[2].starts_with("deref(")
            || f[2].starts_with("unsupported:")
            || ["gap", "end", "signal"].contains(&f[2]);
        assert!(cfa_ok, "{l}");
        assert!(f[3] == "u" || f[3] == "undef" || f[3].starts_with("c-"), "{l}");
        n += 1;
    }
    assert!(n > 10_000);

    let summary = unwound(&["tables", libc]);
    assert!(summary.stdout.contains("bytes") && summary.stdout.contains("per DWARF row"));

    let bad = unwound(&["tables", "/etc/passwd"]);
    let line = one_error_line(&bad);
    assert!(line.contains("cannot compile unwind tables of /etc/passwd"), "{line}");
}

/// Lines `addr2line` gives for every byte of `function` in `binary`.
fn addr2line_lines_of(binary: &Path, function: &str) -> std::collections::HashSet<u32> {
    let nm = Command::new("nm").args(["-S", "--defined-only"]).arg(binary).output().unwrap();
    let text = String::from_utf8_lossy(&nm.stdout);
    let (start, size) = text
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() == 4 && f[3] == function)
                .then(|| (u64::from_str_radix(f[0], 16).unwrap(), u64::from_str_radix(f[1], 16).unwrap()))
        })
        .unwrap_or_else(|| panic!("{function} in {}", binary.display()));
    let addrs: Vec<String> = (start..start + size).map(|a| format!("{a:#x}")).collect();
    let out = Command::new("addr2line").arg("-e").arg(binary).args(&addrs).output().unwrap();
    String::from_utf8_lossy(&out.stdout).lines().filter_map(|l| l.rsplit(':').next()?.parse().ok()).collect()
}

#[test]
fn pprof_locations_carry_source_lines() {
    if !bpf_available("pprof_locations_carry_source_lines") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("profile.pb.gz");
    let cache = tmp.path().join("cache");
    record_fixture("chain_nofp", &out, &["--symbol-cache-dir", cache.to_str().unwrap()]);
    let text = go_pprof_top(&out, &["-lines"], tmp.path());
    let valid = addr2line_lines_of(&build_fixtures().join("chain_nofp"), "c_chain_c");
    let mut flat = 0.0;
    for l in text.lines().filter(|l| l.contains(" c_chain_c ")) {
        let loc = l.split_whitespace().last().unwrap();
        let (file, line) = loc.rsplit_once(':').unwrap();
        assert!(file.ends_with("fixtures/src/chain.c"), "{l}");
        let line: u32 = line.parse().unwrap();
        assert!(valid.contains(&line), "line {line} is not one addr2line gives for c_chain_c: {valid:?}");
        flat += l.split_whitespace().nth(1).unwrap().trim_end_matches('%').parse::<f64>().unwrap();
    }
    assert!(flat >= 90.0, "c_chain_c lines hold {flat}% of the samples:\n{text}");
    // The index was cached for the next run.
    assert!(std::fs::read_dir(&cache).unwrap().count() >= 1);
}

#[test]
fn symbolize_command_prints_what_addr2line_prints() {
    let bin = build_fixtures().join("cpp_chain_nofp");
    let nm = Command::new("nm").args(["--defined-only"]).arg(&bin).output().unwrap();
    let addrs: Vec<String> = String::from_utf8_lossy(&nm.stdout)
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() == 3 && matches!(f[1], "T" | "t"))
                .then(|| format!("0x{:x}", u64::from_str_radix(f[0], 16).unwrap() + 4))
        })
        .chain(["0x0".to_string()])
        .collect();
    assert!(addrs.len() > 5);
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().display().to_string();
    let bin_s = bin.display().to_string();
    let mut args = vec!["symbolize", "--elf", &bin_s, "--format", "addr2line", "-a", "--cache-dir", &cache];
    args.extend(addrs.iter().map(String::as_str));
    let ours = unwound(&args);
    assert!(ours.status.success(), "{}", ours.stderr);
    let theirs = Command::new("addr2line")
        .args(["-a", "-f", "-i", "-C", "-e"])
        .arg(&bin)
        .args(&addrs)
        .output()
        .unwrap();
    assert_eq!(ours.stdout, String::from_utf8_lossy(&theirs.stdout));

    let json = unwound(&["symbolize", "--elf", &bin_s, "--json", "--cache-dir", &cache, &addrs[0], "0x0"]);
    assert!(json.status.success(), "{}", json.stderr);
    let lines: Vec<serde_json::Value> =
        json.stdout.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 2);
    assert!(lines[0]["frames"][0]["line"].as_u64().unwrap() > 0, "{}", json.stdout);
    assert_eq!(lines[1]["miss"], "no_symbol");

    let bad = unwound(&["symbolize", "--elf", &bin_s, "zz"]);
    assert!(!bad.status.success());
    assert!(one_error_line(&bad).contains("bad address \"zz\""), "{}", bad.stderr);
    let missing = unwound(&["symbolize", "--elf", "/nonexistent/x", "0x10"]);
    assert!(one_error_line(&missing).contains("/nonexistent/x"), "{}", missing.stderr);
}
