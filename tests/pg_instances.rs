//! Several service instances over one PostgreSQL schema, and database
//! faults, each test in its own schema of the server at `DATABASE_URL`
//! (default `postgres://postgres@127.0.0.1:5432/test`):
//!
//! - duplicate storms over four processors, each with its own pool;
//! - an instance that loses its database between claim and completion, and
//!   another instance that takes the event over once the lease runs out;
//! - a TCP proxy between a processor and the server, cut between deliveries
//!   and in the middle of a handler's transaction;
//! - an exhausted pool, which answers 503 within its acquire timeout.
//!
//! Run with `--nocapture` to see the figures.
#![cfg(all(feature = "postgres", feature = "test-util"))]

mod common;
mod sql_support;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration as StdDuration, Instant};

use async_trait::async_trait;
use common::{CountingHandler, sign, sub_event};
use sql_support::now_unix;
use sql_support::pg::{
    database_url, fresh_schema, ledger_state, ledger_states, pool, upstream_addr, via,
};
use sql_support::proxy::Proxy;
use sqlx::AssertSqlSafe;
use sqlx::postgres::PgPool;
use stripe_webhook_guard::event::Event;
use stripe_webhook_guard::ledger::LedgerState;
use stripe_webhook_guard::processor::{
    Error, EventHandler, HandlerContext, HandlerError, Outcome, WebhookProcessor,
};
use stripe_webhook_guard::signature::Verifier;
use stripe_webhook_guard::store::{PgStore, StoreErrorKind};
use time::{Duration, OffsetDateTime};
use tokio::sync::Notify;

/// `created` of the test events (only ordering matters).
const T0: i64 = 1_767_225_600;

fn processor(store: PgStore, handler: Arc<dyn EventHandler>, lease: Duration) -> WebhookProcessor {
    WebhookProcessor::builder(Verifier::new(common::secret()))
        .store(Arc::new(store))
        .handler(handler)
        .lease(lease)
        .max_attempts(5)
        .build()
}

fn event_body(id: &str, n: i64, sub: &str) -> String {
    sub_event(id, "customer.subscription.updated", T0 + n, sub, "active")
}

/// One delivery, signed now (the processors run on the system clock).
async fn deliver(p: &WebhookProcessor, body: &str) -> Result<Outcome, Error> {
    let header = sign(body, now_unix());
    p.handle(body.as_bytes(), Some(&header)).await
}

/// Sleeps until `until` (a lease expiry, on the database's clock: the same
/// host's clock here) has passed by a margin.
async fn wait_past(until: OffsetDateTime) {
    let left = until - OffsetDateTime::now_utc() + Duration::milliseconds(150);
    if left.is_positive() {
        tokio::time::sleep(StdDuration::try_from(left).unwrap_or_default()).await;
    }
}

fn ms(d: StdDuration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn assert_unavailable(err: &Error) {
    assert_eq!(err.http_status(), 503, "{err:?}");
    assert!(err.is_retryable(), "{err:?}");
    match err {
        Error::Store { source, .. } => {
            assert_eq!(source.kind(), StoreErrorKind::Unavailable, "{err}");
        }
        other => panic!("expected a store error, got {other:?}"),
    }
}

fn expect_processed(r: Result<Outcome, Error>, want_attempt: u32) {
    match r {
        Ok(Outcome::Processed {
            attempt, handled, ..
        }) => {
            assert_eq!(attempt, want_attempt);
            assert!(handled);
        }
        other => panic!("expected processed on attempt {want_attempt}, got {other:?}"),
    }
}

fn expect_duplicate(r: Result<Outcome, Error>) {
    match r {
        Ok(
            o @ Outcome::Duplicate {
                state: LedgerState::Processed,
                ..
            },
        ) => assert_eq!(o.http_status(), 200),
        other => panic!("expected a duplicate, got {other:?}"),
    }
}

/// The in-flight answer's lease end.
fn expect_in_flight(r: Result<Outcome, Error>) -> OffsetDateTime {
    match r {
        Err(e @ Error::InFlight { until, .. }) => {
            assert_eq!(e.http_status(), 503);
            assert!(e.is_retryable());
            until
        }
        other => panic!("expected in flight, got {other:?}"),
    }
}

/// Four instances, each with its own pool over the same schema; 200 events,
/// each delivered 50 times at once, round-robin over the instances.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn duplicate_storms_over_four_instances() {
    const INSTANCES: usize = 4;
    const EVENTS: usize = 200;
    const COPIES: usize = 50;
    const POOL: u32 = 6;
    let (schema, admin, _guard) = fresh_schema().await;
    let handler = CountingHandler::new();
    let mut processors = Vec::new();
    for _ in 0..INSTANCES {
        let own = pool(&database_url(), POOL, StdDuration::from_secs(30)).await;
        let store = PgStore::with_schema(own, &schema).unwrap();
        processors.push(processor(store, handler.clone(), Duration::seconds(60)));
    }
    let processors = Arc::new(processors);

    let started = Instant::now();
    let (mut processed, mut duplicate, mut in_flight) = (0usize, 0usize, 0usize);
    let mut in_flight_per_storm = Vec::with_capacity(EVENTS);
    let mut storm_ms = Vec::with_capacity(EVENTS);
    let mut bodies = Vec::with_capacity(EVENTS);
    for i in 0..EVENTS {
        let id = format!("evt_storm_{i:03}");
        let created = i64::try_from(i).unwrap();
        let body = Arc::new(event_body(&id, created, &format!("sub_storm_{}", i % 20)));
        let barrier = Arc::new(tokio::sync::Barrier::new(COPIES));
        let storm = Instant::now();
        let mut tasks = Vec::with_capacity(COPIES);
        for copy in 0..COPIES {
            let processors = processors.clone();
            let body = body.clone();
            let barrier = barrier.clone();
            tasks.push(tokio::spawn(async move {
                barrier.wait().await;
                deliver(&processors[copy % INSTANCES], &body).await
            }));
        }
        let (mut won, mut dup, mut busy) = (0, 0, 0);
        for t in tasks {
            match t.await.unwrap() {
                Ok(Outcome::Processed { attempt: 1, .. }) => won += 1,
                Ok(
                    o @ Outcome::Duplicate {
                        state: LedgerState::Processed,
                        ..
                    },
                ) => {
                    assert_eq!(o.http_status(), 200);
                    dup += 1;
                }
                Err(e @ Error::InFlight { .. }) => {
                    assert_eq!(e.http_status(), 503);
                    busy += 1;
                }
                other => panic!("{id}: unexpected answer {other:?}"),
            }
        }
        storm_ms.push(ms(storm.elapsed()));
        assert_eq!(won, 1, "{id}: exactly one delivery processes it");
        assert_eq!(dup + busy, COPIES - 1);
        assert_eq!(handler.effects_of(&id), 1, "{id}: one effect");
        processed += won;
        duplicate += dup;
        in_flight += busy;
        in_flight_per_storm.push(busy);
        bodies.push(body);
    }
    let storms = started.elapsed();

    // Stripe retries every 503: each instance now answers duplicate.
    let mut tasks = Vec::new();
    for k in 0..INSTANCES {
        let processors = processors.clone();
        let bodies = bodies.clone();
        tasks.push(tokio::spawn(async move {
            for body in &bodies {
                expect_duplicate(deliver(&processors[k], body).await);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }

    assert_eq!(processed, EVENTS);
    assert_eq!(duplicate + in_flight, EVENTS * (COPIES - 1));
    assert_eq!(handler.total_effects(), u32::try_from(EVENTS).unwrap());
    assert_eq!(
        handler.calls.load(Ordering::SeqCst),
        u32::try_from(EVENTS).unwrap(),
        "the handler ran once per event"
    );
    let effects: u64 = processors.iter().map(|p| p.stats().handler_effects).sum();
    assert_eq!(effects, u64::try_from(EVENTS).unwrap());
    assert_eq!(
        ledger_states(&admin, &schema).await,
        [("processed".to_owned(), i64::try_from(EVENTS).unwrap())]
    );

    in_flight_per_storm.sort_unstable();
    storm_ms.sort_by(f64::total_cmp);
    let per_instance: Vec<u64> = processors
        .iter()
        .map(|p| p.stats().handler_effects)
        .collect();
    println!(
        "storms: {EVENTS} events x {COPIES} concurrent deliveries over {INSTANCES} instances \
         (own pools of {POOL}): processed {processed}, duplicate (200) {duplicate}, \
         in flight (503) {in_flight}; in flight per storm min {} / median {} / max {}; \
         effects per instance {per_instance:?}; storm time median {:.1} ms / max {:.1} ms; \
         total {:.2} s",
        in_flight_per_storm[0],
        in_flight_per_storm[EVENTS / 2],
        in_flight_per_storm[EVENTS - 1],
        storm_ms[EVENTS / 2],
        storm_ms[EVENTS - 1],
        storms.as_secs_f64()
    );
}

/// Closes its instance's pool (the instance lost its database) the first
/// time it runs, then returns `Ok`: the processor's own completion fails.
struct LosesItsDatabase {
    pool: Option<PgPool>,
    calls: Arc<AtomicU32>,
}

#[async_trait]
impl EventHandler for LosesItsDatabase {
    async fn handle(&self, _event: &Event, _ctx: &HandlerContext) -> Result<(), HandlerError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if let Some(pool) = &self.pool {
            pool.close().await;
        }
        Ok(())
    }
}

/// Instance A loses its database after the claim, while its handler runs:
/// its completion fails (503, not processed). Instance B is refused while
/// A's lease lives, then processes the event once the lease has run out.
///
/// What is asserted about effects: the handler *body* runs twice (at least
/// once is all a handler can be promised when a completion is lost), but
/// only one run is completed (`handler_effects`: A 0, B 1) and the ledger
/// records one processing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instance_losing_its_database_before_completion_is_taken_over_after_the_lease() {
    let (schema, admin, _guard) = fresh_schema().await;
    let lease = Duration::seconds(2);
    let calls = Arc::new(AtomicU32::new(0));
    let pool_a = pool(&database_url(), 3, StdDuration::from_secs(5)).await;
    let pool_b = pool(&database_url(), 3, StdDuration::from_secs(5)).await;
    let a = processor(
        PgStore::with_schema(pool_a.clone(), &schema).unwrap(),
        Arc::new(LosesItsDatabase {
            pool: Some(pool_a.clone()),
            calls: calls.clone(),
        }),
        lease,
    );
    let b = processor(
        PgStore::with_schema(pool_b, &schema).unwrap(),
        Arc::new(LosesItsDatabase {
            pool: None,
            calls: calls.clone(),
        }),
        lease,
    );
    let body = event_body("evt_lost_db", 0, "sub_lost_db");

    let t = Instant::now();
    let err = deliver(&a, &body).await.expect_err("A cannot complete");
    let a_ms = ms(t.elapsed());
    assert_unavailable(&err);
    assert!(pool_a.is_closed());
    assert_eq!(
        ledger_state(&admin, &schema, "evt_lost_db").await,
        Some(("processing".to_owned(), 1)),
        "not marked processed"
    );

    // B while A's lease lives: in flight, so Stripe retries later.
    let until = expect_in_flight(deliver(&b, &body).await);
    let left = until - OffsetDateTime::now_utc();
    wait_past(until).await;
    let t = Instant::now();
    expect_processed(deliver(&b, &body).await, 2);
    let b_ms = ms(t.elapsed());
    expect_duplicate(deliver(&b, &body).await);

    assert_eq!(
        ledger_state(&admin, &schema, "evt_lost_db").await,
        Some(("processed".to_owned(), 2))
    );
    assert_eq!(
        calls.load(Ordering::SeqCst),
        2,
        "the handler body ran twice"
    );
    assert_eq!(a.stats().handler_effects, 0, "A completed nothing");
    assert_eq!(b.stats().handler_effects, 1, "B completed it once");
    println!(
        "lost database: A answered {} ({err}) in {a_ms:.1} ms; B refused as in flight with \
         {:.2} s of A's lease left; B processed attempt 2 in {b_ms:.1} ms; handler runs 2, \
         completed effects A 0 / B 1",
        err.http_status(),
        left.as_seconds_f64()
    );
}

/// Pauses a handler at a chosen point, once, so a test can inject a fault.
#[derive(Default)]
struct Gate {
    armed: Mutex<Option<String>>,
    pid: Mutex<Option<i32>>,
    reached: Notify,
    resume: Notify,
}

impl Gate {
    fn arm(&self, event_id: &str) {
        *self.armed.lock().unwrap() = Some(event_id.to_owned());
    }

    /// Waits at the gate if it is armed for `event_id`.
    async fn pass(&self, event_id: &str, pid: i32) {
        let hit = {
            let mut armed = self.armed.lock().unwrap();
            if armed.as_deref() == Some(event_id) {
                *armed = None;
                true
            } else {
                false
            }
        };
        if hit {
            *self.pid.lock().unwrap() = Some(pid);
            self.reached.notify_one();
            self.resume.notified().await;
        }
    }

    /// The backend pid of the paused handler's transaction.
    fn pid(&self) -> i32 {
        self.pid
            .lock()
            .unwrap()
            .expect("a handler reached the gate")
    }
}

/// A well-behaved handler: its effect (a row in `app_credits`) and the
/// event's completion commit in one transaction on the instance's own
/// pool ([`PgStore::complete_in`]), so an effect exists only if the event is
/// processed. It can be paused before the commit (the gate).
struct TransactionalCredit {
    store: PgStore,
    instance: &'static str,
    calls: Arc<AtomicU32>,
    gate: Arc<Gate>,
}

fn credits_table(schema: &str) -> String {
    format!("\"{schema}\".app_credits")
}

async fn create_credits(admin: &PgPool, schema: &str) {
    sqlx::raw_sql(AssertSqlSafe(format!(
        "CREATE TABLE {} (event_id text NOT NULL, attempt bigint NOT NULL, instance text NOT NULL)",
        credits_table(schema)
    )))
    .execute(admin)
    .await
    .unwrap();
}

/// `(attempt, instance)` of every credit of `event_id`, read directly.
async fn credits(admin: &PgPool, schema: &str, event_id: &str) -> Vec<(i64, String)> {
    sqlx::query_as(AssertSqlSafe(format!(
        "SELECT attempt, instance FROM {} WHERE event_id = $1 ORDER BY attempt",
        credits_table(schema)
    )))
    .bind(event_id)
    .fetch_all(admin)
    .await
    .unwrap()
}

fn retryable(e: impl std::fmt::Display) -> HandlerError {
    HandlerError::retryable(e.to_string())
}

#[async_trait]
impl EventHandler for TransactionalCredit {
    async fn handle(&self, event: &Event, ctx: &HandlerContext) -> Result<(), HandlerError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let mut tx = self.store.begin().await.map_err(retryable)?;
        let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
            .fetch_one(&mut *tx)
            .await
            .map_err(retryable)?;
        sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO {} (event_id, attempt, instance) VALUES ($1, $2, $3)",
            credits_table(self.store.schema())
        )))
        .bind(event.id())
        .bind(i64::from(ctx.attempt))
        .bind(self.instance)
        .execute(&mut *tx)
        .await
        .map_err(retryable)?;
        self.store
            .complete_in(&mut tx, &ctx.lease)
            .await
            .map_err(retryable)?;
        self.gate.pass(event.id(), pid).await;
        tx.commit().await.map_err(retryable)?;
        Ok(())
    }
}

/// Instance A's connection is killed (`pg_terminate_backend`) inside the
/// handler's transaction, after its effect and `complete_in` were written
/// and before the commit, and A's pool is closed: A answers 503, the
/// effect and the completion are rolled back together. B processes the
/// event after A's lease: exactly one credit row, from B's attempt 2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_connection_rolls_back_a_transactional_effect() {
    let (schema, admin, _guard) = fresh_schema().await;
    create_credits(&admin, &schema).await;
    let lease = Duration::seconds(2);
    let calls = Arc::new(AtomicU32::new(0));
    let gate = Arc::new(Gate::default());
    let pool_a = pool(&database_url(), 3, StdDuration::from_secs(5)).await;
    let pool_b = pool(&database_url(), 3, StdDuration::from_secs(5)).await;
    let store_a = PgStore::with_schema(pool_a.clone(), &schema).unwrap();
    let store_b = PgStore::with_schema(pool_b, &schema).unwrap();
    let instance = |store: &PgStore, name| {
        processor(
            store.clone(),
            Arc::new(TransactionalCredit {
                store: store.clone(),
                instance: name,
                calls: calls.clone(),
                gate: gate.clone(),
            }),
            lease,
        )
    };
    let a = instance(&store_a, "A");
    let b = instance(&store_b, "B");
    let body = event_body("evt_killed", 0, "sub_killed");

    gate.arm("evt_killed");
    let t = Instant::now();
    let pending = {
        let a = a.clone();
        let body = body.clone();
        tokio::spawn(async move { deliver(&a, &body).await })
    };
    gate.reached.notified().await;
    let killed: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1)")
        .bind(gate.pid())
        .fetch_one(&admin)
        .await
        .unwrap();
    assert!(killed);
    // Closing marks the pool closed at once; the future completes when the
    // handler's connection comes back.
    let closing = pool_a.close();
    assert!(pool_a.is_closed());
    gate.resume.notify_one();
    let err = pending.await.unwrap().expect_err("A's commit fails");
    let a_ms = ms(t.elapsed());
    closing.await;
    assert_unavailable(&err);
    assert_eq!(
        ledger_state(&admin, &schema, "evt_killed").await,
        Some(("processing".to_owned(), 1)),
        "complete_in was rolled back with the connection"
    );
    assert!(credits(&admin, &schema, "evt_killed").await.is_empty());

    let until = expect_in_flight(deliver(&b, &body).await);
    wait_past(until).await;
    expect_processed(deliver(&b, &body).await, 2);
    expect_duplicate(deliver(&b, &body).await);
    assert_eq!(
        credits(&admin, &schema, "evt_killed").await,
        [(2, "B".to_owned())],
        "one effect, from B's attempt"
    );
    assert_eq!(
        ledger_state(&admin, &schema, "evt_killed").await,
        Some(("processed".to_owned(), 2))
    );
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    println!(
        "killed connection: A answered {} ({err}) {a_ms:.1} ms after delivery; credits after A: 0; \
         after B (attempt 2): 1; handler runs 2",
        err.http_status()
    );
}

/// A processor whose pool reaches the server through a TCP proxy. The
/// proxy is cut between deliveries, and while a handler's transaction is
/// open (effect and `complete_in` written, commit not yet sent). Each time:
/// a retryable 503, nothing marked processed that was not (read through a
/// pool that bypasses the proxy), and once the proxy is back a redelivery
/// processes the event, with one effect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_cut_by_a_proxy_then_redelivered_once() {
    let (schema, admin, _guard) = fresh_schema().await;
    create_credits(&admin, &schema).await;
    let url = database_url();
    let proxy = Proxy::start(upstream_addr(&url)).await;
    let proxied = pool(&via(&url, &proxy.addr()), 4, StdDuration::from_secs(2)).await;
    let store = PgStore::with_schema(proxied, &schema).unwrap();
    let calls = Arc::new(AtomicU32::new(0));
    let gate = Arc::new(Gate::default());
    let p = processor(
        store.clone(),
        Arc::new(TransactionalCredit {
            store: store.clone(),
            instance: "P",
            calls: calls.clone(),
            gate: gate.clone(),
        }),
        Duration::seconds(2),
    );

    // Through the proxy, everything works.
    let c0 = event_body("evt_cut_0", 0, "sub_cut");
    expect_processed(deliver(&p, &c0).await, 1);

    // Cut between deliveries: the next delivery cannot even be claimed.
    proxy.cut().await;
    let c1 = event_body("evt_cut_1", 1, "sub_cut");
    let t = Instant::now();
    let err1 = deliver(&p, &c1).await.expect_err("the database is cut off");
    let cut1_ms = ms(t.elapsed());
    assert_unavailable(&err1);
    assert_eq!(ledger_state(&admin, &schema, "evt_cut_1").await, None);
    assert!(credits(&admin, &schema, "evt_cut_1").await.is_empty());
    proxy.restore();
    let t = Instant::now();
    expect_processed(deliver(&p, &c1).await, 1);
    let back1_ms = ms(t.elapsed());
    assert_eq!(
        credits(&admin, &schema, "evt_cut_1").await,
        [(1, "P".to_owned())]
    );

    // Cut while the handler's transaction is open, before its commit.
    let c2 = event_body("evt_cut_2", 2, "sub_cut");
    gate.arm("evt_cut_2");
    let pending = {
        let p = p.clone();
        let c2 = c2.clone();
        tokio::spawn(async move { deliver(&p, &c2).await })
    };
    gate.reached.notified().await;
    proxy.cut().await;
    let t = Instant::now();
    gate.resume.notify_one();
    let err2 = pending
        .await
        .unwrap()
        .expect_err("the commit cannot reach the server");
    let cut2_ms = ms(t.elapsed());
    assert_unavailable(&err2);
    assert_eq!(
        ledger_state(&admin, &schema, "evt_cut_2").await,
        Some(("processing".to_owned(), 1)),
        "complete_in was written but never committed"
    );
    assert!(credits(&admin, &schema, "evt_cut_2").await.is_empty());
    proxy.restore();
    // Back, but the cut worker's lease still lives: in flight, then processed.
    let until = expect_in_flight(deliver(&p, &c2).await);
    wait_past(until).await;
    expect_processed(deliver(&p, &c2).await, 2);
    expect_duplicate(deliver(&p, &c2).await);
    assert_eq!(
        credits(&admin, &schema, "evt_cut_2").await,
        [(2, "P".to_owned())]
    );

    assert_eq!(
        ledger_states(&admin, &schema).await,
        [("processed".to_owned(), 3)]
    );
    assert_eq!(calls.load(Ordering::SeqCst), 4, "c0, c1, c2 twice");
    assert_eq!(p.stats().handler_effects, 3);
    println!(
        "proxy cut: between deliveries -> {} ({err1}) in {cut1_ms:.1} ms, processed {back1_ms:.1} ms \
         after restore; mid-transaction -> {} ({err2}) in {cut2_ms:.1} ms, rolled back, processed on \
         attempt 2 after the lease; connections forwarded {}, refused while cut {}",
        err1.http_status(),
        err2.http_status(),
        proxy.forwarded(),
        proxy.refused()
    );
}

/// A pool of one connection, held by the test: deliveries answer a
/// retryable 503 after about the acquire timeout instead of hanging, and
/// record nothing; once the connection is free, the event is processed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exhausted_pool_answers_503_within_the_acquire_timeout() {
    let (schema, admin, _guard) = fresh_schema().await;
    let acquire = StdDuration::from_secs(1);
    let one = pool(&database_url(), 1, acquire).await;
    let handler = CountingHandler::new();
    let p = processor(
        PgStore::with_schema(one.clone(), &schema).unwrap(),
        handler.clone(),
        Duration::seconds(60),
    );
    let body = event_body("evt_exhausted", 0, "sub_exhausted");
    let held = one.acquire().await.unwrap();

    let t = Instant::now();
    let err = deliver(&p, &body).await.expect_err("no connection");
    let one_ms = ms(t.elapsed());
    assert_unavailable(&err);
    assert!(t.elapsed() >= acquire.mul_f64(0.9), "{one_ms:.1} ms");
    assert!(t.elapsed() < acquire * 3, "{one_ms:.1} ms");

    // Eight at once wait side by side, not one after another.
    let t = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let p = p.clone();
        let body = body.clone();
        tasks.push(tokio::spawn(async move { deliver(&p, &body).await }));
    }
    for task in tasks {
        assert_unavailable(&task.await.unwrap().expect_err("no connection"));
    }
    let eight_ms = ms(t.elapsed());
    assert!(t.elapsed() < acquire * 3, "{eight_ms:.1} ms");
    assert_eq!(ledger_state(&admin, &schema, "evt_exhausted").await, None);
    assert_eq!(handler.calls.load(Ordering::SeqCst), 0);

    drop(held);
    expect_processed(deliver(&p, &body).await, 1);
    assert_eq!(handler.effects_of("evt_exhausted"), 1);
    println!(
        "exhausted pool (1 connection held, acquire timeout {} ms): one delivery answered {} \
         ({err}) in {one_ms:.1} ms, eight concurrent in {eight_ms:.1} ms; processed once freed",
        acquire.as_millis(),
        err.http_status()
    );
}
