"""Markdown tables of the JSON rows `impasto bench` prints, for benches/gpu.sh.

Usage: gpu_tables.py iterations|memory|batch|jobs|flow|painting ROWS.jsonl; the card, commit and (for the main table)
command come from the CARD, COMMIT and COMMAND environment variables. Lines that are not JSON rows
(a failed command's output) are skipped.
"""

import datetime
import json
import os
import sys

LAYOUTS = {"ChannelsFirst": "channels-first", "ChannelsLast": "channels-last"}


def mib(value):
    return "–" if value is None else f"{value:.0f}"


def size(row):
    return f"{row['width']}²" if row["width"] == row["height"] else f"{row['width']}×{row['height']}"


def memory(row):
    """The CUDA max allocated and in-use columns."""
    return f"{mib(row.get('cuda_max_allocated_mib'))} | {mib(row.get('cuda_peak_mib'))}"


def table(header, lines):
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for line in lines:
        print(f"| {line} |")


def iterations(rows):
    print(f"Command: `{os.environ['COMMAND']}`")
    print()
    header = ["precision", "layout", "size", "s/iteration", "s/forward", "TFLOP/s", "peak RSS MiB",
              "CUDA max allocated MiB", "CUDA in use MiB"]
    table(header, (f"{r['precision']} | {LAYOUTS.get(r['layout'], r['layout'])} | {size(r)} "
                   f"| {r['seconds_per_iteration']:.4f} | {r['seconds_per_forward']:.4f} | {r['tflops']:.2f} "
                   f"| {r['peak_rss_mib']:.0f} | {memory(r)}" for r in rows))
    fixed_costs(rows)


def fixed_costs(rows):
    """Each precision and layout's iteration time fitted over the sizes as fixed + FLOP / rate (least
    squares): the fixed part is what does not grow with the work (kernel launches and host work that the
    device waits for), what CUDA graphs could take away; the rate is the device's marginal speed."""
    groups = {}
    for r in rows:
        groups.setdefault((r["precision"], LAYOUTS.get(r["layout"], r["layout"])), []).append(r)
    lines = []
    for (precision, layout), group in groups.items():
        flops = [r["gflop_per_iteration"] for r in group]
        seconds = [r["seconds_per_iteration"] for r in group]
        if len(group) < 2 or max(flops) == min(flops):
            continue
        mean_f, mean_s = sum(flops) / len(flops), sum(seconds) / len(seconds)
        slope = sum((f - mean_f) * (s - mean_s) for f, s in zip(flops, seconds)) / sum((f - mean_f) ** 2 for f in flops)
        fixed = mean_s - slope * mean_f
        smallest = min(group, key=lambda r: r["gflop_per_iteration"])
        rate = f"{1 / slope / 1000:.2f}" if slope > 0 else "–"
        # a negative intercept is noise in the larger sizes' times: no share of anything
        share = f"{100 * fixed / smallest['seconds_per_iteration']:.0f} %" if fixed > 0 else "–"
        lines.append(f"{precision} | {layout} | {fixed * 1000:.3f} | {rate} | {size(smallest)} | {share}")
    if lines:
        print()
        print("Fixed cost per iteration (seconds = fixed + GFLOP / rate, least squares over the sizes):")
        print()
        table(["precision", "layout", "fixed ms", "marginal TFLOP/s", "smallest size", "fixed share there"], lines)


def large_frames(rows):
    header = ["size", "tile", "s/iteration", "peak RSS MiB", "CUDA max allocated MiB", "CUDA in use MiB"]
    table(header, (f"{r['width']}×{r['height']} | {r.get('tile_size') or 'none'} | {r['seconds_per_iteration']:.4f} "
                   f"| {r['peak_rss_mib']:.0f} | {memory(r)}" for r in rows))


def batches(rows):
    header = ["size", "batch", "loss read every", "s/iteration (batch)", "s/iteration per image", "TFLOP/s",
              "peak RSS MiB", "CUDA max allocated MiB", "CUDA in use MiB"]
    table(header, (f"{size(r)} | {r['batch']} | {r['loss_read_interval']} | {r['seconds_per_iteration']:.4f} "
                   f"| {r['seconds_per_image_iteration']:.4f} | {r['tflops']:.2f} | {r['peak_rss_mib']:.0f} "
                   f"| {memory(r)}" for r in rows))


def jobs(rows):
    header = ["size", "jobs", "batches", "s per frame-iteration", "TFLOP/s", "most frames together", "peak RSS MiB",
              "CUDA max allocated MiB"]
    table(header, (f"{size(r)} | {r['jobs']} | {'shared' if r['shared_batch'] else 'one per job'} "
                   f"| {r['seconds_per_image_iteration']:.5f} | {r['tflops']:.2f} "
                   f"| {r['most_together'] if r['most_together'] is not None else '–'} | {r['peak_rss_mib']:.0f} "
                   f"| {mib(r.get('cuda_max_allocated_mib'))}" for r in rows))


def flows(rows):
    header = ["size", "at once", "s per frame", "levels × warps × iterations", "threads", "peak RSS MiB",
              "CUDA max allocated MiB"]
    table(header, (f"{size(r)} | {r['at_once']} | {r['seconds_per_motion']:.4f} "
                   f"| {r['levels']} × {r['warps']} × {r['solver_iterations']} "
                   f"| {r['threads'] or '–'} | {r['peak_rss_mib']:.0f} | {mib(r.get('cuda_max_allocated_mib'))}"
                   for r in rows))


def paintings(rows):
    header = ["size", "flow measured", "s per frame", "iterations per frame", "flow s per frame", "optimise s per frame",
              "peak RSS MiB", "CUDA max allocated MiB"]
    table(header, (f"{size(r)} | {r['motion']} | {r['seconds_per_frame']:.4f} | {r['iterations_per_frame']:.0f} "
                   f"| {r['flow_seconds_per_frame']:.4f} | {r['optimise_seconds_per_frame']:.4f} "
                   f"| {r['peak_rss_mib']:.0f} | {mib(r.get('cuda_max_allocated_mib'))}" for r in rows))


def optimizers(rows):
    header = ["size", "batch", "pairs", "stored in", "s per proposal", "peak RSS MiB", "CUDA max allocated MiB"]
    table(header, (f"{size(r)} | {r['batch']} | {r['pairs']} | {r.get('pair_kind', 'f32')} | {r['seconds_per_proposal']:.5f} "
                   f"| {r['peak_rss_mib']:.0f} | {mib(r.get('cuda_max_allocated_mib'))}" for r in rows))


KINDS = {
    "iterations": ("", iterations),
    "memory": (" f32, one process per row.", large_frames),
    "batch": (" bf16, channels-last.", batches),
    "jobs": (" bf16, channels-last; each job paints its frames one after another on its own thread.", jobs),
    "flow": (" The optical flow into one frame: both ways, reliability and scene-cut test; several at once each on"
             " its own thread (seconds per frame over all of them).", flows),
    "optimizer": (" L-BFGS's proposals alone with a full memory, f32 images (a separable quadratic's gradients).",
                  optimizers),
    "painting": (" bf16, channels-last; synthetic frames moving 2 px right and 1 down per frame, flow mode, no early"
                 " stop; the first frame is not timed.", paintings),
}

if __name__ == "__main__":
    note, write = KINDS[sys.argv[1]]
    rows = [json.loads(line) for line in open(sys.argv[2]) if line.strip().startswith("{")]
    print(f"Card: {os.environ['CARD']}. Date: {datetime.date.today()}. Commit: {os.environ['COMMIT']}.{note}")
    if write is not iterations:
        print()
    write(rows)
