//! Large frames in overlapping tiles, so that a 4K frame fits a card whose memory holds only a
//! tile's activations. Tile windows start on multiples of 16 pixels (the network's deepest pooling
//! stride), so each tile's feature grid lines up with the whole image's at every layer. Each pixel
//! belongs to the tiles covering it with feathered weights (linear ramps across the overlaps) that
//! sum to one; the same weights, averaged down to each layer's stride, weigh every tile's feature
//! positions. The style statistics are taken over the whole frame: a Gram matrix is the weighted
//! sum of the tiles' Gram matrices, so the style loss — and its gradient — see one image.

use tch::{Device, Kind, Tensor};

/// Pixel alignment of tile windows: the stride of the deepest layers (after four 2× poolings).
pub const ALIGN: i64 = 16;

/// One tile: its pixel window and its share of each pixel in it.
pub struct Tile {
    /// Top row of the window.
    pub top: i64,
    /// Left column of the window.
    pub left: i64,
    /// Window height.
    pub height: i64,
    /// Window width.
    pub width: i64,
    /// `[1, 1, height, width]` f32: this tile's share of each pixel.
    weight: Tensor,
}

/// The tiles of an image.
pub struct TileGrid {
    tiles: Vec<Tile>,
}

impl Tile {
    /// This tile's window of `image` `[1, C, H, W]` (a view: gradients flow back into `image`).
    pub fn window(&self, image: &Tensor) -> Tensor {
        image.narrow(2, self.top, self.height).narrow(3, self.left, self.width)
    }

    /// This tile's window of a feature map of the whole image at `stride`.
    pub fn feature_window(&self, features: &Tensor, stride: i64) -> Tensor {
        let size = features.size();
        let (top, left) = (self.top / stride, self.left / stride);
        let height = (self.height / stride).min(size[2] - top);
        let width = (self.width / stride).min(size[3] - left);
        features.narrow(2, top, height).narrow(3, left, width)
    }

    /// The tile's share of each of its feature positions at `stride` (`[1, 1, h, w]`).
    pub fn feature_weight(&self, stride: i64) -> Tensor {
        if stride == 1 {
            return self.weight.shallow_clone();
        }
        self.weight.avg_pool2d([stride, stride], [stride, stride], [0, 0], false, true, None::<i64>)
    }
}

impl TileGrid {
    /// Tiles of about `tile` pixels overlapping by about `overlap` for an image of `height` ×
    /// `width`; `None` when `tile` is 0 or one tile covers the image.
    pub fn plan(height: i64, width: i64, tile: u32, overlap: u32, device: Device) -> Option<TileGrid> {
        Self::needed(height, width, tile).then(|| Self::plan_always(height, width, tile, overlap, device))
    }

    /// Whether an image of `height` × `width` is split into tiles of `tile` pixels (0: never).
    pub fn needed(height: i64, width: i64, tile: u32) -> bool {
        tile != 0 && (height > tile as i64 || width > tile as i64)
    }

    /// Like [`TileGrid::plan`], even when one tile covers the image.
    pub fn plan_always(height: i64, width: i64, tile: u32, overlap: u32, device: Device) -> TileGrid {
        let rows = windows(height, tile as i64, overlap as i64);
        let columns = windows(width, tile as i64, overlap as i64);
        let overlap = aligned_overlap(tile as i64, overlap as i64) as f64;
        let mut raw = Vec::new();
        for &(top, bottom) in &rows {
            let vertical = ramp(top, bottom, height, overlap, device);
            for &(left, right) in &columns {
                let horizontal = ramp(left, right, width, overlap, device);
                raw.push((
                    (top, left, bottom - top, right - left),
                    vertical.view([1, 1, -1, 1]) * horizontal.view([1, 1, 1, -1]),
                ));
            }
        }
        let total = Tensor::zeros([1, 1, height, width], (Kind::Float, device));
        for ((top, left, h, w), weight) in &raw {
            let mut window = total.narrow(2, *top, *h).narrow(3, *left, *w);
            let _ = window.f_add_(weight);
        }
        let tiles = raw
            .into_iter()
            .map(|((top, left, height, width), weight)| {
                let share = weight / total.narrow(2, top, height).narrow(3, left, width);
                Tile { top, left, height, width, weight: share }
            })
            .collect();
        TileGrid { tiles }
    }

    /// The tiles, row by row.
    pub fn tiles(&self) -> &[Tile] {
        &self.tiles
    }
}

/// The overlap in effect: a multiple of [`ALIGN`], at least one and less than the tile.
fn aligned_overlap(tile: i64, overlap: i64) -> i64 {
    let tile = aligned_tile(tile);
    (((overlap + ALIGN - 1) / ALIGN) * ALIGN).clamp(ALIGN, tile - ALIGN)
}

/// The tile side in effect: a multiple of [`ALIGN`], at least four of them.
fn aligned_tile(tile: i64) -> i64 {
    (((tile + ALIGN - 1) / ALIGN) * ALIGN).max(4 * ALIGN)
}

/// Windows `[start, end)` along a side of `length`: starts on multiples of [`ALIGN`], each
/// overlapping the next, the last one ending at the border.
fn windows(length: i64, tile: i64, overlap: i64) -> Vec<(i64, i64)> {
    let tile = aligned_tile(tile);
    let step = tile - aligned_overlap(tile, overlap);
    let mut windows = Vec::new();
    let mut start = 0;
    while start + tile < length {
        windows.push((start, start + tile));
        start += step;
    }
    windows.push((start, length));
    windows
}

/// A window's raw weight along one side: 1 inside, falling linearly to nearly 0 across `overlap`
/// pixels at an edge shared with another window (not at the image's border).
fn ramp(start: i64, end: i64, length: i64, overlap: f64, device: Device) -> Tensor {
    let values: Vec<f32> = (start..end)
        .map(|i| {
            let from_start = if start == 0 { f64::INFINITY } else { (i - start) as f64 + 0.5 };
            let from_end = if end == length { f64::INFINITY } else { (end - i) as f64 - 0.5 };
            (from_start.min(from_end) / overlap).clamp(1e-3, 1.0) as f32
        })
        .collect();
    Tensor::from_slice(&values).to_device(device)
}

/// The Gram matrix of features `[1, N, h, w]` with each position weighted: (F·w) Fᵀ, in f32.
pub fn weighted_gram(features: &Tensor, weight: &Tensor) -> Tensor {
    let features = features.to_kind(Kind::Float);
    let channels = features.size()[1];
    let weighted = (&features * weight).reshape([channels, -1]);
    super::loss::symmetric_product(&weighted, &features.reshape([channels, -1]))
}

/// ½ Σ w (F − P)², the content loss with each position weighted.
pub fn weighted_content_loss(features: &Tensor, target: &Tensor, weight: &Tensor) -> Tensor {
    ((features.to_kind(Kind::Float) - target.to_kind(Kind::Float)).square() * weight).sum(Kind::Float) * 0.5
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_are_aligned_overlap_and_reach_the_border() {
        let windows = windows(1080, 512, 64);
        assert_eq!(windows, [(0, 512), (448, 960), (896, 1080)]);
        assert!(windows.iter().all(|(start, _)| start % ALIGN == 0));
        assert_eq!(super::windows(300, 512, 64), [(0, 300)]);
    }

    #[test]
    fn shares_sum_to_one_at_every_pixel_and_feature_position() {
        let (height, width) = (200, 330);
        let grid = TileGrid::plan(height, width, 96, 40, Device::Cpu).expect("several tiles");
        assert!(grid.tiles().len() > 4);
        for stride in [1, 2, 4, 8, 16] {
            let total = Tensor::zeros([1, 1, height / stride, width / stride], (Kind::Float, Device::Cpu));
            for tile in grid.tiles() {
                let weight = tile.feature_weight(stride);
                let _ = tile.feature_window(&total, stride).f_add_(&weight);
            }
            let (low, high) = (total.min().double_value(&[]), total.max().double_value(&[]));
            assert!((low - 1.0).abs() < 1e-4 && (high - 1.0).abs() < 1e-4, "stride {stride}: {low}..{high}");
        }
    }

    #[test]
    fn the_weighted_grams_gradient_is_the_whole_products() {
        let features = crate::seeded::uniform(&[1, 3, 4, 5], 3).set_requires_grad(true);
        let weight = crate::seeded::uniform(&[1, 1, 4, 5], 4) + 0.1;
        let other = crate::seeded::uniform(&[3, 20], 5);
        let target = other.mm(&other.tr());
        let loss = |gram: Tensor| (gram - &target).square().sum(Kind::Float);
        loss(weighted_gram(&features, &weight)).backward();
        let ours = features.grad().copy();
        let _ = features.grad().zero_();
        let matrix = features.reshape([3, -1]);
        loss((&features * &weight).reshape([3, -1]).mm(&matrix.tr())).backward();
        assert!(ours.allclose(&features.grad(), 1e-5, 1e-5, false), "{ours} {}", features.grad());
    }

    #[test]
    fn a_single_tile_or_no_tile_size_plans_nothing() {
        assert!(TileGrid::plan(100, 100, 0, 32, Device::Cpu).is_none());
        assert!(TileGrid::plan(100, 100, 128, 32, Device::Cpu).is_none());
        let one = TileGrid::plan_always(100, 100, 128, 32, Device::Cpu);
        assert_eq!(one.tiles().len(), 1);
        assert_eq!(one.tiles()[0].feature_weight(4).size(), [1, 1, 25, 25]);
    }
}
