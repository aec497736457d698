//! Sending profiles from a background thread per backend: a bounded queue, retries with
//! backoff, the spool, and counts of everything sent and dropped, by reason.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::labels::RunLabels;
use crate::model::Profile;
use crate::spool::{too_old, Payload, Spool, SpoolOptions};
use crate::transport::{BaseUrl, Delivery, Transport, TransportOptions};
use crate::Error;

/// Which protocol a backend speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Protocol {
    /// Pyroscope's `push.v1.PusherService/Push`.
    PyroscopePush,
    /// Pyroscope's `/ingest?format=pprof`.
    PyroscopeIngest,
    /// OTLP profiles over HTTP (`/v1development/profiles`).
    Otlp,
}

impl Protocol {
    /// A short name (`pyroscope`, `pyroscope-ingest`, `otlp`), also the spool's folder.
    pub fn name(self) -> &'static str {
        match self {
            Protocol::PyroscopePush => "pyroscope",
            Protocol::PyroscopeIngest => "pyroscope-ingest",
            Protocol::Otlp => "otlp",
        }
    }

    /// The requests that carry `profile`: none for a profile without samples.
    fn payloads(self, profile: &Profile, run: &RunLabels) -> Vec<Payload> {
        if profile.samples.is_empty() {
            return Vec::new();
        }
        let at = profile.start_unix_ns;
        let payload = |path_and_query: String, content_type: &str, body| Payload {
            path_and_query,
            content_type: content_type.to_string(),
            body,
            profile_unix_ns: at,
        };
        match self {
            Protocol::PyroscopePush => vec![payload(
                crate::pyroscope::PUSH_PATH.to_string(),
                "application/proto",
                crate::pyroscope::push_body(profile, run),
            )],
            Protocol::PyroscopeIngest => crate::pyroscope::ingest_requests(profile, run)
                .into_iter()
                .map(|(q, body)| payload(q, "application/octet-stream", body))
                .collect(),
            Protocol::Otlp => {
                vec![payload(
                    crate::otlp::PATH.to_string(),
                    "application/x-protobuf",
                    crate::otlp::export_body(profile, run),
                )]
            }
        }
    }
}

/// One backend to send to.
#[derive(Clone, Debug)]
pub struct Backend {
    /// Its protocol.
    pub protocol: Protocol,
    /// Its URL (the paths are appended).
    pub url: BaseUrl,
    /// TLS, credentials, tenant, timeout.
    pub transport: TransportOptions,
}

/// How hard to try.
#[derive(Clone, Debug)]
pub struct ExportOptions {
    /// Profiles waiting per backend; a profile that finds the queue full is dropped.
    pub queue: usize,
    /// Retries of a request while the backend is answering (none once it is known down:
    /// the spool is retried instead).
    pub retries: u32,
    /// The first wait before a retry; doubled each time, up to `max_backoff` (a server's
    /// `Retry-After` is honoured up to `max_backoff`).
    pub backoff: Duration,
    /// The longest wait.
    pub max_backoff: Duration,
    /// Where to keep requests that could not be sent; `None`: drop them.
    pub spool: Option<SpoolOptions>,
}

impl Default for ExportOptions {
    fn default() -> Self {
        ExportOptions {
            queue: 4,
            retries: 3,
            backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(60),
            spool: None,
        }
    }
}

/// Why a profile (or one request of it) was not delivered.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DropReason {
    /// The backend answered 4xx (not 429): it will never take it.
    Rejected,
    /// Older than the spool's `max_age`.
    TooOld,
    /// Made way for newer requests in a full spool.
    SpoolFull,
    /// The backend's queue was full (it is slower than the profiles come).
    QueueFull,
    /// Could not be sent and there is no spool (or the spool could not take it).
    Unsent,
    /// A spooled file that could not be read back.
    SpoolDamaged,
}

impl DropReason {
    /// A short name for summaries.
    pub fn name(self) -> &'static str {
        match self {
            DropReason::Rejected => "rejected",
            DropReason::TooOld => "too_old",
            DropReason::SpoolFull => "spool_full",
            DropReason::QueueFull => "queue_full",
            DropReason::Unsent => "unsent",
            DropReason::SpoolDamaged => "spool_damaged",
        }
    }
}

/// What one backend's exporter did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExportStats {
    /// `protocol URL`.
    pub backend: String,
    /// Profiles handed to it.
    pub profiles: u64,
    /// Requests the backend took (resent ones included).
    pub sent: u64,
    /// Bytes of those requests' bodies.
    pub bytes_sent: u64,
    /// Requests sent again after a retryable failure (not counting the spool's).
    pub retries: u64,
    /// Requests put in the spool.
    pub spooled: u64,
    /// Spooled requests sent later.
    pub resent: u64,
    /// Requests waiting in the spool now.
    pub in_spool: u64,
    /// Requests (or, for `QueueFull`, profiles) dropped, by reason.
    pub dropped: BTreeMap<DropReason, u64>,
}

impl std::fmt::Display for ExportStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: {} profiles, {} requests sent ({} bytes), {} retried, {} spooled, {} resent, {} in the spool",
            self.backend, self.profiles, self.sent, self.bytes_sent, self.retries, self.spooled, self.resent, self.in_spool
        )?;
        if !self.dropped.is_empty() {
            let d: Vec<String> = self.dropped.iter().map(|(r, n)| format!("{n} {}", r.name())).collect();
            write!(f, "; dropped: {}", d.join(", "))?;
        }
        Ok(())
    }
}

/// Something a user should hear about, once, as one line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportNotice {
    /// `protocol URL`.
    pub backend: String,
    /// What happened.
    pub message: String,
}

impl std::fmt::Display for ExportNotice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.backend, self.message)
    }
}

const MAX_NOTICES: usize = 64;

#[derive(Debug, Default)]
struct Shared {
    stats: Mutex<ExportStats>,
    notices: Mutex<Vec<ExportNotice>>,
    stopping: AtomicBool,
}

impl Shared {
    fn count(&self, f: impl FnOnce(&mut ExportStats)) {
        if let Ok(mut s) = self.stats.lock() {
            f(&mut s);
        }
    }

    fn drop_count(&self, reason: DropReason, n: u64) {
        self.count(|s| *s.dropped.entry(reason).or_default() += n);
    }

    fn notice(&self, backend: &str, message: String) {
        if let Ok(mut n) = self.notices.lock() {
            if n.len() < MAX_NOTICES {
                n.push(ExportNotice { backend: backend.to_string(), message });
            }
        }
    }
}

#[derive(Debug)]
struct Worker {
    tx: Option<SyncSender<Arc<Profile>>>,
    shared: Arc<Shared>,
    done: Receiver<()>,
    handle: Option<JoinHandle<()>>,
    name: String,
}

/// Sends each profile to every backend from a thread per backend; [`Exporter::export`]
/// never waits on the network.
#[derive(Debug)]
pub struct Exporter {
    workers: Vec<Worker>,
}

impl Exporter {
    /// Starts a thread per backend. Spooled requests of an earlier run are sent first.
    pub fn start(backends: Vec<Backend>, run: RunLabels, options: ExportOptions) -> Result<Exporter, Error> {
        let mut workers = Vec::new();
        for backend in backends {
            let name = format!("{} {}", backend.protocol.name(), backend.url);
            let spool = match &options.spool {
                Some(s) => Some(Spool::open(s, backend.protocol.name())?),
                None => None,
            };
            let shared = Arc::new(Shared::default());
            shared.count(|s| {
                s.backend = name.clone();
                s.in_spool = spool.as_ref().map_or(0, |s| s.len() as u64);
            });
            let (tx, rx) = std::sync::mpsc::sync_channel(options.queue.max(1));
            let (done_tx, done) = std::sync::mpsc::channel();
            let mut state = WorkerState {
                name: name.clone(),
                protocol: backend.protocol,
                transport: Transport::new(backend.url, backend.transport),
                run: run.clone(),
                options: options.clone(),
                spool,
                shared: Arc::clone(&shared),
                healthy: true,
                backoff: options.backoff,
                next_spool_try: Instant::now(),
            };
            let handle = std::thread::Builder::new()
                .name(format!("unwound-{}", backend.protocol.name()))
                .spawn(move || {
                    state.run(rx);
                    let _ = done_tx.send(());
                })
                .map_err(Error::Thread)?;
            workers.push(Worker { tx: Some(tx), shared, done, handle: Some(handle), name });
        }
        Ok(Exporter { workers })
    }

    /// Queues `profile` for every backend; a backend whose queue is full drops it (counted).
    pub fn export(&self, profile: Arc<Profile>) {
        for w in &self.workers {
            w.shared.count(|s| s.profiles += 1);
            if let Some(tx) = &w.tx {
                match tx.try_send(Arc::clone(&profile)) {
                    Ok(()) => {}
                    Err(TrySendError::Full(_)) => {
                        w.shared.drop_count(DropReason::QueueFull, 1);
                        w.shared
                            .notice(&w.name, "still sending earlier profiles: this one is dropped".into());
                    }
                    Err(TrySendError::Disconnected(_)) => w.shared.drop_count(DropReason::Unsent, 1),
                }
            }
        }
    }

    /// What happened since the last call, one line each.
    pub fn take_notices(&self) -> Vec<ExportNotice> {
        self.workers
            .iter()
            .flat_map(|w| w.shared.notices.lock().map(|mut n| std::mem::take(&mut *n)).unwrap_or_default())
            .collect()
    }

    /// Every backend's counts so far.
    pub fn stats(&self) -> Vec<ExportStats> {
        self.workers.iter().map(|w| w.shared.stats.lock().map(|s| s.clone()).unwrap_or_default()).collect()
    }

    /// Sends what is queued (one try each, no backoff; what fails goes to the spool),
    /// waiting at most `timeout` in all, and returns the counts and the notices not taken
    /// yet. A backend still busy then is left to finish while the process lives.
    pub fn finish(mut self, timeout: Duration) -> (Vec<ExportStats>, Vec<ExportNotice>) {
        let deadline = Instant::now() + timeout;
        for w in &mut self.workers {
            w.shared.stopping.store(true, Ordering::Relaxed);
            w.tx = None;
        }
        for w in &mut self.workers {
            let left = deadline.saturating_duration_since(Instant::now());
            if w.done.recv_timeout(left).is_ok() {
                if let Some(h) = w.handle.take() {
                    let _ = h.join();
                }
            } else {
                w.shared.notice(
                    &w.name,
                    format!("still sending after {:.0} s; left unfinished", timeout.as_secs_f64()),
                );
            }
        }
        (self.stats(), self.take_notices())
    }
}

struct WorkerState {
    name: String,
    protocol: Protocol,
    transport: Transport,
    run: RunLabels,
    options: ExportOptions,
    spool: Option<Spool>,
    shared: Arc<Shared>,
    /// False from a failed delivery to the next success: new requests get one try and then
    /// go to the spool, which is retried on the backoff schedule.
    healthy: bool,
    backoff: Duration,
    next_spool_try: Instant,
}

impl WorkerState {
    fn run(&mut self, rx: Receiver<Arc<Profile>>) {
        loop {
            let spooled = self.spool.as_ref().is_some_and(|s| s.len() > 0);
            let wait = if spooled {
                self.next_spool_try.saturating_duration_since(Instant::now()).max(Duration::from_millis(1))
            } else {
                Duration::from_secs(3600)
            };
            match rx.recv_timeout(wait) {
                Ok(profile) => {
                    for payload in self.protocol.payloads(&profile, &self.run) {
                        self.deliver(payload);
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
            if spooled && Instant::now() >= self.next_spool_try && !self.stopping() {
                self.drain_spool();
            }
        }
        self.update_in_spool();
    }

    fn stopping(&self) -> bool {
        self.shared.stopping.load(Ordering::Relaxed)
    }

    fn max_age(&self) -> Duration {
        self.spool.as_ref().map_or(Duration::from_secs(55 * 60), |s| s.max_age)
    }

    fn deliver(&mut self, payload: Payload) {
        if too_old(payload.profile_unix_ns, self.max_age()) {
            self.shared.drop_count(DropReason::TooOld, 1);
            return;
        }
        let tries = if self.healthy && !self.stopping() { 1 + self.options.retries } else { 1 };
        let mut wait = self.options.backoff;
        let mut last_reason = String::new();
        for attempt in 0..tries {
            if attempt > 0 {
                self.shared.count(|s| s.retries += 1);
            }
            match self.transport.post(&payload.path_and_query, &payload.content_type, &payload.body) {
                Delivery::Sent => {
                    self.sent(payload.body.len());
                    return;
                }
                Delivery::Rejected { status, message } => {
                    self.shared.drop_count(DropReason::Rejected, 1);
                    self.shared.notice(&self.name, format!("HTTP {status}: {message}; profile dropped"));
                    return;
                }
                Delivery::Retry { reason, after } => {
                    last_reason = reason;
                    if attempt + 1 < tries {
                        let pause = after.unwrap_or(wait).min(self.options.max_backoff);
                        self.sleep(pause);
                        wait = (wait * 2).min(self.options.max_backoff);
                        if self.stopping() {
                            break;
                        }
                    }
                }
            }
        }
        if self.healthy {
            let then =
                if self.spool.is_some() { "keeping profiles in the spool" } else { "dropping profiles" };
            self.shared.notice(&self.name, format!("{last_reason}; {then} until it answers"));
        }
        self.healthy = false;
        self.next_spool_try = Instant::now() + self.backoff;
        self.backoff = (self.backoff * 2).min(self.options.max_backoff);
        self.keep(&payload);
    }

    fn sent(&mut self, bytes: usize) {
        self.shared.count(|s| {
            s.sent += 1;
            s.bytes_sent += bytes as u64;
        });
        if !self.healthy {
            self.shared.notice(&self.name, "answering again".into());
        }
        self.healthy = true;
        self.backoff = self.options.backoff;
        self.next_spool_try = Instant::now();
    }

    fn keep(&mut self, payload: &Payload) {
        let Some(spool) = &mut self.spool else {
            self.shared.drop_count(DropReason::Unsent, 1);
            return;
        };
        match spool.put(payload) {
            Ok(evicted) => {
                self.shared.count(|s| s.spooled += 1);
                if evicted > 0 {
                    self.shared.drop_count(DropReason::SpoolFull, evicted);
                }
            }
            Err(e) => {
                self.shared.drop_count(DropReason::Unsent, 1);
                self.shared.notice(&self.name, format!("{e}; profile dropped"));
            }
        }
        self.update_in_spool();
    }

    fn update_in_spool(&self) {
        let n = self.spool.as_ref().map_or(0, |s| s.len() as u64);
        self.shared.count(|s| s.in_spool = n);
    }

    /// Sends spooled requests, oldest first, until one fails.
    fn drain_spool(&mut self) {
        while let Some(next) = self.spool.as_mut().and_then(Spool::oldest) {
            let payload = match next {
                Ok(p) => p,
                Err(path) => {
                    self.shared.drop_count(DropReason::SpoolDamaged, 1);
                    self.shared
                        .notice(&self.name, format!("{} could not be read back; dropped", path.display()));
                    continue;
                }
            };
            if too_old(payload.profile_unix_ns, self.max_age()) {
                self.shared.drop_count(DropReason::TooOld, 1);
            } else {
                match self.transport.post(&payload.path_and_query, &payload.content_type, &payload.body) {
                    Delivery::Sent => {
                        self.sent(payload.body.len());
                        self.shared.count(|s| s.resent += 1);
                    }
                    Delivery::Rejected { status, message } => {
                        self.shared.drop_count(DropReason::Rejected, 1);
                        self.shared
                            .notice(&self.name, format!("HTTP {status}: {message}; spooled profile dropped"));
                    }
                    Delivery::Retry { .. } => {
                        self.healthy = false;
                        self.next_spool_try = Instant::now() + self.backoff;
                        self.backoff = (self.backoff * 2).min(self.options.max_backoff);
                        break;
                    }
                }
            }
            if let Some(s) = self.spool.as_mut() {
                s.remove_oldest();
            }
            self.update_in_spool();
            if self.stopping() {
                break;
            }
        }
        self.update_in_spool();
    }

    /// Sleeps up to `d`, cut short when the exporter is finishing.
    fn sleep(&self, d: Duration) {
        let end = Instant::now() + d;
        while !self.stopping() {
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            std::thread::sleep(left.min(Duration::from_millis(50)));
        }
    }
}
