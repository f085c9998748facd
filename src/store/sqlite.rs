//! The SQLite store (feature `sqlite`): [`SqliteStore`] implements
//! [`EventLedger`], [`SubscriptionStore`], [`CursorStore`] and
//! [`InboxStore`] over a `sqlx` pool, with runtime queries only and embedded
//! migrations. It passes the whole [conformance suite](super::conformance).
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use stripe_webhook_guard::store::SqliteStore;
//! // WAL, a 5 s busy timeout, created if missing:
//! let store = SqliteStore::open("billing.db").await?;
//! store.migrate().await?; // idempotent: run it at every start
//! # Ok(()) }
//! ```
//!
//! With a pool of your own, use [`SqliteStore::connect_options`] (or at least
//! WAL and a busy timeout) and [`SqliteStore::new`] /
//! [`SqliteStore::with_prefix`]. An in-memory database needs a pool of one
//! connection (each connection to `sqlite::memory:` is its own database).
//!
//! # Tables
//!
//! Tables carry a prefix the application chooses (default
//! [`DEFAULT_PREFIX`], `swg_`; `[a-z0-9_]` only, at most 32 bytes, not
//! starting with a digit or `sqlite_`). The prefix is the only thing
//! interpolated into SQL; every value is a bind parameter. Tables are
//! `STRICT` (SQLite 3.37 or later; the bundled SQLite is newer). Times are
//! `INTEGER` Unix **microseconds**; lease times come from the database's
//! clock (`julianday('now')`, millisecond resolution).
//!
//! `swg_ledger`: one row per event, primary key `(event_id, account)`.
//!
//! | column | type | meaning |
//! |---|---|---|
//! | `event_id` | `TEXT` | `evt_…` |
//! | `account` | `TEXT` | `acct_…` for Connect events, `''` for the platform's own |
//! | `event_type` | `TEXT` | Stripe's spelling |
//! | `event_created` | `INTEGER` | the event's `created`, Unix seconds |
//! | `fingerprint` | `BLOB` | 32 bytes, [`Fingerprint`] of the first delivery |
//! | `state` | `TEXT` | `pending`, `processing`, `processed`, `failed`, `dead`, `ignored` |
//! | `attempts` | `INTEGER` | claims so far |
//! | `lease_token` | `INTEGER` | the current (or last) fencing token, from `swg_sequences` |
//! | `lease_expires_at` | `INTEGER` | end of the lease (µs), on the database's clock |
//! | `last_error` | `TEXT` | the last failure's message |
//! | `ignore_reason` | `TEXT` | why the event was ignored |
//! | `payload` | `TEXT` | the raw event while pending, failed or dead (dropped on completion) |
//! | `subscription_id` | `TEXT` | inbox: serialization key |
//! | `available_at` | `INTEGER` | inbox: earliest time (µs) a worker may take the event |
//! | `first_seen_at`, `updated_at` | `INTEGER` | µs, database clock |
//!
//! The platform's own events are stored with `account = ''` (so an
//! [`EventKey`] with `Some("")` is the platform's).
//!
//! Indexes: `swg_ledger_inbox_idx (event_created, event_id, account)` over
//! unsettled rows (`pending`, `processing`, `failed`) for `take` and
//! `backlog`; `swg_ledger_subscription_idx (subscription_id, state)` over
//! unsettled rows for the per-subscription checks of `take`;
//! `swg_ledger_state_idx (state, updated_at)` for listing and pruning.
//!
//! `swg_subscriptions`: `id TEXT` primary key, `customer TEXT`,
//! `client_reference_id TEXT`, `needs_review INTEGER` (0/1),
//! `needs_reconcile INTEGER`, `last_verified_with_stripe INTEGER` (µs),
//! `version INTEGER`, `record TEXT` (the whole [`SubscriptionRecord`] as
//! JSON; the other columns are copies for lookups), `updated_at INTEGER`.
//! Indexes on `(customer, id)` and `(client_reference_id, id)`.
//!
//! `swg_entitlements`: `customer TEXT` primary key, `version INTEGER`,
//! `entitlements TEXT` (JSON of [`CustomerEntitlements`]), `updated_at`.
//!
//! `swg_cursors`: `name TEXT` primary key, `value TEXT`, `updated_at`.
//!
//! `swg_sequences`: `name TEXT` primary key, `value INTEGER` (the lease-token
//! counter). `swg_migrations`: `version INTEGER` primary key, `name TEXT`,
//! `applied_at INTEGER` (see [`SqliteStore::migrate`]).
//!
//! # How the rules are enforced
//!
//! SQLite has one writer at a time, so every read-modify-write runs in a
//! `BEGIN IMMEDIATE` transaction (the write lock is taken up front; waiting
//! writers queue on the busy timeout):
//!
//! - **Claims** read the database's `now` and the row, apply [`decide_claim`]
//!   from [`crate::ledger`] (the same function the in-memory store uses),
//!   and insert or update. The primary key `(event_id, account)` is the
//!   arbiter; tokens come from the `lease_token` counter, one per claim.
//! - **Completion and release** are single statements fenced by the token;
//!   when nothing matched, the row is judged by [`check_completion`] /
//!   [`check_fence`] (a repeated completion by the same lease is a no-op
//!   success, anything else is [`StoreErrorKind::LeaseLost`]). **Failure**
//!   reads the row in a transaction and applies [`check_fence`] and
//!   [`state_after_failure`].
//! - **Saves** are compare-and-set on `version`; [`StoreErrorKind::Conflict`]
//!   on mismatch.
//! - **Inbox `take`** runs in one `BEGIN IMMEDIATE` transaction: it picks,
//!   oldest `event_created` first, the oldest due event of each subscription
//!   that has no event under a live lease, and leases them.
//! - **Errors**: a busy database (after the busy timeout), I/O errors and
//!   pool timeouts are [`StoreErrorKind::Unavailable`] (`SQLITE_LOCKED` and
//!   `SQLITE_BUSY_SNAPSHOT` are retried up to five times first); undecodable
//!   rows and a corrupt file are [`StoreErrorKind::Corrupt`]. Messages carry
//!   the operation and SQLite's result code, never a payload.
//!
//! # Effects in the same transaction
//!
//! As with PostgreSQL: [`SqliteStore::begin`] opens a `BEGIN IMMEDIATE`
//! transaction; do the application's writes, call
//! [`SqliteStore::complete_in`] with the lease, and commit, so the writes
//! and the completion happen together or not at all. The processor's later
//! [`EventLedger::complete`] with the same lease is then a no-op. The
//! transaction holds SQLite's write lock, so keep it short.

use std::fmt;
use std::future::Future;
use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use sqlx::sqlite::{
    SqliteArguments, SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePool,
    SqlitePoolOptions, SqliteRow, SqliteSynchronous,
};
use sqlx::{AssertSqlSafe, Row, Sqlite, Transaction};
use time::{Duration, OffsetDateTime};

use super::{
    CursorStore, EnqueueOutcome, EventLedger, InboxItem, InboxRequest, InboxStore, StoreError,
    StoreErrorKind, SubscriptionQuery, SubscriptionStore,
};
use crate::ledger::{
    ClaimDecision, ClaimOutcome, ClaimRequest, EventKey, FailOutcome, Failure, Fingerprint,
    IgnoreRequest, Lease, LeaseToken, LedgerEntry, LedgerQuery, LedgerState, check_completion,
    check_fence, decide_claim, state_after_failure,
};
use crate::subscription::{CustomerEntitlements, SubscriptionRecord};

/// The table prefix [`SqliteStore::new`] uses.
pub const DEFAULT_PREFIX: &str = "swg_";

/// Longest prefix accepted.
const MAX_PREFIX_LEN: usize = 32;

/// Retries of `SQLITE_LOCKED` / `SQLITE_BUSY_SNAPSHOT` before giving up.
const MAX_RETRIES: u32 = 5;

/// One embedded migration.
struct Migration {
    version: i64,
    name: &'static str,
    sql: &'static str,
}

/// The embedded migrations, in order. `{p}` stands for the prefix.
const MIGRATIONS: &[Migration] = &[Migration {
    version: 1,
    name: "init",
    sql: include_str!("../../migrations/sqlite/0001_init.sql"),
}];

/// The database's clock in Unix microseconds (millisecond resolution; the
/// same value for every use within one statement).
macro_rules! now_us {
    () => {
        "(CAST(ROUND((julianday('now') - 2440587.5) * 86400000.0) AS INTEGER) * 1000)"
    };
}

/// The ledger columns, read as `l`.
macro_rules! ledger_columns {
    () => {
        "l.event_id, l.account, l.event_type, l.event_created, l.fingerprint, l.state, \
         l.attempts, l.lease_token, l.lease_expires_at, l.last_error, l.ignore_reason, \
         l.payload, l.subscription_id, l.available_at, l.first_seen_at, l.updated_at"
    };
}

const NOW: &str = concat!("SELECT ", now_us!());

const NEXT_TOKEN: &str = "UPDATE \"{p}sequences\" SET value = value + 1 \
     WHERE name = 'lease_token' RETURNING value";

const GET: &str = concat!(
    "SELECT ",
    ledger_columns!(),
    " FROM \"{p}ledger\" l WHERE l.event_id = $1 AND l.account = $2"
);

const CLAIM_INSERT: &str = "INSERT INTO \"{p}ledger\" (event_id, account, event_type, \
     event_created, fingerprint, state, attempts, lease_token, lease_expires_at, \
     first_seen_at, updated_at) VALUES ($1, $2, $3, $4, $5, 'processing', 1, $6, $7, $8, $8)";

const RECLAIM: &str = "UPDATE \"{p}ledger\" SET state = 'processing', attempts = $3, \
     lease_token = $4, lease_expires_at = $5, updated_at = $6 \
     WHERE event_id = $1 AND account = $2";

const EXPIRE_TO_DEAD: &str = "UPDATE \"{p}ledger\" SET state = 'dead', \
     lease_expires_at = NULL, last_error = $3, updated_at = $4 \
     WHERE event_id = $1 AND account = $2";

const COMPLETE: &str = concat!(
    "UPDATE \"{p}ledger\" SET state = 'processed', lease_expires_at = NULL, payload = NULL, \
     last_error = NULL, updated_at = ",
    now_us!(),
    " WHERE event_id = $1 AND account = $2 AND state = 'processing' AND lease_token = $3"
);

const FAIL: &str = "UPDATE \"{p}ledger\" SET state = $3, lease_expires_at = NULL, \
     last_error = $4, payload = COALESCE($5, payload), updated_at = $6 \
     WHERE event_id = $1 AND account = $2";

const RELEASE: &str = concat!(
    "UPDATE \"{p}ledger\" SET state = 'failed', attempts = MAX(attempts - 1, 0), \
     lease_expires_at = NULL, last_error = 'released before completion (shutdown)', \
     updated_at = ",
    now_us!(),
    " WHERE event_id = $1 AND account = $2 AND state = 'processing' AND lease_token = $3"
);

const IGNORE: &str = concat!(
    "INSERT INTO \"{p}ledger\" (event_id, account, event_type, event_created, fingerprint, \
     state, attempts, ignore_reason, first_seen_at, updated_at) \
     VALUES ($1, $2, $3, $4, $5, 'ignored', 0, $6, ",
    now_us!(),
    ", ",
    now_us!(),
    ") ON CONFLICT (event_id, account) DO NOTHING"
);

const STATE_OF: &str =
    "SELECT state, fingerprint FROM \"{p}ledger\" WHERE event_id = $1 AND account = $2";

const LIST: &str = concat!(
    "SELECT ",
    ledger_columns!(),
    " FROM \"{p}ledger\" l \
     WHERE ($1 = 0 OR l.state IN (SELECT value FROM json_each($2))) \
     AND ($3 IS NULL OR l.event_id > $3) \
     ORDER BY l.event_id, l.account LIMIT $4"
);

const REQUEUE: &str = concat!(
    "UPDATE \"{p}ledger\" SET state = 'failed', attempts = 0, available_at = NULL, \
     updated_at = ",
    now_us!(),
    " WHERE event_id = $1 AND account = $2 AND state IN ('dead', 'failed')"
);

const PRUNE: &str =
    "DELETE FROM \"{p}ledger\" WHERE state IN ('processed', 'ignored') AND updated_at < $1";

const ENQUEUE: &str = concat!(
    "INSERT INTO \"{p}ledger\" (event_id, account, event_type, event_created, fingerprint, \
     state, attempts, payload, subscription_id, available_at, first_seen_at, updated_at) \
     VALUES ($1, $2, $3, $4, $5, 'pending', 0, $6, $7, $8, ",
    now_us!(),
    ", ",
    now_us!(),
    ") ON CONFLICT (event_id, account) DO NOTHING"
);

/// The oldest due event of each subscription without a live lease (and
/// every due event without a subscription), oldest first. `$1` is now.
const TAKE: &str = concat!(
    "SELECT ",
    ledger_columns!(),
    " FROM \"{p}ledger\" l \
     WHERE l.state IN ('pending', 'processing', 'failed') AND l.payload IS NOT NULL \
     AND (l.state <> 'processing' OR l.lease_expires_at IS NULL OR l.lease_expires_at <= $1) \
     AND (l.available_at IS NULL OR l.available_at <= $1) \
     AND (l.subscription_id IS NULL OR NOT EXISTS (SELECT 1 FROM \"{p}ledger\" o \
       WHERE o.subscription_id = l.subscription_id \
       AND o.state IN ('pending', 'processing', 'failed') \
       AND NOT (o.event_id = l.event_id AND o.account = l.account) \
       AND ((o.state = 'processing' AND o.lease_expires_at > $1) \
         OR (o.payload IS NOT NULL \
           AND (o.state <> 'processing' OR o.lease_expires_at IS NULL OR o.lease_expires_at <= $1) \
           AND (o.available_at IS NULL OR o.available_at <= $1) \
           AND (o.event_created, o.event_id, o.account) < (l.event_created, l.event_id, l.account))))) \
     ORDER BY l.event_created, l.event_id, l.account LIMIT $2"
);

const RETRY_AT: &str =
    "UPDATE \"{p}ledger\" SET available_at = $3 WHERE event_id = $1 AND account = $2";

const KEEP_PAYLOAD: &str = "UPDATE \"{p}ledger\" SET payload = $3 WHERE event_id = $1 AND account = $2 AND state = 'processed'";

const BACKLOG: &str =
    "SELECT count(*) FROM \"{p}ledger\" WHERE state IN ('pending', 'processing', 'failed')";

const SUB_LOAD: &str = "SELECT version, record FROM \"{p}subscriptions\" WHERE id = $1";

const SUB_INSERT: &str = concat!(
    "INSERT INTO \"{p}subscriptions\" (id, customer, client_reference_id, needs_review, \
     needs_reconcile, last_verified_with_stripe, version, record, updated_at) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, ",
    now_us!(),
    ") ON CONFLICT (id) DO NOTHING"
);

const SUB_UPDATE: &str = concat!(
    "UPDATE \"{p}subscriptions\" SET customer = $2, client_reference_id = $3, \
     needs_review = $4, needs_reconcile = $5, last_verified_with_stripe = $6, version = $7, \
     record = $8, updated_at = ",
    now_us!(),
    " WHERE id = $1 AND version = $9"
);

const SUB_BY_CUSTOMER: &str =
    "SELECT version, record FROM \"{p}subscriptions\" WHERE customer = $1 ORDER BY id";

const SUB_BY_REFERENCE: &str =
    "SELECT version, record FROM \"{p}subscriptions\" WHERE client_reference_id = $1 ORDER BY id";

const SUB_LIST: &str = "SELECT version, record FROM \"{p}subscriptions\" \
     WHERE ($1 IS NULL OR last_verified_with_stripe IS NULL OR last_verified_with_stripe < $1) \
     AND ($2 = 0 OR needs_review <> 0) AND ($3 = 0 OR needs_reconcile <> 0) \
     AND ($4 IS NULL OR id > $4) ORDER BY id LIMIT $5";

const ENT_LOAD: &str = "SELECT version, entitlements FROM \"{p}entitlements\" WHERE customer = $1";

const ENT_INSERT: &str = concat!(
    "INSERT INTO \"{p}entitlements\" (customer, version, entitlements, updated_at) \
     VALUES ($1, $2, $3, ",
    now_us!(),
    ") ON CONFLICT (customer) DO NOTHING"
);

const ENT_UPDATE: &str = concat!(
    "UPDATE \"{p}entitlements\" SET version = $2, entitlements = $3, updated_at = ",
    now_us!(),
    " WHERE customer = $1 AND version = $4"
);

const CURSOR_LOAD: &str = "SELECT value FROM \"{p}cursors\" WHERE name = $1";

const CURSOR_SAVE: &str = concat!(
    "INSERT INTO \"{p}cursors\" (name, value, updated_at) VALUES ($1, $2, ",
    now_us!(),
    ") ON CONFLICT (name) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at"
);

/// The statements with the prefix filled in, rendered once per store.
struct Statements {
    next_token: Arc<str>,
    get: Arc<str>,
    claim_insert: Arc<str>,
    reclaim: Arc<str>,
    expire_to_dead: Arc<str>,
    complete: Arc<str>,
    fail: Arc<str>,
    release: Arc<str>,
    ignore: Arc<str>,
    state_of: Arc<str>,
    list: Arc<str>,
    requeue: Arc<str>,
    prune: Arc<str>,
    enqueue: Arc<str>,
    take: Arc<str>,
    retry_at: Arc<str>,
    keep_payload: Arc<str>,
    backlog: Arc<str>,
    sub_load: Arc<str>,
    sub_insert: Arc<str>,
    sub_update: Arc<str>,
    sub_by_customer: Arc<str>,
    sub_by_reference: Arc<str>,
    sub_list: Arc<str>,
    ent_load: Arc<str>,
    ent_insert: Arc<str>,
    ent_update: Arc<str>,
    cursor_load: Arc<str>,
    cursor_save: Arc<str>,
}

impl Statements {
    fn new(prefix: &str) -> Self {
        let r = |t: &str| -> Arc<str> { t.replace("{p}", prefix).into() };
        Self {
            next_token: r(NEXT_TOKEN),
            get: r(GET),
            claim_insert: r(CLAIM_INSERT),
            reclaim: r(RECLAIM),
            expire_to_dead: r(EXPIRE_TO_DEAD),
            complete: r(COMPLETE),
            fail: r(FAIL),
            release: r(RELEASE),
            ignore: r(IGNORE),
            state_of: r(STATE_OF),
            list: r(LIST),
            requeue: r(REQUEUE),
            prune: r(PRUNE),
            enqueue: r(ENQUEUE),
            take: r(TAKE),
            retry_at: r(RETRY_AT),
            keep_payload: r(KEEP_PAYLOAD),
            backlog: r(BACKLOG),
            sub_load: r(SUB_LOAD),
            sub_insert: r(SUB_INSERT),
            sub_update: r(SUB_UPDATE),
            sub_by_customer: r(SUB_BY_CUSTOMER),
            sub_by_reference: r(SUB_BY_REFERENCE),
            sub_list: r(SUB_LIST),
            ent_load: r(ENT_LOAD),
            ent_insert: r(ENT_INSERT),
            ent_update: r(ENT_UPDATE),
            cursor_load: r(CURSOR_LOAD),
            cursor_save: r(CURSOR_SAVE),
        }
    }
}

/// A prepared-statement query from a rendered statement.
fn q(sql: &Arc<str>) -> sqlx::query::Query<'static, Sqlite, SqliteArguments> {
    sqlx::query(AssertSqlSafe(Arc::clone(sql)))
}

/// The SQLite store. Cheap to clone (the pool is shared). See the
/// [module docs](self) for the tables and how each rule is enforced.
#[derive(Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
    prefix: Arc<str>,
    sql: Arc<Statements>,
}

impl fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqliteStore")
            .field("prefix", &self.prefix)
            .field("pool_size", &self.pool.size())
            .finish_non_exhaustive()
    }
}

use super::sql::{Fail, lease_lost, not_found, other};

fn corrupt(what: &str) -> Fail {
    super::sql::corrupt("sqlite", what)
}

/// SQLite's result code and message only.
#[derive(Debug)]
struct DbErrorSummary {
    code: i32,
    message: String,
}

impl fmt::Display for DbErrorSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sqlite result code {}: {}", self.code, self.message)
    }
}

impl std::error::Error for DbErrorSummary {}

/// The extended result code of a database error.
fn result_code(e: &sqlx::Error) -> Option<i32> {
    match e {
        sqlx::Error::Database(db) => db.code().and_then(|c| c.parse().ok()),
        _ => None,
    }
}

/// `SQLITE_LOCKED` or `SQLITE_BUSY_SNAPSHOT`: the busy handler does not wait
/// for these; re-running the transaction does.
fn is_transient(e: &sqlx::Error) -> bool {
    matches!(result_code(e), Some(c) if c & 0xff == 6 || c == 517)
}

/// Maps a driver error to a [`StoreError`] for operation `op`.
fn map_db_error(op: &str, e: sqlx::Error) -> StoreError {
    use StoreErrorKind as K;
    let (kind, what): (K, &str) = match &e {
        sqlx::Error::PoolTimedOut => (K::Unavailable, "timed out waiting for a connection"),
        sqlx::Error::PoolClosed => (K::Unavailable, "the pool is closed"),
        sqlx::Error::Io(_) => (K::Unavailable, "i/o error"),
        sqlx::Error::WorkerCrashed => (K::Unavailable, "connection worker crashed"),
        sqlx::Error::RowNotFound => (K::NotFound, "no row"),
        sqlx::Error::ColumnDecode { .. }
        | sqlx::Error::Decode(_)
        | sqlx::Error::ColumnNotFound(_)
        | sqlx::Error::ColumnIndexOutOfBounds { .. }
        | sqlx::Error::TypeNotFound { .. } => (K::Corrupt, "a stored value could not be decoded"),
        sqlx::Error::Database(db) => {
            let code = result_code(&e).unwrap_or(1);
            let kind = match code & 0xff {
                5 | 6 | 10 | 13 | 14 | 15 => K::Unavailable,
                11 | 26 => K::Corrupt,
                19 if matches!(code, 1555 | 2067) => K::Conflict,
                _ => K::Other,
            };
            let hint = match code & 0xff {
                5 => " (database busy: another writer held the lock past the busy timeout)",
                1 if db.message().contains("no such table") => " (table missing: run migrate())",
                _ => "",
            };
            let summary = DbErrorSummary {
                code,
                message: db.message().to_owned(),
            };
            return StoreError::new(kind, format!("sqlite {op}: result code {code}{hint}"))
                .with_source(summary);
        }
        _ => (K::Other, "driver error"),
    };
    StoreError::new(kind, format!("sqlite {op}: {what}")).with_source(e)
}

/// A short, jittered pause before retry `attempt` (1-based).
async fn backoff(attempt: u32) {
    use std::hash::BuildHasher;
    let base = 2u64 << attempt.min(6);
    let jitter = std::hash::RandomState::new().hash_one(std::time::Instant::now()) % base.max(1);
    tokio::time::sleep(std::time::Duration::from_millis(base + jitter)).await;
}

/// Runs `f`, re-running it on transient lock errors.
async fn run<T, F, Fut>(op: &'static str, mut f: F) -> Result<T, StoreError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, Fail>>,
{
    let mut attempt = 0;
    loop {
        match f().await {
            Ok(v) => return Ok(v),
            Err(Fail::Store(e)) => return Err(e),
            Err(Fail::Db(e)) if is_transient(&e) && attempt < MAX_RETRIES => {
                attempt += 1;
                backoff(attempt).await;
            }
            Err(Fail::Db(e)) => return Err(map_db_error(op, e)),
        }
    }
}

fn finish<T>(op: &'static str, r: Result<T, Fail>) -> Result<T, StoreError> {
    r.map_err(|f| match f {
        Fail::Db(e) => map_db_error(op, e),
        Fail::Store(e) => e,
    })
}

fn account_of(key: &EventKey) -> &str {
    key.account.as_deref().unwrap_or("")
}

fn to_i64(v: u64, what: &str) -> Result<i64, Fail> {
    i64::try_from(v).map_err(|_| other(format!("sqlite: {what} out of range")))
}

/// Unix microseconds (floor). Every `OffsetDateTime` fits.
fn to_us(t: OffsetDateTime) -> i64 {
    let us = t.unix_timestamp_nanos().div_euclid(1000);
    i64::try_from(us).unwrap_or(if us < 0 { i64::MIN } else { i64::MAX })
}

fn from_us(us: i64, what: &str) -> Result<OffsetDateTime, Fail> {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(us) * 1000).map_err(|_| corrupt(what))
}

fn opt_from_us(us: Option<i64>, what: &str) -> Result<Option<OffsetDateTime>, Fail> {
    us.map(|v| from_us(v, what)).transpose()
}

fn token_of(raw: i64) -> Result<LeaseToken, Fail> {
    u64::try_from(raw)
        .map(LeaseToken)
        .map_err(|_| corrupt("lease token"))
}

fn limit_of(limit: usize) -> i64 {
    if limit == 0 {
        -1
    } else {
        i64::try_from(limit).unwrap_or(i64::MAX)
    }
}

fn fingerprint_of(bytes: &[u8]) -> Result<Fingerprint, Fail> {
    <[u8; 32]>::try_from(bytes)
        .map(Fingerprint)
        .map_err(|_| corrupt("fingerprint"))
}

fn entry_from_row(row: &SqliteRow) -> Result<LedgerEntry, Fail> {
    let account: String = row.try_get("account")?;
    let fingerprint: Vec<u8> = row.try_get("fingerprint")?;
    let state: String = row.try_get("state")?;
    let state = LedgerState::parse(&state).ok_or_else(|| corrupt("ledger state"))?;
    let attempts: i64 = row.try_get("attempts")?;
    let attempts = u32::try_from(attempts).map_err(|_| corrupt("attempt count"))?;
    let lease_token = row
        .try_get::<Option<i64>, _>("lease_token")?
        .map(token_of)
        .transpose()?;
    Ok(LedgerEntry {
        key: EventKey {
            event_id: row.try_get("event_id")?,
            account: (!account.is_empty()).then_some(account),
        },
        event_type: row.try_get("event_type")?,
        event_created: row.try_get("event_created")?,
        fingerprint: fingerprint_of(&fingerprint)?,
        state,
        attempts,
        lease_token,
        lease_expires_at: opt_from_us(row.try_get("lease_expires_at")?, "lease expiry")?,
        last_error: row.try_get("last_error")?,
        ignore_reason: row.try_get("ignore_reason")?,
        payload: row.try_get("payload")?,
        subscription_id: row.try_get("subscription_id")?,
        available_at: opt_from_us(row.try_get("available_at")?, "available_at")?,
        first_seen_at: from_us(row.try_get("first_seen_at")?, "first_seen_at")?,
        updated_at: from_us(row.try_get("updated_at")?, "updated_at")?,
    })
}

fn record_from_row(row: &SqliteRow) -> Result<SubscriptionRecord, Fail> {
    let version: i64 = row.try_get("version")?;
    let json: String = row.try_get("record")?;
    let mut record: SubscriptionRecord =
        serde_json::from_str(&json).map_err(|_| corrupt("subscription record"))?;
    record.version = u64::try_from(version).map_err(|_| corrupt("subscription version"))?;
    Ok(record)
}

fn entitlements_from_row(row: &SqliteRow) -> Result<CustomerEntitlements, Fail> {
    let version: i64 = row.try_get("version")?;
    let json: String = row.try_get("entitlements")?;
    let mut e: CustomerEntitlements =
        serde_json::from_str(&json).map_err(|_| corrupt("entitlements"))?;
    e.version = u64::try_from(version).map_err(|_| corrupt("entitlements version"))?;
    Ok(e)
}

fn to_json<T: serde::Serialize>(value: &T, what: &str) -> Result<String, Fail> {
    serde_json::to_string(value).map_err(|_| other(format!("sqlite: cannot serialize {what}")))
}

/// Checks a prefix: up to 32 bytes of `[a-z0-9_]`, not starting with a
/// digit or `sqlite_`.
fn validate_prefix(prefix: &str) -> Result<(), StoreError> {
    let ok = prefix.len() <= MAX_PREFIX_LEN
        && prefix
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        && !prefix.bytes().next().is_some_and(|b| b.is_ascii_digit())
        && !prefix.starts_with("sqlite_");
    if ok {
        Ok(())
    } else {
        Err(StoreError::new(
            StoreErrorKind::Other,
            format!(
                "invalid SQLite table prefix: use up to {MAX_PREFIX_LEN} characters of \
                 [a-z0-9_], not starting with a digit or 'sqlite_'"
            ),
        ))
    }
}

impl SqliteStore {
    /// A store over `pool` with the table prefix [`DEFAULT_PREFIX`]. Call
    /// [`SqliteStore::migrate`] before use.
    pub fn new(pool: SqlitePool) -> Self {
        Self::build(pool, DEFAULT_PREFIX)
    }

    /// A store over `pool` whose tables are named `{prefix}ledger` and so on.
    ///
    /// # Errors
    ///
    /// [`StoreErrorKind::Other`] when `prefix` is longer than 32 bytes, has a
    /// character outside `[a-z0-9_]`, or starts with a digit or `sqlite_`.
    pub fn with_prefix(pool: SqlitePool, prefix: &str) -> Result<Self, StoreError> {
        validate_prefix(prefix)?;
        Ok(Self::build(pool, prefix))
    }

    fn build(pool: SqlitePool, prefix: &str) -> Self {
        Self {
            pool,
            prefix: prefix.into(),
            sql: Arc::new(Statements::new(prefix)),
        }
    }

    /// The recommended connection options for a database file: created if
    /// missing, WAL journal, `synchronous = NORMAL`, a 5 second busy timeout.
    pub fn connect_options(path: impl AsRef<Path>) -> SqliteConnectOptions {
        SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(std::time::Duration::from_secs(5))
    }

    /// Opens (or creates) the database file at `path` with
    /// [`SqliteStore::connect_options`] and a pool of up to 8 connections
    /// (5 second acquire timeout), with the default prefix. Call
    /// [`SqliteStore::migrate`] next.
    ///
    /// # Errors
    ///
    /// [`StoreErrorKind::Unavailable`] when the file cannot be opened or
    /// created; other kinds for other failures.
    pub async fn open(path: impl AsRef<Path>) -> Result<Self, StoreError> {
        let pool = SqlitePoolOptions::new()
            .max_connections(8)
            .acquire_timeout(std::time::Duration::from_secs(5))
            .connect_with(Self::connect_options(path))
            .await
            .map_err(|e| map_db_error("open", e))?;
        Ok(Self::new(pool))
    }

    /// The table prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The pool.
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    /// Applies the embedded migrations not yet recorded in
    /// `{prefix}migrations`, in one `BEGIN IMMEDIATE` transaction (so
    /// concurrent starts are safe). Idempotent: run it at every start.
    /// Returns how many migrations were applied now.
    ///
    /// # Errors
    ///
    /// [`StoreError`] when the database fails.
    pub async fn migrate(&self) -> Result<usize, StoreError> {
        run("migrate", || self.migrate_once()).await
    }

    async fn migrate_once(&self) -> Result<usize, Fail> {
        let p = &self.prefix;
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        sqlx::raw_sql(AssertSqlSafe(format!(
            "CREATE TABLE IF NOT EXISTS \"{p}migrations\" (version INTEGER PRIMARY KEY, \
             name TEXT NOT NULL, applied_at INTEGER NOT NULL) STRICT"
        )))
        .execute(&mut *tx)
        .await?;
        let applied: Vec<i64> = sqlx::query_scalar(AssertSqlSafe(format!(
            "SELECT version FROM \"{p}migrations\""
        )))
        .fetch_all(&mut *tx)
        .await?;
        let mut count = 0;
        for m in MIGRATIONS.iter().filter(|m| !applied.contains(&m.version)) {
            sqlx::raw_sql(AssertSqlSafe(m.sql.replace("{p}", p)))
                .execute(&mut *tx)
                .await?;
            sqlx::query(AssertSqlSafe(format!(
                "INSERT INTO \"{p}migrations\" (version, name, applied_at) VALUES ($1, $2, {})",
                now_us!()
            )))
            .bind(m.version)
            .bind(m.name)
            .execute(&mut *tx)
            .await?;
            count += 1;
        }
        tx.commit().await?;
        Ok(count)
    }

    /// Begins a `BEGIN IMMEDIATE` transaction on the store's pool, for
    /// [`SqliteStore::complete_in`].
    ///
    /// # Errors
    ///
    /// [`StoreErrorKind::Unavailable`] when no connection or no write lock
    /// can be had.
    pub async fn begin(&self) -> Result<Transaction<'static, Sqlite>, StoreError> {
        self.pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(|e| map_db_error("begin", e))
    }

    /// Marks the leased event processed inside the caller's transaction
    /// (`&mut *tx` from [`SqliteStore::begin`]), with the rules of
    /// [`EventLedger::complete`]: fenced by the lease token, and a no-op when
    /// this lease already completed the event.
    ///
    /// Use it when the application's own writes must happen exactly once:
    /// write them and call this in one transaction, then commit; if anything
    /// fails, both roll back and the event is retried. The processor's later
    /// [`EventLedger::complete`] with the same lease is then a no-op.
    ///
    /// # Errors
    ///
    /// [`StoreErrorKind::LeaseLost`] when another claim took the event over
    /// (roll back), [`StoreErrorKind::NotFound`] when there is no entry,
    /// other kinds when the database fails.
    pub async fn complete_in(
        &self,
        conn: &mut SqliteConnection,
        lease: &Lease,
    ) -> Result<(), StoreError> {
        finish("complete_in", self.complete_on(conn, lease).await)
    }

    async fn complete_on(&self, conn: &mut SqliteConnection, lease: &Lease) -> Result<(), Fail> {
        let token = to_i64(lease.token.0, "lease token")?;
        for _ in 0..3 {
            let done = q(&self.sql.complete)
                .bind(&lease.key.event_id)
                .bind(account_of(&lease.key))
                .bind(token)
                .execute(&mut *conn)
                .await?
                .rows_affected();
            if done > 0 {
                return Ok(());
            }
            let entry = self.get_on(conn, &lease.key).await?.ok_or_else(not_found)?;
            if !check_completion(&entry, lease).map_err(lease_lost)? {
                return Ok(());
            }
        }
        Err(other("sqlite complete: the entry kept changing"))
    }

    async fn get_on(
        &self,
        conn: &mut SqliteConnection,
        key: &EventKey,
    ) -> Result<Option<LedgerEntry>, Fail> {
        q(&self.sql.get)
            .bind(&key.event_id)
            .bind(account_of(key))
            .fetch_optional(conn)
            .await?
            .as_ref()
            .map(entry_from_row)
            .transpose()
    }

    /// The database's clock, read inside `conn`'s transaction.
    async fn now_on(conn: &mut SqliteConnection) -> Result<OffsetDateTime, Fail> {
        let us: i64 = sqlx::query_scalar(NOW).fetch_one(conn).await?;
        from_us(us, "clock")
    }

    async fn next_token(&self, conn: &mut SqliteConnection) -> Result<i64, Fail> {
        sqlx::query_scalar(AssertSqlSafe(Arc::clone(&self.sql.next_token)))
            .fetch_optional(conn)
            .await?
            .ok_or_else(|| corrupt("lease-token counter"))
    }

    async fn claim_once(&self, request: &ClaimRequest) -> Result<ClaimOutcome, Fail> {
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let now = Self::now_on(&mut tx).await?;
        let existing = self.get_on(&mut tx, &request.key).await?;
        let outcome = match existing {
            None => {
                let token = self.next_token(&mut tx).await?;
                let expires_at = to_us(now.saturating_add(request.lease));
                q(&self.sql.claim_insert)
                    .bind(&request.key.event_id)
                    .bind(account_of(&request.key))
                    .bind(&request.event_type)
                    .bind(request.event_created)
                    .bind(&request.fingerprint.0[..])
                    .bind(token)
                    .bind(expires_at)
                    .bind(to_us(now))
                    .execute(&mut *tx)
                    .await?;
                ClaimOutcome::Claimed(Lease {
                    key: request.key.clone(),
                    token: token_of(token)?,
                    attempt: 1,
                    expires_at: from_us(expires_at, "lease expiry")?,
                })
            }
            Some(entry) => self.apply_decision(&mut tx, &entry, request, now).await?,
        };
        tx.commit().await?;
        Ok(outcome)
    }

    /// Applies [`decide_claim`] to an existing entry, inside a write
    /// transaction.
    async fn apply_decision(
        &self,
        conn: &mut SqliteConnection,
        entry: &LedgerEntry,
        request: &ClaimRequest,
        now: OffsetDateTime,
    ) -> Result<ClaimOutcome, Fail> {
        let key = &request.key;
        Ok(
            match decide_claim(Some(entry), &request.fingerprint, now, request.max_attempts) {
                ClaimDecision::Insert => return Err(other("sqlite claim: entry vanished")),
                ClaimDecision::Reclaim { attempt } => {
                    let token = self.next_token(&mut *conn).await?;
                    let expires_at = to_us(now.saturating_add(request.lease));
                    q(&self.sql.reclaim)
                        .bind(&key.event_id)
                        .bind(account_of(key))
                        .bind(i64::from(attempt))
                        .bind(token)
                        .bind(expires_at)
                        .bind(to_us(now))
                        .execute(&mut *conn)
                        .await?;
                    ClaimOutcome::Claimed(Lease {
                        key: key.clone(),
                        token: token_of(token)?,
                        attempt,
                        expires_at: from_us(expires_at, "lease expiry")?,
                    })
                }
                ClaimDecision::ExpireToDead => {
                    let message = format!(
                        "lease expired on attempt {} of {}: the worker never finished",
                        entry.attempts, request.max_attempts
                    );
                    q(&self.sql.expire_to_dead)
                        .bind(&key.event_id)
                        .bind(account_of(key))
                        .bind(message)
                        .bind(to_us(now))
                        .execute(&mut *conn)
                        .await?;
                    ClaimOutcome::DeadLettered {
                        attempts: entry.attempts,
                    }
                }
                ClaimDecision::Duplicate(state) => ClaimOutcome::Duplicate { state },
                ClaimDecision::InFlight { until } => ClaimOutcome::InFlight { until },
                ClaimDecision::Conflict => ClaimOutcome::Conflict {
                    stored: entry.fingerprint,
                },
            },
        )
    }

    async fn fail_once(&self, lease: &Lease, failure: &Failure) -> Result<FailOutcome, Fail> {
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let now = Self::now_on(&mut tx).await?;
        let entry = self
            .get_on(&mut tx, &lease.key)
            .await?
            .ok_or_else(not_found)?;
        check_fence(&entry, lease).map_err(lease_lost)?;
        let state = state_after_failure(entry.attempts, failure.max_attempts, failure.retryable);
        q(&self.sql.fail)
            .bind(&lease.key.event_id)
            .bind(account_of(&lease.key))
            .bind(state.as_str())
            .bind(&failure.error)
            .bind(failure.payload.as_deref())
            .bind(to_us(now))
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(match state {
            LedgerState::Dead => FailOutcome::Dead {
                attempts: entry.attempts,
            },
            _ => FailOutcome::Failed {
                attempts: entry.attempts,
            },
        })
    }

    async fn release_once(&self, lease: &Lease) -> Result<(), Fail> {
        let token = to_i64(lease.token.0, "lease token")?;
        let mut conn = self.pool.acquire().await?;
        for _ in 0..3 {
            let done = q(&self.sql.release)
                .bind(&lease.key.event_id)
                .bind(account_of(&lease.key))
                .bind(token)
                .execute(&mut *conn)
                .await?
                .rows_affected();
            if done > 0 {
                return Ok(());
            }
            let entry = self
                .get_on(&mut conn, &lease.key)
                .await?
                .ok_or_else(not_found)?;
            check_fence(&entry, lease).map_err(lease_lost)?;
        }
        Err(other("sqlite release: the entry kept changing"))
    }

    async fn ignore_once(&self, request: &IgnoreRequest) -> Result<LedgerState, Fail> {
        for _ in 0..3 {
            let n = q(&self.sql.ignore)
                .bind(&request.key.event_id)
                .bind(account_of(&request.key))
                .bind(&request.event_type)
                .bind(request.event_created)
                .bind(&request.fingerprint.0[..])
                .bind(&request.reason)
                .execute(&self.pool)
                .await?
                .rows_affected();
            if n > 0 {
                return Ok(LedgerState::Ignored);
            }
            if let Some((state, _)) = self.state_of(&request.key).await? {
                return Ok(state);
            }
        }
        Err(other("sqlite ignore: the entry kept changing"))
    }

    async fn state_of(&self, key: &EventKey) -> Result<Option<(LedgerState, Fingerprint)>, Fail> {
        let Some(row) = q(&self.sql.state_of)
            .bind(&key.event_id)
            .bind(account_of(key))
            .fetch_optional(&self.pool)
            .await?
        else {
            return Ok(None);
        };
        let state: String = row.try_get("state")?;
        let state = LedgerState::parse(&state).ok_or_else(|| corrupt("ledger state"))?;
        let fingerprint: Vec<u8> = row.try_get("fingerprint")?;
        Ok(Some((state, fingerprint_of(&fingerprint)?)))
    }

    async fn list_once(&self, query: &LedgerQuery) -> Result<Vec<LedgerEntry>, Fail> {
        let states: Vec<&str> = query.states.iter().map(|s| s.as_str()).collect();
        q(&self.sql.list)
            .bind(i64::try_from(states.len()).unwrap_or(i64::MAX))
            .bind(to_json(&states, "states")?)
            .bind(query.after.as_deref())
            .bind(limit_of(query.limit))
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(entry_from_row)
            .collect()
    }

    async fn enqueue_once(&self, request: &InboxRequest) -> Result<EnqueueOutcome, Fail> {
        let claim = &request.claim;
        for _ in 0..3 {
            let n = q(&self.sql.enqueue)
                .bind(&claim.key.event_id)
                .bind(account_of(&claim.key))
                .bind(&claim.event_type)
                .bind(claim.event_created)
                .bind(&claim.fingerprint.0[..])
                .bind(&request.payload)
                .bind(request.subscription_id.as_deref())
                .bind(to_us(request.available_at))
                .execute(&self.pool)
                .await?
                .rows_affected();
            if n > 0 {
                return Ok(EnqueueOutcome::Queued);
            }
            if let Some((state, stored)) = self.state_of(&claim.key).await? {
                return Ok(if stored == claim.fingerprint {
                    EnqueueOutcome::Duplicate { state }
                } else {
                    EnqueueOutcome::Conflict
                });
            }
        }
        Err(other("sqlite enqueue: the entry kept changing"))
    }

    async fn take_once(
        &self,
        limit: usize,
        lease: Duration,
        max_attempts: u32,
    ) -> Result<Vec<InboxItem>, Fail> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let now = Self::now_on(&mut tx).await?;
        let rows = q(&self.sql.take)
            .bind(to_us(now))
            .bind(limit_of(limit))
            .fetch_all(&mut *tx)
            .await?;
        let mut out = Vec::with_capacity(rows.len());
        for row in &rows {
            let entry = entry_from_row(row)?;
            let request = ClaimRequest {
                key: entry.key.clone(),
                event_type: entry.event_type.clone(),
                event_created: entry.event_created,
                fingerprint: entry.fingerprint,
                lease,
                max_attempts,
            };
            if let ClaimOutcome::Claimed(lease) =
                self.apply_decision(&mut tx, &entry, &request, now).await?
            {
                out.push(InboxItem {
                    lease,
                    payload: entry.payload.unwrap_or_default(),
                    subscription_id: entry.subscription_id,
                });
            }
        }
        tx.commit().await?;
        Ok(out)
    }

    async fn save_once(&self, record: &SubscriptionRecord) -> Result<u64, Fail> {
        let next = record
            .version
            .checked_add(1)
            .ok_or_else(|| other("sqlite save: version out of range"))?;
        let mut saved = record.clone();
        saved.version = next;
        let sql = if record.version == 0 {
            &self.sql.sub_insert
        } else {
            &self.sql.sub_update
        };
        let mut query = q(sql)
            .bind(&record.id)
            .bind(record.state.customer.as_deref())
            .bind(record.client_reference_id.as_deref())
            .bind(record.needs_review)
            .bind(record.needs_reconcile)
            .bind(record.last_verified_with_stripe.map(to_us))
            .bind(to_i64(next, "version")?)
            .bind(to_json(&saved, "subscription record")?);
        if record.version > 0 {
            query = query.bind(to_i64(record.version, "version")?);
        }
        let n = query.execute(&self.pool).await?.rows_affected();
        if n == 0 {
            return Err(Fail::Store(StoreError::new(
                StoreErrorKind::Conflict,
                format!(
                    "subscription {} was saved by another writer (expected version {})",
                    record.id, record.version
                ),
            )));
        }
        Ok(next)
    }

    async fn records(&self, sql: &Arc<str>, value: &str) -> Result<Vec<SubscriptionRecord>, Fail> {
        q(sql)
            .bind(value)
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(record_from_row)
            .collect()
    }

    async fn save_entitlements_once(&self, e: &CustomerEntitlements) -> Result<u64, Fail> {
        let next = e
            .version
            .checked_add(1)
            .ok_or_else(|| other("sqlite save_entitlements: version out of range"))?;
        let mut saved = e.clone();
        saved.version = next;
        let sql = if e.version == 0 {
            &self.sql.ent_insert
        } else {
            &self.sql.ent_update
        };
        let mut query = q(sql)
            .bind(&e.customer)
            .bind(to_i64(next, "version")?)
            .bind(to_json(&saved, "entitlements")?);
        if e.version > 0 {
            query = query.bind(to_i64(e.version, "version")?);
        }
        let n = query.execute(&self.pool).await?.rows_affected();
        if n == 0 {
            return Err(Fail::Store(StoreError::new(
                StoreErrorKind::Conflict,
                "entitlements were saved by another writer",
            )));
        }
        Ok(next)
    }
}

#[async_trait]
impl EventLedger for SqliteStore {
    async fn claim(&self, request: &ClaimRequest) -> Result<ClaimOutcome, StoreError> {
        run("claim", || self.claim_once(request)).await
    }

    async fn complete(&self, lease: &Lease) -> Result<(), StoreError> {
        run("complete", || async {
            let mut conn = self.pool.acquire().await?;
            self.complete_on(&mut conn, lease).await
        })
        .await
    }

    async fn fail(&self, lease: &Lease, failure: &Failure) -> Result<FailOutcome, StoreError> {
        run("fail", || self.fail_once(lease, failure)).await
    }

    async fn release(&self, lease: &Lease) -> Result<(), StoreError> {
        run("release", || self.release_once(lease)).await
    }

    async fn ignore(&self, request: &IgnoreRequest) -> Result<LedgerState, StoreError> {
        run("ignore", || self.ignore_once(request)).await
    }

    async fn get(&self, key: &EventKey) -> Result<Option<LedgerEntry>, StoreError> {
        run("get", || async {
            let mut conn = self.pool.acquire().await?;
            self.get_on(&mut conn, key).await
        })
        .await
    }

    async fn list(&self, query: &LedgerQuery) -> Result<Vec<LedgerEntry>, StoreError> {
        run("list", || self.list_once(query)).await
    }

    async fn requeue(&self, key: &EventKey) -> Result<bool, StoreError> {
        run("requeue", || async {
            let n = q(&self.sql.requeue)
                .bind(&key.event_id)
                .bind(account_of(key))
                .execute(&self.pool)
                .await?
                .rows_affected();
            Ok(n > 0)
        })
        .await
    }

    async fn prune(&self, before: OffsetDateTime) -> Result<u64, StoreError> {
        run("prune", || async {
            Ok(q(&self.sql.prune)
                .bind(to_us(before))
                .execute(&self.pool)
                .await?
                .rows_affected())
        })
        .await
    }
}

#[async_trait]
impl SubscriptionStore for SqliteStore {
    async fn load(&self, id: &str) -> Result<Option<SubscriptionRecord>, StoreError> {
        run("load", || async {
            q(&self.sql.sub_load)
                .bind(id)
                .fetch_optional(&self.pool)
                .await?
                .as_ref()
                .map(record_from_row)
                .transpose()
        })
        .await
    }

    async fn save(&self, record: &SubscriptionRecord) -> Result<u64, StoreError> {
        run("save", || self.save_once(record)).await
    }

    async fn find_by_customer(
        &self,
        customer: &str,
    ) -> Result<Vec<SubscriptionRecord>, StoreError> {
        run("find_by_customer", || {
            self.records(&self.sql.sub_by_customer, customer)
        })
        .await
    }

    async fn find_by_client_reference(
        &self,
        reference: &str,
    ) -> Result<Vec<SubscriptionRecord>, StoreError> {
        run("find_by_client_reference", || {
            self.records(&self.sql.sub_by_reference, reference)
        })
        .await
    }

    async fn list_subscriptions(
        &self,
        query: &SubscriptionQuery,
    ) -> Result<Vec<SubscriptionRecord>, StoreError> {
        run("list_subscriptions", || async {
            q(&self.sql.sub_list)
                .bind(query.verified_before.map(to_us))
                .bind(query.needs_review)
                .bind(query.needs_reconcile)
                .bind(query.after.as_deref())
                .bind(limit_of(query.limit))
                .fetch_all(&self.pool)
                .await?
                .iter()
                .map(record_from_row)
                .collect()
        })
        .await
    }

    async fn load_entitlements(
        &self,
        customer: &str,
    ) -> Result<Option<CustomerEntitlements>, StoreError> {
        run("load_entitlements", || async {
            q(&self.sql.ent_load)
                .bind(customer)
                .fetch_optional(&self.pool)
                .await?
                .as_ref()
                .map(entitlements_from_row)
                .transpose()
        })
        .await
    }

    async fn save_entitlements(
        &self,
        entitlements: &CustomerEntitlements,
    ) -> Result<u64, StoreError> {
        run("save_entitlements", || {
            self.save_entitlements_once(entitlements)
        })
        .await
    }
}

#[async_trait]
impl CursorStore for SqliteStore {
    async fn load_cursor(&self, name: &str) -> Result<Option<String>, StoreError> {
        run("load_cursor", || async {
            Ok(
                sqlx::query_scalar(AssertSqlSafe(Arc::clone(&self.sql.cursor_load)))
                    .bind(name)
                    .fetch_optional(&self.pool)
                    .await?,
            )
        })
        .await
    }

    async fn save_cursor(&self, name: &str, value: &str) -> Result<(), StoreError> {
        run("save_cursor", || async {
            q(&self.sql.cursor_save)
                .bind(name)
                .bind(value)
                .execute(&self.pool)
                .await?;
            Ok(())
        })
        .await
    }
}

#[async_trait]
impl InboxStore for SqliteStore {
    async fn enqueue(&self, request: &InboxRequest) -> Result<EnqueueOutcome, StoreError> {
        run("enqueue", || self.enqueue_once(request)).await
    }

    async fn take(
        &self,
        limit: usize,
        lease: Duration,
        max_attempts: u32,
    ) -> Result<Vec<InboxItem>, StoreError> {
        run("take", || self.take_once(limit, lease, max_attempts)).await
    }

    async fn retry_at(&self, key: &EventKey, at: OffsetDateTime) -> Result<(), StoreError> {
        run("retry_at", || async {
            q(&self.sql.retry_at)
                .bind(&key.event_id)
                .bind(account_of(key))
                .bind(to_us(at))
                .execute(&self.pool)
                .await?;
            Ok(())
        })
        .await
    }

    async fn keep_payload(&self, key: &EventKey, payload: &str) -> Result<(), StoreError> {
        run("keep_payload", || async {
            q(&self.sql.keep_payload)
                .bind(&key.event_id)
                .bind(account_of(key))
                .bind(payload)
                .execute(&self.pool)
                .await?;
            Ok(())
        })
        .await
    }

    async fn backlog(&self) -> Result<u64, StoreError> {
        run("backlog", || async {
            let n: i64 = sqlx::query_scalar(AssertSqlSafe(Arc::clone(&self.sql.backlog)))
                .fetch_one(&self.pool)
                .await?;
            Ok(u64::try_from(n).unwrap_or(0))
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_are_validated() {
        for ok in ["swg_", "", "app_1_", "_x"] {
            assert!(validate_prefix(ok).is_ok(), "{ok}");
        }
        for bad in [
            "Swg_",
            "a-b",
            "a\"b",
            "x;drop",
            "1x",
            "sqlite_x",
            "é",
            &"a".repeat(MAX_PREFIX_LEN + 1),
        ] {
            assert!(validate_prefix(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn microseconds_round_trip() {
        let t = OffsetDateTime::from_unix_timestamp_nanos(1_700_000_000_123_456_789).unwrap();
        let back = from_us(to_us(t), "t").ok().unwrap();
        assert_eq!(back.unix_timestamp_nanos(), 1_700_000_000_123_456_000);
        let before = OffsetDateTime::from_unix_timestamp_nanos(-1_500).unwrap();
        assert_eq!(to_us(before), -2);
        assert!(from_us(i64::MAX, "t").is_err());
        assert_eq!(
            to_us(time::PrimitiveDateTime::MAX.assume_utc()) / 1_000_000,
            253_402_300_799
        );
    }

    #[test]
    fn statements_are_rendered_with_the_prefix() {
        let s = Statements::new("app_");
        assert!(s.get.contains("\"app_ledger\""));
        assert!(!s.take.contains("{p}"));
    }
}
