//! The PROXY protocol in front of the proxy: a trusted balancer's header names the client for
//! the ACL and the per-client cap; anyone else's header is refused; hostile headers of every
//! shape get a clear refusal and leave nothing behind. HAProxy itself is in
//! `tests/proxy_protocol_haproxy.rs`.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use portcullis::net::proxy_protocol::sample::{aws_vpce, frame, tlv, v1, v2, v2_local};
use support::{Origin, Reply, Setup, TestProxy, assert_echo, eventually, read_reply, start};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const HOST: &str = "gw1.amazonappstream.com";

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// Loopback (where the test connects from) is the trusted balancer; only the documentation
/// network 192.0.2.0/24 may use the proxy, so a tunnel opens only if a header is believed.
async fn behind_balancer(origin: &Origin, extra: Setup) -> TestProxy {
    let setup = Setup {
        proxy_protocol_trusted: vec!["127.0.0.0/8"],
        clients_allow: vec!["192.0.2.0/24"],
        extra_rules: rule(origin),
        ..extra
    };
    let proxy = start(setup).await;
    proxy.dns.set(HOST, &["127.0.0.1".parse().unwrap()], 60);
    proxy
}

fn rule(origin: &Origin) -> String {
    support::rule_for(HOST, origin)
}

fn connect_head(origin: &Origin) -> Vec<u8> {
    let authority = format!("{HOST}:{}", origin.addr.port());
    format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n").into_bytes()
}

/// Sends `prefix` then a CONNECT, in one write or in `segment`-byte pieces.
async fn through(
    proxy: &TestProxy,
    origin: &Origin,
    prefix: &[u8],
    segment: usize,
) -> (Reply, TcpStream) {
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    let wire = [prefix, &connect_head(origin)].concat();
    for piece in wire.chunks(segment) {
        stream.write_all(piece).await.unwrap();
        stream.flush().await.unwrap();
        if segment < wire.len() {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    let reply = read_reply(&mut stream).await;
    (reply, stream)
}

fn proxy_addr(proxy: &TestProxy) -> SocketAddr {
    proxy.addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trusted_header_names_the_client_for_the_acl() {
    let origin = Origin::echo().await;
    let proxy = behind_balancer(&origin, Setup::default()).await;
    let to = proxy_addr(&proxy);
    for header in [
        v1(addr("192.0.2.7:50000"), to),
        v2(addr("192.0.2.8:50001"), to, &[]),
        v2(
            addr("[::ffff:192.0.2.9]:50002"),
            addr("[::ffff:127.0.0.1]:3128"),
            &[],
        ),
        v2(
            addr("192.0.2.10:50003"),
            to,
            &aws_vpce("vpce-0123456789abcdef0"),
        ),
    ] {
        let (reply, mut stream) = through(&proxy, &origin, &header, usize::MAX).await;
        assert_eq!(reply.status, 200, "{header:?}");
        assert_echo(&mut stream, b"streaming").await;
    }
    // The connection's own address (loopback) is not allowed: no header, no tunnel.
    let (reply, _) = through(&proxy, &origin, b"", usize::MAX).await;
    assert_eq!(
        (reply.status, reply.reason()),
        (403, Some("client_not_allowed"))
    );
    // Nor is a client the header names outside the ACL.
    let header = v1(addr("198.51.100.1:50000"), to);
    let (reply, _) = through(&proxy, &origin, &header, usize::MAX).await;
    assert_eq!(
        (reply.status, reply.reason()),
        (403, Some("client_not_allowed"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_header_split_into_single_bytes_still_parses() {
    let origin = Origin::echo().await;
    let proxy = behind_balancer(&origin, Setup::default()).await;
    for header in [
        v1(addr("192.0.2.7:50000"), proxy.addr),
        v2(addr("192.0.2.8:50001"), proxy.addr, &aws_vpce("vpce-1")),
    ] {
        let (reply, mut stream) = through(&proxy, &origin, &header, 1).await;
        assert_eq!(reply.status, 200);
        assert_echo(&mut stream, b"after a slow header").await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_per_client_cap_counts_the_header_address() {
    let origin = Origin::echo().await;
    let extra = Setup {
        max_tunnels_per_client: 1,
        ..Setup::default()
    };
    let proxy = behind_balancer(&origin, extra).await;
    let first = v2(addr("192.0.2.1:1000"), proxy.addr, &[]);
    let (reply, _held) = through(&proxy, &origin, &first, usize::MAX).await;
    assert_eq!(reply.status, 200);
    let again = v2(addr("192.0.2.1:1001"), proxy.addr, &[]);
    let (reply, _) = through(&proxy, &origin, &again, usize::MAX).await;
    assert_eq!(
        (reply.status, reply.reason()),
        (429, Some("too_many_tunnels"))
    );
    // Another client behind the same balancer has a slot of its own.
    let other = v2(addr("192.0.2.2:1000"), proxy.addr, &[]);
    let (reply, _) = through(&proxy, &origin, &other, usize::MAX).await;
    assert_eq!(reply.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_health_check_keeps_the_connection_address() {
    let origin = Origin::echo().await;
    let extra = Setup {
        // Now loopback itself may use the proxy too.
        clients_allow: vec![],
        ..Setup::default()
    };
    let setup = Setup {
        proxy_protocol_trusted: vec!["127.0.0.0/8"],
        clients_allow: vec!["127.0.0.1/32"],
        extra_rules: rule(&origin),
        ..extra
    };
    let proxy = start(setup).await;
    proxy.dns.set(HOST, &["127.0.0.1".parse().unwrap()], 60);
    let (reply, mut stream) = through(&proxy, &origin, &v2_local(), usize::MAX).await;
    assert_eq!(reply.status, 200);
    assert_echo(&mut stream, b"ok").await;
    // A balancer's health check: the header, then close. Nothing is answered or counted.
    let mut check = TcpStream::connect(proxy.addr).await.unwrap();
    check.write_all(&v2_local()).await.unwrap();
    check.shutdown().await.unwrap();
    let mut rest = Vec::new();
    check.read_to_end(&mut rest).await.unwrap();
    assert!(rest.is_empty(), "{:?}", String::from_utf8_lossy(&rest));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_header_from_an_untrusted_source_is_refused_and_unused() {
    let origin = Origin::echo().await;
    let setup = Setup {
        extra_rules: rule(&origin),
        ..Setup::default()
    };
    let proxy = start(setup).await;
    proxy.dns.set(HOST, &["127.0.0.1".parse().unwrap()], 60);
    for header in [
        v1(addr("192.0.2.7:50000"), proxy.addr),
        v2(addr("192.0.2.8:50001"), proxy.addr, &[]),
        v2_local(),
    ] {
        let (reply, _) = through(&proxy, &origin, &header, usize::MAX).await;
        assert_eq!((reply.status, reply.reason()), (400, Some("bad_request")));
    }
    let rejected = "portcullis_connections_rejected_total{reason=\"proxy_header\"}";
    assert_eq!(proxy.metric(rejected).await, 3.0);
}

/// Every malformed header a balancer (or an attacker on its subnet) could send.
fn hostile(to: SocketAddr) -> Vec<(&'static str, Vec<u8>)> {
    let v4_body = |extra: &[u8]| {
        [
            vec![192, 0, 2, 1, 10, 0, 0, 9, 0, 80, 0, 81],
            extra.to_vec(),
        ]
        .concat()
    };
    // Says 60 bytes follow: the 12 of addresses, then the CONNECT read as TLVs.
    let mut past_the_end = frame(0x21, 0x11, &v4_body(&[]));
    past_the_end[15] = 60;
    vec![
        (
            "wrong v2 signature",
            [b"\r\n\r\n\0\r\nQUIX\n".as_slice(), &[0x21, 0x11, 0, 0]].concat(),
        ),
        (
            "v1 wrong protocol",
            b"PROXY UDP4 192.0.2.1 10.0.0.9 1 2\r\n".to_vec(),
        ),
        (
            "v1 family mismatch",
            b"PROXY TCP4 2001:db8::1 10.0.0.9 1 2\r\n".to_vec(),
        ),
        (
            "v1 bad address",
            b"PROXY TCP4 192.0.2.256 10.0.0.9 1 2\r\n".to_vec(),
        ),
        (
            "v1 without CRLF",
            [b"PROXY TCP4 192.0.2.1 10.0.0.9 1 2".as_slice(), &[b' '; 90]].concat(),
        ),
        ("v2 bad version", frame(0x31, 0x11, &v4_body(&[]))),
        ("v2 bad command", frame(0x2F, 0x11, &v4_body(&[]))),
        ("v2 bad family", frame(0x21, 0x51, &v4_body(&[]))),
        ("v2 udp", frame(0x21, 0x12, &v4_body(&[]))),
        ("v2 short address", frame(0x21, 0x21, &v4_body(&[]))),
        (
            "v2 absurd TLV",
            frame(0x21, 0x11, &v4_body(&[0xEA, 0xFF, 0xFF, 1])),
        ),
        (
            "v2 truncated TLV",
            frame(0x21, 0x11, &v4_body(&[0x04, 0x00])),
        ),
        ("v2 length past the header", past_the_end),
        (
            "v2 too long",
            [V2_SIG.as_slice(), &[0x21, 0x11, 0xFF, 0xFF]].concat(),
        ),
        (
            "second header",
            [
                v1(addr("192.0.2.1:1"), to),
                v2(addr("192.0.2.2:1"), to, &[]),
            ]
            .concat(),
        ),
        (
            "second header v2",
            [
                v2(addr("192.0.2.2:1"), to, &[]),
                v2(addr("192.0.2.3:1"), to, &tlv(4, b"x")),
            ]
            .concat(),
        ),
    ]
}

const V2_SIG: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_headers_get_a_clear_refusal_and_leave_nothing_behind() {
    let origin = Origin::echo().await;
    let setup = Setup {
        header_timeout: "500ms",
        proxy_protocol_trusted: vec!["127.0.0.0/8"],
        extra_rules: rule(&origin),
        ..Setup::default()
    };
    let proxy = start(setup).await;
    let baseline = open_fds();
    for (name, header) in hostile(proxy.addr) {
        let (reply, mut stream) = through(&proxy, &origin, &header, usize::MAX).await;
        assert_eq!(
            (reply.status, reply.reason()),
            (400, Some("bad_request")),
            "{name}"
        );
        let mut rest = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut rest)).await;
    }
    // Headers that never complete: 408 after header_timeout.
    let mut long = frame(0x21, 0x11, &[0; 12]);
    long[15] = 200;
    for unfinished in [b"PROXY TCP4 192.0.2.1".to_vec(), long] {
        let mut slow = TcpStream::connect(proxy.addr).await.unwrap();
        slow.write_all(&unfinished).await.unwrap();
        let reply = read_reply(&mut slow).await;
        assert_eq!(
            (reply.status, reply.reason()),
            (408, Some("header_timeout"))
        );
    }
    // Truncated, then closed: no reply, nothing held.
    for cut in [3, 13, 20] {
        let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
        stream
            .write_all(&v2(addr("192.0.2.1:1"), proxy.addr, &aws_vpce("vpce-1"))[..cut])
            .await
            .unwrap();
        stream.shutdown().await.unwrap();
        let mut rest = Vec::new();
        stream.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
    }
    let settled = eventually(Duration::from_secs(5), || async { open_fds() <= baseline }).await;
    assert!(
        settled,
        "descriptors: {} now, {baseline} before",
        open_fds()
    );
    let counted = proxy
        .metric("portcullis_connections_rejected_total{reason=\"proxy_header\"}")
        .await;
    // All but the wrong signature, which is no header at all: its bytes are a bad request.
    assert_eq!(counted, hostile(proxy.addr).len() as f64 - 1.0);
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}
