//! A direction splices only while its traffic is bulk: interactive frames stay on (or go back
//! to) the copy path, and the pipe they no longer need is closed. Alone in its binary, since
//! it counts this process's pipes.

mod support;

use std::time::Duration;

use bytes::Bytes;
use portcullis::tunnel::{self, Counters, Mode};
use prometheus::IntCounter;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

async fn pair() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (a, b) = tokio::join!(TcpStream::connect(addr), listener.accept());
    (a.unwrap(), b.unwrap().0)
}

/// Pipe descriptors this process holds.
fn pipes() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|target| target.to_string_lossy().starts_with("pipe:"))
        .count()
}

fn pattern(len: usize, seed: u64) -> Vec<u8> {
    (0..len as u64)
        .map(|i| (i.wrapping_mul(2_654_435_761).wrapping_add(seed) >> 7) as u8)
        .collect()
}

/// Sends `data` from `from` and expects exactly it at `to`.
async fn through(from: &mut TcpStream, to: &mut TcpStream, data: &[u8]) {
    let (_, got) = tokio::join!(from.write_all(data), async {
        let mut got = vec![0u8; data.len()];
        tokio::time::timeout(Duration::from_secs(20), to.read_exact(&mut got))
            .await
            .expect("bytes arrive")
            .unwrap();
        got
    });
    assert!(got == data, "bytes differ");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn splicing_follows_the_traffic_bulk_then_frames_then_bulk() {
    support::isolate();
    let (mut client, proxy_client) = pair().await;
    let (proxy_origin, mut origin) = pair().await;
    let before = pipes();
    let relay = tokio::spawn(async move {
        let up = IntCounter::new("up", "up").unwrap();
        let down = IntCounter::new("down", "down").unwrap();
        let totals = tunnel::ByteTotals::default();
        let counters = Counters {
            upstream: &up,
            downstream: &down,
            totals: &totals,
        };
        let abort = CancellationToken::new();
        let from_client = tunnel::FromClient::early(Bytes::new());
        let idle = Duration::from_secs(60);
        tunnel::relay(
            Mode::Splice,
            proxy_client,
            from_client,
            proxy_origin,
            idle,
            counters,
            &abort,
        )
        .await
    });

    // Interactive frames from the start, more bytes than the copy-then-splice switch: never a
    // pipe.
    for i in 0..500 {
        through(&mut client, &mut origin, &pattern(600, i)).await;
    }
    assert_eq!(pipes(), before, "small frames stay on the copy path");

    // A bulk stretch: the direction switches to splicing through a pipe.
    through(&mut client, &mut origin, &pattern(4 << 20, 1000)).await;
    assert_eq!(pipes(), before + 2, "bulk goes through a pipe");

    // Back to frames, each read on its own: after a streak of small splices, the pipe goes.
    for i in 0..100 {
        through(&mut client, &mut origin, &pattern(600, 2000 + i)).await;
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert_eq!(
        pipes(),
        before,
        "the pipe is closed once the traffic is small again"
    );

    // And bulk again: a pipe again, every byte intact throughout.
    through(&mut client, &mut origin, &pattern(4 << 20, 3000)).await;
    assert_eq!(pipes(), before + 2);
    drop(client);
    drop(origin);
    let totals = relay.await.unwrap();
    let frames = 600 * 600;
    assert_eq!(totals.upstream, (frames + 2 * (4 << 20)) as u64);
}
