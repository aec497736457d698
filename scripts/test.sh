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
# Every crate meant for crates.io packages and builds as crates.io would see it (workspace
# dependencies through a local overlay; members with publish = false are skipped). The agent
# is publishable too but left out here: its build would double this step. --allow-dirty: the
# packages are checked, not the working tree (a local run before committing). The build is a
# dev one of its own, so without debug info; the docs reuse clippy's release checks.
# Cargo treats the overlay's packages like any registry's, as immutable per version: it reuses
# their extracted sources ($CARGO_HOME/registry/src/<overlay>/NAME-VERSION) and their compiled
# artifacts, so a change without a version bump would be verified against an earlier run's.
# Our crates are on no registry: those copies go, and the check builds in a target of its own.
rm -rf "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/unwound-*-0.* \
    "${CARGO_HOME:-$HOME/.cargo}"/registry/cache/*/unwound-*-0.*.crate target/publish-check
CARGO_TARGET_DIR=target/publish-check CARGO_PROFILE_DEV_DEBUG=false \
    cargo publish --dry-run --allow-dirty --quiet --workspace --exclude unwound-agent
RUSTDOCFLAGS="-D warnings" cargo doc --release --no-deps --quiet -p unwound-stackwalk-abi \
    -p unwound-unwind-tables -p unwound-symbolize -p unwound-stackwalk -p unwound-export
cargo test --workspace --release
scripts/fuzz-smoke.sh 15
