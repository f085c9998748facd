//! The processor's public types: the handler interface, filters, outcomes,
//! errors and counters.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use async_trait::async_trait;
use serde::Serialize;
use time::OffsetDateTime;

use crate::client::ClientError;
use crate::clock::Clock;
use crate::event::{Event, EventType, ParseError};
use crate::ledger::{Lease, LedgerState};
use crate::signature::VerifyError;
use crate::store::StoreError;
use crate::subscription::{Effect, PaidInvoice, SubscriptionRecord};

/// What the application's handler gets besides the event.
#[derive(Debug, Clone)]
pub struct HandlerContext {
    /// The event id: use it as the idempotency key of your own effects.
    pub event_id: String,
    /// Which attempt this is (1 for the first).
    pub attempt: u32,
    /// When this worker's claim runs out, on the clock's monotonic face: the
    /// time the store said was left on the lease, counted from just before
    /// the claim. An effect committed after it may race another worker's;
    /// check [`HandlerContext::lease_valid`] before committing a slow effect.
    pub(super) deadline: Instant,
    /// What the subscription effect did.
    pub effect: Effect,
    /// The subscription record after the effect, when the event is about one.
    pub subscription: Option<SubscriptionRecord>,
    /// The claim this worker holds. A store that supports it can complete
    /// the event inside the application's own transaction with this lease
    /// (the processor's own completion is then a no-op).
    pub lease: Lease,
    pub(super) clock: Arc<dyn Clock>,
}

impl HandlerContext {
    /// Whether the claim is still held: the lease's local monotonic deadline
    /// has not passed. Never judged by comparing the application's wall
    /// clock with the store's expiry timestamp (the two clocks can be
    /// minutes apart).
    pub fn lease_valid(&self) -> bool {
        self.clock.monotonic() < self.deadline
    }

    /// The time left on the claim (zero once it ran out), by the same
    /// monotonic deadline as [`HandlerContext::lease_valid`].
    pub fn lease_remaining(&self) -> std::time::Duration {
        self.deadline
            .saturating_duration_since(self.clock.monotonic())
    }

    /// The payment this event is the first report of, if it is one. Stripe
    /// reports one payment twice, with `invoice.paid` and
    /// `invoice.payment_succeeded` (often in the same second, in either
    /// order); only the event processed first answers `Some` (also on its
    /// retries), so a handler that sends a receipt or provisions on payment
    /// acts once per payment by acting only then. `PaidInvoice::latest`
    /// says whether it paid the subscription's latest invoice.
    pub fn first_payment_report(&self) -> Option<&PaidInvoice> {
        self.subscription
            .as_ref()?
            .payment_first_reported_by(&self.event_id)
    }
}

/// An application's failure to handle an event.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct HandlerError {
    pub(super) message: String,
    pub(super) retryable: bool,
}

impl HandlerError {
    /// A failure that another attempt may fix (the default for `?`).
    pub fn retryable(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            retryable: true,
        }
    }

    /// A failure no retry will fix: the event is dead-lettered at once.
    pub fn permanent(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            retryable: false,
        }
    }

    /// Whether another attempt may succeed.
    pub fn is_retryable(&self) -> bool {
        self.retryable
    }
}

impl From<String> for HandlerError {
    fn from(message: String) -> Self {
        Self::retryable(message)
    }
}

impl From<&str> for HandlerError {
    fn from(message: &str) -> Self {
        Self::retryable(message)
    }
}

/// The application's own effects for an event (send an e-mail, provision a
/// seat). Runs after the subscription effect, before completion; it may run
/// again if completion fails, so make it idempotent on
/// [`HandlerContext::event_id`].
#[async_trait]
pub trait EventHandler: Send + Sync {
    /// Handles one event.
    ///
    /// # Errors
    ///
    /// [`HandlerError`]: retryable (Stripe's retry will run it again) or
    /// permanent (dead-lettered).
    async fn handle(&self, event: &Event, ctx: &HandlerContext) -> Result<(), HandlerError>;

    /// Whether this handler wants events of `event_type`. Events nobody acts
    /// on are recorded as ignored without a claim. Default: all.
    fn wants(&self, event_type: &EventType) -> bool {
        let _ = event_type;
        true
    }
}

/// Which Connect accounts' events to process.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum AccountFilter {
    /// Only the platform's own events (no `account`): the default, since
    /// Connect events belong on a Connect endpoint.
    #[default]
    PlatformOnly,
    /// Events of any account and of the platform.
    Any,
    /// Only these connected accounts (and not the platform's).
    Only(Vec<String>),
}

impl AccountFilter {
    pub(super) fn allows(&self, account: Option<&str>) -> bool {
        match self {
            Self::PlatformOnly => account.is_none(),
            Self::Any => true,
            Self::Only(list) => account.is_some_and(|a| list.iter().any(|x| x == a)),
        }
    }
}

/// Why an event was ignored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum IgnoreReason {
    /// Live event on a test processor, or the reverse.
    LivemodeMismatch,
    /// An account the filter does not allow.
    ForeignAccount,
    /// No subscription effect and the handler does not want it.
    UnhandledType,
}

impl IgnoreReason {
    /// `snake_case` name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::LivemodeMismatch => "livemode_mismatch",
            Self::ForeignAccount => "foreign_account",
            Self::UnhandledType => "unhandled_type",
        }
    }
}

/// A successful answer: acknowledge with 2xx.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Outcome {
    /// Processed now.
    Processed {
        /// The event.
        event_id: String,
        /// Its type.
        event_type: String,
        /// The subscription effect.
        effect: Effect,
        /// The attempt that succeeded.
        attempt: u32,
        /// Whether an application handler ran.
        handled: bool,
    },
    /// Settled before (processed, ignored or dead).
    Duplicate {
        /// The event.
        event_id: String,
        /// Its settled state.
        state: LedgerState,
    },
    /// Filtered out.
    Ignored {
        /// The event.
        event_id: String,
        /// Why.
        reason: IgnoreReason,
    },
    /// Stored by inbox mode; a worker will process it.
    Queued {
        /// The event.
        event_id: String,
    },
    /// Attempts exhausted (or a permanent failure): kept for replay,
    /// acknowledged so Stripe stops retrying.
    DeadLettered {
        /// The event.
        event_id: String,
        /// Attempts made.
        attempts: u32,
        /// The last error.
        error: String,
    },
}

impl Outcome {
    /// Always 200: every outcome is acknowledged.
    pub fn http_status(&self) -> u16 {
        200
    }

    /// The event id.
    pub fn event_id(&self) -> &str {
        match self {
            Self::Processed { event_id, .. }
            | Self::Duplicate { event_id, .. }
            | Self::Ignored { event_id, .. }
            | Self::Queued { event_id }
            | Self::DeadLettered { event_id, .. } => event_id,
        }
    }

    /// A short `snake_case` name: the effect's (`applied`, `refetched`,
    /// `stale`, `no_change`, `none`, `entitlements`) for a processed event,
    /// else `duplicate`, `ignored`, `queued` or `dead_lettered`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Processed { effect, .. } => effect.as_str(),
            Self::Queued { .. } => "queued",
            Self::Duplicate { .. } => "duplicate",
            Self::Ignored { .. } => "ignored",
            Self::DeadLettered { .. } => "dead_lettered",
        }
    }
}

/// A failed request. Never contains the body, the header or a secret.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The signature check failed (400; 413 for an oversized body).
    #[error(transparent)]
    Verify(#[from] VerifyError),
    /// The body is not a Stripe event (400).
    #[error(transparent)]
    Parse(ParseError),
    /// Another worker holds the event (503; Stripe retries later).
    #[error("event {event_id} is being processed by another worker")]
    InFlight {
        /// The event.
        event_id: String,
        /// When that worker's lease runs out.
        until: OffsetDateTime,
    },
    /// The same event id arrived with different content (409; not retried
    /// successfully: investigate).
    #[error("event {event_id} was seen before with different content")]
    PayloadConflict {
        /// The event.
        event_id: String,
    },
    /// The store failed (503).
    #[error("event {event_id}: {source}")]
    Store {
        /// The event, when known.
        event_id: String,
        /// The store error.
        #[source]
        source: StoreError,
    },
    /// The Stripe API failed while a refetch was needed (503).
    #[error("event {event_id}: {source}")]
    Client {
        /// The event.
        event_id: String,
        /// The API error.
        #[source]
        source: ClientError,
    },
    /// The handler or the subscription effect failed; the event is recorded
    /// as failed and Stripe's retry will process it again (500).
    #[error("event {event_id} failed on attempt {attempt}: {message}")]
    Failed {
        /// The event.
        event_id: String,
        /// The attempt that failed.
        attempt: u32,
        /// What went wrong.
        message: String,
    },
    /// The lease ran out and another worker took over; this worker's effect
    /// was not committed as the event's completion (503).
    #[error("event {event_id}: lease lost to another worker")]
    LeaseLost {
        /// The event.
        event_id: String,
    },
}

impl Error {
    /// Whether Stripe's retry (or a caller's) may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Verify(_) | Self::Parse(_) | Self::PayloadConflict { .. } => false,
            Self::Store { source, .. } => source.is_retryable(),
            Self::InFlight { .. }
            | Self::Client { .. }
            | Self::Failed { .. }
            | Self::LeaseLost { .. } => true,
        }
    }

    /// The HTTP status to answer Stripe with: 400 for a bad signature or an
    /// unparseable body (413 for an oversized one), 409 for a payload that
    /// conflicts with an earlier delivery of the same id, 500 for a failed
    /// attempt, 503 for in flight, store, client and lease failures — every
    /// retryable failure is a 5xx so that Stripe delivers the event again.
    pub fn http_status(&self) -> u16 {
        match self {
            Self::Verify(VerifyError::BodyTooLarge { .. }) => 413,
            Self::Verify(_) | Self::Parse(_) => 400,
            Self::PayloadConflict { .. } => 409,
            Self::Failed { .. } => 500,
            Self::InFlight { .. }
            | Self::Store { .. }
            | Self::Client { .. }
            | Self::LeaseLost { .. } => 503,
        }
    }

    /// A short `snake_case` name for logs and metrics.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Verify(e) => e.as_str(),
            Self::Parse(_) => "parse_error",
            Self::InFlight { .. } => "in_flight",
            Self::PayloadConflict { .. } => "payload_conflict",
            Self::Store { .. } => "store_error",
            Self::Client { .. } => "client_error",
            Self::Failed { .. } => "failed",
            Self::LeaseLost { .. } => "lease_lost",
        }
    }
}

/// Counters since the processor was built.
#[derive(Debug, Default)]
pub(super) struct Counters {
    pub(super) received: AtomicU64,
    pub(super) rejected: AtomicU64,
    pub(super) applied: AtomicU64,
    pub(super) duplicates: AtomicU64,
    pub(super) stale: AtomicU64,
    pub(super) no_change: AtomicU64,
    pub(super) ignored: AtomicU64,
    pub(super) refetches: AtomicU64,
    pub(super) in_flight: AtomicU64,
    pub(super) failed: AtomicU64,
    pub(super) dead: AtomicU64,
    pub(super) handler_effects: AtomicU64,
}

/// A copy of the processor's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Stats {
    /// Requests handed to [`WebhookProcessor::handle`](super::WebhookProcessor::handle) (and events to
    /// [`WebhookProcessor::process_event`](super::WebhookProcessor::process_event)).
    pub received: u64,
    /// Refused before the ledger: bad signature or unparseable.
    pub rejected: u64,
    /// Subscription records created or changed (including by refetch).
    pub applied: u64,
    /// Settled before: acknowledged without work.
    pub duplicates: u64,
    /// Older than the record: ignored by the state machine.
    pub stale: u64,
    /// Processed, changed nothing.
    pub no_change: u64,
    /// Filtered out.
    pub ignored: u64,
    /// Subscriptions fetched from Stripe.
    pub refetches: u64,
    /// Answered "in flight".
    pub in_flight: u64,
    /// Attempts that failed (retryable).
    pub failed: u64,
    /// Events dead-lettered.
    pub dead: u64,
    /// Times the application handler completed successfully.
    pub handler_effects: u64,
}

pub(super) fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}
