#!/usr/bin/env bash
# Installs what building the BPF object and running the tests need. Idempotent and quick
# when everything is present. Debian 12 (bookworm) with rustup; run as root.
#   apt: LLVM 22 (bpf-linker's backend, llvm-dwarfdump/llvm-symbolizer oracles), binutils
#        (readelf, addr2line, nm), libc6-dbg and debuginfod (symbolization oracles), linux-perf, golang-go (go tool pprof), make, gcc, g++,
#        qemu-system-x86, busybox-static and cpio (the older-kernel test boots Debian 12's 6.1 kernel)
#   Debian 12's 6.1 cloud kernel, unpacked (not installed) into $UNWOUND_KERNEL_DIR
#        (default ~/.cache/unwound/kernel): the older-kernel test boots it under qemu
#   rustup: nightly with rust-src (the BPF program is built with -Z build-std=core)
#   cargo: bpf-linker 0.13.0 built against LLVM 22, cargo-fuzz
#   PyPI: opentelemetry-proto in a venv (~/.cache/unwound/otlp-venv) for the OTLP test double,
#         py-spy 0.4.3 in ~/.cache/unwound/venv for the Python frame tests
set -euo pipefail
export PATH="$HOME/.cargo/bin:$PATH"

apt_packages=(llvm-22-dev libpolly-22-dev llvm-22 zlib1g-dev libzstd-dev binutils libc6-dbg debuginfod
              linux-perf golang-go make gcc g++ qemu-system-x86 busybox-static cpio)
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

# The JIT tests' runtimes (agent/tests/jit.rs): this machine kind has Node 20, OpenJDK 17 and
# pyenv's CPython 3.12 on its image; where one is missing, Debian's Node and OpenJDK stand in
# (CPython 3.12 has no Debian 12 package: the test says so).
jit_missing=()
command -v node >/dev/null || jit_missing+=(nodejs)
{ command -v javac && command -v jcmd; } >/dev/null || jit_missing+=(openjdk-17-jdk-headless)
if ((${#jit_missing[@]})); then
    echo "setup: installing ${jit_missing[*]}"
    sudo_cmd=(); [[ $(id -u) -eq 0 ]] || sudo_cmd=(sudo)
    "${sudo_cmd[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq "${jit_missing[@]}" >/dev/null
fi

# Debian 12's own kernel (6.1, cloud flavour, with BTF) for agent/tests/older_kernel.rs. Only
# the vmlinuz is kept; the package is unpacked into the cache, never installed on this machine.
kernel_dir=${UNWOUND_KERNEL_DIR:-$HOME/.cache/unwound/kernel}
if ! compgen -G "$kernel_dir/vmlinuz-6.1.*-cloud-amd64" >/dev/null; then
    pkg=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null | sed -n 's/.*Depends: \(linux-image-6\.1\.[^ ]*-cloud-amd64\).*/\1/p' | head -1)
    [[ -n $pkg ]] || { echo "setup: no Debian 6.1 cloud kernel package found (linux-image-cloud-amd64)" >&2; exit 1; }
    echo "setup: fetching $pkg for the older-kernel test"
    work=$(mktemp -d)
    (cd "$work" && chmod 777 . && apt-get download -qq "$pkg")
    dpkg-deb -x "$work"/*.deb "$work/x"
    mkdir -p "$kernel_dir"
    cp "$work"/x/boot/vmlinuz-* "$kernel_dir/"
    rm -rf "$work"
fi
# The OTLP test double (agent/export/tests/otlp_check.py) decodes with PyPI's official
# opentelemetry-proto types, in a venv of its own.
otlp_venv=${UNWOUND_OTLP_VENV:-$HOME/.cache/unwound/otlp-venv}
if ! "$otlp_venv/bin/python" -c 'import opentelemetry.proto.profiles.v1development.profiles_pb2' 2>/dev/null; then
    echo "setup: installing opentelemetry-proto into $otlp_venv"
    python3 -m venv "$otlp_venv"
    "$otlp_venv/bin/pip" install -q 'opentelemetry-proto==1.45.2'
fi
# py-spy, the peer the Python frame tests compare with (symbolize/tests/python_frames.rs).
py_venv=$HOME/.cache/unwound/venv
if ! "$py_venv/bin/py-spy" --version 2>/dev/null | grep -q '^py-spy 0\.4\.'; then
    echo "setup: installing py-spy into $py_venv"
    python3 -m venv "$py_venv"
    "$py_venv/bin/pip" install -q 'py-spy==0.4.3'
fi
echo "setup: ready"
