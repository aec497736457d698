//! Least privilege: once the walker is loaded and attached, the agent keeps only the
//! capabilities it uses while it samples, in each of its threads, and gives up for good
//! every other one (bounding set too, so no program it could run regains them).

use caps::{CapSet, Capability, CapsHashSet};

/// What the agent uses after start-up, and why.
pub(crate) const KEPT: [(Capability, &str); 6] = [
    // New table segments (BPF maps) as processes come and go.
    (Capability::CAP_BPF, "BPF maps created while sampling"),
    (Capability::CAP_PERFMON, "perf events and BPF reads of other processes"),
    // /proc/PID/{maps,mem,root} and process_vm_readv of processes with other credentials.
    (
        Capability::CAP_SYS_PTRACE,
        "the memory maps of processes with other credentials or more capabilities (their frames are walked by frame pointers and stay unnamed)",
    ),
    // Mapped files and their directories whatever their owner and mode.
    (Capability::CAP_DAC_READ_SEARCH, "mapped files its user may not read (their frames stay unnamed)"),
    // Kernel symbol addresses in /proc/kallsyms (zero without it).
    (Capability::CAP_SYSLOG, "kernel symbol addresses (kernel frames stay unnamed unless cached this boot)"),
    // /proc/PID/map_files: files deleted or replaced since they were mapped.
    (Capability::CAP_CHECKPOINT_RESTORE, "mapped files deleted or replaced since (their frames stay unnamed)"),
];

/// Why the capabilities could not be dropped.
#[derive(Debug)]
pub(crate) struct DropError(caps::errors::CapsError);

impl std::fmt::Display for DropError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "cannot drop capabilities: {}", self.0)
    }
}

impl std::error::Error for DropError {}

/// Drops every capability outside [`KEPT`] from this thread and every thread of rayon's
/// global pool (threads started later inherit the result). Returns the capabilities kept:
/// those of [`KEPT`] the agent had.
pub(crate) fn drop_all_but_kept() -> Result<CapsHashSet, DropError> {
    let results = rayon::broadcast(|_| drop_in_this_thread());
    results.into_iter().collect::<Result<Vec<_>, _>>()?;
    drop_in_this_thread()
}

fn drop_in_this_thread() -> Result<CapsHashSet, DropError> {
    let keep: CapsHashSet = KEPT.iter().map(|(c, _)| *c).collect();
    let permitted = caps::read(None, CapSet::Permitted).map_err(DropError)?;
    let kept: CapsHashSet = permitted.intersection(&keep).copied().collect();
    // The bounding set first: changing it takes CAP_SETPCAP, dropped below.
    if caps::has_cap(None, CapSet::Effective, Capability::CAP_SETPCAP).map_err(DropError)? {
        for c in caps::read(None, CapSet::Bounding).map_err(DropError)?.difference(&keep) {
            caps::drop(None, CapSet::Bounding, *c).map_err(DropError)?;
        }
    }
    caps::clear(None, CapSet::Ambient).map_err(DropError)?;
    caps::clear(None, CapSet::Inheritable).map_err(DropError)?;
    caps::set(None, CapSet::Effective, &kept).map_err(DropError)?;
    caps::set(None, CapSet::Permitted, &kept).map_err(DropError)?;
    Ok(kept)
}

/// `CAP_A, CAP_B, …` in [`KEPT`]'s order.
pub(crate) fn names(set: &CapsHashSet) -> String {
    let names: Vec<String> =
        KEPT.iter().filter(|(c, _)| set.contains(c)).map(|(c, _)| c.to_string()).collect();
    if names.is_empty() {
        "none".to_string()
    } else {
        names.join(", ")
    }
}

/// One line for each capability of [`KEPT`] the agent was not given whose lack costs it
/// something, to say before it samples.
pub(crate) fn missing() -> Vec<String> {
    let Ok(have) = caps::read(None, CapSet::Effective) else { return Vec::new() };
    KEPT.iter()
        .filter(|(c, _)| !have.contains(c) && *c != Capability::CAP_BPF && *c != Capability::CAP_PERFMON)
        .map(|(c, why)| format!("warning: without {c} the agent goes without {why}"))
        .collect()
}
