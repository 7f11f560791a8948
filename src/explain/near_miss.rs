//! The nearest miss: when no rule matches a host, which pattern came closest, and why it fails.
//!
//! `domain_not_allowed` alone sends an operator reading through every rule. Most misses have one
//! of a few shapes, so each pattern is tried against the host for each, nearest first:
//! 1. the pattern's literal suffix fits and only the rest does not: the apex of a wildcard
//!    (`amazonappstream.com` against `*.amazonappstream.com`), a label too many or too few for an
//!    inner `*`, one label that differs;
//! 2. the host merely *contains* the suffix (`x.amazonappstream.com.evil.net`), or ends in it
//!    without a dot before it (`evilamazonappstream.com`);
//! 3. a typo: the edit distance between the host's last labels and the pattern's literal suffix
//!    (`amazonappsteam.com`), close when it is a quarter of the suffix or less;
//! 4. nothing close: the pattern nearest by that same distance.
//!
//! This only explains: whether a host matches is decided by [`crate::rules::RuleSet::check`].

use serde::Serialize;

use crate::rules::{Rule, label_fits};

/// The pattern nearest to a host no rule matches, and why it does not match.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NearMiss {
    pub rule: String,
    pub pattern: String,
    pub why: String,
}

/// The nearest pattern among `rules` (config order breaks ties) for a validated, lowercased
/// `host` that none of them matches.
pub fn nearest(rules: &[Rule], host: &str) -> Option<NearMiss> {
    let labels: Vec<&str> = host.split('.').collect();
    let mut best: Option<(Rank, NearMiss)> = None;
    for rule in rules {
        for pattern in &rule.domains {
            let (rank, why) = judge(pattern, host, &labels);
            if best.as_ref().is_none_or(|(nearest, _)| rank < *nearest) {
                let miss = NearMiss {
                    rule: rule.name.clone(),
                    pattern: pattern.clone(),
                    why,
                };
                best = Some((rank, miss));
            }
        }
    }
    best.map(|(_, miss)| miss)
}

/// Lower is nearer: the shape first (see the module header), then the pattern labels that did
/// not fit, then the edit distance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Rank {
    shape: u8,
    unfit: usize,
    distance: usize,
}

impl Rank {
    /// The host's tail is the pattern's suffix in spelling, but not at a label boundary
    /// (it goes on past it, or the suffix starts mid-label): as near as a miss gets.
    const ENDS_IN_SUFFIX: Rank = Rank {
        shape: 1,
        unfit: 0,
        distance: 0,
    };
}

/// A pattern split the way the matcher reads it.
struct Pattern<'a> {
    text: &'a str,
    /// A leading `*.`: one or more labels before `labels`.
    leading_any: bool,
    labels: Vec<&'a str>,
    /// How many trailing labels have no `*`.
    suffix_len: usize,
}

impl<'a> Pattern<'a> {
    fn new(text: &'a str) -> Pattern<'a> {
        let (leading_any, rest) = match text.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, text),
        };
        let labels: Vec<&str> = rest.split('.').collect();
        let suffix_len = labels
            .iter()
            .rev()
            .take_while(|label| !label.contains('*'))
            .count();
        Pattern {
            text,
            leading_any,
            labels,
            suffix_len,
        }
    }

    fn rest(&self) -> String {
        self.labels.join(".")
    }

    fn suffix(&self) -> String {
        self.labels[self.labels.len() - self.suffix_len..].join(".")
    }

    /// How many labels the pattern needs, in words.
    fn needs(&self) -> String {
        if self.leading_any {
            format!("at least {}", self.labels.len() + 1)
        } else {
            format!("exactly {}", self.labels.len())
        }
    }
}

fn judge(pattern: &str, host: &str, host_labels: &[&str]) -> (Rank, String) {
    let p = Pattern::new(pattern);
    // Labels that fit, from the right, up to the first that does not.
    let fit = host_labels
        .iter()
        .rev()
        .zip(p.labels.iter().rev())
        .take_while(|(label, pattern)| label_fits(pattern, label))
        .count();
    let literal_fit = p
        .labels
        .iter()
        .rev()
        .take(fit)
        .filter(|label| !label.contains('*'))
        .count();
    if fit >= p.suffix_len && literal_fit > 0 {
        let rank = Rank {
            shape: 0,
            unfit: p.labels.len() - fit,
            distance: 0,
        };
        return (rank, shape_miss(&p, host, host_labels, fit));
    }
    if p.suffix_len == 0 {
        let rank = Rank {
            shape: 4,
            unfit: p.labels.len(),
            distance: usize::MAX,
        };
        return (
            rank,
            format!("nothing close: `{host}` shares no literal label with `{pattern}`"),
        );
    }
    let suffix = p.suffix();
    let suffix_labels = &p.labels[p.labels.len() - p.suffix_len..];
    if let Some(after) = continues_past(host_labels, suffix_labels) {
        let rank = Rank::ENDS_IN_SUFFIX;
        return (
            rank,
            format!(
                "`{host}` does not end in `{suffix}`: the name goes on past it, so it is a name \
                 under `{after}`; `{pattern}` covers only names that end in `.{suffix}`"
            ),
        );
    }
    let tail_len = p.suffix_len.min(host_labels.len());
    let tail = host_labels[host_labels.len() - tail_len..].join(".");
    if host.ends_with(&suffix) && host.len() > suffix.len() {
        let rank = Rank::ENDS_IN_SUFFIX;
        return (
            rank,
            format!(
                "`{host}` ends in `{suffix}` but not at a dot: `{tail}` is a different domain \
                 from `{suffix}`"
            ),
        );
    }
    let distance = edit_distance(&tail, &suffix);
    let close = distance * 4 <= suffix.len();
    let edits = plural(distance, "edit");
    let (shape, why) = if close {
        (
            2,
            format!("`{tail}` is {edits} away from `{suffix}` (a typo?)"),
        )
    } else {
        (
            3,
            format!("nothing close: `{tail}` is {edits} away from `{suffix}`"),
        )
    };
    let rank = Rank {
        shape,
        unfit: 0,
        distance,
    };
    (rank, why)
}

/// Why a pattern whose literal suffix fits the host still misses it; `fit` labels fit from the
/// right.
fn shape_miss(p: &Pattern<'_>, host: &str, host_labels: &[&str], fit: usize) -> String {
    let pattern = p.text;
    let count = host_labels.len();
    if fit == p.labels.len() {
        if p.leading_any {
            // Every pattern label fits, so the host has no label for the `*.`.
            return format!(
                "a wildcard never matches its apex: `{pattern}` needs at least one label \
                 before `{}`",
                p.rest()
            );
        }
        if !pattern.contains('*') {
            return format!(
                "`{pattern}` has no wildcard, so it matches only itself (`*.{pattern}` would \
                 match names under it)"
            );
        }
        return format!(
            "`{pattern}` matches exactly {} (a `*` is one label, never several); `{host}` has \
             {count}",
            plural(p.labels.len(), "label")
        );
    }
    if fit == count {
        return format!(
            "`{pattern}` needs {} labels; `{host}` has {count}",
            p.needs()
        );
    }
    let wrong_count = if p.leading_any {
        count <= p.labels.len()
    } else {
        count != p.labels.len()
    };
    if wrong_count {
        return format!(
            "`{pattern}` needs {} labels (a `*` is one label, never several); `{host}` has \
             {count}",
            p.needs()
        );
    }
    let label = host_labels[count - 1 - fit];
    let wanted = p.labels[p.labels.len() - 1 - fit];
    let mut why = format!("label `{label}` does not fit `{wanted}` in `{pattern}`");
    if !wanted.contains('*') {
        let distance = edit_distance(label, wanted);
        if distance * 4 <= wanted.len() {
            why.push_str(&format!(" ({} away: a typo?)", plural(distance, "edit")));
        }
    }
    why
}

/// Where the host has `suffix` as whole labels with more labels after it: the labels after.
fn continues_past(host: &[&str], suffix: &[&str]) -> Option<String> {
    if suffix.is_empty() || host.len() <= suffix.len() {
        return None;
    }
    (0..host.len() - suffix.len())
        .rev()
        .find(|&start| host[start..start + suffix.len()] == *suffix)
        .map(|start| host[start + suffix.len()..].join("."))
}

/// Levenshtein distance over bytes (host names are ASCII).
fn edit_distance(a: &str, b: &str) -> usize {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    let mut previous: Vec<usize> = (0..=b.len()).collect();
    let mut current = vec![0; b.len() + 1];
    for (i, &x) in a.iter().enumerate() {
        current[0] = i + 1;
        for (j, &y) in b.iter().enumerate() {
            let substitute = previous[j] + usize::from(x != y);
            current[j + 1] = substitute.min(previous[j + 1] + 1).min(current[j] + 1);
        }
        std::mem::swap(&mut previous, &mut current);
    }
    previous[b.len()]
}

fn plural(n: usize, word: &str) -> String {
    if n == 1 {
        format!("1 {word}")
    } else {
        format!("{n} {word}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn miss(host: &str) -> NearMiss {
        let config = Config::embedded();
        nearest(config.rules.rules(), host).expect("the profile has rules")
    }

    #[test]
    fn apex_of_a_wildcard() {
        let m = miss("amazonappstream.com");
        assert_eq!(m.pattern, "*.amazonappstream.com");
        assert_eq!(m.rule, "appstream-gateway");
        assert!(m.why.contains("a wildcard never matches its apex"), "{m:?}");
    }

    #[test]
    fn a_typo_in_the_suffix() {
        let m = miss("gw1.amazonappsteam.com");
        assert_eq!(m.pattern, "*.amazonappstream.com");
        assert!(
            m.why
                .contains("`amazonappsteam.com` is 1 edit away from `amazonappstream.com`"),
            "{m:?}"
        );
        assert_eq!(miss("d1234.cloudfrnt.net").pattern, "*.cloudfront.net");
    }

    #[test]
    fn a_suffix_inside_another_domain() {
        let m = miss("x.amazonappstream.com.evil.net");
        assert_eq!(m.pattern, "*.amazonappstream.com");
        assert!(m.why.contains("a name under `evil.net`"), "{m:?}");
        let m = miss("evilamazonappstream.com");
        assert_eq!(m.pattern, "*.amazonappstream.com");
        assert!(m.why.contains("not at a dot"), "{m:?}");
    }

    #[test]
    fn inner_wildcards_are_one_label() {
        let m = miss("appstream2.a.b.aws.amazon.com");
        assert_eq!(m.pattern, "appstream2.*.aws.amazon.com");
        assert!(m.why.contains("needs exactly 5 labels"), "{m:?}");
        let m = miss("appstream3.us-east-1.aws.amazon.com");
        assert_eq!(m.pattern, "appstream2.*.aws.amazon.com");
        assert!(
            m.why
                .contains("label `appstream3` does not fit `appstream2`"),
            "{m:?}"
        );
        assert!(m.why.contains("1 edit away"), "{m:?}");
        let m = miss("vpce.amazonaws.com");
        assert_eq!(m.pattern, "*.streaming.appstream.*.vpce.amazonaws.com");
        assert!(m.why.contains("needs at least 7 labels"), "{m:?}");
    }

    #[test]
    fn exact_patterns_match_only_themselves() {
        let config = Config::parse(
            "[[rule]]\nname = \"exact\"\ndomains = [\"signin.example.com\"]\nports = [\"443\"]\n",
            "t.toml",
        )
        .unwrap();
        let m = nearest(config.rules.rules(), "eu.signin.example.com").unwrap();
        assert!(m.why.contains("has no wildcard"), "{m:?}");
        assert!(m.why.contains("`*.signin.example.com`"), "{m:?}");
    }

    #[test]
    fn nothing_close_still_names_the_nearest() {
        let m = miss("www.example.org");
        assert!(m.why.starts_with("nothing close"), "{m:?}");
    }

    #[test]
    fn edit_distances() {
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(
            edit_distance("amazonappsteam.com", "amazonappstream.com"),
            1
        );
        assert_eq!(edit_distance("same", "same"), 0);
    }
}
