//! Crash safety for long video jobs. Every painted frame is stored losslessly (PNG) in a hidden work
//! directory beside the output, and a manifest line records it once the PNG is safely on disk. The
//! directory's name carries a hash of everything that decides the painted pixels (the input file's
//! identity, the style images, the settings), so re-running the same command after a crash or a
//! SIGKILL finds it and resumes at the first unfinished frame, while a changed command starts afresh.
//! A lock keeps two processes out of one directory; the job removes the directory when it succeeds,
//! and with it those that runs of the same output with other settings left.
//!
//! Layout: `.NAME.impasto-KEY/` holding `manifest.jsonl` (a header line, then one
//! [`FrameRecord`] per finished picture, in the order they were finished: a video painted in
//! segments finishes frames out of order), `frames/NNNNNN.png` (a frame's own picture),
//! `frames/NNNNNN.lead.png` (a segment's lead-in picture of it, see [`super::segments`]) and `lock`.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use image::RgbImage;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::report::FrameRecord;
use crate::error::{Error, Result};

/// Name of the manifest file inside a work directory.
pub const MANIFEST: &str = "manifest.jsonl";
/// Name of the folder of painted frames inside a work directory.
pub const FRAMES: &str = "frames";
/// Name of the lock file inside a work directory.
const LOCK: &str = "lock";
/// The folder the encoder's output is written in before it is moved into place.
const STAGING: &str = "output";
/// Version of the manifest format; another version is not resumed.
const FORMAT_VERSION: u32 = 1;
/// Hex digits of the key used in the directory name.
const KEY_DIGITS: usize = 16;

/// The first line of a manifest.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct Header {
    impasto_checkpoint: u32,
    key: String,
}

/// The key of a job: SHA-256 (hex) of its identity as compact JSON.
pub fn job_key(identity: &serde_json::Value) -> String {
    hex::encode(Sha256::digest(identity.to_string().as_bytes()))
}

/// What identifies an input file without reading it all: its canonical path, length and modification
/// time.
pub fn file_identity(path: &Path) -> Result<serde_json::Value> {
    let canonical = path.canonicalize().map_err(|e| Error::io(path, e))?;
    let metadata = std::fs::metadata(&canonical).map_err(|e| Error::io(path, e))?;
    let modified = metadata
        .modified()
        .ok()
        .and_then(|time| time.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |since| since.as_nanos());
    Ok(serde_json::json!({ "path": canonical, "bytes": metadata.len(), "modified_ns": modified.to_string() }))
}

/// SHA-256 (hex) of an image's size and pixels: a style image's identity, whatever file it came from.
pub fn image_digest(image: &RgbImage) -> String {
    let mut hasher = Sha256::new();
    hasher.update(image.width().to_le_bytes());
    hasher.update(image.height().to_le_bytes());
    hasher.update(image.as_raw());
    hex::encode(hasher.finalize())
}

/// The work directory of the job `key` that writes `output`: hidden, beside it.
pub fn work_dir_for(output: &Path, key: &str) -> PathBuf {
    output.with_file_name(format!("{}{}", work_dir_prefix(output), &key[..KEY_DIGITS.min(key.len())]))
}

/// The name of every work directory of `output`, up to the key.
fn work_dir_prefix(output: &Path) -> String {
    let name = output.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "output".into());
    format!(".{name}.impasto-")
}

/// What a stored picture is: a frame's index and whether it is a lead-in picture.
pub type PictureKey = (u64, bool);

/// The key of a record's picture.
fn key_of(record: &FrameRecord) -> PictureKey {
    (record.index, record.lead_in)
}

/// An open, locked work directory.
pub struct Checkpoint {
    dir: PathBuf,
    manifest: File,
    _lock: File,
    header: Header,
    /// The pictures listed in the manifest, earlier runs' and this one's.
    listed: BTreeMap<PictureKey, FrameRecord>,
    /// Records this run wrote.
    stored: u64,
}

impl Checkpoint {
    /// Opens (creating it if needed) the work directory of job `key` for `output`, takes its lock, and
    /// reads which pictures an earlier run finished. The manifest is rewritten with just those, so a
    /// line torn by a crash never gets in the way.
    pub fn open(output: &Path, key: &str) -> Result<Self> {
        let dir = work_dir_for(output, key);
        std::fs::create_dir_all(dir.join(FRAMES)).map_err(|e| unwritable(output, &dir, e))?;
        let lock = lock_directory(&dir)?;
        remove_leftovers(&dir);
        let header = Header { impasto_checkpoint: FORMAT_VERSION, key: key.to_string() };
        let listed = read_finished(&dir, &header);
        let manifest = rewrite_manifest(&dir, &header, &listed)?;
        if !listed.is_empty() {
            tracing::info!(dir = %dir.display(), pictures = listed.len(), "resuming from a checkpoint");
        }
        Ok(Checkpoint { dir, manifest, _lock: lock, header, listed, stored: 0 })
    }

    /// The work directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Records of the pictures an earlier run finished (and this run so far), by key.
    pub fn resumable(&self) -> &BTreeMap<PictureKey, FrameRecord> {
        &self.listed
    }

    /// Whether the directory holds finished frames (from an earlier run or this one).
    pub fn holds_frames(&self) -> bool {
        !self.listed.is_empty() || self.stored > 0
    }

    /// Where a file named like `output` is written inside the work directory (the encoder's output
    /// before it is moved into place): in a folder of its own, emptied of what a killed run left, so
    /// that the files a muxer writes beside it (HLS segments) can be moved into place with it.
    pub fn staging_path(&self, output: &Path) -> Result<PathBuf> {
        let folder = self.dir.join(STAGING);
        if folder.exists() {
            std::fs::remove_dir_all(&folder).map_err(|e| Error::io(&folder, e))?;
        }
        std::fs::create_dir(&folder).map_err(|e| Error::io(&folder, e))?;
        Ok(folder.join(output.file_name().unwrap_or(std::ffi::OsStr::new("output"))))
    }

    /// A reader of the stored pictures that can go to another stage than the one storing them.
    pub fn stored_frames(&self) -> StoredFrames {
        StoredFrames { dir: self.dir.clone() }
    }

    /// Stores a picture (the frame's own, or a lead-in one), then records it in the manifest (flushed
    /// to disk). Storing one the manifest already lists (its stored picture was unusable, so it and
    /// the frames after it are painted again) first cuts every later frame from the manifest.
    pub fn store(&mut self, record: &FrameRecord, picture: &RgbImage) -> Result<()> {
        if self.listed.contains_key(&key_of(record)) {
            self.listed.retain(|&(index, _), _| index < record.index);
            self.manifest = rewrite_manifest(&self.dir, &self.header, &self.listed)?;
        }
        write_png_durably(&frame_path(&self.dir, key_of(record)), picture)?;
        let mut line = serde_json::to_string(record).map_err(|e| Error::Settings(format!("manifest: {e}")))?;
        line.push('\n');
        let manifest_path = self.dir.join(MANIFEST);
        self.manifest.write_all(line.as_bytes()).map_err(|e| Error::io(&manifest_path, e))?;
        self.manifest.sync_data().map_err(|e| Error::io(&manifest_path, e))?;
        self.listed.insert(key_of(record), record.clone());
        self.stored += 1;
        Ok(())
    }

    /// Deletes the work directory (after a successful job).
    pub fn remove(self) -> Result<()> {
        let Checkpoint { dir, manifest, _lock, .. } = self;
        drop(manifest);
        std::fs::remove_dir_all(&dir).map_err(|e| Error::io(&dir, e))
    }
}

/// Removes the work directories that runs with other settings left beside `output` (interrupted,
/// then run again differently): once `output` is finished they could only overwrite it. One
/// that another process holds is left alone. Returns the directories removed.
pub fn remove_stale_siblings(output: &Path, key: &str) -> Vec<PathBuf> {
    let own = work_dir_for(output, key);
    let prefix = work_dir_prefix(output);
    let parent = crate::fsutil::folder_of(&own);
    let Ok(entries) = std::fs::read_dir(parent) else { return Vec::new() };
    let mut removed = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let dir = entry.path();
        let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
        if !is_dir || !name.starts_with(&prefix) || dir == own || !dir.join(MANIFEST).is_file() {
            continue;
        }
        // held by a running job: not stale
        let Ok(_lock) = lock_directory(&dir) else { continue };
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => removed.push(dir),
            Err(error) => tracing::warn!(dir = %dir.display(), %error, "cannot remove a stale work directory"),
        }
    }
    removed
}

/// Reads the pictures of a work directory.
#[derive(Clone)]
pub struct StoredFrames {
    dir: PathBuf,
}

impl StoredFrames {
    /// The stored picture `key`.
    pub fn load(&self, key: PictureKey) -> Result<RgbImage> {
        crate::imageio::read_rgb(&frame_path(&self.dir, key))
    }
}

/// The stored picture `(index, lead_in)` in `dir`.
fn frame_path(dir: &Path, (index, lead_in): PictureKey) -> PathBuf {
    let suffix = if lead_in { ".lead" } else { "" };
    dir.join(FRAMES).join(format!("{index:06}{suffix}.png"))
}

/// The error for a work directory that cannot be made beside `output`.
fn unwritable(output: &Path, dir: &Path, source: std::io::Error) -> Error {
    Error::Checkpoint {
        dir: dir.to_path_buf(),
        problem: format!("cannot create the work directory beside '{}': {source}", output.display()),
    }
}

/// Takes an exclusive, non-blocking lock on the directory's lock file (released when the process
/// ends, however it ends).
fn lock_directory(dir: &Path) -> Result<File> {
    let path = dir.join(LOCK);
    let file =
        OpenOptions::new().create(true).truncate(false).write(true).open(&path).map_err(|e| Error::io(&path, e))?;
    // SAFETY: flock on a file descriptor this function owns; no memory is involved.
    let locked = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0;
    if !locked {
        return Err(Error::Checkpoint {
            dir: dir.to_path_buf(),
            problem: "another impasto process is working on this output".into(),
        });
    }
    Ok(file)
}

/// Removes what a killed run may have left half-written: temporary files (hidden names) in the
/// directory and its frames folder.
fn remove_leftovers(dir: &Path) {
    for folder in [dir.to_path_buf(), dir.join(FRAMES)] {
        let Ok(entries) = std::fs::read_dir(&folder) else { continue };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let is_file = entry.file_type().is_ok_and(|t| t.is_file());
            if is_file && (name.starts_with('.') || name.contains(".partial")) {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
}

/// The records in the manifest up to the first unreadable line, each with its picture stored; none
/// when the manifest belongs to another key or format.
fn read_finished(dir: &Path, header: &Header) -> BTreeMap<PictureKey, FrameRecord> {
    let Ok(file) = File::open(dir.join(MANIFEST)) else { return BTreeMap::new() };
    let mut lines = BufReader::new(file).lines().map_while(std::result::Result::ok);
    let stored_header: Option<Header> = lines.next().and_then(|line| serde_json::from_str(&line).ok());
    if stored_header.as_ref() != Some(header) {
        return BTreeMap::new();
    }
    let mut finished = BTreeMap::new();
    for line in lines {
        let Ok(record) = serde_json::from_str::<FrameRecord>(&line) else { break };
        if frame_path(dir, key_of(&record)).is_file() {
            finished.insert(key_of(&record), record);
        }
    }
    finished
}

/// Rewrites the manifest with `header` and `records`, atomically, and opens it for appending.
fn rewrite_manifest(dir: &Path, header: &Header, records: &BTreeMap<PictureKey, FrameRecord>) -> Result<File> {
    let path = dir.join(MANIFEST);
    let mut text = serde_json::to_string(header).expect("header serialises");
    text.push('\n');
    for record in records.values() {
        text.push_str(&serde_json::to_string(record).expect("record serialises"));
        text.push('\n');
    }
    crate::fsutil::write_atomically(&path, |temporary| {
        std::fs::write(temporary, text.as_bytes()).map_err(|e| Error::io(&path, e))
    })?;
    OpenOptions::new().append(true).open(&path).map_err(|e| Error::io(&path, e))
}

/// Writes a PNG (fast compression) under a temporary name, flushes it to disk and renames it into
/// place, so the manifest never lists a frame whose picture could be lost.
fn write_png_durably(path: &Path, picture: &RgbImage) -> Result<()> {
    use image::ImageEncoder;
    use image::codecs::png::{CompressionType, FilterType, PngEncoder};
    crate::fsutil::write_atomically(path, |temporary| {
        let file = File::create(temporary).map_err(|e| Error::io(path, e))?;
        let mut writer = std::io::BufWriter::new(file);
        PngEncoder::new_with_quality(&mut writer, CompressionType::Fast, FilterType::Adaptive)
            .write_image(picture.as_raw(), picture.width(), picture.height(), image::ExtendedColorType::Rgb8)
            .map_err(|e| Error::image(path, format!("cannot write: {e}")))?;
        let file = writer.into_inner().map_err(|e| Error::io(path, e.into_error()))?;
        file.sync_all().map_err(|e| Error::io(path, e))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::report::{FrameLosses, FrameSeconds, Start};

    fn record(index: u64) -> FrameRecord {
        FrameRecord {
            index,
            pts: index as i64 * 512,
            start: if index == 0 { Start::First } else { Start::Warped },
            iterations: 3,
            curvature_carried: index > 0,
            losses: FrameLosses::default(),
            loss_scale: 1.0,
            warping_error: None,
            seconds: FrameSeconds::default(),
            resumed: false,
            lead_in: false,
        }
    }

    #[test]
    fn a_finished_output_takes_stale_work_directories_of_other_settings_with_it() {
        let folder = tempfile::tempdir().unwrap();
        let output = folder.path().join("out.mp4");
        let picture = RgbImage::from_pixel(4, 2, image::Rgb([10, 20, 30]));
        let mut stale = Checkpoint::open(&output, "0ld5e771n65").unwrap();
        stale.store(&record(0), &picture).unwrap();
        let stale_dir = stale.dir().to_path_buf();
        drop(stale);
        let running = Checkpoint::open(&output, "ru22in6").unwrap();
        let other_output = Checkpoint::open(&folder.path().join("out.mp4.bak"), "0ld5e771n65").unwrap();
        let unrelated = folder.path().join(".out.mp4.impasto-notes");
        std::fs::create_dir_all(&unrelated).unwrap();
        let finished = Checkpoint::open(&output, "f1n15hed").unwrap();
        finished.remove().unwrap();
        assert_eq!(remove_stale_siblings(&output, "f1n15hed"), vec![stale_dir.clone()]);
        assert!(!stale_dir.exists());
        assert!(running.dir().exists(), "a directory another job holds stays");
        assert!(other_output.dir().exists(), "another output's directory stays");
        assert!(unrelated.exists(), "a directory without a manifest is not ours");
    }

    #[test]
    fn finished_frames_survive_a_torn_manifest_and_other_keys_start_afresh() {
        let folder = tempfile::tempdir().unwrap();
        let output = folder.path().join("out.mp4");
        let picture = RgbImage::from_pixel(4, 2, image::Rgb([10, 20, 30]));
        {
            let mut checkpoint = Checkpoint::open(&output, "abc123").unwrap();
            assert!(checkpoint.resumable().is_empty());
            assert!(Checkpoint::open(&output, "abc123").is_err(), "the lock keeps a second job out");
            checkpoint.store(&record(0), &picture).unwrap();
            checkpoint.store(&record(1), &picture).unwrap();
        }
        let manifest = work_dir_for(&output, "abc123").join(MANIFEST);
        let mut file = OpenOptions::new().append(true).open(&manifest).unwrap();
        file.write_all(b"{\"index\": 2, \"pts\"").unwrap();
        let mut checkpoint = Checkpoint::open(&output, "abc123").unwrap();
        assert_eq!(checkpoint.resumable().len(), 2);
        assert_eq!(checkpoint.stored_frames().load((1, false)).unwrap(), picture);
        checkpoint.store(&record(2), &picture).unwrap();
        drop(checkpoint);
        let mut reopened = Checkpoint::open(&output, "abc123").unwrap();
        assert_eq!(reopened.resumable().len(), 3);
        reopened.store(&record(1), &picture).unwrap();
        drop(reopened);
        assert_eq!(Checkpoint::open(&output, "abc123").unwrap().resumable().len(), 2, "frame 1 again cuts frame 2");
        let other = Checkpoint::open(&output, "def456").unwrap();
        assert!(other.resumable().is_empty());
        other.remove().unwrap();
        assert!(!work_dir_for(&output, "def456").exists());
    }

    #[test]
    fn pictures_finished_out_of_order_and_lead_ins_are_resumable() {
        let folder = tempfile::tempdir().unwrap();
        let output = folder.path().join("out.mp4");
        let own = RgbImage::from_pixel(4, 2, image::Rgb([10, 20, 30]));
        let lead_in = RgbImage::from_pixel(4, 2, image::Rgb([200, 20, 30]));
        {
            let mut checkpoint = Checkpoint::open(&output, "seg").unwrap();
            checkpoint.store(&record(0), &own).unwrap();
            checkpoint.store(&FrameRecord { lead_in: true, ..record(3) }, &lead_in).unwrap();
            checkpoint.store(&record(5), &own).unwrap();
            checkpoint.store(&record(3), &own).unwrap();
        }
        let checkpoint = Checkpoint::open(&output, "seg").unwrap();
        let keys: Vec<PictureKey> = checkpoint.resumable().keys().copied().collect();
        assert_eq!(keys, vec![(0, false), (3, false), (3, true), (5, false)]);
        let stored = checkpoint.stored_frames();
        assert_eq!(stored.load((3, true)).unwrap(), lead_in);
        assert_eq!(stored.load((3, false)).unwrap(), own);
    }
}
