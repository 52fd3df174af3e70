//! Profiles: every setting of impasto in one TOML file (`config/*.toml`), layered as built-in
//! defaults < profile < command-line flags. Unknown keys are errors, so a typo never passes silently.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::model::ModelSettings;
use crate::pipeline::VideoSettings;
use crate::style::StyleSettings;

/// Environment variable naming a directory of profiles.
pub const PROFILE_DIR_ENV: &str = "IMPASTO_PROFILE_DIR";

/// A whole profile.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Profile {
    /// The network: weights, convention, pooling, normalisation, device, precision.
    pub model: ModelSettings,
    /// The stylization.
    pub style: StyleSettings,
    /// Video jobs: temporal coherence, per-frame iterations, flow, encoding.
    pub video: VideoSettings,
}

impl Profile {
    /// Parses TOML text; `origin` names it in errors.
    pub fn from_toml(text: &str, origin: &Path) -> Result<Self> {
        toml::from_str(text).map_err(|e| Error::Settings(format!("profile '{}': {e}", origin.display())))
    }

    /// Reads a profile given as a path or as a name looked up in `./config`, `$IMPASTO_PROFILE_DIR`
    /// and the directory of the executable's `config`.
    pub fn load(name_or_path: &str) -> Result<(Self, PathBuf)> {
        let path = find(name_or_path).ok_or_else(|| {
            Error::Settings(format!(
                "profile '{name_or_path}': no such file, and no {name_or_path}.toml in ./config or ${PROFILE_DIR_ENV}"
            ))
        })?;
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        let mut profile = Self::from_toml(&text, &path)?;
        profile.resolve_paths(path.parent().unwrap_or(Path::new(".")));
        Ok((profile, path))
    }

    /// The profile `name_or_path` (see [`Profile::load`]), or the built-in defaults when none is named.
    pub fn named_or_default(name_or_path: Option<&str>) -> Result<Self> {
        name_or_path.map_or_else(|| Ok(Profile::default()), |name| Ok(Profile::load(name)?.0))
    }

    /// Makes relative paths in the profile relative to the profile's directory.
    fn resolve_paths(&mut self, base: &Path) {
        for path in [&mut self.model.path, &mut self.style.init_image].into_iter().flatten() {
            if path.is_relative() && !path.exists() {
                *path = base.join(&*path);
            }
        }
    }
}

fn find(name_or_path: &str) -> Option<PathBuf> {
    let direct = PathBuf::from(name_or_path);
    if direct.is_file() {
        return Some(direct);
    }
    let file = format!("{name_or_path}.toml");
    let mut dirs = vec![PathBuf::from("config")];
    if let Some(dir) = std::env::var_os(PROFILE_DIR_ENV) {
        dirs.insert(0, PathBuf::from(dir));
    }
    if let Some(exe_dir) = std::env::current_exe().ok().and_then(|p| p.parent().map(Path::to_path_buf)) {
        dirs.push(exe_dir.join("config"));
        dirs.push(exe_dir.join("../../config"));
    }
    dirs.into_iter().map(|d| d.join(&file)).find(|p| p.is_file())
}
