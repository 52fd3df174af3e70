//! Typed errors of the media module. Every variant names the file it concerns and says what is wrong
//! with it in words a user can act on; FFmpeg's own error text is kept as detail, never as the whole
//! message. The variants are what callers match on (for exit codes, retries or skipping frames).

use std::path::PathBuf;

/// Everything reading, probing or writing a video can fail with.
#[derive(Debug, thiserror::Error)]
pub enum MediaError {
    /// The input file could not be opened or read (missing, a directory, no permission).
    #[error("'{path}': {source}", path = .path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What the operating system said.
        source: std::io::Error,
    },
    /// FFmpeg recognises no media format in the file's content (for example a text file named `.mp4`).
    #[error("'{path}' is not a video file: FFmpeg recognises no media format in its content", path = .path.display())]
    NotMedia {
        /// The file.
        path: PathBuf,
    },
    /// The file is media of a known format, but its header cannot be read (truncated before the
    /// index, or damaged).
    #[error("'{path}' is a damaged or truncated {format} file: its header cannot be read ({detail})", path = .path.display())]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// The container format the content looks like.
        format: String,
        /// FFmpeg's description of the failure.
        detail: String,
    },
    /// The file has no video stream (an audio-only file, for example).
    #[error("'{path}' has no video stream (its streams: {streams})", path = .path.display())]
    NoVideoStream {
        /// The file.
        path: PathBuf,
        /// The streams it does have, as "audio (aac)", or "none".
        streams: String,
    },
    /// The file has a video stream without a single frame in it.
    #[error("'{path}' contains no video frames", path = .path.display())]
    ZeroFrames {
        /// The file.
        path: PathBuf,
    },
    /// The file's data ends before its index says it should: frames after `frames` are lost.
    #[error("'{path}' is truncated: its video data ends after {frames} decodable frames", path = .path.display())]
    Truncated {
        /// The file.
        path: PathBuf,
        /// How many frames were decoded before the data ran out.
        frames: u64,
    },
    /// A live stream's read failed before it ended (a reset connection, a network error): frames after
    /// `frames` never came.
    #[error("'{path}' broke off after {frames} frames: {detail}", path = .path.display())]
    BrokeOff {
        /// The stream.
        path: PathBuf,
        /// How many frames were decoded before it broke off.
        frames: u64,
        /// FFmpeg's description of the failed read.
        detail: String,
    },
    /// Damaged data in the middle of the video stream. Decoding goes on after this report; frames
    /// from `frame` on may show concealment artefacts or be missing.
    #[error("'{path}': damaged video data at frame {frame} ({detail}); decoding continues", path = .path.display())]
    Damaged {
        /// The file.
        path: PathBuf,
        /// Index of the next frame to be yielded when the damage was met.
        frame: u64,
        /// What was wrong.
        detail: String,
    },
    /// The output's directory does not exist, is not a directory or cannot be written.
    #[error("cannot write '{path}': its directory '{dir}' is not writable: {source}", path = .path.display(), dir = .dir.display())]
    OutputDirectory {
        /// The output file.
        path: PathBuf,
        /// Its directory.
        dir: PathBuf,
        /// What the operating system said.
        source: std::io::Error,
    },
    /// FFmpeg knows no container format for the output's file name extension.
    #[error("cannot write '{path}': FFmpeg knows no container format for the extension '{extension}'", path = .path.display())]
    UnknownContainer {
        /// The output file.
        path: PathBuf,
        /// Its extension, possibly empty.
        extension: String,
    },
    /// FFmpeg has no video encoder of this name.
    #[error("unknown video encoder '{codec}': this FFmpeg has no video encoder of that name")]
    UnknownCodec {
        /// The name asked for.
        codec: String,
    },
    /// The combination asked for cannot be written (a codec the container cannot hold, a stream that
    /// cannot be copied into it, a pixel format the encoder does not take).
    #[error("cannot write '{path}': {detail}", path = .path.display())]
    Unsupported {
        /// The output file.
        path: PathBuf,
        /// What is not supported.
        detail: String,
    },
    /// An encode setting is invalid.
    #[error("invalid encode setting: {0}")]
    Settings(String),
    /// A frame given to the writer does not fit the stream (size, timestamps).
    #[error("'{path}': frame {frame}: {problem}", path = .path.display())]
    BadFrame {
        /// The output file.
        path: PathBuf,
        /// The frame's position among those written.
        frame: u64,
        /// What is wrong with it.
        problem: String,
    },
    /// The writer was finished without a single frame.
    #[error("'{path}' was not written: no frames were given", path = .path.display())]
    EmptyOutput {
        /// The output file.
        path: PathBuf,
    },
    /// An FFmpeg operation failed for a reason none of the variants above describes.
    #[error("'{path}': {operation} failed: {detail}", path = .path.display())]
    Ffmpeg {
        /// The file concerned.
        path: PathBuf,
        /// What was being done, as "opening the encoder".
        operation: &'static str,
        /// FFmpeg's error text.
        detail: String,
    },
}

impl MediaError {
    /// Whether the input itself is bad (not a video, damaged, truncated, empty): trying again cannot help.
    pub fn is_bad_input(&self) -> bool {
        matches!(
            self,
            MediaError::NotMedia { .. }
                | MediaError::Corrupt { .. }
                | MediaError::NoVideoStream { .. }
                | MediaError::ZeroFrames { .. }
                | MediaError::Truncated { .. }
                | MediaError::Damaged { .. }
        )
    }

    /// Whether the encode settings are impossible (container, codec, options).
    pub fn is_bad_settings(&self) -> bool {
        matches!(
            self,
            MediaError::Settings(_)
                | MediaError::UnknownContainer { .. }
                | MediaError::UnknownCodec { .. }
                | MediaError::Unsupported { .. }
        )
    }

    /// A generic FFmpeg failure while doing `operation` on `path`.
    pub(crate) fn ffmpeg(path: &std::path::Path, operation: &'static str, error: ffmpeg_next::Error) -> Self {
        MediaError::Ffmpeg { path: path.to_path_buf(), operation, detail: error.to_string() }
    }

    /// A live stream at `path` that a stop request ended before it began.
    pub(crate) fn stopped_before_the_stream(path: &std::path::Path) -> Self {
        MediaError::Ffmpeg {
            path: path.to_path_buf(),
            operation: "opening the stream",
            detail: "stopped before the stream began".into(),
        }
    }
}
