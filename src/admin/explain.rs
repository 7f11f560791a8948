//! `GET /explain?host=H&port=P`: the `portcullis explain` verdict as JSON, against the running
//! proxy (its current config and resolver, and the live ip-ranges set), so a support engineer
//! can ask the proxy that refused a user, not a copy of its config on a laptop.
//!
//! The query is `host` and `port` (both required; an IPv6 literal with or without brackets) and
//! `resolve` (optional, `true` by default; `false` sends no DNS query). A missing or unreadable
//! one is a 400 with `{"error": "..."}`; anything else is a 200 carrying the explanation, whose
//! own `status` is the reply a CONNECT would get. One DNS lookup at most, bounded by
//! `connect_timeout` as on the data path.

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Response, StatusCode};

use crate::explain::{self, RangesInUse};
use crate::state::Shared;

/// Answers one `/explain` request.
pub async fn explain(shared: &Shared, query: Option<&str>) -> Response<Full<Bytes>> {
    let asked = match Asked::parse(query.unwrap_or("")) {
        Ok(asked) => asked,
        Err(error) => {
            let body = serde_json::json!({ "error": error });
            return json(StatusCode::BAD_REQUEST, &body);
        }
    };
    let runtime = shared.runtime();
    let ranges = RangesInUse::live(shared);
    let explanation = explain::explain(&runtime, &ranges, &asked.authority(), asked.resolve).await;
    json(StatusCode::OK, &explanation)
}

/// The query, read.
#[derive(Debug, PartialEq, Eq)]
struct Asked {
    host: String,
    port: u16,
    resolve: bool,
}

impl Asked {
    fn parse(query: &str) -> Result<Asked, String> {
        let mut host = None;
        let mut port = None;
        let mut resolve = true;
        for (key, value) in form_urlencoded::parse(query.as_bytes()) {
            match &*key {
                "host" => host = Some(value.into_owned()),
                "port" => {
                    port =
                        Some(value.parse::<u16>().map_err(|_| {
                            format!("port {value:?} is not a number from 0 to 65535")
                        })?);
                }
                "resolve" => {
                    resolve = match &*value {
                        "true" | "1" | "yes" => true,
                        "false" | "0" | "no" => false,
                        _ => return Err(format!("resolve {value:?} is not true or false")),
                    };
                }
                _ => {}
            }
        }
        let host = host
            .filter(|h| !h.is_empty())
            .ok_or("the query needs host, e.g. /explain?host=gw.amazonappstream.com&port=443")?;
        let port =
            port.ok_or("the query needs port, e.g. /explain?host=gw.amazonappstream.com&port=443")?;
        Ok(Asked {
            host,
            port,
            resolve,
        })
    }

    /// The CONNECT target the query stands for; an IPv6 literal gets its brackets.
    fn authority(&self) -> String {
        if self.host.contains(':') && !self.host.starts_with('[') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

fn json(status: StatusCode, body: &impl serde::Serialize) -> Response<Full<Bytes>> {
    let text = serde_json::to_string_pretty(body).expect("explanations serialize");
    super::reply(status, "application/json", text + "\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries() {
        let asked = Asked::parse("host=GW.amazonappstream.com&port=443").unwrap();
        assert_eq!(asked.authority(), "GW.amazonappstream.com:443");
        assert!(asked.resolve);
        let asked = Asked::parse("port=443&host=%3A%3A1&resolve=false").unwrap();
        assert_eq!(asked.authority(), "[::1]:443");
        assert!(!asked.resolve);
        assert_eq!(
            Asked::parse("host=%5B%3A%3A1%5D&port=1")
                .unwrap()
                .authority(),
            "[::1]:1"
        );
        for bad in [
            "",
            "host=a.example.com",
            "port=443",
            "host=&port=443",
            "host=a.example.com&port=https",
            "host=a.example.com&port=70000",
            "host=a.example.com&port=443&resolve=maybe",
        ] {
            assert!(Asked::parse(bad).is_err(), "{bad:?}");
        }
    }
}
