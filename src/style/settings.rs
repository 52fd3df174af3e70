//! Every knob of the image stylization (the `[style]` table of a profile), with the defaults that
//! turn photos into clear paintings on any supported network (thanks to the network normalisation).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::color::ColorMode;
use super::optim::{OptimizerKind, PairPrecision};
use crate::error::{Error, Result};
use crate::model::LayerId;

/// Where the optimisation starts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Init {
    /// The content photo.
    #[default]
    Content,
    /// Uniform white noise (seeded).
    Noise,
    /// The image in `init_image`.
    Image,
}

impl std::str::FromStr for Init {
    type Err = Error;
    fn from_str(text: &str) -> Result<Self> {
        match text.trim().to_ascii_lowercase().as_str() {
            "content" => Ok(Init::Content),
            "noise" | "random" => Ok(Init::Noise),
            "image" => Ok(Init::Image),
            _ => Err(Error::Settings(format!("init '{text}': expected 'content', 'noise' or 'image'"))),
        }
    }
}

/// How the content and style layers' terms are weighed against each other.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LayerBalance {
    /// Each layer's paper term divided by its target's own scale (½ΣP² for content, ΣA²/(4N²M²)
    /// for style): every layer then counts by its squared relative error, whatever its activations' size.
    Relative,
    /// The paper's terms as they are (w_l = style_layer_weights, α = ratio·β).
    Paper,
    /// The square root of `relative`: each layer's relative distance ‖G − A‖/‖A‖ (‖F − P‖/‖P‖ for
    /// content), the quantities `impasto score` averages. The default: measured best.
    #[default]
    Distance,
}

impl std::str::FromStr for LayerBalance {
    type Err = Error;
    fn from_str(text: &str) -> Result<Self> {
        match text.trim().to_ascii_lowercase().as_str() {
            "relative" => Ok(LayerBalance::Relative),
            "paper" => Ok(LayerBalance::Paper),
            "distance" => Ok(LayerBalance::Distance),
            _ => Err(Error::Settings(format!("layer balance '{text}': expected 'relative', 'distance' or 'paper'"))),
        }
    }
}

/// One step of a coarse-to-fine schedule.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScaleStep {
    /// Long side in pixels.
    pub size: u32,
    /// Iterations at this size.
    pub iterations: u32,
}

/// Settings of one stylization.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StyleSettings {
    /// Output long side in pixels (aspect kept).
    pub size: u32,
    /// Optimisation iterations (one loss and gradient evaluation each).
    pub iterations: u32,
    /// Coarse-to-fine schedule; when set it replaces `size` and `iterations` (last step = output size).
    pub scales: Vec<ScaleStep>,
    /// Content layers (the paper: conv4_2).
    pub content_layers: Vec<LayerId>,
    /// Style layers (the paper: conv1_1 … conv5_1).
    pub style_layers: Vec<LayerId>,
    /// Weight w_l of each style layer; empty = 1/(number of layers) each, as in the paper.
    pub style_layer_weights: Vec<f64>,
    /// α/β, the content-to-style ratio (the paper used 1e-3 … 1e-4 with `layer_balance = "paper"`).
    pub ratio: f64,
    /// `distance` (each layer by its relative distance; default), `relative` (squared) or `paper` (raw terms).
    pub layer_balance: LayerBalance,
    /// β, the style weight; α = ratio · β.
    pub style_weight: f64,
    /// Weight of the total-variation smoothness term (0 = off).
    pub tv_weight: f64,
    /// `lbfgs` (the reference tools' choice) or `adam`.
    pub optimizer: OptimizerKind,
    /// Curvature pairs L-BFGS keeps.
    pub lbfgs_history: usize,
    /// The most memory, MiB, L-BFGS's pairs may take per image (0: no limit): fewer pairs are kept
    /// where `lbfgs_history` of them would take more. Each pair is two images in f32: 100 pairs take
    /// 600 MiB at 512², 4.6 GiB at 1080p and 18.5 GiB at 4K, where the default keeps 26; in bf16
    /// (`lbfgs_pairs`) half that, and 4K keeps 53. A batch of B images holds B times as much.
    pub lbfgs_memory_mib: u64,
    /// How L-BFGS stores its pairs: `f32`, `bf16` (half the memory and the reads; the steps are
    /// those of the rounded pairs), or `auto`: bf16 for f32 images on the CPU where this build has
    /// the kernel that reads them (`device::bf16_rows`; faster at the same quality, BENCHMARKS.md),
    /// f32 elsewhere and on a GPU until measured there. In bf16, 100 pairs take 2.3 GiB at 1080p,
    /// and 4K keeps 53 within the default limit (26 in f32).
    pub lbfgs_pairs: PairPrecision,
    /// Adam's learning rate (image in 0..1); L-BFGS uses 1.
    pub learning_rate: f64,
    /// Stop early when the relative loss change stays below this for `patience` iterations (0 = never).
    pub tolerance: f64,
    /// Iterations the change must stay below `tolerance`.
    pub patience: u32,
    /// Start from `content`, `noise` or `image` (`init_image`).
    pub init: Init,
    /// Starting image for `init = "image"`.
    pub init_image: Option<PathBuf>,
    /// Seed for noise initialisation.
    pub seed: u64,
    /// Style image long side relative to the output's.
    pub style_scale: f64,
    /// Blend weights of several style images (empty = equal).
    pub style_blend: Vec<f64>,
    /// `style`, `luminance` (keep the content's colours) or `histogram` (match them).
    pub color: ColorMode,
    /// Tile side in pixels for images too large for the device's memory (0 = the whole image at once).
    pub tile_size: u32,
    /// Overlap between neighbouring tiles in pixels (feathered).
    pub tile_overlap: u32,
    /// Read the losses from the device every this many iterations (0: every iteration on the CPU,
    /// every 5 on a GPU). Each read waits for the device to finish its queue; the result is the
    /// same whatever the interval (a read replays the iterations in order), but up to interval − 1
    /// iterations after an early stop are computed and dropped.
    pub loss_read_interval: u32,
}

impl Default for StyleSettings {
    fn default() -> Self {
        StyleSettings {
            size: 512,
            iterations: 300,
            scales: Vec::new(),
            content_layers: vec![LayerId::new(4, 2)],
            style_layers: (1..=5).map(|b| LayerId::new(b, 1)).collect(),
            style_layer_weights: Vec::new(),
            ratio: 0.8,
            layer_balance: LayerBalance::Distance,
            style_weight: 1.0,
            tv_weight: 0.0,
            optimizer: OptimizerKind::Lbfgs,
            lbfgs_history: 100,
            lbfgs_memory_mib: 5120,
            lbfgs_pairs: PairPrecision::Auto,
            learning_rate: 0.02,
            tolerance: 0.0,
            patience: 10,
            init: Init::Content,
            init_image: None,
            seed: 0,
            style_scale: 1.0,
            style_blend: Vec::new(),
            color: ColorMode::Style,
            tile_size: 0,
            tile_overlap: 64,
            loss_read_interval: 0,
        }
    }
}

impl StyleSettings {
    /// The coarse-to-fine schedule in effect (a single step unless `scales` is set).
    pub fn schedule(&self) -> Vec<ScaleStep> {
        if self.scales.is_empty() {
            vec![ScaleStep { size: self.size, iterations: self.iterations }]
        } else {
            self.scales.clone()
        }
    }

    /// Iterations between two reads of the losses on `device` (see `loss_read_interval`).
    pub fn loss_read_interval_on(&self, device: tch::Device) -> usize {
        match (self.loss_read_interval, device) {
            (0, tch::Device::Cpu) => 1,
            (0, _) => 5,
            (interval, _) => interval as usize,
        }
    }

    /// The weight of each style layer.
    pub fn layer_weights(&self) -> Vec<f64> {
        if self.style_layer_weights.is_empty() {
            vec![1.0 / self.style_layers.len().max(1) as f64; self.style_layers.len()]
        } else {
            self.style_layer_weights.clone()
        }
    }

    /// Checks ranges and consistency.
    pub fn validate(&self) -> Result<()> {
        let bad = |problem: String| Err(Error::Settings(problem));
        if self.schedule().iter().any(|s| s.size < 16 || s.size > 16384) {
            return bad("size must be between 16 and 16384 pixels".into());
        }
        if self.style_layers.is_empty() && self.content_layers.is_empty() {
            return bad("no content or style layers".into());
        }
        if !self.style_layer_weights.is_empty() && self.style_layer_weights.len() != self.style_layers.len() {
            return bad(format!(
                "style_layer_weights has {} entries for {} style layers",
                self.style_layer_weights.len(),
                self.style_layers.len()
            ));
        }
        if !(self.ratio >= 0.0 && self.style_weight >= 0.0 && self.tv_weight >= 0.0) {
            return bad("ratio, style_weight and tv_weight must be non-negative".into());
        }
        if self.style_scale <= 0.0 || self.style_scale > 8.0 {
            return bad(format!("style_scale {} must be in (0, 8]", self.style_scale));
        }
        if self.init == Init::Image && self.init_image.is_none() {
            return bad("init = \"image\" needs init_image".into());
        }
        if self.tile_size != 0 && (self.tile_size < 64 || self.tile_overlap >= self.tile_size) {
            return bad(format!(
                "tile_size {} must be 0 (no tiles) or at least 64 and larger than tile_overlap {}",
                self.tile_size, self.tile_overlap
            ));
        }
        if self.style_blend.iter().any(|w| w.is_nan() || *w < 0.0) {
            return bad("style blend weights must be non-negative".into());
        }
        Ok(())
    }
}
