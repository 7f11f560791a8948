//! AWS's published address ranges (`ip-ranges.json`) as a second check on DNS.
//!
//! A rule with `require_ip_ranges = ["CLOUDFRONT"]` admits a tunnel only when the address it
//! connects to lies inside a prefix AWS publishes for one of those services, so a poisoned or
//! hijacked answer for an allowed name cannot point the tunnel anywhere else on the internet.
//!
//! Prefixes are merged into sorted, disjoint ranges per service; a lookup is a binary search,
//! so ten thousand prefixes cost about fourteen comparisons.
//!
//! The set in force lives in [`crate::state::Shared`], not only in the config: [`refresh`]
//! replaces it when AWS publishes a newer file, [`fetch`] gets that file.

pub mod fetch;
pub mod refresh;

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
    /// `syncToken` as a number (AWS: the publication time in Unix seconds), so two files can be
    /// ordered: a refresh never goes back to an older one.
    pub sync: u64,
    /// `createDate` in Unix seconds, for the age gauge.
    pub created: u64,
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
        let sync = match raw.sync_token.parse::<u64>() {
            Ok(sync) if raw.sync_token.bytes().all(|b| b.is_ascii_digit()) => sync,
            _ => return Err(format!("syncToken {:?} is not a number", raw.sync_token)),
        };
        let created = unix_seconds(&raw.create_date).ok_or_else(|| {
            format!(
                "createDate {:?} is not a UTC date like \"2026-11-01-12-00-00\"",
                raw.create_date
            )
        })?;
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
            sync,
            created,
            v4_prefixes: raw.prefixes.len(),
            v6_prefixes: raw.ipv6_prefixes.len(),
            services,
        })
    }

    /// Reads `bytes` as the file (the refresher has bytes off the wire, not a string).
    pub fn parse_bytes(bytes: &[u8]) -> Result<IpRanges, String> {
        let text = std::str::from_utf8(bytes).map_err(|_| "not UTF-8".to_string())?;
        IpRanges::parse(text)
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

/// `"YYYY-MM-DD-hh-mm-ss"` (UTC, AWS's `createDate`) in seconds since 1970.
fn unix_seconds(date: &str) -> Option<u64> {
    let fields: Vec<&str> = date.split('-').collect();
    let widths = [4, 2, 2, 2, 2, 2];
    if fields.len() != widths.len()
        || fields
            .iter()
            .zip(widths)
            .any(|(f, w)| f.len() != w || !f.bytes().all(|b| b.is_ascii_digit()))
    {
        return None;
    }
    let n = |i: usize| fields[i].parse::<u64>().ok();
    let (year, month, day) = (n(0)?, n(1)?, n(2)?);
    let (hour, minute, second) = (n(3)?, n(4)?, n(5)?);
    let leap = year % 4 == 0 && (year % 100 != 0 || year % 400 == 0);
    let month_days = [
        31,
        if leap { 29 } else { 28 },
        31,
        30,
        31,
        30,
        31,
        31,
        30,
        31,
        30,
        31,
    ];
    if year < 1970
        || !(1..=12).contains(&month)
        || day == 0
        || day > month_days[month as usize - 1]
        || hour > 23
        || minute > 59
        || second > 59
    {
        return None;
    }
    Some(days_from_civil(year, month, day) * 86_400 + hour * 3600 + minute * 60 + second)
}

/// Days since 1970-01-01 of a proleptic Gregorian date from 1970 on (Howard Hinnant's
/// `days_from_civil`, for unsigned years).
fn days_from_civil(year: u64, month: u64, day: u64) -> u64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year / 400;
    let year_of_era = year - era * 400;
    let day_of_year = (153 * ((month + 9) % 12) + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
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
        assert_eq!(ranges.sync, 1_700_000_000);
    }

    #[test]
    fn create_dates_are_utc_seconds() {
        assert_eq!(unix_seconds("1970-01-01-00-00-00"), Some(0));
        assert_eq!(unix_seconds("2000-03-01-00-00-01"), Some(951_868_801));
        assert_eq!(unix_seconds("2024-02-29-23-59-59"), Some(1_709_251_199));
        assert_eq!(unix_seconds("2026-11-01-12-00-00"), Some(1_793_534_400));
        for bad in [
            "2023-02-29-00-00-00",
            "2026-13-01-00-00-00",
            "2026-11-01-24-00-00",
            "2026-11-01T12:00:00",
            "2026-11-01-12-00",
            "2026-11-1-12-00-00",
            "+026-11-01-12-00-00",
        ] {
            assert_eq!(unix_seconds(bad), None, "{bad}");
        }
    }

    #[test]
    fn tokens_and_dates_must_be_well_formed() {
        let with = |token: &str, date: &str| {
            SAMPLE
                .replace("\"1700000000\"", &format!("{token:?}"))
                .replace("\"2026-11-01-12-00-00\"", &format!("{date:?}"))
        };
        assert!(IpRanges::parse(&with("1700000001", "2026-11-01-12-00-00")).is_ok());
        let err = IpRanges::parse(&with("-1", "2026-11-01-12-00-00")).unwrap_err();
        assert!(err.contains("syncToken"), "{err}");
        assert!(IpRanges::parse(&with("+1", "2026-11-01-12-00-00")).is_err());
        let err = IpRanges::parse(&with("1", "yesterday")).unwrap_err();
        assert!(err.contains("createDate"), "{err}");
    }
}
