//! The SQLite store (feature `sqlite`): [`SqliteStore`] implements
//! [`EventLedger`](crate::store::EventLedger), [`SubscriptionStore`](crate::store::SubscriptionStore), [`CursorStore`](crate::store::CursorStore) and
//! [`InboxStore`](crate::store::InboxStore) over a `sqlx` pool, with runtime queries only and embedded
//! migrations. It passes the whole conformance suite (`store::conformance`).
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use stripe_webhook_guard::store::SqliteStore;
//! // WAL, synchronous = FULL, a 5 s busy timeout, created if missing:
//! let store = SqliteStore::open("billing.db").await?;
//! store.migrate().await?; // idempotent: run it at every start
//! # Ok(()) }
//! ```
//!
//! With a pool of your own, use `SqliteStore::connect_options` (or at least
//! WAL and a busy timeout) and `SqliteStore::new` /
//! `SqliteStore::with_prefix`. An in-memory database needs a pool of one
//! connection (each connection to `sqlite::memory:` is its own database).
//!
//! # Durability
//!
//! The store opens databases in WAL mode with `synchronous = FULL` (the
//! default of `SqliteStore::connect_options` and `SqliteStore::open`):
//! every commit is flushed to disk before it returns, so an event the
//! store acknowledged (claimed, completed, enqueued) survives a power loss
//! or an operating-system crash. With `synchronous = NORMAL`, WAL commits
//! are flushed only at checkpoints: faster (often several times more
//! commits per second on slow disks), still safe against the application
//! crashing, but the last commits before a power loss can be lost, and with
//! them events Stripe was told were received. Opt in to that with
//! [`Durability::Normal`] (`SqliteStore::connect_options_with`,
//! `SqliteStore::open_with`) only when losing recent acknowledgements is
//! acceptable (reconciliation replays the missed events from Stripe's event
//! list, within its 30 days).
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
//! | `fingerprint` | `BLOB` | 32 bytes, [`Fingerprint`](crate::ledger::Fingerprint) of the first delivery |
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
//! [`EventKey`](crate::ledger::EventKey) with `Some("")` is the platform's).
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
//! `version INTEGER`, `record TEXT` (the whole [`SubscriptionRecord`](crate::subscription::SubscriptionRecord) as
//! JSON; the other columns are copies for lookups), `updated_at INTEGER`.
//! Indexes on `(customer, id)` and `(client_reference_id, id)`.
//!
//! `swg_entitlements`: `customer TEXT` primary key, `version INTEGER`,
//! `entitlements TEXT` (JSON of [`CustomerEntitlements`](crate::subscription::CustomerEntitlements)), `updated_at`.
//!
//! `swg_cursors`: `name TEXT` primary key, `value TEXT`, `updated_at`.
//!
//! `swg_sequences`: `name TEXT` primary key, `value INTEGER` (the lease-token
//! counter). `swg_migrations`: `version INTEGER` primary key, `name TEXT`,
//! `applied_at INTEGER` (see `SqliteStore::migrate`).
//!
//! # How the rules are enforced
//!
//! SQLite has one writer at a time, so every read-modify-write runs in a
//! `BEGIN IMMEDIATE` transaction (the write lock is taken up front; waiting
//! writers queue on the busy timeout):
//!
//! - **Claims** read the database's `now` and the row, apply `decide_claim`
//!   from [`crate::ledger`] (the same function the in-memory store uses),
//!   and insert or update. The primary key `(event_id, account)` is the
//!   arbiter; tokens come from the `lease_token` counter, one per claim.
//! - **Completion and release** are single statements fenced by the token;
//!   when nothing matched, the row is judged by `check_completion` /
//!   `check_fence` (a repeated completion by the same lease is a no-op
//!   success, anything else is [`StoreErrorKind::LeaseLost`]). **Failure**
//!   reads the row in a transaction and applies `check_fence` and
//!   `state_after_failure`.
//! - **Saves** are compare-and-set on `version`; [`StoreErrorKind::Conflict`]
//!   on mismatch.
//! - **Inbox `take`** runs in one `BEGIN IMMEDIATE` transaction: it picks,
//!   oldest `event_created` first, the oldest due event of each subscription
//!   that has no event under a live lease, and leases them.
//! - **Inbox `enqueue`** of an event already claimed by a synchronous
//!   delivery (no payload stored) attaches the payload to the unsettled
//!   entry, so a worker can take the event over once the lease expires.
//! - **Errors**: a busy database (after the busy timeout), I/O errors and
//!   pool timeouts are [`StoreErrorKind::Unavailable`] (`SQLITE_LOCKED` and
//!   `SQLITE_BUSY_SNAPSHOT` are retried up to five times first, after a
//!   pause that grows with each retry, with jitter); undecodable
//!   rows and a corrupt file are [`StoreErrorKind::Corrupt`]. Messages carry
//!   the operation and SQLite's result code, never a payload.
//!
//! # Effects in the same transaction
//!
//! As with PostgreSQL: `SqliteStore::begin` opens a `BEGIN IMMEDIATE`
//! transaction; do the application's writes, call
//! `SqliteStore::complete_in` with the lease, and commit, so the writes
//! and the completion happen together or not at all. The processor's later
//! [`EventLedger::complete`](crate::store::EventLedger::complete) with the same lease is then a no-op. The
//! transaction holds SQLite's write lock, so keep it short.

use std::path::Path;
use std::sync::Arc;

use serde::de::DeserializeOwned;
use sqlx::sqlite::{
    SqliteArguments, SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePool,
    SqlitePoolOptions, SqliteRow, SqliteSynchronous,
};
use sqlx::{Row, Sqlite};
use time::OffsetDateTime;

use super::{Arg, Dialect, Fail, Migration, SqlStore, classify, corrupt, valid_name};
use crate::store::{StoreError, StoreErrorKind};

/// The table prefix `SqliteStore::new` uses.
pub const DEFAULT_PREFIX: &str = "swg_";

/// Longest prefix accepted.
pub(super) const MAX_PREFIX_LEN: usize = 32;

/// The SQLite store. Cheap to clone (the pool is shared). See the
/// [module docs](self) for the tables, the durability trade-off and how each
/// rule is enforced.
///
/// It implements [`EventLedger`](crate::store::EventLedger),
/// [`SubscriptionStore`](crate::store::SubscriptionStore),
/// [`CursorStore`](crate::store::CursorStore) and
/// [`InboxStore`](crate::store::InboxStore), and has these methods of its own
/// (rustdoc does not list them here: the generic type behind this alias is
/// private):
///
/// - `SqliteStore::open(path) -> Result<SqliteStore, StoreError>` and
///   `SqliteStore::open_with(path, Durability)`: a database file (created if
///   absent) with the recommended options, `synchronous = FULL` unless
///   [`Durability::Normal`] is asked for;
/// - `SqliteStore::connect_options(path)` / `connect_options_with(path,
///   Durability)`: those options, for a pool of your own;
/// - `SqliteStore::new(pool)` (prefix [`DEFAULT_PREFIX`]) and
///   `SqliteStore::with_prefix(pool, prefix) -> Result<SqliteStore, StoreError>`
///   (up to 32 characters of `[a-z0-9_]`, not starting with a digit or
///   `sqlite_`);
/// - `async fn migrate(&self) -> Result<usize, StoreError>`: creates the
///   tables and applies the migrations not yet applied, returns how many ran;
/// - `fn prefix(&self) -> &str` and `fn pool(&self) -> &SqlitePool`;
/// - `async fn begin(&self)` (`BEGIN IMMEDIATE`) and `async fn
///   complete_in(&self, conn, lease)`: complete an event inside the
///   application's own transaction.
pub type SqliteStore = SqlStore<Lite>;

mod dialect {
    /// The SQLite dialect of the SQL store.
    #[derive(Debug, Clone, Copy)]
    pub struct Lite;
}
use dialect::Lite;

/// How much a commit waits for the disk (SQLite's `synchronous` setting in
/// WAL mode). See the [module docs](self#durability).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Durability {
    /// `synchronous = FULL`: every commit is on disk when it returns; an
    /// acknowledged event survives a power loss. The default.
    #[default]
    Full,
    /// `synchronous = NORMAL`: commits reach the disk at checkpoints; safe
    /// against application crashes, but a power loss can undo the last
    /// commits (and lose events already acknowledged to Stripe).
    Normal,
}

/// The database's clock in Unix microseconds (millisecond resolution; the
/// same value for every use within one statement).
const NOW_US: &str = "(CAST(ROUND((julianday('now') - 2440587.5) * 86400000.0) AS INTEGER) * 1000)";

/// Unix microseconds (floor). Every `OffsetDateTime` fits.
fn to_us(t: OffsetDateTime) -> i64 {
    let us = t.unix_timestamp_nanos().div_euclid(1000);
    i64::try_from(us).unwrap_or(if us < 0 { i64::MIN } else { i64::MAX })
}

/// JSON documents are stored as text. Takes the value as the binding macro
/// hands it over (PostgreSQL's `Json` wrapper consumes it).
#[allow(clippy::needless_pass_by_value)]
fn json_text(value: serde_json::Value) -> String {
    value.to_string()
}

fn from_us(us: i64, what: &str) -> Result<OffsetDateTime, Fail> {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(us) * 1000)
        .map_err(|_| corrupt("sqlite", what))
}

sqlx_query!(Sqlite, SqliteArguments, to_us, json_text);

/// The extended result code of a database error.
fn result_code(e: &sqlx::Error) -> Option<i32> {
    match e {
        sqlx::Error::Database(db) => db.code().and_then(|c| c.parse().ok()),
        _ => None,
    }
}

impl Dialect for Lite {
    const STORE: &'static str = "SqliteStore";
    const NAME: &'static str = "sqlite";
    const NAMING: &'static str = "prefix";
    const NOW: &'static str = NOW_US;
    // Transactions begin with `BEGIN IMMEDIATE`: the write lock is held
    // from the start, so rows need no lock of their own.
    const LOCK_ROW: &'static str = "";
    const LOCK_TAKE: &'static str = "";
    const TRY_LOCK_SUBSCRIPTION: Option<&'static str> = None;
    const MIGRATIONS: &'static [Migration] = &[Migration {
        version: 1,
        name: "init",
        sql: include_str!("../../../migrations/sqlite/0001_init.sql"),
    }];

    sqlx_plumbing!(Sqlite, SqlitePool, SqliteConnection, SqliteRow);

    fn table(prefix: &str, table: &str) -> String {
        format!("\"{prefix}{table}\"")
    }

    fn token_expr(_: &str) -> String {
        "$7".to_owned()
    }

    fn next_token(_: &str) -> Option<String> {
        Some(
            "UPDATE {sequences} SET value = value + 1 WHERE name = 'lease_token' \
             RETURNING value"
                .to_owned(),
        )
    }

    fn plus_micros(time: &str, micros: &str) -> String {
        format!("{time} + {micros}")
    }

    fn migration_sql(sql: &str, prefix: &str) -> String {
        sql.replace("{p}", prefix)
    }

    fn migrations_table(_: &str) -> String {
        "CREATE TABLE IF NOT EXISTS {migrations} (version INTEGER PRIMARY KEY, \
         name TEXT NOT NULL, applied_at INTEGER NOT NULL) STRICT"
            .to_owned()
    }

    async fn prepare_migration(_: &mut SqliteConnection, _: &str) -> Result<(), sqlx::Error> {
        // `BEGIN IMMEDIATE` already serializes concurrent migrations.
        Ok(())
    }

    async fn begin(pool: &SqlitePool) -> Result<Self::Tx, sqlx::Error> {
        pool.begin_with("BEGIN IMMEDIATE").await
    }

    fn time(row: &SqliteRow, column: &str) -> Result<Option<OffsetDateTime>, Fail> {
        let us: Option<i64> = row.try_get(column)?;
        us.map(|us| from_us(us, column)).transpose()
    }

    fn json<T: DeserializeOwned>(row: &SqliteRow, column: &str) -> Result<T, Fail> {
        let json: String = row.try_get(column)?;
        serde_json::from_str(&json).map_err(|_| corrupt("sqlite", column))
    }

    /// `SQLITE_LOCKED` or `SQLITE_BUSY_SNAPSHOT`: the busy handler does not
    /// wait for these; re-running the transaction does.
    fn is_transient(e: &sqlx::Error) -> bool {
        matches!(result_code(e), Some(c) if c & 0xff == 6 || c == 517)
    }

    fn database_error(code: Option<&str>, message: &str) -> (StoreErrorKind, String, &'static str) {
        use StoreErrorKind as K;
        let code: i32 = code.and_then(|c| c.parse().ok()).unwrap_or(1);
        let kind = match code & 0xff {
            5 | 6 | 10 | 13 | 14 | 15 => K::Unavailable,
            11 | 26 => K::Corrupt,
            19 if matches!(code, 1555 | 2067) => K::Conflict,
            _ => K::Other,
        };
        let hint = match code & 0xff {
            5 => " (database busy: another writer held the lock past the busy timeout)",
            1 if message.contains("no such table") => " (table missing: run migrate())",
            _ => "",
        };
        (kind, format!("result code {code}"), hint)
    }
}

/// Checks a prefix: up to 32 bytes of `[a-z0-9_]`, not starting with a
/// digit or `sqlite_`.
pub(super) fn validate_prefix(prefix: &str) -> Result<(), StoreError> {
    let ok = valid_name(prefix, MAX_PREFIX_LEN, "sqlite_");
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

impl SqlStore<Lite> {
    /// A store over `pool` with the table prefix [`DEFAULT_PREFIX`]. Call
    /// `SqliteStore::migrate` before use.
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

    /// The recommended connection options for a database file: created if
    /// missing, WAL journal, `synchronous = FULL` (see
    /// [Durability](self#durability)), a 5 second busy timeout.
    pub fn connect_options(path: impl AsRef<Path>) -> SqliteConnectOptions {
        Self::connect_options_with(path, Durability::Full)
    }

    /// `SqliteStore::connect_options` with the given [`Durability`]:
    /// [`Durability::Normal`] trades the last commits before a power loss
    /// for speed.
    ///
    /// ```
    /// use stripe_webhook_guard::store::SqliteStore;
    /// use stripe_webhook_guard::store::sqlite::Durability;
    /// let options = SqliteStore::connect_options_with("billing.db", Durability::Normal);
    /// # let _ = options;
    /// ```
    pub fn connect_options_with(
        path: impl AsRef<Path>,
        durability: Durability,
    ) -> SqliteConnectOptions {
        let synchronous = match durability {
            Durability::Full => SqliteSynchronous::Full,
            Durability::Normal => SqliteSynchronous::Normal,
        };
        SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(synchronous)
            .busy_timeout(std::time::Duration::from_secs(5))
    }

    /// Opens (or creates) the database file at `path` with
    /// `SqliteStore::connect_options` and a pool of up to 8 connections
    /// (5 second acquire timeout), with the default prefix. Call
    /// `SqliteStore::migrate` next.
    ///
    /// # Errors
    ///
    /// [`StoreErrorKind::Unavailable`] when the file cannot be opened or
    /// created; other kinds for other failures.
    pub async fn open(path: impl AsRef<Path>) -> Result<Self, StoreError> {
        Self::open_with(path, Durability::Full).await
    }

    /// `SqliteStore::open` with the given [`Durability`].
    ///
    /// # Errors
    ///
    /// As `SqliteStore::open`.
    pub async fn open_with(
        path: impl AsRef<Path>,
        durability: Durability,
    ) -> Result<Self, StoreError> {
        let pool = SqlitePoolOptions::new()
            .max_connections(8)
            .acquire_timeout(std::time::Duration::from_secs(5))
            .connect_with(Self::connect_options_with(path, durability))
            .await
            .map_err(|e| classify::<Lite>("open", e))?;
        Ok(Self::new(pool))
    }

    /// The table prefix.
    pub fn prefix(&self) -> &str {
        &self.naming
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let s = super::super::Statements::new::<Lite>("app_");
        assert!(s.get.contains("\"app_ledger\""));
        for rendered in [&s.take, &s.reclaim, &s.claim_insert, &s.lock_entry] {
            assert!(!rendered.contains('{'), "{rendered}");
        }
        assert!(
            s.next_token
                .as_deref()
                .is_some_and(|t| t.contains("\"app_sequences\""))
        );
    }
}
