//! Grafana Pyroscope: `push.v1.PusherService/Push` (Connect protocol, protobuf body) and
//! the older `/ingest?format=pprof`.
//!
//! A profile becomes one series per `service_name`, labelled `__name__=process_cpu`,
//! `service_name`, `host_name` and the run's own labels; the other labels (pid, process,
//! thread, cgroup, unit, container) stay pprof sample labels. Each series' pprof is cut so
//! that no part exceeds Pyroscope's default limits ([`MAX_SAMPLES`], [`MAX_PROFILE_BYTES`]).

use std::collections::BTreeMap;

use prost::Message as _;

use crate::labels::{keys, RunLabels};
use crate::model::Profile;

/// The push service's path.
pub const PUSH_PATH: &str = "/push.v1.PusherService/Push";
/// Most samples in one profile Pyroscope takes by default.
pub const MAX_SAMPLES: usize = 16_000;
/// Largest uncompressed profile Pyroscope takes by default.
pub const MAX_PROFILE_BYTES: usize = 4 << 20;
/// The profile type's name.
pub const PROFILE_NAME: &str = "process_cpu";

/// push/v1/push.proto and types/v1/types.proto, the parts a push uses (field numbers
/// from the published protos).
pub(crate) mod proto {
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct PushRequest {
        #[prost(message, repeated, tag = "1")]
        pub series: Vec<RawProfileSeries>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct RawProfileSeries {
        #[prost(message, repeated, tag = "1")]
        pub labels: Vec<LabelPair>,
        #[prost(message, repeated, tag = "2")]
        pub samples: Vec<RawSample>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct LabelPair {
        #[prost(string, tag = "1")]
        pub name: String,
        #[prost(string, tag = "2")]
        pub value: String,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct RawSample {
        #[prost(bytes = "vec", tag = "1")]
        pub raw_profile: Vec<u8>,
        #[prost(string, tag = "2")]
        pub id: String,
    }
}

/// The profile split by `service_name`, each part keeping the whole profile's times.
pub fn split_by_service(profile: &Profile) -> BTreeMap<String, Profile> {
    let mut parts: BTreeMap<String, Profile> = BTreeMap::new();
    for s in &profile.samples {
        parts
            .entry(s.labels.service_name().to_string())
            .or_insert_with(|| Profile { samples: Vec::new(), ..profile.clone_empty() })
            .samples
            .push(s.clone());
    }
    parts
}

impl Profile {
    fn clone_empty(&self) -> Profile {
        Profile {
            start_unix_ns: self.start_unix_ns,
            duration_ns: self.duration_ns,
            frequency_hz: self.frequency_hz,
            samples: Vec::new(),
        }
    }
}

/// The series labels of a service's samples: `__name__`, `service_name`, `host_name`, the
/// run's labels.
fn series_labels(service: &str, run: &RunLabels) -> Vec<proto::LabelPair> {
    let mut labels: BTreeMap<&str, &str> = BTreeMap::new();
    labels.insert("__name__", PROFILE_NAME);
    labels.insert(keys::SERVICE_NAME, service);
    labels.insert(keys::HOST_NAME, &run.host_name);
    for (k, v) in &run.user {
        labels.insert(k, v);
    }
    labels.into_iter().map(|(n, v)| proto::LabelPair { name: n.to_string(), value: v.to_string() }).collect()
}

/// Gzipped pprof parts of `profile`, each within the sample and size limits; labels that
/// are series labels are left out of the samples.
fn pprof_parts(profile: &Profile, run: &RunLabels) -> Vec<Vec<u8>> {
    let skip = |k: &str| k == keys::SERVICE_NAME || run.is_run_label(k);
    let mut parts = Vec::new();
    let mut pending: Vec<&[crate::Sample]> = profile.samples.chunks(MAX_SAMPLES).collect();
    while let Some(chunk) = pending.pop() {
        let part = Profile { samples: chunk.to_vec(), ..profile.clone_empty() };
        let bytes = crate::pprof::encode(&part, &skip);
        if bytes.len() > MAX_PROFILE_BYTES && chunk.len() > 1 {
            let (a, b) = chunk.split_at(chunk.len() / 2);
            pending.push(b);
            pending.push(a);
        } else {
            parts.push(crate::pprof::gzip(&bytes));
        }
    }
    parts
}

/// The body of a `Push`: one series per service, its pprof gzipped in `raw_profile`.
pub fn push_body(profile: &Profile, run: &RunLabels) -> Vec<u8> {
    let series = split_by_service(profile)
        .into_iter()
        .map(|(service, part)| proto::RawProfileSeries {
            labels: series_labels(&service, run),
            samples: pprof_parts(&part, run)
                .into_iter()
                .map(|raw_profile| proto::RawSample { raw_profile, id: uuid::Uuid::new_v4().to_string() })
                .collect(),
        })
        .collect();
    proto::PushRequest { series }.encode_to_vec()
}

/// `/ingest?format=pprof` requests (path and query, gzipped pprof body), one per service
/// and part. The series labels travel in the `name` parameter (`service{host_name=h,k=v}`).
pub fn ingest_requests(profile: &Profile, run: &RunLabels) -> Vec<(String, Vec<u8>)> {
    let from = profile.start_unix_ns.max(0) / 1_000_000_000;
    let until = (profile.start_unix_ns.max(0) as u64).saturating_add(profile.duration_ns) / 1_000_000_000;
    let mut out = Vec::new();
    for (service, part) in split_by_service(profile) {
        let mut name = legacy_value(&service);
        name.push('{');
        let mut first = true;
        for pair in series_labels(&service, run) {
            if pair.name == "__name__" || pair.name == keys::SERVICE_NAME {
                continue;
            }
            if !first {
                name.push(',');
            }
            first = false;
            name.push_str(&pair.name);
            name.push('=');
            name.push_str(&legacy_value(&pair.value));
        }
        name.push('}');
        let query = format!(
            "/ingest?name={}&from={from}&until={until}&format=pprof&spyName=unwound&sampleRate={}",
            percent_encode(&name),
            profile.frequency_hz
        );
        for body in pprof_parts(&part, run) {
            out.push((query.clone(), body));
        }
    }
    out
}

/// A value the legacy `name{k=v}` syntax can hold: its separators become `_`.
fn legacy_value(v: &str) -> String {
    v.chars().map(|c| if matches!(c, '{' | '}' | ',' | '=' | '"') { '_' } else { c }).collect()
}

/// RFC 3986 percent-encoding of everything but unreserved characters.
pub(crate) fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3 / 2);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
