//! The SNI check: does the TLS ClientHello inside a tunnel name the host the client CONNECTed to?
//!
//! `*.cloudfront.net` is the classic domain-fronting road out of a corporate network: CONNECT to
//! an allowed name, then speak TLS to something else. After the 200, portcullis reads the
//! client's first handshake message (bounded in bytes and time), takes its `server_name`, and
//! compares. The bytes read are forwarded unchanged when the tunnel is allowed.
//!
//! The parser is small and careful rather than a full TLS stack: it only walks length-prefixed
//! fields, never trusts a length past the bytes it has, and handles a ClientHello split over
//! several records and several TCP segments.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

/// The most bytes read while looking for a complete ClientHello. Real ones are under 2 KiB;
/// post-quantum key shares and many extensions stay well under this.
pub const MAX_HELLO: usize = 32 * 1024;

const RECORD_HEADER: usize = 5;
const HANDSHAKE: u8 = 0x16;
const CLIENT_HELLO: u8 = 0x01;
const SERVER_NAME: u16 = 0x0000;

/// What the first bytes of a tunnel turned out to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hello {
    /// A ClientHello; its `server_name`, lowercased without a trailing dot, if it has one.
    Tls(Option<String>),
    /// Not a TLS handshake.
    NotTls,
}

/// Why the ClientHello could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadError {
    /// The client closed or failed before a whole ClientHello arrived.
    Closed,
    /// No whole ClientHello within the time allowed.
    Timeout,
    /// More than [`MAX_HELLO`] bytes without a whole ClientHello.
    TooLarge,
}

/// Reads from `stream` (after the bytes already in `early`) until the first handshake message
/// is complete. Returns every byte read, to be forwarded unchanged if the tunnel goes on, and
/// what it was.
pub async fn read_hello<S: AsyncRead + Unpin>(
    stream: &mut S,
    early: Bytes,
    within: Duration,
) -> (Bytes, Result<Hello, ReadError>) {
    let mut buf = BytesMut::from(&early[..]);
    let read = async {
        loop {
            match parse(&buf) {
                Parse::Done(hello) => return Ok(hello),
                Parse::NeedMore if buf.len() >= MAX_HELLO => return Err(ReadError::TooLarge),
                Parse::NeedMore => {}
            }
            buf.reserve(4096);
            match stream.read_buf(&mut buf).await {
                Ok(0) | Err(_) => return Err(ReadError::Closed),
                Ok(_) => {}
            }
        }
    };
    let hello = tokio::time::timeout(within, read)
        .await
        .unwrap_or(Err(ReadError::Timeout));
    (buf.freeze(), hello)
}

/// The ClientHello read from a copy of the client's bytes as they pass, for `sni = "log"`:
/// nothing waits for it. Holds a copy only while a hello is split over several reads, and
/// frees it once there is a verdict.
#[derive(Debug, Default)]
pub struct Watch {
    seen: BytesMut,
}

impl Watch {
    /// Adds `bytes`; returns what the tunnel carries once that is known.
    pub fn observe(&mut self, bytes: &[u8]) -> Option<Result<Hello, ReadError>> {
        let verdict = if self.seen.is_empty() {
            // The usual case: the whole hello in one read, parsed where it lies.
            match parse(bytes) {
                Parse::Done(hello) => Some(Ok(hello)),
                Parse::NeedMore => self.keep(bytes),
            }
        } else {
            self.keep(bytes)
        };
        if verdict.is_some() {
            self.seen = BytesMut::new();
        }
        verdict
    }

    fn keep(&mut self, bytes: &[u8]) -> Option<Result<Hello, ReadError>> {
        let room = MAX_HELLO.saturating_sub(self.seen.len());
        self.seen.extend_from_slice(&bytes[..bytes.len().min(room)]);
        match parse(&self.seen) {
            Parse::Done(hello) => Some(Ok(hello)),
            Parse::NeedMore if self.seen.len() >= MAX_HELLO => Some(Err(ReadError::TooLarge)),
            Parse::NeedMore => None,
        }
    }
}

/// A fatal `access_denied` alert, so a TLS client reports a refusal rather than a reset.
pub const ACCESS_DENIED_ALERT: [u8; 7] = [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x31];

enum Parse {
    Done(Hello),
    NeedMore,
}

/// What the bytes read so far are: `None` while a ClientHello is still incomplete. The pure
/// core of [`read_hello`], public for fuzzing.
pub fn inspect(buf: &[u8]) -> Option<Hello> {
    match parse(buf) {
        Parse::Done(hello) => Some(hello),
        Parse::NeedMore => None,
    }
}

/// Reassembles the handshake stream from the records in `buf`, then reads the ClientHello.
fn parse(buf: &[u8]) -> Parse {
    let mut handshake = Vec::new();
    let mut rest = buf;
    loop {
        if rest.is_empty() {
            return Parse::NeedMore;
        }
        if rest[0] != HANDSHAKE {
            return Parse::Done(Hello::NotTls);
        }
        // SSL 3.0 through TLS 1.3 all say 3.x on the record layer.
        if rest.get(1).is_some_and(|&major| major != 0x03) {
            return Parse::Done(Hello::NotTls);
        }
        if rest.len() < RECORD_HEADER {
            return Parse::NeedMore;
        }
        let length = usize::from(u16::from_be_bytes([rest[3], rest[4]]));
        if length == 0 || length > (1 << 14) + 2048 {
            return Parse::Done(Hello::NotTls);
        }
        let Some(fragment) = rest.get(RECORD_HEADER..RECORD_HEADER + length) else {
            return Parse::NeedMore;
        };
        handshake.extend_from_slice(fragment);
        rest = &rest[RECORD_HEADER + length..];
        if handshake[0] != CLIENT_HELLO {
            return Parse::Done(Hello::NotTls);
        }
        if handshake.len() < 4 {
            continue;
        }
        let body_len = usize::from(handshake[1]) << 16
            | usize::from(handshake[2]) << 8
            | usize::from(handshake[3]);
        if body_len > MAX_HELLO {
            return Parse::Done(Hello::NotTls);
        }
        if let Some(body) = handshake.get(4..4 + body_len) {
            return Parse::Done(match server_name(body) {
                Some(name) => Hello::Tls(name),
                None => Hello::NotTls,
            });
        }
    }
}

/// A cursor over length-prefixed fields that never reads past its slice.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, tail) = (self.0.get(..n)?, self.0.get(n..)?);
        self.0 = tail;
        Some(head)
    }

    fn u8(&mut self) -> Option<usize> {
        self.take(1).map(|b| usize::from(b[0]))
    }

    fn u16(&mut self) -> Option<usize> {
        self.take(2)
            .map(|b| usize::from(u16::from_be_bytes([b[0], b[1]])))
    }

    fn vec8(&mut self) -> Option<&'a [u8]> {
        let n = self.u8()?;
        self.take(n)
    }

    fn vec16(&mut self) -> Option<&'a [u8]> {
        let n = self.u16()?;
        self.take(n)
    }
}

/// `Some(Some(name))`: SNI present; `Some(None)`: a well-formed hello without SNI;
/// `None`: malformed, or ambiguous about its server name. TLS allows one `server_name`
/// extension holding one `host_name`; a server that read a second one, or a name cut at a NUL,
/// would route on another name than the one checked here, so anything else is refused.
fn server_name(body: &[u8]) -> Option<Option<String>> {
    let mut hello = Reader(body);
    hello.take(2 + 32)?; // legacy_version, random
    hello.vec8()?; // legacy_session_id
    hello.vec16()?; // cipher_suites
    hello.vec8()?; // legacy_compression_methods
    if hello.0.is_empty() {
        return Some(None); // no extensions at all
    }
    let mut extensions = Reader(hello.vec16()?);
    let mut name = None;
    while !extensions.0.is_empty() {
        let kind = extensions.u16()?;
        let data = extensions.vec16()?;
        if kind == usize::from(SERVER_NAME) {
            if name.is_some() {
                return None;
            }
            name = Some(host_name(data)?);
        }
    }
    Some(name)
}

/// The single `host_name` entry of a server_name extension, validated as a DNS name.
fn host_name(data: &[u8]) -> Option<String> {
    let mut extension = Reader(data);
    let mut list = Reader(extension.vec16()?);
    if !extension.0.is_empty() || list.u8()? != 0 {
        return None;
    }
    let name = std::str::from_utf8(list.vec16()?).ok()?;
    if !list.0.is_empty() {
        return None;
    }
    match crate::rules::parse_host(name) {
        Ok(crate::rules::Host::Name(name)) => Some(name),
        _ => None,
    }
}

/// ClientHello bytes as a TLS 1.3 client lays them out, for this module's tests, the
/// integration tests and fuzz seeds. Not used by the proxy itself.
#[doc(hidden)]
pub mod sample {
    use super::{CLIENT_HELLO, HANDSHAKE, SERVER_NAME};

    /// A minimal ClientHello with the given SNI (or none), as one handshake message.
    pub fn client_hello(sni: Option<&str>) -> Vec<u8> {
        let mut body = vec![0x03, 0x03];
        body.extend([7u8; 32]);
        body.push(0); // session id
        body.extend([0x00, 0x02, 0x13, 0x01]); // one cipher suite
        body.extend([0x01, 0x00]); // null compression
        let mut extensions = Vec::new();
        if let Some(name) = sni {
            let mut entry = vec![0u8];
            entry.extend((name.len() as u16).to_be_bytes());
            entry.extend(name.as_bytes());
            let mut list = (entry.len() as u16).to_be_bytes().to_vec();
            list.extend(entry);
            extensions.extend(SERVER_NAME.to_be_bytes());
            extensions.extend((list.len() as u16).to_be_bytes());
            extensions.extend(list);
        }
        extensions.extend([0x00, 0x2b, 0x00, 0x03, 0x02, 0x03, 0x04]); // supported_versions
        body.extend((extensions.len() as u16).to_be_bytes());
        body.extend(extensions);
        let mut message = vec![CLIENT_HELLO];
        message.extend(&(body.len() as u32).to_be_bytes()[1..]);
        message.extend(body);
        message
    }

    /// Wraps handshake bytes in records of at most `per_record` bytes each.
    pub fn records(message: &[u8], per_record: usize) -> Vec<u8> {
        message
            .chunks(per_record)
            .flat_map(|chunk| {
                let mut record = vec![HANDSHAKE, 0x03, 0x01];
                record.extend((chunk.len() as u16).to_be_bytes());
                record.extend(chunk);
                record
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::sample::{client_hello, records};
    use super::*;

    fn done(bytes: &[u8]) -> Option<Hello> {
        match parse(bytes) {
            Parse::Done(hello) => Some(hello),
            Parse::NeedMore => None,
        }
    }

    #[test]
    fn reads_sni_from_one_record() {
        let wire = records(&client_hello(Some("GW1.AmazonAppStream.com.")), 16384);
        assert_eq!(
            done(&wire),
            Some(Hello::Tls(Some("gw1.amazonappstream.com".into())))
        );
    }

    #[test]
    fn reads_sni_split_over_records_and_segments() {
        let wire = records(&client_hello(Some("d111.cloudfront.net")), 7);
        for cut in 0..wire.len() {
            assert_eq!(done(&wire[..cut]), None, "cut at {cut}");
        }
        assert_eq!(
            done(&wire),
            Some(Hello::Tls(Some("d111.cloudfront.net".into())))
        );
    }

    #[test]
    fn hello_without_sni() {
        let wire = records(&client_hello(None), 16384);
        assert_eq!(done(&wire), Some(Hello::Tls(None)));
    }

    #[test]
    fn non_tls_is_recognised_early() {
        assert_eq!(done(b"GET / HTTP/1.1\r\n"), Some(Hello::NotTls));
        assert_eq!(done(b"SSH-2.0-OpenSSH"), Some(Hello::NotTls));
        assert_eq!(done(&[HANDSHAKE, 0x02, 0x00]), Some(Hello::NotTls));
        assert_eq!(
            done(&[HANDSHAKE, 0x03, 0x01, 0x00, 0x00]),
            Some(Hello::NotTls)
        );
        // A handshake record that is not a ClientHello (e.g. a ServerHello).
        assert_eq!(
            done(&[HANDSHAKE, 0x03, 0x03, 0x00, 0x01, 0x02]),
            Some(Hello::NotTls)
        );
    }

    #[test]
    fn truncated_fields_are_malformed_not_panics() {
        let message = client_hello(Some("a.example.com"));
        for cut in 4..message.len() {
            let mut broken = message[..cut].to_vec();
            let len = (cut - 4) as u32;
            broken[1..4].copy_from_slice(&len.to_be_bytes()[1..]);
            let _ = done(&records(&broken, 16384));
        }
    }
}
