//! The output while it is being written: a hidden temporary name in the output's directory, renamed
//! into place only when the video is complete, removed otherwise. A crash or an error never leaves a
//! half-written video under the real name. A muxer that writes several files (an HLS playlist and
//! its segments, DASH) writes them into a hidden temporary directory instead, under their own names,
//! and they are moved into place when complete, the named output last, so that the files it refers
//! to are there before it is.

use std::path::{Path, PathBuf};

use super::error::MediaError;

/// A temporary output file, or directory of files, that is removed on drop unless committed.
pub(crate) struct PartialOutput {
    /// The temporary file, or directory.
    temporary: PathBuf,
    destination: PathBuf,
    /// The muxer writes several files, into the `temporary` directory.
    several_files: bool,
    committed: bool,
}

impl PartialOutput {
    /// A hidden temporary place for `destination` in its directory: a file, or (for a muxer that
    /// writes `several_files`) a new directory.
    pub fn create(destination: &Path, several_files: bool) -> Result<Self, MediaError> {
        let temporary = crate::fsutil::temp_path_for(destination);
        if several_files {
            // a folder of this name was left by a killed process that had this process's id
            let _ = std::fs::remove_dir_all(&temporary);
            std::fs::create_dir(&temporary).map_err(|source| directory_error(destination, source))?;
        }
        Ok(PartialOutput { temporary, destination: destination.to_path_buf(), several_files, committed: false })
    }

    /// Where the muxer writes: the temporary file, or the output's name in the temporary directory.
    pub fn path(&self) -> PathBuf {
        match (self.several_files, self.destination.file_name()) {
            (true, Some(name)) => self.temporary.join(name),
            _ => self.temporary.clone(),
        }
    }

    /// Moves the finished output into place.
    pub fn commit(mut self) -> Result<(), MediaError> {
        let io_error = |source| MediaError::Io { path: self.destination.clone(), source };
        match self.several_files {
            true => crate::fsutil::move_with_companions(&self.path(), &self.destination),
            false => std::fs::rename(&self.temporary, &self.destination),
        }
        .map_err(io_error)?;
        self.committed = true;
        if self.several_files {
            let _ = std::fs::remove_dir(&self.temporary);
        }
        tracing::debug!(path = %self.destination.display(), "video written");
        Ok(())
    }
}

impl Drop for PartialOutput {
    fn drop(&mut self) {
        if !self.committed {
            let _ = match self.several_files {
                true => std::fs::remove_dir_all(&self.temporary),
                false => std::fs::remove_file(&self.temporary),
            };
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
    crate::fsutil::folder_of(output).to_path_buf()
}
