//! The table's dictionary of (rule, run) records while it is built.

use crate::layout::*;

/// The table's dictionary while it is assembled: records as the table stores them, and an
/// open-addressing index of 2-byte slots into them (a few KiB, where a hash map of the
/// 12-byte keys would take as much as the records themselves).
#[derive(Default)]
pub(super) struct Dictionary {
    pub(super) rules: Vec<UnwindRule>,
    pub(super) runs: Vec<Run>,
    /// Record index + 1 per slot, 0 = empty; the length is a power of two.
    pub(super) slots: Vec<u16>,
    pub(super) overflow: u64,
    limit: usize,
}

impl Dictionary {
    /// A dictionary of at most `limit` records that starts with the gap rule (index 0) and
    /// the `DictionaryFull` rule (index 1).
    pub(super) fn new(limit: usize) -> Self {
        let mut d = Dictionary { limit, ..Dictionary::default() };
        d.id(UnwindRule::GAP, Run::NONE);
        d.id(UnwindRule::unsupported(Unsupported::DictionaryFull), Run::NONE);
        d
    }

    /// Sorts the records (the gap and `DictionaryFull` rules stay first) and returns the
    /// old index → new index map.
    /// `room`: records expected to be added later (reserved now: growing by doubling would
    /// hold both buffers and leave up to half of the new one empty).
    pub(super) fn canonicalize(&mut self, room: usize) -> Vec<u16> {
        let n = self.rules.len();
        let mut order: Vec<u16> = (0..n as u16).collect();
        order[2.min(n)..].sort_unstable_by_key(|&i| (self.rules[i as usize], self.runs[i as usize]));
        let cap = (n + room).min(self.limit.max(2));
        let mut rules = Vec::with_capacity(cap);
        rules.extend(order.iter().map(|&i| self.rules[i as usize]));
        self.rules = rules;
        let mut runs = Vec::with_capacity(cap);
        runs.extend(order.iter().map(|&i| self.runs[i as usize]));
        self.runs = runs;
        let mut map = vec![0u16; n];
        for (new, &old) in order.iter().enumerate() {
            map[old as usize] = new as u16;
        }
        drop(order);
        self.rebuild_slots(self.slots.len());
        map
    }

    fn rebuild_slots(&mut self, len: usize) {
        let mask = len.max(64) - 1;
        let mut slots = vec![0u16; mask + 1];
        for (r, (&rule, &run)) in self.rules.iter().zip(&self.runs).enumerate() {
            let mut i = Self::slot_of(rule, run, mask);
            while slots[i] != 0 {
                i = (i + 1) & mask;
            }
            slots[i] = r as u16 + 1;
        }
        self.slots = slots;
    }

    pub(super) fn slot_of(rule: UnwindRule, run: Run, mask: usize) -> usize {
        let bits = rule.to_bits();
        let h =
            (bits.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ u64::from(run.0)).wrapping_mul(0xff51_afd7_ed55_8ccd);
        (h >> 40) as usize & mask
    }

    /// The record's index; past [`MAX_RULES`] records, the index of the `DictionaryFull`
    /// rule (always index 1), counted.
    pub(super) fn id(&mut self, rule: UnwindRule, run: Run) -> u16 {
        if self.slots.is_empty() {
            self.slots = vec![0; 64];
        }
        let mask = self.slots.len() - 1;
        let mut i = Self::slot_of(rule, run, mask);
        loop {
            match self.slots[i] {
                0 => break,
                s => {
                    let r = usize::from(s - 1);
                    if self.rules[r] == rule && self.runs[r] == run {
                        return r as u16;
                    }
                }
            }
            i = (i + 1) & mask;
        }
        if self.rules.len() >= self.limit.max(2) {
            self.overflow += 1;
            return 1;
        }
        let id = self.rules.len() as u16;
        self.rules.push(rule);
        self.runs.push(run);
        self.slots[i] = id + 1;
        // At most half full: rebuild at twice the size.
        if self.rules.len() * 2 > self.slots.len() {
            self.rebuild_slots(self.slots.len() * 2);
        }
        id
    }
}
