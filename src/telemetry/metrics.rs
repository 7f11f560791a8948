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
//!
//! What a scrape costs grows with those label values, so each one gets only a few series: the
//! request counter, the tunnel gauge and the two byte counters. The latency histograms (every
//! bucket a series) are per rule unless `domain_histograms` asks for them per domain too: at
//! 1,000 domains per-domain histograms were 31 of the 35 lines each domain cost a scrape.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use dashmap::DashMap;
use prometheus::core::{Collector, Desc};
use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::config::MetricsConfig;
use crate::error::{Outcome, Reason};
use crate::ip_ranges::IpRanges;
use crate::ip_ranges::refresh::RESULTS;
use crate::rules::Rule;

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
    tunnel_duration: Latency,
    upstream_connect: Latency,
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
    /// `[metrics] domain_histograms`: tunnels opened while it is on observe into series that
    /// carry `domain` as well as `rule`.
    domain_histograms: AtomicBool,
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
}

/// The latency histograms one tunnel observes into, resolved when it opens.
pub struct TunnelLatency {
    pub upstream_connect: Histogram,
    pub tunnel_duration: Histogram,
}

impl Metrics {
    pub fn new(settings: &MetricsConfig) -> Metrics {
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
        let tunnel_duration = Latency::new(
            "tunnel_duration_seconds",
            "How long tunnels stayed open",
            TUNNEL_SECONDS,
        );
        let upstream_connect = Latency::new(
            "upstream_connect_seconds",
            "DNS plus TCP connect to the origin",
            CONNECT_SECONDS,
        );
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
            max_domains: AtomicUsize::new(settings.max_domains),
            domain_histograms: AtomicBool::new(settings.domain_histograms),
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

    /// Applies a config's `[metrics]`, at start and on every reload. A changed cap binds label
    /// values handed out from now on; those already handed out stay. A changed
    /// `domain_histograms` applies to tunnels opened from now on; series already exported stay
    /// and stop moving. Without `domain_histograms`, every rule's histogram series exist from
    /// here on, so `rate()` sees a rule's first tunnel.
    pub fn configure(&self, settings: &MetricsConfig, rules: &[Rule]) {
        self.max_domains
            .store(settings.max_domains, Ordering::Relaxed);
        self.domain_histograms
            .store(settings.domain_histograms, Ordering::Relaxed);
        if !settings.domain_histograms {
            for rule in rules {
                self.upstream_connect.series(&rule.name, None);
                self.tunnel_duration.series(&rule.name, None);
            }
        }
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
        }
    }

    /// The histograms of a tunnel that `rule` admitted and that counts under `domain`.
    pub fn latency(&self, rule: &str, domain: &DomainMetrics) -> TunnelLatency {
        let domain = self
            .domain_histograms
            .load(Ordering::Relaxed)
            .then_some(domain.label.as_str());
        TunnelLatency {
            upstream_connect: self.upstream_connect.series(rule, domain),
            tunnel_duration: self.tunnel_duration.series(rule, domain),
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

/// One latency histogram: series per `rule`, and (with `domain_histograms`) per `rule` and
/// `domain`. Both kinds go out under the one name, so those a reload of `domain_histograms`
/// left behind stay visible rather than vanish, and `sum by (rule, le)` counts every
/// observation exactly once whichever kind it went to.
#[derive(Clone)]
struct Latency {
    by_rule: HistogramVec,
    by_domain: HistogramVec,
}

impl Latency {
    fn new(name: &str, help: &str, buckets: &[f64]) -> Latency {
        let opts = || HistogramOpts::new(name, help).buckets(buckets.to_vec());
        Latency {
            by_rule: HistogramVec::new(opts(), &["rule"]).expect("valid metric"),
            by_domain: HistogramVec::new(opts(), &["rule", "domain"]).expect("valid metric"),
        }
    }

    fn series(&self, rule: &str, domain: Option<&str>) -> Histogram {
        match domain {
            None => self.by_rule.with_label_values(&[rule]),
            Some(domain) => self.by_domain.with_label_values(&[rule, domain]),
        }
    }
}

impl Collector for Latency {
    /// The per-rule description alone: the registry refuses two descriptions of one name with
    /// different label names, and the per-domain series join its family in `collect`.
    fn desc(&self) -> Vec<&Desc> {
        self.by_rule.desc()
    }

    fn collect(&self) -> Vec<prometheus::proto::MetricFamily> {
        let mut families = self.by_rule.collect();
        let by_domain = self.by_domain.collect();
        if let Some(family) = families.first_mut() {
            for mut more in by_domain {
                for metric in more.take_metric() {
                    family.mut_metric().push(metric);
                }
            }
        }
        families
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

    fn metrics(max_domains: usize) -> Metrics {
        Metrics::new(&MetricsConfig {
            max_domains,
            ..MetricsConfig::default()
        })
    }

    #[test]
    fn allowed_domains_are_capped() {
        let m = metrics(2);
        assert_eq!(m.domain("a.example.com").label, "a.example.com");
        assert_eq!(m.domain("b.example.com").label, "b.example.com");
        assert_eq!(m.domain("c.example.com").label, OTHER);
        assert_eq!(m.domain("a.example.com").label, "a.example.com");
    }

    #[test]
    fn refused_names_cannot_crowd_out_allowed_ones() {
        let m = metrics(10);
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

    /// Lines of the exposition that carry `label="value"`.
    fn lines_with(text: &str, label: &str, value: &str) -> usize {
        let needle = format!("{label}=\"{value}\"");
        text.lines().filter(|l| l.contains(&needle)).count()
    }

    #[test]
    fn a_thousand_domains_cost_a_few_series_each() {
        let m = metrics(1000);
        for i in 0..1000 {
            let host = format!("session-{i:04}.streaming.appstream2.us-east-1.on.aws");
            let handles = m.domain(&host);
            m.request(&handles.label, "gateway", None);
            handles.bytes_upstream.inc_by(100);
            let latency = m.latency("gateway", &handles);
            latency.upstream_connect.observe(0.01);
            latency.tunnel_duration.observe(60.0);
        }
        let text = m.encode();
        let host = "session-0042.streaming.appstream2.us-east-1.on.aws";
        assert_eq!(lines_with(&text, "domain", host), 4, "{text}");
        assert!(text.len() <= 600_000, "{} bytes", text.len());
        assert_eq!(
            sample(
                &text,
                "portcullis_upstream_connect_seconds_count{rule=\"gateway\"}"
            ),
            1000.0
        );
    }

    fn sample(text: &str, series: &str) -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
            .unwrap_or(0.0)
    }

    #[test]
    fn domain_histograms_add_the_domain_from_the_next_tunnel_on() {
        let m = metrics(10);
        let gw = m.domain("gw1.amazonappstream.com");
        m.latency("gw", &gw).upstream_connect.observe(0.01);
        let count = "portcullis_upstream_connect_seconds_count";
        let by_rule = format!("{count}{{rule=\"gw\"}}");
        let by_domain = format!("{count}{{domain=\"gw1.amazonappstream.com\",rule=\"gw\"}}");
        let text = m.encode();
        assert_eq!(sample(&text, &by_rule), 1.0, "{text}");
        assert!(!text.contains(&by_domain), "{text}");

        let on = MetricsConfig {
            domain_histograms: true,
            ..MetricsConfig::default()
        };
        m.configure(&on, &[]);
        m.latency("gw", &gw).upstream_connect.observe(0.01);
        let text = m.encode();
        // One family; the per-rule series stays and stops moving, so sums by rule still count
        // each tunnel once.
        assert_eq!(sample(&text, &by_rule), 1.0, "{text}");
        assert_eq!(sample(&text, &by_domain), 1.0, "{text}");
        let family = "# TYPE portcullis_upstream_connect_seconds histogram";
        assert_eq!(text.matches(family).count(), 1, "{text}");

        m.configure(&MetricsConfig::default(), &[]);
        m.latency("gw", &gw).upstream_connect.observe(0.01);
        let text = m.encode();
        assert_eq!(sample(&text, &by_rule), 2.0, "{text}");
        assert_eq!(sample(&text, &by_domain), 1.0, "{text}");
    }

    #[test]
    fn every_rule_has_its_histograms_before_its_first_tunnel() {
        let m = metrics(10);
        let config = crate::Config::embedded();
        m.configure(&config.metrics, config.rules.rules());
        let text = m.encode();
        for rule in config.rules.rules() {
            let series = format!(
                "portcullis_tunnel_duration_seconds_count{{rule=\"{}\"}} 0",
                rule.name
            );
            assert!(text.contains(&series), "{series} missing from\n{text}");
        }
    }

    #[test]
    fn exposition_has_the_contract_names() {
        let m = metrics(10);
        m.request("gw.amazonappstream.com", "gw", None);
        let gw = m.domain("gw.amazonappstream.com");
        gw.bytes_upstream.inc_by(5);
        m.latency("gw", &gw).tunnel_duration.observe(1.0);
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
        let m = metrics(10);
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
