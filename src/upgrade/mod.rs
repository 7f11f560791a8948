//! In-place upgrade on SIGUSR2: a new process from the same binary path and arguments takes
//! over the listening sockets and every open plain-TCP tunnel, so an upgrade cuts nothing.
//!
//! The running process (old) and its replacement (new) talk over a [`channel::Line`]:
//!
//! 1. old starts new with [`channel::ENV`] naming the line; new loads and checks its config
//!    and connects (`Ready`). A new process that exits, or does not connect within
//!    `[proxy] upgrade_timeout`, is killed; old never stopped serving.
//! 2. old sends every listening socket (each worker's `SO_REUSEPORT` sibling too, so no
//!    accept queue is dropped); new polls them and says `Serving`. Until here nothing changed
//!    for old, and a failure only kills new.
//! 3. old stops accepting, then parks every plain-TCP tunnel (see [`crate::tunnel::Flow`]):
//!    each is sent as it parks, with its sockets and pipes, and new resumes it at once.
//!    Connections still reading a request head finish in old and park when their tunnel
//!    opens. `Done` and `Took` close the exchange.
//! 4. old drains what cannot move (tunnels on TLS listeners: their session keys live in old's
//!    memory) for up to `drain_timeout`, then exits.
//!
//! Outcomes are counted in `portcullis_upgrades_total{result}`.

pub mod channel;
pub mod handover;
pub mod notify;

use std::ffi::OsString;
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::state::Shared;
use channel::{Line, Waiting};
use handover::{Fds, Moving, Record};

/// How the new process is started: the binary path and arguments this one was started with.
#[derive(Debug, Clone)]
pub struct Relaunch {
    pub exe: PathBuf,
    pub args: Vec<OsString>,
}

impl Relaunch {
    /// This process's own command line. Read at start: `/proc/self/exe` names the old inode
    /// once a package manager has replaced the file, but the path keeps naming the new one.
    pub fn this_process() -> Option<Relaunch> {
        let exe = std::env::current_exe().ok()?;
        Some(Relaunch {
            exe,
            args: std::env::args_os().skip(1).collect(),
        })
    }
}

/// Why an upgrade did not happen; the `result` label it is counted under.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    #[error("an upgrade is already under way")]
    Busy,
    #[error("draining (or already handed over); not upgrading")]
    Draining,
    #[error("cannot start the new process: {0}")]
    Spawn(std::io::Error),
    #[error("the new process exited before it was ready ({0})")]
    Exited(String),
    #[error("the new process did not get ready within {0:?}")]
    Timeout(Duration),
    #[error("the handover line failed: {0}")]
    Line(std::io::Error),
}

impl Failure {
    pub fn result(&self) -> &'static str {
        match self {
            Failure::Busy => "busy",
            Failure::Draining => "draining",
            Failure::Spawn(_) => "spawn_error",
            Failure::Exited(_) => "exited",
            Failure::Timeout(_) => "timeout",
            Failure::Line(_) => "error",
        }
    }
}

/// What an upgrade handed over.
#[derive(Debug)]
pub struct Upgraded {
    pub pid: u32,
    pub tunnels: usize,
}

/// Messages on the line.
#[derive(Serialize, Deserialize, Debug)]
enum Message {
    /// new → old: config loaded, ready to take over.
    Ready {
        pid: u32,
        version: String,
    },
    /// old → new: one listening socket (attached) of a listener group.
    Listener {
        group: String,
    },
    ListenersEnd,
    /// new → old: accepting on them.
    Serving,
    /// old → new: a parked tunnel (sockets and pipes attached).
    Tunnel(Box<Record>),
    Done {
        tunnels: usize,
    },
    /// new → old: every tunnel is running here.
    Took {
        tunnels: usize,
    },
}

/// The upgrade plumbing every part of the proxy shares (in [`Shared`]).
#[derive(Default)]
pub struct State {
    busy: AtomicBool,
    /// Fired to park relays; replaced by a fresh token after each upgrade.
    park: Mutex<CancellationToken>,
    /// Takes parked tunnels, taken apart, while an upgrade sends them.
    collector: Mutex<Option<std::sync::mpsc::Sender<(Record, Fds)>>>,
    /// Plain connections and their tunnels: the upgrade waits for each to park or end.
    pub movable: TaskTracker,
    /// Fired once everything movable has gone to the new process.
    pub handed_over: CancellationToken,
    /// Every listening socket, by group (`proxy/0/127.0.0.1:3128`, `admin/...`).
    listening: Mutex<Vec<(String, OwnedFd)>>,
    /// Where resumed tunnels run: one handle per worker.
    workers: Mutex<Vec<Handle>>,
}

impl State {
    /// The token relays starting now park on.
    pub fn park_token(&self) -> CancellationToken {
        self.park.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Gives a parked tunnel to the upgrade in progress; back if there is none. Runs in the
    /// tunnel's task, so its sockets leave the event loop that polls them.
    pub fn hand(&self, moving: Box<Moving>) -> Result<(), Box<Moving>> {
        let collector = self.collector.lock().unwrap_or_else(|e| e.into_inner());
        let Some(tx) = collector.as_ref() else {
            return Err(moving);
        };
        match moving.into_wire() {
            // The receiver lives as long as the collector is set, and it is held here.
            Ok(wire) => drop(tx.send(wire)),
            Err(e) => {
                tracing::error!(error = %e, "upgrade: a tunnel could not be taken apart; lost")
            }
        }
        Ok(())
    }

    /// Notes a listening socket so an upgrade can pass it on.
    pub fn listening(&self, group: &str, socket: &impl AsFd) {
        if let Ok(dup) = socket.as_fd().try_clone_to_owned() {
            let mut listening = self.listening.lock().unwrap_or_else(|e| e.into_inner());
            listening.push((group.to_string(), dup));
        }
    }

    /// Lets the listening sockets go once nothing will accept on them again: a draining
    /// process must refuse connections, not queue them.
    pub fn forget_listeners(&self) {
        self.listening
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }

    pub fn add_worker(&self, handle: Handle) {
        self.workers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(handle);
    }

    fn worker(&self, n: usize) -> Handle {
        let workers = self.workers.lock().unwrap_or_else(|e| e.into_inner());
        workers
            .get(n % workers.len().max(1))
            .cloned()
            .unwrap_or_else(Handle::current)
    }
}

/// A proxy listener's group, by which listener of `config` it is: the `[[proxy.tls]]` entry
/// `tls`, else the `plain`th `[proxy] listen` address. The group names the configured
/// address too: an inherited socket is used only where the new config names the same one.
pub fn listener_group(config: &Config, tls: Option<usize>, plain: usize) -> String {
    let (kind, index, addr) = match tls {
        Some(i) => ("tls", i, config.proxy.tls.get(i).map(|l| l.listen)),
        None => ("proxy", plain, config.proxy.listen.get(plain).copied()),
    };
    let addr = addr.map_or_else(String::new, |a| a.to_string());
    format!("{kind}/{index}/{addr}")
}

/// The admin listener's group.
pub fn admin_group(addr: std::net::SocketAddr) -> String {
    format!("admin/0/{addr}")
}

/// Runs an upgrade from the old side. Whatever fails before the new process says `Serving`
/// leaves this process as it was.
pub async fn upgrade(shared: &Arc<Shared>, relaunch: &Relaunch) -> Result<Upgraded, Failure> {
    let state = &shared.upgrade;
    if shared.is_draining() || state.handed_over.is_cancelled() {
        return Err(Failure::Draining);
    }
    if state.busy.swap(true, Ordering::SeqCst) {
        return Err(Failure::Busy);
    }
    let result = run(shared, relaunch).await;
    state.busy.store(false, Ordering::SeqCst);
    result
}

async fn run(shared: &Arc<Shared>, relaunch: &Relaunch) -> Result<Upgraded, Failure> {
    let timeout = shared.runtime().config.proxy.upgrade_timeout;
    let waiting = Waiting::listen().map_err(Failure::Line)?;
    let mut child = tokio::process::Command::new(&relaunch.exe)
        .args(&relaunch.args)
        .env(channel::ENV, &waiting.name)
        .stdin(std::process::Stdio::null())
        .spawn()
        .map_err(Failure::Spawn)?;
    let pid = child.id().unwrap_or(0);
    tracing::info!(pid, exe = %relaunch.exe.display(), "upgrade: started the new process");
    let connected = async {
        let line = blocking(move || {
            let line = waiting.accept(pid, timeout)?;
            let (ready, _): (Message, _) = line.recv(timeout)?;
            match ready {
                Message::Ready { .. } => {}
                other => return Err(std::io::Error::other(format!("expected Ready: {other:?}"))),
            }
            Ok(line)
        })
        .await;
        let line = Arc::new(line.map_err(|e| timed_out(e, timeout))?);
        let listening = listening_dups(shared);
        let sending = line.clone();
        blocking(move || {
            for (group, fd) in &listening {
                let message = Message::Listener {
                    group: group.clone(),
                };
                sending.send(&message, &[fd.as_fd()])?;
            }
            sending.send(&Message::ListenersEnd, &[])?;
            match sending.recv(timeout)?.0 {
                Message::Serving => Ok(()),
                other => Err(std::io::Error::other(format!(
                    "expected Serving: {other:?}"
                ))),
            }
        })
        .await
        .map_err(|e| timed_out(e, timeout))?;
        Ok::<_, Failure>(line)
    };
    let line = tokio::select! {
        line = connected => line,
        status = child.wait() => Err(Failure::Exited(
            status.map_or_else(|e| e.to_string(), |s| s.to_string()),
        )),
    };
    let line = match line {
        Ok(line) => line,
        Err(failure) => {
            let _ = child.start_kill();
            let _ = child.wait().await;
            return Err(failure);
        }
    };
    // The new process serves: from here on, this one only hands over.
    shared.stop_accepting.cancel();
    let tunnels = hand_over_tunnels(shared, line).await;
    shared.upgrade.handed_over.cancel();
    Ok(Upgraded { pid, tunnels })
}

/// Parks every movable tunnel and sends each as it parks; returns how many went over.
async fn hand_over_tunnels(shared: &Arc<Shared>, line: Arc<Line>) -> usize {
    let state = &shared.upgrade;
    let (tx, rx) = std::sync::mpsc::channel();
    *state.collector.lock().unwrap_or_else(|e| e.into_inner()) = Some(tx);
    // Fired, and left in place until collection ends: a tunnel that starts relaying in the
    // meantime (its connection was still opening) parks at once too.
    state.park_token().cancel();
    state.movable.close();
    let sender = {
        let here = Handle::current();
        let shared = shared.clone();
        tokio::task::spawn_blocking(move || send_tunnels(&line, rx, &here, &shared))
    };
    // A connection still reading its head may yet open a tunnel: bounded by the time a
    // request may take to arrive and be dialled.
    let config = &shared.runtime().config.proxy;
    let bound = config.header_timeout + config.connect_timeout + Duration::from_secs(1);
    if tokio::time::timeout(bound, state.movable.wait())
        .await
        .is_err()
    {
        tracing::warn!("upgrade: connections still opening stay with this process");
    }
    state
        .collector
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take();
    // Tunnels parking from now on find no collector and go on here, on a fresh token.
    *state.park.lock().unwrap_or_else(|e| e.into_inner()) = CancellationToken::new();
    sender.await.unwrap_or(0)
}

/// The sending thread: each parked tunnel goes over as it arrives. If the line breaks, the
/// rest are resumed here instead (they are not cut).
fn send_tunnels(
    line: &Line,
    rx: std::sync::mpsc::Receiver<(Record, Fds)>,
    here: &Handle,
    shared: &Arc<Shared>,
) -> usize {
    let mut sent = 0;
    let mut broken = false;
    for (record, fds) in rx {
        if broken {
            resume(shared, here, record, fds.all);
            continue;
        }
        let (host, in_pipes) = (record.host().to_string(), record.in_pipes());
        match line.send(&Message::Tunnel(Box::new(record)), &fds.borrowed()) {
            Ok(()) => {
                sent += 1;
                tracing::info!(host, in_pipes, "upgrade: tunnel handed over");
            }
            Err(e) => {
                tracing::error!(error = %e, host, "upgrade: the line broke; this tunnel is lost, the rest stay here");
                broken = true;
            }
        }
    }
    if broken {
        return sent;
    }
    let done = line
        .send(&Message::Done { tunnels: sent }, &[])
        .and_then(|()| line.recv::<Message>(Duration::from_secs(30)));
    match done {
        Ok((Message::Took { tunnels }, _)) if tunnels == sent => {}
        Ok((other, _)) => tracing::warn!(?other, sent, "upgrade: unexpected answer to Done"),
        Err(e) => tracing::warn!(error = %e, "upgrade: no answer to Done"),
    }
    sent
}

/// Goes on with a tunnel that arrived as a record and descriptors, on runtime `on`.
fn resume(shared: &Arc<Shared>, on: &Handle, record: Record, fds: Vec<OwnedFd>) {
    let shared_there = shared.clone();
    on.spawn(shared.tasks.track_future(async move {
        match Moving::from_wire(record, fds) {
            Ok(moving) => crate::tunnel::task::resume(shared_there, moving).await,
            Err(e) => tracing::error!(error = %e, "upgrade: a tunnel arrived broken"),
        }
    }));
}

fn listening_dups(shared: &Shared) -> Vec<(String, OwnedFd)> {
    let listening = shared
        .upgrade
        .listening
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    listening
        .iter()
        .filter_map(|(group, fd)| Some((group.clone(), fd.try_clone().ok()?)))
        .collect()
}

fn timed_out(e: std::io::Error, timeout: Duration) -> Failure {
    if e.kind() == std::io::ErrorKind::TimedOut {
        Failure::Timeout(timeout)
    } else {
        Failure::Line(e)
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> std::io::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(e)))
}

/// The new process's side, from start to `Took`.
pub struct Takeover {
    line: Line,
    /// Inherited listening sockets by group, in the order old sent them.
    pub sockets: Vec<(String, OwnedFd)>,
}

impl Takeover {
    /// `Some` when this process was started by an upgrade: connects, says `Ready`, and
    /// receives the listening sockets. Called once the config has loaded.
    pub fn begin() -> Option<std::io::Result<Takeover>> {
        let name = std::env::var(channel::ENV).ok()?;
        Some(Takeover::connect(&name))
    }

    fn connect(name: &str) -> std::io::Result<Takeover> {
        let line = Line::connect(name)?;
        let ready = Message::Ready {
            pid: std::process::id(),
            version: env!("CARGO_PKG_VERSION").to_string(),
        };
        line.send(&ready, &[])?;
        let mut sockets = Vec::new();
        loop {
            match line.recv::<Message>(Duration::from_secs(30))? {
                (Message::Listener { group }, fds) => {
                    sockets.extend(fds.into_iter().map(|fd| (group.clone(), fd)));
                }
                (Message::ListenersEnd, _) => break,
                (other, _) => {
                    return Err(std::io::Error::other(format!(
                        "expected listeners: {other:?}"
                    )));
                }
            }
        }
        Ok(Takeover { line, sockets })
    }

    /// Takes the inherited sockets of `group`.
    pub fn take(&mut self, group: &str) -> Vec<std::net::TcpListener> {
        let (mine, rest): (Vec<_>, Vec<_>) = std::mem::take(&mut self.sockets)
            .into_iter()
            .partition(|(g, _)| g == group);
        self.sockets = rest;
        mine.into_iter()
            .map(|(_, fd)| std::net::TcpListener::from(fd))
            .collect()
    }

    /// Says `Serving`, then resumes tunnels as they arrive, spread over the workers, until
    /// `Done`. Runs on a blocking thread.
    pub fn take_tunnels(self, shared: Arc<Shared>) -> std::io::Result<usize> {
        if !self.sockets.is_empty() {
            tracing::info!(
                unused = self.sockets.len(),
                "upgrade: inherited listeners the config no longer names are closed"
            );
        }
        self.line.send(&Message::Serving, &[])?;
        let mut took = 0;
        loop {
            let (message, fds) = self.line.recv::<Message>(Duration::from_secs(300))?;
            match message {
                Message::Tunnel(record) => {
                    resume(&shared, &shared.upgrade.worker(took), *record, fds);
                    took += 1;
                }
                Message::Done { tunnels } => {
                    if tunnels != took {
                        tracing::warn!(tunnels, took, "upgrade: tunnel count differs");
                    }
                    self.line.send(&Message::Took { tunnels: took }, &[])?;
                    return Ok(took);
                }
                other => tracing::warn!(?other, "upgrade: unexpected message"),
            }
        }
    }
}
