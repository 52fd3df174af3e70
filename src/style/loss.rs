//! The loss terms of Gatys et al. (2015), exactly as the paper writes them, plus total variation.
//! Features are ReLU outputs `[1, N, h, w]` (N filters, M = h·w positions), f32; the `item_` forms
//! take a batch `[B, N, h, w]` and give each item's value, `[B]`.
//! - content: ½ Σ (F − P)²
//! - Gram: G = F Fᵀ (`[N, N]`, not divided by anything)
//! - style layer: E_l = Σ (G − A)² / (4 N² M²)
//! - total variation: Σ of squared differences between neighbouring pixels.

use tch::{Kind, Tensor};

/// Features `[1, N, h, w]` as the matrix F `[N, M]`.
fn as_matrix(features: &Tensor) -> Tensor {
    let size = features.size();
    let channels = size[1];
    features.reshape([channels, -1])
}

/// The Gram matrix G = F Fᵀ of features `[1, N, h, w]`, computed in f32.
pub fn gram(features: &Tensor) -> Tensor {
    let f = as_matrix(&features.to_kind(Kind::Float));
    symmetric_product(&f, &f)
}

/// `left` `[N, M]` times `right`ᵀ, where both are the same features (`left` perhaps weighted per
/// position), so the product is symmetric. The gradient is taken as 2·∂G·F through `left` alone:
/// one matrix product in the backward pass, where autograd's own would take two, one of them into a
/// transposed matrix (a third of the Gram's time at 256², measured on a CPU). That is the whole
/// gradient only if what the caller makes of the product sends back a symmetric ∂G, as every loss
/// here does (Σ (G − A)² with A symmetric, and sums and scalings of such).
pub fn symmetric_product(left: &Tensor, right: &Tensor) -> Tensor {
    debug_assert!(left.requires_grad() || !right.requires_grad(), "the gradient goes through `left`");
    let product = left.mm(&right.detach().tr());
    if !product.requires_grad() {
        return product;
    }
    &product * 2.0 - product.detach()
}

/// Each item's Gram matrix, `[B, N, N]` in f32, of features `[B, N, h, w]`: one matrix product
/// per item, as [`gram`] takes it (a batched product would be slower and, on NHWC activations, give
/// gradients in the other layout).
pub fn item_grams(features: &Tensor) -> Tensor {
    let items = features.size()[0];
    if items == 1 {
        return gram(features).unsqueeze(0);
    }
    Tensor::stack(&(0..items).map(|item| gram(&features.narrow(0, item, 1))).collect::<Vec<_>>(), 0)
}

/// Σ over each item of `values` `[B, …]`: `[B]` in f32 (no flattening: that would copy NHWC
/// activations, and their gradients would come back NCHW).
pub fn item_sums(values: &Tensor) -> Tensor {
    values.sum_dim_intlist(item_dims(values), false, Kind::Float)
}

/// Every dimension of `values` but the first.
pub fn item_dims(values: &Tensor) -> Vec<i64> {
    (1..values.dim() as i64).collect()
}

/// ½ Σ (F − P)² of each item: `[B]`.
pub fn item_content_losses(features: &Tensor, target: &Tensor) -> Tensor {
    item_sums(&(features - target).square()) * 0.5
}

/// E_l of each item of features `[B, N, h, w]` against target Grams `[B, N, N]` (or one `[N, N]`
/// for all): `[B]`.
pub fn item_style_losses(features: &Tensor, target_grams: &Tensor) -> Tensor {
    let size = features.size();
    let (filters, positions) = (size[1] as f64, (size[2] * size[3]) as f64);
    item_sums(&(item_grams(features) - target_grams).square()) / (4.0 * filters * filters * positions * positions)
}

/// [`total_variation`] of each item of `[B, 3, H, W]`: `[B]`.
pub fn item_total_variation(image: &Tensor) -> Tensor {
    let (_, _, h, w) = image.size4().expect("image [B, 3, H, W]");
    let dx = image.narrow(3, 1, w - 1) - image.narrow(3, 0, w - 1);
    let dy = image.narrow(2, 1, h - 1) - image.narrow(2, 0, h - 1);
    item_sums(&dx.square()) + item_sums(&dy.square())
}

/// ½ Σ (F − P)².
pub fn content_loss(features: &Tensor, target: &Tensor) -> Tensor {
    (features - target).square().sum(Kind::Float) * 0.5
}

/// E_l = Σ (G − A)² / (4 N² M²) for features `[1, N, h, w]` and target Gram A.
pub fn style_layer_loss(features: &Tensor, target_gram: &Tensor) -> Tensor {
    let size = features.size();
    style_layer_loss_of_gram(&gram(features), target_gram, size[2] * size[3])
}

/// E_l = Σ (G − A)² / (4 N² M²) from the Gram G itself, with M feature positions.
pub fn style_layer_loss_of_gram(gram: &Tensor, target_gram: &Tensor, positions: i64) -> Tensor {
    let filters = gram.size()[0] as f64;
    let positions = positions as f64;
    (gram - target_gram).square().sum(Kind::Float) / (4.0 * filters * filters * positions * positions)
}

/// Σ over the image of squared differences between horizontal and vertical neighbours.
pub fn total_variation(image: &Tensor) -> Tensor {
    let (_, _, h, w) = image.size4().expect("image [1, 3, H, W]");
    let dx = image.narrow(3, 1, w - 1) - image.narrow(3, 0, w - 1);
    let dy = image.narrow(2, 1, h - 1) - image.narrow(2, 0, h - 1);
    dx.square().sum(Kind::Float) + dy.square().sum(Kind::Float)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    fn features(seed: u64) -> Tensor {
        crate::seeded::uniform(&[1, 3, 2, 2], seed)
    }

    #[test]
    fn gram_matches_hand_computation() {
        // two filters, three positions
        let f = Tensor::from_slice(&[1.0f32, 2.0, 3.0, 0.0, 1.0, 4.0]).view([1, 2, 1, 3]);
        let g = gram(&f);
        let expected = [[14.0, 14.0], [14.0, 17.0]];
        for (i, row) in expected.iter().enumerate() {
            for (j, value) in row.iter().enumerate() {
                assert_eq!(g.double_value(&[i as i64, j as i64]), *value);
            }
        }
    }

    #[test]
    fn style_layer_loss_matches_hand_computation() {
        let f = Tensor::from_slice(&[1.0f32, 2.0, 3.0, 0.0, 1.0, 4.0]).view([1, 2, 1, 3]);
        let a = Tensor::from_slice(&[10.0f32, 14.0, 14.0, 20.0]).view([2, 2]);
        // G − A = [[4, 0], [0, −3]] → Σ = 25; N = 2, M = 3 → 25 / (4·4·9)
        let e = style_layer_loss(&f, &a).double_value(&[]);
        assert!((e - 25.0 / 144.0).abs() < 1e-6, "{e}");
    }

    #[test]
    fn content_gradient_is_the_difference() {
        let f = features(1).set_requires_grad(true);
        let p = features(2);
        content_loss(&f, &p).backward();
        let expected = &f.detach() - &p;
        assert!(f.grad().allclose(&expected, 1e-6, 1e-6, false));
    }

    #[test]
    fn style_gradient_matches_the_paper() {
        // ∂E_l/∂F = (Fᵀ (G − A))ᵀ / (N² M²) for F ≥ 0 (Gatys et al. 2015, Methods)
        let f = features(3).set_requires_grad(true);
        let a = gram(&features(4));
        style_layer_loss(&f, &a).backward();
        let matrix = f.detach().reshape([3, 4]);
        let g = matrix.matmul(&matrix.tr());
        let expected = (matrix.tr().matmul(&(g - &a))).tr() / (9.0 * 16.0);
        assert!(f.grad().reshape([3, 4]).allclose(&expected, 1e-5, 1e-6, false));
    }

    #[test]
    fn item_forms_give_each_item_its_own_value() {
        let batch = Tensor::cat(&[features(5), features(6)], 0);
        let targets = Tensor::cat(&[features(7), features(8)], 0);
        let style = gram(&features(9));
        let contents = item_content_losses(&batch, &targets);
        let styles = item_style_losses(&batch, &style);
        let smoothness = item_total_variation(&batch);
        for item in 0..2 {
            let (f, p) = (batch.narrow(0, item, 1), targets.narrow(0, item, 1));
            let close = |a: f64, b: f64| (a - b).abs() <= 1e-5 * b.abs().max(1e-6);
            assert!(close(contents.double_value(&[item]), content_loss(&f, &p).double_value(&[])));
            assert!(close(styles.double_value(&[item]), style_layer_loss(&f, &style).double_value(&[])));
            assert!(close(smoothness.double_value(&[item]), total_variation(&f).double_value(&[])));
            assert!(item_grams(&batch).get(item).allclose(&gram(&f), 1e-6, 1e-6, false));
        }
    }

    #[test]
    fn total_variation_of_a_step() {
        let image = Tensor::zeros([1, 3, 2, 3], (Kind::Float, Device::Cpu));
        let _ = image.narrow(3, 2, 1).fill_(1.0);
        // each channel: two rows with one step of 1 → 2; three channels → 6
        assert_eq!(total_variation(&image).double_value(&[]), 6.0);
    }
}
