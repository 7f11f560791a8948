//! The status page under load: `GET /` and `GET /status.json` on portcullis' admin listener
//! while 0, 1,000, 5,000 ... idle tunnels are open. Only portcullis has such a page.
//!
//! The page must answer quickly and stay bounded however many tunnels are open: building it
//! walks the open tunnels once, and its lists are capped (100 tunnels, 50 domains, 50
//! clients) with "and N more". So at each level the figures are the latency of each form,
//! its body size, the proxy's CPU per request, and its RSS before and after the requests.
//! One fresh process per run; the tunnels are added level by level and held throughout.

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::load::{self, Target};
use crate::procfs;

/// Requests before counting: the first after new tunnels may pay for growing the report's
/// maps, and a figure of the steady state should not carry that.
pub const WARMUP: usize = 5;
/// Sequential requests counted per form and level (so the p99 is the slowest of them).
pub const REQUESTS: usize = 50;
/// Client addresses the tunnels come from, 127.0.1.1 onwards: more than the 50 clients the
/// page lists, so that table is full and its "and N more" in use at every level but 0.
pub const CLIENTS: usize = 200;
/// A status request slower than this is an error, not a figure.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// The two forms of the page: (store key, path).
pub const PAGES: [(&str, &str); 2] = [("html", "/"), ("json", "/status.json")];

/// One form of the page at one level.
#[derive(Debug, Clone, Default)]
pub struct Page {
    pub p50_us: f64,
    pub p99_us: f64,
    /// The largest body seen (it varies by a few bytes: ages and uptime).
    pub bytes: usize,
    /// Proxy CPU per request, µs.
    pub cpu_us: f64,
}

/// The page at one level of open tunnels.
#[derive(Debug, Clone, Default)]
pub struct Level {
    /// The level asked for.
    pub asked: usize,
    /// Tunnels actually held (fewer when an open-file limit came first: `limited_by`).
    pub tunnels: usize,
    pub limited_by: Option<String>,
    /// In `PAGES` order.
    pub pages: Vec<Page>,
    /// What status.json showed: `tunnels.open`, and the lengths of the capped lists.
    pub shown_open: u64,
    pub listed_tunnels: usize,
    pub listed_clients: usize,
    pub rss_before_kib: u64,
    pub rss_after_kib: u64,
}

/// Every level, lowest first, on the proxy `pid` (freshly started) with its admin listener
/// at `admin`; tunnels go through `target`.
pub async fn levels(
    target: &Target,
    admin: SocketAddr,
    pid: u32,
    asked: &[usize],
) -> io::Result<Vec<Level>> {
    let mut asked = asked.to_vec();
    asked.sort_unstable();
    asked.dedup();
    let fds_base = procfs::fd_count(pid);
    let mut held = Vec::new();
    let mut levels = Vec::new();
    for want in asked {
        let limited_by = grow(target, pid, fds_base, &mut held, want).await?;
        // Let the last tunnels' ClientHellos pass the SNI check before the page is read.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let mut level = measure(admin, pid).await?;
        level.asked = want;
        level.tunnels = held.len();
        level.limited_by = limited_by;
        levels.push(level);
    }
    Ok(levels)
}

/// Opens tunnels, from the client addresses in turn, until `want` are held or the open-file
/// limits (as in the idle figure) say stop; returns which limit stopped it, if one did.
async fn grow(
    target: &Target,
    pid: u32,
    fds_base: usize,
    held: &mut Vec<TcpStream>,
    want: usize,
) -> io::Result<Option<String>> {
    if want <= held.len() {
        return Ok(None);
    }
    // A first hundred tells how many descriptors a tunnel takes in the proxy.
    if held.is_empty() {
        let probe = want.min(100);
        held.extend(load::open_each(from_clients(target, 0, probe)).await?);
    }
    let fds_now = procfs::fd_count(pid);
    let fds_each = (fds_now.saturating_sub(fds_base) as f64 / held.len() as f64).max(1.0);
    let (more, limited_by) = load::room(pid, fds_now, fds_each, want - held.len());
    let first = held.len();
    held.extend(load::open_each(from_clients(target, first, more)).await?);
    Ok(limited_by)
}

/// Tunnels number `first` to `first + count`, each from its client address.
fn from_clients(target: &Target, first: usize, count: usize) -> Vec<Target> {
    (first..first + count)
        .map(|i| {
            let host = u8::try_from(i % CLIENTS + 1).expect("CLIENTS fits a byte");
            target.opened_from(IpAddr::V4(Ipv4Addr::new(127, 0, 1, host)))
        })
        .collect()
}

/// Both forms of the page, with RSS read around all their requests.
async fn measure(admin: SocketAddr, pid: u32) -> io::Result<Level> {
    let mut level = Level {
        rss_before_kib: procfs::rss_kib(pid),
        ..Level::default()
    };
    for (_, path) in PAGES {
        let (page, body) = page(admin, pid, path).await?;
        if path == "/status.json" {
            shows(&mut level, &body)?;
        }
        level.pages.push(page);
    }
    level.rss_after_kib = procfs::rss_kib(pid);
    Ok(level)
}

/// `WARMUP` then `REQUESTS` sequential GETs of `path`; the figures and the last body.
async fn page(admin: SocketAddr, pid: u32, path: &str) -> io::Result<(Page, Vec<u8>)> {
    for _ in 0..WARMUP {
        get(admin, path).await?;
    }
    let ran_before = procfs::run_ns(pid);
    let mut latencies = Vec::with_capacity(REQUESTS);
    let mut bytes = 0;
    let mut body = Vec::new();
    for _ in 0..REQUESTS {
        let start = Instant::now();
        body = get(admin, path).await?;
        latencies.push(start.elapsed());
        bytes = bytes.max(body.len());
    }
    let ran = procfs::run_ns(pid).saturating_sub(ran_before);
    latencies.sort_unstable();
    let pct = |p: usize| latencies[(latencies.len() * p / 100).min(latencies.len() - 1)];
    let page = Page {
        p50_us: pct(50).as_secs_f64() * 1e6,
        p99_us: pct(99).as_secs_f64() * 1e6,
        bytes,
        cpu_us: ran as f64 / 1e3 / REQUESTS as f64,
    };
    Ok((page, body))
}

/// What a status.json body shows of the tunnels: it must parse, and its counts are the check
/// that the page saw the load (and that the caps held).
fn shows(level: &mut Level, body: &[u8]) -> io::Result<()> {
    let report: serde_json::Value = serde_json::from_slice(body)
        .map_err(|e| io::Error::other(format!("status.json does not parse: {e}")))?;
    let tunnels = &report["tunnels"];
    let length = |key: &str| tunnels[key].as_array().map_or(0, Vec::len);
    level.shown_open = tunnels["open"].as_u64().unwrap_or(0);
    level.listed_tunnels = length("list");
    level.listed_clients = length("by_client");
    Ok(())
}

/// One plain HTTP/1.0 GET on a fresh connection, timed by the caller from connect to the end
/// of the body; the body of a 200, an error for anything else.
async fn get(admin: SocketAddr, path: &str) -> io::Result<Vec<u8>> {
    let exchange = async {
        let mut stream = TcpStream::connect(admin).await?;
        stream.set_nodelay(true)?;
        let request = format!("GET {path} HTTP/1.0\r\nHost: bench\r\n\r\n");
        stream.write_all(request.as_bytes()).await?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await?;
        Ok::<_, io::Error>(response)
    };
    let response = tokio::time::timeout(REQUEST_TIMEOUT, exchange)
        .await
        .map_err(|_| io::Error::other(format!("GET {path} timed out")))??;
    let end = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| io::Error::other(format!("GET {path}: no full response head")))?;
    let head = String::from_utf8_lossy(&response[..end]);
    let status = head.lines().next().unwrap_or("");
    if status.split(' ').nth(1) != Some("200") {
        // A 403 here means `[admin] status_allow` does not cover the load generator.
        return Err(io::Error::other(format!("GET {path} answered {status:?}")));
    }
    let body = response[end + 4..].to_vec();
    // A body cut short would make a small size look good: hold it to Content-Length.
    let declared = head.lines().find_map(|line| {
        let (name, value) = line.split_once(':')?;
        name.eq_ignore_ascii_case("content-length")
            .then(|| value.trim().parse::<usize>().ok())?
    });
    if declared.is_some_and(|n| n != body.len()) {
        return Err(io::Error::other(format!(
            "GET {path}: {} body bytes, Content-Length {declared:?}",
            body.len()
        )));
    }
    Ok(body)
}
