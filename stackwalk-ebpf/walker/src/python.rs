//! CPython processes: recognised (through `unwound_symbolize::python`) as the walker reads
//! their maps, described to the kernel (`PY_PROCS`) so that each sample carries its thread's
//! Python frames.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use aya::maps::{HashMap as BpfHashMap, MapData};
use aya::Ebpf;
use unwound_stackwalk_abi::{PyProcInfo, PY_PROCS_MAP};
use unwound_symbolize::python::PythonError;

use crate::error::{Error, Result};

/// How many times a process whose interpreter is not ready yet (no thread state key, not
/// initialised) is looked at again, and how often.
const RETRIES: u32 = 20;
const RETRY_EVERY: Duration = Duration::from_millis(200);

/// What the walker did with CPython processes.
#[derive(Clone, Debug, Default)]
#[non_exhaustive]
pub struct PythonStats {
    /// Processes walked for Python frames.
    pub processes: u64,
    /// Processes left out, by reason (`unsupported_version`, `self_test_failed`, …;
    /// `unreadable` when the process could not be read, `map_full` when the kernel's map
    /// was full).
    pub disabled: BTreeMap<&'static str, u64>,
}

pub(crate) struct Python {
    map: BpfHashMap<MapData, u32, PyProcInfo>,
    /// Processes walked now.
    walked: HashMap<u32, ()>,
    /// Processes to look at (again): when, and how many tries are left.
    due: HashMap<u32, (Instant, u32)>,
    /// Processes found not to be CPython or refused: not looked at again until they exec.
    settled: HashMap<u32, ()>,
    pub stats: PythonStats,
    /// Found before the walker's first drain (at start), handed out then.
    pub found: Vec<(u32, unwound_symbolize::python::PyProcInfo)>,
    /// Interpreter binaries and C libraries read so far.
    detector: unwound_symbolize::python::Detector,
}

impl Python {
    pub fn new(ebpf: &mut Ebpf) -> Result<Self> {
        let map = ebpf.take_map(PY_PROCS_MAP).ok_or(Error::Object("PY_PROCS map"))?;
        Ok(Python {
            map: BpfHashMap::try_from(map)?,
            walked: HashMap::new(),
            due: HashMap::new(),
            settled: HashMap::new(),
            detector: unwound_symbolize::python::Detector::new(),
            stats: PythonStats::default(),
            found: Vec::new(),
        })
    }

    /// `pid` maps something named like Python: look at it at the next [`Self::detect_due`].
    pub fn consider(&mut self, pid: u32) {
        if !self.walked.contains_key(&pid) && !self.settled.contains_key(&pid) {
            self.due.entry(pid).or_insert((Instant::now(), RETRIES));
        }
    }

    /// `pid` exited or runs a new program: its entry is gone (the kernel drops it too).
    pub fn forget(&mut self, pid: u32) {
        if self.walked.remove(&pid).is_some() {
            let _ = self.map.remove(&pid);
        }
        self.due.remove(&pid);
        self.settled.remove(&pid);
    }

    /// Looks at the processes due: those found to be CPython are described to the kernel and
    /// returned.
    pub fn detect_due(&mut self) -> Vec<(u32, unwound_symbolize::python::PyProcInfo)> {
        let now = Instant::now();
        let due: Vec<u32> = self.due.iter().filter(|(_, (t, _))| *t <= now).map(|(p, _)| *p).collect();
        let mut found = std::mem::take(&mut self.found);
        for pid in due {
            let Some((_, tries)) = self.due.remove(&pid) else { continue };
            match self.detector.detect(pid) {
                Ok(Some(p)) => {
                    let info = *p.info();
                    if self.map.insert(pid, to_kernel(&info), 0).is_err() {
                        *self.stats.disabled.entry("map_full").or_default() += 1;
                        self.settled.insert(pid, ());
                        continue;
                    }
                    self.walked.insert(pid, ());
                    self.stats.processes += 1;
                    found.push((pid, info));
                }
                Ok(None) => {
                    self.settled.insert(pid, ());
                }
                Err(PythonError::Disabled { reason, .. }) if reason.is_transient() && tries > 1 => {
                    self.due.insert(pid, (now + RETRY_EVERY, tries - 1));
                }
                Err(PythonError::Disabled { reason, .. }) => {
                    *self.stats.disabled.entry(reason.name()).or_default() += 1;
                    self.settled.insert(pid, ());
                }
                Err(_) => {
                    *self.stats.disabled.entry("unreadable").or_default() += 1;
                    self.settled.insert(pid, ());
                }
            }
        }
        found
    }
}

/// The kernel's copy of a process's description (the same fields, field by field).
fn to_kernel(i: &unwound_symbolize::python::PyProcInfo) -> PyProcInfo {
    PyProcInfo {
        runtime: i.runtime,
        py_none: i.py_none,
        code_type: i.code_type,
        tss_slot: i.tss_slot,
        version: i.version,
        tss_key: i.tss_key,
        runtime_tss_key: i.runtime_tss_key,
        runtime_interpreters_head: i.runtime_interpreters_head,
        interp_threads_head: i.interp_threads_head,
        tstate_next: i.tstate_next,
        tstate_thread_id: i.tstate_thread_id,
        tstate_native_thread_id: i.tstate_native_thread_id,
        tstate_frame: i.tstate_frame,
        cframe_current_frame: i.cframe_current_frame,
        frame_code: i.frame_code,
        frame_previous: i.frame_previous,
        frame_instr: i.frame_instr,
        frame_owner: i.frame_owner,
        frame_is_entry: i.frame_is_entry,
        owner_cstack: i.owner_cstack,
        frame_read_size: i.frame_read_size,
        object_type: i.object_type,
        code_firstlineno: i.code_firstlineno,
        code_filename: i.code_filename,
        code_name: i.code_name,
        code_qualname: i.code_qualname,
        code_linetable: i.code_linetable,
        code_adaptive: i.code_adaptive,
        unicode_length: i.unicode_length,
        unicode_state: i.unicode_state,
        unicode_ascii_data: i.unicode_ascii_data,
        unicode_compact_data: i.unicode_compact_data,
        bytes_size: i.bytes_size,
        bytes_data: i.bytes_data,
    }
}
