//! What a video job measured, frame by frame: how each frame was started, its losses and iterations,
//! where its time went (decode, flow, optimise, encode) and the warping error E_warp of Lai et al.
//! (2018) against the frame before. The same record is a checkpoint manifest line and a report entry,
//! so a resumed job still reports every frame.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::style::Losses;

/// How a frame's optimisation started.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Start {
    /// The first frame of the video: from the content, first-frame settings.
    First,
    /// The first frame after a scene cut: from the content, first-frame settings.
    SceneCut,
    /// `independent` mode: from the content, first-frame settings.
    Content,
    /// `previous` mode: from the previous output.
    Previous,
    /// `flow` mode: from the previous output warped along the flow, holes filled from the content.
    Warped,
}

impl Start {
    /// Whether the frame began a new sequence (first-frame settings, no temporal term).
    pub fn is_fresh(self) -> bool {
        matches!(self, Start::First | Start::SceneCut | Start::Content)
    }
}

/// The loss values of a frame's last iteration.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct FrameLosses {
    /// L_content, unweighted.
    pub content: f64,
    /// L_style, unweighted.
    pub style: f64,
    /// The weighted temporal term (0 without one).
    pub temporal: f64,
    /// The weighted total.
    pub total: f64,
}

impl From<Losses> for FrameLosses {
    fn from(losses: Losses) -> Self {
        FrameLosses { content: losses.content, style: losses.style, temporal: losses.temporal, total: losses.total }
    }
}

/// Seconds a frame spent in each stage.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct FrameSeconds {
    /// Decoding, scaling and conversion to a tensor.
    pub decode: f64,
    /// Optical flow, reliability, scene-cut test and warping. In a video job the flow is measured
    /// on its own thread while the frame before is painted, so this time overlaps the others'.
    pub flow: f64,
    /// The style optimisation (and the colour handling after it).
    pub optimise: f64,
    /// Encoding, and storing the checkpoint.
    pub encode: f64,
}

impl FrameSeconds {
    /// All stages together.
    pub fn total(&self) -> f64 {
        self.decode + self.flow + self.optimise + self.encode
    }
}

/// Everything recorded about one painted frame.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FrameRecord {
    /// Position in the video, from 0.
    pub index: u64,
    /// Presentation timestamp, in the input stream's time base.
    pub pts: i64,
    /// How the optimisation started.
    pub start: Start,
    /// Iterations run.
    pub iterations: usize,
    /// Whether L-BFGS began with the curvature it learnt on the frame before (see
    /// `video.carry_curvature`) rather than afresh.
    #[serde(default)]
    pub curvature_carried: bool,
    /// Losses at the last iteration.
    pub losses: FrameLosses,
    /// The shot's loss scale that the relative temporal weight multiplies (0 when unused).
    pub loss_scale: f64,
    /// E_warp between this output frame and the previous one warped by the input's flow; absent for the
    /// first frame, across scene cuts and when the flow was not computed.
    pub warping_error: Option<f64>,
    /// Time spent per stage.
    pub seconds: FrameSeconds,
    /// Whether this run took the frame from a checkpoint (its flow and optimise times are the
    /// earlier run's).
    #[serde(default)]
    pub resumed: bool,
    /// Whether this is a segment's lead-in picture of the frame (painted to be blended into the
    /// previous segment's last frames, see [`super::segments`]) rather than the frame's own.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub lead_in: bool,
}

/// Mean E_warp over the frame pairs that have one.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct WarpingSummary {
    /// The mean, absent when no pair was measured.
    pub mean: Option<f64>,
    /// How many pairs the mean is over.
    pub pairs: usize,
}

impl WarpingSummary {
    /// The mean of the values present.
    pub fn of(values: impl IntoIterator<Item = Option<f64>>) -> Self {
        let measured: Vec<f64> = values.into_iter().flatten().collect();
        let mean = (!measured.is_empty()).then(|| measured.iter().sum::<f64>() / measured.len() as f64);
        WarpingSummary { mean, pairs: measured.len() }
    }
}

/// The report of a finished video job (`--report`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// The input video.
    pub input: PathBuf,
    /// The painted video.
    pub output: PathBuf,
    /// Working size (`width`, `height`) the frames were painted at.
    pub working_size: (u32, u32),
    /// The device the frames were painted on (`cpu`, `cuda:0`).
    #[serde(default)]
    pub device: String,
    /// The network's precision there (`precision = "auto"` settled for the device).
    #[serde(default)]
    pub precision: String,
    /// The temporal mode.
    pub temporal: super::TemporalMode,
    /// Runs of consecutive frames painted side by side (1: frame after frame).
    #[serde(default)]
    pub segments: u64,
    /// Iterations spent in this run on the segments' lead-in pictures (cross-faded into the frames
    /// before each segment; not in `frames`).
    #[serde(default)]
    pub lead_in_iterations: u64,
    /// Frames written.
    pub frame_count: u64,
    /// Frames taken from a checkpoint of an earlier, interrupted run.
    pub resumed_frames: u64,
    /// Scene cuts found (frames that restarted the sequence after the first).
    pub scene_cuts: u64,
    /// E_warp over the video.
    pub warping_error: WarpingSummary,
    /// Mean seconds per frame and stage, over the frames painted in this run.
    pub seconds_per_frame: FrameSeconds,
    /// Wall-clock seconds of the whole job.
    pub wall_seconds: f64,
    /// Damaged data met while decoding (decoding went on).
    pub damaged: Vec<String>,
    /// Every frame.
    pub frames: Vec<FrameRecord>,
}

impl Report {
    /// Builds the summary fields from the frame records.
    pub fn summarise(mut self) -> Self {
        self.frame_count = self.frames.len() as u64;
        self.resumed_frames = self.frames.iter().filter(|f| f.resumed).count() as u64;
        self.scene_cuts = self.frames.iter().filter(|f| f.start == Start::SceneCut).count() as u64;
        self.warping_error = WarpingSummary::of(self.frames.iter().map(|f| f.warping_error));
        self.seconds_per_frame = mean_seconds(self.frames.iter().filter(|f| !f.resumed));
        self
    }

    /// Writes the report as pretty JSON, atomically.
    pub fn write(&self, path: &Path) -> Result<()> {
        write_json(path, self)
    }
}

/// Writes any report as pretty JSON through a temporary file.
pub fn write_json(path: &Path, value: &impl Serialize) -> Result<()> {
    let text = serde_json::to_string_pretty(value).map_err(|e| Error::Settings(format!("report: {e}")))?;
    crate::fsutil::write_atomically(path, |temporary| {
        std::fs::write(temporary, text.as_bytes()).map_err(|e| Error::io(path, e))
    })
}

/// Per-stage means over `records` (zeros for none).
fn mean_seconds<'a>(records: impl Iterator<Item = &'a FrameRecord>) -> FrameSeconds {
    let mut sum = FrameSeconds::default();
    let mut count = 0usize;
    for record in records {
        sum.decode += record.seconds.decode;
        sum.flow += record.seconds.flow;
        sum.optimise += record.seconds.optimise;
        sum.encode += record.seconds.encode;
        count += 1;
    }
    let n = count.max(1) as f64;
    FrameSeconds { decode: sum.decode / n, flow: sum.flow / n, optimise: sum.optimise / n, encode: sum.encode / n }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warping_summary_skips_missing_pairs() {
        let summary = WarpingSummary::of([None, Some(0.5), Some(1.5), None]);
        assert_eq!(summary, WarpingSummary { mean: Some(1.0), pairs: 2 });
        assert_eq!(WarpingSummary::of([None]).mean, None);
    }
}
