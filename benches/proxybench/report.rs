//! `benches/RESULTS.md`: every peer in columns, medians of the runs, ratios, targets, method.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use portcullis::admin::status::{MAX_GROUPS, MAX_ROWS};

use crate::peers::Kind;
use crate::procfs::Machine;
use crate::{BULK, RunArgs, bulk_key};

/// Every measured value, per figure and peer, one per run.
#[derive(Default)]
pub struct Store {
    values: BTreeMap<String, BTreeMap<&'static str, Vec<f64>>>,
    errors: BTreeMap<&'static str, Vec<String>>,
    limits: BTreeMap<&'static str, (usize, String)>,
    log_lines: BTreeMap<&'static str, usize>,
    /// `portcullis_requests_total{outcome="allowed"}` per portcullis peer, summed over the
    /// scrapes taken before each run's idle phase restarts the process.
    metrics: BTreeMap<&'static str, Option<f64>>,
    /// Status-page levels that held fewer tunnels than asked: asked → (held, why).
    status_limits: BTreeMap<usize, (usize, String)>,
    /// What the growth figure's report says about its limits, once each.
    growth_notes: std::collections::BTreeSet<String>,
}

impl Store {
    pub fn add(&mut self, key: &str, peer: &'static str, value: f64) {
        self.values
            .entry(key.to_string())
            .or_default()
            .entry(peer)
            .or_default()
            .push(value);
    }

    pub fn note_error(&mut self, peer: &'static str, error: String) {
        let list = self.errors.entry(peer).or_default();
        if list.len() < 5 && !list.contains(&error) {
            list.push(error);
        }
    }

    pub fn note_limit(&mut self, peer: &'static str, tunnels: usize, why: String) {
        self.limits.insert(peer, (tunnels, why));
    }

    pub fn note_status_limit(&mut self, asked: usize, held: usize, why: String) {
        self.status_limits.insert(asked, (held, why));
    }

    pub fn note_growth(&mut self, note: String) {
        self.growth_notes.insert(note);
    }

    pub fn add_metrics(&mut self, peer: &'static str, allowed: Option<f64>) {
        let entry = self.metrics.entry(peer).or_insert(Some(0.0));
        *entry = match (*entry, allowed) {
            (Some(a), Some(b)) => Some(a + b),
            _ => None,
        };
    }

    pub fn count_log_lines(&mut self, peer: &'static str, lines: usize) {
        *self.log_lines.entry(peer).or_default() += lines;
    }

    fn runs(&self, key: &str, peer: &str) -> &[f64] {
        self.values
            .get(key)
            .and_then(|m| m.get(peer))
            .map_or(&[], Vec::as_slice)
    }

    /// The median over runs (NaN when nothing was measured).
    pub fn median(&self, key: &str, peer: &str) -> f64 {
        let mut v: Vec<f64> = self
            .runs(key, peer)
            .iter()
            .copied()
            .filter(|x| x.is_finite())
            .collect();
        if v.is_empty() {
            return f64::NAN;
        }
        v.sort_by(f64::total_cmp);
        let n = v.len();
        if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        }
    }

    fn sum(&self, key: &str, peer: &str) -> f64 {
        let v = self.runs(key, peer);
        if v.is_empty() {
            f64::NAN
        } else {
            v.iter().sum()
        }
    }
}

pub struct Context<'a> {
    pub args: &'a RunArgs,
    pub machine: Machine,
    pub versions: Vec<(&'static str, String)>,
    pub date: String,
    pub elapsed: Duration,
}

struct Row {
    label: String,
    key: String,
    decimals: usize,
    sum: bool,
}

fn row(label: impl Into<String>, key: impl Into<String>, decimals: usize) -> Row {
    Row {
        label: label.into(),
        key: key.into(),
        decimals,
        sum: false,
    }
}

fn fmt(value: f64, decimals: usize) -> String {
    if value.is_finite() {
        format!("{value:.decimals$}")
    } else {
        "—".into()
    }
}

fn ratio(a: f64, b: f64) -> String {
    if a.is_finite() && b.is_finite() && b != 0.0 {
        format!("{:.2}×", a / b)
    } else {
        "—".into()
    }
}

const SUBJECT: &str = "portcullis";
const RATIO_TO: [Kind; 4] = [Kind::Squid, Kind::Tinyproxy, Kind::Direct, Kind::Floor];

fn table(out: &mut String, store: &Store, peers: &[Kind], rows: &[Row]) {
    let ratio_to: Vec<Kind> = RATIO_TO.into_iter().filter(|k| peers.contains(k)).collect();
    out.push_str("| figure |");
    for peer in peers {
        let _ = write!(out, " {} |", peer.title());
    }
    for other in &ratio_to {
        let _ = write!(out, " portcullis ÷ {} |", other.title());
    }
    out.push_str("\n|---|");
    for _ in 0..peers.len() + ratio_to.len() {
        out.push_str("---:|");
    }
    out.push('\n');
    for r in rows {
        let value = |peer: &str| {
            if r.sum {
                store.sum(&r.key, peer)
            } else {
                store.median(&r.key, peer)
            }
        };
        let _ = write!(out, "| {} |", r.label);
        for peer in peers {
            let _ = write!(out, " {} |", fmt(value(peer.name()), r.decimals));
        }
        for other in &ratio_to {
            let _ = write!(out, " {} |", ratio(value(SUBJECT), value(other.name())));
        }
        out.push('\n');
    }
    out.push('\n');
}

fn raw_table(out: &mut String, store: &Store, peers: &[Kind], rows: &[Row]) {
    out.push_str("| figure |");
    for peer in peers {
        let _ = write!(out, " {} |", peer.title());
    }
    out.push_str("\n|---|");
    for _ in peers {
        out.push_str("---:|");
    }
    out.push('\n');
    for r in rows {
        let _ = write!(out, "| {} |", r.label);
        for peer in peers {
            let values: Vec<String> = store
                .runs(&r.key, peer.name())
                .iter()
                .map(|v| fmt(*v, r.decimals))
                .collect();
            let cell = if values.is_empty() {
                "—".to_string()
            } else {
                values.join(" / ")
            };
            let _ = write!(out, " {cell} |");
        }
        out.push('\n');
    }
    out.push('\n');
}

/// Criterion's medians (ns) for the `matching` benches, by full id.
fn criterion_results(dir: &Path, since: u64) -> Vec<(String, f64)> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    let since = UNIX_EPOCH + Duration::from_secs(since);
    while let Some(path) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&path) else {
            continue;
        };
        for entry in entries.flatten() {
            let p = entry.path();
            if p.is_dir() {
                if p.file_name().is_some_and(|n| n == "new") {
                    if let Some(result) = read_criterion(&p, since) {
                        found.push(result);
                    }
                } else {
                    stack.push(p);
                }
            }
        }
    }
    found.sort_by(|a, b| a.0.cmp(&b.0));
    found
}

fn read_criterion(dir: &Path, since: SystemTime) -> Option<(String, f64)> {
    let estimates = dir.join("estimates.json");
    let modified = std::fs::metadata(&estimates).ok()?.modified().ok()?;
    if modified < since {
        return None;
    }
    let benchmark = std::fs::read_to_string(dir.join("benchmark.json")).ok()?;
    let id = json_string_after(&benchmark, "\"full_id\":")?;
    let groups = [
        "default_profile/",
        "rules_10000/",
        "rules_10000_compile/",
        "config_problems/",
        "destination/",
    ];
    if !groups.iter().any(|g| id.starts_with(g)) {
        return None;
    }
    let estimates = std::fs::read_to_string(estimates).ok()?;
    let median = &estimates[estimates.find("\"median\":")?..];
    let value = json_number_after(median, "\"point_estimate\":")?;
    Some((id, value))
}

fn json_string_after(text: &str, key: &str) -> Option<String> {
    let rest = text[text.find(key)? + key.len()..].trim_start();
    let rest = rest.strip_prefix('"')?;
    Some(rest[..rest.find('"')?].to_string())
}

fn json_number_after(text: &str, key: &str) -> Option<f64> {
    let rest = text[text.find(key)? + key.len()..].trim_start();
    let end = rest
        .find(|c: char| !(c.is_ascii_digit() || matches!(c, '.' | '-' | '+' | 'e' | 'E')))
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

fn human_ns(ns: f64) -> String {
    if ns >= 1e6 {
        format!("{:.2} ms", ns / 1e6)
    } else if ns >= 1e3 {
        format!("{:.2} µs", ns / 1e3)
    } else {
        format!("{ns:.1} ns")
    }
}

struct Target {
    what: String,
    value: String,
    met: Option<bool>,
}

fn verdict(met: Option<bool>) -> &'static str {
    match met {
        Some(true) => "met",
        Some(false) => "**missed**",
        None => "not measured",
    }
}

fn check(value: f64, ok: impl Fn(f64) -> bool) -> Option<bool> {
    value.is_finite().then(|| ok(value))
}

pub fn render(store: &Store, ctx: &Context<'_>, peers: &[Kind]) -> String {
    let args = ctx.args;
    let m = |key: &str, peer: Kind| store.median(key, peer.name());
    let mut out = String::new();
    out.push_str("# portcullis benchmark results\n\n");
    if args.quick {
        out.push_str(
            "> **Quick smoke test** (`--quick`): one short run per figure. These numbers show \
             that the benchmark works end to end; they are not for quoting. Run `benches/run.sh` \
             for the real figures.\n\n",
        );
    }
    let mc = &ctx.machine;
    let _ = writeln!(
        out,
        "- **Date:** {}\n- **Machine:** {}, {} cores, {} RAM; {}; Linux {}",
        ctx.date, mc.cpu, mc.cores, mc.memory, mc.os, mc.kernel
    );
    let versions: Vec<String> = ctx
        .versions
        .iter()
        .map(|(name, v)| format!("{name} `{}`", if v.is_empty() { "?" } else { v }))
        .collect();
    let _ = writeln!(out, "- **Software:** {}", versions.join(", "));
    let _ = writeln!(
        out,
        "- **Command:** `{}`: {} run(s), each figure counted over {:.1} s after {:.1} s of \
         warm-up; set-up concurrency {}; {} idle tunnels asked for;{} all peers interleaved. \
         Wall time {:.0} s.",
        args.command,
        args.runs,
        args.duration,
        args.warmup,
        args.concurrency
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", "),
        args.idle,
        if args.figures.iter().any(|f| f == "status") {
            format!(
                " status page at {} open tunnels;",
                args.status_tunnels
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        } else {
            String::new()
        } + &if args.figures.iter().any(|f| f == "stream") {
            format!(
                " streaming: {} tunnels × {} frames/s, each primed with {} KiB, counted over \
                 {:.1} s after {:.1} s;",
                args.stream_tunnels,
                crate::stream::FPS,
                args.stream_prime_kib,
                args.stream_duration,
                args.stream_warmup
            )
        } else {
            String::new()
        } + &if args.figures.iter().any(|f| f == "growth") {
            format!(
                " growth: tunnels at {}, rules at {}, bursts of {} set-ups at c={};",
                args.growth_tunnels
                    .iter()
                    .map(|l| l.key())
                    .collect::<Vec<_>>()
                    .join(", "),
                args.growth_rules
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", "),
                args.growth_burst,
                crate::growth::CONCURRENCY
                    .map(|c| c.to_string())
                    .join(" and ")
            )
        } else {
            String::new()
        },
        ctx.elapsed.as_secs_f64()
    );
    out.push_str(
        "- **Reading it:** every cell is the median over the runs (raw values at the end). \
         Ratios are portcullis ÷ that peer (above 1 is better for rates and throughput, below 1 \
         is better for latency, CPU and memory). On a 2-core shared machine differences under \
         about 10% are noise.\n\n",
    );

    let cs = &args.concurrency;
    out.push_str(
        "## Tunnel set-up\n\nOne cycle: TCP connect to the proxy, `CONNECT \
         echo.bench.amazonappstream.com:443`, the 200, a TLS ClientHello naming that host \
         (93 bytes) echoed back by the origin, close. `c` clients run cycles back to back. For \
         direct, the cycle is connect, the same bytes echoed, close.\n\n",
    );
    let mut rows: Vec<Row> = cs
        .iter()
        .map(|c| {
            row(
                format!("set-up rate, c={c} (tunnels/s)"),
                format!("rate/c{c}"),
                0,
            )
        })
        .collect();
    for c in cs {
        rows.push(row(
            format!("latency p50, c={c} (µs)"),
            format!("p50/c{c}"),
            0,
        ));
        rows.push(row(
            format!("latency p99, c={c} (µs)"),
            format!("p99/c{c}"),
            0,
        ));
    }
    for c in cs {
        rows.push(Row {
            sum: true,
            ..row(
                format!("failed cycles, c={c} (all runs)"),
                format!("errors/c{c}"),
                0,
            )
        });
    }
    table(&mut out, store, peers, &rows);
    let setup_rows = rows;

    out.push_str(
        "## Bulk throughput\n\nTunnels to the sink (upload: client → origin) or from the \
         source (download), 256 KiB writes, bytes counted at the client.\n\n",
    );
    let full: Vec<Kind> = peers
        .iter()
        .copied()
        .filter(|k| k.in_full_suite())
        .collect();
    let bulk_label = |key: &str| {
        let (dir, n) = key.split_at(if key.starts_with("up") { 2 } else { 4 });
        let dir = if dir == "up" { "upload" } else { "download" };
        let tunnels = if n == "1" { "tunnel" } else { "tunnels" };
        format!("{n} {tunnels}, {dir}")
    };
    let bulk_rows: Vec<Row> = BULK
        .iter()
        .map(|&(d, n)| {
            let key = bulk_key(d, n);
            row(
                format!("throughput, {} (Gbit/s)", bulk_label(&key)),
                format!("tput/{key}"),
                2,
            )
        })
        .collect();
    table(&mut out, store, &full, &bulk_rows);

    out.push_str(
        "## Proxy CPU\n\nCPU time (user + system) of the proxy process and its children, from \
         `/proc/<pid>/stat` before and after each counted window, divided by the tunnels set up \
         or the bytes relayed in it. The load generator's and the origin's CPU are not in it. \
         The part spent in the kernel (system time) is shown on its own: it is mostly TCP on \
         loopback, which a proxy cannot avoid. For scale, the kernel time of the two ends \
         (the load generator's clients and the origin) is shown too: in the direct column it is \
         what one TCP connection costs both its ends, about the kernel work a proxy does for its \
         two connections. On loopback, which process pays for the receiving side of a \
         transfer depends on which one is running when the packets land, so a proxy's CPU per \
         GiB and the ends' move between runs in opposite directions; their sum (\"proxy CPU + \
         client and origin kernel CPU\", over direct's) is the steadier comparison. The DNS \
         server's CPU (dnsmasq, shared by all peers) is shown separately: a proxy that does \
         not cache answers pays there.\n\n",
    );
    // (what, store key): a row per concurrency for tunnels, a row per bulk figure for GiB.
    let per_tunnel = |what: &str, key: &str| -> Vec<Row> {
        cs.iter()
            .map(|c| {
                row(
                    format!("{what} per tunnel, c={c} (µs)"),
                    format!("{key}_tunnel/c{c}"),
                    1,
                )
            })
            .collect()
    };
    let per_gib = |what: &str, key: &str| -> Vec<Row> {
        BULK.iter()
            .map(|&(d, n)| {
                let bulk = bulk_key(d, n);
                let label = bulk_label(&bulk);
                row(
                    format!("{what} per GiB, {label} (s)"),
                    format!("{key}_gib/{bulk}"),
                    3,
                )
            })
            .collect()
    };
    let cpu_rows: Vec<Row> = [
        per_tunnel("proxy CPU", "cpu"),
        per_gib("proxy CPU", "cpu"),
        per_tunnel("proxy kernel CPU", "sys"),
        per_gib("proxy kernel CPU", "sys"),
        per_tunnel("client + origin kernel CPU", "ends_sys"),
        per_gib("client + origin kernel CPU", "ends_sys"),
        per_gib("proxy CPU + client and origin kernel CPU", "together"),
        per_tunnel("DNS server CPU", "dns"),
    ]
    .into_iter()
    .flatten()
    .collect();
    table(&mut out, store, peers, &cpu_rows);

    out.push_str(
        "## Idle tunnels\n\nA fresh proxy process; tunnels opened (CONNECT, 200, ClientHello \
         echoed) and left idle; RSS (`VmRSS` of the process and its children) and open file \
         descriptors before and after. Kernel memory (socket buffers, pipes) is not in RSS. \
         Then, on another fresh process, *silent* tunnels: CONNECT, 200, and never a byte \
         (to a host whose portcullis rule has `sni = \"off\"`; under `enforce` such a tunnel \
         is closed at `header_timeout`).\n\n",
    );
    let proxies: Vec<Kind> = full
        .iter()
        .copied()
        .filter(|k| k.in_idle_figures())
        .collect();
    let idle_rows = vec![
        row("idle tunnels held", "idle/tunnels", 0),
        row("RSS per idle tunnel (KiB)", "idle/kib", 2),
        row("RSS before (MiB)", "idle/rss_before", 1),
        row("RSS with the tunnels open (MiB)", "idle/rss_after", 1),
        row("file descriptors per idle tunnel", "idle/fds", 2),
        row(
            "silent tunnels held (never a byte)",
            "idle_silent/tunnels",
            0,
        ),
        row("RSS per silent tunnel (KiB)", "idle_silent/kib", 2),
        row("file descriptors per silent tunnel", "idle_silent/fds", 2),
    ];
    table(&mut out, store, &proxies, &idle_rows);
    for (peer, (tunnels, why)) in &store.limits {
        let _ = writeln!(
            out,
            "- {peer}: {tunnels} tunnels instead of {}, limited by {why}. Raise `ulimit -n` \
             (the hard limit needs root outside a container) for the full count.",
            args.idle
        );
    }
    if !store.limits.is_empty() {
        out.push('\n');
    }
    let status_rows = if args.figures.iter().any(|f| f == "status") {
        status_section(&mut out, store, &args.status_tunnels)
    } else {
        Vec::new()
    };
    let stream_rows = if args.figures.iter().any(|f| f == "stream") {
        stream_section(&mut out, store, peers, args)
    } else {
        Vec::new()
    };
    let growth_rows = if args.figures.iter().any(|f| f == "growth") {
        growth_section(&mut out, store, args)
    } else {
        Vec::new()
    };

    // Targets.
    let p = Kind::Portcullis;
    let c64 = "rate/c64";
    let mut targets = vec![
        Target {
            what: "proxy CPU per tunnel (c=64) ≤ 45 µs".into(),
            value: format!("{} µs", fmt(m("cpu_tunnel/c64", p), 1)),
            met: check(m("cpu_tunnel/c64", p), |v| v <= 45.0),
        },
        Target {
            what: "set-up rate at c=64 ≥ 2× tinyproxy".into(),
            value: ratio(m(c64, p), m(c64, Kind::Tinyproxy)),
            met: check(m(c64, p) / m(c64, Kind::Tinyproxy), |v| v >= 2.0),
        },
        Target {
            what: "added latency at c=1 (p50, over direct) ≤ 60 µs".into(),
            value: format!("{} µs", fmt(m("p50/c1", p) - m("p50/c1", Kind::Direct), 0)),
            met: check(m("p50/c1", p) - m("p50/c1", Kind::Direct), |v| v <= 60.0),
        },
        Target {
            what: "p99 at c=1 below Squid's and tinyproxy's".into(),
            value: format!(
                "{} vs {} / {} µs",
                fmt(m("p99/c1", p), 0),
                fmt(m("p99/c1", Kind::Squid), 0),
                fmt(m("p99/c1", Kind::Tinyproxy), 0)
            ),
            met: check(m("p99/c1", p), |v| {
                v < m("p99/c1", Kind::Squid) && v < m("p99/c1", Kind::Tinyproxy)
            }),
        },
    ];
    for key in ["up1", "down1"] {
        let t = format!("tput/{key}");
        targets.push(Target {
            what: format!("throughput, {} ≥ 2× Squid", bulk_label(key)),
            value: ratio(m(&t, p), m(&t, Kind::Squid)),
            met: check(m(&t, p) / m(&t, Kind::Squid), |v| v >= 2.0),
        });
    }
    for key in ["up1", "down1"] {
        let c = format!("cpu_gib/{key}");
        targets.push(Target {
            what: format!("proxy CPU per GiB, {} ≤ 0.15 s", bulk_label(key)),
            value: format!("{} s", fmt(m(&c, p), 3)),
            met: check(m(&c, p), |v| v <= 0.15),
        });
    }
    let idle_n = m("idle/tunnels", p);
    targets.push(Target {
        what: "RSS per idle tunnel ≤ 6 KiB (at 10,000 idle tunnels)".into(),
        value: format!(
            "{} KiB at {} tunnels",
            fmt(m("idle/kib", p), 2),
            fmt(idle_n, 0)
        ),
        met: check(m("idle/kib", p), |v| v <= 6.0),
    });
    targets.push(Target {
        what: "RSS per silent tunnel (never a byte) ≤ 6 KiB".into(),
        value: format!(
            "{} KiB at {} tunnels",
            fmt(m("idle_silent/kib", p), 2),
            fmt(m("idle_silent/tunnels", p), 0)
        ),
        met: check(m("idle_silent/kib", p), |v| v <= 6.0),
    });
    let micro = args
        .criterion
        .as_deref()
        .map(|d| criterion_results(d, args.criterion_since))
        .unwrap_or_default();
    let worst = |prefix: &str| {
        micro
            .iter()
            .filter(|(id, _)| id.starts_with(prefix))
            .map(|(_, ns)| *ns)
            .fold(f64::NAN, f64::max)
    };
    let default_worst = worst("default_profile/parse_and_check/");
    let many_worst = worst("rules_10000/parse_and_check/");
    targets.push(Target {
        what: "host validation + matching, default profile ≤ 200 ns (slowest host)".into(),
        value: fmt(default_worst, 1) + " ns",
        met: check(default_worst, |v| v <= 200.0),
    });
    targets.push(Target {
        what: "host validation + matching, 10,000 rules ≤ 1 µs (slowest host)".into(),
        value: fmt(many_worst, 1) + " ns",
        met: check(many_worst, |v| v <= 1000.0),
    });
    let mut log_ok = None;
    for c in cs {
        let key = format!("rate/c{c}");
        let on_off = m(&key, Kind::Portcullis) / m(&key, Kind::PortcullisNoLog);
        if on_off.is_finite() {
            log_ok = Some(log_ok.unwrap_or(true) && on_off >= 0.95);
        }
    }
    targets.push(Target {
        what: "logging on costs ≤ 5% of set-up rate (every c)".into(),
        value: "see below".into(),
        met: log_ok,
    });
    out.push_str("## Targets (portcullis, same run, metrics and access log on)\n\n");
    out.push_str("| target | measured | verdict |\n|---|---:|---|\n");
    for t in &targets {
        let _ = writeln!(out, "| {} | {} | {} |", t.what, t.value, verdict(t.met));
    }
    out.push('\n');
    ratio_targets(&mut out, store);

    out.push_str(
        "## Cost of logging and metrics on the data path\n\n`portcullis` runs with its \
         default logging (`info`: one JSON access-log line per decision and per closed tunnel, \
         written to a file) and metrics; `portcullis, log off` is the same binary and config with \
         `PORTCULLIS_LOG=off`.\n\n",
    );
    out.push_str(
        "| c | set-up rate, log on | log off | on ÷ off | CPU per tunnel, log on (µs) | log off (µs) |\n\
         |---:|---:|---:|---:|---:|---:|\n",
    );
    for c in cs {
        let rate = format!("rate/c{c}");
        let cpu = format!("cpu_tunnel/c{c}");
        let _ = writeln!(
            out,
            "| {c} | {} | {} | {} | {} | {} |",
            fmt(m(&rate, Kind::Portcullis), 0),
            fmt(m(&rate, Kind::PortcullisNoLog), 0),
            ratio(m(&rate, Kind::Portcullis), m(&rate, Kind::PortcullisNoLog)),
            fmt(m(&cpu, Kind::Portcullis), 1),
            fmt(m(&cpu, Kind::PortcullisNoLog), 1),
        );
    }
    out.push_str(
        "\nMetrics cannot be turned off: there is no switch, and the counters are updated inline \
         on the request path (`requests_total`, `tunnels_active`, the connect histogram) and \
         per read on the data path (`tunnel_bytes_total`). Measuring \"metrics off\" would need \
         a build or config switch that replaces the per-domain handles with no-ops (a \
         `[metrics] enabled = false` key, or a cargo feature); both columns above include \
         metrics.\n\n",
    );
    let mut evidence = Vec::new();
    for (peer, lines) in &store.log_lines {
        if *peer != Kind::Direct.name() {
            evidence.push(format!("{peer}: {lines} access-log lines"));
        }
    }
    for (peer, total) in &store.metrics {
        evidence.push(format!(
            "{peer}: `portcullis_requests_total{{outcome=\"allowed\"}}` = {}",
            total.map_or_else(|| "unreadable".into(), |v| format!("{v:.0}"))
        ));
    }
    let _ = writeln!(
        out,
        "Evidence that logging and metrics were on (counted over the set-up, bulk and \
         streaming phases, before the idle-tunnel restarts): {}.\n",
        evidence.join("; ")
    );

    out.push_str("## Micro-benchmarks (criterion, `cargo bench --bench matching`)\n\n");
    if micro.is_empty() {
        out.push_str("Not run (or no results newer than this run).\n\n");
    } else {
        out.push_str("| benchmark | median |\n|---|---:|\n");
        for (id, ns) in &micro {
            let _ = writeln!(out, "| `{id}` | {} |", human_ns(*ns));
        }
        out.push_str(
            "\n`parse_and_check` is `rules::parse_host` then `RuleSet::check`, as the CONNECT \
             handler runs them; the 10,000 rules are a third leading wildcards, a third exact \
             names, a third inner wildcards, built through `Config::parse`. \
             `config_problems/Config::parse/N` parses N such rules that each name port 0 (N \
             problems, each placed on its line): the same time per rule at every N is linear \
             growth. `destination/*` is `destination::Policy::check`.\n\n",
        );
    }

    if !store.errors.is_empty() {
        out.push_str("## Failures seen\n\n");
        for (peer, errors) in &store.errors {
            for e in errors {
                let _ = writeln!(out, "- {peer}: {e}");
            }
        }
        out.push('\n');
    }

    out.push_str(
        "## Method\n\n\
         - Everything runs inside one private network, mount and PID namespace \
         (`unshare --net --mount --pid`) that has only loopback: no packet can leave the machine.\n\
         - Names resolve through dnsmasq on 127.0.0.53, never the machine's resolver: \
         `echo.`, `sink.` and `source.bench.amazonappstream.com` → 127.0.0.1, .2 and .3, TTL 300. \
         Squid uses `dns_nameservers 127.0.0.53`; tinyproxy uses the C library resolver, whose \
         `/etc/resolv.conf` is a bind mount naming 127.0.0.53 inside the namespace; portcullis \
         uses `[dns] servers`.\n\
         - Every proxy has the same allowlist: CONNECT to `*.amazonappstream.com`, port 443 only \
         (Squid: `dstdomain .amazonappstream.com` and a port ACL; tinyproxy: `ConnectPort 443`, \
         `FilterDefaultDeny Yes` and the anchored ERE `\\.amazonappstream\\.com$`, since its \
         `Filter` is an unanchored regex; portcullis: one `[[rule]]`, plus \
         `[destinations] allow = [\"127.0.0.0/8\"]` because the origins are on loopback). The \
         origins listen on port 443 of 127.0.0.1-3.\n\
         - Every proxy logs each request: Squid's `access_log`, tinyproxy's `LogLevel Connect`, \
         portcullis' JSON access log. Logs are truncated between runs and, unless the command \
         says `--disk-logs`, live on a tmpfs private to the namespace: tinyproxy `fsync()`s its \
         log after every line, which on a disk alone costs milliseconds per tunnel.\n\
         - The load generator (a tokio client, 2 worker threads) and the origin (its own process) \
         share the machine's cores with the proxy under test; the idle peers sit idle. CPU \
         figures are the proxy's own, from `/proc`.\n\
         - The set-up payload is a real TLS ClientHello with SNI rather than 64 arbitrary bytes, \
         because portcullis checks SNI inside tunnels by default; Squid and tinyproxy relay it \
         as they would any bytes.\n\
         - Idle-tunnel memory is measured on a freshly started process each run.\n\
         - The bare relay (`proxybench floor`, the floor) is the least a CONNECT proxy built \
         like portcullis can do: one current-thread tokio event loop per core, each accepting \
         on its own `SO_REUSEPORT` socket with `TCP_NODELAY` inherited from the listener; it \
         reads the request head, dials the origin (a table lookup, as a warm DNS cache), \
         answers 200 and copies both ways (`tokio::io::copy_bidirectional`), or, for the bulk \
         origins, splices both ways from the first byte through 1 MiB pipes. No allowlist, \
         destination policy, ClientHello check, log, metrics, timeouts or limits. It is a \
         floor for this design, not for every design: busy-polling or `io_uring` could go \
         lower.\n",
    );

    out.push_str("\n## Raw values (one per run, in run order)\n\n");
    let mut all_rows = setup_rows;
    all_rows.extend(bulk_rows);
    all_rows.extend(cpu_rows);
    all_rows.extend(idle_rows);
    raw_table(&mut out, store, peers, &all_rows);
    if !status_rows.is_empty() {
        raw_table(&mut out, store, &[Kind::Portcullis], &status_rows);
    }
    if !stream_rows.is_empty() {
        raw_table(&mut out, store, peers, &stream_rows);
    }
    if !growth_rows.is_empty() {
        raw_table(&mut out, store, &[Kind::Portcullis], &growth_rows);
    }
    out
}

/// One row of a table with a column per level (status page, growth); `figure` is the key
/// after `<group>/<level>/`.
struct LevelRow {
    label: String,
    figure: String,
    decimals: usize,
    /// Whether a ratio between levels says anything (latency, size, CPU; not RSS or counts).
    ratios: bool,
}

fn level_row(label: impl Into<String>, figure: impl Into<String>, decimals: usize) -> LevelRow {
    LevelRow {
        label: label.into(),
        figure: figure.into(),
        decimals,
        ratios: false,
    }
}

/// A row whose ratios between levels are shown.
fn ratio_row(label: impl Into<String>, figure: impl Into<String>, decimals: usize) -> LevelRow {
    LevelRow {
        ratios: true,
        ..level_row(label, figure, decimals)
    }
}

/// The figures of the status page at each level, labelled for the table.
fn status_rows() -> Vec<LevelRow> {
    vec![
        level_row("tunnels held open", "tunnels", 0),
        level_row("open tunnels on the page (`tunnels.open`)", "shown_open", 0),
        level_row(
            format!("tunnels listed (capped at {MAX_ROWS})"),
            "listed_tunnels",
            0,
        ),
        level_row(
            format!("clients listed (capped at {MAX_GROUPS})"),
            "listed_clients",
            0,
        ),
        ratio_row("`GET /` latency p50 (µs)", "html_p50", 0),
        ratio_row("`GET /` latency p99 (µs)", "html_p99", 0),
        ratio_row("`GET /status.json` latency p50 (µs)", "json_p50", 0),
        ratio_row("`GET /status.json` latency p99 (µs)", "json_p99", 0),
        ratio_row("`GET /` body (KiB)", "html_kib", 1),
        ratio_row("`GET /status.json` body (KiB)", "json_kib", 1),
        ratio_row("proxy CPU per `GET /` (µs)", "html_cpu", 0),
        ratio_row("proxy CPU per `GET /status.json` (µs)", "json_cpu", 0),
        level_row("RSS before the status requests (MiB)", "rss_before", 1),
        level_row("RSS after the status requests (MiB)", "rss_after", 1),
        level_row("RSS growth over the status requests (KiB)", "rss_growth", 0),
    ]
}

/// Levels of one table: (store key, column header).
type Levels = [(String, String)];

/// A table of portcullis' medians of `<group>/<level>/<figure>`, a column per level, then a
/// column per pair of levels (indices into `levels`) with their ratio. Returns the rows for
/// the raw values, per level, labelled `<what>, <header>: <label>`.
fn level_table(
    out: &mut String,
    store: &Store,
    group: &str,
    what: &str,
    levels: &Levels,
    pairs: &[(usize, usize)],
    rows: &[LevelRow],
) -> Vec<Row> {
    let p = Kind::Portcullis.name();
    let cell = |level: usize, figure: &str| {
        store.median(&format!("{group}/{}/{figure}", levels[level].0), p)
    };
    out.push_str("| figure |");
    for (_, header) in levels {
        let _ = write!(out, " {header} |");
    }
    for &(a, b) in pairs {
        let _ = write!(out, " {} ÷ {} |", levels[a].0, levels[b].0);
    }
    out.push_str("\n|---|");
    for _ in 0..levels.len() + pairs.len() {
        out.push_str("---:|");
    }
    out.push('\n');
    for r in rows {
        let _ = write!(out, "| {} |", r.label);
        for level in 0..levels.len() {
            let _ = write!(out, " {} |", fmt(cell(level, &r.figure), r.decimals));
        }
        for &(a, b) in pairs {
            let value = if r.ratios {
                ratio(cell(a, &r.figure), cell(b, &r.figure))
            } else {
                "—".into()
            };
            let _ = write!(out, " {value} |");
        }
        out.push('\n');
    }
    out.push('\n');
    levels
        .iter()
        .flat_map(|(key, header)| {
            rows.iter().map(move |r| {
                row(
                    format!("{what}, {header}: {}", r.label),
                    format!("{group}/{key}/{}", r.figure),
                    r.decimals,
                )
            })
        })
        .collect()
}

/// Each level ÷ the first (the baseline).
fn to_first(levels: &Levels) -> Vec<(usize, usize)> {
    (1..levels.len()).map(|i| (i, 0)).collect()
}

/// The status-page section: a column per level of open tunnels, then each level ÷ the first
/// (the baseline) and the last ÷ the one before it (close to 1 once the lists are full, if
/// the page is bounded). Returns the rows for the raw values, per level.
fn status_section(out: &mut String, store: &Store, levels: &[usize]) -> Vec<Row> {
    let mut levels = levels.to_vec();
    levels.sort_unstable();
    levels.dedup();
    let _ = writeln!(
        out,
        "## Status page under load\n\n\
         portcullis only: Squid and tinyproxy have no page like it (the log-off twin serves \
         the same page and is left out). A freshly started portcullis; idle tunnels (CONNECT, \
         200, ClientHello echoed, as in the idle figure) opened level by level and held, from \
         {CLIENTS} client addresses (127.0.1.x) in turn to one domain, so past {MAX_GROUPS} \
         tunnels the per-client table is at its cap; nothing is refused, so the list of recent \
         refusals is empty. At each level, {WARMUP} warm-up requests, then {REQUESTS} counted \
         ones of each form in turn, sequential, each a plain HTTP/1.0 GET on a fresh TCP \
         connection to the admin listener, timed from connect to the end of the body (p99 of \
         {REQUESTS} is the slowest). Body: the largest seen. Proxy CPU per request: the run \
         time of all portcullis threads (`/proc/<pid>/task/*/schedstat`, finer than `stat`'s \
         10 ms ticks) over the counted requests, accept and HTTP included. RSS is read before \
         the warm-up and after both forms. Ratios here are between levels of the same process, \
         not between peers.\n",
        CLIENTS = crate::status::CLIENTS,
        WARMUP = crate::status::WARMUP,
        REQUESTS = crate::status::REQUESTS,
    );
    let levels: Vec<(String, String)> = levels
        .iter()
        .map(|l| (l.to_string(), format!("{l} tunnels")))
        .collect();
    let mut pairs = to_first(&levels);
    if levels.len() >= 3 {
        pairs.push((levels.len() - 1, levels.len() - 2));
    }
    let raw = level_table(
        out,
        store,
        "status",
        "status",
        &levels,
        &pairs,
        &status_rows(),
    );
    for (asked, (held, why)) in &store.status_limits {
        let _ = writeln!(
            out,
            "- {held} tunnels instead of {asked}, limited by {why}."
        );
    }
    if !store.status_limits.is_empty() {
        out.push('\n');
    }
    raw
}

/// Rows of a growth table for the set-up bursts at each concurrency.
fn burst_rows() -> Vec<LevelRow> {
    let cs = crate::growth::CONCURRENCY;
    let mut rows: Vec<LevelRow> = cs
        .iter()
        .flat_map(|c| {
            [
                ratio_row(
                    format!("proxy CPU per set-up, c={c} (µs)"),
                    format!("cpu_c{c}"),
                    1,
                ),
                ratio_row(
                    format!("of which kernel, c={c} (µs)"),
                    format!("sys_c{c}"),
                    1,
                ),
            ]
        })
        .collect();
    for c in cs {
        rows.push(ratio_row(
            format!("set-up latency p50, c={c} (µs)"),
            format!("p50_c{c}"),
            0,
        ));
        rows.push(ratio_row(
            format!("set-up latency p99, c={c} (µs)"),
            format!("p99_c{c}"),
            0,
        ));
    }
    for c in cs {
        rows.push(level_row(
            format!("failed set-ups, c={c} (median of runs)"),
            format!("errors_c{c}"),
            0,
        ));
    }
    rows
}

/// How cost grows: the tunnel sweep's table, then the rule sweep's. Returns the rows for the
/// raw values.
fn growth_section(out: &mut String, store: &Store, args: &RunArgs) -> Vec<Row> {
    use crate::growth::{CHECKS, RELOADS, RESERVE_FDS, WARMUP_CYCLES};
    let p = Kind::Portcullis.name();
    let burst = args.growth_burst;
    let most = |figure: &str| store.median(&format!("growth/most/{figure}"), p);
    let _ = writeln!(
        out,
        "## How cost grows\n\n\
         portcullis only: whether its costs grow faster than linearly with open tunnels or \
         with rules. Set-up bursts: at each level, {WARMUP_CYCLES} uncounted cycles, then \
         {burst} counted \
         ones (CONNECT, 200, ClientHello echoed by the origin, close, as in the set-up figure) \
         by 1 client, then the same by 64; latency of every counted cycle; proxy CPU per \
         set-up is the run time of all portcullis threads (`/proc/<pid>/task/*/schedstat`) \
         over the counted cycles, divided by them; its kernel part is `/proc/<pid>/stat`'s \
         system time, in 10 ms ticks, so good to a few percent. Ratios are between levels of \
         the same sweep, each ÷ the first.\n\n\
         **Open tunnels.** One freshly started portcullis with the bench's one rule; idle \
         tunnels to the echo origin opened level by level and held, the bursts run beside \
         them. RSS per tunnel is (RSS at the level − RSS of the fresh process) ÷ tunnels held. \
         The last level is the most the open-file limits allow: each tunnel holds \
         descriptors in the proxy (two: client and origin sockets), one in the load generator \
         (the client end) and one in the origin (the server end), each process under its own \
         `RLIMIT_NOFILE` (run.sh raises the soft limit to the hard one, `ulimit -Hn`). For \
         each, the most is ⌊(limit − descriptors open before the first tunnel − {RESERVE_FDS} \
         kept free) ÷ descriptors per tunnel⌋, per tunnel as measured over the first 100; the \
         {RESERVE_FDS} cover the c=64 burst's connections in flight (two each, and those still \
         closing), DNS, admin and log files. The smallest of the three is the level; the \
         process that sets it and its numbers are below the table.\n"
    );
    let levels: Vec<(String, String)> = args
        .growth_tunnels
        .iter()
        .map(|l| {
            let key = l.key();
            let header = match l {
                crate::growth::Level::Max => format!("max ({} tunnels)", fmt(most("tunnels"), 0)),
                crate::growth::Level::Count(n) => format!("{n} tunnels"),
            };
            (key, header)
        })
        .filter(|(key, _)| {
            store
                .median(&format!("growth/tunnels/{key}/tunnels"), p)
                .is_finite()
        })
        .collect();
    let mut rows = vec![
        ratio_row("tunnels held", "tunnels", 0),
        ratio_row("RSS with the tunnels open (MiB)", "rss", 1),
        ratio_row("RSS per tunnel (KiB)", "kib_per_tunnel", 2),
        level_row("proxy file descriptors per tunnel", "fds_per_tunnel", 2),
    ];
    rows.extend(burst_rows());
    rows.push(level_row("RSS after the bursts (MiB)", "rss_after", 1));
    let mut raw = level_table(
        out,
        store,
        "growth/tunnels",
        "growth",
        &levels,
        &to_first(&levels),
        &rows,
    );
    for note in &store.growth_notes {
        let _ = writeln!(out, "- {note}");
    }
    if !store.growth_notes.is_empty() {
        out.push('\n');
    }
    let _ = writeln!(
        out,
        "**Rules.** A freshly started portcullis per rule count, on the bench config with that \
         many `[[rule]]` tables: all but the last generated, one distinct pattern each, a \
         quarter each exact names elsewhere (`host-N.corp-M.example.net`), `*.suffix` \
         wildcards elsewhere (`*.svc-N.tenant-M.example.com`), exact names beside the bench's \
         hosts (`gw-N.bench.amazonappstream.com`) and wildcards under its domain \
         (`*.region-N.amazonappstream.com`), and the bench's own `*.amazonappstream.com` \
         last, so the host every cycle names is looked up at each of its suffix lengths and \
         matched by the last rule. RSS is read 0.5 s after the start (after one cycle). \
         `--check` is the wall time of `portcullis --config FILE --check` (a whole process: \
         start, read, parse, validate, compile; median of {CHECKS}), then of a copy in which \
         every rule names port \"0\", so it reports one problem (with its line) per rule. A \
         reload is SIGHUP to the \
         running proxy, timed to the timestamp of its `config reloaded` log line (median of \
         {RELOADS}), with the proxy's CPU over it. The per-rule rows are (figure − the first \
         level's) ÷ (rules − the first level's): flat when the growth is linear.\n"
    );
    let levels: Vec<(String, String)> = args
        .growth_rules
        .iter()
        .map(|n| (n.to_string(), format!("{n} rules")))
        .collect();
    let mut rows = vec![
        ratio_row("rules", "rules", 0),
        ratio_row("RSS at start (MiB)", "rss", 1),
        level_row("RSS per rule over the first level (KiB)", "rss_per_rule", 2),
        ratio_row("`--check` wall time (ms)", "check", 1),
        level_row(
            "`--check` time per rule over the first level (µs)",
            "check_per_rule",
            2,
        ),
        ratio_row(
            "`--check`, every rule with port \"0\" (a problem per rule) (ms)",
            "check_invalid",
            1,
        ),
        level_row(
            "the same, per rule over the first level (µs)",
            "check_invalid_per_rule",
            2,
        ),
        ratio_row("SIGHUP to `config reloaded` (ms)", "reload", 1),
        ratio_row("proxy CPU per reload (ms)", "reload_cpu", 1),
        level_row(
            "reload CPU per rule over the first level (µs)",
            "reload_per_rule",
            2,
        ),
    ];
    rows.extend(burst_rows());
    raw.extend(level_table(
        out,
        store,
        "growth/rules",
        "growth",
        &levels,
        &to_first(&levels),
        &rows,
    ));
    raw
}

/// The streaming section: every peer in columns, then its own targets. Returns the rows for
/// the raw values.
fn stream_section(out: &mut String, store: &Store, peers: &[Kind], args: &RunArgs) -> Vec<Row> {
    use crate::stream::{FPS, FRAME, LATE};
    let prime = args.stream_prime_kib;
    let frames = args.stream_tunnels as f64 * f64::from(FPS) * args.stream_duration;
    let _ = writeln!(
        out,
        "## Streaming frames\n\n\
         The load an AppStream fleet really puts on its egress proxy: many long-lived tunnels, \
         each carrying small frames at a steady rate. Every tunnel opens as in the set-up \
         figure (CONNECT, 200, ClientHello echoed), then carries {prime} KiB each way so \
         it is past any per-tunnel warm-up (portcullis moves a direction to `splice(2)` after \
         256 KiB), then sends a {FRAME}-byte frame (a TLS application-data record carrying a \
         sequence number and its send time) {FPS} times a second from a random phase, to the \
         echo origin; the load generator times every frame's round trip. portcullis keeps its \
         default `sni = \"enforce\"`: it checks the ClientHello and relays the bytes after it \
         unread. Counted: frames sent inside the window and echoed back. RTT percentiles are \
         over every counted frame of a run (about {frames:.0} per run here, so p99.9 is the \
         {tail:.0}th slowest), then the median over runs; the RTT added is the peer's \
         percentile minus direct's in the same run. Proxy CPU per frame is per round trip (two \
         relayed frames, one each way): the run time of the proxy's threads from \
         `/proc/<pid>/task/*/schedstat` over the window, the kernel part from `stat`'s \
         user/system split; wake-ups are the times a proxy thread was put on a CPU, and the \
         run-queue wait is how long its threads were runnable but waited for a core. \
         A frame back after more than {late} ms (three frame times) is late; one not back 2 s \
         after the window is lost.\n\n\
         The load generator (one tokio runtime, 2 worker threads, one task per tunnel) and \
         the origin share the cores with the proxy, so their CPU is shown, with the whole \
         machine's busy cores from `/proc/stat` (every process on the machine, this \
         benchmark's or not; tick-sampled, so what is left after the proxy, the load \
         generator and the origin is good to about ±0.2 core: enough to see a neighbour's \
         build) and the time the host stole from this machine's virtual CPUs. Direct is the \
         floor this load generator can measure: its RTT must stay well below the proxies'. \
         At p50 it does; the tail (p99, p99.9) of every peer, direct included, also carries \
         stalls of milliseconds from scheduling on 2 shared virtual cores (a woken thread \
         waiting for a core, a virtual CPU descheduled by the host), which vary from run to \
         run, so tail differences between peers smaller than direct's own tail are not \
         resolved. The load generator's timer fires on whole milliseconds, so frames leave \
         in small batches, and its send lateness includes up to 1 ms of rounding.\n",
        tail = frames / 1000.0,
        late = LATE.as_millis(),
    );
    let rows = vec![
        row("tunnels streaming", "stream/tunnels", 0),
        row(
            format!("frames/s offered (tunnels × {FPS})"),
            "stream/offered",
            0,
        ),
        row("frames/s sent by the load generator", "stream/sent_rate", 0),
        row("frames/s achieved (sent and echoed)", "stream/rate", 0),
        row("RTT p50 (µs)", "stream/p50", 0),
        row("RTT p99 (µs)", "stream/p99", 0),
        row("RTT p99.9 (µs)", "stream/p999", 0),
        row("RTT max (µs)", "stream/max", 0),
        row("RTT added over direct, p50 (µs)", "stream/added_p50", 0),
        row("RTT added over direct, p99 (µs)", "stream/added_p99", 0),
        row("RTT added over direct, p99.9 (µs)", "stream/added_p999", 0),
        row("proxy CPU per frame round trip (µs)", "stream/cpu", 2),
        row("of which kernel (µs)", "stream/sys", 2),
        row("proxy cores used", "stream/cores", 3),
        row("proxy wake-ups per frame round trip", "stream/slices", 2),
        row("proxy run-queue wait per frame (µs)", "stream/wait", 1),
        row("load generator cores used", "stream/client_cores", 3),
        row("load generator CPU per frame (µs)", "stream/client_us", 2),
        row(
            "load generator run-queue wait per frame (µs)",
            "stream/client_wait",
            1,
        ),
        row("origin cores used", "stream/origin_cores", 3),
        row(
            "kernel CPU of the two ends (load generator + origin) per round trip (µs)",
            "stream/ends_sys",
            2,
        ),
        row(
            "machine busy cores (all processes)",
            "stream/machine_cores",
            2,
        ),
        row(
            "cores stolen by the host (virtual machine)",
            "stream/steal_cores",
            3,
        ),
        row(
            "busy or stolen, not the proxy, load generator or origin (±0.2)",
            "stream/other_cores",
            2,
        ),
        row(
            "load generator send lateness p99 (µs)",
            "stream/send_late_p99",
            0,
        ),
        Row {
            sum: true,
            ..row("frames lost (all runs)", "stream/lost", 0)
        },
        Row {
            sum: true,
            ..row(
                format!("frames late, over {} ms (all runs)", LATE.as_millis()),
                "stream/late",
                0,
            )
        },
        Row {
            sum: true,
            ..row(
                "ticks the load generator skipped (all runs)",
                "stream/skipped",
                0,
            )
        },
        Row {
            sum: true,
            ..row("broken tunnels (all runs)", "stream/broken", 0)
        },
    ];
    table(out, store, peers, &rows);

    out.push_str(
        "The streaming targets of issue #16, for portcullis and for the floor, are in \
         \"Against issue #16's ratio targets, with the floor\" below.\n\n",
    );
    stream_floor(out, store);
    rows.into_iter()
        .map(|r| Row {
            label: format!("stream: {}", r.label),
            ..r
        })
        .collect()
}

/// Says how the CPU target compares with the kernel's price for a round trip: what the two
/// ends of a direct connection spend in the kernel for the same frames, which a proxy (a
/// read and a write each way, the same system calls) cannot go below.
fn stream_floor(out: &mut String, store: &Store) {
    let m = |key: &str, peer: Kind| store.median(key, peer.name());
    let floor = m("stream/ends_sys", Kind::Direct);
    let target = 0.4 * m("stream/cpu", Kind::Squid);
    if !(floor.is_finite() && target.is_finite()) {
        return;
    }
    let _ = writeln!(
        out,
        "The kernel's floor for a frame round trip: with no proxy, the load generator and the \
         origin spent {} µs in the kernel per round trip between them (a write and a read \
         at each end; a relaying proxy makes the same calls, a read and a write each way). \
         0.4× Squid's CPU is {} µs: {} the floor. portcullis' kernel time was {} µs, {} the \
         floor; Squid's {} µs, {}.\n",
        fmt(floor, 2),
        fmt(target, 2),
        ratio(target, floor),
        fmt(m("stream/sys", Kind::Portcullis), 2),
        ratio(m("stream/sys", Kind::Portcullis), floor),
        fmt(m("stream/sys", Kind::Squid), 2),
        ratio(m("stream/sys", Kind::Squid), floor),
    );
}

/// One of issue #16's targets: a ratio between peers of one run, for a proxy `of` it.
struct RatioTarget<'a> {
    what: &'static str,
    of: Box<dyn Fn(Kind) -> f64 + 'a>,
    ok: fn(f64) -> bool,
}

/// Issue #16's targets, each for portcullis and for the floor relay: where the floor misses
/// a target too, what is left of it is below what this design can do on this machine.
fn ratio_targets(out: &mut String, store: &Store) {
    let m = |key: &str, peer: Kind| store.median(key, peer.name());
    let over = |key: &'static str, base: Kind| {
        Box::new(move |k: Kind| m(key, k) / m(key, base)) as Box<dyn Fn(Kind) -> f64 + '_>
    };
    let added = |key: &'static str| {
        Box::new(move |k: Kind| {
            (m(key, k) - m(key, Kind::Direct)) / (m(key, Kind::Squid) - m(key, Kind::Direct))
        }) as Box<dyn Fn(Kind) -> f64 + '_>
    };
    let targets = [
        RatioTarget {
            what: "proxy CPU per tunnel set up ÷ Squid's (c=64) ≤ 0.45",
            of: over("cpu_tunnel/c64", Kind::Squid),
            ok: |v| v <= 0.45,
        },
        RatioTarget {
            what: "set-up rate ÷ tinyproxy's (c=64) ≥ 2",
            of: over("rate/c64", Kind::Tinyproxy),
            ok: |v| v >= 2.0,
        },
        RatioTarget {
            what: "set-up latency added over direct ÷ Squid's added (p50, c=1) ≤ 0.4",
            of: added("p50/c1"),
            ok: |v| v <= 0.4,
        },
        RatioTarget {
            what: "1 tunnel's throughput ÷ direct's, upload ≥ 0.85",
            of: over("tput/up1", Kind::Direct),
            ok: |v| v >= 0.85,
        },
        RatioTarget {
            what: "1 tunnel's throughput ÷ direct's, download ≥ 0.85",
            of: over("tput/down1", Kind::Direct),
            ok: |v| v >= 0.85,
        },
        RatioTarget {
            what: "proxy CPU per GiB ÷ Squid's, 1 tunnel upload ≤ 0.15",
            of: over("cpu_gib/up1", Kind::Squid),
            ok: |v| v <= 0.15,
        },
        RatioTarget {
            what: "proxy CPU per GiB ÷ Squid's, 1 tunnel download ≤ 0.15",
            of: over("cpu_gib/down1", Kind::Squid),
            ok: |v| v <= 0.15,
        },
        RatioTarget {
            what: "streaming: RTT added p99 ÷ Squid's ≤ 0.5",
            of: over("stream/added_p99", Kind::Squid),
            ok: |v| v <= 0.5,
        },
        RatioTarget {
            what: "streaming: RTT p99.9 ÷ Squid's < 1",
            of: over("stream/p999", Kind::Squid),
            ok: |v| v < 1.0,
        },
        RatioTarget {
            what: "streaming: proxy CPU per frame ÷ Squid's ≤ 0.4",
            of: over("stream/cpu", Kind::Squid),
            ok: |v| v <= 0.4,
        },
    ];
    out.push_str(
        "## Against issue #16's ratio targets, with the floor\n\n\
         Each target as the ratio it is set as, for portcullis and for the bare relay (the \
         floor: the least a proxy of portcullis' design does, see Method). Where the floor \
         misses a target too, what is left of it is below what a proxy built this way can do \
         on this machine. The floor takes no part in the idle-tunnel figures.\n\n\
         | target (#16) | portcullis | bare relay (floor) | verdict |\n|---|---:|---:|---|\n",
    );
    for t in &targets {
        let ours = (t.of)(Kind::Portcullis);
        let floor = (t.of)(Kind::Floor);
        let verdict = match (check(ours, t.ok), check(floor, t.ok)) {
            (None, _) => "not measured",
            (Some(true), _) => "met",
            (Some(false), Some(false)) => "**missed**; the floor misses it too",
            (Some(false), _) => "**missed**",
        };
        // Each value is already a ratio: `ratio(v, 1.0)` formats it, or "—" when not measured.
        let show = |v: f64| ratio(v, 1.0);
        let _ = writeln!(
            out,
            "| {} | {} | {} | {verdict} |",
            t.what,
            show(ours),
            show(floor)
        );
    }
    out.push('\n');
}
