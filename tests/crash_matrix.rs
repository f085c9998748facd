//! The crash matrix: one fault at each step of a synchronous delivery, on
//! the in-memory, SQLite and PostgreSQL stores, then Stripe's retries until
//! the delivery is acknowledged.
//!
//! Steps (where the fault strikes):
//!
//! | step | where |
//! |---|---|
//! | `after_verify` | the signature is verified; the claim has not reached the store |
//! | `during_claim` | the claim was committed, its answer lost |
//! | `after_claim` | claimed; loading the subscription record fails |
//! | `during_save` | the subscription save fails before it is written |
//! | `save_committed` | the subscription save was committed, its answer lost |
//! | `in_handler` | the application's handler fails or panics |
//! | `before_completion` | the completion has not reached the store |
//! | `after_commit` | the completion was committed, its answer lost |
//!
//! Faults: a store error (`unavailable`), a panic (the task dies there, as
//! a process killed at that instant: the request gets no answer), and, on
//! PostgreSQL, a dropped connection (a TCP proxy closes every database
//! connection at that instant, so the statement fails on the wire).
//!
//! The faults are injected at the store-trait boundary (a wrapper store)
//! and in the handler rather than with failpoints compiled into the
//! library: every step of the processor is a store call, so the wrapper
//! strikes at the same instants, and the same matrix runs against any
//! `Storage` implementation without test hooks in release code.
//!
//! After the faulty delivery, the event is delivered again (waiting out the
//! one-second lease where an attempt still holds it) until Stripe would
//! get a 2xx. Checked for every cell: the event is `processed` (lost 0);
//! the subscription record was written exactly once and equals the event's
//! snapshot (double effects 0); no `processing` row remains once one lease
//! has passed (stuck 0); the handler ran to success exactly once, except
//! where the fault lost a completion after the handler succeeded
//! (`before_completion`, and a panic in `after_commit` is still once): the
//! handler contract is at least once, and these re-runs are counted.
//!
//! `cargo test --all-features --test crash_matrix -- --nocapture` prints
//! the matrix.
#![cfg(feature = "test-util")]

mod common;
mod crash_support;
mod sql_support;

use crash_support::{
    Cell, assert_nothing_stuck, check_cell, deliver_until_acknowledged, event_body, print_cells,
    quiet_injected_panics,
};

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration as StdDuration;

use async_trait::async_trait;
use stripe_webhook_guard::ledger::{
    ClaimOutcome, ClaimRequest, EventKey, FailOutcome, Failure, IgnoreOutcome, IgnoreRequest,
    Lease, LedgerEntry, LedgerQuery,
};
use stripe_webhook_guard::signature::Verifier;
use stripe_webhook_guard::store::{
    CursorStore, EventLedger, MemoryStore, Storage, StoreError, StoreErrorKind, SubscriptionQuery,
    SubscriptionStore,
};
use stripe_webhook_guard::subscription::{CustomerEntitlements, SubscriptionRecord};
use stripe_webhook_guard::{Event, EventHandler, HandlerContext, HandlerError, WebhookProcessor};
use time::{Duration, OffsetDateTime};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Step {
    AfterVerify,
    DuringClaim,
    AfterClaim,
    DuringSave,
    SaveCommitted,
    InHandler,
    BeforeCompletion,
    AfterCommit,
}

const STEPS: [Step; 8] = [
    Step::AfterVerify,
    Step::DuringClaim,
    Step::AfterClaim,
    Step::DuringSave,
    Step::SaveCommitted,
    Step::InHandler,
    Step::BeforeCompletion,
    Step::AfterCommit,
];

impl Step {
    fn as_str(self) -> &'static str {
        match self {
            Self::AfterVerify => "after_verify",
            Self::DuringClaim => "during_claim",
            Self::AfterClaim => "after_claim",
            Self::DuringSave => "during_save",
            Self::SaveCommitted => "save_committed",
            Self::InHandler => "in_handler",
            Self::BeforeCompletion => "before_completion",
            Self::AfterCommit => "after_commit",
        }
    }

    /// Whether the store call at this step runs before the fault (its
    /// effect is committed and only the answer is lost).
    fn commits_first(self) -> bool {
        matches!(
            self,
            Self::DuringClaim | Self::SaveCommitted | Self::AfterCommit
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Fault {
    Error,
    Panic,
    Disconnect,
}

impl Fault {
    fn as_str(self) -> &'static str {
        match self {
            Self::Error => "error",
            Self::Panic => "panic",
            Self::Disconnect => "disconnect",
        }
    }
}

/// Cuts every database connection (PostgreSQL through the proxy).
#[async_trait]
trait Disconnect: Send + Sync {
    async fn drop_connections(&self);
}

/// A store that strikes once, at the armed step, with the armed fault.
struct Faulty<S> {
    inner: Arc<S>,
    armed: Mutex<Option<(Step, Fault)>>,
    struck: Mutex<Option<(Step, Fault)>>,
    disconnect: Option<Arc<dyn Disconnect>>,
}

impl<S: Storage> Faulty<S> {
    fn new(inner: Arc<S>, disconnect: Option<Arc<dyn Disconnect>>) -> Arc<Self> {
        Arc::new(Self {
            inner,
            armed: Mutex::new(None),
            struck: Mutex::new(None),
            disconnect,
        })
    }

    fn arm(&self, step: Step, fault: Fault) {
        *self.armed.lock().unwrap() = Some((step, fault));
    }

    /// Strikes if `step` is armed: returns the error to answer with.
    fn strike(&self, step: Step) -> Result<(), StoreError> {
        let fault = {
            let mut armed = self.armed.lock().unwrap();
            match *armed {
                Some((s, f)) if s == step => {
                    *armed = None;
                    *self.struck.lock().unwrap() = Some((s, f));
                    f
                }
                _ => return Ok(()),
            }
        };
        match fault {
            Fault::Error => Err(StoreError::new(
                StoreErrorKind::Unavailable,
                "injected fault",
            )),
            Fault::Panic => panic!("injected crash at {}", step.as_str()),
            // The caller drops the connections at the right instant.
            Fault::Disconnect => Ok(()),
        }
    }

    /// Runs `op` with the fault at `step`: after it when the step is a
    /// committed write whose answer is lost, else before it. A dropped
    /// connection before the write strikes while the statement is in flight.
    async fn around<T, F>(&self, step: Step, op: F) -> Result<T, StoreError>
    where
        F: std::future::Future<Output = Result<T, StoreError>> + Send,
        T: Send,
    {
        if step.commits_first() {
            let out = op.await?;
            self.strike(step)?;
            if self.disconnected(step) {
                if let Some(d) = &self.disconnect {
                    d.drop_connections().await;
                }
                return Err(StoreError::new(StoreErrorKind::Unavailable, "answer lost"));
            }
            return Ok(out);
        }
        self.strike(step)?;
        match (&self.disconnect, self.disconnected(step)) {
            (Some(d), true) => {
                let (out, ()) = tokio::join!(op, async {
                    tokio::task::yield_now().await;
                    d.drop_connections().await;
                });
                out
            }
            _ => op.await,
        }
    }

    /// Whether a disconnect just struck at `step` (the answer is lost).
    fn disconnected(&self, step: Step) -> bool {
        self.struck.lock().unwrap().take() == Some((step, Fault::Disconnect))
    }
}

#[async_trait]
impl<S: Storage> EventLedger for Faulty<S> {
    async fn claim(&self, r: &ClaimRequest) -> Result<ClaimOutcome, StoreError> {
        let claim = self.around(Step::DuringClaim, self.inner.claim(r));
        self.around(Step::AfterVerify, claim).await
    }
    async fn complete(&self, lease: &Lease) -> Result<(), StoreError> {
        let complete = self.around(Step::AfterCommit, self.inner.complete(lease));
        self.around(Step::BeforeCompletion, complete).await
    }
    async fn fail(&self, lease: &Lease, f: &Failure) -> Result<FailOutcome, StoreError> {
        self.inner.fail(lease, f).await
    }
    async fn release(&self, lease: &Lease) -> Result<(), StoreError> {
        self.inner.release(lease).await
    }
    async fn ignore(&self, r: &IgnoreRequest) -> Result<IgnoreOutcome, StoreError> {
        self.inner.ignore(r).await
    }
    async fn get(&self, key: &EventKey) -> Result<Option<LedgerEntry>, StoreError> {
        self.inner.get(key).await
    }
    async fn list(&self, q: &LedgerQuery) -> Result<Vec<LedgerEntry>, StoreError> {
        self.inner.list(q).await
    }
    async fn requeue(&self, key: &EventKey) -> Result<bool, StoreError> {
        self.inner.requeue(key).await
    }
    async fn prune(&self, before: OffsetDateTime) -> Result<u64, StoreError> {
        self.inner.prune(before).await
    }
}

#[async_trait]
impl<S: Storage> SubscriptionStore for Faulty<S> {
    async fn load(&self, id: &str) -> Result<Option<SubscriptionRecord>, StoreError> {
        self.around(Step::AfterClaim, self.inner.load(id)).await
    }
    async fn save(&self, record: &SubscriptionRecord) -> Result<u64, StoreError> {
        let save = self.around(Step::SaveCommitted, self.inner.save(record));
        self.around(Step::DuringSave, save).await
    }
    async fn find_by_customer(&self, c: &str) -> Result<Vec<SubscriptionRecord>, StoreError> {
        self.inner.find_by_customer(c).await
    }
    async fn find_by_client_reference(
        &self,
        r: &str,
    ) -> Result<Vec<SubscriptionRecord>, StoreError> {
        self.inner.find_by_client_reference(r).await
    }
    async fn list_subscriptions(
        &self,
        q: &SubscriptionQuery,
    ) -> Result<Vec<SubscriptionRecord>, StoreError> {
        self.inner.list_subscriptions(q).await
    }
    async fn load_entitlements(&self, c: &str) -> Result<Option<CustomerEntitlements>, StoreError> {
        self.inner.load_entitlements(c).await
    }
    async fn save_entitlements(&self, e: &CustomerEntitlements) -> Result<u64, StoreError> {
        self.inner.save_entitlements(e).await
    }
}

#[async_trait]
impl<S: Storage> CursorStore for Faulty<S> {
    async fn load_cursor(&self, name: &str) -> Result<Option<String>, StoreError> {
        self.inner.load_cursor(name).await
    }
    async fn save_cursor(&self, name: &str, value: &str) -> Result<(), StoreError> {
        self.inner.save_cursor(name, value).await
    }
}

/// Counts successful handler runs; fails or panics once when armed.
#[derive(Default)]
struct Handler {
    armed: Mutex<Option<Fault>>,
    succeeded: AtomicU32,
}

#[async_trait]
impl EventHandler for Handler {
    async fn handle(&self, _event: &Event, _ctx: &HandlerContext) -> Result<(), HandlerError> {
        let armed = self.armed.lock().unwrap().take();
        match armed {
            Some(Fault::Panic) => panic!("injected crash in the handler"),
            Some(Fault::Error | Fault::Disconnect) => Err(HandlerError::retryable("injected")),
            None => {
                self.succeeded.fetch_add(1, Ordering::SeqCst);
                Ok(())
            }
        }
    }
}

const LEASE: StdDuration = StdDuration::from_secs(1);

/// Runs every (step, fault) cell against `store`; returns the matrix.
async fn matrix<S: Storage + 'static>(
    backend: &str,
    store: Arc<Faulty<S>>,
    faults: &[Fault],
) -> BTreeMap<(Step, Fault), Cell> {
    quiet_injected_panics("injected crash");
    let mut cells = BTreeMap::new();
    let mut n = 0;
    for &step in &STEPS {
        for &fault in faults {
            if step == Step::InHandler && fault == Fault::Disconnect {
                // The handler holds no database connection of the crate's.
                continue;
            }
            n += 1;
            let handler = Arc::new(Handler::default());
            let processor = WebhookProcessor::builder(Verifier::new(common::secret()))
                .store(store.clone())
                .handler(handler.clone())
                .lease(Duration::milliseconds(
                    i64::try_from(LEASE.as_millis()).unwrap(),
                ))
                .max_attempts(10)
                .build();
            let (event_id, sub_id, body) = event_body("crash", n);
            if step == Step::InHandler {
                *handler.armed.lock().unwrap() = Some(fault);
            } else {
                store.arm(step, fault);
            }
            let cell = format!("{backend} {} {}", step.as_str(), fault.as_str());
            let deliveries = deliver_until_acknowledged(&processor, &body, LEASE, &cell).await;
            // The fault struck (else the cell proves nothing).
            assert!(
                store.armed.lock().unwrap().is_none() && handler.armed.lock().unwrap().is_none(),
                "{backend} {} {}: the fault never struck",
                step.as_str(),
                fault.as_str()
            );
            *store.struck.lock().unwrap() = None;

            // Lost 0, double effects 0.
            let saves = check_cell(store.inner.as_ref(), &event_id, &sub_id, &cell).await;
            // Handler: once, or again only where a completion was lost after
            // it succeeded.
            let runs = handler.succeeded.load(Ordering::SeqCst);
            let may_rerun = step == Step::BeforeCompletion;
            assert!(
                runs == 1 || (may_rerun && runs == 2),
                "{backend} {} {}: handler succeeded {runs} times",
                step.as_str(),
                fault.as_str()
            );
            cells.insert(
                (step, fault),
                Cell {
                    deliveries,
                    handler_runs: runs,
                    saves,
                },
            );
        }
    }
    assert_nothing_stuck(store.inner.as_ref(), LEASE, backend).await;
    print_cells(
        "crash matrix (step / fault)",
        backend,
        cells.iter().map(|((s, f), c)| (s.as_str(), f.as_str(), c)),
    );
    cells
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_store_crash_matrix() {
    let store = Faulty::new(Arc::new(MemoryStore::new()), None);
    let cells = matrix("memory", store, &[Fault::Error, Fault::Panic]).await;
    assert_eq!(cells.len(), STEPS.len() * 2);
}

#[cfg(feature = "sqlite")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_store_crash_matrix() {
    use stripe_webhook_guard::store::SqliteStore;
    let (path, _guard) = sql_support::lite::temp_db();
    let inner = SqliteStore::open(path.to_str().unwrap()).await.unwrap();
    inner.migrate().await.unwrap();
    let store = Faulty::new(Arc::new(inner), None);
    let cells = matrix("sqlite", store, &[Fault::Error, Fault::Panic]).await;
    assert_eq!(cells.len(), STEPS.len() * 2);
}

#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_store_crash_matrix() {
    use sql_support::pg::{database_url, fresh_schema, pool, upstream_addr, via};
    use sql_support::proxy::Proxy;
    use stripe_webhook_guard::store::PgStore;

    struct Cut(Arc<Proxy>);
    #[async_trait]
    impl Disconnect for Cut {
        async fn drop_connections(&self) {
            self.0.cut().await;
            self.0.restore();
        }
    }

    let (schema, _admin, _guard) = fresh_schema().await;
    let url = database_url();
    let proxy = Arc::new(Proxy::start(upstream_addr(&url)).await);
    let own = pool(&via(&url, &proxy.addr()), 4, StdDuration::from_secs(5)).await;
    let inner = PgStore::with_schema(own, &schema).unwrap();
    let store = Faulty::new(Arc::new(inner), Some(Arc::new(Cut(proxy.clone()))));
    let cells = matrix(
        "postgres",
        store,
        &[Fault::Error, Fault::Panic, Fault::Disconnect],
    )
    .await;
    assert_eq!(cells.len(), STEPS.len() * 3 - 1);
}
