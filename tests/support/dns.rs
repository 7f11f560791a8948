//! In-process authoritative DNS server for integration tests.
//!
//! The test controls everything: which names exist (`set` / `remove`), what
//! the server does with every query (`set_mode`, `set_delay`), and can read
//! back how many queries arrived per name (`queries`).
//!
//! It is built on `hickory-proto` only (parse a `Message`, build a response)
//! over a tokio `UdpSocket` and `TcpListener` bound to the same ephemeral port
//! on 127.0.0.1. Nothing here ever talks to any other DNS server.
//!
//! Behaviour in `DnsMode::Normal`:
//! * known name, matching type (A / AAAA): NOERROR, AA, the records with the
//!   TTL given to `set`;
//! * known name, any other type: NOERROR with no answers (NODATA) and an SOA
//!   in the authority section;
//! * unknown name: NXDOMAIN with an SOA in the authority section;
//! * the SOA is owned by the last two labels of the query name (e.g.
//!   `example.test.`), has TTL 1 and MINIMUM 1, so the negative TTL is 1 s;
//! * responses echo the id, the question (case preserved) and RD, set AA,
//!   never set RA, and carry an OPT record iff the query had one;
//! * UDP responses larger than the requester's advertised size (512 without
//!   EDNS) are replaced by an empty TC=1 response, so resolvers retry on TCP;
//! * TCP uses 2-byte length framing and serves any number of queries per
//!   connection.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use hickory_proto::op::{Edns, Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, SOA};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::task::{JoinHandle, JoinSet};

/// Fault injection for the whole server.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum DnsMode {
    /// Answer from the configured names.
    #[default]
    Normal,
    /// Never answer (queries are still counted; TCP connections stay open).
    Silent,
    /// SERVFAIL to everything.
    ServFail,
    /// Reply with random bytes that do not parse as a DNS message. Over TCP
    /// the garbage is written raw (no valid framing) and the connection is
    /// closed.
    Garbage,
}

/// Negative TTL (seconds) carried by the SOA of NXDOMAIN / NODATA answers.
pub const NEGATIVE_TTL: u32 = 1;

/// EDNS payload size the server advertises in its own OPT record.
const SERVER_EDNS_PAYLOAD: u16 = 1232;

#[derive(Default)]
struct Entry {
    v4: Vec<std::net::Ipv4Addr>,
    v6: Vec<std::net::Ipv6Addr>,
    ttl: u32,
}

#[derive(Default)]
struct State {
    names: HashMap<String, Entry>,
    counts: HashMap<String, usize>,
    total: usize,
    mode: DnsMode,
    delay: Duration,
}

struct Inner {
    state: Mutex<State>,
    rng: AtomicU64,
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panicking test thread must not wedge the server for other checks.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn next_random(&self) -> u64 {
        // splitmix64 over an atomic counter: good enough for garbage bytes.
        let mut z = self
            .rng
            .fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed)
            .wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Random bytes (1..=64 of them) guaranteed not to parse as a DNS message.
    fn garbage(&self) -> Vec<u8> {
        loop {
            let len = 1 + (self.next_random() % 64) as usize;
            let bytes: Vec<u8> = (0..len).map(|_| self.next_random() as u8).collect();
            if Message::from_vec(&bytes).is_err() {
                return bytes;
            }
        }
    }
}

/// What to do with one received query.
enum Action {
    Drop,
    Reply(Vec<u8>),
    Garbage(Vec<u8>),
}

/// A running test DNS server. Serves until dropped.
pub struct TestDns {
    /// UDP and TCP are both bound on this address.
    pub addr: SocketAddr,
    inner: Arc<Inner>,
    tasks: Vec<JoinHandle<()>>,
}

impl TestDns {
    /// Binds UDP and TCP on 127.0.0.1 with the same ephemeral port, serves
    /// until dropped. Must be called inside a tokio runtime.
    pub async fn start() -> TestDns {
        super::isolate();
        let (udp, tcp) = bind_pair().await;
        let addr = udp.local_addr().expect("udp local_addr");
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0)
            ^ u64::from(addr.port());
        let inner = Arc::new(Inner {
            state: Mutex::new(State::default()),
            rng: AtomicU64::new(seed),
        });
        let tasks = vec![
            tokio::spawn(serve_udp(Arc::new(udp), inner.clone())),
            tokio::spawn(serve_tcp(tcp, inner.clone())),
        ];
        TestDns { addr, inner, tasks }
    }

    /// Answers `name` (case-insensitive, with or without trailing dot) with
    /// these addresses: A records for the IPv4 ones, AAAA for the IPv6 ones,
    /// each with `ttl` seconds. Replaces any earlier answer. A query of the
    /// other type (or any other type) for a known name gets NODATA + SOA.
    /// An empty `addrs` makes the name exist with no addresses at all.
    pub fn set(&self, name: &str, addrs: &[IpAddr], ttl: u32) {
        let mut entry = Entry {
            ttl,
            ..Entry::default()
        };
        for addr in addrs {
            match addr {
                IpAddr::V4(v4) => entry.v4.push(*v4),
                IpAddr::V6(v6) => entry.v6.push(*v6),
            }
        }
        self.inner.lock().names.insert(normalize(name), entry);
    }

    /// Forget `name`; it gets NXDOMAIN from now on.
    pub fn remove(&self, name: &str) {
        self.inner.lock().names.remove(&normalize(name));
    }

    /// How many queries (any type, UDP or TCP, any mode) arrived for `name`
    /// since start.
    pub fn queries(&self, name: &str) -> usize {
        self.inner
            .lock()
            .counts
            .get(&normalize(name))
            .copied()
            .unwrap_or(0)
    }

    /// How many parseable queries arrived in total since start.
    pub fn total_queries(&self) -> usize {
        self.inner.lock().total
    }

    /// Fault injection for the whole server.
    pub fn set_mode(&self, mode: DnsMode) {
        self.inner.lock().mode = mode;
    }

    /// The current fault-injection mode.
    pub fn mode(&self) -> DnsMode {
        self.inner.lock().mode
    }

    /// Delay every reply (in all modes that reply) by `delay`. Zero (the
    /// default) answers immediately. Replies are delayed independently, so a
    /// slow reply does not hold up later queries.
    pub fn set_delay(&self, delay: Duration) {
        self.inner.lock().delay = delay;
    }
}

impl Drop for TestDns {
    fn drop(&mut self) {
        // Aborting the UDP / TCP tasks drops their JoinSets, which aborts the
        // per-connection and delayed-reply tasks as well.
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// Lower-case, no trailing dot.
fn normalize(name: &str) -> String {
    let name = name.trim();
    let name = name.strip_suffix('.').unwrap_or(name);
    name.to_ascii_lowercase()
}

async fn bind_pair() -> (UdpSocket, TcpListener) {
    let mut last_err = None;
    for _ in 0..50 {
        let udp = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .expect("bind test DNS UDP socket");
        let port = udp.local_addr().expect("udp local_addr").port();
        match TcpListener::bind((Ipv4Addr::LOCALHOST, port)).await {
            Ok(tcp) => return (udp, tcp),
            Err(e) => last_err = Some(e),
        }
    }
    panic!("could not bind UDP and TCP on the same port: {last_err:?}");
}

async fn serve_udp(socket: Arc<UdpSocket>, inner: Arc<Inner>) {
    let mut buf = vec![0u8; 65_535];
    let mut delayed = JoinSet::new();
    loop {
        while delayed.try_join_next().is_some() {}
        let (len, peer) = match socket.recv_from(&mut buf).await {
            Ok(x) => x,
            // e.g. ICMP port unreachable surfacing as ECONNREFUSED on Linux.
            Err(_) => continue,
        };
        let (action, delay) = handle(&inner, &buf[..len], Some(512));
        let bytes = match action {
            Action::Drop => continue,
            Action::Reply(b) | Action::Garbage(b) => b,
        };
        if delay.is_zero() {
            let _ = socket.send_to(&bytes, peer).await;
        } else {
            let socket = socket.clone();
            delayed.spawn(async move {
                tokio::time::sleep(delay).await;
                let _ = socket.send_to(&bytes, peer).await;
            });
        }
    }
}

async fn serve_tcp(listener: TcpListener, inner: Arc<Inner>) {
    let mut conns = JoinSet::new();
    loop {
        while conns.try_join_next().is_some() {}
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        conns.spawn(serve_tcp_conn(stream, inner.clone()));
    }
}

async fn serve_tcp_conn(stream: TcpStream, inner: Arc<Inner>) {
    let _ = stream.set_nodelay(true);
    let (mut rd, wr) = stream.into_split();
    let wr = Arc::new(tokio::sync::Mutex::new(wr));
    let mut delayed = JoinSet::new();
    loop {
        while delayed.try_join_next().is_some() {}
        let Ok(len) = rd.read_u16().await else { return };
        let mut buf = vec![0u8; usize::from(len)];
        if rd.read_exact(&mut buf).await.is_err() {
            return;
        }
        let (action, delay) = handle(&inner, &buf, None);
        let (frame, close) = match action {
            Action::Drop => continue,
            Action::Reply(b) => {
                let mut frame = Vec::with_capacity(b.len() + 2);
                frame.extend_from_slice(&(b.len() as u16).to_be_bytes());
                frame.extend_from_slice(&b);
                (frame, false)
            }
            Action::Garbage(b) => (b, true),
        };
        if delay.is_zero() && !close {
            if wr.lock().await.write_all(&frame).await.is_err() {
                return;
            }
            continue;
        }
        let wr = wr.clone();
        let send = async move {
            tokio::time::sleep(delay).await;
            let mut w = wr.lock().await;
            let _ = w.write_all(&frame).await;
            if close {
                let _ = w.shutdown().await;
            }
        };
        if close {
            // Garbage: write it, close, and stop reading this connection.
            send.await;
            return;
        }
        delayed.spawn(send);
    }
}

/// Decide what to do with one query. `udp_limit` is `Some(512)` for UDP
/// (raised by the query's EDNS payload size), `None` for TCP.
fn handle(inner: &Inner, bytes: &[u8], udp_limit: Option<usize>) -> (Action, Duration) {
    let parsed = Message::from_vec(bytes);

    let (mode, delay) = {
        let mut st = inner.lock();
        if let Ok(msg) = &parsed {
            st.total += 1;
            for q in &msg.queries {
                *st.counts
                    .entry(normalize(&q.name().to_ascii()))
                    .or_default() += 1;
            }
        }
        (st.mode, st.delay)
    };

    let action = match mode {
        DnsMode::Silent => Action::Drop,
        DnsMode::Garbage => Action::Garbage(inner.garbage()),
        DnsMode::ServFail | DnsMode::Normal => match parsed {
            Err(_) => match bytes {
                // Unparseable but has an id: FORMERR, as a real server would.
                [a, b, ..] => {
                    let id = u16::from_be_bytes([*a, *b]);
                    let resp = Message::error_msg(id, OpCode::Query, ResponseCode::FormErr);
                    resp.to_vec().map_or(Action::Drop, Action::Reply)
                }
                _ => Action::Drop,
            },
            Ok(req) if req.metadata.message_type != MessageType::Query => Action::Drop,
            Ok(req) => {
                let resp = if mode == DnsMode::ServFail {
                    let mut resp = response_skeleton(&req);
                    resp.metadata.authoritative = false;
                    resp.metadata.response_code = ResponseCode::ServFail;
                    resp
                } else {
                    answer(inner, &req)
                };
                encode(
                    &resp,
                    udp_limit.map(|l| l.max(usize::from(req.max_payload()))),
                )
            }
        },
    };
    (action, delay)
}

/// Response header + echoed question + OPT if the query had one.
fn response_skeleton(req: &Message) -> Message {
    let mut resp = Message::response(req.metadata.id, req.metadata.op_code);
    resp.metadata.authoritative = true;
    resp.metadata.recursion_desired = req.metadata.recursion_desired;
    resp.metadata.recursion_available = false;
    resp.metadata.checking_disabled = req.metadata.checking_disabled;
    resp.add_queries(req.queries.iter().cloned());
    if req.edns.is_some() {
        let mut edns = Edns::new();
        edns.set_max_payload(SERVER_EDNS_PAYLOAD);
        resp.set_edns(edns);
    }
    resp
}

fn answer(inner: &Inner, req: &Message) -> Message {
    let mut resp = response_skeleton(req);
    if req.metadata.op_code != OpCode::Query {
        resp.metadata.response_code = ResponseCode::NotImp;
        return resp;
    }
    let [query] = req.queries.as_slice() else {
        resp.metadata.response_code = ResponseCode::FormErr;
        return resp;
    };
    if query.query_class() != DNSClass::IN {
        resp.metadata.response_code = ResponseCode::Refused;
        return resp;
    }

    let qname = query.name().clone();
    let key = normalize(&qname.to_ascii());
    let st = inner.lock();
    let Some(entry) = st.names.get(&key) else {
        resp.metadata.response_code = ResponseCode::NXDomain;
        resp.add_authority(soa_for(&qname));
        return resp;
    };

    let mut answers: Vec<Record> = Vec::new();
    let qtype = query.query_type();
    if matches!(qtype, RecordType::A | RecordType::ANY) {
        answers.extend(
            entry
                .v4
                .iter()
                .map(|ip| Record::from_rdata(qname.clone(), entry.ttl, RData::A(A(*ip)))),
        );
    }
    if matches!(qtype, RecordType::AAAA | RecordType::ANY) {
        answers.extend(
            entry
                .v6
                .iter()
                .map(|ip| Record::from_rdata(qname.clone(), entry.ttl, RData::AAAA(AAAA(*ip)))),
        );
    }
    drop(st);

    if answers.is_empty() {
        // NODATA
        resp.add_authority(soa_for(&qname));
    } else {
        resp.add_answers(answers);
    }
    resp
}

/// SOA of the "zone" holding `qname`: its last two labels (or the name itself
/// if it is shorter), negative TTL `NEGATIVE_TTL`.
fn soa_for(qname: &Name) -> Record {
    let mut zone = qname.to_lowercase();
    zone.set_fqdn(true);
    while zone.num_labels() > 2 {
        zone = zone.base_name();
    }
    let child = |label: &str| {
        Name::from_ascii(label)
            .and_then(|l| l.append_domain(&zone))
            .unwrap_or_else(|_| zone.clone())
    };
    let soa = SOA::new(
        child("ns"),
        child("hostmaster"),
        1,
        3600,
        600,
        86_400,
        NEGATIVE_TTL,
    );
    Record::from_rdata(zone.clone(), NEGATIVE_TTL, RData::SOA(soa))
}

/// Serialize `resp`; over UDP (`limit` = Some), replace an oversized response
/// by an empty TC=1 one so the client retries over TCP.
fn encode(resp: &Message, limit: Option<usize>) -> Action {
    let Ok(bytes) = resp.to_vec() else {
        return Action::Drop;
    };
    let limit = limit.unwrap_or(usize::from(u16::MAX));
    if bytes.len() <= limit {
        return Action::Reply(bytes);
    }
    // `truncate` keeps the header (id, flags, rcode) and question, sets TC.
    let truncated = resp.truncate();
    match truncated.to_vec() {
        Ok(b) if b.len() <= limit => Action::Reply(b),
        // Even header + question does not fit: send just the header.
        _ => {
            let mut bare = Message::response(resp.metadata.id, resp.metadata.op_code);
            bare.metadata = truncated.metadata;
            bare.to_vec().map_or(Action::Drop, Action::Reply)
        }
    }
}
