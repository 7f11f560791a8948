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
    pub fn reload(&self) -> Result<(), String> {
        let text = std::fs::read(&self.path);
        if let Ok(text) = &text {
            *self.last.lock().unwrap_or_else(|e| e.into_inner()) = Some(text.clone());
        }
        self.apply(text)
    }

    /// Reloads if the file's contents differ from the last ones tried.
    pub fn reload_if_changed(&self) -> Option<Result<(), String>> {
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

    /// Polls the file forever. Reading and parsing happen off the event loop, as for SIGHUP.
    pub async fn watch(self, interval: Duration) {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            let reloader = self.clone();
            let _ = tokio::task::spawn_blocking(move || reloader.reload_if_changed()).await;
        }
    }
}
