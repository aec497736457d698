//! The CFA programs: decoded, evaluated from the CIE's initial state, and each row's state
//! converted to an [`UnwindRule`].

use super::builder::{Builder, GroupOut};
use super::cie::CieInfo;
use super::encoding::{sleb, uleb, uleb_inline, SectionAt};
use super::fde_list::Fde;
use crate::layout::*;
use gimli::DwCfa;

/// A register's rule while evaluating CFI.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Reg {
    Same,
    Undefined,
    AtCfa(i64),
    Other,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Cfa {
    RegOffset(u16, i64),
    Expression(usize, usize),
}

/// The part of the CFI state the tables need: CFA, rbp, return address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct State {
    pub(super) cfa: Cfa,
    /// Last register and offset set by a def_cfa* instruction: binutils' readelf and the
    /// GCC unwinder keep them across a CFA expression, and hand-written assembly (libgcrypt)
    /// relies on `def_cfa_register` after `def_cfa_expression`; the spec calls that invalid.
    pub(super) last_reg: u16,
    pub(super) last_off: i64,
    pub(super) rbp: Reg,
    pub(super) ra: Reg,
}

pub(super) const RSP: u16 = gimli::X86_64::RSP.0;
pub(super) const RBP: u16 = gimli::X86_64::RBP.0;
pub(super) const RA: u16 = gimli::X86_64::RA.0;
/// `advance_loc`, `offset` and `restore` are told apart by an opcode's high 2 bits and
/// carry their operand in the low 6.
const HIGH_BITS: u8 = 0b1100_0000;
const LOW_BITS: u8 = !HIGH_BITS;
pub(super) const MAX_STATE_STACK: usize = 64;

impl State {
    fn reg_mut(&mut self, r: u16) -> Option<&mut Reg> {
        match r {
            RBP => Some(&mut self.rbp),
            RA => Some(&mut self.ra),
            _ => None,
        }
    }
}

/// Evaluates one instruction; `initial` is the CIE's state (for DW_CFA_restore).
pub(super) fn apply(
    ins: &gimli::CallFrameInstruction<usize>,
    st: &mut State,
    initial: &State,
    stack: &mut Vec<State>,
    _caf: u64,
    daf: i64,
) -> Result<(), ()> {
    use gimli::CallFrameInstruction as I;
    match *ins {
        I::DefCfa { register, offset } => {
            let off = i64::try_from(offset).map_err(|_| ())?;
            st.cfa = Cfa::RegOffset(register.0, off);
            st.last_reg = register.0;
            st.last_off = off;
        }
        I::DefCfaSf { register, factored_offset } => {
            let off = factored_offset.checked_mul(daf).ok_or(())?;
            st.cfa = Cfa::RegOffset(register.0, off);
            st.last_reg = register.0;
            st.last_off = off;
        }
        I::DefCfaRegister { register } => {
            st.cfa = Cfa::RegOffset(register.0, st.last_off);
            st.last_reg = register.0;
        }
        I::DefCfaOffset { offset } => {
            let off = i64::try_from(offset).map_err(|_| ())?;
            st.cfa = Cfa::RegOffset(st.last_reg, off);
            st.last_off = off;
        }
        I::DefCfaOffsetSf { factored_offset } => {
            let off = factored_offset.checked_mul(daf).ok_or(())?;
            st.cfa = Cfa::RegOffset(st.last_reg, off);
            st.last_off = off;
        }
        I::DefCfaExpression { expression } => st.cfa = Cfa::Expression(expression.offset, expression.length),
        I::Undefined { register } => {
            if let Some(r) = st.reg_mut(register.0) {
                *r = Reg::Undefined;
            }
        }
        I::SameValue { register } => {
            if let Some(r) = st.reg_mut(register.0) {
                *r = Reg::Same;
            }
        }
        I::Offset { register, factored_offset } => {
            let off = i64::try_from(factored_offset).ok().and_then(|f| f.checked_mul(daf)).ok_or(())?;
            if let Some(r) = st.reg_mut(register.0) {
                *r = Reg::AtCfa(off);
            }
        }
        I::OffsetExtendedSf { register, factored_offset } => {
            let off = factored_offset.checked_mul(daf).ok_or(())?;
            if let Some(r) = st.reg_mut(register.0) {
                *r = Reg::AtCfa(off);
            }
        }
        I::ValOffset { register, .. }
        | I::ValOffsetSf { register, .. }
        | I::Expression { register, .. }
        | I::ValExpression { register, .. }
        | I::Register { dest_register: register, .. } => {
            if let Some(r) = st.reg_mut(register.0) {
                *r = Reg::Other;
            }
        }
        I::Restore { register } => {
            let init = match register.0 {
                RBP => initial.rbp,
                RA => initial.ra,
                _ => return Ok(()),
            };
            if let Some(r) = st.reg_mut(register.0) {
                *r = init;
            }
        }
        I::RememberState => {
            if stack.len() >= MAX_STATE_STACK {
                return Err(());
            }
            stack.push(*st);
        }
        I::RestoreState => {
            // The CFA is not part of the remembered state in DWARF 2 unwinders and is in
            // later ones; GCC emits the same CFA either way. Follow the spec (DWARF 5):
            // the whole row is restored.
            *st = stack.pop().ok_or(())?;
        }
        I::ArgsSize { .. } | I::NegateRaState | I::Nop | I::SetLoc { .. } | I::AdvanceLoc { .. } => {}
    }
    Ok(())
}

pub(super) fn convert_state(st: &State, section: &[u8], signal: bool, out: &mut GroupOut) -> UnwindRule {
    let unsupported = |out: &mut GroupOut, r: Unsupported| {
        out.unsupported[r as usize] += 1;
        UnwindRule::unsupported(r)
    };
    if signal {
        return UnwindRule::new(CfaKind::Signal, 0, RbpKind::Undefined, 0);
    }
    match st.ra {
        Reg::Undefined => return UnwindRule::new(CfaKind::EndOfStack, 0, RbpKind::Undefined, 0),
        Reg::AtCfa(-8) => {}
        _ => return unsupported(out, Unsupported::ReturnAddress),
    }
    let mut rule = match st.cfa {
        Cfa::RegOffset(reg, offset) => {
            let kind = match reg {
                RSP => CfaKind::Rsp,
                RBP => CfaKind::Rbp,
                _ => return unsupported(out, Unsupported::CfaRegister),
            };
            let Ok(off) = i32::try_from(offset) else { return unsupported(out, Unsupported::OffsetRange) };
            UnwindRule::new(kind, off, RbpKind::Unchanged, 0)
        }
        Cfa::Expression(offset, length) => {
            let bytes = section.get(offset..offset.saturating_add(length));
            match bytes.and_then(cfa_expression) {
                Some(r) => r,
                None => return unsupported(out, Unsupported::CfaExpression),
            }
        }
    };
    match st.rbp {
        Reg::Same => {}
        Reg::AtCfa(o) => match i8::try_from(o / 8) {
            Ok(slot) if o % 8 == 0 => rule = rule.with_rbp(RbpKind::AtCfa, slot),
            _ => return unsupported(out, Unsupported::OffsetRange),
        },
        Reg::Undefined => rule = rule.with_rbp(RbpKind::Undefined, 0),
        Reg::Other => {
            out.rbp_undefined += 1;
            rule = rule.with_rbp(RbpKind::Undefined, 0);
        }
    }
    rule
}

/// Decodes one CFA instruction at `pos` of `data` (raw bytes, faster than a general
/// reader); `None` at malformed or unknown opcodes.
pub(super) fn decode(
    data: &[u8],
    pos: &mut usize,
    caf: u64,
    loc: u64,
) -> Option<gimli::CallFrameInstruction<usize>> {
    use gimli::{CallFrameInstruction as I, Register, UnwindExpression};
    let op = *data.get(*pos)?;
    *pos += 1;
    let reg = |pos: &mut usize| -> Option<Register> { u16::try_from(uleb(data, pos)?).ok().map(Register) };
    let block = |pos: &mut usize| -> Option<UnwindExpression<usize>> {
        let len = usize::try_from(uleb(data, pos)?).ok()?;
        let offset = *pos;
        *pos = pos.checked_add(len).filter(|&e| e <= data.len())?;
        Some(UnwindExpression { offset, length: len })
    };
    let advance = |delta: u64| Some(I::SetLoc { address: loc.checked_add(delta.checked_mul(caf)?)? });
    Some(match DwCfa(op & HIGH_BITS) {
        gimli::DW_CFA_advance_loc => return advance(u64::from(op & LOW_BITS)),
        gimli::DW_CFA_offset => {
            I::Offset { register: Register(u16::from(op & LOW_BITS)), factored_offset: uleb(data, pos)? }
        }
        gimli::DW_CFA_restore => I::Restore { register: Register(u16::from(op & LOW_BITS)) },
        _ => match DwCfa(op) {
            gimli::DW_CFA_nop => I::Nop,
            gimli::DW_CFA_advance_loc1 => {
                let d = *data.get(*pos)?;
                *pos += 1;
                return advance(u64::from(d));
            }
            gimli::DW_CFA_advance_loc2 => {
                let d = u16::from_le_bytes(data.get(*pos..*pos + 2)?.try_into().ok()?);
                *pos += 2;
                return advance(u64::from(d));
            }
            gimli::DW_CFA_advance_loc4 => {
                let d = u32::from_le_bytes(data.get(*pos..*pos + 4)?.try_into().ok()?);
                *pos += 4;
                return advance(u64::from(d));
            }
            gimli::DW_CFA_offset_extended => {
                I::Offset { register: reg(pos)?, factored_offset: uleb(data, pos)? }
            }
            gimli::DW_CFA_restore_extended => I::Restore { register: reg(pos)? },
            gimli::DW_CFA_undefined => I::Undefined { register: reg(pos)? },
            gimli::DW_CFA_same_value => I::SameValue { register: reg(pos)? },
            gimli::DW_CFA_register => I::Register { dest_register: reg(pos)?, src_register: reg(pos)? },
            gimli::DW_CFA_remember_state => I::RememberState,
            gimli::DW_CFA_restore_state => I::RestoreState,
            gimli::DW_CFA_def_cfa => I::DefCfa { register: reg(pos)?, offset: uleb(data, pos)? },
            gimli::DW_CFA_def_cfa_register => I::DefCfaRegister { register: reg(pos)? },
            gimli::DW_CFA_def_cfa_offset => I::DefCfaOffset { offset: uleb(data, pos)? },
            gimli::DW_CFA_def_cfa_expression => I::DefCfaExpression { expression: block(pos)? },
            gimli::DW_CFA_expression => I::Expression { register: reg(pos)?, expression: block(pos)? },
            gimli::DW_CFA_offset_extended_sf => {
                I::OffsetExtendedSf { register: reg(pos)?, factored_offset: sleb(data, pos)? }
            }
            gimli::DW_CFA_def_cfa_sf => {
                I::DefCfaSf { register: reg(pos)?, factored_offset: sleb(data, pos)? }
            }
            gimli::DW_CFA_def_cfa_offset_sf => I::DefCfaOffsetSf { factored_offset: sleb(data, pos)? },
            gimli::DW_CFA_val_offset => {
                I::ValOffset { register: reg(pos)?, factored_offset: uleb(data, pos)? }
            }
            gimli::DW_CFA_val_offset_sf => {
                I::ValOffsetSf { register: reg(pos)?, factored_offset: sleb(data, pos)? }
            }
            gimli::DW_CFA_val_expression => I::ValExpression { register: reg(pos)?, expression: block(pos)? },
            gimli::DW_CFA_GNU_args_size => I::ArgsSize { size: uleb(data, pos)? },
            gimli::DW_CFA_GNU_negative_offset_extended => {
                let register = reg(pos)?;
                let off = i64::try_from(uleb(data, pos)?).ok()?;
                I::OffsetExtendedSf { register, factored_offset: -off }
            }
            _ => return None,
        },
    })
}

/// What [`fast_step`] did with the instruction at `pos`.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Fast {
    /// `advance_loc` to this address (at most the FDE's end).
    Advance(u64),
    /// `def_cfa_offset`, applied: only the CFA and its last offset changed.
    CfaOffset,
    /// A rule for rbp or the return address, applied.
    Applied,
    /// Applied with no effect on the CFA, rbp or the return address (`nop`, another
    /// register's rule).
    Unaffected,
    /// Malformed operands, or an advance past the FDE's end.
    Malformed,
    /// Another opcode: left to `decode` and `apply`; `pos` is unchanged.
    Other,
}

/// The opcodes of nearly every row (`advance_loc`, `advance_loc1`, `advance_loc2`,
/// `offset`, `def_cfa_offset`, `restore`, `nop`), decoded and applied in one step: the same effect as
/// [`decode`] then [`apply`] (tested against them), one unpredictable branch instead of two.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub(super) fn fast_step(
    ins: &[u8],
    pos: &mut usize,
    loc: u64,
    end: u64,
    st: &mut State,
    initial: &State,
    caf: u64,
    daf: i64,
) -> Fast {
    let Some(&op) = ins.get(*pos) else { return Fast::Other };
    let advance = |pos: &mut usize, delta: u64, len: usize| match delta
        .checked_mul(caf)
        .and_then(|d| loc.checked_add(d))
    {
        Some(a) if a <= end => {
            *pos += len;
            Fast::Advance(a)
        }
        _ => Fast::Malformed,
    };
    match DwCfa(op & HIGH_BITS) {
        gimli::DW_CFA_advance_loc => advance(pos, u64::from(op & LOW_BITS), 1),
        gimli::DW_CFA_offset => {
            let mut p = *pos + 1;
            let off =
                uleb_inline(ins, &mut p).and_then(|f| i64::try_from(f).ok()).and_then(|f| f.checked_mul(daf));
            let Some(off) = off else { return Fast::Malformed };
            *pos = p;
            match st.reg_mut(u16::from(op & LOW_BITS)) {
                Some(r) => {
                    *r = Reg::AtCfa(off);
                    Fast::Applied
                }
                None => Fast::Unaffected,
            }
        }
        gimli::DW_CFA_restore => {
            *pos += 1;
            match u16::from(op & LOW_BITS) {
                RBP => st.rbp = initial.rbp,
                RA => st.ra = initial.ra,
                _ => return Fast::Unaffected,
            }
            Fast::Applied
        }
        _ => match DwCfa(op) {
            gimli::DW_CFA_nop => {
                *pos += 1;
                Fast::Unaffected
            }
            gimli::DW_CFA_advance_loc1 => match ins.get(*pos + 1) {
                Some(&d) => advance(pos, u64::from(d), 2),
                None => Fast::Malformed,
            },
            gimli::DW_CFA_advance_loc2 => match ins.get(*pos + 1..*pos + 3) {
                Some(d) => advance(pos, u64::from(u16::from_le_bytes([d[0], d[1]])), 3),
                None => Fast::Malformed,
            },
            gimli::DW_CFA_def_cfa_offset => {
                let mut p = *pos + 1;
                let Some(off) = uleb_inline(ins, &mut p).and_then(|o| i64::try_from(o).ok()) else {
                    return Fast::Malformed;
                };
                *pos = p;
                st.cfa = Cfa::RegOffset(st.last_reg, off);
                st.last_off = off;
                Fast::CfaOffset
            }
            _ => Fast::Other,
        },
    }
}

/// Why an FDE was not evaluated to its end.
pub(super) enum Failure {
    /// Its CFI is malformed (counted; the rows before the fault are kept).
    Malformed,
    /// The header search table's pair does not match this record: scan the records.
    NotListed,
}

/// Runs an FDE's CFI program from its CIE's initial state, feeding rows to the builder.
pub(super) fn evaluate_fde(
    fde: &Fde,
    code_base: u64,
    cie: &CieInfo,
    data: &[u8],
    sec: &SectionAt<'_>,
    stack: &mut Vec<State>,
    b: &mut Builder<'_>,
) -> Result<(), Failure> {
    let (start, range, ins_start, ins_end) = fde.body(data, cie, sec).ok_or(Failure::Malformed)?;
    if code_base.checked_add(u64::from(fde.start)) != Some(start) {
        // Only a header search table that does not match its records gets here.
        return Err(Failure::NotListed);
    }
    if range == 0 || start == 0 {
        return Ok(()); // describes no code (a scan leaves these out)
    }
    if range > u64::from(u32::MAX) {
        return Err(Failure::NotListed);
    }
    let end = start.checked_add(range).ok_or(Failure::NotListed)?;
    let mut loc = start;
    let initial = cie.initial;
    let mut st = initial;
    stack.clear();
    let ins = data.get(ins_start..ins_end).ok_or(Failure::Malformed)?;
    let signal = cie.signal;
    let emit = |from: u64, to: u64, st: &State, b: &mut Builder<'_>| {
        if to > from {
            let rule = convert_state(st, data, signal, &mut b.out);
            b.row(from, to.min(end), rule);
        }
    };
    // The rule of `st` while it is a plain one (CFA = rsp or rbp + offset, nothing counted
    // when converted), kept up to date through `def_cfa_offset`; `None`: convert `st` again.
    let mut known: Option<UnwindRule> = None;
    let mut pos = 0usize;
    while pos < ins.len() {
        match fast_step(ins, &mut pos, loc, end, &mut st, &initial, cie.code_align, cie.data_align) {
            Fast::Advance(a) => {
                if a > loc {
                    let rule = match known {
                        Some(r) => r,
                        None => {
                            let r = convert_state(&st, data, signal, &mut b.out);
                            let plain = matches!(st.cfa, Cfa::RegOffset(..))
                                && matches!(r.cfa_kind(), Some(CfaKind::Rsp | CfaKind::Rbp))
                                && st.rbp != Reg::Other;
                            known = plain.then_some(r);
                            r
                        }
                    };
                    debug_assert_eq!(rule, convert_state(&st, data, signal, &mut GroupOut::default()));
                    b.row(loc, a, rule);
                }
                loc = a;
                continue;
            }
            Fast::CfaOffset => {
                known = known.and_then(|r| {
                    let (kind, off) = match st.cfa {
                        Cfa::RegOffset(RSP, off) => (CfaKind::Rsp, off),
                        Cfa::RegOffset(RBP, off) => (CfaKind::Rbp, off),
                        _ => return None,
                    };
                    let cfa_offset = i32::try_from(off).ok()?;
                    (r.cfa_kind() == Some(kind)).then_some(UnwindRule { cfa_offset, ..r })
                });
                continue;
            }
            Fast::Applied => {
                known = None;
                continue;
            }
            Fast::Unaffected => continue,
            Fast::Malformed => {
                emit(loc, end, &st, b);
                return Err(Failure::Malformed);
            }
            Fast::Other => {}
        }
        known = None;
        let Some(i) = decode(ins, &mut pos, cie.code_align, loc) else {
            emit(loc, end, &st, b);
            return Err(Failure::Malformed);
        };
        // Expressions are located relative to the instruction slice; make them section offsets.
        let i = match i {
            gimli::CallFrameInstruction::DefCfaExpression { expression } => {
                gimli::CallFrameInstruction::DefCfaExpression {
                    expression: gimli::UnwindExpression {
                        offset: expression.offset + ins_start,
                        length: expression.length,
                    },
                }
            }
            other => other,
        };
        if let gimli::CallFrameInstruction::SetLoc { address } = i {
            if address < loc || address > end {
                emit(loc, end, &st, b);
                return Err(Failure::Malformed);
            }
            emit(loc, address, &st, b);
            loc = address;
            continue;
        }
        if apply(&i, &mut st, &initial, stack, cie.code_align, cie.data_align).is_err() {
            emit(loc, end, &st, b);
            return Err(Failure::Malformed);
        }
    }
    emit(loc, end, &st, b);
    Ok(())
}

/// Recognises the CFA expressions compilers emit on x86-64.
pub(super) fn cfa_expression(e: &[u8]) -> Option<UnwindRule> {
    use gimli::*;
    const BREG_RBP: u8 = DW_OP_breg6.0;
    const BREG_RSP: u8 = DW_OP_breg7.0;
    const BREG_RIP: u8 = DW_OP_breg16.0;
    const LIT0: u8 = DW_OP_lit0.0;
    const LIT3: u8 = DW_OP_lit3.0;
    const LIT10: u8 = DW_OP_lit10.0;
    const LIT11: u8 = DW_OP_lit11.0;
    const LIT15: u8 = DW_OP_lit15.0;
    const AND: u8 = DW_OP_and.0;
    const GE: u8 = DW_OP_ge.0;
    const SHL: u8 = DW_OP_shl.0;
    const PLUS: u8 = DW_OP_plus.0;
    const DEREF: u8 = DW_OP_deref.0;
    const PLUS_UCONST: u8 = DW_OP_plus_uconst.0;
    // GCC's PLT: breg7 8; breg16 0; lit15; and; lit11|lit10; ge; lit3; shl; plus
    if let [BREG_RSP, 8, BREG_RIP, 0, LIT15, AND, lit @ (LIT10 | LIT11), GE, LIT3, SHL, PLUS] = e {
        return Some(UnwindRule::new(CfaKind::Plt, i32::from(*lit - LIT0), RbpKind::Unchanged, 0));
    }
    // *(reg + off) [+ k]
    let kind = match *e.first()? {
        BREG_RSP => CfaKind::DerefRsp,
        BREG_RBP => CfaKind::DerefRbp,
        _ => return None,
    };
    let mut pos = 1;
    let off = i32::try_from(sleb(e, &mut pos)?).ok()?;
    if e.get(pos) != Some(&DEREF) {
        return None;
    }
    pos += 1;
    let add = match e.get(pos) {
        None => 0,
        Some(&PLUS_UCONST) => {
            pos += 1;
            let k = i8::try_from(uleb(e, &mut pos)?).ok()?;
            if pos != e.len() {
                return None;
            }
            k
        }
        Some(_) => return None,
    };
    let mut r = UnwindRule::new(kind, off, RbpKind::Unchanged, 0);
    r.aux = add;
    Some(r)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn state(kind: u8, off: i64) -> State {
        let reg = |k: u8| match k % 4 {
            0 => Reg::Same,
            1 => Reg::Undefined,
            2 => Reg::AtCfa(-16),
            _ => Reg::Other,
        };
        State {
            cfa: if kind & 1 == 0 { Cfa::RegOffset(RSP, off) } else { Cfa::Expression(3, 5) },
            last_reg: if kind & 2 == 0 { RSP } else { RBP },
            last_off: off,
            rbp: reg(kind >> 2),
            ra: reg(kind >> 4),
        }
    }
    proptest! {
        #![proptest_config(ProptestConfig::with_cases(20_000))]
        /// `fast_step` does what `decode` followed by `apply` does, on any bytes: the same
        /// state, position, new location, and the same verdict on malformed input.
        #[test]
        fn fast_step_is_decode_then_apply(
            ins in proptest::collection::vec(any::<u8>(), 1..12),
            loc in any::<u64>(),
            span in prop_oneof![Just(0u64), 0..4096u64, any::<u64>()],
            caf in prop_oneof![Just(1u64), Just(4), any::<u64>()],
            daf in prop_oneof![Just(-8i64), Just(1), any::<i64>()],
            kind in any::<u8>(),
            off in prop_oneof![Just(8i64), any::<i64>()],
        ) {
            let end = loc.saturating_add(span);
            let initial = state(kind.rotate_left(3), 8);
            let before = state(kind, off);
            let (mut fast, mut fast_pos) = (before, 0usize);
            let got = fast_step(&ins, &mut fast_pos, loc, end, &mut fast, &initial, caf, daf);
            if got == Fast::Other {
                prop_assert_eq!((fast_pos, fast), (0, before));
                return Ok(());
            }
            // What the verdict promises was left alone.
            match got {
                Fast::Unaffected => prop_assert_eq!((fast.cfa, fast.rbp, fast.ra), (before.cfa, before.rbp, before.ra)),
                Fast::CfaOffset => {
                    prop_assert_eq!((fast.rbp, fast.ra, fast.last_reg), (before.rbp, before.ra, before.last_reg));
                    prop_assert_eq!(fast.cfa, Cfa::RegOffset(fast.last_reg, fast.last_off));
                }
                _ => {}
            }
            let got = match got {
                Fast::CfaOffset | Fast::Unaffected => Fast::Applied,
                other => other,
            };
            let (mut slow, mut slow_pos) = (before, 0usize);
            let want = match decode(&ins, &mut slow_pos, caf, loc) {
                None => Fast::Malformed,
                Some(gimli::CallFrameInstruction::SetLoc { address }) => {
                    if address < loc || address > end { Fast::Malformed } else { Fast::Advance(address) }
                }
                Some(i) => {
                    let mut stack = Vec::new();
                    match apply(&i, &mut slow, &initial, &mut stack, caf, daf) {
                        Ok(()) => Fast::Applied,
                        Err(()) => Fast::Malformed,
                    }
                }
            };
            prop_assert_eq!(&got, &want);
            if got != Fast::Malformed {
                prop_assert_eq!((fast_pos, fast), (slow_pos, slow));
            }
        }
    }
}
