//! What an FDE needs from its CIE, parsed once per CIE with gimli.

use rustc_hash::FxHashMap as HashMap;

use gimli::{BaseAddresses, UnwindSection};

use super::cfi::{apply, Cfa, Reg, State, RSP};
use super::R;

/// The CIEs already parsed, with the last one looked up kept at hand: most FDEs share their
/// neighbour's CIE.
pub(super) struct CieLookup<'m> {
    cies: &'m HashMap<u32, Option<CieInfo>>,
    last: Option<(u32, Option<CieInfo>)>,
}

impl<'m> CieLookup<'m> {
    pub(super) fn new(cies: &'m HashMap<u32, Option<CieInfo>>) -> Self {
        CieLookup { cies, last: None }
    }
    /// The CIE at section offset `off`; `None` when it is unknown or unusable.
    #[inline]
    pub(super) fn get(&mut self, off: u32) -> Option<CieInfo> {
        match self.last {
            Some((o, info)) if o == off => info,
            _ => {
                let info = self.cies.get(&off).copied().flatten();
                self.last = Some((off, info));
                info
            }
        }
    }
}

/// What an FDE needs from its CIE, parsed once per CIE.
#[derive(Clone, Copy)]
pub(super) struct CieInfo {
    /// `DW_EH_PE_*` encoding of the FDE's address fields (`.debug_frame`: absolute u64).
    pub(super) encoding: u8,
    /// The FDE has augmentation data (a 'z' augmentation).
    pub(super) augmented: bool,
    pub(super) code_align: u64,
    pub(super) data_align: i64,
    pub(super) signal: bool,
    pub(super) initial: State,
}

pub(super) fn cie_info<'a, S: UnwindSection<R<'a>>>(
    section: &S,
    bases: &BaseAddresses,
    offset: usize,
) -> Option<CieInfo>
where
    S::Offset: gimli::UnwindOffset<usize>,
{
    let cie = section.cie_from_offset(bases, S::Offset::from(offset)).ok()?;
    if cie.address_size() != 8 {
        return None;
    }
    // No encoding given: absolute pointers (`.debug_frame`, or `.eh_frame` without 'R').
    let encoding = cie.fde_address_encoding().map_or(0, |e| e.0);
    let mut st =
        State { cfa: Cfa::RegOffset(RSP, 8), last_reg: RSP, last_off: 8, rbp: Reg::Same, ra: Reg::Same };
    let init = st;
    let mut stack = Vec::new();
    let mut it = cie.instructions(section, bases);
    while let Some(ins) = it.next().ok()? {
        apply(&ins, &mut st, &init, &mut stack, cie.code_alignment_factor(), cie.data_alignment_factor())
            .ok()?;
    }
    Some(CieInfo {
        encoding,
        augmented: cie.augmentation().is_some(),
        code_align: cie.code_alignment_factor(),
        data_align: cie.data_alignment_factor(),
        signal: cie.is_signal_trampoline(),
        initial: st,
    })
}
