//! Hostile clients against the real proxy: request-smuggling shapes, authority tricks, encoded
//! and Unicode hosts, oversized heads, pipelining past a refusal, garbage.
//!
//! Every case must end in a clear refusal (a 4xx with `Proxy-Status`) or a clean close: never a
//! 200, never a second reply on a refused connection, never a hang (every read is bounded), and
//! the proxy must serve an ordinary CONNECT afterwards. Where the right answer is debatable
//! (absolute-form CONNECT, bare LF), the test asserts what a careful proxy does.

mod support;

use std::net::IpAddr;
use std::time::Duration;

use support::{Origin, Setup, TestProxy, assert_echo, connect, start};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

const GATEWAY: &str = "gw1.amazonappstream.com";
/// How long any one exchange may take before the test calls it a hang.
const BOUND: Duration = Duration::from_secs(10);

/// One reply parsed off the wire.
#[derive(Debug)]
struct Reply {
    status: u16,
    /// Lowercased names.
    headers: Vec<(String, String)>,
    body: String,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Everything the proxy sent on one connection, and how the connection ended.
#[derive(Debug)]
struct Seen {
    replies: Vec<Reply>,
    /// Bytes after the last reply that do not parse as one (a 200 tunnel's payload, say).
    trailing: Vec<u8>,
    /// `None`: clean EOF; `Some(error)`: reset or another error after what was read.
    error: Option<String>,
}

/// Writes `raw` (concurrently, as the proxy may stop reading and answer early), then reads
/// until the proxy closes or opens a tunnel, `BOUND` at most, and parses what came back.
/// Panics only on a hang: nothing at all within `BOUND`.
async fn exchange(proxy: &TestProxy, raw: Vec<u8>) -> Seen {
    let stream = TcpStream::connect(proxy.addr).await.unwrap();
    let (mut read, mut write) = stream.into_split();
    let writer = tokio::spawn(async move {
        let _ = write.write_all(&raw).await;
        // Keep the write half open: a half-close is not what a hostile client does, and it
        // must not be what ends the exchange.
        tokio::time::sleep(BOUND).await;
        drop(write);
    });
    let deadline = tokio::time::Instant::now() + BOUND;
    let mut got = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    let error = loop {
        match tokio::time::timeout_at(deadline, read.read(&mut chunk)).await {
            Err(_) if got.is_empty() => panic!("no reply and no close within {BOUND:?}"),
            Err(_) => break Some(format!("still open after {BOUND:?}")),
            Ok(Ok(0)) => break None,
            Ok(Ok(n)) => got.extend_from_slice(&chunk[..n]),
            Ok(Err(e)) => break Some(e.to_string()),
        }
        if parse_replies(&got).0.iter().any(|r| r.status == 200) {
            break Some("a tunnel opened".into());
        }
    };
    writer.abort();
    let (replies, trailing) = parse_replies(&got);
    Seen {
        replies,
        trailing,
        error,
    }
}

fn parse_replies(mut raw: &[u8]) -> (Vec<Reply>, Vec<u8>) {
    let mut replies = Vec::new();
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut response = httparse::Response::new(&mut headers);
        let Ok(httparse::Status::Complete(head)) = response.parse(raw) else {
            return (replies, raw.to_vec());
        };
        let headers: Vec<(String, String)> = response
            .headers
            .iter()
            .map(|h| {
                (
                    h.name.to_ascii_lowercase(),
                    String::from_utf8_lossy(h.value).into_owned(),
                )
            })
            .collect();
        let status = response.code.unwrap_or(0);
        let length = headers
            .iter()
            .find(|(n, _)| n == "content-length")
            .and_then(|(_, v)| v.parse::<usize>().ok())
            .unwrap_or(0)
            .min(raw.len() - head);
        let body = String::from_utf8_lossy(&raw[head..head + length]).into_owned();
        raw = &raw[head + length..];
        let tunnel = status == 200;
        replies.push(Reply {
            status,
            headers,
            body,
        });
        if tunnel {
            return (replies, raw.to_vec());
        }
    }
}

/// The proxy refused with one of `allowed` (status, reason), said so in `Proxy-Status` and the
/// body, sent nothing else, and closed. A proxy that closes without a word is accepted only
/// when `may_just_close` (a flood it stops reading), and then a reset is accepted too.
fn check_refused(seen: &Seen, allowed: &[(u16, &str)], may_just_close: bool) -> Result<(), String> {
    if seen.replies.is_empty() && seen.trailing.is_empty() && may_just_close {
        return Ok(());
    }
    let [reply] = &seen.replies[..] else {
        return Err(format!("not exactly one reply: {seen:?}"));
    };
    if reply.status == 200 {
        return Err(format!("a tunnel opened: {seen:?}"));
    }
    let reason = proxy_status_reason(reply);
    if !allowed
        .iter()
        .any(|&(code, expected)| reply.status == code && reason == Some(expected))
    {
        return Err(format!(
            "expected one of {allowed:?}, got {} with Proxy-Status {:?}, body {:?}",
            reply.status,
            reply.header("proxy-status"),
            reply.body
        ));
    }
    if !reply
        .body
        .starts_with(&format!("{}: ", reason.unwrap_or_default()))
    {
        return Err(format!("body {:?}", reply.body));
    }
    if !seen.trailing.is_empty() {
        return Err(format!(
            "bytes after the refusal: {:?}",
            String::from_utf8_lossy(&seen.trailing)
        ));
    }
    match &seen.error {
        Some(error) if !may_just_close => Err(format!("not a clean close: {error}")),
        _ => Ok(()),
    }
}

/// The failed cases of one test, all reported at its end rather than only the first.
#[derive(Default)]
struct Failures(Vec<String>);

impl Failures {
    /// Raw bytes that must be refused as a bad request.
    async fn bad(&mut self, proxy: &TestProxy, raw: impl Into<Vec<u8>>) {
        self.refused(proxy, raw, BAD).await;
    }

    /// Raw bytes that must be refused with one of `allowed`.
    async fn refused(
        &mut self,
        proxy: &TestProxy,
        raw: impl Into<Vec<u8>>,
        allowed: &[(u16, &str)],
    ) {
        let raw = raw.into();
        let what = describe(&raw);
        let seen = exchange(proxy, raw).await;
        self.check(&what, check_refused(&seen, allowed, false));
    }

    /// `CONNECT host:443` for each of `hosts`, each refused with one of `allowed`.
    async fn connect_to(&mut self, proxy: &TestProxy, hosts: &[&str], allowed: &[(u16, &str)]) {
        for host in hosts {
            let raw = head(&format!("CONNECT {host}:443 HTTP/1.1"), "");
            self.refused(proxy, raw, allowed).await;
        }
    }

    fn check(&mut self, what: &str, result: Result<(), String>) {
        if let Err(e) = result {
            eprintln!("FAILED {what}: {e}");
            self.0.push(format!("{what}: {e}"));
        }
    }

    fn assert_none(self) {
        assert!(
            self.0.is_empty(),
            "{} case(s) failed:\n{}",
            self.0.len(),
            self.0.join("\n")
        );
    }
}

fn describe(raw: &[u8]) -> String {
    let text = String::from_utf8_lossy(&raw[..raw.len().min(160)]).into_owned();
    if raw.len() > 160 {
        format!("{text:?}... ({} bytes)", raw.len())
    } else {
        format!("{text:?}")
    }
}

fn proxy_status_reason(reply: &Reply) -> Option<&str> {
    let value = reply.header("proxy-status")?;
    value
        .strip_prefix("portcullis; error=")
        .map(|r| r.split(';').next().unwrap_or(r).trim())
}

const BAD: &[(u16, &str)] = &[(400, "bad_request")];
const BAD_OR_DENIED: &[(u16, &str)] = &[
    (400, "bad_request"),
    (403, "domain_not_allowed"),
    (403, "ip_literal"),
];

/// A proxy whose rules are the embedded profile, with `ok.amazonappstream.com` and the
/// gateway name answering with `ip`, where an echo origin listens on 443.
async fn proxy_and_origin(ip: &str) -> (TestProxy, Origin) {
    let proxy = start(Setup::default()).await;
    let origin = Origin::echo_on(ip, 443).await;
    let addr: IpAddr = ip.parse().unwrap();
    proxy.dns.set("ok.amazonappstream.com", &[addr], 60);
    proxy.dns.set(GATEWAY, &[addr], 60);
    (proxy, origin)
}

/// The proxy still opens an ordinary tunnel and relays through it.
async fn still_serves(proxy: &TestProxy) {
    let (reply, mut stream) = connect(proxy.addr, "ok.amazonappstream.com:443").await;
    assert_eq!(
        reply.status, 200,
        "an ordinary CONNECT afterwards: {reply:?}"
    );
    assert_echo(&mut stream, b"still serving").await;
}

fn head(request_line: &str, headers: &str) -> Vec<u8> {
    format!("{request_line}\r\nHost: {GATEWAY}:443\r\n{headers}\r\n").into_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smuggling_framing_headers_on_connect() {
    let mut failures = Failures::default();
    let (proxy, _origin) = proxy_and_origin("127.0.0.91").await;
    let line = format!("CONNECT {GATEWAY}:443 HTTP/1.1");
    for headers in [
        "Content-Length: 0\r\nContent-Length: 5\r\n",
        "Content-Length: 5\r\n",
        "Content-Length: 0, 5\r\n",
        "Content-Length: +0\r\n",
        "Content-Length: 0\r\nTransfer-Encoding: chunked\r\n",
        "Transfer-Encoding: chunked\r\n",
        "Transfer-Encoding: identity\r\n",
        "tRANSFER-eNCODING: chunked\r\n",
        "Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n",
        // Whitespace before the colon: some parsers drop the name's tail, some the header.
        "Transfer-Encoding : chunked\r\n",
        "Content-Length : 5\r\n",
        // obs-fold: a continuation line that another parser would read as a header of its own.
        "X-Folded: a\r\n Transfer-Encoding: chunked\r\n",
        "X-Folded: a\r\n\tContent-Length: 5\r\n",
    ] {
        failures.bad(&proxy, head(&line, headers)).await;
    }
    assert_eq!(
        proxy.dns.queries(GATEWAY),
        0,
        "a refused head never resolves"
    );
    still_serves(&proxy).await;
    failures.assert_none();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smuggling_line_endings_and_nul_bytes() {
    let mut failures = Failures::default();
    let (proxy, _origin) = proxy_and_origin("127.0.0.92").await;
    let g = GATEWAY;
    for raw in [
        // A bare LF that hides a framing header from a CRLF-only reader.
        format!("CONNECT {g}:443 HTTP/1.1\r\nHost: {g}\nTransfer-Encoding: chunked\r\n\r\n"),
        // Bare CR.
        format!("CONNECT {g}:443 HTTP/1.1\r\nHost: {g}\rX: y\r\n\r\n"),
        format!("CONNECT {g}:443 HTTP/1.1\rHost: {g}\r\n\r\n"),
        // NUL in the request line, around and inside the authority.
        format!("CONNECT {g}\0:443 HTTP/1.1\r\nHost: {g}\r\n\r\n"),
        format!("CONNECT {g}:443\0 HTTP/1.1\r\nHost: {g}\r\n\r\n"),
        format!("CONNECT evil.example\0{g}:443 HTTP/1.1\r\nHost: {g}\r\n\r\n"),
        format!("CONNECT\0{g}:443 HTTP/1.1\r\nHost: {g}\r\n\r\n"),
        format!("CONNECT {g}:443 HTTP/1.1\0\r\nHost: {g}\r\n\r\n"),
        // NUL in a header value and a header name.
        format!("CONNECT {g}:443 HTTP/1.1\r\nHost: {g}\0evil.example\r\n\r\n"),
        format!("CONNECT {g}:443 HTTP/1.1\r\nHo\0st: {g}\r\n\r\n"),
        // Tabs and doubled spaces in the request line.
        format!("CONNECT\t{g}:443 HTTP/1.1\r\nHost: {g}\r\n\r\n"),
        format!("CONNECT  {g}:443 HTTP/1.1\r\nHost: {g}\r\n\r\n"),
        format!("CONNECT {g}:443  HTTP/1.1\r\nHost: {g}\r\n\r\n"),
        format!("CONNECT {g}:443 HTTP/1.1 extra\r\nHost: {g}\r\n\r\n"),
        format!("CONNECT {g}:443 HTTP/2.0\r\nHost: {g}\r\n\r\n"),
        format!("CONNECT {g}:443\r\nHost: {g}\r\n\r\n"),
    ] {
        failures.bad(&proxy, raw).await;
    }
    assert_eq!(
        proxy.dns.queries(GATEWAY),
        0,
        "a refused head never resolves"
    );
    still_serves(&proxy).await;
    failures.assert_none();
}

/// RFC 9112 lets a recipient accept a bare LF as a line end, but a CONNECT-only proxy has no
/// client that needs it, and every place two parsers disagree on where a head ends is a place
/// to hide bytes. A careful proxy refuses it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bare_lf_head_is_refused() {
    let mut failures = Failures::default();
    let (proxy, _origin) = proxy_and_origin("127.0.0.93").await;
    failures
        .bad(
            &proxy,
            format!("CONNECT {GATEWAY}:443 HTTP/1.1\nHost: {GATEWAY}\n\n"),
        )
        .await;
    still_serves(&proxy).await;
    failures.assert_none();
}

/// Methods other than CONNECT get a 405 with `Proxy-Status` whatever their framing headers,
/// or the proxy's own 400 when those are malformed: never hyper's bare 400.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_methods_with_hostile_framing_get_proxy_status() {
    let mut failures = Failures::default();
    let (proxy, _origin) = proxy_and_origin("127.0.0.94").await;
    let either: &[(u16, &str)] = &[(405, "method_not_allowed"), (400, "bad_request")];
    for raw in [
        "GET http://a.example/ HTTP/1.1\r\nHost: a.example\r\nTransfer-Encoding: gzip\r\n\r\n",
        "GET http://a.example/ HTTP/1.1\r\nHost: a.example\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
        "POST http://a.example/ HTTP/1.0\r\nHost: a.example\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        "POST http://a.example/ HTTP/1.1\r\nHost: a.example\r\nContent-Length: 99999999999999999999\r\n\r\n",
        "POST http://a.example/ HTTP/1.1\r\nHost: a.example\r\nContent-Length: 18446744073709551615\r\n\r\n",
        "POST http://a.example/ HTTP/1.1\r\nHost: a.example\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
        "GET http://a.example/ HTTP/1.1\r\nHost: a.example\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n\r\n",
    ] {
        failures.refused(&proxy, raw, either).await;
    }
    still_serves(&proxy).await;
    failures.assert_none();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absolute_form_connect_is_a_bad_request() {
    let mut failures = Failures::default();
    // RFC 9110 §9.3.6: CONNECT takes the authority form only. The gateway resolves to a live
    // origin here, so accepting any of these would open a tunnel.
    let (proxy, _origin) = proxy_and_origin("127.0.0.95").await;
    for target in [
        format!("http://{GATEWAY}:443/"),
        format!("https://{GATEWAY}:443/"),
        format!("https://{GATEWAY}:443"),
        format!("http://{GATEWAY}:443/path?query"),
        format!("{GATEWAY}:443/"),
        format!("//{GATEWAY}:443"),
        "/".to_string(),
        "*".to_string(),
    ] {
        failures
            .bad(&proxy, head(&format!("CONNECT {target} HTTP/1.1"), ""))
            .await;
    }
    still_serves(&proxy).await;
    failures.assert_none();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn userinfo_and_delimiter_tricks() {
    let mut failures = Failures::default();
    let (proxy, _origin) = proxy_and_origin("127.0.0.96").await;
    proxy
        .dns
        .set("evil.example", &["127.0.0.96".parse().unwrap()], 60);
    for target in [
        format!("user@{GATEWAY}:443"),
        format!("user:pass@{GATEWAY}:443"),
        format!("{GATEWAY}@evil.example:443"),
        format!("{GATEWAY}:443@evil.example:443"),
        format!("evil.example#@{GATEWAY}:443"),
        format!("evil.example?@{GATEWAY}:443"),
        format!("evil.example\\@{GATEWAY}:443"),
        format!("evil.example%40{GATEWAY}:443"),
        format!("evil.example/{GATEWAY}:443"),
        format!("evil.example;{GATEWAY}:443"),
        format!("evil.example,{GATEWAY}:443"),
        format!("http://evil.example#@{GATEWAY}:443/"),
        format!("http://{GATEWAY}:443@evil.example:443/"),
        format!("http://{GATEWAY}@evil.example:443/"),
        format!("{GATEWAY}:443#"),
        format!("{GATEWAY}:443?"),
        format!("{GATEWAY}:443:443"),
        format!("{GATEWAY}:0443x"),
        format!("[{GATEWAY}]:443"),
        format!("{GATEWAY}.evil.example:443"),
        format!("evil.example:443 {GATEWAY}:443"),
    ] {
        failures
            .refused(
                &proxy,
                head(&format!("CONNECT {target} HTTP/1.1"), ""),
                BAD_OR_DENIED,
            )
            .await;
    }
    // The Host header never picks the destination: the request target does.
    failures
        .refused(
            &proxy,
            format!("CONNECT evil.example:443 HTTP/1.1\r\nHost: {GATEWAY}:443\r\n\r\n"),
            &[(403, "domain_not_allowed")],
        )
        .await;
    assert_eq!(proxy.dns.queries("evil.example"), 0);
    assert_eq!(proxy.dns.queries(GATEWAY), 0);
    still_serves(&proxy).await;
    failures.assert_none();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wildcard_and_glob_characters_in_the_host() {
    let mut failures = Failures::default();
    let (proxy, _origin) = proxy_and_origin("127.0.0.97").await;
    let hosts = [
        "*.amazonappstream.com",
        "*",
        "?.amazonappstream.com",
        "[a-z].amazonappstream.com",
        "{evil.example,gw1.amazonappstream.com}",
        "gw1.amazonappstream.com/..",
        "**.amazonappstream.com",
        "gw1.amazonappstream.com..",
        ".gw1.amazonappstream.com",
        "gw1..amazonappstream.com",
    ];
    failures.connect_to(&proxy, &hosts, BAD).await;
    still_serves(&proxy).await;
    failures.assert_none();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn percent_encoded_and_unicode_hosts() {
    let mut failures = Failures::default();
    let (proxy, _origin) = proxy_and_origin("127.0.0.98").await;
    let hosts = [
        "gw1%2eamazonappstream.com",
        "gw1%2Eamazonappstream.com",
        "%67w1.amazonappstream.com",
        "gw1.amazonappstream.com%00.evil.example",
        "gw1.amazonappstream.com%2f",
        // Cyrillic 'а' (U+0430) for the second 'a' of amazonappstream, raw UTF-8.
        "gw1.amazon\u{430}ppstream.com",
        // Fullwidth letters and the ideographic full stop, which IDNA maps to ASCII.
        "\u{ff47}\u{ff57}1.amazonappstream.com",
        "gw1\u{3002}amazonappstream.com",
        "gw1.amazonappstream.com\u{200b}",
    ];
    failures.connect_to(&proxy, &hosts, BAD).await;
    // The same look-alike as punycode is a valid name, under no rule.
    let hosts = [
        "gw1.xn--amazonppstream-0tl.com",
        "xn--amazonppstream-0tl.com",
        "gw1.amazonappstream.xn--com-",
    ];
    failures
        .connect_to(
            &proxy,
            &hosts,
            &[(403, "domain_not_allowed"), (400, "bad_request")],
        )
        .await;
    still_serves(&proxy).await;
    failures.assert_none();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn numeric_hosts_are_ip_literals() {
    let mut failures = Failures::default();
    let (proxy, _origin) = proxy_and_origin("127.0.0.99").await;
    let hosts = [
        "127.0.0.1",
        "127.1",
        "0x7f.0.0.1",
        "0x7f000001",
        "017700000001",
        "2130706433",
        "169.254.169.254",
        "0251.0376.0251.0376",
        "127.0.0.1.",
        "[::ffff:127.0.0.1]",
        "[::ffff:a9fe:a9fe]",
        "[fd00:ec2::254]",
    ];
    failures
        .connect_to(&proxy, &hosts, &[(403, "ip_literal")])
        .await;
    let hosts = ["[::1%25lo]", "[::1", "::1", "[127.0.0.1]", "[0x7f.1]"];
    failures
        .connect_to(&proxy, &hosts, &[(400, "bad_request"), (403, "ip_literal")])
        .await;
    still_serves(&proxy).await;
    failures.assert_none();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_megabyte_of_headers() {
    let mut failures = Failures::default();
    let (proxy, _origin) = proxy_and_origin("127.0.0.100").await;
    let mut raw = format!("CONNECT {GATEWAY}:443 HTTP/1.1\r\nHost: {GATEWAY}\r\n").into_bytes();
    let mut i = 0;
    while raw.len() < 1 << 20 {
        raw.extend_from_slice(format!("X-Pad-{i}: {}\r\n", "a".repeat(1000)).as_bytes());
        i += 1;
    }
    raw.extend_from_slice(b"\r\n");
    let seen = exchange(&proxy, raw).await;
    // Past 64 KiB the proxy stops reading; a client still sending then may see a reset
    // instead of the reply. Anything else than a 400 or a close is wrong.
    failures.check("1 MiB of headers", check_refused(&seen, BAD, true));
    // One long header line, no line breaks at all.
    let mut raw = format!("CONNECT {GATEWAY}:443 HTTP/1.1\r\nX-Long: ").into_bytes();
    raw.resize(1 << 20, b'a');
    let seen = exchange(&proxy, raw).await;
    failures.check("one 1 MiB header", check_refused(&seen, BAD, true));
    assert_eq!(proxy.dns.queries(GATEWAY), 0);
    still_serves(&proxy).await;
    failures.assert_none();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_headers() {
    let mut failures = Failures::default();
    let (proxy, _origin) = proxy_and_origin("127.0.0.101").await;
    let mut raw = format!("CONNECT {GATEWAY}:443 HTTP/1.1\r\nHost: {GATEWAY}\r\n").into_bytes();
    for i in 0..10_000 {
        raw.extend_from_slice(format!("X-{i}: y\r\n").as_bytes());
    }
    raw.extend_from_slice(b"\r\n");
    let seen = exchange(&proxy, raw).await;
    failures.check("10,000 headers", check_refused(&seen, BAD, true));
    // 101 headers: just past the limit, small enough that the reply must arrive.
    let mut raw = format!("CONNECT {GATEWAY}:443 HTTP/1.1\r\n").into_bytes();
    for i in 0..101 {
        raw.extend_from_slice(format!("X-{i}: y\r\n").as_bytes());
    }
    raw.extend_from_slice(b"\r\n");
    failures.bad(&proxy, raw).await;
    assert_eq!(proxy.dns.queries(GATEWAY), 0);
    still_serves(&proxy).await;
    failures.assert_none();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn very_long_request_lines() {
    let mut failures = Failures::default();
    let (proxy, _origin) = proxy_and_origin("127.0.0.102").await;
    // Under the 64 KiB head limit, but a host far over 253 characters.
    let label = "a".repeat(60);
    let long_host = format!(
        "{}.amazonappstream.com",
        vec![label.as_str(); 900].join(".")
    );
    failures
        .bad(
            &proxy,
            head(&format!("CONNECT {long_host}:443 HTTP/1.1"), ""),
        )
        .await;
    // One label of 60,000 characters.
    failures
        .bad(
            &proxy,
            head(
                &format!(
                    "CONNECT {}.amazonappstream.com:443 HTTP/1.1",
                    "a".repeat(60_000)
                ),
                "",
            ),
        )
        .await;
    // Over the head limit, the line never ends.
    let mut raw = b"CONNECT ".to_vec();
    raw.resize(200 * 1024, b'a');
    let seen = exchange(&proxy, raw).await;
    failures.check("200 KiB request line", check_refused(&seen, BAD, true));
    // A port with many digits.
    failures
        .bad(
            &proxy,
            head(
                &format!("CONNECT {GATEWAY}:{} HTTP/1.1", "0".repeat(5000) + "443"),
                "",
            ),
        )
        .await;
    still_serves(&proxy).await;
    failures.assert_none();
}

/// An origin on `ip:443` that reports the bytes of each connection it accepts.
async fn recording_origin(
    ip: &str,
) -> (
    mpsc::UnboundedReceiver<Vec<u8>>,
    tokio::task::JoinHandle<()>,
) {
    let listener = TcpListener::bind((ip.parse::<IpAddr>().unwrap(), 443))
        .await
        .unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut got = Vec::new();
                let _ = tokio::time::timeout(Duration::from_secs(3), stream.read_to_end(&mut got))
                    .await;
                let _ = tx.send(got);
            });
        }
    });
    (rx, task)
}

/// A proxy under `sni = "enforce"` whose gateway name resolves to a recording origin on `ip`.
async fn enforcing_proxy(
    ip: &str,
) -> (
    TestProxy,
    mpsc::UnboundedReceiver<Vec<u8>>,
    tokio::task::JoinHandle<()>,
) {
    let proxy = start(Setup {
        sni: "enforce",
        header_timeout: "1s",
        ..Setup::default()
    })
    .await;
    let (received, origin) = recording_origin(ip).await;
    proxy.dns.set(GATEWAY, &[ip.parse().unwrap()], 60);
    (proxy, received, origin)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_after_a_refusal_are_never_processed() {
    let mut failures = Failures::default();
    let (proxy, _origin) = proxy_and_origin("127.0.0.103").await;
    let (mut reached, origin) = recording_origin("127.0.0.104").await;
    proxy.dns.set(
        "second.amazonappstream.com",
        &["127.0.0.104".parse().unwrap()],
        60,
    );
    let second = "CONNECT second.amazonappstream.com:443 HTTP/1.1\r\n\
                  Host: second.amazonappstream.com:443\r\n\r\nsmuggled payload";
    let firsts: [(&str, &[(u16, &str)]); 6] = [
        (
            "CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example\r\n\r\n",
            &[(403, "domain_not_allowed")],
        ),
        (
            "CONNECT 127.0.0.1:443 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
            &[(403, "ip_literal")],
        ),
        (
            "CONNECT second.amazonappstream.com:8443 HTTP/1.1\r\nHost: x\r\n\r\n",
            &[(403, "port_not_allowed")],
        ),
        (
            "GET http://second.amazonappstream.com/ HTTP/1.1\r\nHost: x\r\n\r\n",
            &[(405, "method_not_allowed")],
        ),
        (
            "CONNECT user@second.amazonappstream.com:443 HTTP/1.1\r\nHost: x\r\n\r\n",
            &[(400, "bad_request")],
        ),
        (
            // A refused CONNECT that claims a body: the "body" is the next request.
            "CONNECT evil.example:443 HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n",
            &[(400, "bad_request"), (403, "domain_not_allowed")],
        ),
    ];
    for (first, expected) in firsts {
        let raw = format!("{first}{second}");
        failures.refused(&proxy, raw, expected).await;
    }
    // Also with the second request in a later segment, after the refusal has been sent.
    let stream = TcpStream::connect(proxy.addr).await.unwrap();
    let (mut read, mut write) = stream.into_split();
    write.write_all(firsts[0].0.as_bytes()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let _ = write.write_all(second.as_bytes()).await;
    let mut got = Vec::new();
    tokio::time::timeout(BOUND, read.read_to_end(&mut got))
        .await
        .expect("the proxy closes after a refusal")
        .ok();
    let (replies, trailing) = parse_replies(&got);
    assert_eq!(replies.len(), 1, "{:?}", String::from_utf8_lossy(&got));
    assert_eq!(replies[0].status, 403);
    assert!(trailing.is_empty());

    assert_eq!(
        proxy.dns.queries("second.amazonappstream.com"),
        0,
        "a request pipelined behind a refusal was processed"
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(reached.try_recv().is_err(), "the origin was reached");
    origin.abort();
    still_serves(&proxy).await;
    failures.assert_none();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_instead_of_a_request() {
    let mut failures = Failures::default();
    let (proxy, _origin) = proxy_and_origin("127.0.0.105").await;
    for raw in [
        b"\0\0\0\0\r\n\r\n".to_vec(),
        b"\xff\xfe\xfd\r\n\r\n".to_vec(),
        b"SSH-2.0-OpenSSH_9.2\r\n\r\n".to_vec(),
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec(),
        b"\x16\x03\x01\x00\x05\x01\x00\x00\x01\x00".to_vec(),
        b"CONNECT\r\n\r\n".to_vec(),
        b" CONNECT gw1.amazonappstream.com:443 HTTP/1.1\r\n\r\n".to_vec(),
        b"\x05\x01\x00".to_vec(),
    ] {
        // Those that can never become a head are refused at once; the rest wait for more and
        // time out, which `exchange` would call a hang: so only the first kind is here.
        let seen = exchange(&proxy, raw.clone()).await;
        failures.check(&format!("{raw:?}"), check_refused(&seen, BAD, false));
    }
    still_serves(&proxy).await;
    failures.assert_none();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connect_then_garbage_under_sni_enforce() {
    let mut failures = Failures::default();
    let (proxy, mut received, origin) = enforcing_proxy("127.0.0.106").await;
    for garbage in [
        b"GET / HTTP/1.1\r\nHost: evil.example\r\n\r\n".to_vec(),
        b"CONNECT evil.example:443 HTTP/1.1\r\n\r\n".to_vec(),
        vec![0u8; 4096],
        b"\x16\x03\x01\xff\xff".to_vec(),
    ] {
        let mut raw =
            format!("CONNECT {GATEWAY}:443 HTTP/1.1\r\nHost: {GATEWAY}\r\n\r\n").into_bytes();
        raw.extend_from_slice(&garbage);
        let what = describe(&raw);
        let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
        stream.write_all(&raw).await.unwrap();
        let reply = support::read_reply(&mut stream).await;
        assert_eq!(reply.status, 200, "{what}: {reply:?}");
        // Not TLS: the proxy closes the tunnel; the garbage never reaches the origin.
        let mut rest = Vec::new();
        let closed = tokio::time::timeout(BOUND, stream.read_to_end(&mut rest)).await;
        failures.check(
            &what,
            match closed {
                Err(_) => Err("the tunnel stays open".into()),
                Ok(_) if rest.is_empty() || rest == sni_alert() => Ok(()),
                Ok(_) => Err(format!("the client got {rest:?}")),
            },
        );
        let got = tokio::time::timeout(BOUND, received.recv())
            .await
            .expect("the origin connection ends")
            .expect("the origin reports");
        failures.check(
            &what,
            match got.is_empty() {
                true => Ok(()),
                false => Err(format!(
                    "the origin received {:?}",
                    String::from_utf8_lossy(&got)
                )),
            },
        );
    }
    origin.abort();
    // With the SNI check on, an ordinary CONNECT without TLS is closed too: the proxy's
    // health here is a refusal it still answers.
    let seen = exchange(
        &proxy,
        b"CONNECT evil.example:443 HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
    )
    .await;
    failures.check(
        "after garbage",
        check_refused(&seen, &[(403, "domain_not_allowed")], false),
    );
    failures.assert_none();
}

/// The TLS alert the SNI check sends before closing a mismatched tunnel.
fn sni_alert() -> Vec<u8> {
    portcullis::sni::ACCESS_DENIED_ALERT.to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_hostile_connections_at_once_leave_the_proxy_serving() {
    let (proxy, _origin) = proxy_and_origin("127.0.0.107").await;
    let mut tasks = Vec::new();
    for i in 0..200u32 {
        let addr = proxy.addr;
        tasks.push(tokio::spawn(async move {
            let mut stream = TcpStream::connect(addr).await.unwrap();
            let raw = match i % 4 {
                0 => format!("CONNECT evil{i}.example:443 HTTP/1.1\r\n\r\n").into_bytes(),
                1 => format!("CONNECT {GATEWAY}:443 HTTP/1.1\r\nContent-Length: {i}9\r\n\r\n")
                    .into_bytes(),
                2 => vec![b'\0'; 100],
                _ => format!("GET http://{GATEWAY}/ HTTP/1.1\r\n\r\n").into_bytes(),
            };
            let _ = stream.write_all(&raw).await;
            let mut got = Vec::new();
            let _ = tokio::time::timeout(BOUND, stream.read_to_end(&mut got)).await;
            assert!(!got.starts_with(b"HTTP/1.1 200"), "{i}");
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    still_serves(&proxy).await;
}

/// Everything the proxy logs in this test binary, as the JSON lines `main` would print.
static LOG: std::sync::Mutex<Vec<u8>> = std::sync::Mutex::new(Vec::new());

struct LogWriter;

impl std::io::Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        LOG.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn capture_logs() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let subscriber = tracing_subscriber::fmt()
            .json()
            .with_max_level(tracing::Level::INFO)
            .with_writer(|| LogWriter)
            .finish();
        tracing::subscriber::set_global_default(subscriber).expect("the only subscriber");
    });
}

fn logged() -> String {
    String::from_utf8_lossy(&LOG.lock().unwrap()).into_owned()
}

/// A password put where a host belongs (userinfo in the CONNECT target or in a
/// `Proxy-Authorization`-less absolute URI) must never be written to the log: logs are read by
/// more people than passwords are.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_in_the_target_never_reach_the_log() {
    capture_logs();
    let mut failures = Failures::default();
    let (proxy, _origin) = proxy_and_origin("127.0.0.108").await;
    let secret = "hunter2-0d6f7c";
    for raw in [
        format!("CONNECT alice:{secret}@{GATEWAY}:443 HTTP/1.1\r\nHost: {GATEWAY}\r\n\r\n"),
        format!("CONNECT {secret}@{GATEWAY}:443 HTTP/1.1\r\nHost: {GATEWAY}\r\n\r\n"),
        format!("GET http://alice:{secret}@{GATEWAY}/ HTTP/1.1\r\nHost: {GATEWAY}\r\n\r\n"),
        format!("CONNECT http://alice:{secret}@{GATEWAY}:443/ HTTP/1.1\r\nHost: x\r\n\r\n"),
    ] {
        let what = describe(raw.as_bytes());
        let seen = exchange(&proxy, raw.into_bytes()).await;
        failures.check(
            &what,
            check_refused(
                &seen,
                &[(400, "bad_request"), (405, "method_not_allowed")],
                false,
            ),
        );
        // The decision is logged before the reply is written.
        let log = logged();
        let leaked: Vec<&str> = log.lines().filter(|l| l.contains(secret)).collect();
        failures.check(
            &what,
            match leaked.is_empty() {
                true => Ok(()),
                false => Err(format!("the password is in the log: {leaked:?}")),
            },
        );
        LOG.lock().unwrap().clear();
    }
    still_serves(&proxy).await;
    failures.assert_none();
}

/// ClientHellos that name the CONNECT host first and something else after it (a second
/// `host_name`, a second `server_name` extension, an entry of another name type before it, a
/// NUL inside it). TLS forbids each shape and rustls refuses them all, but a server that reads
/// the last name, or the name up to the NUL, would route on another name than the one the proxy
/// checked. Under `sni = "enforce"` a careful proxy forwards none of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ambiguous_client_hellos_are_not_forwarded_under_sni_enforce() {
    let mut failures = Failures::default();
    let (proxy, mut received, origin) = enforcing_proxy("127.0.0.109").await;
    let corpus = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz_corpus");
    let hello = |name: &str| std::fs::read(corpus.join("client_hello").join(name)).unwrap();
    // The unmodified hello passes: the check is on, and the origin sees the bytes.
    for (file, forwarded) in [
        ("curl-openssl-tls13-gateway", true),
        ("curl-sni-two-host-names", false),
        ("curl-sni-extension-twice", false),
        ("curl-sni-unknown-type-first", false),
        ("curl-sni-invalid-name", false),
    ] {
        let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
        let head = format!("CONNECT {GATEWAY}:443 HTTP/1.1\r\nHost: {GATEWAY}\r\n\r\n");
        stream.write_all(head.as_bytes()).await.unwrap();
        let reply = support::read_reply(&mut stream).await;
        assert_eq!(reply.status, 200, "{file}: {reply:?}");
        stream.write_all(&hello(file)).await.unwrap();
        // The proxy either forwards the hello (the origin then sees it, and we close) or
        // closes the tunnel (the origin sees nothing).
        let mut rest = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(2), stream.read_to_end(&mut rest)).await;
        drop(stream);
        let got = tokio::time::timeout(BOUND, received.recv())
            .await
            .expect("the origin connection ends")
            .expect("the origin reports");
        let result = match (forwarded, got.is_empty()) {
            (true, false) | (false, true) => Ok(()),
            (true, true) => Err("a well-formed hello was not forwarded".to_string()),
            (false, false) => Err(format!(
                "forwarded to the origin ({} bytes) although the hello is ambiguous",
                got.len()
            )),
        };
        failures.check(file, result);
    }
    origin.abort();
    failures.assert_none();
}
