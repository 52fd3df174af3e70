#!/usr/bin/env bash
# The main job on a bundled sample, from a fresh machine: installs what is missing, builds, and paints
# samples/images/chelsea.png in the style of The Starry Night into out/chelsea-starry.png.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here"
eval "$(bash scripts/setup.sh)"
cargo build --release --bins
shared_model="$here/../shared/models/vgg16_hed.safetensors"
if [ -z "${IMPASTO_MODEL:-}" ] && [ -f "$shared_model" ]; then export IMPASTO_MODEL="$shared_model"; fi
mkdir -p out
echo "demo: painting samples/images/chelsea.png (about 2 minutes on a 2-core CPU)" >&2
./target/release/impasto image samples/images/chelsea.png --style samples/images/starry_night.jpg \
  --profile quick -o out/chelsea-starry.png "$@"
./target/release/impasto score samples/images/chelsea.png samples/images/starry_night.jpg out/chelsea-starry.png
echo "demo: wrote out/chelsea-starry.png" >&2
