//! One CONNECT request: authority, rules, resolve, destination check, dial, then 200.
//!
//! The origin is connected *before* the client hears 200, so a dead origin is a 502 with a
//! reason rather than a tunnel that silently drops (hyper's `http_proxy` example answers first).
//! Every exit goes through [`Reason::response`] and is logged and counted once, here.
//!
//! The steps that decide without touching a socket ([`parse_target`], [`require_name`],
//! [`rule_decision`], [`dns_path`], [`dns_refusal`], [`dial_order`], [`may_connect`]) are public
//! functions, so `portcullis explain` reaches its verdict through the very same code.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::ext::ReasonPhrase;
use hyper::header::PROXY_AUTHORIZATION;
use hyper::{Method, Request, Response, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use prometheus::Histogram;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;

use crate::auth::{Authenticator, Denied};
use crate::config::MetricsConfig;
use crate::destination::Policy;
use crate::dns::{CachePath, DnsFailure};
use crate::error::Reason;
use crate::ip_ranges::IpRanges;
use crate::net::proxy_protocol::Header;
use crate::prefixed::{ClientStream, Prefixed};
use crate::rules::{self, DomainLabel, Host, Rule, SniMode, Verdict};
use crate::sni::{self, Hello};
use crate::state::{ClientSlot, Runtime, Shared};
use crate::telemetry::OpenTunnel;
use crate::telemetry::access_log::Entry;
use crate::telemetry::metrics::{DomainMetrics, INVALID, Metrics};
use crate::tunnel::task::{self as tunnel_task, ActiveTunnel, Ends, Live};

/// Who is on the other end of a client connection.
#[derive(Debug, Clone)]
pub struct ClientInfo {
    /// The client: the connection's peer, or the one a trusted PROXY header names.
    pub addr: SocketAddr,
    /// The verified client certificate's name, on a mutual-TLS listener.
    pub cert: Option<Arc<str>>,
    /// The load balancer the connection came through, when a PROXY header named the client.
    pub via: Option<SocketAddr>,
    /// The VPC endpoint an AWS NLB received the connection on (PrivateLink).
    pub vpce_id: Option<Arc<str>>,
}

impl ClientInfo {
    /// The client of a connection from `peer`, after its PROXY header if it sent one. A
    /// header without a usable address (a `LOCAL` health check, `UNKNOWN`) leaves `peer`.
    pub fn behind(peer: SocketAddr, header: Option<Header>) -> ClientInfo {
        let mut client = ClientInfo {
            addr: peer,
            cert: None,
            via: None,
            vpce_id: None,
        };
        if let Some(header) = header {
            if let Some(source) = header.source {
                client.addr = unmapped(source);
                client.via = Some(peer);
            }
            client.vpce_id = header.vpce_id.map(Arc::from);
        }
        client
    }
}

/// IPv4 clients on a dual-stack socket (or in a v6 PROXY header) arrive as `::ffff:a.b.c.d`;
/// ACLs, limits and logs speak IPv4.
pub fn unmapped(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(v4.into(), addr.port()),
            None => addr,
        },
        IpAddr::V4(_) => addr,
    }
}

/// Answers one request on a client connection.
pub async fn handle(
    mut request: Request<Incoming>,
    shared: Arc<Shared>,
    client: ClientInfo,
    permit: ConnectionPermit,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let runtime = shared.runtime();
    let mut entry = Entry::new(&client);
    let decided = admit(&request, &runtime, &shared, &mut entry).await;
    let domain = label(&shared.metrics, &entry, decided.as_ref().err());
    match decided {
        Ok(admitted) => {
            let upgrade = hyper::upgrade::on(&mut request);
            if admitted.sni != SniMode::Enforce {
                // Under `enforce` the decision is final only once the ClientHello is read.
                record(&shared, domain.label(), &entry, None);
            }
            let timeouts = Timeouts {
                idle: runtime.config.proxy.idle_timeout,
                hello: runtime.config.proxy.header_timeout,
            };
            if let Domain::Matched(handles) = domain {
                let latency = shared.metrics.latency(&entry.rule, &handles);
                latency.upstream_connect.observe(admitted.connect_seconds);
                let permit = permit.lock().unwrap_or_else(|e| e.into_inner()).take();
                let tunnel = Tunnel {
                    admitted,
                    active: ActiveTunnel::new(handles),
                    tunnel_duration: latency.tunnel_duration,
                    entry,
                    timeouts,
                    permit,
                };
                open_tunnel(shared.clone(), upgrade, tunnel);
            }
            Ok(Response::builder()
                .status(StatusCode::OK)
                .extension(ReasonPhrase::from_static(b"Connection established"))
                .body(Full::new(Bytes::new()))
                .expect("static response parts are valid"))
        }
        Err(reason) => {
            record(&shared, domain.label(), &entry, Some(reason));
            Ok(reason.response())
        }
    }
}

/// Counts, logs and (for a refusal) shows on the status page one decision.
fn record(shared: &Shared, label: &str, entry: &Entry, reason: Option<Reason>) {
    shared.metrics.request(label, &entry.rule, reason);
    entry.decision(reason);
    if let Some(reason) = reason {
        let refusals = &shared.status.refusals;
        refusals.record(
            entry.client,
            &entry.host,
            entry.port,
            reason.as_str(),
            &entry.rule,
        );
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

/// Only a tunnel that opens earns a host label from the allowed-domain budget; everything
/// refused or failed (even for a host that matched a rule) draws on the refused budget, unless
/// the host already has a label. Otherwise made-up names under an allowed wildcard could fill
/// `max_domains` and push real gateways into `_other`. A rule pattern (`counted_as`) is
/// labelled whatever the outcome: the config bounds how many there are.
fn label(metrics: &Metrics, entry: &Entry, reason: Option<&Reason>) -> Domain {
    match (reason, &entry.counted_as) {
        (None, Some(pattern)) => Domain::Matched(metrics.domain(pattern)),
        (None, None) => Domain::Matched(metrics.domain(&entry.host)),
        (Some(Reason::BadRequest | Reason::AuthRequired | Reason::AuthFailed), _) => {
            Domain::Refused(INVALID.to_string())
        }
        (Some(_), Some(pattern)) => Domain::Refused(metrics.domain(pattern).label.clone()),
        (Some(_), None) if entry.host.is_empty() => Domain::Refused(INVALID.to_string()),
        (Some(_), None) => Domain::Refused(metrics.refused_label(&entry.host)),
    }
}

/// What a request that `rule` matched through `pattern` counts under instead of its host, if
/// anything.
fn counted_as(rule: &Rule, pattern: Option<&str>, settings: &MetricsConfig) -> Option<String> {
    match rule.domain_label.unwrap_or(settings.domain_label) {
        DomainLabel::Host => None,
        DomainLabel::RulePattern => pattern.map(str::to_string),
    }
}

/// A tunnel about to open: the origin is connected and the client's slot is taken.
struct Admitted {
    upstream: TcpStream,
    slot: ClientSlot,
    connect_seconds: f64,
    sni: SniMode,
}

/// The client connection's `max_connections` permit, handed to the tunnel that replaces it.
pub type ConnectionPermit = Arc<std::sync::Mutex<Option<OwnedSemaphorePermit>>>;

/// Everything a tunnel task owns.
struct Tunnel {
    admitted: Admitted,
    /// Holds `tunnels_active` up from the 200 on.
    active: ActiveTunnel,
    /// `tunnel_duration_seconds`, for the tunnel's rule (and domain, with `domain_histograms`).
    tunnel_duration: Histogram,
    entry: Entry,
    timeouts: Timeouts,
    permit: Option<OwnedSemaphorePermit>,
}

/// The limits a tunnel task runs under, copied from the config it was admitted by.
struct Timeouts {
    idle: Duration,
    /// How long the client has to send its ClientHello (the same budget as a request head).
    hello: Duration,
}

/// Decides a request, filling in `entry` as it learns. On success the origin is connected.
async fn admit(
    request: &Request<Incoming>,
    runtime: &Runtime,
    shared: &Shared,
    entry: &mut Entry,
) -> Result<Admitted, Reason> {
    if request.method() != Method::CONNECT {
        let uri = request.uri();
        entry.host = uri.host().unwrap_or("").to_ascii_lowercase();
        entry.port = uri.port_u16().unwrap_or(match uri.scheme_str() {
            Some("https") => 443,
            Some("http") => 80,
            _ => 0,
        });
        return Err(Reason::MethodNotAllowed);
    }
    if let Some(auth) = &runtime.auth {
        authenticate(auth, request, entry).await?;
    }
    let (host, port) = target(request, entry)?;
    let (verdict, pattern) = runtime.config.rules.check_matched(&host, port);
    if let Verdict::Allowed(rule) | Verdict::PortNotAllowed(rule) = verdict {
        entry.rule = rule.name.clone();
        entry.counted_as = counted_as(rule, pattern, &runtime.config.metrics);
    }
    let rule = rule_decision(verdict)?;
    let slot = shared
        .client_slot(entry.client.ip(), runtime.config.max_tunnels_per_client)
        .ok_or(Reason::TooManyTunnels)?;
    let path = dns_path(rule);
    entry.dns = Some(path);
    let started = Instant::now();
    let timeout = runtime.config.proxy.connect_timeout;
    let dial = dial(runtime, shared, &host, port, rule, entry, started + timeout);
    let upstream = tokio::time::timeout(timeout, dial)
        .await
        .unwrap_or(Err(Reason::UpstreamTimeout))?;
    Ok(Admitted {
        upstream,
        slot,
        connect_seconds: started.elapsed().as_secs_f64(),
        sni: rule.sni,
    })
}

async fn authenticate(
    auth: &Authenticator,
    request: &Request<Incoming>,
    entry: &mut Entry,
) -> Result<(), Reason> {
    let header = request
        .headers()
        .get(PROXY_AUTHORIZATION)
        .map(|value| value.as_bytes());
    match auth.check(header).await {
        Ok(user) => {
            entry.user = user;
            Ok(())
        }
        Err(Denied::Missing) => Err(Reason::AuthRequired),
        Err(Denied::Invalid) => Err(Reason::AuthFailed),
    }
}

/// The CONNECT target as a validated, lowercased name and a port, noted in `entry`.
fn target(request: &Request<Incoming>, entry: &mut Entry) -> Result<(String, u16), Reason> {
    let uri = request.uri();
    let (host, port) = match parse_target(uri) {
        Ok(target) => target,
        Err(reason) => {
            entry.host = unparsed_host(uri);
            return Err(reason);
        }
    };
    entry.host = match &host {
        Host::Name(name) => name.clone(),
        Host::Ip(ip) => ip.to_string(),
    };
    entry.port = port;
    Ok((require_name(host)?, port))
}

/// Reads a CONNECT request-target. Only the authority form (`host:port`) is a CONNECT target
/// (RFC 9110, 9.3.6); a URL with a scheme or path is a 400. IP literals come back as such
/// ([`require_name`] refuses them), numeric names an `inet_aton` would read as addresses are
/// refused here (`ip_literal`), and everything else that is not a DNS name is a 400.
pub fn parse_target(uri: &Uri) -> Result<(Host, u16), Reason> {
    if uri.scheme().is_some() || uri.path_and_query().is_some() {
        return Err(Reason::BadRequest);
    }
    rules::parse_authority(uri.authority().map_or("", |a| a.as_str()))
}

/// An IP literal matches no domain rule: only names go on to the rules.
pub fn require_name(host: Host) -> Result<String, Reason> {
    match host {
        Host::Name(name) => Ok(name),
        Host::Ip(_) => Err(Reason::IpLiteral),
    }
}

/// The host of a target [`parse_target`] refused, as far as it can be read, for the log.
fn unparsed_host(uri: &Uri) -> String {
    if uri.scheme().is_some() || uri.path_and_query().is_some() {
        let host = uri.host().unwrap_or("");
        return host
            .rsplit_once('@')
            .map_or(host, |(_, h)| h)
            .to_ascii_lowercase();
    }
    let authority = uri.authority().map_or("", |a| a.as_str());
    // Whatever sat before an `@` may be credentials: never log it.
    let raw = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let raw = raw.rsplit_once(':').map_or(raw, |(h, _)| h);
    raw.to_ascii_lowercase()
}

/// The rules' verdict as a decision: the rule the request goes on with, or the refusal.
pub fn rule_decision(verdict: Verdict<'_>) -> Result<&Rule, Reason> {
    match verdict {
        Verdict::Allowed(rule) => Ok(rule),
        Verdict::PortNotAllowed(_) => Err(Reason::PortNotAllowed),
        Verdict::NoRule => Err(Reason::DomainNotAllowed),
    }
}

/// How a rule's names are resolved: never from a cache for a private endpoint.
pub fn dns_path(rule: &Rule) -> CachePath {
    if rule.private_endpoint {
        CachePath::Bypass
    } else {
        CachePath::Cached
    }
}

/// The reply a failed lookup earns.
pub fn dns_refusal(failure: &DnsFailure) -> Reason {
    match failure {
        DnsFailure::NoSuchName => Reason::DnsNxdomain,
        DnsFailure::Failed(_) => Reason::DnsError,
    }
}

/// May a tunnel admitted by `rule` connect to `addr`? The destination policy, then (for rules
/// with `require_ip_ranges`) AWS's published prefixes in `ranges`.
pub fn may_connect(policy: &Policy, ranges: Option<&IpRanges>, rule: &Rule, addr: IpAddr) -> bool {
    policy.check(addr, rule.private_endpoint).is_ok() && published(ranges, rule, addr)
}

/// Resolves, filters by destination policy, and connects to the first address that answers.
async fn dial(
    runtime: &Runtime,
    shared: &Shared,
    host: &str,
    port: u16,
    rule: &Rule,
    entry: &mut Entry,
    deadline: Instant,
) -> Result<TcpStream, Reason> {
    let path = entry.dns.unwrap_or(CachePath::Cached);
    let resolved = runtime.resolver.resolve(host, path).await;
    let result = match &resolved {
        Ok(_) => "ok",
        Err(DnsFailure::NoSuchName) => "nxdomain",
        Err(DnsFailure::Failed(_)) => "error",
    };
    shared.metrics.dns_lookup(path.as_str(), result);
    let addrs = resolved.map_err(|failure| {
        tracing::debug!(host, %failure, "dns lookup failed");
        dns_refusal(&failure)
    })?;
    let permitted: Vec<IpAddr> = {
        let ranges = shared.ip_ranges();
        dial_order(addrs)
            .into_iter()
            .filter(|&addr| {
                let ok = may_connect(&runtime.policy, ranges.as_deref(), rule, addr);
                if !ok {
                    entry.resolved.get_or_insert(SocketAddr::new(addr, port));
                    tracing::debug!(host, %addr, "resolved address refused by destination policy");
                }
                ok
            })
            .collect()
    };
    if permitted.is_empty() {
        return Err(Reason::DestinationNotAllowed);
    }
    entry.resolved = None;
    let stream = connect_any(&permitted, port, deadline, entry).await?;
    if let Err(e) = runtime.config.proxy.tcp_keepalive.apply(&stream) {
        tracing::debug!(error = %e, "cannot set TCP keepalive on an origin socket");
    }
    Ok(stream)
}

/// For rules with `require_ip_ranges`: is the address inside one of AWS's published prefixes
/// for those services, in the live set (`ranges`, which a refresh may have replaced since the
/// config was loaded)? Validation guarantees a set is loaded when a rule asks for one.
pub fn published(ranges: Option<&IpRanges>, rule: &Rule, addr: IpAddr) -> bool {
    if rule.require_ip_ranges.is_empty() {
        return true;
    }
    ranges.is_some_and(|ranges| ranges.contains(&rule.require_ip_ranges, addr))
}

/// Tries each address in turn; each attempt gets a fair share of the time left, so one
/// black-holed address cannot eat the whole `connect_timeout`. The last address has no timer
/// of its own: the caller's `connect_timeout` already bounds it, and a second timer costs
/// every tunnel (usually dialling its only address) a timer-wheel entry and, on a quiet
/// worker, a wake-up of its event loop.
async fn connect_any(
    addrs: &[IpAddr],
    port: u16,
    deadline: Instant,
    entry: &mut Entry,
) -> Result<TcpStream, Reason> {
    for (i, &ip) in addrs.iter().enumerate() {
        let addr = SocketAddr::new(ip, port);
        entry.resolved = Some(addr);
        let connected = if i + 1 == addrs.len() {
            TcpStream::connect(addr).await
        } else {
            let left = deadline.saturating_duration_since(Instant::now());
            let share = (left / (addrs.len() - i) as u32).max(Duration::from_millis(1));
            match tokio::time::timeout(share, TcpStream::connect(addr)).await {
                Ok(connected) => connected,
                Err(_) => {
                    tracing::debug!(%addr, "connect timed out; trying the next address");
                    continue;
                }
            }
        };
        match connected {
            Ok(stream) => {
                let _ = stream.set_nodelay(true);
                return Ok(stream);
            }
            Err(e) => tracing::debug!(%addr, error = %e, "connect failed"),
        }
    }
    Err(Reason::UpstreamUnreachable)
}

/// The order addresses are tried in: families alternate, starting with the family DNS listed
/// first (RFC 8305 §4).
pub fn dial_order(addrs: Vec<IpAddr>) -> Vec<IpAddr> {
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

/// Spawns the tunnel's opening: waits for hyper to hand over the connection, checks the
/// ClientHello, then spawns the relay as a task of its own and ends.
///
/// Two tasks rather than one because a task's memory is the largest state its future can
/// be in, for as long as it lives. The opening's state (hyper's upgrade, the ClientHello
/// read under a timeout) is larger than the relay's, and a streaming tunnel relays for
/// hours: as one task, every open tunnel kept pages of it resident.
fn open_tunnel(shared: Arc<Shared>, upgrade: hyper::upgrade::OnUpgrade, tunnel: Tunnel) {
    // Taken now, while the connection's own task still counts: an upgrade waits for this
    // tunnel from the moment it exists.
    let moving = shared.upgrade.movable.token();
    let tasks = shared.tasks.clone();
    tasks.spawn(async move {
        if let Some((live, entry, ends)) = opening(&shared, upgrade, tunnel).await {
            shared
                .tasks
                .spawn(tunnel_task::run(shared.clone(), live, entry, ends, moving));
        }
    });
}

/// A tunnel from the 200 to its first relayed byte: `None` when the client left or its
/// ClientHello was refused (logged and counted here).
async fn opening(
    shared: &Arc<Shared>,
    upgrade: hyper::upgrade::OnUpgrade,
    tunnel: Tunnel,
) -> Option<(Live, Entry, Ends)> {
    let Tunnel {
        admitted,
        active,
        tunnel_duration,
        mut entry,
        timeouts,
        permit,
    } = tunnel;
    let Admitted {
        upstream,
        slot,
        sni,
        ..
    } = admitted;
    let started = Instant::now();
    let open = shared.status.open.register(OpenTunnel::new(
        entry.client,
        &entry.host,
        entry.port,
        &entry.rule,
    ));
    let (mut client, early) = take_client(upgrade).await?;
    let early = if sni == SniMode::Enforce {
        let checked = enforce_sni(&mut client, early, timeouts.hello, &mut entry).await;
        record(
            shared,
            &active.0.label,
            &entry,
            checked.as_ref().err().copied(),
        );
        checked.ok()?
    } else {
        early
    };
    let live = Live {
        active,
        tunnel_duration,
        open,
        slot: Some(slot),
        permit,
        started,
        idle: timeouts.idle,
    };
    let ends = Ends {
        client,
        origin: upstream,
        early,
        sni,
    };
    Some((live, entry, ends))
}

/// Reads the ClientHello before a byte goes on (`sni = "enforce"`). Returns the bytes to
/// forward, or the reason the tunnel closes; a mismatch gets a TLS alert first.
async fn enforce_sni(
    client: &mut ClientStream,
    early: Bytes,
    within: Duration,
    entry: &mut Entry,
) -> Result<Bytes, Reason> {
    let (bytes, hello) = sni::read_hello(client, early, within).await;
    let verdict = judge_sni(hello, SniMode::Enforce, entry);
    if verdict == Err(Reason::SniMismatch) {
        let alert = client.write_all(&sni::ACCESS_DENIED_ALERT);
        let _ = tokio::time::timeout(Duration::from_secs(1), alert).await;
    }
    verdict.map(|()| bytes)
}

/// Compares the ClientHello's server name with the CONNECT host, noting the name in `entry`
/// and logging a tunnel that does not carry TLS for its host.
pub(crate) fn judge_sni(
    hello: Result<Hello, sni::ReadError>,
    mode: SniMode,
    entry: &mut Entry,
) -> Result<(), Reason> {
    let verdict = match hello {
        Ok(Hello::Tls(Some(name))) if name == entry.host => {
            entry.sni = name;
            return Ok(());
        }
        Ok(Hello::Tls(name)) => {
            entry.sni = name.unwrap_or_default();
            Reason::SniMismatch
        }
        Ok(Hello::NotTls) | Err(_) => Reason::NotTls,
    };
    tracing::warn!(
        client = %entry.client,
        host = %entry.host,
        sni = %entry.sni,
        reason = verdict.as_str(),
        enforced = mode == SniMode::Enforce,
        "tunnel does not carry TLS for the host it CONNECTed to"
    );
    Err(verdict)
}

/// Waits for hyper to hand the connection over; returns the raw socket and every byte the
/// client sent behind its CONNECT head (hyper's read buffer first, then what it never read).
async fn take_client(upgrade: hyper::upgrade::OnUpgrade) -> Option<(ClientStream, Bytes)> {
    let upgraded = match upgrade.await {
        Ok(upgraded) => upgraded,
        Err(e) => {
            tracing::debug!(error = %e, "client went away before the tunnel opened");
            return None;
        }
    };
    let Ok(parts) = upgraded.downcast::<TokioIo<Prefixed>>() else {
        tracing::error!("upgraded connection is not the expected type");
        return None;
    };
    let (stream, unread) = parts.io.into_inner().into_parts();
    forget_reader(&stream);
    if unread.is_empty() {
        return Some((stream, parts.read_buf));
    }
    let mut early = bytes::BytesMut::from(&parts.read_buf[..]);
    early.extend_from_slice(&unread);
    Some((stream, early.freeze()))
}

/// hyper left the connection task's waker in the socket's read slot. Until something
/// replaces it, that waker keeps the finished connection task's memory (its whole future,
/// several KiB, stored in the task) alive: measured, a silent tunnel cost twice the RSS of
/// one that had carried a byte. A no-op waker takes its place at once, whatever the tunnel
/// waits on first.
fn forget_reader(stream: &ClientStream) {
    if let ClientStream::Plain(tcp) = stream {
        let mut noop = std::task::Context::from_waker(std::task::Waker::noop());
        let _ = tcp.poll_read_ready(&mut noop);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_alternate_starting_with_the_first() {
        let v = |s: &str| s.parse::<IpAddr>().unwrap();
        let out = dial_order(vec![
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
