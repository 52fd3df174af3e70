//! Colour metadata in words (FFmpeg's names: "bt709", "tv", ...) so the rest of the program never sees
//! FFmpeg's enums, and the conversions both ways. The names are the ones ffprobe prints, so a
//! `ColorInfo` can be compared with ffprobe's output directly.

use std::ffi::CString;

use ffmpeg_next::color;
use ffmpeg_next::ffi;
use serde::{Deserialize, Serialize};

/// A video stream's colour description. `None` means unspecified.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ColorInfo {
    /// Colour primaries, as "bt709" or "bt2020".
    pub primaries: Option<String>,
    /// Transfer characteristic, as "bt709", "smpte2084" or "arib-std-b67".
    pub transfer: Option<String>,
    /// YUV matrix coefficients ("colour space" in FFmpeg), as "bt709" or "bt470bg".
    pub matrix: Option<String>,
    /// Value range: "tv" (limited) or "pc" (full).
    pub range: Option<String>,
}

impl ColorInfo {
    /// Reads the colour fields of a stream's codec parameters.
    pub(crate) fn from_parameters(parameters: &ffi::AVCodecParameters) -> Self {
        ColorInfo {
            primaries: color::Primaries::from(parameters.color_primaries).name().map(String::from),
            transfer: color::TransferCharacteristic::from(parameters.color_trc).name().map(String::from),
            matrix: color::Space::from(parameters.color_space).name().map(String::from),
            range: color::Range::from(parameters.color_range).name().map(String::from),
        }
    }

    /// Whether the range is full ("pc").
    pub fn is_full_range(&self) -> bool {
        self.range.as_deref() == Some("pc")
    }

    /// The primaries as FFmpeg's enum (unspecified when unknown or unnamed).
    pub(crate) fn av_primaries(&self) -> color::Primaries {
        match lookup(self.primaries.as_deref(), ffi::av_color_primaries_from_name) {
            // SAFETY: FFmpeg returned the index of one of its own primaries, a valid enum value.
            Some(raw) => color::Primaries::from(unsafe { std::mem::transmute::<u32, ffi::AVColorPrimaries>(raw) }),
            None => color::Primaries::Unspecified,
        }
    }

    /// The transfer characteristic as FFmpeg's enum.
    pub(crate) fn av_transfer(&self) -> color::TransferCharacteristic {
        match lookup(self.transfer.as_deref(), ffi::av_color_transfer_from_name) {
            // SAFETY: as above, a valid AVColorTransferCharacteristic value from FFmpeg itself.
            Some(raw) => color::TransferCharacteristic::from(unsafe {
                std::mem::transmute::<u32, ffi::AVColorTransferCharacteristic>(raw)
            }),
            None => color::TransferCharacteristic::Unspecified,
        }
    }

    /// The matrix coefficients as FFmpeg's enum.
    pub(crate) fn av_matrix(&self) -> color::Space {
        match lookup(self.matrix.as_deref(), ffi::av_color_space_from_name) {
            // SAFETY: as above, a valid AVColorSpace value from FFmpeg itself.
            Some(raw) => color::Space::from(unsafe { std::mem::transmute::<u32, ffi::AVColorSpace>(raw) }),
            None => color::Space::Unspecified,
        }
    }

    /// The range as FFmpeg's enum.
    pub(crate) fn av_range(&self) -> color::Range {
        match self.range.as_deref() {
            Some("pc") => color::Range::JPEG,
            Some("tv") => color::Range::MPEG,
            _ => color::Range::Unspecified,
        }
    }
}

/// Looks a colour name up with one of FFmpeg's `av_color_*_from_name` functions.
fn lookup(name: Option<&str>, from_name: unsafe extern "C" fn(*const libc::c_char) -> libc::c_int) -> Option<u32> {
    let name = CString::new(name?).ok()?;
    // SAFETY: a valid NUL-terminated string; the function only reads it.
    let raw = unsafe { from_name(name.as_ptr()) };
    u32::try_from(raw).ok()
}
