//! The operator-facing side of the admin endpoints, checked with the real tools rather than with
//! our own reading of the formats:
//!
//! - `/metrics` passes `promtool check metrics` once tunnels and refusals have happened;
//! - a real Prometheus scrapes it (and loads `deploy/prometheus/alerts.yml`), and what it stores
//!   equals what the proxy says;
//! - `/proxy.pac` evaluated by pacparser (a real PAC engine) sends exactly the hosts the proxy
//!   admits through the proxy;
//! - every metric name the dashboard and the alerts use is one the proxy exports.
//!
//! The tools are Debian's `prometheus` (with `promtool`) and `python3-pacparser`
//! (`.ci/observability-checks` installs them). A developer without them gets a skip message; with
//! `PORTCULLIS_REQUIRE_TOOLS=1` (as CI runs) a missing tool fails the test.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use support::{Origin, Setup, TestProxy, connect, start};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};

const REQUIRE_TOOLS: &str = "PORTCULLIS_REQUIRE_TOOLS";

/// The domain the test traffic goes to, through an extra rule on the echo origin's port.
const DOMAIN: &str = "scrape.example.test";
/// A `private_endpoint` rule's domain, so the uncached DNS path has lookups too.
const ENDPOINT_DOMAIN: &str = "vpce.example.test";

// ---------------------------------------------------------------------------------------------
// Tools

/// What to do about a missing tool: `None` with a skip message, or a panic when CI requires it.
fn missing<T>(test: &str, what: &str) -> Option<T> {
    if std::env::var(REQUIRE_TOOLS).as_deref() == Ok("1") {
        panic!("{test}: {what}; {REQUIRE_TOOLS}=1 requires it (run .ci/observability-checks)");
    }
    support::skipped(&format!(
        "{test}: {what} (run .ci/observability-checks to install it; \
         {REQUIRE_TOOLS}=1 turns this skip into a failure)"
    ));
    None
}

/// `name` on `PATH`.
fn on_path(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(name))
        .find(|path| {
            use std::os::unix::fs::PermissionsExt;
            path.metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

fn require_tool(test: &str, name: &str, package: &str) -> Option<PathBuf> {
    on_path(name).or_else(|| {
        missing(
            test,
            &format!("`{name}` is not on PATH (Debian package {package})"),
        )
    })
}

/// A Python that can `import pacparser`: Debian's python3-pacparser goes with /usr/bin/python3,
/// which need not be the `python3` first on PATH.
fn pacparser_python(test: &str) -> Option<PathBuf> {
    let candidates = [Some(PathBuf::from("/usr/bin/python3")), on_path("python3")];
    candidates
        .into_iter()
        .flatten()
        .find(|python| {
            std::process::Command::new(python)
                .args(["-c", "import pacparser"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        })
        .or_else(|| {
            missing(
                test,
                "no python3 can `import pacparser` (Debian package python3-pacparser)",
            )
        })
}

/// Runs a command to completion within `within`, feeding `stdin`: (success, stdout + stderr).
async fn run(command: &mut Command, stdin: &[u8], within: Duration) -> (bool, String) {
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("the tool starts");
    let mut input = child.stdin.take().unwrap();
    let stdin = stdin.to_vec();
    let feeder = tokio::spawn(async move {
        let _ = input.write_all(&stdin).await;
    });
    let output = tokio::time::timeout(within, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("{command:?} did not finish within {within:?}"))
        .expect("the tool runs");
    feeder.await.unwrap();
    let mut text = String::from_utf8_lossy(&output.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&output.stderr));
    (output.status.success(), text)
}

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(what: &str) -> TempDir {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let path =
            std::env::temp_dir().join(format!("portcullis-{what}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

// ---------------------------------------------------------------------------------------------
// Traffic

fn lo() -> Vec<IpAddr> {
    vec!["127.0.0.1".parse().unwrap()]
}

/// Two extra rules on the echo origin's port: an ordinary one and a `private_endpoint` one;
/// and an ip-ranges file, so its gauges are exported too.
fn scrape_setup(origin: &Origin) -> Setup {
    let port = origin.addr.port();
    let ranges = std::fs::canonicalize("tests/fixtures/ip-ranges.json").unwrap();
    Setup {
        extra_rules: format!(
            "[[rule]]\nname = \"scrape\"\ndomains = [\"{DOMAIN}\"]\nports = [\"{port}\"]\n\n\
             [[rule]]\nname = \"scrape-endpoint\"\ndomains = [\"{ENDPOINT_DOMAIN}\"]\n\
             ports = [\"{port}\"]\nprivate_endpoint = true\n\n[aws_ip_ranges]\nfile = {:?}\n",
            ranges.to_str().unwrap()
        ),
        ..Setup::default()
    }
}

/// A proxy with [`scrape_setup`]'s rules, and the echo origin they lead to.
async fn proxy_with_origin() -> (TestProxy, Origin) {
    let origin = Origin::echo().await;
    let proxy = start(scrape_setup(&origin)).await;
    proxy.dns.set(DOMAIN, &lo(), 60);
    proxy.dns.set(ENDPOINT_DOMAIN, &lo(), 60);
    (proxy, origin)
}

/// Opens a tunnel to `host`, sends `size` bytes, reads them echoed, and closes both ways.
async fn tunnel(proxy: &TestProxy, origin: &Origin, host: &str, size: usize) {
    let (reply, mut stream) = connect(proxy.addr, &format!("{host}:{}", origin.addr.port())).await;
    assert_eq!(reply.status, 200, "{host}: {reply:?}");
    let data: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
    let (mut r, mut w) = stream.split();
    let write = async {
        w.write_all(&data).await.unwrap();
        w.shutdown().await.unwrap();
    };
    let mut back = Vec::with_capacity(size);
    let read = tokio::time::timeout(Duration::from_secs(10), r.read_to_end(&mut back));
    let ((), read) = tokio::join!(write, read);
    read.expect("the echo ends within 10 s").unwrap();
    assert_eq!(back.len(), size, "{host}: echoed bytes");
}

/// A request that the proxy must refuse with `reason`.
async fn refused(proxy: &TestProxy, authority: &str, reason: &str) {
    let (reply, _stream) = connect(proxy.addr, authority).await;
    assert_eq!(reply.reason(), Some(reason), "{authority}: {reply:?}");
}

/// What [`drive`] did, in the proxy's metric terms.
struct Traffic {
    /// Bytes each way through closed tunnels to [`DOMAIN`].
    bytes: u64,
    tunnels: u64,
}

const SIZES: [usize; 3] = [1000, 2345, 70_000];

/// Closed tunnels of known sizes on both DNS paths, and refusals of several kinds, so that
/// histograms and labelled series exist. Returns once the proxy's counters have settled.
async fn drive(proxy: &TestProxy, origin: &Origin) -> Traffic {
    for size in SIZES {
        tunnel(proxy, origin, DOMAIN, size).await;
    }
    tunnel(proxy, origin, ENDPOINT_DOMAIN, 10).await;
    refused(proxy, "example.com:443", "domain_not_allowed").await;
    refused(proxy, "gw1.amazonappstream.com:22", "port_not_allowed").await;
    refused(proxy, "127.0.0.1:443", "ip_literal").await;
    refused(proxy, "missing.amazonappstream.com:443", "dns_nxdomain").await;
    let traffic = Traffic {
        bytes: SIZES.iter().sum::<usize>() as u64,
        tunnels: SIZES.len() as u64,
    };
    let settled = support::eventually(Duration::from_secs(10), || async {
        let text = proxy.metrics().await;
        let value = |series: &str| support::metric_value(&text, series);
        value(&format!(
            "portcullis_tunnel_bytes_total{{direction=\"upstream\",domain=\"{DOMAIN}\"}}"
        )) == traffic.bytes as f64
            && value(&format!(
                "portcullis_tunnel_bytes_total{{direction=\"downstream\",domain=\"{DOMAIN}\"}}"
            )) == traffic.bytes as f64
            && value(&support::active_series(DOMAIN)) == 0.0
            && value("portcullis_tunnel_duration_seconds_count{rule=\"scrape\"}")
                == traffic.tunnels as f64
    })
    .await;
    assert!(
        settled,
        "the proxy's counters never matched the traffic:\n{}",
        proxy.metrics().await
    );
    traffic
}

// ---------------------------------------------------------------------------------------------
// The Prometheus text format, and the Prometheus HTTP API's JSON

/// One sample of the text exposition.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// The samples of a text exposition (comments skipped).
fn parse_exposition(text: &str) -> Vec<Sample> {
    text.lines()
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .map(|line| {
            let (series, value) = line
                .rsplit_once(' ')
                .unwrap_or_else(|| panic!("no value: {line:?}"));
            let value: f64 = value
                .parse()
                .unwrap_or_else(|_| panic!("bad value: {line:?}"));
            let (name, labels) = match series.split_once('{') {
                None => (series, BTreeMap::new()),
                Some((name, rest)) => (name, parse_labels(rest.strip_suffix('}').unwrap(), line)),
            };
            Sample {
                name: name.to_string(),
                labels,
                value,
            }
        })
        .collect()
}

/// `a="x",b="y\"z"` into a map.
fn parse_labels(mut text: &str, line: &str) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::new();
    while !text.is_empty() {
        let (name, rest) = text
            .split_once("=\"")
            .unwrap_or_else(|| panic!("bad labels: {line:?}"));
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let end = loop {
            match chars.next() {
                Some((_, '\\')) => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, c)) => value.push(c),
                    None => panic!("bad escape: {line:?}"),
                },
                Some((i, '"')) => break i,
                Some((_, c)) => value.push(c),
                None => panic!("unterminated label value: {line:?}"),
            }
        };
        labels.insert(name.trim_start_matches(',').to_string(), value);
        text = rest[end + 1..].trim_start_matches(',');
    }
    labels
}

/// A JSON value; enough of JSON for the Prometheus API's answers.
#[derive(Debug, Clone, PartialEq)]
enum Json {
    Null,
    Bool(bool),
    Number(f64),
    Str(String),
    Array(Vec<Json>),
    Object(Vec<(String, Json)>),
}

impl Json {
    fn parse(text: &str) -> Json {
        let mut parser = JsonParser {
            bytes: text.as_bytes(),
            at: 0,
        };
        let value = parser.value();
        parser.space();
        assert_eq!(parser.at, text.len(), "trailing text after JSON: {text}");
        value
    }

    fn get(&self, key: &str) -> &Json {
        match self {
            Json::Object(fields) => fields
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v)
                .unwrap_or(&Json::Null),
            _ => &Json::Null,
        }
    }

    fn str(&self) -> &str {
        match self {
            Json::Str(s) => s,
            other => panic!("not a string: {other:?}"),
        }
    }

    fn array(&self) -> &[Json] {
        match self {
            Json::Array(items) => items,
            other => panic!("not an array: {other:?}"),
        }
    }

    fn object(&self) -> &[(String, Json)] {
        match self {
            Json::Object(fields) => fields,
            other => panic!("not an object: {other:?}"),
        }
    }
}

struct JsonParser<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl JsonParser<'_> {
    fn space(&mut self) {
        while self
            .bytes
            .get(self.at)
            .is_some_and(|b| b.is_ascii_whitespace())
        {
            self.at += 1;
        }
    }

    fn eat(&mut self, byte: u8) {
        self.space();
        assert_eq!(
            self.bytes.get(self.at),
            Some(&byte),
            "JSON: expected {:?} at {}",
            byte as char,
            self.at
        );
        self.at += 1;
    }

    fn peek(&mut self) -> u8 {
        self.space();
        *self.bytes.get(self.at).expect("JSON ended early")
    }

    fn value(&mut self) -> Json {
        match self.peek() {
            b'{' => {
                self.eat(b'{');
                let mut fields = Vec::new();
                if self.peek() == b'}' {
                    self.at += 1;
                    return Json::Object(fields);
                }
                loop {
                    let key = self.string();
                    self.eat(b':');
                    fields.push((key, self.value()));
                    match self.peek() {
                        b',' => self.at += 1,
                        b'}' => {
                            self.at += 1;
                            return Json::Object(fields);
                        }
                        other => panic!("JSON: unexpected {:?} in object", other as char),
                    }
                }
            }
            b'[' => {
                self.eat(b'[');
                let mut items = Vec::new();
                if self.peek() == b']' {
                    self.at += 1;
                    return Json::Array(items);
                }
                loop {
                    items.push(self.value());
                    match self.peek() {
                        b',' => self.at += 1,
                        b']' => {
                            self.at += 1;
                            return Json::Array(items);
                        }
                        other => panic!("JSON: unexpected {:?} in array", other as char),
                    }
                }
            }
            b'"' => Json::Str(self.string()),
            b't' => self.word("true", Json::Bool(true)),
            b'f' => self.word("false", Json::Bool(false)),
            b'n' => self.word("null", Json::Null),
            _ => {
                let start = self.at;
                while self
                    .bytes
                    .get(self.at)
                    .is_some_and(|b| b"+-.eE0123456789".contains(b))
                {
                    self.at += 1;
                }
                let text = std::str::from_utf8(&self.bytes[start..self.at]).unwrap();
                Json::Number(
                    text.parse()
                        .unwrap_or_else(|_| panic!("JSON: bad number {text:?}")),
                )
            }
        }
    }

    fn word(&mut self, word: &str, value: Json) -> Json {
        assert!(
            self.bytes[self.at..].starts_with(word.as_bytes()),
            "JSON: bad literal at {}",
            self.at
        );
        self.at += word.len();
        value
    }

    fn string(&mut self) -> String {
        self.eat(b'"');
        let mut out = Vec::new();
        loop {
            let byte = *self.bytes.get(self.at).expect("JSON: unterminated string");
            self.at += 1;
            match byte {
                b'"' => return String::from_utf8(out).expect("JSON strings are UTF-8"),
                b'\\' => {
                    let escape = self.bytes[self.at];
                    self.at += 1;
                    let c = match escape {
                        b'n' => '\n',
                        b't' => '\t',
                        b'r' => '\r',
                        b'b' => '\u{8}',
                        b'f' => '\u{c}',
                        b'u' => {
                            let hex =
                                std::str::from_utf8(&self.bytes[self.at..self.at + 4]).unwrap();
                            self.at += 4;
                            char::from_u32(u32::from_str_radix(hex, 16).unwrap())
                                .unwrap_or('\u{fffd}')
                        }
                        other => other as char,
                    };
                    out.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes());
                }
                other => out.push(other),
            }
        }
    }
}

/// Labels as Prometheus stores them: an empty label value is the same as no label.
fn stored(labels: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    labels
        .iter()
        .filter(|(_, v)| !v.is_empty())
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

type Series = BTreeMap<BTreeMap<String, String>, f64>;

/// The proxy's own samples of `name`, labelled as Prometheus would store them.
fn proxy_series(exposition: &str, name: &str) -> Series {
    parse_exposition(exposition)
        .into_iter()
        .filter(|s| s.name == name)
        .map(|s| (stored(&s.labels), s.value))
        .collect()
}

/// Percent-encodes a query parameter.
fn url_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// `GET path` that tolerates a server not listening yet: `None` until it answers.
async fn try_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    tokio::time::timeout(Duration::from_secs(5), async {
        let mut stream = TcpStream::connect(addr).await.ok()?;
        stream
            .write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
            .await
            .ok()?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await.ok()?;
        let text = String::from_utf8_lossy(&raw).into_owned();
        let status = text.get(9..12)?.parse().ok()?;
        let body = text.split_once("\r\n\r\n")?.1.to_string();
        Some((status, body))
    })
    .await
    .ok()
    .flatten()
}

/// A running Prometheus, killed on drop.
struct Prometheus {
    child: Child,
    web: SocketAddr,
    log: PathBuf,
}

impl Prometheus {
    /// Instant query: the result series keyed by labels without `__name__`, `job`, `instance`,
    /// after checking that `job` and `instance` are the expected ones.
    async fn query(&self, expr: &str, instance: &str) -> Option<Series> {
        let path = format!("/api/v1/query?query={}", url_encode(expr));
        let (status, body) = try_get(self.web, &path).await?;
        assert_eq!(status, 200, "{expr}: {body}");
        let json = Json::parse(&body);
        assert_eq!(json.get("status"), &Json::Str("success".into()), "{body}");
        let mut series = Series::new();
        for item in json.get("data").get("result").array() {
            let mut labels: BTreeMap<String, String> = item
                .get("metric")
                .object()
                .iter()
                .map(|(k, v)| (k.clone(), v.str().to_string()))
                .collect();
            labels.remove("__name__");
            assert_eq!(
                labels.remove("job").as_deref(),
                Some("portcullis"),
                "{body}"
            );
            assert_eq!(
                labels.remove("instance").as_deref(),
                Some(instance),
                "{body}"
            );
            let value = item.get("value").array()[1].str().parse().unwrap();
            series.insert(labels, value);
        }
        Some(series)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

/// Runs `attempt` every 250 ms until it succeeds or `within` passes; then the last failure.
async fn poll<T, F, Fut>(within: Duration, mut attempt: F) -> Result<T, String>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let failure = match attempt().await {
            Ok(value) => return Ok(value),
            Err(failure) => failure,
        };
        if tokio::time::Instant::now() >= deadline {
            return Err(failure);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn free_port() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

fn deploy_file(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

// ---------------------------------------------------------------------------------------------
// The tests

/// `promtool check metrics` reads the exposition like Prometheus's own linter: format errors,
/// counters without `_total`, non-base units, missing help, histogram shape.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_pass_promtool_check_metrics() {
    const TEST: &str = "metrics_pass_promtool_check_metrics";
    support::isolate();
    let Some(promtool) = require_tool(TEST, "promtool", "prometheus") else {
        return;
    };
    let (proxy, origin) = proxy_with_origin().await;
    drive(&proxy, &origin).await;
    let text = proxy.metrics().await;
    // What the check must see: histograms with buckets, and labelled series of each kind.
    for needle in [
        "portcullis_upstream_connect_seconds_bucket{rule=\"scrape\",le=\"+Inf\"}",
        "portcullis_tunnel_duration_seconds_bucket{rule=\"scrape\",le=\"0.1\"}",
        "reason=\"domain_not_allowed\"",
        "reason=\"dns_nxdomain\"",
        "portcullis_dns_lookups_total{cache=\"bypass\",result=\"ok\"}",
        "process_open_fds ",
    ] {
        assert!(text.contains(needle), "{needle} missing from\n{text}");
    }
    promtool_check_metrics(&promtool, &text).await;

    // `domain_histograms` turned on by a reload: per-rule and per-domain series in one family.
    let mut setup = scrape_setup(&origin);
    setup.metrics = "domain_histograms = true".into();
    let config = portcullis::Config::parse(&setup.to_toml(proxy.dns.addr), "reload.toml");
    proxy
        .proxy
        .reload(config.map_err(|e| e.to_string()))
        .unwrap();
    tunnel(&proxy, &origin, DOMAIN, 10).await;
    let needle = format!(
        "portcullis_upstream_connect_seconds_bucket{{domain=\"{DOMAIN}\",rule=\"scrape\",le=\"+Inf\"}} 1"
    );
    let text = proxy.metrics().await;
    assert!(text.contains(&needle), "{needle} missing from\n{text}");
    promtool_check_metrics(&promtool, &text).await;
}

async fn promtool_check_metrics(promtool: &Path, text: &str) {
    let (ok, output) = run(
        Command::new(promtool).args(["check", "metrics"]),
        text.as_bytes(),
        Duration::from_secs(20),
    )
    .await;
    assert!(
        ok && output.trim().is_empty(),
        "promtool check metrics complains:\n{output}\n--- the exposition ---\n{text}"
    );
}

/// A real Prometheus scrapes the admin port every second, with the alerting rules loaded; what
/// it stores for the request and byte counters and the tunnel gauge equals the proxy's own
/// `/metrics`, and the rules evaluate without errors against the real series.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_what_the_proxy_counts() {
    const TEST: &str = "prometheus_scrapes_what_the_proxy_counts";
    support::isolate();
    let Some(binary) = require_tool(TEST, "prometheus", "prometheus") else {
        return;
    };
    let (proxy, origin) = proxy_with_origin().await;
    let instance = proxy.admin.to_string();

    let dir = TempDir::new("prometheus");
    let web = free_port();
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
             rule_files:\n  - {:?}\n\
             scrape_configs:\n  - job_name: portcullis\n    static_configs:\n      \
             - targets: [\"{instance}\"]\n",
            deploy_file("deploy/prometheus/alerts.yml")
        ),
    )
    .unwrap();
    let log = dir.path().join("prometheus.log");
    let log_file = std::fs::File::create(&log).unwrap();
    // Spawned after `start()`, so it runs inside the test's loopback-only namespace.
    let child = Command::new(&binary)
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("data").display()
        ))
        .arg(format!("--web.listen-address={web}"))
        .stdin(Stdio::null())
        .stdout(log_file.try_clone().unwrap())
        .stderr(log_file)
        .kill_on_drop(true)
        .spawn()
        .expect("prometheus starts");
    let mut prometheus = Prometheus { child, web, log };

    let ready = support::eventually(Duration::from_secs(15), || async {
        matches!(try_get(web, "/-/ready").await, Some((200, _)))
    })
    .await;
    assert!(ready, "prometheus not ready in 15 s:\n{}", prometheus.log());

    // Closed tunnels and refusals, then one tunnel left open for the gauge.
    let traffic = drive(&proxy, &origin).await;
    let (reply, mut open) = connect(proxy.addr, &format!("{DOMAIN}:{}", origin.addr.port())).await;
    assert_eq!(reply.status, 200);
    support::assert_echo(&mut open, b"held open").await;
    let held = 9u64;
    let gauge = support::active_series(DOMAIN);
    proxy
        .await_metric(&gauge, 1.0, Duration::from_secs(5))
        .await;

    // The proxy's side, checked against the traffic first.
    let text = proxy.metrics().await;
    let bytes = proxy_series(&text, "portcullis_tunnel_bytes_total");
    for direction in ["upstream", "downstream"] {
        let key: BTreeMap<String, String> = [("direction", direction), ("domain", DOMAIN)]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        assert_eq!(
            bytes.get(&key).copied(),
            Some((traffic.bytes + held) as f64),
            "{direction} bytes:\n{text}"
        );
    }
    let requests = proxy_series(&text, "portcullis_requests_total");
    let allowed: BTreeMap<String, String> = [
        ("domain", DOMAIN),
        ("outcome", "allowed"),
        ("rule", "scrape"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    assert_eq!(
        requests.get(&allowed).copied(),
        Some((traffic.tunnels + 1) as f64),
        "allowed requests:\n{text}"
    );

    // Prometheus's side: the same series with the same values, once a scrape has happened.
    let names = [
        "portcullis_requests_total",
        "portcullis_tunnel_bytes_total",
        "portcullis_tunnels_active",
        "portcullis_upstream_connect_seconds_count",
    ];
    let matched = poll(Duration::from_secs(15), || async {
        let text = proxy.metrics().await;
        for name in names {
            let want = proxy_series(&text, name);
            let got = prometheus.query(name, &instance).await;
            if got.as_ref() != Some(&want) {
                return Err(format!("{name}\nproxy: {want:#?}\nprometheus: {got:#?}"));
            }
        }
        Ok(())
    })
    .await;
    if let Err(last) = matched {
        panic!(
            "Prometheus's view never matched the proxy's:\n{last}\n--- prometheus log ---\n{}",
            prometheus.log()
        );
    }
    assert_eq!(
        prometheus.query("up", &instance).await,
        Some(Series::from([(BTreeMap::new(), 1.0)]))
    );

    // The alerting rules: all loaded, all evaluated without error against real series, and
    // the recording rule's series carries the scrape's job and instance.
    let defined = std::fs::read_to_string(deploy_file("deploy/prometheus/alerts.yml"))
        .unwrap()
        .lines()
        .filter(|l| {
            let l = l.trim_start();
            l.starts_with("- alert:") || l.starts_with("- record:")
        })
        .count();
    let healthy = poll(Duration::from_secs(10), || async {
        let Some((200, body)) = try_get(web, "/api/v1/rules").await else {
            return Err("no answer from /api/v1/rules".to_string());
        };
        let json = Json::parse(&body);
        let rules: Vec<&Json> = json
            .get("data")
            .get("groups")
            .array()
            .iter()
            .flat_map(|g| g.get("rules").array())
            .collect();
        let seen: String = rules
            .iter()
            .map(|r| {
                format!(
                    "{} {} {:?}\n",
                    r.get("name").str(),
                    r.get("health").str(),
                    r.get("lastError")
                )
            })
            .collect();
        if rules.len() == defined && rules.iter().all(|r| r.get("health").str() == "ok") {
            Ok(())
        } else {
            Err(seen)
        }
    })
    .await;
    if let Err(seen) = healthy {
        panic!(
            "alerts.yml rules not all healthy in Prometheus:\n{seen}\n{}",
            prometheus.log()
        );
    }
    let recorded = support::eventually(Duration::from_secs(10), || async {
        prometheus
            .query("instance:portcullis_requests_denied:rate5m", &instance)
            .await
            .is_some_and(|s| s.len() == 1)
    })
    .await;
    assert!(
        recorded,
        "the recording rule produced no series for the proxy:\n{}",
        prometheus.log()
    );

    drop(open);
    prometheus.child.kill().await.unwrap();
}

/// Hosts and what the PAC file must answer for them: a rule's hosts through the proxy, near
/// misses and everything else direct.
const PAC_CASES: &[(&str, bool)] = &[
    ("gw1.amazonappstream.com", true),
    ("a.b.amazonappstream.com", true),
    ("appstream2.us-east-1.aws.amazon.com", true),
    ("appstream2.euc-sso.eu-west-1.aws.amazon.com", true),
    ("x.streaming.appstream2.us-east-1.on.aws", true),
    (
        "vpce-0abc.streaming.appstream.eu-west-1.vpce.amazonaws.com",
        true,
    ),
    ("SIGNIN.AWS.AMAZON.COM", true),
    ("us-east-1.signin.aws.amazon.com", true),
    ("x.cloudfront.net.", true),
    ("amazonappstream.com", false),
    ("evilamazonappstream.com", false),
    ("amazonappstream.com.evil.net", false),
    ("appstream2.a.b.aws.amazon.com", false),
    ("xsignin.aws.amazon.com", false),
    ("signin.aws.amazon.com.evil.net", false),
    ("cloudfront.net", false),
    ("example.com", false),
    ("52.94.1.1", false),
];

/// pacparser evaluates `/proxy.pac` as a browser would; its answers follow the rules, and agree
/// with what the proxy itself does with a CONNECT to the same host.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pac_file_evaluates_to_the_rules_in_pacparser() {
    const TEST: &str = "pac_file_evaluates_to_the_rules_in_pacparser";
    support::isolate();
    let Some(python) = pacparser_python(TEST) else {
        return;
    };
    let proxy = start(Setup::default()).await;
    let (status, pac) = proxy.admin_get("/proxy.pac").await;
    assert_eq!(status, 200, "{pac}");
    let dir = TempDir::new("pac");
    let pac_path = dir.path().join("proxy.pac");
    std::fs::write(&pac_path, &pac).unwrap();

    const SCRIPT: &str = "import sys, pacparser\n\
        pacparser.init()\n\
        pacparser.parse_pac_file(sys.argv[1])\n\
        for host in sys.argv[2:]:\n\
        \x20   print(host + '\\t' + pacparser.find_proxy('https://' + host + '/', host))\n\
        pacparser.cleanup()\n";
    let (ok, output) = run(
        Command::new(&python)
            .args(["-c", SCRIPT])
            .arg(&pac_path)
            .args(PAC_CASES.iter().map(|(host, _)| host)),
        b"",
        Duration::from_secs(20),
    )
    .await;
    assert!(ok, "pacparser failed:\n{output}\n--- proxy.pac ---\n{pac}");
    let answers: BTreeMap<&str, &str> = output
        .lines()
        .filter_map(|line| line.split_once('\t'))
        .collect();
    let mut wrong = Vec::new();
    for &(host, through_proxy) in PAC_CASES {
        let want = if through_proxy {
            "PROXY proxy.test:3128"
        } else {
            "DIRECT"
        };
        let got = answers.get(host).copied().unwrap_or("<no answer>");
        if got != want {
            wrong.push(format!("{host}: pacparser says {got:?}, want {want:?}"));
        }
        // The proxy's own decision on the same host: a rule matched unless the refusal says
        // otherwise (a matched host fails later, at DNS or connect, in this namespace).
        let (reply, _stream) = connect(proxy.addr, &format!("{host}:443")).await;
        let admitted = !matches!(
            reply.reason(),
            Some("domain_not_allowed" | "ip_literal" | "bad_request")
        );
        if admitted != through_proxy {
            wrong.push(format!(
                "{host}: the proxy answers {} {:?}, but the PAC rule set says {want:?}",
                reply.status,
                reply.reason()
            ));
        }
    }
    assert!(
        wrong.is_empty(),
        "{}\n--- pacparser output ---\n{output}\n--- proxy.pac ---\n{pac}",
        wrong.join("\n")
    );
}

/// Every `portcullis_*` and `process_*` name that the dashboard, the alerts and their tests
/// use is one the proxy exports (a misspelt name parses fine and silently shows nothing).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploy_files_use_only_exported_metric_names() {
    let (proxy, origin) = proxy_with_origin().await;
    drive(&proxy, &origin).await;
    let text = proxy.metrics().await;
    // Sample names (`x_bucket`, `x_count`) and family names (`x`, from `# TYPE x histogram`).
    let exported: BTreeSet<String> =
        parse_exposition(&text)
            .into_iter()
            .map(|s| s.name)
            .chain(text.lines().filter_map(|line| {
                Some(line.strip_prefix("# TYPE ")?.split(' ').next()?.to_string())
            }))
            .collect();
    let mut unknown = Vec::new();
    let mut used = BTreeSet::new();
    for file in [
        "deploy/grafana/portcullis.json",
        "deploy/prometheus/alerts.yml",
        "deploy/prometheus/alerts_test.yml",
    ] {
        let text = std::fs::read_to_string(deploy_file(file)).unwrap();
        let tokens = text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'));
        for token in tokens {
            let metric = ["portcullis_", "process_"]
                .iter()
                .any(|p| token.starts_with(p) && token.len() > p.len());
            // Recording rule names (`level:metric:ops`) contain colons; they are not exported.
            if metric && !token.contains(':') {
                used.insert(token.to_string());
                if !exported.contains(token) {
                    unknown.push(format!("{file}: {token}"));
                }
            }
        }
    }
    assert!(used.len() >= 10, "too few metric names found: {used:?}");
    assert!(
        unknown.is_empty(),
        "names not in /metrics:\n{}\nexported: {exported:?}",
        unknown.join("\n")
    );
}
