//! Inbox mode on the in-memory store: 4 workers, 10,000 deliveries with
//! duplicates, reordered histories and one poison event.
#![cfg(feature = "test-util")]

mod common;

use std::sync::Arc;

use stripe_webhook_guard::clock::{Clock, ManualClock};
use stripe_webhook_guard::inbox::InboxConfig;
use stripe_webhook_guard::ledger::{EventKey, LedgerState};
use stripe_webhook_guard::processor::Outcome;
use stripe_webhook_guard::processor::WebhookProcessor;
use stripe_webhook_guard::signature::{Verifier, test_header};
use stripe_webhook_guard::store::{EventLedger, MemoryStore, SubscriptionStore};
use stripe_webhook_guard::subscription::SubscriptionState;
use stripe_webhook_guard::testing::{Card, FakeConfig, FakeStripe, Rng, ShapeMix, Subscribe};
use time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn four_workers_ten_thousand_deliveries() {
    let clock = ManualClock::at_unix(common::world::START);
    let fake = Arc::new(FakeStripe::new(
        clock.clone(),
        FakeConfig {
            seed: 77,
            shapes: ShapeMix::Mixed,
            ..FakeConfig::default()
        },
    ));
    let mut rng = Rng::new(77);
    for i in 0..345 {
        let c = fake.create_customer();
        let trial = (i % 3 == 0).then_some(14);
        let s = fake.subscribe(
            &c,
            &Subscribe {
                trial_days: trial,
                ..Subscribe::default()
            },
        );
        if i % 5 == 0 {
            fake.set_card(&c, Card::Declines);
        }
        if i % 7 == 0 {
            fake.cancel_at_period_end(&s, true);
        }
    }
    fake.advance(Duration::days(75));
    let events = fake.take_new_events();
    let mut deliveries = Vec::new();
    for fe in &events {
        for _ in 0..=rng.below(3) {
            deliveries.push(fe.body.clone());
        }
    }
    rng.shuffle(&mut deliveries);
    deliveries.truncate(10_000);
    assert_eq!(deliveries.len(), 10_000);
    let poison = events[events.len() / 2].event.id().to_owned();

    let store = Arc::new(MemoryStore::with_clock(Arc::new(clock.clone())));
    let handler = common::CountingHandler::new();
    handler.always_fail.lock().unwrap().push(poison.clone());
    let inbox = WebhookProcessor::builder(Verifier::new(common::secret()))
        .store(store.clone())
        .client(fake.clone())
        .handler(handler.clone())
        .clock(Arc::new(clock.clone()))
        .max_attempts(4)
        .build_inbox(InboxConfig {
            batch: 8,
            ..InboxConfig::default()
        });
    let secret = common::secret();
    let mut queued = 0;
    for body in &deliveries {
        let header = test_header(&secret, body.as_bytes(), clock.now());
        match inbox.receive(body.as_bytes(), Some(&header)).await.unwrap() {
            Outcome::Queued { .. } => queued += 1,
            Outcome::Duplicate { .. } | Outcome::Ignored { .. } => {}
            other => panic!("{other:?}"),
        }
    }
    assert!(inbox.backlog().await.unwrap() > 0);
    // Four workers until the queue drains; retries need the clock to move.
    for _round in 0..10 {
        let mut tasks = Vec::new();
        for _ in 0..4 {
            let worker = inbox.worker();
            tasks.push(tokio::spawn(async move {
                worker.run_until_idle().await.unwrap()
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        if inbox.backlog().await.unwrap() == 0 {
            break;
        }
        clock.advance(Duration::hours(2));
    }
    assert_eq!(inbox.backlog().await.unwrap(), 0, "the queue drains");
    let poison_entry = store
        .get(&EventKey::new(poison.as_str(), None))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(poison_entry.state, LedgerState::Dead);
    assert_eq!(poison_entry.attempts, 4);
    // Every other event handled exactly once; the poison never.
    let effects = handler.effects.lock().unwrap().clone();
    assert_eq!(effects.get(&poison), None);
    assert!(effects.values().all(|&n| n == 1), "each effect once");
    let handled_types = events
        .iter()
        .filter(|fe| fe.event.id() != poison)
        .filter(|fe| deliveries.iter().any(|d| d == &fe.body))
        .count();
    assert_eq!(effects.len(), handled_types);
    assert_eq!(queued, handled_types + 1);
    // Every subscription ends in Stripe's final state.
    for truth in fake.truths() {
        let id = truth.id.clone().unwrap();
        let record = store
            .load(&id)
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("{id} missing"));
        assert!(
            record.matches(&SubscriptionState::from_view(&truth)),
            "{id}"
        );
    }
    println!(
        "{} deliveries, {} events queued, 1 dead letter",
        deliveries.len(),
        queued
    );
}

#[tokio::test]
async fn bodies_are_dropped_unless_kept() {
    for keep in [false, true] {
        let clock = ManualClock::at_unix(common::world::START);
        let store = Arc::new(MemoryStore::with_clock(Arc::new(clock.clone())));
        let inbox = WebhookProcessor::builder(Verifier::new(common::secret()))
            .store(store.clone())
            .clock(Arc::new(clock.clone()))
            .build_inbox(InboxConfig {
                keep_payloads: keep,
                ..InboxConfig::default()
            });
        let body = common::sub_event(
            "evt_keep",
            "customer.subscription.updated",
            common::world::START,
            "sub_k",
            "active",
        );
        let header = common::sign(&body, common::world::START);
        assert!(matches!(
            inbox.receive(body.as_bytes(), Some(&header)).await.unwrap(),
            Outcome::Queued { .. }
        ));
        let key = EventKey::new("evt_keep", None);
        assert_eq!(
            store.get(&key).await.unwrap().unwrap().payload.as_deref(),
            Some(body.as_str())
        );
        inbox.worker().run_until_idle().await.unwrap();
        let entry = store.get(&key).await.unwrap().unwrap();
        assert_eq!(entry.state, LedgerState::Processed);
        assert_eq!(entry.payload.is_some(), keep);
    }
}

/// A handler that takes 40 s of a 60 s lease and records how much lease
/// each event had left when it started.
struct SlowHandler {
    clock: ManualClock,
    left_at_start: std::sync::Mutex<Vec<std::time::Duration>>,
}

#[async_trait::async_trait]
impl stripe_webhook_guard::processor::EventHandler for SlowHandler {
    async fn handle(
        &self,
        _event: &stripe_webhook_guard::event::Event,
        ctx: &stripe_webhook_guard::processor::HandlerContext,
    ) -> Result<(), stripe_webhook_guard::processor::HandlerError> {
        self.left_at_start
            .lock()
            .unwrap()
            .push(ctx.lease_remaining());
        self.clock.advance(Duration::seconds(40));
        Ok(())
    }
}

/// Regression: a worker leased a whole batch at once and ran it item after
/// item, so with 40 s handlers and a 60 s lease the second event started
/// with 20 s left and the third after its lease ran out. Each event now
/// starts with the full lease, and the whole batch is processed in one
/// round.
#[tokio::test]
async fn each_event_of_a_batch_starts_with_a_full_lease() {
    let clock = ManualClock::at_unix(common::world::START);
    let store = Arc::new(MemoryStore::with_clock(Arc::new(clock.clone())));
    let handler = Arc::new(SlowHandler {
        clock: clock.clone(),
        left_at_start: std::sync::Mutex::new(Vec::new()),
    });
    let inbox = WebhookProcessor::builder(Verifier::new(common::secret()))
        .store(store.clone())
        .handler(handler.clone())
        .clock(Arc::new(clock.clone()))
        .lease(Duration::seconds(60))
        .build_inbox(InboxConfig {
            batch: 4,
            ..InboxConfig::default()
        });
    for i in 0..4 {
        let id = format!("evt_batch_{i}");
        let body = common::other_event(&id, common::world::START + i);
        let header = common::sign(&body, clock.now().unix_timestamp());
        let queued = inbox.receive(body.as_bytes(), Some(&header)).await;
        assert!(matches!(queued, Ok(Outcome::Queued { .. })), "{queued:?}");
    }
    let round = inbox.worker().run_once().await.unwrap();
    assert_eq!((round.taken, round.processed), (4, 4), "{round:?}");
    let left = handler.left_at_start.lock().unwrap().clone();
    assert_eq!(left, vec![std::time::Duration::from_secs(60); 4]);
    assert_eq!(store.ledger_counts().get("processed"), Some(&4));
}
