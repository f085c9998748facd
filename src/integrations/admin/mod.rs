//! The operator's console (feature `admin`): what the crate could not settle
//! on its own, visible and actionable in a browser, without SQL.
//!
//! [`AdminConsole::router`] is an axum [`Router`] of server-rendered HTML
//! pages (compile-time-escaped `maud` templates, no JavaScript, no
//! front-end build step). Mount it under any prefix; links follow the prefix
//! it was mounted at:
//!
//! ```no_run
//! use std::sync::Arc;
//! use stripe_webhook_guard::integrations::admin::{AdminConsole, AdminToken};
//! use stripe_webhook_guard::{MemoryStore, Verifier, WebhookProcessor};
//!
//! # async fn run() -> std::io::Result<()> {
//! let processor = WebhookProcessor::builder(Verifier::new("whsec_..."))
//!     .store(Arc::new(MemoryStore::new()))
//!     .build();
//! let token = AdminToken::new(std::env::var("ADMIN_TOKEN").unwrap_or_default());
//! // Add `.reconciler(...)` to enable "refresh a customer" and "run a catch-up".
//! let console = AdminConsole::builder(processor, token).build();
//! let app = axum::Router::new().nest("/admin", console.router());
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:4242").await?;
//! axum::serve(listener, app).await
//! # }
//! ```
//!
//! # Pages
//!
//! | path | shows |
//! |---|---|
//! | `/` | overview: the processor's counters, the backlog of unsettled events and the oldest one, failed and dead-lettered counts, records needing review or reconciliation, the last reconciliation, recent operator actions |
//! | `/events` | dead-lettered and failed events (id, type, account, attempts, last error, age), filtered by state, type and account, in pages |
//! | `/events/{id}` | one event's ledger entry: state, attempts, first seen, last change, lease, last error; the payload only while the store keeps it (pending, failed or dead); the operator actions on it |
//! | `/review` | subscriptions flagged `needs_review` (or, with `?flag=reconcile`, `needs_reconcile`) with their anomaly timeline |
//! | `/customers/{id}` | one customer: subscriptions, the access decision with its reason and `valid_until`, entitlements, recent changes |
//!
//! # Actions
//!
//! Each action is a `GET` confirmation page whose form `POST`s to the same
//! path; nothing changes on a `GET`. Every action is idempotent (doing it
//! twice changes nothing more) and is logged with who and when: in the
//! console's audit log (the newest [`AUDIT_LOG_SIZE`] entries, on the
//! overview and from [`AdminConsole::audit_log`]) and, with feature
//! `tracing`, as an `INFO` event of target `stripe_webhook_guard::admin`.
//!
//! | action | path | does |
//! |---|---|---|
//! | replay one event | `/events/{id}/replay` | [`Reconciler::replay`]: requeues a failed or dead event and processes it from the stored payload (or from Stripe) |
//! | replay all dead letters | `/dead-letters/replay-all` | [`Reconciler::replay_dead_letters`] |
//! | refresh a customer | `/customers/{id}/refresh` | [`Reconciler::refresh_customer`] (needs a Stripe client) |
//! | run a catch-up | `/catch-up` | [`Reconciler::catch_up`] (needs a Stripe client; one run at a time) |
//! | mark a review item resolved | `/subscriptions/{id}/resolve` | clears the record's `needs_review` flag (its anomalies stay as history) |
//!
//! # Security
//!
//! - Off unless configured: with an empty [`AdminToken`] every path answers
//!   404.
//! - Sign-in by `Authorization: Bearer <token>` on each request, or by the
//!   sign-in form, which opens a server-side session (8 hours by default)
//!   and sets its id in an `HttpOnly`, `SameSite=Strict` cookie, `Secure`
//!   unless the host is loopback ([`CookieSecurity`]). Tokens are compared
//!   in constant time.
//! - Every `POST` carries a CSRF token (per session; one per console for
//!   bearer requests) and is refused with 403 without it. The sign-in form
//!   has a double-submit token of its own.
//! - Every value is escaped by the templates: event ids, error texts,
//!   anomaly details and metadata are attacker-influenced. Answers carry a
//!   strict `Content-Security-Policy` (no scripts at all),
//!   `X-Content-Type-Options: nosniff`, `Referrer-Policy: same-origin` and
//!   `Cache-Control: no-store`.
//! - Secrets are never shown: the console reads the ledger and the records,
//!   which hold none.

use std::collections::VecDeque;
use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::Router;
use time::OffsetDateTime;

use crate::access::AccessPolicy;
use crate::client::{ClientErrorKind, RefusingClient};
use crate::processor::WebhookProcessor;
use crate::reconcile::{Change, Reconciler};

mod actions;
mod auth;
mod pages;
mod routes;

pub use auth::{AdminToken, CookieSecurity, Operator, is_loopback_host};

/// How many operator actions the audit log keeps (the oldest go first).
pub const AUDIT_LOG_SIZE: usize = 500;

/// How many reconciliation changes the console remembers for the customer
/// pages (the oldest go first).
pub const RECENT_CHANGES_SIZE: usize = 1_000;

/// The console's settings.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct AdminConfig {
    /// Rows per page in the lists (default 50).
    pub page_size: usize,
    /// How long a sign-in lasts (default 8 hours).
    pub session_ttl: Duration,
    /// Sessions kept at most; the oldest is closed to open another
    /// (default 64).
    pub max_sessions: usize,
    /// The `Secure` attribute of the session cookie.
    pub cookie_security: CookieSecurity,
    /// The policy the customer page decides access with.
    pub policy: AccessPolicy,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            page_size: 50,
            session_ttl: Duration::from_secs(8 * 3600),
            max_sessions: 64,
            cookie_security: CookieSecurity::Auto,
            policy: AccessPolicy::default(),
        }
    }
}

/// One operator action, as logged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditEntry {
    /// When (the processor's clock).
    pub at: OffsetDateTime,
    /// Who: the name given at sign-in, or `bearer` (or the `X-Operator`
    /// header) for token requests.
    pub who: String,
    /// What: `replay`, `replay_dead_letters`, `refresh_customer`,
    /// `catch_up`, `resolve_review`, `sign_in` or `sign_out`.
    pub action: &'static str,
    /// On what (an event id, a customer id, a subscription id; empty for
    /// console-wide actions).
    pub target: String,
    /// How it ended, in a few words.
    pub result: String,
}

/// The last reconciliation the console ran.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunSummary {
    /// When it finished.
    pub at: OffsetDateTime,
    /// `catch_up` or `refresh_customer`.
    pub kind: &'static str,
    /// Who asked for it.
    pub who: String,
    /// What it did, in a few words (or its error).
    pub summary: String,
}

/// Builds an [`AdminConsole`]. Start with [`AdminConsole::builder`].
pub struct AdminBuilder {
    processor: WebhookProcessor,
    token: AdminToken,
    reconciler: Option<Arc<Reconciler>>,
    config: AdminConfig,
}

impl fmt::Debug for AdminBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AdminBuilder")
            .field("token", &self.token)
            .field("reconciler", &self.reconciler.is_some())
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl AdminBuilder {
    /// The reconciler the actions run (replay, refresh, catch-up). Build it
    /// from the same processor. Without one, replays still work from stored
    /// payloads, and refresh and catch-up answer that no Stripe client is
    /// configured.
    #[must_use]
    pub fn reconciler(mut self, reconciler: Arc<Reconciler>) -> Self {
        self.reconciler = Some(reconciler);
        self
    }

    /// The settings.
    #[must_use]
    pub fn config(mut self, config: AdminConfig) -> Self {
        self.config = config;
        self
    }

    /// The console.
    pub fn build(self) -> AdminConsole {
        let has_client = self.reconciler.is_some();
        let reconciler = self.reconciler.unwrap_or_else(|| {
            Arc::new(Reconciler::new(
                self.processor.clone(),
                Arc::new(RefusingClient::new(
                    ClientErrorKind::Unauthorized,
                    "no Stripe client is configured for the console",
                )),
            ))
        });
        AdminConsole {
            inner: Arc::new(Inner {
                sessions: auth::Sessions::new(self.config.session_ttl, self.config.max_sessions),
                bearer_csrf: auth::random_token(),
                processor: self.processor,
                reconciler,
                has_client,
                token: self.token,
                config: self.config,
                audit: Mutex::new(VecDeque::new()),
                changes: Mutex::new(VecDeque::new()),
                last_run: Mutex::new(None),
                running: tokio::sync::Mutex::new(()),
            }),
        }
    }
}

/// The operator's console. Cheap to clone. See the [module docs](self).
#[derive(Clone)]
pub struct AdminConsole {
    inner: Arc<Inner>,
}

impl fmt::Debug for AdminConsole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AdminConsole")
            .field("token", &self.inner.token)
            .field("stripe_client", &self.inner.has_client)
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

impl AdminConsole {
    /// Starts a console over `processor`'s store, signed in to with `token`.
    /// An empty token leaves the console off (every path answers 404).
    ///
    /// ```
    /// use std::sync::Arc;
    /// use stripe_webhook_guard::integrations::admin::{AdminConsole, AdminToken};
    /// use stripe_webhook_guard::{MemoryStore, Verifier, WebhookProcessor};
    ///
    /// let processor = WebhookProcessor::builder(Verifier::new("whsec_doc"))
    ///     .store(Arc::new(MemoryStore::new()))
    ///     .build();
    /// let console = AdminConsole::builder(processor, AdminToken::new("a-long-random-token")).build();
    /// assert!(console.is_enabled());
    /// let app: axum::Router = axum::Router::new().nest("/admin", console.router());
    /// # let _ = app;
    /// ```
    pub fn builder(processor: WebhookProcessor, token: AdminToken) -> AdminBuilder {
        AdminBuilder {
            processor,
            token,
            reconciler: None,
            config: AdminConfig::default(),
        }
    }

    /// Whether a token is configured (otherwise every path answers 404).
    pub fn is_enabled(&self) -> bool {
        self.inner.token.is_configured()
    }

    /// The router: mount it with [`Router::nest`] under any prefix.
    pub fn router(&self) -> Router {
        routes::router(self.inner.clone())
    }

    /// The audit log, oldest first.
    pub fn audit_log(&self) -> Vec<AuditEntry> {
        lock(&self.inner.audit).iter().cloned().collect()
    }

    /// The last reconciliation run from the console.
    pub fn last_run(&self) -> Option<RunSummary> {
        lock(&self.inner.last_run).clone()
    }
}

/// What the routes share.
pub(crate) struct Inner {
    processor: WebhookProcessor,
    reconciler: Arc<Reconciler>,
    has_client: bool,
    token: AdminToken,
    config: AdminConfig,
    sessions: auth::Sessions,
    bearer_csrf: String,
    audit: Mutex<VecDeque<AuditEntry>>,
    changes: Mutex<VecDeque<Change>>,
    last_run: Mutex<Option<RunSummary>>,
    running: tokio::sync::Mutex<()>,
}

impl Inner {
    fn now(&self) -> OffsetDateTime {
        self.processor.clock().now()
    }

    /// Logs an action: the audit ring and, with `tracing`, an `INFO` event.
    fn audit(&self, who: &str, action: &'static str, target: &str, result: String) {
        #[cfg(feature = "tracing")]
        tracing::info!(
            target: "stripe_webhook_guard::admin",
            who,
            action,
            target_id = target,
            result = result.as_str(),
            "operator action"
        );
        let entry = AuditEntry {
            at: self.now(),
            who: who.to_owned(),
            action,
            target: target.to_owned(),
            result,
        };
        push_bounded(&mut lock(&self.audit), entry, AUDIT_LOG_SIZE);
    }

    fn remember_changes(&self, changes: &[Change]) {
        let mut ring = lock(&self.changes);
        for c in changes {
            push_bounded(&mut ring, c.clone(), RECENT_CHANGES_SIZE);
        }
    }

    fn set_last_run(&self, kind: &'static str, who: &str, summary: String) {
        *lock(&self.last_run) = Some(RunSummary {
            at: self.now(),
            kind,
            who: who.to_owned(),
            summary,
        });
    }
}

fn push_bounded<T>(ring: &mut VecDeque<T>, item: T, cap: usize) {
    if ring.len() >= cap {
        ring.pop_front();
    }
    ring.push_back(item);
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}
