//! Fuzzes the in-memory ledger against the rules every store must keep,
//! with arbitrary sequences of claims, completions, failures, releases,
//! ignores, requeues and clock moves over three event ids:
//!
//! - a first claim of an id is granted;
//! - at most one live lease per event: a claim is never granted while
//!   another lease on the same event is live;
//! - a completion or failure with a superseded lease is refused;
//! - "seen" is never "done": a claim answers duplicate only for an event
//!   that was completed, ignored or dead-lettered, never for one that failed
//!   and may still be retried;
//! - a completed event stays settled: every later claim is a duplicate;
//! - attempts never exceed the limit;
//! - the same id with another fingerprint is a conflict;
//! - an ignore records an event once: a known event is reported as known.
#![no_main]

use std::collections::HashMap;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use libfuzzer_sys::fuzz_target;
use stripe_webhook_guard::clock::ManualClock;
use stripe_webhook_guard::ledger::{
    ClaimOutcome, ClaimRequest, EventKey, Failure, Fingerprint, IgnoreOutcome, IgnoreRequest,
    Lease, LedgerState,
};
use stripe_webhook_guard::store::{EventLedger, MemoryStore};
use time::Duration;

const MAX_ATTEMPTS: u32 = 3;

/// Polls a future of the in-memory store, which never waits.
fn now<F: std::future::Future>(f: F) -> F::Output {
    let mut f = std::pin::pin!(f);
    match f.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(v) => v,
        Poll::Pending => panic!("the memory store never waits"),
    }
}

/// What the model knows of an event.
#[derive(Default)]
struct Known {
    fingerprint: Option<u8>,
    /// Settled for good: completed, ignored or dead.
    settled: bool,
    /// Failed with attempts left (must not be answered duplicate).
    retryable: bool,
    /// The live lease, with the clock second it runs out.
    holder: Option<(Lease, i64)>,
    /// Leases handed out before (superseded or not).
    old: Vec<Lease>,
}

fuzz_target!(|data: &[u8]| {
    let clock = ManualClock::at_unix(1_700_000_000);
    let store = MemoryStore::with_clock(Arc::new(clock.clone()));
    let mut known: HashMap<u8, Known> = HashMap::new();
    let mut t = 1_700_000_000i64;
    for op in data.chunks_exact(2).take(200) {
        let (code, arg) = (op[0], op[1]);
        let id = arg % 3;
        let fp = (arg >> 2) % 2;
        let key = EventKey::new(format!("evt_{id}"), None);
        let k = known.entry(id).or_default();
        match code % 7 {
            0 | 1 => {
                let request = ClaimRequest {
                    key: key.clone(),
                    event_type: "customer.subscription.updated".to_owned(),
                    event_created: 1,
                    fingerprint: Fingerprint([fp; 32]),
                    lease: Duration::seconds(10),
                    max_attempts: MAX_ATTEMPTS,
                };
                let first = k.fingerprint.is_none();
                let outcome = now(store.claim(&request)).expect("memory store");
                if let Some(stored) = k.fingerprint {
                    if stored != fp {
                        assert!(
                            matches!(outcome, ClaimOutcome::Conflict { .. }),
                            "{outcome:?}"
                        );
                        continue;
                    }
                }
                let live = k.holder.as_ref().is_some_and(|(_, until)| t < *until);
                match &outcome {
                    ClaimOutcome::Claimed(lease) => {
                        assert!(!k.settled, "a settled event was claimed again");
                        assert!(!live, "two live leases on one event");
                        assert!(lease.attempt <= MAX_ATTEMPTS, "attempts beyond the limit");
                        if let Some((old, _)) = k.holder.take() {
                            k.old.push(old);
                        }
                        k.holder = Some((lease.clone(), t + 10));
                        k.retryable = false;
                        k.fingerprint = Some(fp);
                    }
                    ClaimOutcome::Duplicate { .. } => {
                        assert!(!first, "a first claim answered duplicate");
                        assert!(!k.retryable, "a failed event answered duplicate");
                        assert!(k.settled || k.holder.is_some(), "duplicate of nothing");
                        k.settled = true;
                    }
                    ClaimOutcome::InFlight { .. } => {
                        assert!(!first && !k.settled, "in flight for {id}");
                    }
                    ClaimOutcome::DeadLettered { attempts } => {
                        assert!(*attempts <= MAX_ATTEMPTS);
                        k.settled = true;
                        k.retryable = false;
                    }
                    ClaimOutcome::Conflict { .. } => panic!("conflict with the same fingerprint"),
                    _ => {}
                }
            }
            2 => {
                // Complete with the newest lease, or (odd arg) a superseded one.
                let lease = if arg & 0x80 != 0 {
                    k.old.last().cloned()
                } else {
                    k.holder.as_ref().map(|(l, _)| l.clone())
                };
                let Some(lease) = lease else { continue };
                let current = k
                    .holder
                    .as_ref()
                    .is_some_and(|(l, _)| l.token == lease.token);
                let result = now(store.complete(&lease));
                if !current {
                    assert!(result.is_err(), "a superseded lease completed");
                } else if result.is_ok() {
                    k.settled = true;
                    k.retryable = false;
                }
            }
            3 => {
                let Some((lease, _)) = k.holder.clone() else {
                    continue;
                };
                let failure = Failure {
                    error: "fuzz".to_owned(),
                    retryable: arg & 1 == 0,
                    max_attempts: MAX_ATTEMPTS,
                    payload: None,
                };
                if let Ok(outcome) = now(store.fail(&lease, &failure)) {
                    let entry = now(store.get(&key)).expect("memory store").expect("entry");
                    match entry.state {
                        LedgerState::Failed => k.retryable = true,
                        LedgerState::Dead => k.settled = true,
                        other => panic!("after fail: {other:?} ({outcome:?})"),
                    }
                    k.old.push(lease);
                    k.holder = None;
                }
            }
            4 => {
                let Some((lease, _)) = k.holder.clone() else {
                    continue;
                };
                if now(store.release(&lease)).is_ok() {
                    k.retryable = true;
                    k.old.push(lease);
                    k.holder = None;
                }
            }
            5 => {
                let request = IgnoreRequest {
                    key: key.clone(),
                    event_type: "customer.created".to_owned(),
                    event_created: 1,
                    fingerprint: Fingerprint([fp; 32]),
                    reason: "fuzz".to_owned(),
                };
                let outcome = now(store.ignore(&request)).expect("memory store");
                if k.fingerprint.is_none() {
                    assert_eq!(outcome, IgnoreOutcome::Recorded, "a first ignore records");
                    k.fingerprint = Some(fp);
                    k.settled = true;
                } else {
                    assert!(
                        matches!(outcome, IgnoreOutcome::Known(_)),
                        "an ignore of a known event recorded it again: {outcome:?}"
                    );
                }
            }
            _ => {
                let by = i64::from(arg % 16);
                clock.advance(Duration::seconds(by));
                t += by;
            }
        }
    }
});
