//! Micro-benchmarks of the per-request decisions that run before any socket is opened:
//! host validation plus rule matching (`parse_host` + `RuleSet::check`) on the embedded
//! AppStream profile and on 10,000 generated rules, and the destination check
//! (`destination::Policy::check`). The 10,000 rules go through `Config::parse`, the path a
//! config file takes, and a third bench times that compile (it runs on every reload). A
//! fourth parses 1,000 to 8,000 rules that each have a problem, per rule: flat if finding and
//! placing problems grows linearly (each used to count the file's lines from the top).
//!
//! `cargo bench --bench matching`; targets: at most 200 ns per host on the default profile,
//! at most 1 µs with 10,000 rules. `benches/run.sh` runs this and quotes the results.

use std::hint::black_box;
use std::net::IpAddr;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use portcullis::destination::Policy;
use portcullis::rules::{self, Host, RuleSet, Verdict};

/// Hosts a CONNECT could name, against the default profile: the common case (a gateway), an
/// inner-wildcard rule late in the file, the private endpoint, and a refusal.
const DEFAULT_PROFILE_HOSTS: &[(&str, &str, u16)] = &[
    (
        "gateway",
        "as2-streaming-gateway-1234.us-east-1.amazonappstream.com",
        443,
    ),
    ("auth", "appstream2.eu-central-1.aws.amazon.com", 443),
    (
        "vpce",
        "vpce-0a1b2c3d4e5f.streaming.appstream.us-west-2.vpce.amazonaws.com",
        1450,
    ),
    ("refused", "www.example.com", 443),
];

/// Validates and matches one host, as the CONNECT handler does.
fn decide(rules: &RuleSet, host: &str, port: u16) -> bool {
    match rules::parse_host(host) {
        Ok(Host::Name(name)) => matches!(rules.check(&name, port), Verdict::Allowed(_)),
        _ => false,
    }
}

/// 10,000 rules in the shapes a large corporate allowlist has: a third leading wildcards
/// (`*.svc-N.tenant-M.example`), a third exact names, a third inner wildcards
/// (`api.*.region-N.example.org`), every other one with a second port range. Written as a config
/// file and parsed, so the rules are built exactly as the proxy builds them.
fn generated_config(count: usize) -> String {
    let mut toml = String::with_capacity(count * 96);
    for i in 0..count {
        let pattern = match i % 3 {
            0 => format!("*.svc-{i}.tenant-{}.example", i % 97),
            1 => format!("host-{i}.corp-{}.example.net", i % 89),
            _ => format!("api.*.region-{i}.example.org"),
        };
        let ports = if i % 2 == 0 {
            r#""443""#
        } else {
            r#""443", "8443-8450""#
        };
        toml.push_str(&format!(
            "[[rule]]\nname = \"rule-{i}\"\ndomains = [\"{pattern}\"]\nports = [{ports}]\n\n"
        ));
    }
    toml
}

fn parse_rules(text: &str) -> RuleSet {
    match portcullis::Config::parse(text, "generated") {
        Ok(config) => config.rules,
        Err(e) => panic!("generated config does not parse: {e}"),
    }
}

fn bench_default_profile(c: &mut Criterion) {
    let config = portcullis::Config::embedded();
    let rules = &config.rules;
    let mut group = c.benchmark_group("default_profile");
    group.throughput(Throughput::Elements(1));
    for &(label, host, port) in DEFAULT_PROFILE_HOSTS {
        assert_eq!(
            decide(rules, host, port),
            label != "refused",
            "{host}:{port} in the default profile"
        );
        group.bench_function(format!("parse_and_check/{label}"), |b| {
            b.iter(|| decide(rules, black_box(host), black_box(port)))
        });
    }
    let gateway = DEFAULT_PROFILE_HOSTS[0].1;
    group.bench_function("check_only/gateway", |b| {
        b.iter(|| rules.check(black_box(gateway), black_box(443)))
    });
    group.bench_function("parse_host_only/gateway", |b| {
        b.iter(|| rules::parse_host(black_box(DEFAULT_PROFILE_HOSTS[0].1)))
    });
    group.finish();
}

fn bench_many_rules(c: &mut Criterion) {
    const COUNT: usize = 10_000;
    let text = generated_config(COUNT);
    let rules = parse_rules(&text);
    assert_eq!(rules.rules().len(), COUNT);
    let hosts: &[(&str, String, u16)] = &[
        ("first_rule", "a.b.svc-0.tenant-0.example".to_string(), 443),
        (
            "last_leading_wildcard",
            format!("x.svc-{}.tenant-{}.example", COUNT - 1, (COUNT - 1) % 97),
            443,
        ),
        (
            "exact",
            format!("host-{}.corp-{}.example.net", 5_005, 5_005 % 89),
            8445,
        ),
        (
            "inner_wildcard",
            format!("api.eu-west-1.region-{}.example.org", 9_998),
            443,
        ),
        ("refused", "www.example.com".to_string(), 443),
        (
            "refused_near_miss",
            format!("svc-{}.tenant-{}.example", 3, 3),
            443,
        ),
    ];
    let mut group = c.benchmark_group("rules_10000");
    group.throughput(Throughput::Elements(1));
    for (label, host, port) in hosts {
        assert_eq!(
            decide(&rules, host, *port),
            !label.starts_with("refused"),
            "{host}:{port} against 10,000 rules"
        );
        group.bench_function(format!("parse_and_check/{label}"), |b| {
            b.iter(|| decide(&rules, black_box(host), black_box(*port)))
        });
    }
    for (label, host, port) in &hosts[..1] {
        group.bench_function(format!("check_only/{label}"), |b| {
            b.iter(|| rules.check(black_box(host), black_box(*port)))
        });
    }
    group.finish();

    let mut group = c.benchmark_group("rules_10000_compile");
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(3));
    group.bench_function("Config::parse", |b| {
        b.iter(|| parse_rules(black_box(&text)))
    });
    group.finish();
}

fn bench_destination(c: &mut Criterion) {
    let ip = |s: &str| s.parse::<IpAddr>().expect("valid address");
    let empty = Policy::default();
    let with_allow = Policy::new(vec![
        "127.0.0.0/8".parse().expect("valid net"),
        "10.20.0.0/16".parse().expect("valid net"),
        "fd00:1::/64".parse().expect("valid net"),
    ]);
    let cases: &[(&str, &Policy, IpAddr, bool, bool)] = &[
        ("public_v4", &empty, ip("52.94.236.248"), false, true),
        ("loopback_v4_refused", &empty, ip("127.0.0.1"), false, false),
        (
            "metadata_refused",
            &empty,
            ip("169.254.169.254"),
            false,
            false,
        ),
        ("public_v6", &empty, ip("2600:1f18:4c3::1"), false, true),
        (
            "mapped_v6_refused",
            &empty,
            ip("::ffff:10.0.0.1"),
            false,
            false,
        ),
        (
            "private_endpoint_rfc1918",
            &empty,
            ip("10.1.2.3"),
            true,
            true,
        ),
        ("allow_list_hit", &with_allow, ip("127.0.0.1"), false, true),
        (
            "allow_list_miss_public",
            &with_allow,
            ip("52.94.236.248"),
            false,
            true,
        ),
    ];
    let mut group = c.benchmark_group("destination");
    group.throughput(Throughput::Elements(1));
    for &(label, policy, addr, private_endpoint, allowed) in cases {
        assert_eq!(
            policy.check(addr, private_endpoint).is_ok(),
            allowed,
            "{label}"
        );
        group.bench_function(label, |b| {
            b.iter(|| policy.check(black_box(addr), black_box(private_endpoint)))
        });
    }
    group.finish();
}

/// `require_ip_ranges` with 10,000 published prefixes (about the size of AWS's real file):
/// one lookup for an address inside a prefix, one outside.
fn bench_ip_ranges(c: &mut Criterion) {
    let mut prefixes = Vec::with_capacity(10_000);
    for i in 0..10_000u32 {
        // Spread /24s over 3.0.0.0 - 54.x, every other one CLOUDFRONT.
        let net = 0x0300_0000u32 + i * 0x0001_4100;
        let service = if i % 2 == 0 { "CLOUDFRONT" } else { "AMAZON" };
        prefixes.push(format!(
            "{{\"ip_prefix\": \"{}/24\", \"region\": \"GLOBAL\", \"service\": \"{service}\"}}",
            std::net::Ipv4Addr::from(net)
        ));
    }
    let json = format!(
        "{{\"syncToken\": \"1\", \"createDate\": \"2026-11-23-00-00-00\", \"prefixes\": [{}]}}",
        prefixes.join(",")
    );
    let ranges = portcullis::ip_ranges::IpRanges::parse(&json).expect("generated file parses");
    let services = ["CLOUDFRONT".to_string()];
    let inside: IpAddr = std::net::Ipv4Addr::from(0x0300_0000u32 + 5000 * 0x0001_4100 + 7).into();
    let outside: IpAddr = "203.0.113.9".parse().unwrap();
    let mut group = c.benchmark_group("ip_ranges_10000");
    group.throughput(Throughput::Elements(1));
    group.bench_function("inside", |b| {
        b.iter(|| ranges.contains(black_box(&services), black_box(inside)))
    });
    group.bench_function("outside", |b| {
        b.iter(|| ranges.contains(black_box(&services), black_box(outside)))
    });
    group.finish();
}

/// `Config::parse` of `N` rules that each name port 0, so it reports `N` problems, each with
/// its line. Throughput is per rule: the same time per rule at every `N` is linear growth.
fn bench_config_problems(c: &mut Criterion) {
    let mut group = c.benchmark_group("config_problems");
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(3));
    for count in [1_000, 2_000, 4_000, 8_000] {
        let text = generated_config(count).replace(r#"ports = ["443""#, r#"ports = ["0""#);
        let problems = match portcullis::Config::parse(&text, "generated") {
            Ok(_) => panic!("port 0 is refused"),
            Err(e) => e.problems.len(),
        };
        assert_eq!(problems, count, "one problem per rule");
        group.throughput(Throughput::Elements(count as u64));
        group.bench_function(format!("Config::parse/{count}"), |b| {
            b.iter(|| portcullis::Config::parse(black_box(&text), "generated").is_err())
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = bench_default_profile, bench_many_rules, bench_destination, bench_ip_ranges,
        bench_config_problems
}
criterion_main!(benches);
