//! A whole video job: decode → paint → encode on three threads joined by bounded channels, so memory
//! stays a few frames deep however long the video is. The decoder runs ahead while the stylizer works;
//! the encoder stores each painted frame as a checkpoint, then encodes it into a staging file in the
//! work directory, which is moved onto the output only when every stage has succeeded. The first
//! error of any stage stops the others and is what the job returns; a re-run resumes from the
//! checkpoints.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use crossbeam_channel::{Receiver, Sender, bounded};
use image::RgbImage;
use tch::Tensor;

use super::checkpoint::{self, Checkpoint, StoredFrames};
use super::painter::{FramePainter, PaintedFrame};
use super::report::{FrameRecord, Report};
use super::settings::VideoSettings;
use super::stages::{FirstError, Item, panic_error};
use crate::error::{Error, Result};
use crate::imageio;
use crate::media::{Frame, MediaError, VideoInfo, VideoReader, VideoWriter, VideoWriterSpec, WorkingSize, probe};
use crate::model::Vgg;
use crate::style::{StyleImage, StyleSettings};

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
    /// A frame is painted (or taken from a checkpoint).
    Frame {
        /// Its record (encode time not yet known).
        record: &'a FrameRecord,
        /// The painted picture.
        picture: &'a RgbImage,
        /// Frames in the video.
        total: u64,
    },
}

/// A job whose input, styles and output have been checked; [`PreparedJob::run`] paints it.
pub struct PreparedJob {
    job: VideoJob,
    info: VideoInfo,
    frame_count: u64,
    frame_size: (u32, u32),
    key: String,
    stop: Arc<AtomicBool>,
}

/// A decoded frame and the seconds it took.
struct Decoded {
    frame: Frame,
    seconds: f64,
}

/// A painted frame on its way to the encoder: the input frame's timing, the picture, the record.
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
        let (frame_count, frame_size) = scan(&self.input, working_size(&self.video))?;
        check_frame_size(frame_size)?;
        try_writer(&self.output, &self.video, &info, frame_size)?;
        let key = checkpoint::job_key(&self.identity()?);
        tracing::info!(input = %self.input.display(), frames = frame_count, width = frame_size.0, height = frame_size.1, "video job ready");
        Ok(PreparedJob { job: self, info, frame_count, frame_size, key, stop: Arc::default() })
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

    /// The report of a finished job.
    fn report(&self, frames: Vec<FrameRecord>, damaged: Vec<String>, wall_seconds: f64) -> Report {
        Report {
            input: self.job.input.clone(),
            output: self.job.output.clone(),
            working_size: self.frame_size,
            temporal: self.job.video.temporal,
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
        let reader = VideoReader::open(&self.job.input, working_size(video))?;
        let spec = VideoWriterSpec::from_source(&self.info, reader.frame_size());
        let writer = VideoWriter::create(staging, &video.encode, spec)?;
        let resumable = checkpoint.resumable().to_vec();
        let stored = checkpoint.stored_frames();
        let long_side = self.frame_size.0.max(self.frame_size.1);
        let mut painter =
            FramePainter::new(vgg, &self.job.style, video, &self.job.styles, long_side, self.job.measure_warping)?;
        let painting = PaintStage {
            painter: &mut painter,
            resumable: &resumable,
            stored: &stored,
            total: self.frame_count,
            stop: &self.stop,
            stopped_after: None,
        };
        run_threads(reader, painting, writer, checkpoint, video.queue, observer)
    }
}

/// Decodes on one thread, paints on this one, encodes on a third; the first error of any stage is the
/// result.
fn run_threads(
    reader: VideoReader,
    mut painting: PaintStage<'_, '_>,
    writer: VideoWriter,
    checkpoint: &mut Checkpoint,
    queue: usize,
    observer: &mut dyn FnMut(JobEvent<'_>),
) -> Result<(Vec<FrameRecord>, Vec<String>)> {
    let (decoded_sender, decoded_receiver) = bounded(queue);
    let (painted_sender, painted_receiver) = bounded(queue);
    let first_error = FirstError::default();
    let errors = &first_error;
    let (damaged, records) = std::thread::scope(|scope| {
        // Each stage owns its ends of the channels, so a stage that ends closes them for the others.
        let decoder = scope.spawn(move || errors.settle(decode_stage(reader, decoded_sender, errors)));
        let encoder = scope.spawn(move || errors.settle(encode_stage(writer, painted_receiver, checkpoint, errors)));
        let painted = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            painting.run(decoded_receiver, painted_sender, errors, observer)
        }));
        if let Err(payload) = painted.map(|result| errors.settle(result)) {
            errors.record(panic_error("paint", payload.as_ref()));
        }
        (join(decoder, "decode", errors), join(encoder, "encode", errors))
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
/// empty streams before any painting; returns the count and the working frame size.
fn scan(input: &Path, size: WorkingSize) -> Result<(u64, (u32, u32))> {
    let frame_size = VideoReader::open(input, size)?.frame_size();
    let mut count = 0;
    for item in VideoReader::open(input, WorkingSize::LongSide(16))? {
        match item {
            Ok(_) => count += 1,
            Err(MediaError::Damaged { .. }) => {}
            Err(error) => return Err(error.into()),
        }
    }
    Ok((count, frame_size))
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

/// The stored picture of frame `index`, if it is readable and `size` big.
fn load_stored(stored: &StoredFrames, index: u64, size: (u32, u32)) -> Option<RgbImage> {
    match stored.load(index) {
        Ok(picture) if picture.dimensions() == size => Some(picture),
        Ok(_) | Err(_) => {
            tracing::warn!(frame = index, "a stored frame is unusable; painting it again");
            None
        }
    }
}

/// Decodes frames into the channel; damaged data is logged, reported and skipped over.
/// Returns the damage reports, or `None` when a later stage stopped first.
fn decode_stage(
    reader: VideoReader,
    sender: Sender<Item<Decoded>>,
    errors: &FirstError,
) -> Result<Option<Vec<String>>> {
    let mut damaged = Vec::new();
    let mut reader = reader;
    loop {
        if errors.stopped() {
            return Ok(None);
        }
        let started = Instant::now();
        let frame = match reader.next() {
            None => break,
            Some(Ok(frame)) => frame,
            Some(Err(report @ MediaError::Damaged { .. })) => {
                damaged.push(report.to_string());
                continue;
            }
            Some(Err(error)) => return Err(error.into()),
        };
        let item = Item::Next(Decoded { frame, seconds: started.elapsed().as_secs_f64() });
        if sender.send(item).is_err() {
            return Ok(None);
        }
    }
    Ok(sender.send(Item::End).ok().map(|()| damaged))
}

/// The painting stage's state, on the calling thread (the network stays where it was loaded).
struct PaintStage<'a, 'm> {
    painter: &'a mut FramePainter<'m>,
    resumable: &'a [FrameRecord],
    stored: &'a StoredFrames,
    total: u64,
    /// Raised from outside to stop before the next frame.
    stop: &'a AtomicBool,
    /// Frames passed on before a requested stop, once stopped.
    stopped_after: Option<u64>,
}

impl PaintStage<'_, '_> {
    /// Paints every decoded frame in order and passes it on. `None` when another stage stopped first.
    fn run(
        &mut self,
        receiver: Receiver<Item<Decoded>>,
        sender: Sender<Item<Painted>>,
        errors: &FirstError,
        observer: &mut dyn FnMut(JobEvent<'_>),
    ) -> Result<Option<()>> {
        let mut resuming = true;
        while let Ok(item) = receiver.recv() {
            let Item::Next(decoded) = item else {
                return Ok(sender.send(Item::End).ok());
            };
            if errors.stopped() {
                return Ok(None);
            }
            if self.stop.load(Ordering::SeqCst) {
                // Dropping the sender without an end lets the encoder store what it holds, then stop.
                tracing::info!(frame = decoded.frame.index, "stopping on request before this frame");
                self.stopped_after = Some(decoded.frame.index);
                return Ok(None);
            }
            let span = tracing::info_span!("frame", index = decoded.frame.index);
            let _entered = span.enter();
            let painted = self.paint_or_resume(decoded, &mut resuming, observer)?;
            observer(JobEvent::Frame { record: &painted.record, picture: &painted.picture, total: self.total });
            if sender.send(Item::Next(painted)).is_err() {
                return Ok(None);
            }
        }
        Ok(None)
    }

    /// Takes the frame from the checkpoint while the earlier run's frames last, else paints it.
    fn paint_or_resume(
        &mut self,
        decoded: Decoded,
        resuming: &mut bool,
        observer: &mut dyn FnMut(JobEvent<'_>),
    ) -> Result<Painted> {
        let converted = Instant::now();
        let Decoded { mut frame, seconds } = decoded;
        let content = frame_tensor(&mut frame)?.to_device(self.painter.device());
        let decode_seconds = seconds + converted.elapsed().as_secs_f64();
        let index = frame.index;
        let timing = frame;
        let earlier = self.resumable.get(index as usize).filter(|_| *resuming);
        if let Some(picture) = earlier.and_then(|_| load_stored(self.stored, index, (timing.width, timing.height))) {
            let mut record = earlier.expect("checked above").clone();
            self.painter.resume(&content, &picture, &record);
            record.resumed = true;
            record.seconds.decode = decode_seconds;
            return Ok(Painted { timing, picture, record });
        }
        *resuming = false;
        let mut on_iteration = |done, planned| observer(JobEvent::Iteration { index, done, planned });
        let PaintedFrame { picture, mut record } =
            self.painter.paint(index, timing.pts, &content, &mut on_iteration)?;
        record.seconds.decode = decode_seconds;
        Ok(Painted { timing, picture, record })
    }
}

/// A decoded frame's pixels, taken out of it, as an RGB 0..1 tensor `[1, 3, H, W]` on the CPU.
fn frame_tensor(frame: &mut Frame) -> Result<Tensor> {
    let picture = RgbImage::from_raw(frame.width, frame.height, std::mem::take(&mut frame.rgb))
        .ok_or_else(|| Error::Internal(format!("frame {} has a short pixel buffer", frame.index)))?;
    Ok(imageio::rgb_to_tensor(&picture))
}

/// Stores each painted frame as a checkpoint (unless it came from one) and encodes it; finishes the
/// video at the end of the stream. Returns the records with their encode times, or `None` when an
/// earlier stage failed (the unfinished video is then removed).
fn encode_stage(
    writer: VideoWriter,
    receiver: Receiver<Item<Painted>>,
    checkpoint: &mut Checkpoint,
    errors: &FirstError,
) -> Result<Option<Vec<FrameRecord>>> {
    let mut writer = writer;
    let mut records = Vec::new();
    while let Ok(item) = receiver.recv() {
        let Item::Next(Painted { timing, picture, mut record }) = item else {
            writer.finish()?;
            return Ok(Some(records));
        };
        if errors.stopped() {
            return Ok(None);
        }
        let started = Instant::now();
        if !record.resumed {
            checkpoint.store(&record, &picture)?;
        }
        writer.write(&Frame { rgb: picture.into_raw(), ..timing })?;
        record.seconds.encode = started.elapsed().as_secs_f64();
        records.push(record);
    }
    Ok(None)
}
