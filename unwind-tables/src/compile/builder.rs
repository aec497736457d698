//! A group's rows folded into entries: runs of pushes and pops, restore points after an
//! epilogue's `ret`, gap entries where no FDE covers code.

use std::sync::Mutex;

use super::dictionary::Dictionary;
use super::padding::Code;
use crate::layout::*;

/// Entries per block of a group's output: blocks are freed one by one as the table is
/// assembled, so the group outputs and the table are never both whole.
pub(super) const GROUP_BLOCK: usize = 256;

/// A run of a group's entries on one page: page number (< 2^44) in the high 44 bits, the
/// count (≤ 4096 entries fit a page) in the low 20. 8 bytes where a tuple takes 16.
#[derive(Clone, Copy)]
pub(super) struct PageRun(u64);

impl PageRun {
    pub(super) fn page(self) -> u64 {
        self.0 >> 20
    }
    pub(super) fn count(self) -> usize {
        (self.0 & 0xf_ffff) as usize
    }
}

/// Output of one group of FDEs (contiguous in address order).
#[derive(Default)]
pub(super) struct GroupOut {
    /// Entries naming records of the shared dictionary, in blocks of [`GROUP_BLOCK`].
    pub(super) entries: Vec<Vec<u32>>,
    /// Runs of `entries` by page: (absolute page number, count).
    pub(super) page_runs: Vec<PageRun>,
    /// An entry on a page above [`PageRun`]'s range (only from arbitrary rows).
    pub(super) page_overflow: bool,
    pub(super) rows: u64,
    pub(super) unsupported: [u64; 8],
    pub(super) rbp_undefined: u64,
}

pub(super) struct Open {
    start: u64,
    base: UnwindRule,
    run: Run,
    restore: bool,
    /// Start of the last row in the run.
    last_row: u64,
    /// The rule in effect before this entry, and whether a restore to it is allowed.
    before: UnwindRule,
    may_restore: bool,
}

/// Slots of a thread's cache of shared dictionary lookups (16 bytes each), at most: a file
/// gets one slot per 32 FDEs, at least [`MIN_DICT_CACHE`] (a small file's distinct rules
/// are few, and its table is smaller than a large cache).
pub(super) const DICT_CACHE: usize = 4096;
pub(super) const MIN_DICT_CACHE: usize = 256;

/// A direct-mapped cache of shared dictionary lookups: `(rule, run, id)`, id `u16::MAX` =
/// empty. Kept by a thread from group to group (ids never change while the groups run).
pub(super) type DictCache = Vec<(UnwindRule, Run, u16)>;

pub(super) fn dict_cache(fdes: usize) -> DictCache {
    let slots = (fdes / 32).next_power_of_two().clamp(MIN_DICT_CACHE, DICT_CACHE);
    vec![(UnwindRule::GAP, Run::NONE, u16::MAX); slots]
}

pub(super) struct Builder<'c> {
    code: &'c Code<'c>,
    pub(super) out: GroupOut,
    /// The table's records, shared by the groups (one copy, not one per group).
    shared: &'c Mutex<Dictionary>,
    /// Cache of `shared` lookups.
    cache: DictCache,
    open: Option<Open>,
    /// Rule in effect at the end of the last row, and where that row ended.
    state: UnwindRule,
    last_end: Option<u64>,
    /// Page and restore bit of the last closed entry.
    last_closed: Option<(u64, bool)>,
    last_rule: Option<((UnwindRule, Run), u16)>,
}

impl<'c> Builder<'c> {
    pub(super) fn new(code: &'c Code<'c>, shared: &'c Mutex<Dictionary>, cache: DictCache) -> Self {
        Builder {
            code,
            out: GroupOut::default(),
            shared,
            cache,
            open: None,
            state: UnwindRule::GAP,
            last_end: None,
            last_closed: None,
            last_rule: None,
        }
    }

    fn rule_id(&mut self, rule: (UnwindRule, Run)) -> u16 {
        if let Some((r, i)) = self.last_rule {
            if r.0.to_bits() == rule.0.to_bits() && r.1 == rule.1 {
                return i;
            }
        }
        let slot = Dictionary::slot_of(rule.0, rule.1, self.cache.len() - 1);
        let c = self.cache[slot];
        let i = if c.2 != u16::MAX && c.0.to_bits() == rule.0.to_bits() && c.1 == rule.1 {
            c.2
        } else {
            let i = self.shared.lock().unwrap_or_else(|p| p.into_inner()).id(rule.0, rule.1);
            self.cache[slot] = (rule.0, rule.1, i);
            i
        };
        self.last_rule = Some((rule, i));
        i
    }

    fn close(&mut self) {
        if let Some(o) = self.open.take() {
            let id = self.rule_id((o.base, o.run));
            // A record that did not fit the dictionary (id 1, `DictionaryFull`) has no run,
            // so it cannot place a restore point either.
            let restore = o.restore && id != 1;
            let e = Entry { page_offset: (o.start & (PAGE_SIZE - 1)) as u16, rule: id, restore };
            if self.out.entries.last().is_none_or(|b| b.len() == GROUP_BLOCK) {
                self.out.entries.push(Vec::with_capacity(GROUP_BLOCK));
            }
            self.out.entries.last_mut().unwrap().push(e.encode());
            let page = o.start >> PAGE_SHIFT;
            match self.out.page_runs.last_mut() {
                Some(r) if r.page() == page => *r = PageRun(r.0 + 1),
                _ if page >= 1 << 44 => self.out.page_overflow = true,
                _ => self.out.page_runs.push(PageRun(page << 20 | 1)),
            }
            self.last_closed = Some((o.start >> PAGE_SHIFT, o.restore));
        }
    }

    fn open_new(&mut self, start: u64, rule: UnwindRule) {
        self.close();
        // A restore may return to the state before this entry only when the lookup can
        // recompute it: from the previous entry of the same page (one without a restore bit
        // of its own), or from the page's start rule when this entry is the page's first.
        let page = start >> PAGE_SHIFT;
        let may_restore = match self.last_closed {
            Some((p, restore)) if p == page => !restore,
            Some(_) => true,
            None => false, // first entry of a group: the state before it is not known here
        };
        self.open = Some(Open {
            start,
            base: rule,
            run: Run::NONE,
            restore: false,
            last_row: start,
            before: self.state,
            may_restore,
        });
        self.state = rule;
    }

    /// Whether `rule` at `start` continues the open entry: one more push/pop step, or the
    /// restore after its `ret`.
    fn try_extend(&mut self, start: u64, rule: &UnwindRule) -> bool {
        let Some(o) = self.open.as_mut() else { return false };
        if o.restore || start >> PAGE_SHIFT != o.start >> PAGE_SHIFT {
            return false;
        }
        let dist = start - o.last_row;
        if o.run.steps() > 0
            && o.run.pops()
            && o.may_restore
            && rule.to_bits() == o.before.to_bits()
            && self.code.single_exit(o.last_row, start)
        {
            o.restore = true;
            self.state = *rule;
            return true;
        }
        // (An addend is 0 in rules from DWARF; rows given to `table_from_rows` may set one,
        // and a run keeps its first row's.)
        let rsp = Some(CfaKind::Rsp);
        if o.base.cfa_kind() != rsp || rule.cfa_kind() != rsp || rule.aux != o.base.aux {
            return false;
        }
        let delta = i64::from(rule.cfa_offset) - i64::from(self.state.cfa_offset);
        let dir_pops = match delta {
            8 => false,
            -8 => true,
            _ => return false,
        };
        let Some(run) = o.run.pushed(dist, dir_pops) else { return false };
        // rbp: in a push run each row's rbp rule is kept exactly (the run records the step
        // from which rbp is saved). In a pop run the saved slot at CFA + k stays intact up
        // to the return, so "saved at CFA + k" stays right after `pop rbp`.
        let (mut base, mut run) = (o.base, run);
        let same_rbp = rule.rbp == self.state.rbp && rule.rbp_slot == self.state.rbp_slot;
        let (saved, unchanged) = (Some(RbpKind::AtCfa), Some(RbpKind::Unchanged));
        let rbp_ok = if dir_pops {
            base.rbp_kind() == saved
                && ((rule.rbp_kind() == saved && rule.rbp_slot == base.rbp_slot)
                    || rule.rbp_kind() == unchanged)
        } else if same_rbp {
            true
        } else if base.rbp_kind() == unchanged
            && self.state.rbp_kind() == unchanged
            && rule.rbp_kind() == saved
        {
            // `push %rbp` partway through the run: saved from this step on, exactly as
            // the rows say (the run never stands "unchanged" in for "saved").
            base = base.with_rbp(RbpKind::AtCfa, rule.rbp_slot);
            run = run.with_rbp_from(run.steps());
            true
        } else {
            false
        };
        if !rbp_ok {
            return false;
        }
        o.base = base;
        o.run = run;
        o.last_row = start;
        // `run.final_rule(base)`, known without applying the run: this row's CFA, and the
        // run's rbp rule (the row's own, but for "unchanged" after `pop %rbp` in a pop run).
        self.state = UnwindRule { rbp: base.rbp, rbp_slot: base.rbp_slot, ..*rule };
        debug_assert_eq!(self.state, run.final_rule(base));
        true
    }

    #[inline(always)]
    pub(super) fn row(&mut self, start: u64, end: u64, rule: UnwindRule) {
        self.out.rows += 1;
        let mut start = start;
        if let Some(last_end) = self.last_end {
            if start < last_end {
                // Overlapping FDEs: the earlier one wins.
                if end <= last_end {
                    return;
                }
                start = last_end;
            } else if start > last_end && !self.code.is_padding(last_end, start) {
                self.open_new(last_end, UnwindRule::GAP);
            }
        }
        self.last_end = Some(end);
        if rule.to_bits() == self.state.to_bits()
            && self.open.as_ref().is_some_and(|o| o.start >> PAGE_SHIFT == start >> PAGE_SHIFT)
        {
            return;
        }
        if self.try_extend(start, &rule) {
            return;
        }
        self.open_new(start, rule);
    }

    /// The group's output, and the cache for the next group.
    pub(super) fn finish(mut self) -> (GroupOut, DictCache) {
        if let Some(end) = self.last_end {
            self.open_new(end, UnwindRule::GAP);
        }
        self.close();
        (self.out, self.cache)
    }
}
