//! TOML into typed, validated, immutable config.
//!
//! Parsing is strict (`deny_unknown_fields`: a typo must not silently become a default), and
//! [`Config::parse`] reports every problem at once, each with the line it came from, so an
//! operator fixes a file in one pass. A reload builds a whole new `Config` the same way and
//! swaps it in; nothing mutates a config after it is built.
//!
//! Three parts, kept apart: [`raw`] is the file's shape as serde reads it, [`validate`] turns
//! that into the types here (checking values, filling defaults, loading the files a config
//! names), and this module holds the validated types the rest of the proxy reads.

mod raw;
mod validate;

use raw::RawConfig;
pub use validate::parse_duration;
use validate::{Problems, admin_listen_or_off, default_admin_listen};

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;

use crate::auth::UsersFile;
use crate::ip_ranges::IpRanges;
use crate::ip_ranges::fetch::Url;
use crate::net::keepalive::KeepAlive;
use crate::rules::{DomainLabel, RuleSet};

use crate::tls::TlsListener;

/// The AppStream profile, compiled in so a bare `portcullis` is useful.
pub const DEFAULT_CONFIG: &str = include_str!("../../config/portcullis.toml");

/// A loaded config. Cheap to share behind an `Arc`; never changed once built.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where it came from, for messages: a path or `<embedded default>`.
    pub source: String,
    pub proxy: ProxyConfig,
    pub admin: AdminConfig,
    pub dns: DnsConfig,
    /// `[clients] allow`: source networks that may use the proxy.
    pub clients_allow: Vec<IpNet>,
    /// `[proxy_protocol] trusted`: sources (load balancers) whose connections may begin with a
    /// PROXY header naming the real client. Empty: nobody's header is believed.
    pub proxy_protocol_trusted: Vec<IpNet>,
    /// `[clients] allow_cert_names`: when set, clients of a mutual-TLS listener must present a
    /// certificate whose name (first DNS SAN, else CN) is in this list.
    pub allow_cert_names: Vec<String>,
    /// `[clients] max_tunnels_per_client`: open tunnels per client address; 0 is no limit.
    /// Keeps one runaway or compromised host from taking every connection slot.
    pub max_tunnels_per_client: usize,
    /// `[auth] users_file`, loaded: when present, every request must authenticate.
    pub auth: Option<UsersFile>,
    /// `[aws_ip_ranges] file`, as read when this config was built. Tunnels check against the
    /// live set in [`crate::state::Shared`], which starts from this and which a refresh or a
    /// reload may replace.
    pub aws_ip_ranges: Option<Arc<IpRanges>>,
    /// `[aws_ip_ranges] url` and what goes with it, when the file is kept current.
    pub ip_ranges_refresh: Option<IpRangesRefresh>,
    /// `[destinations] allow`: networks reachable despite the special-purpose deny list.
    pub destinations_allow: Vec<IpNet>,
    pub metrics: MetricsConfig,
    pub rules: RuleSet,
}

/// `[metrics]`.
#[derive(Debug, Clone, PartialEq)]
pub struct MetricsConfig {
    /// Distinct `domain` label values before `_other`.
    pub max_domains: usize,
    /// The two latency histograms per `rule` and `domain` rather than per `rule` alone. Off by
    /// default: every bucket is a series, so at 1,000 domains they are most of a scrape.
    pub domain_histograms: bool,
    /// What `domain` says for rules that do not set their own `domain_label`.
    pub domain_label: DomainLabel,
}

impl Default for MetricsConfig {
    fn default() -> MetricsConfig {
        MetricsConfig {
            max_domains: 1000,
            domain_histograms: false,
            domain_label: DomainLabel::Host,
        }
    }
}

#[derive(Debug, Clone)]
pub struct ProxyConfig {
    pub listen: Vec<SocketAddr>,
    /// `[[proxy.tls]]`: listeners that speak TLS to clients.
    pub tls: Vec<TlsListener>,
    /// Past it a new connection gets 503 and is closed: file descriptors and memory stay bounded.
    pub max_connections: usize,
    /// Bounds how long a client that never finishes its request head (slowloris) holds a slot.
    pub header_timeout: Duration,
    /// DNS plus TCP connect to the origin, all addresses together.
    pub connect_timeout: Duration,
    /// A tunnel with no bytes either way this long is closed. Streaming sessions are never idle
    /// this long, so the default is generous.
    pub idle_timeout: Duration,
    /// How long open tunnels get to finish after SIGTERM.
    pub drain_timeout: Duration,
    /// How long a new process started by SIGUSR2 has to report ready before the upgrade is
    /// called off.
    pub upgrade_timeout: Duration,
    /// Reload when the config file changes (a Kubernetes ConfigMap update), as on SIGHUP.
    pub watch_config: bool,
    /// Event-loop threads; 0 means one per CPU core the process may use. Read at start only.
    pub workers: usize,
    /// Keepalive probes on client and origin sockets, so NAT and load balancers along a quiet
    /// streaming session do not forget it.
    pub tcp_keepalive: KeepAlive,
}

/// Where newer copies of `ip-ranges.json` come from, and where they go.
#[derive(Debug, Clone)]
pub struct IpRangesRefresh {
    pub url: Url,
    /// How often to ask. AWS publishes several times a week; an unchanged file costs a 304.
    pub every: Duration,
    /// Trusted roots: `ca_file` (a private mirror, the tests), else the system's.
    pub tls: Arc<rustls::ClientConfig>,
    /// `[aws_ip_ranges] file`: each accepted copy is written here, so a restart without
    /// network, and a reload, start from it.
    pub file: PathBuf,
}

/// `[aws_ip_ranges] refresh` when `url` is set without it.
pub const DEFAULT_IP_RANGES_REFRESH: Duration = Duration::from_secs(6 * 3600);

#[derive(Debug, Clone, PartialEq)]
pub struct AdminConfig {
    pub listen: Option<SocketAddr>,
    /// `host:port` that `/proxy.pac` tells clients to use.
    pub advertise: String,
    /// Who may see `/`, `/status.json` and `/explain`: they show every client's address and
    /// every refused host, and `/explain` makes DNS lookups on request. The PAC file, probes
    /// and metrics stay open to whoever reaches the admin port.
    pub status_allow: Vec<IpNet>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct DnsConfig {
    /// Empty: the system resolver configuration.
    pub servers: Vec<SocketAddr>,
    pub cache_size: u64,
    /// Static answers, keyed by lowercased name without the trailing dot.
    pub hosts: HashMap<String, Vec<IpAddr>>,
}

/// Every problem found in one config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub source: String,
    pub problems: Vec<Problem>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// 1-based line, when the problem belongs to one place in the file.
    pub line: Option<usize>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, problem) in self.problems.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            match problem.line {
                Some(line) => write!(f, "{}:{}: {}", self.source, line, problem.message)?,
                None => write!(f, "{}: {}", self.source, problem.message)?,
            }
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

impl Config {
    /// May a connection from `source` begin with a PROXY header?
    pub fn trusts_proxy_header(&self, source: IpAddr) -> bool {
        self.proxy_protocol_trusted
            .iter()
            .any(|net| net.contains(&source))
    }

    /// `[clients] allow`.
    pub fn client_allowed(&self, client: IpAddr) -> bool {
        self.clients_allow.iter().any(|net| net.contains(&client))
    }

    /// The embedded AppStream profile.
    pub fn embedded() -> Config {
        Config::parse(DEFAULT_CONFIG, "<embedded default>")
            .expect("the embedded default config is valid (tested)")
    }

    /// `[admin] listen` alone, the rest of the file unread; `Ok(None)` when the admin listener
    /// is off. For `portcullis healthcheck`, which must find a running proxy's admin port even
    /// after its file gained an error elsewhere: the proxy refused that file on reload and
    /// serves on with its old config, so it is still healthy.
    pub fn admin_listen(text: &str) -> Result<Option<SocketAddr>, String> {
        #[derive(Deserialize)]
        struct File {
            #[serde(default)]
            admin: Admin,
        }
        #[derive(Deserialize, Default)]
        struct Admin {
            listen: Option<String>,
        }
        let file: File = toml::from_str(text).map_err(|e| e.message().trim().to_string())?;
        match file.admin.listen.as_deref() {
            None => Ok(Some(default_admin_listen())),
            Some(listen) => admin_listen_or_off(listen),
        }
    }

    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let source = path.display().to_string();
        match std::fs::read_to_string(path) {
            Ok(text) => Config::parse(&text, &source),
            Err(e) => Err(ConfigError {
                source,
                problems: vec![Problem {
                    line: None,
                    message: format!("cannot read: {e}"),
                }],
            }),
        }
    }

    /// Parses and validates; reports every problem, each with its line.
    pub fn parse(text: &str, source: &str) -> Result<Config, ConfigError> {
        let mut problems = Problems::new(text);
        let raw: RawConfig = match toml::from_str(text) {
            Ok(raw) => raw,
            Err(e) => {
                let line = e.span().map(|span| problems.line_of(span.start));
                problems.list.push(Problem {
                    line,
                    message: e.message().trim().to_string(),
                });
                return Err(problems.into_error(source));
            }
        };
        let config = raw.validate(source, &mut problems);
        match config {
            Some(config) if problems.list.is_empty() => Ok(config),
            _ => Err(problems.into_error(source)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_default_is_valid() {
        let config = Config::embedded();
        assert_eq!(config.proxy.listen, vec!["127.0.0.1:3128".parse().unwrap()]);
        assert_eq!(config.admin.advertise, "127.0.0.1:3128");
        assert!(config.rules.rules().iter().any(|r| r.private_endpoint));
    }

    #[test]
    fn admin_listen_alone() {
        let embedded = Config::admin_listen(DEFAULT_CONFIG).unwrap();
        assert_eq!(embedded, Config::embedded().admin.listen);
        assert_eq!(
            Config::admin_listen("").unwrap(),
            Some("127.0.0.1:9090".parse().unwrap())
        );
        assert_eq!(
            Config::admin_listen("[admin]\nlisten = \"\"\n").unwrap(),
            None
        );
        // The rest of the file may be wrong: only the admin address is read.
        let broken = "[proxy]\nlisten = 3\n[admin]\nlisten = \"[::]:9191\"\n[[rule]]\nname = 1\n";
        assert!(Config::parse(broken, "t").is_err());
        assert_eq!(
            Config::admin_listen(broken).unwrap(),
            Some("[::]:9191".parse().unwrap())
        );
        assert!(Config::admin_listen("[admin]\nlisten = \"nowhere\"\n").is_err());
        assert!(Config::admin_listen("[admin\n").is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10s"), Some(Duration::from_secs(10)));
        assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_duration("30m"), Some(Duration::from_secs(1800)));
        assert_eq!(parse_duration("10"), None);
        assert_eq!(parse_duration("s"), None);
        assert_eq!(parse_duration("1.5s"), None);
    }

    #[test]
    fn every_problem_is_reported_with_its_line() {
        let text = "[proxy]\nlisten = [\"nope\"]\nheader_timeout = \"10\"\n\n[[rule]]\nname = \"r\"\ndomains = [\"a..b\"]\nports = [\"0\"]\n";
        let err = Config::parse(text, "t.toml").unwrap_err();
        let lines: Vec<_> = err.problems.iter().map(|p| p.line).collect();
        assert_eq!(lines, vec![Some(2), Some(3), Some(7), Some(8)], "{err}");
        assert!(err.to_string().starts_with("t.toml:2: "));
    }

    #[test]
    fn ip_ranges_url_refresh_and_ca_file() {
        let dir = std::env::temp_dir().join(format!("portcullis-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("ip-ranges.json"),
            r#"{"syncToken": "1", "createDate": "2026-11-01-12-00-00", "prefixes": []}"#,
        )
        .unwrap();
        let rule = "\n[[rule]]\nname = \"r\"\ndomains = [\"a.example.com\"]\nports = [\"443\"]\n";
        let parse = |table: &str| {
            Config::parse(
                &format!("{table}{rule}"),
                &dir.join("t.toml").display().to_string(),
            )
        };

        let config = parse("[aws_ip_ranges]\nfile = \"ip-ranges.json\"\nurl = \"https://ip-ranges.amazonaws.com/ip-ranges.json\"\n").unwrap();
        let refresh = config.ip_ranges_refresh.unwrap();
        assert_eq!(refresh.every, DEFAULT_IP_RANGES_REFRESH);
        assert_eq!(refresh.file, dir.join("ip-ranges.json"));
        let config = parse("[aws_ip_ranges]\nfile = \"ip-ranges.json\"\nurl = \"https://[::1]:8443/x\"\nrefresh = \"250ms\"\n").unwrap();
        assert_eq!(
            config.ip_ranges_refresh.unwrap().every,
            Duration::from_millis(250)
        );
        assert!(
            parse("[aws_ip_ranges]\nfile = \"ip-ranges.json\"\n")
                .unwrap()
                .ip_ranges_refresh
                .is_none()
        );

        let problems = |table: &str| {
            let err = parse(table).unwrap_err();
            err.problems
                .iter()
                .map(|p| (p.line, p.message.clone()))
                .collect::<Vec<_>>()
        };
        let got = problems(
            "[aws_ip_ranges]\nfile = \"ip-ranges.json\"\nurl = \"http://ip-ranges.amazonaws.com/\"\nrefresh = \"6\"\nca_file = \"missing.pem\"\n",
        );
        let lines: Vec<_> = got.iter().map(|(line, _)| *line).collect();
        assert_eq!(lines, vec![Some(3), Some(4), Some(5)], "{got:?}");
        assert!(got[0].1.contains("must start with https://"), "{got:?}");
        assert!(got[2].1.contains("missing.pem"), "{got:?}");
        let got = problems("[aws_ip_ranges]\nurl = \"https://ip-ranges.amazonaws.com/\"\n");
        assert_eq!(got[0].0, Some(2));
        assert!(got[0].1.contains("url needs file"), "{got:?}");
        let got = problems("[aws_ip_ranges]\nfile = \"ip-ranges.json\"\nrefresh = \"1h\"\n");
        assert_eq!(
            got,
            vec![(Some(3), "[aws_ip_ranges] refresh needs url".to_string())]
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn metrics_keys_and_their_defaults() {
        let rule = "[[rule]]\nname = \"r\"\ndomains = [\"*.example.com\"]\nports = [\"443\"]\n";
        let config = Config::parse(rule, "t.toml").unwrap();
        assert_eq!(config.metrics, MetricsConfig::default());
        assert_eq!(config.rules.rules()[0].domain_label, None);
        let text = format!(
            "[metrics]\ndomain_histograms = true\ndomain_label = \"rule_pattern\"\n\n{rule}\
             domain_label = \"host\"\n"
        );
        let config = Config::parse(&text, "t.toml").unwrap();
        assert!(config.metrics.domain_histograms);
        assert_eq!(config.metrics.domain_label, DomainLabel::RulePattern);
        assert_eq!(
            config.rules.rules()[0].domain_label,
            Some(DomainLabel::Host)
        );
    }

    #[test]
    fn a_problem_in_every_rule_is_reported_at_its_line() {
        let rules = 2_000;
        let text: String = (0..rules)
            .map(|i| {
                format!(
                    "[[rule]]\nname = \"r{i}\"\ndomains = [\"h{i}.example.com\"]\nports = [\"0\"]\n\n"
                )
            })
            .collect();
        let err = Config::parse(&text, "t.toml").unwrap_err();
        let lines: Vec<_> = err.problems.iter().map(|p| p.line).collect();
        let expected: Vec<_> = (0..rules).map(|i| Some(i * 5 + 4)).collect();
        assert_eq!(lines, expected);
    }

    #[test]
    fn unknown_keys_are_errors() {
        let err = Config::parse("[proxy]\nlisten_on = []\n", "t.toml").unwrap_err();
        assert_eq!(err.problems[0].line, Some(2), "{err}");
        assert!(err.to_string().contains("listen_on"), "{err}");
    }
}
