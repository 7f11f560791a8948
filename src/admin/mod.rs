//! The admin listener: the status page (`/`, `/status.json`), `/explain`, `/metrics`,
//! `/healthz`, `/readyz`, `/proxy.pac` (and `/wpad.dat`).
//!
//! Kept off the proxy port so that scraping and health checks never compete with, or get
//! mistaken for, client traffic, and so the admin port can be bound to an internal address.
//! Each page that is more than a line lives in a file of its own here.

mod explain;
pub mod healthcheck;
mod pac;
mod page;
pub mod status;

pub use pac::pac;

use std::convert::Infallible;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{
    CACHE_CONTROL, CONTENT_SECURITY_POLICY, CONTENT_TYPE, HeaderValue, REFERRER_POLICY,
    X_CONTENT_TYPE_OPTIONS,
};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::state::Shared;

/// Serves admin requests until `stop` fires.
pub async fn serve(listener: TcpListener, shared: Arc<Shared>, stop: CancellationToken) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = stop.cancelled() => return,
        };
        let Ok((stream, peer)) = accepted else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let shared = shared.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let peer = crate::connect::unmapped(peer).ip();
            let service = service_fn(move |request| route(request, peer, shared.clone()));
            let connection = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                _ = connection => {}
                () = stop.cancelled() => {}
            }
        });
    }
}

async fn route(
    request: Request<Incoming>,
    peer: IpAddr,
    shared: Arc<Shared>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    if request.method() != Method::GET && request.method() != Method::HEAD {
        return Ok(reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "GET only\n".into(),
        ));
    }
    let path = request.uri().path();
    let status_page = matches!(path, "/" | "/status.json" | "/explain");
    let allowed = |runtime: &crate::state::Runtime| {
        let nets = &runtime.config.admin.status_allow;
        nets.iter().any(|net| net.contains(&peer))
    };
    if status_page && !allowed(&shared.runtime()) {
        return Ok(reply(
            StatusCode::FORBIDDEN,
            "text/plain",
            "the status pages answer only [admin] status_allow\n".into(),
        ));
    }
    let response = match path {
        "/metrics" => reply(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            shared.metrics.encode(),
        ),
        "/healthz" => reply(StatusCode::OK, "text/plain", "ok\n".into()),
        "/readyz" if shared.is_draining() => reply(
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            "draining\n".into(),
        ),
        "/readyz" => reply(StatusCode::OK, "text/plain", "ready\n".into()),
        "/" => {
            let report = status::report(&shared, &query(&request, "filter"));
            let mut response = reply(
                StatusCode::OK,
                "text/html; charset=utf-8",
                page::render(&report),
            );
            let headers = response.headers_mut();
            headers.insert(
                CONTENT_SECURITY_POLICY,
                HeaderValue::from_str(&page::POLICY).expect("the policy is ASCII"),
            );
            headers.insert(REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
            response
        }
        "/status.json" => {
            let report = status::report(&shared, &query(&request, "filter"));
            let json = serde_json::to_string_pretty(&report).expect("the report serializes");
            reply(StatusCode::OK, "application/json", json + "\n")
        }
        // WPAD (`http://wpad.<domain>/wpad.dat`) is how Windows and managed browsers find
        // the PAC file on their own: the same file under the name they ask for.
        "/proxy.pac" | "/wpad.dat" => {
            let runtime = shared.runtime();
            let pac = pac(
                runtime.config.rules.rules(),
                &runtime.config.admin.advertise,
            );
            reply(StatusCode::OK, "application/x-ns-proxy-autoconfig", pac)
        }
        "/explain" => explain::explain(&shared, request.uri().query()).await,
        _ => reply(StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
    };
    Ok(response)
}

/// One query parameter, decoded; empty when absent.
fn query(request: &Request<Incoming>, name: &str) -> String {
    let query = request.uri().query().unwrap_or("");
    form_urlencoded::parse(query.as_bytes())
        .find(|(key, _)| key == name)
        .map(|(_, value)| value.into_owned())
        .unwrap_or_default()
}

fn reply(status: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(CONTENT_TYPE, content_type)
        // Live state: never cached, never sniffed into another type.
        .header(CACHE_CONTROL, "no-store")
        .header(X_CONTENT_TYPE_OPTIONS, "nosniff")
        .body(Full::new(Bytes::from(body)))
        .expect("static response parts are valid")
}
