//! The PostgreSQL store (feature `postgres`): [`PgStore`] implements
//! [`EventLedger`], [`SubscriptionStore`], [`CursorStore`] and
//! [`InboxStore`] over a `sqlx` pool, with runtime queries only and embedded
//! migrations. It passes the whole [conformance suite](super::conformance).
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use stripe_webhook_guard::store::PgStore;
//! let pool = sqlx::postgres::PgPoolOptions::new()
//!     .max_connections(10)
//!     .acquire_timeout(std::time::Duration::from_secs(5))
//!     .connect("postgres://app@localhost/app")
//!     .await?;
//! let store = PgStore::with_schema(pool, "billing")?; // or PgStore::new(pool)
//! store.migrate().await?; // idempotent: run it at every start
//! # Ok(()) }
//! ```
//!
//! Requires PostgreSQL 12 or later.
//!
//! # Tables
//!
//! Everything lives in one schema the application chooses (default
//! [`DEFAULT_SCHEMA`], `stripe_webhook_guard`; names of `[a-z0-9_]` only, at
//! most 48 bytes, not starting with `pg_`). The schema name is the only thing
//! interpolated into SQL; every value is a bind parameter. Text keys use
//! `COLLATE "C"` so ordering and paging are bytewise, as in the in-memory
//! store.
//!
//! `ledger`: one row per event, primary key `(event_id, account)`.
//!
//! | column | type | meaning |
//! |---|---|---|
//! | `event_id` | `text` | `evt_…` |
//! | `account` | `text` | `acct_…` for Connect events, `''` for the platform's own |
//! | `event_type` | `text` | Stripe's spelling |
//! | `event_created` | `bigint` | the event's `created`, Unix seconds |
//! | `fingerprint` | `bytea` | 32 bytes, [`Fingerprint`] of the first delivery |
//! | `state` | `text` | `pending`, `processing`, `processed`, `failed`, `dead`, `ignored` |
//! | `attempts` | `bigint` | claims so far |
//! | `lease_token` | `bigint` | the current (or last) fencing token, from the sequence `lease_token_seq` |
//! | `lease_expires_at` | `timestamptz` | end of the lease, on the database's clock |
//! | `last_error` | `text` | the last failure's message |
//! | `ignore_reason` | `text` | why the event was ignored |
//! | `payload` | `text` | the raw event while pending, failed or dead (dropped on completion) |
//! | `subscription_id` | `text` | inbox: serialization key |
//! | `available_at` | `timestamptz` | inbox: earliest time a worker may take the event |
//! | `first_seen_at`, `updated_at` | `timestamptz` | database clock |
//!
//! Indexes: `ledger_inbox_idx (event_created, event_id, account)` over
//! unsettled rows (`pending`, `processing`, `failed`) for `take` and
//! `backlog`; `ledger_subscription_idx (subscription_id, state)` over
//! unsettled rows for the per-subscription checks of `take`;
//! `ledger_state_idx (state, updated_at)` for listing and pruning.
//!
//! The platform's own events are stored with `account = ''` (so an
//! [`EventKey`] with `Some("")` is the platform's). Times are `timestamptz`,
//! microsecond precision.
//!
//! `subscriptions`: `id text` primary key, `customer text`,
//! `client_reference_id text`, `needs_review boolean`,
//! `needs_reconcile boolean`, `last_verified_with_stripe timestamptz`,
//! `version bigint`, `record jsonb` (the whole [`SubscriptionRecord`]; the
//! other columns are copies for lookups), `updated_at timestamptz`. Indexes
//! on `(customer, id)` and `(client_reference_id, id)`, and partial indexes
//! on `id` where `needs_review` / `needs_reconcile`.
//!
//! `entitlements`: `customer text` primary key, `version bigint`,
//! `entitlements jsonb` (the [`CustomerEntitlements`]), `updated_at`.
//!
//! `cursors`: `name text` primary key, `value text`, `updated_at`.
//!
//! `schema_migrations`: `version bigint` primary key, `name text`,
//! `applied_at timestamptz`: the migrations applied (see
//! [`PgStore::migrate`]).
//!
//! # How the rules are enforced
//!
//! - **Claims** are arbitrated by the primary key: `INSERT … ON CONFLICT DO
//!   NOTHING` takes a new event in one statement. When the row exists, a
//!   transaction locks it (`SELECT … FOR UPDATE`), reads `clock_timestamp()`
//!   and applies [`decide_claim`] from [`crate::ledger`]: the same function
//!   the in-memory store uses.
//! - **Leases** run on the database's clock (`clock_timestamp()`), never the
//!   application's. Tokens come from a sequence, so each claim gets its own.
//! - **Completion, failure and release** are fenced by the token in the
//!   `WHERE` clause; when nothing matched, the row is read back and judged by
//!   [`check_completion`] / [`check_fence`] (a repeated completion by the same
//!   lease is a no-op success, anything else is
//!   [`StoreErrorKind::LeaseLost`]).
//! - **Saves** are compare-and-set on `version` (`UPDATE … WHERE id = $1 AND
//!   version = $2`, or insert-if-absent for version 0);
//!   [`StoreErrorKind::Conflict`] on mismatch.
//! - **Inbox `take`** picks, oldest `event_created` first, the oldest due
//!   event of each subscription that has no event under a live lease, and
//!   locks the rows with `FOR UPDATE SKIP LOCKED`. Each subscription is then
//!   guarded by a transaction-scoped advisory lock
//!   (`pg_try_advisory_xact_lock`) and re-checked in a fresh statement before
//!   its event is leased, so concurrent workers never hold two events of one
//!   subscription, and never wait on each other.
//! - **Errors**: serialization failures (`40001`) and deadlocks (`40P01`) are
//!   retried up to five times, then reported as
//!   [`StoreErrorKind::Unavailable`]; connection, I/O and pool-timeout errors
//!   are `Unavailable`; undecodable rows are [`StoreErrorKind::Corrupt`].
//!   Messages carry the operation and the SQLSTATE, never a payload.
//!
//! # Effects in the same transaction
//!
//! When the application's own writes must commit or roll back together with
//! the event's completion (a credit granted exactly once, say), open a
//! transaction with [`PgStore::begin`], do the writes, call
//! [`PgStore::complete_in`] with the lease, and commit. If the lease was lost
//! (another worker took the event over), `complete_in` fails and the
//! application rolls back. The processor's own later [`EventLedger::complete`]
//! with the same lease is then a no-op.
//!
//! The pool's `acquire_timeout` bounds how long an operation waits for a
//! connection (sqlx's default is 30 seconds); a timeout is reported as
//! [`StoreErrorKind::Unavailable`].

use std::fmt;
use std::future::Future;
use std::sync::Arc;

use async_trait::async_trait;
use sqlx::postgres::{PgConnection, PgPool, PgRow, Postgres};
use sqlx::types::Json;
use sqlx::{AssertSqlSafe, Row, Transaction};
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

/// The schema [`PgStore::new`] uses.
pub const DEFAULT_SCHEMA: &str = "stripe_webhook_guard";

/// Longest schema name accepted.
const MAX_SCHEMA_LEN: usize = 48;

/// Retries of a serialization failure or deadlock before giving up.
const MAX_RETRIES: u32 = 5;

/// Leases are clamped to this many microseconds either way (100 years), so
/// interval arithmetic in the database cannot overflow.
const MAX_LEASE_MICROS: i64 = 100 * 366 * 24 * 3600 * 1_000_000;

/// One embedded migration.
struct Migration {
    version: i64,
    name: &'static str,
    sql: &'static str,
}

/// The embedded migrations, in order. `{s}` stands for the quoted schema.
const MIGRATIONS: &[Migration] = &[Migration {
    version: 1,
    name: "init",
    sql: include_str!("../../migrations/postgres/0001_init.sql"),
}];

/// The ledger columns, read as `l`.
macro_rules! ledger_columns {
    () => {
        "l.event_id, l.account, l.event_type, l.event_created, l.fingerprint, l.state, \
         l.attempts, l.lease_token, l.lease_expires_at, l.last_error, l.ignore_reason, \
         l.payload, l.subscription_id, l.available_at, l.first_seen_at, l.updated_at"
    };
}

/// "No other event of subscription `$sub` holds a live lease at `$now`".
macro_rules! no_live_sibling {
    ($sub:literal, $now:literal) => {
        concat!(
            "(",
            $sub,
            "::text IS NULL OR NOT EXISTS (SELECT 1 FROM {s}.ledger o \
             WHERE o.subscription_id = ",
            $sub,
            " AND o.state = 'processing' AND o.lease_expires_at > ",
            $now,
            " AND NOT (o.event_id = $1 AND o.account = $2)))"
        )
    };
}

const CLAIM_INSERT: &str = "WITH now AS MATERIALIZED (SELECT clock_timestamp() AS t) \
     INSERT INTO {s}.ledger AS l (event_id, account, event_type, event_created, fingerprint, \
     state, attempts, lease_token, lease_expires_at, first_seen_at, updated_at) \
     SELECT $1, $2, $3, $4, $5, 'processing', 1, nextval('{s}.lease_token_seq'), \
     now.t + $6::bigint * interval '1 microsecond', now.t, now.t FROM now \
     ON CONFLICT (event_id, account) DO NOTHING \
     RETURNING l.lease_token, l.lease_expires_at";

const LOCK_ENTRY: &str = concat!(
    "WITH locked AS MATERIALIZED (SELECT * FROM {s}.ledger \
     WHERE event_id = $1 AND account = $2 FOR UPDATE) \
     SELECT ",
    ledger_columns!(),
    ", clock_timestamp() AS now FROM locked l"
);

const RECLAIM: &str = concat!(
    "UPDATE {s}.ledger AS l SET state = 'processing', attempts = $3, \
     lease_token = nextval('{s}.lease_token_seq'), lease_expires_at = $4, updated_at = $5 \
     WHERE l.event_id = $1 AND l.account = $2 AND ",
    no_live_sibling!("$6", "$5"),
    " RETURNING l.lease_token, l.lease_expires_at"
);

const EXPIRE_TO_DEAD: &str = concat!(
    "UPDATE {s}.ledger AS l SET state = 'dead', lease_expires_at = NULL, last_error = $3, \
     updated_at = $4 WHERE l.event_id = $1 AND l.account = $2 AND ",
    no_live_sibling!("$5", "$4")
);

const COMPLETE: &str = "UPDATE {s}.ledger SET state = 'processed', lease_expires_at = NULL, \
     payload = NULL, last_error = NULL, updated_at = clock_timestamp() \
     WHERE event_id = $1 AND account = $2 AND state = 'processing' AND lease_token = $3";

const FAIL: &str = "UPDATE {s}.ledger SET state = $3, lease_expires_at = NULL, last_error = $4, \
     payload = COALESCE($5, payload), updated_at = $6 WHERE event_id = $1 AND account = $2";

const RELEASE: &str = "UPDATE {s}.ledger SET state = 'failed', \
     attempts = GREATEST(attempts - 1, 0), lease_expires_at = NULL, \
     last_error = 'released before completion (shutdown)', updated_at = clock_timestamp() \
     WHERE event_id = $1 AND account = $2 AND state = 'processing' AND lease_token = $3";

const IGNORE: &str = "WITH now AS MATERIALIZED (SELECT clock_timestamp() AS t) \
     INSERT INTO {s}.ledger (event_id, account, event_type, event_created, fingerprint, \
     state, attempts, ignore_reason, first_seen_at, updated_at) \
     SELECT $1, $2, $3, $4, $5, 'ignored', 0, $6, now.t, now.t FROM now \
     ON CONFLICT (event_id, account) DO NOTHING";

const STATE_OF: &str =
    "SELECT state, fingerprint FROM {s}.ledger WHERE event_id = $1 AND account = $2";

const GET: &str = concat!(
    "SELECT ",
    ledger_columns!(),
    " FROM {s}.ledger l WHERE l.event_id = $1 AND l.account = $2"
);

const LIST: &str = concat!(
    "SELECT ",
    ledger_columns!(),
    " FROM {s}.ledger l \
     WHERE (cardinality($1::text[]) = 0 OR l.state = ANY($1::text[])) \
     AND ($2::text IS NULL OR l.event_id > $2::text) \
     ORDER BY l.event_id, l.account LIMIT $3"
);

const REQUEUE: &str = "UPDATE {s}.ledger SET state = 'failed', attempts = 0, \
     available_at = NULL, updated_at = clock_timestamp() \
     WHERE event_id = $1 AND account = $2 AND state IN ('dead', 'failed')";

const PRUNE: &str =
    "DELETE FROM {s}.ledger WHERE state IN ('processed', 'ignored') AND updated_at < $1";

const ENQUEUE: &str = "WITH now AS MATERIALIZED (SELECT clock_timestamp() AS t) \
     INSERT INTO {s}.ledger (event_id, account, event_type, event_created, fingerprint, \
     state, attempts, payload, subscription_id, available_at, first_seen_at, updated_at) \
     SELECT $1, $2, $3, $4, $5, 'pending', 0, $6, $7, $8, now.t, now.t FROM now \
     ON CONFLICT (event_id, account) DO NOTHING";

/// The oldest due event of each subscription without a live lease (and
/// every due event without a subscription), oldest first, locked.
const TAKE: &str = concat!(
    "WITH now AS MATERIALIZED (SELECT clock_timestamp() AS t) SELECT ",
    ledger_columns!(),
    ", now.t AS now FROM {s}.ledger l CROSS JOIN now \
     WHERE l.state IN ('pending', 'processing', 'failed') AND l.payload IS NOT NULL \
     AND (l.state <> 'processing' OR l.lease_expires_at IS NULL OR l.lease_expires_at <= now.t) \
     AND (l.available_at IS NULL OR l.available_at <= now.t) \
     AND (l.subscription_id IS NULL OR NOT EXISTS (SELECT 1 FROM {s}.ledger o \
       WHERE o.subscription_id = l.subscription_id \
       AND o.state IN ('pending', 'processing', 'failed') \
       AND NOT (o.event_id = l.event_id AND o.account = l.account) \
       AND ((o.state = 'processing' AND o.lease_expires_at > now.t) \
         OR (o.payload IS NOT NULL \
           AND (o.state <> 'processing' OR o.lease_expires_at IS NULL OR o.lease_expires_at <= now.t) \
           AND (o.available_at IS NULL OR o.available_at <= now.t) \
           AND (o.event_created, o.event_id, o.account) < (l.event_created, l.event_id, l.account))))) \
     ORDER BY l.event_created, l.event_id, l.account LIMIT $1 \
     FOR UPDATE OF l SKIP LOCKED"
);

const TRY_LOCK_SUBSCRIPTION: &str = "SELECT pg_try_advisory_xact_lock(hashtextextended($1, 0))";

const RETRY_AT: &str =
    "UPDATE {s}.ledger SET available_at = $3 WHERE event_id = $1 AND account = $2";

const KEEP_PAYLOAD: &str = "UPDATE {s}.ledger SET payload = $3 WHERE event_id = $1 AND account = $2 AND state = 'processed'";

const BACKLOG: &str =
    "SELECT count(*) FROM {s}.ledger WHERE state IN ('pending', 'processing', 'failed')";

const SUB_LOAD: &str = "SELECT version, record FROM {s}.subscriptions WHERE id = $1";

const SUB_INSERT: &str = "INSERT INTO {s}.subscriptions (id, customer, client_reference_id, \
     needs_review, needs_reconcile, last_verified_with_stripe, version, record, updated_at) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, clock_timestamp()) ON CONFLICT (id) DO NOTHING";

const SUB_UPDATE: &str = "UPDATE {s}.subscriptions SET customer = $2, client_reference_id = $3, \
     needs_review = $4, needs_reconcile = $5, last_verified_with_stripe = $6, version = $7, \
     record = $8, updated_at = clock_timestamp() WHERE id = $1 AND version = $9";

const SUB_BY_CUSTOMER: &str =
    "SELECT version, record FROM {s}.subscriptions WHERE customer = $1 ORDER BY id";

const SUB_BY_REFERENCE: &str =
    "SELECT version, record FROM {s}.subscriptions WHERE client_reference_id = $1 ORDER BY id";

const SUB_LIST: &str = "SELECT version, record FROM {s}.subscriptions \
     WHERE ($1::timestamptz IS NULL OR last_verified_with_stripe IS NULL \
       OR last_verified_with_stripe < $1::timestamptz) \
     AND (NOT $2 OR needs_review) AND (NOT $3 OR needs_reconcile) \
     AND ($4::text IS NULL OR id > $4::text) ORDER BY id LIMIT $5";

const ENT_LOAD: &str = "SELECT version, entitlements FROM {s}.entitlements WHERE customer = $1";

const ENT_INSERT: &str = "INSERT INTO {s}.entitlements (customer, version, entitlements, \
     updated_at) VALUES ($1, $2, $3, clock_timestamp()) ON CONFLICT (customer) DO NOTHING";

const ENT_UPDATE: &str = "UPDATE {s}.entitlements SET version = $2, entitlements = $3, \
     updated_at = clock_timestamp() WHERE customer = $1 AND version = $4";

const CURSOR_LOAD: &str = "SELECT value FROM {s}.cursors WHERE name = $1";

const CURSOR_SAVE: &str = "INSERT INTO {s}.cursors (name, value, updated_at) \
     VALUES ($1, $2, clock_timestamp()) \
     ON CONFLICT (name) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at";

/// The statements with the schema filled in, rendered once per store.
struct Statements {
    claim_insert: Arc<str>,
    lock_entry: Arc<str>,
    reclaim: Arc<str>,
    expire_to_dead: Arc<str>,
    complete: Arc<str>,
    fail: Arc<str>,
    release: Arc<str>,
    ignore: Arc<str>,
    state_of: Arc<str>,
    get: Arc<str>,
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
    fn new(quoted: &str) -> Self {
        let r = |t: &str| -> Arc<str> { t.replace("{s}", quoted).into() };
        Self {
            claim_insert: r(CLAIM_INSERT),
            lock_entry: r(LOCK_ENTRY),
            reclaim: r(RECLAIM),
            expire_to_dead: r(EXPIRE_TO_DEAD),
            complete: r(COMPLETE),
            fail: r(FAIL),
            release: r(RELEASE),
            ignore: r(IGNORE),
            state_of: r(STATE_OF),
            get: r(GET),
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
fn q(sql: &Arc<str>) -> sqlx::query::Query<'static, Postgres, sqlx::postgres::PgArguments> {
    sqlx::query(AssertSqlSafe(Arc::clone(sql)))
}

/// The PostgreSQL store. Cheap to clone (the pool is shared). See the
/// [module docs](self) for the tables and how each rule is enforced.
#[derive(Clone)]
pub struct PgStore {
    pool: PgPool,
    schema: Arc<str>,
    sql: Arc<Statements>,
}

impl fmt::Debug for PgStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgStore")
            .field("schema", &self.schema)
            .field("pool_size", &self.pool.size())
            .finish_non_exhaustive()
    }
}

use super::sql::{Fail, lease_lost, not_found, other};

fn corrupt(what: &str) -> Fail {
    super::sql::corrupt("postgres", what)
}

/// The database error's code and primary message only (no detail, which can
/// quote row contents).
#[derive(Debug)]
struct DbErrorSummary {
    code: String,
    message: String,
}

impl fmt::Display for DbErrorSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SQLSTATE {}: {}", self.code, self.message)
    }
}

impl std::error::Error for DbErrorSummary {}

fn sqlstate(e: &sqlx::Error) -> Option<String> {
    match e {
        sqlx::Error::Database(db) => db.code().map(std::borrow::Cow::into_owned),
        _ => None,
    }
}

/// Serialization failure or deadlock: the transaction may simply be re-run.
fn is_transient(e: &sqlx::Error) -> bool {
    matches!(sqlstate(e).as_deref(), Some("40001" | "40P01"))
}

/// Maps a driver error to a [`StoreError`] for operation `op`.
fn map_db_error(op: &str, e: sqlx::Error) -> StoreError {
    use StoreErrorKind as K;
    let (kind, what): (K, String) = match &e {
        sqlx::Error::PoolTimedOut => (K::Unavailable, "timed out waiting for a connection".into()),
        sqlx::Error::PoolClosed => (K::Unavailable, "the pool is closed".into()),
        sqlx::Error::Io(_) => (K::Unavailable, "connection i/o error".into()),
        sqlx::Error::Tls(_) => (K::Unavailable, "tls error".into()),
        sqlx::Error::WorkerCrashed => (K::Unavailable, "connection worker crashed".into()),
        sqlx::Error::RowNotFound => (K::NotFound, "no row".into()),
        sqlx::Error::ColumnDecode { .. }
        | sqlx::Error::Decode(_)
        | sqlx::Error::ColumnNotFound(_)
        | sqlx::Error::ColumnIndexOutOfBounds { .. }
        | sqlx::Error::TypeNotFound { .. } => {
            (K::Corrupt, "a stored value could not be decoded".into())
        }
        sqlx::Error::Database(db) => {
            let code = db
                .code()
                .map(std::borrow::Cow::into_owned)
                .unwrap_or_default();
            let kind = match code.as_str() {
                "40001" | "40P01" => K::Unavailable,
                "57014" | "55P03" | "25P03" => K::Timeout,
                "23505" => K::Conflict,
                "XX001" | "XX002" => K::Corrupt,
                c if c.starts_with("08") || c.starts_with("53") || c.starts_with("57P") => {
                    K::Unavailable
                }
                _ => K::Other,
            };
            let hint = match code.as_str() {
                "40001" | "40P01" => " (still failing after retries)",
                "42P01" | "3F000" | "42883" => " (schema or table missing: run migrate())",
                _ => "",
            };
            let summary = DbErrorSummary {
                code: code.clone(),
                message: db.message().to_owned(),
            };
            return StoreError::new(kind, format!("postgres {op}: SQLSTATE {code}{hint}"))
                .with_source(summary);
        }
        _ => (K::Other, "driver error".into()),
    };
    StoreError::new(kind, format!("postgres {op}: {what}")).with_source(e)
}

/// A short, jittered pause before retry `attempt` (1-based).
async fn backoff(attempt: u32) {
    use std::hash::BuildHasher;
    let base = 2u64 << attempt.min(6);
    let jitter = std::hash::RandomState::new().hash_one(std::time::Instant::now()) % base.max(1);
    tokio::time::sleep(std::time::Duration::from_millis(base + jitter)).await;
}

/// Runs `f`, re-running it on serialization failures and deadlocks.
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
    i64::try_from(v).map_err(|_| other(format!("postgres: {what} out of range")))
}

fn lease_micros(lease: Duration) -> i64 {
    let us = lease.whole_microseconds();
    let clamped = us.clamp(-i128::from(MAX_LEASE_MICROS), i128::from(MAX_LEASE_MICROS));
    i64::try_from(clamped).unwrap_or(MAX_LEASE_MICROS)
}

/// `now + lease`, with the lease clamped like [`lease_micros`].
fn expiry(now: OffsetDateTime, lease: Duration) -> OffsetDateTime {
    now.saturating_add(Duration::microseconds(lease_micros(lease)))
}

fn token_of(raw: i64) -> Result<LeaseToken, Fail> {
    u64::try_from(raw)
        .map(LeaseToken)
        .map_err(|_| corrupt("lease token"))
}

fn entry_from_row(row: &PgRow) -> Result<LedgerEntry, Fail> {
    let account: String = row.try_get("account")?;
    let fingerprint: Vec<u8> = row.try_get("fingerprint")?;
    let fingerprint = <[u8; 32]>::try_from(fingerprint.as_slice())
        .map(Fingerprint)
        .map_err(|_| corrupt("fingerprint"))?;
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
        fingerprint,
        state,
        attempts,
        lease_token,
        lease_expires_at: row.try_get("lease_expires_at")?,
        last_error: row.try_get("last_error")?,
        ignore_reason: row.try_get("ignore_reason")?,
        payload: row.try_get("payload")?,
        subscription_id: row.try_get("subscription_id")?,
        available_at: row.try_get("available_at")?,
        first_seen_at: row.try_get("first_seen_at")?,
        updated_at: row.try_get("updated_at")?,
    })
}

fn record_from_row(row: &PgRow) -> Result<SubscriptionRecord, Fail> {
    let version: i64 = row.try_get("version")?;
    let Json(mut record): Json<SubscriptionRecord> = row.try_get("record")?;
    record.version = u64::try_from(version).map_err(|_| corrupt("subscription version"))?;
    Ok(record)
}

fn entitlements_from_row(row: &PgRow) -> Result<CustomerEntitlements, Fail> {
    let version: i64 = row.try_get("version")?;
    let Json(mut e): Json<CustomerEntitlements> = row.try_get("entitlements")?;
    e.version = u64::try_from(version).map_err(|_| corrupt("entitlements version"))?;
    Ok(e)
}

/// Checks a schema name: `[a-z0-9_]`, starting with a letter or `_`, 1 to 48
/// bytes, not starting with `pg_`.
fn validate_schema(schema: &str) -> Result<(), StoreError> {
    let ok = !schema.is_empty()
        && schema.len() <= MAX_SCHEMA_LEN
        && schema
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        && !schema.as_bytes()[0].is_ascii_digit()
        && !schema.starts_with("pg_");
    if ok {
        Ok(())
    } else {
        Err(StoreError::new(
            StoreErrorKind::Other,
            format!(
                "invalid PostgreSQL schema name: use 1 to {MAX_SCHEMA_LEN} characters of \
                 [a-z0-9_], starting with a letter or '_', not 'pg_'"
            ),
        ))
    }
}

impl PgStore {
    /// A store over `pool` in the schema [`DEFAULT_SCHEMA`]. Call
    /// [`PgStore::migrate`] before use.
    pub fn new(pool: PgPool) -> Self {
        Self::build(pool, DEFAULT_SCHEMA)
    }

    /// A store over `pool` in `schema` (created by [`PgStore::migrate`] if
    /// absent).
    ///
    /// # Errors
    ///
    /// [`StoreErrorKind::Other`] when `schema` is not 1 to 48 characters of
    /// `[a-z0-9_]` starting with a letter or `_`, or starts with `pg_`.
    pub fn with_schema(pool: PgPool, schema: &str) -> Result<Self, StoreError> {
        validate_schema(schema)?;
        Ok(Self::build(pool, schema))
    }

    fn build(pool: PgPool, schema: &str) -> Self {
        let quoted = format!("\"{schema}\"");
        Self {
            pool,
            schema: schema.into(),
            sql: Arc::new(Statements::new(&quoted)),
        }
    }

    /// The schema the tables live in.
    pub fn schema(&self) -> &str {
        &self.schema
    }

    /// The pool.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Creates the schema if needed and applies the embedded migrations not
    /// yet recorded in `schema_migrations`, all in one transaction under an
    /// advisory lock, so concurrent starts are safe. Idempotent: run it at
    /// every start. Returns how many migrations were applied now.
    ///
    /// The schema is created only when it does not exist, so a role without
    /// `CREATE` on the database can use a schema prepared for it.
    ///
    /// # Errors
    ///
    /// [`StoreError`] when the database refuses (privileges) or fails.
    pub async fn migrate(&self) -> Result<usize, StoreError> {
        run("migrate", || self.migrate_once()).await
    }

    async fn migrate_once(&self) -> Result<usize, Fail> {
        let quoted = format!("\"{}\"", self.schema);
        let mut tx = self.pool.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))")
            .bind(format!("stripe_webhook_guard:migrate:{}", self.schema))
            .execute(&mut *tx)
            .await?;
        let exists: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)")
                .bind(&*self.schema)
                .fetch_one(&mut *tx)
                .await?;
        if !exists {
            sqlx::raw_sql(AssertSqlSafe(format!("CREATE SCHEMA {quoted}")))
                .execute(&mut *tx)
                .await?;
        }
        sqlx::raw_sql(AssertSqlSafe(format!(
            "CREATE TABLE IF NOT EXISTS {quoted}.schema_migrations (\
             version bigint PRIMARY KEY, name text NOT NULL, \
             applied_at timestamptz NOT NULL DEFAULT clock_timestamp())"
        )))
        .execute(&mut *tx)
        .await?;
        let applied: Vec<i64> = sqlx::query_scalar(AssertSqlSafe(format!(
            "SELECT version FROM {quoted}.schema_migrations"
        )))
        .fetch_all(&mut *tx)
        .await?;
        let mut count = 0;
        for m in MIGRATIONS.iter().filter(|m| !applied.contains(&m.version)) {
            sqlx::raw_sql(AssertSqlSafe(m.sql.replace("{s}", &quoted)))
                .execute(&mut *tx)
                .await?;
            sqlx::query(AssertSqlSafe(format!(
                "INSERT INTO {quoted}.schema_migrations (version, name) VALUES ($1, $2)"
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

    /// Begins a transaction on the store's pool, for
    /// [`PgStore::complete_in`]: the application's writes and the event's
    /// completion then commit or roll back together.
    ///
    /// # Errors
    ///
    /// [`StoreErrorKind::Unavailable`] when no connection can be had.
    pub async fn begin(&self) -> Result<Transaction<'static, Postgres>, StoreError> {
        self.pool
            .begin()
            .await
            .map_err(|e| map_db_error("begin", e))
    }

    /// Marks the leased event processed inside the caller's transaction
    /// (`&mut *tx` from [`PgStore::begin`] or any transaction on the same
    /// database), with the rules of [`EventLedger::complete`]: fenced by the
    /// lease token, and a no-op when this lease already completed the event.
    ///
    /// Use it when the application's own effects (granting access, writing
    /// a credit) must happen exactly once: write them and call this in one
    /// transaction, then commit. If the commit succeeds, the event is
    /// processed and the effects are in; if anything fails, both roll back
    /// and the event is retried. The processor's later
    /// [`EventLedger::complete`] with the same lease is then a no-op.
    ///
    /// The row stays locked until the transaction ends, so keep it short: a
    /// redelivery of the same event waits for it. Nothing is retried here; a
    /// serialization failure aborts the caller's transaction and is reported
    /// as [`StoreErrorKind::Unavailable`] (re-run the whole transaction).
    ///
    /// # Errors
    ///
    /// [`StoreErrorKind::LeaseLost`] when another claim took the event over
    /// (roll back), [`StoreErrorKind::NotFound`] when there is no entry,
    /// other kinds when the database fails.
    pub async fn complete_in(
        &self,
        conn: &mut PgConnection,
        lease: &Lease,
    ) -> Result<(), StoreError> {
        finish("complete_in", self.complete_on(conn, lease).await)
    }

    async fn complete_on(&self, conn: &mut PgConnection, lease: &Lease) -> Result<(), Fail> {
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
        Err(other("postgres complete: the entry kept changing"))
    }

    async fn get_on(
        &self,
        conn: &mut PgConnection,
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

    async fn claim_once(&self, request: &ClaimRequest) -> Result<ClaimOutcome, Fail> {
        let account = account_of(&request.key);
        for _ in 0..3 {
            let inserted = q(&self.sql.claim_insert)
                .bind(&request.key.event_id)
                .bind(account)
                .bind(&request.event_type)
                .bind(request.event_created)
                .bind(&request.fingerprint.0[..])
                .bind(lease_micros(request.lease))
                .fetch_optional(&self.pool)
                .await?;
            if let Some(row) = inserted {
                return Ok(ClaimOutcome::Claimed(Lease {
                    key: request.key.clone(),
                    token: token_of(row.try_get("lease_token")?)?,
                    attempt: 1,
                    expires_at: row.try_get("lease_expires_at")?,
                }));
            }
            let mut tx = self.pool.begin().await?;
            let Some(row) = q(&self.sql.lock_entry)
                .bind(&request.key.event_id)
                .bind(account)
                .fetch_optional(&mut *tx)
                .await?
            else {
                // Pruned in between: insert again.
                tx.rollback().await?;
                continue;
            };
            let entry = entry_from_row(&row)?;
            let now: OffsetDateTime = row.try_get("now")?;
            let outcome = self
                .apply_decision(&mut tx, &entry, request, now, None)
                .await?;
            tx.commit().await?;
            return Ok(outcome.unwrap_or(ClaimOutcome::InFlight { until: now }));
        }
        Err(other("postgres claim: the entry kept changing"))
    }

    /// Applies [`decide_claim`] to a locked entry. With `subscription`, the
    /// write happens only if no other event of it holds a live lease
    /// (`None` returned otherwise).
    async fn apply_decision(
        &self,
        conn: &mut PgConnection,
        entry: &LedgerEntry,
        request: &ClaimRequest,
        now: OffsetDateTime,
        subscription: Option<&str>,
    ) -> Result<Option<ClaimOutcome>, Fail> {
        let key = &request.key;
        Ok(
            match decide_claim(Some(entry), &request.fingerprint, now, request.max_attempts) {
                ClaimDecision::Insert => {
                    return Err(other("postgres claim: entry vanished"));
                }
                ClaimDecision::Reclaim { attempt } => {
                    let row = q(&self.sql.reclaim)
                        .bind(&key.event_id)
                        .bind(account_of(key))
                        .bind(i64::from(attempt))
                        .bind(expiry(now, request.lease))
                        .bind(now)
                        .bind(subscription)
                        .fetch_optional(&mut *conn)
                        .await?;
                    match row {
                        Some(row) => Some(ClaimOutcome::Claimed(Lease {
                            key: key.clone(),
                            token: token_of(row.try_get("lease_token")?)?,
                            attempt,
                            expires_at: row.try_get("lease_expires_at")?,
                        })),
                        None => None,
                    }
                }
                ClaimDecision::ExpireToDead => {
                    let message = format!(
                        "lease expired on attempt {} of {}: the worker never finished",
                        entry.attempts, request.max_attempts
                    );
                    let n = q(&self.sql.expire_to_dead)
                        .bind(&key.event_id)
                        .bind(account_of(key))
                        .bind(message)
                        .bind(now)
                        .bind(subscription)
                        .execute(&mut *conn)
                        .await?
                        .rows_affected();
                    (n > 0).then_some(ClaimOutcome::DeadLettered {
                        attempts: entry.attempts,
                    })
                }
                ClaimDecision::Duplicate(state) => Some(ClaimOutcome::Duplicate { state }),
                ClaimDecision::InFlight { until } => Some(ClaimOutcome::InFlight { until }),
                ClaimDecision::Conflict => Some(ClaimOutcome::Conflict {
                    stored: entry.fingerprint,
                }),
            },
        )
    }

    async fn fail_once(&self, lease: &Lease, failure: &Failure) -> Result<FailOutcome, Fail> {
        let mut tx = self.pool.begin().await?;
        let row = q(&self.sql.lock_entry)
            .bind(&lease.key.event_id)
            .bind(account_of(&lease.key))
            .fetch_optional(&mut *tx)
            .await?
            .ok_or_else(not_found)?;
        let entry = entry_from_row(&row)?;
        let now: OffsetDateTime = row.try_get("now")?;
        check_fence(&entry, lease).map_err(lease_lost)?;
        let state = state_after_failure(entry.attempts, failure.max_attempts, failure.retryable);
        q(&self.sql.fail)
            .bind(&lease.key.event_id)
            .bind(account_of(&lease.key))
            .bind(state.as_str())
            .bind(&failure.error)
            .bind(failure.payload.as_deref())
            .bind(now)
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
        Err(other("postgres release: the entry kept changing"))
    }

    async fn ignore_once(&self, request: &IgnoreRequest) -> Result<LedgerState, Fail> {
        let account = account_of(&request.key);
        for _ in 0..3 {
            let n = q(&self.sql.ignore)
                .bind(&request.key.event_id)
                .bind(account)
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
        Err(other("postgres ignore: the entry kept changing"))
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
        let fingerprint = <[u8; 32]>::try_from(fingerprint.as_slice())
            .map(Fingerprint)
            .map_err(|_| corrupt("fingerprint"))?;
        Ok(Some((state, fingerprint)))
    }

    async fn list_once(&self, query: &LedgerQuery) -> Result<Vec<LedgerEntry>, Fail> {
        let states: Vec<&str> = query.states.iter().map(|s| s.as_str()).collect();
        let limit = (query.limit > 0).then(|| i64::try_from(query.limit).unwrap_or(i64::MAX));
        q(&self.sql.list)
            .bind(states)
            .bind(query.after.as_deref())
            .bind(limit)
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
                .bind(request.available_at)
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
        Err(other("postgres enqueue: the entry kept changing"))
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
        let mut tx = self.pool.begin().await?;
        let rows = q(&self.sql.take)
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .fetch_all(&mut *tx)
            .await?;
        let mut out = Vec::with_capacity(rows.len());
        for row in &rows {
            let entry = entry_from_row(row)?;
            let now: OffsetDateTime = row.try_get("now")?;
            if let Some(sub) = &entry.subscription_id {
                // Whoever holds this lock is leasing an event of the same
                // subscription right now: leave it to them.
                let mine: bool = sqlx::query_scalar(TRY_LOCK_SUBSCRIPTION)
                    .bind(format!("stripe_webhook_guard:{}:{sub}", self.schema))
                    .fetch_one(&mut *tx)
                    .await?;
                if !mine {
                    continue;
                }
            }
            let request = ClaimRequest {
                key: entry.key.clone(),
                event_type: entry.event_type.clone(),
                event_created: entry.event_created,
                fingerprint: entry.fingerprint,
                lease,
                max_attempts,
            };
            let outcome = self
                .apply_decision(
                    &mut tx,
                    &entry,
                    &request,
                    now,
                    entry.subscription_id.as_deref(),
                )
                .await?;
            if let Some(ClaimOutcome::Claimed(lease)) = outcome {
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
            .ok_or_else(|| other("postgres save: version out of range"))?;
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
            .bind(record.last_verified_with_stripe)
            .bind(to_i64(next, "version")?)
            .bind(Json(&saved));
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
            .ok_or_else(|| other("postgres save_entitlements: version out of range"))?;
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
            .bind(Json(&saved));
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
impl EventLedger for PgStore {
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
                .bind(before)
                .execute(&self.pool)
                .await?
                .rows_affected())
        })
        .await
    }
}

#[async_trait]
impl SubscriptionStore for PgStore {
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
        let limit = (query.limit > 0).then(|| i64::try_from(query.limit).unwrap_or(i64::MAX));
        run("list_subscriptions", || async {
            q(&self.sql.sub_list)
                .bind(query.verified_before)
                .bind(query.needs_review)
                .bind(query.needs_reconcile)
                .bind(query.after.as_deref())
                .bind(limit)
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
impl CursorStore for PgStore {
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
impl InboxStore for PgStore {
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
                .bind(at)
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
    fn schema_names_are_validated() {
        for ok in ["stripe_webhook_guard", "a", "_x", "billing_2"] {
            assert!(validate_schema(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "Billing",
            "a-b",
            "a;drop",
            "a\"b",
            "1abc",
            "pg_catalog",
            "é",
            &"a".repeat(MAX_SCHEMA_LEN + 1),
        ] {
            assert!(validate_schema(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn statements_are_rendered_with_the_quoted_schema() {
        let s = Statements::new("\"x\"");
        assert!(s.claim_insert.contains("\"x\".ledger"));
        assert!(s.claim_insert.contains("nextval('\"x\".lease_token_seq')"));
        assert!(!s.take.contains("{s}"));
        assert!(!s.reclaim.contains("{s}"));
    }

    #[test]
    fn leases_are_clamped() {
        assert_eq!(lease_micros(Duration::milliseconds(300)), 300_000);
        assert_eq!(lease_micros(Duration::MAX), MAX_LEASE_MICROS);
        assert_eq!(lease_micros(Duration::MIN), -MAX_LEASE_MICROS);
    }
}
