//! A production-shaped Stripe webhook server on axum.
//!
//! ```text
//! STRIPE_WEBHOOK_SECRET=whsec_... \
//!   cargo run --example server --features axum,reqwest,tracing
//! stripe listen --forward-to localhost:4242/webhooks/stripe
//! ```
//!
//! Configuration, from the environment:
//!
//! | variable | meaning |
//! |---|---|
//! | `STRIPE_WEBHOOK_SECRET` | required; `whsec_…`, comma-separated while rolling a secret (any may match) |
//! | `STRIPE_SECRET_KEY` | optional; enables refetches and `POST /reconcile` (one request budget shared by both) |
//! | `STRIPE_API_BASE` | default `https://api.stripe.com` (point it at `stripe-mock` or a proxy) |
//! | `STRIPE_LIVEMODE` | optional `true`/`false`: ignore events of the other mode |
//! | `DATABASE_URL` | `postgres://…` (feature `postgres`) or `sqlite:path` (feature `sqlite`), migrated at start; unset: the in-memory store, which forgets everything at restart (a loud warning at start, and `/healthz` says `"durable": false`) |
//! | `DATABASE_SCHEMA` | PostgreSQL schema for the tables, default `stripe_webhook_guard` |
//! | `SQLITE_DURABILITY` | `full` (default: every acknowledged event is on disk, `synchronous = FULL`) or `normal` (faster commits; a power loss can undo the last ones) |
//! | `BIND` | default `127.0.0.1:4242` |
//! | `ADMIN_TOKEN` | at least 16 characters; the admin routes require `Authorization: Bearer <token>`. Required when `BIND` is not a loopback address (the server refuses to start without it) |
//! | `REQUEST_TIMEOUT_SECS` | default 20: answer 503 (Stripe retries) rather than hang |
//! | `HEADER_TIMEOUT_SECS` | default 10: a connection whose request head is not complete in time is closed (also idle keep-alive connections) |
//! | `BODY_TIMEOUT_SECS` | default 10: a webhook body not received in time is answered 408 |
//! | `SHUTDOWN_DEADLINE_SECS` | default 25: on SIGTERM, how long connections and webhook work may take before they are cut off (their claims released) |
//! | `MAX_CONNECTIONS` | default 256: connections served at once (more wait in the listen backlog) |
//! | `MAX_CONCURRENT_REQUESTS` | default 64: requests handled at once; above it 503 `overloaded` |
//! | `RETENTION_DAYS` | default 35, at least 33: processed and ignored ledger entries older than this are pruned (Stripe retries for 3 days and lists events for 30; the reconciler looks back 3 days) |
//! | `PRUNE_INTERVAL_SECS` | default 3600: how often the prune runs (first run at start) |
//! | `DEMO_HANDLER_DELAY_MS` | default 0: make the demo handler slow, to watch in-flight and shutdown behaviour |
//! | `RUST_LOG` | default `info`; logs go to stderr |
//!
//! Routes (all answers are JSON, errors included):
//!
//! - `POST /webhooks/stripe`: the crate's axum helper
//!   ([`stripe_webhook_guard::integrations::axum`]); 200 with the outcome,
//!   400/408/413 for bad deliveries, 5xx when Stripe should retry.
//! - `GET /healthz`: `{"status": "ok", "store": "postgres", "durable": true}`.
//!
//! Admin routes (behind `ADMIN_TOKEN`):
//!
//! - `GET /subscriptions/{id}`: the stored record, 404 if none.
//! - `GET /customers/{id}/access`: `{"access": "granted"|"grace"|"denied",
//!   "reason": …, "valid_until": …}` over all the customer's subscriptions.
//! - `GET /dead-letters?after=evt_…`: dead-lettered events (id, type,
//!   attempts, last error), 100 a page.
//! - `POST /dead-letters/{id}/replay?account=acct_…`: re-runs one dead (or
//!   failed) event from its stored payload (or from Stripe when none is
//!   stored and `STRIPE_SECRET_KEY` is set); the outcome.
//! - `POST /dead-letters/replay`: replays every dead letter; each outcome.
//! - `POST /reconcile`: catch-up over `/v1/events`, then a sweep of every
//!   subscription; the report. 501 without `STRIPE_SECRET_KEY`, 409 while a
//!   run is in progress.
//! - `GET /stats`: the processor's counters since start (received, applied,
//!   duplicates, stale, ignored, refetches, failed, dead, handler_effects…).
//! - `/admin` (feature `admin`, only with `ADMIN_TOKEN`): the operator
//!   console (HTML), signed in to with the admin token.
//! - `GET /metrics` (feature `metrics`): Prometheus text format, behind
//!   `ADMIN_TOKEN` when set.
//!
//! **Shutdown.** SIGINT or SIGTERM stops accepting connections, answers new
//! webhook deliveries 503 (Stripe retries), lets requests in progress and
//! webhook work that outlived its request (a request timeout answers 503 but
//! the work goes on) finish until `SHUTDOWN_DEADLINE_SECS`, then closes the
//! connections left, aborts the work left and releases its claims in the
//! ledger, so that Stripe's retry is processed at once after the restart.
//!
//! **Admin authentication.** The token is compared as SHA-256 digests
//! (equal length, constant time). A failed attempt is logged (path, peer
//! address, failures in a row) and answered 401 after a delay that grows
//! with the failures in a row (250 ms each, at most 5 s), one failure at a
//! time, so guessing is slow; a success resets the count. Without a token
//! the admin routes are open, which is only allowed on a loopback bind.
//!
//! Logs carry event ids, types and outcomes, never bodies or secrets.
//!
//! The integration tests `tests/server.rs` (in process, on an ephemeral
//! port) and `tests/server_process.rs` (this `main` in a child process,
//! stopped with SIGTERM) run this file: [`build_state`], [`app`] and
//! [`serve`] are what `main` runs.

use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use axum::error_handling::HandleErrorLayer;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{
    ConnectInfo, DefaultBodyLimit, FromRef, FromRequestParts, Path, Query, Request, State,
};
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{BoxError, Json, Router};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use stripe_webhook_guard::access::AccessPolicy;
use stripe_webhook_guard::client::http::{DEFAULT_BASE_URL, HttpStripeClient};
use stripe_webhook_guard::client::{
    BudgetConfig, ClientErrorKind, RefusingClient, RequestBudget, StripeClient,
};
use stripe_webhook_guard::clock::SystemClock;
use stripe_webhook_guard::event::{Event, EventType};
use stripe_webhook_guard::integrations::axum::{self as stripe_axum, Drained, WebhookEndpoint};
use stripe_webhook_guard::ledger::{LedgerQuery, LedgerState};
use stripe_webhook_guard::processor::{
    EventHandler, HandlerContext, HandlerError, Outcome, Stats, WebhookProcessor,
};
use stripe_webhook_guard::reconcile::{ReconcileError, Reconciler, SweepScope};
use stripe_webhook_guard::signature::{DEFAULT_MAX_BODY_BYTES, Verifier};
use stripe_webhook_guard::store::{InboxStorage, MemoryStore};
use subtle::ConstantTimeEq;
use tokio::net::TcpListener;
use tower::ServiceBuilder;
use tower::limit::GlobalConcurrencyLimitLayer;

// ---------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------

/// Stripe retries a delivery for 3 days and lists events for 30; catch-up
/// looks back 3 days: a ledger entry must outlive all of that.
pub const MIN_RETENTION_DAYS: u64 = 33;

/// The shortest admin token accepted.
pub const MIN_ADMIN_TOKEN_LEN: usize = 16;

/// The server's settings. `Debug` never prints a secret.
#[derive(Clone)]
pub struct Config {
    /// Webhook signing secrets; a delivery passes if any matches.
    pub webhook_secrets: Vec<String>,
    /// Stripe secret key: enables refetches and reconciliation.
    pub secret_key: Option<String>,
    /// Stripe API base URL.
    pub api_base: String,
    /// Store location; `None` for the in-memory store.
    pub database_url: Option<String>,
    /// PostgreSQL schema (`None`: the store's default).
    pub database_schema: Option<String>,
    /// SQLite `synchronous = NORMAL` instead of `FULL`.
    pub sqlite_normal: bool,
    /// Listen address.
    pub bind: SocketAddr,
    /// Accept only live (`true`) or test (`false`) events.
    pub livemode: Option<bool>,
    /// Longest time a request may take (the webhook path included).
    pub request_timeout: Duration,
    /// Longest time `POST /reconcile` and the replay of all dead letters may take.
    pub reconcile_timeout: Duration,
    /// Longest time a request head may take to arrive.
    pub header_timeout: Duration,
    /// Longest time a webhook body may take to arrive.
    pub body_timeout: Duration,
    /// Longest time shutdown waits for connections and webhook work.
    pub shutdown_deadline: Duration,
    /// Connections served at once.
    pub max_connections: usize,
    /// Requests handled at once.
    pub max_concurrent_requests: usize,
    /// Largest webhook body (the verifier's cap).
    pub max_body_bytes: usize,
    /// How long the demo handler pretends to work.
    pub handler_delay: Duration,
    /// The admin routes require `Authorization: Bearer <token>`.
    pub admin_token: Option<String>,
    /// Delay added per failed admin attempt in a row.
    pub admin_failure_delay: Duration,
    /// Processed and ignored ledger entries older than this are pruned.
    pub retention: Duration,
    /// How often the prune runs.
    pub prune_interval: Duration,
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let redacted = |v: &Option<String>| v.as_ref().map(|_| "[redacted]");
        f.debug_struct("Config")
            .field("webhook_secrets", &self.webhook_secrets.len())
            .field("secret_key", &redacted(&self.secret_key))
            .field("api_base", &self.api_base)
            .field("database_url", &redacted(&self.database_url))
            .field("database_schema", &self.database_schema)
            .field("sqlite_normal", &self.sqlite_normal)
            .field("bind", &self.bind)
            .field("livemode", &self.livemode)
            .field("request_timeout", &self.request_timeout)
            .field("reconcile_timeout", &self.reconcile_timeout)
            .field("header_timeout", &self.header_timeout)
            .field("body_timeout", &self.body_timeout)
            .field("shutdown_deadline", &self.shutdown_deadline)
            .field("max_connections", &self.max_connections)
            .field("max_concurrent_requests", &self.max_concurrent_requests)
            .field("max_body_bytes", &self.max_body_bytes)
            .field("handler_delay", &self.handler_delay)
            .field("admin_token", &redacted(&self.admin_token))
            .field("retention", &self.retention)
            .field("prune_interval", &self.prune_interval)
            .finish_non_exhaustive()
    }
}

impl Config {
    /// Defaults around one webhook secret: in-memory store, no API key,
    /// `127.0.0.1:4242`.
    pub fn new(webhook_secret: &str) -> Self {
        Self {
            webhook_secrets: vec![webhook_secret.to_owned()],
            secret_key: None,
            api_base: DEFAULT_BASE_URL.to_owned(),
            database_url: None,
            database_schema: None,
            sqlite_normal: false,
            bind: SocketAddr::from(([127, 0, 0, 1], 4242)),
            livemode: None,
            request_timeout: Duration::from_secs(20),
            reconcile_timeout: Duration::from_secs(600),
            header_timeout: Duration::from_secs(10),
            body_timeout: stripe_axum::DEFAULT_BODY_TIMEOUT,
            shutdown_deadline: Duration::from_secs(25),
            max_connections: 256,
            max_concurrent_requests: 64,
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            handler_delay: Duration::ZERO,
            admin_token: None,
            admin_failure_delay: Duration::from_millis(250),
            retention: Duration::from_secs(35 * 86_400),
            prune_interval: Duration::from_secs(3600),
        }
    }

    /// Reads the process environment (see the module docs).
    ///
    /// # Errors
    ///
    /// When `STRIPE_WEBHOOK_SECRET` is missing, a value does not parse, or
    /// the admin routes would be open on a non-loopback address.
    pub fn from_env() -> Result<Self, StartError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Reads settings through `get` (the environment, or a map in tests).
    /// Empty values count as unset.
    ///
    /// # Errors
    ///
    /// As [`Config::from_env`].
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Self, StartError> {
        let get = |name: &str| {
            get(name)
                .map(|v| v.trim().to_owned())
                .filter(|v| !v.is_empty())
        };
        // Secrets have no whitespace; trimming forgives "a, b" and a trailing
        // newline from a secrets file.
        let secrets: Vec<String> = get("STRIPE_WEBHOOK_SECRET")
            .unwrap_or_default()
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect();
        let Some(first) = secrets.first() else {
            return Err(StartError::new(
                "STRIPE_WEBHOOK_SECRET is not set (the endpoint's whsec_… signing secret; \
                 comma-separated while rolling it)",
            ));
        };
        let mut config = Self::new(first);
        config.webhook_secrets = secrets;
        config.secret_key = get("STRIPE_SECRET_KEY");
        if let Some(base) = get("STRIPE_API_BASE") {
            config.api_base = base;
        }
        config.database_url = get("DATABASE_URL");
        config.database_schema = get("DATABASE_SCHEMA");
        if let Some(durability) = get("SQLITE_DURABILITY") {
            config.sqlite_normal = match durability.as_str() {
                "full" => false,
                "normal" => true,
                _ => return Err(StartError::new("SQLITE_DURABILITY must be full or normal")),
            };
        }
        if let Some(bind) = get("BIND") {
            config.bind = bind
                .parse()
                .map_err(|_| StartError::new("BIND must be an address like 127.0.0.1:4242"))?;
        }
        if let Some(mode) = get("STRIPE_LIVEMODE") {
            config.livemode = Some(match mode.as_str() {
                "true" | "1" => true,
                "false" | "0" => false,
                _ => return Err(StartError::new("STRIPE_LIVEMODE must be true or false")),
            });
        }
        let number = |name: &str, min: u64| -> Result<Option<u64>, StartError> {
            get(name)
                .map(|v| {
                    v.parse::<u64>().ok().filter(|n| *n >= min).ok_or_else(|| {
                        StartError::new(format!("{name} must be a whole number >= {min}"))
                    })
                })
                .transpose()
        };
        let secs = |name: &str| number(name, 1).map(|n| n.map(Duration::from_secs));
        if let Some(d) = secs("REQUEST_TIMEOUT_SECS")? {
            config.request_timeout = d;
        }
        if let Some(d) = secs("HEADER_TIMEOUT_SECS")? {
            config.header_timeout = d;
        }
        if let Some(d) = secs("BODY_TIMEOUT_SECS")? {
            config.body_timeout = d;
        }
        if let Some(d) = secs("SHUTDOWN_DEADLINE_SECS")? {
            config.shutdown_deadline = d;
        }
        if let Some(d) = secs("PRUNE_INTERVAL_SECS")? {
            config.prune_interval = d;
        }
        if let Some(days) = number("RETENTION_DAYS", MIN_RETENTION_DAYS)? {
            config.retention = Duration::from_secs(days.saturating_mul(86_400));
        }
        let count = |name: &str| -> Result<Option<usize>, StartError> {
            Ok(number(name, 1)?.map(|n| usize::try_from(n).unwrap_or(usize::MAX)))
        };
        if let Some(n) = count("MAX_CONNECTIONS")? {
            config.max_connections = n;
        }
        if let Some(n) = count("MAX_CONCURRENT_REQUESTS")? {
            config.max_concurrent_requests = n;
        }
        if let Some(ms) = number("DEMO_HANDLER_DELAY_MS", 0)? {
            config.handler_delay = Duration::from_millis(ms);
        }
        config.admin_token = get("ADMIN_TOKEN");
        config.check_admin()?;
        Ok(config)
    }

    /// The admin routes are never open beyond this machine: without a token
    /// the bind address must be a loopback one; a token is long enough.
    ///
    /// # Errors
    ///
    /// A [`StartError`] saying what to set.
    pub fn check_admin(&self) -> Result<(), StartError> {
        match &self.admin_token {
            Some(token) if token.len() < MIN_ADMIN_TOKEN_LEN => Err(StartError::new(format!(
                "ADMIN_TOKEN must be at least {MIN_ADMIN_TOKEN_LEN} characters"
            ))),
            None if !self.bind.ip().is_loopback() => Err(StartError::new(format!(
                "ADMIN_TOKEN is not set and BIND {} is not a loopback address: the admin \
                 routes (subscriptions, customers' access, dead letters, reconcile, stats) \
                 would be open to the network. Set ADMIN_TOKEN, or bind 127.0.0.1 behind a \
                 proxy that exposes only /webhooks/stripe",
                self.bind
            ))),
            _ => Ok(()),
        }
    }

    /// The verifier: every secret, the body cap.
    pub fn verifier(&self) -> Verifier {
        let mut secrets = self.webhook_secrets.iter().map(String::as_str);
        let first = secrets.next().unwrap_or_default();
        secrets
            .fold(Verifier::new(first), Verifier::with_secret)
            .with_body_limit(self.max_body_bytes)
    }
}

/// Why the server could not start. The message names no secret.
#[derive(Debug)]
pub struct StartError(String);

impl StartError {
    fn new(message: impl Into<String>) -> Self {
        Self(message.into())
    }
}

impl fmt::Display for StartError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for StartError {}

// ---------------------------------------------------------------------------
// The application's own effect
// ---------------------------------------------------------------------------

/// The demo application handler: "provisions access" (logs it) and counts.
/// A real one would grant seats or send e-mails, idempotently on
/// `ctx.event_id`.
#[derive(Debug, Default)]
pub struct ProvisionAccess {
    provisioned: AtomicU64,
    delay: Duration,
}

impl ProvisionAccess {
    /// A handler that takes `delay` per event.
    pub fn new(delay: Duration) -> Self {
        Self {
            provisioned: AtomicU64::new(0),
            delay,
        }
    }

    /// Events handled successfully.
    pub fn provisioned(&self) -> u64 {
        self.provisioned.load(Ordering::Relaxed)
    }
}

#[async_trait]
impl EventHandler for ProvisionAccess {
    async fn handle(&self, event: &Event, ctx: &HandlerContext) -> Result<(), HandlerError> {
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
        let record = ctx.subscription.as_ref();
        tracing::info!(
            event_id = %ctx.event_id,
            event_type = %event.event_type(),
            attempt = ctx.attempt,
            effect = ctx.effect.as_str(),
            subscription = record.map_or("", |r| r.id.as_str()),
            customer = record.and_then(|r| r.state.customer.as_deref()).unwrap_or(""),
            status = %record.map(|r| r.state.status.to_string()).unwrap_or_default(),
            "provision access"
        );
        self.provisioned.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn wants(&self, event_type: &EventType) -> bool {
        event_type.is_subscription()
            || matches!(
                event_type,
                EventType::CheckoutSessionCompleted
                    | EventType::InvoicePaid
                    | EventType::InvoicePaymentFailed
            )
    }
}

// ---------------------------------------------------------------------------
// State
// ---------------------------------------------------------------------------

/// Everything the routes share.
#[derive(Clone)]
pub struct AppState {
    endpoint: WebhookEndpoint,
    reconcile: Option<Arc<ReconcileJob>>,
    replayer: Arc<Reconciler>,
    policy: AccessPolicy,
    handler: Arc<ProvisionAccess>,
    started: Instant,
    store: &'static str,
}

impl AppState {
    /// The processor (its store holds the ledger and the records).
    pub fn processor(&self) -> &WebhookProcessor {
        self.endpoint.processor()
    }

    /// The webhook endpoint (its tracker settles work at shutdown).
    pub fn endpoint(&self) -> &WebhookEndpoint {
        &self.endpoint
    }

    /// `memory`, `postgres` or `sqlite`.
    pub fn store_kind(&self) -> &'static str {
        self.store
    }
}

impl FromRef<AppState> for WebhookEndpoint {
    fn from_ref(state: &AppState) -> Self {
        state.endpoint.clone()
    }
}

impl fmt::Debug for AppState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AppState")
            .field("endpoint", &self.endpoint)
            .field("reconcile", &self.reconcile.is_some())
            .field("store", &self.store)
            .finish_non_exhaustive()
    }
}

/// The reconciler, its request budget (shared with the processor's
/// refetches) and a lock so runs never overlap.
struct ReconcileJob {
    reconciler: Reconciler,
    budget: Arc<RequestBudget>,
    running: Arc<tokio::sync::Mutex<()>>,
}

/// The store, and what kind it is.
struct Stores {
    store: Arc<dyn InboxStorage>,
    kind: &'static str,
}

impl Stores {
    fn of<S: InboxStorage>(store: Arc<S>, kind: &'static str) -> Self {
        Self { store, kind }
    }
}

/// Opens the store `DATABASE_URL` names (migrating it), or an in-memory one.
async fn open_store(config: &Config) -> Result<Stores, StartError> {
    let Some(url) = config.database_url.as_deref() else {
        return Ok(Stores::of(Arc::new(MemoryStore::new()), "memory"));
    };
    // Never echo the URL: it may carry a password.
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        return open_postgres(url, config.database_schema.as_deref()).await;
    }
    if let Some(rest) = url.strip_prefix("sqlite:") {
        let path = rest.strip_prefix("//").unwrap_or(rest);
        let path = path.split('?').next().unwrap_or_default();
        return open_sqlite(path, config.sqlite_normal).await;
    }
    Err(StartError::new(
        "DATABASE_URL must start with postgres://, postgresql:// or sqlite: \
         (leave it unset for the in-memory store)",
    ))
}

#[cfg(feature = "postgres")]
async fn open_postgres(url: &str, schema: Option<&str>) -> Result<Stores, StartError> {
    use stripe_webhook_guard::store::PgStore;
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(10)
        .acquire_timeout(Duration::from_secs(5))
        .connect(url)
        .await
        .map_err(|e| StartError::new(format!("cannot connect to PostgreSQL: {e}")))?;
    let store = match schema {
        Some(schema) => PgStore::with_schema(pool, schema)
            .map_err(|e| StartError::new(format!("DATABASE_SCHEMA: {e}")))?,
        None => PgStore::new(pool),
    };
    let applied = store
        .migrate()
        .await
        .map_err(|e| StartError::new(format!("PostgreSQL migrations failed: {e}")))?;
    tracing::info!(applied, schema = store.schema(), "PostgreSQL store ready");
    Ok(Stores::of(Arc::new(store), "postgres"))
}

#[cfg(not(feature = "postgres"))]
#[allow(clippy::unused_async)] // same signature as with the feature
async fn open_postgres(_url: &str, _schema: Option<&str>) -> Result<Stores, StartError> {
    Err(StartError::new(
        "DATABASE_URL is a PostgreSQL URL, but this server was built without the \
         `postgres` feature: run it with --features axum,reqwest,tracing,postgres",
    ))
}

#[cfg(feature = "sqlite")]
async fn open_sqlite(path: &str, normal: bool) -> Result<Stores, StartError> {
    use stripe_webhook_guard::store::SqliteStore;
    use stripe_webhook_guard::store::sqlite::Durability;
    if path.is_empty() || path == ":memory:" {
        return Err(StartError::new(
            "DATABASE_URL=sqlite: needs a file path (leave DATABASE_URL unset for an \
             in-memory store)",
        ));
    }
    let durability = if normal {
        Durability::Normal
    } else {
        Durability::Full
    };
    let store = SqliteStore::open_with(path, durability)
        .await
        .map_err(|e| StartError::new(format!("cannot open the SQLite database: {e}")))?;
    let applied = store
        .migrate()
        .await
        .map_err(|e| StartError::new(format!("SQLite migrations failed: {e}")))?;
    tracing::info!(applied, durability = ?durability, "SQLite store ready");
    Ok(Stores::of(Arc::new(store), "sqlite"))
}

#[cfg(not(feature = "sqlite"))]
#[allow(clippy::unused_async)] // same signature as with the feature
async fn open_sqlite(_path: &str, _normal: bool) -> Result<Stores, StartError> {
    Err(StartError::new(
        "DATABASE_URL is a SQLite URL, but this server was built without the \
         `sqlite` feature: run it with --features axum,reqwest,tracing,sqlite",
    ))
}

/// Opens the store and wires the processor, the demo handler, and (with a
/// secret key) the Stripe client and the reconciler.
///
/// # Errors
///
/// [`StartError`] when the store or the Stripe client cannot be set up.
pub async fn build_state(config: &Config) -> Result<AppState, StartError> {
    let stores = open_store(config).await?;
    let handler = Arc::new(ProvisionAccess::new(config.handler_delay));
    let clock = Arc::new(SystemClock);

    let mut builder = WebhookProcessor::builder(config.verifier())
        .store(stores.store)
        .handler(handler.clone())
        .clock(clock.clone());
    if let Some(livemode) = config.livemode {
        builder = builder.livemode(livemode);
    }

    // One budget for refetches and reconciliation, so together they stay
    // under Stripe's rate limit.
    let budget = match &config.secret_key {
        Some(key) => {
            // The budget retries (with pacing); the HTTP client never does.
            let http = HttpStripeClient::new(key)
                .and_then(|c| c.base_url(&config.api_base))
                .map_err(|e| StartError::new(format!("Stripe client: {e}")))?;
            let budget = Arc::new(RequestBudget::new(
                Arc::new(http),
                clock,
                BudgetConfig::default(),
            ));
            builder = builder.client(budget.clone() as Arc<dyn StripeClient>);
            Some(budget)
        }
        None => None,
    };
    let processor = builder.build();

    let reconcile = budget.as_ref().map(|budget| {
        Arc::new(ReconcileJob {
            reconciler: Reconciler::new(processor.clone(), budget.clone())
                .with_shared_budget(budget.clone()),
            budget: budget.clone(),
            running: Arc::new(tokio::sync::Mutex::new(())),
        })
    });
    // Replays read the stored payload; Stripe only for events without one.
    let replayer = Arc::new(match budget {
        Some(budget) => {
            Reconciler::new(processor.clone(), budget.clone()).with_shared_budget(budget)
        }
        None => Reconciler::new(
            processor.clone(),
            Arc::new(RefusingClient::new(
                ClientErrorKind::Unauthorized,
                "STRIPE_SECRET_KEY is not set",
            )),
        ),
    });

    Ok(AppState {
        endpoint: WebhookEndpoint::new(processor).body_timeout(config.body_timeout),
        reconcile,
        replayer,
        policy: AccessPolicy::default(),
        handler,
        started: Instant::now(),
        store: stores.kind,
    })
}

// ---------------------------------------------------------------------------
// Routes
// ---------------------------------------------------------------------------

/// The router and what serving it needs.
pub struct App {
    router: Router,
    endpoint: WebhookEndpoint,
    header_timeout: Duration,
    shutdown_deadline: Duration,
    max_connections: usize,
}

impl fmt::Debug for App {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("App")
            .field("endpoint", &self.endpoint)
            .field("header_timeout", &self.header_timeout)
            .field("shutdown_deadline", &self.shutdown_deadline)
            .field("max_connections", &self.max_connections)
            .finish_non_exhaustive()
    }
}

/// The application: every route, the admin check, the body cap, the
/// request timeouts and the concurrency limit; with the connection settings
/// [`serve`] applies.
pub fn app(state: AppState, config: &Config) -> App {
    let endpoint = state.endpoint.clone();
    let body_limit = state.processor().verifier().body_limit();
    let request_timeout = config.request_timeout;
    let long_timeout = config.reconcile_timeout;
    let admin = Arc::new(AdminAuth::new(
        config.admin_token.as_deref(),
        config.admin_failure_delay,
    ));
    let operate = operate(&state, config, &admin);
    let admin_routes = Router::new()
        .route("/subscriptions/{id}", get(subscription))
        .route("/customers/{id}/access", get(customer_access))
        .route("/stats", get(stats))
        .route("/dead-letters", get(dead_letters))
        .route("/dead-letters/{id}/replay", post(replay_one))
        .layer(middleware::from_fn_with_state(request_timeout, timeout))
        // These page through the ledger or Stripe: their own, longer limit.
        .route(
            "/reconcile",
            post(reconcile).layer(middleware::from_fn_with_state(long_timeout, timeout)),
        )
        .route(
            "/dead-letters/replay",
            post(replay_all).layer(middleware::from_fn_with_state(long_timeout, timeout)),
        )
        .layer(middleware::from_fn_with_state(admin, require_admin));
    let router = Router::new()
        .route(stripe_axum::DEFAULT_PATH, post(stripe_axum::webhook))
        .route("/healthz", get(healthz))
        .layer(middleware::from_fn_with_state(request_timeout, timeout))
        .merge(admin_routes)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        // The webhook helper enforces the verifier's cap itself; this covers
        // every other route.
        .layer(DefaultBodyLimit::max(body_limit))
        // Past the limit, answer 503 at once (Stripe retries) instead of
        // queueing without bound. Global: one count across every route.
        .layer(
            ServiceBuilder::new()
                .layer(HandleErrorLayer::new(overloaded))
                .load_shed()
                .layer(GlobalConcurrencyLimitLayer::new(
                    config.max_concurrent_requests,
                )),
        )
        .with_state(state)
        .merge(operate);
    App {
        router,
        endpoint,
        header_timeout: config.header_timeout,
        shutdown_deadline: config.shutdown_deadline,
        max_connections: config.max_connections,
    }
}

/// The operator console at `/admin` (feature `admin`; mounted only when
/// `ADMIN_TOKEN` is set, and signed in to with it) and `GET /metrics` in the
/// Prometheus text format (feature `metrics`; behind `ADMIN_TOKEN` like the
/// other operator routes).
#[allow(unused_mut, unused_variables)] // without the features, nothing is added
fn operate(state: &AppState, config: &Config, admin: &Arc<AdminAuth>) -> Router {
    let mut ops = Router::new();
    #[cfg(feature = "admin")]
    if let Some(token) = &config.admin_token {
        use stripe_webhook_guard::integrations::admin::{AdminConsole, AdminToken};
        let mut console =
            AdminConsole::builder(state.processor().clone(), AdminToken::new(token.as_str()));
        if let Some(job) = &state.reconcile {
            let reconciler = Reconciler::new(state.processor().clone(), job.budget.clone())
                .with_shared_budget(job.budget.clone());
            console = console.reconciler(Arc::new(reconciler));
        }
        ops = ops.nest("/admin", console.build().router());
    }
    #[cfg(feature = "metrics")]
    {
        prometheus(); // install the recorder before the first delivery
        ops = ops.merge(
            Router::new()
                .route("/metrics", get(metrics_text))
                .layer(middleware::from_fn_with_state(admin.clone(), require_admin))
                .with_state(state.clone()),
        );
    }
    ops
}

/// The process's Prometheus recorder, installed on first use.
#[cfg(feature = "metrics")]
pub fn prometheus() -> Option<&'static metrics_exporter_prometheus::PrometheusHandle> {
    static HANDLE: std::sync::OnceLock<Option<metrics_exporter_prometheus::PrometheusHandle>> =
        std::sync::OnceLock::new();
    HANDLE
        .get_or_init(|| {
            metrics_exporter_prometheus::PrometheusBuilder::new()
                .install_recorder()
                .ok()
        })
        .as_ref()
}

/// `GET /metrics`: refreshes the ledger gauges, then renders every metric.
#[cfg(feature = "metrics")]
async fn metrics_text(State(state): State<AppState>) -> Response {
    let Some(handle) = prometheus() else {
        return json_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "no_metrics_recorder",
            false,
            "",
        );
    };
    let store = state.processor().store();
    let now = state.processor().clock().now();
    if let Err(e) = stripe_webhook_guard::metrics::observe_ledger(store.as_ref(), now).await {
        tracing::warn!(error = %e, "ledger gauges not refreshed");
    }
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        handle.render(),
    )
        .into_response()
}

/// The admin token's digest, and the failures in a row.
pub struct AdminAuth {
    digest: Option<[u8; 32]>,
    failures: AtomicU32,
    /// Failed attempts are answered one at a time.
    gate: tokio::sync::Mutex<()>,
    step: Duration,
}

/// The longest delay added to a failed admin attempt.
const MAX_FAILURE_DELAY: Duration = Duration::from_secs(5);

impl AdminAuth {
    /// Checks against `token` (`None`: everyone passes); each failure in a
    /// row adds `step` to the delay before the 401.
    pub fn new(token: Option<&str>, step: Duration) -> Self {
        Self {
            digest: token.map(|t| Sha256::digest(t.as_bytes()).into()),
            failures: AtomicU32::new(0),
            gate: tokio::sync::Mutex::new(()),
            step,
        }
    }

    /// Whether `presented` is the token: SHA-256 digests of both (equal
    /// length whatever was presented) compared in constant time.
    pub fn accepts(&self, presented: Option<&str>) -> bool {
        let Some(expected) = &self.digest else {
            return true;
        };
        let presented: [u8; 32] = Sha256::digest(presented.unwrap_or_default().as_bytes()).into();
        bool::from(presented.ct_eq(expected))
    }

    /// Records a failure and waits its delay (failures one at a time);
    /// returns the failures in a row.
    async fn fail(&self) -> (u32, Duration) {
        let _one_at_a_time = self.gate.lock().await;
        let failures = self
            .failures
            .fetch_add(1, Ordering::Relaxed)
            .saturating_add(1);
        let delay = self.step.saturating_mul(failures).min(MAX_FAILURE_DELAY);
        tokio::time::sleep(delay).await;
        (failures, delay)
    }
}

/// Refuses admin requests without `Authorization: Bearer <token>` (when a
/// token is configured): logged, delayed, 401.
async fn require_admin(
    State(auth): State<Arc<AdminAuth>>,
    request: Request,
    next: Next,
) -> Response {
    let presented = request
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if auth.accepts(presented) {
        auth.failures.store(0, Ordering::Relaxed);
        return next.run(request).await;
    }
    let path = request.uri().path().to_owned();
    let peer = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(addr)| addr.to_string())
        .unwrap_or_default();
    let (failures, delay) = auth.fail().await;
    tracing::warn!(
        path,
        peer,
        failures,
        delay_ms = delay.as_millis(),
        token_presented = presented.is_some(),
        "admin authentication failed"
    );
    json_error(StatusCode::UNAUTHORIZED, "unauthorized", false, "")
}

fn json_error(status: StatusCode, error: &str, retryable: bool, detail: &str) -> Response {
    #[derive(Serialize)]
    struct Body<'a> {
        error: &'a str,
        retryable: bool,
        #[serde(skip_serializing_if = "str::is_empty")]
        detail: &'a str,
    }
    (
        status,
        Json(Body {
            error,
            retryable,
            detail,
        }),
    )
        .into_response()
}

/// An extractor wrapping axum's `$inner<T>` whose rejection is a JSON answer
/// (`{"error": $label, "retryable": false, "detail": …}`) like every other.
macro_rules! json_rejecting {
    ($(#[$doc:meta])* $name:ident, $inner:ident, $rejection:ty, $label:literal) => {
        $(#[$doc])*
        struct $name<T>(T);

        impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for $name<T> {
            type Rejection = Response;

            async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Response> {
                $inner::<T>::from_request_parts(parts, state)
                    .await
                    .map(|$inner(v)| Self(v))
                    .map_err(|e: $rejection| json_error(e.status(), $label, false, &e.body_text()))
            }
        }
    };
}

json_rejecting!(
    /// `Path<T>`; a segment that is not UTF-8 once decoded answers 400 JSON.
    JsonPath, Path, PathRejection, "invalid_path"
);
json_rejecting!(
    /// `Query<T>`; a query that does not deserialize answers 400 JSON.
    JsonQuery, Query, QueryRejection, "invalid_query"
);

async fn timeout(State(limit): State<Duration>, request: Request, next: Next) -> Response {
    let path = request.uri().path().to_owned();
    if let Ok(response) = tokio::time::timeout(limit, next.run(request)).await {
        response
    } else {
        // For the webhook, 503 makes Stripe retry; the processor keeps
        // running in its own tracked task and settles the claim.
        tracing::warn!(path, limit_ms = limit.as_millis(), "request timed out");
        json_error(StatusCode::SERVICE_UNAVAILABLE, "timeout", true, "")
    }
}

async fn overloaded(error: BoxError) -> Response {
    tracing::warn!(%error, "request refused: concurrency limit");
    json_error(StatusCode::SERVICE_UNAVAILABLE, "overloaded", true, "")
}

async fn not_found() -> Response {
    json_error(StatusCode::NOT_FOUND, "not_found", false, "")
}

async fn method_not_allowed() -> Response {
    json_error(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        false,
        "",
    )
}

async fn healthz(State(state): State<AppState>) -> Response {
    Json(serde_json::json!({
        "status": "ok",
        "store": state.store,
        "durable": state.store != "memory",
    }))
    .into_response()
}

fn store_error(e: &stripe_webhook_guard::store::StoreError, what: &str) -> Response {
    tracing::warn!(error = %e, what, "store failed");
    json_error(
        StatusCode::SERVICE_UNAVAILABLE,
        "store_error",
        e.is_retryable(),
        "",
    )
}

async fn subscription(State(state): State<AppState>, JsonPath(id): JsonPath<String>) -> Response {
    match state.processor().store().load(&id).await {
        Ok(Some(record)) => Json(record).into_response(),
        Ok(None) => json_error(StatusCode::NOT_FOUND, "not_found", false, ""),
        Err(e) => store_error(&e, "subscription lookup"),
    }
}

async fn customer_access(
    State(state): State<AppState>,
    JsonPath(id): JsonPath<String>,
) -> Response {
    match state.processor().store().find_by_customer(&id).await {
        Ok(records) => {
            let now = state.processor().clock().now();
            Json(state.policy.decide_customer(&records, now)).into_response()
        }
        Err(e) => store_error(&e, "access lookup"),
    }
}

#[derive(Serialize)]
struct StatsBody {
    #[serde(flatten)]
    stats: Stats,
    /// What the demo handler counted itself (equals `handler_effects`).
    provisioned: u64,
    /// Stripe API requests made by refetches and reconciliation.
    stripe_requests: Option<u64>,
    /// Webhook work running now (beyond its request, too).
    webhooks_in_flight: usize,
    uptime_seconds: u64,
}

async fn stats(State(state): State<AppState>) -> Json<StatsBody> {
    Json(StatsBody {
        stats: state.processor().stats(),
        provisioned: state.handler.provisioned(),
        stripe_requests: state.reconcile.as_ref().map(|j| j.budget.requests()),
        webhooks_in_flight: state.endpoint.in_flight(),
        uptime_seconds: state.started.elapsed().as_secs(),
    })
}

#[derive(Deserialize)]
struct AfterParam {
    after: Option<String>,
}

#[derive(Deserialize)]
struct AccountParam {
    account: Option<String>,
}

/// A page of dead letters: what an operator needs to decide on a replay
/// (never the payload).
async fn dead_letters(
    State(state): State<AppState>,
    JsonQuery(page): JsonQuery<AfterParam>,
) -> Response {
    let query = LedgerQuery {
        states: vec![LedgerState::Dead],
        after: page.after,
        limit: 100,
    };
    match state.processor().store().list(&query).await {
        Ok(entries) => {
            let items: Vec<_> = entries
                .iter()
                .map(|e| {
                    serde_json::json!({
                        "event_id": e.key.event_id,
                        "account": e.key.account,
                        "event_type": e.event_type,
                        "attempts": e.attempts,
                        "last_error": e.last_error,
                        "payload_stored": e.payload.is_some(),
                        "updated_at": e.updated_at.unix_timestamp(),
                    })
                })
                .collect();
            Json(serde_json::json!({ "dead_letters": items })).into_response()
        }
        Err(e) => store_error(&e, "dead letter listing"),
    }
}

/// One replay's answer: the outcome, or the error with its status.
fn replay_answer(
    event_id: &str,
    result: &Result<Outcome, ReconcileError>,
) -> (StatusCode, serde_json::Value) {
    match result {
        Ok(outcome) => (
            StatusCode::OK,
            serde_json::json!({ "event_id": event_id, "outcome": outcome.as_str() }),
        ),
        Err(e) => {
            let (status, label, retryable) = match e {
                ReconcileError::NotReplayable(_) => {
                    (StatusCode::NOT_FOUND, "not_replayable", false)
                }
                ReconcileError::Store(s) => (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "store_error",
                    s.is_retryable(),
                ),
                ReconcileError::Client(_) => (StatusCode::BAD_GATEWAY, "stripe_api_error", true),
                ReconcileError::Process(p) => (
                    StatusCode::from_u16(p.http_status())
                        .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
                    p.as_str(),
                    p.is_retryable(),
                ),
                _ => (StatusCode::INTERNAL_SERVER_ERROR, "replay_failed", true),
            };
            (
                status,
                serde_json::json!({ "event_id": event_id, "error": label, "retryable": retryable }),
            )
        }
    }
}

async fn replay_one(
    State(state): State<AppState>,
    JsonPath(id): JsonPath<String>,
    JsonQuery(params): JsonQuery<AccountParam>,
) -> Response {
    let account = params.account;
    let replayer = state.replayer.clone();
    let event_id = id.clone();
    // Own task: a client that gives up does not cut a replay off half-way.
    let task = tokio::spawn(async move { replayer.replay(&event_id, account.as_deref()).await });
    let Ok(result) = task.await else {
        return json_error(StatusCode::INTERNAL_SERVER_ERROR, "internal", true, "");
    };
    log_replay(&id, &result);
    let (status, body) = replay_answer(&id, &result);
    (status, Json(body)).into_response()
}

async fn replay_all(State(state): State<AppState>) -> Response {
    let replayer = state.replayer.clone();
    let task = tokio::spawn(async move { replayer.replay_dead_letters().await });
    match task.await {
        Ok(Ok(results)) => {
            let mut succeeded = 0;
            let items: Vec<_> = results
                .iter()
                .map(|(id, result)| {
                    log_replay(id, result);
                    succeeded += usize::from(result.is_ok());
                    replay_answer(id, result).1
                })
                .collect();
            Json(serde_json::json!({
                "replayed": succeeded,
                "failed": items.len() - succeeded,
                "results": items,
            }))
            .into_response()
        }
        Ok(Err(ReconcileError::Store(e))) => store_error(&e, "dead letter listing"),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "replay failed");
            json_error(StatusCode::INTERNAL_SERVER_ERROR, "replay_failed", true, "")
        }
        Err(_) => json_error(StatusCode::INTERNAL_SERVER_ERROR, "internal", true, ""),
    }
}

fn log_replay(event_id: &str, result: &Result<Outcome, ReconcileError>) {
    match result {
        Ok(outcome) => tracing::info!(event_id, outcome = outcome.as_str(), "dead letter replayed"),
        Err(e) => tracing::warn!(event_id, error = %e, "dead letter replay failed"),
    }
}

async fn reconcile(State(state): State<AppState>) -> Response {
    let Some(job) = state.reconcile.clone() else {
        return json_error(
            StatusCode::NOT_IMPLEMENTED,
            "reconcile_not_configured",
            false,
            "set STRIPE_SECRET_KEY to enable reconciliation",
        );
    };
    let Ok(guard) = job.running.clone().try_lock_owned() else {
        return json_error(StatusCode::CONFLICT, "reconcile_running", true, "");
    };
    // Own task: a client that gives up does not stop a run half-way.
    let task = tokio::spawn(async move {
        let _guard = guard;
        // The budget is shared with webhook refetches, so the report's
        // request count includes any made meanwhile.
        job.reconciler.run(SweepScope::All).await
    });
    match task.await {
        Ok(Ok(report)) => {
            tracing::info!(
                events_seen = report.events_seen,
                events_processed = report.events_processed,
                events_failed = report.events_failed,
                subscriptions_checked = report.subscriptions_checked,
                changes = report.changes.len(),
                "reconciliation finished"
            );
            Json(report).into_response()
        }
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "reconciliation failed");
            let (status, label) = match &e {
                ReconcileError::Client(_) => (StatusCode::BAD_GATEWAY, "stripe_api_error"),
                ReconcileError::Store(_) => (StatusCode::SERVICE_UNAVAILABLE, "store_error"),
                _ => (StatusCode::INTERNAL_SERVER_ERROR, "reconcile_failed"),
            };
            json_error(status, label, true, "")
        }
        Err(_) => json_error(StatusCode::INTERNAL_SERVER_ERROR, "internal", true, ""),
    }
}

// ---------------------------------------------------------------------------
// Retention
// ---------------------------------------------------------------------------

/// Deletes processed and ignored ledger entries last updated more than
/// `retention` before `now` (dead and failed ones stay for replay); returns
/// how many went.
///
/// # Errors
///
/// The store's error.
pub async fn prune_once(
    processor: &WebhookProcessor,
    now: time::OffsetDateTime,
    retention: Duration,
) -> Result<u64, stripe_webhook_guard::store::StoreError> {
    let retention = time::Duration::try_from(retention).unwrap_or(time::Duration::MAX);
    let before = now
        .checked_sub(retention)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    processor.store().prune(before).await
}

/// Prunes every `interval`, the first time at once.
pub fn spawn_pruner(
    processor: WebhookProcessor,
    retention: Duration,
    interval: Duration,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            let now = processor.clock().now();
            match prune_once(&processor, now, retention).await {
                Ok(pruned) => tracing::info!(
                    pruned,
                    retention_days = retention.as_secs() / 86_400,
                    "ledger pruned"
                ),
                Err(e) => {
                    tracing::warn!(error = %e, "ledger prune failed; next try in one interval");
                }
            }
        }
    })
}

// ---------------------------------------------------------------------------
// Serving
// ---------------------------------------------------------------------------

/// Serves `app` on `listener` until `shutdown` resolves: at most
/// `MAX_CONNECTIONS` connections at once, each closed when a request head
/// takes longer than `HEADER_TIMEOUT_SECS`. Then stops accepting, lets
/// requests in progress and webhook work finish until the shutdown
/// deadline, drops the connections left, aborts the work left and releases
/// its claims.
///
/// # Errors
///
/// When releasing claims fails (they stay until their lease runs out).
pub async fn serve(
    listener: TcpListener,
    app: App,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<Drained, StartError> {
    use hyper::server::conn::http1;
    use hyper_util::rt::{TokioIo, TokioTimer};
    use tower::ServiceExt;

    let App {
        router,
        endpoint,
        header_timeout,
        shutdown_deadline,
        max_connections,
    } = app;
    let slots = Arc::new(tokio::sync::Semaphore::new(max_connections));
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let mut connections = tokio::task::JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        // A free slot first: past the limit, connections wait in the
        // listen backlog.
        let slot = tokio::select! {
            () = &mut shutdown => break,
            slot = slots.clone().acquire_owned() => slot,
        };
        let Ok(slot) = slot else { break };
        let (stream, peer) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors and the like: pause, go on.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        while connections.try_join_next().is_some() {}
        let router = router.clone();
        let mut stopped = stopped.clone();
        connections.spawn(async move {
            let _slot = slot;
            let service = hyper::service::service_fn(
                move |mut request: hyper::Request<hyper::body::Incoming>| {
                    request.extensions_mut().insert(ConnectInfo(peer));
                    router.clone().oneshot(request.map(axum::body::Body::new))
                },
            );
            let connection = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(header_timeout)
                .serve_connection(TokioIo::new(stream), service);
            tokio::pin!(connection);
            tokio::select! {
                _ = connection.as_mut() => {}
                _ = stopped.changed() => {
                    // Finish the request in progress, then close.
                    connection.as_mut().graceful_shutdown();
                    let _ = connection.await;
                }
            }
        });
    }
    drop(listener);
    tracing::info!(
        deadline_secs = shutdown_deadline.as_secs(),
        "shutting down: no new connections; finishing requests and webhook work"
    );
    endpoint.close();
    let _ = stop.send(true);
    let deadline = tokio::time::Instant::now() + shutdown_deadline;
    let drained = tokio::time::timeout_at(deadline, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            open = connections.len(),
            "shutdown deadline: closing the connections left"
        );
        connections.abort_all();
    }
    let left = deadline.saturating_duration_since(tokio::time::Instant::now());
    endpoint
        .shutdown(left)
        .await
        .map_err(|e| StartError::new(format!("releasing claims at shutdown failed: {e}")))
}

// ---------------------------------------------------------------------------
// main
// ---------------------------------------------------------------------------

/// Resolves on SIGINT (Ctrl-C) or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
}

async fn run(config: Config) -> Result<(), StartError> {
    let state = build_state(&config).await?;
    if state.store == "memory" {
        tracing::warn!(
            "DATABASE_URL is not set: using the IN-MEMORY store. A restart forgets every \
             acknowledged event and every subscription (customers then read \"denied\"). \
             Set DATABASE_URL=postgres://… or sqlite:path for anything but a demo"
        );
    }
    if config.admin_token.is_none() {
        tracing::warn!(
            bind = %config.bind,
            "ADMIN_TOKEN is not set: the admin routes are open to anyone who can reach this \
             loopback address"
        );
    }
    tracing::info!(
        store = state.store,
        secrets = config.webhook_secrets.len(),
        stripe_client = state.reconcile.is_some(),
        livemode = ?config.livemode,
        retention_days = config.retention.as_secs() / 86_400,
        "configured"
    );
    let pruner = spawn_pruner(
        state.processor().clone(),
        config.retention,
        config.prune_interval,
    );
    let app = app(state, &config);
    let listener = TcpListener::bind(config.bind)
        .await
        .map_err(|e| StartError::new(format!("cannot listen on {}: {e}", config.bind)))?;
    let addr = listener.local_addr().unwrap_or(config.bind);
    tracing::info!(%addr, path = stripe_axum::DEFAULT_PATH, "listening");
    let drained = serve(listener, app, shutdown_signal()).await;
    pruner.abort();
    let drained = drained?;
    tracing::info!(
        cancelled = drained.cancelled,
        released = drained.released,
        "stopped"
    );
    Ok(())
}

/// What `main` does: logs to stderr, reads the environment, runs until
/// SIGTERM.
///
/// # Errors
///
/// Why the server could not start (or could not settle its claims).
pub fn run_main() -> Result<(), StartError> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let runtime = tokio::runtime::Runtime::new()
        .map_err(|e| StartError::new(format!("cannot start the runtime: {e}")))?;
    let result = Config::from_env().and_then(|config| runtime.block_on(run(config)));
    if let Err(e) = &result {
        tracing::error!(error = %e, "cannot start");
    }
    result
}

fn main() -> ExitCode {
    match run_main() {
        Ok(()) => ExitCode::SUCCESS,
        Err(_) => ExitCode::FAILURE,
    }
}
