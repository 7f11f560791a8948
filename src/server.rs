//! The proxy listener: accept loop, connection limit, client ACL, request head, hyper.
//!
//! The accept loop stays cheap: a permit or an immediate 503, then everything else happens in
//! the connection's own task. The request head is read here, under `header_timeout`, before
//! hyper sees the connection: hyper's own header timeout closes silently, and its automatic 400
//! carries no `Proxy-Status`, while a client of an egress proxy deserves to know why.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;

use crate::access_log;
use crate::connect;
use crate::error::Reason;
use crate::prefixed::Prefixed;
use crate::state::Shared;

/// The largest request head accepted. A CONNECT head is a few hundred bytes; this leaves room
/// for large `Proxy-Authorization` and tracing headers.
const MAX_HEAD: usize = 64 * 1024;
/// Header lines accepted in one head (hyper's default too).
const MAX_HEADERS: usize = 100;

/// Accepts until `stop` fires. Accept errors (EMFILE above all) back off instead of spinning.
pub async fn accept_loop(listener: TcpListener, shared: Arc<Shared>, stop: CancellationToken) {
    let mut backoff = Duration::from_millis(5);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = stop.cancelled() => return,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => {
                backoff = Duration::from_millis(5);
                accepted
            }
            Err(e) => {
                tracing::warn!(error = %e, "accept failed; backing off for {backoff:?}");
                shared.metrics.connection_rejected("accept_error");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        let Ok(permit) = shared.connections.clone().try_acquire_owned() else {
            reject_now(&stream, peer, &shared, Reason::Overloaded);
            continue;
        };
        let task_shared = shared.clone();
        shared
            .tasks
            .spawn(serve_connection(stream, peer, task_shared, permit));
    }
}

/// A best-effort reply without waiting: a fresh socket's send buffer always takes a short
/// reply, and a client that is not reading must not hold up the accept loop.
fn reject_now(stream: &TcpStream, peer: SocketAddr, shared: &Shared, reason: Reason) {
    let _ = stream.try_write(&reason.raw_response());
    shared.metrics.connection_rejected(reason.as_str());
    access_log::rejected(peer, reason);
}

async fn serve_connection(
    mut stream: TcpStream,
    peer: SocketAddr,
    shared: Arc<Shared>,
    _permit: OwnedSemaphorePermit,
) {
    let runtime = shared.runtime();
    let peer = normalize(peer);
    if !runtime
        .config
        .clients_allow
        .iter()
        .any(|net| net.contains(&peer.ip()))
    {
        reject(&mut stream, peer, &shared, Reason::ClientNotAllowed).await;
        return;
    }
    let _ = stream.set_nodelay(true);
    let header_timeout = runtime.config.proxy.header_timeout;
    drop(runtime);
    let mut head = BytesMut::with_capacity(1024);
    let read = tokio::select! {
        read = tokio::time::timeout(header_timeout, read_head(&mut stream, &mut head)) => read,
        () = shared.abort.cancelled() => return,
    };
    match read {
        Err(_elapsed) => {
            reject(&mut stream, peer, &shared, Reason::HeaderTimeout).await;
            return;
        }
        Ok(Err(HeadError::Closed)) => return,
        Ok(Err(HeadError::Malformed)) => {
            shared
                .metrics
                .request(crate::metrics::INVALID, "", Some(Reason::BadRequest));
            let mut entry = access_log::Entry::new(peer);
            entry.host = String::new();
            entry.decision(Some(Reason::BadRequest));
            let _ = write_and_close(&mut stream, Reason::BadRequest).await;
            return;
        }
        Ok(Ok(())) => {}
    }
    let io = TokioIo::new(Prefixed::new(head.freeze(), stream));
    let service = service_fn(move |request| connect::handle(request, shared.clone(), peer));
    if let Err(e) = http1::Builder::new()
        .max_buf_size(MAX_HEAD.max(8192))
        .serve_connection(io, service)
        .with_upgrades()
        .await
    {
        tracing::debug!(%peer, error = %e, "client connection ended with an error");
    }
}

/// IPv4 clients on a dual-stack socket arrive as `::ffff:a.b.c.d`; ACLs are written in IPv4.
fn normalize(peer: SocketAddr) -> SocketAddr {
    match peer.ip() {
        std::net::IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(v4.into(), peer.port()),
            None => peer,
        },
        _ => peer,
    }
}

async fn reject(stream: &mut TcpStream, peer: SocketAddr, shared: &Shared, reason: Reason) {
    shared.metrics.connection_rejected(reason.as_str());
    access_log::rejected(peer, reason);
    let _ = write_and_close(stream, reason).await;
}

/// Writes a refusal, bounded in time: a client that does not read cannot keep the task alive.
async fn write_and_close(stream: &mut TcpStream, reason: Reason) -> std::io::Result<()> {
    let reply = reason.raw_response();
    let write = async {
        stream.write_all(&reply).await?;
        stream.shutdown().await
    };
    tokio::time::timeout(Duration::from_secs(5), write)
        .await
        .unwrap_or(Ok(()))
}

enum HeadError {
    Closed,
    Malformed,
}

/// Reads until a complete, well-formed request head is buffered. Bytes after the head (a
/// pipelined ClientHello) stay in `buf` for the tunnel.
async fn read_head(stream: &mut TcpStream, buf: &mut BytesMut) -> Result<(), HeadError> {
    loop {
        if !buf.is_empty() {
            match check_head(buf) {
                Ok(true) => return Ok(()),
                Ok(false) if buf.len() >= MAX_HEAD => return Err(HeadError::Malformed),
                Ok(false) => {}
                Err(()) => return Err(HeadError::Malformed),
            }
        }
        match stream.read_buf(buf).await {
            Ok(0) if buf.is_empty() => return Err(HeadError::Closed),
            Ok(0) => return Err(HeadError::Malformed),
            Ok(_) => {}
            Err(_) => return Err(HeadError::Closed),
        }
    }
}

/// `Ok(true)`: a complete head that hyper will accept; `Ok(false)`: need more bytes.
fn check_head(buf: &[u8]) -> Result<bool, ()> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    match request.parse(buf) {
        Ok(httparse::Status::Complete(_)) => {
            // hyper parses the target as a URI; anything it would reject is ours to refuse.
            let target = request.path.unwrap_or("");
            target.parse::<hyper::Uri>().map(|_| true).map_err(|_| ())
        }
        Ok(httparse::Status::Partial) => Ok(false),
        Err(_) => Err(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn head_checks() {
        assert_eq!(
            check_head(b"CONNECT a.example.com:443 HTTP/1.1\r\nHost: a\r\n\r\n"),
            Ok(true)
        );
        assert_eq!(
            check_head(b"CONNECT a.example.com:443 HTTP/1.1\r\nHo"),
            Ok(false)
        );
        assert_eq!(check_head(b"CONNECT a b c d\r\n\r\n"), Err(()));
        assert_eq!(
            check_head(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"),
            Err(())
        );
    }
}
