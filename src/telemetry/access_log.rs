//! The access log: one event per decision and one per tunnel close, under the `access` target.
//!
//! Events go through `tracing`, so the subscriber `main` installs decides the format (JSON by
//! default, one object per line) and `PORTCULLIS_LOG` filters them like any other target.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::connect::ClientInfo;
use crate::dns::CachePath;
use crate::error::{Outcome, Reason};
use crate::net::proxy_protocol::Refused;
use crate::tunnel::Totals;

/// Everything known about one request when it is decided.
#[derive(Debug, Clone)]
pub struct Entry {
    pub client: SocketAddr,
    /// The load balancer in front, when a PROXY header named the client.
    pub via: Option<SocketAddr>,
    /// The VPC endpoint an AWS NLB received the connection on.
    pub vpce_id: Option<Arc<str>>,
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
    /// The metrics' `domain` label when it is not the host: the pattern the rule matched, for a
    /// rule whose `domain_label` is `rule_pattern`. Not logged: `host` and `rule` say more.
    pub counted_as: Option<String>,
}

impl Entry {
    pub fn new(client: &ClientInfo) -> Entry {
        Entry {
            client: client.addr,
            via: client.via,
            vpce_id: client.vpce_id.clone(),
            user: String::new(),
            client_cert: client.cert.as_deref().unwrap_or("").to_string(),
            host: String::new(),
            port: 0,
            rule: String::new(),
            resolved: None,
            dns: None,
            sni: String::new(),
            counted_as: None,
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
            via = %Blank(self.via),
            vpce_id = self.vpce_id.as_deref().unwrap_or(""),
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
            via = %Blank(self.via),
            vpce_id = self.vpce_id.as_deref().unwrap_or(""),
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

/// A connection whose PROXY header was refused: logged under the connection's own address,
/// since nothing in the header is believed.
pub fn proxy_header_refused(connection: SocketAddr, refused: Refused) {
    let detail = match refused {
        Refused::Invalid(invalid) => invalid.to_string(),
        other => other.as_str().to_string(),
    };
    tracing::info!(
        target: "access",
        event = "rejected",
        client = %connection,
        outcome = Reason::BadRequest.outcome().as_str(),
        reason = Reason::BadRequest.as_str(),
        detail = %detail,
    );
}
