//! Real clients through the proxy, end to end on loopback: Chromium (with `--proxy-server` and
//! with the proxy's own `/proxy.pac`), curl (`-x` and `HTTPS_PROXY`), Python `requests`, and
//! WebSocket sessions held for a minute (Python `websockets` and tokio-tungstenite).
//!
//! The origin is [`support::web::WebOrigin`]: HTTPS with a test CA for the real AppStream names,
//! a page and a WebSocket echo endpoint, on port 443 of its own loopback address (the profile's
//! rules allow 443 only). The proxy resolves the names through the test DNS server. Every client
//! verifies the origin's certificate against the test CA and sends the right SNI.
//!
//! The tools are external programs. Without one, a test prints why and passes, unless
//! `PORTCULLIS_REQUIRE_TOOLS=1` is set (as in CI, after `.ci/client-tools`), when it fails.

mod support;

#[path = "browser/chromium.rs"]
mod chromium;

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use chromium::Chromium;
use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use support::tls::{self, CLOUDFRONT, GATEWAY};
use support::web::WebOrigin;
use support::{Setup, TestProxy, metric_value, start};
use tokio::process::Command;
use tokio_tungstenite::tungstenite::Message;

/// Names no rule admits; one per test, since the tests share one access log.
const BLOCKED_CHROMIUM: &str = "blocked-chromium.example.com";
const BLOCKED_CURL: &str = "blocked-curl.example.com";
const BLOCKED_PYTHON: &str = "blocked-python.example.com";
/// How long the WebSocket sessions are held.
const SESSION: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------------------------
// Tools, logs, artifacts
// ---------------------------------------------------------------------------------------------

/// True when `command` runs and exits 0. Otherwise fails the test under
/// `PORTCULLIS_REQUIRE_TOOLS=1`, or says the test is skipped and returns false.
async fn have(what: &str, command: &[&str]) -> bool {
    support::have_tool(what, command)
}

async fn have_chromium() -> bool {
    have("chromium", &["chromium", "--version"]).await
        && have(
            "certutil (libnss3-tools)",
            &["sh", "-c", "command -v certutil"],
        )
        .await
}

async fn have_python(modules: &str) -> bool {
    have(
        &format!("python3 with {modules}"),
        &["python3", "-c", &format!("import {modules}")],
    )
    .await
}

/// The access log, captured in-process as the binary writes it: JSON, one event per line.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn capture() -> &'static Capture {
    static CAPTURE: OnceLock<Capture> = OnceLock::new();
    CAPTURE.get_or_init(|| {
        let capture = Capture::default();
        let writer = capture.clone();
        tracing_subscriber::fmt()
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_env_filter(tracing_subscriber::EnvFilter::new("access=info"))
            .with_writer(move || writer.clone())
            .init();
        capture
    })
}

/// Access-log events (as the binary prints them) about `host`. The tests run in parallel and
/// share the log, so an allowed host is told apart by the origin address it `resolved` to.
fn access_log(host: &str, resolved_ip: Option<&str>) -> Vec<Value> {
    let raw = capture().0.lock().unwrap().clone();
    String::from_utf8_lossy(&raw)
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|event| event["target"] == "access" && event["host"] == host)
        .filter(|event| {
            resolved_ip.is_none_or(|ip| event["resolved"] == format!("{ip}:443").as_str())
        })
        .collect()
}

/// Starts the proxy (with the access log captured) and a web origin on `ip:443` that the
/// proxy's DNS gives for `names`.
async fn proxy_and_origin(ip: &str, names: &[&str]) -> (TestProxy, WebOrigin) {
    capture();
    // Real clients send the CONNECT host as SNI, so they pass the strictest setting.
    let proxy = start(Setup {
        sni: "enforce",
        ..Setup::default()
    })
    .await;
    let origin = WebOrigin::start(ip).await;
    let addr: IpAddr = ip.parse().unwrap();
    for name in names {
        proxy.dns.set(name, &[addr], 300);
    }
    (proxy, origin)
}

/// A scratch directory with the test CA in `ca.pem`.
fn scratch() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let ca = tls::ca().write_ca(dir.path());
    (dir, ca)
}

/// `target/test-artifacts/<name>`, where CI keeps screenshots.
fn artifact(name: &str) -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"));
    target.join("test-artifacts").join(name)
}

fn requests_series(domain: &str, outcome: &str, reason: &str, rule: &str) -> String {
    format!(
        "portcullis_requests_total{{domain=\"{domain}\",outcome=\"{outcome}\",reason=\"{reason}\",rule=\"{rule}\"}}"
    )
}

fn bytes_series(domain: &str, direction: &str) -> String {
    format!("portcullis_tunnel_bytes_total{{direction=\"{direction}\",domain=\"{domain}\"}}")
}

fn show(output: &Output) -> String {
    format!(
        "status {}\nstdout: {}\nstderr: {}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// A client process with no proxy settings of its own beyond what the test gives it.
fn client(program: &str) -> Command {
    let mut command = Command::new(program);
    for var in [
        "http_proxy",
        "https_proxy",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "all_proxy",
        "ALL_PROXY",
        "no_proxy",
        "NO_PROXY",
        "CURL_CA_BUNDLE",
        "REQUESTS_CA_BUNDLE",
        "SSL_CERT_FILE",
    ] {
        command.env_remove(var);
    }
    command.kill_on_drop(true);
    command
}

// ---------------------------------------------------------------------------------------------
// Chromium
// ---------------------------------------------------------------------------------------------

/// Loads the origin's page in Chromium, waits for its WebSocket exchange, saves a screenshot.
async fn load_page(browser: &mut Chromium, origin: &WebOrigin, host: &str, shot: &str) {
    let url = format!("https://{host}/");
    if let Err(error) = browser.navigate(&url).await {
        panic!("{url}: {error}\nchromium stderr:\n{}", browser.stderr());
    }
    let title = browser
        .wait_for_title(&["ws-ok", "ws-failed"], Duration::from_secs(30))
        .await;
    browser.screenshot(&artifact(shot)).await;
    let done = origin.wait_for("/done?", Duration::from_secs(10)).await;
    assert_eq!(
        title,
        "ws-ok 30/30 messages echoed",
        "page title; origin saw {:?}",
        origin.seen.hits()
    );
    let done = done.expect("the page reported its result to the origin");
    assert_eq!(done.target, "/done?ok=30&total=30&result=ok");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_with_proxy_server_and_a_blocked_domain() {
    if !have_chromium().await {
        return;
    }
    let (proxy, origin) = proxy_and_origin("127.0.0.81", &[GATEWAY]).await;
    let (_dir, ca) = scratch();
    let mut browser =
        Chromium::launch(&[format!("--proxy-server=http://{}", proxy.addr)], &ca).await;

    load_page(&mut browser, &origin, GATEWAY, "chromium-proxy-server.png").await;
    // The page, then its WebSocket: both arrived under the gateway's name, with its SNI.
    let hits = origin.seen.hits();
    assert!(hits.iter().any(|h| h.target == "/"), "{hits:?}");
    assert!(hits.iter().any(|h| h.target == "/ws"), "{hits:?}");
    for hit in &hits {
        assert_eq!(hit.sni.as_deref(), Some(GATEWAY), "{hit:?}");
        assert_eq!(hit.host, GATEWAY, "{hit:?}");
    }
    assert_eq!(
        origin
            .seen
            .ws_messages
            .load(std::sync::atomic::Ordering::SeqCst),
        30
    );

    // A domain no rule names: Chromium gets a 403 to its CONNECT and shows a tunnel error.
    let blocked = browser
        .navigate(&format!("https://{BLOCKED_CHROMIUM}/"))
        .await;
    browser.screenshot(&artifact("chromium-blocked.png")).await;
    assert_eq!(
        blocked,
        Err("net::ERR_TUNNEL_CONNECTION_FAILED".to_string())
    );
    browser.close().await;

    // The metrics show both.
    let metrics = proxy.metrics().await;
    let allowed = metric_value(
        &metrics,
        &requests_series(GATEWAY, "allowed", "", "appstream-gateway"),
    );
    assert!(
        allowed >= 2.0,
        "page and WebSocket tunnels: {allowed}\n{metrics}"
    );
    let denied = metric_value(
        &metrics,
        &requests_series(BLOCKED_CHROMIUM, "denied", "domain_not_allowed", ""),
    );
    assert!(denied >= 1.0, "blocked domain counted: {denied}\n{metrics}");
    assert!(metric_value(&metrics, &bytes_series(GATEWAY, "upstream")) > 0.0);
    assert!(metric_value(&metrics, &bytes_series(GATEWAY, "downstream")) > 0.0);

    // And so does the access log.
    let log = access_log(GATEWAY, Some("127.0.0.81"));
    assert!(
        log.iter().any(|e| e["event"] == "decision"
            && e["outcome"] == "allowed"
            && e["rule"] == "appstream-gateway"
            && e["port"] == 443
            && e["sni"] == GATEWAY),
        "{log:?}"
    );
    let log = access_log(BLOCKED_CHROMIUM, None);
    assert!(
        log.iter().any(|e| e["event"] == "decision"
            && e["outcome"] == "denied"
            && e["reason"] == "domain_not_allowed"),
        "{log:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_with_the_proxy_pac_goes_through_the_proxy() {
    if !have_chromium().await {
        return;
    }
    let (proxy, origin) = proxy_and_origin("127.0.0.82", &[CLOUDFRONT]).await;
    let (_dir, ca) = scratch();
    let (status, pac) = proxy.admin_get("/proxy.pac").await;
    assert_eq!(status, 200);
    assert!(pac.contains("PROXY proxy.test:3128"), "{pac}");

    // The PAC hands out the advertised `proxy.test:3128`, as an operator's DNS name for the
    // proxy would be. Chromium resolves that name itself: map it to where this proxy listens.
    let mut browser = Chromium::launch(
        &[
            format!("--proxy-pac-url=http://{}/proxy.pac", proxy.admin),
            format!(
                "--host-resolver-rules=MAP proxy.test 127.0.0.1:{}",
                proxy.addr.port()
            ),
        ],
        &ca,
    )
    .await;
    load_page(&mut browser, &origin, CLOUDFRONT, "chromium-pac.png").await;
    browser.close().await;

    let hits = origin.seen.hits();
    assert!(hits.iter().any(|h| h.target == "/ws"), "{hits:?}");
    for hit in &hits {
        assert_eq!(hit.sni.as_deref(), Some(CLOUDFRONT), "{hit:?}");
    }
    let allowed = proxy
        .metric(&requests_series(CLOUDFRONT, "allowed", "", "cloudfront"))
        .await;
    assert!(
        allowed >= 2.0,
        "page and WebSocket went through the proxy: {allowed}"
    );
    assert!(
        access_log(CLOUDFRONT, Some("127.0.0.82"))
            .iter()
            .any(|e| e["event"] == "decision" && e["outcome"] == "allowed"),
        "{:?}",
        access_log(CLOUDFRONT, Some("127.0.0.82"))
    );
}

// ---------------------------------------------------------------------------------------------
// curl and Python requests
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_with_x_and_with_https_proxy() {
    if !have("curl", &["curl", "--version"]).await {
        return;
    }
    let (proxy, _origin) = proxy_and_origin("127.0.0.83", &[GATEWAY, CLOUDFRONT]).await;
    let (_dir, ca) = scratch();
    let proxy_url = format!("http://{}", proxy.addr);
    let ca = ca.to_str().unwrap();

    // curl -x
    let output = client("curl")
        .args([
            "-sS",
            "--fail",
            "--max-time",
            "20",
            "-x",
            &proxy_url,
            "--cacert",
            ca,
        ])
        .arg(format!("https://{GATEWAY}/hello"))
        .output()
        .await
        .unwrap();
    assert!(output.status.success(), "{}", show(&output));
    assert_eq!(
        String::from_utf8_lossy(&output.stdout),
        format!("hello from {GATEWAY} over TLS, SNI {GATEWAY}\n")
    );

    // HTTPS_PROXY
    let output = client("curl")
        .args(["-sS", "--fail", "--max-time", "20", "--cacert", ca])
        .arg(format!("https://{CLOUDFRONT}/hello"))
        .env("HTTPS_PROXY", &proxy_url)
        .output()
        .await
        .unwrap();
    assert!(output.status.success(), "{}", show(&output));
    assert_eq!(
        String::from_utf8_lossy(&output.stdout),
        format!("hello from {CLOUDFRONT} over TLS, SNI {CLOUDFRONT}\n")
    );

    // A blocked domain: curl reports the proxy's 403 to CONNECT (exit 56).
    let output = client("curl")
        .args(["-sS", "--max-time", "20", "-x", &proxy_url, "--cacert", ca])
        .arg(format!("https://{BLOCKED_CURL}/"))
        .output()
        .await
        .unwrap();
    assert_eq!(output.status.code(), Some(56), "{}", show(&output));
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("403"),
        "{}",
        show(&output)
    );

    let metrics = proxy.metrics().await;
    for (domain, rule) in [(GATEWAY, "appstream-gateway"), (CLOUDFRONT, "cloudfront")] {
        assert_eq!(
            metric_value(&metrics, &requests_series(domain, "allowed", "", rule)),
            1.0,
            "{metrics}"
        );
    }
    assert_eq!(
        metric_value(
            &metrics,
            &requests_series(BLOCKED_CURL, "denied", "domain_not_allowed", "")
        ),
        1.0,
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_requests_with_proxies_and_with_https_proxy() {
    if !have_python("requests").await {
        return;
    }
    let (proxy, origin) = proxy_and_origin("127.0.0.84", &[GATEWAY, CLOUDFRONT]).await;
    let (_dir, ca) = scratch();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser/requests_client.py");
    let output = client("python3")
        .arg(&script)
        .arg(format!("http://{}", proxy.addr))
        .arg(&ca)
        .arg(format!("https://{GATEWAY}/hello"))
        .arg(format!("https://{CLOUDFRONT}/hello"))
        .arg(format!("https://{BLOCKED_PYTHON}/"))
        .output()
        .await
        .unwrap();
    assert!(output.status.success(), "{}", show(&output));
    let result: Value =
        serde_json::from_slice(&output.stdout).unwrap_or_else(|e| panic!("{e}: {}", show(&output)));
    assert_eq!(result["proxies"]["status"], 200, "{result}");
    assert_eq!(
        result["proxies"]["body"],
        format!("hello from {GATEWAY} over TLS, SNI {GATEWAY}")
    );
    assert_eq!(result["env"]["status"], 200, "{result}");
    assert_eq!(
        result["env"]["body"],
        format!("hello from {CLOUDFRONT} over TLS, SNI {CLOUDFRONT}")
    );
    let blocked = result["blocked"].as_str().unwrap();
    assert!(
        blocked.starts_with("ProxyError") && blocked.contains("403"),
        "{blocked}"
    );
    assert_eq!(origin.seen.hits().len(), 2, "{:?}", origin.seen.hits());
    assert_eq!(
        proxy
            .metric(&requests_series(
                BLOCKED_PYTHON,
                "denied",
                "domain_not_allowed",
                ""
            ))
            .await,
        1.0
    );
}

// ---------------------------------------------------------------------------------------------
// WebSocket sessions held for a minute
// ---------------------------------------------------------------------------------------------

/// Counts from one WebSocket session.
#[derive(Debug, Default)]
struct Session {
    sent: u64,
    echoed: u64,
    ticks: u64,
}

/// tokio-tungstenite over a CONNECT tunnel: CONNECT, TLS with the gateway's name, WebSocket
/// upgrade; then a message every 500 ms for `SESSION`, every echo checked, ticks counted.
async fn rust_session(proxy: std::net::SocketAddr, url: &str) -> Session {
    let (reply, tunnel) = support::connect(proxy, &format!("{GATEWAY}:443")).await;
    assert_eq!(reply.status, 200, "{reply:?}");
    let tls = tls::ca().connect(GATEWAY, tunnel).await;
    let (ws, response) = tokio_tungstenite::client_async(url, tls)
        .await
        .expect("WebSocket upgrade through the tunnel");
    assert_eq!(response.status(), 101);
    let (mut tx, mut rx) = ws.split();
    let mut session = Session::default();
    let end = tokio::time::Instant::now() + SESSION;
    let mut every = tokio::time::interval(Duration::from_millis(500));
    // Send until the minute is up, then wait for the last echoes.
    while tokio::time::Instant::now() < end || session.echoed < session.sent {
        tokio::select! {
            _ = every.tick(), if tokio::time::Instant::now() < end => {
                tx.send(Message::text(format!("rs {}", session.sent))).await.unwrap();
                session.sent += 1;
            }
            _ = tokio::time::sleep_until(end), if tokio::time::Instant::now() < end => {}
            message = tokio::time::timeout(Duration::from_secs(10), rx.next()) => {
                let message = message.expect("a message within 10 s").expect("open").unwrap();
                let text = message.into_text().unwrap();
                if text.starts_with("tick ") {
                    session.ticks += 1;
                } else {
                    assert_eq!(text.as_str(), format!("rs {}", session.echoed));
                    session.echoed += 1;
                }
            }
        }
    }
    tx.send(Message::Close(None)).await.unwrap();
    session
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_sessions_hold_for_a_minute_both_ways() {
    let python = have_python("websockets").await;
    let (proxy, origin) = proxy_and_origin("127.0.0.85", &[GATEWAY]).await;
    let (_dir, ca) = scratch();
    let url = format!("wss://{GATEWAY}/ws?tick_ms=1000");
    let started = Instant::now();

    // Python `websockets` connects through the proxy itself (`proxy=`).
    let python_session = python.then(|| {
        client("python3")
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser/ws_session.py"))
            .arg(&url)
            .arg(format!("http://{}", proxy.addr))
            .arg(&ca)
            .arg(SESSION.as_secs().to_string())
            .output()
    });
    let python_session = tokio::spawn(async move {
        match python_session {
            Some(output) => Some(output.await.unwrap()),
            None => None,
        }
    });
    let rust_session = tokio::spawn({
        let url = url.clone();
        let addr = proxy.addr;
        async move { rust_session(addr, &url).await }
    });

    // Halfway: both tunnels are open, and the byte counters have moved both ways already.
    let tunnels = 1.0 + f64::from(u8::from(python));
    tokio::time::sleep(SESSION / 2).await;
    let gauge = support::active_series(GATEWAY);
    let metrics = proxy.metrics().await;
    assert_eq!(metric_value(&metrics, &gauge), tunnels, "{metrics}");
    let up_half = metric_value(&metrics, &bytes_series(GATEWAY, "upstream"));
    let down_half = metric_value(&metrics, &bytes_series(GATEWAY, "downstream"));
    assert!(up_half > 0.0 && down_half > 0.0, "{metrics}");

    let rust = rust_session.await.unwrap();
    let expected = SESSION.as_millis() as u64 / 500;
    assert!(rust.sent >= expected, "{rust:?}");
    assert_eq!(rust.echoed, rust.sent, "{rust:?}");
    assert!(rust.ticks >= SESSION.as_secs() - 2, "{rust:?}");

    if let Some(output) = python_session.await.unwrap() {
        assert!(output.status.success(), "{}", show(&output));
        let py: Value = serde_json::from_slice(&output.stdout)
            .unwrap_or_else(|e| panic!("{e}: {}", show(&output)));
        assert!(py["sent"].as_u64().unwrap() >= expected, "{py}");
        assert_eq!(py["echoed"], py["sent"], "{py}");
        assert!(
            py["ticks"].as_u64().unwrap() >= SESSION.as_secs() - 2,
            "{py}"
        );
    }
    assert!(started.elapsed() >= SESSION);

    // The counters kept moving in the second half, both ways.
    let metrics = proxy.metrics().await;
    assert!(metric_value(&metrics, &bytes_series(GATEWAY, "upstream")) > up_half);
    assert!(metric_value(&metrics, &bytes_series(GATEWAY, "downstream")) > down_half);
    assert_eq!(
        metric_value(
            &metrics,
            &requests_series(GATEWAY, "allowed", "", "appstream-gateway")
        ),
        tunnels
    );
    // Every session reached the origin under the gateway's own name.
    let hits = origin.seen.hits();
    assert_eq!(hits.len() as f64, tunnels, "{hits:?}");
    for hit in &hits {
        assert_eq!(hit.sni.as_deref(), Some(GATEWAY), "{hit:?}");
    }

    // Each tunnel closes in the access log having lasted the minute.
    let closed = || {
        access_log(GATEWAY, Some("127.0.0.85"))
            .into_iter()
            .filter(|e| e["event"] == "tunnel_closed")
            .collect::<Vec<_>>()
    };
    support::eventually(Duration::from_secs(10), || {
        let n = closed().len() as f64;
        async move { n == tunnels }
    })
    .await;
    let closed = closed();
    assert_eq!(closed.len() as f64, tunnels, "{closed:?}");
    for event in &closed {
        assert!(
            event["duration_ms"].as_u64().unwrap() >= SESSION.as_millis() as u64,
            "{event}"
        );
        assert!(event["bytes_upstream"].as_u64().unwrap() > 0, "{event}");
        assert!(event["bytes_downstream"].as_u64().unwrap() > 0, "{event}");
    }
}
