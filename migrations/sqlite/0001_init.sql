-- stripe-webhook-guard, SQLite schema version 1 (SQLite 3.37 or later:
-- STRICT tables, RETURNING).
--
-- Applied by `SqliteStore::migrate()` inside one `BEGIN IMMEDIATE`
-- transaction and recorded in {p}migrations. `{p}` is replaced by the
-- validated table prefix ([a-z0-9_] only); nothing else is interpolated.
-- Times are INTEGER Unix microseconds, taken from the database's clock for
-- leases.

-- Counters: `lease_token` gives one fencing token per claim.
CREATE TABLE "{p}sequences" (
    name  TEXT PRIMARY KEY,
    value INTEGER NOT NULL
) STRICT;
INSERT INTO "{p}sequences" (name, value) VALUES ('lease_token', 0);

-- The exactly-once ledger, also the inbox queue.
CREATE TABLE "{p}ledger" (
    event_id         TEXT NOT NULL,
    -- '' for the platform's own events, acct_... for Connect events.
    account          TEXT NOT NULL DEFAULT '',
    event_type       TEXT NOT NULL,
    event_created    INTEGER NOT NULL,
    fingerprint      BLOB NOT NULL CHECK (length(fingerprint) = 32),
    state            TEXT NOT NULL
                     CHECK (state IN ('pending', 'processing', 'processed', 'failed', 'dead', 'ignored')),
    attempts         INTEGER NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    lease_token      INTEGER,
    lease_expires_at INTEGER,
    last_error       TEXT,
    ignore_reason    TEXT,
    payload          TEXT,
    subscription_id  TEXT,
    available_at     INTEGER,
    first_seen_at    INTEGER NOT NULL,
    updated_at       INTEGER NOT NULL,
    PRIMARY KEY (event_id, account)
) STRICT;

-- Inbox `take` (oldest `event_created` first) and `backlog`.
CREATE INDEX "{p}ledger_inbox_idx" ON "{p}ledger" (event_created, event_id, account)
    WHERE state IN ('pending', 'processing', 'failed');

-- Per-subscription serialization in `take`.
CREATE INDEX "{p}ledger_subscription_idx" ON "{p}ledger" (subscription_id, state)
    WHERE subscription_id IS NOT NULL AND state IN ('pending', 'processing', 'failed');

-- Listing by state (dead letters) and pruning by age.
CREATE INDEX "{p}ledger_state_idx" ON "{p}ledger" (state, updated_at);

-- Subscription records: the JSON text is the record; the other columns are
-- copies of its fields for lookups and filters.
CREATE TABLE "{p}subscriptions" (
    id                        TEXT PRIMARY KEY,
    customer                  TEXT,
    client_reference_id       TEXT,
    needs_review              INTEGER NOT NULL DEFAULT 0,
    needs_reconcile           INTEGER NOT NULL DEFAULT 0,
    last_verified_with_stripe INTEGER,
    version                   INTEGER NOT NULL CHECK (version > 0),
    record                    TEXT NOT NULL,
    updated_at                INTEGER NOT NULL
) STRICT;

CREATE INDEX "{p}subscriptions_customer_idx" ON "{p}subscriptions" (customer, id)
    WHERE customer IS NOT NULL;
CREATE INDEX "{p}subscriptions_client_reference_idx" ON "{p}subscriptions" (client_reference_id, id)
    WHERE client_reference_id IS NOT NULL;

-- Customer entitlements.
CREATE TABLE "{p}entitlements" (
    customer     TEXT PRIMARY KEY,
    version      INTEGER NOT NULL CHECK (version > 0),
    entitlements TEXT NOT NULL,
    updated_at   INTEGER NOT NULL
) STRICT;

-- Named cursors (the reconciler's position).
CREATE TABLE "{p}cursors" (
    name       TEXT PRIMARY KEY,
    value      TEXT NOT NULL,
    updated_at INTEGER NOT NULL
) STRICT;
