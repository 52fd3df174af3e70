//! The user-facing encode settings, read from configuration files and command lines. Plain data with
//! defaults that give a good-looking, widely playable H.264 file; the writer validates them against
//! what this FFmpeg build offers.

use serde::{Deserialize, Serialize};

/// How big the written video is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutputSize {
    /// The size of the frames given to the writer.
    #[default]
    Frames,
    /// The source video's stored size (the frames are scaled to it); the frames' size when there is
    /// no source.
    Source,
    /// Scaled so the longer side has this many pixels, aspect kept.
    LongSide(u32),
}

/// How the output video is encoded. In TOML: `codec = "libx264"`, `crf = 18`, `preset = "medium"`,
/// `pixel_format = "yuv420p"`, `output_size = "frames"` (or `"source"`, or `{ long_side = 1080 }`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EncodeSettings {
    /// FFmpeg video encoder name.
    pub codec: String,
    /// Constant rate factor (quality; lower is better and bigger), for encoders that have one.
    pub crf: u8,
    /// Speed/size trade-off preset, for encoders that have one ("ultrafast" … "veryslow" for x264).
    pub preset: String,
    /// Pixel format of the encoded video, as FFmpeg names it.
    pub pixel_format: String,
    /// Output size policy.
    pub output_size: OutputSize,
}

impl Default for EncodeSettings {
    fn default() -> Self {
        EncodeSettings {
            codec: "libx264".into(),
            crf: 18,
            preset: "medium".into(),
            pixel_format: "yuv420p".into(),
            output_size: OutputSize::Frames,
        }
    }
}
