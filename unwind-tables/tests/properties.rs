//! Invariants: entry encoding round-trips, a rule's word is its struct's bytes, lookup
//! equals a naive search over the rows the table was built from, serialization round-trips,
//! and no bytes make the parsers panic.

use proptest::prelude::*;
use unwound_unwind_tables::layout::{
    CfaKind, DictEntry, Entry, PageEntry, RbpKind, Run, Unsupported, UnwindRule, MAX_RUN_STEPS,
};
use unwound_unwind_tables::{compile_elf, table_from_rows, UnwindTable};

proptest! {
    /// `to_bits` is the `#[repr(C)]` struct's bytes read as a little-endian word (what the
    /// BPF walker stores and reads back), and every word is a rule whose accessors answer
    /// without panicking.
    #[test]
    fn rule_bits_are_the_struct_bytes(cfa: u8, rbp: u8, rbp_slot: i8, aux: i8, cfa_offset: i32, word: u64) {
        let rule = UnwindRule { cfa, rbp, rbp_slot, aux, cfa_offset };
        // SAFETY: five integers with no padding between them (8 bytes, asserted in layout).
        let bytes = unsafe { std::mem::transmute::<UnwindRule, [u8; 8]>(rule) };
        prop_assert_eq!(rule.to_bits(), u64::from_le_bytes(bytes));
        let formula = u64::from(cfa)
            | u64::from(rbp) << 8
            | u64::from(rbp_slot as u8) << 16
            | u64::from(aux as u8) << 24
            | u64::from(cfa_offset as u32) << 32;
        prop_assert_eq!(rule.to_bits(), formula);
        prop_assert_eq!(UnwindRule::from_bits(rule.to_bits()), rule);
        let any = UnwindRule::from_bits(word);
        prop_assert_eq!(any.to_bits(), word);
        prop_assert_eq!(any.cfa_kind().is_some(), word as u8 <= CfaKind::Unsupported as u8);
        prop_assert_eq!(any.rbp_kind().is_some(), (word >> 8) as u8 <= RbpKind::Undefined as u8);
        prop_assert_eq!(any.saved_rbp_offset().is_some(), any.rbp_kind() == Some(RbpKind::AtCfa));
        prop_assert_eq!(any.to_string().split(' ').count(), 2);
    }

    /// The records the walker's maps hold are the `#[repr(C)]` structs' bytes.
    #[test]
    fn map_records_are_the_struct_bytes(rule: u64, run: u32, first: u32, count: u16, start_rule: u16) {
        let d = DictEntry { rule: UnwindRule::from_bits(rule), run: Run(run) };
        // SAFETY: integers without padding (sizes asserted in layout).
        prop_assert_eq!(d.to_le_bytes(), unsafe { std::mem::transmute::<DictEntry, [u8; 12]>(d) });
        let p = PageEntry { first, count, start_rule };
        prop_assert_eq!(p.to_le_bytes(), unsafe { std::mem::transmute::<PageEntry, [u8; 8]>(p) });
        prop_assert_eq!(PageEntry::from_le_bytes(p.to_le_bytes()), p);
    }

    #[test]
    fn entry_encoding_round_trips(off in 0u16..4096, rule in 0u16..16384, restore: bool) {
        let e = Entry { page_offset: off, rule, restore };
        prop_assert_eq!(Entry::decode(e.encode()), e);
        prop_assert_eq!(e.encode() & unwound_unwind_tables::layout::RESERVED_ENTRY_BITS, 0);
    }

    #[test]
    fn runs_keep_their_steps(pops: bool, bytes in prop::collection::vec(1u64..=8, 0..=MAX_RUN_STEPS as usize),
                             first in 0u16..4000) {
        let mut run = Run::NONE;
        for &b in &bytes {
            run = run.pushed(b, pops).unwrap();
        }
        prop_assert!(run.is_valid());
        prop_assert_eq!(run.steps() as usize, bytes.len());
        prop_assert_eq!(run.length() as u64, bytes.iter().sum::<u64>());
        // The step count at each byte of the run is the number of rows started by then.
        let mut row = u32::from(first);
        for (i, &b) in bytes.iter().enumerate() {
            prop_assert_eq!(run.steps_at(first, row as u16), i as u32);
            prop_assert_eq!(run.step_bytes(i as u32) as u64, b);
            row += b as u32;
        }
        prop_assert_eq!(run.steps_at(first, first + run.length() as u16), bytes.len() as u32);
        // Full, too far or the other direction: no more steps.
        prop_assert!(run.pushed(9, pops).is_none());
        prop_assert!(run.pushed(0, pops).is_none());
        if !bytes.is_empty() {
            prop_assert!(run.pushed(1, !pops).is_none());
        }
        if bytes.len() == MAX_RUN_STEPS as usize {
            prop_assert!(run.pushed(1, pops).is_none());
        }
    }

    #[test]
    fn lookup_equals_naive_search(
        spec in prop::collection::vec((1u64..40, 0u8..6, prop::bool::ANY, 0u64..3, 0u8..8), 1..400),
        base in 0x1000u64..0x40_0000,
    ) {
        // Rows: lengths 1..40, CFA rsp+8·k (steps of ±8 are common, so runs form), an
        // occasional rbp-based rule, gaps of 0 or ≥ 64 bytes; now and then an addend (`aux`)
        // that DWARF never gives an rsp rule, which must still come back as given.
        let mut rows: Vec<(u64, u64, UnwindRule)> = Vec::new();
        let mut at = base;
        for (len, k, rbp_based, gap, aux) in spec {
            if gap == 2 { at += 64 + len * 3; }
            let rule = if rbp_based {
                UnwindRule::new(CfaKind::Rbp, 16, RbpKind::AtCfa, -2)
            } else {
                let mut r = UnwindRule::new(CfaKind::Rsp, 8 * (i32::from(k) + 1), RbpKind::Unchanged, 0);
                r.aux = if aux == 7 { 3 } else { 0 };
                r
            };
            rows.push((at, at + len, rule));
            at += len;
        }
        let table = table_from_rows(&rows).unwrap();
        for &(start, end, rule) in &rows {
            for pc in [start, (start + end) / 2, end - 1] {
                prop_assert_eq!(table.lookup(pc), Some(rule), "pc {:#x}", pc);
            }
        }
        // Past every row's end where no row follows within 64 bytes: a gap, never a neighbour's rule.
        for w in rows.windows(2) {
            if w[1].0 >= w[0].1 + 64 {
                prop_assert_eq!(table.lookup(w[0].1).and_then(|r| r.cfa_kind()), Some(CfaKind::Gap));
            }
        }
        let back = UnwindTable::from_bytes(&table.to_bytes()).unwrap();
        prop_assert_eq!(back.pages(), table.pages());
        prop_assert_eq!(back.entries(), table.entries());
        prop_assert_eq!(back.rules(), table.rules());
        prop_assert_eq!(back.runs(), table.runs());
    }

    #[test]
    fn arbitrary_bytes_never_panic(data in prop::collection::vec(any::<u8>(), 0..2048)) {
        let _ = UnwindTable::from_bytes(&data);
        let _ = compile_elf(&data);
    }
}

#[test]
fn corrupt_serialized_tables_are_rejected() {
    let t = unwound_unwind_tables::UnwindTable::compile_file("/usr/lib/x86_64-linux-gnu/libc.so.6".as_ref())
        .unwrap();
    let bytes = t.to_bytes();
    assert!(UnwindTable::from_bytes(&bytes).is_ok());
    assert!(UnwindTable::from_bytes(&bytes[..bytes.len() - 1]).is_err(), "truncated");
    let mut v = bytes.clone();
    v[4] = 99; // version
    assert!(UnwindTable::from_bytes(&v).is_err(), "other version");
    let mut v = bytes.clone();
    v[32] = 0xff; // first page's first entry index
    v[33] = 0xff;
    v[34] = 0xff;
    v[35] = 0x7f;
    assert!(UnwindTable::from_bytes(&v).is_err(), "page index out of range");
}

#[test]
fn truncated_and_mutated_elf_files_give_errors_not_panics() {
    let libc = std::fs::read("/usr/lib/x86_64-linux-gnu/libc.so.6").unwrap();
    for cut in [0, 4, 64, 1000, libc.len() / 3, libc.len() / 2, libc.len() - 1] {
        let _ = compile_elf(&libc[..cut]);
    }
    // Flip bytes all over .eh_frame's neighbourhood: whatever happens, no panic.
    let mut rng = 0x1234_5678_u64;
    for _ in 0..200 {
        let mut m = libc.clone();
        for _ in 0..16 {
            rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let i = (rng >> 33) as usize % m.len();
            m[i] ^= (rng >> 8) as u8 | 1;
        }
        let _ = compile_elf(&m);
    }
}

/// `Display` is readelf's notation for the CFA and rbp columns (`frames-interp`), and names
/// what readelf shows as `exp` or has no column for.
#[test]
fn rules_print_in_readelfs_notation() {
    let rule = |cfa, off, rbp, slot| UnwindRule::new(cfa, off, rbp, slot);
    let deref = {
        let mut r = rule(CfaKind::DerefRbp, -8, RbpKind::AtCfa, -2);
        r.aux = 16;
        r
    };
    for (r, text) in [
        (rule(CfaKind::Rsp, 8, RbpKind::Unchanged, 0), "rsp+8 u"),
        (rule(CfaKind::Rbp, 16, RbpKind::AtCfa, -2), "rbp+16 c-16"),
        (rule(CfaKind::Rsp, -8, RbpKind::AtCfa, 1), "rsp-8 c+8"),
        (rule(CfaKind::Rsp, 56, RbpKind::Undefined, 0), "rsp+56 undef"),
        (rule(CfaKind::Plt, 11, RbpKind::Unchanged, 0), "plt(11) u"),
        (deref, "deref(rbp-8)+16 c-16"),
        (rule(CfaKind::EndOfStack, 0, RbpKind::Undefined, 0), "end undef"),
        (UnwindRule::GAP, "gap undef"),
        (UnwindRule::unsupported(Unsupported::CfaRegister), "unsupported:cfa_register undef"),
        (UnwindRule::from_bits(0x0000_0000_0000_0309), "corrupt corrupt"),
    ] {
        assert_eq!(r.to_string(), text, "{r:?}");
    }
}
