//! `portcullis explain HOST:PORT` (the real binary, a config file pointing `[dns] servers` at the
//! test DNS server) and `GET /explain` on a running proxy's admin listener: every reason a
//! CONNECT can be refused for before it connects, named with its cause, and an explanation that
//! agrees with what a real CONNECT gets.

mod support;

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde_json::Value;
use support::{DnsMode, Origin, Setup, TestDns, connect, start};

const FIXTURE: &str = "tests/fixtures/ip-ranges.json";
const ENDPOINT: &str = "vpce-0123.streaming.appstream.us-east-1.vpce.amazonaws.com";

fn ips(list: &[&str]) -> Vec<IpAddr> {
    list.iter().map(|s| s.parse().unwrap()).collect()
}

/// A DNS server and a config file for the binary: the embedded profile (its own SNI modes and
/// an empty `[destinations] allow`), asking that server, plus `extra` at the end.
struct Cli {
    dns: TestDns,
    _dir: tempfile::TempDir,
    config: PathBuf,
}

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Cli {
    async fn new(extra: &str) -> Cli {
        let dns = TestDns::start().await;
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("portcullis.toml");
        let text = portcullis::config::DEFAULT_CONFIG
            .replace("servers = []", &format!("servers = [\"{}\"]", dns.addr));
        std::fs::write(&config, format!("{text}\n{extra}")).unwrap();
        Cli {
            dns,
            _dir: dir,
            config,
        }
    }

    /// `portcullis explain TARGET --config FILE` and `more` arguments.
    async fn explain(&self, target: &str, more: &[&str]) -> Run {
        let config = self.config.to_str().unwrap();
        let mut args = vec!["explain", target, "--config", config];
        args.extend(more);
        run(&args).await
    }
}

async fn run(args: &[&str]) -> Run {
    let output = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::process::Command::new(env!("CARGO_BIN_EXE_portcullis"))
            .args(args)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("explain answers within 30 s")
    .unwrap();
    Run {
        code: output.status.code().unwrap_or(-1),
        stdout: String::from_utf8(output.stdout).unwrap(),
        stderr: String::from_utf8(output.stderr).unwrap(),
    }
}

impl Run {
    /// Asserts the exit code and that each piece is in the output (wrapped lines joined).
    fn expect(&self, code: i32, pieces: &[&str]) {
        let text = self.unwrapped();
        assert_eq!(self.code, code, "{}{}", self.stdout, self.stderr);
        for piece in pieces {
            assert!(text.contains(piece), "{piece:?} not in:\n{}", self.stdout);
        }
    }

    /// The output with the text layout undone (line breaks and column padding are single
    /// spaces), so assertions need not know where a line broke.
    fn unwrapped(&self) -> String {
        self.stdout.split_whitespace().collect::<Vec<_>>().join(" ")
    }

    fn refused(&self, status: &str, reason: &str, pieces: &[&str]) {
        self.expect(1, pieces);
        self.expect(
            1,
            &[
                &format!("refused: {status}"),
                &format!("Proxy-Status: portcullis; error={reason}"),
            ],
        );
    }
}

#[tokio::test]
async fn an_allowed_host_names_its_rule_its_addresses_and_the_200() {
    let cli = Cli::new("").await;
    let host = "gw1.amazonappstream.com";
    cli.dns.set(host, &ips(&["52.94.1.1", "2600:1f18::1"]), 60);
    let run = cli.explain(&format!("{host}:443"), &[]).await;
    run.expect(
        0,
        &[
            "rule appstream-gateway (pattern *.amazonappstream.com; ports 443)",
            "sni info enforce: after the 200",
            "dns info cached",
            &format!("52.94.1.1, 2600:1f18::1 (from {})", cli.dns.addr),
            "52.94.1.1: allowed; in no special-purpose range",
            "the proxy would connect to 52.94.1.1 first, then 2600:1f18::1 in turn",
            "allowed: 200 Connection established",
            "explain does not connect to the origin",
        ],
    );
    assert!(
        cli.dns.queries(host) >= 1,
        "the configured server was asked"
    );
}

#[tokio::test]
async fn a_host_no_rule_matches_gets_the_nearest_miss() {
    let cli = Cli::new("").await;
    let typo = cli.explain("gw1.amazonappsteam.com:443", &[]).await;
    typo.refused(
        "403 Forbidden",
        "domain_not_allowed",
        &[
            "no rule matches gw1.amazonappsteam.com",
            "nearest: pattern *.amazonappstream.com (rule appstream-gateway)",
            "`amazonappsteam.com` is 1 edit away from `amazonappstream.com` (a typo?)",
        ],
    );
    let suffix = cli.explain("x.amazonappstream.com.evil.net:443", &[]).await;
    suffix.refused(
        "403 Forbidden",
        "domain_not_allowed",
        &[
            "nearest: pattern *.amazonappstream.com",
            "a name under `evil.net`",
        ],
    );
    let apex = cli.explain("amazonappstream.com:443", &[]).await;
    apex.refused(
        "403 Forbidden",
        "domain_not_allowed",
        &["a wildcard never matches its apex"],
    );
    assert_eq!(cli.dns.total_queries(), 0, "no lookup for a refused name");
}

#[tokio::test]
async fn a_port_the_rule_does_not_allow_lists_its_ports() {
    let cli = Cli::new("").await;
    cli.explain("gw.amazonappstream.com:8443", &[])
        .await
        .refused(
            "403 Forbidden",
            "port_not_allowed",
            &[
                "matches rule appstream-gateway (pattern *.amazonappstream.com; ports 443), but \
             not on port 8443",
            ],
        );
    cli.explain(&format!("{ENDPOINT}:1500"), &[]).await.refused(
        "403 Forbidden",
        "port_not_allowed",
        &["ports 443, 1400-1499), but not on port 1500"],
    );
}

#[tokio::test]
async fn ip_literals_and_malformed_targets() {
    let cli = Cli::new("").await;
    for literal in ["10.0.0.1:443", "[::1]:443", "127.1:443"] {
        cli.explain(literal, &[]).await.refused(
            "403 Forbidden",
            "ip_literal",
            &["an IP literal matches no domain rule"],
        );
    }
    for (bad, why) in [
        ("a..b.amazonappstream.com:443", "empty label"),
        ("gw.amazonappstream.com", "no port"),
        (
            "gw.amazonappstream.com:0",
            "port `0` is not a number from 1 to 65535",
        ),
        ("user@gw.amazonappstream.com:443", "credentials"),
    ] {
        cli.explain(bad, &[])
            .await
            .refused("400 Bad Request", "bad_request", &[why]);
    }
    assert_eq!(cli.dns.total_queries(), 0);
}

#[tokio::test]
async fn a_refused_destination_names_its_range() {
    let cli = Cli::new("").await;
    cli.dns
        .set("gw-lan.amazonappstream.com", &ips(&["10.1.2.3"]), 60);
    cli.dns.set(
        "gw-meta.amazonappstream.com",
        &ips(&["169.254.169.254"]),
        60,
    );
    cli.explain("gw-lan.amazonappstream.com:443", &[])
        .await
        .refused(
            "403 Forbidden",
            "destination_not_allowed",
            &["10.1.2.3: refused; in 10.0.0.0/8 RFC 1918 private"],
        );
    cli.explain("gw-meta.amazonappstream.com:443", &[])
        .await
        .refused(
            "403 Forbidden",
            "destination_not_allowed",
            &["169.254.169.254: refused; in 169.254.0.0/16 link-local \
                 (169.254.169.254 is the cloud metadata service (AWS IMDS))"],
        );
}

#[tokio::test]
async fn nat64_addresses_are_judged_by_the_ipv4_inside() {
    let cli = Cli::new("").await;
    cli.dns.set(
        "gw-nat64.amazonappstream.com",
        &ips(&["64:ff9b::a9fe:a9fe"]),
        60,
    );
    cli.dns.set(
        "gw-dns64.amazonappstream.com",
        &ips(&["64:ff9b::3400:0102"]),
        60,
    );
    cli.explain("gw-nat64.amazonappstream.com:443", &[])
        .await
        .refused(
            "403 Forbidden",
            "destination_not_allowed",
            &[
                "64:ff9b::a9fe:a9fe: refused; carries 169.254.169.254 (NAT64 64:ff9b::/96), \
                 judged as that; in 169.254.0.0/16 link-local",
                "cloud metadata service",
            ],
        );
    cli.explain("gw-dns64.amazonappstream.com:443", &[])
        .await
        .expect(
            0,
            &[
                "64:ff9b::3400:102: allowed; carries 52.0.1.2 (NAT64 64:ff9b::/96), judged as \
                 that; in no special-purpose range",
                "allowed: 200 Connection established",
            ],
        );
}

#[tokio::test]
async fn dns_failures_are_502s() {
    let cli = Cli::new("").await;
    cli.explain("nx.amazonappstream.com:443", &[])
        .await
        .refused(
            "502 Bad Gateway",
            "dns_nxdomain",
            &["nx.amazonappstream.com: no address for this name"],
        );
    assert!(cli.dns.queries("nx.amazonappstream.com") >= 1);
    cli.dns.set_mode(DnsMode::ServFail);
    cli.explain("gw.amazonappstream.com:443", &[])
        .await
        .refused("502 Bad Gateway", "dns_error", &["lookup failed"]);
}

#[tokio::test]
async fn a_private_endpoint_bypasses_the_cache_and_may_reach_rfc1918() {
    let cli = Cli::new("").await;
    cli.dns.set(ENDPOINT, &ips(&["10.1.2.3"]), 60);
    for port in [443, 1450] {
        cli.explain(&format!("{ENDPOINT}:{port}"), &[])
            .await
            .expect(
                0,
                &[
                    "rule appstream-interface-endpoint",
                    "sni info log:",
                    "dns info bypass: a private_endpoint rule",
                    "10.1.2.3: allowed; in 10.0.0.0/8 RFC 1918 private, which a private_endpoint \
                 rule may reach",
                    "allowed: 200 Connection established",
                ],
            );
    }
}

#[tokio::test]
async fn no_resolve_sends_no_query() {
    let cli = Cli::new("").await;
    let host = "gw.amazonappstream.com";
    cli.dns.set(host, &ips(&["10.1.2.3"]), 60);
    cli.explain(&format!("{host}:443"), &["--no-resolve"])
        .await
        .expect(
            0,
            &[
                "rule appstream-gateway",
                "resolve skip not resolved, as asked",
                "allowed by the rules: 200 Connection established, if the addresses pass",
            ],
        );
    assert_eq!(cli.dns.total_queries(), 0);
    // Without the flag the same name is refused: the check needed the addresses.
    cli.explain(&format!("{host}:443"), &[]).await.refused(
        "403 Forbidden",
        "destination_not_allowed",
        &["10.1.2.3"],
    );
}

#[tokio::test]
async fn require_ip_ranges_is_judged_against_the_config_file() {
    let fixture = std::fs::canonicalize(FIXTURE).unwrap();
    let cli = Cli::new(&format!(
        "[[rule]]\nname = \"cf-checked\"\ndomains = [\"*.checked.example.com\"]\n\
         ports = [\"443\"]\nrequire_ip_ranges = [\"CLOUDFRONT\"]\n\n\
         [aws_ip_ranges]\nfile = {:?}\n",
        fixture.to_str().unwrap()
    ))
    .await;
    cli.dns
        .set("in.checked.example.com", &ips(&["13.32.0.1"]), 60);
    cli.dns
        .set("out.checked.example.com", &ips(&["52.94.1.1"]), 60);
    cli.explain("in.checked.example.com:443", &[]).await.expect(
        0,
        &[
            "rule cf-checked admits only addresses AWS publishes for CLOUDFRONT",
            "createDate 2026-11-21-12-03-13, syncToken 1763726593 (the config's \
             [aws_ip_ranges] file)",
            "13.32.0.1: inside (CLOUDFRONT)",
        ],
    );
    cli.explain("out.checked.example.com:443", &[])
        .await
        .refused(
            "403 Forbidden",
            "destination_not_allowed",
            &[
                "52.94.1.1: allowed; in no special-purpose range",
                "52.94.1.1: outside",
            ],
        );
}

#[tokio::test]
async fn config_and_usage_errors_exit_2() {
    support::isolate();
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[proxy]\nheader_timeout = \"soon\"\n").unwrap();
    let bad = bad.to_str().unwrap();
    let run = run(&["explain", "gw.amazonappstream.com:443", "--config", bad]).await;
    assert_eq!(run.code, 2, "{}{}", run.stdout, run.stderr);
    assert!(run.stderr.contains(&format!("{bad}:2: ")), "{}", run.stderr);
    assert!(run.stdout.is_empty());
    let missing = dir.path().join("missing.toml");
    let missing = missing.to_str().unwrap();
    let run2 = self::run(&["explain", "gw.amazonappstream.com:443", "--config", missing]).await;
    assert_eq!(run2.code, 2);
    assert!(run2.stderr.contains("cannot read"), "{}", run2.stderr);
    assert_eq!(self::run(&["explain"]).await.code, 2, "no target");
    assert_eq!(
        self::run(&["explain", "a.example.com:443", "--bogus"])
            .await
            .code,
        2
    );
}

/// A proxy with the profile's rules and nothing allowed past the destination deny list.
async fn live() -> support::TestProxy {
    start(Setup {
        destinations_allow: Vec::new(),
        ..Setup::default()
    })
    .await
}

async fn explain_json(proxy: &support::TestProxy, query: &str) -> (u16, Value) {
    let (status, body) = proxy.admin_get(&format!("/explain?{query}")).await;
    let json = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
    (status, json)
}

#[tokio::test]
async fn the_admin_endpoint_answers_in_json_field_by_field() {
    let proxy = live().await;
    proxy
        .dns
        .set("gw.amazonappstream.com", &ips(&["52.94.1.1"]), 60);
    let (status, x) = explain_json(&proxy, "host=gw.amazonappstream.com&port=443").await;
    assert_eq!(status, 200);
    assert_eq!(x["allowed"], true);
    assert_eq!(x["status"], 200);
    assert_eq!(x["reason"], "");
    assert_eq!(x["proxy_status"], Value::Null);
    assert_eq!(x["rule"], "appstream-gateway");
    assert_eq!(x["host"], "gw.amazonappstream.com");
    assert_eq!(x["port"], 443);
    assert_eq!(x["config"], "test.toml");
    assert_eq!(x["sni"], "off", "the test harness turns SNI off");
    assert_eq!(x["dns"], "cached");
    assert_eq!(x["resolved"], true);
    let steps: Vec<(&str, &str)> = x["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["step"].as_str().unwrap(), s["verdict"].as_str().unwrap()))
        .collect();
    assert_eq!(
        steps,
        [
            ("target", "pass"),
            ("rule", "pass"),
            ("sni", "info"),
            ("dns", "info"),
            ("resolve", "pass"),
            ("destination", "pass"),
            ("reply", "pass")
        ]
    );
    assert!(
        x["steps"]
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s["detail"].as_str().is_some_and(|d| !d.is_empty()))
    );
    let address = &x["addresses"][0];
    assert_eq!(address["address"], "52.94.1.1");
    assert_eq!(address["allowed"], true);
    assert_eq!(address["range"], Value::Null);
    assert_eq!(address["via"], "public");
    assert_eq!(address["ip_ranges"], Value::Null);
    assert_eq!(x["addresses"].as_array().unwrap().len(), 1);
    assert!(x["notes"][0].as_str().unwrap().contains("does not connect"));

    proxy.dns.set(
        "gw-meta.amazonappstream.com",
        &ips(&["169.254.169.254"]),
        60,
    );
    let (status, x) = explain_json(&proxy, "host=gw-meta.amazonappstream.com&port=443").await;
    assert_eq!(status, 200, "the explanation itself is a 200");
    assert_eq!(x["allowed"], false);
    assert_eq!(x["status"], 403);
    assert_eq!(x["reason"], "destination_not_allowed");
    assert_eq!(
        x["proxy_status"],
        "portcullis; error=destination_not_allowed"
    );
    assert_eq!(x["addresses"][0]["range"], "169.254.0.0/16 link-local");
    assert_eq!(x["addresses"][0]["via"], "refused");
    assert_eq!(x["addresses"][0]["allowed"], false);
    assert_eq!(x["steps"][5]["step"], "destination");
    assert_eq!(x["steps"][5]["verdict"], "refuse");

    let (_, x) = explain_json(&proxy, "host=gw1.amazonappsteam.com&port=443").await;
    assert_eq!(
        (x["status"].as_u64(), x["reason"].as_str()),
        (Some(403), Some("domain_not_allowed"))
    );
    assert_eq!(x["rule"], Value::Null);
    assert_eq!(x["near_miss"]["pattern"], "*.amazonappstream.com");
    assert_eq!(x["near_miss"]["rule"], "appstream-gateway");
    assert!(x["near_miss"]["why"].as_str().unwrap().contains("a typo?"));

    let (_, x) = explain_json(&proxy, "host=gw.amazonappstream.com&port=8443").await;
    assert_eq!(x["reason"], "port_not_allowed");
    assert_eq!(x["rule"], "appstream-gateway");

    let (_, x) = explain_json(&proxy, "host=nx.amazonappstream.com&port=443").await;
    assert_eq!(
        (x["status"].as_u64(), x["reason"].as_str()),
        (Some(502), Some("dns_nxdomain"))
    );

    let (_, x) = explain_json(&proxy, "host=%3A%3A1&port=443").await;
    assert_eq!(x["reason"], "ip_literal");
    assert_eq!(x["host"], "::1");

    let queries = proxy.dns.total_queries();
    let (_, x) = explain_json(
        &proxy,
        "host=gw2.amazonappstream.com&port=443&resolve=false",
    )
    .await;
    assert_eq!(x["allowed"], true);
    assert_eq!(x["resolved"], false);
    assert_eq!(
        proxy.dns.total_queries(),
        queries,
        "resolve=false sends no query"
    );
}

#[tokio::test]
async fn the_admin_endpoint_refuses_a_query_it_cannot_read() {
    let proxy = live().await;
    for query in [
        "host=gw.amazonappstream.com",
        "port=443",
        "host=&port=443",
        "host=gw.amazonappstream.com&port=https",
    ] {
        let (status, x) = explain_json(&proxy, query).await;
        assert_eq!(status, 400, "{query}");
        assert!(x["error"].as_str().is_some_and(|e| !e.is_empty()), "{x}");
    }
    let (status, x) = explain_json(&proxy, "host=gw.amazonappstream.com").await;
    assert_eq!(status, 400);
    assert!(x["error"].as_str().unwrap().contains("port"), "{x}");
    assert_eq!(proxy.dns.total_queries(), 0);
}

#[tokio::test]
async fn the_admin_endpoint_is_bounded_by_connect_timeout() {
    let proxy = start(Setup {
        connect_timeout: "1s",
        ..Setup::default()
    })
    .await;
    proxy.dns.set_mode(DnsMode::Silent);
    let started = std::time::Instant::now();
    let (status, x) = explain_json(&proxy, "host=gw.amazonappstream.com&port=443").await;
    assert_eq!(status, 200);
    assert_eq!(
        (x["status"].as_u64(), x["reason"].as_str()),
        (Some(504), Some("upstream_timeout"))
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}

/// The explanation and a real CONNECT through the same proxy reach the same reply, for every
/// kind of outcome explain can foresee.
#[tokio::test]
async fn explain_agrees_with_a_real_connect() {
    let origin = Origin::echo().await;
    let port = origin.addr.port();
    let proxy = start(Setup {
        extra_rules: format!(
            "[[rule]]\nname = \"agree\"\ndomains = [\"*.agree.example.com\"]\nports = [\"{port}\"]\n"
        ),
        ..Setup::default()
    })
    .await;
    proxy
        .dns
        .set("ok.agree.example.com", &ips(&["127.0.0.1"]), 60);
    proxy
        .dns
        .set("meta.agree.example.com", &ips(&["169.254.169.254"]), 60);
    proxy
        .dns
        .set("lan.agree.example.com", &ips(&["10.1.2.3"]), 60);
    proxy
        .dns
        .set("nat64.agree.example.com", &ips(&["64:ff9b::a9fe:a9fe"]), 60);
    for (host, port) in [
        ("ok.agree.example.com", port),
        ("ok.agree.example.com", 1),
        ("meta.agree.example.com", port),
        ("lan.agree.example.com", port),
        ("nat64.agree.example.com", port),
        ("nx.agree.example.com", port),
        ("agree.example.com", port),
        ("127.0.0.1", port),
        ("a..b.example.com", port),
    ] {
        let query = format!("host={host}&port={port}");
        let (_, x) = explain_json(&proxy, &query).await;
        let (reply, _) = connect(proxy.addr, &format!("{host}:{port}")).await;
        assert_eq!(
            x["status"].as_u64(),
            Some(u64::from(reply.status)),
            "{host}:{port} {x}"
        );
        assert_eq!(
            x["reason"].as_str(),
            Some(reply.reason().unwrap_or("")),
            "{host}:{port}"
        );
    }
}
