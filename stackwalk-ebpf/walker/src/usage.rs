//! The resources this process has used: a profiler's own overhead, for its summary.

use std::time::Duration;

/// CPU time and peak memory of the calling process.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    /// User + system CPU time.
    pub cpu: Duration,
    /// Peak resident set size, KiB.
    pub max_rss_kib: u64,
}

/// This process's [`Usage`] so far (`getrusage(RUSAGE_SELF)`).
pub fn own() -> Usage {
    // SAFETY: an all-zero rusage is a valid value; getrusage only fills the struct.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: a valid pointer to a rusage for the duration of the call.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) } != 0 {
        return Usage::default();
    }
    let tv =
        |t: libc::timeval| Duration::new(t.tv_sec.max(0) as u64, (t.tv_usec.clamp(0, 999_999) as u32) * 1000);
    Usage { cpu: tv(u.ru_utime) + tv(u.ru_stime), max_rss_kib: u.ru_maxrss.max(0) as u64 }
}

#[cfg(test)]
mod tests {
    #[test]
    fn cpu_time_grows_with_work_and_rss_is_read() {
        let before = super::own();
        let mut x = 0u64;
        let start = std::time::Instant::now();
        while start.elapsed() < std::time::Duration::from_millis(50) {
            x = std::hint::black_box(x.wrapping_add(1));
        }
        let after = super::own();
        assert!(after.cpu > before.cpu, "{before:?} -> {after:?}");
        assert!(after.max_rss_kib > 0);
    }
}
