//! Compiles DWARF `.eh_frame` / `.debug_frame` into compact, sorted unwind entries that an
//! in-kernel walker can binary-search within BPF map limits.
//!
//! Not written yet: this crate is reserved in the workspace for the unwind-tables issue.
//! Today the walker uses frame pointers only.
#![no_std]
