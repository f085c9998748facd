//! Inbox mode on the SQL stores: the scenario of `tests/inbox.rs` (FakeStripe
//! subscriptions over 75 days, every event delivered one to three times,
//! shuffled so each subscription's history arrives out of order, one poison
//! event) with four workers, each an instance with its own pool and its own
//! processor:
//!
//! - PostgreSQL (a fresh schema of the server at `DATABASE_URL`): 345
//!   subscriptions, 10,000 deliveries;
//! - SQLite (one temporary file, a pool per instance): the 150 subscriptions
//!   of `tests/inbox.rs`, 4,385 deliveries, to stay well under 30 seconds
//!   (SQLite has one writer at a time).
//!
//! The SQL stores run leases and retry times on the database's clock (real
//! time) while FakeStripe runs on a manual clock: the processors use the
//! system clock, retries back off from 50 ms, and the workers are run again
//! after a short real sleep until the backlog is zero (bounded).
//!
//! Run with `--nocapture` to see the figures.
#![cfg(all(feature = "test-util", any(feature = "postgres", feature = "sqlite")))]

mod common;
mod sql_support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration as StdDuration, Instant};

use stripe_webhook_guard::inbox::{Inbox, InboxConfig, RoundStats};
use stripe_webhook_guard::ledger::{LedgerQuery, LedgerState};
use stripe_webhook_guard::processor::{Outcome, WebhookProcessor};
use stripe_webhook_guard::signature::{Verifier, test_header};
use stripe_webhook_guard::subscription::SubscriptionState;
use stripe_webhook_guard::testing::{FakeEvent, FakeStripe};
use time::{Duration, OffsetDateTime};

const WORKERS: usize = 4;
const MAX_ATTEMPTS: u32 = 4;

/// FakeStripe's history and the deliveries of it (as in `tests/inbox.rs`).
struct World {
    fake: Arc<FakeStripe>,
    events: Vec<FakeEvent>,
    deliveries: Vec<String>,
    poison: String,
}

fn world(subscriptions: usize, max_deliveries: usize) -> World {
    let common::world::History {
        fake,
        events,
        mut deliveries,
        ..
    } = common::world::history(77, subscriptions);
    deliveries.truncate(max_deliveries);
    let poison = events[events.len() / 2].event.id().to_owned();
    World {
        fake,
        events,
        deliveries,
        poison,
    }
}

/// What a run did.
struct Figures {
    deliveries: usize,
    queued: usize,
    duplicates: usize,
    receive: StdDuration,
    drain: StdDuration,
    passes: usize,
    rounds: RoundStats,
}

/// Receives every delivery through four instances (round-robin, four
/// concurrent senders), drains the inbox with one worker per instance, and
/// checks the outcome. `stores` are the instances' stores over one database.
async fn run_inbox<S>(
    stores: &[Arc<S>],
    subscriptions: usize,
    max_deliveries: usize,
    budget: StdDuration,
) -> Figures
where
    S: stripe_webhook_guard::store::InboxStorage,
{
    assert_eq!(stores.len(), WORKERS);
    let World {
        fake,
        events,
        deliveries,
        poison,
    } = world(subscriptions, max_deliveries);
    assert!(deliveries.len() >= 4_000, "{} deliveries", deliveries.len());
    let handler = common::CountingHandler::new();
    handler.always_fail.lock().unwrap().push(poison.clone());
    let config = InboxConfig {
        batch: 8,
        base_backoff: Duration::milliseconds(50),
        max_backoff: Duration::seconds(1),
        ..InboxConfig::default()
    };
    let inboxes: Vec<Inbox> = stores
        .iter()
        .map(|store| {
            // The system clock (the default): leases and retry times are on
            // the database's clock, which is real time.
            WebhookProcessor::builder(Verifier::new(common::secret()))
                .store(store.clone())
                .client(fake.clone())
                .handler(handler.clone())
                .max_attempts(MAX_ATTEMPTS)
                .build_inbox(config)
        })
        .collect();

    // Receive: four senders, delivery k to instance k % 4.
    let started = Instant::now();
    let deliveries = Arc::new(deliveries);
    let mut tasks = Vec::new();
    for (k, inbox) in inboxes.iter().enumerate() {
        let inbox = inbox.clone();
        let deliveries = deliveries.clone();
        tasks.push(tokio::spawn(async move {
            let secret = common::secret();
            let (mut queued, mut duplicates) = (0usize, 0usize);
            for body in deliveries.iter().skip(k).step_by(WORKERS) {
                let header = test_header(&secret, body.as_bytes(), OffsetDateTime::now_utc());
                match inbox.receive(body.as_bytes(), Some(&header)).await {
                    Ok(r @ Outcome::Queued { .. }) => {
                        assert_eq!(r.http_status(), 200);
                        queued += 1;
                    }
                    Ok(Outcome::Duplicate { .. }) => duplicates += 1,
                    other => panic!("{other:?}"),
                }
            }
            (queued, duplicates)
        }));
    }
    let (mut queued, mut duplicates) = (0, 0);
    for t in tasks {
        let (q, d) = t.await.unwrap();
        queued += q;
        duplicates += d;
    }
    let receive = started.elapsed();
    assert_eq!(queued + duplicates, deliveries.len());
    assert!(inboxes[0].backlog().await.unwrap() > 0);

    // Drain: one worker per instance until nothing is due, then a short
    // real sleep (retries come due on the database's clock), until the
    // backlog is zero.
    let started = Instant::now();
    let mut rounds = RoundStats::default();
    let mut passes = 0;
    loop {
        passes += 1;
        let mut tasks = Vec::new();
        for inbox in &inboxes {
            let worker = inbox.worker();
            tasks.push(tokio::spawn(async move {
                worker.run_until_idle().await.unwrap()
            }));
        }
        for t in tasks {
            let r = t.await.unwrap();
            rounds.taken += r.taken;
            rounds.processed += r.processed;
            rounds.retried += r.retried;
            rounds.dead += r.dead;
        }
        if inboxes[0].backlog().await.unwrap() == 0 {
            break;
        }
        assert!(
            started.elapsed() < budget,
            "the queue did not drain within {budget:?}: backlog {}",
            inboxes[0].backlog().await.unwrap()
        );
        tokio::time::sleep(StdDuration::from_millis(20)).await;
    }
    let drain = started.elapsed();

    // Every other event handled exactly once; the poison never.
    let effects = handler.effects.lock().unwrap().clone();
    assert_eq!(effects.get(&poison), None);
    assert!(effects.values().all(|&n| n == 1), "each effect once");
    let handled_events = events
        .iter()
        .filter(|fe| fe.event.id() != poison)
        .filter(|fe| deliveries.iter().any(|d| d == &fe.body))
        .count();
    assert_eq!(effects.len(), handled_events);
    assert_eq!(queued, handled_events + 1);
    // The workers: each event taken once, except the poison (four attempts).
    assert_eq!(rounds.processed, handled_events);
    assert_eq!(rounds.dead, 1);
    assert_eq!(rounds.retried, usize::try_from(MAX_ATTEMPTS - 1).unwrap());
    assert_eq!(
        rounds.taken,
        handled_events + usize::try_from(MAX_ATTEMPTS).unwrap()
    );

    // The ledger: every event processed on its first attempt with its body
    // dropped; the poison dead after four attempts, its body kept.
    let entries = stores[0].list(&LedgerQuery::states(&[], 0)).await.unwrap();
    assert_eq!(entries.len(), queued);
    let mut states = BTreeMap::new();
    for e in &entries {
        *states.entry(e.state.as_str()).or_insert(0usize) += 1;
        if e.key.event_id == poison {
            assert_eq!(e.state, LedgerState::Dead);
            assert_eq!(e.attempts, MAX_ATTEMPTS);
            assert!(e.payload.is_some(), "a dead letter keeps its body");
        } else {
            assert_eq!(e.state, LedgerState::Processed, "{}", e.key.event_id);
            assert_eq!(e.attempts, 1, "{}", e.key.event_id);
            assert!(e.payload.is_none(), "{}: body dropped", e.key.event_id);
        }
    }
    assert_eq!(states.get("processed"), Some(&handled_events));
    assert_eq!(states.get("dead"), Some(&1));

    // Every subscription ends in Stripe's final state (read through any
    // instance: they share the database).
    let truths = fake.truths();
    assert_eq!(truths.len(), subscriptions);
    for (i, truth) in truths.iter().enumerate() {
        let id = truth.id.clone().unwrap();
        let record = stores[i % WORKERS]
            .load(&id)
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("{id} missing"));
        assert!(
            record.matches(&SubscriptionState::from_view(truth)),
            "{id}: {record:?} vs {truth:?}"
        );
    }
    Figures {
        deliveries: deliveries.len(),
        queued,
        duplicates,
        receive,
        drain,
        passes,
        rounds,
    }
}

fn report(backend: &str, f: &Figures) {
    println!(
        "{backend}: {} deliveries -> {} queued, {} duplicates, received in {:.2} s; \
         {WORKERS} workers drained in {:.2} s ({} passes): taken {}, processed {}, retried {}, \
         dead {}; every subscription matches FakeStripe",
        f.deliveries,
        f.queued,
        f.duplicates,
        f.receive.as_secs_f64(),
        f.drain.as_secs_f64(),
        f.passes,
        f.rounds.taken,
        f.rounds.processed,
        f.rounds.retried,
        f.rounds.dead
    );
}

/// PostgreSQL: four instances, 10,000 deliveries.
#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_four_instances_ten_thousand_deliveries() {
    use sql_support::pg::{database_url, fresh_schema, pool};
    use stripe_webhook_guard::store::PgStore;

    let (schema, _admin, _guard) = fresh_schema().await;
    let mut stores = Vec::new();
    for _ in 0..WORKERS {
        let own = pool(&database_url(), 4, StdDuration::from_secs(30)).await;
        stores.push(Arc::new(PgStore::with_schema(own, &schema).unwrap()));
    }
    // 345 subscriptions: 4,976 events, 10,104 deliveries, cut to 10,000.
    let f = run_inbox(&stores, 345, 10_000, StdDuration::from_secs(60)).await;
    assert_eq!(f.deliveries, 10_000);
    report("postgres", &f);
}

/// SQLite: four instances on one file.
#[cfg(feature = "sqlite")]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_four_instances_one_file() {
    use sqlx::sqlite::SqlitePoolOptions;
    use stripe_webhook_guard::store::SqliteStore;

    let (path, _guard) = sql_support::lite::temp_db();
    let mut stores = Vec::new();
    for _ in 0..WORKERS {
        let own = SqlitePoolOptions::new()
            .max_connections(2)
            .acquire_timeout(StdDuration::from_secs(30))
            .connect_with(SqliteStore::connect_options(&path))
            .await
            .unwrap_or_else(|e| panic!("cannot open {}: {e}", path.display()));
        let store = SqliteStore::new(own);
        store.migrate().await.expect("migrate");
        stores.push(Arc::new(store));
    }
    let f = run_inbox(&stores, 150, 10_000, StdDuration::from_secs(40)).await;
    assert_eq!(f.deliveries, 4_385);
    report("sqlite", &f);
}

/// A handler that signals it started, then waits forever.
#[cfg(feature = "postgres")]
struct Stuck(tokio::sync::Notify);

#[cfg(feature = "postgres")]
#[async_trait::async_trait]
impl stripe_webhook_guard::EventHandler for Stuck {
    async fn handle(
        &self,
        _event: &stripe_webhook_guard::Event,
        _ctx: &stripe_webhook_guard::HandlerContext,
    ) -> Result<(), stripe_webhook_guard::HandlerError> {
        self.0.notify_one();
        std::future::pending().await
    }
}

/// `Inbox::shutdown` on PostgreSQL: a worker took two events (batch 2) and
/// is stuck in the first; the shutdown gives back the second at once, cuts
/// the first off at the deadline and releases it. Both rows are `failed`
/// with no attempt spent, so the next instance takes them at once instead
/// of waiting for the 60 s lease (before, the inbox's claims were not
/// registered and stayed `processing` until the lease ran out).
#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_inbox_shutdown_releases_its_claims() {
    use sql_support::pg::{database_url, fresh_schema, ledger_state, pool};
    use stripe_webhook_guard::store::PgStore;

    let (schema, admin, _guard) = fresh_schema().await;
    let store = Arc::new(
        PgStore::with_schema(
            pool(&database_url(), 4, StdDuration::from_secs(30)).await,
            &schema,
        )
        .unwrap(),
    );
    let stuck = Arc::new(Stuck(tokio::sync::Notify::new()));
    let build = |handler: Arc<dyn stripe_webhook_guard::EventHandler>| {
        WebhookProcessor::builder(Verifier::new(common::secret()))
            .store(store.clone())
            .handler(handler)
            .lease(Duration::seconds(60))
            .build_inbox(InboxConfig {
                batch: 2,
                ..InboxConfig::default()
            })
    };
    let inbox = build(stuck.clone());
    let now = OffsetDateTime::now_utc().unix_timestamp();
    for i in 0..2 {
        let body = common::other_event(&format!("evt_pg_stop_{i}"), now + i);
        let header = common::sign(&body, now);
        let queued = inbox.receive(body.as_bytes(), Some(&header)).await;
        assert!(matches!(queued, Ok(Outcome::Queued { .. })), "{queued:?}");
    }
    let worker = inbox.worker();
    let task = tokio::spawn(async move { worker.run(std::future::pending()).await });
    stuck.0.notified().await;
    let stopped = inbox.shutdown(Duration::milliseconds(200)).await.unwrap();
    assert_eq!((stopped.cancelled, stopped.released), (1, 2), "{stopped:?}");
    task.await.unwrap().unwrap();
    for i in 0..2 {
        let row = ledger_state(&admin, &schema, &format!("evt_pg_stop_{i}")).await;
        assert_eq!(row, Some(("failed".to_owned(), 0)), "evt_pg_stop_{i}");
    }
    let next = build(common::CountingHandler::new());
    let round = next.worker().run_until_idle().await.unwrap();
    assert_eq!((round.taken, round.processed), (2, 2), "{round:?}");
}
