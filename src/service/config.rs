//! The daemon's configuration (`config/impasto.toml`): watch folders, each with its profile, styles,
//! output and filters; devices and their slots; the job store; the HTTP API; logging; retry and
//! ingest timing. Unknown keys are errors, and [`ServiceConfig::load`] checks everything that can be
//! checked before the daemon starts (folders, style images, profiles, patterns, addresses), so a bad
//! file stops the daemon at once with a message naming the file and the key.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::device::DeviceChoice;
use crate::error::{Error, Result};
use crate::profile::Profile;

/// The whole daemon configuration.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfig {
    /// This node's name in the job store (default: the host name).
    #[serde(default)]
    pub node: Option<String>,
    /// Where the daemon keeps its state (the SQLite store). Default: `$STATE_DIRECTORY` (systemd),
    /// else `$XDG_STATE_HOME/impasto`.
    #[serde(default)]
    pub state_dir: Option<PathBuf>,
    /// Job store URL: `sqlite:///path/jobs.db` or `postgres://user@host/db`. Default: `jobs.db` in
    /// the state directory.
    #[serde(default)]
    pub store: Option<String>,
    /// Devices and how many jobs each runs at once.
    #[serde(default = "default_devices")]
    pub devices: Vec<DeviceSlots>,
    /// The HTTP API and dashboard.
    #[serde(default)]
    pub api: ApiConfig,
    /// Logging.
    #[serde(default)]
    pub log: LogConfig,
    /// Retries and timing of jobs.
    #[serde(default)]
    pub jobs: JobPolicy,
    /// How files are noticed and when they count as complete.
    #[serde(default)]
    pub ingest: IngestConfig,
    /// The watch folders.
    #[serde(default)]
    pub watch: Vec<WatchConfig>,
}

/// A device and its job slots, written `"cuda:0"` or `{ device = "cuda:0", slots = 2 }`.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum DeviceSlots {
    /// A device with one slot.
    Name(DeviceChoice),
    /// A device with several slots.
    Slots {
        /// The device (`auto`, `cpu`, `cuda:N`).
        device: DeviceChoice,
        /// Jobs it runs at once.
        slots: usize,
        /// Whether the slots' frames go through the network in one shared batch; false runs each
        /// job's batch on its own. Default: shared on a GPU, each its own on the CPU (where a
        /// batch of small frames gains little and the jobs' own threads do better; BENCHMARKS.md).
        #[serde(default)]
        shared_batch: Option<bool>,
    },
}

impl DeviceSlots {
    /// The device.
    pub fn device(&self) -> &DeviceChoice {
        match self {
            DeviceSlots::Name(device) | DeviceSlots::Slots { device, .. } => device,
        }
    }

    /// Its slots.
    pub fn slots(&self) -> usize {
        match self {
            DeviceSlots::Name(_) => 1,
            DeviceSlots::Slots { slots, .. } => *slots,
        }
    }

    /// Whether its slots share one batch when it resolves to a GPU (`on_gpu`) or not: only with
    /// several slots; as set, else on a GPU only.
    pub fn shares_batch(&self, on_gpu: bool) -> bool {
        match self {
            DeviceSlots::Name(_) => false,
            DeviceSlots::Slots { slots, shared_batch, .. } => *slots > 1 && shared_batch.unwrap_or(on_gpu),
        }
    }
}

fn default_devices() -> Vec<DeviceSlots> {
    vec![DeviceSlots::Name(DeviceChoice::Auto)]
}

/// The HTTP API.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiConfig {
    /// Address to listen on; port 0 picks a free port (printed at start).
    pub bind: String,
    /// Bearer token required by `/api` and `/metrics` when set.
    pub token: Option<String>,
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig { bind: "127.0.0.1:8700".into(), token: None }
    }
}

/// Log output.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `human` (default) or `json` (one object per line, for journald and log shippers).
    pub format: LogFormat,
    /// Filter, e.g. `info` or `impasto=debug` (the `--log` flag and IMPASTO_LOG win).
    pub level: Option<String>,
}

/// Log line format.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Readable lines.
    #[default]
    Human,
    /// JSON objects.
    Json,
}

/// Retries and job timing.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JobPolicy {
    /// Attempts before a job that keeps failing with transient errors is failed.
    pub max_attempts: u32,
    /// Wait before the first retry; doubled for each later one.
    pub backoff_seconds: f64,
    /// Longest wait between retries.
    pub backoff_max_seconds: f64,
    /// How often a running job's progress and liveness are written to the store.
    pub heartbeat_seconds: f64,
    /// A running job whose node has not written for this long is taken back into the queue.
    pub stale_after_seconds: f64,
    /// On SIGTERM, how long to wait for the frames being painted before exiting anyway (their jobs
    /// then resume from the checkpoints on the next start).
    pub stop_timeout_seconds: f64,
}

impl Default for JobPolicy {
    fn default() -> Self {
        JobPolicy {
            max_attempts: 3,
            backoff_seconds: 30.0,
            backoff_max_seconds: 3600.0,
            heartbeat_seconds: 2.0,
            stale_after_seconds: 120.0,
            stop_timeout_seconds: 240.0,
        }
    }
}

/// Ingest timing.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IngestConfig {
    /// Seconds between full rescans of the watch folders (besides inotify events).
    pub rescan_seconds: f64,
    /// A file whose size and modification time stay unchanged this long is complete.
    pub settle_seconds: f64,
    /// After its writer closed it, a file unchanged this long is complete.
    pub closed_settle_seconds: f64,
}

impl Default for IngestConfig {
    fn default() -> Self {
        IngestConfig { rescan_seconds: 10.0, settle_seconds: 10.0, closed_settle_seconds: 1.0 }
    }
}

/// One watch folder.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WatchConfig {
    /// A short name (shown on the dashboard, stored with the jobs).
    pub name: String,
    /// The folder watched (its files, not its subfolders).
    pub path: PathBuf,
    /// Where painted videos go.
    pub output: PathBuf,
    /// The style image(s).
    pub styles: Vec<PathBuf>,
    /// The settings: a profile name or file (`quick`, `/etc/impasto/hd.toml`), or an inline table
    /// (`[watch.profile.video] size = 512`).
    #[serde(default)]
    pub profile: Option<ProfileRef>,
    /// File name patterns taken (default: common video extensions).
    #[serde(default = "default_include")]
    pub include: Vec<String>,
    /// File name patterns left alone, on top of hidden, temporary and partial-download names.
    #[serde(default)]
    pub ignore: Vec<String>,
    /// Where finished inputs move (default `<path>/done`).
    #[serde(default)]
    pub done: Option<PathBuf>,
    /// Where inputs that failed move, with a `.json` sidecar giving the reason (default `<path>/failed`).
    #[serde(default)]
    pub failed: Option<PathBuf>,
    /// Output container extension.
    #[serde(default = "default_extension")]
    pub extension: String,
}

/// A profile by name or inline.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum ProfileRef {
    /// A profile file or a name in the profile directories.
    Named(String),
    /// The settings themselves.
    Inline(Box<Profile>),
}

fn default_include() -> Vec<String> {
    ["*.mp4", "*.mov", "*.mkv", "*.webm", "*.avi", "*.m4v", "*.mpg", "*.mpeg", "*.ts", "*.mxf"]
        .map(|pattern| pattern.to_string())
        .to_vec()
}

fn default_extension() -> String {
    "mp4".into()
}

impl WatchConfig {
    /// Where finished inputs go.
    pub fn done_dir(&self) -> PathBuf {
        self.done.clone().unwrap_or_else(|| self.path.join("done"))
    }

    /// Where failed inputs go.
    pub fn failed_dir(&self) -> PathBuf {
        self.failed.clone().unwrap_or_else(|| self.path.join("failed"))
    }

    /// The hidden folder where taken inputs wait for their job.
    pub fn incoming_dir(&self) -> PathBuf {
        self.path.join(".impasto").join("incoming")
    }

    /// Where job `id`'s input, dropped as `name`, waits in the incoming folder (`<id>--<name>`).
    pub fn incoming_path(&self, id: &str, name: &str) -> PathBuf {
        self.incoming_dir().join(format!("{id}--{name}"))
    }

    /// The profile the watch folder's jobs use.
    pub fn profile(&self) -> Result<Profile> {
        match &self.profile {
            None => Ok(Profile::default()),
            Some(ProfileRef::Named(name)) => Ok(Profile::load(name)?.0),
            Some(ProfileRef::Inline(profile)) => Ok((**profile).clone()),
        }
    }
}

impl ServiceConfig {
    /// Reads, parses and checks the configuration file.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let mut config: ServiceConfig =
            toml::from_str(&text).map_err(|e| Error::Settings(format!("config '{}': {e}", path.display())))?;
        config.resolve_paths(path.parent().unwrap_or(Path::new(".")));
        config.check().map_err(|problem| Error::Settings(format!("config '{}': {problem}", path.display())))?;
        Ok(config)
    }

    /// Makes relative paths relative to the configuration file's folder.
    fn resolve_paths(&mut self, base: &Path) {
        let absolute = |path: &mut PathBuf| {
            if path.is_relative() {
                *path = base.join(&*path);
            }
        };
        for watch in &mut self.watch {
            absolute(&mut watch.path);
            absolute(&mut watch.output);
            watch.styles.iter_mut().for_each(absolute);
            watch.done.iter_mut().chain(watch.failed.iter_mut()).for_each(absolute);
        }
        self.state_dir.iter_mut().for_each(absolute);
    }

    /// Everything that can be wrong before start, as a message.
    fn check(&self) -> std::result::Result<(), String> {
        if self.watch.is_empty() {
            return Err("no [[watch]] folders".into());
        }
        self.api_addr()?;
        if self.api.token.as_deref().is_some_and(|t| t.trim().is_empty()) {
            return Err("api.token is empty (leave it out for no token)".into());
        }
        if self.devices.is_empty() || self.devices.iter().any(|d| d.slots() == 0 || d.slots() > 64) {
            return Err("devices: at least one device, each with 1..64 slots".into());
        }
        if let Some(store) = &self.store {
            check_store_url(store)?;
        }
        let mut names = std::collections::HashSet::new();
        for watch in &self.watch {
            if !names.insert(&watch.name) {
                return Err(format!("watch '{}': two watch folders have this name", watch.name));
            }
            check_watch(watch).map_err(|problem| format!("watch '{}': {problem}", watch.name))?;
        }
        Ok(())
    }

    /// The API's socket address.
    pub fn api_addr(&self) -> std::result::Result<SocketAddr, String> {
        self.api
            .bind
            .parse()
            .map_err(|_| format!("api.bind '{}': expected an address like 127.0.0.1:8700", self.api.bind))
    }

    /// The state directory.
    pub fn state_dir(&self) -> PathBuf {
        if let Some(dir) = &self.state_dir {
            return dir.clone();
        }
        if let Some(dir) = std::env::var_os("STATE_DIRECTORY").and_then(|d| std::env::split_paths(&d).next()) {
            return dir;
        }
        dirs::state_dir().or_else(dirs::data_local_dir).unwrap_or_else(std::env::temp_dir).join("impasto")
    }

    /// The job store's URL.
    pub fn store_url(&self) -> String {
        self.store.clone().unwrap_or_else(|| format!("sqlite://{}", self.state_dir().join("jobs.db").display()))
    }

    /// This node's name.
    pub fn node_name(&self) -> String {
        self.node.clone().unwrap_or_else(host_name)
    }
}

/// The machine's host name.
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| name.trim().to_string())
        .ok()
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// Checks a store URL's scheme.
pub fn check_store_url(url: &str) -> std::result::Result<(), String> {
    let known = ["sqlite:", "postgres://", "postgresql://"];
    if known.iter().any(|scheme| url.starts_with(scheme)) {
        return Ok(());
    }
    Err(format!("store '{url}': expected sqlite:///path/jobs.db or postgres://user@host/database"))
}

/// Checks one watch folder: its folder, styles, profile and patterns.
fn check_watch(watch: &WatchConfig) -> std::result::Result<(), String> {
    if watch.name.is_empty() || !watch.name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) {
        return Err("name: letters, digits, '-', '_' and '.' only".into());
    }
    if !watch.path.is_dir() {
        return Err(format!("path '{}' is not a folder", watch.path.display()));
    }
    if watch.styles.is_empty() {
        return Err("styles: at least one style image".into());
    }
    for style in &watch.styles {
        // the header only: the watch folder decodes its styles once, when it is loaded
        crate::imageio::check_image(style).map_err(|e| format!("styles: {e}"))?;
    }
    let profile = watch.profile().map_err(|e| format!("profile: {e}"))?;
    profile.style.validate().map_err(|e| format!("profile: {e}"))?;
    profile.video.validate().map_err(|e| format!("profile: {e}"))?;
    super::ingest::Filter::new(&watch.include, &watch.ignore).map_err(|e| e.to_string())?;
    if watch.extension.is_empty() || !watch.extension.chars().all(|c| c.is_ascii_alphanumeric()) {
        return Err(format!("extension '{}': letters and digits only, e.g. mp4", watch.extension));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_documented_example_parses_with_every_key_known() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/impasto.toml");
        let config: ServiceConfig = toml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        assert_eq!(config.watch.len(), 1);
        assert_eq!(config.api.bind, ApiConfig::default().bind);
        assert_eq!(config.jobs.max_attempts, JobPolicy::default().max_attempts);
        assert_eq!(config.ingest.settle_seconds, IngestConfig::default().settle_seconds);
    }

    #[test]
    fn devices_take_names_or_slot_tables() {
        let config: ServiceConfig =
            toml::from_str("devices = [\"cuda:1\", { device = \"cpu\", slots = 3 }]\n").unwrap();
        let slots: Vec<(String, usize)> = config.devices.iter().map(|d| (d.device().to_string(), d.slots())).collect();
        assert_eq!(slots, [("cuda:1".to_string(), 1), ("cpu".to_string(), 3)]);
        let sharing = |on_gpu: bool| config.devices.iter().map(|d| d.shares_batch(on_gpu)).collect::<Vec<_>>();
        assert_eq!((sharing(true), sharing(false)), (vec![false, true], vec![false, false]));
        let set = |value: bool| {
            let text = format!("devices = [{{ device = \"cpu\", slots = 2, shared_batch = {value} }}]\n");
            let config: ServiceConfig = toml::from_str(&text).unwrap();
            (config.devices[0].shares_batch(true), config.devices[0].shares_batch(false))
        };
        assert_eq!((set(true), set(false)), ((true, true), (false, false)));
    }

    #[test]
    fn store_urls_are_checked() {
        assert!(check_store_url("sqlite:///var/lib/impasto/jobs.db").is_ok());
        assert!(check_store_url("postgres://impasto@db/impasto").is_ok());
        assert!(check_store_url("mysql://x").unwrap_err().contains("mysql://x"));
    }
}
