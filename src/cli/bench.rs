//! `impasto bench`: seconds per iteration at several sizes for the chosen device and precision, as
//! JSON lines (one per size). Uses the resolved weights, or random VGG weights with `--random`.

use anyhow::Result;
use clap::Args;
use impasto::model::{self, Arch, ModelSettings};

use super::image::StyleFlags;
use super::model::ModelFlags;

/// Arguments of `impasto bench`.
#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Sizes as WIDTHxHEIGHT or a square side, e.g. `128,256,512,1280x720`.
    #[arg(long, value_delimiter = ',', default_value = "128,256,512")]
    pub sizes: Vec<String>,
    /// Timed iterations per size.
    #[arg(long, default_value_t = 5)]
    pub iterations: usize,
    /// Untimed iterations first.
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    /// Use random weights of this architecture instead of a weight file.
    #[arg(long)]
    pub random: Option<Arch>,
    #[command(flatten)]
    pub style_flags: StyleFlags,
    #[command(flatten)]
    pub model_flags: ModelFlags,
}

fn parse_size(text: &str) -> Result<(u32, u32)> {
    let parsed = match text.split_once('x') {
        Some((w, h)) => (w.trim().parse()?, h.trim().parse()?),
        None => {
            let side = text.trim().parse()?;
            (side, side)
        }
    };
    Ok(parsed)
}

/// Runs `impasto bench`.
pub fn run(args: BenchArgs) -> Result<()> {
    let profile = args.style_flags.profile()?;
    let style = args.style_flags.apply(profile.style);
    let settings: ModelSettings = args.model_flags.apply(profile.model);
    let sizes = args.sizes.iter().map(|s| parse_size(s)).collect::<Result<Vec<_>>>()?;
    let device_name = settings.device.to_string();
    super::catch_torch(&device_name, || {
        let vgg = match args.random {
            Some(arch) => impasto::bench::random_vgg(arch, &settings, settings.device.resolve()?),
            None => model::load(&settings)?,
        };
        for (width, height) in &sizes {
            let row = impasto::bench::bench_size(&vgg, &style, *width, *height, args.warmup, args.iterations);
            println!("{}", serde_json::to_string(&row).expect("serialisable"));
        }
        Ok(())
    })?;
    Ok(())
}
