//! DWARF CFI → table.

use std::collections::HashMap;
use std::path::Path;

use gimli::{BaseAddresses, DebugFrame, EhFrame, EndianSlice, LittleEndian, UnwindSection};
use object::{Object, ObjectSection, SectionFlags};
use rayon::prelude::*;

use crate::layout::*;
use crate::{Error, Stats, UnwindTable};

type R<'a> = EndianSlice<'a, LittleEndian>;

/// Largest ELF file compiled (4 GiB).
pub const MAX_FILE_SIZE: u64 = 4 << 30;
/// Most FDEs read from one file.
pub const MAX_FDES: usize = 16 << 20;
/// Largest gap between two FDEs taken as alignment padding when its bytes are all NOPs.
pub const MAX_PADDING: u64 = 64;

/// Where the call frame information comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CfiSource {
    /// `.eh_frame` (with `.eh_frame_hdr` when present, for an already sorted FDE list).
    EhFrame,
    /// `.debug_frame`.
    DebugFrame,
}

#[derive(Clone, Copy, Debug)]
struct Fde {
    start: u64,
    offset: u64,
}

/// Executable bytes by virtual address, to tell alignment padding from code without CFI.
struct Code<'a> {
    ranges: Vec<(u64, &'a [u8])>,
}

impl Code<'_> {
    fn bytes(&self, start: u64, end: u64) -> Option<&[u8]> {
        let (base, data) = self.ranges.iter().find(|(b, d)| start >= *b && end <= b + d.len() as u64)?;
        data.get((start - base) as usize..(end - base) as usize)
    }
    /// True when `[at, next)` holds one instruction that leaves the function (`ret`,
    /// `rep ret`, `jmp`) and then only padding: no pc in `(at, next)` can be sampled.
    fn single_exit(&self, at: u64, next: u64) -> bool {
        if next == at + 1 {
            return true;
        }
        let Some(b) = self.bytes(at, next.min(at + 5)) else { return false };
        let len = match b {
            [0xc3, ..] => 1,
            [0xf3, 0xc3, ..] | [0xeb, ..] => 2,
            [0xe9, ..] if b.len() >= 5 => 5,
            _ => return false,
        };
        at + len <= next && self.is_padding(at + len, next)
    }

    /// True when every byte is part of a NOP or trap padding sequence.
    fn is_padding(&self, start: u64, end: u64) -> bool {
        if end <= start {
            return true;
        }
        if end - start > MAX_PADDING {
            return false;
        }
        match self.bytes(start, end) {
            Some(b) => b.iter().all(|x| {
                matches!(x, 0x90 | 0xcc | 0x66 | 0x2e | 0x0f | 0x1f | 0x00 | 0x40 | 0x44 | 0x80 | 0x84)
            }),
            None => end - start < 16,
        }
    }
}

/// Compiles the CFI of the ELF file at `path`.
pub fn compile_file(path: &Path) -> Result<UnwindTable, Error> {
    let file = std::fs::File::open(path).map_err(|e| Error::Io { path: path.into(), source: e })?;
    let size = file.metadata().map_err(|e| Error::Io { path: path.into(), source: e })?.len();
    if size > MAX_FILE_SIZE {
        return Err(Error::TooLarge { size });
    }
    // SAFETY: read-only private map; truncation under us faults like for every mmap reader.
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::Io { path: path.into(), source: e })?;
    compile_elf(&map)
}

/// Compiles the CFI of an ELF image in memory: `.eh_frame` when present, else `.debug_frame`.
pub fn compile_elf(data: &[u8]) -> Result<UnwindTable, Error> {
    let file = object::File::parse(data).map_err(|e| Error::Elf(e.to_string()))?;
    if file.architecture() != object::Architecture::X86_64 {
        return Err(Error::Elf(format!("unsupported architecture {:?}", file.architecture())));
    }
    let source = if file.section_by_name(".eh_frame").is_some_and(|s| s.size() > 0) {
        CfiSource::EhFrame
    } else if file.section_by_name(".debug_frame").is_some() {
        CfiSource::DebugFrame
    } else {
        return Err(Error::NoCfi);
    };
    compile_with(&file, &file, source)
}

/// Compiles `cfi_file`'s CFI for the code of `code_file` (the same file, or the binary
/// whose separate debug file holds `.debug_frame`).
pub fn compile_with(
    code_file: &object::File<'_>,
    cfi_file: &object::File<'_>,
    source: CfiSource,
) -> Result<UnwindTable, Error> {
    let mut ranges = Vec::new();
    for s in code_file.sections() {
        if let SectionFlags::Elf { sh_flags } = s.flags() {
            if sh_flags & u64::from(object::elf::SHF_EXECINSTR) != 0 {
                if let Ok(d) = s.data() {
                    ranges.push((s.address(), d));
                }
            }
        }
    }
    let code = Code { ranges };
    let text = code_file.section_by_name(".text").map_or(0, |s| s.address());
    let got = code_file.section_by_name(".got").map_or(0, |s| s.address());
    match source {
        CfiSource::EhFrame => {
            let eh = cfi_file.section_by_name(".eh_frame").ok_or(Error::NoCfi)?;
            let eh_data = eh.data().map_err(|e| Error::Elf(e.to_string()))?;
            let mut bases = BaseAddresses::default().set_eh_frame(eh.address()).set_text(text).set_got(got);
            let section = EhFrame::new(eh_data, LittleEndian);
            if let Some(h) = cfi_file.section_by_name(".eh_frame_hdr") {
                bases = bases.set_eh_frame_hdr(h.address());
            }
            // The FDE list comes from the records themselves, not from `.eh_frame_hdr`'s
            // search table: linkers list only one FDE per start address there (lld keeps an
            // empty one and drops the real one when several share an address).
            let fdes = fdes_by_scan(&section, &bases, eh_data, true)?;
            build(&section, &bases, fdes, &code)
        }
        CfiSource::DebugFrame => {
            let df = cfi_file.section_by_name(".debug_frame").ok_or(Error::NoCfi)?;
            let data = df.uncompressed_data().map_err(|e| Error::Elf(e.to_string()))?;
            let mut section = DebugFrame::new(&data, LittleEndian);
            section.set_address_size(8);
            let bases = BaseAddresses::default().set_text(text);
            let fdes = fdes_by_scan(&section, &bases, &data, false)?;
            build(&section, &bases, fdes, &code)
        }
    }
}

/// Every FDE with a non-empty range, sorted by start address. Record boundaries are found
/// by walking the length fields (cheap, serial); the FDE headers are then parsed in
/// parallel.
fn fdes_by_scan<'a, S>(
    section: &S,
    bases: &BaseAddresses,
    data: &'a [u8],
    eh_frame: bool,
) -> Result<Vec<Fde>, Error>
where
    S: UnwindSection<R<'a>> + Sync,
    S::Offset: gimli::UnwindOffset<usize> + std::hash::Hash + Eq + Send,
{
    let mut offsets: Vec<usize> = Vec::new();
    let mut pos = 0usize;
    while pos + 8 <= data.len() {
        let len32 = u32::from_le_bytes(data[pos..pos + 4].try_into().unwrap());
        if len32 == 0 {
            if eh_frame {
                break; // terminator
            }
            pos += 4;
            continue;
        }
        let (len, header) = if len32 == 0xffff_ffff {
            let Some(l) = data.get(pos + 4..pos + 12) else { break };
            (u64::from_le_bytes(l.try_into().unwrap()), 12usize)
        } else {
            (u64::from(len32), 4usize)
        };
        let id_size = if header == 12 { 8 } else { 4 };
        let Some(id) = data.get(pos + header..pos + header + id_size) else { break };
        let is_cie = if eh_frame { id.iter().all(|&b| b == 0) } else { id.iter().all(|&b| b == 0xff) };
        if !is_cie {
            offsets.push(pos);
            if offsets.len() > MAX_FDES {
                return Err(Error::Limit("FDEs"));
            }
        }
        let Some(next) = (pos as u64).checked_add(header as u64).and_then(|p| p.checked_add(len)) else {
            break;
        };
        if next > data.len() as u64 {
            return Err(Error::Dwarf(format!("record at {pos:#x} runs past the section end")));
        }
        pos = next as usize;
    }
    let per = offsets.len().div_ceil(rayon::current_num_threads().max(1) * 4).max(1);
    let mut out: Vec<Fde> = offsets
        .par_chunks(per)
        .flat_map_iter(|chunk| {
            let mut cies = HashMap::new();
            chunk
                .iter()
                .filter_map(|&off| {
                    let fde = section
                        .fde_from_offset(bases, S::Offset::from(off), |s, b, o| {
                            cached_cie(&mut cies, s, b, o)
                        })
                        .ok()?;
                    (fde.len() > 0 && fde.initial_address() != 0)
                        .then(|| Fde { start: fde.initial_address(), offset: off as u64 })
                })
                .collect::<Vec<_>>()
        })
        .collect();
    out.par_sort_unstable_by_key(|f| (f.start, f.offset));
    Ok(out)
}

fn cached_cie<'a, S: UnwindSection<R<'a>>>(
    cache: &mut HashMap<S::Offset, gimli::CommonInformationEntry<R<'a>>>,
    section: &S,
    bases: &BaseAddresses,
    offset: S::Offset,
) -> gimli::Result<gimli::CommonInformationEntry<R<'a>>>
where
    S::Offset: std::hash::Hash + Eq,
{
    if let Some(c) = cache.get(&offset) {
        return Ok(c.clone());
    }
    let c = section.cie_from_offset(bases, offset)?;
    cache.insert(offset, c.clone());
    Ok(c)
}

/// Output of one group of FDEs (contiguous in address order).
#[derive(Default)]
struct GroupOut {
    /// (address of the row run's first byte, entry with a group-local rule index).
    entries: Vec<(u64, u32)>,
    dict: Vec<UnwindRule>,
    rows: u64,
    unsupported: [u64; 8],
    rbp_undefined: u64,
}

struct Open {
    start: u64,
    base: UnwindRule,
    steps: u8,
    pops: bool,
    sizes: u8,
    restore: bool,
    /// Start of the last row in the run.
    last_row: u64,
    /// The rule in effect before this entry, and whether a restore to it is allowed.
    before: UnwindRule,
    may_restore: bool,
}

struct Builder<'c> {
    code: &'c Code<'c>,
    out: GroupOut,
    index: HashMap<UnwindRule, u16>,
    open: Option<Open>,
    /// Rule in effect at the end of the last row, and where that row ended.
    state: UnwindRule,
    last_end: Option<u64>,
    /// Page and restore bit of the last closed entry.
    last_closed: Option<(u64, bool)>,
}

impl<'c> Builder<'c> {
    fn new(code: &'c Code<'c>) -> Self {
        Builder {
            code,
            out: GroupOut::default(),
            index: HashMap::new(),
            open: None,
            state: UnwindRule::GAP,
            last_end: None,
            last_closed: None,
        }
    }

    fn rule_id(&mut self, rule: UnwindRule) -> u16 {
        if let Some(&i) = self.index.get(&rule) {
            return i;
        }
        let i = self.out.dict.len() as u16;
        self.out.dict.push(rule);
        self.index.insert(rule, i);
        i
    }

    fn close(&mut self) {
        if let Some(o) = self.open.take() {
            let id = self.rule_id(o.base);
            let e = Entry {
                page_offset: (o.start & (PAGE_SIZE - 1)) as u16,
                rule: id,
                steps: o.steps,
                pops: o.pops,
                sizes: o.sizes,
                restore: o.restore,
            };
            self.out.entries.push((o.start, e.encode()));
            self.last_closed = Some((o.start >> PAGE_SHIFT, o.restore));
        }
    }

    fn open_new(&mut self, start: u64, rule: UnwindRule) {
        self.close();
        // A restore may return to the state before this entry only when the lookup can
        // recompute it: from the previous entry of the same page (one without a restore bit
        // of its own), or from the page's start rule when this entry is the page's first.
        let page = start >> PAGE_SHIFT;
        let may_restore = match self.last_closed {
            Some((p, restore)) if p == page => !restore,
            Some(_) => true,
            None => false, // first entry of a group: the state before it is not known here
        };
        self.open = Some(Open {
            start,
            base: rule,
            steps: 0,
            pops: false,
            sizes: 0,
            restore: false,
            last_row: start,
            before: self.state,
            may_restore,
        });
        self.state = rule;
    }

    /// Whether `rule` at `start` continues the open entry: one more push/pop step, or the
    /// restore after its `ret`.
    fn try_extend(&mut self, start: u64, rule: &UnwindRule) -> bool {
        let Some(o) = self.open.as_mut() else { return false };
        if o.restore || start >> PAGE_SHIFT != o.start >> PAGE_SHIFT {
            return false;
        }
        let dist = start - o.last_row;
        if o.steps > 0
            && o.pops
            && o.may_restore
            && *rule == o.before
            && self.code.single_exit(o.last_row, start)
        {
            o.restore = true;
            self.state = *rule;
            return true;
        }
        if o.base.cfa != CfaKind::Rsp as u8
            || rule.cfa != CfaKind::Rsp as u8
            || u32::from(o.steps) >= MAX_RUN_STEPS
        {
            return false;
        }
        if dist != 1 && dist != 2 {
            return false;
        }
        let delta = i64::from(rule.cfa_offset) - i64::from(self.state.cfa_offset);
        let dir_pops = match delta {
            8 => false,
            -8 => true,
            _ => return false,
        };
        if o.steps > 0 && dir_pops != o.pops {
            return false;
        }
        // rbp: during pushes rbp still holds the caller's value, so a base rule of
        // "unchanged" stays right while later rows say it was saved; during pops the saved
        // slot at CFA + k stays intact up to the return, so "saved at CFA + k" stays right
        // after `pop rbp`.
        let base = o.base;
        let rbp_ok = if dir_pops {
            base.rbp == RbpKind::AtCfa as u8
                && ((rule.rbp == RbpKind::AtCfa as u8 && rule.rbp_slot == base.rbp_slot)
                    || rule.rbp == RbpKind::Unchanged as u8)
        } else {
            base.rbp == RbpKind::Unchanged as u8
                && (rule.rbp == RbpKind::Unchanged as u8 || rule.rbp == RbpKind::AtCfa as u8)
        };
        if !rbp_ok {
            return false;
        }
        if dist == 2 {
            o.sizes |= 1 << o.steps;
        }
        o.steps += 1;
        o.pops = dir_pops;
        o.last_row = start;
        self.state = base.advanced(u32::from(o.steps), dir_pops);
        true
    }

    fn row(&mut self, start: u64, end: u64, rule: UnwindRule) {
        self.out.rows += 1;
        let mut start = start;
        if let Some(last_end) = self.last_end {
            if start < last_end {
                // Overlapping FDEs: the earlier one wins.
                if end <= last_end {
                    return;
                }
                start = last_end;
            } else if start > last_end && !self.code.is_padding(last_end, start) {
                self.open_new(last_end, UnwindRule::GAP);
            }
        }
        self.last_end = Some(end);
        if rule == self.state
            && self.open.as_ref().is_some_and(|o| o.start >> PAGE_SHIFT == start >> PAGE_SHIFT)
        {
            return;
        }
        if self.try_extend(start, &rule) {
            return;
        }
        self.open_new(start, rule);
    }

    fn finish(mut self) -> GroupOut {
        if let Some(end) = self.last_end {
            self.open_new(end, UnwindRule::GAP);
        }
        self.close();
        self.out
    }
}

/// A register's rule while evaluating CFI.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Reg {
    Same,
    Undefined,
    AtCfa(i64),
    Other,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Cfa {
    RegOffset(u16, i64),
    Expression(usize, usize),
}

/// The part of the CFI state the tables need: CFA, rbp, return address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct State {
    cfa: Cfa,
    /// Last register and offset set by a def_cfa* instruction: binutils' readelf and the
    /// GCC unwinder keep them across a CFA expression, and hand-written assembly (libgcrypt)
    /// relies on `def_cfa_register` after `def_cfa_expression`; the spec calls that invalid.
    last_reg: u16,
    last_off: i64,
    rbp: Reg,
    ra: Reg,
}

const RSP: u16 = 7;
const RBP: u16 = 6;
const RA: u16 = 16;
const MAX_STATE_STACK: usize = 64;

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
fn apply<'a>(
    ins: &gimli::CallFrameInstruction<usize>,
    st: &mut State,
    initial: &State,
    stack: &mut Vec<State>,
    cie: &gimli::CommonInformationEntry<R<'a>>,
) -> Result<(), ()> {
    use gimli::CallFrameInstruction as I;
    let daf = cie.data_alignment_factor();
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

fn convert_state<'a, S: UnwindSection<R<'a>>>(
    st: &State,
    section: &S,
    signal: bool,
    out: &mut GroupOut,
) -> UnwindRule {
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
            let bytes = section.section().slice().get(offset..offset.saturating_add(length));
            match bytes.and_then(cfa_expression) {
                Some(r) => r,
                None => return unsupported(out, Unsupported::CfaExpression),
            }
        }
    };
    match st.rbp {
        Reg::Same => {}
        Reg::AtCfa(o) => match i8::try_from(o / 8) {
            Ok(slot) if o % 8 == 0 => {
                rule.rbp = RbpKind::AtCfa as u8;
                rule.rbp_slot = slot;
            }
            _ => return unsupported(out, Unsupported::OffsetRange),
        },
        Reg::Undefined => rule.rbp = RbpKind::Undefined as u8,
        Reg::Other => {
            out.rbp_undefined += 1;
            rule.rbp = RbpKind::Undefined as u8;
        }
    }
    rule
}

/// Runs an FDE's CFI program (after its CIE's), feeding rows to the builder.
fn evaluate_fde<'a, S: UnwindSection<R<'a>>>(
    fde: &gimli::FrameDescriptionEntry<R<'a>>,
    section: &S,
    bases: &BaseAddresses,
    cie_states: &mut HashMap<usize, State>,
    stack: &mut Vec<State>,
    b: &mut Builder<'_>,
) -> Result<(), ()>
where
    S::Offset: gimli::UnwindOffset<usize>,
{
    let cie = fde.cie();
    let initial = match cie_states.get(&cie.offset()) {
        Some(s) => *s,
        None => {
            let mut st = State {
                cfa: Cfa::RegOffset(RSP, 8),
                last_reg: RSP,
                last_off: 8,
                rbp: Reg::Same,
                ra: Reg::Same,
            };
            let init = st;
            stack.clear();
            let mut it = cie.instructions(section, bases);
            while let Some(ins) = it.next().map_err(|_| ())? {
                apply(&ins, &mut st, &init, stack, cie)?;
            }
            cie_states.insert(cie.offset(), st);
            st
        }
    };
    let signal = fde.is_signal_trampoline();
    let caf = cie.code_alignment_factor();
    let end = fde.end_address();
    let mut loc = fde.initial_address();
    let mut st = initial;
    stack.clear();
    let mut it = fde.instructions(section, bases);
    let emit = |from: u64, to: u64, st: &State, b: &mut Builder<'_>| {
        if to > from {
            let rule = convert_state(st, section, signal, &mut b.out);
            b.row(from, to.min(end), rule);
        }
    };
    loop {
        let ins = match it.next() {
            Ok(Some(i)) => i,
            Ok(None) => break,
            Err(_) => {
                emit(loc, end, &st, b);
                return Err(());
            }
        };
        let next = match ins {
            gimli::CallFrameInstruction::AdvanceLoc { delta } => {
                Some(loc.saturating_add(u64::from(delta).saturating_mul(caf)))
            }
            gimli::CallFrameInstruction::SetLoc { address } => Some(address),
            _ => None,
        };
        if let Some(next) = next {
            if next < loc || next > end {
                emit(loc, end, &st, b);
                return Err(());
            }
            emit(loc, next, &st, b);
            loc = next;
            continue;
        }
        if apply(&ins, &mut st, &initial, stack, cie).is_err() {
            emit(loc, end, &st, b);
            return Err(());
        }
    }
    emit(loc, end, &st, b);
    Ok(())
}

fn sleb(bytes: &[u8], pos: &mut usize) -> Option<i64> {
    let mut r: i64 = 0;
    let mut shift = 0;
    loop {
        let b = *bytes.get(*pos)?;
        *pos += 1;
        if shift < 64 {
            r |= i64::from(b & 0x7f) << shift;
        }
        shift += 7;
        if b & 0x80 == 0 {
            if shift < 64 && b & 0x40 != 0 {
                r |= -1i64 << shift;
            }
            return Some(r);
        }
        if shift > 70 {
            return None;
        }
    }
}

fn uleb(bytes: &[u8], pos: &mut usize) -> Option<u64> {
    let mut r: u64 = 0;
    let mut shift = 0;
    loop {
        let b = *bytes.get(*pos)?;
        *pos += 1;
        if shift < 64 {
            r |= u64::from(b & 0x7f) << shift;
        }
        shift += 7;
        if b & 0x80 == 0 {
            return Some(r);
        }
        if shift > 70 {
            return None;
        }
    }
}

/// Recognises the CFA expressions compilers emit on x86-64.
fn cfa_expression(e: &[u8]) -> Option<UnwindRule> {
    const BREG_RBP: u8 = 0x76;
    const BREG_RSP: u8 = 0x77;
    // GCC's PLT: breg7 8; breg16 0; lit15; and; lit11|lit10; ge; lit3; shl; plus
    if let [BREG_RSP, 8, 0x80, 0, 0x3f, 0x1a, lit @ (0x3a | 0x3b), 0x2a, 0x33, 0x24, 0x22] = e {
        return Some(UnwindRule::new(CfaKind::Plt, i32::from(*lit - 0x30), RbpKind::Unchanged, 0));
    }
    // *(reg + off) [+ k]
    let kind = match e.first()? {
        &BREG_RSP => CfaKind::DerefRsp,
        &BREG_RBP => CfaKind::DerefRbp,
        _ => return None,
    };
    let mut pos = 1;
    let off = i32::try_from(sleb(e, &mut pos)?).ok()?;
    if e.get(pos) != Some(&0x06) {
        return None;
    }
    pos += 1;
    let add = match e.get(pos) {
        None => 0,
        Some(0x23) => {
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

fn build<'a, S>(
    section: &S,
    bases: &BaseAddresses,
    fdes: Vec<Fde>,
    code: &Code<'_>,
) -> Result<UnwindTable, Error>
where
    S: UnwindSection<R<'a>> + Sync,
    S::Offset: gimli::UnwindOffset<usize> + std::hash::Hash + Eq + Send,
{
    let threads = rayon::current_num_threads().max(1);
    let groups = (threads * 8).min(fdes.len().max(1));
    let per = fdes.len().div_ceil(groups.max(1)).max(1);
    let outs: Vec<GroupOut> = fdes
        .par_chunks(per)
        .map(|chunk| {
            let mut b = Builder::new(code);
            let mut cies = HashMap::new();
            let mut cie_states = HashMap::new();
            let mut stack = Vec::new();
            for f in chunk {
                let offset = S::Offset::from(f.offset as usize);
                let Ok(fde) =
                    section.fde_from_offset(bases, offset, |s, b, o| cached_cie(&mut cies, s, b, o))
                else {
                    b.out.unsupported[Unsupported::Malformed as usize] += 1;
                    continue;
                };
                if evaluate_fde(&fde, section, bases, &mut cie_states, &mut stack, &mut b).is_err() {
                    b.out.unsupported[Unsupported::Malformed as usize] += 1;
                }
            }
            b.finish()
        })
        .collect();
    let _ = fdes;
    stitch(outs)
}

/// Builds a table from rows `(start, end, rule)` sorted by start (for JIT code or tests).
/// Gaps between rows shorter than 16 bytes are taken as padding; longer ones get a gap
/// entry.
pub fn table_from_rows(rows: &[(u64, u64, UnwindRule)]) -> Result<UnwindTable, Error> {
    let code = Code { ranges: Vec::new() };
    let mut b = Builder::new(&code);
    let mut last = 0;
    for &(start, end, rule) in rows {
        if start < last || end < start {
            return Err(Error::Format("rows not sorted"));
        }
        last = start;
        if end > start {
            b.row(start, end, rule);
        }
    }
    stitch(vec![b.finish()])
}

/// Joins the groups' entries into one table: global rule dictionary, page index with
/// start rules, chunk padding.
fn stitch(outs: Vec<GroupOut>) -> Result<UnwindTable, Error> {
    let mut stats = Stats::default();
    let (mut lo, mut hi) = (u64::MAX, 0u64);
    for o in &outs {
        if let (Some(f), Some(l)) = (o.entries.first(), o.entries.last()) {
            lo = lo.min(f.0);
            hi = hi.max(l.0);
        }
        stats.dwarf_rows += o.rows;
        for (i, n) in o.unsupported.iter().enumerate() {
            if let Some(r) = Unsupported::from_u8(i as u8) {
                *stats.unsupported.entry(r.name()).or_default() += n;
            }
        }
        stats.rbp_undefined += o.rbp_undefined;
    }
    stats.unsupported.retain(|_, v| *v > 0);
    if lo > hi {
        return Ok(UnwindTable::empty(stats));
    }
    let base = lo & !(PAGE_SIZE - 1);
    let npages = ((hi - base) >> PAGE_SHIFT) + 1;
    if npages > u64::from(u32::MAX) {
        return Err(Error::Limit("address range"));
    }
    let total: usize = outs.iter().map(|o| o.entries.len()).sum();
    let mut pages = vec![PageEntry::default(); npages as usize];
    let mut entries: Vec<u32> = Vec::with_capacity(total + total / 64 + 16);
    let mut dict = Dictionary::default();
    dict.id(UnwindRule::GAP);
    dict.id(UnwindRule::unsupported(Unsupported::DictionaryFull));
    let mut state = UnwindRule::GAP;
    let mut next_page: u64 = 0;
    for o in outs {
        let map: Vec<u16> = o.dict.iter().map(|r| dict.id(*r)).collect();
        for (addr, raw) in o.entries {
            let page = (addr - base) >> PAGE_SHIFT;
            let mut e = Entry::decode(raw);
            e.rule = map[e.rule as usize];
            while next_page <= page {
                let p = &mut pages[next_page as usize];
                p.start_rule = dict.id(state);
                p.first = entries.len() as u32;
                next_page += 1;
            }
            let p = &mut pages[page as usize];
            let rule = dict.rules[e.rule as usize];
            let after = if e.restore { state } else { e.final_rule(rule) };
            // Two entries at one offset (a group's closing gap, then the next group's first
            // row): the later one holds.
            if p.count > 0 && entries.last().is_some_and(|l| Entry::decode(*l).page_offset == e.page_offset) {
                *entries.last_mut().unwrap() = e.encode();
                state = after;
                continue;
            }
            // A page's entries never straddle a chunk: move them to the next one if needed.
            if (p.first % CHUNK_ENTRIES) + u32::from(p.count) + 1 > CHUNK_ENTRIES {
                let moved: Vec<u32> = entries.drain(p.first as usize..).collect();
                let pad = CHUNK_ENTRIES - (entries.len() as u32 % CHUNK_ENTRIES);
                stats.padding_entries += u64::from(pad);
                entries.extend(std::iter::repeat_n(0u32, pad as usize));
                p.first = entries.len() as u32;
                entries.extend(moved);
            }
            entries.push(e.encode());
            p.count += 1;
            state = after;
        }
    }
    let rules = dict.rules;
    let dict_full = dict.overflow;
    if dict_full > 0 {
        *stats.unsupported.entry(Unsupported::DictionaryFull.name()).or_default() += dict_full;
    }
    stats.entries = entries.len() as u64 - stats.padding_entries;
    Ok(UnwindTable::from_parts(base, pages, entries, rules, stats))
}

#[derive(Default)]
struct Dictionary {
    rules: Vec<UnwindRule>,
    index: HashMap<UnwindRule, u16>,
    overflow: u64,
}

impl Dictionary {
    /// The rule's index; past [`MAX_RULES`] rules, the index of the `DictionaryFull` rule
    /// (always index 1), counted.
    fn id(&mut self, rule: UnwindRule) -> u16 {
        if let Some(&i) = self.index.get(&rule) {
            return i;
        }
        if self.rules.len() >= MAX_RULES {
            self.overflow += 1;
            return 1;
        }
        let i = self.rules.len() as u16;
        self.rules.push(rule);
        self.index.insert(rule, i);
        i
    }
}
