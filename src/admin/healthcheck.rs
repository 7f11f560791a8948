//! `portcullis healthcheck`: the probe a container runtime runs (the image's `HEALTHCHECK`), so
//! the image needs no curl and no shell.
//!
//! One HTTP/1.1 `GET` of `/healthz` (or `/readyz`) on the admin listener over plain TCP: a
//! request of a few lines and the reply's status line are all it needs, so it is written by hand
//! rather than through hyper's client. One timeout bounds the whole probe (name lookup, connect,
//! request, status line), so a proxy that accepts and never answers fails it as surely as one that
//! is gone. Healthy is a 200; anything else is not. Kubernetes needs none of this: kubelet probes
//! the same paths with `httpGet`.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use hyper::Uri;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The longest status line read; a real one is about 20 bytes.
const MAX_STATUS_LINE: usize = 1024;

/// Which admin path to ask.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    /// `/healthz`: 200 while the process serves, through a drain too.
    Live,
    /// `/readyz`: 503 once a drain has begun.
    Ready,
}

impl Check {
    fn path(self) -> &'static str {
        match self {
            Check::Live => "/healthz",
            Check::Ready => "/readyz",
        }
    }
}

/// One probe: where to connect, what to ask, how long to wait for the answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    /// `host:port`, connected to and sent as `Host`.
    authority: String,
    path: String,
    timeout: Duration,
}

/// What the probe found: `healthy` only for a 200; `message` says what was seen, in one line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub healthy: bool,
    pub message: String,
}

impl Probe {
    /// The admin listener at `listen` as the config writes it. A wildcard address (`0.0.0.0`,
    /// `[::]`, what a container's config listens on) is probed on loopback, which it includes.
    pub fn admin(listen: SocketAddr, check: Check, timeout: Duration) -> Probe {
        let ip = match listen.ip() {
            IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
            ip => ip,
        };
        Probe::address(
            &SocketAddr::new(ip, listen.port()).to_string(),
            check,
            timeout,
        )
    }

    /// `--admin HOST:PORT`.
    pub fn address(authority: &str, check: Check, timeout: Duration) -> Probe {
        Probe {
            authority: authority.to_string(),
            path: check.path().to_string(),
            timeout,
        }
    }

    /// `--url http://HOST:PORT/PATH`, asked as given (`/` without a path).
    pub fn url(url: &str, timeout: Duration) -> Result<Probe, String> {
        let uri: Uri = url
            .parse()
            .map_err(|e| format!("--url {url:?} is not a URL: {e}"))?;
        if uri.scheme_str() != Some("http") {
            return Err(format!(
                "--url {url:?}: only http:// (the admin listener has no TLS)"
            ));
        }
        let host = uri
            .host()
            .ok_or_else(|| format!("--url {url:?} has no host"))?;
        Ok(Probe {
            authority: format!("{host}:{}", uri.port_u16().unwrap_or(80)),
            path: uri
                .path_and_query()
                .map_or("/".to_string(), |p| p.as_str().to_string()),
            timeout,
        })
    }

    /// Asks, waiting at most the timeout for everything together.
    pub async fn run(&self) -> Outcome {
        match tokio::time::timeout(self.timeout, self.exchange()).await {
            Ok(Ok(status)) => Outcome {
                healthy: status.starts_with("200 "),
                message: format!("{self}: {status}"),
            },
            Ok(Err(why)) => Outcome {
                healthy: false,
                message: format!("{self}: {why}"),
            },
            Err(_) => Outcome {
                healthy: false,
                message: format!("{self}: no answer within {:?}", self.timeout),
            },
        }
    }

    /// The reply's status code and reason phrase, e.g. `503 Service Unavailable`.
    async fn exchange(&self) -> Result<String, String> {
        let mut stream = TcpStream::connect(&self.authority)
            .await
            .map_err(|e| format!("cannot connect: {e}"))?;
        let request = format!(
            "GET {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: portcullis-healthcheck\r\n\
             Connection: close\r\n\r\n",
            self.path, self.authority
        );
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(|e| format!("cannot send the request: {e}"))?;
        let mut head = Vec::with_capacity(128);
        let mut buf = [0u8; 256];
        let line = loop {
            if let Some(end) = head.windows(2).position(|w| w == b"\r\n") {
                break &head[..end];
            }
            if head.len() > MAX_STATUS_LINE {
                return Err("not an HTTP reply (no status line)".to_string());
            }
            let n = stream
                .read(&mut buf)
                .await
                .map_err(|e| format!("reading the reply: {e}"))?;
            if n == 0 {
                return Err("closed without a reply".to_string());
            }
            head.extend_from_slice(&buf[..n]);
        };
        status(line).ok_or_else(|| {
            let shown: String = String::from_utf8_lossy(line).chars().take(80).collect();
            format!("not an HTTP reply: {shown:?}")
        })
    }
}

impl fmt::Display for Probe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "GET http://{}{}", self.authority, self.path)
    }
}

/// `HTTP/1.1 200 OK` into `200 OK`; `None` for anything that is not a status line.
fn status(line: &[u8]) -> Option<String> {
    let line = std::str::from_utf8(line).ok()?;
    let (version, rest) = line.split_once(' ')?;
    let code = rest.get(..3)?;
    let valid = version.starts_with("HTTP/1.")
        && code.bytes().all(|b| b.is_ascii_digit())
        && (rest.len() == 3 || rest.as_bytes()[3] == b' ');
    valid.then(|| rest.trim_end().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    const TIMEOUT: Duration = Duration::from_secs(2);

    #[test]
    fn status_lines() {
        assert_eq!(status(b"HTTP/1.1 200 OK").as_deref(), Some("200 OK"));
        assert_eq!(
            status(b"HTTP/1.0 503 Service Unavailable").as_deref(),
            Some("503 Service Unavailable")
        );
        assert_eq!(status(b"HTTP/1.1 204").as_deref(), Some("204"));
        for bad in [
            &b"SSH-2.0-OpenSSH"[..],
            b"HTTP/1.1 20",
            b"HTTP/1.1 2000 OK",
            b"",
        ] {
            assert_eq!(status(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn wildcard_listen_addresses_are_probed_on_loopback() {
        let probe =
            |listen: &str| Probe::admin(listen.parse().unwrap(), Check::Live, TIMEOUT).to_string();
        assert_eq!(probe("0.0.0.0:9090"), "GET http://127.0.0.1:9090/healthz");
        assert_eq!(probe("[::]:9090"), "GET http://[::1]:9090/healthz");
        assert_eq!(probe("10.1.2.3:9090"), "GET http://10.1.2.3:9090/healthz");
        let ready = Probe::admin("0.0.0.0:9090".parse().unwrap(), Check::Ready, TIMEOUT);
        assert_eq!(ready.to_string(), "GET http://127.0.0.1:9090/readyz");
    }

    #[test]
    fn urls() {
        let probe = Probe::url("http://[::1]:9090/readyz?x=1", TIMEOUT).unwrap();
        assert_eq!(probe.authority, "[::1]:9090");
        assert_eq!(probe.path, "/readyz?x=1");
        let probe = Probe::url("http://localhost", TIMEOUT).unwrap();
        assert_eq!(probe.to_string(), "GET http://localhost:80/");
        assert!(Probe::url("https://127.0.0.1:9090/healthz", TIMEOUT).is_err());
        assert!(Probe::url("/healthz", TIMEOUT).is_err());
    }
}
