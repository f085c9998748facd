//! The store conformance suite (feature `test-util`): one async function per
//! rule that every store must follow. [`MemoryStore`](super::MemoryStore) is
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

use super::{
    CursorStore, EnqueueOutcome, EventLedger, InboxRequest, InboxStore, StoreErrorKind,
    SubscriptionQuery, SubscriptionStore,
};
use crate::clock::Clock;
use crate::event::SubscriptionStatus;
use crate::ledger::{
    ClaimOutcome, ClaimRequest, EventKey, FailOutcome, Failure, Fingerprint, IgnoreRequest, Lease,
    LedgerQuery, LedgerState,
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

/// Rule 1: the first claim inserts a processing entry, attempt 1, with a
/// lease in the future.
pub async fn claim_inserts_processing<S: EventLedger + ?Sized>(store: &S, clock: &dyn Clock) {
    let req = request("evt_conf_insert", 5);
    let lease = claimed(store, &req).await;
    assert_eq!(lease.attempt, 1);
    assert_eq!(lease.key, req.key);
    let e = store.get(&req.key).await.unwrap().expect("entry exists");
    assert_eq!(e.state, LedgerState::Processing);
    assert_eq!(e.attempts, 1);
    assert_eq!(e.fingerprint, req.fingerprint);
    assert_eq!(e.event_type, req.event_type);
    assert_eq!(e.event_created, req.event_created);
    assert!(e.lease_expires_at.is_some());
    let _ = clock;
}

/// Rule 1: of many concurrent claims exactly one wins; the others are told
/// the event is in flight.
pub async fn concurrent_claims_have_one_winner<S: EventLedger + ?Sized + 'static>(
    store: Arc<S>,
    clock: &dyn Clock,
) {
    let _ = clock;
    let req = request("evt_conf_race", 5);
    let mut tasks = Vec::new();
    for _ in 0..32 {
        let store = store.clone();
        let req = req.clone();
        tasks.push(tokio::spawn(async move { store.claim(&req).await }));
    }
    let mut won = 0;
    let mut in_flight = 0;
    for t in tasks {
        match t.await.expect("task").expect("claim") {
            ClaimOutcome::Claimed(_) => won += 1,
            ClaimOutcome::InFlight { .. } => in_flight += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!((won, in_flight), (1, 31));
}

/// Rule 2: a completed event is a duplicate; its payload is dropped.
pub async fn completed_is_duplicate<S: EventLedger + ?Sized>(store: &S, clock: &dyn Clock) {
    let _ = clock;
    let req = request("evt_conf_done", 5);
    let lease = claimed(store, &req).await;
    store.complete(&lease).await.unwrap();
    assert_eq!(
        store.claim(&req).await.unwrap(),
        ClaimOutcome::Duplicate {
            state: LedgerState::Processed
        }
    );
    let e = store.get(&req.key).await.unwrap().unwrap();
    assert_eq!(e.state, LedgerState::Processed);
    assert_eq!(e.payload, None);
}

/// Rule 2: a failed event is claimed again, never a duplicate; the payload
/// and error are kept.
pub async fn failed_is_claimed_again<S: EventLedger + ?Sized>(store: &S, clock: &dyn Clock) {
    let _ = clock;
    let req = request("evt_conf_failed", 5);
    let lease = claimed(store, &req).await;
    assert_eq!(
        store.fail(&lease, &failure(true, 5)).await.unwrap(),
        FailOutcome::Failed { attempts: 1 }
    );
    let e = store.get(&req.key).await.unwrap().unwrap();
    assert_eq!(e.state, LedgerState::Failed);
    assert_eq!(e.last_error.as_deref(), Some("boom"));
    assert_eq!(e.payload.as_deref(), Some(r#"{"id":"evt"}"#));
    let again = claimed(store, &req).await;
    assert_eq!(again.attempt, 2);
    assert_ne!(again.token, lease.token);
}

/// Rule 2: a live lease answers "in flight".
pub async fn live_lease_is_in_flight<S: EventLedger + ?Sized>(store: &S, clock: &dyn Clock) {
    let _ = clock;
    let req = request("evt_conf_live", 5);
    let lease = claimed(store, &req).await;
    match store.claim(&req).await.unwrap() {
        ClaimOutcome::InFlight { until } => assert_eq!(until, lease.expires_at),
        other => panic!("expected in flight, got {other:?}"),
    }
}

/// Rules 2 and 6: an expired lease is claimed again, as the next attempt.
pub async fn expired_lease_is_claimed_again<S: EventLedger + ?Sized>(store: &S, clock: &dyn Clock) {
    let req = request("evt_conf_expired", 5);
    let first = claimed(store, &req).await;
    expire(clock).await;
    let second = claimed(store, &req).await;
    assert_eq!(second.attempt, 2);
    assert_ne!(first.token, second.token);
}

/// Rule 3: the superseded holder can neither complete nor fail; the new
/// holder completes.
pub async fn completion_is_fenced<S: EventLedger + ?Sized>(store: &S, clock: &dyn Clock) {
    let req = request("evt_conf_fence", 5);
    let zombie = claimed(store, &req).await;
    expire(clock).await;
    let holder = claimed(store, &req).await;
    let err = store.complete(&zombie).await.unwrap_err();
    assert_eq!(err.kind(), StoreErrorKind::LeaseLost);
    let err = store.fail(&zombie, &failure(true, 5)).await.unwrap_err();
    assert_eq!(err.kind(), StoreErrorKind::LeaseLost);
    let err = store.release(&zombie).await.unwrap_err();
    assert_eq!(err.kind(), StoreErrorKind::LeaseLost);
    store.complete(&holder).await.unwrap();
    // The holder may repeat its completion (a lost answer); the zombie still may not.
    store.complete(&holder).await.unwrap();
    let err = store.complete(&zombie).await.unwrap_err();
    assert_eq!(err.kind(), StoreErrorKind::LeaseLost);
    assert_eq!(
        store.get(&req.key).await.unwrap().unwrap().state,
        LedgerState::Processed
    );
}

/// Rule 3: a holder whose lease ran out but was not taken over may still
/// complete (its token is the current one).
pub async fn late_completion_without_takeover_is_allowed<S: EventLedger + ?Sized>(
    store: &S,
    clock: &dyn Clock,
) {
    let req = request("evt_conf_late", 5);
    let lease = claimed(store, &req).await;
    expire(clock).await;
    store.complete(&lease).await.unwrap();
    assert_eq!(
        store.claim(&req).await.unwrap(),
        ClaimOutcome::Duplicate {
            state: LedgerState::Processed
        }
    );
}

/// Rule 4: after `max_attempts` failed attempts the event is dead,
/// acknowledged as a duplicate, and keeps its error and payload.
pub async fn dead_after_max_attempts<S: EventLedger + ?Sized>(store: &S, clock: &dyn Clock) {
    let _ = clock;
    let req = request("evt_conf_dead", 3);
    for attempt in 1..=3 {
        let lease = claimed(store, &req).await;
        assert_eq!(lease.attempt, attempt);
        let out = store.fail(&lease, &failure(true, 3)).await.unwrap();
        if attempt < 3 {
            assert_eq!(out, FailOutcome::Failed { attempts: attempt });
        } else {
            assert_eq!(out, FailOutcome::Dead { attempts: 3 });
        }
    }
    assert_eq!(
        store.claim(&req).await.unwrap(),
        ClaimOutcome::Duplicate {
            state: LedgerState::Dead
        }
    );
    let e = store.get(&req.key).await.unwrap().unwrap();
    assert_eq!(e.state, LedgerState::Dead);
    assert_eq!(e.attempts, 3);
    assert_eq!(e.last_error.as_deref(), Some("boom"));
    assert!(e.payload.is_some());
}

/// Rule 4: a permanent failure is dead at once.
pub async fn permanent_failure_is_dead<S: EventLedger + ?Sized>(store: &S, clock: &dyn Clock) {
    let _ = clock;
    let req = request("evt_conf_permanent", 5);
    let lease = claimed(store, &req).await;
    assert_eq!(
        store.fail(&lease, &failure(false, 5)).await.unwrap(),
        FailOutcome::Dead { attempts: 1 }
    );
}

/// Rule 4: a lease that expires on the last attempt (a worker that dies on
/// this event every time) ends dead, not claimed forever.
pub async fn expiry_on_last_attempt_is_dead<S: EventLedger + ?Sized>(store: &S, clock: &dyn Clock) {
    let req = request("evt_conf_crashloop", 2);
    let _ = claimed(store, &req).await;
    expire(clock).await;
    let second = claimed(store, &req).await;
    assert_eq!(second.attempt, 2);
    expire(clock).await;
    assert_eq!(
        store.claim(&req).await.unwrap(),
        ClaimOutcome::DeadLettered { attempts: 2 }
    );
    let e = store.get(&req.key).await.unwrap().unwrap();
    assert_eq!(e.state, LedgerState::Dead);
    assert!(e.last_error.is_some());
}

/// Rule 5: the same id with another fingerprint is refused, in any state.
pub async fn fingerprint_conflict_is_refused<S: EventLedger + ?Sized>(
    store: &S,
    clock: &dyn Clock,
) {
    let _ = clock;
    let req = request("evt_conf_conflict", 5);
    let lease = claimed(store, &req).await;
    let other = ClaimRequest {
        fingerprint: fp(2),
        ..req.clone()
    };
    assert!(matches!(
        store.claim(&other).await.unwrap(),
        ClaimOutcome::Conflict { stored } if stored == fp(1)
    ));
    store.complete(&lease).await.unwrap();
    assert!(matches!(
        store.claim(&other).await.unwrap(),
        ClaimOutcome::Conflict { .. }
    ));
}

/// Ignored events are recorded once and acknowledged as duplicates; an
/// existing entry is never overwritten by an ignore.
pub async fn ignore_is_recorded_once<S: EventLedger + ?Sized>(store: &S, clock: &dyn Clock) {
    let _ = clock;
    let ignore = IgnoreRequest {
        key: EventKey::new("evt_conf_ignored", None),
        event_type: "charge.refunded".into(),
        event_created: 1,
        fingerprint: fp(1),
        reason: "unhandled_type".into(),
    };
    assert_eq!(store.ignore(&ignore).await.unwrap(), LedgerState::Ignored);
    assert_eq!(store.ignore(&ignore).await.unwrap(), LedgerState::Ignored);
    let e = store.get(&ignore.key).await.unwrap().unwrap();
    assert_eq!(e.ignore_reason.as_deref(), Some("unhandled_type"));
    let req = ClaimRequest {
        key: ignore.key.clone(),
        ..request("evt_conf_ignored", 5)
    };
    assert_eq!(
        store.claim(&req).await.unwrap(),
        ClaimOutcome::Duplicate {
            state: LedgerState::Ignored
        }
    );
    // An event already claimed is not turned into an ignored one.
    let busy = request("evt_conf_ignored_busy", 5);
    let _ = claimed(store, &busy).await;
    let ignore_busy = IgnoreRequest {
        key: busy.key.clone(),
        ..ignore
    };
    assert_eq!(
        store.ignore(&ignore_busy).await.unwrap(),
        LedgerState::Processing
    );
}

/// Release gives a claim back without spending the attempt.
pub async fn release_does_not_spend_an_attempt<S: EventLedger + ?Sized>(
    store: &S,
    clock: &dyn Clock,
) {
    let _ = clock;
    let req = request("evt_conf_release", 5);
    let lease = claimed(store, &req).await;
    store.release(&lease).await.unwrap();
    let e = store.get(&req.key).await.unwrap().unwrap();
    assert_eq!(e.state, LedgerState::Failed);
    assert_eq!(e.attempts, 0);
    assert_eq!(claimed(store, &req).await.attempt, 1);
}

/// Dead letters can be listed and requeued for replay.
pub async fn dead_letters_are_listed_and_requeued<S: EventLedger + ?Sized>(
    store: &S,
    clock: &dyn Clock,
) {
    let _ = clock;
    for id in ["evt_conf_list_a", "evt_conf_list_b", "evt_conf_list_c"] {
        let req = request(id, 1);
        let lease = claimed(store, &req).await;
        if id == "evt_conf_list_b" {
            store.complete(&lease).await.unwrap();
        } else {
            store.fail(&lease, &failure(true, 1)).await.unwrap();
        }
    }
    let dead = store
        .list(&LedgerQuery::states(&[LedgerState::Dead], 10))
        .await
        .unwrap();
    let ids: Vec<_> = dead.iter().map(|e| e.key.event_id.as_str()).collect();
    assert_eq!(ids, ["evt_conf_list_a", "evt_conf_list_c"]);
    let page = store
        .list(&LedgerQuery {
            states: vec![LedgerState::Dead],
            after: Some("evt_conf_list_a".into()),
            limit: 1,
        })
        .await
        .unwrap();
    assert_eq!(page.len(), 1);
    assert_eq!(page[0].key.event_id, "evt_conf_list_c");
    let all = store.list(&LedgerQuery::states(&[], 0)).await.unwrap();
    assert!(all.len() >= 3);

    let key = EventKey::new("evt_conf_list_a", None);
    assert!(store.requeue(&key).await.unwrap());
    assert!(
        !store
            .requeue(&EventKey::new("evt_conf_list_b", None))
            .await
            .unwrap()
    );
    assert!(
        !store
            .requeue(&EventKey::new("evt_conf_nope", None))
            .await
            .unwrap()
    );
    let lease = claimed(store, &request("evt_conf_list_a", 1)).await;
    assert_eq!(lease.attempt, 1);
    store.complete(&lease).await.unwrap();
}

/// Pruning removes old processed and ignored entries only.
pub async fn prune_keeps_recent_and_dead<S: EventLedger + ?Sized>(store: &S, clock: &dyn Clock) {
    let old = request("evt_conf_prune_old", 1);
    let lease = claimed(store, &old).await;
    store.complete(&lease).await.unwrap();
    let dead = request("evt_conf_prune_dead", 1);
    let lease = claimed(store, &dead).await;
    store.fail(&lease, &failure(true, 1)).await.unwrap();
    store
        .ignore(&IgnoreRequest {
            key: EventKey::new("evt_conf_prune_ignored", None),
            event_type: "x".into(),
            event_created: 1,
            fingerprint: fp(1),
            reason: "r".into(),
        })
        .await
        .unwrap();
    clock.sleep(Duration::seconds(2)).await;
    let cutoff = clock.now() - Duration::seconds(1);
    let recent = request("evt_conf_prune_recent", 1);
    let lease = claimed(store, &recent).await;
    store.complete(&lease).await.unwrap();
    let removed = store.prune(cutoff).await.unwrap();
    assert_eq!(removed, 2);
    assert!(store.get(&old.key).await.unwrap().is_none());
    assert!(store.get(&dead.key).await.unwrap().is_some());
    assert!(store.get(&recent.key).await.unwrap().is_some());
}

/// The key includes the Connect account.
pub async fn account_is_part_of_the_key<S: EventLedger + ?Sized>(store: &S, clock: &dyn Clock) {
    let _ = clock;
    let platform = request("evt_conf_acct", 5);
    let connected = ClaimRequest {
        key: EventKey::new("evt_conf_acct", Some("acct_1")),
        ..platform.clone()
    };
    let a = claimed(store, &platform).await;
    let b = claimed(store, &connected).await;
    store.complete(&a).await.unwrap();
    store.complete(&b).await.unwrap();
    assert_eq!(
        store
            .get(&connected.key)
            .await
            .unwrap()
            .unwrap()
            .key
            .account
            .as_deref(),
        Some("acct_1")
    );
}

/// A record with every field set, to check nothing is lost in storage.
pub fn full_record(id: &str, customer: &str) -> SubscriptionRecord {
    let mut r = SubscriptionRecord::new(id);
    r.state.customer = Some(customer.into());
    r.state.status = SubscriptionStatus::PastDue;
    r.state.items = vec![
        SubscriptionItem {
            id: Some("si_1".into()),
            price_id: Some("price_1".into()),
            quantity: Some(2),
            current_period_start: Some(1_700_000_000),
            current_period_end: Some(1_702_592_000),
        },
        SubscriptionItem {
            id: Some("si_2".into()),
            price_id: None,
            quantity: None,
            current_period_start: None,
            current_period_end: None,
        },
    ];
    r.state.current_period_start = Some(1_700_000_000);
    r.state.current_period_end = Some(1_702_592_000);
    r.state.trial_start = Some(1);
    r.state.trial_end = Some(2);
    r.state.cancel_at_period_end = true;
    r.state.cancel_at = Some(3);
    r.state.canceled_at = Some(4);
    r.state.ended_at = None;
    r.state.pause_collection = Some(PauseCollection {
        behavior: Some("void".into()),
        resumes_at: Some(5),
    });
    r.state.latest_invoice = Some("in_1".into());
    r.latest_invoice_paid = Some(false);
    r.paid_through = Some(1_702_592_000);
    r.last_paid_at = Some(6);
    r.last_payment_failed_at = Some(7);
    r.watermark = Some(Watermark {
        created: 1_700_000_100,
        event_id: "evt_w".into(),
        rank: TieRank {
            terminal: false,
            period_end: 1_702_592_000,
            phase: 1,
        },
        source: WatermarkSource::Event,
    });
    r.invoice_watermark = Some((1_700_000_050, "evt_i".into()));
    r.last_verified_with_stripe = OffsetDateTime::from_unix_timestamp(1_700_000_200).ok();
    r.client_reference_id = Some(format!("user_{customer}"));
    r.checkout_session = Some("cs_1".into());
    r.livemode = Some(false);
    r.account = None;
    r.anomalies = vec![Anomaly {
        at: 8,
        event_id: Some("evt_a".into()),
        kind: AnomalyKind::MissedTransition,
        detail: "active -> unpaid".into(),
    }];
    r.needs_review = true;
    r.needs_reconcile = true;
    r
}

/// Records round-trip with every field intact; saves are compare-and-set on
/// the version.
pub async fn subscription_save_is_versioned<S: SubscriptionStore + ?Sized>(store: &S) {
    let record = full_record("sub_conf_a", "cus_conf_a");
    assert_eq!(store.save(&record).await.unwrap(), 1);
    let loaded = store.load("sub_conf_a").await.unwrap().expect("saved");
    assert_eq!(
        loaded,
        SubscriptionRecord {
            version: 1,
            ..record.clone()
        }
    );
    // A save based on version 0 again loses.
    let err = store.save(&record).await.unwrap_err();
    assert_eq!(err.kind(), StoreErrorKind::Conflict);
    let mut next = loaded.clone();
    next.state.status = SubscriptionStatus::Active;
    assert_eq!(store.save(&next).await.unwrap(), 2);
    // A stale writer loses.
    let err = store.save(&loaded).await.unwrap_err();
    assert_eq!(err.kind(), StoreErrorKind::Conflict);
    assert_eq!(
        store
            .load("sub_conf_a")
            .await
            .unwrap()
            .unwrap()
            .state
            .status,
        SubscriptionStatus::Active
    );
    assert!(store.load("sub_conf_missing").await.unwrap().is_none());
    // Unknown statuses survive storage.
    let mut odd = full_record("sub_conf_odd", "cus_conf_odd");
    odd.state.status = SubscriptionStatus::Unknown("frozen".into());
    store.save(&odd).await.unwrap();
    assert_eq!(
        store
            .load("sub_conf_odd")
            .await
            .unwrap()
            .unwrap()
            .state
            .status,
        SubscriptionStatus::Unknown("frozen".into())
    );
}

/// Of concurrent saves from the same version, exactly one wins.
pub async fn concurrent_saves_have_one_winner<S: SubscriptionStore + ?Sized + 'static>(
    store: Arc<S>,
) {
    let base = full_record("sub_conf_race", "cus_conf_race");
    store.save(&base).await.unwrap();
    let loaded = store.load("sub_conf_race").await.unwrap().unwrap();
    let mut tasks = Vec::new();
    for i in 0..16 {
        let store = store.clone();
        let mut r = loaded.clone();
        r.paid_through = Some(i);
        tasks.push(tokio::spawn(async move { store.save(&r).await }));
    }
    let mut wins = 0;
    for t in tasks {
        match t.await.expect("task") {
            Ok(v) => {
                assert_eq!(v, 2);
                wins += 1;
            }
            Err(e) => assert_eq!(e.kind(), StoreErrorKind::Conflict),
        }
    }
    assert_eq!(wins, 1);
}

/// Lookups by customer and Checkout reference follow changes.
pub async fn subscription_lookups<S: SubscriptionStore + ?Sized>(store: &S) {
    store
        .save(&full_record("sub_conf_l1", "cus_conf_l"))
        .await
        .unwrap();
    store
        .save(&full_record("sub_conf_l2", "cus_conf_l"))
        .await
        .unwrap();
    store
        .save(&full_record("sub_conf_l3", "cus_conf_other"))
        .await
        .unwrap();
    let ids = |v: Vec<SubscriptionRecord>| v.into_iter().map(|r| r.id).collect::<Vec<_>>();
    assert_eq!(
        ids(store.find_by_customer("cus_conf_l").await.unwrap()),
        ["sub_conf_l1", "sub_conf_l2"]
    );
    assert_eq!(
        ids(store
            .find_by_client_reference("user_cus_conf_l")
            .await
            .unwrap()),
        ["sub_conf_l1", "sub_conf_l2"]
    );
    // Moving a record to another customer updates both lookups.
    let mut moved = store.load("sub_conf_l2").await.unwrap().unwrap();
    moved.state.customer = Some("cus_conf_other".into());
    moved.client_reference_id = Some("user_moved".into());
    store.save(&moved).await.unwrap();
    assert_eq!(
        ids(store.find_by_customer("cus_conf_l").await.unwrap()),
        ["sub_conf_l1"]
    );
    assert_eq!(
        ids(store.find_by_customer("cus_conf_other").await.unwrap()),
        ["sub_conf_l2", "sub_conf_l3"]
    );
    assert_eq!(
        ids(store.find_by_client_reference("user_moved").await.unwrap()),
        ["sub_conf_l2"]
    );
    assert!(
        store
            .find_by_customer("cus_conf_none")
            .await
            .unwrap()
            .is_empty()
    );
}

/// Listing filters and pages by id.
pub async fn subscription_listing<S: SubscriptionStore + ?Sized>(store: &S) {
    let at = |t: i64| OffsetDateTime::from_unix_timestamp(t).ok();
    for (id, verified, review, reconcile) in [
        ("sub_conf_q1", at(100), false, false),
        ("sub_conf_q2", at(300), true, false),
        ("sub_conf_q3", None, false, true),
        ("sub_conf_q4", at(200), false, false),
    ] {
        let mut r = full_record(id, "cus_conf_q");
        r.last_verified_with_stripe = verified;
        r.needs_review = review;
        r.needs_reconcile = reconcile;
        store.save(&r).await.unwrap();
    }
    let ids = |v: Vec<SubscriptionRecord>| v.into_iter().map(|r| r.id).collect::<Vec<_>>();
    let q = |f: &dyn Fn(&mut SubscriptionQuery)| {
        let mut q = SubscriptionQuery {
            after: Some("sub_conf_q".into()),
            ..SubscriptionQuery::default()
        };
        f(&mut q);
        q
    };
    let listed = ids(store.list_subscriptions(&q(&|_| {})).await.unwrap());
    assert_eq!(
        listed,
        ["sub_conf_q1", "sub_conf_q2", "sub_conf_q3", "sub_conf_q4"]
    );
    let stale = ids(store
        .list_subscriptions(&q(&|q| q.verified_before = at(250)))
        .await
        .unwrap());
    assert_eq!(stale, ["sub_conf_q1", "sub_conf_q3", "sub_conf_q4"]);
    assert_eq!(
        ids(store
            .list_subscriptions(&q(&|q| q.needs_review = true))
            .await
            .unwrap()),
        ["sub_conf_q2"]
    );
    assert_eq!(
        ids(store
            .list_subscriptions(&q(&|q| q.needs_reconcile = true))
            .await
            .unwrap()),
        ["sub_conf_q3"]
    );
    let page = ids(store
        .list_subscriptions(&q(&|q| {
            q.after = Some("sub_conf_q1".into());
            q.limit = 2;
        }))
        .await
        .unwrap());
    assert_eq!(page, ["sub_conf_q2", "sub_conf_q3"]);
}

/// Entitlements are saved with the same compare-and-set rule.
pub async fn entitlements_are_versioned<S: SubscriptionStore + ?Sized>(store: &S) {
    assert!(
        store
            .load_entitlements("cus_conf_e")
            .await
            .unwrap()
            .is_none()
    );
    let e = CustomerEntitlements {
        customer: "cus_conf_e".into(),
        lookup_keys: vec!["a".into(), "b".into()],
        watermark: (10, "evt_e".into()),
        version: 0,
    };
    assert_eq!(store.save_entitlements(&e).await.unwrap(), 1);
    let loaded = store
        .load_entitlements("cus_conf_e")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        loaded,
        CustomerEntitlements {
            version: 1,
            ..e.clone()
        }
    );
    let err = store.save_entitlements(&e).await.unwrap_err();
    assert_eq!(err.kind(), StoreErrorKind::Conflict);
    let next = CustomerEntitlements {
        lookup_keys: vec![],
        ..loaded
    };
    assert_eq!(store.save_entitlements(&next).await.unwrap(), 2);
}

/// Cursors are stored and overwritten.
pub async fn cursors_round_trip<S: CursorStore + ?Sized>(store: &S) {
    assert_eq!(store.load_cursor("conf").await.unwrap(), None);
    store.save_cursor("conf", "one").await.unwrap();
    store.save_cursor("conf", "two").await.unwrap();
    store.save_cursor("conf_other", "x").await.unwrap();
    assert_eq!(
        store.load_cursor("conf").await.unwrap().as_deref(),
        Some("two")
    );
}

fn inbox_request(id: &str, sub: Option<&str>, created: i64, at: OffsetDateTime) -> InboxRequest {
    InboxRequest {
        claim: ClaimRequest {
            event_created: created,
            ..request(id, 3)
        },
        payload: format!(r#"{{"id":"{id}"}}"#),
        subscription_id: sub.map(str::to_owned),
        available_at: at,
    }
}

/// Inbox: enqueue is insert-if-absent; workers take the oldest first, one
/// event per subscription at a time, and a completed event frees its
/// subscription.
pub async fn inbox_orders_and_serializes<S: InboxStore + ?Sized>(store: &S, clock: &dyn Clock) {
    let now = clock.now() - Duration::seconds(1);
    let reqs = [
        inbox_request("evt_conf_in_3", Some("sub_x"), 30, now),
        inbox_request("evt_conf_in_1", Some("sub_x"), 10, now),
        inbox_request("evt_conf_in_2", Some("sub_y"), 20, now),
        inbox_request("evt_conf_in_4", None, 40, now),
    ];
    for r in &reqs {
        assert_eq!(store.enqueue(r).await.unwrap(), EnqueueOutcome::Queued);
    }
    assert_eq!(
        store.enqueue(&reqs[0]).await.unwrap(),
        EnqueueOutcome::Duplicate {
            state: LedgerState::Pending
        }
    );
    let mut conflicting = reqs[0].clone();
    conflicting.claim.fingerprint = fp(9);
    assert_eq!(
        store.enqueue(&conflicting).await.unwrap(),
        EnqueueOutcome::Conflict
    );
    assert_eq!(store.backlog().await.unwrap(), 4);

    let first = store.take(10, LEASE, 3).await.unwrap();
    let ids: Vec<_> = first
        .iter()
        .map(|i| i.lease.key.event_id.as_str())
        .collect();
    // Oldest first; evt_conf_in_3 waits for evt_conf_in_1 (same subscription).
    assert_eq!(ids, ["evt_conf_in_1", "evt_conf_in_2", "evt_conf_in_4"]);
    assert_eq!(first[0].payload, r#"{"id":"evt_conf_in_1"}"#);
    assert!(store.take(10, LEASE, 3).await.unwrap().is_empty());
    store.complete(&first[0].lease).await.unwrap();
    let second = store.take(10, LEASE, 3).await.unwrap();
    assert_eq!(second.len(), 1);
    assert_eq!(second[0].lease.key.event_id, "evt_conf_in_3");
    for item in first.iter().skip(1).chain(second.iter()) {
        store.complete(&item.lease).await.unwrap();
    }
    assert_eq!(store.backlog().await.unwrap(), 0);
    // Completion dropped the body; an application may ask to keep it.
    let done_key = reqs[0].claim.key.clone();
    assert_eq!(store.get(&done_key).await.unwrap().unwrap().payload, None);
    store.keep_payload(&done_key, "kept").await.unwrap();
    assert_eq!(
        store
            .get(&done_key)
            .await
            .unwrap()
            .unwrap()
            .payload
            .as_deref(),
        Some("kept")
    );
    // A webhook redelivery of a queued-and-done event is a duplicate.
    assert_eq!(
        store.claim(&reqs[0].claim).await.unwrap(),
        ClaimOutcome::Duplicate {
            state: LedgerState::Processed
        }
    );
}

/// Inbox: failed events come back after their retry time; expired leases are
/// taken again.
pub async fn inbox_retries_and_recovers<S: InboxStore + ?Sized>(store: &S, clock: &dyn Clock) {
    let now = clock.now() - Duration::seconds(1);
    store
        .enqueue(&inbox_request("evt_conf_in_retry", Some("sub_r"), 1, now))
        .await
        .unwrap();
    let item = store.take(1, LEASE, 3).await.unwrap().remove(0);
    store.fail(&item.lease, &failure(true, 3)).await.unwrap();
    let key = item.lease.key.clone();
    store
        .retry_at(&key, clock.now() + Duration::seconds(60))
        .await
        .unwrap();
    assert!(
        store.take(1, LEASE, 3).await.unwrap().is_empty(),
        "not due yet"
    );
    store
        .retry_at(&key, clock.now() - Duration::seconds(1))
        .await
        .unwrap();
    let again = store.take(1, LEASE, 3).await.unwrap().remove(0);
    assert_eq!(again.lease.attempt, 2);
    // The worker dies; after the lease, another takes it.
    expire(clock).await;
    let third = store.take(1, LEASE, 3).await.unwrap().remove(0);
    assert_eq!(third.lease.attempt, 3);
    store.complete(&third.lease).await.unwrap();
}

/// Inbox: concurrent workers never receive the same event twice.
pub async fn inbox_concurrent_takes_are_disjoint<S: InboxStore + ?Sized + 'static>(
    store: Arc<S>,
    clock: &dyn Clock,
) {
    let now = clock.now() - Duration::seconds(1);
    for i in 0..60 {
        let id = format!("evt_conf_in_c{i:03}");
        let sub = format!("sub_c{}", i % 20);
        store
            .enqueue(&inbox_request(&id, Some(&sub), i, now))
            .await
            .unwrap();
    }
    let mut tasks = Vec::new();
    for _ in 0..6 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let mut seen = Vec::new();
            loop {
                let items = store.take(4, Duration::seconds(30), 3).await.expect("take");
                if items.is_empty() {
                    let backlog = store.backlog().await.expect("backlog");
                    if backlog == 0 {
                        return seen;
                    }
                    tokio::task::yield_now().await;
                    continue;
                }
                for item in items {
                    seen.push(item.lease.key.event_id.clone());
                    store.complete(&item.lease).await.expect("complete");
                }
            }
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("task"));
    }
    let unique: BTreeSet<_> = all.iter().cloned().collect();
    assert_eq!(all.len(), 60, "each event handed out exactly once");
    assert_eq!(unique.len(), 60);
}

/// Inbox: an event claimed by a synchronous delivery (which stores no
/// payload) and then received by the inbox is not stranded when the
/// synchronous worker dies: `enqueue` answers `Duplicate` with its state and
/// attaches the payload, so once the lease expires a worker takes the event
/// with that payload.
pub async fn inbox_adopts_an_abandoned_synchronous_claim<S: InboxStore + ?Sized>(
    store: &S,
    clock: &dyn Clock,
) {
    let id = "evt_conf_in_sync";
    let req = request(id, 5);
    let _abandoned = claimed(store, &req).await;
    let enqueued = InboxRequest {
        claim: req.clone(),
        ..inbox_request(
            id,
            Some("sub_sync"),
            1_700_000_000,
            clock.now() - Duration::seconds(1),
        )
    };
    assert_eq!(
        store.enqueue(&enqueued).await.unwrap(),
        EnqueueOutcome::Duplicate {
            state: LedgerState::Processing
        }
    );
    assert!(
        store.take(10, LEASE, 5).await.unwrap().is_empty(),
        "the synchronous lease is still live"
    );
    expire(clock).await;
    let items = store.take(10, LEASE, 5).await.unwrap();
    assert_eq!(items.len(), 1, "the abandoned event is taken over");
    assert_eq!(items[0].lease.key, req.key);
    assert_eq!(items[0].lease.attempt, 2);
    assert_eq!(items[0].payload, enqueued.payload);
    assert_eq!(items[0].subscription_id.as_deref(), Some("sub_sync"));
    store.complete(&items[0].lease).await.unwrap();
    assert_eq!(store.backlog().await.unwrap(), 0);
    // A settled event is left as it is: no payload is attached to it.
    let e = store.get(&req.key).await.unwrap().expect("entry");
    assert_eq!(e.state, LedgerState::Processed);
    assert_eq!(
        store.enqueue(&enqueued).await.unwrap(),
        EnqueueOutcome::Duplicate {
            state: LedgerState::Processed
        }
    );
    let e = store.get(&req.key).await.unwrap().expect("entry");
    assert_eq!(e.payload, None);
}

/// Waits a little when a worker found nothing to take: on the suite's clock
/// (so a virtual clock moves on and retries become due) and on the runtime
/// (so other workers run).
async fn idle<C: Clock + ?Sized>(clock: &C) {
    clock.sleep(Duration::milliseconds(1)).await;
    tokio::task::yield_now().await;
}

/// Inbox: many workers over few subscriptions never hold two events of one
/// subscription at once, and take each subscription's events in `created`
/// order (events without a subscription are taken freely).
pub async fn take_serializes_each_subscription_under_contention<S, C>(store: Arc<S>, clock: Arc<C>)
where
    S: InboxStore + ?Sized + 'static,
    C: Clock + ?Sized + 'static,
{
    let past = clock.now() - Duration::seconds(1);
    let total = 120;
    for i in 0..total {
        let id = format!("evt_ser_{i:04}");
        let sub = (i % 10 != 9).then(|| format!("sub_ser_{}", i % 6));
        let req = inbox_request(&id, sub.as_deref(), i64::from(i), past);
        store.enqueue(&req).await.unwrap();
    }
    let busy: Arc<Mutex<HashSet<String>>> = Arc::default();
    let order: Arc<Mutex<BTreeMap<String, Vec<i64>>>> = Arc::default();
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let store = store.clone();
        let clock = clock.clone();
        let busy = busy.clone();
        let order = order.clone();
        tasks.push(tokio::spawn(async move {
            let mut done = 0;
            loop {
                let items = store.take(3, Duration::seconds(30), 3).await.expect("take");
                if items.is_empty() {
                    if store.backlog().await.expect("backlog") == 0 {
                        return done;
                    }
                    idle(&*clock).await;
                    continue;
                }
                for item in items {
                    if let Some(sub) = &item.subscription_id {
                        assert!(
                            busy.lock().unwrap().insert(sub.clone()),
                            "two events of {sub} at once"
                        );
                        let created = store
                            .get(&item.lease.key)
                            .await
                            .unwrap()
                            .unwrap()
                            .event_created;
                        order
                            .lock()
                            .unwrap()
                            .entry(sub.clone())
                            .or_default()
                            .push(created);
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(2)).await;
                    if let Some(sub) = &item.subscription_id {
                        busy.lock().unwrap().remove(sub);
                    }
                    store.complete(&item.lease).await.expect("complete");
                    done += 1;
                }
            }
        }));
    }
    let mut done = 0;
    for t in tasks {
        done += t.await.unwrap();
    }
    assert_eq!(done, total);
    for (sub, created) in order.lock().unwrap().iter() {
        let mut sorted = created.clone();
        sorted.sort_unstable();
        assert_eq!(*created, sorted, "{sub} out of order");
    }
}

/// Inbox: like the above, with failures retried a few milliseconds later:
/// events become due while other workers are taking, so two concurrent takes
/// can see different oldest events of one subscription. Still never two
/// events of one subscription at once.
pub async fn take_serializes_each_subscription_with_retries<S, C>(store: Arc<S>, clock: Arc<C>)
where
    S: InboxStore + ?Sized + 'static,
    C: Clock + ?Sized + 'static,
{
    let past = clock.now() - Duration::seconds(1);
    let total = 90;
    for i in 0..total {
        let id = format!("evt_retry_{i:04}");
        let sub = format!("sub_retry_{}", i % 3);
        let req = inbox_request(&id, Some(&sub), i64::from(i), past);
        store.enqueue(&req).await.unwrap();
    }
    let busy: Arc<Mutex<HashSet<String>>> = Arc::default();
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let store = store.clone();
        let clock = clock.clone();
        let busy = busy.clone();
        tasks.push(tokio::spawn(async move {
            let mut done = 0;
            loop {
                let items = store
                    .take(2, Duration::seconds(30), 10)
                    .await
                    .expect("take");
                if items.is_empty() {
                    if store.backlog().await.expect("backlog") == 0 {
                        return done;
                    }
                    idle(&*clock).await;
                    continue;
                }
                for item in items {
                    let sub = item.subscription_id.clone().expect("subscription");
                    assert!(
                        busy.lock().unwrap().insert(sub.clone()),
                        "two events of {sub} at once"
                    );
                    tokio::time::sleep(std::time::Duration::from_millis(1)).await;
                    busy.lock().unwrap().remove(&sub);
                    if item.lease.attempt < 3 {
                        let failure = Failure {
                            error: "try again".into(),
                            retryable: true,
                            max_attempts: 10,
                            payload: None,
                        };
                        store.fail(&item.lease, &failure).await.expect("fail");
                        let at = clock.now() + Duration::milliseconds(3);
                        store.retry_at(&item.lease.key, at).await.expect("retry_at");
                    } else {
                        store.complete(&item.lease).await.expect("complete");
                        done += 1;
                    }
                }
            }
        }));
    }
    let mut done = 0;
    for t in tasks {
        done += t.await.unwrap();
    }
    assert_eq!(done, total);
}

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
                inbox_adopts_an_abandoned_synchronous_claim
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
                    $crate::store::conformance::$s(&*store, &*clock).await;
                }
            )*
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $a() {
                    let (store, clock) = $make;
                    $crate::store::conformance::$a(store.clone(), &*clock).await;
                }
            )*
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $ac() {
                    let (store, clock) = $make;
                    $crate::store::conformance::$ac(store.clone(), clock.clone()).await;
                }
            )*
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $so() {
                    let (store, _clock) = $make;
                    $crate::store::conformance::$so(&*store).await;
                }
            )*
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $ao() {
                    let (store, _clock) = $make;
                    $crate::store::conformance::$ao(store.clone()).await;
                }
            )*
        }
    };
}
