//! `impasto serve --config impasto.toml`: runs the rendering node's daemon (see the `service`
//! module). Command-line flags override the file; an invalid configuration exits with the usage
//! code (2) before anything starts, distinct from runtime failures (1).

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use impasto::device::DeviceChoice;
use impasto::service::config::{LogFormat, ServiceConfig};
use impasto::service::{Overrides, ServiceError};

/// Arguments of `impasto serve`.
#[derive(Args, Debug)]
pub struct ServeArgs {
    /// The daemon's configuration file (see config/impasto.toml).
    #[arg(long, short, env = "IMPASTO_CONFIG", default_value = "/etc/impasto/impasto.toml")]
    pub config: PathBuf,
    /// Devices to use, one job slot each (replaces the file's list), e.g. `cuda:0,cuda:1` or `cpu`.
    #[arg(long, value_delimiter = ',')]
    pub devices: Option<Vec<DeviceChoice>>,
    /// This node's name in the job store (default: the host name).
    #[arg(long, env = "IMPASTO_NODE")]
    pub node: Option<String>,
    /// API address, e.g. 127.0.0.1:8700 (port 0: any free port).
    #[arg(long, env = "IMPASTO_BIND")]
    pub bind: Option<String>,
    /// State directory (the SQLite store lives there).
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// Job store URL (sqlite:///path/jobs.db or postgres://user@host/db).
    #[arg(long, env = "IMPASTO_STORE")]
    pub store: Option<String>,
    /// Log format (overrides the file's log.format).
    #[arg(long, env = "IMPASTO_LOG_FORMAT")]
    pub log_format: Option<LogFormat>,
}

/// Reads and checks the configuration with the flags applied.
pub fn load_config(args: &ServeArgs) -> Result<ServiceConfig> {
    let mut config = ServiceConfig::load(&args.config)?;
    let overrides = Overrides {
        devices: args.devices.clone(),
        node: args.node.clone(),
        bind: args.bind.clone(),
        state_dir: args.state_dir.clone(),
        store: args.store.clone(),
    };
    overrides.apply(&mut config).map_err(settings_error)?;
    if let Some(format) = args.log_format {
        config.log.format = format;
    }
    Ok(config)
}

/// Runs the daemon.
pub fn run(config: ServiceConfig) -> Result<()> {
    impasto::service::run(config)
        .map_err(|error| match error {
            ServiceError::Config(_) => settings_error(error),
            ServiceError::Engine(engine) => anyhow::Error::new(engine),
            other => anyhow::Error::new(other),
        })
        .context("impasto serve")
}

/// A configuration problem as the settings error the exit code mapping knows.
fn settings_error(error: ServiceError) -> anyhow::Error {
    anyhow::Error::new(impasto::Error::Settings(error.to_string()))
}
