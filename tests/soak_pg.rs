//! Soak under database faults: the inbox on PostgreSQL with four instances
//! (each with its own pool and its own worker, all through a TCP proxy),
//! deliveries arriving while the workers run, and while
//!
//! - each statement has a 5% chance of a fault, split evenly between a
//!   serialization failure (SQLSTATE `40001`), a deadlock (`40P01`) and a
//!   connection reset: a statement trigger raises `40001` or `40P01` on
//!   3.33% of the `INSERT`/`UPDATE` statements on the ledger and
//!   subscription tables (half each; the only statements a trigger can
//!   fault), and the proxy resets the one connection carrying 1.67% of all
//!   statements (simple `Query` and `Execute` messages), half before the
//!   statement reaches the server and half just after it was forwarded
//!   (the server runs it, the answer is lost);
//! - FakeStripe's history is delivered one to three times per event,
//!   shuffled so each subscription's events arrive out of order, and a few
//!   poison events fail in the handler every time.
//!
//! A delivery that is not acknowledged (a store error answers 503) is sent
//! again, as Stripe would. When every delivery is acknowledged and the
//! backlog is empty the faults stop, the inboxes are shut down
//! (`Inbox::shutdown`), one lease passes, and the ledger and the
//! subscriptions are checked:
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
//! - memory: resident set size (`VmRSS`) and its peak (`VmHWM`) at the
//!   start, after receiving and at the end.
//!
//! Size: `SOAK_EVENTS` events (default 1,000 so `cargo test` stays quick);
//! the figure in ROBUSTNESS.md comes from
//! `SOAK_EVENTS=100000 cargo test --release --all-features --test soak_pg -- --nocapture`.
//! The whole run, generating the history included, is bounded to ten
//! minutes: the test fails when it takes longer.
#![cfg(all(feature = "test-util", feature = "postgres"))]

mod common;
mod sql_support;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration as StdDuration, Instant};

use async_trait::async_trait;
use sql_support::pg::{database_url, fresh_schema, ledger_states, pool, upstream_addr, via};
use sql_support::proxy::Proxy;
use sqlx::{AssertSqlSafe, PgPool, Row};
use stripe_webhook_guard::inbox::{Inbox, InboxConfig};
use stripe_webhook_guard::processor::{Outcome, WebhookProcessor};
use stripe_webhook_guard::signature::{Verifier, test_header};
use stripe_webhook_guard::store::InboxStore;
use stripe_webhook_guard::store::PgStore;
use stripe_webhook_guard::subscription::SubscriptionState;
use stripe_webhook_guard::{Event, EventHandler, HandlerContext, HandlerError, SubscriptionStore};
use time::{Duration, OffsetDateTime};

const WORKERS: usize = 4;
/// Concurrent senders per instance (Stripe delivers concurrently).
const SENDERS: usize = 4;
const MAX_ATTEMPTS: u32 = 5;
const POISON: usize = 3;
/// The chance that a statement meets a fault.
const FAULT_RATE: f64 = 0.05;
/// Of which: serialization failures and deadlocks raised by the trigger on
/// writes (two thirds), connection resets by the proxy (one third).
const WRITE_FAULT_RATE: f64 = FAULT_RATE * 2.0 / 3.0;
const RESET_RATE: f64 = FAULT_RATE / 3.0;
const LEASE_SECONDS: i64 = 5;
const POOL: u32 = 8;
/// Events a worker takes per round, and runs at the same time.
const BATCH: usize = 8;
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
        format!("CREATE SEQUENCE {schema}.chaos_injected"),
        format!(
            "CREATE FUNCTION {schema}.chaos_fault() RETURNS trigger LANGUAGE plpgsql AS $$
             DECLARE r double precision;
             BEGIN
               SELECT rate INTO r FROM {schema}.chaos;
               IF random() < r THEN
                 PERFORM nextval('{schema}.chaos_injected');
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

/// Faults the trigger injected so far (a sequence: not rolled back).
async fn injected(admin: &PgPool, schema: &str) -> i64 {
    sqlx::query(AssertSqlSafe(format!(
        "SELECT CASE WHEN is_called THEN last_value ELSE 0 END AS n FROM {schema}.chaos_injected"
    )))
    .fetch_one(admin)
    .await
    .unwrap()
    .get("n")
}

/// `VmRSS` and `VmHWM` (peak) in KiB (Linux), or 0.
fn memory_kib() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn mib((rss, hwm): (u64, u64)) -> String {
    format!("{} MiB (peak {} MiB)", rss / 1024, hwm / 1024)
}

#[allow(clippy::cast_precision_loss)] // figures for a report
fn percent(part: u64, whole: u64) -> f64 {
    part as f64 * 100.0 / whole.max(1) as f64
}

#[allow(clippy::cast_precision_loss)] // figures for a report
fn per_second(n: usize, d: StdDuration) -> f64 {
    n as f64 / d.as_secs_f64()
}

/// The one-minute load average (Linux), or "?".
fn load() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "?".to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn soak_inbox_under_database_faults() {
    let target: usize = std::env::var("SOAK_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000);
    let started = Instant::now();
    let (load_start, mem_start) = (load(), memory_kib());

    // FakeStripe's history: about 14 events per subscription over 75 days.
    let common::world::History {
        fake,
        events,
        deliveries,
        ..
    } = common::world::history(4242, target.div_ceil(14));
    let poison: Vec<String> = (1..=POISON)
        .map(|k| {
            events[k * events.len() / (POISON + 1)]
                .event
                .id()
                .to_owned()
        })
        .collect();
    let generated = started.elapsed();
    let mem_generated = memory_kib();

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
        batch: BATCH,
        concurrency: BATCH,
        base_backoff: Duration::milliseconds(20),
        max_backoff: Duration::milliseconds(500),
        idle_sleep: Duration::milliseconds(20),
        ..InboxConfig::default()
    };
    let build = |store: Arc<PgStore>| {
        WebhookProcessor::builder(Verifier::new(common::secret()))
            .store(store)
            .client(fake.clone())
            .handler(handler.clone())
            .lease(Duration::seconds(LEASE_SECONDS))
            .max_attempts(MAX_ATTEMPTS)
            .build_inbox(config)
    };
    let mut inboxes: Vec<Inbox> = Vec::new();
    for _ in 0..WORKERS {
        let own = pool(&proxied, POOL, StdDuration::from_secs(5)).await;
        inboxes.push(build(Arc::new(PgStore::with_schema(own, &schema).unwrap())));
    }
    let direct = Arc::new(PgStore::with_schema(admin.clone(), &schema).unwrap());
    set_rate(&admin, &schema, WRITE_FAULT_RATE).await;
    proxy.set_statement_resets(RESET_RATE);
    let faults_on = Instant::now();

    // Progress every 30 s (where the time goes, when a run is too slow).
    let progress = {
        let (admin, schema) = (admin.clone(), schema.clone());
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(StdDuration::from_secs(30)).await;
                println!(
                    "soak progress at {:.0} s: {:?}, load average {}",
                    started.elapsed().as_secs_f64(),
                    ledger_states(&admin, &schema).await,
                    load()
                );
            }
        })
    };

    // One worker per instance, running while the deliveries arrive.
    let workers: Vec<_> = inboxes
        .iter()
        .map(|inbox| {
            let worker = inbox.worker();
            tokio::spawn(async move { worker.run(std::future::pending()).await })
        })
        .collect();

    // Receive: SENDERS per instance; a delivery not acknowledged is sent
    // again, as Stripe would.
    let deliveries = Arc::new(deliveries);
    let sent_again = Arc::new(AtomicU64::new(0));
    let mut senders = Vec::new();
    let lanes = WORKERS * SENDERS;
    for lane in 0..lanes {
        let inbox = inboxes[lane % WORKERS].clone();
        let (deliveries, sent_again) = (deliveries.clone(), sent_again.clone());
        senders.push(tokio::spawn(async move {
            let secret = common::secret();
            for body in deliveries.iter().skip(lane).step_by(lanes) {
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
                    assert!(started.elapsed() < BOUND, "not received within {BOUND:?}");
                    sent_again.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(StdDuration::from_millis(5)).await;
                }
            }
        }));
    }
    for t in senders {
        t.await.unwrap();
    }
    let received = started.elapsed();
    let mem_received = memory_kib();

    // Drained: nothing pending, processing or waiting for a retry.
    loop {
        let backlog = direct.backlog().await.unwrap();
        if backlog == 0 {
            break;
        }
        assert!(
            started.elapsed() < BOUND,
            "not drained within {BOUND:?} (received at {:.1} s): {:?}",
            received.as_secs_f64(),
            ledger_states(&admin, &schema).await
        );
        tokio::time::sleep(StdDuration::from_millis(100)).await;
    }
    let drained = started.elapsed();
    progress.abort();
    let faulty = faults_on.elapsed();

    // Faults off; the inboxes shut down (nothing is running: nothing to
    // release); one lease passes; a last round must find nothing.
    set_rate(&admin, &schema, 0.0).await;
    proxy.set_statement_resets(0.0);
    let (statements, reset_before, reset_after) = proxy.statement_resets();
    let write_faults = injected(&admin, &schema).await;
    for inbox in &inboxes {
        let stopped = inbox
            .shutdown(time::Duration::seconds(LEASE_SECONDS))
            .await
            .unwrap();
        assert_eq!(stopped.cancelled, 0, "{stopped:?}");
    }
    for w in workers {
        // A store error in the last idle round is returned here; it does
        // not matter once the backlog is empty.
        let _ = tokio::time::timeout(StdDuration::from_secs(10), w)
            .await
            .expect("workers stop after shutdown");
    }
    tokio::time::sleep(StdDuration::from_secs(LEASE_SECONDS as u64 + 1)).await;
    let round = build(direct.clone())
        .worker()
        .run_until_idle()
        .await
        .unwrap();
    assert_eq!(
        round.taken, 0,
        "work left after the faults stopped: {round:?}"
    );

    // Lost, dead, stuck.
    let rows = sqlx::query(AssertSqlSafe(format!(
        "SELECT event_id, state FROM {schema}.ledger"
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
    let mem_end = memory_kib();
    let total = started.elapsed();
    let stats: Vec<_> = inboxes.iter().map(|i| i.processor().stats()).collect();
    let failed: u64 = stats.iter().map(|s| s.failed).sum();
    println!(
        "soak: {} events ({} deliveries, {} sent again after a 5xx), {} subscriptions, \
         {WORKERS} instances with one worker (rounds of {BATCH} events run at once) and {SENDERS} \
         senders each, pools of {POOL}; \
         faults on {:.0}% of statements for {:.1} s: {write_faults} serialization failures \
         and deadlocks on writes (trigger rate {:.2}% of writes), {} connection resets ({reset_before} \
         before and {reset_after} after the statement reached the server) among {statements} \
         statements ({:.2}%); generated in {:.1} s, received at {:.1} s, drained at {:.1} s \
         ({:.0} events/s from the start), total {:.1} s (bound {} s); lost 0, dead {} \
         (= poison), stuck processing 0, subscriptions equal to Stripe {}/{}, failed \
         attempts retried {failed}, handler re-runs after a lost completion {reruns}; \
         memory at the start {}, with the history generated {}, after receiving {}, at the \
         end {}; load average {} at the \
         start, {} at the end",
        events.len(),
        deliveries.len(),
        sent_again.load(Ordering::Relaxed),
        truths.len(),
        FAULT_RATE * 100.0,
        faulty.as_secs_f64(),
        WRITE_FAULT_RATE * 100.0,
        reset_before + reset_after,
        percent(reset_before + reset_after, statements),
        generated.as_secs_f64(),
        received.as_secs_f64(),
        drained.as_secs_f64(),
        per_second(events.len(), drained),
        total.as_secs_f64(),
        BOUND.as_secs(),
        dead.len(),
        truths.len(),
        truths.len(),
        mib(mem_start),
        mib(mem_generated),
        mib(mem_received),
        mib(mem_end),
        load_start,
        load(),
    );
    assert!(total < BOUND, "took {total:?}, more than {BOUND:?}");
}
