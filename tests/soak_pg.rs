//! Soak under database faults: the inbox on PostgreSQL with four worker
//! instances (each with its own pool, all through a TCP proxy), while
//!
//! - 5% of the `INSERT`/`UPDATE` statements on the ledger and subscription
//!   tables fail with an injected serialization failure (SQLSTATE `40001`)
//!   or deadlock (`40P01`), half each, raised by a statement trigger;
//! - every two seconds the proxy resets every database connection at once
//!   (statements in flight are lost mid-way, exactly as a network blip or a
//!   database fail-over loses them);
//! - FakeStripe's history is delivered one to three times per event,
//!   shuffled so each subscription's events arrive out of order, and a few
//!   poison events fail in the handler every time.
//!
//! A delivery that is not acknowledged (a store error answers 503) is sent
//! again, as Stripe would. When the backlog is empty the faults stop, one
//! lease passes, and the ledger and the subscriptions are checked:
//!
//! - lost: every non-poison event's ledger entry is `processed` (0 lost);
//! - dead letters: exactly the poison events;
//! - stuck: no `processing` row is left once one lease has passed;
//! - double: every subscription equals FakeStripe's final object (a
//!   subscription change applied twice, or an old one applied last, would
//!   show), and no event is completed twice (completion is fenced by the
//!   lease token). A handler may run again for an event whose completion
//!   write was lost to a fault: that is the at-least-once contract of
//!   handlers, and the run counts those re-runs separately;
//! - memory: resident set size after receiving and at the end.
//!
//! Size: `SOAK_EVENTS` events (default 1,000 so `cargo test` stays quick);
//! the figure in ROBUSTNESS.md comes from
//! `SOAK_EVENTS=100000 cargo test --release --all-features --test soak_pg -- --nocapture`.
//! The whole run is bounded to ten minutes.
#![cfg(all(feature = "test-util", feature = "postgres"))]

mod common;
mod sql_support;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration as StdDuration, Instant};

use async_trait::async_trait;
use sql_support::pg::{database_url, fresh_schema, pool, upstream_addr, via};
use sql_support::proxy::Proxy;
use sqlx::{AssertSqlSafe, PgPool, Row};
use stripe_webhook_guard::clock::ManualClock;
use stripe_webhook_guard::inbox::{Inbox, InboxConfig};
use stripe_webhook_guard::processor::{Outcome, WebhookProcessor};
use stripe_webhook_guard::signature::{Verifier, test_header};
use stripe_webhook_guard::store::PgStore;
use stripe_webhook_guard::subscription::SubscriptionState;
use stripe_webhook_guard::testing::{Card, FakeConfig, FakeStripe, Rng, ShapeMix, Subscribe};
use stripe_webhook_guard::{Event, EventHandler, HandlerContext, HandlerError, SubscriptionStore};
use time::{Duration, OffsetDateTime};

const WORKERS: usize = 4;
const MAX_ATTEMPTS: u32 = 5;
const POISON: usize = 3;
const FAULT_RATE: f64 = 0.05;
const RESET_EVERY: StdDuration = StdDuration::from_secs(2);
const LEASE_SECONDS: i64 = 5;
const BOUND: StdDuration = StdDuration::from_secs(600);

/// Counts handler runs per event; the poison events always fail.
#[derive(Default)]
struct Handler {
    runs: Mutex<HashMap<String, u32>>,
    poison: Vec<String>,
}

#[async_trait]
impl EventHandler for Handler {
    async fn handle(&self, event: &Event, _ctx: &HandlerContext) -> Result<(), HandlerError> {
        *self
            .runs
            .lock()
            .unwrap()
            .entry(event.id().to_owned())
            .or_insert(0) += 1;
        if self.poison.iter().any(|p| p == event.id()) {
            return Err(HandlerError::retryable("poison"));
        }
        Ok(())
    }
}

/// Installs the statement-fault trigger in `schema`; `set_rate` changes it.
async fn install_faults(admin: &PgPool, schema: &str) {
    let statements = [
        format!("CREATE TABLE {schema}.chaos (rate double precision NOT NULL)"),
        format!("INSERT INTO {schema}.chaos VALUES (0)"),
        format!(
            "CREATE FUNCTION {schema}.chaos_fault() RETURNS trigger LANGUAGE plpgsql AS $$
             DECLARE r double precision;
             BEGIN
               SELECT rate INTO r FROM {schema}.chaos;
               IF random() < r THEN
                 IF random() < 0.5 THEN
                   RAISE EXCEPTION 'injected serialization failure' USING ERRCODE = '40001';
                 ELSE
                   RAISE EXCEPTION 'injected deadlock' USING ERRCODE = '40P01';
                 END IF;
               END IF;
               RETURN NULL;
             END $$"
        ),
        format!(
            "CREATE TRIGGER chaos_ledger BEFORE INSERT OR UPDATE ON {schema}.ledger
             FOR EACH STATEMENT EXECUTE FUNCTION {schema}.chaos_fault()"
        ),
        format!(
            "CREATE TRIGGER chaos_subscriptions BEFORE INSERT OR UPDATE ON {schema}.subscriptions
             FOR EACH STATEMENT EXECUTE FUNCTION {schema}.chaos_fault()"
        ),
    ];
    for sql in statements {
        sqlx::query(AssertSqlSafe(sql))
            .execute(admin)
            .await
            .unwrap();
    }
}

async fn set_rate(admin: &PgPool, schema: &str, rate: f64) {
    sqlx::query(AssertSqlSafe(format!(
        "UPDATE {schema}.chaos SET rate = $1"
    )))
    .bind(rate)
    .execute(admin)
    .await
    .unwrap();
}

/// `(state, count)` of the ledger, read straight from the server.
async fn states(admin: &PgPool, schema: &str) -> HashMap<String, i64> {
    sqlx::query(AssertSqlSafe(format!(
        "SELECT state, count(*) AS n FROM {schema}.ledger GROUP BY state"
    )))
    .fetch_all(admin)
    .await
    .unwrap()
    .into_iter()
    .map(|r| (r.get::<String, _>("state"), r.get::<i64, _>("n")))
    .collect()
}

/// Resident set size in KiB (Linux), or 0.
fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|n| n.parse().ok())
        })
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn soak_inbox_under_database_faults() {
    let target: usize = std::env::var("SOAK_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000);
    let started = Instant::now();

    // FakeStripe's history: about 14 events per subscription over 75 days.
    let clock = ManualClock::at_unix(common::world::START);
    let fake = Arc::new(FakeStripe::new(
        clock,
        FakeConfig {
            seed: 4242,
            shapes: ShapeMix::Mixed,
            ..FakeConfig::default()
        },
    ));
    let mut rng = Rng::new(4242);
    for i in 0..target.div_ceil(14) {
        let c = fake.create_customer();
        let s = fake.subscribe(
            &c,
            &Subscribe {
                trial_days: (i % 3 == 0).then_some(14),
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
    let poison: Vec<String> = (1..=POISON)
        .map(|k| {
            events[k * events.len() / (POISON + 1)]
                .event
                .id()
                .to_owned()
        })
        .collect();

    // The database, its faults, and four instances through the proxy.
    let (schema, admin, _guard) = fresh_schema().await;
    install_faults(&admin, &schema).await;
    let url = database_url();
    let proxy = Proxy::start(upstream_addr(&url)).await;
    let proxied = via(&url, &proxy.addr());
    let handler = Arc::new(Handler {
        poison: poison.clone(),
        ..Handler::default()
    });
    let config = InboxConfig {
        batch: 8,
        base_backoff: Duration::milliseconds(20),
        max_backoff: Duration::milliseconds(500),
        ..InboxConfig::default()
    };
    let mut inboxes: Vec<Inbox> = Vec::new();
    for _ in 0..WORKERS {
        let own = pool(&proxied, 4, StdDuration::from_secs(5)).await;
        let store = Arc::new(PgStore::with_schema(own, &schema).unwrap());
        inboxes.push(
            WebhookProcessor::builder(Verifier::new(common::secret()))
                .store(store)
                .client(fake.clone())
                .handler(handler.clone())
                .lease(Duration::seconds(LEASE_SECONDS))
                .max_attempts(MAX_ATTEMPTS)
                .build_inbox(config),
        );
    }
    set_rate(&admin, &schema, FAULT_RATE).await;
    let resetting = Arc::new(AtomicBool::new(true));
    let resets = Arc::new(AtomicU64::new(0));
    let proxy = Arc::new(proxy);
    let chaos = {
        let (proxy, resetting, resets) = (proxy.clone(), resetting.clone(), resets.clone());
        tokio::spawn(async move {
            while resetting.load(Ordering::SeqCst) {
                tokio::time::sleep(RESET_EVERY).await;
                proxy.cut().await;
                proxy.restore();
                resets.fetch_add(1, Ordering::SeqCst);
            }
        })
    };

    // Receive: four senders; a delivery not acknowledged is sent again.
    let deliveries = Arc::new(deliveries);
    let sent_again = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for (k, inbox) in inboxes.iter().enumerate() {
        let (inbox, deliveries, sent_again) =
            (inbox.clone(), deliveries.clone(), sent_again.clone());
        tasks.push(tokio::spawn(async move {
            let secret = common::secret();
            for body in deliveries.iter().skip(k).step_by(WORKERS) {
                loop {
                    let header = test_header(&secret, body.as_bytes(), OffsetDateTime::now_utc());
                    match inbox.receive(body.as_bytes(), Some(&header)).await {
                        Ok(Outcome::Queued { .. } | Outcome::Duplicate { .. }) => break,
                        Ok(other) => assert!(
                            other.http_status() >= 500 || other.http_status() == 409,
                            "an answer Stripe would not retry: {other:?}"
                        ),
                        Err(e) => assert!(e.http_status() >= 500, "{e}"),
                    }
                    sent_again.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(StdDuration::from_millis(5)).await;
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let received = started.elapsed();
    let rss_after_receive = rss_kib();

    // Drain under faults until nothing is left to do.
    let worker_errors = Arc::new(AtomicU64::new(0));
    loop {
        let mut tasks = Vec::new();
        for inbox in &inboxes {
            let (worker, errors) = (inbox.worker(), worker_errors.clone());
            tasks.push(tokio::spawn(async move {
                if worker.run_until_idle().await.is_err() {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let s = states(&admin, &schema).await;
        let open: i64 = ["pending", "processing", "failed"]
            .iter()
            .filter_map(|k| s.get(*k))
            .sum();
        if open == 0 {
            break;
        }
        assert!(
            started.elapsed() < BOUND,
            "not drained within {BOUND:?}: {s:?}"
        );
        tokio::time::sleep(StdDuration::from_millis(50)).await;
    }
    let drained = started.elapsed();

    // Faults off; one lease passes; a last round must find nothing.
    set_rate(&admin, &schema, 0.0).await;
    resetting.store(false, Ordering::SeqCst);
    chaos.await.unwrap();
    tokio::time::sleep(StdDuration::from_secs(LEASE_SECONDS as u64 + 1)).await;
    for inbox in &inboxes {
        let round = inbox.worker().run_until_idle().await.unwrap();
        assert_eq!(
            round.taken, 0,
            "work left after the faults stopped: {round:?}"
        );
    }
    let rss_end = rss_kib();

    // Lost, dead, stuck.
    let rows = sqlx::query(AssertSqlSafe(format!(
        "SELECT event_id, state, attempts FROM {schema}.ledger"
    )))
    .fetch_all(&admin)
    .await
    .unwrap();
    let mut lost = Vec::new();
    let mut dead = Vec::new();
    let mut stuck = 0;
    for row in &rows {
        let id: String = row.get("event_id");
        let state: String = row.get("state");
        if state == "processing" {
            stuck += 1;
        }
        if poison.contains(&id) {
            if state == "dead" {
                dead.push(id);
            }
        } else if state != "processed" {
            lost.push((id, state));
        }
    }
    assert_eq!(rows.len(), events.len(), "every event has a ledger entry");
    assert!(lost.is_empty(), "lost: {lost:?}");
    assert_eq!(stuck, 0, "stuck processing rows");
    dead.sort();
    let mut expected_dead = poison.clone();
    expected_dead.sort();
    assert_eq!(dead, expected_dead, "dead letters are the poison events");

    // Double: every subscription equals Stripe's final object.
    let direct = Arc::new(PgStore::with_schema(admin.clone(), &schema).unwrap());
    let truths = fake.truths();
    for truth in &truths {
        let id = truth.id.clone().unwrap();
        let record = direct
            .load(&id)
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("{id} missing"));
        assert!(
            record.matches(&SubscriptionState::from_view(truth)),
            "{id}: {record:?} vs {truth:?}"
        );
    }
    let runs = handler.runs.lock().unwrap().clone();
    let reruns: u32 = runs
        .iter()
        .filter(|(id, _)| !poison.contains(id))
        .map(|(_, n)| n.saturating_sub(1))
        .sum();
    let not_run = events
        .iter()
        .filter(|fe| !runs.contains_key(fe.event.id()))
        .count();
    assert_eq!(not_run, 0, "every event reached the handler");
    let total = started.elapsed();
    assert!(total < BOUND, "took {total:?}");
    println!(
        "soak: {} events ({} deliveries, {} sent again after a 5xx), {} subscriptions, \
         {WORKERS} workers; faults: {:.0}% of ledger/subscription writes, {} connection resets; \
         received in {:.1} s, drained at {:.1} s, total {:.1} s; lost 0, dead {} (= poison), \
         stuck processing 0, subscriptions equal to Stripe {}/{}, handler re-runs after a lost \
         completion {reruns}, worker rounds ended by a store error {}; RSS {} MiB after receiving, \
         {} MiB at the end",
        events.len(),
        deliveries.len(),
        sent_again.load(Ordering::Relaxed),
        truths.len(),
        FAULT_RATE * 100.0,
        resets.load(Ordering::SeqCst),
        received.as_secs_f64(),
        drained.as_secs_f64(),
        total.as_secs_f64(),
        dead.len(),
        truths.len(),
        truths.len(),
        worker_errors.load(Ordering::Relaxed),
        rss_after_receive / 1024,
        rss_end / 1024,
    );
}
