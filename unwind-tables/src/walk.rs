//! The userspace reference walker: unwinds a stack frame by frame with the shared
//! [`step`] rule.

use crate::layout::{step, Memory, Registers, Step, StepError, UnwindRule};

/// One unwound frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Frame {
    /// The frame's pc: the sampled pc, or a return address.
    pub pc: u64,
    /// True when `pc` is exact (the first frame, or the frame a signal interrupted);
    /// false for return addresses, whose call is at `pc - 1`.
    pub exact: bool,
}

/// How a walk ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WalkEnd {
    /// The outermost frame was reached.
    Complete,
    /// The frame limit was reached first.
    Truncated,
    /// The walk could not continue from the last frame.
    Failed(StepError),
}

/// Unwinds from `regs`, finding each frame's rule with `rule_for(pc)` (the pc to look up:
/// already adjusted to the call instruction for return addresses). At most `max_frames`.
pub fn walk(
    regs: Registers,
    mem: &mut impl Memory,
    mut rule_for: impl FnMut(u64) -> Option<UnwindRule>,
    max_frames: usize,
) -> (Vec<Frame>, WalkEnd) {
    let mut frames = vec![Frame { pc: regs.rip, exact: true }];
    let mut regs = regs;
    let mut exact = true;
    loop {
        if frames.len() >= max_frames {
            return (frames, WalkEnd::Truncated);
        }
        let lookup = if exact { regs.rip } else { regs.rip.wrapping_sub(1) };
        let Some(rule) = rule_for(lookup) else { return (frames, WalkEnd::Failed(StepError::NoRule)) };
        match step(&rule, &regs, mem) {
            Step::Caller { regs: next, exact: e } => {
                frames.push(Frame { pc: next.rip, exact: e });
                regs = next;
                exact = e;
            }
            Step::End => return (frames, WalkEnd::Complete),
            Step::Failed(err) => return (frames, WalkEnd::Failed(err)),
        }
    }
}
