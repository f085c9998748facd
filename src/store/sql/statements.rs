//! The SQL text of every statement, built once per store from the dialect's
//! table names and fragments.

// One module in two files: the parent's private items are this file's too.
#[allow(clippy::wildcard_imports)]
use super::*;

/// The ledger columns, read as `l`.
pub(super) const COLUMNS: &str = "l.event_id, l.account, l.event_type, l.event_created, l.fingerprint, \
     l.state, l.attempts, l.lease_token, l.lease_expires_at, l.last_error, l.ignore_reason, \
     l.payload, l.subscription_id, l.available_at, l.first_seen_at, l.updated_at";

/// "No other event of subscription `$6` holds a live lease at `$5`".
pub(super) const NO_LIVE_SIBLING: &str = "($6 IS NULL OR NOT EXISTS (SELECT 1 FROM {ledger} o \
     WHERE o.subscription_id = $6 AND o.state = 'processing' AND o.lease_expires_at > $5 \
     AND NOT (o.event_id = $1 AND o.account = $2)))";

/// The statements with naming, clock and dialect fragments filled in,
/// rendered once per store.
pub(super) struct Statements {
    pub(super) now: Arc<str>,
    pub(super) next_token: Option<Arc<str>>,
    pub(super) lock_entry: Arc<str>,
    pub(super) claim_insert: Arc<str>,
    pub(super) reclaim: Arc<str>,
    pub(super) expire_to_dead: Arc<str>,
    pub(super) complete: Arc<str>,
    pub(super) fail: Arc<str>,
    pub(super) release: Arc<str>,
    pub(super) ignore: Arc<str>,
    pub(super) state_of: Arc<str>,
    pub(super) get: Arc<str>,
    pub(super) list: Arc<str>,
    pub(super) requeue: Arc<str>,
    pub(super) prune: Arc<str>,
    pub(super) enqueue: Arc<str>,
    pub(super) attach_payload: Arc<str>,
    /// `enqueue`, else `attach_payload`, then the entry's state, in one
    /// statement (dialects with data-modifying `WITH`).
    pub(super) enqueue_or_state: Option<Arc<str>>,
    pub(super) take: Arc<str>,
    pub(super) try_lock_subscription: Option<Arc<str>>,
    pub(super) retry_after: Arc<str>,
    pub(super) renew: Arc<str>,
    pub(super) keep_payload: Arc<str>,
    pub(super) backlog: Arc<str>,
    pub(super) sub_load: Arc<str>,
    pub(super) sub_insert: Arc<str>,
    pub(super) sub_update: Arc<str>,
    pub(super) sub_by_customer: Arc<str>,
    pub(super) sub_by_reference: Arc<str>,
    pub(super) sub_list: Arc<str>,
    pub(super) ent_load: Arc<str>,
    pub(super) ent_insert: Arc<str>,
    pub(super) ent_update: Arc<str>,
    pub(super) cursor_load: Arc<str>,
    pub(super) cursor_save: Arc<str>,
    pub(super) migrations_table: Arc<str>,
    pub(super) migrations_applied: Arc<str>,
    pub(super) migration_record: Arc<str>,
}

impl Statements {
    pub(super) fn new<D: Dialect>(naming: &str) -> Self {
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
            ("{due}", D::plus_micros("{now}", "$3")),
            ("{renewed}", D::plus_micros("n.t", "$4")),
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
                 RETURNING lease_token, lease_expires_at, updated_at"),
            reclaim: r(
                "UPDATE {ledger} AS l SET state = 'processing', attempts = $3, \
                 lease_token = {token}, lease_expires_at = $4, updated_at = $5 \
                 WHERE l.event_id = $1 AND l.account = $2 AND {no_live_sibling} \
                 RETURNING lease_token, lease_expires_at, updated_at",
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
                 fingerprint, state, attempts, payload, subscription_id, \
                 first_seen_at, updated_at) \
                 SELECT $1, $2, $3, $4, $5, 'pending', 0, $6, $7, n.t, n.t \
                 FROM (SELECT {now} AS t) n WHERE true \
                 ON CONFLICT (event_id, account) DO NOTHING",
            ),
            attach_payload: r("UPDATE {ledger} SET payload = $4, \
                 subscription_id = COALESCE(subscription_id, $5) \
                 WHERE event_id = $1 AND account = $2 AND fingerprint = $3 \
                 AND payload IS NULL AND state IN ('pending', 'processing', 'failed')"),
            enqueue_or_state: D::DATA_MODIFYING_CTE.then(|| {
                r(
                    "WITH ins AS (INSERT INTO {ledger} (event_id, account, event_type, \
                 event_created, fingerprint, state, attempts, payload, subscription_id, \
                 first_seen_at, updated_at) \
                 SELECT $1, $2, $3, $4, $5, 'pending', 0, $6, $7, n.t, n.t \
                 FROM (SELECT {now} AS t) n WHERE true \
                 ON CONFLICT (event_id, account) DO NOTHING RETURNING 1), \
                 att AS (UPDATE {ledger} SET payload = $6, \
                 subscription_id = COALESCE(subscription_id, $7) \
                 WHERE event_id = $1 AND account = $2 AND fingerprint = $5 \
                 AND payload IS NULL AND state IN ('pending', 'processing', 'failed') \
                 AND NOT EXISTS (SELECT 1 FROM ins) RETURNING 1) \
                 SELECT CAST(CASE WHEN EXISTS (SELECT 1 FROM ins) THEN 1 ELSE 0 END \
                 AS bigint) AS queued, l.state, l.fingerprint \
                 FROM (SELECT 1 AS one) d LEFT JOIN {ledger} l \
                 ON l.event_id = $1 AND l.account = $2",
                )
            }),
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
            renew: r("WITH n AS (SELECT {now} AS t) UPDATE {ledger} \
                 SET lease_expires_at = (SELECT {renewed} FROM n), \
                 updated_at = (SELECT n.t FROM n) \
                 WHERE event_id = $1 AND account = $2 AND state = 'processing' \
                 AND lease_token = $3 \
                 RETURNING lease_token, lease_expires_at, updated_at"),
            retry_after: r("UPDATE {ledger} SET available_at = {due} \
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
