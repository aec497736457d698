use unwound_unwind_tables::layout::Entry;
fn main() {
    let a: Vec<String> = std::env::args().collect();
    let t = unwound_unwind_tables::UnwindTable::compile_file(a[1].as_ref()).unwrap();
    let pc = u64::from_str_radix(&a[2], 16).unwrap();
    let pi = ((pc - t.base()) >> 12) as usize;
    for i in pi.saturating_sub(1)..=pi {
        let p = t.pages()[i];
        println!("page {i} {:?} start_rule={:?}", p, t.rules()[p.start_rule as usize]);
        for &raw in t.entries().page(p.first, p.count).unwrap() {
            let e = Entry::decode(raw);
            println!(
                "  {:x} {:?} {:?}",
                t.base() + ((i as u64) << 12) + e.page_offset as u64,
                e,
                t.rules()[e.rule as usize]
            );
        }
    }
}
