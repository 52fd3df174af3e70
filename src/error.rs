//! Typed errors of the engine. Each variant says what was expected, what was found and, where a file
//! is involved, which file. The binary maps them to messages and exit codes in one place (`cli`).

use std::path::{Path, PathBuf};

/// Everything the engine can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read or written.
    #[error("{path}: {source}", path = .path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What the operating system said.
        source: std::io::Error,
    },
    /// An image file is missing, corrupt or of an unsupported format.
    #[error("image '{path}': {problem}", path = .path.display())]
    Image {
        /// The image file.
        path: PathBuf,
        /// What is wrong with it.
        problem: String,
    },
    /// A weight file is of an unknown format, lacks tensors or has tensors of the wrong shape.
    #[error("model weights '{path}': {problem}", path = .path.display())]
    Weights {
        /// The weight file.
        path: PathBuf,
        /// What is wrong with it.
        problem: String,
    },
    /// No model weights were found, or they could not be fetched.
    #[error("no model weights: {0}")]
    NoModel(String),
    /// A setting is out of range or inconsistent with another.
    #[error("invalid setting: {0}")]
    Settings(String),
    /// A device was asked for that does not exist here.
    #[error("device '{device}': {problem}")]
    Device {
        /// The device as the user wrote it.
        device: String,
        /// What is wrong.
        problem: String,
    },
    /// The device ran out of memory.
    #[error("out of memory on {device}: {detail} (try a smaller --size, bf16 precision or another device)")]
    OutOfMemory {
        /// The device.
        device: String,
        /// libtorch's message, first line.
        detail: String,
    },
    /// libtorch reported an error.
    #[error("libtorch: {0}")]
    Torch(String),
    /// A video could not be read or written (the input is not a video, is damaged or truncated, has no
    /// frames, or the output cannot be written).
    #[cfg(feature = "media")]
    #[error(transparent)]
    Media(#[from] crate::media::MediaError),
    /// A video job's work directory (checkpoints) cannot be used.
    #[error("work directory '{dir}': {problem}", dir = .dir.display())]
    Checkpoint {
        /// The work directory.
        dir: PathBuf,
        /// What is wrong.
        problem: String,
    },
    /// A job was asked to stop (shutdown or cancel) and did, after its current frame; the finished
    /// frames are checkpointed, so running it again resumes.
    #[error("stopped on request after {frames_done} frames (finished frames are kept for a resume)")]
    Stopped {
        /// Frames painted and checkpointed so far.
        frames_done: u64,
    },
    /// A bug: something that should not happen did (a worker thread panicked).
    #[error("internal error: {0}")]
    Internal(String),
}

/// The engine's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Wraps an I/O error with the file it concerns.
    pub fn io(path: impl AsRef<Path>, source: std::io::Error) -> Self {
        Error::Io { path: path.as_ref().to_path_buf(), source }
    }

    /// An image error for `path`.
    pub fn image(path: impl AsRef<Path>, problem: impl Into<String>) -> Self {
        Error::Image { path: path.as_ref().to_path_buf(), problem: problem.into() }
    }

    /// A weight-file error for `path`.
    pub fn weights(path: impl AsRef<Path>, problem: impl Into<String>) -> Self {
        Error::Weights { path: path.as_ref().to_path_buf(), problem: problem.into() }
    }
}

impl From<tch::TchError> for Error {
    fn from(err: tch::TchError) -> Self {
        Error::from_torch_message("the device", &err.to_string())
    }
}

impl Error {
    /// The error for a libtorch failure from its message: out of memory on `device`, else a libtorch
    /// error. Only the message's first line is kept (tch's panics quote libtorch's message with its
    /// newlines escaped, so the escaped ones end it too).
    pub fn from_torch_message(device: &str, text: &str) -> Self {
        let first = first_line(text);
        if text.contains("out of memory") {
            Error::OutOfMemory { device: device.to_string(), detail: first }
        } else {
            Error::Torch(first)
        }
    }
}

impl Error {
    /// The error for a panic's text in `stage`: libtorch's failures (out of memory above all) as
    /// such, anything else as an internal error naming the stage.
    pub fn from_panic_text(stage: &str, text: &str) -> Self {
        if text.contains("out of memory") || text.contains("Torch") || text.contains("TchError") {
            Error::from_torch_message("the device", text)
        } else {
            Error::Internal(format!("the {stage} stage panicked: {}", first_line(text)))
        }
    }
}

/// The first line of a message, escaped newlines included.
pub fn first_line(text: &str) -> String {
    let line = text.lines().next().unwrap_or_default();
    line.split("\\n").next().unwrap_or_default().to_string()
}

/// The error for a stage that panicked: libtorch failures (which tch raises as panics) keep their
/// meaning, out of memory included.
pub fn panic_error(stage: &str, payload: &(dyn std::any::Any + Send)) -> Error {
    Error::from_panic_text(stage, &panic_text(payload))
}

/// The text of a panic's payload.
pub fn panic_text(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "unknown panic".into())
}
