//! Writing painted frames back into a video: encoding (libx264 by default) with each frame's
//! timestamp kept exactly, so variable frame rates stay variable and frame counts match, while the
//! source's audio and subtitles are copied alongside and its rotation and colour tags carried over.
//! A container that cannot store a rotation (Matroska, WebM, MPEG-TS in FFmpeg 5.1) gets the frames
//! turned upright instead, so no player shows them on their side. The file appears under its name
//! only when `finish` succeeds.

use std::collections::HashMap;
use std::ffi::CString;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use ffmpeg_next::format::Pixel;
use ffmpeg_next::format::context::Output;
use ffmpeg_next::{Codec, Dictionary, Packet, Rational, Rescale, codec, encoder, ffi, format};

use super::color::ColorInfo;
use super::convert::{Scaler, YuvColorimetry, rgb_frame_from_buffer};
use super::copy::{CopiedPacket, CopiedTrack, Route, SourceStreamRole, StreamCopier, add_copied_track};
use super::decode::Frame;
use super::error::MediaError;
use super::geometry::{even_size, fit_long_side, rotation_of};
use super::partial::{PartialOutput, check_output_directory, directory_error};
use super::pipe::NonBlockingPipe;
use super::probe::{VideoInfo, is_url, url_scheme};
use super::settings::{EncodeSettings, OutputSize};

/// What the writer needs to know about the frames it will get and the video they came from.
#[derive(Debug, Clone, PartialEq)]
pub struct VideoWriterSpec {
    /// Size (`width`, `height`) of every frame that will be written.
    pub frame_size: (u32, u32),
    /// Time base (`num`, `den`) of the frames' timestamps.
    pub time_base: (i32, i32),
    /// Nominal frame rate (`num`, `den`), a hint for rate control and players; `None` if unknown.
    pub frame_rate: Option<(i32, i32)>,
    /// Pixel aspect ratio of the frames; (1, 1) for square pixels.
    pub sample_aspect_ratio: (i32, i32),
    /// Display matrix (rotation) to store with the video.
    pub display_matrix: Option<[i32; 9]>,
    /// Colour description to store; its matrix and range also govern the RGB → YUV conversion.
    pub color: ColorInfo,
    /// A file whose audio and subtitle streams are copied into the output.
    pub source: Option<PathBuf>,
    /// The source's stored size, for [`OutputSize::Source`].
    pub source_size: Option<(u32, u32)>,
}

impl VideoWriterSpec {
    /// Frames of `frame_size` timed in `time_base`, with nothing else to carry.
    pub fn new(frame_size: (u32, u32), time_base: (i32, i32)) -> Self {
        VideoWriterSpec {
            frame_size,
            time_base,
            frame_rate: None,
            sample_aspect_ratio: (1, 1),
            display_matrix: None,
            color: ColorInfo::default(),
            source: None,
            source_size: None,
        }
    }

    /// Frames of `frame_size` decoded from the video `info` describes: its time base, rate,
    /// rotation and colour, with its audio and subtitles copied.
    pub fn from_source(info: &VideoInfo, frame_size: (u32, u32)) -> Self {
        let source_size = (info.coded_width, info.coded_height);
        let keeps_source_pixels = frame_size == source_size;
        VideoWriterSpec {
            frame_size,
            time_base: info.time_base,
            frame_rate: (info.frame_rate.0 > 0 && info.frame_rate.1 > 0).then_some(info.frame_rate),
            sample_aspect_ratio: if keeps_source_pixels && info.sample_aspect_ratio.0 > 0 {
                info.sample_aspect_ratio
            } else {
                (1, 1)
            },
            display_matrix: info.display_matrix,
            color: info.color.clone(),
            source: Some(info.path.clone()),
            source_size: Some(source_size),
        }
    }
}

/// Encodes RGB24 frames into a video file. Create it, [`write`](Self::write) every frame in
/// presentation order, then [`finish`](Self::finish); dropping it unfinished removes the partial file.
pub struct VideoWriter {
    muxer: Output,
    encoder: encoder::video::Encoder,
    scaler: Scaler,
    copier: Option<StreamCopier>,
    path: PathBuf,
    video_stream: usize,
    encoder_time_base: Rational,
    stream_time_base: Rational,
    frame_size: (u32, u32),
    output_size: (u32, u32),
    nominal_frame_duration: i64,
    /// Quarter turns clockwise that make each frame upright (the container cannot store the
    /// rotation), 0 when the rotation is stored or there is none.
    upright_turns: u32,
    durations_in_flight: HashMap<i64, i64>,
    last_pts: Option<i64>,
    frames_written: u64,
    /// Frames that have left the encoder.
    frames_encoded: u64,
    /// Where a live input's sound goes, if it has a stream.
    audio_route: Option<Route>,
    /// The temporary file that becomes the output; none for a stream.
    partial: Option<PartialOutput>,
    /// What a stream output's FFmpeg context uses; dropped after the muxer (fields drop in order).
    _stream: Option<StreamEnd>,
}

/// Where the encoded video goes.
enum Destination {
    /// A file, written under a temporary name and renamed into place when complete.
    File,
    /// A stream, sent as it is encoded; a wait to send ends when its abort flag is raised.
    Stream(StreamEnd),
}

/// What a stream output needs beside its FFmpeg context, as long as the context lives.
struct StreamEnd {
    /// The flag the context's interrupt callback reads.
    abort: Arc<AtomicBool>,
    /// An output pipe, non-blocking while it is written, so that a send to a reader that stopped
    /// reading waits in FFmpeg's loop, which reads the flag.
    _pipe: Option<NonBlockingPipe>,
}

impl StreamEnd {
    fn new(location: &str, abort: Arc<AtomicBool>) -> Self {
        StreamEnd { abort, _pipe: NonBlockingPipe::switch(location, 1) }
    }
}

impl VideoWriter {
    /// Prepares to write `output` (container from its extension) with `settings`, for frames as
    /// `spec` describes. Checks everything it can before creating a file.
    pub fn create(
        output: impl AsRef<Path>,
        settings: &EncodeSettings,
        spec: VideoWriterSpec,
    ) -> Result<Self, MediaError> {
        let output = output.as_ref();
        super::init();
        let container = guess_container(output)?;
        Self::open(output, Destination::File, container, settings, spec, None)
    }

    /// Prepares to send a live stream to `location`: a URL (`udp://`, `tcp://`, `srt://`, `rtmp://`,
    /// `pipe:1`, …) is written as frames come, in `container` (by default FLV for RTMP and MPEG-TS
    /// otherwise), with an encoder tuned for latency; a file name is written as [`create`](Self::create)
    /// writes it (container from the extension unless given, complete under its name only once
    /// finished), unless its muxer writes files of its own (an HLS playlist and its segments): those
    /// are written in place as the stream goes, like a URL.
    ///
    /// `audio`, a live input's sound, gets a stream of its own (see [`write_copied`](Self::write_copied)).
    /// FFmpeg polls `abort` whenever sending to a URL waits (for a listener to connect, for a receiver
    /// that stopped reading): raised, the wait ends in an error.
    pub fn create_live(
        location: &str,
        container: Option<&str>,
        settings: &EncodeSettings,
        spec: VideoWriterSpec,
        audio: Option<&CopiedTrack>,
        abort: Arc<AtomicBool>,
    ) -> Result<Self, MediaError> {
        super::init();
        let output = Path::new(location);
        let container = match container {
            Some(container) => container.to_string(),
            None if is_url(location) => stream_container(location).to_string(),
            None => guess_container(output)?,
        };
        // a muxer that writes files of its own (a live HLS playlist and its segments) writes them in
        // place as the stream goes: that is what makes them live
        let in_place = !is_url(location) && writes_own_files(&container);
        if in_place {
            check_output_directory(output)?;
        }
        let destination = match is_url(location) || in_place {
            true => Destination::Stream(StreamEnd::new(location, abort)),
            false => Destination::File,
        };
        Self::open(output, destination, container, settings, spec, audio)
    }

    /// Opens the muxer and encoder for `output` in `container`, with a stream for `audio` if given.
    fn open(
        output: &Path,
        destination: Destination,
        container: String,
        settings: &EncodeSettings,
        spec: VideoWriterSpec,
        audio: Option<&CopiedTrack>,
    ) -> Result<Self, MediaError> {
        let incoming_size = spec.frame_size;
        let (spec, upright_turns) = turned_upright(spec, &container, output);
        let mut plan = plan_output(output, container, settings, &spec)?;
        check_several_files(output, &plan.container)?;
        plan.live = matches!(destination, Destination::Stream(_));
        // declared before the muxer, so dropped after it on every early return below
        let stream = match destination {
            Destination::File => None,
            Destination::Stream(stream) => Some(stream),
        };
        let (mut muxer, partial) = match &stream {
            None => {
                check_output_directory(output)?;
                let partial = PartialOutput::create(output, writes_own_files(&plan.container))?;
                let muxer = format::output_as(&partial.path(), &plan.container).map_err(|e| open_failure(output, e))?;
                (muxer, Some(partial))
            }
            Some(stream) => {
                let muxer = open_stream_output(output, &plan.container, &stream.abort)
                    .map_err(|e| MediaError::ffmpeg(output, "opening the stream", e))?;
                (muxer, None)
            }
        };
        let encoder = open_encoder(output, settings, &plan, &spec, &muxer)?;
        let mut copier = spec.source.as_deref().map(|source| StreamCopier::open(source, output)).transpose()?;
        let video_stream = add_streams(output, &mut muxer, &encoder, plan.codec, copier.as_mut(), &spec)?;
        let audio_stream = audio.map(|track| add_copied_track(output, &mut muxer, track)).transpose()?.flatten();
        // the muxer's own files go beside the file it writes: the partial output's, or the stream's
        let written = partial.as_ref().map_or_else(|| output.to_path_buf(), PartialOutput::path);
        let header_options = muxer_options(&plan, &written);
        muxer
            .write_header_with(header_options)
            .map_err(|e| MediaError::ffmpeg(output, "writing the container header", e))?;
        if let Some(copier) = copier.as_mut() {
            copier.start(&muxer);
        }
        let audio_route = audio_stream.zip(audio).map(|(output_index, track)| Route {
            output_index,
            source_time_base: track.time_base,
            output_time_base: muxer.stream(output_index).expect("added above").time_base(),
        });
        let stream_time_base = muxer.stream(video_stream).expect("added above").time_base();
        let scaler = rgb_to_encoder_scaler(output, &spec, &plan)?;
        let output_size = plan.size;
        tracing::debug!(path = %output.display(), codec = plan.codec.name(), width = output_size.0, height = output_size.1,
            container = %plan.container, "writing video");
        Ok(VideoWriter {
            muxer,
            encoder,
            scaler,
            copier,
            path: output.to_path_buf(),
            video_stream,
            encoder_time_base: rational(spec.time_base),
            stream_time_base,
            frame_size: incoming_size,
            output_size,
            nominal_frame_duration: nominal_frame_duration(&spec),
            upright_turns,
            durations_in_flight: HashMap::new(),
            last_pts: None,
            frames_written: 0,
            frames_encoded: 0,
            audio_route,
            partial,
            _stream: stream,
        })
    }

    /// Encodes one frame. Frames must have the spec's size and strictly increasing timestamps.
    pub fn write(&mut self, frame: &Frame) -> Result<(), MediaError> {
        self.check_frame(frame)?;
        let pts = frame.pts.rescale(rational(frame.time_base), self.encoder_time_base);
        self.check_pts_increase(pts)?;
        let turned = turn_clockwise(frame, self.upright_turns);
        let rgb = match &turned {
            Some(picture) => rgb_frame_from_buffer(picture.as_raw(), picture.width(), picture.height()),
            None => rgb_frame_from_buffer(&frame.rgb, frame.width, frame.height),
        };
        let mut yuv = self.scaler.convert(&rgb).map_err(|e| self.failed("converting a frame to YUV", e))?;
        yuv.set_pts(Some(pts));
        self.durations_in_flight.insert(pts, self.duration_of(frame));
        self.encoder.send_frame(&yuv).map_err(|e| self.failed("encoding a frame", e))?;
        self.mux_encoded_packets()?;
        if let Some(copier) = self.copier.as_mut() {
            copier.copy_until(&mut self.muxer, pts, self.encoder_time_base)?;
        }
        self.last_pts = Some(pts);
        self.frames_written += 1;
        Ok(())
    }

    /// Writes a packet of the live input's sound given to [`create_live`](Self::create_live), timed
    /// as it came (the muxer interleaves it with the video by timestamp). Without that sound, or where
    /// the container could not hold it, the packet is left out.
    pub fn write_copied(&mut self, packet: CopiedPacket) -> Result<(), MediaError> {
        let Some(route) = self.audio_route else { return Ok(()) };
        route.write(&mut self.muxer, packet.0).map_err(|e| self.failed("writing a sound packet", e))
    }

    /// How many frames have been written.
    pub fn frames_written(&self) -> u64 {
        self.frames_written
    }

    /// How many frames have left the encoder for the muxer. For a stream, every frame written (its
    /// encoder holds none back for look-ahead where impasto knows how to ask it); for a file, the
    /// encoder may hold back a few until [`finish`](Self::finish).
    pub fn frames_encoded(&self) -> u64 {
        self.frames_encoded
    }

    /// The size (`width`, `height`) of the encoded video.
    pub fn output_size(&self) -> (u32, u32) {
        self.output_size
    }

    /// Flushes the encoder, copies the rest of the source's streams, completes the file and renames
    /// it into place. Fails (and leaves nothing) if no frame was written.
    pub fn finish(mut self) -> Result<(), MediaError> {
        if self.frames_written == 0 {
            return Err(MediaError::EmptyOutput { path: self.path.clone() });
        }
        self.encoder.send_eof().map_err(|e| self.failed("flushing the encoder", e))?;
        self.mux_encoded_packets()?;
        if let Some(copier) = self.copier.as_mut() {
            copier.copy_rest(&mut self.muxer)?;
        }
        self.muxer.write_trailer().map_err(|e| self.failed("completing the file", e))?;
        tracing::debug!(path = %self.path.display(), frames = self.frames_written, "video complete");
        let VideoWriter { muxer, partial, .. } = self;
        drop(muxer);
        match partial {
            Some(partial) => partial.commit(),
            None => Ok(()),
        }
    }

    /// Rejects frames of the wrong size or without a usable time base.
    fn check_frame(&self, frame: &Frame) -> Result<(), MediaError> {
        let (num, den) = frame.time_base;
        if num <= 0 || den <= 0 {
            return Err(self.bad_frame(format!("time base {num}/{den} is not a positive fraction")));
        }
        let expected_bytes = frame.width as usize * frame.height as usize * 3;
        if (frame.width, frame.height) != self.frame_size {
            let (width, height) = self.frame_size;
            return Err(self.bad_frame(format!(
                "size {}×{} differs from the stream's {width}×{height}",
                frame.width, frame.height
            )));
        }
        if frame.rgb.len() != expected_bytes {
            return Err(
                self.bad_frame(format!("{} bytes of RGB where {expected_bytes} were expected", frame.rgb.len()))
            );
        }
        Ok(())
    }

    /// Rejects timestamps that do not increase (encoders and muxers need them strictly increasing).
    fn check_pts_increase(&self, pts: i64) -> Result<(), MediaError> {
        match self.last_pts {
            Some(last) if pts <= last => Err(self.bad_frame(format!("timestamp {pts} does not come after {last}"))),
            _ => Ok(()),
        }
    }

    /// A frame's duration in the encoder's time base.
    fn duration_of(&self, frame: &Frame) -> i64 {
        if frame.duration > 0 {
            frame.duration.rescale(rational(frame.time_base), self.encoder_time_base).max(1)
        } else {
            self.nominal_frame_duration
        }
    }

    /// Passes every packet the encoder has ready to the muxer.
    fn mux_encoded_packets(&mut self) -> Result<(), MediaError> {
        loop {
            let mut packet = Packet::empty();
            match self.encoder.receive_packet(&mut packet) {
                Ok(()) => self.mux_video_packet(packet)?,
                Err(ffmpeg_next::Error::Eof) => return Ok(()),
                Err(ffmpeg_next::Error::Other { errno }) if errno == libc::EAGAIN => return Ok(()),
                Err(error) => return Err(self.failed("encoding a frame", error)),
            }
        }
    }

    /// Gives an encoded packet its frame's duration and writes it.
    fn mux_video_packet(&mut self, mut packet: Packet) -> Result<(), MediaError> {
        self.frames_encoded += 1;
        let duration = packet.pts().and_then(|pts| self.durations_in_flight.remove(&pts));
        packet.set_duration(duration.unwrap_or(self.nominal_frame_duration));
        packet.set_stream(self.video_stream);
        packet.rescale_ts(self.encoder_time_base, self.stream_time_base);
        packet.write_interleaved(&mut self.muxer).map_err(|e| self.failed("writing a video packet", e))
    }

    /// A frame error at the current position.
    fn bad_frame(&self, problem: String) -> MediaError {
        MediaError::BadFrame { path: self.path.clone(), frame: self.frames_written, problem }
    }

    /// An FFmpeg failure on this output.
    fn failed(&self, operation: &'static str, error: ffmpeg_next::Error) -> MediaError {
        MediaError::ffmpeg(&self.path, operation, error)
    }
}

/// What the settings resolve to in this FFmpeg build, checked before any file is created.
struct OutputPlan {
    container: String,
    codec: Codec,
    pixel_format: Pixel,
    size: (u32, u32),
    /// Sent live: the encoder is tuned for latency.
    live: bool,
}

/// Containers whose FFmpeg 5.1 muxer stores a display matrix (the QuickTime family).
const ROTATING_CONTAINERS: [&str; 8] = ["mov", "mp4", "3gp", "3g2", "psp", "ipod", "ismv", "f4v"];

/// `spec` as the writer must take it for `container`: unchanged where the container stores the
/// rotation; else turned upright (sizes swapped for a quarter turn, no display matrix) with the
/// quarter turns clockwise each frame needs. A rotation that is not a quarter turn is dropped with
/// a warning.
fn turned_upright(spec: VideoWriterSpec, container: &str, output: &Path) -> (VideoWriterSpec, u32) {
    let Some(matrix) = spec.display_matrix else { return (spec, 0) };
    let rotation = rotation_of(&matrix);
    if ROTATING_CONTAINERS.contains(&container) || rotation == 0 {
        return (spec, 0);
    }
    let unrotated = VideoWriterSpec { display_matrix: None, ..spec };
    if rotation % 90 != 0 {
        tracing::warn!(path = %output.display(), rotation, container, "the container cannot store this rotation; it is lost");
        return (unrotated, 0);
    }
    // the matrix turns counter-clockwise by `rotation` for display
    let turns = ((-rotation).rem_euclid(360) / 90) as u32;
    tracing::info!(path = %output.display(), rotation, container, "the container cannot store the rotation; frames are turned upright");
    if turns.is_multiple_of(2) {
        return (unrotated, turns);
    }
    let swap = |(width, height): (u32, u32)| (height, width);
    let spec = VideoWriterSpec {
        frame_size: swap(unrotated.frame_size),
        source_size: unrotated.source_size.map(swap),
        sample_aspect_ratio: (unrotated.sample_aspect_ratio.1, unrotated.sample_aspect_ratio.0),
        ..unrotated
    };
    (spec, turns)
}

/// `frame`'s picture turned `turns` quarter turns clockwise; `None` for no turn.
fn turn_clockwise(frame: &Frame, turns: u32) -> Option<image::RgbImage> {
    let picture = image::ImageBuffer::<image::Rgb<u8>, &[u8]>::from_raw(frame.width, frame.height, &frame.rgb)?;
    match turns % 4 {
        1 => Some(image::imageops::rotate90(&picture)),
        2 => Some(image::imageops::rotate180(&picture)),
        3 => Some(image::imageops::rotate270(&picture)),
        _ => None,
    }
}

/// Resolves and checks codec, pixel format and size for `output` in `container`.
fn plan_output(
    output: &Path,
    container: String,
    settings: &EncodeSettings,
    spec: &VideoWriterSpec,
) -> Result<OutputPlan, MediaError> {
    let codec = find_video_encoder(&settings.codec)?;
    check_container_takes_codec(output, &container, codec)?;
    let pixel_format = choose_pixel_format(output, settings, codec)?;
    Ok(OutputPlan { container, codec, pixel_format, size: encoded_size(settings.output_size, spec), live: false })
}

/// The RGB → encoder-format scaler, with the spec's YUV matrix and range.
fn rgb_to_encoder_scaler(output: &Path, spec: &VideoWriterSpec, plan: &OutputPlan) -> Result<Scaler, MediaError> {
    let yuv = YuvColorimetry { matrix: spec.color.av_matrix(), full_range: spec.color.is_full_range() };
    Scaler::from_rgb(spec.frame_size, plan.pixel_format, plan.size, yuv)
        .map_err(|e| MediaError::ffmpeg(output, "setting up the YUV conversion", e))
}

/// The container a stream to `location` gets unless told: FLV for RTMP, MPEG-TS for the rest.
fn stream_container(location: &str) -> &'static str {
    let is_rtmp = url_scheme(location).is_some_and(|scheme| scheme.to_ascii_lowercase().starts_with("rtmp"));
    if is_rtmp { "flv" } else { "mpegts" }
}

/// The muxer FFmpeg picks for `output`'s extension.
fn guess_container(output: &Path) -> Result<String, MediaError> {
    let unknown = || MediaError::UnknownContainer {
        path: output.to_path_buf(),
        extension: output.extension().map(|e| e.to_string_lossy().into_owned()).unwrap_or_default(),
    };
    let file_name = output.file_name().ok_or_else(unknown)?;
    let file_name = CString::new(file_name.to_string_lossy().as_bytes()).map_err(|_| unknown())?;
    // SAFETY: a valid C string; null short name and MIME type are allowed. The result is static.
    let format = unsafe { ffi::av_guess_format(std::ptr::null(), file_name.as_ptr(), std::ptr::null()) };
    if format.is_null() || output.extension().is_none() {
        return Err(unknown());
    }
    // SAFETY: a non-null AVOutputFormat has a static NUL-terminated name.
    Ok(unsafe { std::ffi::CStr::from_ptr((*format).name) }.to_string_lossy().into_owned())
}

/// The video encoder named `name`.
fn find_video_encoder(name: &str) -> Result<Codec, MediaError> {
    encoder::find_by_name(name)
        .filter(|codec| codec.is_video())
        .ok_or_else(|| MediaError::UnknownCodec { codec: name.to_string() })
}

/// Fails when the container cannot hold the codec's output.
fn check_container_takes_codec(output: &Path, container: &str, codec: Codec) -> Result<(), MediaError> {
    let container_name = CString::new(container).expect("FFmpeg names have no NUL");
    // SAFETY: valid C string; the returned format (checked for null) is static and only read.
    let answer = unsafe {
        let format = ffi::av_guess_format(container_name.as_ptr(), std::ptr::null(), std::ptr::null());
        if format.is_null() {
            return Ok(());
        }
        ffi::avformat_query_codec(format, codec.id().into(), ffi::FF_COMPLIANCE_NORMAL)
    };
    if answer == 0 {
        let detail = format!("the '{container}' container cannot hold {} video", codec.name());
        return Err(MediaError::Unsupported { path: output.to_path_buf(), detail });
    }
    Ok(())
}

/// The settings' pixel format, checked against what the encoder accepts.
fn choose_pixel_format(output: &Path, settings: &EncodeSettings, codec: Codec) -> Result<Pixel, MediaError> {
    let format: Pixel = settings
        .pixel_format
        .parse()
        .map_err(|_| MediaError::Settings(format!("unknown pixel format '{}'", settings.pixel_format)))?;
    let accepted: Option<Vec<Pixel>> = codec.video().ok().and_then(|video| video.formats()).map(Iterator::collect);
    match accepted {
        Some(formats) if !formats.contains(&format) => {
            let names: Vec<&str> = formats.iter().map(|f| f.descriptor().map_or("?", |d| d.name())).collect();
            let detail = format!(
                "{} cannot encode pixel format {}; it takes {}",
                codec.name(),
                settings.pixel_format,
                names.join(", ")
            );
            Err(MediaError::Unsupported { path: output.to_path_buf(), detail })
        }
        _ => Ok(format),
    }
}

/// Classifies a failure to create the output file.
fn open_failure(output: &Path, error: ffmpeg_next::Error) -> MediaError {
    match error {
        ffmpeg_next::Error::Other { errno } => directory_error(output, std::io::Error::from_raw_os_error(errno)),
        other => MediaError::ffmpeg(output, "creating the output file", other),
    }
}

/// Opens `location` for sending in `container`, with FFmpeg polling `abort` during every wait
/// (connecting, sending). `abort` must outlive the returned context.
fn open_stream_output(location: &Path, container: &str, abort: &Arc<AtomicBool>) -> Result<Output, ffmpeg_next::Error> {
    let location = location.to_string_lossy();
    let url = CString::new(sending_url(&location).as_bytes()).map_err(|_| ffmpeg_next::Error::InvalidData)?;
    let format = CString::new(container).map_err(|_| ffmpeg_next::Error::InvalidData)?;
    // SAFETY: valid C strings; the context is freed on every failure and owned by `Output` after.
    // The callback's opaque pointer is the flag, which the writer keeps alive beyond the context.
    unsafe {
        let mut context = std::ptr::null_mut();
        let status =
            ffi::avformat_alloc_output_context2(&mut context, std::ptr::null_mut(), format.as_ptr(), url.as_ptr());
        if status < 0 {
            return Err(ffmpeg_next::Error::from(status));
        }
        (*context).interrupt_callback =
            ffi::AVIOInterruptCB { callback: Some(aborted), opaque: Arc::as_ptr(abort) as *mut libc::c_void };
        if (*(*context).oformat).flags & ffi::AVFMT_NOFILE as libc::c_int != 0 {
            // the muxer opens its own connection (RTSP), with the context's interrupt callback
            return Ok(Output::wrap(context));
        }
        let interrupt = &(*context).interrupt_callback as *const ffi::AVIOInterruptCB;
        let status =
            ffi::avio_open2(&mut (*context).pb, url.as_ptr(), ffi::AVIO_FLAG_WRITE, interrupt, std::ptr::null_mut());
        if status < 0 {
            ffi::avformat_free_context(context);
            return Err(ffmpeg_next::Error::from(status));
        }
        Ok(Output::wrap(context))
    }
}

/// `location` as FFmpeg is asked to send to it. An SRT connection in live mode drops what it has not
/// sent yet when it closes, which would be the last painted frames of every stream: unless the URL
/// says otherwise, it is given [`SRT_LINGER_SECONDS`] to send them.
fn sending_url(location: &str) -> std::borrow::Cow<'_, str> {
    let is_srt = url_scheme(location) == Some("srt");
    let query = location.split_once('?').map(|(_, query)| query);
    let sets_linger =
        query.is_some_and(|query| query.split('&').any(|option| option.split('=').next() == Some("linger")));
    if !is_srt || sets_linger {
        return location.into();
    }
    let separator = if query.is_some() { '&' } else { '?' };
    format!("{location}{separator}linger={SRT_LINGER_SECONDS}").into()
}

/// How long closing an SRT output waits for its unsent packets.
const SRT_LINGER_SECONDS: u32 = 2;

/// FFmpeg's interrupt callback for a stream output: whether its abort flag is raised.
unsafe extern "C" fn aborted(flag: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `flag` is the AtomicBool the writer keeps alive as long as the context.
    let flag = unsafe { &*(flag as *const AtomicBool) };
    libc::c_int::from(flag.load(Ordering::SeqCst))
}

/// The encoded size for the policy, even on both sides.
fn encoded_size(policy: OutputSize, spec: &VideoWriterSpec) -> (u32, u32) {
    let (width, height) = spec.frame_size;
    let size = match policy {
        OutputSize::Frames => spec.frame_size,
        OutputSize::Source => spec.source_size.unwrap_or(spec.frame_size),
        OutputSize::LongSide(long_side) => fit_long_side(width, height, (1, 1), long_side),
    };
    even_size(size)
}

/// Sets up and opens the video encoder.
fn open_encoder(
    output: &Path,
    settings: &EncodeSettings,
    plan: &OutputPlan,
    spec: &VideoWriterSpec,
    muxer: &Output,
) -> Result<encoder::video::Encoder, MediaError> {
    let (width, height) = plan.size;
    let context = codec::Context::new_with_codec(plan.codec);
    let mut video =
        context.encoder().video().map_err(|e| MediaError::ffmpeg(output, "creating the video encoder", e))?;
    video.set_width(width);
    video.set_height(height);
    video.set_format(plan.pixel_format);
    video.set_time_base(rational(spec.time_base));
    video.set_frame_rate(spec.frame_rate.map(rational));
    if let Some(frames) = segment_frames(&plan.container, spec.frame_rate) {
        // a segment can only start at a key frame
        video.set_gop(frames);
    }
    video.set_aspect_ratio(rational(spec.sample_aspect_ratio));
    video.set_colorspace(spec.color.av_matrix());
    video.set_color_range(spec.color.av_range());
    video.set_color_primaries(spec.color.av_primaries());
    video.set_color_transfer_characteristic(spec.color.av_transfer());
    if muxer.format().flags().contains(format::Flags::GLOBAL_HEADER) {
        video.set_flags(codec::Flags::GLOBAL_HEADER);
    }
    let mut options = Dictionary::new();
    options.set("crf", &settings.crf.to_string());
    options.set("preset", &settings.preset);
    if plan.live {
        for (option, value) in live_options(plan.codec.name()) {
            options.set(option, value);
        }
    }
    video.open_with(options).map_err(|error| {
        MediaError::Settings(format!(
            "{} would not open with crf {}, preset '{}', pixel format {} at {width}×{height}: {error}",
            settings.codec, settings.crf, settings.preset, settings.pixel_format
        ))
    })
}

/// Whether the muxer named `container` opens the files it writes itself (HLS, DASH, image
/// sequences, segments), so that impasto cannot hand it one file to write.
fn writes_own_files(container: &str) -> bool {
    let Ok(name) = CString::new(container) else { return false };
    // SAFETY: a valid C string; null file name and MIME type are allowed. The result is static.
    let format = unsafe { ffi::av_guess_format(name.as_ptr(), std::ptr::null(), std::ptr::null()) };
    // SAFETY: a non-null result points to FFmpeg's static description of the muxer.
    !format.is_null() && unsafe { (*format).flags } & ffi::AVFMT_NOFILE as libc::c_int != 0
}

/// The segmenting muxers impasto writes (several files: a playlist or manifest and its segments).
const SEGMENTING_CONTAINERS: [&str; 2] = ["hls", "dash"];

/// How long a segment of an HLS or DASH output is.
const SEGMENT_SECONDS: u32 = 2;

/// Refuses a muxer that writes files of its own other than HLS and DASH (numbered images, the
/// segment muxer): their files have no one name to move into place. Refuses a `%` in an HLS or
/// DASH output's path, which those muxers would take for a number pattern in their segments' paths.
fn check_several_files(output: &Path, container: &str) -> Result<(), MediaError> {
    if writes_own_files(container) && !SEGMENTING_CONTAINERS.contains(&container) {
        return Err(MediaError::Unsupported {
            path: output.to_path_buf(),
            detail: format!(
                "the '{container}' muxer writes numbered files of its own, which cannot be written as one output; \
                 write a video file (.mp4, .mkv) or an HLS playlist (.m3u8)"
            ),
        });
    }
    let path_has_percent = output.to_string_lossy().contains('%');
    if SEGMENTING_CONTAINERS.contains(&container) && path_has_percent {
        return Err(MediaError::Unsupported {
            path: output.to_path_buf(),
            detail: format!(
                "the '{container}' muxer reads '%' in the path as a number pattern for its segments; \
                 write the output to a path without '%'"
            ),
        });
    }
    Ok(())
}

/// The key-frame interval of an HLS or DASH output: a segment's frames, when the frame rate is known.
fn segment_frames(container: &str, frame_rate: Option<(i32, i32)>) -> Option<u32> {
    let (num, den) = frame_rate.filter(|&(num, den)| num > 0 && den > 0)?;
    let frames = (f64::from(SEGMENT_SECONDS) * f64::from(num) / f64::from(den)).round() as u32;
    SEGMENTING_CONTAINERS.contains(&container).then_some(frames.max(1))
}

/// Options for the muxer's header, which writes `output`.
///
/// HLS: segments named `STEM-N.ts` after the playlist (FFmpeg's own `STEMN.ts` collide between
/// `out.m3u8`'s eleventh and `out1.m3u8`'s first). A finished video's playlist lists every segment; a
/// live one the newest, deleting those it no longer lists, so that a stream that runs for days does
/// not fill the disk. A live playlist that is already there (a stream restarted into it) and lists
/// only segments named as impasto names them is continued: they stay listed, numbering goes on after
/// them and a discontinuity marks the restart, so neither a player nor the new segments' names go
/// back to 0. Any other playlist is replaced, as the muxer would delete whatever it lists once it
/// falls out of the window.
///
/// DASH: segment files named after the output (dashenc's own names would collide with another
/// output's in the same folder), and a live window that deletes older segments too.
fn muxer_options(plan: &OutputPlan, output: &Path) -> Dictionary<'static> {
    let mut options = Dictionary::new();
    let segment = SEGMENT_SECONDS.to_string();
    if plan.container == "hls" {
        options.set("hls_segment_filename", &crate::fsutil::hls_segment_pattern(output).to_string_lossy());
    }
    match (plan.container.as_str(), plan.live) {
        ("hls", true) => {
            options.set("hls_time", &segment);
            let continued = crate::fsutil::lists_only_own_segments(output);
            options.set("hls_flags", if continued { "delete_segments+append_list" } else { "delete_segments" });
        }
        ("hls", false) => {
            options.set("hls_time", &segment);
            options.set("hls_list_size", "0");
            options.set("hls_playlist_type", "vod");
        }
        ("dash", live) => {
            let stem = output.file_stem().map(|stem| stem.to_string_lossy().into_owned()).unwrap_or_default();
            options.set("seg_duration", &segment);
            options.set("init_seg_name", &format!("{stem}-init-$RepresentationID$.$ext$"));
            options.set("media_seg_name", &format!("{stem}-chunk-$RepresentationID$-$Number%05d$.$ext$"));
            if live {
                options.set("window_size", "5");
                options.set("extra_window_size", "5");
            }
        }
        _ => {}
    }
    options
}

/// The options that make an encoder send each frame on as soon as it is encoded: no frame
/// reordering, no look-ahead (libvpx and libaom otherwise hold back 19–25 frames, on a CPU as many
/// paintings), and for the VP9/AV1 encoders their real-time speed; for NVENC its ultra-low-latency
/// tuning with frames returned at once (`delay` 0) and no B-frames. Other encoders are opened as
/// they are. Every name is checked against the encoder's own options where FFmpeg has it.
const LIVE_TUNING: [(&str, &[(&str, &str)]); 7] = [
    ("libx264", &[("tune", "zerolatency")]),
    ("libx265", &[("tune", "zerolatency")]),
    ("libvpx", &[("deadline", "realtime"), ("lag-in-frames", "0"), ("cpu-used", "8")]),
    ("libvpx-vp9", &[("deadline", "realtime"), ("lag-in-frames", "0"), ("cpu-used", "8")]),
    ("libaom-av1", &[("usage", "realtime"), ("lag-in-frames", "0"), ("cpu-used", "8")]),
    ("h264_nvenc", &[("tune", "ull"), ("zerolatency", "1"), ("delay", "0"), ("rc-lookahead", "0"), ("bf", "0")]),
    ("hevc_nvenc", &[("tune", "ull"), ("zerolatency", "1"), ("delay", "0"), ("rc-lookahead", "0"), ("bf", "0")]),
];

/// [`LIVE_TUNING`]'s options for the encoder named `codec`.
fn live_options(codec: &str) -> &'static [(&'static str, &'static str)] {
    LIVE_TUNING.iter().find(|(name, _)| *name == codec).map_or(&[], |(_, options)| options)
}

/// Adds the output streams in the source's order (the encoded video where the source's video was),
/// or the video stream alone. Returns the video stream's index.
fn add_streams(
    output: &Path,
    muxer: &mut Output,
    encoder: &encoder::video::Encoder,
    codec: Codec,
    copier: Option<&mut StreamCopier>,
    spec: &VideoWriterSpec,
) -> Result<usize, MediaError> {
    let Some(copier) = copier else {
        return add_video_stream(output, muxer, encoder, codec, spec, Dictionary::new());
    };
    let mut video_stream = None;
    for (index, role) in copier.roles(muxer)?.into_iter().enumerate() {
        match role {
            SourceStreamRole::Video => {
                video_stream = Some(add_video_stream(output, muxer, encoder, codec, spec, copier.video_metadata())?)
            }
            SourceStreamRole::Copy => copier.add_copy(muxer, index)?,
            SourceStreamRole::Skip => {}
        }
    }
    muxer.set_metadata(copier.container_metadata());
    match video_stream {
        Some(index) => Ok(index),
        None => add_video_stream(output, muxer, encoder, codec, spec, Dictionary::new()),
    }
}

/// Adds the encoded video stream with its timing, pixel aspect and display matrix.
fn add_video_stream(
    output: &Path,
    muxer: &mut Output,
    encoder: &encoder::video::Encoder,
    codec: Codec,
    spec: &VideoWriterSpec,
    metadata: Dictionary,
) -> Result<usize, MediaError> {
    let mut stream = muxer.add_stream(codec).map_err(|e| MediaError::ffmpeg(output, "adding the video stream", e))?;
    stream.set_parameters(encoder);
    stream.set_time_base(rational(spec.time_base));
    if let Some(rate) = spec.frame_rate {
        stream.set_avg_frame_rate(rational(rate));
    }
    stream.set_metadata(metadata);
    // SAFETY: the stream is valid and not yet written; the side data buffer FFmpeg allocates has the
    // 36 bytes asked for, and the pixel aspect is a plain field.
    unsafe {
        let raw = stream.as_mut_ptr();
        (*raw).sample_aspect_ratio = rational(spec.sample_aspect_ratio).into();
        if let Some(matrix) = spec.display_matrix {
            let data = ffi::av_stream_new_side_data(raw, ffi::AVPacketSideDataType::AV_PKT_DATA_DISPLAYMATRIX, 36);
            if data.is_null() {
                return Err(MediaError::ffmpeg(
                    output,
                    "storing the rotation",
                    ffmpeg_next::Error::Other { errno: libc::ENOMEM },
                ));
            }
            std::ptr::copy_nonoverlapping(matrix.as_ptr().cast::<u8>(), data, 36);
        }
    }
    Ok(stream.index())
}

/// One frame at the spec's nominal rate, in its time base (1 tick when the rate is unknown).
fn nominal_frame_duration(spec: &VideoWriterSpec) -> i64 {
    match spec.frame_rate {
        Some((num, den)) if num > 0 && den > 0 => {
            1i64.rescale(Rational::new(den, num), rational(spec.time_base)).max(1)
        }
        _ => 1,
    }
}

/// A (`num`, `den`) pair as FFmpeg's rational.
fn rational((num, den): (i32, i32)) -> Rational {
    Rational::new(num, den)
}

#[cfg(test)]
mod tests {
    use std::ffi::{CString, c_void};

    use ffmpeg_next::ffi;

    use super::{LIVE_TUNING, sending_url, stream_container};

    /// Whether `option` is one of the options of the class `class` points to, and `value` one it
    /// takes: a number, or where the option has named values, one of those names.
    fn takes(class: *const ffi::AVClass, option: &str, value: &str) -> bool {
        let (name, class_ref) = (CString::new(option).unwrap(), &class);
        let object = std::ptr::from_ref(class_ref).cast_mut().cast::<c_void>();
        // SAFETY: a fake object (a pointer to a valid AVClass pointer) is what AV_OPT_SEARCH_FAKE_OBJ
        // asks for; the name is a valid C string; the result is static or null.
        let found =
            unsafe { ffi::av_opt_find(object, name.as_ptr(), std::ptr::null(), 0, ffi::AV_OPT_SEARCH_FAKE_OBJ) };
        if found.is_null() {
            return false;
        }
        // SAFETY: a non-null result points to a static AVOption.
        let unit = unsafe { (*found).unit };
        if value.parse::<f64>().is_ok() || unit.is_null() {
            return true;
        }
        let constant = CString::new(value).unwrap();
        // SAFETY: as above; the unit is the option's own static C string.
        let named = unsafe { ffi::av_opt_find(object, constant.as_ptr(), unit, 0, ffi::AV_OPT_SEARCH_FAKE_OBJ) };
        !named.is_null()
    }

    #[test]
    fn every_live_tuning_option_is_one_its_encoder_takes() {
        // SAFETY: returns a static class.
        let generic = unsafe { ffi::avcodec_get_class() };
        let mut checked = 0;
        for (codec, options) in LIVE_TUNING {
            let Some(encoder) = ffmpeg_next::encoder::find_by_name(codec) else { continue };
            // SAFETY: the encoder is a static AVCodec; its private class is static or null.
            let private = unsafe { (*encoder.as_ptr()).priv_class };
            for (option, value) in options {
                let taken = (!private.is_null() && takes(private, option, value)) || takes(generic, option, value);
                assert!(taken, "{codec} takes no {option}={value}");
                checked += 1;
            }
        }
        assert!(checked >= 1, "no encoder of the table is in this FFmpeg");
    }

    #[test]
    fn rtmp_streams_go_out_as_flv_and_the_rest_as_mpeg_ts() {
        assert_eq!(stream_container("rtmp://host/live/key"), "flv");
        assert_eq!(stream_container("RTMPS://host/live/key"), "flv");
        for url in ["udp://127.0.0.1:1234", "tcp://host:9000", "srt://host:1", "pipe:1"] {
            assert_eq!(stream_container(url), "mpegts", "{url}");
        }
    }

    #[test]
    fn an_srt_output_waits_for_its_last_packets_unless_told_otherwise() {
        assert_eq!(sending_url("srt://host:9000"), "srt://host:9000?linger=2");
        assert_eq!(sending_url("srt://host:9000?latency=200000"), "srt://host:9000?latency=200000&linger=2");
        assert_eq!(sending_url("srt://host:9000?linger=0"), "srt://host:9000?linger=0");
        assert_eq!(sending_url("srt://host:9000?mode=caller&linger=5"), "srt://host:9000?mode=caller&linger=5");
        assert_eq!(sending_url("srt://host:9000?streamid=nolinger=1"), "srt://host:9000?streamid=nolinger=1&linger=2");
        for url in ["udp://127.0.0.1:1234", "tcp://host:9000", "rtmp://host/live/key", "pipe:1"] {
            assert_eq!(sending_url(url), url);
        }
    }
}
