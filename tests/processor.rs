//! The processor's exactly-once guarantees, shown with figures.

mod common;

use std::sync::Arc;

use async_trait::async_trait;
use common::split::RecordOp;
use common::{CountingHandler, at, other_event, secret, sign, sub_event};
use stripe_webhook_guard::clock::{Clock, ManualClock};
use stripe_webhook_guard::event::{Event, SubscriptionStatus};
use stripe_webhook_guard::ledger::{EventKey, LedgerQuery, LedgerState};
use stripe_webhook_guard::processor::{
    AccountFilter, Error, EventHandler, HandlerContext, HandlerError, IgnoreReason, Outcome,
    WebhookProcessor,
};
use stripe_webhook_guard::signature::Verifier;
use stripe_webhook_guard::store::{
    EventLedger, MemoryStore, StoreError, StoreErrorKind, SubscriptionStore,
};
use time::Duration;

const T0: i64 = 1_700_000_000;

fn processor(
    clock: &ManualClock,
    handler: Arc<dyn EventHandler>,
) -> (WebhookProcessor, Arc<MemoryStore>) {
    let store = Arc::new(MemoryStore::with_clock(Arc::new(clock.clone())));
    let p = WebhookProcessor::builder(Verifier::new(secret()))
        .store(store.clone())
        .handler(handler)
        .clock(Arc::new(clock.clone()))
        .max_attempts(5)
        .build();
    (p, store)
}

/// N concurrent deliveries of one event, many trials: the handler runs
/// exactly once per event, every other answer is duplicate or in flight.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn duplicate_storm() {
    for concurrency in [2usize, 10, 50, 200] {
        let clock = ManualClock::at_unix(T0);
        let handler = CountingHandler::new();
        let (p, _store) = processor(&clock, handler.clone());
        let (mut processed, mut duplicate, mut in_flight) = (0, 0, 0);
        for trial in 0..200 {
            let id = format!("evt_storm_{concurrency}_{trial}");
            let body = sub_event(
                &id,
                "customer.subscription.updated",
                T0,
                &format!("sub_{trial}"),
                "active",
            );
            let header = sign(&body, T0);
            let mut tasks = Vec::with_capacity(concurrency);
            for _ in 0..concurrency {
                let p = p.clone();
                let body = body.clone();
                let header = header.clone();
                tasks.push(tokio::spawn(async move {
                    p.handle(body.as_bytes(), Some(&header)).await
                }));
            }
            for t in tasks {
                match t.await.unwrap() {
                    Ok(Outcome::Processed { .. }) => processed += 1,
                    Ok(Outcome::Duplicate { .. }) => duplicate += 1,
                    Err(Error::InFlight { .. }) => in_flight += 1,
                    other => panic!("unexpected {other:?}"),
                }
            }
            assert_eq!(handler.effects_of(&id), 1, "{id}: effect exactly once");
        }
        assert_eq!(
            processed, 200,
            "one processing per trial at concurrency {concurrency}"
        );
        assert_eq!(duplicate + in_flight, 200 * (concurrency - 1));
        assert_eq!(handler.total_effects(), 200);
        println!(
            "concurrency {concurrency}: 200 trials, {processed} processed, {duplicate} duplicate, {in_flight} in flight, 200 effects"
        );
    }
}

/// The handler fails the first k times: exactly one effect, k+1 attempts,
/// and never acknowledged as a duplicate before it succeeded.
#[tokio::test]
async fn fail_then_retry() {
    for k in 1..5u32 {
        let clock = ManualClock::at_unix(T0);
        let handler = CountingHandler::new();
        let id = format!("evt_retry_{k}");
        handler.fail_first.lock().unwrap().insert(id.clone(), k);
        let (p, store) = processor(&clock, handler.clone());
        let body = sub_event(&id, "customer.subscription.updated", T0, "sub_1", "active");
        for attempt in 1..=k {
            clock.advance(Duration::minutes(5));
            let header = sign(&body, clock.now().unix_timestamp());
            let err = p.handle(body.as_bytes(), Some(&header)).await.unwrap_err();
            assert!(
                matches!(err, Error::Failed { attempt: a, .. } if a == attempt),
                "{err:?}"
            );
            assert!(err.is_retryable());
            assert_eq!(err.http_status(), 500);
            let entry = store
                .get(&EventKey::new(id.as_str(), None))
                .await
                .unwrap()
                .unwrap();
            assert_eq!(
                entry.state,
                LedgerState::Failed,
                "failed, not seen-and-done"
            );
            assert!(entry.payload.is_some(), "kept for replay");
        }
        clock.advance(Duration::minutes(5));
        let header = sign(&body, clock.now().unix_timestamp());
        match p.handle(body.as_bytes(), Some(&header)).await.unwrap() {
            Outcome::Processed { attempt, .. } => assert_eq!(attempt, k + 1),
            other => panic!("{other:?}"),
        }
        assert_eq!(handler.effects_of(&id), 1);
        // Now, and only now, it is a duplicate.
        let header = sign(&body, clock.now().unix_timestamp());
        assert!(matches!(
            p.handle(body.as_bytes(), Some(&header)).await.unwrap(),
            Outcome::Duplicate {
                state: LedgerState::Processed,
                ..
            }
        ));
        assert_eq!(handler.effects_of(&id), 1);
        // The subscription effect ran on every attempt but applied once.
        let sub = store.load("sub_1").await.unwrap().unwrap();
        assert_eq!(sub.state.status, SubscriptionStatus::Active);
        assert_eq!(sub.version, 1);
    }
}

/// A handler that stalls until released, then commits its effect only while
/// its lease is valid (as the docs tell handlers to do).
struct StallingHandler {
    release: tokio::sync::Notify,
    started: tokio::sync::Notify,
    stall_first: std::sync::atomic::AtomicBool,
    effects: std::sync::atomic::AtomicU32,
    refused: std::sync::atomic::AtomicU32,
}

#[async_trait]
impl EventHandler for StallingHandler {
    async fn handle(&self, _event: &Event, ctx: &HandlerContext) -> Result<(), HandlerError> {
        use std::sync::atomic::Ordering;
        if self.stall_first.swap(false, Ordering::SeqCst) {
            self.started.notify_one();
            self.release.notified().await;
        }
        if !ctx.lease_valid() {
            self.refused.fetch_add(1, Ordering::SeqCst);
            return Err(HandlerError::retryable("lease expired before commit"));
        }
        self.effects.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

/// A worker stalls past its lease while another claims: the stale
/// completion is refused and the effect happens once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zombie_lease() {
    use std::sync::atomic::Ordering;
    let clock = ManualClock::at_unix(T0);
    let handler = Arc::new(StallingHandler {
        release: tokio::sync::Notify::new(),
        started: tokio::sync::Notify::new(),
        stall_first: true.into(),
        effects: 0.into(),
        refused: 0.into(),
    });
    let (p, store) = processor(&clock, handler.clone());
    let body = sub_event(
        "evt_zombie",
        "customer.subscription.updated",
        T0,
        "sub_z",
        "active",
    );
    let zombie = {
        let p = p.clone();
        let body = body.clone();
        let header = sign(&body, T0);
        tokio::spawn(async move { p.handle(body.as_bytes(), Some(&header)).await })
    };
    handler.started.notified().await;
    // The first worker is stuck in its handler; its lease runs out.
    clock.advance(Duration::seconds(61));
    let header = sign(&body, clock.now().unix_timestamp());
    match p.handle(body.as_bytes(), Some(&header)).await.unwrap() {
        Outcome::Processed { attempt, .. } => assert_eq!(attempt, 2),
        other => panic!("{other:?}"),
    }
    handler.release.notify_one();
    let err = zombie.await.unwrap().unwrap_err();
    assert!(matches!(err, Error::LeaseLost { .. }), "{err:?}");
    assert_eq!(err.http_status(), 503);
    assert_eq!(handler.effects.load(Ordering::SeqCst), 1, "one effect");
    assert_eq!(handler.refused.load(Ordering::SeqCst), 1);
    let entry = store
        .get(&EventKey::new("evt_zombie", None))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(entry.state, LedgerState::Processed);
    assert_eq!(entry.attempts, 2);
}

/// Even a handler that ignores its lease cannot complete over the new holder.
#[tokio::test]
async fn stale_completion_is_refused_by_the_ledger() {
    let clock = ManualClock::at_unix(T0);
    let store = Arc::new(MemoryStore::with_clock(Arc::new(clock.clone())));
    let event = Event::parse_unverified(
        sub_event(
            "evt_f",
            "customer.subscription.updated",
            T0,
            "sub_f",
            "active",
        )
        .as_bytes(),
    )
    .unwrap();
    let req =
        stripe_webhook_guard::ledger::ClaimRequest::for_event(&event, Duration::seconds(60), 5);
    let stripe_webhook_guard::ledger::ClaimOutcome::Claimed(old) = store.claim(&req).await.unwrap()
    else {
        panic!()
    };
    clock.advance(Duration::seconds(61));
    let stripe_webhook_guard::ledger::ClaimOutcome::Claimed(new) = store.claim(&req).await.unwrap()
    else {
        panic!()
    };
    assert!(store.complete(&old).await.is_err());
    store.complete(&new).await.unwrap();
}

/// One always-failing event among 10,000: exactly one dead letter after max
/// attempts; every other event processed once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn poison_event_among_ten_thousand() {
    let clock = ManualClock::at_unix(T0);
    let handler = CountingHandler::new();
    handler
        .always_fail
        .lock()
        .unwrap()
        .push("evt_poison_04242".into());
    let (p, store) = processor(&clock, handler.clone());
    let bodies: Vec<(String, String)> = (0..10_000)
        .map(|i| {
            let id = format!("evt_poison_{i:05}");
            let body = sub_event(
                &id,
                "customer.subscription.updated",
                T0 + i,
                &format!("sub_{}", i % 500),
                "active",
            );
            (id, body)
        })
        .collect();
    let header_t = T0;
    let mut outcomes = std::collections::HashMap::new();
    // Stripe delivers every event, and retries the ones that got a non-2xx.
    for round in 0..8 {
        let mut tasks = Vec::new();
        for chunk in bodies.chunks(500) {
            let p = p.clone();
            let chunk: Vec<_> = chunk.to_vec();
            let done: Vec<String> = chunk
                .iter()
                .filter(|(id, _)| outcomes.contains_key(id))
                .map(|(id, _)| id.clone())
                .collect();
            tasks.push(tokio::spawn(async move {
                let mut out = Vec::new();
                for (id, body) in chunk {
                    if done.contains(&id) {
                        continue;
                    }
                    let header = sign(&body, header_t);
                    out.push((id, p.handle(body.as_bytes(), Some(&header)).await));
                }
                out
            }));
        }
        for t in tasks {
            for (id, r) in t.await.unwrap() {
                if let Ok(o) = r {
                    outcomes.insert(id, o);
                }
            }
        }
        if outcomes.len() == 10_000 {
            assert_eq!(round, 4, "the poison event settles on its 5th attempt");
            break;
        }
    }
    assert_eq!(outcomes.len(), 10_000, "every event settled");
    let dead: Vec<_> = outcomes
        .iter()
        .filter(|(_, o)| matches!(o, Outcome::DeadLettered { .. }))
        .collect();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].0, "evt_poison_04242");
    assert!(matches!(
        dead[0].1,
        Outcome::DeadLettered { attempts: 5, .. }
    ));
    assert_eq!(handler.total_effects(), 9_999);
    assert!(handler.effects.lock().unwrap().values().all(|&n| n == 1));
    let dead_entries = EventLedger::list(&*store, &LedgerQuery::states(&[LedgerState::Dead], 10))
        .await
        .unwrap();
    assert_eq!(dead_entries.len(), 1);
    assert_eq!(dead_entries[0].last_error.as_deref(), Some("poison"));
    assert!(dead_entries[0].payload.is_some());
    let counts = store.ledger_counts();
    assert_eq!(counts.get("processed"), Some(&9_999));
    // A redelivery of the dead event is acknowledged, not retried.
    let (_, body) = &bodies[4242];
    let header = sign(body, header_t);
    assert!(matches!(
        p.handle(body.as_bytes(), Some(&header)).await.unwrap(),
        Outcome::Duplicate {
            state: LedgerState::Dead,
            ..
        }
    ));
}

/// Livemode mismatch and foreign accounts are ignored with a 2xx, no effect.
#[tokio::test]
async fn filters_ignore_without_effect() {
    let clock = ManualClock::at_unix(T0);
    let handler = CountingHandler::new();
    let store = Arc::new(MemoryStore::with_clock(Arc::new(clock.clone())));
    let p = WebhookProcessor::builder(Verifier::new(secret()))
        .store(store.clone())
        .handler(handler.clone())
        .clock(Arc::new(clock.clone()))
        .livemode(true)
        .build();
    let test_mode = sub_event(
        "evt_test_mode",
        "customer.subscription.updated",
        T0,
        "sub_1",
        "active",
    );
    let out = p
        .handle(test_mode.as_bytes(), Some(&sign(&test_mode, T0)))
        .await
        .unwrap();
    assert!(matches!(
        out,
        Outcome::Ignored {
            reason: IgnoreReason::LivemodeMismatch,
            ..
        }
    ));
    assert_eq!(out.http_status(), 200);

    let live_connect = sub_event(
        "evt_connect",
        "customer.subscription.updated",
        T0,
        "sub_2",
        "active",
    )
    .replace(
        r#""livemode":false,"#,
        r#""livemode":true,"account":"acct_foreign","#,
    );
    let out = p
        .handle(live_connect.as_bytes(), Some(&sign(&live_connect, T0)))
        .await
        .unwrap();
    assert!(matches!(
        out,
        Outcome::Ignored {
            reason: IgnoreReason::ForeignAccount,
            ..
        }
    ));
    // A redelivery is a duplicate of the ignored entry, recorded once.
    let out = p
        .handle(live_connect.as_bytes(), Some(&sign(&live_connect, T0)))
        .await
        .unwrap();
    assert!(matches!(
        out,
        Outcome::Duplicate {
            state: LedgerState::Ignored,
            ..
        }
    ));
    assert_eq!(store.ledger_counts().get("ignored"), Some(&2));
    assert_eq!(handler.total_effects(), 0);
    assert!(store.load("sub_1").await.unwrap().is_none());
    assert!(store.load("sub_2").await.unwrap().is_none());

    // An allowed connected account is processed.
    let p = WebhookProcessor::builder(Verifier::new(secret()))
        .store(store.clone())
        .handler(handler.clone())
        .clock(Arc::new(clock.clone()))
        .accounts(AccountFilter::Only(vec!["acct_mine".into()]))
        .build();
    let mine = sub_event(
        "evt_mine",
        "customer.subscription.updated",
        T0,
        "sub_3",
        "active",
    )
    .replace(
        r#""livemode":false,"#,
        r#""livemode":false,"account":"acct_mine","#,
    );
    assert!(matches!(
        p.handle(mine.as_bytes(), Some(&sign(&mine, T0)))
            .await
            .unwrap(),
        Outcome::Processed { .. }
    ));
    let platform = sub_event(
        "evt_platform",
        "customer.subscription.updated",
        T0,
        "sub_4",
        "active",
    );
    assert!(matches!(
        p.handle(platform.as_bytes(), Some(&sign(&platform, T0)))
            .await
            .unwrap(),
        Outcome::Ignored {
            reason: IgnoreReason::ForeignAccount,
            ..
        }
    ));
}

#[tokio::test]
async fn unhandled_types_are_ignored_unless_the_handler_wants_them() {
    struct Picky;
    #[async_trait]
    impl EventHandler for Picky {
        async fn handle(&self, _: &Event, _: &HandlerContext) -> Result<(), HandlerError> {
            Ok(())
        }
        fn wants(&self, t: &stripe_webhook_guard::event::EventType) -> bool {
            t.as_str() == "customer.updated"
        }
    }
    let clock = ManualClock::at_unix(T0);
    let (p, _) = processor(&clock, Arc::new(Picky));
    let wanted = other_event("evt_wanted", T0);
    assert!(matches!(
        p.handle(wanted.as_bytes(), Some(&sign(&wanted, T0)))
            .await
            .unwrap(),
        Outcome::Processed { handled: true, .. }
    ));
    let unwanted = other_event("evt_unwanted", T0).replace("customer.updated", "charge.refunded");
    assert!(matches!(
        p.handle(unwanted.as_bytes(), Some(&sign(&unwanted, T0)))
            .await
            .unwrap(),
        Outcome::Ignored {
            reason: IgnoreReason::UnhandledType,
            ..
        }
    ));
}

#[tokio::test]
async fn handler_panic_is_a_failure_not_a_crash() {
    let clock = ManualClock::at_unix(T0);
    let handler = CountingHandler::new();
    handler
        .panic_first
        .lock()
        .unwrap()
        .insert("evt_panic".into(), 1);
    let (p, store) = processor(&clock, handler.clone());
    let body = sub_event(
        "evt_panic",
        "customer.subscription.updated",
        T0,
        "sub_p",
        "active",
    );
    let err = p
        .handle(body.as_bytes(), Some(&sign(&body, T0)))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::Failed { message, .. } if message.contains("handler panicked: handler bug")),
        "{err:?}"
    );
    let entry = store
        .get(&EventKey::new("evt_panic", None))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(entry.state, LedgerState::Failed);
    assert!(matches!(
        p.handle(body.as_bytes(), Some(&sign(&body, T0)))
            .await
            .unwrap(),
        Outcome::Processed { attempt: 2, .. }
    ));
    assert_eq!(handler.effects_of("evt_panic"), 1);
}

#[tokio::test]
async fn rejected_requests_map_to_400_and_never_touch_the_ledger() {
    let clock = ManualClock::at_unix(T0);
    let (p, store) = processor(&clock, CountingHandler::new());
    let body = sub_event(
        "evt_bad",
        "customer.subscription.updated",
        T0,
        "sub_b",
        "active",
    );
    let err = p
        .handle(body.as_bytes(), Some("t=1,v1=00"))
        .await
        .unwrap_err();
    assert_eq!(err.http_status(), 400);
    assert!(!err.is_retryable());
    let err = p.handle(body.as_bytes(), None).await.unwrap_err();
    assert_eq!(err.http_status(), 400);
    let big = vec![b' '; 2 * 1024 * 1024];
    let err = p.handle(&big, Some(&sign("x", T0))).await.unwrap_err();
    assert_eq!(err.http_status(), 413);
    let junk = "{\"not\":\"an event\"}";
    let err = p
        .handle(junk.as_bytes(), Some(&sign(junk, T0)))
        .await
        .unwrap_err();
    assert_eq!(err.http_status(), 400);
    assert!(matches!(err, Error::Parse(_)));
    assert!(
        EventLedger::list(&*store, &LedgerQuery::states(&[], 0))
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(p.stats().rejected, 4);
}

/// Parsing only delimits `data.object`; the processor checks it before it
/// claims, ignores or records anything, so a malformed object is still a
/// 400 that leaves the ledger untouched, whatever the event's type.
#[tokio::test]
async fn malformed_object_is_refused_before_the_ledger_records_anything() {
    let clock = ManualClock::at_unix(T0);
    let (p, store) = processor(&clock, CountingHandler::new());
    let bodies = [
        // A subscription event: the view would read it but for `junk`.
        r#"{"id":"evt_m1","object":"event","type":"customer.subscription.updated","created":1700000000,
        "data":{"object":{"id":"sub_m","object":"subscription","customer":"cus_m","status":"active","junk":tru}}}"#,
        // An invoice event, a missing value.
        r#"{"id":"evt_m2","object":"event","type":"invoice.paid","created":1700000000,
        "data":{"object":{"id":"in_m","object":"invoice","status":}}}"#,
        // A type nobody acts on (it would be recorded as ignored).
        r#"{"id":"evt_m3","object":"event","type":"charge.refunded","created":1700000000,
        "data":{"object":{"id":"ch_m" "object":"charge"}}}"#,
        // A type the handler wants, a control character in a string.
        "{\"id\":\"evt_m4\",\"object\":\"event\",\"type\":\"customer.updated\",\"created\":1700000000,\
        \"data\":{\"object\":{\"id\":\"cus_\u{1}m\",\"object\":\"customer\"}}}",
    ];
    for body in bodies {
        let event = Event::parse_unverified(body.as_bytes()).expect("the envelope is fine");
        let err = p
            .handle(body.as_bytes(), Some(&sign(body, T0)))
            .await
            .unwrap_err();
        assert_eq!(err.http_status(), 400, "{body}");
        assert!(
            matches!(&err, Error::Parse(e) if e.to_string().contains("data.object:")),
            "{body}: {err:?}"
        );
        // Events that do not come by webhook are checked too.
        let err = p.process_event(&event).await.unwrap_err();
        assert!(matches!(err, Error::Parse(_)), "{body}: {err:?}");
    }
    assert!(
        EventLedger::list(&*store, &LedgerQuery::states(&[], 0))
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(p.stats().rejected, 4);
    assert_eq!(p.stats().ignored, 0);
}

/// A delivery of an event the in-memory ledger already settled is answered
/// from a lookup, before its object is checked or typed: it records nothing,
/// so a redelivery is a duplicate whatever its object holds.
#[tokio::test]
async fn settled_events_are_answered_before_the_object_is_checked() {
    let clock = ManualClock::at_unix(T0);
    let (p, store) = processor(&clock, CountingHandler::new());
    let body = sub_event(
        "evt_settled",
        "customer.subscription.updated",
        T0,
        "sub_s",
        "active",
    );
    let out = p
        .handle(body.as_bytes(), Some(&sign(&body, T0)))
        .await
        .unwrap();
    assert!(matches!(out, Outcome::Processed { .. }), "{out:?}");
    let key = EventKey::new("evt_settled", None);
    let before = EventLedger::get(&*store, &key).await.unwrap().unwrap();
    // Same envelope, an object that is not JSON.
    let broken = body.replacen(r#""status":"active""#, r#""status" "active""#, 1);
    assert_ne!(broken, body);
    let event = Event::parse_unverified(broken.as_bytes()).unwrap();
    assert!(event.validate_object().is_err());
    let out = p
        .handle(broken.as_bytes(), Some(&sign(&broken, T0)))
        .await
        .unwrap();
    assert!(
        matches!(
            out,
            Outcome::Duplicate {
                state: LedgerState::Processed,
                ..
            }
        ),
        "{out:?}"
    );
    assert_eq!(
        EventLedger::get(&*store, &key).await.unwrap().unwrap(),
        before
    );
    assert_eq!(p.stats().duplicates, 1);
    assert_eq!(p.stats().rejected, 0);
}

#[tokio::test]
async fn same_id_different_content_is_refused() {
    let clock = ManualClock::at_unix(T0);
    let (p, _) = processor(&clock, CountingHandler::new());
    let a = sub_event(
        "evt_same",
        "customer.subscription.updated",
        T0,
        "sub_1",
        "active",
    );
    let b = sub_event(
        "evt_same",
        "customer.subscription.updated",
        T0 + 1,
        "sub_1",
        "active",
    );
    p.handle(a.as_bytes(), Some(&sign(&a, T0))).await.unwrap();
    let err = p
        .handle(b.as_bytes(), Some(&sign(&b, T0)))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::PayloadConflict { .. }));
    assert_eq!(err.http_status(), 409);
}

/// A store outage fails the event (503, retryable), nothing is marked
/// processed, and Stripe's retry processes it once.
#[tokio::test]
async fn store_outage_is_retryable_and_loses_nothing() {
    let clock = ManualClock::at_unix(T0);
    let memory = Arc::new(MemoryStore::with_clock(Arc::new(clock.clone())));
    // The first two saves fail.
    let fail_saves = std::sync::atomic::AtomicU32::new(2);
    let flaky = common::split::Hooked::new(memory.clone(), move |op| {
        use std::sync::atomic::Ordering;
        match op {
            RecordOp::Save(_) if fail_saves.load(Ordering::SeqCst) > 0 => {
                fail_saves.fetch_sub(1, Ordering::SeqCst);
                Err(StoreError::new(
                    StoreErrorKind::Unavailable,
                    "connection reset",
                ))
            }
            _ => Ok(()),
        }
    });
    let handler = CountingHandler::new();
    let p = WebhookProcessor::builder(Verifier::new(secret()))
        .store(common::split::Split::new(memory.clone(), flaky))
        .handler(handler.clone())
        .clock(Arc::new(clock.clone()))
        .build();
    let body = sub_event(
        "evt_outage",
        "customer.subscription.updated",
        T0,
        "sub_o",
        "active",
    );
    for _ in 0..2 {
        let err = p
            .handle(body.as_bytes(), Some(&sign(&body, T0)))
            .await
            .unwrap_err();
        assert!(matches!(err, Error::Store { .. }), "{err:?}");
        assert!(err.is_retryable());
        assert_eq!(err.http_status(), 503);
        assert_eq!(
            memory
                .get(&EventKey::new("evt_outage", None))
                .await
                .unwrap()
                .unwrap()
                .state,
            LedgerState::Failed
        );
        assert_eq!(
            handler.total_effects(),
            0,
            "no handler effect before the state is saved"
        );
    }
    assert!(matches!(
        p.handle(body.as_bytes(), Some(&sign(&body, T0)))
            .await
            .unwrap(),
        Outcome::Processed { attempt: 3, .. }
    ));
    assert_eq!(handler.effects_of("evt_outage"), 1);
    assert_eq!(
        memory.load("sub_o").await.unwrap().unwrap().state.status,
        SubscriptionStatus::Active
    );
    let _ = at(0);
}

/// A handler that fails once: on the retry the subscription effect is
/// already saved, and the handler is still told what the event changed.
#[tokio::test]
async fn a_retried_handler_still_sees_the_status_change() {
    use std::sync::Mutex;
    use stripe_webhook_guard::subscription::ApplyReason;
    use stripe_webhook_guard::subscription::Effect;
    struct FailOnce(Mutex<Vec<Effect>>);
    #[async_trait]
    impl EventHandler for FailOnce {
        async fn handle(&self, _: &Event, ctx: &HandlerContext) -> Result<(), HandlerError> {
            let mut seen = self.0.lock().unwrap();
            seen.push(ctx.effect.clone());
            if seen.len() == 2 {
                Err(HandlerError::retryable("mail server down"))
            } else {
                Ok(())
            }
        }
    }
    let clock = ManualClock::at_unix(T0);
    let handler = Arc::new(FailOnce(Mutex::new(Vec::new())));
    let (p, _) = processor(&clock, handler.clone());
    let first = sub_event(
        "evt_a1",
        "customer.subscription.updated",
        T0,
        "sub_r",
        "active",
    );
    p.handle(first.as_bytes(), Some(&sign(&first, T0)))
        .await
        .unwrap();
    let change = sub_event(
        "evt_a2",
        "customer.subscription.updated",
        T0 + 10,
        "sub_r",
        "past_due",
    );
    assert!(
        p.handle(change.as_bytes(), Some(&sign(&change, T0)))
            .await
            .is_err()
    );
    p.handle(change.as_bytes(), Some(&sign(&change, T0)))
        .await
        .unwrap();
    let seen = handler.0.lock().unwrap().clone();
    let expected = Some((SubscriptionStatus::Active, SubscriptionStatus::PastDue));
    assert!(
        matches!(&seen[1], Effect::Applied { status_change, .. } if *status_change == expected),
        "{seen:?}"
    );
    assert!(
        matches!(&seen[2], Effect::Applied { status_change, reason: ApplyReason::AlreadyApplied, .. } if *status_change == expected),
        "{seen:?}"
    );
}

/// A lease that runs out before the handler starts counts as an attempt, so
/// an event that is always too slow ends dead-lettered instead of looping.
#[tokio::test]
async fn attempts_lost_to_lease_expiry_count() {
    let clock = ManualClock::at_unix(T0);
    let memory = Arc::new(MemoryStore::with_clock(Arc::new(clock.clone())));
    let handler = CountingHandler::new();
    let p = WebhookProcessor::builder(Verifier::new(secret()))
        .store(common::split::Split::new(
            memory.clone(),
            // Every load takes longer than the lease.
            common::split::Hooked::new(memory.clone(), {
                let clock = clock.clone();
                move |op| {
                    if let RecordOp::Load(_) = op {
                        clock.advance(Duration::seconds(120));
                    }
                    Ok(())
                }
            }),
        ))
        .handler(handler.clone())
        .clock(Arc::new(clock.clone()))
        .max_attempts(3)
        .build();
    let body = sub_event(
        "evt_slow",
        "customer.subscription.updated",
        T0,
        "sub_s",
        "active",
    );
    let mut outcomes = Vec::new();
    for _ in 0..3 {
        let header = sign(&body, clock.now().unix_timestamp());
        outcomes.push(p.handle(body.as_bytes(), Some(&header)).await);
    }
    assert!(
        matches!(outcomes[0], Err(Error::LeaseLost { .. })),
        "{outcomes:?}"
    );
    assert!(
        matches!(outcomes[2], Ok(Outcome::DeadLettered { attempts: 3, .. })),
        "{outcomes:?}"
    );
    assert_eq!(handler.total_effects(), 0);
    assert_eq!(
        memory
            .get(&EventKey::new("evt_slow", None))
            .await
            .unwrap()
            .unwrap()
            .state,
        LedgerState::Dead
    );
}

/// An event accepted earlier and not finished is finished even if the
/// filters would now ignore it: never acknowledged unprocessed.
#[tokio::test]
async fn a_filter_change_does_not_acknowledge_an_unfinished_event() {
    let clock = ManualClock::at_unix(T0);
    let store = Arc::new(MemoryStore::with_clock(Arc::new(clock.clone())));
    let handler = CountingHandler::new();
    handler.fail_first.lock().unwrap().insert("evt_f".into(), 1);
    let lenient = WebhookProcessor::builder(Verifier::new(secret()))
        .store(store.clone())
        .handler(handler.clone())
        .clock(Arc::new(clock.clone()))
        .build();
    let body = sub_event(
        "evt_f",
        "customer.subscription.updated",
        T0,
        "sub_f",
        "active",
    );
    assert!(
        lenient
            .handle(body.as_bytes(), Some(&sign(&body, T0)))
            .await
            .is_err()
    );
    // Redeployed with livemode(true): this test-mode event is now filtered.
    let strict = WebhookProcessor::builder(Verifier::new(secret()))
        .store(store.clone())
        .handler(handler.clone())
        .clock(Arc::new(clock.clone()))
        .livemode(true)
        .build();
    let out = strict
        .handle(body.as_bytes(), Some(&sign(&body, T0)))
        .await
        .unwrap();
    assert!(
        matches!(out, Outcome::Processed { attempt: 2, .. }),
        "{out:?}"
    );
    assert_eq!(handler.effects_of("evt_f"), 1);
}
