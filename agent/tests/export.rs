//! `unwound record --pyroscope URL --otlp URL --label KEY=VALUE` against loopback doubles
//! of the backends (agent/export/tests/common): every interval arrives, decodes with the
//! backends' own types, carries the labels, and holds exactly the local profile's stacks.

mod common;
#[path = "../export/tests/common/mod.rs"]
mod doubles;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use common::*;
use doubles::*;

type Stacks = BTreeMap<(String, Vec<String>), i64>;

/// (thread name, stack) → samples of a pprof, with its `time_nanos`.
fn pprof_stacks(raw: &[u8]) -> (i64, Stacks, Vec<HashMap<String, String>>) {
    let d = DecodedPprof::decode(raw).unwrap();
    let mut stacks = Stacks::new();
    let mut labels = Vec::new();
    for (stack, values, strs, nums) in d.samples() {
        assert!(nums.contains_key("pid"), "{nums:?}");
        *stacks.entry((strs["thread_name"].clone(), stack)).or_default() += values[0];
        labels.push(strs);
    }
    (d.profile.time_nanos, stacks, labels)
}

fn local_profiles(dir: &Path) -> BTreeMap<i64, Stacks> {
    let mut out = BTreeMap::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with("cpu-") && name.ends_with(".pb.gz") {
            let (t, stacks, labels) = pprof_stacks(&std::fs::read(e.path()).unwrap());
            for l in &labels {
                assert_eq!(l.get("env").map(String::as_str), Some("prod"), "{l:?}");
                assert!(l.contains_key("service_name") && l.contains_key("host_name"), "{l:?}");
            }
            if !stacks.is_empty() {
                // An interval without samples is not sent.
                out.insert(t, stacks);
            }
        }
    }
    out
}

#[test]
fn every_interval_reaches_pyroscope_and_otlp_labelled_with_the_local_stacks() {
    let Some((_guard, dir)) = bpf_fixture_test("export_end_to_end") else { return };
    let Some(python) = otlp_python("export_end_to_end") else { return };
    let tmp = tempfile::tempdir().unwrap();
    let pyroscope = HttpDouble::start(pyroscope_handler);
    let otlp = HttpDouble::start(otlp_handler(python.clone(), tmp.path().to_path_buf()));
    let f = start(&dir, "chain_fp", &[]);
    settle(100);
    let pid = f.pid().to_string();
    let out = tmp.path().join("cpu.pb.gz").display().to_string();
    let (p_url, o_url) = (pyroscope.url(), otlp.url());
    // CI runs 10 s in 2 s intervals; the note's run is minutes long:
    // UNWOUND_EXPORT_SECONDS=180 UNWOUND_EXPORT_EVERY=10 cargo test --release --test export
    let env = |name: &str, default: &str| std::env::var(name).unwrap_or_else(|_| default.to_string());
    let (seconds, every) = (env("UNWOUND_EXPORT_SECONDS", "10"), env("UNWOUND_EXPORT_EVERY", "2"));
    let intervals = (seconds.parse::<f64>().unwrap() / every.parse::<f64>().unwrap()) as usize;
    let run = unwound(&[
        "record",
        "--pid",
        &pid,
        "--every",
        &every,
        "--duration",
        &seconds,
        "--output",
        &out,
        "--pyroscope",
        &p_url,
        "--otlp",
        &o_url,
        "--label",
        "env=prod",
        "--tenant",
        "t1",
    ]);
    assert!(run.status.success(), "{}", run.stderr);
    let local = local_profiles(tmp.path());
    assert!(local.len() >= intervals, "{} local profiles:\n{}", local.len(), run.stderr);
    eprintln!("{} intervals, each pushed to both backends and compared", local.len());
    assert!(local.values().any(|s| s.keys().any(|(_, stack)| stack.iter().any(|f| f == "c_chain_c"))));

    // Pyroscope: one push per interval, accepted, labelled, read by Go, same stacks.
    let pushes = pyroscope.taken();
    assert_eq!(pushes.len(), local.len(), "{}", run.stderr);
    let mut pushed = BTreeMap::new();
    for (req, status) in &pushes {
        assert_eq!(*status, 200, "refused: {}", pyroscope_handler(req).body);
        assert_eq!(req.headers.get("x-scope-orgid").map(String::as_str), Some("t1"));
        let series = check_push(req).unwrap();
        assert_eq!(series.len(), 1, "one service (the fixture's)");
        let labels: HashMap<_, _> = series[0].labels.iter().cloned().collect();
        assert_eq!(labels.get("env").map(String::as_str), Some("prod"));
        assert_eq!(labels.get("__name__").map(String::as_str), Some("process_cpu"));
        assert!(labels.contains_key("service_name") && labels.contains_key("host_name"), "{labels:?}");
        let mut stacks = Stacks::new();
        let mut time = 0;
        for raw in &series[0].profiles {
            go_pprof_raw(raw, tmp.path()).unwrap();
            let (t, s, _) = pprof_stacks(raw);
            time = t;
            for (k, v) in s {
                *stacks.entry(k).or_default() += v;
            }
        }
        pushed.insert(time, stacks);
    }
    assert_eq!(pushed, local, "Pyroscope's stacks differ from the local profiles'");

    // OTLP: one export per interval, accepted by the checker, same stacks and labels.
    let exports = otlp.taken();
    assert_eq!(exports.len(), local.len());
    let mut exported = BTreeMap::new();
    for (req, status) in &exports {
        let summary = otlp_check(&python, &req.body, tmp.path());
        assert_eq!(*status, 200, "{summary:?}");
        let summary = summary.unwrap();
        let samples: Vec<serde_json::Value> = serde_json::from_str(&summary).unwrap();
        let mut stacks = Stacks::new();
        let mut time = 0;
        for s in samples {
            assert_eq!(s["attributes"]["env"], "prod");
            assert_eq!(s["attributes"]["process.pid"].as_i64(), Some(f.pid() as i64));
            assert!(s["host"].is_string() && s["service"].is_string());
            time = s["time_unix_nano"].as_i64().unwrap();
            let stack =
                s["stack"].as_array().unwrap().iter().map(|f| f.as_str().unwrap().to_string()).collect();
            let thread = s["attributes"]["thread.name"].as_str().unwrap().to_string();
            *stacks.entry((thread, stack)).or_default() += s["values"][0].as_i64().unwrap();
        }
        exported.insert(time, stacks);
    }
    assert_eq!(exported, local, "OTLP's stacks differ from the local profiles'");
    let summary = format!("export to pyroscope {p_url}: ");
    let line = run.stderr.lines().find(|l| l.contains(&summary)).unwrap_or_else(|| panic!("{}", run.stderr));
    assert!(line.contains(&format!("{} requests sent", local.len())) && !line.contains("dropped"), "{line}");
}

#[test]
fn a_dead_backend_is_one_line_the_run_goes_on_and_profiles_are_spooled() {
    let Some((_guard, dir)) = bpf_fixture_test("export_dead_backend") else { return };
    let tmp = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let f = start(&dir, "chain_fp", &[]);
    settle(100);
    let pid = f.pid().to_string();
    let out = tmp.path().join("cpu.folded").display().to_string();
    let spool = tmp.path().join("spool").display().to_string();
    let url = format!("http://127.0.0.1:{port}");
    let run = unwound(&[
        "record",
        "--pid",
        &pid,
        "--every",
        "1",
        "--duration",
        "3",
        "--output",
        &out,
        "--pyroscope",
        &url,
        "--spool-dir",
        &spool,
    ]);
    assert!(run.status.success(), "{}", run.stderr);
    let warnings: Vec<&str> = run.stderr.lines().filter(|l| l.starts_with("warning: export to")).collect();
    assert_eq!(warnings.len(), 1, "{}", run.stderr);
    assert!(warnings[0].contains("keeping profiles in the spool"), "{}", warnings[0]);
    let spooled = std::fs::read_dir(tmp.path().join("spool/pyroscope")).unwrap().count();
    assert!(spooled >= 3, "{spooled} spooled:\n{}", run.stderr);
    assert!(run.stderr.contains(&format!("{spooled} spooled")), "{}", run.stderr);
}

#[test]
fn bad_export_flags_are_one_clear_line() {
    for (args, want) in [
        (vec!["--pyroscope", "localhost:4040"], "bad URL"),
        (vec!["--otlp", "ftp://x"], "expected http:// or https://"),
        (vec!["--label", "env"], "expected KEY=VALUE"),
        (vec!["--label", "pid=3"], "sets this key itself"),
        (vec!["--ca-file", "/nonexistent.pem"], "cannot use CA file"),
        (vec!["--auth-token-file", "/nonexistent"], "cannot read /nonexistent"),
        (vec!["--pyroscope-ingest"], "--pyroscope <URL>"),
    ] {
        let mut full = vec!["record", "--output", "/tmp/x.folded"];
        full.extend(args.iter().copied());
        let run = unwound(&full);
        assert_eq!(run.status.code(), Some(2), "{full:?}: {}", run.stderr);
        assert!(run.stderr.contains(want), "{full:?}: {}", run.stderr);
    }
}
