#!/usr/bin/env bash
# Installs what building the BPF object and running the tests need. Idempotent and quick
# when everything is present. Debian 12 (bookworm) with rustup; run as root.
#   apt: LLVM 22 (bpf-linker's backend, llvm-dwarfdump/llvm-symbolizer oracles), binutils
#        (readelf, addr2line, nm), libc6-dbg and debuginfod (symbolization oracles), linux-perf, golang-go (go tool pprof), make, gcc, g++
#   rustup: nightly with rust-src (the BPF program is built with -Z build-std=core)
#   cargo: bpf-linker 0.13.0 built against LLVM 22, cargo-fuzz
set -euo pipefail
export PATH="$HOME/.cargo/bin:$PATH"

apt_packages=(llvm-22-dev libpolly-22-dev llvm-22 zlib1g-dev libzstd-dev binutils libc6-dbg debuginfod
              linux-perf golang-go make gcc g++)
missing=()
for p in "${apt_packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    echo "setup: installing ${missing[*]}"
    sudo_cmd=(); [[ $(id -u) -eq 0 ]] || sudo_cmd=(sudo)
    "${sudo_cmd[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if ! rustup toolchain list | grep -q '^nightly'; then
    rustup toolchain install nightly --profile minimal
fi
if ! rustup component list --toolchain nightly --installed | grep -q '^rust-src'; then
    rustup component add rust-src --toolchain nightly
fi

if ! bpf-linker --version 2>/dev/null | grep -q '0\.13\.0'; then
    echo "setup: building bpf-linker 0.13.0 for LLVM 22"
    LLVM_PREFIX=/usr/lib/llvm-22 cargo install bpf-linker --locked --version 0.13.0 \
        --no-default-features --features llvm-22
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "setup: installing cargo-fuzz"
    cargo install cargo-fuzz --locked --version 0.13.2
fi
echo "setup: ready"
