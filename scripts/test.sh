#!/usr/bin/env bash
# The project's one test command (README; .ci/run calls it): installs what the tests need,
# proves the committed BPF object matches its source, builds the fixtures and runs every
# test. Tests that load BPF need root; under CI=true they fail rather than skip without it.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

scripts/setup.sh
scripts/build-bpf.sh --check
make -s -C fixtures -j"$(nproc)"
cargo fmt --all --check
cargo clippy --workspace --all-targets --release --quiet -- -D warnings
cargo test --workspace --release
scripts/fuzz-smoke.sh 15
