//! Whether the bytes between two functions are alignment padding (no gap entry), and
//! whether an epilogue's last instruction leaves the function.

use super::{prefetch, MAX_PADDING};

/// The bytes of NOP and trap padding sequences (`nop`, `int3`, the prefixes, opcode and
/// ModRM bytes of multi-byte `nopw`/`nopl`), indexed by byte.
pub(super) const PADDING: [bool; 256] = {
    let mut map = [false; 256];
    let bytes = [0x90u8, 0xcc, 0x66, 0x2e, 0x0f, 0x1f, 0x00, 0x40, 0x44, 0x80, 0x84];
    let mut i = 0;
    while i < bytes.len() {
        map[bytes[i] as usize] = true;
        i += 1;
    }
    map
};

/// Executable bytes by virtual address, to tell alignment padding from code without CFI.
pub(super) struct Code<'a> {
    pub(super) ranges: Vec<(u64, &'a [u8])>,
}

impl Code<'_> {
    fn bytes(&self, start: u64, end: u64) -> Option<&[u8]> {
        let (base, data) =
            self.ranges.iter().find(|(b, d)| start >= *b && end >= start && end - b <= d.len() as u64)?;
        data.get((start - base) as usize..(end - base) as usize)
    }
    /// Asks the CPU to start loading the code bytes just below `end`, where the gap and
    /// epilogue checks read.
    #[inline]
    pub(super) fn prefetch_before(&self, end: u64) {
        if let Some((base, data)) = self.ranges.iter().find(|(b, d)| end > *b && end - b <= d.len() as u64) {
            let at = (end - base) as usize;
            prefetch(data, at.wrapping_sub(1));
            prefetch(data, at.wrapping_sub(65));
        }
    }

    /// True when `[at, next)` holds one instruction that leaves the function (`ret`,
    /// `rep ret`, `jmp`) and then only padding: no pc in `(at, next)` can be sampled.
    pub(super) fn single_exit(&self, at: u64, next: u64) -> bool {
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
    pub(super) fn is_padding(&self, start: u64, end: u64) -> bool {
        if end <= start {
            return true;
        }
        if end - start > MAX_PADDING {
            return false;
        }
        // Most gaps are under 16 bytes: the 16 bytes up to `end`, checked without a branch
        // per byte (a loop of the gap's length costs a mispredicted exit per gap).
        if end - start <= 16 {
            if let Some(w) = self.bytes(end.wrapping_sub(16), end).filter(|_| end >= 16) {
                let skip = (16 - (end - start)) as usize;
                let bad = w
                    .iter()
                    .enumerate()
                    .fold(0u8, |bad, (i, &x)| bad | (!PADDING[usize::from(x)] as u8 & (i >= skip) as u8));
                return bad == 0;
            }
        }
        match self.bytes(start, end) {
            Some(b) => b.iter().all(|&x| PADDING[usize::from(x)]),
            None => end - start < 16,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(5_000))]
        /// The windowed padding check answers as a byte-by-byte one: every byte of the gap a
        /// padding byte, with gaps near the start and end of a range and out of it.
        #[test]
        fn padding_check_is_bytewise(
            bytes in proptest::collection::vec(
                prop_oneof![Just(0x90u8), Just(0xcc), Just(0x0f), Just(0x1f), Just(0x00), any::<u8>()],
                0..80,
            ),
            base in 0u64..64,
            start in 0u64..150,
            len in 0u64..70,
        ) {
            let code = Code { ranges: vec![(base, &bytes[..])] };
            let end = start + len;
            let expected = if end <= start {
                true
            } else if len > MAX_PADDING {
                false
            } else if start >= base && end - base <= bytes.len() as u64 {
                bytes[(start - base) as usize..(end - base) as usize].iter().all(|&b| {
                    [0x90u8, 0xcc, 0x66, 0x2e, 0x0f, 0x1f, 0x00, 0x40, 0x44, 0x80, 0x84].contains(&b)
                })
            } else {
                len < 16
            };
            prop_assert_eq!(code.is_padding(start, end), expected);
        }
    }
}
