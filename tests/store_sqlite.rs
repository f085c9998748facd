//! The store conformance suite, and SQLite-specific checks, each test on its
//! own temporary database file (removed afterwards).
#![cfg(feature = "sqlite")]

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration as StdDuration, Instant};

use sqlx::Row;
use sqlx::sqlite::SqlitePoolOptions;
use stripe_webhook_guard::clock::{BoxFuture, Clock, SystemClock};
use stripe_webhook_guard::ledger::{
    ClaimOutcome, ClaimRequest, EventKey, Fingerprint, Lease, LedgerState,
};
use stripe_webhook_guard::store::{EventLedger, SqliteStore, StoreErrorKind, SubscriptionStore};
use time::Duration;

static COUNTER: AtomicU64 = AtomicU64::new(0);

fn unique_path() -> PathBuf {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    std::env::temp_dir().join(format!(
        "swg_test_{}_{}_{nanos}.db",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ))
}

/// Removes the database file (and its WAL and shared-memory files) when
/// dropped.
#[derive(Debug)]
struct FileGuard(PathBuf);

impl Drop for FileGuard {
    fn drop(&mut self) {
        for suffix in ["", "-wal", "-shm", "-journal"] {
            let mut p = self.0.clone().into_os_string();
            p.push(suffix);
            let _ = std::fs::remove_file(p);
        }
    }
}

/// The system clock, carrying the file guard so the database lives exactly
/// as long as the test's `(store, clock)` pair.
#[derive(Debug)]
struct FileClock {
    _file: FileGuard,
}

impl Clock for FileClock {
    fn now(&self) -> time::OffsetDateTime {
        SystemClock.now()
    }

    fn sleep(&self, duration: Duration) -> BoxFuture<'_, ()> {
        Box::pin(tokio::time::sleep(
            StdDuration::try_from(duration).unwrap_or_default(),
        ))
    }
}

async fn fresh_store(max_connections: u32) -> (SqliteStore, FileGuard) {
    let path = unique_path();
    let guard = FileGuard(path.clone());
    let pool = SqlitePoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(StdDuration::from_secs(30))
        .connect_with(SqliteStore::connect_options(&path))
        .await
        .unwrap_or_else(|e| panic!("cannot open {}: {e}", path.display()));
    let store = SqliteStore::new(pool);
    assert_eq!(store.migrate().await.expect("migrate"), 1);
    assert_eq!(store.migrate().await.expect("migrate again"), 0);
    (store, guard)
}

async fn fresh() -> (Arc<SqliteStore>, Arc<FileClock>) {
    let (store, guard) = fresh_store(8).await;
    (Arc::new(store), Arc::new(FileClock { _file: guard }))
}

stripe_webhook_guard::store_conformance_tests!(sqlite, fresh().await);

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

async fn claimed(store: &SqliteStore, req: &ClaimRequest) -> Lease {
    match store.claim(req).await.expect("claim") {
        ClaimOutcome::Claimed(lease) => lease,
        other => panic!("expected a claim, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrations_are_recorded() {
    let (store, _guard) = fresh_store(2).await;
    let versions: Vec<i64> = sqlx::query_scalar("SELECT version FROM swg_migrations")
        .fetch_all(store.pool())
        .await
        .unwrap();
    assert_eq!(versions, [1]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefixes_keep_stores_apart() {
    let (store, _guard) = fresh_store(2).await;
    let other = SqliteStore::with_prefix(store.pool().clone(), "other_").unwrap();
    assert_eq!(other.migrate().await.unwrap(), 1);
    claimed(&store, &request("evt_prefix", 1000)).await;
    assert!(
        other
            .get(&EventKey::new("evt_prefix", None))
            .await
            .unwrap()
            .is_none()
    );
    for bad in ["Bad", "a;drop table x", "a\"b", "sqlite_x", "9x", "a-b"] {
        let err = SqliteStore::with_prefix(store.pool().clone(), bad).unwrap_err();
        assert_eq!(err.kind(), StoreErrorKind::Other, "{bad}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_migrations_apply_once() {
    let path = unique_path();
    let _guard = FileGuard(path.clone());
    let pool = SqlitePoolOptions::new()
        .max_connections(4)
        .connect_with(SqliteStore::connect_options(&path))
        .await
        .unwrap();
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let store = SqliteStore::new(pool.clone());
        tasks.push(tokio::spawn(async move { store.migrate().await }));
    }
    let mut applied = 0;
    for t in tasks {
        applied += t.await.unwrap().expect("migrate");
    }
    assert_eq!(applied, 1);
}

/// Acknowledged events must survive a power loss: WAL with
/// `synchronous = FULL` (2) by default, `NORMAL` (1) only when asked for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commits_are_durable_by_default_and_normal_is_an_opt_in() {
    use stripe_webhook_guard::store::sqlite::Durability;
    let path = unique_path();
    let _guard = FileGuard(path.clone());
    let synchronous = |store: SqliteStore| async move {
        sqlx::query_scalar::<_, i64>("PRAGMA synchronous")
            .fetch_one(store.pool())
            .await
            .unwrap()
    };
    assert_eq!(
        synchronous(SqliteStore::open(&path).await.unwrap()).await,
        2
    );
    let store = SqliteStore::open_with(&path, Durability::Normal)
        .await
        .unwrap();
    assert_eq!(synchronous(store).await, 1);
    let store = SqliteStore::open_with(&path, Durability::Full)
        .await
        .unwrap();
    assert_eq!(synchronous(store).await, 2);
    let (store, _file) = fresh_store(2).await;
    assert_eq!(synchronous(store).await, 2, "connect_options is FULL");
    let pool = SqlitePoolOptions::new()
        .max_connections(1)
        .connect_with(SqliteStore::connect_options_with(&path, Durability::Normal))
        .await
        .unwrap();
    assert_eq!(synchronous(SqliteStore::new(pool)).await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_uses_the_recommended_options() {
    let path = unique_path();
    let _guard = FileGuard(path.clone());
    let store = SqliteStore::open(&path).await.unwrap();
    store.migrate().await.unwrap();
    let mode: String = sqlx::query_scalar("PRAGMA journal_mode")
        .fetch_one(store.pool())
        .await
        .unwrap();
    assert_eq!(mode, "wal");
    let err = SqliteStore::open(std::env::temp_dir().join("no_such_dir_swg/x/y.db"))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), StoreErrorKind::Unavailable, "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_exhaustion_is_unavailable_not_a_hang() {
    let path = unique_path();
    let _guard = FileGuard(path.clone());
    let pool = SqlitePoolOptions::new()
        .max_connections(1)
        .acquire_timeout(StdDuration::from_millis(300))
        .connect_with(SqliteStore::connect_options(&path))
        .await
        .unwrap();
    let store = SqliteStore::new(pool.clone());
    store.migrate().await.unwrap();
    let held = pool.acquire().await.unwrap();
    let started = Instant::now();
    let err = store
        .claim(&request("evt_pool", 1000))
        .await
        .expect_err("no connection available");
    assert_eq!(err.kind(), StoreErrorKind::Unavailable);
    assert!(started.elapsed() < StdDuration::from_secs(5));
    drop(held);
    claimed(&store, &request("evt_pool", 1000)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_write_lock_is_unavailable_after_the_busy_timeout() {
    let path = unique_path();
    let _guard = FileGuard(path.clone());
    let pool = SqlitePoolOptions::new()
        .max_connections(2)
        .connect_with(
            SqliteStore::connect_options(&path).busy_timeout(StdDuration::from_millis(200)),
        )
        .await
        .unwrap();
    let store = SqliteStore::new(pool);
    store.migrate().await.unwrap();
    let tx = store.begin().await.unwrap();
    let started = Instant::now();
    let err = store
        .claim(&request("evt_busy", 1000))
        .await
        .expect_err("the write lock is held");
    assert_eq!(err.kind(), StoreErrorKind::Unavailable, "{err}");
    assert!(started.elapsed() < StdDuration::from_secs(5));
    drop(tx);
    claimed(&store, &request("evt_busy", 1000)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_tables_are_reported() {
    let path = unique_path();
    let _guard = FileGuard(path.clone());
    let store = SqliteStore::open(&path).await.unwrap();
    let err = store
        .get(&EventKey::new("evt_x", None))
        .await
        .expect_err("not migrated");
    assert!(err.to_string().contains("migrate"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn complete_in_commits_and_rolls_back_with_the_application() {
    let (store, _guard) = fresh_store(4).await;
    sqlx::raw_sql("CREATE TABLE app_credits (event_id TEXT PRIMARY KEY)")
        .execute(store.pool())
        .await
        .unwrap();
    let insert = "INSERT INTO app_credits (event_id) VALUES ($1)";
    let count = "SELECT count(*) FROM app_credits";

    let req = request("evt_same_tx", 5_000);
    let lease = claimed(&store, &req).await;
    let mut tx = store.begin().await.unwrap();
    sqlx::query(insert)
        .bind("evt_same_tx")
        .execute(&mut *tx)
        .await
        .unwrap();
    store.complete_in(&mut tx, &lease).await.unwrap();
    tx.rollback().await.unwrap();
    let n: i64 = sqlx::query_scalar(count)
        .fetch_one(store.pool())
        .await
        .unwrap();
    assert_eq!(n, 0);
    let e = store.get(&req.key).await.unwrap().unwrap();
    assert_eq!(e.state, LedgerState::Processing);

    let mut tx = store.begin().await.unwrap();
    sqlx::query(insert)
        .bind("evt_same_tx")
        .execute(&mut *tx)
        .await
        .unwrap();
    store.complete_in(&mut tx, &lease).await.unwrap();
    tx.commit().await.unwrap();
    let n: i64 = sqlx::query_scalar(count)
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
    sqlx::query(
        "INSERT INTO swg_subscriptions (id, version, record, updated_at) \
         VALUES ('sub_bad', 1, '{\"id\": 5}', 0)",
    )
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
    let row = sqlx::query(
        "SELECT CAST(ROUND((julianday('now') - 2440587.5) * 86400000.0) AS INTEGER) AS ms",
    )
    .fetch_one(store.pool())
    .await
    .unwrap();
    let db_ms: i64 = row.get("ms");
    let left_ms = lease.expires_at.unix_timestamp_nanos() / 1_000_000 - i128::from(db_ms);
    assert!(left_ms > 59_000 && left_ms <= 60_000, "{left_ms}");
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
