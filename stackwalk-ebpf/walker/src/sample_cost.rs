//! The kernel time every `cpu-clock` sample costs on this machine, whichever profiler
//! takes it: [`SampleCost`].
//!
//! This is the part of a profiler's cost that is charged to the sampled tasks, not to the
//! profiler's own process: for `perf record --call-graph dwarf`, the copy of each sample's
//! user stack; for unwound, the walk in the kernel.
//!
//! Raw tracepoints around every hrtimer callback (`hrtimer_expire_entry`/`_exit`) add up,
//! per CPU, the time of the callbacks that are `perf_swevent_hrtimer`, the interrupt
//! handler of software `cpu-clock` events: the stack copies, BPF programs and output of
//! every sampling event on that CPU. (The perf core is built without ftrace hooks, so
//! fentry cannot attach to the handler itself.)
//!
//! What is counted is the handler's calls: one per sample, plus calls in which the kernel
//! takes no sample (a timer firing on an idle CPU, for instance). The kernel does not nest
//! a program in itself on one CPU, so a sample whose timer fires while one of the two
//! programs runs for a soft hrtimer loses its entry or its exit: it goes uncounted (the
//! exit counts only for the timer whose entry it saw, and any other exit clears a start
//! left over), a rare miss and a slight undercount, never a stale start counted as a
//! sample.

use aya::maps::{Array, PerCpuArray};
use aya::programs::RawTracePoint;
use aya::{Ebpf, EbpfLoader};
use unwound_stackwalk_abi::{
    SAMPLE_COST_ENTER_PROGRAM, SAMPLE_COST_EXIT_PROGRAM, SAMPLE_COST_MAP, SAMPLE_COST_TARGET_MAP,
};
use unwound_symbolize::KernelSymbols;

use crate::error::{Context as _, Error, Result};

/// The traced function: every software `cpu-clock` sample runs through it.
pub const TRACED: &str = "perf_swevent_hrtimer";

/// Sampling interrupts counted so far and their kernel time.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SampleCostTotals {
    /// Calls of the sampling interrupt handler.
    pub samples: u64,
    /// Their kernel time, ns.
    pub kernel_ns: u64,
}

/// Times every `cpu-clock` sample's kernel work while it lives (the programs detach when it
/// drops).
pub struct SampleCost {
    ebpf: Ebpf,
}

impl SampleCost {
    /// Loads and attaches the two tracepoint programs.
    pub fn start() -> Result<Self> {
        crate::check_privileges()?;
        crate::raise_memlock_limit();
        let btf = std::fs::read("/sys/kernel/btf/vmlinux")
            .context("kernel BTF (/sys/kernel/btf/vmlinux) is needed to read timers")?;
        let offset = struct_member_offset(&btf, "hrtimer", "function")
            .ok_or(Error::Object("struct hrtimer with a function member in the kernel's BTF"))?;
        let target = KernelSymbols::load()
            .map_err(|e| Error::Symbols { what: "cannot read kernel symbols", source: Box::new(e) })?
            .address_of(TRACED)
            .ok_or(Error::Object("perf_swevent_hrtimer in /proc/kallsyms"))?;
        let mut ebpf = EbpfLoader::new().load(crate::BPF_OBJECT).map_err(|e| Error::Load(Box::new(e)))?;
        {
            let mut config: Array<_, u64> = Array::try_from(
                ebpf.map_mut(SAMPLE_COST_TARGET_MAP).ok_or(Error::Object("SAMPLE_COST_TARGET map"))?,
            )?;
            config.set(0, target, 0)?;
            config.set(1, u64::from(offset), 0)?;
        }
        // The links live as long as `ebpf`: detached when it drops. The exit program first:
        // an entry seen before it is attached would leave a start time for the next exit of
        // any timer on that CPU.
        for (program, tracepoint) in [
            (SAMPLE_COST_EXIT_PROGRAM, "hrtimer_expire_exit"),
            (SAMPLE_COST_ENTER_PROGRAM, "hrtimer_expire_entry"),
        ] {
            let p = <&mut RawTracePoint>::try_from(
                ebpf.program_mut(program).ok_or(Error::Object("sample-cost program"))?,
            )
            .context("not a raw tracepoint")?;
            p.load().map_err(|e| Error::Verifier { program, source: Box::new(e) })?;
            p.attach(tracepoint).with_context(|| format!("cannot attach to the {tracepoint} tracepoint"))?;
        }
        Ok(SampleCost { ebpf })
    }

    /// The totals so far, summed over CPUs.
    pub fn totals(&self) -> Result<SampleCostTotals> {
        let map: PerCpuArray<_, u64> =
            PerCpuArray::try_from(self.ebpf.map(SAMPLE_COST_MAP).ok_or(Error::Object("SAMPLE_COST map"))?)?;
        let kernel_ns: u64 = map.get(&1, 0).context("cannot read the sample times")?.iter().sum();
        let samples: u64 = map.get(&2, 0).context("cannot read the sample count")?.iter().sum();
        Ok(SampleCostTotals { samples, kernel_ns })
    }
}

/// Byte offset of `member` in `struct strukt`, from raw BTF (`/sys/kernel/btf/vmlinux`).
/// `None` when either is missing or the data is malformed; never panics.
fn struct_member_offset(btf: &[u8], strukt: &str, member: &str) -> Option<u32> {
    crate::btf::Btf::parse(btf)?.offset(strukt, &[member])
}

#[cfg(test)]
mod tests {
    use super::struct_member_offset;

    /// A BTF blob with `int` and `struct pair { int a; int b; }` (b at bit 32), written by hand
    /// from the format in include/uapi/linux/btf.h.
    fn pair_btf(kind_flag: bool) -> Vec<u8> {
        let strings = b"\0int\0pair\0a\0b\0";
        let mut types = Vec::new();
        let mut word = |v: u32| types.extend_from_slice(&v.to_le_bytes());
        // [1] INT "int" size 4, 32 bits signed
        word(1);
        word(1 << 24);
        word(4);
        word((1 << 24) | 32);
        // [2] STRUCT "pair" size 8, two members
        word(5);
        word((4 << 24) | 2 | if kind_flag { 1 << 31 } else { 0 });
        word(8);
        for (name, bits) in [(10u32, 0u32), (12, 32)] {
            word(name);
            word(1);
            // With kind_flag, a 32-bit bitfield size in the high byte (masked off when read).
            word(if kind_flag { bits | (32 << 24) } else { bits });
        }
        let mut btf = Vec::new();
        btf.extend_from_slice(&0xeb9fu16.to_le_bytes());
        btf.extend_from_slice(&[1, 0]);
        for v in [24u32, 0, types.len() as u32, types.len() as u32, strings.len() as u32] {
            btf.extend_from_slice(&v.to_le_bytes());
        }
        btf.extend_from_slice(&types);
        btf.extend_from_slice(strings);
        btf
    }

    #[test]
    fn finds_a_members_byte_offset() {
        for kind_flag in [false, true] {
            let btf = pair_btf(kind_flag);
            assert_eq!(struct_member_offset(&btf, "pair", "b"), Some(4));
            assert_eq!(struct_member_offset(&btf, "pair", "a"), Some(0));
            assert_eq!(struct_member_offset(&btf, "pair", "c"), None);
            assert_eq!(struct_member_offset(&btf, "int", "a"), None);
        }
    }

    #[test]
    fn truncated_or_foreign_btf_is_none_not_a_panic() {
        let btf = pair_btf(false);
        for len in 0..btf.len() {
            let _ = struct_member_offset(&btf[..len], "pair", "b");
        }
        let mut big_endian = btf.clone();
        big_endian[0..2].copy_from_slice(&0xeb9fu16.to_be_bytes());
        assert_eq!(struct_member_offset(&big_endian, "pair", "b"), None);
    }

    /// The running kernel's `struct hrtimer` has `function` after its timerqueue node and
    /// soft expiry (40 on x86-64 since 2.6); checked against our own reading of the BTF by
    /// `bpftool`-free means: the node is 32 bytes and `_softexpires` 8.
    #[test]
    fn reads_the_running_kernels_hrtimer() {
        let Ok(btf) = std::fs::read("/sys/kernel/btf/vmlinux") else {
            eprintln!("skipped: no /sys/kernel/btf/vmlinux");
            return;
        };
        let node = struct_member_offset(&btf, "hrtimer", "node").expect("hrtimer.node");
        let soft = struct_member_offset(&btf, "hrtimer", "_softexpires").expect("hrtimer._softexpires");
        let function = struct_member_offset(&btf, "hrtimer", "function").expect("hrtimer.function");
        assert_eq!(node, 0);
        assert!(soft >= 24 && function == soft + 8, "node {node}, _softexpires {soft}, function {function}");
    }
}
