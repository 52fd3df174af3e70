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
use crate::device::threads;
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
        let limited = self.limit_threads();
        let mut resuming = true;
        loop {
            if errors.stopped() {
                return Ok(None);
            }
            if !limited {
                threads::release_this_thread();
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

    /// Holds the calling thread's libtorch work, the frames' conversion as well as the flow, to the
    /// tracker's threads on the CPU, so that the stage starts no OpenMP workers of its own beside
    /// the painting thread's (see [`threads::release_this_thread`]); whether it did. Where it did
    /// not (the count left as it is), the stage lets its workers go before it waits for a frame.
    fn limit_threads(&self) -> bool {
        self.device == Device::Cpu && self.tracker.threads() > 0 && threads::limit_this_thread(self.tracker.threads())
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::threads::tests::threads_named;
    use crate::pipeline::VideoSettings;

    /// Decoded frame `index`: 160×90 (above libtorch's grain for splitting work), a pattern moved
    /// `index` pixels to the right.
    fn decoded(index: u64) -> Decoded {
        let (width, height) = (160u32, 90u32);
        let pixel = |x: u32, y: u32| {
            let v = ((x + 2 * index as u32) * 7 + y * 3) as u8;
            [v, v / 2, 255 - v]
        };
        let rgb = (0..height).flat_map(|y| (0..width).flat_map(move |x| pixel(x, y))).collect();
        let frame = Frame { rgb, width, height, pts: index as i64, duration: 1, time_base: (1, 25), index };
        Decoded { frame, seconds: 0.0 }
    }

    #[test]
    fn the_motion_stage_measures_without_openmp_workers_of_its_own() {
        let name = "motion-stage";
        let (arrived, workers, libtorch_threads) = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                // as a thread that libtorch gives two threads: the stage is to hold itself to the flow's one
                assert!(threads::limit_this_thread(2), "libtorch's OpenMP runtime was not found");
                let (decoded_sender, decoded_receiver) = crossbeam_channel::unbounded();
                let (arrived_sender, arrived_receiver) = crossbeam_channel::unbounded();
                for index in 0..3 {
                    decoded_sender.send(Item::Next(decoded(index))).unwrap();
                }
                decoded_sender.send(Item::End).unwrap();
                let video = VideoSettings::default();
                assert_eq!(video.flow_threads, 1);
                let stage = MotionStage::new(MotionTracker::new(&video, false), Device::Cpu, BTreeSet::new());
                let errors = FirstError::default();
                assert_eq!(stage.run(decoded_receiver, arrived_sender, &errors).unwrap(), Some(()));
                let workers = threads_named(name) - 1;
                let libtorch_threads = tch::get_num_threads();
                let arrived: Vec<Option<u64>> = arrived_receiver
                    .try_iter()
                    .filter_map(|item| match item {
                        Item::Next(arrived) => Some(arrived.motion.map(|motion| motion.from)),
                        Item::End => None,
                    })
                    .collect();
                (arrived, workers, libtorch_threads)
            })
            .unwrap()
            .join()
            .unwrap();
        assert_eq!(arrived, [None, Some(0), Some(1)], "the motion into each frame from the one before");
        assert_eq!(workers, 0, "the motion stage left OpenMP workers parked beside the painting");
        assert_eq!(libtorch_threads, 1, "the stage's libtorch work, the frames' conversion too, runs on flow_threads");
    }
}
