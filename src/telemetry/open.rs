//! The tunnels open now, each with its client, host, rule, age and bytes so far.
//!
//! An entry is made when a tunnel opens and removed when it closes, however it ends (the
//! [`Registered`] guard). Its byte counts are the atomics the relay adds to anyway, so a
//! moving tunnel costs nothing more here.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Instant, SystemTime};

use dashmap::DashMap;

use crate::tunnel::ByteTotals;

/// One open tunnel.
#[derive(Debug)]
pub struct OpenTunnel {
    pub client: SocketAddr,
    pub host: String,
    pub port: u16,
    pub rule: String,
    pub opened: SystemTime,
    pub opened_at: Instant,
    /// As the relay counts them.
    pub bytes: ByteTotals,
}

impl OpenTunnel {
    pub fn new(client: SocketAddr, host: &str, port: u16, rule: &str) -> OpenTunnel {
        OpenTunnel {
            client,
            host: host.to_string(),
            port,
            rule: rule.to_string(),
            opened: SystemTime::now(),
            opened_at: Instant::now(),
            bytes: ByteTotals::default(),
        }
    }

    /// A tunnel that opened at `opened` in the process an upgrade replaced.
    pub fn resumed(
        client: SocketAddr,
        host: &str,
        port: u16,
        rule: &str,
        opened: SystemTime,
    ) -> OpenTunnel {
        let age = SystemTime::now().duration_since(opened).unwrap_or_default();
        let now = Instant::now();
        OpenTunnel {
            opened,
            opened_at: now.checked_sub(age).unwrap_or(now),
            ..OpenTunnel::new(client, host, port, rule)
        }
    }

    /// (client to origin, origin to client) so far.
    pub fn bytes(&self) -> (u64, u64) {
        (
            self.bytes.upstream.load(Ordering::Relaxed),
            self.bytes.downstream.load(Ordering::Relaxed),
        )
    }
}

/// Every open tunnel, by a number of its own.
#[derive(Default)]
pub struct OpenTunnels {
    map: Arc<DashMap<u64, Arc<OpenTunnel>>>,
    next: AtomicU64,
}

/// A tunnel's place in the table; dropping it removes the entry.
pub struct Registered {
    map: Arc<DashMap<u64, Arc<OpenTunnel>>>,
    id: u64,
    pub tunnel: Arc<OpenTunnel>,
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.map.remove(&self.id);
    }
}

impl OpenTunnels {
    pub fn register(&self, tunnel: OpenTunnel) -> Registered {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let tunnel = Arc::new(tunnel);
        self.map.insert(id, tunnel.clone());
        Registered {
            map: self.map.clone(),
            id,
            tunnel,
        }
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Every open tunnel now (a snapshot: entries are shared, not copied).
    pub fn snapshot(&self) -> Vec<Arc<OpenTunnel>> {
        self.map.iter().map(|entry| entry.value().clone()).collect()
    }
}
