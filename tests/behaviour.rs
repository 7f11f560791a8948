//! How open tunnels behave: allowed ports, DNS caching per rule kind, half-close, bytes that
//! follow the CONNECT head, idle timeout, the active-tunnel gauge, and the admin endpoints
//! through a drain.

mod support;

use std::net::IpAddr;
use std::time::{Duration, Instant};

use support::{Origin, Setup, assert_echo, connect, eventually, read_reply, start};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

const GATEWAY: &str = "gw1.amazonappstream.com";
const CLOUDFRONT: &str = "d111abcdef8.cloudfront.net";
const ENDPOINT: &str = "vpce-0abc-1234.streaming.appstream.eu-west-1.vpce.amazonaws.com";

fn ips(list: &[&str]) -> Vec<IpAddr> {
    list.iter().map(|s| s.parse().unwrap()).collect()
}

/// A test-local origin task, stopped when dropped.
struct Task(JoinHandle<()>);

impl Drop for Task {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn bind(ip: &str, port: u16) -> TcpListener {
    TcpListener::bind((ip.parse::<IpAddr>().unwrap(), port))
        .await
        .unwrap_or_else(|e| panic!("bind {ip}:{port}: {e}"))
}

/// An origin that greets every connection with `greeting`, then echoes: the greeting proves
/// which origin a tunnel reached.
async fn greeter(ip: &str, port: u16, greeting: &str) -> Task {
    let listener = bind(ip, port).await;
    let greeting = greeting.as_bytes().to_vec();
    Task(tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let greeting = greeting.clone();
            tokio::spawn(async move {
                if stream.write_all(&greeting).await.is_err() {
                    return;
                }
                let (mut r, mut w) = stream.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    }))
}

/// Reads exactly `len` bytes, with a deadline.
async fn read_n(stream: &mut TcpStream, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut buf))
        .await
        .expect("bytes within 5 s")
        .unwrap();
    buf
}

/// Reads until EOF, with a deadline.
async fn read_to_eof(stream: &mut TcpStream) -> Vec<u8> {
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut buf))
        .await
        .expect("EOF within 5 s")
        .unwrap();
    buf
}

/// Opens a tunnel and returns the stream after the 200.
async fn tunnel(proxy: std::net::SocketAddr, authority: &str) -> TcpStream {
    let (reply, stream) = connect(proxy, authority).await;
    assert_eq!(reply.status, 200, "{authority}: {reply:?}");
    stream
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allowed_ports_per_rule() {
    let proxy = start(Setup::default()).await;
    let _gateway = greeter("127.0.0.21", 443, "gateway-443").await;
    proxy.dns.set(GATEWAY, &ips(&["127.0.0.21"]), 60);
    let mut stream = tunnel(proxy.addr, &format!("{GATEWAY}:443")).await;
    assert_eq!(read_n(&mut stream, 11).await, b"gateway-443");
    assert_echo(&mut stream, b"gateway traffic").await;

    let mut endpoints = Vec::new();
    for port in [443, 1400, 1499] {
        endpoints.push(greeter("127.0.0.22", port, &format!("endpoint-{port:04}")).await);
    }
    proxy.dns.set(ENDPOINT, &ips(&["127.0.0.22"]), 60);
    for port in [443, 1400, 1499] {
        let mut stream = tunnel(proxy.addr, &format!("{ENDPOINT}:{port}")).await;
        assert_eq!(
            read_n(&mut stream, 13).await,
            format!("endpoint-{port:04}").as_bytes()
        );
        assert_echo(&mut stream, format!("to port {port}").as_bytes()).await;
    }
    for port in [1399, 1500] {
        let (reply, _) = connect(proxy.addr, &format!("{ENDPOINT}:{port}")).await;
        assert_eq!(reply.status, 403, "{port}: {reply:?}");
        assert_eq!(reply.reason(), Some("port_not_allowed"));
    }
}

/// Reads a reply head byte by byte and returns it raw, status line included.
async fn raw_head(stream: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut byte))
            .await
            .expect("reply within 5 s")
            .unwrap();
        assert_eq!(
            n,
            1,
            "closed mid-head: {:?}",
            String::from_utf8_lossy(&head)
        );
        head.push(byte[0]);
    }
    String::from_utf8(head).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tunnel_reply_is_200_connection_established() {
    let proxy = start(Setup::default()).await;
    let _origin = Origin::echo_on("127.0.0.24", 443).await;
    proxy.dns.set(GATEWAY, &ips(&["127.0.0.24"]), 60);
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    stream
        .write_all(
            format!("CONNECT {GATEWAY}:443 HTTP/1.1\r\nHost: {GATEWAY}:443\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
    let head = raw_head(&mut stream).await;
    assert!(
        head.starts_with("HTTP/1.1 200 Connection established\r\n"),
        "the contract's tunnel reply is `200 Connection established`, got {head:?}"
    );
    // A 2xx reply to CONNECT carries no body framing (RFC 9110, 9.3.6).
    let lower = head.to_ascii_lowercase();
    assert!(
        !lower.contains("content-length") && !lower.contains("transfer-encoding"),
        "{head:?}"
    );
    assert_echo(&mut stream, b"established").await;
    assert_eq!(
        proxy
            .metric(&format!(
                "portcullis_requests_total{{domain=\"{GATEWAY}\",outcome=\"allowed\",reason=\"\",rule=\"appstream-gateway\"}}"
            ))
            .await,
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_1_0_connect_opens_a_tunnel() {
    let proxy = start(Setup::default()).await;
    let _origin = Origin::echo_on("127.0.0.25", 443).await;
    proxy.dns.set(GATEWAY, &ips(&["127.0.0.25"]), 60);
    let (reply, mut stream) = support::request(
        proxy.addr,
        format!("CONNECT {GATEWAY}:443 HTTP/1.0\r\n\r\n").as_bytes(),
    )
    .await;
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_echo(&mut stream, b"old client").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn next_address_is_tried_when_the_first_refuses() {
    let proxy = start(Setup::default()).await;
    // Nothing listens on .26; the origin is on .27.
    drop(bind("127.0.0.26", 443).await);
    let _origin = greeter("127.0.0.27", 443, "second").await;
    proxy
        .dns
        .set(GATEWAY, &ips(&["127.0.0.26", "127.0.0.27"]), 60);
    let mut stream = tunnel(proxy.addr, &format!("{GATEWAY}:443")).await;
    assert_eq!(read_n(&mut stream, 6).await, b"second");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_dns_within_connect_timeout_still_connects() {
    let proxy = start(Setup {
        connect_timeout: "1s",
        ..Setup::default()
    })
    .await;
    let _origin = Origin::echo_on("127.0.0.28", 443).await;
    proxy.dns.set(GATEWAY, &ips(&["127.0.0.28"]), 60);
    proxy.dns.set_delay(Duration::from_millis(200));
    let mut stream = tunnel(proxy.addr, &format!("{GATEWAY}:443")).await;
    assert_echo(&mut stream, b"slow but fine").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_timeout_does_not_apply_to_open_tunnels() {
    let proxy = start(Setup {
        header_timeout: "300ms",
        ..Setup::default()
    })
    .await;
    let _origin = Origin::echo_on("127.0.0.29", 443).await;
    proxy.dns.set(GATEWAY, &ips(&["127.0.0.29"]), 60);
    let mut stream = tunnel(proxy.addr, &format!("{GATEWAY}:443")).await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_echo(&mut stream, b"still here").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_is_matched_case_insensitively_without_the_trailing_dot() {
    let proxy = start(Setup::default()).await;
    let _origin = greeter("127.0.0.23", 443, "hi").await;
    proxy.dns.set(GATEWAY, &ips(&["127.0.0.23"]), 60);
    let mut stream = tunnel(proxy.addr, "GW1.AmazonAppStream.COM.:443").await;
    assert_eq!(read_n(&mut stream, 2).await, b"hi");
    assert_echo(&mut stream, b"mixed case").await;
    // Counted under the lowercased name.
    assert_eq!(proxy.metric(&support::active_series(GATEWAY)).await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_endpoint_names_are_resolved_for_every_tunnel() {
    let proxy = start(Setup::default()).await;
    let _a = greeter("127.0.0.31", 1400, "A").await;
    let _b = greeter("127.0.0.32", 1400, "B").await;
    proxy.dns.set(ENDPOINT, &ips(&["127.0.0.31"]), 300);
    let before = proxy.dns.queries(ENDPOINT);
    let mut first = tunnel(proxy.addr, &format!("{ENDPOINT}:1400")).await;
    assert_eq!(read_n(&mut first, 1).await, b"A");
    let after_first = proxy.dns.queries(ENDPOINT);
    assert!(
        after_first >= before + 2,
        "the first tunnel asked DNS {} times (A and AAAA expected)",
        after_first - before
    );

    // The endpoint moved. A new session follows it; the open one stays where it is.
    proxy.dns.set(ENDPOINT, &ips(&["127.0.0.32"]), 300);
    let mut second = tunnel(proxy.addr, &format!("{ENDPOINT}:1400")).await;
    assert_eq!(read_n(&mut second, 1).await, b"B");
    let after_second = proxy.dns.queries(ENDPOINT);
    assert!(
        after_second >= after_first + 2,
        "the second tunnel asked DNS {} times despite TTL 300 (A and AAAA expected)",
        after_second - after_first
    );
    assert_echo(&mut first, b"still on A").await;
    assert_echo(&mut second, b"now on B").await;
    assert_eq!(
        proxy
            .metric("portcullis_dns_lookups_total{cache=\"bypass\",result=\"ok\"}")
            .await,
        2.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ordinary_names_are_cached_for_their_ttl() {
    let proxy = start(Setup::default()).await;
    // The names have A records only: the AAAA query gets NODATA, cached for the SOA minimum
    // of 1 s, so the second tunnel must follow within a second (it follows within
    // milliseconds).
    let cases = [
        (GATEWAY, "127.0.0.33", "127.0.0.34"),
        (CLOUDFRONT, "127.0.0.35", "127.0.0.36"),
    ];
    for (host, a, b) in cases {
        let _a = greeter(a, 443, "A").await;
        let _b = greeter(b, 443, "B").await;
        proxy.dns.set(host, &ips(&[a]), 300);
        let mut first = tunnel(proxy.addr, &format!("{host}:443")).await;
        assert_eq!(read_n(&mut first, 1).await, b"A", "{host}");
        let after_first = proxy.dns.queries(host);
        assert!(after_first >= 1, "{host}");

        proxy.dns.set(host, &ips(&[b]), 300);
        let mut second = tunnel(proxy.addr, &format!("{host}:443")).await;
        assert_eq!(
            read_n(&mut second, 1).await,
            b"A",
            "{host}: a cached name follows its cached answer"
        );
        assert_eq!(
            proxy.dns.queries(host),
            after_first,
            "{host}: the second tunnel asked DNS again"
        );
    }
    assert_eq!(
        proxy
            .metric("portcullis_dns_lookups_total{cache=\"cached\",result=\"ok\"}")
            .await,
        4.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_half_close_passes_through() {
    let proxy = start(Setup::default()).await;
    let _origin = Origin::echo_on("127.0.0.41", 443).await;
    proxy.dns.set(GATEWAY, &ips(&["127.0.0.41"]), 60);
    let mut stream = tunnel(proxy.addr, &format!("{GATEWAY}:443")).await;
    stream.write_all(b"ping").await.unwrap();
    stream.shutdown().await.unwrap();
    // The echo origin sees EOF only if the proxy passed the half-close on; it then echoes what
    // it had and closes, and the proxy passes that close back.
    assert_eq!(read_to_eof(&mut stream).await, b"ping");
    proxy.await_active(GATEWAY, 0.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn origin_half_close_leaves_the_client_able_to_send() {
    let proxy = start(Setup::default()).await;
    let listener = bind("127.0.0.42", 443).await;
    let (got_tx, got_rx) = oneshot::channel::<Vec<u8>>();
    let _origin = Task(tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        stream.write_all(b"hello").await.unwrap();
        stream.shutdown().await.unwrap();
        let mut got = Vec::new();
        let _ = stream.read_to_end(&mut got).await;
        let _ = got_tx.send(got);
    }));
    proxy.dns.set(GATEWAY, &ips(&["127.0.0.42"]), 60);
    let mut stream = tunnel(proxy.addr, &format!("{GATEWAY}:443")).await;
    assert_eq!(read_to_eof(&mut stream).await, b"hello");
    // The origin is done sending; the client is not.
    stream.write_all(b"more").await.unwrap();
    stream.shutdown().await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(5), got_rx)
        .await
        .expect("the origin hears EOF within 5 s")
        .expect("the origin reports");
    assert_eq!(got, b"more");
    proxy.await_active(GATEWAY, 0.0).await;
}

/// An origin that echoes one connection and reports, at EOF, everything it received.
async fn recording_origin(ip: &str, port: u16) -> (Task, oneshot::Receiver<Vec<u8>>) {
    let listener = bind(ip, port).await;
    let (tx, rx) = oneshot::channel();
    let task = Task(tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        let mut got = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    got.extend_from_slice(&buf[..n]);
                    if stream.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            }
        }
        let _ = stream.shutdown().await;
        let _ = tx.send(got);
    }));
    (task, rx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_behind_the_connect_head_reach_the_origin_first() {
    let proxy = start(Setup::default()).await;
    let (_origin, got) = recording_origin("127.0.0.43", 443).await;
    proxy.dns.set(GATEWAY, &ips(&["127.0.0.43"]), 60);
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    stream
        .write_all(
            format!("CONNECT {GATEWAY}:443 HTTP/1.1\r\nHost: {GATEWAY}\r\n\r\nEARLYBYTES")
                .as_bytes(),
        )
        .await
        .unwrap();
    // The reply head comes first, then the echo of the early bytes.
    let reply = read_reply(&mut stream).await;
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(read_n(&mut stream, 10).await, b"EARLYBYTES");
    stream.write_all(b"+LATER").await.unwrap();
    assert_eq!(read_n(&mut stream, 6).await, b"+LATER");
    stream.shutdown().await.unwrap();
    assert_eq!(read_to_eof(&mut stream).await, b"");
    let got = tokio::time::timeout(Duration::from_secs(5), got)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got, b"EARLYBYTES+LATER");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_kib_behind_the_connect_head_arrive_intact() {
    let proxy = start(Setup::default()).await;
    let (_origin, got) = recording_origin("127.0.0.44", 443).await;
    proxy.dns.set(GATEWAY, &ips(&["127.0.0.44"]), 60);
    let payload: Vec<u8> = (0..16 * 1024u32)
        .map(|i| (i % 251) as u8 ^ (i >> 8) as u8)
        .collect();
    let mut raw = format!("CONNECT {GATEWAY}:443 HTTP/1.1\r\nHost: {GATEWAY}\r\n\r\n").into_bytes();
    raw.extend_from_slice(&payload);
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    stream.write_all(&raw).await.unwrap();
    let reply = read_reply(&mut stream).await;
    assert_eq!(reply.status, 200, "{reply:?}");
    assert!(read_n(&mut stream, payload.len()).await == payload);
    stream.shutdown().await.unwrap();
    assert_eq!(read_to_eof(&mut stream).await, b"");
    let got = tokio::time::timeout(Duration::from_secs(5), got)
        .await
        .unwrap()
        .unwrap();
    assert!(
        got == payload,
        "the origin got {} bytes, not the payload",
        got.len()
    );
    assert!(
        eventually(Duration::from_secs(3), || async {
            proxy
                .metric(&format!(
                    "portcullis_tunnel_bytes_total{{direction=\"upstream\",domain=\"{GATEWAY}\"}}"
                ))
                .await
                == payload.len() as f64
        })
        .await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_tunnels_are_closed() {
    let proxy = start(Setup {
        idle_timeout: "300ms",
        ..Setup::default()
    })
    .await;
    let _origin = Origin::echo_on("127.0.0.45", 443).await;
    proxy.dns.set(GATEWAY, &ips(&["127.0.0.45"]), 60);
    let mut stream = tunnel(proxy.addr, &format!("{GATEWAY}:443")).await;
    // Traffic every 100 ms keeps a tunnel open well past the idle timeout.
    for i in 0..7 {
        assert_echo(&mut stream, format!("beat {i}").as_bytes()).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(proxy.metric(&support::active_series(GATEWAY)).await, 1.0);
    // Then silence.
    let quiet = Instant::now();
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(Duration::from_secs(2), stream.read(&mut buf))
        .await
        .expect("the proxy closes an idle tunnel within 2 s");
    assert!(
        matches!(read, Ok(0) | Err(_)),
        "expected EOF or an error, got {read:?}"
    );
    assert!(
        quiet.elapsed() >= Duration::from_millis(150),
        "closed after only {:?} of silence",
        quiet.elapsed()
    );
    proxy.await_active(GATEWAY, 0.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traffic_in_one_direction_keeps_a_tunnel_open() {
    let proxy = start(Setup {
        idle_timeout: "300ms",
        ..Setup::default()
    })
    .await;
    // An origin that streams a byte every 100 ms and never reads: the client only listens.
    let listener = bind("127.0.0.49", 443).await;
    let _origin = Task(tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        for _ in 0..8 {
            if stream.write_all(b"x").await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        std::future::pending::<()>().await;
    }));
    proxy.dns.set(GATEWAY, &ips(&["127.0.0.49"]), 60);
    let mut stream = tunnel(proxy.addr, &format!("{GATEWAY}:443")).await;
    // 800 ms of downstream-only traffic, well past the 300 ms idle timeout.
    assert_eq!(read_n(&mut stream, 8).await, b"xxxxxxxx");
    // Then nothing either way: closed.
    let mut buf = [0u8; 1];
    let read = tokio::time::timeout(Duration::from_secs(2), stream.read(&mut buf))
        .await
        .expect("the proxy closes the tunnel once it goes quiet");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tunnels_active_follows_open_tunnels() {
    let proxy = start(Setup::default()).await;
    let _origin = Origin::echo_on("127.0.0.46", 443).await;
    proxy.dns.set(GATEWAY, &ips(&["127.0.0.46"]), 60);
    assert_eq!(proxy.metric(&support::active_series(GATEWAY)).await, 0.0);
    let mut first = tunnel(proxy.addr, &format!("{GATEWAY}:443")).await;
    assert_echo(&mut first, b"one").await;
    assert_eq!(proxy.metric(&support::active_series(GATEWAY)).await, 1.0);
    let mut second = tunnel(proxy.addr, &format!("{GATEWAY}:443")).await;
    assert_echo(&mut second, b"two").await;
    assert_eq!(proxy.metric(&support::active_series(GATEWAY)).await, 2.0);
    drop(first);
    proxy.await_active(GATEWAY, 1.0).await;
    second.shutdown().await.unwrap();
    assert_eq!(read_to_eof(&mut second).await, b"");
    proxy.await_active(GATEWAY, 0.0).await;
    assert_eq!(
        proxy
            .metric("portcullis_tunnel_duration_seconds_count{rule=\"appstream-gateway\"}")
            .await,
        2.0
    );
    assert_eq!(
        proxy
            .metric("portcullis_upstream_connect_seconds_count{rule=\"appstream-gateway\"}")
            .await,
        2.0
    );
    assert_eq!(
        proxy
            .metric(&format!(
                "portcullis_tunnel_bytes_total{{direction=\"downstream\",domain=\"{GATEWAY}\"}}"
            ))
            .await,
        6.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_timeout_closes_tunnels_left_open() {
    let mut proxy = start(Setup {
        drain_timeout: "300ms",
        ..Setup::default()
    })
    .await;
    let _origin = Origin::echo_on("127.0.0.48", 443).await;
    proxy.dns.set(GATEWAY, &ips(&["127.0.0.48"]), 60);
    let mut stream = tunnel(proxy.addr, &format!("{GATEWAY}:443")).await;
    assert_echo(&mut stream, b"before").await;
    let started = Instant::now();
    let done = proxy.shut_down();
    let mut buf = [0u8; 8];
    let read = tokio::time::timeout(Duration::from_secs(3), stream.read(&mut buf))
        .await
        .expect("the tunnel is closed when the drain timeout runs out");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    assert!(
        started.elapsed() >= Duration::from_millis(250),
        "closed after {:?}, before drain_timeout 300ms",
        started.elapsed()
    );
    tokio::time::timeout(Duration::from_secs(3), done)
        .await
        .expect("the drain finishes after the timeout")
        .unwrap();
    // The admin listener is gone with the proxy; read the registry directly.
    let metrics = proxy.proxy.metrics().encode();
    assert_eq!(
        support::metric_value(&metrics, &support::active_series(GATEWAY)),
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_endpoints_and_drain() {
    let mut proxy = start(Setup::default()).await;
    assert_eq!(proxy.admin_get("/healthz").await.0, 200);
    assert_eq!(proxy.admin_get("/readyz").await.0, 200);
    let (status, metrics) = proxy.admin_get("/metrics").await;
    assert_eq!(status, 200);
    assert!(
        metrics.contains("portcullis_build_info{version="),
        "{metrics}"
    );
    let (status, pac) = proxy.admin_get("/proxy.pac").await;
    assert_eq!(status, 200);
    assert!(pac.contains("FindProxyForURL"), "{pac}");
    assert!(pac.contains("PROXY proxy.test:3128"), "{pac}");
    assert!(pac.contains("DIRECT"), "{pac}");
    // WPAD asks for the same file under its own name.
    assert_eq!(proxy.admin_get("/wpad.dat").await, (200, pac));
    for path in ["/proxy.pac", "/wpad.dat"] {
        let head = format!("GET {path} HTTP/1.0\r\n\r\n");
        let (reply, _) = support::request(proxy.admin, head.as_bytes()).await;
        assert_eq!(
            reply.header("content-type"),
            Some("application/x-ns-proxy-autoconfig"),
            "{path}"
        );
    }

    let _origin = Origin::echo_on("127.0.0.47", 443).await;
    proxy.dns.set(GATEWAY, &ips(&["127.0.0.47"]), 60);
    let mut stream = tunnel(proxy.addr, &format!("{GATEWAY}:443")).await;
    assert_echo(&mut stream, b"before the drain").await;

    let done = proxy.shut_down();
    assert!(
        eventually(Duration::from_secs(2), || async {
            proxy.admin_get("/readyz").await.0 == 503
        })
        .await,
        "/readyz stays 200 while draining"
    );
    assert_eq!(proxy.admin_get("/healthz").await.0, 200);
    let addr = proxy.addr;
    assert!(
        eventually(Duration::from_secs(2), || async {
            TcpStream::connect(addr).await.is_err()
        })
        .await,
        "the proxy port still accepts connections while draining"
    );
    // The open tunnel keeps working through the drain.
    assert_echo(&mut stream, b"during the drain").await;
    assert!(!done.is_finished(), "the drain ended with a tunnel open");
    drop(stream);
    tokio::time::timeout(Duration::from_secs(3), done)
        .await
        .expect("the drain finishes once the last tunnel closes")
        .unwrap();
}
