//! The access log: one event per decision and one per tunnel close, under the `access` target.
//!
//! Events go through `tracing`, so the subscriber `main` installs decides the format (JSON by
//! default, one object per line) and `PORTCULLIS_LOG` filters them like any other target.

use std::net::SocketAddr;
use std::time::Duration;

use crate::dns::CachePath;
use crate::error::{Outcome, Reason};
use crate::tunnel::Totals;

/// Everything known about one request when it is decided.
#[derive(Debug, Clone)]
pub struct Entry {
    pub client: SocketAddr,
    /// The authenticated user, when `[auth]` is on.
    pub user: String,
    /// The verified client certificate's name, on a mutual-TLS listener.
    pub client_cert: String,
    pub host: String,
    pub port: u16,
    pub rule: String,
    pub resolved: Option<SocketAddr>,
    pub dns: Option<CachePath>,
    /// The server name of the tunnel's ClientHello, when it was read.
    pub sni: String,
}

impl Entry {
    pub fn new(client: SocketAddr) -> Entry {
        Entry {
            client,
            user: String::new(),
            client_cert: String::new(),
            host: String::new(),
            port: 0,
            rule: String::new(),
            resolved: None,
            dns: None,
            sni: String::new(),
        }
    }

    /// Logs the decision: `reason` is `None` for a tunnel that opened.
    pub fn decision(&self, reason: Option<Reason>) {
        let (outcome, reason_label) = match reason {
            None => (Outcome::Allowed, ""),
            Some(reason) => (reason.outcome(), reason.as_str()),
        };
        tracing::info!(
            target: "access",
            event = "decision",
            client = %self.client,
            user = %self.user,
            client_cert = %self.client_cert,
            host = %self.host,
            port = self.port,
            rule = %self.rule,
            outcome = outcome.as_str(),
            reason = reason_label,
            resolved = %Blank(self.resolved),
            dns = self.dns.map_or("", CachePath::as_str),
            sni = %self.sni,
        );
    }

    pub fn closed(&self, totals: &Totals, duration: Duration) {
        tracing::info!(
            target: "access",
            event = "tunnel_closed",
            client = %self.client,
            user = %self.user,
            host = %self.host,
            port = self.port,
            rule = %self.rule,
            outcome = "allowed",
            end = totals.end.as_str(),
            resolved = %Blank(self.resolved),
            dns = self.dns.map_or("", CachePath::as_str),
            sni = %self.sni,
            bytes_upstream = totals.upstream,
            bytes_downstream = totals.downstream,
            duration_ms = duration.as_millis() as u64,
        );
    }
}

/// An address, or nothing at all (not `None`) when there is none; formatted without a
/// `String` in between, since this is on every tunnel's path.
struct Blank(Option<SocketAddr>);

impl std::fmt::Display for Blank {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(addr) => addr.fmt(f),
            None => Ok(()),
        }
    }
}

/// A connection turned away before any request was decided (limit, client ACL, header timeout).
pub fn rejected(client: SocketAddr, reason: Reason) {
    tracing::info!(
        target: "access",
        event = "rejected",
        client = %client,
        outcome = reason.outcome().as_str(),
        reason = reason.as_str(),
    );
}
