//! Shared by the benchmarks in `benches/` and `compile_once`: the peers' baseline for
//! compiling unwind tables.

use gimli::{BaseAddresses, CieOrFde, EhFrame, LittleEndian, UnwindContext, UnwindSection};
use object::{Object, ObjectSection};

/// The peers' starting point: every row of every FDE, one thread.
pub fn gimli_rows(data: &[u8]) -> u64 {
    let file = object::File::parse(data).unwrap();
    let eh = file.section_by_name(".eh_frame").unwrap();
    let section = EhFrame::new(eh.data().unwrap(), LittleEndian);
    let mut bases = BaseAddresses::default().set_eh_frame(eh.address());
    if let Some(t) = file.section_by_name(".text") {
        bases = bases.set_text(t.address());
    }
    if let Some(g) = file.section_by_name(".got") {
        bases = bases.set_got(g.address());
    }
    let mut ctx = Box::new(UnwindContext::new());
    let mut entries = section.entries(&bases);
    let mut rows = 0u64;
    while let Ok(Some(e)) = entries.next() {
        if let CieOrFde::Fde(partial) = e {
            let Ok(fde) = partial.parse(|s, b, o| s.cie_from_offset(b, o)) else { continue };
            let Ok(mut table) = fde.rows(&section, &bases, &mut ctx) else { continue };
            while let Ok(Some(row)) = table.next_row() {
                rows += std::hint::black_box(row.start_address()) & 1;
            }
        }
    }
    rows
}
