//! Videos in, painted videos out, steady from frame to frame. This module ties the engine (`style`),
//! the motion (`flow`) and, behind the `media` feature, FFmpeg (`media`) into a job: threads
//! (decode → motion → paint → encode) joined by bounded channels, the optical flow measured a frame
//! ahead (`motion`), temporal coherence after Ruder et al. (2016),
//! scene cuts that restart the sequence, per-frame checkpoints that make a killed job resumable, and a
//! report with the warping error E_warp of Lai et al. (2018). A live stream goes the same way without
//! waiting for the painter (`stream`). The parts that need no FFmpeg (settings,
//! the motion, the frame painter, checkpoints, reports) build without it.
//!
//! ```no_run
//! # fn job(vgg: &impasto::model::Vgg, styles: Vec<impasto::style::StyleImage>) -> impasto::Result<()> {
//! use impasto::pipeline::{VideoJob, VideoSettings};
//! let job = VideoJob {
//!     input: "in.mp4".into(),
//!     output: "out.mp4".into(),
//!     styles,
//!     style: Default::default(),
//!     video: VideoSettings::default(),
//!     model_identity: serde_json::json!("vgg16"),
//!     measure_warping: true,
//! };
//! let report = job.prepare()?.run(vgg, &mut |_event| {})?;
//! println!("E_warp {:?}", report.warping_error.mean);
//! # Ok(()) }
//! ```

pub mod checkpoint;
#[cfg(feature = "media")]
mod eval;
#[cfg(feature = "media")]
mod job;
pub mod motion;
mod painter;
pub mod report;
mod resample;
pub mod segments;
mod settings;
#[cfg(feature = "media")]
mod stages;
#[cfg(feature = "media")]
mod stream;

#[cfg(feature = "media")]
pub use eval::{Evaluation, WarpingPair, evaluate};
#[cfg(feature = "media")]
pub use job::{JobEvent, PreparedJob, VideoJob};
pub use painter::{FramePainter, FramePlan, PaintedFrame};
pub use report::{FrameLosses, FrameRecord, FrameSeconds, Report, Start, WarpingSummary};
pub use settings::{EncodeSettings, TemporalMode, VideoSettings};
#[cfg(feature = "media")]
pub use stream::{Pace, StreamFrame, StreamJob, StreamStop, StreamSummary};
