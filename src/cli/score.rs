//! `impasto score CONTENT STYLE OUTPUT`: style and content distances of an output, measured with
//! the plain network (max pooling, no normalisation) whatever produced it.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use impasto::model::{self, ModelSettings, Pooling};
use impasto::{imageio, style::score};

use super::model::ModelFlags;

/// Arguments of `impasto score`.
#[derive(Args, Debug)]
pub struct ScoreArgs {
    /// The content photo.
    pub content: PathBuf,
    /// The style image.
    pub style: PathBuf,
    /// The stylized output.
    pub output: PathBuf,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub model_flags: ModelFlags,
}

/// Runs `impasto score`.
pub fn run(args: ScoreArgs) -> Result<()> {
    let content = imageio::read_rgb(&args.content)?;
    let style = imageio::read_rgb(&args.style)?;
    let output = imageio::read_rgb(&args.output)?;
    let mut settings = args.model_flags.apply(ModelSettings::default());
    settings.pooling = Pooling::Max;
    settings.normalize = false;
    let device = settings.device.to_string();
    let result = super::catch_torch(&device, || {
        let vgg = model::load(&settings)?;
        Ok(score::score(&vgg, &content, &style, &output))
    })?;
    if args.json {
        println!("{}", serde_json::to_string(&result)?);
    } else {
        println!("style {:.4}  content {:.4}", result.style, result.content);
        for (layer, distance) in &result.style_layers {
            println!("  {layer}: {distance:.4}");
        }
    }
    Ok(())
}
