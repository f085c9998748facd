//! The store conformance suite, and PostgreSQL-specific checks, against the
//! server at `DATABASE_URL` (default `postgres://postgres@127.0.0.1:5432/test`).
//!
//! Every test works in its own freshly created schema (dropped afterwards),
//! so tests run in parallel. When no connection can be made, the tests fail.
#![cfg(feature = "postgres")]

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration as StdDuration, Instant};

use sqlx::postgres::{PgConnection, PgPool, PgPoolOptions};
use sqlx::{AssertSqlSafe, Connection, Row};
use stripe_webhook_guard::clock::{BoxFuture, Clock, SystemClock};
use stripe_webhook_guard::ledger::{
    ClaimOutcome, ClaimRequest, EventKey, Fingerprint, LedgerState,
};
use stripe_webhook_guard::store::{EventLedger, PgStore, StoreErrorKind, SubscriptionStore};
use time::Duration;

fn database_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

/// The URL without its password, for messages.
fn redacted(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{}{user}:***{}", &url[..scheme + 3], &url[at..])
        }
        _ => url.to_owned(),
    }
}

static COUNTER: AtomicU64 = AtomicU64::new(0);

fn unique_schema() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!(
        "swg_t_{}_{}_{nanos}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

async fn connect(max_connections: u32) -> PgPool {
    let url = database_url();
    let fail = |e: &dyn std::fmt::Display| -> ! {
        panic!(
            "cannot connect to PostgreSQL at {} ({e}): start a server or set DATABASE_URL",
            redacted(&url)
        )
    };
    // One direct connection first: a refused or misconfigured server fails
    // the test at once with the real cause, not after the pool's timeout.
    match tokio::time::timeout(StdDuration::from_secs(10), PgConnection::connect(&url)).await {
        Ok(Ok(conn)) => drop(conn.close().await),
        Ok(Err(e)) => fail(&e),
        Err(e) => fail(&e),
    }
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(StdDuration::from_secs(30))
        .connect(&url)
        .await
        .unwrap_or_else(|e| fail(&e))
}

/// Drops its schema when dropped (on a separate thread and runtime, with a
/// lock timeout so a leftover transaction cannot hang the test).
#[derive(Debug)]
struct SchemaGuard(String);

impl Drop for SchemaGuard {
    fn drop(&mut self) {
        let schema = self.0.clone();
        let url = database_url();
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async {
                if let Ok(mut conn) = PgConnection::connect(&url).await {
                    let _ = sqlx::raw_sql(AssertSqlSafe(format!(
                        "SET lock_timeout = '5s'; DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"
                    )))
                    .execute(&mut conn)
                    .await;
                    let _ = conn.close().await;
                }
            });
        })
        .join();
    }
}

/// The system clock, carrying the schema guard so the schema lives exactly
/// as long as the test's `(store, clock)` pair.
#[derive(Debug)]
struct DbClock {
    _schema: SchemaGuard,
}

impl Clock for DbClock {
    fn now(&self) -> time::OffsetDateTime {
        SystemClock.now()
    }

    fn sleep(&self, duration: Duration) -> BoxFuture<'_, ()> {
        Box::pin(tokio::time::sleep(
            StdDuration::try_from(duration).unwrap_or_default(),
        ))
    }
}

/// A migrated store in a new schema, and its guard.
async fn fresh_store(max_connections: u32) -> (PgStore, SchemaGuard) {
    let schema = unique_schema();
    let guard = SchemaGuard(schema.clone());
    let store =
        PgStore::with_schema(connect(max_connections).await, &schema).expect("valid schema");
    assert_eq!(store.migrate().await.expect("migrate"), 1);
    assert_eq!(store.migrate().await.expect("migrate again"), 0);
    (store, guard)
}

async fn fresh() -> (Arc<PgStore>, Arc<DbClock>) {
    let (store, guard) = fresh_store(8).await;
    (Arc::new(store), Arc::new(DbClock { _schema: guard }))
}

stripe_webhook_guard::store_conformance_tests!(postgres, fresh().await);

fn request(id: &str, lease_ms: i64) -> ClaimRequest {
    ClaimRequest {
        key: EventKey::new(id, None),
        event_type: "invoice.paid".into(),
        event_created: 1_700_000_000,
        fingerprint: Fingerprint([7; 32]),
        lease: Duration::milliseconds(lease_ms),
        max_attempts: 5,
    }
}

async fn claimed(store: &PgStore, req: &ClaimRequest) -> stripe_webhook_guard::ledger::Lease {
    match store.claim(req).await.expect("claim") {
        ClaimOutcome::Claimed(lease) => lease,
        other => panic!("expected a claim, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_is_idempotent_and_recorded() {
    let (store, _guard) = fresh_store(4).await;
    let versions: Vec<i64> = sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT version FROM \"{}\".schema_migrations ORDER BY version",
        store.schema()
    )))
    .fetch_all(store.pool())
    .await
    .unwrap();
    assert_eq!(versions, [1]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_migrations_apply_once() {
    let schema = unique_schema();
    let _guard = SchemaGuard(schema.clone());
    let pool = connect(8).await;
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let store = PgStore::with_schema(pool.clone(), &schema).unwrap();
        tasks.push(tokio::spawn(async move { store.migrate().await }));
    }
    let mut applied = 0;
    for t in tasks {
        applied += t.await.unwrap().expect("migrate");
    }
    assert_eq!(applied, 1);
}

#[tokio::test]
async fn schema_names_are_validated() {
    let pool = PgPoolOptions::new()
        .connect_lazy(&database_url())
        .expect("lazy pool");
    for bad in ["", "Bad", "a;drop table x", "a\"b", "pg_temp", "9x", "a-b"] {
        let err = PgStore::with_schema(pool.clone(), bad).unwrap_err();
        assert_eq!(err.kind(), StoreErrorKind::Other, "{bad}");
    }
    assert_eq!(PgStore::new(pool).schema(), "stripe_webhook_guard");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_exhaustion_is_unavailable_not_a_hang() {
    let schema = unique_schema();
    let _guard = SchemaGuard(schema.clone());
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(StdDuration::from_millis(300))
        .connect(&database_url())
        .await
        .expect("connect");
    let store = PgStore::with_schema(pool.clone(), &schema).unwrap();
    store.migrate().await.unwrap();
    let held = pool.acquire().await.unwrap();
    let started = Instant::now();
    let err = store
        .claim(&request("evt_pool", 1000))
        .await
        .expect_err("no connection available");
    assert_eq!(err.kind(), StoreErrorKind::Unavailable);
    assert!(err.is_retryable());
    assert!(started.elapsed() < StdDuration::from_secs(5));
    drop(held);
    claimed(&store, &request("evt_pool", 1000)).await;
}

#[tokio::test]
async fn unreachable_server_is_unavailable() {
    let pool = PgPoolOptions::new()
        .acquire_timeout(StdDuration::from_secs(2))
        .connect_lazy("postgres://postgres@127.0.0.1:1/none")
        .expect("lazy pool");
    let store = PgStore::new(pool);
    let err = store
        .get(&EventKey::new("evt_x", None))
        .await
        .expect_err("nothing listens on port 1");
    assert_eq!(err.kind(), StoreErrorKind::Unavailable, "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_tables_are_reported() {
    let schema = unique_schema();
    let store = PgStore::with_schema(connect(2).await, &schema).unwrap();
    let err = store
        .get(&EventKey::new("evt_x", None))
        .await
        .expect_err("not migrated");
    assert!(err.to_string().contains("migrate"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn complete_in_commits_and_rolls_back_with_the_application() {
    let (store, _guard) = fresh_store(4).await;
    let table = format!("\"{}\".app_credits", store.schema());
    sqlx::raw_sql(AssertSqlSafe(format!(
        "CREATE TABLE {table} (event_id text PRIMARY KEY)"
    )))
    .execute(store.pool())
    .await
    .unwrap();
    let insert = format!("INSERT INTO {table} (event_id) VALUES ($1)");
    let count = format!("SELECT count(*) FROM {table}");

    // Rolled back: neither the credit nor the completion happened.
    let req = request("evt_same_tx", 5_000);
    let lease = claimed(&store, &req).await;
    let mut tx = store.begin().await.unwrap();
    sqlx::query(AssertSqlSafe(insert.clone()))
        .bind("evt_same_tx")
        .execute(&mut *tx)
        .await
        .unwrap();
    store.complete_in(&mut tx, &lease).await.unwrap();
    tx.rollback().await.unwrap();
    let n: i64 = sqlx::query_scalar(AssertSqlSafe(count.clone()))
        .fetch_one(store.pool())
        .await
        .unwrap();
    assert_eq!(n, 0);
    let e = store.get(&req.key).await.unwrap().unwrap();
    assert_eq!(e.state, LedgerState::Processing);

    // Committed: both happened; the processor's own completion is a no-op.
    let mut tx = store.begin().await.unwrap();
    sqlx::query(AssertSqlSafe(insert.clone()))
        .bind("evt_same_tx")
        .execute(&mut *tx)
        .await
        .unwrap();
    store.complete_in(&mut tx, &lease).await.unwrap();
    tx.commit().await.unwrap();
    let n: i64 = sqlx::query_scalar(AssertSqlSafe(count))
        .fetch_one(store.pool())
        .await
        .unwrap();
    assert_eq!(n, 1);
    store.complete(&lease).await.expect("idempotent completion");
    assert_eq!(
        store.claim(&req).await.unwrap(),
        ClaimOutcome::Duplicate {
            state: LedgerState::Processed
        }
    );

    // A superseded lease cannot complete inside a transaction either.
    let req = request("evt_same_tx_zombie", 200);
    let zombie = claimed(&store, &req).await;
    tokio::time::sleep(StdDuration::from_millis(400)).await;
    let holder = claimed(&store, &req).await;
    let mut tx = store.begin().await.unwrap();
    let err = store.complete_in(&mut tx, &zombie).await.unwrap_err();
    assert_eq!(err.kind(), StoreErrorKind::LeaseLost);
    tx.rollback().await.unwrap();
    store.complete(&holder).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undecodable_rows_are_corrupt() {
    let (store, _guard) = fresh_store(2).await;
    sqlx::query(AssertSqlSafe(format!(
        "INSERT INTO \"{}\".subscriptions (id, version, record) VALUES ('sub_bad', 1, '{{\"id\": 5}}')",
        store.schema()
    )))
    .execute(store.pool())
    .await
    .unwrap();
    let err = store.load("sub_bad").await.unwrap_err();
    assert_eq!(err.kind(), StoreErrorKind::Corrupt);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_run_on_the_database_clock() {
    let (store, _guard) = fresh_store(2).await;
    let lease = claimed(&store, &request("evt_db_clock", 60_000)).await;
    let row = sqlx::query("SELECT clock_timestamp() AS now")
        .fetch_one(store.pool())
        .await
        .unwrap();
    let db_now: time::OffsetDateTime = row.get("now");
    let left = lease.expires_at - db_now;
    assert!(
        left > Duration::seconds(59) && left <= Duration::seconds(60),
        "{left}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_unique_per_claim() {
    let (store, _guard) = fresh_store(4).await;
    let mut tokens = HashSet::new();
    for i in 0..20 {
        let req = request(&format!("evt_tok_{i}"), 1);
        let first = claimed(&store, &req).await;
        tokio::time::sleep(StdDuration::from_millis(3)).await;
        let second = claimed(&store, &req).await;
        assert!(tokens.insert(first.token));
        assert!(tokens.insert(second.token));
    }
}

/// Makes the next `remaining` ledger inserts fail with SQLSTATE `code`
/// (through a trigger) and counts the attempts in a sequence.
async fn inject_insert_failures(store: &PgStore, remaining: i32, code: &str) {
    let s = store.schema();
    sqlx::raw_sql(AssertSqlSafe(format!(
        r#"
        CREATE SEQUENCE IF NOT EXISTS "{s}".test_calls;
        SELECT setval('"{s}".test_calls', 1, false);
        CREATE TABLE IF NOT EXISTS "{s}".test_fail (remaining int NOT NULL, code text NOT NULL);
        DELETE FROM "{s}".test_fail;
        INSERT INTO "{s}".test_fail VALUES ({remaining}, '{code}');
        CREATE OR REPLACE FUNCTION "{s}".test_trigger() RETURNS trigger LANGUAGE plpgsql AS $f$
        BEGIN
          IF nextval('"{s}".test_calls') <= (SELECT remaining FROM "{s}".test_fail) THEN
            RAISE EXCEPTION 'injected failure' USING ERRCODE = (SELECT code FROM "{s}".test_fail);
          END IF;
          RETURN NEW;
        END $f$;
        CREATE OR REPLACE TRIGGER test_trigger BEFORE INSERT ON "{s}".ledger
          FOR EACH ROW EXECUTE FUNCTION "{s}".test_trigger();
        "#
    )))
    .execute(store.pool())
    .await
    .unwrap();
}

async fn insert_attempts(store: &PgStore) -> i64 {
    let row = sqlx::query(AssertSqlSafe(format!(
        "SELECT last_value, is_called FROM \"{}\".test_calls",
        store.schema()
    )))
    .fetch_one(store.pool())
    .await
    .unwrap();
    if row.get::<bool, _>("is_called") {
        row.get("last_value")
    } else {
        0
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serialization_failures_and_deadlocks_are_retried_then_unavailable() {
    let (store, _guard) = fresh_store(2).await;

    // Two serialization failures: retried, then the claim succeeds.
    inject_insert_failures(&store, 2, "40001").await;
    claimed(&store, &request("evt_retry_ok", 1000)).await;
    assert_eq!(insert_attempts(&store).await, 3);

    // Deadlocks every time: five retries, then Unavailable.
    inject_insert_failures(&store, 1000, "40P01").await;
    let err = store
        .claim(&request("evt_retry_deadlock", 1000))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), StoreErrorKind::Unavailable);
    assert!(err.to_string().contains("40P01"), "{err}");
    assert!(!err.to_string().contains("injected"), "{err}");
    assert_eq!(insert_attempts(&store).await, 6);

    // A statement timeout is not retried.
    inject_insert_failures(&store, 1000, "57014").await;
    let err = store
        .claim(&request("evt_retry_timeout", 1000))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), StoreErrorKind::Timeout);
    assert_eq!(insert_attempts(&store).await, 1);
}
