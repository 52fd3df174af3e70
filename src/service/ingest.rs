//! Ingest: notices videos dropped into the watch folders and turns each complete one into a job.
//! inotify events (through `notify`) and a periodic rescan find candidates — files present at start
//! included; a candidate is taken once complete: its writer closed it and it stayed unchanged for
//! a moment, or its size and modification time stayed unchanged for the settle time. Hidden,
//! temporary and partial-download names are never taken. Taking a file hashes it (the job id comes
//! from the content hash and the watch folder's settings, so a file dropped twice is one job) and
//! moves it into the watch folder's hidden `incoming` folder, where it waits for a worker.

use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use globset::{GlobSet, GlobSetBuilder};
use notify::{EventKind, RecursiveMode, Watcher};
use sha2::{Digest, Sha256};

use super::config::IngestConfig;
use super::store::{Job, JobState, NewJob, Store};
use super::watch::Watch;
use super::{Bell, ServiceError};

/// Name endings of files still being written by common tools (browsers, download managers, editors).
const PARTIAL_SUFFIXES: [&str; 10] =
    [".part", ".partial", ".crdownload", ".download", ".tmp", ".temp", ".filepart", ".!qb", ".swp", "~"];

/// Which file names a watch folder takes.
#[derive(Clone, Debug)]
pub struct Filter {
    include: GlobSet,
    ignore: GlobSet,
}

impl Filter {
    /// Builds the filter from glob patterns (case-insensitive, matched against the file name).
    pub fn new(include: &[String], ignore: &[String]) -> Result<Filter, ServiceError> {
        Ok(Filter { include: glob_set(include, "include")?, ignore: glob_set(ignore, "ignore")? })
    }

    /// Whether a file with this name is taken.
    pub fn accepts(&self, name: &str) -> bool {
        let lower = name.to_ascii_lowercase();
        let partial = PARTIAL_SUFFIXES.iter().any(|suffix| lower.ends_with(suffix));
        let hidden = name.starts_with('.') || name.starts_with('~') || name.starts_with('#');
        !hidden && !partial && self.include.is_match(name) && !self.ignore.is_match(name)
    }
}

fn glob_set(patterns: &[String], key: &str) -> Result<GlobSet, ServiceError> {
    let mut builder = GlobSetBuilder::new();
    for pattern in patterns {
        let glob = globset::GlobBuilder::new(pattern)
            .case_insensitive(true)
            .literal_separator(true)
            .build()
            .map_err(|e| ServiceError::Config(format!("{key} pattern '{pattern}': {e}")))?;
        builder.add(glob);
    }
    builder.build().map_err(|e| ServiceError::Config(format!("{key} patterns: {e}")))
}

/// What taking a file led to.
#[derive(Debug)]
pub enum Taken {
    /// A new job.
    New(Job),
    /// A failed or cancelled job with the same content and settings, queued again.
    Retried(Job),
    /// The same content with the same settings is already a job; the file went to the done folder.
    Duplicate(Job),
    /// The file was gone (another node or the API took it first).
    Gone,
}

/// SHA-256 of a file's content, hex.
pub fn hash_file(path: &Path) -> std::io::Result<String> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        let read = file.read(&mut buffer)?;
        if read == 0 {
            return Ok(hex::encode(hasher.finalize()));
        }
        hasher.update(&buffer[..read]);
    }
}

/// The job id of a content hash under a watch folder's settings.
pub fn job_id(content_hash: &str, profile_key: &str) -> String {
    let digest = Sha256::digest(format!("{content_hash}/{profile_key}").as_bytes());
    hex::encode(digest)[..16].to_string()
}

/// Takes the file at `path` (inside `watch`'s folder): hashes it, moves it into the incoming
/// folder and creates its job — or queues a failed job with the same content again, or sets a
/// duplicate aside in the done folder.
pub async fn take(store: &Store, watch: &Watch, path: &Path) -> Result<Taken, ServiceError> {
    let name = file_name(path);
    let hashed = path.to_path_buf();
    let content_hash = tokio::task::spawn_blocking(move || hash_file(&hashed))
        .await
        .map_err(|e| ServiceError::Internal(e.to_string()))?
        .map_err(|e| ServiceError::io(path, e))?;
    let id = job_id(&content_hash, &watch.profile_key);
    if let Some(existing) = store.get(&id).await? {
        return take_again(store, watch, path, existing).await;
    }
    let incoming = watch.config.incoming_path(&id, &name);
    if !move_file(path, &incoming)? {
        return Ok(Taken::Gone);
    }
    let output = output_path(watch, &name, &id);
    let job = NewJob {
        id,
        content_hash,
        profile_key: watch.profile_key.clone(),
        watch: watch.config.name.clone(),
        name,
        input_path: incoming,
        output,
    };
    let (job, inserted) = store.enqueue(&job).await?;
    tracing::info!(job = %job.id, name = %job.name, watch = %job.watch, new = inserted, "took a video");
    Ok(if inserted { Taken::New(job) } else { Taken::Duplicate(job) })
}

/// A file whose job exists: a failed or cancelled job is queued again with it, anything else makes
/// it a duplicate, set aside in the done folder with a sidecar naming the job.
async fn take_again(store: &Store, watch: &Watch, path: &Path, existing: Job) -> Result<Taken, ServiceError> {
    if matches!(existing.state, JobState::Failed | JobState::Cancelled) {
        let incoming = watch.config.incoming_path(&existing.id, &file_name(path));
        if !move_file(path, &incoming)? {
            return Ok(Taken::Gone);
        }
        let job = store.retry(&existing.id, &incoming).await?.unwrap_or(existing);
        tracing::info!(job = %job.id, "the video of a failed job was dropped again; queued it again");
        return Ok(Taken::Retried(job));
    }
    let Some(moved) = set_aside(path, &watch.config.done_dir())? else {
        return Ok(Taken::Gone);
    };
    let sidecar =
        serde_json::json!({ "duplicate_of": existing.id, "state": existing.state, "output": existing.output });
    write_sidecar(&moved, &sidecar)?;
    tracing::info!(job = %existing.id, file = %moved.display(), "a duplicate of an existing job; set aside");
    Ok(Taken::Duplicate(existing))
}

/// Where a job's painted video goes: the input's stem with the watch folder's extension in its
/// output folder, with the job id added when that name is taken.
fn output_path(watch: &Watch, name: &str, id: &str) -> PathBuf {
    let stem = Path::new(name).file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| id.into());
    let extension = &watch.config.extension;
    let plain = watch.config.output.join(format!("{stem}.{extension}"));
    if plain.exists() { watch.config.output.join(format!("{stem}-{}.{extension}", &id[..8])) } else { plain }
}

/// The file name of `path`, as text.
pub fn file_name(path: &Path) -> String {
    path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
}

/// The job id and the name as dropped of a file named by [`WatchConfig::incoming_path`].
///
/// [`WatchConfig::incoming_path`]: super::config::WatchConfig::incoming_path
fn incoming_parts(file_name: &str) -> Option<(&str, &str)> {
    file_name.split_once("--").filter(|(id, _)| id.len() == 16)
}

/// Renames `from` to `to` (creating `to`'s folder); `false` when `from` is gone.
pub fn move_file(from: &Path, to: &Path) -> Result<bool, ServiceError> {
    if let Some(dir) = to.parent() {
        std::fs::create_dir_all(dir).map_err(|e| ServiceError::io(dir, e))?;
    }
    match std::fs::rename(from, to) {
        Ok(()) => Ok(true),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(error) => Err(ServiceError::io(from, error)),
    }
}

/// Moves `path` into `dir` under its own name, or with a number added when that is taken; returns
/// the new path, `None` when the file is gone.
pub fn set_aside(path: &Path, dir: &Path) -> Result<Option<PathBuf>, ServiceError> {
    let name = file_name(path);
    let name = incoming_parts(&name).map(|(_, original)| original.to_string()).unwrap_or(name);
    let mut target = dir.join(&name);
    let mut number = 1;
    while target.exists() {
        let stem = Path::new(&name).file_stem().unwrap_or_default().to_string_lossy().into_owned();
        let extension = Path::new(&name).extension().map(|e| format!(".{}", e.to_string_lossy())).unwrap_or_default();
        target = dir.join(format!("{stem} ({number}){extension}"));
        number += 1;
    }
    Ok(move_file(path, &target)?.then_some(target))
}

/// Writes `<file>.json` beside `file`.
pub fn write_sidecar(file: &Path, value: &serde_json::Value) -> Result<(), ServiceError> {
    let mut path = file.as_os_str().to_owned();
    path.push(".json");
    let path = PathBuf::from(path);
    let text = serde_json::to_string_pretty(value).unwrap_or_default();
    crate::fsutil::write_atomically(&path, |temp| {
        std::fs::write(temp, text.as_bytes()).map_err(|e| crate::Error::io(temp, e))
    })
    .map_err(|e| ServiceError::Internal(e.to_string()))
}

/// A file seen in a watch folder, not yet complete.
#[derive(Debug)]
struct Candidate {
    /// Size and modification time at the last look.
    seen: Option<(u64, SystemTime)>,
    /// When they last changed.
    changed: Instant,
    /// Size and modification time when its writer closed it.
    closed: Option<(u64, SystemTime)>,
}

/// The ingest loop of one watch folder; runs until `shutdown` rings.
pub async fn watch_folder(
    store: Store,
    watch: Arc<Watch>,
    timing: IngestConfig,
    bell: Arc<Bell>,
    shutdown: tokio_util::sync::CancellationToken,
) -> Result<(), ServiceError> {
    let folder = watch.config.path.clone();
    let (sender, mut events) = tokio::sync::mpsc::unbounded_channel();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if let Ok(event) = event {
            let _ = sender.send(event);
        }
    })
    .map_err(|e| ServiceError::Internal(format!("watching '{}': {e}", folder.display())))?;
    watcher
        .watch(&folder, RecursiveMode::NonRecursive)
        .map_err(|e| ServiceError::Internal(format!("watching '{}': {e}", folder.display())))?;
    let mut state = FolderState::default();
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    let mut last_scan: Option<Instant> = None;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            Some(event) = events.recv() => state.note_event(&watch, &event),
            _ = tick.tick() => {
                if last_scan.is_none_or(|t| t.elapsed().as_secs_f64() >= timing.rescan_seconds) {
                    state.rescan(&watch);
                    recover_incoming(&store, &watch).await;
                    last_scan = Some(Instant::now());
                }
                for path in state.complete(&timing) {
                    match take(&store, &watch, &path).await {
                        Ok(Taken::New(_) | Taken::Retried(_)) => bell.ring(),
                        Ok(_) => {}
                        Err(error) => tracing::warn!(file = %path.display(), %error, "could not take a file; will try again"),
                    }
                }
            }
        }
    }
}

/// The candidates of one folder.
#[derive(Default)]
struct FolderState {
    candidates: HashMap<PathBuf, Candidate>,
}

impl FolderState {
    /// Notes an inotify event: a new or changed file becomes a candidate; a close after writing is
    /// remembered with the file's size and time at that moment.
    fn note_event(&mut self, watch: &Watch, event: &notify::Event) {
        for path in &event.paths {
            if path.parent() != Some(watch.config.path.as_path()) || !watch.filter.accepts(&file_name(path)) {
                continue;
            }
            let candidate = self.candidates.entry(path.clone()).or_insert_with(|| Candidate {
                seen: None,
                changed: Instant::now(),
                closed: None,
            });
            if matches!(
                event.kind,
                EventKind::Access(notify::event::AccessKind::Close(notify::event::AccessMode::Write))
            ) {
                candidate.closed = stat(path);
            }
        }
    }

    /// Adds every file of the folder the filter takes.
    fn rescan(&mut self, watch: &Watch) {
        let Ok(entries) = std::fs::read_dir(&watch.config.path) else {
            tracing::warn!(folder = %watch.config.path.display(), "cannot read the watch folder");
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if entry.file_type().is_ok_and(|t| t.is_file()) && watch.filter.accepts(&file_name(&path)) {
                self.candidates.entry(path).or_insert_with(|| Candidate {
                    seen: None,
                    changed: Instant::now(),
                    closed: None,
                });
            }
        }
    }

    /// Looks at every candidate; returns (and forgets) those now complete.
    fn complete(&mut self, timing: &IngestConfig) -> Vec<PathBuf> {
        let mut ready = Vec::new();
        self.candidates.retain(|path, candidate| {
            let Some(now) = stat(path) else { return false };
            if candidate.seen != Some(now) {
                candidate.seen = Some(now);
                candidate.changed = Instant::now();
                return true;
            }
            let quiet = candidate.changed.elapsed().as_secs_f64();
            let closed = candidate.closed == Some(now) && quiet >= timing.closed_settle_seconds;
            if now.0 > 0 && (closed || quiet >= timing.settle_seconds) {
                ready.push(path.clone());
                return false;
            }
            true
        });
        ready
    }
}

/// Size and modification time of a regular file (a symbolic link is never taken).
fn stat(path: &Path) -> Option<(u64, SystemTime)> {
    let meta = std::fs::symlink_metadata(path).ok().filter(|m| m.is_file())?;
    Some((meta.len(), meta.modified().ok()?))
}

/// Files in the incoming folder without a job (the daemon stopped between moving a file there and
/// storing its job) get their job now.
async fn recover_incoming(store: &Store, watch: &Watch) {
    let Ok(entries) = std::fs::read_dir(watch.config.incoming_dir()) else { return };
    let mut seen = HashSet::new();
    for entry in entries.flatten() {
        let path = entry.path();
        let name = file_name(&path);
        let Some((id, original)) = incoming_parts(&name) else { continue };
        if !seen.insert(id.to_string()) || !matches!(store.get(id).await, Ok(None)) {
            continue;
        }
        let Ok(content_hash) = tokio::task::spawn_blocking({
            let path = path.clone();
            move || hash_file(&path)
        })
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string()))) else {
            continue;
        };
        if job_id(&content_hash, &watch.profile_key) != id {
            continue;
        }
        let job = NewJob {
            id: id.to_string(),
            content_hash,
            profile_key: watch.profile_key.clone(),
            watch: watch.config.name.clone(),
            name: original.to_string(),
            input_path: path.clone(),
            output: output_path(watch, original, id),
        };
        if let Err(error) = store.enqueue(&job).await {
            tracing::warn!(file = %path.display(), %error, "could not recover a taken file");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn default_filter() -> Filter {
        let include: Vec<String> = ["*.mp4", "*.mov"].map(String::from).to_vec();
        Filter::new(&include, &["*-proxy.*".to_string()]).unwrap()
    }

    #[test]
    fn videos_are_taken_and_hidden_temporary_and_partial_names_are_not() {
        let filter = default_filter();
        for name in ["clip.mp4", "CLIP.MP4", "a b (1).mov"] {
            assert!(filter.accepts(name), "{name}");
        }
        for name in
            [".clip.mp4", "clip.mp4.part", "clip.mp4.crdownload", "clip.mp4~", "~clip.mp4", "clip.mkv", "x-proxy.mp4"]
        {
            assert!(!filter.accepts(name), "{name}");
        }
    }

    #[test]
    fn a_bad_pattern_is_a_config_error() {
        let error = Filter::new(&["[".to_string()], &[]).unwrap_err();
        assert!(error.to_string().contains("include pattern '['"), "{error}");
    }

    #[test]
    fn job_ids_depend_on_content_and_settings() {
        let id = job_id("abc", "p1");
        assert_eq!(id.len(), 16);
        assert_eq!(id, job_id("abc", "p1"));
        assert_ne!(id, job_id("abc", "p2"));
        assert_ne!(id, job_id("abd", "p1"));
    }

    #[test]
    fn set_aside_keeps_both_files_when_a_name_is_taken() {
        let dir = tempfile::tempdir().unwrap();
        let (from, to) = (dir.path().join("in"), dir.path().join("done"));
        std::fs::create_dir_all(&from).unwrap();
        std::fs::write(from.join("0123456789abcdef--clip.mp4"), "one").unwrap();
        let first = set_aside(&from.join("0123456789abcdef--clip.mp4"), &to).unwrap().unwrap();
        std::fs::write(from.join("clip.mp4"), "two").unwrap();
        let second = set_aside(&from.join("clip.mp4"), &to).unwrap().unwrap();
        assert_eq!(first, to.join("clip.mp4"), "the job id prefix is dropped");
        assert_eq!(second, to.join("clip (1).mp4"));
        assert_eq!(std::fs::read_to_string(first).unwrap(), "one");
        assert!(set_aside(&from.join("gone.mp4"), &to).unwrap().is_none());
    }
}
