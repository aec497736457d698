//! Profile writers: folded stacks, SVG flame graph, gzipped pprof.

use std::collections::HashMap;
use std::io::Write;

use anyhow::Context as _;

use crate::profile::{Frame, Stack};

/// What the writers need beside the stacks.
pub struct ProfileMeta {
    pub frequency: u64,
    pub duration_ns: u64,
    pub start_unix_ns: i64,
}

/// One line per stack: `comm;root;...;leaf;kernel_root_[k];...;kernel_leaf_[k] count`.
/// Functions inlined into a frame follow it with the `_[i]` suffix.
pub fn folded_lines(stacks: &[Stack]) -> Vec<String> {
    let mut lines: Vec<String> = stacks
        .iter()
        .map(|s| {
            let mut line = String::with_capacity(64 + s.frames.len() * 24);
            line.push_str(&s.comm);
            for f in &s.frames {
                for (i, name) in f.names_root_first().enumerate() {
                    line.push(';');
                    line.push_str(&name.replace(';', ":"));
                    if f.kernel {
                        line.push_str("_[k]");
                    } else if i > 0 {
                        // Inlined into the frame before it (flamegraph.pl's marker).
                        line.push_str("_[i]");
                    }
                }
            }
            line
        })
        .zip(stacks.iter().map(|s| s.count))
        .fold(HashMap::<String, u64>::new(), |mut m, (l, c)| {
            *m.entry(l).or_default() += c;
            m
        })
        .into_iter()
        .map(|(l, c)| format!("{l} {c}"))
        .collect();
    lines.sort();
    lines
}

pub fn write_folded(out: &mut dyn Write, stacks: &[Stack]) -> anyhow::Result<()> {
    for line in folded_lines(stacks) {
        writeln!(out, "{line}")?;
    }
    Ok(())
}

pub fn write_svg(out: &mut dyn Write, stacks: &[Stack], meta: &ProfileMeta) -> anyhow::Result<()> {
    let lines = folded_lines(stacks);
    let total: u64 = stacks.iter().map(|s| s.count).sum();
    let mut options = inferno::flamegraph::Options::default();
    options.title = "unwound CPU profile".to_string();
    options.subtitle =
        Some(format!("{total} samples at {} Hz over {:.1} s", meta.frequency, meta.duration_ns as f64 / 1e9));
    options.count_name = "samples".to_string();
    if lines.is_empty() {
        // inferno refuses an empty profile; a user still gets a valid (empty) SVG.
        write!(
            out,
            "<?xml version=\"1.0\" standalone=\"no\"?>\n<svg version=\"1.1\" width=\"1200\" height=\"60\" \
             xmlns=\"http://www.w3.org/2000/svg\"><text x=\"600\" y=\"30\" text-anchor=\"middle\">\
             unwound: no samples</text></svg>\n"
        )?;
        return Ok(());
    }
    inferno::flamegraph::from_lines(&mut options, lines.iter().map(String::as_str), out)
        .context("cannot render the flame graph")?;
    Ok(())
}

/// The subset of `perftools.profiles` (profile.proto) the agent writes.
mod pprof {
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

#[derive(Default)]
struct Strings {
    table: Vec<String>,
    index: HashMap<String, i64>,
}

impl Strings {
    fn new() -> Self {
        let mut s = Strings::default();
        s.get("");
        s
    }
    fn get(&mut self, v: &str) -> i64 {
        if let Some(&i) = self.index.get(v) {
            return i;
        }
        let i = self.table.len() as i64;
        self.table.push(v.to_string());
        self.index.insert(v.to_string(), i);
        i
    }
}

/// Gzipped `perftools.profiles.Profile` with sample types `samples/count` and
/// `cpu/nanoseconds`; each sample is labelled with `pid` and `comm`. A location is a
/// (module, function, address) triple: addresses are file virtual addresses for user code,
/// so one location serves every process that maps the same file.
pub fn write_pprof(out: &mut dyn Write, stacks: &[Stack], meta: &ProfileMeta) -> anyhow::Result<()> {
    use prost::Message as _;
    let mut strings = Strings::new();
    let mut mappings: HashMap<String, u64> = HashMap::new();
    let mut functions: HashMap<(String, String, String), u64> = HashMap::new();
    let mut locations: HashMap<(String, String, u64), u64> = HashMap::new();
    let mut profile = pprof::Profile::default();
    let period = (1_000_000_000 / meta.frequency.max(1)) as i64;
    let samples_t = pprof::ValueType { r#type: strings.get("samples"), unit: strings.get("count") };
    let cpu_t = pprof::ValueType { r#type: strings.get("cpu"), unit: strings.get("nanoseconds") };
    profile.sample_type = vec![samples_t, cpu_t.clone()];
    profile.period_type = Some(cpu_t);
    profile.period = period;
    profile.time_nanos = meta.start_unix_ns;
    profile.duration_nanos = meta.duration_ns as i64;
    let (pid_key, comm_key) = (strings.get("pid"), strings.get("comm"));
    // pprof takes the first mapping for the main binary: the outermost user frame's object
    // of the heaviest stack (an executable), not whatever a leaf was in (JIT code).
    if let Some(root) =
        stacks.first().and_then(|s| s.frames.iter().find(|f| !f.kernel && f.module != "[unknown]"))
    {
        mappings.insert(root.module.clone(), 1);
        profile.mapping.push(pprof::Mapping {
            id: 1,
            filename: strings.get(&root.module),
            has_functions: true,
            ..Default::default()
        });
    }

    let mut location_of = |f: &Frame, profile: &mut pprof::Profile, strings: &mut Strings| -> u64 {
        let lkey = (f.module.clone(), f.name.clone(), f.address);
        if let Some(&id) = locations.get(&lkey) {
            return id;
        }
        let next_mapping = mappings.len() as u64 + 1;
        let mapping_id = *mappings.entry(f.module.clone()).or_insert_with(|| {
            profile.mapping.push(pprof::Mapping {
                id: next_mapping,
                filename: strings.get(&f.module),
                has_functions: true,
                ..Default::default()
            });
            next_mapping
        });
        let mut function_id = |name: &str,
                               file: &str,
                               profile: &mut pprof::Profile,
                               strings: &mut Strings| {
            let next_function = functions.len() as u64 + 1;
            *functions.entry((f.module.clone(), name.to_string(), file.to_string())).or_insert_with(|| {
                let shown = if f.kernel { format!("{name}_[k]") } else { name.to_string() };
                let n = strings.get(&shown);
                let filename = if file.is_empty() { 0 } else { strings.get(file) };
                profile.function.push(pprof::Function {
                    id: next_function,
                    name: n,
                    system_name: n,
                    filename,
                    ..Default::default()
                });
                next_function
            })
        };
        // Innermost inlined function first, the containing function last (pprof's order).
        let line: Vec<pprof::Line> = if f.lines.is_empty() {
            vec![pprof::Line { function_id: function_id(&f.name, "", profile, strings), line: 0 }]
        } else {
            let last = f.lines.len() - 1;
            f.lines
                .iter()
                .enumerate()
                .map(|(i, l)| {
                    let name = if i == last { f.name.as_str() } else { l.function.as_str() };
                    pprof::Line {
                        function_id: function_id(name, &l.file, profile, strings),
                        line: l.line.into(),
                    }
                })
                .collect()
        };
        let id = locations.len() as u64 + 1;
        profile.location.push(pprof::Location { id, mapping_id, address: f.address, line });
        locations.insert(lkey, id);
        id
    };

    for s in stacks {
        let location_id: Vec<u64> =
            s.frames.iter().rev().map(|f| location_of(f, &mut profile, &mut strings)).collect();
        let comm = strings.get(&s.comm);
        profile.sample.push(pprof::Sample {
            location_id,
            value: vec![s.count as i64, s.count as i64 * period],
            label: vec![
                pprof::Label { key: pid_key, num: s.pid as i64, ..Default::default() },
                pprof::Label { key: comm_key, str: comm, ..Default::default() },
            ],
        });
    }
    profile.string_table = strings.table;
    let mut gz = flate2::write::GzEncoder::new(out, flate2::Compression::default());
    gz.write_all(&profile.encode_to_vec())?;
    gz.finish()?;
    Ok(())
}
