//! Both relay modes (splice and the portable copy) move the same bytes, pass half-closes on,
//! count what they move, and end on idle.

mod support;

use std::time::Duration;

use bytes::Bytes;
use portcullis::tunnel::{self, Counters, End, Mode};
use prometheus::IntCounter;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// A connected pair of loopback sockets.
async fn pair() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (a, b) = tokio::join!(TcpStream::connect(addr), listener.accept());
    (a.unwrap(), b.unwrap().0)
}

/// client <-> [proxy_client | relay | proxy_origin] <-> origin
async fn relayed(
    mode: Mode,
    early: &'static [u8],
    idle: Duration,
) -> (
    TcpStream,
    TcpStream,
    tokio::task::JoinHandle<(tunnel::Totals, u64, u64)>,
) {
    support::isolate();
    let (client, proxy_client) = pair().await;
    let (proxy_origin, origin) = pair().await;
    let task = tokio::spawn(async move {
        let up = IntCounter::new("up", "up").unwrap();
        let down = IntCounter::new("down", "down").unwrap();
        let abort = CancellationToken::new();
        let counters = Counters {
            upstream: &up,
            downstream: &down,
        };
        let totals = tunnel::relay(
            mode,
            proxy_client,
            Bytes::from_static(early),
            proxy_origin,
            idle,
            counters,
            &abort,
        )
        .await;
        (totals, up.get(), down.get())
    });
    (client, origin, task)
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 12) as u8)
        .collect()
}

async fn bulk_both_ways(mode: Mode) {
    const SIZE: usize = 8 * 1024 * 1024;
    let (client, origin, task) = relayed(mode, b"EARLY", Duration::from_secs(30)).await;
    let up_data = pattern(SIZE, 1);
    let down_data = pattern(SIZE, 7);
    let (mut cr, mut cw) = client.into_split();
    let (mut or, mut ow) = origin.into_split();
    let up_expected = [b"EARLY".as_slice(), &up_data].concat();
    let up_send = up_data.clone();
    let down_send = down_data.clone();
    let client_writer = tokio::spawn(async move {
        cw.write_all(&up_send).await.unwrap();
        cw.shutdown().await.unwrap();
    });
    let origin_writer = tokio::spawn(async move {
        ow.write_all(&down_send).await.unwrap();
        ow.shutdown().await.unwrap();
    });
    let mut at_origin = Vec::new();
    let mut at_client = Vec::new();
    let reads = async {
        tokio::try_join!(
            or.read_to_end(&mut at_origin),
            cr.read_to_end(&mut at_client)
        )
        .unwrap();
    };
    tokio::time::timeout(Duration::from_secs(60), reads)
        .await
        .expect("relay finishes");
    client_writer.await.unwrap();
    origin_writer.await.unwrap();
    assert!(at_origin == up_expected, "{mode:?}: upstream bytes differ");
    assert!(at_client == down_data, "{mode:?}: downstream bytes differ");
    let (totals, up, down) = task.await.unwrap();
    assert_eq!(totals.end, End::Closed);
    assert_eq!(
        (totals.upstream, totals.downstream),
        (up_expected.len() as u64, SIZE as u64)
    );
    assert_eq!((up, down), (totals.upstream, totals.downstream));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn splice_relays_bulk_both_ways_intact() {
    bulk_both_ways(Mode::Splice).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_relays_bulk_both_ways_intact() {
    bulk_both_ways(Mode::Copy).await;
}

async fn half_close(mode: Mode) {
    let (mut client, mut origin, task) = relayed(mode, b"", Duration::from_secs(30)).await;
    client.write_all(b"request").await.unwrap();
    client.shutdown().await.unwrap();
    let mut got = Vec::new();
    origin.read_to_end(&mut got).await.unwrap();
    assert_eq!(
        got, b"request",
        "{mode:?}: origin sees the request, then EOF"
    );
    // The other direction still flows after the client's half-close.
    origin.write_all(b"response").await.unwrap();
    origin.shutdown().await.unwrap();
    let mut back = Vec::new();
    client.read_to_end(&mut back).await.unwrap();
    assert_eq!(back, b"response", "{mode:?}");
    assert_eq!(task.await.unwrap().0.end, End::Closed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_modes_pass_half_close_on() {
    half_close(Mode::Splice).await;
    half_close(Mode::Copy).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_modes_end_idle_tunnels() {
    for mode in [Mode::Splice, Mode::Copy] {
        let (mut client, _origin, task) = relayed(mode, b"", Duration::from_millis(200)).await;
        let mut buf = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(5), client.read(&mut buf)).await;
        assert!(
            matches!(read, Ok(Ok(0)) | Ok(Err(_))),
            "{mode:?}: idle tunnel closed"
        );
        assert_eq!(task.await.unwrap().0.end, End::Idle, "{mode:?}");
    }
}
