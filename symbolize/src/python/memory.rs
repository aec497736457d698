//! Reads of another process's memory through `process_vm_readv`.

use super::PythonError;

/// Another process's memory, read with `process_vm_readv(2)` (needs the right to ptrace
/// the process: the same user without Yama restrictions, or `CAP_SYS_PTRACE`).
#[derive(Clone, Copy, Debug)]
pub(crate) struct RemoteMemory {
    pub(crate) pid: u32,
}

impl RemoteMemory {
    /// Fills `buf` from `addr`; a short read is an error.
    pub(crate) fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), PythonError> {
        if buf.is_empty() {
            return Ok(());
        }
        let len = buf.len();
        let fail = |source| PythonError::Read { pid: self.pid, addr, len, source };
        let Ok(remote) = usize::try_from(addr) else {
            return Err(fail(std::io::Error::from_raw_os_error(libc::EFAULT)));
        };
        let local = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
        let remote = libc::iovec { iov_base: remote as *mut libc::c_void, iov_len: buf.len() };
        let Ok(pid) = libc::pid_t::try_from(self.pid) else {
            return Err(fail(std::io::Error::from_raw_os_error(libc::ESRCH)));
        };
        // SAFETY: `local` describes `buf`, which is valid for writes of its length; the
        // remote range is only read by the kernel, which checks it.
        let n = unsafe { libc::process_vm_readv(pid, &local, 1, &remote, 1, 0) };
        if n < 0 {
            return Err(fail(std::io::Error::last_os_error()));
        }
        if n as usize != buf.len() {
            return Err(fail(std::io::Error::from_raw_os_error(libc::EFAULT)));
        }
        Ok(())
    }

    pub(crate) fn vec(&self, addr: u64, len: usize) -> Result<Vec<u8>, PythonError> {
        let mut buf = vec![0; len];
        self.read(addr, &mut buf)?;
        Ok(buf)
    }

    pub(crate) fn u64(&self, addr: u64) -> Result<u64, PythonError> {
        let mut b = [0; 8];
        self.read(addr, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    pub(crate) fn u32(&self, addr: u64) -> Result<u32, PythonError> {
        let mut b = [0; 4];
        self.read(addr, &mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    /// `addr + offset`, or a read error when it overflows.
    pub(crate) fn at(&self, addr: u64, offset: u32) -> Result<u64, PythonError> {
        addr.checked_add(u64::from(offset)).ok_or(PythonError::Read {
            pid: self.pid,
            addr,
            len: 0,
            source: std::io::Error::from_raw_os_error(libc::EFAULT),
        })
    }
}
