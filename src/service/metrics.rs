//! Metrics in the Prometheus text format (`/metrics`): jobs by state and the queue depth (read from
//! the store at scrape time, so they hold for every node sharing it), and this node's frames
//! rendered, seconds per frame (a histogram), per-device busy time and memory, and what each
//! device's shared batch has done.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::{Arc, Mutex};

use super::lock;
use crate::style::{SharedBatch, SharedBatchStats};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// Upper bounds (seconds) of the seconds-per-frame histogram's buckets.
const FRAME_BUCKETS: [f64; 12] = [0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0];

/// This node's counters.
#[derive(Debug, Default)]
pub struct Metrics {
    frames_rendered: AtomicU64,
    frame_seconds: Mutex<Histogram>,
    devices: Mutex<BTreeMap<String, DeviceUse>>,
    jobs_finished: Mutex<BTreeMap<&'static str, u64>>,
    batches: Mutex<BTreeMap<String, Arc<SharedBatch>>>,
}

/// A histogram with the fixed frame buckets.
#[derive(Debug, Default)]
struct Histogram {
    counts: [u64; FRAME_BUCKETS.len()],
    sum: f64,
    count: u64,
}

/// How a device has been used.
#[derive(Debug, Default)]
struct DeviceUse {
    slots: usize,
    busy_seconds: f64,
    busy_since: BTreeMap<usize, Instant>,
}

/// A device as the dashboard shows it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct DeviceStatus {
    /// `cpu`, `cuda:0`, …
    pub name: String,
    /// Job slots.
    pub slots: usize,
    /// Slots running a job now.
    pub busy: usize,
    /// What the device's shared batch has done, when its slots share one.
    pub shared_batch: Option<SharedBatchStats>,
}

impl Metrics {
    /// Registers a device with its slots.
    pub fn add_device(&self, name: &str, slots: usize) {
        lock(&self.devices).entry(name.to_string()).or_default().slots += slots;
    }

    /// Registers a device's shared batch.
    pub fn add_shared_batch(&self, device: &str, batch: Arc<SharedBatch>) {
        lock(&self.batches).insert(device.to_string(), batch);
    }

    /// A frame was painted in `seconds`.
    pub fn frame_painted(&self, seconds: f64) {
        self.frames_rendered.fetch_add(1, Ordering::Relaxed);
        let mut histogram = lock(&self.frame_seconds);
        for (bound, count) in FRAME_BUCKETS.iter().zip(histogram.counts.iter_mut()) {
            if seconds <= *bound {
                *count += 1;
            }
        }
        histogram.sum += seconds;
        histogram.count += 1;
    }

    /// A job ended with `outcome` (done, failed, retry, cancelled, interrupted).
    pub fn job_finished(&self, outcome: &'static str) {
        *lock(&self.jobs_finished).entry(outcome).or_default() += 1;
    }

    /// Slot `slot` of `device` starts or stops a job.
    pub fn set_busy(&self, device: &str, slot: usize, busy: bool) {
        let mut devices = lock(&self.devices);
        let entry = devices.entry(device.to_string()).or_default();
        if busy {
            entry.busy_since.insert(slot, Instant::now());
        } else if let Some(since) = entry.busy_since.remove(&slot) {
            entry.busy_seconds += since.elapsed().as_secs_f64();
        }
    }

    /// The devices with their slots, busy slots and shared batches.
    pub fn devices(&self) -> Vec<DeviceStatus> {
        let batches = lock(&self.batches);
        lock(&self.devices)
            .iter()
            .map(|(name, use_)| DeviceStatus {
                name: name.clone(),
                slots: use_.slots,
                busy: use_.busy_since.len(),
                shared_batch: batches.get(name).map(|batch| batch.stats()),
            })
            .collect()
    }

    /// The exposition text, with the store's job counts.
    pub fn render(&self, job_counts: &BTreeMap<&'static str, i64>) -> String {
        let mut out = String::new();
        family(&mut out, "impasto_jobs", "gauge", "Jobs in the store by state.");
        for (state, count) in job_counts {
            let _ = writeln!(out, "impasto_jobs{{state=\"{state}\"}} {count}");
        }
        family(&mut out, "impasto_queue_depth", "gauge", "Jobs waiting for a worker.");
        let _ = writeln!(out, "impasto_queue_depth {}", job_counts.get("queued").copied().unwrap_or(0));
        family(&mut out, "impasto_frames_rendered_total", "counter", "Frames painted by this node.");
        let _ = writeln!(out, "impasto_frames_rendered_total {}", self.frames_rendered.load(Ordering::Relaxed));
        self.render_frame_seconds(&mut out);
        self.render_jobs_finished(&mut out);
        self.render_devices(&mut out);
        self.render_shared_batches(&mut out);
        out
    }

    fn render_frame_seconds(&self, out: &mut String) {
        let histogram = lock(&self.frame_seconds);
        family(out, "impasto_frame_seconds", "histogram", "Seconds to paint a frame on this node.");
        for (bound, count) in FRAME_BUCKETS.iter().zip(histogram.counts.iter()) {
            let _ = writeln!(out, "impasto_frame_seconds_bucket{{le=\"{bound}\"}} {count}");
        }
        let _ = writeln!(out, "impasto_frame_seconds_bucket{{le=\"+Inf\"}} {}", histogram.count);
        let _ = writeln!(out, "impasto_frame_seconds_sum {}", histogram.sum);
        let _ = writeln!(out, "impasto_frame_seconds_count {}", histogram.count);
    }

    fn render_jobs_finished(&self, out: &mut String) {
        family(out, "impasto_job_attempts_total", "counter", "Job attempts ended on this node, by outcome.");
        for (outcome, count) in lock(&self.jobs_finished).iter() {
            let _ = writeln!(out, "impasto_job_attempts_total{{outcome=\"{outcome}\"}} {count}");
        }
    }

    fn render_devices(&self, out: &mut String) {
        let devices = lock(&self.devices);
        family(out, "impasto_device_slots", "gauge", "Job slots per device.");
        for (name, use_) in devices.iter() {
            let _ = writeln!(out, "impasto_device_slots{{device=\"{name}\"}} {}", use_.slots);
        }
        family(out, "impasto_device_busy_slots", "gauge", "Slots running a job now.");
        for (name, use_) in devices.iter() {
            let _ = writeln!(out, "impasto_device_busy_slots{{device=\"{name}\"}} {}", use_.busy_since.len());
        }
        family(out, "impasto_device_busy_seconds_total", "counter", "Slot-seconds spent running jobs.");
        for (name, use_) in devices.iter() {
            let running: f64 = use_.busy_since.values().map(|since| since.elapsed().as_secs_f64()).sum();
            let _ =
                writeln!(out, "impasto_device_busy_seconds_total{{device=\"{name}\"}} {}", use_.busy_seconds + running);
        }
        family(out, "impasto_device_memory_bytes", "gauge", "Memory in use: process RSS for cpu, GPU memory for cuda.");
        for name in devices.keys() {
            if let Some(bytes) = device_memory_bytes(name) {
                let _ = writeln!(out, "impasto_device_memory_bytes{{device=\"{name}\"}} {bytes}");
            }
        }
    }
}

/// A metric family of a shared batch's counts: name, type, help, and its value in the counts.
type BatchFamily = (&'static str, &'static str, &'static str, fn(&SharedBatchStats) -> u64);

impl Metrics {
    fn render_shared_batches(&self, out: &mut String) {
        let stats: Vec<(String, SharedBatchStats)> =
            lock(&self.batches).iter().map(|(name, batch)| (name.clone(), batch.stats())).collect();
        let families: [BatchFamily; 4] = [
            ("impasto_shared_batches_total", "counter", "Batches the device's shared batch started.", |s| s.batches),
            ("impasto_shared_batch_items_total", "counter", "Frames painted in the device's shared batch.", |s| {
                s.items
            }),
            (
                "impasto_shared_batch_item_iterations_total",
                "counter",
                "Frame iterations run in the device's shared batch.",
                |s| s.item_iterations,
            ),
            ("impasto_shared_batch_most_items", "gauge", "The most frames the shared batch held at once.", |s| {
                s.most_together
            }),
        ];
        for (name, kind, help, value) in families {
            family(out, name, kind, help);
            for (device, stats) in &stats {
                let _ = writeln!(out, "{name}{{device=\"{device}\"}} {}", value(stats));
            }
        }
    }
}

/// Writes a metric family's HELP and TYPE lines.
fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// Memory in use on a device: the process's resident set for the CPU; for a CUDA device the
/// driver's figure (through `nvidia-smi`), when it can be had.
fn device_memory_bytes(device: &str) -> Option<u64> {
    if device == "cpu" {
        return resident_bytes();
    }
    let index = device.strip_prefix("cuda:")?;
    let output = std::process::Command::new("nvidia-smi")
        .args(["--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", index])
        .output()
        .ok()?;
    let mib: u64 = String::from_utf8_lossy(&output.stdout).trim().parse().ok()?;
    Some(mib * 1024 * 1024)
}

/// The process's resident set size.
fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(pages * page.max(4096) as u64)
}
