//! A batch that several jobs share on one device, so that the frames of several videos (and their
//! segments) go through the network in one forward pass. Each job hands in its lanes' items from its
//! own thread ([`SharedBatch::optimise`], which takes the place of [`Stylizer::optimise_refilled`]);
//! one runner thread per device ([`SharedBatch::serve`]) paints them. Items join a running batch only
//! when they run the same network with the same settings at the same size; when the oldest waiting
//! item differs, the running batch takes no more, finishes what it holds, and the next one starts
//! with that item, so no job waits behind another for long. A job that stops (cancelled, failed,
//! gone) withdraws: its items leave the batch at the next read of the losses while the others go on.
//! Every item is optimised exactly as if it ran alone.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use crossbeam_channel::{RecvTimeoutError, Sender};
use tch::Tensor;

use super::batch::{BatchFeed, BatchItem, Optimised};
use super::settings::StyleSettings;
use super::stylizer::{Losses, Stylizer};
use crate::device::threads;
use crate::error::{Error, Result};
use crate::model::Vgg;

/// A device's shared batch: the items waiting for a slot, and what the runner has done.
pub struct SharedBatch {
    slots: usize,
    state: Mutex<Waiting>,
    arrived: Condvar,
}

/// What the runner has done so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct SharedBatchStats {
    /// Batches started (a new one whenever the network, settings or size change, or all went idle).
    pub batches: u64,
    /// Items taken into a batch.
    pub items: u64,
    /// Item iterations run.
    pub item_iterations: u64,
    /// The most items a batch held at once.
    pub most_together: u64,
}

/// The items waiting, oldest first.
#[derive(Default)]
struct Waiting {
    tickets: VecDeque<Ticket>,
    /// No more items are taken.
    closed: bool,
    /// The runner has stopped: nothing in flight will be finished.
    runner_gone: bool,
    stats: SharedBatchStats,
}

impl Waiting {
    /// The oldest item still wanted, once the items of withdrawn jobs are dropped.
    fn oldest(&mut self) -> Option<&Ticket> {
        self.tickets.retain(|ticket| !ticket.job.withdrawn.load(Ordering::SeqCst));
        self.tickets.front()
    }

    /// The items a batch of `key` may take now: those of `key` handed in before any of another key
    /// (none when another key's item is the oldest, or when closed).
    fn takeable(&mut self, key: &BatchKey) -> impl Iterator<Item = &Ticket> + Clone {
        let count = if self.closed {
            0
        } else {
            self.oldest();
            self.tickets.iter().take_while(|ticket| ticket.key == *key).count()
        };
        self.tickets.iter().take(count)
    }
}

/// What a batch is for: items share one only when all of this is equal.
#[derive(Clone, PartialEq)]
struct BatchKey {
    /// The network's identity (the runner's key for it).
    model: String,
    settings: StyleSettings,
    /// The image's size `[1, 3, H, W]`.
    size: Vec<i64>,
}

/// One item handed in: what batch it needs, the job's lane it belongs to, and where its results go.
struct Ticket {
    key: BatchKey,
    lane: usize,
    item: BatchItem,
    job: Arc<JobLink>,
}

/// The way back to a job.
struct JobLink {
    replies: Sender<Reply>,
    /// The job no longer wants its items.
    withdrawn: AtomicBool,
}

/// What the runner tells a job about one of its lanes.
enum Reply {
    Iteration {
        lane: usize,
        done: usize,
        losses: Losses,
        point: Tensor,
    },
    Finished {
        lane: usize,
        outcome: Optimised,
    },
    /// The job's items are lost.
    Failed(Failure),
}

/// Why a job's items are lost.
#[derive(Clone)]
enum Failure {
    /// The batch panicked (libtorch raises its errors so, out of memory included): the panic text.
    Panicked(String),
    /// No batch could be made for them.
    Refused(String),
    /// The batch was closed before they were taken.
    Closed,
}

impl From<Failure> for Error {
    fn from(failure: Failure) -> Self {
        match failure {
            Failure::Panicked(text) => Error::from_panic_text("paint", &text),
            Failure::Refused(text) => Error::Internal(format!("the device's shared batch refused a frame: {text}")),
            Failure::Closed => Error::Internal("the device's shared batch was closed (shutting down)".into()),
        }
    }
}

/// How long a job or the runner waits before looking again at its stop conditions.
const POLL: Duration = Duration::from_millis(100);

/// How long a batch whose slots are all empty waits for the next item of the chain its last item
/// was of (its job plans that item once it has the last one back: on a CPU at 1080p its content
/// targets alone take seconds) before it ends. The wait costs no device time: it ends as soon as any
/// item is handed in or the batch closes, and within a [`POLL`] of the job withdrawing (as it does
/// when done); meanwhile the batch's memory stays held.
const CHAIN_GRACE: Duration = Duration::from_secs(30);

impl std::fmt::Debug for SharedBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedBatch").field("slots", &self.slots).field("stats", &self.stats()).finish()
    }
}

impl SharedBatch {
    /// A shared batch of at most `slots` items at once.
    pub fn new(slots: usize) -> Self {
        SharedBatch { slots: slots.max(1), state: Mutex::new(Waiting::default()), arrived: Condvar::new() }
    }

    /// What the runner has done so far.
    pub fn stats(&self) -> SharedBatchStats {
        self.waiting().stats
    }

    /// Items handed in and not yet taken into a batch.
    pub fn waiting_items(&self) -> usize {
        self.waiting().tickets.len()
    }

    /// Stops the runner once its batch is done; items handed in later fail.
    pub fn close(&self) {
        let mut waiting = self.waiting();
        waiting.closed = true;
        for ticket in waiting.tickets.drain(..) {
            let _ = ticket.job.replies.send(Reply::Failed(Failure::Closed));
        }
        self.arrived.notify_all();
    }

    fn waiting(&self) -> MutexGuard<'_, Waiting> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs a job's `lanes` in the shared batch with the network `model` and `settings`, as
    /// [`Stylizer::optimise_refilled`] does alone: each lane's next item is asked for as soon as its
    /// last is finished. Returns when no lane has more or the feed is cancelled; an error when the
    /// batch failed (out of device memory, say) or was closed.
    pub fn optimise(
        &self,
        model: &str,
        settings: &StyleSettings,
        lanes: usize,
        feed: &mut dyn BatchFeed,
    ) -> Result<()> {
        let (replies, received) = crossbeam_channel::unbounded();
        let job = Arc::new(JobLink { replies, withdrawn: AtomicBool::new(false) });
        let _withdraw = Withdraw(&job);
        let mut in_flight = 0usize;
        for lane in 0..lanes {
            in_flight += self.hand_in(model, settings, lane, feed, &job)?;
        }
        while in_flight > 0 && !feed.cancelled() {
            // the runner's thread paints; this one's OpenMP workers, parked, would slow it
            threads::release_this_thread();
            match received.recv_timeout(POLL) {
                Ok(Reply::Iteration { lane, done, losses, point }) => feed.iteration(lane, done, losses, &point),
                Ok(Reply::Finished { lane, outcome }) => {
                    in_flight -= 1;
                    feed.finished(lane, outcome);
                    in_flight += self.hand_in(model, settings, lane, feed, &job)?;
                }
                Ok(Reply::Failed(failure)) => return Err(failure.into()),
                Err(RecvTimeoutError::Timeout) if self.waiting().runner_gone && received.is_empty() => {
                    return Err(Error::Internal("the device's batch stopped before the job's frames were done".into()));
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => unreachable!("the job holds a sender"),
            }
        }
        Ok(())
    }

    /// Asks `feed` for `lane`'s next item and puts it in the queue; how many went in (0 or 1).
    fn hand_in(
        &self,
        model: &str,
        settings: &StyleSettings,
        lane: usize,
        feed: &mut dyn BatchFeed,
        job: &Arc<JobLink>,
    ) -> Result<usize> {
        if feed.cancelled() {
            return Ok(0);
        }
        let Some(item) = feed.next(lane) else { return Ok(0) };
        let key = BatchKey { model: model.to_string(), settings: settings.clone(), size: item.start.size() };
        let mut waiting = self.waiting();
        if waiting.closed {
            return Err(Failure::Closed.into());
        }
        waiting.tickets.push_back(Ticket { key, lane, item, job: job.clone() });
        self.arrived.notify_all();
        Ok(1)
    }

    /// Paints what is handed in, batch after batch, with `models` (by identity) until closed. Runs
    /// on the thread that owns the device's work.
    pub fn serve(&self, models: &HashMap<String, Vgg>) {
        let _closing = CloseOnExit(self);
        while let Some(key) = self.next_key() {
            self.run_batch(models, key);
        }
    }

    /// The key of the oldest waiting item, once there is one; `None` when closed.
    fn next_key(&self) -> Option<BatchKey> {
        // the jobs' threads may compute their frames' targets while this one waits
        threads::release_this_thread();
        let mut waiting = self.waiting();
        loop {
            if waiting.closed {
                return None;
            }
            if let Some(ticket) = waiting.oldest() {
                return Some(ticket.key.clone());
            }
            waiting = self.arrived.wait_timeout(waiting, POLL).unwrap_or_else(PoisonError::into_inner).0;
        }
    }

    /// One batch of `key`'s items, until it holds none and no more of them wait, or an item of
    /// another key is the oldest waiting.
    fn run_batch(&self, models: &HashMap<String, Vgg>, key: BatchKey) {
        let stylizer = match models.get(&key.model) {
            Some(vgg) => Stylizer::new(vgg, key.settings.clone()),
            None => Err(Error::Internal(format!("no network '{}' on this device", key.model))),
        };
        let stylizer = match stylizer {
            Ok(stylizer) => stylizer,
            Err(error) => return self.fail_waiting(&key, Failure::Refused(error.to_string())),
        };
        let slots = if stylizer.tiles(key.size[2], key.size[3]) { 1 } else { self.slots };
        self.waiting().stats.batches += 1;
        let held = (0..slots).map(|_| None).collect();
        let homes = (0..slots).map(|_| None).collect();
        let mut feed = RunnerFeed { batch: self, key, held, homes, busy: 0 };
        let run =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| stylizer.optimise_refilled(slots, &mut feed)));
        if let Err(payload) = run {
            let text = crate::error::panic_text(payload.as_ref());
            tracing::error!(error = %crate::error::first_line(&text), "a shared batch failed; its items' jobs fail");
            for held in feed.held.iter().flatten() {
                let _ = held.job.replies.send(Reply::Failed(Failure::Panicked(text.clone())));
            }
        }
    }

    /// Fails every waiting item of `key` with `failure`.
    fn fail_waiting(&self, key: &BatchKey, failure: Failure) {
        let mut waiting = self.waiting();
        let (failed, kept): (VecDeque<Ticket>, VecDeque<Ticket>) =
            waiting.tickets.drain(..).partition(|ticket| ticket.key == *key);
        waiting.tickets = kept;
        for ticket in failed {
            let _ = ticket.job.replies.send(Reply::Failed(failure.clone()));
        }
    }

    /// A waiting item of `key` for a slot whose last item was of chain `home`: the item continuing
    /// that chain when one waits, else the oldest whose chain is not in `kept_for` (the chains other
    /// empty slots wait for). Only the items of `key` handed in before any of another key count.
    /// `None` when another key's item is the oldest waiting, when no item fits, or when closed.
    fn take(&self, key: &BatchKey, home: Option<u64>, kept_for: &[u64]) -> Option<Ticket> {
        let mut waiting = self.waiting();
        let continues = |ticket: &Ticket| home.is_some() && ticket.item.chain == home;
        let free = |ticket: &Ticket| !ticket.item.chain.is_some_and(|chain| kept_for.contains(&chain));
        let position = {
            let ours = waiting.takeable(key);
            ours.clone().position(continues).or_else(|| ours.clone().position(free))?
        };
        waiting.tickets.remove(position)
    }

    /// Whether an item of `key` continuing `chain` waits among those [`SharedBatch::take`] may give.
    fn continuation_waits(&self, key: &BatchKey, chain: u64) -> bool {
        self.waiting().takeable(key).any(|ticket| ticket.item.chain == Some(chain))
    }

    /// Waits until some item is handed in, `job` withdraws or the batch closes, for
    /// [`CHAIN_GRACE`] at most.
    fn await_item(&self, job: &JobLink) {
        let deadline = Instant::now() + CHAIN_GRACE;
        // as in next_key: the job's thread computes the next frame's targets meanwhile
        threads::release_this_thread();
        let mut waiting = self.waiting();
        while !waiting.closed && !job.withdrawn.load(Ordering::SeqCst) && waiting.oldest().is_none() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            waiting = self.arrived.wait_timeout(waiting, left.min(POLL)).unwrap_or_else(PoisonError::into_inner).0;
        }
    }

    /// Whether a batch of `key` should take no more items: another key's item waits first, or the
    /// runner is closing.
    fn draining(&self, key: &BatchKey) -> bool {
        let mut waiting = self.waiting();
        waiting.closed || waiting.oldest().is_some_and(|ticket| ticket.key != *key)
    }
}

/// Closes the batch when its runner stops, however it stops, so that no job waits for it.
struct CloseOnExit<'b>(&'b SharedBatch);

impl Drop for CloseOnExit<'_> {
    fn drop(&mut self) {
        self.0.waiting().runner_gone = true;
        self.0.close();
    }
}

/// Withdraws a job's items when its [`SharedBatch::optimise`] returns, however it returns.
struct Withdraw<'j>(&'j JobLink);

impl Drop for Withdraw<'_> {
    fn drop(&mut self) {
        self.0.withdrawn.store(true, Ordering::SeqCst);
    }
}

/// The runner's side: the shared queue as one batch's feed. A slot whose item is done waits for
/// the next item of the same chain (see [`BatchItem::chain`]): its optimiser keeps what it learnt
/// there, and another empty slot does not take that item. Where every slot is empty, the batch
/// waits (up to [`CHAIN_GRACE`], until anything is handed in, the job withdraws or the batch
/// closes) for the next item of the chain the last one was of rather than end, and an empty slot
/// whose next item is there stays open to take it. A chain lives on in one
/// slot at a time. Items of no chain go to any slot.
struct RunnerFeed<'b> {
    batch: &'b SharedBatch,
    key: BatchKey,
    /// Each slot's item's job and lane.
    held: Vec<Option<Held>>,
    /// The chain of each slot's last item, and its job.
    homes: Vec<Option<Home>>,
    /// Slots holding an item.
    busy: usize,
}

/// Whose item a slot holds.
struct Held {
    lane: usize,
    job: Arc<JobLink>,
}

/// The chain a slot's last item was of, and the job whose chain it is.
struct Home {
    chain: u64,
    job: Arc<JobLink>,
}

impl BatchFeed for RunnerFeed<'_> {
    fn next(&mut self, slot: usize) -> Option<BatchItem> {
        let kept_for: Vec<u64> = (self.homes.iter().zip(&self.held).enumerate())
            .filter(|&(other, (_, held))| other != slot && held.is_none())
            .filter_map(|(_, (home, _))| home.as_ref().map(|home| home.chain))
            .collect();
        let chain = self.homes[slot].as_ref().map(|home| home.chain);
        let mut ticket = self.batch.take(&self.key, chain, &kept_for);
        if let (None, 0, Some(home)) = (&ticket, self.busy, &self.homes[slot]) {
            // the last item of the batch is done: rather than end, wait for its chain's next (or
            // another empty slot's, which that slot then takes: see `open`)
            self.batch.await_item(&home.job);
            ticket = self.batch.take(&self.key, chain, &kept_for);
        }
        let ticket = ticket?;
        if let Some(taken) = ticket.item.chain {
            // a chain lives on in one slot: the one whose last item it was has nothing to wait for
            for home in self.homes.iter_mut().filter(|home| home.as_ref().is_some_and(|home| home.chain == taken)) {
                *home = None;
            }
        }
        self.homes[slot] = ticket.item.chain.map(|chain| Home { chain, job: ticket.job.clone() });
        self.held[slot] = Some(Held { lane: ticket.lane, job: ticket.job });
        self.busy += 1;
        let mut waiting = self.batch.waiting();
        waiting.stats.items += 1;
        waiting.stats.most_together = waiting.stats.most_together.max(self.busy as u64);
        Some(ticket.item)
    }

    fn finished(&mut self, slot: usize, outcome: Optimised) {
        let Some(held) = self.held[slot].take() else { return };
        self.busy -= 1;
        let _ = held.job.replies.send(Reply::Finished { lane: held.lane, outcome });
    }

    fn iteration(&mut self, slot: usize, done: usize, losses: Losses, point: &Tensor) {
        let Some(held) = &self.held[slot] else { return };
        self.batch.waiting().stats.item_iterations += 1;
        let point = point.shallow_clone();
        let _ = held.job.replies.send(Reply::Iteration { lane: held.lane, done, losses, point });
    }

    fn open(&self, slot: usize) -> bool {
        // an idle batch ends (the runner starts the next with whatever comes first), unless the
        // next item of an empty slot's chain is there for it
        let continuation =
            || self.homes[slot].as_ref().is_some_and(|home| self.batch.continuation_waits(&self.key, home.chain));
        (self.busy > 0 && !self.batch.draining(&self.key))
            || (self.busy == 0 && self.held[slot].is_none() && continuation())
    }

    fn abandoned(&self, slot: usize) -> bool {
        self.held[slot].as_ref().is_some_and(|held| held.job.withdrawn.load(Ordering::SeqCst))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use super::*;
    use crate::device::Precision;
    use crate::device::threads::tests::{name_this_thread, parallel_work, settle_threads_named};
    use crate::imageio;
    use crate::style::stylizer::tests::{QueuedItems, assert_as_if_alone, network, network_in, picture, targets};
    use crate::style::{Stopping, Targets};

    /// Numbered items for one lane: item `id` starts from a picture of phase `phase` and runs
    /// `iterations`, towards `targets`.
    fn lane(items: &[(usize, &Targets, f32, usize)], size: (u32, u32)) -> VecDeque<(usize, BatchItem)> {
        items
            .iter()
            .map(|&(id, targets, phase, iterations)| {
                let start = imageio::rgb_to_tensor(&picture(size.0, size.1, phase));
                let stopping = Stopping { tolerance: 0.0, patience: 1 };
                (id, BatchItem { targets: targets.shallow_clone(), start, iterations, stopping, chain: None })
            })
            .collect()
    }

    /// Runs each job's feed (one lane each) in `batch` from its own thread; the runner starts only
    /// once every job's first item waits, so the first batch sees them all. Returns the feeds.
    fn run_jobs<F: BatchFeed + Send>(batch: &SharedBatch, vgg: &Vgg, jobs: Vec<F>) -> Vec<F> {
        let settings = StyleSettings::default();
        crate::bench::run_at_once(jobs, vgg, Some((batch, "m")), |mut feed, _, shared| {
            shared.expect("a shared batch").optimise("m", &settings, 1, &mut feed)?;
            Ok(feed)
        })
        .unwrap()
    }

    #[test]
    fn two_jobs_share_one_batch_and_each_frame_is_painted_as_if_alone() {
        // in both precisions: rounding differs with the batch's other images, more so in bf16 (run
        // where the CPU computes bf16; without the instructions it is some 27× slower)
        two_jobs_in_one_batch(&network_in(Precision::F32));
        if crate::device::bf16::cpu_has_bf16() {
            two_jobs_in_one_batch(&network_in(Precision::Bf16));
        }
    }

    fn two_jobs_in_one_batch(vgg: &Vgg) {
        let stylizer = Stylizer::new(vgg, StyleSettings::default()).unwrap();
        let first = targets(&stylizer, 64, 48);
        let mut second = targets(&stylizer, 64, 48);
        second.content = stylizer.content_targets(&imageio::rgb_to_tensor(&picture(64, 48, 1.9)));
        let plan = [(0, &first, 0.2, 4), (1, &first, 1.1, 3), (2, &second, 2.3, 6), (3, &second, 0.7, 2)];
        let jobs = vec![
            QueuedItems::new(vec![lane(&plan[..2], (64, 48))]),
            QueuedItems::new(vec![lane(&plan[2..], (64, 48))]),
        ];
        let batch = SharedBatch::new(2);
        let feeds = run_jobs(&batch, vgg, jobs);
        assert_eq!((feeds[0].order.clone(), feeds[1].order.clone()), (vec![0, 1], vec![2, 3]));
        for (id, targets, phase, iterations) in plan {
            let feed = &feeds[id / 2];
            let start = imageio::rgb_to_tensor(&picture(64, 48, phase));
            assert_as_if_alone(vgg, id, (&feed.seen[&id], &feed.outcomes[&id]), (targets, &start, iterations));
        }
        let stats = batch.stats();
        assert_eq!((stats.items, stats.item_iterations, stats.most_together), (4, 15, 2));
    }

    #[test]
    fn frames_of_another_size_wait_for_their_own_batch() {
        let vgg = network();
        let stylizer = Stylizer::new(&vgg, StyleSettings::default()).unwrap();
        let wide = targets(&stylizer, 64, 48);
        let square = targets(&stylizer, 40, 40);
        let jobs = vec![
            QueuedItems::new(vec![lane(&[(0, &wide, 0.2, 3)], (64, 48))]),
            QueuedItems::new(vec![lane(&[(1, &square, 0.4, 3)], (40, 40))]),
        ];
        let batch = SharedBatch::new(4);
        let feeds = run_jobs(&batch, &vgg, jobs);
        assert_eq!(feeds[0].outcomes[&0].image.size(), [1, 3, 48, 64]);
        assert_eq!(feeds[1].outcomes[&1].image.size(), [1, 3, 40, 40]);
        let stats = batch.stats();
        assert_eq!((stats.batches, stats.items, stats.most_together), (2, 2, 1));
    }

    /// A feed that gives up (as a cancelled job does) once it has seen `after` iterations.
    struct GivesUp {
        feed: QueuedItems,
        after: usize,
    }

    impl BatchFeed for GivesUp {
        fn next(&mut self, slot: usize) -> Option<BatchItem> {
            self.feed.next(slot)
        }
        fn finished(&mut self, slot: usize, outcome: Optimised) {
            self.feed.finished(slot, outcome);
        }
        fn iteration(&mut self, slot: usize, done: usize, losses: Losses, point: &Tensor) {
            self.feed.iteration(slot, done, losses, point);
        }
        fn cancelled(&self) -> bool {
            self.feed.seen.values().map(Vec::len).sum::<usize>() >= self.after
        }
    }

    #[test]
    fn a_job_that_gives_up_leaves_the_batch_and_the_other_goes_on() {
        let vgg = network();
        let stylizer = Stylizer::new(&vgg, StyleSettings::default()).unwrap();
        let first = targets(&stylizer, 64, 48);
        let batch = SharedBatch::new(2);
        let quitter = GivesUp { feed: QueuedItems::new(vec![lane(&[(0, &first, 0.2, 400)], (64, 48))]), after: 2 };
        let stayer =
            GivesUp { feed: QueuedItems::new(vec![lane(&[(1, &first, 1.3, 5)], (64, 48))]), after: usize::MAX };
        // run_jobs starts the runner once both frames wait, so that they begin in one batch and the
        // stayer's passes change size only when the quitter leaves: passes of another size change
        // the gradients' last bits, which L-BFGS can amplify towards the tolerance of `as if alone`
        let [quitter, stayer]: [GivesUp; 2] =
            run_jobs(&batch, &vgg, vec![quitter, stayer]).try_into().ok().expect("two feeds");
        let stayer = stayer.feed;
        assert!(quitter.feed.outcomes.is_empty());
        let start = imageio::rgb_to_tensor(&picture(64, 48, 1.3));
        assert_as_if_alone(&vgg, 1, (&stayer.seen[&1], &stayer.outcomes[&1]), (&first, &start, 5));
        // the quitter's run ended at a read soon after it gave up, not after its 400 iterations
        assert!(batch.stats().item_iterations < 100, "{:?}", batch.stats());
    }

    #[test]
    fn a_job_alone_in_a_shared_batch_carries_its_chain_from_frame_to_frame() {
        let vgg = network();
        let stylizer = Stylizer::new(&vgg, StyleSettings::default()).unwrap();
        let first = targets(&stylizer, 32, 24);
        // three frames of one chain, then one of none: the job hands each in once it has the last back.
        // A step that doubles the loss makes the optimiser forget the item, whatever the chain, so the
        // frames before the last of the chain stop before a quasi-Newton step is evaluated: the first
        // after its scaled gradient step, the middle one after its first evaluation (its only pair
        // would span two frames and is refused; it hands the first one's on)
        let chained = |chain: Option<u64>| move |(id, item): (usize, BatchItem)| (id, BatchItem { chain, ..item });
        let plan = [(0, &first, 0.2, 2), (1, &first, 0.4, 1), (2, &first, 0.6, 2), (3, &first, 0.8, 2)];
        let mut frames: VecDeque<_> = lane(&plan[..3], (32, 24)).into_iter().map(chained(Some(11))).collect();
        frames.extend(lane(&plan[3..], (32, 24)).into_iter().map(chained(None)));
        let batch = SharedBatch::new(2);
        let feeds = run_jobs(&batch, &vgg, vec![QueuedItems::new(vec![frames])]);
        let carried: Vec<bool> = feeds[0].outcomes.values().map(|outcome| outcome.curvature_carried).collect();
        assert_eq!(carried, [false, true, true, false]);
        // the batch waited for each next frame of the chain instead of ending; the last ended it
        assert_eq!(batch.stats().batches, 1, "{:?}", batch.stats());
    }

    /// A job's items, of which it hands item `late` in only `pause` after it has the one before
    /// back, as a job busy with a large frame's targets does.
    struct Late {
        items: QueuedItems,
        late: usize,
        pause: Duration,
    }

    impl BatchFeed for Late {
        fn next(&mut self, slot: usize) -> Option<BatchItem> {
            if self.items.queues[slot].front().is_some_and(|(id, _)| *id == self.late) {
                std::thread::sleep(self.pause);
            }
            self.items.next(slot)
        }
        fn finished(&mut self, slot: usize, outcome: Optimised) {
            self.items.finished(slot, outcome);
        }
        fn iteration(&mut self, slot: usize, done: usize, losses: Losses, point: &Tensor) {
            self.items.iteration(slot, done, losses, point);
        }
    }

    #[test]
    fn a_frame_handed_in_seconds_after_the_last_one_came_back_still_carries_the_chain_on() {
        let vgg = network();
        let stylizer = Stylizer::new(&vgg, StyleSettings::default()).unwrap();
        let first = targets(&stylizer, 32, 24);
        let chained = |(id, item): (usize, BatchItem)| (id, BatchItem { chain: Some(12), ..item });
        // as in the test above, the frames before the last end before a quasi-Newton step
        let plan = [(0, &first, 0.2, 2), (1, &first, 0.4, 1), (2, &first, 0.6, 2)];
        let frames: VecDeque<_> = lane(&plan, (32, 24)).into_iter().map(chained).collect();
        // the last frame comes 3 s after the one before came back
        let job = Late { items: QueuedItems::new(vec![frames]), late: 2, pause: Duration::from_secs(3) };
        let batch = SharedBatch::new(2);
        let feeds = run_jobs(&batch, &vgg, vec![job]);
        let carried: Vec<bool> = feeds[0].items.outcomes.values().map(|outcome| outcome.curvature_carried).collect();
        assert_eq!(carried, [false, true, true]);
        assert_eq!(batch.stats().batches, 1, "{:?}", batch.stats());
    }

    /// A job's items, handed in after parallel libtorch work on the job's thread (as a frame's
    /// content targets are), which counts its own OpenMP workers while the batch paints.
    struct CountsWorkers {
        items: QueuedItems,
        /// The job thread's OpenMP workers at each iteration the batch reported.
        workers: Vec<usize>,
    }

    /// The name the job's thread takes, and its workers with it.
    const JOB_THREAD: &str = "shared-job";

    impl BatchFeed for CountsWorkers {
        fn next(&mut self, slot: usize) -> Option<BatchItem> {
            name_this_thread(JOB_THREAD);
            assert!(threads::limit_this_thread(2), "libtorch's OpenMP runtime was not found");
            assert!(parallel_work() > 0.0);
            self.items.next(slot)
        }
        fn finished(&mut self, slot: usize, outcome: Optimised) {
            self.items.finished(slot, outcome);
        }
        fn iteration(&mut self, slot: usize, done: usize, losses: Losses, point: &Tensor) {
            self.workers.push(settle_threads_named(JOB_THREAD, 1) - 1);
            self.items.iteration(slot, done, losses, point);
        }
    }

    #[test]
    fn a_job_leaves_no_openmp_workers_parked_while_the_shared_batch_paints_its_frames() {
        let vgg = network();
        let stylizer = Stylizer::new(&vgg, StyleSettings::default()).unwrap();
        let first = targets(&stylizer, 32, 24);
        let frames = lane(&[(0, &first, 0.2, 2), (1, &first, 0.4, 2)], (32, 24));
        let job = CountsWorkers { items: QueuedItems::new(vec![frames]), workers: Vec::new() };
        let feeds = run_jobs(&SharedBatch::new(1), &vgg, vec![job]);
        assert_eq!(feeds[0].items.outcomes.len(), 2);
        assert!(!feeds[0].workers.is_empty(), "the batch reported no iteration");
        assert!(feeds[0].workers.iter().all(|&workers| workers == 0), "parked workers: {:?}", feeds[0].workers);
    }

    #[test]
    fn a_slot_takes_the_next_item_of_its_chain_and_leaves_other_empty_slots_theirs() {
        let batch = SharedBatch::new(3);
        let key = |side: i64| BatchKey {
            model: "m".into(),
            settings: StyleSettings::default(),
            size: vec![1, 3, side, side],
        };
        let (replies, _received) = crossbeam_channel::unbounded();
        let job = Arc::new(JobLink { replies, withdrawn: AtomicBool::new(false) });
        let ticket = |lane: usize, chain: Option<u64>, side: i64| {
            let targets = Targets { content: Vec::new(), style: Vec::new(), temporal: None };
            let start = Tensor::zeros([1, 3, side, side], (tch::Kind::Float, tch::Device::Cpu));
            let stopping = Stopping { tolerance: 0.0, patience: 1 };
            let item = BatchItem { targets, start, iterations: 1, stopping, chain };
            Ticket { key: key(side), lane, item, job: job.clone() }
        };
        let lanes =
            |side: i64, home: Option<u64>, kept_for: &[u64]| batch.take(&key(side), home, kept_for).map(|t| t.lane);
        // oldest first: chains 7, none, 8, 9
        let queued = [ticket(0, Some(7), 8), ticket(1, None, 8), ticket(2, Some(8), 8), ticket(3, Some(9), 8)];
        batch.waiting().tickets.extend(queued);
        // chain 8's slot takes chain 8's item, though older ones wait
        assert_eq!(lanes(8, Some(8), &[7]), Some(2));
        // another slot passes over the item that chain 7's empty slot waits for
        assert_eq!(lanes(8, Some(5), &[7]), Some(1));
        assert_eq!(lanes(8, None, &[7, 9]), None);
        assert_eq!(lanes(8, None, &[]), Some(0));
        // an item of another size waiting first holds this batch's back: its own batch comes next
        batch.waiting().tickets.push_front(ticket(4, None, 16));
        assert_eq!(lanes(8, Some(9), &[]), None);
        assert_eq!(lanes(16, None, &[]), Some(4));
        assert_eq!(lanes(8, Some(9), &[]), Some(3));
        // nor does this batch take items handed in after another size's, even one left over
        let queued = [ticket(5, Some(7), 8), ticket(6, None, 16), ticket(7, None, 8)];
        batch.waiting().tickets.extend(queued);
        assert_eq!(lanes(8, None, &[7]), None);
        assert!(batch.continuation_waits(&key(8), 7) && !batch.continuation_waits(&key(8), 6));
        assert_eq!(lanes(8, Some(7), &[]), Some(5));
        assert!(!batch.continuation_waits(&key(8), 7));
        assert_eq!(lanes(8, None, &[]), None);
    }

    #[test]
    fn a_closed_batch_refuses_new_items() {
        let vgg = network();
        let stylizer = Stylizer::new(&vgg, StyleSettings::default()).unwrap();
        let first = targets(&stylizer, 64, 48);
        let batch = SharedBatch::new(2);
        batch.close();
        let mut feed = QueuedItems::new(vec![lane(&[(0, &first, 0.2, 3)], (64, 48))]);
        let error = batch.optimise("m", &StyleSettings::default(), 1, &mut feed).unwrap_err();
        assert!(error.to_string().contains("closed"), "{error}");
    }
}
