//! A live stream in, painted live out (`impasto stream`): three threads, as in a video job, but
//! nothing waits for the painter. The reader takes frames from the stream as they come; in `live`
//! pace it keeps only the newest unpainted one in a one-frame slot, so when painting is slower than
//! the stream (on a CPU it always is) the frames the painter had no time for are dropped, and the
//! delay between the stream and its painting stays within two frames' painting (the one it waited
//! through and its own), however long the stream runs. In `every-frame` pace the reader waits for the painter instead (for a recorded stream, or a
//! card fast enough). Each frame starts from the previous painted one warped along the optical flow,
//! as in a video job, so a frame that follows dropped ones is tied to the last painted one. The
//! writer sends each painted frame out at its input timestamp, so gaps stay gaps and nothing drifts,
//! and the stream's sound as it came, straight from the reader.
//! A stop request ([`StreamStop::finish`], Ctrl-C) ends the read at once; the frame being painted is
//! finished and sent, and the output is closed properly; [`StreamStop::abort`] also ends a wait to
//! send. A failure anywhere raises both, so no thread is left waiting. No checkpoints: a stream
//! cannot be read again.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use crossbeam_channel::{Receiver, Sender, TrySendError, bounded};
use image::RgbImage;
use serde::Serialize;
use tch::Tensor;

use super::job::{check_frame_size, check_settings, working_size};
use super::painter::{FramePainter, PaintedFrame};
use super::report::{FrameLosses, Start};
use super::settings::VideoSettings;
use super::stages::{FirstError, Item};
use crate::error::{Error, Result, panic_error};
use crate::imageio;
use crate::media::{CopiedPacket, Frame, MediaError, VideoReader, VideoWriter, VideoWriterSpec};
use crate::model::Vgg;
use crate::style::{StyleImage, StyleSettings};

/// Whether the stream waits for the painter.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Pace {
    /// Keep up with the stream: paint the newest frame, drop those there was no time for.
    #[default]
    Live,
    /// Paint every frame; the stream is read only as fast as frames are painted.
    EveryFrame,
}

impl std::str::FromStr for Pace {
    type Err = Error;
    fn from_str(text: &str) -> Result<Self> {
        match text.trim().to_ascii_lowercase().as_str() {
            "live" => Ok(Pace::Live),
            "every-frame" | "every" => Ok(Pace::EveryFrame),
            _ => Err(Error::Settings(format!("pace '{text}': expected 'live' or 'every-frame'"))),
        }
    }
}

/// How a running stream is asked to end.
#[derive(Clone, Debug, Default)]
pub struct StreamStop {
    /// Finish the frame being painted, close the output properly, end (an input that is waited for
    /// stops being waited for).
    pub finish: Arc<AtomicBool>,
    /// Give up sending too: a wait to send (a receiver that stopped reading, a listening output no
    /// one connects to) ends in an error.
    pub abort: Arc<AtomicBool>,
}

impl StreamStop {
    /// Raises both flags: something failed, and every thread must stop waiting.
    fn everything(&self) {
        self.finish.store(true, Ordering::SeqCst);
        self.abort.store(true, Ordering::SeqCst);
    }
}

/// What to paint, from where to where.
pub struct StreamJob {
    /// Where the stream comes from: a URL FFmpeg reads (`tcp://`, `udp://`, `srt://`, `rtmp://`,
    /// `http://`, `pipe:0`) or a file.
    pub input: String,
    /// Where the painted stream goes: a URL or a file.
    pub output: String,
    /// The output's container (FFmpeg muxer name); by default FLV for RTMP, MPEG-TS for other URLs
    /// and the extension's for a file.
    pub output_format: Option<String>,
    /// The style images with their blend weights.
    pub styles: Vec<StyleImage>,
    /// The stylization settings.
    pub style: StyleSettings,
    /// The video settings (segments do not apply: a stream is painted in order).
    pub video: VideoSettings,
    /// Whether the stream waits for the painter.
    pub pace: Pace,
}

/// One painted frame of a stream.
#[derive(Clone, Debug, Serialize)]
pub struct StreamFrame {
    /// The frame's position in the input stream, from 0.
    pub index: u64,
    /// Its presentation time in seconds.
    pub time: f64,
    /// How it started.
    pub start: Start,
    /// Iterations run.
    pub iterations: usize,
    /// Its losses.
    pub losses: FrameLosses,
    /// Seconds from its arrival to its hand-over to the encoder (the output's delay behind the input).
    pub latency: f64,
    /// Seconds of painting (flow included).
    pub seconds: f64,
    /// Frames painted so far, this one included.
    pub painted: u64,
    /// Frames dropped so far (no time to paint them).
    pub dropped: u64,
}

/// How a stream went.
#[derive(Clone, Debug, Serialize)]
pub struct StreamSummary {
    /// Where the painted stream went.
    pub output: String,
    /// Frames read from the input.
    pub frames_in: u64,
    /// Frames painted and sent.
    pub frames_painted: u64,
    /// Frames read and not painted: dropped for lack of time, or still on their way when a stop
    /// came.
    pub frames_dropped: u64,
    /// Mean seconds of painting per painted frame.
    pub seconds_per_frame: f64,
    /// Mean seconds from a frame's arrival to its hand-over to the encoder.
    pub mean_latency: f64,
    /// Whether a stop request ended it (else the input ended).
    pub stopped: bool,
    /// Why the input broke off, when it did not end cleanly (a reset connection, an overrun); the
    /// output holds what came before and is closed properly.
    pub broke_off: Option<String>,
    /// Whether the input ended with its RTMP or SRT connection closing: by its sender, or lost (the
    /// protocols cannot tell which).
    pub connection_closed: bool,
    /// Wall-clock seconds.
    pub wall_seconds: f64,
}

/// Sound packets on their way from reader to writer at most (several seconds: a packet holds 20–40
/// ms of sound).
const SOUND_PACKETS_IN_FLIGHT: usize = 256;

/// A frame read from the stream, when it came.
struct Arrival {
    frame: Frame,
    at: Instant,
}

/// Counts shared between the reader and the painter.
#[derive(Default)]
struct Counts {
    read: AtomicU64,
    dropped: AtomicU64,
}

impl StreamJob {
    /// Opens the input and the output, paints until the input ends or `stop` asks to finish, and
    /// closes the output. `observer` sees every painted frame. The input must start within FFmpeg's
    /// own timeouts; a stop request also ends a wait for it.
    pub fn run(self, vgg: &Vgg, stop: &StreamStop, observer: &mut dyn FnMut(&StreamFrame)) -> Result<StreamSummary> {
        self.check()?;
        let started = Instant::now();
        let reader = VideoReader::open_live(&self.input, working_size(&self.video), stop.finish.clone())?;
        let frame_size = reader.frame_size();
        check_frame_size(frame_size)?;
        let mut spec = VideoWriterSpec::new(frame_size, reader.time_base());
        spec.frame_rate = reader.frame_rate();
        spec.source_size = Some(reader.source_size());
        let (output, format) = (&self.output, self.output_format.as_deref());
        let audio = reader.audio_track();
        let writer =
            VideoWriter::create_live(output, format, &self.video.encode, spec, audio.as_ref(), stop.abort.clone())?;
        let long_side = frame_size.0.max(frame_size.1);
        let painter = FramePainter::new(vgg, &self.style, &self.video, &self.styles, long_side, false)?;
        tracing::info!(input = %self.input, output = %self.output, width = frame_size.0, height = frame_size.1,
            pace = ?self.pace, "stream open");
        let counts = Counts::default();
        let errors = FirstError::default();
        let painted = self.run_threads(reader, writer, painter, &counts, &errors, stop, observer);
        if let Some(error) = errors.into_error() {
            return Err(error);
        }
        let (painted_seconds, latencies, input_end) = painted.unwrap_or_default();
        let frames_painted = latencies.len() as u64;
        let frames_in = counts.read.load(Ordering::SeqCst);
        Ok(StreamSummary {
            output: self.output,
            frames_in,
            frames_painted,
            frames_dropped: frames_in.saturating_sub(frames_painted),
            seconds_per_frame: painted_seconds / frames_painted.max(1) as f64,
            mean_latency: latencies.iter().sum::<f64>() / frames_painted.max(1) as f64,
            stopped: stop.finish.load(Ordering::SeqCst),
            broke_off: input_end.broke_off,
            connection_closed: input_end.connection_closed,
            wall_seconds: started.elapsed().as_secs_f64(),
        })
    }

    /// The settings and styles, before anything is opened.
    fn check(&self) -> Result<()> {
        check_settings(&self.video, &self.styles)?;
        if self.video.segments > 1 {
            tracing::warn!(segments = self.video.segments, "a stream is painted in order; video.segments is ignored");
        }
        Ok(())
    }

    /// Reads on one thread, writes on another, paints on this one. Returns the painting seconds,
    /// each painted frame's latency and how the input ended, unless a stage failed. Each stage
    /// records its own failure as it happens (the first is the stream's error) and raises every stop
    /// flag, so that no other stage is left waiting on a channel or on the network.
    #[allow(clippy::too_many_arguments)]
    fn run_threads(
        &self,
        reader: VideoReader,
        writer: VideoWriter,
        mut painter: FramePainter<'_>,
        counts: &Counts,
        errors: &FirstError,
        stop: &StreamStop,
        observer: &mut dyn FnMut(&StreamFrame),
    ) -> Option<(f64, Vec<f64>, InputEnd)> {
        let (arrival_sender, arrivals) = bounded::<Arrival>(1);
        let (painted_sender, painted_frames) = bounded::<Item<Frame>>(2);
        // the sound goes straight from reader to writer
        let (sound_sender, sound) = bounded::<CopiedPacket>(SOUND_PACKETS_IN_FLIGHT);
        let fail = |error: Error| {
            errors.record(error);
            stop.everything();
        };
        std::thread::scope(|scope| {
            // in live pace the reader takes a waiting frame back out to replace it with a newer one
            let evict = (self.pace == Pace::Live).then(|| arrivals.clone());
            let slot = Slot { sender: arrival_sender, evict };
            // each stage records its failure before its channels close, so the others never take a
            // closed channel for a finished stream
            let read = scope.spawn(move || {
                let _unwinding = RaiseOnPanic(stop);
                let read = read_stream(reader, &slot, &sound_sender, counts);
                read.map_err(fail).ok()
            });
            let write = scope.spawn(move || {
                let _unwinding = RaiseOnPanic(stop);
                write_stream(writer, painted_frames, sound).map_err(fail).ok()
            });
            let painted = {
                let _unwinding = RaiseOnPanic(stop);
                paint_stream(&mut painter, arrivals, painted_sender, errors, stop, counts, observer)
            };
            let painted = painted.map_err(fail).ok();
            let input_end = match read.join() {
                Ok(input_end) => input_end.unwrap_or_default(),
                Err(payload) => {
                    fail(panic_error("reader", payload.as_ref()));
                    InputEnd::default()
                }
            };
            if let Err(payload) = write.join() {
                fail(panic_error("writer", payload.as_ref()));
            }
            painted.map(|(seconds, latencies)| (seconds, latencies, input_end))
        })
    }
}

/// Raises every stop flag if dropped while the painter panics (a libtorch failure), so the reader
/// and writer stop waiting and the panic can reach the caller.
struct RaiseOnPanic<'a>(&'a StreamStop);

impl Drop for RaiseOnPanic<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.everything();
        }
    }
}

/// The one-frame slot between reader and painter.
struct Slot {
    sender: Sender<Arrival>,
    /// In live pace, the reader's hold on the slot's far end, to take out a frame still waiting.
    evict: Option<Receiver<Arrival>>,
}

impl Slot {
    /// Hands `arrival` to the painter: waiting for room, or in live pace replacing a frame still
    /// waiting. False when the painter is gone.
    fn put(&self, arrival: Arrival, counts: &Counts) -> bool {
        match &self.evict {
            None => self.sender.send(arrival).is_ok(),
            Some(evict) => replace_waiting(&self.sender, evict, arrival, counts),
        }
    }
}

/// How the input ended, when no stage failed.
#[derive(Default)]
struct InputEnd {
    /// Why it broke off, if it did.
    broke_off: Option<String>,
    /// Its RTMP or SRT connection closed (or was lost).
    connection_closed: bool,
}

/// Reads frames until the stream ends (or is stopped) and hands them to the painter through the
/// slot, and the sound, as it comes, to the writer. Returns how the input ended.
fn read_stream(
    mut reader: VideoReader,
    slot: &Slot,
    sound: &Sender<CopiedPacket>,
    counts: &Counts,
) -> Result<InputEnd> {
    let mut broke_off = None;
    let mut timelines = Timelines::default();
    let mut picture = Track::new("picture", reader.time_base());
    let mut sound_track = reader.audio_track().map(|track| Track::new("sound", track.time_base()));
    while let Some(item) = reader.next() {
        if !pass_sound(&mut reader, sound, &mut timelines, sound_track.as_mut()) {
            break; // the writer has stopped
        }
        let frame = match item {
            Ok(frame) => frame,
            Err(MediaError::Damaged { .. }) => continue, // reported by the reader; decoding goes on
            Err(error @ (MediaError::BrokeOff { .. } | MediaError::Truncated { .. })) => {
                tracing::warn!(%error, "the stream broke off");
                broke_off = Some(error.to_string());
                break;
            }
            // ended or stopped before its first frame: the summary says so
            Err(MediaError::ZeroFrames { .. }) => break,
            Err(error) => return Err(error.into()),
        };
        let mut frame = frame;
        counts.read.fetch_add(1, Ordering::SeqCst);
        match timelines.shift_for(&mut picture, frame.pts, frame.duration) {
            Some(shift) => frame.pts += shift,
            None => continue, // a stray timestamp: left out
        }
        if !slot.put(Arrival { frame, at: Instant::now() }, counts) {
            break; // the painter has stopped
        }
    }
    pass_sound(&mut reader, sound, &mut timelines, sound_track.as_mut());
    Ok(InputEnd { broke_off, connection_closed: reader.connection_closed() })
}

/// Sends the sound read so far to the writer, on its `track`; false when the writer is gone.
fn pass_sound(
    reader: &mut VideoReader,
    sound: &Sender<CopiedPacket>,
    timelines: &mut Timelines,
    track: Option<&mut Track>,
) -> bool {
    let packets = reader.take_audio();
    let Some(track) = track else { return true };
    packets.into_iter().all(|mut packet| {
        if let Some((time, duration)) = packet.timing() {
            match timelines.shift_for(track, time, duration) {
                Some(shift) => packet.shift(shift),
                None => return true, // a stray timestamp: left out
            }
        }
        sound.send(packet).is_ok()
    })
}

/// The input's timestamps on their way out, kept rising when they jump back (a sender that
/// restarted, a stream spliced from two): from a jump on, both tracks are moved by one shift, to
/// follow a second after the latest point either had reached, so the output goes on instead of
/// failing, picture and sound still together. The second covers what the other track still holds
/// back (frames in the decoder) and its own lead. A step back of less than a second is a stray
/// timestamp, and its item is left out. Gaps forward are kept as they are.
#[derive(Default)]
struct Timelines {
    /// The total shift after each jump back so far, in microseconds, decided by the track that meets
    /// the jump first.
    shifts: Vec<i64>,
    /// The latest end passed on, on any track, in microseconds.
    latest_end: Option<i64>,
}

/// One track's place on the [`Timelines`].
struct Track {
    name: &'static str,
    time_base: (i32, i32),
    /// Jumps back met so far.
    jumps: usize,
    /// Ticks added to the input's timestamps now.
    shift: i64,
    /// The last timestamp passed on, shifted.
    last: Option<i64>,
}

impl Track {
    fn new(name: &'static str, time_base: (i32, i32)) -> Self {
        Track { name, time_base, jumps: 0, shift: 0, last: None }
    }

    /// `ticks` of this track in microseconds, rounded down.
    fn micros(&self, ticks: i64) -> i64 {
        let (num, den) = (i128::from(self.time_base.0), i128::from(self.time_base.1.max(1)));
        (i128::from(ticks) * num * 1_000_000).div_euclid(den) as i64
    }

    /// `micros` in ticks of this track, rounded up.
    fn ticks(&self, micros: i64) -> i64 {
        let (num, den) = (i128::from(self.time_base.0.max(1)), i128::from(self.time_base.1));
        let scaled = i128::from(micros) * den;
        let unit = num * 1_000_000;
        (scaled.div_euclid(unit) + i128::from(scaled.rem_euclid(unit) != 0)) as i64
    }
}

/// A step back of at least this many microseconds is a jump; a shorter one a stray timestamp. Also
/// the room left after the latest point when the tracks follow on after a jump.
const JUMP_MICROS: i64 = 1_000_000;

impl Timelines {
    /// The ticks to add to an item of `track` at `time` lasting `duration`; `None` to leave the
    /// item out (a stray timestamp, or one that would still not rise after its jump).
    fn shift_for(&mut self, track: &mut Track, time: i64, duration: i64) -> Option<i64> {
        if let Some(last) = track.last
            && time + track.shift <= last
        {
            let back = track.micros(last - time - track.shift);
            if back < JUMP_MICROS {
                tracing::debug!(track = track.name, back, "a timestamp that does not rise; the item is left out");
                return None;
            }
            let micros = match self.shifts.get(track.jumps) {
                Some(&micros) => micros,
                None => {
                    let micros = self.latest_end.unwrap_or(0) + JUMP_MICROS - track.micros(time);
                    self.shifts.push(micros);
                    micros
                }
            };
            tracing::warn!(track = track.name, back, "the input's timestamps jumped back; the output's go on");
            track.jumps += 1;
            track.shift = track.ticks(micros);
            if time + track.shift <= last {
                return None;
            }
        }
        let shifted = time + track.shift;
        track.last = Some(shifted);
        let end = track.micros(shifted + duration.max(0));
        self.latest_end = Some(self.latest_end.map_or(end, |latest| latest.max(end)));
        Some(track.shift)
    }
}

/// Puts `arrival` in the slot, dropping the frame waiting there if there is one. False when the
/// painter is gone.
fn replace_waiting(slot: &Sender<Arrival>, evict: &Receiver<Arrival>, mut arrival: Arrival, counts: &Counts) -> bool {
    loop {
        match slot.try_send(arrival) {
            Ok(()) => return true,
            Err(TrySendError::Disconnected(_)) => return false,
            Err(TrySendError::Full(returned)) => {
                arrival = returned;
                if let Ok(stale) = evict.try_recv() {
                    counts.dropped.fetch_add(1, Ordering::SeqCst);
                    tracing::debug!(frame = stale.frame.index, "dropped: no time to paint it");
                }
            }
        }
    }
}

/// Paints the frames the reader hands over, in order, and sends them to the writer; ends with the
/// stream or, after the frame being painted, on a stop request. Returns the painting seconds and the
/// painted frames' latencies.
fn paint_stream(
    painter: &mut FramePainter<'_>,
    arrivals: Receiver<Arrival>,
    sender: Sender<Item<Frame>>,
    errors: &FirstError,
    stop: &StreamStop,
    counts: &Counts,
    observer: &mut dyn FnMut(&StreamFrame),
) -> Result<(f64, Vec<f64>)> {
    let runner = painter.runner();
    let mut painting_seconds = 0.0;
    let mut latencies = Vec::new();
    while let Ok(Arrival { frame, at }) = arrivals.recv() {
        if stop.finish.load(Ordering::SeqCst) {
            break;
        }
        let span = tracing::info_span!("frame", index = frame.index);
        let painting_started = Instant::now();
        let (output, painted) = span.in_scope(|| paint_frame(painter, &runner, frame))?;
        painting_seconds += painting_started.elapsed().as_secs_f64();
        let latency = at.elapsed().as_secs_f64();
        latencies.push(latency);
        let record = stream_frame(&output, &painted, latency, painting_started, &latencies, counts);
        if sender.send(Item::Next(output)).is_err() {
            break; // the writer failed; its error is the stream's
        }
        observer(&record);
    }
    if !errors.stopped() && !stop.abort.load(Ordering::SeqCst) {
        // the input ended or a stop was asked for; after a failure (every failure raises `abort`)
        // or an abort the output is left unfinished
        let _ = sender.send(Item::End);
    }
    Ok((painting_seconds, latencies))
}

/// One frame painted as a video job paints it (flow, start, optimisation), as an output frame with
/// the input's timing.
fn paint_frame(
    painter: &mut FramePainter<'_>,
    runner: &crate::style::Stylizer<'_>,
    frame: Frame,
) -> Result<(Frame, PaintedFrame)> {
    let Frame { rgb, width, height, pts, duration, time_base, index } = frame;
    let picture = RgbImage::from_raw(width, height, rgb)
        .ok_or_else(|| Error::Internal(format!("frame {index}: {width}×{height} does not match its pixels")))?;
    let content: Tensor = imageio::rgb_to_tensor(&picture).to_device(painter.device());
    let (item, plan) = painter.plan(index, pts, &content, None)?;
    let optimise_started = Instant::now();
    let outcome = runner.optimise_batch(vec![item], &mut |_, _, _, _| {}).pop().expect("one item");
    let painted = painter.finish(plan, outcome, optimise_started.elapsed().as_secs_f64());
    let output = Frame { rgb: painted.picture.as_raw().clone(), width, height, pts, duration, time_base, index };
    Ok((output, painted))
}

/// What the observer hears of a painted frame.
fn stream_frame(
    output: &Frame,
    painted: &PaintedFrame,
    latency: f64,
    painting_started: Instant,
    latencies: &[f64],
    counts: &Counts,
) -> StreamFrame {
    let (num, den) = output.time_base;
    StreamFrame {
        index: output.index,
        time: output.pts as f64 * f64::from(num) / f64::from(den),
        start: painted.record.start,
        iterations: painted.record.iterations,
        losses: painted.record.losses,
        latency,
        seconds: painting_started.elapsed().as_secs_f64(),
        painted: latencies.len() as u64,
        dropped: counts.dropped.load(Ordering::SeqCst),
    }
}

/// Encodes and sends the painted frames, and the sound as it comes (the muxer interleaves them by
/// timestamp); closes the output when the painter ends the stream (an output file then appears under
/// its name), leaves it unfinished when the painter failed.
fn write_stream(
    mut writer: VideoWriter,
    painted: Receiver<Item<Frame>>,
    mut sound: Receiver<CopiedPacket>,
) -> Result<()> {
    loop {
        crossbeam_channel::select! {
            recv(painted) -> item => match item {
                Ok(Item::Next(frame)) => writer.write(&frame)?,
                Ok(Item::End) => break,
                Err(_) => return Ok(()), // the painter failed; its error is the stream's
            },
            recv(sound) -> packet => match packet {
                Ok(packet) => writer.write_copied(packet)?,
                Err(_) => sound = crossbeam_channel::never(), // the reader is done
            },
        }
    }
    for packet in sound.try_iter() {
        writer.write_copied(packet)?;
    }
    if writer.frames_written() > 0 {
        writer.finish()?;
    }
    Ok(())
}
