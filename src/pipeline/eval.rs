//! Measuring the temporal stability of any painted video against its input, whatever made it: the
//! warping error E_warp of Lai et al. (2018). Both videos are decoded at one working size; for every
//! pair of consecutive frames the optical flow and its reliability mask come from the *input*, and the
//! output's frame t is compared with its frame t−1 warped along that flow. Pairs across a scene cut
//! are left out, as a cut has no meaningful flow.

use std::path::{Path, PathBuf};

use image::RgbImage;
use serde::{Deserialize, Serialize};
use tch::{Device, Tensor};

use super::report::WarpingSummary;
use crate::error::{Error, Result};
use crate::flow::{self, FlowSettings};
use crate::imageio;
use crate::media::{Frame, MediaError, VideoReader, WorkingSize, probe};

/// E_warp of one frame pair.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WarpingPair {
    /// The later frame of the pair (the pair is `index − 1`, `index`).
    pub index: u64,
    /// E_warp; absent across a scene cut or where no pixel is reliable.
    pub warping_error: Option<f64>,
    /// Whether the input has a scene cut between the two frames.
    pub scene_cut: bool,
}

/// The evaluation of an output video against its input (`impasto eval`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Evaluation {
    /// The input video.
    pub input: PathBuf,
    /// The painted video.
    pub output: PathBuf,
    /// The size (`width`, `height`) both were compared at.
    pub working_size: (u32, u32),
    /// Frames compared.
    pub frame_count: u64,
    /// E_warp over the video.
    pub warping_error: WarpingSummary,
    /// Every pair.
    pub pairs: Vec<WarpingPair>,
}

/// Frames of one video as tensors, damaged data skipped.
struct TensorFrames {
    reader: VideoReader,
    device: Device,
}

impl TensorFrames {
    /// The next frame, `None` at the end.
    fn next_frame(&mut self) -> Result<Option<Tensor>> {
        loop {
            match self.reader.next() {
                None => return Ok(None),
                Some(Ok(frame)) => return Ok(Some(to_tensor(frame)?.to_device(self.device))),
                Some(Err(MediaError::Damaged { .. })) => continue,
                Some(Err(error)) => return Err(error.into()),
            }
        }
    }
}

/// Compares `output` with `input` at `long_side` (default: the output's stored long side), computing
/// the flow with `settings` on `device`.
pub fn evaluate(
    input: &Path,
    output: &Path,
    long_side: Option<u32>,
    settings: &FlowSettings,
    device: Device,
) -> Result<Evaluation> {
    settings.validate()?;
    probe(input)?;
    let output_info = probe(output)?;
    let side = long_side.unwrap_or_else(|| output_info.coded_width.max(output_info.coded_height));
    let open = |path: &Path| -> Result<TensorFrames> {
        Ok(TensorFrames { reader: VideoReader::open(path, WorkingSize::LongSide(side))?, device })
    };
    let (mut inputs, mut outputs) = (open(input)?, open(output)?);
    let working_size = inputs.reader.frame_size();
    if outputs.reader.frame_size() != working_size {
        return Err(Error::Settings(format!(
            "'{}' and '{}' differ in shape: {:?} against {:?} at long side {side}",
            input.display(),
            output.display(),
            working_size,
            outputs.reader.frame_size()
        )));
    }
    let pairs = compare(&mut inputs, &mut outputs, settings, (input, output))?;
    Ok(Evaluation {
        input: input.to_path_buf(),
        output: output.to_path_buf(),
        working_size,
        frame_count: pairs.len() as u64 + 1,
        warping_error: WarpingSummary::of(pairs.iter().map(|p| p.warping_error)),
        pairs,
    })
}

/// Walks both videos in step and measures every pair.
fn compare(
    inputs: &mut TensorFrames,
    outputs: &mut TensorFrames,
    settings: &FlowSettings,
    paths: (&Path, &Path),
) -> Result<Vec<WarpingPair>> {
    let mismatch = |index: u64| {
        Error::Settings(format!(
            "'{}' and '{}' have different frame counts (one ends at frame {index})",
            paths.0.display(),
            paths.1.display()
        ))
    };
    let mut previous: Option<(Tensor, Tensor)> = None;
    let mut pairs = Vec::new();
    for index in 0u64.. {
        let (input, output) = match (inputs.next_frame()?, outputs.next_frame()?) {
            (Some(input), Some(output)) => (input, output),
            (None, None) => break,
            _ => return Err(mismatch(index)),
        };
        if let Some((previous_input, previous_output)) = &previous {
            pairs.push(measure_pair(index, (previous_input, &input), (previous_output, &output), settings)?);
        }
        previous = Some((input, output));
    }
    Ok(pairs)
}

/// E_warp of output frame `index` against the one before, along the input's flow.
fn measure_pair(
    index: u64,
    (previous_input, input): (&Tensor, &Tensor),
    (previous_output, output): (&Tensor, &Tensor),
    settings: &FlowSettings,
) -> Result<WarpingPair> {
    let pair = flow::flow_pair(previous_input, input, settings)?;
    let reliable = pair.reliability();
    let scene_cut = flow::scene_change(previous_input, input, &reliable, &settings.scene_cut).is_cut;
    let warping_error =
        if scene_cut { None } else { flow::warping_error(output, previous_output, &pair.backward, &reliable) };
    Ok(WarpingPair { index, warping_error, scene_cut })
}

/// A decoded frame as an RGB 0..1 tensor `[1, 3, H, W]` on the CPU.
fn to_tensor(frame: Frame) -> Result<Tensor> {
    let index = frame.index;
    let picture = RgbImage::from_raw(frame.width, frame.height, frame.rgb)
        .ok_or_else(|| Error::Internal(format!("frame {index} has a short pixel buffer")))?;
    Ok(imageio::rgb_to_tensor(&picture))
}
