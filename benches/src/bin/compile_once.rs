//! Compiles one file's unwind tables once, ours or the gimli baseline, for an instruction
//! count that this VM's timing noise cannot blur:
//!
//! `RAYON_NUM_THREADS=1 valgrind --tool=callgrind --callgrind-out-file=/dev/null \
//!   target/release/compile_once {unwound|gimli} FILE`
fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (Some(which), Some(path)) = (args.get(1), args.get(2)) else {
        eprintln!("usage: compile_once unwound|gimli FILE");
        std::process::exit(2);
    };
    let file = std::fs::File::open(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    // SAFETY: read-only map of a file nobody here writes.
    let map = unsafe { memmap2::Mmap::map(&file) }.unwrap_or_else(|e| panic!("{path}: {e}"));
    match which.as_str() {
        "gimli" => println!("{} rows (odd starts)", std::hint::black_box(unwound_benches::gimli_rows(&map))),
        "unwound" => {
            let t = unwound_unwind_tables::compile_elf(&map).unwrap_or_else(|e| panic!("{path}: {e}"));
            println!("{} entries", t.stats().entries);
        }
        other => {
            eprintln!("unknown compiler {other:?}: unwound or gimli");
            std::process::exit(2);
        }
    }
}
