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

/// The streams' frame size.
const FRAME: u64 = 600;

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

/// The `n`th log line holding `needle`, waiting up to 30 s for it.
fn nth_line(running: &Running, needle: &str, n: usize) -> String {
    for _ in 0..3000 {
        let lines = running.lines.lock().unwrap();
        if let Some(line) = lines.iter().filter(|l| l.contains(needle)).nth(n - 1) {
            return line.clone();
        }
        drop(lines);
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("no line #{n} with {needle:?}:\n{}", running.log());
}

/// A field of a JSON log line as written: a number, or a string without its quotes.
fn field<'a>(line: &'a str, name: &str) -> &'a str {
    let key = format!("\"{name}\":");
    let start = line
        .find(&key)
        .unwrap_or_else(|| panic!("no {name} in {line}"))
        + key.len();
    let value = &line[start..];
    match value.strip_prefix('"') {
        Some(text) => &text[..text.find('"').unwrap()],
        None => &value[..value.find([',', '}']).unwrap()],
    }
}

/// Waits for the `n`th "handed over" line and returns the new process's pid.
fn handed_over(running: &Running, n: usize) -> u32 {
    field(&nth_line(running, "upgrade: handed over", n), "pid")
        .parse()
        .unwrap()
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
    local_port: u16,
    opened: Instant,
    sent: Arc<AtomicU64>,
    checked: Arc<AtomicU64>,
    /// The longest round trip of a frame (µs) since last reset: the pause an upgrade caused.
    worst_rtt: Arc<AtomicU64>,
    writer: tokio::task::JoinHandle<()>,
    reader: tokio::task::JoinHandle<Result<u64, String>>,
}

impl Stream {
    async fn open(proxy: SocketAddr, port: u16, id: u64, stop: Arc<AtomicBool>) -> Stream {
        let (reply, stream) = connect(proxy, &format!("{HOST}:{port}")).await;
        assert_eq!(reply.status, 200, "tunnel {id}");
        let local_port = stream.local_addr().unwrap().port();
        let (mut rd, mut wr) = stream.into_split();
        let sent = Arc::new(AtomicU64::new(0));
        let checked = Arc::new(AtomicU64::new(0));
        let worst_rtt = Arc::new(AtomicU64::new(0));
        // When each frame in flight was sent, oldest first.
        let in_flight = Arc::new(std::sync::Mutex::new(std::collections::VecDeque::new()));
        let sent_w = sent.clone();
        let in_flight_w = in_flight.clone();
        let writer = tokio::spawn(async move {
            // Random phase, then a frame every 20 ms.
            tokio::time::sleep(Duration::from_millis(id * 7 % 20)).await;
            let mut offset = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let frame: Vec<u8> = (offset..offset + FRAME).map(|o| byte_at(id, o)).collect();
                in_flight_w.lock().unwrap().push_back(Instant::now());
                if wr.write_all(&frame).await.is_err() {
                    return;
                }
                offset += FRAME;
                sent_w.store(offset, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let _ = wr.shutdown().await;
        });
        let (checked_r, rtt_r) = (checked.clone(), worst_rtt.clone());
        let reader = tokio::spawn(async move {
            let mut buf = vec![0u8; 8192];
            let mut offset = 0u64;
            loop {
                let n = rd
                    .read(&mut buf)
                    .await
                    .map_err(|e| format!("tunnel {id}: {e}"))?;
                if n == 0 {
                    return Ok(offset);
                }
                // Every frame completed by this read: its round trip.
                for _ in (offset / FRAME)..((offset + n as u64) / FRAME) {
                    if let Some(sent_at) = in_flight.lock().unwrap().pop_front() {
                        let rtt = sent_at.elapsed().as_micros() as u64;
                        rtt_r.fetch_max(rtt, Ordering::Relaxed);
                    }
                }
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
            local_port,
            opened: Instant::now(),
            sent,
            checked,
            worst_rtt,
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
    let running = Running::start(&world.path);
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
    // Each tunnel's worst frame round trip over a window: with an upgrade in it, and (for
    // comparison) without.
    let mut pauses = Vec::new();
    let mut quiet = Vec::new();
    let worst = |streams: &[Stream]| -> Vec<u64> {
        streams
            .iter()
            .map(|s| s.worst_rtt.swap(0, Ordering::Relaxed))
            .collect()
    };
    for n in 1..=10 {
        let floor: Vec<u64> = streams
            .iter()
            .map(|s| s.checked.load(Ordering::Relaxed))
            .collect();
        worst(&streams);
        let window = Instant::now();
        signal(pid, "USR2");
        let new = handed_over(&running, n);
        assert_ne!(new, pid);
        generations.0.push(new);
        // The old process has nothing left that cannot move: it exits.
        let gone = eventually(Duration::from_secs(10), || async { !alive(pid) }).await;
        assert!(
            gone,
            "upgrade {n}: old pid {pid} still there\n{}",
            running.log()
        );
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
        tokio::time::sleep(Duration::from_millis(100)).await;
        let window = window.elapsed();
        pauses.extend(worst(&streams));
        tokio::time::sleep(window).await;
        quiet.extend(worst(&streams));
        // And new tunnels open (the new process accepts on the same port).
        let (reply, mut fresh) =
            connect(running.proxy, &format!("{HOST}:{}", origin.addr.port())).await;
        assert_eq!(reply.status, 200);
        assert_echo(&mut fresh, b"after the upgrade").await;
    }
    // The last process counts every handed-over tunnel as its own.
    let (_, metrics) = http_get(running.admin, "/metrics").await;
    let active = support::metric_value(&metrics, &support::active_series(HOST));
    assert!(
        active >= TUNNELS as f64,
        "tunnels_active {active}\n{metrics}"
    );
    assert!(metrics.contains("portcullis_build_info{version="));
    stop.store(true, Ordering::Relaxed);
    let ports: Vec<(u16, Duration)> = streams
        .iter()
        .map(|s| (s.local_port, s.opened.elapsed()))
        .collect();
    let mut sent = Vec::new();
    for (id, s) in streams.into_iter().enumerate() {
        s.writer.await.unwrap();
        let echoed = tokio::time::timeout(Duration::from_secs(20), s.reader)
            .await
            .unwrap_or_else(|_| panic!("tunnel {id} did not finish"))
            .unwrap()
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            echoed,
            s.sent.load(Ordering::Relaxed),
            "tunnel {id}: every byte back"
        );
        sent.push(echoed);
    }
    // Each tunnel's close line tells its whole story: bytes and duration since it first
    // opened, two processes ago or ten.
    for (id, (port, opened_for)) in ports.iter().enumerate() {
        let client = format!("\"client\":\"127.0.0.1:{port}\"");
        let closed = nth_line(&running, &format!("\"tunnel_closed\",{client}"), 1);
        let field = |name: &str| -> u64 { field(&closed, name).parse().unwrap() };
        assert_eq!(field("bytes_upstream"), sent[id], "tunnel {id}: {closed}");
        assert_eq!(field("bytes_downstream"), sent[id], "tunnel {id}: {closed}");
        let duration = field("duration_ms");
        // Carried as wall-clock milliseconds from process to process.
        let floor = opened_for.as_millis().saturating_sub(50) as u64;
        assert!(duration >= floor, "{opened_for:?} {closed}");
    }
    let log = running.log();
    assert!(
        !log.contains("\"end\":\"error\""),
        "no tunnel ended in error"
    );
    let report = |what: &str, mut worst: Vec<u64>| {
        worst.sort_unstable();
        let pct = |p: f64| worst[((worst.len() - 1) as f64 * p) as usize] as f64 / 1000.0;
        println!(
            "UPGRADE_PAUSE {what}: worst frame round trip per tunnel and window: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms over {} tunnel-windows",
            pct(0.50),
            pct(0.99),
            pct(1.0),
            worst.len()
        );
    };
    report("with an upgrade", pauses);
    report("without (same tunnels, same window length)", quiet);
}

/// Replaces the file at `exe` with a shell script, as a broken package would.
fn replace_with_script(exe: &Path, body: &str) {
    use std::os::unix::fs::PermissionsExt;
    let next = exe.with_extension("new");
    std::fs::write(&next, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&next, std::fs::Permissions::from_mode(0o755)).unwrap();
    // A running executable cannot be written to; a package manager renames over it.
    std::fs::rename(&next, exe).unwrap();
}

/// The `n`th "upgrade failed" line's `result`.
fn failed(running: &Running, n: usize) -> String {
    field(&nth_line(running, "upgrade failed", n), "result").to_string()
}

/// Serving everything as before: the open tunnel, a new one, the admin port.
async fn still_serving(running: &Running, open: &mut TcpStream, port: u16) {
    assert!(alive(running.child.id()));
    assert_echo(open, b"the old process still relays").await;
    let (reply, mut fresh) = connect(running.proxy, &format!("{HOST}:{port}")).await;
    assert_eq!(reply.status, 200);
    assert_echo(&mut fresh, b"and accepts").await;
    assert_eq!(http_get(running.admin, "/readyz").await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_or_hanging_new_binary_leaves_the_old_one_serving() {
    let world = World::new().await;
    let origin = Origin::echo().await;
    let port = origin.addr.port();
    world.write_config(port, "upgrade_timeout = \"2s\"\n");
    let exe = world.own_binary();
    let running = Running::start_program(&exe, &world.path, None, &[]);
    let (reply, mut open) = connect(running.proxy, &format!("{HOST}:{port}")).await;
    assert_eq!(reply.status, 200);

    // A config the new process refuses (as `--check` would): it exits 1.
    let good = std::fs::read_to_string(&world.path).unwrap();
    std::fs::write(&world.path, format!("{good}\n[proxy]\nnonsense = 1\n")).unwrap();
    signal(running.child.id(), "USR2");
    assert_eq!(failed(&running, 1), "exited");
    std::fs::write(&world.path, &good).unwrap();
    still_serving(&running, &mut open, port).await;

    // A binary that exits at once.
    replace_with_script(&exe, "exit 1");
    signal(running.child.id(), "USR2");
    assert_eq!(failed(&running, 2), "exited");
    still_serving(&running, &mut open, port).await;

    // One that never reports: killed at `upgrade_timeout`.
    replace_with_script(&exe, "exec sleep 600");
    let asked = Instant::now();
    signal(running.child.id(), "USR2");
    assert_eq!(failed(&running, 3), "timeout");
    assert!(asked.elapsed() < Duration::from_secs(10));
    still_serving(&running, &mut open, port).await;
    let hung: Vec<u32> = running
        .lines
        .lock()
        .unwrap()
        .iter()
        .filter(|l| l.contains("upgrade: started the new process"))
        .map(|l| field(l, "pid").parse().unwrap())
        .collect();
    assert_eq!(hung.len(), 3);
    let reaped = eventually(Duration::from_secs(5), || {
        let any = hung.iter().any(|&pid| alive(pid));
        async move { !any }
    })
    .await;
    assert!(reaped, "the hanging new process was killed");

    let (_, metrics) = http_get(running.admin, "/metrics").await;
    assert!(
        metrics.contains("portcullis_upgrades_total{result=\"exited\"} 2"),
        "{metrics}"
    );
    assert!(metrics.contains("portcullis_upgrades_total{result=\"timeout\"} 1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tunnel_mid_splice_survives_with_the_bytes_in_its_pipe() {
    const SIZE: u64 = 16 * 1024 * 1024;
    let world = World::new().await;
    // An origin that reads nothing until told: bytes back up into the proxy's pipe.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    world.write_config(port, "");
    let running = Running::start(&world.path);
    let mut generations = Generations::default();
    let (reply, client) = connect(running.proxy, &format!("{HOST}:{port}")).await;
    assert_eq!(reply.status, 200);
    let (mut origin, _) = listener.accept().await.unwrap();
    let sent = Arc::new(AtomicU64::new(0));
    let sent_w = sent.clone();
    let writer = tokio::spawn(async move {
        let mut client = client;
        let mut offset = 0u64;
        while offset < SIZE {
            let chunk: Vec<u8> = (offset..offset + 65536).map(|o| byte_at(9, o)).collect();
            client.write_all(&chunk).await.unwrap();
            offset += 65536;
            sent_w.store(offset, Ordering::Relaxed);
        }
        client.shutdown().await.unwrap();
        client
    });
    // Wait until the writer stalls: every buffer on the way is full.
    let mut last = 0;
    loop {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let now = sent.load(Ordering::Relaxed);
        if now == last {
            break;
        }
        last = now;
    }
    assert!(last < SIZE, "the origin's silence holds the stream up");
    signal(running.child.id(), "USR2");
    generations.0.push(handed_over(&running, 1));
    let moved = wait_for(&running.lines, "upgrade: tunnel handed over");
    let in_pipes: u64 = field(&moved, "in_pipes").parse().unwrap();
    assert!(
        in_pipes > 0,
        "bytes were in the pipe when it moved: {moved}"
    );
    // Now the origin reads: every byte, in order, once.
    let mut buf = vec![0u8; 65536];
    let mut offset = 0u64;
    loop {
        let n = tokio::time::timeout(Duration::from_secs(20), origin.read(&mut buf))
            .await
            .expect("bytes keep coming")
            .unwrap();
        if n == 0 {
            break;
        }
        for (i, &b) in buf[..n].iter().enumerate() {
            assert_eq!(
                b,
                byte_at(9, offset + i as u64),
                "byte {}",
                offset + i as u64
            );
        }
        offset += n as u64;
    }
    assert_eq!(offset, SIZE);
    println!("in the pipe at the handover: {in_pipes} bytes");
    drop(writer.await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigusr2_while_draining_is_refused_and_the_drain_goes_on() {
    let world = World::new().await;
    let origin = Origin::echo().await;
    let port = origin.addr.port();
    world.write_config(port, "");
    let mut running = Running::start(&world.path);
    let (reply, mut open) = connect(running.proxy, &format!("{HOST}:{port}")).await;
    assert_eq!(reply.status, 200);
    running.signal("TERM");
    wait_for(&running.lines, "draining");
    running.signal("USR2");
    assert_eq!(failed(&running, 1), "draining");
    assert!(!running.log().contains("upgrade: started the new process"));
    assert_echo(&mut open, b"the drain goes on").await;
    drop(open);
    assert_eq!(running.wait_exit(Duration::from_secs(5)), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigusr2_twice_in_a_row_upgrades_once() {
    let world = World::new().await;
    let origin = Origin::echo().await;
    let port = origin.addr.port();
    world.write_config(port, "");
    let mut running = Running::start(&world.path);
    let mut generations = Generations::default();
    let (reply, mut open) = connect(running.proxy, &format!("{HOST}:{port}")).await;
    assert_eq!(reply.status, 200);
    running.signal("USR2");
    running.signal("USR2");
    let new = handed_over(&running, 1);
    generations.0.push(new);
    assert_eq!(running.wait_exit(Duration::from_secs(10)), Some(0));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let log = running.log();
    let started = log.matches("upgrade: started the new process").count();
    assert_eq!(started, 1, "one new process\n{log}");
    // The second signal is either merged with the first by the kernel or, arriving once the
    // first has finished, refused by the draining old process.
    let refused = log.matches("upgrade failed").count();
    assert!(refused <= 1);
    if refused == 1 {
        assert_eq!(failed(&running, 1), "draining");
    }
    assert_echo(&mut open, b"one upgrade, nothing cut").await;
    assert!(alive(new));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigusr2_during_a_reload_upgrades_to_the_reloaded_config() {
    let world = World::new().await;
    let origin = Origin::echo().await;
    let port = origin.addr.port();
    world.write_config(port, "");
    let running = Running::start(&world.path);
    let mut generations = Generations::default();
    let (reply, mut open) = connect(running.proxy, &format!("{HOST}:{port}")).await;
    assert_eq!(reply.status, 200);
    let other = "other.upgrade.test";
    world.dns.set(other, &["127.0.0.1".parse().unwrap()], 60);
    let (refused, _) = connect(running.proxy, &format!("{other}:{port}")).await;
    assert_eq!(refused.status, 403);
    let mut text = std::fs::read_to_string(&world.path).unwrap();
    text.push_str(&format!(
        "[[rule]]\nname = \"other\"\ndomains = [{other:?}]\nports = [\"{port}\"]\nsni = \"off\"\n"
    ));
    std::fs::write(&world.path, text).unwrap();
    running.signal("HUP");
    running.signal("USR2");
    generations.0.push(handed_over(&running, 1));
    let log = running.log();
    assert!(log.contains("config reloaded"), "{log}");
    let (reply, mut fresh) = connect(running.proxy, &format!("{other}:{port}")).await;
    assert_eq!(reply.status, 200, "the new process runs the reloaded file");
    assert_echo(&mut fresh, b"new rule").await;
    assert_echo(&mut open, b"old tunnel").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tunnels_on_a_tls_listener_stay_with_the_old_process_until_they_end() {
    use rustls::pki_types::ServerName;
    let world = World::new().await;
    let origin = Origin::echo().await;
    let port = origin.addr.port();
    let ca = support::tls::ca();
    let (cert, key) = ca.write_leaf(world.dir.path());
    let tls_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    world.write_config(port, "");
    let mut text = std::fs::read_to_string(&world.path).unwrap();
    let table = format!(
        "[[proxy.tls]]\nlisten = \"127.0.0.1:{tls_port}\"\ncert = {:?}\nkey = {:?}\n\n",
        cert.to_str().unwrap(),
        key.to_str().unwrap()
    );
    text = text.replacen("[proxy_protocol]", &format!("{table}[proxy_protocol]"), 1);
    std::fs::write(&world.path, text).unwrap();
    let mut running = Running::start(&world.path);
    let mut generations = Generations::default();
    let connector = tokio_rustls::TlsConnector::from(ca.client_config());
    let tls_tunnel = || async {
        let tcp = TcpStream::connect(("127.0.0.1", tls_port)).await.unwrap();
        let name = ServerName::try_from(support::tls::GATEWAY).unwrap();
        let mut tls = connector.connect(name, tcp).await.unwrap();
        let head = format!("CONNECT {HOST}:{port} HTTP/1.1\r\nHost: {HOST}:{port}\r\n\r\n");
        tls.write_all(head.as_bytes()).await.unwrap();
        let mut reply = Vec::new();
        while !reply.ends_with(b"\r\n\r\n") {
            let mut byte = [0u8; 1];
            assert_eq!(tls.read(&mut byte).await.unwrap(), 1);
            reply.push(byte[0]);
        }
        assert!(reply.starts_with(b"HTTP/1.1 200"));
        tls
    };
    let mut over_tls = tls_tunnel().await;
    echo_tls(&mut over_tls, b"before").await;
    let (reply, mut plain) = connect(running.proxy, &format!("{HOST}:{port}")).await;
    assert_eq!(reply.status, 200);

    signal(running.child.id(), "USR2");
    let new = handed_over(&running, 1);
    generations.0.push(new);
    let handed = wait_for(&running.lines, "upgrade: handed over");
    assert!(
        handed.contains("\"tunnels\":1"),
        "only the plain tunnel moves: {handed}"
    );
    // The old process keeps the TLS tunnel (its session keys cannot move) ...
    assert_eq!(running.wait_exit(Duration::from_millis(500)), None);
    echo_tls(&mut over_tls, b"still in the old process").await;
    assert_echo(&mut plain, b"in the new process").await;
    // ... while the new one serves the TLS listener for new clients.
    let mut fresh = tls_tunnel().await;
    echo_tls(&mut fresh, b"new TLS client").await;
    // Once the last TLS tunnel ends, the old process exits.
    drop(over_tls);
    assert_eq!(running.wait_exit(Duration::from_secs(5)), Some(0));
    assert!(alive(new));
    echo_tls(&mut fresh, b"unaffected").await;
}

async fn echo_tls(tls: &mut tokio_rustls::client::TlsStream<TcpStream>, data: &[u8]) {
    tls.write_all(data).await.unwrap();
    let mut back = vec![0u8; data.len()];
    tokio::time::timeout(Duration::from_secs(10), tls.read_exact(&mut back))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(back, data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn systemd_hears_ready_and_then_the_new_main_pid() {
    let world = World::new().await;
    let origin = Origin::echo().await;
    world.write_config(origin.addr.port(), "");
    let socket_path = world.dir.path().join("notify");
    let systemd = std::os::unix::net::UnixDatagram::bind(&socket_path).unwrap();
    systemd
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let exe = Path::new(env!("CARGO_BIN_EXE_portcullis"));
    let notify = socket_path.to_str().unwrap();
    let running = Running::start_program(exe, &world.path, None, &[("NOTIFY_SOCKET", notify)]);
    let mut generations = Generations::default();
    let mut message = vec![0u8; 512];
    let n = systemd.recv(&mut message).unwrap();
    let first = String::from_utf8_lossy(&message[..n]).to_string();
    assert_eq!(first, format!("READY=1\nMAINPID={}\n", running.child.id()));
    signal(running.child.id(), "USR2");
    let new = handed_over(&running, 1);
    generations.0.push(new);
    let n = systemd.recv(&mut message).unwrap();
    let second = String::from_utf8_lossy(&message[..n]).to_string();
    assert_eq!(second, format!("READY=1\nMAINPID={new}\n"));
}
