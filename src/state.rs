//! What every connection shares: the current config with its resolver (swapped whole on
//! reload), the metrics, and the shutdown plumbing.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use std::net::IpAddr;

use arc_swap::ArcSwap;
use dashmap::DashMap;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::Authenticator;
use crate::config::Config;
use crate::destination::Policy;
use crate::dns::Resolver;
use crate::metrics::Metrics;
use crate::net::keepalive::KeepAlive;

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
    pub metrics: Arc<Metrics>,
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
        Shared {
            runtime: ArcSwap::from_pointee(runtime),
            metrics,
            connections: Arc::new(Semaphore::new(limit)),
            rejecting: Arc::new(Semaphore::new(MAX_REJECTING)),
            connection_limit: std::sync::Mutex::new(limit),
            tasks: TaskTracker::new(),
            abort: CancellationToken::new(),
            draining: AtomicBool::new(false),
            keepalive: ArcSwap::from_pointee(keepalive),
            per_client: Arc::new(DashMap::new()),
        }
    }

    pub fn runtime(&self) -> Arc<Runtime> {
        self.runtime.load_full()
    }

    /// Swaps in a new config. Open tunnels keep what they were opened with; new requests see
    /// the new rules at once.
    pub fn install(&self, runtime: Runtime) {
        self.resize_connections(runtime.config.proxy.max_connections);
        self.metrics.set_max_domains(runtime.config.max_domains);
        self.keepalive
            .store(Arc::new(runtime.config.proxy.tcp_keepalive));
        self.runtime.store(Arc::new(runtime));
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
