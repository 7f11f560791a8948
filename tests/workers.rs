//! `[proxy] workers`: every worker thread accepts and relays, and a drain waits for tunnels on
//! all of them. Real sockets on loopback, a real DNS server.

mod support;

use std::net::IpAddr;
use std::time::Duration;

use support::{Origin, Setup, assert_echo, connect, eventually, start};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

const GATEWAY: &str = "gw1.amazonappstream.com";
const WORKERS: usize = 3;
const TUNNELS: usize = 48;

/// The tests here count this process's worker threads by name, so they take turns.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The names of this process's `portcullis-N` worker threads.
fn worker_threads() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
        .map(|name| name.trim().to_string())
        .filter(|name| name.starts_with("portcullis-"))
        .collect();
    names.sort();
    names
}

async fn tunnels(proxy: std::net::SocketAddr) -> Vec<TcpStream> {
    let mut open = Vec::new();
    for _ in 0..TUNNELS {
        let (reply, stream) = connect(proxy, &format!("{GATEWAY}:443")).await;
        assert_eq!(reply.status, 200, "{reply:?}");
        open.push(stream);
    }
    open
}

/// Both ways a worker gets its socket: its own on the same port (`SO_REUSEPORT`, what the
/// binary binds), and a duplicate of a listener bound elsewhere. One test, so the thread names
/// seen are this proxy's alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_worker_serves_and_a_drain_waits_for_all_of_them() {
    let _turn = ONE_AT_A_TIME.lock().await;
    for shared_listener in [false, true] {
        let mut proxy = start(Setup {
            workers: WORKERS,
            shared_listener,
            drain_timeout: "20s",
            ..Setup::default()
        })
        .await;
        // An origin per round: the first one's listener goes away asynchronously.
        let origin_ip: IpAddr = if shared_listener {
            "127.0.0.62"
        } else {
            "127.0.0.61"
        }
        .parse()
        .unwrap();
        let _origin = Origin::echo_on(&origin_ip.to_string(), 443).await;
        proxy.dns.set(GATEWAY, &[origin_ip], 60);
        let started = eventually(Duration::from_secs(5), || async {
            worker_threads() == ["portcullis-1", "portcullis-2"]
        });
        assert!(
            started.await,
            "workers 1 and 2 run beside the caller's runtime (shared_listener {shared_listener}): \
             {:?}",
            worker_threads()
        );
        let mut open = tunnels(proxy.addr).await;
        for (i, stream) in open.iter_mut().enumerate() {
            assert_echo(stream, format!("before drain {i}").as_bytes()).await;
        }
        let metrics = proxy.metrics().await;
        let accepted: Vec<f64> = (0..WORKERS)
            .map(|w| {
                let series = format!("portcullis_connections_accepted_total{{worker=\"{w}\"}}");
                support::metric_value(&metrics, &series)
            })
            .collect();
        // The admin request above is not a proxy connection: the sum is exactly the tunnels.
        assert_eq!(accepted.iter().sum::<f64>(), TUNNELS as f64, "{accepted:?}");
        if !shared_listener {
            // The kernel spreads connections over the sockets by their addresses and ports;
            // 48 connections all landing on one of three sockets is a 1-in-10^22 event.
            let serving = accepted.iter().filter(|&&n| n > 0.0).count();
            assert!(serving >= 2, "connections per worker: {accepted:?}");
        }
        let done = proxy.shut_down();
        // Draining: no new connections, but every open tunnel, whichever thread holds it,
        // keeps relaying.
        assert!(
            eventually(Duration::from_secs(5), || async {
                TcpStream::connect(proxy.addr).await.is_err()
            })
            .await,
            "the listeners close when the drain starts"
        );
        for (i, stream) in open.iter_mut().enumerate() {
            assert_echo(stream, format!("during drain {i}").as_bytes()).await;
        }
        assert!(!done.is_finished(), "the drain waits for open tunnels");
        drop(open);
        tokio::time::timeout(Duration::from_secs(10), done)
            .await
            .expect("the drain ends once the last tunnel closes")
            .unwrap();
        assert!(
            worker_threads().is_empty(),
            "worker threads end with the proxy: {:?}",
            worker_threads()
        );
        let metrics = proxy.proxy.metrics().encode();
        let active = support::active_series(GATEWAY);
        assert_eq!(support::metric_value(&metrics, &active), 0.0);
    }
}

/// Dropping `run` (an aborted task, a runtime shutting down) stops the workers too: their
/// threads are not the caller's runtime's and would otherwise serve on, unseen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_run_stops_every_worker() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let mut proxy = start(Setup {
        workers: WORKERS,
        ..Setup::default()
    })
    .await;
    let origin_ip: IpAddr = "127.0.0.63".parse().unwrap();
    let _origin = Origin::echo_on(&origin_ip.to_string(), 443).await;
    proxy.dns.set(GATEWAY, &[origin_ip], 60);
    let mut open = tunnels(proxy.addr).await;
    assert_echo(&mut open[0], b"before").await;
    proxy.abort();
    assert!(
        eventually(Duration::from_secs(5), || async {
            worker_threads().is_empty()
        })
        .await,
        "worker threads still running: {:?}",
        worker_threads()
    );
    assert!(
        TcpStream::connect(proxy.addr).await.is_err(),
        "nothing accepts on the port any more"
    );
    for stream in &mut open {
        let mut buf = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await;
        assert!(
            matches!(read, Ok(Ok(0) | Err(_))),
            "tunnel still open: {read:?}"
        );
    }
}
