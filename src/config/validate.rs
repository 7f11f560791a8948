//! From the file's shape ([`raw`](super::raw)) to a [`Config`]: every value checked,
//! defaults filled in, files the config names (TLS keys, users, AWS ranges) loaded, and every
//! problem collected with its line rather than stopping at the first.

use std::cell::OnceCell;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use toml::Spanned;

use super::raw::*;
use super::{
    AdminConfig, Config, ConfigError, DEFAULT_IP_RANGES_REFRESH, DnsConfig, IpRangesRefresh,
    MetricsConfig, Problem, ProxyConfig,
};
use crate::auth::UsersFile;
use crate::ip_ranges::IpRanges;
use crate::ip_ranges::fetch::{self, Url};
use crate::net::keepalive::{KeepAlive, MAX_IDLE};
use crate::rules::{self, DomainLabel, Host, Rule, RuleSet, SniMode};

use crate::tls::{self, TlsListener};

/// `[admin] listen` when the file does not set it.
pub(super) fn default_admin_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9090))
}

/// A set `[admin] listen`: an address, or `""` for no admin listener.
pub(super) fn admin_listen_or_off(s: &str) -> Result<Option<SocketAddr>, String> {
    if s.is_empty() {
        Ok(None)
    } else {
        socket_addr(s, None).map(Some)
    }
}

/// Collects problems and turns byte offsets into line numbers.
pub(super) struct Problems<'a> {
    text: &'a str,
    /// Where the text's newlines are, found once, at the first problem: a line number is then
    /// a binary search. Counting newlines from the top for each problem made a file with a
    /// problem in each of its 10,000 rules take seconds to check (rules × file size).
    newlines: OnceCell<Vec<usize>>,
    pub(super) list: Vec<Problem>,
}

impl<'a> Problems<'a> {
    pub(super) fn new(text: &'a str) -> Problems<'a> {
        Problems {
            text,
            newlines: OnceCell::new(),
            list: Vec::new(),
        }
    }

    /// The 1-based line of a byte offset: one more than the newlines before it.
    pub(super) fn line_of(&self, offset: usize) -> usize {
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

    pub(super) fn into_error(self, source: &str) -> ConfigError {
        ConfigError {
            source: source.to_string(),
            problems: self.list,
        }
    }
}

impl RawConfig {
    pub(super) fn validate(self, source: &str, p: &mut Problems<'_>) -> Option<Config> {
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
}
