//! The crash matrix with failpoints compiled into the processor (the
//! internal `failpoints` feature, `fail` crate): an error and a panic at each
//! step of a synchronous delivery, on the in-memory, SQLite and PostgreSQL
//! stores, then Stripe's retries until the delivery is acknowledged.
//!
//! | failpoint (`stripe_webhook_guard::…`) | where |
//! |---|---|
//! | `after_verify` | the signature is verified and the envelope parsed; nothing recorded |
//! | `during_claim` | the claim was committed by the store, its answer lost |
//! | `after_claim` | claimed and registered; the subscription effect has not begun |
//! | `during_save` | the subscription save has not reached the store |
//! | `in_handler` | the application's handler is about to run |
//! | `before_completion` | the handler succeeded; the completion has not reached the store |
//! | `after_commit` | the completion was committed, its answer lost |
//!
//! Faults: `return` (the step fails with a store error, or a handler error
//! in the handler: Stripe gets 503) and `panic` (the task dies there, as a
//! process killed at that instant: the request gets no answer; a panic in
//! the handler is caught and recorded as a failed attempt). Each fault
//! strikes once (`1*return`, `1*panic`).
//!
//! After the faulty delivery, the event is delivered again (waiting out the
//! one-second lease where an attempt still holds it) until Stripe would get
//! a 2xx. Checked for every cell: the fault struck (the first delivery was
//! not acknowledged); the event is `processed` (lost 0); the subscription
//! record was written exactly once and equals the event's snapshot (double
//! effects 0); the handler ran to success once, or twice only where the
//! fault lost a completion after the handler succeeded
//! (`before_completion`); and, per store, no `processing` row is left once
//! one lease has passed (stuck 0).
//!
//! `fail`'s configuration is process-wide: one test function runs every
//! store in turn inside one `fail::FailScenario`.
//!
//! `cargo test --all-features --test failpoints -- --nocapture` prints the
//! matrix.
#![cfg(all(feature = "test-util", feature = "failpoints"))]

mod common;
mod sql_support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration as StdDuration, Instant};

use async_trait::async_trait;
use stripe_webhook_guard::ledger::{EventKey, LedgerQuery, LedgerState};
use stripe_webhook_guard::processor::Outcome;
use stripe_webhook_guard::signature::{Verifier, test_header};
use stripe_webhook_guard::store::{MemoryStore, Storage};
use stripe_webhook_guard::{
    Event, EventHandler, HandlerContext, HandlerError, SubscriptionStatus, WebhookProcessor,
};
use time::{Duration, OffsetDateTime};

const POINTS: [&str; 7] = [
    "after_verify",
    "during_claim",
    "after_claim",
    "during_save",
    "in_handler",
    "before_completion",
    "after_commit",
];

const FAULTS: [&str; 2] = ["return", "panic"];

const LEASE: StdDuration = StdDuration::from_secs(1);

/// Counts successful handler runs.
#[derive(Default)]
struct Handler {
    succeeded: AtomicU32,
}

#[async_trait]
impl EventHandler for Handler {
    async fn handle(&self, _event: &Event, _ctx: &HandlerContext) -> Result<(), HandlerError> {
        self.succeeded.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

/// One `customer.subscription.created` event for a new subscription.
fn event_body(backend: &str, n: usize) -> (String, String, String) {
    let now = OffsetDateTime::now_utc().unix_timestamp();
    let event_id = format!("evt_fp_{backend}_{n}_{now}");
    let sub_id = format!("sub_fp_{backend}_{n}_{now}");
    let body = format!(
        r#"{{"id":"{event_id}","object":"event","type":"customer.subscription.created",
        "created":{now},"livemode":false,"api_version":"2024-06-20","data":{{"object":
        {{"id":"{sub_id}","object":"subscription","customer":"cus_fp_{n}","status":"active",
        "created":{now},"current_period_start":{now},"current_period_end":{},
        "cancel_at_period_end":false,"items":{{"object":"list","data":[]}}}}}}}}"#,
        now + 30 * 86_400
    );
    (event_id, sub_id, body)
}

/// Keeps the failpoints' panics out of the test output (other panics print
/// as usual).
fn quiet_failpoint_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let message = info
                .payload()
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| {
                    info.payload()
                        .downcast_ref::<&str>()
                        .map(|s| (*s).to_owned())
                })
                .unwrap_or_default();
            if !message.contains("stripe_webhook_guard::") {
                default(info);
            }
        }));
    });
}

/// What one cell of the matrix found.
#[derive(Debug, Clone, Copy)]
struct Cell {
    deliveries: u32,
    handler_runs: u32,
    saves: u32,
}

/// Runs every (failpoint, fault) cell against `store`; returns the matrix.
async fn matrix(backend: &str, store: Arc<dyn Storage>) -> BTreeMap<(usize, usize), Cell> {
    let mut cells = BTreeMap::new();
    let mut n = 0;
    for (p, point) in POINTS.iter().enumerate() {
        for (f, fault) in FAULTS.iter().enumerate() {
            n += 1;
            let name = format!("stripe_webhook_guard::{point}");
            let handler = Arc::new(Handler::default());
            let processor = WebhookProcessor::builder(Verifier::new(common::secret()))
                .store(store.clone())
                .handler(handler.clone())
                .lease(Duration::milliseconds(
                    i64::try_from(LEASE.as_millis()).unwrap(),
                ))
                .max_attempts(10)
                .build();
            let (event_id, sub_id, body) = event_body(backend, n);
            fail::cfg(&name, &format!("1*{fault}")).unwrap();
            let cell = format!("{backend} {point} {fault}");
            let started = Instant::now();
            let mut deliveries = 0;
            loop {
                deliveries += 1;
                let p = processor.clone();
                let b = body.clone();
                let header =
                    test_header(&common::secret(), b.as_bytes(), OffsetDateTime::now_utc());
                // A panic kills this task only, as a crash kills a process.
                let answer =
                    tokio::spawn(async move { p.handle(b.as_bytes(), Some(&header)).await }).await;
                if let Ok(Ok(outcome)) = &answer
                    && outcome.http_status() < 300
                {
                    assert!(
                        matches!(
                            outcome,
                            Outcome::Processed { .. } | Outcome::Duplicate { .. }
                        ),
                        "{cell}: acknowledged as {outcome:?}"
                    );
                    break;
                }
                assert!(
                    started.elapsed() < StdDuration::from_secs(30),
                    "{cell}: not acknowledged after {deliveries} deliveries: {answer:?}"
                );
                // Stripe waits before retrying; an attempt that died still
                // holds its lease until it expires.
                tokio::time::sleep(LEASE + StdDuration::from_millis(100)).await;
            }
            fail::remove(&name);
            // The fault struck: the first delivery was not acknowledged.
            assert!(deliveries >= 2, "{cell}: the failpoint never struck");

            // Lost 0: processed.
            let key = EventKey::new(&event_id, None);
            let entry = store.get(&key).await.unwrap().expect("ledger entry");
            assert_eq!(entry.state, LedgerState::Processed, "{cell}");
            // Double 0: the record was written once (version 1) and is the
            // event's snapshot.
            let record = store.load(&sub_id).await.unwrap().expect("record");
            let saves = u32::try_from(record.version).unwrap();
            assert_eq!(saves, 1, "{cell}: saves");
            assert_eq!(record.status(), &SubscriptionStatus::Active, "{cell}");
            // Handler: once, or again only where a completion was lost after
            // it succeeded.
            let runs = handler.succeeded.load(Ordering::SeqCst);
            let may_rerun = *point == "before_completion";
            assert!(
                runs == 1 || (may_rerun && runs == 2),
                "{cell}: handler succeeded {runs} times"
            );
            cells.insert(
                (p, f),
                Cell {
                    deliveries,
                    handler_runs: runs,
                    saves,
                },
            );
        }
    }
    // Stuck 0: after one lease, nothing is processing.
    tokio::time::sleep(LEASE).await;
    let processing = store
        .list(&LedgerQuery::states(&[LedgerState::Processing], 0))
        .await
        .unwrap();
    assert!(processing.is_empty(), "{backend}: stuck {processing:?}");
    print(backend, &cells);
    cells
}

fn print(backend: &str, cells: &BTreeMap<(usize, usize), Cell>) {
    println!(
        "failpoint crash matrix, {backend}: failpoint / fault -> deliveries until 2xx, handler successes, record saves"
    );
    for ((p, f), c) in cells {
        println!(
            "  {:<18} {:<7} deliveries {}  handler {}  saves {}",
            POINTS[*p], FAULTS[*f], c.deliveries, c.handler_runs, c.saves
        );
    }
    let reruns: u32 = cells.values().map(|c| c.handler_runs - 1).sum();
    println!(
        "  {backend}: {} cells, lost 0, double record writes 0, stuck processing 0, handler re-runs {reruns}",
        cells.len()
    );
}

/// Every store in turn: `fail`'s registry is process-wide, so the cells
/// must not overlap with another test's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failpoint_crash_matrix() {
    let scenario = fail::FailScenario::setup();
    quiet_failpoint_panics();
    let expected = POINTS.len() * FAULTS.len();

    let cells = matrix("memory", Arc::new(MemoryStore::new())).await;
    assert_eq!(cells.len(), expected);

    #[cfg(feature = "sqlite")]
    {
        use stripe_webhook_guard::store::SqliteStore;
        let (path, _guard) = sql_support::lite::temp_db();
        let store = SqliteStore::open(path.to_str().unwrap()).await.unwrap();
        store.migrate().await.unwrap();
        let cells = matrix("sqlite", Arc::new(store)).await;
        assert_eq!(cells.len(), expected);
    }

    #[cfg(feature = "postgres")]
    {
        use sql_support::pg::{database_url, fresh_schema, pool};
        use stripe_webhook_guard::store::PgStore;
        let (schema, _admin, _guard) = fresh_schema().await;
        let own = pool(&database_url(), 4, StdDuration::from_secs(5)).await;
        let store = PgStore::with_schema(own, &schema).unwrap();
        let cells = matrix("postgres", Arc::new(store)).await;
        assert_eq!(cells.len(), expected);
    }

    scenario.teardown();
}
