//! What a video file holds, learnt without decoding it: size as displayed, rate, duration, frame
//! count, rotation, colour and the list of streams. Opening a file lives here too, because telling a
//! text file from a truncated MP4 or an audio-only file is part of finding out what a file is.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use ffmpeg_next::format::context::Input;
use ffmpeg_next::{Packet, Rational, ffi, format, media};
use serde::Serialize;

use super::color::ColorInfo;
use super::error::MediaError;
use super::geometry::{display_matrix_from_bytes, rotation_of, swaps_sides};

/// What kind of data a stream carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StreamKind {
    /// Pictures.
    Video,
    /// Sound.
    Audio,
    /// Subtitles or captions.
    Subtitle,
    /// Timed data (timecodes, metadata tracks).
    Data,
    /// Attached files (fonts in Matroska).
    Attachment,
    /// Anything FFmpeg does not classify.
    Unknown,
}

/// One stream of a media file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StreamInfo {
    /// Index in the file.
    pub index: usize,
    /// What it carries.
    pub kind: StreamKind,
    /// Codec name as FFmpeg (and ffprobe) calls it, as "h264" or "aac".
    pub codec: String,
}

/// A video file's description; see [`probe`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct VideoInfo {
    /// The file.
    pub path: PathBuf,
    /// Container format name, as FFmpeg calls it ("mov,mp4,m4a,3gp,3g2,mj2", "matroska,webm").
    pub container: String,
    /// Index of the video stream this description is about (the main one).
    pub video_stream: usize,
    /// Video codec name, as "h264".
    pub codec: String,
    /// Width as displayed: the stored width, or the stored height when the rotation is ±90°.
    pub width: u32,
    /// Height as displayed.
    pub height: u32,
    /// Width of the stored pictures, which decoded frames keep (before any scaling).
    pub coded_width: u32,
    /// Height of the stored pictures.
    pub coded_height: u32,
    /// Pixel aspect ratio (`num`, `den`); (0, 1) when unknown (square).
    pub sample_aspect_ratio: (i32, i32),
    /// Pixel format of the stored pictures, as "yuv420p".
    pub pixel_format: String,
    /// Average frame rate (`num`, `den`), or the stream's base rate when no average is known.
    pub frame_rate: (i32, i32),
    /// The stream's time base (`num`, `den`): the unit of its timestamps and of [`super::Frame::pts`].
    pub time_base: (i32, i32),
    /// Duration in seconds (the stream's, else the container's).
    pub duration: f64,
    /// Number of video frames: from the container's index, or counted when it has none.
    pub frame_count: u64,
    /// Whether `frame_count` was counted by reading the file (packets) rather than taken from its index.
    pub frame_count_counted: bool,
    /// Rotation players apply, degrees counter-clockwise as ffprobe reports it, in (-180, 180].
    pub rotation: i32,
    /// The display matrix the rotation comes from, carried verbatim to outputs.
    pub display_matrix: Option<[i32; 9]>,
    /// Colour description of the video stream.
    pub color: ColorInfo,
    /// All streams of the file, in file order.
    pub streams: Vec<StreamInfo>,
}

impl VideoInfo {
    /// Whether the file has at least one audio stream.
    pub fn has_audio(&self) -> bool {
        self.streams.iter().any(|stream| stream.kind == StreamKind::Audio)
    }

    /// Whether the file has at least one subtitle stream.
    pub fn has_subtitles(&self) -> bool {
        self.streams.iter().any(|stream| stream.kind == StreamKind::Subtitle)
    }

    /// The frame rate in frames per second (0 when unknown).
    pub fn frames_per_second(&self) -> f64 {
        ratio_to_f64(self.frame_rate)
    }
}

/// Describes the video file at `path`. Fails with a typed error for files that are not video, are
/// damaged, have no video stream or no frames.
pub fn probe(path: impl AsRef<Path>) -> Result<VideoInfo, MediaError> {
    let path = path.as_ref();
    let (mut input, video_stream) = open_video_input(path)?;
    let mut info = describe(&input, video_stream, path);
    if info.frame_count == 0 {
        info.frame_count = count_video_packets(&mut input, video_stream);
        info.frame_count_counted = true;
    }
    if info.frame_count == 0 {
        return Err(MediaError::ZeroFrames { path: path.to_path_buf() });
    }
    if info.duration <= 0.0 && info.frames_per_second() > 0.0 {
        info.duration = info.frame_count as f64 / info.frames_per_second();
    }
    tracing::debug!(path = %path.display(), width = info.width, height = info.height, frames = info.frame_count,
        duration = info.duration, rotation = info.rotation, "probed video");
    Ok(info)
}

/// Opens a media file and finds its main video stream, classifying every failure.
pub(crate) fn open_video_input(path: &Path) -> Result<(Input, usize), MediaError> {
    let input = open_media_input(path)?;
    match main_video_stream(&input) {
        Some(index) => Ok((input, index)),
        None => Err(MediaError::NoVideoStream { path: path.to_path_buf(), streams: summarise_streams(&input) }),
    }
}

/// Opens any media file (video or not) for demuxing, classifying failures.
pub(crate) fn open_media_input(path: &Path) -> Result<Input, MediaError> {
    super::init();
    let metadata = std::fs::metadata(path).map_err(|source| MediaError::Io { path: path.to_path_buf(), source })?;
    if metadata.is_dir() {
        let source = std::io::Error::new(std::io::ErrorKind::IsADirectory, "is a directory, not a video file");
        return Err(MediaError::Io { path: path.to_path_buf(), source });
    }
    format::input(path).map_err(|error| classify_open_failure(path, error))
}

/// Opens the live stream FFmpeg reads at `location` for demuxing, naming `path` (what the user gave)
/// in errors. FFmpeg polls `stop` while it waits for data, so a raised flag ends a wait that could
/// otherwise last as long as the sender stays silent.
pub(crate) fn open_live_input(location: &str, path: &Path, stop: Arc<AtomicBool>) -> Result<Input, MediaError> {
    super::init();
    static NETWORK: std::sync::Once = std::sync::Once::new();
    NETWORK.call_once(ffmpeg_next::format::network::init);
    if !is_url(location) {
        std::fs::metadata(location).map_err(|source| MediaError::Io { path: path.to_path_buf(), source })?;
    }
    let interrupted = move || stop.load(Ordering::SeqCst);
    let mut options = ffmpeg_next::Dictionary::new();
    // UDP: a painter that falls behind must not end the stream; the oldest packets give way instead
    options.set("overrun_nonfatal", "1");
    // a stream joined mid-way makes the decoder complain until its first key frame
    let opened = super::quietly(|| format::input_with_interrupt_and_dictionary(location, interrupted, options));
    opened.map_err(|error| match error {
        ffmpeg_next::Error::Exit => MediaError::stopped_before_the_stream(path),
        error => MediaError::ffmpeg(path, "opening the stream", error),
    })
}

/// Whether `location` is a URL (`scheme://…`, or FFmpeg's `pipe:N`) rather than a file name.
pub fn is_url(location: &str) -> bool {
    location.starts_with("pipe:") || url_scheme(location).is_some()
}

/// The scheme of a `scheme://…` URL, as written (FFmpeg's protocol names are lower case).
pub(crate) fn url_scheme(location: &str) -> Option<&str> {
    let (scheme, _) = location.split_once("://")?;
    let valid = !scheme.is_empty() && scheme.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
    valid.then_some(scheme)
}

/// Tells "not media at all" from "media with an unreadable header" after FFmpeg failed to open a file.
fn classify_open_failure(path: &Path, error: ffmpeg_next::Error) -> MediaError {
    if let ffmpeg_next::Error::Other { errno } = error {
        return MediaError::Io { path: path.to_path_buf(), source: std::io::Error::from_raw_os_error(errno) };
    }
    match sniff_format(path) {
        Some(format) => MediaError::Corrupt { path: path.to_path_buf(), format, detail: error.to_string() },
        None => MediaError::NotMedia { path: path.to_path_buf() },
    }
}

/// The container format FFmpeg sees in the file's first bytes (its name ignored), if it sees one.
fn sniff_format(path: &Path) -> Option<String> {
    const SNIFF_BYTES: u64 = 1 << 20;
    let mut head = Vec::new();
    std::fs::File::open(path).ok()?.take(SNIFF_BYTES).read_to_end(&mut head).ok()?;
    let content_len = head.len();
    head.resize(content_len + ffi::AVPROBE_PADDING_SIZE as usize, 0);
    let empty_name = c"";
    let probe_data = ffi::AVProbeData {
        filename: empty_name.as_ptr(),
        buf: head.as_mut_ptr(),
        buf_size: content_len as libc::c_int,
        mime_type: std::ptr::null(),
    };
    let mut score: libc::c_int = 0;
    // SAFETY: probe_data points at a buffer padded with AVPROBE_PADDING_SIZE zero bytes, as required;
    // the returned format is a static FFmpeg object.
    let format = unsafe { ffi::av_probe_input_format3(&probe_data, 1, &mut score) };
    // AVPROBE_SCORE_RETRY (a macro bindgen does not export): below it FFmpeg itself would not trust a guess.
    if format.is_null() || score <= ffi::AVPROBE_SCORE_MAX / 4 {
        return None;
    }
    // SAFETY: a non-null AVInputFormat always has a static NUL-terminated name.
    let name = unsafe { std::ffi::CStr::from_ptr((*format).name) };
    Some(name.to_string_lossy().into_owned())
}

/// The main video stream: FFmpeg's best, skipping attached pictures (cover art).
pub(crate) fn main_video_stream(input: &Input) -> Option<usize> {
    let is_moving_video = |stream: &ffmpeg_next::Stream| {
        stream.parameters().medium() == media::Type::Video
            && !stream.disposition().contains(format::stream::Disposition::ATTACHED_PIC)
    };
    match input.streams().best(media::Type::Video) {
        Some(best) if is_moving_video(&best) => Some(best.index()),
        _ => input.streams().find(|stream| is_moving_video(stream)).map(|stream| stream.index()),
    }
}

/// The streams of an opened file, in file order.
pub(crate) fn stream_list(input: &Input) -> Vec<StreamInfo> {
    input
        .streams()
        .map(|stream| {
            let parameters = stream.parameters();
            StreamInfo {
                index: stream.index(),
                kind: kind_of(parameters.medium()),
                codec: parameters.id().name().to_string(),
            }
        })
        .collect()
}

/// "audio (aac), subtitle (mov_text)", or "none".
pub(crate) fn summarise_streams(input: &Input) -> String {
    let streams = stream_list(input);
    if streams.is_empty() {
        return "none".into();
    }
    let names: Vec<String> = streams.iter().map(|s| format!("{:?} ({})", s.kind, s.codec).to_lowercase()).collect();
    names.join(", ")
}

/// Our stream kind for FFmpeg's media type.
fn kind_of(medium: media::Type) -> StreamKind {
    match medium {
        media::Type::Video => StreamKind::Video,
        media::Type::Audio => StreamKind::Audio,
        media::Type::Subtitle => StreamKind::Subtitle,
        media::Type::Data => StreamKind::Data,
        media::Type::Attachment => StreamKind::Attachment,
        media::Type::Unknown => StreamKind::Unknown,
    }
}

/// Everything the headers say about the video stream at `video_stream`.
fn describe(input: &Input, video_stream: usize, path: &Path) -> VideoInfo {
    let stream = input.stream(video_stream).expect("video stream index comes from this input");
    let parameters = stream.parameters();
    // SAFETY: the parameters belong to a stream of the open input and are only read here.
    let raw = unsafe { &*parameters.as_ptr() };
    let display_matrix = display_matrix_of(&stream);
    let rotation = display_matrix.as_ref().map(rotation_of).unwrap_or(0);
    let (coded_width, coded_height) = (raw.width.max(0) as u32, raw.height.max(0) as u32);
    let (width, height) = if swaps_sides(rotation) { (coded_height, coded_width) } else { (coded_width, coded_height) };
    VideoInfo {
        path: path.to_path_buf(),
        container: input.format().name().to_string(),
        video_stream,
        codec: parameters.id().name().to_string(),
        width,
        height,
        coded_width,
        coded_height,
        sample_aspect_ratio: (raw.sample_aspect_ratio.num, raw.sample_aspect_ratio.den),
        pixel_format: pixel_format_name(raw.format),
        frame_rate: pair(stream_frame_rate(&stream)),
        time_base: pair(stream.time_base()),
        duration: duration_seconds(input, &stream),
        frame_count: stream.frames().max(0) as u64,
        frame_count_counted: false,
        rotation,
        display_matrix,
        color: ColorInfo::from_parameters(raw),
        streams: stream_list(input),
    }
}

/// The stream's display matrix side data, if it has one.
pub(crate) fn display_matrix_of(stream: &ffmpeg_next::Stream) -> Option<[i32; 9]> {
    stream
        .side_data()
        .find(|side_data| side_data.kind() == ffmpeg_next::codec::packet::side_data::Type::DisplayMatrix)
        .and_then(|side_data| display_matrix_from_bytes(side_data.data()))
}

/// The average frame rate, else the base rate.
pub(crate) fn stream_frame_rate(stream: &ffmpeg_next::Stream) -> Rational {
    let average = stream.avg_frame_rate();
    if average.numerator() > 0 && average.denominator() > 0 { average } else { stream.rate() }
}

/// The stream's duration, else the container's, in seconds (0 when neither is known).
fn duration_seconds(input: &Input, stream: &ffmpeg_next::Stream) -> f64 {
    if stream.duration() > 0 && stream.duration() != ffi::AV_NOPTS_VALUE {
        return stream.duration() as f64 * f64::from(stream.time_base());
    }
    if input.duration() > 0 && input.duration() != ffi::AV_NOPTS_VALUE {
        return input.duration() as f64 / f64::from(ffi::AV_TIME_BASE);
    }
    0.0
}

/// Counts the video stream's packets (one per frame for every common codec) by reading the file.
fn count_video_packets(input: &mut Input, video_stream: usize) -> u64 {
    discard_other_streams(input, video_stream);
    let mut count = 0;
    loop {
        let mut packet = Packet::empty();
        match packet.read(input) {
            Ok(()) if packet.stream() == video_stream => count += 1,
            Ok(()) | Err(ffmpeg_next::Error::InvalidData) => {}
            Err(_) => break,
        }
    }
    tracing::debug!(count, "counted video packets (the container has no frame count)");
    count
}

/// Tells the demuxer to skip every stream but `keep`, so reads return only its packets.
pub(crate) fn discard_other_streams(input: &mut Input, keep: usize) {
    for mut stream in input.streams_mut() {
        if stream.index() != keep {
            // SAFETY: the stream belongs to the open input; `discard` is a plain field the demuxer reads.
            unsafe { (*stream.as_mut_ptr()).discard = ffi::AVDiscard::AVDISCARD_ALL };
        }
    }
}

/// FFmpeg's name of a raw pixel format number, as "yuv420p" ("none" when unknown).
fn pixel_format_name(raw_format: libc::c_int) -> String {
    if raw_format < 0 || raw_format >= ffi::AVPixelFormat::AV_PIX_FMT_NB as libc::c_int {
        return "none".into();
    }
    // SAFETY: the value is within FFmpeg's pixel format numbering (codec parameters hold only values
    // FFmpeg itself set), so it is a valid AVPixelFormat; unnamed ones give null.
    let name = unsafe { ffi::av_get_pix_fmt_name(std::mem::transmute::<i32, ffi::AVPixelFormat>(raw_format)) };
    if name.is_null() {
        return "none".into();
    }
    // SAFETY: non-null names are static NUL-terminated strings.
    unsafe { std::ffi::CStr::from_ptr(name) }.to_string_lossy().into_owned()
}

/// A rational as a (`num`, `den`) pair.
pub(crate) fn pair(value: Rational) -> (i32, i32) {
    (value.numerator(), value.denominator())
}

/// A (`num`, `den`) pair as a float, 0 when the denominator is 0.
pub(crate) fn ratio_to_f64((num, den): (i32, i32)) -> f64 {
    if den == 0 { 0.0 } else { f64::from(num) / f64::from(den) }
}

#[cfg(test)]
mod tests {
    use super::is_url;

    #[test]
    fn urls_and_pipes_are_told_from_file_names() {
        for url in
            ["tcp://127.0.0.1:9000?listen", "udp://239.0.0.1:1234", "rtmp://host/live/key", "srt://h:1", "pipe:0"]
        {
            assert!(is_url(url), "{url}");
        }
        for file in ["in.ts", "/videos/in.mp4", "dir/odd name://x.mp4", "://nothing", "C:video.mp4"] {
            assert!(!is_url(file), "{file}");
        }
    }
}
