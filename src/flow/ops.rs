//! Small tensor building blocks shared by the flow solver, the reliability test and scene-cut
//! detection: luminance, Gaussian blur, image derivatives, finite differences of a flow, median
//! filtering, pyramid resizing and sampling at pixel positions. Each works on `[N, C, H, W]` tensors
//! on any device.

use std::cell::RefCell;
use std::collections::HashMap;

use tch::{Device, Kind, Tensor};

/// Interpolation code of libtorch's `grid_sampler_2d` for bicubic (Keys, a = −0.75).
const BICUBIC: i64 = 2;
/// Padding code of `grid_sampler_2d`: samples outside the frame take the nearest edge value.
const BORDER: i64 = 1;

/// How many [`constant`]s a thread keeps before it starts over.
const KEPT_CONSTANTS: usize = 256;

/// A small constant (filter taps, per-channel scales) as a tensor of `shape` on `device`. Copying
/// from the host to a GPU waits until the device has finished all the work queued before it (a
/// copy from pageable memory synchronises), which would stall the solver at every level and warp;
/// so each constant is copied once per thread, device and value and then kept. The tensors are
/// shared: never change one in place.
pub(crate) fn constant(values: &[f32], shape: &[i64], device: Device) -> Tensor {
    type Key = (Vec<u32>, Vec<i64>, Device);
    thread_local! {
        static KEPT: RefCell<HashMap<Key, Tensor>> = RefCell::new(HashMap::new());
    }
    let key = (values.iter().map(|v| v.to_bits()).collect(), shape.to_vec(), device);
    KEPT.with_borrow_mut(|kept| {
        if kept.len() >= KEPT_CONSTANTS && !kept.contains_key(&key) {
            kept.clear();
        }
        kept.entry(key).or_insert_with(|| Tensor::from_slice(values).to_device(device).view(shape)).shallow_clone()
    })
}

/// Rec. 601 luma of an RGB image `[N, 3, H, W]` (a one-channel image is returned as it is).
pub(crate) fn luminance(image: &Tensor) -> Tensor {
    let channels = image.size()[1];
    if channels == 1 {
        return image.shallow_clone();
    }
    let weights = constant(&[0.299, 0.587, 0.114], &[1, 3, 1, 1], image.device());
    (image * weights).sum_dim_intlist(1, true, Kind::Float)
}

/// Correlates every channel with the same 1-D `taps` along x (`horizontal`) or y, replicating edges.
fn correlate_1d(image: &Tensor, taps: &[f32], horizontal: bool) -> Tensor {
    let channels = image.size()[1];
    let radius = (taps.len() / 2) as i64;
    let shape = if horizontal { [1, 1, 1, taps.len() as i64] } else { [1, 1, taps.len() as i64, 1] };
    let kernel = constant(taps, &shape, image.device()).repeat([channels, 1, 1, 1]);
    let padding = if horizontal { [radius, radius, 0, 0] } else { [0, 0, radius, radius] };
    image.pad(padding, "replicate", None).conv2d(&kernel, None::<Tensor>, [1, 1], [0, 0], [1, 1], channels)
}

/// Normalised Gaussian taps of standard deviation `sigma`, radius ⌈3σ⌉.
fn gaussian_taps(sigma: f64) -> Vec<f32> {
    let radius = (3.0 * sigma).ceil().max(1.0) as i64;
    let raw: Vec<f64> = (-radius..=radius).map(|i| (-(i * i) as f64 / (2.0 * sigma * sigma)).exp()).collect();
    let total: f64 = raw.iter().sum();
    raw.iter().map(|v| (v / total) as f32).collect()
}

/// Separable Gaussian blur of every channel (no-op for `sigma` ≤ 0).
pub(crate) fn gaussian_blur(image: &Tensor, sigma: f64) -> Tensor {
    if sigma <= 0.0 {
        return image.shallow_clone();
    }
    let taps = gaussian_taps(sigma);
    correlate_1d(&correlate_1d(image, &taps, true), &taps, false)
}

/// Image gradient `[N, 2C, H, W]` (all x derivatives, then all y derivatives) with the fourth-order
/// central difference `(f(x−2) − 8f(x−1) + 8f(x+1) − f(x+2)) / 12`, edges replicated.
pub(crate) fn image_gradient(image: &Tensor) -> Tensor {
    const TAPS: [f32; 5] = [1.0 / 12.0, -8.0 / 12.0, 0.0, 8.0 / 12.0, -1.0 / 12.0];
    Tensor::cat(&[correlate_1d(image, &TAPS, true), correlate_1d(image, &TAPS, false)], 1)
}

/// Forward differences `(f(x+1) − f(x), f(y+1) − f(y))` of every channel, 0 on the last column/row:
/// the textbook form that the solver's in-place and fused loops are tested against.
#[cfg(test)]
pub(crate) fn forward_differences(field: &Tensor) -> (Tensor, Tensor) {
    let (_, _, height, width) = field.size4().expect("[N, C, H, W]");
    let along_x = (field.narrow(3, 1, width - 1) - field.narrow(3, 0, width - 1)).pad([0, 1, 0, 0], "constant", 0.0);
    let along_y = (field.narrow(2, 1, height - 1) - field.narrow(2, 0, height - 1)).pad([0, 0, 0, 1], "constant", 0.0);
    (along_x, along_y)
}

/// Divergence of the vector field `(along_x, along_y)`, the negative adjoint of
/// [`forward_differences`] (backward differences with the matching boundary terms); like it, the
/// reference for the solver's loops.
#[cfg(test)]
pub(crate) fn divergence(along_x: &Tensor, along_y: &Tensor) -> Tensor {
    let (_, _, height, width) = along_x.size4().expect("[N, C, H, W]");
    let inner_x = along_x.narrow(3, 0, width - 1).pad([1, 1, 0, 0], "constant", 0.0);
    let inner_y = along_y.narrow(2, 0, height - 1).pad([0, 0, 1, 1], "constant", 0.0);
    let div_x = inner_x.narrow(3, 1, width) - inner_x.narrow(3, 0, width);
    let div_y = inner_y.narrow(2, 1, height) - inner_y.narrow(2, 0, height);
    div_x + div_y
}

/// Central differences `((f(x+1) − f(x−1)) / 2, (f(y+1) − f(y−1)) / 2)`, edges replicated.
pub(crate) fn central_differences(field: &Tensor) -> (Tensor, Tensor) {
    const TAPS: [f32; 3] = [-0.5, 0.0, 0.5];
    (correlate_1d(field, &TAPS, true), correlate_1d(field, &TAPS, false))
}

/// Median over the `(2·radius + 1)²` neighbourhood of every pixel, per channel, edges replicated.
pub(crate) fn median_filter(field: &Tensor, radius: i64) -> Tensor {
    match radius {
        ..=0 => field.shallow_clone(),
        1 => median_3x3(field),
        _ => median_by_sorting(field, radius),
    }
}

/// The middle one of three values, elementwise.
fn median_of_3(a: &Tensor, b: &Tensor, c: &Tensor) -> Tensor {
    a.minimum(b).maximum(&a.maximum(b).minimum(c))
}

/// 3×3 median with 36 elementwise min/max operations: sort every row of the window, then the
/// median is the middle of (largest row minimum, median of row middles, smallest row maximum).
fn median_3x3(field: &Tensor) -> Tensor {
    let (_, _, height, width) = field.size4().expect("[N, C, H, W]");
    let padded = field.pad([1, 1, 1, 1], "replicate", None);
    let at = |dy: i64, dx: i64| padded.narrow(2, dy, height).narrow(3, dx, width);
    let rows: Vec<[Tensor; 3]> = (0..3)
        .map(|dy| {
            let (a, b, c) = (at(dy, 0), at(dy, 1), at(dy, 2));
            [a.minimum(&b).minimum(&c), median_of_3(&a, &b, &c), a.maximum(&b).maximum(&c)]
        })
        .collect();
    let largest_minimum = rows[0][0].maximum(&rows[1][0]).maximum(&rows[2][0]);
    let middle_median = median_of_3(&rows[0][1], &rows[1][1], &rows[2][1]);
    let smallest_maximum = rows[0][2].minimum(&rows[1][2]).minimum(&rows[2][2]);
    median_of_3(&largest_minimum, &middle_median, &smallest_maximum)
}

/// Any-radius median by gathering every window and taking libtorch's median (slower).
fn median_by_sorting(field: &Tensor, radius: i64) -> Tensor {
    let (batch, channels, height, width) = field.size4().expect("[N, C, H, W]");
    let side = 2 * radius + 1;
    field
        .pad([radius, radius, radius, radius], "replicate", None)
        .unfold(2, side, 1)
        .unfold(3, side, 1)
        .reshape([batch, channels, height, width, side * side])
        .median_dim(-1, false)
        .0
}

/// The size `(height, width)` of the pyramid level below one of `(height, width)`.
pub(crate) fn coarser_size((height, width): (i64, i64), scale: f64) -> (i64, i64) {
    (((height as f64 * scale).round() as i64).max(1), ((width as f64 * scale).round() as i64).max(1))
}

/// Bilinear resize to `(height, width)` with pixel-area alignment (`align_corners = false`).
pub(crate) fn resize(image: &Tensor, (height, width): (i64, i64)) -> Tensor {
    image.upsample_bilinear2d([height, width], false, None, None)
}

/// A flow resized to `(height, width)`, its vectors rescaled to the new pixel size.
pub(crate) fn resize_flow(flow: &Tensor, (height, width): (i64, i64)) -> Tensor {
    let (_, _, old_height, old_width) = flow.size4().expect("flow [N, 2, H, W]");
    let ratios = [width as f32 / old_width as f32, height as f32 / old_height as f32];
    let ratios = constant(&ratios, &[1, 2, 1, 1], flow.device());
    resize(flow, (height, width)) * ratios
}

/// Pixel-centre coordinates `[1, 2, H, W]`: channel 0 is x (column), channel 1 is y (row).
pub(crate) fn pixel_grid(height: i64, width: i64, device: tch::Device) -> Tensor {
    let options = (Kind::Float, device);
    let xs = Tensor::arange(width, options).view([1, 1, 1, width]).expand([1, 1, height, width], false);
    let ys = Tensor::arange(height, options).view([1, 1, height, 1]).expand([1, 1, height, width], false);
    Tensor::cat(&[xs, ys], 1)
}

/// Samples `image` `[N, C, H, W]` at the pixel positions `positions` `[N, 2, H', W']` (x, y),
/// bicubically, with edge replication outside the frame.
pub(crate) fn sample_bicubic(image: &Tensor, positions: &Tensor) -> Tensor {
    let (_, _, height, width) = image.size4().expect("image [N, C, H, W]");
    let to_unit = [2.0 / (width - 1).max(1) as f32, 2.0 / (height - 1).max(1) as f32];
    let to_unit = constant(&to_unit, &[1, 2, 1, 1], image.device());
    let grid = (positions * to_unit - 1.0).permute([0, 2, 3, 1]);
    image.grid_sampler_2d(&grid, BICUBIC, BORDER, true)
}

/// 1 where `positions` `[N, 2, H, W]` lie inside the frame `[0, width − 1] × [0, height − 1]`, else 0.
pub(crate) fn inside_frame(positions: &Tensor, height: i64, width: i64) -> Tensor {
    let xs = positions.narrow(1, 0, 1);
    let ys = positions.narrow(1, 1, 1);
    let inside = xs.ge(0.0).logical_and(&xs.le((width - 1) as f64));
    let inside = inside.logical_and(&ys.ge(0.0)).logical_and(&ys.le((height - 1) as f64));
    inside.to_kind(Kind::Float)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    fn ramp(height: i64, width: i64) -> Tensor {
        let grid = pixel_grid(height, width, Device::Cpu);
        (grid.narrow(1, 0, 1) * 0.5 + grid.narrow(1, 1, 1) * 2.0).square()
    }

    #[test]
    fn constants_are_kept_per_value_shape_and_device() {
        let taps = constant(&[0.25, 0.5, 0.25], &[1, 1, 1, 3], Device::Cpu);
        assert_eq!(Vec::<f32>::try_from(taps.view(-1)).unwrap(), [0.25, 0.5, 0.25]);
        assert_eq!(taps.size(), [1, 1, 1, 3]);
        let again = constant(&[0.25, 0.5, 0.25], &[1, 1, 1, 3], Device::Cpu);
        assert_eq!(again.data_ptr(), taps.data_ptr(), "the same constant is kept, not copied again");
        let other_value = constant(&[0.25, 0.5, 0.5], &[1, 1, 1, 3], Device::Cpu);
        let other_shape = constant(&[0.25, 0.5, 0.25], &[1, 1, 3, 1], Device::Cpu);
        assert_ne!(other_value.data_ptr(), taps.data_ptr());
        assert_eq!(other_shape.size(), [1, 1, 3, 1]);
        for step in 0..KEPT_CONSTANTS {
            let _ = constant(&[step as f32], &[1], Device::Cpu);
        }
        let after_the_bound = constant(&[0.25, 0.5, 0.25], &[1, 1, 1, 3], Device::Cpu);
        assert_ne!(after_the_bound.data_ptr(), taps.data_ptr(), "a thread keeps at most {KEPT_CONSTANTS}");
        assert!(after_the_bound.equal(&taps));
    }

    #[test]
    fn divergence_is_the_negative_adjoint_of_forward_differences() {
        let field = crate::seeded::normal(&[1, 2, 7, 9], 31);
        let (px, py) = (crate::seeded::normal(&[1, 2, 7, 9], 32), crate::seeded::normal(&[1, 2, 7, 9], 33));
        let (gx, gy) = forward_differences(&field);
        let lhs = (gx * &px + gy * &py).sum(Kind::Double).double_value(&[]);
        let rhs = -(field * divergence(&px, &py)).sum(Kind::Double).double_value(&[]);
        assert!((lhs - rhs).abs() < 1e-3, "{lhs} vs {rhs}");
    }

    #[test]
    fn image_gradient_is_exact_on_a_quadratic_inside() {
        let image = ramp(12, 12);
        let gradient = image_gradient(&image);
        // f = (x/2 + 2y)²: ∂f/∂x = (x/2 + 2y), ∂f/∂y = 4(x/2 + 2y), at (x, y) = (5, 6).
        let base = 5.0 * 0.5 + 2.0 * 6.0;
        assert!((gradient.double_value(&[0, 0, 6, 5]) - base).abs() < 1e-3);
        assert!((gradient.double_value(&[0, 1, 6, 5]) - 4.0 * base).abs() < 1e-3);
    }

    #[test]
    fn median_filter_removes_an_outlier() {
        let mut values = vec![1.0f32; 25];
        values[12] = 100.0;
        let field = Tensor::from_slice(&values).view([1, 1, 5, 5]);
        assert_eq!(median_filter(&field, 1).max().double_value(&[]), 1.0);
    }

    #[test]
    fn fast_3x3_median_agrees_with_sorting_on_every_binary_window_and_on_noise() {
        // Min/max networks select correctly on all inputs iff they do on all 0/1 inputs.
        let patterns: Vec<f32> = (0..512u32).flat_map(|bits| (0..9).map(move |i| ((bits >> i) & 1) as f32)).collect();
        let windows = Tensor::from_slice(&patterns).view([512, 1, 3, 3]);
        let centre = |t: Tensor| t.narrow(2, 1, 1).narrow(3, 1, 1);
        assert!(centre(median_3x3(&windows)).equal(&centre(median_by_sorting(&windows, 1))));
        let noise = crate::seeded::normal(&[2, 2, 9, 11], 34);
        assert!(median_3x3(&noise).equal(&median_by_sorting(&noise, 1)));
    }

    #[test]
    fn sampling_at_pixel_centres_returns_the_pixels() {
        let image = ramp(6, 8);
        let back = sample_bicubic(&image, &pixel_grid(6, 8, Device::Cpu));
        assert!((back - &image).abs().max().double_value(&[]) < 1e-3);
    }
}
