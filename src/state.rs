//! What every connection shares: the current config with its resolver (swapped whole on
//! reload), the live AWS ip-ranges set (which outlives any one config: a refresh replaces it
//! between reloads), the metrics, and the shutdown plumbing.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use std::net::IpAddr;

use arc_swap::{ArcSwap, ArcSwapOption, Guard};
use dashmap::DashMap;
use tokio::sync::{Semaphore, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::Authenticator;
use crate::config::Config;
use crate::destination::Policy;
use crate::dns::Resolver;
use crate::ip_ranges::IpRanges;
use crate::ip_ranges::refresh::{self, Conditional};
use crate::net::keepalive::KeepAlive;
use crate::telemetry::Status;
use crate::telemetry::metrics::Metrics;

/// One config, compiled into what the data path uses. Immutable; a reload builds a new one.
pub struct Runtime {
    pub config: Config,
    pub resolver: Resolver,
    pub policy: Policy,
    pub auth: Option<Authenticator>,
}

impl Runtime {
    pub fn new(config: Config) -> Result<Runtime, String> {
        let resolver = Resolver::new(&config.dns)?;
        let policy = Policy::new(config.destinations_allow.clone());
        let auth = config.auth.as_ref().map(Authenticator::new);
        Ok(Runtime {
            config,
            resolver,
            policy,
            auth,
        })
    }
}

/// Overloaded connections answered gracefully at once; past this they get a best-effort reply.
pub const MAX_REJECTING: usize = 1024;

pub struct Shared {
    runtime: ArcSwap<Runtime>,
    /// The ip-ranges set tunnels are checked against now.
    ip_ranges: ArcSwapOption<IpRanges>,
    /// Held while the config or the ip-ranges set is replaced, so a reload and a refresh cannot
    /// interleave (a refresh judged against the old rules, a reload against the old set).
    swapping: Mutex<()>,
    /// Bumped on every config install, so the refresher follows a changed url or interval.
    installs: watch::Sender<()>,
    /// The refresher's conditional-GET state; its lock also keeps refreshes one at a time.
    pub refresher: tokio::sync::Mutex<Conditional>,
    pub metrics: Arc<Metrics>,
    /// What the status page shows: open tunnels, recent refusals, reloads.
    pub status: Status,
    /// One permit per open client connection or tunnel (`max_connections`).
    pub connections: Arc<Semaphore>,
    /// Bounds the tasks that answer connections turned away as overloaded.
    pub rejecting: Arc<Semaphore>,
    /// The permit count `connections` was last sized to.
    connection_limit: std::sync::Mutex<usize>,
    /// Every connection and tunnel task, so a drain can wait for them.
    pub tasks: TaskTracker,
    /// Fired when the drain timeout runs out: open tunnels close.
    pub abort: CancellationToken,
    draining: AtomicBool,
    /// The current `[proxy] tcp_keepalive`, for accept loops to compare against cheaply.
    keepalive: ArcSwap<KeepAlive>,
    /// Open tunnels (and dials in flight) per client address.
    per_client: Arc<DashMap<IpAddr, usize>>,
    /// Stops every accept loop (a drain, or an upgrade's handover).
    pub stop_accepting: CancellationToken,
    /// SIGUSR2's plumbing: parking tunnels, the listening sockets, the workers.
    pub upgrade: crate::upgrade::State,
}

/// Holds the swap lock; see [`Shared::ip_ranges_writer`].
pub struct RangesWriter<'a> {
    shared: &'a Shared,
    _held: MutexGuard<'a, ()>,
}

impl RangesWriter<'_> {
    pub fn current(&self) -> Option<Arc<IpRanges>> {
        self.shared.ip_ranges.load_full()
    }

    /// The config in force; stays in force while this writer is held.
    pub fn runtime(&self) -> Arc<Runtime> {
        self.shared.runtime()
    }

    /// New CONNECTs see `set` at once; tunnels already open never look again.
    pub fn replace(&self, set: Option<Arc<IpRanges>>) {
        self.shared.metrics.ip_ranges_loaded(set.as_deref());
        self.shared.ip_ranges.store(set);
    }
}

/// One tunnel's place in its client's count; gives it back when dropped, however the tunnel
/// ends.
pub struct ClientSlot {
    per_client: Arc<DashMap<IpAddr, usize>>,
    client: IpAddr,
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        self.per_client.remove_if_mut(&self.client, |_, count| {
            *count -= 1;
            *count == 0
        });
    }
}

impl Shared {
    pub fn new(runtime: Runtime, metrics: Arc<Metrics>) -> Shared {
        let limit = runtime.config.proxy.max_connections;
        let keepalive = runtime.config.proxy.tcp_keepalive;
        let ip_ranges = runtime.config.aws_ip_ranges.clone();
        metrics.ip_ranges_loaded(ip_ranges.as_deref());
        metrics.configure(&runtime.config.metrics, runtime.config.rules.rules());
        Shared {
            runtime: ArcSwap::from_pointee(runtime),
            ip_ranges: ArcSwapOption::new(ip_ranges),
            swapping: Mutex::new(()),
            installs: watch::Sender::new(()),
            refresher: tokio::sync::Mutex::new(Conditional::default()),
            metrics,
            status: Status::new(),
            connections: Arc::new(Semaphore::new(limit)),
            rejecting: Arc::new(Semaphore::new(MAX_REJECTING)),
            connection_limit: std::sync::Mutex::new(limit),
            tasks: TaskTracker::new(),
            abort: CancellationToken::new(),
            draining: AtomicBool::new(false),
            keepalive: ArcSwap::from_pointee(keepalive),
            per_client: Arc::new(DashMap::new()),
            stop_accepting: CancellationToken::new(),
            upgrade: crate::upgrade::State::default(),
        }
    }

    pub fn runtime(&self) -> Arc<Runtime> {
        self.runtime.load_full()
    }

    /// Swaps in a new config. Open tunnels keep what they were opened with; new requests see
    /// the new rules at once. The ip-ranges set its file held replaces the live one unless the
    /// live one is newer (see [`refresh::after_reload`]).
    pub fn install(&self, runtime: Runtime) {
        let writer = self.ip_ranges_writer();
        let kept = refresh::after_reload(
            writer.current(),
            runtime.config.aws_ip_ranges.clone(),
            &runtime.config.rules,
        );
        writer.replace(kept);
        self.resize_connections(runtime.config.proxy.max_connections);
        self.metrics
            .configure(&runtime.config.metrics, runtime.config.rules.rules());
        self.keepalive
            .store(Arc::new(runtime.config.proxy.tcp_keepalive));
        self.runtime.store(Arc::new(runtime));
        drop(writer);
        self.installs.send_replace(());
    }

    /// The live ip-ranges set, for a lookup now (a guard: not to be held across an await).
    pub fn ip_ranges(&self) -> Guard<Option<Arc<IpRanges>>> {
        self.ip_ranges.load()
    }

    /// The right to replace the live ip-ranges set, exclusive with config installs.
    pub fn ip_ranges_writer(&self) -> RangesWriter<'_> {
        RangesWriter {
            shared: self,
            _held: self.swapping.lock().unwrap_or_else(|e| e.into_inner()),
        }
    }

    /// Changes whenever a config is installed.
    pub fn installs(&self) -> watch::Receiver<()> {
        self.installs.subscribe()
    }

    /// Grows at once; shrinks by the permits free now. Permits held by open connections are
    /// not taken back, so a lowered limit binds fully once enough of those have closed and a
    /// later reload (or restart) resizes again.
    fn resize_connections(&self, limit: usize) {
        let mut current = self
            .connection_limit
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if limit >= *current {
            self.connections.add_permits(limit - *current);
            *current = limit;
        } else {
            *current -= self.connections.forget_permits(*current - limit);
        }
    }

    /// Takes a tunnel slot for `client` unless it already has `max` (0: no limit).
    pub fn client_slot(&self, client: IpAddr, max: usize) -> Option<ClientSlot> {
        let mut count = self.per_client.entry(client).or_insert(0);
        if max > 0 && *count >= max {
            return None;
        }
        *count += 1;
        drop(count);
        Some(ClientSlot {
            per_client: self.per_client.clone(),
            client,
        })
    }

    pub fn keepalive(&self) -> KeepAlive {
        **self.keepalive.load()
    }

    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }
}
