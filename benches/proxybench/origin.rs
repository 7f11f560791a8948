//! The origin: three servers on port 443 of three loopback addresses, so every proxy can keep
//! the allowlist an AppStream deployment has (`*.amazonappstream.com`, port 443 only).
//!
//! - `echo.bench.amazonappstream.com` → 127.0.0.1:443 writes back whatever it reads;
//! - `sink.bench.amazonappstream.com` → 127.0.0.2:443 reads and discards (uploads);
//! - `source.bench.amazonappstream.com` → 127.0.0.3:443 writes without end (downloads);
//! - `silent.bench.amazonappstream.com` → 127.0.0.4:443 echoes, for tunnels that stay silent.
//!
//! It runs as its own process (`proxybench origin`), so that the load generator and the origin
//! each hold one end of every idle tunnel within their own open-file limit.

use std::io;
use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

pub const ECHO: &str = "echo.bench.amazonappstream.com";
pub const SINK: &str = "sink.bench.amazonappstream.com";
pub const SOURCE: &str = "source.bench.amazonappstream.com";
/// An echo origin of its own for tunnels that never send a byte: portcullis' rule for it
/// has `sni = "off"` (under `enforce` a silent tunnel is closed at `header_timeout`).
pub const SILENT: &str = "silent.bench.amazonappstream.com";
pub const PORT: u16 = 443;

/// Where each name resolves (the DNS server is told the same).
pub const ADDRESSES: [(&str, [u8; 4]); 4] = [
    (ECHO, [127, 0, 0, 1]),
    (SINK, [127, 0, 0, 2]),
    (SOURCE, [127, 0, 0, 3]),
    (SILENT, [127, 0, 0, 4]),
];

pub fn addr_of(name: &str) -> SocketAddr {
    let ip = ADDRESSES
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, ip)| *ip)
        .expect("a bench origin name");
    SocketAddr::from((ip, PORT))
}

/// Bulk transfers move this much per read or write call.
pub const CHUNK: usize = 256 * 1024;

fn listen(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(65_535)
}

/// Serves forever; prints `ready` on stdout once all four listen.
pub async fn serve() -> io::Result<()> {
    let echo = listen(addr_of(ECHO))?;
    let sink = listen(addr_of(SINK))?;
    let source = listen(addr_of(SOURCE))?;
    let silent = listen(addr_of(SILENT))?;
    tokio::spawn(accept(echo, Kind::Echo));
    tokio::spawn(accept(silent, Kind::Echo));
    tokio::spawn(accept(sink, Kind::Sink));
    tokio::spawn(accept(source, Kind::Source));
    println!("ready");
    std::future::pending::<()>().await;
    Ok(())
}

#[derive(Clone, Copy)]
enum Kind {
    Echo,
    Sink,
    Source,
}

async fn accept(listener: TcpListener, kind: Kind) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let _ = stream.set_nodelay(true);
                tokio::spawn(async move {
                    let _ = match kind {
                        Kind::Echo => echo(stream).await,
                        Kind::Sink => sink(stream).await,
                        Kind::Source => source(stream).await,
                    };
                });
            }
            Err(e) => {
                eprintln!("origin: accept: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
        }
    }
}

async fn echo(mut stream: TcpStream) -> io::Result<()> {
    let mut buf = vec![0u8; 4096];
    loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        stream.write_all(&buf[..n]).await?;
    }
}

async fn sink(mut stream: TcpStream) -> io::Result<()> {
    let mut buf = vec![0u8; CHUNK];
    while stream.read(&mut buf).await? != 0 {}
    Ok(())
}

async fn source(stream: TcpStream) -> io::Result<()> {
    let (mut read, mut write) = stream.into_split();
    // The client's ClientHello (and anything else it says) is read and dropped.
    tokio::spawn(async move {
        let mut buf = vec![0u8; 4096];
        while matches!(read.read(&mut buf).await, Ok(n) if n > 0) {}
    });
    let buf = vec![0x17u8; CHUNK];
    loop {
        write.write_all(&buf).await?;
    }
}
