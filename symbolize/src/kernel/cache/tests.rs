use super::*;

const IMAGE: &str = "ffffffff81000000 T _stext\nffffffff81000100 t do_thing\nffffffff81000200 T other\n\
                     ffffffff81000300 T _etext\n";
const MODULE: &str = "ffffffffc0001000 t mod_a\t[m1]\nffffffffc0001100 t mod_b\t[m1]\n";
const BPF: &str = "ffffffffc0005000 t bpf_prog_0123456789abcdef_walk\t[bpf]\n";

struct Sources {
    dir: tempfile::TempDir,
}

impl Sources {
    fn new(kallsyms: &str, modules: &str) -> Self {
        let s = Sources { dir: tempfile::tempdir().unwrap() };
        s.set("kallsyms", kallsyms);
        s.set("modules", modules);
        s.set("boot_id", "4b5c6d7e-0000-4000-8000-000000000001\n");
        s
    }
    fn set(&self, name: &str, text: &str) {
        std::fs::write(self.dir.path().join(name), text).unwrap();
    }
    fn load(&self, addresses: &[u64]) -> KernelSymbols {
        let p = |n: &str| self.dir.path().join(n);
        KernelSymbols::load_cached_from(
            &p("kallsyms"),
            &p("modules"),
            &p("boot_id"),
            &p("sys-module"),
            &p("cache"),
            addresses,
        )
        .unwrap()
    }
    fn cache_files(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(self.dir.path().join("cache"))
            .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
            .unwrap_or_default();
        v.sort();
        v
    }
}

const M1: &str = "m1 16384 0 - Live 0xffffffffc0001000\n";

#[test]
fn a_module_rebuilt_at_the_same_size_and_address_misses_the_cache() {
    let s = Sources::new(&format!("{IMAGE}{MODULE}"), M1);
    let notes = s.dir.path().join("sys-module/m1/notes");
    std::fs::create_dir_all(&notes).unwrap();
    std::fs::write(notes.join(".note.gnu.build-id"), b"build one").unwrap();
    assert_eq!(s.load(&[0xffffffffc0001050]).lookup(0xffffffffc0001050).unwrap().name, "mod_a");
    let first = s.cache_files();
    assert_eq!(first.len(), 1);
    // rmmod m1; insmod m1.ko of another build: the same /proc/modules line.
    std::fs::write(notes.join(".note.gnu.build-id"), b"build two").unwrap();
    s.set("kallsyms", &format!("{IMAGE}{}", MODULE.replace("mod_a", "mod_renamed")));
    let after = s.load(&[0xffffffffc0001050]);
    assert_eq!(after.lookup(0xffffffffc0001050).unwrap().name, "mod_renamed");
    let second = s.cache_files();
    assert_eq!(second.len(), 1, "the old key's file is replaced: {second:?}");
    assert_ne!(first, second, "a second key");
}

#[test]
fn a_second_load_reads_the_cache_when_it_covers_every_address() {
    let s = Sources::new(&format!("{IMAGE}{MODULE}{BPF}"), M1);
    let first = s.load(&[0xffffffff81000105]);
    assert_eq!(first.lookup(0xffffffff81000105).unwrap().name, "do_thing");
    assert_eq!(s.cache_files().len(), 1);
    // The source changes behind the cache's back: a covered address still gets the
    // cached name, proof that the cache was read.
    s.set("kallsyms", &format!("{}{MODULE}{BPF}", IMAGE.replace("do_thing", "renamed")));
    let second = s.load(&[0xffffffff81000105, 0xffffffffc0001050]);
    assert_eq!(second.lookup(0xffffffff81000105).unwrap().name, "do_thing");
    assert_eq!(second.lookup(0xffffffffc0001050).unwrap().module, Some("m1"));
    // BPF programs are never cached.
    assert!(second.lookup(0xffffffffc0005010).unwrap().name != "bpf_prog_0123456789abcdef_walk");
}

#[test]
fn an_address_the_cache_does_not_cover_is_read_from_the_source() {
    let s = Sources::new(&format!("{IMAGE}{MODULE}{BPF}"), M1);
    s.load(&[]);
    s.set("kallsyms", &format!("{}{MODULE}{BPF}", IMAGE.replace("do_thing", "renamed")));
    // In the BPF program: past the module's last symbol, so not covered.
    let k = s.load(&[0xffffffffc0005010]);
    assert_eq!(k.lookup(0xffffffffc0005010).unwrap().name, "bpf_prog_0123456789abcdef_walk");
    assert_eq!(k.lookup(0xffffffff81000105).unwrap().name, "renamed");
    // Past the image's last symbol is not covered either.
    s.set("kallsyms", &format!("{}{MODULE}{BPF}", IMAGE.replace("do_thing", "again")));
    assert_eq!(s.load(&[0xffffffff81000400]).lookup(0xffffffff81000105).unwrap().name, "again");
}

#[test]
fn new_modules_or_a_new_boot_start_a_new_cache() {
    let s = Sources::new(&format!("{IMAGE}{MODULE}"), M1);
    s.load(&[]);
    let before = s.cache_files();
    s.set("kallsyms", &format!("{}{MODULE}", IMAGE.replace("do_thing", "renamed")));
    s.set("modules", &format!("{M1}m2 4096 0 - Live 0xffffffffc0009000\n"));
    assert_eq!(s.load(&[0xffffffff81000105]).lookup(0xffffffff81000105).unwrap().name, "renamed");
    let after = s.cache_files();
    assert_eq!(after.len(), 1, "the old key's file is removed: {after:?}");
    assert_ne!(before, after);
    s.set("kallsyms", &format!("{}{MODULE}", IMAGE.replace("do_thing", "rebooted")));
    s.set("boot_id", "4b5c6d7e-0000-4000-8000-000000000002\n");
    assert_eq!(s.load(&[0xffffffff81000105]).lookup(0xffffffff81000105).unwrap().name, "rebooted");
}

#[test]
fn a_modules_use_count_does_not_change_the_key_but_a_loading_module_stops_caching() {
    let s = Sources::new(&format!("{IMAGE}{MODULE}"), M1);
    s.load(&[]);
    let before = s.cache_files();
    s.set("kallsyms", &format!("{}{MODULE}", IMAGE.replace("do_thing", "renamed")));
    s.set("modules", "m1 16384 3 kvm_amd, Live 0xffffffffc0001000\n");
    assert_eq!(s.load(&[0xffffffff81000105]).lookup(0xffffffff81000105).unwrap().name, "do_thing");
    assert_eq!(s.cache_files(), before);
    // A module in the middle of loading: read live, nothing written.
    std::fs::remove_dir_all(s.dir.path().join("cache")).unwrap();
    s.set("modules", &format!("{M1}m3 4096 0 - Loading 0xffffffffc0020000\n"));
    assert_eq!(s.load(&[0xffffffff81000105]).lookup(0xffffffff81000105).unwrap().name, "renamed");
    assert!(s.cache_files().is_empty(), "{:?}", s.cache_files());
}

#[test]
fn a_damaged_cache_is_rebuilt_not_trusted() {
    let s = Sources::new(&format!("{IMAGE}{MODULE}"), M1);
    s.load(&[]);
    let file = s.dir.path().join("cache").join(&s.cache_files()[0]);
    let good = std::fs::read(&file).unwrap();
    s.set("kallsyms", &format!("{}{MODULE}", IMAGE.replace("do_thing", "renamed")));
    for damaged in [good[..good.len() / 2].to_vec(), b"junk".to_vec(), Vec::new()] {
        std::fs::write(&file, &damaged).unwrap();
        assert_eq!(s.load(&[0xffffffff81000105]).lookup(0xffffffff81000105).unwrap().name, "renamed");
        assert!(std::fs::read(&file).unwrap().starts_with(CACHE_MAGIC), "rewritten");
    }
}

#[test]
fn the_cache_format_round_trips_and_rejects_damage() {
    let k = KernelSymbols::parse(&format!("{IMAGE}{MODULE}{BPF}"));
    let b = k.to_bytes();
    let back = KernelSymbols::from_bytes(&b).unwrap();
    for a in [0xffffffff81000000, 0xffffffff81000105, 0xffffffffc0001050, 0xffffffffc0005010, 1] {
        assert_eq!(back.lookup(a), k.lookup(a), "at {a:#x}");
    }
    for len in 0..b.len() {
        assert!(KernelSymbols::from_bytes(&b[..len]).is_none(), "truncated to {len}");
    }
    for i in 0..b.len() {
        let mut d = b.clone();
        d[i] ^= 0x80;
        let _ = KernelSymbols::from_bytes(&d); // any answer but a panic
    }
}

/// A kernel image of `n` symbols 0x100 apart, `f{i}` at 0xffffffff81000000 + 0x100 i.
fn many(n: usize, prefix: &str) -> String {
    (0..n).map(|i| format!("{:x} t {prefix}{i}\n", 0xffffffff81000000u64 + 0x100 * i as u64)).collect()
}

#[test]
fn a_cached_list_is_read_by_block_and_answers_only_where_it_was_read() {
    let n = 5 * CACHE_BLOCK + 17;
    let s = Sources::new(&many(n, "f"), "");
    let at = |i: usize| 0xffffffff81000000u64 + 0x100 * i as u64;
    s.load(&[]);
    // Renamed behind the cache: names from the cache prove it was read.
    s.set("kallsyms", &many(n, "g"));
    // One address in block 1, one on block 2's last symbol (block 3 is then read for
    // what follows it), one in block 5 (the last, short one; its last symbol has no
    // successor, so that one address is read from the source).
    let wanted = [at(CACHE_BLOCK + 5) + 3, at(3 * CACHE_BLOCK - 1) + 9, at(5 * CACHE_BLOCK + 2)];
    let k = s.load(&wanted);
    assert_eq!(k.lookup(wanted[0]).unwrap().name, format!("f{}", CACHE_BLOCK + 5));
    assert_eq!(k.lookup(wanted[0]).unwrap().offset, 3);
    assert_eq!(k.lookup(wanted[1]).unwrap().name, format!("f{}", 3 * CACHE_BLOCK - 1));
    assert_eq!(k.lookup(wanted[2]).unwrap().name, format!("f{}", 5 * CACHE_BLOCK + 2));
    assert!(k.covers(wanted[1]), "the next block was read");
    // Blocks 0 and 4 were not read: no answer rather than a neighbour's.
    assert_eq!(k.lookup(at(10)), None);
    assert_eq!(k.lookup(at(4 * CACHE_BLOCK + 10)), None);
    assert_eq!(k.len(), 4 * CACHE_BLOCK - CACHE_BLOCK + 17, "blocks 1, 2, 3 and 5");
    // The last symbol of all is not covered (nothing follows it): the source answers.
    let last = s.load(&[at(n - 1) + 1]);
    assert_eq!(last.lookup(at(n - 1) + 1).unwrap().name, format!("g{}", n - 1));
}

#[test]
fn a_damaged_block_is_not_trusted() {
    let n = 3 * CACHE_BLOCK;
    let s = Sources::new(&many(n, "f"), "");
    s.load(&[]);
    let file = s.dir.path().join("cache").join(&s.cache_files()[0]);
    let good = std::fs::read(&file).unwrap();
    s.set("kallsyms", &many(n, "g"));
    let a = 0xffffffff81000000u64 + 0x100 * (CACHE_BLOCK as u64 + 7);
    // Bytes all over the file (magic, directory, blocks) flipped in turn: each answer
    // is the cached name or the source's, never a damaged one.
    // Every symbol of block 1 is looked up each time.
    let block1: Vec<u64> =
        (CACHE_BLOCK..2 * CACHE_BLOCK).map(|i| 0xffffffff81000000 + 0x100 * i as u64 + 1).collect();
    for flip in (0..good.len()).step_by(5) {
        let mut d = good.clone();
        d[flip] ^= 0x41;
        std::fs::write(&file, &d).unwrap();
        let k = s.load(&block1);
        for (j, &b) in block1.iter().enumerate() {
            let name = k.lookup(b).unwrap().name;
            let i = CACHE_BLOCK + j;
            assert!(name == format!("f{i}") || name == format!("g{i}"), "byte {flip} flipped: {name}");
        }
    }
    // Cut short: the directory no longer matches, the source answers, the file is rewritten.
    std::fs::write(&file, &good[..good.len() - 1]).unwrap();
    assert_eq!(s.load(&[a]).lookup(a).unwrap().name, format!("g{}", CACHE_BLOCK + 7));
    assert!(std::fs::read(&file).unwrap().len() >= good.len() - 1);
}

#[test]
fn hidden_addresses_are_an_error() {
    let s = Sources::new("0000000000000000 T _stext\n0000000000000000 t do_thing\n", M1);
    let p = |n: &str| s.dir.path().join(n);
    let r = KernelSymbols::load_cached_from(
        &p("kallsyms"),
        &p("modules"),
        &p("boot_id"),
        &p("sys-module"),
        &p("cache"),
        &[1],
    );
    assert!(matches!(r, Err(Error::KernelAddressesHidden)), "{r:?}");
}

/// On the running kernel (root only): wherever the cacheable part of /proc/kallsyms
/// (image and live modules, no BPF programs) says it covers an address, it gives the
/// answer a full read gives - over the image, the modules, and the BPF programs'
/// neighbourhood. And a second load_cached agrees with the first.
#[test]
fn the_running_kernels_cached_symbols_agree_with_proc_kallsyms() {
    let Ok(live) = KernelSymbols::load() else {
        eprintln!("skipped: /proc/kallsyms hides addresses here (not root)");
        return;
    };
    let modules = std::fs::read_to_string("/proc/modules").unwrap_or_default();
    let names = modules.lines().filter_map(|l| l.split(' ').next()).collect();
    let cacheable = live.cacheable(&names);
    let step = live.entries.len() / 3000 + 1;
    let mut covered = 0;
    for (i, e) in
        live.entries.iter().enumerate().filter(|(i, _)| i % step == 0 || live.entries[*i].module != 0)
    {
        // Inside the symbol, and just before it (the previous symbol's tail).
        for a in [e.addr + 1, e.addr.wrapping_sub(1)] {
            if cacheable.covers(a) {
                covered += 1;
                assert_eq!(cacheable.lookup(a), live.lookup(a), "at {a:#x} (entry {i})");
            }
        }
    }
    assert!(covered > 1000, "only {covered} addresses covered");
    let dir = tempfile::tempdir().unwrap();
    let sample: Vec<u64> = live.entries.iter().step_by(step).map(|e| e.addr + 1).collect();
    let first = KernelSymbols::load_cached(dir.path(), &sample).unwrap();
    let second = KernelSymbols::load_cached(dir.path(), &sample).unwrap();
    for &a in &sample {
        assert_eq!(first.lookup(a), second.lookup(a), "at {a:#x}");
    }
}
