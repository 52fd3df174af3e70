//! `impasto bench` as the benchmarks run it: the iteration benchmark in every precision and layout,
//! tiles, batches and loss-read intervals through the prepared GPU script in its CPU mode
//! (`benches/gpu.sh --quick`), and the end-to-end video
//! benchmark on the sample clip. Only the shape of the output is checked, never a time.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

/// The JSON lines of a file or of a command's output.
fn json_lines(text: &str) -> Vec<serde_json::Value> {
    text.lines().filter(|l| l.trim_start().starts_with('{')).map(|l| serde_json::from_str(l).unwrap()).collect()
}

#[test]
fn gpu_script_quick_mode_writes_a_row_per_size_precision_and_layout() {
    let out = tempfile::tempdir().unwrap();
    // a measurement in which bf16 wins, so `auto` must read it to choose bf16 on a CPU that has it
    let cache = out.path().join("cache");
    let output = common::in_test_cache(&mut Command::new("bash"), &cache, common::BF16_IS_FASTER)
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/gpu.sh"))
        .arg("--quick")
        .env("IMPASTO_BIN", env!("CARGO_BIN_EXE_impasto"))
        .env("OUT", out.path())
        .env_remove("IMPASTO_MODEL")
        .output()
        .unwrap();
    let log = std::fs::read_to_string(out.path().join("gpu-bench.log")).unwrap_or_default();
    assert!(output.status.success(), "{}\n{log}", String::from_utf8_lossy(&output.stderr));
    let rows = json_lines(&std::fs::read_to_string(out.path().join("gpu-bench.jsonl")).unwrap());
    let measured: BTreeSet<(i64, i64, String, String)> = rows
        .iter()
        .map(|r| {
            let precision = r["precision"].as_str().unwrap().split(' ').next().unwrap().to_string();
            (r["width"].as_i64().unwrap(), r["height"].as_i64().unwrap(), precision, r["layout"].to_string())
        })
        .collect();
    assert_eq!(rows.len(), 12, "{rows:?}");
    assert_eq!(measured.len(), 12, "2 sizes × 3 precisions × 2 layouts, each once: {measured:?}");
    let off_cuda = |r: &serde_json::Value| r["cuda_peak_mib"].is_null() && r["cuda_max_allocated_mib"].is_null();
    assert!(rows.iter().all(|r| r["arch"] == "vgg19" && off_cuda(r)), "{rows:?}");
    assert!(rows.iter().any(|r| r["precision"] == "tf32 (f32 on cpu)"), "{rows:?}");
    let table = std::fs::read_to_string(out.path().join("gpu-bench.md")).unwrap();
    assert!(table.contains("| precision | layout | size |") && table.contains("CUDA max allocated MiB"), "{table}");
    let (sizes_table, fixed_table) = table.split_once("Fixed cost per iteration").expect("the fitted fixed costs");
    let rows_of = |text: &str| text.lines().filter(|l| l.starts_with("| ") && !l.starts_with("| precision")).count();
    assert_eq!(rows_of(sizes_table), 12, "{table}");
    // one fit per precision and layout over its two sizes
    assert!(fixed_table.contains("| fixed ms | marginal TFLOP/s |"), "{table}");
    assert_eq!(rows_of(fixed_table), 6, "{table}");
    assert!(out.path().join("probe.txt").is_file());
    let memory = json_lines(&std::fs::read_to_string(out.path().join("gpu-memory.jsonl")).unwrap());
    let tiles: Vec<(i64, u64)> =
        memory.iter().map(|r| (r["width"].as_i64().unwrap(), r["tile_size"].as_u64().unwrap())).collect();
    assert_eq!(tiles, [(160, 0), (160, 96), (320, 96)], "{memory:?}");
    let memory_table = std::fs::read_to_string(out.path().join("gpu-memory.md")).unwrap();
    assert!(memory_table.contains("| 320×192 | 96 |"), "{memory_table}");
    let batched = json_lines(&std::fs::read_to_string(out.path().join("gpu-batch.jsonl")).unwrap());
    let cases: Vec<(u64, u64)> =
        batched.iter().map(|r| (r["batch"].as_u64().unwrap(), r["loss_read_interval"].as_u64().unwrap())).collect();
    // interval 0 means "the device's default": every iteration on the CPU
    assert_eq!(cases, [(1, 1), (2, 1), (1, 1), (1, 3)], "{batched:?}");
    for row in &batched {
        let (batch, whole, per_image) = (
            row["batch"].as_f64().unwrap(),
            row["seconds_per_iteration"].as_f64().unwrap(),
            row["seconds_per_image_iteration"].as_f64().unwrap(),
        );
        assert!((per_image * batch - whole).abs() <= 1e-9 * whole.max(1.0), "{row}");
    }
    let batch_table = std::fs::read_to_string(out.path().join("gpu-batch.md")).unwrap();
    assert!(batch_table.contains("| 32² | 2 | 1 |"), "{batch_table}");
    // two jobs in one shared batch held both their frames at once; one job per batch had no such batch
    let jobs = json_lines(&std::fs::read_to_string(out.path().join("gpu-jobs.jsonl")).unwrap());
    let modes: Vec<(u64, bool, Option<u64>)> = jobs
        .iter()
        .map(|r| (r["jobs"].as_u64().unwrap(), r["shared_batch"].as_bool().unwrap(), r["most_together"].as_u64()))
        .collect();
    assert_eq!(modes, [(1, true, Some(1)), (2, true, Some(2)), (1, false, None), (2, false, None)]);
    let jobs_table = std::fs::read_to_string(out.path().join("gpu-jobs.md")).unwrap();
    assert!(jobs_table.contains("| 32² | 2 | shared |") && jobs_table.contains("| 32² | 2 | one per job |"));
    // the optical flow, one row per size, timed with the profile's flow settings on one thread
    let flows = json_lines(&std::fs::read_to_string(out.path().join("gpu-flow.jsonl")).unwrap());
    let flow_cases: Vec<(i64, i64, u64, u64)> = flows
        .iter()
        .map(|r| {
            let (width, height) = (r["width"].as_i64().unwrap(), r["height"].as_i64().unwrap());
            (width, height, r["at_once"].as_u64().unwrap(), r["threads"].as_u64().unwrap())
        })
        .collect();
    assert_eq!(flow_cases, [(32, 32, 1, 1), (32, 32, 2, 1), (48, 32, 1, 1), (48, 32, 2, 1)], "{flows:?}");
    assert!(flows.iter().all(|r| r["seconds_per_motion"].as_f64().is_some_and(|s| s > 0.0)), "{flows:?}");
    let flow_table = std::fs::read_to_string(out.path().join("gpu-flow.md")).unwrap();
    assert!(flow_table.contains("| 48×32 | 2 |") && flow_table.contains("| 10 × 5 × 20 | 1 |"), "{flow_table}");
    // moving frames painted with the flow inline and a frame ahead, the same work either way
    let painted = json_lines(&std::fs::read_to_string(out.path().join("gpu-painting.jsonl")).unwrap());
    let places: Vec<(&str, u64, f64)> = painted
        .iter()
        .map(|r| {
            (r["motion"].as_str().unwrap(), r["frames"].as_u64().unwrap(), r["iterations_per_frame"].as_f64().unwrap())
        })
        .collect();
    assert_eq!(places, [("inline", 2, 1.0), ("ahead", 2, 1.0)], "{painted:?}");
    assert!(painted.iter().all(|r| r["flow_seconds_per_frame"].as_f64().is_some_and(|s| s > 0.0)), "{painted:?}");
    let painting_table = std::fs::read_to_string(out.path().join("gpu-painting.md")).unwrap();
    assert!(painting_table.contains("| 32² | ahead |"), "{painting_table}");
    // L-BFGS's proposals with a full memory of the default 100 pairs, one row per size and pair kind
    let proposals = json_lines(&std::fs::read_to_string(out.path().join("gpu-optimizer.jsonl")).unwrap());
    let optimized: Vec<(u64, u64, u64, &str)> = proposals
        .iter()
        .map(|r| {
            let (width, height) = (r["width"].as_u64().unwrap(), r["height"].as_u64().unwrap());
            (width, height, r["pairs"].as_u64().unwrap(), r["pair_kind"].as_str().unwrap())
        })
        .collect();
    let expected = [(32, 32, 100, "f32"), (48, 32, 100, "f32"), (32, 32, 100, "bf16"), (48, 32, 100, "bf16")];
    assert_eq!(optimized, expected, "{proposals:?}");
    assert!(proposals.iter().all(|r| r["seconds_per_proposal"].as_f64().is_some_and(|s| s > 0.0)), "{proposals:?}");
    let optimizer_table = std::fs::read_to_string(out.path().join("gpu-optimizer.md")).unwrap();
    assert!(optimizer_table.contains("| 48×32 | 1 | 100 | bf16 |"), "{optimizer_table}");
    // the default precision settled for this CPU, and the log says what it became
    let auto = json_lines(&std::fs::read_to_string(out.path().join("gpu-auto.jsonl")).unwrap());
    let expected = common::auto_precision_with(common::BF16_IS_FASTER);
    assert_eq!(auto.len(), 1, "{auto:?}");
    assert_eq!(auto[0]["precision"], expected.as_str(), "{auto:?}");
    assert!(log.contains(&format!("precision auto on cpu: {expected}")), "{log}");
    // read, not measured: a command that measured would have kept a second entry
    let kept = std::fs::read_to_string(cache.join("cpu-precision.json")).unwrap();
    let entries = serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(&kept).unwrap();
    assert_eq!(entries.len(), 1, "{kept}");
}

#[cfg(feature = "media")]
#[test]
fn video_bench_reports_seconds_per_frame_and_stage_shares() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let cache = tempfile::tempdir().unwrap();
    let output =
        common::in_test_cache(&mut Command::new(env!("CARGO_BIN_EXE_impasto")), cache.path(), common::F32_IS_FASTER)
            .current_dir(root)
            .args(["bench", "--video", "samples/video/bigbuckbunny-2s.mp4", "--size", "32"])
            .args(["--first-iterations", "2", "--later-iterations", "1", "--random", "vgg16", "--device", "cpu"])
            .args(["--segments", "2"])
            .output()
            .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let rows = json_lines(&String::from_utf8(output.stdout).unwrap());
    assert_eq!(rows.len(), 1, "{rows:?}");
    let row = &rows[0];
    assert_eq!(row["frames"], 50, "{row}");
    assert_eq!(row["segments"], 2, "{row}");
    // two iterations for each run's first frame, one for every later frame, and the second run's
    // sixteen lead-in frames (the default overlap; its first frame among them) on top of the 50
    let iterations = row["iterations_per_frame"].as_f64().unwrap();
    assert_eq!(iterations, (2.0 + 49.0 + 2.0 + 15.0) / 50.0, "{row}");
    assert!(row["seconds_per_frame"].as_f64().is_some(), "{row}");
    let stages = ["decode", "flow", "optimise", "encode"];
    let shares: Vec<f64> = stages.iter().map(|s| row["share"][s].as_f64().unwrap()).collect();
    assert!(shares.iter().all(|s| (0.0..=1.0).contains(s)), "{row}");
    assert!((shares.iter().sum::<f64>() - 1.0).abs() < 1e-6, "{row}");
    assert!(stages.iter().all(|s| row["stage_seconds_per_frame"][s].is_number()), "{row}");
    assert!(row["cuda_peak_mib"].is_null(), "{row}");
}

#[test]
fn the_optimizer_bench_keeps_the_pairs_the_profiles_memory_limit_allows() {
    // at 32² a pair is two f32 images of 3 × 32 × 32 values: 24 KiB, so 1 MiB holds 42 pairs, or
    // 85 in bf16 (12 KiB); 0 lifts the limit. `auto` stores them in bf16 on the CPU where this
    // build reads bf16 rows.
    let auto_kind = if impasto::device::bf16_rows::available() { "bf16" } else { "f32" };
    let dir = tempfile::tempdir().unwrap();
    for (pairs, limit, kept, kind) in
        [("f32", 1u64, 42u64, "f32"), ("bf16", 1, 85, "bf16"), ("auto", 0, 100, auto_kind)]
    {
        let profile = dir.path().join(format!("limit-{limit}-{pairs}.toml"));
        std::fs::write(&profile, format!("[style]\nlbfgs_memory_mib = {limit}\nlbfgs_pairs = \"{pairs}\"\n")).unwrap();
        let output =
            common::in_test_cache(&mut Command::new(env!("CARGO_BIN_EXE_impasto")), dir.path(), common::F32_IS_FASTER)
                .args(["bench", "--optimizer", "--sizes", "32", "--iterations", "1", "--warmup", "0"])
                .args(["--device", "cpu", "--profile"])
                .arg(&profile)
                .output()
                .unwrap();
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        let rows = json_lines(&String::from_utf8(output.stdout).unwrap());
        assert_eq!(rows.len(), 1, "{rows:?}");
        assert_eq!(rows[0]["pairs"].as_u64(), Some(kept), "limit {limit} MiB, {pairs}: {rows:?}");
        assert_eq!(rows[0]["pair_kind"], kind, "{pairs}: {rows:?}");
    }
}
