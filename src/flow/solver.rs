//! The optical-flow solver: TV-L1 (Zach, Pock and Bischof 2007, in the form of Wedel et al. 2009 and
//! Sánchez, Meinhardt-Llopis and Facciolo 2013) on a Gaussian pyramid, coarse to fine, with several
//! warps per level. Each warp linearises the data term around the current flow; each iteration then
//! thresholds the flow pointwise against the linearised data term and takes one step of
//! Chambolle's dual projection for the total-variation term. All of it is elementwise tensor work
//! plus a few convolutions and one `grid_sampler_2d` per warp, with fixed iteration counts, so it
//! runs on the GPU without host synchronisation; there an iteration is fifteen kernels, all in place.
//! On the CPU the iterations and the median filter run fused instead ([`super::fused`]), two to
//! three times faster. Forward and backward flows are solved together as one batch.

use tch::{Device, Kind, Tensor};

use super::FlowSettings;
use super::fused;
use super::ops::{
    coarser_size, gaussian_blur, image_gradient, inside_frame, luminance, median_filter, pixel_grid, resize,
    resize_flow, sample_bicubic,
};
use crate::error::Result;

/// Intensities are scaled to 0..255 so that the classic TV-L1 weights apply unchanged.
const INTENSITY_SCALE: f64 = 255.0;

/// Keeps the pointwise threshold finite where the image has no gradient.
const TINY_GRADIENT: f64 = 1e-6;

/// The flows between two frames in both directions (see the module documentation for the
/// convention): both are backward ("pull") fields of shape `[N, 2, H, W]`.
#[derive(Debug)]
pub struct FlowPair {
    /// Lives on `prev`: for every pixel of `prev`, the displacement to its location in `next`.
    pub forward: Tensor,
    /// Lives on `next`: for every pixel of `next`, the displacement to its location in `prev`.
    /// This is the flow that warps the previous output onto the current frame.
    pub backward: Tensor,
}

impl FlowPair {
    /// The reliability mask of `next` (Ruder et al. 2016), `[N, 1, H, W]`; see [`super::reliability`].
    pub fn reliability(&self) -> Tensor {
        super::reliability(&self.forward, &self.backward)
    }
}

/// The backward flow from `next` to `prev` (RGB `[N, 3, H, W]` or grey `[N, 1, H, W]`, 0..1):
/// for every pixel `p` of `next`, the displacement `d` `[N, 2, H, W]` (pixels, x then y) such that
/// `prev(p + d) ≈ next(p)`. `warp(prev_output, &flow)` aligns the previous output with `next`.
///
/// # Errors
/// Invalid settings.
///
/// # Panics
/// If the frames differ in shape or are not 4-D.
pub fn flow_backward(prev: &Tensor, next: &Tensor, settings: &FlowSettings) -> Result<Tensor> {
    settings.validate()?;
    Ok(tch::no_grad(|| solve(&prepare(next, settings), &prepare(prev, settings), settings)))
}

/// Both flows between `prev` and `next`, solved as one batch: on a GPU, where the solver is bound by
/// kernel launches, about the time of one flow; on a CPU about the time of two.
///
/// # Errors
/// Invalid settings.
///
/// # Panics
/// If the frames differ in shape or are not 4-D.
pub fn flow_pair(prev: &Tensor, next: &Tensor, settings: &FlowSettings) -> Result<FlowPair> {
    settings.validate()?;
    let batch = prev.size()[0];
    let flows = tch::no_grad(|| {
        let (prev, next) = (prepare(prev, settings), prepare(next, settings));
        let references = Tensor::cat(&[&next, &prev], 0);
        let targets = Tensor::cat(&[&prev, &next], 0);
        solve(&references, &targets, settings)
    });
    Ok(FlowPair { backward: flows.narrow(0, 0, batch), forward: flows.narrow(0, batch, batch) })
}

/// A frame as the solver sees it: f32 luminance on the 0..255 scale, lightly blurred.
fn prepare(frame: &Tensor, settings: &FlowSettings) -> Tensor {
    assert_eq!(frame.dim(), 4, "a frame is [N, C, H, W]");
    let grey = luminance(&frame.detach().to_kind(Kind::Float)) * INTENSITY_SCALE;
    gaussian_blur(&grey, settings.presmoothing)
}

/// The flow `u` on `reference`'s pixels with `target(x + u(x)) ≈ reference(x)`, coarse to fine.
fn solve(reference: &Tensor, target: &Tensor, settings: &FlowSettings) -> Tensor {
    assert_eq!(reference.size(), target.size(), "the two frames must have the same shape");
    let pyramid = build_pyramid(reference, target, settings);
    let (coarsest_reference, _) = pyramid.last().expect("at least one level");
    let (batch, _, height, width) = coarsest_reference.size4().expect("[N, 1, H, W]");
    let mut flow = Tensor::zeros([batch, 2, height, width], (Kind::Float, reference.device()));
    for (level_reference, level_target) in pyramid.iter().rev() {
        let (_, _, height, width) = level_reference.size4().expect("[N, 1, H, W]");
        flow = resize_flow(&flow, (height, width));
        flow = solve_level(level_reference, level_target, flow, settings);
    }
    flow
}

/// The image pairs of every level, finest first. Each coarser level is the finer one blurred
/// against aliasing (σ = 0.6·√(1/s² − 1) for scale s) and resized.
fn build_pyramid(reference: &Tensor, target: &Tensor, settings: &FlowSettings) -> Vec<(Tensor, Tensor)> {
    let scale = settings.level_scale;
    let anti_alias = 0.6 * (1.0 / (scale * scale) - 1.0).sqrt();
    let mut levels = vec![(reference.shallow_clone(), target.shallow_clone())];
    while levels.len() < settings.levels {
        let (finer_reference, finer_target) = levels.last().expect("non-empty");
        let (_, _, height, width) = finer_reference.size4().expect("[N, 1, H, W]");
        let size = coarser_size((height, width), scale);
        if size.0.min(size.1) < settings.min_level_size {
            break;
        }
        let shrink = |image: &Tensor| resize(&gaussian_blur(image, anti_alias), size);
        let coarser = (shrink(finer_reference), shrink(finer_target));
        levels.push(coarser);
    }
    levels
}

/// Refines `flow` on one pyramid level with `settings.warps` linearisations.
fn solve_level(reference: &Tensor, target: &Tensor, mut flow: Tensor, settings: &FlowSettings) -> Tensor {
    let (_, _, height, width) = reference.size4().expect("[N, 1, H, W]");
    let grid = pixel_grid(height, width, reference.device());
    let target_with_gradient = Tensor::cat(&[target, &image_gradient(target)], 1);
    let mut dual = DualField::zeros(&flow);
    for _ in 0..settings.warps {
        let data = LinearisedData::around(&flow, reference, &target_with_gradient, &grid);
        flow = iterate(&data, flow, &mut dual, settings);
        flow = match (flow.device(), settings.median_radius) {
            (Device::Cpu, 1) => fused::median_3x3(&flow),
            (_, radius) => median_filter(&flow, radius),
        };
    }
    flow
}

/// The data term `target(x + u) − reference(x)` linearised around a flow `u₀`:
/// `ρ(u) = residual_at_zero + gradient · u`, zeroed where `x + u₀` leaves the frame.
struct LinearisedData {
    /// `∇target(x + u₀)` `[N, 2, H, W]`, zero outside the frame.
    gradient: Tensor,
    /// `ρ(0) = target(x + u₀) − reference(x) − gradient · u₀` `[N, 1, H, W]`.
    residual_at_zero: Tensor,
    /// `−1 / |gradient|²` `[N, 1, H, W]`, the pointwise step of the thresholding.
    negative_inverse_norm: Tensor,
}

impl LinearisedData {
    fn around(flow: &Tensor, reference: &Tensor, target_with_gradient: &Tensor, grid: &Tensor) -> Self {
        let (_, _, height, width) = reference.size4().expect("[N, 1, H, W]");
        let positions = grid + flow;
        let sampled = sample_bicubic(target_with_gradient, &positions);
        let inside = inside_frame(&positions, height, width);
        let gradient = sampled.narrow(1, 1, 2) * &inside;
        let along_flow = (&gradient * flow).sum_dim_intlist(1, true, Kind::Float);
        let residual_at_zero = (sampled.narrow(1, 0, 1) - reference - along_flow) * &inside;
        let norm = gradient.square().sum_dim_intlist(1, true, Kind::Float) + TINY_GRADIENT;
        LinearisedData { gradient, residual_at_zero, negative_inverse_norm: -norm.reciprocal() }
    }
}

/// Chambolle's dual variable of the total variation of each flow channel, `[N, 2, 2, H, W]`: the
/// x parts, then the y parts, each `[N, 2, H, W]`.
struct DualField(Tensor);

impl DualField {
    fn zeros(flow: &Tensor) -> Self {
        let (batch, channels, height, width) = flow.size4().expect("flow [N, 2, H, W]");
        DualField(Tensor::zeros([batch, 2, channels, height, width], (Kind::Float, flow.device())))
    }

    fn along_x(&self) -> Tensor {
        self.0.select(1, 0)
    }

    fn along_y(&self) -> Tensor {
        self.0.select(1, 1)
    }
}

/// `settings.iterations` primal–dual iterations on one linearised problem: this loop is where the
/// solver spends its time. On the CPU it runs fused ([`fused::iterate`]), elsewhere as tensor
/// operations ([`iterate_tensors`]).
fn iterate(data: &LinearisedData, flow: Tensor, dual: &mut DualField, settings: &FlowSettings) -> Tensor {
    if flow.device() != Device::Cpu {
        return iterate_tensors(data, flow, dual, settings);
    }
    let planes = fused::DataPlanes::new(&data.gradient, &data.residual_at_zero, &data.negative_inverse_norm);
    let (flow, along_x, along_y) =
        fused::iterate(&planes, &flow, (&dual.along_x(), &dual.along_y()), steps(settings), settings.iterations);
    *dual = DualField(Tensor::stack(&[along_x, along_y], 1));
    flow
}

/// The constants of the iterations.
fn steps(settings: &FlowSettings) -> fused::Steps {
    fused::Steps {
        threshold: (settings.data_weight * settings.coupling) as f32,
        coupling: settings.coupling as f32,
        dual_rate: (settings.dual_step / settings.coupling) as f32,
    }
}

/// [`iterate`] as tensor operations, on any device. On a GPU every operation is a kernel launch and
/// a pass over memory, so an iteration is fifteen of them, all in place on buffers made once per
/// call: no allocation, and no host synchronisation (the scalars live on the device).
fn iterate_tensors(data: &LinearisedData, mut flow: Tensor, dual: &mut DualField, settings: &FlowSettings) -> Tensor {
    let threshold = settings.data_weight * settings.coupling;
    let scalar = |value: f64| Tensor::full([0i64; 0], value, (Kind::Float, flow.device()));
    let (coupling, negative_coupling) = (scalar(settings.coupling), scalar(-settings.coupling));
    let dual_rate = scalar(settings.dual_step / settings.coupling);
    // The thresholding's step −ρ(u)/|∇target|² = ρ̃ + g̃·u, with ρ̃ and g̃ scaled once here.
    let step_at_zero = &data.residual_at_zero * &data.negative_inverse_norm;
    let step_gradient = &data.gradient * &data.negative_inverse_norm;
    let step_gradient_x = step_gradient.narrow(1, 0, 1);
    let step_gradient_y = step_gradient.narrow(1, 1, 1);
    let (flow_x, flow_y) = (flow.narrow(1, 0, 1), flow.narrow(1, 1, 1));
    let mut step = step_at_zero.empty_like();
    // u += θ·div p as two shifted adds per direction (the boundary terms of `ops::divergence`).
    let (dual_x, dual_y) = (dual.along_x(), dual.along_y());
    let [mut flow_left, mut flow_right] = ends(&flow, 3);
    let [mut flow_top, mut flow_bottom] = ends(&flow, 2);
    let [dual_x_left, _] = ends(&dual_x, 3);
    let [dual_y_top, _] = ends(&dual_y, 2);
    // ∇u by forward differences into a buffer whose last column (x) and row (y) stay 0.
    let differences = dual.0.zeros_like();
    let [difference_x_left, _] = ends(&differences.select(1, 0), 3);
    let [difference_y_top, _] = ends(&differences.select(1, 1), 2);
    let (differences_x, differences_y) = (differences.select(1, 0), differences.select(1, 1));
    let mut shrink = flow.empty_like();
    let shrink_per_part = shrink.unsqueeze(1);
    for _ in 0..settings.iterations {
        // Pointwise minimiser of λ|ρ(v)| + |v − u|²/(2θ): move u along ∇target by
        // −ρ(u)/|∇target|², clamped to ±λθ.
        let _ = step_at_zero.addcmul_out(&step, &step_gradient_x, &flow_x);
        let _ = step.addcmul_(&step_gradient_y, &flow_y).clamp_(-threshold, threshold);
        let _ = flow.addcmul_(&data.gradient, &step);
        // Total-variation step: u = v + θ·div p, then the projected dual ascent
        // p ← (p + (τ/θ)∇u) / (1 + (τ/θ)|∇u|), both parts of both flow channels at once.
        let _ = flow_left.addcmul_(&dual_x_left, &coupling);
        let _ = flow_right.addcmul_(&dual_x_left, &negative_coupling);
        let _ = flow_top.addcmul_(&dual_y_top, &coupling);
        let _ = flow_bottom.addcmul_(&dual_y_top, &negative_coupling);
        let _ = flow_right.sub_out(&difference_x_left, &flow_left);
        let _ = flow_bottom.sub_out(&difference_y_top, &flow_top);
        let _ = differences_x.hypot_out(&shrink, &differences_y);
        let _ = shrink.g_mul_(&dual_rate).g_add_scalar_(1.0);
        let _ = dual.0.addcmul_(&differences, &dual_rate).g_div_(&shrink_per_part);
    }
    flow
}

/// The views of `field` without its last and without its first element along `dimension`.
fn ends(field: &Tensor, dimension: i64) -> [Tensor; 2] {
    let length = field.size()[dimension as usize];
    [field.narrow(dimension, 0, length - 1), field.narrow(dimension, 1, length - 1)]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flow::ops::{divergence, forward_differences};
    use crate::seeded::Draws;
    use tch::Device;

    const F32_CPU: (Kind, Device) = (Kind::Float, Device::Cpu);

    /// A smooth random texture `[1, 3, H, W]` in 0..1.
    fn texture(height: i64, width: i64) -> Tensor {
        let noise = crate::seeded::uniform(&[1, 3, height / 4, width / 4], 7);
        noise.upsample_bicubic2d([height, width], false, None, None).clamp(0.0, 1.0)
    }

    /// A linearised data term of a batch of two `height` × `width` frames with random gradients and
    /// residuals, the next two of `draws`.
    fn random_data(height: i64, width: i64, draws: &mut Draws) -> LinearisedData {
        let gradient = draws.normal(&[2, 2, height, width], F32_CPU) * 20.0;
        let norm = gradient.square().sum_dim_intlist(1, true, Kind::Float) + TINY_GRADIENT;
        LinearisedData {
            residual_at_zero: draws.normal(&[2, 1, height, width], F32_CPU) * 10.0,
            negative_inverse_norm: -norm.reciprocal(),
            gradient,
        }
    }

    #[test]
    fn fused_iterations_match_the_tensor_operations() {
        for (height, width) in [(13, 17), (1, 9), (7, 1), (2, 2), (1, 1)] {
            let mut draws = Draws::new(3);
            let data = random_data(height, width, &mut draws);
            let flow = draws.normal(&[2, 2, height, width], F32_CPU);
            let start = draws.uniform(&[2, 2, 2, height, width], F32_CPU) - 0.5;
            let dual = || DualField(start.copy());
            let settings = FlowSettings::default();
            let mut tensor_dual = dual();
            let by_tensors = iterate_tensors(&data, flow.copy(), &mut tensor_dual, &settings);
            let mut fused_dual = dual();
            let fused = iterate(&data, flow.copy(), &mut fused_dual, &settings);
            let largest = |a: &Tensor, b: &Tensor| (a - b).abs().max().double_value(&[]);
            let shape = format!("{height}×{width}");
            assert!(largest(&by_tensors, &flow) > 0.01, "{shape}: the iterations moved the flow");
            assert!(largest(&by_tensors, &fused) < 1e-4, "{shape}: flow differs by {}", largest(&by_tensors, &fused));
            assert!(largest(&tensor_dual.0, &fused_dual.0) < 1e-5, "{shape}");
        }
    }

    #[test]
    fn a_tensor_iteration_is_the_textbook_step() {
        for (height, width) in [(5, 7), (1, 4), (3, 1)] {
            let mut draws = Draws::new(11);
            let data = random_data(height, width, &mut draws);
            let flow = draws.normal(&[2, 2, height, width], F32_CPU);
            let along_x = draws.uniform(&[2, 2, height, width], F32_CPU) - 0.5;
            let along_y = draws.uniform(&[2, 2, height, width], F32_CPU) - 0.5;
            let settings = FlowSettings { iterations: 1, ..FlowSettings::default() };
            let mut dual = DualField(Tensor::stack(&[&along_x, &along_y], 1));
            let iterated = iterate_tensors(&data, flow.copy(), &mut dual, &settings);
            // Zach et al.'s step written out: threshold, add θ·div p, then the dual ascent.
            let (threshold, rate) = (settings.data_weight * settings.coupling, settings.dual_step / settings.coupling);
            let rho = (&data.gradient * &flow).sum_dim_intlist(1, true, Kind::Float) + &data.residual_at_zero;
            let thresholded = &flow + &data.gradient * (rho * &data.negative_inverse_norm).clamp(-threshold, threshold);
            let expected = thresholded + divergence(&along_x, &along_y) * settings.coupling;
            let (dx, dy) = forward_differences(&expected);
            let shrink = (dx.square() + dy.square()).sqrt() * rate + 1.0;
            let expected_dual = Tensor::stack(&[(along_x + dx * rate) / &shrink, (along_y + dy * rate) / &shrink], 1);
            let largest = |a: &Tensor, b: &Tensor| (a - b).abs().max().double_value(&[]);
            assert!(largest(&iterated, &expected) < 1e-4, "{height}×{width}: {}", largest(&iterated, &expected));
            assert!(largest(&dual.0, &expected_dual) < 1e-5, "{height}×{width}");
        }
    }

    #[test]
    fn the_fused_median_is_the_tensor_median() {
        for (height, width) in [(13, 17), (1, 5), (4, 1), (2, 2)] {
            let field = crate::seeded::normal(&[2, 2, height, width], 5);
            assert!(fused::median_3x3(&field).equal(&median_filter(&field, 1)), "{height}×{width}");
        }
    }

    #[test]
    fn identical_frames_give_zero_flow() {
        let frame = texture(48, 64);
        let flow = flow_backward(&frame, &frame, &FlowSettings::default()).unwrap();
        assert_eq!(flow.size(), vec![1, 2, 48, 64]);
        assert!(flow.abs().max().double_value(&[]) < 1e-3);
    }

    #[test]
    fn pyramid_stops_at_the_smallest_level_size() {
        let frame = Tensor::zeros([1, 1, 100, 300], (Kind::Float, Device::Cpu));
        let settings = FlowSettings { level_scale: 0.5, min_level_size: 16, ..FlowSettings::default() };
        let sizes: Vec<_> = build_pyramid(&frame, &frame, &settings).iter().map(|(r, _)| r.size()[2]).collect();
        assert_eq!(sizes, vec![100, 50, 25]);
    }

    #[test]
    fn pair_recovers_an_integer_shift_both_ways() {
        let wide = texture(56, 72);
        let prev = wide.narrow(2, 4, 48).narrow(3, 4, 64);
        let next = wide.narrow(2, 5, 48).narrow(3, 2, 64); // next(p) = prev(p + (−2, 1))
        let pair = flow_pair(&prev, &next, &FlowSettings::default()).unwrap();
        let inner =
            |flow: &Tensor, channel: i64| flow.get(0).get(channel).narrow(0, 8, 32).narrow(1, 8, 48).mean(Kind::Float);
        assert!((inner(&pair.backward, 0).double_value(&[]) + 2.0).abs() < 0.05);
        assert!((inner(&pair.backward, 1).double_value(&[]) - 1.0).abs() < 0.05);
        assert!((inner(&pair.forward, 0).double_value(&[]) - 2.0).abs() < 0.05);
        assert!((inner(&pair.forward, 1).double_value(&[]) + 1.0).abs() < 0.05);
    }
}
