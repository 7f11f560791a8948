//! The real binary behind a real HAProxy (Debian's), which speaks the PROXY protocol as AWS
//! NLBs and Kubernetes ingress balancers do: curl goes through HAProxy with `send-proxy` (v1)
//! and `send-proxy-v2`, and the access log names curl's own address, not HAProxy's. HAProxy's
//! own health checks (v2 `LOCAL`) are not logged as clients. The AWS PrivateLink TLV, which
//! HAProxy cannot send, is sent by hand to the same binary.

mod support;

use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use portcullis::net::proxy_protocol::sample::{aws_vpce, v2};
use support::binary::{Running, wait_for};
use support::web::WebOrigin;
use support::{Setup, TestDns, have_tool, read_reply};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

const HOST: &str = "gw1.amazonappstream.com";
/// curl binds here, so its address differs from HAProxy's (127.0.0.1) in every log line.
const CURL_IP: &str = "127.0.0.5";

struct HaProxy(Child);

impl Drop for HaProxy {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// HAProxy in TCP mode with one frontend per PROXY version, both to `proxy`. The v2 backend
/// health-checks with a `LOCAL` header every 100 ms, as a balancer does.
fn haproxy(dir: &Path, proxy: SocketAddr) -> (HaProxy, u16, u16) {
    let (v1, v2) = (free_port(), free_port());
    let config = format!(
        "global\n  maxconn 200\n\
         defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\n\
         frontend v1\n  bind 127.0.0.1:{v1}\n  default_backend portcullis_v1\n\
         frontend v2\n  bind 127.0.0.1:{v2}\n  default_backend portcullis_v2\n\
         backend portcullis_v1\n  server p {proxy} send-proxy\n\
         backend portcullis_v2\n  server p {proxy} send-proxy-v2 check check-send-proxy inter 100ms\n"
    );
    let path = dir.join("haproxy.cfg");
    std::fs::write(&path, config).unwrap();
    let child = Command::new("haproxy")
        .arg("-db")
        .arg("-f")
        .arg(&path)
        .stdout(Stdio::null())
        .spawn()
        .expect("haproxy starts");
    let haproxy = HaProxy(child);
    // Connecting to see whether it listens would itself be a client through it.
    for port in [v1, v2] {
        let up = (0..200).any(|_| {
            std::thread::sleep(Duration::from_millis(25));
            listening(port)
        });
        assert!(up, "haproxy listens on {port}");
    }
    (haproxy, v1, v2)
}

/// Whether a socket listens on `port`, from the kernel's table.
fn listening(port: u16) -> bool {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    let local = format!(":{port:04X} ");
    table
        .lines()
        .any(|line| line.split_whitespace().nth(3) == Some("0A") && line.contains(&local))
}

/// The binary, trusting HAProxy's address (127.0.0.1) for PROXY headers and serving only
/// curl's: without the header, curl would be refused.
fn portcullis(dir: &Path, dns: &TestDns) -> Running {
    let setup = Setup {
        sni: "enforce",
        proxy_protocol_trusted: vec!["127.0.0.1/32"],
        clients_allow: vec!["127.0.0.5/32"],
        ..Setup::default()
    };
    let path = dir.join("portcullis.toml");
    std::fs::write(&path, setup.to_toml(dns.addr)).unwrap();
    Running::start(&path)
}

/// curl through `proxy_port`; returns the body and curl's own `ip:port`.
fn curl(proxy_port: u16, ca: &Path) -> (String, String) {
    let output = Command::new("curl")
        .args(["-sS", "--max-time", "10", "--interface", CURL_IP, "--proxy"])
        .arg(format!("http://127.0.0.1:{proxy_port}"))
        .arg("--cacert")
        .arg(ca)
        .args(["-w", "\n%{local_ip}:%{local_port}"])
        .arg(format!("https://{HOST}/hello"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "curl: {stdout} {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let (body, local) = stdout.rsplit_once('\n').unwrap();
    (body.to_string(), local.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_through_haproxy_is_logged_under_its_own_address() {
    support::isolate();
    if !have_tool("haproxy", &["haproxy", "-v"]) || !have_tool("curl", &["curl", "--version"]) {
        return;
    }
    let origin_ip = "127.0.0.73";
    let origin = WebOrigin::start(origin_ip).await;
    let dns = TestDns::start().await;
    dns.set(HOST, &[origin_ip.parse().unwrap()], 60);
    let dir = tempfile::tempdir().unwrap();
    let ca = support::tls::ca().write_ca(dir.path());
    let running = portcullis(dir.path(), &dns);
    let (_haproxy, v1, v2) = haproxy(dir.path(), running.proxy);
    for port in [v1, v2] {
        let (body, local) = tokio::task::spawn_blocking({
            let ca = ca.clone();
            move || curl(port, &ca)
        })
        .await
        .unwrap();
        assert!(body.contains(HOST), "{body}");
        assert!(local.starts_with(CURL_IP), "{local}");
        let decision = wait_for(
            &running.lines,
            &format!("\"event\":\"decision\",\"client\":\"{local}\""),
        );
        assert!(decision.contains("\"outcome\":\"allowed\""), "{decision}");
        assert!(decision.contains("\"via\":\"127.0.0.1:"), "{decision}");
        let closed = wait_for(
            &running.lines,
            &format!("\"event\":\"tunnel_closed\",\"client\":\"{local}\""),
        );
        assert!(closed.contains("\"bytes_downstream\":"), "{closed}");
    }
    assert!(
        origin
            .wait_for("/hello", Duration::from_secs(1))
            .await
            .is_some()
    );
    // HAProxy's LOCAL health checks have been arriving every 100 ms; none is a client.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let metrics = support::http_get(running.admin, "/metrics").await.1;
    let accepted: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("portcullis_connections_accepted_total"))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum();
    assert!(
        accepted >= 5.0,
        "2 tunnels and at least 3 health checks: {accepted}"
    );
    let log = running.log();
    assert!(
        !log.lines().any(|l| l.contains("\"client\":\"127.0.0.1:")),
        "a health check was logged as a client:\n{log}"
    );
    assert!(!log.contains("\"reason\":\"bad_request\""), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_vpc_endpoint_id_from_an_nlb_is_logged() {
    support::isolate();
    let origin_ip = "127.0.0.74";
    let _origin = WebOrigin::start(origin_ip).await;
    let dns = TestDns::start().await;
    dns.set(HOST, &[origin_ip.parse().unwrap()], 60);
    let dir = tempfile::tempdir().unwrap();
    let running = portcullis(dir.path(), &dns);
    let mut stream = TcpStream::connect(running.proxy).await.unwrap();
    let client: SocketAddr = "127.0.0.5:40123".parse().unwrap();
    let header = v2(client, running.proxy, &aws_vpce("vpce-0a1b2c3d4e5f60718"));
    stream.write_all(&header).await.unwrap();
    let head = format!("CONNECT {HOST}:443 HTTP/1.1\r\nHost: {HOST}:443\r\n\r\n");
    stream.write_all(head.as_bytes()).await.unwrap();
    let reply = read_reply(&mut stream).await;
    assert_eq!(reply.status, 200);
    // Not TLS, so the tunnel closes at once under `enforce`; the decision carries the ID.
    drop(stream);
    let decision = wait_for(
        &running.lines,
        "\"event\":\"decision\",\"client\":\"127.0.0.5:40123\"",
    );
    assert!(decision.contains("\"via\":\"127.0.0.1:"), "{decision}");
    assert!(
        decision.contains("\"vpce_id\":\"vpce-0a1b2c3d4e5f60718\""),
        "{decision}"
    );
}
