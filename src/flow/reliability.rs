//! Where the flow can be trusted, following Ruder, Dosovitskiy and Brox, "Artistic style transfer
//! for videos" (2016), section 3.2. With `w` the forward flow (on the previous frame) and `ŵ` the
//! backward flow (on the current frame), `w̃(x) = w(x + ŵ(x))` is the forward flow fetched at the
//! point each pixel came from. Where nothing was occluded, `w̃ ≈ −ŵ`; the paper flags
//! disocclusions where `|w̃ + ŵ|² > 0.01(|w̃|² + |ŵ|²) + 0.5`, and motion boundaries where
//! `|∇û|² + |∇v̂|² > 0.01|ŵ|² + 0.002`. As in the authors' reference checker, a pixel whose
//! source `x + ŵ(x)` lies outside the previous frame also counts as disoccluded. The masks here are
//! the paper's binary ones (the reference tool additionally blurs its mask; we do not).

use tch::{Kind, Tensor};

use super::ops::central_differences;
use super::warp::{source_in_frame, warp};

/// Relative tolerance of the forward–backward test.
const CONSISTENCY_RELATIVE: f64 = 0.01;
/// Absolute tolerance of the forward–backward test, px².
const CONSISTENCY_ABSOLUTE: f64 = 0.5;
/// Relative tolerance of the motion-boundary test.
const BOUNDARY_RELATIVE: f64 = 0.01;
/// Absolute tolerance of the motion-boundary test.
const BOUNDARY_ABSOLUTE: f64 = 0.002;

/// Squared length of the vectors of a flow `[N, 2, H, W]`, as `[N, 1, H, W]`.
fn squared_length(flow: &Tensor) -> Tensor {
    flow.square().sum_dim_intlist(1, true, Kind::Float)
}

/// 1 where a pixel of the current frame was not visible in the previous one (the forward–backward
/// check fails or its source lies outside the previous frame), else 0; `[N, 1, H, W]`.
/// `forward` lives on the previous frame, `backward` on the current one (both `[N, 2, H, W]`).
pub fn disocclusions(forward: &Tensor, backward: &Tensor) -> Tensor {
    assert_eq!(forward.size(), backward.size(), "forward and backward flows differ in shape");
    let forward_at_source = warp(forward, backward);
    let mismatch = squared_length(&(&forward_at_source + backward));
    let tolerance =
        (squared_length(&forward_at_source) + squared_length(backward)) * CONSISTENCY_RELATIVE + CONSISTENCY_ABSOLUTE;
    let inconsistent = mismatch.gt_tensor(&tolerance);
    let outside = source_in_frame(backward).eq(0.0);
    inconsistent.logical_or(&outside).to_kind(Kind::Float)
}

/// 1 on motion boundaries of the backward flow `[N, 2, H, W]` (its gradient is large for its
/// length), else 0; `[N, 1, H, W]`. Derivatives are central differences.
pub fn motion_boundaries(backward: &Tensor) -> Tensor {
    let (along_x, along_y) = central_differences(backward);
    let gradient_energy = squared_length(&along_x) + squared_length(&along_y);
    let tolerance = squared_length(backward) * BOUNDARY_RELATIVE + BOUNDARY_ABSOLUTE;
    gradient_energy.gt_tensor(&tolerance).to_kind(Kind::Float)
}

/// The reliability mask of the current frame `[N, 1, H, W]`: 1 where the warped previous frame
/// can be trusted, 0 at disocclusions and motion boundaries. `forward` lives on the previous
/// frame, `backward` on the current one (see [`super::FlowPair`]).
pub fn reliability(forward: &Tensor, backward: &Tensor) -> Tensor {
    let flagged = disocclusions(forward, backward).maximum(&motion_boundaries(backward));
    flagged.neg() + 1.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn constant_flow(dx: f32, dy: f32, height: i64, width: i64) -> Tensor {
        Tensor::from_slice(&[dx, dy]).view([1, 2, 1, 1]).expand([1, 2, height, width], false).contiguous()
    }

    #[test]
    fn consistent_translation_is_reliable_except_where_it_enters() {
        let (forward, backward) = (constant_flow(-3.0, 0.0, 8, 10), constant_flow(3.0, 0.0, 8, 10));
        let mask = reliability(&forward, &backward);
        // Sources x + 3 > 9 for the last three columns: disoccluded.
        assert_eq!(mask.narrow(3, 0, 7).min().double_value(&[]), 1.0);
        assert_eq!(mask.narrow(3, 7, 3).max().double_value(&[]), 0.0);
    }

    #[test]
    fn inconsistent_flows_are_flagged() {
        let (forward, backward) = (constant_flow(0.0, 0.0, 6, 6), constant_flow(0.0, 1.0, 6, 6));
        let flagged = disocclusions(&forward, &backward);
        // |w̃ + ŵ|² = 1 > 0.01·1 + 0.5 on every pixel.
        assert_eq!(flagged.narrow(2, 0, 5).min().double_value(&[]), 1.0);
    }

    #[test]
    fn a_step_in_the_flow_is_a_motion_boundary() {
        let left = constant_flow(0.0, 0.0, 6, 4);
        let right = constant_flow(2.0, 0.0, 6, 4);
        let flow = Tensor::cat(&[left, right], 3);
        let boundary = motion_boundaries(&flow);
        let columns: Vec<f32> = boundary.get(0).get(0).get(2).try_into().unwrap();
        assert_eq!(columns, vec![0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0]);
    }
}
