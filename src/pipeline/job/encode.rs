//! The encoding stage of a video job: each picture is stored as a checkpoint as it arrives (in any
//! order when the job runs in segments), then the frames are encoded in the video's order, with the
//! segments' overlaps cross-faded.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

use crossbeam_channel::Receiver;
use image::RgbImage;

use crate::error::{Error, Result};
use crate::media::{Frame, VideoWriter};
use crate::pipeline::checkpoint::{Checkpoint, StoredFrames};
use crate::pipeline::report::FrameRecord;
use crate::pipeline::segments::{SegmentPlan, cross_fade};
use crate::pipeline::stages::{FirstError, Item};

/// A painted picture (a frame's own or a lead-in one) on its way to the encoder: the input frame's
/// timing, the picture, the record.
pub(super) struct Painted {
    pub timing: Frame,
    pub picture: RgbImage,
    pub record: FrameRecord,
}

/// Puts pictures that arrive out of order (segments) back in the video's order: own frames wait for
/// their turn, and for the lead-in picture they are cross-faded with. Only the frame whose turn it is
/// stays in memory; the others are read back from the checkpoint when their turn comes.
pub(super) struct Reorder<'p> {
    plan: &'p SegmentPlan,
    stored: StoredFrames,
    /// The next frame to encode.
    next: u64,
    /// Own frames waiting: timing, record and the picture when it is held.
    own: BTreeMap<u64, (Frame, FrameRecord, Option<RgbImage>)>,
    /// Lead-in pictures stored and not yet used.
    lead_ins: BTreeSet<u64>,
}

impl<'p> Reorder<'p> {
    pub(super) fn new(plan: &'p SegmentPlan, stored: StoredFrames) -> Self {
        Reorder { plan, stored, next: 0, own: BTreeMap::new(), lead_ins: BTreeSet::new() }
    }

    /// Takes a stored picture in; gives back a lead-in picture's record (it is not encoded as such).
    fn add(&mut self, painted: Painted) -> Option<FrameRecord> {
        let Painted { timing, picture, record } = painted;
        if record.lead_in {
            self.lead_ins.insert(record.index);
            return Some(record);
        }
        let held = (record.index == self.next).then_some(picture);
        self.own.insert(record.index, (timing, record, held));
        None
    }

    /// The next frame in order, its picture final, once it and its lead-in (if any) are in.
    fn take_ready(&mut self) -> Result<Option<(Frame, FrameRecord, RgbImage)>> {
        let index = self.next;
        let weight = self.plan.lead_in_weight(index);
        if !self.own.contains_key(&index) || (weight.is_some() && !self.lead_ins.contains(&index)) {
            return Ok(None);
        }
        let (timing, record, held) = self.own.remove(&index).expect("checked above");
        let picture = match held {
            Some(picture) => picture,
            None => self.stored.load((index, false))?,
        };
        let picture = match weight {
            Some(weight) => cross_fade(&picture, &self.stored.load((index, true))?, weight),
            None => picture,
        };
        self.lead_ins.remove(&index);
        self.next += 1;
        Ok(Some((timing, record, picture)))
    }

    /// Fails when frames are left over at the end of the stream.
    fn finish(&self) -> Result<()> {
        match self.own.keys().next() {
            None => Ok(()),
            Some(first) => Err(Error::Internal(format!(
                "frame {first} was painted but frame {} never came, so it could not be encoded",
                self.next
            ))),
        }
    }
}

/// The encoding stage: stores each picture as a checkpoint (unless it came from one), then encodes
/// the frames in order.
pub(super) struct EncodeStage<'c> {
    writer: VideoWriter,
    checkpoint: &'c mut Checkpoint,
    order: Reorder<'c>,
    records: Vec<FrameRecord>,
    lead_ins: Vec<FrameRecord>,
}

impl<'c> EncodeStage<'c> {
    /// A stage encoding into `writer`, storing into `checkpoint`, putting frames in order with `order`.
    pub(super) fn new(writer: VideoWriter, checkpoint: &'c mut Checkpoint, order: Reorder<'c>) -> Self {
        EncodeStage { writer, checkpoint, order, records: Vec::new(), lead_ins: Vec::new() }
    }
}

impl EncodeStage<'_> {
    /// Runs to the end of the stream and finishes the video. Returns the records with their encode
    /// times (the frames' in order, then the lead-in pictures'), or `None` when an earlier stage
    /// failed (the unfinished video is then removed).
    pub(super) fn run(
        mut self,
        receiver: Receiver<Item<Painted>>,
        errors: &FirstError,
    ) -> Result<Option<Vec<FrameRecord>>> {
        while let Ok(item) = receiver.recv() {
            let Item::Next(mut painted) = item else {
                self.order.finish()?;
                self.writer.finish()?;
                self.records.append(&mut self.lead_ins);
                return Ok(Some(self.records));
            };
            if errors.stopped() {
                return Ok(None);
            }
            let started = Instant::now();
            if !painted.record.resumed {
                self.checkpoint.store(&painted.record, &painted.picture)?;
            }
            painted.record.seconds.encode = started.elapsed().as_secs_f64();
            self.lead_ins.extend(self.order.add(painted));
            while let Some((timing, mut record, picture)) = self.order.take_ready()? {
                let started = Instant::now();
                self.writer.write(&Frame { rgb: picture.into_raw(), ..timing })?;
                record.seconds.encode += started.elapsed().as_secs_f64();
                self.records.push(record);
            }
        }
        Ok(None)
    }
}
