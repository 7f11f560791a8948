//! What the proxy tells its operators, kept apart from the data path, which only bumps
//! counters and hands finished events over:
//!
//! - [`metrics`]: the Prometheus registry and the per-domain handles the data path holds.
//! - [`access_log`]: one event per decision and per closed tunnel; [`log_format`] writes it
//!   as a JSON line and [`log_writer`] batches lines to stdout without ever blocking a worker.
//! - The status (`GET /`, `/status.json`, below): the open tunnels, the most recent
//!   refusals, the reloads.
//!
//! The status is bounded whatever the load: the open-tunnel table holds one small entry per
//! open tunnel (which `max_connections` bounds) and nothing after it closes, and the
//! refusals are a ring of fixed size. The data path pays one map insert and one removal per
//! tunnel; its byte counts are the same atomics the relay already adds to.

pub mod access_log;
pub mod log_format;
pub mod log_writer;
pub mod metrics;
pub mod open;
pub mod recent;

use std::sync::Mutex;
use std::time::{Instant, SystemTime};

pub use open::{OpenTunnel, OpenTunnels};
pub use recent::{Refusal, Refusals};

/// The status a running proxy keeps beside its metrics.
pub struct Status {
    pub started: SystemTime,
    pub started_at: Instant,
    pub open: OpenTunnels,
    pub refusals: Refusals,
    reloads: Mutex<Reloads>,
    listeners: Mutex<Vec<Listening>>,
}

/// The last reload that worked and the last that did not.
#[derive(Debug, Clone, Default)]
pub struct Reloads {
    pub last_ok: Option<SystemTime>,
    pub last_error: Option<(SystemTime, String)>,
}

/// One address the proxy serves on.
#[derive(Debug, Clone)]
pub struct Listening {
    /// `proxy`, `proxy (tls)` or `admin`.
    pub kind: &'static str,
    pub addr: String,
}

impl Status {
    pub fn new() -> Status {
        Status {
            started: SystemTime::now(),
            started_at: Instant::now(),
            open: OpenTunnels::default(),
            refusals: Refusals::new(recent::KEPT),
            reloads: Mutex::new(Reloads::default()),
            listeners: Mutex::new(Vec::new()),
        }
    }

    pub fn reloaded(&self, result: &Result<(), String>) {
        let mut reloads = self.reloads.lock().unwrap_or_else(|e| e.into_inner());
        match result {
            Ok(()) => reloads.last_ok = Some(SystemTime::now()),
            Err(e) => reloads.last_error = Some((SystemTime::now(), e.clone())),
        }
    }

    pub fn reloads(&self) -> Reloads {
        self.reloads
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn listening(&self, kind: &'static str, addr: String) {
        self.listeners
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Listening { kind, addr });
    }

    pub fn listeners(&self) -> Vec<Listening> {
        self.listeners
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

impl Default for Status {
    fn default() -> Status {
        Status::new()
    }
}
