//! Arbitrary bytes as an ELF file or a serialized table: a typed error or a table whose
//! lookups stay in bounds, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;
use unwound_unwind_tables::{compile_elf, UnwindTable};

fuzz_target!(|data: &[u8]| {
    if let Ok(t) = compile_elf(data) {
        for pc in [0u64, t.base(), t.base() + 4095, u64::MAX] {
            let _ = t.lookup(pc);
        }
        let _ = UnwindTable::from_bytes(&t.to_bytes()).expect("own output reads back");
    }
    if let Ok(t) = UnwindTable::from_bytes(data) {
        for pc in [0u64, t.base(), t.base().wrapping_add(12345)] {
            let _ = t.lookup(pc);
        }
        let _ = t.rows();
    }
});
