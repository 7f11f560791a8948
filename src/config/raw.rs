//! The config file's shape, as serde reads it: every table and key a file may hold, nothing
//! checked beyond TOML types. Values keep their spans so that [`validate`](super::validate)
//! can name the line of each problem. `deny_unknown_fields` everywhere: a typo must not
//! silently become a default.

use std::collections::HashMap;

use serde::Deserialize;
use toml::Spanned;

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    #[serde(default)]
    pub(super) proxy: RawProxy,
    #[serde(default)]
    pub(super) admin: RawAdmin,
    #[serde(default)]
    pub(super) dns: RawDns,
    #[serde(default)]
    pub(super) clients: RawClients,
    #[serde(default)]
    pub(super) proxy_protocol: RawProxyProtocol,
    #[serde(default)]
    pub(super) auth: RawAuth,
    #[serde(default)]
    pub(super) aws_ip_ranges: RawIpRanges,
    #[serde(default)]
    pub(super) destinations: RawNets,
    #[serde(default)]
    pub(super) metrics: RawMetrics,
    #[serde(default, rename = "rule")]
    pub(super) rules: Vec<RawRule>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawProxy {
    pub(super) listen: Option<Vec<Spanned<String>>>,
    pub(super) max_connections: Option<Spanned<i64>>,
    pub(super) header_timeout: Option<Spanned<String>>,
    pub(super) connect_timeout: Option<Spanned<String>>,
    pub(super) idle_timeout: Option<Spanned<String>>,
    pub(super) drain_timeout: Option<Spanned<String>>,
    pub(super) upgrade_timeout: Option<Spanned<String>>,
    pub(super) watch_config: Option<bool>,
    pub(super) workers: Option<Spanned<i64>>,
    pub(super) tcp_keepalive: Option<Spanned<String>>,
    #[serde(default)]
    pub(super) tls: Vec<RawTls>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTls {
    pub(super) listen: Spanned<String>,
    pub(super) cert: Spanned<String>,
    pub(super) key: Spanned<String>,
    pub(super) client_ca: Option<Spanned<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAdmin {
    /// An empty string turns the admin listener off.
    pub(super) listen: Option<Spanned<String>>,
    pub(super) advertise: Option<Spanned<String>>,
    pub(super) status_allow: Option<Vec<Spanned<String>>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDns {
    #[serde(default)]
    pub(super) servers: Vec<Spanned<String>>,
    pub(super) cache_size: Option<Spanned<i64>>,
    #[serde(default)]
    pub(super) hosts: HashMap<String, Spanned<Vec<Spanned<String>>>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawNets {
    pub(super) allow: Option<Vec<Spanned<String>>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawClients {
    pub(super) allow: Option<Vec<Spanned<String>>>,
    #[serde(default)]
    pub(super) allow_cert_names: Vec<String>,
    pub(super) max_tunnels_per_client: Option<Spanned<i64>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawProxyProtocol {
    #[serde(default)]
    pub(super) trusted: Vec<Spanned<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawIpRanges {
    pub(super) file: Option<Spanned<String>>,
    pub(super) url: Option<Spanned<String>>,
    pub(super) refresh: Option<Spanned<String>>,
    pub(super) ca_file: Option<Spanned<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAuth {
    pub(super) users_file: Option<Spanned<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawMetrics {
    pub(super) max_domains: Option<Spanned<i64>>,
    pub(super) domain_histograms: Option<bool>,
    pub(super) domain_label: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRule {
    pub(super) name: Spanned<String>,
    pub(super) domains: Spanned<Vec<Spanned<String>>>,
    pub(super) ports: Spanned<Vec<Spanned<String>>>,
    #[serde(default)]
    pub(super) private_endpoint: bool,
    pub(super) sni: Option<Spanned<String>>,
    #[serde(default)]
    pub(super) require_ip_ranges: Vec<Spanned<String>>,
    pub(super) domain_label: Option<Spanned<String>>,
}
