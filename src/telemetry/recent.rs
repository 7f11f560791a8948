//! The most recent refusals, in a ring of fixed size: "what did the proxy refuse, and why?"
//! without grepping the log. A flood of refusals only overwrites the oldest; hosts and other
//! client-supplied text are cut to a bounded length when recorded.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::SystemTime;

/// Refusals kept.
pub const KEPT: usize = 200;
/// Longest host kept (a valid name is at most 253; a refused one may be anything).
const MAX_HOST: usize = 256;

#[derive(Debug, Clone)]
pub struct Refusal {
    pub time: SystemTime,
    pub client: SocketAddr,
    pub host: String,
    pub port: u16,
    pub reason: &'static str,
    pub rule: String,
}

pub struct Refusals {
    ring: Mutex<VecDeque<Refusal>>,
    capacity: usize,
}

impl Refusals {
    pub fn new(capacity: usize) -> Refusals {
        Refusals {
            ring: Mutex::new(VecDeque::with_capacity(capacity)),
            capacity,
        }
    }

    pub fn record(
        &self,
        client: SocketAddr,
        host: &str,
        port: u16,
        reason: &'static str,
        rule: &str,
    ) {
        let mut host = host.to_string();
        if host.len() > MAX_HOST {
            let mut cut = MAX_HOST;
            while !host.is_char_boundary(cut) {
                cut -= 1;
            }
            host.truncate(cut);
            host.push('…');
        }
        let refusal = Refusal {
            time: SystemTime::now(),
            client,
            host,
            port,
            reason,
            rule: rule.to_string(),
        };
        let mut ring = self.ring.lock().unwrap_or_else(|e| e.into_inner());
        if ring.len() == self.capacity {
            ring.pop_front();
        }
        ring.push_back(refusal);
    }

    /// Newest first.
    pub fn newest_first(&self) -> Vec<Refusal> {
        let ring = self.ring.lock().unwrap_or_else(|e| e.into_inner());
        ring.iter().rev().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_newest_and_cuts_long_hosts() {
        let refusals = Refusals::new(3);
        let client = "192.0.2.1:1".parse().unwrap();
        for i in 0..5 {
            refusals.record(client, &format!("h{i}"), 443, "domain_not_allowed", "");
        }
        let hosts: Vec<_> = refusals
            .newest_first()
            .into_iter()
            .map(|r| r.host)
            .collect();
        assert_eq!(hosts, ["h4", "h3", "h2"]);
        refusals.record(client, &"é".repeat(300), 443, "bad_request", "");
        let long = &refusals.newest_first()[0].host;
        assert!(long.len() <= MAX_HOST + '…'.len_utf8() && long.ends_with('…'));
    }
}
