//! On-disk cache (hit, corrupt, truncated), memory budget, process addresses, and
//! debuginfo from a real debuginfod server.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;
#[cfg(feature = "debuginfod")]
use std::time::Instant;

use unwound_symbolize::{DebugSource, Debuginfod, Options, Symbolizer};

fn fixture(name: &str) -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/fixtures").join(name);
    assert!(p.exists(), "fixtures missing: run `make -C fixtures` (scripts/test.sh does)");
    p
}

/// Start addresses of the defined functions, by `nm`.
fn functions(path: &Path) -> Vec<(u64, String)> {
    let out = Command::new("nm").arg("--defined-only").arg(path).output().expect("nm");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let a = u64::from_str_radix(f.next()?, 16).ok()?;
            let k = f.next()?;
            let n = f.next()?;
            matches!(k, "T" | "t").then(|| (a, n.to_string()))
        })
        .collect()
}

/// `objcopy FLAGS FROM TO`, which must succeed.
fn objcopy(flags: &[&str], from: &Path, to: &Path) {
    let status = Command::new("objcopy").args(flags).arg(from).arg(to).status().expect("objcopy (binutils)");
    assert!(status.success(), "objcopy {flags:?} {} {}", from.display(), to.display());
}

/// The GNU build-id of an ELF file.
fn build_id(path: &Path) -> Vec<u8> {
    unwound_symbolize::ElfSymbols::open(path).unwrap().build_id().expect("fixtures have a build-id").to_vec()
}

fn opts(cache: Option<&Path>) -> Options {
    Options { cache_dir: cache.map(Path::to_path_buf), debuginfod: None, ..Options::default() }
}

fn addrs_of(path: &Path) -> Vec<u64> {
    functions(path).iter().flat_map(|(a, _)| [*a, a + 3]).collect()
}

#[test]
fn cache_is_used_and_damage_is_rebuilt() {
    let bin = fixture("cpp_chain_nofp");
    let addrs = addrs_of(&bin);
    let dir = tempfile::tempdir().unwrap();
    let reference = Symbolizer::new(opts(None)).symbolize_elf(&bin, &addrs).unwrap();
    assert!(reference.iter().filter(|r| r.is_ok()).count() > addrs.len() / 2);

    let first = Symbolizer::new(opts(Some(dir.path())));
    assert_eq!(first.symbolize_elf(&bin, &addrs).unwrap(), reference);
    assert_eq!(first.stats().indexes_built, 1);
    let files: Vec<PathBuf> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(files.len(), 1, "one cache file: {files:?}");
    let cache_file = &files[0];

    let second = Symbolizer::new(opts(Some(dir.path())));
    assert_eq!(second.symbolize_elf(&bin, &addrs).unwrap(), reference);
    assert_eq!((second.stats().cache_hits, second.stats().indexes_built), (1, 0));

    // Flip bytes in the blocks, then truncate, then write garbage: each time the answers
    // stay the same and the damage is counted.
    let good = std::fs::read(cache_file).unwrap();
    let mut flipped = good.clone();
    let n = flipped.len();
    for b in &mut flipped[n - 64..] {
        *b ^= 0x5a;
    }
    for damaged in [flipped, good[..good.len() / 2].to_vec(), b"garbage".to_vec()] {
        std::fs::write(cache_file, &damaged).unwrap();
        let s = Symbolizer::new(opts(Some(dir.path())));
        let mut got = s.symbolize_elf(&bin, &addrs).unwrap();
        if s.stats().cache_hits == 1 {
            // The directory was intact, a block was not: the next open rebuilds.
            got = Symbolizer::new(opts(Some(dir.path()))).symbolize_elf(&bin, &addrs).unwrap();
        }
        assert_eq!(got, reference);
        assert!(s.stats().cache_rebuilt >= 1, "damage detected: {:?}", s.stats());
    }
}

#[test]
fn tiny_memory_budget_evicts_and_stays_correct() {
    let libc = Path::new("/lib/x86_64-linux-gnu/libc.so.6");
    let dbg = Symbolizer::new(opts(None)).debug_source(libc).unwrap();
    let addrs: Vec<u64> = addrs_of(dbg.path().expect("libc6-dbg installed"));
    let big = Symbolizer::new(opts(None)).symbolize_elf(libc, &addrs).unwrap();
    let small = Symbolizer::new(Options { memory_budget: 1, ..opts(None) });
    // Interleave far-apart addresses so blocks are loaded, dropped and loaded again.
    let mut shuffled = addrs.clone();
    shuffled.reverse();
    for chunk in shuffled.chunks(7) {
        let got = small.symbolize_elf(libc, chunk).unwrap();
        let want: Vec<_> =
            chunk.iter().map(|a| big[addrs.iter().position(|x| x == a).unwrap()].clone()).collect();
        assert_eq!(got, want);
    }
    let st = small.stats();
    assert!(st.blocks_evicted > 0 && st.blocks_loaded > st.blocks_evicted / 2, "{st:?}");
}

#[test]
fn process_addresses_through_maps() {
    let bin = fixture("chain_nofp");
    let child = Kill(Command::new(&bin).stdout(Stdio::null()).spawn().unwrap());
    std::thread::sleep(Duration::from_millis(200));
    let pid = child.0.id();
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    // The PIE's load bias: the first mapping of the file at offset 0.
    let base = maps
        .lines()
        .find(|l| {
            l.ends_with(bin.canonicalize().unwrap().to_str().unwrap())
                && l.split_whitespace().nth(2) == Some("00000000")
        })
        .map(|l| u64::from_str_radix(l.split('-').next().unwrap(), 16).unwrap())
        .expect("fixture mapped");
    let funcs: Vec<(u64, String)> =
        functions(&bin).into_iter().filter(|(_, n)| n.starts_with("c_chain_")).collect();
    assert!(!funcs.is_empty());
    let abs: Vec<u64> = funcs.iter().map(|(a, _)| base + a).chain([8]).collect();
    let s = Symbolizer::new(opts(None));
    let got = s.symbolize_pid(pid, &abs).unwrap();
    drop(child);
    for ((_, name), r) in funcs.iter().zip(&got) {
        let sym = r.as_ref().unwrap_or_else(|m| panic!("{name}: {m}"));
        assert_eq!(sym.frames.last().unwrap().function.as_deref(), Some(name.as_str()));
        assert!(sym.frames[0].line > 0, "{name} has a line");
    }
    assert_eq!(got.last().unwrap(), &Err(unwound_symbolize::Miss::NotMapped));
}

#[cfg(feature = "debuginfod")]
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

#[cfg(feature = "debuginfod")]
fn wait_for(url: &str, limit: Duration) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if ureq_get_ok(url) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    false
}

#[cfg(feature = "debuginfod")]
fn ureq_get_ok(url: &str) -> bool {
    Command::new("python3")
        .args(["-c", "import sys,urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)", url])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

struct Kill(std::process::Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[cfg(feature = "debuginfod")]
#[test]
fn debuginfod_serves_a_stripped_binary_and_a_wrong_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let full = fixture("cpp_chain_nofp");
    let stripped = dir.path().join("stripped");
    let served = dir.path().join("served");
    std::fs::create_dir(&served).unwrap();
    let debug = served.join("cpp_chain.debug");
    objcopy(&["--only-keep-debug"], &full, &debug);
    objcopy(&["--strip-debug"], &full, &stripped);
    let addrs = addrs_of(&full);
    let reference = Symbolizer::new(opts(None)).symbolize_elf(&full, &addrs).unwrap();
    let id = unwound_symbolize::build_id_hex(&build_id(&full));

    // Without a server: no DWARF, names only.
    let none = Symbolizer::new(opts(None));
    assert_eq!(none.debug_source(&stripped).unwrap(), DebugSource::None);

    let port = free_port();
    let _server = Kill(
        Command::new("debuginfod")
            .arg("-F")
            .arg(&served)
            .args(["-p", &port.to_string(), "-d"])
            .arg(dir.path().join("db.sqlite"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("debuginfod (scripts/setup.sh installs it)"),
    );
    let base = format!("http://127.0.0.1:{port}");
    assert!(
        wait_for(&format!("{base}/buildid/{id}/debuginfo"), Duration::from_secs(60)),
        "debuginfod indexed the file"
    );
    let client = Debuginfod {
        urls: vec![base],
        timeout: Duration::from_secs(5),
        max_size: 1 << 30,
        cache_dir: dir.path().join("downloads"),
        miss_ttl: Duration::from_secs(600),
    };
    let s = Symbolizer::new(Options { debuginfod: Some(client.clone()), ..opts(None) });
    assert!(matches!(s.debug_source(&stripped).unwrap(), DebugSource::Debuginfod(_)));
    assert_eq!(s.symbolize_elf(&stripped, &addrs).unwrap(), reference);

    // A server that answers every build-id with some other ELF file.
    let wrong_root = dir.path().join("wrong");
    let wrong = wrong_root.join("buildid").join(&id);
    std::fs::create_dir_all(&wrong).unwrap();
    std::fs::copy(fixture("chain_nofp"), wrong.join("debuginfo")).unwrap();
    let wport = free_port();
    let _fake = Kill(
        Command::new("python3")
            .args(["-m", "http.server", &wport.to_string(), "--bind", "127.0.0.1", "--directory"])
            .arg(&wrong_root)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let wbase = format!("http://127.0.0.1:{wport}");
    assert!(wait_for(&format!("{wbase}/buildid/{id}/debuginfo"), Duration::from_secs(20)));
    let bad = Debuginfod { urls: vec![wbase], cache_dir: dir.path().join("downloads2"), ..client };
    match bad.fetch(&build_id(&full)) {
        Err(unwound_symbolize::DebuginfodError::WrongBuildId { wanted, .. }) => assert_eq!(wanted, id),
        other => panic!("expected a wrong-build-id error, got {other:?}"),
    }
    let s = Symbolizer::new(Options { debuginfod: Some(bad), ..opts(None) });
    assert_eq!(s.debug_source(&stripped).unwrap(), DebugSource::None);
}

#[cfg(feature = "debuginfod")]
/// Requests a python `http.server` logged (one line each) for `id`.
fn requests_for(log: &Path, id: &str) -> usize {
    std::fs::read_to_string(log).unwrap_or_default().lines().filter(|l| l.contains(id)).count()
}

#[cfg(feature = "debuginfod")]
#[test]
fn debuginfod_misses_are_remembered_and_a_dead_server_is_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let full = fixture("chain_nofp");
    let id_bytes = build_id(&full);
    let id = unwound_symbolize::build_id_hex(&id_bytes);
    // A server that has nothing: every request is a 404, and logged.
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let log = dir.path().join("requests.log");
    let port = free_port();
    let _server = Kill(
        Command::new("python3")
            .args(["-u", "-m", "http.server", &port.to_string(), "--bind", "127.0.0.1", "--directory"])
            .arg(&empty)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    let base = format!("http://127.0.0.1:{port}");
    let started = Instant::now();
    while !ureq_get_ok(&format!("{base}/")) {
        assert!(started.elapsed() < Duration::from_secs(20), "python http.server did not start");
        std::thread::sleep(Duration::from_millis(100));
    }
    let client = Debuginfod {
        urls: vec![base],
        timeout: Duration::from_secs(5),
        max_size: 1 << 20,
        cache_dir: dir.path().join("downloads"),
        miss_ttl: Duration::from_secs(600),
    };
    let not_found = |c: &Debuginfod| matches!(c.fetch(&id_bytes), Err(unwound_symbolize::DebuginfodError::NotFound(ref got)) if *got == id);
    assert!(not_found(&client));
    assert_eq!(requests_for(&log, &id), 1);
    // Asked again (as by the next run): answered from the marker, the server not asked.
    assert!(not_found(&client));
    assert_eq!(requests_for(&log, &id), 1, "a remembered miss was asked for again");
    assert!(client.cache_dir.join(format!("{id}.miss")).exists());
    // Without a time to keep misses, and once it has passed, the server is asked again.
    assert!(not_found(&Debuginfod { miss_ttl: Duration::ZERO, ..client.clone() }));
    assert_eq!(requests_for(&log, &id), 2);
    let brief = Debuginfod { miss_ttl: Duration::from_millis(300), ..client.clone() };
    std::thread::sleep(Duration::from_millis(400));
    assert!(not_found(&brief));
    assert_eq!(requests_for(&log, &id), 3, "an expired miss was not asked for again");

    // A server that takes connections and never answers: the first lookup waits out the
    // timeout, and the symbolizer asks no more after that.
    let hang = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let hang_base = format!("http://{}", hang.local_addr().unwrap());
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = accepted.clone();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for conn in hang.incoming().flatten() {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            held.push(conn);
        }
    });
    let dead = Debuginfod {
        urls: vec![hang_base],
        timeout: Duration::from_millis(500),
        cache_dir: dir.path().join("downloads-dead"),
        ..client
    };
    let s = Symbolizer::new(Options { debuginfod: Some(dead), ..opts(None) });
    // Two stripped binaries with different build-ids.
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    objcopy(&["--strip-debug"], &full, &a);
    objcopy(&["--strip-debug"], &fixture("cpp_chain_nofp"), &b);
    assert_ne!(build_id(&a), build_id(&b));
    assert_eq!(s.debug_source(&a).unwrap(), DebugSource::None);
    assert_eq!(s.debug_source(&b).unwrap(), DebugSource::None);
    assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 1, "the dead server was asked again");
    assert_eq!(s.stats().debuginfod_errors, 1);
}

/// Without the `debuginfod` feature there is no HTTP client: nothing is requested (and no
/// request counted as failed), but a file already in the download cache is used.
#[cfg(not(feature = "debuginfod"))]
#[test]
fn without_the_debuginfod_feature_only_the_download_cache_is_used() {
    let dir = tempfile::tempdir().unwrap();
    let full = fixture("chain_nofp");
    let stripped = dir.path().join("stripped");
    objcopy(&["--strip-debug"], &full, &stripped);
    let client = Debuginfod {
        urls: vec!["http://127.0.0.1:9".into()],
        timeout: Duration::from_secs(1),
        max_size: 1 << 30,
        cache_dir: dir.path().join("downloads"),
        miss_ttl: Duration::from_secs(600),
    };
    let id = build_id(&full);
    assert!(matches!(client.fetch(&id), Err(unwound_symbolize::DebuginfodError::NotBuiltIn)));
    let s = Symbolizer::new(Options { debuginfod: Some(client.clone()), ..opts(None) });
    assert_eq!(s.debug_source(&stripped).unwrap(), DebugSource::None);
    assert_eq!(s.stats().debuginfod_errors, 0);

    std::fs::create_dir_all(&client.cache_dir).unwrap();
    let cached = client.cache_dir.join(format!("{}.debug", unwound_symbolize::build_id_hex(&id)));
    objcopy(&["--only-keep-debug"], &full, &cached);
    let s = Symbolizer::new(Options { debuginfod: Some(client), ..opts(None) });
    assert_eq!(s.debug_source(&stripped).unwrap(), DebugSource::Debuginfod(cached));
}

#[test]
fn minidebuginfo_names_functions_of_a_stripped_binary() {
    let dir = tempfile::tempdir().unwrap();
    let full = fixture("chain_nofp");
    let p = |n: &str| dir.path().join(n);
    let run = |cmd: &mut Command| assert!(cmd.status().unwrap().success(), "{cmd:?}");
    // As distributions build it: the symbol table without DWARF, xz-compressed, added to
    // the fully stripped binary as `.gnu_debugdata`.
    objcopy(&["--strip-debug"], &full, &p("mini"));
    run(Command::new("xz").arg("-k").arg(p("mini")));
    objcopy(&["--strip-all"], &full, &p("stripped"));
    objcopy(
        &[&format!("--add-section=.gnu_debugdata={}", p("mini.xz").display())],
        &p("stripped"),
        &p("with_mini"),
    );
    let funcs: Vec<(u64, String)> =
        functions(&full).into_iter().filter(|(_, n)| n.starts_with("c_chain_")).collect();
    assert_eq!(funcs.len(), 3);
    let addrs: Vec<u64> = funcs.iter().map(|(a, _)| a + 2).collect();
    let s = Symbolizer::new(opts(None));
    let bare = s.symbolize_elf(p("stripped"), &addrs).unwrap();
    // A fully stripped binary names nothing; `.eh_frame` still says where each function starts.
    for ((start, _), r) in funcs.iter().zip(&bare) {
        let f = &r.as_ref().unwrap().frames[0];
        assert_eq!(f.function, None);
        assert_eq!(f.source, Some(unwound_symbolize::NameSource::EhFrame { start: *start }));
    }
    let named = s.symbolize_elf(p("with_mini"), &addrs).unwrap();
    for ((_, name), r) in funcs.iter().zip(&named) {
        let f = &r.as_ref().unwrap().frames[0];
        assert_eq!(f.function.as_deref(), Some(name.as_str()));
        assert_eq!(f.source, Some(unwound_symbolize::NameSource::MiniDebugInfo));
    }
}

#[test]
fn no_debuginfo_is_not_cached_so_a_debug_file_installed_later_is_found() {
    let dir = tempfile::tempdir().unwrap();
    let full = fixture("chain_nofp");
    let stripped = dir.path().join("stripped");
    let debug_root = dir.path().join("debug");
    objcopy(&["--strip-debug"], &full, &stripped);
    let cache = dir.path().join("cache");
    let with = |dirs: Vec<PathBuf>| {
        Symbolizer::new(Options {
            cache_dir: Some(cache.clone()),
            debug_dirs: dirs,
            debuginfod: None,
            ..Options::default()
        })
    };
    assert_eq!(with(vec![debug_root.clone()]).debug_source(&stripped).unwrap(), DebugSource::None);
    assert!(
        std::fs::read_dir(&cache).map_or(0, |d| d.count()) == 0,
        "nothing cached for a binary without DWARF"
    );
    // "Install" the debug file under the build-id layout.
    let id = unwound_symbolize::build_id_hex(&build_id(&full));
    let target = debug_root.join(".build-id").join(&id[..2]).join(format!("{}.debug", &id[2..]));
    std::fs::create_dir_all(target.parent().unwrap()).unwrap();
    objcopy(&["--only-keep-debug"], &full, &target);
    assert!(matches!(with(vec![debug_root]).debug_source(&stripped).unwrap(), DebugSource::BuildId(_)));
}
