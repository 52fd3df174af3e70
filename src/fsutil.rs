//! Small file-system habits: outputs are written under a temporary name beside their destination
//! and renamed into place, so a crash never leaves a half-written file under the real name.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Moves `staged` to `destination` together with every other file in `staged`'s folder (the
/// segments of an HLS playlist), each under its own name into `destination`'s folder, `staged`
/// itself last, so that what it refers to is in place before it is. Not atomic as a whole: a failure
/// part-way leaves the files moved so far.
pub fn move_with_companions(staged: &Path, destination: &Path) -> std::io::Result<()> {
    let (staging_folder, folder) = (folder_of(staged), folder_of(destination));
    for entry in std::fs::read_dir(staging_folder)? {
        let entry = entry?;
        let path = entry.path();
        if path != staged
            && entry.file_type()?.is_file()
            && let Some(name) = path.file_name()
        {
            std::fs::rename(&path, folder.join(name))?;
        }
    }
    std::fs::rename(staged, destination)
}

/// The folder `path` is in: its parent, or "." for a bare file name.
pub fn folder_of(path: &Path) -> &Path {
    path.parent().filter(|parent| !parent.as_os_str().is_empty()).unwrap_or(Path::new("."))
}

/// A hidden temporary name in the same directory as `path` (same file system, so rename is atomic).
pub fn temp_path_for(path: &Path) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "output".into());
    let extension = path.extension().map(|e| format!(".{}", e.to_string_lossy())).unwrap_or_default();
    path.with_file_name(format!(".{name}.{}.partial{extension}", std::process::id()))
}

/// Writes through `write` to a temporary file, then renames it to `path`; removes it on failure.
pub fn write_atomically(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
        && !dir.is_dir()
    {
        return Err(Error::io(
            path,
            std::io::Error::new(std::io::ErrorKind::NotFound, "output directory does not exist"),
        ));
    }
    let temp = temp_path_for(path);
    let result = write(&temp).and_then(|()| std::fs::rename(&temp, path).map_err(|e| Error::io(path, e)));
    if result.is_err() {
        let _ = std::fs::remove_file(&temp);
    }
    result
}
