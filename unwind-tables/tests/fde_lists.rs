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

/// FDE records out of address order (functions placed by name, records left in source
/// order): the scanned list is sorted, and gives the table the linker's header gives.
#[test]
fn records_out_of_address_order_give_the_header_table() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("order.c");
    std::fs::write(
        &src,
        "#include <stdio.h>\n\
         __attribute__((noinline)) long zz_first(long n) { long s = 0; for (long i = 0; i < n; i++) s += i * i; printf(\"%ld\\n\", s); return s; }\n\
         __attribute__((noinline)) long mm_second(long n) { return zz_first(n) + 1; }\n\
         __attribute__((noinline)) long aa_third(long n) { return mm_second(n) * 3; }\n\
         int main(int argc, char **argv) { (void)argv; return (int)aa_third(argc); }\n",
    )
    .unwrap();
    let bin = dir.path().join("order");
    let st = Command::new("gcc")
        .args(["-O2", "-fomit-frame-pointer", "-ffunction-sections", "-Wl,--sort-section=name", "-o"])
        .arg(&bin)
        .arg(&src)
        .status();
    assert!(st.unwrap().success(), "gcc failed");
    // readelf lists the records in section order: their pc ranges must not be sorted.
    let out = Command::new("readelf").args(["--debug-dump=frames"]).arg(&bin).output().unwrap();
    let starts: Vec<u64> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains(" FDE "))
        .filter_map(|l| {
            l.split("pc=").nth(1)?.split("..").next().and_then(|h| u64::from_str_radix(h, 16).ok())
        })
        .collect();
    assert!(starts.len() >= 5, "{starts:?}");
    assert!(!starts.is_sorted(), "the records are in address order: {starts:?}");
    let stripped = dir.path().join("order-no-hdr");
    let st =
        Command::new("objcopy").args(["--remove-section", ".eh_frame_hdr"]).arg(&bin).arg(&stripped).status();
    assert!(st.unwrap().success(), "objcopy failed");
    let with = compile_file(&bin).unwrap();
    let without = compile_file(&stripped).unwrap();
    assert!(with.stats().entries >= 5, "{:?}", with.stats());
    assert_eq!(with.to_bytes(), without.to_bytes(), "scanned and header FDE lists differ");
}
