//! The properties the fuzz targets check, shared by `fuzz/fuzz_targets/*.rs` (libFuzzer, through
//! cargo-fuzz) and `tests/fuzz_regressions.rs` (the stable-toolchain run of the same checks over
//! the seed corpus, the crash regressions and a bounded number of mutated inputs).
//!
//! Each entry point takes raw bytes and panics when a property fails; "no panic" is the first
//! property of all.
#![allow(dead_code)]

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock};

use bytes::Bytes;
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Response, StatusCode};
use hyper_util::rt::TokioIo;
use portcullis::rules::{self, Host, Rule, RuleSet, Verdict};
use portcullis::server::check_head;
use portcullis::sni::{self, Hello};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

// ---------------------------------------------------------------------------------------------
// host: parse_host, parse_authority, RuleSet::check

static EMBEDDED: LazyLock<RuleSet> = LazyLock::new(|| portcullis::Config::embedded().rules);

/// Host and authority parsing, and rule matching.
///
/// The input is taken as UTF-8 (lossily, so invalid UTF-8 still reaches the parsers, as
/// U+FFFD). With a newline in it, the part before is also tried as the domain pattern of a rule
/// of its own and the part after is the host; without, the whole input is the host, matched
/// against the embedded AppStream profile.
///
/// - `parse_host` output: lowercase, at most 253 characters, only `[a-z0-9._-]`, no empty
///   label, no label over 63, never what `inet_aton` reads as an address, and a fixed point
///   (`parse_host(n) == Ok(Name(n))`); case never changes the outcome.
/// - `parse_authority`: a name comes with a port that is not 0, no userinfo, and is a fixed
///   point of `parse_host`; case never changes the outcome.
/// - `RuleSet::check` agrees with a reference matcher written from the README's words (no
///   globset), rule by rule and port by port.
pub fn host(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let (pattern, host) = match text.split_once('\n') {
        Some((pattern, host)) => (Some(pattern), host),
        None => (None, &*text),
    };
    let port = port_from(data);

    check_host(host);
    check_authority(host);
    check_authority(&format!("{host}:{port}"));

    if let Ok(Host::Name(name)) = rules::parse_host(host) {
        compare_rules(&EMBEDDED, &name, port);
        let upper = name.to_ascii_uppercase();
        if let Ok(Host::Name(again)) = rules::parse_host(&upper) {
            assert_eq!(
                verdict(&EMBEDDED, &again, port),
                verdict(&EMBEDDED, &name, port),
                "{upper:?}"
            );
        }
        if let Some(Ok(pattern)) = pattern.map(rules::validate_pattern) {
            compare_rules(&one_rule(pattern), &name, port);
        }
    }
}

thread_local! {
    /// Compiled one-pattern rule sets by pattern: compiling a pattern with a `*` inside a label
    /// builds a regex, which would otherwise take most of the fuzzer's time.
    static ONE_RULE: std::cell::RefCell<std::collections::HashMap<String, std::rc::Rc<RuleSet>>> =
        Default::default();
}

/// A rule set of one rule with `pattern` on ports 443 and 1400-1499.
fn one_rule(pattern: String) -> std::rc::Rc<RuleSet> {
    ONE_RULE.with(|cache| {
        let mut cache = cache.borrow_mut();
        if cache.len() >= 4096 {
            cache.clear();
        }
        cache
            .entry(pattern)
            .or_insert_with_key(|pattern| {
                // Fields other than these keep the embedded first rule's values, so this
                // keeps compiling as `Rule` grows.
                let rule = Rule {
                    name: "fuzz".into(),
                    domains: vec![pattern.clone()],
                    ports: vec![443..=443, 1400..=1499],
                    ..EMBEDDED.rules()[0].clone()
                };
                std::rc::Rc::new(RuleSet::new(vec![rule]).expect("a validated pattern compiles"))
            })
            .clone()
    })
}

/// A port that is usually one the rules name, sometimes not.
fn port_from(data: &[u8]) -> u16 {
    let first = data.first().copied().unwrap_or(0);
    match data.last().map_or(0, |b| b % 4) {
        0 => 443,
        1 => 1400 + u16::from(first) % 120,
        2 => 80,
        _ => u16::from_le_bytes([first, data.len() as u8]),
    }
}

fn check_host(raw: &str) {
    let parsed = rules::parse_host(raw);
    if let Ok(Host::Name(name)) = &parsed {
        assert!(name.len() <= 253, "{name:?}: over 253");
        assert!(
            name.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b)),
            "{name:?}: a byte outside [a-z0-9._-]"
        );
        for label in name.split('.') {
            assert!(
                !label.is_empty() && label.len() <= 63,
                "{name:?}: bad label"
            );
        }
        assert!(
            !inet_aton(name),
            "{raw:?} -> {name:?}: an address in disguise"
        );
        assert_eq!(
            rules::parse_host(name),
            Ok(Host::Name(name.clone())),
            "{raw:?}: not a fixed point"
        );
    }
    assert_eq!(
        rules::parse_host(&raw.to_ascii_uppercase()),
        parsed,
        "{raw:?}"
    );
    assert_eq!(
        rules::parse_host(&raw.to_ascii_lowercase()),
        parsed,
        "{raw:?}"
    );
}

fn check_authority(raw: &str) {
    let parsed = rules::parse_authority(raw);
    match &parsed {
        Ok((Host::Name(name), port)) => {
            assert_ne!(*port, 0, "{raw:?}");
            assert!(!raw.contains('@'), "{raw:?}: userinfo accepted");
            assert_eq!(
                rules::parse_host(name),
                Ok(Host::Name(name.clone())),
                "{raw:?}"
            );
        }
        Ok((Host::Ip(_), port)) => assert_ne!(*port, 0, "{raw:?}"),
        Err(_) => {}
    }
    assert_eq!(
        rules::parse_authority(&raw.to_ascii_uppercase()),
        parsed,
        "{raw:?}"
    );
}

/// glibc's `inet_aton`: one to four parts, each decimal, octal (leading 0) or hex (`0x`,
/// digits optional), the last part filling the remaining bytes. A trailing dot is taken too,
/// as by a resolver that strips it.
pub fn inet_aton(name: &str) -> bool {
    let name = name.strip_suffix('.').unwrap_or(name);
    let parts: Vec<&str> = name.split('.').collect();
    if parts.len() > 4 {
        return false;
    }
    let mut values = Vec::new();
    for part in &parts {
        let hex = part.strip_prefix("0x").or(part.strip_prefix("0X"));
        let value = if let Some(hex) = hex {
            if hex.is_empty() {
                Some(0)
            } else if hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                u64::from_str_radix(hex, 16).ok()
            } else {
                None
            }
        } else if part.len() > 1 && part.starts_with('0') {
            if part.bytes().all(|b| (b'0'..=b'7').contains(&b)) {
                u64::from_str_radix(part, 8).ok()
            } else {
                None
            }
        } else if !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit()) {
            part.parse().ok()
        } else {
            None
        };
        match value {
            Some(v) => values.push(v),
            None => return false,
        }
    }
    let Some((last, init)) = values.split_last() else {
        return false;
    };
    init.iter().all(|&v| v <= 0xff) && *last < 1u64 << (8 * (4 - init.len()))
}

/// The README's wildcard semantics, label by label, without globset: `*.rest` is one or more
/// labels before `rest`; any other `*` is a run of bytes inside one label.
pub fn reference_matches(pattern: &str, host: &str) -> bool {
    let host: Vec<&str> = host.split('.').collect();
    match pattern.strip_prefix("*.") {
        Some(rest) => {
            let rest: Vec<&str> = rest.split('.').collect();
            host.len() > rest.len() && labels_match(&rest, &host[host.len() - rest.len()..])
        }
        None => {
            let pattern: Vec<&str> = pattern.split('.').collect();
            pattern.len() == host.len() && labels_match(&pattern, &host)
        }
    }
}

fn labels_match(pattern: &[&str], host: &[&str]) -> bool {
    pattern
        .iter()
        .zip(host)
        .all(|(p, h)| label_matches(p.as_bytes(), h.as_bytes()))
}

/// `*` is any run of bytes inside the label (including none); everything else is literal.
/// Dynamic programming, so a pattern full of stars cannot make the oracle exponential.
fn label_matches(pattern: &[u8], label: &[u8]) -> bool {
    // reachable[j]: the pattern so far can match exactly `label[..j]`.
    let mut reachable = vec![false; label.len() + 1];
    reachable[0] = true;
    for &p in pattern {
        if p == b'*' {
            for j in 1..=label.len() {
                reachable[j] |= reachable[j - 1];
            }
        } else {
            for j in (1..=label.len()).rev() {
                reachable[j] = reachable[j - 1] && label[j - 1] == p;
            }
            reachable[0] = false;
        }
    }
    reachable[label.len()]
}

fn verdict<'a>(set: &'a RuleSet, name: &str, port: u16) -> (&'static str, &'a str) {
    match set.check(name, port) {
        Verdict::Allowed(rule) => ("allowed", rule.name.as_str()),
        Verdict::PortNotAllowed(rule) => ("port_not_allowed", rule.name.as_str()),
        Verdict::NoRule => ("no_rule", ""),
    }
}

fn compare_rules(set: &RuleSet, name: &str, port: u16) {
    let mut allowed = None;
    let mut first_match = None;
    for rule in set.rules() {
        if rule.domains.iter().any(|p| reference_matches(p, name)) {
            first_match.get_or_insert(rule.name.as_str());
            if rule.allows_port(port) {
                allowed = Some(("allowed", rule.name.as_str()));
                break;
            }
        }
    }
    let expected = allowed
        .or(first_match.map(|rule| ("port_not_allowed", rule)))
        .unwrap_or(("no_rule", ""));
    assert_eq!(verdict(set, name, port), expected, "{name:?} port {port}");
}

// ---------------------------------------------------------------------------------------------
// client_hello: sni::inspect

/// The ClientHello parser behind the SNI check.
///
/// - Monotonic: once a prefix of the stream is decided, more bytes never change the decision
///   (checked at a cut the input chooses, at every record boundary, and with bytes appended).
/// - The name it reads is lowercase.
/// - Agreement with rustls, a TLS stack an origin may run: when rustls accepts the bytes as a
///   ClientHello naming a server and portcullis reads a name too, it is the same name. A
///   different name would let a client CONNECT to an allowed host and present another name to
///   the origin (domain fronting past the SNI check). When rustls finds no usable name,
///   portcullis must not read one that could pass the check (a valid host name). Reading no
///   name where rustls reads one is allowed: the check then refuses the tunnel.
pub fn client_hello(data: &[u8]) {
    let full = sni::inspect(data);
    if let Some(Hello::Tls(Some(name))) = &full {
        assert!(
            !name.bytes().any(|b| b.is_ascii_uppercase()),
            "{name:?}: not lowercased"
        );
    }
    if data.len() >= 2 {
        let cut = usize::from(u16::from_be_bytes([data[0], data[1]])) % (data.len() + 1);
        if let Some(early) = sni::inspect(&data[..cut]) {
            assert_eq!(
                full.as_ref(),
                Some(&early),
                "decided at {cut}, then changed"
            );
        }
    }
    let mut at = 0;
    while at + 5 <= data.len() {
        at += 5 + usize::from(u16::from_be_bytes([data[at + 3], data[at + 4]]));
        if at > data.len() {
            break;
        }
        if let Some(early) = sni::inspect(&data[..at]) {
            assert_eq!(full.as_ref(), Some(&early), "decided at record end {at}");
        }
    }
    if let Some(decided) = &full {
        let mut more = data.to_vec();
        more.extend_from_slice(b"\x16\x03\x01\x00\x05\x01\x00\x00\x01\x00garbage");
        assert_eq!(
            sni::inspect(&more).as_ref(),
            Some(decided),
            "appended bytes"
        );
    }
    compare_with_rustls(data, full.as_ref());
}

/// What rustls's server side makes of the bytes: `Some(name)` when it accepts them as a
/// ClientHello (with the name it would route on, if any); `None` when it refuses them or
/// wants more.
pub fn rustls_server_name(data: &[u8]) -> Option<Option<String>> {
    let mut acceptor = rustls::server::Acceptor::default();
    let mut rest = data;
    loop {
        match acceptor.read_tls(&mut rest) {
            Ok(0) | Err(_) => return None,
            Ok(_) => {}
        }
        match acceptor.accept() {
            Ok(Some(accepted)) => {
                return Some(accepted.client_hello().server_name().map(str::to_owned));
            }
            Ok(None) if rest.is_empty() => return None,
            Ok(None) => {}
            Err(_) => return None,
        }
    }
}

fn compare_with_rustls(data: &[u8], ours: Option<&Hello>) {
    let Some(theirs) = rustls_server_name(data) else {
        return;
    };
    let Some(Hello::Tls(Some(ours))) = ours else {
        // No name read: the SNI check refuses the tunnel, whatever rustls would do.
        return;
    };
    match theirs {
        Some(name) => {
            let name = name.strip_suffix('.').unwrap_or(&name).to_ascii_lowercase();
            assert_eq!(*ours, name, "rustls routes this ClientHello on {name:?}");
        }
        None => assert!(
            !matches!(rules::parse_host(ours), Ok(Host::Name(_))),
            "rustls finds no server name, portcullis reads {ours:?}"
        ),
    }
}

// ---------------------------------------------------------------------------------------------
// request_head: server::check_head

/// As in src/server.rs.
const MAX_HEAD: usize = 64 * 1024;
const MAX_HEADERS: usize = 100;

/// The request-head gate, against the parsers behind it. `check_head` decides, before hyper
/// sees a connection, whether a head is complete and one hyper will accept; what it refuses
/// gets portcullis's own 400 with `Proxy-Status`.
///
/// - `Ok(true)` implies httparse parses the head and its target is a `hyper::Uri`.
/// - `Ok(true)` implies hyper's HTTP/1 server, set up as the proxy sets it up, parses the head
///   and calls the service (otherwise the client gets hyper's bare 400 without `Proxy-Status`).
/// - A decision made on a prefix stands when more bytes arrive (the proxy checks after every
///   read, so a head split over reads gets the verdict it gets whole).
pub fn request_head(data: &[u8]) {
    let verdict = check_head(data);
    if data.len() >= 2 {
        let cut = usize::from(u16::from_be_bytes([data[0], data[1]])) % (data.len() + 1);
        match check_head(&data[..cut]) {
            Ok(false) => {}
            early => assert_eq!(early, verdict, "decided at {cut}, then changed"),
        }
    }
    if verdict == Ok(true) {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut request = httparse::Request::new(&mut headers);
        let parsed = request.parse(data);
        assert!(
            matches!(parsed, Ok(httparse::Status::Complete(_))),
            "{parsed:?}"
        );
        let target = request.path.expect("a complete head has a target");
        assert!(target.parse::<hyper::Uri>().is_ok(), "{target:?}");
        if skip_known() && known_finding(&request) {
            return;
        }
        assert!(
            hyper_serves(data),
            "check_head accepted a head hyper refuses: {:?}",
            String::from_utf8_lossy(data)
        );
    }
}

/// `PORTCULLIS_FUZZ_SKIP_KNOWN=1`: do not stop on the findings already reported (see
/// `known_finding`), so a fuzzing run can look for new ones. Never set in tests.
fn skip_known() -> bool {
    static SKIP: LazyLock<bool> =
        LazyLock::new(|| std::env::var_os("PORTCULLIS_FUZZ_SKIP_KNOWN").is_some_and(|v| v == "1"));
    *SKIP
}

/// The findings in fuzz/README.md that `check_head` let through to hyper's bare 400: on a
/// method other than CONNECT, a `Transfer-Encoding` (finding 1), or a `Content-Length` over
/// hyper's largest, 2^64 - 3 (findings 1 and 2).
fn known_finding(request: &httparse::Request<'_, '_>) -> bool {
    let too_long = |value: &[u8]| {
        std::str::from_utf8(value)
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .is_none_or(|v| v > u64::MAX - 3)
    };
    request.method != Some("CONNECT")
        && request.headers.iter().any(|h| {
            h.name.eq_ignore_ascii_case("transfer-encoding")
                || (h.name.eq_ignore_ascii_case("content-length") && too_long(h.value))
        })
}

thread_local! {
    static RUNTIME: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
}

/// Hands the bytes to hyper's HTTP/1 server as the proxy does (`max_buf_size` 64 KiB) and says
/// whether the service got a request. Must not be called from inside a runtime.
pub fn hyper_serves(data: &[u8]) -> bool {
    RUNTIME.with(|runtime| {
        runtime.block_on(async {
            let (client, server) = tokio::io::duplex(MAX_HEAD * 2);
            let called = Arc::new(AtomicBool::new(false));
            let seen = called.clone();
            let service = service_fn(move |_request| {
                seen.store(true, Ordering::SeqCst);
                async {
                    Ok::<_, Infallible>(
                        Response::builder()
                            .status(StatusCode::FORBIDDEN)
                            .header("connection", "close")
                            .body(Full::new(Bytes::new()))
                            .expect("a valid response"),
                    )
                }
            });
            let connection = http1::Builder::new()
                .max_buf_size(MAX_HEAD.max(8192))
                .serve_connection(TokioIo::new(server), service);
            let (mut read, mut write) = tokio::io::split(client);
            let talk = async {
                let _ = write.write_all(data).await;
                let _ = write.shutdown().await;
                let mut sink = Vec::new();
                let _ = read.read_to_end(&mut sink).await;
            };
            let serve = async {
                let _ = connection.await;
            };
            let both = async {
                tokio::join!(talk, serve);
            };
            let _ = tokio::time::timeout(std::time::Duration::from_secs(5), both).await;
            called.load(Ordering::SeqCst)
        })
    })
}

// ---------------------------------------------------------------------------------------------
// proxy_header: the PROXY protocol v1/v2 parser

/// The PROXY header parser, on whatever a balancer (or anyone on its subnet) could send.
///
/// - No panic, and a complete header never claims more bytes than it was given.
/// - A v1 header ends with CRLF within 107 bytes; a v2 header is exactly its length field
///   plus 16.
/// - Splitting changes nothing: every prefix of the input parses as "need more", or as what
///   the whole input parses as, so a header split over TCP segments is read the same.
/// - Absent exactly when the input starts with neither signature.
/// - A VPC endpoint ID, when one is taken, is 1 to 64 letters, digits and dashes.
pub fn proxy_header(data: &[u8]) {
    use portcullis::net::proxy_protocol::{Parsed, V2_SIGNATURE, parse};
    let whole = parse(data);
    if let Parsed::Complete(header, length) = &whole {
        assert!(*length <= data.len(), "{length} > {}", data.len());
        match header.version {
            1 => assert!(data[..*length].ends_with(b"\r\n") && *length <= 107),
            _ => {
                let declared = usize::from(u16::from_be_bytes([data[14], data[15]]));
                assert_eq!(*length, 16 + declared);
            }
        }
        if let Some(id) = &header.vpce_id {
            assert!(!id.is_empty() && id.len() <= 64, "{id:?}");
            assert!(
                id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'),
                "{id:?}"
            );
        }
    }
    let starts = |sig: &[u8]| {
        let n = data.len().min(sig.len());
        data[..n] == sig[..n]
    };
    let neither = !starts(&V2_SIGNATURE) && !starts(b"PROXY ");
    assert_eq!(whole == Parsed::Absent, neither, "{whole:?}");
    for cut in 0..data.len().min(300) {
        let part = parse(&data[..cut]);
        assert!(
            part == Parsed::Incomplete || part == whole,
            "prefix of {cut} bytes parses as {part:?}, the whole as {whole:?}"
        );
    }
}
