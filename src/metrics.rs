//! The Prometheus registry and the per-domain state behind it.
//!
//! Built once and handed around as an `Arc<Metrics>`; nothing here is a global. The data path
//! holds a [`DomainMetrics`] for its tunnel, whose counters are pre-resolved handles: relaying
//! bytes touches one atomic, never a label lookup.
//!
//! Label cardinality is bounded twice over. Hosts that matched a rule get up to `max_domains`
//! label values; hosts from refused requests get their own, smaller budget
//! ([`MAX_REFUSED_DOMAINS`]). Past either cap a host counts as `_other`, so a flood of junk
//! names can neither grow memory without bound nor push real domains out.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use dashmap::DashMap;
use prometheus::core::{Collector, Desc};
use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::error::{Outcome, Reason};
use crate::ip_ranges::IpRanges;
use crate::ip_ranges::refresh::RESULTS;

/// Label values kept for hosts of refused requests (no rule matched, or not a valid name).
pub const MAX_REFUSED_DOMAINS: usize = 100;

/// The label for every host past a cap.
pub const OTHER: &str = "_other";

/// The label for requests whose host could not even be parsed.
pub const INVALID: &str = "_invalid";

const TUNNEL_SECONDS: &[f64] = &[
    0.1, 1.0, 10.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 14400.0, 28800.0,
];
const CONNECT_SECONDS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

pub struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    tunnels_active: IntGaugeVec,
    tunnel_bytes: IntCounterVec,
    tunnel_duration: HistogramVec,
    upstream_connect: HistogramVec,
    dns_lookups: IntCounterVec,
    connections_rejected: IntCounterVec,
    connections_accepted: IntCounterVec,
    pipe_fallbacks: IntCounter,
    config_reloads: IntCounterVec,
    upgrades: IntCounterVec,
    ip_ranges_refreshes: IntCounterVec,
    ip_ranges: RangesGauges,
    /// Handles per allowed domain label (including `_other`).
    domains: DashMap<String, Arc<DomainMetrics>>,
    max_domains: AtomicUsize,
    refused: DashMap<String, ()>,
}

/// Every sample of a counter vector, as (label pairs, value).
fn samples(vec: &IntCounterVec) -> impl Iterator<Item = (Vec<(String, String)>, u64)> {
    vec.collect().into_iter().flat_map(|family| {
        family
            .get_metric()
            .iter()
            .map(|metric| {
                let labels = metric
                    .get_label()
                    .iter()
                    .map(|pair| (pair.name().to_string(), pair.value().to_string()))
                    .collect();
                (labels, metric.get_counter().get_value() as u64)
            })
            .collect::<Vec<_>>()
    })
}

fn label<'a>(labels: &'a [(String, String)], name: &str) -> &'a str {
    labels
        .iter()
        .find(|(n, _)| n == name)
        .map_or("", |(_, v)| v.as_str())
}

/// Pre-resolved handles for one `domain` label.
pub struct DomainMetrics {
    pub label: String,
    pub tunnels_active: IntGauge,
    pub bytes_upstream: IntCounter,
    pub bytes_downstream: IntCounter,
    pub tunnel_duration: Histogram,
    pub upstream_connect: Histogram,
}

impl Metrics {
    pub fn new(max_domains: usize) -> Metrics {
        let registry = Registry::new_custom(Some("portcullis".into()), None)
            .expect("a static prefix is valid");
        let requests = IntCounterVec::new(
            Opts::new("requests_total", "CONNECT requests by decision"),
            &["domain", "rule", "outcome", "reason"],
        )
        .expect("valid metric");
        let tunnels_active =
            IntGaugeVec::new(Opts::new("tunnels_active", "Tunnels open now"), &["domain"])
                .expect("valid metric");
        let tunnel_bytes = IntCounterVec::new(
            Opts::new(
                "tunnel_bytes_total",
                "Bytes relayed; upstream is client to origin",
            ),
            &["domain", "direction"],
        )
        .expect("valid metric");
        let tunnel_duration = HistogramVec::new(
            HistogramOpts::new("tunnel_duration_seconds", "How long tunnels stayed open")
                .buckets(TUNNEL_SECONDS.to_vec()),
            &["domain"],
        )
        .expect("valid metric");
        let upstream_connect = HistogramVec::new(
            HistogramOpts::new(
                "upstream_connect_seconds",
                "DNS plus TCP connect to the origin",
            )
            .buckets(CONNECT_SECONDS.to_vec()),
            &["domain"],
        )
        .expect("valid metric");
        let dns_lookups = IntCounterVec::new(
            Opts::new("dns_lookups_total", "Name lookups by path and result"),
            &["cache", "result"],
        )
        .expect("valid metric");
        let connections_rejected = IntCounterVec::new(
            Opts::new(
                "connections_rejected_total",
                "Connections turned away before a request was decided",
            ),
            &["reason"],
        )
        .expect("valid metric");
        let connections_accepted = IntCounterVec::new(
            Opts::new(
                "connections_accepted_total",
                "Client connections accepted, by worker thread",
            ),
            &["worker"],
        )
        .expect("valid metric");
        let pipe_fallbacks = IntCounter::new(
            "relay_pipe_fallbacks_total",
            "Tunnels that copied bulk data through user space because no pipe worth splicing \
             through could be had (fs.pipe-user-pages-soft used up)",
        )
        .expect("valid metric");
        let config_reloads = IntCounterVec::new(
            Opts::new("config_reloads_total", "Config reloads by result"),
            &["result"],
        )
        .expect("valid metric");
        let upgrades = IntCounterVec::new(
            Opts::new(
                "upgrades_total",
                "In-place upgrades (SIGUSR2) this process started, by result",
            ),
            &["result"],
        )
        .expect("valid metric");
        let ip_ranges_refreshes = IntCounterVec::new(
            Opts::new(
                "ip_ranges_refreshes_total",
                "Attempts to refresh AWS's ip-ranges.json from [aws_ip_ranges] url, by result",
            ),
            &["result"],
        )
        .expect("valid metric");
        let ip_ranges = RangesGauges::new();
        let build_info = IntGaugeVec::new(
            Opts::new("build_info", "Always 1; the version as a label"),
            &["version"],
        )
        .expect("valid metric");
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        for collector in [
            Box::new(requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(tunnels_active.clone()),
            Box::new(tunnel_bytes.clone()),
            Box::new(tunnel_duration.clone()),
            Box::new(upstream_connect.clone()),
            Box::new(dns_lookups.clone()),
            Box::new(connections_rejected.clone()),
            Box::new(connections_accepted.clone()),
            Box::new(pipe_fallbacks.clone()),
            Box::new(config_reloads.clone()),
            Box::new(upgrades.clone()),
            Box::new(ip_ranges_refreshes.clone()),
            Box::new(ip_ranges.clone()),
            Box::new(build_info),
        ] {
            registry
                .register(collector)
                .expect("metric names are unique");
        }
        let metrics = Metrics {
            registry,
            requests,
            tunnels_active,
            tunnel_bytes,
            tunnel_duration,
            upstream_connect,
            dns_lookups,
            connections_rejected,
            connections_accepted,
            pipe_fallbacks,
            config_reloads,
            upgrades,
            ip_ranges_refreshes,
            ip_ranges,
            domains: DashMap::new(),
            max_domains: AtomicUsize::new(max_domains),
            refused: DashMap::new(),
        };
        // `_other` is always present, so the cap below is `max_domains` named labels plus it.
        metrics
            .domains
            .insert(OTHER.to_string(), Arc::new(metrics.handles(OTHER)));
        for reason in [
            "overloaded",
            "client_not_allowed",
            "header_timeout",
            "accept_error",
        ] {
            metrics.connections_rejected.with_label_values(&[reason]);
        }
        // Series that exist from the start, so `rate()` and `increase()` see their first event.
        for cache in ["cached", "bypass"] {
            for result in ["ok", "nxdomain", "error"] {
                metrics.dns_lookups.with_label_values(&[cache, result]);
            }
        }
        for result in ["ok", "error"] {
            metrics.config_reloads.with_label_values(&[result]);
        }
        for result in ["ok", "error", "exited", "timeout"] {
            metrics.upgrades.with_label_values(&[result]);
        }
        for result in RESULTS {
            metrics.ip_ranges_refreshes.with_label_values(&[result]);
        }
        metrics
    }

    /// A reload may change the cap; labels already handed out stay.
    pub fn set_max_domains(&self, max_domains: usize) {
        self.max_domains.store(max_domains, Ordering::Relaxed);
    }

    /// Handles for a host that matched a rule.
    pub fn domain(&self, host: &str) -> Arc<DomainMetrics> {
        if let Some(found) = self.domains.get(host) {
            return found.clone();
        }
        let label = if self.domains.len() < self.max_domains.load(Ordering::Relaxed) + 1 {
            host
        } else {
            OTHER
        };
        self.domains
            .entry(label.to_string())
            .or_insert_with(|| Arc::new(self.handles(label)))
            .clone()
    }

    fn handles(&self, label: &str) -> DomainMetrics {
        DomainMetrics {
            label: label.to_string(),
            tunnels_active: self.tunnels_active.with_label_values(&[label]),
            bytes_upstream: self.tunnel_bytes.with_label_values(&[label, "upstream"]),
            bytes_downstream: self.tunnel_bytes.with_label_values(&[label, "downstream"]),
            tunnel_duration: self.tunnel_duration.with_label_values(&[label]),
            upstream_connect: self.upstream_connect.with_label_values(&[label]),
        }
    }

    /// The label for a host of a refused request, from the refused budget.
    pub fn refused_label(&self, host: &str) -> String {
        if let Some(found) = self.domains.get(host) {
            return found.label.clone();
        }
        if self.refused.contains_key(host) {
            return host.to_string();
        }
        if self.refused.len() < MAX_REFUSED_DOMAINS {
            self.refused.insert(host.to_string(), ());
            return host.to_string();
        }
        OTHER.to_string()
    }

    pub fn request(&self, domain: &str, rule: &str, reason: Option<Reason>) {
        let (outcome, reason) = match reason {
            None => (Outcome::Allowed, ""),
            Some(reason) => (reason.outcome(), reason.as_str()),
        };
        self.requests
            .with_label_values(&[domain, rule, outcome.as_str(), reason])
            .inc();
    }

    pub fn dns_lookup(&self, cache: &str, result: &str) {
        self.dns_lookups.with_label_values(&[cache, result]).inc();
    }

    /// The accepted-connections counter of one worker; the accept loop holds it.
    pub fn accepted(&self, worker: usize) -> IntCounter {
        self.connections_accepted
            .with_label_values(&[&worker.to_string()])
    }

    /// A tunnel copied for lack of a pipe; the first one in the process says why in the log.
    pub fn pipe_fallback(&self) {
        if self.pipe_fallbacks.get() == 0 {
            tracing::warn!(
                "no pipe to splice through: the per-user pipe budget is used up, so bulk \
                 tunnels are copied through user space (more CPU). Raise \
                 fs.pipe-user-pages-soft, or run fewer proxies under this user"
            );
        }
        self.pipe_fallbacks.inc();
    }

    pub fn connection_rejected(&self, reason: &str) {
        self.connections_rejected.with_label_values(&[reason]).inc();
    }

    pub fn config_reload(&self, ok: bool) {
        let result = if ok { "ok" } else { "error" };
        self.config_reloads.with_label_values(&[result]).inc();
    }

    pub fn upgrade(&self, result: &str) {
        self.upgrades.with_label_values(&[result]).inc();
    }

    pub fn ip_ranges_refresh(&self, result: &str) {
        self.ip_ranges_refreshes.with_label_values(&[result]).inc();
    }

    /// The ip-ranges set in force changed (or went away with a config that has none).
    pub fn ip_ranges_loaded(&self, set: Option<&IpRanges>) {
        *self
            .ip_ranges
            .loaded
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = set.map(|set| (set.created, set.sync));
    }

    /// Requests per rule so far: (rule, allowed, refused or failed). Read from the counters
    /// themselves, so the data path keeps no second count for the status page.
    pub fn requests_by_rule(&self) -> Vec<(String, u64, u64)> {
        let mut rules: std::collections::BTreeMap<String, (u64, u64)> = Default::default();
        for (labels, value) in samples(&self.requests) {
            let rule = label(&labels, "rule").to_string();
            let counts = rules.entry(rule).or_default();
            if label(&labels, "outcome") == Outcome::Allowed.as_str() {
                counts.0 += value;
            } else {
                counts.1 += value;
            }
        }
        rules
            .into_iter()
            .map(|(rule, (a, r))| (rule, a, r))
            .collect()
    }

    /// Name lookups so far: (`cached` or `bypass`, result, count).
    pub fn dns_lookup_counts(&self) -> Vec<(String, String, u64)> {
        samples(&self.dns_lookups)
            .map(|(labels, value)| {
                let path = label(&labels, "cache").to_string();
                (path, label(&labels, "result").to_string(), value)
            })
            .collect()
    }

    /// The Prometheus text exposition of everything, process metrics included.
    pub fn encode(&self) -> String {
        let mut families = self.registry.gather();
        // Process metrics are conventionally unprefixed (`process_*`), so they stay out of
        // the prefixed registry.
        families.extend(process_metrics());
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&families, &mut out)
            .expect("encoding into a Vec cannot fail");
        String::from_utf8(out).expect("the text format is UTF-8")
    }
}

/// `ip_ranges_age_seconds` and `ip_ranges_sync_token`: exported only while a set is loaded, so
/// a proxy without `[aws_ip_ranges]` shows no age to alert on. The age is computed at each
/// scrape, so it grows between refreshes without a timer.
#[derive(Clone)]
struct RangesGauges {
    age: Gauge,
    sync: IntGauge,
    /// `createDate` and `syncToken` of the set in force, in Unix seconds.
    loaded: Arc<Mutex<Option<(u64, u64)>>>,
}

impl RangesGauges {
    fn new() -> RangesGauges {
        RangesGauges {
            age: Gauge::new(
                "ip_ranges_age_seconds",
                "Seconds since the createDate of the AWS ip-ranges set in force",
            )
            .expect("valid metric"),
            sync: IntGauge::new(
                "ip_ranges_sync_token",
                "The syncToken of the AWS ip-ranges set in force",
            )
            .expect("valid metric"),
            loaded: Arc::new(Mutex::new(None)),
        }
    }
}

impl Collector for RangesGauges {
    fn desc(&self) -> Vec<&Desc> {
        self.age
            .desc()
            .into_iter()
            .chain(self.sync.desc())
            .collect()
    }

    fn collect(&self) -> Vec<prometheus::proto::MetricFamily> {
        let Some((created, sync)) = *self.loaded.lock().unwrap_or_else(|e| e.into_inner()) else {
            return Vec::new();
        };
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        self.age.set((now - created as f64).round());
        self.sync.set(i64::try_from(sync).unwrap_or(i64::MAX));
        let mut families = self.age.collect();
        families.extend(self.sync.collect());
        families
    }
}

fn process_metrics() -> Vec<prometheus::proto::MetricFamily> {
    use prometheus::core::Collector;
    prometheus::process_collector::ProcessCollector::for_self().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allowed_domains_are_capped() {
        let m = Metrics::new(2);
        assert_eq!(m.domain("a.example.com").label, "a.example.com");
        assert_eq!(m.domain("b.example.com").label, "b.example.com");
        assert_eq!(m.domain("c.example.com").label, OTHER);
        assert_eq!(m.domain("a.example.com").label, "a.example.com");
    }

    #[test]
    fn refused_names_cannot_crowd_out_allowed_ones() {
        let m = Metrics::new(10);
        for i in 0..50_000 {
            m.refused_label(&format!("junk{i}.example.net"));
        }
        assert_eq!(m.refused.len(), MAX_REFUSED_DOMAINS);
        assert_eq!(m.refused_label("junk99999.example.net"), OTHER);
        assert_eq!(
            m.domain("gw.amazonappstream.com").label,
            "gw.amazonappstream.com"
        );
    }

    #[test]
    fn exposition_has_the_contract_names() {
        let m = Metrics::new(10);
        m.request("gw.amazonappstream.com", "gw", None);
        m.domain("gw.amazonappstream.com").bytes_upstream.inc_by(5);
        let text = m.encode();
        for name in [
            "portcullis_requests_total",
            "portcullis_tunnels_active",
            "portcullis_tunnel_bytes_total",
            "portcullis_tunnel_duration_seconds",
            "portcullis_upstream_connect_seconds",
            "portcullis_dns_lookups_total",
            "portcullis_config_reloads_total",
            "portcullis_ip_ranges_refreshes_total{result=\"stale\"} 0",
            "portcullis_build_info",
            "process_",
        ] {
            assert!(text.contains(name), "{name} missing from\n{text}");
        }
    }

    #[test]
    fn ip_ranges_gauges_exist_only_with_a_set() {
        let m = Metrics::new(10);
        assert!(!m.encode().contains("portcullis_ip_ranges_age_seconds"));
        let set = IpRanges::parse(
            r#"{"syncToken": "1700000000", "createDate": "2020-01-01-00-00-00", "prefixes": []}"#,
        )
        .unwrap();
        m.ip_ranges_loaded(Some(&set));
        let text = m.encode();
        assert!(
            text.contains("portcullis_ip_ranges_sync_token 1700000000"),
            "{text}"
        );
        let age = text
            .lines()
            .find_map(|l| l.strip_prefix("portcullis_ip_ranges_age_seconds "))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap();
        assert!(age > 5.0 * 365.0 * 86_400.0, "{age}");
        m.ip_ranges_loaded(None);
        let text = m.encode();
        assert!(!text.contains("portcullis_ip_ranges_age_seconds"), "{text}");
        assert!(!text.contains("portcullis_ip_ranges_sync_token"), "{text}");
    }
}
