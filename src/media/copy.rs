//! Stream copy of a source's audio and subtitles into a re-encoded output. The source is read a second
//! time, alongside the frames being written: before each video frame goes out, the copier passes on
//! the source's other packets up to that frame's time, so the muxer interleaves them by timestamp and
//! memory stays bounded (a second of packets or so), however long the video.

use std::path::{Path, PathBuf};

use ffmpeg_next::format::context::{Input, Output};
use ffmpeg_next::{Dictionary, Packet, Rational, codec, ffi, media};

use super::error::MediaError;
use super::probe::{main_video_stream, open_media_input};

/// A stream of a live input that goes out as it came (the sound of a live stream): what the writer
/// needs to add it to its output.
#[derive(Clone)]
pub struct CopiedTrack {
    pub(crate) parameters: codec::Parameters,
    pub(crate) time_base: Rational,
}

impl CopiedTrack {
    /// The unit (`num`, `den`) seconds of its packets' timestamps.
    pub fn time_base(&self) -> (i32, i32) {
        (self.time_base.numerator(), self.time_base.denominator())
    }
}

impl std::fmt::Debug for CopiedTrack {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.debug_struct("CopiedTrack").field("codec", &self.parameters.id()).finish()
    }
}

/// One packet of a [`CopiedTrack`], timed in the track's time base, on its way to the writer.
pub struct CopiedPacket(pub(crate) Packet);

impl CopiedPacket {
    /// When the packet is decoded (its presentation time if it has no decode time) and for how long,
    /// in its track's time base; `None` without timestamps.
    pub fn timing(&self) -> Option<(i64, i64)> {
        Some((self.0.dts().or(self.0.pts())?, self.0.duration()))
    }

    /// Moves the packet `ticks` later on its track's timeline.
    pub fn shift(&mut self, ticks: i64) {
        if ticks != 0 {
            self.0.set_pts(self.0.pts().map(|pts| pts + ticks));
            self.0.set_dts(self.0.dts().map(|dts| dts + ticks));
        }
    }
}

/// What the writer does with one stream of the source, in source order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SourceStreamRole {
    /// The video stream the painted frames replace.
    Video,
    /// Copied packet for packet.
    Copy,
    /// Left out (other video streams, data, attachments, subtitles the container cannot hold).
    Skip,
}

/// Where a copied stream goes: its output stream, and the time bases its packets go between.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Route {
    pub output_index: usize,
    pub source_time_base: Rational,
    pub output_time_base: Rational,
}

impl Route {
    /// Writes one copied packet, retimed to its output stream (the muxer interleaves it by time).
    pub fn write(self, output: &mut Output, mut packet: Packet) -> Result<(), ffmpeg_next::Error> {
        packet.rescale_ts(self.source_time_base, self.output_time_base);
        packet.set_position(-1);
        packet.set_stream(self.output_index);
        packet.write_interleaved(output)
    }
}

/// Adds an output stream that takes packets with `parameters` as they are, timed in `time_base`.
fn add_copied_stream<'o>(
    output: &'o mut Output,
    parameters: codec::Parameters,
    time_base: Rational,
) -> Result<ffmpeg_next::format::stream::StreamMut<'o>, ffmpeg_next::Error> {
    let mut target = output.add_stream(codec::encoder::find(codec::Id::None))?;
    target.set_parameters(parameters);
    target.set_time_base(time_base);
    // SAFETY: the stream is valid and not yet written. A codec tag from another container could be
    // invalid in this one, so it is cleared and the muxer picks its own.
    unsafe { (*(*target.as_mut_ptr()).codecpar).codec_tag = 0 };
    Ok(target)
}

/// Copies the non-video streams of a source file into an output, in step with the video.
pub(crate) struct StreamCopier {
    source_path: PathBuf,
    output_path: PathBuf,
    input: Input,
    video_index: Option<usize>,
    routes: Vec<Option<Route>>,
    pending: Option<Packet>,
    exhausted: bool,
}

impl StreamCopier {
    /// Opens `source` for copying into `output_path`.
    pub fn open(source: &Path, output_path: &Path) -> Result<Self, MediaError> {
        let input = open_media_input(source)?;
        let video_index = main_video_stream(&input);
        let stream_count = input.nb_streams() as usize;
        Ok(StreamCopier {
            source_path: source.to_path_buf(),
            output_path: output_path.to_path_buf(),
            input,
            video_index,
            routes: vec![None; stream_count],
            pending: None,
            exhausted: false,
        })
    }

    /// The role of each source stream, in source order, for an output in `container`.
    pub fn roles(&self, container: &Output) -> Result<Vec<SourceStreamRole>, MediaError> {
        self.input.streams().map(|stream| self.role_of(&stream, container)).collect()
    }

    /// Whether and how one source stream goes into the output.
    fn role_of(&self, stream: &ffmpeg_next::Stream, container: &Output) -> Result<SourceStreamRole, MediaError> {
        if Some(stream.index()) == self.video_index {
            return Ok(SourceStreamRole::Video);
        }
        let parameters = stream.parameters();
        let medium = parameters.medium();
        if medium != media::Type::Audio && medium != media::Type::Subtitle {
            tracing::debug!(stream = stream.index(), ?medium, "source stream not copied");
            return Ok(SourceStreamRole::Skip);
        }
        if container_takes(container, parameters.id()) {
            return Ok(SourceStreamRole::Copy);
        }
        let codec_name = parameters.id().name();
        if medium == media::Type::Subtitle {
            tracing::warn!(
                stream = stream.index(),
                codec = codec_name,
                "the output container cannot hold these subtitles; left out"
            );
            return Ok(SourceStreamRole::Skip);
        }
        Err(MediaError::Unsupported {
            path: self.output_path.clone(),
            detail: format!(
                "the '{}' container cannot hold audio stream {} ({codec_name}) of '{}'; choose another output extension",
                container.format().name(),
                stream.index(),
                self.source_path.display()
            ),
        })
    }

    /// Adds an output stream that copies source stream `index` (call in source order).
    pub fn add_copy(&mut self, output: &mut Output, index: usize) -> Result<(), MediaError> {
        let source = self.input.stream(index).expect("index from roles()");
        let source_time_base = source.time_base();
        let mut target = add_copied_stream(output, source.parameters(), source_time_base)
            .map_err(|e| self.failed("adding a copied stream", e))?;
        target.set_metadata(source.metadata().to_owned());
        // SAFETY: both streams are valid; the disposition is a plain value.
        unsafe { (*target.as_mut_ptr()).disposition = (*source.as_ptr()).disposition };
        let output_index = target.index();
        self.routes[index] = Some(Route { output_index, source_time_base, output_time_base: source_time_base });
        Ok(())
    }

    /// Tells the demuxer to skip the streams that are not copied, then learns the time bases the
    /// muxer settled on (call after writing the header).
    pub fn start(&mut self, output: &Output) {
        let routes = &mut self.routes;
        for mut stream in self.input.streams_mut() {
            match routes[stream.index()].as_mut() {
                Some(route) => {
                    route.output_time_base = output.stream(route.output_index).expect("added stream").time_base()
                }
                // SAFETY: a plain field of a stream of the open input, read by the demuxer.
                None => unsafe { (*stream.as_mut_ptr()).discard = ffi::AVDiscard::AVDISCARD_ALL },
            }
        }
    }

    /// Metadata for the re-encoded video stream, from the source's video stream.
    pub fn video_metadata(&self) -> Dictionary<'static> {
        let mut kept = Dictionary::new();
        let Some(stream) = self.video_index.and_then(|index| self.input.stream(index)) else { return kept };
        for (key, value) in stream.metadata().iter() {
            if matches!(key, "language" | "title" | "handler_name") {
                kept.set(key, value);
            }
        }
        kept
    }

    /// The source's container metadata, less what describes the source's own encoding.
    pub fn container_metadata(&self) -> Dictionary<'static> {
        let mut kept = Dictionary::new();
        for (key, value) in self.input.metadata().iter() {
            if !matches!(key, "encoder" | "major_brand" | "minor_version" | "compatible_brands") {
                kept.set(key, value);
            }
        }
        kept
    }

    /// Copies source packets that start at or before `limit` (in `limit_time_base` units).
    pub fn copy_until(&mut self, output: &mut Output, limit: i64, limit_time_base: Rational) -> Result<(), MediaError> {
        while let Some(packet) = self.next_packet() {
            let route = self.route_of(&packet);
            if starts_after(&packet, route.source_time_base, limit, limit_time_base) {
                self.pending = Some(packet);
                return Ok(());
            }
            self.write(output, packet, route)?;
        }
        Ok(())
    }

    /// Copies every remaining source packet.
    pub fn copy_rest(&mut self, output: &mut Output) -> Result<(), MediaError> {
        while let Some(packet) = self.next_packet() {
            let route = self.route_of(&packet);
            self.write(output, packet, route)?;
        }
        Ok(())
    }

    /// The held-back packet, else the next copied packet of the source; `None` at its end.
    fn next_packet(&mut self) -> Option<Packet> {
        if let Some(packet) = self.pending.take() {
            return Some(packet);
        }
        while !self.exhausted {
            let mut packet = Packet::empty();
            match packet.read(&mut self.input) {
                Ok(()) if self.routes.get(packet.stream()).is_some_and(Option::is_some) => return Some(packet),
                Ok(()) | Err(ffmpeg_next::Error::InvalidData) => {}
                Err(error) => {
                    tracing::debug!(source = %self.source_path.display(), %error, "stream copy reached the end of the source");
                    self.exhausted = true;
                }
            }
        }
        None
    }

    /// The route of a packet `next_packet` returned.
    fn route_of(&self, packet: &Packet) -> Route {
        self.routes[packet.stream()].expect("next_packet returns only routed packets")
    }

    /// Writes one copied packet, retimed to its output stream.
    fn write(&self, output: &mut Output, packet: Packet, route: Route) -> Result<(), MediaError> {
        route.write(output, packet).map_err(|e| self.failed("writing a copied packet", e))
    }

    /// An FFmpeg failure concerning the output.
    fn failed(&self, operation: &'static str, error: ffmpeg_next::Error) -> MediaError {
        MediaError::ffmpeg(&self.output_path, operation, error)
    }
}

/// Adds an output stream for a live input's copied `track`, unless the container cannot hold its
/// codec (then it is left out, with a warning). Returns its index.
pub(crate) fn add_copied_track(
    output_path: &Path,
    output: &mut Output,
    track: &CopiedTrack,
) -> Result<Option<usize>, MediaError> {
    let codec_id = track.parameters.id();
    if !container_takes(output, codec_id) {
        tracing::warn!(path = %output_path.display(), codec = codec_id.name(), "the output's container cannot hold the sound; it is left out");
        return Ok(None);
    }
    let target = add_copied_stream(output, track.parameters.clone(), track.time_base)
        .map_err(|e| MediaError::ffmpeg(output_path, "adding the sound stream", e))?;
    Ok(Some(target.index()))
}

/// Whether the output container can hold a stream of codec `id` (unknown counts as yes: the muxer
/// has the last word when the header is written).
fn container_takes(container: &Output, id: codec::Id) -> bool {
    // SAFETY: the output format is a static FFmpeg object; the call only reads it.
    let answer =
        unsafe { ffi::avformat_query_codec(container.format().as_ptr(), id.into(), ffi::FF_COMPLIANCE_NORMAL) };
    answer != 0
}

/// Whether `packet` starts after `limit`; packets without timestamps never wait.
fn starts_after(packet: &Packet, time_base: Rational, limit: i64, limit_time_base: Rational) -> bool {
    let Some(start) = packet.dts().or(packet.pts()) else { return false };
    // SAFETY: av_compare_ts is a pure function of its arguments.
    unsafe { ffi::av_compare_ts(start, time_base.into(), limit, limit_time_base.into()) > 0 }
}
