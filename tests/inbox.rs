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
use time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn four_workers_ten_thousand_deliveries() {
    let common::world::History {
        clock,
        fake,
        events,
        mut deliveries,
    } = common::world::history(77, 345);
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

/// A handler that, while `block` is set, signals that it started and then
/// waits until `proceed` is notified (forever if it never is); otherwise it
/// finishes at once.
struct Blocking {
    block: std::sync::atomic::AtomicBool,
    started: tokio::sync::Notify,
    proceed: tokio::sync::Notify,
}

impl Blocking {
    fn new(block: bool) -> Arc<Self> {
        Arc::new(Self {
            block: std::sync::atomic::AtomicBool::new(block),
            started: tokio::sync::Notify::new(),
            proceed: tokio::sync::Notify::new(),
        })
    }
}

#[async_trait::async_trait]
impl stripe_webhook_guard::processor::EventHandler for Blocking {
    async fn handle(
        &self,
        _event: &stripe_webhook_guard::event::Event,
        _ctx: &stripe_webhook_guard::processor::HandlerContext,
    ) -> Result<(), stripe_webhook_guard::processor::HandlerError> {
        if self.block.load(std::sync::atomic::Ordering::SeqCst) {
            self.started.notify_one();
            self.proceed.notified().await;
        }
        Ok(())
    }
}

/// An inbox over `store` (system clock) with `handler`, taking `batch`
/// events per round, and `n` events queued in it.
async fn queued_inbox(
    store: &Arc<MemoryStore>,
    handler: Arc<Blocking>,
    batch: usize,
    n: usize,
) -> stripe_webhook_guard::inbox::Inbox {
    let inbox = WebhookProcessor::builder(Verifier::new(common::secret()))
        .store(store.clone())
        .handler(handler)
        .lease(Duration::seconds(60))
        .build_inbox(InboxConfig {
            batch,
            ..InboxConfig::default()
        });
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    for i in 0..n {
        let body = common::other_event(&format!("evt_stop_{i}"), now);
        let header = common::sign(&body, now);
        let queued = inbox.receive(body.as_bytes(), Some(&header)).await;
        assert!(matches!(queued, Ok(Outcome::Queued { .. })), "{queued:?}");
    }
    inbox
}

/// Regression: an inbox worker did not register the events it took with
/// the processor's held claims, so a worker task aborted mid-event left its
/// claim `processing` until the lease ran out (`release_held` found
/// nothing). Now the claim is held, released without spending an attempt,
/// and another worker takes the event at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_aborted_inbox_workers_claim_is_released() {
    let store = Arc::new(MemoryStore::new());
    let handler = Blocking::new(true);
    let inbox = queued_inbox(&store, handler.clone(), 1, 1).await;
    let worker = inbox.worker();
    let task = tokio::spawn(async move { worker.run_once().await });
    handler.started.notified().await;
    assert_eq!(
        inbox.processor().held_leases().len(),
        1,
        "the claim is held"
    );
    task.abort();
    assert!(task.await.unwrap_err().is_cancelled());
    assert_eq!(inbox.running(), 0);

    assert_eq!(inbox.processor().release_held().await.unwrap(), 1);
    let key = EventKey::new("evt_stop_0", None);
    let entry = store.get(&key).await.unwrap().unwrap();
    assert_eq!(entry.state, LedgerState::Failed, "{entry:?}");
    assert_eq!(entry.attempts, 0, "the release spends no attempt");

    handler
        .block
        .store(false, std::sync::atomic::Ordering::SeqCst);
    let round = inbox.worker().run_until_idle().await.unwrap();
    assert_eq!((round.taken, round.processed), (1, 1), "{round:?}");
    assert_eq!(store.ledger_counts().get("processed"), Some(&1));
}

/// `Inbox::shutdown`: stop taking, give back what was taken but not
/// started, wait for the running event up to the deadline, cut it off and
/// release its claim; the worker's `run` returns. The next process's
/// worker finds all three events due at once, none with an attempt spent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbox_shutdown_cuts_off_at_the_deadline_and_releases_every_claim() {
    let store = Arc::new(MemoryStore::new());
    let handler = Blocking::new(true);
    let inbox = queued_inbox(&store, handler.clone(), 3, 3).await;
    let worker = inbox.worker();
    let task = tokio::spawn(async move { worker.run(std::future::pending()).await });
    handler.started.notified().await;
    assert_eq!(inbox.running(), 1);
    assert_eq!(
        inbox.processor().held_leases().len(),
        3,
        "all taken are held"
    );

    let started = std::time::Instant::now();
    let stopped = inbox.shutdown(Duration::milliseconds(300)).await.unwrap();
    assert!(started.elapsed() >= std::time::Duration::from_millis(300));
    assert_eq!((stopped.cancelled, stopped.released), (1, 3), "{stopped:?}");
    tokio::time::timeout(std::time::Duration::from_secs(5), task)
        .await
        .expect("the worker stops after a shutdown")
        .unwrap()
        .unwrap();
    assert!(inbox.is_closed());
    assert!(inbox.processor().held_leases().is_empty());
    assert_eq!(inbox.worker().run_once().await.unwrap().taken, 0, "closed");
    for i in 0..3 {
        let entry = store
            .get(&EventKey::new(format!("evt_stop_{i}"), None))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            (entry.state, entry.attempts),
            (LedgerState::Failed, 0),
            "{entry:?}"
        );
    }

    // The next process: a fresh inbox over the same store takes all three.
    handler
        .block
        .store(false, std::sync::atomic::Ordering::SeqCst);
    let next = queued_inbox(&store, handler.clone(), 3, 0).await;
    let round = next.worker().run_until_idle().await.unwrap();
    assert_eq!((round.taken, round.processed), (3, 3), "{round:?}");
}

/// A running event that finishes within the deadline is not cut off:
/// shutdown waits for it and has nothing to release.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbox_shutdown_waits_for_an_event_that_finishes_in_time() {
    let store = Arc::new(MemoryStore::new());
    let handler = Blocking::new(true);
    let inbox = queued_inbox(&store, handler.clone(), 1, 1).await;
    let worker = inbox.worker();
    let task = tokio::spawn(async move { worker.run(std::future::pending()).await });
    handler.started.notified().await;
    let waiting = {
        let inbox = inbox.clone();
        tokio::spawn(async move { inbox.shutdown(Duration::seconds(30)).await })
    };
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert!(
        !waiting.is_finished(),
        "shutdown waits for the running event"
    );
    assert!(inbox.is_closed());
    assert_eq!(inbox.running(), 1);
    handler.proceed.notify_one();
    let stopped = waiting.await.unwrap().unwrap();
    assert_eq!((stopped.cancelled, stopped.released), (0, 0), "{stopped:?}");
    task.await.unwrap().unwrap();
    assert_eq!(store.ledger_counts().get("processed"), Some(&1));
}

/// Regression: the held-claims registry measured expiry with
/// `std::time::Instant` plus the configured lease, a second clock beside
/// the processor's. It now uses the lease's own deadline on the
/// processor clock's monotonic face: with a manual clock, a claim held by
/// a dropped delivery is listed until its 60 s lease has passed on that
/// clock, and not after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_claims_run_out_at_the_lease_deadline_on_the_processor_clock() {
    let clock = ManualClock::at_unix(common::world::START);
    let store = Arc::new(MemoryStore::with_clock(Arc::new(clock.clone())));
    let handler = Blocking::new(true);
    let p = WebhookProcessor::builder(Verifier::new(common::secret()))
        .store(store.clone())
        .handler(handler.clone())
        .clock(Arc::new(clock.clone()))
        .lease(Duration::seconds(60))
        .build();
    let body = common::other_event("evt_held_clock", common::world::START);
    let header = common::sign(&body, common::world::START);
    let task = {
        let p = p.clone();
        tokio::spawn(async move { p.handle(body.as_bytes(), Some(&header)).await })
    };
    handler.started.notified().await;
    task.abort();
    let _ = task.await;
    clock.advance(Duration::seconds(59));
    assert_eq!(p.held_leases().len(), 1, "59 s into a 60 s lease");
    clock.advance(Duration::seconds(1));
    assert!(p.held_leases().is_empty(), "the lease has run out");
    assert_eq!(p.release_held().await.unwrap(), 0, "nothing to release");
}

/// A handler that waits until `n` handlers are running at once.
struct Together(tokio::sync::Barrier);

#[async_trait::async_trait]
impl stripe_webhook_guard::processor::EventHandler for Together {
    async fn handle(
        &self,
        _event: &stripe_webhook_guard::event::Event,
        _ctx: &stripe_webhook_guard::processor::HandlerContext,
    ) -> Result<(), stripe_webhook_guard::processor::HandlerError> {
        self.0.wait().await;
        Ok(())
    }
}

/// `InboxConfig::concurrency`: a worker runs the events of a round at the
/// same time (the handler of each waits for the other three: one after
/// another, the round would never finish).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_round_runs_up_to_concurrency_events_at_once() {
    let store = Arc::new(MemoryStore::new());
    let inbox = WebhookProcessor::builder(Verifier::new(common::secret()))
        .store(store.clone())
        .handler(Arc::new(Together(tokio::sync::Barrier::new(4))))
        .build_inbox(InboxConfig {
            batch: 4,
            concurrency: 4,
            ..InboxConfig::default()
        });
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    for i in 0..4 {
        let body = common::other_event(&format!("evt_together_{i}"), now + i);
        let header = common::sign(&body, now);
        inbox.receive(body.as_bytes(), Some(&header)).await.unwrap();
    }
    let round = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        inbox.worker().run_once(),
    )
    .await
    .expect("the four events ran at the same time")
    .unwrap();
    assert_eq!((round.taken, round.processed), (4, 4), "{round:?}");
    assert_eq!(store.ledger_counts().get("processed"), Some(&4));
}
