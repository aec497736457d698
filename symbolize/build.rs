// The C++ runtime provides `__cxa_demangle` (libiberty's demangler, the one binutils uses).
fn main() {
    println!("cargo:rustc-link-lib=dylib=stdc++");
}
