//! Profile writers: folded stacks, SVG flame graph, gzipped pprof (encoded by `unwound-export`).

use std::collections::HashMap;
use std::io::Write;

use anyhow::Context as _;

use unwound_stackwalk::profile::Stack;

/// What the writers need beside the stacks.
pub struct ProfileMeta {
    pub frequency: u64,
    pub duration_ns: u64,
    pub start_unix_ns: i64,
}

/// One line per stack: `comm;root;...;leaf;kernel_root_[k];...;kernel_leaf_[k] count`.
/// Functions inlined into a frame follow it with the `_[i]` suffix, Python functions carry
/// `_[py]`.
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
                    } else if f.module == unwound_stackwalk::profile::PYTHON_MODULE {
                        line.push_str("_[py]");
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

/// Gzipped pprof (`unwound_export::pprof`): sample types `samples/count` and
/// `cpu/nanoseconds`, every label on each sample.
pub fn write_pprof(out: &mut dyn Write, profile: &unwound_export::Profile) -> anyhow::Result<()> {
    unwound_export::pprof::write_gzip(out, profile)?;
    Ok(())
}
