//! Reading a video as a sequence of RGB24 frames in presentation order, scaled to a working size.
//! An iterator, so memory stays bounded by one frame plus FFmpeg's decoder delay however long the
//! video is. Damaged data is reported as it is met (with the frame number) and decoding goes on. A
//! reader can also start at a given frame ([`VideoReader::open_at`]): it seeks to the key frame
//! before it and decodes forward, and falls back to decoding from the start when the file cannot be
//! sought to exactly that frame.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use ffmpeg_next::format::context::Input;
use ffmpeg_next::{Packet, Rational, codec, decoder, ffi, frame};

use super::convert::{Scaler, YuvColorimetry, buffer_from_rgb_frame};
use super::copy::{CopiedPacket, CopiedTrack};
use super::error::MediaError;
use super::geometry::{WorkingSize, fit_long_side};
use super::pipe::{NamedPipe, NamedPipeError, NonBlockingPipe};
use super::probe::{
    discard_other_streams, main_video_stream, open_live_input, open_video_input, pair, stream_frame_rate,
    summarise_streams, url_scheme,
};
use super::quietly;

/// One decoded picture as packed RGB24.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// Pixels, `width * 3` bytes a row, rows top to bottom, in the stored orientation (players apply
    /// the stream's rotation on top; the writer carries it).
    pub rgb: Vec<u8>,
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// Presentation timestamp in `time_base` units.
    pub pts: i64,
    /// How long the frame is shown, in `time_base` units: as the stream says, else one frame at the
    /// stream's nominal rate.
    pub duration: i64,
    /// Unit of `pts` and `duration` (`num`, `den`) seconds.
    pub time_base: (i32, i32),
    /// Position among the frames yielded, from 0.
    pub index: u64,
}

/// How far the reader has got with the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Progress {
    /// Packets are still being read.
    Reading,
    /// The file has ended; the decoder is giving out the frames it still holds.
    Draining,
    /// Everything has been yielded.
    Done,
}

/// What asking the decoder for a frame gave.
enum Decoded {
    /// A frame.
    Frame(frame::Video),
    /// It needs another packet first.
    NeedsInput,
    /// It has nothing more, ever.
    End,
    /// It failed on the data it had.
    Failed(ffmpeg_next::Error),
}

/// Decodes the main video stream of a file into [`Frame`]s. Iterate it; each item is a frame or a
/// [`MediaError::Damaged`] report (after which iteration goes on), and the last item may be a
/// [`MediaError::Truncated`] (a live stream's: [`MediaError::BrokeOff`]) or [`MediaError::ZeroFrames`]
/// error.
pub struct VideoReader {
    path: PathBuf,
    input: Input,
    stream_index: usize,
    decoder: decoder::Video,
    time_base: Rational,
    nominal_frame_duration: i64,
    frame_size: (u32, u32),
    /// The stream's stored picture size.
    source_size: (u32, u32),
    frame_rate: Rational,
    yuv: YuvColorimetry,
    scaler: Option<Scaler>,
    progress: Progress,
    frames_yielded: u64,
    previous_end_pts: Option<i64>,
    packets_read: u64,
    packets_indexed: u64,
    unreadable_packets: u64,
    truncated: bool,
    /// The failed read that ended a live stream early, in FFmpeg's words.
    read_failure: Option<String>,
    /// A live stream ended with its RTMP or SRT connection closed (or lost: FFmpeg cannot tell).
    connection_closed: bool,
    /// A live stream: it has no index, and an interrupted or broken-off read ends it.
    live: bool,
    /// A live stream's sound: its stream index and track.
    audio: Option<(usize, CopiedTrack)>,
    /// Sound packets read and not yet taken.
    audio_packets: Vec<CopiedPacket>,
    /// A decoded frame to yield before decoding more (the one a seek stopped at).
    pending: Option<frame::Video>,
    /// A live input pipe, non-blocking while it is read (after `input`: fields drop in order).
    _pipe: Option<NonBlockingPipe>,
    /// A named pipe the input reads as `pipe:N`, closed after `input`.
    _named_pipe: Option<NamedPipe>,
}

impl VideoReader {
    /// Opens `path` and prepares to decode its main video stream at `size`.
    pub fn open(path: impl AsRef<Path>, size: WorkingSize) -> Result<Self, MediaError> {
        let path = path.as_ref();
        let (input, stream_index) = open_video_input(path)?;
        Self::from_input(path, input, stream_index, size)
    }

    /// Opens a live stream (`tcp://`, `udp://`, `srt://`, `rtmp://`, `http://`, a pipe or a file:
    /// anything FFmpeg reads) and prepares to decode its main video stream at `size`. FFmpeg polls
    /// `stop` while it waits for data (on a pipe too, made non-blocking while it is read); raised, the
    /// stream ends as if its sender had closed it. So does a sender that closes an RTMP or SRT
    /// connection (FFmpeg reports that as an I/O error). A read that fails otherwise (a reset TCP
    /// connection) ends it with [`MediaError::BrokeOff`]. The stream's main audio stream is read
    /// too: see [`audio_track`](Self::audio_track).
    pub fn open_live(location: &str, size: WorkingSize, stop: Arc<AtomicBool>) -> Result<Self, MediaError> {
        let path = Path::new(location);
        let named_pipe = NamedPipe::open(path, &stop).map_err(|error| match error {
            NamedPipeError::Stopped => MediaError::stopped_before_the_stream(path),
            NamedPipeError::Io(source) => MediaError::Io { path: path.to_path_buf(), source },
        })?;
        let read_as = named_pipe.as_ref().map_or_else(|| location.to_owned(), NamedPipe::location);
        let pipe = NonBlockingPipe::switch(&read_as, 0);
        let input = open_live_input(&read_as, path, stop)?;
        let Some(stream_index) = main_video_stream(&input) else {
            return Err(MediaError::NoVideoStream { path: path.to_path_buf(), streams: summarise_streams(&input) });
        };
        let audio = input.streams().best(ffmpeg_next::media::Type::Audio).map(|stream| {
            (stream.index(), CopiedTrack { parameters: stream.parameters(), time_base: stream.time_base() })
        });
        let mut reader = Self::from_input(path, input, stream_index, size)?;
        if let Some((index, _)) = &audio
            && let Some(mut stream) = reader.input.stream_mut(*index)
        {
            // SAFETY: the stream belongs to the open input; `discard` is a plain field the demuxer reads.
            unsafe { (*stream.as_mut_ptr()).discard = ffi::AVDiscard::AVDISCARD_DEFAULT };
        }
        reader.audio = audio;
        reader.live = true;
        reader._pipe = pipe;
        reader._named_pipe = named_pipe;
        // a live reader may be stopped early: fewer packets than a file's index lists is no damage
        reader.packets_indexed = 0;
        Ok(reader)
    }

    /// Whether a live stream ended with its RTMP or SRT connection closing, which FFmpeg cannot tell
    /// from a connection lost (both end the stream without an error).
    pub fn connection_closed(&self) -> bool {
        self.connection_closed
    }

    /// A live stream's sound, which its packets (see [`take_audio`](Self::take_audio)) belong to.
    pub fn audio_track(&self) -> Option<CopiedTrack> {
        self.audio.as_ref().map(|(_, track)| track.clone())
    }

    /// The sound packets read since the last call, in stream order.
    pub fn take_audio(&mut self) -> Vec<CopiedPacket> {
        std::mem::take(&mut self.audio_packets)
    }

    /// A reader of stream `stream_index` of the opened `input`.
    fn from_input(path: &Path, mut input: Input, stream_index: usize, size: WorkingSize) -> Result<Self, MediaError> {
        discard_other_streams(&mut input, stream_index);
        let stream = input.stream(stream_index).expect("index from this input");
        let time_base = stream.time_base();
        let frame_rate = stream_frame_rate(&stream);
        let packets_indexed = stream.frames().max(0) as u64;
        let decoder = open_decoder(path, &stream)?;
        let frame_size = working_frame_size(&decoder, size);
        let yuv = YuvColorimetry {
            matrix: decoder.color_space(),
            full_range: decoder.color_range() == ffmpeg_next::color::Range::JPEG,
        };
        tracing::debug!(path = %path.display(), stream = stream_index, width = frame_size.0, height = frame_size.1, "opened video for decoding");
        Ok(VideoReader {
            path: path.to_path_buf(),
            input,
            stream_index,
            nominal_frame_duration: nominal_frame_duration(frame_rate, time_base),
            frame_rate,
            source_size: (decoder.width(), decoder.height()),
            decoder,
            time_base,
            frame_size,
            yuv,
            scaler: None,
            progress: Progress::Reading,
            frames_yielded: 0,
            previous_end_pts: None,
            packets_read: 0,
            packets_indexed,
            unreadable_packets: 0,
            truncated: false,
            read_failure: None,
            connection_closed: false,
            live: false,
            audio: None,
            audio_packets: Vec::new(),
            pending: None,
            _pipe: None,
            _named_pipe: None,
        })
    }

    /// Opens `path` so that the first frame yielded is frame `index` (numbered as a reader from the
    /// start numbers them, damaged data skipped), whose presentation timestamp is `pts`. With a `pts`
    /// it seeks to the key frame before and decodes forward from there, and if that does not land
    /// exactly on the frame (no index, timestamps that do not match, no key frame before it) it
    /// decodes from the start instead, as it does without a `pts`. Damage met before the frame is
    /// not reported.
    pub fn open_at(
        path: impl AsRef<Path>,
        size: WorkingSize,
        index: u64,
        pts: Option<i64>,
    ) -> Result<Self, MediaError> {
        let path = path.as_ref();
        let mut reader = VideoReader::open(path, size)?;
        if index == 0 {
            return Ok(reader);
        }
        if let Some(pts) = pts {
            // Frames decoded after a seek may miss their references (open GOPs); they are dropped,
            // and the decoder's complaints about them are not the user's business.
            if quietly(|| reader.seek_to(index, pts))? {
                return Ok(reader);
            }
            tracing::debug!(path = %path.display(), frame = index, "cannot seek to the frame exactly; decoding from the start");
            reader = VideoReader::open(path, size)?;
        }
        reader.skip_to(index)?;
        Ok(reader)
    }

    /// Seeks to the key frame at or before `pts` and decodes up to the frame shown at `pts`, which
    /// becomes frame `index`; false when that frame was not met exactly after a key frame.
    fn seek_to(&mut self, index: u64, pts: i64) -> Result<bool, MediaError> {
        let (num, den) = (i128::from(self.time_base.numerator()), i128::from(self.time_base.denominator()));
        if num <= 0 || den <= 0 {
            return Ok(false);
        }
        let micros = (i128::from(pts) * num * 1_000_000).div_euclid(den) as i64;
        if self.input.seek(micros, ..micros).is_err() {
            return Ok(false);
        }
        self.decoder.flush();
        // the packets read no longer add up to the stream's, so the index cannot tell truncation
        self.packets_indexed = 0;
        let mut after_key_frame = false;
        while let Some(item) = self.next_decoded() {
            let Ok(decoded) = item else { continue };
            after_key_frame |= decoded.is_key();
            match decoded.timestamp() {
                Some(shown) if shown < pts => {
                    self.timing_of(&decoded);
                }
                Some(shown) if shown == pts && after_key_frame => {
                    self.frames_yielded = index;
                    self.pending = Some(decoded);
                    return Ok(true);
                }
                _ => return Ok(false),
            }
        }
        Ok(false)
    }

    /// Decodes (without converting) the frames before frame `index`.
    fn skip_to(&mut self, index: u64) -> Result<(), MediaError> {
        while self.frames_yielded < index {
            match self.next_decoded() {
                Some(Ok(decoded)) => {
                    self.timing_of(&decoded);
                    self.frames_yielded += 1;
                }
                Some(Err(MediaError::Damaged { .. })) => {}
                Some(Err(error)) => return Err(error),
                None => return Err(MediaError::Truncated { path: self.path.clone(), frames: self.frames_yielded }),
            }
        }
        Ok(())
    }

    /// The (`width`, `height`) of the frames this reader yields.
    pub fn frame_size(&self) -> (u32, u32) {
        self.frame_size
    }

    /// The (`width`, `height`) the stream stores its pictures at.
    pub fn source_size(&self) -> (u32, u32) {
        self.source_size
    }

    /// The stream's nominal frame rate (`num`, `den`), if it states one.
    pub fn frame_rate(&self) -> Option<(i32, i32)> {
        let (num, den) = pair(self.frame_rate);
        (num > 0 && den > 0).then_some((num, den))
    }

    /// The time base (`num`, `den`) of the frames' timestamps: the stream's own.
    pub fn time_base(&self) -> (i32, i32) {
        pair(self.time_base)
    }

    /// The file being read.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Asks the decoder for its next frame.
    fn receive(&mut self) -> Decoded {
        let mut decoded = frame::Video::empty();
        match self.decoder.receive_frame(&mut decoded) {
            Ok(()) => Decoded::Frame(decoded),
            Err(ffmpeg_next::Error::Eof) => Decoded::End,
            Err(ffmpeg_next::Error::Other { errno }) if errno == libc::EAGAIN => Decoded::NeedsInput,
            Err(error) => Decoded::Failed(error),
        }
    }

    /// Reads packets until one of the video stream can be given to the decoder, or the file ends.
    /// Returns a report when the data was damaged.
    fn feed(&mut self) -> Option<MediaError> {
        loop {
            let mut packet = Packet::empty();
            match packet.read(&mut self.input) {
                Ok(()) if packet.stream() == self.stream_index => {
                    self.packets_read += 1;
                    return self.send(&packet);
                }
                Ok(()) if self.audio.as_ref().is_some_and(|(index, _)| *index == packet.stream()) => {
                    self.audio_packets.push(CopiedPacket(packet));
                }
                Ok(()) => continue,
                Err(ffmpeg_next::Error::InvalidData) => self.unreadable_packets += 1,
                Err(error) => return self.end_of_input(error),
            }
        }
    }

    /// Gives a packet to the decoder; reports damage met before it or in it.
    fn send(&mut self, packet: &Packet) -> Option<MediaError> {
        let skipped = std::mem::take(&mut self.unreadable_packets);
        let sent = self.decoder.send_packet(packet);
        if skipped > 0 {
            return Some(self.damaged(format!("{skipped} unreadable packets skipped")));
        }
        sent.err().map(|error| self.damaged(error.to_string()))
    }

    /// The file has ended (cleanly or not): starts draining the decoder. The data ended early if the
    /// last reads failed, reading stopped on an error, or fewer packets came than the index lists.
    fn end_of_input(&mut self, error: ffmpeg_next::Error) -> Option<MediaError> {
        self.progress = Progress::Draining;
        let index_unmet = self.packets_read < self.packets_indexed;
        let ended_cleanly = error == ffmpeg_next::Error::Eof || (self.live && live_stream_ended(&self.path, error));
        self.connection_closed =
            self.live && ended_cleanly && error != ffmpeg_next::Error::Eof && error != ffmpeg_next::Error::Exit;
        self.truncated = self.unreadable_packets > 0 || !ended_cleanly || index_unmet;
        if !ended_cleanly {
            self.read_failure = Some(error.to_string());
        }
        if self.truncated {
            tracing::debug!(path = %self.path.display(), read = self.packets_read, indexed = self.packets_indexed,
                unreadable = self.unreadable_packets, %error, "video data ends early");
        }
        let _ = self.decoder.send_eof();
        None
    }

    /// The report that ends iteration, if the stream ended badly.
    fn final_report(&mut self) -> Option<MediaError> {
        self.progress = Progress::Done;
        if self.truncated {
            let (path, frames) = (self.path.clone(), self.frames_yielded);
            return Some(match (self.live, self.read_failure.take()) {
                (true, Some(detail)) => MediaError::BrokeOff { path, frames, detail },
                _ => MediaError::Truncated { path, frames },
            });
        }
        (self.frames_yielded == 0).then(|| MediaError::ZeroFrames { path: self.path.clone() })
    }

    /// A damage report at the current frame.
    fn damaged(&self, detail: String) -> MediaError {
        tracing::warn!(path = %self.path.display(), frame = self.frames_yielded, %detail, "damaged video data");
        MediaError::Damaged { path: self.path.clone(), frame: self.frames_yielded, detail }
    }

    /// Converts a decoded frame to RGB at the working size and numbers it.
    fn rgb_frame_from(&mut self, decoded: &frame::Video) -> Result<Frame, MediaError> {
        let scaler = self.scaler_for(decoded)?;
        let rgb =
            scaler.convert(decoded).map_err(|e| MediaError::ffmpeg(&self.path, "converting a frame to RGB", e))?;
        let (pts, duration) = self.timing_of(decoded);
        let frame = Frame {
            rgb: buffer_from_rgb_frame(&rgb),
            width: self.frame_size.0,
            height: self.frame_size.1,
            pts,
            duration,
            time_base: pair(self.time_base),
            index: self.frames_yielded,
        };
        self.frames_yielded += 1;
        Ok(frame)
    }

    /// The scaler for frames like `decoded`, built on first use and whenever the stream changes size
    /// or format mid-way.
    fn scaler_for(&mut self, decoded: &frame::Video) -> Result<&mut Scaler, MediaError> {
        if !self.scaler.as_ref().is_some_and(|scaler| scaler.accepts(decoded)) {
            let source_size = (decoded.width(), decoded.height());
            let scaler = Scaler::to_rgb(decoded.format(), source_size, self.frame_size, self.yuv)
                .map_err(|e| MediaError::ffmpeg(&self.path, "setting up the RGB conversion", e))?;
            self.scaler = Some(scaler);
        }
        Ok(self.scaler.as_mut().expect("set just above"))
    }

    /// Presentation timestamp and duration of a decoded frame; guessed from the previous frame when
    /// the stream does not say.
    fn timing_of(&mut self, decoded: &frame::Video) -> (i64, i64) {
        let stated_duration = decoded.packet().duration;
        let duration = if stated_duration > 0 { stated_duration } else { self.nominal_frame_duration };
        let pts = decoded.timestamp().or(self.previous_end_pts).unwrap_or(0);
        self.previous_end_pts = Some(pts + duration.max(1));
        (pts, duration)
    }
}

impl Iterator for VideoReader {
    type Item = Result<Frame, MediaError>;

    fn next(&mut self) -> Option<Self::Item> {
        // joining a live stream mid-way, the decoder complains until the first key frame: expected,
        // and not the user's business
        let joining = self.live && self.frames_yielded == 0;
        let decoded = match self.pending.take() {
            Some(decoded) => decoded,
            None if joining => match quietly(|| self.next_decoded())? {
                Ok(decoded) => decoded,
                Err(report) => return Some(Err(report)),
            },
            None => match self.next_decoded()? {
                Ok(decoded) => decoded,
                Err(report) => return Some(Err(report)),
            },
        };
        Some(self.rgb_frame_from(&decoded))
    }
}

impl VideoReader {
    /// The next decoded frame as the decoder gives it, or a damage report, or the report that ends
    /// the stream.
    fn next_decoded(&mut self) -> Option<Result<frame::Video, MediaError>> {
        while self.progress != Progress::Done {
            match self.receive() {
                Decoded::Frame(decoded) => return Some(Ok(decoded)),
                Decoded::Failed(error) => return Some(Err(self.damaged(error.to_string()))),
                Decoded::NeedsInput if self.progress == Progress::Reading => {
                    if let Some(report) = self.feed() {
                        return Some(Err(report));
                    }
                }
                Decoded::NeedsInput | Decoded::End => return self.final_report().map(Err),
            }
        }
        None
    }
}

/// Opens the decoder for `stream`.
fn open_decoder(path: &Path, stream: &ffmpeg_next::Stream) -> Result<decoder::Video, MediaError> {
    let context = codec::Context::from_parameters(stream.parameters())
        .map_err(|e| MediaError::ffmpeg(path, "reading the codec parameters", e))?;
    context.decoder().video().map_err(|e| MediaError::ffmpeg(path, "opening the video decoder", e))
}

/// The frame size for `size`, from the decoder's stored size and pixel aspect.
fn working_frame_size(decoder: &decoder::Video, size: WorkingSize) -> (u32, u32) {
    match size {
        WorkingSize::Source => (decoder.width(), decoder.height()),
        WorkingSize::LongSide(long_side) => {
            let aspect = decoder.aspect_ratio();
            fit_long_side(decoder.width(), decoder.height(), (aspect.numerator(), aspect.denominator()), long_side)
        }
    }
}

/// One frame's duration at `frame_rate`, in `time_base` units (1 when the rate is unknown).
fn nominal_frame_duration(frame_rate: Rational, time_base: Rational) -> i64 {
    if frame_rate.numerator() <= 0 || frame_rate.denominator() <= 0 || time_base.numerator() <= 0 {
        return 1;
    }
    let ticks = f64::from(frame_rate.invert()) / f64::from(time_base);
    (ticks.round() as i64).max(1)
}

/// Whether a live stream's read that ended with `error` ended it cleanly: a stop request interrupted
/// it, or the sender closed an RTMP or SRT connection, which FFmpeg's protocols report as an I/O
/// error (they cannot tell a close from a lost connection; a TCP stream can, and a reset is not a
/// clean end).
fn live_stream_ended(location: &Path, error: ffmpeg_next::Error) -> bool {
    let scheme = location.to_str().and_then(url_scheme);
    let closes_with_eio = scheme.is_some_and(|scheme| scheme.starts_with("rtmp") || scheme == "srt");
    error == ffmpeg_next::Error::Exit || (closes_with_eio && error == ffmpeg_next::Error::Other { errno: libc::EIO })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_rtmp_or_srt_sender_that_closes_ends_the_stream_a_tcp_reset_does_not() {
        let eio = ffmpeg_next::Error::Other { errno: libc::EIO };
        let reset = ffmpeg_next::Error::Other { errno: libc::ECONNRESET };
        for location in ["rtmp://host/live/key", "rtmps://host/live/key", "srt://host:9000?mode=listener"] {
            assert!(live_stream_ended(Path::new(location), eio), "{location}");
            assert!(!live_stream_ended(Path::new(location), reset), "{location}");
        }
        for location in ["tcp://host:9000", "udp://host:9000", "pipe:0", "rtmp.ts"] {
            assert!(!live_stream_ended(Path::new(location), eio), "{location}");
        }
        assert!(live_stream_ended(Path::new("tcp://host:9000"), ffmpeg_next::Error::Exit), "a stop request");
    }
}
