//! Running for months: reload under load, authentication, per-client limits, overload, slow
//! clients, DNS faults, origins that never read.

mod support;

use std::net::IpAddr;
use std::time::Duration;

use base64::Engine;
use portcullis::Config;
use support::{DnsMode, Origin, Setup, TestProxy, assert_echo, connect, request, start};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn lo() -> Vec<IpAddr> {
    vec!["127.0.0.1".parse().unwrap()]
}

/// A setup whose extra rule admits `host` on the origin's port.
fn setup_for(host: &str, origin: &Origin) -> Setup {
    Setup {
        extra_rules: rule_text("test-origin", host, origin.addr.port()),
        ..Setup::default()
    }
}

fn rule_text(name: &str, host: &str, port: u16) -> String {
    format!("[[rule]]\nname = {name:?}\ndomains = [{host:?}]\nports = [\"{port}\"]\n")
}

fn basic(user: &str, password: &str) -> String {
    let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    format!("Basic {token}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_authentication() {
    let dir = tempfile::tempdir().unwrap();
    let users = dir.path().join("users");
    let hash = bcrypt::hash("correct horse", 4).unwrap();
    std::fs::write(&users, format!("alice:{hash}\n")).unwrap();
    let origin = Origin::echo().await;
    let host = "gw1.amazonappstream.com";
    let mut setup = setup_for(host, &origin);
    setup.users_file = Some(users.display().to_string());
    let proxy = start(setup).await;
    proxy.dns.set(host, &lo(), 60);
    let authority = format!("{host}:{}", origin.addr.port());

    let (reply, _) = connect(proxy.addr, &authority).await;
    assert_eq!(reply.status, 407);
    assert_eq!(reply.reason(), Some("auth_required"));
    assert_eq!(
        reply.header("proxy-authenticate"),
        Some("Basic realm=\"portcullis\"")
    );

    for wrong in [
        basic("alice", "wrong"),
        basic("mallory", "correct horse"),
        "Basic ###".into(),
    ] {
        let head = format!("CONNECT {authority} HTTP/1.1\r\nProxy-Authorization: {wrong}\r\n\r\n");
        let (reply, _) = request(proxy.addr, head.as_bytes()).await;
        assert_eq!(reply.status, 407, "{wrong}");
        assert_eq!(reply.reason(), Some("auth_failed"));
    }

    for _ in 0..2 {
        let good = basic("alice", "correct horse");
        let head = format!("CONNECT {authority} HTTP/1.1\r\nProxy-Authorization: {good}\r\n\r\n");
        let (reply, mut stream) = request(proxy.addr, head.as_bytes()).await;
        assert_eq!(reply.status, 200);
        assert_echo(&mut stream, b"authenticated").await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_client_tunnel_limit() {
    let origin = Origin::echo().await;
    let host = "gw1.amazonappstream.com";
    let mut setup = setup_for(host, &origin);
    setup.max_tunnels_per_client = 2;
    let proxy = start(setup).await;
    proxy.dns.set(host, &lo(), 60);
    let authority = format!("{host}:{}", origin.addr.port());
    let (first, mut a) = connect(proxy.addr, &authority).await;
    let (second, _b) = connect(proxy.addr, &authority).await;
    assert_eq!((first.status, second.status), (200, 200));
    let (third, _) = connect(proxy.addr, &authority).await;
    assert_eq!(third.status, 429);
    assert_eq!(third.reason(), Some("too_many_tunnels"));
    // Closing a tunnel gives its slot back.
    assert_echo(&mut a, b"x").await;
    drop(a);
    assert!(
        support::eventually(Duration::from_secs(5), || async {
            connect(proxy.addr, &authority).await.0.status == 200
        })
        .await
    );
}

/// One tunnel that streams `rounds` echo exchanges with a pattern unique to `id`.
async fn stream_through(proxy: std::net::SocketAddr, authority: String, id: usize, rounds: usize) {
    let (reply, mut stream) = connect(proxy, &authority).await;
    assert_eq!(reply.status, 200, "tunnel {id}");
    for round in 0..rounds {
        let payload: Vec<u8> = (0..4096).map(|i| (i + id * 7 + round) as u8).collect();
        assert_echo(&mut stream, &payload).await;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_tunnels_survive_twenty_reloads() {
    let origin = Origin::echo().await;
    let host = "gw1.amazonappstream.com";
    let setup = setup_for(host, &origin);
    let proxy = start(setup.clone()).await;
    proxy.dns.set(host, &lo(), 60);
    let authority = format!("{host}:{}", origin.addr.port());
    let tunnels: Vec<_> = (0..50)
        .map(|id| tokio::spawn(stream_through(proxy.addr, authority.clone(), id, 40)))
        .collect();
    let good = setup.to_toml(proxy.dns.addr);
    let bad = good.replace("max_domains = 1000", "max_domains = -1");
    for i in 0..20 {
        let text = if i % 3 == 2 { &bad } else { &good };
        let _ = proxy
            .proxy
            .reload(Config::parse(text, "reload.toml").map_err(|e| e.to_string()));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for tunnel in tunnels {
        tunnel.await.expect("every tunnel's bytes arrived intact");
    }
    let metrics = proxy.metrics().await;
    assert_eq!(
        support::metric_value(&metrics, "portcullis_config_reloads_total{result=\"ok\"}"),
        14.0
    );
    assert_eq!(
        support::metric_value(
            &metrics,
            "portcullis_config_reloads_total{result=\"error\"}"
        ),
        6.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_changes_rules_for_new_tunnels_only() {
    let origin = Origin::echo().await;
    let old_host = "old.example.test";
    let new_host = "new.example.test";
    let setup = setup_for(old_host, &origin);
    let proxy = start(setup.clone()).await;
    proxy.dns.set(old_host, &lo(), 60);
    proxy.dns.set(new_host, &lo(), 60);
    let port = origin.addr.port();
    let (reply, mut open) = connect(proxy.addr, &format!("{old_host}:{port}")).await;
    assert_eq!(reply.status, 200);

    let mut next = setup.clone();
    next.extra_rules = rule_text("test-origin", new_host, port);
    let text = next.to_toml(proxy.dns.addr);
    proxy
        .proxy
        .reload(Config::parse(&text, "next.toml").map_err(|e| e.to_string()))
        .unwrap();

    assert_eq!(
        connect(proxy.addr, &format!("{new_host}:{port}"))
            .await
            .0
            .status,
        200
    );
    let refused = connect(proxy.addr, &format!("{old_host}:{port}")).await.0;
    assert_eq!(refused.reason(), Some("domain_not_allowed"));
    // The tunnel opened under the old rules is untouched.
    assert_echo(&mut open, b"still streaming").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_clients_do_not_starve_real_ones() {
    let origin = Origin::echo().await;
    let host = "gw1.amazonappstream.com";
    let mut setup = setup_for(host, &origin);
    setup.max_connections = 5000;
    setup.header_timeout = "10s";
    let proxy = start(setup).await;
    proxy.dns.set(host, &lo(), 60);
    let mut slow = Vec::new();
    for _ in 0..2000 {
        let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
        stream
            .write_all(b"CONNECT gw1.amazonappstream.com:443 HTTP/1.1\r\nX-Slow: ")
            .await
            .unwrap();
        slow.push(stream);
    }
    let authority = format!("{host}:{}", origin.addr.port());
    for i in 0..20 {
        let started = std::time::Instant::now();
        let (reply, mut stream) = connect(proxy.addr, &authority).await;
        assert_eq!(reply.status, 200, "ordinary client {i}");
        assert_echo(&mut stream, b"through").await;
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "slow set-up: {:?}",
            started.elapsed()
        );
    }
    drop(slow);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_connections_holds_under_a_burst() {
    let origin = Origin::echo().await;
    let host = "gw1.amazonappstream.com";
    let mut setup = setup_for(host, &origin);
    setup.max_connections = 100;
    let proxy = start(setup).await;
    let mut held = Vec::new();
    let mut overloaded = 0;
    for _ in 0..5000 {
        let Ok(mut stream) = TcpStream::connect(proxy.addr).await else {
            continue;
        };
        if held.len() < 100 {
            held.push(stream);
            continue;
        }
        let mut buf = [0u8; 256];
        if let Ok(Ok(n)) = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await
            && String::from_utf8_lossy(&buf[..n]).contains("error=overloaded")
        {
            overloaded += 1;
        }
    }
    assert_eq!(
        overloaded, 4900,
        "every connection past the limit heard 503 overloaded"
    );
    let counted = proxy
        .metric("portcullis_connections_rejected_total{reason=\"overloaded\"}")
        .await;
    assert_eq!(counted, 4900.0);
    drop(held);
    proxy.dns.set(host, &lo(), 60);
    let authority = format!("{host}:{}", origin.addr.port());
    assert!(
        support::eventually(Duration::from_secs(5), || async {
            connect(proxy.addr, &authority).await.0.status == 200
        })
        .await,
        "the proxy serves again once connections close"
    );
}

async fn status_of(proxy: &TestProxy, authority: &str) -> (u16, Option<String>) {
    let (reply, _) = connect(proxy.addr, authority).await;
    (reply.status, reply.reason().map(str::to_string))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_faults_give_clean_errors_and_recovery_is_immediate() {
    let origin = Origin::echo().await;
    let host = "vpce-0abc-1234.streaming.appstream.eu-west-1.vpce.amazonaws.com";
    let mut setup = Setup {
        connect_timeout: "700ms",
        ..Setup::default()
    };
    // The private-endpoint rule asks DNS on every tunnel, so recovery shows at once.
    setup.extra_rules = format!(
        "[[rule]]\nname = \"vpce-test\"\ndomains = [{host:?}]\nports = [\"{}\"]\nprivate_endpoint = true\n",
        origin.addr.port()
    );
    let proxy = start(setup).await;
    proxy.dns.set(host, &lo(), 60);
    let authority = format!("{host}:{}", origin.addr.port());
    assert_eq!(status_of(&proxy, &authority).await.0, 200);

    proxy.dns.set_mode(DnsMode::ServFail);
    assert_eq!(
        status_of(&proxy, &authority).await,
        (502, Some("dns_error".into()))
    );
    proxy.dns.set_mode(DnsMode::Garbage);
    let (status, reason) = status_of(&proxy, &authority).await;
    assert!(matches!(status, 502 | 504), "{status} {reason:?}");
    proxy.dns.set_mode(DnsMode::Silent);
    let started = std::time::Instant::now();
    assert_eq!(
        status_of(&proxy, &authority).await,
        (504, Some("upstream_timeout".into()))
    );
    assert!(started.elapsed() < Duration::from_secs(3));

    proxy.dns.set_mode(DnsMode::Normal);
    assert_eq!(
        status_of(&proxy, &authority).await.0,
        200,
        "recovers the moment DNS does"
    );
    let errors = proxy
        .metric("portcullis_dns_lookups_total{cache=\"bypass\",result=\"error\"}")
        .await;
    assert!(errors >= 1.0, "dns errors counted: {errors}");
}

/// Resident memory of this process, in KiB.
fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_origin_that_never_reads_does_not_grow_memory() {
    // Accepts, then holds the connection without reading a byte.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let holder = tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        tokio::time::sleep(Duration::from_secs(30)).await;
        drop(stream);
    });
    let host = "sink.example.test";
    let setup = Setup {
        extra_rules: rule_text("sink", host, port),
        ..Setup::default()
    };
    let proxy = start(setup).await;
    proxy.dns.set(host, &lo(), 60);
    let (reply, mut stream) = connect(proxy.addr, &format!("{host}:{port}")).await;
    assert_eq!(reply.status, 200);
    let before = rss_kib();
    let chunk = vec![0x5a_u8; 64 * 1024];
    let mut sent = 0usize;
    // Push until the client's own writes block: everything in between is bounded buffers.
    while let Ok(Ok(())) =
        tokio::time::timeout(Duration::from_millis(500), stream.write_all(&chunk)).await
    {
        sent += chunk.len();
        assert!(
            sent < 256 * 1024 * 1024,
            "the proxy kept accepting: it is buffering without bound"
        );
    }
    let grown = rss_kib().saturating_sub(before);
    assert!(
        grown < 16 * 1024,
        "RSS grew {grown} KiB after {sent} bytes were accepted"
    );
    holder.abort();
}
