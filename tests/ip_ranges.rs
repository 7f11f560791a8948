//! `require_ip_ranges`: the connected address must lie in AWS's published prefixes.
//! The fixture `tests/fixtures/ip-ranges.json` holds real CloudFront and AMAZON prefixes in the
//! documented format, some entries without `network_border_group` as in older files.

mod support;

use std::net::IpAddr;
use std::process::Command;

use portcullis::ip_ranges::IpRanges;
use support::{Origin, Setup, assert_echo, connect, start};

const FIXTURE: &str = "tests/fixtures/ip-ranges.json";
const HOST: &str = "d111abcdef8.cloudfront.net";

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

#[test]
fn the_fixture_loads_with_real_prefixes() {
    let ranges = IpRanges::load(std::path::Path::new(FIXTURE)).unwrap();
    let cf = ["CLOUDFRONT".to_string()];
    assert!(ranges.contains(&cf, ip("13.33.1.1")));
    assert!(ranges.contains(&cf, ip("2600:9000:2000::1")));
    assert!(
        !ranges.contains(&cf, ip("52.94.1.1")),
        "AMAZON, not CLOUDFRONT"
    );
    assert!(ranges.contains(&["AMAZON".into()], ip("52.94.1.1")));
    assert!(!ranges.contains(&cf, ip("10.0.0.1")));
}

/// A rule admitting `HOST` on the origin's port, only into `services`.
fn setup(ranges_file: &str, services: &str, port: u16) -> Setup {
    Setup {
        extra_rules: format!(
            "[[rule]]\nname = \"cf-ranges\"\ndomains = [{HOST:?}]\nports = [\"{port}\"]\n\
             require_ip_ranges = [{services}]\n\n[aws_ip_ranges]\nfile = {ranges_file:?}\n"
        ),
        ..Setup::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_address_outside_the_published_prefixes_is_refused() {
    let origin = Origin::echo().await;
    let fixture = std::fs::canonicalize(FIXTURE).unwrap();
    let proxy = start(setup(
        fixture.to_str().unwrap(),
        "\"CLOUDFRONT\"",
        origin.addr.port(),
    ))
    .await;
    // Loopback is allowed by [destinations], but it is no CloudFront address.
    proxy.dns.set(HOST, &[ip("127.0.0.1")], 60);
    let (reply, _) = connect(proxy.addr, &format!("{HOST}:{}", origin.addr.port())).await;
    assert_eq!(reply.status, 403);
    assert_eq!(reply.reason(), Some("destination_not_allowed"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_address_inside_the_published_prefixes_is_admitted() {
    let origin = Origin::echo().await;
    // The fixture plus a stand-in service that publishes loopback, where the origin listens.
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(FIXTURE).unwrap()).unwrap();
    json["prefixes"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({
            "ip_prefix": "127.0.0.0/8", "region": "GLOBAL", "service": "LOOPBACK_TEST"
        }));
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("ip-ranges.json");
    std::fs::write(&file, json.to_string()).unwrap();
    let services = "\"CLOUDFRONT\", \"LOOPBACK_TEST\"";
    let proxy = start(setup(file.to_str().unwrap(), services, origin.addr.port())).await;
    proxy.dns.set(HOST, &[ip("127.0.0.1")], 60);
    let (reply, mut stream) = connect(proxy.addr, &format!("{HOST}:{}", origin.addr.port())).await;
    assert_eq!(reply.status, 200);
    assert_echo(&mut stream, b"inside a published prefix").await;
}

#[test]
fn check_reports_the_file_date_and_counts_and_unknown_services() {
    let dir = tempfile::tempdir().unwrap();
    let fixture = std::fs::canonicalize(FIXTURE).unwrap();
    let config = dir.path().join("portcullis.toml");
    let write = |service: &str| {
        std::fs::write(
            &config,
            format!(
                "[aws_ip_ranges]\nfile = {:?}\n\n[[rule]]\nname = \"cf\"\ndomains = [\"*.cloudfront.net\"]\n\
                 ports = [\"443\"]\nrequire_ip_ranges = [{service:?}]\n",
                fixture.to_str().unwrap()
            ),
        )
        .unwrap();
    };
    let check = || {
        let out = Command::new(env!("CARGO_BIN_EXE_portcullis"))
            .args(["--config", config.to_str().unwrap(), "--check"])
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    write("CLOUDFRONT");
    let (code, out) = check();
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("createDate 2026-11-21-12-03-13"), "{out}");
    assert!(out.contains("14 IPv4 and 4 IPv6 prefixes"), "{out}");
    write("APPSTREAM");
    let (code, out) = check();
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains(":8: service \"APPSTREAM\" is not in the ip-ranges file"),
        "{out}"
    );
}
