//! Why a request was refused or failed, and the one place that turns a reason into a reply.
//!
//! Every refusal the client can see goes through [`Reason`]: its status code, the `Proxy-Status`
//! header (RFC 9209 style), the one-line body, and the `reason`/`outcome` metric labels all come
//! from here, so a reply and its metric can never disagree.

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Response, StatusCode, header};

/// A refusal or failure reason, as named in PRODUCT.md's table of replies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
pub enum Reason {
    #[error("the host matches no rule")]
    DomainNotAllowed,
    #[error("the port is not allowed for this host")]
    PortNotAllowed,
    #[error("IP literals are not allowed; use a host name")]
    IpLiteral,
    #[error("the destination address is not allowed")]
    DestinationNotAllowed,
    #[error("your address may not use this proxy")]
    ClientNotAllowed,
    #[error("malformed request or host")]
    BadRequest,
    #[error("only CONNECT is supported")]
    MethodNotAllowed,
    #[error("no complete request head in time")]
    HeaderTimeout,
    #[error("the name does not exist")]
    DnsNxdomain,
    #[error("name resolution failed")]
    DnsError,
    #[error("the origin refused or could not be reached")]
    UpstreamUnreachable,
    #[error("resolving and connecting took too long")]
    UpstreamTimeout,
    #[error("the proxy is at its connection limit")]
    Overloaded,
    #[error("proxy authentication required")]
    AuthRequired,
    #[error("proxy authentication failed")]
    AuthFailed,
    #[error("too many open tunnels from your address")]
    TooManyTunnels,
    /// Decided inside an open tunnel, so never sent as a reply: the tunnel closes.
    #[error("the TLS server name does not match the CONNECT host")]
    SniMismatch,
    #[error("the tunnel does not start with a TLS ClientHello")]
    NotTls,
}

/// Whether a reason is a policy decision or something that went wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Allowed,
    Denied,
    Error,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Allowed => "allowed",
            Outcome::Denied => "denied",
            Outcome::Error => "error",
        }
    }
}

impl Reason {
    /// The label used in `Proxy-Status`, metrics and the access log.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::DomainNotAllowed => "domain_not_allowed",
            Reason::PortNotAllowed => "port_not_allowed",
            Reason::IpLiteral => "ip_literal",
            Reason::DestinationNotAllowed => "destination_not_allowed",
            Reason::ClientNotAllowed => "client_not_allowed",
            Reason::BadRequest => "bad_request",
            Reason::MethodNotAllowed => "method_not_allowed",
            Reason::HeaderTimeout => "header_timeout",
            Reason::DnsNxdomain => "dns_nxdomain",
            Reason::DnsError => "dns_error",
            Reason::UpstreamUnreachable => "upstream_unreachable",
            Reason::UpstreamTimeout => "upstream_timeout",
            Reason::Overloaded => "overloaded",
            Reason::AuthRequired => "auth_required",
            Reason::AuthFailed => "auth_failed",
            Reason::TooManyTunnels => "too_many_tunnels",
            Reason::SniMismatch => "sni_mismatch",
            Reason::NotTls => "not_tls",
        }
    }

    pub fn status(self) -> StatusCode {
        match self {
            Reason::DomainNotAllowed
            | Reason::PortNotAllowed
            | Reason::IpLiteral
            | Reason::DestinationNotAllowed
            | Reason::ClientNotAllowed
            | Reason::SniMismatch
            | Reason::NotTls => StatusCode::FORBIDDEN,
            Reason::BadRequest => StatusCode::BAD_REQUEST,
            Reason::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Reason::HeaderTimeout => StatusCode::REQUEST_TIMEOUT,
            Reason::DnsNxdomain | Reason::DnsError | Reason::UpstreamUnreachable => {
                StatusCode::BAD_GATEWAY
            }
            Reason::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            Reason::Overloaded => StatusCode::SERVICE_UNAVAILABLE,
            Reason::AuthRequired | Reason::AuthFailed => StatusCode::PROXY_AUTHENTICATION_REQUIRED,
            Reason::TooManyTunnels => StatusCode::TOO_MANY_REQUESTS,
        }
    }

    /// Policy refusals are `denied`; everything that failed on the way is `error`.
    pub fn outcome(self) -> Outcome {
        match self.status() {
            StatusCode::FORBIDDEN
            | StatusCode::METHOD_NOT_ALLOWED
            | StatusCode::BAD_REQUEST
            | StatusCode::PROXY_AUTHENTICATION_REQUIRED
            | StatusCode::TOO_MANY_REQUESTS => Outcome::Denied,
            _ => Outcome::Error,
        }
    }

    /// The `Proxy-Status` header value (RFC 9209).
    pub fn proxy_status(self) -> String {
        format!("portcullis; error={}", self.as_str())
    }

    /// The reply hyper sends for this reason: status, `Proxy-Status`, a one-line body, and a
    /// `Connection: close`, because a refused client gets no second request on this connection.
    pub fn response(self) -> Response<Full<Bytes>> {
        let mut builder = Response::builder()
            .status(self.status())
            .header("proxy-status", self.proxy_status())
            .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
            .header(header::CONNECTION, "close");
        match self {
            Reason::MethodNotAllowed => builder = builder.header(header::ALLOW, "CONNECT"),
            Reason::AuthRequired | Reason::AuthFailed => {
                builder = builder.header(
                    header::PROXY_AUTHENTICATE,
                    format!("Basic realm=\"{}\"", crate::auth::REALM),
                );
            }
            _ => {}
        }
        builder
            .body(Full::new(Bytes::from(self.body_line())))
            .expect("static response parts are valid")
    }

    /// The same reply as raw bytes, for the cases answered before hyper sees the connection
    /// (client not allowed, overloaded, header timeout, a head hyper must never parse).
    pub fn raw_response(self) -> Vec<u8> {
        let body = self.body_line();
        let status = self.status();
        format!(
            "HTTP/1.1 {} {}\r\nproxy-status: {}\r\ncontent-type: text/plain; charset=utf-8\r\n\
             content-length: {}\r\nconnection: close\r\n\r\n{}",
            status.as_str(),
            status.canonical_reason().unwrap_or(""),
            self.proxy_status(),
            body.len(),
            body
        )
        .into_bytes()
    }

    fn body_line(self) -> String {
        format!("{}: {}\n", self.as_str(), self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reason_maps_to_the_contract() {
        assert_eq!(Reason::DomainNotAllowed.status(), 403);
        assert_eq!(Reason::HeaderTimeout.status(), 408);
        assert_eq!(Reason::UpstreamTimeout.status(), 504);
        assert_eq!(Reason::DnsNxdomain.status(), 502);
        assert_eq!(Reason::Overloaded.status(), 503);
        assert_eq!(Reason::MethodNotAllowed.status(), 405);
        assert_eq!(Reason::BadRequest.outcome(), Outcome::Denied);
        assert_eq!(Reason::DnsError.outcome(), Outcome::Error);
        assert_eq!(
            Reason::IpLiteral.proxy_status(),
            "portcullis; error=ip_literal"
        );
    }

    #[test]
    fn raw_response_is_well_formed() {
        let raw = String::from_utf8(Reason::Overloaded.raw_response()).unwrap();
        assert!(raw.starts_with("HTTP/1.1 503 Service Unavailable\r\n"));
        assert!(raw.contains("proxy-status: portcullis; error=overloaded\r\n"));
        let (head, body) = raw.split_once("\r\n\r\n").unwrap();
        assert!(head.contains(&format!("content-length: {}", body.len())));
    }
}
