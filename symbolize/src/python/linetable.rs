//! The CPython 3.11+ location table (`co_linetable`, `Objects/locations.md`): the source
//! line of each code unit.

/// The source line of the code unit at `index` (in 2-byte code units from the first
/// instruction) of a code object whose first line is `firstlineno` and whose location
/// table is `linetable`: what `co_positions()` gives as the start line of that unit.
///
/// `None` when the unit has no line (a "no location" entry), when `index` is negative or
/// past the table, or when the table is malformed there. Never panics.
///
/// Each entry is a byte `1kkkkLLL` covering `LLL + 1` code units, whose kind `kkkk` says
/// what follows: 0–9 one byte (same line), 10–12 two bytes (line + kind − 10), 13 a signed
/// varint line delta, 14 a signed varint line delta and three varints (end line, columns),
/// 15 nothing (no line; the running line is unchanged).
///
/// ```
/// use unwound_symbolize::python::line_for_instruction;
/// // Two entries: 2 units on line 10 + 0 (short form), then 1 unit on line + 1 (kind 11).
/// let table = [0x80 | 1, 0x00, 0x80 | (11 << 3), 4, 8];
/// assert_eq!(line_for_instruction(&table, 10, 0), Some(10));
/// assert_eq!(line_for_instruction(&table, 10, 1), Some(10));
/// assert_eq!(line_for_instruction(&table, 10, 2), Some(11));
/// assert_eq!(line_for_instruction(&table, 10, 3), None);
/// ```
pub fn line_for_instruction(linetable: &[u8], firstlineno: i32, index: i64) -> Option<u32> {
    if index < 0 {
        return None;
    }
    let mut reader = Reader { bytes: linetable, pos: 0 };
    let mut line = i64::from(firstlineno);
    let mut start: i64 = 0;
    while let Some(first) = reader.byte() {
        if first & 0x80 == 0 {
            return None;
        }
        let kind = (first >> 3) & 0xf;
        let length = i64::from(first & 7) + 1;
        let delta = match kind {
            0..=9 => {
                reader.skip(1)?;
                Some(0)
            }
            10..=12 => {
                reader.skip(2)?;
                Some(i64::from(kind) - 10)
            }
            13 => Some(reader.signed_varint()?),
            14 => {
                let delta = reader.signed_varint()?;
                for _ in 0..3 {
                    reader.varint()?;
                }
                Some(delta)
            }
            _ => None,
        };
        let entry_line = delta.map(|d| {
            line = line.saturating_add(d);
            line
        });
        if index < start + length {
            return entry_line.and_then(|l| u32::try_from(l).ok());
        }
        start += length;
    }
    None
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl Reader<'_> {
    fn byte(&mut self) -> Option<u8> {
        let b = *self.bytes.get(self.pos)?;
        self.pos += 1;
        Some(b)
    }

    fn skip(&mut self, n: usize) -> Option<()> {
        let end = self.pos.checked_add(n)?;
        (end <= self.bytes.len()).then(|| self.pos = end)
    }

    fn varint(&mut self) -> Option<u64> {
        let mut b = self.byte()?;
        let mut value = u64::from(b & 63);
        let mut shift = 6;
        while b & 64 != 0 {
            b = self.byte()?;
            if shift > 57 {
                return None;
            }
            value |= u64::from(b & 63) << shift;
            shift += 6;
        }
        Some(value)
    }

    fn signed_varint(&mut self) -> Option<i64> {
        let v = self.varint()?;
        let magnitude = i64::try_from(v >> 1).ok()?;
        Some(if v & 1 != 0 { -magnitude } else { magnitude })
    }
}
