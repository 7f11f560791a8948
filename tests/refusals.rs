//! Every reply of the contract's table that is not a 200: its status, the
//! `Proxy-Status: portcullis; error=<reason>` header, the one-line body, the connection closed
//! afterwards, and for some, the metric that counted it.

mod support;

use std::net::IpAddr;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use support::{
    DnsMode, Origin, Reply, Setup, TestProxy, assert_echo, connect, read_reply, request, start,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const GATEWAY: &str = "gw1.amazonappstream.com";
const ENDPOINT: &str = "vpce-0abc-1234.streaming.appstream.eu-west-1.vpce.amazonaws.com";

fn ips(list: &[&str]) -> Vec<IpAddr> {
    list.iter().map(|s| s.parse().unwrap()).collect()
}

/// `portcullis_requests_total` for one label set (the exposition sorts labels by name).
fn requests(domain: &str, outcome: &str, reason: &str, rule: &str) -> String {
    format!(
        "portcullis_requests_total{{domain=\"{domain}\",outcome=\"{outcome}\",\
         reason=\"{reason}\",rule=\"{rule}\"}}"
    )
}

fn rejected(reason: &str) -> String {
    format!("portcullis_connections_rejected_total{{reason=\"{reason}\"}}")
}

/// Reads whatever follows the reply head until the proxy closes the connection. A reset or a
/// connection left open fails the test: a refusal ends with a clean close.
async fn rest_until_eof(what: &str, stream: &mut TcpStream) -> String {
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut rest))
        .await
        .unwrap_or_else(|_| panic!("{what}: the proxy keeps the connection open after a refusal"));
    if let Err(e) = read {
        panic!(
            "{what}: expected EOF after the refusal, got {e} after {:?}",
            String::from_utf8_lossy(&rest)
        );
    }
    String::from_utf8_lossy(&rest).into_owned()
}

/// Asserts a refusal: status, `Proxy-Status`, the body line naming the reason, then EOF.
async fn assert_refused(
    what: &str,
    reply: &Reply,
    stream: &mut TcpStream,
    status: u16,
    reason: &str,
) {
    assert_eq!(reply.status, status, "{what}: {reply:?}");
    assert_eq!(
        reply.header("proxy-status"),
        Some(format!("portcullis; error={reason}").as_str()),
        "{what}: {reply:?}"
    );
    assert_eq!(reply.reason(), Some(reason), "{what}");
    let body = rest_until_eof(what, stream).await;
    assert!(
        body.starts_with(&format!("{reason}: ")) && body.ends_with('\n'),
        "{what}: body {body:?}"
    );
}

/// `CONNECT authority` and the refusal it must get.
async fn refused(proxy: &TestProxy, authority: &str, status: u16, reason: &str) {
    let (reply, mut stream) = connect(proxy.addr, authority).await;
    assert_refused(authority, &reply, &mut stream, status, reason).await;
}

/// Raw request bytes and the refusal they must get.
async fn refused_raw(proxy: &TestProxy, raw: &[u8], status: u16, reason: &str) {
    let what = format!("{:?}", String::from_utf8_lossy(&raw[..raw.len().min(160)]));
    let (reply, mut stream) = request(proxy.addr, raw).await;
    assert_refused(&what, &reply, &mut stream, status, reason).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn domain_not_allowed_and_near_misses() {
    let proxy = start(Setup::default()).await;
    refused(&proxy, "example.com:443", 403, "domain_not_allowed").await;
    for host in [
        "amazonappstream.com",
        "evilamazonappstream.com",
        "amazonappstream.com.evil.net",
        "gw1.amazonappstream.com.evil.net",
        "cloudfront.net",
    ] {
        refused(&proxy, &format!("{host}:443"), 403, "domain_not_allowed").await;
    }
    // The label is the lowercased name without its trailing dot.
    refused(&proxy, "Example.COM.:443", 403, "domain_not_allowed").await;
    for host in [".amazonappstream.com", "a..amazonappstream.com"] {
        refused(&proxy, &format!("{host}:443"), 400, "bad_request").await;
    }
    assert_eq!(
        proxy
            .metric(&requests("example.com", "denied", "domain_not_allowed", ""))
            .await,
        2.0
    );
    assert_eq!(
        proxy
            .metric(&requests(
                "evilamazonappstream.com",
                "denied",
                "domain_not_allowed",
                ""
            ))
            .await,
        1.0
    );
    // Invalid names are not label values: they count under `_invalid`.
    assert_eq!(
        proxy
            .metric(&requests("_invalid", "denied", "bad_request", ""))
            .await,
        2.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn port_not_allowed() {
    let proxy = start(Setup::default()).await;
    refused(&proxy, &format!("{GATEWAY}:444"), 403, "port_not_allowed").await;
    refused(&proxy, &format!("{GATEWAY}:80"), 403, "port_not_allowed").await;
    refused(&proxy, &format!("{ENDPOINT}:1500"), 403, "port_not_allowed").await;
    refused(&proxy, &format!("{ENDPOINT}:1399"), 403, "port_not_allowed").await;
    assert_eq!(
        proxy
            .metric(&requests(
                GATEWAY,
                "denied",
                "port_not_allowed",
                "appstream-gateway"
            ))
            .await,
        2.0
    );
    assert_eq!(
        proxy
            .metric(&requests(
                ENDPOINT,
                "denied",
                "port_not_allowed",
                "appstream-interface-endpoint"
            ))
            .await,
        2.0
    );
    // A port refusal never asks DNS.
    assert_eq!(proxy.dns.total_queries(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ip_literals() {
    let proxy = start(Setup::default()).await;
    for authority in [
        "1.2.3.4:443",
        "[::1]:443",
        "127.1:443",
        "2130706433:443",
        "0x7f.0.0.1:443",
    ] {
        refused(&proxy, authority, 403, "ip_literal").await;
    }
    assert_eq!(
        proxy
            .metric(&requests("1.2.3.4", "denied", "ip_literal", ""))
            .await,
        1.0
    );
    assert_eq!(proxy.dns.total_queries(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destination_not_allowed() {
    let proxy = start(Setup {
        destinations_allow: vec![],
        ..Setup::default()
    })
    .await;
    let cases = [
        ("gw-loopback.amazonappstream.com", "127.0.0.1"),
        ("gw-metadata.amazonappstream.com", "169.254.169.254"),
        ("gw-private.amazonappstream.com", "10.1.2.3"),
        ("gw-mapped.amazonappstream.com", "::ffff:10.1.2.3"),
        ("gw-nat64.amazonappstream.com", "64:ff9b::a9fe:a9fe"),
        ("gw-v6loopback.amazonappstream.com", "::1"),
        ("d111abcdef8.cloudfront.net", "100.64.0.1"),
        // The private-endpoint rule may reach RFC 1918, never loopback.
        (ENDPOINT, "127.0.0.1"),
    ];
    for (host, addr) in cases {
        proxy.dns.set(host, &ips(&[addr]), 60);
        let (reply, mut stream) = connect(proxy.addr, &format!("{host}:443")).await;
        assert_refused(
            &format!("{host} -> {addr}"),
            &reply,
            &mut stream,
            403,
            "destination_not_allowed",
        )
        .await;
    }
    assert_eq!(
        proxy
            .metric(&requests(
                "gw-metadata.amazonappstream.com",
                "denied",
                "destination_not_allowed",
                "appstream-gateway"
            ))
            .await,
        1.0
    );
    assert_eq!(
        proxy
            .metric(&requests(
                ENDPOINT,
                "denied",
                "destination_not_allowed",
                "appstream-interface-endpoint"
            ))
            .await,
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_not_allowed() {
    let proxy = start(Setup {
        clients_allow: vec!["10.0.0.0/8"],
        ..Setup::default()
    })
    .await;
    proxy.dns.set(GATEWAY, &ips(&["127.0.0.1"]), 60);
    refused(&proxy, &format!("{GATEWAY}:443"), 403, "client_not_allowed").await;
    assert_eq!(proxy.metric(&rejected("client_not_allowed")).await, 1.0);
    // Turned away before the request was read: no DNS, no request counted.
    assert_eq!(proxy.dns.total_queries(), 0);
    assert!(!proxy.metrics().await.contains("portcullis_requests_total{"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests() {
    let proxy = start(Setup::default()).await;
    // A TLS ClientHello sent straight at the proxy port.
    refused_raw(
        &proxy,
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03garbage",
        400,
        "bad_request",
    )
    .await;
    refused_raw(&proxy, b"CONNECT  HTTP/1.1\r\n\r\n", 400, "bad_request").await;
    refused_raw(
        &proxy,
        format!("CONNECT {GATEWAY} HTTP/1.1\r\nHost: {GATEWAY}\r\n\r\n").as_bytes(),
        400,
        "bad_request",
    )
    .await;
    refused(&proxy, &format!("user@{GATEWAY}:443"), 400, "bad_request").await;
    refused(&proxy, &format!("{GATEWAY}:"), 400, "bad_request").await;
    refused(&proxy, &format!("{GATEWAY}:0"), 400, "bad_request").await;
    refused(&proxy, &format!("{GATEWAY}:65536"), 400, "bad_request").await;
    assert_eq!(proxy.dns.total_queries(), 0);
    assert!(
        proxy
            .metric(&requests("_invalid", "denied", "bad_request", ""))
            .await
            >= 1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_framing_headers_are_a_bad_request_with_proxy_status() {
    let proxy = start(Setup::default()).await;
    // Well-formed HTTP syntax, so the head parser takes it, but not a valid request.
    for extra in [
        "Content-Length: abc",
        "Content-Length: 1\r\nContent-Length: 2",
    ] {
        let head = format!("CONNECT {GATEWAY}:443 HTTP/1.1\r\nHost: {GATEWAY}\r\n{extra}\r\n\r\n");
        refused_raw(&proxy, head.as_bytes(), 400, "bad_request").await;
    }
    assert_eq!(proxy.dns.total_queries(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_over_64_kib_is_a_bad_request() {
    let proxy = start(Setup::default()).await;
    // One huge header value: the head is over the limit long before it could be complete.
    let mut head =
        format!("CONNECT {GATEWAY}:443 HTTP/1.1\r\nHost: {GATEWAY}\r\nX-Pad: ").into_bytes();
    head.resize(head.len() + 70 * 1024, b'a');
    head.extend_from_slice(b"\r\n\r\n");
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    // The proxy may stop reading (and close) before it has taken every byte, so the write may
    // fail; the reply is what matters.
    let _ = stream.write_all(&head).await;
    let reply = read_reply(&mut stream).await;
    assert_refused("70 KiB head", &reply, &mut stream, 400, "bad_request").await;
    assert_eq!(proxy.dns.total_queries(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn method_not_allowed() {
    let proxy = start(Setup::default()).await;
    let (reply, mut stream) = request(
        proxy.addr,
        format!("GET http://{GATEWAY}/ HTTP/1.1\r\nHost: {GATEWAY}\r\n\r\n").as_bytes(),
    )
    .await;
    assert_eq!(reply.header("allow"), Some("CONNECT"), "{reply:?}");
    assert_refused("GET", &reply, &mut stream, 405, "method_not_allowed").await;
    assert_eq!(
        proxy
            .metric(&requests(GATEWAY, "denied", "method_not_allowed", ""))
            .await,
        1.0
    );
    assert_eq!(proxy.dns.total_queries(), 0);
}

/// Opens a connection to a proxy with `header_timeout = "300ms"`, lets `send` do its partial
/// writes, and expects the 408 about 300 ms after the connection opened.
async fn expect_header_timeout<F, Fut>(what: &str, send: F)
where
    F: FnOnce(TcpStream) -> Fut,
    Fut: std::future::Future<Output = TcpStream>,
{
    let proxy = start(Setup {
        header_timeout: "300ms",
        ..Setup::default()
    })
    .await;
    let opened = Instant::now();
    let stream = TcpStream::connect(proxy.addr).await.unwrap();
    let mut stream = send(stream).await;
    let reply = read_reply(&mut stream).await;
    let waited = opened.elapsed();
    assert!(
        waited >= Duration::from_millis(250) && waited < Duration::from_millis(1300),
        "{what}: 408 after {waited:?} with header_timeout 300ms"
    );
    assert_refused(what, &reply, &mut stream, 408, "header_timeout").await;
    assert_eq!(proxy.metric(&rejected("header_timeout")).await, 1.0);
    assert_eq!(proxy.dns.total_queries(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_timeout_half_a_head() {
    expect_header_timeout("half a head", |mut stream| async move {
        stream
            .write_all(format!("CONNECT {GATEWAY}:443 HTTP/1.1\r\nHo").as_bytes())
            .await
            .unwrap();
        stream
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_timeout_nothing_sent() {
    expect_header_timeout("nothing sent", |stream| async move { stream }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_timeout_is_for_the_whole_head_not_per_read() {
    // A byte every 50 ms for up to 1.5 s (never a full head): no single read waits 300 ms,
    // the head as a whole does. Stops as soon as the reply is there.
    expect_header_timeout("trickled head", |mut stream| async move {
        let head = format!("CONNECT {GATEWAY}:443 HTTP/1.1\r\nHost: {GATEWAY}\r\n\r\n");
        for byte in head.bytes().take(30) {
            if stream.write_all(&[byte]).await.is_err() {
                break;
            }
            let mut peek = [0u8; 1];
            let wait = Duration::from_millis(50);
            if tokio::time::timeout(wait, stream.peek(&mut peek))
                .await
                .is_ok()
            {
                break;
            }
        }
        stream
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_nxdomain_on_both_paths() {
    let proxy = start(Setup::default()).await;
    refused(
        &proxy,
        "nosuch.amazonappstream.com:443",
        502,
        "dns_nxdomain",
    )
    .await;
    let endpoint = "vpce-0dead-0000.streaming.appstream.eu-west-1.vpce.amazonaws.com";
    refused(&proxy, &format!("{endpoint}:1400"), 502, "dns_nxdomain").await;
    assert!(proxy.dns.queries("nosuch.amazonappstream.com") >= 1);
    assert!(proxy.dns.queries(endpoint) >= 1);
    assert_eq!(
        proxy
            .metric(&requests(
                "nosuch.amazonappstream.com",
                "error",
                "dns_nxdomain",
                "appstream-gateway"
            ))
            .await,
        1.0
    );
    assert_eq!(
        proxy
            .metric("portcullis_dns_lookups_total{cache=\"cached\",result=\"nxdomain\"}")
            .await,
        1.0
    );
    assert_eq!(
        proxy
            .metric("portcullis_dns_lookups_total{cache=\"bypass\",result=\"nxdomain\"}")
            .await,
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_error_on_both_paths() {
    let proxy = start(Setup::default()).await;
    proxy.dns.set(GATEWAY, &ips(&["127.0.0.1"]), 60);
    proxy.dns.set(ENDPOINT, &ips(&["127.0.0.1"]), 60);
    proxy.dns.set_mode(DnsMode::ServFail);
    refused(&proxy, &format!("{GATEWAY}:443"), 502, "dns_error").await;
    refused(&proxy, &format!("{ENDPOINT}:443"), 502, "dns_error").await;
    assert_eq!(
        proxy
            .metric(&requests(
                GATEWAY,
                "error",
                "dns_error",
                "appstream-gateway"
            ))
            .await,
        1.0
    );
    assert_eq!(
        proxy
            .metric("portcullis_dns_lookups_total{cache=\"bypass\",result=\"error\"}")
            .await,
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_unreachable() {
    let proxy = start(Setup::default()).await;
    // Make sure nothing listens there: bind the address, then let it go.
    drop(TcpListener::bind("127.0.0.41:443").await.unwrap());
    proxy.dns.set(GATEWAY, &ips(&["127.0.0.41"]), 60);
    refused(
        &proxy,
        &format!("{GATEWAY}:443"),
        502,
        "upstream_unreachable",
    )
    .await;
    assert_eq!(
        proxy
            .metric(&requests(
                GATEWAY,
                "error",
                "upstream_unreachable",
                "appstream-gateway"
            ))
            .await,
        1.0
    );
    assert_eq!(proxy.metric(&support::active_series(GATEWAY)).await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_timeout_when_dns_is_silent() {
    let proxy = start(Setup {
        connect_timeout: "500ms",
        ..Setup::default()
    })
    .await;
    proxy.dns.set_mode(DnsMode::Silent);
    for authority in [format!("{GATEWAY}:443"), format!("{ENDPOINT}:1400")] {
        let sent = Instant::now();
        let (reply, mut stream) = connect(proxy.addr, &authority).await;
        let waited = sent.elapsed();
        assert!(
            waited >= Duration::from_millis(450) && waited < Duration::from_millis(1500),
            "{authority}: 504 after {waited:?} with connect_timeout 500ms"
        );
        assert_refused(&authority, &reply, &mut stream, 504, "upstream_timeout").await;
    }
    assert_eq!(
        proxy
            .metric(&requests(
                GATEWAY,
                "error",
                "upstream_timeout",
                "appstream-gateway"
            ))
            .await,
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_timeout_when_dns_answers_too_late() {
    let proxy = start(Setup {
        connect_timeout: "500ms",
        ..Setup::default()
    })
    .await;
    proxy.dns.set(GATEWAY, &ips(&["127.0.0.1"]), 60);
    proxy.dns.set_delay(Duration::from_secs(2));
    let sent = Instant::now();
    let (reply, mut stream) = connect(proxy.addr, &format!("{GATEWAY}:443")).await;
    let waited = sent.elapsed();
    assert!(
        waited >= Duration::from_millis(450) && waited < Duration::from_millis(1500),
        "504 after {waited:?} with connect_timeout 500ms"
    );
    assert_refused("slow DNS", &reply, &mut stream, 504, "upstream_timeout").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overloaded_then_free_again() {
    let proxy = start(Setup {
        max_connections: 1,
        ..Setup::default()
    })
    .await;
    let origin = Origin::echo_on("127.0.0.51", 443).await;
    proxy.dns.set(GATEWAY, &[origin.addr.ip()], 60);
    // Holds the only slot without sending anything. The accept loop takes connections in
    // order, so this one has the permit before the next is accepted.
    let held = TcpStream::connect(proxy.addr).await.unwrap();
    let mut second = TcpStream::connect(proxy.addr).await.unwrap();
    let reply = read_reply(&mut second).await;
    assert_refused("second connection", &reply, &mut second, 503, "overloaded").await;
    assert_eq!(proxy.metric(&rejected("overloaded")).await, 1.0);
    drop(held);
    // Once the proxy has seen the first close, the slot is free again.
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut stream = loop {
        let (reply, stream) = connect(proxy.addr, &format!("{GATEWAY}:443")).await;
        if reply.status == 200 {
            break stream;
        }
        assert_eq!(reply.reason(), Some("overloaded"), "{reply:?}");
        assert!(
            Instant::now() < deadline,
            "still overloaded 3 s after the slot freed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_echo(&mut stream, b"through again").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overloaded_counts_open_tunnels() {
    let proxy = start(Setup {
        max_connections: 1,
        // Should the second connection be let in, it waits for a head; keep that wait short.
        header_timeout: "1s",
        ..Setup::default()
    })
    .await;
    let origin = Origin::echo_on("127.0.0.52", 443).await;
    proxy.dns.set(GATEWAY, &[origin.addr.ip()], 60);
    // An open tunnel is an open client connection: it holds the only slot.
    let (reply, mut tunnel) = connect(proxy.addr, &format!("{GATEWAY}:443")).await;
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_echo(&mut tunnel, b"holding the slot").await;
    let mut second = TcpStream::connect(proxy.addr).await.unwrap();
    let reply = read_reply(&mut second).await;
    assert_refused(
        "connection past an open tunnel",
        &reply,
        &mut second,
        503,
        "overloaded",
    )
    .await;
    assert_eq!(proxy.metric(&rejected("overloaded")).await, 1.0);
    assert_echo(&mut tunnel, b"still open").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overloaded_reply_reaches_clients_that_already_sent_their_request() {
    let proxy = start(Setup {
        max_connections: 1,
        ..Setup::default()
    })
    .await;
    let _held = TcpStream::connect(proxy.addr).await.unwrap();
    // Real clients send CONNECT right after the handshake, so their request is usually in the
    // proxy's receive buffer when it answers 503. To make that certain rather than a race,
    // park both runtime workers (the proxy's accept loop cannot run) while the clients connect
    // and send; the test body itself runs on the test thread, outside the workers.
    let parked = Arc::new(Barrier::new(3));
    let release = Arc::new(Barrier::new(3));
    for _ in 0..2 {
        let (parked, release) = (parked.clone(), release.clone());
        tokio::spawn(async move {
            parked.wait();
            release.wait();
        });
    }
    parked.wait();
    let head = format!("CONNECT {GATEWAY}:443 HTTP/1.1\r\nHost: {GATEWAY}\r\n\r\n");
    let clients: Vec<std::net::TcpStream> = (0..5)
        .map(|_| {
            let mut stream = std::net::TcpStream::connect(proxy.addr).unwrap();
            std::io::Write::write_all(&mut stream, head.as_bytes()).unwrap();
            stream.set_nonblocking(true).unwrap();
            stream
        })
        .collect();
    release.wait();
    // Each must read the whole 503 and then a clean close, never a reset.
    for (i, stream) in clients.into_iter().enumerate() {
        let mut stream = TcpStream::from_std(stream).unwrap();
        let reply = read_reply(&mut stream).await;
        let what = format!("CONNECT #{i} sent before the 503");
        assert_refused(&what, &reply, &mut stream, 503, "overloaded").await;
    }
    assert_eq!(proxy.metric(&rejected("overloaded")).await, 5.0);
}
