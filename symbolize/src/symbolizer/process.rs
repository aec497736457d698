//! Addresses of a running process: its mappings (`/proc/PID/maps`), the mapped files
//! (through `/proc/PID/map_files` or `/proc/PID/root`), and JIT code's perf map.

use std::collections::HashMap;
use std::sync::Arc;

use rayon::prelude::*;

use super::Symbolizer;
use crate::process::MappedObject;
use crate::{Error, Frame, Mapping, Miss, NameSource, PerfMap, ProcessMaps, Resolution, Symbolized};

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
        let mut perf_map: Option<Option<PerfMap>> = None;
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
                let map = perf_map.get_or_insert_with(|| PerfMap::read(pid).ok().flatten());
                if let Some(name) = map.as_ref().and_then(|m| m.lookup(addrs[i])) {
                    *r = Some(Ok(Symbolized {
                        frames: vec![Frame {
                            function: Some(name.clone()),
                            file: None,
                            line: 0,
                            discriminator: 0,
                            source: Some(NameSource::PerfMap),
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
        match self.run(&bin, &vaddrs) {
            Ok(answers) => out.extend(keep.into_iter().zip(answers)),
            Err(e) => {
                let e = Arc::new(e);
                out.extend(keep.into_iter().map(|i| (i, Err(Miss::Unreadable(e.clone())))));
            }
        }
        out
    }
}
