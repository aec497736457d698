//! The primitive readers of CFI: little-endian words, LEB128 and `DW_EH_PE_*` encoded
//! pointers.

use gimli::{BaseAddresses, DwEhPe};

/// `DW_EH_PE_pcrel | DW_EH_PE_sdata4`: what GCC and LLVM emit for FDE addresses.
pub(super) const PCREL_SDATA4: u8 = gimli::DW_EH_PE_pcrel.0 | gimli::DW_EH_PE_sdata4.0;

pub(super) fn read_u32(data: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(*data.get(at..at.checked_add(4)?)?.first_chunk()?))
}

/// Where a CFI section is, to read its pc-relative fields.
pub(super) struct SectionAt<'a> {
    pub(super) addr: u64,
    pub(super) bases: &'a BaseAddresses,
}

/// Reads an FDE's address range length (encoded like its start, never relative).
pub(super) fn read_range(data: &[u8], pos: &mut usize, encoding: u8) -> Option<u64> {
    read_encoded(data, pos, encoding, 0, &BaseAddresses::default(), false)
}

/// Steps over a `DW_EH_PE_*` encoded value at `pos`.
pub(super) fn skip_encoded(data: &[u8], pos: &mut usize, encoding: u8) -> Option<()> {
    let n = match DwEhPe(encoding).format() {
        gimli::DW_EH_PE_absptr | gimli::DW_EH_PE_udata8 | gimli::DW_EH_PE_sdata8 => 8,
        gimli::DW_EH_PE_udata2 | gimli::DW_EH_PE_sdata2 => 2,
        gimli::DW_EH_PE_udata4 | gimli::DW_EH_PE_sdata4 => 4,
        gimli::DW_EH_PE_uleb128 => return uleb(data, pos).map(|_| ()),
        gimli::DW_EH_PE_sleb128 => return sleb(data, pos).map(|_| ()),
        _ => return None,
    };
    *pos = pos.checked_add(n).filter(|&e| e <= data.len())?;
    Some(())
}

/// Reads a `DW_EH_PE_*` encoded pointer at `pos`; `field_addr` is its address (for pcrel).
#[inline(always)]
pub(super) fn read_encoded(
    data: &[u8],
    pos: &mut usize,
    encoding: u8,
    field_addr: u64,
    bases: &BaseAddresses,
    absolute: bool,
) -> Option<u64> {
    if encoding == PCREL_SDATA4 {
        // What GCC and LLVM emit: the case below, read directly.
        let v = i32::from_le_bytes(data.get(*pos..pos.checked_add(4)?)?.try_into().ok()?) as i64 as u64;
        *pos += 4;
        return Some(if absolute { field_addr.wrapping_add(v) } else { v });
    }
    read_encoded_other(data, pos, encoding, field_addr, bases, absolute)
}

/// [`read_encoded`] for the encodings other than pcrel sdata4.
#[inline(never)]
pub(super) fn read_encoded_other(
    data: &[u8],
    pos: &mut usize,
    encoding: u8,
    field_addr: u64,
    bases: &BaseAddresses,
    absolute: bool,
) -> Option<u64> {
    if DwEhPe(encoding).is_absent() || DwEhPe(encoding).is_indirect() {
        return None; // omitted or indirect: not in FDE address fields of sane files
    }
    let get = |pos: &mut usize, n: usize| -> Option<&[u8]> {
        let b = data.get(*pos..*pos + n)?;
        *pos += n;
        Some(b)
    };
    let raw: u64 = match DwEhPe(encoding).format() {
        gimli::DW_EH_PE_absptr => u64::from_le_bytes(get(pos, 8)?.try_into().ok()?),
        gimli::DW_EH_PE_uleb128 => uleb(data, pos)?,
        gimli::DW_EH_PE_udata2 => u64::from(u16::from_le_bytes(get(pos, 2)?.try_into().ok()?)),
        gimli::DW_EH_PE_udata4 => u64::from(u32::from_le_bytes(get(pos, 4)?.try_into().ok()?)),
        gimli::DW_EH_PE_udata8 => u64::from_le_bytes(get(pos, 8)?.try_into().ok()?),
        gimli::DW_EH_PE_sleb128 => sleb(data, pos)? as u64,
        gimli::DW_EH_PE_sdata2 => i16::from_le_bytes(get(pos, 2)?.try_into().ok()?) as i64 as u64,
        gimli::DW_EH_PE_sdata4 => i32::from_le_bytes(get(pos, 4)?.try_into().ok()?) as i64 as u64,
        gimli::DW_EH_PE_sdata8 => u64::from_le_bytes(get(pos, 8)?.try_into().ok()?),
        _ => return None,
    };
    if !absolute {
        return Some(raw);
    }
    let base = match DwEhPe(encoding).application() {
        gimli::DW_EH_PE_absptr => 0,
        gimli::DW_EH_PE_pcrel => field_addr,
        gimli::DW_EH_PE_textrel => bases.eh_frame.text?,
        gimli::DW_EH_PE_datarel => bases.eh_frame.data?,
        _ => return None,
    };
    Some(base.wrapping_add(raw))
}

pub(super) fn sleb(bytes: &[u8], pos: &mut usize) -> Option<i64> {
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

#[inline]
pub(super) fn uleb(bytes: &[u8], pos: &mut usize) -> Option<u64> {
    uleb_inline(bytes, pos)
}

/// [`uleb`], always inlined: for the hot loop.
#[inline(always)]
pub(super) fn uleb_inline(bytes: &[u8], pos: &mut usize) -> Option<u64> {
    // Nearly every operand fits one byte.
    if let Some(&b) = bytes.get(*pos).filter(|&&b| b < 0x80) {
        *pos += 1;
        return Some(u64::from(b));
    }
    uleb_long(bytes, pos)
}

#[inline(never)]
pub(super) fn uleb_long(bytes: &[u8], pos: &mut usize) -> Option<u64> {
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
