//! The status report behind `GET /` and `GET /status.json`: one snapshot of what the proxy is
//! doing, built on request from the live state and nothing else.
//!
//! Bounded whatever the load: lists are capped ([`MAX_ROWS`], [`MAX_GROUPS`]) with the number
//! left out reported beside them ("and 4,210 more"), and building it walks the open tunnels
//! once. The field names of the JSON are documented in the README and stable for scripts.

use std::collections::HashMap;

use rustc_hash::FxHashMap;
use std::net::IpAddr;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::state::Shared;
use crate::telemetry::log_format::timestamp;

/// Individual tunnels listed (the longest-open first).
pub const MAX_ROWS: usize = 100;
/// Domains and clients listed in the per-domain and per-client tables (the busiest first).
pub const MAX_GROUPS: usize = 50;

#[derive(Debug, Serialize)]
pub struct Report {
    pub version: &'static str,
    pub started: String,
    pub uptime_seconds: u64,
    pub draining: bool,
    pub config: ConfigState,
    pub listeners: Vec<Listener>,
    pub tunnels: Tunnels,
    /// Newest first; `recent_refusals_matching` of them matched the filter.
    pub recent_refusals: Vec<Refusal>,
    pub filter: String,
    pub rules: Vec<RuleState>,
    pub dns: Dns,
    pub ip_ranges: Option<IpRangesState>,
}

#[derive(Debug, Serialize)]
pub struct ConfigState {
    pub source: String,
    pub last_reload: Option<String>,
    pub last_reload_error: Option<ReloadError>,
}

#[derive(Debug, Serialize)]
pub struct ReloadError {
    pub time: String,
    pub error: String,
}

#[derive(Debug, Serialize)]
pub struct Listener {
    pub kind: &'static str,
    pub address: String,
}

#[derive(Debug, Serialize)]
pub struct Tunnels {
    pub open: usize,
    pub by_domain: Vec<Group>,
    pub by_domain_more: usize,
    pub by_client: Vec<Group>,
    pub by_client_more: usize,
    pub list: Vec<Tunnel>,
    pub list_more: usize,
}

/// Open tunnels of one domain, or of one client address.
#[derive(Debug, Serialize)]
pub struct Group {
    pub name: String,
    pub open: usize,
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub oldest_seconds: u64,
}

#[derive(Debug, Serialize)]
pub struct Tunnel {
    pub client: String,
    pub host: String,
    pub port: u16,
    pub rule: String,
    pub opened: String,
    pub age_seconds: u64,
    pub bytes_up: u64,
    pub bytes_down: u64,
}

#[derive(Debug, Serialize)]
pub struct Refusal {
    pub time: String,
    pub client: String,
    pub host: String,
    pub port: u16,
    pub reason: &'static str,
    pub rule: String,
}

#[derive(Debug, Serialize)]
pub struct RuleState {
    pub name: String,
    pub domains: Vec<String>,
    pub ports: Vec<String>,
    pub sni: &'static str,
    pub private_endpoint: bool,
    /// Requests since start that this rule admitted, and that it refused or that failed.
    pub allowed: u64,
    pub refused: u64,
}

#[derive(Debug, Serialize)]
pub struct Dns {
    /// `[]`: the system resolver configuration.
    pub servers: Vec<String>,
    pub cache_size: u64,
    /// Lookups since start by path (`cached`; `bypass` for private endpoints) and result.
    pub lookups: Vec<Lookups>,
}

#[derive(Debug, Serialize)]
pub struct Lookups {
    pub path: String,
    pub result: String,
    pub count: u64,
}

#[derive(Debug, Serialize)]
pub struct IpRangesState {
    pub create_date: String,
    pub sync_token: String,
    pub age_seconds: u64,
    pub ipv4_prefixes: usize,
    pub ipv6_prefixes: usize,
    pub url: Option<String>,
}

/// The report now. `filter` keeps the refusals whose client, host, reason or rule contain it.
pub fn report(shared: &Shared, filter: &str) -> Report {
    let runtime = shared.runtime();
    let config = &runtime.config;
    let status = &shared.status;
    let reloads = status.reloads();
    let by_rule: HashMap<String, (u64, u64)> = shared
        .metrics
        .requests_by_rule()
        .into_iter()
        .map(|(rule, allowed, refused)| (rule, (allowed, refused)))
        .collect();
    Report {
        version: env!("CARGO_PKG_VERSION"),
        started: timestamp(status.started),
        uptime_seconds: status.started_at.elapsed().as_secs(),
        draining: shared.is_draining(),
        config: ConfigState {
            source: config.source.clone(),
            last_reload: reloads.last_ok.map(timestamp),
            last_reload_error: reloads.last_error.map(|(time, error)| ReloadError {
                time: timestamp(time),
                error,
            }),
        },
        listeners: status
            .listeners()
            .into_iter()
            .map(|l| Listener {
                kind: l.kind,
                address: l.addr,
            })
            .collect(),
        tunnels: tunnels(shared),
        recent_refusals: refusals(shared, filter),
        filter: filter.to_string(),
        rules: config
            .rules
            .rules()
            .iter()
            .map(|rule| {
                let (allowed, refused) = by_rule.get(&rule.name).copied().unwrap_or_default();
                RuleState {
                    name: rule.name.clone(),
                    domains: rule.domains.clone(),
                    ports: rule.port_specs(),
                    sni: rule.sni.as_str(),
                    private_endpoint: rule.private_endpoint,
                    allowed,
                    refused,
                }
            })
            .collect(),
        dns: Dns {
            servers: config.dns.servers.iter().map(|s| s.to_string()).collect(),
            cache_size: config.dns.cache_size,
            lookups: shared
                .metrics
                .dns_lookup_counts()
                .into_iter()
                .map(|(path, result, count)| Lookups {
                    path,
                    result,
                    count,
                })
                .collect(),
        },
        ip_ranges: shared.ip_ranges().as_ref().map(|set| IpRangesState {
            create_date: set.create_date.clone(),
            sync_token: set.sync_token.clone(),
            age_seconds: unix_now().saturating_sub(set.created),
            ipv4_prefixes: set.v4_prefixes,
            ipv6_prefixes: set.v6_prefixes,
            url: config
                .ip_ranges_refresh
                .as_ref()
                .map(|refresh| refresh.url.uri.to_string()),
        }),
    }
}

/// One pass over the open tunnels: totals per domain and per client, and the oldest ones.
fn tunnels(shared: &Shared) -> Tunnels {
    let open = shared.status.open.snapshot();
    // Keys are hosts the proxy admitted and client addresses: a fast hash is enough, and at
    // thousands of tunnels the hashing is most of what this page costs.
    let mut domains: FxHashMap<&str, Group> = FxHashMap::default();
    let mut clients: FxHashMap<IpAddr, Group> = FxHashMap::default();
    for tunnel in &open {
        let (up, down) = tunnel.bytes();
        let age = tunnel.opened_at.elapsed().as_secs();
        let add = |group: &mut Group| {
            group.open += 1;
            group.bytes_up += up;
            group.bytes_down += down;
            group.oldest_seconds = group.oldest_seconds.max(age);
        };
        add(domains
            .entry(&tunnel.host)
            .or_insert_with(|| group(&tunnel.host)));
        let ip = tunnel.client.ip();
        add(clients.entry(ip).or_insert_with(|| group(&ip.to_string())));
    }
    let (by_domain, by_domain_more) = busiest(domains.into_values().collect());
    let (by_client, by_client_more) = busiest(clients.into_values().collect());
    let total = open.len();
    let mut oldest = open;
    // Only the shown ones are sorted: picking them first keeps this linear in open tunnels.
    if oldest.len() > MAX_ROWS {
        oldest.select_nth_unstable_by_key(MAX_ROWS, |tunnel| tunnel.opened_at);
        oldest.truncate(MAX_ROWS);
    }
    oldest.sort_by_key(|tunnel| tunnel.opened_at);
    let list = oldest
        .iter()
        .take(MAX_ROWS)
        .map(|tunnel| {
            let (bytes_up, bytes_down) = tunnel.bytes();
            Tunnel {
                client: tunnel.client.to_string(),
                host: tunnel.host.clone(),
                port: tunnel.port,
                rule: tunnel.rule.clone(),
                opened: timestamp(tunnel.opened),
                age_seconds: tunnel.opened_at.elapsed().as_secs(),
                bytes_up,
                bytes_down,
            }
        })
        .collect();
    Tunnels {
        open: total,
        by_domain,
        by_domain_more,
        by_client,
        by_client_more,
        list,
        list_more: total.saturating_sub(MAX_ROWS),
    }
}

fn group(name: &str) -> Group {
    Group {
        name: name.to_string(),
        open: 0,
        bytes_up: 0,
        bytes_down: 0,
        oldest_seconds: 0,
    }
}

/// The groups with the most open tunnels, capped, and how many were left out.
fn busiest(mut groups: Vec<Group>) -> (Vec<Group>, usize) {
    groups.sort_by(|a, b| b.open.cmp(&a.open).then_with(|| a.name.cmp(&b.name)));
    let more = groups.len().saturating_sub(MAX_GROUPS);
    groups.truncate(MAX_GROUPS);
    (groups, more)
}

fn refusals(shared: &Shared, filter: &str) -> Vec<Refusal> {
    let filter = filter.to_ascii_lowercase();
    shared
        .status
        .refusals
        .newest_first()
        .into_iter()
        .map(|r| Refusal {
            time: timestamp(r.time),
            client: r.client.to_string(),
            host: r.host,
            port: r.port,
            reason: r.reason,
            rule: r.rule,
        })
        .filter(|r| {
            filter.is_empty()
                || [&r.client, &r.host, r.reason, &r.rule]
                    .iter()
                    .any(|field| field.to_ascii_lowercase().contains(&filter))
        })
        .collect()
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
