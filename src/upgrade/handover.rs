//! One tunnel in transit: what a parked tunnel carries from the process that ran it to the
//! one that goes on with it, and the wire form it travels in.
//!
//! The record holds everything the access log and the status page need to tell the tunnel's
//! whole story (client, host, rule, resolved address, bytes and start time from the first
//! process), each direction's [`Flow`] (bytes read but unsent, a pipe's contents, whether the
//! sender finished), and how long the tunnel had been idle. The descriptors go beside it:
//! client, origin, then each spliced direction's pipe.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde::{Deserialize, Serialize};
use tokio::net::TcpStream;

use crate::dns::CachePath;
use crate::telemetry::access_log::Entry;
use crate::tunnel::{Flow, Flows, PipeState, Plain};

/// A parked tunnel with its history, in this process.
pub struct Moving {
    pub entry: Entry,
    /// When the tunnel first opened, in whichever process that was.
    pub opened: SystemTime,
    /// Bytes each way since it opened (client to origin, origin to client).
    pub bytes: (u64, u64),
    pub idle_timeout: Duration,
    pub plain: Box<Plain>,
}

/// A tunnel's metadata on the wire.
#[derive(Serialize, Deserialize, Debug)]
pub struct Record {
    client: SocketAddr,
    via: Option<SocketAddr>,
    vpce_id: Option<String>,
    user: String,
    client_cert: String,
    host: String,
    port: u16,
    rule: String,
    resolved: Option<SocketAddr>,
    dns: Option<String>,
    sni: String,
    counted_as: Option<String>,
    opened_unix_ms: u64,
    bytes_upstream: u64,
    bytes_downstream: u64,
    idle_for_ms: u64,
    idle_timeout_ms: u64,
    up: FlowRecord,
    down: FlowRecord,
}

/// One direction on the wire; its pipe, if any, travels as two descriptors.
#[derive(Serialize, Deserialize, Debug)]
struct FlowRecord {
    /// Unsent bytes, base64.
    pending: String,
    early: bool,
    bulk: u64,
    finished: bool,
    /// Bytes in the pipe, when the direction was splicing.
    in_pipe: Option<usize>,
    pipe_fallback: bool,
}

impl Record {
    /// Bytes sitting in pipes, for the handover's log line.
    pub fn in_pipes(&self) -> usize {
        self.up.in_pipe.unwrap_or(0) + self.down.in_pipe.unwrap_or(0)
    }

    pub fn host(&self) -> &str {
        &self.host
    }
}

/// The sockets and pipes of a parked tunnel, in the order [`Moving::from_wire`] takes them.
pub struct Fds {
    pub all: Vec<OwnedFd>,
}

impl Fds {
    pub fn borrowed(&self) -> Vec<BorrowedFd<'_>> {
        self.all.iter().map(AsFd::as_fd).collect()
    }
}

impl Moving {
    /// Splits into the record and the descriptors. The sockets leave this process's event
    /// loop here (they must be taken out inside the runtime that polls them).
    pub fn into_wire(self) -> io::Result<(Record, Fds)> {
        let Moving {
            entry,
            opened,
            bytes,
            idle_timeout,
            plain,
        } = self;
        let Plain {
            client,
            origin,
            flows,
            idle_for,
        } = *plain;
        let mut all = vec![
            OwnedFd::from(client.into_std()?),
            OwnedFd::from(origin.into_std()?),
        ];
        let Flows { up, down } = flows;
        let up = flow_record(up, &mut all);
        let down = flow_record(down, &mut all);
        let record = Record {
            client: entry.client,
            via: entry.via,
            vpce_id: entry.vpce_id.as_deref().map(str::to_string),
            user: entry.user,
            client_cert: entry.client_cert,
            host: entry.host,
            port: entry.port,
            rule: entry.rule,
            resolved: entry.resolved,
            dns: entry.dns.map(|d| d.as_str().to_string()),
            sni: entry.sni,
            counted_as: entry.counted_as,
            opened_unix_ms: opened
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            bytes_upstream: bytes.0,
            bytes_downstream: bytes.1,
            idle_for_ms: idle_for.as_millis() as u64,
            idle_timeout_ms: idle_timeout.as_millis() as u64,
            up,
            down,
        };
        Ok((record, Fds { all }))
    }

    /// Rebuilds a tunnel from its record and descriptors; must run inside the runtime that
    /// will poll its sockets.
    pub fn from_wire(record: Record, fds: Vec<OwnedFd>) -> io::Result<Moving> {
        let mut fds = fds.into_iter();
        let mut next = || {
            fds.next()
                .ok_or_else(|| io::Error::other("descriptor missing"))
        };
        let client = socket(next()?)?;
        let origin = socket(next()?)?;
        let up = flow(record.up, &mut next)?;
        let down = flow(record.down, &mut next)?;
        let entry = Entry {
            client: record.client,
            via: record.via,
            vpce_id: record.vpce_id.map(Arc::from),
            user: record.user,
            client_cert: record.client_cert,
            host: record.host,
            port: record.port,
            rule: record.rule,
            resolved: record.resolved,
            dns: match record.dns.as_deref() {
                Some("cached") => Some(CachePath::Cached),
                Some("bypass") => Some(CachePath::Bypass),
                _ => None,
            },
            sni: record.sni,
            counted_as: record.counted_as,
        };
        Ok(Moving {
            entry,
            opened: UNIX_EPOCH + Duration::from_millis(record.opened_unix_ms),
            bytes: (record.bytes_upstream, record.bytes_downstream),
            idle_timeout: Duration::from_millis(record.idle_timeout_ms),
            plain: Box::new(Plain {
                client,
                origin,
                flows: Flows { up, down },
                idle_for: Duration::from_millis(record.idle_for_ms),
            }),
        })
    }
}

fn flow_record(flow: Flow, fds: &mut Vec<OwnedFd>) -> FlowRecord {
    let in_pipe = flow.pipe.map(|pipe| {
        fds.push(pipe.read_end);
        fds.push(pipe.write_end);
        pipe.in_pipe
    });
    FlowRecord {
        pending: STANDARD.encode(&flow.pending),
        early: flow.early,
        bulk: flow.bulk,
        finished: flow.finished,
        in_pipe,
        pipe_fallback: flow.pipe_fallback,
    }
}

fn flow(record: FlowRecord, next: &mut impl FnMut() -> io::Result<OwnedFd>) -> io::Result<Flow> {
    let pipe = match record.in_pipe {
        Some(in_pipe) => Some(PipeState {
            read_end: next()?,
            write_end: next()?,
            in_pipe,
        }),
        None => None,
    };
    Ok(Flow {
        pending: STANDARD.decode(record.pending).map_err(io::Error::other)?,
        early: record.early,
        bulk: record.bulk,
        finished: record.finished,
        pipe,
        pipe_fallback: record.pipe_fallback,
    })
}

fn socket(fd: OwnedFd) -> io::Result<TcpStream> {
    let stream = std::net::TcpStream::from(fd);
    stream.set_nonblocking(true)?;
    TcpStream::from_std(stream)
}
