//! Which resolved addresses may be connected to.
//!
//! A rule that allows `*.cloudfront.net` must not become a road to `127.0.0.1`, the cloud
//! metadata service, or the corporate LAN just because somebody's DNS says so. The check runs
//! on the very address that is then connected to, so there is no second lookup to race.

use std::net::{IpAddr, Ipv4Addr};

use ipnet::IpNet;

/// IPv4 special-purpose ranges (IANA registry) that a tunnel must not reach.
const DENIED_V4: &[(u32, u8)] = &[
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

/// IPv6 ranges that are refused outright (those carrying IPv4 are unwrapped first).
const DENIED_V6: &[(u128, u8)] = &[
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
}

/// The IPv4 address inside IPv4-mapped, NAT64 (RFC 6052 and RFC 8215) and 6to4 addresses.
fn embedded_v4(addr: IpAddr) -> Option<Ipv4Addr> {
    let IpAddr::V6(v6) = addr else { return None };
    let bits = u128::from(v6);
    let low32 = Ipv4Addr::from(bits as u32);
    if in_v6(bits, 0xffff << 32, 96) || in_v6(bits, 0x0064_ff9b << 96, 96) {
        return Some(low32);
    }
    if in_v6(bits, 0x0064_ff9b_0001 << 80, 48) {
        return Some(low32);
    }
    if in_v6(bits, 0x2002 << 112, 16) {
        return Some(Ipv4Addr::from((bits >> 80) as u32));
    }
    None
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
}
