//! The handover line between the running process and the one replacing it: a Unix
//! `SOCK_SEQPACKET` socket in the abstract namespace, each message a JSON value with the file
//! descriptors it speaks of attached (`SCM_RIGHTS`).
//!
//! Sequenced packets keep every message and its descriptors together, so no framing is needed.
//! An abstract name needs no writable directory (the unit and the image keep the filesystem
//! read-only), and since any local process could connect to one, the listener believes only a
//! peer whose `SO_PEERCRED` pid is the child it started.

use std::io::{self, IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::Duration;

use rustix::net::{
    AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags, SocketAddrUnix, SocketFlags, SocketType, sockopt,
};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// The environment variable that tells a new process where to report.
pub const ENV: &str = "PORTCULLIS_UPGRADE";

/// The largest message: a tunnel record carries at most two directions' unsent bytes
/// (a scratch buffer each, base64) plus its metadata.
const MAX_MESSAGE: usize = 128 * 1024;

/// Descriptors in one message: a tunnel has at most six (two sockets, two pipes); listeners
/// go in batches of this many.
pub const MAX_FDS: usize = 64;

/// One end of the handover line. Blocking, with a timeout on every receive: each side runs it
/// on a thread of its own.
pub struct Line {
    socket: OwnedFd,
}

/// The running process's side before the new one has connected.
pub struct Waiting {
    socket: OwnedFd,
    pub name: String,
}

impl Waiting {
    /// Listens on a fresh abstract name.
    pub fn listen() -> io::Result<Waiting> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let name = format!("portcullis-upgrade-{}-{nanos}", std::process::id());
        let socket = seqpacket()?;
        rustix::net::bind(
            &socket,
            &SocketAddrUnix::new_abstract_name(name.as_bytes())?,
        )?;
        rustix::net::listen(&socket, 1)?;
        Ok(Waiting { socket, name })
    }

    /// Waits up to `within` for process `pid` to connect; connections from anyone else are
    /// closed unanswered.
    pub fn accept(&self, pid: u32, within: Duration) -> io::Result<Line> {
        let deadline = std::time::Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return Err(io::ErrorKind::TimedOut.into());
            }
            let mut polled = [rustix::event::PollFd::new(
                &self.socket,
                rustix::event::PollFlags::IN,
            )];
            let timeout = rustix::time::Timespec::try_from(left.min(Duration::from_millis(200)))
                .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
            if rustix::event::poll(&mut polled, Some(&timeout))? == 0 {
                continue;
            }
            let socket = rustix::net::accept_with(&self.socket, SocketFlags::CLOEXEC)?;
            let peer = sockopt::socket_peercred(&socket)?;
            if peer.pid.as_raw_nonzero().get() as u32 == pid {
                return Line::new(socket);
            }
            tracing::warn!(
                pid = peer.pid.as_raw_nonzero().get(),
                "upgrade: a stranger connected; ignored"
            );
        }
    }
}

impl Line {
    /// The new process's side: connects to the name its parent gave it.
    pub fn connect(name: &str) -> io::Result<Line> {
        let socket = seqpacket()?;
        rustix::net::connect(
            &socket,
            &SocketAddrUnix::new_abstract_name(name.as_bytes())?,
        )?;
        Line::new(socket)
    }

    fn new(socket: OwnedFd) -> io::Result<Line> {
        sockopt::set_socket_send_buffer_size(&socket, 4 * MAX_MESSAGE)?;
        sockopt::set_socket_recv_buffer_size(&socket, 4 * MAX_MESSAGE)?;
        Ok(Line { socket })
    }

    pub fn send<T: Serialize>(&self, message: &T, fds: &[BorrowedFd<'_>]) -> io::Result<()> {
        let body = serde_json::to_vec(message).map_err(io::Error::other)?;
        if body.len() > MAX_MESSAGE || fds.len() > MAX_FDS {
            return Err(io::Error::other("upgrade message too large"));
        }
        let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
        let mut control = SendAncillaryBuffer::new(&mut space);
        if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
            return Err(io::Error::other("cannot attach descriptors"));
        }
        let sent = rustix::net::sendmsg(
            &self.socket,
            &[IoSlice::new(&body)],
            &mut control,
            SendFlags::NOSIGNAL,
        )?;
        if sent != body.len() {
            return Err(io::Error::other("upgrade message cut short"));
        }
        Ok(())
    }

    /// The next message and its descriptors, waiting up to `within`.
    pub fn recv<T: DeserializeOwned>(&self, within: Duration) -> io::Result<(T, Vec<OwnedFd>)> {
        sockopt::set_socket_timeout(&self.socket, sockopt::Timeout::Recv, Some(within))?;
        let mut body = vec![0u8; MAX_MESSAGE];
        let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let received = rustix::net::recvmsg(
            &self.socket,
            &mut [IoSliceMut::new(&mut body)],
            &mut control,
            RecvFlags::CMSG_CLOEXEC,
        )
        .map_err(|e| match e {
            rustix::io::Errno::AGAIN => io::Error::from(io::ErrorKind::TimedOut),
            e => e.into(),
        })?;
        if received.bytes == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let mut fds = Vec::new();
        for message in control.drain() {
            if let RecvAncillaryMessage::ScmRights(rights) = message {
                fds.extend(rights);
            }
        }
        let message = serde_json::from_slice(&body[..received.bytes]).map_err(io::Error::other)?;
        Ok((message, fds))
    }

    pub fn as_fd(&self) -> BorrowedFd<'_> {
        self.socket.as_fd()
    }
}

fn seqpacket() -> io::Result<OwnedFd> {
    Ok(rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC,
        None,
    )?)
}
