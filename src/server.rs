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
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;

use crate::connect;
use crate::connect::ClientInfo;
use crate::error::Reason;
use crate::net::keepalive;
use crate::net::proxy_protocol::{self, Refused};
use crate::prefixed::{ClientStream, Prefixed};
use crate::state::Runtime;
use crate::state::Shared;
use crate::telemetry::access_log;
use crate::tls;
use tokio::time::Instant;

/// The largest request head accepted. A CONNECT head is a few hundred bytes; this leaves room
/// for large `Proxy-Authorization` and tracing headers.
const MAX_HEAD: usize = 64 * 1024;
/// Header lines accepted in one head (hyper's default too).
const MAX_HEADERS: usize = 100;

/// Where an accept loop runs: `tls` is the index of the listener's `[[proxy.tls]]` entry, for
/// TLS listeners; `worker` the thread (see [`workers`](crate::workers)).
#[derive(Debug, Clone, Copy)]
pub struct Listener {
    pub tls: Option<usize>,
    pub worker: usize,
}

/// Accepts until `stop` fires. Accept errors (EMFILE above all) back off instead of spinning.
pub async fn accept_loop(
    listener: TcpListener,
    kind: Listener,
    shared: Arc<Shared>,
    stop: CancellationToken,
) {
    let tls = kind.tls;
    let accepted_total = shared.metrics.accepted(kind.worker);
    let mut backoff = Duration::from_millis(5);
    // Set on the listener before it was handed here (see `keepalive::listening`).
    let mut keepalive = shared.keepalive();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = stop.cancelled() => return,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => {
                backoff = Duration::from_millis(5);
                accepted_total.inc();
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
        // Accepted sockets inherit keepalive from the listener. After a reload changed it,
        // the listener is set anew, and so is this socket, which it had already made.
        let wanted = shared.keepalive();
        if keepalive != wanted {
            keepalive::listening(&listener, wanted);
            let _ = wanted.apply(&stream);
            keepalive = wanted;
        }
        let Ok(permit) = shared.connections.clone().try_acquire_owned() else {
            reject_overloaded(stream, peer, &shared);
            continue;
        };
        let task_shared = shared.clone();
        let connection = serve_connection(stream, peer, tls, task_shared, permit);
        // A plain connection may become a tunnel an upgrade must wait for and move; a TLS
        // one cannot move (see `upgrade`).
        match tls {
            None => shared
                .tasks
                .spawn(shared.upgrade.movable.track_future(connection)),
            Some(_) => shared.tasks.spawn(connection),
        };
    }
}

/// Past `max_connections`: a 503, closed gracefully in a task of its own so the accept loop
/// never waits on the client. Those tasks are bounded too; past
/// [`MAX_REJECTING`](crate::state::MAX_REJECTING) the reply
/// is written once without waiting and the socket dropped.
fn reject_overloaded(stream: TcpStream, peer: SocketAddr, shared: &Arc<Shared>) {
    shared
        .metrics
        .connection_rejected(Reason::Overloaded.as_str());
    access_log::rejected(peer, Reason::Overloaded);
    let overloaded = Reason::Overloaded.as_str();
    shared.status.refusals.record(peer, "", 0, overloaded, "");
    match shared.rejecting.clone().try_acquire_owned() {
        Ok(permit) => {
            shared.tasks.spawn(async move {
                let mut stream = stream;
                let _ = write_and_close(&mut stream, Reason::Overloaded).await;
                drop(permit);
            });
        }
        Err(_) => {
            let _ = stream.try_write(&Reason::Overloaded.raw_response());
        }
    }
}

async fn serve_connection(
    mut stream: TcpStream,
    peer: SocketAddr,
    tls: Option<usize>,
    shared: Arc<Shared>,
    permit: OwnedSemaphorePermit,
) {
    let runtime = shared.runtime();
    // One budget for the PROXY header, the TLS handshake and the request head together.
    let deadline = Instant::now() + runtime.config.proxy.header_timeout;
    // Bytes read ahead: a PROXY header's search may read the start of the handshake or head.
    let mut head = BytesMut::with_capacity(1024);
    let Some(client) = identify(&mut stream, peer, &runtime, &shared, &mut head, deadline).await
    else {
        return;
    };
    // TCP_NODELAY came from the listener (`net::prepare_listener`).
    let (mut stream, client) = match tls {
        None => (ClientStream::Plain(stream), client),
        Some(index) => {
            let early = std::mem::take(&mut head);
            let secured = secure(stream, early, client, index, &runtime, &shared, deadline);
            match secured.await {
                Some(secured) => secured,
                None => return,
            }
        }
    };
    drop(runtime);
    let read = tokio::select! {
        read = tokio::time::timeout_at(deadline, read_head(&mut stream, &mut head)) => read,
        () = shared.abort.cancelled() => return,
    };
    match read {
        Err(_elapsed) => reject(&mut stream, client.addr, &shared, Reason::HeaderTimeout).await,
        Ok(Err(HeadError::Closed)) => {}
        Ok(Err(HeadError::Malformed)) => malformed(&mut stream, &client, &shared, &head).await,
        Ok(Ok(())) => serve_http(stream, head, client, shared, permit).await,
    }
}

/// Who the client is: the connection's peer, or the client a trusted balancer's PROXY header
/// names; `None` once the connection has been answered (or a health check has closed). Both
/// are held to `[clients] allow`: an untrusted source before a byte is read, a balancer's
/// client once its header has said who it is.
async fn identify(
    stream: &mut TcpStream,
    peer: SocketAddr,
    runtime: &Runtime,
    shared: &Shared,
    head: &mut BytesMut,
    deadline: Instant,
) -> Option<ClientInfo> {
    let own = connect::unmapped(peer);
    let trusted = runtime.config.trusts_proxy_header(own.ip());
    if !trusted && !runtime.config.client_allowed(own.ip()) {
        reject(stream, own, shared, Reason::ClientNotAllowed).await;
        return None;
    }
    let header = tokio::select! {
        read = tokio::time::timeout_at(deadline, proxy_protocol::read(stream, head, trusted)) => read,
        () = shared.abort.cancelled() => return None,
    };
    let header = match header {
        Err(_elapsed) => {
            reject(stream, own, shared, Reason::HeaderTimeout).await;
            return None;
        }
        Ok(Err(Refused::Closed)) => return None,
        Ok(Err(refused)) => {
            refuse_header(stream, own, shared, refused).await;
            return None;
        }
        Ok(Ok(header)) => header,
    };
    let health_check = header.as_ref().is_some_and(|h| h.local);
    let client = ClientInfo::behind(own, header);
    if trusted && !runtime.config.client_allowed(client.addr.ip()) {
        if health_check {
            // A balancer's `LOCAL` health check is not a client: no reply, no log line.
            tracing::debug!(balancer = %own, "PROXY LOCAL health check");
        } else {
            reject(stream, client.addr, shared, Reason::ClientNotAllowed).await;
        }
        return None;
    }
    Some(client)
}

/// The TLS handshake of a `[[proxy.tls]]` listener, and its client certificate's name held to
/// `[clients] allow_cert_names`; `None` once the connection is over.
async fn secure(
    stream: TcpStream,
    early: BytesMut,
    client: ClientInfo,
    index: usize,
    runtime: &Runtime,
    shared: &Shared,
    deadline: Instant,
) -> Option<(ClientStream, ClientInfo)> {
    let (mut stream, cert) = match handshake(stream, early, runtime, index, deadline).await {
        Ok(accepted) => accepted,
        Err(reason) => {
            shared.metrics.connection_rejected(reason);
            tracing::debug!(client = %client.addr, reason, "TLS handshake failed");
            return None;
        }
    };
    if !cert_allowed(runtime, Some(index), cert.as_deref()) {
        reject(&mut stream, client.addr, shared, Reason::ClientNotAllowed).await;
        return None;
    }
    Some((stream, ClientInfo { cert, ..client }))
}

/// A request head hyper must not see: 400, counted, logged, and on the status page with the
/// target as sent.
async fn malformed(stream: &mut ClientStream, client: &ClientInfo, shared: &Shared, head: &[u8]) {
    shared.metrics.request(
        crate::telemetry::metrics::INVALID,
        "",
        Some(Reason::BadRequest),
    );
    access_log::Entry::new(client).decision(Some(Reason::BadRequest));
    let reason = Reason::BadRequest.as_str();
    let refusals = &shared.status.refusals;
    refusals.record(client.addr, &raw_target(head), 0, reason, "");
    let _ = write_and_close(stream, Reason::BadRequest).await;
}

/// Hands the connection, head bytes first, to hyper for the CONNECT and what follows.
async fn serve_http(
    stream: ClientStream,
    head: BytesMut,
    client: ClientInfo,
    shared: Arc<Shared>,
    permit: OwnedSemaphorePermit,
) {
    let peer = client.addr;
    let io = TokioIo::new(Prefixed::new(head.freeze(), stream));
    // The connection's permit moves into the tunnel if one opens, so open tunnels count
    // against `max_connections` for as long as they live.
    let permit = Arc::new(std::sync::Mutex::new(Some(permit)));
    let service = service_fn(move |request| {
        connect::handle(request, shared.clone(), client.clone(), permit.clone())
    });
    if let Err(e) = http1::Builder::new()
        .max_buf_size(MAX_HEAD.max(8192))
        .serve_connection(io, service)
        .with_upgrades()
        .await
    {
        tracing::debug!(%peer, error = %e, "client connection ended with an error");
    }
}

/// A PROXY header that cannot be believed: 400, logged with why, counted.
async fn refuse_header(stream: &mut TcpStream, own: SocketAddr, shared: &Shared, refused: Refused) {
    shared.metrics.connection_rejected("proxy_header");
    let reason = Reason::BadRequest.as_str();
    shared.status.refusals.record(own, "", 0, reason, "");
    access_log::proxy_header_refused(own, refused);
    let _ = write_and_close(stream, Reason::BadRequest).await;
}

/// Completes the TLS handshake of a `[[proxy.tls]]` listener by `deadline`; returns the
/// stream and the verified client certificate's name, if the client presented one. The error
/// is the `connections_rejected_total` reason.
async fn handshake(
    stream: TcpStream,
    early: BytesMut,
    runtime: &Runtime,
    index: usize,
    deadline: Instant,
) -> Result<(ClientStream, Option<Arc<str>>), &'static str> {
    let listener = runtime
        .config
        .proxy
        .tls
        .get(index)
        .ok_or("tls_listener_removed")?;
    let acceptor = tokio_rustls::TlsAcceptor::from(listener.config.clone());
    let accept = acceptor.accept_with(stream, |connection| {
        let mut rest = &early[..];
        while !rest.is_empty() {
            match connection.read_tls(&mut rest) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
        // Processed now: the handshake loop reads the socket only for more, and the client,
        // having sent its whole hello, is waiting for ours. An error here fails the handshake.
        let _ = connection.process_new_packets();
    });
    let tls = tokio::time::timeout_at(deadline, accept)
        .await
        .map_err(|_| "header_timeout")?
        .map_err(|_| "tls_handshake")?;
    let cert = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.first())
        .and_then(tls::client_name)
        .map(Arc::from);
    Ok((ClientStream::Tls(Box::new(tls)), cert))
}

/// `[clients] allow_cert_names` binds on mutual-TLS listeners only.
fn cert_allowed(runtime: &Runtime, tls: Option<usize>, cert: Option<&str>) -> bool {
    let names = &runtime.config.allow_cert_names;
    let mutual = tls
        .and_then(|i| runtime.config.proxy.tls.get(i))
        .is_some_and(|listener| listener.mutual);
    !mutual || names.is_empty() || cert.is_some_and(|name| names.iter().any(|n| n == name))
}

async fn reject<S>(stream: &mut S, peer: SocketAddr, shared: &Shared, reason: Reason)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    shared.metrics.connection_rejected(reason.as_str());
    access_log::rejected(peer, reason);
    shared
        .status
        .refusals
        .record(peer, "", 0, reason.as_str(), "");
    let _ = write_and_close(stream, reason).await;
}

/// Writes a refusal and closes without a reset: after our FIN, whatever the client still sends
/// is read and discarded until it closes too, because closing a socket with unread bytes makes
/// the kernel answer with RST, and a client may then lose the reply it has not read yet.
/// Bounded in time and bytes: a client that neither reads nor closes cannot keep the task.
async fn write_and_close<S>(stream: &mut S, reason: Reason) -> std::io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let reply = reason.raw_response();
    let close = async {
        stream.write_all(&reply).await?;
        stream.shutdown().await?;
        let mut discard = [0u8; 4096];
        let mut budget: usize = 256 * 1024;
        while budget > 0 {
            match stream.read(&mut discard).await? {
                0 => break,
                n => budget = budget.saturating_sub(n),
            }
        }
        Ok(())
    };
    tokio::time::timeout(Duration::from_secs(2), close)
        .await
        .unwrap_or(Ok(()))
}

/// What a malformed head asked for, as sent (for the status page, which escapes it): the
/// request line's second word, without anything before an `@` (it may be credentials).
fn raw_target(head: &[u8]) -> String {
    let line = head.split(|&b| b == b'\n').next().unwrap_or_default();
    let target = line.split(|&b| b == b' ').nth(1).unwrap_or_default();
    let target = target.rsplit(|&b| b == b'@').next().unwrap_or_default();
    String::from_utf8_lossy(&target[..target.len().min(512)]).into_owned()
}

enum HeadError {
    Closed,
    Malformed,
}

/// Reads until a complete, well-formed request head is buffered. Bytes after the head (a
/// pipelined ClientHello) stay in `buf` for the tunnel.
async fn read_head<S>(stream: &mut S, buf: &mut BytesMut) -> Result<(), HeadError>
where
    S: AsyncRead + Unpin,
{
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

/// `Ok(true)`: a complete head that hyper will accept; `Ok(false)`: need more bytes;
/// `Err(())`: malformed, answered 400. Public for fuzzing.
#[allow(clippy::result_unit_err)]
pub fn check_head(buf: &[u8]) -> Result<bool, ()> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    match request.parse(buf) {
        Ok(httparse::Status::Complete(length)) => {
            // httparse tolerates bare LF line ends; hyper and this proxy's peers may not read
            // the head the same way, so only CRLF heads are accepted.
            if bare_lf(&buf[..length]) {
                return Err(());
            }
            // hyper parses the target as a URI; anything it would reject is ours to refuse.
            let target = request.path.unwrap_or("");
            target.parse::<hyper::Uri>().map_err(|_| ())?;
            check_framing(&request)?;
            Ok(true)
        }
        Ok(httparse::Status::Partial) => Ok(false),
        Err(_) => Err(()),
    }
}

fn bare_lf(head: &[u8]) -> bool {
    head.iter()
        .enumerate()
        .any(|(i, &b)| b == b'\n' && (i == 0 || head[i - 1] != b'\r'))
}

/// A CONNECT carries no body: the bytes after its head belong to the tunnel. So on a CONNECT
/// any `Transfer-Encoding`, or a `Content-Length` other than a plain 0, is a confused client
/// or a request-smuggling attempt. Other methods are answered 405 whatever their body, but
/// framing hyper would refuse (and answer with its own bare 400) gets our 400: a
/// `Content-Length` that is not a number that fits in 64 bits, two that disagree, one beside a
/// `Transfer-Encoding`, or a `Transfer-Encoding` other than a lone `chunked` on HTTP/1.1.
fn check_framing(request: &httparse::Request<'_, '_>) -> Result<(), ()> {
    let connect = request.method == Some("CONNECT");
    let mut length: Option<u64> = None;
    let mut chunked = false;
    for header in request.headers.iter() {
        if header.name.eq_ignore_ascii_case("transfer-encoding") {
            let lone_chunked = header.value.eq_ignore_ascii_case(b"chunked");
            if connect || chunked || !lone_chunked || request.version != Some(1) {
                return Err(());
            }
            chunked = true;
        }
        if header.name.eq_ignore_ascii_case("content-length") {
            let value = std::str::from_utf8(header.value).map_err(|_| ())?;
            if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
                return Err(());
            }
            let value: u64 = value.parse().map_err(|_| ())?;
            // hyper keeps the top two values as markers (chunked, close-delimited) and refuses
            // them as lengths.
            if value >= u64::MAX - 1 {
                return Err(());
            }
            if length.is_some_and(|earlier| earlier != value) || (connect && value != 0) {
                return Err(());
            }
            length = Some(value);
        }
    }
    if chunked && length.is_some() {
        return Err(());
    }
    Ok(())
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
        let post = b"POST http://a.example.com/ HTTP/1.1\r\nContent-Length: 806\r\n\r\n";
        assert_eq!(
            check_head(post),
            Ok(true),
            "a body on other methods is theirs to send"
        );
        let bad_post = b"POST http://a.example.com/ HTTP/1.1\r\nContent-Length: x\r\n\r\n";
        assert_eq!(check_head(bad_post), Err(()));
        for framing in [
            "Content-Length: abc",
            "Content-Length: 5",
            "Transfer-Encoding: chunked",
            "Content-Length: 0\r\nContent-Length: 7",
        ] {
            let head = format!("CONNECT a.example.com:443 HTTP/1.1\r\n{framing}\r\n\r\n");
            assert_eq!(check_head(head.as_bytes()), Err(()), "{framing}");
        }
        assert_eq!(
            check_head(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"),
            Err(())
        );
    }
}
