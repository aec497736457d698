//! Answering a batch of file addresses of one binary from its index blocks, the symbol
//! table where DWARF has no function.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::binary::Binary;
use super::Symbolizer;
use crate::index::Lookup;
use crate::name::Name;
use crate::{Frame, Miss, NameSource, Resolution, Symbolized};

impl Symbolizer {
    /// Looks up sorted, deduplicated addresses and hands the answers back in input order.
    pub(super) fn run(&self, bin: &Arc<Binary>, addrs: &[u64]) -> Vec<Resolution> {
        let mut order: Vec<(u64, u32)> = addrs.iter().enumerate().map(|(i, &a)| (a, i as u32)).collect();
        order.sort_unstable();
        let n = order.len();
        let mut out: Vec<Option<Resolution>> = vec![None; n];
        // A pipeline over the sorted batch: an address's block is loaded and its search keys
        // fetched `KEYS_AHEAD` places before its lookup, its region found and fetched
        // `REGION_AHEAD` places before, its chain of frames `CHAIN_AHEAD` places before; the
        // lookups then wait on memory side by side instead of in turn. `window` holds the
        // blocks of the addresses in flight (few: the batch is sorted).
        const KEYS_AHEAD: usize = 12;
        const REGION_AHEAD: usize = 6;
        const CHAIN_AHEAD: usize = 2;
        let mut block_at: Vec<Option<usize>> = vec![None; n];
        let mut region_at: Vec<Option<usize>> = vec![None; n];
        let mut window: Window = Default::default();
        for step in 0..n + KEYS_AHEAD {
            if let Some(&(a, _)) = order.get(step) {
                let bi = bin.block_of(a);
                block_at[step] = bi;
                if let Some(bi) = bi {
                    if window.back().is_none_or(|w| w.0 != bi) {
                        window.push_back((bi, self.block(bin, bi)));
                    }
                    if let Some(b) = &window.back().expect("pushed").1 {
                        b.prefetch_keys(a);
                    }
                }
            }
            if let Some(j) = (step + REGION_AHEAD).checked_sub(KEYS_AHEAD).filter(|&j| j < n) {
                if let Some(b) = find(&window, block_at[j]) {
                    region_at[j] = b.region_index(order[j].0);
                    if let Some(r) = region_at[j] {
                        b.prefetch_region(r);
                    }
                }
            }
            if let Some(j) = (step + CHAIN_AHEAD).checked_sub(KEYS_AHEAD).filter(|&j| j < n) {
                if let (Some(b), Some(r)) = (find(&window, block_at[j]), region_at[j]) {
                    b.prefetch_chain(r);
                }
            }
            let Some(k) = step.checked_sub(KEYS_AHEAD) else { continue };
            // Blocks of addresses already answered leave the window.
            if let Some(bi) = block_at[k] {
                while window.len() > 1 && window.front().is_some_and(|w| w.0 < bi) {
                    window.pop_front();
                }
            }
            let (a, i) = order[k];
            let i = i as usize;
            if k > 0 && order[k - 1].0 == a {
                // A repeat copies the answer.
                out[i] = out[order[k - 1].1 as usize].clone();
                continue;
            }
            out[i] = Some(self.lookup(bin, a, find(&window, block_at[k]), region_at[k]));
        }
        out.into_iter().map(|r| r.expect("every address answered")).collect()
    }

    /// The answer for `addr`, in `block` (loaded) and `region` when a batch found it ahead.
    fn lookup(
        &self,
        bin: &Arc<Binary>,
        addr: u64,
        block: Option<&Lookup>,
        region: Option<usize>,
    ) -> Resolution {
        let mut frames: Vec<Frame> = Vec::new();
        let mut found_fn = false;
        if let Some(b) = block {
            found_fn =
                region.or_else(|| b.region_index(addr)).is_some_and(|r| b.lookup_region(r, &mut frames));
        }
        if !found_fn {
            // Not in a DWARF function: the symbol table names it (assembly, stripped DWARF).
            // A symbol without a size reaches up to the next symbol, which in a stripped
            // binary may be far past static functions: the FDE of the function at `addr`
            // says whether it is the symbol's own.
            let mut fde = None;
            let sym = bin.symbols().and_then(|s| s.lookup_sized(addr)).filter(|(s, size, _)| {
                *size > 0 || {
                    fde = bin.function_bounds().containing(addr);
                    fde.is_none_or(|(start, _)| start <= s.address)
                }
            });
            let source = match &sym {
                Some((_, _, origin)) => Some(*origin),
                None => {
                    if fde.is_none() {
                        fde = bin.function_bounds().containing(addr);
                    }
                    fde.map(|(start, _)| NameSource::EhFrame { start })
                }
            };
            let name = sym.as_ref().map(|(s, _, _)| Name::from(s.name));
            let sym_file = sym.as_ref().and_then(|(s, _, _)| s.file).map(Name::from);
            match frames.first_mut() {
                Some(f) if source.is_some() || f.file.is_some() => {
                    f.function = name;
                    f.source = source;
                    if f.file.is_none() {
                        f.file = sym_file;
                    }
                }
                None if source.is_some() => {
                    frames.push(Frame { function: name, file: sym_file, line: 0, discriminator: 0, source })
                }
                _ => return Err(Miss::NoSymbol),
            }
        }
        Ok(Symbolized { frames })
    }

    fn block(&self, bin: &Arc<Binary>, i: usize) -> Option<Arc<Lookup>> {
        if bin.failed.load(Ordering::Relaxed) {
            return None;
        }
        let key = (bin.id, i as u32);
        if let Some(b) = self.lru.lock().expect("lru lock").blocks.get(&key) {
            return Some(b.clone());
        }
        let block = match bin.load(i) {
            Ok(b) => Arc::new(b),
            Err(_) => {
                // A cache file damaged after it was opened: forget it so the next open
                // rebuilds it; this lookup falls back to the symbol table.
                if bin.failed.swap(true, Ordering::Relaxed) {
                    return None;
                }
                if let Some(p) = &bin.cache_path {
                    let _ = std::fs::remove_file(p);
                }
                self.binaries.lock().expect("binaries lock").retain(|_, b| b.id != bin.id);
                self.stats.lock().expect("stats lock").cache_rebuilt += 1;
                return None;
            }
        };
        let size = block.heap_bytes();
        let mut evicted = 0;
        {
            let mut lru = self.lru.lock().expect("lru lock");
            if lru.blocks.put(key, block.clone()).is_none() {
                lru.bytes += size;
            }
            while lru.bytes > self.options.memory_budget && lru.blocks.len() > 1 {
                match lru.blocks.pop_lru() {
                    Some((_, b)) => {
                        lru.bytes = lru.bytes.saturating_sub(b.heap_bytes());
                        evicted += 1;
                    }
                    None => break,
                }
            }
        }
        let mut st = self.stats.lock().expect("stats lock");
        st.blocks_loaded += 1;
        st.blocks_evicted += evicted;
        Some(block)
    }
}

/// Blocks of the addresses a batch has in flight, by block number, in address order.
type Window = std::collections::VecDeque<(usize, Option<Arc<Lookup>>)>;

/// The loaded block `bi` of the window.
fn find(window: &Window, bi: Option<usize>) -> Option<&Lookup> {
    let bi = bi?;
    window.iter().find(|w| w.0 == bi).and_then(|w| w.1.as_deref())
}
