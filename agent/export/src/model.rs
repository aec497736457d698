//! The profile every encoder and exporter takes: stacks of symbolized frames with a count
//! and labels, over one interval.

use std::sync::Arc;

use crate::labels::LabelSet;

/// A CPU profile of one interval: how often each labelled stack was sampled.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Profile {
    /// When the interval started, in nanoseconds since the Unix epoch.
    pub start_unix_ns: i64,
    /// How long the interval lasted, in nanoseconds.
    pub duration_ns: u64,
    /// Samples per second on each CPU: one sample stands for `1e9 / frequency_hz` ns of CPU.
    pub frequency_hz: u64,
    /// The samples, heaviest first by convention (pprof names its first mapping after the
    /// first sample's outermost user frame).
    pub samples: Vec<Sample>,
}

impl Profile {
    /// Nanoseconds of CPU one sample stands for (at least 1).
    pub fn period_ns(&self) -> i64 {
        (1_000_000_000 / self.frequency_hz.max(1)).max(1) as i64
    }

    /// Samples over the whole profile.
    pub fn total_count(&self) -> u64 {
        self.samples.iter().map(|s| s.count).sum()
    }
}

/// One stack, how many times it was sampled, and the labels of the thread it was taken in.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    /// Root first: user frames outermost to innermost, then kernel frames likewise.
    pub frames: Vec<Frame>,
    /// Times this stack was sampled.
    pub count: u64,
    /// Labels (pid, process, thread, cgroup, service, …); shared by the samples of a thread.
    pub labels: Arc<LabelSet>,
}

/// One symbolized frame.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Frame {
    /// Function name, or a placeholder such as `libfoo.so+0x1234` or `[unknown]`.
    pub function: String,
    /// The binary or library it is in (`[kernel.kallsyms]` for the kernel).
    pub module: String,
    /// The address looked up: a file virtual address for user code, the kernel address for
    /// kernel code; 0 when nothing is known.
    pub address: u64,
    /// Kernel code (pprof shows its functions with a `_[k]` suffix).
    pub kernel: bool,
    /// Source lines, innermost inlined function first; the last one's function is
    /// [`Frame::function`]. Empty without debug information.
    pub lines: Vec<SourceLine>,
}

/// Where in the source a frame is, for one function of its inline chain.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct SourceLine {
    /// The function.
    pub function: String,
    /// The source file; empty when unknown.
    pub file: String,
    /// The line; 0 when unknown.
    pub line: u32,
}
