//! [`FunctionBounds`]: where each function of an ELF file starts and ends, from the FDEs of
//! its `.eh_frame` — the only record of a static function in a stripped binary.

use std::collections::HashMap;

use gimli::{BaseAddresses, CieOrFde, EhFrame, EndianSlice, LittleEndian, UnwindSection};
use object::{Object, ObjectSection};

/// Most FDEs read from one file.
pub(crate) const MAX_FDES: usize = 16 << 20;

/// The address ranges of a file's FDEs, sorted by start, overlaps removed.
#[derive(Debug, Default)]
pub(crate) struct FunctionBounds {
    ranges: Vec<(u64, u64)>,
}

impl FunctionBounds {
    /// The FDE ranges of `file`'s `.eh_frame`; empty when it has none or it cannot be read
    /// (a damaged record ends the walk: the ranges read before it are kept).
    pub fn of(file: &object::File<'_>) -> Self {
        let Some(section) = file.section_by_name(".eh_frame") else { return Self::default() };
        let Ok(data) = section.data() else { return Self::default() };
        let mut bases = BaseAddresses::default().set_eh_frame(section.address());
        if let Some(s) = file.section_by_name(".text") {
            bases = bases.set_text(s.address());
        }
        if let Some(s) = file.section_by_name(".got") {
            bases = bases.set_got(s.address());
        }
        let eh = EhFrame::new(data, LittleEndian);
        let mut cies = HashMap::new();
        let mut ranges = Vec::new();
        let mut entries = eh.entries(&bases);
        while let Ok(Some(entry)) = entries.next() {
            let CieOrFde::Fde(partial) = entry else { continue };
            let fde = partial.parse(|section: &EhFrame<EndianSlice<'_, LittleEndian>>, bases, offset| {
                cies.entry(offset).or_insert_with(|| section.cie_from_offset(bases, offset)).clone()
            });
            let Ok(fde) = fde else { continue };
            let (start, len) = (fde.initial_address(), fde.len());
            if len > 0 && start != 0 {
                if let Some(end) = start.checked_add(len) {
                    ranges.push((start, end));
                }
            }
            if ranges.len() >= MAX_FDES {
                break;
            }
        }
        ranges.sort_unstable();
        // Nested or overlapping records (rare, hand-written): the first one keeps its range.
        let mut kept: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
        for r in ranges {
            match kept.last() {
                Some(&(_, end)) if r.0 < end => {}
                _ => kept.push(r),
            }
        }
        kept.shrink_to_fit();
        FunctionBounds { ranges: kept }
    }

    /// The `[start, end)` of the FDE that holds `addr`.
    pub fn containing(&self, addr: u64) -> Option<(u64, u64)> {
        let i = self.ranges.partition_point(|r| r.0 <= addr).checked_sub(1)?;
        let r = self.ranges[i];
        (addr < r.1).then_some(r)
    }

    /// Number of functions.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.ranges.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every FDE `readelf --debug-dump=frames` lists for the test binary itself is found,
    /// with its exact range.
    #[test]
    fn ranges_match_readelf() {
        let exe = std::env::current_exe().unwrap();
        let out =
            std::process::Command::new("readelf").arg("--debug-dump=frames").arg(&exe).output().unwrap();
        assert!(out.status.success());
        let text = String::from_utf8_lossy(&out.stdout);
        // "00000018 0000000000000014 0000001c FDE cie=00000000 pc=0000000000001020..0000000000001040"
        let mut want: Vec<(u64, u64)> = text
            .lines()
            .filter(|l| l.contains(" FDE "))
            .filter_map(|l| {
                let pc = l.split("pc=").nth(1)?;
                let (a, b) = pc.trim().split_once("..")?;
                Some((u64::from_str_radix(a, 16).ok()?, u64::from_str_radix(b, 16).ok()?))
            })
            .filter(|r| r.0 != 0 && r.1 > r.0)
            .collect();
        want.sort_unstable();
        assert!(want.len() > 100, "readelf listed {} FDEs", want.len());
        let data = std::fs::read(&exe).unwrap();
        let bounds = FunctionBounds::of(&object::File::parse(&*data).unwrap());
        assert_eq!(bounds.len(), want.len());
        for &(a, b) in &want {
            assert_eq!(bounds.containing(a), Some((a, b)));
            assert_eq!(bounds.containing(b - 1), Some((a, b)));
        }
    }
}
