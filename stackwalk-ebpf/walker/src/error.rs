//! What can go wrong starting or running the walker.

use std::borrow::Cow;

/// An error of the walker: starting it (privileges, kernel, verifier, perf events) or
/// talking to its maps while it runs. What goes wrong with one table or one process while
/// sampling is not an error: it is counted in [`TableStats`](crate::TableStats) and, the
/// first time, reported as a [`Notice`](crate::Notice).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Neither root nor CAP_BPF + CAP_PERFMON.
    #[error(
        "unwound needs root (or CAP_BPF and CAP_PERFMON) to load its BPF program and open perf events; run it with sudo"
    )]
    Privileges,
    /// The kernel is older than the walker's oldest ([`OLDEST_KERNEL`](crate::OLDEST_KERNEL)).
    #[error(
        "kernel {release} is older than 5.15, the oldest unwound's walker runs on (it needs bpf_task_pt_regs); 5.17 or newer walks in one program"
    )]
    KernelTooOld {
        /// `uname -r`.
        release: String,
    },
    /// The kernel has no BTF (`/sys/kernel/btf/vmlinux`), which the walker's helpers need.
    #[error(
        "kernel {release} has no BTF (/sys/kernel/btf/vmlinux is missing; CONFIG_DEBUG_INFO_BTF=y is needed by the walker's helpers)"
    )]
    NoBtf {
        /// `uname -r`.
        release: String,
    },
    /// The kernel refused the BPF object's maps.
    #[error("the kernel refused unwound's BPF maps (a kernel ≥ 5.15 with BTF is needed)")]
    Load(#[source] Box<aya::EbpfError>),
    /// The verifier rejected one of the walker's programs.
    #[error("the kernel's verifier rejected {program}")]
    Verifier {
        /// The program's name in the object.
        program: &'static str,
        /// The verifier's answer (its log, where aya kept it).
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
    /// `--walker loop` was asked for on a kernel without `bpf_loop` (before 5.17).
    #[error("a kernel ≥ 5.17 is needed for the bpf_loop walker")]
    NoBpfLoop(#[source] Box<Error>),
    /// A `cpu-clock` perf event could not be opened or attached.
    #[error(
        "cannot open a cpu-clock perf event on CPU {cpu} (check kernel.perf_event_paranoid and that perf events are enabled)"
    )]
    PerfEvent {
        /// The CPU.
        cpu: u32,
        /// What aya said.
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
    /// A program operation (attach, detach, fd) failed.
    #[error("{what}")]
    Program {
        /// What was being done.
        what: Cow<'static, str>,
        /// What aya said.
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
    /// A map operation failed.
    #[error("{what}")]
    Map {
        /// What was being done.
        what: Cow<'static, str>,
        /// What aya said.
        #[source]
        source: Box<aya::maps::MapError>,
    },
    /// A system call or file operation failed.
    #[error("{what}")]
    Io {
        /// What was being done.
        what: Cow<'static, str>,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The kernel would not admit a segment into one of the walker's table arrays (asked
    /// once at load): no table can reach the walker on this kernel.
    #[error("the kernel refuses the walker's table segments ({array})")]
    SegmentsRefused {
        /// The array whose probe failed.
        array: &'static str,
        /// How it failed.
        #[source]
        source: Box<Error>,
    },
    /// Reading symbols (the kernel's, a file's) failed.
    #[error("{what}")]
    Symbols {
        /// What was being read.
        what: &'static str,
        /// The symbolizer's error.
        #[source]
        source: Box<unwound_symbolize::Error>,
    },
    /// The embedded BPF object lacks a map or program this crate expects (a build of the
    /// object that does not match the crate).
    #[error("the BPF object has no {0}")]
    Object(&'static str),
    /// A failure injected by this crate's tests.
    #[cfg(test)]
    #[error("refused (test)")]
    Injected,
}

impl From<aya::maps::MapError> for Error {
    fn from(e: aya::maps::MapError) -> Self {
        Error::Map { what: "a BPF map operation failed".into(), source: Box::new(e) }
    }
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Attaches what was being done to a lower-level error.
pub(crate) trait Context<T> {
    fn context(self, what: impl Into<Cow<'static, str>>) -> Result<T>;
    fn with_context<S: Into<Cow<'static, str>>>(self, what: impl FnOnce() -> S) -> Result<T>;
}

macro_rules! context_for {
    ($err:ty, $variant:ident, $wrap:expr) => {
        impl<T> Context<T> for std::result::Result<T, $err> {
            fn context(self, what: impl Into<Cow<'static, str>>) -> Result<T> {
                self.map_err(|e| Error::$variant { what: what.into(), source: $wrap(e) })
            }
            fn with_context<S: Into<Cow<'static, str>>>(self, what: impl FnOnce() -> S) -> Result<T> {
                self.map_err(|e| Error::$variant { what: what().into(), source: $wrap(e) })
            }
        }
    };
}

context_for!(aya::maps::MapError, Map, Box::new);
context_for!(aya::programs::ProgramError, Program, Box::new);
context_for!(std::io::Error, Io, std::convert::identity);

const _: () = {
    const fn shared<T: Send + Sync>() {}
    shared::<Error>();
};
