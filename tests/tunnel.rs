//! Tunnels that open: every rule of the profile, bulk data, half-close, pipelined bytes.

mod support;

use std::net::IpAddr;
use std::time::Duration;

use support::{Origin, Setup, assert_echo, connect, start};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn lo() -> Vec<IpAddr> {
    vec!["127.0.0.1".parse().unwrap()]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rule_of_the_profile_admits_its_hosts() {
    let proxy = start(Setup::default()).await;
    let origin = Origin::echo().await;
    let port = origin.addr.port();
    // Each host gets its own rule on the origin's port, so the test exercises the profile's
    // patterns while the origin listens on an ephemeral port.
    let hosts = [
        ("gw1.amazonappstream.com", "appstream-gateway"),
        ("a.b.amazonappstream.com", "appstream-gateway"),
        (
            "x.streaming.appstream2.us-east-1.on.aws",
            "appstream-gateway-ipv6",
        ),
        (
            "x.dcv-streaming.appstream2-fips.us-west-2.on.aws",
            "appstream-gateway-ipv6",
        ),
        ("appstream2.eu-west-1.aws.amazon.com", "appstream-auth"),
        (
            "appstream2.euc-sso.eu-west-1.aws.amazon.com",
            "appstream-auth",
        ),
        (
            "appstream2.us-gov-west-1.amazonaws-us-gov.com",
            "appstream-auth",
        ),
        ("signin.aws.amazon.com", "aws-signin"),
        ("us-east-1.signin.aws.amazon.com", "aws-signin"),
        ("d111abcdef8.cloudfront.net", "cloudfront"),
        (
            "vpce-0abc-1234.streaming.appstream.eu-west-1.vpce.amazonaws.com",
            "appstream-interface-endpoint",
        ),
    ];
    drop(proxy);
    let mut setup = Setup::default();
    for (i, (host, _)) in hosts.iter().enumerate() {
        setup.extra_rules.push_str(&format!(
            "[[rule]]\nname = \"t{i}\"\ndomains = [{host:?}]\nports = [\"{port}\"]\n"
        ));
    }
    let proxy = start(setup).await;
    for (host, _) in hosts {
        proxy.dns.set(host, &lo(), 60);
        let (reply, mut stream) = connect(proxy.addr, &format!("{host}:{port}")).await;
        assert_eq!(reply.status, 200, "{host}: {reply:?}");
        assert_echo(&mut stream, host.as_bytes()).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_megabytes_both_ways_arrive_intact() {
    let mut setup = Setup::default();
    let origin = Origin::echo().await;
    setup.extra_rules = format!(
        "[[rule]]\nname = \"bulk\"\ndomains = [\"bulk.example.test\"]\nports = [\"{}\"]\n",
        origin.addr.port()
    );
    let proxy = start(setup).await;
    proxy.dns.set("bulk.example.test", &lo(), 60);
    let (reply, stream) = connect(
        proxy.addr,
        &format!("bulk.example.test:{}", origin.addr.port()),
    )
    .await;
    assert_eq!(reply.status, 200);
    const SIZE: usize = 20 * 1024 * 1024;
    let data: Vec<u8> = (0..SIZE).map(|i| (i * 7 + i / 4096) as u8).collect();
    let expected = checksum(&data);
    let (mut r, mut w) = stream.into_split();
    let writer = tokio::spawn(async move {
        w.write_all(&data).await.unwrap();
        w.shutdown().await.unwrap();
    });
    let mut back = Vec::with_capacity(SIZE);
    tokio::time::timeout(Duration::from_secs(60), r.read_to_end(&mut back))
        .await
        .expect("relay finishes")
        .unwrap();
    writer.await.unwrap();
    assert_eq!(back.len(), SIZE);
    assert_eq!(checksum(&back), expected);
    assert!(
        support::eventually(Duration::from_secs(5), || async {
            proxy
                .metric("portcullis_tunnel_bytes_total{direction=\"upstream\",domain=\"bulk.example.test\"}")
                .await
                == SIZE as f64
        })
        .await
    );
}

/// FNV-1a: order-sensitive, so a reordered or corrupted byte changes it.
fn checksum(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}
