//! ElfSymbols checked against binutils `nm` on system libraries and binaries.

use std::collections::HashMap;
use std::process::Command;

use unwound_symbolize::{ElfSymbols, ProcessMaps};

/// address → names of defined function symbols, by `nm` (demangled with -C).
fn nm_functions(path: &str, dynamic: bool) -> HashMap<u64, Vec<String>> {
    let mut cmd = Command::new("nm");
    cmd.args(["-C", "--defined-only"]);
    if dynamic {
        cmd.arg("-D");
    }
    let out = cmd.arg(path).output().expect("nm (binutils)");
    assert!(out.status.success(), "nm {path}");
    let mut map: HashMap<u64, Vec<String>> = HashMap::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let mut f = line.splitn(3, ' ');
        let (Some(addr), Some(kind), Some(name)) = (f.next(), f.next(), f.next()) else { continue };
        if !matches!(kind, "T" | "t" | "W" | "i") {
            continue;
        }
        let Ok(addr) = u64::from_str_radix(addr, 16) else { continue };
        let name = name.split('@').next().unwrap().to_string();
        map.entry(addr).or_default().push(name);
    }
    map
}

fn check(path: &str, dynamic: bool) {
    let ours = ElfSymbols::open(path).unwrap();
    let nm = nm_functions(path, dynamic);
    assert!(nm.len() > 50, "{path}: nm found only {}", nm.len());
    let mut agree = 0;
    let mut checked = 0;
    for (addr, names) in &nm {
        checked += 1;
        let Some(sym) = ours.lookup(*addr) else { continue };
        // nm -C's demangler and ours may differ in spacing of templates; compare names that
        // nm prints for this exact address.
        if sym.address == *addr && sym.offset == 0 && names.iter().any(|n| n == sym.name) {
            agree += 1;
        } else if checked - agree <= 5 + 1 {
            eprintln!("  differ at {addr:#x}: ours {:?}+{} nm {names:?}", sym.name, sym.offset);
        }
    }
    let share = agree as f64 / checked as f64;
    eprintln!("{path}: {agree}/{checked} addresses agree with nm ({:.2}%)", share * 100.0);
    assert!(share >= 0.99, "{path}: only {agree}/{checked} agree with nm");
}

#[test]
fn libc_dynamic_symbols_agree_with_nm() {
    check("/usr/lib/x86_64-linux-gnu/libc.so.6", true);
}

// C++ names as nm -C spells them: libiberty's demangler.
#[cfg(feature = "libiberty-demangle")]
#[test]
fn libstdcxx_dynamic_symbols_agree_with_nm() {
    check("/usr/lib/x86_64-linux-gnu/libstdc++.so.6", true);
}

// C++ names as nm -C spells them: libiberty's demangler.
#[cfg(feature = "libiberty-demangle")]
#[test]
fn libllvm_symbols_agree_with_nm() {
    // A large C++ library: tens of thousands of exported template instances.
    // scripts/setup.sh installs it (llvm-22-dev).
    check("/usr/lib/llvm-22/lib/libLLVM.so.22.1", true);
}

#[test]
fn python_symbols_agree_with_nm() {
    check("/usr/bin/python3.11", true);
}

#[test]
fn this_test_binary_symbols_agree_with_nm() {
    // A Rust binary with a full .symtab, legacy-mangled names.
    let exe = std::env::current_exe().unwrap();
    check(exe.to_str().unwrap(), false);
}

#[test]
fn own_function_is_found_through_proc_maps() {
    #[inline(never)]
    fn marker_function_for_lookup() -> u64 {
        std::hint::black_box(42)
    }
    let addr = marker_function_for_lookup as fn() -> u64 as usize as u64 + 1;
    let maps = ProcessMaps::read(std::process::id()).unwrap();
    let m = maps.find(addr).expect("mapped");
    assert!(m.executable);
    let elf = ElfSymbols::open(format!("/proc/self/map_files/{}", m.map_files_name())).unwrap();
    let vaddr = elf.file_offset_to_vaddr(m.file_offset(addr)).unwrap();
    let sym = elf.lookup(vaddr).unwrap();
    assert_eq!(sym.name, "against_nm::own_function_is_found_through_proc_maps::marker_function_for_lookup");
    assert_eq!(sym.offset, 1);
}

#[test]
fn garbage_is_an_error_not_a_panic() {
    for data in [&b""[..], b"\x7fELF", b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0\x03\0>\0", &[0xffu8; 4096][..]]
    {
        assert!(ElfSymbols::from_bytes("garbage", data).is_err());
    }
    let err = ElfSymbols::open("/nonexistent/file").unwrap_err();
    assert!(err.to_string().contains("/nonexistent/file"), "{err}");
}

#[test]
fn kallsyms_lookup_agrees_with_the_kernel_file() {
    if unsafe_geteuid() != 0 {
        eprintln!("SKIPPED: /proc/kallsyms shows addresses to root only");
        return;
    }
    let k = unwound_symbolize::KernelSymbols::load().unwrap();
    assert!(k.len() > 10_000);
    let text = std::fs::read_to_string("/proc/kallsyms").unwrap();
    let line = text.lines().find(|l| l.ends_with(" T ksys_read") || l.ends_with(" T vfs_read")).unwrap();
    let addr = u64::from_str_radix(line.split(' ').next().unwrap(), 16).unwrap();
    let name = line.rsplit(' ').next().unwrap();
    let s = k.lookup(addr + 3).unwrap();
    assert_eq!((s.name, s.offset, s.module), (name, 3, None));
}

fn unsafe_geteuid() -> u32 {
    // /proc/self/status Uid line: real, effective, ...
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let uid = status.lines().find_map(|l| l.strip_prefix("Uid:")).unwrap();
    uid.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// `readelf -lW`'s LOAD segments: (file offset, virtual address, file size).
fn readelf_loads(path: &str) -> Vec<(u64, u64, u64)> {
    let out = Command::new("readelf").args(["-lW", path]).output().expect("readelf (binutils)");
    assert!(out.status.success(), "readelf -l {path}");
    let hex = |s: &str| u64::from_str_radix(s.trim_start_matches("0x"), 16).expect("hex field");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.first() == Some(&"LOAD")).then(|| (hex(f[1]), hex(f[2]), hex(f[4])))
        })
        .collect()
}

#[test]
fn load_segments_agree_with_readelf() {
    use unwound_symbolize::LoadSegments;
    for path in
        ["/usr/lib/x86_64-linux-gnu/libc.so.6", "/usr/lib/x86_64-linux-gnu/libstdc++.so.6", "/usr/bin/bash"]
    {
        let loads = readelf_loads(path);
        assert!(loads.len() >= 2, "{path}: readelf lists {} LOAD segments", loads.len());
        let ours = LoadSegments::open(path).unwrap();
        let symbols = ElfSymbols::open(path).unwrap();
        for &(offset, vaddr, size) in loads.iter().filter(|l| l.2 > 0) {
            for k in [0, size / 2, size - 1] {
                assert_eq!(
                    ours.file_offset_to_vaddr(offset + k),
                    Some(vaddr + k),
                    "{path}: offset {:#x}",
                    offset + k
                );
                assert_eq!(
                    symbols.file_offset_to_vaddr(offset + k),
                    Some(vaddr + k),
                    "{path}: offset {:#x}",
                    offset + k
                );
            }
        }
        // Past the end of every segment's file bytes: no address.
        let end = loads.iter().map(|&(o, _, s)| o + s).max().unwrap();
        assert_eq!(ours.file_offset_to_vaddr(end + 0x10_0000), None, "{path}");
    }
    assert!(LoadSegments::from_bytes("junk", b"not an ELF file").is_err());
}
