//! `impasto image CONTENT --style S [--style S2 …] -o OUT`: one still image, with a progress bar or
//! JSON lines, intermediate saves, and every setting from a profile with flags on top.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Args;
use impasto::model::LayerId;
use impasto::profile::Profile;
use impasto::style::color::ColorMode;
use impasto::style::optim::{OptimizerKind, PairPrecision};
use impasto::style::{Init, ScaleStep, StyleImage, StyleSettings, Stylizer};
use impasto::{Error, imageio};
use serde_json::json;

use super::model::ModelFlags;
use super::progress::Reporter;

/// Style flags; each overrides the profile when given.
#[derive(Args, Debug, Clone, Default)]
pub struct StyleFlags {
    /// Profile: a TOML file, or a name in ./config (e.g. `default`, `quick`).
    #[arg(long, short = 'p')]
    pub profile: Option<String>,
    #[command(flatten)]
    pub loss: LossFlags,
    /// Output long side in pixels.
    #[arg(long)]
    pub size: Option<u32>,
    /// Iterations.
    #[arg(long, short = 'n')]
    pub iterations: Option<u32>,
    /// Coarse-to-fine schedule, e.g. `256:300,512:100` (long side:iterations).
    #[arg(long, value_delimiter = ',', value_parser = parse_scale)]
    pub scales: Option<Vec<ScaleStep>>,
    /// Stop when the relative loss change stays below this (0 = never).
    #[arg(long)]
    pub tolerance: Option<f64>,
    /// Start from: content, noise or image.
    #[arg(long)]
    pub init: Option<Init>,
    /// Starting image (implies --init image).
    #[arg(long)]
    pub init_image: Option<PathBuf>,
    /// Seed for noise initialisation.
    #[arg(long)]
    pub seed: Option<u64>,
}

/// Loss and optimiser flags shared by `image` and `video`; each overrides the profile when given.
#[derive(Args, Debug, Clone, Default)]
pub struct LossFlags {
    /// Content-to-style ratio α/β.
    #[arg(long)]
    pub ratio: Option<f64>,
    /// Layer balance: distance (default), relative or paper.
    #[arg(long)]
    pub layer_balance: Option<impasto::style::LayerBalance>,
    /// Total-variation weight.
    #[arg(long)]
    pub tv_weight: Option<f64>,
    /// Content layers, e.g. `conv4_2`.
    #[arg(long, value_delimiter = ',')]
    pub content_layers: Option<Vec<LayerId>>,
    /// Style layers, e.g. `conv1_1,conv2_1,conv3_1,conv4_1,conv5_1`.
    #[arg(long, value_delimiter = ',')]
    pub style_layers: Option<Vec<LayerId>>,
    /// Weights of the style layers (same count).
    #[arg(long, value_delimiter = ',')]
    pub style_layer_weights: Option<Vec<f64>>,
    /// Optimiser: lbfgs or adam.
    #[arg(long)]
    pub optimizer: Option<OptimizerKind>,
    /// How L-BFGS stores its curvature pairs: auto (bf16 on the CPU), f32 or bf16 (half the memory).
    #[arg(long)]
    pub lbfgs_pairs: Option<PairPrecision>,
    /// Adam learning rate.
    #[arg(long)]
    pub learning_rate: Option<f64>,
    /// Style image size relative to the output.
    #[arg(long)]
    pub style_scale: Option<f64>,
    /// Blend weights of the style images, in order.
    #[arg(long, value_delimiter = ',')]
    pub style_blend: Option<Vec<f64>>,
    /// Colour: style, luminance (keep the content's colours) or histogram (match them).
    #[arg(long)]
    pub color: Option<ColorMode>,
    /// Tile side in pixels for frames too large for the device's memory (0 = no tiles).
    #[arg(long)]
    pub tile_size: Option<u32>,
    /// Overlap between tiles in pixels.
    #[arg(long)]
    pub tile_overlap: Option<u32>,
    /// Read the losses from the device every N iterations (0: every one on the CPU, every 5 on a GPU).
    #[arg(long, value_name = "N")]
    pub loss_read_interval: Option<u32>,
}

impl LossFlags {
    /// The profile's style settings with these flags applied.
    pub fn apply(&self, mut s: StyleSettings) -> StyleSettings {
        apply_flags!(self => s; ratio, layer_balance, tv_weight, content_layers, style_layers, style_layer_weights);
        apply_flags!(self => s; optimizer, lbfgs_pairs);
        apply_flags!(self => s; learning_rate, style_scale, style_blend, color, tile_size, tile_overlap);
        apply_flags!(self => s; loss_read_interval);
        s
    }
}

fn parse_scale(text: &str) -> Result<ScaleStep, String> {
    let (size, iterations) = text.split_once(':').ok_or("expected SIZE:ITERATIONS")?;
    Ok(ScaleStep {
        size: size.trim().parse().map_err(|_| format!("bad size '{size}'"))?,
        iterations: iterations.trim().parse().map_err(|_| format!("bad iteration count '{iterations}'"))?,
    })
}

impl StyleFlags {
    /// The profile named by `--profile` (or the built-in defaults).
    pub fn profile(&self) -> Result<Profile> {
        Ok(Profile::named_or_default(self.profile.as_deref())?)
    }

    /// The profile's style settings with these flags applied.
    pub fn apply(&self, mut s: StyleSettings) -> StyleSettings {
        apply_flags!(self => s; size, iterations, tolerance, init, seed, scales);
        let mut s = self.loss.apply(s);
        if let Some(path) = &self.init_image {
            s.init_image = Some(path.clone());
            s.init = Init::Image;
        }
        if (self.size.is_some() || self.iterations.is_some()) && self.scales.is_none() {
            s.scales.clear();
        }
        s
    }
}

/// Arguments of `impasto image`.
#[derive(Args, Debug)]
pub struct ImageArgs {
    /// The content photo.
    pub content: PathBuf,
    /// Style image(s); repeat for a blend.
    #[arg(long, short, required = true)]
    pub style: Vec<PathBuf>,
    /// Output image (.png, .jpg, …), written atomically.
    #[arg(long, short)]
    pub output: PathBuf,
    /// Save the current image every N iterations beside the output (`OUT-0100.png`).
    #[arg(long, value_name = "N")]
    pub save_every: Option<usize>,
    /// Progress as JSON lines on stdout.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub style_flags: StyleFlags,
    #[command(flatten)]
    pub model_flags: ModelFlags,
}

/// Runs `impasto image`.
pub fn run(args: ImageArgs) -> Result<()> {
    let profile = args.style_flags.profile()?;
    let settings = args.style_flags.apply(profile.style);
    let model_settings = args.model_flags.apply(profile.model);
    settings.validate()?;
    check_output(&args.output)?;
    let content = imageio::read_rgb(&args.content)?;
    let styles = args
        .style
        .iter()
        .map(|path| Ok(StyleImage { image: imageio::read_rgb(path)?, weight: 1.0 }))
        .collect::<impasto::Result<Vec<_>>>()?;
    let device = model_settings.device.to_string();
    super::catch_torch(&device, || {
        let vgg = impasto::model::load(&model_settings)?;
        let stylizer = Stylizer::new(&vgg, settings.clone())?;
        let total: usize = settings.schedule().iter().map(|s| s.iterations as usize).sum();
        let reporter = Reporter::new(total as u64, args.json, "it");
        let mut save_error = None;
        let result = stylizer.stylize(&content, &styles, &mut |progress| {
            let (done, total) = progress.iteration;
            let l = progress.losses;
            let message = format!("content {:.3e} style {:.3e} total {:.3e}", l.content, l.style, l.total);
            reporter.step(done as u64, total as u64, &message, json!({"losses": l, "scale": progress.scale.0}));
            if args.save_every.is_some_and(|n| n > 0 && done % n == 0) {
                let path = intermediate_path(&args.output, done);
                if let Err(e) = imageio::save_tensor(progress.image, &path) {
                    save_error.get_or_insert(e);
                }
            }
        })?;
        if let Some(e) = save_error {
            return Err(e);
        }
        imageio::save_tensor(&result.image, &args.output)?;
        reporter.finish(json!({"output": args.output, "iterations": result.iterations, "losses": result.losses}));
        Ok(())
    })
    .with_context(|| format!("stylizing '{}'", args.content.display()))
}

/// Fails early, before any work, when the output cannot be written.
fn check_output(output: &Path) -> impasto::Result<()> {
    image::ImageFormat::from_path(output)
        .map_err(|_| Error::image(output, "unknown output extension (use .png, .jpg, .webp, .bmp or .tiff)"))?;
    let dir = impasto::fsutil::folder_of(output);
    if !dir.is_dir() {
        return Err(Error::io(
            output,
            std::io::Error::new(std::io::ErrorKind::NotFound, "output directory does not exist"),
        ));
    }
    Ok(())
}

fn intermediate_path(output: &Path, iteration: usize) -> PathBuf {
    let stem = output.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let extension = output.extension().map(|e| e.to_string_lossy().into_owned()).unwrap_or_else(|| "png".into());
    output.with_file_name(format!("{stem}-{iteration:04}.{extension}"))
}
