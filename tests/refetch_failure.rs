//! A refetch the event needs that fails, for any reason (a revoked key's 401
//! included), is answered 503 so that Stripe delivers the event again; only
//! the last attempt lets the fallback rule decide (and flags the record for
//! the reconciler), and a refetch failure never dead-letters an event.
//!
//! Rerun: `cargo test --all-features --test refetch_failure`.

mod common;

use std::sync::Arc;

use common::{secret, sign, sub_event};
use stripe_webhook_guard::client::{ClientErrorKind, RefusingClient};
use stripe_webhook_guard::clock::ManualClock;
use stripe_webhook_guard::event::SubscriptionStatus;
use stripe_webhook_guard::ledger::{EventKey, LedgerState};
use stripe_webhook_guard::processor::{Error, Outcome, WebhookProcessor};
use stripe_webhook_guard::signature::Verifier;
use stripe_webhook_guard::store::{EventLedger, MemoryStore, SubscriptionStore};

const T0: i64 = 1_700_000_000;
const MAX_ATTEMPTS: u32 = 3;

/// A Stripe client whose key was revoked: every call answers 401.
fn revoked_key() -> RefusingClient {
    RefusingClient::new(ClientErrorKind::Unauthorized, "invalid API key")
}

fn processor(store: &Arc<MemoryStore>, clock: &ManualClock, client: bool) -> WebhookProcessor {
    let mut builder = WebhookProcessor::builder(Verifier::new(secret()))
        .store(store.clone())
        .clock(Arc::new(clock.clone()))
        .max_attempts(MAX_ATTEMPTS);
    if client {
        builder = builder.client(Arc::new(revoked_key()));
    }
    builder.build()
}

fn assert_retry(answer: &Result<Outcome, Error>, what: &str) {
    match answer {
        Err(e @ Error::Client { .. }) => {
            assert_eq!(e.http_status(), 503, "{what}");
            assert!(e.is_retryable(), "{what}");
        }
        other => panic!("{what}: expected a 503 client error, got {other:?}"),
    }
}

/// Regression: a thin event whose refetch got 401 was dead-lettered after
/// one attempt. It is now answered 503 on every delivery, past the attempt
/// limit too, and stays `failed` with its payload: never dead.
#[tokio::test]
async fn thin_event_refetch_401_is_retried_and_never_dead_lettered() {
    let clock = ManualClock::at_unix(T0);
    let store = Arc::new(MemoryStore::with_clock(Arc::new(clock.clone())));
    let p = processor(&store, &clock, true);
    let body = r#"{"id":"evt_thin_401","object":"v2.core.event","type":"v1.customer.subscription.updated",
        "created":"2023-11-14T22:13:20Z","livemode":false,
        "related_object":{"id":"sub_thin","type":"subscription","url":"/v1/subscriptions/sub_thin"}}"#;
    for delivery in 1..=MAX_ATTEMPTS + 2 {
        let answer = p.handle(body.as_bytes(), Some(&sign(body, T0))).await;
        assert_retry(&answer, &format!("delivery {delivery}"));
        let entry = store
            .get(&EventKey::new("evt_thin_401", None))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(entry.state, LedgerState::Failed, "delivery {delivery}");
        assert_eq!(entry.attempts, delivery);
        assert!(entry.payload.is_some(), "kept for replay");
    }
    assert_eq!(p.stats().dead, 0);
}

/// Regression: a same-second tie whose refetch got 401 was decided by the
/// fallback rule and answered 200, so a subscription Stripe holds `past_due`
/// stayed `active`. Now attempts before the last answer 503 and change
/// nothing; the last attempt applies the rule and flags the record
/// `needs_reconcile`.
#[tokio::test]
async fn tie_refetch_401_is_retried_until_the_last_attempt() {
    let clock = ManualClock::at_unix(T0 + 10);
    let store = Arc::new(MemoryStore::with_clock(Arc::new(clock.clone())));
    // The first event of the second, applied by a processor without a
    // client (its snapshot saved).
    let first = sub_event(
        "evt_tie_a",
        "customer.subscription.updated",
        T0,
        "sub_tie",
        "active",
    );
    let seeded = processor(&store, &clock, false)
        .handle(first.as_bytes(), Some(&sign(&first, T0 + 10)))
        .await;
    assert!(
        matches!(seeded, Ok(Outcome::Processed { .. })),
        "{seeded:?}"
    );

    let p = processor(&store, &clock, true);
    let tie = sub_event(
        "evt_tie_b",
        "customer.subscription.updated",
        T0,
        "sub_tie",
        "past_due",
    );
    for attempt in 1..MAX_ATTEMPTS {
        let answer = p.handle(tie.as_bytes(), Some(&sign(&tie, T0 + 10))).await;
        assert_retry(&answer, &format!("attempt {attempt}"));
        let record = store.load("sub_tie").await.unwrap().unwrap();
        assert_eq!(record.state.status, SubscriptionStatus::Active);
        assert!(
            !record.needs_reconcile,
            "nothing decided before the last attempt"
        );
    }
    let last = p.handle(tie.as_bytes(), Some(&sign(&tie, T0 + 10))).await;
    assert!(
        matches!(last, Ok(Outcome::Processed { attempt, .. }) if attempt == MAX_ATTEMPTS),
        "{last:?}"
    );
    let record = store.load("sub_tie").await.unwrap().unwrap();
    assert!(record.needs_reconcile, "flagged for the reconciler");
    assert!(
        record
            .anomalies
            .iter()
            .any(|a| a.event_id.as_deref() == Some("evt_tie_b")),
        "{:?}",
        record.anomalies
    );
    assert_eq!(p.stats().dead, 0);
}
