//! A whole video job: decode → motion → paint → encode on threads joined by bounded channels, so
//! memory stays a few frames deep however long the video is. The decoder runs ahead while the
//! stylizer works, and the optical flow into each frame is measured on its own thread while the frame
//! before is being painted;
//! the encoder stores each painted frame as a checkpoint, then encodes it into a staging file in the
//! work directory, which is moved onto the output only when every stage has succeeded. The first
//! error of any stage stops the others and is what the job returns; a re-run resumes from the
//! checkpoints. A job painted in segments (see [`super::segments`]) decodes each segment on its own
//! thread and paints the segments' frames as one batch that gives a segment its next frame as soon as
//! its last is done; the encoder takes the frames back into order, reading the ones painted ahead of
//! their turn back from the checkpoint, and cross-fades the segments' overlaps. Each stage has its
//! file: `decode`, `motion`, `paint`, `encode`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use crossbeam_channel::bounded;
use image::RgbImage;

mod decode;
mod encode;
mod motion;
mod paint;

use decode::{SegmentReader, decode_stage};
use encode::{EncodeStage, Reorder};
use motion::MotionStage;
use paint::PaintStage;

use super::checkpoint::{self, Checkpoint, PictureKey};
use super::motion::MotionTracker;
use super::painter::FramePainter;
use super::report::{FrameRecord, Report};
use super::segments::SegmentPlan;
use super::settings::VideoSettings;
use super::stages::FirstError;
use crate::error::{Error, Result, panic_error};
use crate::media::{MediaError, VideoInfo, VideoReader, VideoWriter, VideoWriterSpec, WorkingSize, probe};
use crate::model::Vgg;
use crate::style::{SharedBatch, StyleImage, StyleSettings};

/// What to paint and how.
pub struct VideoJob {
    /// The input video.
    pub input: PathBuf,
    /// The output video (container from its extension).
    pub output: PathBuf,
    /// The style images with their blend weights.
    pub styles: Vec<StyleImage>,
    /// The stylization settings (`size`, `iterations` and `scales` are the video settings' business).
    pub style: StyleSettings,
    /// The video settings.
    pub video: VideoSettings,
    /// What identifies the network (weights file, convention, pooling, normalisation, precision); it
    /// keys the checkpoints with the rest.
    pub model_identity: serde_json::Value,
    /// Compute E_warp for every frame pair, even where the temporal mode needs no flow.
    pub measure_warping: bool,
}

/// What a running job tells its observer.
pub enum JobEvent<'a> {
    /// An optimisation iteration of frame `index` is done.
    Iteration {
        /// The frame.
        index: u64,
        /// Iterations done.
        done: usize,
        /// Iterations planned (early stop may end sooner).
        planned: usize,
    },
    /// A frame is painted (or taken from a checkpoint); frames painted in segments come out of order.
    Frame {
        /// Its record (encode time not yet known).
        record: &'a FrameRecord,
        /// The painted picture (before a segment cross-fade).
        picture: &'a RgbImage,
        /// Frames painted (or taken from a checkpoint) so far, this one included.
        done: u64,
        /// Frames in the video.
        total: u64,
    },
}

/// A job whose input, styles and output have been checked; [`PreparedJob::run`] paints it.
pub struct PreparedJob {
    job: VideoJob,
    info: VideoInfo,
    frame_count: u64,
    /// Each frame's presentation timestamp, when they rise strictly (then a segment's reader can seek
    /// to its first frame).
    seekable_pts: Option<Vec<i64>>,
    frame_size: (u32, u32),
    key: String,
    stop: Arc<AtomicBool>,
}

impl VideoJob {
    /// Checks everything that can be checked before the network is loaded: the settings, the input
    /// (a readable video with frames, not truncated: it is decoded once, quickly, to count its frames),
    /// and the output (a writable directory, a known container, encode settings the encoder takes).
    pub fn prepare(self) -> Result<PreparedJob> {
        check_settings(&self.video, &self.styles)?;
        let info = probe(&self.input)?;
        check_output(&self.input, &self.output)?;
        let (frame_pts, frame_size) = scan(&self.input, working_size(&self.video))?;
        let frame_count = frame_pts.len() as u64;
        let seekable_pts = frame_pts.windows(2).all(|pair| pair[0] < pair[1]).then_some(frame_pts);
        check_frame_size(frame_size)?;
        try_writer(&self.output, &self.video, &info, frame_size)?;
        let key = checkpoint::job_key(&self.identity()?);
        tracing::info!(input = %self.input.display(), frames = frame_count, width = frame_size.0, height = frame_size.1, "video job ready");
        Ok(PreparedJob { job: self, info, frame_count, seekable_pts, frame_size, key, stop: Arc::default() })
    }

    /// Everything that decides the painted frames, as JSON.
    fn identity(&self) -> Result<serde_json::Value> {
        let styles: Vec<serde_json::Value> = self
            .styles
            .iter()
            .map(|s| serde_json::json!({ "pixels": checkpoint::image_digest(&s.image), "weight": s.weight }))
            .collect();
        Ok(serde_json::json!({
            "input": checkpoint::file_identity(&self.input)?,
            "styles": styles,
            "style": self.style,
            "video": self.video.frame_identity(),
            "model": self.model_identity,
        }))
    }
}

impl PreparedJob {
    /// Frames in the input.
    pub fn frame_count(&self) -> u64 {
        self.frame_count
    }

    /// The working size (`width`, `height`) frames are painted at.
    pub fn frame_size(&self) -> (u32, u32) {
        self.frame_size
    }

    /// A flag that, once raised, stops the job after the frame being painted: that frame is
    /// checkpointed and [`PreparedJob::run`] returns [`Error::Stopped`] (a later run resumes).
    pub fn stop_flag(&self) -> Arc<AtomicBool> {
        self.stop.clone()
    }

    /// The work directory this job checkpoints into.
    pub fn work_dir(&self) -> PathBuf {
        checkpoint::work_dir_for(&self.job.output, &self.key)
    }

    /// Paints the video with `vgg`, resuming from checkpoints of an earlier run of the same job, and
    /// moves the finished video onto the output. The work directory is removed on success, and kept
    /// on failure when it holds finished frames.
    pub fn run(self, vgg: &Vgg, observer: &mut dyn FnMut(JobEvent<'_>)) -> Result<Report> {
        self.run_in(vgg, None, observer)
    }

    /// [`PreparedJob::run`], painting in the device's shared `batch` (which knows `vgg` by the job's
    /// model identity) alongside other jobs' frames.
    pub fn run_shared(self, vgg: &Vgg, batch: &SharedBatch, observer: &mut dyn FnMut(JobEvent<'_>)) -> Result<Report> {
        self.run_in(vgg, Some(batch), observer)
    }

    fn run_in(self, vgg: &Vgg, batch: Option<&SharedBatch>, observer: &mut dyn FnMut(JobEvent<'_>)) -> Result<Report> {
        let started = Instant::now();
        let mut checkpoint = Checkpoint::open(&self.job.output, &self.key)?;
        let staging = checkpoint.staging_path(&self.job.output)?;
        match self.run_stages(vgg, batch, &mut checkpoint, &staging, observer) {
            Ok((frames, damaged)) => {
                crate::fsutil::move_with_companions(&staging, &self.job.output)
                    .map_err(|e| Error::io(&self.job.output, e))?;
                checkpoint.remove()?;
                for stale in checkpoint::remove_stale_siblings(&self.job.output, &self.key) {
                    tracing::info!(dir = %stale.display(), "removed the work directory of an earlier run with other settings");
                }
                Ok(self.report(vgg, frames, damaged, started.elapsed().as_secs_f64()))
            }
            Err(error) => {
                if !checkpoint.holds_frames() {
                    let _ = checkpoint.remove();
                }
                Err(error)
            }
        }
    }

    /// How the frames are split into segments.
    fn plan(&self) -> SegmentPlan {
        SegmentPlan::new(self.frame_count, self.job.video.segments, self.job.video.segment_overlap)
    }

    /// The report of a finished job painted with `vgg`.
    fn report(&self, vgg: &Vgg, records: Vec<FrameRecord>, damaged: Vec<String>, wall_seconds: f64) -> Report {
        let (lead_ins, frames): (Vec<FrameRecord>, Vec<FrameRecord>) = records.into_iter().partition(|r| r.lead_in);
        let painted_lead_ins = lead_ins.iter().filter(|r| !r.resumed);
        Report {
            input: self.job.input.clone(),
            output: self.job.output.clone(),
            working_size: self.frame_size,
            device: crate::device::device_name(vgg.device()),
            precision: vgg.precision().label_on(vgg.device()),
            temporal: self.job.video.temporal,
            segments: self.plan().segments().len() as u64,
            lead_in_iterations: painted_lead_ins.map(|r| r.iterations as u64).sum(),
            frame_count: 0,
            resumed_frames: 0,
            scene_cuts: 0,
            warping_error: Default::default(),
            seconds_per_frame: Default::default(),
            wall_seconds,
            damaged,
            frames,
        }
        .summarise()
    }

    /// Runs the three stages; returns the frame records and the damage reports.
    fn run_stages(
        &self,
        vgg: &Vgg,
        batch: Option<&SharedBatch>,
        checkpoint: &mut Checkpoint,
        staging: &Path,
        observer: &mut dyn FnMut(JobEvent<'_>),
    ) -> Result<(Vec<FrameRecord>, Vec<String>)> {
        let video = &self.job.video;
        let plan = self.plan();
        let last = plan.segments().len() - 1;
        let readers = plan
            .segments()
            .iter()
            .enumerate()
            .map(|(k, segment)| {
                let pts = self.seekable_pts.as_ref().map(|all| all[segment.frames.start as usize]);
                SegmentReader::open(&self.job.input, working_size(video), segment, pts, k == last)
            })
            .collect::<Result<Vec<_>>>()?;
        let spec = VideoWriterSpec::from_source(&self.info, self.frame_size);
        let writer = VideoWriter::create(staging, &video.encode, spec)?;
        let resumable = checkpoint.resumable().clone();
        let stored = checkpoint.stored_frames();
        let long_side = self.frame_size.0.max(self.frame_size.1);
        let painter =
            FramePainter::new(vgg, &self.job.style, video, &self.job.styles, long_side, self.job.measure_warping)?;
        let siblings: Vec<FramePainter> = (1..plan.segments().len()).map(|_| painter.sibling()).collect();
        let painters: Vec<FramePainter> = std::iter::once(painter).chain(siblings).collect();
        if plan.segments().len() > 1 {
            tracing::info!(segments = plan.segments().len(), longest = plan.steps(), "painting in segments");
        }
        let mut painting = PaintStage::new(painters, &plan, &resumable, &stored, self.frame_count, &self.stop);
        let model = self.job.model_identity.to_string();
        if let Some(batch) = batch {
            painting = painting.sharing(batch, &model);
        }
        let encoding = EncodeStage::new(writer, checkpoint, Reorder::new(&plan, stored.clone()));
        let motions = self.motion_stages(&plan, &resumable, vgg.device());
        let lanes = readers.into_iter().zip(motions).collect();
        run_threads(lanes, painting, encoding, video.queue, observer)
    }

    /// Each segment's motion stage, told which of its frames an earlier run stored.
    fn motion_stages(
        &self,
        plan: &SegmentPlan,
        resumable: &BTreeMap<PictureKey, FrameRecord>,
        device: tch::Device,
    ) -> Vec<MotionStage> {
        let video = &self.job.video;
        let stages = plan.segments().iter().map(|segment| {
            let is_stored = |index: &u64| resumable.contains_key(&(*index, segment.is_lead_in(*index)));
            let stored = segment.frames.clone().filter(is_stored).collect();
            let tracker = MotionTracker::new(video, self.job.measure_warping);
            MotionStage::new(tracker, device, stored)
        });
        stages.collect()
    }
}

/// Decodes on one thread per segment, measures each segment's motion on another, paints on this one,
/// encodes on another; the first error of any stage is the result.
fn run_threads(
    lanes: Vec<(SegmentReader, MotionStage)>,
    mut painting: PaintStage<'_, '_>,
    encoding: EncodeStage<'_>,
    queue: usize,
    observer: &mut dyn FnMut(JobEvent<'_>),
) -> Result<(Vec<FrameRecord>, Vec<String>)> {
    let (painted_sender, painted_receiver) = bounded(queue);
    let first_error = FirstError::default();
    let errors = &first_error;
    let (damaged, records) = std::thread::scope(|scope| {
        // Each stage owns its ends of the channels, so a stage that ends closes them for the others.
        let mut receivers = Vec::with_capacity(lanes.len());
        let mut decoders = Vec::with_capacity(lanes.len());
        let mut trackers = Vec::with_capacity(lanes.len());
        let job_span = tracing::Span::current();
        for (reader, motion) in lanes {
            let (decoded_sender, decoded_receiver) = bounded(queue);
            // one frame ahead is all the painting needs; each waiting one holds its pixels and flow
            // on the device
            let (arrived_sender, arrived_receiver) = bounded(1);
            receivers.push(arrived_receiver);
            decoders.push(scope.spawn(move || errors.settle(decode_stage(reader, decoded_sender, errors))));
            let span = job_span.clone();
            let measured =
                move || span.in_scope(|| errors.settle(motion.run(decoded_receiver, arrived_sender, errors)));
            trackers.push(scope.spawn(measured));
        }
        let encoder = scope.spawn(move || errors.settle(encoding.run(painted_receiver, errors)));
        let painted = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            painting.run(receivers, painted_sender, errors, observer)
        }));
        if let Err(payload) = painted.map(|result| errors.settle(result)) {
            errors.record(panic_error("paint", payload.as_ref()));
        }
        // each segment reports the damage in the frames it owns, so in the video's order they add up
        let damaged: Option<Vec<Vec<String>>> = decoders.into_iter().map(|d| join(d, "decode", errors)).collect();
        let measured: Option<Vec<()>> = trackers.into_iter().map(|t| join(t, "motion", errors)).collect();
        let damaged = measured.and(damaged).map(|lists| lists.concat());
        (damaged, join(encoder, "encode", errors))
    });
    match (first_error.into_error(), damaged, records) {
        (Some(error), _, _) => Err(error),
        (None, _, _) if painting.stopped_after().is_some() => {
            Err(Error::Stopped { frames_done: painting.stopped_after().unwrap_or_default() })
        }
        (None, Some(damaged), Some(records)) => Ok((records, damaged)),
        _ => Err(Error::Internal("a pipeline stage stopped without an error".into())),
    }
}

/// Joins a stage's thread; a panic becomes the stage's error.
fn join<T>(handle: std::thread::ScopedJoinHandle<'_, Option<T>>, stage: &str, errors: &FirstError) -> Option<T> {
    match handle.join() {
        Ok(value) => value,
        Err(payload) => {
            errors.record(panic_error(stage, payload.as_ref()));
            None
        }
    }
}

/// The working size the settings ask for.
/// The video settings in range and at least one style: what a job and a stream check first.
pub(super) fn check_settings(video: &VideoSettings, styles: &[StyleImage]) -> Result<()> {
    video.validate()?;
    if styles.is_empty() {
        return Err(Error::Settings("at least one style image is needed".into()));
    }
    Ok(())
}

pub(super) fn working_size(video: &VideoSettings) -> WorkingSize {
    if video.size == 0 { WorkingSize::Source } else { WorkingSize::LongSide(video.size) }
}

/// Decodes the whole input once, cheaply (tiny frames), to count its frames and find truncation and
/// empty streams before any painting; returns each frame's timestamp and the working frame size.
fn scan(input: &Path, size: WorkingSize) -> Result<(Vec<i64>, (u32, u32))> {
    let frame_size = VideoReader::open(input, size)?.frame_size();
    let mut frame_pts = Vec::new();
    for item in VideoReader::open(input, WorkingSize::LongSide(16))? {
        match item {
            Ok(frame) => frame_pts.push(frame.pts),
            Err(MediaError::Damaged { .. }) => {}
            Err(error) => return Err(error.into()),
        }
    }
    Ok((frame_pts, frame_size))
}

/// The shortest frame side the network takes: conv5_1 comes after four 2× poolings.
const MIN_FRAME_SIDE: u32 = 16;

/// Fails when the working frames are too small for the network.
pub(super) fn check_frame_size((width, height): (u32, u32)) -> Result<()> {
    if width.min(height) >= MIN_FRAME_SIDE {
        return Ok(());
    }
    Err(Error::Settings(format!(
        "video.size: frames of {width}×{height} are too small; the network needs at least {MIN_FRAME_SIDE} pixels on \
         the short side (use a larger --size)"
    )))
}

/// Fails when `output` is a directory or the input itself.
fn check_output(input: &Path, output: &Path) -> Result<()> {
    if output.is_dir() {
        return Err(Error::Settings(format!("output '{}' is a directory", output.display())));
    }
    let same_file = matches!((input.canonicalize(), output.canonicalize()), (Ok(a), Ok(b)) if a == b);
    if same_file {
        return Err(Error::Settings(format!("output '{}' is the input", output.display())));
    }
    Ok(())
}

/// Opens (and drops) a writer for `output`, so that an unwritable directory, an unknown container or
/// impossible encode settings are reported, naming the output, before any painting.
fn try_writer(output: &Path, video: &VideoSettings, info: &VideoInfo, frame_size: (u32, u32)) -> Result<()> {
    let spec = VideoWriterSpec::from_source(info, frame_size);
    drop(VideoWriter::create(output, &video.encode, spec)?);
    Ok(())
}
