//! `impasto video` and `impasto eval` as a user runs them, on the real clips in `../shared` with real
//! FFmpeg and the real VGG-16: frame counts, durations, audio and timestamps survive; scene cuts restart
//! the sequence; the flow mode is measurably steadier (E_warp) than previous-frame and independent
//! painting; a job killed with SIGKILL resumes from its checkpoints; and every kind of bad input gets a
//! clear error naming the file and leaves nothing behind. Outputs are checked with the ffprobe CLI.
//! Sizes are tiny and iterations few; libtorch runs on one thread (far faster for tiny images on a
//! shared CPU).
#![cfg(feature = "media")]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{entries, ffmpeg, ffprobe, frame_timestamps, stderr};
use serde_json::Value;
use tempfile::TempDir;

/// `impasto video INPUT --style starry_night -o OUTPUT --device cpu` plus `extra`.
fn video_command(input: &Path, output: &Path, extra: &[&str]) -> Command {
    let mut command = common::impasto("video-cache");
    command
        .arg("video")
        .arg(input)
        .arg("--style")
        .arg(common::media("paintings/starry_night.jpg"))
        .arg("-o")
        .arg(output)
        .args(["--device", "cpu"])
        .args(extra);
    command
}

/// Runs a command to the end.
fn run(mut command: Command) -> Output {
    command.output().expect("impasto runs")
}

/// A clip from the shared folder.
fn clip(name: &str) -> PathBuf {
    common::media(&format!("video/{name}"))
}

/// The (type, codec) of every stream.
fn stream_list(description: &Value) -> Vec<(String, String)> {
    let streams = description["streams"].as_array().expect("streams");
    streams
        .iter()
        .map(|s| (s["codec_type"].as_str().unwrap().into(), s["codec_name"].as_str().unwrap().into()))
        .collect()
}

/// The first stream of `kind`.
fn stream<'a>(description: &'a Value, kind: &str) -> &'a Value {
    let streams = description["streams"].as_array().expect("streams");
    streams.iter().find(|s| s["codec_type"] == kind).unwrap_or_else(|| panic!("no {kind} stream"))
}

/// A number ffprobe prints as a string.
fn number(value: &Value) -> f64 {
    value.as_str().and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("not a number: {value}"))
}

/// A JSON file.
fn read_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// The frame numbers of a report's records, in its order.
fn frame_indices(report: &Value) -> Vec<u64> {
    report["frames"].as_array().unwrap().iter().map(|f| f["index"].as_u64().unwrap()).collect()
}

/// Whether each frame of a report began L-BFGS with the curvature of the frame before.
fn carried_flags(report: &Value) -> Vec<bool> {
    report["frames"].as_array().unwrap().iter().map(|f| f["curvature_carried"].as_bool().unwrap()).collect()
}

/// The project's own sample clip (50 frames, 320×180, with sound).
fn sample_clip() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("samples/video/bigbuckbunny-2s.mp4")
}

/// Frames `first..=last` of bikes.mp4, except `skipped`, with their original timestamps (so the
/// result is variable-rate when frames are skipped), re-encoded nearly losslessly.
fn bikes_segment(dir: &Path, name: &str, first: usize, last: usize, skipped: &[usize]) -> PathBuf {
    let mut select = format!("between(n\\,{first}\\,{last})");
    for n in skipped {
        select.push_str(&format!("*not(eq(n\\,{n}))"));
    }
    let path = dir.join(name);
    let bikes = clip("bikes.mp4");
    let filter = format!("select='{select}'");
    ffmpeg(&[
        "-i",
        bikes.to_str().unwrap(),
        "-vf",
        &filter,
        "-fps_mode",
        "passthrough",
        "-c:v",
        "libx264",
        "-crf",
        "12",
        "-preset",
        "veryfast",
        path.to_str().unwrap(),
    ]);
    path
}

#[test]
fn bigbuckbunny_keeps_frames_duration_audio_and_timestamps_and_eval_agrees() {
    let dir = TempDir::new().unwrap();
    let (input, output, report) = (clip("bigbuckbunny.mp4"), dir.path().join("bunny.mp4"), dir.path().join("r.json"));
    let extra = ["--size", "32", "--first-iterations", "2", "-n", "1", "--report", report.to_str().unwrap()];
    let result = run(video_command(&input, &output, &extra));
    assert!(result.status.success(), "{}", stderr(&result));

    let (before, after) = (ffprobe(&input), ffprobe(&output));
    assert_eq!(stream_list(&after), stream_list(&before), "same streams (audio copied)");
    assert_eq!(stream(&after, "video")["nb_read_frames"], "132");
    assert_eq!(stream(&after, "audio")["duration"], stream(&before, "audio")["duration"]);
    assert_eq!(stream(&after, "audio")["nb_read_frames"], stream(&before, "audio")["nb_read_frames"]);
    let duration_gap = number(&after["format"]["duration"]) - number(&before["format"]["duration"]);
    assert!(duration_gap.abs() < 0.05, "durations differ by {duration_gap} s");
    assert_eq!(frame_timestamps(&output), frame_timestamps(&input));

    let report = read_json(&report);
    assert_eq!(report["frame_count"], 132);
    assert_eq!(report["working_size"], serde_json::json!([32, 18]));
    let auto = common::auto_precision_with(common::F32_IS_FASTER);
    assert_eq!((&report["device"], &report["precision"]), (&Value::from("cpu"), &Value::from(auto)), "{report}");
    let frames = report["frames"].as_array().unwrap();
    assert_eq!(frames[0]["start"], "first");
    assert!(frames[1..].iter().all(|f| f["start"] == "warped"), "no scene cut in this clip");
    assert!(frames[1..].iter().all(|f| f["warping_error"].as_f64().is_some()));
    assert!(
        frames
            .iter()
            .all(|f| f["losses"]["style"].as_f64().unwrap() > 0.0 && f["seconds"]["optimise"].as_f64().is_some())
    );
    assert_eq!(report["warping_error"]["pairs"], 131);
    let painted_mean = report["warping_error"]["mean"].as_f64().unwrap();

    let eval_report = dir.path().join("eval.json");
    let mut eval = common::impasto("video-cache");
    eval.args(["eval"]).arg(&input).arg(&output).args(["--device", "cpu", "--report"]).arg(&eval_report);
    let evaluated = run(eval);
    assert!(evaluated.status.success(), "{}", stderr(&evaluated));
    assert!(String::from_utf8_lossy(&evaluated.stdout).contains("E_warp"));
    let evaluation = read_json(&eval_report);
    assert_eq!(evaluation["pairs"].as_array().unwrap().len(), 131);
    assert!(evaluation["pairs"].as_array().unwrap().iter().all(|p| p["scene_cut"] == false));
    let encoded_mean = evaluation["warping_error"]["mean"].as_f64().unwrap();
    // The encoded video adds 4:2:0 chroma and compression error at 32×18, so it only has to be close.
    assert!(encoded_mean > 0.0 && encoded_mean < painted_mean * 20.0, "{encoded_mean} vs {painted_mean}");
}

#[test]
fn a_scene_cut_restarts_the_sequence_and_variable_timestamps_survive() {
    let dir = TempDir::new().unwrap();
    // bikes.mp4 cuts between frames 29 and 30; frames 24 and 25 are dropped to make the rate variable.
    let input = bikes_segment(dir.path(), "cut.mp4", 20, 37, &[24, 25]);
    let (output, report) = (dir.path().join("out.mkv"), dir.path().join("r.json"));
    let extra = ["--size", "64", "--first-iterations", "2", "-n", "1", "--carry-curvature", "true", "--report"];
    let mut command = video_command(&input, &output, &extra);
    command.arg(&report);
    let result = run(command);
    assert!(result.status.success(), "{}", stderr(&result));

    let input_pts = frame_timestamps(&input);
    let gaps: std::collections::BTreeSet<i64> = input_pts.windows(2).map(|w| w[1] - w[0]).collect();
    assert!(gaps.len() > 1, "the test input is not variable-rate: {gaps:?}");
    let written = ffprobe(&output);
    assert_eq!(stream_list(&written), vec![("video".to_string(), "h264".to_string())]);
    assert_eq!(number(&stream(&written, "video")["nb_read_frames"]) as usize, input_pts.len());
    assert_eq!(frame_timestamps(&output).len(), input_pts.len());

    let report = read_json(&report);
    let starts: Vec<&str> = report["frames"].as_array().unwrap().iter().map(|f| f["start"].as_str().unwrap()).collect();
    let cut_position = 30 - 20 - 2;
    assert_eq!(starts[0], "first");
    assert_eq!(starts[cut_position], "scene_cut", "{starts:?}");
    assert_eq!(starts.iter().filter(|s| **s == "scene_cut").count(), 1, "{starts:?}");
    assert!(report["frames"][cut_position]["warping_error"].is_null());
    // asked to, L-BFGS carries its curvature from frame to frame within a shot, not into a new one
    let carried_here = carried_flags(&report);
    let expected: Vec<bool> = (0..starts.len()).map(|i| i != 0 && i != cut_position).collect();
    assert_eq!(carried_here, expected, "{starts:?}");
    let pts: Vec<i64> = report["frames"].as_array().unwrap().iter().map(|f| f["pts"].as_i64().unwrap()).collect();
    assert_eq!(pts.windows(2).filter(|w| w[1] - w[0] > pts[1] - pts[0]).count(), 1, "the gap is kept: {pts:?}");

    let (fresh_output, fresh_report) = (dir.path().join("fresh.mkv"), dir.path().join("fresh.json"));
    let extra = ["--size", "64", "--first-iterations", "2", "-n", "1", "--report"];
    let mut command = video_command(&input, &fresh_output, &extra);
    command.arg(&fresh_report);
    let result = run(command);
    assert!(result.status.success(), "{}", stderr(&result));
    assert!(carried_flags(&read_json(&fresh_report)).iter().all(|c| !c), "by default every frame starts afresh");
}

#[test]
fn flow_mode_is_steadier_than_previous_frame_and_independent_painting() {
    let dir = TempDir::new().unwrap();
    // One shot of bikes.mp4 (137–186): a street with a passing cyclist.
    let input = bikes_segment(dir.path(), "shot.mp4", 140, 149, &[]);
    let warping_error = |mode: &str| {
        let (output, report) = (dir.path().join(format!("{mode}.mp4")), dir.path().join(format!("{mode}.json")));
        let extra = [
            "--size",
            "64",
            "--first-iterations",
            "15",
            "-n",
            "15",
            "--tolerance",
            "0",
            "--temporal",
            mode,
            "--report",
            report.to_str().unwrap(),
        ];
        let result = run(video_command(&input, &output, &extra));
        assert!(result.status.success(), "{mode}: {}", stderr(&result));
        let report = read_json(&report);
        assert_eq!(report["warping_error"]["pairs"], 9, "{mode}");
        report["warping_error"]["mean"].as_f64().unwrap()
    };
    let (flow, previous, independent) =
        (warping_error("flow"), warping_error("previous"), warping_error("independent"));
    println!("E_warp: flow {flow:.6}, previous {previous:.6}, independent {independent:.6}");
    assert!(flow <= independent / 2.0, "flow {flow} against independent {independent}");
    assert!(flow < previous, "flow {flow} against previous {previous}");
}

/// The work directory of a job writing `output`, if there is one.
fn work_dir(output: &Path) -> Option<PathBuf> {
    let prefix = format!(".{}.impasto-", output.file_name().unwrap().to_string_lossy());
    std::fs::read_dir(output.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.file_name().unwrap().to_string_lossy().starts_with(&prefix))
}

/// Frames a work directory's manifest lists (its lines after the header).
fn manifest_frames(work_dir: &Path) -> usize {
    std::fs::read_to_string(work_dir.join("manifest.jsonl")).map_or(0, |text| text.lines().count().saturating_sub(1))
}

/// Runs `command` until the manifest of the job writing `output` lists `pictures` pictures (failing if
/// the job ends first or never gets there), kills it with SIGKILL and returns its work directory.
fn kill_once_listed(mut command: Command, output: &Path, pictures: usize) -> PathBuf {
    let mut child = command.stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    let started = Instant::now();
    let listed = loop {
        let listed = work_dir(output).map_or(0, |d| manifest_frames(&d));
        if listed >= pictures || started.elapsed() > Duration::from_secs(180) {
            break listed;
        }
        assert!(child.try_wait().unwrap().is_none(), "the job ended before it could be killed");
        std::thread::sleep(Duration::from_millis(20));
    };
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(listed >= pictures, "the manifest never listed frames");
    work_dir(output).expect("the work directory survives the kill")
}

#[test]
fn a_job_killed_mid_run_resumes_from_its_checkpoints_and_cleans_up() {
    let dir = TempDir::new().unwrap();
    let input = sample_clip();
    let (output, report) = (dir.path().join("out.mp4"), dir.path().join("r.json"));
    let extra = ["--size", "48", "--first-iterations", "4", "-n", "3", "--tolerance", "0", "--carry-curvature", "true"];
    let extra = [&extra[..], &["--json"]].concat();
    let killed_dir = kill_once_listed(video_command(&input, &output, &extra), &output, 5);
    assert!(manifest_frames(&killed_dir) < 50, "the job was killed before it finished");
    assert!(!output.exists(), "no output after a kill");

    let mut again = video_command(&input, &output, &extra);
    again.args(["--report", report.to_str().unwrap()]);
    let result = run(again);
    assert!(result.status.success(), "{}", stderr(&result));
    assert_eq!(stream(&ffprobe(&output), "video")["nb_read_frames"], "50");
    assert_eq!(stream_list(&ffprobe(&output)), stream_list(&ffprobe(&input)));
    let report = read_json(&report);
    assert!(report["resumed_frames"].as_u64().unwrap() >= 5, "{}", report["resumed_frames"]);
    assert_eq!(report["frame_count"], 50);
    // no optimiser holds what was learnt on a stored frame: the first frame painted after them starts
    // L-BFGS afresh, the next carries on
    let frames = report["frames"].as_array().unwrap();
    let painted = frames.iter().position(|f| f["resumed"] == false).unwrap();
    assert_eq!(frames[painted]["curvature_carried"], false, "{}", frames[painted]);
    assert_eq!(frames[painted + 1]["curvature_carried"], true, "{}", frames[painted + 1]);
    assert_eq!(entries(dir.path()), ["out.mp4", "r.json"], "the work directory and partial files are gone");
}

#[test]
fn an_hls_output_lands_with_its_segments_whole_or_not_at_all() {
    let dir = TempDir::new().unwrap();
    let input = sample_clip();
    let output = dir.path().join("painted.m3u8");
    let extra = ["--size", "48", "--first-iterations", "4", "-n", "2"];
    // killed mid-run: neither the playlist nor a segment is in the output's folder
    kill_once_listed(video_command(&input, &output, &extra), &output, 5);
    let names = entries(dir.path());
    assert!(names.iter().all(|name| name.starts_with('.')), "only the hidden work directory: {names:?}");

    let result = run(video_command(&input, &output, &extra));
    assert!(result.status.success(), "{}", stderr(&result));
    // the playlist and the segments it lists, nothing else; every frame and the sound, as ffprobe reads them
    let names = entries(dir.path());
    let segments: Vec<&String> = names.iter().filter(|name| *name != "painted.m3u8").collect();
    assert!(names.len() > segments.len(), "{names:?}");
    assert!(
        !segments.is_empty() && segments.iter().all(|name| name.starts_with("painted-") && name.ends_with(".ts")),
        "{names:?}"
    );
    let playlist = std::fs::read_to_string(&output).unwrap();
    assert!(segments.iter().all(|segment| playlist.contains(segment.as_str())), "{playlist}");
    assert_eq!(stream(&ffprobe(&output), "video")["nb_read_frames"], "50");
    assert_eq!(stream_list(&ffprobe(&output)), stream_list(&ffprobe(&input)));
}

/// E_warp of every frame pair of `output` against `input`, as `impasto eval` measures it.
fn pair_warping_errors(input: &Path, output: &Path, report: &Path) -> Vec<f64> {
    let mut eval = common::impasto("video-cache");
    eval.args(["eval"]).arg(input).arg(output).args(["--device", "cpu", "--report"]).arg(report);
    let evaluated = run(eval);
    assert!(evaluated.status.success(), "{}", stderr(&evaluated));
    let pairs = read_json(report)["pairs"].as_array().unwrap().clone();
    pairs.iter().map(|p| p["warping_error"].as_f64().unwrap()).collect()
}

#[test]
fn segments_painted_side_by_side_keep_every_frame_in_order_and_cross_fade_their_seams() {
    let dir = TempDir::new().unwrap();
    let input = sample_clip();
    let hard_seams = dir.path().join("hard-seams.toml");
    std::fs::write(&hard_seams, "[video]\nsegment_overlap = 0\n").unwrap();
    let paint = |name: &str, profile: Option<&Path>| {
        let (output, report) = (dir.path().join(format!("{name}.mp4")), dir.path().join(format!("{name}.json")));
        let extra = ["--size", "48", "--first-iterations", "20", "-n", "8", "--tolerance", "0", "--segments", "2"];
        let mut command = video_command(&input, &output, &extra);
        command.arg("--report").arg(&report);
        if let Some(profile) = profile {
            command.arg("--profile").arg(profile);
        }
        let result = run(command);
        assert!(result.status.success(), "{name}: {}", stderr(&result));
        (output, read_json(&report))
    };
    let (faded, report) = paint("faded", None);
    assert_eq!(report["segments"], 2);
    assert_eq!(report["frame_count"], 50);
    assert_eq!(frame_indices(&report), (0..50).collect::<Vec<u64>>(), "every frame once, in order");
    assert_eq!(frame_timestamps(&faded), frame_timestamps(&input));
    assert_eq!(stream_list(&ffprobe(&faded)), stream_list(&ffprobe(&input)), "audio kept");
    assert_eq!(entries(dir.path()).iter().filter(|n| n.contains(".impasto-")).count(), 0, "work directory removed");

    // The second segment owns frames 25…49; its chain starts fresh (at frame 9, or at 25 without an
    // overlap), so without a cross-fade the pair (24, 25) jumps from one painting to another.
    let (hard, hard_report) = paint("hard", Some(&hard_seams));
    assert_eq!(hard_report["segments"], 2);
    let faded_pairs = pair_warping_errors(&input, &faded, &dir.path().join("faded-eval.json"));
    let hard_pairs = pair_warping_errors(&input, &hard, &dir.path().join("hard-eval.json"));
    let seam = 24; // pair index i is frames (i, i + 1)
    println!("E_warp at the seam: cross-faded {:.5}, hard {:.5}", faded_pairs[seam], hard_pairs[seam]);
    let hard_typical = hard_pairs.iter().enumerate().filter(|(i, _)| *i != seam).map(|(_, e)| *e).fold(0.0, f64::max);
    assert!(hard_pairs[seam] > hard_typical, "the hard seam stands out: {hard_pairs:?}");
    assert!(faded_pairs[seam] < hard_pairs[seam] / 2.0, "{faded_pairs:?} against {hard_pairs:?}");
}

#[test]
fn carried_curvature_follows_each_segments_own_chain() {
    // two segments side by side without lead-ins: frames 0…24 and 25…49, each slot of the batch
    // carrying L-BFGS's curvature along its own segment only
    let dir = TempDir::new().unwrap();
    let input = sample_clip();
    let (output, report) = (dir.path().join("out.mp4"), dir.path().join("r.json"));
    let extra = ["--size", "32", "--first-iterations", "3", "-n", "2", "--segments", "2", "--segment-overlap", "0"];
    let mut command = video_command(&input, &output, &extra);
    command.args(["--carry-curvature", "true", "--report"]).arg(&report);
    let result = run(command);
    assert!(result.status.success(), "{}", stderr(&result));
    let report = read_json(&report);
    assert_eq!(frame_indices(&report), (0..50).collect::<Vec<u64>>());
    // the report's frames are 0…49 in order (above), so positions are frame numbers
    let afresh: Vec<usize> =
        (carried_flags(&report).iter().enumerate()).filter(|(_, c)| !**c).map(|(i, _)| i).collect();
    assert_eq!(afresh, [0, 25], "the frames that started afresh");
}

#[test]
fn a_job_painted_in_segments_resumes_every_segment_from_its_checkpoints() {
    let dir = TempDir::new().unwrap();
    let input = sample_clip();
    let (output, report) = (dir.path().join("out.mp4"), dir.path().join("r.json"));
    let extra = ["--size", "32", "--first-iterations", "4", "-n", "3", "--tolerance", "0", "--segments", "3", "--json"];
    let extra = [&extra[..], &["--segment-overlap", "8"]].concat();
    // Three segments: frames 0…15, 8…32 and 25…49 (lead-ins of eight frames), painted side by side.
    let killed_dir = kill_once_listed(video_command(&input, &output, &extra), &output, 9);
    let pictures = entries(&killed_dir.join("frames"));
    assert!(pictures.iter().any(|n| n.ends_with(".lead.png")), "lead-in pictures stored: {pictures:?}");
    assert!(manifest_frames(&killed_dir) < 66, "the job was killed before it finished");

    let mut again = video_command(&input, &output, &extra);
    again.args(["--report", report.to_str().unwrap()]);
    let result = run(again);
    assert!(result.status.success(), "{}", stderr(&result));
    assert_eq!(frame_timestamps(&output), frame_timestamps(&input));
    let report = read_json(&report);
    assert_eq!(report["segments"], 3);
    assert!(report["resumed_frames"].as_u64().unwrap() >= 3, "{}", report["resumed_frames"]);
    assert_eq!(frame_indices(&report), (0..50).collect::<Vec<u64>>());
    assert_eq!(entries(dir.path()), ["out.mp4", "r.json"], "the work directory and partial files are gone");
}

#[test]
fn segments_of_a_damaged_video_report_the_damage_once_and_paint_every_frame() {
    let dir = TempDir::new().unwrap();
    let input = common::damaged_bikes(dir.path());
    let paint = |segments: &str| {
        let (output, report) =
            (dir.path().join(format!("{segments}.mp4")), dir.path().join(format!("{segments}.json")));
        let extra =
            ["--size", "48", "--first-iterations", "1", "-n", "1", "--segments", segments, "--temporal", "previous"];
        let extra = [&extra[..], &["--segment-overlap", "8"]].concat();
        let mut command = video_command(&input, &output, &extra);
        command.arg("--report").arg(&report);
        let result = run(command);
        assert!(result.status.success(), "{segments} segments: {}", stderr(&result));
        (read_json(&report), frame_timestamps(&output))
    };
    let (whole, whole_pts) = paint("1");
    let (split, split_pts) = paint("4");
    assert_eq!(split["segments"], 4);
    assert!(!whole["damaged"].as_array().unwrap().is_empty(), "the damage is found");
    assert_eq!(split["damaged"], whole["damaged"], "each damage report once, in order");
    assert_eq!(split["frame_count"], whole["frame_count"]);
    assert_eq!(split_pts, whole_pts, "the same frames, in order");
}

#[test]
fn a_stage_that_fails_mid_run_stops_the_others_and_leaves_no_output() {
    let dir = TempDir::new().unwrap();
    let input = sample_clip();
    let output = dir.path().join("out.mp4");
    let extra = ["--size", "48", "--first-iterations", "4", "-n", "3", "--tolerance", "0"];
    let mut command = video_command(&input, &output, &extra);
    let child = command.stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    let started = Instant::now();
    let work = loop {
        if let Some(work) = work_dir(&output).filter(|d| manifest_frames(d) >= 2) {
            break work;
        }
        assert!(started.elapsed() < Duration::from_secs(180), "the manifest never listed frames");
        std::thread::sleep(Duration::from_millis(20));
    };
    // The encoder stage can no longer store checkpoints: it fails, and the job must end, not hang.
    std::fs::remove_dir_all(work.join("frames")).unwrap();
    let result = child.wait_with_output().unwrap();
    assert!(!result.status.success(), "the job failed");
    assert!(stderr(&result).contains("frames"), "{}", stderr(&result));
    assert!(!output.exists(), "no output after a failure");
    let leftovers: Vec<String> = entries(dir.path()).into_iter().filter(|n| !n.contains(".impasto-")).collect();
    assert_eq!(leftovers, Vec::<String>::new(), "no partial files beside the output");
}

/// Runs `impasto video` on a bad input and checks the exit code, that the message names `named`,
/// and that nothing but `expected_entries` is left in `dir`.
fn assert_refused(dir: &Path, input: &Path, style: Option<&Path>, output: &Path, named: &Path) {
    let mut command = common::impasto("video-cache");
    let style = style.map_or_else(|| common::media("paintings/starry_night.jpg"), Path::to_path_buf);
    command
        .arg("video")
        .arg(input)
        .arg("--style")
        .arg(style)
        .arg("-o")
        .arg(output)
        .args(["--size", "32", "--device", "cpu"]);
    let before = entries(dir);
    let result = run(command);
    let message = stderr(&result);
    assert_eq!(result.status.code(), Some(3), "{message}");
    let name = named.file_name().unwrap().to_string_lossy();
    assert!(message.contains(&*name), "the message names {name}: {message}");
    assert!(!output.exists(), "no output for a bad input");
    assert_eq!(entries(dir), before, "nothing is left behind");
}

#[test]
fn bad_inputs_get_a_clear_error_and_leave_nothing() {
    let dir = TempDir::new().unwrap();
    let output = dir.path().join("out.mp4");

    let text = dir.path().join("notes.mp4");
    std::fs::write(&text, "this is not a video\n".repeat(100)).unwrap();
    assert_refused(dir.path(), &text, None, &output, &text);

    let truncated = common::truncated_bikes(dir.path());
    assert_refused(dir.path(), &truncated, None, &output, &truncated);

    let empty = dir.path().join("empty.avi");
    ffmpeg(&["-i", clip("bikes.mp4").to_str().unwrap(), "-frames:v", "0", "-c:v", "copy", empty.to_str().unwrap()]);
    assert_refused(dir.path(), &empty, None, &output, &empty);

    let tone = dir.path().join("tone.m4a");
    ffmpeg(&["-f", "lavfi", "-i", "sine=frequency=440:duration=1", "-c:a", "aac", tone.to_str().unwrap()]);
    assert_refused(dir.path(), &tone, None, &output, &tone);

    let good_input = sample_clip();
    let broken_style = dir.path().join("style.png");
    std::fs::write(&broken_style, b"not a png").unwrap();
    assert_refused(dir.path(), &good_input, Some(&broken_style), &output, &broken_style);

    let missing_dir = dir.path().join("missing");
    let unwritable = missing_dir.join("out.mp4");
    assert_refused(dir.path(), &good_input, None, &unwritable, &missing_dir);
}
