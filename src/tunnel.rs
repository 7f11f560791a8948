//! Relaying bytes both ways once a tunnel is open.
//!
//! Each direction is a loop of read, write, count. When one side finishes sending (EOF), the
//! other side's write half is shut down and the opposite direction keeps flowing: TLS close
//! notifies and request/response protocols over the tunnel depend on half-close. An error in
//! either direction ends the whole tunnel, since a reset peer will not read again.
//!
//! Counters move per read, so an hour-long streaming session shows its traffic as it happens.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use prometheus::IntCounter;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Per-direction buffer. 16 KiB matches a TLS record, the unit streaming traffic arrives in.
const BUFFER: usize = 16 * 1024;

/// Why a tunnel ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// Both sides finished sending.
    Closed,
    /// A read or write failed (typically a reset).
    Error,
    /// No bytes either way for `idle_timeout`.
    Idle,
    /// The drain timeout ran out during shutdown.
    Shutdown,
}

impl End {
    pub fn as_str(self) -> &'static str {
        match self {
            End::Closed => "closed",
            End::Error => "error",
            End::Idle => "idle_timeout",
            End::Shutdown => "shutdown",
        }
    }
}

/// What a finished tunnel carried.
#[derive(Debug, Clone, Copy)]
pub struct Totals {
    /// Client to origin.
    pub upstream: u64,
    /// Origin to client.
    pub downstream: u64,
    pub end: End,
}

/// The live counters a tunnel adds to.
pub struct Counters<'a> {
    pub upstream: &'a IntCounter,
    pub downstream: &'a IntCounter,
}

/// Relays until both directions are done, one fails, the tunnel idles out, or `abort` fires.
/// `early` is what the client sent behind its CONNECT head; it goes to the origin first.
pub async fn relay(
    mut client: TcpStream,
    early: Bytes,
    mut upstream: TcpStream,
    idle_timeout: Duration,
    counters: Counters<'_>,
    abort: &CancellationToken,
) -> Totals {
    let activity = Activity::new();
    let up_bytes = AtomicU64::new(0);
    let down_bytes = AtomicU64::new(0);
    let (mut client_read, mut client_write) = client.split();
    let (mut origin_read, mut origin_write) = upstream.split();
    let up = async {
        origin_write.write_all(&early).await?;
        counters.upstream.inc_by(early.len() as u64);
        up_bytes.fetch_add(early.len() as u64, Ordering::Relaxed);
        pump(
            &mut client_read,
            &mut origin_write,
            counters.upstream,
            &up_bytes,
            &activity,
        )
        .await
    };
    let down = pump(
        &mut origin_read,
        &mut client_write,
        counters.downstream,
        &down_bytes,
        &activity,
    );
    let end = tokio::select! {
        result = futures_util::future::try_join(up, down) => match result {
            Ok(_) => End::Closed,
            Err(_) => End::Error,
        },
        () = activity.idle(idle_timeout) => End::Idle,
        () = abort.cancelled() => End::Shutdown,
    };
    Totals {
        upstream: up_bytes.load(Ordering::Relaxed),
        downstream: down_bytes.load(Ordering::Relaxed),
        end,
    }
}

/// Copies one direction until EOF, then passes the half-close on.
async fn pump<R, W>(
    reader: &mut R,
    writer: &mut W,
    counter: &IntCounter,
    total: &AtomicU64,
    activity: &Activity,
) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buffer = vec![0u8; BUFFER];
    loop {
        let n = reader.read(&mut buffer).await?;
        if n == 0 {
            // The peer may already be gone; the other direction decides how the tunnel ends.
            let _ = writer.shutdown().await;
            return Ok(());
        }
        writer.write_all(&buffer[..n]).await?;
        counter.inc_by(n as u64);
        total.fetch_add(n as u64, Ordering::Relaxed);
        activity.touch();
    }
}

/// The time of the last byte moved, as milliseconds since the tunnel opened. An atomic rather
/// than a `Cell` because the relay future must be `Send`.
struct Activity {
    start: Instant,
    last_ms: AtomicU64,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        let ms = self.start.elapsed().as_millis() as u64;
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    /// Resolves once nothing has moved for `timeout`. Wakes once per `timeout` at most, not
    /// per byte.
    async fn idle(&self, timeout: Duration) {
        loop {
            let last = self.start + Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
            let deadline = last + timeout;
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    }
}
