//! The table's binary layout, its lookup and the single-frame step rule. `no_std`: the BPF
//! walker, the userspace reference walker and the tests share this one definition.
//!
//! # Layout
//!
//! A table covers the file virtual addresses `[base, base + pages × 4096)` of one ELF file.
//! All integers are little-endian.
//!
//! ```text
//! header    32 bytes   TableHeader
//! pages     8 × n      PageEntry per 4 KiB page of address space
//! entries   4 × m      packed u32 entries; a page's entries never straddle a chunk of
//!                      CHUNK_ENTRIES, so an in-kernel lookup searches inside one map value
//! rules     8 × r      UnwindRule dictionary
//! runs      4 × r      Run of each dictionary record (record i = rules[i] + runs[i])
//! ```
//!
//! An entry (u32) is:
//!
//! ```text
//! bits  0..12  offset of the entry's first row in its page
//! bits 12..26  dictionary record: a rule and the run that goes with it
//! bits 26..31  zero
//! bit  31      restore: one byte after the run's last row (a `ret`), the rule in effect
//!              before this entry holds again (DW_CFA_restore_state after an epilogue);
//!              only set when the previous entry of the page has no restore bit
//! ```
//!
//! A run (u32) lets one entry stand for the rows of a prologue or an epilogue:
//!
//! ```text
//! bits  0..3   steps n (0..=7): n more rows follow, each after one push (CFA offset +8)
//!              or pop (−8); only for CFA = rsp + offset rules
//! bit   3      direction: 0 = pushes, 1 = pops
//! bits  4..25  step i (0-based) starts 1 + bits[4+3i .. 7+3i] bytes (1..=8) after the
//!              previous row
//! bits 25..28  rbp from (0..=steps, pushes only): with a rule whose rbp is saved, the
//!              rows before this step still have rbp unchanged (a push run that saves rbp
//!              partway: `push %rbp` is its step rbp-from)
//! bits 28..32  zero
//! ```
//!
//! Runs are shared through the dictionary: compilers emit few distinct prologue and
//! epilogue shapes, so (rule, run) records stay in the thousands while one entry covers
//! up to 8 rows.
//!
//! Lookup of pc: page = (pc − base) / 4096; binary search the page's entries for the last
//! one starting at or before pc; none → the page's `start_rule` (a record without run).
//! Within a run the CFA offset is the rule's plus ±8 per step already passed; past a restore
//! entry's `ret`, the rule is the one the previous entry ended in (or `start_rule`).

/// Bytes of address space per page of the table.
pub const PAGE_SIZE: u64 = 4096;
/// log2 of [`PAGE_SIZE`].
pub const PAGE_SHIFT: u32 = 12;
/// Entries per chunk: one BPF map value of 16 KiB.
pub const CHUNK_ENTRIES: u32 = 4096;
/// Most dictionary records (rule + run) one table may have (14-bit index). The largest
/// GCC-built programs here (lto-dump, cc1) need more than 4096.
pub const MAX_RULES: usize = 1 << 14;
/// Entry bits that must be zero (26..31).
pub const RESERVED_ENTRY_BITS: u32 = 0x7c00_0000;
/// Most run steps one entry can encode.
pub const MAX_RUN_STEPS: u32 = 7;
/// Most bytes between two rows of a run.
pub const MAX_RUN_STEP_BYTES: u64 = 8;
/// `TableHeader::magic`.
pub const MAGIC: [u8; 4] = *b"UWT1";
/// `TableHeader::version`: bumped on any change to the layout or its meaning.
pub const FORMAT_VERSION: u16 = 3;

/// How the canonical frame address (the caller's rsp) is found.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum CfaKind {
    /// No unwind information covers this address: a pc here never takes a neighbour's rule.
    Gap = 0,
    /// CFA = rsp + `cfa_offset`.
    Rsp = 1,
    /// CFA = rbp + `cfa_offset`.
    Rbp = 2,
    /// GCC's PLT rule: CFA = rsp + 8, + 8 more when (rip & 15) ≥ `cfa_offset` (10 or 11).
    Plt = 3,
    /// CFA = *(rsp + `cfa_offset`) + `aux`.
    DerefRsp = 4,
    /// CFA = *(rbp + `cfa_offset`) + `aux` (stack realignment prologues).
    DerefRbp = 5,
    /// A sigreturn frame: rsp points at the `ucontext` the kernel saved; rip, rsp and rbp are
    /// read back from it.
    Signal = 6,
    /// The return address is undefined: the outermost frame (`_start`, thread start).
    EndOfStack = 7,
    /// The DWARF rule here is not expressible; `reason` says why.
    Unsupported = 8,
}

impl CfaKind {
    /// From the byte stored in a rule.
    pub const fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            0 => CfaKind::Gap,
            1 => CfaKind::Rsp,
            2 => CfaKind::Rbp,
            3 => CfaKind::Plt,
            4 => CfaKind::DerefRsp,
            5 => CfaKind::DerefRbp,
            6 => CfaKind::Signal,
            7 => CfaKind::EndOfStack,
            8 => CfaKind::Unsupported,
            _ => return None,
        })
    }
}

/// How the caller's rbp is found.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RbpKind {
    /// rbp still holds the caller's value.
    Unchanged = 0,
    /// The caller's rbp is saved at CFA + 8 × `rbp_slot`.
    AtCfa = 1,
    /// The caller's rbp is not recoverable.
    Undefined = 2,
}

impl RbpKind {
    /// From the byte stored in a rule.
    pub const fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            0 => RbpKind::Unchanged,
            1 => RbpKind::AtCfa,
            2 => RbpKind::Undefined,
            _ => return None,
        })
    }
}

/// Why a rule is [`CfaKind::Unsupported`].
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Unsupported {
    /// CFA based on a register other than rsp or rbp (e.g. r10 in realignment code).
    CfaRegister = 1,
    /// A CFA expression that matches no known pattern.
    CfaExpression = 2,
    /// The return address is not saved at CFA − 8.
    ReturnAddress = 3,
    /// rbp is restored by a rule other than offset/same/undefined.
    RbpRule = 4,
    /// An offset outside the 32-bit range.
    OffsetRange = 5,
    /// The CFI could not be evaluated (malformed instructions).
    Malformed = 6,
    /// More distinct rules than the 14-bit dictionary index can name.
    DictionaryFull = 7,
}

impl Unsupported {
    /// Every reason.
    pub const ALL: [Unsupported; 7] = [
        Unsupported::CfaRegister,
        Unsupported::CfaExpression,
        Unsupported::ReturnAddress,
        Unsupported::RbpRule,
        Unsupported::OffsetRange,
        Unsupported::Malformed,
        Unsupported::DictionaryFull,
    ];
    /// Stable short name.
    pub const fn name(self) -> &'static str {
        match self {
            Unsupported::CfaRegister => "cfa_register",
            Unsupported::CfaExpression => "cfa_expression",
            Unsupported::ReturnAddress => "return_address",
            Unsupported::RbpRule => "rbp_rule",
            Unsupported::OffsetRange => "offset_range",
            Unsupported::Malformed => "malformed",
            Unsupported::DictionaryFull => "dictionary_full",
        }
    }
    /// From the byte stored in a rule.
    pub const fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => Unsupported::CfaRegister,
            2 => Unsupported::CfaExpression,
            3 => Unsupported::ReturnAddress,
            4 => Unsupported::RbpRule,
            5 => Unsupported::OffsetRange,
            6 => Unsupported::Malformed,
            7 => Unsupported::DictionaryFull,
            _ => return None,
        })
    }
}

/// The stable short name ([`Unsupported::name`]); width and alignment are honoured.
impl core::fmt::Display for Unsupported {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.pad(self.name())
    }
}

/// One unwind rule: how to find the caller's rsp (CFA), rip (at CFA − 8) and rbp. 8 bytes.
///
/// The fields are the bytes the tables and the in-kernel walker store; every bit pattern is
/// a value (read from a map or a file), so the typed accessors ([`cfa_kind`](Self::cfa_kind),
/// [`rbp_kind`](Self::rbp_kind), [`reason`](Self::reason), ...) answer `None` for bytes no
/// kind has. [`to_bits`](Self::to_bits) and [`from_bits`](Self::from_bits) convert to and
/// from one little-endian word, the layout of this `#[repr(C)]` struct. `Display` prints the
/// CFA and rbp columns in readelf's notation:
///
/// ```
/// use unwound_unwind_tables::layout::{CfaKind, RbpKind, UnwindRule};
///
/// let rule = UnwindRule::new(CfaKind::Rbp, 16, RbpKind::AtCfa, -2);
/// assert_eq!(rule.to_string(), "rbp+16 c-16");
/// assert_eq!(rule.saved_rbp_offset(), Some(-16));
/// assert_eq!(UnwindRule::from_bits(rule.to_bits()), rule);
/// assert_eq!(UnwindRule::from_bits(u64::MAX).cfa_kind(), None);
/// ```
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct UnwindRule {
    /// A [`CfaKind`].
    pub cfa: u8,
    /// A [`RbpKind`].
    pub rbp: u8,
    /// With [`RbpKind::AtCfa`]: the caller's rbp is at CFA + 8 × `rbp_slot`.
    pub rbp_slot: i8,
    /// An [`Unsupported`] reason when `cfa` is `Unsupported`; the addend `k` of
    /// `*(reg + off) + k` for the deref kinds; else 0.
    pub aux: i8,
    /// See [`CfaKind`].
    pub cfa_offset: i32,
}

const _: () = assert!(core::mem::size_of::<UnwindRule>() == 8);

impl UnwindRule {
    /// CFA = reg + offset with the given rbp rule (`rbp_slot` in units of 8 bytes).
    pub const fn new(cfa: CfaKind, cfa_offset: i32, rbp: RbpKind, rbp_slot: i8) -> Self {
        UnwindRule { cfa: cfa as u8, rbp: rbp as u8, rbp_slot, aux: 0, cfa_offset }
    }
    /// The rule for an address no FDE covers.
    pub const GAP: UnwindRule = UnwindRule::new(CfaKind::Gap, 0, RbpKind::Undefined, 0);
    /// An unsupported rule with its reason.
    pub const fn unsupported(reason: Unsupported) -> Self {
        UnwindRule {
            cfa: CfaKind::Unsupported as u8,
            rbp: RbpKind::Undefined as u8,
            rbp_slot: 0,
            aux: reason as i8,
            cfa_offset: 0,
        }
    }
    /// The rule as one word, `cfa | rbp << 8 | rbp_slot << 16 | aux << 24 | cfa_offset << 32`
    /// (signed fields as their two's complement bytes): on a little-endian machine (x86-64,
    /// BPF) the word's bytes are the `#[repr(C)]` struct's. Equal words, equal rules.
    #[inline(always)]
    pub const fn to_bits(self) -> u64 {
        #[cfg(target_endian = "little")]
        // SAFETY: 8 bytes of integers without padding (offsets 0, 1, 2, 3, 4; the size is
        // asserted after the struct), every one initialized. A plain copy: written with
        // shifts, LLVM takes the struct apart field by field and the BPF walker's
        // verification grows by a quarter.
        let bits = unsafe { core::mem::transmute::<UnwindRule, u64>(self) };
        #[cfg(target_endian = "big")]
        let bits = self.cfa as u64
            | (self.rbp as u64) << 8
            | (self.rbp_slot as u8 as u64) << 16
            | (self.aux as u8 as u64) << 24
            | (self.cfa_offset as u32 as u64) << 32;
        bits
    }
    /// The rule whose [`to_bits`](Self::to_bits) is `bits`. Every word is a rule; one with
    /// bytes no kind has reads back `None` from the typed accessors.
    #[inline(always)]
    pub const fn from_bits(bits: u64) -> Self {
        #[cfg(target_endian = "little")]
        // SAFETY: every field is an integer, so every 8 bytes are a value.
        let rule = unsafe { core::mem::transmute::<u64, UnwindRule>(bits) };
        #[cfg(target_endian = "big")]
        let rule = UnwindRule {
            cfa: bits as u8,
            rbp: (bits >> 8) as u8,
            rbp_slot: (bits >> 16) as u8 as i8,
            aux: (bits >> 24) as u8 as i8,
            cfa_offset: (bits >> 32) as u32 as i32,
        };
        rule
    }
    /// The CFA kind, `None` for a corrupt byte.
    pub const fn cfa_kind(&self) -> Option<CfaKind> {
        CfaKind::from_u8(self.cfa)
    }
    /// The rbp kind, `None` for a corrupt byte.
    pub const fn rbp_kind(&self) -> Option<RbpKind> {
        RbpKind::from_u8(self.rbp)
    }
    /// Byte offset from the CFA of the caller's saved rbp, when the rule says it is saved
    /// ([`RbpKind::AtCfa`]).
    pub const fn saved_rbp_offset(&self) -> Option<i64> {
        match self.rbp_kind() {
            Some(RbpKind::AtCfa) => Some(self.rbp_offset()),
            _ => None,
        }
    }
    /// The addend `k` of `CFA = *(reg + cfa_offset) + k`, for the deref kinds.
    pub const fn deref_addend(&self) -> Option<i8> {
        match self.cfa_kind() {
            Some(CfaKind::DerefRsp | CfaKind::DerefRbp) => Some(self.aux),
            _ => None,
        }
    }
    /// The unsupported reason, for an unsupported rule.
    pub const fn reason(&self) -> Option<Unsupported> {
        if matches!(self.cfa_kind(), Some(CfaKind::Unsupported)) {
            Unsupported::from_u8(self.aux as u8)
        } else {
            None
        }
    }
    /// `rbp_slot` in bytes: the offset from the CFA of the saved rbp when the rbp kind is
    /// [`RbpKind::AtCfa`] (see [`saved_rbp_offset`](Self::saved_rbp_offset)).
    pub const fn rbp_offset(&self) -> i64 {
        self.rbp_slot as i64 * 8
    }
    /// The same CFA rule with rbp found as `rbp` says (`rbp_slot` in units of 8 bytes).
    pub const fn with_rbp(mut self, rbp: RbpKind, rbp_slot: i8) -> Self {
        self.rbp = rbp as u8;
        self.rbp_slot = rbp_slot;
        self
    }
    /// The rule `steps` run steps later in direction `pops`.
    pub const fn advanced(mut self, steps: u32, pops: bool) -> Self {
        let delta = 8 * steps as i32;
        self.cfa_offset =
            if pops { self.cfa_offset.wrapping_sub(delta) } else { self.cfa_offset.wrapping_add(delta) };
        self
    }
}

/// The CFA and rbp columns of `readelf --debug-dump=frames-interp`, separated by one space:
/// `rsp+8 u`, `rbp+16 c-16` (`u`: rbp unchanged; `c-16`: saved at CFA − 16). What readelf
/// shows as `exp` or has no column for is named: `plt(11)`, `deref(rsp+8)+0`, `signal`,
/// `end`, `gap`, `unsupported:cfa_register`; an unrecoverable rbp is `undef`, and a byte no
/// kind has is `corrupt`.
impl core::fmt::Display for UnwindRule {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let off = self.cfa_offset;
        match self.cfa_kind() {
            Some(CfaKind::Rsp) => write!(f, "rsp{off:+}")?,
            Some(CfaKind::Rbp) => write!(f, "rbp{off:+}")?,
            Some(CfaKind::Plt) => write!(f, "plt({off})")?,
            Some(CfaKind::DerefRsp) => write!(f, "deref(rsp{off:+}){:+}", self.aux)?,
            Some(CfaKind::DerefRbp) => write!(f, "deref(rbp{off:+}){:+}", self.aux)?,
            Some(CfaKind::Signal) => f.write_str("signal")?,
            Some(CfaKind::EndOfStack) => f.write_str("end")?,
            Some(CfaKind::Gap) => f.write_str("gap")?,
            Some(CfaKind::Unsupported) => match self.reason() {
                Some(r) => write!(f, "unsupported:{r}")?,
                None => f.write_str("unsupported:?")?,
            },
            None => f.write_str("corrupt")?,
        }
        match self.rbp_kind() {
            Some(RbpKind::AtCfa) => write!(f, " c{:+}", self.rbp_offset()),
            Some(RbpKind::Unchanged) => f.write_str(" u"),
            Some(RbpKind::Undefined) => f.write_str(" undef"),
            None => f.write_str(" corrupt"),
        }
    }
}

/// A decoded table entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Offset of the first row in its page (0..4096).
    pub page_offset: u16,
    /// Index of the dictionary record: the rule, and the run that follows it.
    pub rule: u16,
    /// One byte after the run's last row, the rule before this entry holds again.
    pub restore: bool,
}

impl Entry {
    /// Packs into the u32 layout.
    pub const fn encode(&self) -> u32 {
        (self.page_offset as u32 & 0xfff)
            | ((self.rule as u32 & 0x3fff) << 12)
            | ((self.restore as u32) << 31)
    }
    /// Unpacks from the u32 layout.
    pub const fn decode(v: u32) -> Self {
        Entry { page_offset: (v & 0xfff) as u16, rule: ((v >> 12) & 0x3fff) as u16, restore: (v >> 31) == 1 }
    }
    /// True when `page_offset` lies past the restore point of a restore entry with `run`.
    pub const fn restored_at(&self, page_offset: u16, run: Run) -> bool {
        self.restore && page_offset as u32 > self.page_offset as u32 + run.length()
    }
}

/// The rows that follow an entry's first: `steps` pushes or pops, each 1 to 8 bytes after
/// the previous row (bit layout in the [module docs](self)).
#[repr(transparent)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Run(pub u32);

impl Run {
    /// No rows after the first.
    pub const NONE: Run = Run(0);

    /// Number of rows after the first.
    #[inline]
    pub const fn steps(self) -> u32 {
        self.0 & 7
    }
    /// Direction: true = pops (CFA offset −8 per step).
    #[inline]
    pub const fn pops(self) -> bool {
        (self.0 >> 3) & 1 == 1
    }
    /// Bytes from row `i` to row `i + 1` (1..=8).
    #[inline]
    pub const fn step_bytes(self, i: u32) -> u32 {
        ((self.0 >> (4 + 3 * i)) & 7) + 1
    }
    /// The step from which a saved rbp holds (see the [module docs](self)).
    #[inline]
    pub const fn rbp_from(self) -> u32 {
        (self.0 >> 25) & 7
    }
    /// The run with rows before step `k` keeping rbp unchanged.
    #[inline]
    pub const fn with_rbp_from(self, k: u32) -> Run {
        Run((self.0 & !(7 << 25)) | ((k & 7) << 25))
    }
    /// True when no bit outside the layout is set and the fields are consistent.
    #[inline]
    pub const fn is_valid(self) -> bool {
        let dists = (self.0 >> 4) & ((1 << (3 * MAX_RUN_STEPS)) - 1);
        self.0 >> 28 == 0
            && dists >> (3 * self.steps()) == 0
            && self.rbp_from() <= self.steps()
            && !(self.pops() && self.rbp_from() > 0)
            && (self.steps() > 0 || self.0 == 0)
    }
    /// The run with one more step `bytes` after its last row, in direction `pops`; `None`
    /// when it is full, the distance does not fit, or the direction differs.
    #[inline(always)]
    pub const fn pushed(self, bytes: u64, pops: bool) -> Option<Run> {
        let n = self.steps();
        if n >= MAX_RUN_STEPS || bytes == 0 || bytes > MAX_RUN_STEP_BYTES || (n > 0 && self.pops() != pops) {
            return None;
        }
        Some(Run((self.0 & !0xf) | (n + 1) | ((pops as u32) << 3) | (((bytes as u32) - 1) << (4 + 3 * n))))
    }
    /// How many steps have taken effect at `page_offset`, for a run whose first row is at
    /// `first` (≤ `page_offset`).
    #[inline]
    pub const fn steps_at(self, first: u16, page_offset: u16) -> u32 {
        let mut at = first as u32;
        let mut i = 0;
        let steps = self.steps();
        while i < steps {
            at += self.step_bytes(i);
            if at > page_offset as u32 {
                return i;
            }
            i += 1;
        }
        steps
    }
    /// Bytes from the first row to the last.
    #[inline]
    pub const fn length(self) -> u32 {
        let mut len = 0;
        let mut i = 0;
        while i < self.steps() {
            len += self.step_bytes(i);
            i += 1;
        }
        len
    }
    /// `base` after `steps` steps of this run.
    #[inline]
    pub const fn apply(self, base: UnwindRule, steps: u32) -> UnwindRule {
        // Zero steps advance the CFA by nothing.
        let mut r = base.advanced(steps, self.pops());
        if steps < self.rbp_from() && matches!(r.rbp_kind(), Some(RbpKind::AtCfa)) {
            r = r.with_rbp(RbpKind::Unchanged, 0);
        }
        r
    }
    /// The rule the run ends in (before any restore).
    #[inline]
    pub const fn final_rule(self, base: UnwindRule) -> UnwindRule {
        self.apply(base, self.steps())
    }
}

/// A dictionary record as the in-kernel walker stores it: a rule and its run. 12 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct DictEntry {
    /// The rule at the entry's first row.
    pub rule: UnwindRule,
    /// The rows that follow.
    pub run: Run,
}

const _: () = assert!(core::mem::size_of::<DictEntry>() == 12);

impl DictEntry {
    /// The 12 bytes the in-kernel walker stores: the rule's word, then the run, little-endian.
    pub const fn to_le_bytes(&self) -> [u8; 12] {
        let r = self.rule.to_bits().to_le_bytes();
        let n = self.run.0.to_le_bytes();
        [r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], n[0], n[1], n[2], n[3]]
    }
}

/// Per-page index record.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PageEntry {
    /// Position of the page's first entry in the entry array.
    pub first: u32,
    /// Number of entries in this page.
    pub count: u16,
    /// Rule in effect at the page's first byte when no entry starts there.
    pub start_rule: u16,
}

const _: () = assert!(core::mem::size_of::<PageEntry>() == 8);

impl PageEntry {
    /// The 8 bytes a table and the in-kernel walker store: `first`, `count`, `start_rule`,
    /// little-endian.
    pub const fn to_le_bytes(&self) -> [u8; 8] {
        let f = self.first.to_le_bytes();
        let c = self.count.to_le_bytes();
        let r = self.start_rule.to_le_bytes();
        [f[0], f[1], f[2], f[3], c[0], c[1], r[0], r[1]]
    }
    /// Reads [`to_le_bytes`](Self::to_le_bytes)' layout.
    pub const fn from_le_bytes(b: [u8; 8]) -> Self {
        PageEntry {
            first: u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            count: u16::from_le_bytes([b[4], b[5]]),
            start_rule: u16::from_le_bytes([b[6], b[7]]),
        }
    }
}

/// Fixed-size head of a serialized table.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct TableHeader {
    /// [`MAGIC`].
    pub magic: [u8; 4],
    /// [`FORMAT_VERSION`].
    pub version: u16,
    /// Reserved, 0.
    pub flags: u16,
    /// File virtual address of page 0 (page aligned).
    pub base: u64,
    /// Number of pages.
    pub pages: u32,
    /// Number of entries, padding included.
    pub entries: u32,
    /// Number of rules.
    pub rules: u32,
    /// Reserved, 0.
    pub reserved: u32,
}

/// Size of [`TableHeader`].
pub const HEADER_SIZE: usize = core::mem::size_of::<TableHeader>();
const _: () = assert!(HEADER_SIZE == 32);

/// A borrowed view of the table's arrays, for lookups. The entries are in chunks of
/// [`CHUNK_ENTRIES`] (the last may be shorter); entry `i` is `chunks[i / CHUNK_ENTRIES]
/// [i % CHUNK_ENTRIES]`, and no page's entries straddle two chunks.
#[derive(Clone, Copy, Debug)]
pub struct TableView<'a, C: AsRef<[u32]>> {
    /// File virtual address of page 0.
    pub base: u64,
    /// Page index.
    pub pages: &'a [PageEntry],
    /// Packed entries, by chunk.
    pub chunks: &'a [C],
    /// Rule dictionary.
    pub rules: &'a [UnwindRule],
    /// The run of each dictionary record.
    pub runs: &'a [Run],
}

/// The `count` entries from global index `first`, inside one chunk.
pub fn page_entries<C: AsRef<[u32]>>(chunks: &[C], first: u32, count: u16) -> Option<&[u32]> {
    if count == 0 {
        return Some(&[]);
    }
    let off = first as usize % CHUNK_ENTRIES as usize;
    chunks.get(first as usize / CHUNK_ENTRIES as usize)?.as_ref().get(off..off + count as usize)
}

impl<C: AsRef<[u32]>> TableView<'_, C> {
    /// The rule for file virtual address `pc`; `None` outside the table (or for an index
    /// that points outside the arrays, which a well-formed table never has).
    pub fn lookup(&self, pc: u64) -> Option<UnwindRule> {
        let rel = pc.checked_sub(self.base)?;
        let page = self.pages.get((rel >> PAGE_SHIFT) as usize)?;
        let offset = (rel & (PAGE_SIZE - 1)) as u16;
        let entries = page_entries(self.chunks, page.first, page.count)?;
        let n = entries.partition_point(|&e| Entry::decode(e).page_offset <= offset);
        if n == 0 {
            return self.rules.get(page.start_rule as usize).copied();
        }
        let e = Entry::decode(entries[n - 1]);
        let run = *self.runs.get(e.rule as usize)?;
        if e.restored_at(offset, run) {
            return if n >= 2 {
                let prev = Entry::decode(entries[n - 2]);
                Some(self.runs.get(prev.rule as usize)?.final_rule(*self.rules.get(prev.rule as usize)?))
            } else {
                self.rules.get(page.start_rule as usize).copied()
            };
        }
        let rule = *self.rules.get(e.rule as usize)?;
        Some(run.apply(rule, run.steps_at(e.page_offset, offset)))
    }
}

/// The registers a frame step needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Registers {
    /// Instruction pointer.
    pub rip: u64,
    /// Stack pointer.
    pub rsp: u64,
    /// Frame pointer (or whatever rbp holds).
    pub rbp: u64,
}

/// Reads the unwound process's memory.
pub trait Memory {
    /// The 8 bytes at `addr`, or `None` when unreadable.
    fn read_u64(&mut self, addr: u64) -> Option<u64>;
    /// The 16 bytes at `addr` as two words; override when one read is cheaper than two
    /// (the BPF walker: one helper call).
    fn read_u64_pair(&mut self, addr: u64) -> Option<[u64; 2]> {
        Some([self.read_u64(addr)?, self.read_u64(addr.wrapping_add(8))?])
    }
}

/// What one step found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// The caller's registers. `rip` is a return address unless `exact` (after a signal frame
    /// the interrupted pc is exact, and the next lookup must not subtract 1).
    Caller {
        /// The caller's registers.
        regs: Registers,
        /// rip is the interrupted instruction rather than a return address.
        exact: bool,
    },
    /// The outermost frame: nothing to unwind to.
    End,
    /// The walk cannot continue.
    Failed(StepError),
}

/// Why a step failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StepError {
    /// No unwind information covers the pc.
    NoRule,
    /// The rule is unsupported.
    Unsupported,
    /// A read of the stack failed.
    Memory,
    /// The CFA did not move up the stack (a loop) or is not 8-aligned.
    BadCfa,
    /// The return address is 0 (the end of a frame-pointer-less stack by convention).
    ZeroReturn,
}

/// Offsets in the kernel's x86-64 signal frame (`ucontext` at rsp when the handler returns
/// into the sigreturn trampoline): `uc_mcontext` starts at 40; rbp, rsp, rip are gregs 10, 15, 16.
pub const SIGFRAME_RBP: u64 = 40 + 10 * 8;
/// See [`SIGFRAME_RBP`].
pub const SIGFRAME_RSP: u64 = 40 + 15 * 8;
/// See [`SIGFRAME_RBP`].
pub const SIGFRAME_RIP: u64 = 40 + 16 * 8;

/// Applies one rule to the registers of a frame: the shared step rule.
pub fn step(rule: &UnwindRule, regs: &Registers, mem: &mut impl Memory) -> Step {
    let Some(kind) = rule.cfa_kind() else { return Step::Failed(StepError::Unsupported) };
    let cfa = match kind {
        CfaKind::Gap => return Step::Failed(StepError::NoRule),
        CfaKind::Unsupported => return Step::Failed(StepError::Unsupported),
        CfaKind::EndOfStack => return Step::End,
        CfaKind::Signal => {
            // One read after another, each failure returning at once: read as a tuple, LLVM
            // carried a failed read's undefined value on through the next reads (harmless
            // to it, but the BPF verifier refuses to read an unset register).
            let read =
                |mem: &mut _, off| -> Option<u64> { Memory::read_u64(mem, regs.rsp.wrapping_add(off)) };
            let Some(rip) = read(mem, SIGFRAME_RIP) else { return Step::Failed(StepError::Memory) };
            let Some(rsp) = read(mem, SIGFRAME_RSP) else { return Step::Failed(StepError::Memory) };
            let Some(rbp) = read(mem, SIGFRAME_RBP) else { return Step::Failed(StepError::Memory) };
            return Step::Caller { regs: Registers { rip, rsp, rbp }, exact: true };
        }
        CfaKind::Rsp => regs.rsp.wrapping_add(rule.cfa_offset as i64 as u64),
        CfaKind::Rbp => regs.rbp.wrapping_add(rule.cfa_offset as i64 as u64),
        CfaKind::Plt => {
            let extra = if (regs.rip & 15) >= rule.cfa_offset as u64 { 8 } else { 0 };
            regs.rsp.wrapping_add(8 + extra)
        }
        CfaKind::DerefRsp | CfaKind::DerefRbp => {
            let reg = if kind == CfaKind::DerefRsp { regs.rsp } else { regs.rbp };
            let Some(v) = mem.read_u64(reg.wrapping_add(rule.cfa_offset as i64 as u64)) else {
                return Step::Failed(StepError::Memory);
            };
            v.wrapping_add(rule.aux as i64 as u64)
        }
    };
    if cfa & 7 != 0 || cfa <= regs.rsp {
        return Step::Failed(StepError::BadCfa);
    }
    // The common frame saves rbp right below the return address: one 16-byte read.
    if matches!(rule.rbp_kind(), Some(RbpKind::AtCfa)) && rule.rbp_slot == -2 {
        let Some([rbp, rip]) = mem.read_u64_pair(cfa - 16) else { return Step::Failed(StepError::Memory) };
        if rip == 0 {
            return Step::End;
        }
        return Step::Caller { regs: Registers { rip, rsp: cfa, rbp }, exact: false };
    }
    let Some(rip) = mem.read_u64(cfa - 8) else { return Step::Failed(StepError::Memory) };
    if rip == 0 {
        return Step::End;
    }
    let rbp = match rule.rbp_kind() {
        Some(RbpKind::AtCfa) => match mem.read_u64(cfa.wrapping_add(rule.rbp_offset() as u64)) {
            Some(v) => v,
            None => return Step::Failed(StepError::Memory),
        },
        Some(RbpKind::Unchanged) => regs.rbp,
        _ => 0,
    };
    Step::Caller { regs: Registers { rip, rsp: cfa, rbp }, exact: false }
}

/// Packed entries edited in place, without unpacking (table assembly renames records).
impl Entry {
    /// The record index of a packed entry.
    #[inline]
    pub const fn packed_rule(v: u32) -> u16 {
        ((v >> 12) & 0x3fff) as u16
    }
    /// A packed entry naming record `rule` instead.
    #[inline]
    pub const fn packed_with_rule(v: u32, rule: u16) -> u32 {
        (v & !(0x3fff << 12)) | ((rule as u32 & 0x3fff) << 12)
    }
}
