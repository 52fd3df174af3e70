#!/usr/bin/env bash
# A live stream, measured: the ffmpeg CLI sends a clip in real time (-re) as MPEG-TS over TCP,
# `impasto stream` paints it live and sends it on over UDP, and its summary line (JSON) says how many
# frames it painted and dropped, seconds per painted frame and how far the output ran behind the
# input. One line per size.
#
#   benches/stream.sh [CLIP] [SIZES] [EXTRA impasto FLAGS...]
#   benches/stream.sh ../shared/media/video/bikes.mp4 "128 256" --profile quick --device cpu
#
# Needs IMPASTO_MODEL (or --model), the ffmpeg CLI and a built binary (IMPASTO_BIN, default
# target/release/impasto).
set -euo pipefail

here="$(cd "$(dirname "$0")/.." && pwd)"
bin="${IMPASTO_BIN:-$here/target/release/impasto}"
clip="${1:-$here/samples/video/bigbuckbunny-2s.mp4}"
sizes="${2:-128 256}"
shift $(($# > 2 ? 2 : $#))
style="$here/samples/images/starry_night.jpg"
fps="$(ffprobe -v error -select_streams v:0 -show_entries stream=avg_frame_rate -of csv=p=0 "$clip")"
port_in=$((20000 + RANDOM % 10000))
port_out=$((port_in + 1))

for size in $sizes; do
    summary="$(mktemp)"
    "$bin" stream "tcp://127.0.0.1:$port_in?listen" --style "$style" -o "udp://127.0.0.1:$port_out" \
        --size "$size" --json "$@" > "$summary" &
    painter=$!
    sleep 2 # the painter loads the network, then listens
    ffmpeg -v error -re -i "$clip" -c:v libx264 -preset veryfast -g 25 -c:a aac -f mpegts "tcp://127.0.0.1:$port_in"
    wait "$painter"
    grep '"event":"summary"' "$summary" | python3 -c '
import json, sys
from fractions import Fraction
size, fps = int(sys.argv[1]), float(Fraction(sys.argv[2]))
s = json.loads(sys.stdin.read())
print(json.dumps({"size": size, "input_fps": round(fps, 2), "frames_in": s["frames_in"],
    "painted": s["frames_painted"], "dropped": s["frames_dropped"],
    "painted_fps": round(fps * s["frames_painted"] / max(s["frames_in"], 1), 2),
    "seconds_per_frame": round(s["seconds_per_frame"], 3), "mean_latency_s": round(s["mean_latency"], 3)}))
' "$size" "$fps"
    rm -f "$summary"
    port_in=$((port_in + 2))
    port_out=$((port_out + 2))
done
