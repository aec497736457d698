#!/usr/bin/env bash
# Rebuilds the BPF object the walker crate (unwound-stackwalk) embeds (stackwalk-ebpf/walker/bpf/stackwalk.bpf.o) from
# stackwalk-ebpf/. Needs nightly + rust-src + bpf-linker (scripts/setup.sh).
#
#   scripts/build-bpf.sh          rebuild and replace the committed object
#   scripts/build-bpf.sh --check  rebuild; fail if it differs from the committed object
#
# Reproducible wherever the checkout lives: cargo hashes a path crate's absolute location
# into its symbol names, so the sources are copied to one fixed build directory first, and
# the registry and sysroot paths are remapped out of the debug info and BTF.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
committed="$root/stackwalk-ebpf/walker/bpf/stackwalk.bpf.o"
build="${UNWOUND_BPF_BUILD_DIR:-/tmp/unwound-bpf-build}"
export PATH="$HOME/.cargo/bin:$PATH"
cargo_home="${CARGO_HOME:-$HOME/.cargo}"
sysroot="$(rustc +nightly --print sysroot)"

rm -rf "$build/src"
mkdir -p "$build/src/stackwalk-ebpf"
tar -C "$root" --exclude=target -cf - stackwalk-ebpf/abi stackwalk-ebpf/program unwind-tables \
    | tar -C "$build/src" -xf -

export CARGO_TARGET_DIR="$build/target"
# --export keeps the global BPF functions the walker calls (see unwound_lookup_rule).
export RUSTFLAGS="-C debuginfo=2 -C link-arg=--btf -C link-arg=--export=unwound_lookup_rule -C link-arg=--export=unwound_kernel_mapping \
 --remap-path-prefix=$build/src=/unwound \
 --remap-path-prefix=$cargo_home/registry/src=/cargo \
 --remap-path-prefix=$sysroot=/rust"
(cd "$build/src/stackwalk-ebpf/program" && cargo +nightly build --quiet --locked --release \
    --target bpfel-unknown-none -Z build-std=core)
built="$CARGO_TARGET_DIR/bpfel-unknown-none/release/stackwalk"
if [[ "${1:-}" == "--check" ]]; then
    if ! cmp -s "$built" "$committed"; then
        echo "error: stackwalk-ebpf/walker/bpf/stackwalk.bpf.o does not match stackwalk-ebpf/;" \
             "run scripts/build-bpf.sh and commit the result" >&2
        exit 1
    fi
    echo "BPF object matches its source ($(stat -c %s "$committed") bytes)"
else
    mkdir -p "$(dirname "$committed")"
    cp "$built" "$committed"
    echo "wrote $committed ($(stat -c %s "$committed") bytes)"
fi
