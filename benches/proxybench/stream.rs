//! Streaming frames: the load an AppStream session puts on a proxy for hours.
//!
//! `tunnels` tunnels to the echo origin, held open; each sends a 1,200-byte frame 30 times a
//! second from a random phase of its own (so sends are spread, not synchronized) and times
//! every frame's round trip: client → proxy → origin and back. What a user feels is the time
//! each frame gains over a direct connection; what an operator pays is the proxy's CPU per
//! frame and the cores it keeps busy.
//!
//! Each tunnel opens as in the other figures: CONNECT, 200, a ClientHello naming the host,
//! echoed. The harness's portcullis rule keeps the default `sni = "enforce"`, which reads and
//! checks only that first handshake message and relays everything after it unread, so frames
//! pass without an `sni = "off"` rule. They are shaped as TLS application-data records anyway,
//! which is what a streaming session's bytes are after its handshake.
//!
//! Before the first frame every tunnel carries `prime_kib` KiB each way (320 by default, echoed
//! in lockstep), so the window sees tunnels in the state an hours-long stream is in: portcullis
//! copies a direction's first 256 KiB through user space and then moves it to `splice(2)`, and
//! at 36 kB/s a fresh frame stream would cross that line in the middle of the window.
//!
//! One task per tunnel on the load generator's runtime: a `tokio::time::interval` (one timer
//! wheel for all of them; it fires on whole milliseconds) and the tunnel's socket in one
//! `select!`. A frame carries its sequence number, its send time and whether it is counted,
//! so matching an echo is reading it; RTTs go into a preallocated Vec per tunnel and are
//! sorted once at the end.

use std::io;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tokio::time::{Instant, MissedTickBehavior};

use crate::load::{self, Target};
use crate::procfs::{self, Sched};

/// Bytes per frame, both ways: a small video or input frame of a remote-desktop stream.
pub const FRAME: usize = 1200;
/// Frames per second per tunnel, each way.
pub const FPS: u32 = 30;
/// A frame back later than this (three frame times) is a visible stutter: counted as late.
pub const LATE: Duration = Duration::from_millis(100);
/// Frames not back this long after the window are counted as lost.
const GRACE: Duration = Duration::from_secs(2);
/// The lockstep unit of the priming exchange.
const PRIME_CHUNK: usize = 16 * 1024;

/// A TLS application-data record header for a `FRAME`-byte record.
const HEADER: [u8; 5] = {
    let len = (FRAME - 5) as u16;
    [0x17, 3, 3, (len >> 8) as u8, len as u8]
};
// Behind the header: sequence number (8 bytes), send time in ns since the figure's clock
// started (8), 1 if the frame was sent inside the counted window (1).
const SEQ: usize = 5;
const SENT: usize = 13;
const COUNTED: usize = 21;

fn period() -> Duration {
    Duration::from_secs(1) / FPS
}

/// One streaming measurement.
#[derive(Debug, Clone, Default)]
pub struct Stream {
    pub tunnels: usize,
    /// Frames per second asked for: tunnels × `FPS`.
    pub offered: f64,
    /// Frames per second the load generator sent in the window.
    pub sent_rate: f64,
    /// Frames per second sent in the window and echoed back (within `GRACE`).
    pub rate: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
    /// How late the load generator sent its frames (p99, from the timer's due time; includes
    /// up to 1 ms of timer rounding).
    pub send_lateness_p99_us: f64,
    /// Counted frames not back within `GRACE` after the window.
    pub lost: u64,
    /// Counted frames back, but after more than `LATE`.
    pub late: u64,
    /// Ticks the load generator missed inside the window (its timer ran too late to send).
    pub skipped: u64,
    /// Tunnels that failed (read or write error, closed by the other end).
    pub broken: u64,
    pub first_error: Option<String>,
    /// Proxy CPU per round-tripped frame, µs (schedstat, all threads of the proxy's tree).
    pub cpu_us: f64,
    /// The kernel's share of `cpu_us` (from `stat`'s user/system split), µs.
    pub system_us: f64,
    /// The same CPU from `stat` (clock ticks, exited threads included): a cross-check.
    pub stat_cpu_us: f64,
    /// Proxy CPU seconds per wall second.
    pub cores: f64,
    /// Times a proxy thread was put on a CPU, per frame.
    pub slices: f64,
    /// Time proxy threads were runnable but waited for a CPU, per frame, µs.
    pub wait_us: f64,
    /// The load generator's own CPU (its threads; not its children): cores, and µs per frame.
    pub client_cores: f64,
    pub client_us: f64,
    /// Time the load generator's threads were runnable but waited for a CPU, per frame, µs.
    pub client_wait_us: f64,
    /// The origin's CPU, cores.
    pub origin_cores: f64,
    /// Kernel CPU of the tunnel's two ends (the load generator's threads and the origin)
    /// per frame round trip, µs. Between them they make the system calls a relaying proxy
    /// makes (a write and a read at each end), so direct's figure is the kernel's price
    /// for a round trip on this machine: what no proxy can go below.
    pub ends_system_us: f64,
    /// The whole machine's busy cores over the window (everything running, ours or not).
    pub machine_cores: f64,
    /// Cores' worth of time the host took from this virtual machine while it wanted to run.
    pub steal_cores: f64,
    /// What of `machine_cores` (and the time stolen from it) is neither the proxy, the load
    /// generator nor the origin: the idle peers, dnsmasq, the kernel's own threads, and
    /// anything else on the machine.
    pub other_cores: f64,
}

/// The processes whose CPU the figure reads.
#[derive(Clone, Copy)]
pub struct Meters {
    pub proxy: Option<u32>,
    pub origin: u32,
    pub ticks: f64,
}

#[derive(Clone, Copy, Default)]
struct Snapshot {
    proxy: Sched,
    proxy_user: f64,
    proxy_system: f64,
    client: Sched,
    origin: Sched,
    /// Kernel seconds of the load generator's own threads plus the origin's.
    ends_system: f64,
    machine: f64,
    steal: f64,
}

impl Meters {
    fn read(&self) -> (Snapshot, std::time::Instant) {
        let (proxy_user, proxy_system) = self
            .proxy
            .map_or((0.0, 0.0), |pid| procfs::cpu_split(pid, self.ticks));
        let (machine, steal) = procfs::machine_seconds(self.ticks);
        let snapshot = Snapshot {
            proxy: self.proxy.map(procfs::sched_tree).unwrap_or_default(),
            proxy_user,
            proxy_system,
            client: procfs::sched_own(std::process::id()),
            origin: procfs::sched_tree(self.origin),
            ends_system: procfs::system_seconds(std::process::id(), self.ticks)
                + procfs::cpu_split(self.origin, self.ticks).1,
            machine,
            steal,
        };
        (snapshot, std::time::Instant::now())
    }

    /// Reads at `at` on a thread of its own, so a busy runtime cannot delay the reading.
    fn read_at(self, at: Instant) -> std::thread::JoinHandle<(Snapshot, std::time::Instant)> {
        let at = at.into_std();
        std::thread::spawn(move || {
            std::thread::sleep(at.saturating_duration_since(std::time::Instant::now()));
            self.read()
        })
    }
}

/// When one tunnel sends, and which of its frames count.
#[derive(Clone, Copy)]
struct Plan {
    /// Zero of the send times the frames carry.
    clock: Instant,
    /// This tunnel's first tick (its phase).
    first: Instant,
    /// The counted window: frames sent from `start` until `end`; none after `end`.
    start: Instant,
    end: Instant,
    /// Whatever is not back by then is lost.
    give_up: Instant,
}

/// What one tunnel saw of its counted frames.
#[derive(Default)]
struct Tally {
    rtt_ns: Vec<u32>,
    lateness_ns: Vec<u32>,
    sent: u64,
    back: u64,
    late: u64,
    skipped: u64,
    broken: Option<String>,
}

/// Opens `tunnels` tunnels through `target`, primes each with `prime_kib` KiB, streams frames
/// for `warmup` then `window`, and reads the CPU counters around the window. `seed` picks the
/// phases.
pub async fn stream(
    target: &Target,
    tunnels: usize,
    prime_kib: usize,
    warmup: Duration,
    window: Duration,
    meters: Meters,
    seed: u64,
) -> io::Result<Stream> {
    let held = load::open_each(vec![target.clone(); tunnels]).await?;
    let primed: Vec<io::Result<TcpStream>> = futures_util::stream::iter(held)
        .map(|mut stream| async move {
            prime(&mut stream, prime_kib * 1024).await?;
            Ok(stream)
        })
        .buffer_unordered(64)
        .collect()
        .await;
    let held = primed.into_iter().collect::<io::Result<Vec<_>>>()?;

    let clock = Instant::now();
    let begin = clock + Duration::from_millis(20);
    let start = begin + warmup;
    let end = start + window;
    let before = meters.read_at(start);
    let after = meters.read_at(end);
    let capacity = (window.as_secs_f64() * f64::from(FPS)).ceil() as usize + 2;
    let mut random = SplitMix(seed);
    let mut tasks = JoinSet::new();
    for stream in held {
        let plan = Plan {
            clock,
            first: begin + period().mul_f64(random.unit()),
            start,
            end,
            give_up: end + GRACE,
        };
        tasks.spawn(frames(stream, plan, capacity));
    }
    let mut tallies = Vec::with_capacity(tunnels);
    let mut open = Vec::with_capacity(tunnels);
    while let Some(joined) = tasks.join_next().await {
        let (tally, stream) = joined.expect("a streaming task does not panic");
        tallies.push(tally);
        open.push(stream);
    }
    let (before, at0) = before.join().expect("meter thread");
    let (after, at1) = after.join().expect("meter thread");
    // Closed only now: a tunnel closing while the counters are read would take its thread
    // with it in a thread-per-connection proxy (tinyproxy), and schedstat counts live threads.
    drop(open);
    Ok(summarize(
        &tallies,
        tunnels,
        window,
        meters.proxy.is_some(),
        (before, after, (at1 - at0).as_secs_f64()),
    ))
}

/// Echoes `bytes` through the tunnel, `PRIME_CHUNK` at a time.
async fn prime(stream: &mut TcpStream, bytes: usize) -> io::Result<()> {
    let out = vec![0x17u8; PRIME_CHUNK];
    let mut back = vec![0u8; PRIME_CHUNK];
    let mut left = bytes;
    while left > 0 {
        let n = left.min(PRIME_CHUNK);
        stream.write_all(&out[..n]).await?;
        stream.read_exact(&mut back[..n]).await?;
        left -= n;
    }
    Ok(())
}

/// One tunnel: a frame on every tick until `plan.end`, echoes read as they come, until every
/// frame sent is back, the tunnel breaks, or `plan.give_up`. The tunnel is handed back open.
async fn frames(mut stream: TcpStream, plan: Plan, capacity: usize) -> (Tally, TcpStream) {
    let mut tally = Tally {
        rtt_ns: Vec::with_capacity(capacity),
        lateness_ns: Vec::with_capacity(capacity),
        ..Tally::default()
    };
    let (mut reader, mut writer) = stream.split();
    let mut frame = [0x17u8; FRAME];
    frame[..HEADER.len()].copy_from_slice(&HEADER);
    let mut back = [0u8; FRAME];
    let mut filled = 0;
    let period = period();
    let mut ticks = tokio::time::interval_at(plan.first, period);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Skip);
    let give_up = tokio::time::sleep_until(plan.give_up);
    tokio::pin!(give_up);
    let (mut sent, mut returned) = (0u64, 0u64);
    let mut next_seq = 0u64;
    let mut last_back: Option<u64> = None;
    let mut sending = true;
    loop {
        if !sending && returned == sent {
            break;
        }
        tokio::select! {
            biased;
            read = reader.read(&mut back[filled..]) => {
                match read {
                    Ok(0) => {
                        tally.broken = Some("tunnel closed by the other end".into());
                        break;
                    }
                    Ok(n) => filled += n,
                    Err(e) => {
                        tally.broken = Some(format!("read: {e}"));
                        break;
                    }
                }
                if filled < FRAME {
                    continue;
                }
                filled = 0;
                let now = Instant::now();
                let seq = u64_at(&back, SEQ);
                let in_order = last_back.is_none_or(|last| seq > last) && seq < next_seq;
                if back[..HEADER.len()] != HEADER || !in_order {
                    tally.broken = Some(format!("echo out of order or corrupt (seq {seq})"));
                    break;
                }
                last_back = Some(seq);
                returned += 1;
                if back[COUNTED] == 1 {
                    let rtt = nanos(now - plan.clock).saturating_sub(u64_at(&back, SENT));
                    tally.back += 1;
                    tally.rtt_ns.push(u32::try_from(rtt).unwrap_or(u32::MAX));
                    if rtt > nanos(LATE) {
                        tally.late += 1;
                    }
                }
            }
            tick = ticks.tick(), if sending => {
                if tick >= plan.end {
                    sending = false;
                    continue;
                }
                // Skip keeps the ticks on the original schedule: which one this is tells
                // how many were missed.
                let seq = (nanos(tick - plan.first) + nanos(period) / 2) / nanos(period);
                let counted = tick >= plan.start;
                let now = Instant::now();
                frame[SEQ..SEQ + 8].copy_from_slice(&seq.to_be_bytes());
                frame[SENT..SENT + 8].copy_from_slice(&nanos(now - plan.clock).to_be_bytes());
                frame[COUNTED] = u8::from(counted);
                if let Err(e) = writer.write_all(&frame).await {
                    tally.broken = Some(format!("write: {e}"));
                    break;
                }
                sent += 1;
                if counted {
                    tally.sent += 1;
                    tally.skipped += seq - next_seq;
                    tally.lateness_ns.push(u32::try_from(nanos(now - tick)).unwrap_or(u32::MAX));
                }
                next_seq = seq + 1;
            }
            () = &mut give_up => break,
        }
    }
    (tally, stream)
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(bytes[at..at + 8].try_into().expect("8 bytes"))
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

fn summarize(
    tallies: &[Tally],
    tunnels: usize,
    window: Duration,
    proxied: bool,
    (before, after, wall): (Snapshot, Snapshot, f64),
) -> Stream {
    let mut rtt: Vec<u32> = Vec::with_capacity(tallies.iter().map(|t| t.rtt_ns.len()).sum());
    let mut lateness: Vec<u32> = Vec::new();
    let mut s = Stream {
        tunnels,
        offered: tunnels as f64 * f64::from(FPS),
        ..Stream::default()
    };
    let mut sent = 0;
    let mut back = 0;
    for t in tallies {
        rtt.extend_from_slice(&t.rtt_ns);
        lateness.extend_from_slice(&t.lateness_ns);
        sent += t.sent;
        back += t.back;
        s.late += t.late;
        s.skipped += t.skipped;
        s.lost += t.sent - t.back;
        if let Some(e) = &t.broken {
            s.broken += 1;
            s.first_error.get_or_insert_with(|| e.clone());
        }
    }
    rtt.sort_unstable();
    lateness.sort_unstable();
    let secs = window.as_secs_f64();
    s.sent_rate = sent as f64 / secs;
    s.rate = back as f64 / secs;
    s.p50_us = per_mille(&rtt, 500);
    s.p99_us = per_mille(&rtt, 990);
    s.p999_us = per_mille(&rtt, 999);
    s.max_us = rtt.last().map_or(f64::NAN, |&v| f64::from(v) / 1e3);
    s.send_lateness_p99_us = per_mille(&lateness, 990);
    let frames = back as f64;
    let per_frame = |seconds: f64| {
        if back == 0 {
            f64::NAN
        } else {
            seconds / frames * 1e6
        }
    };
    let used = |now: Sched, then: Sched| now.since(then);
    let proxy = used(after.proxy, before.proxy);
    let client = used(after.client, before.client);
    let origin = used(after.origin, before.origin);
    let run = |sched: Sched| sched.run_ns as f64 / 1e9;
    if proxied {
        let user = after.proxy_user - before.proxy_user;
        let system = after.proxy_system - before.proxy_system;
        s.cpu_us = per_frame(run(proxy));
        s.stat_cpu_us = per_frame(user + system);
        s.system_us = if user + system > 0.0 {
            s.cpu_us * system / (user + system)
        } else {
            f64::NAN
        };
        s.cores = run(proxy) / wall;
        s.slices = if back == 0 {
            f64::NAN
        } else {
            proxy.slices as f64 / frames
        };
        s.wait_us = per_frame(proxy.wait_ns as f64 / 1e9);
    } else {
        (s.cpu_us, s.system_us, s.stat_cpu_us) = (f64::NAN, f64::NAN, f64::NAN);
        (s.cores, s.slices, s.wait_us) = (f64::NAN, f64::NAN, f64::NAN);
    }
    s.client_cores = run(client) / wall;
    s.client_us = per_frame(run(client));
    s.client_wait_us = per_frame(client.wait_ns as f64 / 1e9);
    s.origin_cores = run(origin) / wall;
    s.ends_system_us = per_frame(after.ends_system - before.ends_system);
    s.machine_cores = (after.machine - before.machine) / wall;
    s.steal_cores = (after.steal - before.steal) / wall;
    let proxy_cores = if proxied { s.cores } else { 0.0 };
    // schedstat counts a thread's stolen time as running; /proc/stat counts it as stolen.
    s.other_cores = s.machine_cores + s.steal_cores - proxy_cores - s.client_cores - s.origin_cores;
    s
}

/// The value below which `per_mille`/1000 of the sorted samples lie, in µs.
fn per_mille(sorted_ns: &[u32], per_mille: usize) -> f64 {
    if sorted_ns.is_empty() {
        return f64::NAN;
    }
    let i = (sorted_ns.len() * per_mille / 1000).min(sorted_ns.len() - 1);
    f64::from(sorted_ns[i]) / 1e3
}

/// splitmix64: phases that are random but the same for a given seed (run), with no
/// dependency for it.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}
