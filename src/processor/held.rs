//! The claims a processor holds right now, so that a shutdown can give back
//! the ones whose work was stopped before it settled them.
//!
//! A claim is registered when the ledger grants it (a synchronous claim, or
//! an event an inbox worker took) and forgotten when the processor settles
//! it (completed, failed, dead-lettered, lease lost). When the future
//! running the event is dropped in between (its task aborted at shutdown, a
//! caller that gave up, an inbox worker cut off at its shutdown deadline),
//! the claim stays registered until [`Held::take_all`] hands it to the
//! release, or until its lease has run out (then the ledger will let the
//! next delivery take it anyway, and the entry is dropped the next time a
//! claim is registered, so the set never grows without bound).
//!
//! A lease runs out at its own monotonic deadline ([`Lease::deadline`]: the
//! time the store said was left, counted from before the store was asked),
//! compared with the processor clock's monotonic face
//! ([`crate::clock::Clock::monotonic`]); the caller passes that clock's
//! reading as `now`. No second clock and no configured lease length are
//! involved, so a lease the store granted for less (or renewed for more)
//! is tracked exactly.

use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use crate::ledger::Lease;

/// The registry; one per processor.
#[derive(Debug, Default)]
pub(crate) struct Held {
    leases: Mutex<Vec<(Lease, Instant)>>,
}

fn same(a: &Lease, b: &Lease) -> bool {
    a.token == b.token && a.key == b.key
}

impl Held {
    fn lock(&self) -> MutexGuard<'_, Vec<(Lease, Instant)>> {
        // Nothing here can be left half-updated by a panic.
        self.leases.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers `lease`, which runs out at `deadline` on the monotonic
    /// clock that read `now` (a renewed lease replaces its earlier entry);
    /// forgets the registered leases that have run out.
    pub(crate) fn hold(&self, lease: &Lease, deadline: Instant, now: Instant) {
        let mut leases = self.lock();
        leases.retain(|(l, until)| *until > now && !same(l, lease));
        leases.push((lease.clone(), deadline));
    }

    /// Forgets `lease` (settled by the processor).
    pub(crate) fn settle(&self, lease: &Lease) {
        self.lock().retain(|(l, _)| !same(l, lease));
    }

    /// The registered leases whose deadline is after `now`.
    pub(crate) fn live(&self, now: Instant) -> Vec<Lease> {
        self.lock()
            .iter()
            .filter(|(_, until)| *until > now)
            .map(|(l, _)| l.clone())
            .collect()
    }

    /// Removes and returns the registered leases whose deadline is after
    /// `now`.
    pub(crate) fn take_all(&self, now: Instant) -> Vec<Lease> {
        std::mem::take(&mut *self.lock())
            .into_iter()
            .filter(|(_, until)| *until > now)
            .map(|(l, _)| l)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::ledger::{EventKey, LeaseToken};

    fn lease(id: &str, token: u64, remaining: i64) -> Lease {
        Lease {
            key: EventKey::new(id, None),
            token: LeaseToken(token),
            attempt: 1,
            expires_at: time::OffsetDateTime::UNIX_EPOCH,
            remaining: time::Duration::seconds(remaining),
        }
    }

    #[test]
    fn settled_leases_are_forgotten_and_the_rest_taken_once() {
        let held = Held::default();
        let now = Instant::now();
        let (a, b) = (lease("evt_a", 1, 60), lease("evt_b", 2, 60));
        held.hold(&a, a.deadline(now), now);
        held.hold(&b, b.deadline(now), now);
        held.settle(&a);
        // Same event, other token: not the registered claim.
        held.settle(&lease("evt_b", 3, 60));
        assert_eq!(held.live(now), vec![b.clone()]);
        assert_eq!(held.take_all(now), vec![b]);
        assert!(held.take_all(now).is_empty());
    }

    #[test]
    fn run_out_leases_are_not_released_and_do_not_accumulate() {
        let held = Held::default();
        let now = Instant::now();
        let old = lease("evt_old", 1, 0);
        held.hold(&old, old.deadline(now), now);
        assert!(held.live(now).is_empty());
        let new = lease("evt_new", 2, 60);
        held.hold(&new, new.deadline(now), now);
        assert_eq!(held.lock().len(), 1, "the run-out lease was dropped");
        assert_eq!(held.take_all(now), vec![new]);
    }

    /// Expiry follows the lease's own deadline on the caller's monotonic
    /// clock: a 10 s lease is live at 9 s and gone at 10 s, whatever the
    /// processor's configured lease length is.
    #[test]
    fn expiry_is_the_leases_own_deadline_on_the_given_clock() {
        let held = Held::default();
        let asked = Instant::now();
        let short = lease("evt_short", 1, 10);
        held.hold(&short, short.deadline(asked), asked);
        let at = |s| asked + Duration::from_secs(s);
        assert_eq!(held.live(at(9)), vec![short.clone()]);
        assert!(held.live(at(10)).is_empty());
        // A renewal (same token, later deadline) replaces the entry.
        let renewed = lease("evt_short", 1, 30);
        held.hold(&renewed, renewed.deadline(at(9)), at(9));
        assert_eq!(held.lock().len(), 1);
        assert_eq!(held.take_all(at(38)), vec![renewed]);
    }
}
