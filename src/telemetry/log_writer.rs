//! The log sink: lines are appended to a memory buffer and written to stdout in batches by a
//! thread of its own, every [`FLUSH_INTERVAL`] or sooner when the buffer fills.
//!
//! Why not one write per line, or a channel that wakes a writer per line: at thousands of
//! tunnels a second, each log line then costs a wake-up of another thread and a context switch
//! on a machine whose cores the data path needs. Here a line costs one short lock and a copy.
//! Logging never blocks the data path: a full buffer drops lines (and counts them), and a
//! closed or broken stdout only loses what is written to it.

use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use tracing_subscriber::fmt::MakeWriter;

/// How long a line may wait in memory before it is written.
pub const FLUSH_INTERVAL: Duration = Duration::from_millis(100);

/// Past this many buffered bytes the writer is woken early.
const HIGH_WATER: usize = 256 * 1024;

/// Past this many buffered bytes new lines are dropped rather than waited for.
const MAX_BUFFERED: usize = 16 * 1024 * 1024;

struct Inner {
    buffer: Mutex<Vec<u8>>,
    wake: Condvar,
    closing: AtomicBool,
    dropped: AtomicU64,
}

/// The `MakeWriter` handed to the tracing subscriber.
#[derive(Clone)]
pub struct BatchWriter {
    inner: Arc<Inner>,
}

/// Flushes what is left and stops the writer thread when dropped (at the end of `main`).
pub struct FlushGuard {
    inner: Arc<Inner>,
    thread: Option<JoinHandle<()>>,
}

/// Starts the writer thread over `out` (stdout in production).
pub fn batch_writer<W: Write + Send + 'static>(out: W) -> (BatchWriter, FlushGuard) {
    let inner = Arc::new(Inner {
        buffer: Mutex::new(Vec::with_capacity(HIGH_WATER)),
        wake: Condvar::new(),
        closing: AtomicBool::new(false),
        dropped: AtomicU64::new(0),
    });
    let worker = inner.clone();
    let thread = std::thread::Builder::new()
        .name("portcullis-log".into())
        .spawn(move || write_batches(&worker, out))
        .expect("the log thread starts");
    (
        BatchWriter {
            inner: inner.clone(),
        },
        FlushGuard {
            inner,
            thread: Some(thread),
        },
    )
}

fn write_batches<W: Write>(inner: &Inner, mut out: W) {
    let mut batch = Vec::with_capacity(HIGH_WATER);
    loop {
        let closing = {
            let buffer = inner.buffer.lock().unwrap_or_else(|e| e.into_inner());
            let (mut buffer, _) = inner
                .wake
                .wait_timeout(buffer, FLUSH_INTERVAL)
                .unwrap_or_else(|e| e.into_inner());
            std::mem::swap(&mut *buffer, &mut batch);
            inner.closing.load(Ordering::Acquire)
        };
        if !batch.is_empty() {
            // A closed stdout must not stop the proxy: what cannot be written is lost.
            let _ = out.write_all(&batch).and_then(|()| out.flush());
            batch.clear();
        }
        let dropped = inner.dropped.swap(0, Ordering::Relaxed);
        if dropped > 0 {
            let note = format!(
                "{{\"level\":\"WARN\",\"message\":\"log buffer full: {dropped} lines dropped\"}}\n"
            );
            let _ = out.write_all(note.as_bytes()).and_then(|()| out.flush());
        }
        if closing {
            return;
        }
    }
}

impl Drop for FlushGuard {
    fn drop(&mut self) {
        self.inner.closing.store(true, Ordering::Release);
        self.inner.wake.notify_one();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Write for BatchWriter {
    fn write(&mut self, line: &[u8]) -> io::Result<usize> {
        let mut buffer = self.inner.buffer.lock().unwrap_or_else(|e| e.into_inner());
        if buffer.len() + line.len() > MAX_BUFFERED {
            self.inner.dropped.fetch_add(1, Ordering::Relaxed);
        } else {
            buffer.extend_from_slice(line);
            if buffer.len() >= HIGH_WATER {
                self.inner.wake.notify_one();
            }
        }
        Ok(line.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for BatchWriter {
    type Writer = BatchWriter;

    fn make_writer(&'a self) -> BatchWriter {
        self.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `Write` that shares what it was given.
    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);

    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn lines_arrive_in_order_and_all_are_flushed_at_the_end() {
        let out = Shared::default();
        let (writer, guard) = batch_writer(out.clone());
        for i in 0..10_000 {
            writer
                .make_writer()
                .write_all(format!("line {i}\n").as_bytes())
                .unwrap();
        }
        drop(guard);
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 10_000);
        assert_eq!(lines[9_999], "line 9999");
    }

    /// A `Write` that always fails, like a closed stdout.
    struct Broken;

    impl Write for Broken {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            Err(io::ErrorKind::BrokenPipe.into())
        }
        fn flush(&mut self) -> io::Result<()> {
            Err(io::ErrorKind::BrokenPipe.into())
        }
    }

    #[test]
    fn a_broken_stdout_loses_lines_but_never_blocks() {
        let (writer, guard) = batch_writer(Broken);
        for _ in 0..100_000 {
            writer
                .make_writer()
                .write_all(b"a line that goes nowhere\n")
                .unwrap();
        }
        drop(guard);
    }
}
