//! The threads that serve: one single-threaded event loop per CPU core.
//!
//! A CONNECT tunnel is a handful of syscalls. Under tokio's work-stealing scheduler, waking a
//! second thread to steal each new connection, and letting a tunnel's two directions run on
//! different threads, cost more than the work itself: on the benchmark machine the proxy's CPU
//! per tunnel fell by about a sixth and its CPU per GiB by a third once every connection stayed
//! on one thread (`benches/RESULTS.md`). So each worker is a current-thread runtime that
//! accepts its own connections, and every task a connection spawns stays on that thread.
//!
//! Each worker needs its own listening socket. Listeners bound by [`bind`] carry
//! `SO_REUSEPORT`, so a sibling is a second socket on the same port and the kernel spreads
//! connections over them. A listener from elsewhere (a test, a supervisor) is shared instead:
//! each worker polls a duplicate of it, and both wake for every connection.
//!
//! The caller's runtime is worker 0 and also runs everything that is not a connection (admin,
//! signals, reloads). What all workers share lives in [`Shared`](crate::state::Shared), whose
//! task tracker lets a drain wait for tunnels on every thread.

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use rustix::net::{AddressFamily, SocketFlags, SocketType, sockopt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::server;
use crate::state::Shared;

/// Pending connections per listening socket (tokio's own default).
const BACKLOG: i32 = 1024;

/// The number of workers for a `[proxy] workers` value: 0 means one per core this process may
/// use (cgroup CPU limits included).
pub fn count(configured: usize) -> usize {
    match configured {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    }
}

/// Binds a listening socket that further workers can share the port of.
pub fn bind(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let family = match addr {
        SocketAddr::V4(_) => AddressFamily::INET,
        SocketAddr::V6(_) => AddressFamily::INET6,
    };
    let flags = SocketFlags::CLOEXEC | SocketFlags::NONBLOCK;
    let socket = rustix::net::socket_with(family, SocketType::STREAM, flags, None)?;
    sockopt::set_socket_reuseaddr(&socket, true)?;
    sockopt::set_socket_reuseport(&socket, true)?;
    rustix::net::bind(&socket, &addr)?;
    rustix::net::listen(&socket, BACKLOG)?;
    Ok(std::net::TcpListener::from(socket))
}

/// A listening socket for another worker, on the same address as `listener`.
pub fn sibling(listener: &TcpListener) -> io::Result<std::net::TcpListener> {
    if sockopt::socket_reuseport(listener).unwrap_or(false) {
        bind(listener.local_addr()?)
    } else {
        Ok(listener.as_fd().try_clone_to_owned()?.into())
    }
}

/// A worker thread, serving until the proxy stops accepting and every task has finished.
pub struct Worker {
    thread: JoinHandle<()>,
}

impl Worker {
    /// Starts worker `index` on its own listening sockets (each with its `[[proxy.tls]]`
    /// index); returns it with a handle to its event loop, where an upgrade resumes tunnels.
    pub fn spawn(
        index: usize,
        own: Vec<(std::net::TcpListener, Option<usize>)>,
        shared: Arc<Shared>,
    ) -> io::Result<(Worker, tokio::runtime::Handle)> {
        for (socket, _) in &own {
            crate::net::prepare_listener(socket, shared.keepalive());
        }
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let handle = runtime.handle().clone();
        let stop_accepting = shared.stop_accepting.clone();
        let thread = std::thread::Builder::new()
            .name(format!("portcullis-{index}"))
            .spawn(move || runtime.block_on(serve(index, own, shared, stop_accepting)))?;
        Ok((Worker { thread }, handle))
    }

    /// Waits for the thread to end. A drain bounds how long its tasks take; this adds a bound
    /// of its own so a stuck worker cannot keep the process from exiting.
    pub async fn finished(self, within: Duration) {
        let join = tokio::task::spawn_blocking(move || self.thread.join());
        if tokio::time::timeout(within, join).await.is_err() {
            tracing::warn!("a worker thread did not finish; exiting without it");
        }
    }
}

async fn serve(
    worker: usize,
    listeners: Vec<(std::net::TcpListener, Option<usize>)>,
    shared: Arc<Shared>,
    stop_accepting: CancellationToken,
) {
    for (listener, tls) in listeners {
        match TcpListener::from_std(listener) {
            Ok(listener) => {
                let kind = server::Listener { tls, worker };
                let task =
                    server::accept_loop(listener, kind, shared.clone(), stop_accepting.clone());
                tokio::spawn(task);
            }
            Err(e) => tracing::error!(error = %e, "worker cannot poll its listener"),
        }
    }
    stop_accepting.cancelled().await;
    // Tunnels this thread runs live on its runtime: it must keep turning until the drain
    // (which closes the tracker) has seen every task end, on every worker.
    shared.tasks.wait().await;
}
