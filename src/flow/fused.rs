//! The solver's primal–dual iterations fused into two passes over plain `f32` planes, for flows on
//! the CPU. Written as tensor operations, one iteration is about fifteen libtorch calls, each a full
//! pass over memory and, on small frames, mostly call overhead; here it is one pass that thresholds
//! the flow against the data term and adds the divergence of the dual field, and one that takes the
//! dual step. The arithmetic is the tensor version's, in the same order, so the two agree to
//! rounding (a unit test holds them together). GPU flows keep the tensor version.

use tch::{Kind, Tensor};

/// The constants of one run of iterations.
#[derive(Clone, Copy, Debug)]
pub(super) struct Steps {
    /// `λθ`: the most the data term moves the flow in one thresholding.
    pub threshold: f32,
    /// `θ`, the coupling: the weight of the dual field's divergence in the flow.
    pub coupling: f32,
    /// `τ/θ`: the dual ascent's step.
    pub dual_rate: f32,
}

/// The data term linearised around a flow, as planes of a `[N, C, H, W]` batch.
pub(super) struct DataPlanes {
    gradient: Vec<f32>,
    residual_at_zero: Vec<f32>,
    negative_inverse_norm: Vec<f32>,
}

impl DataPlanes {
    /// Copies `gradient` `[N, 2, H, W]`, `residual_at_zero` and `negative_inverse_norm` `[N, 1, H, W]`.
    pub fn new(gradient: &Tensor, residual_at_zero: &Tensor, negative_inverse_norm: &Tensor) -> Self {
        DataPlanes {
            gradient: planes(gradient),
            residual_at_zero: planes(residual_at_zero),
            negative_inverse_norm: planes(negative_inverse_norm),
        }
    }
}

/// `iterations` primal–dual iterations on `flow` `[N, 2, H, W]` and its dual field (`dual_x`,
/// `dual_y`, each `[N, 2, H, W]`), all f32 on the CPU; returns the three updated.
pub(super) fn iterate(
    data: &DataPlanes,
    flow: &Tensor,
    (dual_x, dual_y): (&Tensor, &Tensor),
    steps: Steps,
    iterations: usize,
) -> (Tensor, Tensor, Tensor) {
    let (batch, channels, height, width) = flow.size4().expect("flow [N, 2, H, W]");
    assert_eq!(channels, 2, "a flow has two channels");
    let shape = Shape { batch: batch as usize, height: height as usize, width: width as usize };
    let mut field = Field { flow: planes(flow), dual_x: planes(dual_x), dual_y: planes(dual_y) };
    assert_eq!(field.flow.len(), shape.batch * 2 * shape.plane());
    assert_eq!(data.residual_at_zero.len(), shape.batch * shape.plane(), "data and flow differ in size");
    run(data, &mut field, shape, steps, iterations);
    let back = |values: &[f32]| Tensor::from_slice(values).view([batch, 2, height, width]);
    (back(&field.flow), back(&field.dual_x), back(&field.dual_y))
}

/// The iterations, compiled for AVX2 where the CPU has it (8 lanes instead of SSE2's 4).
fn run(data: &DataPlanes, field: &mut Field, shape: Shape, steps: Steps, iterations: usize) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2, checked just above.
        return unsafe { run_avx2(data, field, shape, steps, iterations) };
    }
    run_portable(data, field, shape, steps, iterations);
}

/// [`run_portable`] compiled with AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn run_avx2(data: &DataPlanes, field: &mut Field, shape: Shape, steps: Steps, iterations: usize) {
    run_portable(data, field, shape, steps, iterations);
}

#[inline(always)]
fn run_portable(data: &DataPlanes, field: &mut Field, shape: Shape, steps: Steps, iterations: usize) {
    for _ in 0..iterations {
        threshold_and_add_divergence(data, field, shape, steps);
        dual_step(field, shape, steps);
    }
}

/// A contiguous f32 copy of `tensor`'s values in `[N, C, H, W]` order.
fn planes(tensor: &Tensor) -> Vec<f32> {
    Vec::<f32>::try_from(tensor.to_kind(Kind::Float).contiguous().view(-1)).expect("an f32 CPU tensor")
}

/// The sizes of the batch.
#[derive(Clone, Copy)]
struct Shape {
    batch: usize,
    height: usize,
    width: usize,
}

impl Shape {
    fn plane(self) -> usize {
        self.height * self.width
    }
}

/// The flow and its dual field, `[N, 2, H, W]` each.
struct Field {
    flow: Vec<f32>,
    dual_x: Vec<f32>,
    dual_y: Vec<f32>,
}

/// First half of an iteration, row by row: the pointwise minimiser of `λ|ρ(v)| + |v − u|²/(2θ)`
/// (move `u` along `∇target` by `−ρ(u)/|∇target|²`, clamped to `±λθ`), then `u += θ·div p` for each
/// flow channel, with the backward differences and boundary terms of `ops::divergence`.
#[inline(always)]
fn threshold_and_add_divergence(data: &DataPlanes, field: &mut Field, shape: Shape, steps: Steps) {
    let (plane, width) = (shape.plane(), shape.width);
    let mut along = vec![0.0f32; width];
    let mut divergence = vec![0.0f32; width];
    for item in 0..shape.batch {
        let (flow_at, data_at) = (item * 2 * plane, item * plane);
        for y in 0..shape.height {
            let row = |start: usize| start + y * width..start + (y + 1) * width;
            let (u0, u1) = (&field.flow[row(flow_at)], &field.flow[row(flow_at + plane)]);
            let (g0, g1) = (&data.gradient[row(flow_at)], &data.gradient[row(flow_at + plane)]);
            let (residual, scale) = (&data.residual_at_zero[row(data_at)], &data.negative_inverse_norm[row(data_at)]);
            let pixels = g0.iter().zip(g1).zip(u0.iter().zip(u1)).zip(residual.iter().zip(scale));
            for (a, (((g0, g1), (u0, u1)), (residual, scale))) in along.iter_mut().zip(pixels) {
                let moved = (g0 * u0 + g1 * u1 + residual) * scale;
                *a = moved.max(-steps.threshold).min(steps.threshold);
            }
            for channel in 0..2 {
                let start = flow_at + channel * plane;
                divergence_row(&field.dual_x, &field.dual_y, start, y, shape, &mut divergence);
                let g = &data.gradient[row(start)];
                let u = &mut field.flow[row(start)];
                for (u, (g, (along, divergence))) in u.iter_mut().zip(g.iter().zip(along.iter().zip(&divergence))) {
                    *u += g * along + divergence * steps.coupling;
                }
            }
        }
    }
}

/// `div p` along row `y` of the channel plane starting at `start`:
/// `p_x(x) − p_x(x−1) + p_y(y) − p_y(y−1)`, where `p_x` counts as 0 in the last column and left of
/// the first, and `p_y` likewise for rows.
#[inline(always)]
fn divergence_row(dual_x: &[f32], dual_y: &[f32], start: usize, y: usize, shape: Shape, out: &mut [f32]) {
    let width = shape.width;
    let at = start + y * width;
    let px = &dual_x[at..at + width];
    out[0] = px[0];
    for x in 1..width {
        out[x] = px[x] - px[x - 1];
    }
    out[width - 1] = if width > 1 { -px[width - 2] } else { 0.0 };
    if y + 1 < shape.height {
        for (o, p) in out.iter_mut().zip(&dual_y[at..at + width]) {
            *o += p;
        }
    }
    if y > 0 {
        for (o, p) in out.iter_mut().zip(&dual_y[at - width..at]) {
            *o -= p;
        }
    }
}

/// Second half of an iteration: the projected dual ascent `p ← (p + (τ/θ)∇u) / (1 + (τ/θ)|∇u|)`,
/// separately for each flow channel, with the forward differences of `ops::forward_differences`
/// (0 in the last column and row).
#[inline(always)]
fn dual_step(field: &mut Field, shape: Shape, steps: Steps) {
    let (plane, width, height) = (shape.plane(), shape.width, shape.height);
    let (mut along_x, mut along_y) = (vec![0.0f32; width], vec![0.0f32; width]);
    for channel_plane in 0..shape.batch * 2 {
        for y in 0..height {
            let at = channel_plane * plane + y * width;
            let u = &field.flow[at..at + width];
            along_x.iter_mut().zip(u.iter().zip(&u[1..])).for_each(|(d, (here, right))| *d = right - here);
            along_x[width - 1] = 0.0;
            match field.flow.get(at + width..at + 2 * width).filter(|_| y + 1 < height) {
                Some(below) => along_y.iter_mut().zip(u.iter().zip(below)).for_each(|(d, (here, b))| *d = b - here),
                None => along_y.fill(0.0),
            }
            let (px, py) = (&mut field.dual_x[at..at + width], &mut field.dual_y[at..at + width]);
            for (((px, py), dx), dy) in px.iter_mut().zip(py.iter_mut()).zip(&along_x).zip(&along_y) {
                let shrink = (dx * dx + dy * dy).sqrt() * steps.dual_rate + 1.0;
                *px = (*px + dx * steps.dual_rate) / shrink;
                *py = (*py + dy * steps.dual_rate) / shrink;
            }
        }
    }
}

/// The 3×3 median of every channel plane of `field` `[N, C, H, W]` (f32 on the CPU), edges
/// replicated: `ops::median_filter`'s scheme (sort each row of the window; the median is the middle
/// of the largest row minimum, the median of the row middles and the smallest row maximum) with each
/// row's sort done once for the three windows that share it.
pub(super) fn median_3x3(field: &Tensor) -> Tensor {
    let (_, _, height, width) = field.size4().expect("[N, C, H, W]");
    let (rows, columns) = (height as usize, width as usize);
    let values = planes(field);
    let mut medians = vec![0.0f32; values.len()];
    let mut sorted = SortedRows::new(rows * columns);
    for (plane, out) in values.chunks(rows * columns).zip(medians.chunks_mut(rows * columns)) {
        sorted.fill(plane, columns);
        for y in 0..rows {
            let (above, below) = (y.saturating_sub(1), (y + 1).min(rows - 1));
            let (low, middle, high) = (&sorted.low, &sorted.middle, &sorted.high);
            let out = &mut out[y * columns..(y + 1) * columns];
            let rows_of = |values| (row(values, above, columns), row(values, y, columns), row(values, below, columns));
            let (lows, middles, highs) = (rows_of(low), rows_of(middle), rows_of(high));
            for (x, median) in out.iter_mut().enumerate() {
                let largest_low = lows.0[x].max(lows.1[x]).max(lows.2[x]);
                let middle = median_of_3(middles.0[x], middles.1[x], middles.2[x]);
                let smallest_high = highs.0[x].min(highs.1[x]).min(highs.2[x]);
                *median = median_of_3(largest_low, middle, smallest_high);
            }
        }
    }
    Tensor::from_slice(&medians).view([-1, field.size()[1], height, width])
}

/// Row `r` of a plane `columns` wide.
fn row(values: &[f32], r: usize, columns: usize) -> &[f32] {
    &values[r * columns..(r + 1) * columns]
}

/// The smallest, middle and largest of every pixel's three horizontal neighbours (edges
/// replicated), for every row of one plane.
struct SortedRows {
    low: Vec<f32>,
    middle: Vec<f32>,
    high: Vec<f32>,
}

impl SortedRows {
    fn new(len: usize) -> Self {
        SortedRows { low: vec![0.0; len], middle: vec![0.0; len], high: vec![0.0; len] }
    }

    fn fill(&mut self, plane: &[f32], columns: usize) {
        for (start, row) in plane.chunks(columns).enumerate().map(|(r, row)| (r * columns, row)) {
            for x in 0..columns {
                let (a, b, c) = (row[x.saturating_sub(1)], row[x], row[(x + 1).min(columns - 1)]);
                self.low[start + x] = a.min(b).min(c);
                self.middle[start + x] = median_of_3(a, b, c);
                self.high[start + x] = a.max(b).max(c);
            }
        }
    }
}

/// The middle one of three values.
fn median_of_3(a: f32, b: f32, c: f32) -> f32 {
    a.min(b).max(a.max(b).min(c))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_portable_loop_and_the_dispatched_one_agree() {
        let gradient = crate::seeded::normal(&[1, 2, 9, 11], 9) * 20.0;
        let data = DataPlanes {
            gradient: planes(&gradient),
            residual_at_zero: planes(&(crate::seeded::normal(&[1, 1, 9, 11], 10) * 10.0)),
            negative_inverse_norm: planes(
                &-(gradient.square().sum_dim_intlist(1, true, Kind::Float) + 1e-6).reciprocal(),
            ),
        };
        let start = || Field {
            flow: planes(&Tensor::ones([1, 2, 9, 11], (Kind::Float, tch::Device::Cpu))),
            dual_x: vec![0.0; 2 * 99],
            dual_y: vec![0.0; 2 * 99],
        };
        let shape = Shape { batch: 1, height: 9, width: 11 };
        let steps = Steps { threshold: 0.045, coupling: 0.3, dual_rate: 0.25 / 0.3 };
        let (mut portable, mut dispatched) = (start(), start());
        run_portable(&data, &mut portable, shape, steps, 10);
        run(&data, &mut dispatched, shape, steps, 10);
        let largest = portable.flow.iter().zip(&dispatched.flow).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        assert!(largest < 1e-5, "flows differ by {largest}");
        assert!(portable.flow.iter().any(|&u| (u - 1.0).abs() > 0.1), "the iterations moved the flow");
    }
}
