//! `portcullis healthcheck`, the real binary, against a real proxy started from a config file (as
//! the image's `HEALTHCHECK` runs it), a draining one, a closed port, and servers that accept and
//! never answer or answer something that is not HTTP.

mod support;

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use support::binary::{Running, wait_for};
use support::{Origin, Setup, TestDns, connect};

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
    took: Duration,
}

fn healthcheck(args: &[&str]) -> Run {
    let started = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .arg("healthcheck")
        .args(args)
        .output()
        .unwrap();
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        took: started.elapsed(),
    }
}

/// A port nothing listens on (bound, then closed again).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A config like the image's: the admin listener on all interfaces, at a port of our choosing
/// so that the healthcheck can find it in the file.
fn write_config(path: &Path, dns: SocketAddr, admin_port: u16, extra_rules: String) {
    let setup = Setup {
        extra_rules,
        drain_timeout: "10s",
        ..Setup::default()
    };
    let text = setup.to_toml(dns).replace(
        "[admin]\nlisten = \"127.0.0.1:0\"",
        &format!("[admin]\nlisten = \"0.0.0.0:{admin_port}\""),
    );
    assert!(text.contains(&format!("0.0.0.0:{admin_port}")));
    std::fs::write(path, text).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_config_leads_to_the_admin_port_and_a_drain_fails_only_readiness() {
    let dns = TestDns::start().await;
    let origin = Origin::echo().await;
    dns.set("gw.example.test", &[IpAddr::from([127, 0, 0, 1])], 60);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("portcullis.toml");
    let admin_port = free_port();
    let rule = format!(
        "[[rule]]\nname = \"t\"\ndomains = [\"gw.example.test\"]\nports = [\"{}\"]\n",
        origin.addr.port()
    );
    write_config(&path, dns.addr, admin_port, rule);
    let mut running = Running::start(&path);
    assert_eq!(running.admin.port(), admin_port);
    let config = path.to_str().unwrap();

    let live = healthcheck(&["--config", config]);
    assert_eq!(live.code, 0, "{}", live.stderr);
    assert_eq!(
        live.stdout.trim(),
        format!("GET http://127.0.0.1:{admin_port}/healthz: 200 OK")
    );
    assert_eq!(healthcheck(&["--config", config, "--ready"]).code, 0);
    let admin = running.admin.to_string();
    assert_eq!(healthcheck(&["--admin", &admin]).code, 0);
    let url = format!("http://127.0.0.1:{admin_port}/readyz");
    assert_eq!(healthcheck(&["--url", &url]).code, 0);

    // An open tunnel keeps the drain going while we look.
    let (reply, open) = connect(
        running.proxy,
        &format!("gw.example.test:{}", origin.addr.port()),
    )
    .await;
    assert_eq!(reply.status, 200);
    running.signal("TERM");
    wait_for(&running.lines, "draining");
    let ready = healthcheck(&["--config", config, "--ready"]);
    assert_eq!(ready.code, 1);
    assert_eq!(ready.stdout, "");
    assert_eq!(
        ready.stderr.trim(),
        format!(
            "portcullis healthcheck: GET http://127.0.0.1:{admin_port}/readyz: 503 Service Unavailable"
        )
    );
    let live = healthcheck(&["--config", config]);
    assert_eq!(
        live.code, 0,
        "/healthz stays 200 through a drain: {}",
        live.stderr
    );

    drop(open);
    assert_eq!(running.wait_exit(Duration::from_secs(5)), Some(0));
    let gone = healthcheck(&["--config", config]);
    assert_eq!(gone.code, 1);
    assert!(gone.stderr.contains("cannot connect"), "{}", gone.stderr);
}

#[test]
fn nothing_listening_fails_at_once() {
    support::isolate();
    let admin = format!("127.0.0.1:{}", free_port());
    let run = healthcheck(&["--admin", &admin, "--timeout", "10s"]);
    assert_eq!(run.code, 1);
    assert!(
        run.stderr.starts_with(&format!(
            "portcullis healthcheck: GET http://{admin}/healthz: cannot connect:"
        )),
        "{}",
        run.stderr
    );
    assert_eq!(run.stderr.lines().count(), 1);
    assert!(run.took < Duration::from_secs(5), "took {:?}", run.took);
}

/// Accepts connections and hands each to `answer` on a thread of its own.
fn server(answer: fn(std::net::TcpStream)) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming().map_while(Result::ok) {
            std::thread::spawn(move || answer(stream));
        }
    });
    addr
}

/// Reads up to the blank line that ends the request head.
fn read_request(stream: &mut std::net::TcpStream) {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") && stream.read(&mut byte).is_ok_and(|n| n == 1) {
        head.push(byte[0]);
    }
}

#[test]
fn a_server_that_never_answers_fails_within_the_timeout() {
    support::isolate();
    let silent = server(|mut stream| {
        read_request(&mut stream);
        std::thread::sleep(Duration::from_secs(30));
    });
    let run = healthcheck(&["--admin", &silent.to_string(), "--timeout", "500ms"]);
    assert_eq!(run.code, 1);
    assert_eq!(
        run.stderr.trim(),
        format!("portcullis healthcheck: GET http://{silent}/healthz: no answer within 500ms")
    );
    assert!(
        run.took >= Duration::from_millis(500) && run.took < Duration::from_secs(5),
        "took {:?}",
        run.took
    );
}

#[test]
fn anything_but_a_200_fails() {
    support::isolate();
    // Each reads the request first: closing with it unread would send a reset instead.
    let not_http = server(|mut stream| {
        read_request(&mut stream);
        let _ = stream.write_all(b"SSH-2.0-OpenSSH_9.2\r\n");
    });
    let run = healthcheck(&["--admin", &not_http.to_string()]);
    assert_eq!(run.code, 1);
    assert!(
        run.stderr
            .contains("not an HTTP reply: \"SSH-2.0-OpenSSH_9.2\""),
        "{}",
        run.stderr
    );

    let closes = server(|mut stream| read_request(&mut stream));
    let run = healthcheck(&["--admin", &closes.to_string()]);
    assert_eq!(run.code, 1);
    assert!(
        run.stderr.contains("closed without a reply"),
        "{}",
        run.stderr
    );

    let redirect = server(|mut stream| {
        read_request(&mut stream);
        let _ = stream.write_all(b"HTTP/1.1 302 Found\r\nLocation: /\r\n\r\n");
    });
    let url = format!("http://{redirect}/healthz");
    let run = healthcheck(&["--url", &url]);
    assert_eq!(run.code, 1);
    assert!(run.stderr.trim().ends_with(": 302 Found"), "{}", run.stderr);
}

#[test]
fn a_config_without_an_admin_listener_has_nothing_to_probe() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("portcullis.toml");
    let text =
        portcullis::config::DEFAULT_CONFIG.replace("listen = \"127.0.0.1:9090\"", "listen = \"\"");
    std::fs::write(&path, text).unwrap();
    let run = healthcheck(&["--config", path.to_str().unwrap()]);
    assert_eq!(run.code, 1);
    assert!(
        run.stderr.contains("[admin] listen is off"),
        "{}",
        run.stderr
    );

    let run = healthcheck(&["--config", "/nonexistent/portcullis.toml"]);
    assert_eq!(run.code, 1, "1, not 2: Docker reserves 2");
    assert!(run.stderr.contains("cannot read"), "{}", run.stderr);
}
