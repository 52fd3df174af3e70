//! The motion from one input frame to the next: the optical-flow pair, the pixels it is reliable on,
//! and whether a scene cut lies between. It depends on the input frames alone, never on a painted
//! one, so a video job works it out ahead, on its own thread between the decoder and the stylizer,
//! while the frame before is still being painted; the [`super::FramePainter`] works it out itself
//! only for a frame that arrives without it. Tensors only, no FFmpeg.

use std::time::Instant;

use tch::{Device, Tensor};

use super::settings::VideoSettings;
use crate::device::threads;
use crate::error::Result;
use crate::flow::{self, FlowPair, FlowSettings};

/// The motion from frame `from` to the frame it was measured for.
pub struct Motion {
    /// The frame the motion starts from (the one painted before, in the same run of frames).
    pub from: u64,
    /// The flow both ways.
    pub pair: FlowPair,
    /// 1 where the backward flow is reliable, 0 where it is not.
    pub reliable: Tensor,
    /// A scene cut lies between the two frames.
    pub is_cut: bool,
    /// Seconds it took.
    pub seconds: f64,
}

/// Measures the motion from `previous` (frame `from`) to `next`, both RGB 0..1 `[1, 3, H, W]` on one
/// device, with `threads` libtorch threads on the CPU (0: as they are).
pub fn measure(from: u64, previous: &Tensor, next: &Tensor, settings: &FlowSettings, threads: usize) -> Result<Motion> {
    let started = Instant::now();
    let threads = if next.device() == Device::Cpu { threads } else { 0 };
    threads::with_threads(threads, || {
        let pair = flow::flow_pair(previous, next, settings)?;
        let reliable = pair.reliability();
        let change = flow::scene_change(previous, next, &reliable, &settings.scene_cut);
        if change.is_cut {
            tracing::info!(
                from,
                histogram = change.histogram_distance,
                unreliable = change.unreliable_fraction,
                "scene cut"
            );
        }
        let seconds = started.elapsed().as_secs_f64();
        Ok(Motion { from, pair, reliable, is_cut: change.is_cut, seconds })
    })
}

/// Whether frames painted with `video`'s settings need the motion into them: for the temporal mode,
/// or for E_warp when `measure_warping`.
pub fn wanted(video: &VideoSettings, measure_warping: bool) -> bool {
    video.needs_flow() || measure_warping
}

/// Follows one run of input frames and measures the motion into each, where the settings want it.
pub struct MotionTracker {
    flow: FlowSettings,
    threads: usize,
    wanted: bool,
    /// The frame before and its index.
    previous: Option<(u64, Tensor)>,
}

impl MotionTracker {
    /// A tracker for `video`'s settings; `measure_warping` wants the motion even where the temporal
    /// mode needs none (for E_warp).
    pub fn new(video: &VideoSettings, measure_warping: bool) -> Self {
        MotionTracker {
            flow: video.flow.clone(),
            threads: video.flow_threads,
            wanted: wanted(video, measure_warping),
            previous: None,
        }
    }

    /// The libtorch threads it measures with on the CPU (0: as they are).
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// The motion from the frame before into `frame` (frame `index`): `None` on the first frame and
    /// where no motion is wanted.
    pub fn next(&mut self, index: u64, frame: &Tensor) -> Result<Option<Motion>> {
        let motion = match &self.previous {
            Some((from, previous)) if self.wanted => Some(measure(*from, previous, frame, &self.flow, self.threads)?),
            _ => None,
        };
        self.pass(index, frame);
        Ok(motion)
    }

    /// Takes `frame` (frame `index`) as the frame before the next without measuring the motion into
    /// it (a frame that needs no painting).
    pub fn pass(&mut self, index: u64, frame: &Tensor) {
        self.previous = Some((index, frame.shallow_clone()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::TemporalMode;

    /// A textured frame moved `shift` pixels to the right.
    fn frame(shift: i64) -> Tensor {
        let texture = Tensor::arange(48 * 64, (tch::Kind::Float, Device::Cpu)).view([1, 1, 48, 64]);
        let texture = ((texture * 0.37).sin() * 0.5 + 0.5).repeat([1, 3, 1, 1]);
        texture.roll([shift], [3])
    }

    #[test]
    fn the_tracker_measures_what_measure_does_from_the_second_frame_on() {
        let video = VideoSettings::default();
        let mut tracker = MotionTracker::new(&video, false);
        let (first, second) = (frame(0), frame(2));
        assert!(tracker.next(7, &first).unwrap().is_none());
        let tracked = tracker.next(8, &second).unwrap().expect("motion into the second frame");
        let direct = measure(7, &first, &second, &video.flow, 1).unwrap();
        assert_eq!(tracked.from, 7);
        assert!(tracked.pair.backward.equal(&direct.pair.backward));
        assert!(tracked.reliable.equal(&direct.reliable));
        assert!(!tracked.is_cut);
        // the flow found the shift: two pixels back to the left, in the middle of the frame
        let dx = tracked.pair.backward.get(0).get(0).narrow(0, 16, 16).narrow(1, 16, 32).mean(tch::Kind::Float);
        assert!((dx.double_value(&[]) + 2.0).abs() < 0.5, "mean dx {}", dx.double_value(&[]));
    }

    #[test]
    fn no_motion_is_measured_where_none_is_wanted_or_a_frame_was_passed() {
        let independent = VideoSettings { temporal: TemporalMode::Independent, ..VideoSettings::default() };
        let mut tracker = MotionTracker::new(&independent, false);
        tracker.next(0, &frame(0)).unwrap();
        assert!(tracker.next(1, &frame(1)).unwrap().is_none());
        let mut measuring = MotionTracker::new(&independent, true);
        measuring.pass(4, &frame(0));
        assert_eq!(measuring.next(5, &frame(1)).unwrap().map(|m| m.from), Some(4));
    }
}
