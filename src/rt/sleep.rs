//! A runtime-agnostic sleep: [`ThreadSleep`] starts one short-lived thread
//! per sleep that wakes the task when the time is up. The system clock uses
//! it for back-off and pacing sleeps when the `tokio` feature is off (with
//! it, tokio's timer is used instead); the crate sleeps rarely, so a thread
//! per sleep is cheap enough.
// With the `tokio` feature the clock uses tokio's timer and only the tests
// below use this one.
#![cfg_attr(feature = "tokio", allow(dead_code))]

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

#[derive(Default)]
struct State {
    done: bool,
    waker: Option<Waker>,
    started: bool,
}

/// A future that completes `duration` after it was first polled. A zero
/// duration completes at once, without a thread. The thread is started on
/// the first poll; later polls only update the waker to wake.
pub(crate) struct ThreadSleep {
    duration: Duration,
    state: Arc<Mutex<State>>,
}

impl ThreadSleep {
    /// A sleep of `duration`.
    pub(crate) fn new(duration: Duration) -> Self {
        Self {
            duration,
            state: Arc::default(),
        }
    }
}

impl Future for ThreadSleep {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        // The lock is never held across user code, so poisoning can only
        // come from a bug here; the state is still consistent.
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if state.done || self.duration.is_zero() {
            return Poll::Ready(());
        }
        state.waker = Some(cx.waker().clone());
        if !state.started {
            state.started = true;
            let shared = Arc::clone(&self.state);
            let duration = self.duration;
            std::thread::spawn(move || {
                std::thread::sleep(duration);
                let mut state = shared.lock().unwrap_or_else(PoisonError::into_inner);
                state.done = true;
                if let Some(w) = state.waker.take() {
                    w.wake();
                }
            });
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::task::Wake;
    use std::time::Instant;

    /// Unparks the polling thread when woken.
    struct Unpark(std::thread::Thread);

    impl Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }

    /// Polls `fut` to completion, parking between polls; returns the polls.
    fn block_on(fut: ThreadSleep) -> u32 {
        let waker = Waker::from(Arc::new(Unpark(std::thread::current())));
        let mut cx = Context::from_waker(&waker);
        let mut fut = Box::pin(fut);
        let mut polls = 0;
        loop {
            polls += 1;
            if fut.as_mut().poll(&mut cx).is_ready() {
                return polls;
            }
            std::thread::park_timeout(Duration::from_secs(5));
        }
    }

    #[test]
    fn sleeps_at_least_the_duration_and_wakes_the_task() {
        let start = Instant::now();
        let polls = block_on(ThreadSleep::new(Duration::from_millis(30)));
        assert!(start.elapsed() >= Duration::from_millis(30));
        // Woken by the timer thread, not by the 5 s park timeout.
        assert!(start.elapsed() < Duration::from_secs(4));
        assert!(polls >= 2);
    }

    #[test]
    fn zero_is_ready_at_once() {
        assert_eq!(block_on(ThreadSleep::new(Duration::ZERO)), 1);
    }
}
