//! Painting synthetic moving frames as a video job paints a video, without FFmpeg: the motion into
//! each frame measured `ahead`, on its own thread (as a job's motion stage does), or `inline`, on the
//! painting thread before each frame, so what the overlap gains can be timed on any machine that has
//! libtorch, the GPU machine included.

use std::time::Instant;

use crossbeam_channel::{Receiver, bounded};
use serde::Serialize;
use tch::{Device, Tensor};

use super::{peak_rss_mib, synchronize, synthetic_image};
use crate::device::{device_name, memory};
use crate::error::{Error, Result};
use crate::model::Vgg;
use crate::pipeline::motion::{Motion, MotionTracker};
use crate::pipeline::{FramePainter, FramePlan, FrameRecord, VideoSettings};
use crate::style::{BatchFeed, BatchItem, Losses, Optimised, StyleImage, StyleSettings};

/// Where the motion into each frame is measured.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum MotionPlace {
    /// On its own thread, a frame ahead of the painting.
    Ahead,
    /// On the painting thread, before each frame.
    Inline,
}

/// What to paint: `frames` frames of `width` × `height`, each the one before moved 2 pixels right
/// and 1 down, `iterations` iterations each (no early stop), the motion measured at `motion`.
#[derive(Clone, Copy, Debug)]
pub struct PaintingCase {
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// Frames painted (at least 2; the first, which has no motion into it, is not timed).
    pub frames: usize,
    /// Iterations per frame.
    pub iterations: usize,
    /// Where the motion is measured.
    pub motion: MotionPlace,
}

/// One measured [`PaintingCase`].
#[derive(Clone, Debug, Serialize)]
pub struct PaintingBenchRow {
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// Device the network ran on.
    pub device: String,
    /// Network precision as it ran.
    pub precision: String,
    /// Activation memory layout.
    pub layout: String,
    /// Where the motion was measured.
    pub motion: MotionPlace,
    /// Frames timed (all but the first).
    pub frames: usize,
    /// Iterations per timed frame.
    pub iterations_per_frame: f64,
    /// Wall seconds per timed frame.
    pub seconds_per_frame: f64,
    /// Seconds of the motion per timed frame, on whichever thread measured it.
    pub flow_seconds_per_frame: f64,
    /// Seconds of the optimisation per timed frame.
    pub optimise_seconds_per_frame: f64,
    /// Peak resident memory of the process so far, MiB.
    pub peak_rss_mib: f64,
    /// On CUDA: the most the caching allocator held in tensors since the process started, MiB.
    pub cuda_max_allocated_mib: Option<f64>,
}

/// Paints one [`PaintingCase`] in flow mode with `video`'s motion settings and `style`'s losses.
pub fn bench_painting(
    vgg: &Vgg,
    style: &StyleSettings,
    video: &VideoSettings,
    case: PaintingCase,
) -> Result<PaintingBenchRow> {
    let iterations = case.iterations.max(1) as u32;
    let style = StyleSettings { tolerance: 0.0, ..style.clone() };
    let video = VideoSettings { first_iterations: iterations, iterations, tolerance: 0.0, ..video.clone() };
    let frames = moving_frames(case.width, case.height, case.frames.max(2), vgg.device());
    let style_image = StyleImage { image: synthetic_image(case.width, case.height, 2), weight: 1.0 };
    let long_side = case.width.max(case.height);
    let painter = FramePainter::new(vgg, &style, &video, &[style_image], long_side, false)?;
    let runner = painter.runner();
    let (motion_sender, motion_receiver) = bounded(1);
    let ahead = case.motion == MotionPlace::Ahead;
    let mut feed = PaintingFeed {
        painter,
        frames: frames.iter().map(Tensor::shallow_clone).collect(),
        motions: ahead.then_some(motion_receiver),
        painting: None,
        records: Vec::new(),
        first_done: None,
        failure: None,
    };
    std::thread::scope(|scope| {
        if ahead {
            let video = &video;
            scope.spawn(move || measure_ahead(video, frames, motion_sender));
        } else {
            drop(motion_sender);
        }
        runner.optimise_refilled(1, &mut feed);
        feed.motions = None; // lets the motion thread end if the painting stopped early
    });
    if let Some(error) = feed.failure {
        return Err(error);
    }
    synchronize(vgg.device());
    Ok(feed.row(vgg, case))
}

/// `count` smooth frames, each the one before moved 2 pixels right and 1 down.
fn moving_frames(width: u32, height: u32, count: usize, device: Device) -> Vec<Tensor> {
    let coarse = synthetic_image(width.div_ceil(8), height.div_ceil(8), 1);
    let coarse = crate::imageio::rgb_to_tensor(&coarse);
    let smooth = coarse.upsample_bicubic2d([height as i64, width as i64], false, None, None).clamp(0.0, 1.0);
    let smooth = smooth.to_device(device);
    (0..count as i64).map(|k| smooth.roll([2 * k, k], [3, 2])).collect()
}

/// The motion stage of the benchmark: the motion into every frame, in order, one frame ahead.
fn measure_ahead(
    video: &VideoSettings,
    frames: Vec<Tensor>,
    sender: crossbeam_channel::Sender<Result<Option<Motion>>>,
) {
    let mut tracker = MotionTracker::new(video, false);
    for (index, frame) in frames.iter().enumerate() {
        if sender.send(tracker.next(index as u64, frame)).is_err() {
            return;
        }
    }
}

/// The painting side: plans each frame with the motion from the motion thread (or none, so the
/// painter measures it), finishes it, keeps its record.
struct PaintingFeed<'m> {
    painter: FramePainter<'m>,
    frames: Vec<Tensor>,
    motions: Option<Receiver<Result<Option<Motion>>>>,
    painting: Option<(FramePlan, Instant)>,
    records: Vec<FrameRecord>,
    /// When the first frame was done: the timed part starts there.
    first_done: Option<Instant>,
    failure: Option<Error>,
}

impl PaintingFeed<'_> {
    /// The next frame's item.
    fn plan_next(&mut self) -> Result<Option<BatchItem>> {
        let index = self.records.len();
        let Some(frame) = self.frames.get(index) else { return Ok(None) };
        let motion = match &self.motions {
            Some(motions) => motions.recv().map_err(|_| Error::Internal("the motion thread stopped".into()))??,
            None => None,
        };
        let (item, plan) = self.painter.plan(index as u64, index as i64, frame, motion)?;
        self.painting = Some((plan, Instant::now()));
        Ok(Some(item))
    }

    /// The row of the frames after the first.
    fn row(&self, vgg: &Vgg, case: PaintingCase) -> PaintingBenchRow {
        let timed = &self.records[1.min(self.records.len())..];
        let count = timed.len().max(1) as f64;
        let mean = |pick: fn(&FrameRecord) -> f64| timed.iter().map(pick).sum::<f64>() / count;
        let wall = self.first_done.map_or(0.0, |done| done.elapsed().as_secs_f64());
        PaintingBenchRow {
            width: case.width,
            height: case.height,
            device: device_name(vgg.device()),
            precision: vgg.precision().label_on(vgg.device()),
            layout: format!("{:?}", vgg.layout()),
            motion: case.motion,
            frames: timed.len(),
            iterations_per_frame: mean(|r| r.iterations as f64),
            seconds_per_frame: wall / count,
            flow_seconds_per_frame: mean(|r| r.seconds.flow),
            optimise_seconds_per_frame: mean(|r| r.seconds.optimise),
            peak_rss_mib: peak_rss_mib(),
            cuda_max_allocated_mib: memory::allocator_peaks_mib(vgg.device()).map(|(allocated, _)| allocated),
        }
    }
}

impl BatchFeed for PaintingFeed<'_> {
    fn next(&mut self, _: usize) -> Option<BatchItem> {
        match self.plan_next() {
            Ok(item) => item,
            Err(error) => {
                self.failure = Some(error);
                None
            }
        }
    }

    fn finished(&mut self, _: usize, outcome: Optimised) {
        let Some((plan, started)) = self.painting.take() else { return };
        let painted = self.painter.finish(plan, outcome, started.elapsed().as_secs_f64());
        self.records.push(painted.record);
        if self.records.len() == 1 {
            synchronize(self.painter.device());
            self.first_done = Some(Instant::now());
        }
    }

    fn iteration(&mut self, _: usize, _: usize, _: Losses, _: &Tensor) {}

    fn cancelled(&self) -> bool {
        self.failure.is_some()
    }
}
