//! AWS's published address ranges (`ip-ranges.json`) as a second check on DNS.
//!
//! A rule with `require_ip_ranges = ["CLOUDFRONT"]` admits a tunnel only when the address it
//! connects to lies inside a prefix AWS publishes for one of those services, so a poisoned or
//! hijacked answer for an allowed name cannot point the tunnel anywhere else on the internet.
//!
//! Prefixes are merged into sorted, disjoint ranges per service; a lookup is a binary search,
//! so ten thousand prefixes cost about fourteen comparisons.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::Path;

use ipnet::{Ipv4Net, Ipv6Net};
use serde::Deserialize;

/// The file as AWS documents it. `network_border_group` is absent in older files and unused.
#[derive(Deserialize)]
struct RawFile {
    #[serde(rename = "syncToken")]
    sync_token: String,
    #[serde(rename = "createDate")]
    create_date: String,
    prefixes: Vec<RawV4>,
    #[serde(default)]
    ipv6_prefixes: Vec<RawV6>,
}

#[derive(Deserialize)]
struct RawV4 {
    ip_prefix: String,
    service: String,
}

#[derive(Deserialize)]
struct RawV6 {
    ipv6_prefix: String,
    service: String,
}

/// The published ranges, by service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpRanges {
    pub sync_token: String,
    pub create_date: String,
    pub v4_prefixes: usize,
    pub v6_prefixes: usize,
    services: BTreeMap<String, Ranges>,
}

/// Disjoint, sorted, inclusive ranges.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
struct Ranges {
    v4: Vec<(u32, u32)>,
    v6: Vec<(u128, u128)>,
}

impl IpRanges {
    pub fn load(path: &Path) -> Result<IpRanges, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        IpRanges::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    pub fn parse(text: &str) -> Result<IpRanges, String> {
        let raw: RawFile = serde_json::from_str(text).map_err(|e| e.to_string())?;
        let mut v4: BTreeMap<String, Vec<(u32, u32)>> = BTreeMap::new();
        let mut v6: BTreeMap<String, Vec<(u128, u128)>> = BTreeMap::new();
        for prefix in &raw.prefixes {
            let net: Ipv4Net = prefix
                .ip_prefix
                .parse()
                .map_err(|_| format!("bad ip_prefix {:?}", prefix.ip_prefix))?;
            let range = (u32::from(net.network()), u32::from(net.broadcast()));
            v4.entry(prefix.service.clone()).or_default().push(range);
        }
        for prefix in &raw.ipv6_prefixes {
            let net: Ipv6Net = prefix
                .ipv6_prefix
                .parse()
                .map_err(|_| format!("bad ipv6_prefix {:?}", prefix.ipv6_prefix))?;
            let range = (u128::from(net.network()), u128::from(net.broadcast()));
            v6.entry(prefix.service.clone()).or_default().push(range);
        }
        let mut services: BTreeMap<String, Ranges> = BTreeMap::new();
        for (service, ranges) in v4 {
            services.entry(service).or_default().v4 = merge(ranges);
        }
        for (service, ranges) in v6 {
            services.entry(service).or_default().v6 = merge(ranges);
        }
        Ok(IpRanges {
            sync_token: raw.sync_token,
            create_date: raw.create_date,
            v4_prefixes: raw.prefixes.len(),
            v6_prefixes: raw.ipv6_prefixes.len(),
            services,
        })
    }

    pub fn has_service(&self, service: &str) -> bool {
        self.services.contains_key(service)
    }

    /// Is `addr` inside a published prefix of one of `services`?
    pub fn contains(&self, services: &[String], addr: IpAddr) -> bool {
        let addr = match addr {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(addr, IpAddr::V4),
            v4 => v4,
        };
        services
            .iter()
            .filter_map(|service| self.services.get(service))
            .any(|ranges| match addr {
                IpAddr::V4(v4) => within(&ranges.v4, u32::from(v4)),
                IpAddr::V6(v6) => within(&ranges.v6, u128::from(v6)),
            })
    }

    /// One line for `--check`.
    pub fn summary(&self) -> String {
        format!(
            "createDate {}, syncToken {}, {} IPv4 and {} IPv6 prefixes, {} services",
            self.create_date,
            self.sync_token,
            self.v4_prefixes,
            self.v6_prefixes,
            self.services.len()
        )
    }
}

fn merge<T: Ord + Copy + num_step::Step>(mut ranges: Vec<(T, T)>) -> Vec<(T, T)> {
    ranges.sort_unstable();
    let mut merged: Vec<(T, T)> = Vec::with_capacity(ranges.len());
    for (start, end) in ranges {
        match merged.last_mut() {
            Some(last) if start <= last.1.next_or_max() => last.1 = last.1.max(end),
            _ => merged.push((start, end)),
        }
    }
    merged
}

fn within<T: Ord + Copy>(ranges: &[(T, T)], value: T) -> bool {
    let after = ranges.partition_point(|&(start, _)| start <= value);
    after > 0 && value <= ranges[after - 1].1
}

/// `x + 1`, saturating: adjacent prefixes merge into one range.
mod num_step {
    pub trait Step {
        fn next_or_max(self) -> Self;
    }
    impl Step for u32 {
        fn next_or_max(self) -> u32 {
            self.saturating_add(1)
        }
    }
    impl Step for u128 {
        fn next_or_max(self) -> u128 {
            self.saturating_add(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = r#"{
      "syncToken": "1700000000", "createDate": "2026-11-01-12-00-00",
      "prefixes": [
        {"ip_prefix": "13.32.0.0/15", "region": "GLOBAL", "service": "CLOUDFRONT", "network_border_group": "GLOBAL"},
        {"ip_prefix": "13.34.0.0/16", "region": "GLOBAL", "service": "CLOUDFRONT", "network_border_group": "GLOBAL"},
        {"ip_prefix": "52.94.0.0/22", "region": "us-east-1", "service": "AMAZON"}
      ],
      "ipv6_prefixes": [
        {"ipv6_prefix": "2600:9000::/28", "region": "GLOBAL", "service": "CLOUDFRONT", "network_border_group": "GLOBAL"}
      ]
    }"#;

    #[test]
    fn lookups() {
        let ranges = IpRanges::parse(SAMPLE).unwrap();
        let cf = vec!["CLOUDFRONT".to_string()];
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(ranges.contains(&cf, ip("13.33.255.255")));
        assert!(
            ranges.contains(&cf, ip("13.34.0.1")),
            "adjacent prefixes merge"
        );
        assert!(!ranges.contains(&cf, ip("13.35.0.0")));
        assert!(!ranges.contains(&cf, ip("52.94.0.1")));
        assert!(ranges.contains(&["AMAZON".into()], ip("52.94.0.1")));
        assert!(ranges.contains(&cf, ip("2600:9000:1::1")));
        assert!(ranges.contains(&cf, ip("::ffff:13.32.0.1")));
        assert!(!ranges.contains(&cf, ip("2600:9010::1")));
        assert_eq!((ranges.v4_prefixes, ranges.v6_prefixes), (3, 1));
        assert!(ranges.summary().contains("2026-11-01-12-00-00"));
    }
}
