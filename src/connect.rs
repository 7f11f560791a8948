//! One CONNECT request: authority, rules, resolve, destination check, dial, then 200.
//!
//! The origin is connected *before* the client hears 200, so a dead origin is a 502 with a
//! reason rather than a tunnel that silently drops (hyper's `http_proxy` example answers first).
//! Every exit goes through [`Reason::response`] and is logged and counted once, here.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::access_log::Entry;
use crate::dns::{CachePath, DnsFailure};
use crate::error::Reason;
use crate::metrics::{DomainMetrics, INVALID};
use crate::prefixed::Prefixed;
use crate::rules::{self, Host, Verdict};
use crate::state::{Runtime, Shared};
use crate::tunnel::{self, Counters};

/// Answers one request on a client connection.
pub async fn handle(
    mut request: Request<Incoming>,
    shared: Arc<Shared>,
    client: SocketAddr,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let runtime = shared.runtime();
    let mut entry = Entry::new(client);
    let (domain, result) = admit(&request, &runtime, &shared, &mut entry).await;
    match result {
        Ok(upstream) => {
            let upgrade = hyper::upgrade::on(&mut request);
            shared.metrics.request(domain.label(), &entry.rule, None);
            entry.decision(None);
            let idle = runtime.config.proxy.idle_timeout;
            open_tunnel(shared.clone(), upgrade, upstream, domain, entry, idle);
            Ok(Response::builder()
                .status(StatusCode::OK)
                .body(Full::new(Bytes::new()))
                .expect("static response parts are valid"))
        }
        Err(reason) => {
            shared
                .metrics
                .request(domain.label(), &entry.rule, Some(reason));
            entry.decision(Some(reason));
            Ok(reason.response())
        }
    }
}

/// The label a request is counted under: allowed-domain handles once a rule matched, else the
/// refused-name budget.
enum Domain {
    Matched(Arc<DomainMetrics>),
    Refused(String),
}

impl Domain {
    fn label(&self) -> &str {
        match self {
            Domain::Matched(handles) => &handles.label,
            Domain::Refused(label) => label,
        }
    }
}

/// Decides a request; on success the origin is already connected.
async fn admit(
    request: &Request<Incoming>,
    runtime: &Runtime,
    shared: &Shared,
    entry: &mut Entry,
) -> (Domain, Result<TcpStream, Reason>) {
    let metrics = &shared.metrics;
    let refused = |host: &str, reason| {
        let label = if host.is_empty() {
            INVALID.to_string()
        } else {
            metrics.refused_label(host)
        };
        (Domain::Refused(label), Err(reason))
    };
    let authority = request.uri().authority().map(|a| a.as_str()).unwrap_or("");
    if request.method() != Method::CONNECT {
        let host = request.uri().host().unwrap_or("").to_ascii_lowercase();
        entry.host = host.clone();
        return refused(&host, Reason::MethodNotAllowed);
    }
    let (host, port) = match rules::parse_authority(authority) {
        Ok((Host::Name(name), port)) => (name, port),
        Ok((Host::Ip(ip), port)) => {
            entry.host = ip.to_string();
            entry.port = port;
            return refused(&entry.host.clone(), Reason::IpLiteral);
        }
        Err(reason) => {
            let raw = authority.rsplit_once(':').map_or(authority, |(h, _)| h);
            entry.host = raw.to_string();
            let label = if reason == Reason::IpLiteral { raw } else { "" };
            return refused(&label.to_ascii_lowercase(), reason);
        }
    };
    entry.host = host.clone();
    entry.port = port;
    let rule = match runtime.config.rules.check(&host, port) {
        Verdict::Allowed(rule) => rule,
        Verdict::PortNotAllowed(rule) => {
            entry.rule = rule.name.clone();
            let handles = metrics.domain(&host);
            return (Domain::Matched(handles), Err(Reason::PortNotAllowed));
        }
        Verdict::NoRule => return refused(&host, Reason::DomainNotAllowed),
    };
    entry.rule = rule.name.clone();
    let handles = metrics.domain(&host);
    let started = Instant::now();
    let path = if rule.private_endpoint {
        CachePath::Bypass
    } else {
        CachePath::Cached
    };
    entry.dns = Some(path);
    let timeout = runtime.config.proxy.connect_timeout;
    let dialed = tokio::time::timeout(
        timeout,
        dial(
            runtime,
            shared,
            &host,
            port,
            path,
            rule.private_endpoint,
            entry,
            started + timeout,
        ),
    )
    .await
    .unwrap_or(Err(Reason::UpstreamTimeout));
    if dialed.is_ok() {
        handles
            .upstream_connect
            .observe(started.elapsed().as_secs_f64());
    }
    (Domain::Matched(handles), dialed)
}

/// Resolves, filters by destination policy, and connects to the first address that answers.
#[allow(clippy::too_many_arguments)]
async fn dial(
    runtime: &Runtime,
    shared: &Shared,
    host: &str,
    port: u16,
    path: CachePath,
    private_endpoint: bool,
    entry: &mut Entry,
    deadline: Instant,
) -> Result<TcpStream, Reason> {
    let resolved = runtime.resolver.resolve(host, path).await;
    let result = match &resolved {
        Ok(_) => "ok",
        Err(DnsFailure::NoSuchName) => "nxdomain",
        Err(DnsFailure::Failed(_)) => "error",
    };
    shared.metrics.dns_lookup(path.as_str(), result);
    let addrs = resolved.map_err(|failure| {
        tracing::debug!(host, %failure, "dns lookup failed");
        match failure {
            DnsFailure::NoSuchName => Reason::DnsNxdomain,
            DnsFailure::Failed(_) => Reason::DnsError,
        }
    })?;
    let permitted: Vec<IpAddr> = interleave_families(addrs)
        .into_iter()
        .filter(|&addr| {
            let ok = runtime.policy.check(addr, private_endpoint).is_ok();
            if !ok {
                entry.resolved.get_or_insert(SocketAddr::new(addr, port));
                tracing::debug!(host, %addr, "resolved address refused by destination policy");
            }
            ok
        })
        .collect();
    if permitted.is_empty() {
        return Err(Reason::DestinationNotAllowed);
    }
    entry.resolved = None;
    connect_any(&permitted, port, deadline, entry).await
}

/// Tries each address in turn; each attempt gets a fair share of the time left, so one
/// black-holed address cannot eat the whole `connect_timeout`.
async fn connect_any(
    addrs: &[IpAddr],
    port: u16,
    deadline: Instant,
    entry: &mut Entry,
) -> Result<TcpStream, Reason> {
    for (i, &ip) in addrs.iter().enumerate() {
        let addr = SocketAddr::new(ip, port);
        entry.resolved = Some(addr);
        let left = deadline.saturating_duration_since(Instant::now());
        let share = left / (addrs.len() - i) as u32;
        match tokio::time::timeout(
            share.max(Duration::from_millis(1)),
            TcpStream::connect(addr),
        )
        .await
        {
            Ok(Ok(stream)) => {
                let _ = stream.set_nodelay(true);
                return Ok(stream);
            }
            Ok(Err(e)) => tracing::debug!(%addr, error = %e, "connect failed"),
            Err(_) if i + 1 == addrs.len() => return Err(Reason::UpstreamTimeout),
            Err(_) => tracing::debug!(%addr, "connect timed out; trying the next address"),
        }
    }
    Err(Reason::UpstreamUnreachable)
}

/// Alternates address families, starting with the family DNS listed first (RFC 8305 §4).
fn interleave_families(addrs: Vec<IpAddr>) -> Vec<IpAddr> {
    let first_v6 = addrs.first().is_some_and(IpAddr::is_ipv6);
    let (mut a, mut b): (Vec<IpAddr>, Vec<IpAddr>) =
        addrs.into_iter().partition(|ip| ip.is_ipv6() == first_v6);
    let mut out = Vec::with_capacity(a.len() + b.len());
    a.reverse();
    b.reverse();
    while !a.is_empty() || !b.is_empty() {
        out.extend(a.pop());
        out.extend(b.pop());
    }
    out
}

/// Spawns the tunnel task: waits for hyper to hand over the connection, then relays.
fn open_tunnel(
    shared: Arc<Shared>,
    upgrade: hyper::upgrade::OnUpgrade,
    upstream: TcpStream,
    domain: Domain,
    entry: Entry,
    idle_timeout: Duration,
) {
    let Domain::Matched(handles) = domain else {
        return;
    };
    let active = ActiveTunnel::new(handles);
    let tasks = shared.tasks.clone();
    tasks.spawn(async move {
        let started = Instant::now();
        let (client, early) = match upgrade.await {
            Ok(upgraded) => match upgraded.downcast::<TokioIo<Prefixed>>() {
                Ok(parts) => {
                    let (stream, unread) = parts.io.into_inner().into_parts();
                    let mut early = bytes::BytesMut::from(&parts.read_buf[..]);
                    early.extend_from_slice(&unread);
                    (stream, early.freeze())
                }
                Err(_) => {
                    tracing::error!("upgraded connection is not the expected type");
                    return;
                }
            },
            Err(e) => {
                tracing::debug!(error = %e, "client went away before the tunnel opened");
                return;
            }
        };
        let handles = &active.0;
        let counters = Counters {
            upstream: &handles.bytes_upstream,
            downstream: &handles.bytes_downstream,
        };
        let totals = tunnel::relay(
            tunnel::Mode::best(),
            client,
            early,
            upstream,
            idle_timeout,
            counters,
            &shared.abort,
        )
        .await;
        let duration = started.elapsed();
        handles.tunnel_duration.observe(duration.as_secs_f64());
        entry.closed(&totals, duration);
    });
}

/// Holds `tunnels_active` up for exactly as long as the tunnel task lives, however it ends.
struct ActiveTunnel(Arc<DomainMetrics>);

impl ActiveTunnel {
    fn new(handles: Arc<DomainMetrics>) -> ActiveTunnel {
        handles.tunnels_active.inc();
        ActiveTunnel(handles)
    }
}

impl Drop for ActiveTunnel {
    fn drop(&mut self) {
        self.0.tunnels_active.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_alternate_starting_with_the_first() {
        let v = |s: &str| s.parse::<IpAddr>().unwrap();
        let out = interleave_families(vec![
            v("::1"),
            v("::2"),
            v("1.1.1.1"),
            v("2.2.2.2"),
            v("3.3.3.3"),
        ]);
        assert_eq!(
            out,
            vec![v("::1"), v("1.1.1.1"), v("::2"), v("2.2.2.2"), v("3.3.3.3")]
        );
    }
}
