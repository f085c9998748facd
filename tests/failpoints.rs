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
mod crash_support;
mod sql_support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration as StdDuration;

use async_trait::async_trait;
use crash_support::{
    Cell, assert_nothing_stuck, check_cell, deliver_until_acknowledged, event_body, print_cells,
    quiet_injected_panics,
};
use stripe_webhook_guard::signature::Verifier;
use stripe_webhook_guard::store::{MemoryStore, Storage};
use stripe_webhook_guard::{Event, EventHandler, HandlerContext, HandlerError, WebhookProcessor};
use time::Duration;

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
            let (event_id, sub_id, body) = event_body(&format!("fp_{backend}"), n);
            fail::cfg(&name, &format!("1*{fault}")).unwrap();
            let cell = format!("{backend} {point} {fault}");
            let deliveries = deliver_until_acknowledged(&processor, &body, LEASE, &cell).await;
            fail::remove(&name);
            // The fault struck: the first delivery was not acknowledged.
            assert!(deliveries >= 2, "{cell}: the failpoint never struck");
            // Lost 0, double effects 0.
            let saves = check_cell(store.as_ref(), &event_id, &sub_id, &cell).await;
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
    assert_nothing_stuck(store.as_ref(), LEASE, backend).await;
    print_cells(
        "failpoint crash matrix (failpoint / fault)",
        backend,
        cells.iter().map(|((p, f), c)| (POINTS[*p], FAULTS[*f], c)),
    );
    cells
}

/// Every store in turn: `fail`'s registry is process-wide, so the cells
/// must not overlap with another test's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failpoint_crash_matrix() {
    let scenario = fail::FailScenario::setup();
    quiet_injected_panics("stripe_webhook_guard::");
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
