//! SIGUSR2: the real binary hands its listeners and every open plain tunnel to a new process
//! started from its own path, and not one byte is lost, repeated or reordered; a new binary
//! that fails or hangs leaves the old one serving; SIGUSR2 during a drain, during a reload,
//! and twice in a row.

mod support;

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use support::binary::{Running, wait_for};
use support::{Origin, Setup, TestDns, assert_echo, connect, eventually, http_get};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const HOST: &str = "gw.upgrade.test";

/// A DNS server answering [`HOST`] with loopback, an origin, and a config file.
struct World {
    dns: TestDns,
    dir: tempfile::TempDir,
    path: PathBuf,
}

impl World {
    async fn new() -> World {
        let dns = TestDns::start().await;
        let lo: IpAddr = "127.0.0.1".parse().unwrap();
        dns.set(HOST, &[lo], 60);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("portcullis.toml");
        World { dns, dir, path }
    }

    /// A config whose rule lets [`HOST`] through on `port`; `proxy` adds `[proxy]` keys.
    fn write_config(&self, port: u16, proxy: &str) {
        let setup = Setup {
            extra_rules: format!(
                "[[rule]]\nname = \"up\"\ndomains = [{HOST:?}]\nports = [\"{port}\"]\n"
            ),
            drain_timeout: "10s",
            workers: 2,
            ..Setup::default()
        };
        let text = setup
            .to_toml(self.dns.addr)
            .replace("[proxy]\n", &format!("[proxy]\n{proxy}"));
        std::fs::write(&self.path, text).unwrap();
    }

    /// A copy of the binary in this test's directory, so the test can replace it.
    fn own_binary(&self) -> PathBuf {
        let exe = self.dir.path().join("portcullis");
        std::fs::copy(env!("CARGO_BIN_EXE_portcullis"), &exe).unwrap();
        exe
    }
}

/// Every process an upgrade started, killed when the test ends (they are not the test's
/// children: each is its predecessor's).
#[derive(Default)]
struct Generations(Vec<u32>);

impl Drop for Generations {
    fn drop(&mut self) {
        for pid in &self.0 {
            let _ = std::process::Command::new("kill")
                .args(["-9", &pid.to_string()])
                .stderr(std::process::Stdio::null())
                .status();
        }
    }
}

fn signal(pid: u32, name: &str) {
    let status = std::process::Command::new("kill")
        .args([format!("-{name}"), pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // A zombie has exited; only its parent has yet to collect it.
        Ok(stat) => !stat.contains(") Z "),
        Err(_) => false,
    }
}

/// Waits for the `n`th "handed over" line and returns the new process's pid.
fn handed_over(running: &Running, n: usize) -> u32 {
    for _ in 0..3000 {
        let lines = running.lines.lock().unwrap();
        let done: Vec<&String> = lines
            .iter()
            .filter(|l| l.contains("upgrade: handed over"))
            .collect();
        if let Some(line) = done.get(n - 1) {
            let start = line.find("\"pid\":").unwrap() + 6;
            let end = line[start..].find([',', '}']).unwrap() + start;
            return line[start..end].parse().unwrap();
        }
        drop(lines);
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("no handover #{n}:\n{}", running.log());
}

/// The bytes tunnel `id` sends: a stream anyone can recompute from its offset.
fn byte_at(id: u64, offset: u64) -> u8 {
    let x = offset
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add(id.wrapping_mul(0xD1B5_4A32_D192_ED03));
    (x >> 29) as u8 ^ (offset as u8)
}

/// One tunnel streaming through an echo origin: the client sends its stream in small frames
/// at a steady pace and checks every byte that comes back, in order, as it comes.
struct Stream {
    sent: Arc<AtomicU64>,
    checked: Arc<AtomicU64>,
    /// The longest wait between two echoed frames: the pause an upgrade caused.
    longest_gap: Arc<AtomicU64>,
    writer: tokio::task::JoinHandle<()>,
    reader: tokio::task::JoinHandle<Result<u64, String>>,
}

impl Stream {
    async fn open(proxy: SocketAddr, port: u16, id: u64, stop: Arc<AtomicBool>) -> Stream {
        let (reply, stream) = connect(proxy, &format!("{HOST}:{port}")).await;
        assert_eq!(reply.status, 200, "tunnel {id}");
        let (mut rd, mut wr) = stream.into_split();
        let sent = Arc::new(AtomicU64::new(0));
        let checked = Arc::new(AtomicU64::new(0));
        let longest_gap = Arc::new(AtomicU64::new(0));
        let sent_w = sent.clone();
        let writer = tokio::spawn(async move {
            // Random phase, then a frame of 600 bytes every 20 ms.
            tokio::time::sleep(Duration::from_millis(id * 7 % 20)).await;
            let mut offset = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let frame: Vec<u8> = (offset..offset + 600).map(|o| byte_at(id, o)).collect();
                if wr.write_all(&frame).await.is_err() {
                    return;
                }
                offset += 600;
                sent_w.store(offset, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let _ = wr.shutdown().await;
        });
        let (checked_r, gap_r) = (checked.clone(), longest_gap.clone());
        let reader = tokio::spawn(async move {
            let mut buf = vec![0u8; 8192];
            let mut offset = 0u64;
            let mut last = Instant::now();
            loop {
                let n = rd.read(&mut buf).await.map_err(|e| format!("tunnel {id}: {e}"))?;
                if n == 0 {
                    return Ok(offset);
                }
                let gap = last.elapsed().as_micros() as u64;
                gap_r.fetch_max(gap, Ordering::Relaxed);
                last = Instant::now();
                for (i, &b) in buf[..n].iter().enumerate() {
                    let at = offset + i as u64;
                    if b != byte_at(id, at) {
                        return Err(format!("tunnel {id}: wrong byte at {at}"));
                    }
                }
                offset += n as u64;
                checked_r.store(offset, Ordering::Relaxed);
            }
        });
        Stream {
            sent,
            checked,
            longest_gap,
            writer,
            reader,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_streams_survive_ten_upgrades() {
    const TUNNELS: u64 = 200;
    let world = World::new().await;
    let origin = Origin::echo().await;
    world.write_config(origin.addr.port(), "");
    let mut running = Running::start(&world.path);
    let mut generations = Generations::default();
    let stop = Arc::new(AtomicBool::new(false));
    let mut streams = Vec::new();
    for id in 0..TUNNELS {
        let port = origin.addr.port();
        streams.push(Stream::open(running.proxy, port, id, stop.clone()).await);
    }
    let progressed = |streams: &[Stream], floor: &[u64]| {
        streams
            .iter()
            .zip(floor)
            .all(|(s, &f)| s.checked.load(Ordering::Relaxed) > f)
    };
    let mut pid = running.child.id();
    let mut gaps = Vec::new();
    for n in 1..=10 {
        let floor: Vec<u64> = streams.iter().map(|s| s.checked.load(Ordering::Relaxed)).collect();
        for s in &streams {
            s.longest_gap.store(0, Ordering::Relaxed);
        }
        signal(pid, "USR2");
        let new = handed_over(&running, n);
        assert_ne!(new, pid);
        generations.0.push(new);
        // The old process has nothing left that cannot move: it exits.
        let gone = eventually(Duration::from_secs(10), || async { !alive(pid) }).await;
        assert!(gone, "upgrade {n}: old pid {pid} still there\n{}", running.log());
        pid = new;
        assert!(alive(pid));
        // Every tunnel still carries bytes, now through the new process.
        let floor_now = floor.clone();
        let moving = eventually(Duration::from_secs(10), || {
            let ok = progressed(&streams, &floor_now);
            async move { ok }
        })
        .await;
        assert!(moving, "upgrade {n}: a tunnel stopped\n{}", running.log());
        gaps.extend(streams.iter().map(|s| s.longest_gap.load(Ordering::Relaxed)));
        // And new tunnels open (the new process accepts on the same port).
        let (reply, mut fresh) = connect(running.proxy, &format!("{HOST}:{}", origin.addr.port())).await;
        assert_eq!(reply.status, 200);
        assert_echo(&mut fresh, b"after the upgrade").await;
    }
    stop.store(true, Ordering::Relaxed);
    for (id, s) in streams.into_iter().enumerate() {
        s.writer.await.unwrap();
        let echoed = tokio::time::timeout(Duration::from_secs(20), s.reader)
            .await
            .unwrap_or_else(|_| panic!("tunnel {id} did not finish"))
            .unwrap()
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(echoed, s.sent.load(Ordering::Relaxed), "tunnel {id}: every byte back");
    }
    let log = running.log();
    assert!(!log.contains("\"end\":\"error\""), "no tunnel ended in error");
    gaps.sort_unstable();
    let pct = |p: f64| gaps[((gaps.len() - 1) as f64 * p) as usize] as f64 / 1000.0;
    // Frames go every 20 ms: the longest gap per tunnel is 20 ms plus the pause.
    println!(
        "UPGRADE_PAUSE longest gap between echoed frames per tunnel and upgrade: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms over {} tunnel-upgrades",
        pct(0.50),
        pct(0.99),
        pct(1.0),
        gaps.len()
    );
}
