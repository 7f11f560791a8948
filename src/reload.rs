//! Where reloads come from: SIGHUP, and (with `[proxy] watch_config`) a change of the file.
//!
//! The file is polled by content rather than watched with inotify: Kubernetes updates a mounted
//! ConfigMap by swapping a symlink two directories up, which inotify on the file never sees,
//! and a 2-second read of a few kilobytes costs nothing.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::{Config, Proxy};

/// How often a watched config file is read.
pub const WATCH_INTERVAL: Duration = Duration::from_secs(2);

/// Reloads one proxy from one file.
#[derive(Clone)]
pub struct Reloader {
    path: PathBuf,
    proxy: Proxy,
    /// The file contents last tried, good or bad, so a bad file is reported once, not every poll.
    last: Arc<Mutex<Option<Vec<u8>>>>,
}

impl Reloader {
    /// `loaded` is the text the running config came from.
    pub fn new(path: PathBuf, proxy: Proxy, loaded: Option<Vec<u8>>) -> Reloader {
        Reloader {
            path,
            proxy,
            last: Arc::new(Mutex::new(loaded)),
        }
    }

    /// Reloads unconditionally (SIGHUP).
    pub async fn reload(&self) -> Result<(), String> {
        self.off_loop(Reloader::read_and_apply).await?
    }

    /// Reads and parses on a blocking thread: a large rule set takes a while (about 120 ms at
    /// 10,000 rules), and the tunnels of the event loop that asked would wait for it.
    async fn off_loop<R: Send + 'static>(&self, work: fn(&Reloader) -> R) -> Result<R, String> {
        let reloader = self.clone();
        tokio::task::spawn_blocking(move || work(&reloader))
            .await
            .map_err(|e| format!("the reload did not finish: {e}"))
    }

    fn read_and_apply(&self) -> Result<(), String> {
        let text = std::fs::read(&self.path);
        if let Ok(text) = &text {
            *self.last.lock().unwrap_or_else(|e| e.into_inner()) = Some(text.clone());
        }
        self.apply(text)
    }

    /// Reloads if the file's contents differ from the last ones tried.
    fn apply_if_changed(&self) -> Option<Result<(), String>> {
        let text = std::fs::read(&self.path).ok()?;
        {
            let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
            if last.as_deref() == Some(&text[..]) {
                return None;
            }
            *last = Some(text.clone());
        }
        tracing::info!(path = %self.path.display(), "config file changed");
        Some(self.apply(Ok(text)))
    }

    /// Parses exactly the bytes that were compared, so a write racing the poll cannot slip by.
    fn apply(&self, text: std::io::Result<Vec<u8>>) -> Result<(), String> {
        let source = self.path.display().to_string();
        let config = match text {
            Ok(bytes) => match String::from_utf8(bytes) {
                Ok(text) => Config::parse(&text, &source).map_err(|e| e.to_string()),
                Err(_) => Err(format!("{source}: not UTF-8")),
            },
            Err(e) => Err(format!("{source}: cannot read: {e}")),
        };
        self.proxy.reload(config)
    }

    /// Polls the file forever.
    pub async fn watch(self, interval: Duration) {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            let _ = self.off_loop(Reloader::apply_if_changed).await;
        }
    }
}
