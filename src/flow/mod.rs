//! Motion between video frames, so that the stylised video stays steady: dense optical flow (a
//! coarse-to-fine TV-L1 solver written on libtorch tensors), warping, the reliability masks of
//! Ruder, Dosovitskiy and Brox (2016), scene-cut detection, the temporal loss the optimiser adds and
//! the warping error of Lai et al. (2018) for the evaluation report. Everything runs on the device of
//! its inputs; only the scene-cut decision and the warping error read numbers back to the host.
//!
//! # Conventions
//!
//! * Images are RGB 0..1 f32 tensors `[N, 3, H, W]` (grey `[N, 1, H, W]` is accepted by the solver).
//! * A flow is an f32 tensor `[N, 2, H, W]` in pixels, channel 0 the horizontal displacement `dx`
//!   (to the right), channel 1 the vertical one `dy` (down). Pixel `(x, y)` has its centre at
//!   integer coordinates; `(0, 0)` is the top-left pixel's centre.
//! * A flow is *backward* (a "pull" field): it lives on the pixels of the frame it is used for.
//!   [`flow_backward`]`(prev, next)` gives, for every pixel `p` of `next`, the displacement `d` such
//!   that `p + d` is where that point was in `prev`. Hence [`warp`]`(prev_stylised, &flow)` is the
//!   previous output moved into the current frame, ready for [`temporal_loss`].
//! * Masks are f32 tensors `[N, 1, H, W]`, 1 where a pixel is reliable and 0 where it is not.
//!
//! # Per frame
//!
//! ```no_run
//! # use impasto::flow::{self, FlowSettings};
//! # fn step(prev_frame: &tch::Tensor, frame: &tch::Tensor, prev_output: &tch::Tensor, x: &tch::Tensor)
//! # -> impasto::Result<()> {
//! let settings = FlowSettings::default();
//! let pair = flow::flow_pair(prev_frame, frame, &settings)?;
//! let reliable = pair.reliability();
//! let change = flow::scene_change(prev_frame, frame, &reliable, &settings.scene_cut);
//! if !change.is_cut {
//!     let warped = flow::warp(prev_output, &pair.backward).detach();
//!     let temporal = flow::temporal_loss(x, &warped, &reliable); // add, weighted, to the loss
//! #   let _ = temporal;
//! }
//! # Ok(()) }
//! ```
//!
//! # Cost
//!
//! On one core of the development machine a flow field takes about 0.03 s of CPU time at 256×108
//! and 0.12 s at 512×218, about a tenth of one f32 VGG-16 loss-and-gradient evaluation at the same
//! size (`cargo test --release --test flow flow_speed -- --ignored --nocapture`). On the CPU the
//! solver's inner iterations and its median filter run as fused loops over plain arrays; the rest
//! is small tensor operations, so on a busy shared CPU one libtorch thread
//! (`tch::set_num_threads(1)`) is far faster than several.

mod fused;
mod ops;
mod reliability;
mod scene;
mod solver;
mod temporal;
mod warp;

use serde::{Deserialize, Serialize};

pub use reliability::{disocclusions, motion_boundaries, reliability};
pub use scene::{SceneChange, SceneCutSettings, histogram_distance, scene_change};
pub use solver::{FlowPair, flow_backward, flow_pair};
pub use temporal::{item_temporal_losses, temporal_loss, warping_error};
pub use warp::{source_in_frame, warp};

use crate::error::{Error, Result};

/// Parameters of the optical-flow solver and of scene-cut detection (the `[flow]` table of a
/// profile). The solver minimises the TV-L1 energy of Zach, Pock and Bischof (2007),
/// `∫ λ|I₁(x + u) − I₀(x)| + |∇u₁| + |∇u₂|`, on an image pyramid, re-linearising (warping) several
/// times per level and solving each linearised problem with a fixed number of primal–dual
/// iterations (no convergence test, so no host synchronisation).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FlowSettings {
    /// Most pyramid levels, the full-size one included.
    pub levels: usize,
    /// A coarser level is made only while its shorter side stays at least this many pixels.
    pub min_level_size: i64,
    /// Size ratio between a level and the next finer one (0.5 halves the size).
    pub level_scale: f64,
    /// Warps (re-linearisations of the data term around the current flow) per level.
    pub warps: usize,
    /// Primal–dual iterations per warp.
    pub iterations: usize,
    /// Data weight λ: higher follows the images more closely, lower gives smoother flow.
    /// Intensities are on the 0..255 scale of the TV-L1 literature.
    pub data_weight: f64,
    /// Coupling θ between the flow and its auxiliary variable (small: tight coupling).
    pub coupling: f64,
    /// Step τ of the dual (smoothness) update; at most 0.25 for convergence.
    pub dual_step: f64,
    /// Radius of the median filter applied to the flow after every warp (0: none, 1: 3×3, 2: 5×5).
    /// It removes outliers at little cost to accuracy, as in Wedel et al. (2009).
    pub median_radius: i64,
    /// Standard deviation, in pixels, of the Gaussian blur applied to the full-size frames before
    /// the pyramid is built (0: none). A little blur tames noise and compression artefacts.
    pub presmoothing: f64,
    /// Scene-cut detection.
    pub scene_cut: SceneCutSettings,
}

impl Default for FlowSettings {
    fn default() -> Self {
        FlowSettings {
            levels: 10,
            min_level_size: 8,
            level_scale: 0.7,
            warps: 5,
            iterations: 20,
            data_weight: 0.15,
            coupling: 0.3,
            dual_step: 0.25,
            median_radius: 1,
            presmoothing: 0.5,
            scene_cut: SceneCutSettings::default(),
        }
    }
}

impl FlowSettings {
    /// Checks every value is in range; the error names the setting.
    pub fn validate(&self) -> Result<()> {
        let bad = |what: &str| Err(Error::Settings(format!("flow.{what}")));
        if self.levels == 0 {
            return bad("levels must be at least 1");
        }
        if self.min_level_size < 4 {
            return bad("min_level_size must be at least 4 pixels");
        }
        if !(0.25..=0.95).contains(&self.level_scale) {
            return bad("level_scale must be in 0.25..0.95");
        }
        if self.warps == 0 || self.iterations == 0 {
            return bad("warps and iterations must be at least 1");
        }
        if !(self.data_weight > 0.0 && self.coupling > 0.0) {
            return bad("data_weight and coupling must be positive");
        }
        if !(self.dual_step > 0.0 && self.dual_step <= 0.25) {
            return bad("dual_step must be in (0, 0.25]");
        }
        if !(0..=3).contains(&self.median_radius) {
            return bad("median_radius must be 0..3");
        }
        if !(0.0..=3.0).contains(&self.presmoothing) {
            return bad("presmoothing must be 0..3 pixels");
        }
        self.scene_cut.validate()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_round_trip_through_toml() {
        let settings = FlowSettings::default();
        settings.validate().unwrap();
        let text = toml::to_string(&settings).unwrap();
        let back: FlowSettings = toml::from_str(&text).unwrap();
        assert_eq!(back, settings);
    }

    #[test]
    fn unknown_and_out_of_range_settings_are_refused() {
        assert!(toml::from_str::<FlowSettings>("iteratons = 3").is_err());
        let partial: FlowSettings = toml::from_str("warps = 2\n[scene_cut]\nthreshold = 0.5").unwrap();
        assert_eq!(partial.warps, 2);
        assert_eq!(partial.iterations, FlowSettings::default().iterations);
        let err = FlowSettings { dual_step: 0.5, ..FlowSettings::default() }.validate().unwrap_err();
        assert!(err.to_string().contains("dual_step"), "{err}");
    }
}
