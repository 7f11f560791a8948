//! The `portcullis` binary as an operator runs it: SIGHUP and file-watch reloads, SIGTERM
//! drain, a second signal, and a log that never carries a password.

mod support;

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use base64::Engine;
use support::binary::{Running, wait_for};
use support::{Origin, Setup, TestDns, assert_echo, connect, http_get, request};

/// What every test of the binary starts from: a DNS server answering `names` with
/// 127.0.0.1, an echo origin there, and a directory for the config file.
struct World {
    dns: TestDns,
    _origin: Origin,
    dir: tempfile::TempDir,
    path: std::path::PathBuf,
    port: u16,
}

impl World {
    async fn new(names: &[&str]) -> World {
        let dns = TestDns::start().await;
        let origin = Origin::echo().await;
        for name in names {
            dns.set(name, &lo(), 60);
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("portcullis.toml");
        World {
            port: origin.addr.port(),
            dns,
            _origin: origin,
            dir,
            path,
        }
    }
}

fn lo() -> Vec<IpAddr> {
    vec!["127.0.0.1".parse().unwrap()]
}

/// A config file for the binary: listens on port 0, rules from `Setup` plus `extra`.
fn write_config(path: &Path, dns: SocketAddr, extra_rules: String, watch: bool) {
    let setup = Setup {
        extra_rules,
        drain_timeout: "10s",
        ..Setup::default()
    };
    let text = setup
        .to_toml(dns)
        .replace("[proxy]\n", &format!("[proxy]\nwatch_config = {watch}\n"));
    std::fs::write(path, text).unwrap();
}

fn rule(host: &str, port: u16) -> String {
    format!("[[rule]]\nname = \"t\"\ndomains = [{host:?}]\nports = [\"{port}\"]\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_and_a_bad_file_keeps_the_old_config() {
    let World {
        dns,
        _origin,
        dir: _dir,
        path,
        port,
    } = World::new(&["old.example.test", "new.example.test"]).await;
    write_config(&path, dns.addr, rule("old.example.test", port), false);
    let running = Running::start(&path);
    let (reply, mut open) = connect(running.proxy, &format!("old.example.test:{port}")).await;
    assert_eq!(reply.status, 200);

    write_config(&path, dns.addr, rule("new.example.test", port), false);
    running.signal("HUP");
    wait_for(&running.lines, "config reloaded");
    assert_eq!(
        connect(running.proxy, &format!("new.example.test:{port}"))
            .await
            .0
            .status,
        200
    );
    assert_eq!(
        connect(running.proxy, &format!("old.example.test:{port}"))
            .await
            .0
            .status,
        403
    );
    assert_echo(&mut open, b"untouched by the reload").await;

    std::fs::write(
        &path,
        "[proxy]\nlisten = [\"127.0.0.1:0\"]\nheader_timeout = \"soon\"\n",
    )
    .unwrap();
    running.signal("HUP");
    let failure = wait_for(&running.lines, "config reload failed");
    assert!(
        failure.contains(":3: "),
        "the log names the line: {failure}"
    );
    assert_eq!(
        connect(running.proxy, &format!("new.example.test:{port}"))
            .await
            .0
            .status,
        200
    );
    let (_, metrics) = http_get(running.admin, "/metrics").await;
    assert!(
        metrics.contains("portcullis_config_reloads_total{result=\"error\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("portcullis_config_reloads_total{result=\"ok\"} 1"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_config_reloads_on_change() {
    let World {
        dns,
        _origin,
        dir,
        path,
        port,
    } = World::new(&["new.example.test"]).await;
    write_config(&path, dns.addr, rule("old.example.test", port), true);
    let running = Running::start(&path);
    assert_eq!(
        connect(running.proxy, &format!("new.example.test:{port}"))
            .await
            .0
            .status,
        403
    );
    // Kubernetes swaps a ConfigMap by renaming a new file into place; do the same.
    let staged = dir.path().join("staged.toml");
    write_config(&staged, dns.addr, rule("new.example.test", port), true);
    std::fs::rename(&staged, &path).unwrap();
    wait_for(&running.lines, "config reloaded");
    assert_eq!(
        connect(running.proxy, &format!("new.example.test:{port}"))
            .await
            .0
            .status,
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_open_tunnels_then_exits_zero() {
    let World {
        dns,
        _origin,
        dir: _dir,
        path,
        port,
    } = World::new(&["gw.example.test"]).await;
    write_config(&path, dns.addr, rule("gw.example.test", port), false);
    let mut running = Running::start(&path);
    let (reply, mut open) = connect(running.proxy, &format!("gw.example.test:{port}")).await;
    assert_eq!(reply.status, 200);
    assert_eq!(http_get(running.admin, "/readyz").await.0, 200);

    running.signal("TERM");
    wait_for(&running.lines, "draining");
    assert_eq!(http_get(running.admin, "/readyz").await.0, 503);
    assert!(
        tokio::net::TcpStream::connect(running.proxy).await.is_err(),
        "no longer accepting"
    );
    assert_echo(&mut open, b"still flowing during the drain").await;
    assert_eq!(
        running.wait_exit(Duration::from_millis(300)),
        None,
        "waits for the tunnel"
    );
    drop(open);
    assert_eq!(running.wait_exit(Duration::from_secs(5)), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_signal_exits_at_once() {
    let World {
        dns,
        _origin,
        dir: _dir,
        path,
        port,
    } = World::new(&["gw.example.test"]).await;
    write_config(&path, dns.addr, rule("gw.example.test", port), false);
    let mut running = Running::start(&path);
    let (_, _open) = connect(running.proxy, &format!("gw.example.test:{port}")).await;
    running.signal("TERM");
    wait_for(&running.lines, "draining");
    assert_eq!(running.wait_exit(Duration::from_millis(300)), None);
    running.signal("INT");
    let code = running.wait_exit(Duration::from_secs(2));
    assert!(
        matches!(code, Some(c) if c != 0),
        "exited at once, non-zero: {code:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passwords_never_reach_the_log() {
    let dns = TestDns::start().await;
    let origin = Origin::echo().await;
    let port = origin.addr.port();
    dns.set("gw.example.test", &lo(), 60);
    let dir = tempfile::tempdir().unwrap();
    let users = dir.path().join("users");
    std::fs::write(
        &users,
        format!("alice:{}\n", bcrypt::hash("Tr0ub4dor&3", 4).unwrap()),
    )
    .unwrap();
    let path = dir.path().join("portcullis.toml");
    write_config(&path, dns.addr, rule("gw.example.test", port), false);
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, format!("{text}\n[auth]\nusers_file = \"users\"\n")).unwrap();
    let mut running = Running::start(&path);
    for password in ["Tr0ub4dor&3", "WrongPassw0rd!"] {
        let token = base64::engine::general_purpose::STANDARD.encode(format!("alice:{password}"));
        let head = format!(
            "CONNECT gw.example.test:{port} HTTP/1.1\r\nProxy-Authorization: Basic {token}\r\n\r\n"
        );
        let _ = request(running.proxy, head.as_bytes()).await;
    }
    running.signal("TERM");
    assert_eq!(running.wait_exit(Duration::from_secs(5)), Some(0));
    let log = running.log();
    assert!(
        log.contains("\"user\":\"alice\""),
        "the user is logged: {log}"
    );
    for secret in ["Tr0ub4dor", "WrongPassw0rd", "YWxpY2U6"] {
        assert!(!log.contains(secret), "{secret} leaked into the log");
    }
}

/// CPU time (user + system) of a process, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_out_of_file_descriptors_backs_off_and_recovers() {
    let World {
        dns,
        _origin,
        dir: _dir,
        path,
        port,
    } = World::new(&["gw.example.test"]).await;
    write_config(&path, dns.addr, rule("gw.example.test", port), false);
    let running = Running::start_with_fd_limit(&path, Some(64));
    // Hold more connections than the proxy has descriptors: accept(2) starts failing with
    // EMFILE while the backlog keeps the listener readable, the classic busy loop.
    let mut held = Vec::new();
    for _ in 0..100 {
        held.push(tokio::net::TcpStream::connect(running.proxy).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = cpu_ticks(running.child.id());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let spent = cpu_ticks(running.child.id()) - before;
    assert!(
        spent < 30,
        "the accept loop spun: {spent} ticks of CPU in 2 s"
    );
    let (_, metrics) = http_get(running.admin, "/metrics").await;
    let errors = support::metric_value(
        &metrics,
        "portcullis_connections_rejected_total{reason=\"accept_error\"}",
    );
    assert!(errors >= 1.0, "accept errors are counted: {errors}");
    drop(held);
    let recovered = support::eventually(Duration::from_secs(15), || async {
        connect(running.proxy, &format!("gw.example.test:{port}"))
            .await
            .0
            .status
            == 200
    })
    .await;
    assert!(recovered, "serves again once descriptors are free");
}

/// Log lines are text on a terminal and JSON lines otherwise; the flag and
/// `PORTCULLIS_LOG_FORMAT` win over both. The terminal is a real pseudo-terminal (`script`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_are_text_on_a_terminal_and_json_otherwise() {
    let World { dns, dir, path, .. } = World::new(&[]).await;
    write_config(&path, dns.addr, String::new(), false);
    let pid_file = dir.path().join("pid");
    let first_line = |env: Option<&str>, tty: bool| {
        let binary = env!("CARGO_BIN_EXE_portcullis");
        // The shell's pid is the proxy's after `exec`: under `script` the proxy is not our
        // child, and killing `script` leaves it running.
        let command = format!(
            "echo $$ > {}; exec {binary} --config {}",
            pid_file.display(),
            path.display()
        );
        let mut run = if tty {
            let mut script = std::process::Command::new("script");
            script.args(["-qefc", &command, "/dev/null"]);
            script
        } else {
            let mut sh = std::process::Command::new("sh");
            sh.args(["-c", &command]);
            sh
        };
        if let Some(format) = env {
            run.env("PORTCULLIS_LOG_FORMAT", format);
        }
        let mut child = run
            .env("PORTCULLIS_LOG", "info")
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        std::io::BufRead::read_line(&mut stdout, &mut line).unwrap();
        let proxy = std::fs::read_to_string(&pid_file).unwrap();
        let _ = std::process::Command::new("kill")
            .args(["-9", proxy.trim()])
            .status();
        let _ = child.kill();
        let _ = child.wait();
        line
    };
    let tty = first_line(None, true);
    assert!(
        tty.contains("portcullis serving") && !tty.starts_with('{'),
        "{tty:?}"
    );
    let piped = first_line(None, false);
    assert!(
        piped.starts_with('{') && piped.contains("\"portcullis serving\""),
        "{piped:?}"
    );
    let forced = first_line(Some("json"), true);
    assert!(forced.starts_with('{'), "{forced:?}");
    drop(dir);
}
