//! The `Stylizer`: one network and one set of settings, turning a content image and style images
//! into a painting. `stylize` is the whole still-image path (coarse-to-fine schedule, colour modes,
//! initialisation); `optimise_batch` is the inner loop that video frames reuse with their own
//! targets, starting points and temporal term, one image at a time or several as one batch (one
//! forward and backward pass for all), with the losses read from the device every few iterations;
//! `optimise_refilled` keeps such a batch full, giving a slot its next image as soon as its last one
//! is done.

use std::time::Instant;

use image::RgbImage;
use tch::{Kind, Tensor};

use super::batch::{BatchFeed, BatchItem, BatchTargets, FixedItems, ItemRun, OneSlot, Optimised, Stopping};
use super::color::{self, ColorMode};
use super::loss;
use super::optim::{Adam, Lbfgs, Optimizer, OptimizerKind, where_items};
use super::settings::{Init, LayerBalance, StyleSettings};
use super::tiles::{Tile, TileGrid, weighted_content_loss, weighted_gram};
use crate::device::products;
use crate::error::{Error, Result};
use crate::imageio;
use crate::model::{LayerId, Layout, Vgg};

/// A style image with its blend weight.
#[derive(Clone)]
pub struct StyleImage {
    /// The painting, full resolution.
    pub image: RgbImage,
    /// Relative weight among several styles.
    pub weight: f64,
}

/// What the optimisation matches at one working size.
pub struct Targets {
    /// Content features P at each content layer.
    pub content: Vec<Tensor>,
    /// Blended style Gram matrices per feature position (A / M_style) at each style layer: the
    /// paper's A for an output of M positions is M times this, so a style image of another size than
    /// the output asks for the same statistics.
    pub style: Vec<Tensor>,
    /// Optional temporal term: previous output warped to this frame, its reliability mask, weight γ.
    pub temporal: Option<(Tensor, Tensor, f64)>,
}

impl Targets {
    /// The same targets, sharing their tensors.
    pub fn shallow_clone(&self) -> Self {
        let share = |tensors: &Vec<Tensor>| tensors.iter().map(Tensor::shallow_clone).collect();
        Targets {
            content: share(&self.content),
            style: share(&self.style),
            temporal: self.temporal.as_ref().map(|(w, m, g)| (w.shallow_clone(), m.shallow_clone(), *g)),
        }
    }
}

/// Loss values of one evaluation, each as it enters the total: `content` = α·L_content,
/// `style` = β·Σ_l w_l·E_l (with the paper's w_l, or divided by each target's own scale under
/// `layer_balance = "relative"`).
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct Losses {
    /// Weighted content term.
    pub content: f64,
    /// Weighted style term.
    pub style: f64,
    /// Weighted total variation.
    pub tv: f64,
    /// Weighted temporal term.
    pub temporal: f64,
    /// α·L_content + β·L_style + tv + temporal.
    pub total: f64,
}

/// Where the optimisation is, for progress bars and intermediate saves.
pub struct Progress<'a> {
    /// 1-based index of the current scale and the number of scales.
    pub scale: (usize, usize),
    /// Iterations done so far over all scales, and the planned total.
    pub iteration: (usize, usize),
    /// Losses at the last evaluation.
    pub losses: Losses,
    /// The current image, `[1, 3, H, W]` RGB (not yet clamped).
    pub image: &'a Tensor,
    /// Seconds since the stylization started.
    pub elapsed: f64,
}

/// The result of a stylization.
pub struct Stylized {
    /// RGB 0..1 `[1, 3, H, W]`, clamped.
    pub image: Tensor,
    /// Losses at the last iteration.
    pub losses: Losses,
    /// Iterations run (fewer than planned after an early stop).
    pub iterations: usize,
}

/// Runs Gatys-style optimisation with one network.
#[derive(Clone)]
pub struct Stylizer<'m> {
    vgg: &'m Vgg,
    settings: StyleSettings,
    layers: Vec<LayerId>,
}

impl<'m> Stylizer<'m> {
    /// Checks the settings against the network.
    pub fn new(vgg: &'m Vgg, settings: StyleSettings) -> Result<Self> {
        settings.validate()?;
        let layers: Vec<LayerId> = settings.content_layers.iter().chain(&settings.style_layers).copied().collect();
        vgg.check_layers(&layers)?;
        Ok(Stylizer { vgg, settings, layers })
    }

    /// The network it runs.
    pub fn network(&self) -> &'m Vgg {
        self.vgg
    }

    /// The settings in use.
    pub fn settings(&self) -> &StyleSettings {
        &self.settings
    }

    /// Content features of `content` (`[1, 3, H, W]` on the network's device).
    pub fn content_targets(&self, content: &Tensor) -> Vec<Tensor> {
        let _guard = tch::no_grad_guard();
        match self.grid_for(content) {
            None => self.vgg.features(content, &self.settings.content_layers),
            Some(grid) => self.blended_features(content, &grid, &self.settings.content_layers),
        }
    }

    /// Whether images of `height` × `width` are optimised in tiles (one at a time, never batched).
    pub fn tiles(&self, height: i64, width: i64) -> bool {
        TileGrid::needed(height, width, self.settings.tile_size)
    }

    /// The tiles of `image` `[1, 3, H, W]` when the settings ask for tiles and one is not enough.
    fn grid_for(&self, image: &Tensor) -> Option<TileGrid> {
        let size = image.size();
        TileGrid::plan(size[2], size[3], self.settings.tile_size, self.settings.tile_overlap, image.device())
    }

    /// The whole image's features at `layers`, assembled from its tiles' features (feathered).
    fn blended_features(&self, image: &Tensor, grid: &TileGrid, layers: &[LayerId]) -> Vec<Tensor> {
        let (_, _, height, width) = image.size4().expect("image [1, 3, H, W]");
        let mut canvases: Vec<Option<Tensor>> = layers.iter().map(|_| None).collect();
        for tile in grid.tiles() {
            let features = self.vgg.features(&tile.window(image), layers);
            for ((canvas, feature), layer) in canvases.iter_mut().zip(features).zip(layers) {
                let stride = layer_stride(*layer);
                let canvas = canvas.get_or_insert_with(|| {
                    Tensor::zeros(
                        [1, feature.size()[1], height / stride, width / stride],
                        (Kind::Float, image.device()),
                    )
                });
                let weighted = feature.to_kind(Kind::Float) * tile.feature_weight(stride);
                let _ = tile.feature_window(canvas, stride).f_add_(&weighted);
            }
        }
        canvases.into_iter().map(|canvas| canvas.expect("a grid has tiles")).collect()
    }

    /// The whole image's Gram matrices at `layers`: the tiles' weighted Gram matrices summed.
    fn tiled_grams(&self, image: &Tensor, grid: &TileGrid, layers: &[LayerId]) -> Vec<Tensor> {
        let mut sums: Vec<Option<Tensor>> = layers.iter().map(|_| None).collect();
        for tile in grid.tiles() {
            add_tile_grams(&mut sums, &self.vgg.features(&tile.window(image), layers), layers, tile);
        }
        totals(sums)
    }

    /// Blended Gram matrices of the styles, each resized to `style_scale` × `long_side`.
    pub fn style_targets(&self, styles: &[StyleImage], long_side: u32) -> Vec<Tensor> {
        let _guard = tch::no_grad_guard();
        let side = ((long_side as f64 * self.settings.style_scale).round() as u32).max(16);
        let weights = blend_weights(styles, &self.settings.style_blend);
        let mut blended: Option<Vec<Tensor>> = None;
        for (style, weight) in styles.iter().zip(weights) {
            let image = self.prepare(&imageio::resize_long_side(&style.image, side));
            let _products = products::hold(self.vgg.device(), self.vgg.precision());
            let layers = &self.settings.style_layers;
            let grams: Vec<Tensor> = match self.grid_for(&image) {
                None => {
                    self.vgg.features(&image, layers).iter().map(|f| loss::gram(f) * (weight / positions(f))).collect()
                }
                Some(grid) => {
                    let (_, _, height, width) = image.size4().expect("image [1, 3, H, W]");
                    let grams = self.tiled_grams(&image, &grid, layers);
                    grams
                        .iter()
                        .zip(layers)
                        .map(|(g, l)| g * (weight / layer_positions(*l, height, width) as f64))
                        .collect()
                }
            };
            blended = Some(match blended {
                None => grams,
                Some(sum) => sum.iter().zip(&grams).map(|(a, b)| a + b).collect(),
            });
        }
        blended.unwrap_or_default()
    }

    /// An RGB image as a network-device tensor, in luminance when the colour mode asks for it.
    fn prepare(&self, image: &RgbImage) -> Tensor {
        let tensor = imageio::rgb_to_tensor(image).to_device(self.vgg.device());
        match self.settings.color {
            ColorMode::Luminance => color::luminance_as_rgb(&tensor),
            _ => tensor,
        }
    }

    /// Per-layer scales and weights of the paper's terms under the chosen balance, per item (once per
    /// item).
    fn balance(&self, items: &[&Targets], image: &Tensor) -> Balance {
        let (_, _, height, width) = image.size4().expect("image [B, 3, H, W]");
        let scales: Vec<ItemScales> = items.iter().map(|targets| self.item_scales(targets, height, width)).collect();
        let device = image.device();
        let content_count = items.first().map_or(0, |t| t.content.len());
        let content =
            (0..content_count).map(|l| Term::new(scales.iter().map(|s| s.content[l]).collect(), 1.0, device)).collect();
        let style = self
            .settings
            .layer_weights()
            .into_iter()
            .enumerate()
            .map(|(l, weight)| Term::new(scales.iter().map(|s| s.style[l]).collect(), weight, device))
            .collect();
        Balance { content, style, root: self.settings.layer_balance == LayerBalance::Distance }
    }

    /// One item's scale of each content and style layer's term under the chosen balance, for images
    /// of `height` × `width`.
    fn item_scales(&self, targets: &Targets, height: i64, width: i64) -> ItemScales {
        let paper = self.settings.layer_balance == LayerBalance::Paper;
        let inverse = |value: f64| 1.0 / value.max(f64::MIN_POSITIVE);
        let content_scale = |p: &Tensor| {
            if paper { 1.0 } else { inverse(loss::content_loss(p, &p.zeros_like()).double_value(&[])) }
        };
        let style_scale = |gram: &Tensor, layer: &LayerId| {
            if paper {
                return 1.0;
            }
            let positions = layer_positions(*layer, height, width);
            let target = gram * positions as f64;
            inverse(loss::style_layer_loss_of_gram(&target.zeros_like(), &target, positions).double_value(&[]))
        };
        ItemScales {
            content: targets.content.iter().map(content_scale).collect(),
            style: targets.style.iter().zip(&self.settings.style_layers).map(|(a, l)| style_scale(a, l)).collect(),
        }
    }

    /// The loss is taken on the image as it will be saved: clamped to 0..1 (pixels pushed out of
    /// range stop pulling) and rounded to 8 bits with a straight-through gradient (deep-layer Grams
    /// react to sub-quantum patterns that saving would erase). Each item's terms come as `[B]`, for a
    /// batch `[B, 3, H, W]`.
    fn evaluate(&self, image: &Tensor, targets: &BatchTargets, balance: &Balance) -> (Tensor, [Tensor; 4]) {
        let image = &as_saved(image);
        let features = self.vgg.features(image, &self.layers);
        let (content_features, style_features) = features.split_at(self.settings.content_layers.len());
        let zero = || Tensor::zeros([image.size()[0]], (Kind::Float, image.device()));
        let content = content_features
            .iter()
            .zip(&targets.content)
            .zip(&balance.content)
            .fold(zero(), |sum, ((f, p), term)| sum + balance.weigh(loss::item_content_losses(f, p), term));
        let style =
            style_features.iter().zip(&targets.style).zip(&balance.style).fold(zero(), |sum, ((f, a), term)| {
                sum + balance.weigh(loss::item_style_losses(f, &(a * positions(f))), term)
            });
        let (tv, temporal) = self.pixel_terms(image, targets);
        let content = content * (self.settings.ratio * self.settings.style_weight);
        let style = style * self.settings.style_weight;
        let total = &content + &style + &tv + &temporal;
        (total, [content, style, tv, temporal])
    }

    /// The terms taken on the pixels, not the features, per item: weighted total variation and the
    /// weighted temporal term (zero when off).
    fn pixel_terms(&self, image: &Tensor, targets: &BatchTargets) -> (Tensor, Tensor) {
        let zero = || Tensor::zeros([image.size()[0]], (Kind::Float, image.device()));
        let tv = if self.settings.tv_weight > 0.0 {
            loss::item_total_variation(image) * self.settings.tv_weight
        } else {
            zero()
        };
        let temporal = match &targets.temporal {
            Some((warped, mask, weights)) => crate::flow::item_temporal_losses(image, warped, mask) * weights,
            None => zero(),
        };
        (tv, temporal)
    }

    /// Loss and gradient with the image in tiles. A first pass without gradients gathers the whole
    /// frame's Gram matrices and content distances, hence each layer's loss and the slope of the
    /// total against it; a second pass back-propagates, tile by tile, a surrogate whose gradient is
    /// the tile's share of the whole-frame gradient (Σ ∂L/∂G ⊙ G_tile for style). Only one tile's
    /// activations are alive at a time. One image at a time (`[1, 3, H, W]`); the terms come as `[1]`.
    fn evaluate_tiled(
        &self,
        point: &Tensor,
        targets: &BatchTargets,
        balance: &Balance,
        grid: &TileGrid,
    ) -> (Tensor, [Tensor; 4], Tensor) {
        let saved = as_saved(point).detach().set_requires_grad(true);
        let (grams, content_values) = tch::no_grad(|| self.tile_statistics(&saved, targets, grid));
        let slopes = self.tiled_slopes(&saved, targets, balance, &grams, &content_values);
        for tile in grid.tiles() {
            self.surrogate(&tile.window(&saved), tile, targets, &slopes).backward();
        }
        let (tv, temporal) = self.pixel_terms(&saved, targets);
        let pixel_terms = (&tv + &temporal).sum(Kind::Float);
        if pixel_terms.requires_grad() {
            pixel_terms.backward();
        }
        let in_range = point.ge(0.0).logical_and(&point.le(1.0)).to_kind(Kind::Float);
        let gradient = saved.grad() * in_range;
        let content = Tensor::from_slice(&[slopes.content_total]).to_device(saved.device());
        let style = Tensor::from_slice(&[slopes.style_total]).to_device(saved.device());
        let total = &content + &style + tv.detach().to_kind(Kind::Double) + temporal.detach().to_kind(Kind::Double);
        (total, [content, style, tv.detach(), temporal.detach()], gradient)
    }

    /// First tiled pass: the whole frame's Gram matrix at each style layer and content distance at
    /// each content layer.
    fn tile_statistics(&self, saved: &Tensor, targets: &BatchTargets, grid: &TileGrid) -> (Vec<Tensor>, Vec<f64>) {
        let content_count = self.settings.content_layers.len();
        let mut grams: Vec<Option<Tensor>> = self.settings.style_layers.iter().map(|_| None).collect();
        let mut distances: Vec<Option<Tensor>> = self.settings.content_layers.iter().map(|_| None).collect();
        for tile in grid.tiles() {
            let features = self.vgg.features(&tile.window(saved), &self.layers);
            let (content_features, style_features) = features.split_at(content_count);
            let content = content_features.iter().zip(&targets.content).zip(&self.settings.content_layers);
            for (distance, ((feature, target), layer)) in distances.iter_mut().zip(content) {
                let stride = layer_stride(*layer);
                let weight = tile.feature_weight(stride);
                add_to(distance, weighted_content_loss(feature, &tile.feature_window(target, stride), &weight));
            }
            add_tile_grams(&mut grams, style_features, &self.settings.style_layers, tile);
        }
        (totals(grams), totals(distances).iter().map(|d| d.double_value(&[])).collect())
    }

    /// The weighted losses of the whole frame and their slopes: a factor per content layer, and
    /// ∂L/∂G per style layer.
    fn tiled_slopes(
        &self,
        saved: &Tensor,
        targets: &BatchTargets,
        balance: &Balance,
        grams: &[Tensor],
        content_values: &[f64],
    ) -> TiledSlopes {
        let (_, _, height, width) = saved.size4().expect("image [1, 3, H, W]");
        let style_weight = self.settings.style_weight;
        let content_factor = self.settings.ratio * style_weight;
        let mut slopes = TiledSlopes::default();
        for (value, term) in content_values.iter().zip(&balance.content) {
            slopes.content_total += balance.weigh_value(*value, term) * content_factor;
            slopes.content.push(balance.slope(*value, term) * content_factor);
        }
        let layers = balance.style.iter().zip(&self.settings.style_layers);
        for ((gram, per_position), (term, layer)) in grams.iter().zip(&targets.style).zip(layers) {
            let positions = layer_positions(*layer, height, width);
            let target = per_position.squeeze_dim(0) * positions as f64;
            let value = loss::style_layer_loss_of_gram(gram, &target, positions).double_value(&[]);
            slopes.style_total += balance.weigh_value(value, term) * style_weight;
            let (filters, positions) = (gram.size()[0] as f64, positions as f64);
            let scale = balance.slope(value, term) * style_weight / (2.0 * filters * filters * positions * positions);
            slopes.style.push((gram - target) * scale);
        }
        slopes
    }

    /// The second tiled pass's loss for one tile: its gradient is the tile's share of the gradient
    /// of the whole-frame loss.
    fn surrogate(&self, window: &Tensor, tile: &Tile, targets: &BatchTargets, slopes: &TiledSlopes) -> Tensor {
        let content_count = self.settings.content_layers.len();
        let features = self.vgg.features(window, &self.layers);
        let (content_features, style_features) = features.split_at(content_count);
        let mut surrogate = Tensor::zeros([], (Kind::Float, window.device()));
        let content = content_features.iter().zip(&targets.content).zip(&slopes.content);
        for (((feature, target), slope), layer) in content.zip(&self.settings.content_layers) {
            let stride = layer_stride(*layer);
            let weight = tile.feature_weight(stride);
            surrogate += weighted_content_loss(feature, &tile.feature_window(target, stride), &weight) * *slope;
        }
        for ((feature, slope), layer) in style_features.iter().zip(&slopes.style).zip(&self.settings.style_layers) {
            let gram = weighted_gram(feature, &tile.feature_weight(layer_stride(*layer)));
            surrogate += (gram * slope).sum(Kind::Float);
        }
        surrogate
    }

    /// Runs `iterations` optimisation steps from `start` towards `targets`; `observer` sees every
    /// iteration (count so far, losses, point). Returns the last good point, its losses and the
    /// iterations run.
    pub fn optimise(
        &self,
        targets: &Targets,
        start: &Tensor,
        iterations: usize,
        observer: &mut dyn FnMut(usize, Losses, &Tensor),
    ) -> (Tensor, Losses, usize) {
        let item = BatchItem {
            targets: targets.shallow_clone(),
            start: start.shallow_clone(),
            iterations,
            stopping: self.stopping(),
            chain: None,
        };
        let mut observe = |_: usize, done: usize, losses: Losses, point: &Tensor| observer(done, losses, point);
        let outcome = self.optimise_batch(vec![item], &mut observe).pop().expect("one item");
        (outcome.image, outcome.losses, outcome.iterations)
    }

    /// Optimises several images of one size together: one forward and backward pass for the whole
    /// batch per iteration, each item with its own targets, optimiser state, overshoot restarts and
    /// early stop, so each comes out as it would alone. The losses are read from the device every
    /// `loss_read_interval` iterations (one wait for the device per read). `observer` sees (item,
    /// iteration count, losses, point `[1, 3, H, W]`) for every iteration of every item.
    ///
    /// # Panics
    /// If the items' starting images differ in size.
    pub fn optimise_batch(
        &self,
        items: Vec<BatchItem>,
        observer: &mut dyn FnMut(usize, usize, Losses, &Tensor),
    ) -> Vec<Optimised> {
        let count = items.len();
        let mut fixed = FixedItems { items: items.into_iter().map(Some).collect(), outcomes: Vec::new(), observer };
        fixed.outcomes.resize_with(count, || None);
        self.optimise_refilled(count, &mut fixed);
        fixed.outcomes.into_iter().map(|outcome| outcome.expect("every item finishes")).collect()
    }

    /// Keeps a batch of `slots` images of one size running until `feed` has no more: a slot whose
    /// image is finished (converged, stalled, out of iterations) hands it over at the next read of the
    /// losses and takes the feed's next one for that slot, with a fresh optimiser state (or the
    /// slot's own, carried on, when the item continues the chain of the one before it there, see
    /// [`BatchItem::chain`]), while the others go on. So a batch never waits for its slowest image.
    /// Tiled images run one slot at a time.
    ///
    /// # Panics
    /// If the items' starting images differ in size.
    pub fn optimise_refilled(&self, slots: usize, feed: &mut dyn BatchFeed) {
        let first: Vec<Option<BatchItem>> = (0..slots).map(|slot| feed.next(slot)).collect();
        self.run_slots(first, feed);
    }

    /// [`Stylizer::optimise_refilled`] from the slots' first items.
    fn run_slots(&self, first: Vec<Option<BatchItem>>, feed: &mut dyn BatchFeed) {
        let Some(model) = first.iter().flatten().next() else { return };
        if first.len() > 1 && self.grid_for(&model.start).is_some() {
            for (slot, item) in first.into_iter().enumerate() {
                self.run_slots(vec![item], &mut OneSlot { feed: &mut *feed, slot });
            }
            return;
        }
        let mut batch = SlotBatch::new(self, first, feed.refills());
        let grid = self.grid_for(&batch.image);
        let device = self.vgg.device();
        let interval = self.settings.loss_read_interval_on(device);
        let mut last_pass_size = None;
        loop {
            batch.hand_over(self, feed);
            let remaining = batch.runs.iter().map(ItemRun::remaining).max().unwrap_or(0);
            let idle = remaining == 0 && !batch.holds_items() && !(0..batch.items.len()).any(|slot| feed.open(slot));
            if feed.cancelled() || idle {
                break;
            }
            if remaining == 0 {
                continue; // items loaded with nothing to do: handed back at once
            }
            let running = batch.runs.iter().map(|r| !r.finished()).collect::<Vec<_>>();
            let active = Tensor::from_slice(&running).to_device(device);
            // slots with nothing to do (empty, or done before the others) are left out of the passes
            let subset = (grid.is_none() && running.contains(&false)).then(|| batch.subset(&running));
            // the passes' batch size changes the gradients' last bits (not the other items' contents)
            let pass_size = subset.as_ref().map_or(running.len(), |subset| subset.slots.size()[0] as usize);
            if last_pass_size.replace(pass_size).is_some_and(|last| last != pass_size) {
                batch.optimizer.regroup();
            }
            let mut queued = Vec::with_capacity(remaining.min(interval));
            for _ in 0..remaining.min(interval) {
                let (point, values, gradient) = match &subset {
                    None => {
                        let point = batch.image.detach().set_requires_grad(true);
                        let (values, gradient) =
                            self.loss_and_gradient(&point, &batch.targets, &batch.balance, grid.as_ref());
                        (point, values, gradient)
                    }
                    Some(subset) => self.subset_loss_and_gradient(&batch.image, subset),
                };
                let proposal = batch.optimizer.propose(&gradient);
                batch.image = point.detach() + where_items(&proposal.step, &active);
                let values = Tensor::cat(&[values, proposal.stalled.to_kind(Kind::Double).unsqueeze(0)], 0);
                queued.push((point.detach(), values));
            }
            batch.replay(&queued, feed);
        }
    }

    /// The values of one evaluation as one `[5, B]` f64 tensor (total, content, style, tv,
    /// temporal) and the gradient.
    fn loss_and_gradient(
        &self,
        point: &Tensor,
        targets: &BatchTargets,
        balance: &Balance,
        grid: Option<&TileGrid>,
    ) -> (Tensor, Tensor) {
        let _products = products::hold(self.vgg.device(), self.vgg.precision());
        let (total, parts, gradient) = match grid {
            None => {
                let (total, parts) = self.evaluate(point, targets, balance);
                total.sum(Kind::Float).backward();
                (total, parts, point.grad())
            }
            Some(grid) => self.evaluate_tiled(point, targets, balance, grid),
        };
        let values: Vec<Tensor> =
            std::iter::once(&total).chain(&parts).map(|v| v.detach().to_kind(Kind::Double)).collect();
        (Tensor::stack(&values, 0), gradient)
    }

    /// [`Stylizer::loss_and_gradient`] of the running slots only: the point (the whole batch), the
    /// values `[5, B]` and the gradient `[B, 3, H, W]`, zero in the slots left out.
    fn subset_loss_and_gradient(&self, image: &Tensor, subset: &Subset) -> (Tensor, Tensor, Tensor) {
        let point = image.detach();
        let part = Layout::ChannelsLast.apply(&point.index_select(0, &subset.slots)).set_requires_grad(true);
        let (part_values, part_gradient) = self.loss_and_gradient(&part, &subset.targets, &subset.balance, None);
        let gradient = point.zeros_like().index_copy(0, &subset.slots, &part_gradient);
        let batch = point.size()[0];
        let values = Tensor::zeros([part_values.size()[0], batch], (Kind::Double, point.device()));
        (point, values.index_copy(1, &subset.slots, &part_values), gradient)
    }

    fn optimizer(&self) -> Box<dyn Optimizer> {
        match self.settings.optimizer {
            OptimizerKind::Lbfgs => Box::new(
                Lbfgs::new(self.settings.lbfgs_history, 1.0)
                    .with_memory_limit(memory_limit_bytes(self.settings.lbfgs_memory_mib))
                    .with_pair_precision(self.settings.lbfgs_pairs),
            ),
            OptimizerKind::Adam => Box::new(Adam::new(self.settings.learning_rate)),
        }
    }

    /// The early-stop settings of this stylizer's own settings.
    pub fn stopping(&self) -> Stopping {
        Stopping { tolerance: self.settings.tolerance, patience: self.settings.patience }
    }

    /// Stylizes a still image: the whole coarse-to-fine schedule, colour handling and initialisation.
    pub fn stylize(
        &self,
        content: &RgbImage,
        styles: &[StyleImage],
        observer: &mut dyn FnMut(&Progress<'_>),
    ) -> Result<Stylized> {
        if styles.is_empty() {
            return Err(Error::Settings("at least one style image is needed".into()));
        }
        let schedule = self.settings.schedule();
        let total_iterations: usize = schedule.iter().map(|s| s.iterations as usize).sum();
        let started = Instant::now();
        let mut current: Option<Tensor> = None;
        let mut iterations_done = 0;
        let mut losses = Losses::default();
        for (scale_index, step) in schedule.iter().enumerate() {
            let content_at_size = self.prepare(&imageio::resize_long_side(content, step.size));
            let targets = Targets {
                content: self.content_targets(&content_at_size),
                style: self.style_targets(styles, step.size),
                temporal: None,
            };
            let start = match current.take() {
                Some(previous) => resize_to(&previous, &content_at_size),
                None => self.initial_image(&content_at_size)?,
            };
            let before = iterations_done;
            let mut report = |done: usize, losses: Losses, image: &Tensor| {
                observer(&Progress {
                    scale: (scale_index + 1, schedule.len()),
                    iteration: (before + done, total_iterations),
                    losses,
                    image,
                    elapsed: started.elapsed().as_secs_f64(),
                });
            };
            let (image, scale_losses, done) = self.optimise(&targets, &start, step.iterations as usize, &mut report);
            iterations_done += done;
            losses = scale_losses;
            current = Some(image);
        }
        let image = current.expect("schedule has at least one step");
        let image = self.finish_colours(&image, content);
        Ok(Stylized { image, losses, iterations: iterations_done })
    }

    fn initial_image(&self, content: &Tensor) -> Result<Tensor> {
        match self.settings.init {
            Init::Content => Ok(content.copy()),
            Init::Noise => {
                let noise = crate::seeded::uniform(&content.size(), self.settings.seed);
                Ok(noise.to_kind(content.kind()).to_device(content.device()))
            }
            Init::Image => {
                let path = self.settings.init_image.as_deref().expect("validated");
                let image = imageio::read_rgb(path)?;
                Ok(resize_to(&self.prepare(&image), content))
            }
        }
    }

    fn finish_colours(&self, image: &Tensor, content: &RgbImage) -> Tensor {
        let _guard = tch::no_grad_guard();
        let (_, _, h, w) = image.size4().expect("image [1, 3, H, W]");
        let content = imageio::rgb_to_tensor(&image::imageops::resize(
            content,
            w as u32,
            h as u32,
            image::imageops::FilterType::Lanczos3,
        ))
        .to_device(image.device());
        let coloured = match self.settings.color {
            ColorMode::Style => image.shallow_clone(),
            ColorMode::Luminance => color::with_content_chrominance(image, &content),
            ColorMode::Histogram => color::match_histogram(image, &content),
        };
        coloured.clamp(0.0, 1.0)
    }
}

/// `lbfgs_memory_mib` in bytes (0: no limit).
pub(crate) fn memory_limit_bytes(mib: u64) -> u64 {
    if mib == 0 { u64::MAX } else { mib.saturating_mul(1 << 20) }
}

/// Resizes `image` (bilinear) to the spatial size of `like`.
pub fn resize_to(image: &Tensor, like: &Tensor) -> Tensor {
    let _guard = tch::no_grad_guard();
    let size = like.size();
    if image.size() == size {
        return image.copy();
    }
    image.upsample_bilinear2d([size[2], size[3]], false, None, None)
}

/// Multipliers of each content and style layer's term.
/// `image` clamped to 0..1 and rounded to 8 bits, with the gradient of the clamp alone.
fn as_saved(image: &Tensor) -> Tensor {
    let clamped = image.clamp(0.0, 1.0);
    let rounded = (&clamped * 255.0).round() / 255.0;
    &clamped + (rounded - &clamped).detach()
}

/// How each content and style layer's term enters the loss: weight·scale·E (or weight·√(scale·E)
/// when `root`), with one scale per item.
/// The state of a batch of slots: the images, their stacked targets, balance and optimiser, each
/// slot's item and the host's account of its run.
struct SlotBatch {
    /// `[B, 3, H, W]`, NHWC strides.
    image: Tensor,
    targets: BatchTargets,
    balance: Balance,
    optimizer: Box<dyn Optimizer>,
    /// Each slot's item (its start on the device), `None` once the slot has had its last.
    items: Vec<Option<BatchItem>>,
    runs: Vec<ItemRun>,
    /// The chain of each slot's last item (see [`BatchItem::chain`]).
    chains: Vec<Option<u64>>,
}

impl SlotBatch {
    /// A batch of the slots' first items (an empty slot holds a copy of another's, already finished).
    fn new(stylizer: &Stylizer<'_>, first: Vec<Option<BatchItem>>, refills: bool) -> Self {
        let device = stylizer.vgg.device();
        let on_device = |item: BatchItem| BatchItem { start: start_on(&item.start, device), ..item };
        let items: Vec<Option<BatchItem>> = first.into_iter().map(|item| item.map(on_device)).collect();
        let model = items.iter().flatten().next().expect("at least one item");
        let size = model.start.size();
        assert!(items.iter().flatten().all(|i| i.start.size() == size), "the images of a batch must have one size");
        let starts: Vec<Tensor> =
            items.iter().map(|item| item.as_ref().unwrap_or(model).start.shallow_clone()).collect();
        // NHWC strides, as images read from files have: the convolutions' fastest path
        let image = Layout::ChannelsLast.apply(&Tensor::cat(&starts, 0));
        let slot_targets: Vec<&Targets> = items.iter().map(|item| &item.as_ref().unwrap_or(model).targets).collect();
        let targets = BatchTargets::stack(&slot_targets, &image, device, refills);
        let balance = stylizer.balance(&slot_targets, &image);
        let runs = items.iter().map(|item| ItemRun::new(item.as_ref().map_or(0, |i| i.iterations))).collect();
        let chains = items.iter().map(|item| item.as_ref().and_then(|i| i.chain)).collect();
        SlotBatch { image, targets, balance, optimizer: stylizer.optimizer(), items, runs, chains }
    }

    /// Hands each finished (or abandoned) item to the feed and puts the feed's next one for its slot
    /// in its place; an empty slot the feed keeps open is offered an item again.
    fn hand_over(&mut self, stylizer: &Stylizer<'_>, feed: &mut dyn BatchFeed) {
        for slot in 0..self.items.len() {
            if self.items[slot].is_some() {
                if !self.runs[slot].finished() && !feed.abandoned(slot) {
                    continue;
                }
                let Some(item) = self.items[slot].take() else { continue };
                let run = std::mem::replace(&mut self.runs[slot], ItemRun::new(0));
                feed.finished(slot, run.outcome(item.start));
            } else if !feed.open(slot) {
                continue;
            }
            match feed.next(slot) {
                Some(next) => self.load(stylizer, slot, next),
                // an empty slot is left out of the passes (its gradients are zeros): its optimiser
                // learns nothing meanwhile, so the next item of its chain can still carry on
                None if self.chains[slot].is_some() => self.optimizer.wait(slot),
                None => {}
            }
        }
    }

    /// The targets and balance of the slots that `running` marks, for passes of those alone.
    fn subset(&self, running: &[bool]) -> Subset {
        let kept: Vec<usize> = running.iter().enumerate().filter(|(_, run)| **run).map(|(slot, _)| slot).collect();
        let indices: Vec<i64> = kept.iter().map(|&slot| slot as i64).collect();
        let slots = Tensor::from_slice(&indices).to_device(self.image.device());
        Subset { targets: self.targets.select(&slots), balance: self.balance.select(&kept), slots }
    }

    /// Whether any slot holds an item.
    fn holds_items(&self) -> bool {
        self.items.iter().any(Option::is_some)
    }

    /// Puts `item` in `slot`, with a fresh optimiser state there, or the slot's own carried on when the
    /// item continues the chain of the slot's last item and the optimiser has learnt something to carry.
    fn load(&mut self, stylizer: &Stylizer<'_>, slot: usize, item: BatchItem) {
        let item = BatchItem { start: start_on(&item.start, self.image.device()), ..item };
        assert_eq!(item.start.size()[1..], self.image.size()[1..], "the images of a batch must have one size");
        let (_, _, height, width) = self.image.size4().expect("image [B, 3, H, W]");
        self.image.narrow(0, slot as i64, 1).copy_(&item.start);
        self.targets.replace(slot, &item.targets);
        self.balance.replace(slot, &stylizer.item_scales(&item.targets, height, width));
        let continues = item.chain.is_some() && item.chain == self.chains[slot];
        // carry_on restarts the slot itself when there is nothing to carry
        let carried = if continues {
            self.optimizer.carry_on(slot)
        } else {
            self.optimizer.restart(slot);
            false
        };
        if item.chain.is_some() {
            // a chain lives on in one slot: one that held it before has nothing to carry on to it
            self.chains.iter_mut().filter(|chain| **chain == item.chain).for_each(|chain| *chain = None);
        }
        self.chains[slot] = item.chain;
        let run = ItemRun::new(item.iterations);
        self.runs[slot] = if carried { run.carrying_curvature() } else { run };
        self.items[slot] = Some(item);
    }

    /// Reads the queued evaluations' losses (one wait for the device) and replays them slot by slot
    /// in order; a slot whose step overshot goes back to its last good point.
    fn replay(&mut self, queued: &[(Tensor, Tensor)], feed: &mut dyn BatchFeed) {
        let read = read_values(queued);
        self.runs.iter_mut().for_each(ItemRun::begin_read);
        for ((point, _), values) in queued.iter().zip(read) {
            for (slot, run) in self.runs.iter_mut().enumerate() {
                let Some(item) = &self.items[slot] else { continue };
                let item_point = point.narrow(0, slot as i64, 1);
                let (losses, stalled) = values[slot];
                let mut observe = |done: usize, losses: Losses, p: &Tensor| feed.iteration(slot, done, losses, p);
                if let Some(good) = run.replay(losses, &item_point, stalled, item.stopping, &mut observe) {
                    self.image.narrow(0, slot as i64, 1).copy_(&good);
                    self.optimizer.reset(slot);
                }
            }
        }
    }
}

/// Some of a batch's slots, with their targets and balance, for passes that leave the others out.
struct Subset {
    /// The slots, `[b]` (int64, on the device).
    slots: Tensor,
    targets: BatchTargets,
    balance: Balance,
}

/// A starting image as the optimisation takes it: detached, f32, on `device`.
fn start_on(start: &Tensor, device: tch::Device) -> Tensor {
    start.detach().to_kind(Kind::Float).to_device(device)
}

/// One item's scale of each content and style layer's term.
struct ItemScales {
    content: Vec<f64>,
    style: Vec<f64>,
}

struct Balance {
    content: Vec<Term>,
    style: Vec<Term>,
    /// Take the square root of each scaled term (relative distances instead of squared ones).
    root: bool,
}

/// One layer's scales (per item, on the host and on the device) and weight.
struct Term {
    scales: Vec<f64>,
    device_scales: Tensor,
    weight: f64,
}

impl Term {
    fn new(scales: Vec<f64>, weight: f64, device: tch::Device) -> Self {
        let device_scales = Tensor::from_slice(&scales).to_kind(Kind::Float).to_device(device);
        Term { scales, device_scales, weight }
    }

    /// Sets slot `slot`'s scale.
    fn set(&mut self, slot: usize, scale: f64) {
        self.scales[slot] = scale;
        let _ = self.device_scales.narrow(0, slot as i64, 1).fill_(scale);
    }

    /// The scale of a run of one item (the tiled path).
    fn only_scale(&self) -> f64 {
        self.scales[0]
    }
}

/// What the tiled pass needs of the first: totals, and each layer's slope.
#[derive(Default)]
struct TiledSlopes {
    /// α·L_content of the whole frame.
    content_total: f64,
    /// β·L_style of the whole frame.
    style_total: f64,
    /// ∂(weighted content term)/∂(content distance) per content layer.
    content: Vec<f64>,
    /// ∂(weighted style term)/∂G per style layer, `[N, N]`.
    style: Vec<Tensor>,
}

/// Adds `value` to the running sum in `slot`.
fn add_to(slot: &mut Option<Tensor>, value: Tensor) {
    *slot = Some(match slot.take() {
        None => value,
        Some(sum) => sum + value,
    });
}

/// Adds a tile's weighted Gram matrices of `features` (at `layers`) to the running sums.
fn add_tile_grams(sums: &mut [Option<Tensor>], features: &[Tensor], layers: &[LayerId], tile: &Tile) {
    for ((sum, feature), layer) in sums.iter_mut().zip(features).zip(layers) {
        add_to(sum, weighted_gram(feature, &tile.feature_weight(layer_stride(*layer))));
    }
}

/// The sums over a grid's tiles (every grid has at least one).
fn totals(sums: Vec<Option<Tensor>>) -> Vec<Tensor> {
    sums.into_iter().map(|sum| sum.expect("a grid has tiles")).collect()
}

/// The pixel stride of a layer's feature grid (2× per pooling before its block).
fn layer_stride(layer: LayerId) -> i64 {
    1 << (layer.block - 1)
}

impl Balance {
    /// The balance of the slots `kept`, in that order.
    fn select(&self, kept: &[usize]) -> Balance {
        let select = |terms: &[Term]| {
            let pick = |term: &Term| kept.iter().map(|&slot| term.scales[slot]).collect();
            terms.iter().map(|term| Term::new(pick(term), term.weight, term.device_scales.device())).collect()
        };
        Balance { content: select(&self.content), style: select(&self.style), root: self.root }
    }

    /// Puts an item's scales in slot `slot`.
    fn replace(&mut self, slot: usize, scales: &ItemScales) {
        for (term, scale) in self.content.iter_mut().zip(&scales.content) {
            term.set(slot, *scale);
        }
        for (term, scale) in self.style.iter_mut().zip(&scales.style) {
            term.set(slot, *scale);
        }
    }

    /// [`Balance::weigh`] of one item's value (a run of one item).
    fn weigh_value(&self, value: f64, term: &Term) -> f64 {
        let scaled = value * term.only_scale();
        let shaped = if self.root { (scaled + 1e-12).sqrt() } else { scaled };
        shaped * term.weight
    }

    /// The derivative of [`Balance::weigh`] at one item's `value`.
    fn slope(&self, value: f64, term: &Term) -> f64 {
        let (scale, weight) = (term.only_scale(), term.weight);
        if self.root { weight * scale / (2.0 * (value * scale + 1e-12).sqrt()) } else { weight * scale }
    }

    /// The layer's term of each item, from its values `[B]`.
    fn weigh(&self, values: Tensor, term: &Term) -> Tensor {
        let scaled = values * &term.device_scales;
        let shaped = if self.root { (scaled + 1e-12).sqrt() } else { scaled };
        shaped * term.weight
    }
}

/// Feature positions M of features `[1, N, h, w]`.
fn positions(features: &Tensor) -> f64 {
    let size = features.size();
    (size[2] * size[3]) as f64
}

/// Feature positions M of a layer for an input of `height` × `width` (floor at each 2×2 pooling).
fn layer_positions(layer: LayerId, height: i64, width: i64) -> i64 {
    let shrink = |side: i64| (0..layer.block - 1).fold(side, |s, _| s / 2);
    shrink(height) * shrink(width)
}

fn blend_weights(styles: &[StyleImage], blend: &[f64]) -> Vec<f64> {
    let raw: Vec<f64> =
        if blend.len() == styles.len() { blend.to_vec() } else { styles.iter().map(|s| s.weight).collect() };
    let sum: f64 = raw.iter().sum();
    if sum > 0.0 { raw.iter().map(|w| w / sum).collect() } else { vec![1.0 / styles.len() as f64; styles.len()] }
}

/// The queued evaluations' values (`[6, B]` each: five losses and the stall flag), read from the
/// device at once: per evaluation, per item, the losses and whether the item stalled.
fn read_values(queued: &[(Tensor, Tensor)]) -> Vec<Vec<(Losses, bool)>> {
    let stacked = Tensor::stack(&queued.iter().map(|(_, values)| values.shallow_clone()).collect::<Vec<_>>(), 0);
    let (count, rows, items) = stacked.size3().expect("[evaluations, 6, items]");
    let flat = Vec::<f64>::try_from(stacked.to_device(tch::Device::Cpu).reshape([-1])).unwrap_or_default();
    let at =
        |e: i64, row: i64, item: i64| flat.get(((e * rows + row) * items + item) as usize).copied().unwrap_or(f64::NAN);
    (0..count)
        .map(|e| {
            (0..items)
                .map(|i| {
                    let losses = Losses {
                        total: at(e, 0, i),
                        content: at(e, 1, i),
                        style: at(e, 2, i),
                        tv: at(e, 3, i),
                        temporal: at(e, 4, i),
                    };
                    (losses, at(e, 5, i) != 0.0)
                })
                .collect()
        })
        .collect()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::device::DeviceChoice;
    use crate::model::{Arch, ModelSettings};
    use tch::Device;

    /// A random VGG-16 in f32: fixed, so no test depends on what `auto` measures on the machine.
    pub(crate) fn network() -> Vgg {
        network_in(crate::device::Precision::F32)
    }

    /// A random VGG-16 in `precision`.
    pub(crate) fn network_in(precision: crate::device::Precision) -> Vgg {
        let settings =
            ModelSettings { device: DeviceChoice::Cpu, precision: precision.into(), ..ModelSettings::default() };
        crate::bench::random_vgg(Arch::Vgg16, &settings, Device::Cpu).unwrap()
    }

    /// A smooth, deterministic picture.
    pub(crate) fn picture(width: u32, height: u32, phase: f32) -> RgbImage {
        RgbImage::from_fn(width, height, |x, y| {
            let (x, y) = (x as f32 / 9.0 + phase, y as f32 / 7.0 - phase);
            let channel = |k: f32| (127.0 + 100.0 * ((x * k).sin() * (y / k).cos())) as u8;
            image::Rgb([channel(1.0), channel(1.7), channel(0.6)])
        })
    }

    pub(crate) fn targets(stylizer: &Stylizer, width: u32, height: u32) -> Targets {
        let content = imageio::rgb_to_tensor(&picture(width, height, 0.0));
        let style = StyleImage { image: picture(90, 70, 2.0), weight: 1.0 };
        Targets {
            content: stylizer.content_targets(&content),
            style: stylizer.style_targets(&[style], width.max(height)),
            temporal: None,
        }
    }

    /// The point to differentiate at, with the run's balance and stacked targets (a batch of one).
    fn prepared(stylizer: &Stylizer, targets: &Targets, image: &Tensor) -> (Tensor, Balance, BatchTargets) {
        let point = image.detach().set_requires_grad(true);
        let balance = stylizer.balance(&[targets], &point);
        let batch = BatchTargets::stack(&[targets], &point, Device::Cpu, false);
        (point, balance, batch)
    }

    /// Loss and gradient without tiles.
    fn whole(stylizer: &Stylizer, targets: &Targets, image: &Tensor) -> (f64, Tensor) {
        let _products = products::hold(stylizer.network().device(), stylizer.network().precision());
        let (point, balance, batch) = prepared(stylizer, targets, image);
        let (total, _) = stylizer.evaluate(&point, &batch, &balance);
        total.sum(Kind::Float).backward();
        (total.double_value(&[0]), point.grad())
    }

    /// Loss and gradient in tiles.
    fn tiled(stylizer: &Stylizer, targets: &Targets, image: &Tensor, grid: &TileGrid) -> (f64, Tensor) {
        let _products = products::hold(stylizer.network().device(), stylizer.network().precision());
        let (point, balance, batch) = prepared(stylizer, targets, image);
        let (total, _, gradient) = stylizer.evaluate_tiled(&point, &batch, &balance, grid);
        (total.double_value(&[0]), gradient)
    }

    fn cosine(a: &Tensor, b: &Tensor) -> f64 {
        let dot = (a * b).sum(Kind::Double).double_value(&[]);
        dot / (a.norm().double_value(&[]) * b.norm().double_value(&[]))
    }

    /// `iterations` of L-BFGS on `starts` (one batch), with the losses read every `interval`.
    fn run_batch(
        vgg: &Vgg,
        settings: StyleSettings,
        items: &[(&Targets, &Tensor)],
        iterations: usize,
    ) -> (Vec<Optimised>, Vec<Vec<f64>>) {
        let stylizer = Stylizer::new(vgg, settings).unwrap();
        let batch: Vec<BatchItem> = items
            .iter()
            .map(|(targets, start)| BatchItem {
                targets: targets.shallow_clone(),
                start: start.shallow_clone(),
                iterations,
                stopping: stylizer.stopping(),
                chain: None,
            })
            .collect();
        let mut seen = vec![Vec::new(); items.len()];
        let mut observer = |item: usize, _: usize, losses: Losses, _: &Tensor| seen[item].push(losses.total);
        (stylizer.optimise_batch(batch, &mut observer), seen)
    }

    #[test]
    fn reading_the_losses_less_often_changes_nothing() {
        let vgg = network();
        let stylizer = Stylizer::new(&vgg, StyleSettings::default()).unwrap();
        let targets = targets(&stylizer, 64, 48);
        let start = imageio::rgb_to_tensor(&picture(64, 48, 0.3));
        let every = StyleSettings { loss_read_interval: 1, ..StyleSettings::default() };
        let (each, each_seen) = run_batch(&vgg, every.clone(), &[(&targets, &start)], 12);
        let seldom = StyleSettings { loss_read_interval: 5, ..every.clone() };
        let (grouped, grouped_seen) = run_batch(&vgg, seldom, &[(&targets, &start)], 12);
        assert_eq!(each_seen, grouped_seen);
        assert_eq!((each[0].iterations, grouped[0].iterations), (12, 12));
        assert!(each[0].image.equal(&grouped[0].image));
        // an early stop replayed from a read of several iterations stops where it would have
        let early = StyleSettings { tolerance: 0.05, patience: 2, ..every };
        let (stopped, _) = run_batch(&vgg, early.clone(), &[(&targets, &start)], 40);
        let early_seldom = StyleSettings { loss_read_interval: 7, ..early };
        let (stopped_seldom, _) = run_batch(&vgg, early_seldom, &[(&targets, &start)], 40);
        assert!(stopped[0].iterations < 40, "no early stop to compare");
        assert_eq!(stopped[0].iterations, stopped_seldom[0].iterations);
        assert!(stopped[0].image.equal(&stopped_seldom[0].image));
    }

    /// Asserts that item `id`, optimised beside others (the totals it saw, its outcome), took the
    /// steps it takes alone from `start` towards `targets` in `iterations`: up to the last bits of
    /// batched against single convolutions (which L-BFGS amplifies a little from step to step).
    /// L-BFGS's pairs in bf16 (the CPU's default where this build reads them) amplify them more, as
    /// a last-bit difference can round a stored value the other way: losses seen 2.1·10⁻³ apart,
    /// 4.2·10⁻⁴ with f32 pairs.
    pub(crate) fn assert_as_if_alone(
        vgg: &Vgg,
        id: usize,
        (seen, outcome): (&[f64], &Optimised),
        (targets, start, iterations): (&Targets, &Tensor, usize),
    ) {
        let (alone, alone_seen) = run_batch(vgg, StyleSettings::default(), &[(targets, start)], iterations);
        assert_eq!(seen.len(), alone_seen[0].len(), "item {id}");
        let image = Tensor::zeros([1], (Kind::Float, start.device()));
        let bf16_pairs = StyleSettings::default().lbfgs_pairs.kind_for(&image) == Kind::BFloat16;
        let tolerance = if bf16_pairs { 5e-3 } else { 2e-3 };
        for (a, b) in seen.iter().zip(&alone_seen[0]) {
            assert!((a - b).abs() <= tolerance * b.abs(), "item {id}: loss {a} vs {b}");
        }
        let difference = (&outcome.image - &alone[0].image).abs().mean(Kind::Float).double_value(&[]);
        assert!(difference < 1.0 / 255.0, "item {id}: mean difference {difference}");
    }

    #[test]
    fn a_batch_paints_each_image_as_if_alone() {
        let vgg = network();
        let stylizer = Stylizer::new(&vgg, StyleSettings::default()).unwrap();
        let first = targets(&stylizer, 64, 48);
        let mut second = targets(&stylizer, 64, 48);
        let other_content = imageio::rgb_to_tensor(&picture(64, 48, 1.9));
        second.content = stylizer.content_targets(&other_content);
        let warped = imageio::rgb_to_tensor(&picture(64, 48, 0.5));
        second.temporal = Some((warped, Tensor::ones([1, 1, 48, 64], (Kind::Float, Device::Cpu)), 0.5));
        let starts = [imageio::rgb_to_tensor(&picture(64, 48, 0.2)), imageio::rgb_to_tensor(&picture(64, 48, 2.3))];
        let settings = StyleSettings::default();
        // (a start exactly at the content would put the distance balance's square root at zero, where
        // the last bits of the batched convolutions decide the first steps)
        let (together, seen) = run_batch(&vgg, settings.clone(), &[(&first, &starts[0]), (&second, &starts[1])], 6);
        for (index, (targets, start)) in [(&first, &starts[0]), (&second, &starts[1])].into_iter().enumerate() {
            assert_as_if_alone(&vgg, index, (&seen[index], &together[index]), (targets, start, 6));
        }
        assert!(together[1].losses.temporal > 0.0 && together[0].losses.temporal == 0.0);
    }

    /// Items queued per slot; what each item saw and how it ended, by item number.
    pub(crate) struct QueuedItems {
        pub queues: Vec<std::collections::VecDeque<(usize, BatchItem)>>,
        pub current: Vec<Option<usize>>,
        pub seen: std::collections::BTreeMap<usize, Vec<f64>>,
        pub outcomes: std::collections::BTreeMap<usize, Optimised>,
        pub order: Vec<usize>,
    }

    impl QueuedItems {
        /// Items `queues` per slot (numbered), nothing seen yet.
        pub fn new(queues: Vec<std::collections::VecDeque<(usize, BatchItem)>>) -> Self {
            let current = queues.iter().map(|_| None).collect();
            QueuedItems { queues, current, seen: Default::default(), outcomes: Default::default(), order: Vec::new() }
        }
    }

    impl BatchFeed for QueuedItems {
        fn next(&mut self, slot: usize) -> Option<BatchItem> {
            let (id, item) = self.queues[slot].pop_front()?;
            self.current[slot] = Some(id);
            Some(item)
        }
        fn finished(&mut self, slot: usize, outcome: Optimised) {
            let id = self.current[slot].take().expect("an item in the slot");
            self.outcomes.insert(id, outcome);
            self.order.push(id);
        }
        fn iteration(&mut self, slot: usize, _: usize, losses: Losses, _: &Tensor) {
            self.seen.entry(self.current[slot].expect("an item in the slot")).or_default().push(losses.total);
        }
    }

    #[test]
    fn a_refilled_batch_paints_each_image_as_if_alone() {
        let vgg = network();
        let stylizer = Stylizer::new(&vgg, StyleSettings::default()).unwrap();
        let first = targets(&stylizer, 64, 48);
        let mut second = targets(&stylizer, 64, 48);
        second.content = stylizer.content_targets(&imageio::rgb_to_tensor(&picture(64, 48, 1.9)));
        let mut third = targets(&stylizer, 64, 48);
        third.content = stylizer.content_targets(&imageio::rgb_to_tensor(&picture(64, 48, 0.9)));
        let warped = imageio::rgb_to_tensor(&picture(64, 48, 0.5));
        third.temporal = Some((warped, Tensor::ones([1, 1, 48, 64], (Kind::Float, Device::Cpu)), 0.5));
        let starts: Vec<Tensor> =
            [0.2, 2.3, 1.1].iter().map(|p| imageio::rgb_to_tensor(&picture(64, 48, *p))).collect();
        // item 2 ends at iteration 6 of 8: item 1's last two run alone, the empty slot left out
        let plan = [(&first, 3usize), (&second, 8), (&third, 3)];
        let item = |id: usize| {
            let (targets, iterations) = plan[id];
            let start = starts[id].shallow_clone();
            let stopping = stylizer.stopping();
            (id, BatchItem { targets: targets.shallow_clone(), start, iterations, stopping, chain: None })
        };
        // slot 0: item 0, then item 2 (with a temporal term) once item 0 is done; slot 1: item 1
        let mut feed = QueuedItems::new(vec![[item(0), item(2)].into(), [item(1)].into()]);
        stylizer.optimise_refilled(2, &mut feed);
        assert_eq!(feed.order, vec![0, 2, 1], "item 2 ran beside item 1 and finished first");
        for (id, (targets, iterations)) in plan.into_iter().enumerate() {
            assert_as_if_alone(&vgg, id, (&feed.seen[&id], &feed.outcomes[&id]), (targets, &starts[id], iterations));
        }
        assert!(feed.outcomes[&2].losses.temporal > 0.0 && feed.outcomes[&1].losses.temporal == 0.0);
    }

    /// Items per slot, `None` standing for a read at which the slot is open but gets nothing yet;
    /// whether each item's curvature was carried on, and where it ended, per slot.
    struct Trickle {
        queues: Vec<std::collections::VecDeque<Option<BatchItem>>>,
        carried: Vec<Vec<bool>>,
        images: Vec<Vec<Tensor>>,
    }

    impl Trickle {
        fn new(queues: Vec<std::collections::VecDeque<Option<BatchItem>>>) -> Self {
            let slots = queues.len();
            Trickle { queues, carried: vec![Vec::new(); slots], images: (0..slots).map(|_| Vec::new()).collect() }
        }
    }

    impl BatchFeed for Trickle {
        fn next(&mut self, slot: usize) -> Option<BatchItem> {
            self.queues[slot].pop_front().flatten()
        }
        fn open(&self, slot: usize) -> bool {
            !self.queues[slot].is_empty()
        }
        fn finished(&mut self, slot: usize, outcome: Optimised) {
            self.carried[slot].push(outcome.curvature_carried);
            self.images[slot].push(outcome.image);
        }
        fn iteration(&mut self, _: usize, _: usize, _: Losses, _: &Tensor) {}
    }

    #[test]
    fn a_slot_carries_its_curvature_on_only_along_one_chain() {
        let vgg = network();
        let stylizer = Stylizer::new(&vgg, StyleSettings::default()).unwrap();
        let targets = targets(&stylizer, 32, 24);
        let item = |chain: Option<u64>, iterations: usize| {
            let start = imageio::rgb_to_tensor(&picture(32, 24, 0.4));
            let stopping = stylizer.stopping();
            Some(BatchItem { targets: targets.shallow_clone(), start, iterations, stopping, chain })
        };
        // one slot: a chain of two, another chain, two items of none, then that other chain again. A
        // step that doubles the loss makes the optimiser forget the item; the first of each chain ends
        // after its scaled gradient step, before a quasi-Newton step is evaluated, so that whether the
        // next item carries on (chain 1) or not (chain 2, others came between) does not hang on an
        // overshoot
        let queue =
            [item(Some(1), 2), item(Some(1), 3), item(Some(2), 2), item(None, 3), item(None, 3), item(Some(2), 3)];
        let mut feed = Trickle::new(vec![queue.into()]);
        stylizer.optimise_refilled(1, &mut feed);
        assert_eq!(feed.carried[0], [false, true, false, false, false, false]);
    }

    #[test]
    fn a_slot_waiting_empty_for_its_chain_carries_on_as_if_it_had_not_waited() {
        let vgg = network();
        let stylizer = Stylizer::new(&vgg, StyleSettings::default()).unwrap();
        let targets = targets(&stylizer, 32, 24);
        let item = |chain: Option<u64>, iterations: usize, start: f32| {
            let start = imageio::rgb_to_tensor(&picture(32, 24, start));
            let stopping = stylizer.stopping();
            Some(BatchItem { targets: targets.shallow_clone(), start, iterations, stopping, chain })
        };
        // slot 0: a chain of two (the first ends before a quasi-Newton step is evaluated, which could
        // overshoot and make the optimiser forget it); slot 1 runs beside it all along
        let run = |waits: usize| {
            let mut chain: std::collections::VecDeque<_> = [item(Some(3), 2, 0.4)].into();
            chain.extend((0..waits).map(|_| None));
            chain.push_back(item(Some(3), 3, 0.6));
            let mut feed = Trickle::new(vec![chain, [item(None, 12, 1.3)].into()]);
            stylizer.optimise_refilled(2, &mut feed);
            feed
        };
        let (at_once, waited) = (run(0), run(2));
        // two reads with slot 0 empty and left out of the passes (its gradients zeros): it took no
        // pair from them, so its next item steps as it would have straight away
        assert_eq!(waited.carried, [vec![false, true], vec![false]]);
        assert_eq!(at_once.carried, waited.carried);
        let difference = (&at_once.images[0][1] - &waited.images[0][1]).abs().max().double_value(&[]);
        assert!(difference < 1e-5, "{difference}");
    }

    #[test]
    fn one_tile_gives_exactly_the_whole_frame_loss_and_gradient() {
        let vgg = network();
        let stylizer = Stylizer::new(&vgg, StyleSettings::default()).unwrap();
        let targets = targets(&stylizer, 96, 80);
        let image = imageio::rgb_to_tensor(&picture(96, 80, 0.7));
        let (loss, gradient) = whole(&stylizer, &targets, &image);
        let grid = TileGrid::plan_always(80, 96, 512, 32, Device::Cpu);
        let (tiled_loss, tiled_gradient) = tiled(&stylizer, &targets, &image, &grid);
        assert!((loss - tiled_loss).abs() <= 1e-4 * loss.abs(), "{loss} vs {tiled_loss}");
        assert!(cosine(&gradient, &tiled_gradient) > 0.9999, "{}", cosine(&gradient, &tiled_gradient));
        let ratio = tiled_gradient.norm().double_value(&[]) / gradient.norm().double_value(&[]);
        assert!((ratio - 1.0).abs() < 1e-3, "{ratio}");
    }

    #[test]
    fn several_tiles_follow_the_whole_frame_gradient() {
        let vgg = network();
        let settings = StyleSettings { tile_size: 128, tile_overlap: 64, ..StyleSettings::default() };
        let stylizer = Stylizer::new(&vgg, settings).unwrap();
        let targets = targets(&stylizer, 256, 192);
        let image = imageio::rgb_to_tensor(&picture(256, 192, 0.7));
        let grid = stylizer.grid_for(&image).expect("several tiles");
        assert!(grid.tiles().len() >= 6);
        let whole_frame = Stylizer::new(&vgg, StyleSettings::default()).unwrap();
        let (loss, gradient) = whole(&whole_frame, &targets, &image);
        let (tiled_loss, tiled_gradient) = tiled(&stylizer, &targets, &image, &grid);
        let similarity = cosine(&gradient, &tiled_gradient);
        // measured: loss within 2.6 %, cosine 0.9915 (the tiles see less context at their borders)
        assert!((loss - tiled_loss).abs() <= 0.05 * loss.abs(), "{loss} vs {tiled_loss}");
        assert!(similarity > 0.97, "{similarity}");
    }
}
