//! How far a frame strays from the previous one moved along the flow: the temporal loss the
//! optimiser minimises (Ruder et al. 2016) and the warping error E_warp of Lai et al. (2018) that the
//! evaluation report quotes.

use tch::{Kind, Tensor};

use super::warp::warp;

/// Per-pixel squared colour distance `Σ_c (a − b)²` of two `[N, C, H, W]` images, `[N, 1, H, W]`.
fn squared_colour_distance(a: &Tensor, b: &Tensor) -> Tensor {
    (a - b).square().sum_dim_intlist(1, true, Kind::Float)
}

/// The temporal loss `mean_p( mask(p) · Σ_c (x(c, p) − warped(c, p))² )`: the squared difference
/// summed over the channels of each pixel, weighted by the reliability mask and averaged over all
/// N·H·W pixels (masked-out pixels count in the average as zeros). This is C times the loss of Ruder
/// et al. (2016), who divide by D = C·H·W. `x` is the image being optimised `[N, C, H, W]`,
/// `warped` the previous output moved onto this frame (treated as a constant by the caller, who
/// should pass it detached), `mask` `[N, 1, H, W]`. Returns a scalar tensor; its gradient with
/// respect to `x` is `2·mask·(x − warped) / (N·H·W)`.
///
/// # Panics
/// If the shapes do not broadcast as described.
pub fn temporal_loss(x: &Tensor, warped: &Tensor, mask: &Tensor) -> Tensor {
    (squared_colour_distance(x, warped) * mask).mean(Kind::Float)
}

/// [`temporal_loss`] of each item of a batch `[B, C, H, W]` (averaged over its own H·W pixels): `[B]`.
pub fn item_temporal_losses(x: &Tensor, warped: &Tensor, mask: &Tensor) -> Tensor {
    let distances = squared_colour_distance(x, warped) * mask;
    distances.mean_dim([1i64, 2, 3].as_slice(), false, Kind::Float)
}

/// The warping error E_warp of Lai et al. (2018) between two consecutive output frames:
/// `Σ_p M(p)·‖out_t(p) − warp(out_prev, flow)(p)‖² / Σ_p M(p)`, the squared distance summed over
/// the RGB channels (0..1) and averaged over the reliable pixels. `flow` is the backward flow of the
/// *input* frames (on frame t) and `mask` its reliability mask `[N, 1, H, W]`. A video's E_warp is
/// the mean over its frame pairs. `None` when no pixel is reliable (e.g. across a scene cut).
pub fn warping_error(out_t: &Tensor, out_prev: &Tensor, flow: &Tensor, mask: &Tensor) -> Option<f64> {
    tch::no_grad(|| {
        let aligned_prev = warp(&out_prev.to_kind(Kind::Float), flow);
        let distance = squared_colour_distance(&out_t.to_kind(Kind::Float), &aligned_prev);
        let reliable_pixels = mask.sum(Kind::Double).double_value(&[]);
        let masked_total = (distance * mask).sum(Kind::Double).double_value(&[]);
        (reliable_pixels > 0.0).then(|| masked_total / reliable_pixels)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    #[test]
    fn gradient_matches_the_formula() {
        let x = crate::seeded::uniform(&[2, 3, 5, 6], 3).set_requires_grad(true);
        let warped = crate::seeded::uniform(&[2, 3, 5, 6], 4);
        let mask = crate::seeded::uniform(&[2, 1, 5, 6], 5).gt(0.3).to_kind(Kind::Float);
        let loss = temporal_loss(&x, &warped, &mask);
        let expected_loss = ((&x - &warped).square() * &mask).sum(Kind::Float) / (2.0 * 5.0 * 6.0);
        assert!((&loss - expected_loss).abs().double_value(&[]) < 1e-6);
        loss.backward();
        let expected_gradient = (&x - &warped) * &mask * 2.0 / (2.0 * 5.0 * 6.0);
        assert!((x.grad() - expected_gradient).abs().max().double_value(&[]) < 1e-7);
    }

    #[test]
    fn warping_error_averages_over_reliable_pixels_only() {
        let options = (Kind::Float, Device::Cpu);
        let flow = Tensor::zeros([1, 2, 4, 4], options);
        let prev = Tensor::zeros([1, 3, 4, 4], options);
        let current = prev.full_like(0.5);
        let mut mask_values = vec![0.0f32; 16];
        mask_values[..4].fill(1.0);
        let mask = Tensor::from_slice(&mask_values).view([1, 1, 4, 4]);
        let error = warping_error(&current, &prev, &flow, &mask).unwrap();
        assert!((error - 3.0 * 0.25).abs() < 1e-9, "{error}");
        assert_eq!(warping_error(&current, &prev, &flow, &mask.zeros_like()), None);
    }
}
