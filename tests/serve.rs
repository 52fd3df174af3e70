//! `impasto serve` as a real daemon process: real watch folders on disk, real FFmpeg clips, the real
//! VGG-16, a real SQLite store, real HTTP, signals, systemd's notify socket and the dashboard in
//! headless Chromium. Clips are tiny (32–48 px, a few iterations) so the suite stays quick on a CPU.
#![cfg(feature = "service")]

mod common;

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// Longest wait for the daemon to reach a state before the test fails (a liveness bound, not a
/// speed assertion: these jobs take seconds).
const PATIENCE: Duration = Duration::from_secs(600);

/// A daemon under test.
struct Daemon {
    child: Child,
    url: String,
    token: Option<String>,
    log: PathBuf,
}

impl Daemon {
    /// Starts `impasto serve --config <config>` and waits for its API address.
    fn start(config: &Path, env: &[(&str, &str)]) -> Daemon {
        let log = config.with_extension(format!("log.{}", unique()));
        let token = std::fs::read_to_string(config)
            .unwrap()
            .lines()
            .find_map(|line| line.strip_prefix("token = \"").map(|rest| rest.trim_end_matches('"').to_string()));
        let mut command = Command::new(env!("CARGO_BIN_EXE_impasto"));
        common::in_test_cache(&mut command, &common::cache_dir("serve-cache"), common::F32_IS_FASTER)
            .args(["serve", "--config"])
            .arg(config)
            .env("IMPASTO_LOG", "info,impasto::pipeline=warn")
            .env_remove("NOTIFY_SOCKET")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        for (key, value) in env {
            command.env(key, value);
        }
        let child = command.spawn().expect("impasto serve starts");
        let url = wait_for(&format!("the API address in {}", log.display()), || {
            let text = std::fs::read_to_string(&log).ok()?;
            text.lines().find_map(|l| l.split("listening on ").nth(1).map(|u| u.trim().to_string()))
        });
        Daemon { child, url, token, log }
    }

    /// Sends a request; returns the status and the body as JSON (or as a JSON string).
    fn call(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        self.call_with(method, path, body, self.token.as_deref())
    }

    fn call_with(&self, method: &str, path: &str, body: Option<Value>, token: Option<&str>) -> (u16, Value) {
        let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
        let url = format!("{}{path}", self.url);
        let auth = token.map(|t| format!("Bearer {t}")).unwrap_or_default();
        let response = match (method, body) {
            ("GET", _) => agent.get(&url).header("Authorization", &auth).call(),
            ("DELETE", _) => agent.delete(&url).header("Authorization", &auth).call(),
            (_, body) => agent
                .post(&url)
                .header("Authorization", &auth)
                .header("Content-Type", "application/json")
                .send(body.unwrap_or(json!({})).to_string()),
        };
        let mut response = response.unwrap_or_else(|e| panic!("{method} {url}: {e}"));
        let status = response.status().as_u16();
        let text = response.body_mut().read_to_string().unwrap_or_default();
        (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    fn jobs(&self) -> Value {
        let (status, body) = self.call("GET", "/api/jobs", None);
        assert_eq!(status, 200, "{body}");
        body
    }

    fn job(&self, id: &str) -> Value {
        let (status, body) = self.call("GET", &format!("/api/jobs/{id}"), None);
        assert_eq!(status, 200, "{body}");
        body
    }

    /// Waits until job `id` satisfies `test`; returns it. A job that fails instead fails the test at
    /// once, with the daemon's log.
    fn wait_job(&self, id: &str, what: &str, test: impl Fn(&Value) -> bool) -> Value {
        let started = Instant::now();
        loop {
            let job = self.job(id);
            assert!(job["state"] != "failed", "job {id} failed while waiting for {what}: {job}\n{}", self.log_tail());
            if test(&job) {
                return job;
            }
            assert!(started.elapsed() < PATIENCE, "gave up waiting for job {id}: {what}: {job}\n{}", self.log_tail());
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The last lines of the daemon's log.
    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// Sends a signal.
    fn signal(&self, signal: &str) {
        let status = Command::new("kill").args([&format!("-{signal}"), &self.child.id().to_string()]).status().unwrap();
        assert!(status.success());
    }

    /// Waits for the process to exit; returns its exit code.
    fn wait_exit(&mut self) -> Option<i32> {
        let child = &mut self.child;
        wait_for("the daemon to exit", || child.try_wait().ok().flatten()).code()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn unique() -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!("{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::SeqCst))
}

/// Polls `probe` every 100 ms until it gives a value; panics after [`PATIENCE`].
fn wait_for<T>(what: &str, mut probe: impl FnMut() -> Option<T>) -> T {
    let started = Instant::now();
    loop {
        if let Some(value) = probe() {
            return value;
        }
        assert!(started.elapsed() < PATIENCE, "gave up waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Folders of a test node.
struct Setup {
    _root: tempfile::TempDir,
    root: PathBuf,
    inbox: PathBuf,
    out: PathBuf,
    config: PathBuf,
}

/// Writes a config: one watch folder `inbox` painting into `out` with tiny settings.
fn setup(extra_top: &str, video: &str) -> Setup {
    let temp = tempfile::tempdir().unwrap();
    let root = temp.path().canonicalize().unwrap();
    let (inbox, out) = (root.join("inbox"), root.join("out"));
    std::fs::create_dir_all(&inbox).unwrap();
    let style = Path::new(env!("CARGO_MANIFEST_DIR")).join("samples/images/starry_night.jpg");
    let text = format!(
        r#"{extra_top}
state_dir = "{state}"
devices = [{{ device = "cpu", slots = 2, shared_batch = true }}]
[api]
bind = "127.0.0.1:0"
{token}
[jobs]
heartbeat_seconds = 0.2
backoff_seconds = 1.0
[ingest]
rescan_seconds = 1.0
settle_seconds = 2.5
closed_settle_seconds = 1.0
[[watch]]
name = "inbox"
path = "{inbox}"
output = "{out}"
styles = ["{style}"]
[watch.profile.model]
path = "{weights}"
[watch.profile.video]
{video}
"#,
        state = root.join("state").display(),
        token = if extra_top.contains("#token") { "token = \"s3cret-token\"" } else { "" },
        inbox = inbox.display(),
        out = out.display(),
        style = style.display(),
        weights = common::vgg16_weights().display(),
    );
    let config = root.join("impasto.toml");
    std::fs::write(&config, text).unwrap();
    Setup { _root: temp, root, inbox, out, config }
}

const TINY: &str = "size = 32\nfirst_iterations = 3\niterations = 1";
const SLOWER: &str = "size = 48\nfirst_iterations = 20\niterations = 12\ntolerance = 0.0";

/// Writes a test clip of `frames` frames at 10 fps, tagged so each clip's bytes differ.
fn clip(path: &Path, frames: u32, tag: &str) {
    let duration = format!("{}", frames as f64 / 10.0);
    common::ffmpeg(&[
        "-f",
        "lavfi",
        "-i",
        "testsrc=size=64x36:rate=10",
        "-t",
        &duration,
        "-pix_fmt",
        "yuv420p",
        "-metadata",
        &format!("comment={tag}"),
        path.to_str().unwrap(),
    ]);
}

/// Frames in a video, counted by ffprobe.
fn frame_count(path: &Path) -> u64 {
    let probe = common::ffprobe(path);
    let video =
        probe["streams"].as_array().unwrap().iter().find(|s| s["codec_type"] == "video").expect("a video stream");
    video["nb_read_frames"].as_str().unwrap().parse().unwrap()
}

fn files_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .filter(|e| e.path().is_file())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

fn by_name(jobs: &Value) -> BTreeMap<String, Value> {
    jobs["jobs"].as_array().unwrap().iter().map(|j| (j["name"].as_str().unwrap().to_string(), j.clone())).collect()
}

/// Parses the Prometheus text format: `name{labels} value` → value.
fn parse_metrics(text: &str) -> BTreeMap<String, f64> {
    let mut samples = BTreeMap::new();
    for line in text.lines().filter(|l| !l.starts_with('#') && !l.trim().is_empty()) {
        let (key, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("metric line without a value: {line}"));
        let value: f64 = value.parse().unwrap_or_else(|_| panic!("metric value is not a number: {line}"));
        assert!(key.starts_with("impasto_"), "unexpected metric {key}");
        samples.insert(key.to_string(), value);
    }
    samples
}

/// The dashboard's DOM after its scripts ran, from headless Chromium.
fn dashboard_dom(url: &str) -> String {
    let profile = tempfile::tempdir().unwrap();
    let chromium = ["/usr/bin/chromium", "/usr/bin/chromium-browser"].into_iter().find(|p| Path::new(p).exists());
    let chromium = chromium.expect("Chromium is not installed: run scripts/setup.sh (it installs Debian's chromium)");
    let output = Command::new(chromium)
        .args(["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run"])
        .args(["--disable-background-networking", "--disable-component-update", "--disable-sync"])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(["--virtual-time-budget=5000", "--dump-dom", url])
        .output()
        .expect("chromium runs");
    assert!(output.status.success(), "chromium failed: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8(output.stdout).unwrap()
}

#[test]
fn twenty_clips_a_slow_copy_and_bad_files_each_handled_once() {
    let s = setup("#token", TINY);
    let staging = s.root.join("staging");
    std::fs::create_dir_all(&staging).unwrap();
    for i in 0..20 {
        clip(&staging.join(format!("clip-{i:02}.mp4")), 3 + i % 3, &format!("clip {i}"));
    }
    clip(&staging.join("slow.mp4"), 12, "slow");
    std::fs::write(staging.join("notes.mp4"), "these are notes, not a video\n".repeat(50)).unwrap();
    let whole = std::fs::read(staging.join("clip-00.mp4")).unwrap();
    std::fs::write(staging.join("truncated.mp4"), &whole[..whole.len() * 2 / 5]).unwrap();
    common::ffmpeg(&[
        "-f",
        "lavfi",
        "-i",
        "sine=frequency=440:duration=0.5",
        "-c:a",
        "aac",
        staging.join("audio-only.mp4").to_str().unwrap(),
    ]);

    let mut daemon = Daemon::start(&s.config, &[]);
    // 20 clips and 3 bad files at once (renames are atomic), while one more arrives slowly.
    for name in files_in(&staging).iter().filter(|n| n.as_str() != "slow.mp4") {
        std::fs::rename(staging.join(name), s.inbox.join(name)).unwrap();
    }
    copy_slowly(&daemon, &staging.join("slow.mp4"), &s.inbox.join("slow.mp4"));

    let jobs = wait_for("every job to settle", || {
        let jobs = daemon.jobs();
        let counts = &jobs["counts"];
        (counts["done"] == 21 && counts["failed"] == 3 && counts["queued"] == 0 && counts["running"] == 0)
            .then_some(jobs)
    });
    let named = by_name(&jobs);
    assert_eq!(named.len(), 24, "one job per distinct file: {:?}", named.keys());
    for (name, job) in &named {
        let bad = ["notes.mp4", "truncated.mp4", "audio-only.mp4"].contains(&name.as_str());
        assert_eq!(job["state"], if bad { "failed" } else { "done" }, "{name}: {job}");
        assert_eq!(job["attempts"], 1, "{name} ran once: {job}");
    }
    check_outputs(&s, &named);
    check_failed_folder(&s);

    // The same content again under another name is not painted again.
    std::fs::copy(s.inbox.join("done/clip-00.mp4"), staging.join("again.mp4")).unwrap();
    std::fs::rename(staging.join("again.mp4"), s.inbox.join("again.mp4")).unwrap();
    let sidecar = s.inbox.join("done/again.mp4.json");
    let note: Value = wait_for("the duplicate's sidecar", || {
        std::fs::read_to_string(&sidecar).ok().and_then(|t| serde_json::from_str(&t).ok())
    });
    assert_eq!(note["duplicate_of"], named["clip-00.mp4"]["id"]);
    assert_eq!(daemon.jobs()["jobs"].as_array().unwrap().len(), 24);

    check_metrics(&daemon, &named);
    check_reports(&daemon, &named);
    check_auth_and_paths(&daemon, &s);
    check_dashboard(&daemon, &named);
    let (status, _) = daemon.call("GET", "/healthz", None);
    assert_eq!(status, 200, "still serving after bad files");
    daemon.signal("TERM");
    assert_eq!(daemon.wait_exit(), Some(0));
}

/// Copies `from` to `to` in five chunks a second apart through one open file, checking before the
/// last chunk that the daemon has not taken the growing file.
fn copy_slowly(daemon: &Daemon, from: &Path, to: &Path) {
    let bytes = std::fs::read(from).unwrap();
    let mut file = std::fs::File::create(to).unwrap();
    let chunk = bytes.len().div_ceil(5);
    for (index, part) in bytes.chunks(chunk).enumerate() {
        if index == 4 {
            let jobs = daemon.jobs();
            assert!(!by_name(&jobs).contains_key("slow.mp4"), "a file still being written was taken: {jobs}");
            assert!(to.exists(), "the growing file was moved away");
        }
        file.write_all(part).unwrap();
        file.flush().unwrap();
        std::thread::sleep(Duration::from_millis(1000));
    }
}

/// Every good input has a complete output and sits in done/; nothing half-written is left.
fn check_outputs(s: &Setup, named: &BTreeMap<String, Value>) {
    let outputs = files_in(&s.out);
    assert_eq!(outputs.len(), 21, "one output per good input, no temporary files: {outputs:?}");
    for (name, job) in named.iter().filter(|(_, j)| j["state"] == "done") {
        let output = PathBuf::from(job["output"].as_str().unwrap());
        let input = s.inbox.join("done").join(name);
        assert!(input.is_file(), "{name} moved to done/");
        assert_eq!(frame_count(&output), frame_count(&input), "{name}: every frame painted");
        assert_eq!(job["frames_done"], job["frames_total"]);
        assert!(job["thumbnail_version"].as_i64().is_some(), "{name} has a thumbnail");
    }
    assert!(files_in(&s.inbox).is_empty(), "the inbox is empty: {:?}", files_in(&s.inbox));
}

/// The bad files are in failed/ with a sidecar that names the problem.
fn check_failed_folder(s: &Setup) {
    let failed = s.inbox.join("failed");
    for (name, problem) in [("notes.mp4", "not a video"), ("truncated.mp4", ""), ("audio-only.mp4", "video")] {
        assert!(failed.join(name).is_file(), "{name} in failed/: {:?}", files_in(&failed));
        let sidecar: Value =
            serde_json::from_str(&std::fs::read_to_string(failed.join(format!("{name}.json"))).unwrap()).unwrap();
        let error = sidecar["error"].as_str().unwrap();
        assert!(error.contains(problem) && error.contains(name), "{name}: {error}");
        assert!(!error.contains(".impasto"), "the error names the dropped file, not the daemon's copy: {error}");
        assert_eq!(sidecar["name"], name);
    }
}

/// Every done job's report gives its frames (without the per-frame records); a failed job has none.
fn check_reports(daemon: &Daemon, named: &BTreeMap<String, Value>) {
    for (name, job) in named {
        let (status, report) = daemon.call("GET", &format!("/api/jobs/{}/report", job["id"].as_str().unwrap()), None);
        if job["state"] == "done" {
            assert_eq!(status, 200, "{name}: {report}");
            assert_eq!(report["frame_count"], job["frames_total"], "{name}: {report}");
            assert!(report["seconds_per_frame"]["optimise"].as_f64().unwrap() > 0.0, "{name}: {report}");
            assert!(report.get("frames").is_none(), "{name}: the per-frame records are left out");
            assert_eq!(report["input"], job["input_path"], "{name}: the input where it now lies");
        } else {
            assert_eq!(status, 404, "{name} is {}: {report}", job["state"]);
        }
    }
}

/// `/metrics` parses and agrees with the jobs.
fn check_metrics(daemon: &Daemon, named: &BTreeMap<String, Value>) {
    let (status, body) = daemon.call("GET", "/metrics", None);
    assert_eq!(status, 200);
    let metrics = parse_metrics(body.as_str().unwrap());
    assert_eq!(metrics["impasto_jobs{state=\"done\"}"], 21.0);
    assert_eq!(metrics["impasto_jobs{state=\"failed\"}"], 3.0);
    assert_eq!(metrics["impasto_queue_depth"], 0.0);
    let frames: i64 =
        named.values().filter(|j| j["state"] == "done").map(|j| j["frames_total"].as_i64().unwrap()).sum();
    assert_eq!(metrics["impasto_frames_rendered_total"], frames as f64);
    assert_eq!(metrics["impasto_frame_seconds_count"], frames as f64);
    assert!(metrics["impasto_device_busy_seconds_total{device=\"cpu\"}"] > 0.0);
    assert!(metrics["impasto_device_memory_bytes{device=\"cpu\"}"] > 0.0);
    assert_eq!(metrics["impasto_device_slots{device=\"cpu\"}"], 2.0);
    // the two slots' jobs paint in the device's one batch: every frame went through it, and with 21
    // jobs on two slots it held frames of two jobs at once
    assert_eq!(metrics["impasto_shared_batch_items_total{device=\"cpu\"}"], frames as f64);
    assert!(metrics["impasto_shared_batch_most_items{device=\"cpu\"}"] >= 2.0);
    let device = &daemon.jobs()["devices"][0];
    assert_eq!(device["shared_batch"]["items"], frames, "the job list's devices tell the same: {device}");
}

/// The token is required; submitted paths must be inside a watch folder, however disguised.
fn check_auth_and_paths(daemon: &Daemon, s: &Setup) {
    let (status, _) = daemon.call_with("GET", "/api/jobs", None, None);
    assert_eq!(status, 401);
    let (status, _) = daemon.call_with("GET", "/metrics", None, Some("wrong"));
    assert_eq!(status, 401);
    let outside = s.root.join("outside.mp4");
    clip(&outside, 3, "outside");
    let sub = s.inbox.join("sub");
    std::fs::create_dir_all(&sub).unwrap();
    std::os::unix::fs::symlink(&outside, sub.join("link.mp4")).unwrap();
    std::os::unix::fs::symlink(&s.root, sub.join("up")).unwrap();
    let tricks = [
        format!("{}/../outside.mp4", s.inbox.display()),
        format!("{}/sub/link.mp4", s.inbox.display()),
        format!("{}/sub/up/outside.mp4", s.inbox.display()),
        "/etc/passwd".to_string(),
        "inbox/../outside.mp4".to_string(),
    ];
    for path in tricks {
        let (status, body) = daemon.call("POST", "/api/jobs", Some(json!({ "path": path })));
        assert_eq!(status, 403, "{path} refused: {body}");
    }
    assert!(outside.is_file(), "the outside file was not touched");
}

/// The dashboard, run by Chromium, lists every job with its state, progress and thumbnail.
fn check_dashboard(daemon: &Daemon, named: &BTreeMap<String, Value>) {
    let dom = dashboard_dom(&format!("{}/#token={}", daemon.url, daemon.token.as_deref().unwrap()));
    assert!(dom.contains(r#"id="status""#) && dom.contains(">live<"), "the page is live: {dom}");
    for job in named.values() {
        let row =
            format!(r#"data-job-id="{}" data-state="{}""#, job["id"].as_str().unwrap(), job["state"].as_str().unwrap());
        assert!(dom.contains(&row), "row {row} on the dashboard");
    }
    assert_eq!(dom.matches(r#"class="thumb""#).count(), 21, "a thumbnail per painted video");
    assert!(dom.contains(r#"id="count-done">21<"#), "done count shown");
    assert_eq!(dom.matches(r#"data-action="retry""#).count(), 3, "a retry button per failed job");
    assert!(dom.contains("/2 busy · one batch"), "the device's chip tells of its shared batch");
}

#[test]
fn sigkill_mid_job_then_restart_resumes_from_checkpoints() {
    let s = setup("", SLOWER);
    let notify = NotifyListener::bind(s.root.join("notify.sock"));
    let env = [("NOTIFY_SOCKET", notify.path.to_str().unwrap()), ("WATCHDOG_USEC", "1000000")];
    let daemon = Daemon::start(&s.config, &env);
    notify.wait_for(&["READY=1", "STATUS=serving", "WATCHDOG=1"]);

    clip(&s.root.join("long.mp4"), 16, "long");
    std::fs::rename(s.root.join("long.mp4"), s.inbox.join("long.mp4")).unwrap();
    let id =
        wait_for("the job", || by_name(&daemon.jobs()).get("long.mp4").map(|j| j["id"].as_str().unwrap().to_string()));
    daemon.wait_job(&id, "4 frames painted", |j| j["frames_done"].as_i64() >= Some(4));
    daemon.signal("KILL");
    drop(daemon);

    let mut daemon = Daemon::start(&s.config, &env);
    let job = daemon.wait_job(&id, "done", |j| j["state"] == "done");
    assert_eq!(job["attempts"], 2, "{job}");
    assert!(job["resumed_frames"].as_i64().unwrap() >= 1, "frames taken from the checkpoints: {job}");
    assert_eq!(frame_count(Path::new(job["output"].as_str().unwrap())), 16);
    let leftovers: Vec<_> = std::fs::read_dir(&s.out).unwrap().flatten().map(|e| e.file_name()).collect();
    assert_eq!(leftovers.len(), 1, "only the output, no work directory left: {leftovers:?}");

    daemon.signal("TERM");
    notify.wait_for(&["STOPPING=1"]);
    assert_eq!(daemon.wait_exit(), Some(0));
}

/// Collects the notify datagrams a daemon sends, on a thread of its own.
struct NotifyListener {
    path: PathBuf,
    messages: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl NotifyListener {
    fn bind(path: PathBuf) -> NotifyListener {
        let socket = UnixDatagram::bind(&path).unwrap();
        let messages = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = messages.clone();
        std::thread::spawn(move || {
            let mut buffer = [0u8; 4096];
            while let Ok(length) = socket.recv(&mut buffer) {
                sink.lock().unwrap().extend(String::from_utf8_lossy(&buffer[..length]).lines().map(String::from));
            }
        });
        NotifyListener { path, messages }
    }

    /// Waits until each of `wanted` has arrived since the last call; returns what arrived.
    fn wait_for(&self, wanted: &[&str]) -> Vec<String> {
        wait_for(&format!("{wanted:?} on the notify socket"), || {
            let mut messages = self.messages.lock().unwrap();
            if !wanted.iter().all(|w| messages.iter().any(|m| m == w)) {
                return None;
            }
            Some(std::mem::take(&mut *messages))
        })
    }
}

#[test]
fn cancel_retry_and_a_graceful_stop_through_the_api_and_signals() {
    let s = setup("", SLOWER);
    let mut daemon = Daemon::start(&s.config, &[]);
    let manual = s.inbox.join("manual");
    std::fs::create_dir_all(&manual).unwrap();
    clip(&manual.join("submitted.mp4"), 16, "submitted");
    let (status, job) = daemon.call("POST", "/api/jobs", Some(json!({ "path": manual.join("submitted.mp4") })));
    assert_eq!(status, 201, "{job}");
    let id = job["id"].as_str().unwrap().to_string();
    assert!(!manual.join("submitted.mp4").exists(), "the submitted file was taken");
    let (status, again) = daemon.call("POST", "/api/jobs", Some(json!({ "path": manual.join("submitted.mp4") })));
    assert_eq!(status, 404, "a path that is gone: {again}");

    daemon.wait_job(&id, "2 frames painted", |j| j["frames_done"].as_i64() >= Some(2));
    let (status, cancelling) = daemon.call("DELETE", &format!("/api/jobs/{id}"), None);
    assert_eq!(status, 200, "{cancelling}");
    let cancelled = daemon.wait_job(&id, "cancelled", |j| j["state"] == "cancelled");
    assert!(cancelled["frames_done"].as_i64().unwrap() < 16, "stopped before the end: {cancelled}");
    let (status, conflict) = daemon.call("DELETE", &format!("/api/jobs/{id}"), None);
    assert_eq!(status, 409, "{conflict}");

    let (status, retried) = daemon.call("POST", &format!("/api/jobs/{id}/retry"), None);
    assert_eq!(status, 200, "{retried}");
    let done = daemon.wait_job(&id, "done after the retry", |j| j["state"] == "done");
    assert!(done["resumed_frames"].as_i64().unwrap() >= 1, "the retry resumed the cancelled frames: {done}");
    assert_eq!(frame_count(Path::new(done["output"].as_str().unwrap())), 16);
    let (status, missing) = daemon.call("POST", "/api/jobs/0123456789abcdef/retry", None);
    assert_eq!(status, 404, "{missing}");

    // SIGTERM mid-job: the frame being painted finishes, the job goes back to the queue, and the next
    // start finishes it from the checkpoints.
    clip(&s.root.join("second.mp4"), 16, "second");
    std::fs::rename(s.root.join("second.mp4"), s.inbox.join("second.mp4")).unwrap();
    let second = wait_for("the second job", || {
        by_name(&daemon.jobs()).get("second.mp4").map(|j| j["id"].as_str().unwrap().to_string())
    });
    daemon.wait_job(&second, "2 frames painted", |j| j["frames_done"].as_i64() >= Some(2));
    daemon.signal("TERM");
    assert_eq!(daemon.wait_exit(), Some(0), "a clean stop");
    let log = std::fs::read_to_string(&daemon.log).unwrap();
    assert!(log.contains("queued again to resume"), "{log}");
    drop(daemon);
    let daemon = Daemon::start(&s.config, &[]);
    let finished = daemon.wait_job(&second, "done after the restart", |j| j["state"] == "done");
    assert_eq!(finished["attempts"], 1, "the interrupted attempt does not count: {finished}");
    assert!(finished["resumed_frames"].as_i64().unwrap() >= 1, "{finished}");
}

#[test]
fn an_invalid_config_exits_2_naming_the_file_and_key() {
    let s = setup("", TINY);
    let text = std::fs::read_to_string(&s.config).unwrap().replace("[ingest]", "[ingest]\nsettle_secs = 3");
    std::fs::write(&s.config, text).unwrap();
    let output =
        Command::new(env!("CARGO_BIN_EXE_impasto")).args(["serve", "--config"]).arg(&s.config).output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("impasto.toml") && stderr.contains("settle_secs"), "{stderr}");

    let good = std::fs::read_to_string(&s.config).unwrap().replace("settle_secs = 3\n", "");
    let missing_style = good.replace("starry_night.jpg", "no-such-painting.jpg");
    std::fs::write(&s.config, missing_style).unwrap();
    let output =
        Command::new(env!("CARGO_BIN_EXE_impasto")).args(["serve", "--config"]).arg(&s.config).output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("no-such-painting.jpg"), "{stderr}");
}

#[test]
fn two_nodes_sharing_a_postgres_store_paint_each_video_once() {
    let database = common::postgres::FreshDatabase::create("serve_nodes");
    let s = setup("", TINY);
    let node_a = Daemon::start(&s.config, &[("IMPASTO_STORE", &database.url), ("IMPASTO_NODE", "node-a")]);
    // node b paints each job in its own batch, node a its two slots' frames in one
    let own_batches = s.root.join("own-batches.toml");
    let text = std::fs::read_to_string(&s.config).unwrap();
    std::fs::write(&own_batches, text.replace("shared_batch = true", "shared_batch = false")).unwrap();
    let env_b = [("IMPASTO_STORE", database.url.as_str()), ("IMPASTO_NODE", "node-b"), ("IMPASTO_LOG_FORMAT", "json")];
    let mut node_b = Daemon::start(&own_batches, &env_b);
    let staging = s.root.join("staging");
    std::fs::create_dir_all(&staging).unwrap();
    for i in 0..8 {
        clip(&staging.join(format!("shared-{i}.mp4")), 3, &format!("shared {i}"));
    }
    for name in files_in(&staging) {
        std::fs::rename(staging.join(&name), s.inbox.join(&name)).unwrap();
    }
    let jobs = wait_for("the 8 jobs done", || {
        let jobs = node_a.jobs();
        (jobs["counts"]["done"] == 8).then_some(jobs)
    });
    let named = by_name(&jobs);
    assert_eq!(named.len(), 8, "{:?}", named.keys());
    for (name, job) in &named {
        assert_eq!(job["attempts"], 1, "{name} painted once: {job}");
        assert!(["node-a", "node-b"].contains(&job["node"].as_str().unwrap()), "{job}");
    }
    assert_eq!(files_in(&s.out).len(), 8);
    assert_eq!(node_b.jobs()["counts"]["done"], 8, "both nodes see the one store");
    let shared_items = |daemon: &Daemon| {
        let (_, body) = daemon.call("GET", "/metrics", None);
        parse_metrics(body.as_str().unwrap()).get("impasto_shared_batch_items_total{device=\"cpu\"}").copied()
    };
    let painted_by = |node: &str| named.values().filter(|j| j["node"] == node).count();
    assert_eq!(shared_items(&node_b), None, "node b has no shared batch");
    if painted_by("node-a") > 0 {
        assert!(shared_items(&node_a).unwrap() > 0.0, "node a painted in its shared batch");
    }

    node_b.signal("TERM");
    assert_eq!(node_b.wait_exit(), Some(0));
    let log = std::fs::read_to_string(&node_b.log).unwrap();
    let json_lines: Vec<Value> =
        log.lines().filter(|l| l.starts_with('{')).map(|l| serde_json::from_str(l).unwrap()).collect();
    assert!(json_lines.iter().any(|l| l["fields"]["message"] == "impasto serve is ready"), "JSON logs: {log}");
}

#[test]
fn a_transient_failure_is_retried_after_a_back_off() {
    let s = setup("", TINY);
    let daemon = Daemon::start(&s.config, &[]);
    // The output folder turns into a file: writing fails, which is the machine's trouble, not the input's.
    std::fs::remove_dir_all(&s.out).unwrap();
    std::fs::write(&s.out, "in the way").unwrap();
    clip(&s.root.join("retry.mp4"), 3, "retry");
    std::fs::rename(s.root.join("retry.mp4"), s.inbox.join("retry.mp4")).unwrap();
    let id =
        wait_for("the job", || by_name(&daemon.jobs()).get("retry.mp4").map(|j| j["id"].as_str().unwrap().to_string()));
    let waiting = daemon.wait_job(&id, "a failed first attempt", |j| j["state"] == "queued" && j["attempts"] == 1);
    assert!(waiting["last_error"].as_str().unwrap().contains("out"), "{waiting}");
    assert!(
        waiting["not_before_ms"].as_i64().unwrap() > waiting["started_ms"].as_i64().unwrap(),
        "backed off: {waiting}"
    );
    std::fs::remove_file(&s.out).unwrap();
    std::fs::create_dir(&s.out).unwrap();
    let done = daemon.wait_job(&id, "done on the retry", |j| j["state"] == "done");
    assert_eq!(done["attempts"], 2, "{done}");
    assert_eq!(frame_count(Path::new(done["output"].as_str().unwrap())), 3);
}
