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
//! | `DATABASE_URL` | unset: in-memory store; `postgres://…` (feature `postgres`) or `sqlite:path` (feature `sqlite`), migrated at start |
//! | `BIND` | default `127.0.0.1:4242` |
//! | `REQUEST_TIMEOUT_SECS` | default 20: answer 503 (Stripe retries) rather than hang |
//! | `ADMIN_TOKEN` | optional; when set, `/subscriptions`, `/customers`, `/reconcile` and `/stats` require `Authorization: Bearer <token>` (set it, or keep those routes off the public network: they reveal customers' state and `/reconcile` spends the Stripe rate limit) |
//! | `DEMO_HANDLER_DELAY_MS` | default 0: make the demo handler slow, to watch in-flight and shutdown behaviour |
//! | `RUST_LOG` | default `info` |
//!
//! Routes (all answers are JSON):
//!
//! - `POST /webhooks/stripe`: the crate's axum helper
//!   ([`stripe_webhook_guard::integrations::axum`]); 200 with the outcome,
//!   400/413 for bad deliveries, 5xx when Stripe should retry.
//! - `GET /subscriptions/{id}`: the stored record, 404 if none.
//! - `GET /customers/{id}/access`: `{"access": "granted"|"grace"|"denied",
//!   "reason": …, "valid_until": …}` over all the customer's subscriptions.
//! - `POST /reconcile`: catch-up over `/v1/events`, then a sweep of every
//!   subscription; the report. 501 without `STRIPE_SECRET_KEY`, 409 while a
//!   run is in progress.
//! - `GET /stats`: the processor's counters since start (received, applied,
//!   duplicates, stale, ignored, refetches, failed, dead, handler_effects…).
//! - `GET /healthz`.
//! - `/admin` (feature `admin`, only with `ADMIN_TOKEN`): the operator
//!   console (HTML), signed in to with the admin token.
//! - `GET /metrics` (feature `metrics`): Prometheus text format, behind
//!   `ADMIN_TOKEN` when set.
//!
//! SIGINT or SIGTERM stops accepting connections and lets in-flight requests
//! finish; the processor settles (completes or fails) every claim it took.
//! Logs carry event ids, types and outcomes, never bodies or secrets.
//!
//! The integration test `tests/server.rs` includes this file and starts the
//! same server on an ephemeral port: [`build_state`], [`router`] and
//! [`serve`] are what `main` runs.

use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use axum::extract::{DefaultBodyLimit, FromRef, Path, Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Serialize;
use stripe_webhook_guard::access::AccessPolicy;
use stripe_webhook_guard::client::http::{DEFAULT_BASE_URL, HttpStripeClient};
use stripe_webhook_guard::client::{BudgetConfig, RequestBudget, StripeClient};
use stripe_webhook_guard::clock::SystemClock;
use stripe_webhook_guard::event::{Event, EventType};
use stripe_webhook_guard::integrations::axum as stripe_axum;
use stripe_webhook_guard::processor::{
    EventHandler, HandlerContext, HandlerError, Stats, WebhookProcessor,
};
use stripe_webhook_guard::reconcile::{ReconcileError, Reconciler, SweepScope};
use stripe_webhook_guard::signature::{DEFAULT_MAX_BODY_BYTES, Verifier};
use stripe_webhook_guard::store::{InboxStorage, MemoryStore};
use tokio::net::TcpListener;

// ---------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------

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
    /// Listen address.
    pub bind: SocketAddr,
    /// Accept only live (`true`) or test (`false`) events.
    pub livemode: Option<bool>,
    /// Longest time a request may take (the webhook path included).
    pub request_timeout: Duration,
    /// Longest time `POST /reconcile` may take.
    pub reconcile_timeout: Duration,
    /// Largest webhook body (the verifier's cap).
    pub max_body_bytes: usize,
    /// How long the demo handler pretends to work.
    pub handler_delay: Duration,
    /// When set, every route but the webhook and `/healthz` requires
    /// `Authorization: Bearer <token>`.
    pub admin_token: Option<String>,
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("webhook_secrets", &self.webhook_secrets.len())
            .field(
                "secret_key",
                &self.secret_key.as_ref().map(|_| "[redacted]"),
            )
            .field("api_base", &self.api_base)
            .field(
                "database_url",
                &self.database_url.as_ref().map(|_| "[redacted]"),
            )
            .field("bind", &self.bind)
            .field("livemode", &self.livemode)
            .field("request_timeout", &self.request_timeout)
            .field("reconcile_timeout", &self.reconcile_timeout)
            .field("max_body_bytes", &self.max_body_bytes)
            .field("handler_delay", &self.handler_delay)
            .field(
                "admin_token",
                &self.admin_token.as_ref().map(|_| "[redacted]"),
            )
            .finish()
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
            bind: SocketAddr::from(([127, 0, 0, 1], 4242)),
            livemode: None,
            request_timeout: Duration::from_secs(20),
            reconcile_timeout: Duration::from_secs(600),
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            handler_delay: Duration::ZERO,
            admin_token: None,
        }
    }

    /// Reads the process environment (see the module docs).
    ///
    /// # Errors
    ///
    /// When `STRIPE_WEBHOOK_SECRET` is missing or a value does not parse.
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
        let get = |name: &str| get(name).filter(|v| !v.trim().is_empty());
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
        config.secret_key = get("STRIPE_SECRET_KEY").map(|k| k.trim().to_owned());
        if let Some(base) = get("STRIPE_API_BASE") {
            base.trim().clone_into(&mut config.api_base);
        }
        config.database_url = get("DATABASE_URL").map(|u| u.trim().to_owned());
        if let Some(bind) = get("BIND") {
            config.bind = bind
                .trim()
                .parse()
                .map_err(|_| StartError::new("BIND must be an address like 127.0.0.1:4242"))?;
        }
        if let Some(mode) = get("STRIPE_LIVEMODE") {
            config.livemode = Some(match mode.trim() {
                "true" | "1" => true,
                "false" | "0" => false,
                _ => return Err(StartError::new("STRIPE_LIVEMODE must be true or false")),
            });
        }
        if let Some(secs) = get("REQUEST_TIMEOUT_SECS") {
            config.request_timeout = Duration::from_secs(
                secs.trim()
                    .parse::<u64>()
                    .ok()
                    .filter(|s| *s > 0)
                    .ok_or_else(|| {
                        StartError::new("REQUEST_TIMEOUT_SECS must be whole seconds > 0")
                    })?,
            );
        }
        config.admin_token = get("ADMIN_TOKEN").map(|t| t.trim().to_owned());
        if let Some(ms) = get("DEMO_HANDLER_DELAY_MS") {
            config.handler_delay = Duration::from_millis(
                ms.trim()
                    .parse()
                    .map_err(|_| StartError::new("DEMO_HANDLER_DELAY_MS must be milliseconds"))?,
            );
        }
        Ok(config)
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
    processor: WebhookProcessor,
    reconcile: Option<Arc<ReconcileJob>>,
    policy: AccessPolicy,
    handler: Arc<ProvisionAccess>,
    started: Instant,
    store: &'static str,
}

impl FromRef<AppState> for WebhookProcessor {
    fn from_ref(state: &AppState) -> Self {
        state.processor.clone()
    }
}

impl fmt::Debug for AppState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AppState")
            .field("processor", &self.processor)
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

/// The three store roles, usually one object.
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
async fn open_store(url: Option<&str>) -> Result<Stores, StartError> {
    let Some(url) = url else {
        return Ok(Stores::of(Arc::new(MemoryStore::new()), "memory"));
    };
    // Never echo the URL: it may carry a password.
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        return open_postgres(url).await;
    }
    if let Some(rest) = url.strip_prefix("sqlite:") {
        let path = rest.strip_prefix("//").unwrap_or(rest);
        let path = path.split('?').next().unwrap_or_default();
        return open_sqlite(path).await;
    }
    Err(StartError::new(
        "DATABASE_URL must start with postgres://, postgresql:// or sqlite: \
         (leave it unset for the in-memory store)",
    ))
}

#[cfg(feature = "postgres")]
async fn open_postgres(url: &str) -> Result<Stores, StartError> {
    use stripe_webhook_guard::store::PgStore;
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(10)
        .acquire_timeout(Duration::from_secs(5))
        .connect(url)
        .await
        .map_err(|e| StartError::new(format!("cannot connect to PostgreSQL: {e}")))?;
    let store = PgStore::new(pool);
    let applied = store
        .migrate()
        .await
        .map_err(|e| StartError::new(format!("PostgreSQL migrations failed: {e}")))?;
    tracing::info!(applied, schema = store.schema(), "PostgreSQL store ready");
    Ok(Stores::of(Arc::new(store), "postgres"))
}

#[cfg(not(feature = "postgres"))]
#[allow(clippy::unused_async)] // same signature as with the feature
async fn open_postgres(_url: &str) -> Result<Stores, StartError> {
    Err(StartError::new(
        "DATABASE_URL is a PostgreSQL URL, but this server was built without the \
         `postgres` feature: run it with --features axum,reqwest,tracing,postgres",
    ))
}

#[cfg(feature = "sqlite")]
async fn open_sqlite(path: &str) -> Result<Stores, StartError> {
    use stripe_webhook_guard::store::SqliteStore;
    if path.is_empty() || path == ":memory:" {
        return Err(StartError::new(
            "DATABASE_URL=sqlite: needs a file path (leave DATABASE_URL unset for an \
             in-memory store)",
        ));
    }
    let store = SqliteStore::open(path)
        .await
        .map_err(|e| StartError::new(format!("cannot open the SQLite database: {e}")))?;
    let applied = store
        .migrate()
        .await
        .map_err(|e| StartError::new(format!("SQLite migrations failed: {e}")))?;
    tracing::info!(applied, "SQLite store ready");
    Ok(Stores::of(Arc::new(store), "sqlite"))
}

#[cfg(not(feature = "sqlite"))]
#[allow(clippy::unused_async)] // same signature as with the feature
async fn open_sqlite(_path: &str) -> Result<Stores, StartError> {
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
    let stores = open_store(config.database_url.as_deref()).await?;
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

    let reconcile = budget.map(|budget| {
        Arc::new(ReconcileJob {
            reconciler: Reconciler::new(processor.clone(), budget.clone())
                .with_shared_budget(budget.clone()),
            budget,
            running: Arc::new(tokio::sync::Mutex::new(())),
        })
    });

    Ok(AppState {
        processor,
        reconcile,
        policy: AccessPolicy::default(),
        handler,
        started: Instant::now(),
        store: stores.kind,
    })
}

// ---------------------------------------------------------------------------
// Routes
// ---------------------------------------------------------------------------

/// The application: every route, the body cap and the request timeouts.
pub fn router(state: AppState, config: &Config) -> Router {
    let body_limit = state.processor.verifier().body_limit();
    let reconcile_timeout = config.reconcile_timeout;
    let admin = Arc::new(config.admin_token.clone());
    let operate = operate(&state, config, &admin);
    let admin_routes = Router::new()
        .route("/subscriptions/{id}", get(subscription))
        .route("/customers/{id}/access", get(customer_access))
        .route("/stats", get(stats))
        .layer(middleware::from_fn_with_state(
            config.request_timeout,
            timeout,
        ))
        // Reconciliation pages through Stripe: its own, longer limit.
        .route(
            "/reconcile",
            post(reconcile).layer(middleware::from_fn_with_state(reconcile_timeout, timeout)),
        )
        .layer(middleware::from_fn_with_state(admin, require_admin));
    Router::new()
        .route(stripe_axum::DEFAULT_PATH, post(stripe_axum::webhook))
        .route("/healthz", get(healthz))
        .layer(middleware::from_fn_with_state(
            config.request_timeout,
            timeout,
        ))
        .merge(admin_routes)
        .fallback(not_found)
        // The webhook helper enforces the verifier's cap itself; this covers
        // every other route.
        .layer(DefaultBodyLimit::max(body_limit))
        .with_state(state)
        .merge(operate)
}

/// The operator console at `/admin` (feature `admin`; mounted only when
/// `ADMIN_TOKEN` is set, and signed in to with it) and `GET /metrics` in the
/// Prometheus text format (feature `metrics`; behind `ADMIN_TOKEN` like the
/// other operator routes).
#[allow(unused_mut, unused_variables)] // without the features, nothing is added
fn operate(state: &AppState, config: &Config, admin: &Arc<Option<String>>) -> Router {
    let mut ops = Router::new();
    #[cfg(feature = "admin")]
    if let Some(token) = &config.admin_token {
        use stripe_webhook_guard::integrations::admin::{AdminConsole, AdminToken};
        let mut console =
            AdminConsole::builder(state.processor.clone(), AdminToken::new(token.as_str()));
        if let Some(job) = &state.reconcile {
            let reconciler = Reconciler::new(state.processor.clone(), job.budget.clone())
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
    let store = state.processor.store();
    let now = state.processor.clock().now();
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

/// With an admin token configured, refuses requests without
/// `Authorization: Bearer <token>` (compared in constant time).
async fn require_admin(
    State(token): State<Arc<Option<String>>>,
    request: Request,
    next: Next,
) -> Response {
    use subtle::ConstantTimeEq;
    let Some(token) = token.as_deref() else {
        return next.run(request).await;
    };
    let presented = request
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default();
    if bool::from(presented.as_bytes().ct_eq(token.as_bytes())) {
        next.run(request).await
    } else {
        json_error(StatusCode::UNAUTHORIZED, "unauthorized", false, "")
    }
}

/// Serves `app` on `listener` until `shutdown` resolves, then lets in-flight
/// requests finish.
///
/// # Errors
///
/// When accepting connections fails.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
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

async fn timeout(State(limit): State<Duration>, request: Request, next: Next) -> Response {
    let path = request.uri().path().to_owned();
    if let Ok(response) = tokio::time::timeout(limit, next.run(request)).await {
        response
    } else {
        // For the webhook, 503 makes Stripe retry; the processor keeps
        // running in its own task and settles the claim.
        tracing::warn!(path, limit_ms = limit.as_millis(), "request timed out");
        json_error(StatusCode::SERVICE_UNAVAILABLE, "timeout", true, "")
    }
}

async fn not_found() -> Response {
    json_error(StatusCode::NOT_FOUND, "not_found", false, "")
}

async fn healthz(State(state): State<AppState>) -> Response {
    Json(serde_json::json!({ "status": "ok", "store": state.store })).into_response()
}

async fn subscription(State(state): State<AppState>, Path(id): Path<String>) -> Response {
    match state.processor.store().load(&id).await {
        Ok(Some(record)) => Json(record).into_response(),
        Ok(None) => json_error(StatusCode::NOT_FOUND, "not_found", false, ""),
        Err(e) => {
            tracing::warn!(error = %e, "subscription lookup failed");
            json_error(
                StatusCode::SERVICE_UNAVAILABLE,
                "store_error",
                e.is_retryable(),
                "",
            )
        }
    }
}

async fn customer_access(State(state): State<AppState>, Path(id): Path<String>) -> Response {
    match state.processor.store().find_by_customer(&id).await {
        Ok(records) => {
            let now = state.processor.clock().now();
            Json(state.policy.decide_customer(&records, now)).into_response()
        }
        Err(e) => {
            tracing::warn!(error = %e, "access lookup failed");
            json_error(
                StatusCode::SERVICE_UNAVAILABLE,
                "store_error",
                e.is_retryable(),
                "",
            )
        }
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
    uptime_seconds: u64,
}

async fn stats(State(state): State<AppState>) -> Json<StatsBody> {
    Json(StatsBody {
        stats: state.processor.stats(),
        provisioned: state.handler.provisioned(),
        stripe_requests: state.reconcile.as_ref().map(|j| j.budget.requests()),
        uptime_seconds: state.started.elapsed().as_secs(),
    })
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
    tracing::info!("shutting down: finishing in-flight requests");
}

async fn run(config: Config) -> Result<(), StartError> {
    let state = build_state(&config).await?;
    tracing::info!(
        store = state.store,
        secrets = config.webhook_secrets.len(),
        stripe_client = state.reconcile.is_some(),
        livemode = ?config.livemode,
        "configured"
    );
    let app = router(state, &config);
    let listener = TcpListener::bind(config.bind)
        .await
        .map_err(|e| StartError::new(format!("cannot listen on {}: {e}", config.bind)))?;
    let addr = listener.local_addr().unwrap_or(config.bind);
    tracing::info!(%addr, path = stripe_axum::DEFAULT_PATH, "listening");
    serve(listener, app, shutdown_signal())
        .await
        .map_err(|e| StartError::new(format!("server error: {e}")))?;
    tracing::info!("stopped");
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let result = match Config::from_env() {
        Ok(config) => run(config).await,
        Err(e) => Err(e),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "cannot start");
            ExitCode::FAILURE
        }
    }
}
