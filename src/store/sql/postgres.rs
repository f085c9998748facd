//! The PostgreSQL store (feature `postgres`): [`PgStore`] implements
//! [`EventLedger`](crate::store::EventLedger), [`SubscriptionStore`](crate::store::SubscriptionStore), [`CursorStore`](crate::store::CursorStore) and
//! [`InboxStore`](crate::store::InboxStore) over a `sqlx` pool, with runtime queries only and embedded
//! migrations. It passes the whole conformance suite (`store::conformance`).
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
//! | `fingerprint` | `bytea` | 32 bytes, [`Fingerprint`](crate::ledger::Fingerprint) of the first delivery |
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
//! [`EventKey`](crate::ledger::EventKey) with `Some("")` is the platform's). Times are `timestamptz`,
//! microsecond precision.
//!
//! `subscriptions`: `id text` primary key, `customer text`,
//! `client_reference_id text`, `needs_review boolean`,
//! `needs_reconcile boolean`, `last_verified_with_stripe timestamptz`,
//! `version bigint`, `record jsonb` (the whole [`SubscriptionRecord`](crate::subscription::SubscriptionRecord); the
//! other columns are copies for lookups), `updated_at timestamptz`. Indexes
//! on `(customer, id)` and `(client_reference_id, id)`, and partial indexes
//! on `id` where `needs_review` / `needs_reconcile`.
//!
//! `entitlements`: `customer text` primary key, `version bigint`,
//! `entitlements jsonb` (the [`CustomerEntitlements`](crate::subscription::CustomerEntitlements)), `updated_at`.
//!
//! `cursors`: `name text` primary key, `value text`, `updated_at`.
//!
//! `schema_migrations`: `version bigint` primary key, `name text`,
//! `applied_at timestamptz`: the migrations applied (see
//! `PgStore::migrate`).
//!
//! # How the rules are enforced
//!
//! - **Claims** are arbitrated by the primary key: `INSERT … ON CONFLICT DO
//!   NOTHING` takes a new event in one statement. When the row exists, a
//!   plain read on the same connection answers a settled entry (processed,
//!   ignored, dead: a duplicate) and one with another fingerprint (a
//!   conflict), as `decide_claim` would whatever the lease; otherwise a
//!   transaction locks it (`SELECT … FOR UPDATE`), reads `clock_timestamp()`
//!   and applies `decide_claim` from [`crate::ledger`]: the same function
//!   the in-memory store uses.
//! - **Leases** run on the database's clock (`clock_timestamp()`), never the
//!   application's. Tokens come from a sequence, so each claim gets its own.
//! - **Completion, failure and release** are fenced by the token in the
//!   `WHERE` clause; when nothing matched, the row is read back and judged by
//!   `check_completion` / `check_fence` (a repeated completion by the same
//!   lease is a no-op success, anything else is
//!   [`StoreErrorKind::LeaseLost`]).
//! - **Saves** are compare-and-set on `version` (`UPDATE … WHERE id = $1 AND
//!   version = $2`, or insert-if-absent for version 0);
//!   [`StoreErrorKind::Conflict`] on mismatch.
//! - **Inbox `enqueue`** of an event already claimed by a synchronous
//!   delivery (no payload stored) attaches the payload to the unsettled
//!   entry, so a worker can take the event over once the lease expires.
//! - **Inbox `take`** picks, oldest `event_created` first, the oldest due
//!   event of each subscription that has no event under a live lease, and
//!   locks the rows with `FOR UPDATE SKIP LOCKED`. Each subscription is then
//!   guarded by a transaction-scoped advisory lock
//!   (`pg_try_advisory_xact_lock`) and re-checked in a fresh statement before
//!   its event is leased, so concurrent workers never hold two events of one
//!   subscription, and never wait on each other.
//! - **Errors**: serialization failures (`40001`) and deadlocks (`40P01`) are
//!   retried up to five times, after a pause that grows with each retry
//!   (with jitter), then reported as
//!   [`StoreErrorKind::Unavailable`]; connection, I/O and pool-timeout errors
//!   are `Unavailable`; undecodable rows are [`StoreErrorKind::Corrupt`].
//!   Messages carry the operation and the SQLSTATE, never a payload.
//!
//! # Effects in the same transaction
//!
//! When the application's own writes must commit or roll back together with
//! the event's completion (a credit granted exactly once, say), open a
//! transaction with `PgStore::begin`, do the writes, call
//! `PgStore::complete_in` with the lease, and commit. If the lease was lost
//! (another worker took the event over), `complete_in` fails and the
//! application rolls back. The processor's own later [`EventLedger::complete`](crate::store::EventLedger::complete)
//! with the same lease is then a no-op.
//!
//! The pool's `acquire_timeout` bounds how long an operation waits for a
//! connection (sqlx's default is 30 seconds); a timeout is reported as
//! [`StoreErrorKind::Unavailable`].

use std::sync::Arc;

use serde::de::DeserializeOwned;
use sqlx::postgres::{PgArguments, PgConnection, PgPool, PgRow, Postgres};
use sqlx::types::Json;
use sqlx::{AssertSqlSafe, Row};
use time::OffsetDateTime;

use super::{Arg, Dialect, Fail, Migration, SqlStore, valid_name};
use crate::store::{StoreError, StoreErrorKind};

/// The schema `PgStore::new` uses.
pub const DEFAULT_SCHEMA: &str = "stripe_webhook_guard";

/// Longest schema name accepted.
pub(super) const MAX_SCHEMA_LEN: usize = 48;

/// The PostgreSQL store. Cheap to clone (the pool is shared). See the
/// [module docs](self) for the tables and how each rule is enforced.
///
/// It implements [`EventLedger`](crate::store::EventLedger),
/// [`SubscriptionStore`](crate::store::SubscriptionStore),
/// [`CursorStore`](crate::store::CursorStore) and
/// [`InboxStore`](crate::store::InboxStore), and has these methods of its own
/// (rustdoc does not list them here: the generic type behind this alias is
/// private):
///
/// - `PgStore::new(pool: PgPool) -> PgStore`: the schema [`DEFAULT_SCHEMA`];
/// - `PgStore::with_schema(pool: PgPool, schema: &str) -> Result<PgStore, StoreError>`:
///   another schema (1 to 48 characters of `[a-z0-9_]`, starting with a
///   letter or `_`, not `pg_`);
/// - `async fn migrate(&self) -> Result<usize, StoreError>`: creates the
///   schema and tables, applies the migrations not yet applied (under an
///   advisory lock, so instances may start together), returns how many ran;
/// - `fn schema(&self) -> &str` and `fn pool(&self) -> &PgPool`;
/// - `async fn begin(&self) -> Result<Transaction<'static, Postgres>, StoreError>`
///   and `async fn complete_in(&self, conn: &mut PgConnection, lease: &Lease)
///   -> Result<(), StoreError>`: complete an event inside the application's
///   own transaction, so its writes and the completion commit together.
pub type PgStore = SqlStore<Pg>;

mod dialect {
    /// The PostgreSQL dialect of the SQL store.
    #[derive(Debug, Clone, Copy)]
    pub struct Pg;
}
use dialect::Pg;

sqlx_query!(Postgres, PgArguments, std::convert::identity, Json);

fn sqlstate(e: &sqlx::Error) -> Option<String> {
    match e {
        sqlx::Error::Database(db) => db.code().map(std::borrow::Cow::into_owned),
        _ => None,
    }
}

impl Dialect for Pg {
    const STORE: &'static str = "PgStore";
    const NAME: &'static str = "postgres";
    const NAMING: &'static str = "schema";
    const NOW: &'static str = "clock_timestamp()";
    const LOCK_ROW: &'static str = " FOR UPDATE";
    const LOCK_TAKE: &'static str = " FOR UPDATE OF l SKIP LOCKED";
    const TRY_LOCK_SUBSCRIPTION: Option<&'static str> = Some(
        "SELECT CAST(CASE WHEN pg_try_advisory_xact_lock(hashtextextended($1, 0)) \
         THEN 1 ELSE 0 END AS bigint) AS mine",
    );
    const DATA_MODIFYING_CTE: bool = true;
    const MIGRATIONS: &'static [Migration] = &[Migration {
        version: 1,
        name: "init",
        sql: include_str!("../../../migrations/postgres/0001_init.sql"),
    }];

    sqlx_plumbing!(Postgres, PgPool, PgConnection, PgRow);

    fn table(schema: &str, table: &str) -> String {
        let table = if table == "migrations" {
            "schema_migrations"
        } else {
            table
        };
        format!("\"{schema}\".{table}")
    }

    fn token_expr(schema: &str) -> String {
        format!("nextval('\"{schema}\".lease_token_seq')")
    }

    fn next_token(_: &str) -> Option<String> {
        None
    }

    fn plus_micros(time: &str, micros: &str) -> String {
        format!("{time} + {micros} * interval '1 microsecond'")
    }

    fn migration_sql(sql: &str, schema: &str) -> String {
        sql.replace("{s}", &format!("\"{schema}\""))
    }

    fn migrations_table(_: &str) -> String {
        "CREATE TABLE IF NOT EXISTS {migrations} (version bigint PRIMARY KEY, \
         name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT clock_timestamp())"
            .to_owned()
    }

    async fn prepare_migration(tx: &mut PgConnection, schema: &str) -> Result<(), sqlx::Error> {
        sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))")
            .bind(format!("stripe_webhook_guard:migrate:{schema}"))
            .execute(&mut *tx)
            .await?;
        // Created only when absent, so a role without CREATE on the
        // database can use a schema prepared for it.
        let exists: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)")
                .bind(schema)
                .fetch_one(&mut *tx)
                .await?;
        if !exists {
            sqlx::raw_sql(AssertSqlSafe(format!("CREATE SCHEMA \"{schema}\"")))
                .execute(&mut *tx)
                .await?;
        }
        Ok(())
    }

    async fn begin(pool: &PgPool) -> Result<Self::Tx, sqlx::Error> {
        pool.begin().await
    }

    fn time(row: &PgRow, column: &str) -> Result<Option<OffsetDateTime>, Fail> {
        Ok(row.try_get(column)?)
    }

    fn json<T: DeserializeOwned>(row: &PgRow, column: &str) -> Result<T, Fail> {
        let Json(value) = row.try_get(column)?;
        Ok(value)
    }

    /// Serialization failure or deadlock: the transaction may simply be
    /// re-run.
    fn is_transient(e: &sqlx::Error) -> bool {
        matches!(sqlstate(e).as_deref(), Some("40001" | "40P01"))
    }

    fn database_error(
        code: Option<&str>,
        _message: &str,
    ) -> (StoreErrorKind, String, &'static str) {
        use StoreErrorKind as K;
        let code = code.unwrap_or_default();
        let kind = match code {
            "40001" | "40P01" => K::Unavailable,
            "57014" | "55P03" | "25P03" => K::Timeout,
            "23505" => K::Conflict,
            "XX001" | "XX002" => K::Corrupt,
            c if c.starts_with("08") || c.starts_with("53") || c.starts_with("57P") => {
                K::Unavailable
            }
            _ => K::Other,
        };
        let hint = match code {
            "40001" | "40P01" => " (still failing after retries)",
            "42P01" | "3F000" | "42883" => " (schema or table missing: run migrate())",
            _ => "",
        };
        (kind, format!("SQLSTATE {code}"), hint)
    }
}

/// Checks a schema name: `[a-z0-9_]`, starting with a letter or `_`, 1 to 48
/// bytes, not starting with `pg_`.
pub(super) fn validate_schema(schema: &str) -> Result<(), StoreError> {
    let ok = !schema.is_empty() && valid_name(schema, MAX_SCHEMA_LEN, "pg_");
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

impl SqlStore<Pg> {
    /// A store over `pool` in the schema [`DEFAULT_SCHEMA`]. Call
    /// `PgStore::migrate` before use.
    pub fn new(pool: PgPool) -> Self {
        Self::build(pool, DEFAULT_SCHEMA)
    }

    /// A store over `pool` in `schema` (created by `PgStore::migrate` if
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

    /// The schema the tables live in.
    pub fn schema(&self) -> &str {
        &self.naming
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statements_are_rendered_with_the_quoted_schema() {
        let s = super::super::Statements::new::<Pg>("x");
        assert!(s.claim_insert.contains("\"x\".ledger"));
        assert!(s.claim_insert.contains("nextval('\"x\".lease_token_seq')"));
        for rendered in [&s.take, &s.reclaim, &s.expire_to_dead, &s.lock_entry] {
            assert!(!rendered.contains('{'), "{rendered}");
        }
        assert!(s.take.ends_with("FOR UPDATE OF l SKIP LOCKED"));
    }
}
