//! The PROXY protocol, versions 1 and 2: who the client really is, behind a load balancer.
//!
//! An AWS NLB with IP targets, a Kubernetes Service with `externalTrafficPolicy: Cluster`, or
//! an HAProxy in front makes every client look like the balancer. Those balancers can put a
//! header in front of the connection's first byte naming the original client; portcullis reads
//! it from sources in `[proxy_protocol] trusted` and then uses that address everywhere (ACL,
//! per-client cap, logs). From anyone else a header is a forgery and is refused.
//!
//! This module is the pure parser: it never trusts a length past the bytes it has, never
//! allocates more than the header it reads, and says "need more" rather than guessing while a
//! header is incomplete, so a header split over many TCP segments parses the same as one in a
//! single segment. Reading from the socket, trust and the replies live in
//! [`server`](crate::server).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

/// The version 2 signature: chosen by the spec so no HTTP, TLS or other protocol's first
/// bytes can look like it.
pub const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
const V1_PREFIX: &[u8] = b"PROXY ";
/// The longest v1 line the spec allows, CRLF included.
const V1_MAX: usize = 107;
const V2_HEADER: usize = 16;
/// The most address and TLV bytes accepted after a v2 header's fixed part. The spec allows
/// 65,535; a balancer's real header (addresses, a VPC endpoint ID, perhaps a CRC) is well
/// under 300 bytes, and a buffer a peer can make us hold should stay small.
pub const V2_MAX_BODY: usize = 4096 - V2_HEADER;

/// The AWS TLV (NLB through PrivateLink); its first value byte is a subtype.
const PP2_TYPE_AWS: u8 = 0xEA;
const PP2_SUBTYPE_AWS_VPCE_ID: u8 = 0x01;
/// A VPC endpoint ID is `vpce-` and 17 hex digits today; this leaves room for a longer form.
const MAX_VPCE_ID: usize = 64;

/// A complete, valid header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub version: u8,
    /// The original client; `None` when the header carries no usable address (a v2 `LOCAL`
    /// health check, v1 `UNKNOWN`, a v2 `UNSPEC` or Unix-socket family): the connection's
    /// own address stands.
    pub source: Option<SocketAddr>,
    /// True for a v2 `LOCAL` command: the balancer speaking for itself (health checks).
    pub local: bool,
    /// The VPC endpoint ID from an AWS NLB through PrivateLink (TLV 0xEA, subtype 0x01).
    pub vpce_id: Option<String>,
}

/// Why a header is refused. Each is answered `400 bad_request`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Invalid {
    #[error("v1 header longer than 107 bytes or without CRLF")]
    V1TooLong,
    #[error("v1 header is malformed")]
    V1Malformed,
    #[error("v1 address does not match its family")]
    V1FamilyMismatch,
    #[error("v2 version or command is not one the spec defines")]
    V2BadVersion,
    #[error("v2 address family or protocol is not one the spec defines")]
    V2BadFamily,
    #[error("v2 header is longer than we accept")]
    V2TooLong,
    #[error("v2 length is shorter than its address block")]
    V2ShortAddress,
    #[error("v2 TLV runs past the end of the header")]
    V2BadTlv,
    #[error("v2 datagram (UDP) header on a TCP connection")]
    V2Datagram,
    #[error("a second PROXY header")]
    Repeated,
}

/// What the bytes at the start of a connection are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    /// No header: the first bytes are the client's own (HTTP, TLS).
    Absent,
    /// Could still become a header; read more.
    Incomplete,
    /// A header of this many bytes; what follows it is the client's.
    Complete(Header, usize),
    Invalid(Invalid),
}

/// Which signature `buf` starts with. `Absent` is decided at the first byte that differs
/// from both, so an ordinary client costs a comparison or two.
enum Signature {
    Absent,
    Partial,
    V1,
    V2,
}

fn signature(buf: &[u8]) -> Signature {
    let matches = |sig: &[u8]| {
        let n = buf.len().min(sig.len());
        (buf[..n] == sig[..n]).then_some(n == sig.len())
    };
    match (matches(&V2_SIGNATURE), matches(V1_PREFIX)) {
        (Some(true), _) => Signature::V2,
        (_, Some(true)) => Signature::V1,
        (None, None) => Signature::Absent,
        _ => Signature::Partial,
    }
}

/// Parses the header at the start of `buf`.
pub fn parse(buf: &[u8]) -> Parsed {
    match signature(buf) {
        Signature::Absent => Parsed::Absent,
        Signature::Partial => Parsed::Incomplete,
        Signature::V1 => parse_v1(buf),
        Signature::V2 => parse_v2(buf),
    }
}

/// `PROXY TCP4 192.0.2.1 198.51.100.1 56324 443\r\n`, `PROXY TCP6 ...`, `PROXY UNKNOWN ...`.
fn parse_v1(buf: &[u8]) -> Parsed {
    let window = &buf[..buf.len().min(V1_MAX)];
    let Some(end) = window.windows(2).position(|w| w == b"\r\n") else {
        return if buf.len() >= V1_MAX {
            Parsed::Invalid(Invalid::V1TooLong)
        } else {
            Parsed::Incomplete
        };
    };
    let Ok(line) = std::str::from_utf8(&buf[V1_PREFIX.len()..end]) else {
        return Parsed::Invalid(Invalid::V1Malformed);
    };
    let header = |source| Header {
        version: 1,
        source,
        local: false,
        vpce_id: None,
    };
    if line == "UNKNOWN" || line.starts_with("UNKNOWN ") {
        return Parsed::Complete(header(None), end + 2);
    }
    match v1_source(line) {
        Ok(source) => Parsed::Complete(header(Some(source)), end + 2),
        Err(invalid) => Parsed::Invalid(invalid),
    }
}

/// The source of a `TCP4`/`TCP6` line: exactly five fields after the protocol, single spaces.
fn v1_source(line: &str) -> Result<SocketAddr, Invalid> {
    let fields: Vec<&str> = line.split(' ').collect();
    let [family, source, destination, source_port, destination_port] = fields[..] else {
        return Err(Invalid::V1Malformed);
    };
    let source: IpAddr = source.parse().map_err(|_| Invalid::V1Malformed)?;
    let destination: IpAddr = destination.parse().map_err(|_| Invalid::V1Malformed)?;
    let v4 = match family {
        "TCP4" => true,
        "TCP6" => false,
        _ => return Err(Invalid::V1Malformed),
    };
    if source.is_ipv4() != v4 || destination.is_ipv4() != v4 {
        return Err(Invalid::V1FamilyMismatch);
    }
    let source_port = v1_port(source_port)?;
    v1_port(destination_port)?;
    Ok(SocketAddr::new(source, source_port))
}

/// A decimal port, digits only, no leading zero (the spec's own rule).
fn v1_port(s: &str) -> Result<u16, Invalid> {
    let plain = !s.is_empty() && s.len() <= 5 && s.bytes().all(|b| b.is_ascii_digit());
    if !plain || (s.len() > 1 && s.starts_with('0')) {
        return Err(Invalid::V1Malformed);
    }
    s.parse().map_err(|_| Invalid::V1Malformed)
}

fn parse_v2(buf: &[u8]) -> Parsed {
    if buf.len() < V2_HEADER {
        return Parsed::Incomplete;
    }
    let version_command = buf[12];
    let local = match version_command {
        0x20 => true,
        0x21 => false,
        _ => return Parsed::Invalid(Invalid::V2BadVersion),
    };
    let family = buf[13];
    let length = usize::from(u16::from_be_bytes([buf[14], buf[15]]));
    if length > V2_MAX_BODY {
        return Parsed::Invalid(Invalid::V2TooLong);
    }
    let total = V2_HEADER + length;
    if buf.len() < total {
        return Parsed::Incomplete;
    }
    let body = &buf[V2_HEADER..total];
    match v2_body(family, body, local) {
        Ok(header) => Parsed::Complete(header, total),
        Err(invalid) => Parsed::Invalid(invalid),
    }
}

/// The address block and TLVs. A `LOCAL` header's family is ignored, as the spec says, but
/// its TLVs must still be well-formed.
fn v2_body(family: u8, body: &[u8], local: bool) -> Result<Header, Invalid> {
    let address_len = match family {
        0x00 => 0,
        0x11 | 0x12 => 12,
        0x21 | 0x22 => 36,
        0x31 | 0x32 => 216,
        _ if local => 0,
        _ => return Err(Invalid::V2BadFamily),
    };
    if body.len() < address_len {
        return Err(Invalid::V2ShortAddress);
    }
    if !local && family & 0x0F == 0x02 {
        return Err(Invalid::V2Datagram);
    }
    let (addresses, tlvs) = body.split_at(address_len);
    let source = match family {
        _ if local => None,
        0x11 => {
            let ip = Ipv4Addr::new(addresses[0], addresses[1], addresses[2], addresses[3]);
            Some(SocketAddr::new(ip.into(), port_at(addresses, 8)))
        }
        0x21 => {
            let octets: [u8; 16] = addresses[..16].try_into().expect("36 bytes checked");
            Some(SocketAddr::new(
                Ipv6Addr::from(octets).into(),
                port_at(addresses, 32),
            ))
        }
        // UNSPEC and Unix sockets: nothing a TCP proxy can use; the connection's own stands.
        _ => None,
    };
    Ok(Header {
        version: 2,
        source,
        local,
        vpce_id: vpce_id(tlvs)?,
    })
}

fn port_at(bytes: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([bytes[at], bytes[at + 1]])
}

/// Walks the TLVs (type, 16-bit length, value) and returns the AWS VPC endpoint ID if one is
/// there. Every TLV must end within the header; unknown types are skipped.
fn vpce_id(mut tlvs: &[u8]) -> Result<Option<String>, Invalid> {
    let mut found = None;
    while !tlvs.is_empty() {
        if tlvs.len() < 3 {
            return Err(Invalid::V2BadTlv);
        }
        let kind = tlvs[0];
        let length = usize::from(u16::from_be_bytes([tlvs[1], tlvs[2]]));
        let value = tlvs.get(3..3 + length).ok_or(Invalid::V2BadTlv)?;
        if kind == PP2_TYPE_AWS && value.first() == Some(&PP2_SUBTYPE_AWS_VPCE_ID) {
            found = endpoint_id(&value[1..]);
        }
        tlvs = &tlvs[3 + length..];
    }
    Ok(found)
}

/// The ID as logged: only what an endpoint ID can contain, so the log line stays plain.
fn endpoint_id(raw: &[u8]) -> Option<String> {
    let plain = !raw.is_empty()
        && raw.len() <= MAX_VPCE_ID
        && raw.iter().all(|b| b.is_ascii_alphanumeric() || *b == b'-');
    plain.then(|| String::from_utf8_lossy(raw).into_owned())
}

/// Why a connection's PROXY stage ended it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The peer closed or failed before a decision.
    Closed,
    /// A header from a source not in `[proxy_protocol] trusted`: a forgery, whatever it says.
    Untrusted,
    Invalid(Invalid),
}

impl Refused {
    /// For logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Refused::Closed => "closed",
            Refused::Untrusted => "PROXY header from an untrusted source",
            Refused::Invalid(_) => "malformed PROXY header",
        }
    }
}

/// Reads a connection's first bytes into `buf` until it is clear whether they begin with a
/// header; returns the header (its bytes removed from `buf`), or `None` when the client's own
/// bytes start at once. What follows a header stays in `buf`. The caller bounds the time.
///
/// From an untrusted source any header is refused, valid or not: nothing in it is used.
pub async fn read<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut BytesMut,
    trusted: bool,
) -> Result<Option<Header>, Refused> {
    loop {
        match parse(buf) {
            Parsed::Absent => return Ok(None),
            Parsed::Complete(_, _) | Parsed::Invalid(_) if !trusted => {
                return Err(Refused::Untrusted);
            }
            Parsed::Complete(header, length) => {
                buf.advance(length);
                return match parse(buf) {
                    Parsed::Complete(_, _) | Parsed::Invalid(_) => {
                        Err(Refused::Invalid(Invalid::Repeated))
                    }
                    _ => Ok(Some(header)),
                };
            }
            Parsed::Invalid(invalid) => return Err(Refused::Invalid(invalid)),
            Parsed::Incomplete => {
                buf.reserve(512);
                match stream.read_buf(buf).await {
                    Ok(0) | Err(_) => return Err(Refused::Closed),
                    Ok(_) => {}
                }
            }
        }
    }
}

/// Builders for tests and fuzzing: headers laid out byte for byte as a balancer sends them.
pub mod sample {
    use std::net::SocketAddr;

    use super::{PP2_SUBTYPE_AWS_VPCE_ID, PP2_TYPE_AWS, V2_SIGNATURE};

    /// A v1 line for a TCP connection from `source` to `destination`.
    pub fn v1(source: SocketAddr, destination: SocketAddr) -> Vec<u8> {
        let family = if source.is_ipv4() { "TCP4" } else { "TCP6" };
        format!(
            "PROXY {family} {} {} {} {}\r\n",
            source.ip(),
            destination.ip(),
            source.port(),
            destination.port()
        )
        .into_bytes()
    }

    /// A v2 `PROXY` header, with `tlvs` (already encoded) after the addresses.
    pub fn v2(source: SocketAddr, destination: SocketAddr, tlvs: &[u8]) -> Vec<u8> {
        let mut body = Vec::new();
        let family = match (source, destination) {
            (SocketAddr::V4(s), SocketAddr::V4(d)) => {
                body.extend(s.ip().octets());
                body.extend(d.ip().octets());
                0x11
            }
            (SocketAddr::V6(s), SocketAddr::V6(d)) => {
                body.extend(s.ip().octets());
                body.extend(d.ip().octets());
                0x21
            }
            _ => panic!("source and destination must be of one family"),
        };
        body.extend(source.port().to_be_bytes());
        body.extend(destination.port().to_be_bytes());
        body.extend(tlvs);
        frame(0x21, family, &body)
    }

    /// A v2 `LOCAL` header (a health check), no addresses.
    pub fn v2_local() -> Vec<u8> {
        frame(0x20, 0x00, &[])
    }

    /// Signature, version and command, family, length, body.
    pub fn frame(version_command: u8, family: u8, body: &[u8]) -> Vec<u8> {
        let mut out = V2_SIGNATURE.to_vec();
        out.push(version_command);
        out.push(family);
        out.extend((body.len() as u16).to_be_bytes());
        out.extend(body);
        out
    }

    /// One TLV.
    pub fn tlv(kind: u8, value: &[u8]) -> Vec<u8> {
        let mut out = vec![kind];
        out.extend((value.len() as u16).to_be_bytes());
        out.extend(value);
        out
    }

    /// The TLV an AWS NLB adds through PrivateLink.
    pub fn aws_vpce(id: &str) -> Vec<u8> {
        let mut value = vec![PP2_SUBTYPE_AWS_VPCE_ID];
        value.extend(id.as_bytes());
        tlv(PP2_TYPE_AWS, &value)
    }
}

#[cfg(test)]
mod tests {
    use super::sample::*;
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn complete(buf: &[u8]) -> (Header, usize) {
        match parse(buf) {
            Parsed::Complete(header, n) => (header, n),
            other => panic!("{other:?} for {buf:?}"),
        }
    }

    #[test]
    fn v1_tcp4_and_tcp6() {
        let line = v1(addr("192.0.2.7:56324"), addr("198.51.100.1:3128"));
        let mut buf = line.clone();
        buf.extend(b"CONNECT a:443 HTTP/1.1\r\n");
        let (header, n) = complete(&buf);
        assert_eq!(n, line.len());
        assert_eq!(header.source, Some(addr("192.0.2.7:56324")));
        let six = v1(addr("[2001:db8::7]:1"), addr("[2001:db8::1]:3128"));
        assert_eq!(complete(&six).0.source, Some(addr("[2001:db8::7]:1")));
        let (unknown, n) = complete(b"PROXY UNKNOWN whatever\r\nX");
        assert_eq!((unknown.source, n), (None, 24));
    }

    #[test]
    fn v1_refusals() {
        for (line, why) in [
            (
                &b"PROXY TCP4 192.0.2.7 ::1 1 2\r\n"[..],
                Invalid::V1FamilyMismatch,
            ),
            (
                b"PROXY TCP6 192.0.2.7 192.0.2.8 1 2\r\n",
                Invalid::V1FamilyMismatch,
            ),
            (
                b"PROXY TCP4 192.0.2.7 192.0.2.8 1\r\n",
                Invalid::V1Malformed,
            ),
            (
                b"PROXY TCP4 192.0.2.7 192.0.2.8 01 2\r\n",
                Invalid::V1Malformed,
            ),
            (
                b"PROXY TCP4 192.0.2.7 192.0.2.8 65536 2\r\n",
                Invalid::V1Malformed,
            ),
            (
                b"PROXY TCP4  192.0.2.7 192.0.2.8 1 2\r\n",
                Invalid::V1Malformed,
            ),
            (
                b"PROXY TCP5 192.0.2.7 192.0.2.8 1 2\r\n",
                Invalid::V1Malformed,
            ),
            (
                b"PROXY TCP4 999.0.2.7 192.0.2.8 1 2\r\n",
                Invalid::V1Malformed,
            ),
            (
                b"PROXY TCP4 192.0.2.7 192.0.2.8 1 +2\r\n",
                Invalid::V1Malformed,
            ),
        ] {
            assert_eq!(
                parse(line),
                Parsed::Invalid(why),
                "{}",
                String::from_utf8_lossy(line)
            );
        }
        let long = [b"PROXY ".as_slice(), &[b'A'; 110]].concat();
        assert_eq!(parse(&long), Parsed::Invalid(Invalid::V1TooLong));
    }

    #[test]
    fn v2_tcp_with_the_aws_tlv_and_others_skipped() {
        let tlvs = [
            tlv(0x04, b"noop"),
            aws_vpce("vpce-0123456789abcdef0"),
            tlv(0x03, &[0; 4]),
        ]
        .concat();
        let header = v2(addr("10.1.2.3:40000"), addr("10.0.0.9:3128"), &tlvs);
        let (parsed, n) = complete(&header);
        assert_eq!(n, header.len());
        assert_eq!(parsed.source, Some(addr("10.1.2.3:40000")));
        assert_eq!(parsed.vpce_id.as_deref(), Some("vpce-0123456789abcdef0"));
        let six = v2(addr("[2001:db8::5]:7"), addr("[2001:db8::1]:3128"), &[]);
        assert_eq!(complete(&six).0.source, Some(addr("[2001:db8::5]:7")));
    }

    #[test]
    fn v2_local_keeps_the_connection_address() {
        let (header, _) = complete(&v2_local());
        assert!(header.local);
        assert_eq!(header.source, None);
    }

    #[test]
    fn split_anywhere_is_incomplete_never_wrong() {
        let tlvs = aws_vpce("vpce-1");
        let headers = [
            v2(addr("10.1.2.3:40000"), addr("10.0.0.9:3128"), &tlvs),
            v1(addr("192.0.2.7:56324"), addr("198.51.100.1:3128")),
        ];
        for header in headers {
            for cut in 0..header.len() {
                assert_eq!(parse(&header[..cut]), Parsed::Incomplete, "cut at {cut}");
            }
        }
    }

    #[test]
    fn v2_refusals() {
        let v4 = |len: usize| frame(0x21, 0x11, &vec![0; len]);
        assert_eq!(parse(&v4(8)), Parsed::Invalid(Invalid::V2ShortAddress));
        assert_eq!(
            parse(&frame(0x11, 0x11, &[0; 12])),
            Parsed::Invalid(Invalid::V2BadVersion)
        );
        assert_eq!(
            parse(&frame(0x22, 0x11, &[0; 12])),
            Parsed::Invalid(Invalid::V2BadVersion)
        );
        assert_eq!(
            parse(&frame(0x21, 0x41, &[0; 12])),
            Parsed::Invalid(Invalid::V2BadFamily)
        );
        assert_eq!(
            parse(&frame(0x21, 0x12, &[0; 12])),
            Parsed::Invalid(Invalid::V2Datagram)
        );
        let mut absurd = v4(12);
        absurd.extend([0x04, 0xFF, 0xFF, 1, 2]);
        let absurd = frame(0x21, 0x11, &absurd[16..]);
        assert_eq!(parse(&absurd), Parsed::Invalid(Invalid::V2BadTlv));
        let dangling = frame(0x21, 0x11, &[vec![0; 12], vec![0x04, 0x00]].concat());
        assert_eq!(parse(&dangling), Parsed::Invalid(Invalid::V2BadTlv));
        let mut huge = V2_SIGNATURE.to_vec();
        huge.extend([0x21, 0x11, 0xFF, 0xFF]);
        assert_eq!(parse(&huge), Parsed::Invalid(Invalid::V2TooLong));
    }

    #[test]
    fn ordinary_first_bytes_are_absent_at_once() {
        for first in [
            &b"CONNECT a:443 HTTP/1.1\r\n"[..],
            b"POST / HTTP/1.1",
            b"PUT",
            b"\x16\x03\x01",
            b"\r\n\r\nX",
        ] {
            assert_eq!(parse(first), Parsed::Absent, "{first:?}");
        }
        assert_eq!(parse(b"P"), Parsed::Incomplete);
        assert_eq!(parse(b"PROX"), Parsed::Incomplete);
    }

    #[test]
    fn a_hostile_vpce_id_is_dropped_not_logged() {
        let tlvs = aws_vpce("vpce-\"},{\"x\":\"y");
        let header = v2(addr("10.1.2.3:1"), addr("10.0.0.9:3128"), &tlvs);
        assert_eq!(complete(&header).0.vpce_id, None);
    }
}
