//! What the backends take: every request decoded by the backends' own generated types
//! (Grafana's `pyroscope` crate, PyPI's `opentelemetry-proto`) and Go's pprof reader, on
//! loopback doubles that are first calibrated against what those projects' own code sends;
//! then the transport's failure paths.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::*;
use unwound_export::{
    Auth, Backend, BaseUrl, DropReason, ExportOptions, Exporter, Frame, LabelValue, ProcessInfo, Profile,
    Protocol, RunLabels, Sample, SourceLine, SpoolOptions, TransportOptions,
};

fn now_ns() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos() as i64
}

fn frame(name: &str, module: &str, address: u64) -> Frame {
    Frame { function: name.into(), module: module.into(), address, kernel: false, lines: vec![] }
}

fn run_labels() -> RunLabels {
    RunLabels { host_name: "host-a".into(), service_name: None, user: vec![("env".into(), "prod".into())] }
}

/// Two services (a systemd unit, a docker container), three stacks, one with inlined
/// frames and a kernel frame.
fn two_service_profile(start_unix_ns: i64) -> Profile {
    let run = run_labels();
    let web =
        ProcessInfo { pid: 100, name: "nginx".into(), cgroup: Some("/system.slice/nginx.service".into()) };
    let db = ProcessInfo {
        pid: 200,
        name: "postgres".into(),
        cgroup: Some(format!("/system.slice/docker-{}.scope", "ab".repeat(32))),
    };
    let web_main = Arc::new(run.sample_labels(&web, "nginx"));
    let web_worker = Arc::new(run.sample_labels(&web, "worker 1"));
    let db_main = Arc::new(run.sample_labels(&db, "postgres"));
    let mut inlined = frame("handle", "/usr/sbin/nginx", 0x2000);
    inlined.lines = vec![
        SourceLine { function: "parse_inl".into(), file: "p.c".into(), line: 7 },
        SourceLine { function: "handle".into(), file: "h.c".into(), line: 30 },
    ];
    let mut kernel = frame("do_syscall_64", "[kernel.kallsyms]", 0xffff_ffff_8100_0000);
    kernel.kernel = true;
    Profile {
        start_unix_ns,
        duration_ns: 10_000_000_000,
        frequency_hz: 99,
        samples: vec![
            Sample {
                frames: vec![frame("main", "/usr/sbin/nginx", 0x1000), inlined, kernel],
                count: 7,
                labels: Arc::clone(&web_main),
            },
            Sample { frames: vec![frame("main", "/usr/sbin/nginx", 0x1000)], count: 3, labels: web_worker },
            Sample {
                frames: vec![
                    frame("main", "/usr/lib/postgres", 0x10),
                    frame("scan", "/usr/lib/postgres", 0x20),
                ],
                count: 5,
                labels: db_main,
            },
        ],
    }
}

/// The input's stacks as the reader should see them: (service, thread, stack names root
/// first with inlined functions after their container and `_[k]` on kernel ones) → count.
fn expected_stacks(p: &Profile) -> BTreeMap<(String, String, Vec<String>), i64> {
    let mut m = BTreeMap::new();
    for s in &p.samples {
        let mut names = Vec::new();
        for f in &s.frames {
            let k = if f.kernel { "_[k]" } else { "" };
            names.push(format!("{}{k}", f.function));
            for l in f.lines.iter().rev().skip(1) {
                names.push(l.function.clone());
            }
        }
        let thread = s.labels.get_str("thread_name").unwrap().to_string();
        *m.entry((s.labels.service_name().to_string(), thread, names)).or_default() += s.count as i64;
    }
    m
}

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

#[test]
fn pyroscope_double_takes_grafanas_own_client_and_refuses_what_pyroscope_refuses() {
    use prost::Message as _;
    use pyroscope::backend::{BackendConfig, Report, ReportBatch, ReportData, StackFrame, StackTrace};
    use pyroscope::encode::gen::{google, push, types::LabelPair};
    use pyroscope::pyroscope::PyroscopeConfig;
    use pyroscope::session::{Session, SessionManager, SessionSignal};

    let double = HttpDouble::start(pyroscope_handler);
    // Grafana's client, as an application would use it.
    let config = PyroscopeConfig {
        url: double.url(),
        application_name: "calibration".into(),
        tenant_id: Some("t1".into()),
        ..Default::default()
    };
    let frames = vec![
        StackFrame::new(Some("m".into()), Some("leaf".into()), None, None, None, Some(1)),
        StackFrame::new(Some("m".into()), Some("root".into()), None, None, None, Some(2)),
    ];
    let trace = StackTrace::new(&BackendConfig::default(), Some(1), None, Some("main".into()), frames);
    let report = Report::new(HashMap::from([(trace, 4usize)]));
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();
    let batch = ReportBatch { profile_type: "process_cpu".into(), data: ReportData::Reports(vec![report]) };
    let manager = SessionManager::new().unwrap();
    manager.push(SessionSignal::Session(Box::new(Session::new(now, config, batch).unwrap()))).unwrap();
    manager.push(SessionSignal::Kill).unwrap();
    manager.handle.unwrap().join().unwrap().unwrap();
    let taken = double.taken();
    assert_eq!(taken.len(), 1, "{taken:?}");
    let (req, status) = &taken[0];
    assert_eq!(*status, 200, "Grafana's client was refused: {:?}", pyroscope_handler(req).body);
    assert_eq!(req.headers.get("x-scope-orgid").map(String::as_str), Some("t1"));
    let series = check_push(req).unwrap();
    let d = check_pprof(&series[0].profiles[0]).unwrap();
    // Their pprof holds CPU time: 4 samples at their default 100 Hz are 4 × 10 ms.
    let stacks: Vec<_> = d.samples().into_iter().map(|(s, v, _, _)| (s, v[0])).collect();
    assert_eq!(stacks, vec![(vec!["root".to_string(), "leaf".to_string()], 4 * 10_000_000)]);

    // What Pyroscope refuses, built with its own types: each gets a 400.
    let pprof_at = |t: i64, samples: usize| {
        let mut p = google::Profile {
            string_table: vec!["".into(), "f".into()],
            time_nanos: t,
            ..Default::default()
        };
        p.function.push(google::Function { id: 1, name: 1, ..Default::default() });
        p.location.push(google::Location {
            id: 1,
            line: vec![google::Line { function_id: 1, ..Default::default() }],
            ..Default::default()
        });
        for _ in 0..samples {
            p.sample.push(google::Sample { location_id: vec![1], value: vec![1], ..Default::default() });
        }
        p.encode_to_vec()
    };
    let lp = |n: &str, v: &str| LabelPair { name: n.into(), value: v.into() };
    let good_labels = vec![lp("__name__", "process_cpu"), lp("service_name", "s")];
    let request = |labels: Vec<LabelPair>, raw: Vec<u8>| Request {
        method: "POST".into(),
        target: "/push.v1.PusherService/Push".into(),
        headers: HashMap::from([("content-type".into(), "application/proto".into())]),
        body: push::PushRequest {
            series: vec![push::RawProfileSeries {
                labels,
                samples: vec![push::RawSample { raw_profile: raw, id: uuid::Uuid::new_v4().to_string() }],
            }],
        }
        .encode_to_vec(),
    };
    assert_eq!(pyroscope_handler(&request(good_labels.clone(), pprof_at(now_ns(), 1))).status, 200);
    for (what, req) in [
        ("no service_name", request(vec![lp("__name__", "process_cpu")], pprof_at(now_ns(), 1))),
        (
            "duplicate label",
            request([good_labels.clone(), vec![lp("service_name", "x")]].concat(), pprof_at(now_ns(), 1)),
        ),
        ("16001 samples", request(good_labels.clone(), pprof_at(now_ns(), 16_001))),
        ("2 h old", request(good_labels.clone(), pprof_at(now_ns() - 7_200_000_000_000, 1))),
    ] {
        let reply = pyroscope_handler(&req);
        assert_eq!(reply.status, 400, "{what} was accepted");
        assert!(reply.body.contains("invalid_argument"), "{what}: {}", reply.body);
    }
}

#[test]
fn push_carries_every_stack_with_its_labels_one_series_per_service() {
    let dir = tmp();
    let profile = two_service_profile(now_ns() - 10_000_000_000);
    let body = unwound_export::pyroscope::push_body(&profile, &run_labels());
    let req = Request {
        method: "POST".into(),
        target: "/push.v1.PusherService/Push".into(),
        headers: HashMap::from([("content-type".into(), "application/proto".into())]),
        body,
    };
    let series = check_push(&req).unwrap();
    let services: Vec<String> = series
        .iter()
        .map(|s| s.labels.iter().find(|(k, _)| k == "service_name").unwrap().1.clone())
        .collect();
    assert_eq!(services, vec!["container/abababababab".to_string(), "nginx".to_string()]);
    let mut got = BTreeMap::new();
    for (s, service) in series.iter().zip(&services) {
        let labels: HashMap<_, _> = s.labels.iter().cloned().collect();
        assert_eq!(labels.get("__name__").map(String::as_str), Some("process_cpu"));
        assert_eq!(labels.get("host_name").map(String::as_str), Some("host-a"));
        assert_eq!(labels.get("env").map(String::as_str), Some("prod"));
        for raw in &s.profiles {
            // Go's own reader takes it.
            let text = go_pprof_raw(raw, dir.path()).unwrap();
            assert!(text.contains("samples/count cpu/nanoseconds"), "{text}");
            let d = check_pprof(raw).unwrap();
            for (stack, values, strs, nums) in d.samples() {
                assert_eq!(values[1], values[0] * (1_000_000_000 / 99), "cpu ns = count × period");
                assert!(nums.contains_key("pid"), "{nums:?}");
                assert!(strs.contains_key("process_name") && !strs.contains_key("service_name"), "{strs:?}");
                *got.entry((service.clone(), strs["thread_name"].clone(), stack)).or_default() += values[0];
            }
        }
    }
    assert_eq!(got, expected_stacks(&profile));
}

#[test]
fn push_parts_stay_within_pyroscopes_limits() {
    let mut profile = two_service_profile(now_ns());
    let labels = Arc::clone(&profile.samples[0].labels);
    profile.samples = (0..40_000u64)
        .map(|i| Sample {
            frames: vec![frame(&format!("f{i}"), "/bin/x", i)],
            count: i % 3 + 1,
            labels: Arc::clone(&labels),
        })
        .collect();
    let want = profile.total_count() as i64;
    let req = Request {
        method: "POST".into(),
        target: "/push.v1.PusherService/Push".into(),
        headers: HashMap::from([("content-type".into(), "application/proto".into())]),
        body: unwound_export::pyroscope::push_body(&profile, &run_labels()),
    };
    let series = check_push(&req).unwrap();
    assert_eq!(series.len(), 1);
    assert_eq!(series[0].profiles.len(), 3);
    let total: i64 = series[0]
        .profiles
        .iter()
        .flat_map(|p| check_pprof(p).unwrap().samples())
        .map(|(_, v, _, _)| v[0])
        .sum();
    assert_eq!(total, want);
}

#[test]
fn ingest_requests_are_read_by_the_ingest_double_and_go() {
    let dir = tmp();
    let profile = two_service_profile(now_ns());
    let reqs = unwound_export::pyroscope::ingest_requests(&profile, &run_labels());
    assert_eq!(reqs.len(), 2);
    let mut names = Vec::new();
    for (target, body) in reqs {
        let r = Request { method: "POST".into(), target, headers: HashMap::new(), body };
        let (name, d) = check_ingest(&r).unwrap();
        assert!(!d.samples().is_empty());
        go_pprof_raw(&r.body, dir.path()).unwrap();
        names.push(name);
    }
    assert_eq!(
        names,
        ["container/abababababab{env=prod,host_name=host-a}", "nginx{env=prod,host_name=host-a}"]
    );
}

#[test]
fn otlp_checker_takes_the_official_types_and_refuses_broken_copies() {
    let Some(python) = otlp_python("otlp_checker_calibration") else { return };
    let dir = tmp();
    let script = otlp_checker_script();
    let reference = dir.path().join("ref.bin");
    let run = |args: &[&std::ffi::OsStr]| {
        let o = std::process::Command::new(&python).arg(&script).args(args).output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    };
    run(&["reference".as_ref(), reference.as_os_str()]);
    let body = std::fs::read(&reference).unwrap();
    let summary = otlp_check(&python, &body, dir.path()).unwrap();
    assert!(summary.contains(r#""stack": ["main", "work"]"#), "{summary}");
    for (kind, broken) in [
        ("index_out_of_range", "out of range"),
        ("nonempty_string0", "string_table[0]"),
        ("missing_zero_entry", "function_table[0] is not the zero value"),
    ] {
        let out = dir.path().join(kind);
        run(&["mutate".as_ref(), reference.as_os_str(), kind.as_ref(), out.as_os_str()]);
        let err = otlp_check(&python, &std::fs::read(&out).unwrap(), dir.path()).unwrap_err();
        assert!(err.contains(broken), "{kind}: {err}");
    }
}

#[test]
fn otlp_export_follows_the_dictionary_rules_and_carries_every_stack() {
    let Some(python) = otlp_python("otlp_export") else { return };
    let dir = tmp();
    let profile = two_service_profile(now_ns());
    let body = unwound_export::otlp::export_body(&profile, &run_labels());
    let summary = otlp_check(&python, &body, dir.path()).unwrap();
    let mut got = BTreeMap::new();
    let samples: Vec<serde_json::Value> = serde_json::from_str(&summary).unwrap();
    assert_eq!(samples.len(), profile.samples.len());
    for s in samples {
        assert_eq!(s["host"], "host-a");
        assert_eq!(s["sample_type"], serde_json::json!(["samples", "count"]));
        assert_eq!(s["period"], 1_000_000_000 / 99);
        let attrs = &s["attributes"];
        assert_eq!(attrs["env"], "prod");
        assert!(attrs["process.pid"].is_string() || attrs["process.pid"].is_i64(), "{attrs}");
        let stack: Vec<String> =
            s["stack"].as_array().unwrap().iter().map(|f| f.as_str().unwrap().to_string()).collect();
        let key = (
            s["service"].as_str().unwrap().to_string(),
            attrs["thread.name"].as_str().unwrap().to_string(),
            stack,
        );
        *got.entry(key).or_default() += s["values"][0].as_i64().unwrap();
    }
    assert_eq!(got, expected_stacks(&profile));
}

fn exporter(
    protocol: Protocol,
    url: &str,
    transport: TransportOptions,
    spool: Option<SpoolOptions>,
) -> Exporter {
    let options = ExportOptions { backoff: Duration::from_millis(100), spool, ..Default::default() };
    let backend = Backend { protocol, url: BaseUrl::parse(url).unwrap(), transport };
    Exporter::start(vec![backend], run_labels(), options).unwrap()
}

fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let end = Instant::now() + Duration::from_secs(20);
    while !done() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn credentials_and_tenant_reach_the_server() {
    let double = HttpDouble::start(pyroscope_handler);
    let mut transport = TransportOptions {
        auth: Some(Auth::bearer("tok-1\n", "test").unwrap()),
        tenant: Some("team-a".into()),
        ..Default::default()
    };
    let e = exporter(Protocol::PyroscopePush, &double.url(), transport.clone(), None);
    e.export(Arc::new(two_service_profile(now_ns())));
    let stats = e.finish(Duration::from_secs(10)).0;
    assert_eq!(stats[0].sent, 1, "{}", stats[0]);
    transport.auth = Some(Auth::basic("agent:s3cret", "test").unwrap());
    let e = exporter(Protocol::PyroscopePush, &double.url(), transport, None);
    e.export(Arc::new(two_service_profile(now_ns())));
    e.finish(Duration::from_secs(10));
    let taken = double.taken();
    let h = |i: usize, k: &str| taken[i].0.headers.get(k).cloned();
    assert_eq!(h(0, "authorization").as_deref(), Some("Bearer tok-1"));
    assert_eq!(h(1, "authorization").as_deref(), Some("Basic YWdlbnQ6czNjcmV0"));
    assert_eq!(h(0, "x-scope-orgid").as_deref(), Some("team-a"));
    assert!(taken.iter().all(|(_, s)| *s == 200));
}

#[test]
fn a_400_is_dropped_and_counted_not_retried() {
    let double = HttpDouble::start(|_: &Request| {
        Reply::status(400, "{\"code\":\"invalid_argument\",\"message\":\"no\"}")
    });
    let spool = tmp();
    let e = exporter(
        Protocol::PyroscopePush,
        &double.url(),
        TransportOptions::default(),
        Some(SpoolOptions::new(spool.path())),
    );
    e.export(Arc::new(two_service_profile(now_ns())));
    let stats = e.finish(Duration::from_secs(10)).0;
    assert_eq!(double.taken().len(), 1);
    assert_eq!(stats[0].dropped.get(&DropReason::Rejected), Some(&1));
    assert_eq!((stats[0].sent, stats[0].retries, stats[0].spooled), (0, 0, 0));
}

#[test]
fn a_429_and_503s_are_retried_with_backoff() {
    let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let c = Arc::clone(&calls);
    let double =
        HttpDouble::start(move |r: &Request| match c.fetch_add(1, std::sync::atomic::Ordering::SeqCst) {
            0 => Reply {
                status: 429,
                headers: vec![("Retry-After".into(), "1".into())],
                body: "slow down".into(),
            },
            1 => Reply::status(503, "unavailable"),
            _ => pyroscope_handler(r),
        });
    let e = exporter(Protocol::PyroscopePush, &double.url(), TransportOptions::default(), None);
    let started = Instant::now();
    e.export(Arc::new(two_service_profile(now_ns())));
    wait_for("the third request", || double.taken().len() == 3);
    let took = started.elapsed();
    let stats = e.finish(Duration::from_secs(10)).0;
    assert_eq!((stats[0].sent, stats[0].retries), (1, 2), "{}", stats[0]);
    // Retry-After: 1, then the 100 ms first backoff doubled.
    assert!(took >= Duration::from_millis(1150), "{took:?}");
    let statuses: Vec<u16> = double.taken().iter().map(|(_, s)| *s).collect();
    assert_eq!(statuses, [429, 503, 200]);
}

#[test]
fn a_dead_backend_never_blocks_and_spooled_profiles_are_sent_after_a_restart() {
    let spool = tmp();
    // A port nobody listens on: connection refused.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let url = format!("http://127.0.0.1:{port}");
    let e =
        exporter(Protocol::Otlp, &url, TransportOptions::default(), Some(SpoolOptions::new(spool.path())));
    let started = Instant::now();
    for i in 0..3 {
        e.export(Arc::new(two_service_profile(now_ns() - i)));
    }
    assert!(started.elapsed() < Duration::from_millis(50), "export waited {:?}", started.elapsed());
    wait_for("three spooled", || e.stats()[0].spooled == 3);
    let notices = e.take_notices();
    assert!(notices.iter().any(|n| n.message.contains("keeping profiles in the spool")), "{notices:?}");
    let stats = e.finish(Duration::from_secs(5)).0;
    assert_eq!((stats[0].sent, stats[0].in_spool), (0, 3), "{}", stats[0]);

    // A later run (the agent restarted) sends them once the backend answers; one spooled
    // long ago is dropped as too old.
    let mut old = SpoolOptions::new(spool.path());
    old.max_age = Duration::from_secs(3600);
    let double = HttpDouble::start(|_: &Request| Reply::ok(""));
    let e = exporter(Protocol::Otlp, &double.url(), TransportOptions::default(), Some(old));
    e.export(Arc::new(two_service_profile(now_ns() - 7_200_000_000_000)));
    wait_for("three resent", || e.stats()[0].resent == 3);
    let stats = e.finish(Duration::from_secs(5)).0;
    assert_eq!(stats[0].dropped.get(&DropReason::TooOld), Some(&1), "{}", stats[0]);
    assert_eq!((stats[0].sent, stats[0].in_spool), (3, 0));
    assert!(double.taken().iter().all(|(r, _)| r.path() == "/v1development/profiles"));
}

#[test]
fn a_full_queue_drops_and_counts_instead_of_waiting() {
    // A server that takes the connection and never answers.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let transport = TransportOptions { timeout: Duration::from_secs(2), ..Default::default() };
    let e = exporter(Protocol::PyroscopePush, &url, transport, None);
    let started = Instant::now();
    for _ in 0..10 {
        e.export(Arc::new(two_service_profile(now_ns())));
    }
    assert!(started.elapsed() < Duration::from_millis(50), "export waited {:?}", started.elapsed());
    let stats = e.stats();
    // One taken by the thread, four queued, the rest dropped.
    assert!(stats[0].dropped.get(&DropReason::QueueFull).is_some_and(|&n| n >= 5), "{}", stats[0]);
    drop(listener);
}

#[test]
fn tls_with_the_right_ca_sends_and_with_a_wrong_one_is_refused() {
    let dir = tmp();
    let (ca, cert, key) = ca_and_server_cert(dir.path(), "server");
    let (other, _, _) = ca_and_server_cert(dir.path(), "other");
    let double = HttpDouble::start_tls(&cert, &key, pyroscope_handler);
    let with_ca = |ca: &std::path::Path| TransportOptions {
        ca_certificates: Some(unwound_export::read_ca_file(ca).unwrap()),
        ..Default::default()
    };
    let e = exporter(Protocol::PyroscopePush, &double.url(), with_ca(&ca), None);
    e.export(Arc::new(two_service_profile(now_ns())));
    wait_for("the request", || e.stats()[0].sent + e.stats()[0].dropped.len() as u64 > 0);
    let notices = e.take_notices();
    let stats = e.finish(Duration::from_secs(10)).0;
    assert_eq!(stats[0].sent, 1, "{} {notices:?}", stats[0]);
    assert_eq!(double.taken().len(), 1);

    let e = exporter(Protocol::PyroscopePush, &double.url(), with_ca(&other), None);
    e.export(Arc::new(two_service_profile(now_ns())));
    wait_for("the failure", || e.stats()[0].dropped.contains_key(&DropReason::Unsent));
    let notices = e.take_notices();
    assert!(notices.iter().any(|n| n.message.to_lowercase().contains("certificate")), "{notices:?}");
    e.finish(Duration::from_secs(5));
    assert_eq!(double.taken().len(), 1, "a request got through with the wrong CA");
    // The system's roots do not know the test CA either.
    let e = exporter(Protocol::PyroscopePush, &double.url(), TransportOptions::default(), None);
    e.export(Arc::new(two_service_profile(now_ns())));
    let stats = e.finish(Duration::from_secs(10)).0;
    assert_eq!(stats[0].sent, 0);
    assert_eq!(double.taken().len(), 1);
}

#[test]
fn bad_settings_are_clear_errors() {
    let dir = tmp();
    for url in ["localhost:4040", "ftp://x", "http://", "http://h/?a=1"] {
        let e = BaseUrl::parse(url).unwrap_err().to_string();
        assert!(e.starts_with("bad URL"), "{e}");
    }
    let empty = dir.path().join("empty.pem");
    std::fs::write(&empty, "").unwrap();
    assert!(unwound_export::read_ca_file(&empty).unwrap_err().to_string().contains("no PEM certificate"));
    assert!(unwound_export::read_ca_file(&dir.path().join("missing")).is_err());
    assert!(Auth::basic("nocolon", "f").is_err() && Auth::bearer("  ", "f").is_err());
    // Sample labels: numbers stay numbers.
    let p = two_service_profile(0);
    assert_eq!(p.samples[0].labels.get("pid"), Some(&LabelValue::Num(100)));
}
