//! axum route helper (feature `axum`).
//!
//! One route, `POST /webhooks/stripe` by default, that hands the raw body and
//! the `Stripe-Signature` header to [`WebhookProcessor::handle`] and answers
//! with this mapping (every retryable failure is a 5xx, so Stripe delivers
//! the event again; everything settled is a 200):
//!
//! | result | status | body |
//! |---|---|---|
//! | processed, stale, no change, duplicate, ignored, dead-lettered | 200 | `{"outcome": "applied", "event_id": "evt_…"}` |
//! | bad signature, missing or unreadable header, not an event | 400 | `{"error": "signature_mismatch", "retryable": false}` |
//! | body larger than the verifier's [`body_limit`](crate::signature::Verifier::body_limit) | 413 | `{"error": "body_too_large", "retryable": false}` |
//! | same event id, different content | 409 | `{"error": "payload_conflict", "retryable": false}` |
//! | handler failed | 500 | `{"error": "failed", "retryable": true}` |
//! | in flight elsewhere, store or Stripe API down, lease lost | 503 | `{"error": "in_flight", "retryable": true}` |
//!
//! The `outcome` is [`Outcome::as_str`], the `error` is [`Error::as_str`], and
//! the status is [`Outcome::http_status`] / [`Error::http_status`]. The
//! answer never echoes the body, the header, or a secret.
//!
//! **Body.** The body is read by the helper itself (no extractor, so axum's
//! `DefaultBodyLimit` plays no part) and never beyond the verifier's
//! [`body_limit`](crate::signature::Verifier::body_limit): a `Content-Length` above it is
//! refused before reading, and a chunked body is cut off as soon as it
//! exceeds it. Both answer 413.
//!
//! **Header.** An absent `Stripe-Signature` header, or one whose value is
//! not UTF-8, is treated as missing (400 `missing_header`). With several,
//! the first counts.
//!
//! **Cancellation.** The processor runs in its own tokio task. A client that
//! disconnects, or a timeout layer that drops the handler, cannot stop it
//! between claiming an event and completing (or failing) it: the claim is
//! always settled by the processor's normal path, and Stripe's retry gets
//! `duplicate` instead of waiting for the lease to run out.
//!
//! **Logs** (feature `tracing`). One event per request, target
//! `stripe_webhook_guard::integrations::axum`: `event_id` and `event_type`
//! when known, `outcome` or `error` label, `status`. `INFO` for 2xx, `WARN`
//! for 4xx and 503, `ERROR` for 500. Never the body, the header or a secret.
//!
//! # Example
//!
//! ```no_run
//! use std::sync::Arc;
//!
//! use stripe_webhook_guard::integrations::axum as stripe_axum;
//! use stripe_webhook_guard::processor::WebhookProcessor;
//! use stripe_webhook_guard::signature::Verifier;
//! use stripe_webhook_guard::store::MemoryStore;
//!
//! # async fn run() -> std::io::Result<()> {
//! let secret = std::env::var("STRIPE_WEBHOOK_SECRET").unwrap_or_default();
//! let processor = WebhookProcessor::builder(Verifier::new(secret))
//!     .store(Arc::new(MemoryStore::new()))
//!     .build();
//!
//! // `POST /webhooks/stripe`; merge it into the rest of your application.
//! let app = axum::Router::new()
//!     .route("/healthz", axum::routing::get(|| async { "ok" }))
//!     .merge(stripe_axum::router(processor));
//!
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:4242").await?;
//! axum::serve(listener, app).await
//! # }
//! ```
//!
//! In a router with its own state, mount [`webhook`] and let axum find the
//! processor in that state with [`FromRef`](axum::extract::FromRef):
//!
//! ```no_run
//! use axum::extract::FromRef;
//! use axum::routing::post;
//! use stripe_webhook_guard::integrations::axum::webhook;
//! use stripe_webhook_guard::processor::WebhookProcessor;
//!
//! #[derive(Clone)]
//! struct AppState {
//!     processor: WebhookProcessor,
//!     // ... your own things
//! }
//!
//! impl FromRef<AppState> for WebhookProcessor {
//!     fn from_ref(state: &AppState) -> Self {
//!         state.processor.clone()
//!     }
//! }
//!
//! fn app(state: AppState) -> axum::Router {
//!     axum::Router::new()
//!         .route("/billing/stripe-events", post(webhook))
//!         .with_state(state)
//! }
//! ```

use std::pin::Pin;

use axum::Json;
use axum::Router;
use axum::body::{Body, Bytes, HttpBody};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde::Serialize;

use crate::processor::{Error, Outcome, WebhookProcessor};
use crate::signature::VerifyError;

/// The path [`router`] mounts: `/webhooks/stripe`.
pub const DEFAULT_PATH: &str = "/webhooks/stripe";

/// The header Stripe signs deliveries with (lower case, as `http` stores it).
pub const SIGNATURE_HEADER: &str = "stripe-signature";

/// A router with `POST` [`DEFAULT_PATH`] answered by [`webhook`] for
/// `processor`.
///
/// The router's state is provided, so it merges into any `Router<()>`.
pub fn router(processor: WebhookProcessor) -> Router {
    router_at(DEFAULT_PATH, processor)
}

/// A router with `POST path` answered by [`webhook`] for `processor`.
///
/// # Panics
///
/// As [`Router::route`]: when `path` does not start with `/` or is not a
/// valid axum path.
pub fn router_at(path: &str, processor: WebhookProcessor) -> Router {
    Router::new()
        .route(path, post(webhook))
        .with_state(processor)
}

/// The webhook handler: reads the raw body (at most the verifier's
/// [`body_limit`](crate::signature::Verifier::body_limit)) and the `Stripe-Signature` header,
/// runs [`WebhookProcessor::handle`] in its own task, and answers with
/// [`response_for`]. See the [module docs](self) for the mapping.
///
/// Usable in any router whose state gives a [`WebhookProcessor`] through
/// [`FromRef`](axum::extract::FromRef).
pub async fn webhook(State(processor): State<WebhookProcessor>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let limit = processor.verifier().body_limit();
    let body = match read_limited(body, limit).await {
        Ok(body) => body,
        Err(ReadError::TooLarge { len }) => {
            let result = Err(Error::Verify(VerifyError::BodyTooLarge { len, limit }));
            log(&result, None);
            return response_for(&result);
        }
        Err(ReadError::Unreadable) => {
            log_unreadable();
            return refusal(StatusCode::BAD_REQUEST, "unreadable_body", true);
        }
    };
    let signature = signature_header(&parts.headers).map(str::to_owned);

    // Own task: dropping this handler (client gone, timeout layer) must not
    // cut the processor off between claim and completion.
    let task = tokio::spawn(async move {
        let result = processor.handle(&body, signature.as_deref()).await;
        log(&result, Some(&body));
        result
    });
    if let Ok(result) = task.await {
        response_for(&result)
    } else {
        // The processor catches the application's panics; this is one of
        // its own (or the runtime is shutting down). Stripe retries.
        log_internal();
        refusal(StatusCode::INTERNAL_SERVER_ERROR, "internal", true)
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

/// The `Stripe-Signature` value: the first one, if it is UTF-8.
fn signature_header(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(SIGNATURE_HEADER)
        .and_then(|v| std::str::from_utf8(v.as_bytes()).ok())
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
            if status == 500 {
                tracing::error!(
                    event_id,
                    error = error.as_str(),
                    status,
                    retryable = error.is_retryable(),
                    detail = %error,
                    "stripe webhook refused"
                );
            } else {
                tracing::warn!(
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
}

#[cfg(not(feature = "tracing"))]
fn log(_result: &Result<Outcome, Error>, _body: Option<&Bytes>) {}

#[cfg(feature = "tracing")]
fn log_unreadable() {
    tracing::warn!(
        error = "unreadable_body",
        status = 400,
        "stripe webhook refused"
    );
}

#[cfg(not(feature = "tracing"))]
fn log_unreadable() {}

#[cfg(feature = "tracing")]
fn log_internal() {
    tracing::error!(
        error = "internal",
        status = 500,
        "stripe webhook processing task did not finish"
    );
}

#[cfg(not(feature = "tracing"))]
fn log_internal() {}

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
