//! [`PyProcInfo`]: everything a walker outside the interpreter needs to find and walk a
//! thread's Python frames, and the per-frame rules ([`PyProcInfo::classify_frame`],
//! [`PyProcInfo::instruction_index`], [`code_checksum`]) that the kernel walker mirrors.

/// Marks an offset that does not exist in this interpreter version (e.g. `is_entry` on
/// 3.12+, the `_PyCFrame` indirection on 3.13).
pub const NO_OFFSET: u32 = u32::MAX;

/// What an out-of-process walker needs to know about one CPython process: addresses in the
/// process and field offsets of its interpreter version. Plain data, `#[repr(C)]`, the same
/// layout in userspace and in BPF.
///
/// How a sampled thread reaches its Python frames:
/// 1. `tstate = *(fsbase + tss_slot)` (the thread's pthread-key value; `fsbase` is the
///    thread's `%fs` base, which on x86-64 glibc is also its `pthread_self()`);
///    optionally check `*(tstate + tstate_native_thread_id) == tid` (an `unsigned long`).
/// 2. `frame = *(tstate + tstate_frame)`; where `cframe_current_frame != NO_OFFSET`
///    (3.11, 3.12) that is a `_PyCFrame *` and `frame = *(frame + cframe_current_frame)`.
/// 3. Per frame, read `frame_read_size` bytes at `frame` and apply
///    [`classify_frame`](Self::classify_frame); the next frame is `*(frame + frame_previous)`;
///    0 ends the chain.
///
/// Offsets are in bytes; [`NO_OFFSET`] marks a field the version does not have.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PyProcInfo {
    /// Address of `_PyRuntime` (the `_PyRuntimeState`) in the process.
    pub runtime: u64,
    /// Address of `_Py_NoneStruct` (`Py_None`) in the process: on 3.13 the executable of a
    /// C-stack entry frame.
    pub py_none: u64,
    /// Address of `PyCode_Type` in the process: the `ob_type` of every code object.
    pub code_type: u64,
    /// Offset from the thread's `%fs` base of its value for the interpreter's pthread key
    /// (glibc: `0x310 + 16 * tss_key + 8` for keys below 32): that value is the thread's own
    /// `PyThreadState *`, set for every thread the interpreter knows, holding the GIL or not.
    pub tss_slot: u64,
    /// The interpreter's version, `PY_VERSION_HEX` (e.g. `0x030b02f0` for 3.11.2).
    pub version: u32,
    /// The pthread key of `_PyRuntime.autoTSSkey`, read from the process.
    pub tss_key: u32,
    /// Offset in `_PyRuntime` of that pthread key (`autoTSSkey._key`, 4 past `autoTSSkey`).
    pub runtime_tss_key: u32,
    /// Offset in `_PyRuntime` of `interpreters.head` (`PyInterpreterState *`).
    pub runtime_interpreters_head: u32,
    /// Offset in `PyInterpreterState` of `threads.head` (`PyThreadState *`).
    pub interp_threads_head: u32,
    /// Offset in `PyThreadState` of `next` (`PyThreadState *`).
    pub tstate_next: u32,
    /// Offset in `PyThreadState` of `thread_id` (`unsigned long`, the `pthread_t`, which is
    /// the thread's `%fs` base on x86-64 glibc).
    pub tstate_thread_id: u32,
    /// Offset in `PyThreadState` of `native_thread_id` (`unsigned long`, the kernel TID as
    /// seen in the process's PID namespace).
    pub tstate_native_thread_id: u32,
    /// Offset in `PyThreadState` of the frame chain's start: `cframe` (`_PyCFrame *`) on
    /// 3.11/3.12, `current_frame` (`_PyInterpreterFrame *`) on 3.13.
    pub tstate_frame: u32,
    /// Offset in `_PyCFrame` of `current_frame` (3.11: 8, 3.12: 0); [`NO_OFFSET`] on 3.13.
    pub cframe_current_frame: u32,
    /// Offset in `_PyInterpreterFrame` of the code object (`f_code`, 3.13: `f_executable`).
    pub frame_code: u32,
    /// Offset in `_PyInterpreterFrame` of `previous` (the caller's frame).
    pub frame_previous: u32,
    /// Offset in `_PyInterpreterFrame` of the instruction pointer (`prev_instr` on
    /// 3.11/3.12, `instr_ptr` on 3.13); see [`instruction_index`](Self::instruction_index).
    pub frame_instr: u32,
    /// Offset in `_PyInterpreterFrame` of `owner` (one byte).
    pub frame_owner: u32,
    /// Offset in `_PyInterpreterFrame` of `is_entry` (one byte, 3.11 only: nonzero on the
    /// last frame run by its `_PyEval_EvalFrameDefault` activation); [`NO_OFFSET`] on 3.12+.
    pub frame_is_entry: u32,
    /// The `owner` value of a C-stack entry frame (`FRAME_OWNED_BY_CSTACK`, 3 on 3.12 and
    /// 3.13), which marks the end of an activation's frames and is not a Python frame;
    /// [`NO_OFFSET`] on 3.11.
    pub owner_cstack: u32,
    /// Bytes to read at a frame to see all the fields above (at least
    /// `max(frame_code, frame_previous, frame_instr) + 8` and past `owner`/`is_entry`).
    pub frame_read_size: u32,
    /// Offset in `PyObject` of `ob_type`.
    pub object_type: u32,
    /// Offset in `PyCodeObject` of `co_firstlineno` (`int`).
    pub code_firstlineno: u32,
    /// Offset in `PyCodeObject` of `co_filename` (`str *`).
    pub code_filename: u32,
    /// Offset in `PyCodeObject` of `co_name` (`str *`).
    pub code_name: u32,
    /// Offset in `PyCodeObject` of `co_qualname` (`str *`).
    pub code_qualname: u32,
    /// Offset in `PyCodeObject` of `co_linetable` (`bytes *`).
    pub code_linetable: u32,
    /// Offset in `PyCodeObject` of `co_code_adaptive`, the first instruction (also
    /// `PyCode_Type.tp_basicsize`).
    pub code_adaptive: u32,
    /// Offset in `PyASCIIObject` of `length` (in characters).
    pub unicode_length: u32,
    /// Offset in `PyASCIIObject` of `state` (kind in bits 2–4, compact bit 5, ascii bit 6).
    pub unicode_state: u32,
    /// Offset of the characters of a compact ASCII string (`sizeof(PyASCIIObject)`).
    pub unicode_ascii_data: u32,
    /// Offset of the characters of a compact non-ASCII string
    /// (`sizeof(PyCompactUnicodeObject)`).
    pub unicode_compact_data: u32,
    /// Offset in `PyBytesObject` of `ob_size` (length in bytes).
    pub bytes_size: u32,
    /// Offset in `PyBytesObject` of `ob_sval` (the bytes).
    pub bytes_data: u32,
}

const _: () = assert!(std::mem::size_of::<PyProcInfo>() == 4 * 8 + 30 * 4);

/// What one `_PyInterpreterFrame` is, by [`PyProcInfo::classify_frame`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameClass {
    /// A Python frame: its code object and instruction pointer.
    Python {
        /// Address of the code object (`PyCodeObject *`).
        code: u64,
        /// The frame's instruction pointer (`prev_instr`/`instr_ptr`).
        instr: u64,
        /// 3.11: the last frame its `_PyEval_EvalFrameDefault` activation runs (`is_entry`).
        /// Always false on 3.12+, where a [`CStackEntry`](FrameClass::CStackEntry) frame
        /// follows the group instead.
        entry: bool,
    },
    /// A C-stack entry frame (3.12+: `owner == FRAME_OWNED_BY_CSTACK`; 3.13: also an
    /// executable that is `Py_None`): it lives in the C stack frame of the
    /// `_PyEval_EvalFrameDefault` activation that runs the Python frames before it. Not
    /// shown.
    CStackEntry,
}

impl PyProcInfo {
    /// Classifies the frame whose first bytes are `header` (read at the frame's address,
    /// [`frame_read_size`](Self::frame_read_size) long). `None` when `header` is too short.
    pub fn classify_frame(&self, header: &[u8]) -> Option<FrameClass> {
        let code = read_u64(header, self.frame_code)?;
        let instr = read_u64(header, self.frame_instr)?;
        if self.owner_cstack != NO_OFFSET {
            let owner = *header.get(usize::try_from(self.frame_owner).ok()?)?;
            if u32::from(owner) == self.owner_cstack || code == self.py_none {
                return Some(FrameClass::CStackEntry);
            }
        }
        let entry = match self.frame_is_entry {
            NO_OFFSET => false,
            at => *header.get(usize::try_from(at).ok()?)? != 0,
        };
        Some(FrameClass::Python { code, instr, entry })
    }

    /// The previous (calling) frame's address from a frame's `header`; 0 ends the chain.
    pub fn previous_frame(&self, header: &[u8]) -> Option<u64> {
        read_u64(header, self.frame_previous)
    }

    /// The index in code units (`_Py_CODEUNIT`, 2 bytes) of the instruction a frame is at,
    /// from its code object's address and instruction pointer: `(instr − (code +
    /// code_adaptive)) / 2`. −1 before the first instruction (3.11/3.12 `prev_instr`
    /// starts one unit before the code); `None` when the pointer is not plausibly inside
    /// the code (more than 2^30 units away).
    pub fn instruction_index(&self, code: u64, instr: u64) -> Option<i64> {
        let start = code.checked_add(u64::from(self.code_adaptive))?;
        let delta = instr.wrapping_sub(start) as i64;
        let index = delta.div_euclid(2);
        (-1..1 << 30).contains(&index).then_some(index)
    }
}

/// The check value of a code object that detects a freed and reused one: a function of
/// its `co_firstlineno`, `co_filename` pointer and `co_qualname` pointer, read when the
/// frame was sampled and again when the code object is read for its names.
///
/// `(filename ^ rotl(qualname, 32) ^ (firstlineno << 1)) * 0x9E3779B97F4A7C15` (wrapping):
/// xor, shifts and one multiplication, so a BPF program computes it the same way.
///
/// ```
/// use unwound_symbolize::python::code_checksum;
/// let a = code_checksum(10, 0x7f00_0000_1000, 0x7f00_0000_2000);
/// assert_ne!(a, code_checksum(11, 0x7f00_0000_1000, 0x7f00_0000_2000));
/// assert_ne!(a, code_checksum(10, 0x7f00_0000_2000, 0x7f00_0000_1000));
/// ```
pub const fn code_checksum(firstlineno: u32, filename_ptr: u64, qualname_ptr: u64) -> u64 {
    (filename_ptr ^ qualname_ptr.rotate_left(32) ^ ((firstlineno as u64) << 1))
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

fn read_u64(bytes: &[u8], at: u32) -> Option<u64> {
    let at = usize::try_from(at).ok()?;
    let b = bytes.get(at..at.checked_add(8)?)?;
    Some(u64::from_le_bytes(b.try_into().ok()?))
}
