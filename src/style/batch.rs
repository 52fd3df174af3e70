//! What the optimisation loop needs to run several images as one batch and to read the losses only
//! every few iterations: the items and their outcomes, their targets stacked item-first, and the
//! host's replay of each item's evaluations. The device queues iteration after iteration; when the
//! losses come back (one read for several iterations), `ItemRun::replay` takes each evaluation in
//! order and decides, exactly as a loop reading every iteration would, whether the step is kept,
//! overshot (go back to the last good point) or ends the item's run (converged, stalled, budget
//! spent). Evaluations queued after such a decision are dropped, so the result does not depend on
//! how often the losses are read, nor on which items share a batch. A batch can also be refilled: a
//! [`BatchFeed`] hands each slot a new item as soon as its last one is finished (a video segment's
//! next frame), so a batch never waits for its slowest item.

use tch::{Device, Kind, Tensor};

use super::stylizer::{Losses, Targets};
use crate::model::Layout;

/// One image of a batch: what it aims at, where it starts and how many iterations it may take.
pub struct BatchItem {
    /// Content, style and temporal targets at the image's size.
    pub targets: Targets,
    /// Starting image `[1, 3, H, W]` (RGB 0..1); every item of a batch has the same size.
    pub start: Tensor,
    /// Planned iterations (loss and gradient evaluations).
    pub iterations: usize,
    /// When the item's run may end early.
    pub stopping: Stopping,
    /// The chain of problems the item continues, if it does: the frames of one run of a shot, each
    /// started from the painting of the one before. A slot whose last item was of the same chain
    /// carries its optimiser's curvature on to this one ([`super::Optimizer::carry_on`]) instead of
    /// starting afresh.
    pub chain: Option<u64>,
}

/// One item's outcome.
pub struct Optimised {
    /// The last good point, `[1, 3, H, W]`, not yet clamped.
    pub image: Tensor,
    /// Losses there.
    pub losses: Losses,
    /// Evaluations spent on the item (a restart after an overshoot counts its evaluation).
    pub iterations: usize,
    /// Whether the optimiser began with the curvature learnt on the slot's item before, of the same
    /// chain.
    pub curvature_carried: bool,
}

/// Gives a batch its items, slot by slot, and takes their outcomes.
pub trait BatchFeed {
    /// The next item for `slot`, or `None` when the slot has no more.
    fn next(&mut self, slot: usize) -> Option<BatchItem>;
    /// The outcome of `slot`'s item, as soon as it is finished.
    fn finished(&mut self, slot: usize, outcome: Optimised);
    /// An iteration of `slot`'s item: iterations so far, losses, point `[1, 3, H, W]`.
    fn iteration(&mut self, slot: usize, done: usize, losses: Losses, point: &Tensor);
    /// Whether items come after the first ones (each slot then keeps room for a temporal term).
    fn refills(&self) -> bool {
        true
    }
    /// Whether to drop the items in flight and stop now.
    fn cancelled(&self) -> bool {
        false
    }
    /// Whether `slot`, given nothing by [`BatchFeed::next`], may still get an item: it is then asked
    /// again at every read of the losses while other slots run (a batch shared by several jobs).
    fn open(&self, _slot: usize) -> bool {
        false
    }
    /// Whether to end `slot`'s run now, unfinished (its job is gone); the outcome still goes to
    /// [`BatchFeed::finished`].
    fn abandoned(&self, _slot: usize) -> bool {
        false
    }
}

/// A fixed set of items, one per slot, and their outcomes.
pub(super) struct FixedItems<'o> {
    pub items: Vec<Option<BatchItem>>,
    pub outcomes: Vec<Option<Optimised>>,
    pub observer: &'o mut dyn FnMut(usize, usize, Losses, &Tensor),
}

impl BatchFeed for FixedItems<'_> {
    fn next(&mut self, slot: usize) -> Option<BatchItem> {
        self.items[slot].take()
    }
    fn finished(&mut self, slot: usize, outcome: Optimised) {
        self.outcomes[slot] = Some(outcome);
    }
    fn iteration(&mut self, slot: usize, done: usize, losses: Losses, point: &Tensor) {
        (self.observer)(slot, done, losses, point);
    }
    fn refills(&self) -> bool {
        false
    }
}

/// One slot of another feed, as slot 0 (a tiled image runs alone).
pub(super) struct OneSlot<'f> {
    pub feed: &'f mut dyn BatchFeed,
    pub slot: usize,
}

impl BatchFeed for OneSlot<'_> {
    fn next(&mut self, _: usize) -> Option<BatchItem> {
        self.feed.next(self.slot)
    }
    fn finished(&mut self, _: usize, outcome: Optimised) {
        self.feed.finished(self.slot, outcome);
    }
    fn iteration(&mut self, _: usize, done: usize, losses: Losses, point: &Tensor) {
        self.feed.iteration(self.slot, done, losses, point);
    }
    fn refills(&self) -> bool {
        self.feed.refills()
    }
    fn cancelled(&self) -> bool {
        self.feed.cancelled()
    }
    fn open(&self, _: usize) -> bool {
        self.feed.open(self.slot)
    }
    fn abandoned(&self, _: usize) -> bool {
        self.feed.abandoned(self.slot)
    }
}

/// The items' targets, stacked item-first.
pub(super) struct BatchTargets {
    /// Content features per content layer, `[B, N, h, w]`.
    pub content: Vec<Tensor>,
    /// Style Gram matrices per feature position per style layer, `[B, N, N]`.
    pub style: Vec<Tensor>,
    /// The warped previous outputs `[B, 3, H, W]`, their masks `[B, 1, H, W]` and weights `[B]` (an
    /// item without a temporal term has weight 0); `None` when no item has one and none can join.
    pub temporal: Option<(Tensor, Tensor, Tensor)>,
}

impl BatchTargets {
    /// Stacks the items' targets on `device`; `image` `[B, 3, H, W]` gives the pixel grid. With
    /// `temporal_room` there is a temporal stack even when no item has a temporal term yet.
    pub fn stack(items: &[&Targets], image: &Tensor, device: Device, temporal_room: bool) -> Self {
        let layer_count = |pick: fn(&Targets) -> &Vec<Tensor>| items.first().map_or(0, |t| pick(t).len());
        // NHWC strides like the features they meet (the image is NHWC), so the differences and
        // their gradients stay on the convolutions' fast path
        let content = (0..layer_count(|t| &t.content))
            .map(|l| {
                let stacked = Tensor::cat(&items.iter().map(|t| t.content[l].to_device(device)).collect::<Vec<_>>(), 0);
                Layout::ChannelsLast.apply(&stacked)
            })
            .collect();
        let style = (0..layer_count(|t| &t.style))
            .map(|l| Tensor::stack(&items.iter().map(|t| t.style[l].to_device(device)).collect::<Vec<_>>(), 0))
            .collect();
        BatchTargets { content, style, temporal: stack_temporal(items, image, device, temporal_room) }
    }

    /// The targets of the slots `slots` (`[b]`, int64 on the targets' device), in that order.
    pub fn select(&self, slots: &Tensor) -> Self {
        let content = self.content.iter().map(|c| Layout::ChannelsLast.apply(&c.index_select(0, slots))).collect();
        let style = self.style.iter().map(|g| g.index_select(0, slots)).collect();
        let temporal = self.temporal.as_ref().map(|(warped, masks, weights)| {
            (warped.index_select(0, slots), masks.index_select(0, slots), weights.index_select(0, slots))
        });
        BatchTargets { content, style, temporal }
    }

    /// Puts `targets` in slot `slot`.
    ///
    /// # Panics
    /// If `targets` has a temporal term and the stack has no room for one.
    pub fn replace(&mut self, slot: usize, targets: &Targets) {
        let slot = slot as i64;
        for (stacked, new) in self.content.iter_mut().zip(&targets.content) {
            stacked.narrow(0, slot, 1).copy_(new);
        }
        for (stacked, new) in self.style.iter_mut().zip(&targets.style) {
            stacked.narrow(0, slot, 1).copy_(&new.unsqueeze(0));
        }
        match (&self.temporal, weighted_temporal(targets)) {
            (Some((warped, masks, weights)), Some((picture, mask, weight))) => {
                warped.narrow(0, slot, 1).copy_(picture);
                masks.narrow(0, slot, 1).copy_(mask);
                let _ = weights.narrow(0, slot, 1).fill_(*weight);
            }
            (Some((warped, masks, weights)), None) => {
                for tensor in [warped, masks, weights] {
                    let _ = tensor.narrow(0, slot, 1).zero_();
                }
            }
            (None, Some(_)) => panic!("a temporal term in a batch stacked without room for one"),
            (None, None) => {}
        }
    }
}

/// The items' temporal terms, with a zero weight (and zero mask) standing in for a missing one.
fn stack_temporal(items: &[&Targets], image: &Tensor, device: Device, room: bool) -> Option<(Tensor, Tensor, Tensor)> {
    if !room && items.iter().all(|t| weighted_temporal(t).is_none()) {
        return None;
    }
    let (_, _, height, width) = image.size4().expect("image [B, 3, H, W]");
    let mut warped = Vec::with_capacity(items.len());
    let mut masks = Vec::with_capacity(items.len());
    let mut weights = Vec::with_capacity(items.len());
    for targets in items {
        match weighted_temporal(targets) {
            Some((picture, mask, weight)) => {
                warped.push(picture.to_kind(Kind::Float).to_device(device));
                masks.push(mask.to_kind(Kind::Float).to_device(device));
                weights.push(*weight as f32);
            }
            None => {
                warped.push(Tensor::zeros([1, 3, height, width], (Kind::Float, device)));
                masks.push(Tensor::zeros([1, 1, height, width], (Kind::Float, device)));
                weights.push(0.0);
            }
        }
    }
    let weights = Tensor::from_slice(&weights).to_device(device);
    Some((Tensor::cat(&warped, 0), Tensor::cat(&masks, 0), weights))
}

/// An item's temporal term when it has one with a positive weight.
fn weighted_temporal(targets: &Targets) -> Option<&(Tensor, Tensor, f64)> {
    targets.temporal.as_ref().filter(|(_, _, weight)| *weight > 0.0)
}

/// When an item's run ends early (each item of a batch has its own: a video's first frames and
/// later frames stop differently).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Stopping {
    /// Relative loss change under which an iteration counts as calm (0: never stop early).
    pub tolerance: f64,
    /// Calm iterations in a row that end the run.
    pub patience: u32,
}

/// The host's account of one item: its evaluations, its last good point and whether it is done.
pub(super) struct ItemRun {
    planned: usize,
    done: usize,
    losses: Losses,
    accepted: Option<(Tensor, Losses)>,
    calm_iterations: u32,
    finished: bool,
    /// Went back to the last good point in the current read: the rest of it is dropped.
    restarting: bool,
    /// The optimiser began with the curvature of the chain's item before.
    curvature_carried: bool,
}

impl ItemRun {
    /// A run of at most `planned` evaluations.
    pub fn new(planned: usize) -> Self {
        ItemRun {
            planned,
            done: 0,
            losses: Losses::default(),
            accepted: None,
            calm_iterations: 0,
            finished: planned == 0,
            restarting: false,
            curvature_carried: false,
        }
    }

    /// This run, marked as begun with the curvature of the chain's item before.
    pub fn carrying_curvature(self) -> Self {
        ItemRun { curvature_carried: true, ..self }
    }

    /// Whether the run is over.
    pub fn finished(&self) -> bool {
        self.finished
    }

    /// Evaluations the run may still need.
    pub fn remaining(&self) -> usize {
        if self.finished { 0 } else { self.planned - self.done }
    }

    /// A new read of queued evaluations begins.
    pub fn begin_read(&mut self) {
        self.restarting = false;
    }

    /// Takes the next evaluation: `losses` at `point` (`stalled`: no descent direction from there).
    /// Returns the point to go back to when the step overshot (the optimiser must then forget the
    /// item); `observer` sees every evaluation taken, with the count so far.
    pub fn replay(
        &mut self,
        losses: Losses,
        point: &Tensor,
        stalled: bool,
        stopping: Stopping,
        observer: &mut dyn FnMut(usize, Losses, &Tensor),
    ) -> Option<Tensor> {
        if self.finished || self.restarting {
            return None;
        }
        let previous_total = self.losses.total;
        self.losses = losses;
        self.done += 1;
        observer(self.done, losses, point);
        if let Some((good, good_losses)) = self.accepted.as_ref().filter(|(_, good)| diverged(good.total, losses.total))
        {
            // without a line search a step can overshoot: go back and rebuild the curvature memory
            tracing::debug!(
                iteration = self.done,
                loss = losses.total,
                "step diverged; restarting from the last good point"
            );
            self.losses = *good_losses;
            self.restarting = true;
            self.finished = self.done >= self.planned;
            return Some(good.shallow_clone());
        }
        self.accepted = Some((point.shallow_clone(), losses));
        self.finished = self.calm(previous_total, losses.total, stopping) || stalled || self.done >= self.planned;
        None
    }

    /// Counts calm iterations; true once there have been `patience` in a row.
    fn calm(&mut self, previous: f64, current: f64, stopping: Stopping) -> bool {
        if stopping.tolerance <= 0.0 || self.done == 1 {
            return false;
        }
        let change = (previous - current).abs() / current.abs().max(f64::MIN_POSITIVE);
        if change < stopping.tolerance {
            self.calm_iterations += 1
        } else {
            self.calm_iterations = 0
        }
        self.calm_iterations >= stopping.patience.max(1)
    }

    /// The outcome: the last good point (`start` when there was none).
    pub fn outcome(self, start: Tensor) -> Optimised {
        let image = self.accepted.map_or(start, |(good, _)| good);
        Optimised { image, losses: self.losses, iterations: self.done, curvature_carried: self.curvature_carried }
    }
}

/// A loss that is not finite or more than doubled means the last step overshot.
fn diverged(previous: f64, current: f64) -> bool {
    !current.is_finite() || current > 2.0 * previous.abs()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn losses(total: f64) -> Losses {
        Losses { total, ..Losses::default() }
    }

    /// Replays `totals` (points numbered by position) and returns the restarts (evaluation number,
    /// point number gone back to) and the run.
    fn replay_all(totals: &[f64], planned: usize, stopping: Stopping) -> (Vec<(usize, f64)>, ItemRun) {
        let mut run = ItemRun::new(planned);
        let mut restarts = Vec::new();
        for (index, total) in totals.iter().enumerate() {
            run.begin_read();
            let point = Tensor::from(index as f64);
            if let Some(good) = run.replay(losses(*total), &point, false, stopping, &mut |_, _, _| {}) {
                restarts.push((run.done, good.double_value(&[])));
            }
        }
        (restarts, run)
    }

    const NEVER: Stopping = Stopping { tolerance: 0.0, patience: 1 };

    #[test]
    fn an_overshoot_goes_back_to_the_last_good_point() {
        let (restarts, run) = replay_all(&[10.0, 8.0, 30.0, 7.0], 10, NEVER);
        assert_eq!(restarts, vec![(3, 1.0)]);
        let outcome = run.outcome(Tensor::from(-1.0));
        assert_eq!((outcome.image.double_value(&[]), outcome.losses.total, outcome.iterations), (3.0, 7.0, 4));
    }

    #[test]
    fn a_read_after_a_restart_drops_the_rest_of_its_evaluations() {
        let mut run = ItemRun::new(10);
        let mut observed = Vec::new();
        let mut observer = |done: usize, l: Losses, _: &Tensor| observed.push((done, l.total));
        run.begin_read();
        for (index, total) in [10.0, 50.0, 40.0, 30.0].iter().enumerate() {
            let _ = run.replay(losses(*total), &Tensor::from(index as f64), false, NEVER, &mut observer);
        }
        assert_eq!(observed, vec![(1, 10.0), (2, 50.0)]);
        assert_eq!(run.remaining(), 8);
    }

    #[test]
    fn calm_iterations_end_the_run_after_the_patience() {
        let stopping = Stopping { tolerance: 0.01, patience: 2 };
        let (_, run) = replay_all(&[10.0, 9.0, 8.999, 8.998, 8.0], 10, stopping);
        assert!(run.finished());
        assert_eq!(run.outcome(Tensor::from(-1.0)).iterations, 4);
    }

    #[test]
    fn the_budget_ends_the_run_and_nothing_planned_is_finished_at_once() {
        let (_, run) = replay_all(&[10.0, 9.0, 8.0], 2, NEVER);
        assert!(run.finished());
        assert_eq!(run.outcome(Tensor::from(-1.0)).losses.total, 9.0);
        let idle = ItemRun::new(0);
        assert!(idle.finished());
        assert_eq!(idle.outcome(Tensor::from(-1.0)).image.double_value(&[]), -1.0);
    }
}
