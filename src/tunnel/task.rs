//! An open tunnel's task, from its first relayed byte to its `tunnel_closed` line, in
//! whichever process it ends: it relays, and when an upgrade parks it, hands it to the new
//! process (or, if no upgrade takes it any more, goes on here). [`resume`] is the same life
//! picked up by the process a tunnel was handed to.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use prometheus::Histogram;
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;
use tokio_util::task::task_tracker::TaskTrackerToken;

use crate::connect::judge_sni;
use crate::prefixed::ClientStream;
use crate::rules::SniMode;
use crate::sni;
use crate::state::{ClientSlot, Shared};
use crate::telemetry::OpenTunnel;
use crate::telemetry::access_log::Entry;
use crate::telemetry::metrics::DomainMetrics;
use crate::telemetry::open::Registered;
use crate::tunnel::{self, Counters, Flows, FromClient, Mode, Plain, Relayed, Stops, Tap, Totals};
use crate::upgrade::handover::Moving;

/// Holds `tunnels_active` up for exactly as long as the tunnel task lives, however it ends.
pub struct ActiveTunnel(pub Arc<DomainMetrics>);

impl ActiveTunnel {
    pub fn new(handles: Arc<DomainMetrics>) -> ActiveTunnel {
        handles.tunnels_active.inc();
        ActiveTunnel(handles)
    }
}

impl Drop for ActiveTunnel {
    fn drop(&mut self) {
        self.0.tunnels_active.dec();
    }
}

/// What a tunnel holds while it relays: its gauge, its status-page entry, its client's slot
/// and its `max_connections` permit, all given back when it ends or moves away.
pub struct Live {
    pub active: ActiveTunnel,
    /// `tunnel_duration_seconds` for the tunnel's rule (and domain, when configured).
    pub tunnel_duration: Histogram,
    pub open: Registered,
    pub slot: Option<ClientSlot>,
    pub permit: Option<OwnedSemaphorePermit>,
    /// When the tunnel first opened, in whichever process that was.
    pub started: Instant,
    pub idle: Duration,
}

impl Live {
    fn counters(&self) -> Counters<'_> {
        Counters {
            upstream: &self.active.0.bytes_upstream,
            downstream: &self.active.0.bytes_downstream,
            totals: &self.open.tunnel.bytes,
        }
    }
}

/// A tunnel's two ends as it opens.
pub struct Ends {
    pub client: ClientStream,
    pub origin: TcpStream,
    /// What the client sent behind its CONNECT head (its ClientHello, usually).
    pub early: Bytes,
    pub sni: SniMode,
}

/// Relays a tunnel that has just opened. `moving` keeps an upgrade waiting until a plain
/// tunnel has parked or ended; a TLS client's tunnel cannot move and lets it go.
///
/// This future is an open tunnel's whole task, so it is kept small: an `async` block
/// (see [`tunnel::relay_plain`] for why), the `sni = "log"` watch boxed, the TLS relay boxed.
#[expect(
    clippy::manual_async_fn,
    reason = "an async fn keeps its arguments twice"
)]
pub fn run(
    shared: Arc<Shared>,
    live: Live,
    entry: Entry,
    ends: Ends,
    moving: TaskTrackerToken,
) -> impl Future<Output = ()> {
    async move {
        // `sni = "log"`: the tap judges the ClientHello as it passes and leaves the name here.
        let seen = Mutex::new(None::<String>);
        let log_sni = ends.sni == SniMode::Log;
        let mut watched = log_sni.then(|| Box::new((entry.clone(), sni::Watch::default())));
        let mut watching = |bytes: &[u8]| {
            let Some((entry, watch)) = watched.as_deref_mut() else {
                return false;
            };
            match watch.observe(bytes) {
                None => true,
                Some(hello) => {
                    let _ = judge_sni(hello, SniMode::Log, entry);
                    *seen.lock().unwrap_or_else(|e| e.into_inner()) = Some(entry.sni.clone());
                    false
                }
            }
        };
        let tap = log_sni.then_some(&mut watching as Tap<'_>);
        match ends.client {
            ClientStream::Plain(tcp) => {
                let plain = Plain {
                    client: tcp,
                    origin: ends.origin,
                    flows: Flows::opening(ends.early),
                    idle_for: Duration::ZERO,
                };
                go_on(&shared, live, entry, plain, tap, &seen, moving).await;
            }
            ClientStream::Tls(tls) => {
                drop(moving);
                let from_client = FromClient {
                    early: ends.early,
                    tap,
                };
                let (counters, idle) = (live.counters(), live.idle);
                let relay = tunnel::relay_streams(
                    *tls,
                    from_client,
                    ends.origin,
                    idle,
                    counters,
                    &shared.abort,
                );
                let totals = Box::pin(relay).await;
                let mut entry = entry;
                note_sni(&mut entry, &seen);
                close(&shared, live, &entry, totals);
            }
        }
    }
}

/// Goes on with a tunnel another process handed over (or an upgrade here gave back).
pub async fn resume(shared: Arc<Shared>, moving: Moving) {
    let Moving {
        entry,
        opened,
        bytes,
        idle_timeout,
        plain,
    } = moving;
    let token = shared.upgrade.movable.token();
    let label = entry.counted_as.as_deref().unwrap_or(&entry.host);
    let handles = shared.metrics.domain(label);
    let tunnel_duration = shared
        .metrics
        .latency(&entry.rule, &handles)
        .tunnel_duration;
    let age = SystemTime::now().duration_since(opened).unwrap_or_default();
    let open = OpenTunnel::resumed(entry.client, &entry.host, entry.port, &entry.rule, opened);
    open.bytes.add(bytes);
    let live = Live {
        active: ActiveTunnel::new(handles),
        tunnel_duration,
        open: shared.status.open.register(open),
        // Counted, never refused: the tunnel is already open.
        slot: shared.client_slot(entry.client.ip(), 0),
        permit: shared.connections.clone().try_acquire_owned().ok(),
        started: Instant::now().checked_sub(age).unwrap_or_else(Instant::now),
        idle: idle_timeout,
    };
    go_on(&shared, live, entry, *plain, None, &Mutex::new(None), token).await;
}

/// The plain relay, parked and handed over when an upgrade asks; closes and logs when it ends.
#[expect(
    clippy::manual_async_fn,
    reason = "an async fn keeps its arguments twice"
)]
fn go_on<'a>(
    shared: &'a Arc<Shared>,
    live: Live,
    mut entry: Entry,
    mut plain: Plain,
    mut tap: Option<Tap<'a>>,
    seen: &'a Mutex<Option<String>>,
    moving: TaskTrackerToken,
) -> impl Future<Output = ()> + 'a {
    async move {
        let _moving = moving;
        loop {
            let park = shared.upgrade.park_token();
            let stops = Stops {
                abort: &shared.abort,
                park: &park,
            };
            let (counters, idle) = (live.counters(), live.idle);
            let relayed =
                tunnel::relay_plain(Mode::best(), plain, tap.take(), idle, counters, stops).await;
            note_sni(&mut entry, seen);
            let parked = match relayed {
                Relayed::Ended(totals) => return close(shared, live, &entry, totals),
                Relayed::Parked(parked) => parked,
            };
            let moving = Moving {
                entry: entry.clone(),
                opened: live.open.tunnel.opened,
                bytes: live.open.tunnel.bytes(),
                idle_timeout: live.idle,
                plain: parked,
            };
            match shared.upgrade.hand(Box::new(moving)) {
                // Gone to the new process: this one lets go of its gauge, slot and permit.
                Ok(()) => return,
                Err(back) => plain = *back.plain,
            }
        }
    }
}

fn note_sni(entry: &mut Entry, seen: &Mutex<Option<String>>) {
    if let Some(name) = seen.lock().unwrap_or_else(|e| e.into_inner()).take() {
        entry.sni = name;
    }
}

/// Counts and logs a tunnel's end, with its whole history.
fn close(shared: &Shared, live: Live, entry: &Entry, totals: Totals) {
    if totals.pipe_fallback {
        shared.metrics.pipe_fallback();
    }
    let duration = live.started.elapsed();
    live.tunnel_duration.observe(duration.as_secs_f64());
    entry.closed(&totals, duration);
}
