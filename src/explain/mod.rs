//! `portcullis explain HOST:PORT` and `GET /explain`: would a CONNECT pass, and why.
//!
//! When AppStream will not connect, the first question is whether the proxy lets the host
//! through. [`explain`] takes a hypothetical CONNECT through the proxy's steps, in the proxy's
//! order, and records each step with its reason. The decisions are not re-implemented here: they
//! come from the functions [`crate::connect`] decides with ([`connect::parse_target`],
//! [`connect::require_name`], [`connect::rule_decision`], [`connect::dns_path`],
//! [`connect::dns_refusal`], [`connect::dial_order`], [`connect::may_connect`]), the same
//! [`crate::dns::Resolver`], destination policy and ip-ranges set. This module adds only what a
//! person needs to act on a refusal: the nearest pattern when no rule matches ([`near_miss`]),
//! the range that refused an address, the ip-ranges file consulted.
//!
//! It never connects to the origin, so what the TCP connect would bring (`upstream_unreachable`,
//! a timeout after DNS) is not foreseen; and it knows no client, so the client ACL,
//! authentication and the connection limits are not evaluated. The result says both.

pub mod near_miss;

use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use hyper::Uri;
use serde::Serialize;

use crate::config::Config;
use crate::connect;
use crate::destination::Via;
use crate::dns::CachePath;
use crate::error::Reason;
use crate::ip_ranges::IpRanges;
use crate::rules::SniMode;
use crate::rules::{Host, Rule, RuleSet, Verdict};
use crate::state::{Runtime, Shared};

pub use near_miss::NearMiss;

/// The ip-ranges set `require_ip_ranges` is judged by, and where it came from.
pub struct RangesInUse {
    pub set: Option<Arc<IpRanges>>,
    /// For the output: "the config's [aws_ip_ranges] file", "the proxy's live set".
    pub source: &'static str,
}

impl RangesInUse {
    /// The file the config names, as read (the command line: there is no running proxy).
    pub fn from_config(config: &Config) -> RangesInUse {
        RangesInUse {
            set: config.aws_ip_ranges.clone(),
            source: "the config's [aws_ip_ranges] file",
        }
    }

    /// The set tunnels are checked against now, which a refresh may have replaced.
    pub fn live(shared: &Shared) -> RangesInUse {
        RangesInUse {
            set: Option::clone(&shared.ip_ranges()),
            source: "the proxy's live set",
        }
    }
}

/// Why a hypothetical CONNECT would pass or not. Serialized as the `/explain` JSON (field names
/// are stable, documented in the README); displayed as the command line's text.
#[derive(Debug, Clone, Serialize)]
pub struct Explanation {
    /// The target as asked, e.g. `gw.amazonappstream.com:443`.
    pub target: String,
    /// The config the answer comes from (a path, or `<embedded default>`).
    pub config: String,
    /// The host as parsed (lowercased, no trailing dot; an IP literal as an address).
    pub host: Option<String>,
    pub port: Option<u16>,
    pub allowed: bool,
    /// The reply's status: 200, or the refusal's.
    pub status: u16,
    /// The `Proxy-Status` reason; empty when allowed.
    pub reason: &'static str,
    /// The `Proxy-Status` header of the refusal.
    pub proxy_status: Option<String>,
    /// The rule that matched (also for `port_not_allowed`, as the access log has it).
    pub rule: Option<String>,
    /// For `domain_not_allowed`: the nearest pattern and why it fails.
    pub near_miss: Option<NearMiss>,
    /// The rule's SNI mode.
    pub sni: Option<&'static str>,
    /// The DNS path, `cached` or `bypass`.
    pub dns: Option<&'static str>,
    /// Whether the name was resolved and its addresses checked (not with `--no-resolve`, nor
    /// when an earlier step refused).
    pub resolved: bool,
    /// The resolved addresses, in the order the proxy would try them.
    pub addresses: Vec<Address>,
    /// The steps taken, in the proxy's order, up to the one that decided, then `reply`.
    pub steps: Vec<Step>,
    /// What explain could not try.
    pub notes: Vec<String>,
}

/// One step of the decision.
#[derive(Debug, Clone, Serialize)]
pub struct Step {
    /// `target`, `rule`, `sni`, `dns`, `resolve`, `destination`, `ip_ranges`, `reply`.
    pub step: &'static str,
    pub verdict: StepVerdict,
    pub detail: String,
}

/// What a step did with the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StepVerdict {
    /// Let it on to the next step.
    Pass,
    /// Refused it (or, for `reply`, the refusal sent).
    Refuse,
    /// Informs, decides nothing (the SNI mode, the DNS path).
    Info,
    /// Not taken (`--no-resolve`).
    Skip,
}

impl StepVerdict {
    fn as_str(self) -> &'static str {
        match self {
            StepVerdict::Pass => "pass",
            StepVerdict::Refuse => "refuse",
            StepVerdict::Info => "info",
            StepVerdict::Skip => "skip",
        }
    }
}

/// One resolved address and what the proxy would do with it.
#[derive(Debug, Clone, Serialize)]
pub struct Address {
    pub address: IpAddr,
    /// Would the proxy connect to it (destination policy and, if the rule asks, ip-ranges)?
    pub allowed: bool,
    /// The special-purpose range it lies in, e.g. `169.254.0.0/16 link-local`.
    pub range: Option<String>,
    /// The IPv4 address judged in its place, for NAT64, IPv4-mapped and 6to4 addresses.
    pub judged_as: Option<String>,
    /// `public`, `destinations_allow`, `private_endpoint` or `refused`.
    pub via: &'static str,
    /// For rules with `require_ip_ranges`: `inside` or `outside` the published prefixes.
    pub ip_ranges: Option<&'static str>,
    /// One line, as in the text output.
    pub detail: String,
}

/// Walks a CONNECT to `target` (`host:port`) through the proxy's decisions under `runtime`.
/// `resolve = false` sends no DNS query (a `[dns] hosts` answer is still used). At most one
/// lookup, bounded by `connect_timeout`, as on the data path.
pub async fn explain(
    runtime: &Runtime,
    ranges: &RangesInUse,
    target: &str,
    resolve: bool,
) -> Explanation {
    let mut explanation = Explanation {
        target: target.to_string(),
        config: runtime.config.source.clone(),
        host: None,
        port: None,
        allowed: false,
        status: 0,
        reason: "",
        proxy_status: None,
        rule: None,
        near_miss: None,
        sni: None,
        dns: None,
        resolved: false,
        addresses: Vec::new(),
        steps: Vec::new(),
        notes: Vec::new(),
    };
    let decided = walk(&mut explanation, runtime, ranges, target, resolve).await;
    explanation.finish(decided);
    explanation
}

/// The steps, in `connect::admit` and `connect::dial`'s order. `Ok(dial)`: a 200, with the
/// addresses the proxy would try (empty when they were not resolved).
async fn walk(
    x: &mut Explanation,
    runtime: &Runtime,
    ranges: &RangesInUse,
    target: &str,
    resolve: bool,
) -> Result<Vec<IpAddr>, Reason> {
    let parsed = target
        .parse::<Uri>()
        .map_err(|_| Reason::BadRequest)
        .and_then(|uri| connect::parse_target(&uri));
    let (host, port) = match parsed {
        Ok(parsed) => parsed,
        Err(reason) => {
            x.step(
                "target",
                StepVerdict::Refuse,
                target_problem(target, reason),
            );
            return Err(reason);
        }
    };
    x.host = Some(match &host {
        Host::Name(name) => name.clone(),
        Host::Ip(ip) => ip.to_string(),
    });
    x.port = Some(port);
    let name = match connect::require_name(host) {
        Ok(name) => name,
        Err(reason) => {
            let detail = format!(
                "`{}` is an IP address; an IP literal matches no domain rule: CONNECT to a host \
                 name",
                x.host.as_deref().unwrap_or_default()
            );
            x.step("target", StepVerdict::Refuse, detail);
            return Err(reason);
        }
    };
    x.step(
        "target",
        StepVerdict::Pass,
        format!("host {name}, port {port}"),
    );

    let rules = &runtime.config.rules;
    let verdict = rules.check(&name, port);
    if let Verdict::PortNotAllowed(rule) = verdict {
        x.rule = Some(rule.name.clone());
    }
    let rule = match connect::rule_decision(verdict) {
        Ok(rule) => rule,
        Err(reason) => {
            let detail = match verdict {
                Verdict::PortNotAllowed(_) => port_miss(rules, &name, port),
                _ => {
                    x.near_miss = near_miss::nearest(rules.rules(), &name);
                    match &x.near_miss {
                        Some(miss) => format!(
                            "no rule matches {name}\nnearest: pattern {} (rule {}): {}",
                            miss.pattern, miss.rule, miss.why
                        ),
                        None => format!("no rule matches {name}"),
                    }
                }
            };
            x.step("rule", StepVerdict::Refuse, detail);
            return Err(reason);
        }
    };
    x.rule = Some(rule.name.clone());
    x.step(
        "rule",
        StepVerdict::Pass,
        rule_hit(rules, rule, &name, port),
    );
    x.sni = Some(rule.sni.as_str());
    x.step("sni", StepVerdict::Info, sni_detail(rule.sni, &name));
    let path = connect::dns_path(rule);
    x.dns = Some(path.as_str());
    x.step("dns", StepVerdict::Info, dns_detail(runtime, path, &name));

    let Some(addrs) = resolved(x, runtime, &name, path, resolve).await? else {
        return Ok(Vec::new());
    };
    x.resolved = true;
    let dial = judge_addresses(x, runtime, ranges, rule, addrs);
    if dial.is_empty() {
        return Err(Reason::DestinationNotAllowed);
    }
    Ok(dial)
}

/// The lookup, as `connect::dial` makes it, under `connect_timeout` as `connect::admit` bounds
/// it. `None`: not resolved (`resolve = false` and no `[dns] hosts` answer).
async fn resolved(
    x: &mut Explanation,
    runtime: &Runtime,
    name: &str,
    path: CachePath,
    resolve: bool,
) -> Result<Option<Vec<IpAddr>>, Reason> {
    let static_answer = runtime.resolver.static_answer(name).map(<[IpAddr]>::to_vec);
    if !resolve {
        let Some(addrs) = static_answer else {
            x.step(
                "resolve",
                StepVerdict::Skip,
                "not resolved, as asked: the addresses, and so the destination check, are \
                 unknown; the rules alone let this through"
                    .into(),
            );
            return Ok(None);
        };
        let detail = format!("{} ([dns] hosts; no query sent)", list(&addrs));
        x.step("resolve", StepVerdict::Pass, detail);
        return Ok(Some(addrs));
    }
    let timeout = runtime.config.proxy.connect_timeout;
    let answer = tokio::time::timeout(timeout, runtime.resolver.resolve(name, path)).await;
    match answer {
        Err(_) => {
            let detail = format!("no answer within connect_timeout ({timeout:?})");
            x.step("resolve", StepVerdict::Refuse, detail);
            Err(Reason::UpstreamTimeout)
        }
        Ok(Err(failure)) => {
            let reason = connect::dns_refusal(&failure);
            x.step("resolve", StepVerdict::Refuse, format!("{name}: {failure}"));
            Err(reason)
        }
        Ok(Ok(addrs)) => {
            let from = if static_answer.is_some() {
                "[dns] hosts".to_string()
            } else {
                servers(&runtime.config)
            };
            let detail = format!("{} (from {from})", list(&addrs));
            x.step("resolve", StepVerdict::Pass, detail);
            Ok(Some(addrs))
        }
    }
}

/// The destination policy and, for rules that ask, the ip-ranges check, on each address in the
/// order the proxy would try them. Returns the addresses it would try.
fn judge_addresses(
    x: &mut Explanation,
    runtime: &Runtime,
    ranges: &RangesInUse,
    rule: &Rule,
    addrs: Vec<IpAddr>,
) -> Vec<IpAddr> {
    let set = ranges.set.as_deref();
    let checks_ranges = !rule.require_ip_ranges.is_empty();
    let mut dial = Vec::new();
    let mut policy_lines = Vec::new();
    let mut ranges_lines = Vec::new();
    let mut policy_passed = false;
    for addr in connect::dial_order(addrs) {
        let verdict = runtime.policy.verdict(addr, rule.private_endpoint);
        let allowed = connect::may_connect(&runtime.policy, set, rule, addr);
        let published = checks_ranges.then(|| connect::published(set, rule, addr));
        policy_passed |= verdict.allowed();
        let mut line = format!(
            "{addr}: {}",
            if verdict.allowed() {
                "allowed"
            } else {
                "refused"
            }
        );
        if let Some(embedded) = verdict.embedded {
            line.push_str(&format!(
                "; carries {} ({}), judged as that",
                embedded.v4, embedded.kind
            ));
        }
        match (verdict.range, verdict.via) {
            (None, _) => line.push_str("; in no special-purpose range"),
            (Some(range), Via::DestinationsAllow(net)) => {
                line.push_str(&format!("; in {range}, but [destinations] allow has {net}"))
            }
            (Some(range), Via::PrivateEndpoint) => line.push_str(&format!(
                "; in {range}, which a private_endpoint rule may reach"
            )),
            (Some(range), _) => line.push_str(&format!("; in {range}")),
        }
        if let Some(name) = verdict.well_known {
            let judged = verdict.embedded.map_or(addr, |e| IpAddr::V4(e.v4));
            line.push_str(&format!(" ({judged} is {name})"));
        }
        policy_lines.push(line.clone());
        if let Some(inside) = published {
            let judged = if inside {
                format!("inside ({})", inside_services(set, rule, addr))
            } else {
                "outside".to_string()
            };
            ranges_lines.push(format!("{addr}: {judged}"));
            line.push_str(&format!("; ip-ranges: {judged}"));
        }
        if allowed {
            dial.push(addr);
        }
        x.addresses.push(Address {
            address: addr,
            allowed,
            range: verdict.range.map(|range| range.to_string()),
            judged_as: verdict
                .embedded
                .map(|embedded| format!("{} ({})", embedded.v4, embedded.kind)),
            via: verdict.via.as_str(),
            ip_ranges: published.map(|inside| if inside { "inside" } else { "outside" }),
            detail: line,
        });
    }
    let policy_verdict = if policy_passed {
        StepVerdict::Pass
    } else {
        StepVerdict::Refuse
    };
    x.step("destination", policy_verdict, policy_lines.join("\n"));
    if checks_ranges && policy_passed {
        let about = match set {
            Some(set) => format!(
                "ip-ranges.json createDate {}, syncToken {} ({})",
                set.create_date, set.sync_token, ranges.source
            ),
            None => format!(
                "no ip-ranges set is loaded ({}): nothing is inside",
                ranges.source
            ),
        };
        let verdict = if dial.is_empty() {
            StepVerdict::Refuse
        } else {
            StepVerdict::Pass
        };
        let detail = format!(
            "rule {} admits only addresses AWS publishes for {}; {about}\n{}",
            rule.name,
            rule.require_ip_ranges.join(", "),
            ranges_lines.join("\n")
        );
        x.step("ip_ranges", verdict, detail);
    }
    dial
}

/// The services of `rule` whose published prefixes hold `addr`.
fn inside_services(set: Option<&IpRanges>, rule: &Rule, addr: IpAddr) -> String {
    let Some(set) = set else {
        return String::new();
    };
    rule.require_ip_ranges
        .iter()
        .filter(|service| set.contains(std::slice::from_ref(*service), addr))
        .cloned()
        .collect::<Vec<_>>()
        .join(", ")
}

impl Explanation {
    fn step(&mut self, step: &'static str, verdict: StepVerdict, detail: String) {
        self.steps.push(Step {
            step,
            verdict,
            detail,
        });
    }

    fn finish(&mut self, decided: Result<Vec<IpAddr>, Reason>) {
        match decided {
            Ok(dial) => {
                self.allowed = true;
                self.status = 200;
                let mut detail = "200 Connection established".to_string();
                if let [only] = &dial[..] {
                    detail.push_str(&format!("\nthe proxy would connect to {only}"));
                } else if let Some((first, rest)) = dial.split_first() {
                    detail.push_str(&format!(
                        "\nthe proxy would connect to {first} first, then {} in turn",
                        list(rest)
                    ));
                } else {
                    detail.push_str(
                        "\nif the name resolves to an address the destination check lets through",
                    );
                }
                self.step("reply", StepVerdict::Pass, detail);
                self.notes.push(
                    "explain does not connect to the origin: a refused or unreachable origin \
                     (502 upstream_unreachable) or a connect past connect_timeout \
                     (504 upstream_timeout) shows only on a real CONNECT"
                        .into(),
                );
            }
            Err(reason) => {
                self.allowed = false;
                self.status = reason.status().as_u16();
                self.reason = reason.as_str();
                self.proxy_status = Some(reason.proxy_status());
                let detail = format!(
                    "{} {}, Proxy-Status: {}",
                    self.status,
                    reason.status().canonical_reason().unwrap_or(""),
                    reason.proxy_status()
                );
                self.step("reply", StepVerdict::Refuse, detail);
            }
        }
        self.notes.push(
            "not evaluated (explain knows no client): [clients] allow, [auth], \
             max_tunnels_per_client, max_connections"
                .into(),
        );
    }
}

impl fmt::Display for Explanation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "explain CONNECT {} (config: {})",
            self.target, self.config
        )?;
        writeln!(f)?;
        for step in &self.steps {
            let mut lines = step
                .detail
                .lines()
                .flat_map(|line| wrap(line, TEXT_WIDTH - DETAIL_COLUMN));
            writeln!(
                f,
                "  {:<12} {:<7} {}",
                step.step,
                step.verdict.as_str(),
                lines.next().unwrap_or_default()
            )?;
            for line in lines {
                writeln!(f, "{:DETAIL_COLUMN$}{line}", "")?;
            }
        }
        writeln!(f)?;
        if self.allowed && !self.resolved {
            writeln!(
                f,
                "allowed by the rules: 200 Connection established, if the addresses pass"
            )?;
        } else if self.allowed {
            writeln!(f, "allowed: 200 Connection established")?;
        } else {
            writeln!(
                f,
                "refused: {} {}",
                self.status,
                hyper::StatusCode::from_u16(self.status)
                    .ok()
                    .and_then(|s| s.canonical_reason())
                    .unwrap_or("")
            )?;
            if let Some(proxy_status) = &self.proxy_status {
                writeln!(f, "         Proxy-Status: {proxy_status}")?;
            }
        }
        for note in &self.notes {
            for (i, line) in wrap(note, TEXT_WIDTH - 6).into_iter().enumerate() {
                writeln!(f, "{}{line}", if i == 0 { "note: " } else { "      " })?;
            }
        }
        Ok(())
    }
}

/// The text output fits a 100-column terminal; details start after the step and verdict.
const TEXT_WIDTH: usize = 100;
const DETAIL_COLUMN: usize = 23;

/// Breaks `line` at spaces into lines of at most `width` characters (a longer word stands alone).
fn wrap(line: &str, width: usize) -> Vec<String> {
    let mut lines = Vec::new();
    let mut current = String::new();
    for word in line.split(' ') {
        if !current.is_empty() && current.len() + 1 + word.len() > width {
            lines.push(std::mem::take(&mut current));
        }
        if !current.is_empty() {
            current.push(' ');
        }
        current.push_str(word);
    }
    lines.push(current);
    lines
}

/// Why a target is a 400 (or a numeric `ip_literal`), as precisely as can be said. The verdict
/// itself came from [`connect::parse_target`]; this only names the problem.
fn target_problem(target: &str, reason: Reason) -> String {
    if reason == Reason::IpLiteral {
        let host = target.rsplit_once(':').map_or(target, |(host, _)| host);
        return format!(
            "`{host}` reads as an IPv4 address (the forms inet_aton accepts, like 127.1, \
             2130706433, 0x7f.1); an IP literal matches no domain rule"
        );
    }
    let problem = if target.contains("://") || target.contains('/') {
        "a CONNECT target is host:port, not a URL".to_string()
    } else if target.contains('@') {
        "user@ (credentials) has no place in a CONNECT target".to_string()
    } else if let Some(rest) = target.strip_prefix('[') {
        match rest.split_once("]:") {
            None => "an IPv6 literal is written [address]:port".to_string(),
            Some((v6, port)) if v6.parse::<std::net::Ipv6Addr>().is_err() => {
                format!("`{v6}` is not an IPv6 address (port {port})")
            }
            Some((_, port)) => port_problem(port),
        }
    } else {
        match target.rsplit_once(':') {
            None => "no port: the target is HOST:PORT".to_string(),
            Some((host, port)) => {
                if port_problem(port).is_empty() {
                    name_problem(host)
                } else {
                    port_problem(port)
                }
            }
        }
    };
    let problem = if problem.is_empty() {
        "not a CONNECT target".to_string()
    } else {
        problem
    };
    format!("{target:?}: {problem}")
}

/// Empty if `port` is a port.
fn port_problem(port: &str) -> String {
    match port.parse::<u16>() {
        Ok(1..) if port.bytes().all(|b| b.is_ascii_digit()) => String::new(),
        _ => format!("port `{port}` is not a number from 1 to 65535"),
    }
}

/// What makes `host` something other than a DNS name ([`crate::rules::parse_host`] decided
/// that it is not one).
fn name_problem(host: &str) -> String {
    let name = host.strip_suffix('.').unwrap_or(host);
    if name.is_empty() {
        return "the host is empty".into();
    }
    if name.len() > 253 {
        return format!("the name is {} characters long; at most 253", name.len());
    }
    for label in name.split('.') {
        if label.is_empty() {
            return "the name has an empty label (a leading dot or two dots in a row)".into();
        }
        if label.len() > 63 {
            return format!("a label is {} characters long; at most 63", label.len());
        }
        if let Some(c) = label
            .chars()
            .find(|&c| !(c.is_ascii_alphanumeric() || c == '-' || c == '_'))
        {
            return format!(
                "{c:?} cannot be in a host name (letters, digits, '-' and '_' only; \
                 internationalized names in their xn-- form)"
            );
        }
    }
    String::new()
}

/// The port refusal: which rules match the host, and what ports they allow.
fn port_miss(rules: &RuleSet, host: &str, port: u16) -> String {
    let mut seen: Vec<&str> = Vec::new();
    let mut matched = Vec::new();
    for (rule, pattern) in rules.matching(host) {
        if !seen.contains(&rule.name.as_str()) {
            seen.push(&rule.name);
            matched.push(format!(
                "rule {} (pattern {pattern}; ports {})",
                rule.name,
                ports(rule)
            ));
        }
    }
    match &matched[..] {
        [one] => format!("{host} matches {one}, but not on port {port}"),
        many => format!(
            "{host} matches\n{}\nnone of them allows port {port}",
            many.join("\n")
        ),
    }
}

/// The rule that admits the host, and any earlier rule that matched but not on this port.
fn rule_hit(rules: &RuleSet, rule: &Rule, host: &str, port: u16) -> String {
    let matching = rules.matching(host);
    let pattern = matching
        .iter()
        .find(|(r, _)| r.name == rule.name)
        .map_or("", |(_, pattern)| *pattern);
    let mut detail = format!(
        "rule {} (pattern {pattern}; ports {})",
        rule.name,
        ports(rule)
    );
    let mut passed_over: Vec<&str> = Vec::new();
    for (other, _) in &matching {
        if other.name != rule.name
            && !other.allows_port(port)
            && !passed_over.contains(&other.name.as_str())
        {
            passed_over.push(&other.name);
        }
    }
    if !passed_over.is_empty() {
        detail.push_str(&format!(
            "\nalso matching, without port {port}: {}; the first rule that matches and allows \
             the port wins",
            passed_over.join(", ")
        ));
    }
    detail
}

fn ports(rule: &Rule) -> String {
    rule.port_specs().join(", ")
}

fn sni_detail(mode: SniMode, host: &str) -> String {
    match mode {
        SniMode::Enforce => format!(
            "enforce: after the 200, the tunnel must start with a TLS ClientHello naming {host}; \
             another name, none, or not TLS closes it before a byte reaches the origin \
             (sni_mismatch, not_tls)"
        ),
        SniMode::Log => format!(
            "log: a ClientHello naming another host than {host} (or none, or not TLS) is logged; \
             no byte is delayed or blocked"
        ),
        SniMode::Off => "off: the tunnel's bytes are not looked at".into(),
    }
}

fn dns_detail(runtime: &Runtime, path: CachePath, host: &str) -> String {
    let config = &runtime.config;
    let mut detail = match path {
        CachePath::Cached => format!(
            "cached: answers are kept for their TTL ([dns] cache_size = {})",
            config.dns.cache_size
        ),
        CachePath::Bypass => "bypass: a private_endpoint rule; every tunnel asks the DNS server \
                              afresh, never from a cache"
            .to_string(),
    };
    detail.push_str(&format!("; servers: {}", servers(config)));
    if runtime.resolver.static_answer(host).is_some() {
        detail.push_str(&format!("; [dns] hosts answers {host} (no query)"));
    }
    detail
}

fn servers(config: &Config) -> String {
    if config.dns.servers.is_empty() {
        "the system resolver config".to_string()
    } else {
        let servers: Vec<String> = config.dns.servers.iter().map(|s| s.to_string()).collect();
        servers.join(", ")
    }
}

fn list(addrs: &[IpAddr]) -> String {
    addrs
        .iter()
        .map(IpAddr::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The embedded rules, answers from `[dns] hosts` only, and a server on loopback that is
    /// never asked: unit tests send no packet anywhere.
    async fn runtime(hosts: &str) -> Runtime {
        let text = crate::config::DEFAULT_CONFIG
            .replace("servers = []", "servers = [\"127.0.0.1:9\"]")
            .replace("hosts = {}", &format!("hosts = {{ {hosts} }}"));
        Runtime::new(Config::parse(&text, "t.toml").unwrap()).unwrap()
    }

    fn no_ranges() -> RangesInUse {
        RangesInUse {
            set: None,
            source: "none",
        }
    }

    #[tokio::test]
    async fn a_static_answer_is_judged_address_by_address() {
        let runtime = runtime(
            r#""gw.amazonappstream.com" = ["10.0.0.7", "52.94.1.1", "64:ff9b::a9fe:a9fe"]"#,
        )
        .await;
        let x = explain(&runtime, &no_ranges(), "GW.amazonappstream.com.:443", false).await;
        assert!(x.allowed && x.resolved, "{x}");
        assert_eq!((x.status, x.reason), (200, ""));
        assert_eq!(x.host.as_deref(), Some("gw.amazonappstream.com"));
        let judged: Vec<(String, bool, &str)> = x
            .addresses
            .iter()
            .map(|a| (a.address.to_string(), a.allowed, a.via))
            .collect();
        assert_eq!(
            judged,
            vec![
                ("10.0.0.7".into(), false, "refused"),
                ("64:ff9b::a9fe:a9fe".into(), false, "refused"),
                ("52.94.1.1".into(), true, "public"),
            ],
            "dial order alternates families"
        );
        assert_eq!(
            x.addresses[1].judged_as.as_deref(),
            Some("169.254.169.254 (NAT64 64:ff9b::/96)")
        );
        let reply = x.steps.last().unwrap();
        assert_eq!(reply.step, "reply");
        assert!(reply.detail.ends_with("would connect to 52.94.1.1"), "{x}");
        let json = serde_json::to_value(&x).unwrap();
        assert_eq!(json["steps"][0]["verdict"], "pass");
        assert_eq!(json["addresses"][0]["range"], "10.0.0.0/8 RFC 1918 private");
    }

    #[tokio::test]
    async fn steps_stop_at_the_refusal() {
        let runtime = runtime(r#""gw.amazonappstream.com" = ["127.0.0.1"]"#).await;
        let x = explain(&runtime, &no_ranges(), "gw.amazonappstream.com:443", true).await;
        assert_eq!((x.status, x.reason), (403, "destination_not_allowed"));
        let steps: Vec<&str> = x.steps.iter().map(|s| s.step).collect();
        assert_eq!(
            steps,
            [
                "target",
                "rule",
                "sni",
                "dns",
                "resolve",
                "destination",
                "reply"
            ]
        );
        assert!(x.steps[5].detail.contains("127.0.0.0/8 loopback"), "{x}");
        let x = explain(&runtime, &no_ranges(), "gw.amazonappstream.com:0", true).await;
        assert_eq!((x.status, x.reason), (400, "bad_request"));
        assert!(x.steps[0].detail.contains("port `0`"), "{x}");
    }

    #[test]
    fn wrapping_keeps_words_whole() {
        assert_eq!(wrap("aa bb cc", 5), ["aa bb", "cc"]);
        assert_eq!(wrap("averylongword x", 4), ["averylongword", "x"]);
        assert_eq!(wrap("", 4), [""]);
    }

    #[test]
    fn target_problems_are_named() {
        let problem = |t: &str| target_problem(t, Reason::BadRequest);
        assert!(problem("a b.com:443").contains("' '"));
        assert!(problem("user@a.com:443").contains("credentials"));
        assert!(problem("[::1]").contains("[address]:port"));
        assert!(problem("[zz]:443").contains("not an IPv6 address"));
        assert!(problem("a.com:99999").contains("1 to 65535"));
        let long = format!("{}.com:443", "a".repeat(64));
        assert!(problem(&long).contains("at most 63"));
    }
}
