//! The whole subscription effect of one event as a sans-IO state machine:
//! [`step`] decides from (stored record, event, now); when it asks Stripe
//! ([`Step::Fetch`]), the caller performs the request and [`resume`]s with
//! the answer ([`FetchOutcome`]). Every decision about a record is made here:
//! what a failed refetch falls back to, which anomaly is recorded, which
//! flags are set or reset, and what the handler is told. The caller only
//! loads, fetches and saves.
//!
//! ```
//! use stripe_webhook_guard::event::Event;
//! use stripe_webhook_guard::subscription::{self, Effect, FetchOutcome, Step};
//! use time::OffsetDateTime;
//!
//! let event = Event::parse_unverified(br#"{"id":"evt_1","object":"event",
//!   "type":"customer.subscription.created","created":1700000000,"livemode":false,
//!   "data":{"object":{"id":"sub_1","object":"subscription","customer":"cus_1",
//!   "status":"active","current_period_start":1700000000,"current_period_end":1702592000}}}"#)
//!     .unwrap();
//! let now = OffsetDateTime::from_unix_timestamp(1_700_000_005).unwrap();
//!
//! // Nothing stored yet: the machine asks Stripe for the subscription.
//! let Step::Fetch(fetch) = subscription::step(None, &event, now) else { panic!() };
//! // No client configured: the event's own snapshot is saved.
//! match subscription::resume(fetch, &event, FetchOutcome::NoClient, None, now) {
//!     Step::Save { record, effect } => {
//!         assert_eq!(record.state.status.as_str(), "active");
//!         assert!(matches!(effect, Effect::Applied { .. }));
//!     }
//!     other => panic!("{other:?}"),
//! }
//! ```

use serde::Serialize;
use time::OffsetDateTime;

use super::machine::{Applied, ApplyReason, Decision, RefetchReason, decide};
use super::model::{AnomalyKind, StatusChange, SubscriptionRecord};
use crate::client::{ClientError, ClientErrorKind};
use crate::event::{Event, ParseError, SubscriptionStatus, SubscriptionView};

/// What the subscription effect did: told to the application's handler and
/// reported in the processor's outcome.
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
        reason: ApplyReason,
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
    /// A short `snake_case` name.
    pub fn as_str(&self) -> &'static str {
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

/// What an event is about, so the caller knows what to load before
/// [`step`] (or, for entitlements, before
/// [`decide_entitlements`](super::decide_entitlements)).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Subject {
    /// No subscription or entitlement effect.
    None,
    /// A subscription: load the record with this id (when the event names
    /// one; 2012-era and some thin events do not) and call [`step`].
    Subscription(Option<String>),
    /// A customer's entitlements: load them and call
    /// [`decide_entitlements`](super::decide_entitlements).
    Entitlements(String),
}

/// What an event is about.
///
/// # Errors
///
/// [`ParseError`] when the object cannot be read as the kind its type
/// promises.
pub fn subject(event: &Event) -> Result<Subject, ParseError> {
    let t = event.event_type();
    if !t.has_subscription_effect() {
        return Ok(Subject::None);
    }
    if *t == crate::event::EventType::EntitlementSummaryUpdated && !event.is_thin() {
        return Ok(Subject::Entitlements(event.entitlement_summary()?.customer));
    }
    Ok(Subject::Subscription(super::subscription_id_of(event)?))
}

/// Why the subscription effect of an event failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StepError {
    /// The event's object cannot be read as the kind its type promises: no
    /// retry will fix it.
    #[error("event object: {0}")]
    Object(#[from] ParseError),
    /// The event needs Stripe's object (a thin event, or a 2012-era event
    /// naming no subscription) and no Stripe client is configured.
    #[error("{0} needs a Stripe client to refetch")]
    NeedsClient(String),
    /// The event names neither a subscription nor a customer to ask Stripe
    /// about.
    #[error("{0} names no subscription or customer to refetch")]
    NothingToFetch(String),
    /// Stripe's object was needed and the request failed, for any reason
    /// (including 401/403: a key problem is fixable, a dead letter is not).
    /// Always retryable: the event is answered so that Stripe delivers it
    /// again, and it is never dead-lettered for this.
    #[error("Stripe refetch: {0}")]
    Refetch(ClientError),
}

impl StepError {
    /// Whether another attempt may succeed: a refetch that failed, whatever
    /// the reason (the key can be fixed, Stripe can come back).
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Refetch(_))
    }
}

/// The next thing the caller does for an event's subscription effect.
#[derive(Debug)]
#[non_exhaustive]
pub enum Step {
    /// Done; nothing to save.
    Done(Effect),
    /// Save `record` with optimistic concurrency (its `version` is the one
    /// loaded). On success the effect is `effect`; when another writer saved
    /// first, load again and call [`step`] again.
    Save {
        /// The record to save.
        record: SubscriptionRecord,
        /// The effect once saved.
        effect: Effect,
    },
    /// Ask Stripe, then call [`resume`] with the answer.
    Fetch(Fetch),
    /// The effect cannot be applied.
    Failed(StepError),
}

/// What to ask Stripe.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum FetchTarget {
    /// Retrieve this subscription.
    Subscription(String),
    /// List this customer's subscriptions; the newest (by `created`) is
    /// taken. Used for 2012-era events, which name only the customer.
    NewestOfCustomer(String),
}

/// A pending request to Stripe, from [`Step::Fetch`]; hand it back to
/// [`resume`].
#[derive(Debug)]
pub struct Fetch {
    target: FetchTarget,
    reason: RefetchReason,
    /// What Stripe's object is merged into: the fallback's record, or the
    /// stored record; `None` when neither exists.
    base: Option<SubscriptionRecord>,
    fallback: Option<Box<Applied>>,
    had_review_flag: bool,
    decided_at: OffsetDateTime,
}

impl Fetch {
    /// What to ask Stripe.
    pub fn target(&self) -> &FetchTarget {
        &self.target
    }

    /// Why.
    pub fn reason(&self) -> RefetchReason {
        self.reason
    }

    /// When the machine holds no record to merge Stripe's answer into, the
    /// id of the record to load (by the object [`resume`] will take) before
    /// resuming; `None` when nothing needs loading.
    pub fn record_to_load<'a>(&self, outcome: &'a FetchOutcome) -> Option<&'a str> {
        if self.base.is_some() {
            return None;
        }
        outcome.chosen().and_then(|v| v.id.as_deref())
    }
}

/// What Stripe answered to a [`Fetch`].
#[derive(Debug)]
#[non_exhaustive]
pub enum FetchOutcome {
    /// The objects returned: the one retrieved, or the customer's list.
    Fetched {
        /// The subscriptions.
        objects: Vec<SubscriptionView>,
        /// When the answer was read, by the host's clock (stamps
        /// `last_verified_with_stripe`, and the watermark when
        /// `stripe_time` is `None`).
        at: OffsetDateTime,
        /// The answer's `Date` (Stripe's clock), which stamps the
        /// watermark.
        stripe_time: Option<OffsetDateTime>,
    },
    /// The request failed.
    Failed {
        /// Why.
        error: ClientError,
        /// Whether this is the event's last attempt (its attempt number has
        /// reached the configured maximum): only then does the fallback
        /// decide; before it, the step fails so that the event is retried.
        last_attempt: bool,
    },
    /// No Stripe client is configured.
    NoClient,
}

impl FetchOutcome {
    /// The object [`resume`] takes: the newest by `created` (the only one,
    /// for a retrieve).
    pub fn chosen(&self) -> Option<&SubscriptionView> {
        match self {
            Self::Fetched { objects, .. } => objects.iter().max_by_key(|s| s.created),
            Self::Failed { .. } | Self::NoClient => None,
        }
    }
}

/// Decides the subscription effect of `event` given the stored record of
/// the subscription it is about ([`Subject::Subscription`]), if any. Pure.
pub fn step(current: Option<&SubscriptionRecord>, event: &Event, now: OffsetDateTime) -> Step {
    let decision = match decide(current, event, now) {
        Ok(d) => d,
        Err(e) => return Step::Failed(StepError::Object(e)),
    };
    match decision {
        Decision::NotApplicable { .. } => Step::Done(Effect::None),
        Decision::NoChange => {
            // A retry of an event whose earlier attempt applied it (and then
            // failed later): tell the handler what that attempt changed.
            let earlier = current
                .and_then(|c| c.last_change.as_ref())
                .filter(|c| c.event_id == event.id());
            Step::Done(match (earlier, current) {
                (Some(change), Some(c)) => Effect::Applied {
                    subscription_id: c.id.clone(),
                    status_change: Some((change.from.clone(), change.to.clone())),
                    reason: ApplyReason::AlreadyApplied,
                },
                _ => Effect::NoChange {
                    subscription_id: current.map(|c| c.id.clone()),
                },
            })
        }
        Decision::Stale { .. } => Step::Done(Effect::Stale {
            subscription_id: current.map(|c| c.id.clone()).unwrap_or_default(),
        }),
        Decision::Apply(applied) => finish(*applied, None, event),
        Decision::Refetch {
            subscription_id,
            customer,
            reason,
            fallback,
        } => {
            let target = match (subscription_id, customer) {
                (Some(id), _) => FetchTarget::Subscription(id),
                (None, Some(customer)) => FetchTarget::NewestOfCustomer(customer),
                (None, None) => {
                    return Step::Failed(StepError::NothingToFetch(
                        event.event_type().as_str().to_owned(),
                    ));
                }
            };
            Step::Fetch(Fetch {
                target,
                reason,
                base: fallback
                    .as_ref()
                    .map(|f| f.record.clone())
                    .or_else(|| current.cloned()),
                fallback,
                had_review_flag: current.is_some_and(|c| c.needs_review),
                decided_at: now,
            })
        }
    }
}

/// Continues after the request a [`Step::Fetch`] asked for. `stored` is the
/// record [`Fetch::record_to_load`] named (`None` when it named none or the
/// store has none).
///
/// - Stripe's object replaces the subscription fields (payment facts, links
///   and anomalies are kept); an impossible transition settled this way keeps
///   its anomaly but not the review flag it raised.
/// - Without a client, the decision's fallback is saved (the event's own
///   snapshot, a tie decided by rule and flagged `needs_reconcile`, …); an
///   event that has no fallback (a thin event) cannot be applied.
/// - When the request failed, for any reason (a 401/403 included), and this
///   is not the event's last attempt, the step fails with
///   [`StepError::Refetch`], which is always retryable: the event is
///   answered 503 so that Stripe delivers it again, and nothing is saved.
/// - On the last attempt, the fallback decides: it is saved with a
///   `refetch_failed` anomaly and the `needs_reconcile` flag (for the
///   reconciler to repair). An event without a fallback (a thin event) flags
///   the stored record the same way, unchanged otherwise; with no stored
///   record either, the step fails (retryably) again.
pub fn resume(
    fetch: Fetch,
    event: &Event,
    outcome: FetchOutcome,
    stored: Option<SubscriptionRecord>,
    now: OffsetDateTime,
) -> Step {
    let reason = fetch.reason;
    let failure = match outcome {
        FetchOutcome::Fetched {
            ref objects,
            at,
            stripe_time,
        } => {
            let chosen = outcome.chosen();
            if let Some(view) = chosen {
                let base = fetch.base.or(stored);
                let fetched_at = super::FetchTime {
                    local: at.max(fetch.decided_at),
                    stripe: stripe_time,
                };
                let mut applied = super::from_stripe(base.as_ref(), view, fetched_at, Some(event));
                if reason == RefetchReason::ImpossibleTransition {
                    applied.record.needs_review = fetch.had_review_flag;
                }
                return finish(applied, Some(reason), event);
            }
            let what = if objects.is_empty() {
                "Stripe returned no subscription"
            } else {
                "Stripe returned no usable subscription"
            };
            ClientError::new(ClientErrorKind::NotFound, what)
        }
        FetchOutcome::NoClient => {
            return match fetch.fallback {
                Some(f) => finish(*f, None, event),
                None => Step::Failed(StepError::NeedsClient(format!(
                    "{} ({reason:?})",
                    event.event_type()
                ))),
            };
        }
        FetchOutcome::Failed {
            error,
            last_attempt: false,
        } => return Step::Failed(StepError::Refetch(error)),
        FetchOutcome::Failed {
            error,
            last_attempt: true,
        } => error,
    };
    let mut applied = match (fetch.fallback, fetch.base) {
        (Some(f), _) => *f,
        (None, Some(record)) => Applied {
            record,
            reason: ApplyReason::AnomalyRecorded,
            status_change: None,
        },
        (None, None) => return Step::Failed(StepError::Refetch(failure)),
    };
    applied.record.needs_reconcile = true;
    applied.record.note(
        now.unix_timestamp(),
        Some(event.id()),
        AnomalyKind::RefetchFailed,
        failure.kind().to_string(),
    );
    finish(applied, None, event)
}

/// A decided record becomes a save: the status change is remembered with
/// the event that made it (so a retried event still tells its handler what
/// it changed), and the effect is named.
fn finish(mut applied: Applied, refetched: Option<RefetchReason>, event: &Event) -> Step {
    if let Some((from, to)) = &applied.status_change {
        applied.record.last_change = Some(StatusChange {
            event_id: event.id().to_owned(),
            from: from.clone(),
            to: to.clone(),
        });
    }
    let subscription_id = applied.record.id.clone();
    let effect = match refetched {
        Some(reason) => Effect::Refetched {
            subscription_id,
            reason,
            status_change: applied.status_change,
        },
        None => Effect::Applied {
            subscription_id,
            status_change: applied.status_change,
            reason: applied.reason,
        },
    };
    Step::Save {
        record: applied.record,
        effect,
    }
}
