//! Moving an image along a flow: the previous stylised frame is pulled into the current frame with
//! the backward flow, so that the temporal loss can compare like with like.

use tch::{Kind, Tensor};

use super::ops::{inside_frame, pixel_grid};

/// Pixel positions `p + flow(p)` `[N, 2, H, W]` that a backward flow points at.
fn source_positions(flow: &Tensor) -> Tensor {
    let (_, channels, height, width) = flow.size4().expect("flow [N, 2, H, W]");
    assert_eq!(channels, 2, "a flow has two channels (dx, dy)");
    pixel_grid(height, width, flow.device()) + flow
}

/// The two neighbouring integer coordinates of `coordinate` (clamped to `0..=last`) along one axis,
/// and the weight of the second: `coordinate = (1 − weight)·low + weight·high`.
fn neighbours(coordinate: &Tensor, last: i64) -> (Tensor, Tensor, Tensor) {
    let clamped = coordinate.clamp(0.0, last as f64);
    let low = clamped.floor().clamp_max((last - 1).max(0) as f64);
    let weight = &clamped - &low;
    let high = (&low + 1.0).clamp_max(last as f64);
    (low.to_kind(Kind::Int64), high.to_kind(Kind::Int64), weight)
}

/// `image` `[N, C, H, W]` pulled along the backward flow `flow` `[N, 2, H, W]`: output pixel `p`
/// is `image` at `p + flow(p)`, interpolated bilinearly. Positions outside the frame are clamped to
/// it, so they take the value of the nearest edge pixel (edge replication, no black bands); use
/// [`source_in_frame`] or the reliability mask to leave those pixels out of a loss. Integer flows
/// move pixels exactly (bit for bit). Differentiable with respect to `image` and, inside the frame,
/// `flow`.
///
/// # Panics
/// If the shapes are not `[N, C, H, W]` and `[N, 2, H, W]` with the same N, H and W.
pub fn warp(image: &Tensor, flow: &Tensor) -> Tensor {
    let (batch, channels, height, width) = image.size4().expect("image [N, C, H, W]");
    let (flow_batch, _, flow_height, flow_width) = flow.size4().expect("flow [N, 2, H, W]");
    assert_eq!((batch, height, width), (flow_batch, flow_height, flow_width), "image and flow sizes differ");
    let positions = source_positions(&flow.to_kind(image.kind()));
    let (left, right, right_weight) = neighbours(&positions.narrow(1, 0, 1), width - 1);
    let (top, bottom, bottom_weight) = neighbours(&positions.narrow(1, 1, 1), height - 1);
    let pixels = image.flatten(2, 3);
    let fetch = |row: &Tensor, column: &Tensor| {
        let index = (row * width + column).flatten(2, 3).expand([batch, channels, height * width], false);
        pixels.gather(2, &index, false).view([batch, channels, height, width])
    };
    let upper = fetch(&top, &left) * (1.0 - &right_weight) + fetch(&top, &right) * &right_weight;
    let lower = fetch(&bottom, &left) * (1.0 - &right_weight) + fetch(&bottom, &right) * &right_weight;
    upper * (1.0 - &bottom_weight) + lower * bottom_weight
}

/// 1 where the backward flow `flow` `[N, 2, H, W]` points inside its frame (so [`warp`] reads real
/// pixels rather than replicated edges), 0 elsewhere; `[N, 1, H, W]`.
pub fn source_in_frame(flow: &Tensor) -> Tensor {
    let (_, _, height, width) = flow.size4().expect("flow [N, 2, H, W]");
    inside_frame(&source_positions(flow), height, width)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Kind;

    fn constant_flow(dx: f32, dy: f32, height: i64, width: i64) -> Tensor {
        Tensor::from_slice(&[dx, dy]).view([1, 2, 1, 1]).expand([1, 2, height, width], false).contiguous()
    }

    #[test]
    fn integer_shift_moves_pixels_exactly() {
        let image = crate::seeded::uniform(&[1, 3, 10, 12], 51);
        let warped = warp(&image, &constant_flow(3.0, -2.0, 10, 12));
        // Output (x, y) reads input (x + 3, y − 2): compare where that is inside the frame.
        let expected = image.narrow(2, 0, 8).narrow(3, 3, 9);
        let got = warped.narrow(2, 2, 8).narrow(3, 0, 9);
        assert_eq!((got - expected).abs().max().double_value(&[]), 0.0);
    }

    #[test]
    fn outside_the_frame_replicates_the_edge_and_is_flagged() {
        let image = crate::seeded::uniform(&[1, 1, 4, 5], 52);
        let flow = constant_flow(2.0, 0.0, 4, 5);
        let warped = warp(&image, &flow);
        let last_column = image.narrow(3, 4, 1);
        assert_eq!((warped.narrow(3, 3, 2) - last_column).abs().max().double_value(&[]), 0.0);
        let inside = source_in_frame(&flow);
        assert_eq!(inside.sum(Kind::Float).double_value(&[]), 4.0 * 3.0);
        assert_eq!(inside.narrow(3, 3, 2).sum(Kind::Float).double_value(&[]), 0.0);
    }

    #[test]
    fn half_pixel_shift_averages_neighbours() {
        let image = Tensor::from_slice(&[0.0f32, 1.0, 4.0, 9.0]).view([1, 1, 1, 4]);
        let warped = warp(&image, &constant_flow(0.5, 0.0, 1, 4));
        let values: Vec<f32> = warped.flatten(0, -1).try_into().unwrap();
        assert_eq!(values, vec![0.5, 2.5, 6.5, 9.0]);
    }
}
