//! What one `/metrics` scrape costs once many domains are labelled, and the `[metrics]` keys
//! that keep it small: latency histograms per rule unless `domain_histograms` is on, and
//! `domain_label = "rule_pattern"` for rules whose hosts are per-session names.

mod support;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use portcullis::Config;
use support::{Origin, Setup, TestProxy, connect, start};

/// The pattern every test host falls under, in a rule named `sessions` on the origin's port.
const PATTERN: &str = "*.streaming.cardinality.test";

fn session(i: usize) -> String {
    format!("session-{i:04}.streaming.cardinality.test")
}

fn setup(origin: &Origin, metrics: &str) -> Setup {
    let port = origin.addr.port();
    Setup {
        metrics: metrics.to_string(),
        extra_rules: format!(
            "[[rule]]\nname = \"sessions\"\ndomains = [\"{PATTERN}\"]\nports = [\"{port}\"]\n\n\
             [[rule]]\nname = \"fixed\"\ndomains = [\"*.fixed.cardinality.test\"]\n\
             ports = [\"{port}\"]\ndomain_label = \"host\"\n"
        ),
        ..Setup::default()
    }
}

/// Swaps in `setup`'s config, as SIGHUP would.
fn reload(proxy: &TestProxy, setup: &Setup) {
    let text = setup.to_toml(proxy.dns.addr);
    let config = Config::parse(&text, "reload.toml").map_err(|e| e.to_string());
    proxy.proxy.reload(config).unwrap();
}

/// Opens one tunnel to each of `hosts` (fifty at a time), and waits until every one has closed
/// and been counted.
async fn tunnels(proxy: &TestProxy, origin: &Origin, hosts: &[String]) {
    let lo: IpAddr = "127.0.0.1".parse().unwrap();
    for host in hosts {
        proxy.dns.set(host, &[lo], 3600);
    }
    let closed_before = count(&proxy.metrics().await, "tunnel_duration_seconds_count");
    let port = origin.addr.port();
    for chunk in hosts.chunks(50) {
        let tasks: Vec<_> = chunk
            .iter()
            .map(|host| {
                let (addr, authority) = (proxy.addr, format!("{host}:{port}"));
                tokio::spawn(async move {
                    let (reply, stream) = connect(addr, &authority).await;
                    assert_eq!(reply.status, 200, "{authority}: {reply:?}");
                    drop(stream);
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
    }
    let want = closed_before + hosts.len() as f64;
    let closed = support::eventually(Duration::from_secs(10), || async {
        count(&proxy.metrics().await, "tunnel_duration_seconds_count") == want
    })
    .await;
    assert!(closed, "{} tunnels never all closed", hosts.len());
}

/// The sum of every `portcullis_{name}` sample.
fn count(text: &str, name: &str) -> f64 {
    let name = format!("portcullis_{name}");
    text.lines()
        .filter(|l| l.split(['{', ' ']).next() == Some(name.as_str()))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

/// The value of `label` on a sample line, if it has one.
fn label<'a>(line: &'a str, label: &str) -> Option<&'a str> {
    let start = line.find(&format!("{label}=\""))? + label.len() + 2;
    let len = line[start..].find('"')?;
    Some(&line[start..start + len])
}

/// Sample lines per `domain` label value.
fn series_per_domain(text: &str) -> BTreeMap<&str, usize> {
    let mut per = BTreeMap::new();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        if let Some(domain) = label(line, "domain") {
            *per.entry(domain).or_default() += 1;
        }
    }
    per
}

fn histogram_lines(text: &str) -> impl Iterator<Item = &str> {
    text.lines().filter(|l| {
        l.starts_with("portcullis_tunnel_duration_seconds")
            || l.starts_with("portcullis_upstream_connect_seconds")
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_domains_cost_a_few_series_each() {
    const DOMAINS: usize = 1000;
    let origin = Origin::echo().await;
    let proxy = start(setup(&origin, "")).await;
    let hosts: Vec<String> = (0..DOMAINS).map(session).collect();
    let started = Instant::now();
    tunnels(&proxy, &origin, &hosts).await;
    let opened = started.elapsed();

    let started = Instant::now();
    let text = proxy.metrics().await;
    let scraped = started.elapsed();
    eprintln!(
        "{DOMAINS} tunnels in {opened:?}; one scrape: {} bytes, {} lines, {scraped:?}",
        text.len(),
        text.lines().count()
    );
    let per_domain = series_per_domain(&text);
    for host in &hosts {
        let series = per_domain.get(host.as_str()).copied().unwrap_or(0);
        assert!((1..=6).contains(&series), "{host}: {series} series");
    }
    assert!(
        text.len() <= 600_000,
        "{} bytes at {DOMAINS} domains",
        text.len()
    );
    for line in histogram_lines(&text) {
        assert!(label(line, "rule").is_some(), "no rule: {line}");
        assert!(label(line, "domain").is_none(), "a domain: {line}");
    }
    let sessions = "portcullis_upstream_connect_seconds_count{rule=\"sessions\"}";
    assert_eq!(support::metric_value(&text, sessions), DOMAINS as f64);
}

/// `domain_histograms = true` adds `domain` to the histograms; a reload turning it off takes
/// effect for tunnels opened afterwards, and the per-domain series already exported stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn domain_histograms_are_an_opt_in_that_reloads() {
    let origin = Origin::echo().await;
    let on = setup(&origin, "domain_histograms = true");
    let proxy = start(on.clone()).await;
    tunnels(&proxy, &origin, &[session(1), session(2)]).await;
    let text = proxy.metrics().await;
    let by_domain = |host: String| {
        format!("portcullis_tunnel_duration_seconds_count{{domain=\"{host}\",rule=\"sessions\"}}")
    };
    let by_rule = "portcullis_tunnel_duration_seconds_count{rule=\"sessions\"}";
    assert_eq!(
        support::metric_value(&text, &by_domain(session(1))),
        1.0,
        "{text}"
    );
    assert_eq!(
        support::metric_value(&text, &by_domain(session(2))),
        1.0,
        "{text}"
    );
    assert!(!text.contains(by_rule), "{text}");

    reload(&proxy, &setup(&origin, "domain_histograms = false"));
    tunnels(&proxy, &origin, &[session(3)]).await;
    let text = proxy.metrics().await;
    assert_eq!(support::metric_value(&text, by_rule), 1.0, "{text}");
    assert_eq!(
        support::metric_value(&text, &by_domain(session(1))),
        1.0,
        "{text}"
    );
    assert!(!text.contains(&by_domain(session(3))), "{text}");
    // Every tunnel counted once across both kinds, as `sum by (rule)` would see it.
    assert_eq!(count(&text, "tunnel_duration_seconds_count"), 3.0, "{text}");

    reload(&proxy, &on);
    tunnels(&proxy, &origin, &[session(1)]).await;
    let text = proxy.metrics().await;
    assert_eq!(
        support::metric_value(&text, &by_domain(session(1))),
        2.0,
        "{text}"
    );
    assert_eq!(support::metric_value(&text, by_rule), 1.0, "{text}");
}

/// With `domain_label = "rule_pattern"` (here switched on by a reload) hosts under one pattern
/// share one label value; a rule that says `domain_label = "host"` keeps its hosts, and a host
/// no rule matches keeps its own name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rule_pattern_labels_many_hosts_as_one() {
    let origin = Origin::echo().await;
    let proxy = start(setup(&origin, "")).await;
    tunnels(&proxy, &origin, &[session(0), session(1)]).await;

    reload(&proxy, &setup(&origin, "domain_label = \"rule_pattern\""));
    let hosts: Vec<String> = (100..300).map(session).collect();
    tunnels(&proxy, &origin, &hosts).await;
    let fixed = ["a.fixed.cardinality.test".to_string()];
    tunnels(&proxy, &origin, &fixed).await;
    let (reply, _) = connect(proxy.addr, "missing.streaming.cardinality.test:443").await;
    assert_eq!(reply.reason(), Some("port_not_allowed"), "{reply:?}");
    let (reply, _) = connect(proxy.addr, "elsewhere.example.net:443").await;
    assert_eq!(reply.reason(), Some("domain_not_allowed"), "{reply:?}");

    let text = proxy.metrics().await;
    let domains: Vec<&str> = series_per_domain(&text).into_keys().collect();
    let mut want = vec![
        PATTERN,
        "_other",
        "a.fixed.cardinality.test",
        "elsewhere.example.net",
        "session-0000.streaming.cardinality.test",
        "session-0001.streaming.cardinality.test",
    ];
    want.sort();
    assert_eq!(domains, want, "{text}");
    let allowed = format!(
        "portcullis_requests_total{{domain=\"{PATTERN}\",outcome=\"allowed\",reason=\"\",rule=\"sessions\"}}"
    );
    assert_eq!(support::metric_value(&text, &allowed), 200.0, "{text}");
    let refused = format!(
        "portcullis_requests_total{{domain=\"{PATTERN}\",outcome=\"denied\",reason=\"port_not_allowed\",rule=\"sessions\"}}"
    );
    assert_eq!(support::metric_value(&text, &refused), 1.0, "{text}");
}
