//! Name resolution: portcullis resolves every name itself, so clients need no DNS at all.
//!
//! Two paths, chosen by the rule that admitted the host:
//! - ordinary rules go through a hickory [`TokioResolver`] with a TTL-respecting cache;
//! - `private_endpoint` rules go straight to a [`NameServerPool`], beneath hickory's response
//!   cache, so every tunnel asks the DNS server afresh. AWS asks proxies not to cache anything
//!   for interface-endpoint names, and a session that starts after an endpoint change must
//!   follow it.
//!
//! Neither path reads `/etc/hosts` or applies search domains: the proxy resolves exactly the
//! name it was asked for, and `[dns] hosts` is the one place for static answers.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use dashmap::DashMap;

use futures_util::StreamExt;
use hickory_resolver::config::{
    LookupIpStrategy, NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts,
};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::xfer::DnsHandle;
use hickory_resolver::net::{DnsError, NetError};
use hickory_resolver::proto::op::{DnsRequestOptions, Query, ResponseCode};
use hickory_resolver::proto::rr::{Name, RecordType};
use hickory_resolver::{NameServerPool, PoolContext, TlsConfig, TokioResolver};

use crate::config::DnsConfig;

/// Why a name could not be resolved.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DnsFailure {
    /// NXDOMAIN, or a name with neither A nor AAAA records.
    #[error("no address for this name")]
    NoSuchName,
    #[error("lookup failed: {0}")]
    Failed(String),
}

/// Which path answered (the `cache` label of `dns_lookups_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CachePath {
    Cached,
    Bypass,
}

impl CachePath {
    pub fn as_str(self) -> &'static str {
        match self {
            CachePath::Cached => "cached",
            CachePath::Bypass => "bypass",
        }
    }
}

/// The resolvers of one config.
pub struct Resolver {
    /// Answers for ordinary rules, until their TTL runs out. hickory keeps its own cache of
    /// DNS messages behind `cached`; this one in front holds just the addresses, so a hit is
    /// one map lookup rather than a walk through hickory's lookup machinery.
    answers: DashMap<String, Answer>,
    answers_cap: usize,
    cached: TokioResolver,
    fresh: NameServerPool<TokioRuntimeProvider>,
    options: DnsRequestOptions,
    hosts: HashMap<String, Vec<IpAddr>>,
}

impl Resolver {
    pub fn new(config: &DnsConfig) -> Result<Resolver, String> {
        let (servers, mut opts) = if config.servers.is_empty() {
            hickory_resolver::system_conf::read_system_conf()
                .map_err(|e| format!("cannot read the system resolver config: {e}"))?
        } else {
            (explicit_servers(&config.servers), ResolverOpts::default())
        };
        opts.use_hosts_file = ResolveHosts::Never;
        opts.ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
        opts.ndots = 0;
        opts.cache_size = config.cache_size;
        let name_servers = servers.name_servers().to_vec();
        let cached = TokioResolver::builder_with_config(
            ResolverConfig::from_name_servers(name_servers.clone()),
            TokioRuntimeProvider::default(),
        )
        .with_options(opts.clone())
        .build()
        .map_err(|e| format!("cannot build the resolver: {e}"))?;
        let mut options = DnsRequestOptions::default();
        options.recursion_desired = opts.recursion_desired;
        options.use_edns = opts.edns0;
        let tls = TlsConfig::new().map_err(|e| e.to_string())?;
        let context = Arc::new(PoolContext::new(opts, tls));
        let fresh =
            NameServerPool::from_config(name_servers, context, TokioRuntimeProvider::default());
        Ok(Resolver {
            answers: DashMap::new(),
            answers_cap: usize::try_from(config.cache_size).unwrap_or(usize::MAX),
            cached,
            fresh,
            options,
            hosts: config.hosts.clone(),
        })
    }

    /// The `[dns] hosts` answer for a name, if it has one: no query is sent for it.
    pub fn static_answer(&self, host: &str) -> Option<&[IpAddr]> {
        self.hosts.get(host).map(Vec::as_slice)
    }

    /// Resolves a validated, lowercased host name. `[dns] hosts` answers first on both paths.
    pub async fn resolve(&self, host: &str, path: CachePath) -> Result<Vec<IpAddr>, DnsFailure> {
        if let Some(addrs) = self.hosts.get(host) {
            return Ok(addrs.clone());
        }
        match path {
            CachePath::Cached => self.resolve_cached(host).await,
            CachePath::Bypass => self.resolve_fresh(fqdn(host)?).await,
        }
    }

    async fn resolve_cached(&self, host: &str) -> Result<Vec<IpAddr>, DnsFailure> {
        let now = Instant::now();
        if let Some(answer) = self.answers.get(host)
            && answer.valid_until > now
        {
            return Ok(answer.addrs.to_vec());
        }
        let lookup = self.cached.lookup_ip(fqdn(host)?).await.map_err(failure)?;
        let addrs: Vec<IpAddr> = lookup.iter().collect();
        if addrs.is_empty() {
            return Err(DnsFailure::NoSuchName);
        }
        self.remember(host, &addrs, lookup.valid_until());
        Ok(addrs)
    }

    /// Keeps an answer until `valid_until`, within `cache_size` names: when full, expired
    /// entries go first, and if none has expired, everything does (the next lookups refill it).
    fn remember(&self, host: &str, addrs: &[IpAddr], valid_until: Instant) {
        if self.answers_cap == 0 {
            return;
        }
        if self.answers.len() >= self.answers_cap && !self.answers.contains_key(host) {
            let now = Instant::now();
            self.answers.retain(|_, answer| answer.valid_until > now);
            if self.answers.len() >= self.answers_cap {
                self.answers.clear();
            }
        }
        let answer = Answer {
            addrs: addrs.into(),
            valid_until,
        };
        self.answers.insert(host.to_string(), answer);
    }

    /// A and AAAA in parallel, sent to the name servers with no cache in between.
    async fn resolve_fresh(&self, name: Name) -> Result<Vec<IpAddr>, DnsFailure> {
        let (v4, v6) = tokio::join!(
            self.query_fresh(name.clone(), RecordType::A),
            self.query_fresh(name, RecordType::AAAA)
        );
        match (v4, v6) {
            (Ok(mut v4), Ok(v6)) => {
                v4.extend(v6);
                if v4.is_empty() {
                    return Err(DnsFailure::NoSuchName);
                }
                Ok(v4)
            }
            // One family answering is enough to connect.
            (Ok(addrs), Err(_)) | (Err(_), Ok(addrs)) if !addrs.is_empty() => Ok(addrs),
            (Err(e), _) | (_, Err(e)) => Err(e),
        }
    }

    async fn query_fresh(&self, name: Name, kind: RecordType) -> Result<Vec<IpAddr>, DnsFailure> {
        let mut responses = self.fresh.lookup(Query::query(name, kind), self.options);
        let response = match responses.next().await {
            Some(response) => response.map_err(failure)?,
            None => return Err(DnsFailure::Failed("no response".into())),
        };
        match response.response_code {
            ResponseCode::NoError => Ok(response
                .answers
                .iter()
                .filter(|record| record.record_type() == kind)
                .filter_map(|record| record.data.ip_addr())
                .collect()),
            ResponseCode::NXDomain => Err(DnsFailure::NoSuchName),
            code => Err(DnsFailure::Failed(format!("server answered {code}"))),
        }
    }
}

/// The name as a DNS query asks it: absolute, so no search domain is ever appended. Built only
/// when a query is sent: a hit in `answers` needs just the string.
fn fqdn(host: &str) -> Result<Name, DnsFailure> {
    let mut name = Name::from_ascii(host).map_err(|e| DnsFailure::Failed(e.to_string()))?;
    name.set_fqdn(true);
    Ok(name)
}

/// Addresses for a name, and until when they may be used.
struct Answer {
    addrs: Arc<[IpAddr]>,
    valid_until: Instant,
}

fn explicit_servers(servers: &[SocketAddr]) -> ResolverConfig {
    let name_servers = servers
        .iter()
        .map(|addr| {
            let mut server = NameServerConfig::udp_and_tcp(addr.ip());
            for connection in &mut server.connections {
                connection.port = addr.port();
            }
            server
        })
        .collect();
    ResolverConfig::from_name_servers(name_servers)
}

fn failure(error: NetError) -> DnsFailure {
    match error {
        NetError::Dns(DnsError::NoRecordsFound(_)) => DnsFailure::NoSuchName,
        NetError::Dns(DnsError::ResponseCode(ResponseCode::NXDomain)) => DnsFailure::NoSuchName,
        other => DnsFailure::Failed(other.to_string()),
    }
}
