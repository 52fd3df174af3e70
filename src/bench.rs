//! `impasto bench`: seconds per optimisation iteration (forward + backward through the network,
//! losses, optimiser step) and per forward pass at given sizes, with achieved TFLOP/s against the
//! convolutions' FLOP count and the peak memory (resident; on CUDA the caching allocator's peaks and
//! the device memory in use).
//! Engine-only, so it runs where only libtorch is. [`bench_jobs`] times several jobs' frames on one
//! device, in one shared batch or each in its own. [`bench_flow`] times the optical flow into one
//! frame (the motion a video job measures beside the painting), and [`bench_painting`] paints
//! synthetic moving frames with that motion measured ahead or inline. [`bench_optimizer`] times
//! L-BFGS's proposals with a full memory alone. [`VideoBenchRow`] sums up a real
//! video job's report (end-to-end seconds per frame and each stage's share) for `impasto bench --video`.

use std::time::Instant;

mod optimizer;
mod painting;

pub use optimizer::{OptimizerBenchRow, OptimizerCase, bench_optimizer};
pub use painting::{MotionPlace, PaintingBenchRow, PaintingCase, bench_painting};

use image::RgbImage;
use serde::Serialize;
use tch::{Device, Kind, Tensor};

use crate::device::{device_name, memory, threads};
use crate::error::{Result, panic_error};
use crate::flow::FlowSettings;
use crate::model::{LayerId, Vgg};
use crate::pipeline::{FrameSeconds, Report};
use crate::style::{BatchItem, SharedBatch, SharedBatchStats, StyleImage, StyleSettings, Stylizer, Targets};

/// One measured size.
#[derive(Clone, Debug, Serialize)]
pub struct BenchRow {
    /// Width × height in pixels.
    pub width: i64,
    /// Height in pixels.
    pub height: i64,
    /// Device the network ran on.
    pub device: String,
    /// Network precision as it ran (`tf32 (f32 on cpu)` off CUDA).
    pub precision: String,
    /// Network architecture.
    pub arch: String,
    /// Activation memory layout.
    pub layout: String,
    /// Images optimised together in one batch (one forward and backward pass for all).
    pub batch: usize,
    /// Mean seconds per full iteration of the whole batch (forward, backward, losses, optimiser step).
    pub seconds_per_iteration: f64,
    /// `seconds_per_iteration` / `batch`: the cost of one image's iteration.
    pub seconds_per_image_iteration: f64,
    /// Iterations between two reads of the losses (each read waits for the device).
    pub loss_read_interval: usize,
    /// Mean seconds per forward pass of the whole batch alone (no gradient).
    pub seconds_per_forward: f64,
    /// Convolution FLOPs of one iteration of the whole batch (forward + input-gradient backward ≈ 2 × forward).
    pub gflop_per_iteration: f64,
    /// Achieved TFLOP/s over a full iteration.
    pub tflops: f64,
    /// Peak resident memory of the process so far, MiB.
    pub peak_rss_mib: f64,
    /// On CUDA: device memory in use after the run, MiB (includes the caching allocator's reserve and
    /// the CUDA context, so it bounds this process's peak from above); `None` on the CPU or when the
    /// CUDA runtime cannot tell.
    pub cuda_peak_mib: Option<f64>,
    /// On CUDA: the most libtorch's caching allocator held in tensors during this row's run, MiB
    /// (the "max allocated" of `torch.cuda`); `None` on the CPU.
    pub cuda_max_allocated_mib: Option<f64>,
    /// On CUDA: the most the caching allocator reserved from the driver during this row's run, MiB.
    pub cuda_max_reserved_mib: Option<f64>,
    /// Iterations timed.
    pub iterations: usize,
    /// Tile side (0: the whole image at once); tiled iterations do more work than the nominal FLOPs.
    pub tile_size: u32,
    /// libtorch's CPU threads during the run.
    pub threads: i32,
}

/// Forward FLOPs of the convolutions up to and including `deepest` at `width` × `height`.
pub fn forward_flops(vgg: &Vgg, deepest: LayerId, width: i64, height: i64) -> f64 {
    let mut flops = 0.0;
    for conv in vgg.convs() {
        let scale = 1i64 << (conv.layer.block - 1);
        let positions = ((width / scale) * (height / scale)) as f64;
        let size = conv.weight.size();
        flops += 2.0 * positions * (size[0] * size[1] * size[2] * size[3]) as f64;
        if conv.layer == deepest {
            break;
        }
    }
    flops
}

/// The layers `settings`' losses read.
fn loss_layers(settings: &StyleSettings) -> Vec<LayerId> {
    settings.content_layers.iter().chain(&settings.style_layers).copied().collect()
}

/// Convolution FLOPs of one image's iteration at `width` × `height`: forward up to the deepest layer
/// `settings`' losses read, and the input-gradient backward (≈ 2 × forward).
fn iteration_flops(vgg: &Vgg, settings: &StyleSettings, width: i64, height: i64) -> f64 {
    let deepest = *loss_layers(settings).iter().max().expect("the settings name loss layers");
    2.0 * forward_flops(vgg, deepest, width, height)
}

/// Peak resident set size of this process in MiB (Linux; 0 elsewhere).
pub fn peak_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

fn synthetic_image(width: u32, height: u32, seed: u32) -> RgbImage {
    RgbImage::from_fn(width, height, |x, y| {
        let v = x.wrapping_mul(2_654_435_761).wrapping_add(y.wrapping_mul(40_503)).wrapping_add(seed.wrapping_mul(97));
        image::Rgb([(v >> 3) as u8, (v >> 11) as u8, ((x + y) % 256) as u8])
    })
}

fn synchronize(device: Device) {
    if let Device::Cuda(index) = device {
        tch::Cuda::synchronize(index as i64);
    }
}

/// Where and how much to time the optical flow: frames of `width` × `height`, `iterations` timed
/// after `warmup` on each of `at_once` threads, with `threads` libtorch threads each on the CPU (0:
/// the process's).
#[derive(Clone, Copy, Debug)]
pub struct FlowCase {
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// Untimed measurements first.
    pub warmup: usize,
    /// Timed measurements.
    pub iterations: usize,
    /// libtorch threads on the CPU (0: the process's).
    pub threads: usize,
    /// Flows measured at once, each on its own thread.
    pub at_once: usize,
}

/// The optical flow at one size.
#[derive(Clone, Debug, Serialize)]
pub struct FlowBenchRow {
    /// Width in pixels.
    pub width: i64,
    /// Height in pixels.
    pub height: i64,
    /// Device the flow ran on.
    pub device: String,
    /// libtorch threads on the CPU (0: the process's, or not on the CPU).
    pub threads: usize,
    /// Flows measured at once, each on its own thread (as that many segments' motion stages).
    pub at_once: usize,
    /// Most pyramid levels.
    pub levels: usize,
    /// Warps per level.
    pub warps: usize,
    /// Primal–dual iterations per warp.
    pub solver_iterations: usize,
    /// Seconds for the motion into one frame — the flow both ways, the reliability mask and the
    /// scene-cut test, as a video job measures it —: the wall time over the frames of all threads.
    pub seconds_per_motion: f64,
    /// Peak resident memory of the process so far, MiB.
    pub peak_rss_mib: f64,
    /// On CUDA: the most the caching allocator held in tensors since the process started, MiB.
    pub cuda_max_allocated_mib: Option<f64>,
}

/// Times the motion between two synthetic frames (the second the first moved 3 pixels right and 1
/// down) with `settings` on `device`, on `case.at_once` threads at once (as that many segments'
/// motion stages run); the seconds per frame are the wall time over all their frames.
pub fn bench_flow(settings: &FlowSettings, device: Device, case: FlowCase) -> Result<FlowBenchRow> {
    let first = crate::imageio::rgb_to_tensor(&synthetic_image(case.width, case.height, 1)).to_device(device);
    let second = first.roll([3, 1], [3, 2]);
    let (threads, iterations) = (case.at_once.max(1), case.iterations.max(1));
    let ready = std::sync::Barrier::new(threads + 1);
    let wall_seconds = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                let (first, second, ready) = (first.shallow_clone(), second.shallow_clone(), &ready);
                scope.spawn(move || -> Result<()> {
                    let measure = || crate::pipeline::motion::measure(0, &first, &second, settings, case.threads);
                    let warmed = (0..case.warmup).try_for_each(|_| measure().map(drop));
                    synchronize(device);
                    ready.wait();
                    warmed?;
                    (0..iterations).try_for_each(|_| measure().map(drop))
                })
            })
            .collect();
        ready.wait();
        let started = Instant::now();
        for worker in workers {
            worker.join().map_err(|payload| panic_error("flow", payload.as_ref()))??;
        }
        synchronize(device);
        Ok::<f64, crate::error::Error>(started.elapsed().as_secs_f64())
    })?;
    Ok(FlowBenchRow {
        width: case.width as i64,
        height: case.height as i64,
        device: device_name(device),
        threads: if device == Device::Cpu { case.threads } else { 0 },
        at_once: threads,
        levels: settings.levels,
        warps: settings.warps,
        solver_iterations: settings.iterations,
        seconds_per_motion: wall_seconds / (threads * iterations) as f64,
        peak_rss_mib: peak_rss_mib(),
        cuda_max_allocated_mib: memory::allocator_peaks_mib(device).map(|(allocated, _)| allocated),
    })
}

/// Where and how much to time: `batch` images of `width` × `height` optimised together,
/// `iterations` timed after `warmup`.
#[derive(Clone, Copy, Debug)]
pub struct BenchCase {
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// Images per batch.
    pub batch: usize,
    /// Untimed iterations first.
    pub warmup: usize,
    /// Timed iterations.
    pub iterations: usize,
}

/// Times one [`BenchCase`] with `settings`' layers (each image of the batch its own content).
pub fn bench_size(vgg: &Vgg, settings: &StyleSettings, case: BenchCase) -> BenchRow {
    let BenchCase { width, height, batch, warmup, iterations } = case;
    let batch = batch.max(1);
    memory::reset_allocator_peaks(vgg.device());
    let mut settings = settings.clone();
    settings.tolerance = 0.0;
    let stylizer = Stylizer::new(vgg, settings.clone()).expect("bench settings are valid");
    let style = StyleImage { image: synthetic_image(width, height, 2), weight: 1.0 };
    let style_targets = stylizer.style_targets(&[style], width.max(height));
    let contents: Vec<Tensor> = (0..batch as u32)
        .map(|item| {
            crate::imageio::rgb_to_tensor(&synthetic_image(width, height, 1 + 2 * item)).to_device(vgg.device())
        })
        .collect();
    let targets: Vec<Targets> = contents
        .iter()
        .map(|content| Targets {
            content: stylizer.content_targets(content),
            style: style_targets.iter().map(Tensor::shallow_clone).collect(),
            temporal: None,
        })
        .collect();
    let run = |planned: usize| {
        let items: Vec<BatchItem> = targets
            .iter()
            .zip(&contents)
            .map(|(targets, start)| BatchItem {
                targets: targets.shallow_clone(),
                start: start.shallow_clone(),
                iterations: planned,
                stopping: stylizer.stopping(),
                chain: None,
            })
            .collect();
        let _ = stylizer.optimise_batch(items, &mut |_, _, _, _| {});
        synchronize(vgg.device());
    };
    run(warmup);
    let started = Instant::now();
    run(iterations);
    let seconds_per_iteration = started.elapsed().as_secs_f64() / iterations as f64;
    let content = Tensor::cat(&contents, 0);

    let layers = loss_layers(&settings);
    let seconds_per_forward = {
        let _guard = tch::no_grad_guard();
        let windows = forward_windows(&content, &settings);
        let forward = || windows.iter().for_each(|window| drop(vgg.features(window, &layers)));
        forward();
        synchronize(vgg.device());
        let started = Instant::now();
        for _ in 0..iterations {
            forward();
        }
        synchronize(vgg.device());
        started.elapsed().as_secs_f64() / iterations as f64
    };
    let (h, w) = (content.size()[2], content.size()[3]);
    let allocator_peaks = memory::allocator_peaks_mib(vgg.device());
    let flops = iteration_flops(vgg, &settings, w, h) * batch as f64;
    BenchRow {
        batch,
        seconds_per_image_iteration: seconds_per_iteration / batch as f64,
        loss_read_interval: settings.loss_read_interval_on(vgg.device()),
        width: w,
        height: h,
        device: device_name(vgg.device()),
        precision: vgg.precision().label_on(vgg.device()),
        arch: vgg.arch().to_string(),
        layout: format!("{:?}", vgg.layout()),
        seconds_per_iteration,
        seconds_per_forward,
        gflop_per_iteration: flops / 1e9,
        tflops: flops / seconds_per_iteration / 1e12,
        peak_rss_mib: peak_rss_mib(),
        cuda_peak_mib: memory::in_use_mib(vgg.device()),
        cuda_max_allocated_mib: allocator_peaks.map(|(allocated, _)| allocated),
        cuda_max_reserved_mib: allocator_peaks.map(|(_, reserved)| reserved),
        iterations,
        tile_size: settings.tile_size,
        threads: tch::get_num_threads(),
    }
}

/// Several jobs painting frames at once on one device: `jobs` threads, each with `frames` frames of
/// `width` × `height` optimised `iterations` times one after the other, in one shared batch or
/// (`shared` false) each in its own.
#[derive(Clone, Copy, Debug)]
pub struct JobsCase {
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// Jobs at once.
    pub jobs: usize,
    /// Frames per job.
    pub frames: usize,
    /// Iterations per frame (no early stop).
    pub iterations: usize,
    /// One shared batch for all jobs, or one batch per job.
    pub shared: bool,
}

/// One measured [`JobsCase`].
#[derive(Clone, Debug, Serialize)]
pub struct JobsBenchRow {
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// Device the network ran on.
    pub device: String,
    /// Network precision as it ran.
    pub precision: String,
    /// Activation memory layout.
    pub layout: String,
    /// Jobs at once.
    pub jobs: usize,
    /// Whether their frames shared one batch.
    pub shared_batch: bool,
    /// Frames per job.
    pub frames_per_job: usize,
    /// Iterations per frame.
    pub iterations_per_frame: usize,
    /// Wall seconds over all frames' iterations: the cost of one frame's iteration.
    pub seconds_per_image_iteration: f64,
    /// Achieved TFLOP/s over the run.
    pub tflops: f64,
    /// In a shared batch: the most frames it held at once.
    pub most_together: Option<u64>,
    /// Wall seconds of the timed run.
    pub wall_seconds: f64,
    /// Peak resident memory of the process so far, MiB.
    pub peak_rss_mib: f64,
    /// On CUDA: the most the caching allocator held in tensors during the run, MiB.
    pub cuda_max_allocated_mib: Option<f64>,
    /// libtorch's CPU threads during the run.
    pub threads: i32,
}

/// One job's frames, one after another, as a feed for one lane.
struct FrameQueue {
    frames: std::collections::VecDeque<BatchItem>,
}

impl crate::style::BatchFeed for FrameQueue {
    fn next(&mut self, _: usize) -> Option<BatchItem> {
        self.frames.pop_front()
    }
    fn finished(&mut self, _: usize, _: crate::style::Optimised) {}
    fn iteration(&mut self, _: usize, _: usize, _: crate::style::Losses, _: &Tensor) {}
}

/// Times one [`JobsCase`] with `settings`' layers (after an untimed run of one frame per job).
pub fn bench_jobs(vgg: &Vgg, settings: &StyleSettings, case: JobsCase) -> Result<JobsBenchRow> {
    let mut settings = settings.clone();
    settings.tolerance = 0.0;
    let stylizer = Stylizer::new(vgg, settings.clone())?;
    let style = StyleImage { image: synthetic_image(case.width, case.height, 2), weight: 1.0 };
    let style_targets = stylizer.style_targets(&[style], case.width.max(case.height));
    let frame = |seed: u32| {
        let content =
            crate::imageio::rgb_to_tensor(&synthetic_image(case.width, case.height, seed)).to_device(vgg.device());
        let style = style_targets.iter().map(Tensor::shallow_clone).collect();
        let targets = Targets { content: stylizer.content_targets(&content), style, temporal: None };
        BatchItem { targets, start: content, iterations: case.iterations, stopping: stylizer.stopping(), chain: None }
    };
    let queues = |frames: usize| -> Vec<FrameQueue> {
        (0..case.jobs)
            .map(|job| FrameQueue { frames: (0..frames).map(|f| frame((job * frames + f) as u32 + 1)).collect() })
            .collect()
    };
    let warm = queues(1);
    run_jobs(vgg, &settings, warm, case.shared)?;
    synchronize(vgg.device());
    memory::reset_allocator_peaks(vgg.device());
    let timed = queues(case.frames);
    let started = Instant::now();
    let most_together = run_jobs(vgg, &settings, timed, case.shared)?;
    synchronize(vgg.device());
    let wall_seconds = started.elapsed().as_secs_f64();
    let image_iterations = (case.jobs * case.frames * case.iterations).max(1) as f64;
    let flops = iteration_flops(vgg, &settings, case.width as i64, case.height as i64) * image_iterations;
    Ok(JobsBenchRow {
        width: case.width,
        height: case.height,
        device: device_name(vgg.device()),
        precision: vgg.precision().label_on(vgg.device()),
        layout: format!("{:?}", vgg.layout()),
        jobs: case.jobs,
        shared_batch: case.shared,
        frames_per_job: case.frames,
        iterations_per_frame: case.iterations,
        seconds_per_image_iteration: wall_seconds / image_iterations,
        tflops: flops / wall_seconds / 1e12,
        most_together,
        wall_seconds,
        peak_rss_mib: peak_rss_mib(),
        cuda_max_allocated_mib: memory::allocator_peaks_mib(vgg.device()).map(|(allocated, _)| allocated),
        threads: tch::get_num_threads(),
    })
}

/// The name the benchmark's shared batch knows its network by.
const BENCH_MODEL: &str = "bench";

/// Runs each queue on its own thread, in one shared batch (returning the most frames it held at
/// once) or each in its own.
fn run_jobs(vgg: &Vgg, settings: &StyleSettings, queues: Vec<FrameQueue>, shared: bool) -> Result<Option<u64>> {
    let batch = shared.then(|| SharedBatch::new(queues.len()));
    run_at_once(queues, vgg, batch.as_ref().map(|batch| (batch, BENCH_MODEL)), |mut queue, vgg, batch| match batch {
        Some(batch) => batch.optimise(BENCH_MODEL, settings, 1, &mut queue),
        None => Stylizer::new(vgg, settings.clone()).map(|stylizer| stylizer.optimise_refilled(1, &mut queue)),
    })?;
    Ok(batch.map(|batch| batch.stats().most_together))
}

/// Runs `jobs` at once, each on its own thread with its own handle on `vgg`: in `batch` (whose
/// runner knows `vgg` by the name given with it, and starts once every job has handed in a frame, so
/// that they all start together) or, without one, each in its own batch. The results in the jobs'
/// order; a job that panics gives its error.
pub fn run_at_once<J: Send, T: Send>(
    jobs: Vec<J>,
    vgg: &Vgg,
    batch: Option<(&SharedBatch, &str)>,
    run: impl Fn(J, &Vgg, Option<&SharedBatch>) -> Result<T> + Sync,
) -> Result<Vec<T>> {
    let count = jobs.len();
    let run = &run;
    // the calling thread only waits from here on; its parked OpenMP workers would slow the painting
    threads::release_this_thread();
    std::thread::scope(|scope| {
        let threads: Vec<_> = jobs
            .into_iter()
            .map(|job| {
                let (vgg, shared) = (vgg.share(), batch.map(|(batch, _)| batch));
                scope.spawn(move || run(job, &vgg, shared))
            })
            .collect();
        let runner = batch.map(|(batch, model)| {
            while batch.waiting_items() < count && !threads.iter().any(|thread| thread.is_finished()) {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            let models = std::collections::HashMap::from([(model.to_string(), vgg.share())]);
            scope.spawn(move || batch.serve(&models))
        });
        let results: Vec<Result<T>> = threads
            .into_iter()
            .map(|thread| thread.join().unwrap_or_else(|payload| Err(panic_error("paint", payload.as_ref()))))
            .collect();
        if let (Some((batch, _)), Some(runner)) = (batch, runner) {
            batch.close();
            let _ = runner.join();
        }
        results.into_iter().collect()
    })
}

/// What one forward pass runs on: the whole image, or its tiles when the settings ask for them.
fn forward_windows(image: &Tensor, settings: &StyleSettings) -> Vec<Tensor> {
    let (height, width) = (image.size()[2], image.size()[3]);
    match crate::style::tiles::TileGrid::plan(height, width, settings.tile_size, settings.tile_overlap, image.device())
    {
        None => vec![image.shallow_clone()],
        Some(grid) => grid.tiles().iter().map(|tile| tile.window(image)).collect(),
    }
}

/// A VGG with random weights of the given architecture (for benchmarking without weight files), with
/// the precision's TF32 switch set as [`crate::model::load`] sets it. The weights are seeded draws
/// ([`crate::seeded`]), the same on every call.
pub fn random_vgg(arch: crate::model::Arch, settings: &crate::model::ModelSettings, device: Device) -> Result<Vgg> {
    let precision = crate::model::resolve_precision(settings, device)?;
    let convs = arch
        .convs()
        .into_iter()
        .enumerate()
        .map(|(index, (layer, _))| {
            let (out, inp) = (arch.out_channels(layer), arch.in_channels(layer));
            let std = (2.0 / (inp * 9) as f64).sqrt();
            crate::model::weights::ConvWeights {
                layer,
                weight: crate::seeded::normal(&[out, inp, 3, 3], index as u64) * std,
                bias: Tensor::zeros([out], (Kind::Float, Device::Cpu)),
            }
        })
        .collect();
    Ok(Vgg::with_layout(
        arch,
        convs,
        crate::model::Convention::Torchvision,
        settings.pooling,
        device,
        precision,
        settings.layout,
    ))
}

/// End-to-end numbers of a painted video.
#[derive(Clone, Debug, Serialize)]
pub struct VideoBenchRow {
    /// The clip.
    pub video: std::path::PathBuf,
    /// Frames painted.
    pub frames: u64,
    /// Runs of frames painted side by side (`video.segments`, fewer for a short clip).
    pub segments: u64,
    /// Copies of the clip painted at once (`--jobs`).
    pub jobs: u64,
    /// With several jobs in a shared batch: the most frames it held at once (`None`: each job
    /// optimised in its own batch).
    pub shared_batch_most_items: Option<u64>,
    /// Working size (`width`, `height`).
    pub working_size: (u32, u32),
    /// Device the network ran on.
    pub device: String,
    /// Network precision as it ran.
    pub precision: String,
    /// Network architecture.
    pub arch: String,
    /// Activation memory layout.
    pub layout: String,
    /// Wall-clock seconds of the job per frame (the stages overlap, each on its own thread).
    pub seconds_per_frame: f64,
    /// Optimisation iterations per frame painted, the segments' lead-in pictures included: the work
    /// per frame, whatever the machine's speed.
    pub iterations_per_frame: f64,
    /// Mean seconds per frame in each stage.
    pub stage_seconds_per_frame: FrameSeconds,
    /// Each stage's fraction of the summed stage time (the four add up to 1).
    pub share: FrameSeconds,
    /// Wall-clock seconds of the whole job.
    pub wall_seconds: f64,
    /// Peak resident memory of the process, MiB.
    pub peak_rss_mib: f64,
    /// On CUDA: device memory in use after the job, MiB (as in [`BenchRow::cuda_peak_mib`]).
    pub cuda_peak_mib: Option<f64>,
    /// On CUDA: the most the caching allocator held in tensors since the process started, MiB.
    pub cuda_max_allocated_mib: Option<f64>,
}

impl VideoBenchRow {
    /// Sums up the report of a video job that ran with `vgg`.
    pub fn of(report: &Report, vgg: &Vgg) -> Self {
        Self::of_jobs(std::slice::from_ref(report), report.wall_seconds, vgg, None)
    }

    /// Sums up the reports of video jobs that ran at once with `vgg` for `wall_seconds` in all, in a
    /// shared batch when `shared` gives what it did. Seconds per frame are the wall time over all
    /// their frames; each stage's seconds are the jobs' (frame-weighted) mean, as each job saw them.
    pub fn of_jobs(reports: &[Report], wall_seconds: f64, vgg: &Vgg, shared: Option<SharedBatchStats>) -> Self {
        let first = reports.first().expect("at least one report");
        let frames: u64 = reports.iter().map(|r| r.frame_count).sum();
        let per_frame = |pick: fn(&FrameSeconds) -> f64| {
            let weighted: f64 = reports.iter().map(|r| pick(&r.seconds_per_frame) * r.frame_count as f64).sum();
            weighted / frames.max(1) as f64
        };
        let stages = FrameSeconds {
            decode: per_frame(|s| s.decode),
            flow: per_frame(|s| s.flow),
            optimise: per_frame(|s| s.optimise),
            encode: per_frame(|s| s.encode),
        };
        VideoBenchRow {
            video: first.input.clone(),
            frames,
            segments: first.segments,
            jobs: reports.len() as u64,
            shared_batch_most_items: shared.map(|stats| stats.most_together),
            working_size: first.working_size,
            device: device_name(vgg.device()),
            precision: vgg.precision().label_on(vgg.device()),
            arch: vgg.arch().to_string(),
            layout: format!("{:?}", vgg.layout()),
            seconds_per_frame: wall_seconds / frames.max(1) as f64,
            iterations_per_frame: mean_iterations(reports),
            stage_seconds_per_frame: stages,
            share: shares(&stages),
            wall_seconds,
            peak_rss_mib: peak_rss_mib(),
            cuda_peak_mib: memory::in_use_mib(vgg.device()),
            cuda_max_allocated_mib: memory::allocator_peaks_mib(vgg.device()).map(|(allocated, _)| allocated),
        }
    }
}

/// Iterations per frame the jobs painted in this run (not those taken from a checkpoint), their
/// lead-in pictures' iterations included.
fn mean_iterations(reports: &[Report]) -> f64 {
    let painted = reports.iter().flat_map(|r| &r.frames).filter(|f| !f.resumed);
    let (count, iterations) = painted.fold((0u64, 0u64), |(n, sum), f| (n + 1, sum + f.iterations as u64));
    let lead_in: u64 = reports.iter().map(|r| r.lead_in_iterations).sum();
    (iterations + lead_in) as f64 / count.max(1) as f64
}

/// Each stage's fraction of the stages' sum (all zero when nothing was timed).
pub fn shares(stages: &FrameSeconds) -> FrameSeconds {
    let total = stages.total();
    if total <= 0.0 {
        return FrameSeconds::default();
    }
    FrameSeconds {
        decode: stages.decode / total,
        flow: stages.flow / total,
        optimise: stages.optimise / total,
        encode: stages.encode / total,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    #[test]
    fn shares_add_up_to_one() {
        let shares = shares(&FrameSeconds { decode: 0.5, flow: 1.0, optimise: 8.0, encode: 0.5 });
        assert!((shares.total() - 1.0).abs() < 1e-12, "{shares:?}");
        assert!((shares.optimise - 0.8).abs() < 1e-12);
        assert_eq!(super::shares(&FrameSeconds::default()), FrameSeconds::default());
    }

    /// Lowers its flag when dropped, so a thread waiting on the flag ends even when the test panics.
    struct LowerOnDrop<'a>(&'a AtomicBool);

    impl Drop for LowerOnDrop<'_> {
        fn drop(&mut self) {
            self.0.store(false, Ordering::Relaxed);
        }
    }

    #[test]
    fn a_random_network_is_the_same_while_another_thread_draws_from_libtorch() {
        let settings = crate::model::ModelSettings {
            device: crate::device::DeviceChoice::Cpu,
            precision: crate::device::Precision::F32.into(),
            ..crate::model::ModelSettings::default()
        };
        let image = crate::seeded::uniform(&[1, 3, 16, 16], 1);
        // the last convolution sees every layer's weights
        let last_features = |vgg: Vgg| vgg.features(&image, &[LayerId::new(5, 3)]).remove(0);
        let drawing = AtomicBool::new(true);
        let (first, second) = std::thread::scope(|scope| {
            scope.spawn(|| {
                while drawing.load(Ordering::Relaxed) {
                    let _ = Tensor::randn([64, 64], (Kind::Float, Device::Cpu));
                }
            });
            let _stop_drawing = LowerOnDrop(&drawing);
            let network = || random_vgg(crate::model::Arch::Vgg16, &settings, Device::Cpu).unwrap();
            (last_features(network()), last_features(network()))
        });
        assert!(first.abs().sum(Kind::Float).double_value(&[]) > 0.0);
        assert!(first.equal(&second), "the weights changed between two networks of one seed");
    }
}
