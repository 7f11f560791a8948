//! proxybench: the load generator behind `benches/run.sh`.
//!
//! `benches/run.sh` installs the peers, builds, and runs this inside a private network, mount
//! and PID namespace that has only loopback, with dnsmasq as the only resolver. Run by hand
//! only inside such a namespace; it refuses to run where any other network interface exists.
//!
//! - `proxybench origin`: the echo, sink and source servers (started by `run`).
//! - `proxybench floor`: the floor peer, a bare CONNECT relay (started by `run`).
//! - `proxybench run --work DIR --portcullis BIN --out FILE ...`: starts dnsmasq, the origin,
//!   Squid, tinyproxy, portcullis (twice: logging on and off) and the floor relay, measures
//!   each figure for every peer in turn, repeats, and writes the report with medians; with
//!   `--figures status`, also portcullis' status page under load; with `--figures stream`,
//!   hundreds of long-lived tunnels carrying small frames at a steady rate, for every peer;
//!   with `--figures growth`, how portcullis' costs grow with open tunnels and with rules.

mod floor;
mod growth;
mod load;
mod origin;
mod peers;
mod procfs;
mod report;
mod status;
mod stream;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use load::{Direction, Meter};
use peers::{Helper, Kind, Peer};
use report::Store;

#[derive(Parser)]
#[command(about = "portcullis load generator; run it through benches/run.sh")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// The origin servers (echo, sink, source on port 443 of 127.0.0.1-3).
    Origin,
    /// The floor peer: a bare CONNECT relay (see `floor.rs`).
    Floor,
    /// The whole benchmark.
    Run(Box<RunArgs>),
}

#[derive(clap::Args)]
pub struct RunArgs {
    /// Scratch directory for configs and logs.
    #[arg(long)]
    work: PathBuf,
    /// The portcullis binary (release build).
    #[arg(long)]
    portcullis: PathBuf,
    /// Where the report goes.
    #[arg(long)]
    out: PathBuf,
    /// Repetitions; every figure is the median over them.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Seconds each measurement counts for.
    #[arg(long, default_value_t = 3.0)]
    duration: f64,
    /// Seconds of load before counting starts.
    #[arg(long, default_value_t = 0.5)]
    warmup: f64,
    /// Concurrency levels of the set-up figures.
    #[arg(long, value_delimiter = ',', default_value = "1,16,64,256")]
    concurrency: Vec<usize>,
    /// Idle tunnels for the RSS figure.
    #[arg(long, default_value_t = 10_000)]
    idle: usize,
    /// Criterion's output directory, to quote the micro-benchmarks.
    #[arg(long)]
    criterion: Option<PathBuf>,
    /// Only criterion results written after this Unix time are quoted.
    #[arg(long, default_value_t = 0)]
    criterion_since: u64,
    /// Which figure groups to measure (for debugging the harness; a report wants all five
    /// defaults; `status` is portcullis' status page under load, which only portcullis has;
    /// `stream` is small frames at a steady rate through long-lived tunnels; `growth`, not a
    /// default, is how portcullis' costs grow with open tunnels and with rules).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "setup,bulk,idle,status,stream",
        value_parser = ["setup", "bulk", "idle", "status", "stream", "growth"]
    )]
    figures: Vec<String>,
    /// Open tunnels at which the growth figure measures set-up cost and RSS; `max` is as many
    /// as the open-file limits allow (the first level is the ratios' baseline).
    #[arg(long, value_delimiter = ',', default_value = "1000,2000,4000,8000,max")]
    growth_tunnels: Vec<growth::Level>,
    /// Rule counts of the growth figure, the bench's own rule last in each (the first count
    /// is the ratios' baseline).
    #[arg(long, value_delimiter = ',', default_value = "10,100,1000,10000")]
    growth_rules: Vec<usize>,
    /// Set-up cycles counted per burst of the growth figure, at each level and concurrency.
    #[arg(long, default_value_t = 2000)]
    growth_burst: usize,
    /// Concurrent tunnels of the streaming figure, each carrying frames at 30 per second.
    #[arg(long, default_value_t = 300)]
    stream_tunnels: usize,
    /// Seconds the streaming figure counts for (longer than `--duration`: its p99.9 needs
    /// the frames).
    #[arg(long, default_value_t = 10.0)]
    stream_duration: f64,
    /// Seconds of frames before the streaming figure counts.
    #[arg(long, default_value_t = 1.0)]
    stream_warmup: f64,
    /// KiB each streaming tunnel carries each way before its frames, so it is in the state of
    /// a stream that has run for a while (portcullis splices a direction after 256 KiB); 0
    /// measures young tunnels.
    #[arg(long, default_value_t = 320)]
    stream_prime_kib: usize,
    /// Open idle tunnels at which the status page is measured (the first is the baseline).
    #[arg(long, value_delimiter = ',', default_value = "0,1000,5000")]
    status_tunnels: Vec<usize>,
    /// Which peers to run (for investigating one proxy; a report wants all six).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "direct,squid,tinyproxy,portcullis,portcullis-nolog,floor"
    )]
    peers: Vec<String>,
    /// Marks the report as a smoke test.
    #[arg(long)]
    quick: bool,
    /// portcullis' version for the report (e.g. `git describe --always --dirty`).
    #[arg(long, default_value = "")]
    portcullis_version: String,
    /// The command that ran the benchmark, for the report.
    #[arg(long, default_value = "benches/run.sh")]
    command: String,
}

fn main() -> ExitCode {
    // `cargo bench` passes `--bench`; plain `cargo bench` passes nothing else.
    let args: Vec<String> = std::env::args().filter(|a| a != "--bench").collect();
    if args.len() <= 1 {
        eprintln!(
            "proxybench: the proxy benchmark needs Squid, tinyproxy, dnsmasq and a private \
             network namespace; run it with benches/run.sh"
        );
        return ExitCode::SUCCESS;
    }
    let cli = Cli::parse_from(args);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("the tokio runtime starts");
    let result = match cli.command {
        Cmd::Origin => runtime
            .block_on(origin::serve())
            .map_err(anyhow::Error::from),
        Cmd::Floor => floor::serve().map_err(anyhow::Error::from),
        Cmd::Run(args) => runtime.block_on(run(*args)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("proxybench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Only loopback: nothing this benchmark sends can leave the machine.
fn ensure_loopback_only() -> anyhow::Result<()> {
    // /proc/self/net is this process's network namespace (/sys/class/net may be the host's).
    let others: Vec<String> = std::fs::read_to_string("/proc/self/net/dev")
        .context("listing network interfaces")?
        .lines()
        .skip(2)
        .filter_map(|line| line.split(':').next())
        .map(|name| name.trim().to_string())
        .filter(|name| name != "lo")
        .collect();
    if !others.is_empty() {
        bail!(
            "network interfaces other than lo exist ({}); run through benches/run.sh, which \
             runs this in a private network namespace",
            others.join(", ")
        );
    }
    Ok(())
}

const PEERS: [Kind; 6] = [
    Kind::Direct,
    Kind::Squid,
    Kind::Tinyproxy,
    Kind::Portcullis,
    Kind::PortcullisNoLog,
    Kind::Floor,
];

const BULK: [(Direction, usize); 4] = [
    (Direction::Up, 1),
    (Direction::Down, 1),
    (Direction::Up, 8),
    (Direction::Down, 8),
];

pub fn bulk_key(direction: Direction, tunnels: usize) -> String {
    let dir = match direction {
        Direction::Up => "up",
        Direction::Down => "down",
    };
    format!("{dir}{tunnels}")
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    ensure_loopback_only()?;
    std::fs::create_dir_all(&args.work)?;
    let ticks = procfs::clock_ticks();
    let window = Duration::from_secs_f64(args.duration);
    let warmup = Duration::from_secs_f64(args.warmup);
    let origin_helper = Helper::origin(&args.work)?;
    let ends = [std::process::id(), origin_helper.pid()];
    let dns = Helper::dns(&args.work)?;
    let mut peers = Vec::new();
    for kind in PEERS {
        if !args.peers.iter().any(|p| p == kind.name()) {
            continue;
        }
        let mut peer = Peer::new(kind, &args.work, &args.portcullis)?;
        peer.start().await?;
        peers.push(peer);
    }
    let mut store = Store::default();
    let started = std::time::Instant::now();
    for rep in 0..args.runs {
        // Interleaved: every figure is taken for all peers back to back, in an order that
        // rotates between runs, so drifting background load hits every peer alike.
        let order: Vec<usize> = (0..peers.len()).map(|i| (i + rep) % peers.len()).collect();
        let tag = format!("run {}/{}", rep + 1, args.runs);
        let wants = |group: &str| args.figures.iter().any(|f| f == group);
        let concurrency: &[usize] = if wants("setup") {
            &args.concurrency
        } else {
            &[]
        };
        for &c in concurrency {
            for &i in &order {
                let peer = &peers[i];
                let meter = Meter {
                    proxy: peer.pid(),
                    dns: dns.pid(),
                    ends,
                    ticks,
                };
                let r = load::setup(&peer.target(origin::ECHO), c, warmup, window, meter).await;
                eprintln!(
                    "[{tag}] set-up c={c:<3} {:<16} {:>8.0}/s  p50 {:>7.0} µs  p99 {:>7.0} µs  \
                     cpu {:>6.1} µs/tunnel (sys {:>5.1})  ends sys {:>5.1} µs  dns {:>5.1} µs  \
                     errors {}{}",
                    peer.kind.name(),
                    r.rate,
                    r.p50_us,
                    r.p99_us,
                    r.cpu_us,
                    r.system_us,
                    r.ends_system_us,
                    r.dns_us,
                    r.errors,
                    r.first_error
                        .as_deref()
                        .map(|e| format!(" (first: {e})"))
                        .unwrap_or_default()
                );
                let name = peer.kind.name();
                store.add(&format!("rate/c{c}"), name, r.rate);
                store.add(&format!("p50/c{c}"), name, r.p50_us);
                store.add(&format!("p99/c{c}"), name, r.p99_us);
                store.add(&format!("cpu_tunnel/c{c}"), name, r.cpu_us);
                store.add(&format!("sys_tunnel/c{c}"), name, r.system_us);
                store.add(&format!("ends_sys_tunnel/c{c}"), name, r.ends_system_us);
                store.add(&format!("dns_tunnel/c{c}"), name, r.dns_us);
                store.add(&format!("errors/c{c}"), name, r.errors as f64);
                if let Some(e) = r.first_error {
                    store.note_error(name, format!("set-up c={c}: {e}"));
                }
            }
        }
        let bulk: &[(Direction, usize)] = if wants("bulk") { &BULK } else { &[] };
        for &(direction, tunnels) in bulk {
            for &i in &order {
                let peer = &peers[i];
                if !peer.kind.in_full_suite() {
                    continue;
                }
                let meter = Meter {
                    proxy: peer.pid(),
                    dns: dns.pid(),
                    ends,
                    ticks,
                };
                let host = match direction {
                    Direction::Up => origin::SINK,
                    Direction::Down => origin::SOURCE,
                };
                let key = bulk_key(direction, tunnels);
                let name = peer.kind.name();
                match load::bulk(
                    &peer.target(host),
                    direction,
                    tunnels,
                    warmup,
                    window,
                    meter,
                )
                .await
                {
                    Ok(b) => {
                        eprintln!(
                            "[{tag}] bulk {key:<6} {name:<16} {:>7.2} Gbit/s  cpu {:.3} s/GiB \
                             (sys {:.3})  ends sys {:.3} s/GiB",
                            b.gbit, b.cpu_per_gib, b.system_per_gib, b.ends_system_per_gib
                        );
                        store.add(&format!("tput/{key}"), name, b.gbit);
                        store.add(&format!("cpu_gib/{key}"), name, b.cpu_per_gib);
                        store.add(&format!("sys_gib/{key}"), name, b.system_per_gib);
                        store.add(&format!("ends_sys_gib/{key}"), name, b.ends_system_per_gib);
                        // Direct has no proxy: its sum is the ends alone.
                        let proxy = if b.cpu_per_gib.is_finite() {
                            b.cpu_per_gib
                        } else {
                            0.0
                        };
                        let together = proxy + b.ends_system_per_gib;
                        store.add(&format!("together_gib/{key}"), name, together);
                    }
                    Err(e) => {
                        eprintln!("[{tag}] bulk {key:<6} {name:<16} failed: {e}");
                        store.note_error(name, format!("bulk {key}: {e}"));
                    }
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        if wants("stream") {
            stream_figure(&peers, &order, &args, &origin_helper, rep, &tag, &mut store).await;
        }
        // Before the idle phase restarts the proxies: evidence that logs and metrics were on.
        for peer in &peers {
            if let Some(admin) = peer.admin() {
                store.add_metrics(peer.kind.name(), scrape_requests(admin).await);
            }
            store.count_log_lines(peer.kind.name(), peer.log_lines());
            peer.truncate_logs();
        }
        for &i in &order {
            let peer = &mut peers[i];
            if !wants("idle") || !peer.kind.in_idle_figures() {
                continue;
            }
            for (shape, host, key) in [
                (load::Shape::Echoed, origin::ECHO, "idle"),
                (load::Shape::Silent, origin::SILENT, "idle_silent"),
            ] {
                // A fresh process for each shape: memory freed by the one before would
                // otherwise be reused and flatter the next.
                peer.restart().await?;
                idle_figure(peer, host, shape, key, &args, &tag, &mut store).await;
                // The idle tunnels are closed now; give the proxy a moment before the next.
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
        if wants("status") {
            status_figure(&mut peers, &args.status_tunnels, &tag, &mut store).await?;
        }
        if wants("growth") {
            growth_figure(
                &mut peers,
                &args,
                origin_helper.pid(),
                rep,
                &tag,
                &mut store,
            )
            .await?;
        }
        for peer in &peers {
            peer.truncate_logs();
        }
        eprintln!(
            "[{tag}] done after {:.0} s",
            started.elapsed().as_secs_f64()
        );
    }
    let context = report::Context {
        args: &args,
        machine: procfs::machine(),
        versions: vec![
            ("portcullis", args.portcullis_version.clone()),
            ("Squid", procfs::first_line("squid", &["-v"])),
            ("tinyproxy", procfs::first_line("tinyproxy", &["-v"])),
            (
                "dnsmasq",
                procfs::first_line("dnsmasq", &["-v"])
                    .split("  ")
                    .next()
                    .unwrap_or("")
                    .to_string(),
            ),
        ],
        date: procfs::first_line("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
        elapsed: started.elapsed(),
    };
    let text = report::render(&store, &context, &PEERS);
    std::fs::write(&args.out, text).with_context(|| format!("writing {}", args.out.display()))?;
    eprintln!("wrote {}", args.out.display());
    Ok(())
}

/// Streaming frames through every peer, in this run's order; the RTT each peer adds is taken
/// against this run's direct figures.
async fn stream_figure(
    peers: &[Peer],
    order: &[usize],
    args: &RunArgs,
    origin: &Helper,
    rep: usize,
    tag: &str,
    store: &mut Store,
) {
    let mut measured = Vec::new();
    for &i in order {
        let peer = &peers[i];
        let name = peer.kind.name();
        let meters = stream::Meters {
            proxy: peer.pid(),
            origin: origin.pid(),
            ticks: procfs::clock_ticks(),
        };
        let result = stream::stream(
            &peer.target(origin::ECHO),
            args.stream_tunnels,
            args.stream_prime_kib,
            Duration::from_secs_f64(args.stream_warmup),
            Duration::from_secs_f64(args.stream_duration),
            meters,
            rep as u64,
        )
        .await;
        match result {
            Ok(s) => {
                eprintln!(
                    "[{tag}] stream {name:<16} {} tunnels  {:>6.0}/{:.0} frames/s  RTT p50 {:>6.0} \
                     p99 {:>6.0} p99.9 {:>6.0} max {:>6.0} µs  cpu {:>5.1} µs/frame (sys {:>5.1}, stat {:>5.1}, \
                     {:.2} slices, wait {:.1} µs)  {:.2} cores  client {:.2} cores (wait {:.1} µs/frame)  origin {:.2}  \
                     machine {:.2} (stolen {:.2}, other {:.2})  send late p99 {:.0} µs  lost {} late {} skipped {} broken {}{}",
                    s.tunnels,
                    s.rate,
                    s.offered,
                    s.p50_us,
                    s.p99_us,
                    s.p999_us,
                    s.max_us,
                    s.cpu_us,
                    s.system_us,
                    s.stat_cpu_us,
                    s.slices,
                    s.wait_us,
                    s.cores,
                    s.client_cores,
                    s.client_wait_us,
                    s.origin_cores,
                    s.machine_cores,
                    s.steal_cores,
                    s.other_cores,
                    s.send_lateness_p99_us,
                    s.lost,
                    s.late,
                    s.skipped,
                    s.broken,
                    s.first_error
                        .as_deref()
                        .map(|e| format!(" (first: {e})"))
                        .unwrap_or_default()
                );
                if let Some(e) = &s.first_error {
                    store.note_error(name, format!("stream: {e}"));
                }
                measured.push((peer.kind, s));
            }
            Err(e) => {
                eprintln!("[{tag}] stream {name:<16} failed: {e}");
                store.note_error(name, format!("stream: {e}"));
            }
        }
        // The tunnels are closed now; give the proxy a moment before the next one.
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let direct = measured
        .iter()
        .find(|(kind, _)| *kind == Kind::Direct)
        .map(|(_, s)| s.clone());
    for (kind, s) in &measured {
        store_stream(store, kind.name(), s, direct.as_ref());
    }
}

/// Idle tunnels of one shape on a freshly started peer: RSS and descriptors per tunnel, under
/// keys `<key>/...`.
async fn idle_figure(
    peer: &Peer,
    host: &'static str,
    shape: load::Shape,
    key: &str,
    args: &RunArgs,
    tag: &str,
    store: &mut Store,
) {
    let name = peer.kind.name();
    let pid = peer.pid().expect("a started proxy has a pid");
    match load::idle(&peer.target(host), pid, args.idle, shape).await {
        Ok(idle) => {
            eprintln!(
                "[{tag}] idle {shape:?} {name:<16} {} tunnels  RSS {} → {} KiB  {:.2} KiB/tunnel  \
                 {:.1} fds/tunnel{}",
                idle.tunnels,
                idle.rss_before_kib,
                idle.rss_after_kib,
                idle.kib_per_tunnel,
                idle.fds_per_tunnel,
                idle.limited_by
                    .as_deref()
                    .map(|l| format!(" (limited by {l})"))
                    .unwrap_or_default()
            );
            store.add(&format!("{key}/tunnels"), name, idle.tunnels as f64);
            store.add(&format!("{key}/kib"), name, idle.kib_per_tunnel);
            store.add(&format!("{key}/fds"), name, idle.fds_per_tunnel);
            store.add(
                &format!("{key}/rss_before"),
                name,
                idle.rss_before_kib as f64 / 1024.0,
            );
            store.add(
                &format!("{key}/rss_after"),
                name,
                idle.rss_after_kib as f64 / 1024.0,
            );
            if let Some(l) = idle.limited_by {
                store.note_limit(name, idle.tunnels, l);
            }
        }
        Err(e) => {
            eprintln!("[{tag}] idle {shape:?} {name:<16} failed: {e}");
            store.note_error(name, format!("idle tunnels ({shape:?}): {e}"));
        }
    }
}

/// Keys `stream/<figure>`; the added RTT is over the same run's direct figure.
fn store_stream(
    store: &mut Store,
    name: &'static str,
    s: &stream::Stream,
    direct: Option<&stream::Stream>,
) {
    let mut add = |figure: &str, value: f64| store.add(&format!("stream/{figure}"), name, value);
    add("tunnels", s.tunnels as f64);
    add("offered", s.offered);
    add("sent_rate", s.sent_rate);
    add("rate", s.rate);
    add("p50", s.p50_us);
    add("p99", s.p99_us);
    add("p999", s.p999_us);
    add("max", s.max_us);
    let over = |pick: fn(&stream::Stream) -> f64| direct.map_or(f64::NAN, |d| pick(s) - pick(d));
    add("added_p50", over(|s| s.p50_us));
    add("added_p99", over(|s| s.p99_us));
    add("added_p999", over(|s| s.p999_us));
    add("cpu", s.cpu_us);
    add("sys", s.system_us);
    add("cores", s.cores);
    add("slices", s.slices);
    add("wait", s.wait_us);
    add("client_cores", s.client_cores);
    add("client_us", s.client_us);
    add("client_wait", s.client_wait_us);
    add("origin_cores", s.origin_cores);
    add("ends_sys", s.ends_system_us);
    add("machine_cores", s.machine_cores);
    add("steal_cores", s.steal_cores);
    add("other_cores", s.other_cores);
    add("send_late_p99", s.send_lateness_p99_us);
    add("lost", s.lost as f64);
    add("late", s.late as f64);
    add("skipped", s.skipped as f64);
    add("broken", s.broken as f64);
}

/// The portcullis peer, freshly restarted for a figure of its own; `None` (said on stderr)
/// when `--peers` left it out.
async fn fresh_portcullis<'a>(
    peers: &'a mut [Peer],
    group: &str,
    tag: &str,
) -> anyhow::Result<Option<&'a mut Peer>> {
    let Some(peer) = peers.iter_mut().find(|p| p.kind == Kind::Portcullis) else {
        eprintln!("[{tag}] {group}: skipped, the portcullis peer is not running (--peers)");
        return Ok(None);
    };
    peer.restart().await?;
    Ok(Some(peer))
}

/// The status page under load, on a freshly started portcullis (the only peer with one).
async fn status_figure(
    peers: &mut [Peer],
    levels: &[usize],
    tag: &str,
    store: &mut Store,
) -> anyhow::Result<()> {
    let Some(peer) = fresh_portcullis(peers, "status", tag).await? else {
        return Ok(());
    };
    let name = peer.kind.name();
    let pid = peer.pid().expect("a started proxy has a pid");
    let admin = peer.admin().expect("portcullis has an admin listener");
    match status::levels(&peer.target(origin::ECHO), admin, pid, levels).await {
        Ok(levels) => {
            for level in &levels {
                log_status(tag, level);
                store_status(store, name, level);
            }
        }
        Err(e) => {
            eprintln!("[{tag}] status {name:<16} failed: {e}");
            store.note_error(name, format!("status page: {e}"));
        }
    }
    // The tunnels are closed now; give the proxy a moment before whatever comes next.
    tokio::time::sleep(Duration::from_millis(500)).await;
    Ok(())
}

fn log_status(tag: &str, level: &status::Level) {
    let pages: Vec<String> = status::PAGES
        .iter()
        .zip(&level.pages)
        .map(|((_, path), page)| {
            format!(
                "{path} p50 {:.0} µs p99 {:.0} µs {} B cpu {:.0} µs",
                page.p50_us, page.p99_us, page.bytes, page.cpu_us
            )
        })
        .collect();
    eprintln!(
        "[{tag}] status {} tunnels (page: {} open, {} listed, {} clients)  {}  RSS {} → {} KiB{}",
        level.tunnels,
        level.shown_open,
        level.listed_tunnels,
        level.listed_clients,
        pages.join("  "),
        level.rss_before_kib,
        level.rss_after_kib,
        level
            .limited_by
            .as_deref()
            .map(|l| format!(" (limited by {l})"))
            .unwrap_or_default()
    );
}

/// Keys `status/<tunnels asked>/<figure>`, so the report's columns are the levels asked for.
fn store_status(store: &mut Store, name: &'static str, level: &status::Level) {
    let key = |figure: &str| format!("status/{}/{figure}", level.asked);
    store.add(&key("tunnels"), name, level.tunnels as f64);
    store.add(&key("shown_open"), name, level.shown_open as f64);
    store.add(&key("listed_tunnels"), name, level.listed_tunnels as f64);
    store.add(&key("listed_clients"), name, level.listed_clients as f64);
    for ((form, _), page) in status::PAGES.iter().zip(&level.pages) {
        store.add(&key(&format!("{form}_p50")), name, page.p50_us);
        store.add(&key(&format!("{form}_p99")), name, page.p99_us);
        store.add(
            &key(&format!("{form}_kib")),
            name,
            page.bytes as f64 / 1024.0,
        );
        store.add(&key(&format!("{form}_cpu")), name, page.cpu_us);
    }
    let (before, after) = (level.rss_before_kib as f64, level.rss_after_kib as f64);
    store.add(&key("rss_before"), name, before / 1024.0);
    store.add(&key("rss_after"), name, after / 1024.0);
    store.add(&key("rss_growth"), name, after - before);
    if let Some(why) = &level.limited_by {
        store.note_status_limit(level.asked, level.tunnels, why.clone());
    }
}

/// How portcullis' costs grow with open tunnels, then with rules (the only peer measured).
async fn growth_figure(
    peers: &mut [Peer],
    args: &RunArgs,
    origin: u32,
    rep: usize,
    tag: &str,
    store: &mut Store,
) -> anyhow::Result<()> {
    let Some(peer) = fresh_portcullis(peers, "growth", tag).await? else {
        return Ok(());
    };
    let name = peer.kind.name();
    let target = peer.target(origin::ECHO);
    let pid = peer.pid().expect("a started proxy has a pid");
    let swept = growth::tunnels(
        &target,
        pid,
        origin,
        &args.growth_tunnels,
        args.growth_burst,
    )
    .await;
    match swept {
        Ok((levels, most, above)) => {
            eprintln!(
                "[{tag}] growth: at most {} tunnels, bound by {}'s open-file limit ({} fds, \
                 {} open at start, {:.2} per tunnel, {} kept back){}",
                most.tunnels,
                most.bound_by,
                most.limit,
                most.fds_at_start,
                most.fds_each,
                growth::RESERVE_FDS,
                if above.is_empty() {
                    String::new()
                } else {
                    format!("; levels above it left out: {above:?}")
                }
            );
            store.add("growth/most/tunnels", name, most.tunnels as f64);
            store.add("growth/most/limit", name, most.limit as f64);
            store.add("growth/most/fds_at_start", name, most.fds_at_start as f64);
            store.add("growth/most/fds_each", name, most.fds_each);
            store.note_growth(format!(
                "Bound by {}'s open-file limit: ⌊({} − {} − {}) ÷ {:.2}⌋ = {} tunnels.",
                most.bound_by,
                most.limit,
                most.fds_at_start,
                growth::RESERVE_FDS,
                most.fds_each,
                most.tunnels
            ));
            for level in &levels {
                eprintln!(
                    "[{tag}] growth {:>5} tunnels ({})  RSS {} KiB  {:.2} KiB/tunnel  \
                     {:.2} fds/tunnel  {}  RSS after {} KiB",
                    level.tunnels,
                    level.key,
                    level.rss_kib,
                    level.kib_per_tunnel,
                    level.fds_per_tunnel,
                    log_bursts(&level.bursts),
                    level.rss_after_kib
                );
                let key = |figure: &str| format!("growth/tunnels/{}/{figure}", level.key);
                store.add(&key("tunnels"), name, level.tunnels as f64);
                store.add(&key("rss"), name, level.rss_kib as f64 / 1024.0);
                store.add(&key("kib_per_tunnel"), name, level.kib_per_tunnel);
                store.add(&key("fds_per_tunnel"), name, level.fds_per_tunnel);
                store.add(&key("rss_after"), name, level.rss_after_kib as f64 / 1024.0);
                store_bursts(store, name, &key, &level.bursts);
            }
            if !above.is_empty() {
                store.note_growth(format!(
                    "Tunnel levels above the most were left out: {above:?}."
                ));
            }
        }
        Err(e) => {
            eprintln!("[{tag}] growth tunnels failed: {e}");
            store.note_error(name, format!("growth, tunnels: {e}"));
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    // A fresh process per count, in an order that rotates between runs, so drifting
    // background load does not always fall on the same counts.
    let mut counts = args.growth_rules.clone();
    let turn = rep % counts.len().max(1);
    counts.rotate_left(turn);
    let swept = growth::rules(peer, &target, &args.portcullis, &counts, args.growth_burst).await;
    match swept {
        Ok(levels) => {
            let base = levels.iter().min_by_key(|l| l.rules).cloned();
            for level in &levels {
                eprintln!(
                    "[{tag}] growth {:>5} rules  RSS {} KiB  --check {:.1} ms (invalid {:.1} ms)  \
                     reload {:.1} ms (cpu {:.1} ms)  {}",
                    level.rules,
                    level.rss_kib,
                    level.check_ms,
                    level.invalid_check_ms,
                    level.reload_ms,
                    level.reload_cpu_ms,
                    log_bursts(&level.bursts)
                );
                let key = |figure: &str| format!("growth/rules/{}/{figure}", level.rules);
                store.add(&key("rules"), name, level.rules as f64);
                let rss = level.rss_kib as f64;
                store.add(&key("rss"), name, rss / 1024.0);
                store.add(&key("check"), name, level.check_ms);
                store.add(&key("check_invalid"), name, level.invalid_check_ms);
                store.add(&key("reload"), name, level.reload_ms);
                store.add(&key("reload_cpu"), name, level.reload_cpu_ms);
                // What each rule past the first level adds: flat when the growth is linear.
                if let Some(base) = base.as_ref().filter(|b| b.rules < level.rules) {
                    let more = (level.rules - base.rules) as f64;
                    let per_rule = |now: f64, then: f64| (now - then) / more;
                    store.add(
                        &key("rss_per_rule"),
                        name,
                        per_rule(rss, base.rss_kib as f64),
                    );
                    store.add(
                        &key("check_per_rule"),
                        name,
                        per_rule(level.check_ms, base.check_ms) * 1e3,
                    );
                    store.add(
                        &key("check_invalid_per_rule"),
                        name,
                        per_rule(level.invalid_check_ms, base.invalid_check_ms) * 1e3,
                    );
                    store.add(
                        &key("reload_per_rule"),
                        name,
                        per_rule(level.reload_cpu_ms, base.reload_cpu_ms) * 1e3,
                    );
                }
                store_bursts(store, name, &key, &level.bursts);
            }
        }
        Err(e) => {
            eprintln!("[{tag}] growth rules failed: {e}");
            store.note_error(name, format!("growth, rules: {e}"));
            // Back to the usual config for whatever comes next.
            peer.use_rules(0)?;
            peer.restart().await?;
        }
    }
    Ok(())
}

fn log_bursts(bursts: &[growth::Burst]) -> String {
    let each: Vec<String> = bursts
        .iter()
        .map(|b| {
            format!(
                "c={} {} done, cpu {:.1} µs/set-up (sys {:.1}) p50 {:.0} p99 {:.0} µs errors {}{}",
                b.concurrency,
                b.done,
                b.cpu_us,
                b.system_us,
                b.p50_us,
                b.p99_us,
                b.errors,
                b.first_error
                    .as_deref()
                    .map(|e| format!(" (first: {e})"))
                    .unwrap_or_default()
            )
        })
        .collect();
    each.join("  ")
}

/// Keys `<level>/{cpu,p50,p99,errors}_c<concurrency>` through `key`.
fn store_bursts(
    store: &mut Store,
    name: &'static str,
    key: &dyn Fn(&str) -> String,
    bursts: &[growth::Burst],
) {
    for b in bursts {
        let c = b.concurrency;
        store.add(&key(&format!("cpu_c{c}")), name, b.cpu_us);
        store.add(&key(&format!("sys_c{c}")), name, b.system_us);
        store.add(&key(&format!("p50_c{c}")), name, b.p50_us);
        store.add(&key(&format!("p99_c{c}")), name, b.p99_us);
        store.add(&key(&format!("errors_c{c}")), name, b.errors as f64);
        if let Some(e) = &b.first_error {
            store.note_error(name, format!("growth set-up c={c}: {e}"));
        }
    }
}

/// The sum of `portcullis_requests_total{outcome="allowed"}`: metrics were on and counting.
async fn scrape_requests(admin: SocketAddr) -> Option<f64> {
    let mut stream = tokio::net::TcpStream::connect(admin).await.ok()?;
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: bench\r\n\r\n")
        .await
        .ok()?;
    let mut body = String::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_string(&mut body))
        .await
        .ok()?
        .ok()?;
    let total = body
        .lines()
        .filter(|l| {
            l.starts_with("portcullis_requests_total{") && l.contains("outcome=\"allowed\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    Some(total)
}
