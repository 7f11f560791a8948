//! TCP keepalive on both legs, read back from the kernel rather than trusted from the setter:
//! `getsockopt` on the proxy's own two sockets of a tunnel, and `ss`'s view of their timers.
//! Alone in its binary, so the only sockets in the process are this test's.

mod support;

use std::net::SocketAddr;
use std::os::fd::{BorrowedFd, RawFd};
use std::time::Duration;

use rustix::net::sockopt;
use support::{Origin, Setup, TestProxy, assert_echo, connect, rule_for, start_answering};
use tokio::net::TcpStream;

const HOST: &str = "gw1.amazonappstream.com";

/// What the kernel says about one socket.
#[derive(Debug, PartialEq)]
struct KeepAlive {
    on: bool,
    idle: Duration,
    interval: Duration,
    probes: u32,
}

/// The open TCP sockets of this process with their local and peer addresses.
fn sockets() -> Vec<(RawFd, SocketAddr, SocketAddr)> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc/self/fd").unwrap().flatten() {
        let Ok(fd) = entry.file_name().to_string_lossy().parse::<RawFd>() else {
            continue;
        };
        // SAFETY: the descriptor is only borrowed for the calls below, while the tunnel that
        // owns it is held open by the test.
        let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
        let local = rustix::net::getsockname(borrowed)
            .ok()
            .and_then(|a| SocketAddr::try_from(a).ok());
        let peer = rustix::net::getpeername(borrowed)
            .ok()
            .flatten()
            .and_then(|a| SocketAddr::try_from(a).ok());
        if let (Some(local), Some(peer)) = (local, peer) {
            found.push((fd, local, peer));
        }
    }
    found
}

fn read_back(fd: RawFd) -> KeepAlive {
    // SAFETY: as in `sockets`.
    let fd = unsafe { BorrowedFd::borrow_raw(fd) };
    KeepAlive {
        on: sockopt::socket_keepalive(fd).unwrap(),
        idle: sockopt::tcp_keepidle(fd).unwrap(),
        interval: sockopt::tcp_keepintvl(fd).unwrap(),
        probes: sockopt::tcp_keepcnt(fd).unwrap(),
    }
}

/// The proxy's two sockets of the tunnel `client` opened: (client leg, origin leg).
fn legs(proxy: &TestProxy, client: &TcpStream, origin: &Origin) -> (RawFd, RawFd) {
    let client_addr = client.local_addr().unwrap();
    let all = sockets();
    let client_leg = all
        .iter()
        .find(|(_, local, peer)| *local == proxy.addr && *peer == client_addr)
        .expect("the proxy's socket to the client")
        .0;
    let origin_leg = all
        .iter()
        .filter(|(_, _, peer)| *peer == origin.addr)
        .map(|(fd, _, _)| *fd)
        .max()
        .expect("the proxy's socket to the origin");
    (client_leg, origin_leg)
}

/// `ss -tno`'s timer column for the connection between `local` and `peer`.
fn ss_timer(local: SocketAddr, peer: SocketAddr) -> String {
    let output = std::process::Command::new("ss")
        .args(["-tnoH", "state", "established"])
        .output()
        .expect("ss (iproute2) runs");
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    text.lines()
        .find(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            fields.len() >= 4 && fields[2] == local.to_string() && fields[3] == peer.to_string()
        })
        .unwrap_or_else(|| panic!("no {local} -> {peer} in:\n{text}"))
        .to_string()
}

async fn proxy(origin: &Origin, keepalive: &'static str) -> TestProxy {
    let setup = Setup {
        tcp_keepalive: keepalive,
        extra_rules: rule_for(HOST, origin),
        ..Setup::default()
    };
    let proxy = start_answering(setup, HOST).await;
    // The admin listener answers once `run` has set up the proxy's listeners.
    assert_eq!(proxy.admin_get("/healthz").await.0, 200);
    proxy
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_legs_carry_keepalive_and_0s_turns_it_off() {
    let origin = Origin::echo().await;
    let proxy = proxy(&origin, "7s").await;
    let (reply, mut client) = connect(proxy.addr, &format!("{HOST}:{}", origin.addr.port())).await;
    assert_eq!(reply.status, 200);
    assert_echo(&mut client, b"x").await;
    let (client_leg, origin_leg) = legs(&proxy, &client, &origin);
    let expected = KeepAlive {
        on: true,
        idle: Duration::from_secs(7),
        interval: Duration::from_secs(7),
        probes: 4,
    };
    assert_eq!(read_back(client_leg), expected, "client leg");
    assert_eq!(read_back(origin_leg), expected, "origin leg");
    // The kernel runs the timer: once the last byte is acknowledged, ss shows it.
    let quiet = support::eventually(Duration::from_secs(3), || async {
        ss_timer(proxy.addr, client.local_addr().unwrap()).contains("timer:(keepalive,")
    })
    .await;
    assert!(
        quiet,
        "{}",
        ss_timer(proxy.addr, client.local_addr().unwrap())
    );

    // A long idle probes every 15 s at most.
    let origin = Origin::echo().await;
    let proxy = self::proxy(&origin, "60s").await;
    let (_, client) = connect(proxy.addr, &format!("{HOST}:{}", origin.addr.port())).await;
    let (client_leg, origin_leg) = legs(&proxy, &client, &origin);
    for leg in [client_leg, origin_leg] {
        let kernel = read_back(leg);
        assert_eq!(
            (kernel.on, kernel.idle, kernel.interval),
            (true, Duration::from_secs(60), Duration::from_secs(15))
        );
    }

    let origin = Origin::echo().await;
    let proxy = self::proxy(&origin, "0s").await;
    let (_, client) = connect(proxy.addr, &format!("{HOST}:{}", origin.addr.port())).await;
    let (client_leg, origin_leg) = legs(&proxy, &client, &origin);
    assert!(!read_back(client_leg).on, "client leg");
    assert!(!read_back(origin_leg).on, "origin leg");
    let line = ss_timer(proxy.addr, client.local_addr().unwrap());
    assert!(!line.contains("keepalive"), "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_changes_it_for_new_connections() {
    let origin = Origin::echo().await;
    let proxy = proxy(&origin, "0s").await;
    let authority = format!("{HOST}:{}", origin.addr.port());
    let (_, before) = connect(proxy.addr, &authority).await;
    let mut setup_text = Setup {
        tcp_keepalive: "9s",
        extra_rules: rule_for(HOST, &origin),
        ..Setup::default()
    }
    .to_toml(proxy.dns.addr);
    // Keep the listen address the running proxy has.
    setup_text = setup_text.replace(
        "listen = [\"127.0.0.1:0\"]",
        &format!("listen = [\"{}\"]", proxy.addr),
    );
    proxy
        .proxy
        .reload(portcullis::Config::parse(&setup_text, "reload.toml").map_err(|e| e.to_string()))
        .unwrap();
    // Several, so that every worker's listener has accepted since the reload.
    let mut after = Vec::new();
    for _ in 0..8 {
        after.push(connect(proxy.addr, &authority).await.1);
    }
    let (before_leg, _) = legs(&proxy, &before, &origin);
    assert!(
        !read_back(before_leg).on,
        "an open connection keeps what it had"
    );
    for client in &after {
        let (client_leg, _) = legs(&proxy, client, &origin);
        assert_eq!(read_back(client_leg).idle, Duration::from_secs(9));
        assert!(read_back(client_leg).on);
    }
    // Origin legs: the one dialled before the reload without, the eight after with.
    let mut origin_legs: Vec<bool> = sockets()
        .into_iter()
        .filter(|(_, _, peer)| *peer == origin.addr)
        .map(|(fd, _, _)| read_back(fd).on)
        .collect();
    origin_legs.sort();
    assert_eq!(origin_legs, [vec![false], vec![true; 8]].concat());
}
