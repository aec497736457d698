//! End to end, real BPF: the agent needs no more than CAP_BPF, CAP_PERFMON, CAP_SYS_PTRACE,
//! CAP_DAC_READ_SEARCH, CAP_SYSLOG and CAP_CHECKPOINT_RESTORE (README "Least privilege"),
//! even as an ordinary user; it says what it goes without when given less; and once it
//! samples, no thread of it holds any other capability, in any set.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// The set, as `setpriv` spells it.
const SET: &str = "+bpf,+perfmon,+sys_ptrace,+dac_read_search,+syslog,+checkpoint_restore";
/// CAP_DAC_READ_SEARCH (2), CAP_SYS_PTRACE (19), CAP_SYSLOG (34), CAP_PERFMON (38),
/// CAP_BPF (39), CAP_CHECKPOINT_RESTORE (40).
const MASK: u64 = 1 << 2 | 1 << 19 | 1 << 34 | 1 << 38 | 1 << 39 | 1 << 40;

/// Records chain_nofp for 2 s with the agent started by `setpriv ARGS`; its stacks and stderr.
fn record_under(setpriv: &[&str], dir: &Path) -> (Vec<FoldedStack>, String) {
    let f = start(dir, "chain_nofp", &[]);
    settle(100);
    let tmp = tempfile::tempdir().unwrap();
    // An ordinary user writes its profile and caches where it may.
    std::fs::set_permissions(tmp.path(), std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    let out = tmp.path().join("p.folded");
    let o = Command::new("setpriv")
        .args(setpriv)
        .arg("--")
        .arg(env!("CARGO_BIN_EXE_unwound"))
        .args(["record", "--pid", &f.pid().to_string(), "-d", "2", "-F", "199", "-o"])
        .arg(&out)
        .env("XDG_CACHE_HOME", tmp.path().join("cache"))
        .output()
        .expect("setpriv (util-linux)");
    let stderr = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(o.status.success(), "{stderr}");
    (parse_folded(&std::fs::read_to_string(&out).unwrap()), stderr)
}

/// Samples of chain_nofp walked from main to c_chain_c and named, of all its samples.
fn whole(stacks: &[FoldedStack]) -> (u64, u64) {
    let mine = || stacks.iter().filter(|s| s.process.starts_with("chain"));
    let all = mine().map(|s| s.count).sum();
    let whole = mine()
        .filter(|s| s.user.windows(4).any(|w| w == ["main", "c_chain_a", "c_chain_b", "c_chain_c"]))
        .map(|s| s.count)
        .sum();
    (whole, all)
}

#[test]
fn the_documented_set_is_enough_as_root_and_as_an_ordinary_user() {
    let Some((_guard, dir)) = bpf_fixture_test("documented_capability_set") else { return };
    let bounding = format!("--bounding-set=-all,{SET}");
    let (inh, amb) = (format!("--inh-caps=-all,{SET}"), format!("--ambient-caps=-all,{SET}"));
    let runs = [
        ("root with only the set", vec![bounding.as_str(), "--inh-caps=-all"]),
        (
            "nobody with the set as ambient capabilities",
            vec!["--reuid=65534", "--regid=65534", "--clear-groups", &bounding, &inh, &amb],
        ),
    ];
    for (who, args) in runs {
        let (stacks, stderr) = record_under(&args, &dir);
        let (whole, all) = whole(&stacks);
        assert!(all > 50 && whole * 10 >= all * 9, "{who}: {whole} of {all} samples whole\n{stderr}");
        let warnings: Vec<&str> = stderr.lines().filter(|l| l.starts_with("warning")).collect();
        assert!(warnings.is_empty(), "{who}: {warnings:?}");
        println!("{who}: {whole}/{all} samples walked and named");
    }
}

#[test]
fn with_less_it_says_what_it_goes_without() {
    let Some((_guard, dir)) = bpf_fixture_test("less_than_the_set") else { return };
    let (stacks, stderr) = record_under(&["--bounding-set=-all,+bpf,+perfmon", "--inh-caps=-all"], &dir);
    let warnings: Vec<&str> = stderr.lines().filter(|l| l.starts_with("warning: without CAP_")).collect();
    for cap in ["CAP_SYS_PTRACE", "CAP_DAC_READ_SEARCH", "CAP_SYSLOG", "CAP_CHECKPOINT_RESTORE"] {
        assert!(
            warnings.iter().any(|l| l.starts_with(&format!("warning: without {cap} "))),
            "{cap}: {stderr}"
        );
    }
    let (whole, all) = whole(&stacks);
    assert!(all > 50, "it samples all the same: {all}\n{stderr}");
    println!("CAP_BPF + CAP_PERFMON only: {whole}/{all} samples whole; {warnings:#?}");
}

/// `Cap*` masks of every thread of `pid`.
fn thread_caps(pid: u32) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap().flatten() {
        let status = std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
        for line in status.lines().filter(|l| l.starts_with("Cap")) {
            let (set, hex) = line.split_once(':').unwrap();
            out.push((
                format!("{} {set}", task.file_name().to_string_lossy()),
                u64::from_str_radix(hex.trim(), 16).unwrap(),
            ));
        }
    }
    out
}

#[test]
fn once_sampling_it_holds_only_the_set() {
    let Some((_guard, dir)) = bpf_fixture_test("holds_only_the_set") else { return };
    let f = start(&dir, "chain_nofp", &[]);
    let tmp = tempfile::tempdir().unwrap();
    let err = tmp.path().join("stderr");
    let mut agent = Command::new(env!("CARGO_BIN_EXE_unwound"))
        .args(["record", "--pid", &f.pid().to_string(), "--every", "1", "-o"])
        .arg(tmp.path().join("cpu.pb.gz"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&err).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    // After the first profile: symbolizing has started its threads too.
    while !std::fs::read_to_string(&err).unwrap().contains("unwound: so far:") {
        assert!(agent.try_wait().unwrap().is_none(), "{}", std::fs::read_to_string(&err).unwrap());
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(50));
    }
    let caps = thread_caps(agent.id());
    unsafe { libc::kill(agent.id() as i32, libc::SIGINT) };
    let status = agent.wait().unwrap();
    let stderr = std::fs::read_to_string(&err).unwrap();
    assert!(status.success(), "{stderr}");
    assert!(!caps.is_empty());
    for (what, mask) in &caps {
        assert_eq!(mask & !MASK, 0, "{what} holds {mask:#x}, beyond {MASK:#x}");
        if what.ends_with("CapEff") || what.ends_with("CapPrm") {
            assert_eq!(*mask, MASK, "{what}: root keeps the whole set");
        }
    }
    assert!(stderr.contains("unwound: capabilities kept: CAP_BPF, CAP_PERFMON, CAP_SYS_PTRACE, CAP_DAC_READ_SEARCH, CAP_SYSLOG, CAP_CHECKPOINT_RESTORE (every other one dropped)"), "{stderr}");
    println!("{} thread capability sets, each within {MASK:#x}", caps.len());
}

/// The systemd unit grants exactly the set these tests run the agent with.
#[test]
fn the_service_grants_exactly_the_set() {
    let unit =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("dist/unwound.service")).unwrap();
    let as_setpriv = |key: &str| -> Vec<String> {
        let line =
            unit.lines().find_map(|l| l.strip_prefix(key)).unwrap_or_else(|| panic!("{key} in the unit"));
        let mut caps: Vec<String> = line
            .split_whitespace()
            .map(|c| format!("+{}", c.trim_start_matches("CAP_").to_lowercase()))
            .collect();
        caps.sort();
        caps
    };
    let mut want: Vec<String> = SET.split(',').map(String::from).collect();
    want.sort();
    assert_eq!(as_setpriv("CapabilityBoundingSet="), want);
    assert_eq!(as_setpriv("AmbientCapabilities="), want);
}
