//! Colour preservation (Gatys et al. 2016, "Preserving Color in Neural Artistic Style Transfer"):
//! - luminance-only transfer: stylize the luminance channel alone, then put the content's
//!   chrominance back (YIQ);
//! - colour-histogram matching: give the output the content's colour mean and covariance with a
//!   linear map (matching the first two moments, as the paper does for the style image).

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

/// How to treat colour.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ColorMode {
    /// Take colours from the style.
    #[default]
    Style,
    /// Transfer luminance only; keep the content's chrominance.
    Luminance,
    /// Match the output's colour mean and covariance to the content's.
    Histogram,
}

impl std::str::FromStr for ColorMode {
    type Err = crate::Error;
    fn from_str(text: &str) -> crate::Result<Self> {
        match text.trim().to_ascii_lowercase().as_str() {
            "style" | "none" => Ok(ColorMode::Style),
            "luminance" => Ok(ColorMode::Luminance),
            "histogram" => Ok(ColorMode::Histogram),
            _ => Err(crate::Error::Settings(format!("color '{text}': expected 'style', 'luminance' or 'histogram'"))),
        }
    }
}

const RGB_TO_YIQ: [[f32; 3]; 3] =
    [[0.299, 0.587, 0.114], [0.595_716, -0.274_453, -0.321_263], [0.211_456, -0.522_591, 0.311_135]];

fn matrix(rows: [[f32; 3]; 3], like: &Tensor) -> Tensor {
    Tensor::from_slice(rows.as_flattened()).view([3, 3]).to_device(like.device())
}

/// Applies a 3×3 colour matrix to `[1, 3, H, W]`. The product is taken in f64: f32 products on the
/// CPU may run with bf16 inputs while a bf16 network evaluates on another thread
/// (`device::products`), which would round the colours.
fn apply(m: &Tensor, image: &Tensor) -> Tensor {
    let (_, _, h, w) = image.size4().expect("image [1, 3, H, W]");
    let pixels = image.view([3, -1]).to_kind(Kind::Double);
    m.to_kind(Kind::Double).matmul(&pixels).to_kind(image.kind()).view([1, 3, h, w])
}

/// RGB → YIQ.
pub fn rgb_to_yiq(image: &Tensor) -> Tensor {
    apply(&matrix(RGB_TO_YIQ, image), image)
}

/// YIQ → RGB.
pub fn yiq_to_rgb(image: &Tensor) -> Tensor {
    apply(&matrix(RGB_TO_YIQ, image).inverse(), image)
}

/// The luminance as a grey RGB image (Y in all three channels).
pub fn luminance_as_rgb(image: &Tensor) -> Tensor {
    rgb_to_yiq(image).narrow(1, 0, 1).expand([-1, 3, -1, -1], false).contiguous()
}

/// The luminance of `stylized` with the chrominance of `content` (same size).
pub fn with_content_chrominance(stylized: &Tensor, content: &Tensor) -> Tensor {
    let y = rgb_to_yiq(stylized).narrow(1, 0, 1);
    let iq = rgb_to_yiq(content).narrow(1, 1, 2);
    yiq_to_rgb(&Tensor::cat(&[y, iq], 1))
}

fn mean_and_covariance(image: &Tensor) -> (Tensor, Tensor) {
    let pixels = image.view([3, -1]).to_kind(Kind::Double);
    let mean = pixels.mean_dim(1, true, Kind::Double);
    let centred = &pixels - &mean;
    let count = centred.size()[1] as f64;
    let covariance = centred.matmul(&centred.tr()) / count + Tensor::eye(3, (Kind::Double, image.device())) * 1e-6;
    (mean, covariance)
}

fn symmetric_power(m: &Tensor, power: f64) -> Tensor {
    let (values, vectors) = m.linalg_eigh("L");
    let scaled = values.clamp_min(1e-12).pow_tensor_scalar(power);
    vectors.matmul(&scaled.diag_embed(0, -2, -1)).matmul(&vectors.tr())
}

/// Maps `image`'s colours linearly so their mean and covariance equal `reference`'s.
pub fn match_histogram(image: &Tensor, reference: &Tensor) -> Tensor {
    let (mean_i, cov_i) = mean_and_covariance(image);
    let (mean_r, cov_r) = mean_and_covariance(reference);
    let transform = symmetric_power(&cov_r, 0.5).matmul(&symmetric_power(&cov_i, -0.5));
    let (_, _, h, w) = image.size4().expect("image [1, 3, H, W]");
    let pixels = image.view([3, -1]).to_kind(Kind::Double);
    let mapped = transform.matmul(&(pixels - mean_i)) + mean_r;
    mapped.to_kind(image.kind()).view([1, 3, h, w])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yiq_round_trip() {
        let image = crate::seeded::uniform(&[1, 3, 4, 5], 0);
        assert!(yiq_to_rgb(&rgb_to_yiq(&image)).allclose(&image, 1e-5, 1e-5, false));
    }

    #[test]
    fn histogram_matching_copies_mean_and_covariance() {
        let image = crate::seeded::uniform(&[1, 3, 16, 16], 1) * 0.3;
        let reference = crate::seeded::uniform(&[1, 3, 16, 16], 2).sqrt();
        let matched = match_histogram(&image, &reference);
        let (m1, c1) = mean_and_covariance(&matched);
        let (m2, c2) = mean_and_covariance(&reference);
        assert!(m1.allclose(&m2, 1e-4, 1e-4, false));
        assert!(c1.allclose(&c2, 1e-3, 1e-4, false));
    }

    #[test]
    fn chrominance_comes_from_the_content() {
        let stylized = crate::seeded::uniform(&[1, 3, 4, 4], 3);
        let content = crate::seeded::uniform(&[1, 3, 4, 4], 4);
        let mixed = rgb_to_yiq(&with_content_chrominance(&stylized, &content));
        assert!(mixed.narrow(1, 0, 1).allclose(&rgb_to_yiq(&stylized).narrow(1, 0, 1), 1e-5, 1e-5, false));
        assert!(mixed.narrow(1, 1, 2).allclose(&rgb_to_yiq(&content).narrow(1, 1, 2), 1e-5, 1e-5, false));
    }
}
