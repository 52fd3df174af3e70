//! Moving the previous painted frame along the flow without softening it. A painting is carried from
//! frame to frame dozens of times; bilinear interpolation blurs it a little at every fractional
//! displacement (even the sub-pixel flow noise of a still background), and the blur compounds until
//! the brush strokes are gone. Bicubic interpolation keeps most of the detail, so the carried frame
//! stays a painting. (E_warp, a measure, keeps the bilinear `flow::warp` of its definition.)

use tch::{Kind, Tensor};

/// `grid_sampler_2d` interpolation mode: bicubic.
const BICUBIC: i64 = 2;
/// `grid_sampler_2d` padding mode: replicate the border.
const BORDER: i64 = 1;

/// `image` `[N, C, H, W]` pulled along the backward flow `flow` `[N, 2, H, W]` (pixels, x then y;
/// the conventions of `flow::warp`), interpolated bicubically and clamped to 0..1. Outside the frame
/// the border is replicated.
pub fn warp_bicubic(image: &Tensor, flow: &Tensor) -> Tensor {
    let (_, _, height, width) = image.size4().expect("image [N, C, H, W]");
    let device = image.device();
    let xs = Tensor::arange(width, (Kind::Float, device)).view([1, 1, width]);
    let ys = Tensor::arange(height, (Kind::Float, device)).view([1, height, 1]);
    let x = flow.select(1, 0) + xs;
    let y = flow.select(1, 1) + ys;
    let normalise = |coordinate: Tensor, extent: i64| coordinate * (2.0 / (extent - 1).max(1) as f64) - 1.0;
    let grid = Tensor::stack(&[normalise(x, width), normalise(y, height)], 3);
    image.to_kind(Kind::Float).grid_sampler_2d(&grid, BICUBIC, BORDER, true).clamp(0.0, 1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn constant_flow(dx: f32, dy: f32, height: i64, width: i64) -> Tensor {
        Tensor::from_slice(&[dx, dy]).view([1, 2, 1, 1]).expand([1, 2, height, width], false).contiguous()
    }

    #[test]
    fn integer_shifts_move_pixels_like_the_bilinear_warp() {
        let image = crate::seeded::uniform(&[1, 3, 10, 12], 61);
        let flow = constant_flow(2.0, -1.0, 10, 12);
        let difference = (warp_bicubic(&image, &flow) - crate::flow::warp(&image, &flow)).abs().max();
        assert!(difference.double_value(&[]) < 1e-5);
    }

    #[test]
    fn repeated_half_pixel_shifts_keep_more_detail_than_bilinear() {
        let image = crate::seeded::uniform(&[1, 3, 32, 32], 4);
        let (there, back) = (constant_flow(0.5, 0.0, 32, 32), constant_flow(-0.5, 0.0, 32, 32));
        let (mut bicubic, mut bilinear) = (image.copy(), image.copy());
        for _ in 0..4 {
            bicubic = warp_bicubic(&warp_bicubic(&bicubic, &there), &back);
            bilinear = crate::flow::warp(&crate::flow::warp(&bilinear, &there), &back);
        }
        let inner = |t: &Tensor| t.narrow(3, 4, 24).std(true).double_value(&[]);
        assert!(inner(&bicubic) > inner(&bilinear) * 1.2, "{} vs {}", inner(&bicubic), inner(&bilinear));
    }
}
