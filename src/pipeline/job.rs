//! A whole video job: decode → paint → encode on three threads joined by bounded channels, so memory
//! stays a few frames deep however long the video is. The decoder runs ahead while the stylizer works;
//! the encoder stores each painted frame as a checkpoint, then encodes it into a staging file in the
//! work directory, which is moved onto the output only when every stage has succeeded. The first
//! error of any stage stops the others and is what the job returns; a re-run resumes from the
//! checkpoints. A job painted in segments (see [`super::segments`]) decodes each segment on its own
//! thread and paints the segments' frames as one batch that gives a segment its next frame as soon as
//! its last is done; the encoder takes the frames back into order, reading the ones painted ahead of
//! their turn back from the checkpoint, and cross-fades the segments' overlaps.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use crossbeam_channel::{Receiver, Sender, bounded};
use image::RgbImage;
use tch::Tensor;

use super::checkpoint::{self, Checkpoint, PictureKey, StoredFrames};
use super::painter::{FramePainter, FramePlan, PaintedFrame};
use super::report::{FrameRecord, Report};
use super::segments::{Segment, SegmentPlan, cross_fade};
use super::settings::VideoSettings;
use super::stages::{FirstError, Item, panic_error};
use crate::error::{Error, Result};
use crate::imageio;
use crate::media::{Frame, MediaError, VideoInfo, VideoReader, VideoWriter, VideoWriterSpec, WorkingSize, probe};
use crate::model::Vgg;
use crate::style::{BatchFeed, BatchItem, Losses, Optimised, StyleImage, StyleSettings};

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

/// A decoded frame and the seconds it took.
struct Decoded {
    frame: Frame,
    seconds: f64,
}

/// A painted picture (a frame's own or a lead-in one) on its way to the encoder: the input frame's
/// timing, the picture, the record.
struct Painted {
    timing: Frame,
    picture: RgbImage,
    record: FrameRecord,
}

impl VideoJob {
    /// Checks everything that can be checked before the network is loaded: the settings, the input
    /// (a readable video with frames, not truncated: it is decoded once, quickly, to count its frames),
    /// and the output (a writable directory, a known container, encode settings the encoder takes).
    pub fn prepare(self) -> Result<PreparedJob> {
        self.video.validate()?;
        if self.styles.is_empty() {
            return Err(Error::Settings("at least one style image is needed".into()));
        }
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
        let started = Instant::now();
        let mut checkpoint = Checkpoint::open(&self.job.output, &self.key)?;
        let staging = checkpoint.staging_path(&self.job.output);
        match self.run_stages(vgg, &mut checkpoint, &staging, observer) {
            Ok((frames, damaged)) => {
                std::fs::rename(&staging, &self.job.output).map_err(|e| Error::io(&self.job.output, e))?;
                checkpoint.remove()?;
                Ok(self.report(frames, damaged, started.elapsed().as_secs_f64()))
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

    /// The report of a finished job.
    fn report(&self, frames: Vec<FrameRecord>, damaged: Vec<String>, wall_seconds: f64) -> Report {
        Report {
            input: self.job.input.clone(),
            output: self.job.output.clone(),
            working_size: self.frame_size,
            temporal: self.job.video.temporal,
            segments: self.plan().segments().len() as u64,
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
        let read_back = checkpoint.stored_frames();
        let long_side = self.frame_size.0.max(self.frame_size.1);
        let painter =
            FramePainter::new(vgg, &self.job.style, video, &self.job.styles, long_side, self.job.measure_warping)?;
        let mut painters = Vec::with_capacity(plan.segments().len());
        for _ in 1..plan.segments().len() {
            painters.push(painter.sibling()?);
        }
        painters.insert(0, painter);
        if plan.segments().len() > 1 {
            tracing::info!(segments = plan.segments().len(), steps = plan.steps(), "painting in segments");
        }
        let painting = PaintStage {
            lanes: painters.into_iter().map(Lane::new).collect(),
            plan: &plan,
            resumable: &resumable,
            stored: &stored,
            done: 0,
            total: self.frame_count,
            stop: &self.stop,
            stopped_after: None,
        };
        let encoding = EncodeStage { writer, checkpoint, order: Reorder::new(&plan, read_back), records: Vec::new() };
        run_threads(readers, painting, encoding, video.queue, observer)
    }
}

/// Decodes on one thread per segment, paints on this one, encodes on another; the first error of any
/// stage is the result.
fn run_threads(
    readers: Vec<SegmentReader>,
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
        let mut receivers = Vec::with_capacity(readers.len());
        let mut decoders = Vec::with_capacity(readers.len());
        for reader in readers {
            let (decoded_sender, decoded_receiver) = bounded(queue);
            receivers.push(decoded_receiver);
            decoders.push(scope.spawn(move || errors.settle(decode_stage(reader, decoded_sender, errors))));
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
        (damaged.map(|lists| lists.concat()), join(encoder, "encode", errors))
    });
    match (first_error.into_error(), damaged, records) {
        (Some(error), _, _) => Err(error),
        (None, _, _) if painting.stopped_after.is_some() => {
            Err(Error::Stopped { frames_done: painting.stopped_after.unwrap_or_default() })
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
fn working_size(video: &VideoSettings) -> WorkingSize {
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
fn check_frame_size((width, height): (u32, u32)) -> Result<()> {
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

/// The stored picture `key`, if it is readable and `size` big.
fn load_stored(stored: &StoredFrames, key: PictureKey, size: (u32, u32)) -> Option<RgbImage> {
    match stored.load(key) {
        Ok(picture) if picture.dimensions() == size => Some(picture),
        Ok(_) | Err(_) => {
            tracing::warn!(frame = key.0, lead_in = key.1, "a stored frame is unusable; painting it again");
            None
        }
    }
}

/// A reader of one segment's frames.
struct SegmentReader {
    reader: VideoReader,
    segment: Segment,
    /// The last segment reads on to the end of the file (and meets its truncation, if any).
    last: bool,
    /// Frames the reader has yielded.
    position: u64,
}

impl SegmentReader {
    /// A reader at the segment's first frame, whose timestamp is `pts` (seeking there when given).
    fn open(input: &Path, size: WorkingSize, segment: &Segment, pts: Option<i64>, last: bool) -> Result<Self> {
        let reader = VideoReader::open_at(input, size, segment.frames.start, pts)?;
        Ok(SegmentReader { reader, segment: segment.clone(), last, position: segment.frames.start })
    }

    /// Whether damage met before frame `position` is this segment's to report (each frame position
    /// belongs to one segment, so each report is made once).
    fn owns(&self, position: u64) -> bool {
        position >= self.segment.owned_from && (self.last || position < self.segment.frames.end)
    }

    /// The segment's next frame; `None` once it has them all.
    fn next(&mut self, damaged: &mut Vec<String>) -> Result<Option<Decoded>> {
        loop {
            if !self.last && self.position >= self.segment.frames.end {
                return Ok(None);
            }
            let started = Instant::now();
            match self.reader.next() {
                None => return Ok(None),
                Some(Ok(frame)) => {
                    self.position += 1;
                    return Ok(Some(Decoded { frame, seconds: started.elapsed().as_secs_f64() }));
                }
                Some(Err(report @ MediaError::Damaged { .. })) => {
                    if self.owns(self.position) {
                        damaged.push(report.to_string());
                    }
                }
                Some(Err(error)) => return Err(error.into()),
            }
        }
    }
}

/// Decodes one segment's frames into its channel; damaged data is logged, reported and skipped over.
/// Returns the damage reports, or `None` when a later stage stopped first.
fn decode_stage(
    reader: SegmentReader,
    sender: Sender<Item<Decoded>>,
    errors: &FirstError,
) -> Result<Option<Vec<String>>> {
    let mut damaged = Vec::new();
    let mut reader = reader;
    loop {
        if errors.stopped() {
            return Ok(None);
        }
        let Some(decoded) = reader.next(&mut damaged)? else { break };
        if sender.send(Item::Next(decoded)).is_err() {
            return Ok(None);
        }
    }
    Ok(sender.send(Item::End).ok().map(|()| damaged))
}

/// The painting stage's state, on the calling thread (the network stays where it was loaded): one
/// lane per segment, all painted as one batch that takes a lane's next frame as soon as its last is
/// done.
struct PaintStage<'a, 'm> {
    lanes: Vec<Lane<'m>>,
    plan: &'a SegmentPlan,
    resumable: &'a BTreeMap<PictureKey, FrameRecord>,
    stored: &'a StoredFrames,
    /// Own frames passed on so far.
    done: u64,
    total: u64,
    /// Raised from outside to stop once the frames being painted are done.
    stop: &'a AtomicBool,
    /// Frames passed on before a requested stop, once stopped.
    stopped_after: Option<u64>,
}

/// One segment's painter and where it is.
struct Lane<'m> {
    painter: FramePainter<'m>,
    /// Still taking the segment's frames from the checkpoint.
    resuming: bool,
    /// The frame being optimised.
    painting: Option<InFlight>,
    /// The decoder has sent all of the segment's frames.
    ended: bool,
}

/// A frame being optimised: its timing, what its finish needs, its decode time, since when, its span.
struct InFlight {
    timing: Frame,
    plan: FramePlan,
    decode_seconds: f64,
    started: Instant,
    span: tracing::Span,
}

/// A decoded frame ready to paint: its timing, its pixels on the device, its decode time.
struct Ready {
    timing: Frame,
    content: Tensor,
    decode_seconds: f64,
}

impl<'m> Lane<'m> {
    fn new(painter: FramePainter<'m>) -> Self {
        Lane { painter, resuming: true, painting: None, ended: false }
    }
}

impl PaintStage<'_, '_> {
    /// Paints every lane's frames and passes the pictures on. `None` when another stage stopped first
    /// or a stop was asked for.
    fn run(
        &mut self,
        receivers: Vec<Receiver<Item<Decoded>>>,
        sender: Sender<Item<Painted>>,
        errors: &FirstError,
        observer: &mut dyn FnMut(JobEvent<'_>),
    ) -> Result<Option<()>> {
        let runner = self.lanes[0].painter.runner()?;
        let lanes = self.lanes.len();
        let mut feed = LaneFeed { stage: self, receivers, sender, errors, observer, failure: None, halted: false };
        runner.optimise_refilled(lanes, &mut feed);
        let LaneFeed { failure, halted, sender, .. } = feed;
        if let Some(error) = failure {
            return Err(error);
        }
        if halted || errors.stopped() {
            return Ok(None);
        }
        if !self.lanes.iter().all(|lane| lane.ended) {
            // a requested stop: dropping the sender without an end lets the encoder store what it
            // holds, then stop
            tracing::info!(frames_done = self.done, "stopped on request");
            self.stopped_after = Some(self.done);
            return Ok(None);
        }
        Ok(sender.send(Item::End).ok())
    }

    /// A decoded frame's pixels on the device.
    fn ready(&self, lane: usize, decoded: Decoded) -> Result<Ready> {
        let converted = Instant::now();
        let Decoded { mut frame, seconds } = decoded;
        let content = frame_tensor(&mut frame)?.to_device(self.lanes[lane].painter.device());
        Ok(Ready { timing: frame, content, decode_seconds: seconds + converted.elapsed().as_secs_f64() })
    }

    /// Whether frame `index` of lane `lane` is a lead-in picture.
    fn is_lead_in(&self, lane: usize, index: u64) -> bool {
        self.plan.segments()[lane].is_lead_in(index)
    }

    /// The frame as an earlier run stored it, while the lane's stored pictures last.
    fn resume(&mut self, lane: usize, ready: &Ready) -> Option<Painted> {
        if !self.lanes[lane].resuming {
            return None;
        }
        let index = ready.timing.index;
        let key = (index, self.is_lead_in(lane, index));
        let size = (ready.timing.width, ready.timing.height);
        let found = self.resumable.get(&key).and_then(|record| Some((record, load_stored(self.stored, key, size)?)));
        let Some((record, picture)) = found else {
            self.lanes[lane].resuming = false;
            return None;
        };
        let mut record = record.clone();
        self.lanes[lane].painter.resume(&ready.content, &picture, &record);
        record.resumed = true;
        record.seconds.decode = ready.decode_seconds;
        Some(Painted { timing: ready.timing.clone(), picture, record })
    }
}

/// The painting stage as the batch's feed: a lane's next frame comes from its decoder (frames an
/// earlier run stored are passed on without painting), a finished frame goes to the encoder.
struct LaneFeed<'s, 'a, 'm, 'o> {
    stage: &'s mut PaintStage<'a, 'm>,
    receivers: Vec<Receiver<Item<Decoded>>>,
    sender: Sender<Item<Painted>>,
    errors: &'s FirstError,
    observer: &'o mut dyn FnMut(JobEvent<'_>),
    /// This stage's own error.
    failure: Option<Error>,
    /// The encoder is gone.
    halted: bool,
}

impl LaneFeed<'_, '_, '_, '_> {
    /// Plans lane `lane`'s next decoded frame, or passes it on from the checkpoint (`None`).
    fn start(&mut self, lane: usize, decoded: Decoded) -> Result<Option<BatchItem>> {
        let ready = self.stage.ready(lane, decoded)?;
        if let Some(resumed) = self.stage.resume(lane, &ready) {
            self.pass_on(resumed);
            return Ok(None);
        }
        let Ready { timing, content, decode_seconds } = ready;
        let span = tracing::info_span!("frame", index = timing.index, segment = lane);
        let (item, plan) = span.in_scope(|| self.stage.lanes[lane].painter.plan(timing.index, timing.pts, &content))?;
        let started = Instant::now();
        self.stage.lanes[lane].painting = Some(InFlight { timing, plan, decode_seconds, started, span });
        Ok(Some(item))
    }

    /// Tells the observer about an own frame and sends the picture to the encoder.
    fn pass_on(&mut self, painted: Painted) {
        if !painted.record.lead_in {
            self.stage.done += 1;
            let (record, picture) = (&painted.record, &painted.picture);
            (self.observer)(JobEvent::Frame { record, picture, done: self.stage.done, total: self.stage.total });
        }
        if self.sender.send(Item::Next(painted)).is_err() {
            self.halted = true;
        }
    }
}

impl BatchFeed for LaneFeed<'_, '_, '_, '_> {
    fn next(&mut self, lane: usize) -> Option<BatchItem> {
        loop {
            if self.cancelled() {
                return None;
            }
            if self.stage.stop.load(Ordering::SeqCst) {
                return None;
            }
            let decoded = match self.receivers[lane].recv() {
                Ok(Item::Next(decoded)) => decoded,
                Ok(Item::End) => {
                    self.stage.lanes[lane].ended = true;
                    return None;
                }
                // the decoder failed (its error is recorded) or stopped for another stage
                Err(_) => return None,
            };
            match self.start(lane, decoded) {
                Ok(Some(item)) => return Some(item),
                Ok(None) => {}
                Err(error) => {
                    self.failure = Some(error);
                    return None;
                }
            }
        }
    }

    fn finished(&mut self, lane: usize, outcome: Optimised) {
        // lanes busy until now share the time since this frame began
        let busy = self.stage.lanes.iter().filter(|lane| lane.painting.is_some()).count().max(1);
        let Some(flight) = self.stage.lanes[lane].painting.take() else { return };
        let optimise_seconds = flight.started.elapsed().as_secs_f64() / busy as f64;
        let index = flight.plan.index();
        let painted =
            flight.span.in_scope(|| self.stage.lanes[lane].painter.finish(flight.plan, outcome, optimise_seconds));
        let PaintedFrame { picture, mut record } = painted;
        record.seconds.decode = flight.decode_seconds;
        record.lead_in = self.stage.is_lead_in(lane, index);
        self.pass_on(Painted { timing: flight.timing, picture, record });
    }

    fn iteration(&mut self, lane: usize, done: usize, _: Losses, _: &Tensor) {
        if let Some(flight) = &self.stage.lanes[lane].painting {
            let (index, planned) = (flight.plan.index(), flight.plan.planned());
            (self.observer)(JobEvent::Iteration { index, done, planned });
        }
    }

    fn cancelled(&self) -> bool {
        self.failure.is_some() || self.halted || self.errors.stopped()
    }
}

/// A decoded frame's pixels, taken out of it, as an RGB 0..1 tensor `[1, 3, H, W]` on the CPU.
fn frame_tensor(frame: &mut Frame) -> Result<Tensor> {
    let picture = RgbImage::from_raw(frame.width, frame.height, std::mem::take(&mut frame.rgb))
        .ok_or_else(|| Error::Internal(format!("frame {} has a short pixel buffer", frame.index)))?;
    Ok(imageio::rgb_to_tensor(&picture))
}

/// Puts pictures that arrive out of order (segments) back in the video's order: own frames wait for
/// their turn, and for the lead-in picture they are cross-faded with. Only the frame whose turn it is
/// stays in memory; the others are read back from the checkpoint when their turn comes.
struct Reorder<'p> {
    plan: &'p SegmentPlan,
    stored: StoredFrames,
    /// The next frame to encode.
    next: u64,
    /// Own frames waiting: timing, record and the picture when it is held.
    own: BTreeMap<u64, (Frame, FrameRecord, Option<RgbImage>)>,
    /// Lead-in pictures stored and not yet used.
    lead_ins: BTreeSet<u64>,
}

impl<'p> Reorder<'p> {
    fn new(plan: &'p SegmentPlan, stored: StoredFrames) -> Self {
        Reorder { plan, stored, next: 0, own: BTreeMap::new(), lead_ins: BTreeSet::new() }
    }

    /// Takes a stored picture in.
    fn add(&mut self, painted: Painted) {
        let Painted { timing, picture, record } = painted;
        if record.lead_in {
            self.lead_ins.insert(record.index);
        } else {
            let held = (record.index == self.next).then_some(picture);
            self.own.insert(record.index, (timing, record, held));
        }
    }

    /// The next frame in order, its picture final, once it and its lead-in (if any) are in.
    fn take_ready(&mut self) -> Result<Option<(Frame, FrameRecord, RgbImage)>> {
        let index = self.next;
        let weight = self.plan.lead_in_weight(index);
        if !self.own.contains_key(&index) || (weight.is_some() && !self.lead_ins.contains(&index)) {
            return Ok(None);
        }
        let (timing, record, held) = self.own.remove(&index).expect("checked above");
        let picture = match held {
            Some(picture) => picture,
            None => self.stored.load((index, false))?,
        };
        let picture = match weight {
            Some(weight) => cross_fade(&picture, &self.stored.load((index, true))?, weight),
            None => picture,
        };
        self.lead_ins.remove(&index);
        self.next += 1;
        Ok(Some((timing, record, picture)))
    }

    /// Fails when frames are left over at the end of the stream.
    fn finish(&self) -> Result<()> {
        match self.own.keys().next() {
            None => Ok(()),
            Some(first) => Err(Error::Internal(format!(
                "frame {first} was painted but frame {} never came, so it could not be encoded",
                self.next
            ))),
        }
    }
}

/// The encoding stage: stores each picture as a checkpoint (unless it came from one), then encodes
/// the frames in order.
struct EncodeStage<'c> {
    writer: VideoWriter,
    checkpoint: &'c mut Checkpoint,
    order: Reorder<'c>,
    records: Vec<FrameRecord>,
}

impl EncodeStage<'_> {
    /// Runs to the end of the stream and finishes the video. Returns the records with their encode
    /// times, or `None` when an earlier stage failed (the unfinished video is then removed).
    fn run(mut self, receiver: Receiver<Item<Painted>>, errors: &FirstError) -> Result<Option<Vec<FrameRecord>>> {
        while let Ok(item) = receiver.recv() {
            let Item::Next(mut painted) = item else {
                self.order.finish()?;
                self.writer.finish()?;
                return Ok(Some(self.records));
            };
            if errors.stopped() {
                return Ok(None);
            }
            let started = Instant::now();
            if !painted.record.resumed {
                self.checkpoint.store(&painted.record, &painted.picture)?;
            }
            painted.record.seconds.encode = started.elapsed().as_secs_f64();
            self.order.add(painted);
            while let Some((timing, mut record, picture)) = self.order.take_ready()? {
                let started = Instant::now();
                self.writer.write(&Frame { rgb: picture.into_raw(), ..timing })?;
                record.seconds.encode += started.elapsed().as_secs_f64();
                self.records.push(record);
            }
        }
        Ok(None)
    }
}
