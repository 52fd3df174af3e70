//! The paper's network normalisation: rescale every convolution so that each filter's mean ReLU
//! activation over a set of real images is 1. For a ReLU network with average or max pooling this is
//! exact: layer l's filter k is divided by its mean `m_l[k]` and its input channels multiplied by the
//! previous layer's means, so every feature map is the original one divided by a positive constant.
//! Without it, the deep layers' Gram terms are ~10⁵ smaller than conv1_1's and one set of loss
//! weights cannot serve every network.

use std::path::PathBuf;

use sha2::{Digest, Sha256};
use tch::{Device, Kind, Tensor};

use super::layers::LayerId;
use super::vgg::Vgg;
use super::weights::ConvWeights;
use crate::error::{Error, Result};

/// Calibration images bundled into the binary (photos and paintings, 256 px; see samples/ATTRIBUTION.md).
const CALIBRATION_IMAGES: [(&str, &[u8]); 4] = [
    ("astronaut", include_bytes!("../../samples/calibration/astronaut.png")),
    ("chelsea", include_bytes!("../../samples/calibration/chelsea.png")),
    ("starry_night", include_bytes!("../../samples/calibration/starry_night.png")),
    ("great_wave", include_bytes!("../../samples/calibration/great_wave.png")),
];

/// Identifies the calibration set in cache keys; change it when the images change.
const CALIBRATION_ID: &str = "calib-v1-4x256";

/// The bundled calibration images as RGB 0..1 tensors `[1, 3, H, W]` on the CPU.
pub fn calibration_images() -> Vec<Tensor> {
    CALIBRATION_IMAGES
        .iter()
        .map(|(name, bytes)| {
            let decoded = image::load_from_memory(bytes).unwrap_or_else(|e| panic!("bundled image {name}: {e}"));
            crate::imageio::rgb_to_tensor(&decoded.to_rgb8())
        })
        .collect()
}

/// Mean ReLU activation of every filter of every convolution, averaged over images and positions.
/// One `[C]` f32 CPU tensor per convolution, in network order.
pub fn mean_activations(vgg: &Vgg, images: &[Tensor]) -> Vec<Tensor> {
    let _guard = tch::no_grad_guard();
    let layers: Vec<LayerId> = vgg.convs().iter().map(|c| c.layer).collect();
    let mut sums: Vec<Tensor> = Vec::new();
    for image in images {
        let features = vgg.features(&image.to_device(vgg.device()), &layers);
        let means: Vec<Tensor> = features
            .iter()
            .map(|f| f.mean_dim([0i64, 2, 3].as_slice(), false, Kind::Double).to_device(Device::Cpu))
            .collect();
        if sums.is_empty() {
            sums = means;
        } else {
            for (sum, mean) in sums.iter_mut().zip(means) {
                *sum = &*sum + mean;
            }
        }
    }
    sums.into_iter().map(|s| (s / images.len() as f64).to_kind(Kind::Float)).collect()
}

/// Rescales f32 CPU weights so that every filter's mean activation becomes 1 (see the module text).
/// Filters that never fire (mean 0) keep their scale.
pub fn normalized(convs: &[ConvWeights], means: &[Tensor]) -> Vec<ConvWeights> {
    let _guard = tch::no_grad_guard();
    let mut previous: Option<Tensor> = None;
    convs
        .iter()
        .zip(means)
        .map(|(conv, mean)| {
            let scale = robust_scale(&mean.to_device(conv.weight.device()).to_kind(Kind::Float));
            let mut weight = &conv.weight / scale.view([-1, 1, 1, 1]);
            if let Some(prev) = &previous {
                weight *= prev.view([1, -1, 1, 1]);
            }
            let bias = &conv.bias / &scale;
            previous = Some(scale);
            ConvWeights { layer: conv.layer, weight, bias }
        })
        .collect()
}

/// Filters whose mean is below this fraction of their layer's median mean are scaled as if their
/// mean were at that floor: a filter that barely fires on the calibration images would otherwise be
/// multiplied by thousands and, firing on a painting, swamp its layer's Gram matrix.
pub const FLOOR_FRACTION: f64 = 0.1;

fn robust_scale(mean: &Tensor) -> Tensor {
    let median = mean.median().double_value(&[]);
    let floor = (median * FLOOR_FRACTION).max(1e-12);
    mean.clamp_min(floor)
}

/// Where the means for a weight file and pooling mode are cached.
pub fn cache_path(weights_file: &std::path::Path, pooling: super::layers::Pooling) -> Result<PathBuf> {
    let bytes = std::fs::read(weights_file).map_err(|e| Error::io(weights_file, e))?;
    let digest = hex::encode(Sha256::digest(&bytes));
    let dir = super::cache_dir().join("normalization");
    Ok(dir.join(format!("{}-{pooling}-{CALIBRATION_ID}.safetensors", &digest[..16])))
}

/// Reads cached means, if present and complete.
pub fn read_cached(path: &std::path::Path, layers: &[LayerId]) -> Option<Vec<Tensor>> {
    let named = Tensor::read_safetensors(path).ok()?;
    layers.iter().map(|l| named.iter().find(|(n, _)| *n == l.to_string()).map(|(_, t)| t.shallow_clone())).collect()
}

/// Writes means to the cache (best effort: a read-only cache only costs recomputation).
pub fn write_cached(path: &std::path::Path, layers: &[LayerId], means: &[Tensor]) {
    let named: Vec<(String, Tensor)> =
        layers.iter().map(|l| l.to_string()).zip(means.iter().map(|m| m.shallow_clone())).collect();
    crate::fsutil::write_cache_file(path, "normalisation statistics", |temp| {
        Tensor::write_safetensors(&named, temp).map_err(|e| crate::error::Error::Torch(e.to_string()))
    });
}
