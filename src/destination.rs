//! Which resolved addresses may be connected to.
//!
//! A rule that allows `*.cloudfront.net` must not become a road to `127.0.0.1`, the cloud
//! metadata service, or the corporate LAN just because somebody's DNS says so. The check runs
//! on the very address that is then connected to, so there is no second lookup to race.
//!
//! [`Policy::check`] is the data path's question (yes or no, a few comparisons);
//! [`Policy::verdict`] answers the same question for `portcullis explain` and says why: which
//! range refused, which IPv4 address inside an IPv6 one was judged, what let it through. Names
//! live in tables of their own beside the ranges, so the data path never carries them.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

/// IPv4 special-purpose ranges (IANA registry) that a tunnel must not reach.
const DENIED_V4: [(u32, u8); 15] = [
    (0x0000_0000, 8),  // 0.0.0.0/8 "this network", unspecified
    (0x0A00_0000, 8),  // 10/8, RFC 1918
    (0x6440_0000, 10), // 100.64/10, CGNAT (and Alibaba's metadata address)
    (0x7F00_0000, 8),  // 127/8 loopback
    (0xA9FE_0000, 16), // 169.254/16 link-local, with 169.254.169.254 metadata
    (0xAC10_0000, 12), // 172.16/12, RFC 1918
    (0xC000_0000, 24), // 192.0.0/24 IETF protocol assignments
    (0xC000_0200, 24), // 192.0.2/24 TEST-NET-1
    (0xC058_6300, 24), // 192.88.99/24 6to4 relay anycast
    (0xC0A8_0000, 16), // 192.168/16, RFC 1918
    (0xC612_0000, 15), // 198.18/15 benchmarking
    (0xC633_6400, 24), // 198.51.100/24 TEST-NET-2
    (0xCB00_7100, 24), // 203.0.113/24 TEST-NET-3
    (0xE000_0000, 4),  // 224/4 multicast
    (0xF000_0000, 4),  // 240/4 reserved, with 255.255.255.255 broadcast
];

/// What each entry of [`DENIED_V4`] is, in the same order (the array length keeps them in step).
const DENIED_V4_NAMES: [&str; DENIED_V4.len()] = [
    "\"this network\" (unspecified)",
    "RFC 1918 private",
    "CGNAT shared address space",
    "loopback",
    "link-local",
    "RFC 1918 private",
    "IETF protocol assignments",
    "documentation (TEST-NET-1)",
    "6to4 relay anycast",
    "RFC 1918 private",
    "benchmarking",
    "documentation (TEST-NET-2)",
    "documentation (TEST-NET-3)",
    "multicast",
    "reserved, with the broadcast address",
];

/// IPv6 ranges that are refused outright (those carrying IPv4 are unwrapped first).
const DENIED_V6: [(u128, u8); 12] = [
    (0, 96),                           // ::/96 unspecified, loopback, IPv4-compatible
    (0x0100_0000_0000_0000 << 64, 64), // 100::/64 discard-only
    (0x2001_0000 << 96, 32),           // 2001::/32 Teredo: hides the real peer
    (0x2001_0002 << 96, 48),           // 2001:2::/48 benchmarking
    (0x2001_0010 << 96, 28),           // 2001:10::/28 ORCHID
    (0x2001_0020 << 96, 28),           // 2001:20::/28 ORCHIDv2
    (0x2001_0db8 << 96, 32),           // 2001:db8::/32 documentation
    (0x3fff_0000 << 96, 20),           // 3fff::/20 documentation
    (0xfc00 << 112, 7),                // fc00::/7 unique-local
    (0xfe80 << 112, 10),               // fe80::/10 link-local
    (0xfec0 << 112, 10),               // fec0::/10 site-local (deprecated)
    (0xff00 << 112, 8),                // ff00::/8 multicast
];

/// What each entry of [`DENIED_V6`] is, in the same order.
const DENIED_V6_NAMES: [&str; DENIED_V6.len()] = [
    "unspecified, loopback and IPv4-compatible",
    "discard-only",
    "Teredo (hides the real peer)",
    "benchmarking",
    "ORCHID",
    "ORCHIDv2",
    "documentation",
    "documentation",
    "unique-local (ULA)",
    "link-local",
    "site-local (deprecated)",
    "multicast",
];

/// Single addresses worth naming when an operator asks why one was refused.
const WELL_KNOWN: &[(IpAddr, &str)] = &[
    (
        IpAddr::V4(Ipv4Addr::new(169, 254, 169, 254)),
        "the cloud metadata service (AWS IMDS)",
    ),
    (
        IpAddr::V4(Ipv4Addr::new(169, 254, 170, 2)),
        "the ECS task metadata endpoint",
    ),
    (
        IpAddr::V6(Ipv6Addr::new(0xfd00, 0x0ec2, 0, 0, 0, 0, 0, 0x0254)),
        "the AWS metadata service over IPv6",
    ),
    (
        IpAddr::V4(Ipv4Addr::new(100, 100, 100, 200)),
        "the Alibaba Cloud metadata service",
    ),
];

/// Why an address was refused (for the log).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refused;

/// The destination policy of one config.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    /// `[destinations] allow`: reachable despite the deny list.
    allow: Vec<IpNet>,
}

impl Policy {
    pub fn new(allow: Vec<IpNet>) -> Policy {
        Policy { allow }
    }

    /// May a tunnel connect to `addr`? `private_endpoint` rules may reach RFC 1918 and ULA space.
    pub fn check(&self, addr: IpAddr, private_endpoint: bool) -> Result<(), Refused> {
        let judged = embedded_v4(addr).map_or(addr, IpAddr::V4);
        if self.allowed_explicitly(addr) || self.allowed_explicitly(judged) {
            return Ok(());
        }
        if private_endpoint && is_private(judged) {
            return Ok(());
        }
        if is_denied(judged) {
            Err(Refused)
        } else {
            Ok(())
        }
    }

    fn allowed_explicitly(&self, addr: IpAddr) -> bool {
        self.allow.iter().any(|net| net.contains(&addr))
    }

    fn allowing(&self, addr: IpAddr) -> Option<IpNet> {
        self.allow.iter().find(|net| net.contains(&addr)).copied()
    }

    /// [`Policy::check`], with its reasons: for explaining a decision, not for making one on the
    /// data path. `verdict(..).allowed()` always equals `check(..).is_ok()` (tested).
    pub fn verdict(&self, addr: IpAddr, private_endpoint: bool) -> Verdict {
        let embedded = unwrap_v4(addr);
        let judged = embedded.map_or(addr, |(v4, _)| IpAddr::V4(v4));
        let range = denied_range(judged);
        let via = if range.is_none() {
            Via::Public
        } else if let Some(net) = self.allowing(addr).or_else(|| self.allowing(judged)) {
            Via::DestinationsAllow(net)
        } else if private_endpoint && is_private(judged) {
            Via::PrivateEndpoint
        } else {
            Via::Refused
        };
        Verdict {
            addr,
            embedded: embedded.map(|(v4, kind)| Embedded { v4, kind }),
            range,
            well_known: WELL_KNOWN
                .iter()
                .find(|&&(known, _)| known == judged || known == addr)
                .map(|&(_, name)| name),
            via,
        }
    }
}

/// Why an address may or may not be connected to: [`Policy::verdict`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    pub addr: IpAddr,
    /// The IPv4 address judged in place of `addr`, when `addr` carries one.
    pub embedded: Option<Embedded>,
    /// The special-purpose range the judged address lies in; `None` for an ordinary address.
    pub range: Option<Range>,
    /// A single address with a name of its own (the metadata service), when it is one.
    pub well_known: Option<&'static str>,
    pub via: Via,
}

impl Verdict {
    pub fn allowed(&self) -> bool {
        self.via != Via::Refused
    }
}

/// What decided an address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// In no special-purpose range.
    Public,
    /// In a special-purpose range, but `[destinations] allow` covers it (with this entry).
    DestinationsAllow(IpNet),
    /// RFC 1918 or ULA, reached by a `private_endpoint` rule.
    PrivateEndpoint,
    /// In a special-purpose range, and nothing lets it through.
    Refused,
}

impl Via {
    /// A stable name, for JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Via::Public => "public",
            Via::DestinationsAllow(_) => "destinations_allow",
            Via::PrivateEndpoint => "private_endpoint",
            Via::Refused => "refused",
        }
    }
}

/// A special-purpose range and what it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Range {
    pub net: IpNet,
    pub name: &'static str,
}

impl std::fmt::Display for Range {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.net, self.name)
    }
}

/// An IPv4 address found inside an IPv6 one, and how it was carried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Embedded {
    pub v4: Ipv4Addr,
    /// `"NAT64 64:ff9b::/96"`, `"IPv4-mapped ::ffff:0:0/96"`, ...
    pub kind: &'static str,
}

/// The IPv4 address inside IPv4-mapped, NAT64 (RFC 6052 and RFC 8215) and 6to4 addresses.
fn embedded_v4(addr: IpAddr) -> Option<Ipv4Addr> {
    unwrap_v4(addr).map(|(v4, _)| v4)
}

/// [`embedded_v4`] with the name of the wrapping (the name costs the data path nothing: it is
/// a constant that `embedded_v4` drops).
fn unwrap_v4(addr: IpAddr) -> Option<(Ipv4Addr, &'static str)> {
    let IpAddr::V6(v6) = addr else { return None };
    let bits = u128::from(v6);
    let low32 = Ipv4Addr::from(bits as u32);
    if in_v6(bits, 0xffff << 32, 96) {
        return Some((low32, "IPv4-mapped ::ffff:0:0/96"));
    }
    if in_v6(bits, 0x0064_ff9b << 96, 96) {
        return Some((low32, "NAT64 64:ff9b::/96"));
    }
    if in_v6(bits, 0x0064_ff9b_0001 << 80, 48) {
        return Some((low32, "local-use NAT64 64:ff9b:1::/48"));
    }
    if in_v6(bits, 0x2002 << 112, 16) {
        return Some((Ipv4Addr::from((bits >> 80) as u32), "6to4 2002::/16"));
    }
    None
}

/// The denied range `addr` lies in, with its name (the first that matches, as in the table).
fn denied_range(addr: IpAddr) -> Option<Range> {
    match addr {
        IpAddr::V4(v4) => {
            let bits = u32::from(v4);
            let i = DENIED_V4
                .iter()
                .position(|&(net, len)| in_v4(bits, net, len))?;
            let (net, len) = DENIED_V4[i];
            let net = Ipv4Net::new(Ipv4Addr::from(net), len).expect("table prefixes are valid");
            Some(Range {
                net: IpNet::V4(net),
                name: DENIED_V4_NAMES[i],
            })
        }
        IpAddr::V6(v6) => {
            let bits = u128::from(v6);
            let i = DENIED_V6
                .iter()
                .position(|&(net, len)| in_v6(bits, net, len))?;
            let (net, len) = DENIED_V6[i];
            let net = Ipv6Net::new(Ipv6Addr::from(net), len).expect("table prefixes are valid");
            Some(Range {
                net: IpNet::V6(net),
                name: DENIED_V6_NAMES[i],
            })
        }
    }
}

fn in_v6(bits: u128, net: u128, prefix: u8) -> bool {
    let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
    bits & mask == net
}

fn in_v4(bits: u32, net: u32, prefix: u8) -> bool {
    let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
    bits & mask == net
}

fn is_denied(addr: IpAddr) -> bool {
    match addr {
        IpAddr::V4(v4) => {
            let bits = u32::from(v4);
            DENIED_V4.iter().any(|&(net, len)| in_v4(bits, net, len))
        }
        IpAddr::V6(v6) => {
            let bits = u128::from(v6);
            DENIED_V6.iter().any(|&(net, len)| in_v6(bits, net, len))
        }
    }
}

/// RFC 1918 or unique-local: where interface VPC endpoints live.
fn is_private(addr: IpAddr) -> bool {
    match addr {
        IpAddr::V4(v4) => v4.is_private(),
        IpAddr::V6(v6) => in_v6(u128::from(v6), 0xfc00 << 112, 7),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(policy: &Policy, addr: &str, private_endpoint: bool) -> bool {
        policy
            .check(addr.parse().unwrap(), private_endpoint)
            .is_ok()
    }

    #[test]
    fn public_addresses_pass() {
        let p = Policy::default();
        for addr in [
            "52.94.1.1",
            "13.32.0.1",
            "2600:9000::1",
            "64:ff9b::3420:1",
            "2002:3420:101::1",
        ] {
            assert!(ok(&p, addr, false), "{addr}");
        }
    }

    #[test]
    fn special_purpose_addresses_are_refused() {
        let p = Policy::default();
        for addr in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "255.255.255.255",
            "224.0.0.1",
            "192.0.2.1",
            "198.18.0.1",
            "203.0.113.9",
            "::",
            "::1",
            "fe80::1",
            "fd00:ec2::254",
            "ff02::1",
            "2001:db8::1",
            "2001:0:1::1",
            "::ffff:10.0.0.1",
            "::ffff:127.0.0.1",
            "64:ff9b::a9fe:a9fe",
            "64:ff9b:1::a00:1",
            "2002:a9fe:a9fe::1",
            "::127.0.0.1",
        ] {
            assert!(!ok(&p, addr, false), "{addr}");
        }
    }

    #[test]
    fn private_endpoints_may_reach_rfc1918_and_ula_only() {
        let p = Policy::default();
        assert!(ok(&p, "10.0.1.5", true));
        assert!(ok(&p, "::ffff:172.31.0.9", true));
        assert!(ok(&p, "fd12:3456::1", true));
        assert!(!ok(&p, "127.0.0.1", true));
        assert!(!ok(&p, "169.254.169.254", true));
        assert!(!ok(&p, "100.64.0.1", true));
    }

    #[test]
    fn allow_list_overrides_the_deny_list() {
        let p = Policy::new(vec![
            "127.0.0.0/8".parse().unwrap(),
            "::1/128".parse().unwrap(),
        ]);
        assert!(ok(&p, "127.0.0.1", false));
        assert!(ok(&p, "::ffff:127.0.0.1", false));
        assert!(ok(&p, "::1", false));
        assert!(!ok(&p, "10.0.0.1", false));
    }

    #[test]
    fn verdict_agrees_with_check() {
        let policies = [
            Policy::default(),
            Policy::new(vec![
                "127.0.0.0/8".parse().unwrap(),
                "10.9.0.0/16".parse().unwrap(),
                "64:ff9b::a9fe:0/112".parse().unwrap(),
            ]),
        ];
        let mut addrs: Vec<IpAddr> = Vec::new();
        for (net, len) in DENIED_V4 {
            for offset in [0u32, 1, (1 << (32 - u32::from(len))) - 1] {
                let v4 = Ipv4Addr::from(net + offset);
                addrs.push(v4.into());
                addrs.push(v4.to_ipv6_mapped().into());
                let nat64 = (0x0064_ff9b_u128 << 96) | u128::from(u32::from(v4));
                addrs.push(std::net::Ipv6Addr::from(nat64).into());
                let six_to_four = (0x2002_u128 << 112) | (u128::from(u32::from(v4)) << 80);
                addrs.push(std::net::Ipv6Addr::from(six_to_four).into());
            }
        }
        for (net, _) in DENIED_V6 {
            addrs.push(std::net::Ipv6Addr::from(net | 1).into());
        }
        for public in ["52.94.1.1", "2600:9000::1", "64:ff9b::3400:102", "10.9.1.1"] {
            addrs.push(public.parse().unwrap());
        }
        for policy in &policies {
            for &addr in &addrs {
                for private_endpoint in [false, true] {
                    assert_eq!(
                        policy.verdict(addr, private_endpoint).allowed(),
                        policy.check(addr, private_endpoint).is_ok(),
                        "{addr} private_endpoint={private_endpoint} {policy:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn verdict_names_the_range() {
        let p = Policy::default();
        let v = |addr: &str, pe: bool| p.verdict(addr.parse().unwrap(), pe);
        let metadata = v("169.254.169.254", false);
        assert_eq!(metadata.via, Via::Refused);
        assert_eq!(
            metadata.range.unwrap().to_string(),
            "169.254.0.0/16 link-local"
        );
        assert!(metadata.well_known.unwrap().contains("metadata"));
        let nat64 = v("64:ff9b::a9fe:a9fe", false);
        assert_eq!(nat64.via, Via::Refused);
        let embedded = nat64.embedded.unwrap();
        assert_eq!(embedded.v4, Ipv4Addr::new(169, 254, 169, 254));
        assert_eq!(embedded.kind, "NAT64 64:ff9b::/96");
        assert!(nat64.well_known.is_some());
        assert_eq!(
            v("10.1.2.3", false).range.unwrap().to_string(),
            "10.0.0.0/8 RFC 1918 private"
        );
        assert_eq!(v("10.1.2.3", true).via, Via::PrivateEndpoint);
        assert_eq!(v("100.64.0.1", true).via, Via::Refused);
        assert_eq!(
            v("fd12::1", false).range.unwrap().to_string(),
            "fc00::/7 unique-local (ULA)"
        );
        assert_eq!(
            v("2001:0:1::1", false).range.unwrap().name,
            "Teredo (hides the real peer)"
        );
        let public = v("64:ff9b::3400:102", false);
        assert_eq!((public.via, public.range), (Via::Public, None));
        assert_eq!(public.embedded.unwrap().v4, Ipv4Addr::new(52, 0, 1, 2));
        let allowed = Policy::new(vec!["127.0.0.0/8".parse().unwrap()])
            .verdict("::ffff:127.0.0.1".parse().unwrap(), false);
        assert_eq!(
            allowed.via,
            Via::DestinationsAllow("127.0.0.0/8".parse().unwrap())
        );
        assert_eq!(allowed.range.unwrap().name, "loopback");
    }
}
