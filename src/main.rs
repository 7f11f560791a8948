//! The `portcullis` binary: command line, logging, signals, exit codes. Everything else lives
//! in the library, behind [`portcullis::Proxy`].

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{CommandFactory, Parser, Subcommand, ValueEnum};
use portcullis::explain::RangesInUse;
use portcullis::reload::Reloader;
use portcullis::state::Runtime;
use portcullis::telemetry::log_format::JsonLines;
use portcullis::telemetry::log_writer::{FlushGuard, batch_writer};
use portcullis::upgrade::{Relaunch, Takeover};
use portcullis::{Config, Listeners, Proxy};
use tokio::signal::unix::{SignalKind, signal};
use tracing_subscriber::EnvFilter;

/// An HTTP CONNECT egress proxy for Amazon AppStream 2.0.
#[derive(Parser)]
#[command(version, about)]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,
    /// Config file; without it, the embedded AppStream profile.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Validate the config, print problems with line numbers, exit 0 or 1.
    #[arg(long, requires = "config")]
    check: bool,
    /// Print the embedded default config and exit.
    #[arg(long, conflicts_with_all = ["config", "check"])]
    print_default_config: bool,
    /// Log format on stdout. Default: text on a terminal, JSON lines otherwise (a pipe, the
    /// journal, a container runtime), so a person reads lines and a collector parses them.
    #[arg(long, value_enum, env = "PORTCULLIS_LOG_FORMAT")]
    log_format: Option<LogFormat>,
}

#[derive(Subcommand)]
enum Command {
    /// Would a CONNECT to HOST:PORT pass, and why. Exit 0: allowed; 1: refused; 2: error.
    Explain(ExplainArgs),
    /// Probe a running proxy's admin listener (a container HEALTHCHECK). Exit 0: it answered
    /// 200; 1: anything else, with one line saying why.
    Healthcheck(HealthcheckArgs),
}

#[derive(clap::Args)]
struct ExplainArgs {
    /// The CONNECT target, e.g. gw.amazonappstream.com:443.
    #[arg(value_name = "HOST:PORT")]
    target: String,
    /// Config file; without it, the embedded AppStream profile.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Send no DNS query: judge by the rules alone (`[dns] hosts` answers are still used).
    #[arg(long)]
    no_resolve: bool,
}

#[derive(clap::Args)]
struct HealthcheckArgs {
    /// The config the proxy runs with: its `[admin] listen` is probed, on loopback when it is
    /// 0.0.0.0 or [::]. Only that key is read. Without it, the embedded profile's 127.0.0.1:9090.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Probe the admin listener at this address instead of the config's.
    #[arg(long, value_name = "HOST:PORT", conflicts_with_all = ["config", "url"])]
    admin: Option<String>,
    /// GET this http:// URL as given instead.
    #[arg(long, value_name = "URL", conflicts_with_all = ["config", "ready"])]
    url: Option<String>,
    /// GET /readyz instead of /healthz, so a draining proxy (503) fails the check too.
    #[arg(long)]
    ready: bool,
    /// For the whole probe: connect, request, status line (e.g. 500ms, 2s).
    // 2s: below the image's HEALTHCHECK --timeout=3s, so the probe says why before the
    // runtime gives up on it.
    #[arg(long, value_name = "DURATION", value_parser = timeout, default_value = "2s")]
    timeout: std::time::Duration,
}

fn timeout(s: &str) -> Result<std::time::Duration, String> {
    match portcullis::config::parse_duration(s) {
        Some(d) if !d.is_zero() => Ok(d),
        _ => Err(format!("{s:?} is not a duration like 500ms or 2s")),
    }
}

/// `explain`'s exit code for a config it cannot use (as clap's for a usage error).
const EXIT_ERROR: u8 = 2;

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    /// One JSON object per line.
    Json,
    /// Human-readable text.
    Text,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if args.command.is_some() && (args.check || args.print_default_config) {
        Args::command()
            .error(
                clap::error::ErrorKind::ArgumentConflict,
                "--check and --print-default-config do not go with a subcommand",
            )
            .exit();
    }
    match args.command {
        Some(Command::Explain(explain_args)) => {
            let config = explain_args.config.clone().or(args.config);
            return explain(explain_args, config);
        }
        Some(Command::Healthcheck(mut healthcheck_args)) => {
            if healthcheck_args.admin.is_none() && healthcheck_args.url.is_none() {
                healthcheck_args.config = healthcheck_args.config.or(args.config);
            }
            return healthcheck(healthcheck_args);
        }
        None => {}
    }
    if args.print_default_config {
        print!("{}", portcullis::config::DEFAULT_CONFIG);
        return ExitCode::SUCCESS;
    }
    let config = match &args.config {
        Some(path) => Config::load(path),
        None => Ok(Config::embedded()),
    };
    if args.check {
        return check(config);
    }
    let config = match config {
        Ok(config) => config,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let format = args.log_format.unwrap_or_else(|| {
        if std::io::stdout().is_terminal() {
            LogFormat::Text
        } else {
            LogFormat::Json
        }
    });
    let _log_guard = init_logging(format);
    let relaunch = portcullis::upgrade::Relaunch::this_process();
    // Worker 0: the other workers get runtimes of their own (see `portcullis::workers`).
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("the tokio runtime starts");
    match runtime.block_on(serve(config, args.config, relaunch)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("portcullis: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn check(config: Result<Config, portcullis::config::ConfigError>) -> ExitCode {
    match config {
        Ok(config) => {
            println!(
                "{}: ok ({} rules)",
                config.source,
                config.rules.rules().len()
            );
            if let Some(ranges) = &config.aws_ip_ranges {
                println!("aws_ip_ranges: {}", ranges.summary());
            }
            if let Some(refresh) = &config.ip_ranges_refresh {
                println!(
                    "aws_ip_ranges: refreshed from {} every {:?}",
                    refresh.url.uri, refresh.every
                );
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            println!("{e}");
            ExitCode::FAILURE
        }
    }
}

/// `portcullis explain`: prints the explanation; exit 0 allowed, 1 refused, 2 when the config
/// cannot be loaded or its resolver built.
fn explain(args: ExplainArgs, config: Option<PathBuf>) -> ExitCode {
    let config = match &config {
        Some(path) => Config::load(path),
        None => Ok(Config::embedded()),
    };
    let config = match config {
        Ok(config) => config,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(EXIT_ERROR);
        }
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("the tokio runtime starts");
    let explained = runtime.block_on(async {
        let ranges = RangesInUse::from_config(&config);
        let runtime = Runtime::new(config)?;
        let explanation =
            portcullis::explain::explain(&runtime, &ranges, &args.target, !args.no_resolve).await;
        Ok::<_, String>(explanation)
    });
    match explained {
        Ok(explanation) => {
            print!("{explanation}");
            if explanation.allowed {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("portcullis explain: {e}");
            ExitCode::from(EXIT_ERROR)
        }
    }
}

/// `portcullis healthcheck`: one line on stdout when healthy, on stderr when not. Every failure
/// exits 1, a config it cannot read too: Docker reserves 2, and a probe has only two answers.
fn healthcheck(args: HealthcheckArgs) -> ExitCode {
    use portcullis::admin::healthcheck::{Check, Probe};
    let check = if args.ready {
        Check::Ready
    } else {
        Check::Live
    };
    let probe = if let Some(url) = &args.url {
        Probe::url(url, args.timeout)
    } else if let Some(admin) = &args.admin {
        Ok(Probe::address(admin, check, args.timeout))
    } else {
        let (text, source) = match &args.config {
            Some(path) => (
                std::fs::read_to_string(path)
                    .map_err(|e| format!("{}: cannot read: {e}", path.display())),
                path.display().to_string(),
            ),
            None => (
                Ok(portcullis::config::DEFAULT_CONFIG.to_string()),
                "<embedded default>".to_string(),
            ),
        };
        text.and_then(|text| Config::admin_listen(&text).map_err(|e| format!("{source}: {e}")))
            .and_then(|listen| {
                listen.ok_or_else(|| format!("{source}: [admin] listen is off: nothing to probe"))
            })
            .map(|listen| Probe::admin(listen, check, args.timeout))
    };
    let probe = match probe {
        Ok(probe) => probe,
        Err(e) => {
            eprintln!("portcullis healthcheck: {e}");
            return ExitCode::FAILURE;
        }
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("the tokio runtime starts");
    let outcome = runtime.block_on(probe.run());
    // A name lookup still running after the timeout must not hold the exit.
    runtime.shutdown_background();
    if outcome.healthy {
        println!("{}", outcome.message);
        ExitCode::SUCCESS
    } else {
        eprintln!("portcullis healthcheck: {}", outcome.message);
        ExitCode::FAILURE
    }
}

/// Logs go to stdout through [`batch_writer`]: a slow or closed stdout never stalls the data
/// path, and a log line never wakes another thread.
fn init_logging(format: LogFormat) -> FlushGuard {
    let (writer, guard) = batch_writer(std::io::stdout());
    let filter =
        EnvFilter::try_from_env("PORTCULLIS_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    match format {
        LogFormat::Json => builder.event_format(JsonLines).init(),
        LogFormat::Text => builder.init(),
    }
    guard
}

async fn serve(
    config: Config,
    path: Option<PathBuf>,
    relaunch: Option<Relaunch>,
) -> anyhow::Result<()> {
    // Started by SIGUSR2 in a running portcullis: the config has loaded, so say so and take
    // its listening sockets.
    let mut takeover = match Takeover::begin() {
        Some(begun) => Some(begun.context("upgrade: cannot reach the process being replaced")?),
        None => None,
    };
    let listeners = Listeners::inherit(&config, takeover.as_mut()).await?;
    let addrs: Vec<String> = listeners
        .proxy
        .iter()
        .filter_map(|l| l.local_addr().ok().map(|a| a.to_string()))
        .collect();
    let admin = listeners
        .admin
        .as_ref()
        .and_then(|l| l.local_addr().ok())
        .map_or_else(|| "off".to_string(), |a| a.to_string());
    let watch = config.proxy.watch_config;
    let proxy = Proxy::new(config).map_err(anyhow::Error::msg)?;
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        listen = %addrs.join(" "),
        admin = %admin,
        upgraded = takeover.is_some(),
        "portcullis serving"
    );
    let mut hangup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    let reloader = path.map(|path| {
        let loaded = std::fs::read(&path).ok();
        Reloader::new(path, proxy.clone(), loaded)
    });
    if let Some(reloader) = reloader.clone().filter(|_| watch) {
        tokio::spawn(reloader.watch(portcullis::reload::WATCH_INTERVAL));
    }
    // A reload and an upgrade never overlap: SIGUSR2 during a reload waits for it, and the
    // new process reads the config file as it is then.
    let one_at_a_time = std::sync::Arc::new(tokio::sync::Mutex::new(()));
    let reloading = one_at_a_time.clone();
    tokio::spawn(async move {
        while hangup.recv().await.is_some() {
            let _held = reloading.lock().await;
            match &reloader {
                Some(reloader) => {
                    let _ = reloader.reload().await;
                }
                None => tracing::info!("SIGHUP: running on the embedded config; nothing to reload"),
            }
        }
    });
    let mut user2 =
        signal(SignalKind::user_defined2()).context("installing the SIGUSR2 handler")?;
    let upgrading = proxy.clone();
    tokio::spawn(async move {
        while user2.recv().await.is_some() {
            let Some(relaunch) = &relaunch else {
                tracing::error!("SIGUSR2: this process's own path is unknown; cannot upgrade");
                continue;
            };
            tracing::info!("SIGUSR2: upgrading in place");
            let Ok(_held) = one_at_a_time.try_lock() else {
                // Reload in progress: wait for it, then upgrade.
                let _held = one_at_a_time.lock().await;
                let _ = upgrading.upgrade(relaunch).await;
                continue;
            };
            let _ = upgrading.upgrade(relaunch).await;
        }
    });
    proxy
        .run_upgradable(listeners, termination().await?, takeover)
        .await;
    Ok(())
}

/// Resolves on the first SIGTERM or SIGINT; a second one exits at once.
async fn termination() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::info!("shutting down: draining; a second signal exits at once");
        tokio::spawn(async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            tracing::warn!("second signal: exiting without waiting for the drain");
            std::process::exit(1);
        });
    })
}
