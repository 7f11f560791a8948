//! Test harness: a real proxy, real origins and a real DNS server, all on loopback.
//!
//! Every test binary first calls [`isolate`] (through [`start`]), which re-executes the binary
//! inside a fresh network namespace that has nothing but loopback. The names tests use are real
//! AWS names; even a proxy bug that reached for the system resolver, or a destination check
//! that let 10.x through, cannot send a packet off this machine.
#![allow(dead_code)]

pub mod binary;
pub mod dns;
pub mod tls;
pub mod web;

use std::net::{IpAddr, SocketAddr};
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::sync::Once;
use std::time::Duration;

use portcullis::{Config, Listeners, Proxy};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

#[allow(unused_imports)]
pub use dns::{DnsMode, TestDns};

/// Set in the re-executed child so it does not re-execute again.
const NETNS_MARK: &str = "PORTCULLIS_TEST_NETNS";

/// Makes sure this process runs in a loopback-only network namespace; re-executes it under
/// `unshare -rn` if not. Refuses to run the tests at all if that is impossible.
pub fn isolate() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if only_loopback() {
            return;
        }
        assert!(
            std::env::var_os(NETNS_MARK).is_none(),
            "re-executed under unshare but still not isolated; refusing to run"
        );
        let exe = std::env::current_exe().expect("the test binary has a path");
        let error = Command::new("unshare")
            .args(["-rn", "sh", "-c", "ip link set lo up && exec \"$0\" \"$@\""])
            .arg(exe)
            .args(std::env::args_os().skip(1))
            .env(NETNS_MARK, "1")
            .exec();
        panic!("cannot isolate the tests in a network namespace (unshare -rn): {error}");
    });
}

/// True when the only network interface is `lo`, and it is up.
fn only_loopback() -> bool {
    let Ok(dev) = std::fs::read_to_string("/proc/net/dev") else {
        return false;
    };
    let interfaces: Vec<&str> = dev
        .lines()
        .skip(2)
        .filter_map(|line| line.split(':').next())
        .map(str::trim)
        .collect();
    interfaces == ["lo"] && std::net::TcpListener::bind("127.0.0.1:0").is_ok()
}

/// Knobs for the config a test proxy runs with. Rules are the embedded AppStream profile's.
#[derive(Clone)]
pub struct Setup {
    pub max_connections: usize,
    pub header_timeout: &'static str,
    pub connect_timeout: &'static str,
    pub idle_timeout: &'static str,
    pub drain_timeout: &'static str,
    pub cache_size: u64,
    /// `[destinations] allow`; loopback by default so origins on 127.0.0.1 are reachable.
    pub destinations_allow: Vec<&'static str>,
    pub clients_allow: Vec<&'static str>,
    pub max_domains: usize,
    /// More `[metrics]` keys, as TOML lines.
    pub metrics: String,
    /// `[dns] hosts` entries as TOML inline-table body, e.g. `"a.b" = ["127.0.0.1"]`.
    pub dns_hosts: String,
    /// Extra `[[rule]]` tables appended after the default profile's.
    pub extra_rules: String,
    /// `[clients] max_tunnels_per_client`.
    pub max_tunnels_per_client: usize,
    /// `[auth] users_file`, when set.
    pub users_file: Option<String>,
    /// `[[proxy.tls]]` tables (their `listen` is replaced by a port-0 bind of the harness).
    pub proxy_tls: String,
    /// `[clients] allow_cert_names`.
    pub allow_cert_names: Vec<&'static str>,
    /// `sni` for every rule. Off by default: most tests relay plain bytes through echo
    /// origins; the SNI tests turn it on.
    pub sni: &'static str,
    /// `[proxy] workers` (0: one per core).
    pub workers: usize,
    /// Bind the proxy listener without `SO_REUSEPORT`, so workers share one socket.
    pub shared_listener: bool,
    /// `[proxy_protocol] trusted`.
    pub proxy_protocol_trusted: Vec<&'static str>,
    /// `[proxy] tcp_keepalive`.
    pub tcp_keepalive: &'static str,
}

impl Default for Setup {
    fn default() -> Setup {
        Setup {
            max_connections: 1000,
            header_timeout: "5s",
            connect_timeout: "3s",
            idle_timeout: "30m",
            drain_timeout: "5s",
            cache_size: 4096,
            destinations_allow: vec!["127.0.0.0/8", "::1/128"],
            clients_allow: vec!["0.0.0.0/0", "::/0"],
            max_domains: 1000,
            metrics: String::new(),
            dns_hosts: String::new(),
            extra_rules: String::new(),
            max_tunnels_per_client: 0,
            users_file: None,
            sni: "off",
            proxy_tls: String::new(),
            allow_cert_names: Vec::new(),
            workers: 0,
            shared_listener: false,
            proxy_protocol_trusted: Vec::new(),
            tcp_keepalive: "60s",
        }
    }
}

impl Setup {
    pub fn to_toml(&self, dns: SocketAddr) -> String {
        let list = |items: &[&str]| {
            items
                .iter()
                .map(|i| format!("{i:?}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let rules_start = portcullis::config::DEFAULT_CONFIG
            .find("[[rule]]")
            .expect("the default config has rules");
        format!(
            "[proxy]\nlisten = [\"127.0.0.1:0\"]\nmax_connections = {}\nheader_timeout = {:?}\n\
             connect_timeout = {:?}\nidle_timeout = {:?}\ndrain_timeout = {:?}\nworkers = {}\n\
             tcp_keepalive = {:?}\n\n{}\n[proxy_protocol]\ntrusted = [{}]\n\n[admin]\nlisten = \"127.0.0.1:0\"\nadvertise = \"proxy.test:3128\"\n\n\
             [dns]\nservers = [\"{dns}\"]\ncache_size = {}\nhosts = {{ {} }}\n\n\
             [clients]\nallow = [{}]\nallow_cert_names = [{}]\nmax_tunnels_per_client = {}\n\n{}\
             [destinations]\nallow = [{}]\n\n[metrics]\nmax_domains = {}\n{}\n{}\n{}\n",
            self.max_connections,
            self.header_timeout,
            self.connect_timeout,
            self.idle_timeout,
            self.drain_timeout,
            self.workers,
            self.tcp_keepalive,
            self.proxy_tls,
            list(&self.proxy_protocol_trusted),
            self.cache_size,
            self.dns_hosts,
            list(&self.clients_allow),
            list(&self.allow_cert_names),
            self.max_tunnels_per_client,
            self.users_file
                .as_ref()
                .map_or(String::new(), |f| format!("[auth]\nusers_file = {f:?}\n\n")),
            list(&self.destinations_allow),
            self.max_domains,
            self.metrics,
            &portcullis::config::DEFAULT_CONFIG[rules_start..],
            self.extra_rules,
        )
        .lines()
        // The profile's own `sni` settings give way to the test's.
        .filter(|line| !line.starts_with("sni = "))
        .map(|line| {
            if line.starts_with("[[rule]]") {
                format!("[[rule]]\nsni = {:?}\n", self.sni)
            } else {
                format!("{line}\n")
            }
        })
        .collect()
    }
}

/// A proxy serving on loopback, with its own DNS server.
pub struct TestProxy {
    pub addr: SocketAddr,
    /// One per `[[proxy.tls]]` table, in order.
    pub tls_addrs: Vec<SocketAddr>,
    pub admin: SocketAddr,
    pub dns: TestDns,
    pub proxy: Proxy,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

/// A `[[rule]]` named `t` admitting `host` on the port `origin` listens on.
pub fn rule_for(host: &str, origin: &Origin) -> String {
    format!(
        "[[rule]]\nname = \"t\"\ndomains = [{host:?}]\nports = [\"{}\"]\n",
        origin.addr.port()
    )
}

/// [`start`], with `host` answered by the test DNS server as 127.0.0.1.
pub async fn start_answering(setup: Setup, host: &str) -> TestProxy {
    let proxy = start(setup).await;
    proxy.dns.set(host, &["127.0.0.1".parse().unwrap()], 60);
    proxy
}

/// Starts a DNS server and a proxy pointed at it.
pub async fn start(setup: Setup) -> TestProxy {
    isolate();
    let dns = TestDns::start().await;
    let text = setup.to_toml(dns.addr);
    let config = Config::parse(&text, "test.toml").unwrap_or_else(|e| panic!("{e}\n{text}"));
    let loopback = "127.0.0.1:0".parse().unwrap();
    let proxy_listener = if setup.shared_listener {
        TcpListener::bind(loopback).await.unwrap()
    } else {
        TcpListener::from_std(portcullis::workers::bind(loopback).unwrap()).unwrap()
    };
    let listeners = Listeners {
        proxy: vec![proxy_listener],
        tls: tls_listeners(&config).await,
        admin: Some(TcpListener::bind("127.0.0.1:0").await.unwrap()),
        siblings: Vec::new(),
    };
    let addr = listeners.proxy[0].local_addr().unwrap();
    let tls_addrs = listeners
        .tls
        .iter()
        .map(|l| l.local_addr().unwrap())
        .collect();
    let admin = listeners.admin.as_ref().unwrap().local_addr().unwrap();
    let proxy = Proxy::new(config).expect("proxy starts");
    let (tx, rx) = oneshot::channel();
    let runner = proxy.clone();
    let task = tokio::spawn(async move {
        runner
            .run(listeners, async {
                let _ = rx.await;
            })
            .await;
    });
    TestProxy {
        addr,
        tls_addrs,
        admin,
        dns,
        proxy,
        shutdown: Some(tx),
        task: Some(task),
    }
}

/// A port-0 listener on loopback for each `[[proxy.tls]]` table.
async fn tls_listeners(config: &Config) -> Vec<TcpListener> {
    let mut listeners = Vec::new();
    for _ in &config.proxy.tls {
        listeners.push(TcpListener::bind("127.0.0.1:0").await.unwrap());
    }
    listeners
}

impl TestProxy {
    /// Drops the proxy's `run` future without a drain, as a shut-down runtime would.
    pub fn abort(&mut self) {
        self.task.take().expect("stopped once").abort();
    }

    /// Starts the drain and returns the task that finishes when the proxy has stopped.
    pub fn shut_down(&mut self) -> JoinHandle<()> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        self.task.take().expect("shut down once")
    }

    /// `GET path` on the admin listener: (status, body).
    pub async fn admin_get(&self, path: &str) -> (u16, String) {
        http_get(self.admin, path).await
    }

    pub async fn metrics(&self) -> String {
        self.admin_get("/metrics").await.1
    }

    /// The value of one sample line, e.g. `portcullis_tunnels_active{domain="a.b"}`; 0 if absent.
    pub async fn metric(&self, series: &str) -> f64 {
        metric_value(&self.metrics().await, series)
    }

    /// Waits up to 3 s until `domain`'s `tunnels_active` reads `value` (tunnels end, and
    /// give their gauge back, a moment after their last byte).
    pub async fn await_active(&self, domain: &str, value: f64) {
        self.await_metric(&active_series(domain), value, Duration::from_secs(3))
            .await;
    }

    /// Waits until `series` reads `value`; fails the test, with the last value seen, if it
    /// does not within `within`.
    pub async fn await_metric(&self, series: &str, value: f64, within: Duration) {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let seen = self.metric(series).await;
            if seen == value {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{series} stayed at {seen}, not {value}, for {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// The `tunnels_active` series of one domain label.
pub fn active_series(domain: &str) -> String {
    format!("portcullis_tunnels_active{{domain=\"{domain}\"}}")
}

pub fn metric_value(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|line| {
            let (name, value) = line.rsplit_once(' ')?;
            (name == series).then(|| value.parse().ok()).flatten()
        })
        .unwrap_or(0.0)
}

/// A minimal HTTP/1.0 GET.
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: admin\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await.unwrap();
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text[9..12].parse().unwrap();
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// The proxy's reply to a request head.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    /// Lowercased header names.
    pub headers: Vec<(String, String)>,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The `error=` part of `Proxy-Status`.
    pub fn reason(&self) -> Option<&str> {
        self.header("proxy-status")?.split("error=").nth(1)
    }
}

/// Sends raw bytes as a request head and reads the reply head, byte by byte so nothing that
/// follows the head is consumed.
pub async fn request(proxy: SocketAddr, raw: &[u8]) -> (Reply, TcpStream) {
    let mut stream = TcpStream::connect(proxy).await.unwrap();
    stream.write_all(raw).await.unwrap();
    let reply = read_reply(&mut stream).await;
    (reply, stream)
}

pub async fn read_reply(stream: &mut TcpStream) -> Reply {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(20), stream.read(&mut byte))
            .await
            .expect("reply within 20 s")
            .unwrap();
        assert!(
            n == 1,
            "connection closed mid-head: {:?}",
            String::from_utf8_lossy(&head)
        );
        head.push(byte[0]);
    }
    let text = String::from_utf8(head).unwrap();
    let mut lines = text.split("\r\n");
    let status = lines.next().unwrap()[9..12].parse().unwrap();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Reply { status, headers }
}

/// `CONNECT authority HTTP/1.1`.
pub async fn connect(proxy: SocketAddr, authority: &str) -> (Reply, TcpStream) {
    let head = format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n");
    request(proxy, head.as_bytes()).await
}

/// An origin that echoes every byte back and passes a half-close on.
pub struct Origin {
    pub addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Drop for Origin {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Origin {
    /// An echo origin on `ip`, port `port` (0 for any).
    pub async fn echo_on(ip: &str, port: u16) -> Origin {
        let listener = TcpListener::bind((ip.parse::<IpAddr>().unwrap(), port))
            .await
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = stream.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                    let _ = w.shutdown().await;
                });
            }
        });
        Origin { addr, task }
    }

    pub async fn echo() -> Origin {
        Origin::echo_on("127.0.0.1", 0).await
    }
}

/// Writes `data` through `stream` and expects it echoed back.
pub async fn assert_echo(stream: &mut TcpStream, data: &[u8]) {
    stream.write_all(data).await.unwrap();
    let mut back = vec![0u8; data.len()];
    tokio::time::timeout(Duration::from_secs(10), stream.read_exact(&mut back))
        .await
        .expect("echo within 10 s")
        .unwrap();
    assert_eq!(back, data);
}

/// Polls `check` until it holds or `within` passes.
pub async fn eventually<F, Fut>(within: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if check().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Whether an external tool the test drives is here. Missing, it fails the test under
/// `PORTCULLIS_REQUIRE_TOOLS=1` (as CI runs, after installing it), else the test is skipped.
pub fn have_tool(what: &str, command: &[&str]) -> bool {
    let ok = Command::new(command[0])
        .args(&command[1..])
        .output()
        .is_ok_and(|o| o.status.success());
    if ok {
        return true;
    }
    let required = std::env::var("PORTCULLIS_REQUIRE_TOOLS").is_ok_and(|v| v == "1");
    assert!(
        !required,
        "{what} is missing ({command:?} failed) and PORTCULLIS_REQUIRE_TOOLS=1: run .ci/client-tools or .ci/observability-checks"
    );
    skipped(&format!("{what} is missing ({command:?} failed)"));
    false
}

/// Says a test was skipped where it is seen: straight to the process's stderr (libtest
/// captures `eprintln!` of passing tests, and a skip nobody sees is no message), and into
/// `target/test-skips.txt`, which `tests/zz_skipped.rs`, the last test binary of a run,
/// sums up and clears.
pub fn skipped(why: &str) {
    use std::io::Write;
    let test = std::thread::current()
        .name()
        .unwrap_or("a test")
        .to_string();
    let line = format!("SKIPPED {test}: {why}");
    let _ = writeln!(std::io::stderr(), "{line}");
    let list = skips_file();
    let _ = std::fs::create_dir_all(list.parent().unwrap());
    if let Ok(mut file) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&list)
    {
        let exe = std::env::current_exe().ok();
        let binary = exe
            .as_ref()
            .and_then(|e| e.file_stem())
            .map_or(String::new(), |s| {
                s.to_string_lossy()
                    .split('-')
                    .next()
                    .unwrap_or_default()
                    .to_string()
            });
        let _ = writeln!(file, "{binary}::{line}");
    }
}

/// Where skips are listed until the summary reads them.
pub fn skips_file() -> std::path::PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target"));
    target.join("test-skips.txt")
}
