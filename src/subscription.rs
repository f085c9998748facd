//! The subscription state machine: a pure function from (what we hold, an
//! event, now) to what to do.
//!
//! # Statuses and transitions
//!
//! Stripe's eight statuses ([`SubscriptionStatus`]) move only along these
//! edges ([`transition`]):
//!
//! | from | to |
//! |---|---|
//! | (new) | incomplete, trialing, active |
//! | incomplete | active, incomplete_expired |
//! | trialing | active, past_due, paused, canceled |
//! | active | past_due, canceled, trialing (a future `trial_end` was set), paused |
//! | past_due | active, canceled, unpaid, paused |
//! | unpaid | active, canceled |
//! | paused | active, past_due, canceled |
//! | canceled, incomplete_expired | nothing: terminal and absorbing |
//!
//! A newer event whose status is reachable only through statuses we never
//! saw (active → unpaid, missing the past_due in between) is applied and
//! reported as a [`TransitionKind::Gap`]: events get lost, and the newest
//! state is still Stripe's. A status that cannot follow at all (anything out
//! of a terminal status, anything into `incomplete`, `incomplete_expired`
//! from anything but `incomplete`) is **impossible**: the state is kept, an
//! [`Anomaly`] recorded, and the record refetched from Stripe when a client
//! is configured (or flagged `needs_review` when not).
//! `pause_collection` and `cancel_at_period_end` do not change `status`; they
//! are recorded as they are.
//!
//! # Ordering
//!
//! Every record keeps a watermark: the `created` time and id of the
//! subscription snapshot it reflects ([`Watermark`]). For a
//! `customer.subscription.*` event:
//!
//! - same event id as the watermark → [`Decision::NoChange`] (a duplicate);
//! - older `created` → [`Decision::Stale`], ignored;
//! - newer `created` → applied (subject to the transition check);
//! - same second, different event → a **tie**. `created` has one-second
//!   resolution and one payment emits several events in the same second, so
//!   the order of a tie is unknown. A tie that would change nothing is a
//!   no-op. Otherwise the decision is [`Decision::Refetch`]: with a Stripe
//!   client the record is replaced by Stripe's current object; without one,
//!   the deterministic rule below picks a winner and the record is flagged
//!   `needs_reconcile` so the reconciler checks it first. Ties are never
//!   silently dropped.
//!
//! The deterministic tie rule ([`TieRank`]) orders events of the same second
//! by: a terminal status first, then the later current-period end (a renewal
//! moves the period forward, never back), then the event kind
//! (`customer.subscription.created` < other updates < `deleted`), then the
//! event id. It is a total order computed from each event alone, so the
//! winner does not depend on arrival order.
//!
//! An unknown subscription is refetched and upserted (with a client) or
//! created from the event's snapshot (without one). Thin events carry no
//! snapshot and always need a refetch.
//!
//! # Other events
//!
//! - `invoice.paid` / `invoice.payment_succeeded` extend `paid_through` (a
//!   maximum, so order does not matter), move `last_paid_at` forward, and
//!   restore a `past_due` or `unpaid` record to `active` when the payment is
//!   newer than the snapshot that said so.
//! - `invoice.payment_failed` / `invoice.payment_action_required` start the
//!   dunning clock (`last_payment_failed_at`); status changes come from the
//!   subscription events Stripe sends with them.
//! - `checkout.session.*` links `client_reference_id` and the customer to the
//!   subscription and never sets a status by itself.
//! - `entitlements.active_entitlement_summary.updated` is per customer; see
//!   [`decide_entitlements`].

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::event::{
    Event, EventType, InvoiceView, ItemView, PauseCollection, SubscriptionStatus, SubscriptionView,
};

/// How many anomalies a record keeps (the oldest are dropped).
pub const MAX_ANOMALIES: usize = 16;

/// How many failed payments a record remembers per dunning cycle.
pub const MAX_FAILURES: usize = 32;

/// A status change and the event that made it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusChange {
    /// The event (empty for a refetch or a repair).
    pub event_id: String,
    /// The status before.
    pub from: SubscriptionStatus,
    /// The status after.
    pub to: SubscriptionStatus,
}

/// The fields of a record that mirror Stripe's subscription object: what
/// "equals Stripe's truth" compares.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubscriptionState {
    /// The customer id.
    pub customer: Option<String>,
    /// The status.
    pub status: SubscriptionStatus,
    /// Items with price ids and (basil and later) per-item periods.
    pub items: Vec<ItemView>,
    /// The current period's start (Unix seconds).
    pub current_period_start: Option<i64>,
    /// The current period's end (Unix seconds); the earliest item end on
    /// basil and later.
    pub current_period_end: Option<i64>,
    /// Trial start.
    pub trial_start: Option<i64>,
    /// Trial end.
    pub trial_end: Option<i64>,
    /// Cancels at period end.
    pub cancel_at_period_end: bool,
    /// Scheduled cancellation.
    pub cancel_at: Option<i64>,
    /// When cancellation was requested.
    pub canceled_at: Option<i64>,
    /// When it ended.
    pub ended_at: Option<i64>,
    /// Paused collection.
    pub pause_collection: Option<PauseCollection>,
    /// The latest invoice id.
    pub latest_invoice: Option<String>,
}

impl SubscriptionState {
    /// The state a subscription object describes.
    pub fn from_view(view: &SubscriptionView) -> Self {
        Self {
            customer: view.customer.clone(),
            status: view.status.clone(),
            items: view.items.clone(),
            current_period_start: view.current_period_start,
            current_period_end: view.current_period_end,
            trial_start: view.trial_start,
            trial_end: view.trial_end,
            cancel_at_period_end: view.cancel_at_period_end,
            cancel_at: view.cancel_at,
            canceled_at: view.canceled_at,
            ended_at: view.ended_at,
            pause_collection: view.pause_collection.clone(),
            latest_invoice: view.latest_invoice.clone(),
        }
    }

    fn placeholder(customer: Option<String>) -> Self {
        Self {
            customer,
            status: SubscriptionStatus::Incomplete,
            items: Vec::new(),
            current_period_start: None,
            current_period_end: None,
            trial_start: None,
            trial_end: None,
            cancel_at_period_end: false,
            cancel_at: None,
            canceled_at: None,
            ended_at: None,
            pause_collection: None,
            latest_invoice: None,
        }
    }
}

/// Where a watermark came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WatermarkSource {
    /// A subscription event's snapshot.
    Event,
    /// An invoice payment that restored a past-due record.
    Payment,
    /// Stripe's object, fetched at `created` (our clock).
    Refetch,
}

/// The deterministic order of events within one second; see the
/// [module docs](self). Compared field by field, in declaration order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct TieRank {
    /// A terminal status ranks above any other.
    pub terminal: bool,
    /// The later current-period end ranks higher (`i64::MIN` when unknown).
    pub period_end: i64,
    /// `0` created / payment restore, `1` other subscription events, `2` deleted.
    pub phase: u8,
}

/// What a record's subscription fields reflect: the `created` second and id
/// of the event (or refetch) that last set them.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Watermark {
    /// Unix seconds (Stripe's `created`, or our clock for a refetch).
    pub created: i64,
    /// The event id (empty for a refetch).
    pub event_id: String,
    /// The tie rank of that event.
    pub rank: TieRank,
    /// Where it came from.
    pub source: WatermarkSource,
}

impl Watermark {
    /// The total order of the deterministic rule: `created`, then the tie
    /// rank, then the event id.
    pub fn order_key(&self) -> (i64, TieRank, &str) {
        (self.created, self.rank, &self.event_id)
    }
}

/// Something a human (or the reconciler) should look at.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Anomaly {
    /// When it was recorded (our clock, Unix seconds).
    pub at: i64,
    /// The event that caused it.
    pub event_id: Option<String>,
    /// What kind.
    pub kind: AnomalyKind,
    /// Details (statuses, ids; never a body).
    pub detail: String,
}

/// Kinds of [`Anomaly`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum AnomalyKind {
    /// A status that cannot follow the current one.
    ImpossibleTransition,
    /// A status reachable only through statuses we never saw.
    MissedTransition,
    /// A status this crate does not know.
    UnknownStatus,
    /// A refetch from Stripe failed; a fallback was applied.
    RefetchFailed,
    /// Stripe's object disagreed with the record (found by a refetch or the
    /// reconciler).
    Diverged,
    /// Events disagree about the customer.
    CustomerMismatch,
    /// Stripe does not know the subscription.
    NotFoundAtStripe,
}

/// A subscription as this crate keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubscriptionRecord {
    /// `sub_…`
    pub id: String,
    /// The customer id.
    pub customer: Option<String>,
    /// The status.
    pub status: SubscriptionStatus,
    /// Items with price ids and per-item periods.
    pub items: Vec<ItemView>,
    /// Current period start (Unix seconds).
    pub current_period_start: Option<i64>,
    /// Current period end (Unix seconds).
    pub current_period_end: Option<i64>,
    /// Trial start.
    pub trial_start: Option<i64>,
    /// Trial end.
    pub trial_end: Option<i64>,
    /// Cancels at the end of the period.
    pub cancel_at_period_end: bool,
    /// Scheduled cancellation time.
    pub cancel_at: Option<i64>,
    /// When cancellation was requested.
    pub canceled_at: Option<i64>,
    /// When it ended.
    pub ended_at: Option<i64>,
    /// Paused collection (does not change `status`).
    pub pause_collection: Option<PauseCollection>,
    /// The latest invoice id (from the subscription or invoice events).
    pub latest_invoice: Option<String>,
    /// Whether that invoice is known to be paid.
    pub latest_invoice_paid: Option<bool>,
    /// The furthest service-period end any paid invoice covered.
    pub paid_through: Option<i64>,
    /// The newest successful payment's event time.
    pub last_paid_at: Option<i64>,
    /// The newest failed payment's event time.
    pub last_payment_failed_at: Option<i64>,
    /// Failed payments newer than the last successful one (event times,
    /// ascending, at most [`MAX_FAILURES`]): the first one started the
    /// dunning clock ([`SubscriptionRecord::dunning_since`]).
    #[serde(default)]
    pub payment_failures: Vec<i64>,
    /// The last status change and the event that made it, so a retried event
    /// can still tell its handler what it changed.
    #[serde(default)]
    pub last_change: Option<StatusChange>,
    /// The ordering watermark of the subscription fields (`None` until a
    /// snapshot or a refetch set them).
    pub watermark: Option<Watermark>,
    /// The watermark of `latest_invoice` / `latest_invoice_paid`.
    pub invoice_watermark: Option<(i64, String)>,
    /// When the record last matched Stripe's object (a refetch or a sweep).
    #[serde(with = "time::serde::rfc3339::option")]
    pub last_verified_with_stripe: Option<OffsetDateTime>,
    /// The application's reference from Checkout (a user id, say).
    pub client_reference_id: Option<String>,
    /// The Checkout Session that created it.
    pub checkout_session: Option<String>,
    /// Live or test mode.
    pub livemode: Option<bool>,
    /// The Connect account, if any.
    pub account: Option<String>,
    /// Recent anomalies, oldest first (at most [`MAX_ANOMALIES`]).
    pub anomalies: Vec<Anomaly>,
    /// A human should look at this record.
    pub needs_review: bool,
    /// The record holds a guess (a tie decided by rule, a failed refetch):
    /// the reconciler should confirm it with Stripe.
    pub needs_reconcile: bool,
    /// Optimistic-concurrency version: 0 before the first save; stores
    /// refuse a save whose version is not the stored one.
    pub version: u64,
}

impl SubscriptionRecord {
    /// A record for `id` with nothing known yet (no snapshot).
    pub fn new(id: &str) -> Self {
        let s = SubscriptionState::placeholder(None);
        let mut r = Self {
            id: id.to_owned(),
            customer: None,
            status: s.status.clone(),
            items: Vec::new(),
            current_period_start: None,
            current_period_end: None,
            trial_start: None,
            trial_end: None,
            cancel_at_period_end: false,
            cancel_at: None,
            canceled_at: None,
            ended_at: None,
            pause_collection: None,
            latest_invoice: None,
            latest_invoice_paid: None,
            paid_through: None,
            last_paid_at: None,
            last_payment_failed_at: None,
            payment_failures: Vec::new(),
            last_change: None,
            watermark: None,
            invoice_watermark: None,
            last_verified_with_stripe: None,
            client_reference_id: None,
            checkout_session: None,
            livemode: None,
            account: None,
            anomalies: Vec::new(),
            needs_review: false,
            needs_reconcile: false,
            version: 0,
        };
        r.set_state(s);
        r
    }

    /// When the current dunning cycle started: the first failed payment
    /// after the last successful one, if any.
    pub fn dunning_since(&self) -> Option<i64> {
        self.payment_failures.first().copied()
    }

    /// Whether a subscription snapshot (event or Stripe object) has set the
    /// status; before that, the record only holds invoice or Checkout facts.
    pub fn has_snapshot(&self) -> bool {
        self.watermark.is_some()
    }

    /// The fields that mirror Stripe's object.
    pub fn state(&self) -> SubscriptionState {
        SubscriptionState {
            customer: self.customer.clone(),
            status: self.status.clone(),
            items: self.items.clone(),
            current_period_start: self.current_period_start,
            current_period_end: self.current_period_end,
            trial_start: self.trial_start,
            trial_end: self.trial_end,
            cancel_at_period_end: self.cancel_at_period_end,
            cancel_at: self.cancel_at,
            canceled_at: self.canceled_at,
            ended_at: self.ended_at,
            pause_collection: self.pause_collection.clone(),
            latest_invoice: self.latest_invoice.clone(),
        }
    }

    fn set_state(&mut self, s: SubscriptionState) {
        if s.customer.is_some() {
            self.customer = s.customer;
        }
        self.status = s.status;
        self.items = s.items;
        self.current_period_start = s.current_period_start;
        self.current_period_end = s.current_period_end;
        self.trial_start = s.trial_start;
        self.trial_end = s.trial_end;
        self.cancel_at_period_end = s.cancel_at_period_end;
        self.cancel_at = s.cancel_at;
        self.canceled_at = s.canceled_at;
        self.ended_at = s.ended_at;
        self.pause_collection = s.pause_collection;
    }

    /// Whether the subscription fields equal `state`, independent of the API
    /// shape either side was read from: the customer is compared when both
    /// know it, items by id, price and quantity (and their own periods when
    /// both sides have them), and the latest invoice is left out (invoice
    /// events track it on their own clock).
    pub fn matches(&self, state: &SubscriptionState) -> bool {
        let customer_ok = match (&self.customer, &state.customer) {
            (Some(a), Some(b)) => a == b,
            _ => true,
        };
        let same_option = |a: Option<i64>, b: Option<i64>| a.is_none() || b.is_none() || a == b;
        let items_ok = self.items.len() == state.items.len()
            && self.items.iter().zip(&state.items).all(|(a, b)| {
                a.id == b.id
                    && a.price_id == b.price_id
                    && a.quantity == b.quantity
                    && same_option(a.current_period_start, b.current_period_start)
                    && same_option(a.current_period_end, b.current_period_end)
            });
        customer_ok
            && items_ok
            && self.status == state.status
            && self.current_period_start == state.current_period_start
            && self.current_period_end == state.current_period_end
            && self.trial_start == state.trial_start
            && self.trial_end == state.trial_end
            && self.cancel_at_period_end == state.cancel_at_period_end
            && self.cancel_at == state.cancel_at
            && self.canceled_at == state.canceled_at
            && self.ended_at == state.ended_at
            && self.pause_collection == state.pause_collection
    }

    fn note(&mut self, now: i64, event_id: Option<&str>, kind: AnomalyKind, detail: String) {
        self.anomalies.push(Anomaly {
            at: now,
            event_id: event_id.map(str::to_owned),
            kind,
            detail,
        });
        if self.anomalies.len() > MAX_ANOMALIES {
            let excess = self.anomalies.len() - MAX_ANOMALIES;
            self.anomalies.drain(..excess);
        }
    }
}

/// How one status relates to the next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransitionKind {
    /// The same status.
    Same,
    /// An edge of the table.
    Direct,
    /// Reachable only through statuses in between (an event was missed), or
    /// involving a status this crate does not know.
    Gap,
    /// Cannot happen: out of a terminal status, or into a status that only
    /// starts a subscription.
    Impossible,
}

/// The transition table of the [module docs](self). `from == None` is a new
/// subscription.
pub fn transition(from: Option<&SubscriptionStatus>, to: &SubscriptionStatus) -> TransitionKind {
    use SubscriptionStatus as S;
    let Some(from) = from else {
        return match to {
            S::Incomplete | S::Trialing | S::Active => TransitionKind::Direct,
            _ => TransitionKind::Gap,
        };
    };
    if from == to {
        return TransitionKind::Same;
    }
    if matches!(from, S::Unknown(_)) || matches!(to, S::Unknown(_)) {
        return TransitionKind::Gap;
    }
    let direct = match from {
        S::Incomplete => matches!(to, S::Active | S::IncompleteExpired),
        S::Trialing => matches!(to, S::Active | S::PastDue | S::Paused | S::Canceled),
        S::Active => matches!(to, S::PastDue | S::Canceled | S::Trialing | S::Paused),
        S::PastDue => matches!(to, S::Active | S::Canceled | S::Unpaid | S::Paused),
        S::Unpaid => matches!(to, S::Active | S::Canceled),
        S::Paused => matches!(to, S::Active | S::PastDue | S::Canceled),
        S::Canceled | S::IncompleteExpired | S::Unknown(_) => false,
    };
    if direct {
        return TransitionKind::Direct;
    }
    // Everything below is reachable from every live status except the two
    // that only start a subscription; nothing leaves a terminal status.
    let reachable = !from.is_terminal()
        && !matches!(to, S::Incomplete)
        && (!matches!(to, S::IncompleteExpired) || matches!(from, S::Incomplete));
    if reachable {
        TransitionKind::Gap
    } else {
        TransitionKind::Impossible
    }
}

/// Why a decision asks Stripe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum RefetchReason {
    /// Two different events of the same second disagree.
    Tie,
    /// The status cannot follow the current one.
    ImpossibleTransition,
    /// The subscription is not in the store yet.
    UnknownSubscription,
    /// A thin event carries no snapshot.
    ThinEvent,
    /// A 2012-era event names no subscription id; ask by customer.
    NoSubscriptionId,
    /// A payment restored a past-due record; confirm the status.
    ConfirmRestore,
}

/// Why a decision saves a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ApplyReason {
    /// A newer snapshot.
    Snapshot,
    /// A new subscription created from its snapshot (no client).
    Created,
    /// A tie decided by the deterministic rule (no client).
    TieRule,
    /// A payment fact (paid through, dunning clock, latest invoice).
    Payment,
    /// A payment restored a past-due or unpaid record.
    PaymentRestored,
    /// A Checkout Session linked the subscription.
    CheckoutLinked,
    /// An impossible transition was recorded as an anomaly; state kept.
    AnomalyRecorded,
    /// Stripe's object replaced the record.
    Refetched,
    /// This event was applied by an earlier attempt (which then failed);
    /// the change reported is the one it made.
    AlreadyApplied,
}

/// A record to save, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    /// The new record (its `version` is the one loaded, for the CAS save).
    pub record: SubscriptionRecord,
    /// Why.
    pub reason: ApplyReason,
    /// The status before and after, when it changed.
    pub status_change: Option<(SubscriptionStatus, SubscriptionStatus)>,
}

/// What to do with an event, from [`apply`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Decision {
    /// Save this record.
    Apply(Box<Applied>),
    /// Older than the record's watermark: ignore.
    Stale {
        /// The watermark that is newer.
        watermark: Watermark,
    },
    /// Changes nothing (the same event again, or a tie that agrees).
    NoChange,
    /// Ask Stripe for the subscription. With no client (or if the fetch
    /// fails), save `fallback` when there is one.
    Refetch {
        /// The subscription to fetch, when known.
        subscription_id: Option<String>,
        /// The customer, to list by when the id is unknown.
        customer: Option<String>,
        /// Why.
        reason: RefetchReason,
        /// What to save without Stripe's answer.
        fallback: Option<Box<Applied>>,
    },
    /// The event has no effect on subscriptions.
    NotApplicable {
        /// Why.
        reason: &'static str,
    },
}

/// Decides what `event` does to `current` (the stored record of the
/// subscription the event is about, if any). Pure: `now` is only used to
/// timestamp anomalies.
///
/// # Errors
///
/// [`crate::event::ParseError`] when the event's object cannot be read as
/// the kind its type promises.
pub fn apply(
    current: Option<&SubscriptionRecord>,
    event: &Event,
    now: OffsetDateTime,
) -> Result<Decision, crate::event::ParseError> {
    let t = event.event_type();
    if event.is_thin() {
        if !t.has_subscription_effect() {
            return Ok(Decision::NotApplicable {
                reason: "event type has no subscription effect",
            });
        }
        let related = event.related_object();
        let id = related
            .filter(|r| r.object_type == "subscription")
            .map(|r| r.id.clone());
        return Ok(Decision::Refetch {
            subscription_id: id.or_else(|| current.map(|c| c.id.clone())),
            customer: None,
            reason: RefetchReason::ThinEvent,
            fallback: None,
        });
    }
    if t.is_subscription() {
        let view = event.subscription()?;
        Ok(apply_snapshot(current, event, &view, now))
    } else if t.is_invoice() {
        let view = event.invoice()?;
        Ok(apply_invoice(current, event, &view))
    } else if t.is_checkout() {
        let view = event.checkout_session()?;
        Ok(apply_checkout(current, event, &view))
    } else {
        Ok(Decision::NotApplicable {
            reason: "event type has no subscription effect",
        })
    }
}

/// The subscription id an event is about, when it names one: the object id
/// of a subscription event, the subscription of an invoice or Checkout
/// Session, or a thin event's related subscription.
///
/// # Errors
///
/// [`crate::event::ParseError`] when the object cannot be read.
pub fn subscription_id_of(event: &Event) -> Result<Option<String>, crate::event::ParseError> {
    let t = event.event_type();
    if event.is_thin() {
        return Ok(event
            .related_object()
            .filter(|r| r.object_type == "subscription")
            .map(|r| r.id.clone()));
    }
    Ok(if t.is_subscription() {
        event.subscription()?.id
    } else if t.is_invoice() {
        event.invoice()?.subscription_id
    } else if t.is_checkout() {
        event.checkout_session()?.subscription
    } else {
        None
    })
}

/// The tie rank of a subscription event.
pub fn tie_rank(event_type: &EventType, view: &SubscriptionView) -> TieRank {
    TieRank {
        terminal: view.status.is_terminal(),
        period_end: view.current_period_end.unwrap_or(i64::MIN),
        phase: match event_type {
            EventType::SubscriptionCreated => 0,
            EventType::SubscriptionDeleted => 2,
            _ => 1,
        },
    }
}

fn apply_snapshot(
    current: Option<&SubscriptionRecord>,
    event: &Event,
    view: &SubscriptionView,
    now: OffsetDateTime,
) -> Decision {
    let Some(id) = view.id.clone().or_else(|| current.map(|c| c.id.clone())) else {
        // 2012-era events name only the customer.
        return Decision::Refetch {
            subscription_id: None,
            customer: view.customer.clone(),
            reason: RefetchReason::NoSubscriptionId,
            fallback: None,
        };
    };
    let mark = Watermark {
        created: event.created(),
        event_id: event.id().to_owned(),
        rank: tie_rank(event.event_type(), view),
        source: WatermarkSource::Event,
    };
    let incoming = SubscriptionState::from_view(view);
    let now_s = now.unix_timestamp();

    let Some(cur) = current else {
        let mut record = SubscriptionRecord::new(&id);
        record.account = event.account().map(str::to_owned);
        record.livemode = Some(event.livemode());
        let kind = transition(None, &incoming.status);
        adopt(&mut record, incoming, mark);
        if kind == TransitionKind::Gap {
            // Not a first status: earlier events are missing. Fine, but say so.
            let detail = format!("first event seen shows status {}", record.status);
            record.note(
                now_s,
                Some(event.id()),
                AnomalyKind::MissedTransition,
                detail,
            );
        }
        return Decision::Refetch {
            subscription_id: Some(id),
            customer: view.customer.clone(),
            reason: RefetchReason::UnknownSubscription,
            fallback: Some(Box::new(Applied {
                status_change: Some((SubscriptionStatus::Incomplete, record.status.clone()))
                    .filter(|(a, b)| a != b),
                record,
                reason: ApplyReason::Created,
            })),
        };
    };

    let Some(wm) = &cur.watermark else {
        // A stub made from invoice or Checkout facts: the first snapshot.
        let mut record = cur.clone();
        let before = record.status.clone();
        adopt(&mut record, incoming, mark);
        return Decision::Apply(Box::new(Applied {
            status_change: change(&before, &record.status),
            record,
            reason: ApplyReason::Created,
        }));
    };

    if wm.event_id == event.id() {
        return Decision::NoChange;
    }
    if event.created() < wm.created {
        return Decision::Stale {
            watermark: wm.clone(),
        };
    }
    if event.created() == wm.created {
        return decide_tie(cur, wm, incoming, mark);
    }

    // Newer.
    let kind = transition(Some(&cur.status), &incoming.status);
    if kind == TransitionKind::Impossible {
        let mut record = cur.clone();
        let detail = format!(
            "{} -> {} is impossible; state kept",
            cur.status, incoming.status
        );
        record.note(
            now_s,
            Some(event.id()),
            AnomalyKind::ImpossibleTransition,
            detail,
        );
        record.needs_review = true;
        return Decision::Refetch {
            subscription_id: Some(cur.id.clone()),
            customer: cur.customer.clone(),
            reason: RefetchReason::ImpossibleTransition,
            fallback: Some(Box::new(Applied {
                record,
                reason: ApplyReason::AnomalyRecorded,
                status_change: None,
            })),
        };
    }
    let mut record = cur.clone();
    let before = record.status.clone();
    if kind == TransitionKind::Gap {
        let (anomaly, detail) = if matches!(incoming.status, SubscriptionStatus::Unknown(_))
            || matches!(before, SubscriptionStatus::Unknown(_))
        {
            (
                AnomalyKind::UnknownStatus,
                format!("status {} -> {}", before, incoming.status),
            )
        } else {
            (
                AnomalyKind::MissedTransition,
                format!(
                    "{} -> {} skips a status: an event was missed",
                    before, incoming.status
                ),
            )
        };
        record.note(now_s, Some(event.id()), anomaly, detail);
    }
    check_customer(&mut record, incoming.customer.as_deref(), now_s, event.id());
    adopt(&mut record, incoming, mark);
    Decision::Apply(Box::new(Applied {
        status_change: change(&before, &record.status),
        record,
        reason: ApplyReason::Snapshot,
    }))
}

fn decide_tie(
    cur: &SubscriptionRecord,
    wm: &Watermark,
    incoming: SubscriptionState,
    mark: Watermark,
) -> Decision {
    let incoming_wins = mark.order_key() > wm.order_key();
    if cur.matches(&incoming) {
        if !incoming_wins {
            return Decision::NoChange;
        }
        // An agreeing tie changes no state, but the watermark must move to
        // the winner, or a third event of the same second could be judged
        // against the wrong one (and the result depend on arrival order).
        let mut record = cur.clone();
        adopt(&mut record, incoming, mark);
        return Decision::Apply(Box::new(Applied {
            record,
            reason: ApplyReason::Snapshot,
            status_change: None,
        }));
    }
    let mut record = cur.clone();
    let before = record.status.clone();
    if incoming_wins {
        adopt(&mut record, incoming, mark);
    }
    record.needs_reconcile = true;
    Decision::Refetch {
        subscription_id: Some(cur.id.clone()),
        customer: cur.customer.clone(),
        reason: RefetchReason::Tie,
        fallback: Some(Box::new(Applied {
            status_change: change(&before, &record.status),
            record,
            reason: ApplyReason::TieRule,
        })),
    }
}

/// Takes a snapshot's state and watermark. The latest invoice is a
/// last-writer-wins field shared with invoice events, ordered by
/// `(created, event id)` on its own watermark.
fn adopt(record: &mut SubscriptionRecord, state: SubscriptionState, mark: Watermark) {
    let invoice_mark = (mark.created, mark.event_id.clone());
    if state.latest_invoice.is_some()
        && record
            .invoice_watermark
            .as_ref()
            .is_none_or(|w| invoice_mark > *w)
    {
        if state.latest_invoice != record.latest_invoice {
            record.latest_invoice_paid = None;
        }
        record.latest_invoice.clone_from(&state.latest_invoice);
        record.invoice_watermark = Some(invoice_mark);
    }
    record.set_state(state);
    record.watermark = Some(mark);
}

fn change(
    before: &SubscriptionStatus,
    after: &SubscriptionStatus,
) -> Option<(SubscriptionStatus, SubscriptionStatus)> {
    (before != after).then(|| (before.clone(), after.clone()))
}

fn check_customer(
    record: &mut SubscriptionRecord,
    incoming: Option<&str>,
    now: i64,
    event_id: &str,
) {
    if let (Some(have), Some(got)) = (record.customer.as_deref(), incoming)
        && have != got
    {
        let detail = format!("customer {have} -> {got}");
        record.note(now, Some(event_id), AnomalyKind::CustomerMismatch, detail);
        record.needs_review = true;
    }
}

fn apply_invoice(
    current: Option<&SubscriptionRecord>,
    event: &Event,
    view: &InvoiceView,
) -> Decision {
    let Some(sub_id) = view
        .subscription_id
        .clone()
        .or_else(|| current.map(|c| c.id.clone()))
    else {
        return Decision::NotApplicable {
            reason: "invoice is not for a subscription",
        };
    };
    let fresh = current.is_none();
    let mut record = current
        .cloned()
        .unwrap_or_else(|| SubscriptionRecord::new(&sub_id));
    if fresh {
        record.customer.clone_from(&view.customer);
        record.account = event.account().map(str::to_owned);
        record.livemode = Some(event.livemode());
    }
    let before = record.clone();
    let created = event.created();
    let paid_event = matches!(
        event.event_type(),
        EventType::InvoicePaid | EventType::InvoicePaymentSucceeded
    ) && view.paid;
    let failed_event = matches!(
        event.event_type(),
        EventType::InvoicePaymentFailed | EventType::InvoicePaymentActionRequired
    );

    // Latest invoice: last writer wins by (created, event id).
    let inv_mark = (created, event.id().to_owned());
    if view.id.is_some()
        && record
            .invoice_watermark
            .as_ref()
            .is_none_or(|w| inv_mark > *w)
    {
        record.latest_invoice.clone_from(&view.id);
        record.latest_invoice_paid = Some(view.paid);
        record.invoice_watermark = Some(inv_mark);
    }
    let mut reason = ApplyReason::Payment;
    if paid_event {
        if let Some(end) = view.service_period_end {
            record.paid_through = Some(record.paid_through.map_or(end, |p| p.max(end)));
        }
        record.last_paid_at = Some(record.last_paid_at.map_or(created, |p| p.max(created)));
        let paid = record.last_paid_at.unwrap_or(created);
        record.payment_failures.retain(|f| *f > paid);
        // A payment newer than the snapshot that said past_due / unpaid, by
        // the same total order as snapshots (a payment ranks below any
        // subscription event of its second).
        let mark = Watermark {
            created,
            event_id: event.id().to_owned(),
            rank: TieRank {
                terminal: false,
                period_end: view.service_period_end.unwrap_or(i64::MIN),
                phase: 0,
            },
            source: WatermarkSource::Payment,
        };
        let newer = record
            .watermark
            .as_ref()
            .is_some_and(|w| mark.order_key() > w.order_key());
        if newer
            && matches!(
                record.status,
                SubscriptionStatus::PastDue
                    | SubscriptionStatus::Unpaid
                    | SubscriptionStatus::Incomplete
            )
        {
            record.status = SubscriptionStatus::Active;
            record.watermark = Some(mark);
            reason = ApplyReason::PaymentRestored;
        }
    }
    if failed_event {
        record.last_payment_failed_at = Some(
            record
                .last_payment_failed_at
                .map_or(created, |p| p.max(created)),
        );
        // Only failures after the last payment belong to the dunning cycle;
        // kept as a set so the first one does not depend on arrival order.
        if record.last_paid_at.is_none_or(|p| created > p)
            && let Err(pos) = record.payment_failures.binary_search(&created)
            && pos < MAX_FAILURES
        {
            record.payment_failures.insert(pos, created);
            record.payment_failures.truncate(MAX_FAILURES);
        }
    }
    if record == before && !fresh {
        return Decision::NoChange;
    }
    let applied = Applied {
        status_change: change(&before.status, &record.status),
        record,
        reason,
    };
    if fresh {
        return Decision::Refetch {
            subscription_id: Some(sub_id),
            customer: view.customer.clone(),
            reason: RefetchReason::UnknownSubscription,
            fallback: Some(Box::new(applied)),
        };
    }
    if reason == ApplyReason::PaymentRestored {
        // The status came from a payment, not from Stripe's subscription:
        // confirm it when a client is configured.
        let mut fallback = applied.clone();
        fallback.record.needs_reconcile = true;
        return Decision::Refetch {
            subscription_id: Some(sub_id),
            customer: applied.record.customer.clone(),
            reason: RefetchReason::ConfirmRestore,
            fallback: Some(Box::new(fallback)),
        };
    }
    Decision::Apply(Box::new(applied))
}

fn apply_checkout(
    current: Option<&SubscriptionRecord>,
    event: &Event,
    view: &crate::event::CheckoutSessionView,
) -> Decision {
    let Some(sub_id) = view.subscription.clone() else {
        return Decision::NotApplicable {
            reason: "Checkout Session has no subscription",
        };
    };
    let fresh = current.is_none();
    let mut record = current
        .cloned()
        .unwrap_or_else(|| SubscriptionRecord::new(&sub_id));
    let before = record.clone();
    if record.customer.is_none() {
        record.customer.clone_from(&view.customer);
    }
    if record.client_reference_id.is_none() {
        record
            .client_reference_id
            .clone_from(&view.client_reference_id);
    }
    if record.checkout_session.is_none() {
        record.checkout_session.clone_from(&view.id);
    }
    if fresh {
        record.account = event.account().map(str::to_owned);
        record.livemode = Some(event.livemode());
    }
    if record == before && !fresh {
        return Decision::NoChange;
    }
    let applied = Applied {
        record,
        reason: ApplyReason::CheckoutLinked,
        status_change: None,
    };
    if fresh {
        return Decision::Refetch {
            subscription_id: Some(sub_id),
            customer: view.customer.clone(),
            reason: RefetchReason::UnknownSubscription,
            fallback: Some(Box::new(applied)),
        };
    }
    Decision::Apply(Box::new(applied))
}

/// Replaces the subscription fields of `current` (or a new record) with
/// Stripe's object, fetched at `fetched_at` on our clock, possibly because of
/// `trigger`. Payment facts, links and anomalies are kept. The watermark
/// becomes the latest of `fetched_at`, the old watermark and the trigger's
/// `created`, so events older than the fetch are stale afterwards and events
/// of the same second are ties (refetched again).
pub fn from_stripe(
    current: Option<&SubscriptionRecord>,
    truth: &SubscriptionView,
    fetched_at: OffsetDateTime,
    trigger: Option<&Event>,
) -> Applied {
    let id = truth
        .id
        .clone()
        .or_else(|| current.map(|c| c.id.clone()))
        .unwrap_or_default();
    let mut record = current
        .cloned()
        .unwrap_or_else(|| SubscriptionRecord::new(&id));
    let before = record.status.clone();
    let incoming = SubscriptionState::from_view(truth);
    let created = [
        Some(fetched_at.unix_timestamp()),
        record.watermark.as_ref().map(|w| w.created),
        trigger.map(Event::created),
    ]
    .into_iter()
    .flatten()
    .max()
    .unwrap_or_default();
    if let Some(trigger) = trigger {
        record.account = record
            .account
            .take()
            .or(trigger.account().map(str::to_owned));
        record.livemode = record.livemode.or(Some(trigger.livemode()));
    }
    if let Some(live) = truth.livemode {
        record.livemode = Some(live);
    }
    let mark = Watermark {
        created,
        event_id: String::new(),
        rank: TieRank {
            terminal: incoming.status.is_terminal(),
            period_end: incoming.current_period_end.unwrap_or(i64::MIN),
            phase: 0,
        },
        source: WatermarkSource::Refetch,
    };
    adopt(&mut record, incoming, mark);
    record.last_verified_with_stripe = Some(fetched_at);
    record.needs_reconcile = false;
    Applied {
        status_change: change(&before, &record.status),
        record,
        reason: ApplyReason::Refetched,
    }
}

/// A customer's active entitlements, as last reported by Stripe.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CustomerEntitlements {
    /// The customer id.
    pub customer: String,
    /// Active feature lookup keys.
    pub lookup_keys: Vec<String>,
    /// The `(created, event id)` of the summary event.
    pub watermark: (i64, String),
    /// Optimistic-concurrency version (0 before the first save).
    pub version: u64,
}

impl CustomerEntitlements {
    /// Whether `lookup_key` is active.
    pub fn has(&self, lookup_key: &str) -> bool {
        self.lookup_keys.iter().any(|k| k == lookup_key)
    }
}

/// Last-writer-wins on `(created, event id)` for an entitlement summary
/// event. `None` when the stored summary is newer or the same.
///
/// # Errors
///
/// [`crate::event::ParseError`] when the object is not an entitlement summary.
pub fn decide_entitlements(
    current: Option<&CustomerEntitlements>,
    event: &Event,
) -> Result<Option<CustomerEntitlements>, crate::event::ParseError> {
    let view = event.entitlement_summary()?;
    let mark = (event.created(), event.id().to_owned());
    if current.is_some_and(|c| c.watermark >= mark) {
        return Ok(None);
    }
    let mut keys = view.lookup_keys;
    keys.sort();
    keys.dedup();
    Ok(Some(CustomerEntitlements {
        customer: view.customer,
        lookup_keys: keys,
        watermark: mark,
        version: current.map_or(0, |c| c.version),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use SubscriptionStatus as S;

    fn now() -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp(1_700_000_000).unwrap()
    }

    fn sub_event(id: &str, ty: &str, created: i64, status: &str, period_end: i64) -> Event {
        let json = format!(
            r#"{{"id":"{id}","object":"event","type":"{ty}","created":{created},"livemode":false,
            "data":{{"object":{{"id":"sub_1","object":"subscription","customer":"cus_1","status":"{status}",
            "current_period_start":{},"current_period_end":{period_end},"cancel_at_period_end":false,
            "items":{{"data":[{{"id":"si_1","price":{{"id":"price_1"}}}}]}}}}}}}}"#,
            period_end - 100
        );
        Event::parse_unverified(json.as_bytes()).unwrap()
    }

    fn applied(d: Decision) -> SubscriptionRecord {
        match d {
            Decision::Apply(a)
            | Decision::Refetch {
                fallback: Some(a), ..
            } => a.record,
            other => panic!("expected a record, got {other:?}"),
        }
    }

    #[test]
    fn transition_table() {
        use TransitionKind::*;
        let cases = [
            (None, S::Incomplete, Direct),
            (None, S::Trialing, Direct),
            (None, S::Active, Direct),
            (None, S::PastDue, Gap),
            (Some(S::Incomplete), S::Active, Direct),
            (Some(S::Incomplete), S::IncompleteExpired, Direct),
            (Some(S::Incomplete), S::Canceled, Gap),
            (Some(S::Trialing), S::Active, Direct),
            (Some(S::Trialing), S::PastDue, Direct),
            (Some(S::Trialing), S::Paused, Direct),
            (Some(S::Trialing), S::Canceled, Direct),
            (Some(S::Trialing), S::Unpaid, Gap),
            (Some(S::Active), S::PastDue, Direct),
            (Some(S::Active), S::Canceled, Direct),
            (Some(S::Active), S::Trialing, Direct),
            (Some(S::Active), S::Paused, Direct),
            (Some(S::Active), S::Unpaid, Gap),
            (Some(S::Active), S::Incomplete, Impossible),
            (Some(S::Active), S::IncompleteExpired, Impossible),
            (Some(S::PastDue), S::Active, Direct),
            (Some(S::PastDue), S::Canceled, Direct),
            (Some(S::PastDue), S::Unpaid, Direct),
            (Some(S::PastDue), S::Paused, Direct),
            (Some(S::PastDue), S::Trialing, Gap),
            (Some(S::Unpaid), S::Active, Direct),
            (Some(S::Unpaid), S::Canceled, Direct),
            (Some(S::Unpaid), S::PastDue, Gap),
            (Some(S::Paused), S::Active, Direct),
            (Some(S::Paused), S::PastDue, Direct),
            (Some(S::Paused), S::Canceled, Direct),
            (Some(S::Paused), S::Unpaid, Gap),
            (Some(S::Canceled), S::Active, Impossible),
            (Some(S::Canceled), S::IncompleteExpired, Impossible),
            (Some(S::IncompleteExpired), S::Active, Impossible),
            (Some(S::Canceled), S::Canceled, Same),
            (Some(S::Active), S::Unknown("new".into()), Gap),
        ];
        for (from, to, want) in cases {
            assert_eq!(transition(from.as_ref(), &to), want, "{from:?} -> {to:?}");
        }
        // Terminal states are absorbing: nothing else follows them.
        for terminal in [S::Canceled, S::IncompleteExpired] {
            for to in S::ALL {
                if to != terminal {
                    assert_eq!(
                        transition(Some(&terminal), &to),
                        Impossible,
                        "{terminal} -> {to}"
                    );
                }
            }
        }
    }

    #[test]
    fn unknown_subscription_asks_for_refetch_with_a_fallback() {
        let e = sub_event(
            "evt_1",
            "customer.subscription.created",
            100,
            "active",
            1000,
        );
        match apply(None, &e, now()).unwrap() {
            Decision::Refetch {
                subscription_id,
                reason: RefetchReason::UnknownSubscription,
                fallback: Some(f),
                ..
            } => {
                assert_eq!(subscription_id.as_deref(), Some("sub_1"));
                assert_eq!(f.record.status, S::Active);
                assert_eq!(f.record.watermark.as_ref().unwrap().created, 100);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn newer_applies_older_is_stale_same_is_noop() {
        let r = applied(
            apply(
                None,
                &sub_event(
                    "evt_1",
                    "customer.subscription.updated",
                    100,
                    "active",
                    1000,
                ),
                now(),
            )
            .unwrap(),
        );
        let newer = sub_event(
            "evt_2",
            "customer.subscription.updated",
            200,
            "past_due",
            1000,
        );
        let r2 = applied(apply(Some(&r), &newer, now()).unwrap());
        assert_eq!(r2.status, S::PastDue);
        let older = sub_event(
            "evt_0",
            "customer.subscription.updated",
            50,
            "incomplete",
            1000,
        );
        assert!(matches!(
            apply(Some(&r2), &older, now()).unwrap(),
            Decision::Stale { .. }
        ));
        assert_eq!(apply(Some(&r2), &newer, now()).unwrap(), Decision::NoChange);
    }

    #[test]
    fn ties_are_never_dropped() {
        let r = applied(
            apply(
                None,
                &sub_event(
                    "evt_a",
                    "customer.subscription.created",
                    100,
                    "incomplete",
                    1000,
                ),
                now(),
            )
            .unwrap(),
        );
        let tie = sub_event(
            "evt_b",
            "customer.subscription.updated",
            100,
            "active",
            1000,
        );
        match apply(Some(&r), &tie, now()).unwrap() {
            Decision::Refetch {
                reason: RefetchReason::Tie,
                fallback: Some(f),
                ..
            } => {
                // `updated` outranks `created` within a second.
                assert_eq!(f.record.status, S::Active);
                assert!(f.record.needs_reconcile);
            }
            other => panic!("{other:?}"),
        }
        // The reverse arrival order gives the same winner.
        let r = applied(apply(None, &tie, now()).unwrap());
        let created = sub_event(
            "evt_a",
            "customer.subscription.created",
            100,
            "incomplete",
            1000,
        );
        match apply(Some(&r), &created, now()).unwrap() {
            Decision::Refetch {
                reason: RefetchReason::Tie,
                fallback: Some(f),
                ..
            } => assert_eq!(f.record.status, S::Active),
            other => panic!("{other:?}"),
        }
        // A tie that agrees changes no state; a winning one moves the
        // watermark so a third event is judged against the right one.
        let same = sub_event(
            "evt_c",
            "customer.subscription.updated",
            100,
            "active",
            1000,
        );
        match apply(Some(&r), &same, now()).unwrap() {
            Decision::Apply(a) => {
                assert_eq!(a.record.status, S::Active);
                assert!(!a.record.needs_reconcile);
                assert_eq!(a.record.watermark.unwrap().event_id, "evt_c");
                assert_eq!(a.status_change, None);
            }
            other => panic!("{other:?}"),
        }
        let losing = sub_event(
            "evt_0",
            "customer.subscription.updated",
            100,
            "active",
            1000,
        );
        assert_eq!(apply(Some(&r), &losing, now()).unwrap(), Decision::NoChange);
    }

    #[test]
    fn impossible_transitions_keep_state_and_ask_stripe() {
        let r = applied(
            apply(
                None,
                &sub_event(
                    "evt_1",
                    "customer.subscription.deleted",
                    100,
                    "canceled",
                    1000,
                ),
                now(),
            )
            .unwrap(),
        );
        let back = sub_event(
            "evt_2",
            "customer.subscription.updated",
            200,
            "active",
            2000,
        );
        match apply(Some(&r), &back, now()).unwrap() {
            Decision::Refetch {
                reason: RefetchReason::ImpossibleTransition,
                fallback: Some(f),
                ..
            } => {
                assert_eq!(f.record.status, S::Canceled);
                assert!(f.record.needs_review);
                assert_eq!(
                    f.record.anomalies.last().unwrap().kind,
                    AnomalyKind::ImpossibleTransition
                );
                assert_eq!(f.record.watermark, r.watermark, "watermark not advanced");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn gaps_apply_with_a_note() {
        let r = applied(
            apply(
                None,
                &sub_event(
                    "evt_1",
                    "customer.subscription.updated",
                    100,
                    "active",
                    1000,
                ),
                now(),
            )
            .unwrap(),
        );
        let r2 = applied(
            apply(
                Some(&r),
                &sub_event(
                    "evt_2",
                    "customer.subscription.updated",
                    200,
                    "unpaid",
                    1000,
                ),
                now(),
            )
            .unwrap(),
        );
        assert_eq!(r2.status, S::Unpaid);
        assert_eq!(
            r2.anomalies.last().unwrap().kind,
            AnomalyKind::MissedTransition
        );
    }

    fn invoice_event(id: &str, ty: &str, created: i64, paid: bool) -> Event {
        let json = format!(
            r#"{{"id":"{id}","object":"event","type":"{ty}","created":{created},"livemode":false,
            "data":{{"object":{{"id":"in_{id}","object":"invoice","customer":"cus_1","subscription":"sub_1",
            "paid":{paid},"status":"{}","lines":{{"data":[{{"type":"subscription","subscription":"sub_1",
            "period":{{"start":{created},"end":{}}}}}]}}}}}}}}"#,
            if paid { "paid" } else { "open" },
            created + 1000
        );
        Event::parse_unverified(json.as_bytes()).unwrap()
    }

    /// The dunning clock starts at the first failure after the last payment,
    /// whatever order the events arrive in.
    #[test]
    fn dunning_clock_is_order_independent() {
        let base = applied(
            apply(
                None,
                &sub_event(
                    "evt_s",
                    "customer.subscription.updated",
                    1,
                    "past_due",
                    5000,
                ),
                now(),
            )
            .unwrap(),
        );
        let events = [
            invoice_event("evt_f1", "invoice.payment_failed", 10, false),
            invoice_event("evt_p", "invoice.paid", 15, true),
            invoice_event("evt_f2", "invoice.payment_failed", 20, false),
            invoice_event("evt_f3", "invoice.payment_failed", 30, false),
        ];
        let orders: [[usize; 4]; 6] = [
            [0, 1, 2, 3],
            [3, 2, 1, 0],
            [1, 0, 3, 2],
            [2, 0, 3, 1],
            [0, 2, 3, 1],
            [3, 1, 0, 2],
        ];
        for order in orders {
            let mut r = base.clone();
            for i in order {
                match apply(Some(&r), &events[i], now()).unwrap() {
                    Decision::Apply(a) => r = a.record,
                    Decision::Refetch {
                        fallback: Some(f), ..
                    } => r = f.record,
                    _ => {}
                }
            }
            assert_eq!(r.dunning_since(), Some(20), "{order:?}");
            assert_eq!(r.last_paid_at, Some(15));
        }
    }

    /// A paid first invoice restores an incomplete subscription (when newer
    /// than the snapshot that said incomplete), flagged for confirmation.
    #[test]
    fn paid_first_invoice_restores_incomplete() {
        let r = applied(
            apply(
                None,
                &sub_event(
                    "evt_c",
                    "customer.subscription.created",
                    100,
                    "incomplete",
                    5000,
                ),
                now(),
            )
            .unwrap(),
        );
        match apply(
            Some(&r),
            &invoice_event("evt_paid", "invoice.paid", 101, true),
            now(),
        )
        .unwrap()
        {
            Decision::Refetch {
                reason: RefetchReason::ConfirmRestore,
                fallback: Some(f),
                ..
            } => {
                assert_eq!(f.record.status, S::Active);
                assert!(f.record.needs_reconcile);
                assert_eq!(f.record.paid_through, Some(1101));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn anomalies_are_bounded() {
        let mut r = SubscriptionRecord::new("sub_1");
        for i in 0..40 {
            r.note(i, None, AnomalyKind::Diverged, String::new());
        }
        assert_eq!(r.anomalies.len(), MAX_ANOMALIES);
        assert_eq!(
            r.anomalies[0].at,
            40 - i64::try_from(MAX_ANOMALIES).unwrap()
        );
    }
}
