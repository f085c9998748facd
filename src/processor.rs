//! The webhook pipeline: raw request in, exactly-once effect out.
//!
//! [`WebhookProcessor::handle`] runs, in this order:
//!
//! 1. **verify** the signature ([`crate::signature`]) — nothing is parsed
//!    before it passes;
//! 2. **parse** the envelope ([`crate::event`]);
//! 3. **filter**: livemode, Connect account, and types nobody acts on are
//!    recorded as ignored and acknowledged;
//! 4. **claim** the event in the ledger ([`crate::ledger`]) — no effect runs
//!    without a claim;
//! 5. the **subscription effect** ([`crate::subscription`]): load, decide,
//!    refetch from Stripe when the decision asks and a client is configured,
//!    save with optimistic concurrency;
//! 6. the application's **handler** ([`EventHandler`]), with the attempt
//!    number and the event id for its own idempotency; a panic is caught and
//!    recorded as a failure;
//! 7. **complete** the claim — only after every effect succeeded; on any
//!    error the claim is **failed** instead (retryable until
//!    `max_attempts`, then dead-lettered), so Stripe's retry processes the
//!    event again and nothing is acknowledged before it is done.
//!
//! The HTTP answer comes from [`Outcome::http_status`] and
//! [`Error::http_status`]: bad signature or unparseable → 400; duplicate,
//! ignored, stale, dead-lettered, processed → 200; in flight, store or client
//! failure, handler failure → 5xx so Stripe retries.

use std::any::Any;
use std::fmt;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use async_trait::async_trait;
use serde::Serialize;
use time::{Duration, OffsetDateTime};

use crate::client::{ClientError, StripeClient};
use crate::clock::{Clock, SystemClock};
use crate::event::{Event, EventType, ParseError, SubscriptionStatus};
use crate::ledger::{
    ClaimOutcome, ClaimRequest, FailOutcome, Failure, IgnoreRequest, Lease, LedgerState,
};
use crate::signature::{Verifier, VerifyError};
use crate::store::{EventLedger, MemoryStore, StoreError, StoreErrorKind, SubscriptionStore};
use crate::subscription::{
    self, AnomalyKind, Applied, Decision, RefetchReason, SubscriptionRecord,
};

/// Default lease on a claimed event: 60 seconds.
pub const DEFAULT_LEASE: Duration = Duration::seconds(60);

/// Default attempts before an event is dead-lettered: 8.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 8;

/// How many times a subscription save is retried after losing an
/// optimistic-concurrency race.
const MAX_SAVE_RACES: usize = 8;

/// What the application's handler gets besides the event.
#[derive(Debug, Clone)]
pub struct HandlerContext {
    /// The event id: use it as the idempotency key of your own effects.
    pub event_id: String,
    /// Which attempt this is (1 for the first).
    pub attempt: u32,
    /// When this worker's claim runs out. An effect committed after it may
    /// race another worker's; check [`HandlerContext::lease_valid`] before
    /// committing a slow effect.
    pub lease_expires_at: OffsetDateTime,
    /// What the subscription effect did.
    pub effect: Effect,
    /// The subscription record after the effect, when the event is about one.
    pub subscription: Option<SubscriptionRecord>,
    /// The claim this worker holds. A store that supports it can complete
    /// the event inside the application's own transaction with this lease
    /// (the processor's own completion is then a no-op).
    pub lease: Lease,
    clock: Arc<dyn Clock>,
}

impl HandlerContext {
    /// Whether the claim is still held (by the processor's clock).
    pub fn lease_valid(&self) -> bool {
        self.clock.now() < self.lease_expires_at
    }
}

/// An application's failure to handle an event.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct HandlerError {
    message: String,
    retryable: bool,
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
    fn allows(&self, account: Option<&str>) -> bool {
        match self {
            Self::PlatformOnly => account.is_none(),
            Self::Any => true,
            Self::Only(list) => account.is_some_and(|a| list.iter().any(|x| x == a)),
        }
    }
}

/// What the subscription effect did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Effect {
    /// The event has no subscription effect.
    None,
    /// A record was created or changed.
    Applied {
        /// The subscription.
        subscription_id: String,
        /// Status before and after, when it changed.
        status_change: Option<(SubscriptionStatus, SubscriptionStatus)>,
        /// Why.
        reason: subscription::ApplyReason,
    },
    /// Older than the record: ignored.
    Stale {
        /// The subscription.
        subscription_id: String,
    },
    /// Changed nothing (the same snapshot again, or an agreeing tie).
    NoChange {
        /// The subscription.
        subscription_id: Option<String>,
    },
    /// Stripe's object was fetched and saved.
    Refetched {
        /// The subscription.
        subscription_id: String,
        /// Why it was fetched.
        reason: RefetchReason,
        /// Status before and after, when it changed.
        status_change: Option<(SubscriptionStatus, SubscriptionStatus)>,
    },
    /// A customer's entitlements were stored.
    Entitlements {
        /// The customer.
        customer: String,
        /// Whether they changed (false when an older summary arrived late).
        changed: bool,
    },
}

impl Effect {
    /// A short `snake_case` label.
    pub fn label(&self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Applied { .. } => "applied",
            Self::Stale { .. } => "stale",
            Self::NoChange { .. } => "no_change",
            Self::Refetched { .. } => "refetched",
            Self::Entitlements { .. } => "entitlements",
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
            | Self::DeadLettered { event_id, .. } => event_id,
        }
    }

    /// A short label: `applied`, `refetched`, `stale`, `no_change`, `none`,
    /// `entitlements`, `duplicate`, `ignored` or `dead_lettered`.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Processed { effect, .. } => effect.label(),
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

    /// The HTTP status to answer Stripe with (DESIGN §9).
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

    /// A short `snake_case` label for logs and metrics.
    pub fn label(&self) -> &'static str {
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
struct Counters {
    received: AtomicU64,
    rejected: AtomicU64,
    applied: AtomicU64,
    duplicates: AtomicU64,
    stale: AtomicU64,
    no_change: AtomicU64,
    ignored: AtomicU64,
    refetches: AtomicU64,
    in_flight: AtomicU64,
    failed: AtomicU64,
    dead: AtomicU64,
    handler_effects: AtomicU64,
}

/// A copy of the processor's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Stats {
    /// Requests handed to [`WebhookProcessor::handle`] (and events to
    /// [`WebhookProcessor::process_event`]).
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

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// Builds a [`WebhookProcessor`].
pub struct ProcessorBuilder {
    verifier: Verifier,
    ledger: Option<Arc<dyn EventLedger>>,
    subscriptions: Option<Arc<dyn SubscriptionStore>>,
    handler: Option<Arc<dyn EventHandler>>,
    client: Option<Arc<dyn StripeClient>>,
    clock: Arc<dyn Clock>,
    livemode: Option<bool>,
    accounts: AccountFilter,
    lease: Duration,
    max_attempts: u32,
}

impl fmt::Debug for ProcessorBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProcessorBuilder")
            .field("verifier", &self.verifier)
            .field("livemode", &self.livemode)
            .field("accounts", &self.accounts)
            .field("lease", &self.lease)
            .field("max_attempts", &self.max_attempts)
            .finish_non_exhaustive()
    }
}

impl ProcessorBuilder {
    /// Uses one store for both the ledger and the subscriptions (the usual
    /// case: [`MemoryStore`], or a database store).
    #[must_use]
    pub fn store<S>(mut self, store: Arc<S>) -> Self
    where
        S: EventLedger + SubscriptionStore + 'static,
    {
        self.ledger = Some(store.clone());
        self.subscriptions = Some(store);
        self
    }

    /// The ledger.
    #[must_use]
    pub fn ledger(mut self, ledger: Arc<dyn EventLedger>) -> Self {
        self.ledger = Some(ledger);
        self
    }

    /// The subscription store.
    #[must_use]
    pub fn subscriptions(mut self, store: Arc<dyn SubscriptionStore>) -> Self {
        self.subscriptions = Some(store);
        self
    }

    /// The application's handler.
    #[must_use]
    pub fn handler(mut self, handler: Arc<dyn EventHandler>) -> Self {
        self.handler = Some(handler);
        self
    }

    /// A Stripe client: enables refetches for ties, impossible transitions,
    /// unknown subscriptions and thin events.
    #[must_use]
    pub fn client(mut self, client: Arc<dyn StripeClient>) -> Self {
        self.client = Some(client);
        self
    }

    /// The clock (default: the system clock).
    #[must_use]
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// Accept only live (`true`) or only test (`false`) events; the other
    /// mode is ignored. Default: both.
    #[must_use]
    pub fn livemode(mut self, livemode: bool) -> Self {
        self.livemode = Some(livemode);
        self
    }

    /// Which Connect accounts' events to process (default: the platform's only).
    #[must_use]
    pub fn accounts(mut self, filter: AccountFilter) -> Self {
        self.accounts = filter;
        self
    }

    /// The lease on a claimed event (default 60 s). Longer than your slowest
    /// handler.
    #[must_use]
    pub fn lease(mut self, lease: Duration) -> Self {
        self.lease = lease;
        self
    }

    /// Attempts before dead-lettering (default 8; at least 1).
    #[must_use]
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        self.max_attempts = attempts.max(1);
        self
    }

    /// Builds the processor. Without stores, an in-memory store on the
    /// builder's clock is used.
    ///
    /// # Panics
    ///
    /// When only one of [`ProcessorBuilder::ledger`] and
    /// [`ProcessorBuilder::subscriptions`] was set: the other would silently
    /// live in memory.
    pub fn build(self) -> WebhookProcessor {
        let (ledger, subscriptions): (Arc<dyn EventLedger>, Arc<dyn SubscriptionStore>) =
            match (self.ledger, self.subscriptions) {
                (Some(l), Some(s)) => (l, s),
                (None, None) => {
                    let memory = Arc::new(MemoryStore::with_clock(self.clock.clone()));
                    (memory.clone(), memory)
                }
                // Half a configuration would silently keep the other half in
                // memory, lost at the next restart.
                (Some(_), None) => panic!(
                    "ProcessorBuilder: a ledger was set without a subscription store; \
                     set both, or use .store() for a store that is both"
                ),
                (None, Some(_)) => panic!(
                    "ProcessorBuilder: a subscription store was set without a ledger; \
                     set both, or use .store() for a store that is both"
                ),
            };
        WebhookProcessor {
            inner: Arc::new(Inner {
                verifier: self.verifier,
                ledger,
                subscriptions,
                handler: self.handler,
                client: self.client,
                clock: self.clock,
                livemode: self.livemode,
                accounts: self.accounts,
                lease: self.lease,
                max_attempts: self.max_attempts,
                counters: Counters::default(),
            }),
        }
    }
}

struct Inner {
    verifier: Verifier,
    ledger: Arc<dyn EventLedger>,
    subscriptions: Arc<dyn SubscriptionStore>,
    handler: Option<Arc<dyn EventHandler>>,
    client: Option<Arc<dyn StripeClient>>,
    clock: Arc<dyn Clock>,
    livemode: Option<bool>,
    accounts: AccountFilter,
    lease: Duration,
    max_attempts: u32,
    counters: Counters,
}

/// The webhook pipeline. Cheap to clone (an `Arc` inside); share one per
/// endpoint. See the [module docs](self) for the order of steps.
#[derive(Clone)]
pub struct WebhookProcessor {
    inner: Arc<Inner>,
}

impl fmt::Debug for WebhookProcessor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WebhookProcessor")
            .field("verifier", &self.inner.verifier)
            .field("client", &self.inner.client.is_some())
            .field("handler", &self.inner.handler.is_some())
            .field("livemode", &self.inner.livemode)
            .field("accounts", &self.inner.accounts)
            .field("lease", &self.inner.lease)
            .field("max_attempts", &self.inner.max_attempts)
            .finish_non_exhaustive()
    }
}

/// Why a subscription effect failed.
enum EffectError {
    /// A retryable infrastructure failure.
    Store(StoreError),
    Client(ClientError),
    /// No retry will fix it.
    Permanent(String),
}

impl WebhookProcessor {
    /// Starts a builder around `verifier`.
    pub fn builder(verifier: Verifier) -> ProcessorBuilder {
        ProcessorBuilder {
            verifier,
            ledger: None,
            subscriptions: None,
            handler: None,
            client: None,
            clock: Arc::new(SystemClock),
            livemode: None,
            accounts: AccountFilter::default(),
            lease: DEFAULT_LEASE,
            max_attempts: DEFAULT_MAX_ATTEMPTS,
        }
    }

    /// The subscription store (to answer access questions).
    pub fn subscriptions(&self) -> &Arc<dyn SubscriptionStore> {
        &self.inner.subscriptions
    }

    /// The ledger (to list dead letters).
    pub fn ledger(&self) -> &Arc<dyn EventLedger> {
        &self.inner.ledger
    }

    /// The configured Stripe client, if any.
    pub fn client(&self) -> Option<&Arc<dyn StripeClient>> {
        self.inner.client.as_ref()
    }

    /// The clock.
    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.inner.clock
    }

    /// The verifier.
    pub fn verifier(&self) -> &Verifier {
        &self.inner.verifier
    }

    /// The counters since start.
    pub fn stats(&self) -> Stats {
        let c = &self.inner.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Stats {
            received: get(&c.received),
            rejected: get(&c.rejected),
            applied: get(&c.applied),
            duplicates: get(&c.duplicates),
            stale: get(&c.stale),
            no_change: get(&c.no_change),
            ignored: get(&c.ignored),
            refetches: get(&c.refetches),
            in_flight: get(&c.in_flight),
            failed: get(&c.failed),
            dead: get(&c.dead),
            handler_effects: get(&c.handler_effects),
        }
    }

    /// Handles one webhook request: the raw body exactly as received and the
    /// `Stripe-Signature` header. See the [module docs](self).
    ///
    /// # Errors
    ///
    /// [`Error`]; answer Stripe with [`Error::http_status`].
    pub async fn handle(&self, body: &[u8], signature: Option<&str>) -> Result<Outcome, Error> {
        bump(&self.inner.counters.received);
        let now = self.inner.clock.now();
        let verified = self
            .inner
            .verifier
            .verify(body, signature, now)
            .inspect_err(|_| bump(&self.inner.counters.rejected))?;
        let event = Event::parse(verified).map_err(|e| {
            bump(&self.inner.counters.rejected);
            Error::Parse(e)
        })?;
        self.process(&event, Some(verified.payload_str())).await
    }

    /// Processes an event that did not come through the webhook (fetched from
    /// `/v1/events` by the reconciler, or replayed from the ledger). Same
    /// ledger, same ids, same effects: an event that also arrives by webhook
    /// is processed once.
    ///
    /// # Errors
    ///
    /// As [`WebhookProcessor::handle`], minus the signature errors.
    pub async fn process_event(&self, event: &Event) -> Result<Outcome, Error> {
        bump(&self.inner.counters.received);
        self.process(event, None).await
    }

    /// The lease taken on claimed events.
    pub fn lease_duration(&self) -> Duration {
        self.inner.lease
    }

    /// Attempts before an event is dead-lettered.
    pub fn max_attempts(&self) -> u32 {
        self.inner.max_attempts
    }

    /// The filters of step 3: why `event` would be ignored, if it would.
    pub fn filter_reason(&self, event: &Event) -> Option<IgnoreReason> {
        self.filter(event)
    }

    /// The filters of step 3.
    fn filter(&self, event: &Event) -> Option<IgnoreReason> {
        if self.inner.livemode.is_some_and(|l| l != event.livemode()) {
            return Some(IgnoreReason::LivemodeMismatch);
        }
        if !self.inner.accounts.allows(event.account()) {
            return Some(IgnoreReason::ForeignAccount);
        }
        let t = event.event_type();
        let wanted =
            t.has_subscription_effect() || self.inner.handler.as_ref().is_some_and(|h| h.wants(t));
        (!wanted).then_some(IgnoreReason::UnhandledType)
    }

    async fn process(&self, event: &Event, payload: Option<&str>) -> Result<Outcome, Error> {
        let event_id = event.id().to_owned();
        let store_err = |source: StoreError| Error::Store {
            event_id: event.id().to_owned(),
            source,
        };
        if let Some(reason) = self.filter(event) {
            let state = self
                .inner
                .ledger
                .ignore(&IgnoreRequest::for_event(event, reason.as_str()))
                .await
                .map_err(store_err)?;
            if state == LedgerState::Ignored {
                bump(&self.inner.counters.ignored);
                trace(event, "ignored");
                return Ok(Outcome::Ignored { event_id, reason });
            }
            if state.is_settled() {
                bump(&self.inner.counters.duplicates);
                return Ok(Outcome::Duplicate { event_id, state });
            }
            // Accepted before the filters changed and not finished: finish
            // it rather than acknowledge an unprocessed event.
        }

        let request = ClaimRequest::for_event(event, self.inner.lease, self.inner.max_attempts);
        let lease = match self.inner.ledger.claim(&request).await.map_err(store_err)? {
            ClaimOutcome::Claimed(lease) => lease,
            ClaimOutcome::Duplicate { state } => {
                bump(&self.inner.counters.duplicates);
                trace(event, "duplicate");
                return Ok(Outcome::Duplicate { event_id, state });
            }
            ClaimOutcome::InFlight { until } => {
                bump(&self.inner.counters.in_flight);
                return Err(Error::InFlight { event_id, until });
            }
            ClaimOutcome::Conflict { .. } => {
                return Err(Error::PayloadConflict { event_id });
            }
            ClaimOutcome::DeadLettered { attempts } => {
                bump(&self.inner.counters.dead);
                return Ok(Outcome::DeadLettered {
                    event_id,
                    attempts,
                    error: "lease expired on the last attempt".to_owned(),
                });
            }
        };
        self.run_claimed(event, payload, lease).await
    }

    /// Steps 5–7 for an event this worker holds. Used by the synchronous
    /// path and by inbox workers.
    pub(crate) async fn run_claimed(
        &self,
        event: &Event,
        payload: Option<&str>,
        lease: Lease,
    ) -> Result<Outcome, Error> {
        let event_id = event.id().to_owned();
        let now = self.inner.clock.now();
        let (effect, record) = match self.subscription_effect(event, now).await {
            Ok(v) => v,
            Err(EffectError::Store(e)) => {
                let message = format!("subscription store: {e}");
                let retryable = e.is_retryable();
                return self
                    .fail(event, payload, &lease, message, retryable, Some(e))
                    .await;
            }
            Err(EffectError::Client(e)) => {
                let message = format!("Stripe refetch: {e}");
                let retryable = e.is_retryable();
                let fail = self
                    .fail(event, payload, &lease, message, retryable, None)
                    .await;
                return match fail {
                    Err(Error::Failed { .. }) => Err(Error::Client {
                        event_id,
                        source: e,
                    }),
                    other => other,
                };
            }
            Err(EffectError::Permanent(message)) => {
                return self
                    .fail(event, payload, &lease, message, false, None)
                    .await;
            }
        };
        self.count_effect(&effect);
        trace(event, effect.label());

        let mut handled = false;
        if let Some(handler) = self
            .inner
            .handler
            .as_ref()
            .filter(|h| h.wants(event.event_type()))
        {
            if self.inner.clock.now() >= lease.expires_at {
                return self.lease_lost(event, &lease).await;
            }
            let ctx = HandlerContext {
                event_id: event_id.clone(),
                attempt: lease.attempt,
                lease_expires_at: lease.expires_at,
                effect: effect.clone(),
                subscription: record,
                lease: lease.clone(),
                clock: self.inner.clock.clone(),
            };
            let result = CatchUnwind(Box::pin(handler.handle(event, &ctx))).await;
            let failure = match result {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some((e.message, e.retryable)),
                Err(panic) => Some((
                    format!("handler panicked: {}", panic_message(&*panic)),
                    true,
                )),
            };
            if let Some((message, retryable)) = failure {
                return self
                    .fail(event, payload, &lease, message, retryable, None)
                    .await;
            }
            handled = true;
        }

        match self.inner.ledger.complete(&lease).await {
            Ok(()) => {
                if handled {
                    bump(&self.inner.counters.handler_effects);
                }
                Ok(Outcome::Processed {
                    event_id,
                    event_type: event.event_type().as_str().to_owned(),
                    effect,
                    attempt: lease.attempt,
                    handled,
                })
            }
            Err(e) if e.kind() == StoreErrorKind::LeaseLost => Err(Error::LeaseLost { event_id }),
            Err(source) => Err(Error::Store { event_id, source }),
        }
    }

    async fn lease_lost(&self, event: &Event, lease: &Lease) -> Result<Outcome, Error> {
        // No handler ran. If nobody took the event over yet, record the
        // attempt as failed: it counts, so an event whose effect always
        // outlasts the lease ends dead-lettered instead of looping.
        let failure = Failure {
            error: "lease expired before the handler ran".to_owned(),
            retryable: true,
            max_attempts: self.inner.max_attempts,
            payload: Some(event.to_json()),
        };
        if let Ok(FailOutcome::Dead { attempts }) = self.inner.ledger.fail(lease, &failure).await {
            bump(&self.inner.counters.dead);
            return Ok(Outcome::DeadLettered {
                event_id: event.id().to_owned(),
                attempts,
                error: failure.error,
            });
        }
        Err(Error::LeaseLost {
            event_id: event.id().to_owned(),
        })
    }

    fn count_effect(&self, effect: &Effect) {
        let c = &self.inner.counters;
        match effect {
            Effect::Applied { .. } => bump(&c.applied),
            Effect::Refetched { .. } => {
                bump(&c.applied);
                bump(&c.refetches);
            }
            Effect::Stale { .. } => bump(&c.stale),
            Effect::NoChange { .. } => bump(&c.no_change),
            Effect::Entitlements { changed, .. } => {
                if *changed {
                    bump(&c.applied);
                } else {
                    bump(&c.stale);
                }
            }
            Effect::None => {}
        }
    }

    async fn fail(
        &self,
        event: &Event,
        payload: Option<&str>,
        lease: &Lease,
        message: String,
        retryable: bool,
        store_error: Option<StoreError>,
    ) -> Result<Outcome, Error> {
        let event_id = event.id().to_owned();
        let failure = Failure {
            error: message.clone(),
            retryable,
            max_attempts: self.inner.max_attempts,
            payload: Some(payload.map_or_else(|| event.to_json(), str::to_owned)),
        };
        match self.inner.ledger.fail(lease, &failure).await {
            Ok(FailOutcome::Dead { attempts }) => {
                bump(&self.inner.counters.dead);
                trace(event, "dead_lettered");
                Ok(Outcome::DeadLettered {
                    event_id,
                    attempts,
                    error: message,
                })
            }
            Ok(FailOutcome::Failed { attempts }) => {
                bump(&self.inner.counters.failed);
                trace(event, "failed");
                match store_error {
                    Some(source) => Err(Error::Store { event_id, source }),
                    None => Err(Error::Failed {
                        event_id,
                        attempt: attempts,
                        message,
                    }),
                }
            }
            Err(e) if e.kind() == StoreErrorKind::LeaseLost => Err(Error::LeaseLost { event_id }),
            // The failure could not be recorded: the lease will expire and the
            // event will be claimed again.
            Err(source) => Err(Error::Store { event_id, source }),
        }
    }

    /// Step 5. Returns the effect and the record after it.
    async fn subscription_effect(
        &self,
        event: &Event,
        now: OffsetDateTime,
    ) -> Result<(Effect, Option<SubscriptionRecord>), EffectError> {
        let store = &self.inner.subscriptions;
        if *event.event_type() == EventType::EntitlementSummaryUpdated && !event.is_thin() {
            return self.entitlements_effect(event).await.map(|e| (e, None));
        }
        let sub_id = subscription::subscription_id_of(event)
            .map_err(|e| EffectError::Permanent(format!("event object: {e}")))?;
        for _ in 0..MAX_SAVE_RACES {
            let current = match &sub_id {
                Some(id) => store.load(id).await.map_err(EffectError::Store)?,
                None => None,
            };
            let decision = subscription::apply(current.as_ref(), event, now)
                .map_err(|e| EffectError::Permanent(format!("event object: {e}")))?;
            let (applied, effect_of) = match decision {
                Decision::NotApplicable { .. } => return Ok((Effect::None, None)),
                Decision::NoChange => {
                    // A retry of an event whose earlier attempt applied it:
                    // tell the handler what that attempt changed.
                    let earlier = current
                        .as_ref()
                        .and_then(|c| c.last_change.as_ref())
                        .filter(|c| c.event_id == event.id());
                    let effect = match (earlier, &sub_id) {
                        (Some(change), Some(id)) => Effect::Applied {
                            subscription_id: id.clone(),
                            status_change: Some((change.from.clone(), change.to.clone())),
                            reason: subscription::ApplyReason::AlreadyApplied,
                        },
                        _ => Effect::NoChange {
                            subscription_id: sub_id.clone(),
                        },
                    };
                    return Ok((effect, current));
                }
                Decision::Stale { .. } => {
                    return Ok((
                        Effect::Stale {
                            subscription_id: sub_id.clone().unwrap_or_default(),
                        },
                        current,
                    ));
                }
                Decision::Apply(applied) => (*applied, None),
                Decision::Refetch {
                    subscription_id,
                    customer,
                    reason,
                    fallback,
                } => {
                    let base = fallback
                        .as_ref()
                        .map(|f| f.record.clone())
                        .or(current.clone());
                    match self
                        .refetch(
                            event,
                            subscription_id.as_deref(),
                            customer.as_deref(),
                            base,
                            reason,
                            now,
                        )
                        .await
                    {
                        Ok(Some(mut refetched)) => {
                            if reason == RefetchReason::ImpossibleTransition {
                                // Stripe's answer settled it; the anomaly
                                // stays on record, the review flag does not.
                                refetched.record.needs_review =
                                    current.as_ref().is_some_and(|c| c.needs_review);
                            }
                            (refetched, Some(reason))
                        }
                        Ok(None) => match fallback {
                            Some(f) => (*f, None),
                            None => {
                                return Err(EffectError::Permanent(format!(
                                    "{} needs a Stripe client to refetch ({reason:?})",
                                    event.event_type()
                                )));
                            }
                        },
                        Err(EffectError::Client(e)) => match fallback {
                            Some(mut f) => {
                                f.record.needs_reconcile = true;
                                f.record.anomalies.push(subscription::Anomaly {
                                    at: now.unix_timestamp(),
                                    event_id: Some(event.id().to_owned()),
                                    kind: AnomalyKind::RefetchFailed,
                                    detail: format!("{}", e.kind()),
                                });
                                trim_anomalies(&mut f.record);
                                (*f, None)
                            }
                            None => return Err(EffectError::Client(e)),
                        },
                        Err(other) => return Err(other),
                    }
                }
            };
            let mut applied = applied;
            if let Some((from, to)) = &applied.status_change {
                applied.record.last_change = Some(subscription::StatusChange {
                    event_id: event.id().to_owned(),
                    from: from.clone(),
                    to: to.clone(),
                });
            }
            match self.save(&applied).await {
                Ok(saved) => {
                    let id = saved.id.clone();
                    let effect = match effect_of {
                        Some(reason) => Effect::Refetched {
                            subscription_id: id,
                            reason,
                            status_change: applied.status_change.clone(),
                        },
                        None => Effect::Applied {
                            subscription_id: id,
                            status_change: applied.status_change.clone(),
                            reason: applied.reason,
                        },
                    };
                    return Ok((effect, Some(saved)));
                }
                Err(e) if e.kind() == StoreErrorKind::Conflict => {}
                Err(e) => return Err(EffectError::Store(e)),
            }
        }
        Err(EffectError::Store(StoreError::new(
            StoreErrorKind::Conflict,
            "subscription kept changing under concurrent writers",
        )))
    }

    async fn save(&self, applied: &Applied) -> Result<SubscriptionRecord, StoreError> {
        let version = self.inner.subscriptions.save(&applied.record).await?;
        let mut saved = applied.record.clone();
        saved.version = version;
        Ok(saved)
    }

    /// Fetches Stripe's object; `Ok(None)` when no client is configured.
    async fn refetch(
        &self,
        trigger: &Event,
        subscription_id: Option<&str>,
        customer: Option<&str>,
        base: Option<SubscriptionRecord>,
        reason: RefetchReason,
        now: OffsetDateTime,
    ) -> Result<Option<Applied>, EffectError> {
        let Some(client) = &self.inner.client else {
            return Ok(None);
        };
        let view = match (subscription_id, customer) {
            (Some(id), _) => client.retrieve_subscription(id).await,
            (None, Some(customer)) => {
                // 2012-era events: one subscription per customer then; take
                // the newest.
                client
                    .list_customer_subscriptions(customer)
                    .await
                    .map(|mut subs| {
                        subs.sort_by_key(|s| s.created);
                        subs.pop()
                    })
                    .and_then(|s| {
                        s.ok_or_else(|| {
                            ClientError::new(
                                crate::client::ClientErrorKind::NotFound,
                                "customer has no subscription",
                            )
                        })
                    })
            }
            (None, None) => {
                return Err(EffectError::Permanent(format!(
                    "cannot refetch for {reason:?}: no subscription or customer id"
                )));
            }
        };
        let view = view.map_err(EffectError::Client)?;
        // Stamp the object with the time it was read, not when we began
        // (the request may have waited for the budget or for retries).
        let now = self.inner.clock.now().max(now);
        // The base may be a fallback built from the event; reload the stored
        // version so the CAS save compares against what is stored.
        let base = match (&base, &view.id) {
            (Some(b), _) => Some(b.clone()),
            (None, Some(id)) => self
                .inner
                .subscriptions
                .load(id)
                .await
                .map_err(EffectError::Store)?,
            (None, None) => None,
        };
        Ok(Some(subscription::from_stripe(
            base.as_ref(),
            &view,
            now,
            Some(trigger),
        )))
    }

    async fn entitlements_effect(&self, event: &Event) -> Result<Effect, EffectError> {
        let store = &self.inner.subscriptions;
        let customer = event
            .entitlement_summary()
            .map_err(|e| EffectError::Permanent(format!("event object: {e}")))?
            .customer;
        for _ in 0..MAX_SAVE_RACES {
            let current = store
                .load_entitlements(&customer)
                .await
                .map_err(EffectError::Store)?;
            let Some(next) = subscription::decide_entitlements(current.as_ref(), event)
                .map_err(|e| EffectError::Permanent(format!("event object: {e}")))?
            else {
                return Ok(Effect::Entitlements {
                    customer,
                    changed: false,
                });
            };
            match store.save_entitlements(&next).await {
                Ok(_) => {
                    return Ok(Effect::Entitlements {
                        customer,
                        changed: true,
                    });
                }
                Err(e) if e.kind() == StoreErrorKind::Conflict => {}
                Err(e) => return Err(EffectError::Store(e)),
            }
        }
        Err(EffectError::Store(StoreError::new(
            StoreErrorKind::Conflict,
            "entitlements kept changing under concurrent writers",
        )))
    }
}

fn trim_anomalies(record: &mut SubscriptionRecord) {
    let max = subscription::MAX_ANOMALIES;
    if record.anomalies.len() > max {
        let excess = record.anomalies.len() - max;
        record.anomalies.drain(..excess);
    }
}

/// Runs a future, turning a panic into an `Err` (no `unsafe`: the future is
/// boxed, hence `Unpin`).
struct CatchUnwind<F>(Pin<Box<F>>);

impl<F: Future> Future for CatchUnwind<F> {
    type Output = Result<F::Output, Box<dyn Any + Send>>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let fut = &mut self.0;
        match std::panic::catch_unwind(AssertUnwindSafe(|| fut.as_mut().poll(cx))) {
            Ok(Poll::Ready(v)) => Poll::Ready(Ok(v)),
            Ok(Poll::Pending) => Poll::Pending,
            Err(panic) => Poll::Ready(Err(panic)),
        }
    }
}

fn panic_message(panic: &(dyn Any + Send)) -> String {
    let text = panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-string panic payload".to_owned());
    text.chars().take(200).collect()
}

#[cfg(feature = "tracing")]
fn trace(event: &Event, what: &str) {
    tracing::debug!(
        event_id = event.id(),
        event_type = event.event_type().as_str(),
        outcome = what,
        "stripe webhook"
    );
}

#[cfg(not(feature = "tracing"))]
fn trace(_event: &Event, _what: &str) {}
