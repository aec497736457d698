//! pprof (`perftools.profiles.Profile`, profile.proto) encoding.
//!
//! Sample types `samples/count` and `cpu/nanoseconds`, period type `cpu/nanoseconds`. A
//! location is a (module, function, address) triple: user addresses are file virtual
//! addresses, so one location serves every process that maps the same file. Every label of
//! a sample becomes a pprof sample label (numbers as `num`, text as `str`).

use std::collections::HashMap;
use std::io::Write;

use prost::Message as _;

use crate::labels::LabelValue;
use crate::model::{Frame, Profile};
use crate::Error;

/// The subset of profile.proto this crate writes (field numbers from the published proto).
pub(crate) mod proto {
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Profile {
        #[prost(message, repeated, tag = "1")]
        pub sample_type: Vec<ValueType>,
        #[prost(message, repeated, tag = "2")]
        pub sample: Vec<Sample>,
        #[prost(message, repeated, tag = "3")]
        pub mapping: Vec<Mapping>,
        #[prost(message, repeated, tag = "4")]
        pub location: Vec<Location>,
        #[prost(message, repeated, tag = "5")]
        pub function: Vec<Function>,
        #[prost(string, repeated, tag = "6")]
        pub string_table: Vec<String>,
        #[prost(int64, tag = "9")]
        pub time_nanos: i64,
        #[prost(int64, tag = "10")]
        pub duration_nanos: i64,
        #[prost(message, optional, tag = "11")]
        pub period_type: Option<ValueType>,
        #[prost(int64, tag = "12")]
        pub period: i64,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ValueType {
        #[prost(int64, tag = "1")]
        pub r#type: i64,
        #[prost(int64, tag = "2")]
        pub unit: i64,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Sample {
        #[prost(uint64, repeated, tag = "1")]
        pub location_id: Vec<u64>,
        #[prost(int64, repeated, tag = "2")]
        pub value: Vec<i64>,
        #[prost(message, repeated, tag = "3")]
        pub label: Vec<Label>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Label {
        #[prost(int64, tag = "1")]
        pub key: i64,
        #[prost(int64, tag = "2")]
        pub str: i64,
        #[prost(int64, tag = "3")]
        pub num: i64,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Mapping {
        #[prost(uint64, tag = "1")]
        pub id: u64,
        #[prost(uint64, tag = "2")]
        pub memory_start: u64,
        #[prost(uint64, tag = "3")]
        pub memory_limit: u64,
        #[prost(uint64, tag = "4")]
        pub file_offset: u64,
        #[prost(int64, tag = "5")]
        pub filename: i64,
        #[prost(int64, tag = "6")]
        pub build_id: i64,
        #[prost(bool, tag = "7")]
        pub has_functions: bool,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Location {
        #[prost(uint64, tag = "1")]
        pub id: u64,
        #[prost(uint64, tag = "2")]
        pub mapping_id: u64,
        #[prost(uint64, tag = "3")]
        pub address: u64,
        #[prost(message, repeated, tag = "4")]
        pub line: Vec<Line>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Line {
        #[prost(uint64, tag = "1")]
        pub function_id: u64,
        #[prost(int64, tag = "2")]
        pub line: i64,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Function {
        #[prost(uint64, tag = "1")]
        pub id: u64,
        #[prost(int64, tag = "2")]
        pub name: i64,
        #[prost(int64, tag = "3")]
        pub system_name: i64,
        #[prost(int64, tag = "4")]
        pub filename: i64,
        #[prost(int64, tag = "5")]
        pub start_line: i64,
    }
}

/// Interned strings, `""` first (pprof's and OTLP's rule).
#[derive(Default)]
pub(crate) struct Strings {
    pub(crate) table: Vec<String>,
    index: HashMap<String, usize>,
}

impl Strings {
    pub(crate) fn new() -> Self {
        let mut s = Strings::default();
        s.get("");
        s
    }

    pub(crate) fn get(&mut self, v: &str) -> usize {
        if let Some(&i) = self.index.get(v) {
            return i;
        }
        let i = self.table.len();
        self.table.push(v.to_string());
        self.index.insert(v.to_string(), i);
        i
    }
}

/// The function name pprof shows for a frame's function `name`: kernel ones get `_[k]`.
pub(crate) fn shown_name(frame: &Frame, name: &str) -> String {
    if frame.kernel {
        format!("{name}_[k]")
    } else {
        name.to_string()
    }
}

/// Encodes `profile` as an uncompressed pprof protobuf; labels whose key `skip_label`
/// accepts are left out of the samples.
pub fn encode(profile: &Profile, skip_label: &dyn Fn(&str) -> bool) -> Vec<u8> {
    let mut strings = Strings::new();
    let mut out = proto::Profile::default();
    let period = profile.period_ns();
    let mut value_type =
        |t: &str, u: &str| proto::ValueType { r#type: strings.get(t) as i64, unit: strings.get(u) as i64 };
    let samples_t = value_type("samples", "count");
    let cpu_t = value_type("cpu", "nanoseconds");
    out.sample_type = vec![samples_t, cpu_t.clone()];
    out.period_type = Some(cpu_t);
    out.period = period;
    out.time_nanos = profile.start_unix_ns;
    out.duration_nanos = i64::try_from(profile.duration_ns).unwrap_or(i64::MAX);
    let mut mappings: HashMap<&str, u64> = HashMap::new();
    let mut functions: HashMap<(&str, &str, &str), u64> = HashMap::new();
    let mut locations: HashMap<(&str, &str, u64), u64> = HashMap::new();
    // pprof takes the first mapping for the main binary: the outermost user frame's object
    // of the first (heaviest) stack, an executable, not whatever a leaf was in (JIT code).
    if let Some(root) =
        profile.samples.first().and_then(|s| s.frames.iter().find(|f| !f.kernel && f.module != "[unknown]"))
    {
        mappings.insert(&root.module, 1);
        out.mapping.push(proto::Mapping {
            id: 1,
            filename: strings.get(&root.module) as i64,
            has_functions: true,
            ..Default::default()
        });
    }
    for sample in &profile.samples {
        let mut location_id = Vec::with_capacity(sample.frames.len());
        for f in sample.frames.iter().rev() {
            let key = (f.module.as_str(), f.function.as_str(), f.address);
            if let Some(&id) = locations.get(&key) {
                location_id.push(id);
                continue;
            }
            let next_mapping = mappings.len() as u64 + 1;
            let mapping_id = *mappings.entry(&f.module).or_insert_with(|| {
                out.mapping.push(proto::Mapping {
                    id: next_mapping,
                    filename: strings.get(&f.module) as i64,
                    has_functions: true,
                    ..Default::default()
                });
                next_mapping
            });
            // Innermost inlined function first, the containing function last (pprof's order).
            let line: Vec<proto::Line> = if f.lines.is_empty() {
                vec![proto::Line {
                    function_id: function_id(&mut functions, f, &f.function, "", &mut out, &mut strings),
                    line: 0,
                }]
            } else {
                let last = f.lines.len() - 1;
                f.lines
                    .iter()
                    .enumerate()
                    .map(|(i, l)| {
                        let name = if i == last { f.function.as_str() } else { l.function.as_str() };
                        proto::Line {
                            function_id: function_id(
                                &mut functions,
                                f,
                                name,
                                &l.file,
                                &mut out,
                                &mut strings,
                            ),
                            line: l.line.into(),
                        }
                    })
                    .collect()
            };
            let id = locations.len() as u64 + 1;
            out.location.push(proto::Location { id, mapping_id, address: f.address, line });
            locations.insert(key, id);
            location_id.push(id);
        }
        let count = i64::try_from(sample.count).unwrap_or(i64::MAX);
        let label = sample
            .labels
            .iter()
            .filter(|(k, _)| !skip_label(k))
            .map(|(k, v)| {
                let key = strings.get(k) as i64;
                match v {
                    LabelValue::Str(v) => proto::Label { key, str: strings.get(v) as i64, num: 0 },
                    LabelValue::Num(n) => proto::Label { key, str: 0, num: *n },
                }
            })
            .collect();
        out.sample.push(proto::Sample {
            location_id,
            value: vec![count, count.saturating_mul(period)],
            label,
        });
    }
    out.string_table = strings.table;
    out.encode_to_vec()
}

/// The id of the function `name` (of `frame`, in source `file`), added on first use.
fn function_id<'a>(
    functions: &mut HashMap<(&'a str, &'a str, &'a str), u64>,
    frame: &'a Frame,
    name: &'a str,
    file: &'a str,
    out: &mut proto::Profile,
    strings: &mut Strings,
) -> u64 {
    let next = functions.len() as u64 + 1;
    *functions.entry((frame.module.as_str(), name, file)).or_insert_with(|| {
        let n = strings.get(&shown_name(frame, name)) as i64;
        let filename = if file.is_empty() { 0 } else { strings.get(file) as i64 };
        out.function.push(proto::Function {
            id: next,
            name: n,
            system_name: n,
            filename,
            ..Default::default()
        });
        next
    })
}

/// Gzips bytes (pprof files and Pyroscope's `raw_profile` are gzipped).
pub fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut gz =
        flate2::write::GzEncoder::new(Vec::with_capacity(bytes.len() / 4), flate2::Compression::fast());
    // Writing into a Vec cannot fail.
    let _ = gz.write_all(bytes);
    gz.finish().unwrap_or_default()
}

/// Writes `profile` as a gzipped pprof file, every label on its samples.
pub fn write_gzip(out: &mut dyn Write, profile: &Profile) -> Result<(), Error> {
    let bytes = encode(profile, &|_| false);
    let mut gz = flate2::write::GzEncoder::new(out, flate2::Compression::default());
    gz.write_all(&bytes).map_err(Error::Write)?;
    gz.finish().map_err(Error::Write)?;
    Ok(())
}
