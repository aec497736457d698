//! CPU profiles with labels, written as pprof and sent to profiling backends.
//!
//! A [`Profile`] is one interval's samples: stacks of symbolized frames (root first), a
//! count, and a [`LabelSet`] saying what the sample is about — pid, process and thread
//! name, cgroup v2 path, and parsed from it the systemd unit and container (docker,
//! containerd, CRI-O, podman), the host name, the run's own `KEY=VALUE` labels and a
//! `service_name` (see [`labels`] for the order it is chosen in). [`LabelResolver`] finds a
//! process's labels in `/proc`.
//!
//! - [`pprof`] encodes a profile as pprof, every label a sample label;
//! - [`pyroscope`] builds Grafana Pyroscope's `push.v1.PusherService/Push` requests (one
//!   series per service, `__name__=process_cpu`, within the server's limits) and
//!   `/ingest?format=pprof` requests;
//! - [`otlp`] builds OpenTelemetry `v1development` profile exports;
//! - [`Exporter`] sends each profile to every [`Backend`] from a thread per backend: TLS
//!   with the system's roots or a CA file, bearer or basic credentials, Pyroscope's tenant
//!   header, retries with backoff on 429 and 5xx only, an on-disk spool for what could not
//!   be sent (kept across restarts, dropped once too old), and counts of what was dropped,
//!   by reason. Exporting never waits on the network.
//!
//! ```
//! use std::sync::Arc;
//! use unwound_export::{Frame, LabelResolver, Profile, RunLabels, Sample};
//!
//! let run = RunLabels::for_this_host(None, vec![("env".into(), "prod".into())])?;
//! let process = LabelResolver::new().process(std::process::id());
//! let labels = Arc::new(run.sample_labels(&process, "main"));
//! let frame = |name: &str| Frame {
//!     function: name.into(),
//!     module: "/usr/bin/app".into(),
//!     address: 0x1000,
//!     kernel: false,
//!     lines: vec![],
//! };
//! let profile = Profile {
//!     start_unix_ns: 1_796_194_200_000_000_000,
//!     duration_ns: 10_000_000_000,
//!     frequency_hz: 99,
//!     samples: vec![Sample { frames: vec![frame("main"), frame("work")], count: 42, labels }],
//! };
//! let mut file = Vec::new();
//! unwound_export::pprof::write_gzip(&mut file, &profile)?;
//! assert_eq!(&file[..2], &[0x1f, 0x8b]); // gzip
//!
//! let push = unwound_export::pyroscope::push_body(&profile, &run);
//! let otlp = unwound_export::otlp::export_body(&profile, &run);
//! assert!(!push.is_empty() && !otlp.is_empty());
//! # Ok::<(), unwound_export::Error>(())
//! ```
#![warn(missing_docs)]

mod exporter;
pub mod labels;
mod model;
pub mod otlp;
pub mod pprof;
pub mod pyroscope;
mod spool;
mod transport;

use std::path::PathBuf;

pub use exporter::{Backend, DropReason, ExportNotice, ExportOptions, ExportStats, Exporter, Protocol};
pub use labels::{
    container_of_cgroup, parse_user_label, systemd_unit_of_cgroup, Container, ContainerRuntime,
    LabelResolver, LabelSet, LabelValue, ProcessInfo, RunLabels,
};
pub use model::{Frame, Profile, Sample, SourceLine};
pub use spool::SpoolOptions;
pub use transport::{read_ca_file, Auth, BaseUrl, CaCertificates, Delivery, Transport, TransportOptions};

/// What can go wrong.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A `KEY=VALUE` label (or a service name) that backends would refuse.
    #[error("bad label {label:?}: {reason}")]
    BadLabel {
        /// The label as given.
        label: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A backend URL that cannot be used.
    #[error("bad URL {url:?}: {reason}")]
    BadUrl {
        /// The URL as given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A CA file that cannot be read or holds no certificate.
    #[error("cannot use CA file {path}: {reason}")]
    CaFile {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// Credentials that cannot be used.
    #[error("cannot use the credentials in {origin}: {reason}")]
    Credentials {
        /// Where they came from (a file or a variable's name).
        origin: String,
        /// Why.
        reason: String,
    },
    /// The spool directory or one of its files.
    #[error("spool {path}: {reason}")]
    Spool {
        /// The directory or file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// A sending thread could not be started.
    #[error("cannot start the exporter's thread: {0}")]
    Thread(#[source] std::io::Error),
    /// Writing a profile.
    #[error("cannot write the profile: {0}")]
    Write(#[source] std::io::Error),
}
