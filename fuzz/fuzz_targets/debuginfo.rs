//! Arbitrary bytes as an ELF file with DWARF (lines, inline trees, compressed sections)
//! and as a stored symbolization index block: a typed error or an index, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    unwound_symbolize::fuzzing::dwarf_index(data);
    unwound_symbolize::fuzzing::index_block(data);
});
