//! One HTTPS GET of `ip-ranges.json`, under the proxy's own destination policy.
//!
//! Fetching the file is egress like any tunnel, so it obeys the same rules: the host is resolved
//! with the proxy's resolver, and only addresses `[destinations]` lets a tunnel reach are
//! connected to. A URL (or a DNS answer) pointing at the metadata service or the LAN is a
//! failed refresh, never a request. The exchange is hyper's own HTTP/1.1 client over
//! tokio-rustls, bounded on every side: one overall timeout, a body cap, 200 or 304 only.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, LengthLimitError, Limited};
use hyper::body::Body;
use hyper::header::{
    CONNECTION, ETAG, HOST, HeaderValue, IF_MODIFIED_SINCE, IF_NONE_MATCH, LAST_MODIFIED,
    USER_AGENT,
};
use hyper::{Request, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::dns::{CachePath, DnsFailure};
use crate::rules::{self, Host};
use crate::state::Runtime;
use crate::telemetry::metrics::Metrics;

/// The whole exchange, DNS to last body byte. The real file is about 2 MB; a minute is ample
/// on a slow link and still frees the refresher from a server that trickles.
pub const TIMEOUT: Duration = Duration::from_secs(60);

/// The real file is about 2 MB and grows slowly; a body past this is not `ip-ranges.json`.
pub const MAX_BODY: usize = 32 << 20;

/// An `https` URL the refresher may fetch, checked when the config is built.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Url {
    pub uri: Uri,
    host: Host,
    port: u16,
}

impl Url {
    /// `https://host[:port]/path`, with a DNS name or an IP literal as host and no user info.
    pub fn parse(s: &str) -> Result<Url, String> {
        let uri: Uri = s
            .parse()
            .map_err(|e| format!("url {s:?} is not a URL: {e}"))?;
        if uri.scheme_str() != Some("https") {
            return Err(format!("url {s:?} must start with https://"));
        }
        let authority = uri
            .authority()
            .ok_or_else(|| format!("url {s:?} has no host"))?;
        if authority.as_str().contains('@') {
            return Err(format!("url {s:?} must not carry user info"));
        }
        let raw = authority.host();
        let host = match raw.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
            Some(v6) => v6
                .parse()
                .map(Host::Ip)
                .map_err(|_| format!("url {s:?}: {raw:?} is not an IPv6 address"))?,
            None => rules::parse_host(raw)
                .map_err(|_| format!("url {s:?}: {raw:?} is not a host name or address"))?,
        };
        let port = authority.port_u16().unwrap_or(443);
        Ok(Url { uri, host, port })
    }
}

/// The `ETag` and `Last-Modified` of the copy in force, sent back so an unchanged file costs a
/// 304 rather than 2 MB.
#[derive(Debug, Clone, Default)]
pub struct Validators {
    etag: Option<HeaderValue>,
    last_modified: Option<HeaderValue>,
}

/// What a successful exchange brought.
#[derive(Debug)]
pub enum Fetched {
    /// 304: the copy in force is current.
    NotModified,
    /// 200, with the whole body.
    Body { body: Bytes, validators: Validators },
}

/// Why a fetch brought nothing usable.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("cannot resolve {host}: {failure}")]
    Dns { host: String, failure: DnsFailure },
    #[error(
        "destination refused: {host} resolved only to {addrs}, which [destinations] does not allow"
    )]
    Refused { host: String, addrs: String },
    #[error("cannot connect to {addr}: {error}")]
    Connect {
        addr: SocketAddr,
        error: std::io::Error,
    },
    #[error("TLS with {host}: {error}")]
    Tls { host: String, error: std::io::Error },
    #[error("HTTP: {0}")]
    Http(#[source] hyper::Error),
    #[error("HTTP status {0}; only 200 and 304 are accepted")]
    Status(StatusCode),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("body larger than {MAX_BODY} bytes")]
    TooLarge,
    #[error("body cut short: {0}")]
    Truncated(String),
}

impl FetchError {
    /// The server answered, but with something that cannot be the file (counted as `invalid`
    /// rather than `error`).
    pub fn is_invalid(&self) -> bool {
        matches!(self, FetchError::TooLarge | FetchError::Truncated(_))
    }
}

/// The roots the fetch trusts: the PEM bundle `ca_file`, else the system's.
pub fn client_config(ca_file: Option<&Path>) -> Result<Arc<ClientConfig>, String> {
    let mut roots = RootCertStore::empty();
    match ca_file {
        Some(path) => {
            let what = |e: &dyn std::fmt::Display| format!("ca_file {}: {e}", path.display());
            for der in CertificateDer::pem_file_iter(path).map_err(|e| what(&e))? {
                roots
                    .add(der.map_err(|e| what(&e))?)
                    .map_err(|e| what(&e))?;
            }
            if roots.is_empty() {
                return Err(what(&"no certificate in the file"));
            }
        }
        None => {
            let native = rustls_native_certs::load_native_certs();
            let (added, _) = roots.add_parsable_certificates(native.certs);
            if added == 0 {
                return Err(format!(
                    "no system CA certificates found ({}); set [aws_ip_ranges] ca_file",
                    native
                        .errors
                        .first()
                        .map_or_else(|| "none installed".to_string(), |e| e.to_string())
                ));
            }
        }
    }
    let mut config =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// GETs `url`, conditional on `validators`, within [`TIMEOUT`].
pub async fn get(
    runtime: &Runtime,
    metrics: &Metrics,
    url: &Url,
    tls: Arc<ClientConfig>,
    validators: Option<&Validators>,
) -> Result<Fetched, FetchError> {
    tokio::time::timeout(TIMEOUT, exchange(runtime, metrics, url, tls, validators))
        .await
        .map_err(|_| FetchError::Timeout(TIMEOUT))?
}

async fn exchange(
    runtime: &Runtime,
    metrics: &Metrics,
    url: &Url,
    tls: Arc<ClientConfig>,
    validators: Option<&Validators>,
) -> Result<Fetched, FetchError> {
    let stream = dial(runtime, metrics, url).await?;
    let server_name = match &url.host {
        Host::Name(name) => ServerName::try_from(name.clone()).map_err(|e| FetchError::Tls {
            host: name.clone(),
            error: std::io::Error::other(e),
        })?,
        Host::Ip(ip) => ServerName::IpAddress((*ip).into()),
    };
    let stream = TlsConnector::from(tls)
        .connect(server_name, stream)
        .await
        .map_err(|error| FetchError::Tls {
            host: host_text(&url.host),
            error,
        })?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(FetchError::Http)?;
    let request = request(url, validators);
    let response = async move {
        let response = sender
            .send_request(request)
            .await
            .map_err(FetchError::Http)?;
        match response.status() {
            StatusCode::NOT_MODIFIED => return Ok(Fetched::NotModified),
            StatusCode::OK => {}
            status => return Err(FetchError::Status(status)),
        }
        let header = |name| response.headers().get(name).cloned();
        let validators = Validators {
            etag: header(ETAG),
            last_modified: header(LAST_MODIFIED),
        };
        if response.body().size_hint().lower() > MAX_BODY as u64 {
            return Err(FetchError::TooLarge);
        }
        let body = Limited::new(response.into_body(), MAX_BODY)
            .collect()
            .await
            .map_err(body_error)?
            .to_bytes();
        Ok(Fetched::Body { body, validators })
    };
    // The connection is driven here rather than on a task of its own, so the timeout around
    // this function ends it too. Should it finish first (the server closed after the body),
    // the response still holds everything it delivered.
    tokio::pin!(response);
    tokio::select! {
        result = &mut response => result,
        _ = connection => response.await,
    }
}

/// Resolves with the proxy's resolver and connects to the first address the destination
/// policy permits that answers.
async fn dial(runtime: &Runtime, metrics: &Metrics, url: &Url) -> Result<TcpStream, FetchError> {
    let addrs = match &url.host {
        Host::Ip(ip) => vec![*ip],
        Host::Name(name) => {
            let resolved = runtime.resolver.resolve(name, CachePath::Cached).await;
            let result = match &resolved {
                Ok(_) => "ok",
                Err(DnsFailure::NoSuchName) => "nxdomain",
                Err(DnsFailure::Failed(_)) => "error",
            };
            metrics.dns_lookup(CachePath::Cached.as_str(), result);
            resolved.map_err(|failure| FetchError::Dns {
                host: name.clone(),
                failure,
            })?
        }
    };
    let permitted: Vec<IpAddr> = addrs
        .iter()
        .copied()
        .filter(|&addr| runtime.policy.check(addr, false).is_ok())
        .collect();
    if permitted.is_empty() {
        return Err(FetchError::Refused {
            host: host_text(&url.host),
            addrs: addrs
                .iter()
                .map(IpAddr::to_string)
                .collect::<Vec<_>>()
                .join(", "),
        });
    }
    let mut last = None;
    for ip in permitted {
        let addr = SocketAddr::new(ip, url.port);
        let attempt = tokio::time::timeout(
            runtime.config.proxy.connect_timeout,
            TcpStream::connect(addr),
        )
        .await
        .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()));
        match attempt {
            Ok(stream) => return Ok(stream),
            Err(error) => last = Some(FetchError::Connect { addr, error }),
        }
    }
    Err(last.expect("at least one address was permitted"))
}

fn request(url: &Url, validators: Option<&Validators>) -> Request<Empty<Bytes>> {
    let target = url.uri.path_and_query().map_or("/", |p| p.as_str());
    let authority = url.uri.authority().map_or("", |a| a.as_str());
    let mut request = Request::get(target)
        .header(HOST, authority)
        .header(
            USER_AGENT,
            concat!("portcullis/", env!("CARGO_PKG_VERSION")),
        )
        .header(CONNECTION, "close");
    if let Some(validators) = validators {
        if let Some(etag) = &validators.etag {
            request = request.header(IF_NONE_MATCH, etag);
        }
        if let Some(date) = &validators.last_modified {
            request = request.header(IF_MODIFIED_SINCE, date);
        }
    }
    request
        .body(Empty::new())
        .expect("a GET from a parsed URL is a valid request")
}

fn body_error(error: Box<dyn std::error::Error + Send + Sync>) -> FetchError {
    if error.is::<LengthLimitError>() {
        return FetchError::TooLarge;
    }
    match error.downcast::<hyper::Error>() {
        Ok(error) if error.is_incomplete_message() || ended_early(&error) => {
            FetchError::Truncated(error.to_string())
        }
        Ok(error) => FetchError::Http(*error),
        Err(other) => FetchError::Truncated(other.to_string()),
    }
}

/// The connection closed before the body was whole (fewer bytes than `Content-Length`, or no
/// last chunk): the server sent part of a file, which is a bad file rather than a bad network.
fn ended_early(error: &hyper::Error) -> bool {
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        if cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|e| e.kind() == std::io::ErrorKind::UnexpectedEof)
        {
            return true;
        }
        source = cause.source();
    }
    false
}

fn host_text(host: &Host) -> String {
    match host {
        Host::Name(name) => name.clone(),
        Host::Ip(ip) => ip.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_https_urls_with_a_host() {
        let url = Url::parse("https://ip-ranges.amazonaws.com/ip-ranges.json").unwrap();
        assert_eq!(url.host, Host::Name("ip-ranges.amazonaws.com".into()));
        assert_eq!(url.port, 443);
        let url = Url::parse("https://[::1]:8443/x").unwrap();
        assert_eq!(
            (url.host, url.port),
            (Host::Ip("::1".parse().unwrap()), 8443)
        );
        let url = Url::parse("https://10.0.0.1/x").unwrap();
        assert_eq!(url.host, Host::Ip("10.0.0.1".parse().unwrap()));
        for bad in [
            "http://ip-ranges.amazonaws.com/ip-ranges.json",
            "ftp://ip-ranges.amazonaws.com/",
            "ip-ranges.amazonaws.com/ip-ranges.json",
            "https://user:pw@ip-ranges.amazonaws.com/",
            "https://bad..name/",
            "https:///ip-ranges.json",
            "",
        ] {
            assert!(Url::parse(bad).is_err(), "{bad}");
        }
    }
}
