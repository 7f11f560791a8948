//! Headless Chromium (Debian's `chromium`) driven over the DevTools protocol.
//!
//! Each [`Chromium`] gets a fresh profile and a fresh `$HOME` whose NSS database trusts the test
//! CA, the way a managed desktop trusts a corporate CA: no certificate errors are ignored. The
//! browser is started in its own process group and that group is killed on drop.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use base64::Engine;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// The flags this machine needs (see the issue): no sandbox inside the test's user namespace,
/// no GPU, no QUIC, and nothing that phones home on its own.
pub const BASE_FLAGS: &[&str] = &[
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1024,640",
];

pub struct Chromium {
    child: Child,
    pid: u32,
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    session: String,
    next_id: u64,
    /// Keeps the profile and `$HOME` until the browser is gone.
    _dir: tempfile::TempDir,
    stderr_path: PathBuf,
}

impl Drop for Chromium {
    fn drop(&mut self) {
        // The browser and its helpers (zygote, renderer, network service) share the group.
        if let Some(pid) = rustix::process::Pid::from_raw(self.pid as i32) {
            let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
        }
        let _ = self.child.start_kill();
    }
}

impl Chromium {
    /// Starts Chromium with `extra` flags (the proxy set-up), trusting the CA in `ca_pem`.
    pub async fn launch(extra: &[String], ca_pem: &Path) -> Chromium {
        let dir = tempfile::tempdir().unwrap();
        let home = dir.path().join("home");
        let profile = dir.path().join("profile");
        let nssdb = home.join(".pki/nssdb");
        std::fs::create_dir_all(&nssdb).unwrap();
        std::fs::create_dir_all(&profile).unwrap();
        let db = format!("sql:{}", nssdb.display());
        run("certutil", &["-N", "-d", &db, "--empty-password"]).await;
        let ca = ca_pem.to_str().unwrap();
        run(
            "certutil",
            &[
                "-A",
                "-d",
                &db,
                "-t",
                "C,,",
                "-n",
                "portcullis-test-ca",
                "-i",
                ca,
            ],
        )
        .await;

        let stderr_path = dir.path().join("chromium.stderr");
        let stderr = std::fs::File::create(&stderr_path).unwrap();
        let mut command = Command::new("chromium");
        command
            .args(BASE_FLAGS)
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg("--remote-debugging-port=0")
            .args(extra)
            .arg("about:blank")
            .env("HOME", &home)
            .env_remove("http_proxy")
            .env_remove("https_proxy")
            .env_remove("HTTP_PROXY")
            .env_remove("HTTPS_PROXY")
            .env_remove("all_proxy")
            .env_remove("ALL_PROXY")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .process_group(0)
            .kill_on_drop(true);
        let child = command.spawn().expect("chromium starts");
        let pid = child.id().unwrap();

        // Chromium writes the DevTools port and browser path here once it listens.
        let active = profile.join("DevToolsActivePort");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        let (port, path) = loop {
            if let Ok(text) = std::fs::read_to_string(&active) {
                let mut lines = text.lines();
                if let (Some(port), Some(path)) = (lines.next(), lines.next()) {
                    break (port.to_string(), path.to_string());
                }
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "chromium did not open its DevTools port in 30 s; stderr:\n{}",
                std::fs::read_to_string(&stderr_path).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let (ws, _) = tokio_tungstenite::connect_async(format!("ws://127.0.0.1:{port}{path}"))
            .await
            .expect("DevTools WebSocket");
        let mut chromium = Chromium {
            child,
            pid,
            ws,
            session: String::new(),
            next_id: 0,
            _dir: dir,
            stderr_path,
        };
        let target = chromium
            .browser_call("Target.createTarget", json!({ "url": "about:blank" }))
            .await
            .expect("a new tab");
        let attached = chromium
            .browser_call(
                "Target.attachToTarget",
                json!({ "targetId": target["targetId"], "flatten": true }),
            )
            .await
            .expect("attached to the tab");
        chromium.session = attached["sessionId"].as_str().unwrap().to_string();
        chromium
    }

    /// What Chromium printed on stderr so far, for failure messages.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    async fn send(
        &mut self,
        method: &str,
        params: Value,
        session: Option<String>,
    ) -> Result<Value, Value> {
        self.next_id += 1;
        let id = self.next_id;
        let mut message = json!({ "id": id, "method": method, "params": params });
        if let Some(session) = session {
            message["sessionId"] = Value::String(session);
        }
        self.ws
            .send(Message::text(message.to_string()))
            .await
            .expect("DevTools send");
        loop {
            let next = tokio::time::timeout(Duration::from_secs(30), self.ws.next())
                .await
                .unwrap_or_else(|_| panic!("no DevTools answer to {method} in 30 s"));
            let Some(Ok(Message::Text(text))) = next else {
                match next {
                    Some(Ok(_)) => continue,
                    other => panic!("DevTools connection ended during {method}: {other:?}"),
                }
            };
            let reply: Value = serde_json::from_str(text.as_str()).unwrap();
            if reply["id"].as_u64() == Some(id) {
                return match reply.get("error") {
                    Some(error) => Err(error.clone()),
                    None => Ok(reply["result"].clone()),
                };
            }
            // Anything else is an event we did not subscribe to on purpose; skip it.
        }
    }

    async fn browser_call(&mut self, method: &str, params: Value) -> Result<Value, Value> {
        self.send(method, params, None).await
    }

    /// A DevTools command on the tab.
    pub async fn call(&mut self, method: &str, params: Value) -> Result<Value, Value> {
        let session = self.session.clone();
        self.send(method, params, Some(session)).await
    }

    /// Navigates the tab; `Err` carries Chromium's net error, e.g. `net::ERR_TUNNEL_CONNECTION_FAILED`.
    pub async fn navigate(&mut self, url: &str) -> Result<(), String> {
        let result = self
            .call("Page.navigate", json!({ "url": url }))
            .await
            .unwrap_or_else(|e| panic!("Page.navigate {url}: {e}"));
        match result["errorText"].as_str() {
            Some(error) if !error.is_empty() => Err(error.to_string()),
            _ => Ok(()),
        }
    }

    /// Evaluates `expression` in the page and returns its value.
    pub async fn eval(&mut self, expression: &str) -> Value {
        let result = self
            .call(
                "Runtime.evaluate",
                json!({ "expression": expression, "returnByValue": true }),
            )
            .await
            .unwrap_or_else(|e| panic!("Runtime.evaluate {expression}: {e}"));
        result["result"]["value"].clone()
    }

    /// Polls `document.title` until it starts with one of `prefixes`; returns it, or the last
    /// title seen when `within` passes.
    pub async fn wait_for_title(&mut self, prefixes: &[&str], within: Duration) -> String {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let title = self.eval("document.title").await;
            let title = title.as_str().unwrap_or_default().to_string();
            if prefixes.iter().any(|p| title.starts_with(p))
                || tokio::time::Instant::now() >= deadline
            {
                return title;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Saves a PNG of the tab to `path` (its directory is created).
    pub async fn screenshot(&mut self, path: &Path) {
        // Right after a failed navigation the error page may still be committing.
        let mut attempts = 0;
        let shot = loop {
            match self
                .call("Page.captureScreenshot", json!({ "format": "png" }))
                .await
            {
                Ok(shot) => break shot,
                Err(error) if attempts < 50 => {
                    attempts += 1;
                    if attempts == 1 {
                        eprintln!("Page.captureScreenshot: {error}; retrying");
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(error) => panic!("Page.captureScreenshot: {error}"),
            }
        };
        let png = base64::engine::general_purpose::STANDARD
            .decode(shot["data"].as_str().unwrap())
            .unwrap();
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, png).unwrap();
    }

    /// Asks the browser to exit, then makes sure it has.
    pub async fn close(mut self) {
        let _ = self.browser_call("Browser.close", json!({})).await;
        let _ = tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await;
    }
}

async fn run(program: &str, args: &[&str]) {
    let output = Command::new(program)
        .args(args)
        .output()
        .await
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(
        output.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}
