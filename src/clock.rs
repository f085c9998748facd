//! Time, injected. The pure core never reads a clock; the processor and the
//! reconciler ask a [`Clock`] for `now` and for back-off sleeps, so tests run
//! on a [`ManualClock`] whose sleeps advance virtual time instantly.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};

use time::{Duration, OffsetDateTime};

/// A boxed `Send` future, as returned by [`Clock::sleep`].
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A source of the current time and of sleeps.
pub trait Clock: Send + Sync + fmt::Debug {
    /// The current time.
    fn now(&self) -> OffsetDateTime;

    /// Waits for `duration` (used for back-off and pacing). A virtual clock
    /// advances itself instead of waiting.
    fn sleep(&self, duration: Duration) -> BoxFuture<'_, ()>;
}

/// The system clock (UTC). Sleeps use tokio's timer with the `tokio` feature
/// (which `postgres`, `sqlite`, `reqwest`, `axum` and `test-util` enable;
/// sleeping then needs a tokio runtime), and a small thread timer otherwise,
/// so the core stays runtime-agnostic.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> OffsetDateTime {
        OffsetDateTime::now_utc()
    }

    fn sleep(&self, duration: Duration) -> BoxFuture<'_, ()> {
        let std_duration = std::time::Duration::try_from(duration).unwrap_or_default();
        #[cfg(feature = "tokio")]
        {
            Box::pin(tokio::time::sleep(std_duration))
        }
        #[cfg(not(feature = "tokio"))]
        {
            Box::pin(crate::rt::sleep::ThreadSleep::new(std_duration))
        }
    }
}

/// A clock that only moves when told to: `set`, `advance`, or a `sleep`
/// (which advances it by the slept duration and returns at once). Cloning
/// shares the same time.
///
/// ```
/// use stripe_webhook_guard::clock::{Clock, ManualClock};
/// use time::{Duration, OffsetDateTime};
/// let clock = ManualClock::new(OffsetDateTime::UNIX_EPOCH);
/// clock.advance(Duration::hours(1));
/// assert_eq!(clock.now().unix_timestamp(), 3600);
/// ```
#[derive(Clone)]
pub struct ManualClock {
    now: Arc<Mutex<OffsetDateTime>>,
}

impl fmt::Debug for ManualClock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("ManualClock").field(&self.now()).finish()
    }
}

impl ManualClock {
    /// A clock standing at `start`.
    pub fn new(start: OffsetDateTime) -> Self {
        Self {
            now: Arc::new(Mutex::new(start)),
        }
    }

    /// A clock standing at `unix` seconds (out-of-range values clamp to the epoch).
    pub fn at_unix(unix: i64) -> Self {
        Self::new(OffsetDateTime::from_unix_timestamp(unix).unwrap_or(OffsetDateTime::UNIX_EPOCH))
    }

    /// Moves the clock to `to` (backwards too: tests of clock skew need it).
    pub fn set(&self, to: OffsetDateTime) {
        *self.now.lock().unwrap_or_else(PoisonError::into_inner) = to;
    }

    /// Moves the clock forward by `by` (saturating at `time`'s range).
    pub fn advance(&self, by: Duration) {
        let mut now = self.now.lock().unwrap_or_else(PoisonError::into_inner);
        *now = now.saturating_add(by);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> OffsetDateTime {
        *self.now.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn sleep(&self, duration: Duration) -> BoxFuture<'_, ()> {
        if duration.is_positive() {
            self.advance(duration);
        }
        Box::pin(std::future::ready(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manual_clock_sleep_advances() {
        let c = ManualClock::at_unix(100);
        let shared = c.clone();
        futures_lite_block_on(c.sleep(Duration::seconds(5)));
        assert_eq!(shared.now().unix_timestamp(), 105);
        c.set(OffsetDateTime::UNIX_EPOCH);
        assert_eq!(shared.now().unix_timestamp(), 0);
    }

    #[tokio::test]
    async fn system_clock_sleeps() {
        let start = std::time::Instant::now();
        SystemClock.sleep(Duration::milliseconds(20)).await;
        assert!(start.elapsed() >= std::time::Duration::from_millis(20));
        SystemClock.sleep(Duration::seconds(-1)).await;
    }

    /// A minimal executor for these tests.
    fn futures_lite_block_on<F: Future>(fut: F) -> F::Output {
        use std::task::{Context, Poll, Wake, Waker};
        struct Unpark(std::thread::Thread);
        impl Wake for Unpark {
            fn wake(self: Arc<Self>) {
                self.0.unpark();
            }
        }
        let waker = Waker::from(Arc::new(Unpark(std::thread::current())));
        let mut cx = Context::from_waker(&waker);
        let mut fut = Box::pin(fut);
        loop {
            if let Poll::Ready(v) = fut.as_mut().poll(&mut cx) {
                return v;
            }
            std::thread::park_timeout(std::time::Duration::from_millis(50));
        }
    }
}
