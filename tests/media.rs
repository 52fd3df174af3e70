//! The media module against real FFmpeg on the real clips in `../shared`: probing, decoding,
//! re-encoding with stream copy, timestamps, rotation and colour tags, and every bad input the module
//! promises a typed error for. Outputs are checked with the ffprobe command-line tool, independently
//! of the code under test. Sizes are tiny (long side ≤ 160) to keep runs short.
#![cfg(feature = "media")]

mod common;

use common::{entries, ffmpeg, ffprobe};
use std::path::{Path, PathBuf};
use std::process::Command;

use impasto::media::{
    ColorInfo, EncodeSettings, Frame, MediaError, OutputSize, StreamKind, VideoInfo, VideoReader, VideoWriter,
    VideoWriterSpec, WorkingSize, probe,
};
use serde_json::Value;
use tempfile::TempDir;

/// A clip from the shared folder.
fn clip(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/media/video").join(name)
}

/// The presentation timestamps of a file's video frames, as ffprobe decodes them.
fn ffprobe_frame_pts(path: &Path) -> Vec<i64> {
    let output = Command::new("ffprobe")
        .args(["-v", "error", "-select_streams", "v:0", "-show_entries", "frame=pts", "-of", "csv=p=0"])
        .arg(path)
        .output()
        .expect("ffprobe runs");
    let text = String::from_utf8_lossy(&output.stdout);
    text.lines().filter_map(|line| line.split(',').next()?.trim().parse().ok()).collect()
}

/// The first stream of `kind` ("video", "audio", "subtitle") in an ffprobe description.
fn stream<'a>(description: &'a Value, kind: &str) -> &'a Value {
    description["streams"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["codec_type"] == kind)
        .unwrap_or_else(|| panic!("no {kind} stream"))
}

/// The (type, codec) list of an ffprobe description's streams.
fn stream_list(description: &Value) -> Vec<(String, String)> {
    let streams = description["streams"].as_array().unwrap();
    streams
        .iter()
        .map(|s| (s["codec_type"].as_str().unwrap().into(), s["codec_name"].as_str().unwrap().into()))
        .collect()
}

/// A number that ffprobe prints as a string.
fn number(value: &Value) -> f64 {
    value.as_str().and_then(|text| text.parse().ok()).unwrap_or_else(|| panic!("not a number: {value}"))
}

/// The display-matrix rotation ffprobe reports for the video stream (0 without one).
fn rotation(description: &Value) -> i64 {
    let side_data = stream(description, "video")["side_data_list"].as_array().cloned().unwrap_or_default();
    side_data.iter().find_map(|entry| entry["rotation"].as_i64()).unwrap_or(0)
}

/// Decodes `input` at `long_side`, passes the frames through unchanged and writes `output`, as the
/// pipeline does; damage reports are skipped, every other error ends the run.
fn transcode(input: &Path, output: &Path, long_side: u32, settings: &EncodeSettings) -> Result<VideoInfo, MediaError> {
    let info = probe(input)?;
    let reader = VideoReader::open(input, WorkingSize::LongSide(long_side))?;
    let spec = VideoWriterSpec::from_source(&info, reader.frame_size());
    let mut writer = VideoWriter::create(output, settings, spec)?;
    for item in reader {
        match item {
            Ok(frame) => writer.write(&frame)?,
            Err(MediaError::Damaged { .. }) => continue,
            Err(error) => return Err(error),
        }
    }
    writer.finish()?;
    Ok(info)
}

/// The first frame of `path` decoded at `size`.
fn first_frame(path: &Path, size: WorkingSize) -> Frame {
    VideoReader::open(path, size).unwrap().next().unwrap().unwrap()
}

/// The mean of each colour channel of a frame, 0–255.
fn channel_means(frame: &Frame) -> [f64; 3] {
    let mut sums = [0.0; 3];
    for pixel in frame.rgb.chunks_exact(3) {
        for (sum, &value) in sums.iter_mut().zip(pixel) {
            *sum += f64::from(value);
        }
    }
    sums.map(|sum| sum / (frame.rgb.len() / 3) as f64)
}

/// Asserts that re-encoding kept the first frame's overall colours: a wrong YUV range shifts the
/// channel means by several levels, compression noise by well under one. (The clips are too pale to
/// show a wrong matrix this way; `written_colours_decode_right_in_ffmpeg` covers that.)
fn assert_same_colours(input: &Path, output: &Path, long_side: u32) {
    let before = channel_means(&first_frame(input, WorkingSize::LongSide(long_side)));
    let after = channel_means(&first_frame(output, WorkingSize::Source));
    for (channel, (b, a)) in before.iter().zip(after).enumerate() {
        assert!((b - a).abs() < 1.5, "channel {channel} mean moved from {b:.2} to {a:.2}");
    }
}

/// Settings that encode quickly; the defaults otherwise.
fn quick_settings() -> EncodeSettings {
    EncodeSettings { preset: "veryfast".into(), ..EncodeSettings::default() }
}

#[test]
fn probe_describes_the_clips() {
    let bikes = probe(clip("bikes.mp4")).unwrap();
    assert_eq!((bikes.width, bikes.height), (640, 272));
    assert_eq!(bikes.frame_rate, (25, 1));
    assert_eq!(bikes.frame_count, 250);
    assert!((bikes.duration - 10.0).abs() < 1e-6, "duration {}", bikes.duration);
    assert_eq!(bikes.codec, "h264");
    assert_eq!(bikes.rotation, 0);
    assert_eq!(bikes.streams.len(), 1);
    assert_eq!(bikes.streams[0].kind, StreamKind::Video);
    assert!(!bikes.has_audio() && !bikes.has_subtitles());

    let bunny = probe(clip("bigbuckbunny.mp4")).unwrap();
    assert_eq!((bunny.width, bunny.height, bunny.frame_count), (1280, 720, 132));
    assert!(bunny.has_audio());
    assert_eq!(bunny.streams[1].codec, "aac");
}

#[test]
fn reader_yields_scaled_frames_in_presentation_order() {
    let reader = VideoReader::open(clip("bikes.mp4"), WorkingSize::LongSide(96)).unwrap();
    assert_eq!(reader.frame_size(), (96, 40));
    let frames: Vec<Frame> = reader.map(Result::unwrap).collect();
    assert_eq!(frames.len(), 250);
    for (position, pair) in frames.windows(2).enumerate() {
        assert!(pair[1].pts > pair[0].pts, "pts not increasing at {position}");
        assert_eq!(pair[1].index, pair[0].index + 1);
    }
    let first = &frames[0];
    assert_eq!((first.width, first.height, first.rgb.len()), (96, 40, 96 * 40 * 3));
    assert_eq!((first.pts, first.duration, first.time_base), (0, 512, (1, 12800)));
    assert!(first.rgb.iter().any(|&value| value > 16), "the picture is not black");

    let mut full_size = VideoReader::open(clip("bikes.mp4"), WorkingSize::Source).unwrap();
    let frame = full_size.next().unwrap().unwrap();
    assert_eq!((frame.width, frame.height, frame.rgb.len()), (640, 272, 640 * 272 * 3));
}

#[test]
fn reencoded_bikes_agree_with_the_input_in_frames_duration_and_streams() {
    let dir = TempDir::new().unwrap();
    let output = dir.path().join("bikes.mp4");
    transcode(&clip("bikes.mp4"), &output, 128, &EncodeSettings::default()).unwrap();
    assert_eq!(entries(dir.path()), ["bikes.mp4"], "only the finished file remains");

    let input = ffprobe(&clip("bikes.mp4"));
    let written = ffprobe(&output);
    assert_eq!(stream_list(&written), stream_list(&input));
    assert_eq!(stream(&written, "video")["nb_read_frames"], stream(&input, "video")["nb_read_frames"]);
    let frame_time = 1.0 / 25.0;
    let duration_gap = (number(&written["format"]["duration"]) - number(&input["format"]["duration"])).abs();
    assert!(duration_gap < frame_time, "durations differ by {duration_gap} s");
    let stream_gap =
        (number(&stream(&written, "video")["duration"]) - number(&stream(&input, "video")["duration"])).abs();
    assert!(stream_gap < frame_time, "video stream durations differ by {stream_gap} s");
    assert_eq!(stream(&written, "video")["width"], 128);
    assert_eq!(stream(&written, "video")["pix_fmt"], "yuv420p");
    assert_same_colours(&clip("bikes.mp4"), &output, 128);
}

#[test]
fn matroska_output_works_and_its_frames_are_counted() {
    let dir = TempDir::new().unwrap();
    let output = dir.path().join("bikes.mkv");
    transcode(&clip("bikes.mp4"), &output, 96, &quick_settings()).unwrap();
    let info = probe(&output).unwrap();
    assert_eq!(info.container, "matroska,webm");
    assert!(info.frame_count_counted, "Matroska has no frame count in its header");
    assert_eq!(info.frame_count, 250);
    assert!((info.duration - 10.0).abs() < 0.04, "duration {}", info.duration);
}

#[test]
fn damaged_data_is_reported_with_its_frame_and_decoding_goes_on() {
    let dir = TempDir::new().unwrap();
    let input = common::damaged_bikes(dir.path());

    let (mut frames, mut reports) = (0u64, Vec::new());
    for item in VideoReader::open(&input, WorkingSize::LongSide(96)).unwrap() {
        match item {
            Ok(_) => frames += 1,
            Err(MediaError::Damaged { frame, .. }) => reports.push(frame),
            Err(other) => panic!("unexpected error {other}"),
        }
    }
    assert!(!reports.is_empty(), "the damage is reported");
    assert!(reports.iter().all(|&frame| frame > 50 && frame < 200), "reported at frames {reports:?}");
    assert!(frames > 200, "decoding went on after the damage: {frames} frames");
}

#[test]
fn a_reader_opened_at_a_frame_yields_what_a_reader_from_the_start_does() {
    let dir = TempDir::new().unwrap();
    // The MP4 seeks by its index; the transport stream has none (FFmpeg seeks it by bytes).
    let transport = dir.path().join("bikes.ts");
    ffmpeg(&["-i", clip("bikes.mp4").to_str().unwrap(), "-c", "copy", "-an", transport.to_str().unwrap()]);
    for path in [clip("bikes.mp4"), transport] {
        let size = WorkingSize::LongSide(64);
        let frames: Vec<Frame> = VideoReader::open(&path, size).unwrap().map(Result::unwrap).collect();
        for index in [1, 37, 138, 200, frames.len() - 1] {
            for pts in [Some(frames[index].pts), None] {
                let reader = VideoReader::open_at(&path, size, index as u64, pts).unwrap();
                let opened: Vec<Frame> = reader.take(3).map(Result::unwrap).collect();
                let expected = &frames[index..(index + 3).min(frames.len())];
                assert_eq!(opened.len(), expected.len(), "{} at {index}", path.display());
                for (got, want) in opened.iter().zip(expected) {
                    assert_eq!((got.index, got.pts, got.duration), (want.index, want.pts, want.duration));
                    assert!(got.rgb == want.rgb, "{} frame {} differs (seek {pts:?})", path.display(), want.index);
                }
            }
        }
    }
}

/// A 64×48 RGB frame of four saturated patches (red, green, blue, yellow) in its quadrants.
fn colour_patches() -> Frame {
    const PATCHES: [[u8; 3]; 4] = [[200, 30, 30], [30, 200, 30], [30, 30, 200], [210, 200, 40]];
    let mut rgb = Vec::with_capacity(64 * 48 * 3);
    for y in 0..48 {
        for x in 0..64 {
            rgb.extend_from_slice(&PATCHES[usize::from(y >= 24) * 2 + usize::from(x >= 32)]);
        }
    }
    Frame { rgb, width: 64, height: 48, pts: 0, duration: 1, time_base: (1, 25), index: 0 }
}

/// The first frame of `path` as FFmpeg's own command line converts it to RGB24.
fn ffmpeg_rgb(path: &Path) -> Vec<u8> {
    let output = Command::new("ffmpeg")
        .args(["-v", "error", "-i"])
        .arg(path)
        .args(["-frames:v", "1", "-f", "rawvideo", "-pix_fmt", "rgb24", "-"])
        .output()
        .expect("ffmpeg runs");
    assert!(output.status.success());
    output.stdout
}

#[test]
fn written_colours_decode_right_in_ffmpeg() {
    let dir = TempDir::new().unwrap();
    let tags = [(None, None), (Some("bt709"), Some("tv")), (Some("bt709"), Some("pc")), (Some("bt470bg"), Some("tv"))];
    for (matrix, range) in tags {
        let output = dir.path().join("patches.mp4");
        let mut frame = colour_patches();
        let mut spec = VideoWriterSpec::new((64, 48), (1, 25));
        spec.color =
            ColorInfo { matrix: matrix.map(String::from), range: range.map(String::from), ..ColorInfo::default() };
        let mut writer = VideoWriter::create(&output, &quick_settings(), spec).unwrap();
        for pts in 0..2 {
            frame.pts = pts;
            writer.write(&frame).unwrap();
        }
        writer.finish().unwrap();
        let by_ffmpeg = ffmpeg_rgb(&output);
        let by_us = first_frame(&output, WorkingSize::Source).rgb;
        for (x, y) in [(16, 12), (48, 12), (16, 36), (48, 36)] {
            let at = (y * 64 + x) * 3;
            let expected = &frame.rgb[at..at + 3];
            for (decoder, decoded) in [("FFmpeg", &by_ffmpeg), ("our reader", &by_us)] {
                let got = &decoded[at..at + 3];
                let worst = expected.iter().zip(got).map(|(e, g)| e.abs_diff(*g)).max().unwrap();
                assert!(
                    worst <= 6,
                    "{matrix:?}/{range:?} at ({x}, {y}): wrote {expected:?}, {decoder} decodes {got:?}"
                );
            }
        }
    }
}

#[test]
fn a_stream_encoder_sends_each_frame_on_at_once_and_a_file_encoder_may_hold_some_back() {
    let dir = TempDir::new().unwrap();
    for (codec, container) in
        [("libx264", "mpegts"), ("libx265", "mpegts"), ("libvpx-vp9", "matroska"), ("libaom-av1", "matroska")]
    {
        let settings = EncodeSettings { codec: codec.into(), crf: 30, ..quick_settings() };
        let send = |location: &str, live: bool| {
            let spec = VideoWriterSpec::new((64, 48), (1, 25));
            let abort = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            let mut writer = match live {
                true => VideoWriter::create_live(location, Some(container), &settings, spec, None, abort),
                false => VideoWriter::create(location, &settings, spec),
            }
            .unwrap_or_else(|error| panic!("{codec}: {error}"));
            for index in 0..4 {
                writer.write(&Frame { pts: index, index: index as u64, ..colour_patches() }).unwrap();
            }
            let encoded = writer.frames_encoded();
            writer.finish().unwrap();
            encoded
        };
        // a file: the encoder's defaults (x264, libvpx and libaom, for three, look ahead)
        let file = dir.path().join(format!("{codec}.mkv"));
        let held_back = 4 - send(file.to_str().unwrap(), false);
        // a stream (FFmpeg's file:// protocol, so the test needs no receiver): nothing held back
        let url = format!("file://{}", dir.path().join(format!("{codec}-live.{container}")).display());
        assert_eq!(send(&url, true), 4, "{codec} held frames back in a stream (a file held back {held_back})");
    }
}

#[test]
fn a_muxer_that_writes_several_files_lands_them_together_or_leaves_nothing() {
    let dir = TempDir::new().unwrap();
    let write = |name: &str, frames: i64| {
        let mut spec = VideoWriterSpec::new((64, 48), (1, 2));
        spec.frame_rate = Some((2, 1));
        let mut writer = VideoWriter::create(dir.path().join(name), &quick_settings(), spec).unwrap();
        for index in 0..frames {
            writer.write(&Frame { pts: index, index: index as u64, time_base: (1, 2), ..colour_patches() }).unwrap();
        }
        writer
    };
    let unfinished = write("dropped.m3u8", 12);
    assert!(entries(dir.path()).iter().all(|name| name.starts_with('.')), "{:?}", entries(dir.path()));
    drop(unfinished);
    assert!(entries(dir.path()).is_empty(), "an unfinished output leaves nothing: {:?}", entries(dir.path()));

    // 30 frames at 2 a second in two-second segments: 8 segments, more than a live playlist keeps
    write("painted.m3u8", 30).finish().unwrap();
    let names = entries(dir.path());
    let playlist = std::fs::read_to_string(dir.path().join("painted.m3u8")).unwrap();
    let segments: Vec<&String> = names.iter().filter(|name| *name != "painted.m3u8").collect();
    assert_eq!((names.len(), segments.len()), (9, 8), "{names:?}");
    assert!(
        segments.iter().all(|name| name.starts_with("painted-") && playlist.contains(&format!("\n{name}\n"))),
        "every segment listed, each named after the playlist: {playlist}"
    );
    assert_eq!(stream(&ffprobe(&dir.path().join("painted.m3u8")), "video")["nb_read_frames"], "30");
    // an image sequence has no one file to move into place: refused before anything is written
    let spec = VideoWriterSpec::new((64, 48), (1, 2));
    let refused = VideoWriter::create(dir.path().join("frame%03d.png"), &quick_settings(), spec);
    assert!(matches!(refused, Err(MediaError::Unsupported { .. })), "{:?}", refused.err());
    // nor a playlist whose name the muxer would take for a number pattern of its segments
    let spec = VideoWriterSpec::new((64, 48), (1, 2));
    let refused = VideoWriter::create(dir.path().join("a%dx.m3u8"), &quick_settings(), spec);
    assert!(matches!(refused, Err(MediaError::Unsupported { .. })), "{:?}", refused.err());
    assert_eq!(entries(dir.path()).len(), 9);
}

#[test]
fn readers_and_writers_can_move_between_threads() {
    fn assert_send<T: Send>() {}
    assert_send::<VideoReader>();
    assert_send::<VideoWriter>();
}

#[test]
fn bigbuckbunny_audio_is_copied_with_its_duration() {
    let dir = TempDir::new().unwrap();
    let output = dir.path().join("bunny.mp4");
    transcode(&clip("bigbuckbunny.mp4"), &output, 160, &quick_settings()).unwrap();

    let input = ffprobe(&clip("bigbuckbunny.mp4"));
    let written = ffprobe(&output);
    assert_eq!(stream_list(&written), stream_list(&input));
    let (input_audio, written_audio) = (stream(&input, "audio"), stream(&written, "audio"));
    assert_eq!(written_audio["duration"], input_audio["duration"]);
    assert_eq!(written_audio["nb_read_frames"], input_audio["nb_read_frames"]);
    assert_eq!(written_audio["sample_rate"], input_audio["sample_rate"]);
    assert_eq!(stream(&written, "video")["nb_read_frames"], "132");
}

#[test]
fn variable_frame_rate_timestamps_are_preserved() {
    let dir = TempDir::new().unwrap();
    let input = dir.path().join("vfr.mp4");
    let input_arg = input.to_str().unwrap();
    let bikes = clip("bikes.mp4");
    let select = "select='not(between(n\\,10\\,19))*not(between(n\\,40\\,44))*not(eq(mod(n\\,7)\\,3))',scale=160:-2";
    ffmpeg(&[
        "-i",
        bikes.to_str().unwrap(),
        "-t",
        "4",
        "-vf",
        select,
        "-fps_mode",
        "vfr",
        "-c:v",
        "libx264",
        "-preset",
        "ultrafast",
        input_arg,
    ]);
    let output = dir.path().join("out.mp4");
    transcode(&input, &output, 96, &quick_settings()).unwrap();

    let input_pts = ffprobe_frame_pts(&input);
    let output_pts = ffprobe_frame_pts(&output);
    assert!(input_pts.len() > 50, "the test input has {} frames", input_pts.len());
    let gaps: std::collections::BTreeSet<i64> = input_pts.windows(2).map(|w| w[1] - w[0]).collect();
    assert!(gaps.len() > 1, "the test input is not variable-rate: gaps {gaps:?}");
    assert_eq!(stream(&ffprobe(&output), "video")["time_base"], stream(&ffprobe(&input), "video")["time_base"]);
    assert_eq!(output_pts, input_pts);
}

#[test]
fn rotation_and_colour_tags_are_carried() {
    let dir = TempDir::new().unwrap();
    let input = dir.path().join("rotated.mp4");
    let colour =
        "h264_metadata=colour_primaries=1:transfer_characteristics=1:matrix_coefficients=1:video_full_range_flag=0";
    let bikes = clip("bikes.mp4");
    ffmpeg(&[
        "-i",
        bikes.to_str().unwrap(),
        "-t",
        "1",
        "-c",
        "copy",
        "-bsf:v",
        colour,
        "-metadata:s:v",
        "rotate=90",
        input.to_str().unwrap(),
    ]);

    let info = probe(&input).unwrap();
    assert_eq!(info.rotation.abs(), 90);
    assert_eq!((info.width, info.height), (272, 640), "displayed size is turned");
    assert_eq!((info.coded_width, info.coded_height), (640, 272));
    assert_eq!(info.color.primaries.as_deref(), Some("bt709"));
    assert_eq!(info.color.matrix.as_deref(), Some("bt709"));
    assert_eq!(info.color.range.as_deref(), Some("tv"));

    let output = dir.path().join("out.mp4");
    transcode(&input, &output, 96, &quick_settings()).unwrap();
    let (source, written) = (ffprobe(&input), ffprobe(&output));
    assert_eq!(rotation(&written), rotation(&source));
    assert_ne!(rotation(&written), 0);
    for key in ["color_primaries", "color_transfer", "color_space", "color_range"] {
        assert_eq!(stream(&written, "video")[key], stream(&source, "video")[key], "{key}");
    }
    assert_eq!(probe(&output).unwrap().rotation, info.rotation);
    assert_same_colours(&input, &output, 96);
}

/// The first frame of `path`, upright as FFmpeg's command line shows it, scaled to `width`×`height`
/// RGB24.
fn ffmpeg_upright_rgb(path: &Path, (width, height): (u32, u32)) -> Vec<u8> {
    let output = Command::new("ffmpeg")
        .args(["-v", "error", "-i"])
        .arg(path)
        .args(["-frames:v", "1", "-vf", &format!("scale={width}:{height}"), "-f", "rawvideo", "-pix_fmt", "rgb24", "-"])
        .output()
        .expect("ffmpeg runs");
    assert!(output.status.success());
    output.stdout
}

fn mean_difference(a: &[u8], b: &[u8]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (*x as f64 - *y as f64).abs()).sum::<f64>() / a.len() as f64
}

#[test]
fn a_container_that_cannot_store_the_rotation_gets_upright_frames() {
    let dir = TempDir::new().unwrap();
    let input = dir.path().join("rotated.mp4");
    let bikes = clip("bikes.mp4");
    let (bikes, rotated) = (bikes.to_str().unwrap(), input.to_str().unwrap());
    ffmpeg(&["-i", bikes, "-t", "0.5", "-c", "copy", "-metadata:s:v", "rotate=90", rotated]);
    let source = probe(&input).unwrap();
    assert_eq!(source.rotation.abs(), 90);
    let output = dir.path().join("out.mkv");
    transcode(&input, &output, 96, &quick_settings()).unwrap();
    let written = probe(&output).unwrap();
    assert_eq!(written.rotation, 0, "Matroska stores no rotation here");
    assert_eq!((written.width, written.height), (written.coded_width, written.coded_height));
    assert!(
        written.height > written.width,
        "upright, as the source is displayed: {}×{}",
        written.width,
        written.height
    );
    let size = (written.width, written.height);
    let expected = ffmpeg_upright_rgb(&input, size);
    let ours = ffmpeg_upright_rgb(&output, size);
    let difference = mean_difference(&expected, &ours);
    // upside down would be as far from the source as any other picture
    let upside_down: Vec<u8> = ours.chunks_exact(3).rev().flatten().copied().collect();
    let wrong_way = mean_difference(&expected, &upside_down);
    assert!(difference < 8.0 && wrong_way > 3.0 * difference, "{difference} against {wrong_way} turned over");
    // a container that stores the rotation keeps the pixels as they are
    let mp4 = dir.path().join("out.mp4");
    transcode(&input, &mp4, 96, &quick_settings()).unwrap();
    let kept = probe(&mp4).unwrap();
    assert_eq!((kept.rotation, kept.coded_width > kept.coded_height), (source.rotation, true));
    assert!(mean_difference(&expected, &ffmpeg_upright_rgb(&mp4, size)) < 8.0);
}

#[test]
fn subtitles_are_copied() {
    let dir = TempDir::new().unwrap();
    let subtitles = dir.path().join("subs.srt");
    std::fs::write(&subtitles, "1\n00:00:00,200 --> 00:00:01,000\nHello\n\n2\n00:00:01,200 --> 00:00:01,800\nBikes\n")
        .unwrap();
    let input = dir.path().join("subtitled.mp4");
    let bikes = clip("bikes.mp4");
    ffmpeg(&[
        "-i",
        bikes.to_str().unwrap(),
        "-i",
        subtitles.to_str().unwrap(),
        "-t",
        "2",
        "-map",
        "0:v",
        "-map",
        "1",
        "-c:v",
        "copy",
        "-c:s",
        "mov_text",
        input.to_str().unwrap(),
    ]);
    assert!(probe(&input).unwrap().has_subtitles());

    let output = dir.path().join("out.mp4");
    transcode(&input, &output, 96, &quick_settings()).unwrap();
    let (source, written) = (ffprobe(&input), ffprobe(&output));
    assert_eq!(stream_list(&written), stream_list(&source));
    assert_eq!(stream(&written, "subtitle")["nb_read_frames"], stream(&source, "subtitle")["nb_read_frames"]);
}

#[test]
fn a_text_file_is_not_media() {
    let dir = TempDir::new().unwrap();
    let input = dir.path().join("notes.mp4");
    std::fs::write(&input, "These are notes, not a video.\n").unwrap();
    assert!(matches!(probe(&input), Err(MediaError::NotMedia { path }) if path == input));
    assert!(matches!(VideoReader::open(&input, WorkingSize::Source), Err(MediaError::NotMedia { .. })));
    let output = dir.path().join("out.mp4");
    assert!(matches!(transcode(&input, &output, 96, &quick_settings()), Err(MediaError::NotMedia { .. })));
    assert_eq!(entries(dir.path()), ["notes.mp4"]);
}

#[test]
fn a_missing_input_is_an_io_error() {
    let error = probe("/nonexistent/clip.mp4").unwrap_err();
    assert!(
        matches!(&error, MediaError::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound),
        "{error}"
    );
    assert!(error.to_string().contains("/nonexistent/clip.mp4"));
}

#[test]
fn a_file_truncated_before_its_index_is_corrupt() {
    let dir = TempDir::new().unwrap();
    let input = dir.path().join("truncated.mp4");
    let bytes = std::fs::read(clip("bikes.mp4")).unwrap();
    std::fs::write(&input, &bytes[..bytes.len() / 2]).unwrap();
    let error = probe(&input).unwrap_err();
    assert!(matches!(&error, MediaError::Corrupt { format, .. } if format.contains("mp4")), "{error}");
    let output = dir.path().join("out.mp4");
    assert!(matches!(transcode(&input, &output, 96, &quick_settings()), Err(MediaError::Corrupt { .. })));
    assert_eq!(entries(dir.path()), ["truncated.mp4"]);
}

#[test]
fn a_file_truncated_mid_data_is_reported_and_leaves_no_output() {
    let dir = TempDir::new().unwrap();
    let input = common::truncated_bikes(dir.path());

    let output = dir.path().join("out.mp4");
    let error = transcode(&input, &output, 96, &quick_settings()).unwrap_err();
    assert!(matches!(&error, MediaError::Truncated { frames, .. } if *frames > 50 && *frames < 250), "{error}");
    assert_eq!(entries(dir.path()), ["truncated.mp4"], "no output or partial file is left");
}

#[test]
fn an_audio_only_file_has_no_video_stream() {
    let dir = TempDir::new().unwrap();
    let input = dir.path().join("tone.m4a");
    ffmpeg(&["-f", "lavfi", "-i", "sine=frequency=440:duration=1", "-c:a", "aac", input.to_str().unwrap()]);
    let error = probe(&input).unwrap_err();
    assert!(matches!(&error, MediaError::NoVideoStream { streams, .. } if streams.contains("audio (aac)")), "{error}");
    let output = dir.path().join("out.mp4");
    assert!(matches!(transcode(&input, &output, 96, &quick_settings()), Err(MediaError::NoVideoStream { .. })));
    assert_eq!(entries(dir.path()), ["tone.m4a"]);
}

#[test]
fn a_zero_frame_file_is_reported() {
    let dir = TempDir::new().unwrap();
    let input = dir.path().join("empty.avi");
    ffmpeg(&["-i", clip("bikes.mp4").to_str().unwrap(), "-frames:v", "0", "-c:v", "copy", input.to_str().unwrap()]);
    assert!(matches!(probe(&input), Err(MediaError::ZeroFrames { .. })));
    let mut reader = VideoReader::open(&input, WorkingSize::LongSide(96)).unwrap();
    assert!(matches!(reader.next(), Some(Err(MediaError::ZeroFrames { .. }))));
    assert!(reader.next().is_none());
    let output = dir.path().join("out.mp4");
    assert!(matches!(transcode(&input, &output, 96, &quick_settings()), Err(MediaError::ZeroFrames { .. })));
    assert_eq!(entries(dir.path()), ["empty.avi"]);
}

/// A writer spec for small grey test frames.
fn grey_spec() -> (VideoWriterSpec, Frame) {
    let frame =
        Frame { rgb: vec![128; 64 * 48 * 3], width: 64, height: 48, pts: 0, duration: 1, time_base: (1, 25), index: 0 };
    let mut spec = VideoWriterSpec::new((64, 48), (1, 25));
    spec.frame_rate = Some((25, 1));
    (spec, frame)
}

#[test]
fn a_missing_output_directory_is_reported() {
    let dir = TempDir::new().unwrap();
    let output = dir.path().join("missing").join("out.mp4");
    let (spec, _) = grey_spec();
    let error = VideoWriter::create(&output, &quick_settings(), spec).err().expect("fails");
    assert!(
        matches!(&error, MediaError::OutputDirectory { dir: missing, .. } if missing.ends_with("missing")),
        "{error}"
    );
    assert!(entries(dir.path()).is_empty());
}

#[test]
fn unknown_containers_codecs_and_pixel_formats_are_reported() {
    let dir = TempDir::new().unwrap();
    let (spec, _) = grey_spec();
    let error =
        VideoWriter::create(dir.path().join("out.nosuchformat"), &quick_settings(), spec.clone()).err().unwrap();
    assert!(matches!(&error, MediaError::UnknownContainer { extension, .. } if extension == "nosuchformat"), "{error}");
    let no_codec = EncodeSettings { codec: "nosuchcodec".into(), ..quick_settings() };
    let error = VideoWriter::create(dir.path().join("out.mp4"), &no_codec, spec.clone()).err().unwrap();
    assert!(matches!(&error, MediaError::UnknownCodec { codec } if codec == "nosuchcodec"), "{error}");
    let no_format = EncodeSettings { pixel_format: "nosuchformat".into(), ..quick_settings() };
    assert!(matches!(
        VideoWriter::create(dir.path().join("out.mp4"), &no_format, spec.clone()),
        Err(MediaError::Settings(_))
    ));
    let bad_preset = EncodeSettings { preset: "nosuchpreset".into(), ..quick_settings() };
    assert!(matches!(VideoWriter::create(dir.path().join("out.mp4"), &bad_preset, spec), Err(MediaError::Settings(_))));
    assert!(entries(dir.path()).is_empty(), "left behind: {:?}", entries(dir.path()));
}

#[test]
fn an_unfinished_or_empty_output_leaves_nothing() {
    let dir = TempDir::new().unwrap();
    let output = dir.path().join("out.mkv");
    let (spec, mut frame) = grey_spec();
    let mut writer = VideoWriter::create(&output, &quick_settings(), spec.clone()).unwrap();
    for pts in 0..3 {
        frame.pts = pts;
        writer.write(&frame).unwrap();
    }
    assert_eq!(entries(dir.path()).len(), 1, "a partial file exists while writing");
    drop(writer);
    assert!(entries(dir.path()).is_empty(), "left behind: {:?}", entries(dir.path()));

    let writer = VideoWriter::create(&output, &quick_settings(), spec).unwrap();
    assert!(matches!(writer.finish(), Err(MediaError::EmptyOutput { .. })));
    assert!(entries(dir.path()).is_empty());
}

#[test]
fn frames_that_do_not_fit_the_stream_are_rejected() {
    let dir = TempDir::new().unwrap();
    let (spec, mut frame) = grey_spec();
    let mut writer = VideoWriter::create(dir.path().join("out.mp4"), &quick_settings(), spec).unwrap();
    writer.write(&frame).unwrap();
    assert!(matches!(writer.write(&frame), Err(MediaError::BadFrame { frame: 1, .. })), "same pts twice");
    frame.pts = 1;
    frame.width = 32;
    assert!(matches!(writer.write(&frame), Err(MediaError::BadFrame { .. })), "wrong size");
    frame.width = 64;
    frame.time_base = (0, 0);
    assert!(matches!(writer.write(&frame), Err(MediaError::BadFrame { .. })), "no time base");
}

#[test]
fn the_writer_scales_to_the_output_size_policy() {
    let dir = TempDir::new().unwrap();
    let output = dir.path().join("scaled.mp4");
    let settings = EncodeSettings { output_size: OutputSize::LongSide(33), ..quick_settings() };
    let (spec, mut frame) = grey_spec();
    let mut writer = VideoWriter::create(&output, &settings, spec).unwrap();
    assert_eq!(writer.output_size(), (32, 24));
    for pts in 0..5 {
        frame.pts = pts;
        writer.write(&frame).unwrap();
    }
    writer.finish().unwrap();
    let written = ffprobe(&output);
    assert_eq!(
        (stream(&written, "video")["width"].as_i64(), stream(&written, "video")["height"].as_i64()),
        (Some(32), Some(24))
    );
    assert_eq!(stream(&written, "video")["nb_read_frames"], "5");
}

#[test]
fn encode_settings_have_defaults_and_reject_unknown_fields() {
    let defaults: EncodeSettings = toml::from_str("").unwrap();
    assert_eq!(defaults, EncodeSettings::default());
    assert_eq!((defaults.codec.as_str(), defaults.crf, defaults.preset.as_str()), ("libx264", 18, "medium"));
    assert_eq!((defaults.pixel_format.as_str(), defaults.output_size), ("yuv420p", OutputSize::Frames));
    let custom: EncodeSettings = toml::from_str("crf = 23\noutput_size = { long_side = 720 }").unwrap();
    assert_eq!((custom.crf, custom.output_size), (23, OutputSize::LongSide(720)));
    let source: EncodeSettings = toml::from_str("output_size = \"source\"").unwrap();
    assert_eq!(source.output_size, OutputSize::Source);
    assert!(toml::from_str::<EncodeSettings>("bitrate = 5").is_err());
}
