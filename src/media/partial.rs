//! The output file while it is being written: a hidden temporary name in the output's directory,
//! renamed into place only when the video is complete, removed otherwise. A crash or an error never
//! leaves a half-written video under the real name.

use std::path::{Path, PathBuf};

use super::error::MediaError;

/// A temporary output file that is removed on drop unless committed.
pub(crate) struct PartialOutput {
    temporary: PathBuf,
    destination: PathBuf,
    committed: bool,
}

impl PartialOutput {
    /// Takes charge of `temporary`, which will become `destination`.
    pub fn new(temporary: PathBuf, destination: &Path) -> Self {
        PartialOutput { temporary, destination: destination.to_path_buf(), committed: false }
    }

    /// Renames the finished file into place.
    pub fn commit(mut self) -> Result<(), MediaError> {
        std::fs::rename(&self.temporary, &self.destination)
            .map_err(|source| MediaError::Io { path: self.destination.clone(), source })?;
        self.committed = true;
        tracing::debug!(path = %self.destination.display(), "video written");
        Ok(())
    }
}

impl Drop for PartialOutput {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_file(&self.temporary);
            tracing::debug!(path = %self.temporary.display(), "unfinished video removed");
        }
    }
}

/// Checks that `output`'s directory exists and is a directory (its writability shows when the
/// temporary file is created).
pub(crate) fn check_output_directory(output: &Path) -> Result<(), MediaError> {
    let dir = output_directory(output);
    match std::fs::metadata(&dir) {
        Ok(metadata) if metadata.is_dir() => Ok(()),
        Ok(_) => {
            Err(directory_error(output, std::io::Error::new(std::io::ErrorKind::NotADirectory, "not a directory")))
        }
        Err(source) => Err(directory_error(output, source)),
    }
}

/// An output-directory error for `output`.
pub(crate) fn directory_error(output: &Path, source: std::io::Error) -> MediaError {
    MediaError::OutputDirectory { path: output.to_path_buf(), dir: output_directory(output), source }
}

/// The directory `output` goes in ("." for a bare file name).
fn output_directory(output: &Path) -> PathBuf {
    match output.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.to_path_buf(),
        _ => PathBuf::from("."),
    }
}
