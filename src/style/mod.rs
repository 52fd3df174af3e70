//! Stylization: the paper's losses, the optimisers, colour preservation, settings, the `Stylizer`
//! that runs them, the batch several jobs share on a device, and the quality score that measures
//! the result.

pub mod batch;
pub mod color;
mod curvature;
pub mod loss;
pub mod optim;
pub mod score;
pub mod settings;
pub mod shared;
pub mod stylizer;
pub mod tiles;

pub use batch::{BatchFeed, BatchItem, Optimised, Stopping};
pub use settings::{Init, LayerBalance, ScaleStep, StyleSettings};
pub use shared::{SharedBatch, SharedBatchStats};
pub use stylizer::{Losses, Progress, StyleImage, Stylized, Stylizer, Targets};
