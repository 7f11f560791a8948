//! Proves `support::dns::TestDns` works against a real resolver
//! (hickory-resolver) and against hand-built raw queries.
//!
//! Safety: every resolver here is pointed only at `TestDns.addr`; the system
//! resolver configuration and hosts file are never read. Names are under
//! example.test / amazonappstream.com, addresses in 127/8, 10/8, ::1 or
//! 2001:db8::/32, and nothing connects to them.

mod support;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};
use hickory_resolver::TokioResolver;
use hickory_resolver::config::{
    ConnectionConfig, NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts,
};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::{DnsError, NetError, NoRecords};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

use support::dns::{DnsMode, NEGATIVE_TTL, TestDns};

#[derive(Clone, Copy)]
enum Transport {
    UdpAndTcp,
    TcpOnly,
}

/// A fresh resolver (so no cache is shared between checks) that talks only to
/// `dns.addr`.
fn resolver_with(
    dns: &TestDns,
    transport: Transport,
    timeout: Duration,
    attempts: usize,
) -> TokioResolver {
    let port = dns.addr.port();
    let conn = |mut c: ConnectionConfig| {
        c.port = port;
        c
    };
    let connections = match transport {
        Transport::UdpAndTcp => vec![conn(ConnectionConfig::udp()), conn(ConnectionConfig::tcp())],
        Transport::TcpOnly => vec![conn(ConnectionConfig::tcp())],
    };
    let ns = NameServerConfig::new(dns.addr.ip(), true, connections);
    let config = ResolverConfig::from_parts(None, vec![], vec![ns]);

    let mut opts = ResolverOpts::default();
    opts.timeout = timeout;
    opts.attempts = attempts;
    opts.cache_size = 0;
    opts.use_hosts_file = ResolveHosts::Never;
    opts.num_concurrent_reqs = 1;

    let mut builder = TokioResolver::builder_with_config(config, TokioRuntimeProvider::default());
    *builder.options_mut() = opts;
    builder.build().expect("build resolver")
}

fn resolver(dns: &TestDns) -> TokioResolver {
    resolver_with(dns, Transport::UdpAndTcp, Duration::from_secs(2), 1)
}

async fn ipv4s(r: &TokioResolver, name: &str) -> Result<Vec<Ipv4Addr>, NetError> {
    // In 0.26 `ipv4_lookup` returns a plain `Lookup`; pick the A records.
    let lookup = r.ipv4_lookup(name).await?;
    Ok(lookup
        .answers()
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(a.0),
            _ => None,
        })
        .collect())
}

async fn ipv6s(r: &TokioResolver, name: &str) -> Result<Vec<Ipv6Addr>, NetError> {
    let lookup = r.ipv6_lookup(name).await?;
    Ok(lookup
        .answers()
        .iter()
        .filter_map(|r| match &r.data {
            RData::AAAA(a) => Some(a.0),
            _ => None,
        })
        .collect())
}

const V4: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 10);
const V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x10);

#[tokio::test]
async fn answers_a_and_aaaa_with_ttl() {
    let dns = TestDns::start().await;
    dns.set("App.Example.Test.", &[IpAddr::V4(V4), IpAddr::V6(V6)], 42);
    let r = resolver(&dns);

    let lookup = r.lookup("app.example.test.", RecordType::A).await.unwrap();
    let answers = lookup.answers();
    assert_eq!(answers.len(), 1);
    assert_eq!(answers[0].data, RData::A(V4.into()));
    assert!(
        answers[0].ttl <= 42 && answers[0].ttl >= 40,
        "ttl {}",
        answers[0].ttl
    );

    assert_eq!(
        ipv6s(&resolver(&dns), "app.example.test.").await.unwrap(),
        vec![V6]
    );

    let mut all: Vec<IpAddr> = resolver(&dns)
        .lookup_ip("APP.example.test.")
        .await
        .unwrap()
        .iter()
        .collect();
    all.sort();
    assert_eq!(all, vec![IpAddr::V4(V4), IpAddr::V6(V6)]);

    // A, AAAA, then A + AAAA from lookup_ip; case and trailing dot ignored.
    assert_eq!(dns.queries("app.example.test"), 4);
    assert_eq!(dns.queries("APP.EXAMPLE.TEST."), 4);
    assert_eq!(dns.queries("other.example.test"), 0);
    assert_eq!(dns.total_queries(), 4);
}

#[tokio::test]
async fn multiple_addresses_per_family() {
    let dns = TestDns::start().await;
    let addrs: Vec<IpAddr> = vec![
        "10.1.2.3".parse().unwrap(),
        "10.1.2.4".parse().unwrap(),
        "::1".parse().unwrap(),
        "2001:db8::2".parse().unwrap(),
    ];
    dns.set("multi.amazonappstream.com", &addrs, 30);
    let mut v4 = ipv4s(&resolver(&dns), "multi.amazonappstream.com.")
        .await
        .unwrap();
    v4.sort();
    assert_eq!(
        v4,
        vec![Ipv4Addr::new(10, 1, 2, 3), Ipv4Addr::new(10, 1, 2, 4)]
    );
    let mut v6 = ipv6s(&resolver(&dns), "multi.amazonappstream.com.")
        .await
        .unwrap();
    v6.sort();
    assert_eq!(
        v6,
        vec![
            Ipv6Addr::LOCALHOST,
            "2001:db8::2".parse::<Ipv6Addr>().unwrap()
        ]
    );
}

#[tokio::test]
async fn nxdomain_is_reported_as_nxdomain() {
    let dns = TestDns::start().await;
    dns.set("known.example.test", &[IpAddr::V4(V4)], 60);

    let err = ipv4s(&resolver(&dns), "missing.example.test.")
        .await
        .unwrap_err();
    assert!(err.is_nx_domain(), "{err:?}");
    match &err {
        NetError::Dns(DnsError::NoRecordsFound(NoRecords {
            response_code,
            soa,
            negative_ttl,
            ..
        })) => {
            assert_eq!(*response_code, ResponseCode::NXDomain);
            let soa = soa.as_ref().expect("SOA in authority");
            assert_eq!(soa.name, Name::from_ascii("example.test.").unwrap());
            assert_eq!(*negative_ttl, Some(NEGATIVE_TTL));
        }
        other => panic!("expected NoRecordsFound, got {other:?}"),
    }
    assert_eq!(dns.queries("missing.example.test"), 1);
}

#[tokio::test]
async fn other_type_for_known_name_is_nodata() {
    let dns = TestDns::start().await;
    dns.set("v4only.example.test", &[IpAddr::V4(V4)], 60);

    let err = ipv6s(&resolver(&dns), "v4only.example.test.")
        .await
        .unwrap_err();
    assert!(!err.is_nx_domain(), "{err:?}");
    assert!(err.is_no_records_found(), "{err:?}");
    match &err {
        NetError::Dns(DnsError::NoRecordsFound(NoRecords {
            response_code, soa, ..
        })) => {
            assert_eq!(*response_code, ResponseCode::NoError);
            assert!(soa.is_some());
        }
        other => panic!("expected NoRecordsFound, got {other:?}"),
    }

    // lookup_ip still succeeds with just the A record.
    let all: Vec<IpAddr> = resolver(&dns)
        .lookup_ip("v4only.example.test.")
        .await
        .unwrap()
        .iter()
        .collect();
    assert_eq!(all, vec![IpAddr::V4(V4)]);

    // A name that exists with no addresses at all is NODATA for both types.
    dns.set("empty.example.test", &[], 60);
    let err = ipv4s(&resolver(&dns), "empty.example.test.")
        .await
        .unwrap_err();
    assert!(err.is_no_records_found() && !err.is_nx_domain(), "{err:?}");
}

#[tokio::test]
async fn set_replaces_and_remove_forgets() {
    let dns = TestDns::start().await;
    let name = "flip.amazonappstream.com";
    dns.set(name, &[IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1))], 300);
    assert_eq!(
        ipv4s(&resolver(&dns), "flip.amazonappstream.com.")
            .await
            .unwrap(),
        vec![Ipv4Addr::new(10, 0, 0, 1)]
    );

    dns.set(
        "FLIP.amazonappstream.com.",
        &[IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2))],
        300,
    );
    assert_eq!(
        ipv4s(&resolver(&dns), "flip.amazonappstream.com.")
            .await
            .unwrap(),
        vec![Ipv4Addr::new(10, 0, 0, 2)]
    );

    dns.remove(name);
    let err = ipv4s(&resolver(&dns), "flip.amazonappstream.com.")
        .await
        .unwrap_err();
    assert!(err.is_nx_domain(), "{err:?}");
    assert_eq!(dns.queries(name), 3);
}

#[tokio::test]
async fn tcp_only_resolver_works() {
    let dns = TestDns::start().await;
    dns.set("tcp.example.test", &[IpAddr::V4(V4), IpAddr::V6(V6)], 60);
    let r = resolver_with(&dns, Transport::TcpOnly, Duration::from_secs(2), 1);
    assert_eq!(ipv4s(&r, "tcp.example.test.").await.unwrap(), vec![V4]);
    assert_eq!(ipv6s(&r, "tcp.example.test.").await.unwrap(), vec![V6]);
    let err = ipv4s(&r, "nope.example.test.").await.unwrap_err();
    assert!(err.is_nx_domain(), "{err:?}");
    assert_eq!(dns.queries("tcp.example.test"), 2);
}

#[tokio::test]
async fn large_answer_is_truncated_on_udp_and_retried_on_tcp() {
    let dns = TestDns::start().await;
    let addrs: Vec<IpAddr> = (1..=100u16)
        .map(|i| IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, i)))
        .collect();
    dns.set("big.example.test", &addrs, 60);
    let got = ipv6s(&resolver(&dns), "big.example.test.").await.unwrap();
    assert_eq!(got.len(), 100);
    // One truncated UDP answer, then the TCP retry.
    assert_eq!(dns.queries("big.example.test"), 2);
}

#[tokio::test]
async fn silent_mode_times_out() {
    let dns = TestDns::start().await;
    dns.set("quiet.example.test", &[IpAddr::V4(V4)], 60);
    dns.set_mode(DnsMode::Silent);
    assert_eq!(dns.mode(), DnsMode::Silent);

    let r = resolver_with(&dns, Transport::UdpAndTcp, Duration::from_millis(200), 0);
    let started = Instant::now();
    let err = ipv4s(&r, "quiet.example.test.").await.unwrap_err();
    let elapsed = started.elapsed();
    assert!(matches!(err, NetError::Timeout), "{err:?}");
    assert!(elapsed < Duration::from_secs(3), "took {elapsed:?}");
    assert!(dns.queries("quiet.example.test") >= 1);

    // Back to normal: answered again.
    dns.set_mode(DnsMode::Normal);
    assert_eq!(
        ipv4s(&resolver(&dns), "quiet.example.test.").await.unwrap(),
        vec![V4]
    );
}

#[tokio::test]
async fn servfail_mode() {
    let dns = TestDns::start().await;
    dns.set("sf.example.test", &[IpAddr::V4(V4)], 60);
    dns.set_mode(DnsMode::ServFail);
    let err = ipv4s(&resolver(&dns), "sf.example.test.")
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            NetError::Dns(DnsError::ResponseCode(ResponseCode::ServFail))
        ),
        "{err:?}"
    );
}

#[tokio::test]
async fn garbage_mode_fails_the_lookup() {
    let dns = TestDns::start().await;
    dns.set("junk.example.test", &[IpAddr::V4(V4)], 60);
    dns.set_mode(DnsMode::Garbage);

    let r = resolver_with(&dns, Transport::UdpAndTcp, Duration::from_millis(300), 0);
    let started = Instant::now();
    let err = ipv4s(&r, "junk.example.test.").await.unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(3));
    eprintln!("garbage (udp+tcp) -> {err:?}");

    let r = resolver_with(&dns, Transport::TcpOnly, Duration::from_millis(300), 0);
    let err = ipv4s(&r, "junk.example.test.").await.unwrap_err();
    eprintln!("garbage (tcp) -> {err:?}");

    // Raw: the reply does not parse as DNS.
    let reply = raw_udp(
        dns.addr,
        &query_bytes(0x1234, "junk.example.test.", RecordType::A, true, false),
    )
    .await;
    assert!(Message::from_vec(&reply).is_err());
}

#[tokio::test]
async fn delay_postpones_answers() {
    let dns = TestDns::start().await;
    dns.set("slow.example.test", &[IpAddr::V4(V4)], 60);
    dns.set_delay(Duration::from_millis(300));
    let started = Instant::now();
    assert_eq!(
        ipv4s(&resolver(&dns), "slow.example.test.").await.unwrap(),
        vec![V4]
    );
    assert!(started.elapsed() >= Duration::from_millis(300));

    let r = resolver_with(&dns, Transport::UdpAndTcp, Duration::from_millis(100), 0);
    let err = ipv4s(&r, "slow.example.test.").await.unwrap_err();
    assert!(matches!(err, NetError::Timeout), "{err:?}");
}

// ---- raw wire-level checks -------------------------------------------------

fn query_bytes(id: u16, name: &str, rtype: RecordType, rd: bool, edns: bool) -> Vec<u8> {
    let mut msg = Message::new(id, MessageType::Query, OpCode::Query);
    msg.metadata.recursion_desired = rd;
    msg.add_query(Query::query(Name::from_ascii(name).unwrap(), rtype));
    if edns {
        let mut e = Edns::new();
        e.set_max_payload(1232);
        msg.set_edns(e);
    }
    msg.to_vec().unwrap()
}

async fn raw_udp(server: SocketAddr, query: &[u8]) -> Vec<u8> {
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    sock.send_to(query, server).await.unwrap();
    let mut buf = vec![0u8; 65_535];
    let (len, from) = tokio::time::timeout(Duration::from_secs(2), sock.recv_from(&mut buf))
        .await
        .expect("udp reply")
        .unwrap();
    assert_eq!(from, server);
    buf.truncate(len);
    buf
}

#[tokio::test]
async fn raw_udp_header_semantics() {
    let dns = TestDns::start().await;
    dns.set("hdr.example.test", &[IpAddr::V4(V4)], 60);

    for (id, rd, edns) in [(0xBEEF, true, true), (0x0102, false, false)] {
        let reply = raw_udp(
            dns.addr,
            &query_bytes(id, "HdR.Example.Test.", RecordType::A, rd, edns),
        )
        .await;
        let msg = Message::from_vec(&reply).unwrap();
        assert_eq!(msg.metadata.id, id);
        assert_eq!(msg.metadata.message_type, MessageType::Response);
        assert!(msg.metadata.authoritative);
        assert_eq!(msg.metadata.recursion_desired, rd);
        assert!(!msg.metadata.recursion_available);
        assert!(!msg.metadata.truncation);
        assert_eq!(msg.metadata.response_code, ResponseCode::NoError);
        assert_eq!(msg.queries.len(), 1);
        // Question echoed with its original case.
        assert_eq!(msg.queries[0].name().to_ascii(), "HdR.Example.Test.");
        assert_eq!(msg.queries[0].query_type(), RecordType::A);
        assert_eq!(msg.answers.len(), 1);
        assert_eq!(msg.edns.is_some(), edns);
    }

    // NXDOMAIN: AA, SOA in authority, no answers.
    let reply = raw_udp(
        dns.addr,
        &query_bytes(
            7,
            "gone.amazonappstream.com.",
            RecordType::AAAA,
            true,
            false,
        ),
    )
    .await;
    let msg = Message::from_vec(&reply).unwrap();
    assert_eq!(msg.metadata.id, 7);
    assert!(msg.metadata.authoritative);
    assert_eq!(msg.metadata.response_code, ResponseCode::NXDomain);
    assert!(msg.answers.is_empty());
    assert_eq!(msg.authorities.len(), 1);
    assert_eq!(msg.authorities[0].record_type(), RecordType::SOA);
    assert_eq!(msg.authorities[0].name.to_ascii(), "amazonappstream.com.");

    // Oversized answer without EDNS: TC set, question kept, no records.
    let addrs: Vec<IpAddr> = (1..=40u8)
        .map(|i| IpAddr::V4(Ipv4Addr::new(10, 9, 0, i)))
        .collect();
    dns.set("wide.example.test", &addrs, 60);
    let reply = raw_udp(
        dns.addr,
        &query_bytes(9, "wide.example.test.", RecordType::A, true, false),
    )
    .await;
    assert!(reply.len() <= 512);
    let msg = Message::from_vec(&reply).unwrap();
    assert_eq!(msg.metadata.id, 9);
    assert!(msg.metadata.truncation);
    assert_eq!(msg.queries.len(), 1);
    assert!(msg.answers.is_empty());
    // ... but with EDNS 1232 it fits.
    let reply = raw_udp(
        dns.addr,
        &query_bytes(10, "wide.example.test.", RecordType::A, true, true),
    )
    .await;
    let msg = Message::from_vec(&reply).unwrap();
    assert!(!msg.metadata.truncation);
    assert_eq!(msg.answers.len(), 40);
}

#[tokio::test]
async fn raw_tcp_multiple_queries_per_connection() {
    let dns = TestDns::start().await;
    dns.set("one.example.test", &[IpAddr::V4(V4)], 60);
    dns.set("two.example.test", &[IpAddr::V6(V6)], 60);

    let mut stream = TcpStream::connect(dns.addr).await.unwrap();
    // Pipeline both queries before reading.
    for (id, name, t) in [
        (1u16, "one.example.test.", RecordType::A),
        (2, "two.example.test.", RecordType::AAAA),
    ] {
        let q = query_bytes(id, name, t, true, false);
        stream
            .write_all(&(q.len() as u16).to_be_bytes())
            .await
            .unwrap();
        stream.write_all(&q).await.unwrap();
    }
    for (id, want) in [(1u16, RData::A(V4.into())), (2, RData::AAAA(V6.into()))] {
        let len = stream.read_u16().await.unwrap();
        let mut buf = vec![0u8; usize::from(len)];
        stream.read_exact(&mut buf).await.unwrap();
        let msg = Message::from_vec(&buf).unwrap();
        assert_eq!(msg.metadata.id, id);
        assert_eq!(msg.answers.len(), 1);
        assert_eq!(msg.answers[0].data, want);
    }
    assert_eq!(dns.queries("one.example.test"), 1);
    assert_eq!(dns.queries("two.example.test"), 1);
}

#[tokio::test]
async fn drop_stops_serving() {
    let dns = TestDns::start().await;
    let addr = dns.addr;
    drop(dns);
    // Abort is asynchronous; the listener goes away once the task is dropped.
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        if TcpStream::connect(addr).await.is_err() {
            break;
        }
        assert!(Instant::now() < deadline, "TCP still accepting after drop");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
