//! Test doubles of the backends, on loopback servers the tests start: an HTTP/1.1 (and
//! HTTPS) server that records requests, a Pyroscope push/ingest validator decoding with
//! Grafana's own generated types, and the OTLP checker in Python over the official
//! `opentelemetry-proto` types. Shared with the agent's end-to-end test.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use pyroscope::encode::gen::{google, push};

/// One request as the server read it.
#[derive(Clone, Debug)]
pub struct Request {
    pub method: String,
    pub target: String,
    /// Header names lower-cased.
    pub headers: HashMap<String, String>,
    pub body: Vec<u8>,
}

impl Request {
    pub fn path(&self) -> &str {
        self.target.split('?').next().unwrap_or("")
    }
    pub fn query(&self) -> HashMap<String, String> {
        let q = self.target.split_once('?').map_or("", |(_, q)| q);
        q.split('&')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_string(), percent_decode(v)))
            .collect()
    }
    /// The body with any `Content-Encoding: gzip` undone.
    pub fn decoded_body(&self) -> Vec<u8> {
        if self.headers.get("content-encoding").map(String::as_str) == Some("gzip") {
            gunzip(&self.body)
        } else {
            self.body.clone()
        }
    }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            out.push(u8::from_str_radix(&s[i + 1..i + 3], 16).unwrap());
            i += 3;
        } else if b[i] == b'+' {
            out.push(b' ');
            i += 1;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).unwrap()
}

pub fn gunzip(b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(b).read_to_end(&mut out).expect("valid gzip");
    out
}

/// An answer: status, extra headers, body.
#[derive(Clone, Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Reply {
    pub fn ok(body: &str) -> Reply {
        Reply { status: 200, headers: vec![], body: body.into() }
    }
    pub fn status(status: u16, body: &str) -> Reply {
        Reply { status, headers: vec![], body: body.into() }
    }
}

type Handler = dyn Fn(&Request) -> Reply + Send + Sync;

/// An HTTP/1.1 server on 127.0.0.1 that answers with `handler` and records every request.
pub struct HttpDouble {
    pub port: u16,
    pub requests: Arc<Mutex<Vec<(Request, u16)>>>,
    tls: bool,
}

impl HttpDouble {
    pub fn start(handler: impl Fn(&Request) -> Reply + Send + Sync + 'static) -> HttpDouble {
        Self::start_inner(Arc::new(handler), None)
    }

    /// HTTPS with the certificate and key (PEM files).
    pub fn start_tls(
        cert: &Path,
        key: &Path,
        handler: impl Fn(&Request) -> Reply + Send + Sync + 'static,
    ) -> HttpDouble {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let certs: Vec<CertificateDer<'static>> =
            CertificateDer::pem_file_iter(cert).unwrap().map(|c| c.unwrap()).collect();
        let key = PrivateKeyDer::from_pem_file(key).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .unwrap();
        Self::start_inner(Arc::new(handler), Some(Arc::new(config)))
    }

    fn start_inner(handler: Arc<Handler>, tls: Option<Arc<rustls::ServerConfig>>) -> HttpDouble {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let requests: Arc<Mutex<Vec<(Request, u16)>>> = Arc::default();
        let recorded = Arc::clone(&requests);
        let is_tls = tls.is_some();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                conn.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                let (handler, recorded, tls) = (Arc::clone(&handler), Arc::clone(&recorded), tls.clone());
                std::thread::spawn(move || match tls {
                    Some(config) => {
                        let Ok(session) = rustls::ServerConnection::new(config) else { return };
                        serve(rustls::StreamOwned::new(session, conn), &*handler, &recorded);
                    }
                    None => serve(conn, &*handler, &recorded),
                });
            }
        });
        HttpDouble { port, requests, tls: is_tls }
    }

    pub fn url(&self) -> String {
        format!("{}://127.0.0.1:{}", if self.tls { "https" } else { "http" }, self.port)
    }

    pub fn taken(&self) -> Vec<(Request, u16)> {
        self.requests.lock().unwrap().clone()
    }
}

fn serve<S: Read + Write>(stream: S, handler: &Handler, recorded: &Mutex<Vec<(Request, u16)>>) {
    let mut reader = BufReader::new(stream);
    loop {
        let mut line = String::new();
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let mut parts = line.split_whitespace();
        let (Some(method), Some(target)) = (parts.next(), parts.next()) else { return };
        let (method, target) = (method.to_string(), target.to_string());
        let mut headers = HashMap::new();
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h).unwrap_or(0) == 0 {
                return;
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
            }
        }
        let mut body = Vec::new();
        if headers.get("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
            loop {
                let mut size = String::new();
                reader.read_line(&mut size).unwrap();
                let n = usize::from_str_radix(size.trim(), 16).unwrap();
                let mut chunk = vec![0; n + 2];
                reader.read_exact(&mut chunk).unwrap();
                if n == 0 {
                    break;
                }
                body.extend_from_slice(&chunk[..n]);
            }
        } else {
            let n: usize = headers.get("content-length").and_then(|v| v.parse().ok()).unwrap_or(0);
            body.resize(n, 0);
            if reader.read_exact(&mut body).is_err() {
                return;
            }
        }
        let request = Request { method, target, headers, body };
        let reply = handler(&request);
        recorded.lock().unwrap().push((request, reply.status));
        let mut out = format!("HTTP/1.1 {} X\r\nContent-Length: {}\r\n", reply.status, reply.body.len());
        for (k, v) in &reply.headers {
            out.push_str(&format!("{k}: {v}\r\n"));
        }
        out.push_str("\r\n");
        out.push_str(&reply.body);
        let s = reader.get_mut();
        if s.write_all(out.as_bytes()).and_then(|()| s.flush()).is_err() {
            return;
        }
    }
}

fn now_ns() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos() as i64
}

/// One decoded sample: stack (root first), values, text labels, number labels.
pub type PprofSample = (Vec<String>, Vec<i64>, HashMap<String, String>, HashMap<String, i64>);

/// A pprof decoded with Grafana's generated types, its stacks as `[root…leaf]` function
/// names with the sample's values and string labels.
#[derive(Clone, Debug)]
pub struct DecodedPprof {
    pub profile: google::Profile,
}

impl DecodedPprof {
    pub fn decode(raw: &[u8]) -> Result<DecodedPprof, String> {
        use prost::Message as _;
        let bytes = if raw.starts_with(&[0x1f, 0x8b]) { gunzip(raw) } else { raw.to_vec() };
        let profile = google::Profile::decode(&bytes[..]).map_err(|e| format!("pprof: {e}"))?;
        Ok(DecodedPprof { profile })
    }

    pub fn string(&self, i: i64) -> &str {
        &self.profile.string_table[i as usize]
    }

    /// Per sample: the stack (root first, every function of each location, inlined ones
    /// after their container), values, string labels, numeric labels.
    pub fn samples(&self) -> Vec<PprofSample> {
        let p = &self.profile;
        let loc: HashMap<u64, &google::Location> = p.location.iter().map(|l| (l.id, l)).collect();
        let fun: HashMap<u64, &google::Function> = p.function.iter().map(|f| (f.id, f)).collect();
        p.sample
            .iter()
            .map(|s| {
                let mut stack = Vec::new();
                for id in s.location_id.iter().rev() {
                    for line in loc[id].line.iter().rev() {
                        stack.push(self.string(fun[&line.function_id].name).to_string());
                    }
                }
                let mut strs = HashMap::new();
                let mut nums = HashMap::new();
                for l in &s.label {
                    if l.str != 0 {
                        strs.insert(self.string(l.key).to_string(), self.string(l.str).to_string());
                    } else {
                        nums.insert(self.string(l.key).to_string(), l.num);
                    }
                }
                (stack, s.value.clone(), strs, nums)
            })
            .collect()
    }
}

/// Checks one series' labels as Pyroscope's distributor does (validate.go's rules with the
/// default limits).
pub fn check_series_labels(labels: &[pyroscope::encode::gen::types::LabelPair]) -> Result<(), String> {
    let valid_name = |n: &str| {
        let mut c = n.chars();
        matches!(c.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
            && c.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.')
    };
    if labels.len() > 30 {
        return Err(format!("{} labels, more than 30", labels.len()));
    }
    let mut seen = std::collections::HashSet::new();
    for l in labels {
        if !seen.insert(&l.name) {
            return Err(format!("duplicate label {}", l.name));
        }
        if l.name.len() > 1024 || l.value.len() > 2048 {
            return Err(format!("label {} too long", l.name));
        }
        if !valid_name(&l.name) {
            return Err(format!("invalid label name {:?}", l.name));
        }
        if l.value.is_empty() {
            return Err(format!("label {} has an empty value", l.name));
        }
    }
    let get = |n: &str| labels.iter().find(|l| l.name == n).map(|l| l.value.as_str());
    if get("service_name").is_none() {
        return Err("service_name missing".into());
    }
    match get("__name__") {
        Some(n) if valid_name(n) => Ok(()),
        _ => Err("__name__ missing or invalid".into()),
    }
}

/// Checks one pprof as Pyroscope does (sample count, size, time window) and decodes it.
pub fn check_pprof(raw: &[u8]) -> Result<DecodedPprof, String> {
    let bytes = if raw.starts_with(&[0x1f, 0x8b]) { gunzip(raw) } else { raw.to_vec() };
    if bytes.len() > 4 << 20 {
        return Err(format!("profile of {} bytes, more than 4 MiB", bytes.len()));
    }
    let p = DecodedPprof::decode(&bytes)?;
    if p.profile.sample.len() > 16_000 {
        return Err(format!("{} samples, more than 16000", p.profile.sample.len()));
    }
    let t = p.profile.time_nanos;
    if t != 0 && (t < now_ns() - 3_600_000_000_000 || t > now_ns() + 600_000_000_000) {
        return Err(format!("profile time {t} outside the ingestion window"));
    }
    if p.profile.string_table.first().map(String::as_str) != Some("") {
        return Err("string_table[0] is not empty".into());
    }
    Ok(p)
}

/// What the Pyroscope double took: each accepted series' labels and pprofs.
#[derive(Clone, Debug, Default)]
pub struct PyroscopeSeries {
    pub labels: Vec<(String, String)>,
    pub profiles: Vec<Vec<u8>>,
}

/// Validates a Push request as Pyroscope would; the Connect error JSON on a violation.
pub fn check_push(r: &Request) -> Result<Vec<PyroscopeSeries>, String> {
    use prost::Message as _;
    if r.method != "POST" || r.path() != "/push.v1.PusherService/Push" {
        return Err(format!("{} {} is not the push route", r.method, r.target));
    }
    match r.headers.get("content-type").map(String::as_str) {
        Some("application/proto") => {}
        other => return Err(format!("content type {other:?}")),
    }
    let req = push::PushRequest::decode(&r.decoded_body()[..]).map_err(|e| format!("PushRequest: {e}"))?;
    if req.series.is_empty() {
        return Err("no series".into());
    }
    let mut out = Vec::new();
    for s in &req.series {
        check_series_labels(&s.labels)?;
        let mut series = PyroscopeSeries {
            labels: s.labels.iter().map(|l| (l.name.clone(), l.value.clone())).collect(),
            profiles: vec![],
        };
        for sample in &s.samples {
            if uuid_like(&sample.id).is_err() {
                return Err(format!("sample id {:?} is not a UUID", sample.id));
            }
            check_pprof(&sample.raw_profile)?;
            series.profiles.push(sample.raw_profile.clone());
        }
        out.push(series);
    }
    Ok(out)
}

fn uuid_like(s: &str) -> Result<(), ()> {
    let groups: Vec<&str> = s.split('-').collect();
    let lens: Vec<usize> = groups.iter().map(|g| g.len()).collect();
    if lens == [8, 4, 4, 4, 12] && s.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
        Ok(())
    } else {
        Err(())
    }
}

/// A Pyroscope double: validates push (and `/ingest?format=pprof`) requests, answers 200
/// or Connect's `invalid_argument` as a 400, and records what it took.
pub fn pyroscope_handler(r: &Request) -> Reply {
    let result = if r.path() == "/ingest" { check_ingest(r).map(|_| ()) } else { check_push(r).map(|_| ()) };
    match result {
        Ok(()) => Reply::ok("{}"),
        Err(e) => Reply {
            status: 400,
            headers: vec![("Content-Type".into(), "application/json".into())],
            body: format!("{{\"code\":\"invalid_argument\",\"message\":{e:?}}}"),
        },
    }
}

/// Validates an `/ingest?format=pprof` request; returns the series name and the pprof.
pub fn check_ingest(r: &Request) -> Result<(String, DecodedPprof), String> {
    let q = r.query();
    if q.get("format").map(String::as_str) != Some("pprof") {
        return Err("format is not pprof".into());
    }
    let name = q.get("name").cloned().ok_or("no name")?;
    for k in ["from", "until"] {
        q.get(k).and_then(|v| v.parse::<i64>().ok()).ok_or(format!("{k} is not unix seconds"))?;
    }
    Ok((name, check_pprof(&r.body)?))
}

/// `go tool pprof -raw` of a pprof (gzipped or not): Go's own reader.
pub fn go_pprof_raw(raw: &[u8], dir: &Path) -> Result<String, String> {
    let path = dir.join(format!("p-{}.pb", now_ns()));
    std::fs::write(&path, raw).unwrap();
    let out = Command::new("go")
        .args(["tool", "pprof", "-raw"])
        .arg(&path)
        .env("HOME", dir)
        .env("PPROF_TMPDIR", dir)
        .output()
        .map_err(|e| format!("go tool pprof (Debian golang-go): {e}"))?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The Python with PyPI's `opentelemetry-proto` (scripts/setup.sh installs it), or `None`
/// when it is missing (a failure under CI).
pub fn otlp_python(test: &str) -> Option<PathBuf> {
    let path = std::env::var_os("UNWOUND_OTLP_PYTHON").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
            .join(".cache/unwound/otlp-venv/bin/python")
    });
    let ok = Command::new(&path)
        .args(["-c", "import opentelemetry.proto.profiles.v1development.profiles_pb2"])
        .output()
        .is_ok_and(|o| o.status.success());
    if ok {
        return Some(path);
    }
    let msg =
        format!("{test}: no Python with opentelemetry-proto at {} (run scripts/setup.sh)", path.display());
    if std::env::var_os("CI").is_some() {
        panic!("{msg}");
    }
    eprintln!("skipped: {msg}");
    None
}

/// The checker script, from this crate's tests or the agent's (which share this file).
pub fn otlp_checker_script() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let here = dir.join("tests/otlp_check.py");
    if here.exists() {
        here
    } else {
        dir.join("export/tests/otlp_check.py")
    }
}

/// Runs the OTLP checker on a request body: `Ok(summary JSON)` or `Err(the rules broken)`.
pub fn otlp_check(python: &Path, body: &[u8], dir: &Path) -> Result<String, String> {
    let path = dir.join(format!("otlp-{}.bin", now_ns()));
    std::fs::write(&path, body).unwrap();
    let out = Command::new(python).arg(otlp_checker_script()).arg("check").arg(&path).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.success() {
        Ok(text)
    } else {
        Err(format!("{text}{}", String::from_utf8_lossy(&out.stderr)))
    }
}

/// An OTLP double: runs the checker on every `/v1development/profiles` body, answering
/// 200 or 400 with the rules broken.
pub fn otlp_handler(python: PathBuf, dir: PathBuf) -> impl Fn(&Request) -> Reply + Send + Sync + 'static {
    move |r: &Request| {
        if r.method != "POST" || r.path() != "/v1development/profiles" {
            return Reply::status(404, "not found");
        }
        if r.headers.get("content-type").map(String::as_str) != Some("application/x-protobuf") {
            return Reply::status(415, "unsupported media type");
        }
        match otlp_check(&python, &r.decoded_body(), &dir) {
            Ok(_) => Reply {
                status: 200,
                headers: vec![("Content-Type".into(), "application/x-protobuf".into())],
                body: String::new(),
            },
            Err(e) => Reply::status(400, &e),
        }
    }
}

/// A CA made with `openssl` and a server certificate for 127.0.0.1 signed by it:
/// (CA certificate, server certificate, server key).
pub fn ca_and_server_cert(dir: &Path, name: &str) -> (PathBuf, PathBuf, PathBuf) {
    let p = |ext: &str| dir.join(format!("{name}.{ext}"));
    let openssl = |args: &[&str]| {
        let out = Command::new("openssl").args(args).current_dir(dir).output().expect("openssl");
        assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    let s = |p: PathBuf| p.display().to_string();
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-days",
        "1",
        "-subj",
        &format!("/CN={name} test CA"),
        "-keyout",
        &s(p("ca.key")),
        "-out",
        &s(p("ca.crt")),
    ]);
    openssl(&[
        "req",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-subj",
        "/CN=127.0.0.1",
        "-keyout",
        &s(p("key")),
        "-out",
        &s(p("csr")),
    ]);
    std::fs::write(p("ext"), "basicConstraints=CA:FALSE\nsubjectAltName=IP:127.0.0.1\n").unwrap();
    openssl(&[
        "x509",
        "-req",
        "-in",
        &s(p("csr")),
        "-CA",
        &s(p("ca.crt")),
        "-CAkey",
        &s(p("ca.key")),
        "-CAcreateserial",
        "-days",
        "1",
        "-extfile",
        &s(p("ext")),
        "-out",
        &s(p("crt")),
    ]);
    (p("ca.crt"), p("crt"), p("key"))
}
