//! Every knob of a video job (the `[video]` table of a profile): how frames are tied together in time,
//! how long each frame is optimised, the working size, the flow solver and the encoder. Plain data with
//! defaults; `validate` names the setting that is out of range.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::flow::FlowSettings;

/// The encoder settings of the `[video.encode]` table: the media module's own type when FFmpeg is built
/// in.
#[cfg(feature = "media")]
pub use crate::media::EncodeSettings;

/// Without FFmpeg nothing is encoded; the `[video.encode]` table is kept as plain TOML so that the
/// same profiles still load in an engine-only build.
#[cfg(not(feature = "media"))]
pub type EncodeSettings = toml::Table;

/// How a frame is tied to the one before it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TemporalMode {
    /// Ruder et al. (2016): the previous output warped along the optical flow of the input, with
    /// unreliable pixels filled from the content, is the starting point, and a temporal loss keeps the
    /// reliable pixels close to it.
    #[default]
    Flow,
    /// Start from the previous output as it is (no flow, no temporal loss).
    Previous,
    /// Every frame on its own, as a still image (first-frame settings for every frame).
    Independent,
}

impl std::str::FromStr for TemporalMode {
    type Err = Error;
    fn from_str(text: &str) -> Result<Self> {
        match text.trim().to_ascii_lowercase().as_str() {
            "flow" => Ok(TemporalMode::Flow),
            "previous" => Ok(TemporalMode::Previous),
            "independent" => Ok(TemporalMode::Independent),
            _ => Err(Error::Settings(format!("temporal '{text}': expected 'flow', 'previous' or 'independent'"))),
        }
    }
}

impl std::fmt::Display for TemporalMode {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = match self {
            TemporalMode::Flow => "flow",
            TemporalMode::Previous => "previous",
            TemporalMode::Independent => "independent",
        };
        formatter.write_str(name)
    }
}

/// Settings of a video job.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct VideoSettings {
    /// Working long side in pixels (aspect kept, both sides even); 0 keeps the source's stored size.
    pub size: u32,
    /// How frames are tied together in time.
    pub temporal: TemporalMode,
    /// γ of the temporal loss, relative to the loss scale of the shot: the term's weight is
    /// `temporal_weight × (α·L_content + β·L_style of the shot's first frame)`, so a mean squared colour
    /// deviation of 1/`temporal_weight` from the warped previous frame costs as much as that frame's
    /// whole content-and-style loss. Relative, so it keeps its meaning when the engine's loss
    /// normalisation changes.
    pub temporal_weight: f64,
    /// Iterations of the first frame of every shot (and of every frame in `independent` mode).
    pub first_iterations: u32,
    /// Most iterations of the later frames of a shot.
    pub iterations: u32,
    /// Later frames stop early once the relative change of the loss stays below this for `patience`
    /// iterations (0 = run all `iterations`).
    pub tolerance: f64,
    /// Iterations the change must stay below `tolerance`.
    pub patience: u32,
    /// Later frames of a shot begin L-BFGS with the curvature it learnt on the frame before: their
    /// first steps are quasi-Newton steps, not a small steepest-descent one and a memory built
    /// anew. They stop early after 15–30 % fewer iterations, at an equal or lower loss, but the
    /// painting they settle on is more stylised and flickers a little more (E_warp 5–12 % higher,
    /// BENCHMARKS.md); off by default, so every frame starts afresh, as in the reference tools.
    /// L-BFGS only (Adam starts every frame afresh), and video jobs only: a live stream paints each
    /// frame on its own. In a batch shared by several jobs a slot whose frame is done waits for the
    /// next frame of the same run, learning nothing meanwhile, and other slots leave that frame to
    /// it (a batch whose last frame is done waits up to 30 s for it rather than end, less when
    /// anything else is handed in or the job is done), so frames carry it on there too, unless
    /// another job's frame takes the slot first or they come more than 30 s later.
    /// Left out of the settings' JSON when off, so the identities of checkpoints and watch folders
    /// made before it existed still match.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub carry_curvature: bool,
    /// Runs of consecutive frames painted side by side, one frame of each per batch (one forward and
    /// backward pass for all): 1 paints frame after frame; more keeps a GPU busy at small sizes. Each
    /// run is its own chain in time, cross-faded into the run before it over `segment_overlap` frames.
    pub segments: u32,
    /// Frames each run but the first paints before its own, to cross-fade from the run before.
    pub segment_overlap: u32,
    /// Frames in flight in each queue between the decoder, the stylizer and the encoder (the optical
    /// flow is measured one frame ahead of the stylizer, whatever this is).
    pub queue: usize,
    /// libtorch intra-op threads of the flow on the CPU (its many small operations run fastest on
    /// one thread), and of the whole motion stage of a video job; 0 leaves the thread count alone.
    pub flow_threads: usize,
    /// The optical-flow solver and scene-cut detection.
    pub flow: FlowSettings,
    /// How the painted video is encoded.
    pub encode: EncodeSettings,
}

impl Default for VideoSettings {
    fn default() -> Self {
        VideoSettings {
            size: 512,
            temporal: TemporalMode::Flow,
            temporal_weight: 100.0,
            first_iterations: 300,
            iterations: 100,
            tolerance: 1e-3,
            patience: 5,
            carry_curvature: false,
            segments: 1,
            segment_overlap: 16,
            queue: 4,
            flow_threads: 1,
            flow: FlowSettings::default(),
            encode: EncodeSettings::default(),
        }
    }
}

impl VideoSettings {
    /// Checks every value is in range; the error names the setting.
    pub fn validate(&self) -> Result<()> {
        let bad = |problem: &str| Err(Error::Settings(format!("video.{problem}")));
        if self.size != 0 && !(16..=16384).contains(&self.size) {
            return bad("size must be 0 (the source's) or 16..16384 pixels");
        }
        if !(self.temporal_weight.is_finite() && self.temporal_weight >= 0.0) {
            return bad("temporal_weight must be a non-negative number");
        }
        if self.first_iterations == 0 || self.iterations == 0 {
            return bad("first_iterations and iterations must be at least 1");
        }
        if !(self.tolerance.is_finite() && self.tolerance >= 0.0) {
            return bad("tolerance must be a non-negative number");
        }
        if !(1..=64).contains(&self.segments) {
            return bad("segments must be 1..64");
        }
        if self.segment_overlap > 1000 {
            return bad("segment_overlap must be 0..1000 frames");
        }
        if self.queue == 0 {
            return bad("queue must be at least 1 frame");
        }
        self.flow.validate()
    }

    /// Whether the optical flow of the input is needed to make the frames (the `independent` mode
    /// needs it only to measure the warping error).
    pub fn needs_flow(&self) -> bool {
        self.temporal != TemporalMode::Independent
    }

    /// The settings that decide the painted frames' pixels, as JSON: everything but the encoder, the
    /// queue lengths and thread counts (and the segment overlap when there is one segment). Checkpoints
    /// are keyed by it, so re-encoding with another CRF reuses the painted frames.
    pub fn frame_identity(&self) -> serde_json::Value {
        let mut value = serde_json::to_value(self).expect("settings serialise");
        if let Some(object) = value.as_object_mut() {
            for key in ["encode", "queue", "flow_threads"] {
                object.remove(key);
            }
            if self.segments == 1 {
                object.remove("segment_overlap");
            }
        }
        value
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_round_trip_through_toml() {
        let settings = VideoSettings::default();
        settings.validate().unwrap();
        let text = toml::to_string(&settings).unwrap();
        let back: VideoSettings = toml::from_str(&text).unwrap();
        assert_eq!(back, settings);
    }

    #[test]
    fn unknown_keys_and_bad_values_are_refused() {
        assert!(toml::from_str::<VideoSettings>("iteratons = 3").is_err());
        let partial: VideoSettings = toml::from_str("temporal = \"previous\"\n[flow]\nwarps = 2").unwrap();
        assert_eq!(partial.temporal, TemporalMode::Previous);
        assert_eq!(partial.flow.warps, 2);
        let error = VideoSettings { iterations: 0, ..VideoSettings::default() }.validate().unwrap_err();
        assert!(error.to_string().contains("iterations"), "{error}");
        assert!("sideways".parse::<TemporalMode>().is_err());
    }

    #[test]
    fn carrying_curvature_changes_the_frame_identity_and_leaves_it_alone_when_off() {
        let settings = VideoSettings::default();
        let identity = settings.frame_identity();
        assert!(identity.get("carry_curvature").is_none(), "{identity}");
        let carried = VideoSettings { carry_curvature: true, ..settings };
        assert_eq!(carried.frame_identity()["carry_curvature"], true);
        let back: VideoSettings = toml::from_str(&toml::to_string(&carried).unwrap()).unwrap();
        assert_eq!(back, carried);
    }

    #[test]
    fn frame_identity_ignores_the_encoder() {
        let mut settings = VideoSettings::default();
        let before = settings.frame_identity();
        settings.queue = 9;
        settings.flow_threads = 3;
        #[cfg(feature = "media")]
        {
            settings.encode.crf = 30;
        }
        assert_eq!(settings.frame_identity(), before);
        settings.segment_overlap = 2;
        assert_eq!(settings.frame_identity(), before, "no overlap with one segment");
        settings.segments = 2;
        assert_ne!(settings.frame_identity(), before);
        settings.iterations = 7;
        assert_ne!(settings.frame_identity(), before);
    }
}
