//! A test web origin: HTTPS with the test CA (see [`super::tls`]), a page, and a WebSocket echo
//! endpoint, the two things an AppStream user's browser needs from a streaming gateway.
//!
//! - `GET /` — `tests/browser/page.html`: its script opens `wss://<host>/ws`, exchanges messages,
//!   shows the result, puts it into `document.title` and reports it with `GET /done?...`.
//! - `GET /hello` — one line of text naming the host and the SNI the origin saw.
//! - `GET /ws` — WebSocket: every text or binary message is echoed back; with `?tick_ms=N` the
//!   origin also sends `tick <i>` every N ms on its own, so data flows both ways independently.
//! - anything else — 404.
//!
//! Every request is recorded with the TLS server name it arrived under, so tests can check
//! what really reached the origin.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{CONNECTION, CONTENT_TYPE, HOST, UPGRADE};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;

use super::tls;

const PAGE: &str = include_str!("../browser/page.html");

/// One request that reached the origin.
#[derive(Debug, Clone)]
pub struct Hit {
    /// The server name of the TLS ClientHello.
    pub sni: Option<String>,
    /// The `Host` header.
    pub host: String,
    /// Path and query.
    pub target: String,
}

#[derive(Default)]
pub struct Seen {
    hits: Mutex<Vec<Hit>>,
    /// WebSocket sessions accepted.
    pub ws_sessions: AtomicUsize,
    /// WebSocket messages received (and echoed).
    pub ws_messages: AtomicUsize,
}

impl Seen {
    pub fn hits(&self) -> Vec<Hit> {
        self.hits.lock().unwrap().clone()
    }
}

pub struct WebOrigin {
    pub addr: SocketAddr,
    pub seen: Arc<Seen>,
    task: JoinHandle<()>,
}

impl Drop for WebOrigin {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl WebOrigin {
    /// Serves HTTPS on `ip:443`. Tests running in parallel each take their own loopback address
    /// (127.0.0.81, .82, ...), so every one of them can use the profile's real port.
    pub async fn start(ip: &str) -> WebOrigin {
        let ip: IpAddr = ip.parse().unwrap();
        let listener = TcpListener::bind((ip, 443))
            .await
            .unwrap_or_else(|e| panic!("bind {ip}:443: {e}"));
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Seen::default());
        let acceptor = TlsAcceptor::from(tls::ca().server_config());
        let task = {
            let seen = seen.clone();
            tokio::spawn(async move {
                while let Ok((stream, _)) = listener.accept().await {
                    let acceptor = acceptor.clone();
                    let seen = seen.clone();
                    tokio::spawn(async move {
                        let Ok(tls) = acceptor.accept(stream).await else {
                            return;
                        };
                        let sni = tls.get_ref().1.server_name().map(str::to_string);
                        let service = hyper::service::service_fn(move |request| {
                            let seen = seen.clone();
                            let sni = sni.clone();
                            async move { Ok::<_, Infallible>(handle(request, sni, seen)) }
                        });
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(tls), service)
                            .with_upgrades()
                            .await;
                    });
                }
            })
        };
        WebOrigin { addr, seen, task }
    }

    /// Waits until a request whose path and query start with `prefix` has arrived.
    pub async fn wait_for(&self, prefix: &str, within: Duration) -> Option<Hit> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let hit = self
                .seen
                .hits()
                .into_iter()
                .find(|h| h.target.starts_with(prefix));
            if hit.is_some() || tokio::time::Instant::now() >= deadline {
                return hit;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn handle(
    request: Request<Incoming>,
    sni: Option<String>,
    seen: Arc<Seen>,
) -> Response<Full<Bytes>> {
    let host = request
        .headers()
        .get(HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("")
        .to_string();
    let target = request
        .uri()
        .path_and_query()
        .map_or("/".to_string(), |p| p.as_str().to_string());
    seen.hits.lock().unwrap().push(Hit {
        sni: sni.clone(),
        host: host.clone(),
        target: target.clone(),
    });
    let sni = sni.unwrap_or_default();
    match request.uri().path() {
        "/" => {
            let page = PAGE.replace("{{HOST}}", &host).replace("{{SNI}}", &sni);
            text(StatusCode::OK, "text/html; charset=utf-8", page)
        }
        "/hello" => text(
            StatusCode::OK,
            "text/plain",
            format!("hello from {host} over TLS, SNI {sni}\n"),
        ),
        "/done" => text(StatusCode::OK, "text/plain", "recorded\n".into()),
        "/ws" => websocket(request, seen),
        _ => text(StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
    }
}

fn text(status: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(CONTENT_TYPE, content_type)
        .header("Cache-Control", "no-store")
        .body(Full::new(Bytes::from(body)))
        .unwrap()
}

/// Accepts the upgrade and echoes messages on the upgraded connection.
fn websocket(mut request: Request<Incoming>, seen: Arc<Seen>) -> Response<Full<Bytes>> {
    let Some(key) = request.headers().get("sec-websocket-key").cloned() else {
        return text(
            StatusCode::BAD_REQUEST,
            "text/plain",
            "WebSocket upgrade expected\n".into(),
        );
    };
    let tick_ms: Option<u64> = request
        .uri()
        .query()
        .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("tick_ms=")))
        .and_then(|v| v.parse().ok());
    let upgrade = hyper::upgrade::on(&mut request);
    tokio::spawn(async move {
        let Ok(upgraded) = upgrade.await else {
            return;
        };
        seen.ws_sessions.fetch_add(1, Ordering::SeqCst);
        let ws = WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
        let (mut tx, mut rx) = ws.split();
        let mut ticks = tick_ms.map(|ms| tokio::time::interval(Duration::from_millis(ms)));
        let mut tick = 0u64;
        loop {
            let next_tick = async {
                match ticks.as_mut() {
                    Some(interval) => interval.tick().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                message = rx.next() => match message {
                    Some(Ok(message @ (Message::Text(_) | Message::Binary(_)))) => {
                        seen.ws_messages.fetch_add(1, Ordering::SeqCst);
                        if tx.send(message).await.is_err() {
                            break;
                        }
                    }
                    Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                    Some(Ok(_)) => {}
                },
                _ = next_tick => {
                    if tx.send(Message::text(format!("tick {tick}"))).await.is_err() {
                        break;
                    }
                    tick += 1;
                }
            }
        }
        let _ = tx.close().await;
    });
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(CONNECTION, "Upgrade")
        .header(UPGRADE, "websocket")
        .header("Sec-WebSocket-Accept", derive_accept_key(key.as_bytes()))
        .body(Full::new(Bytes::new()))
        .unwrap()
}
