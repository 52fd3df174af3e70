#!/usr/bin/env bash
# Runs impasto's whole test suite on a fresh machine: installs what is missing (scripts/setup.sh),
# builds, checks that the engine-only build (no FFmpeg) still compiles, and runs every test.
# Extra arguments go to the test harness (e.g. a test-name filter).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here"
eval "$(bash scripts/setup.sh)"
export IMPASTO_SHARED="${IMPASTO_SHARED:-$here/../shared}"
# what the tests' in-process engines cache (normalisation, the CPU's bf16 measurement) stays in the
# build folder, never in the user's ~/.cache/impasto; commands the tests start get their own folders
export IMPASTO_CACHE_DIR="$here/target/test-cache"
# the engine-only build first, in the same target directory (it shares torch-sys and most crates
# with the full build); the full build then puts the full binary back in place for the tests
cargo build --release --no-default-features --bins
cargo build --release --bins
cargo test --release -- --test-threads=2 "$@"
