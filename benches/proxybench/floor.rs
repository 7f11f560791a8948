//! The floor: the least a CONNECT proxy built the way portcullis is built can do, as a peer
//! of its own (`proxybench floor`).
//!
//! Issue #16 sets targets as ratios to Squid and tinyproxy. Whether a missed one is
//! portcullis' own cost or the cost of the kernel and the runtime on this machine is a
//! measurement, not an argument: this relay does only what no CONNECT proxy can skip, on the
//! same runtime and thread design as portcullis (one current-thread tokio loop per core,
//! each accepting on its own `SO_REUSEPORT` socket, `TCP_NODELAY` inherited from the
//! listener), and nothing else: no allowlist, no DNS (the bench's names are a table lookup,
//! as a warm cache would be), no destination policy, no ClientHello check, no log line, no
//! metrics, no timeouts, no limits. It reads the request head, dials the origin, answers
//! 200 and copies both ways until either side closes; tunnels to the bulk origins splice
//! instead, from the first byte.
//!
//! Where portcullis' figure is close to this one, what is left of a target is below what
//! this machine allows a proxy of this design; the gap between them is what portcullis' own
//! work costs.

use std::io;
use std::net::SocketAddr;

use rustix::net::{AddressFamily, SocketFlags, SocketType, sockopt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::origin;

/// Where the floor relay listens.
pub const LISTEN: ([u8; 4], u16) = ([127, 0, 0, 1], 3132);

/// Serves forever on one event loop per core; prints `ready` once all listen.
pub fn serve() -> io::Result<()> {
    let addr = SocketAddr::from(LISTEN);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut threads = Vec::new();
    for _ in 0..cores {
        let listener = bind(addr)?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        threads.push(std::thread::spawn(move || {
            runtime.block_on(async move {
                let listener = TcpListener::from_std(listener).expect("a tokio listener");
                accept(listener).await;
            })
        }));
    }
    println!("ready");
    for thread in threads {
        let _ = thread.join();
    }
    Ok(())
}

fn bind(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let flags = SocketFlags::CLOEXEC | SocketFlags::NONBLOCK;
    let socket = rustix::net::socket_with(AddressFamily::INET, SocketType::STREAM, flags, None)?;
    sockopt::set_socket_reuseaddr(&socket, true)?;
    sockopt::set_socket_reuseport(&socket, true)?;
    // Accepted sockets inherit it, as in portcullis.
    sockopt::set_tcp_nodelay(&socket, true)?;
    rustix::net::bind(&socket, &addr)?;
    rustix::net::listen(&socket, 65_535)?;
    Ok(socket.into())
}

async fn accept(listener: TcpListener) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(async move {
                    let _ = tunnel(stream).await;
                });
            }
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(10)).await,
        }
    }
}

async fn tunnel(mut client: TcpStream) -> io::Result<()> {
    let mut buf = [0u8; 1024];
    let mut filled = 0;
    let end = loop {
        let n = client.read(&mut buf[filled..]).await?;
        if n == 0 {
            return Ok(());
        }
        filled += n;
        if let Some(at) = buf[..filled].windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        if filled == buf.len() {
            return Ok(());
        }
    };
    let Some((host, addr)) = destination(&buf[..end]) else {
        return Ok(());
    };
    let mut upstream = TcpStream::connect(addr).await?;
    upstream.set_nodelay(true)?;
    client
        .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
        .await?;
    if filled > end {
        upstream.write_all(&buf[end..filled]).await?;
    }
    if bulk(host) {
        tokio::try_join!(splice(&client, &upstream), splice(&upstream, &client))?;
    } else {
        tokio::io::copy_bidirectional(&mut client, &mut upstream).await?;
    }
    Ok(())
}

/// The bulk origins: their tunnels splice from the first byte, through a pipe already at its
/// largest, where portcullis copies the first 256 KiB and grows its pipe as it goes. A floor
/// may know its load.
fn bulk(host: &str) -> bool {
    host == origin::SINK || host == origin::SOURCE
}

/// One direction, socket → pipe → socket with `splice(2)`, until EOF; then the write side is
/// shut down, as a relay passes a half-close on.
async fn splice(from: &TcpStream, to: &TcpStream) -> io::Result<()> {
    use rustix::pipe::{PipeFlags, SpliceFlags, fcntl_setpipe_size, pipe_with};
    use tokio::io::Interest;
    let (read_end, write_end) = pipe_with(PipeFlags::CLOEXEC | PipeFlags::NONBLOCK)?;
    let capacity = fcntl_setpipe_size(&write_end, 1 << 20).unwrap_or(64 * 1024);
    let flags = SpliceFlags::MOVE | SpliceFlags::NONBLOCK;
    loop {
        from.readable().await?;
        let filled = from.try_io(Interest::READABLE, || {
            Ok(rustix::pipe::splice(
                from, None, &write_end, None, capacity, flags,
            )?)
        });
        let mut left = match filled {
            Ok(0) => return Ok(rustix::net::shutdown(to, rustix::net::Shutdown::Write)?),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        };
        while left > 0 {
            to.writable().await?;
            match to.try_io(Interest::WRITABLE, || {
                Ok(rustix::pipe::splice(
                    &read_end, None, to, None, left, flags,
                )?)
            }) {
                Ok(moved) => left -= moved,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
    }
}

/// `CONNECT host:443 ...`: the bench origin's name and address, or `None` for anything else.
fn destination(head: &[u8]) -> Option<(&'static str, SocketAddr)> {
    let line = head.split(|&b| b == b'\r').next()?;
    let line = std::str::from_utf8(line).ok()?;
    let target = line.strip_prefix("CONNECT ")?.split(' ').next()?;
    let (host, port) = target.rsplit_once(':')?;
    let (name, ip) = origin::ADDRESSES.iter().find(|(name, _)| *name == host)?;
    Some((name, SocketAddr::from((*ip, port.parse().ok()?))))
}
