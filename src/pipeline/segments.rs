//! Cutting a video into segments that are painted side by side. A GPU is far from busy with one
//! small frame at a time, so a job can split its frames into `segments` runs of consecutive frames
//! and paint frame `t` of every run in one batch (one forward and backward pass). Each run is its own
//! chain in time: its first frame starts from the content, the later ones from the previous output
//! warped along the flow. Where one run ends and the next begins the two chains would meet with a
//! jump, so every run but the first begins `overlap` frames early: those lead-in frames are painted
//! by both runs and the output cross-fades from the earlier run's pictures to the later run's.

use std::ops::Range;

use image::RgbImage;

/// One run of consecutive frames.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Segment {
    /// The frames it paints, in order.
    pub frames: Range<u64>,
    /// Its first own frame; the frames before it are its lead-in, whose pictures are blended into
    /// the previous segment's last frames.
    pub owned_from: u64,
}

impl Segment {
    /// Whether frame `index` is one of the lead-in frames.
    pub fn is_lead_in(&self, index: u64) -> bool {
        (self.frames.start..self.owned_from).contains(&index)
    }

    /// Frames it paints.
    pub fn len(&self) -> u64 {
        self.frames.end - self.frames.start
    }

    /// Whether it paints no frame.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// How a video's frames are split into segments.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SegmentPlan {
    segments: Vec<Segment>,
    overlap: u64,
}

impl SegmentPlan {
    /// Splits `frame_count` frames into `segments` runs of nearly equal length (fewer when the video
    /// is too short for each run to own more frames than the `overlap`).
    pub fn new(frame_count: u64, segments: u32, overlap: u32) -> Self {
        let overlap = u64::from(overlap);
        let count = u64::from(segments.max(1)).min((frame_count / (overlap + 1)).max(1));
        let bound = |k: u64| k * frame_count / count;
        let segments = (0..count)
            .map(|k| {
                let lead_in = if k == 0 { 0 } else { overlap };
                Segment { frames: bound(k) - lead_in..bound(k + 1), owned_from: bound(k) }
            })
            .collect();
        SegmentPlan { segments, overlap }
    }

    /// The segments, in the video's order.
    pub fn segments(&self) -> &[Segment] {
        &self.segments
    }

    /// Batches needed: the longest segment's frame count.
    pub fn steps(&self) -> u64 {
        self.segments.iter().map(Segment::len).max().unwrap_or(0)
    }

    /// The weight of the later segment's lead-in picture in frame `index`'s output, when the frame is
    /// in a cross-fade: rising evenly from 1/(overlap + 1) to overlap/(overlap + 1).
    pub fn lead_in_weight(&self, index: u64) -> Option<f32> {
        let segment = self.segments.iter().find(|s| s.is_lead_in(index))?;
        let position = index - segment.frames.start + 1;
        Some(position as f32 / (self.overlap + 1) as f32)
    }
}

/// `own` × (1 − `weight`) + `lead_in` × `weight`, rounded, pixel by pixel (same sizes).
pub fn cross_fade(own: &RgbImage, lead_in: &RgbImage, weight: f32) -> RgbImage {
    let mut blended = own.clone();
    for (out, incoming) in blended.iter_mut().zip(lead_in.iter()) {
        let mixed = f32::from(*out) * (1.0 - weight) + f32::from(*incoming) * weight;
        *out = mixed.round().clamp(0.0, 255.0) as u8;
    }
    blended
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_cover_every_frame_once_and_lead_in_before_their_own() {
        let plan = SegmentPlan::new(10, 3, 2);
        let spans: Vec<(Range<u64>, u64)> = plan.segments().iter().map(|s| (s.frames.clone(), s.owned_from)).collect();
        assert_eq!(spans, vec![(0..3, 0), (1..6, 3), (4..10, 6)]);
        assert_eq!(plan.steps(), 6);
        let owned: u64 = plan.segments().iter().map(|s| s.frames.end - s.owned_from).sum();
        assert_eq!(owned, 10);
        assert_eq!(plan.lead_in_weight(0), None);
        assert_eq!(plan.lead_in_weight(1), Some(1.0 / 3.0));
        assert_eq!(plan.lead_in_weight(2), Some(2.0 / 3.0));
        assert_eq!(plan.lead_in_weight(3), None);
        assert_eq!(plan.lead_in_weight(5), Some(2.0 / 3.0));
    }

    #[test]
    fn short_videos_get_fewer_segments() {
        assert_eq!(SegmentPlan::new(5, 4, 2).segments().len(), 1);
        assert_eq!(SegmentPlan::new(6, 4, 2).segments().len(), 2);
        assert_eq!(SegmentPlan::new(1, 1, 0).segments(), &[Segment { frames: 0..1, owned_from: 0 }]);
        let single = SegmentPlan::new(7, 1, 4);
        assert_eq!(single.steps(), 7);
        assert!((0..7).all(|i| single.lead_in_weight(i).is_none()));
    }

    #[test]
    fn cross_fades_mix_by_weight() {
        let black = RgbImage::from_pixel(2, 1, image::Rgb([0, 100, 255]));
        let white = RgbImage::from_pixel(2, 1, image::Rgb([255, 200, 255]));
        let mixed = cross_fade(&black, &white, 0.25);
        assert_eq!(mixed.get_pixel(1, 0).0, [64, 125, 255]);
        assert_eq!(cross_fade(&black, &white, 0.0), black);
    }
}
