//! Arbitrary bytes as an ELF file: a typed error or a symbol table, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;
use unwound_symbolize::ElfSymbols;

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = ElfSymbols::from_bytes("fuzz", data) {
        for addr in [0u64, 0x1000, u64::MAX] {
            let _ = s.lookup(addr);
            let _ = s.file_offset_to_vaddr(addr);
        }
    }
});
