//! Painting one frame after another with temporal coherence; tensors only, no FFmpeg. The
//! `FramePainter` holds what carries from frame to frame (the previous input and output, the shot's
//! loss scale) and decides, per frame, how to start: from the content on the first frame and after a
//! scene cut (first-frame settings), from the previous output (`previous` mode), or, as Ruder et al.
//! (2016) do, from the previous output warped along the input's backward flow with the unreliable
//! pixels filled from the content, plus the temporal loss over the reliable ones (`flow` mode). The
//! warp is bicubic, so a painting carried over many frames keeps its brush strokes. The motion into a
//! frame (see [`super::motion`]) usually comes with it, measured ahead on another thread; the painter
//! measures it itself only for a frame that arrives without it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use image::RgbImage;
use tch::{Device, Tensor};

use super::motion::{self, Motion};
use super::report::{FrameLosses, FrameRecord, FrameSeconds, Start};
use super::resample::warp_bicubic;
use super::settings::{TemporalMode, VideoSettings};
use crate::error::Result;
use crate::flow;
use crate::imageio;
use crate::model::Vgg;
use crate::style::color::{self, ColorMode};
use crate::style::{BatchItem, Losses, Optimised, Stopping, StyleImage, StyleSettings, Stylizer, Targets};

/// What the next frame builds on.
struct Previous {
    /// The previous frame's index.
    index: u64,
    /// The previous input frame (RGB 0..1, on the network's device).
    input: Tensor,
    /// The previous output as it was stored (8-bit, back in 0..1).
    output: Tensor,
    /// The shot's loss scale (see [`VideoSettings::temporal_weight`]).
    loss_scale: f64,
}

/// A number for a new chain of frames (see [`BatchItem::chain`]), unique in this process.
fn new_chain() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// A painted frame: the picture to store and encode, and its record (encode time still zero).
pub struct PaintedFrame {
    /// The output at the working size.
    pub picture: RgbImage,
    /// What happened.
    pub record: FrameRecord,
}

/// What a frame's painting needs besides its optimisation: decided before it (see
/// [`FramePainter::plan`]), used after it (see [`FramePainter::finish`]).
pub struct FramePlan {
    index: u64,
    pts: i64,
    /// The input frame on the network's device.
    content: Tensor,
    motion: Option<Motion>,
    start: Start,
    planned: usize,
    flow_seconds: f64,
    /// The chain of frames this one belongs to.
    chain: u64,
}

impl FramePlan {
    /// The frame's position in the video.
    pub fn index(&self) -> u64 {
        self.index
    }

    /// Iterations planned.
    pub fn planned(&self) -> usize {
        self.planned
    }
}

/// Paints the frames of one video in order.
pub struct FramePainter<'m> {
    stylizer: Stylizer<'m>,
    /// When a later frame of a shot stops early (the first frame stops as the style settings say).
    later_stopping: Stopping,
    style_targets: Vec<Tensor>,
    video: VideoSettings,
    color: ColorMode,
    device: Device,
    measure_warping: bool,
    previous: Option<Previous>,
    /// The chain the frames painted here form since their shot began (or the painter resumed): a
    /// new number at each fresh start. Later frames of the chain carry L-BFGS's curvature on where
    /// `video.carry_curvature` allows. (A painter's first number reaches no frame, as its first
    /// frame starts fresh; it is a number of its own all the same.)
    chain: u64,
}

impl<'m> FramePainter<'m> {
    /// A painter for frames whose long side is `long_side`; the style targets are computed here, once.
    /// `measure_warping` computes the flow (and E_warp) even in `independent` mode.
    pub fn new(
        vgg: &'m Vgg,
        style: &StyleSettings,
        video: &VideoSettings,
        styles: &[StyleImage],
        long_side: u32,
        measure_warping: bool,
    ) -> Result<Self> {
        video.validate()?;
        let stylizer = Stylizer::new(vgg, style.clone())?;
        let later_stopping = Stopping { tolerance: video.tolerance, patience: video.patience };
        let style_targets = stylizer.style_targets(styles, long_side);
        Ok(FramePainter {
            stylizer,
            later_stopping,
            style_targets,
            video: video.clone(),
            color: style.color,
            device: vgg.device(),
            measure_warping,
            previous: None,
            chain: new_chain(),
        })
    }

    /// A painter with the same settings and style targets (shared, not recomputed) and no frame
    /// behind it: the painter of another segment of the same video.
    pub fn sibling(&self) -> Self {
        FramePainter {
            stylizer: self.stylizer.clone(),
            later_stopping: self.later_stopping,
            style_targets: self.shallow_style(),
            video: self.video.clone(),
            color: self.color,
            device: self.device,
            measure_warping: self.measure_warping,
            previous: None,
            chain: new_chain(),
        }
    }

    /// The device frames should be on.
    pub fn device(&self) -> Device {
        self.device
    }

    /// Takes a frame an earlier run painted as if it had just been painted here: `content` is its
    /// input frame, `stored` its output, `record` what the earlier run recorded.
    pub fn resume(&mut self, content: &Tensor, stored: &RgbImage, record: &FrameRecord) {
        let output = imageio::rgb_to_tensor(stored).to_device(self.device);
        let input = content.to_device(self.device);
        self.previous = Some(Previous { index: record.index, input, output, loss_scale: record.loss_scale });
        // no optimiser holds what was learnt on the stored frame
        self.chain = new_chain();
    }

    /// Whether `motion`, measured ahead, leads from the frame this painter painted last.
    fn follows(&self, motion: &Motion) -> bool {
        self.previous.as_ref().is_some_and(|previous| previous.index == motion.from)
    }

    /// A stylizer that can optimise the frames of this painter and its siblings together (the
    /// stop settings come with each frame).
    pub fn runner(&self) -> Stylizer<'m> {
        self.stylizer.clone()
    }

    /// Everything this frame's optimisation needs, decided from the frames before it: the motion, how
    /// it starts, the starting image, the targets, the iteration budget and stop settings. `ahead` is
    /// the motion into the frame if it was measured already (it is measured here otherwise).
    pub fn plan(
        &self,
        index: u64,
        pts: i64,
        content: &Tensor,
        ahead: Option<Motion>,
    ) -> Result<(BatchItem, FramePlan)> {
        let content = content.to_device(self.device);
        let flow_started = Instant::now();
        let (motion, measured_ahead) = match ahead.filter(|motion| self.follows(motion)) {
            Some(motion) => {
                let seconds = motion.seconds;
                (Some(motion), seconds)
            }
            None => (self.motion_to(&content)?, 0.0),
        };
        let start = self.start_kind(motion.as_ref());
        let working_content = self.to_working(&content);
        let (start_image, temporal) = self.starting_point(start, &working_content, motion.as_ref());
        let flow_seconds = measured_ahead + flow_started.elapsed().as_secs_f64();
        let (planned, stopping) = if start.is_fresh() {
            (self.video.first_iterations as usize, self.stylizer.stopping())
        } else {
            (self.video.iterations as usize, self.later_stopping)
        };
        let content_targets = self.stylizer.content_targets(&working_content);
        let targets = Targets { content: content_targets, style: self.shallow_style(), temporal };
        let chain = if start.is_fresh() { new_chain() } else { self.chain };
        let carried_chain = self.video.carry_curvature.then_some(chain);
        let item = BatchItem { targets, start: start_image, iterations: planned, stopping, chain: carried_chain };
        Ok((item, FramePlan { index, pts, content, motion, start, planned, flow_seconds, chain }))
    }

    /// Turns an optimised image into the painted frame and makes it the one the next frame builds on.
    pub fn finish(&mut self, plan: FramePlan, outcome: Optimised, optimise_seconds: f64) -> PaintedFrame {
        let finished = Instant::now();
        let picture = imageio::tensor_to_rgb(&self.finish_colours(&outcome.image, &plan.content));
        let optimise_seconds = optimise_seconds + finished.elapsed().as_secs_f64();
        let output = imageio::rgb_to_tensor(&picture).to_device(self.device);
        let warping_error = self.warping_error(&output, plan.motion.as_ref());
        let loss_scale = self.loss_scale(plan.start, &outcome.losses);
        self.previous = Some(Previous { index: plan.index, input: plan.content, output, loss_scale });
        self.chain = plan.chain;
        let record = FrameRecord {
            index: plan.index,
            pts: plan.pts,
            start: plan.start,
            iterations: outcome.iterations,
            curvature_carried: outcome.curvature_carried,
            losses: FrameLosses::from(outcome.losses),
            loss_scale,
            warping_error,
            seconds: FrameSeconds { decode: 0.0, flow: plan.flow_seconds, optimise: optimise_seconds, encode: 0.0 },
            resumed: false,
            lead_in: false,
        };
        PaintedFrame { picture, record }
    }

    /// The loss scale for the relative temporal weight: measured on a shot's first frame, carried on
    /// through the shot.
    fn loss_scale(&self, start: Start, losses: &Losses) -> f64 {
        match (&self.previous, start.is_fresh()) {
            (Some(previous), false) => previous.loss_scale,
            _ => content_and_style_loss(losses),
        }
    }

    /// The style targets, shared (no copy).
    fn shallow_style(&self) -> Vec<Tensor> {
        self.style_targets.iter().map(Tensor::shallow_clone).collect()
    }

    /// The motion from the previous input to `content`, when there is a previous frame and the motion
    /// is wanted.
    fn motion_to(&self, content: &Tensor) -> Result<Option<Motion>> {
        let Some(previous) = &self.previous else { return Ok(None) };
        if !motion::wanted(&self.video, self.measure_warping) {
            return Ok(None);
        }
        let (flow, threads) = (&self.video.flow, self.video.flow_threads);
        motion::measure(previous.index, &previous.input, content, flow, threads).map(Some)
    }

    /// How this frame starts, given the motion from the previous one.
    fn start_kind(&self, motion: Option<&Motion>) -> Start {
        if self.previous.is_none() {
            return Start::First;
        }
        if motion.is_some_and(|m| m.is_cut) {
            return Start::SceneCut;
        }
        match self.video.temporal {
            TemporalMode::Independent => Start::Content,
            TemporalMode::Previous => Start::Previous,
            TemporalMode::Flow => Start::Warped,
        }
    }

    /// The starting image and the temporal term for `start`.
    fn starting_point(
        &self,
        start: Start,
        working_content: &Tensor,
        motion: Option<&Motion>,
    ) -> (Tensor, Option<(Tensor, Tensor, f64)>) {
        let previous = self.previous.as_ref();
        match (start, previous, motion) {
            (Start::Previous, Some(previous), _) => (self.to_working(&previous.output), None),
            (Start::Warped, Some(previous), Some(motion)) => {
                let _guard = tch::no_grad_guard();
                let warped = self.to_working(&warp_bicubic(&previous.output, &motion.pair.backward)).detach();
                let mask = &motion.reliable;
                let filled = &warped * mask + working_content * (mask.neg() + 1.0);
                let weight = self.video.temporal_weight * previous.loss_scale;
                (filled, Some((warped, mask.shallow_clone(), weight)))
            }
            _ => (working_content.copy(), None),
        }
    }

    /// E_warp between `output` and the previous output, along the input's flow (none across a cut).
    fn warping_error(&self, output: &Tensor, motion: Option<&Motion>) -> Option<f64> {
        let previous = self.previous.as_ref()?;
        let motion = motion.filter(|m| !m.is_cut)?;
        flow::warping_error(output, &previous.output, &motion.pair.backward, &motion.reliable)
    }

    /// An image in the space the optimisation works in (grey for luminance-only transfer).
    fn to_working(&self, image: &Tensor) -> Tensor {
        match self.color {
            ColorMode::Luminance => color::luminance_as_rgb(image),
            _ => image.shallow_clone(),
        }
    }

    /// The optimised image with the colour mode applied, clamped to 0..1.
    fn finish_colours(&self, image: &Tensor, content: &Tensor) -> Tensor {
        let _guard = tch::no_grad_guard();
        let coloured = match self.color {
            ColorMode::Style => image.shallow_clone(),
            ColorMode::Luminance => color::with_content_chrominance(image, content),
            ColorMode::Histogram => color::match_histogram(image, content),
        };
        coloured.clamp(0.0, 1.0)
    }
}

/// The weighted content and style part of a frame's loss: the scale the relative temporal weight
/// multiplies.
fn content_and_style_loss(losses: &Losses) -> f64 {
    (losses.total - losses.tv - losses.temporal).max(0.0)
}
