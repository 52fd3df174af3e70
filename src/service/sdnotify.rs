//! systemd's notify protocol, spoken directly: one datagram per message to `$NOTIFY_SOCKET`
//! (`READY=1` once the store and devices are up, `WATCHDOG=1` from the scheduling loop,
//! `STOPPING=1`, `STATUS=…`). Outside systemd (no socket) every call does nothing.

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

/// Sends `message` to systemd; `false` when there is no notify socket or the send failed.
pub fn notify(message: &str) -> bool {
    let Some(socket) = std::env::var_os("NOTIFY_SOCKET") else { return false };
    let Ok(sender) = UnixDatagram::unbound() else { return false };
    // Never block the scheduling loop on a reader that is not reading: a message that does not fit
    // is dropped (the next watchdog ping comes soon).
    if sender.set_nonblocking(true).is_err() {
        return false;
    }
    let socket = socket.to_string_lossy().into_owned();
    let sent = match socket.strip_prefix('@') {
        Some(name) => abstract_address(name).and_then(|address| sender.send_to_addr(message.as_bytes(), &address)),
        None => sender.send_to(message.as_bytes(), &socket),
    };
    sent.is_ok()
}

fn abstract_address(name: &str) -> std::io::Result<std::os::unix::net::SocketAddr> {
    use std::os::linux::net::SocketAddrExt;
    std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())
}

/// How often to ping the watchdog: half of `$WATCHDOG_USEC`, when it is set for this process.
pub fn watchdog_interval() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    if let Some(pid) = std::env::var("WATCHDOG_PID").ok().and_then(|p| p.parse::<u32>().ok())
        && pid != std::process::id()
    {
        return None;
    }
    Some(Duration::from_micros(usec / 2).max(Duration::from_millis(100)))
}
