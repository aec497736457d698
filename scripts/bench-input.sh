#!/usr/bin/env bash
# Fetches the symbolize benchmark's input: the separate debuginfo of Debian's ceph-mon
# (package ceph-mon-dbg, ~150 MB download; GCC 12 C++, DWARF 5, about 280 MiB of DWARF once
# its zlib-compressed sections are inflated). Prints the path of the inflated copy.
# Idempotent: quick when the file is there. Needs apt-get, dpkg-deb and objcopy.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
dir="${CARGO_TARGET_DIR:-$root/target}/bench-inputs"
out="$dir/ceph-mon.debug"
if [[ -s "$out" ]]; then
    echo "$out"
    exit 0
fi
mkdir -p "$dir"
cd "$dir"
rm -rf deb x
mkdir deb
# apt-get download writes as the _apt user when it can; a root-owned directory is fine too.
(cd deb && apt-get download -q ceph-mon-dbg >&2)
dpkg-deb -x deb/ceph-mon-dbg_*.deb x
# The package holds the debug files of ceph-mon and of a smaller tool; the largest is ceph-mon's.
big="$(find x -name '*.debug' -type f -printf '%s %p\n' | sort -n | tail -1 | cut -d' ' -f2-)"
[[ -n "$big" ]] || { echo "bench-input: no .debug file in ceph-mon-dbg" >&2; exit 1; }
objcopy --decompress-debug-sections "$big" "$out.tmp"
mv "$out.tmp" "$out"
rm -rf deb x
echo "$out"
