//! A watch folder ready for work: its configuration, its profile, its style images (read once), its
//! file-name filter, and the key that identifies its settings — part of every job id, so the same
//! video under other settings is another job.

use sha2::{Digest, Sha256};

use super::ServiceError;
use super::config::WatchConfig;
use super::ingest::Filter;
use crate::profile::Profile;
use crate::style::StyleImage;

/// A configured watch folder, checked and loaded.
pub struct Watch {
    /// As configured.
    pub config: WatchConfig,
    /// The settings of its jobs.
    pub profile: Profile,
    /// Its style images.
    pub styles: Vec<StyleImage>,
    /// Which file names it takes.
    pub filter: Filter,
    /// What identifies its network (weights file and preparation): keys the networks loaded per
    /// device and the jobs' checkpoints.
    pub model_identity: serde_json::Value,
    /// Hash of everything that decides its output.
    pub profile_key: String,
}

impl Watch {
    /// Loads the profile and styles, creates the output, done and failed folders.
    pub fn load(config: WatchConfig) -> Result<Watch, ServiceError> {
        let problem = |text: String| ServiceError::Config(format!("watch '{}': {text}", config.name));
        let profile = config.profile().map_err(|e| problem(e.to_string()))?;
        let styles = config
            .styles
            .iter()
            .map(|path| Ok(StyleImage { image: crate::imageio::read_rgb(path)?, weight: 1.0 }))
            .collect::<crate::Result<Vec<_>>>()
            .map_err(|e| problem(e.to_string()))?;
        let filter = Filter::new(&config.include, &config.ignore)?;
        for dir in [config.output.clone(), config.done_dir(), config.failed_dir(), config.incoming_dir()] {
            std::fs::create_dir_all(&dir).map_err(|e| ServiceError::io(&dir, e))?;
        }
        let model_identity = crate::model::identity(&profile.model).map_err(|e| problem(e.to_string()))?;
        let profile_key = profile_key(&config, &profile, &styles, &model_identity);
        Ok(Watch { config, profile, styles, filter, model_identity, profile_key })
    }
}

/// Hash of the profile, the styles' pixels, the model's identity and the output container.
fn profile_key(config: &WatchConfig, profile: &Profile, styles: &[StyleImage], model: &serde_json::Value) -> String {
    let styles: Vec<String> = styles.iter().map(|s| crate::pipeline::checkpoint::image_digest(&s.image)).collect();
    let identity = serde_json::json!({
        "style": profile.style,
        "video": profile.video,
        "model": model,
        "styles": styles,
        "extension": config.extension,
    });
    hex::encode(Sha256::digest(identity.to_string().as_bytes()))[..16].to_string()
}
