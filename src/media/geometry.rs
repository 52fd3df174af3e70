//! Frame geometry: working sizes (a long side with the aspect kept and both sides even, which 4:2:0
//! video needs) and the display matrix that tells players how to turn a stored picture. Kept apart
//! from FFmpeg calls so the arithmetic is plain and testable.

use serde::{Deserialize, Serialize};

/// The size frames are decoded to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkingSize {
    /// The stream's stored (coded) size, unchanged.
    #[default]
    Source,
    /// Scaled so that the longer side has this many pixels, aspect kept (pixel aspect included), both
    /// sides even. Scales up as well as down.
    LongSide(u32),
}

/// `(width, height)` scaled so that the longer side is `long_side` (rounded down to even), keeping the
/// aspect ratio of a `width`×`height` picture whose pixels are `pixel_aspect` (`num`/`den`) wide; the
/// shorter side is rounded to the nearest even number. Both sides are at least 2.
pub fn fit_long_side(width: u32, height: u32, pixel_aspect: (i32, i32), long_side: u32) -> (u32, u32) {
    let display_width = f64::from(width) * aspect_factor(pixel_aspect);
    let display_height = f64::from(height);
    let even_long_side = (long_side & !1).max(2);
    let scale = f64::from(even_long_side) / display_width.max(display_height);
    if display_width >= display_height {
        (even_long_side, round_to_even(display_height * scale))
    } else {
        (round_to_even(display_width * scale), even_long_side)
    }
}

/// `size` with each side rounded down to an even number (at least 2), as 4:2:0 encoders need.
pub fn even_size(size: (u32, u32)) -> (u32, u32) {
    ((size.0 & !1).max(2), (size.1 & !1).max(2))
}

/// A pixel aspect ratio as a factor; unknown (0 or negative) counts as square.
fn aspect_factor((num, den): (i32, i32)) -> f64 {
    if num > 0 && den > 0 { f64::from(num) / f64::from(den) } else { 1.0 }
}

/// The nearest even whole number, at least 2.
fn round_to_even(value: f64) -> u32 {
    let halves = (value / 2.0).round().max(1.0);
    (halves as u32) * 2
}

/// The rotation a display matrix applies, in degrees counter-clockwise as FFmpeg and ffprobe report
/// it, rounded to whole degrees and normalised to (-180, 180]. Mirroring is not reflected here; the
/// matrix itself is carried to the output unchanged.
pub fn rotation_of(display_matrix: &[i32; 9]) -> i32 {
    // SAFETY: the pointer is to nine readable i32, which is all av_display_rotation_get reads.
    let degrees = unsafe { ffmpeg_next::ffi::av_display_rotation_get(display_matrix.as_ptr()) };
    if degrees.is_nan() {
        return 0;
    }
    normalise_degrees(degrees.round() as i32)
}

/// `degrees` brought into (-180, 180].
fn normalise_degrees(degrees: i32) -> i32 {
    let wrapped = degrees.rem_euclid(360);
    if wrapped > 180 { wrapped - 360 } else { wrapped }
}

/// Whether a picture turned by `rotation` degrees shows its width as height.
pub fn swaps_sides(rotation: i32) -> bool {
    rotation.rem_euclid(180) == 90
}

/// Reads a display matrix from stream side data: nine native-endian 32-bit integers.
pub fn display_matrix_from_bytes(bytes: &[u8]) -> Option<[i32; 9]> {
    if bytes.len() < 36 {
        return None;
    }
    let mut matrix = [0i32; 9];
    for (value, chunk) in matrix.iter_mut().zip(bytes.chunks_exact(4)) {
        *value = i32::from_ne_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
    }
    Some(matrix)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_side_keeps_aspect_and_even_sides() {
        assert_eq!(fit_long_side(640, 272, (1, 1), 96), (96, 40));
        assert_eq!(fit_long_side(1280, 720, (1, 1), 160), (160, 90));
        assert_eq!(fit_long_side(272, 640, (1, 1), 128), (54, 128));
        assert_eq!(fit_long_side(720, 576, (16, 15), 768), (768, 576));
        assert_eq!(fit_long_side(64, 48, (1, 1), 33), (32, 24));
    }

    #[test]
    fn degrees_normalise_into_half_open_range() {
        assert_eq!(normalise_degrees(-90), -90);
        assert_eq!(normalise_degrees(270), -90);
        assert_eq!(normalise_degrees(180), 180);
        assert_eq!(normalise_degrees(-180), 180);
        assert!(swaps_sides(-90) && swaps_sides(90) && !swaps_sides(180));
    }
}
