//! Rules of the exactly-once ledger.

// One suite in several files: the parent's helpers are this file's too.
#[allow(clippy::wildcard_imports)]
use super::*;

/// Rule 1: the first claim inserts a processing entry, attempt 1, with a
/// lease in the future. The lease reports the time it has left, measured on
/// the store's clock: the whole lease asked for.
pub async fn claim_inserts_processing<S: EventLedger + ?Sized>(store: &S, clock: &dyn Clock) {
    let req = request("evt_conf_insert", 5);
    let lease = claimed(store, &req).await;
    assert_eq!(lease.attempt, 1);
    assert_eq!(lease.remaining, LEASE, "time left on a new lease");
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
    // A lease far longer than the race: on a busy machine the last claims
    // can come after a short lease ran out, and a reclaim then is right.
    let req = ClaimRequest {
        lease: Duration::seconds(60),
        ..request("evt_conf_race", 5)
    };
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
    assert_eq!(second.remaining, LEASE, "time left on a reclaimed lease");
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
    assert_eq!(
        store.ignore(&ignore).await.unwrap(),
        IgnoreOutcome::Recorded
    );
    // Recorded once: a second ignore is a duplicate, not a new ignore.
    assert_eq!(
        store.ignore(&ignore).await.unwrap(),
        IgnoreOutcome::Known(LedgerState::Ignored)
    );
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
        IgnoreOutcome::Known(LedgerState::Processing)
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
