//! `impasto score`: how much an output looks like its style and still shows its content, measured
//! the same way whatever network or settings produced it. With a plain VGG (max pooling, no
//! normalisation, as trained):
//! - style distance: mean over conv1_1 … conv5_1 of ‖G(out) − G(style)‖ / ‖G(style)‖, Grams of ReLU
//!   features divided by the number of positions, the style scaled to the output's long side;
//! - content distance: ‖F(out) − F(content)‖ / ‖F(content)‖ of the ReLU features at conv4_2, the
//!   content scaled to the output's size.

use image::RgbImage;
use serde::Serialize;
use tch::{Kind, Tensor};

use super::loss::gram;
use crate::imageio;
use crate::model::{LayerId, Vgg};

/// The two distances and the per-layer style distances.
#[derive(Clone, Debug, Serialize)]
pub struct Score {
    /// Mean relative Gram distance over the style layers (lower = more like the style).
    pub style: f64,
    /// Relative feature distance at conv4_2 (lower = more like the content).
    pub content: f64,
    /// Relative Gram distance per style layer.
    pub style_layers: Vec<(String, f64)>,
}

fn style_layers() -> Vec<LayerId> {
    (1..=5).map(|b| LayerId::new(b, 1)).collect()
}

fn relative_distance(a: &Tensor, reference: &Tensor) -> f64 {
    let difference = (a - reference).to_kind(Kind::Double).norm().double_value(&[]);
    difference / reference.to_kind(Kind::Double).norm().double_value(&[]).max(f64::MIN_POSITIVE)
}

fn positional_grams(vgg: &Vgg, image: &RgbImage) -> Vec<Tensor> {
    let tensor = imageio::rgb_to_tensor(image).to_device(vgg.device());
    let _products = crate::device::products::hold(vgg.device(), vgg.precision());
    vgg.features(&tensor, &style_layers()).iter().map(|f| gram(f) / (f.size()[2] * f.size()[3]) as f64).collect()
}

/// Scores `output` against its `content` and `style` with `vgg` (use max pooling, no normalisation).
pub fn score(vgg: &Vgg, content: &RgbImage, style: &RgbImage, output: &RgbImage) -> Score {
    let _guard = tch::no_grad_guard();
    let (width, height) = output.dimensions();
    let style = imageio::resize_long_side(style, width.max(height));
    let content = image::imageops::resize(content, width, height, image::imageops::FilterType::Lanczos3);
    let output_grams = positional_grams(vgg, output);
    let style_grams = positional_grams(vgg, &style);
    let style_layers: Vec<(String, f64)> = style_layers()
        .iter()
        .zip(output_grams.iter().zip(&style_grams))
        .map(|(layer, (out, target))| (layer.to_string(), relative_distance(out, target)))
        .collect();
    let content_layer = [LayerId::new(4, 2)];
    let device = vgg.device();
    let output_features = vgg.features(&imageio::rgb_to_tensor(output).to_device(device), &content_layer);
    let content_features = vgg.features(&imageio::rgb_to_tensor(&content).to_device(device), &content_layer);
    Score {
        style: style_layers.iter().map(|(_, d)| d).sum::<f64>() / style_layers.len() as f64,
        content: relative_distance(&output_features[0], &content_features[0]),
        style_layers,
    }
}
