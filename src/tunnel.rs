//! Relaying bytes both ways once a tunnel is open.
//!
//! Each direction is a loop of read, write, count; on Linux the "read, write" is `splice(2)`
//! through a pipe, so relayed bytes never enter user space. When one side finishes sending (EOF), the
//! other side's write half is shut down and the opposite direction keeps flowing: TLS close
//! notifies and request/response protocols over the tunnel depend on half-close. An error in
//! either direction ends the whole tunnel, since a reset peer will not read again.
//!
//! Counters move per read, so an hour-long streaming session shows its traffic as it happens.

use std::future::Future;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use prometheus::IntCounter;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::prefixed::ClientStream;

/// Bytes a direction copies through user space before it switches to `splice(2)`.
const SPLICE_AFTER: u64 = 256 * 1024;

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

/// How bytes move between the two sockets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `splice(2)` through a pipe: the bytes never enter user space (Linux).
    Splice,
    /// `read`/`write` through a buffer that exists only while data is flowing.
    Copy,
}

impl Mode {
    /// The fastest mode this platform has.
    pub fn best() -> Mode {
        if cfg!(target_os = "linux") {
            Mode::Splice
        } else {
            Mode::Copy
        }
    }
}

/// Relays until both directions are done, one fails, the tunnel idles out, or `abort` fires.
/// `early` is what the client sent behind its CONNECT head; it goes to the origin first.
pub async fn relay(
    mode: Mode,
    client: TcpStream,
    early: Bytes,
    upstream: TcpStream,
    idle_timeout: Duration,
    counters: Counters<'_>,
    abort: &CancellationToken,
) -> Totals {
    let meter = Meter::new(counters);
    let up = async {
        // Moved in and dropped once sent: the buffer behind the early bytes (the ClientHello
        // read for the SNI check) must not stay allocated for the life of an idle tunnel.
        {
            let early = early;
            write_all(&upstream, &early).await?;
            meter.upstream().moved(early.len());
        }
        forward(mode, &client, &upstream, meter.upstream()).await
    };
    let down = forward(mode, &upstream, &client, meter.downstream());
    meter.run(up, down, idle_timeout, abort).await
}

/// Relays for a client connection of either kind: plain TCP takes the fastest [`Mode`]; TLS
/// to the proxy must pass through user space to be decrypted, so it is copied.
pub async fn relay_client(
    client: ClientStream,
    early: Bytes,
    upstream: TcpStream,
    idle_timeout: Duration,
    counters: Counters<'_>,
    abort: &CancellationToken,
) -> Totals {
    match client {
        ClientStream::Plain(tcp) => {
            let mode = Mode::best();
            relay(mode, tcp, early, upstream, idle_timeout, counters, abort).await
        }
        ClientStream::Tls(tls) => {
            relay_streams(*tls, early, upstream, idle_timeout, counters, abort).await
        }
    }
}

/// The general relay: any client stream, a TCP origin.
async fn relay_streams<C>(
    client: C,
    early: Bytes,
    mut upstream: TcpStream,
    idle_timeout: Duration,
    counters: Counters<'_>,
    abort: &CancellationToken,
) -> Totals
where
    C: AsyncRead + AsyncWrite,
{
    let meter = Meter::new(counters);
    let (mut client_read, mut client_write) = tokio::io::split(client);
    let (mut origin_read, mut origin_write) = upstream.split();
    let up = async {
        {
            let early = early;
            origin_write.write_all(&early).await?;
            meter.upstream().moved(early.len());
        }
        pump(&mut client_read, &mut origin_write, meter.upstream()).await
    };
    let down = pump(&mut origin_read, &mut client_write, meter.downstream());
    meter.run(up, down, idle_timeout, abort).await
}

/// One tunnel's bookkeeping: bytes each way (live counters and totals) and the last activity.
struct Meter<'a> {
    counters: Counters<'a>,
    upstream: AtomicU64,
    downstream: AtomicU64,
    activity: Activity,
}

impl<'a> Meter<'a> {
    fn new(counters: Counters<'a>) -> Meter<'a> {
        Meter {
            counters,
            upstream: AtomicU64::new(0),
            downstream: AtomicU64::new(0),
            activity: Activity::new(),
        }
    }

    fn upstream(&self) -> Direction<'_> {
        Direction {
            counter: self.counters.upstream,
            total: &self.upstream,
            activity: &self.activity,
        }
    }

    fn downstream(&self) -> Direction<'_> {
        Direction {
            counter: self.counters.downstream,
            total: &self.downstream,
            activity: &self.activity,
        }
    }

    /// Drives both directions to the end, or until the tunnel idles out or is aborted.
    async fn run(
        &self,
        up: impl Future<Output = io::Result<()>>,
        down: impl Future<Output = io::Result<()>>,
        idle_timeout: Duration,
        abort: &CancellationToken,
    ) -> Totals {
        let end = tokio::select! {
            result = futures_util::future::try_join(up, down) => match result {
                Ok(_) => End::Closed,
                Err(_) => End::Error,
            },
            () = self.activity.idle(idle_timeout) => End::Idle,
            () = abort.cancelled() => End::Shutdown,
        };
        Totals {
            upstream: self.upstream.load(Ordering::Relaxed),
            downstream: self.downstream.load(Ordering::Relaxed),
            end,
        }
    }
}

/// Copies one direction of a generic stream until EOF, then passes the half-close on.
async fn pump<R, W>(reader: &mut R, writer: &mut W, direction: Direction<'_>) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buffer = vec![0u8; BUFFER];
    loop {
        let n = reader.read(&mut buffer).await?;
        if n == 0 {
            let _ = writer.shutdown().await;
            return Ok(());
        }
        writer.write_all(&buffer[..n]).await?;
        direction.moved(n);
    }
}

/// Where one direction reports what it moved.
struct Direction<'a> {
    counter: &'a IntCounter,
    total: &'a AtomicU64,
    activity: &'a Activity,
}

impl Direction<'_> {
    fn moved(&self, n: usize) {
        self.counter.inc_by(n as u64);
        self.total.fetch_add(n as u64, Ordering::Relaxed);
        self.activity.touch();
    }
}

/// Copies one direction until EOF, then passes the half-close on.
async fn forward(
    mode: Mode,
    from: &TcpStream,
    to: &TcpStream,
    direction: Direction<'_>,
) -> io::Result<()> {
    match mode {
        // Handshakes and interactive traffic are small: a pipe (two more descriptors and
        // syscalls to make and close) pays off only once a direction carries bulk data.
        #[cfg(target_os = "linux")]
        Mode::Splice => {
            if copy_forward(from, to, &direction, SPLICE_AFTER).await? == Copied::Bulk {
                splice::forward(from, to, &direction).await?;
            }
        }
        _ => {
            copy_forward(from, to, &direction, u64::MAX).await?;
        }
    }
    // The peer may already be gone; the other direction decides how the tunnel ends.
    let _ = rustix::net::shutdown(to, rustix::net::Shutdown::Write);
    Ok(())
}

/// Where a copy loop stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Copied {
    /// The sender finished (EOF).
    Eof,
    /// More than the byte budget went through: a bulk transfer, worth a pipe.
    Bulk,
}

/// The portable path, and the start of every tunnel on the splice path. The buffer is taken
/// when the socket turns readable and given back when it has nothing more to read, so an idle
/// tunnel holds no buffer at all. Stops early once `budget` bytes have gone through.
async fn copy_forward(
    from: &TcpStream,
    to: &TcpStream,
    direction: &Direction<'_>,
    budget: u64,
) -> io::Result<Copied> {
    let mut moved = 0u64;
    loop {
        from.readable().await?;
        let mut buffer = vec![0u8; BUFFER];
        loop {
            match from.try_read(&mut buffer) {
                Ok(0) => return Ok(Copied::Eof),
                Ok(n) => {
                    write_all(to, &buffer[..n]).await?;
                    direction.moved(n);
                    moved += n as u64;
                    if moved >= budget {
                        return Ok(Copied::Bulk);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
    }
}

async fn write_all(to: &TcpStream, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        to.writable().await?;
        match to.try_write(data) {
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// The Linux fast path: socket → pipe → socket with `splice(2)`, no copy through user space.
#[cfg(target_os = "linux")]
mod splice {
    use std::io;
    use std::os::fd::OwnedFd;

    use rustix::pipe::{PipeFlags, SpliceFlags, fcntl_setpipe_size, pipe_with, splice};
    use tokio::io::Interest;
    use tokio::net::TcpStream;

    use super::Direction;

    /// The pipe's capacity, and so the most bytes one splice call moves. Larger than the
    /// default 64 KiB so bulk transfers need fewer calls; kernel pages are only taken while
    /// data is in flight. If the kernel refuses (`pipe-max-size`, or the per-user pipe budget
    /// that `fs.pipe-user-pages-soft` sets), the default capacity stays.
    const CHUNK: usize = 256 * 1024;

    pub(super) async fn forward(
        from: &TcpStream,
        to: &TcpStream,
        direction: &Direction<'_>,
    ) -> io::Result<()> {
        // Made when the first byte is ready after the switch.
        let mut pipe: Option<(OwnedFd, OwnedFd)> = None;
        let flags = SpliceFlags::MOVE | SpliceFlags::NONBLOCK;
        loop {
            from.readable().await?;
            if pipe.is_none() {
                let made = pipe_with(PipeFlags::CLOEXEC | PipeFlags::NONBLOCK)?;
                let _ = fcntl_setpipe_size(&made.1, CHUNK);
                pipe = Some(made);
            }
            let (pipe_out, pipe_in) = pipe.as_ref().expect("just made");
            let filled = from.try_io(Interest::READABLE, || {
                Ok(splice(from, None, pipe_in, None, CHUNK, flags)?)
            });
            let n = match filled {
                Ok(0) => return Ok(()),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            };
            let mut left = n;
            while left > 0 {
                to.writable().await?;
                match to.try_io(Interest::WRITABLE, || {
                    Ok(splice(pipe_out, None, to, None, left, flags)?)
                }) {
                    Ok(m) => left -= m,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
            }
            direction.moved(n);
        }
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
