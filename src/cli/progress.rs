//! Progress reporting for long runs: an indicatif bar on a terminal (iteration, losses, it/s, ETA)
//! or one JSON object per line with `--json`, for scripts and the daemon.

use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

/// Reports iterations of a run.
pub struct Reporter {
    bar: Option<ProgressBar>,
    json: bool,
    started: Instant,
}

impl Reporter {
    /// A bar of `total` steps, or JSON lines when `json`.
    pub fn new(total: u64, json: bool, unit: &str) -> Self {
        let bar = (!json).then(|| {
            let bar = ProgressBar::new(total);
            let template = format!("{{bar:30}} {{pos}}/{{len}} {unit} {{per_sec}} ETA {{eta}} {{msg}}");
            bar.set_style(ProgressStyle::with_template(&template).expect("valid template"));
            bar
        });
        Reporter { bar, json, started: Instant::now() }
    }

    /// Step `done` of `total` with a message and extra JSON fields.
    pub fn step(&self, done: u64, total: u64, message: &str, fields: serde_json::Value) {
        if let Some(bar) = &self.bar {
            bar.set_position(done);
            bar.set_message(message.to_string());
        }
        if self.json {
            let elapsed = self.started.elapsed().as_secs_f64();
            let rate = done as f64 / elapsed.max(1e-9);
            let eta = (total.saturating_sub(done)) as f64 / rate.max(1e-9);
            let mut line = json!({"event": "progress", "step": done, "total": total, "elapsed_s": elapsed,
                                  "per_s": rate, "eta_s": eta});
            if let (Some(object), Some(extra)) = (line.as_object_mut(), fields.as_object()) {
                object.extend(extra.clone());
            }
            println!("{line}");
        }
    }

    /// Ends the bar; with JSON, prints a final event.
    pub fn finish(&self, fields: serde_json::Value) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
        if self.json {
            let mut line = json!({"event": "done", "elapsed_s": self.started.elapsed().as_secs_f64()});
            if let (Some(object), Some(extra)) = (line.as_object_mut(), fields.as_object()) {
                object.extend(extra.clone());
            }
            println!("{line}");
        }
    }
}
