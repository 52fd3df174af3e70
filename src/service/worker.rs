//! Workers: one named thread per device slot, owning its handle on the device's network (loaded
//! once per device and shared by its slots without a copy). Where the device's slots share a batch,
//! a worker's frames are optimised there, in one forward pass with the other slots' frames, while
//! the worker decodes, plans and encodes its own job. A worker claims the oldest due job from
//! the store, paints it with the video pipeline, and settles it: done (input to the done folder),
//! failed for good (bad input: to the failed folder with a JSON sidecar), queued again with
//! exponential back-off (transient errors), cancelled, or — on shutdown — queued again after the
//! current frame, to resume from its checkpoints. A heartbeat task writes the job's progress and
//! thumbnail to the store and brings back cancel requests. The tokio runtime never runs this work.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use image::RgbImage;

use super::config::JobPolicy;
use super::ingest::{set_aside, write_sidecar};
use super::metrics::Metrics;
use super::store::{Finished, Job, Progress, Store, now_ms};
use super::watch::Watch;
use super::{Bell, ServiceError, lock};
use crate::error::Error;
use crate::model::Vgg;
use crate::pipeline::{JobEvent, Report, VideoJob};
use crate::style::SharedBatch;

/// What every worker shares.
pub struct Shared {
    /// The job store.
    pub store: Store,
    /// This node's name.
    pub node: String,
    /// Watch folders by name.
    pub watches: HashMap<String, Arc<Watch>>,
    /// Retry and heartbeat timing.
    pub policy: JobPolicy,
    /// The runtime the store's futures run on.
    pub runtime: tokio::runtime::Handle,
    /// Rung when work may be waiting.
    pub bell: Arc<Bell>,
    /// Raised on SIGTERM: finish the current frame and stop.
    pub shutdown: Arc<AtomicBool>,
    /// This node's counters.
    pub metrics: Arc<Metrics>,
}

/// One slot of a device, with its networks by model identity.
pub struct Slot {
    /// The device's name (`cpu`, `cuda:0`).
    pub device: String,
    /// The slot's number on the device.
    pub index: usize,
    /// Networks on the device, by the model identity of the watch folders that use them.
    pub models: HashMap<String, Vgg>,
    /// The device's shared batch, when its slots paint their frames in one.
    pub batch: Option<Arc<SharedBatch>>,
}

/// Starts a worker thread.
pub fn spawn(shared: Arc<Shared>, slot: Slot) -> std::io::Result<std::thread::JoinHandle<()>> {
    let name = format!("impasto-{}-{}", slot.device, slot.index);
    std::thread::Builder::new().name(name).spawn(move || run(&shared, slot))
}

/// Claims and paints jobs until shutdown.
fn run(shared: &Shared, mut slot: Slot) {
    while !shared.shutdown.load(Ordering::SeqCst) {
        match shared.runtime.block_on(shared.store.claim(&shared.node, &slot.device)) {
            Ok(Some(job)) => {
                shared.metrics.set_busy(&slot.device, slot.index, true);
                run_job(shared, &mut slot, job);
                shared.metrics.set_busy(&slot.device, slot.index, false);
            }
            Ok(None) => shared.bell.wait(Duration::from_secs(1)),
            Err(error) => {
                tracing::warn!(%error, "cannot claim a job");
                shared.bell.wait(Duration::from_secs(2));
            }
        }
    }
}

/// What a running job shares with its heartbeat.
#[derive(Default)]
struct Live {
    progress: Mutex<Progress>,
    thumbnail: Mutex<Option<(i64, Vec<u8>)>>,
    stop: Mutex<Option<Arc<AtomicBool>>>,
    cancelled: AtomicBool,
    lost: AtomicBool,
    finished: AtomicBool,
}

impl Live {
    fn progress(&self) -> Progress {
        *lock(&self.progress)
    }

    fn raise_stop(&self) {
        if let Some(stop) = lock(&self.stop).as_ref() {
            stop.store(true, Ordering::SeqCst);
        }
    }
}

/// Paints one claimed job and settles it in the store.
fn run_job(shared: &Shared, slot: &mut Slot, job: Job) {
    let span = tracing::info_span!("job", id = %job.id, name = %job.name, device = %slot.device);
    let _entered = span.enter();
    tracing::info!(attempt = job.attempts, "painting");
    let live = Arc::new(Live::default());
    let heartbeat = shared.runtime.spawn(heartbeat(
        shared.store.clone(),
        job.id.clone(),
        shared.node.clone(),
        live.clone(),
        shared.policy.heartbeat_seconds,
        shared.shutdown.clone(),
    ));
    let result = match shared.watches.get(&job.watch) {
        Some(watch) => paint(shared, slot, watch, &job, &live),
        None => Err(Error::Settings(format!("watch folder '{}' is no longer configured", job.watch))),
    };
    live.finished.store(true, Ordering::SeqCst);
    let _ = shared.runtime.block_on(heartbeat);
    if let Err(error) = shared.runtime.block_on(settle(shared, &job, &live, result)) {
        tracing::error!(%error, "could not record the job's outcome; it will be taken back when stale");
    }
    crate::device::heap::give_back_freed_memory();
    // while the slot waits for its next job, its parked OpenMP workers would slow the other slots' painting
    crate::device::threads::release_this_thread();
}

/// Prepares and runs the video job with the slot's network.
fn paint(shared: &Shared, slot: &mut Slot, watch: &Watch, job: &Job, live: &Arc<Live>) -> crate::Result<Report> {
    let video_job = VideoJob {
        input: job.input_path.clone(),
        output: job.output.clone(),
        styles: watch.styles.clone(),
        style: watch.profile.style.clone(),
        video: watch.profile.video.clone(),
        model_identity: watch.model_identity.clone(),
        measure_warping: false,
    };
    let prepared = video_job.prepare()?;
    lock(&live.progress).frames_total = prepared.frame_count() as i64;
    *lock(&live.stop) = Some(prepared.stop_flag());
    if shared.shutdown.load(Ordering::SeqCst) {
        live.raise_stop();
    }
    let vgg = slot.models.get(&watch.model_identity.to_string()).ok_or_else(|| {
        Error::Internal(format!("no network loaded on {} for watch '{}'", slot.device, watch.config.name))
    })?;
    let mut observer =
        FrameObserver { live, metrics: &shared.metrics, painted_seconds: 0.0, painted: 0, last_thumbnail: None };
    let mut see = |event: JobEvent<'_>| observer.see(event);
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match &slot.batch {
        Some(batch) => prepared.run_shared(vgg, batch, &mut see),
        None => prepared.run(vgg, &mut see),
    }))
    .unwrap_or_else(|payload| Err(crate::error::panic_error("paint", payload.as_ref())))
}

/// Turns pipeline events into progress, metrics and thumbnails.
struct FrameObserver<'a> {
    live: &'a Live,
    metrics: &'a Metrics,
    painted_seconds: f64,
    painted: u64,
    last_thumbnail: Option<Instant>,
}

impl FrameObserver<'_> {
    fn see(&mut self, event: JobEvent<'_>) {
        let JobEvent::Frame { record, picture, done, total } = event else { return };
        if !record.resumed {
            let seconds = record.seconds.total();
            self.painted_seconds += seconds;
            self.painted += 1;
            self.metrics.frame_painted(seconds);
        }
        {
            let mut progress = lock(&self.live.progress);
            progress.frames_done = done as i64;
            progress.frames_total = total as i64;
            progress.seconds_per_frame = (self.painted > 0).then(|| self.painted_seconds / self.painted as f64);
        }
        let last = done == total;
        if last || self.last_thumbnail.is_none_or(|t| t.elapsed() >= Duration::from_millis(500)) {
            if let Some(jpeg) = thumbnail_jpeg(picture) {
                *lock(&self.live.thumbnail) = Some((done as i64, jpeg));
            }
            self.last_thumbnail = Some(Instant::now());
        }
    }
}

/// A small JPEG of a painted frame (320 pixels wide at most).
fn thumbnail_jpeg(picture: &RgbImage) -> Option<Vec<u8>> {
    let width = picture.width().min(320);
    let height = (picture.height() as u64 * width as u64 / picture.width().max(1) as u64).max(1) as u32;
    let small = image::imageops::resize(picture, width, height, image::imageops::FilterType::Triangle);
    let mut bytes = Vec::new();
    let encoder = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut bytes, 80);
    small.write_with_encoder(encoder).ok()?;
    Some(bytes)
}

/// Writes the job's progress and thumbnail every `seconds` until it finishes; raises the job's
/// stop flag on a cancel request, on shutdown, or when the store says the job is no longer ours.
async fn heartbeat(store: Store, id: String, node: String, live: Arc<Live>, seconds: f64, shutdown: Arc<AtomicBool>) {
    let mut written_version = None;
    let period = Duration::from_secs_f64(seconds.max(0.05));
    let mut next = Instant::now();
    while !live.finished.load(Ordering::SeqCst) {
        if shutdown.load(Ordering::SeqCst) {
            live.raise_stop();
        }
        if Instant::now() >= next {
            next = Instant::now() + period;
            beat(&store, &id, &node, &live, &mut written_version).await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    beat(&store, &id, &node, &live, &mut written_version).await;
}

/// One heartbeat write.
async fn beat(store: &Store, id: &str, node: &str, live: &Live, written_version: &mut Option<i64>) {
    match store.heartbeat(id, node, live.progress()).await {
        Ok(Some(true)) => {
            live.cancelled.store(true, Ordering::SeqCst);
            live.raise_stop();
        }
        Ok(Some(false)) => {}
        Ok(None) if !live.finished.load(Ordering::SeqCst) => {
            tracing::warn!("the job is no longer this node's (taken back as stale?); stopping it");
            live.lost.store(true, Ordering::SeqCst);
            live.raise_stop();
        }
        Ok(None) => {}
        Err(error) => tracing::warn!(%error, "heartbeat failed"),
    }
    let thumbnail = lock(&live.thumbnail).clone();
    if let Some((version, jpeg)) = thumbnail.filter(|(version, _)| Some(*version) != *written_version)
        && store.set_thumbnail(id, &jpeg, version).await.is_ok()
    {
        *written_version = Some(version);
    }
}

/// Records how the attempt ended and moves the input where it belongs.
async fn settle(shared: &Shared, job: &Job, live: &Live, result: crate::Result<Report>) -> Result<(), ServiceError> {
    let store = &shared.store;
    let watch = shared.watches.get(&job.watch);
    match result {
        Ok(report) => {
            let done_dir = watch.map(|w| w.config.done_dir());
            let input = match done_dir {
                Some(dir) => set_aside(&job.input_path, &dir)?.unwrap_or_else(|| job.input_path.clone()),
                None => job.input_path.clone(),
            };
            let mut progress = live.progress();
            progress.frames_done = report.frame_count as i64;
            let summary = report_summary(&report, &input);
            let finished = Finished { resumed_frames: report.resumed_frames as i64, progress, report: &summary };
            store.finish(&job.id, &input, finished).await?;
            shared.metrics.job_finished("done");
            tracing::info!(frames = report.frame_count, resumed = report.resumed_frames, output = %job.output.display(), "done");
        }
        Err(Error::Stopped { frames_done }) if live.cancelled.load(Ordering::SeqCst) => {
            store.mark_cancelled(&job.id).await?;
            shared.metrics.job_finished("cancelled");
            tracing::info!(frames_done, "cancelled");
        }
        Err(Error::Stopped { .. }) if live.lost.load(Ordering::SeqCst) => {}
        Err(Error::Stopped { frames_done }) => {
            store.requeue_interrupted(&job.id).await?;
            shared.metrics.job_finished("interrupted");
            tracing::info!(frames_done, "stopped for shutdown; queued again to resume");
        }
        Err(error) if is_permanent(&error) || job.attempts >= i64::from(shared.policy.max_attempts) => {
            let reason = user_facing(&error, job);
            let reason =
                if is_permanent(&error) { reason } else { format!("after {} attempts: {reason}", job.attempts) };
            fail(shared, job, &reason).await?;
        }
        Err(error) => {
            let delay = backoff_seconds(&shared.policy, job.attempts);
            let due = now_ms() + (delay * 1000.0) as i64;
            store.retry_later(&job.id, &user_facing(&error, job), due).await?;
            shared.metrics.job_finished("retry");
            tracing::warn!(%error, retry_in_s = delay, "failed; will retry");
        }
    }
    Ok(())
}

/// A job's report as stored: the video job's report as JSON, without the per-frame records (a
/// long video's would be megabytes), naming the input where it now lies.
fn report_summary(report: &Report, input: &std::path::Path) -> String {
    let mut value = serde_json::to_value(report).unwrap_or_default();
    if let Some(fields) = value.as_object_mut() {
        fields.remove("frames");
        fields.insert("input".into(), serde_json::Value::String(input.display().to_string()));
    }
    value.to_string()
}

/// The error as the user should read it: naming the file they dropped, not its place in the
/// daemon's incoming folder.
fn user_facing(error: &Error, job: &Job) -> String {
    error.to_string().replace(&job.input_path.display().to_string(), &job.name)
}

/// Fails a job for good: the input goes to the failed folder with a sidecar giving the reason.
async fn fail(shared: &Shared, job: &Job, reason: &str) -> Result<(), ServiceError> {
    let mut input = job.input_path.clone();
    if let Some(watch) = shared.watches.get(&job.watch)
        && let Some(moved) = set_aside(&job.input_path, &watch.config.failed_dir())?
    {
        let sidecar = serde_json::json!({
            "job": job.id, "name": job.name, "watch": job.watch, "error": reason,
            "attempts": job.attempts, "failed_ms": now_ms(), "node": shared.node,
        });
        write_sidecar(&moved, &sidecar)?;
        input = moved;
    }
    shared.store.fail(&job.id, reason, &input).await?;
    shared.metrics.job_finished("failed");
    tracing::warn!(error = reason, "failed");
    Ok(())
}

/// Seconds before retry number `attempts`: the base doubled per earlier attempt, capped.
pub fn backoff_seconds(policy: &JobPolicy, attempts: i64) -> f64 {
    let doublings = (attempts - 1).clamp(0, 30) as i32;
    (policy.backoff_seconds * 2f64.powi(doublings)).min(policy.backoff_max_seconds)
}

/// Whether an error is the input's or the settings' fault (no retry helps), not the machine's.
pub fn is_permanent(error: &Error) -> bool {
    match error {
        Error::Settings(_) | Error::Image { .. } => true,
        Error::Media(media) => media.is_bad_input() || media.is_bad_settings(),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_back_off_exponentially_up_to_the_cap() {
        let policy = JobPolicy { backoff_seconds: 10.0, backoff_max_seconds: 100.0, ..JobPolicy::default() };
        let waits: Vec<f64> = (1..=6).map(|attempt| backoff_seconds(&policy, attempt)).collect();
        assert_eq!(waits, [10.0, 20.0, 40.0, 80.0, 100.0, 100.0]);
    }

    #[test]
    fn bad_input_is_permanent_and_machine_trouble_is_not() {
        let not_video = crate::media::MediaError::NotMedia { path: "x.mp4".into() };
        assert!(is_permanent(&Error::Media(not_video)));
        assert!(is_permanent(&Error::Settings("video.size".into())));
        assert!(!is_permanent(&Error::OutOfMemory { device: "cuda:0".into(), detail: "oom".into() }));
        assert!(!is_permanent(&Error::Torch("cuDNN error".into())));
    }
}
