//! The webhook pipeline: raw request in, exactly-once effect out.
//!
//! [`WebhookProcessor::handle`] runs, in this order:
//!
//! 1. **verify** the signature ([`crate::signature`]) — nothing is parsed
//!    before it passes;
//! 2. **parse** the envelope ([`crate::event`]) and check `data.object`
//!    ([`Event::validate_object`]): a malformed object is refused here,
//!    before the ledger records anything;
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

/// A failpoint at a step of the pipeline, for the crash-matrix tests (the
/// internal `failpoints` feature; nothing without it). Named
/// `stripe_webhook_guard::<step>`; configured with `fail::cfg`, the
/// `return` action makes the step fail with `$error`, `panic` panics there.
#[cfg(feature = "failpoints")]
macro_rules! failpoint {
    ($step:literal, $error:expr) => {
        fail::fail_point!(concat!("stripe_webhook_guard::", $step), |_| Err($error))
    };
}
#[cfg(not(feature = "failpoints"))]
macro_rules! failpoint {
    ($step:literal, $error:expr) => {};
}

/// The store error a failpoint's `return` action answers with.
#[cfg(feature = "failpoints")]
fn injected(event_id: &str, step: &str) -> Error {
    Error::Store {
        event_id: event_id.to_owned(),
        source: StoreError::new(StoreErrorKind::Unavailable, format!("failpoint {step}")),
    }
}

mod effect;
pub(crate) mod held;
mod types;

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use time::Duration;

use crate::client::StripeClient;
use crate::clock::{Clock, SystemClock};
use crate::event::Event;
use crate::inbox::{Inbox, InboxConfig};
use crate::ledger::{
    ClaimOutcome, ClaimRequest, FailOutcome, Failure, IgnoreOutcome, IgnoreRequest, Lease,
};
use crate::rt::catch_unwind::{CatchUnwind, panic_message};
use crate::signature::{Verified, Verifier};
use crate::store::{InboxHandle, Storage, StoreError, StoreErrorKind, StoreHandle};
use crate::subscription::{Effect, StepError};
use effect::EffectError;

pub use types::{
    AccountFilter, Error, EventHandler, HandlerContext, HandlerError, IgnoreReason, Outcome, Stats,
};
use types::{Counters, bump};

/// Default lease on a claimed event: 60 s.
pub const DEFAULT_LEASE: Duration = Duration::seconds(60);

/// Default attempts before an event is dead-lettered: 8.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 8;

/// How many times a save is retried after losing an optimistic-concurrency
/// race.
const MAX_SAVE_RACES: usize = 8;

/// The store of a [`ProcessorBuilder`] before one is chosen: a processor
/// cannot be built without saying where its ledger and records live (use
/// `MemoryStore` explicitly for the in-memory store).
#[derive(Debug, Clone, Copy, Default)]
pub struct NoStore;

/// Builds a [`WebhookProcessor`] (and, over a store that can queue, an
/// [`Inbox`]). Start with [`WebhookProcessor::builder`], choose the store
/// with [`ProcessorBuilder::store`]: only then do `build` and `build_inbox`
/// exist, so a half-configured pipeline does not compile.
pub struct ProcessorBuilder<S = NoStore> {
    settings: Settings,
    store: S,
}

/// Everything a processor is configured with except its store: what the
/// builder collects and the processor keeps.
struct Settings {
    verifier: Verifier,
    handler: Option<Arc<dyn EventHandler>>,
    client: Option<Arc<dyn StripeClient>>,
    clock: Arc<dyn Clock>,
    livemode: Option<bool>,
    accounts: AccountFilter,
    lease: Duration,
    max_attempts: u32,
}

impl fmt::Debug for Settings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Settings")
            .field("verifier", &self.verifier)
            .field("client", &self.client.is_some())
            .field("handler", &self.handler.is_some())
            .field("livemode", &self.livemode)
            .field("accounts", &self.accounts)
            .field("lease", &self.lease)
            .field("max_attempts", &self.max_attempts)
            .finish_non_exhaustive()
    }
}

impl<S> fmt::Debug for ProcessorBuilder<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("ProcessorBuilder")
            .field(&self.settings)
            .finish()
    }
}

impl ProcessorBuilder<NoStore> {
    /// The store of the ledger, the subscription records and the
    /// reconciler's cursors: `MemoryStore` (in memory, lost on restart), a
    /// database store, or your own implementation of the store traits. It
    /// is handed over once; the inbox and the reconciler use the same one.
    #[must_use]
    pub fn store<H: StoreHandle>(self, store: H) -> ProcessorBuilder<H> {
        ProcessorBuilder {
            settings: self.settings,
            store,
        }
    }
}

impl<S> ProcessorBuilder<S> {
    /// The application's handler.
    #[must_use]
    pub fn handler(mut self, handler: Arc<dyn EventHandler>) -> Self {
        self.settings.handler = Some(handler);
        self
    }

    /// A Stripe client: enables refetches for ties, impossible transitions,
    /// unknown subscriptions and thin events. Wrap it in a request budget to
    /// pace it and retry rate limits.
    #[must_use]
    pub fn client(mut self, client: Arc<dyn StripeClient>) -> Self {
        self.settings.client = Some(client);
        self
    }

    /// The clock (default: the system clock).
    #[must_use]
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.settings.clock = clock;
        self
    }

    /// Accept only live (`true`) or only test (`false`) events; the other
    /// mode is ignored. Default: both.
    #[must_use]
    pub fn livemode(mut self, livemode: bool) -> Self {
        self.settings.livemode = Some(livemode);
        self
    }

    /// Which Connect accounts' events to process (default: the platform's only).
    #[must_use]
    pub fn accounts(mut self, filter: AccountFilter) -> Self {
        self.settings.accounts = filter;
        self
    }

    /// The lease on a claimed event (default 60 s). Longer than your slowest
    /// handler.
    #[must_use]
    pub fn lease(mut self, lease: Duration) -> Self {
        self.settings.lease = lease;
        self
    }

    /// Attempts before dead-lettering (default 8; at least 1).
    #[must_use]
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        self.settings.max_attempts = attempts.max(1);
        self
    }
}

impl<H: StoreHandle> ProcessorBuilder<H> {
    /// Builds the processor.
    pub fn build(self) -> WebhookProcessor {
        WebhookProcessor {
            inner: Arc::new(Inner {
                settings: self.settings,
                store: self.store.storage(),
                counters: Counters::default(),
                held: held::Held::default(),
            }),
        }
    }
}

impl<H: InboxHandle> ProcessorBuilder<H> {
    /// Builds an [`Inbox`] over the store: deliveries are stored and
    /// acknowledged at once, and workers process them with the processor
    /// built here (available as [`Inbox::processor`]).
    pub fn build_inbox(self, config: InboxConfig) -> Inbox {
        let queue = self.store.queue();
        Inbox::from_parts(self.build(), queue, config)
    }
}

struct Inner {
    settings: Settings,
    store: Arc<dyn Storage>,
    counters: Counters,
    held: held::Held,
}

/// The settings read as the processor's own fields (`self.inner.lease`).
impl std::ops::Deref for Inner {
    type Target = Settings;

    fn deref(&self) -> &Settings {
        &self.settings
    }
}

/// The webhook pipeline. Cheap to clone (an `Arc` inside); share one per
/// endpoint. See the [module docs](self) for the order of steps.
#[derive(Clone)]
pub struct WebhookProcessor {
    inner: Arc<Inner>,
}

impl fmt::Debug for WebhookProcessor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("WebhookProcessor")
            .field(&self.inner.settings)
            .finish()
    }
}

/// A verified, parsed delivery that passed the filters and is not settled:
/// what synchronous mode claims and inbox mode queues.
pub(crate) enum Screened<'a> {
    /// Claim or queue it.
    Admit {
        event: Box<Event>,
        verified: Verified<'a>,
        /// The claim request (with the event's fingerprint), built once
        /// for the settled lookup and reused for the claim or the queue.
        request: ClaimRequest,
    },
    /// Answered already: ignored, or settled before.
    Answered(Outcome),
}

impl WebhookProcessor {
    /// Starts a builder around `verifier`; choose the store next with
    /// [`ProcessorBuilder::store`].
    ///
    /// ```
    /// use std::sync::Arc;
    /// use stripe_webhook_guard::{MemoryStore, Verifier, WebhookProcessor};
    ///
    /// let processor = WebhookProcessor::builder(Verifier::new("whsec_doc"))
    ///     .store(Arc::new(MemoryStore::new()))
    ///     .build();
    /// # let _ = processor;
    /// ```
    pub fn builder(verifier: Verifier) -> ProcessorBuilder {
        ProcessorBuilder {
            settings: Settings {
                verifier,
                handler: None,
                client: None,
                clock: Arc::new(SystemClock),
                livemode: None,
                accounts: AccountFilter::default(),
                lease: DEFAULT_LEASE,
                max_attempts: DEFAULT_MAX_ATTEMPTS,
            },
            store: NoStore,
        }
    }

    /// The store (ledger, subscription records, cursors): to answer access
    /// questions and list dead letters.
    pub fn store(&self) -> &Arc<dyn Storage> {
        &self.inner.store
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
        let result = self.handle_inner(body, signature).await;
        crate::metrics::delivered(&result);
        result
    }

    async fn handle_inner(&self, body: &[u8], signature: Option<&str>) -> Result<Outcome, Error> {
        match self.screen(body, signature).await? {
            Screened::Answered(outcome) => Ok(outcome),
            Screened::Admit {
                event,
                verified,
                request,
            } => {
                self.claim_and_run(&event, &request, Some(verified.payload_str()))
                    .await
            }
        }
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
        let result = self.process_event_inner(event).await;
        crate::metrics::delivered(&result);
        result
    }

    async fn process_event_inner(&self, event: &Event) -> Result<Outcome, Error> {
        bump(&self.inner.counters.received);
        event.validate_object().map_err(Error::Parse)?;
        if let Some(outcome) = self.settle_filtered(event).await? {
            return Ok(outcome);
        }
        let request = self.claim_request(event);
        self.claim_and_run(event, &request, None).await
    }

    /// The claims this processor holds now: taken by [`handle`],
    /// [`process_event`] or an [`Inbox`] worker of this processor and not
    /// settled yet, either because the work is still running or because the
    /// future running it was dropped (its task aborted) before it completed
    /// or failed the event. Claims whose lease has run out (at the lease's
    /// own deadline on the clock's monotonic face) are not listed.
    ///
    /// [`handle`]: WebhookProcessor::handle
    /// [`process_event`]: WebhookProcessor::process_event
    pub fn held_leases(&self) -> Vec<Lease> {
        self.inner.held.live(self.inner.clock.monotonic())
    }

    /// The registry of held claims, shared with the inbox's workers.
    pub(crate) fn held(&self) -> &held::Held {
        &self.inner.held
    }

    /// Gives back every claim listed by [`held_leases`] with
    /// [`EventLedger::release`](crate::store::EventLedger::release): the
    /// entry becomes `failed` without spending an attempt, so Stripe's next
    /// delivery processes the event at once instead of answering 503 "in
    /// flight" until the lease runs out. Call it at shutdown, after the work
    /// was given its deadline and stopped (tasks aborted): a claim released
    /// while its work still runs is fenced, so that work's completion is
    /// refused and the event processed again (the handler is told the attempt
    /// number for its own idempotency). Returns how many were released; a
    /// claim settled or taken over meanwhile is skipped.
    ///
    /// ```
    /// use std::sync::Arc;
    /// use stripe_webhook_guard::{MemoryStore, Verifier, WebhookProcessor};
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let processor = WebhookProcessor::builder(Verifier::new("whsec_doc"))
    ///     .store(Arc::new(MemoryStore::new()))
    ///     .build();
    /// // ... serve, then on SIGTERM stop accepting, wait, abort what is left:
    /// let released = processor.release_held().await.expect("store reachable");
    /// assert_eq!(released, 0);
    /// # }
    /// ```
    ///
    /// # Errors
    ///
    /// The first [`StoreError`] other than a lost lease, after trying every
    /// claim (the ones that failed stay claimed until their lease runs out).
    ///
    /// [`held_leases`]: WebhookProcessor::held_leases
    pub async fn release_held(&self) -> Result<usize, StoreError> {
        let mut released = 0;
        let mut first_error = None;
        for lease in self.inner.held.take_all(self.inner.clock.monotonic()) {
            match self.inner.store.release(&lease).await {
                Ok(()) => released += 1,
                Err(e) if e.kind() == StoreErrorKind::LeaseLost => {}
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        first_error.map_or(Ok(released), Err)
    }

    /// The lease taken on claimed events.
    pub fn lease_duration(&self) -> Duration {
        self.inner.lease
    }

    /// Attempts before an event is dead-lettered.
    pub fn max_attempts(&self) -> u32 {
        self.inner.max_attempts
    }

    /// The filters: why `event` would be ignored, if it would (livemode
    /// mismatch, an account the filter does not allow, or a type with no
    /// subscription effect that the handler does not want).
    pub fn filter_reason(&self, event: &Event) -> Option<IgnoreReason> {
        if self.inner.livemode.is_some_and(|l| l != event.livemode()) {
            return Some(IgnoreReason::LivemodeMismatch);
        }
        if !self.inner.accounts.allows(event.account()) {
            return Some(IgnoreReason::ForeignAccount);
        }
        let t = event.event_type();
        let wanted = t.has_subscription_effect()
            || crate::reconcile::RecoveryRequest::is_trigger(t)
            || self.inner.handler.as_ref().is_some_and(|h| h.wants(t));
        (!wanted).then_some(IgnoreReason::UnhandledType)
    }

    /// Steps 1–3, shared by synchronous and inbox mode: verify, parse,
    /// filter (recording filtered events as ignored).
    pub(crate) async fn screen<'a>(
        &self,
        body: &'a [u8],
        signature: Option<&str>,
    ) -> Result<Screened<'a>, Error> {
        bump(&self.inner.counters.received);
        let now = self.inner.clock.now();
        let verified = self
            .inner
            .verifier
            .verify(body, signature, now)
            .inspect_err(|_| bump(&self.inner.counters.rejected))?;
        let reject = |e| {
            bump(&self.inner.counters.rejected);
            Error::Parse(e)
        };
        let event = Event::parse(verified).map_err(reject)?;
        failpoint!("after_verify", injected(event.id(), "after_verify"));
        // A settled event is answered from a lookup, when the store can
        // answer without a round trip: nothing is recorded for it, so its
        // object need not be checked or typed.
        // The request (and its SHA-256 fingerprint) is built once, here,
        // and reused for the claim.
        let mut request = None;
        if self.filter_reason(&event).is_none() {
            let claim = self.claim_request(&event);
            let settled = self.inner.store.settled_state(&claim).await;
            if let Some(state) = settled.map_err(|source| Error::Store {
                event_id: event.id().to_owned(),
                source,
            })? {
                bump(&self.inner.counters.duplicates);
                trace(&event, "duplicate");
                return Ok(Screened::Answered(Outcome::Duplicate {
                    event_id: event.id().to_owned(),
                    state,
                }));
            }
            request = Some(claim);
        }
        // The object is checked here, before anything is recorded: parsing
        // only delimits it.
        event.validate_object().map_err(reject)?;
        Ok(match self.settle_filtered(&event).await? {
            Some(outcome) => Screened::Answered(outcome),
            None => Screened::Admit {
                request: request.unwrap_or_else(|| self.claim_request(&event)),
                event: Box::new(event),
                verified,
            },
        })
    }

    /// Step 3: an event the filters refuse is recorded as ignored and
    /// answered; one accepted before the filters changed and not finished is
    /// let through, never acknowledged unprocessed.
    async fn settle_filtered(&self, event: &Event) -> Result<Option<Outcome>, Error> {
        let Some(reason) = self.filter_reason(event) else {
            return Ok(None);
        };
        let recorded = self
            .inner
            .store
            .ignore(&IgnoreRequest::for_event(event, reason.as_str()))
            .await
            .map_err(|source| Error::Store {
                event_id: event.id().to_owned(),
                source,
            })?;
        let event_id = event.id().to_owned();
        match recorded {
            IgnoreOutcome::Recorded => {
                bump(&self.inner.counters.ignored);
                trace(event, "ignored");
                Ok(Some(Outcome::Ignored { event_id, reason }))
            }
            // Ignored (or otherwise settled) before: a duplicate, counted
            // once as ignored when it was new.
            IgnoreOutcome::Known(state) if state.is_settled() => {
                bump(&self.inner.counters.duplicates);
                trace(event, "duplicate");
                Ok(Some(Outcome::Duplicate { event_id, state }))
            }
            _ => Ok(None),
        }
    }

    /// The claim request for `event` with this processor's lease and
    /// attempt limit.
    fn claim_request(&self, event: &Event) -> ClaimRequest {
        ClaimRequest::for_event(event, self.inner.lease, self.inner.max_attempts)
    }

    /// Step 4, then steps 5–7. `request` is `event`'s claim request.
    async fn claim_and_run(
        &self,
        event: &Event,
        request: &ClaimRequest,
        payload: Option<&str>,
    ) -> Result<Outcome, Error> {
        // Read before the store's clock is: the local deadline derived from
        // it never outlasts the lease the store grants.
        let asked = self.inner.clock.monotonic();
        let claimed = self.inner.store.claim(request).await;
        // The claim reached the store; its answer is lost.
        failpoint!("during_claim", injected(event.id(), "during_claim"));
        let event_id = || event.id().to_owned();
        let lease = match claimed.map_err(|source| Error::Store {
            event_id: event_id(),
            source,
        })? {
            ClaimOutcome::Claimed(lease) => lease,
            ClaimOutcome::Duplicate { state } => {
                bump(&self.inner.counters.duplicates);
                trace(event, "duplicate");
                return Ok(Outcome::Duplicate {
                    event_id: event_id(),
                    state,
                });
            }
            ClaimOutcome::InFlight { until } => {
                bump(&self.inner.counters.in_flight);
                return Err(Error::InFlight {
                    event_id: event_id(),
                    until,
                });
            }
            ClaimOutcome::Conflict { .. } => {
                return Err(Error::PayloadConflict {
                    event_id: event_id(),
                });
            }
            ClaimOutcome::DeadLettered { attempts } => {
                bump(&self.inner.counters.dead);
                return Ok(Outcome::DeadLettered {
                    event_id: event_id(),
                    attempts,
                    error: "lease expired on the last attempt".to_owned(),
                });
            }
        };
        let deadline = lease.deadline(asked);
        // Registered until settled: if this future is dropped in between
        // (its task aborted at shutdown), `release_held` gives the claim back.
        let held = &self.inner.held;
        held.hold(&lease, deadline, self.inner.clock.monotonic());
        failpoint!("after_claim", injected(event.id(), "after_claim"));
        let result = self.run_claimed(event, payload, &lease, deadline).await;
        held.settle(&lease);
        result
    }

    /// Steps 5–7 for an event this worker holds until `deadline` (on the
    /// clock's monotonic face: the lease's remaining time counted from
    /// before the claim). Used by the synchronous path and by inbox workers.
    pub(crate) async fn run_claimed(
        &self,
        event: &Event,
        payload: Option<&str>,
        lease: &Lease,
        deadline: Instant,
    ) -> Result<Outcome, Error> {
        let event_id = event.id().to_owned();
        let started = std::time::Instant::now();
        let now = self.inner.clock.now();
        let last_attempt = lease.attempt >= self.inner.max_attempts;
        let (effect, record) = match self.subscription_effect(event, now, last_attempt).await {
            Ok(v) => v,
            Err(EffectError::Store(e)) => {
                let message = format!("subscription store: {e}");
                let retryable = e.is_retryable();
                return self
                    .fail(event, payload, lease, message, retryable, Some(e))
                    .await;
            }
            Err(EffectError::Step(StepError::Refetch(source))) => {
                // A refetch the event needs failed: Stripe must deliver it
                // again (503), and the attempt limit does not apply, so a
                // refetch failure never dead-letters the event.
                refetch_failed(event, lease, &source);
                let message = format!("Stripe refetch: {source}");
                let failure = self.failure(event, payload, message, true, u32::MAX);
                return match self.inner.store.fail(lease, &failure).await {
                    Ok(_) => {
                        bump(&self.inner.counters.failed);
                        Err(Error::Client { event_id, source })
                    }
                    Err(e) if e.kind() == StoreErrorKind::LeaseLost => {
                        Err(Error::LeaseLost { event_id })
                    }
                    Err(source) => Err(Error::Store { event_id, source }),
                };
            }
            Err(EffectError::Step(e)) => {
                let retryable = e.is_retryable();
                return self
                    .fail(event, payload, lease, e.to_string(), retryable, None)
                    .await;
            }
        };
        self.count_effect(&effect);
        trace(event, effect.as_str());

        let mut handled = false;
        if let Some(handler) = self
            .inner
            .handler
            .as_ref()
            .filter(|h| h.wants(event.event_type()))
        {
            if self.inner.clock.monotonic() >= deadline {
                return self.lease_lost(event, lease).await;
            }
            let ctx = HandlerContext {
                event_id: event_id.clone(),
                attempt: lease.attempt,
                deadline,
                effect: effect.clone(),
                subscription: record,
                lease: lease.clone(),
                clock: self.inner.clock.clone(),
            };
            let result = CatchUnwind::new(async {
                failpoint!(
                    "in_handler",
                    HandlerError::retryable("failpoint in_handler")
                );
                handler.handle(event, &ctx).await
            })
            .await;
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
                    .fail(event, payload, lease, message, retryable, None)
                    .await;
            }
            handled = true;
        }

        crate::metrics::handler_latency(started.elapsed());
        failpoint!(
            "before_completion",
            injected(&event_id, "before_completion")
        );
        match self.inner.store.complete(lease).await {
            Ok(()) => {
                // The completion is committed; its answer is lost.
                failpoint!("after_commit", injected(&event_id, "after_commit"));
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
        if let Ok(FailOutcome::Dead { attempts }) = self.inner.store.fail(lease, &failure).await {
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
        let failure = self.failure(
            event,
            payload,
            message.clone(),
            retryable,
            self.inner.max_attempts,
        );
        match self.inner.store.fail(lease, &failure).await {
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

    /// A failed attempt to record, keeping the payload for replay.
    fn failure(
        &self,
        event: &Event,
        payload: Option<&str>,
        error: String,
        retryable: bool,
        max_attempts: u32,
    ) -> Failure {
        let _ = self;
        Failure {
            error,
            retryable,
            max_attempts,
            payload: Some(payload.map_or_else(|| event.to_json(), str::to_owned)),
        }
    }
}

/// A refetch the event needs failed: said loudly, at error level with the
/// `tracing` feature (a revoked or wrong key stops every such event until it
/// is fixed). The caller also gets [`Error::Client`] (503) to log.
#[cfg(feature = "tracing")]
fn refetch_failed(event: &Event, lease: &Lease, error: &crate::client::ClientError) {
    tracing::error!(
        event_id = event.id(),
        event_type = event.event_type().as_str(),
        attempt = lease.attempt,
        error = %error,
        "stripe webhook: a refetch the event needs failed; answering 503 so Stripe retries"
    );
}

#[cfg(not(feature = "tracing"))]
fn refetch_failed(_event: &Event, _lease: &Lease, _error: &crate::client::ClientError) {}

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
