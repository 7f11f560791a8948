//! The status page (`GET /`): one self-contained HTML document, rendered on the server so it
//! reads with JavaScript off, and kept live with it on by a small script polling
//! `/status.json`.
//!
//! Self-contained and locked down: no external asset, and a `Content-Security-Policy` that
//! allows only this page's own script and style (by hash), fetches to this origin, and
//! nothing else. Every piece of text that came from a client (hosts above all: a refused
//! request's host can be anything) is escaped here, and set with `textContent` by the script.

use std::fmt::Write;
use std::sync::LazyLock;

use base64::Engine;
use sha2::{Digest, Sha256};

use super::status::{Group, Report};

const SCRIPT: &str = include_str!("status.js");
const STYLE: &str = include_str!("status.css");

/// The page's `Content-Security-Policy`.
pub static POLICY: LazyLock<String> = LazyLock::new(|| {
    format!(
        "default-src 'none'; script-src '{}'; style-src '{}'; connect-src 'self'; \
         img-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
        hash(SCRIPT),
        hash(STYLE)
    )
});

fn hash(text: &str) -> String {
    let digest = Sha256::digest(text.as_bytes());
    format!(
        "sha256-{}",
        base64::engine::general_purpose::STANDARD.encode(digest)
    )
}

/// Text made safe inside HTML elements and quoted attributes.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

pub fn render(report: &Report) -> String {
    let mut page = String::with_capacity(16 * 1024);
    let e = escape;
    let _ = write!(
        page,
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>portcullis status</title><style>{STYLE}</style></head><body>\n\
         <header><h1>portcullis</h1><span id=\"state\" class=\"badge{}\">{}</span>\
         <span class=\"facts\">version {} · up <span id=\"uptime\">{}</span> · \
         <span id=\"open-count\">{}</span> open tunnels · <span id=\"refresh-state\">\
         static (JavaScript off)</span></span></header>\n",
        if report.draining { " draining" } else { "" },
        if report.draining {
            "draining"
        } else {
            "serving"
        },
        e(report.version),
        age(report.uptime_seconds),
        report.tunnels.open,
    );
    refusals_section(&mut page, report);
    tunnels_section(&mut page, report);
    rules_section(&mut page, report);
    about_section(&mut page, report);
    let _ = write!(page, "<script>{SCRIPT}</script>\n</body></html>\n");
    page
}

fn refusals_section(page: &mut String, report: &Report) {
    let _ = write!(
        page,
        "<h2>Recent refusals</h2>\
         <form method=\"get\" action=\"/\"><input type=\"search\" id=\"filter\" name=\"filter\" \
         value=\"{}\" placeholder=\"filter: client, host, reason or rule\"> \
         <noscript><button>filter</button></noscript></form>\
         <table><thead><tr><th>time</th><th>client</th><th>host:port</th><th>reason</th>\
         <th>rule</th></tr></thead><tbody id=\"refusals\">",
        escape(&report.filter)
    );
    for r in &report.recent_refusals {
        let target = match r.port {
            0 => r.host.clone(),
            port => format!("{}:{port}", r.host),
        };
        row(
            page,
            &[
                (&r.time.replace('T', " "), "time"),
                (&r.client, ""),
                (&target, ""),
                (r.reason, "reason"),
                (&r.rule, ""),
            ],
        );
    }
    let empty = if report.filter.is_empty() {
        "nothing refused yet"
    } else {
        "no refusal matches"
    };
    closing(page, report.recent_refusals.is_empty(), 5, empty, 0);
}

fn tunnels_section(page: &mut String, report: &Report) {
    let tunnels = &report.tunnels;
    page.push_str("<h2>Open tunnels</h2><div class=\"cols\">");
    for (title, id, groups, more) in [
        (
            "By domain",
            "by-domain",
            &tunnels.by_domain,
            tunnels.by_domain_more,
        ),
        (
            "By client",
            "by-client",
            &tunnels.by_client,
            tunnels.by_client_more,
        ),
    ] {
        let _ = write!(
            page,
            "<div><h3>{title}</h3><table><thead><tr><th>{}</th><th class=\"n\">open</th>\
             <th class=\"n\">up</th><th class=\"n\">down</th><th class=\"n\">oldest</th></tr>\
             </thead><tbody id=\"{id}\">",
            if id == "by-domain" {
                "domain"
            } else {
                "client"
            }
        );
        for group in groups {
            group_row(page, group);
        }
        closing(page, groups.is_empty(), 5, "no open tunnels", more);
        page.push_str("</div>");
    }
    page.push_str(
        "</div><h3>Longest open</h3><table><thead><tr><th>client</th><th>host:port</th>\
         <th>rule</th><th class=\"n\">age</th><th class=\"n\">up</th><th class=\"n\">down</th>\
         </tr></thead><tbody id=\"tunnels\">",
    );
    for t in &tunnels.list {
        row(
            page,
            &[
                (&t.client, ""),
                (&format!("{}:{}", t.host, t.port), ""),
                (&t.rule, ""),
                (&age(t.age_seconds), "n"),
                (&bytes(t.bytes_up), "n"),
                (&bytes(t.bytes_down), "n"),
            ],
        );
    }
    closing(
        page,
        tunnels.list.is_empty(),
        6,
        "no open tunnels",
        tunnels.list_more,
    );
}

fn group_row(page: &mut String, group: &Group) {
    row(
        page,
        &[
            (&group.name, ""),
            (&group.open.to_string(), "n"),
            (&bytes(group.bytes_up), "n"),
            (&bytes(group.bytes_down), "n"),
            (&age(group.oldest_seconds), "n"),
        ],
    );
}

fn rules_section(page: &mut String, report: &Report) {
    page.push_str(
        "<h2>Rules</h2><table><thead><tr><th>rule</th><th>domains</th><th>ports</th>\
         <th>SNI</th><th class=\"n\">allowed</th><th class=\"n\">refused</th></tr></thead>\
         <tbody id=\"rules\">",
    );
    for r in &report.rules {
        let sni = if r.private_endpoint {
            format!("{}, private endpoint", r.sni)
        } else {
            r.sni.to_string()
        };
        row(
            page,
            &[
                (&r.name, ""),
                (&r.domains.join(" "), ""),
                (&r.ports.join(" "), ""),
                (&sni, ""),
                (&r.allowed.to_string(), "n"),
                (&r.refused.to_string(), "n"),
            ],
        );
    }
    closing(page, report.rules.is_empty(), 6, "no rules", 0);
}

fn about_section(page: &mut String, report: &Report) {
    let e = escape;
    page.push_str("<div class=\"cols\"><div><h2>DNS</h2>");
    let servers = if report.dns.servers.is_empty() {
        "the system resolver".to_string()
    } else {
        report.dns.servers.join(", ")
    };
    let _ = write!(
        page,
        "<p>Servers: {}. Cache: {} answers for ordinary rules; private endpoints are never \
         cached (<code>bypass</code>).</p><table><thead><tr><th>path</th><th>result</th>\
         <th class=\"n\">lookups</th></tr></thead><tbody id=\"dns-lookups\">",
        e(&servers),
        report.dns.cache_size
    );
    for l in &report.dns.lookups {
        row(
            page,
            &[(&l.path, ""), (&l.result, ""), (&l.count.to_string(), "n")],
        );
    }
    closing(page, report.dns.lookups.is_empty(), 3, "no lookups yet", 0);
    page.push_str("</div><div><h2>Config</h2><table><tbody>");
    let reload_error = report
        .config
        .last_reload_error
        .as_ref()
        .map_or("none".to_string(), |r| format!("{}: {}", r.time, r.error));
    let _ = write!(
        page,
        "<tr><th>file</th><td>{}</td></tr><tr><th>started</th><td>{}</td></tr>\
         <tr><th>last reload</th><td id=\"last-reload\">{}</td></tr>\
         <tr><th>last reload error</th><td id=\"reload-error\">{}</td></tr>",
        e(&report.config.source),
        e(&report.started),
        e(report.config.last_reload.as_deref().unwrap_or("never")),
        e(&reload_error)
    );
    for l in &report.listeners {
        let _ = write!(
            page,
            "<tr><th>{}</th><td>{}</td></tr>",
            e(l.kind),
            e(&l.address)
        );
    }
    match &report.ip_ranges {
        Some(set) => {
            let _ = write!(
                page,
                "<tr><th>ip-ranges</th><td>createDate {} (age {}), syncToken {}, {} IPv4 and \
                 {} IPv6 prefixes{}</td></tr>",
                e(&set.create_date),
                age(set.age_seconds),
                e(&set.sync_token),
                set.ipv4_prefixes,
                set.ipv6_prefixes,
                set.url
                    .as_ref()
                    .map_or(String::new(), |u| format!(", refreshed from {}", e(u)))
            );
        }
        None => page.push_str("<tr><th>ip-ranges</th><td>not configured</td></tr>"),
    }
    page.push_str("</tbody></table></div></div>");
}

/// One table row; every cell escaped.
fn row(page: &mut String, cells: &[(&str, &str)]) {
    page.push_str("<tr>");
    for (text, class) in cells {
        if class.is_empty() {
            let _ = write!(page, "<td>{}</td>", escape(text));
        } else {
            let _ = write!(page, "<td class=\"{class}\">{}</td>", escape(text));
        }
    }
    page.push_str("</tr>");
}

/// The end of a table body: an "empty" row, an "and N more" row, as needed.
fn closing(page: &mut String, empty: bool, span: usize, empty_text: &str, more: usize) {
    if empty {
        let _ = write!(
            page,
            "<tr><td colspan=\"{span}\" class=\"empty\">{empty_text}</td></tr>"
        );
    }
    if more > 0 {
        let _ = write!(
            page,
            "<tr><td colspan=\"{span}\" class=\"more\">and {} more</td></tr>",
            thousands(more)
        );
    }
    page.push_str("</tbody></table>");
}

fn thousands(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

pub fn age(seconds: u64) -> String {
    match seconds {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m {}s", s / 60, s % 60),
        s => format!("{}h {}m", s / 3600, s % 3600 / 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_and_formats() {
        assert_eq!(
            escape("<script>alert('x')</script>&\""),
            "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;&amp;&quot;"
        );
        assert_eq!(thousands(4210), "4,210");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1_234_567), "1,234,567");
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(age(3725), "1h 2m");
    }

    #[test]
    fn the_policy_names_the_exact_script_and_style() {
        assert!(POLICY.contains(&hash(SCRIPT)) && POLICY.contains(&hash(STYLE)));
        assert!(POLICY.starts_with("default-src 'none'"));
    }
}
