//! `impasto bench`: seconds per iteration at several sizes for the chosen device and precision, as
//! JSON lines (one per size). Uses the resolved weights, or random VGG weights with `--random`. In
//! builds with FFmpeg, `--video CLIP` paints a real clip with the video job instead and prints one
//! JSON line: seconds per frame and the share of decode, flow, optimisation and encode; with
//! `--jobs N`, N copies of it at once, their frames in one shared batch as the daemon paints them.
//! Without a clip, `--jobs 1,4` times that many jobs painting synthetic frames at once, `--flow`
//! times the optical flow instead of the network, and `--optimizer` L-BFGS's proposals alone.

use anyhow::Result;
use clap::Args;
use impasto::bench::{BenchCase, FlowCase, JobsCase, MotionPlace, OptimizerCase, PaintingCase};
use impasto::model::{self, Arch, ModelSettings, Vgg};
use impasto::pipeline::VideoSettings;
use impasto::style::StyleSettings;

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
    /// Images optimised together per size, e.g. `1,4` (one forward and backward pass for a batch).
    #[arg(long, value_delimiter = ',', default_value = "1")]
    pub batch: Vec<usize>,
    /// Use random weights of this architecture instead of a weight file.
    #[arg(long)]
    pub random: Option<Arch>,
    /// Jobs painting at once, each on its own thread as the daemon's slots do, their frames in one
    /// shared batch, e.g. `1,4`: per size, `--frames` synthetic frames per job (with `--video`, one
    /// number: copies of the clip).
    #[arg(long, value_delimiter = ',', value_parser = clap::value_parser!(u32).range(1..=64))]
    pub jobs: Vec<u32>,
    /// With `--jobs`: each job optimises its frames in its own batch (as `shared_batch = false`).
    #[arg(long)]
    pub own_batches: bool,
    /// With `--jobs` (without `--video`): frames per job, each optimised `--iterations` times; with
    /// `--motion`: frames painted per size.
    #[arg(long, default_value_t = 4)]
    pub frames: usize,
    /// Time the optical flow into one frame (the profile's flow settings and `flow_threads`) instead
    /// of the network: per size, one JSON row with seconds per frame. Needs no weights.
    #[arg(long, conflicts_with_all = ["jobs", "random"])]
    pub flow: bool,
    /// Paint `--frames` synthetic moving frames per size as a video job does (flow mode, `--iterations`
    /// each), the optical flow into each measured `ahead` on its own thread or `inline` before it,
    /// e.g. `inline,ahead`: one JSON row each, seconds per frame after the first.
    #[arg(long, value_delimiter = ',', conflicts_with_all = ["jobs", "flow"])]
    pub motion: Vec<MotionPlace>,
    /// Time L-BFGS's proposals with a full memory (the profile's `lbfgs_history` pairs, fewer where
    /// `lbfgs_memory_mib` binds) instead of the network: per size and batch, one JSON row with
    /// seconds per proposal. Needs no weights.
    #[arg(long, conflicts_with_all = ["jobs", "random", "flow", "motion"])]
    pub optimizer: bool,
    /// With `--flow`: flows measured at once, each on its own thread (as that many segments' motion
    /// stages), e.g. `1,2,4`.
    #[arg(long, value_delimiter = ',', default_value = "1", requires = "flow",
          value_parser = clap::value_parser!(u32).range(1..=64))]
    pub at_once: Vec<u32>,
    #[cfg(feature = "media")]
    #[command(flatten)]
    pub video_flags: video::VideoBenchFlags,
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
    #[cfg(feature = "media")]
    if let Some(clip) = &args.video_flags.video {
        if args.optimizer {
            anyhow::bail!("--optimizer times L-BFGS alone; it takes no --video");
        }
        return video::run(clip, &args);
    }
    let profile = args.style_flags.profile()?;
    let style = args.style_flags.apply(profile.style);
    let settings: ModelSettings = args.model_flags.apply(profile.model);
    let sizes = args.sizes.iter().map(|s| parse_size(s)).collect::<Result<Vec<_>>>()?;
    if args.batch.contains(&0) {
        anyhow::bail!("--batch: a batch holds at least one image");
    }
    let device_name = settings.device.to_string();
    if args.flow {
        super::catch_torch(&device_name, || bench_flow(&profile.video, &settings, &sizes, &args))?;
        return Ok(());
    }
    if args.optimizer {
        super::catch_torch(&device_name, || bench_optimizer(&style, &settings, &sizes, &args))?;
        return Ok(());
    }
    super::catch_torch(&device_name, || {
        let vgg = network(args.random, &settings)?;
        if !args.jobs.is_empty() {
            return bench_jobs(&vgg, &style, &sizes, &args);
        }
        if !args.motion.is_empty() {
            return bench_painting(&vgg, &style, &profile.video, &sizes, &args);
        }
        print_rows(&sizes, &args.batch, |width, height, batch| {
            let case = BenchCase { width, height, batch, warmup: args.warmup, iterations: args.iterations };
            Ok(impasto::bench::bench_size(&vgg, &style, case))
        })
    })?;
    Ok(())
}

/// Prints one JSON row per size and variant (batch, jobs, …), each from `measure(width, height, variant)`.
fn print_rows<V: Copy, R: serde::Serialize>(
    sizes: &[(u32, u32)],
    variants: &[V],
    mut measure: impl FnMut(u32, u32, V) -> impasto::Result<R>,
) -> impasto::Result<()> {
    for &(width, height) in sizes {
        for &variant in variants {
            let row = measure(width, height, variant)?;
            println!("{}", serde_json::to_string(&row).expect("serialisable"));
        }
    }
    Ok(())
}

/// `impasto bench --jobs N,…`: per size and number of jobs, one JSON row of several jobs painting
/// synthetic frames at once.
fn bench_jobs(vgg: &Vgg, style: &StyleSettings, sizes: &[(u32, u32)], args: &BenchArgs) -> impasto::Result<()> {
    print_rows(sizes, &args.jobs, |width, height, jobs| {
        let case = JobsCase {
            width,
            height,
            jobs: jobs as usize,
            frames: args.frames.max(1),
            iterations: args.iterations.max(1),
            shared: !args.own_batches,
        };
        impasto::bench::bench_jobs(vgg, style, case)
    })
}

/// `impasto bench --motion ahead,inline`: per size and place, one JSON row of synthetic frames painted
/// as a video job paints them.
fn bench_painting(
    vgg: &Vgg,
    style: &StyleSettings,
    video: &VideoSettings,
    sizes: &[(u32, u32)],
    args: &BenchArgs,
) -> impasto::Result<()> {
    print_rows(sizes, &args.motion, |width, height, motion| {
        let case = PaintingCase { width, height, frames: args.frames, iterations: args.iterations, motion };
        impasto::bench::bench_painting(vgg, style, video, case)
    })
}

/// `impasto bench --flow`: per size and number at once, one JSON row timing the motion into a frame.
fn bench_flow(
    video: &VideoSettings,
    settings: &ModelSettings,
    sizes: &[(u32, u32)],
    args: &BenchArgs,
) -> impasto::Result<()> {
    let device = settings.device.resolve()?;
    let (warmup, iterations, threads) = (args.warmup, args.iterations, video.flow_threads);
    print_rows(sizes, &args.at_once, |width, height, at_once| {
        let case = FlowCase { width, height, warmup, iterations, threads, at_once: at_once as usize };
        impasto::bench::bench_flow(&video.flow, device, case)
    })
}

/// `impasto bench --optimizer`: per size and batch, one JSON row timing L-BFGS's proposals.
fn bench_optimizer(
    style: &StyleSettings,
    settings: &ModelSettings,
    sizes: &[(u32, u32)],
    args: &BenchArgs,
) -> impasto::Result<()> {
    let device = settings.device.resolve()?;
    print_rows(sizes, &args.batch, |width, height, batch| {
        let case = OptimizerCase {
            width,
            height,
            batch,
            history: style.lbfgs_history,
            memory_limit_mib: style.lbfgs_memory_mib,
            pair_precision: style.lbfgs_pairs,
            warmup: args.warmup,
            iterations: args.iterations,
        };
        Ok(impasto::bench::bench_optimizer(device, case))
    })
}

/// Random weights of `random`'s architecture, else the weights the settings resolve to.
fn network(random: Option<Arch>, settings: &ModelSettings) -> impasto::Result<Vgg> {
    match random {
        Some(arch) => impasto::bench::random_vgg(arch, settings, settings.device.resolve()?),
        None => model::load(settings),
    }
}

/// `impasto bench --video CLIP`: the real video job, timed end to end.
#[cfg(feature = "media")]
mod video {
    use std::path::{Path, PathBuf};

    use anyhow::{Context, Result};
    use std::time::Instant;

    use clap::Args;
    use impasto::bench::{VideoBenchRow, run_at_once};
    use impasto::model::Vgg;
    use impasto::pipeline::{PreparedJob, Report, VideoJob, VideoSettings};
    use impasto::style::{SharedBatch, StyleImage};

    use super::BenchArgs;

    /// Style image used when `--style` is not given (relative to the working directory).
    const DEFAULT_STYLE: &str = "samples/images/starry_night.jpg";

    /// Flags of the video run. The profile gives every other setting; `--size` sets the working long
    /// side and `--tolerance` the later frames' early stop.
    #[derive(Args, Debug, Clone, Default)]
    pub struct VideoBenchFlags {
        /// Paint this clip with the real video job (decode, flow, optimise, encode) and print seconds
        /// per frame and each stage's share, instead of timing iterations.
        #[arg(long, value_name = "CLIP")]
        pub video: Option<PathBuf>,
        /// Style image of the video run [default: samples/images/starry_night.jpg].
        #[arg(long, requires = "video")]
        pub style: Option<PathBuf>,
        /// Iterations of each shot's first frame in the video run (default: the profile's).
        #[arg(long, requires = "video")]
        pub first_iterations: Option<u32>,
        /// Most iterations of the later frames in the video run (default: the profile's).
        #[arg(long, requires = "video")]
        pub later_iterations: Option<u32>,
        /// Runs of consecutive frames painted side by side in the video run (default: the profile's).
        #[arg(long, requires = "video")]
        pub segments: Option<u32>,
        /// Whether later frames of the video run begin L-BFGS with the curvature of the frame before:
        /// true or false (default: the profile's).
        #[arg(long, requires = "video", value_name = "BOOL")]
        pub carry_curvature: Option<bool>,
    }

    /// Paints the clip into a scratch directory (removed afterwards) and prints one JSON line.
    pub fn run(clip: &Path, args: &BenchArgs) -> Result<()> {
        let profile = args.style_flags.profile()?;
        let style = args.style_flags.loss.apply(profile.style);
        let video = video_settings(args, profile.video);
        let model_settings = args.model_flags.apply(profile.model);
        style.validate()?;
        video.validate()?;
        let style_path = args.video_flags.style.clone().unwrap_or_else(|| PathBuf::from(DEFAULT_STYLE));
        let styles = vec![StyleImage { image: impasto::imageio::read_rgb(&style_path)?, weight: 1.0 }];
        let model_identity = match args.random {
            Some(arch) => serde_json::json!({ "random": arch.to_string() }),
            None => impasto::model::identity(&model_settings)?,
        };
        let scratch = scratch_dir()?;
        let job = |k: u32| VideoJob {
            input: clip.to_path_buf(),
            output: scratch.join(format!("painted-{k}.mp4")),
            styles: styles.clone(),
            style: style.clone(),
            video: video.clone(),
            model_identity: model_identity.clone(),
            measure_warping: false,
        };
        let device = model_settings.device.to_string();
        let jobs = match args.jobs.as_slice() {
            [] => 1,
            [jobs] => *jobs,
            _ => anyhow::bail!("--jobs: one number with --video (copies of the clip painted at once)"),
        };
        let lanes = jobs as usize * video.segments as usize;
        // `--jobs 1` too: one job in a shared batch, as the daemon's only job on a device paints
        let batch = (!args.jobs.is_empty() && !args.own_batches).then(|| SharedBatch::new(lanes));
        let result = (0..jobs).map(|k| job(k).prepare()).collect::<impasto::Result<Vec<_>>>().and_then(|jobs| {
            super::super::catch_torch(&device, || {
                let vgg = super::network(args.random, &model_settings)?;
                let started = Instant::now();
                let reports = run_jobs(jobs, &vgg, batch.as_ref(), &model_identity.to_string())?;
                let stats = batch.as_ref().map(SharedBatch::stats);
                Ok(VideoBenchRow::of_jobs(&reports, started.elapsed().as_secs_f64(), &vgg, stats))
            })
        });
        let _ = std::fs::remove_dir_all(&scratch);
        let row = result.with_context(|| format!("painting '{}'", clip.display()))?;
        println!("{}", serde_json::to_string(&row).expect("serialisable"));
        Ok(())
    }

    /// Runs the prepared jobs at once, each on its own thread, in `batch` (which knows `vgg` as
    /// `model`) or each in its own; their reports in order.
    fn run_jobs(
        jobs: Vec<PreparedJob>,
        vgg: &Vgg,
        batch: Option<&SharedBatch>,
        model: &str,
    ) -> impasto::Result<Vec<Report>> {
        run_at_once(jobs, vgg, batch.map(|batch| (batch, model)), |job, vgg, batch| match batch {
            Some(batch) => job.run_shared(vgg, batch, &mut |_event| {}),
            None => job.run(vgg, &mut |_event| {}),
        })
    }

    /// The profile's video settings with the bench's flags on top.
    fn video_settings(args: &BenchArgs, mut video: VideoSettings) -> VideoSettings {
        if let Some(size) = args.style_flags.size {
            video.size = size;
        }
        if let Some(tolerance) = args.style_flags.tolerance {
            video.tolerance = tolerance;
        }
        if let Some(iterations) = args.video_flags.first_iterations {
            video.first_iterations = iterations;
        }
        if let Some(iterations) = args.video_flags.later_iterations {
            video.iterations = iterations;
        }
        if let Some(segments) = args.video_flags.segments {
            video.segments = segments;
        }
        if let Some(carry) = args.video_flags.carry_curvature {
            video.carry_curvature = carry;
        }
        video
    }

    /// A fresh, empty directory for the painted clip and the job's checkpoints (an old one of the same
    /// name would make the job resume instead of paint).
    fn scratch_dir() -> impasto::Result<PathBuf> {
        let dir = std::env::temp_dir().join(format!("impasto-bench-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| impasto::Error::io(&dir, e))?;
        Ok(dir)
    }
}
