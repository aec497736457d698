//! End to end, real BPF: profile every fixture with the real walker and check the stacks
//! against the manifest written from the fixtures' sources.

mod common;

use std::collections::BTreeMap;

use common::*;

#[test]
fn matcher_follows_the_manifest_rules() {
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    let pat = expand(&s(&["main", "f*2", "...", "leaf"]));
    assert!(matches_leaf(&s(&["_start", "main", "f", "f", "libc", "x", "leaf"]), &pat));
    assert!(!matches_leaf(&s(&["main", "f", "f", "leaf"]), &pat), "... needs one frame");
    assert!(!matches_leaf(&s(&["main", "f", "libc", "leaf"]), &pat));
    assert!(!matches_leaf(&s(&["main", "f", "f", "libc", "leaf", "extra"]), &pat));
}

#[test]
fn manifest_names_exist_in_the_fixture_binaries() {
    // The manifest is hand-written; binutils' nm (with its own demangler) confirms that
    // every expected function name is a real symbol of the fixture it names.
    let dir = build_fixtures();
    for f in manifest().fixture {
        for v in &f.variants {
            let mut out = String::new();
            for file in [dir.join(f.binary(v)), dir.join(format!("libunwound_plt_{v}.so"))] {
                if file.exists() {
                    let o = std::process::Command::new("nm").arg("-C").arg(&file).output().unwrap();
                    out.push_str(&String::from_utf8_lossy(&o.stdout));
                }
            }
            for name in expand(&f.stack).iter().filter(|n| *n != "...") {
                assert!(
                    out.lines().any(|l| l.splitn(3, ' ').nth(2) == Some(name.as_str())),
                    "{}: nm -C has no symbol {name}",
                    f.binary(v)
                );
            }
        }
    }
}

#[test]
fn frame_pointer_fixtures_have_their_full_chain() {
    if !bpf_available("frame_pointer_fixtures_have_their_full_chain") {
        return;
    }
    let dir = build_fixtures();
    let manifest = manifest();
    let mut running = Vec::new();
    let mut patterns = BTreeMap::new();
    let mut settle_ms = 0;
    for f in &manifest.fixture {
        for v in &f.variants {
            running.push(start(&dir, &f.binary(v), &f.args));
            patterns.insert(f.binary(v), expand(&f.stack));
            settle_ms = settle_ms.max(f.settle_ms);
        }
    }
    settle(settle_ms.max(100));
    let pids: Vec<u32> = running.iter().map(|r| r.pid()).collect();
    let tmp = tempfile::tempdir().unwrap();
    let (stacks, run) = record_folded(&pids, 5.0, 499, tmp.path());
    eprintln!("{}", run.stderr);
    let shares = shares(&stacks, &patterns);

    eprintln!("{:<16} {:>8} {:>8} {:>8}  walker", "fixture", "samples", "complete", "share");
    let mut failures = Vec::new();
    for f in &manifest.fixture {
        for v in &f.variants {
            let name = f.binary(v);
            let (total, matched) = shares[&name];
            let share = if total == 0 { 0.0 } else { matched as f64 / total as f64 };
            eprintln!("{name:<16} {total:>8} {matched:>8} {:>7.1}%  fp", share * 100.0);
            let must_be_complete = f.fp_complete && v != "nofp";
            if total < 100 {
                failures.push(format!("{name}: only {total} samples"));
            } else if must_be_complete && share < 0.90 {
                failures.push(format!("{name}: full chain on {:.1}% of samples, want ≥ 90%", share * 100.0));
            }
        }
    }
    // Kernel stacks: the syscall fixture spends most of its time in read(2).
    for f in manifest.fixture.iter().filter(|f| f.kernel_frame.is_some()) {
        let want = f.kernel_frame.as_deref().unwrap();
        for v in &f.variants {
            let name = f.binary(v);
            let (total, with_kernel) =
                stacks.iter().filter(|s| s.process == name).fold((0, 0), |(t, k), s| {
                    (t + s.count, k + if s.kernel.iter().any(|k| k.contains(want)) { s.count } else { 0 })
                });
            eprintln!("{name}: {with_kernel}/{total} samples with a kernel frame *{want}*");
            if with_kernel * 2 < total {
                failures.push(format!(
                    "{name}: kernel frame *{want}* on {with_kernel}/{total} samples, want ≥ 50%"
                ));
            }
            // Samples taken in the kernel still carry the user chain (user registers come
            // from the task's saved frame).
            let user_ok: u64 = stacks
                .iter()
                .filter(|s| {
                    s.process == name && !s.kernel.is_empty() && matches_leaf(&s.user, &patterns[&name])
                })
                .map(|s| s.count)
                .sum();
            if f.fp_complete && v != "nofp" && user_ok * 10 < with_kernel * 9 {
                failures.push(format!(
                    "{name}: in-kernel samples with the full user chain {user_ok}/{with_kernel}"
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
