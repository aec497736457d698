//! Answering a batch of file addresses of one binary from its index blocks, the symbol
//! table where DWARF has no function.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::binary::Binary;
use super::Symbolizer;
use crate::index::{self, Lookup};
use crate::name::Name;
use crate::{Error, Frame, Miss, NameSource, Resolution, Symbolized};

/// Most distinct addresses of a batch answered from their compilation units while the
/// binary's index is being built; a larger batch waits for the index.
const EARLY_MAX_ADDRS: usize = 64;

impl Symbolizer {
    /// The answers for `addrs`, in input order. Before the binary's index is built, a small
    /// batch is answered from the compilation units holding its addresses and the index is
    /// built in the background; a larger one waits for the index. An error only when the
    /// index cannot be built.
    pub(super) fn run(&self, bin: &Arc<Binary>, addrs: &[u64]) -> Result<Vec<Resolution>, Error> {
        if !bin.has_index() {
            if let Some(answers) = self.run_early(bin, addrs) {
                bin.start_build();
                return Ok(answers);
            }
            if let Err(e) = bin.wait_for_index() {
                // As when a file cannot be opened: the next batch tries again.
                self.binaries.lock().expect("binaries lock").retain(|_, b| b.id != bin.id);
                return Err(e);
            }
        }
        Ok(self.run_indexed(bin, addrs))
    }

    /// The answers from the units holding `addrs`, when they are few enough.
    fn run_early(&self, bin: &Arc<Binary>, addrs: &[u64]) -> Option<Vec<Resolution>> {
        let pending = bin.pending()?;
        let mut sorted = addrs.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        if sorted.len() > EARLY_MAX_ADDRS {
            return None;
        }
        let mut raw = pending.read_for(&sorted)?;
        let blocks = index::build_blocks(&mut raw);
        let block_of = |a: u64| {
            Some(blocks.partition_point(|b| b.end <= a)).filter(|&i| i < blocks.len() && blocks[i].start <= a)
        };
        // Only the blocks holding an address are turned into lookups.
        let mut lookups: std::collections::BTreeMap<usize, Lookup> = Default::default();
        for &a in &sorted {
            if let Some(i) = block_of(a) {
                lookups.entry(i).or_insert_with(|| Lookup::new(&blocks[i]));
            }
        }
        Some(
            addrs
                .iter()
                .map(|&a| self.lookup(bin, a, block_of(a).and_then(|i| lookups.get(&i)), None))
                .collect(),
        )
    }

    /// Looks up sorted, deduplicated addresses in the index and hands the answers back in
    /// input order.
    fn run_indexed(&self, bin: &Arc<Binary>, addrs: &[u64]) -> Vec<Resolution> {
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

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use crate::{Options, Symbolizer};
    use object::{Object, ObjectSection};

    fn symbolizer(lazy_dwarf: usize) -> Symbolizer {
        let mut s = Symbolizer::new(Options { cache_dir: None, debuginfod: None, ..Options::default() });
        s.lazy_dwarf = lazy_dwarf;
        s
    }

    /// Every `step`-th byte of the executable sections of `path`.
    fn text_addresses(path: &Path, step: u64) -> Vec<u64> {
        let data = std::fs::read(path).unwrap();
        let obj = object::File::parse(&*data).unwrap();
        let mut out = Vec::new();
        for (lo, hi) in crate::dwarf::text_ranges(&obj) {
            out.extend((lo..hi).step_by(step as usize));
        }
        if out.is_empty() {
            // A separate debug file: its `.text` has addresses but no bytes.
            for s in obj.sections().filter(|s| s.name() == Ok(".text")) {
                out.extend((s.address()..s.address() + s.size()).step_by(step as usize));
            }
        }
        out
    }

    /// The answers given from the units alone, before the index is built, are the index's.
    fn early_answers_are_the_index_answers(path: &Path, addrs: &[u64], batch: usize) {
        let want = symbolizer(usize::MAX).symbolize_elf(path, addrs).unwrap();
        let early = symbolizer(0);
        let bin = early.binary(path).unwrap();
        assert!(!bin.has_index(), "{}: indexed when opened", path.display());
        let mut differ = Vec::new();
        let mut waited = 0;
        for (chunk, want) in addrs.chunks(batch).zip(want.chunks(batch)) {
            // Addresses spread over too many units wait for the index.
            let Some(got) = early.run_early(&bin, chunk) else {
                waited += 1;
                continue;
            };
            for ((a, g), w) in chunk.iter().zip(&got).zip(want) {
                if g != w {
                    differ.push(format!("{a:#x}: early {g:?}\n  index {w:?}"));
                }
            }
        }
        assert!(
            differ.is_empty(),
            "{}: {} of {} differ, e.g. {}",
            path.display(),
            differ.len(),
            addrs.len(),
            differ[0]
        );
        let batches = addrs.len().div_ceil(batch);
        assert!(
            waited * 10 <= batches,
            "{}: {waited} of {batches} batches not answered early",
            path.display()
        );
        // And from the index, built in the background meanwhile.
        bin.wait_for_index().unwrap();
        assert_eq!(early.run_indexed(&bin, addrs), want);
    }

    fn fixture(name: &str) -> PathBuf {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/fixtures").join(name);
        assert!(p.exists(), "fixtures missing: run `make -C fixtures` (scripts/test.sh does)");
        p
    }

    #[test]
    fn early_answers_of_fixtures() {
        for name in ["cpp_chain_nofp", "cpp_clones", "rs_chain_nofp", "chain_O0"] {
            let path = fixture(name);
            let addrs = text_addresses(&path, 11);
            early_answers_are_the_index_answers(&path, &addrs, 5);
        }
    }

    #[test]
    fn early_answers_of_libc() {
        let libc = Path::new("/lib/x86_64-linux-gnu/libc.so.6");
        let debug = symbolizer(usize::MAX).debug_source(libc).unwrap();
        let debug = debug.path().expect("libc6-dbg installed").to_path_buf();
        let addrs = text_addresses(&debug, 1009);
        early_answers_are_the_index_answers(&debug, &addrs, 2);
    }

    /// The benchmark's input (`scripts/bench-input.sh`), or `UNWOUND_SYMBOLIZE_BENCH_BINARY`.
    #[test]
    #[ignore]
    fn early_answers_at_scale() {
        let path =
            std::env::var_os("UNWOUND_SYMBOLIZE_BENCH_BINARY").map(PathBuf::from).unwrap_or_else(|| {
                let target = std::env::var_os("CARGO_TARGET_DIR")
                    .map_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"), PathBuf::from);
                target.join("bench-inputs/ceph-mon.debug")
            });
        let addrs = text_addresses(&path, 21_011);
        early_answers_are_the_index_answers(&path, &addrs, 1);
    }
}
