//! Prints a table's statistics: `cargo run --release --example table_stats FILE...`
fn main() {
    for path in std::env::args().skip(1) {
        let t0 = std::time::Instant::now();
        match unwound_unwind_tables::UnwindTable::compile_file(path.as_ref()) {
            Ok(t) => {
                let s = t.stats();
                println!(
                    "{path}: rows={} entries={} ({:.3}/row) bytes={} ({:.3} B/row) pages={} rules={} pad={} unsupported={:?} {:?}",
                    s.dwarf_rows,
                    s.entries,
                    s.entries as f64 / s.dwarf_rows as f64,
                    t.byte_size(),
                    t.byte_size() as f64 / s.dwarf_rows as f64,
                    t.pages().len(),
                    t.rules().len(),
                    s.padding_entries,
                    s.unsupported,
                    t0.elapsed()
                );
            }
            Err(e) => println!("{path}: {e}"),
        }
    }
}
