//! The allowlist: host validation, wildcard matching and port ranges.
//!
//! Pure functions over strings, so every edge of the matching semantics in PRODUCT.md is pinned
//! down by unit tests here rather than discovered through sockets.
//!
//! Matching compares labels, right to left: a leading `*.` is one or more whole labels, a `*`
//! label exactly one, and a `*` inside a label (globset) never reaches across a dot.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::ops::RangeInclusive;

use globset::{GlobBuilder, GlobMatcher};
use rustc_hash::FxHashMap;

use crate::error::Reason;

/// RFC 1035 limits, the ones resolvers enforce too.
const MAX_NAME_LEN: usize = 253;
const MAX_LABEL_LEN: usize = 63;

/// A validated CONNECT host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Host {
    /// Lowercased, without the trailing dot.
    Name(String),
    Ip(IpAddr),
}

/// Splits a CONNECT authority (`host:port`, `[v6]:port`) and validates both halves.
pub fn parse_authority(authority: &str) -> Result<(Host, u16), Reason> {
    if authority.contains('@') {
        return Err(Reason::BadRequest);
    }
    let (host, port) = if let Some(rest) = authority.strip_prefix('[') {
        let (v6, port) = rest.split_once("]:").ok_or(Reason::BadRequest)?;
        let ip: Ipv6Addr = v6.parse().map_err(|_| Reason::BadRequest)?;
        (Host::Ip(IpAddr::V6(ip)), port)
    } else {
        let (host, port) = authority.rsplit_once(':').ok_or(Reason::BadRequest)?;
        (parse_host(host)?, port)
    };
    Ok((host, parse_port(port)?))
}

fn parse_port(port: &str) -> Result<u16, Reason> {
    if port.is_empty() || port.len() > 5 || !port.bytes().all(|b| b.is_ascii_digit()) {
        return Err(Reason::BadRequest);
    }
    match port.parse::<u16>() {
        Ok(0) | Err(_) => Err(Reason::BadRequest),
        Ok(port) => Ok(port),
    }
}

/// Validates a host name: a 400 for anything that is not a DNS name, a 403 `ip_literal` for
/// anything a resolver or `inet_aton` would read as an address (`10.0.0.1`, `127.1`,
/// `2130706433`, `0x7f.1`).
pub fn parse_host(raw: &str) -> Result<Host, Reason> {
    if raw.as_bytes().first().is_some_and(u8::is_ascii_digit)
        && let Ok(ip) = raw.parse::<Ipv4Addr>()
    {
        return Ok(Host::Ip(IpAddr::V4(ip)));
    }
    let name = raw.strip_suffix('.').unwrap_or(raw);
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return Err(Reason::BadRequest);
    }
    // One pass: every byte allowed, no empty or overlong label.
    let mut labels = 1;
    let mut label_len = 0;
    for &b in name.as_bytes() {
        if b == b'.' {
            if label_len == 0 {
                return Err(Reason::BadRequest);
            }
            labels += 1;
            label_len = 0;
        } else if NAME_BYTES[usize::from(b)] {
            label_len += 1;
            if label_len > MAX_LABEL_LEN {
                return Err(Reason::BadRequest);
            }
        } else {
            return Err(Reason::BadRequest);
        }
    }
    if label_len == 0 {
        return Err(Reason::BadRequest);
    }
    if looks_numeric(name, labels) {
        return Err(Reason::IpLiteral);
    }
    Ok(Host::Name(name.to_ascii_lowercase()))
}

/// Bytes a host name label may hold: letters, digits, `-` and `_` (seen in real AWS names).
const NAME_BYTES: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        table[b] = c.is_ascii_alphanumeric() || c == b'-' || c == b'_';
        b += 1;
    }
    table
};

fn is_name_byte(b: u8) -> bool {
    NAME_BYTES[usize::from(b)]
}

/// No top-level domain is all digits, and `inet_aton` accepts one to four numeric parts in
/// decimal, octal or hex; either shape is an address in disguise.
fn looks_numeric(name: &str, labels: usize) -> bool {
    let last = name.rsplit('.').next().unwrap_or(name);
    let all_digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    let inet_aton_part = |s: &str| {
        let hex = s.len() >= 2 && s[..2].eq_ignore_ascii_case("0x");
        if hex {
            s[2..].bytes().all(|b| b.is_ascii_hexdigit())
        } else {
            all_digits(s)
        }
    };
    all_digits(last) || (labels <= 4 && name.split('.').all(inet_aton_part))
}

/// What a rule does about the ClientHello inside its tunnels (see [`crate::sni`]). A rule's
/// setting, kept here so the allowlist does not depend on the ClientHello parser.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SniMode {
    /// Mismatch, missing SNI or non-TLS bytes close the tunnel.
    #[default]
    Enforce,
    /// Mismatches are logged; the tunnel stays open.
    Log,
    /// No check; the first bytes are not even read.
    Off,
}

impl SniMode {
    pub fn parse(s: &str) -> Option<SniMode> {
        match s {
            "enforce" => Some(SniMode::Enforce),
            "log" => Some(SniMode::Log),
            "off" => Some(SniMode::Off),
            _ => None,
        }
    }

    /// The config spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            SniMode::Enforce => "enforce",
            SniMode::Log => "log",
            SniMode::Off => "off",
        }
    }
}

/// What the `domain` label says for a request whose host matched a rule (`[metrics]
/// domain_label`, or the rule's own `domain_label`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum DomainLabel {
    /// The requested host: the most detail, but every new name takes one of `max_domains`.
    #[default]
    Host,
    /// The rule pattern the host matched (`*.amazonappstream.com`): one label value however
    /// many per-session names the pattern admits.
    RulePattern,
}

impl DomainLabel {
    pub fn parse(s: &str) -> Option<DomainLabel> {
        match s {
            "host" => Some(DomainLabel::Host),
            "rule_pattern" => Some(DomainLabel::RulePattern),
            _ => None,
        }
    }
}

/// One allowlist rule, as configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub name: String,
    /// Patterns, lowercased, as written in the config.
    pub domains: Vec<String>,
    pub ports: Vec<RangeInclusive<u16>>,
    /// Interface VPC endpoint names: never cached, may resolve to RFC 1918 / ULA addresses.
    pub private_endpoint: bool,
    /// Whether the TLS ClientHello inside the tunnel must name the CONNECT host.
    pub sni: SniMode,
    /// AWS services (`ip-ranges.json` `service` values) whose published prefixes the
    /// connected address must lie in; empty: no such check.
    pub require_ip_ranges: Vec<String>,
    /// What the metrics' `domain` label says for hosts this rule matches; `None`: `[metrics]
    /// domain_label`.
    pub domain_label: Option<DomainLabel>,
}

impl Rule {
    /// The ports as the config spells them: `"443"`, `"1400-1499"`.
    pub fn port_specs(&self) -> Vec<String> {
        self.ports
            .iter()
            .map(|range| match (range.start(), range.end()) {
                (start, end) if start == end => start.to_string(),
                (start, end) => format!("{start}-{end}"),
            })
            .collect()
    }

    pub fn allows_port(&self, port: u16) -> bool {
        self.ports.iter().any(|range| range.contains(&port))
    }
}

/// The result of checking a host and port against the rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict<'a> {
    Allowed(&'a Rule),
    /// The host matched this rule (the first that matched), but no matching rule allows the port.
    PortNotAllowed(&'a Rule),
    NoRule,
}

/// The compiled allowlist.
///
/// Patterns are indexed by their trailing run of literal labels (`amazonappstream.com` for
/// `*.amazonappstream.com`, `on.aws` for `*.streaming.appstream2.*.on.aws`). A host is looked up
/// once per label boundary (`a.b.example.com`, `b.example.com`, `example.com`, `com`), and only
/// the patterns filed under those suffixes are compared label by label. Checking a host costs a
/// handful of hash lookups whether there are ten rules or ten thousand.
#[derive(Debug, Clone)]
pub struct RuleSet {
    rules: Vec<Rule>,
    patterns: Vec<Pattern>,
    /// Trailing literal labels → indices into `patterns`. Keys come from the config, so a
    /// fast non-keyed hash is safe: lookups cannot change the map's shape.
    by_suffix: FxHashMap<Box<str>, Vec<usize>>,
    /// Bit `k` set: some key of `by_suffix` has `k` labels (64 and more share bit 63). Hosts
    /// are only looked up at those lengths.
    suffix_lengths: u64,
    /// Patterns that end in a wildcard label, so have no literal suffix: always compared.
    unindexed: Vec<usize>,
}

/// One compiled domain pattern.
#[derive(Debug, Clone)]
struct Pattern {
    rule: usize,
    /// Which of the rule's `domains` it was compiled from.
    domain: usize,
    /// A leading `*.`: one or more whole labels before `labels`.
    leading_any: bool,
    /// The remaining labels, left to right.
    labels: Vec<Label>,
}

#[derive(Debug, Clone)]
enum Label {
    Exact(Box<str>),
    /// `*`: exactly one label.
    Any,
    /// `*` inside a label (`d*`, `*-fips`): globset, within the label.
    Glob(GlobMatcher),
}

impl Label {
    fn parse(label: &str) -> Result<Label, String> {
        if label == "*" {
            Ok(Label::Any)
        } else if label.contains('*') {
            let glob = GlobBuilder::new(label)
                .literal_separator(true)
                .build()
                .map_err(|e| format!("label {label:?}: {e}"))?;
            Ok(Label::Glob(glob.compile_matcher()))
        } else {
            Ok(Label::Exact(label.into()))
        }
    }

    fn matches(&self, label: &str) -> bool {
        match self {
            Label::Exact(exact) => **exact == *label,
            Label::Any => true,
            Label::Glob(glob) => glob.is_match(label),
        }
    }
}

impl Pattern {
    fn parse(pattern: &str, rule: usize, domain: usize) -> Result<Pattern, String> {
        let (leading_any, rest) = match pattern.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, pattern),
        };
        let labels = rest
            .split('.')
            .map(Label::parse)
            .collect::<Result<_, _>>()?;
        Ok(Pattern {
            rule,
            domain,
            leading_any,
            labels,
        })
    }

    /// The trailing labels without a wildcard, as a suffix string (empty if the last has one).
    fn literal_suffix(&self) -> String {
        let literal: Vec<&str> = self
            .labels
            .iter()
            .rev()
            .map_while(|label| match label {
                Label::Exact(exact) => Some(&**exact),
                _ => None,
            })
            .collect();
        literal.into_iter().rev().collect::<Vec<_>>().join(".")
    }

    /// `host` is validated and lowercased.
    fn matches(&self, host: &HostLabels<'_>) -> bool {
        let fits = if self.leading_any {
            host.count() > self.labels.len()
        } else {
            host.count() == self.labels.len()
        };
        fits && self
            .labels
            .iter()
            .rev()
            .enumerate()
            .all(|(k, pattern)| pattern.matches(host.nth_from_right(k)))
    }
}

impl RuleSet {
    /// Compiles the rules. Patterns must already have passed [`validate_pattern`].
    pub fn new(rules: Vec<Rule>) -> Result<RuleSet, String> {
        let mut patterns = Vec::new();
        let mut by_suffix: FxHashMap<Box<str>, Vec<usize>> = FxHashMap::default();
        let mut suffix_lengths = 0u64;
        let mut unindexed = Vec::new();
        for (index, rule) in rules.iter().enumerate() {
            for (k, domain) in rule.domains.iter().enumerate() {
                let pattern = Pattern::parse(domain, index, k)
                    .map_err(|e| format!("pattern {domain:?}: {e}"))?;
                let suffix = pattern.literal_suffix();
                if suffix.is_empty() {
                    unindexed.push(patterns.len());
                } else {
                    suffix_lengths |= length_bit(suffix.split('.').count());
                    by_suffix
                        .entry(suffix.into_boxed_str())
                        .or_default()
                        .push(patterns.len());
                }
                patterns.push(pattern);
            }
        }
        Ok(RuleSet {
            rules,
            patterns,
            by_suffix,
            suffix_lengths,
            unindexed,
        })
    }

    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// Checks a validated, lowercased host name (see [`parse_host`]) and a port. Among the
    /// rules whose patterns match, the first in config order that allows the port wins.
    pub fn check(&self, host: &str, port: u16) -> Verdict<'_> {
        self.check_matched(host, port).0
    }

    /// [`check`](Self::check), and the pattern through which the verdict's rule matched `host`
    /// (the rule's first that matches; `None` with [`Verdict::NoRule`]).
    pub fn check_matched(&self, host: &str, port: u16) -> (Verdict<'_>, Option<&str>) {
        if host.len() > MAX_NAME_LEN {
            return (Verdict::NoRule, None);
        }
        let host = HostLabels::new(host);
        let suffixes = (1..=host.count())
            .filter(|&labels| self.suffix_lengths & length_bit(labels) != 0)
            .filter_map(|labels| self.by_suffix.get(host.suffix(labels)));
        let candidates = suffixes.flatten().chain(&self.unindexed);
        // Patterns are numbered rule by rule in config order, so the lowest number is the
        // first rule's first pattern.
        let mut first_match: Option<usize> = None;
        let mut first_allowed: Option<usize> = None;
        for &index in candidates {
            let pattern = &self.patterns[index];
            if !pattern.matches(&host) {
                continue;
            }
            first_match = Some(first_match.map_or(index, |i| i.min(index)));
            if self.rules[pattern.rule].allows_port(port) {
                first_allowed = Some(first_allowed.map_or(index, |i| i.min(index)));
            }
        }
        let source = |index: usize| {
            let pattern = &self.patterns[index];
            let rule = &self.rules[pattern.rule];
            (rule, Some(rule.domains[pattern.domain].as_str()))
        };
        match (first_allowed, first_match) {
            (Some(index), _) => {
                let (rule, pattern) = source(index);
                (Verdict::Allowed(rule), pattern)
            }
            (None, Some(index)) => {
                let (rule, pattern) = source(index);
                (Verdict::PortNotAllowed(rule), pattern)
            }
            (None, None) => (Verdict::NoRule, None),
        }
    }
}

impl RuleSet {
    /// Every rule pattern that matches `host` (validated, lowercased), in config order, whatever
    /// the port. For explaining a decision (`portcullis explain`), not for making one: it
    /// compares every pattern.
    pub fn matching(&self, host: &str) -> Vec<(&Rule, &str)> {
        if host.len() > MAX_NAME_LEN {
            return Vec::new();
        }
        let labels = HostLabels::new(host);
        // `patterns` were compiled from the rules' domains in this same order.
        let sources = self.rules.iter().flat_map(|rule| {
            rule.domains
                .iter()
                .map(move |domain| (rule, domain.as_str()))
        });
        sources
            .zip(&self.patterns)
            .filter(|(_, pattern)| pattern.matches(&labels))
            .map(|(source, _)| source)
            .collect()
    }
}

/// Does one host label fit one pattern label (`*`, `d*`, `gw`)? For explaining why a pattern
/// missed; the data path compares compiled labels.
pub fn label_fits(pattern_label: &str, label: &str) -> bool {
    Label::parse(pattern_label).is_ok_and(|compiled| compiled.matches(label))
}

/// A host name with its label boundaries found once, so the suffix lookups and the
/// per-pattern comparisons do not each scan it again.
struct HostLabels<'a> {
    host: &'a str,
    /// Where each label starts, left to right. A valid name has at most 127 labels.
    starts: [u8; 128],
    count: usize,
}

impl<'a> HostLabels<'a> {
    /// `host` is a validated name: at most 253 bytes, no empty label.
    fn new(host: &'a str) -> HostLabels<'a> {
        let mut starts = [0u8; 128];
        let mut count = 1;
        for (i, &b) in host.as_bytes().iter().enumerate() {
            if b == b'.' && count < starts.len() {
                starts[count] = (i + 1).min(255) as u8;
                count += 1;
            }
        }
        HostLabels {
            host,
            starts,
            count,
        }
    }

    fn count(&self) -> usize {
        self.count
    }

    /// The last `labels` labels, e.g. 2 → `example.com`.
    fn suffix(&self, labels: usize) -> &'a str {
        &self.host[usize::from(self.starts[self.count - labels])..]
    }

    /// The `k`-th label from the right, 0-based.
    fn nth_from_right(&self, k: usize) -> &'a str {
        let i = self.count - 1 - k;
        let start = usize::from(self.starts[i]);
        let end = if i + 1 < self.count {
            usize::from(self.starts[i + 1]) - 1
        } else {
            self.host.len()
        };
        &self.host[start..end]
    }
}

fn length_bit(labels: usize) -> u64 {
    1 << labels.min(63)
}

/// Checks a domain pattern from the config; returns it lowercased.
pub fn validate_pattern(pattern: &str) -> Result<String, String> {
    let lower = pattern.to_ascii_lowercase();
    if lower.is_empty() || lower.len() > MAX_NAME_LEN {
        return Err(format!("domain pattern {pattern:?} is empty or too long"));
    }
    let mut literal_labels = 0;
    for label in lower.split('.') {
        if label.is_empty() || label.len() > MAX_LABEL_LEN {
            return Err(format!(
                "domain pattern {pattern:?} has an empty or overlong label"
            ));
        }
        if !label.bytes().all(|b| is_name_byte(b) || b == b'*') {
            return Err(format!(
                "domain pattern {pattern:?} may contain only letters, digits, '-', '_', '.' and '*'"
            ));
        }
        if label.contains("**") {
            return Err(format!(
                "domain pattern {pattern:?}: use '*' once per label"
            ));
        }
        if !label.contains('*') {
            literal_labels += 1;
        }
    }
    if literal_labels == 0 {
        return Err(format!(
            "domain pattern {pattern:?} must name at least one label without '*'"
        ));
    }
    Ok(lower)
}

/// Parses `"443"` or `"1400-1499"`.
pub fn parse_port_range(spec: &str) -> Result<RangeInclusive<u16>, String> {
    let bad = || format!("port {spec:?} must be a port (1-65535) or a range like \"1400-1499\"");
    let (low, high) = spec.split_once('-').unwrap_or((spec, spec));
    let low = parse_port(low.trim()).map_err(|_| bad())?;
    let high = parse_port(high.trim()).map_err(|_| bad())?;
    if low > high {
        return Err(bad());
    }
    Ok(low..=high)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(name: &str, domains: &[&str], ports: &[&str], private_endpoint: bool) -> Rule {
        Rule {
            name: name.into(),
            domains: domains
                .iter()
                .map(|d| validate_pattern(d).unwrap())
                .collect(),
            ports: ports.iter().map(|p| parse_port_range(p).unwrap()).collect(),
            private_endpoint,
            sni: SniMode::Enforce,
            require_ip_ranges: Vec::new(),
            domain_label: None,
        }
    }

    fn appstream() -> RuleSet {
        RuleSet::new(vec![
            rule("gateway", &["*.amazonappstream.com"], &["443"], false),
            rule("auth", &["appstream2.*.aws.amazon.com"], &["443"], false),
            rule(
                "vpce",
                &["*.streaming.appstream.*.vpce.amazonaws.com"],
                &["443", "1400-1499"],
                true,
            ),
        ])
        .unwrap()
    }

    fn rule_for(set: &RuleSet, host: &str, port: u16) -> Option<String> {
        let Ok(Host::Name(name)) = parse_host(host) else {
            return None;
        };
        match set.check(&name, port) {
            Verdict::Allowed(rule) => Some(rule.name.clone()),
            _ => None,
        }
    }

    #[test]
    fn leading_wildcard_is_one_or_more_labels() {
        let set = appstream();
        assert_eq!(
            rule_for(&set, "a.amazonappstream.com", 443).as_deref(),
            Some("gateway")
        );
        assert!(rule_for(&set, "a.b.amazonappstream.com", 443).is_some());
        assert!(rule_for(&set, "amazonappstream.com", 443).is_none());
        assert!(rule_for(&set, "evilamazonappstream.com", 443).is_none());
        assert!(rule_for(&set, "amazonappstream.com.evil.net", 443).is_none());
        assert!(rule_for(&set, "a.amazonappstream.com.evil.net", 443).is_none());
    }

    #[test]
    fn inner_wildcard_stays_inside_one_label() {
        let set = appstream();
        assert!(rule_for(&set, "appstream2.us-east-1.aws.amazon.com", 443).is_some());
        assert!(rule_for(&set, "appstream2.a.b.aws.amazon.com", 443).is_none());
        assert!(rule_for(&set, "appstream2.aws.amazon.com", 443).is_none());
        assert!(
            rule_for(
                &set,
                "vpce-0123.streaming.appstream.eu-west-1.vpce.amazonaws.com",
                1450
            )
            .is_some()
        );
        assert!(
            rule_for(
                &set,
                "vpce-0123.streaming.appstream.eu.west.vpce.amazonaws.com",
                443
            )
            .is_none()
        );
    }

    #[test]
    fn partial_label_wildcard() {
        let set = RuleSet::new(vec![rule("p", &["d*.cloudfront.net"], &["443"], false)]).unwrap();
        assert!(rule_for(&set, "d111.cloudfront.net", 443).is_some());
        assert!(rule_for(&set, "x.d111.cloudfront.net", 443).is_none());
        assert!(rule_for(&set, "e1.cloudfront.net", 443).is_none());
    }

    #[test]
    fn exact_pattern_matches_only_itself() {
        let set =
            RuleSet::new(vec![rule("s", &["signin.aws.amazon.com"], &["443"], false)]).unwrap();
        assert!(rule_for(&set, "signin.aws.amazon.com", 443).is_some());
        assert!(rule_for(&set, "SIGNIN.AWS.AMAZON.COM.", 443).is_some());
        assert!(rule_for(&set, "x.signin.aws.amazon.com", 443).is_none());
    }

    #[test]
    fn ports_and_ranges() {
        let set = appstream();
        let vpce = "vpce-1.streaming.appstream.us-east-1.vpce.amazonaws.com";
        for (port, ok) in [
            (443, true),
            (1400, true),
            (1499, true),
            (1500, false),
            (444, false),
        ] {
            assert_eq!(rule_for(&set, vpce, port).is_some(), ok, "port {port}");
        }
        assert!(matches!(
            set.check("gw.amazonappstream.com", 444),
            Verdict::PortNotAllowed(rule) if rule.name == "gateway"
        ));
        assert_eq!(set.check("example.com", 443), Verdict::NoRule);
    }

    #[test]
    fn later_rule_can_allow_the_port() {
        let set = RuleSet::new(vec![
            rule("a", &["*.example.com"], &["443"], false),
            rule("b", &["x.example.com"], &["8443"], false),
        ])
        .unwrap();
        assert!(matches!(set.check("x.example.com", 8443), Verdict::Allowed(r) if r.name == "b"));
    }

    #[test]
    fn the_pattern_that_matched_comes_from_the_deciding_rule() {
        let set = RuleSet::new(vec![
            rule(
                "a",
                &["y.example.com", "*.example.com", "x.*.com"],
                &["443"],
                false,
            ),
            rule("b", &["x.example.com"], &["8443"], false),
        ])
        .unwrap();
        let pattern = |host, port| set.check_matched(host, port).1;
        assert_eq!(pattern("x.example.com", 443), Some("*.example.com"));
        assert_eq!(pattern("x.example.com", 8443), Some("x.example.com"));
        assert_eq!(pattern("y.example.com", 443), Some("y.example.com"));
        assert_eq!(pattern("z.example.com", 22), Some("*.example.com"));
        assert_eq!(pattern("example.net", 443), None);
    }

    #[test]
    fn host_validation() {
        assert_eq!(
            parse_host("GW.AmazonAppStream.com."),
            Ok(Host::Name("gw.amazonappstream.com".into()))
        );
        for bad in [
            "",
            ".",
            ".amazonappstream.com",
            "a..amazonappstream.com",
            "a.amazonappstream.com..",
            "a b.com",
            "a%2e.com",
            "bücher.de",
            "a/b.com",
            "a:b.com",
        ] {
            assert_eq!(parse_host(bad), Err(Reason::BadRequest), "{bad:?}");
        }
        let long_label = format!("{}.com", "a".repeat(64));
        assert_eq!(parse_host(&long_label), Err(Reason::BadRequest));
        let long_name = format!("{}com", "abcdefghi.".repeat(26));
        assert_eq!(parse_host(&long_name), Err(Reason::BadRequest));
        assert!(parse_host(&format!("{}.com", "a".repeat(63))).is_ok());
    }

    #[test]
    fn numeric_hosts_are_ip_literals() {
        for numeric in [
            "10.0.0.1",
            "127.1",
            "2130706433",
            "0x7f.1",
            "0x7f000001",
            "1.2.3.4.",
        ] {
            assert!(
                matches!(
                    parse_host(numeric),
                    Ok(Host::Ip(_)) | Err(Reason::IpLiteral)
                ),
                "{numeric:?}"
            );
        }
        assert!(parse_host("0xdead.example.com").is_ok());
    }

    #[test]
    fn authority_parsing() {
        assert_eq!(
            parse_authority("a.example.com:443"),
            Ok((Host::Name("a.example.com".into()), 443))
        );
        assert_eq!(
            parse_authority("[::1]:443"),
            Ok((Host::Ip("::1".parse().unwrap()), 443))
        );
        for bad in [
            "a.example.com",
            "a.example.com:",
            "a.example.com:0",
            "a.example.com:65536",
            "a.example.com:+443",
            "user@a.example.com:443",
            "::1:443",
            "[::1]",
            "[nothex]:443",
        ] {
            assert_eq!(parse_authority(bad), Err(Reason::BadRequest), "{bad:?}");
        }
    }

    /// The matcher agrees with a straightforward globset oracle (hosts as paths, `*` kept inside
    /// a label by `literal_separator`, a leading `*.` as `*/**/`) on every pair of a pattern and
    /// a host drawn from tricky shapes.
    #[test]
    fn agrees_with_a_globset_oracle() {
        use globset::GlobSetBuilder;
        let patterns = [
            "*.amazonappstream.com",
            "appstream2.*.aws.amazon.com",
            "*.appstream2.*.aws.amazon.com",
            "*.streaming.appstream2.*.on.aws",
            "*.streaming.appstream.*.vpce.amazonaws.com",
            "signin.aws.amazon.com",
            "d*.cloudfront.net",
            "*-fips.example.com",
            "a.*.*.example.com",
            "example.*",
            "*.example.*",
        ];
        let hosts = [
            "amazonappstream.com",
            "a.amazonappstream.com",
            "a.b.amazonappstream.com",
            "evilamazonappstream.com",
            "amazonappstream.com.evil.net",
            "appstream2.us-east-1.aws.amazon.com",
            "x.appstream2.us-east-1.aws.amazon.com",
            "appstream2.a.b.aws.amazon.com",
            "appstream2.aws.amazon.com",
            "x.streaming.appstream2.eu-west-1.on.aws",
            "streaming.appstream2.eu-west-1.on.aws",
            "v.streaming.appstream.us-west-2.vpce.amazonaws.com",
            "signin.aws.amazon.com",
            "x.signin.aws.amazon.com",
            "d111.cloudfront.net",
            "d.cloudfront.net",
            "e1.cloudfront.net",
            "x.d1.cloudfront.net",
            "us-fips.example.com",
            "-fips.example.com",
            "a.b.c.example.com",
            "a.b.example.com",
            "example.com",
            "example.org",
            "x.example.net",
            "a.b.example.org",
            "com",
            "x",
        ];
        for pattern in patterns {
            let mut oracle = GlobSetBuilder::new();
            let glob = match pattern.strip_prefix("*.") {
                Some(rest) => format!("*/**/{}", rest.replace('.', "/")),
                None => pattern.replace('.', "/"),
            };
            oracle.add(
                GlobBuilder::new(&glob)
                    .literal_separator(true)
                    .build()
                    .unwrap(),
            );
            let oracle = oracle.build().unwrap();
            let set = RuleSet::new(vec![rule("r", &[pattern], &["443"], false)]).unwrap();
            for host in hosts {
                let expected = oracle.is_match(host.replace('.', "/"));
                let got = matches!(set.check(host, 443), Verdict::Allowed(_));
                assert_eq!(got, expected, "pattern {pattern:?}, host {host:?}");
            }
        }
    }

    #[test]
    fn matching_lists_every_pattern_whatever_the_port() {
        let set = RuleSet::new(vec![
            rule("a", &["*.example.com", "x.example.com"], &["443"], false),
            rule("b", &["x.example.com"], &["8443"], false),
        ])
        .unwrap();
        let names = |host: &str| -> Vec<(String, String)> {
            set.matching(host)
                .into_iter()
                .map(|(rule, pattern)| (rule.name.clone(), pattern.to_string()))
                .collect()
        };
        assert_eq!(
            names("x.example.com"),
            vec![
                ("a".into(), "*.example.com".into()),
                ("a".into(), "x.example.com".into()),
                ("b".into(), "x.example.com".into())
            ]
        );
        assert_eq!(names("y.example.com").len(), 1);
        assert!(names("example.com").is_empty());
        assert!(label_fits("d*", "d111") && !label_fits("d*", "e1") && label_fits("*", "x"));
    }

    #[test]
    fn pattern_validation() {
        assert!(validate_pattern("*.Example.com").is_ok());
        assert!(validate_pattern("*").is_err());
        assert!(validate_pattern("*.*").is_err());
        assert!(validate_pattern("a..com").is_err());
        assert!(validate_pattern("a.c?m").is_err());
        assert!(validate_pattern("**.com").is_err());
        assert!(parse_port_range("1499-1400").is_err());
        assert!(parse_port_range("0").is_err());
        assert_eq!(parse_port_range("1400-1499"), Ok(1400..=1499));
    }
}
