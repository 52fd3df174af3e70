//! The decoding stage of a video job: one thread per segment, each with a reader that starts at
//! the segment's first frame and reports the damage met in the frames the segment owns.

use std::path::Path;
use std::time::Instant;

use crossbeam_channel::Sender;

use crate::error::Result;
use crate::media::{Frame, MediaError, VideoReader, WorkingSize};
use crate::pipeline::segments::Segment;
use crate::pipeline::stages::{FirstError, Item};

/// A decoded frame and the seconds it took.
pub(super) struct Decoded {
    pub frame: Frame,
    pub seconds: f64,
}

/// A reader of one segment's frames.
pub(super) struct SegmentReader {
    reader: VideoReader,
    segment: Segment,
    /// The last segment reads on to the end of the file (and meets its truncation, if any).
    last: bool,
    /// Frames the reader has yielded.
    position: u64,
}

impl SegmentReader {
    /// A reader at the segment's first frame, whose timestamp is `pts` (seeking there when given).
    pub(super) fn open(
        input: &Path,
        size: WorkingSize,
        segment: &Segment,
        pts: Option<i64>,
        last: bool,
    ) -> Result<Self> {
        let reader = VideoReader::open_at(input, size, segment.frames.start, pts)?;
        Ok(SegmentReader { reader, segment: segment.clone(), last, position: segment.frames.start })
    }

    /// Whether damage met before frame `position` is this segment's to report (each frame position
    /// belongs to one segment, so each report is made once).
    fn owns(&self, position: u64) -> bool {
        position >= self.segment.owned_from && (self.last || position < self.segment.frames.end)
    }

    /// The segment's next frame; `None` once it has them all.
    fn next(&mut self, damaged: &mut Vec<String>) -> Result<Option<Decoded>> {
        loop {
            if !self.last && self.position >= self.segment.frames.end {
                return Ok(None);
            }
            let started = Instant::now();
            match self.reader.next() {
                None => return Ok(None),
                Some(Ok(frame)) => {
                    self.position += 1;
                    return Ok(Some(Decoded { frame, seconds: started.elapsed().as_secs_f64() }));
                }
                Some(Err(report @ MediaError::Damaged { .. })) => {
                    if self.owns(self.position) {
                        damaged.push(report.to_string());
                    }
                }
                Some(Err(error)) => return Err(error.into()),
            }
        }
    }
}

/// Decodes one segment's frames into its channel; damaged data is logged, reported and skipped over.
/// Returns the damage reports, or `None` when a later stage stopped first.
pub(super) fn decode_stage(
    reader: SegmentReader,
    sender: Sender<Item<Decoded>>,
    errors: &FirstError,
) -> Result<Option<Vec<String>>> {
    let mut damaged = Vec::new();
    let mut reader = reader;
    loop {
        if errors.stopped() {
            return Ok(None);
        }
        let Some(decoded) = reader.next(&mut damaged)? else { break };
        if sender.send(Item::Next(decoded)).is_err() {
            return Ok(None);
        }
    }
    Ok(sender.send(Item::End).ok().map(|()| damaged))
}
