//! The painting stage of a video job, on the thread that holds the network: one lane per segment,
//! each with its own painter (its chain in time), all optimised as one batch that gives a lane its
//! next frame as soon as its last is done — the job's own batch, or a batch the device shares with
//! other jobs. Frames an earlier run stored are taken from the checkpoint instead, while a lane's
//! stored frames last.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use crossbeam_channel::{Receiver, Sender};
use image::RgbImage;
use tch::Tensor;

use super::JobEvent;
use super::encode::Painted;
use super::motion::Arrived;
use crate::error::{Error, Result};
use crate::media::Frame;
use crate::pipeline::checkpoint::{PictureKey, StoredFrames};
use crate::pipeline::painter::{FramePainter, FramePlan, PaintedFrame};
use crate::pipeline::report::FrameRecord;
use crate::pipeline::segments::SegmentPlan;
use crate::pipeline::stages::{FirstError, Item};
use crate::style::{BatchFeed, BatchItem, Losses, Optimised, SharedBatch};

/// The stored picture `key`, if it is readable and `size` big.
fn load_stored(stored: &StoredFrames, key: PictureKey, size: (u32, u32)) -> Option<RgbImage> {
    match stored.load(key) {
        Ok(picture) if picture.dimensions() == size => Some(picture),
        Ok(_) | Err(_) => {
            tracing::warn!(frame = key.0, lead_in = key.1, "a stored frame is unusable; painting it again");
            None
        }
    }
}

/// The painting stage's state, on the calling thread (the network stays where it was loaded): one
/// lane per segment, all painted as one batch that takes a lane's next frame as soon as its last is
/// done.
pub(super) struct PaintStage<'a, 'm> {
    lanes: Vec<Lane<'m>>,
    plan: &'a SegmentPlan,
    resumable: &'a BTreeMap<PictureKey, FrameRecord>,
    stored: &'a StoredFrames,
    /// Own frames passed on so far.
    done: u64,
    total: u64,
    /// Raised from outside to stop once the frames being painted are done.
    stop: &'a AtomicBool,
    /// Frames passed on before a requested stop, once stopped.
    stopped_after: Option<u64>,
    /// The device's shared batch and the network's identity there, when the job joins one.
    shared: Option<(&'a SharedBatch, &'a str)>,
}

/// One segment's painter and where it is.
struct Lane<'m> {
    painter: FramePainter<'m>,
    /// Still taking the segment's frames from the checkpoint.
    resuming: bool,
    /// The frame being optimised.
    painting: Option<InFlight>,
    /// The decoder has sent all of the segment's frames.
    ended: bool,
}

/// A frame being optimised: its timing, what its finish needs, its decode time, since when, its span.
struct InFlight {
    timing: Frame,
    plan: FramePlan,
    decode_seconds: f64,
    started: Instant,
    span: tracing::Span,
}

impl<'m> Lane<'m> {
    fn new(painter: FramePainter<'m>) -> Self {
        Lane { painter, resuming: true, painting: None, ended: false }
    }
}

impl<'a, 'm> PaintStage<'a, 'm> {
    /// A stage painting the lanes of `plan`'s segments with `painters` (one each), taking the frames
    /// `resumable` lists from `stored`; `total` frames in the video; `stop` asks it to stop.
    pub(super) fn new(
        painters: Vec<FramePainter<'m>>,
        plan: &'a SegmentPlan,
        resumable: &'a BTreeMap<PictureKey, FrameRecord>,
        stored: &'a StoredFrames,
        total: u64,
        stop: &'a AtomicBool,
    ) -> Self {
        let lanes = painters.into_iter().map(Lane::new).collect();
        PaintStage { lanes, plan, resumable, stored, done: 0, total, stop, stopped_after: None, shared: None }
    }

    /// Paints in the device's shared `batch`, where this job's network is known as `model`.
    pub(super) fn sharing(self, batch: &'a SharedBatch, model: &'a str) -> Self {
        PaintStage { shared: Some((batch, model)), ..self }
    }

    /// Frames passed on before a requested stop, once stopped.
    pub(super) fn stopped_after(&self) -> Option<u64> {
        self.stopped_after
    }
}

impl PaintStage<'_, '_> {
    /// Paints every lane's frames and passes the pictures on. `None` when another stage stopped first
    /// or a stop was asked for.
    pub(super) fn run(
        &mut self,
        receivers: Vec<Receiver<Item<Arrived>>>,
        sender: Sender<Item<Painted>>,
        errors: &FirstError,
        observer: &mut dyn FnMut(JobEvent<'_>),
    ) -> Result<Option<()>> {
        let runner = self.lanes[0].painter.runner();
        let lanes = self.lanes.len();
        let shared = self.shared;
        let mut feed = LaneFeed { stage: self, receivers, sender, errors, observer, failure: None, halted: false };
        match shared {
            None => runner.optimise_refilled(lanes, &mut feed),
            Some((batch, model)) => {
                if let Err(error) = batch.optimise(model, runner.settings(), lanes, &mut feed) {
                    feed.failure.get_or_insert(error);
                }
            }
        }
        let LaneFeed { failure, halted, sender, .. } = feed;
        if let Some(error) = failure {
            return Err(error);
        }
        if halted || errors.stopped() {
            return Ok(None);
        }
        if !self.lanes.iter().all(|lane| lane.ended) {
            // a requested stop: dropping the sender without an end lets the encoder store what it
            // holds, then stop
            tracing::info!(frames_done = self.done, "stopped on request");
            self.stopped_after = Some(self.done);
            return Ok(None);
        }
        Ok(sender.send(Item::End).ok())
    }

    /// Whether frame `index` of lane `lane` is a lead-in picture.
    fn is_lead_in(&self, lane: usize, index: u64) -> bool {
        self.plan.segments()[lane].is_lead_in(index)
    }

    /// The frame as an earlier run stored it, while the lane's stored pictures last.
    fn resume(&mut self, lane: usize, arrived: &Arrived) -> Option<Painted> {
        if !self.lanes[lane].resuming {
            return None;
        }
        let index = arrived.timing.index;
        let key = (index, self.is_lead_in(lane, index));
        let size = (arrived.timing.width, arrived.timing.height);
        let found = self.resumable.get(&key).and_then(|record| Some((record, load_stored(self.stored, key, size)?)));
        let Some((record, picture)) = found else {
            self.lanes[lane].resuming = false;
            return None;
        };
        let mut record = record.clone();
        self.lanes[lane].painter.resume(&arrived.content, &picture, &record);
        record.resumed = true;
        record.seconds.decode = arrived.decode_seconds;
        Some(Painted { timing: arrived.timing.clone(), picture, record })
    }
}

/// The painting stage as the batch's feed: a lane's next frame comes from its motion stage (frames an
/// earlier run stored are passed on without painting), a finished frame goes to the encoder.
struct LaneFeed<'s, 'a, 'm, 'o> {
    stage: &'s mut PaintStage<'a, 'm>,
    receivers: Vec<Receiver<Item<Arrived>>>,
    sender: Sender<Item<Painted>>,
    errors: &'s FirstError,
    observer: &'o mut dyn FnMut(JobEvent<'_>),
    /// This stage's own error.
    failure: Option<Error>,
    /// The encoder is gone.
    halted: bool,
}

impl LaneFeed<'_, '_, '_, '_> {
    /// Plans lane `lane`'s next frame, or passes it on from the checkpoint (`None`).
    fn start(&mut self, lane: usize, arrived: Arrived) -> Result<Option<BatchItem>> {
        if let Some(resumed) = self.stage.resume(lane, &arrived) {
            self.pass_on(resumed);
            return Ok(None);
        }
        let Arrived { timing, content, motion, decode_seconds } = arrived;
        let span = tracing::info_span!("frame", index = timing.index, segment = lane);
        let painter = &self.stage.lanes[lane].painter;
        let (item, plan) = span.in_scope(|| painter.plan(timing.index, timing.pts, &content, motion))?;
        let started = Instant::now();
        self.stage.lanes[lane].painting = Some(InFlight { timing, plan, decode_seconds, started, span });
        Ok(Some(item))
    }

    /// Tells the observer about an own frame and sends the picture to the encoder.
    fn pass_on(&mut self, painted: Painted) {
        if !painted.record.lead_in {
            self.stage.done += 1;
            let (record, picture) = (&painted.record, &painted.picture);
            (self.observer)(JobEvent::Frame { record, picture, done: self.stage.done, total: self.stage.total });
        }
        if self.sender.send(Item::Next(painted)).is_err() {
            self.halted = true;
        }
    }
}

impl BatchFeed for LaneFeed<'_, '_, '_, '_> {
    fn next(&mut self, lane: usize) -> Option<BatchItem> {
        loop {
            if self.cancelled() {
                return None;
            }
            if self.stage.stop.load(Ordering::SeqCst) {
                return None;
            }
            let arrived = match self.receivers[lane].recv() {
                Ok(Item::Next(arrived)) => arrived,
                Ok(Item::End) => {
                    self.stage.lanes[lane].ended = true;
                    return None;
                }
                // an earlier stage failed (its error is recorded) or stopped for another stage
                Err(_) => return None,
            };
            match self.start(lane, arrived) {
                Ok(Some(item)) => return Some(item),
                Ok(None) => {}
                Err(error) => {
                    self.failure = Some(error);
                    return None;
                }
            }
        }
    }

    fn finished(&mut self, lane: usize, outcome: Optimised) {
        // lanes busy until now share the time since this frame began
        let busy = self.stage.lanes.iter().filter(|lane| lane.painting.is_some()).count().max(1);
        let Some(flight) = self.stage.lanes[lane].painting.take() else { return };
        let optimise_seconds = flight.started.elapsed().as_secs_f64() / busy as f64;
        let index = flight.plan.index();
        let painted =
            flight.span.in_scope(|| self.stage.lanes[lane].painter.finish(flight.plan, outcome, optimise_seconds));
        let PaintedFrame { picture, mut record } = painted;
        record.seconds.decode = flight.decode_seconds;
        record.lead_in = self.stage.is_lead_in(lane, index);
        self.pass_on(Painted { timing: flight.timing, picture, record });
    }

    fn iteration(&mut self, lane: usize, done: usize, _: Losses, _: &Tensor) {
        if let Some(flight) = &self.stage.lanes[lane].painting {
            let (index, planned) = (flight.plan.index(), flight.plan.planned());
            (self.observer)(JobEvent::Iteration { index, done, planned });
        }
    }

    fn cancelled(&self) -> bool {
        self.failure.is_some() || self.halted || self.errors.stopped()
    }
}
