//! Pipes a stream reads or writes (`pipe:N`, `-` on the command line) are made non-blocking while
//! the stream uses them. FFmpeg's pipe protocol then waits for data, or for room, in its own retry
//! loop, which asks the stream's interrupt callback about every millisecond, instead of in a `read`
//! or `write` that only a signal ends (and impasto's handler restarts those). So a stop request ends
//! a wait on a silent input pipe, and an abort a send to a reader that stopped reading, as they do
//! on a network connection. The descriptor's flags are given back when the stream closes.

use std::os::fd::RawFd;

/// A pipe switched to non-blocking; its flags as they were come back on drop.
#[derive(Debug)]
pub(crate) struct NonBlockingPipe {
    fd: RawFd,
    flags: libc::c_int,
}

impl NonBlockingPipe {
    /// Switches the descriptor FFmpeg's `location` names (`pipe:N`, or `pipe:` for `default_fd`)
    /// when it is a pipe or a socket. None for any other location, a terminal or a file, and for a
    /// pipe that standard input, output or error also use (log lines to a non-blocking pipe could
    /// fail).
    pub(crate) fn switch(location: &str, default_fd: RawFd) -> Option<Self> {
        let fd = pipe_descriptor(location, default_fd)?;
        let identity = pipe_identity(fd)?;
        let shared = (0..=2).filter(|&other| other != fd).any(|other| file_identity(other) == Some(identity));
        if shared {
            tracing::debug!(fd, "the pipe is shared with another standard stream; left blocking");
            return None;
        }
        // SAFETY: fcntl on a descriptor that fstat just found open; only its status flags change.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
        if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
            return None;
        }
        Some(NonBlockingPipe { fd, flags })
    }
}

impl Drop for NonBlockingPipe {
    fn drop(&mut self) {
        // SAFETY: gives the descriptor back the status flags it had; harmless if it was closed since.
        unsafe { libc::fcntl(self.fd, libc::F_SETFL, self.flags) };
    }
}

/// The descriptor of `pipe:N` (`pipe:` alone: `default_fd`), as FFmpeg's pipe protocol reads it.
fn pipe_descriptor(location: &str, default_fd: RawFd) -> Option<RawFd> {
    let number = location.strip_prefix("pipe:")?;
    if number.is_empty() {
        return Some(default_fd);
    }
    number.parse().ok().filter(|fd: &RawFd| *fd >= 0)
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
    fn pipe_locations_name_their_descriptor() {
        assert_eq!(pipe_descriptor("pipe:", 0), Some(0));
        assert_eq!(pipe_descriptor("pipe:", 1), Some(1));
        assert_eq!(pipe_descriptor("pipe:7", 0), Some(7));
        assert_eq!(pipe_descriptor("pipe:x", 0), None);
        assert_eq!(pipe_descriptor("tcp://host:1", 0), None);
        assert_eq!(pipe_descriptor("pipe.ts", 0), None);
    }

    #[test]
    fn a_pipe_is_non_blocking_while_switched_and_as_it_was_after() {
        let (reader, _writer) = std::io::pipe().unwrap();
        let fd = reader.as_raw_fd();
        assert!(blocking(fd));
        let switched = NonBlockingPipe::switch(&format!("pipe:{fd}"), 0).expect("a pipe is switched");
        assert!(!blocking(fd));
        drop(switched);
        assert!(blocking(fd));
    }

    #[test]
    fn a_file_is_left_as_it_is() {
        let file = tempfile::tempfile().unwrap();
        let fd = file.as_raw_fd();
        assert!(NonBlockingPipe::switch(&format!("pipe:{fd}"), 0).is_none());
        assert!(blocking(fd));
    }
}
