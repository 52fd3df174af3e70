//! Images in and out of the engine: files to RGB 0..1 tensors `[1, 3, H, W]` (f32) and back, resizing
//! to a working size (long side), and writing PNG/JPEG atomically. Errors name the file and say what
//! was expected.

use std::path::Path;

use image::{RgbImage, imageops::FilterType};
use tch::{Device, Kind, Tensor};

use crate::error::{Error, Result};

/// Reads an image file (PNG, JPEG, WebP, BMP, TIFF) as 8-bit RGB.
pub fn read_rgb(path: &Path) -> Result<RgbImage> {
    let reader = open_image(path)?;
    let decoded = reader.decode().map_err(|e| Error::image(path, format!("cannot decode: {e}")))?;
    if decoded.width() == 0 || decoded.height() == 0 {
        return Err(Error::image(path, "image has no pixels"));
    }
    Ok(decoded.to_rgb8())
}

/// Checks that `path` is an image [`read_rgb`] would take, from its header (and a JPEG's end),
/// without decoding its pixels; returns its size.
pub fn check_image(path: &Path) -> Result<(u32, u32)> {
    let (width, height) =
        open_image(path)?.into_dimensions().map_err(|e| Error::image(path, format!("cannot decode: {e}")))?;
    if width == 0 || height == 0 {
        return Err(Error::image(path, "image has no pixels"));
    }
    Ok((width, height))
}

/// An image file's reader, its format known; a JPEG's end checked.
fn open_image(path: &Path) -> Result<image::ImageReader<std::io::BufReader<std::fs::File>>> {
    if !path.exists() {
        return Err(Error::image(path, "file not found"));
    }
    let reader = image::ImageReader::open(path)
        .map_err(|e| Error::io(path, e))?
        .with_guessed_format()
        .map_err(|e| Error::io(path, e))?;
    if reader.format().is_none() {
        return Err(Error::image(path, "not an image (PNG, JPEG, WebP, BMP or TIFF expected)"));
    }
    if reader.format() == Some(image::ImageFormat::Jpeg) {
        check_jpeg_complete(path)?;
    }
    Ok(reader)
}

/// JPEG decoders fill a truncated file's missing part with grey; refuse such a file instead.
fn check_jpeg_complete(path: &Path) -> Result<()> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let tail = &bytes[bytes.len().saturating_sub(64)..];
    if tail.windows(2).any(|pair| pair == [0xFF, 0xD9]) {
        Ok(())
    } else {
        Err(Error::image(path, "truncated JPEG (no end-of-image marker)"))
    }
}

/// The size `(width, height)` with the long side `long_side`, aspect kept, each at least 1.
pub fn fit_long_side(width: u32, height: u32, long_side: u32) -> (u32, u32) {
    let scale = long_side as f64 / width.max(height) as f64;
    let w = ((width as f64 * scale).round() as u32).max(1);
    let h = ((height as f64 * scale).round() as u32).max(1);
    (w, h)
}

/// Resizes so the long side is `long_side` (Lanczos; no-op when already that size).
pub fn resize_long_side(image: &RgbImage, long_side: u32) -> RgbImage {
    let (w, h) = fit_long_side(image.width(), image.height(), long_side);
    if (w, h) == image.dimensions() {
        return image.clone();
    }
    image::imageops::resize(image, w, h, FilterType::Lanczos3)
}

/// 8-bit RGB to an f32 tensor `[1, 3, H, W]` in 0..1 on the CPU.
pub fn rgb_to_tensor(image: &RgbImage) -> Tensor {
    let (w, h) = image.dimensions();
    Tensor::from_slice(image.as_raw())
        .view([h as i64, w as i64, 3])
        .permute([2, 0, 1])
        .unsqueeze(0)
        .to_kind(Kind::Float)
        / 255.0
}

/// An f32 tensor `[1, 3, H, W]` (any device, clamped to 0..1) to 8-bit RGB.
pub fn tensor_to_rgb(tensor: &Tensor) -> RgbImage {
    let (_, _, h, w) = tensor.size4().expect("image tensor [1, 3, H, W]");
    let bytes = (tensor.detach().to_device(Device::Cpu).to_kind(Kind::Float).clamp(0.0, 1.0) * 255.0)
        .round()
        .to_kind(Kind::Uint8)
        .squeeze_dim(0)
        .permute([1, 2, 0])
        .contiguous();
    let mut raw = vec![0u8; (h * w * 3) as usize];
    let len = raw.len();
    bytes.copy_data(&mut raw, len);
    RgbImage::from_raw(w as u32, h as u32, raw).expect("buffer matches dimensions")
}

/// Reads an image, resized to `long_side` if given, as a tensor `[1, 3, H, W]` on `device`.
pub fn load_tensor(path: &Path, long_side: Option<u32>, device: Device) -> Result<Tensor> {
    let image = read_rgb(path)?;
    let image = match long_side {
        Some(side) => resize_long_side(&image, side),
        None => image,
    };
    Ok(rgb_to_tensor(&image).to_device(device))
}

/// Writes a tensor image to `path` (format from the extension) via a temporary name.
pub fn save_tensor(tensor: &Tensor, path: &Path) -> Result<()> {
    let format = image::ImageFormat::from_path(path)
        .map_err(|_| Error::image(path, "unknown output extension (use .png, .jpg, .webp, .bmp or .tiff)"))?;
    let image = tensor_to_rgb(tensor);
    crate::fsutil::write_atomically(path, |temp| {
        image.save_with_format(temp, format).map_err(|e| Error::image(path, format!("cannot write: {e}")))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tensor_round_trip_keeps_pixels() {
        let mut image = RgbImage::new(5, 3);
        for (x, y, p) in image.enumerate_pixels_mut() {
            *p = image::Rgb([x as u8 * 40, y as u8 * 70, 200]);
        }
        let back = tensor_to_rgb(&rgb_to_tensor(&image));
        assert_eq!(back, image);
    }

    #[test]
    fn the_header_check_refuses_what_reading_refuses() {
        let dir = tempfile::tempdir().unwrap();
        let png = dir.path().join("good.png");
        RgbImage::from_pixel(7, 3, image::Rgb([1, 2, 3])).save(&png).unwrap();
        let jpeg = dir.path().join("good.jpg");
        RgbImage::from_pixel(16, 16, image::Rgb([90, 20, 30])).save(&jpeg).unwrap();
        let bytes = std::fs::read(&jpeg).unwrap();
        let truncated = dir.path().join("truncated.jpg");
        std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
        let text = dir.path().join("notes.png");
        std::fs::write(&text, "not a picture").unwrap();
        assert_eq!(check_image(&png).unwrap(), (7, 3));
        assert_eq!(check_image(&jpeg).unwrap(), (16, 16));
        for bad in [truncated, text, dir.path().join("missing.png")] {
            let (checked, read) = (check_image(&bad).unwrap_err(), read_rgb(&bad).unwrap_err());
            assert_eq!(checked.to_string(), read.to_string());
            assert!(checked.to_string().contains(&bad.display().to_string()), "{checked}");
        }
    }

    #[test]
    fn long_side_keeps_aspect() {
        assert_eq!(fit_long_side(752, 600, 256), (256, 204));
        assert_eq!(fit_long_side(300, 451, 128), (85, 128));
    }
}
