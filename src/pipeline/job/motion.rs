//! The motion stage of a video job: one thread per segment, between the segment's decoder and the
//! painting stage. It turns each decoded frame into a tensor on the network's device and measures
//! the motion into it from the segment's frame before (see [`crate::pipeline::motion`]), so the
//! optical flow of a frame runs while the frame before is being painted. Frames at the start of a
//! segment that an earlier run stored are passed on without it: they will not be painted.

use std::collections::BTreeSet;
use std::time::Instant;

use crossbeam_channel::{Receiver, Sender};
use image::RgbImage;
use tch::{Device, Tensor};

use super::decode::Decoded;
use crate::error::{Error, Result};
use crate::imageio;
use crate::media::Frame;
use crate::pipeline::motion::{Motion, MotionTracker};
use crate::pipeline::stages::{FirstError, Item};

/// A frame ready to paint: its timing, its pixels on the device, the motion into it, its decode time.
pub(super) struct Arrived {
    pub timing: Frame,
    pub content: Tensor,
    /// `None` for a segment's first frame, where no motion is wanted, and for stored frames.
    pub motion: Option<Motion>,
    pub decode_seconds: f64,
}

/// One segment's motion stage.
pub(super) struct MotionStage {
    tracker: MotionTracker,
    device: Device,
    /// The frames an earlier run stored for this segment; those before the first one missing are
    /// passed on without their motion.
    stored: BTreeSet<u64>,
}

impl MotionStage {
    /// A stage that puts the frames on `device` and measures with `tracker` (on the CPU with the
    /// tracker's own thread count); `stored` lists the segment's frames an earlier run stored.
    pub(super) fn new(tracker: MotionTracker, device: Device, stored: BTreeSet<u64>) -> Self {
        MotionStage { tracker, device, stored }
    }

    /// Passes the segment's frames on with their motion. `None` when another stage stopped first.
    pub(super) fn run(
        mut self,
        receiver: Receiver<Item<Decoded>>,
        sender: Sender<Item<Arrived>>,
        errors: &FirstError,
    ) -> Result<Option<()>> {
        let mut resuming = true;
        loop {
            if errors.stopped() {
                return Ok(None);
            }
            let decoded = match receiver.recv() {
                Ok(Item::Next(decoded)) => decoded,
                Ok(Item::End) => break,
                // the decoder failed (its error is recorded) or stopped for another stage
                Err(_) => return Ok(None),
            };
            resuming = resuming && self.stored.contains(&decoded.frame.index);
            let arrived = self.arrive(decoded, resuming)?;
            if sender.send(Item::Next(arrived)).is_err() {
                return Ok(None);
            }
        }
        Ok(sender.send(Item::End).ok())
    }

    /// The decoded frame on the device, with its motion unless it is `stored`.
    fn arrive(&mut self, decoded: Decoded, stored: bool) -> Result<Arrived> {
        let converted = Instant::now();
        let Decoded { mut frame, seconds } = decoded;
        let content = frame_tensor(&mut frame)?.to_device(self.device);
        let decode_seconds = seconds + converted.elapsed().as_secs_f64();
        let motion = if stored {
            self.tracker.pass(frame.index, &content);
            None
        } else {
            let _span = tracing::info_span!("motion", index = frame.index).entered();
            self.tracker.next(frame.index, &content)?
        };
        Ok(Arrived { timing: frame, content, motion, decode_seconds })
    }
}

/// A decoded frame's pixels, taken out of it, as an RGB 0..1 tensor `[1, 3, H, W]` on the CPU.
fn frame_tensor(frame: &mut Frame) -> Result<Tensor> {
    let picture = RgbImage::from_raw(frame.width, frame.height, std::mem::take(&mut frame.rgb))
        .ok_or_else(|| Error::Internal(format!("frame {} has a short pixel buffer", frame.index)))?;
    Ok(imageio::rgb_to_tensor(&picture))
}
