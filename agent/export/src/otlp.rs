//! OpenTelemetry profiles (`opentelemetry.proto.profiles.v1development`) over HTTP with a
//! protobuf body: `POST /v1development/profiles`.
//!
//! One `ResourceProfiles` per `service_name` (resource attributes `service.name` and
//! `host.name`), one scope (`unwound`), one profile (`samples/count`, period
//! `cpu/nanoseconds`). Every other label is a sample attribute: `pid` as `process.pid`,
//! the process name as `process.executable.name`, the thread name as `thread.name`, the
//! container id as `container.id`; the rest under their own keys. The request's dictionary
//! follows OTLP's rules: every table starts with its zero value, `string_table[0]` is `""`.

use std::collections::HashMap;

use prost::Message as _;

use crate::labels::{keys, LabelValue, RunLabels};
use crate::model::Profile;
use crate::pprof::{shown_name, Strings};

/// The export path.
pub const PATH: &str = "/v1development/profiles";

/// profiles.proto, profiles_service.proto, common.proto and resource.proto of
/// opentelemetry-proto (v1.10/v1.11 field numbers), the parts an export uses.
pub(crate) mod proto {
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ExportProfilesServiceRequest {
        #[prost(message, repeated, tag = "1")]
        pub resource_profiles: Vec<ResourceProfiles>,
        #[prost(message, optional, tag = "2")]
        pub dictionary: Option<ProfilesDictionary>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ProfilesDictionary {
        #[prost(message, repeated, tag = "1")]
        pub mapping_table: Vec<Mapping>,
        #[prost(message, repeated, tag = "2")]
        pub location_table: Vec<Location>,
        #[prost(message, repeated, tag = "3")]
        pub function_table: Vec<Function>,
        #[prost(message, repeated, tag = "4")]
        pub link_table: Vec<Link>,
        #[prost(string, repeated, tag = "5")]
        pub string_table: Vec<String>,
        #[prost(message, repeated, tag = "6")]
        pub attribute_table: Vec<KeyValueAndUnit>,
        #[prost(message, repeated, tag = "7")]
        pub stack_table: Vec<Stack>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ResourceProfiles {
        #[prost(message, optional, tag = "1")]
        pub resource: Option<Resource>,
        #[prost(message, repeated, tag = "2")]
        pub scope_profiles: Vec<ScopeProfiles>,
        #[prost(string, tag = "3")]
        pub schema_url: String,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Resource {
        #[prost(message, repeated, tag = "1")]
        pub attributes: Vec<KeyValue>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ScopeProfiles {
        #[prost(message, optional, tag = "1")]
        pub scope: Option<InstrumentationScope>,
        #[prost(message, repeated, tag = "2")]
        pub profiles: Vec<Profile>,
        #[prost(string, tag = "3")]
        pub schema_url: String,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct InstrumentationScope {
        #[prost(string, tag = "1")]
        pub name: String,
        #[prost(string, tag = "2")]
        pub version: String,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Profile {
        #[prost(message, optional, tag = "1")]
        pub sample_type: Option<ValueType>,
        #[prost(message, repeated, tag = "2")]
        pub samples: Vec<Sample>,
        #[prost(fixed64, tag = "3")]
        pub time_unix_nano: u64,
        #[prost(uint64, tag = "4")]
        pub duration_nano: u64,
        #[prost(message, optional, tag = "5")]
        pub period_type: Option<ValueType>,
        #[prost(int64, tag = "6")]
        pub period: i64,
        #[prost(bytes = "vec", tag = "7")]
        pub profile_id: Vec<u8>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ValueType {
        #[prost(int32, tag = "1")]
        pub type_strindex: i32,
        #[prost(int32, tag = "2")]
        pub unit_strindex: i32,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Sample {
        #[prost(int32, tag = "1")]
        pub stack_index: i32,
        #[prost(int32, repeated, tag = "2")]
        pub attribute_indices: Vec<i32>,
        #[prost(int32, tag = "3")]
        pub link_index: i32,
        #[prost(int64, repeated, tag = "4")]
        pub values: Vec<i64>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Mapping {
        #[prost(uint64, tag = "1")]
        pub memory_start: u64,
        #[prost(uint64, tag = "2")]
        pub memory_limit: u64,
        #[prost(uint64, tag = "3")]
        pub file_offset: u64,
        #[prost(int32, tag = "4")]
        pub filename_strindex: i32,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Location {
        #[prost(int32, tag = "1")]
        pub mapping_index: i32,
        #[prost(uint64, tag = "2")]
        pub address: u64,
        #[prost(message, repeated, tag = "3")]
        pub lines: Vec<Line>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Line {
        #[prost(int32, tag = "1")]
        pub function_index: i32,
        #[prost(int64, tag = "2")]
        pub line: i64,
        #[prost(int64, tag = "3")]
        pub column: i64,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Function {
        #[prost(int32, tag = "1")]
        pub name_strindex: i32,
        #[prost(int32, tag = "2")]
        pub system_name_strindex: i32,
        #[prost(int32, tag = "3")]
        pub filename_strindex: i32,
        #[prost(int64, tag = "4")]
        pub start_line: i64,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Link {
        #[prost(bytes = "vec", tag = "1")]
        pub trace_id: Vec<u8>,
        #[prost(bytes = "vec", tag = "2")]
        pub span_id: Vec<u8>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Stack {
        #[prost(int32, repeated, tag = "1")]
        pub location_indices: Vec<i32>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct KeyValueAndUnit {
        #[prost(int32, tag = "1")]
        pub key_strindex: i32,
        #[prost(message, optional, tag = "2")]
        pub value: Option<AnyValue>,
        #[prost(int32, tag = "3")]
        pub unit_strindex: i32,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct KeyValue {
        #[prost(string, tag = "1")]
        pub key: String,
        #[prost(message, optional, tag = "2")]
        pub value: Option<AnyValue>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct AnyValue {
        #[prost(oneof = "any_value::Value", tags = "1, 3")]
        pub value: Option<any_value::Value>,
    }
    pub mod any_value {
        #[derive(Clone, PartialEq, prost::Oneof)]
        pub enum Value {
            #[prost(string, tag = "1")]
            StringValue(String),
            #[prost(int64, tag = "3")]
            IntValue(i64),
        }
    }
}

/// The OTLP attribute key for a label key.
fn attribute_key(key: &str) -> &str {
    match key {
        keys::PID => "process.pid",
        keys::PROCESS_NAME => "process.executable.name",
        keys::THREAD_NAME => "thread.name",
        keys::CONTAINER_ID => "container.id",
        keys::CONTAINER_RUNTIME => "container.runtime.name",
        other => other,
    }
}

fn index(i: usize) -> i32 {
    i32::try_from(i).unwrap_or(i32::MAX)
}

fn string_value(s: &str) -> Option<proto::AnyValue> {
    Some(proto::AnyValue { value: Some(proto::any_value::Value::StringValue(s.to_string())) })
}

/// The body of an export request holding `profile`.
pub fn export_body(profile: &Profile, run: &RunLabels) -> Vec<u8> {
    let mut strings = Strings::new();
    let mut dict = proto::ProfilesDictionary {
        mapping_table: vec![proto::Mapping::default()],
        location_table: vec![proto::Location::default()],
        function_table: vec![proto::Function::default()],
        link_table: vec![proto::Link::default()],
        attribute_table: vec![proto::KeyValueAndUnit::default()],
        stack_table: vec![proto::Stack::default()],
        string_table: Vec::new(),
    };
    let mut mappings: HashMap<&str, i32> = HashMap::new();
    let mut functions: HashMap<(&str, String, &str), i32> = HashMap::new();
    let mut locations: HashMap<(&str, &str, u64), i32> = HashMap::new();
    let mut stacks: HashMap<Vec<i32>, i32> = HashMap::new();
    let mut attributes: HashMap<(&str, &LabelValue), i32> = HashMap::new();
    let mut by_service: std::collections::BTreeMap<&str, Vec<proto::Sample>> = Default::default();
    for sample in &profile.samples {
        let mut location_indices = Vec::with_capacity(sample.frames.len());
        // Leaf first, as in pprof.
        for f in sample.frames.iter().rev() {
            let key = (f.module.as_str(), f.function.as_str(), f.address);
            let loc = match locations.get(&key) {
                Some(&i) => i,
                None => {
                    let mapping_index = *mappings.entry(&f.module).or_insert_with(|| {
                        dict.mapping_table.push(proto::Mapping {
                            filename_strindex: index(strings.get(&f.module)),
                            ..Default::default()
                        });
                        index(dict.mapping_table.len() - 1)
                    });
                    let last = f.lines.len().saturating_sub(1);
                    let named: Vec<(String, &str, u32)> = if f.lines.is_empty() {
                        vec![(shown_name(f, &f.function), "", 0)]
                    } else {
                        f.lines
                            .iter()
                            .enumerate()
                            .map(|(i, l)| {
                                let name = if i == last { &f.function } else { &l.function };
                                (shown_name(f, name), l.file.as_str(), l.line)
                            })
                            .collect()
                    };
                    let lines = named
                        .into_iter()
                        .map(|(name, file, line)| {
                            let function_index =
                                *functions.entry((&f.module, name.clone(), file)).or_insert_with(|| {
                                    let n = index(strings.get(&name));
                                    dict.function_table.push(proto::Function {
                                        name_strindex: n,
                                        system_name_strindex: n,
                                        filename_strindex: if file.is_empty() {
                                            0
                                        } else {
                                            index(strings.get(file))
                                        },
                                        start_line: 0,
                                    });
                                    index(dict.function_table.len() - 1)
                                });
                            proto::Line { function_index, line: line.into(), column: 0 }
                        })
                        .collect();
                    dict.location_table.push(proto::Location { mapping_index, address: f.address, lines });
                    let i = index(dict.location_table.len() - 1);
                    locations.insert(key, i);
                    i
                }
            };
            location_indices.push(loc);
        }
        let stack_index = match stacks.get(&location_indices) {
            Some(&i) => i,
            None => {
                dict.stack_table.push(proto::Stack { location_indices: location_indices.clone() });
                let i = index(dict.stack_table.len() - 1);
                stacks.insert(location_indices, i);
                i
            }
        };
        let attribute_indices = sample
            .labels
            .iter()
            .filter(|(k, _)| *k != keys::SERVICE_NAME && *k != keys::HOST_NAME)
            .map(|(k, v)| {
                *attributes.entry((k, v)).or_insert_with(|| {
                    let value = match v {
                        LabelValue::Str(s) => string_value(s),
                        LabelValue::Num(n) => {
                            Some(proto::AnyValue { value: Some(proto::any_value::Value::IntValue(*n)) })
                        }
                    };
                    dict.attribute_table.push(proto::KeyValueAndUnit {
                        key_strindex: index(strings.get(attribute_key(k))),
                        value,
                        unit_strindex: 0,
                    });
                    index(dict.attribute_table.len() - 1)
                })
            })
            .collect();
        by_service.entry(sample.labels.service_name()).or_default().push(proto::Sample {
            stack_index,
            attribute_indices,
            link_index: 0,
            values: vec![i64::try_from(sample.count).unwrap_or(i64::MAX)],
        });
    }
    let sample_type = proto::ValueType {
        type_strindex: index(strings.get("samples")),
        unit_strindex: index(strings.get("count")),
    };
    let period_type = proto::ValueType {
        type_strindex: index(strings.get("cpu")),
        unit_strindex: index(strings.get("nanoseconds")),
    };
    let resource_profiles = by_service
        .into_iter()
        .map(|(service, samples)| proto::ResourceProfiles {
            resource: Some(proto::Resource {
                attributes: vec![
                    proto::KeyValue { key: "service.name".into(), value: string_value(service) },
                    proto::KeyValue { key: "host.name".into(), value: string_value(&run.host_name) },
                ],
            }),
            scope_profiles: vec![proto::ScopeProfiles {
                scope: Some(proto::InstrumentationScope {
                    name: "unwound".into(),
                    version: env!("CARGO_PKG_VERSION").into(),
                }),
                profiles: vec![proto::Profile {
                    sample_type: Some(sample_type.clone()),
                    samples,
                    time_unix_nano: profile.start_unix_ns.max(0) as u64,
                    duration_nano: profile.duration_ns,
                    period_type: Some(period_type.clone()),
                    period: profile.period_ns(),
                    profile_id: uuid::Uuid::new_v4().as_bytes().to_vec(),
                }],
                schema_url: String::new(),
            }],
            schema_url: String::new(),
        })
        .collect();
    dict.string_table = strings.table;
    proto::ExportProfilesServiceRequest { resource_profiles, dictionary: Some(dict) }.encode_to_vec()
}
