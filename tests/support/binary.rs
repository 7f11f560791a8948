//! The `portcullis` binary as an operator runs it, with its stdout (the access log) collected
//! line by line, for tests of what only the real process shows: signals, the log, limits.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A running `portcullis` child with its stdout collected line by line.
pub struct Running {
    pub child: Child,
    pub lines: Arc<Mutex<Vec<String>>>,
    pub proxy: SocketAddr,
    pub admin: SocketAddr,
}

impl Running {
    pub fn start(config: &Path) -> Running {
        Running::start_with_fd_limit(config, None)
    }

    /// With `Some(n)`, the proxy runs under `ulimit -n n`.
    pub fn start_with_fd_limit(config: &Path, fds: Option<u32>) -> Running {
        Running::start_program(&program(), config, fds, &[])
    }

    /// The binary at `exe` (a copy a test may replace, as a package upgrade would), with
    /// `env` added to its environment.
    pub fn start_program(
        exe: &Path,
        config: &Path,
        fds: Option<u32>,
        env: &[(&str, &str)],
    ) -> Running {
        let limit = fds.map_or(String::new(), |n| format!("ulimit -n {n}; "));
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(format!("{limit}exec \"$0\" --config \"$1\""))
            .arg(exe)
            .arg(config)
            .env("PORTCULLIS_LOG", "info")
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let stdout = child.stdout.take().unwrap();
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        let serving = wait_for(&lines, "portcullis serving");
        let field = |name: &str| -> SocketAddr {
            let start = serving.find(&format!("\"{name}\":\"")).unwrap() + name.len() + 4;
            let end = serving[start..].find('"').unwrap() + start;
            serving[start..end].parse().unwrap()
        };
        Running {
            proxy: field("listen"),
            admin: field("admin"),
            child,
            lines,
        }
    }

    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([format!("-{name}"), self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    pub fn log(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }

    pub fn wait_exit(&mut self, within: Duration) -> Option<i32> {
        let deadline = std::time::Instant::now() + within;
        while std::time::Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status.code().unwrap_or(-1));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The binary under test: this build's, or `PORTCULLIS_BIN` (a release build, for the
/// measurements a test prints).
pub fn program() -> std::path::PathBuf {
    std::env::var_os("PORTCULLIS_BIN")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| env!("CARGO_BIN_EXE_portcullis").into())
}

pub fn wait_for(lines: &Mutex<Vec<String>>, needle: &str) -> String {
    for _ in 0..500 {
        if let Some(line) = lines.lock().unwrap().iter().find(|l| l.contains(needle)) {
            return line.clone();
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("no log line with {needle:?}: {:?}", lines.lock().unwrap());
}
