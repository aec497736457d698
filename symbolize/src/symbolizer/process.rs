//! Addresses of a running process: its mappings (`/proc/PID/maps`), the mapped files
//! (through `/proc/PID/map_files` or `/proc/PID/root`), and JIT code's perf map.

use std::collections::HashMap;
use std::sync::Arc;

use rayon::prelude::*;

use super::Symbolizer;
use crate::name::Name;
use crate::process::MappedObject;
use crate::{Error, Frame, Mapping, Miss, ProcessMaps, Resolution, Symbolized};

impl Symbolizer {
    /// Symbolizes absolute addresses of process `pid`. Binaries are opened through
    /// `/proc/PID/map_files` (deleted or replaced files, other mount namespaces), falling
    /// back to `/proc/PID/root`; JIT code through `/tmp/perf-PID.map`.
    pub fn symbolize_pid(&self, pid: u32, addrs: &[u64]) -> Result<Vec<Resolution>, Error> {
        let maps = ProcessMaps::read(pid)?;
        let mut out: Vec<Option<Resolution>> = vec![None; addrs.len()];
        // Group by mapping.
        let mut groups: HashMap<u64, (&Mapping, Vec<usize>)> = HashMap::new();
        for (i, &a) in addrs.iter().enumerate() {
            match maps.find(a) {
                Some(m) => groups.entry(m.start).or_insert_with(|| (m, Vec::new())).1.push(i),
                None => out[i] = Some(Err(Miss::NotMapped)),
            }
        }
        let mut perf_map: Option<Vec<(u64, u64, Name)>> = None;
        let groups: Vec<(&Mapping, Vec<usize>)> = groups.into_values().collect();
        let results: Vec<Vec<(usize, Resolution)>> = groups
            .par_iter()
            .map(|(m, idx)| self.symbolize_mapping(pid, m, idx.iter().map(|&i| (i, addrs[i])).collect()))
            .collect();
        for (i, r) in results.into_iter().flatten() {
            out[i] = Some(r);
        }
        // Anonymous memory: perf map.
        for (i, r) in out.iter_mut().enumerate() {
            if matches!(r, Some(Err(Miss::Anonymous))) {
                let map = perf_map.get_or_insert_with(|| read_perf_map(pid));
                let a = addrs[i];
                let j = map.partition_point(|e| e.0 <= a);
                if let Some(e) = j.checked_sub(1).map(|j| &map[j]).filter(|e| a < e.0.saturating_add(e.1)) {
                    *r = Some(Ok(Symbolized {
                        frames: vec![Frame {
                            function: Some(e.2.clone()),
                            file: None,
                            line: 0,
                            discriminator: 0,
                        }],
                    }));
                }
            }
        }
        Ok(out.into_iter().map(|r| r.unwrap_or(Err(Miss::NotMapped))).collect())
    }

    fn symbolize_mapping(&self, pid: u32, m: &Mapping, addrs: Vec<(usize, u64)>) -> Vec<(usize, Resolution)> {
        let fail = |miss: Miss| addrs.iter().map(|&(i, _)| (i, Err(miss.clone()))).collect();
        let Some(path) = &m.path else { return fail(Miss::Anonymous) };
        if m.is_pseudo() {
            return fail(Miss::NotAFile { path: path.clone() });
        }
        let bin = match MappedObject::open(pid, m) {
            Ok(object) => match self.binary(&object.read_path().unwrap_or_default()) {
                Ok(b) => b,
                Err(e) => return fail(Miss::Unreadable(Arc::new(e))),
            },
            Err(Error::Replaced { path, pid }) => return fail(Miss::Replaced { path, pid }),
            Err(e) => return fail(Miss::Unreadable(Arc::new(e))),
        };
        let mut vaddrs = Vec::with_capacity(addrs.len());
        let mut out = Vec::with_capacity(addrs.len());
        let mut keep = Vec::with_capacity(addrs.len());
        for &(i, a) in &addrs {
            match bin.file_offset_to_vaddr(m.file_offset(a)) {
                Some(v) => {
                    vaddrs.push(v);
                    keep.push(i);
                }
                None => out.push((i, Err(Miss::OutsideSegments))),
            }
        }
        out.extend(keep.into_iter().zip(self.run(&bin, &vaddrs)));
        out
    }
}

/// Largest perf map read.
const MAX_PERF_MAP: u64 = 64 << 20;

/// `/tmp/perf-PID.map` as the process sees it (its root, its own pid number): `START SIZE
/// NAME` lines, hex, sorted by start. Only a regular file, at most [`MAX_PERF_MAP`] bytes,
/// opened without blocking (a FIFO planted there cannot hang us).
fn read_perf_map(pid: u32) -> Vec<(u64, u64, Name)> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let ns_pid = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("NSpid:"))
                .and_then(|v| v.split_whitespace().last()?.parse::<u32>().ok())
        })
        .unwrap_or(pid);
    let path = format!("/proc/{pid}/root/tmp/perf-{ns_pid}.map");
    let Ok(f) = std::fs::OpenOptions::new().read(true).custom_flags(libc_o_nonblock()).open(&path) else {
        return Vec::new();
    };
    if !f.metadata().is_ok_and(|m| m.is_file()) {
        return Vec::new();
    }
    let mut text = String::new();
    if f.take(MAX_PERF_MAP).read_to_string(&mut text).is_err() {
        return Vec::new();
    }
    let mut v: Vec<(u64, u64, Name)> = text
        .lines()
        .filter_map(|l| {
            let mut it = l.splitn(3, ' ');
            let start = u64::from_str_radix(it.next()?.trim_start_matches("0x"), 16).ok()?;
            let size = u64::from_str_radix(it.next()?.trim_start_matches("0x"), 16).ok()?;
            Some((start, size, Name::from(it.next()?.trim())))
        })
        .collect();
    v.sort_by_key(|e| e.0);
    v
}

/// `O_NONBLOCK` on Linux (all architectures this crate targets).
const fn libc_o_nonblock() -> i32 {
    0o4000
}
