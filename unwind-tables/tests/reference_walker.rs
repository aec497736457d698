//! The reference walker on real stopped processes: every fixture (with and without frame
//! pointers) is stopped in its hot loop with ptrace, its stack is unwound with the compiled
//! tables and the shared step rule, and the frames, symbolized, must be the manifest's chain
//! and end cleanly at the outermost frame.

use std::collections::HashMap;
use std::os::unix::fs::FileExt;
use std::process::{Command, Stdio};
use std::time::Duration;

use unwound_fixtures::{build_fixtures, expand, manifest, matches_leaf};
use unwound_symbolize::{CapturedAddress, ElfSymbols, MappedObject, ProcessMaps};
use unwound_unwind_tables::layout::{Memory, Registers, UnwindRule};
use unwound_unwind_tables::walk::{walk, WalkEnd};
use unwound_unwind_tables::{compile_elf, UnwindTable};

struct ProcMem(std::fs::File);

impl Memory for ProcMem {
    fn read_u64(&mut self, addr: u64) -> Option<u64> {
        let mut b = [0u8; 8];
        self.0.read_exact_at(&mut b, addr).ok()?;
        Some(u64::from_le_bytes(b))
    }
}

/// Tables and symbols of one mapped object.
struct Object {
    table: UnwindTable,
    symbols: ElfSymbols,
}

struct Process {
    maps: ProcessMaps,
    objects: HashMap<u64, Object>,
}

impl Process {
    fn load(pid: u32) -> Self {
        let maps = ProcessMaps::read(pid).unwrap();
        let mut objects = HashMap::new();
        for m in maps.iter().filter(|m| m.executable && m.path.is_some()) {
            // `[vsyscall]` has no object; every other mapping of these fixtures opens.
            let Ok(object) = MappedObject::open(pid, m) else { continue };
            let bytes = object.bytes().unwrap();
            let (Ok(table), Ok(symbols)) =
                (compile_elf(&bytes), ElfSymbols::from_bytes(object.path(), &bytes))
            else {
                continue;
            };
            objects.insert(m.start, Object { table, symbols });
        }
        Process { maps, objects }
    }

    /// (object, file virtual address) of an absolute address.
    fn resolve(&self, addr: u64) -> Option<(&Object, u64)> {
        let m = self.maps.find(addr)?;
        let o = self.objects.get(&m.start)?;
        let vaddr = o.symbols.file_offset_to_vaddr(CapturedAddress::capture(m, addr)?.file_offset)?;
        Some((o, vaddr))
    }

    fn rule(&self, pc: u64) -> Option<UnwindRule> {
        let (o, v) = self.resolve(pc)?;
        o.table.lookup(v)
    }

    fn name(&self, pc: u64) -> String {
        self.resolve(pc)
            .and_then(|(o, v)| o.symbols.lookup(v).map(|s| s.name.to_string()))
            .unwrap_or_else(|| format!("{pc:#x}"))
    }
}

/// Stops the process with ptrace, returns its registers, leaves it stopped.
fn interrupt(pid: u32) -> Registers {
    unsafe {
        let p = pid as libc::pid_t;
        assert_eq!(
            libc::ptrace(libc::PTRACE_SEIZE, p, 0, 0),
            0,
            "PTRACE_SEIZE: {}",
            std::io::Error::last_os_error()
        );
        assert_eq!(libc::ptrace(libc::PTRACE_INTERRUPT, p, 0, 0), 0);
        let mut status = 0;
        assert_eq!(libc::waitpid(p, &mut status, libc::__WALL), p);
        let mut regs: libc::user_regs_struct = std::mem::zeroed();
        assert_eq!(libc::ptrace(libc::PTRACE_GETREGS, p, 0, &mut regs as *mut _), 0);
        Registers { rip: regs.rip, rsp: regs.rsp, rbp: regs.rbp }
    }
}

fn detach(pid: u32) {
    unsafe { libc::ptrace(libc::PTRACE_DETACH, pid as libc::pid_t, 0, 0) };
}

#[test]
fn every_fixture_unwinds_completely_with_tables() {
    let dir = build_fixtures();
    let manifest = manifest();
    let mut failures = Vec::new();
    eprintln!("{:<16} {:>6} {:>9}  example", "fixture", "stops", "complete");
    for f in &manifest.fixture {
        for v in &f.variants {
            let bin = format!("{}_{}", f.name, v);
            let mut child = Command::new(dir.join(&bin)).args(&f.args).stdout(Stdio::null()).spawn().unwrap();
            let pid = child.id();
            std::thread::sleep(Duration::from_millis(100 + f.settle_ms));
            let process = Process::load(pid);
            let pattern = expand(&f.stack);
            let mem_file = std::fs::File::open(format!("/proc/{pid}/mem")).unwrap();
            let stops = 5;
            let mut complete = 0;
            let mut example = String::new();
            for i in 0..stops {
                let regs = interrupt(pid);
                let mut mem = ProcMem(mem_file.try_clone().unwrap());
                let (frames, end) = walk(regs, &mut mem, |pc| process.rule(pc), 512);
                detach(pid);
                let names: Vec<String> = frames
                    .iter()
                    .rev()
                    .map(|fr| process.name(if fr.exact { fr.pc } else { fr.pc - 1 }))
                    .collect();
                if matches_leaf(&names, &pattern) && end == WalkEnd::Complete {
                    complete += 1;
                } else if example.is_empty() {
                    example = format!("{end:?}: {}", names.join(";"));
                }
                if i == 0 && example.is_empty() {
                    example = format!(
                        "{end:?}: …{}",
                        names.iter().rev().take(5).rev().cloned().collect::<Vec<_>>().join(";")
                    );
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
            eprintln!(
                "{bin:<16} {stops:>6} {complete:>9}  {}",
                example.chars().take(160).collect::<String>()
            );
            if complete != stops {
                failures.push(format!("{bin}: {complete}/{stops} complete; {example}"));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
