//! Pipes a stream reads or writes (`pipe:N`, `-` on the command line) are made non-blocking while
//! the stream uses them. FFmpeg's pipe protocol then waits for data, or for room, in its own retry
//! loop, which asks the stream's interrupt callback about every millisecond, instead of in a `read`
//! or `write` that only a signal ends (and impasto's handler restarts those). So a stop request ends
//! a wait on a silent input pipe, and an abort a send to a reader that stopped reading, as they do
//! on a network connection. The flag belongs to the pipe's open file description, which other
//! processes may share, so it is cleared again when the stream closes, and by
//! [`restore_pipes`] from a signal handler that exits at once. A named pipe (FIFO) given by its
//! path is opened without waiting for a writer ([`NamedPipe`]), whose arrival is awaited in a loop
//! that a stop request ends, and read as `pipe:N`.

use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::time::Duration;

/// How long one wait for a named pipe's writer lasts before the stop flag is asked again.
const WRITER_POLL: Duration = Duration::from_millis(100);

/// The descriptors switched now (-1: a free place): at most standard input and output.
static SWITCHED: [AtomicI32; 2] = [AtomicI32::new(-1), AtomicI32::new(-1)];

/// A pipe switched to non-blocking; blocking again on drop.
#[derive(Debug)]
pub(crate) struct NonBlockingPipe {
    place: usize,
}

impl NonBlockingPipe {
    /// Switches the descriptor FFmpeg's `location` names (`pipe:N`, or `pipe:` for `default_fd`)
    /// when it is a blocking pipe or socket. None for any other location, a terminal or a file, and
    /// for a pipe that standard input, output or error also use (log lines to a non-blocking pipe
    /// could fail).
    pub(crate) fn switch(location: &str, default_fd: RawFd) -> Option<Self> {
        let fd = pipe_descriptor(location, default_fd)?;
        let identity = pipe_identity(fd)?;
        let shared = (0..=2).filter(|&other| other != fd).any(|other| file_identity(other) == Some(identity));
        if shared {
            tracing::debug!(fd, "the pipe is shared with another standard stream; left blocking");
            return None;
        }
        let place = SWITCHED
            .iter()
            .position(|place| place.compare_exchange(-1, fd, Ordering::SeqCst, Ordering::SeqCst).is_ok())?;
        // SAFETY: fcntl on a descriptor that fstat just found open; only O_NONBLOCK changes.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
        let switched = flags >= 0
            && flags & libc::O_NONBLOCK == 0
            && unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } == 0;
        if !switched {
            SWITCHED[place].store(-1, Ordering::SeqCst);
            return None;
        }
        Some(NonBlockingPipe { place })
    }
}

impl Drop for NonBlockingPipe {
    fn drop(&mut self) {
        let fd = SWITCHED[self.place].swap(-1, Ordering::SeqCst);
        make_blocking(fd);
    }
}

/// A named pipe (FIFO) opened for reading without blocking: `open(2)` of a FIFO otherwise waits in
/// the kernel until a writer opens it, where no stop request reaches it. Read through FFmpeg's
/// pipe protocol as [`location`](Self::location), which leaves the descriptor to this value to close.
#[derive(Debug)]
pub(crate) struct NamedPipe {
    file: File,
}

/// Why no named pipe was opened.
#[derive(Debug)]
pub(crate) enum NamedPipeError {
    /// `stop` was raised before a writer came.
    Stopped,
    /// Opening or waiting failed.
    Io(std::io::Error),
}

impl NamedPipe {
    /// Opens `path` if it is a FIFO and waits, while `stop` stays low, until a writer has sent
    /// something or come and gone. `Ok(None)` for anything that is not a FIFO.
    pub(crate) fn open(path: &Path, stop: &AtomicBool) -> Result<Option<Self>, NamedPipeError> {
        let is_fifo = std::fs::metadata(path).is_ok_and(|metadata| metadata.file_type().is_fifo());
        if !is_fifo {
            return Ok(None);
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)
            .map_err(NamedPipeError::Io)?;
        while !writer_arrived(&file)? {
            if stop.load(Ordering::SeqCst) {
                return Err(NamedPipeError::Stopped);
            }
        }
        Ok(Some(NamedPipe { file }))
    }

    /// The pipe as FFmpeg names it.
    pub(crate) fn location(&self) -> String {
        format!("pipe:{}", self.file.as_raw_fd())
    }
}

/// Waits up to [`WRITER_POLL`] for `fifo` to have data or to have lost a writer it had (Linux
/// reports no hang-up on a FIFO no writer has opened yet, so this waits for one).
fn writer_arrived(fifo: &File) -> Result<bool, NamedPipeError> {
    let mut watched = libc::pollfd { fd: fifo.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    // SAFETY: one valid pollfd for a descriptor `fifo` holds open.
    let ready = unsafe { libc::poll(&mut watched, 1, WRITER_POLL.as_millis() as libc::c_int) };
    match ready {
        0 => Ok(false),
        1.. => Ok(watched.revents != 0),
        _ => match std::io::Error::last_os_error() {
            error if error.kind() == std::io::ErrorKind::Interrupted => Ok(false),
            error => Err(NamedPipeError::Io(error)),
        },
    }
}

/// Makes every pipe a stream switched blocking again. Async-signal-safe (atomics and `fcntl`), for
/// a signal handler that is about to `_exit`.
pub fn restore_pipes() {
    for place in &SWITCHED {
        make_blocking(place.swap(-1, Ordering::SeqCst));
    }
}

/// Clears O_NONBLOCK on `fd` (nothing for -1).
fn make_blocking(fd: RawFd) {
    if fd < 0 {
        return;
    }
    // SAFETY: fcntl reads and writes status flags; on a descriptor closed since it fails harmlessly.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags >= 0 {
            libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK);
        }
    }
}

/// The descriptor FFmpeg's pipe protocol uses for `pipe:N`: N when it is a number, `default_fd`
/// otherwise (`pipe:`, or anything after the colon that is not one).
fn pipe_descriptor(location: &str, default_fd: RawFd) -> Option<RawFd> {
    let number = location.strip_prefix("pipe:")?;
    let is_number = !number.is_empty() && number.bytes().all(|byte| byte.is_ascii_digit());
    Some(if is_number { number.parse().ok()? } else { default_fd })
}

/// The (device, inode) of `fd` if it is a pipe or a socket.
fn pipe_identity(fd: RawFd) -> Option<(u64, u64)> {
    let status = file_status(fd)?;
    let kind = status.st_mode & libc::S_IFMT;
    (kind == libc::S_IFIFO || kind == libc::S_IFSOCK).then_some((status.st_dev, status.st_ino))
}

/// The (device, inode) of whatever `fd` is open on.
fn file_identity(fd: RawFd) -> Option<(u64, u64)> {
    file_status(fd).map(|status| (status.st_dev, status.st_ino))
}

fn file_status(fd: RawFd) -> Option<libc::stat> {
    // SAFETY: fstat writes into a zeroed stat of the right type; a closed descriptor fails cleanly.
    unsafe {
        let mut status: libc::stat = std::mem::zeroed();
        (libc::fstat(fd, &mut status) == 0).then_some(status)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    fn blocking(fd: RawFd) -> bool {
        // SAFETY: reads the flags of a descriptor the test holds open.
        unsafe { libc::fcntl(fd, libc::F_GETFL) & libc::O_NONBLOCK == 0 }
    }

    #[test]
    fn pipe_locations_name_their_descriptor_as_ffmpeg_reads_them() {
        assert_eq!(pipe_descriptor("pipe:", 0), Some(0));
        assert_eq!(pipe_descriptor("pipe:", 1), Some(1));
        assert_eq!(pipe_descriptor("pipe:7", 0), Some(7));
        assert_eq!(pipe_descriptor("pipe:x", 1), Some(1));
        assert_eq!(pipe_descriptor("pipe:3abc", 0), Some(0));
        assert_eq!(pipe_descriptor("pipe:+3", 0), Some(0));
        assert_eq!(pipe_descriptor("tcp://host:1", 0), None);
        assert_eq!(pipe_descriptor("pipe.ts", 0), None);
    }

    #[test]
    fn a_pipe_is_non_blocking_while_switched_and_blocking_after_a_drop_or_a_restore() {
        let (reader, _writer) = std::io::pipe().unwrap();
        let fd = reader.as_raw_fd();
        assert!(blocking(fd));
        let switched = NonBlockingPipe::switch(&format!("pipe:{fd}"), 0).expect("a pipe is switched");
        assert!(!blocking(fd));
        drop(switched);
        assert!(blocking(fd));
        let switched = NonBlockingPipe::switch(&format!("pipe:{fd}"), 0).expect("switched again");
        restore_pipes();
        assert!(blocking(fd));
        drop(switched);
        assert!(blocking(fd));
    }

    #[test]
    fn a_named_pipe_opens_at_once_and_waits_for_its_writer_until_stopped() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("in.fifo");
        let name = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a valid C string naming a path in a fresh directory.
        assert_eq!(unsafe { libc::mkfifo(name.as_ptr(), 0o600) }, 0);
        assert!(matches!(NamedPipe::open(&fifo, &AtomicBool::new(true)), Err(NamedPipeError::Stopped)));
        let writer = std::thread::spawn({
            let fifo = fifo.clone();
            move || std::fs::write(fifo, b"painted")
        });
        let pipe = NamedPipe::open(&fifo, &AtomicBool::new(false)).unwrap().expect("a FIFO");
        writer.join().unwrap().unwrap();
        assert!(pipe.location().starts_with("pipe:"));
        let mut read = String::new();
        std::io::Read::read_to_string(&mut &pipe.file, &mut read).unwrap();
        assert_eq!(read, "painted");
        assert!(NamedPipe::open(&dir.path().join("missing"), &AtomicBool::new(false)).unwrap().is_none());
    }

    #[test]
    fn a_file_is_left_as_it_is() {
        let file = tempfile::tempfile().unwrap();
        let fd = file.as_raw_fd();
        assert!(NonBlockingPipe::switch(&format!("pipe:{fd}"), 0).is_none());
        assert!(blocking(fd));
    }
}
