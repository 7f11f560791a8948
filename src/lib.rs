//! portcullis: an HTTP CONNECT egress proxy that lets a network reach Amazon AppStream 2.0 and
//! nothing else it did not name.
//!
//! # Layout
//! - [`config`]: TOML into typed, validated, immutable config.
//! - [`rules`]: host validation, wildcard matching, ports (pure functions).
//! - [`dns`]: hickory resolvers, cached for ordinary rules, uncached for private endpoints.
//! - [`destination`]: which resolved addresses may be connected to.
//! - [`ip_ranges`]: AWS's published prefixes, a second check for chosen rules, kept current
//!   from `[aws_ip_ranges] url` ([`ip_ranges::refresh`], [`ip_ranges::fetch`]).
//! - [`server`]: the accept loop, connection limit, client ACL, request head.
//! - [`connect`]: one CONNECT request, from authority to 200.
//! - [`tunnel`]: relaying bytes both ways; [`tunnel::task`], an open tunnel's task: relay, park
//!   for an upgrade, close and log.
//! - [`sni`]: the ClientHello parser and the SNI-matches-CONNECT check.
//! - [`explain`]: would a CONNECT pass, and why (`portcullis explain`, `/explain`).
//! - [`admin`]: `/metrics`, `/healthz`, `/readyz`, `/proxy.pac`, `/explain`; and
//!   [`admin::healthcheck`], `portcullis healthcheck`, the client side of `/healthz` and
//!   `/readyz` that a container's `HEALTHCHECK` runs.
//! - [`error`]: refusal reasons and the one mapping to replies.
//! - [`auth`]: optional `Proxy-Authorization: Basic` against a users file.
//! - [`state`]: what connections share; config swaps on reload.
//! - [`reload`]: SIGHUP and config-file watching.
//! - [`prefixed`]: the client's stream (TCP or TLS) with already-read bytes put back in front.
//! - [`tls`]: TLS for the proxy's own listeners, with optional client certificates.
//! - [`workers`]: one single-threaded event loop per core, each accepting on its own socket.
//! - [`telemetry`]: what the proxy tells its operators, kept apart from the data path:
//!   [`telemetry::metrics`] (the Prometheus registry and per-domain handles),
//!   [`telemetry::access_log`] (the decision and tunnel-close events),
//!   [`telemetry::log_format`] (the JSON log line, written without serde),
//!   [`telemetry::log_writer`] (the batching, never-blocking stdout sink behind the logs), and
//!   what the status page shows: open tunnels, recent refusals, reloads.
//! - [`net`]: below HTTP: the PROXY protocol (client identity behind a balancer), TCP keepalive.
//! - [`upgrade`]: SIGUSR2: a new binary takes over the listeners and every plain tunnel.
//!
//! `main.rs` is a thin shell over [`Proxy`]; tests drive the same [`Proxy::run`] with
//! listeners bound on port 0.
#![forbid(unsafe_code)]

pub mod admin;
pub mod auth;
pub mod config;
pub mod connect;
pub mod destination;
pub mod dns;
pub mod error;
pub mod explain;
pub mod ip_ranges;
pub mod net;
pub mod prefixed;
pub mod reload;
pub mod rules;
pub mod server;
pub mod sni;
pub mod state;
pub mod telemetry;
pub mod tls;
pub mod tunnel;
pub mod upgrade;
pub mod workers;

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use config::Config;
use state::{Runtime, Shared};
use telemetry::metrics::Metrics;

/// The sockets a proxy serves on. Bound by the caller, so tests can use port 0 and a
/// supervisor could pass sockets in.
#[derive(Default)]
pub struct Listeners {
    pub proxy: Vec<TcpListener>,
    /// One per `[[proxy.tls]]` entry, in config order.
    pub tls: Vec<TcpListener>,
    pub admin: Option<TcpListener>,
    /// More sockets of each proxy, then TLS, listener: the `SO_REUSEPORT` siblings an upgrade
    /// inherited from the process it replaced, each to be polled by a worker.
    pub siblings: Vec<Vec<std::net::TcpListener>>,
}

impl Listeners {
    /// Binds what the config names. Proxy listeners are bound so that every worker can have
    /// a socket of its own on the same port (see [`workers`]).
    pub async fn bind(config: &Config) -> io::Result<Listeners> {
        Listeners::inherit(config, None).await
    }

    /// As [`bind`](Listeners::bind), but a listener the process being replaced already has
    /// (the same place in the config, the same address) is taken over, not bound anew.
    pub async fn inherit(
        config: &Config,
        mut takeover: Option<&mut upgrade::Takeover>,
    ) -> io::Result<Listeners> {
        let mut inherited = |group: String| {
            takeover
                .as_mut()
                .map(|t| t.take(&group))
                .unwrap_or_default()
        };
        let reusable = |addr: SocketAddr, what: &str| {
            workers::bind(addr).map_err(|e| {
                io::Error::new(e.kind(), format!("cannot listen on {addr}{what}: {e}"))
            })
        };
        let mut listeners = Listeners::default();
        let proxy = config.proxy.listen.iter().enumerate();
        let proxy = proxy.map(|(i, &addr)| (addr, upgrade::listener_group(config, None, i)));
        let tls = config.proxy.tls.iter().enumerate();
        let tls = tls.map(|(i, l)| (l.listen, upgrade::listener_group(config, Some(i), 0)));
        for (n, (addr, group)) in proxy.chain(tls).enumerate() {
            let is_tls = n >= config.proxy.listen.len();
            let mut sockets = inherited(group).into_iter();
            let first = match sockets.next() {
                Some(socket) => socket,
                None => reusable(addr, if is_tls { " (tls)" } else { "" })?,
            };
            let first = TcpListener::from_std(first)?;
            if is_tls {
                listeners.tls.push(first);
            } else {
                listeners.proxy.push(first);
            }
            listeners.siblings.push(sockets.collect());
        }
        listeners.admin = match config.admin.listen {
            Some(addr) => match inherited(upgrade::admin_group(addr)).pop() {
                Some(socket) => Some(TcpListener::from_std(socket)?),
                None => Some(TcpListener::bind(addr).await.map_err(|e| {
                    io::Error::new(e.kind(), format!("cannot listen on {addr} (admin): {e}"))
                })?),
            },
            None => None,
        };
        Ok(listeners)
    }
}

/// A listener's address as shown on the status page.
fn local(listener: &TcpListener) -> String {
    listener
        .local_addr()
        .map_or_else(|e| format!("? ({e})"), |a| a.to_string())
}

/// Ends what [`Proxy::run`] started if its future is dropped before it finishes (its task
/// aborted, its runtime shut down): worker threads are not tied to the caller's runtime and
/// would otherwise go on accepting and relaying. They stop as after a drain timeout.
struct StopOnDrop {
    stop_accepting: CancellationToken,
    shared: Arc<Shared>,
    armed: bool,
}

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        if self.armed {
            self.stop_accepting.cancel();
            self.shared.upgrade.forget_listeners();
            self.shared.tasks.close();
            self.shared.abort.cancel();
        }
    }
}

/// A running proxy's handle: cheap to clone, used to reload and to read metrics.
#[derive(Clone)]
pub struct Proxy {
    shared: Arc<Shared>,
}

impl Proxy {
    pub fn new(config: Config) -> Result<Proxy, String> {
        let metrics = Arc::new(Metrics::new(&config.metrics));
        let runtime = Runtime::new(config)?;
        Ok(Proxy {
            shared: Arc::new(Shared::new(runtime, metrics)),
        })
    }

    /// Swaps in a new config; tunnels already open are not touched. Counted either way.
    pub fn reload(&self, config: Result<Config, String>) -> Result<(), String> {
        let result = config.and_then(Runtime::new);
        self.shared.metrics.config_reload(result.is_ok());
        self.shared
            .status
            .reloaded(&result.as_ref().map(|_| ()).map_err(Clone::clone));
        match result {
            Ok(runtime) => {
                let old = self.shared.runtime();
                if old.config.proxy.listen != runtime.config.proxy.listen
                    || old.config.admin.listen != runtime.config.admin.listen
                {
                    tracing::warn!("listen addresses changed; they take effect on restart");
                }
                if old.config.proxy.workers != runtime.config.proxy.workers {
                    tracing::warn!("workers changed; it takes effect on restart");
                }
                self.shared.install(runtime);
                tracing::info!("config reloaded");
                Ok(())
            }
            Err(e) => {
                tracing::error!(error = %e, "config reload failed; keeping the running config");
                Err(e)
            }
        }
    }

    pub fn metrics(&self) -> Arc<Metrics> {
        self.shared.metrics.clone()
    }

    /// Fetches `[aws_ip_ranges] url` now, as the periodic refresh does (logged and counted
    /// the same way), without waiting for the next one.
    pub async fn refresh_ip_ranges(
        &self,
    ) -> Result<ip_ranges::refresh::Refreshed, ip_ranges::refresh::RefreshError> {
        ip_ranges::refresh::refresh(&self.shared).await
    }

    /// The syncToken of the ip-ranges set tunnels are checked against now.
    pub fn ip_ranges_sync_token(&self) -> Option<u64> {
        self.shared.ip_ranges().as_ref().map(|set| set.sync)
    }

    /// Serves until `shutdown` resolves, then drains: stops accepting, turns `/readyz` to 503,
    /// gives open tunnels up to `drain_timeout`, and closes what is left.
    ///
    /// The caller's runtime is worker 0; `[proxy] workers` minus one more threads are started,
    /// each with its own event loop (see [`workers`]).
    pub async fn run(&self, listeners: Listeners, shutdown: impl Future<Output = ()>) {
        self.run_upgradable(listeners, shutdown, None).await
    }

    /// [`run`](Proxy::run) for a process an upgrade started: once serving, it takes the
    /// tunnels of the process it replaces. Either way, a finished upgrade of this process
    /// (SIGUSR2, [`Proxy::upgrade`]) starts its drain as `shutdown` would.
    pub async fn run_upgradable(
        &self,
        mut listeners: Listeners,
        shutdown: impl Future<Output = ()>,
        takeover: Option<upgrade::Takeover>,
    ) {
        let stop_accepting = self.shared.stop_accepting.clone();
        let stop_admin = CancellationToken::new();
        let plain = listeners.proxy.into_iter().map(|l| (l, None));
        let tls = listeners
            .tls
            .into_iter()
            .enumerate()
            .map(|(i, l)| (l, Some(i)));
        let accepting: Vec<_> = plain.chain(tls).collect();
        let groups = self.groups(&accepting);
        let keepalive = self.shared.keepalive();
        for ((listener, tls), group) in accepting.iter().zip(&groups) {
            net::prepare_listener(listener, keepalive);
            self.shared.upgrade.listening(group, listener);
            let kind = if tls.is_some() {
                "proxy (tls)"
            } else {
                "proxy"
            };
            self.shared.status.listening(kind, local(listener));
        }
        let mut stop_on_drop = StopOnDrop {
            stop_accepting: stop_accepting.clone(),
            shared: self.shared.clone(),
            armed: true,
        };
        listeners.siblings.resize_with(accepting.len(), Vec::new);
        let others = self.start_workers(&accepting, &groups, &mut listeners.siblings);
        // Inherited sockets beyond one per worker: worker 0 polls them too, so no socket in
        // a port's group is left with an accept queue nobody reads.
        let mut extra = Vec::new();
        for ((sockets, (_, tls)), group) in
            listeners.siblings.into_iter().zip(&accepting).zip(&groups)
        {
            for socket in sockets {
                self.shared.upgrade.listening(group, &socket);
                if let Ok(listener) = TcpListener::from_std(socket) {
                    extra.push((listener, *tls));
                }
            }
        }
        for (listener, tls) in accepting.into_iter().chain(extra) {
            tokio::spawn(server::accept_loop(
                listener,
                server::Listener { tls, worker: 0 },
                self.shared.clone(),
                stop_accepting.clone(),
            ));
        }
        if let Some(listener) = listeners.admin {
            self.shared.status.listening("admin", local(&listener));
            if let Some(addr) = self.shared.runtime().config.admin.listen {
                let group = upgrade::admin_group(addr);
                self.shared.upgrade.listening(&group, &listener);
            }
            tokio::spawn(admin::serve(
                listener,
                self.shared.clone(),
                stop_admin.clone(),
            ));
        }
        // Stopped with the accept loops (also when this future is dropped): a drain needs no
        // fresher ranges, and no new tunnel will look at them.
        let refresher = tokio::spawn(ip_ranges::refresh::run(
            self.shared.clone(),
            stop_accepting.clone(),
        ));
        if let Some(takeover) = takeover {
            self.take_over(takeover).await;
        }
        upgrade::notify::ready();
        let handed_over = self.shared.upgrade.handed_over.clone();
        tokio::select! {
            () = shutdown => {}
            () = handed_over.cancelled() => {
                // The new process answers on the admin port now.
                stop_admin.cancel();
            }
        }
        self.drain(stop_accepting).await;
        let _ = refresher.await;
        for worker in others {
            worker.finished(Duration::from_secs(5)).await;
        }
        stop_admin.cancel();
        stop_on_drop.armed = false;
    }

    /// The listener groups an upgrade passes sockets on by: which listener of the config,
    /// and its configured address.
    fn groups(&self, accepting: &[(TcpListener, Option<usize>)]) -> Vec<String> {
        let config = &self.shared.runtime().config;
        let mut plain = 0..;
        accepting
            .iter()
            .map(|(_, tls)| {
                let index = if tls.is_none() { plain.next() } else { None };
                upgrade::listener_group(config, *tls, index.unwrap_or(0))
            })
            .collect()
    }

    /// The new process's part of an upgrade, once it accepts: takes every tunnel the old one
    /// parks. A failure here is logged; this process serves on regardless.
    async fn take_over(&self, takeover: upgrade::Takeover) {
        let shared = self.shared.clone();
        let taken = tokio::task::spawn_blocking(move || takeover.take_tunnels(shared)).await;
        match taken {
            Ok(Ok(tunnels)) => tracing::info!(tunnels, "upgrade: took over"),
            Ok(Err(e)) => tracing::error!(error = %e, "upgrade: the handover broke off"),
            Err(e) => tracing::error!(error = %e, "upgrade: the handover thread failed"),
        }
    }

    /// Starts a new process from `relaunch` and hands it the listeners and every plain
    /// tunnel (see [`upgrade`]); logged and counted either way. On success this process
    /// drains what could not move and its [`run`](Proxy::run) returns.
    pub async fn upgrade(
        &self,
        relaunch: &upgrade::Relaunch,
    ) -> Result<upgrade::Upgraded, upgrade::Failure> {
        let result = upgrade::upgrade(&self.shared, relaunch).await;
        match &result {
            Ok(done) => {
                self.shared.metrics.upgrade("ok");
                tracing::info!(
                    pid = done.pid,
                    tunnels = done.tunnels,
                    "upgrade: handed over; draining what stays"
                );
            }
            Err(failure) => {
                self.shared.metrics.upgrade(failure.result());
                tracing::error!(error = %failure, result = failure.result(), "upgrade failed; serving on");
            }
        }
        result
    }

    /// Workers 1 and up, each on its own socket per listener: one inherited from the process
    /// an upgrade replaced, else a new `SO_REUSEPORT` sibling. One that cannot start is
    /// logged and the rest serve without it.
    fn start_workers(
        &self,
        listeners: &[(TcpListener, Option<usize>)],
        groups: &[String],
        inherited: &mut [Vec<std::net::TcpListener>],
    ) -> Vec<workers::Worker> {
        self.shared
            .upgrade
            .add_worker(tokio::runtime::Handle::current());
        let count = workers::count(self.shared.runtime().config.proxy.workers);
        let mut started = Vec::new();
        for index in 1..count {
            let own = listeners.iter().zip(groups).zip(inherited.iter_mut());
            let own: std::io::Result<Vec<_>> = own
                .map(|(((listener, tls), group), inherited)| {
                    let socket = match inherited.pop() {
                        Some(socket) => socket,
                        None => workers::sibling(listener)?,
                    };
                    self.shared.upgrade.listening(group, &socket);
                    Ok((socket, *tls))
                })
                .collect();
            match own.and_then(|own| workers::Worker::spawn(index, own, self.shared.clone())) {
                Ok((worker, handle)) => {
                    self.shared.upgrade.add_worker(handle);
                    started.push(worker);
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot start worker {index}; serving with {index}");
                    break;
                }
            }
        }
        started
    }

    async fn drain(&self, stop_accepting: CancellationToken) {
        let shared = &self.shared;
        shared.start_draining();
        stop_accepting.cancel();
        shared.upgrade.forget_listeners();
        shared.tasks.close();
        let drain_timeout = shared.runtime().config.proxy.drain_timeout;
        tracing::info!(
            open = shared.tasks.len(),
            "draining for up to {drain_timeout:?}"
        );
        if tokio::time::timeout(drain_timeout, shared.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                open = shared.tasks.len(),
                "drain timeout; closing open tunnels"
            );
            shared.abort.cancel();
            let _ = tokio::time::timeout(Duration::from_secs(5), shared.tasks.wait()).await;
        }
        tracing::info!("drained");
    }
}
