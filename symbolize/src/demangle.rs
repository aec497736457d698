//! [`demangle`]: Rust and C++ symbol names as people read them.

/// Demangles a Rust (legacy or v0) or C++ (Itanium) symbol name; other names are returned
/// as they are. Rust hashes are left out.
///
/// C++ names, with the `libiberty-demangle` feature (a default one), come out exactly as
/// binutils' `nm -C` and `addr2line -C` print them: they are demangled by libiberty's
/// demangler, which the C++ runtime exports as `__cxa_demangle`. Without that feature, and
/// for names longer than 16 KiB, they go through the pure-Rust `cpp_demangle` crate, which
/// can spell some names differently (`std::` abbreviations, thunks); a name neither
/// demangler accepts is returned mangled.
///
/// ```
/// assert_eq!(unwound_symbolize::demangle("_ZN3foo3barE"), "foo::bar");
/// assert_eq!(unwound_symbolize::demangle("_ZN4fixt7chain_aEm"), "fixt::chain_a(unsigned long)");
/// if cfg!(feature = "libiberty-demangle") {
///     assert_eq!(unwound_symbolize::demangle("_ZNSi6ignoreEv"), "std::istream::ignore()");
/// }
/// assert_eq!(unwound_symbolize::demangle("main"), "main");
/// ```
pub fn demangle(name: &str) -> String {
    if let Ok(d) = rustc_demangle::try_demangle(name) {
        return format!("{d:#}");
    }
    if name.starts_with("_Z") {
        #[cfg(feature = "libiberty-demangle")]
        if let Some(s) = libiberty::demangle(name) {
            return s;
        }
        if let Ok(sym) = cpp_demangle::Symbol::new(name) {
            if let Ok(s) = sym.demangle() {
                return s;
            }
        }
    }
    name.to_string()
}

#[cfg(feature = "libiberty-demangle")]
mod libiberty {
    use std::ffi::{c_char, c_int, CStr, CString};

    /// Longest name handed to the C++ runtime's demangler; longer ones go to `cpp_demangle`.
    const MAX_NAME: usize = 16 * 1024;

    #[link(name = "stdc++")]
    extern "C" {
        fn __cxa_demangle(
            mangled: *const c_char,
            output: *mut c_char,
            length: *mut usize,
            status: *mut c_int,
        ) -> *mut c_char;
    }

    extern "C" {
        fn free(p: *mut std::ffi::c_void);
    }

    /// The C++ runtime's demangling of `name`, or `None` when it refuses it.
    pub(super) fn demangle(name: &str) -> Option<String> {
        if name.len() > MAX_NAME {
            return None;
        }
        let c = CString::new(name).ok()?;
        let mut status: c_int = 0;
        // SAFETY: NUL-terminated input; a null output buffer asks the runtime to allocate
        // one, which we free with the C allocator it came from.
        unsafe {
            let out = __cxa_demangle(c.as_ptr(), std::ptr::null_mut(), std::ptr::null_mut(), &mut status);
            if out.is_null() {
                return None;
            }
            let s = (status == 0).then(|| CStr::from_ptr(out).to_string_lossy().into_owned());
            free(out.cast());
            s
        }
    }
}
