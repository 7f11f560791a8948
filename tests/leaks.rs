//! Refused, failed and abandoned requests leave nothing behind: no tunnel counted as open, no
//! socket left open. Alone in its binary so no other test's sockets move the descriptor count.

mod support;

use std::time::Duration;

use support::{Setup, TestProxy, connect, eventually, request, start};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

const GATEWAY: &str = "gw1.amazonappstream.com";

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// The sum of `portcullis_tunnels_active` over every domain.
async fn tunnels_active(proxy: &TestProxy) -> f64 {
    proxy
        .metrics()
        .await
        .lines()
        .filter(|line| line.starts_with("portcullis_tunnels_active{"))
        .filter_map(|line| line.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

/// One refused request of each kind, by index.
async fn refuse(proxy: &TestProxy, i: usize) {
    let (reply, _stream) = match i % 5 {
        0 => connect(proxy.addr, &format!("host{i}.example.com:443")).await,
        1 => connect(proxy.addr, &format!("{GATEWAY}:{}", 1000 + i)).await,
        2 => connect(proxy.addr, &format!("10.0.0.{i}:443")).await,
        3 => connect(proxy.addr, &format!("a..{GATEWAY}:443")).await,
        _ => {
            let head = format!("GET http://{GATEWAY}/{i} HTTP/1.1\r\nHost: {GATEWAY}\r\n\r\n");
            request(proxy.addr, head.as_bytes()).await
        }
    };
    assert!(
        matches!(reply.status, 400 | 403 | 405),
        "request {i}: {reply:?}"
    );
}

/// A request that passes the rules and fails at DNS, on the cached and the uncached path.
async fn fail(proxy: &TestProxy, i: usize) {
    let authority = if i.is_multiple_of(2) {
        format!("nx{i}.amazonappstream.com:443")
    } else {
        format!("vpce-0nx{i}.streaming.appstream.eu-west-1.vpce.amazonaws.com:1400")
    };
    let (reply, _stream) = connect(proxy.addr, &authority).await;
    assert_eq!(
        reply.reason(),
        Some("dns_nxdomain"),
        "{authority}: {reply:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_and_failed_requests_leak_nothing() {
    let proxy = start(Setup::default()).await;
    let _origin = support::Origin::echo_on("127.0.0.61", 443).await;
    proxy.dns.set(GATEWAY, &["127.0.0.61".parse().unwrap()], 60);
    // Warm up every path once, so lazily created sockets (resolver connections) are in the
    // baseline.
    for i in 0..5 {
        refuse(&proxy, i).await;
    }
    fail(&proxy, 0).await;
    fail(&proxy, 1).await;
    let (reply, mut stream) = connect(proxy.addr, &format!("{GATEWAY}:443")).await;
    assert_eq!(reply.status, 200, "{reply:?}");
    support::assert_echo(&mut stream, b"warm").await;
    drop(stream);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let baseline = open_fds();

    // 100 refusals, 20 at a time, then 20 DNS failures at once.
    for batch in 0..5 {
        futures_util::future::join_all((0..20).map(|i| refuse(&proxy, batch * 20 + i))).await;
    }
    futures_util::future::join_all((2..22).map(|i| fail(&proxy, i))).await;
    // Clients that give up halfway through a head.
    for i in 0..20 {
        let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
        stream
            .write_all(format!("CONNECT gw{i}.amazonappstream.com:443 HTTP/1.1\r\nHo").as_bytes())
            .await
            .unwrap();
    }

    // Tunnels: ten used and closed, ten whose client left right after sending CONNECT.
    for i in 0..10 {
        let (reply, mut stream) = connect(proxy.addr, &format!("{GATEWAY}:443")).await;
        assert_eq!(reply.status, 200, "{reply:?}");
        support::assert_echo(&mut stream, format!("tunnel {i}").as_bytes()).await;
    }
    for _ in 0..10 {
        let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
        let head = format!("CONNECT {GATEWAY}:443 HTTP/1.1\r\nHost: {GATEWAY}\r\n\r\n");
        stream.write_all(head.as_bytes()).await.unwrap();
    }

    assert!(
        eventually(Duration::from_secs(5), || async {
            tunnels_active(&proxy).await == 0.0
        })
        .await,
        "tunnels still counted as open after every client left"
    );
    let mut last = 0;
    let settled = eventually(Duration::from_secs(5), || {
        last = open_fds();
        async move { last <= baseline + 3 }
    })
    .await;
    assert!(
        settled,
        "{last} descriptors open 5 s after the burst, {baseline} before"
    );
}
