//! Optimisers over a batch of images, in the ask/tell form the stylizer's loop needs: given the
//! gradient at the current points `[B, …]`, each proposes the steps to add. Every item of the batch
//! is its own problem: products, curvature tests and step scales are taken per item, so a batch of
//! frames optimises as the frames would one by one (up to rounding). On a GPU everything stays on
//! the device (per-item decisions are masks, not branches), so it runs iteration after iteration
//! without waiting for the host. On the CPU, where reading a decision back costs nothing, L-BFGS's
//! passes over whole images go item by item, through fused kernels where the build has them
//! (`device::pair_rows`): each reads its images once and makes no temporary image. L-BFGS follows
//! the reference tools (torch's `optim.LBFGS` without line search, history ~100, first step scaled
//! by 1/‖g‖₁), with its memory's product taken in the compact form (`curvature`) rather than by the
//! two-loop recursion: the same steps from a few products per chunk of the memory instead of about
//! eleven small operations per pair. Adam is the usual bias-corrected one. Curvature pairs are
//! accepted by a scale-free test, so the loss needs no particular magnitude.

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use super::curvature::{Curvature, curvature_holds, row_dots};
use crate::device::{bf16_rows, pair_rows, products};

/// Which optimiser, as the user asks for it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerKind {
    /// Limited-memory BFGS, the reference tools' choice.
    #[default]
    Lbfgs,
    /// Adam with a fixed learning rate.
    Adam,
}

impl std::str::FromStr for OptimizerKind {
    type Err = crate::Error;
    fn from_str(text: &str) -> crate::Result<Self> {
        match text.trim().to_ascii_lowercase().as_str() {
            "lbfgs" | "l-bfgs" => Ok(OptimizerKind::Lbfgs),
            "adam" => Ok(OptimizerKind::Adam),
            _ => Err(crate::Error::Settings(format!("optimizer '{text}': expected 'lbfgs' or 'adam'"))),
        }
    }
}

/// The kind L-BFGS stores its curvature pairs in, as the user asks for it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PairPrecision {
    /// bf16 for f32 gradients on the CPU where this build reads bf16 rows as they are (measured
    /// faster there, at the same quality); the gradients' own kind elsewhere, until measured.
    #[default]
    Auto,
    /// The gradients' own kind (f32 for images).
    #[serde(alias = "float32")]
    F32,
    /// bf16: half the memory and half the reads; the steps are those of the pairs as rounded.
    #[serde(alias = "bfloat16")]
    Bf16,
}

impl PairPrecision {
    /// The kind to store the pairs of gradients `grad` in.
    pub fn kind_for(self, grad: &Tensor) -> Kind {
        match self {
            PairPrecision::Auto if bf16_rows::read_against(grad) => Kind::BFloat16,
            PairPrecision::Auto | PairPrecision::F32 => grad.kind(),
            PairPrecision::Bf16 => Kind::BFloat16,
        }
    }
}

impl std::str::FromStr for PairPrecision {
    type Err = crate::Error;
    fn from_str(text: &str) -> crate::Result<Self> {
        match text.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(PairPrecision::Auto),
            "f32" | "float32" => Ok(PairPrecision::F32),
            "bf16" | "bfloat16" => Ok(PairPrecision::Bf16),
            _ => Err(crate::Error::Settings(format!("L-BFGS pairs '{text}': expected 'auto', 'f32' or 'bf16'"))),
        }
    }
}

/// The steps an optimiser proposes for a batch.
pub struct Proposal {
    /// The step to add to each item's point, `[B, …]` (zero where the item is stalled).
    pub step: Tensor,
    /// `[B]` booleans: the method found no descent direction for the item (it has converged).
    pub stalled: Tensor,
}

/// Proposes steps from gradients.
pub trait Optimizer {
    /// The steps to add to the current points, given the gradients there (`[B, …]`, item first).
    /// L-BFGS holds IEEE products on the CPU for its dot products (`device::products`), so this
    /// must not be called inside a bf16 hold of the same thread.
    fn propose(&mut self, grad: &Tensor) -> Proposal;

    /// Forgets what was learnt about item `item` (after a step of it had to be undone).
    fn reset(&mut self, item: usize);

    /// Starts item `item` afresh, as if it had just joined (another problem took its place).
    fn restart(&mut self, item: usize);

    /// Item `item` takes up a new problem close to its last (the next frame of a shot, started from
    /// the painting of this one): keeps what it learnt where the method allows (true), else
    /// restarts (false).
    fn carry_on(&mut self, item: usize) -> bool {
        self.restart(item);
        false
    }

    /// Item `item`'s slot waits empty for the next problem of its chain (its gradients are zeros, its
    /// point does not move): it learns nothing meanwhile, so that [`Optimizer::carry_on`] can take
    /// up what it had learnt. Ends at its next `carry_on`, `restart` or `reset`. L-BFGS's memory is
    /// one ring for the whole batch and goes on turning, so a long wait still pushes out the item's
    /// oldest pairs (after `history` proposals it carries on only its γ).
    fn wait(&mut self, _item: usize) {}

    /// The next gradients come from passes of another batch size than the last (an item joined or
    /// left the passes), which changes their last bits. L-BFGS's first step, scaled by 1/‖g‖₁, may
    /// change the gradient by no more than that (from a start on the 8-bit grid the loss sees the
    /// image in, not at all), and the rounding can lean along the step, where the noise rule would
    /// take it for curvature: an item whose last step was its first refuses a pair of rounding size
    /// whatever its direction. A larger change is real, and kept.
    fn regroup(&mut self) {}
}

/// Per-item values `[B]` shaped to broadcast over `like` `[B, …]`, in `like`'s kind.
fn per_item(values: &Tensor, like: &Tensor) -> Tensor {
    let mut shape = vec![-1i64];
    shape.resize(like.dim(), 1);
    values.reshape(shape.as_slice()).to_kind(like.kind())
}

/// `value` where the per-item `condition` `[B]` holds, zero elsewhere (NaN-safe, unlike a product).
pub(crate) fn where_items(value: &Tensor, condition: &Tensor) -> Tensor {
    let mut shape = vec![-1i64];
    shape.resize(value.dim(), 1);
    value.where_scalarother(&condition.reshape(shape.as_slice()), 0.0)
}

/// yᵀs, yᵀy, sᵀs and gᵀg per item of rows `[B, n]` (`[B]` f64 each): on the CPU in one read
/// (`device::pair_rows`), elsewhere one product at a time.
fn pair_products(s: &Tensor, y: &Tensor, g: &Tensor) -> [Tensor; 4] {
    if pair_rows::applies_to(s) {
        pair_rows::pair_products(s, y, g)
    } else {
        [(y, s), (y, y), (s, s), (g, g)].map(|(a, b)| row_dots(a, b))
    }
}

/// gᵀd and ‖g‖₁ per item of rows `[B, n]` (`[B]` f64 each), as [`pair_products`].
fn descent_products(g: &Tensor, d: &Tensor) -> [Tensor; 2] {
    if pair_rows::applies_to(g) {
        pair_rows::descent_products(g, d)
    } else {
        [row_dots(g, d), g.abs().sum_dim_intlist(1, false, Kind::Double)]
    }
}

/// Rows `[B, n]` times `scale` (`[B]` f64) where `condition` (`[B]`) holds, zeros elsewhere (NaN-safe).
/// On the CPU in place, item by item; elsewhere by masks, without waiting for the device.
fn scaled_where(rows: Tensor, scale: &Tensor, condition: &Tensor) -> Tensor {
    if rows.device() != tch::Device::Cpu {
        let factor = per_item(scale, &rows);
        return where_items(&(rows * factor), condition);
    }
    let scale = Vec::<f64>::try_from(scale).expect("[B] f64 on the CPU");
    let condition = Vec::<bool>::try_from(condition).expect("[B] booleans on the CPU");
    for (item, (&scale, &holds)) in scale.iter().zip(&condition).enumerate() {
        let mut row = rows.get(item as i64);
        let _ = if holds { row.g_mul_scalar_(scale) } else { row.fill_(0.0) };
    }
    rows
}

/// Zeroes item `item` of `tensor` in place.
fn clear_item(tensor: &Tensor, item: usize) {
    let _ = tensor.narrow(0, item as i64, 1).fill_(0.0);
}

/// A curvature pair is taken for rounding noise when the gradient changed by at most this share of
/// itself (‖y‖ ≤ 10⁻⁴·‖g‖) and not along the step (yᵀs ≤ [`NOISE_ALIGNMENT`]·‖y‖‖s‖). A step too small
/// to change the image the loss sees (it sees it in 8 bits) leaves the gradient as it was up to
/// rounding, and in a batch that rounding depends on the batch size of the passes. Seen:
/// ‖y‖/‖g‖ = 2·10⁻⁶ at an angle cosine of 0.015 gave γ = 1077 where real pairs give 1–10 (cosines
/// 0.35–0.8), and then a step some 100–1000 times too long. A small but real change lies along the
/// step, as on a quadratic of any scale, and is kept.
const LEAST_GRADIENT_CHANGE: f64 = 1e-4;

/// See [`LEAST_GRADIENT_CHANGE`]: the cosine between `y` and `s` below which a tiny change is noise.
const NOISE_ALIGNMENT: f64 = 0.1;

/// Per-item state of L-BFGS, created at the first proposal (when the batch size is known).
struct LbfgsItems {
    /// γ = sᵀy/yᵀy of the newest accepted pair, `[B]` f64 (1 before any).
    hessian_diagonal: Tensor,
    /// `[B]` booleans: items with nothing learnt yet (first step scaled by 1/‖g‖₁, no pair from the
    /// previous gradient).
    fresh: Tensor,
    /// `[B]` booleans: items that took up a new problem since the last gradient (their next pair
    /// spans two problems and is refused; the pairs before it are kept).
    crossing: Tensor,
    /// `[B]` booleans: items whose last proposal was their first step (they were `fresh` at it).
    first_step: Tensor,
    /// `[B]` booleans: items that took a pair since they were last reset (so have something to carry on).
    learnt: Tensor,
    /// `[B]` booleans: items whose slot waits empty for their chain's next problem (they take no pair).
    waiting: Tensor,
    /// The curvature pairs.
    memory: Curvature,
    /// How the first gradient lay in memory: every gradient is read as rows in this one order.
    layout: RowLayout,
}

/// L-BFGS without line search (as torch.optim.LBFGS with `line_search_fn=None`), per item.
pub struct Lbfgs {
    history: usize,
    /// The most bytes the pairs may take per item.
    memory_limit: u64,
    /// The kind to store the pairs in, settled at the first proposal.
    pair_precision: PairPrecision,
    learning_rate: f64,
    /// Pairs remembered so far.
    serials: u64,
    /// The passes changed batch size since the last proposal ([`Optimizer::regroup`]): the next pair
    /// of an item whose last step was its first is rounding when small, whatever its direction.
    regrouped: bool,
    /// Per item: the serial of its first pair since it was last reset (earlier pairs hold zeros for it).
    since: Vec<u64>,
    /// (gradient, step) at the last proposal, as rows `[B, n]`.
    previous: Option<(Tensor, Tensor)>,
    items: Option<LbfgsItems>,
}

impl Lbfgs {
    /// An L-BFGS keeping `history` curvature pairs, with step scale `learning_rate` (1 in the references).
    pub fn new(history: usize, learning_rate: f64) -> Self {
        Lbfgs {
            history: history.max(1),
            memory_limit: u64::MAX,
            pair_precision: PairPrecision::Auto,
            learning_rate,
            serials: 0,
            regrouped: false,
            since: Vec::new(),
            previous: None,
            items: None,
        }
    }

    /// Keeps fewer pairs than asked where they would take more than `bytes` per item (at least one;
    /// settled at the first proposal, so set before it). The memory holds up to one pair more for a
    /// moment when it turns its ring.
    pub fn with_memory_limit(self, bytes: u64) -> Self {
        Lbfgs { memory_limit: bytes, ..self }
    }

    /// Stores the pairs as `precision` says (settled at the first proposal, so set before it).
    pub fn with_pair_precision(self, precision: PairPrecision) -> Self {
        Lbfgs { pair_precision: precision, ..self }
    }

    /// The kind the pairs are stored in, once the first proposal has settled it.
    pub fn pair_kind(&self) -> Option<Kind> {
        self.items.as_ref().map(|items| items.memory.kind())
    }

    /// The pairs kept for items of `elements` values of `element_bytes` each.
    fn pairs_within_limit(&self, elements: i64, element_bytes: usize) -> usize {
        let pair_bytes = 2 * elements.max(1) as u64 * element_bytes as u64;
        let fit = usize::try_from(self.memory_limit / pair_bytes).unwrap_or(usize::MAX);
        if fit < self.history {
            tracing::debug!(
                history = self.history,
                kept = fit.max(1),
                "L-BFGS keeps fewer pairs within its memory limit"
            );
        }
        self.history.min(fit.max(1))
    }

    /// The most pairs kept: the history asked for, or fewer within the memory limit once the first
    /// proposal has settled it.
    pub fn history(&self) -> usize {
        self.history
    }

    /// Curvature pairs kept.
    pub fn pairs(&self) -> usize {
        self.items.as_ref().map_or(0, |items| items.memory.len())
    }

    /// The per-item state, created for `grad` (`[B, …]`) at the first call.
    fn items(&mut self, grad: &Tensor) -> &mut LbfgsItems {
        if self.items.is_none() {
            // the pairs' kind and the history within the memory limit are settled once, here
            let pair_kind = self.pair_precision.kind_for(grad);
            let elements = grad.numel() as i64 / grad.size()[0].max(1);
            self.history = self.pairs_within_limit(elements, pair_kind.elt_size_in_bytes());
            let count = grad.size()[0];
            self.items = Some(LbfgsItems {
                hessian_diagonal: Tensor::ones([count], (Kind::Double, grad.device())),
                fresh: Tensor::ones([count], (Kind::Bool, grad.device())),
                crossing: Tensor::zeros([count], (Kind::Bool, grad.device())),
                first_step: Tensor::zeros([count], (Kind::Bool, grad.device())),
                learnt: Tensor::zeros([count], (Kind::Bool, grad.device())),
                waiting: Tensor::zeros([count], (Kind::Bool, grad.device())),
                memory: Curvature::new(self.history, count, grad.device(), pair_kind),
                layout: RowLayout::of(grad),
            });
        }
        self.items.as_mut().expect("created above")
    }

    /// Adds the pair from the previous proposal to this gradient (rows `[B, n]`). The scale-free
    /// curvature test (yᵀs > 1e-10·‖y‖‖s‖) is taken per item, and a pair that looks like rounding
    /// noise is refused too ([`LEAST_GRADIENT_CHANGE`], and [`Optimizer::regroup`]); a refused
    /// item's pair is stored as zeros.
    fn remember(&mut self, grad: &Tensor) {
        let regrouped = std::mem::take(&mut self.regrouped);
        let Some((old_grad, old_step)) = self.previous.take() else { return };
        let y = grad - &old_grad;
        let [ys, yy, ss, old_gg] = pair_products(&old_step, &y, &old_grad);
        let length_product = (&yy * &ss).sqrt();
        let least_change = old_gg * (LEAST_GRADIENT_CHANGE * LEAST_GRADIENT_CHANGE);
        let across_the_step = ys.le_tensor(&(&length_product * NOISE_ALIGNMENT));
        let serial = self.serials;
        self.serials += 1;
        let items = self.items(grad);
        // where a small change counts as rounding: across the step, or in any direction for an item
        // whose last step was its first, after a regrouping
        let rounding_if_small = if regrouped { across_the_step.logical_or(&items.first_step) } else { across_the_step };
        let noise = yy.le_tensor(&least_change).logical_and(&rounding_if_small);
        let accept = curvature_holds(&ys, &yy, &ss)
            .logical_and(&noise.logical_not())
            .logical_and(&items.fresh.logical_not())
            .logical_and(&items.crossing.logical_not())
            .logical_and(&items.waiting.logical_not());
        let (stored_ys, stored_yy) = (ys.where_scalarother(&accept, 0.0), yy.where_scalarother(&accept, 0.0));
        // a pair stored in bf16 may lose its curvature to rounding, and is then refused after all
        let accept = items.memory.push(&old_step, &y, &accept, stored_ys, stored_yy, serial);
        items.hessian_diagonal = (&ys / &yy).where_self(&accept, &items.hessian_diagonal);
        items.learnt = items.learnt.logical_or(&accept);
    }

    /// Drops the oldest pairs while every item has been reset since they were remembered (they hold
    /// only zeros, and each costs every iteration a read of two images). Only a reset makes pairs
    /// dead, so only a reset calls this.
    fn drop_dead_pairs(&mut self) {
        let oldest_live = self.since.iter().copied().min().unwrap_or(0);
        let Some(items) = &mut self.items else { return };
        while items.memory.oldest_serial().is_some_and(|serial| serial < oldest_live) {
            items.memory.drop_oldest();
        }
    }
}

impl Optimizer for Lbfgs {
    fn reset(&mut self, item: usize) {
        if self.since.len() <= item {
            self.since.resize(item + 1, 0);
        }
        self.since[item] = self.serials;
        if let Some(items) = &mut self.items {
            items.memory.forget(item);
            let _ = items.hessian_diagonal.narrow(0, item as i64, 1).fill_(1.0);
            let _ = items.fresh.narrow(0, item as i64, 1).fill_(1i64);
            clear_item(&items.learnt, item);
            clear_item(&items.waiting, item);
        }
        self.drop_dead_pairs();
    }

    fn restart(&mut self, item: usize) {
        // a reset item is fresh: its next pair is refused and its first step scaled as a new one's
        self.reset(item);
    }

    fn carry_on(&mut self, item: usize) -> bool {
        // one value read back from the device, between items, where the losses were just read
        let learnt = |items: &LbfgsItems| items.learnt.get(item as i64).to_kind(Kind::Int64).int64_value(&[]) != 0;
        let Some(items) = self.items.as_mut().filter(|items| learnt(items)) else {
            self.restart(item);
            return false;
        };
        // the pairs and γ stay; the next pair would span both problems, so it is refused
        let _ = items.crossing.narrow(0, item as i64, 1).fill_(1i64);
        clear_item(&items.waiting, item);
        true
    }

    fn wait(&mut self, item: usize) {
        // before the first proposal there is nothing learnt to keep
        if let Some(items) = &mut self.items {
            let _ = items.waiting.narrow(0, item as i64, 1).fill_(1i64);
        }
    }

    fn regroup(&mut self) {
        self.regrouped = true;
    }

    fn propose(&mut self, grad: &Tensor) -> Proposal {
        let grad = grad.detach();
        // the memory's dot products in IEEE float32, whatever a network beside this one allows
        let _products = products::hold_ieee(grad.device());
        let grad = self.items(&grad).layout.rows(&grad);
        let batch = grad.size()[0] as usize;
        if self.since.len() < batch {
            self.since.resize(batch, 0);
        }
        self.remember(&grad);
        let items = self.items.as_mut().expect("created above");
        let direction = items.memory.direction(&grad, &items.hessian_diagonal);
        let [slope, l1] = descent_products(&grad, &direction);
        let descent = slope.lt(0.0);
        let first_scale = l1.clamp_min(f64::MIN_POSITIVE).reciprocal().clamp_max(1.0);
        let scale = first_scale.where_scalarother(&items.fresh, 1.0) * self.learning_rate;
        let step = scaled_where(direction, &scale, &descent);
        let none = items.fresh.zeros_like();
        items.first_step = std::mem::replace(&mut items.fresh, none);
        items.crossing = items.crossing.zeros_like();
        let proposal = Proposal { step: items.layout.restore(&step), stalled: descent.logical_not() };
        self.previous = Some((grad, step));
        proposal
    }
}

/// How a `[B, …]` tensor's elements lie in memory, so that it can be seen as rows `[B, n]` in that
/// order (a view, not a copy, for a dense tensor such as a channels-last image) and back.
struct RowLayout {
    /// The dimensions in memory order, the item's first.
    order: Vec<i64>,
    /// The sizes in that order.
    sizes: Vec<i64>,
}

impl RowLayout {
    fn of(tensor: &Tensor) -> Self {
        let (sizes, strides) = (tensor.size(), tensor.stride());
        let mut order: Vec<i64> = (1..tensor.dim() as i64).collect();
        order.sort_by_key(|&dim| std::cmp::Reverse(strides[dim as usize]));
        order.insert(0, 0);
        let sizes = order.iter().map(|&dim| sizes[dim as usize]).collect();
        RowLayout { order, sizes }
    }

    fn rows(&self, tensor: &Tensor) -> Tensor {
        tensor.permute(self.order.as_slice()).reshape([self.sizes[0], -1])
    }

    fn restore(&self, rows: &Tensor) -> Tensor {
        let mut back = vec![0i64; self.order.len()];
        for (position, &dim) in self.order.iter().enumerate() {
            back[dim as usize] = position as i64;
        }
        rows.reshape(self.sizes.as_slice()).permute(back.as_slice())
    }
}

/// Adam's per-item state.
struct AdamItems {
    first_moment: Tensor,
    second_moment: Tensor,
    /// Steps taken, `[B]` f64 (for the bias correction).
    steps: Tensor,
    /// `[B]` f64; halved for an item at each reset.
    learning_rate: Tensor,
}

/// Adam (Kingma & Ba) with bias correction, per item.
pub struct Adam {
    learning_rate: f64,
    beta1: f64,
    beta2: f64,
    epsilon: f64,
    items: Option<AdamItems>,
}

impl Adam {
    /// Adam with the usual β₁ = 0.9, β₂ = 0.999, ε = 1e-8.
    pub fn new(learning_rate: f64) -> Self {
        Adam { learning_rate, beta1: 0.9, beta2: 0.999, epsilon: 1e-8, items: None }
    }
}

impl Optimizer for Adam {
    fn reset(&mut self, item: usize) {
        if let Some(items) = &self.items {
            for tensor in [&items.first_moment, &items.second_moment, &items.steps] {
                clear_item(tensor, item);
            }
            let _ = items.learning_rate.narrow(0, item as i64, 1).g_mul_scalar_(0.5);
        }
    }

    fn restart(&mut self, item: usize) {
        if let Some(items) = &self.items {
            for tensor in [&items.first_moment, &items.second_moment, &items.steps] {
                clear_item(tensor, item);
            }
            let _ = items.learning_rate.narrow(0, item as i64, 1).fill_(self.learning_rate);
        }
    }

    fn propose(&mut self, grad: &Tensor) -> Proposal {
        let grad = grad.detach();
        let learning_rate = self.learning_rate;
        let items = self.items.get_or_insert_with(|| {
            let count = [grad.size()[0]];
            AdamItems {
                first_moment: grad.zeros_like(),
                second_moment: grad.zeros_like(),
                steps: Tensor::zeros(count, (Kind::Double, grad.device())),
                learning_rate: Tensor::full(count, learning_rate, (Kind::Double, grad.device())),
            }
        });
        items.steps += 1.0;
        items.first_moment = &items.first_moment * self.beta1 + &grad * (1.0 - self.beta1);
        items.second_moment = &items.second_moment * self.beta2 + grad.square() * (1.0 - self.beta2);
        let correction = |beta: f64| -(&items.steps * beta.ln()).exp() + 1.0;
        let m_hat = &items.first_moment / per_item(&correction(self.beta1), &grad);
        let v_hat = &items.second_moment / per_item(&correction(self.beta2), &grad);
        let step = -(m_hat / (v_hat.sqrt() + self.epsilon)) * per_item(&items.learning_rate, &grad);
        let stalled = Tensor::zeros([grad.size()[0]], (Kind::Bool, grad.device()));
        Proposal { step, stalled }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    /// Runs `iterations` proposals on `objective` (per item, `[B]`) from `start` `[B, n]`, with
    /// `reset_at` = (iteration, item) resets; returns the final points.
    fn minimise_with_resets(
        optimizer: &mut dyn Optimizer,
        start: &Tensor,
        iterations: usize,
        objective: impl Fn(&Tensor) -> Tensor,
        resets: &[(usize, usize)],
    ) -> Tensor {
        let mut x = start.copy();
        for iteration in 0..iterations {
            for (_, item) in resets.iter().filter(|(at, _)| *at == iteration) {
                optimizer.reset(*item);
            }
            let point = x.detach().set_requires_grad(true);
            objective(&point).sum(Kind::Double).backward();
            x = x.detach() + optimizer.propose(&point.grad()).step;
        }
        x
    }

    fn minimise(
        optimizer: &mut dyn Optimizer,
        start: &Tensor,
        iterations: usize,
        objective: impl Fn(&Tensor) -> Tensor,
    ) -> Tensor {
        minimise_with_resets(optimizer, start, iterations, objective, &[])
    }

    /// Rosenbrock's function of each row `[x, y]` of `[B, 2]`.
    fn rosenbrock(p: &Tensor) -> Tensor {
        let x = p.select(1, 0);
        let y = p.select(1, 1);
        (-&x + 1.0).square() + (y - x.square()).square() * 100.0
    }

    fn points(rows: &[[f64; 2]]) -> Tensor {
        Tensor::from_slice(&rows.concat()).view([rows.len() as i64, 2])
    }

    #[test]
    fn lbfgs_solves_a_quadratic_in_few_steps() {
        let scales = Tensor::from_slice(&[1.0f64, 10.0, 100.0, 0.5]).view([1, 4]);
        let target = Tensor::from_slice(&[1.0f64, -2.0, 3.0, 0.25]).view([1, 4]);
        let objective = |x: &Tensor| ((x - &target).square() * &scales).sum_dim_intlist(1, false, Kind::Double);
        let start = Tensor::zeros([1, 4], (Kind::Double, Device::Cpu));
        let x = minimise(&mut Lbfgs::new(10, 1.0), &start, 30, objective);
        assert!(x.allclose(&target, 1e-6, 1e-6, false), "{x:?}");
    }

    #[test]
    fn carrying_on_to_a_nearby_problem_keeps_what_was_learnt() {
        // an ill-conditioned quadratic, solved; then its minimum moves a little and the next run
        // starts from another point (as a frame's, from the warped painting of the one before).
        // Carried on, five steps end 60 times closer to the new minimum than five of a fresh memory
        // (seen: 0.0019 against 0.113, from 0.194); taken, the pair across the problems set γ to 9e-16
        // here
        let scales = Tensor::from_slice(&[1.0f64, 3.0, 10.0, 30.0, 100.0, 300.0]).view([1, 6]);
        let quadratic = |target: Tensor| {
            let scales = scales.shallow_clone();
            move |x: &Tensor| ((x - &target).square() * &scales).sum_dim_intlist(1, false, Kind::Double)
        };
        let first = Tensor::from_slice(&[1.0f64, -2.0, 3.0, 0.25, -1.0, 0.5]).view([1, 6]);
        let moved = &first + Tensor::from_slice(&[0.1f64, 0.05, -0.1, 0.02, 0.03, -0.01]).view([1, 6]);
        let next_start = &first + Tensor::from_slice(&[-0.02f64, 0.04, 0.03, -0.05, 0.01, 0.02]).view([1, 6]);
        let gamma = |lbfgs: &Lbfgs| lbfgs.items.as_ref().unwrap().hessian_diagonal.double_value(&[0]);
        let distance_after = |carry: bool| {
            let mut lbfgs = Lbfgs::new(10, 1.0);
            let start = Tensor::zeros([1, 6], (Kind::Double, Device::Cpu));
            let solved = minimise(&mut lbfgs, &start, 40, quadratic(first.shallow_clone()));
            assert!(solved.allclose(&first, 1e-6, 1e-6, false), "{solved:?}");
            if carry {
                assert!(lbfgs.carry_on(0), "L-BFGS carries its memory on");
            } else {
                lbfgs.restart(0);
            }
            let learnt = gamma(&lbfgs);
            let stepped = minimise(&mut lbfgs, &next_start, 1, quadratic(moved.shallow_clone()));
            if carry {
                // the pair from the last step of the first problem to the second's start is refused
                assert_eq!(gamma(&lbfgs), learnt, "γ kept");
            }
            let x = minimise(&mut lbfgs, &stepped, 4, quadratic(moved.shallow_clone()));
            (x - &moved).norm().double_value(&[])
        };
        let (carried, fresh) = (distance_after(true), distance_after(false));
        let from = (&moved - &next_start).norm().double_value(&[]);
        assert!(carried < 0.05 * from, "carried on: {carried} from the new minimum after 5 steps, from {from}");
        assert!(fresh > 10.0 * carried, "afresh: {fresh} against carried {carried}");
        // before its first proposals L-BFGS has nothing to carry on, nor after a reset until it
        // takes a pair again (the one spanning the reset is refused)
        let mut lbfgs = Lbfgs::new(10, 1.0);
        assert!(!lbfgs.carry_on(0));
        let _ = minimise(&mut lbfgs, &next_start, 6, quadratic(first.shallow_clone()));
        lbfgs.reset(0);
        assert!(!lbfgs.carry_on(0), "a reset memory has nothing to carry on");
        let _ = minimise(&mut lbfgs, &next_start, 1, quadratic(first.shallow_clone()));
        assert!(!lbfgs.carry_on(0), "one proposal after a reset: its pair spanned the reset");
        let _ = minimise(&mut lbfgs, &next_start, 2, quadratic(first.shallow_clone()));
        assert!(lbfgs.carry_on(0), "two proposals: a pair of the problem's own");
    }

    #[test]
    fn lbfgs_solves_rosenbrock() {
        let x = minimise(&mut Lbfgs::new(100, 1.0), &points(&[[-1.2, 1.0]]), 400, rosenbrock);
        assert!(x.allclose(&points(&[[1.0, 1.0]]), 1e-3, 1e-3, false), "{:?}", Vec::<f64>::try_from(x.view([-1])));
    }

    #[test]
    fn a_gradient_changed_only_by_rounding_teaches_no_curvature() {
        // Two gradients `[2, 4096]` in f32: item 0's second differs from its first by rounding-sized
        // noise across the step; item 1's by little, but along the step, as a real (if very flat)
        // curvature does. Item 0's second step must be the plain −g of an empty memory.
        let options = (Kind::Float, Device::Cpu);
        let first = (Tensor::arange(2 * 4096, options) * 0.37).sin().view([2, 4096]);
        let mut lbfgs = Lbfgs::new(10, 1.0);
        let first_step = lbfgs.propose(&first).step;
        // ‖y‖/‖g‖ ≈ 1.4·10⁻⁶, at a cosine of about 0.03 to the step (so yᵀs > 0: the old test took it)
        let pattern = (Tensor::arange(2 * 4096, options) * 1.91).cos().view([2, 4096]);
        let unit_step = &first_step / first_step.norm_scalaropt_dim(2.0, [1], true);
        let noise = (&pattern + unit_step * pattern.norm_scalaropt_dim(2.0, [1], true) * 0.03) * 1e-6;
        // ‖y‖/‖g‖ ≈ 10⁻⁵ along the step: γ ≈ 38
        let along_the_step = &first_step * 0.026;
        let second = &first + Tensor::cat(&[noise.narrow(0, 0, 1), along_the_step.narrow(0, 1, 1)], 0);
        let second_step = lbfgs.propose(&second).step;
        let plain = -&second;
        assert!(second_step.get(0).allclose(&plain.get(0), 1e-5, 1e-7, false), "noise was taken for curvature");
        let scaled = (second_step.get(1) / plain.get(1)).mean(Kind::Float).double_value(&[]);
        assert!(scaled > 10.0, "a small change along the step is curvature (γ ≈ 38 here), got {scaled}");
    }

    #[test]
    fn after_a_regrouping_a_first_step_pair_of_rounding_size_is_refused_and_real_pairs_are_kept() {
        // The second gradient differs from the first by rounding-sized noise (‖y‖/‖g‖ ≈ 4·10⁻⁶) that
        // leans along the first step (cosine about 0.7), as a change of the passes' batch size can
        // make it: the noise rule alone takes that for curvature (γ ≈ 64); after `regroup` the second
        // step is the plain −g of an empty memory, as alone (where the step changed nothing).
        let options = (Kind::Float, Device::Cpu);
        let first = (Tensor::arange(4096, options) * 0.37).sin().view([1, 4096]);
        let pattern = (Tensor::arange(4096, options) * 1.91).cos().view([1, 4096]);
        let step_after_noise = |regroup: bool| {
            let mut lbfgs = Lbfgs::new(10, 1.0);
            let first_step = lbfgs.propose(&first).step;
            let along = &first_step / first_step.norm();
            let second = &first + (&pattern / pattern.norm() + along) * (first.norm() * 3e-6);
            if regroup {
                lbfgs.regroup();
            }
            (lbfgs.propose(&second).step, -second)
        };
        let (taken, plain) = step_after_noise(false);
        assert!(!taken.allclose(&plain, 1e-3, 1e-7, false), "without a regrouping the noise is taken");
        let (refused, plain) = step_after_noise(true);
        assert!(refused.allclose(&plain, 1e-5, 1e-7, false), "a first step's rounding across a regrouping");

        // a first step's change well above rounding (‖y‖/‖g‖ ≈ 10⁻³) is kept across a regrouping
        // (γ = 1/2.6), and so is a later pair (γ from 1/2.6 to 2)
        let mut lbfgs = Lbfgs::new(10, 1.0);
        let gamma = |lbfgs: &Lbfgs| lbfgs.items.as_ref().expect("proposed").hessian_diagonal.double_value(&[0]);
        let first_step = lbfgs.propose(&first).step;
        let second = &first + &first_step * 2.6;
        lbfgs.regroup();
        let second_step = lbfgs.propose(&second).step;
        assert!((gamma(&lbfgs) - 1.0 / 2.6).abs() < 1e-4, "γ {}", gamma(&lbfgs));
        lbfgs.regroup();
        lbfgs.propose(&(&second + &second_step * 0.5));
        assert!((gamma(&lbfgs) - 2.0).abs() < 1e-3, "γ {}", gamma(&lbfgs));
    }

    #[test]
    fn lbfgs_is_indifferent_to_the_loss_scale() {
        let target = points(&[[0.3, -0.7]]);
        let tiny = |x: &Tensor| (x - &target).square().sum_dim_intlist(1, false, Kind::Double) * 1e-12;
        let start = Tensor::zeros([1, 2], (Kind::Double, Device::Cpu));
        let x = minimise(&mut Lbfgs::new(10, 1.0), &start, 60, tiny);
        assert!(x.allclose(&target, 1e-4, 1e-4, false), "{:?}", Vec::<f64>::try_from(x.view([-1])));
    }

    #[test]
    fn a_batch_runs_each_item_as_if_alone() {
        let starts = [[-1.2, 1.0], [0.5, -0.5], [2.0, 3.0]];
        for make in [|| Box::new(Lbfgs::new(20, 1.0)) as Box<dyn Optimizer>, || Box::new(Adam::new(0.02)) as _] {
            let together = minimise(&mut *make(), &points(&starts), 60, rosenbrock);
            for (item, start) in starts.iter().enumerate() {
                let alone = minimise(&mut *make(), &points(&[*start]), 60, rosenbrock);
                let row = together.narrow(0, item as i64, 1);
                assert!(row.allclose(&alone, 1e-9, 1e-12, false), "item {item}: {row:?} vs {alone:?}");
            }
        }
    }

    #[test]
    fn in_f32_a_batch_runs_each_item_as_if_alone() {
        // on the CPU, the fused passes item by item (where the build has them)
        let starts = [[-1.2, 1.0], [0.5, -0.5], [2.0, 3.0]];
        let in_f32 = |rows: &[[f64; 2]]| points(rows).to_kind(Kind::Float);
        let together = minimise(&mut Lbfgs::new(20, 1.0), &in_f32(&starts), 60, rosenbrock);
        for (item, start) in starts.iter().enumerate() {
            let alone = minimise(&mut Lbfgs::new(20, 1.0), &in_f32(&[*start]), 60, rosenbrock);
            let row = together.narrow(0, item as i64, 1);
            assert!(row.allclose(&alone, 1e-6, 1e-8, false), "item {item}: {row:?} vs {alone:?}");
        }
    }

    #[test]
    fn an_item_whose_gradient_is_nan_stalls_with_a_zero_step_and_leaves_the_other_alone() {
        // f32 takes the CPU's item-by-item passes (where the build has them), f64 the masks
        for kind in [Kind::Float, Kind::Double] {
            let mut lbfgs = Lbfgs::new(10, 1.0);
            let grad = Tensor::from_slice(&[1.0f64, -2.0, f64::NAN, 1.0]).view([2, 2]).to_kind(kind);
            let proposal = lbfgs.propose(&grad);
            assert_eq!(Vec::<bool>::try_from(&proposal.stalled).unwrap(), [false, true], "{kind:?}");
            assert_eq!(proposal.step.get(1).abs().sum(Kind::Double).double_value(&[]), 0.0, "{kind:?}");
            let alone = Lbfgs::new(10, 1.0).propose(&grad.narrow(0, 0, 1)).step;
            assert!(proposal.step.narrow(0, 0, 1).equal(&alone), "{kind:?}: the other item moved as alone");
            // next: item 1's pair spans the NaN and is refused; it steps afresh, finite
            let grad = Tensor::from_slice(&[0.5f64, -1.0, 0.25, 1.0]).view([2, 2]).to_kind(kind);
            let proposal = lbfgs.propose(&grad);
            assert_eq!(Vec::<bool>::try_from(&proposal.stalled).unwrap(), [false, false], "{kind:?}");
            let step = proposal.step.get(1);
            assert!(bool::try_from(step.isfinite().all()).unwrap(), "{kind:?}: {step:?}");
            assert!(step.abs().sum(Kind::Double).double_value(&[]) > 0.0, "{kind:?}");
        }
    }

    #[test]
    fn resetting_one_item_leaves_the_others_as_they_were() {
        let starts = [[-1.2, 1.0], [0.5, -0.5]];
        for make in [|| Box::new(Lbfgs::new(20, 1.0)) as Box<dyn Optimizer>, || Box::new(Adam::new(0.02)) as _] {
            let together = minimise_with_resets(&mut *make(), &points(&starts), 40, rosenbrock, &[(7, 0)]);
            let undisturbed = minimise(&mut *make(), &points(&[starts[1]]), 40, rosenbrock);
            let reset_alone = minimise_with_resets(&mut *make(), &points(&[starts[0]]), 40, rosenbrock, &[(7, 0)]);
            assert!(together.narrow(0, 1, 1).allclose(&undisturbed, 1e-9, 1e-12, false));
            // the reset item keeps its (now zero) pairs beside the other's, where alone it has
            // none: its sums run over other positions, so it agrees to rounding, not to the bit
            // (seen: 7e-11 after 40 iterations)
            assert!(together.narrow(0, 0, 1).allclose(&reset_alone, 1e-7, 1e-9, false));
            let uninterrupted = minimise(&mut *make(), &points(&[starts[0]]), 40, rosenbrock);
            assert!(!reset_alone.allclose(&uninterrupted, 1e-9, 1e-12, false), "the reset changed nothing");
        }
    }

    #[test]
    fn a_restarted_item_runs_as_a_new_one_beside_the_others() {
        let (starts, joining) = ([[-1.2, 1.0], [0.5, -0.5]], [2.0, 3.0]);
        for make in [|| Box::new(Lbfgs::new(50, 1.0)) as Box<dyn Optimizer>, || Box::new(Adam::new(0.02)) as _] {
            let mut optimizer = make();
            let mut x = points(&starts);
            for iteration in 0..40 {
                if iteration == 10 {
                    // item 0 is done; another problem takes its place (after an overshoot reset, so
                    // the learning rate is back where a new item's is)
                    optimizer.reset(0);
                    optimizer.restart(0);
                    x.narrow(0, 0, 1).copy_(&points(&[joining]));
                }
                let point = x.detach().set_requires_grad(true);
                rosenbrock(&point).sum(Kind::Double).backward();
                x = x.detach() + optimizer.propose(&point.grad()).step;
            }
            let newcomer = minimise(&mut *make(), &points(&[joining]), 30, rosenbrock);
            let undisturbed = minimise(&mut *make(), &points(&[starts[1]]), 40, rosenbrock);
            assert!(x.narrow(0, 0, 1).allclose(&newcomer, 1e-9, 1e-12, false), "{x:?} vs {newcomer:?}");
            assert!(x.narrow(0, 1, 1).allclose(&undisturbed, 1e-9, 1e-12, false));
        }
    }

    #[test]
    fn pairs_every_item_has_forgotten_are_dropped() {
        let mut lbfgs = Lbfgs::new(20, 1.0);
        let x = minimise(&mut lbfgs, &points(&[[-1.2, 1.0], [0.5, -0.5]]), 6, rosenbrock);
        assert_eq!(lbfgs.pairs(), 5);
        lbfgs.restart(0);
        assert_eq!(lbfgs.pairs(), 5, "item 1 still learns from them");
        let point = x.detach().set_requires_grad(true);
        rosenbrock(&point).sum(Kind::Double).backward();
        let _ = lbfgs.propose(&point.grad());
        assert_eq!(lbfgs.pairs(), 6);
        lbfgs.restart(1);
        assert_eq!(lbfgs.pairs(), 1, "only the pair remembered after item 0's restart is left");
    }

    #[test]
    fn gradients_in_other_memory_layouts_give_the_same_steps() {
        // a quadratic over `[1, 3, 4, 5]` images; one run sees every gradient channels-first, the
        // other channels-last at first and then alternating (as a batch's left-out slots make it)
        let options = (Kind::Double, Device::Cpu);
        let scales = Tensor::arange(60, options).view([1, 3, 4, 5]) * 0.05 + 0.2;
        let target = (Tensor::arange(60, options).view([1, 3, 4, 5]) * 0.7).sin();
        let gradient = |x: &Tensor| (x - &target) * &scales * 2.0;
        let channels_last = |t: &Tensor| crate::model::Layout::ChannelsLast.apply(t);
        let (mut plain, mut mixed) = (Lbfgs::new(5, 1.0), Lbfgs::new(5, 1.0));
        let (mut x_plain, mut x_mixed) = (target.zeros_like(), target.zeros_like());
        for iteration in 0..40 {
            let step_plain = plain.propose(&gradient(&x_plain).contiguous()).step;
            let g = gradient(&x_mixed);
            let step_mixed = mixed.propose(&if iteration % 2 == 0 { channels_last(&g) } else { g.contiguous() }).step;
            assert_eq!(step_mixed.stride(), [60, 1, 15, 3], "steps keep the first gradient's layout");
            assert!(step_mixed.allclose(&step_plain, 1e-12, 1e-14, false), "iteration {iteration}");
            x_plain += step_plain;
            x_mixed += step_mixed;
        }
        assert!(x_plain.allclose(&target, 1e-6, 1e-6, false));
    }

    #[test]
    fn the_memory_limit_keeps_fewer_pairs() {
        // 64 f32 values per item: a pair takes 512 bytes, so 3 KiB hold 6 pairs
        let gradient = |x: &Tensor| x - 1.0;
        // (per item: a batch of 2 keeps as many as one image would)
        // (256 bytes in bf16, so 3 KiB hold 12: the history's 10 are kept, 1 KiB holds 4)
        let (f32, bf16) = (PairPrecision::F32, PairPrecision::Bf16);
        for (precision, limit, kept) in
            [(f32, u64::MAX, 10), (f32, 3 << 10, 6), (f32, 100, 1), (bf16, 3 << 10, 10), (bf16, 1 << 10, 4)]
        {
            let mut lbfgs = Lbfgs::new(10, 1.0).with_memory_limit(limit).with_pair_precision(precision);
            let mut x = Tensor::zeros([2, 64], (Kind::Float, Device::Cpu));
            for _ in 0..15 {
                x += lbfgs.propose(&gradient(&x)).step;
            }
            assert_eq!(lbfgs.pairs(), kept, "limit {limit}, {precision:?}");
        }
    }

    #[test]
    fn pairs_in_bf16_converge_as_pairs_in_f32_do() {
        // an ill-conditioned quadratic over 4096 f32 values, curvatures 10⁻³…1
        let mut draws = crate::seeded::Draws::new(17);
        let options = (Kind::Float, Device::Cpu);
        let curvature = (draws.uniform(&[1, 4096], options) * -3.0 * 10f64.ln()).exp();
        let target = draws.normal(&[1, 4096], options);
        let loss = |x: &Tensor| ((x - &target).square() * &curvature).sum(Kind::Double).double_value(&[]) / 2.0;
        let start = Tensor::zeros([1, 4096], options);
        let run = |precision: PairPrecision| {
            let mut lbfgs = Lbfgs::new(20, 1.0).with_pair_precision(precision);
            let mut x = start.copy();
            for _ in 0..60 {
                x += lbfgs.propose(&((&x - &target) * &curvature)).step;
            }
            (loss(&x), lbfgs.pair_kind())
        };
        // seen: from 309 to 0.0066 with f32 pairs and 0.0059 with bf16 ones, far above f32's
        // rounding floor (about 10⁻¹¹ here), so the two runs still differ in how well they converge
        let ((f32_loss, f32_kind), (bf16_loss, bf16_kind)) = (run(PairPrecision::F32), run(PairPrecision::Bf16));
        assert_eq!((f32_kind, bf16_kind), (Some(Kind::Float), Some(Kind::BFloat16)));
        let start_loss = loss(&start);
        assert!(f32_loss < 1e-2 * start_loss, "f32 pairs: {f32_loss} from {start_loss}");
        assert!(bf16_loss < 1.5 * f32_loss, "bf16 pairs: {bf16_loss} against f32 pairs' {f32_loss}");
    }

    #[test]
    fn auto_stores_pairs_in_bf16_for_f32_images_on_the_cpu() {
        let f32_cpu = Tensor::zeros([1, 4], (Kind::Float, Device::Cpu));
        let f64_cpu = Tensor::zeros([1, 4], (Kind::Double, Device::Cpu));
        let auto = if bf16_rows::available() { Kind::BFloat16 } else { Kind::Float };
        assert_eq!(PairPrecision::Auto.kind_for(&f32_cpu), auto);
        assert_eq!(PairPrecision::Auto.kind_for(&f64_cpu), Kind::Double);
        assert_eq!(PairPrecision::F32.kind_for(&f32_cpu), Kind::Float);
        assert_eq!(PairPrecision::Bf16.kind_for(&f64_cpu), Kind::BFloat16);
        assert_eq!("BF16".parse::<PairPrecision>().unwrap(), PairPrecision::Bf16);
        assert!("half".parse::<PairPrecision>().unwrap_err().to_string().contains("'half'"));
    }

    #[test]
    fn lbfgs_stalls_without_a_descent_direction() {
        // a flat objective: zero gradient, no descent direction, a zero step
        let start = points(&[[0.5, 0.5]]);
        let mut lbfgs = Lbfgs::new(10, 1.0);
        let proposal = lbfgs.propose(&start.zeros_like());
        assert!(bool::try_from(proposal.stalled.all()).unwrap());
        assert_eq!(proposal.step.abs().sum(Kind::Double).double_value(&[]), 0.0);
    }

    #[test]
    fn adam_descends_rosenbrock() {
        let start = points(&[[-1.2, 1.0]]);
        let before = rosenbrock(&start).double_value(&[0]);
        let x = minimise(&mut Adam::new(0.02), &start, 3000, rosenbrock);
        let after = rosenbrock(&x).double_value(&[0]);
        assert!(after < before * 1e-3, "{before} → {after}");
    }
}
