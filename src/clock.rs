//! Time, injected. The pure core never reads a clock; the processor and the
//! reconciler ask a [`Clock`] for `now` and for back-off sleeps, so tests run
//! on a [`ManualClock`] whose sleeps advance virtual time instantly.
//!
//! A clock has two faces: [`Clock::now`], the wall clock (signature ages,
//! watermarks, access decisions), and [`Clock::monotonic`], a clock that
//! only moves forward and never jumps (lease deadlines). A lease is granted
//! by the store on the store's own clock (the database's); the pipeline
//! turns the time the store says is left into a monotonic deadline and never
//! compares its wall clock with a database timestamp, so an application
//! whose clock is minutes off the database's still holds leases for their
//! full length.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

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

    /// A monotonic instant, for lease deadlines: it never goes backwards
    /// and is unaffected by changes to the wall clock. Default:
    /// [`std::time::Instant::now`]. A virtual clock moves it with its
    /// virtual time.
    fn monotonic(&self) -> Instant {
        Instant::now()
    }
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
/// Its [`Clock::monotonic`] instant moves forward with every forward move
/// of the virtual time (`advance`, `sleep`, `set` to a later time) and stays
/// put when `set` moves the time backwards, as a real monotonic clock does
/// when the wall clock is stepped back.
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
    state: Arc<Mutex<ManualState>>,
}

struct ManualState {
    now: OffsetDateTime,
    /// The real instant the clock was made at: its monotonic origin.
    origin: Instant,
    /// Virtual time moved forward so far.
    elapsed: std::time::Duration,
}

impl ManualState {
    fn move_to(&mut self, to: OffsetDateTime) {
        let forward = std::time::Duration::try_from(to - self.now).unwrap_or_default();
        self.elapsed = self.elapsed.saturating_add(forward);
        self.now = to;
    }
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
            state: Arc::new(Mutex::new(ManualState {
                now: start,
                origin: Instant::now(),
                elapsed: std::time::Duration::ZERO,
            })),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, ManualState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A clock standing at `unix` seconds (out-of-range values clamp to the epoch).
    pub fn at_unix(unix: i64) -> Self {
        Self::new(OffsetDateTime::from_unix_timestamp(unix).unwrap_or(OffsetDateTime::UNIX_EPOCH))
    }

    /// Moves the clock to `to` (backwards too: tests of clock skew need it).
    pub fn set(&self, to: OffsetDateTime) {
        self.state().move_to(to);
    }

    /// Moves the clock forward by `by` (saturating at `time`'s range).
    pub fn advance(&self, by: Duration) {
        let mut state = self.state();
        let to = state.now.saturating_add(by);
        state.move_to(to);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> OffsetDateTime {
        self.state().now
    }

    fn monotonic(&self) -> Instant {
        let state = self.state();
        state
            .origin
            .checked_add(state.elapsed)
            .unwrap_or(state.origin)
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

    /// The monotonic face follows virtual time forward and never back.
    #[test]
    fn manual_clock_monotonic_moves_forward_only() {
        let c = ManualClock::at_unix(100);
        let t0 = c.monotonic();
        c.advance(Duration::seconds(5));
        assert_eq!(c.monotonic() - t0, std::time::Duration::from_secs(5));
        c.set(OffsetDateTime::UNIX_EPOCH);
        assert_eq!(c.monotonic() - t0, std::time::Duration::from_secs(5));
        c.set(OffsetDateTime::UNIX_EPOCH + Duration::seconds(2));
        assert_eq!(c.monotonic() - t0, std::time::Duration::from_secs(7));
        futures_lite_block_on(c.sleep(Duration::seconds(1)));
        assert_eq!(c.monotonic() - t0, std::time::Duration::from_secs(8));
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
