//! Pixel conversion between FFmpeg's frames and the plain RGB24 buffers the rest of the program uses,
//! with swscale. It sets the YUV matrix and range explicitly, both ways, so a decoded and re-encoded
//! video keeps its colours (swscale's default is BT.601 limited range whatever the stream says).

use ffmpeg_next::ffi;
use ffmpeg_next::format::Pixel;
use ffmpeg_next::frame;
use ffmpeg_next::software::scaling;

/// The YUV side of a conversion: matrix coefficients and whether values use the full range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct YuvColorimetry {
    /// The matrix (FFmpeg colour space); unspecified falls back to BT.601, as swscale does.
    pub matrix: ffmpeg_next::color::Space,
    /// Full ("pc") range rather than limited ("tv").
    pub full_range: bool,
}

/// A swscale context with its colorimetry set. One per stream; rebuilt if the input changes.
pub(crate) struct Scaler {
    context: scaling::Context,
}

// SAFETY: the SwsContext is owned by this value alone and swscale has no thread affinity; moving it
// to another thread while nothing else refers to it is sound.
unsafe impl Send for Scaler {}

impl Scaler {
    /// A scaler from decoded video frames (`format`, `width`×`height`) to RGB24 at `rgb_size`.
    pub fn to_rgb(
        format: Pixel,
        (width, height): (u32, u32),
        rgb_size: (u32, u32),
        yuv: YuvColorimetry,
    ) -> Result<Self, ffmpeg_next::Error> {
        let context =
            scaling::Context::get(format, width, height, Pixel::RGB24, rgb_size.0, rgb_size.1, scale_flags())?;
        let mut scaler = Scaler { context };
        let source_full_range = yuv.full_range || is_jpeg_format(format);
        scaler.set_colorimetry(matrix_code(yuv.matrix), source_full_range, ffi::SWS_CS_DEFAULT, true);
        Ok(scaler)
    }

    /// A scaler from RGB24 frames of `rgb_size` to the encoder's `format` at `output_size`.
    pub fn from_rgb(
        rgb_size: (u32, u32),
        format: Pixel,
        output_size: (u32, u32),
        yuv: YuvColorimetry,
    ) -> Result<Self, ffmpeg_next::Error> {
        let context = scaling::Context::get(
            Pixel::RGB24,
            rgb_size.0,
            rgb_size.1,
            format,
            output_size.0,
            output_size.1,
            scale_flags(),
        )?;
        let mut scaler = Scaler { context };
        scaler.set_colorimetry(ffi::SWS_CS_DEFAULT, true, matrix_code(yuv.matrix), yuv.full_range);
        Ok(scaler)
    }

    /// Whether this scaler takes frames like `frame` (format and size).
    pub fn accepts(&self, frame: &frame::Video) -> bool {
        let input = self.context.input();
        input.format == frame.format() && input.width == frame.width() && input.height == frame.height()
    }

    /// Converts `input` into a newly allocated frame of the output format and size.
    pub fn convert(&mut self, input: &frame::Video) -> Result<frame::Video, ffmpeg_next::Error> {
        let output = self.context.output();
        let mut converted = frame::Video::new(output.format, output.width, output.height);
        self.context.run(input, &mut converted)?;
        Ok(converted)
    }

    /// Sets the matrices and ranges of both sides (swscale ignores the matrix of an RGB side).
    fn set_colorimetry(&mut self, source_matrix: i32, source_full: bool, target_matrix: i32, target_full: bool) {
        // SAFETY: the context is valid; sws_getCoefficients returns a pointer to a static table and
        // accepts any integer (unknown ones give the default table).
        unsafe {
            ffi::sws_setColorspaceDetails(
                self.context.as_mut_ptr(),
                ffi::sws_getCoefficients(source_matrix),
                i32::from(source_full),
                ffi::sws_getCoefficients(target_matrix),
                i32::from(target_full),
                0,
                1 << 16,
                1 << 16,
            );
        }
    }
}

/// Bicubic scaling with accurate rounding: the frames feed an optimiser, and quality beats speed here.
fn scale_flags() -> scaling::Flags {
    scaling::Flags::BICUBIC | scaling::Flags::ACCURATE_RND | scaling::Flags::FULL_CHR_H_INT
}

/// swscale's matrix code for an FFmpeg colour space (they share numbering; unknown means default).
fn matrix_code(matrix: ffmpeg_next::color::Space) -> i32 {
    let raw: ffi::AVColorSpace = matrix.into();
    raw as i32
}

/// The deprecated "J" formats are full range whatever the range field says.
fn is_jpeg_format(format: Pixel) -> bool {
    matches!(format, Pixel::YUVJ420P | Pixel::YUVJ422P | Pixel::YUVJ444P | Pixel::YUVJ440P | Pixel::YUVJ411P)
}

/// Copies a packed RGB24 buffer (`width * 3` bytes a row) into a new RGB24 frame.
pub(crate) fn rgb_frame_from_buffer(rgb: &[u8], width: u32, height: u32) -> frame::Video {
    let mut frame = frame::Video::new(Pixel::RGB24, width, height);
    let row_bytes = width as usize * 3;
    let stride = frame.stride(0);
    let plane = frame.data_mut(0);
    for (row, source_row) in rgb.chunks_exact(row_bytes).take(height as usize).enumerate() {
        plane[row * stride..row * stride + row_bytes].copy_from_slice(source_row);
    }
    frame
}

/// Copies an RGB24 frame into a packed buffer of `width * 3` bytes a row.
pub(crate) fn buffer_from_rgb_frame(frame: &frame::Video) -> Vec<u8> {
    let row_bytes = frame.width() as usize * 3;
    let stride = frame.stride(0);
    let plane = frame.data(0);
    let mut rgb = Vec::with_capacity(row_bytes * frame.height() as usize);
    for row in 0..frame.height() as usize {
        rgb.extend_from_slice(&plane[row * stride..row * stride + row_bytes]);
    }
    rgb
}
