//! L-BFGS's proposals alone, with a full memory: what the optimiser adds to each iteration once it
//! remembers `lbfgs_history` pairs (from the 100th iteration of a frame on, by default; fewer where
//! `lbfgs_memory_mib` binds). The
//! gradients come from a separable quadratic over channels-last `[B, 3, H, W]` images in f32, so the
//! memory fills with real curvature pairs and no network runs.

use std::time::Instant;

use serde::Serialize;
use tch::{Device, Kind, Tensor};

use super::{peak_rss_mib, synchronize};
use crate::device::{device_name, memory};
use crate::model::Layout;
use crate::style::optim::{Lbfgs, Optimizer, PairPrecision};
use crate::style::stylizer::memory_limit_bytes;

/// How much to time: `batch` images of `width` × `height`, a memory of `history` pairs filled first,
/// then `iterations` proposals timed after `warmup` more.
#[derive(Clone, Copy, Debug)]
pub struct OptimizerCase {
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// Images per batch.
    pub batch: usize,
    /// Curvature pairs remembered (fewer where they would take more than `memory_limit_mib`).
    pub history: usize,
    /// The most memory the pairs may take per image, MiB (0: no limit).
    pub memory_limit_mib: u64,
    /// The kind to store the pairs in.
    pub pair_precision: PairPrecision,
    /// Untimed proposals after the memory is full.
    pub warmup: usize,
    /// Timed proposals.
    pub iterations: usize,
}

/// One measured [`OptimizerCase`].
#[derive(Clone, Debug, Serialize)]
pub struct OptimizerBenchRow {
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// Device the proposals ran on.
    pub device: String,
    /// Images per batch.
    pub batch: usize,
    /// Curvature pairs remembered when timed.
    pub pairs: usize,
    /// The kind they were stored in: `f32` or `bf16`.
    pub pair_kind: String,
    /// Mean seconds per proposal of the whole batch (the quadratic's gradient included, one
    /// element-wise product).
    pub seconds_per_proposal: f64,
    /// Peak resident memory of the process so far, MiB.
    pub peak_rss_mib: f64,
    /// On CUDA: the most libtorch's caching allocator held in tensors during the run, MiB.
    pub cuda_max_allocated_mib: Option<f64>,
}

/// Times L-BFGS's proposals on `device` for `case`.
pub fn bench_optimizer(device: Device, case: OptimizerCase) -> OptimizerBenchRow {
    memory::reset_allocator_peaks(device);
    let shape = [case.batch.max(1) as i64, 3, case.height as i64, case.width as i64];
    let channels_last = |t: Tensor| Layout::ChannelsLast.apply(&t);
    let mut draws = crate::seeded::Draws::new(11);
    // a separable quadratic ½Σ c·(x − t)², curvatures c from 10⁻³ to 1 (slow enough to converge
    // that the memory holds real pairs)
    let curvature = channels_last((draws.uniform(&shape, (Kind::Float, device)) * -3.0 * 10f64.ln()).exp());
    let target = channels_last(draws.uniform(&shape, (Kind::Float, device)));
    let mut image = channels_last(Tensor::zeros(shape, (Kind::Float, device)));
    let mut optimizer = Lbfgs::new(case.history.max(1), 1.0)
        .with_memory_limit(memory_limit_bytes(case.memory_limit_mib))
        .with_pair_precision(case.pair_precision);
    let mut propose = |optimizer: &mut Lbfgs| {
        let gradient = (&image - &target) * &curvature;
        image += optimizer.propose(&gradient).step;
    };
    // the first proposal remembers no pair and settles the history within the memory limit
    propose(&mut optimizer);
    while optimizer.pairs() < optimizer.history() {
        propose(&mut optimizer);
    }
    for _ in 0..case.warmup {
        propose(&mut optimizer);
    }
    synchronize(device);
    let iterations = case.iterations.max(1);
    let started = Instant::now();
    for _ in 0..iterations {
        propose(&mut optimizer);
    }
    synchronize(device);
    let seconds_per_proposal = started.elapsed().as_secs_f64() / iterations as f64;
    OptimizerBenchRow {
        width: case.width,
        height: case.height,
        device: device_name(device),
        batch: shape[0] as usize,
        pairs: optimizer.pairs(),
        pair_kind: kind_name(optimizer.pair_kind()),
        seconds_per_proposal,
        peak_rss_mib: peak_rss_mib(),
        cuda_max_allocated_mib: memory::allocator_peaks_mib(device).map(|(allocated, _)| allocated),
    }
}

/// `f32`, `bf16` (or libtorch's name of another kind) for the pairs' kind.
fn kind_name(kind: Option<Kind>) -> String {
    match kind {
        Some(Kind::Float) => "f32".into(),
        Some(Kind::BFloat16) => "bf16".into(),
        Some(Kind::Double) => "f64".into(),
        Some(other) => format!("{other:?}").to_lowercase(),
        None => "none".into(),
    }
}
