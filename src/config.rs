//! TOML into typed, validated, immutable config.
//!
//! Parsing is strict (`deny_unknown_fields`: a typo must not silently become a default), and
//! [`Config::parse`] reports every problem at once, each with the line it came from, so an
//! operator fixes a file in one pass. A reload builds a whole new `Config` the same way and
//! swaps it in; nothing mutates a config after it is built.

use std::cell::OnceCell;
use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;
use toml::Spanned;

use crate::auth::UsersFile;
use crate::ip_ranges::IpRanges;
use crate::ip_ranges::fetch::{self, Url};
use crate::net::keepalive::{KeepAlive, MAX_IDLE};
use crate::rules::{self, Host, Rule, RuleSet, SniMode};
use crate::telemetry::metrics::DomainLabel;
use crate::tls::{self, TlsListener};

/// The AppStream profile, compiled in so a bare `portcullis` is useful.
pub const DEFAULT_CONFIG: &str = include_str!("../config/portcullis.toml");

/// `[admin] listen` when the file does not set it.
fn default_admin_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9090))
}

/// A set `[admin] listen`: an address, or `""` for no admin listener.
fn admin_listen_or_off(s: &str) -> Result<Option<SocketAddr>, String> {
    if s.is_empty() {
        Ok(None)
    } else {
        socket_addr(s, None).map(Some)
    }
}

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

/// Collects problems and turns byte offsets into line numbers.
struct Problems<'a> {
    text: &'a str,
    /// Where the text's newlines are, found once, at the first problem: a line number is then
    /// a binary search. Counting newlines from the top for each problem made a file with a
    /// problem in each of its 10,000 rules take seconds to check (rules × file size).
    newlines: OnceCell<Vec<usize>>,
    list: Vec<Problem>,
}

impl<'a> Problems<'a> {
    fn new(text: &'a str) -> Problems<'a> {
        Problems {
            text,
            newlines: OnceCell::new(),
            list: Vec::new(),
        }
    }

    /// The 1-based line of a byte offset: one more than the newlines before it.
    fn line_of(&self, offset: usize) -> usize {
        let newlines = self.newlines.get_or_init(|| {
            let bytes = self.text.bytes().enumerate();
            bytes
                .filter_map(|(i, b)| (b == b'\n').then_some(i))
                .collect()
        });
        newlines.partition_point(|&at| at < offset) + 1
    }

    fn add<T>(&mut self, at: &Spanned<T>, message: impl Into<String>) {
        let line = Some(self.line_of(at.span().start));
        self.list.push(Problem {
            line,
            message: message.into(),
        });
    }

    fn add_global(&mut self, message: impl Into<String>) {
        self.list.push(Problem {
            line: None,
            message: message.into(),
        });
    }

    /// Runs a parser on a spanned value, recording its error at the value's line.
    fn check<T, U>(
        &mut self,
        value: &Spanned<T>,
        parse: impl FnOnce(&T) -> Result<U, String>,
    ) -> Option<U> {
        match parse(value.get_ref()) {
            Ok(parsed) => Some(parsed),
            Err(message) => {
                self.add(value, message);
                None
            }
        }
    }

    fn into_error(self, source: &str) -> ConfigError {
        ConfigError {
            source: source.to_string(),
            problems: self.list,
        }
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    proxy: RawProxy,
    #[serde(default)]
    admin: RawAdmin,
    #[serde(default)]
    dns: RawDns,
    #[serde(default)]
    clients: RawClients,
    #[serde(default)]
    proxy_protocol: RawProxyProtocol,
    #[serde(default)]
    auth: RawAuth,
    #[serde(default)]
    aws_ip_ranges: RawIpRanges,
    #[serde(default)]
    destinations: RawNets,
    #[serde(default)]
    metrics: RawMetrics,
    #[serde(default, rename = "rule")]
    rules: Vec<RawRule>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawProxy {
    listen: Option<Vec<Spanned<String>>>,
    max_connections: Option<Spanned<i64>>,
    header_timeout: Option<Spanned<String>>,
    connect_timeout: Option<Spanned<String>>,
    idle_timeout: Option<Spanned<String>>,
    drain_timeout: Option<Spanned<String>>,
    upgrade_timeout: Option<Spanned<String>>,
    watch_config: Option<bool>,
    workers: Option<Spanned<i64>>,
    tcp_keepalive: Option<Spanned<String>>,
    #[serde(default)]
    tls: Vec<RawTls>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    listen: Spanned<String>,
    cert: Spanned<String>,
    key: Spanned<String>,
    client_ca: Option<Spanned<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    /// An empty string turns the admin listener off.
    listen: Option<Spanned<String>>,
    advertise: Option<Spanned<String>>,
    status_allow: Option<Vec<Spanned<String>>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawDns {
    #[serde(default)]
    servers: Vec<Spanned<String>>,
    cache_size: Option<Spanned<i64>>,
    #[serde(default)]
    hosts: HashMap<String, Spanned<Vec<Spanned<String>>>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawNets {
    allow: Option<Vec<Spanned<String>>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawClients {
    allow: Option<Vec<Spanned<String>>>,
    #[serde(default)]
    allow_cert_names: Vec<String>,
    max_tunnels_per_client: Option<Spanned<i64>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawProxyProtocol {
    #[serde(default)]
    trusted: Vec<Spanned<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawIpRanges {
    file: Option<Spanned<String>>,
    url: Option<Spanned<String>>,
    refresh: Option<Spanned<String>>,
    ca_file: Option<Spanned<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawAuth {
    users_file: Option<Spanned<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawMetrics {
    max_domains: Option<Spanned<i64>>,
    domain_histograms: Option<bool>,
    domain_label: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    name: Spanned<String>,
    domains: Spanned<Vec<Spanned<String>>>,
    ports: Spanned<Vec<Spanned<String>>>,
    #[serde(default)]
    private_endpoint: bool,
    sni: Option<Spanned<String>>,
    #[serde(default)]
    require_ip_ranges: Vec<Spanned<String>>,
    domain_label: Option<Spanned<String>>,
}

impl RawConfig {
    fn validate(self, source: &str, p: &mut Problems<'_>) -> Option<Config> {
        let base = Path::new(source).parent().unwrap_or(Path::new(""));
        let proxy = self.proxy.validate(base, p);
        let admin = self.admin.validate(proxy.as_ref(), p);
        let dns = self.dns.validate(p);
        let clients_allow = nets(self.clients.allow, &["0.0.0.0/0", "::/0"], p);
        let proxy_protocol_trusted = nets(Some(self.proxy_protocol.trusted), &[], p);
        let max_tunnels_per_client = self
            .clients
            .max_tunnels_per_client
            .as_ref()
            .map_or(Some(0), |v| {
                p.check(v, |&n| non_negative(n, "max_tunnels_per_client"))
            });
        let auth = match &self.auth.users_file {
            None => Some(None),
            Some(file) => p
                .check(file, |name| UsersFile::load(&base.join(name)))
                .map(Some),
        };
        let aws_ip_ranges = match &self.aws_ip_ranges.file {
            None => Some(None),
            Some(file) => p
                .check(file, |name| IpRanges::load(&base.join(name)).map(Arc::new))
                .map(Some),
        };
        let ip_ranges_refresh = self.aws_ip_ranges.refresh(base, p);
        let destinations_allow = nets(self.destinations.allow, &[], p);
        let metrics = self.metrics.validate(p);
        let rules = validate_rules(
            self.rules,
            aws_ip_ranges.as_ref().and_then(Option::as_deref),
            p,
        );
        Some(Config {
            source: source.to_string(),
            proxy: proxy?,
            admin: admin?,
            dns: dns?,
            clients_allow,
            proxy_protocol_trusted,
            allow_cert_names: self
                .clients
                .allow_cert_names
                .iter()
                .map(|n| n.to_ascii_lowercase())
                .collect(),
            max_tunnels_per_client: max_tunnels_per_client?,
            auth: auth?,
            aws_ip_ranges: aws_ip_ranges?,
            ip_ranges_refresh: ip_ranges_refresh?,
            destinations_allow,
            metrics: metrics?,
            rules: rules?,
        })
    }
}

impl RawMetrics {
    fn validate(&self, p: &mut Problems<'_>) -> Option<MetricsConfig> {
        let defaults = MetricsConfig::default();
        let max_domains = self
            .max_domains
            .as_ref()
            .map_or(Some(defaults.max_domains), |v| {
                p.check(v, |&n| positive(n, "max_domains"))
            });
        let domain_label = self
            .domain_label
            .as_ref()
            .map_or(Some(defaults.domain_label), |v| {
                p.check(v, |s| domain_label(s))
            });
        Some(MetricsConfig {
            max_domains: max_domains?,
            domain_histograms: self.domain_histograms.unwrap_or(defaults.domain_histograms),
            domain_label: domain_label?,
        })
    }
}

fn domain_label(s: &str) -> Result<DomainLabel, String> {
    DomainLabel::parse(s)
        .ok_or_else(|| format!("domain_label {s:?} must be \"host\" or \"rule_pattern\""))
}

impl RawIpRanges {
    /// `url`, `refresh` and `ca_file`. With `url`, `file` must still name an existing, valid
    /// file, loaded as without `url`: the proxy serves from it at once, and the refresher
    /// (which asks at start, then every `refresh`) brings it current. Fetching before serving
    /// instead would make a start depend on the network and on AWS, which is the failure the
    /// file on disk exists to ride out.
    fn refresh(&self, base: &Path, p: &mut Problems<'_>) -> Option<Option<IpRangesRefresh>> {
        let Some(url) = &self.url else {
            for (key, value) in [("refresh", &self.refresh), ("ca_file", &self.ca_file)] {
                if let Some(value) = value {
                    p.add(value, format!("[aws_ip_ranges] {key} needs url"));
                }
            }
            return Some(None);
        };
        let parsed = p.check(url, |s| Url::parse(s));
        if self.file.is_none() {
            p.add(
                url,
                "[aws_ip_ranges] url needs file: where the last good copy is kept",
            );
        }
        let every = self
            .refresh
            .as_ref()
            .map_or(Some(DEFAULT_IP_RANGES_REFRESH), |v| {
                p.check(v, |s| positive_duration(s))
            });
        let tls = match &self.ca_file {
            Some(ca) => p.check(ca, |name| fetch::client_config(Some(&base.join(name)))),
            None => p.check(url, |_| fetch::client_config(None)),
        };
        Some(Some(IpRangesRefresh {
            url: parsed?,
            every: every?,
            tls: tls?,
            file: base.join(self.file.as_ref()?.get_ref()),
        }))
    }
}

impl RawProxy {
    fn validate(self, base: &Path, p: &mut Problems<'_>) -> Option<ProxyConfig> {
        let tls: Vec<TlsListener> = self
            .tls
            .iter()
            .filter_map(|t| t.validate(base, p))
            .collect();
        let listen = match self.listen {
            None => vec!["127.0.0.1:3128".parse().expect("valid literal")],
            Some(list) => {
                if list.is_empty() {
                    p.add_global("[proxy] listen needs at least one address");
                }
                list.iter()
                    .filter_map(|addr| p.check(addr, |s| socket_addr(s, None)))
                    .collect()
            }
        };
        let max_connections = self.max_connections.as_ref().map_or(Some(10_000), |v| {
            p.check(v, |&n| positive(n, "max_connections"))
        });
        let workers = self.workers.as_ref().map_or(Some(0), |v| {
            p.check(v, |&n| match non_negative(n, "workers")? {
                n if n <= MAX_WORKERS => Ok(n),
                _ => Err(format!("workers must be at most {MAX_WORKERS}")),
            })
        });
        let tcp_keepalive = self.tcp_keepalive.as_ref().map_or(
            Some(KeepAlive {
                idle: Some(Duration::from_secs(60)),
            }),
            |v| p.check(v, |s| keepalive(s)),
        );
        let mut duration = |value: &Option<Spanned<String>>, default: u64| {
            value
                .as_ref()
                .map_or(Some(Duration::from_secs(default)), |v| {
                    p.check(v, |s| positive_duration(s))
                })
        };
        Some(ProxyConfig {
            header_timeout: duration(&self.header_timeout, 10)?,
            connect_timeout: duration(&self.connect_timeout, 10)?,
            idle_timeout: duration(&self.idle_timeout, 30 * 60)?,
            drain_timeout: duration(&self.drain_timeout, 30)?,
            upgrade_timeout: duration(&self.upgrade_timeout, 30)?,
            listen,
            tls,
            max_connections: max_connections?,
            watch_config: self.watch_config.unwrap_or(false),
            workers: workers?,
            tcp_keepalive: tcp_keepalive?,
        })
    }
}

impl RawTls {
    fn validate(&self, base: &Path, p: &mut Problems<'_>) -> Option<TlsListener> {
        let listen = p.check(&self.listen, |s| socket_addr(s, None));
        let client_ca = self.client_ca.as_ref().map(|ca| base.join(ca.get_ref()));
        let config = p.check(&self.cert, |cert| {
            tls::server_config(
                &base.join(cert),
                &base.join(self.key.get_ref()),
                client_ca.as_deref(),
            )
        });
        Some(TlsListener {
            listen: listen?,
            config: config?,
            mutual: client_ca.is_some(),
        })
    }
}

impl RawAdmin {
    fn validate(self, proxy: Option<&ProxyConfig>, p: &mut Problems<'_>) -> Option<AdminConfig> {
        let listen = match &self.listen {
            None => Some(Some(default_admin_listen())),
            Some(v) => p.check(v, |s| admin_listen_or_off(s)),
        };
        let advertise = match &self.advertise {
            Some(v) => p.check(v, |s| advertise(s)),
            None => proxy.and_then(|proxy| proxy.listen.first().map(|a| a.to_string())),
        };
        let status_allow = nets(self.status_allow, &["127.0.0.0/8", "::1/128"], p);
        Some(AdminConfig {
            listen: listen?,
            advertise: advertise?,
            status_allow,
        })
    }
}

impl RawDns {
    fn validate(self, p: &mut Problems<'_>) -> Option<DnsConfig> {
        let servers: Vec<_> = self
            .servers
            .iter()
            .filter_map(|server| p.check(server, |s| socket_addr(s, Some(53))))
            .collect();
        let cache_size = self.cache_size.as_ref().map_or(Some(4096), |v| {
            p.check(v, |&n| non_negative(n, "cache_size"))
        });
        let mut hosts = HashMap::new();
        for (name, addrs) in &self.hosts {
            let Some(name) = p.check(addrs, |_| host_key(name)) else {
                continue;
            };
            if addrs.get_ref().is_empty() {
                p.add(
                    addrs,
                    format!("[dns] hosts: {name:?} needs at least one address"),
                );
            }
            let parsed: Vec<IpAddr> = addrs
                .get_ref()
                .iter()
                .filter_map(|a| {
                    p.check(a, |s| {
                        s.parse().map_err(|_| format!("{s:?} is not an IP address"))
                    })
                })
                .collect();
            hosts.insert(name, parsed);
        }
        Some(DnsConfig {
            servers,
            cache_size: cache_size? as u64,
            hosts,
        })
    }
}

fn validate_rules(
    raw: Vec<RawRule>,
    ip_ranges: Option<&IpRanges>,
    p: &mut Problems<'_>,
) -> Option<RuleSet> {
    if raw.is_empty() {
        p.add_global("no [[rule]]: the proxy would refuse everything");
    }
    let mut names = HashMap::new();
    let mut rules = Vec::new();
    for rule in raw {
        let name = rule.name.get_ref().clone();
        if name.is_empty()
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            p.add(
                &rule.name,
                format!("rule name {name:?} may contain only letters, digits, '-' and '_'"),
            );
        }
        if names.insert(name.clone(), ()).is_some() {
            p.add(&rule.name, format!("rule name {name:?} is used twice"));
        }
        if rule.domains.get_ref().is_empty() {
            p.add(&rule.domains, format!("rule {name:?} has no domains"));
        }
        if rule.ports.get_ref().is_empty() {
            p.add(&rule.ports, format!("rule {name:?} has no ports"));
        }
        let domains = rule
            .domains
            .get_ref()
            .iter()
            .filter_map(|d| p.check(d, |s| rules::validate_pattern(s)))
            .collect();
        let ports = rule
            .ports
            .get_ref()
            .iter()
            .filter_map(|port| p.check(port, |s| rules::parse_port_range(s)))
            .collect();
        let domain_label = rule
            .domain_label
            .as_ref()
            .and_then(|v| p.check(v, |s| domain_label(s)));
        let sni = rule.sni.as_ref().map_or(Some(SniMode::Enforce), |v| {
            p.check(v, |s| {
                SniMode::parse(s)
                    .ok_or_else(|| format!("sni {s:?} must be \"enforce\", \"log\" or \"off\""))
            })
        });
        for service in &rule.require_ip_ranges {
            match ip_ranges {
                None => p.add(service, "require_ip_ranges needs [aws_ip_ranges] file"),
                Some(ranges) if !ranges.has_service(service.get_ref()) => p.add(
                    service,
                    format!(
                        "service {:?} is not in the ip-ranges file",
                        service.get_ref()
                    ),
                ),
                Some(_) => {}
            }
        }
        rules.push(Rule {
            name,
            domains,
            ports,
            private_endpoint: rule.private_endpoint,
            sni: sni.unwrap_or_default(),
            domain_label,
            require_ip_ranges: rule
                .require_ip_ranges
                .iter()
                .map(|s| s.get_ref().clone())
                .collect(),
        });
    }
    if !p.list.is_empty() {
        return None;
    }
    match RuleSet::new(rules) {
        Ok(set) => Some(set),
        Err(e) => {
            p.add_global(e);
            None
        }
    }
}

fn nets(raw: Option<Vec<Spanned<String>>>, default: &[&str], p: &mut Problems<'_>) -> Vec<IpNet> {
    match raw {
        None => default
            .iter()
            .map(|n| n.parse().expect("valid literal"))
            .collect(),
        Some(list) => list
            .iter()
            .filter_map(|net| p.check(net, |s| ip_net(s)))
            .collect(),
    }
}

/// A CIDR, or a bare address meaning just that address.
fn ip_net(s: &str) -> Result<IpNet, String> {
    s.parse::<IpNet>()
        .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
        .map_err(|_| format!("{s:?} is not a CIDR like \"10.0.0.0/8\" or an address"))
}

fn socket_addr(s: &str, default_port: Option<u16>) -> Result<SocketAddr, String> {
    if let Ok(addr) = s.parse() {
        return Ok(addr);
    }
    match (default_port, s.parse::<IpAddr>()) {
        (Some(port), Ok(ip)) => Ok(SocketAddr::new(ip, port)),
        _ => Err(format!(
            "{s:?} is not an address like \"127.0.0.1:3128\" or \"[::1]:3128\""
        )),
    }
}

fn advertise(s: &str) -> Result<String, String> {
    let valid = s.rsplit_once(':').is_some_and(|(host, port)| {
        !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0) && !s.contains(['"', ';', ' '])
    });
    if valid {
        Ok(s.to_string())
    } else {
        Err(format!("advertise {s:?} must be host:port"))
    }
}

fn host_key(name: &str) -> Result<String, String> {
    match rules::parse_host(name) {
        Ok(Host::Name(name)) => Ok(name),
        _ => Err(format!("[dns] hosts: {name:?} is not a host name")),
    }
}

/// More event loops than this is a typo, not a machine.
const MAX_WORKERS: usize = 1024;

fn positive(n: i64, key: &str) -> Result<usize, String> {
    if n >= 1 {
        usize::try_from(n).map_err(|_| format!("{key} is too large"))
    } else {
        Err(format!("{key} must be at least 1"))
    }
}

fn non_negative(n: i64, key: &str) -> Result<usize, String> {
    usize::try_from(n).map_err(|_| format!("{key} must not be negative"))
}

/// `"0s"` turns keepalive off; otherwise whole seconds up to the kernel's ceiling.
fn keepalive(s: &str) -> Result<KeepAlive, String> {
    let problem = || {
        format!(
            "tcp_keepalive {s:?} must be whole seconds up to {}s, like \"60s\" or \"5m\"; \"0s\" turns it off",
            MAX_IDLE.as_secs()
        )
    };
    let idle = parse_duration(s).ok_or_else(problem)?;
    if idle.is_zero() {
        return Ok(KeepAlive { idle: None });
    }
    if idle.subsec_nanos() != 0 || idle > MAX_IDLE {
        return Err(problem());
    }
    Ok(KeepAlive { idle: Some(idle) })
}

fn positive_duration(s: &str) -> Result<Duration, String> {
    match parse_duration(s) {
        Some(d) if !d.is_zero() => Ok(d),
        _ => Err(format!(
            "duration {s:?} must be a positive number with a unit: \"500ms\", \"10s\", \"30m\", \"2h\""
        )),
    }
}

/// `"500ms"`, `"10s"`, `"30m"`, `"2h"`, `"1d"`.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let split = s.find(|c: char| !c.is_ascii_digit())?;
    let (number, unit) = s.split_at(split);
    let n: u64 = number.parse().ok()?;
    let secs = |mult: u64| n.checked_mul(mult).map(Duration::from_secs);
    match unit {
        "ms" => Some(Duration::from_millis(n)),
        "s" => secs(1),
        "m" => secs(60),
        "h" => secs(3600),
        "d" => secs(86_400),
        _ => None,
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
    fn line_numbers_count_the_newlines_before_an_offset() {
        let text = "a\n\nbc\r\nd\n";
        let problems = Problems::new(text);
        for offset in 0..=text.len() + 2 {
            let newlines = text.as_bytes()[..offset.min(text.len())]
                .iter()
                .filter(|&&b| b == b'\n')
                .count();
            assert_eq!(problems.line_of(offset), newlines + 1, "offset {offset}");
        }
        assert_eq!(Problems::new("").line_of(0), 1);
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
