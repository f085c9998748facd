//! The store conformance suite (feature `test-util`): one async function per
//! rule that every store must follow. [`MemoryStore`](crate::store::MemoryStore) is
//! the reference; SQL stores and an application's own store run the same
//! functions.
//!
//! Each function takes a fresh, empty store and a [`Clock`] whose `sleep`
//! moves the store's clock past a lease: a [`ManualClock`](crate::clock::ManualClock)
//! shared with the store for the in-memory store, the system clock (real
//! sleeps) for a database whose leases run on its own clock. Leases in the
//! suite are [`LEASE`] long.
//!
//! The [`store_conformance_tests!`](crate::store_conformance_tests) macro
//! expands into one `#[tokio::test]` per rule:
//!
//! ```ignore
//! stripe_webhook_guard::store_conformance_tests!(memory, {
//!     let clock = std::sync::Arc::new(ManualClock::at_unix(1_700_000_000));
//!     (std::sync::Arc::new(MemoryStore::with_clock(clock.clone())), clock)
//! });
//! ```

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::{Arc, Mutex};

use time::{Duration, OffsetDateTime};

use crate::clock::Clock;
use crate::event::SubscriptionStatus;
use crate::ledger::{
    ClaimOutcome, ClaimRequest, EventKey, FailOutcome, Failure, Fingerprint, IgnoreOutcome,
    IgnoreRequest, Lease, LedgerQuery, LedgerState,
};
use crate::store::{
    CursorStore, EnqueueOutcome, EventLedger, InboxRequest, InboxStore, StoreErrorKind,
    SubscriptionQuery, SubscriptionStore,
};
use crate::subscription::{
    Anomaly, AnomalyKind, CustomerEntitlements, SubscriptionRecord, TieRank, Watermark,
    WatermarkSource,
};
use crate::subscription::{PauseCollection, SubscriptionItem};

/// The lease the suite takes.
pub const LEASE: Duration = Duration::milliseconds(300);

/// Waits past [`LEASE`] on the suite's clock.
async fn expire(clock: &dyn Clock) {
    clock.sleep(LEASE + Duration::milliseconds(200)).await;
}

fn fp(n: u8) -> Fingerprint {
    Fingerprint([n; 32])
}

/// A claim request for `id` with fingerprint `fp(1)`.
pub fn request(id: &str, max_attempts: u32) -> ClaimRequest {
    ClaimRequest {
        key: EventKey::new(id, None),
        event_type: "customer.subscription.updated".into(),
        event_created: 1_700_000_000,
        fingerprint: fp(1),
        lease: LEASE,
        max_attempts,
    }
}

fn failure(retryable: bool, max_attempts: u32) -> Failure {
    Failure {
        error: "boom".into(),
        retryable,
        max_attempts,
        payload: Some(r#"{"id":"evt"}"#.into()),
    }
}

async fn claimed<S: EventLedger + ?Sized>(store: &S, req: &ClaimRequest) -> Lease {
    match store.claim(req).await.expect("claim") {
        ClaimOutcome::Claimed(lease) => lease,
        other => panic!("expected a claim for {}, got {other:?}", req.key),
    }
}

mod inbox;
mod ledger;
mod records;

pub use inbox::*;
pub use ledger::*;
pub use records::*;

/// Expands to one `#[tokio::test]` per conformance rule for a store.
///
/// `$make` is an expression, evaluated once per test, returning
/// `(Arc<Store>, Arc<Clock>)`: a fresh store and the clock its leases run on.
/// It is expanded inside a module that has `use super::*;`.
#[macro_export]
macro_rules! store_conformance_tests {
    ($name:ident, $make:expr) => {
        $crate::__conformance_rules!($name, $make;
            store: [
                claim_inserts_processing, completed_is_duplicate, failed_is_claimed_again,
                live_lease_is_in_flight, expired_lease_is_claimed_again, completion_is_fenced,
                late_completion_without_takeover_is_allowed, dead_after_max_attempts,
                permanent_failure_is_dead, expiry_on_last_attempt_is_dead,
                fingerprint_conflict_is_refused, ignore_is_recorded_once,
                release_does_not_spend_an_attempt, dead_letters_are_listed_and_requeued,
                prune_keeps_recent_and_dead, account_is_part_of_the_key,
                inbox_orders_and_serializes, inbox_retries_and_recovers,
                inbox_adopts_an_abandoned_synchronous_claim, inbox_renew_extends_a_held_lease
            ],
            arc: [concurrent_claims_have_one_winner, inbox_concurrent_takes_are_disjoint],
            arc_clock: [
                take_serializes_each_subscription_under_contention,
                take_serializes_each_subscription_with_retries
            ],
            store_only: [
                subscription_save_is_versioned, subscription_lookups, subscription_listing,
                entitlements_are_versioned, cursors_round_trip
            ],
            arc_only: [concurrent_saves_have_one_winner]
        );
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __conformance_rules {
    ($name:ident, $make:expr;
     store: [$($s:ident),* $(,)?],
     arc: [$($a:ident),* $(,)?],
     arc_clock: [$($ac:ident),* $(,)?],
     store_only: [$($so:ident),* $(,)?],
     arc_only: [$($ao:ident),* $(,)?]) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $s() {
                    let (store, clock) = $make;
                    $crate::testing::conformance::$s(&*store, &*clock).await;
                }
            )*
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $a() {
                    let (store, clock) = $make;
                    $crate::testing::conformance::$a(store.clone(), &*clock).await;
                }
            )*
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $ac() {
                    let (store, clock) = $make;
                    $crate::testing::conformance::$ac(store.clone(), clock.clone()).await;
                }
            )*
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $so() {
                    let (store, _clock) = $make;
                    $crate::testing::conformance::$so(&*store).await;
                }
            )*
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $ao() {
                    let (store, _clock) = $make;
                    $crate::testing::conformance::$ao(store.clone()).await;
                }
            )*
        }
    };
}
