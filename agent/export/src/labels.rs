//! Labels: what a sample is about (its process, thread, cgroup, systemd unit, container,
//! host, service) and the run's own `KEY=VALUE` labels.
//!
//! `service_name` is, in this order: the service name given for the run
//! ([`RunLabels::service_name`]); the process's systemd unit without its `.service` suffix;
//! its container, as `container/` and the first 12 hex digits of its id (`docker ps`'s short
//! id); the process name.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::Error;

/// The label keys this crate sets itself; a run's own labels may not take them.
pub mod keys {
    /// The process id (a number label).
    pub const PID: &str = "pid";
    /// The process's name (`/proc/PID/comm` of its main thread).
    pub const PROCESS_NAME: &str = "process_name";
    /// The sampled thread's name.
    pub const THREAD_NAME: &str = "thread_name";
    /// The process's cgroup v2 path.
    pub const CGROUP: &str = "cgroup";
    /// The systemd unit the process runs in (`nginx.service`).
    pub const SYSTEMD_UNIT: &str = "systemd_unit";
    /// The full id of the container the process runs in.
    pub const CONTAINER_ID: &str = "container_id";
    /// The container runtime (`docker`, `containerd`, `cri-o`, `podman`).
    pub const CONTAINER_RUNTIME: &str = "container_runtime";
    /// The machine's host name.
    pub const HOST_NAME: &str = "host_name";
    /// The service (see the module doc for how it is chosen).
    pub const SERVICE_NAME: &str = "service_name";
    /// Every key above.
    pub const ALL: [&str; 9] = [
        PID,
        PROCESS_NAME,
        THREAD_NAME,
        CGROUP,
        SYSTEMD_UNIT,
        CONTAINER_ID,
        CONTAINER_RUNTIME,
        HOST_NAME,
        SERVICE_NAME,
    ];
}

/// Most labels a run may add: with this crate's own, a Pyroscope series stays within the
/// server's 30 label names.
pub const MAX_USER_LABELS: usize = 16;
/// Longest label value Pyroscope accepts, in bytes; longer values are cut to it.
pub const MAX_VALUE_BYTES: usize = 2048;
/// Longest label name Pyroscope accepts, in bytes.
pub const MAX_NAME_BYTES: usize = 1024;

/// A label's value.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LabelValue {
    /// Text.
    Str(String),
    /// A number (pprof's numeric label; backends do not make series of these).
    Num(i64),
}

/// Labels sorted by key, each key once.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct LabelSet {
    labels: Vec<(String, LabelValue)>,
}

impl LabelSet {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets `key` to `value`, replacing what it held; values longer than
    /// [`MAX_VALUE_BYTES`] are cut at a character boundary.
    pub fn insert(&mut self, key: &str, value: LabelValue) {
        let value = match value {
            LabelValue::Str(s) => LabelValue::Str(truncate(s, MAX_VALUE_BYTES)),
            n => n,
        };
        match self.labels.binary_search_by(|(k, _)| k.as_str().cmp(key)) {
            Ok(i) => self.labels[i].1 = value,
            Err(i) => self.labels.insert(i, (key.to_string(), value)),
        }
    }

    /// Sets a text label.
    pub fn insert_str(&mut self, key: &str, value: impl Into<String>) {
        self.insert(key, LabelValue::Str(value.into()));
    }

    /// The value of `key`.
    pub fn get(&self, key: &str) -> Option<&LabelValue> {
        self.labels.binary_search_by(|(k, _)| k.as_str().cmp(key)).ok().map(|i| &self.labels[i].1)
    }

    /// The text value of `key`.
    pub fn get_str(&self, key: &str) -> Option<&str> {
        match self.get(key) {
            Some(LabelValue::Str(s)) => Some(s),
            _ => None,
        }
    }

    /// `service_name`, or `unknown` when the set has none.
    pub fn service_name(&self) -> &str {
        self.get_str(keys::SERVICE_NAME).unwrap_or("unknown")
    }

    /// The labels in key order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &LabelValue)> {
        self.labels.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// How many labels there are.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// True when there are none.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }
}

fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

/// Whether `name` is a label name every backend takes: `[A-Za-z_][A-Za-z0-9_]*`, not
/// starting with `__` (reserved by Prometheus and Pyroscope), at most [`MAX_NAME_BYTES`].
pub fn is_valid_label_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !name.starts_with("__")
        && name.len() <= MAX_NAME_BYTES
}

/// Parses a run's `KEY=VALUE` label.
///
/// ```
/// assert_eq!(unwound_export::parse_user_label("env=prod").unwrap(), ("env".into(), "prod".into()));
/// assert!(unwound_export::parse_user_label("pid=1").is_err()); // set by the profiler
/// assert!(unwound_export::parse_user_label("no-dash=x").is_err());
/// ```
pub fn parse_user_label(text: &str) -> Result<(String, String), Error> {
    let bad = |reason: &str| Error::BadLabel { label: text.to_string(), reason: reason.to_string() };
    let (key, value) = text.split_once('=').ok_or_else(|| bad("expected KEY=VALUE"))?;
    if !is_valid_label_name(key) {
        return Err(bad("the key must match [A-Za-z_][A-Za-z0-9_]* and not start with __"));
    }
    if keys::ALL.contains(&key) {
        return Err(bad("the profiler sets this key itself (use --service-name for service_name)"));
    }
    if value.is_empty() {
        return Err(bad("the value is empty"));
    }
    if value.len() > MAX_VALUE_BYTES {
        return Err(bad("the value is longer than 2048 bytes"));
    }
    Ok((key.to_string(), value.to_string()))
}

/// A container runtime recognised from a cgroup path.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ContainerRuntime {
    /// Docker (`docker-ID.scope`, `/docker/ID`).
    Docker,
    /// containerd, as under Kubernetes (`cri-containerd-ID.scope`, `/kubepods/…/pod…/ID`).
    Containerd,
    /// CRI-O (`crio-ID.scope`).
    CriO,
    /// Podman (`libpod-ID.scope`, `/libpod_parent/libpod-ID`).
    Podman,
}

impl ContainerRuntime {
    /// The runtime's usual name.
    pub fn name(self) -> &'static str {
        match self {
            ContainerRuntime::Docker => "docker",
            ContainerRuntime::Containerd => "containerd",
            ContainerRuntime::CriO => "cri-o",
            ContainerRuntime::Podman => "podman",
        }
    }
}

/// A container a process runs in.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Container {
    /// Who runs it.
    pub runtime: ContainerRuntime,
    /// Its full id (64 hex digits).
    pub id: String,
}

fn is_container_id(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The container a cgroup v2 path belongs to: the innermost component that names one.
///
/// ```
/// use unwound_export::{container_of_cgroup, ContainerRuntime};
/// let id = "4f2d".repeat(16);
/// let c = container_of_cgroup(&format!("/system.slice/docker-{id}.scope")).unwrap();
/// assert_eq!((c.runtime, c.id.as_str()), (ContainerRuntime::Docker, id.as_str()));
/// ```
pub fn container_of_cgroup(path: &str) -> Option<Container> {
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    for (i, part) in parts.iter().enumerate().rev() {
        let scoped = |prefix: &str| {
            part.strip_prefix(prefix)
                .map(|rest| rest.strip_suffix(".scope").unwrap_or(rest))
                .filter(|id| is_container_id(id))
        };
        let found = if let Some(id) = scoped("docker-") {
            Some((ContainerRuntime::Docker, id))
        } else if let Some(id) = scoped("cri-containerd-") {
            Some((ContainerRuntime::Containerd, id))
        } else if let Some(id) = scoped("crio-") {
            Some((ContainerRuntime::CriO, id))
        } else if let Some(id) = scoped("libpod-") {
            Some((ContainerRuntime::Podman, id))
        } else if is_container_id(part) && i > 0 {
            // cgroupfs drivers: `/docker/ID`, `/kubepods/burstable/podUID/ID`.
            let parent = parts[i - 1];
            let runtime = if parent == "docker" {
                ContainerRuntime::Docker
            } else if parent.starts_with("pod") || parts[..i].contains(&"kubepods") {
                ContainerRuntime::Containerd
            } else {
                continue;
            };
            Some((runtime, *part))
        } else {
            None
        };
        if let Some((runtime, id)) = found {
            return Some(Container { runtime, id: id.to_ascii_lowercase() });
        }
    }
    None
}

/// The systemd service a cgroup v2 path belongs to: the innermost `NAME.service`
/// component, except a user's service manager (`user@UID.service`), which holds other
/// units rather than being one a person would look for.
///
/// ```
/// assert_eq!(
///     unwound_export::systemd_unit_of_cgroup("/system.slice/nginx.service"),
///     Some("nginx.service")
/// );
/// assert_eq!(unwound_export::systemd_unit_of_cgroup("/user.slice/user-1000.slice/session-2.scope"), None);
/// ```
pub fn systemd_unit_of_cgroup(path: &str) -> Option<&str> {
    path.split('/')
        .rev()
        .find(|p| p.len() > ".service".len() && p.ends_with(".service") && !p.starts_with("user@"))
}

/// What is known of a process: its name and cgroup.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ProcessInfo {
    /// The process id.
    pub pid: u32,
    /// Its main thread's name, `unknown` once the process is gone.
    pub name: String,
    /// Its cgroup v2 path, when known.
    pub cgroup: Option<String>,
}

impl ProcessInfo {
    /// The systemd service it runs in.
    pub fn systemd_unit(&self) -> Option<&str> {
        self.cgroup.as_deref().and_then(systemd_unit_of_cgroup)
    }

    /// The container it runs in.
    pub fn container(&self) -> Option<Container> {
        self.cgroup.as_deref().and_then(container_of_cgroup)
    }
}

/// The labels of a whole run: host, an explicit service name, and the user's labels.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RunLabels {
    /// The machine's host name.
    pub host_name: String,
    /// A service name for every sample, ahead of any derived one.
    pub service_name: Option<String>,
    /// `KEY=VALUE` labels for every sample (checked with [`parse_user_label`]).
    pub user: Vec<(String, String)>,
}

impl RunLabels {
    /// Labels with this machine's host name (`/proc/sys/kernel/hostname`).
    pub fn for_this_host(service_name: Option<String>, user: Vec<(String, String)>) -> Result<Self, Error> {
        if user.len() > MAX_USER_LABELS {
            return Err(Error::BadLabel {
                label: format!("{} labels", user.len()),
                reason: format!("at most {MAX_USER_LABELS} labels may be given"),
            });
        }
        if let Some(name) = &service_name {
            if name.is_empty() || name.len() > MAX_VALUE_BYTES {
                return Err(Error::BadLabel {
                    label: name.clone(),
                    reason: "a service name must be 1 to 2048 bytes".into(),
                });
            }
        }
        let host_name = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|s| s.trim().to_string())
            .ok()
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "unknown".to_string());
        Ok(RunLabels { host_name, service_name, user })
    }

    /// The service name for a process: this run's, else the process's systemd service, its
    /// container, its name.
    pub fn service_for(&self, process: &ProcessInfo) -> String {
        if let Some(s) = &self.service_name {
            return s.clone();
        }
        if let Some(unit) = process.systemd_unit() {
            return unit.strip_suffix(".service").unwrap_or(unit).to_string();
        }
        if let Some(c) = process.container() {
            return format!("container/{}", &c.id[..12]);
        }
        process.name.clone()
    }

    /// Every label of a sample taken in `thread_name` of `process`.
    pub fn sample_labels(&self, process: &ProcessInfo, thread_name: &str) -> LabelSet {
        let mut set = LabelSet::new();
        for (k, v) in &self.user {
            set.insert_str(k, v.clone());
        }
        set.insert(keys::PID, LabelValue::Num(process.pid.into()));
        set.insert_str(keys::PROCESS_NAME, process.name.clone());
        set.insert_str(keys::THREAD_NAME, thread_name);
        if let Some(cgroup) = &process.cgroup {
            set.insert_str(keys::CGROUP, cgroup.clone());
        }
        if let Some(unit) = process.systemd_unit() {
            set.insert_str(keys::SYSTEMD_UNIT, unit);
        }
        if let Some(c) = process.container() {
            set.insert_str(keys::CONTAINER_ID, c.id);
            set.insert_str(keys::CONTAINER_RUNTIME, c.runtime.name());
        }
        set.insert_str(keys::HOST_NAME, self.host_name.clone());
        set.insert_str(keys::SERVICE_NAME, self.service_for(process));
        set
    }

    /// The labels that hold for every sample of the run (host and the user's), which a
    /// backend may take as series labels.
    pub fn is_run_label(&self, key: &str) -> bool {
        key == keys::HOST_NAME || self.user.iter().any(|(k, _)| k == key)
    }
}

/// Finds processes' names and cgroups in `/proc`, and cgroup paths by cgroup id (the inode
/// number of the cgroup's directory under the cgroup v2 mount), caching what it found.
///
/// A process that is gone keeps the labels it had when last seen, or is `unknown`.
#[derive(Debug)]
pub struct LabelResolver {
    proc_root: PathBuf,
    cgroup_root: PathBuf,
    processes: HashMap<u32, (u64, Arc<ProcessInfo>)>,
    cgroups: HashMap<u64, String>,
}

impl Default for LabelResolver {
    fn default() -> Self {
        Self::new()
    }
}

impl LabelResolver {
    /// Reads `/proc` and `/sys/fs/cgroup`.
    pub fn new() -> Self {
        Self::with_roots("/proc", "/sys/fs/cgroup")
    }

    /// Reads another procfs and cgroup v2 mount (tests, containers with host mounts).
    pub fn with_roots(proc_root: impl Into<PathBuf>, cgroup_root: impl Into<PathBuf>) -> Self {
        LabelResolver {
            proc_root: proc_root.into(),
            cgroup_root: cgroup_root.into(),
            processes: HashMap::new(),
            cgroups: HashMap::new(),
        }
    }

    /// The process `pid`: read once per process start (a reused pid is read again).
    pub fn process(&mut self, pid: u32) -> Arc<ProcessInfo> {
        let dir = self.proc_root.join(pid.to_string());
        let started = start_time(&dir);
        if let Some((at, info)) = self.processes.get(&pid) {
            if started.is_none() || started == Some(*at) {
                return Arc::clone(info);
            }
        }
        let Some(started) = started else {
            return Arc::new(ProcessInfo { pid, name: "unknown".into(), cgroup: None });
        };
        let name = std::fs::read_to_string(dir.join("comm"))
            .map(|s| s.trim_end_matches('\n').to_string())
            .unwrap_or_else(|_| "unknown".to_string());
        let cgroup = std::fs::read_to_string(dir.join("cgroup")).ok().and_then(|s| unified_cgroup(&s));
        let info = Arc::new(ProcessInfo { pid, name, cgroup });
        self.processes.insert(pid, (started, Arc::clone(&info)));
        info
    }

    /// Forgets processes not in `live` (call between intervals to bound the cache).
    pub fn retain(&mut self, live: impl Fn(u32) -> bool) {
        self.processes.retain(|&pid, _| live(pid));
    }

    /// The cgroup path (as `/proc/PID/cgroup` shows it) of cgroup `id`, found by walking
    /// the cgroup v2 mount; `None` when no directory has that inode.
    pub fn cgroup_path(&mut self, id: u64) -> Option<String> {
        if let Some(p) = self.cgroups.get(&id) {
            return Some(p.clone());
        }
        self.cgroups.clear();
        let mut stack = vec![self.cgroup_root.clone()];
        while let Some(dir) = stack.pop() {
            let Ok(meta) = std::fs::metadata(&dir) else { continue };
            use std::os::unix::fs::MetadataExt as _;
            let rel = dir.strip_prefix(&self.cgroup_root).unwrap_or(Path::new(""));
            self.cgroups.insert(meta.ino(), format!("/{}", rel.display()));
            let Ok(entries) = std::fs::read_dir(&dir) else { continue };
            for e in entries.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    stack.push(e.path());
                }
            }
        }
        self.cgroups.get(&id).cloned()
    }
}

/// The cgroup v2 path in a `/proc/PID/cgroup` (its `0::PATH` line).
fn unified_cgroup(text: &str) -> Option<String> {
    text.lines().find_map(|l| l.strip_prefix("0::")).map(str::to_string)
}

/// A process's start time in clock ticks (field 22 of `stat`), which tells a reused pid.
fn start_time(dir: &Path) -> Option<u64> {
    let stat = std::fs::read_to_string(dir.join("stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(19)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(c: char) -> String {
        std::iter::repeat_n(c, 64).collect()
    }

    #[test]
    fn containers_of_each_runtime_and_driver() {
        let a = id('a');
        for (path, runtime) in [
            (format!("/system.slice/docker-{a}.scope"), ContainerRuntime::Docker),
            (format!("/docker/{a}"), ContainerRuntime::Docker),
            (
                format!("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1234_5678.slice/cri-containerd-{a}.scope"),
                ContainerRuntime::Containerd,
            ),
            (format!("/kubepods/burstable/pod0b0e-11/{a}"), ContainerRuntime::Containerd),
            (format!("/kubepods.slice/kubepods-pod9.slice/crio-{a}.scope"), ContainerRuntime::CriO),
            (format!("/machine.slice/libpod-{a}.scope"), ContainerRuntime::Podman),
            (format!("/machine.slice/libpod-{a}.scope/container"), ContainerRuntime::Podman),
            (
                format!("/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{a}.scope"),
                ContainerRuntime::Podman,
            ),
            (format!("/libpod_parent/libpod-{a}"), ContainerRuntime::Podman),
        ] {
            assert_eq!(container_of_cgroup(&path), Some(Container { runtime, id: a.clone() }), "{path}");
        }
        for path in [
            "/",
            "/system.slice/nginx.service",
            "/system.slice/docker-abc.scope",
            &format!("/machine.slice/crio-conmon-{a}.scope"),
            &format!("/other/{a}"),
        ] {
            assert_eq!(container_of_cgroup(path), None, "{path}");
        }
    }

    #[test]
    fn service_name_follows_the_documented_order() {
        let run = RunLabels { host_name: "h".into(), service_name: None, user: vec![] };
        let p = |cgroup: Option<String>| ProcessInfo { pid: 7, name: "app".into(), cgroup };
        assert_eq!(run.service_for(&p(Some("/system.slice/nginx.service".into()))), "nginx");
        assert_eq!(
            run.service_for(&p(Some(
                "/user.slice/user-1000.slice/user@1000.service/app.slice/x.service".into()
            ))),
            "x"
        );
        let c = format!("/system.slice/docker-{}.scope", id('b'));
        assert_eq!(run.service_for(&p(Some(c))), "container/bbbbbbbbbbbb");
        assert_eq!(run.service_for(&p(Some("/user.slice/user-0.slice/session-1.scope".into()))), "app");
        assert_eq!(run.service_for(&p(None)), "app");
        let named = RunLabels { service_name: Some("api".into()), ..run };
        assert_eq!(named.service_for(&p(Some("/system.slice/nginx.service".into()))), "api");
    }

    #[test]
    fn user_labels_are_checked() {
        for bad in ["env", "=x", "1a=x", "__name__=x", "a-b=x", "service_name=x", "thread_name=x", "k="] {
            assert!(parse_user_label(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_user_label("region=eu=1").unwrap(), ("region".into(), "eu=1".into()));
        let many: Vec<_> = (0..=MAX_USER_LABELS).map(|i| (format!("k{i}"), "v".to_string())).collect();
        assert!(RunLabels::for_this_host(None, many).is_err());
    }

    #[test]
    fn long_values_are_cut_at_a_character_boundary() {
        let mut set = LabelSet::new();
        set.insert_str("k", "é".repeat(2000));
        let v = set.get_str("k").unwrap();
        assert!(v.len() <= MAX_VALUE_BYTES && v.len() >= MAX_VALUE_BYTES - 1, "{}", v.len());
    }

    #[test]
    fn resolver_reads_proc_and_finds_cgroups_by_inode() {
        use std::os::unix::fs::MetadataExt as _;
        let tmp = tempfile::tempdir().unwrap();
        let proc_root = tmp.path().join("proc");
        let cg = tmp.path().join("cgroup");
        let unit = cg.join("system.slice/web.service");
        std::fs::create_dir_all(&unit).unwrap();
        let pid_dir = proc_root.join("42");
        std::fs::create_dir_all(&pid_dir).unwrap();
        std::fs::write(pid_dir.join("comm"), "web\n").unwrap();
        std::fs::write(pid_dir.join("cgroup"), "1:name=systemd:/x\n0::/system.slice/web.service\n").unwrap();
        let stat = format!("42 (we b) S {}", (4..=22).map(|i| i.to_string()).collect::<Vec<_>>().join(" "));
        std::fs::write(pid_dir.join("stat"), stat).unwrap();
        let mut r = LabelResolver::with_roots(&proc_root, &cg);
        let p = r.process(42);
        assert_eq!((p.name.as_str(), p.cgroup.as_deref()), ("web", Some("/system.slice/web.service")));
        assert_eq!(p.systemd_unit(), Some("web.service"));
        // Gone: the labels it had are kept; never seen: unknown.
        std::fs::remove_dir_all(&pid_dir).unwrap();
        assert_eq!(r.process(42).name, "web");
        assert_eq!(r.process(43).name, "unknown");
        let ino = std::fs::metadata(&unit).unwrap().ino();
        assert_eq!(r.cgroup_path(ino).as_deref(), Some("/system.slice/web.service"));
        assert_eq!(r.cgroup_path(u64::MAX), None);
    }

    #[test]
    fn resolver_reads_this_process() {
        let mut r = LabelResolver::new();
        let me = r.process(std::process::id());
        let want = std::fs::read_to_string("/proc/self/comm").unwrap();
        assert_eq!(me.name, want.trim_end());
    }
}
