//! TCP keepalive on both legs of a tunnel.
//!
//! An AWS NLB forgets an idle TCP flow after 350 s, and corporate firewalls and NAT after
//! their own timers, without telling either end. A streaming session that goes quiet (the
//! user reads a document) is then dead while both sockets still look open, and the next
//! frame vanishes. Keepalive probes after `[proxy] tcp_keepalive` of silence keep those
//! middleboxes' state warm and, if the path really is gone, end the tunnel instead of
//! leaving it hanging until `idle_timeout`.
//!
//! Client sockets inherit the options from their listening socket (Linux copies them when the
//! handshake completes), so setting the listener once saves four system calls per
//! connection; origin sockets get them after connecting. A listener is set before its accept
//! loop starts and again when a reload changes the value: connections that completed their
//! handshake before that keep what they were accepted with, as open tunnels keep their config.

use std::io;
use std::os::fd::AsFd;
use std::time::Duration;

use rustix::net::sockopt;

/// The longest gap between probes. With [`PROBES`] unanswered probes the kernel gives up, so
/// a dead path is noticed about a minute after the first probe.
pub const MAX_INTERVAL: Duration = Duration::from_secs(15);
/// Unanswered probes before the kernel closes the connection.
pub const PROBES: u32 = 4;
/// `TCP_KEEPIDLE`'s ceiling in the kernel (seconds).
pub const MAX_IDLE: Duration = Duration::from_secs(32_767);

/// The keepalive a socket should carry: `None` is off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeepAlive {
    pub idle: Option<Duration>,
}

impl KeepAlive {
    /// Probes every `min(idle, 15 s)`: a short idle (a lab, a test) probes as often as it
    /// asks to, a long one never waits more than 15 s between probes.
    pub fn interval(&self) -> Option<Duration> {
        self.idle.map(|idle| idle.min(MAX_INTERVAL))
    }

    /// Sets (or clears) the options on one socket, listening or connected. The caller decides
    /// what a failure means.
    pub fn apply(&self, socket: impl AsFd) -> io::Result<()> {
        let socket = socket.as_fd();
        let (Some(idle), Some(interval)) = (self.idle, self.interval()) else {
            return sockopt::set_socket_keepalive(socket, false).map_err(Into::into);
        };
        sockopt::set_tcp_keepidle(socket, idle)?;
        sockopt::set_tcp_keepintvl(socket, interval)?;
        sockopt::set_tcp_keepcnt(socket, PROBES)?;
        sockopt::set_socket_keepalive(socket, true)?;
        Ok(())
    }
}

/// Sets a listening socket, so the connections it accepts inherit `keepalive`. A failure is
/// logged: the proxy serves on, without keepalive on that listener's clients.
pub fn listening(listener: impl AsFd, keepalive: KeepAlive) {
    if let Err(e) = keepalive.apply(listener) {
        tracing::warn!(error = %e, "cannot set TCP keepalive on a listening socket");
    }
}
