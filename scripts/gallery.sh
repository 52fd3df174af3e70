#!/usr/bin/env bash
# Rebuilds docs/gallery: every shared photo with every shared painting at 256 px with the default
# settings (200 iterations), and the score of each (docs/gallery/scores.md). Needs ../shared.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here"
eval "$(bash scripts/setup.sh 2>/dev/null)"
cargo build --release --bins -q
shared="${IMPASTO_SHARED:-$here/../shared}"
export IMPASTO_MODEL="${IMPASTO_MODEL:-$shared/models/vgg16_hed.safetensors}"
out=docs/gallery; mkdir -p "$out"
bin=./target/release/impasto
{
  echo "| content | style | style distance | content distance | seconds |"
  echo "|---|---|---|---|---|"
  for photo in "$shared"/media/photos/*; do
    for painting in "$shared"/media/paintings/*; do
      name="$(basename "${photo%.*}")-$(basename "${painting%.*}")"
      start=$(date +%s.%N)
      "$bin" image "$photo" --style "$painting" --size 256 --iterations 200 -o "$out/$name.png" --json > /dev/null
      seconds=$(echo "$(date +%s.%N) - $start" | bc)
      read -r s c < <("$bin" score "$photo" "$painting" "$out/$name.png" --json | python3 -c 'import json,sys; d=json.load(sys.stdin); print(d["style"], d["content"])')
      printf '| %s | %s | %.3f | %.3f | %.0f |\n' "$(basename "$photo")" "$(basename "$painting")" "$s" "$c" "$seconds"
    done
  done
} | tee "$out/scores.md"
