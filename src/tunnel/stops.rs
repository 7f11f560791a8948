//! What ends or pauses a relay other than its own sockets (a drain running out, an upgrade
//! taking the tunnel; the relay adds its idle timer), watched at no cost per relayed frame.
//!
//! A streaming tunnel's task is woken for every frame, and `select!` polls every branch on
//! every wake. Polling a [`CancellationToken`]'s future takes two locks that every tunnel
//! waiting on that token shares (the token's own, and its `Notify`'s list of waiters), so
//! two tokens cost four shared locks per frame for signals that fire once a day: in a
//! profile of 300 streaming tunnels, 1.1% of portcullis' samples, or 8% of its user-space time.
//! [`WhenWoken`] polls such futures only after one of them woke the task.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, Wake, Waker};

use futures_util::task::AtomicWaker;
use tokio_util::sync::CancellationToken;

/// What ends or pauses a relay from outside.
#[derive(Clone, Copy)]
pub struct Stops<'a> {
    /// The drain timeout ran out: close.
    pub abort: &'a CancellationToken,
    /// An upgrade is handing tunnels to a new process: pause and give the tunnel back.
    pub park: &'a CancellationToken,
}

/// Which stop fired.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    Abort,
    Park,
}

impl Stops<'_> {
    /// Resolves when either signal fires. Costly to poll: see [`WhenWoken`].
    pub async fn fired(self) -> Stop {
        tokio::select! {
            biased;
            () = self.abort.cancelled() => Stop::Abort,
            () = self.park.cancelled() => Stop::Park,
        }
    }
}

/// Polls `future` once, then again only after `future` itself asked to be woken; a poll
/// caused by anything else (the task's other futures) returns `Pending` at once.
pub struct WhenWoken<F> {
    /// Boxed to pin it without an unsafe projection: one allocation per relay start.
    future: Pin<Box<F>>,
    signal: Arc<Signal>,
}

/// The waker `future` is given: it notes the wake, then wakes the task.
struct Signal {
    /// Starts set, so the first poll reaches `future`.
    woken: AtomicBool,
    task: AtomicWaker,
}

impl Wake for Signal {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.task.wake();
    }
}

impl<F: Future> WhenWoken<F> {
    pub fn new(future: F) -> WhenWoken<F> {
        WhenWoken {
            future: Box::pin(future),
            signal: Arc::new(Signal {
                woken: AtomicBool::new(true),
                task: AtomicWaker::new(),
            }),
        }
    }
}

impl<F: Future> Future for WhenWoken<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        // Registered before `woken` is read: a wake after the read then reaches this task.
        self.signal.task.register(cx.waker());
        if !self.signal.woken.swap(false, Ordering::AcqRel) {
            return Poll::Pending;
        }
        let waker = Waker::from(Arc::clone(&self.signal));
        self.future.as_mut().poll(&mut Context::from_waker(&waker))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;
    use std::time::Duration;

    use super::*;

    /// Counts its polls; ready once `ready` is set, waking the task through the waker it
    /// was last given when `kick` is called.
    struct Probe {
        polls: Arc<AtomicUsize>,
        ready: Arc<AtomicBool>,
        waker: Arc<std::sync::Mutex<Option<Waker>>>,
    }

    impl Future for Probe {
        type Output = ();
        fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            self.polls.fetch_add(1, Ordering::SeqCst);
            if self.ready.load(Ordering::SeqCst) {
                return Poll::Ready(());
            }
            *self.waker.lock().unwrap() = Some(cx.waker().clone());
            Poll::Pending
        }
    }

    #[tokio::test]
    async fn polls_the_future_only_when_it_was_woken() {
        let polls = Arc::new(AtomicUsize::new(0));
        let ready = Arc::new(AtomicBool::new(false));
        let waker = Arc::new(std::sync::Mutex::new(None::<Waker>));
        let probe = Probe {
            polls: polls.clone(),
            ready: ready.clone(),
            waker: waker.clone(),
        };
        let mut watched = std::pin::pin!(WhenWoken::new(probe));
        // Other wakes of the task (here: polling it by hand) do not reach the future.
        for _ in 0..100 {
            assert!(futures_util::poll!(watched.as_mut()).is_pending());
        }
        assert_eq!(polls.load(Ordering::SeqCst), 1);
        // Its own wake does, from another thread, and the task is woken for it.
        ready.store(true, Ordering::SeqCst);
        let kick = waker.lock().unwrap().take().expect("registered");
        std::thread::spawn(move || kick.wake()).join().unwrap();
        tokio::time::timeout(Duration::from_secs(5), watched)
            .await
            .expect("woken and ready");
        assert_eq!(polls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn fires_for_either_token_and_says_which() {
        let (abort, park) = (CancellationToken::new(), CancellationToken::new());
        let stops = Stops {
            abort: &abort,
            park: &park,
        };
        let mut fired = std::pin::pin!(WhenWoken::new(stops.fired()));
        assert!(futures_util::poll!(fired.as_mut()).is_pending());
        park.cancel();
        assert_eq!(fired.await, Stop::Park);

        let abort = CancellationToken::new();
        abort.cancel();
        let stops = Stops {
            abort: &abort,
            park: &park,
        };
        assert_eq!(stops.fired().await, Stop::Abort);
    }
}
