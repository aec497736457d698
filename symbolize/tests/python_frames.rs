//! Python frames read from live CPython processes, against the interpreter's own account.
//!
//! Every interpreter found is tested: Debian's `/usr/bin/python3.11` and pyenv's 3.11.x,
//! 3.12.x and 3.13.x. The workload (`fixtures/python/parked_threads.py`) parks threads in
//! known stacks and prints them from `sys._current_frames()`; the reference walker must
//! give the same functions, files and lines.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use unwound_symbolize::python::{
    line_for_instruction, CodeCache, CodeObject, DisableReason, PyThreadStack, PythonBinary, PythonError,
    PythonProcess,
};

/// The workloads keep two cores busy (a spinner, a compressor): one at a time.
static LIVE: Mutex<()> = Mutex::new(());

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/python").join(name)
}

/// (label, interpreter) for each CPython 3.11–3.13 on this machine (pyenv's root from
/// `pyenv root`, else `~/.pyenv`). None at all fails:
/// the tests would prove nothing.
fn interpreters() -> Vec<(String, PathBuf)> {
    let mut out = Vec::new();
    if Path::new("/usr/bin/python3.11").exists() {
        out.push(("debian-3.11".to_string(), PathBuf::from("/usr/bin/python3.11")));
    }
    if let Ok(dir) = std::fs::read_dir(root_versions()) {
        let mut versions: Vec<String> =
            dir.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect();
        versions.sort();
        for v in versions {
            let Some(minor) = ["3.11.", "3.12.", "3.13."].iter().find(|p| v.starts_with(**p)) else {
                continue;
            };
            let bin =
                root_versions().join(&v).join("bin").join(format!("python{}", &minor[..minor.len() - 1]));
            if bin.exists() && v.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
                out.push((format!("pyenv-{v}"), bin));
            }
        }
    }
    assert!(!out.is_empty(), "no CPython 3.11-3.13 found (Debian python3.11 or pyenv)");
    out
}

fn root_versions() -> PathBuf {
    let root = Command::new("pyenv")
        .arg("root")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()))
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".pyenv")))
        .unwrap_or_default();
    root.join("versions")
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Frame {
    qualname: String,
    file: String,
    line: Option<u32>,
}

struct CodeRecord {
    address: u64,
    qualname: String,
    file: String,
    firstlineno: i32,
    lines: Vec<Option<u32>>,
}

/// A running `parked_threads.py` and what it printed about itself.
struct Workload {
    child: Child,
    _stdin: ChildStdin,
    pid: u32,
    /// kind → (native id, frames innermost first)
    threads: BTreeMap<String, (u32, Vec<Frame>)>,
    codes: Vec<CodeRecord>,
}

impl Workload {
    fn start(python: &Path) -> Workload {
        let mut child = Command::new(python)
            .arg("-u")
            .arg(fixture("parked_threads.py"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start the workload");
        let stdin = child.stdin.take().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let mut w =
            Workload { pid: child.id(), child, _stdin: stdin, threads: BTreeMap::new(), codes: Vec::new() };
        let mut current = None;
        for line in stdout.lines() {
            let line = line.expect("workload output");
            let f: Vec<&str> = line.split('\t').collect();
            let line_no = |s: &str| if s == "-" { None } else { Some(s.parse::<u32>().unwrap()) };
            match f[0] {
                "pid" => assert_eq!(f[1].parse::<u32>().unwrap(), w.pid),
                "thread" => {
                    current = Some(f[2].to_string());
                    w.threads.insert(f[2].to_string(), (f[1].parse().unwrap(), Vec::new()));
                }
                "frame" => {
                    let kind = current.as_ref().unwrap();
                    w.threads.get_mut(kind).unwrap().1.push(Frame {
                        qualname: f[1].to_string(),
                        file: f[2].to_string(),
                        line: line_no(f[3]),
                    });
                }
                "code" => w.codes.push(CodeRecord {
                    address: f[1].parse().unwrap(),
                    qualname: f[2].to_string(),
                    file: f[3].to_string(),
                    firstlineno: f[4].parse().unwrap(),
                    lines: f[5].split(',').filter(|s| !s.is_empty()).map(line_no).collect(),
                }),
                "end" => break,
                other => panic!("unexpected workload line {other:?}"),
            }
        }
        assert!(w.threads.len() >= 9, "workload reported {} threads", w.threads.len());
        w
    }
}

impl Drop for Workload {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn ours(stack: &PyThreadStack) -> Vec<Frame> {
    stack
        .frames
        .iter()
        .map(|f| Frame { qualname: f.qualname.clone(), file: f.file.clone(), line: f.line })
        .collect()
}

/// Compares one thread: exact for blocked threads, functions only for the spinner.
fn matches(kind: &str, truth: &[Frame], ours: &[Frame]) -> bool {
    if kind == "spinner" {
        let names = |v: &[Frame]| v.iter().map(|f| f.qualname.clone()).collect::<Vec<_>>();
        names(truth) == names(ours)
    } else {
        truth == ours
    }
}

#[test]
fn reference_walker_gives_the_interpreters_own_stacks() {
    let _live = LIVE.lock().unwrap_or_else(|e| e.into_inner());
    let mut failures = Vec::new();
    let mut table = String::new();
    for (label, python) in interpreters() {
        let w = Workload::start(&python);
        let process = PythonProcess::detect(w.pid).expect("detect").expect("a Python process");
        let mut cache = CodeCache::new(1024);
        // The zlib and spinner threads run: read again (a few times) until they are back
        // where the interpreter saw them.
        let mut verdict = BTreeMap::new();
        for attempt in 0..10 {
            let stacks = process.stacks_with(&mut cache).expect("stacks");
            for (kind, (tid, truth)) in &w.threads {
                let stack = stacks.iter().find(|s| s.native_tid == *tid);
                let got = stack.map(ours).unwrap_or_default();
                let ok = matches(kind, truth, &got) && stack.is_some_and(|s| !s.truncated);
                if attempt == 9 && !ok {
                    failures.push(format!(
                        "{label} {kind}: expected {truth:#?}\ngot {got:#?} ({:?})",
                        stack.and_then(|s| s.error.as_ref())
                    ));
                }
                let entry = verdict.entry(kind.clone()).or_insert(false);
                *entry |= ok;
            }
            if verdict.values().all(|ok| *ok) {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        for (kind, ok) in &verdict {
            let depth = w.threads[kind].1.len();
            table += &format!(
                "{label:>14} {kind:>15} {depth:>4} frames  {}\n",
                if *ok { "match" } else { "MISMATCH" }
            );
        }
        // Frames called from C end their eval activation: the thread's bootstrap, the sort
        // key called back from `sorted`, and on 3.11 the thread's target, which
        // `Thread.run` calls through CALL_FUNCTION_EX (inlined from 3.12 on).
        let stacks = process.stacks().expect("stacks");
        let sorting = stacks.iter().find(|s| s.native_tid == w.threads["sorted_reentry"].0).unwrap();
        let entries: Vec<&str> =
            sorting.frames.iter().filter(|f| f.entry).map(|f| f.qualname.as_str()).collect();
        let expected: &[&str] = if process.version().minor == 11 {
            &["key_blocks", "sort_reentry", "Thread._bootstrap"]
        } else {
            &["key_blocks", "Thread._bootstrap"]
        };
        if entries != expected {
            failures.push(format!("{label}: entry frames {entries:?}"));
        }
        // The deep recursion is walked whole.
        assert!(w.threads["recursion_300"].1.len() > 300);
    }
    eprintln!("{table}");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The in-kernel path: `*(fsbase + tss_slot)` is the thread's own `PyThreadState`, with
/// `fsbase` read from the stopped thread by ptrace (and equal to `PyThreadState.thread_id`).
#[test]
fn tss_slot_at_fs_base_is_each_threads_own_thread_state() {
    let _live = LIVE.lock().unwrap_or_else(|e| e.into_inner());
    for (label, python) in interpreters() {
        let w = Workload::start(&python);
        let process = PythonProcess::detect(w.pid).expect("detect").expect("a Python process");
        let info = *process.info();
        eprintln!("{label}: {} {info:?}", process.version());
        assert!(info.tss_key < 32, "{label}: key {}", info.tss_key);
        assert_eq!(info.tss_slot, 0x310 + 16 * u64::from(info.tss_key) + 8, "{label}: glibc 2.36 layout");
        let stacks = process.stacks().expect("stacks");
        for (kind, (tid, _)) in &w.threads {
            let stack =
                stacks.iter().find(|s| s.native_tid == *tid).unwrap_or_else(|| panic!("{label} {kind}"));
            assert_eq!(stack.tss_thread_state, Some(stack.thread_state), "{label} {kind}: TSS value");
            let fs_base = fs_base(*tid).unwrap_or_else(|e| panic!("{label} {kind}: ptrace: {e}"));
            assert_eq!(fs_base, stack.pthread, "{label} {kind}: fs_base == thread_id");
        }
    }
}

/// `%fs` base of thread `tid`, by stopping it with ptrace.
fn fs_base(tid: u32) -> std::io::Result<u64> {
    let tid = tid as libc::pid_t;
    let check = |r: libc::c_long| if r < 0 { Err(std::io::Error::last_os_error()) } else { Ok(()) };
    // SAFETY: plain ptrace requests on a thread of our own child; `regs` is a valid
    // user_regs_struct for PTRACE_GETREGS to fill.
    unsafe {
        check(libc::ptrace(libc::PTRACE_SEIZE, tid, 0, 0))?;
        let result = (|| {
            check(libc::ptrace(libc::PTRACE_INTERRUPT, tid, 0, 0))?;
            let mut status = 0;
            if libc::waitpid(tid, &mut status, libc::__WALL) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let mut regs: libc::user_regs_struct = std::mem::zeroed();
            check(libc::ptrace(libc::PTRACE_GETREGS, tid, 0, &mut regs as *mut _))?;
            Ok(regs.fs_base)
        })();
        libc::ptrace(libc::PTRACE_DETACH, tid, 0, 0);
        result
    }
}

/// Code objects read from the process give the interpreter's names and, on every code
/// unit, the line `co_positions()` gives.
#[test]
fn code_reader_agrees_with_co_positions_in_a_live_process() {
    let _live = LIVE.lock().unwrap_or_else(|e| e.into_inner());
    for (label, python) in interpreters() {
        let w = Workload::start(&python);
        let process = PythonProcess::detect(w.pid).expect("detect").expect("a Python process");
        assert!(w.codes.len() > 100, "{label}: {} code objects", w.codes.len());
        let mut units = 0;
        for c in &w.codes {
            let object = CodeObject::read(w.pid, process.info(), c.address, None)
                .unwrap_or_else(|e| panic!("{label} {}: {e}", c.qualname));
            assert_eq!((&object.qualname, &object.filename), (&c.qualname, &c.file), "{label}");
            assert_eq!(object.firstlineno, c.firstlineno, "{label} {}", c.qualname);
            for (i, line) in c.lines.iter().enumerate() {
                assert_eq!(object.line(i as i64), *line, "{label} {} unit {i}", c.qualname);
                units += 1;
            }
        }
        assert!(units > 10_000, "{label}: {units} units");
        eprintln!("{label}: {} live code objects, {units} code units agree", w.codes.len());
        // A wrong checksum is a stale object, not a name.
        let c = &w.codes[0];
        let good = CodeObject::read(w.pid, process.info(), c.address, None).unwrap();
        let err = CodeObject::read(w.pid, process.info(), c.address, Some(good.checksum ^ 1)).unwrap_err();
        assert!(matches!(err, PythonError::InvalidObject { .. }), "{err}");
        // Not a code object.
        let err = CodeObject::read(w.pid, process.info(), process.info().py_none, None).unwrap_err();
        assert!(matches!(err, PythonError::InvalidObject { .. }), "{err}");
    }
}

/// The location-table decoder against `co_positions()` on every code unit of every code
/// object of the standard library's top-level modules.
#[test]
fn line_decoder_agrees_with_co_positions_on_the_stdlib() {
    for (label, python) in interpreters() {
        let out = Command::new(&python).arg(fixture("dump_linetables.py")).output().expect("run python");
        assert!(out.status.success(), "{label}: {}", String::from_utf8_lossy(&out.stderr));
        let text = String::from_utf8(out.stdout).unwrap();
        let (mut objects, mut units) = (0, 0);
        for record in text.lines() {
            let f: Vec<&str> = record.split('\t').collect();
            let firstlineno: i32 = f[0].parse().unwrap();
            let table: Vec<u8> = (0..f[1].len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&f[1][i..i + 2], 16).unwrap())
                .collect();
            for (i, want) in f[2].split(',').filter(|s| !s.is_empty()).enumerate() {
                let want = if want == "-" { None } else { Some(want.parse::<u32>().unwrap()) };
                assert_eq!(line_for_instruction(&table, firstlineno, i as i64), want, "{label}: {record}");
                units += 1;
            }
            objects += 1;
        }
        assert!(objects > 5000, "{label}: {objects} code objects");
        eprintln!("{label}: {objects} code objects, {units} code units agree");
    }
}

#[test]
fn a_process_without_python_is_none() {
    let mut child = Command::new("sleep").arg("30").spawn().unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let detected = PythonProcess::detect(child.id());
    let _ = child.kill();
    let _ = child.wait();
    assert!(matches!(detected, Ok(None)), "{detected:?}");
    assert!(matches!(PythonProcess::detect(std::process::id()), Ok(None)));
    // A process that is gone is an error, not a panic.
    assert!(PythonProcess::detect(u32::MAX - 1).is_err());
}

#[test]
fn python_3_10_is_refused_with_a_reason() {
    let python = root_versions().join("3.10.13/bin/python3.10");
    let Ok(dir) = std::fs::read_dir(root_versions()) else { return };
    let lib = dir
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("3.10.")))
        .map(|p| p.join("lib/libpython3.10.so.1.0"));
    let Some(lib) = lib.filter(|l| l.exists()) else {
        eprintln!("no pyenv 3.10 ({})", python.display());
        return;
    };
    let err = PythonBinary::open(&lib).unwrap_err();
    assert_eq!(err.disable_reason(), Some(DisableReason::UnsupportedVersion { version: 0 }), "{err}");
}

/// Truncated interpreter files are errors; corrupted ones are errors or anything else
/// but a panic.
#[test]
fn damaged_files_are_errors_not_panics() {
    let dir = tempfile::tempdir().unwrap();
    let garbage = dir.path().join("garbage");
    std::fs::write(
        &garbage,
        (0..100_000u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect::<Vec<_>>(),
    )
    .unwrap();
    assert!(PythonBinary::open(&garbage).is_err());
    assert!(PythonBinary::open(dir.path().join("missing")).is_err());
    for (label, python) in interpreters() {
        // The file holding _PyRuntime: libpython when there is one.
        let lib = python.parent().unwrap().join("../lib").read_dir().ok().and_then(|d| {
            d.filter_map(|e| e.ok()).map(|e| e.path()).find(|p| {
                let n = p.file_name().unwrap().to_string_lossy().into_owned();
                n.starts_with("libpython3.1") && n.ends_with(".so.1.0")
            })
        });
        let file = lib.unwrap_or_else(|| python.clone());
        let bytes = std::fs::read(&file).unwrap();
        let binary = PythonBinary::open(&file).expect("readable").expect("holds _PyRuntime");
        let version = binary.version();
        assert_eq!(version.major, 3, "{label}");
        assert!(binary.tss_key_decoded(), "{label}: PyGILState_GetThisThreadState decoded");
        for len in [0, 16, 64, 4096, 65536, bytes.len() / 3, bytes.len() / 2, bytes.len() - 1] {
            let cut = dir.path().join(format!("cut{len}"));
            std::fs::write(&cut, &bytes[..len]).unwrap();
            // The section headers are at the end: any cut loses them.
            let result = PythonBinary::open(&cut);
            assert!(result.is_err(), "{label} cut at {len}: {result:?}");
        }
        // Bytes flipped across the file, headers included.
        let mut flipped = bytes.clone();
        for i in (0..flipped.len()).step_by(997) {
            flipped[i] ^= 0x5a;
        }
        let path = dir.path().join("flipped");
        std::fs::write(&path, &flipped).unwrap();
        let _ = PythonBinary::open(&path);
    }
}

/// 3.13's offsets come from the interpreter's own `_Py_DebugOffsets`; they must equal
/// the layout gdb printed (research §1).
#[test]
fn debug_offsets_of_3_13_are_the_known_layout() {
    for (label, python) in interpreters() {
        let lib = python.parent().unwrap().join("../lib/libpython3.13.so.1.0");
        if !lib.exists() {
            continue;
        }
        let o = PythonBinary::open(&lib).unwrap().unwrap().offsets();
        assert_eq!(
            (o.tstate_frame, o.frame_owner, o.frame_code, o.frame_previous, o.frame_instr),
            (72, 70, 0, 8, 56),
            "{label}"
        );
        assert_eq!(
            (o.code_adaptive, o.code_firstlineno, o.code_qualname, o.code_linetable),
            (200, 68, 128, 136)
        );
        assert_eq!((o.tstate_native_thread_id, o.tstate_thread_id, o.unicode_ascii_data), (160, 152, 40));
        assert_eq!((o.runtime_interpreters_head, o.interp_threads_head), (632, 7344));
    }
}

/// py-spy (0.4.x, from PyPI: `scripts/setup.sh` installs it into
/// `~/.cache/unwound/venv`) on the same process: the same functions, files, lines and
/// entry frames for every parked thread. Skipped, with a note, where py-spy is not
/// installed.
#[test]
fn reference_walker_agrees_with_py_spy_dump() {
    let py_spy = std::env::var_os("HOME")
        .map(|h| PathBuf::from(h).join(".cache/unwound/venv/bin/py-spy"))
        .filter(|p| p.exists());
    let Some(py_spy) = py_spy else {
        eprintln!("py-spy not installed (scripts/setup.sh): skipped");
        return;
    };
    let _live = LIVE.lock().unwrap_or_else(|e| e.into_inner());
    // py-spy's JSON, flattened to the workload's own record format by Python.
    const FLATTEN: &str = r#"
import json, sys
for t in json.load(sys.stdin):
    print(f"thread\t{t['os_thread_id']}")
    for f in t["frames"]:
        print(f"frame\t{f['name']}\t{f['filename']}\t{f['line']}\t{int(f['is_entry'])}")
"#;
    for (label, python) in interpreters() {
        let w = Workload::start(&python);
        let process = PythonProcess::detect(w.pid).expect("detect").expect("a Python process");
        let dump =
            Command::new(&py_spy).args(["dump", "--json", "--pid", &w.pid.to_string()]).output().unwrap();
        assert!(dump.status.success(), "{label}: py-spy: {}", String::from_utf8_lossy(&dump.stderr));
        let mut flatten = Command::new("python3")
            .args(["-c", FLATTEN])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        flatten.stdin.take().unwrap().write_all(&dump.stdout).unwrap();
        let text = String::from_utf8(flatten.wait_with_output().unwrap().stdout).unwrap();
        let mut theirs: BTreeMap<u32, Vec<(Frame, bool)>> = BTreeMap::new();
        let mut tid = 0;
        for line in text.lines() {
            let f: Vec<&str> = line.split('\t').collect();
            match f[0] {
                "thread" => tid = f[1].parse().unwrap(),
                _ => theirs.entry(tid).or_default().push((
                    Frame { qualname: f[1].to_string(), file: f[2].to_string(), line: f[3].parse().ok() },
                    f[4] == "1",
                )),
            }
        }
        let stacks = process.stacks().expect("stacks");
        for (kind, (tid, _)) in w.threads.iter().filter(|(k, _)| !matches!(k.as_str(), "spinner" | "zlib")) {
            let stack = stacks.iter().find(|s| s.native_tid == *tid).unwrap();
            let ours: Vec<(Frame, bool)> = stack
                .frames
                .iter()
                .map(|f| {
                    (Frame { qualname: f.qualname.clone(), file: f.file.clone(), line: f.line }, f.entry)
                })
                .collect();
            let theirs = &theirs[tid];
            // py-spy marks is_entry from 3.11's flag only; on 3.12+ compare frames alone.
            if process.version().minor == 11 {
                assert_eq!(&ours, theirs, "{label} {kind}");
            } else {
                let frames = |v: &[(Frame, bool)]| v.iter().map(|(f, _)| f.clone()).collect::<Vec<_>>();
                assert_eq!(frames(&ours), frames(theirs), "{label} {kind}");
            }
        }
        eprintln!("{label}: py-spy dump agrees on {} parked threads", w.threads.len() - 2);
    }
}

proptest::proptest! {
    /// Any bytes as a location table, any index: an answer or none, never a panic; and an
    /// index past the units the table covers has no line.
    #[test]
    fn line_decoder_is_total(table in proptest::collection::vec(proptest::num::u8::ANY, 0..256),
                             first in proptest::num::i32::ANY, index in -2i64..2048) {
        let _ = line_for_instruction(&table, first, index);
        proptest::prop_assert_eq!(line_for_instruction(&table, first, 8 * table.len() as i64), None);
    }
}
