//! `tunnels_active` returns to exactly zero however 200 tunnels end: the client closes, the
//! origin closes, the origin resets, the tunnel idles out, or the request is refused.

mod support;

use std::net::IpAddr;
use std::time::Duration;

use support::{Setup, connect, start};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// An origin that reads one byte, then closes (or resets, with `reset`).
async fn closing_origin(reset: bool) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut byte = [0u8; 1];
                let _ = stream.read_exact(&mut byte).await;
                if reset {
                    let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
                }
            });
        }
    });
    port
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_tunnels_end_every_way_and_the_gauge_returns_to_zero() {
    let echo = support::Origin::echo().await;
    let closer = closing_origin(false).await;
    let resetter = closing_origin(true).await;
    let rule = |name: &str, port: u16| {
        format!(
            "[[rule]]\nname = \"{name}\"\ndomains = [\"{name}.gauge.test\"]\nports = [\"{port}\"]\n"
        )
    };
    let setup = Setup {
        idle_timeout: "300ms",
        extra_rules: [
            rule("echo", echo.addr.port()),
            rule("closer", closer),
            rule("resetter", resetter),
        ]
        .concat(),
        ..Setup::default()
    };
    let proxy = start(setup).await;
    let lo: IpAddr = "127.0.0.1".parse().unwrap();
    for name in ["echo", "closer", "resetter"] {
        proxy.dns.set(&format!("{name}.gauge.test"), &[lo], 60);
    }
    let addr = proxy.addr;
    let echo_port = echo.addr.port();
    let tasks: Vec<_> = (0..200)
        .map(|i| {
            tokio::spawn(async move {
                let (authority, send) = match i % 5 {
                    0 => (format!("echo.gauge.test:{echo_port}"), true),
                    1 => (format!("closer.gauge.test:{closer}"), true),
                    2 => (format!("resetter.gauge.test:{resetter}"), true),
                    3 => (format!("echo.gauge.test:{echo_port}"), false),
                    _ => ("refused.gauge.test:443".to_string(), false),
                };
                let (reply, mut stream) = connect(addr, &authority).await;
                if i % 5 == 4 {
                    assert_eq!(reply.status, 403);
                    return;
                }
                assert_eq!(reply.status, 200, "{authority}");
                if send {
                    let _ = stream.write_all(b"x").await;
                }
                if i % 5 == 0 {
                    let mut back = [0u8; 1];
                    stream.read_exact(&mut back).await.unwrap();
                    return; // the client closes
                }
                // Wait for the proxy to close: origin close, reset, or idle timeout.
                let mut rest = Vec::new();
                let read =
                    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut rest))
                        .await;
                assert!(read.is_ok(), "{authority}: the proxy closes the tunnel");
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    let zero = support::eventually(Duration::from_secs(5), || async {
        let metrics = proxy.metrics().await;
        let active: f64 = metrics
            .lines()
            .filter(|l| l.starts_with("portcullis_tunnels_active{"))
            .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
            .sum();
        active == 0.0
    })
    .await;
    assert!(
        zero,
        "tunnels_active is back to exactly 0:\n{}",
        proxy.metrics().await
    );
    let metrics = proxy.metrics().await;
    let allowed: f64 = metrics
        .lines()
        .filter(|l| {
            l.starts_with("portcullis_requests_total{") && l.contains("outcome=\"allowed\"")
        })
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum();
    assert_eq!(allowed, 160.0);
}
