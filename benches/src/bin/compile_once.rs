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
    // COMPILE_REPEAT=N compiles N times first (warm map, for perf profiles of steady state).
    let repeat: usize = std::env::var("COMPILE_REPEAT").ok().and_then(|v| v.parse().ok()).unwrap_or(0);
    for _ in 0..repeat {
        match which.as_str() {
            "gimli" => drop(std::hint::black_box(unwound_benches::gimli_rows(&map))),
            _ => drop(std::hint::black_box(unwound_unwind_tables::compile_elf(&map))),
        }
    }
    match which.as_str() {
        "gimli" => println!("{} rows (odd starts)", std::hint::black_box(unwound_benches::gimli_rows(&map))),
        "unwound" => {
            let t = unwound_unwind_tables::compile_elf(&map).unwrap_or_else(|e| panic!("{path}: {e}"));
            // The serialized table's digest: a change that should not alter tables is
            // checked against the digest before it.
            let digest = t
                .to_bytes()
                .iter()
                .fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3));
            println!("{} entries, table digest {digest:016x}", t.stats().entries);
        }
        other => {
            eprintln!("unknown compiler {other:?}: unwound or gimli");
            std::process::exit(2);
        }
    }
}
