//! Relaying bytes both ways once a tunnel is open.
//!
//! Each direction is a loop of read, write, count; on Linux the "read, write" is `splice(2)`
//! through a pipe, so relayed bytes never enter user space. When one side finishes sending (EOF), the
//! other side's write half is shut down and the opposite direction keeps flowing: TLS close
//! notifies and request/response protocols over the tunnel depend on half-close. An error in
//! either direction ends the whole tunnel, since a reset peer will not read again.
//!
//! Counters move per read, so an hour-long streaming session shows its traffic as it happens.
//!
//! A plain-TCP relay can also be *parked* for an in-place upgrade (see
//! [`upgrade`](crate::upgrade)): each direction keeps its progress in a [`Flow`] that lives
//! outside its future (bytes read but not yet written, the splice pipe and what it holds,
//! whether the sender has finished), and every await leaves that state whole. So stopping a
//! relay is just dropping its futures, and a new process given the sockets and the flows goes
//! on exactly where this one stopped: no byte lost, repeated or reordered.

mod stops;
pub mod task;

pub use stops::Stops;
use stops::{Stop, WhenWoken};

use std::cell::RefCell;
use std::future::Future;
use std::io;
use std::pin::{Pin, pin};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use prometheus::IntCounter;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, Interest};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Bytes a direction copies through user space in large reads before it switches to
/// `splice(2)`.
const SPLICE_AFTER: u64 = 256 * 1024;

/// A read at least this large counts towards [`SPLICE_AFTER`]. Smaller reads are frames of an
/// interactive stream (an AppStream frame is about 1,200 bytes): splicing one costs three
/// syscalls where copying costs two, so such a direction stays on the copy path however many
/// bytes it carries over the hours.
const LARGE_READ: usize = BUFFER / 2;

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
    /// A direction went bulk but no pipe worth splicing through could be had (the per-user
    /// pipe budget, `fs.pipe-user-pages-soft`, was used up), so it was copied instead.
    pub pipe_fallback: bool,
}

/// The live counters a tunnel adds to.
pub struct Counters<'a> {
    pub upstream: &'a IntCounter,
    pub downstream: &'a IntCounter,
    /// This tunnel's own totals, readable while it runs (the status page shows them).
    pub totals: &'a ByteTotals,
}

/// One tunnel's bytes so far, each way.
#[derive(Debug, Default)]
pub struct ByteTotals {
    /// Client to origin.
    pub upstream: AtomicU64,
    /// Origin to client.
    pub downstream: AtomicU64,
}

impl ByteTotals {
    /// Adds (client to origin, origin to client): a handed-over tunnel's history.
    pub fn add(&self, (upstream, downstream): (u64, u64)) {
        self.upstream.fetch_add(upstream, Ordering::Relaxed);
        self.downstream.fetch_add(downstream, Ordering::Relaxed);
    }
}

/// Looks at the client's bytes as they are forwarded, never holding one back (the
/// `sni = "log"` check reads its ClientHello this way). Returns `false` once it has seen
/// enough; it is not called again.
pub type Tap<'a> = &'a mut (dyn FnMut(&[u8]) -> bool + Send);

/// The client side of a tunnel as it opens: what the client already sent behind its CONNECT
/// head (it goes to the origin first), and who watches what it sends.
pub struct FromClient<'a> {
    pub early: Bytes,
    pub tap: Option<Tap<'a>>,
}

impl FromClient<'_> {
    pub fn early(early: Bytes) -> FromClient<'static> {
        FromClient { early, tap: None }
    }
}

/// Shows `bytes` to the tap; keeps it only while it wants more.
fn show<'a>(tap: Option<Tap<'a>>, bytes: &[u8]) -> Option<Tap<'a>> {
    let tap = tap?;
    (bytes.is_empty() || tap(bytes)).then_some(tap)
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
    from_client: FromClient<'_>,
    upstream: TcpStream,
    idle_timeout: Duration,
    counters: Counters<'_>,
    abort: &CancellationToken,
) -> Totals {
    let never = CancellationToken::new();
    let stops = Stops {
        abort,
        park: &never,
    };
    let flows = Flows::opening(from_client.early);
    let tunnel = Plain {
        client,
        origin: upstream,
        flows,
        idle_for: Duration::ZERO,
    };
    match relay_plain(mode, tunnel, from_client.tap, idle_timeout, counters, stops).await {
        Relayed::Ended(totals) => totals,
        Relayed::Parked(_) => unreachable!("a token nobody holds never fires"),
    }
}

/// A plain-TCP tunnel: its two sockets and where each direction stands. Parked, it is
/// everything another process needs to go on.
pub struct Plain {
    pub client: TcpStream,
    pub origin: TcpStream,
    pub flows: Flows,
    /// How long the tunnel had been idle when it (re)started here, so the idle deadline
    /// carries over a handover.
    pub idle_for: Duration,
}

/// How a parkable relay finished.
pub enum Relayed {
    Ended(Totals),
    /// Paused for a handover; nothing was lost (see [`Flow`]).
    Parked(Box<Plain>),
}

/// Both directions' progress.
#[derive(Debug, Default)]
pub struct Flows {
    /// Client to origin.
    pub up: Flow,
    /// Origin to client.
    pub down: Flow,
}

impl Flows {
    /// A tunnel about to start: the client's early bytes go to the origin first.
    pub fn opening(early: Bytes) -> Flows {
        Flows {
            up: Flow {
                pending: early.to_vec(),
                early: true,
                ..Flow::default()
            },
            down: Flow::default(),
        }
    }
}

/// One direction's progress, kept outside the future that moves it, so that dropping the
/// future at any await leaves nothing behind: bytes read but not yet written stay in
/// `pending`, bytes spliced into the pipe stay counted in `in_pipe`.
#[derive(Debug, Default)]
pub struct Flow {
    /// Read from the sender, not yet (all) written to the receiver.
    pub pending: Vec<u8>,
    /// `pending` holds the client's early bytes, not counted yet.
    pub early: bool,
    /// Bytes copied in large reads, towards the switch to splicing.
    pub bulk: u64,
    /// The sender finished and the receiver's write half was shut down.
    pub finished: bool,
    /// The splice pipe, once this direction went bulk, with the bytes it holds.
    pub pipe: Option<PipeState>,
    /// Splicing was wanted but no pipe could be had; copied instead.
    pub pipe_fallback: bool,
}

/// A direction's splice pipe: its two ends and how many bytes sit in it.
#[derive(Debug)]
pub struct PipeState {
    pub read_end: std::os::fd::OwnedFd,
    pub write_end: std::os::fd::OwnedFd,
    pub in_pipe: usize,
}

/// Relays a plain-TCP tunnel until it ends, or until `stops.park` fires; then the sockets
/// and both flows come back for a new process to continue.
///
/// An `async` block rather than an `async fn`: an async fn rebinds its arguments, and the
/// compiler keeps both copies in the future, which lives (and stays resident) as long as
/// the tunnel. The same holds for the task functions that await this one.
#[expect(
    clippy::manual_async_fn,
    reason = "an async fn keeps its arguments twice"
)]
pub fn relay_plain(
    mode: Mode,
    mut tunnel: Plain,
    tap: Option<Tap<'_>>,
    idle_timeout: Duration,
    counters: Counters<'_>,
    stops: Stops<'_>,
) -> impl Future<Output = Relayed> {
    async move {
        let meter = Meter::resumed(counters, tunnel.idle_for);
        let (client, origin) = (&tunnel.client, &tunnel.origin);
        let (up_flow, down_flow) = (&mut tunnel.flows.up, &mut tunnel.flows.down);
        let end = {
            let up = pin!(forward(
                mode,
                client,
                origin,
                meter.upstream(),
                tap,
                up_flow
            ));
            let down = pin!(forward(
                mode,
                origin,
                client,
                meter.downstream(),
                None,
                down_flow
            ));
            meter.run(up, down, idle_timeout, stops).await
        };
        let flows = &tunnel.flows;
        let pipe_fallback = flows.up.pipe_fallback || flows.down.pipe_fallback;
        match end {
            Some(end) => Relayed::Ended(meter.totals(end, pipe_fallback)),
            None => {
                tunnel.idle_for = meter.activity.idle_for();
                Relayed::Parked(Box::new(tunnel))
            }
        }
    }
}

/// The general relay: any client stream, a TCP origin. Never parked: a TLS session's state
/// cannot move to another process.
pub async fn relay_streams<C>(
    client: C,
    from_client: FromClient<'_>,
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
        let FromClient { early, tap } = from_client;
        let tap = {
            let early = early;
            let tap = show(tap, &early);
            origin_write.write_all(&early).await?;
            meter.upstream().moved(early.len());
            tap
        };
        pump(&mut client_read, &mut origin_write, meter.upstream(), tap).await
    };
    let down = pump(
        &mut origin_read,
        &mut client_write,
        meter.downstream(),
        None,
    );
    let never = CancellationToken::new();
    let stops = Stops {
        abort,
        park: &never,
    };
    let (up, down) = (pin!(up), pin!(down));
    let end = meter.run(up, down, idle_timeout, stops).await;
    meter.totals(end.unwrap_or(End::Shutdown), false)
}

/// One tunnel's bookkeeping: bytes each way (live counters and totals) and the last activity.
struct Meter<'a> {
    counters: Counters<'a>,
    activity: Activity,
}

impl<'a> Meter<'a> {
    fn new(counters: Counters<'a>) -> Meter<'a> {
        Meter {
            counters,
            activity: Activity::new(),
        }
    }

    /// A tunnel that had already been idle for `idle_for` when it came here.
    fn resumed(counters: Counters<'a>, idle_for: Duration) -> Meter<'a> {
        Meter {
            counters,
            activity: Activity::idle_since(idle_for),
        }
    }

    fn upstream(&self) -> Direction<'_> {
        Direction {
            counter: self.counters.upstream,
            total: &self.counters.totals.upstream,
            activity: &self.activity,
        }
    }

    fn downstream(&self) -> Direction<'_> {
        Direction {
            counter: self.counters.downstream,
            total: &self.counters.totals.downstream,
            activity: &self.activity,
        }
    }

    /// Drives both directions to the end, or until the tunnel idles out or is stopped;
    /// `None` when it was parked. The directions come pinned in the caller's frame: moved
    /// in, they would be stored twice in a long-lived tunnel's task.
    async fn run(
        &self,
        up: Pin<&mut impl Future<Output = io::Result<()>>>,
        down: Pin<&mut impl Future<Output = io::Result<()>>>,
        idle_timeout: Duration,
        stops: Stops<'_>,
    ) -> Option<End> {
        // Polled only when its own timer or tokens wake the task, not on every frame's wake.
        let outside = WhenWoken::new(async {
            tokio::select! {
                biased;
                () = self.activity.idle(idle_timeout) => Some(End::Idle),
                stop = stops.fired() => match stop {
                    Stop::Abort => Some(End::Shutdown),
                    Stop::Park => None,
                },
            }
        });
        // Biased: no random start drawn per frame; the relay's own ending comes first.
        tokio::select! {
            biased;
            result = futures_util::future::try_join(up, down) => Some(match result {
                Ok(_) => End::Closed,
                Err(_) => End::Error,
            }),
            end = outside => end,
        }
    }

    fn totals(&self, end: End, pipe_fallback: bool) -> Totals {
        Totals {
            upstream: self.counters.totals.upstream.load(Ordering::Relaxed),
            downstream: self.counters.totals.downstream.load(Ordering::Relaxed),
            end,
            pipe_fallback,
        }
    }
}

/// Copies one direction of a generic stream until EOF, then passes the half-close on.
async fn pump<R, W>(
    reader: &mut R,
    writer: &mut W,
    direction: Direction<'_>,
    mut tap: Option<Tap<'_>>,
) -> io::Result<()>
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
        tap = show(tap, &buffer[..n]);
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

/// Moves one direction until EOF, then passes the half-close on. Every await leaves `flow`
/// whole (see [`Flow`]), so this future may be dropped at any of them.
async fn forward(
    mode: Mode,
    from: &TcpStream,
    to: &TcpStream,
    direction: Direction<'_>,
    mut tap: Option<Tap<'_>>,
    flow: &mut Flow,
) -> io::Result<()> {
    if flow.finished {
        return Ok(());
    }
    if !flow.pending.is_empty() {
        tap = show(tap, &flow.pending);
        if flow.early {
            // The client's early bytes, on a tunnel's first start: counted as they go.
            direction.moved(flow.pending.len());
            flow.early = false;
        }
        write_pending(to, flow).await?;
    }
    match mode {
        // Handshakes and interactive traffic are small: a pipe (two more descriptors and
        // syscalls to make and close) pays off only once a direction carries bulk data.
        // A tap has always seen enough by then (a ClientHello is far below the switch).
        #[cfg(target_os = "linux")]
        Mode::Splice if !flow.pipe_fallback => loop {
            let bulk = flow.pipe.is_some()
                || copy_forward(from, to, &direction, SPLICE_AFTER, &mut tap, flow).await?
                    == Copied::Bulk;
            if !bulk {
                break;
            }
            match splice::forward(from, to, &direction, flow).await? {
                splice::Spliced::Eof => break,
                splice::Spliced::NoPipe => {
                    flow.pipe_fallback = true;
                    copy_forward(from, to, &direction, u64::MAX, &mut None, flow).await?;
                    break;
                }
                // The bulk part is over (a download done, a stream back to small frames):
                // the pipe goes, and copying goes on until the next bulk stretch.
                splice::Spliced::Small => {
                    flow.pipe = None;
                    flow.bulk = 0;
                }
            }
        },
        _ => {
            copy_forward(from, to, &direction, u64::MAX, &mut tap, flow).await?;
        }
    }
    // The peer may already be gone; the other direction decides how the tunnel ends.
    let _ = rustix::net::shutdown(to, rustix::net::Shutdown::Write);
    flow.finished = true;
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

/// The portable path, and the start of every tunnel on the splice path. Stops early once
/// `flow.bulk` reaches `budget`.
///
/// Bytes are read into this thread's scratch buffer and written on at once; only what the
/// receiver cannot take right away is copied into memory the tunnel owns until it is sent. So
/// an idle tunnel holds no buffer, and a flowing one allocates only while its receiver lags.
async fn copy_forward(
    from: &TcpStream,
    to: &TcpStream,
    direction: &Direction<'_>,
    budget: u64,
    tap: &mut Option<Tap<'_>>,
    flow: &mut Flow,
) -> io::Result<Copied> {
    loop {
        if flow.bulk >= budget {
            return Ok(Copied::Bulk);
        }
        let mut step = Step::Nothing;
        let read = from.try_io(Interest::READABLE, || {
            let drained;
            (step, drained) = read_and_send(from, to, tap)?;
            // A read that did not fill the buffer emptied the socket: saying so clears the
            // readiness tokio holds (as its own `poll_read` does), which saves the read that
            // would only have returned EAGAIN.
            if drained {
                Err(io::ErrorKind::WouldBlock.into())
            } else {
                Ok(())
            }
        });
        match read {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
        match step {
            Step::Nothing => read_ready(from).await?,
            Step::Eof => return Ok(Copied::Eof),
            Step::Sent(n) => {
                direction.moved(n);
                flow.bulk += large(n);
            }
            Step::Partly { rest, read } => {
                direction.moved(read);
                flow.bulk += large(read);
                flow.pending = rest;
                write_pending(to, flow).await?;
            }
        }
    }
}

/// What a read of `n` bytes adds towards splicing.
fn large(n: usize) -> u64 {
    if n >= LARGE_READ { n as u64 } else { 0 }
}

/// Writes `flow.pending` out. Cancel-safe: what is written leaves `pending` at once.
async fn write_pending(to: &TcpStream, flow: &mut Flow) -> io::Result<()> {
    while !flow.pending.is_empty() {
        write_ready(to).await?;
        match to.try_write(&flow.pending) {
            Ok(n) => {
                flow.pending.drain(..n);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    flow.pending = Vec::new();
    Ok(())
}

/// Waits until `socket` may have bytes to read, through its one reader slot rather than
/// `readable()`'s list of waiters. The slot keeps only the latest waker, which is enough:
/// a direction is the only reader of its sender, and nothing else waits on a tunnel's
/// sockets while it relays. It costs the event loop less per frame: in a profile of 300
/// streaming tunnels, waking tasks and waiting for readiness took 2.4% of portcullis'
/// samples through the list and 0.6-0.8% through the slots.
async fn read_ready(socket: &TcpStream) -> io::Result<()> {
    std::future::poll_fn(|cx| socket.poll_read_ready(cx)).await
}

/// As [`read_ready`], for writing: a direction is the only writer of its receiver.
async fn write_ready(socket: &TcpStream) -> io::Result<()> {
    std::future::poll_fn(|cx| socket.poll_write_ready(cx)).await
}

/// What one read-and-send did.
enum Step {
    /// Nothing to read (the readiness was stale).
    Nothing,
    Eof,
    /// `n` bytes read and all sent.
    Sent(usize),
    /// `read` bytes read; the receiver took only some, `rest` is still to go.
    Partly {
        rest: Vec<u8>,
        read: usize,
    },
}

thread_local! {
    /// Where copied bytes pass through. Per thread rather than per tunnel: nothing is held
    /// across an await, and a worker runs one read at a time.
    static SCRATCH: RefCell<Box<[u8]>> = RefCell::new(vec![0u8; BUFFER].into_boxed_slice());
}

/// Reads once into the scratch buffer and sends what it got; also says whether the read
/// drained the socket.
fn read_and_send(
    from: &TcpStream,
    to: &TcpStream,
    tap: &mut Option<Tap<'_>>,
) -> io::Result<(Step, bool)> {
    SCRATCH.with_borrow_mut(|buffer| {
        let n = match from.try_read(buffer) {
            Ok(0) => return Ok((Step::Eof, false)),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok((Step::Nothing, true)),
            Err(e) => return Err(e),
        };
        if tap.is_some() {
            *tap = show(tap.take(), &buffer[..n]);
        }
        let sent = match to.try_write(&buffer[..n]) {
            Ok(sent) => sent,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
            Err(e) => return Err(e),
        };
        let step = if sent == n {
            Step::Sent(n)
        } else {
            Step::Partly {
                rest: buffer[sent..n].to_vec(),
                read: n,
            }
        };
        Ok((step, n < buffer.len()))
    })
}

/// The Linux fast path: socket → pipe → socket with `splice(2)`, no copy through user space.
#[cfg(target_os = "linux")]
mod splice {
    use std::io;
    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use rustix::pipe::{
        PipeFlags, SpliceFlags, fcntl_getpipe_size, fcntl_setpipe_size, pipe_with, splice,
    };
    use tokio::io::Interest;
    use tokio::net::TcpStream;

    use super::{Direction, Flow, PipeState};

    /// A pipe smaller than this (the kernel's default) is not worth splicing through: past
    /// the per-user pipe budget the kernel hands out two-page pipes, and copying beats those.
    const MIN_PIPE: usize = 64 * 1024;

    /// The most one pipe grows to. Pipe size is what bulk splicing costs most: on the benchmark
    /// machine a single tunnel took about half the CPU per GiB through 1 MiB pipes that it
    /// took through 64 KiB ones.
    const MAX_PIPE: usize = 1024 * 1024;

    /// Pipe capacity held by this process, in bytes.
    static HELD: AtomicUsize = AtomicUsize::new(0);

    /// How much pipe capacity growing may take: half the kernel's per-user budget
    /// (`fs.pipe-user-pages-soft`), so a few bulk transfers can never use it up and leave
    /// the next tunnels with two-page pipes.
    fn growth_budget() -> usize {
        static BUDGET: OnceLock<usize> = OnceLock::new();
        *BUDGET.get_or_init(|| {
            let pages = std::fs::read_to_string("/proc/sys/fs/pipe-user-pages-soft")
                .ok()
                .and_then(|s| s.trim().parse::<usize>().ok())
                .unwrap_or(16384);
            match pages {
                0 => usize::MAX,
                pages => pages.saturating_mul(4096) / 2,
            }
        })
    }

    /// One direction's pipe, borrowed from its [`Flow`] while splicing. It starts at the
    /// kernel's default size and grows while the transfer keeps filling it, so a video stream
    /// keeps a small pipe and a download gets a large one.
    struct Pipe<'a> {
        state: &'a mut PipeState,
        capacity: usize,
    }

    impl<'a> Pipe<'a> {
        /// Takes `flow`'s pipe, making one if it has none yet; `None` when the kernel only
        /// gives a pipe too small to be worth it.
        fn of(flow: &'a mut Flow) -> io::Result<Option<Pipe<'a>>> {
            if flow.pipe.is_none() {
                let (read_end, write_end) = pipe_with(PipeFlags::CLOEXEC | PipeFlags::NONBLOCK)?;
                if fcntl_getpipe_size(&write_end)? < MIN_PIPE {
                    return Ok(None);
                }
                flow.pipe = Some(PipeState {
                    read_end,
                    write_end,
                    in_pipe: 0,
                });
            }
            let state = flow.pipe.as_mut().expect("set above");
            let capacity = fcntl_getpipe_size(&state.write_end)?;
            HELD.fetch_add(capacity, Ordering::Relaxed);
            Ok(Some(Pipe { state, capacity }))
        }

        /// Quadruples the pipe, within [`MAX_PIPE`] and the growth budget. The kernel may
        /// refuse too (`pipe-max-size`, the per-user budget); then the pipe stays as it is.
        fn grow(&mut self) {
            let want = (self.capacity * 4).min(MAX_PIPE);
            let more = want.saturating_sub(self.capacity);
            if more == 0 || HELD.load(Ordering::Relaxed) + more > growth_budget() {
                return;
            }
            if let Ok(capacity) = fcntl_setpipe_size(&self.state.write_end, want) {
                HELD.fetch_add(capacity.saturating_sub(self.capacity), Ordering::Relaxed);
                self.capacity = self.capacity.max(capacity);
            }
        }
    }

    /// The capacity is counted while a relay holds the pipe; a parked pipe travels with its
    /// flow and is counted again wherever it is taken up.
    impl Drop for Pipe<'_> {
        fn drop(&mut self) {
            HELD.fetch_sub(self.capacity, Ordering::Relaxed);
        }
    }

    /// Why splicing stopped.
    pub(super) enum Spliced {
        /// The sender finished.
        Eof,
        /// No pipe worth using could be had; nothing was moved.
        NoPipe,
        /// [`SMALL_STREAK`] small reads in a row, and the pipe is empty: copying is cheaper.
        Small,
    }

    /// Splices in a row that moved less than a large read before a direction goes back to
    /// copying: a couple of seconds of an interactive stream, far more than the pauses of a
    /// bulk transfer.
    const SMALL_STREAK: u32 = 64;

    /// Splices until EOF, or until the traffic turns small. Bytes in the pipe are counted in
    /// the flow, so a pause at any await leaves them there for whoever goes on.
    pub(super) async fn forward(
        from: &TcpStream,
        to: &TcpStream,
        direction: &Direction<'_>,
        flow: &mut Flow,
    ) -> io::Result<Spliced> {
        let Some(mut pipe) = Pipe::of(flow)? else {
            return Ok(Spliced::NoPipe);
        };
        let flags = SpliceFlags::MOVE | SpliceFlags::NONBLOCK;
        let mut small = 0;
        loop {
            while pipe.state.in_pipe > 0 {
                super::write_ready(to).await?;
                let state = &mut *pipe.state;
                match to.try_io(Interest::WRITABLE, || {
                    Ok(splice(
                        &state.read_end,
                        None,
                        to,
                        None,
                        state.in_pipe,
                        flags,
                    )?)
                }) {
                    Ok(m) => state.in_pipe -= m,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
            }
            if small >= SMALL_STREAK {
                return Ok(Spliced::Small);
            }
            super::read_ready(from).await?;
            let capacity = pipe.capacity;
            let write_end = &pipe.state.write_end;
            let filled = from.try_io(Interest::READABLE, || {
                Ok(splice(from, None, write_end, None, capacity, flags)?)
            });
            let n = match filled {
                Ok(0) => return Ok(Spliced::Eof),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            };
            small = if n < super::LARGE_READ { small + 1 } else { 0 };
            pipe.state.in_pipe = n;
            direction.moved(n);
            if n == pipe.capacity {
                pipe.grow();
            }
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

    /// As if the last byte had moved `idle_for` ago.
    fn idle_since(idle_for: Duration) -> Activity {
        let now = Instant::now();
        Activity {
            start: now.checked_sub(idle_for).unwrap_or(now),
            last_ms: AtomicU64::new(0),
        }
    }

    /// When the last byte moved.
    fn last(&self) -> Instant {
        self.start + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }

    fn idle_for(&self) -> Duration {
        Instant::now().saturating_duration_since(self.last())
    }

    fn touch(&self) {
        let ms = self.start.elapsed().as_millis() as u64;
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    /// Resolves once nothing has moved for `timeout`. Wakes once per `timeout` at most, not
    /// per byte.
    async fn idle(&self, timeout: Duration) {
        loop {
            let deadline = self.last() + timeout;
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    }
}
