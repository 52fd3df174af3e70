//! `impasto serve`: the rendering node's daemon. Watch folders feed a durable job store (SQLite, or
//! PostgreSQL shared by several nodes); one worker thread per device slot paints the jobs with the
//! video pipeline, its network loaded once per device; an HTTP API and dashboard show and steer the
//! jobs; systemd hears READY and watchdog pings; SIGTERM lets the frames being painted finish and
//! checkpoint, so the jobs resume on the next start.
//!
//! The path of a dropped video: [`ingest`] (complete? → hash → `incoming/` → job) → [`store`]
//! (queued) → [`worker`] (claim → paint → done/failed/retry) → output folder.

pub mod api;
pub mod config;
pub mod ingest;
pub mod metrics;
pub mod sdnotify;
pub mod store;
pub mod watch;
pub mod worker;

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::device::DeviceChoice;
use crate::model::Vgg;
use crate::style::SharedBatch;
use config::ServiceConfig;
use metrics::Metrics;
use store::Store;
use watch::Watch;
use worker::{Shared, Slot};

/// What the daemon can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// The configuration is invalid.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The job store failed.
    #[error(transparent)]
    Store(#[from] store::StoreError),
    /// A file could not be read, written or moved.
    #[error("{path}: {source}", path = .path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What the system said.
        source: std::io::Error,
    },
    /// The engine failed (loading a network).
    #[error(transparent)]
    Engine(#[from] crate::Error),
    /// Something that should not happen.
    #[error("internal error: {0}")]
    Internal(String),
}

impl ServiceError {
    /// An I/O error about `path`.
    pub fn io(path: impl AsRef<Path>, source: std::io::Error) -> Self {
        ServiceError::Io { path: path.as_ref().to_path_buf(), source }
    }
}

/// Locks `mutex`, also after a thread panicked holding it (the data is counters and progress, still
/// meaningful).
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Wakes idle workers when work may be waiting (they also look every second on their own).
#[derive(Debug, Default)]
pub struct Bell {
    rung: Mutex<bool>,
    condvar: Condvar,
}

impl Bell {
    /// Wakes the waiting workers.
    pub fn ring(&self) {
        *lock(&self.rung) = true;
        self.condvar.notify_all();
    }

    /// Waits for a ring or `timeout`.
    pub fn wait(&self, timeout: Duration) {
        let guard = lock(&self.rung);
        let (mut rung, _) = self
            .condvar
            .wait_timeout_while(guard, timeout, |rung| !*rung)
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *rung = false;
    }
}

/// Settings given on the command line, over the file's.
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    /// Devices (replacing the file's list), one slot each.
    pub devices: Option<Vec<DeviceChoice>>,
    /// Node name.
    pub node: Option<String>,
    /// API address.
    pub bind: Option<String>,
    /// State directory.
    pub state_dir: Option<PathBuf>,
    /// Store URL.
    pub store: Option<String>,
}

impl Overrides {
    /// Applies the overrides to `config`.
    pub fn apply(self, config: &mut ServiceConfig) -> Result<(), ServiceError> {
        if let Some(devices) = self.devices {
            config.devices = devices.into_iter().map(config::DeviceSlots::Name).collect();
        }
        config.node = self.node.or(config.node.take());
        config.api.bind = self.bind.unwrap_or(std::mem::take(&mut config.api.bind));
        config.state_dir = self.state_dir.or(config.state_dir.take());
        if let Some(store) = self.store {
            config::check_store_url(&store).map_err(ServiceError::Config)?;
            config.store = Some(store);
        }
        config.api_addr().map_err(ServiceError::Config)?;
        Ok(())
    }
}

/// Runs the daemon until SIGTERM or SIGINT.
pub fn run(config: ServiceConfig) -> Result<(), ServiceError> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("impasto-rt")
        .enable_all()
        .build()
        .map_err(|e| ServiceError::Internal(format!("cannot start the runtime: {e}")))?;
    runtime.block_on(serve(config))
}

/// The daemon's body: store, watch folders, networks and workers, API, then the scheduling loop.
async fn serve(config: ServiceConfig) -> Result<(), ServiceError> {
    let node = config.node_name();
    let store = Store::connect(&config.store_url()).await?;
    let recovered = store.recover(&node).await?;
    tracing::info!(node, store = %redact(&config.store_url()), recovered, "job store ready");
    let watches = load_watches(&config)?;
    let metrics = Arc::new(Metrics::default());
    let bell = Arc::new(Bell::default());
    let shutdown_flag = Arc::new(AtomicBool::new(false));
    let (slots, runners) = tokio::task::block_in_place(|| {
        let loaded = load_slots(&config, &watches, &metrics);
        // the slots and batch runners paint from here on; this thread's parked OpenMP workers would slow them
        crate::device::threads::release_this_thread();
        loaded
    })?;
    let shared = Arc::new(Shared {
        store: store.clone(),
        node: node.clone(),
        watches: watches.iter().map(|w| (w.config.name.clone(), w.clone())).collect(),
        policy: config.jobs.clone(),
        runtime: tokio::runtime::Handle::current(),
        bell: bell.clone(),
        shutdown: shutdown_flag.clone(),
        metrics: metrics.clone(),
    });
    let workers = slots
        .into_iter()
        .map(|slot| worker::spawn(shared.clone(), slot))
        .collect::<std::io::Result<Vec<_>>>()
        .map_err(|e| ServiceError::Internal(format!("cannot start a worker: {e}")))?;
    let batches: Vec<Arc<SharedBatch>> = runners.iter().map(|runner| runner.batch.clone()).collect();
    let runners = runners
        .into_iter()
        .map(BatchRunner::spawn)
        .collect::<std::io::Result<Vec<_>>>()
        .map_err(|e| ServiceError::Internal(format!("cannot start a device's batch: {e}")))?;
    let stop = CancellationToken::new();
    let state = Arc::new(api::AppState {
        store: store.clone(),
        watches: watches.clone(),
        metrics,
        node,
        token: config.api.token.clone(),
        ready: AtomicBool::new(true),
        bell: bell.clone(),
    });
    let server = start_api(&config, state.clone(), stop.clone()).await?;
    let ingest: Vec<_> = watches
        .iter()
        .map(|watch| {
            tokio::spawn(ingest::watch_folder(
                store.clone(),
                watch.clone(),
                config.ingest.clone(),
                bell.clone(),
                stop.clone(),
            ))
        })
        .collect();
    sdnotify::notify("READY=1\nSTATUS=serving");
    tracing::info!(workers = workers.len(), "impasto serve is ready");
    schedule(&store, &config, &bell).await;
    state.ready.store(false, Ordering::SeqCst);
    sdnotify::notify("STOPPING=1\nSTATUS=finishing the frames being painted");
    tracing::info!("stopping: the frames being painted finish and are checkpointed");
    shutdown_flag.store(true, Ordering::SeqCst);
    bell.ring();
    stop.cancel();
    wait_for_workers(workers, Duration::from_secs_f64(config.jobs.stop_timeout_seconds)).await;
    // the workers' frames are done (or given up on): the shared batches may stop
    batches.iter().for_each(|batch| batch.close());
    wait_for_workers(runners, Duration::from_secs(5)).await;
    for task in ingest {
        let _ = task.await;
    }
    let _ = server.await;
    tracing::info!("stopped");
    Ok(())
}

/// The scheduling loop: pings the watchdog, takes back stale jobs of dead nodes, wakes workers for
/// retries that fell due; returns on SIGTERM or SIGINT.
async fn schedule(store: &Store, config: &ServiceConfig, bell: &Bell) {
    let mut terminate =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
    let mut interrupt =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt()).expect("SIGINT handler");
    let watchdog = sdnotify::watchdog_interval();
    let tick = watchdog.unwrap_or(Duration::from_secs(1)).min(Duration::from_secs(1));
    let mut ticker = tokio::time::interval(tick);
    let stale_ms = (config.jobs.stale_after_seconds * 1000.0) as i64;
    loop {
        tokio::select! {
            _ = terminate.recv() => return,
            _ = interrupt.recv() => return,
            _ = ticker.tick() => {
                if watchdog.is_some() {
                    sdnotify::notify("WATCHDOG=1");
                }
                match store.requeue_stale(store::now_ms() - stale_ms).await {
                    Ok(0) => {}
                    Ok(count) => tracing::warn!(count, "took back jobs of a silent node"),
                    Err(error) => tracing::warn!(%error, "the job store does not answer"),
                }
                bell.ring();
            }
        }
    }
}

/// Waits for the workers to finish their frames, at most `timeout`.
async fn wait_for_workers(workers: Vec<std::thread::JoinHandle<()>>, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    for worker in workers {
        while !worker.is_finished() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if !worker.is_finished() {
            tracing::warn!("a worker did not stop in time; its job resumes from its checkpoints on the next start");
            return;
        }
        let _ = worker.join();
    }
}

/// Binds the API and serves it until `stop`.
async fn start_api(
    config: &ServiceConfig,
    state: Arc<api::AppState>,
    stop: CancellationToken,
) -> Result<tokio::task::JoinHandle<()>, ServiceError> {
    let address = config.api_addr().map_err(ServiceError::Config)?;
    let listener = tokio::net::TcpListener::bind(address)
        .await
        .map_err(|e| ServiceError::Config(format!("api.bind {address}: {e}")))?;
    let bound = listener.local_addr().map_err(|e| ServiceError::Internal(e.to_string()))?;
    eprintln!("impasto serve: listening on http://{bound}");
    tracing::info!(%bound, "API listening");
    let app = api::router(state);
    Ok(tokio::spawn(async move {
        let served = axum::serve(listener, app).with_graceful_shutdown(async move { stop.cancelled().await }).await;
        if let Err(error) = served {
            tracing::error!(%error, "the API server stopped");
        }
    }))
}

/// Loads every watch folder.
fn load_watches(config: &ServiceConfig) -> Result<Vec<Arc<Watch>>, ServiceError> {
    config.watch.iter().map(|w| Watch::load(w.clone()).map(Arc::new)).collect()
}

/// A device's shared batch and its own handles on the device's networks.
struct BatchRunner {
    device: String,
    batch: Arc<SharedBatch>,
    models: HashMap<String, Vgg>,
}

impl BatchRunner {
    /// Starts the thread that paints the batch until it is closed.
    fn spawn(self) -> std::io::Result<std::thread::JoinHandle<()>> {
        let name = format!("impasto-{}-batch", self.device);
        std::thread::Builder::new().name(name).spawn(move || {
            let _span = tracing::info_span!("shared_batch", device = %self.device).entered();
            self.batch.serve(&self.models);
        })
    }
}

/// Loads the networks the watch folders need on every device (once per device), and makes the
/// slots, each with its own handle on them, and the shared batches of the devices whose slots
/// share one.
fn load_slots(
    config: &ServiceConfig,
    watches: &[Arc<Watch>],
    metrics: &Metrics,
) -> Result<(Vec<Slot>, Vec<BatchRunner>), ServiceError> {
    let _no_grad = tch::no_grad_guard();
    let mut slots = Vec::new();
    let mut runners = Vec::new();
    // each job may bring one lane per segment
    let lanes_per_job = watches.iter().map(|w| w.profile.video.segments as usize).max().unwrap_or(1).max(1);
    for entry in &config.devices {
        for device in expand_device(entry.device())? {
            let name = crate::device::device_name(device.resolve()?);
            let mut models: HashMap<String, Vgg> = HashMap::new();
            for watch in watches {
                let key = watch.model_identity.to_string();
                if let Entry::Vacant(slot) = models.entry(key) {
                    let settings =
                        crate::model::ModelSettings { device: device.clone(), ..watch.profile.model.clone() };
                    tracing::info!(device = %name, watch = %watch.config.name, "loading the network");
                    slot.insert(crate::model::load(&settings)?);
                }
            }
            metrics.add_device(&name, entry.slots());
            let share =
                |models: &HashMap<String, Vgg>| models.iter().map(|(k, vgg)| (k.clone(), vgg.share())).collect();
            let on_gpu = name != "cpu";
            let batch = entry.shares_batch(on_gpu).then(|| Arc::new(SharedBatch::new(entry.slots() * lanes_per_job)));
            if let Some(batch) = &batch {
                metrics.add_shared_batch(&name, batch.clone());
                runners.push(BatchRunner { device: name.clone(), batch: batch.clone(), models: share(&models) });
            }
            for index in 0..entry.slots() {
                slots.push(Slot { device: name.clone(), index, models: share(&models), batch: batch.clone() });
            }
        }
    }
    Ok((slots, runners))
}

/// `auto` means every CUDA device, or the CPU when there is none.
fn expand_device(choice: &DeviceChoice) -> Result<Vec<DeviceChoice>, ServiceError> {
    if *choice != DeviceChoice::Auto {
        return Ok(vec![choice.clone()]);
    }
    crate::device::load_cuda_backend();
    let count = tch::Cuda::device_count() as usize;
    Ok(if count == 0 { vec![DeviceChoice::Cpu] } else { (0..count).map(DeviceChoice::Cuda).collect() })
}

/// A store URL without its password.
fn redact(url: &str) -> String {
    match (url.find("://"), url.find('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let credentials = &url[scheme + 3..at];
            match credentials.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_passwords_stay_out_of_the_logs() {
        assert_eq!(redact("postgres://impasto:secret@db:5432/jobs"), "postgres://impasto:***@db:5432/jobs");
        assert_eq!(redact("postgres://impasto@db/jobs"), "postgres://impasto@db/jobs");
        assert_eq!(redact("sqlite:///var/lib/impasto/jobs.db"), "sqlite:///var/lib/impasto/jobs.db");
    }
}
