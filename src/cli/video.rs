//! `impasto video IN --style S [--style S2 …] -o OUT`: the main job. Paints every frame of a video,
//! steady from frame to frame, with a progress bar (frame i/N, seconds per frame, ETA, losses) or JSON
//! lines, every setting from a profile with flags on top, an optional JSON report, and resume after a
//! crash by simply running the same command again.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Args;
use impasto::media::OutputSize;
use impasto::pipeline::{FrameRecord, JobEvent, Report, TemporalMode, VideoJob, VideoSettings};
use impasto::profile::Profile;
use impasto::style::{StyleImage, StyleSettings};
use impasto::{Error, imageio};
use serde_json::json;

use super::image::LossFlags;
use super::model::ModelFlags;
use super::progress::Reporter;

/// Arguments of `impasto video`.
#[derive(Args, Debug)]
pub struct VideoArgs {
    /// The input video (anything FFmpeg reads).
    pub input: PathBuf,
    /// Style image(s); repeat for a blend.
    #[arg(long, short, required = true)]
    pub style: Vec<PathBuf>,
    /// Output video; the container follows the extension (.mp4, .mkv, .mov, …).
    #[arg(long, short)]
    pub output: PathBuf,
    /// Write a JSON report: per-frame losses, iterations, seconds per stage, E_warp.
    #[arg(long, value_name = "FILE")]
    pub report: Option<PathBuf>,
    /// Progress as JSON lines on stdout.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub video_flags: VideoFlags,
    #[command(flatten)]
    pub model_flags: ModelFlags,
}

/// Video and style flags; each overrides the profile when given.
#[derive(Args, Debug, Clone, Default)]
pub struct VideoFlags {
    /// Profile: a TOML file, or a name in ./config (e.g. `default`, `quick`).
    #[arg(long, short = 'p')]
    pub profile: Option<String>,
    #[command(flatten)]
    pub loss: LossFlags,
    /// Working long side in pixels (0: the source's size).
    #[arg(long)]
    pub size: Option<u32>,
    /// Most iterations of the later frames of a shot.
    #[arg(long, short = 'n')]
    pub iterations: Option<u32>,
    /// Iterations of the first frame of every shot.
    #[arg(long)]
    pub first_iterations: Option<u32>,
    /// Temporal mode: flow (warp the previous output along the optical flow), previous or independent.
    #[arg(long)]
    pub temporal: Option<TemporalMode>,
    /// Temporal loss weight, relative to the shot's first-frame content+style loss.
    #[arg(long)]
    pub temporal_weight: Option<f64>,
    /// Later frames stop when the relative loss change stays below this (0 = never).
    #[arg(long)]
    pub tolerance: Option<f64>,
    /// Later frames begin L-BFGS with the curvature learnt on the frame before: true or false
    /// (every frame afresh). Video jobs only.
    #[arg(long, value_name = "BOOL")]
    pub carry_curvature: Option<bool>,
    /// Runs of consecutive frames painted side by side in one batch (1: frame after frame).
    #[arg(long)]
    pub segments: Option<u32>,
    /// Frames each run but the first paints before its own, cross-faded from the run before.
    #[arg(long)]
    pub segment_overlap: Option<u32>,
    /// Output size: frames (the working size), source, or a long side in pixels.
    #[arg(long, value_parser = parse_output_size)]
    pub output_size: Option<OutputSize>,
    /// Video encoder (FFmpeg name, e.g. libx264).
    #[arg(long)]
    pub codec: Option<String>,
    /// Encoder quality (CRF; lower is better).
    #[arg(long)]
    pub crf: Option<u8>,
    /// Encoder speed preset (e.g. medium).
    #[arg(long)]
    pub preset: Option<String>,
}

/// `frames`, `source` or a long side in pixels.
fn parse_output_size(text: &str) -> Result<OutputSize, String> {
    match text.trim().to_ascii_lowercase().as_str() {
        "frames" | "working" => Ok(OutputSize::Frames),
        "source" => Ok(OutputSize::Source),
        number => number
            .parse()
            .map(OutputSize::LongSide)
            .map_err(|_| format!("'{text}': expected 'frames', 'source' or a long side in pixels")),
    }
}

impl VideoFlags {
    /// The profile named by `--profile` (or the built-in defaults).
    pub fn profile(&self) -> Result<Profile> {
        Ok(Profile::named_or_default(self.profile.as_deref())?)
    }

    /// The profile's video settings with these flags applied.
    pub fn apply_video(&self, mut video: VideoSettings) -> VideoSettings {
        apply_flags!(self => video; size, iterations, first_iterations, temporal, temporal_weight, tolerance,
            carry_curvature, segments, segment_overlap);
        if let Some(size) = self.output_size {
            video.encode.output_size = size;
        }
        if let Some(codec) = &self.codec {
            video.encode.codec = codec.clone();
        }
        if let Some(crf) = self.crf {
            video.encode.crf = crf;
        }
        if let Some(preset) = &self.preset {
            video.encode.preset = preset.clone();
        }
        video
    }

    /// The profile's style settings with these flags applied.
    pub fn apply_style(&self, style: StyleSettings) -> StyleSettings {
        self.loss.apply(style)
    }
}

/// Runs `impasto video`.
pub fn run(args: VideoArgs) -> Result<()> {
    let profile = args.video_flags.profile()?;
    let video = args.video_flags.apply_video(profile.video);
    let style = args.video_flags.apply_style(profile.style);
    let model_settings = args.model_flags.apply(profile.model);
    style.validate()?;
    video.validate()?;
    if let Some(report) = &args.report {
        check_report_path(report)?;
    }
    let styles = read_styles(&args.style)?;
    let model_identity = impasto::model::identity(&model_settings)?;
    let job = VideoJob {
        input: args.input.clone(),
        output: args.output.clone(),
        styles,
        style,
        video,
        model_identity,
        measure_warping: args.report.is_some(),
    };
    let prepared = job.prepare().with_context(|| format!("painting '{}'", args.input.display()))?;
    let (width, height) = prepared.frame_size();
    eprintln!(
        "impasto: {} frames at {width}×{height}; the progress bar estimates the time left",
        prepared.frame_count()
    );
    let device = model_settings.device.to_string();
    let total = prepared.frame_count();
    let report = super::catch_torch(&device, || {
        let vgg = impasto::model::load(&model_settings)?;
        let mut progress = VideoProgress::new(total, args.json);
        let report = prepared.run(&vgg, &mut |event| progress.show(event))?;
        progress.reporter.finish(json!({}));
        Ok(report)
    })
    .with_context(|| format!("painting '{}'", args.input.display()))?;
    if let Some(path) = &args.report {
        report.write(path)?;
    }
    print_summary(&report, args.json);
    Ok(())
}

/// The style images, each read (errors name the file).
pub(super) fn read_styles(paths: &[PathBuf]) -> impasto::Result<Vec<StyleImage>> {
    paths.iter().map(|path| Ok(StyleImage { image: imageio::read_rgb(path)?, weight: 1.0 })).collect()
}

/// Fails early when the report's directory does not exist.
fn check_report_path(report: &Path) -> impasto::Result<()> {
    let dir = impasto::fsutil::folder_of(report);
    if dir.is_dir() {
        return Ok(());
    }
    Err(Error::io(report, std::io::Error::new(std::io::ErrorKind::NotFound, "the report's directory does not exist")))
}

/// The progress bar (or JSON lines) of a video job.
struct VideoProgress {
    reporter: Reporter,
    json: bool,
    total: u64,
    frames_done: u64,
    started: Instant,
    painted_seconds: f64,
    painted_frames: u64,
}

impl VideoProgress {
    fn new(total: u64, json: bool) -> Self {
        VideoProgress {
            reporter: Reporter::new(total, json, "frames"),
            json,
            total,
            frames_done: 0,
            started: Instant::now(),
            painted_seconds: 0.0,
            painted_frames: 0,
        }
    }

    /// Shows one event.
    fn show(&mut self, event: JobEvent<'_>) {
        match event {
            JobEvent::Iteration { index, done, planned } if !self.json => {
                let message = format!("frame {index}: iteration {done}/{planned} · {}", self.rate());
                self.reporter.step(self.frames_done, self.total, &message, json!({}));
            }
            JobEvent::Iteration { .. } => {}
            JobEvent::Frame { record, done, total, .. } => self.frame_done(record, done, total),
        }
    }

    fn frame_done(&mut self, record: &FrameRecord, done: u64, total: u64) {
        self.frames_done = done;
        if !record.resumed {
            self.painted_seconds = self.started.elapsed().as_secs_f64();
            self.painted_frames += 1;
        } else {
            self.started = Instant::now();
        }
        let losses = &record.losses;
        let message = format!(
            "{} · style {:.3e} content {:.3e}{}",
            self.rate(),
            losses.style,
            losses.content,
            record.warping_error.map(|e| format!(" E_warp {e:.4}")).unwrap_or_default()
        );
        self.reporter.step(self.frames_done, total, &message, json!({ "frame": record }));
    }

    /// Seconds per painted frame so far.
    fn rate(&self) -> String {
        if self.painted_frames == 0 {
            return "– s/frame".into();
        }
        format!("{:.1} s/frame", self.painted_seconds / self.painted_frames as f64)
    }
}

/// The closing lines: where the video went, its stability and speed.
fn print_summary(report: &Report, json: bool) {
    let seconds = report.seconds_per_frame;
    if json {
        let line = json!({"event": "summary", "output": report.output, "frames": report.frame_count,
            "resumed_frames": report.resumed_frames, "scene_cuts": report.scene_cuts,
            "warping_error": report.warping_error, "seconds_per_frame": seconds, "wall_s": report.wall_seconds});
        println!("{line}");
        return;
    }
    let warping = report.warping_error.mean.map(|e| format!(", E_warp {e:.5}")).unwrap_or_default();
    eprintln!(
        "impasto: wrote {} ({} frames, {} resumed, {} scene cuts{warping}) in {:.0} s; per frame: decode {:.2} s, \
         flow {:.2} s, optimise {:.2} s, encode {:.2} s",
        report.output.display(),
        report.frame_count,
        report.resumed_frames,
        report.scene_cuts,
        report.wall_seconds,
        seconds.decode,
        seconds.flow,
        seconds.optimise,
        seconds.encode
    );
}
