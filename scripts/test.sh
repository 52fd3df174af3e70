#!/usr/bin/env bash
# Runs impasto's whole test suite on a fresh machine: installs what is missing (scripts/setup.sh),
# builds, checks that the engine-only build (no FFmpeg) still compiles, and runs every test.
# Extra arguments go to the test harness (e.g. a test-name filter).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here"
eval "$(bash scripts/setup.sh)"
export IMPASTO_SHARED="${IMPASTO_SHARED:-$here/../shared}"
cargo build --release --bins
cargo build --release --no-default-features --bins --target-dir target/engine-only
cargo test --release -- --test-threads=2 "$@"
