//! The FDE list read in place from `.eh_frame_hdr` and the one built by scanning the
//! records give the same table, and the table does not depend on the number of threads.

use std::path::Path;
use std::process::Command;

use unwound_unwind_tables::{compile_elf, compile_file};

const LIBC: &str = "/usr/lib/x86_64-linux-gnu/libc.so.6";
const LIBSTDCXX: &str = "/usr/lib/x86_64-linux-gnu/libstdc++.so.6";

#[test]
fn header_search_table_and_record_scan_give_one_table() {
    let dir = tempfile::tempdir().unwrap();
    for lib in [LIBC, LIBSTDCXX] {
        let copy = dir.path().join("no-hdr.so");
        // objcopy keeps .eh_frame where it is; without the header the records are scanned.
        let st = Command::new("objcopy").args(["--remove-section", ".eh_frame_hdr", lib]).arg(&copy).status();
        assert!(st.unwrap().success(), "objcopy failed on {lib}");
        let data = std::fs::read(&copy).unwrap();
        let has_hdr = |d: &[u8]| {
            let f = object::File::parse(d).unwrap();
            object::Object::section_by_name(&f, ".eh_frame_hdr").is_some()
        };
        assert!(!has_hdr(&data), "{lib}: header still there");
        let with = compile_file(Path::new(lib)).unwrap();
        let without = compile_elf(&data).unwrap();
        assert!(with.stats().entries > 1000, "{lib}: {:?}", with.stats());
        assert_eq!(with.to_bytes(), without.to_bytes(), "{lib}: the two FDE lists differ");
        assert_eq!(with.stats().dwarf_rows, without.stats().dwarf_rows);
    }
}

#[test]
fn the_table_is_the_same_whatever_the_thread_count() {
    let compile = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        pool.install(|| compile_file(Path::new(LIBSTDCXX)).unwrap().to_bytes())
    };
    let one = compile(1);
    assert_eq!(one, compile(2));
    assert_eq!(one, compile(5));
}

#[test]
fn a_header_table_that_does_not_match_its_records_is_not_used() {
    use object::{Object, ObjectSection};
    let good = std::fs::read(LIBC).unwrap();
    let reference = compile_elf(&good).unwrap().to_bytes();
    let (off, size) = {
        let f = object::File::parse(&*good).unwrap();
        let h = f.section_by_name(".eh_frame_hdr").unwrap();
        let (o, s) = h.file_range().unwrap();
        (o as usize, s as usize)
    };
    // Header: 4 bytes, eh_frame_ptr (sdata4), fde_count (udata4), then 8-byte pairs.
    let table = off + 12;
    assert!(size > 12 + 8 * 20);
    for (a, b) in [(10usize, 11usize), (0, 19)] {
        let mut bad = good.clone();
        // Swap the FDE addresses of two pairs: the locations stay sorted, the records lie.
        for k in 4..8 {
            bad.swap(table + 8 * a + k, table + 8 * b + k);
        }
        assert_ne!(bad, good);
        let t = compile_elf(&bad).unwrap();
        assert_eq!(t.to_bytes(), reference, "pairs {a} and {b} swapped");
    }
}
