//! Records from the ring buffer are parsed with their lengths checked; any bytes give a
//! record or an error, never a panic or an out-of-bounds read.
#![no_main]
use libfuzzer_sys::fuzz_target;
use unwound_stackwalk_abi::SampleRecord;

fuzz_target!(|data: &[u8]| {
    if let Ok(r) = SampleRecord::parse(data) {
        let n = r.kernel.iter().count() + r.user.iter().count();
        assert_eq!(n, r.header.kernel_len as usize + r.header.user_len as usize);
        let _ = r.comm();
    }
});
