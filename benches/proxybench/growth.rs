//! How cost grows (issue #16): portcullis' set-up CPU, set-up latency and RSS as the open
//! tunnels go from 1,000 to the most the open-file limits allow, and as the rules go from 10
//! to 10,000. Only portcullis: the question is whether anything in it grows faster than
//! linearly, not how it compares.
//!
//! - Tunnels: one fresh process; idle tunnels (CONNECT, 200, ClientHello echoed, as in the
//!   idle figure) opened level by level and held. At each level, RSS and descriptors, then a
//!   burst of extra set-up cycles at concurrency 1 and at 64 (proxy CPU from schedstat, the
//!   latency of every cycle).
//! - Rules: a fresh process per rule count, on a config of generated rules with the bench's
//!   own rule last. RSS at start, `portcullis --config FILE --check` wall time, SIGHUP reload
//!   time (to the `config reloaded` log line's own timestamp) and its CPU, then the same
//!   bursts.

use std::io::{self, Read, Seek, SeekFrom};
use std::path::Path;
use std::process::{Command, Stdio};
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::load::{self, Target};
use crate::peers::Peer;
use crate::procfs;

/// Concurrency of the set-up bursts: one client (latency alone), and 64 (the report's
/// CPU-per-tunnel target level).
pub const CONCURRENCY: [usize; 2] = [1, 64];
/// Cycles run before each counted burst, at its concurrency, and not counted.
pub const WARMUP_CYCLES: usize = 200;
/// Descriptors kept free in each process when the most tunnels are worked out: the c=64
/// burst's connections in flight (two each in the proxy), plus DNS, admin and log files.
pub const RESERVE_FDS: usize = 512;
/// Times `--check` is run per rule count (the figure is the median).
pub const CHECKS: usize = 5;
/// SIGHUP reloads per rule count (the figure is the median).
pub const RELOADS: usize = 3;
/// A reload whose log line has not appeared by then is an error, not a figure.
const RELOAD_TIMEOUT: Duration = Duration::from_secs(30);

/// A level of the tunnel sweep: a count, or as many as the open-file limits allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Count(usize),
    Max,
}

impl Level {
    /// The report's key for the level (`1000`, `max`).
    pub fn key(self) -> String {
        match self {
            Level::Count(n) => n.to_string(),
            Level::Max => "max".into(),
        }
    }
}

impl FromStr for Level {
    type Err = String;

    fn from_str(s: &str) -> Result<Level, String> {
        if s == "max" {
            return Ok(Level::Max);
        }
        match s.parse::<usize>() {
            Ok(n) if n > 0 => Ok(Level::Count(n)),
            _ => Err(format!("{s:?} is neither a tunnel count nor \"max\"")),
        }
    }
}

/// One burst of set-up cycles.
#[derive(Debug, Clone, Default)]
pub struct Burst {
    pub concurrency: usize,
    pub done: usize,
    pub errors: usize,
    pub first_error: Option<String>,
    pub p50_us: f64,
    pub p99_us: f64,
    /// Proxy CPU (all its threads, schedstat) per completed cycle, µs.
    pub cpu_us: f64,
    /// The kernel's part of it, from `stat`'s user/system split (10 ms ticks, so good to a
    /// few percent over a burst of hundreds of milliseconds of CPU).
    pub system_us: f64,
}

/// `WARMUP_CYCLES` uncounted, then `count` cycles by `concurrency` clients; proxy CPU over
/// the counted ones only.
pub async fn burst(target: &Target, pid: u32, count: usize, concurrency: usize) -> Burst {
    cycles(target, WARMUP_CYCLES, concurrency).await;
    let ticks = procfs::clock_ticks();
    let ran_before = procfs::run_ns(pid);
    let (_, system_before) = procfs::cpu_split(pid, ticks);
    let (mut latencies, errors, first_error) = cycles(target, count, concurrency).await;
    let ran = procfs::run_ns(pid).saturating_sub(ran_before);
    let (_, system_after) = procfs::cpu_split(pid, ticks);
    latencies.sort_unstable();
    let pct = |p: usize| {
        latencies
            .get((latencies.len() * p / 100).min(latencies.len().saturating_sub(1)))
            .map_or(f64::NAN, |d| d.as_secs_f64() * 1e6)
    };
    let done = latencies.len();
    let per_cycle = |total_us: f64| {
        if done == 0 {
            f64::NAN
        } else {
            total_us / done as f64
        }
    };
    Burst {
        concurrency,
        done,
        errors,
        first_error,
        p50_us: pct(50),
        p99_us: pct(99),
        cpu_us: per_cycle(ran as f64 / 1e3),
        system_us: per_cycle((system_after - system_before) * 1e6),
    }
}

/// `count` cycles shared out to `concurrency` client tasks; the latency of each that
/// completed, the failures and the first failure's reason.
async fn cycles(
    target: &Target,
    count: usize,
    concurrency: usize,
) -> (Vec<Duration>, usize, Option<String>) {
    let left = Arc::new(AtomicUsize::new(count));
    let mut tasks = JoinSet::new();
    for _ in 0..concurrency.min(count) {
        let target = target.clone();
        let left = left.clone();
        tasks.spawn(async move {
            let mut latencies = Vec::new();
            let mut errors = 0;
            let mut first_error = None;
            while left
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
                .is_ok()
            {
                let start = Instant::now();
                match tokio::time::timeout(load::CYCLE_TIMEOUT, load::cycle(&target)).await {
                    Ok(Ok(())) => latencies.push(start.elapsed()),
                    failed => {
                        errors += 1;
                        first_error.get_or_insert_with(|| match failed {
                            Ok(Err(e)) => e.to_string(),
                            _ => "cycle timed out".to_string(),
                        });
                    }
                }
            }
            (latencies, errors, first_error)
        });
    }
    let mut all = (Vec::with_capacity(count), 0, None);
    while let Some(joined) = tasks.join_next().await {
        let (latencies, errors, first_error) = joined.expect("a burst task does not panic");
        all.0.extend(latencies);
        all.1 += errors;
        if all.2.is_none() {
            all.2 = first_error;
        }
    }
    all
}

/// The bursts at every concurrency, in order.
async fn bursts(target: &Target, pid: u32, count: usize) -> Vec<Burst> {
    let mut done = Vec::new();
    for c in CONCURRENCY {
        done.push(burst(target, pid, count, c).await);
    }
    done
}

/// The most tunnels the open-file limits allow, and how that was worked out.
#[derive(Debug, Clone, Default)]
pub struct Most {
    pub tunnels: usize,
    /// The binding process's soft `RLIMIT_NOFILE` (the hard one is the ceiling: run.sh
    /// raises the soft limit to it).
    pub limit: u64,
    /// Its descriptors before the first tunnel.
    pub fds_at_start: usize,
    /// Its descriptors per tunnel, measured over the first tunnels.
    pub fds_each: f64,
    /// "the proxy", "the load generator" or "the origin".
    pub bound_by: &'static str,
}

/// The tunnel sweep's findings at one level.
#[derive(Debug, Clone, Default)]
pub struct TunnelLevel {
    pub key: String,
    pub tunnels: usize,
    pub rss_kib: u64,
    /// (RSS now − RSS of the fresh process) / tunnels.
    pub kib_per_tunnel: f64,
    pub fds_per_tunnel: f64,
    /// In `CONCURRENCY` order.
    pub bursts: Vec<Burst>,
    pub rss_after_kib: u64,
}

/// Every level, lowest first, on the freshly started proxy `pid`; `origin` is the origin
/// process (it holds the far end of every tunnel). Levels above the most the limits allow
/// are left out (the caller hears which); `Max` is that most.
pub async fn tunnels(
    target: &Target,
    pid: u32,
    origin: u32,
    asked: &[Level],
    burst_cycles: usize,
) -> io::Result<(Vec<TunnelLevel>, Most, Vec<usize>)> {
    const PROBE: usize = 100;
    // Until the start-up check's tunnel has closed, so it is not counted as the proxy's own.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_start = procfs::rss_kib(pid);
    let fds_start = procfs::fd_count(pid);
    let own_start = own_fds();
    let origin_start = procfs::fd_count(origin);
    let mut held = load::open_each(vec![target.clone(); PROBE]).await?;
    // Until the proxy has dialled the origin for the last of them.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let fds_each =
        ((procfs::fd_count(pid).saturating_sub(fds_start)) as f64 / PROBE as f64).max(1.0);
    // The load generator holds the client end of each tunnel, the origin the server end.
    let candidates = [
        (
            procfs::nofile_limit(&pid.to_string()),
            fds_start,
            fds_each,
            "the proxy",
        ),
        (
            procfs::nofile_limit("self"),
            own_start,
            1.0,
            "the load generator",
        ),
        (
            procfs::nofile_limit(&origin.to_string()),
            origin_start,
            1.0,
            "the origin",
        ),
    ];
    let most = candidates
        .into_iter()
        .filter_map(|(limit, fds_at_start, fds_each, bound_by)| {
            let limit = limit?;
            let room = limit as f64 - fds_at_start as f64 - RESERVE_FDS as f64;
            Some(Most {
                tunnels: (room / fds_each).floor().max(0.0) as usize,
                limit,
                fds_at_start,
                fds_each,
                bound_by,
            })
        })
        .min_by_key(|m| m.tunnels)
        .unwrap_or(Most {
            tunnels: usize::MAX,
            ..Most::default()
        });
    let mut wanted: Vec<(usize, String)> = Vec::new();
    let mut above = Vec::new();
    for &level in asked {
        let want = match level {
            Level::Count(n) => n,
            Level::Max => most.tunnels,
        };
        if want > most.tunnels {
            above.push(want);
        } else {
            wanted.push((want, level.key()));
        }
    }
    wanted.sort_by_key(|(want, _)| *want);
    let mut levels = Vec::new();
    for (want, key) in wanted {
        if want > held.len() {
            let more = want - held.len();
            held.extend(load::open_each(vec![target.clone(); more]).await?);
        }
        // Let the last tunnels' ClientHellos pass the SNI check and the allocator settle.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let tunnels = held.len();
        let rss_kib = procfs::rss_kib(pid);
        let fds = procfs::fd_count(pid);
        let bursts = bursts(target, pid, burst_cycles).await;
        levels.push(TunnelLevel {
            key,
            tunnels,
            rss_kib,
            kib_per_tunnel: (rss_kib as f64 - rss_start as f64) / tunnels.max(1) as f64,
            fds_per_tunnel: (fds as f64 - fds_start as f64) / tunnels.max(1) as f64,
            bursts,
            rss_after_kib: procfs::rss_kib(pid),
        });
    }
    drop(held);
    Ok((levels, most, above))
}

fn own_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count())
}

/// The rule sweep's findings at one rule count.
#[derive(Debug, Clone, Default)]
pub struct RulesLevel {
    pub rules: usize,
    pub rss_kib: u64,
    /// `portcullis --config FILE --check`, median wall time, ms.
    pub check_ms: f64,
    /// The same for a copy in which every rule names port 0, so `--check` reports one problem
    /// per rule: the cost of finding and placing problems, which a bad reload pays too.
    pub invalid_check_ms: f64,
    /// SIGHUP to the `config reloaded` line's timestamp, median, ms.
    pub reload_ms: f64,
    /// Proxy CPU over a reload, median, ms.
    pub reload_cpu_ms: f64,
    /// In `CONCURRENCY` order.
    pub bursts: Vec<Burst>,
}

/// Every rule count, each on a freshly started portcullis with that many rules; leaves the
/// peer running on its usual one-rule config.
pub async fn rules(
    peer: &mut Peer,
    target: &Target,
    portcullis: &Path,
    counts: &[usize],
    burst_cycles: usize,
) -> io::Result<Vec<RulesLevel>> {
    let mut levels = Vec::new();
    for &count in counts {
        peer.use_rules(count)?;
        peer.restart().await?;
        let pid = peer.pid().expect("a started proxy has a pid");
        tokio::time::sleep(Duration::from_millis(500)).await;
        let rss_kib = procfs::rss_kib(pid);
        let config = peer.config_file();
        let invalid = config.with_file_name("portcullis-invalid.toml");
        std::fs::write(
            &invalid,
            std::fs::read_to_string(&config)?.replace(r#"ports = ["443"]"#, r#"ports = ["0"]"#),
        )?;
        let mut checks = Vec::new();
        let mut invalid_checks = Vec::new();
        for _ in 0..CHECKS {
            checks.push(check(portcullis, &config, true)?);
            invalid_checks.push(check(portcullis, &invalid, false)?);
        }
        let log = peer
            .logs
            .first()
            .cloned()
            .expect("portcullis logs to a file");
        let mut reloads = Vec::new();
        let mut reload_cpu = Vec::new();
        for _ in 0..RELOADS {
            let (wall, cpu) = reload(pid, &log).await?;
            reloads.push(wall);
            reload_cpu.push(cpu);
        }
        let bursts = bursts(target, pid, burst_cycles).await;
        levels.push(RulesLevel {
            rules: count,
            rss_kib,
            check_ms: median(checks),
            invalid_check_ms: median(invalid_checks),
            reload_ms: median(reloads),
            reload_cpu_ms: median(reload_cpu),
            bursts,
        });
    }
    peer.use_rules(0)?;
    peer.restart().await?;
    Ok(levels)
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(f64::NAN)
}

/// One `portcullis --config FILE --check`: its wall time in ms; an error unless it finds
/// the file `valid` or not, as expected.
fn check(portcullis: &Path, config: &Path, valid: bool) -> io::Result<f64> {
    let start = std::time::Instant::now();
    let status = Command::new(portcullis)
        .arg("--config")
        .arg(config)
        .arg("--check")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()?;
    let ms = start.elapsed().as_secs_f64() * 1e3;
    if status.success() != valid {
        return Err(io::Error::other(format!(
            "portcullis --config {} --check: {status}",
            config.display()
        )));
    }
    Ok(ms)
}

/// SIGHUP to `pid`, then waits for the `config reloaded` line in `log`: (ms from the signal
/// to that line's own timestamp, proxy CPU ms meanwhile). The line is written by a thread
/// that flushes every 100 ms, so its appearance is late; its timestamp is not.
async fn reload(pid: u32, log: &Path) -> io::Result<(f64, f64)> {
    let mut file = std::fs::File::open(log)?;
    let mut offset = file.seek(SeekFrom::End(0))?;
    let ran_before = procfs::run_ns(pid);
    let sent = SystemTime::now();
    let target = rustix::process::Pid::from_raw(pid as i32)
        .ok_or_else(|| io::Error::other("no such pid"))?;
    rustix::process::kill_process(target, rustix::process::Signal::HUP)?;
    let deadline = Instant::now() + RELOAD_TIMEOUT;
    let mut pending = String::new();
    loop {
        tokio::time::sleep(Duration::from_millis(2)).await;
        file.seek(SeekFrom::Start(offset))?;
        offset += file.read_to_string(&mut pending)? as u64;
        for line in pending.lines() {
            if line.contains("config reload failed") {
                return Err(io::Error::other(format!("reload failed: {line}")));
            }
            if line.contains("config reloaded") {
                let ran = procfs::run_ns(pid).saturating_sub(ran_before);
                let at = line_time(line)
                    .ok_or_else(|| io::Error::other(format!("no timestamp in {line:?}")))?;
                let wall = at.duration_since(sent).unwrap_or_default();
                return Ok((wall.as_secs_f64() * 1e3, ran as f64 / 1e6));
            }
        }
        // Keep a partly written last line for the next read.
        let keep = pending.rfind('\n').map_or(0, |i| i + 1);
        pending.drain(..keep);
        if Instant::now() > deadline {
            return Err(io::Error::other(
                "no `config reloaded` log line within 30 s of SIGHUP",
            ));
        }
    }
}

/// The `"timestamp":"2026-12-02T04:33:12.123456Z"` of a JSON log line.
fn line_time(line: &str) -> Option<SystemTime> {
    let rest = &line[line.find("\"timestamp\":\"")? + 13..];
    let stamp = rest.get(..rest.find('Z')?)?;
    let (date, time) = stamp.split_once('T')?;
    let mut ymd = date.split('-').map(|p| p.parse::<i64>().ok());
    let (y, m, d) = (ymd.next()??, ymd.next()??, ymd.next()??);
    let (hms, fraction) = time.split_once('.').unwrap_or((time, "0"));
    let mut hms = hms.split(':').map(|p| p.parse::<u64>().ok());
    let (h, min, s) = (hms.next()??, hms.next()??, hms.next()??);
    let micros: u64 = format!("{fraction:0<6}").get(..6)?.parse().ok()?;
    let days = u64::try_from(days_from_civil(y, m, d)).ok()?;
    let secs = days * 86_400 + h * 3600 + min * 60 + s;
    Some(UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_micros(micros))
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's
/// `days_from_civil`).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// `count` `[[rule]]` tables in all for the rule sweep, with the bench's two own rules
/// (the silent-tunnel rule and the wildcard), which the config puts last: `count - 2`
/// generated rules, one distinct pattern each, a quarter
/// each of exact names elsewhere, `*.suffix` wildcards elsewhere, exact names beside the
/// bench's hosts (`gw-N.bench.amazonappstream.com`) and wildcards under its domain
/// (`*.region-N.amazonappstream.com`). The last two kinds make the matcher look the bench
/// host up at every suffix length it has (and miss) before the bench's rule matches.
pub fn generated_rules(count: usize) -> String {
    let mut toml = String::with_capacity(count * 96);
    for i in 0..count.saturating_sub(2) {
        let pattern = match i % 4 {
            0 => format!("host-{i}.corp-{}.example.net", i % 89),
            1 => format!("*.svc-{i}.tenant-{}.example.com", i % 97),
            2 => format!("gw-{i}.bench.amazonappstream.com"),
            _ => format!("*.region-{i}.amazonappstream.com"),
        };
        toml.push_str(&format!(
            "[[rule]]\nname = \"generated-{i}\"\ndomains = [\"{pattern}\"]\nports = [\"443\"]\n\n"
        ));
    }
    toml
}
