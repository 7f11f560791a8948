//! The operator's status page: `GET /status.json` field by field, `GET /` escaping hostile
//! hosts and headers, bounded lists, and the page as headless Chromium renders and refreshes it
//! (a screenshot is kept in `target/test-artifacts/status-page.png`).

mod support;

// Shared with tests/clients.rs, which uses all of it.
#[allow(dead_code)]
#[path = "browser/chromium.rs"]
mod chromium;

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;
use support::{
    Origin, Setup, TestProxy, assert_echo, connect, have_tool, request, rule_for, start_answering,
};
use tokio::net::TcpStream;

const HOST: &str = "gw1.amazonappstream.com";
const HOSTILE: &str = "<script>alert(1)</script>\"'.example.com";

async fn proxy(origin: &Origin) -> TestProxy {
    let setup = Setup {
        extra_rules: rule_for(HOST, origin),
        ..Setup::default()
    };
    start_answering(setup, HOST).await
}

async fn status(proxy: &TestProxy, query: &str) -> Value {
    let (code, body) = proxy.admin_get(&format!("/status.json{query}")).await;
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

/// One open tunnel carrying `bytes` each way, and three refusals (one with a hostile host).
async fn activity(proxy: &TestProxy, origin: &Origin, bytes: usize) -> TcpStream {
    let (reply, mut tunnel) = connect(proxy.addr, &format!("{HOST}:{}", origin.addr.port())).await;
    assert_eq!(reply.status, 200);
    assert_echo(&mut tunnel, &vec![7u8; bytes]).await;
    assert_eq!(
        connect(proxy.addr, "evil.example.com:443").await.0.status,
        403
    );
    assert_eq!(
        connect(proxy.addr, &format!("{HOST}:8443")).await.0.status,
        403
    );
    let head = format!(
        "CONNECT {HOSTILE}:443 HTTP/1.1\r\nUser-Agent: <img src=x onerror=alert(2)>\r\n\r\n"
    );
    assert_eq!(request(proxy.addr, head.as_bytes()).await.0.status, 400);
    tunnel
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_json_field_by_field() {
    let origin = Origin::echo().await;
    let proxy = proxy(&origin).await;
    let _tunnel = activity(&proxy, &origin, 5000).await;
    let s = status(&proxy, "").await;

    assert_eq!(s["version"], env!("CARGO_PKG_VERSION"));
    assert!(s["started"].as_str().unwrap().ends_with('Z'));
    assert!(s["uptime_seconds"].as_u64().is_some());
    assert_eq!(s["draining"], false);
    assert_eq!(s["config"]["source"], "test.toml");
    assert_eq!(s["config"]["last_reload"], Value::Null);
    let kinds: Vec<&str> = s["listeners"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["kind"].as_str().unwrap())
        .collect();
    assert!(
        kinds.contains(&"proxy") && kinds.contains(&"admin"),
        "{kinds:?}"
    );

    let tunnels = &s["tunnels"];
    assert_eq!(tunnels["open"], 1);
    assert_eq!(tunnels["by_domain"][0]["name"], HOST);
    assert_eq!(tunnels["by_domain"][0]["open"], 1);
    assert_eq!(tunnels["by_domain"][0]["bytes_up"], 5000);
    assert_eq!(tunnels["by_domain"][0]["bytes_down"], 5000);
    assert_eq!(tunnels["by_client"][0]["name"], "127.0.0.1");
    let listed = &tunnels["list"][0];
    assert_eq!(listed["host"], HOST);
    assert_eq!(listed["port"], origin.addr.port());
    assert_eq!(listed["rule"], "t");
    assert!(listed["client"].as_str().unwrap().starts_with("127.0.0.1:"));
    assert_eq!(tunnels["list_more"], 0);

    let refusals = s["recent_refusals"].as_array().unwrap();
    assert_eq!(refusals.len(), 3, "{refusals:?}");
    assert_eq!(refusals[0]["reason"], "bad_request");
    // Not even a URI: refused before any parsing, and shown as sent.
    assert_eq!(refusals[0]["host"], format!("{HOSTILE}:443"));
    assert_eq!(refusals[1]["reason"], "port_not_allowed");
    assert_eq!(refusals[1]["host"], HOST);
    assert_eq!(refusals[1]["port"], 8443);
    assert_eq!(
        refusals[1]["rule"], "appstream-gateway",
        "the first rule the host matched"
    );
    assert_eq!(refusals[2]["reason"], "domain_not_allowed");
    assert_eq!(refusals[2]["host"], "evil.example.com");
    assert_eq!(refusals[2]["rule"], "");
    for r in refusals {
        assert!(r["client"].as_str().unwrap().starts_with("127.0.0.1:"));
        assert!(r["time"].as_str().unwrap().ends_with('Z'));
    }
    let filtered = status(&proxy, "?filter=port_not").await;
    assert_eq!(filtered["recent_refusals"].as_array().unwrap().len(), 1);
    assert_eq!(filtered["filter"], "port_not");

    let rule = |name: &str| {
        s["rules"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["name"] == name)
            .unwrap()
            .clone()
    };
    let t = rule("t");
    assert_eq!(
        (t["allowed"].as_u64(), t["refused"].as_u64()),
        (Some(1), Some(0))
    );
    assert_eq!(t["sni"], "off");
    let gateway = rule("appstream-gateway");
    assert_eq!(
        (gateway["allowed"].as_u64(), gateway["refused"].as_u64()),
        (Some(0), Some(1))
    );
    let endpoint = rule("appstream-interface-endpoint");
    assert_eq!(endpoint["private_endpoint"], true);
    assert_eq!(endpoint["ports"], serde_json::json!(["443", "1400-1499"]));
    let lookups = s["dns"]["lookups"].as_array().unwrap();
    assert!(
        lookups
            .iter()
            .any(|l| l["path"] == "cached" && l["result"] == "ok" && l["count"] == 1),
        "{lookups:?}"
    );
    assert_eq!(s["ip_ranges"], Value::Null);

    // A reload that fails shows, with its reason; one that works shows its time.
    assert!(
        proxy
            .proxy
            .reload(Err("test.toml:3: broken on purpose".into()))
            .is_err()
    );
    let s = status(&proxy, "").await;
    assert!(
        s["config"]["last_reload_error"]["error"]
            .as_str()
            .unwrap()
            .contains("broken on purpose")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_escapes_what_clients_sent_and_locks_itself_down() {
    let origin = Origin::echo().await;
    let proxy = proxy(&origin).await;
    let _tunnel = activity(&proxy, &origin, 10).await;
    let long = format!("{}.example.com", "a".repeat(3000));
    let _ = connect(proxy.addr, &format!("{long}:443")).await;
    let (reply, _) = request(proxy.admin, b"GET / HTTP/1.0\r\n\r\n").await;
    assert_eq!(reply.status, 200);
    let csp = reply.header("content-security-policy").unwrap();
    assert!(
        csp.starts_with("default-src 'none'; script-src 'sha256-"),
        "{csp}"
    );
    assert!(!csp.contains("unsafe"), "{csp}");
    let page = proxy.admin_get("/").await.1;
    assert!(
        !page.contains("<script>alert"),
        "a hostile host reached the page unescaped"
    );
    assert!(page.contains("&lt;script&gt;alert(1)&lt;/script&gt;&quot;&#39;.example.com"));
    assert!(!page.contains("onerror"), "headers are never shown");
    assert!(!page.contains(&"a".repeat(300)), "long hosts are cut");
    assert!(page.contains(HOST) && page.contains("port_not_allowed"));
    assert!(!page.contains("src=\"http"), "no external asset");
    assert_eq!(
        page.matches("<script>").count(),
        1,
        "one script, the page's own"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lists_are_capped_with_the_rest_counted() {
    let origin = Origin::echo().await;
    let proxy = proxy(&origin).await;
    let mut held = Vec::new();
    for _ in 0..130 {
        let (reply, stream) = connect(proxy.addr, &format!("{HOST}:{}", origin.addr.port())).await;
        assert_eq!(reply.status, 200);
        held.push(stream);
    }
    for i in 0..260 {
        let _ = connect(proxy.addr, &format!("h{i}.example.com:443")).await;
    }
    let s = status(&proxy, "").await;
    assert_eq!(s["tunnels"]["open"], 130);
    assert_eq!(s["tunnels"]["list"].as_array().unwrap().len(), 100);
    assert_eq!(s["tunnels"]["list_more"], 30);
    assert_eq!(s["recent_refusals"].as_array().unwrap().len(), 200);
    assert_eq!(s["recent_refusals"][0]["host"], "h259.example.com");
    let page = proxy.admin_get("/").await.1;
    assert!(page.contains("and 30 more"));
    drop(held);
    let closed = support::eventually(Duration::from_secs(5), || async {
        status(&proxy, "").await["tunnels"]["open"] == 0
    })
    .await;
    assert!(closed, "closed tunnels leave the table");
}

fn artifact(name: &str) -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"));
    target.join("test-artifacts").join(name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_shows_and_refreshes_the_page() {
    support::isolate();
    if !have_tool("chromium", &["chromium", "--version"])
        || !have_tool("certutil", &["sh", "-c", "command -v certutil"])
    {
        return;
    }
    let origin = Origin::echo().await;
    let proxy = proxy(&origin).await;
    let _tunnel = activity(&proxy, &origin, 64 * 1024).await;
    let dir = tempfile::tempdir().unwrap();
    let ca = support::tls::ca().write_ca(dir.path());
    let mut browser = chromium::Chromium::launch(&[], &ca).await;
    browser
        .navigate(&format!("http://{}/", proxy.admin))
        .await
        .unwrap();
    let live = wait_for_text(
        &mut browser,
        "document.getElementById('refresh-state').textContent",
        "live",
    )
    .await;
    assert!(
        live.starts_with("live"),
        "the script did not run under the page's CSP: {live}"
    );
    let text = body_text(&mut browser).await;
    assert!(text.contains(HOST), "{text}");
    assert!(
        text.contains("port_not_allowed") && text.contains("domain_not_allowed"),
        "{text}"
    );
    assert!(
        text.contains("<script>alert(1)</script>"),
        "the hostile host shows as text: {text}"
    );
    let injected = browser
        .eval("document.querySelectorAll('script').length")
        .await;
    assert_eq!(injected, 1, "no element came from a host name");

    // A refusal after the page loaded appears without a reload.
    let _ = connect(proxy.addr, "late-refusal.example.com:443").await;
    let seen = wait_for_text(
        &mut browser,
        "document.getElementById('refusals').textContent",
        "late-refusal",
    )
    .await;
    assert!(seen.contains("late-refusal.example.com"), "{seen}");
    browser.screenshot(&artifact("status-page.png")).await;
    browser.close().await;
}

async fn body_text(browser: &mut chromium::Chromium) -> String {
    browser
        .eval("document.body.innerText")
        .await
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// Polls `expression` until its text contains `needle` (or 10 s pass); returns the last text.
async fn wait_for_text(browser: &mut chromium::Chromium, expression: &str, needle: &str) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let text = browser
            .eval(expression)
            .await
            .as_str()
            .unwrap_or_default()
            .to_string();
        if text.contains(needle) || tokio::time::Instant::now() >= deadline {
            return text;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The status pages show every client and every refused host, so only `[admin] status_allow`
/// (loopback by default) sees them; the PAC file and the probes stay open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_status_allow_sees_the_status_pages() {
    let origin = Origin::echo().await;
    let proxy = proxy(&origin).await;
    for path in ["/", "/status.json", "/explain?host=a.example.com&port=443"] {
        assert_eq!(proxy.admin_get(path).await.0, 200, "{path} from loopback");
    }
    let setup = Setup {
        extra_rules: rule_for(HOST, &origin),
        ..Setup::default()
    };
    let text = setup.to_toml(proxy.dns.addr).replace(
        "advertise = \"proxy.test:3128\"\n",
        "advertise = \"proxy.test:3128\"\nstatus_allow = [\"192.0.2.0/24\"]\n",
    );
    let config = portcullis::Config::parse(&text, "narrowed.toml").map_err(|e| e.to_string());
    proxy.proxy.reload(config).unwrap();
    for path in ["/", "/status.json", "/explain?host=a.example.com&port=443"] {
        assert_eq!(proxy.admin_get(path).await.0, 403, "{path}");
    }
    for path in ["/proxy.pac", "/wpad.dat", "/metrics", "/healthz", "/readyz"] {
        assert_eq!(proxy.admin_get(path).await.0, 200, "{path}");
    }
}
