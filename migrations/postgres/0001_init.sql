-- stripe-webhook-guard, PostgreSQL schema version 1.
--
-- Applied by `PgStore::migrate()` inside one transaction, under an advisory
-- lock, and recorded in {s}.schema_migrations. `{s}` is replaced by the
-- quoted, validated schema name ([a-z0-9_] only); nothing else is
-- interpolated. Identifiers that order or page results use COLLATE "C" so
-- that ordering is bytewise, as in the in-memory store.

-- Fencing tokens: one value per claim.
CREATE SEQUENCE {s}.lease_token_seq AS bigint;

-- The exactly-once ledger, also the inbox queue.
CREATE TABLE {s}.ledger (
    event_id         text COLLATE "C" NOT NULL,
    -- '' for the platform's own events, acct_... for Connect events.
    account          text COLLATE "C" NOT NULL DEFAULT '',
    event_type       text NOT NULL,
    event_created    bigint NOT NULL,
    fingerprint      bytea NOT NULL CHECK (octet_length(fingerprint) = 32),
    state            text NOT NULL
                     CHECK (state IN ('pending', 'processing', 'processed', 'failed', 'dead', 'ignored')),
    attempts         bigint NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    lease_token      bigint,
    lease_expires_at timestamptz,
    last_error       text,
    ignore_reason    text,
    payload          text,
    subscription_id  text COLLATE "C",
    available_at     timestamptz,
    first_seen_at    timestamptz NOT NULL,
    updated_at       timestamptz NOT NULL,
    PRIMARY KEY (event_id, account)
);

-- Inbox `take` (oldest `event_created` first) and `backlog`: only unsettled
-- rows are indexed, so the index stays as small as the backlog.
CREATE INDEX ledger_inbox_idx ON {s}.ledger (event_created, event_id, account)
    WHERE state IN ('pending', 'processing', 'failed');

-- Per-subscription serialization in `take`: other unsettled events of the
-- same subscription.
CREATE INDEX ledger_subscription_idx ON {s}.ledger (subscription_id, state)
    WHERE subscription_id IS NOT NULL AND state IN ('pending', 'processing', 'failed');

-- Listing by state (dead letters) and pruning by age.
CREATE INDEX ledger_state_idx ON {s}.ledger (state, updated_at);

-- Subscription records: the JSON is the record; the other columns are copies
-- of its fields for lookups and filters.
CREATE TABLE {s}.subscriptions (
    id                        text COLLATE "C" PRIMARY KEY,
    customer                  text COLLATE "C",
    client_reference_id       text COLLATE "C",
    needs_review              boolean NOT NULL DEFAULT false,
    needs_reconcile           boolean NOT NULL DEFAULT false,
    last_verified_with_stripe timestamptz,
    version                   bigint NOT NULL CHECK (version > 0),
    record                    jsonb NOT NULL,
    updated_at                timestamptz NOT NULL DEFAULT clock_timestamp()
);

CREATE INDEX subscriptions_customer_idx ON {s}.subscriptions (customer, id)
    WHERE customer IS NOT NULL;
CREATE INDEX subscriptions_client_reference_idx ON {s}.subscriptions (client_reference_id, id)
    WHERE client_reference_id IS NOT NULL;
CREATE INDEX subscriptions_review_idx ON {s}.subscriptions (id) WHERE needs_review;
CREATE INDEX subscriptions_reconcile_idx ON {s}.subscriptions (id) WHERE needs_reconcile;

-- Customer entitlements.
CREATE TABLE {s}.entitlements (
    customer     text COLLATE "C" PRIMARY KEY,
    version      bigint NOT NULL CHECK (version > 0),
    entitlements jsonb NOT NULL,
    updated_at   timestamptz NOT NULL DEFAULT clock_timestamp()
);

-- Named cursors (the reconciler's position).
CREATE TABLE {s}.cursors (
    name       text COLLATE "C" PRIMARY KEY,
    value      text NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT clock_timestamp()
);
