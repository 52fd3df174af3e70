#!/usr/bin/env bash
# GPU benchmark of impasto in one prepared run: seconds per iteration and per forward pass, TFLOP/s,
# peak memory, for 256², 512², 1280×720 and 1920×1080 × f32, tf32, bf16 × channels-first/last, on
# random VGG-19 weights (the VGG-19 FLOP count is the reference; set IMPASTO_MODEL to use a weight
# file instead). Made for a GPU machine that has torch in its Python but no Rust toolchain, no network
# and perhaps no FFmpeg: the engine-only binary is built elsewhere and copied over.
#
# On the build machine (from the repository root):
#   export LIBTORCH=<torch 2.11 dir, e.g. .venv/lib/python3.11/site-packages/torch>
#   cargo build --release --no-default-features --bins --target-dir target/engine-only
#   mkdir -p target/gpu && strip -o target/gpu/impasto target/engine-only/release/impasto   # 8 MB, not 107
# Copy the working tree plus target/gpu/impasto (target/ is git-ignored) to the GPU machine, and there,
# from the repository root:
#   IMPASTO_BIN=target/gpu/impasto OUT=./bench-out bash benches/gpu.sh
# It writes to $OUT (default ./bench-out): probe.txt (what the machine is), gpu-bench.jsonl (one
# `impasto bench` JSON row per size, precision and layout), gpu-bench.md (the same as a table, with
# card, date, command and commit; memory: peak RSS, the CUDA caching allocator's max allocated, and
# the device memory in use; below it each precision and layout's iteration time fitted over the sizes
# as fixed + GFLOP / rate: the fixed part is what CUDA graphs could save), gpu-memory.jsonl/.md (1080p
# and 4K with and without tiles, one process each), gpu-batch.jsonl/.md (batches of 1–8 images at 512²
# and 720p; the losses read every iteration against every 5th (the default) and every 10th),
# gpu-jobs.jsonl/.md (1–4 jobs painting at once, in one shared batch and each in its own),
# gpu-flow.jsonl/.md (seconds for the optical flow into one frame at each size, which a video job
# measures beside the painting), gpu-painting.jsonl/.md (synthetic moving frames painted as a video
# job does, the flow measured inline or a frame ahead), gpu-optimizer.jsonl/.md (L-BFGS's proposals
# alone with a full memory), gpu-auto.jsonl (one row: what `--precision auto` becomes on this device)
# and gpu-bench.log (stderr of every command).
# benches/gpu_tables.py writes the tables.
#
# `--quick` (or IMPASTO_BENCH_QUICK=1) uses tiny sizes on the CPU, so the script itself can be tested
# where there is no GPU. Environment: IMPASTO_BIN, OUT, IMPASTO_MODEL, IMPASTO_DEVICE (default cuda:0),
# IMPASTO_BENCH_TIMEOUT (seconds per command, default 70), IMPASTO_BENCH_BUDGET (seconds for the whole
# run, default 450), IMPASTO_COMMIT (recorded commit when the tree has no .git).
set -uo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here"
started=$SECONDS

quick="${IMPASTO_BENCH_QUICK:-0}"
[[ "${1:-}" == "--quick" ]] && quick=1

out="${OUT:-./bench-out}"
bin="${IMPASTO_BIN:-target/engine-only/release/impasto}"
mkdir -p "$out"
jsonl="$out/gpu-bench.jsonl"
md="$out/gpu-bench.md"
log="$out/gpu-bench.log"
: >"$jsonl"
: >"$log"

if [[ "$quick" == 1 ]]; then
    sizes="32,48x32" device="cpu" iterations=1 warmup=1
    per_command="${IMPASTO_BENCH_TIMEOUT:-120}" budget="${IMPASTO_BENCH_BUDGET:-900}"
else
    sizes="256,512,1280x720,1920x1080" device="${IMPASTO_DEVICE:-cuda:0}" iterations=10 warmup=3
    per_command="${IMPASTO_BENCH_TIMEOUT:-70}" budget="${IMPASTO_BENCH_BUDGET:-450}"
fi
precisions=(f32 tf32 bf16)
layouts=(channels-first channels-last)

# What the machine is: the shared probe, when this tree has it beside or inside it.
probe=""
for candidate in "${IMPASTO_SHARED:-../shared}/device/probe.sh" shared/device/probe.sh; do
    [[ -f "$candidate" ]] && probe="$candidate" && break
done
if [[ -n "$probe" ]]; then
    timeout 60 bash "$probe" >"$out/probe.txt" 2>&1
else
    echo "no probe.sh found (looked in ${IMPASTO_SHARED:-../shared}/device and shared/device)" >"$out/probe.txt"
fi

# libtorch from the machine's own torch, so the copied binary finds libtorch_cpu/libtorch_cuda.
torch_dir="$(python3 -c 'import torch,os;print(os.path.dirname(torch.__file__))' 2>/dev/null || true)"
if [[ -n "$torch_dir" && -d "$torch_dir/lib" ]]; then
    export LD_LIBRARY_PATH="$torch_dir/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
echo "torch lib: ${torch_dir:-none from python3 (the rpath of the binary and LD_LIBRARY_PATH decide)}" | tee -a "$log"

if [[ ! -x "$bin" ]]; then
    echo "error: no impasto binary at '$bin' (set IMPASTO_BIN)" | tee -a "$log" >&2
    exit 2
fi

model_args=(--random vgg19)
[[ -n "${IMPASTO_MODEL:-}" ]] && model_args=()

card="$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)"
[[ "$device" == cpu || -z "$card" ]] && card="$device ($(nproc) CPU cores)"
commit="${IMPASTO_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}"
command_line="impasto bench --sizes $sizes --iterations $iterations --warmup $warmup --device $device ${model_args[*]} --precision P --layout L"

failures=0

# Runs one benchmark command, its stdout appended to FILE, under the per-command limit and what is
# left of the budget: `budgeted LABEL FILE COMMAND...`. Returns the command's exit status, or 125
# (after saying so) when the budget is spent.
budgeted() {
    local label="$1" file="$2"
    shift 2
    local left=$((budget - (SECONDS - started)))
    if ((left < 10)); then
        echo "skipped $label: the ${budget} s budget is spent" | tee -a "$log"
        return 125
    fi
    local limit=$((left < per_command ? left : per_command))
    echo "== $label (limit ${limit} s)" | tee -a "$log"
    timeout -k 5 "$limit" "$@" >>"$file" 2>>"$log"
}

# Counts a failed or skipped command of the main and batch tables.
count_failure() {
    local status="$1"
    ((status == 125)) || echo "   exit status $status (124: timed out; rows already printed are kept)" | tee -a "$log"
    failures=$((failures + 1))
}

for precision in "${precisions[@]}"; do
    for layout in "${layouts[@]}"; do
        budgeted "$precision $layout" "$jsonl" "$bin" bench --sizes "$sizes" --iterations "$iterations" \
            --warmup "$warmup" --device "$device" --precision "$precision" --layout "$layout" "${model_args[@]}" \
            || count_failure $?
    done
done

CARD="$card" COMMIT="$commit" COMMAND="$command_line" python3 benches/gpu_tables.py iterations "$jsonl" >"$md"

# What the default precision (auto: bf16 where the card computes it natively) becomes on this card.
auto_jsonl="$out/gpu-auto.jsonl"
: >"$auto_jsonl"
budgeted "precision auto" "$auto_jsonl" "$bin" bench --sizes "${sizes%%,*}" --iterations 1 --warmup 0 \
    --device "$device" --precision auto "${model_args[@]}" || count_failure $?
auto_resolved="$(python3 -c 'import json,sys; print(json.loads(sys.stdin.readline())["precision"])' <"$auto_jsonl" 2>/dev/null)"
echo "precision auto on $device: ${auto_resolved:-unknown}" | tee -a "$log"

# The optical flow into one frame (flow both ways, reliability, scene-cut test) at each size: a video
# job measures it on its own thread while the frame before is painted, so it is hidden while it takes
# less than a frame's optimisation. Several at once (as several segments' motion stages) show whether
# the flow's many small launches leave the card room for more.
flows_at_once="1,2,4"
[[ "$quick" == 1 ]] && flows_at_once="1,2"
flow_jsonl="$out/gpu-flow.jsonl"
flow_md="$out/gpu-flow.md"
: >"$flow_jsonl"
budgeted "flow $sizes" "$flow_jsonl" "$bin" bench --flow --sizes "$sizes" --at-once "$flows_at_once" \
    --iterations 3 --warmup 1 --device "$device" || count_failure $?
CARD="$card" COMMIT="$commit" python3 benches/gpu_tables.py flow "$flow_jsonl" >"$flow_md"

# L-BFGS's proposals alone, with its full memory of 100 pairs (as from a frame's 100th iteration on;
# at 4K the 26 that lbfgs_memory_mib allows in f32, 53 in bf16): what the optimiser adds to each
# iteration, in a few launches per 8 pairs, and the memory the pairs take; the pairs in f32 (what
# `auto` keeps on a GPU) and in bf16 (on a GPU widened chunk by chunk as they are read).
optimizer_jsonl="$out/gpu-optimizer.jsonl"
optimizer_md="$out/gpu-optimizer.md"
: >"$optimizer_jsonl"
optimizer_sizes="512,1280x720,3840x2160"
[[ "$quick" == 1 ]] && optimizer_sizes="32,48x32"
for pairs in f32 bf16; do
    budgeted "optimizer $optimizer_sizes, $pairs pairs" "$optimizer_jsonl" "$bin" bench --optimizer \
        --sizes "$optimizer_sizes" --lbfgs-pairs "$pairs" --iterations 5 --warmup 1 --device "$device" \
        || count_failure $?
done
CARD="$card" COMMIT="$commit" python3 benches/gpu_tables.py optimizer "$optimizer_jsonl" >"$optimizer_md"

# Synthetic moving frames painted as a video job paints them (flow mode, fixed iterations), the flow
# into each measured on the painting thread before it or a frame ahead on its own: bf16, channels-last.
painting_jsonl="$out/gpu-painting.jsonl"
painting_md="$out/gpu-painting.md"
: >"$painting_jsonl"
if [[ "$quick" == 1 ]]; then
    painting_sizes="32" painting_frames=3 painting_iterations=1
else
    painting_sizes="512,1280x720" painting_frames=6 painting_iterations=10
fi
budgeted "painting $painting_sizes, flow inline and ahead" "$painting_jsonl" "$bin" bench --motion inline,ahead \
    --sizes "$painting_sizes" --frames "$painting_frames" --iterations "$painting_iterations" --device "$device" \
    --precision bf16 --layout channels-last "${model_args[@]}" || count_failure $?
CARD="$card" COMMIT="$commit" python3 benches/gpu_tables.py painting "$painting_jsonl" >"$painting_md"

# Large frames: memory with and without tiles, each in its own process (the peaks are per process).
# A 4K frame without tiles may not fit a smaller card: that failure is reported, not counted.
memory_jsonl="$out/gpu-memory.jsonl"
memory_md="$out/gpu-memory.md"
: >"$memory_jsonl"
if [[ "$quick" == 1 ]]; then
    large=("160x96 0" "160x96 96" "320x192 96") large_iterations=1 large_warmup=0
else
    large=("1920x1080 0" "1920x1080 1024" "3840x2160 1024" "3840x2160 0") large_iterations=3 large_warmup=1
fi
for entry in "${large[@]}"; do
    read -r size tile <<<"$entry"
    budgeted "memory $size tile $tile" "$memory_jsonl" "$bin" bench --sizes "$size" --tile-size "$tile" \
        --iterations "$large_iterations" --warmup "$large_warmup" --device "$device" --precision f32 "${model_args[@]}"
    status=$?
    if ((status != 0 && status != 125)); then
        echo "   $size tile $tile: exit status $status (out of memory is expected for 4K without tiles on small cards)" \
            | tee -a "$log"
    fi
done
CARD="$card" COMMIT="$commit" python3 benches/gpu_tables.py memory "$memory_jsonl" >"$memory_md"

# Batches (several images in one forward and backward pass) and how often the losses are read (each
# read waits for the device): bf16, channels-last.
batch_jsonl="$out/gpu-batch.jsonl"
batch_md="$out/gpu-batch.md"
: >"$batch_jsonl"
if [[ "$quick" == 1 ]]; then
    batched=("32 1,2 0" "32 1 1" "32 1 3") batch_iterations=2 batch_warmup=1
else
    batched=("512 1,2,4,8 0" "1280x720 1,2,4 0" "256 1 1" "256 1 0" "256 1 10" "512 1 1") batch_iterations=10 batch_warmup=3
fi
for entry in "${batched[@]}"; do
    read -r size batches interval <<<"$entry"
    budgeted "batch $size × $batches, loss read interval $interval" "$batch_jsonl" "$bin" bench --sizes "$size" \
        --batch "$batches" --loss-read-interval "$interval" --iterations "$batch_iterations" \
        --warmup "$batch_warmup" --device "$device" --precision bf16 --layout channels-last "${model_args[@]}" \
        || count_failure $?
done
CARD="$card" COMMIT="$commit" python3 benches/gpu_tables.py batch "$batch_jsonl" >"$batch_md"

# Several jobs on one device, as the daemon's slots: their frames in one shared batch against each
# job's own batch on its own thread: bf16, channels-last.
jobs_jsonl="$out/gpu-jobs.jsonl"
jobs_md="$out/gpu-jobs.md"
: >"$jobs_jsonl"
if [[ "$quick" == 1 ]]; then
    job_sizes=("32 1,2") job_frames=2 job_iterations=1
else
    job_sizes=("256 1,4" "512 1,4" "1280x720 2") job_frames=3 job_iterations=10
fi
for entry in "${job_sizes[@]}"; do
    read -r size jobs <<<"$entry"
    for mode in shared own; do
        own=()
        [[ "$mode" == own ]] && own=(--own-batches)
        budgeted "jobs $size × $jobs, $mode batches" "$jobs_jsonl" "$bin" bench --sizes "$size" --jobs "$jobs" \
            "${own[@]}" --frames "$job_frames" --iterations "$job_iterations" --device "$device" --precision bf16 \
            --layout channels-last "${model_args[@]}" || count_failure $?
    done
done
CARD="$card" COMMIT="$commit" python3 benches/gpu_tables.py jobs "$jobs_jsonl" >"$jobs_md"

echo "rows: $(wc -l <"$jsonl"), failed or skipped commands: $failures, seconds: $((SECONDS - started))" | tee -a "$log"
cat "$md" "$memory_md" "$batch_md" "$jobs_md" "$flow_md" "$painting_md"
exit $((failures > 0 ? 1 : 0))
