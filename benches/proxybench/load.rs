//! The workloads: tunnel set-up cycles, bulk transfer, idle tunnels.
//!
//! Every tunnel opens the way an AppStream client's does: `CONNECT host:443`, wait for the 200,
//! then a TLS ClientHello naming the host (portcullis checks SNI by default; the other peers
//! just relay it). The set-up cycle is: connect, CONNECT, 200, ClientHello out and echoed back
//! (93 bytes for the echo host, standing in for the 64-byte echo), close.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::origin;
use crate::procfs;

/// A cycle that takes longer than this counts as failed.
pub const CYCLE_TIMEOUT: Duration = Duration::from_secs(5);

/// Where and how a tunnel to one origin name is opened.
#[derive(Clone)]
pub struct Target {
    /// The proxy, or the origin itself for the direct peer.
    pub connect_to: SocketAddr,
    /// `CONNECT host:443 ...`, absent for the direct peer.
    pub head: Option<Arc<[u8]>>,
    /// The first bytes of the tunnel.
    pub hello: Arc<[u8]>,
    /// The client's own address, when it should not be the kernel's pick (127.0.0.1): the
    /// status figure spreads its tunnels over many client addresses.
    pub bind: Option<IpAddr>,
}

impl Target {
    pub fn new(proxy: Option<SocketAddr>, host: &'static str) -> Target {
        let origin = origin::addr_of(host);
        let head = proxy.map(|_| {
            format!(
                "CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\nUser-Agent: proxybench\r\n\r\n",
                port = origin::PORT
            )
            .into_bytes()
            .into()
        });
        Target {
            connect_to: proxy.unwrap_or(origin),
            head,
            hello: client_hello(host).into(),
            bind: None,
        }
    }

    /// The same tunnel, opened from `client` (any address of 127.0.0.0/8 is on loopback).
    pub fn opened_from(&self, client: IpAddr) -> Target {
        Target {
            bind: Some(client),
            ..self.clone()
        }
    }
}

/// A minimal TLS 1.2 ClientHello with `server_name` = `host`: what a TLS client sends first.
pub fn client_hello(host: &str) -> Vec<u8> {
    let name = host.as_bytes();
    let len16 = |n: usize| u16::try_from(n).expect("fits a TLS length").to_be_bytes();
    let mut server_name = Vec::new();
    server_name.extend_from_slice(&len16(name.len() + 3)); // server_name_list
    server_name.push(0); // host_name
    server_name.extend_from_slice(&len16(name.len()));
    server_name.extend_from_slice(name);
    let mut extensions = Vec::new();
    extensions.extend_from_slice(&[0, 0]); // server_name
    extensions.extend_from_slice(&len16(server_name.len()));
    extensions.extend_from_slice(&server_name);
    let mut body = Vec::new();
    body.extend_from_slice(&[3, 3]); // TLS 1.2
    body.extend_from_slice(&[0x5a; 32]); // random
    body.push(0); // no session id
    body.extend_from_slice(&[0, 4, 0x13, 0x01, 0xc0, 0x2f]); // two cipher suites
    body.extend_from_slice(&[1, 0]); // compression: null
    body.extend_from_slice(&len16(extensions.len()));
    body.extend_from_slice(&extensions);
    let mut handshake = vec![1]; // ClientHello
    handshake.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
    handshake.extend_from_slice(&body);
    let mut record = vec![0x16, 3, 1]; // handshake record
    record.extend_from_slice(&len16(handshake.len()));
    record.extend_from_slice(&handshake);
    record
}

/// Connects and, through a proxy, CONNECTs and reads the 200.
pub async fn open(target: &Target) -> io::Result<TcpStream> {
    let mut stream = match target.bind {
        None => TcpStream::connect(target.connect_to).await?,
        Some(client) => {
            let socket = TcpSocket::new_v4()?;
            socket.bind(SocketAddr::new(client, 0))?;
            socket.connect(target.connect_to).await?
        }
    };
    stream.set_nodelay(true)?;
    if let Some(head) = &target.head {
        stream.write_all(head).await?;
        read_response_head(&mut stream).await?;
    }
    Ok(stream)
}

async fn read_response_head(stream: &mut TcpStream) -> io::Result<()> {
    let mut buf = [0u8; 2048];
    let mut len = 0;
    loop {
        let n = stream.read(&mut buf[len..]).await?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "proxy closed before a full response head",
            ));
        }
        len += n;
        if let Some(end) = buf[..len].windows(4).position(|w| w == b"\r\n\r\n") {
            let head = &buf[..end];
            // Bytes behind the head are the origin's (a download source talks first); they
            // are tunnel payload and are dropped here like any other downloaded bytes.
            let ok = head.starts_with(b"HTTP/1.") && head.get(8..13) == Some(b" 200 ");
            if !ok {
                let line =
                    String::from_utf8_lossy(head.split(|&b| b == b'\r').next().unwrap_or(b""));
                return Err(io::Error::other(format!("proxy answered {line:?}")));
            }
            return Ok(());
        }
        if len == buf.len() {
            return Err(io::Error::other("response head over 2 KiB"));
        }
    }
}

/// Opens a tunnel and passes the ClientHello through it and back (the echo origin).
pub async fn open_echoed(target: &Target) -> io::Result<TcpStream> {
    let mut stream = open(target).await?;
    stream.write_all(&target.hello).await?;
    let mut back = vec![0u8; target.hello.len()];
    stream.read_exact(&mut back).await?;
    if back[..] != target.hello[..] {
        return Err(io::Error::other("echo differs from what was sent"));
    }
    Ok(stream)
}

/// One set-up cycle: connect, CONNECT, 200, ClientHello echoed, close.
pub async fn cycle(target: &Target) -> io::Result<()> {
    let stream = open_echoed(target).await?;
    drop(stream);
    Ok(())
}

/// CPU counters of the processes whose cost is measured.
#[derive(Clone, Copy)]
pub struct Meter {
    pub proxy: Option<u32>,
    pub dns: u32,
    /// The two ends of every connection: this process (the clients) and the origins.
    pub ends: [u32; 2],
    pub ticks: f64,
}

#[derive(Clone, Copy)]
struct Reading {
    proxy: f64,
    proxy_system: f64,
    dns: f64,
    ends_system: f64,
}

impl Meter {
    fn read(&self) -> Reading {
        let (user, system) = self
            .proxy
            .map_or((0.0, 0.0), |pid| procfs::cpu_split(pid, self.ticks));
        Reading {
            proxy: user + system,
            proxy_system: system,
            dns: procfs::cpu_seconds(self.dns, self.ticks),
            ends_system: self
                .ends
                .iter()
                .map(|&pid| procfs::system_seconds(pid, self.ticks))
                .sum(),
        }
    }

    /// Reads the counters at `at` on a thread of its own, so a busy runtime cannot delay it.
    fn read_at(&self, at: Instant) -> std::thread::JoinHandle<Reading> {
        let meter = *self;
        let at = at.into_std();
        std::thread::spawn(move || {
            std::thread::sleep(at.saturating_duration_since(std::time::Instant::now()));
            meter.read()
        })
    }
}

/// One set-up measurement.
#[derive(Debug, Clone, Default)]
pub struct Setup {
    pub rate: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub cycles: u64,
    pub errors: u64,
    pub first_error: Option<String>,
    /// Proxy CPU per completed cycle, µs.
    pub cpu_us: f64,
    /// The part of `cpu_us` spent in the kernel.
    pub system_us: f64,
    /// Kernel CPU of the clients and the origin per completed cycle, µs.
    pub ends_system_us: f64,
    /// DNS server CPU per completed cycle, µs.
    pub dns_us: f64,
}

/// `concurrency` clients doing set-up cycles back to back; counted over `window` after `warmup`.
pub async fn setup(
    target: &Target,
    concurrency: usize,
    warmup: Duration,
    window: Duration,
    meter: Meter,
) -> Setup {
    let t0 = Instant::now() + warmup;
    let t1 = t0 + window;
    let before = meter.read_at(t0);
    let after = meter.read_at(t1);
    let mut tasks = JoinSet::new();
    for _ in 0..concurrency {
        let target = target.clone();
        tasks.spawn(async move {
            let mut latencies = Vec::new();
            let mut done = 0u64;
            let mut errors = 0u64;
            let mut first_error = None;
            loop {
                let start = Instant::now();
                if start >= t1 {
                    break;
                }
                let result = tokio::time::timeout(CYCLE_TIMEOUT, cycle(&target)).await;
                let end = Instant::now();
                let in_window = end >= t0 && end <= t1;
                match result {
                    Ok(Ok(())) => {
                        if in_window {
                            done += 1;
                            if start >= t0 {
                                latencies.push((end - start).as_nanos() as u64);
                            }
                        }
                    }
                    failed => {
                        if in_window {
                            errors += 1;
                        }
                        first_error.get_or_insert_with(|| match failed {
                            Ok(Err(e)) => e.to_string(),
                            _ => "cycle timed out".to_string(),
                        });
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                }
            }
            (latencies, done, errors, first_error)
        });
    }
    let mut latencies = Vec::new();
    let mut result = Setup::default();
    while let Some(joined) = tasks.join_next().await {
        let (lat, done, errors, first_error) = joined.expect("a set-up task does not panic");
        latencies.extend(lat);
        result.cycles += done;
        result.errors += errors;
        if result.first_error.is_none() {
            result.first_error = first_error;
        }
    }
    let before = before.join().expect("meter thread");
    let after = after.join().expect("meter thread");
    latencies.sort_unstable();
    let pct = |p: usize| {
        if latencies.is_empty() {
            f64::NAN
        } else {
            latencies[(latencies.len() * p / 100).min(latencies.len() - 1)] as f64 / 1e3
        }
    };
    result.rate = result.cycles as f64 / window.as_secs_f64();
    result.p50_us = pct(50);
    result.p99_us = pct(99);
    let per_cycle = |cpu: f64| {
        if result.cycles == 0 {
            f64::NAN
        } else {
            cpu / result.cycles as f64 * 1e6
        }
    };
    (result.cpu_us, result.system_us) = if meter.proxy.is_some() {
        (
            per_cycle(after.proxy - before.proxy),
            per_cycle(after.proxy_system - before.proxy_system),
        )
    } else {
        (f64::NAN, f64::NAN)
    };
    result.ends_system_us = per_cycle(after.ends_system - before.ends_system);
    result.dns_us = per_cycle(after.dns - before.dns);
    result
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Client to origin (the sink).
    Up,
    /// Origin (the source) to client.
    Down,
}

/// One bulk measurement.
#[derive(Debug, Clone, Default)]
pub struct Bulk {
    pub gbit: f64,
    /// Proxy CPU seconds per GiB relayed.
    pub cpu_per_gib: f64,
    /// The part of `cpu_per_gib` spent in the kernel.
    pub system_per_gib: f64,
    /// Kernel CPU seconds of the clients and the origin per GiB.
    pub ends_system_per_gib: f64,
}

/// `tunnels` tunnels moving bytes one way as fast as they can; counted at the receiving end's
/// side (the client's writes or reads; in steady state the bytes in flight do not change).
pub async fn bulk(
    target: &Target,
    direction: Direction,
    tunnels: usize,
    warmup: Duration,
    window: Duration,
    meter: Meter,
) -> io::Result<Bulk> {
    let mut streams = Vec::with_capacity(tunnels);
    for _ in 0..tunnels {
        let mut stream = open(target).await?;
        stream.write_all(&target.hello).await?;
        streams.push(stream);
    }
    let bytes = Arc::new(AtomicU64::new(0));
    let stop = CancellationToken::new();
    let mut tasks = JoinSet::new();
    for mut stream in streams {
        let bytes = bytes.clone();
        let stop = stop.clone();
        tasks.spawn(async move {
            let mut buf = vec![0x17u8; origin::CHUNK];
            loop {
                let moved = tokio::select! {
                    () = stop.cancelled() => return Ok(()),
                    moved = async {
                        match direction {
                            Direction::Up => stream.write(&buf).await,
                            Direction::Down => stream.read(&mut buf).await,
                        }
                    } => moved?,
                };
                if moved == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "tunnel closed mid-transfer",
                    ));
                }
                bytes.fetch_add(moved as u64, Ordering::Relaxed);
            }
        });
    }
    let t0 = Instant::now() + warmup;
    let t1 = t0 + window;
    tokio::time::sleep_until(t0).await;
    let (b0, c0, i0) = (bytes.load(Ordering::Relaxed), meter.read(), Instant::now());
    tokio::time::sleep_until(t1).await;
    let (b1, c1, i1) = (bytes.load(Ordering::Relaxed), meter.read(), Instant::now());
    stop.cancel();
    let mut failure = None;
    while let Some(joined) = tasks.join_next().await {
        if let Ok(Err(e)) = joined {
            failure.get_or_insert(e);
        }
    }
    if let Some(e) = failure {
        return Err(e);
    }
    let moved = (b1 - b0) as f64;
    let secs = (i1 - i0).as_secs_f64();
    let gib = moved / f64::from(1u32 << 30);
    let per_gib = |seconds: f64| if moved > 0.0 { seconds / gib } else { f64::NAN };
    let proxied = |seconds: f64| {
        if meter.proxy.is_some() {
            per_gib(seconds)
        } else {
            f64::NAN
        }
    };
    Ok(Bulk {
        gbit: moved * 8.0 / secs / 1e9,
        cpu_per_gib: proxied(c1.proxy - c0.proxy),
        system_per_gib: proxied(c1.proxy_system - c0.proxy_system),
        ends_system_per_gib: per_gib(c1.ends_system - c0.ends_system),
    })
}

/// Memory held by idle tunnels.
#[derive(Debug, Clone, Default)]
pub struct Idle {
    pub tunnels: usize,
    pub rss_before_kib: u64,
    pub rss_after_kib: u64,
    pub kib_per_tunnel: f64,
    pub fds_per_tunnel: f64,
    /// Why fewer than the tunnels asked for were opened, if so.
    pub limited_by: Option<String>,
}

/// Opens up to `want` tunnels through a fresh proxy process, each with its ClientHello echoed,
/// and leaves them idle; the RSS growth per tunnel is the figure. Fewer are opened when an
/// open-file limit (the proxy's, or this side's) would be hit first.
pub async fn idle(target: &Target, pid: u32, want: usize, shape: Shape) -> io::Result<Idle> {
    const PROBE: usize = 100;
    let rss_before = procfs::rss_kib(pid);
    let fds_before = procfs::fd_count(pid);
    let open_many = |target: &Target, count: usize| {
        let targets = vec![target.clone(); count];
        open_each_as(targets, shape)
    };
    let mut held = open_many(target, PROBE.min(want)).await?;
    let fds_probe = procfs::fd_count(pid);
    let fds_each = (fds_probe.saturating_sub(fds_before) as f64 / held.len() as f64).max(1.0);
    let (more, limited_by) = room(pid, fds_probe, fds_each, want - held.len());
    if more > 0 {
        held.extend(open_many(target, more).await?);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_after = procfs::rss_kib(pid);
    let fds_after = procfs::fd_count(pid);
    let tunnels = held.len();
    drop(held);
    Ok(Idle {
        tunnels,
        rss_before_kib: rss_before,
        rss_after_kib: rss_after,
        kib_per_tunnel: (rss_after as f64 - rss_before as f64) / tunnels as f64,
        fds_per_tunnel: (fds_after as f64 - fds_before as f64) / tunnels as f64,
        limited_by,
    })
}

/// How many of `more` further tunnels fit in the open-file limits of the proxy (which has
/// `fds_now` open and takes `fds_each` per tunnel) and of this process (one per tunnel), and
/// which limit cut the number, if one did.
pub fn room(pid: u32, fds_now: usize, fds_each: f64, more: usize) -> (usize, Option<String>) {
    // Stay well inside the limits: a proxy at its last descriptors fails in ways that say
    // nothing about memory (Squid stops accepting, tinyproxy cannot open a DNS socket).
    let usable = |limit: u64| limit as f64 * 0.85;
    let proxy_room = procfs::nofile_limit(&pid.to_string()).map_or(usize::MAX, |limit| {
        ((usable(limit) - fds_now as f64) / fds_each).max(0.0) as usize
    });
    let own_fds = std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count());
    let own_room = procfs::nofile_limit("self").map_or(usize::MAX, |limit| {
        (usable(limit) - own_fds as f64).max(0.0) as usize
    });
    let mut count = more;
    let mut limited_by = None;
    if proxy_room < count {
        count = proxy_room;
        limited_by = Some(format!(
            "the proxy's open-file limit ({} fds at {fds_each:.1} per tunnel)",
            procfs::nofile_limit(&pid.to_string()).unwrap_or(0)
        ));
    }
    if own_room < count {
        count = own_room;
        limited_by = Some(format!(
            "the load generator's open-file limit ({})",
            procfs::nofile_limit("self").unwrap_or(0)
        ));
    }
    (count, limited_by)
}

/// What an idle tunnel did before it went quiet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// Its ClientHello went through and came back.
    Echoed,
    /// CONNECT, 200, and never a byte.
    Silent,
}

/// Opens one echoed tunnel per target, 64 at a time, and holds them.
pub async fn open_each(targets: Vec<Target>) -> io::Result<Vec<TcpStream>> {
    open_each_as(targets, Shape::Echoed).await
}

/// Opens one tunnel of `shape` per target, 64 at a time, and holds them.
async fn open_each_as(targets: Vec<Target>, shape: Shape) -> io::Result<Vec<TcpStream>> {
    let opened: Vec<io::Result<TcpStream>> = futures_util::stream::iter(targets)
        .map(|target| async move {
            let opening = async {
                match shape {
                    Shape::Echoed => open_echoed(&target).await,
                    Shape::Silent => open(&target).await,
                }
            };
            tokio::time::timeout(Duration::from_secs(10), opening)
                .await
                .unwrap_or_else(|_| Err(io::Error::other("idle tunnel open timed out")))
        })
        .buffer_unordered(64)
        .collect()
        .await;
    opened.into_iter().collect()
}
