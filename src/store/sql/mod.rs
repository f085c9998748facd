//! The SQL stores (features `postgres` and `sqlite`): one implementation of
//! [`EventLedger`], [`SubscriptionStore`], [`CursorStore`] and
//! [`InboxStore`] over a small private [`Dialect`]. A dialect supplies only
//! what differs between databases: how tables are named, the clock
//! expression, a few statement fragments, how values are bound and read,
//! how driver errors are classified, and connection and migration set-up.
//! Everything else, the statements' shape and the ledger rules, lives here
//! once.
//!
//! Every read-modify-write runs in a transaction that locks the row first
//! (PostgreSQL: `SELECT … FOR UPDATE`; SQLite: `BEGIN IMMEDIATE`, which takes
//! the write lock up front), reads the database's clock after the lock is
//! held, and applies the pure functions of [`crate::ledger`] ([`decide_claim`],
//! [`check_completion`], [`check_fence`], [`state_after_failure`]): the same
//! functions the in-memory store uses.

use std::collections::BTreeSet;
use std::fmt;
use std::future::Future;
use std::ops::DerefMut;
use std::sync::Arc;

use async_trait::async_trait;
use serde::de::DeserializeOwned;
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

/// The statement plumbing of a dialect over sqlx: `query` binds [`Arg`]s
/// (times through `$time`, JSON through `$json`).
macro_rules! sqlx_query {
    ($db:ty, $args:ty, $time:expr, $json:expr) => {
        fn query(sql: &Arc<str>, args: Vec<Arg<'_>>) -> sqlx::query::Query<'static, $db, $args> {
            let mut q = sqlx::query(sqlx::AssertSqlSafe(Arc::clone(sql)));
            for arg in args {
                q = match arg {
                    Arg::Str(v) => q.bind(v),
                    Arg::OptStr(v) => q.bind(v),
                    Arg::Int(v) => q.bind(v),
                    Arg::Bool(v) => q.bind(v),
                    Arg::Bytes(v) => q.bind(v),
                    Arg::Time(v) => q.bind($time(v)),
                    Arg::OptTime(v) => q.bind(v.map($time)),
                    Arg::Json(v) => q.bind($json(v)),
                };
            }
            q
        }
    };
}

/// The [`Dialect`] methods that are the same over every sqlx driver, inside
/// the dialect's `impl` (which also has a `query` from [`sqlx_query!`]).
macro_rules! sqlx_plumbing {
    ($db:ty, $pool:ty, $conn:ty, $row:ty) => {
        type Pool = $pool;
        type Conn = $conn;
        type PoolConn = sqlx::pool::PoolConnection<$db>;
        type Tx = sqlx::Transaction<'static, $db>;
        type Row = $row;

        fn acquire(
            pool: &Self::Pool,
        ) -> impl Future<Output = Result<Self::PoolConn, sqlx::Error>> + Send {
            pool.acquire()
        }

        async fn commit(tx: Self::Tx) -> Result<(), sqlx::Error> {
            tx.commit().await
        }

        fn pool_size(pool: &Self::Pool) -> u32 {
            pool.size()
        }

        async fn execute<'a>(
            conn: &'a mut $conn,
            sql: &'a Arc<str>,
            args: Vec<Arg<'a>>,
        ) -> Result<u64, sqlx::Error> {
            Ok(query(sql, args).execute(conn).await?.rows_affected())
        }

        async fn fetch_optional<'a>(
            conn: &'a mut $conn,
            sql: &'a Arc<str>,
            args: Vec<Arg<'a>>,
        ) -> Result<Option<$row>, sqlx::Error> {
            query(sql, args).fetch_optional(conn).await
        }

        async fn fetch_all<'a>(
            conn: &'a mut $conn,
            sql: &'a Arc<str>,
            args: Vec<Arg<'a>>,
        ) -> Result<Vec<$row>, sqlx::Error> {
            query(sql, args).fetch_all(conn).await
        }

        async fn script(conn: &mut $conn, sql: String) -> Result<(), sqlx::Error> {
            sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
                .execute(conn)
                .await?;
            Ok(())
        }

        fn text(row: &$row, column: &str) -> Result<Option<String>, sqlx::Error> {
            sqlx::Row::try_get(row, column)
        }

        fn int(row: &$row, column: &str) -> Result<Option<i64>, sqlx::Error> {
            sqlx::Row::try_get(row, column)
        }

        fn bytes(row: &$row, column: &str) -> Result<Vec<u8>, sqlx::Error> {
            sqlx::Row::try_get(row, column)
        }
    };
}

#[cfg(feature = "postgres")]
pub mod postgres;
#[cfg(feature = "sqlite")]
pub mod sqlite;

/// Retries of a transient failure (serialization failure, deadlock, lock
/// conflict) before it is reported as [`StoreErrorKind::Unavailable`].
const MAX_RETRIES: u32 = 5;

/// The first pause before re-running a transaction after a transient
/// failure; it doubles with each retry up to [`RETRY_CAP`] (with jitter).
const RETRY_BASE: std::time::Duration = std::time::Duration::from_millis(4);

/// The longest pause between two runs of a transaction.
const RETRY_CAP: std::time::Duration = std::time::Duration::from_millis(200);

/// Leases are clamped to this many microseconds either way (100 years), so
/// time arithmetic in the database cannot overflow.
const MAX_LEASE_MICROS: i64 = 100 * 366 * 24 * 3600 * 1_000_000;

/// How many distinct states one [`LedgerQuery`] can filter on (there are six).
const STATE_SLOTS: usize = 8;

/// Why an operation stopped: a driver error (classified, maybe retried) or a
/// decided store error.
pub enum Fail {
    /// A driver error.
    Db(sqlx::Error),
    /// A decided store error.
    Store(StoreError),
}

impl From<sqlx::Error> for Fail {
    fn from(e: sqlx::Error) -> Self {
        Fail::Db(e)
    }
}

impl From<StoreError> for Fail {
    fn from(e: StoreError) -> Self {
        Fail::Store(e)
    }
}

/// A stored value that cannot be read back.
pub fn corrupt(backend: &str, what: &str) -> Fail {
    Fail::Store(StoreError::new(
        StoreErrorKind::Corrupt,
        format!("{backend}: stored {what} is invalid"),
    ))
}

fn other(message: impl Into<String>) -> Fail {
    Fail::Store(StoreError::new(StoreErrorKind::Other, message))
}

fn lease_lost(e: crate::ledger::FenceError) -> Fail {
    Fail::Store(StoreError::new(StoreErrorKind::LeaseLost, e.to_string()))
}

fn not_found() -> Fail {
    Fail::Store(StoreError::new(StoreErrorKind::NotFound, "no ledger entry"))
}

/// A value bound to a statement parameter; the dialect encodes it.
pub enum Arg<'a> {
    /// Text.
    Str(&'a str),
    /// Text or NULL.
    OptStr(Option<&'a str>),
    /// An integer.
    Int(i64),
    /// A boolean.
    Bool(bool),
    /// Bytes.
    Bytes(&'a [u8]),
    /// A point in time.
    Time(OffsetDateTime),
    /// A point in time or NULL.
    OptTime(Option<OffsetDateTime>),
    /// A JSON document.
    Json(serde_json::Value),
}

/// One embedded migration.
pub struct Migration {
    /// Its number, recorded in the migrations table.
    pub version: i64,
    /// Its name.
    pub name: &'static str,
    /// The script; the dialect fills in the table naming.
    pub sql: &'static str,
}

/// What a database contributes to the SQL store. Private: applications use
/// [`PgStore`](super::PgStore) and [`SqliteStore`](super::SqliteStore).
pub trait Dialect: Send + Sync + 'static {
    /// The store's name in `Debug` output (`PgStore`).
    const STORE: &'static str;
    /// The database's name in messages (`postgres`).
    const NAME: &'static str;
    /// What the naming is called in `Debug` output (`schema`).
    const NAMING: &'static str;
    /// The database's clock as an SQL expression, the same value for every
    /// use within one statement when used as `(SELECT {now} AS t)`.
    const NOW: &'static str;
    /// Appended to the row lock of claims (`FOR UPDATE`), or empty when the
    /// transaction already holds the write lock.
    const LOCK_ROW: &'static str;
    /// Appended to the inbox `take` query (`FOR UPDATE OF l SKIP LOCKED`).
    const LOCK_TAKE: &'static str;
    /// A statement (`$1`: a key) answering whether this transaction may
    /// lease events of one subscription, when the database needs it.
    const TRY_LOCK_SUBSCRIPTION: Option<&'static str>;
    /// The embedded migrations, in order.
    const MIGRATIONS: &'static [Migration];

    /// The connection pool.
    type Pool: Clone + Send + Sync + 'static;
    /// One connection.
    type Conn: Send;
    /// A connection taken from the pool.
    type PoolConn: DerefMut<Target = Self::Conn> + Send;
    /// A write transaction.
    type Tx: DerefMut<Target = Self::Conn> + Send;
    /// A result row.
    type Row: Send + Sync;

    /// A table's name, quoted, for the store's naming (schema or prefix).
    fn table(naming: &str, table: &str) -> String;
    /// The expression giving the next lease token inside `INSERT` and
    /// `UPDATE` statements, for the store's naming (`$7` when the token is
    /// drawn by [`Dialect::next_token`] first and bound).
    fn token_expr(naming: &str) -> String;
    /// A statement returning the next lease token, when tokens are drawn
    /// before the statement that uses them.
    fn next_token(naming: &str) -> Option<String>;
    /// `time + micros` in SQL.
    fn plus_micros(time: &str, micros: &str) -> String;
    /// A migration script with the store's naming filled in.
    fn migration_sql(sql: &str, naming: &str) -> String;
    /// The statement creating the migrations table if absent.
    fn migrations_table(naming: &str) -> String;
    /// Prepares a migration inside `tx` (locks, schema creation).
    fn prepare_migration<'a>(
        tx: &'a mut Self::Conn,
        naming: &'a str,
    ) -> impl Future<Output = Result<(), sqlx::Error>> + Send + 'a;

    /// A connection from the pool.
    fn acquire(
        pool: &Self::Pool,
    ) -> impl Future<Output = Result<Self::PoolConn, sqlx::Error>> + Send;
    /// A write transaction.
    fn begin(pool: &Self::Pool) -> impl Future<Output = Result<Self::Tx, sqlx::Error>> + Send;
    /// Commits a transaction.
    fn commit(tx: Self::Tx) -> impl Future<Output = Result<(), sqlx::Error>> + Send;
    /// The pool's current size, for `Debug`.
    fn pool_size(pool: &Self::Pool) -> u32;

    /// Runs a statement; returns the rows affected.
    fn execute<'a>(
        conn: &'a mut Self::Conn,
        sql: &'a Arc<str>,
        args: Vec<Arg<'a>>,
    ) -> impl Future<Output = Result<u64, sqlx::Error>> + Send + 'a;
    /// Runs a query for at most one row.
    fn fetch_optional<'a>(
        conn: &'a mut Self::Conn,
        sql: &'a Arc<str>,
        args: Vec<Arg<'a>>,
    ) -> impl Future<Output = Result<Option<Self::Row>, sqlx::Error>> + Send + 'a;
    /// Runs a query for all its rows.
    fn fetch_all<'a>(
        conn: &'a mut Self::Conn,
        sql: &'a Arc<str>,
        args: Vec<Arg<'a>>,
    ) -> impl Future<Output = Result<Vec<Self::Row>, sqlx::Error>> + Send + 'a;
    /// Runs a script of several statements without parameters.
    fn script(
        conn: &mut Self::Conn,
        sql: String,
    ) -> impl Future<Output = Result<(), sqlx::Error>> + Send + '_;

    /// A text column (NULL as `None`).
    fn text(row: &Self::Row, column: &str) -> Result<Option<String>, sqlx::Error>;
    /// An integer column (NULL as `None`).
    fn int(row: &Self::Row, column: &str) -> Result<Option<i64>, sqlx::Error>;
    /// A bytes column.
    fn bytes(row: &Self::Row, column: &str) -> Result<Vec<u8>, sqlx::Error>;
    /// A time column (NULL as `None`).
    fn time(row: &Self::Row, column: &str) -> Result<Option<OffsetDateTime>, Fail>;
    /// A JSON column.
    fn json<T: DeserializeOwned>(row: &Self::Row, column: &str) -> Result<T, Fail>;

    /// Whether re-running the transaction may succeed (serialization
    /// failure, deadlock, a lock the busy handler does not wait for).
    fn is_transient(e: &sqlx::Error) -> bool;
    /// Classifies an error the database reported with `code`: the kind,
    /// the code as shown in messages, and a hint for the message.
    fn database_error(code: Option<&str>, message: &str) -> (StoreErrorKind, String, &'static str);
}

/// The database's code and primary message for an error, the source of a
/// [`StoreError`] (never the detail, which can quote row contents).
#[derive(Debug)]
struct DbErrorSummary {
    code: String,
    message: String,
}

impl fmt::Display for DbErrorSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

impl std::error::Error for DbErrorSummary {}

/// Maps a driver error to a [`StoreError`] for operation `op`: connection,
/// I/O and pool-timeout errors are [`StoreErrorKind::Unavailable`],
/// undecodable values [`StoreErrorKind::Corrupt`], and the database's own
/// errors as its dialect classifies their code. Messages carry the
/// operation and the code, never a row's contents.
fn classify<D: Dialect>(op: &str, e: sqlx::Error) -> StoreError {
    use StoreErrorKind as K;
    let (kind, what) = match &e {
        sqlx::Error::PoolTimedOut => (K::Unavailable, "timed out waiting for a connection"),
        sqlx::Error::PoolClosed => (K::Unavailable, "the pool is closed"),
        sqlx::Error::Io(_) => (K::Unavailable, "i/o error"),
        sqlx::Error::Tls(_) => (K::Unavailable, "tls error"),
        sqlx::Error::WorkerCrashed => (K::Unavailable, "connection worker crashed"),
        sqlx::Error::RowNotFound => (K::NotFound, "no row"),
        sqlx::Error::ColumnDecode { .. }
        | sqlx::Error::Decode(_)
        | sqlx::Error::ColumnNotFound(_)
        | sqlx::Error::ColumnIndexOutOfBounds { .. }
        | sqlx::Error::TypeNotFound { .. } => (K::Corrupt, "a stored value could not be decoded"),
        sqlx::Error::Database(db) => {
            let (kind, code, hint) = D::database_error(db.code().as_deref(), db.message());
            let message = format!("{} {op}: {code}{hint}", D::NAME);
            let summary = DbErrorSummary {
                code,
                message: db.message().to_owned(),
            };
            return StoreError::new(kind, message).with_source(summary);
        }
        _ => (K::Other, "driver error"),
    };
    StoreError::new(kind, format!("{} {op}: {what}", D::NAME)).with_source(e)
}

/// Whether `name` is a valid schema name or table prefix: at most `max`
/// bytes of `[a-z0-9_]`, not starting with a digit or `reserved`.
fn valid_name(name: &str, max: usize, reserved: &str) -> bool {
    name.len() <= max
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        && !name.bytes().next().is_some_and(|b| b.is_ascii_digit())
        && !name.starts_with(reserved)
}

/// The ledger columns, read as `l`.
const COLUMNS: &str = "l.event_id, l.account, l.event_type, l.event_created, l.fingerprint, \
     l.state, l.attempts, l.lease_token, l.lease_expires_at, l.last_error, l.ignore_reason, \
     l.payload, l.subscription_id, l.available_at, l.first_seen_at, l.updated_at";

/// "No other event of subscription `$6` holds a live lease at `$5`".
const NO_LIVE_SIBLING: &str = "($6 IS NULL OR NOT EXISTS (SELECT 1 FROM {ledger} o \
     WHERE o.subscription_id = $6 AND o.state = 'processing' AND o.lease_expires_at > $5 \
     AND NOT (o.event_id = $1 AND o.account = $2)))";

/// The statements with naming, clock and dialect fragments filled in,
/// rendered once per store.
struct Statements {
    now: Arc<str>,
    next_token: Option<Arc<str>>,
    lock_entry: Arc<str>,
    claim_insert: Arc<str>,
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
    attach_payload: Arc<str>,
    take: Arc<str>,
    try_lock_subscription: Option<Arc<str>>,
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
    migrations_table: Arc<str>,
    migrations_applied: Arc<str>,
    migration_record: Arc<str>,
}

impl Statements {
    fn new<D: Dialect>(naming: &str) -> Self {
        let slots: Vec<String> = (2..2 + STATE_SLOTS).map(|i| format!("${i}")).collect();
        let fills = [
            ("{columns}", COLUMNS.to_owned()),
            ("{no_live_sibling}", NO_LIVE_SIBLING.to_owned()),
            ("{ledger}", D::table(naming, "ledger")),
            ("{subscriptions}", D::table(naming, "subscriptions")),
            ("{entitlements}", D::table(naming, "entitlements")),
            ("{cursors}", D::table(naming, "cursors")),
            ("{sequences}", D::table(naming, "sequences")),
            ("{migrations}", D::table(naming, "migrations")),
            ("{token}", D::token_expr(naming)),
            ("{expiry}", D::plus_micros("n.t", "$6")),
            ("{lock_row}", D::LOCK_ROW.to_owned()),
            ("{lock_take}", D::LOCK_TAKE.to_owned()),
            ("{state_slots}", slots.join(", ")),
            ("{now}", D::NOW.to_owned()),
        ];
        let r = |t: &str| -> Arc<str> {
            let mut s = t.to_owned();
            // `{columns}` and `{no_live_sibling}` come first: they bring
            // placeholders of their own, filled by the later entries.
            for (from, to) in &fills {
                s = s.replace(from, to);
            }
            s.into()
        };
        Self {
            now: r("SELECT {now} AS now"),
            next_token: D::next_token(naming).map(|s| r(&s)),
            lock_entry: r("WITH locked AS MATERIALIZED (SELECT * FROM {ledger} \
                 WHERE event_id = $1 AND account = $2{lock_row}) \
                 SELECT {columns}, {now} AS now FROM locked l"),
            claim_insert: r("INSERT INTO {ledger} (event_id, account, event_type, \
                 event_created, fingerprint, state, attempts, lease_token, lease_expires_at, \
                 first_seen_at, updated_at) \
                 SELECT $1, $2, $3, $4, $5, 'processing', 1, {token}, {expiry}, n.t, n.t \
                 FROM (SELECT {now} AS t) n WHERE true \
                 ON CONFLICT (event_id, account) DO NOTHING \
                 RETURNING lease_token, lease_expires_at"),
            reclaim: r(
                "UPDATE {ledger} AS l SET state = 'processing', attempts = $3, \
                 lease_token = {token}, lease_expires_at = $4, updated_at = $5 \
                 WHERE l.event_id = $1 AND l.account = $2 AND {no_live_sibling} \
                 RETURNING lease_token, lease_expires_at",
            ),
            expire_to_dead: r("UPDATE {ledger} AS l SET state = 'dead', \
                 lease_expires_at = NULL, last_error = $3, updated_at = $5 \
                 WHERE l.event_id = $1 AND l.account = $2 AND {no_live_sibling}"),
            complete: r(
                "UPDATE {ledger} SET state = 'processed', lease_expires_at = NULL, \
                 payload = NULL, last_error = NULL, updated_at = {now} \
                 WHERE event_id = $1 AND account = $2 AND state = 'processing' \
                 AND lease_token = $3",
            ),
            fail: r("UPDATE {ledger} SET state = $3, lease_expires_at = NULL, \
                 last_error = $4, payload = COALESCE($5, payload), updated_at = $6 \
                 WHERE event_id = $1 AND account = $2"),
            release: r("UPDATE {ledger} SET state = 'failed', \
                 attempts = CASE WHEN attempts > 0 THEN attempts - 1 ELSE 0 END, \
                 lease_expires_at = NULL, \
                 last_error = 'released before completion (shutdown)', updated_at = {now} \
                 WHERE event_id = $1 AND account = $2 AND state = 'processing' \
                 AND lease_token = $3"),
            ignore: r(
                "INSERT INTO {ledger} (event_id, account, event_type, event_created, \
                 fingerprint, state, attempts, ignore_reason, first_seen_at, updated_at) \
                 SELECT $1, $2, $3, $4, $5, 'ignored', 0, $6, n.t, n.t \
                 FROM (SELECT {now} AS t) n WHERE true \
                 ON CONFLICT (event_id, account) DO NOTHING",
            ),
            state_of: r("SELECT state, fingerprint FROM {ledger} \
                 WHERE event_id = $1 AND account = $2"),
            get: r("SELECT {columns} FROM {ledger} l WHERE l.event_id = $1 AND l.account = $2"),
            list: r("SELECT {columns} FROM {ledger} l \
                 WHERE ($1 = 0 OR l.state IN ({state_slots})) \
                 AND ($10 IS NULL OR l.event_id > $10) \
                 ORDER BY l.event_id, l.account LIMIT $11"),
            requeue: r("UPDATE {ledger} SET state = 'failed', attempts = 0, \
                 available_at = NULL, updated_at = {now} \
                 WHERE event_id = $1 AND account = $2 AND state IN ('dead', 'failed')"),
            prune: r("DELETE FROM {ledger} \
                 WHERE state IN ('processed', 'ignored') AND updated_at < $1"),
            enqueue: r(
                "INSERT INTO {ledger} (event_id, account, event_type, event_created, \
                 fingerprint, state, attempts, payload, subscription_id, available_at, \
                 first_seen_at, updated_at) \
                 SELECT $1, $2, $3, $4, $5, 'pending', 0, $6, $7, $8, n.t, n.t \
                 FROM (SELECT {now} AS t) n WHERE true \
                 ON CONFLICT (event_id, account) DO NOTHING",
            ),
            attach_payload: r("UPDATE {ledger} SET payload = $4, \
                 subscription_id = COALESCE(subscription_id, $5), \
                 available_at = COALESCE(available_at, $6) \
                 WHERE event_id = $1 AND account = $2 AND fingerprint = $3 \
                 AND payload IS NULL AND state IN ('pending', 'processing', 'failed')"),
            take: r("SELECT {columns} FROM {ledger} l \
                 WHERE l.state IN ('pending', 'processing', 'failed') \
                 AND l.payload IS NOT NULL \
                 AND (l.state <> 'processing' OR l.lease_expires_at IS NULL \
                   OR l.lease_expires_at <= $1) \
                 AND (l.available_at IS NULL OR l.available_at <= $1) \
                 AND (l.subscription_id IS NULL OR NOT EXISTS (SELECT 1 FROM {ledger} o \
                   WHERE o.subscription_id = l.subscription_id \
                   AND o.state IN ('pending', 'processing', 'failed') \
                   AND NOT (o.event_id = l.event_id AND o.account = l.account) \
                   AND ((o.state = 'processing' AND o.lease_expires_at > $1) \
                     OR (o.payload IS NOT NULL \
                       AND (o.state <> 'processing' OR o.lease_expires_at IS NULL \
                         OR o.lease_expires_at <= $1) \
                       AND (o.available_at IS NULL OR o.available_at <= $1) \
                       AND (o.event_created, o.event_id, o.account) \
                         < (l.event_created, l.event_id, l.account))))) \
                 ORDER BY l.event_created, l.event_id, l.account LIMIT $2{lock_take}"),
            try_lock_subscription: D::TRY_LOCK_SUBSCRIPTION.map(&r),
            retry_at: r("UPDATE {ledger} SET available_at = $3 \
                 WHERE event_id = $1 AND account = $2"),
            keep_payload: r("UPDATE {ledger} SET payload = $3 \
                 WHERE event_id = $1 AND account = $2 AND state = 'processed'"),
            backlog: r("SELECT count(*) AS n FROM {ledger} \
                 WHERE state IN ('pending', 'processing', 'failed')"),
            sub_load: r("SELECT version, record FROM {subscriptions} WHERE id = $1"),
            sub_insert: r(
                "INSERT INTO {subscriptions} (id, customer, client_reference_id, \
                 needs_review, needs_reconcile, last_verified_with_stripe, version, record, \
                 updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, {now}) \
                 ON CONFLICT (id) DO NOTHING",
            ),
            sub_update: r("UPDATE {subscriptions} SET customer = $2, \
                 client_reference_id = $3, needs_review = $4, needs_reconcile = $5, \
                 last_verified_with_stripe = $6, version = $7, record = $8, \
                 updated_at = {now} WHERE id = $1 AND version = $9"),
            sub_by_customer: r("SELECT version, record FROM {subscriptions} \
                 WHERE customer = $1 ORDER BY id"),
            sub_by_reference: r("SELECT version, record FROM {subscriptions} \
                 WHERE client_reference_id = $1 ORDER BY id"),
            sub_list: r("SELECT version, record FROM {subscriptions} \
                 WHERE ($1 IS NULL OR last_verified_with_stripe IS NULL \
                   OR last_verified_with_stripe < $1) \
                 AND (NOT $2 OR needs_review) AND (NOT $3 OR needs_reconcile) \
                 AND ($4 IS NULL OR id > $4) ORDER BY id LIMIT $5"),
            ent_load: r(
                "SELECT version, entitlements AS record FROM {entitlements} \
                 WHERE customer = $1",
            ),
            ent_insert: r(
                "INSERT INTO {entitlements} (customer, version, entitlements, \
                 updated_at) VALUES ($1, $2, $3, {now}) ON CONFLICT (customer) DO NOTHING",
            ),
            ent_update: r(
                "UPDATE {entitlements} SET version = $2, entitlements = $3, \
                 updated_at = {now} WHERE customer = $1 AND version = $4",
            ),
            cursor_load: r("SELECT value FROM {cursors} WHERE name = $1"),
            cursor_save: r("INSERT INTO {cursors} (name, value, updated_at) \
                 VALUES ($1, $2, {now}) ON CONFLICT (name) \
                 DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at"),
            migrations_table: r(&D::migrations_table(naming)),
            migrations_applied: r("SELECT version FROM {migrations}"),
            migration_record: r("INSERT INTO {migrations} (version, name, applied_at) \
                 VALUES ($1, $2, {now})"),
        }
    }
}

/// A SQL store over one database: [`PgStore`](super::PgStore) or
/// [`SqliteStore`](super::SqliteStore). Cheap to clone (the pool is shared).
pub struct SqlStore<D: Dialect> {
    pool: D::Pool,
    naming: Arc<str>,
    sql: Arc<Statements>,
}

impl<D: Dialect> Clone for SqlStore<D> {
    fn clone(&self) -> Self {
        Self {
            pool: self.pool.clone(),
            naming: Arc::clone(&self.naming),
            sql: Arc::clone(&self.sql),
        }
    }
}

impl<D: Dialect> fmt::Debug for SqlStore<D> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct(D::STORE)
            .field(D::NAMING, &self.naming)
            .field("pool_size", &D::pool_size(&self.pool))
            .finish_non_exhaustive()
    }
}

/// Runs `f`, re-running it after a pause on transient failures (at most
/// [`MAX_RETRIES`] times); maps the final error.
async fn run<D: Dialect, T, F, Fut>(op: &'static str, mut f: F) -> Result<T, StoreError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, Fail>>,
{
    let mut retry = 0;
    loop {
        match f().await {
            Ok(v) => return Ok(v),
            Err(Fail::Store(e)) => return Err(e),
            Err(Fail::Db(e)) if D::is_transient(&e) && retry < MAX_RETRIES => {
                retry += 1;
                tokio::time::sleep(crate::rt::backoff(retry, RETRY_BASE, RETRY_CAP)).await;
            }
            Err(Fail::Db(e)) => return Err(classify::<D>(op, e)),
        }
    }
}

/// Maps the error of an operation that is not retried.
fn finish<D: Dialect, T>(op: &'static str, r: Result<T, Fail>) -> Result<T, StoreError> {
    r.map_err(|f| match f {
        Fail::Db(e) => classify::<D>(op, e),
        Fail::Store(e) => e,
    })
}

fn account_of(key: &EventKey) -> &str {
    key.account.as_deref().unwrap_or("")
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

/// A row limit; 0 means none.
fn limit_of(limit: usize) -> i64 {
    if limit == 0 {
        i64::MAX
    } else {
        i64::try_from(limit).unwrap_or(i64::MAX)
    }
}

fn json_of<T: serde::Serialize>(value: &T, what: &str) -> Result<serde_json::Value, Fail> {
    serde_json::to_value(value).map_err(|_| other(format!("cannot serialize {what}")))
}

/// The key's two parameters, `$1` and `$2`.
fn key_args(key: &EventKey) -> Vec<Arg<'_>> {
    vec![Arg::Str(&key.event_id), Arg::Str(account_of(key))]
}

impl<D: Dialect> SqlStore<D> {
    fn build(pool: D::Pool, naming: &str) -> Self {
        Self {
            pool,
            naming: naming.into(),
            sql: Arc::new(Statements::new::<D>(naming)),
        }
    }

    fn corrupt(what: &str) -> Fail {
        corrupt(D::NAME, what)
    }

    fn to_i64(v: u64, what: &str) -> Result<i64, Fail> {
        i64::try_from(v).map_err(|_| other(format!("{}: {what} out of range", D::NAME)))
    }

    fn token_of(raw: Option<i64>) -> Result<LeaseToken, Fail> {
        raw.and_then(|t| u64::try_from(t).ok())
            .map(LeaseToken)
            .ok_or_else(|| Self::corrupt("lease token"))
    }

    fn req_time(row: &D::Row, column: &str) -> Result<OffsetDateTime, Fail> {
        D::time(row, column)?.ok_or_else(|| Self::corrupt(column))
    }

    fn state_and_fingerprint(row: &D::Row) -> Result<(LedgerState, Fingerprint), Fail> {
        let state = D::text(row, "state")?.unwrap_or_default();
        let state = LedgerState::parse(&state).ok_or_else(|| Self::corrupt("ledger state"))?;
        let fingerprint = <[u8; 32]>::try_from(D::bytes(row, "fingerprint")?.as_slice())
            .map(Fingerprint)
            .map_err(|_| Self::corrupt("fingerprint"))?;
        Ok((state, fingerprint))
    }

    fn entry_from_row(row: &D::Row) -> Result<LedgerEntry, Fail> {
        let account = D::text(row, "account")?.unwrap_or_default();
        let (state, fingerprint) = Self::state_and_fingerprint(row)?;
        let attempts = D::int(row, "attempts")?.unwrap_or_default();
        let attempts = u32::try_from(attempts).map_err(|_| Self::corrupt("attempt count"))?;
        let lease_token = match D::int(row, "lease_token")? {
            Some(t) => Some(Self::token_of(Some(t))?),
            None => None,
        };
        Ok(LedgerEntry {
            key: EventKey {
                event_id: D::text(row, "event_id")?.unwrap_or_default(),
                account: (!account.is_empty()).then_some(account),
            },
            event_type: D::text(row, "event_type")?.unwrap_or_default(),
            event_created: D::int(row, "event_created")?.unwrap_or_default(),
            fingerprint,
            state,
            attempts,
            lease_token,
            lease_expires_at: D::time(row, "lease_expires_at")?,
            last_error: D::text(row, "last_error")?,
            ignore_reason: D::text(row, "ignore_reason")?,
            payload: D::text(row, "payload")?,
            subscription_id: D::text(row, "subscription_id")?,
            available_at: D::time(row, "available_at")?,
            first_seen_at: Self::req_time(row, "first_seen_at")?,
            updated_at: Self::req_time(row, "updated_at")?,
        })
    }

    fn record_from_row(row: &D::Row) -> Result<SubscriptionRecord, Fail> {
        let mut record: SubscriptionRecord = D::json(row, "record")?;
        record.version = D::int(row, "version")?
            .and_then(|v| u64::try_from(v).ok())
            .ok_or_else(|| Self::corrupt("subscription version"))?;
        Ok(record)
    }

    fn entitlements_from_row(row: &D::Row) -> Result<CustomerEntitlements, Fail> {
        let mut e: CustomerEntitlements = D::json(row, "record")?;
        e.version = D::int(row, "version")?
            .and_then(|v| u64::try_from(v).ok())
            .ok_or_else(|| Self::corrupt("entitlements version"))?;
        Ok(e)
    }

    async fn execute(&self, sql: &Arc<str>, args: Vec<Arg<'_>>) -> Result<u64, Fail> {
        let mut conn = D::acquire(&self.pool).await?;
        Ok(D::execute(&mut conn, sql, args).await?)
    }

    async fn fetch_optional(
        &self,
        sql: &Arc<str>,
        args: Vec<Arg<'_>>,
    ) -> Result<Option<D::Row>, Fail> {
        let mut conn = D::acquire(&self.pool).await?;
        Ok(D::fetch_optional(&mut conn, sql, args).await?)
    }

    async fn fetch_all(&self, sql: &Arc<str>, args: Vec<Arg<'_>>) -> Result<Vec<D::Row>, Fail> {
        let mut conn = D::acquire(&self.pool).await?;
        Ok(D::fetch_all(&mut conn, sql, args).await?)
    }

    /// Applies the embedded migrations not yet recorded, in one transaction
    /// the dialect prepares (locks, schema). Returns how many were applied.
    async fn migrate_once(&self) -> Result<usize, Fail> {
        let mut tx = D::begin(&self.pool).await?;
        D::prepare_migration(&mut tx, &self.naming).await?;
        D::script(&mut tx, self.sql.migrations_table.to_string()).await?;
        let applied = D::fetch_all(&mut tx, &self.sql.migrations_applied, Vec::new())
            .await?
            .iter()
            .map(|row| D::int(row, "version"))
            .collect::<Result<Vec<_>, _>>()?;
        let mut count = 0;
        for m in D::MIGRATIONS
            .iter()
            .filter(|m| !applied.contains(&Some(m.version)))
        {
            D::script(&mut tx, D::migration_sql(m.sql, &self.naming)).await?;
            let args = vec![Arg::Int(m.version), Arg::Str(m.name)];
            D::execute(&mut tx, &self.sql.migration_record, args).await?;
            count += 1;
        }
        D::commit(tx).await?;
        Ok(count)
    }

    /// Applies the embedded migrations not yet recorded in the store's
    /// migrations table, all in one transaction, so concurrent starts are
    /// safe: PostgreSQL creates the schema if it does not exist (so a role
    /// without `CREATE` on the database can use a schema prepared for it)
    /// and holds an advisory lock; SQLite runs in `BEGIN IMMEDIATE`.
    /// Idempotent: run it at every start. Returns how many migrations were
    /// applied now.
    ///
    /// # Errors
    ///
    /// [`StoreError`] when the database refuses (privileges) or fails.
    pub async fn migrate(&self) -> Result<usize, StoreError> {
        run::<D, _, _, _>("migrate", || self.migrate_once()).await
    }

    /// The pool: a `sqlx::PgPool` for [`PgStore`](super::PgStore), a
    /// `sqlx::SqlitePool` for [`SqliteStore`](super::SqliteStore).
    pub fn pool(&self) -> &D::Pool {
        &self.pool
    }

    /// Begins a write transaction on the store's pool, for
    /// `complete_in`: the application's writes and the
    /// event's completion then commit or roll back together. It is a
    /// `sqlx::Transaction<'static, Postgres>` for PostgreSQL (a plain
    /// `BEGIN`) and a `sqlx::Transaction<'static, Sqlite>` for SQLite
    /// (`BEGIN IMMEDIATE`: it holds SQLite's write lock, so keep it short).
    ///
    /// # Errors
    ///
    /// [`StoreErrorKind::Unavailable`] when no connection (or, for SQLite,
    /// no write lock) can be had.
    pub async fn begin(&self) -> Result<D::Tx, StoreError> {
        D::begin(&self.pool)
            .await
            .map_err(|e| classify::<D>("begin", e))
    }

    /// Marks the leased event processed inside the caller's transaction
    /// (`&mut *tx` from `begin`, or for PostgreSQL any
    /// transaction on the same database), with the rules of
    /// [`EventLedger::complete`]: fenced by the lease token, and a no-op when
    /// this lease already completed the event.
    ///
    /// Use it when the application's own effects (granting access, writing
    /// a credit) must happen exactly once: write them and call this in one
    /// transaction, then commit. If the commit succeeds, the event is
    /// processed and the effects are in; if anything fails, both roll back
    /// and the event is retried. The processor's later `complete` with the
    /// same lease is then a no-op.
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
    pub async fn complete_in(&self, conn: &mut D::Conn, lease: &Lease) -> Result<(), StoreError> {
        finish::<D, _>("complete_in", self.complete_on(conn, lease).await)
    }

    /// The next lease token as the trailing argument, when the dialect draws
    /// tokens before the statement that uses them.
    async fn token_arg(&self, conn: &mut D::Conn) -> Result<Option<Arg<'static>>, Fail> {
        let Some(sql) = &self.sql.next_token else {
            return Ok(None);
        };
        let row = D::fetch_optional(conn, sql, Vec::new()).await?;
        let token = row
            .map(|r| D::int(&r, "value"))
            .transpose()?
            .flatten()
            .ok_or_else(|| Self::corrupt("lease-token counter"))?;
        Ok(Some(Arg::Int(token)))
    }

    async fn complete_on(&self, conn: &mut D::Conn, lease: &Lease) -> Result<(), Fail> {
        let token = Self::to_i64(lease.token.0, "lease token")?;
        for _ in 0..3 {
            let mut args = key_args(&lease.key);
            args.push(Arg::Int(token));
            if D::execute(conn, &self.sql.complete, args).await? > 0 {
                return Ok(());
            }
            let entry = self.get_on(conn, &lease.key).await?.ok_or_else(not_found)?;
            if !check_completion(&entry, lease).map_err(lease_lost)? {
                return Ok(());
            }
        }
        Err(other(format!(
            "{} complete: the entry kept changing",
            D::NAME
        )))
    }

    async fn get_on(
        &self,
        conn: &mut D::Conn,
        key: &EventKey,
    ) -> Result<Option<LedgerEntry>, Fail> {
        D::fetch_optional(conn, &self.sql.get, key_args(key))
            .await?
            .as_ref()
            .map(Self::entry_from_row)
            .transpose()
    }

    /// Locks the entry in `tx` and reads the database's clock after the lock
    /// is held.
    async fn lock_entry(
        &self,
        tx: &mut D::Conn,
        key: &EventKey,
    ) -> Result<Option<(LedgerEntry, OffsetDateTime)>, Fail> {
        let Some(row) = D::fetch_optional(tx, &self.sql.lock_entry, key_args(key)).await? else {
            return Ok(None);
        };
        Ok(Some((
            Self::entry_from_row(&row)?,
            Self::req_time(&row, "now")?,
        )))
    }

    /// Inserts a processing entry for `request` if there is none (the
    /// primary key arbitrates a race); its lease, or `None` when the entry
    /// exists.
    async fn insert_claim(
        &self,
        conn: &mut D::Conn,
        request: &ClaimRequest,
    ) -> Result<Option<Lease>, Fail> {
        let token = self.token_arg(&mut *conn).await?;
        let mut args = key_args(&request.key);
        args.extend([
            Arg::Str(&request.event_type),
            Arg::Int(request.event_created),
            Arg::Bytes(&request.fingerprint.0[..]),
            Arg::Int(lease_micros(request.lease)),
        ]);
        args.extend(token);
        let Some(row) = D::fetch_optional(conn, &self.sql.claim_insert, args).await? else {
            return Ok(None);
        };
        Ok(Some(Lease {
            key: request.key.clone(),
            token: Self::token_of(D::int(&row, "lease_token")?)?,
            attempt: 1,
            expires_at: Self::req_time(&row, "lease_expires_at")?,
        }))
    }

    async fn claim_once(&self, request: &ClaimRequest) -> Result<ClaimOutcome, Fail> {
        for _ in 0..3 {
            if self.sql.next_token.is_none() {
                // The token comes from inside the statement: a new event is
                // claimed in one statement, without a transaction.
                let mut conn = D::acquire(&self.pool).await?;
                if let Some(lease) = self.insert_claim(&mut conn, request).await? {
                    return Ok(ClaimOutcome::Claimed(lease));
                }
            }
            let mut tx = D::begin(&self.pool).await?;
            let Some((entry, now)) = self.lock_entry(&mut tx, &request.key).await? else {
                // No entry (or pruned in between): insert one.
                let lease = self.insert_claim(&mut tx, request).await?;
                D::commit(tx).await?;
                match lease {
                    Some(lease) => return Ok(ClaimOutcome::Claimed(lease)),
                    None => continue,
                }
            };
            let outcome = self
                .apply_decision(&mut tx, &entry, request, now, None)
                .await?;
            D::commit(tx).await?;
            return Ok(outcome.unwrap_or(ClaimOutcome::InFlight { until: now }));
        }
        Err(other(format!("{} claim: the entry kept changing", D::NAME)))
    }

    /// Applies [`decide_claim`] to a locked entry. With `subscription`, the
    /// write happens only if no other event of it holds a live lease
    /// (`None` returned otherwise).
    async fn apply_decision(
        &self,
        conn: &mut D::Conn,
        entry: &LedgerEntry,
        request: &ClaimRequest,
        now: OffsetDateTime,
        subscription: Option<&str>,
    ) -> Result<Option<ClaimOutcome>, Fail> {
        let key = &request.key;
        Ok(
            match decide_claim(Some(entry), &request.fingerprint, now, request.max_attempts) {
                ClaimDecision::Insert => {
                    return Err(other(format!("{} claim: entry vanished", D::NAME)));
                }
                ClaimDecision::Reclaim { attempt } => {
                    let token = self.token_arg(&mut *conn).await?;
                    let mut args = key_args(key);
                    args.extend([
                        Arg::Int(i64::from(attempt)),
                        Arg::Time(expiry(now, request.lease)),
                        Arg::Time(now),
                        Arg::OptStr(subscription),
                    ]);
                    args.extend(token);
                    match D::fetch_optional(conn, &self.sql.reclaim, args).await? {
                        Some(row) => Some(ClaimOutcome::Claimed(Lease {
                            key: key.clone(),
                            token: Self::token_of(D::int(&row, "lease_token")?)?,
                            attempt,
                            expires_at: Self::req_time(&row, "lease_expires_at")?,
                        })),
                        None => None,
                    }
                }
                ClaimDecision::ExpireToDead => {
                    let message = format!(
                        "lease expired on attempt {} of {}: the worker never finished",
                        entry.attempts, request.max_attempts
                    );
                    let mut args = key_args(key);
                    args.extend([
                        Arg::Str(&message),
                        Arg::Int(0),
                        Arg::Time(now),
                        Arg::OptStr(subscription),
                    ]);
                    let n = D::execute(conn, &self.sql.expire_to_dead, args).await?;
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
        let mut tx = D::begin(&self.pool).await?;
        let (entry, now) = self
            .lock_entry(&mut tx, &lease.key)
            .await?
            .ok_or_else(not_found)?;
        check_fence(&entry, lease).map_err(lease_lost)?;
        let state = state_after_failure(entry.attempts, failure.max_attempts, failure.retryable);
        let mut args = key_args(&lease.key);
        args.extend([
            Arg::Str(state.as_str()),
            Arg::Str(&failure.error),
            Arg::OptStr(failure.payload.as_deref()),
            Arg::Time(now),
        ]);
        D::execute(&mut tx, &self.sql.fail, args).await?;
        D::commit(tx).await?;
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
        let token = Self::to_i64(lease.token.0, "lease token")?;
        let mut conn = D::acquire(&self.pool).await?;
        for _ in 0..3 {
            let mut args = key_args(&lease.key);
            args.push(Arg::Int(token));
            if D::execute(&mut conn, &self.sql.release, args).await? > 0 {
                return Ok(());
            }
            let entry = self
                .get_on(&mut conn, &lease.key)
                .await?
                .ok_or_else(not_found)?;
            check_fence(&entry, lease).map_err(lease_lost)?;
        }
        Err(other(format!(
            "{} release: the entry kept changing",
            D::NAME
        )))
    }

    async fn ignore_once(&self, request: &IgnoreRequest) -> Result<LedgerState, Fail> {
        for _ in 0..3 {
            let mut args = key_args(&request.key);
            args.extend([
                Arg::Str(&request.event_type),
                Arg::Int(request.event_created),
                Arg::Bytes(&request.fingerprint.0[..]),
                Arg::Str(&request.reason),
            ]);
            if self.execute(&self.sql.ignore, args).await? > 0 {
                return Ok(LedgerState::Ignored);
            }
            if let Some((state, _)) = self.state_of(&request.key).await? {
                return Ok(state);
            }
        }
        Err(other(format!(
            "{} ignore: the entry kept changing",
            D::NAME
        )))
    }

    async fn state_of(&self, key: &EventKey) -> Result<Option<(LedgerState, Fingerprint)>, Fail> {
        self.fetch_optional(&self.sql.state_of, key_args(key))
            .await?
            .as_ref()
            .map(Self::state_and_fingerprint)
            .transpose()
    }

    async fn list_once(&self, query: &LedgerQuery) -> Result<Vec<LedgerEntry>, Fail> {
        let states: BTreeSet<&str> = query.states.iter().map(|s| s.as_str()).collect();
        if states.len() > STATE_SLOTS {
            return Err(other(format!("{} list: too many states", D::NAME)));
        }
        let mut args = vec![Arg::Int(i64::try_from(states.len()).unwrap_or(i64::MAX))];
        args.extend(states.iter().map(|s| Arg::OptStr(Some(s))));
        args.extend((states.len()..STATE_SLOTS).map(|_| Arg::OptStr(None)));
        args.push(Arg::OptStr(query.after.as_deref()));
        args.push(Arg::Int(limit_of(query.limit)));
        self.fetch_all(&self.sql.list, args)
            .await?
            .iter()
            .map(Self::entry_from_row)
            .collect()
    }

    async fn enqueue_once(&self, request: &InboxRequest) -> Result<EnqueueOutcome, Fail> {
        let claim = &request.claim;
        for _ in 0..3 {
            let mut args = key_args(&claim.key);
            args.extend([
                Arg::Str(&claim.event_type),
                Arg::Int(claim.event_created),
                Arg::Bytes(&claim.fingerprint.0[..]),
                Arg::Str(&request.payload),
                Arg::OptStr(request.subscription_id.as_deref()),
                Arg::Time(request.available_at),
            ]);
            if self.execute(&self.sql.enqueue, args).await? > 0 {
                return Ok(EnqueueOutcome::Queued);
            }
            // Known already. An unsettled entry without a payload (claimed
            // by a synchronous delivery) gets this one, so a worker can take
            // it over once its lease expires.
            let mut args = key_args(&claim.key);
            args.extend([
                Arg::Bytes(&claim.fingerprint.0[..]),
                Arg::Str(&request.payload),
                Arg::OptStr(request.subscription_id.as_deref()),
                Arg::Time(request.available_at),
            ]);
            self.execute(&self.sql.attach_payload, args).await?;
            if let Some((state, stored)) = self.state_of(&claim.key).await? {
                return Ok(if stored == claim.fingerprint {
                    EnqueueOutcome::Duplicate { state }
                } else {
                    EnqueueOutcome::Conflict
                });
            }
        }
        Err(other(format!(
            "{} enqueue: the entry kept changing",
            D::NAME
        )))
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
        let mut tx = D::begin(&self.pool).await?;
        let row = D::fetch_optional(&mut tx, &self.sql.now, Vec::new()).await?;
        let now = row
            .map(|r| Self::req_time(&r, "now"))
            .transpose()?
            .ok_or_else(|| Self::corrupt("clock"))?;
        let args = vec![Arg::Time(now), Arg::Int(limit_of(limit))];
        let rows = D::fetch_all(&mut tx, &self.sql.take, args).await?;
        let mut out = Vec::with_capacity(rows.len());
        for row in &rows {
            let entry = Self::entry_from_row(row)?;
            if let (Some(sub), Some(sql)) =
                (&entry.subscription_id, &self.sql.try_lock_subscription)
            {
                // Whoever holds this lock is leasing an event of the same
                // subscription right now: leave it to them.
                let key = format!("stripe_webhook_guard:{}:{sub}", self.naming);
                let row = D::fetch_optional(&mut tx, sql, vec![Arg::Str(&key)]).await?;
                if row.is_none_or(|r| D::int(&r, "mine").ok().flatten() != Some(1)) {
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
            let sub = entry.subscription_id.as_deref();
            let outcome = self
                .apply_decision(&mut tx, &entry, &request, now, sub)
                .await?;
            if let Some(ClaimOutcome::Claimed(lease)) = outcome {
                out.push(InboxItem {
                    lease,
                    payload: entry.payload.unwrap_or_default(),
                    subscription_id: entry.subscription_id,
                });
            }
        }
        D::commit(tx).await?;
        Ok(out)
    }

    async fn save_once(&self, record: &SubscriptionRecord) -> Result<u64, Fail> {
        let next = record
            .version
            .checked_add(1)
            .ok_or_else(|| other(format!("{} save: version out of range", D::NAME)))?;
        let mut saved = record.clone();
        saved.version = next;
        let (sql, current) = if record.version == 0 {
            (&self.sql.sub_insert, None)
        } else {
            let v = Self::to_i64(record.version, "version")?;
            (&self.sql.sub_update, Some(Arg::Int(v)))
        };
        let mut args = vec![
            Arg::Str(&record.id),
            Arg::OptStr(record.state.customer.as_deref()),
            Arg::OptStr(record.client_reference_id.as_deref()),
            Arg::Bool(record.needs_review),
            Arg::Bool(record.needs_reconcile),
            Arg::OptTime(record.last_verified_with_stripe),
            Arg::Int(Self::to_i64(next, "version")?),
            Arg::Json(json_of(&saved, "subscription record")?),
        ];
        args.extend(current);
        if self.execute(sql, args).await? == 0 {
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

    async fn records(
        &self,
        sql: &Arc<str>,
        args: Vec<Arg<'_>>,
    ) -> Result<Vec<SubscriptionRecord>, Fail> {
        self.fetch_all(sql, args)
            .await?
            .iter()
            .map(Self::record_from_row)
            .collect()
    }

    async fn save_entitlements_once(&self, e: &CustomerEntitlements) -> Result<u64, Fail> {
        let next = e.version.checked_add(1).ok_or_else(|| {
            other(format!(
                "{} save_entitlements: version out of range",
                D::NAME
            ))
        })?;
        let mut saved = e.clone();
        saved.version = next;
        let (sql, current) = if e.version == 0 {
            (&self.sql.ent_insert, None)
        } else {
            let v = Self::to_i64(e.version, "version")?;
            (&self.sql.ent_update, Some(Arg::Int(v)))
        };
        let mut args = vec![
            Arg::Str(&e.customer),
            Arg::Int(Self::to_i64(next, "version")?),
            Arg::Json(json_of(&saved, "entitlements")?),
        ];
        args.extend(current);
        if self.execute(sql, args).await? == 0 {
            return Err(Fail::Store(StoreError::new(
                StoreErrorKind::Conflict,
                "entitlements were saved by another writer",
            )));
        }
        Ok(next)
    }
}

#[async_trait]
impl<D: Dialect> EventLedger for SqlStore<D> {
    async fn claim(&self, request: &ClaimRequest) -> Result<ClaimOutcome, StoreError> {
        run::<D, _, _, _>("claim", || self.claim_once(request)).await
    }

    async fn complete(&self, lease: &Lease) -> Result<(), StoreError> {
        run::<D, _, _, _>("complete", || async {
            let mut conn = D::acquire(&self.pool).await?;
            self.complete_on(&mut conn, lease).await
        })
        .await
    }

    async fn fail(&self, lease: &Lease, failure: &Failure) -> Result<FailOutcome, StoreError> {
        run::<D, _, _, _>("fail", || self.fail_once(lease, failure)).await
    }

    async fn release(&self, lease: &Lease) -> Result<(), StoreError> {
        run::<D, _, _, _>("release", || self.release_once(lease)).await
    }

    async fn ignore(&self, request: &IgnoreRequest) -> Result<LedgerState, StoreError> {
        run::<D, _, _, _>("ignore", || self.ignore_once(request)).await
    }

    async fn get(&self, key: &EventKey) -> Result<Option<LedgerEntry>, StoreError> {
        run::<D, _, _, _>("get", || async {
            let mut conn = D::acquire(&self.pool).await?;
            self.get_on(&mut conn, key).await
        })
        .await
    }

    async fn list(&self, query: &LedgerQuery) -> Result<Vec<LedgerEntry>, StoreError> {
        run::<D, _, _, _>("list", || self.list_once(query)).await
    }

    async fn requeue(&self, key: &EventKey) -> Result<bool, StoreError> {
        run::<D, _, _, _>("requeue", || async {
            Ok(self.execute(&self.sql.requeue, key_args(key)).await? > 0)
        })
        .await
    }

    async fn prune(&self, before: OffsetDateTime) -> Result<u64, StoreError> {
        run::<D, _, _, _>("prune", || {
            self.execute(&self.sql.prune, vec![Arg::Time(before)])
        })
        .await
    }
}

#[async_trait]
impl<D: Dialect> SubscriptionStore for SqlStore<D> {
    async fn load(&self, id: &str) -> Result<Option<SubscriptionRecord>, StoreError> {
        run::<D, _, _, _>("load", || async {
            self.fetch_optional(&self.sql.sub_load, vec![Arg::Str(id)])
                .await?
                .as_ref()
                .map(Self::record_from_row)
                .transpose()
        })
        .await
    }

    async fn save(&self, record: &SubscriptionRecord) -> Result<u64, StoreError> {
        run::<D, _, _, _>("save", || self.save_once(record)).await
    }

    async fn find_by_customer(
        &self,
        customer: &str,
    ) -> Result<Vec<SubscriptionRecord>, StoreError> {
        run::<D, _, _, _>("find_by_customer", || {
            self.records(&self.sql.sub_by_customer, vec![Arg::Str(customer)])
        })
        .await
    }

    async fn find_by_client_reference(
        &self,
        reference: &str,
    ) -> Result<Vec<SubscriptionRecord>, StoreError> {
        run::<D, _, _, _>("find_by_client_reference", || {
            self.records(&self.sql.sub_by_reference, vec![Arg::Str(reference)])
        })
        .await
    }

    async fn list_subscriptions(
        &self,
        query: &SubscriptionQuery,
    ) -> Result<Vec<SubscriptionRecord>, StoreError> {
        run::<D, _, _, _>("list_subscriptions", || {
            let args = vec![
                Arg::OptTime(query.verified_before),
                Arg::Bool(query.needs_review),
                Arg::Bool(query.needs_reconcile),
                Arg::OptStr(query.after.as_deref()),
                Arg::Int(limit_of(query.limit)),
            ];
            self.records(&self.sql.sub_list, args)
        })
        .await
    }

    async fn load_entitlements(
        &self,
        customer: &str,
    ) -> Result<Option<CustomerEntitlements>, StoreError> {
        run::<D, _, _, _>("load_entitlements", || async {
            self.fetch_optional(&self.sql.ent_load, vec![Arg::Str(customer)])
                .await?
                .as_ref()
                .map(Self::entitlements_from_row)
                .transpose()
        })
        .await
    }

    async fn save_entitlements(
        &self,
        entitlements: &CustomerEntitlements,
    ) -> Result<u64, StoreError> {
        run::<D, _, _, _>("save_entitlements", || {
            self.save_entitlements_once(entitlements)
        })
        .await
    }
}

#[async_trait]
impl<D: Dialect> CursorStore for SqlStore<D> {
    async fn load_cursor(&self, name: &str) -> Result<Option<String>, StoreError> {
        run::<D, _, _, _>("load_cursor", || async {
            let row = self
                .fetch_optional(&self.sql.cursor_load, vec![Arg::Str(name)])
                .await?;
            Ok(row.map(|r| D::text(&r, "value")).transpose()?.flatten())
        })
        .await
    }

    async fn save_cursor(&self, name: &str, value: &str) -> Result<(), StoreError> {
        run::<D, _, _, _>("save_cursor", || async {
            let args = vec![Arg::Str(name), Arg::Str(value)];
            self.execute(&self.sql.cursor_save, args).await?;
            Ok(())
        })
        .await
    }
}

#[async_trait]
impl<D: Dialect> InboxStore for SqlStore<D> {
    async fn enqueue(&self, request: &InboxRequest) -> Result<EnqueueOutcome, StoreError> {
        run::<D, _, _, _>("enqueue", || self.enqueue_once(request)).await
    }

    async fn take(
        &self,
        limit: usize,
        lease: Duration,
        max_attempts: u32,
    ) -> Result<Vec<InboxItem>, StoreError> {
        run::<D, _, _, _>("take", || self.take_once(limit, lease, max_attempts)).await
    }

    async fn retry_at(&self, key: &EventKey, at: OffsetDateTime) -> Result<(), StoreError> {
        run::<D, _, _, _>("retry_at", || async {
            let mut args = key_args(key);
            args.push(Arg::Time(at));
            self.execute(&self.sql.retry_at, args).await?;
            Ok(())
        })
        .await
    }

    async fn keep_payload(&self, key: &EventKey, payload: &str) -> Result<(), StoreError> {
        run::<D, _, _, _>("keep_payload", || async {
            let mut args = key_args(key);
            args.push(Arg::Str(payload));
            self.execute(&self.sql.keep_payload, args).await?;
            Ok(())
        })
        .await
    }

    async fn backlog(&self) -> Result<u64, StoreError> {
        run::<D, _, _, _>("backlog", || async {
            let row = self.fetch_optional(&self.sql.backlog, Vec::new()).await?;
            let n = row.map(|r| D::int(&r, "n")).transpose()?.flatten();
            Ok(n.and_then(|n| u64::try_from(n).ok()).unwrap_or(0))
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leases_are_clamped() {
        assert_eq!(lease_micros(Duration::milliseconds(300)), 300_000);
        assert_eq!(lease_micros(Duration::MAX), MAX_LEASE_MICROS);
        assert_eq!(lease_micros(Duration::MIN), -MAX_LEASE_MICROS);
    }

    /// Schema names (PostgreSQL) and table prefixes (SQLite): `[a-z0-9_]`,
    /// not starting with a digit or the database's reserved prefix, within
    /// the length limit; a schema name must not be empty.
    #[test]
    fn names_are_validated() {
        #[cfg(feature = "postgres")]
        {
            use postgres::{MAX_SCHEMA_LEN, validate_schema};
            for ok in ["stripe_webhook_guard", "a", "_x", "billing_2"] {
                assert!(validate_schema(ok).is_ok(), "{ok}");
            }
            let long = "a".repeat(MAX_SCHEMA_LEN + 1);
            let bad = [
                "",
                "Billing",
                "a-b",
                "a;drop",
                "a\"b",
                "1abc",
                "pg_catalog",
                "é",
                &long,
            ];
            for name in bad {
                assert!(validate_schema(name).is_err(), "{name}");
            }
        }
        #[cfg(feature = "sqlite")]
        {
            use sqlite::{MAX_PREFIX_LEN, validate_prefix};
            for ok in ["swg_", "", "app_1_", "_x"] {
                assert!(validate_prefix(ok).is_ok(), "{ok}");
            }
            let long = "a".repeat(MAX_PREFIX_LEN + 1);
            let bad = [
                "Swg_", "a-b", "a\"b", "x;drop", "1x", "sqlite_x", "é", &long,
            ];
            for name in bad {
                assert!(validate_prefix(name).is_err(), "{name}");
            }
        }
    }

    #[test]
    fn limits_of_zero_mean_none() {
        assert_eq!(limit_of(0), i64::MAX);
        assert_eq!(limit_of(7), 7);
    }
}
