//! `impasto eval IN OUT [--report FILE]`: how steady a painted video is, whatever made it. Prints the
//! mean warping error E_warp (Lai et al. 2018) of OUT along IN's optical flow, and writes every frame
//! pair's value to a JSON report on request.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use impasto::device::DeviceChoice;
use impasto::pipeline::{self, report::write_json};

/// Arguments of `impasto eval`.
#[derive(Args, Debug)]
pub struct EvalArgs {
    /// The input video.
    pub input: PathBuf,
    /// The painted video made from it (same frames, any size with the same shape).
    pub output: PathBuf,
    /// Write every frame pair's E_warp as JSON.
    #[arg(long, value_name = "FILE")]
    pub report: Option<PathBuf>,
    /// Long side both videos are compared at (default: the output's).
    #[arg(long)]
    pub size: Option<u32>,
    /// Profile whose `[video.flow]` table sets the flow solver.
    #[arg(long, short = 'p')]
    pub profile: Option<String>,
    /// Device for the flow: auto, cpu or cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: DeviceChoice,
    /// Print the result as JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

/// Runs `impasto eval`.
pub fn run(args: EvalArgs) -> Result<()> {
    let profile = impasto::profile::Profile::named_or_default(args.profile.as_deref())?;
    let device = args.device.resolve()?;
    if device == tch::Device::Cpu && profile.video.flow_threads > 0 {
        tch::set_num_threads(profile.video.flow_threads as i32);
    }
    let evaluation = super::catch_torch(&args.device.to_string(), || {
        pipeline::evaluate(&args.input, &args.output, args.size, &profile.video.flow, device)
    })
    .with_context(|| format!("evaluating '{}' against '{}'", args.output.display(), args.input.display()))?;
    if let Some(path) = &args.report {
        write_json(path, &evaluation)?;
    }
    if args.json {
        println!("{}", serde_json::to_string(&evaluation)?);
        return Ok(());
    }
    let cuts = evaluation.pairs.iter().filter(|p| p.scene_cut).count();
    match evaluation.warping_error.mean {
        Some(mean) => println!(
            "E_warp {mean:.6} over {} frame pairs ({cuts} scene cuts left out) at {}×{}",
            evaluation.warping_error.pairs, evaluation.working_size.0, evaluation.working_size.1
        ),
        None => println!("E_warp: no frame pair to measure ({} frames, {cuts} scene cuts)", evaluation.frame_count),
    }
    Ok(())
}
