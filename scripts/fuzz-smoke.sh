#!/usr/bin/env bash
# Runs every fuzz target briefly (default 20 s each). Needs cargo-fuzz and nightly
# (scripts/setup.sh installs both). A crash fails the script.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
seconds="${1:-20}"
# Seed the DWARF target with a real binary (not committed: fixtures are built by make).
mkdir -p corpus/debuginfo
cp -f ../target/fixtures/chain_nofp corpus/debuginfo/chain_nofp 2>/dev/null || true
for target in $(cargo +nightly fuzz list); do
    echo "fuzz: $target for ${seconds}s"
    log="$(mktemp)"
    if ! cargo +nightly fuzz run "$target" -- -max_total_time="$seconds" -rss_limit_mb=2048 >"$log" 2>&1; then
        # The panic and the input that caused it (kept under fuzz/artifacts/).
        grep -A3 -m1 'panicked' "$log" || true
        grep -m1 -A2 'Reproduce with' "$log" || tail -20 "$log"
        rm -f "$log"
        exit 1
    fi
    tail -1 "$log"
    rm -f "$log"
done
