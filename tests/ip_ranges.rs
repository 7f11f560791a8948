//! `require_ip_ranges`: the connected address must lie in AWS's published prefixes, and
//! `[aws_ip_ranges] url` keeps those prefixes current.
//! The fixture `tests/fixtures/ip-ranges.json` holds real CloudFront and AMAZON prefixes in the
//! documented format, some entries without `network_border_group` as in older files. The
//! refresh tests serve re-dated copies of it over HTTPS on loopback, under the name AWS
//! publishes at, with a certificate from the test CA.

mod support;

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use portcullis::ip_ranges::IpRanges;
use portcullis::ip_ranges::fetch::FetchError;
use portcullis::ip_ranges::refresh::{RESULTS, RefreshError, Refreshed, Rejected};
use support::{Origin, Setup, assert_echo, connect, eventually, start, tls};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;

const FIXTURE: &str = "tests/fixtures/ip-ranges.json";
const HOST: &str = "d111abcdef8.cloudfront.net";

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

#[test]
fn the_fixture_loads_with_real_prefixes() {
    let ranges = IpRanges::load(std::path::Path::new(FIXTURE)).unwrap();
    let cf = ["CLOUDFRONT".to_string()];
    assert!(ranges.contains(&cf, ip("13.33.1.1")));
    assert!(ranges.contains(&cf, ip("2600:9000:2000::1")));
    assert!(
        !ranges.contains(&cf, ip("52.94.1.1")),
        "AMAZON, not CLOUDFRONT"
    );
    assert!(ranges.contains(&["AMAZON".into()], ip("52.94.1.1")));
    assert!(!ranges.contains(&cf, ip("10.0.0.1")));
}

/// A rule admitting `HOST` on the origin's port, only into `services`.
fn setup(ranges_file: &str, services: &str, port: u16) -> Setup {
    Setup {
        extra_rules: format!(
            "[[rule]]\nname = \"cf-ranges\"\ndomains = [{HOST:?}]\nports = [\"{port}\"]\n\
             require_ip_ranges = [{services}]\n\n[aws_ip_ranges]\nfile = {ranges_file:?}\n"
        ),
        ..Setup::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_address_outside_the_published_prefixes_is_refused() {
    let origin = Origin::echo().await;
    let fixture = std::fs::canonicalize(FIXTURE).unwrap();
    let proxy = start(setup(
        fixture.to_str().unwrap(),
        "\"CLOUDFRONT\"",
        origin.addr.port(),
    ))
    .await;
    // Loopback is allowed by [destinations], but it is no CloudFront address.
    proxy.dns.set(HOST, &[ip("127.0.0.1")], 60);
    let (reply, _) = connect(proxy.addr, &format!("{HOST}:{}", origin.addr.port())).await;
    assert_eq!(reply.status, 403);
    assert_eq!(reply.reason(), Some("destination_not_allowed"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_address_inside_the_published_prefixes_is_admitted() {
    let origin = Origin::echo().await;
    // The fixture plus a stand-in service that publishes loopback, where the origin listens.
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(FIXTURE).unwrap()).unwrap();
    json["prefixes"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({
            "ip_prefix": "127.0.0.0/8", "region": "GLOBAL", "service": "LOOPBACK_TEST"
        }));
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("ip-ranges.json");
    std::fs::write(&file, json.to_string()).unwrap();
    let services = "\"CLOUDFRONT\", \"LOOPBACK_TEST\"";
    let proxy = start(setup(file.to_str().unwrap(), services, origin.addr.port())).await;
    proxy.dns.set(HOST, &[ip("127.0.0.1")], 60);
    let (reply, mut stream) = connect(proxy.addr, &format!("{HOST}:{}", origin.addr.port())).await;
    assert_eq!(reply.status, 200);
    assert_echo(&mut stream, b"inside a published prefix").await;
}

#[test]
fn check_reports_the_file_date_and_counts_and_unknown_services() {
    let dir = tempfile::tempdir().unwrap();
    let fixture = std::fs::canonicalize(FIXTURE).unwrap();
    let config = dir.path().join("portcullis.toml");
    let write = |service: &str| {
        std::fs::write(
            &config,
            format!(
                "[aws_ip_ranges]\nfile = {:?}\n\n[[rule]]\nname = \"cf\"\ndomains = [\"*.cloudfront.net\"]\n\
                 ports = [\"443\"]\nrequire_ip_ranges = [{service:?}]\n",
                fixture.to_str().unwrap()
            ),
        )
        .unwrap();
    };
    let check = || {
        let out = Command::new(env!("CARGO_BIN_EXE_portcullis"))
            .args(["--config", config.to_str().unwrap(), "--check"])
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    write("CLOUDFRONT");
    let (code, out) = check();
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("createDate 2026-11-21-12-03-13"), "{out}");
    assert!(out.contains("14 IPv4 and 4 IPv6 prefixes"), "{out}");
    write("APPSTREAM");
    let (code, out) = check();
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains(":8: service \"APPSTREAM\" is not in the ip-ranges file"),
        "{out}"
    );
}

// ---------------------------------------------------------------------------------------------
// Keeping the set current: `[aws_ip_ranges] url`, fetched over HTTPS from a server on loopback
// under the name AWS publishes at, with a certificate from the test CA.

/// syncTokens of the files below, oldest first (AWS: publication time in Unix seconds).
const T1: u64 = 1_795_000_000;
const T2: u64 = 1_795_100_000;
const T3: u64 = 1_795_200_000;

/// The fixture re-dated to `sync`, with loopback (where the echo origin listens) published
/// as CLOUDFRONT when `loopback`, and `edit` applied last.
fn ranges_with(sync: u64, loopback: bool, edit: impl FnOnce(&mut serde_json::Value)) -> String {
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(FIXTURE).unwrap()).unwrap();
    let date = time::OffsetDateTime::from_unix_timestamp(sync as i64).unwrap();
    json["syncToken"] = sync.to_string().into();
    json["createDate"] = format!(
        "{:04}-{:02}-{:02}-{:02}-{:02}-{:02}",
        date.year(),
        u8::from(date.month()),
        date.day(),
        date.hour(),
        date.minute(),
        date.second()
    )
    .into();
    if loopback {
        json["prefixes"]
            .as_array_mut()
            .unwrap()
            .push(serde_json::json!({
                "ip_prefix": "127.0.0.0/8", "region": "GLOBAL", "service": "CLOUDFRONT",
                "network_border_group": "GLOBAL"
            }));
    }
    edit(&mut json);
    serde_json::to_string_pretty(&json).unwrap()
}

fn ranges(sync: u64, loopback: bool) -> String {
    ranges_with(sync, loopback, |_| {})
}

/// What the test server answers with.
#[derive(Clone)]
enum Answer {
    /// 200 with an `ETag` and `Last-Modified`; 304 to a request that sends that `ETag` back.
    File { body: String, etag: String },
    /// These bytes as they are (a whole response, or a broken one), then close.
    Raw(Vec<u8>),
}

impl Answer {
    fn file(body: &str, etag: &str) -> Answer {
        Answer::File {
            body: body.to_string(),
            etag: format!("\"{etag}\""),
        }
    }
}

const LAST_MODIFIED: &str = "Sat, 21 Nov 2026 12:03:13 GMT";

#[derive(Default)]
struct Served {
    /// Request heads received, header names lowercased.
    requests: Vec<Vec<(String, String)>>,
    /// TCP connections accepted, TLS or not.
    connections: usize,
}

/// An HTTPS server for `ip-ranges.json` on 127.0.0.1, one request per connection, written by
/// hand so a test can send exactly the broken answer it needs.
struct RangesServer {
    addr: SocketAddr,
    answer: Arc<Mutex<Answer>>,
    served: Arc<Mutex<Served>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for RangesServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl RangesServer {
    async fn start(answer: Answer) -> RangesServer {
        support::isolate();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let answer = Arc::new(Mutex::new(answer));
        let served = Arc::new(Mutex::new(Served::default()));
        let acceptor = TlsAcceptor::from(tls::ca().server_config());
        let (a, s) = (answer.clone(), served.clone());
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                s.lock().unwrap().connections += 1;
                let (acceptor, a, s) = (acceptor.clone(), a.clone(), s.clone());
                tokio::spawn(async move {
                    let Ok(mut stream) = acceptor.accept(stream).await else {
                        return;
                    };
                    let mut head = Vec::new();
                    let mut byte = [0u8; 1];
                    while !head.ends_with(b"\r\n\r\n") {
                        match stream.read(&mut byte).await {
                            Ok(1) => head.push(byte[0]),
                            _ => return,
                        }
                    }
                    let headers: Vec<(String, String)> = String::from_utf8_lossy(&head)
                        .split("\r\n")
                        .skip(1)
                        .filter_map(|l| l.split_once(':'))
                        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
                        .collect();
                    let sent_etag = headers
                        .iter()
                        .find(|(n, _)| n == "if-none-match")
                        .map(|(_, v)| v.clone());
                    s.lock().unwrap().requests.push(headers);
                    let answer = a.lock().unwrap().clone();
                    let reply = match answer {
                        Answer::File { etag, .. } if sent_etag.as_ref() == Some(&etag) => {
                            format!("HTTP/1.1 304 Not Modified\r\nETag: {etag}\r\nConnection: close\r\n\r\n")
                                .into_bytes()
                        }
                        Answer::File { body, etag } => format!(
                            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\
                             Content-Length: {}\r\nETag: {etag}\r\nLast-Modified: {LAST_MODIFIED}\r\n\
                             Connection: close\r\n\r\n{body}",
                            body.len()
                        )
                        .into_bytes(),
                        Answer::Raw(bytes) => bytes,
                    };
                    let _ = stream.write_all(&reply).await;
                    let _ = stream.shutdown().await;
                });
            }
        });
        RangesServer {
            addr,
            answer,
            served,
            task,
        }
    }

    fn set(&self, answer: Answer) {
        *self.answer.lock().unwrap() = answer;
    }

    fn connections(&self) -> usize {
        self.served.lock().unwrap().connections
    }

    /// The value of `name` in the last request, if it had one.
    fn last_header(&self, name: &str) -> Option<String> {
        let served = self.served.lock().unwrap();
        let last = served.requests.last()?;
        last.iter().find(|(n, _)| n == name).map(|(_, v)| v.clone())
    }
}

/// A proxy whose `file` starts as `initial` and whose `url` points at `url_host` on the test
/// server's port, with the cf-ranges rule on an echo origin's port.
struct Refreshing {
    proxy: support::TestProxy,
    /// What the proxy was started with, for reloads.
    setup: Setup,
    origin: Origin,
    file: PathBuf,
    _dir: tempfile::TempDir,
}

struct Options {
    refresh: &'static str,
    /// `[destinations] allow` covers loopback (where the server and origin listen).
    allow_loopback: bool,
    /// `[dns] hosts` answers for the URL's host; else the test DNS server must.
    static_dns: bool,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            refresh: "1h",
            allow_loopback: true,
            static_dns: true,
        }
    }
}

fn refresh_toml(file: &Path, url: &str, refresh: &str, ca: &Path, port: u16) -> String {
    format!(
        "[[rule]]\nname = \"cf-ranges\"\ndomains = [{HOST:?}]\nports = [\"{port}\"]\n\
         require_ip_ranges = [\"CLOUDFRONT\"]\n\n[aws_ip_ranges]\nfile = {:?}\nurl = {url:?}\n\
         refresh = {refresh:?}\nca_file = {:?}\n",
        file.to_str().unwrap(),
        ca.to_str().unwrap(),
    )
}

async fn refreshing(initial: &str, server: &RangesServer, options: Options) -> Refreshing {
    let origin = Origin::echo().await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("ip-ranges.json");
    std::fs::write(&file, initial).unwrap();
    let ca = tls::ca().write_ca(dir.path());
    let url = format!(
        "https://{}:{}/ip-ranges.json",
        tls::IP_RANGES,
        server.addr.port()
    );
    let mut setup = Setup {
        extra_rules: refresh_toml(&file, &url, options.refresh, &ca, origin.addr.port()),
        ..Setup::default()
    };
    if options.static_dns {
        setup.dns_hosts = format!("{:?} = [\"127.0.0.1\"]", tls::IP_RANGES);
    }
    if !options.allow_loopback {
        setup.destinations_allow = Vec::new();
    }
    let proxy = start(setup.clone()).await;
    proxy.dns.set(HOST, &[ip("127.0.0.1")], 60);
    Refreshing {
        proxy,
        setup,
        origin,
        file,
        _dir: dir,
    }
}

fn refreshes(result: &str) -> String {
    format!("portcullis_ip_ranges_refreshes_total{{result=\"{result}\"}}")
}

impl Refreshing {
    /// The status of a CONNECT to the origin under the cf-ranges rule, and the stream.
    async fn tunnel(&self) -> (u16, TcpStream) {
        let (reply, stream) = connect(
            self.proxy.addr,
            &format!("{HOST}:{}", self.origin.addr.port()),
        )
        .await;
        (reply.status, stream)
    }

    async fn count(&self, result: &str) -> f64 {
        self.proxy.metric(&refreshes(result)).await
    }

    /// Waits for `n` refresh attempts in all, whatever their results (the one at start first).
    async fn attempts(&self, n: f64) {
        let done = eventually(Duration::from_secs(20), || async {
            let text = self.proxy.metrics().await;
            let total: f64 = RESULTS
                .iter()
                .map(|r| support::metric_value(&text, &refreshes(r)))
                .sum();
            total >= n
        })
        .await;
        assert!(done, "{n} refresh attempts within 20 s");
    }

    fn sync_token(&self) -> Option<u64> {
        self.proxy.proxy.ip_ranges_sync_token()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_file_swaps_in_and_is_written_to_file() {
    let old = ranges(T1, false);
    let server = RangesServer::start(Answer::file(&old, "t1")).await;
    let r = refreshing(
        &old,
        &server,
        Options {
            refresh: "200ms",
            ..Options::default()
        },
    )
    .await;
    r.attempts(1.0).await;
    assert_eq!(r.tunnel().await.0, 403, "loopback is not CLOUDFRONT in T1");
    assert_eq!(r.count("ok").await, 0.0);
    assert!(
        r.count("not_modified").await >= 1.0,
        "the same syncToken is nothing new"
    );

    let new = ranges(T2, true);
    server.set(Answer::file(&new, "t2"));
    let admitted = eventually(Duration::from_secs(20), || async {
        r.tunnel().await.0 == 200
    })
    .await;
    assert!(admitted, "the periodic refresh brought T2 in");
    let (status, mut stream) = r.tunnel().await;
    assert_eq!(status, 200);
    assert_echo(&mut stream, b"published since the refresh").await;
    assert_eq!(r.sync_token(), Some(T2));
    // Counted once the copy is on disk, a moment after the swap.
    let counted = eventually(Duration::from_secs(10), || async {
        r.count("ok").await == 1.0
    })
    .await;
    assert!(counted, "ok counted once");
    assert_eq!(
        std::fs::read_to_string(&r.file).unwrap(),
        new,
        "the copy on disk"
    );
    let metrics = r.proxy.metrics().await;
    assert_eq!(
        support::metric_value(&metrics, "portcullis_ip_ranges_sync_token"),
        T2 as f64
    );
    let age = support::metric_value(&metrics, "portcullis_ip_ranges_age_seconds");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(
        (age - (now - T2) as f64).abs() < 60.0,
        "age {age} is now minus T2's createDate"
    );
    let leftovers: Vec<_> = std::fs::read_dir(r.file.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_sync_token_is_refused() {
    let current = ranges(T2, true);
    let server = RangesServer::start(Answer::file(&ranges(T1, false), "t1")).await;
    let r = refreshing(&current, &server, Options::default()).await;
    r.attempts(1.0).await;
    match r.proxy.proxy.refresh_ip_ranges().await {
        Err(RefreshError::Rejected(Rejected::Stale { offered, current })) => {
            assert_eq!((offered, current), (T1, T2));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(r.count("stale").await, 2.0, "at start, and now");
    assert_eq!(r.count("ok").await, 0.0);
    assert_eq!(r.sync_token(), Some(T2));
    assert_eq!(r.tunnel().await.0, 200, "T2 still publishes loopback");
    assert_eq!(std::fs::read_to_string(&r.file).unwrap(), current);
}

/// A 200 whose body is `body` with a Content-Length of `length`.
fn raw(body: &str, length: usize) -> Answer {
    Answer::Raw(
        format!("HTTP/1.1 200 OK\r\nContent-Length: {length}\r\nConnection: close\r\n\r\n{body}")
            .into_bytes(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncated_or_malformed_files_are_refused() {
    let current = ranges(T1, true);
    let newer = ranges(T2, true);
    let half = &newer[..newer.len() / 2];
    let server = RangesServer::start(raw(half, half.len())).await;
    let r = refreshing(&current, &server, Options::default()).await;
    r.attempts(1.0).await;
    let bad_prefix = ranges_with(T2, true, |json| {
        json["prefixes"][0]["ip_prefix"] = "13.32.0.0/33".into();
    });
    let no_cloudfront = ranges_with(T2, false, |json| {
        json["prefixes"]
            .as_array_mut()
            .unwrap()
            .retain(|p| p["service"] != "CLOUDFRONT");
        json["ipv6_prefixes"]
            .as_array_mut()
            .unwrap()
            .retain(|p| p["service"] != "CLOUDFRONT");
    });
    let cases: Vec<(&str, Answer, &str)> = vec![
        (
            "half a file",
            raw(half, half.len()),
            "not a valid ip-ranges file",
        ),
        (
            "fewer bytes than Content-Length",
            raw(half, newer.len()),
            "body cut short",
        ),
        (
            "a bad prefix",
            raw(&bad_prefix, bad_prefix.len()),
            "bad ip_prefix",
        ),
        (
            "no CLOUDFRONT",
            raw(&no_cloudfront, no_cloudfront.len()),
            "\"CLOUDFRONT\"",
        ),
        ("not JSON", raw("<html>", 6), "not a valid ip-ranges file"),
        ("past the size cap", raw("", 64 << 20), "body larger than"),
    ];
    let count = cases.len();
    for (case, answer, message) in cases {
        server.set(answer);
        let error = r.proxy.proxy.refresh_ip_ranges().await.unwrap_err();
        assert_eq!(error.result(), "invalid", "{case}: {error}");
        assert!(error.to_string().contains(message), "{case}: {error}");
        assert_eq!(r.sync_token(), Some(T1), "{case}");
    }
    assert_eq!(r.count("invalid").await, 1.0 + count as f64);
    assert_eq!(r.count("ok").await, 0.0);
    assert_eq!(r.tunnel().await.0, 200, "T1 still in force");
    assert_eq!(std::fs::read_to_string(&r.file).unwrap(), current);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_modified_changes_nothing() {
    let newer = ranges(T2, true);
    let server = RangesServer::start(Answer::file(&newer, "t2")).await;
    let r = refreshing(&ranges(T1, false), &server, Options::default()).await;
    r.attempts(1.0).await;
    assert_eq!(r.count("ok").await, 1.0, "T2 at start");
    assert_eq!(server.last_header("if-none-match"), None);
    assert_eq!(
        r.proxy.proxy.refresh_ip_ranges().await.unwrap(),
        Refreshed::NotModified
    );
    assert_eq!(
        server.last_header("if-none-match").as_deref(),
        Some("\"t2\"")
    );
    assert_eq!(
        server.last_header("if-modified-since").as_deref(),
        Some(LAST_MODIFIED)
    );
    assert_eq!(r.count("not_modified").await, 1.0);
    assert_eq!(r.count("ok").await, 1.0);
    assert_eq!(r.sync_token(), Some(T2));
    assert_eq!(std::fs::read_to_string(&r.file).unwrap(), newer);
    assert_eq!(r.tunnel().await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_is_down_changes_nothing() {
    let current = ranges(T1, true);
    let server = RangesServer::start(Answer::file(&current, "t1")).await;
    let r = refreshing(&current, &server, Options::default()).await;
    r.attempts(1.0).await;
    assert_eq!(r.count("not_modified").await, 1.0);
    // Nothing listens on the port any more: connection refused.
    let port = server.addr.port();
    drop(server);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err());
    match r.proxy.proxy.refresh_ip_ranges().await {
        Err(RefreshError::Fetch(FetchError::Connect { .. })) => {}
        other => panic!("{other:?}"),
    }
    assert_eq!(r.count("error").await, 1.0);
    assert_eq!(r.sync_token(), Some(T1));
    assert_eq!(r.tunnel().await.0, 200);
    assert_eq!(std::fs::read_to_string(&r.file).unwrap(), current);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_tunnels_survive_a_swap_that_removes_their_prefix() {
    let current = ranges(T1, true);
    let server = RangesServer::start(Answer::file(&current, "t1")).await;
    let r = refreshing(&current, &server, Options::default()).await;
    r.attempts(1.0).await;
    let (status, mut open) = r.tunnel().await;
    assert_eq!(status, 200);
    assert_echo(&mut open, b"before the swap").await;

    server.set(Answer::file(&ranges(T2, false), "t2"));
    assert_eq!(
        r.proxy.proxy.refresh_ip_ranges().await.unwrap(),
        Refreshed::Updated { sync: T2 }
    );
    assert_eq!(r.tunnel().await.0, 403, "new CONNECTs see T2 at once");
    assert_echo(&mut open, b"after the swap, on the tunnel opened before").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fetch_obeys_the_destination_policy() {
    let server = RangesServer::start(Answer::file(&ranges(T2, true), "t2")).await;
    let r = refreshing(
        &ranges(T1, true),
        &server,
        Options {
            allow_loopback: false,
            static_dns: false,
            ..Options::default()
        },
    )
    .await;
    // Through the test DNS server, as any name the proxy resolves.
    r.proxy.dns.set(tls::IP_RANGES, &[ip("127.0.0.1")], 60);
    r.attempts(1.0).await;
    // The attempt at start may have asked before the name existed; the resolver then keeps
    // that NXDOMAIN for the negative TTL (1 s).
    let mut outcome = r.proxy.proxy.refresh_ip_ranges().await;
    for _ in 0..50 {
        if !matches!(outcome, Err(RefreshError::Fetch(FetchError::Dns { .. }))) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        outcome = r.proxy.proxy.refresh_ip_ranges().await;
    }
    match outcome {
        Err(RefreshError::Fetch(FetchError::Refused { host, addrs })) => {
            assert_eq!(
                (host.as_str(), addrs.as_str()),
                (tls::IP_RANGES, "127.0.0.1")
            );
        }
        other => panic!("{other:?}"),
    }
    assert!(
        r.proxy.dns.queries(tls::IP_RANGES) >= 1,
        "resolved by the proxy's resolver"
    );

    // An address in the URL is judged the same way.
    let text = std::fs::read_to_string(&r.file).unwrap();
    assert!(!text.is_empty());
    let ca = r.file.parent().unwrap().join("ca.pem");
    let url = format!("https://127.0.0.1:{}/ip-ranges.json", server.addr.port());
    let setup = Setup {
        extra_rules: refresh_toml(&r.file, &url, "1h", &ca, r.origin.addr.port()),
        destinations_allow: Vec::new(),
        ..Setup::default()
    };
    let config = portcullis::Config::parse(&setup.to_toml(r.proxy.dns.addr), "test.toml").unwrap();
    r.proxy.proxy.reload(Ok(config)).unwrap();
    match r.proxy.proxy.refresh_ip_ranges().await {
        Err(RefreshError::Fetch(FetchError::Refused { host, .. })) => {
            assert_eq!(host, "127.0.0.1");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(server.connections(), 0, "the server was never contacted");
    assert_eq!(r.count("ok").await, 0.0);
    assert_eq!(r.sync_token(), Some(T1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_never_goes_back_to_an_older_file() {
    let newer = ranges(T2, true);
    let server = RangesServer::start(Answer::file(&newer, "t2")).await;
    let r = refreshing(&ranges(T1, false), &server, Options::default()).await;
    r.attempts(1.0).await;
    assert_eq!(r.sync_token(), Some(T2));
    assert_eq!(std::fs::read_to_string(&r.file).unwrap(), newer);

    let reload = || {
        let text = r.setup.to_toml(r.proxy.dns.addr);
        r.proxy
            .proxy
            .reload(portcullis::Config::parse(&text, "test.toml").map_err(|e| e.to_string()))
    };
    // Someone puts the old copy back: the reload reads it, and keeps the newer set in force.
    std::fs::write(&r.file, ranges(T1, false)).unwrap();
    reload().unwrap();
    assert_eq!(r.sync_token(), Some(T2));
    assert_eq!(r.tunnel().await.0, 200);
    // A newer file does come in with a reload.
    std::fs::write(&r.file, ranges(T3, false)).unwrap();
    reload().unwrap();
    assert_eq!(r.sync_token(), Some(T3));
    assert_eq!(r.tunnel().await.0, 403);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_refresher_stops_with_the_proxy() {
    let current = ranges(T1, true);
    let server = RangesServer::start(Answer::file(&current, "t1")).await;
    let mut r = refreshing(
        &current,
        &server,
        Options {
            refresh: "50ms",
            ..Options::default()
        },
    )
    .await;
    r.attempts(3.0).await;
    let stopped = tokio::time::timeout(Duration::from_secs(10), r.proxy.shut_down()).await;
    assert!(stopped.is_ok(), "run returned, refresher included");
    let after = server.connections();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        server.connections(),
        after,
        "no fetch after the proxy stopped"
    );
}
