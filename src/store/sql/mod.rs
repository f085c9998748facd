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
    IgnoreOutcome, IgnoreRequest, Lease, LeaseToken, LedgerEntry, LedgerQuery, LedgerState,
    check_completion, check_fence, decide_claim, state_after_failure,
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
    /// Whether a statement may hold `INSERT`/`UPDATE` in its `WITH` clause
    /// (then an inbox delivery is stored or answered in one statement).
    const DATA_MODIFYING_CTE: bool = false;
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

mod ops;
mod statements;

use statements::Statements;

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
