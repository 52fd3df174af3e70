//! The VGG feature network: layers, weights, input conventions and the paper's activation
//! normalisation. `Vgg::features` runs the stack only as deep as the deepest requested layer.
//! `load` goes from settings to a ready network: find the weight file, read it, settle the input
//! convention, normalise (cached), and move it to the device in the chosen precision.

pub mod convention;
pub mod fetch;
pub mod layers;
mod legacy_pickle;
pub mod normalize;
mod torch_zip;
pub mod vgg;
pub mod weights;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tch::Device;

pub use convention::Convention;
pub use layers::{Arch, LayerId, Pooling};
pub use vgg::{Layout, Vgg};

use crate::device::{DeviceChoice, Precision, PrecisionChoice};
use crate::error::{Error, Result};

/// Environment variable naming a weight file (second in the resolution order).
pub const MODEL_ENV: &str = "IMPASTO_MODEL";

/// How to find and prepare the network (the `[model]` table of a profile).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelSettings {
    /// Weight file (`.safetensors`, `.pth`, `.pt`). Unset: `IMPASTO_MODEL`, then the fetched VGG-19 in the cache.
    pub path: Option<PathBuf>,
    /// Input convention, for files that do not state theirs.
    pub convention: Option<Convention>,
    /// Pooling between blocks: `max` (as trained; measured best here) or `avg` (the paper's choice).
    pub pooling: Pooling,
    /// Rescale filters to unit mean activation (the paper's normalisation; off by default, see BENCHMARKS.md).
    pub normalize: bool,
    /// `auto`, `cpu` or `cuda:N`.
    pub device: DeviceChoice,
    /// Network precision: `auto` (bf16 where it is the faster on the device, else f32), `f32`, `tf32`
    /// (TF32 tensor cores on CUDA, f32 elsewhere) or `bf16` (the image stays f32).
    pub precision: PrecisionChoice,
    /// Activation memory layout: `channels-last` (the default) or `channels-first`.
    pub layout: Layout,
}

impl Default for ModelSettings {
    fn default() -> Self {
        ModelSettings {
            path: None,
            convention: None,
            pooling: Pooling::Max,
            normalize: false,
            device: DeviceChoice::Auto,
            precision: PrecisionChoice::Auto,
            layout: Layout::default(),
        }
    }
}

/// impasto's cache directory: `$IMPASTO_CACHE_DIR`, else `$XDG_CACHE_HOME/impasto` (`~/.cache/impasto`).
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("IMPASTO_CACHE_DIR") {
        return PathBuf::from(dir);
    }
    dirs::cache_dir().unwrap_or_else(std::env::temp_dir).join("impasto")
}

/// Finds the weight file: the setting (from `--model` or the profile), then `IMPASTO_MODEL`,
/// then the VGG-19 that `impasto model fetch` caches.
pub fn resolve_weights(setting: Option<&Path>) -> Result<PathBuf> {
    if let Some(path) = setting {
        return Ok(path.to_path_buf());
    }
    if let Some(path) = std::env::var_os(MODEL_ENV).filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(path));
    }
    let cached = fetch::cached_model_path();
    if cached.is_file() {
        return Ok(cached);
    }
    Err(Error::NoModel(format!(
        "pass --model FILE (.safetensors or .pth with VGG-16/19 convolutions), set {MODEL_ENV}, set [model] path in \
         the profile, or run `impasto model fetch` to download VGG-19 into {}",
        cached.display()
    )))
}

/// Reads, normalises and places the network described by `settings`.
pub fn load(settings: &ModelSettings) -> Result<Vgg> {
    let device = settings.device.resolve()?;
    let path = resolve_weights(settings.path.as_deref())?;
    load_from(&path, settings, device)
}

/// Like [`load`] with the weight file and device already settled.
pub fn load_from(path: &Path, settings: &ModelSettings, device: Device) -> Result<Vgg> {
    let precision = resolve_precision(settings, device)?;
    let loaded = weights::load(path)?;
    let convention = settings.convention.or(loaded.convention).ok_or_else(|| {
        Error::weights(
            path,
            "the file does not state its input convention; pass --convention caffe (BGR, 0..255, mean-subtracted) \
             or --convention torchvision (RGB, 0..1, ImageNet mean/std)",
        )
    })?;
    let raw = Vgg::new(loaded.arch, loaded.convs, convention, settings.pooling, device, Precision::F32);
    if !settings.normalize {
        return Ok(rebuild(raw, settings, precision, None));
    }
    let layers: Vec<LayerId> = raw.convs().iter().map(|c| c.layer).collect();
    let cache = normalize::cache_path(path, settings.pooling)?;
    let means = match normalize::read_cached(&cache, &layers) {
        Some(means) => means,
        None => {
            tracing::info!(weights = %path.display(), "computing the network normalisation (once per model)");
            let means = normalize::mean_activations(&raw, &normalize::calibration_images());
            normalize::write_cached(&cache, &layers, &means);
            means
        }
    };
    Ok(rebuild(raw, settings, precision, Some(&means)))
}

/// The precision the network runs in on `device` (the setting, `auto` settled for the device), with
/// libtorch's TF32 switch set for it.
pub fn resolve_precision(settings: &ModelSettings, device: Device) -> Result<Precision> {
    let precision = settings.precision.resolve(device);
    if settings.precision == PrecisionChoice::Auto {
        tracing::info!(device = %crate::device::device_name(device), %precision, "precision auto");
    }
    crate::device::apply_precision(device, precision)?;
    Ok(precision)
}

fn rebuild(raw: Vgg, settings: &ModelSettings, precision: Precision, means: Option<&[tch::Tensor]>) -> Vgg {
    let convs = match means {
        Some(means) => normalize::normalized(raw.convs(), means),
        None => raw
            .convs()
            .iter()
            .map(|c| weights::ConvWeights {
                layer: c.layer,
                weight: c.weight.shallow_clone(),
                bias: c.bias.shallow_clone(),
            })
            .collect(),
    };
    Vgg::with_layout(raw.arch(), convs, raw.convention(), raw.pooling(), raw.device(), precision, settings.layout)
}

/// What identifies the network for checkpoints and job keys: the weight file and how it is prepared
/// (the device left out, so a job can resume elsewhere).
pub fn identity(settings: &ModelSettings) -> Result<serde_json::Value> {
    let weights = resolve_weights(settings.path.as_deref())?;
    let weights = weights.canonicalize().unwrap_or(weights);
    Ok(serde_json::json!({
        "weights": weights,
        "convention": settings.convention.map(|c| c.to_string()),
        "pooling": settings.pooling,
        "normalize": settings.normalize,
        "precision": settings.precision.to_string(),
    }))
}

#[cfg(test)]
mod tests {
    use super::vgg::tests::is_channels_last;
    use super::*;

    /// VGG-16 with random weights, in `layout`.
    fn network(layout: Layout) -> Vgg {
        let settings = ModelSettings { layout, precision: Precision::F32.into(), ..ModelSettings::default() };
        crate::bench::random_vgg(Arch::Vgg16, &settings, Device::Cpu).unwrap()
    }

    #[test]
    fn the_loaders_rebuild_holds_the_weights_in_the_settings_layout() {
        for raw_layout in [Layout::ChannelsFirst, Layout::ChannelsLast] {
            let rebuilt = |layout| {
                let settings = ModelSettings { layout, ..ModelSettings::default() };
                rebuild(network(raw_layout), &settings, Precision::F32, None)
            };
            assert!(rebuilt(Layout::ChannelsFirst).convs().iter().all(|c| c.weight.is_contiguous()));
            assert!(rebuilt(Layout::ChannelsLast).convs().iter().all(|c| is_channels_last(&c.weight)));
        }
    }
}
