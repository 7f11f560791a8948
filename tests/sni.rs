//! The SNI check inside tunnels: the ClientHello must name the CONNECT host.
//! These tests send real ClientHello bytes (built here, byte for byte as TLS 1.3 lays them
//! out) over real sockets, including one split over many records and TCP segments.

mod support;

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use portcullis::sni::sample::{client_hello, records};
use support::{Setup, TestProxy, connect, start};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

const HOST: &str = "d111abcdef8.cloudfront.net";

/// An origin that reports every byte it receives on each connection.
async fn recording_origin() -> (SocketAddr, mpsc::UnboundedReceiver<Vec<u8>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut got = Vec::new();
                let _ = stream.read_to_end(&mut got).await;
                let _ = tx.send(got);
            });
        }
    });
    (addr, rx)
}

async fn proxy_with(sni: &'static str, origin: SocketAddr) -> TestProxy {
    let setup = Setup {
        sni,
        header_timeout: "500ms",
        extra_rules: format!(
            "[[rule]]\nname = \"cf-test\"\ndomains = [\"*.cloudfront.net\"]\nports = [\"{}\"]\n",
            origin.port()
        ),
        ..Setup::default()
    };
    let proxy = start(setup).await;
    let lo: IpAddr = "127.0.0.1".parse().unwrap();
    proxy.dns.set(HOST, &[lo], 60);
    proxy
}

/// Opens a tunnel, sends `wire` in pieces of `segment` bytes, then closes the write side.
/// Returns what the client read back before the proxy closed.
async fn send_through(
    proxy: &TestProxy,
    origin: SocketAddr,
    wire: &[u8],
    segment: usize,
) -> Vec<u8> {
    let (reply, mut stream) = connect(proxy.addr, &format!("{HOST}:{}", origin.port())).await;
    assert_eq!(reply.status, 200);
    for piece in wire.chunks(segment) {
        if stream.write_all(piece).await.is_err() {
            break;
        }
        stream.flush().await.unwrap();
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let _ = stream.shutdown().await;
    let mut back = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut back)).await;
    back
}

async fn denied(proxy: &TestProxy, reason: &str) -> f64 {
    proxy
        .metric(&format!(
            "portcullis_requests_total{{domain=\"{HOST}\",outcome=\"denied\",reason=\"{reason}\",rule=\"cf-test\"}}"
        ))
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn matching_sni_is_forwarded_unchanged_even_when_split() {
    let (origin, mut received) = recording_origin().await;
    let proxy = proxy_with("enforce", origin).await;
    let wire = [
        records(&client_hello(Some("D111ABCDEF8.cloudfront.net.")), 50),
        b"after".to_vec(),
    ]
    .concat();
    send_through(&proxy, origin, &wire, 13).await;
    let got = tokio::time::timeout(Duration::from_secs(5), received.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got, wire, "the origin gets exactly the client's bytes");
    let allowed = proxy
        .metric(&format!(
            "portcullis_requests_total{{domain=\"{HOST}\",outcome=\"allowed\",reason=\"\",rule=\"cf-test\"}}"
        ))
        .await;
    assert_eq!(allowed, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mismatching_missing_and_non_tls_close_before_the_origin_sees_a_byte() {
    let (origin, mut received) = recording_origin().await;
    let proxy = proxy_with("enforce", origin).await;
    let cases: [(Vec<u8>, &str); 4] = [
        (
            records(&client_hello(Some("evil.example.com")), 16384),
            "sni_mismatch",
        ),
        (
            records(&client_hello(Some("other.cloudfront.net")), 16384),
            "sni_mismatch",
        ),
        (records(&client_hello(None), 16384), "sni_mismatch"),
        (
            b"GET / HTTP/1.1\r\nHost: evil.example.com\r\n\r\n".to_vec(),
            "not_tls",
        ),
    ];
    for (wire, _) in &cases {
        let back = send_through(&proxy, origin, wire, 4096).await;
        let got = tokio::time::timeout(Duration::from_secs(5), received.recv())
            .await
            .unwrap()
            .unwrap();
        assert!(got.is_empty(), "the origin received {} bytes", got.len());
        assert!(
            back.is_empty() || back[0] == 0x15,
            "only a TLS alert comes back: {back:?}"
        );
    }
    assert_eq!(denied(&proxy, "sni_mismatch").await, 3.0);
    assert_eq!(denied(&proxy, "not_tls").await, 1.0);
    assert_eq!(proxy.metric(&support::active_series(HOST)).await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_client_is_not_tls_after_the_hello_timeout() {
    let (origin, _received) = recording_origin().await;
    let proxy = proxy_with("enforce", origin).await;
    let (reply, mut stream) = connect(proxy.addr, &format!("{HOST}:{}", origin.port())).await;
    assert_eq!(reply.status, 200);
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(Duration::from_secs(3), stream.read(&mut buf)).await;
    assert!(
        matches!(read, Ok(Ok(0)) | Ok(Err(_))),
        "closed after header_timeout"
    );
    assert_eq!(denied(&proxy, "not_tls").await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_mode_keeps_the_tunnel_and_off_mode_never_looks() {
    for mode in ["log", "off"] {
        let (origin, mut received) = recording_origin().await;
        let proxy = proxy_with(mode, origin).await;
        let wire = records(&client_hello(Some("evil.example.com")), 16384);
        send_through(&proxy, origin, &wire, 4096).await;
        let got = tokio::time::timeout(Duration::from_secs(5), received.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got, wire, "{mode}: forwarded");
        assert_eq!(denied(&proxy, "sni_mismatch").await, 0.0, "{mode}");
    }
}

/// `sni = "log"` watches a copy: a protocol whose server speaks first gets its greeting at
/// once (under `enforce` it would wait for a ClientHello that never comes), and the client's
/// bytes reach the origin as they are sent, even half a ClientHello.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_mode_never_holds_a_byte_in_either_direction() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let origin = listener.local_addr().unwrap();
    let (tx, mut received) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        stream.write_all(b"220 greeting first\r\n").await.unwrap();
        let mut buf = [0u8; 4096];
        while let Ok(n) = stream.read(&mut buf).await {
            if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    let setup = Setup {
        sni: "log",
        // Long, so that waiting for a ClientHello could not hide inside the test's bounds.
        header_timeout: "30s",
        extra_rules: format!(
            "[[rule]]\nname = \"cf-test\"\ndomains = [\"*.cloudfront.net\"]\nports = [\"{}\"]\n",
            origin.port()
        ),
        ..Setup::default()
    };
    let proxy = start(setup).await;
    proxy.dns.set(HOST, &["127.0.0.1".parse().unwrap()], 60);
    let (reply, mut stream) = connect(proxy.addr, &format!("{HOST}:{}", origin.port())).await;
    assert_eq!(reply.status, 200);
    let mut greeting = [0u8; 20];
    tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut greeting))
        .await
        .expect("the greeting is not held back")
        .unwrap();
    assert_eq!(&greeting, b"220 greeting first\r\n");
    let hello = records(&client_hello(Some(HOST)), 16384);
    let (first, rest) = hello.split_at(10);
    stream.write_all(first).await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(5), received.recv())
        .await
        .expect("half a ClientHello is forwarded at once")
        .unwrap();
    assert_eq!(got, first);
    stream.write_all(rest).await.unwrap();
    let mut got = Vec::new();
    while got.len() < rest.len() {
        got.extend(received.recv().await.unwrap());
    }
    assert_eq!(got, rest);
    assert_eq!(denied(&proxy, "not_tls").await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_hello_behind_the_connect_head_is_checked_and_forwarded() {
    let (origin, mut received) = recording_origin().await;
    let proxy = proxy_with("enforce", origin).await;
    let hello = records(&client_hello(Some(HOST)), 16384);
    let mut head = format!("CONNECT {HOST}:{} HTTP/1.1\r\n\r\n", origin.port()).into_bytes();
    head.extend(&hello);
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    stream.write_all(&head).await.unwrap();
    let reply = support::read_reply(&mut stream).await;
    assert_eq!(reply.status, 200);
    stream.shutdown().await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(5), received.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got, hello);
}

/// A real TLS client (rustls) through the proxy to a real HTTPS origin: the right server name
/// gets through; another allowed name, or no name at all, is cut before the handshake ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rustls_clients_with_matching_mismatching_and_missing_sni() {
    use rustls::pki_types::ServerName;
    use tokio_rustls::TlsConnector;

    let origin_ip = "127.0.0.131";
    let _origin = support::web::WebOrigin::start(origin_ip).await;
    let proxy = start(Setup {
        sni: "enforce",
        ..Setup::default()
    })
    .await;
    let gateway = support::tls::GATEWAY;
    proxy.dns.set(gateway, &[origin_ip.parse().unwrap()], 60);
    let ca = support::tls::ca();
    let tunnel = || async {
        let (reply, stream) = connect(proxy.addr, &format!("{gateway}:443")).await;
        assert_eq!(reply.status, 200);
        stream
    };
    let mut tls = ca.connect(gateway, tunnel().await).await;
    tls.write_all(
        b"GET /hello HTTP/1.1\r\nHost: gw1.amazonappstream.com\r\nConnection: close\r\n\r\n",
    )
    .await
    .unwrap();
    let mut response = Vec::new();
    tls.read_to_end(&mut response).await.unwrap();
    assert!(
        response.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&response)
    );

    // The certificate is valid for the CloudFront name too, so only the proxy can stop this.
    let connector = TlsConnector::from(ca.client_config());
    let fronted = ServerName::try_from(support::tls::CLOUDFRONT).unwrap();
    let handshake = connector.connect(fronted, tunnel().await).await;
    assert!(handshake.is_err(), "a fronted handshake must not complete");
    // An IP address as server name: rustls sends no SNI at all.
    let no_sni = ServerName::IpAddress("127.0.0.131".parse::<IpAddr>().unwrap().into());
    let handshake = connector.connect(no_sni, tunnel().await).await;
    assert!(
        handshake.is_err(),
        "a handshake without SNI must not complete"
    );
    let denied = proxy
        .metric(&format!(
            "portcullis_requests_total{{domain=\"{gateway}\",outcome=\"denied\",reason=\"sni_mismatch\",rule=\"appstream-gateway\"}}"
        ))
        .await;
    assert_eq!(denied, 2.0);
}
