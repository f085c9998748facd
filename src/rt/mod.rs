//! Small runtime helpers shared by the async glue: back-off with jitter and
//! (in submodules) the few future combinators the crate needs without
//! depending on an async runtime. Private: nothing here is public API.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The delay before retry number `retry` (1 for the first retry) of an
/// operation: exponential back-off with "equal jitter". The un-jittered delay
/// is `base × 2^(retry − 1)`, capped at `cap` (and never below `base`); the
/// result lies uniformly between half of it and all of it, so concurrent
/// retriers spread out while each still waits at least half the nominal time.
///
/// A server's `Retry-After` (or a similar hint) is applied by the caller on
/// top: `hint.max(backoff(...))`, so the hint is never undercut.
pub(crate) fn backoff(retry: u32, base: Duration, cap: Duration) -> Duration {
    let cap = cap.max(base);
    let factor = 1u32 << retry.saturating_sub(1).min(20);
    let full = base.saturating_mul(factor).min(cap);
    let half = full / 2;
    let spread = u64::try_from((full - half).as_nanos()).unwrap_or(u64::MAX);
    let extra = if spread == 0 {
        0
    } else {
        jitter() % spread.saturating_add(1)
    };
    half + Duration::from_nanos(extra)
}

/// A cheap pseudo-random number for jitter: a process-wide counter mixed
/// with the wall clock's nanoseconds through SplitMix64. Not for
/// cryptography; the one jitter source of the crate.
pub(crate) fn jitter() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| {
        d.as_secs() ^ u64::from(d.subsec_nanos()).rotate_left(32)
    });
    splitmix64(now ^ n.wrapping_mul(0x9E37_79B9_7F4A_7C15))
}

fn splitmix64(seed: u64) -> u64 {
    let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_stays_within_half_and_full_of_the_capped_exponential() {
        let base = Duration::from_millis(100);
        let cap = Duration::from_secs(2);
        for retry in 1..=30 {
            let full = (base * (1u32 << (retry - 1).min(20))).min(cap);
            for _ in 0..200 {
                let d = backoff(retry, base, cap);
                assert!(
                    d >= full / 2 && d <= full,
                    "retry {retry}: {d:?} vs {full:?}"
                );
            }
        }
    }

    #[test]
    fn backoff_handles_zero_and_huge_inputs() {
        assert_eq!(backoff(1, Duration::ZERO, Duration::ZERO), Duration::ZERO);
        let d = backoff(u32::MAX, Duration::MAX, Duration::MAX);
        assert!(d >= Duration::MAX / 2);
        // A cap below the base is raised to the base.
        let d = backoff(5, Duration::from_secs(1), Duration::from_millis(1));
        assert!(d >= Duration::from_millis(500) && d <= Duration::from_secs(1));
    }

    #[test]
    fn jitter_varies() {
        let a: Vec<u64> = (0..8).map(|_| jitter()).collect();
        assert!(a.windows(2).any(|w| w[0] != w[1]));
    }
}
