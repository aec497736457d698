//! The on-disk cache: keyed by build-id (or content), versioned, and never trusted when
//! its bytes are not what was written.

use std::path::Path;

use unwound_unwind_tables::cache::{CacheOutcome, TableCache};

const LIBC: &str = "/usr/lib/x86_64-linux-gnu/libc.so.6";

#[test]
fn cache_hits_and_rebuilds_what_it_cannot_trust() {
    let dir = tempfile::tempdir().unwrap();
    let cache = TableCache::new(dir.path());
    let (first, o1) = cache.get_or_compile(Path::new(LIBC)).unwrap();
    assert_eq!(o1, CacheOutcome::Compiled);
    let (second, o2) = cache.get_or_compile(Path::new(LIBC)).unwrap();
    assert_eq!(o2, CacheOutcome::Hit);
    assert_eq!(first.entries(), second.entries());
    assert_eq!(first.pages(), second.pages());
    assert_eq!(first.rules(), second.rules());

    let files: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(files.len(), 1);
    let name = files[0].file_name().unwrap().to_string_lossy().into_owned();
    assert!(
        name.contains(&format!(".v{}.", unwound_unwind_tables::layout::FORMAT_VERSION)),
        "versioned name: {name}"
    );
    let key = TableCache::key(&std::fs::read(LIBC).unwrap());
    assert!(name.starts_with(&key) && key.len() == 40, "keyed by build-id: {name}");
    let good = std::fs::read(&files[0]).unwrap();

    // A file of another format version is never read, and goes when the entry is rewritten.
    let other =
        dir.path().join(format!("{key}.v{}.uwt.zst", unwound_unwind_tables::layout::FORMAT_VERSION - 1));
    std::fs::write(&other, b"an older format").unwrap();
    std::fs::remove_file(&files[0]).unwrap();
    assert_eq!(cache.get_or_compile(Path::new(LIBC)).unwrap().1, CacheOutcome::Compiled);
    assert!(!other.exists(), "the old-version file is still there");
    assert_eq!(std::fs::read(&files[0]).unwrap(), good, "the rewritten entry differs");

    // Truncated, bit-flipped, or garbage: never trusted, rebuilt.
    for bad in [good[..good.len() / 2].to_vec(), flip(&good, good.len() / 2), b"garbage".to_vec()] {
        std::fs::write(&files[0], &bad).unwrap();
        let (t, o) = cache.get_or_compile(Path::new(LIBC)).unwrap();
        assert_eq!(o, CacheOutcome::Rebuilt);
        assert_eq!(t.entries(), first.entries());
        assert_eq!(cache.get_or_compile(Path::new(LIBC)).unwrap().1, CacheOutcome::Hit, "rewritten");
    }
}

fn flip(b: &[u8], at: usize) -> Vec<u8> {
    let mut v = b.to_vec();
    v[at] ^= 0x40;
    v
}

/// A file without a build-id is keyed by its content: every byte counts, wherever it is
/// (lanes, tail), and so does the length; equal content gives the same key.
#[test]
fn a_file_without_build_id_is_keyed_by_every_byte() {
    // Not ELF, so no build-id: 1000 bytes (31 full 32-byte blocks and an 8-byte tail).
    let data: Vec<u8> = (0..1000u32).map(|i| (i * 7 % 251) as u8).collect();
    let key = TableCache::key(&data);
    assert!(key.starts_with("c64-") && key.ends_with("-1000"), "{key}");
    assert_eq!(TableCache::key(&data.clone()), key);
    let mut seen = std::collections::HashSet::new();
    for at in [0, 7, 8, 31, 32, 500, 991, 992, 999] {
        let k = TableCache::key(&flip(&data, at));
        assert_ne!(k, key, "byte {at} changed nothing");
        assert!(seen.insert(k), "two different one-byte changes share a key");
    }
    let mut longer = data.clone();
    longer.push(0);
    assert_ne!(TableCache::key(&longer), key);
    assert_ne!(TableCache::key(&data[..999]), key);
}

/// An entry a file without a build-id had under the old FNV-1a key is deleted when the
/// file's table is stored under its new key; other entries stay.
#[test]
fn old_content_keys_are_removed_when_the_new_one_is_stored() {
    let dir = tempfile::tempdir().unwrap();
    let cache = TableCache::new(dir.path());
    let elf = std::fs::read(LIBC).unwrap();
    // libc without its build-id: the note's type (3, NT_GNU_BUILD_ID, after name and
    // descriptor sizes 4 and 20) changed, so that no build-id is found.
    let mut data = elf.clone();
    let note = [4u8, 0, 0, 0, 20, 0, 0, 0, 3, 0, 0, 0, b'G', b'N', b'U', 0];
    let pos = data.windows(note.len()).position(|w| w == note).expect("libc has a build-id note");
    data[pos + 8] = 0x7f;
    let key = TableCache::key(&data);
    assert!(key.starts_with("c64-"), "{key}");
    let len = data.len();
    let v = unwound_unwind_tables::layout::FORMAT_VERSION;
    let old_same = dir.path().join(format!("fnv-0123456789abcdef-{len}.v{v}.uwt.zst"));
    let old_other = dir.path().join(format!("fnv-0123456789abcdef-{}.v{v}.uwt.zst", len + 1));
    let unrelated = dir.path().join(format!("{}.v{v}.uwt.zst", "ab".repeat(20)));
    for f in [&old_same, &old_other, &unrelated] {
        std::fs::write(f, b"x").unwrap();
    }
    let (_, outcome) = cache.get_or_compile_elf(&data).unwrap();
    assert_eq!(outcome, CacheOutcome::Compiled);
    assert!(!old_same.exists(), "the old key of a file this long is still there");
    assert!(old_other.exists() && unrelated.exists(), "other entries were removed");
}
