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
        let totals = tunnel::ByteTotals::default();
        let counters = Counters {
            upstream: &up,
            downstream: &down,
            totals: &totals,
        };
        let totals = tunnel::relay(
            mode,
            proxy_client,
            tunnel::FromClient::early(Bytes::from_static(early)),
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

async fn bulk_both_ways(mode: Mode) -> tunnel::Totals {
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
    totals
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn splice_relays_bulk_both_ways_intact() {
    bulk_both_ways(Mode::Splice).await;
}

/// Pipes made until the kernel hands out one below the default 64 KiB, which it does once
/// this user's pipes pass `fs.pipe-user-pages-soft` (the test runs in a user namespace, so
/// it is unprivileged to the kernel's pipe accounting even as root). `None` if no such pipe
/// came within the budget's worth of pipes.
fn use_up_pipe_budget() -> Option<Vec<(std::os::fd::OwnedFd, std::os::fd::OwnedFd)>> {
    use rustix::pipe::{PipeFlags, fcntl_getpipe_size, pipe_with};
    use rustix::process::{Resource, getrlimit, setrlimit};
    let soft_pages: usize = std::fs::read_to_string("/proc/sys/fs/pipe-user-pages-soft")
        .ok()?
        .trim()
        .parse()
        .ok()?;
    // Two descriptors per default pipe of 16 pages, and some room.
    let mut limit = getrlimit(Resource::Nofile);
    limit.current = limit.maximum;
    setrlimit(Resource::Nofile, limit).unwrap();
    let mut held = Vec::new();
    for _ in 0..soft_pages / 16 + 256 {
        let pipe = pipe_with(PipeFlags::CLOEXEC).ok()?;
        let size = fcntl_getpipe_size(&pipe.1).unwrap();
        held.push(pipe);
        if size < 64 * 1024 {
            return Some(held);
        }
    }
    None
}

/// With the pipe budget used up, a bulk direction copies instead of splicing through a
/// two-page pipe, says so, and still moves every byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn splice_falls_back_to_copying_when_pipes_run_out() {
    support::isolate();
    if std::fs::read_to_string("/proc/sys/fs/pipe-user-pages-soft").is_ok_and(|s| s.trim() == "0") {
        eprintln!("fs.pipe-user-pages-soft is 0 (no budget): nothing to fall back from");
        return;
    }
    let hoard = use_up_pipe_budget().expect(
        "the kernel should give two-page pipes past fs.pipe-user-pages-soft to an \
         unprivileged user",
    );
    let totals = bulk_both_ways(Mode::Splice).await;
    drop(hoard);
    assert!(totals.pipe_fallback, "{totals:?}");
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
