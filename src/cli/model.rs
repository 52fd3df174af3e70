//! `impasto model …` and the model flags every engine command shares (`--model`, `--convention`,
//! `--pooling`, `--no-normalize`, `--device`, `--precision`), applied over the profile's `[model]`.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, Subcommand};
use impasto::device::{DeviceChoice, PrecisionChoice};
use impasto::model::{self, Convention, ModelSettings, Pooling, fetch};

/// Model flags; each overrides the profile when given.
#[derive(Args, Debug, Clone, Default)]
pub struct ModelFlags {
    /// Weight file (.safetensors, .pth, .pt). Else IMPASTO_MODEL, the profile, then the fetched VGG-19.
    #[arg(long, value_name = "FILE")]
    pub model: Option<PathBuf>,
    /// Input convention of the weights, when the file does not state it: caffe or torchvision.
    #[arg(long)]
    pub convention: Option<Convention>,
    /// Pooling between blocks: avg (paper) or max.
    #[arg(long)]
    pub pooling: Option<Pooling>,
    /// Apply the paper's activation normalisation (unit mean activation per filter).
    #[arg(long, conflicts_with = "no_normalize")]
    pub normalize: bool,
    /// Skip the paper's activation normalisation.
    #[arg(long)]
    pub no_normalize: bool,
    /// Device: auto, cpu or cuda:N.
    #[arg(long)]
    pub device: Option<DeviceChoice>,
    /// Network precision: auto (bf16 where it is the faster on the device, else f32), f32, tf32 (TF32
    /// tensor cores on CUDA; f32 elsewhere) or bf16 (the image stays f32).
    #[arg(long)]
    pub precision: Option<PrecisionChoice>,
    /// Activation memory layout: channels-last (default) or channels-first.
    #[arg(long)]
    pub layout: Option<model::Layout>,
}

impl ModelFlags {
    /// The profile's model settings with these flags applied.
    pub fn apply(&self, mut settings: ModelSettings) -> ModelSettings {
        if let Some(path) = &self.model {
            settings.path = Some(path.clone());
        }
        if let Some(convention) = self.convention {
            settings.convention = Some(convention);
        }
        if let Some(pooling) = self.pooling {
            settings.pooling = pooling;
        }
        if self.normalize {
            settings.normalize = true;
        }
        if self.no_normalize {
            settings.normalize = false;
        }
        if let Some(device) = &self.device {
            settings.device = device.clone();
        }
        if let Some(precision) = self.precision {
            settings.precision = precision;
        }
        if let Some(layout) = self.layout {
            settings.layout = layout;
        }
        settings
    }
}

/// `impasto model`.
#[derive(Args, Debug)]
pub struct ModelArgs {
    #[command(subcommand)]
    command: ModelCommand,
}

#[derive(Subcommand, Debug)]
enum ModelCommand {
    /// Download the official VGG-19 weights, verify, convert and cache them.
    Fetch {
        /// Download from this address instead (a mirror).
        #[arg(long)]
        url: Option<String>,
        /// Expected SHA-256 (or a prefix) of the download from --url.
        #[arg(long, requires = "url")]
        sha256: Option<String>,
        /// Input convention of the weights at --url.
        #[arg(long, requires = "url")]
        convention: Option<Convention>,
        /// Where to write the converted weights (default: the cache).
        #[arg(long, short)]
        output: Option<PathBuf>,
    },
    /// Show which weights would be used and what they are.
    Info {
        #[command(flatten)]
        flags: ModelFlags,
    },
}

/// Runs `impasto model`.
pub fn run(args: ModelArgs) -> Result<()> {
    match args.command {
        ModelCommand::Fetch { url, sha256, convention, output } => {
            let mut source = fetch::torchvision_vgg19();
            if let Some(url) = url {
                source.url = url;
                source.sha256_prefix = sha256.unwrap_or_default();
                source.convention = convention.unwrap_or(Convention::Torchvision);
            }
            let destination = output.unwrap_or_else(fetch::cached_model_path);
            let bar = indicatif::ProgressBar::new(0);
            bar.set_style(
                indicatif::ProgressStyle::with_template("{bar:30} {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}")
                    .expect("valid template"),
            );
            let mut progress = |done: u64, total: Option<u64>| {
                if let Some(total) = total {
                    bar.set_length(total);
                }
                bar.set_position(done);
            };
            let path = fetch::fetch(&source, &destination, &mut progress);
            bar.finish_and_clear();
            println!("{}", path?.display());
            Ok(())
        }
        ModelCommand::Info { flags } => {
            let settings = flags.apply(ModelSettings::default());
            let path = model::resolve_weights(settings.path.as_deref())?;
            let loaded = model::weights::load(&path)?;
            let info = serde_json::json!({
                "path": path,
                "arch": loaded.arch.to_string(),
                "convention": loaded.convention.map(|c| c.to_string()),
                "convolutions": loaded.convs.len(),
            });
            println!("{}", serde_json::to_string_pretty(&info)?);
            Ok(())
        }
    }
}
