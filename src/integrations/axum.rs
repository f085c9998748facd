//! axum route helper (feature `axum`).
//!
//! A [`WebhookEndpoint`] wraps a [`WebhookProcessor`] and gives a route,
//! `POST /webhooks/stripe` by default, that hands the raw body and the
//! `Stripe-Signature` header to [`WebhookProcessor::handle`] and answers
//! with this mapping (every retryable failure is a 5xx, so Stripe delivers
//! the event again; everything settled is a 200):
//!
//! | result | status | body |
//! |---|---|---|
//! | processed, stale, no change, duplicate, ignored, dead-lettered | 200 | `{"outcome": "applied", "event_id": "evt_…"}` |
//! | bad signature, missing or unreadable header, not an event | 400 | `{"error": "signature_mismatch", "retryable": false}` |
//! | body not received within the body timeout | 408 | `{"error": "body_timeout", "retryable": true}` |
//! | body larger than the verifier's [`body_limit`](crate::signature::Verifier::body_limit) | 413 | `{"error": "body_too_large", "retryable": false}` |
//! | same event id, different content | 409 | `{"error": "payload_conflict", "retryable": false}` |
//! | handler failed | 500 | `{"error": "failed", "retryable": true}` |
//! | in flight elsewhere, store or Stripe API down, lease lost | 503 | `{"error": "in_flight", "retryable": true}` |
//! | the endpoint is shutting down | 503 | `{"error": "shutting_down", "retryable": true}` |
//!
//! The `outcome` is [`Outcome::as_str`], the `error` is [`Error::as_str`], and
//! the status is [`Outcome::http_status`] / [`Error::http_status`]. The
//! answer never echoes the body, the header, or a secret.
//!
//! **Header first.** An absent `Stripe-Signature` header, an empty one, or
//! one whose value is not UTF-8, is treated as missing and answered 400
//! `missing_header` before a byte of the body is read. With several, the
//! first counts.
//!
//! **Body.** The body is read by the helper itself (no extractor, so axum's
//! `DefaultBodyLimit` plays no part) and never beyond the verifier's
//! [`body_limit`](crate::signature::Verifier::body_limit): a `Content-Length` above it is
//! refused before reading, and a chunked body is cut off as soon as it
//! exceeds it. Both answer 413. The whole body must arrive within the body
//! timeout ([`DEFAULT_BODY_TIMEOUT`], 10 s, unless set with
//! [`WebhookEndpoint::body_timeout`]), or the answer is 408 and nothing is
//! processed: a client that trickles its body cannot hold the request open.
//!
//! **Work outlives the request, and shutdown settles it.** The processor
//! runs in a task of its own, tracked by the endpoint. A client that
//! disconnects, or a timeout layer that answers 503 first, cannot stop it
//! between claiming an event and completing (or failing) it: the claim is
//! settled by the processor's normal path, and Stripe's retry gets
//! `duplicate`. At shutdown, [`WebhookEndpoint::shutdown`] refuses new
//! deliveries (503 `shutting_down`, so Stripe retries), waits for every
//! tracked task up to a deadline, aborts the ones still running, and gives
//! back ([`WebhookProcessor::release_held`]) the claims they held: the
//! event becomes `failed` without spending an attempt, so Stripe's next
//! delivery, to this instance after a restart or to another, processes it
//! at once instead of answering 503 "in flight" until the lease runs out.
//!
//! **Logs** (feature `tracing`). One event per request, target
//! `stripe_webhook_guard::integrations::axum`: `event_id` and `event_type`
//! when known, `outcome` or `error` label, `status`. `INFO` for 2xx, `WARN`
//! for 4xx and 503, `ERROR` for other 5xx. Never the body, the header or a
//! secret.
//!
//! # Example
//!
//! ```no_run
//! use std::sync::Arc;
//! use std::time::Duration;
//!
//! use stripe_webhook_guard::integrations::axum::WebhookEndpoint;
//! use stripe_webhook_guard::processor::WebhookProcessor;
//! use stripe_webhook_guard::signature::Verifier;
//! use stripe_webhook_guard::store::MemoryStore;
//!
//! # async fn run() -> std::io::Result<()> {
//! let secret = std::env::var("STRIPE_WEBHOOK_SECRET").unwrap_or_default();
//! let processor = WebhookProcessor::builder(Verifier::new(secret))
//!     .store(Arc::new(MemoryStore::new()))
//!     .build();
//! let endpoint = WebhookEndpoint::new(processor);
//!
//! // `POST /webhooks/stripe`; merge it into the rest of your application.
//! let app = axum::Router::new()
//!     .route("/healthz", axum::routing::get(|| async { "ok" }))
//!     .merge(endpoint.router());
//!
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:4242").await?;
//! axum::serve(listener, app)
//!     .with_graceful_shutdown(async {
//!         let _ = tokio::signal::ctrl_c().await;
//!     })
//!     .await?;
//! // Stopped accepting: let the webhook work finish (25 s at most), then
//! // give back the claims of what did not.
//! let drained = endpoint.shutdown(Duration::from_secs(25)).await;
//! println!("{drained:?}");
//! # Ok(())
//! # }
//! ```
//!
//! In a router with its own state, mount [`webhook`] and let axum find the
//! endpoint in that state with [`FromRef`](axum::extract::FromRef):
//!
//! ```no_run
//! use axum::extract::FromRef;
//! use axum::routing::post;
//! use stripe_webhook_guard::integrations::axum::{WebhookEndpoint, webhook};
//!
//! #[derive(Clone)]
//! struct AppState {
//!     stripe: WebhookEndpoint,
//!     // ... your own things
//! }
//!
//! impl FromRef<AppState> for WebhookEndpoint {
//!     fn from_ref(state: &AppState) -> Self {
//!         state.stripe.clone()
//!     }
//! }
//!
//! fn app(state: AppState) -> axum::Router {
//!     axum::Router::new()
//!         .route("/billing/stripe-events", post(webhook))
//!         .with_state(state)
//! }
//! ```

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::body::{Body, Bytes, HttpBody};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde::Serialize;
use tokio::sync::Notify;
use tokio::task::{AbortHandle, JoinHandle};

use crate::processor::{Error, Outcome, WebhookProcessor};
use crate::signature::VerifyError;
use crate::store::StoreError;

/// The path [`WebhookEndpoint::router`] mounts: `/webhooks/stripe`.
pub const DEFAULT_PATH: &str = "/webhooks/stripe";

/// The header Stripe signs deliveries with (lower case, as `http` stores it).
pub const SIGNATURE_HEADER: &str = "stripe-signature";

/// How long the whole body may take to arrive by default: 10 s. Stripe's
/// bodies are a few kilobytes and arrive at once.
pub const DEFAULT_BODY_TIMEOUT: Duration = Duration::from_secs(10);

/// After the shutdown deadline, how long aborted tasks are given to stop
/// (they stop at their next await) before their claims are released anyway.
const ABORT_GRACE: Duration = Duration::from_secs(1);

/// The webhook endpoint: the processor, the tasks running its work, and
/// the request settings. Cheap to clone (the tracker is shared); keep one
/// clone to call [`WebhookEndpoint::shutdown`] when the server stops.
///
/// ```
/// use std::sync::Arc;
/// use std::time::Duration;
/// use stripe_webhook_guard::integrations::axum::WebhookEndpoint;
/// use stripe_webhook_guard::{MemoryStore, Verifier, WebhookProcessor};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let processor = WebhookProcessor::builder(Verifier::new("whsec_doc"))
///     .store(Arc::new(MemoryStore::new()))
///     .build();
/// let endpoint = WebhookEndpoint::new(processor).body_timeout(Duration::from_secs(5));
/// let app: axum::Router = endpoint.router();
/// # let _ = app;
/// // Nothing running: shutdown returns at once and releases nothing.
/// let drained = endpoint.shutdown(Duration::from_secs(25)).await.unwrap();
/// assert_eq!((drained.cancelled, drained.released), (0, 0));
/// assert!(endpoint.is_closed());
/// # }
/// ```
#[derive(Clone)]
pub struct WebhookEndpoint {
    processor: WebhookProcessor,
    tracker: Arc<Tracker>,
    body_timeout: Duration,
}

impl std::fmt::Debug for WebhookEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookEndpoint")
            .field("processor", &self.processor)
            .field("in_flight", &self.in_flight())
            .field("closed", &self.is_closed())
            .field("body_timeout", &self.body_timeout)
            .finish_non_exhaustive()
    }
}

/// What [`WebhookEndpoint::shutdown`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Drained {
    /// Tasks still running at the deadline, aborted.
    pub cancelled: usize,
    /// Claims given back to the ledger (see
    /// [`WebhookProcessor::release_held`]).
    pub released: usize,
}

impl WebhookEndpoint {
    /// An endpoint for `processor`, with the [`DEFAULT_BODY_TIMEOUT`].
    pub fn new(processor: WebhookProcessor) -> Self {
        Self {
            processor,
            tracker: Arc::new(Tracker::default()),
            body_timeout: DEFAULT_BODY_TIMEOUT,
        }
    }

    /// How long the whole body may take to arrive (408 after that).
    #[must_use]
    pub fn body_timeout(mut self, timeout: Duration) -> Self {
        self.body_timeout = timeout;
        self
    }

    /// The processor.
    pub fn processor(&self) -> &WebhookProcessor {
        &self.processor
    }

    /// A router with `POST` [`DEFAULT_PATH`] answered by [`webhook`]. Its
    /// state is provided, so it merges into any `Router<()>`.
    pub fn router(&self) -> Router {
        self.router_at(DEFAULT_PATH)
    }

    /// A router with `POST path` answered by [`webhook`].
    ///
    /// # Panics
    ///
    /// As [`Router::route`]: when `path` does not start with `/` or is not a
    /// valid axum path.
    pub fn router_at(&self, path: &str) -> Router {
        Router::new()
            .route(path, post(webhook))
            .with_state(self.clone())
    }

    /// Runs `work` in a task of its own, tracked until it ends: the
    /// endpoint's own processing goes through here, and an application can
    /// track other work that must finish (or be cut off and its claims
    /// released) at shutdown. `None` once the endpoint is closed.
    pub fn spawn<F>(&self, work: F) -> Option<JoinHandle<F::Output>>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.tracker.spawn(work)
    }

    /// Tracked tasks still running.
    pub fn in_flight(&self) -> usize {
        self.tracker.lock().running.len()
    }

    /// Whether [`WebhookEndpoint::close`] (or `shutdown`) was called.
    pub fn is_closed(&self) -> bool {
        self.tracker.lock().closed
    }

    /// Refuses new deliveries from now on (503 `shutting_down`, so Stripe
    /// retries); running work goes on.
    pub fn close(&self) {
        self.tracker.lock().closed = true;
    }

    /// Settles everything at shutdown: closes the endpoint, waits up to
    /// `deadline` for the tracked tasks, aborts the ones still running (they
    /// stop at their next await; up to one more second is given for that),
    /// then gives back every claim the processor still holds with
    /// [`WebhookProcessor::release_held`]. Call it once the server has
    /// stopped accepting connections.
    ///
    /// # Errors
    ///
    /// The [`StoreError`] of a release that failed (that claim stays until
    /// its lease runs out).
    pub async fn shutdown(&self, deadline: Duration) -> Result<Drained, StoreError> {
        self.close();
        let mut cancelled = 0;
        if !self.tracker.wait_idle(deadline).await {
            cancelled = self.tracker.abort_all();
            self.tracker.wait_idle(ABORT_GRACE).await;
        }
        let released = self.processor.release_held().await?;
        log_drained(cancelled, released);
        Ok(Drained {
            cancelled,
            released,
        })
    }
}

/// Tracked tasks: their abort handles, and a signal when none is left.
#[derive(Default)]
struct Tracker {
    state: Mutex<TrackerState>,
    idle: Notify,
}

#[derive(Default)]
struct TrackerState {
    closed: bool,
    next: u64,
    running: HashMap<u64, AbortHandle>,
}

impl Tracker {
    fn lock(&self) -> MutexGuard<'_, TrackerState> {
        // Nothing here can be left half-updated by a panic.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn spawn<F>(self: &Arc<Self>, work: F) -> Option<JoinHandle<F::Output>>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        // Registered under the lock the task's end takes: the entry exists
        // before the task can remove it.
        let mut state = self.lock();
        if state.closed {
            return None;
        }
        let id = state.next;
        state.next += 1;
        let done = Done {
            tracker: self.clone(),
            id,
        };
        let task = tokio::spawn(async move {
            // Dropped when the work ends or the task is aborted.
            let _done = done;
            work.await
        });
        state.running.insert(id, task.abort_handle());
        Some(task)
    }

    /// Aborts every running task; returns how many.
    fn abort_all(&self) -> usize {
        let state = self.lock();
        for task in state.running.values() {
            task.abort();
        }
        state.running.len()
    }

    /// Waits until no task runs, at most `limit`; whether none runs.
    async fn wait_idle(&self, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let notified = self.idle.notified();
            tokio::pin!(notified);
            // Registered before the check, so a task ending in between wakes us.
            notified.as_mut().enable();
            if self.lock().running.is_empty() {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.lock().running.is_empty();
            }
        }
    }
}

/// Removes its task from the tracker when dropped.
struct Done {
    tracker: Arc<Tracker>,
    id: u64,
}

impl Drop for Done {
    fn drop(&mut self) {
        let mut state = self.tracker.lock();
        state.running.remove(&self.id);
        if state.running.is_empty() {
            self.tracker.idle.notify_waiters();
        }
    }
}

/// The webhook handler: refuses a delivery without a usable
/// `Stripe-Signature` header before reading its body, reads the raw body
/// (at most the verifier's [`body_limit`](crate::signature::Verifier::body_limit),
/// within the body timeout), runs [`WebhookProcessor::handle`] in a task
/// tracked by the endpoint, and answers with [`response_for`]. See the
/// [module docs](self) for the mapping.
///
/// Usable in any router whose state gives a [`WebhookEndpoint`] through
/// [`FromRef`](axum::extract::FromRef).
pub async fn webhook(State(endpoint): State<WebhookEndpoint>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    if endpoint.is_closed() {
        return refused(StatusCode::SERVICE_UNAVAILABLE, "shutting_down", true);
    }
    let processor = endpoint.processor.clone();
    let Some(signature) = signature_header(&parts.headers).map(str::to_owned) else {
        // Refused before a byte of the body is read. The processor answers
        // (and counts) the missing header without an event to look at.
        let result = processor.handle(&[], None).await;
        log(&result, None);
        return response_for(&result);
    };
    let limit = processor.verifier().body_limit();
    let read = tokio::time::timeout(endpoint.body_timeout, read_limited(body, limit)).await;
    let body = match read {
        Ok(Ok(body)) => body,
        Ok(Err(ReadError::TooLarge { len })) => {
            let result = Err(Error::Verify(VerifyError::BodyTooLarge { len, limit }));
            log(&result, None);
            return response_for(&result);
        }
        Ok(Err(ReadError::Unreadable)) => {
            return refused(StatusCode::BAD_REQUEST, "unreadable_body", true);
        }
        Err(_) => return refused(StatusCode::REQUEST_TIMEOUT, "body_timeout", true),
    };

    // Own, tracked task: dropping this handler (client gone, timeout layer)
    // must not cut the processor off between claim and completion, and
    // shutdown must know what is still running.
    let task = endpoint.spawn(async move {
        let result = processor.handle(&body, Some(&signature)).await;
        log(&result, Some(&body));
        result
    });
    let Some(task) = task else {
        return refused(StatusCode::SERVICE_UNAVAILABLE, "shutting_down", true);
    };
    match task.await {
        Ok(result) => response_for(&result),
        // Aborted at the shutdown deadline: its claim is released.
        Err(e) if e.is_cancelled() => {
            refused(StatusCode::SERVICE_UNAVAILABLE, "shutting_down", true)
        }
        // The processor catches the application's panics; this is one of
        // its own. Stripe retries.
        Err(_) => refused(StatusCode::INTERNAL_SERVER_ERROR, "internal", true),
    }
}

/// The HTTP answer for a processor result: the status of
/// [`Outcome::http_status`] or [`Error::http_status`] and a small JSON
/// body, `{"outcome": label, "event_id": id}` or
/// `{"error": label, "retryable": bool}`.
///
/// For frameworks other than axum, or a handler of your own that wants the
/// same answers.
pub fn response_for(result: &Result<Outcome, Error>) -> Response {
    match result {
        Ok(outcome) => {
            let status = StatusCode::from_u16(outcome.http_status()).unwrap_or(StatusCode::OK);
            let body = Acknowledged {
                outcome: outcome.as_str(),
                event_id: outcome.event_id(),
            };
            (status, Json(body)).into_response()
        }
        Err(error) => {
            let status = StatusCode::from_u16(error.http_status())
                .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            refusal(status, error.as_str(), error.is_retryable())
        }
    }
}

/// The `Stripe-Signature` value: the first one, if it is UTF-8 and not
/// empty.
fn signature_header(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(SIGNATURE_HEADER)
        .and_then(|v| std::str::from_utf8(v.as_bytes()).ok())
        .filter(|v| !v.is_empty())
}

#[derive(Serialize)]
struct Acknowledged<'a> {
    outcome: &'a str,
    event_id: &'a str,
}

#[derive(Serialize)]
struct Refused<'a> {
    error: &'a str,
    retryable: bool,
}

fn refusal(status: StatusCode, error: &str, retryable: bool) -> Response {
    (status, Json(Refused { error, retryable })).into_response()
}

/// A refusal the processor did not decide: logged, then answered.
fn refused(status: StatusCode, error: &str, retryable: bool) -> Response {
    log_refused(error, status.as_u16(), retryable);
    refusal(status, error, retryable)
}

enum ReadError {
    /// More than the limit: `len` is what was known when reading stopped
    /// (the declared length, or the bytes received so far).
    TooLarge { len: usize },
    /// The connection failed mid-body.
    Unreadable,
}

/// Collects `body`, refusing more than `limit` bytes without reading them.
async fn read_limited(mut body: Body, limit: usize) -> Result<Bytes, ReadError> {
    let hint = body.size_hint();
    let declared = usize::try_from(hint.lower()).unwrap_or(usize::MAX);
    if declared > limit {
        return Err(ReadError::TooLarge { len: declared });
    }
    let mut first: Option<Bytes> = None;
    let mut rest: Vec<u8> = Vec::new();
    let mut len = 0usize;
    while let Some(frame) = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await {
        let Ok(frame) = frame else {
            return Err(ReadError::Unreadable);
        };
        // Trailers carry nothing Stripe signs; ignore them.
        let Ok(data) = frame.into_data() else {
            continue;
        };
        len = len.saturating_add(data.len());
        if len > limit {
            return Err(ReadError::TooLarge { len });
        }
        // The usual case is one frame: keep it without copying.
        match &first {
            None if rest.is_empty() => first = Some(data),
            _ => {
                if let Some(f) = first.take() {
                    rest.reserve(declared.max(len));
                    rest.extend_from_slice(&f);
                }
                rest.extend_from_slice(&data);
            }
        }
    }
    Ok(match first {
        Some(bytes) => bytes,
        None => Bytes::from(rest),
    })
}

/// `ERROR` for a 5xx other than 503, `WARN` for the rest (4xx, 503).
#[cfg(feature = "tracing")]
macro_rules! refusal_event {
    ($status:expr, $($fields:tt)+) => {
        if $status >= 500 && $status != 503 {
            tracing::error!($($fields)+)
        } else {
            tracing::warn!($($fields)+)
        }
    };
}

#[cfg(feature = "tracing")]
fn log(result: &Result<Outcome, Error>, body: Option<&Bytes>) {
    match result {
        Ok(outcome) => {
            // The type is known for processed events; for the others, read
            // it from the verified body (never logged itself).
            let event_type = match outcome {
                Outcome::Processed { event_type, .. } => Some(event_type.clone()),
                _ => body.and_then(|b| event_type_of(b)),
            };
            tracing::info!(
                event_id = outcome.event_id(),
                event_type = event_type.as_deref(),
                outcome = outcome.as_str(),
                status = outcome.http_status(),
                "stripe webhook"
            );
        }
        Err(error) => {
            let event_id = error_event_id(error);
            let status = error.http_status();
            // Display never contains the body, the header or a secret.
            refusal_event!(
                status,
                event_id,
                error = error.as_str(),
                status,
                retryable = error.is_retryable(),
                detail = %error,
                "stripe webhook refused"
            );
        }
    }
}

#[cfg(not(feature = "tracing"))]
fn log(_result: &Result<Outcome, Error>, _body: Option<&Bytes>) {}

#[cfg(feature = "tracing")]
fn log_refused(error: &str, status: u16, retryable: bool) {
    refusal_event!(status, error, status, retryable, "stripe webhook refused");
}

#[cfg(not(feature = "tracing"))]
fn log_refused(_error: &str, _status: u16, _retryable: bool) {}

#[cfg(feature = "tracing")]
fn log_drained(cancelled: usize, released: usize) {
    if cancelled + released > 0 {
        tracing::warn!(
            cancelled,
            released,
            "stripe webhook work cut off at the shutdown deadline; claims released"
        );
    } else {
        tracing::info!("stripe webhook work drained");
    }
}

#[cfg(not(feature = "tracing"))]
fn log_drained(_cancelled: usize, _released: usize) {}

/// The event type of a body that passed verification (for the log line of
/// duplicates and ignored events only).
#[cfg(feature = "tracing")]
fn event_type_of(body: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct TypeOnly {
        #[serde(rename = "type")]
        event_type: String,
    }
    serde_json::from_slice::<TypeOnly>(body)
        .ok()
        .map(|t| t.event_type)
}

#[cfg(feature = "tracing")]
fn error_event_id(error: &Error) -> Option<&str> {
    match error {
        Error::Verify(_) | Error::Parse(_) => None,
        Error::InFlight { event_id, .. }
        | Error::PayloadConflict { event_id }
        | Error::Store { event_id, .. }
        | Error::Client { event_id, .. }
        | Error::Failed { event_id, .. }
        | Error::LeaseLost { event_id } => Some(event_id),
    }
}
