use unwound_unwind_tables::layout::{CfaKind, Entry};
fn main() {
    for path in std::env::args().skip(1) {
        let t = unwound_unwind_tables::UnwindTable::compile_file(path.as_ref()).unwrap();
        let mut gap = 0;
        let mut run = 0;
        let mut single_rsp = 0;
        let mut rbp = 0;
        let mut other = 0;
        let mut steps_hist = [0u32; 8];
        let mut prev_same = 0;
        for p in t.pages() {
            let mut prev: Option<u16> = None;
            for &raw in t.entries().page(p.first, p.count).unwrap() {
                let e = Entry::decode(raw);
                let r = t.rules()[e.rule as usize];
                let steps = t.runs()[e.rule as usize].steps();
                steps_hist[steps as usize] += 1;
                if prev == Some(e.rule) {
                    prev_same += 1;
                }
                prev = Some(e.rule);
                match r.cfa_kind().unwrap() {
                    CfaKind::Gap => gap += 1,
                    CfaKind::Rsp if steps > 0 => run += 1,
                    CfaKind::Rsp => single_rsp += 1,
                    CfaKind::Rbp => rbp += 1,
                    _ => other += 1,
                }
            }
        }
        println!("{path}: gap={gap} run={run} single_rsp={single_rsp} rbp={rbp} other={other} steps={steps_hist:?} same_rule_as_prev={prev_same}");
    }
}
