//! The claims a processor holds right now, so that a shutdown can give back
//! the ones whose work was stopped before it settled them.
//!
//! A claim is registered when the ledger grants it and forgotten when the
//! processor settles it (completed, failed, dead-lettered, lease lost). When
//! the future running the event is dropped in between (its task aborted at
//! shutdown, or a caller that gave up), the claim stays registered until
//! [`Held::take_all`] hands it to the release, or until its lease has run out
//! on the local monotonic clock (then the ledger will let the next delivery
//! take it anyway, and the entry is dropped the next time a claim is
//! registered, so the set never grows without bound).

use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use crate::ledger::Lease;

/// The registry; one per processor.
#[derive(Debug, Default)]
pub(crate) struct Held {
    leases: Mutex<Vec<(Lease, Instant)>>,
}

impl Held {
    fn lock(&self) -> MutexGuard<'_, Vec<(Lease, Instant)>> {
        // Nothing here can be left half-updated by a panic.
        self.leases.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers `lease`, which runs out `lease_for` from now; forgets the
    /// registered leases that have run out.
    pub(crate) fn hold(&self, lease: &Lease, lease_for: Duration) {
        let now = Instant::now();
        let mut leases = self.lock();
        leases.retain(|(_, until)| *until > now);
        leases.push((lease.clone(), now + lease_for));
    }

    /// Forgets `lease` (settled by the processor).
    pub(crate) fn settle(&self, lease: &Lease) {
        self.lock()
            .retain(|(l, _)| !(l.token == lease.token && l.key == lease.key));
    }

    /// The registered leases whose time has not run out.
    pub(crate) fn live(&self) -> Vec<Lease> {
        let now = Instant::now();
        self.lock()
            .iter()
            .filter(|(_, until)| *until > now)
            .map(|(l, _)| l.clone())
            .collect()
    }

    /// Removes and returns the registered leases whose time has not run out.
    pub(crate) fn take_all(&self) -> Vec<Lease> {
        let now = Instant::now();
        std::mem::take(&mut *self.lock())
            .into_iter()
            .filter(|(_, until)| *until > now)
            .map(|(l, _)| l)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::{EventKey, LeaseToken};

    fn lease(id: &str, token: u64) -> Lease {
        Lease {
            key: EventKey::new(id, None),
            token: LeaseToken(token),
            attempt: 1,
            expires_at: time::OffsetDateTime::UNIX_EPOCH,
            remaining: time::Duration::seconds(60),
        }
    }

    #[test]
    fn settled_leases_are_forgotten_and_the_rest_taken_once() {
        let held = Held::default();
        held.hold(&lease("evt_a", 1), Duration::from_secs(60));
        held.hold(&lease("evt_b", 2), Duration::from_secs(60));
        held.settle(&lease("evt_a", 1));
        // Same event, other token: not the registered claim.
        held.settle(&lease("evt_b", 3));
        assert_eq!(held.live(), vec![lease("evt_b", 2)]);
        assert_eq!(held.take_all(), vec![lease("evt_b", 2)]);
        assert!(held.take_all().is_empty());
    }

    #[test]
    fn run_out_leases_are_not_released_and_do_not_accumulate() {
        let held = Held::default();
        held.hold(&lease("evt_old", 1), Duration::ZERO);
        assert!(held.live().is_empty());
        held.hold(&lease("evt_new", 2), Duration::from_secs(60));
        assert_eq!(held.lock().len(), 1, "the run-out lease was dropped");
        assert_eq!(held.take_all(), vec![lease("evt_new", 2)]);
    }
}
