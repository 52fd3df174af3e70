#!/usr/bin/env bash
# The main job on a bundled sample, from a fresh machine: installs what is missing, builds, and paints
# the bundled 2-second Big Buck Bunny clip in the style of The Starry Night into out/bunny-starry.mp4
# (with its audio), plus a still, samples/images/chelsea.png, into out/chelsea-starry.png.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here"
eval "$(bash scripts/setup.sh)"
cargo build --release --bins
shared_model="$here/../shared/models/vgg16_hed.safetensors"
if [ -z "${IMPASTO_MODEL:-}" ] && [ -f "$shared_model" ]; then export IMPASTO_MODEL="$shared_model"; fi
mkdir -p out
echo "demo: painting samples/video/bigbuckbunny-2s.mp4 (about 4 minutes on a 2-core CPU)" >&2
OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" ./target/release/impasto video samples/video/bigbuckbunny-2s.mp4 \
  --style samples/images/starry_night.jpg --profile quick -o out/bunny-starry.mp4 --report out/bunny-starry.json "$@"
echo "demo: painting samples/images/chelsea.png (about 1 minute)" >&2
./target/release/impasto image samples/images/chelsea.png --style samples/images/starry_night.jpg \
  --profile quick -o out/chelsea-starry.png
./target/release/impasto score samples/images/chelsea.png samples/images/starry_night.jpg out/chelsea-starry.png
echo "demo: wrote out/bunny-starry.mp4, out/bunny-starry.json and out/chelsea-starry.png" >&2
