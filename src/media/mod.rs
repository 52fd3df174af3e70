//! The FFmpeg side of impasto, and the only code that touches FFmpeg: describing a video file
//! ([`probe`]), reading it as plain RGB24 frames ([`VideoReader`]) and writing painted frames back
//! into a video that keeps the source's timing, audio, subtitles, rotation and colour tags
//! ([`VideoWriter`]). Frames are byte buffers here; turning them into tensors is the pipeline's job.
//!
//! A typical round trip:
//! ```no_run
//! use impasto::media::{probe, EncodeSettings, VideoReader, VideoWriter, VideoWriterSpec, WorkingSize};
//! # fn main() -> Result<(), impasto::media::MediaError> {
//! let info = probe("in.mp4")?;
//! let reader = VideoReader::open("in.mp4", WorkingSize::LongSide(512))?;
//! let spec = VideoWriterSpec::from_source(&info, reader.frame_size());
//! let mut writer = VideoWriter::create("out.mp4", &EncodeSettings::default(), spec)?;
//! for frame in reader {
//!     writer.write(&frame?)?; // paint it first
//! }
//! writer.finish()?;
//! # Ok(()) }
//! ```

mod color;
mod convert;
mod copy;
mod decode;
mod encode;
mod error;
mod geometry;
mod partial;
mod pipe;
mod probe;
mod settings;

use std::sync::Once;

pub use color::ColorInfo;
pub use copy::{CopiedPacket, CopiedTrack};
pub use decode::{Frame, VideoReader};
pub use encode::{VideoWriter, VideoWriterSpec};
pub use error::MediaError;
pub use geometry::{WorkingSize, fit_long_side};
pub use pipe::restore_pipes;
pub use probe::{StreamInfo, StreamKind, VideoInfo, is_url, probe};
pub use settings::{EncodeSettings, OutputSize};

/// Initialises FFmpeg once per process and keeps its own logging to errors (our errors say what
/// went wrong; FFmpeg's chatter would only clutter the terminal).
fn init() {
    static INIT: Once = Once::new();
    INIT.call_once(|| {
        if let Err(error) = ffmpeg_next::init() {
            tracing::debug!(%error, "FFmpeg initialisation reported an error");
        }
        ffmpeg_next::log::set_level(ffmpeg_next::log::Level::Error);
        tracing::debug!(version = ffmpeg_next::format::version(), "FFmpeg initialised");
    });
}

/// Runs `work` with FFmpeg's log limited to fatal errors, then restores the level.
pub(crate) fn quietly<T>(work: impl FnOnce() -> T) -> T {
    let before = ffmpeg_next::log::get_level().unwrap_or(ffmpeg_next::log::Level::Error);
    ffmpeg_next::log::set_level(ffmpeg_next::log::Level::Fatal);
    let result = work();
    ffmpeg_next::log::set_level(before);
    result
}
