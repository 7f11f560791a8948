//! What portcullis does at the TCP level, below HTTP: who the client is behind a load
//! balancer ([`proxy_protocol`]) and keeping quiet connections alive through NAT and
//! firewalls ([`keepalive`]).

pub mod keepalive;
pub mod proxy_protocol;

use std::os::fd::AsFd;

/// Sets a listening socket up before it accepts: the options its connections inherit
/// (Linux copies them from the listener when a handshake completes), so each accepted
/// connection needs no system calls of its own for them. `TCP_NODELAY`, because a tunnel
/// relays small frames that must not wait for an ACK; keepalive, see [`keepalive`].
/// Failures are logged: the proxy serves on without the option.
pub fn prepare_listener(listener: impl AsFd, keepalive: keepalive::KeepAlive) {
    let listener = listener.as_fd();
    if let Err(e) = rustix::net::sockopt::set_tcp_nodelay(listener, true) {
        tracing::warn!(error = %e, "cannot set TCP_NODELAY on a listening socket");
    }
    keepalive::listening(listener, keepalive);
}
