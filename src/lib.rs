//! impasto turns images and videos into paintings with the optimisation method of Gatys, Ecker and
//! Bethge, keeping videos steady from frame to frame. This crate is the engine (model, losses,
//! optimisers), behind the `media` feature the FFmpeg side, and behind `service` the daemon.

pub mod bench;
pub mod device;
pub mod error;
pub mod flow;
pub mod fsutil;
pub mod imageio;
#[cfg(feature = "media")]
pub mod media;
pub mod model;
pub mod pipeline;
pub mod profile;
pub mod seeded;
#[cfg(feature = "service")]
pub mod service;
pub mod style;

pub use error::{Error, Result};
