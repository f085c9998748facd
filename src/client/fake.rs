//! `FakeStripe` (feature `test-util`): a stateful fake that owns the true
//! subscription states, performs Stripe's lifecycle moves on a virtual clock,
//! emits the events Stripe would (several in the same second, in either API
//! shape), and answers [`StripeClient`] from its own truth.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! use stripe_webhook_guard::client::fake::{Card, FakeConfig, FakeStripe, Subscribe};
//! use stripe_webhook_guard::clock::ManualClock;
//! use stripe_webhook_guard::event::SubscriptionStatus;
//!
//! let clock = ManualClock::at_unix(1_700_000_000);
//! let stripe = FakeStripe::new(clock.clone(), FakeConfig::default());
//! let customer = stripe.create_customer();
//! let sub = stripe.subscribe(&customer, &Subscribe::default());
//! assert_eq!(stripe.truth(&sub).unwrap().status, SubscriptionStatus::Active);
//! // Checkout: created (incomplete), invoice paid, updated (active), session completed…
//! assert!(stripe.take_new_events().len() >= 4);
//! # }
//! ```

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

use async_trait::async_trait;
use serde_json::{Value, json};
use time::{Duration, OffsetDateTime};

use super::{
    ClientError, ClientErrorKind, EventListQuery, Page, StripeClient, SubscriptionListQuery,
};
use crate::clock::{Clock, ManualClock};
use crate::event::{ApiShape, Event, SubscriptionStatus, SubscriptionView};
use crate::sim::Rng;

const DAY: i64 = 86_400;
const HOUR: i64 = 3_600;

/// The API version string of a shape.
pub fn api_version(shape: ApiShape) -> &'static str {
    match shape {
        ApiShape::PreBasil => "2025-02-24.acacia",
        ApiShape::Basil => "2025-03-31.basil",
    }
}

/// Which shapes events are rendered in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShapeMix {
    /// Always one shape.
    Only(ApiShape),
    /// Each event in a random shape (a replay across an API upgrade).
    Mixed,
}

/// What happens when all payment retries fail (Stripe's subscription
/// setting).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterRetries {
    /// Mark the subscription `unpaid`.
    Unpaid,
    /// Cancel it.
    Cancel,
}

/// FakeStripe's settings.
#[derive(Debug, Clone)]
pub struct FakeConfig {
    /// Seed for ids and shape choices.
    pub seed: u64,
    /// Shapes of emitted events.
    pub shapes: ShapeMix,
    /// Shape of objects returned by the API (the client's pinned version).
    pub api_shape: ApiShape,
    /// Billing period length.
    pub period: Duration,
    /// Delays of payment retries after the first failure (Stripe's smart
    /// retries: 4 attempts over about a week by default).
    pub retry_delays: Vec<Duration>,
    /// What happens after the last retry fails.
    pub after_retries: AfterRetries,
    /// Entitlement feature keys granted while a subscription to a price is
    /// active or trialing.
    pub features: HashMap<String, Vec<String>>,
    /// Emit `invoice.created` / `invoice.finalized` (types with no
    /// subscription effect) too.
    pub noise_events: bool,
}

impl Default for FakeConfig {
    fn default() -> Self {
        Self {
            seed: 1,
            shapes: ShapeMix::Only(ApiShape::Basil),
            api_shape: ApiShape::Basil,
            period: Duration::days(30),
            retry_delays: vec![Duration::days(3), Duration::days(5), Duration::days(7)],
            after_retries: AfterRetries::Unpaid,
            features: HashMap::new(),
            noise_events: true,
        }
    }
}

/// A customer's payment method.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Card {
    /// Payments succeed.
    #[default]
    Works,
    /// Payments are declined.
    Declines,
    /// No payment method (a trial then pauses).
    Missing,
}

/// How to subscribe.
#[derive(Debug, Clone)]
pub struct Subscribe {
    /// The price.
    pub price: String,
    /// A free trial of this many days.
    pub trial_days: Option<u32>,
    /// The application's reference passed to Checkout.
    pub client_reference_id: Option<String>,
    /// Through Checkout (emits `checkout.session.completed`).
    pub checkout: bool,
}

impl Default for Subscribe {
    fn default() -> Self {
        Self {
            price: "price_basic".into(),
            trial_days: None,
            client_reference_id: None,
            checkout: true,
        }
    }
}

/// An event FakeStripe emitted: the parsed event and its webhook body.
#[derive(Debug, Clone)]
pub struct FakeEvent {
    /// The event.
    pub event: Event,
    /// The JSON body a webhook delivery carries.
    pub body: String,
}

#[derive(Debug, Clone)]
struct Sub {
    id: String,
    customer: String,
    price: String,
    item_id: String,
    status: SubscriptionStatus,
    created: i64,
    period_start: i64,
    period_end: i64,
    trial_start: Option<i64>,
    trial_end: Option<i64>,
    cancel_at_period_end: bool,
    cancel_at: Option<i64>,
    canceled_at: Option<i64>,
    ended_at: Option<i64>,
    pause_collection: Option<String>,
    latest_invoice: Option<String>,
    /// The open invoice being retried, and how many retries were made.
    dunning: Option<(String, usize)>,
    /// Bumped on every schedule change so stale scheduled actions are skipped.
    generation: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Action {
    Renew,
    TrialEnd,
    TrialWillEnd,
    Retry,
    ExpireIncomplete,
    CancelAtPeriodEnd,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Scheduled {
    at: i64,
    seq: u64,
    sub: String,
    generation: u64,
    action: Action,
}

#[derive(Debug, Clone)]
struct Logged {
    event: Event,
    body: String,
    delivered: bool,
}

struct Inner {
    rng: Rng,
    counter: u64,
    customers: BTreeMap<String, Card>,
    subs: BTreeMap<String, Sub>,
    schedule: BinaryHeap<Reverse<Scheduled>>,
    by_event: HashMap<String, usize>,
    log: Vec<Logged>,
    taken: usize,
    entitlements: HashMap<String, Vec<String>>,
    rate_limit_every: u64,
    fail_retrieve: bool,
}

/// The fake. Share it as `Arc<FakeStripe>`; every method takes `&self`.
pub struct FakeStripe {
    inner: Mutex<Inner>,
    clock: ManualClock,
    config: FakeConfig,
    requests: AtomicU64,
    rate_limited: AtomicU64,
}

impl std::fmt::Debug for FakeStripe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let inner = self.lock();
        f.debug_struct("FakeStripe")
            .field("subscriptions", &inner.subs.len())
            .field("events", &inner.log.len())
            .finish_non_exhaustive()
    }
}

impl FakeStripe {
    /// A fake on `clock` (FakeStripe moves it when scheduled actions run).
    pub fn new(clock: ManualClock, config: FakeConfig) -> Self {
        Self {
            inner: Mutex::new(Inner {
                rng: Rng::new(config.seed),
                counter: 0,
                customers: BTreeMap::new(),
                subs: BTreeMap::new(),
                schedule: BinaryHeap::new(),
                by_event: HashMap::new(),
                log: Vec::new(),
                taken: 0,
                entitlements: HashMap::new(),
                rate_limit_every: 0,
                fail_retrieve: false,
            }),
            clock,
            config,
            requests: AtomicU64::new(0),
            rate_limited: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn now(&self) -> i64 {
        self.clock.now().unix_timestamp()
    }

    /// The clock.
    pub fn clock(&self) -> &ManualClock {
        &self.clock
    }

    /// Answer every `n`-th API request with 429 (0 turns it off).
    pub fn rate_limit_every(&self, n: u64) {
        self.lock().rate_limit_every = n;
    }

    /// Make `retrieve_subscription` fail with a transport error (or stop).
    pub fn fail_retrievals(&self, fail: bool) {
        self.lock().fail_retrieve = fail;
    }

    /// API requests served (including rate-limited ones).
    pub fn request_count(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// Requests answered with 429.
    pub fn rate_limited_count(&self) -> u64 {
        self.rate_limited.load(Ordering::Relaxed)
    }

    /// Creates a customer with a working card.
    pub fn create_customer(&self) -> String {
        let mut inner = self.lock();
        let id = next_id(&mut inner, "cus");
        inner.customers.insert(id.clone(), Card::Works);
        id
    }

    /// Sets a customer's payment method.
    pub fn set_card(&self, customer: &str, card: Card) {
        self.lock().customers.insert(customer.to_owned(), card);
    }

    /// The true subscription, rendered in the API shape.
    pub fn truth(&self, sub: &str) -> Option<SubscriptionView> {
        let inner = self.lock();
        let s = inner.subs.get(sub)?;
        SubscriptionView::from_json(&render_subscription(s, self.config.api_shape).to_string()).ok()
    }

    /// Every true subscription.
    pub fn truths(&self) -> Vec<SubscriptionView> {
        let inner = self.lock();
        inner
            .subs
            .values()
            .filter_map(|s| {
                SubscriptionView::from_json(
                    &render_subscription(s, self.config.api_shape).to_string(),
                )
                .ok()
            })
            .collect()
    }

    /// Subscription ids.
    pub fn subscription_ids(&self) -> Vec<String> {
        self.lock().subs.keys().cloned().collect()
    }

    /// The active entitlement keys of a customer.
    pub fn entitlements(&self, customer: &str) -> Vec<String> {
        self.lock()
            .entitlements
            .get(customer)
            .cloned()
            .unwrap_or_default()
    }

    /// Events emitted since the last call.
    pub fn take_new_events(&self) -> Vec<FakeEvent> {
        let mut inner = self.lock();
        let start = inner.taken;
        inner.taken = inner.log.len();
        inner.log[start..]
            .iter()
            .map(|l| FakeEvent {
                event: l.event.clone(),
                body: l.body.clone(),
            })
            .collect()
    }

    /// Every event emitted so far.
    pub fn all_events(&self) -> Vec<FakeEvent> {
        self.lock()
            .log
            .iter()
            .map(|l| FakeEvent {
                event: l.event.clone(),
                body: l.body.clone(),
            })
            .collect()
    }

    /// Records that a webhook delivery of `event_id` got a 2xx (for the
    /// `delivery_success` filter).
    pub fn mark_delivered(&self, event_id: &str) {
        let mut inner = self.lock();
        if let Some(&i) = inner.by_event.get(event_id)
            && let Some(l) = inner.log.get_mut(i)
        {
            l.delivered = true;
        }
    }

    /// Subscribes a customer. Payment follows the customer's card: works →
    /// active; declines → incomplete (expires after 23 hours); with a trial
    /// the card is charged at the trial's end.
    pub fn subscribe(&self, customer: &str, opts: &Subscribe) -> String {
        let now = self.now();
        let mut inner = self.lock();
        let card = inner.customers.get(customer).copied().unwrap_or_default();
        let id = next_id(&mut inner, "sub");
        let item_id = next_id(&mut inner, "si");
        let period = self.config.period.whole_seconds();
        let mut sub = Sub {
            id: id.clone(),
            customer: customer.to_owned(),
            price: opts.price.clone(),
            item_id,
            status: SubscriptionStatus::Incomplete,
            created: now,
            period_start: now,
            period_end: now + period,
            trial_start: None,
            trial_end: None,
            cancel_at_period_end: false,
            cancel_at: None,
            canceled_at: None,
            ended_at: None,
            pause_collection: None,
            latest_invoice: None,
            dunning: None,
            generation: 0,
        };
        let invoice = next_id(&mut inner, "in");
        sub.latest_invoice = Some(invoice.clone());
        let session = next_id(&mut inner, "cs");
        if let Some(days) = opts.trial_days {
            let end = now + i64::from(days) * DAY;
            sub.status = SubscriptionStatus::Trialing;
            sub.trial_start = Some(now);
            sub.trial_end = Some(end);
            sub.period_end = end;
            inner.subs.insert(id.clone(), sub.clone());
            self.emit_sub(&mut inner, "customer.subscription.created", &sub, None);
            self.emit_paid(
                &mut inner,
                &sub,
                &invoice,
                "subscription_create",
                (now, end),
            );
            if opts.checkout {
                self.emit_checkout(
                    &mut inner,
                    &session,
                    &sub,
                    opts.client_reference_id.as_deref(),
                    "no_payment_required",
                );
            }
            // TrialEnd first: scheduling it starts a new generation, which
            // TrialWillEnd (scheduled without one) then belongs to.
            self.schedule(&mut inner, &id, end, Action::TrialEnd);
            self.schedule(&mut inner, &id, end - 3 * DAY, Action::TrialWillEnd);
        } else {
            inner.subs.insert(id.clone(), sub.clone());
            self.emit_sub(&mut inner, "customer.subscription.created", &sub, None);
            if card == Card::Works {
                self.emit_paid(
                    &mut inner,
                    &sub,
                    &invoice,
                    "subscription_create",
                    (now, sub.period_end),
                );
                let before = sub.clone();
                sub.status = SubscriptionStatus::Active;
                inner.subs.insert(id.clone(), sub.clone());
                self.emit_sub(
                    &mut inner,
                    "customer.subscription.updated",
                    &sub,
                    Some(&before),
                );
                if opts.checkout {
                    self.emit_checkout(
                        &mut inner,
                        &session,
                        &sub,
                        opts.client_reference_id.as_deref(),
                        "paid",
                    );
                }
                self.schedule(&mut inner, &id, sub.period_end, Action::Renew);
            } else {
                self.emit_invoice(
                    &mut inner,
                    "invoice.payment_failed",
                    &sub,
                    &invoice,
                    false,
                    "subscription_create",
                    (now, sub.period_end),
                );
                self.schedule(&mut inner, &id, now + 23 * HOUR, Action::ExpireIncomplete);
            }
        }
        self.sync_entitlements(&mut inner, customer);
        id
    }

    /// The customer pays the open invoice now (after updating their card):
    /// a past-due, unpaid or incomplete subscription becomes active.
    pub fn pay_open_invoice(&self, sub_id: &str) {
        let now = self.now();
        let mut inner = self.lock();
        let Some(mut sub) = inner.subs.get(sub_id).cloned() else {
            return;
        };
        if !matches!(
            sub.status,
            SubscriptionStatus::PastDue
                | SubscriptionStatus::Unpaid
                | SubscriptionStatus::Incomplete
        ) {
            return;
        }
        inner.customers.insert(sub.customer.clone(), Card::Works);
        let invoice = sub
            .latest_invoice
            .clone()
            .unwrap_or_else(|| next_id(&mut inner, "in"));
        self.emit_paid(
            &mut inner,
            &sub,
            &invoice,
            "subscription_cycle",
            (sub.period_start, sub.period_end),
        );
        let before = sub.clone();
        sub.status = SubscriptionStatus::Active;
        sub.dunning = None;
        sub.generation += 1;
        inner.subs.insert(sub.id.clone(), sub.clone());
        self.emit_sub(
            &mut inner,
            "customer.subscription.updated",
            &sub,
            Some(&before),
        );
        let end = sub.period_end.max(now + 1);
        self.schedule(&mut inner, sub_id, end, Action::Renew);
        let customer = sub.customer.clone();
        self.sync_entitlements(&mut inner, &customer);
    }

    /// Cancels now.
    pub fn cancel_now(&self, sub_id: &str) {
        let now = self.now();
        let mut inner = self.lock();
        let Some(mut sub) = inner.subs.get(sub_id).cloned() else {
            return;
        };
        if sub.status.is_terminal() {
            return;
        }
        let before = sub.clone();
        sub.status = SubscriptionStatus::Canceled;
        sub.canceled_at = Some(now);
        sub.ended_at = Some(now);
        sub.generation += 1;
        inner.subs.insert(sub.id.clone(), sub.clone());
        self.emit_sub(
            &mut inner,
            "customer.subscription.deleted",
            &sub,
            Some(&before),
        );
        let customer = sub.customer.clone();
        self.sync_entitlements(&mut inner, &customer);
    }

    /// Sets or clears `cancel_at_period_end`.
    pub fn cancel_at_period_end(&self, sub_id: &str, cancel: bool) {
        let now = self.now();
        let mut inner = self.lock();
        let Some(mut sub) = inner.subs.get(sub_id).cloned() else {
            return;
        };
        if sub.status.is_terminal() || sub.cancel_at_period_end == cancel {
            return;
        }
        let before = sub.clone();
        sub.cancel_at_period_end = cancel;
        sub.cancel_at = cancel.then_some(sub.period_end);
        sub.canceled_at = cancel.then_some(now);
        sub.generation += 1;
        inner.subs.insert(sub.id.clone(), sub.clone());
        self.emit_sub(
            &mut inner,
            "customer.subscription.updated",
            &sub,
            Some(&before),
        );
        let (at, action) = if cancel {
            (sub.period_end, Action::CancelAtPeriodEnd)
        } else {
            (sub.period_end, Action::Renew)
        };
        if matches!(sub.status, SubscriptionStatus::Trialing) && !cancel {
            self.schedule(&mut inner, sub_id, at, Action::TrialEnd);
        } else {
            self.schedule(&mut inner, sub_id, at, action);
        }
    }

    /// Pauses the subscription (status `paused`, `customer.subscription.paused`).
    pub fn pause(&self, sub_id: &str) {
        let mut inner = self.lock();
        let Some(mut sub) = inner.subs.get(sub_id).cloned() else {
            return;
        };
        if !matches!(
            sub.status,
            SubscriptionStatus::Active | SubscriptionStatus::Trialing | SubscriptionStatus::PastDue
        ) {
            return;
        }
        let before = sub.clone();
        sub.status = SubscriptionStatus::Paused;
        sub.dunning = None;
        sub.generation += 1;
        inner.subs.insert(sub.id.clone(), sub.clone());
        self.emit_sub(
            &mut inner,
            "customer.subscription.paused",
            &sub,
            Some(&before),
        );
        let customer = sub.customer.clone();
        self.sync_entitlements(&mut inner, &customer);
    }

    /// Resumes a paused subscription: a new period starts now and is charged.
    pub fn resume(&self, sub_id: &str) {
        let now = self.now();
        let mut inner = self.lock();
        let Some(mut sub) = inner.subs.get(sub_id).cloned() else {
            return;
        };
        if sub.status != SubscriptionStatus::Paused {
            return;
        }
        let card = inner
            .customers
            .get(&sub.customer)
            .copied()
            .unwrap_or_default();
        let before = sub.clone();
        let invoice = next_id(&mut inner, "in");
        sub.latest_invoice = Some(invoice.clone());
        sub.period_start = now;
        sub.period_end = now + self.config.period.whole_seconds();
        sub.generation += 1;
        if card == Card::Works {
            sub.status = SubscriptionStatus::Active;
            inner.subs.insert(sub.id.clone(), sub.clone());
            self.emit_invoice(
                &mut inner,
                "invoice.paid",
                &sub,
                &invoice,
                true,
                "subscription_cycle",
                (now, sub.period_end),
            );
            self.emit_sub(
                &mut inner,
                "customer.subscription.resumed",
                &sub,
                Some(&before),
            );
            self.schedule(&mut inner, sub_id, sub.period_end, Action::Renew);
        } else {
            sub.status = SubscriptionStatus::PastDue;
            sub.dunning = Some((invoice.clone(), 0));
            inner.subs.insert(sub.id.clone(), sub.clone());
            self.emit_invoice(
                &mut inner,
                "invoice.payment_failed",
                &sub,
                &invoice,
                false,
                "subscription_cycle",
                (now, sub.period_end),
            );
            self.emit_sub(
                &mut inner,
                "customer.subscription.resumed",
                &sub,
                Some(&before),
            );
            self.schedule_retry(&mut inner, &sub);
        }
        let customer = sub.customer.clone();
        self.sync_entitlements(&mut inner, &customer);
    }

    /// Sets (`Some(behavior)`) or clears `pause_collection`; the status is
    /// unchanged and renewals go unpaid while it is set.
    pub fn pause_collection(&self, sub_id: &str, behavior: Option<&str>) {
        let mut inner = self.lock();
        let Some(mut sub) = inner.subs.get(sub_id).cloned() else {
            return;
        };
        if sub.status.is_terminal() {
            return;
        }
        let before = sub.clone();
        sub.pause_collection = behavior.map(str::to_owned);
        inner.subs.insert(sub.id.clone(), sub.clone());
        self.emit_sub(
            &mut inner,
            "customer.subscription.updated",
            &sub,
            Some(&before),
        );
    }

    /// Puts an active subscription on a trial until `days` from now.
    pub fn set_trial(&self, sub_id: &str, days: u32) {
        let now = self.now();
        let mut inner = self.lock();
        let Some(mut sub) = inner.subs.get(sub_id).cloned() else {
            return;
        };
        if sub.status != SubscriptionStatus::Active {
            return;
        }
        let before = sub.clone();
        let end = now + i64::from(days) * DAY;
        sub.status = SubscriptionStatus::Trialing;
        sub.trial_start = Some(now);
        sub.trial_end = Some(end);
        sub.period_start = now;
        sub.period_end = end;
        sub.generation += 1;
        inner.subs.insert(sub.id.clone(), sub.clone());
        self.emit_sub(
            &mut inner,
            "customer.subscription.updated",
            &sub,
            Some(&before),
        );
        self.schedule(&mut inner, sub_id, end, Action::TrialEnd);
    }

    /// Moves the clock forward by `by`, running every scheduled action on
    /// the way at its own time.
    pub fn advance(&self, by: Duration) {
        let target = self.clock.now().saturating_add(by);
        self.advance_to(target);
    }

    /// Moves the clock to `target`, running scheduled actions due on the way.
    pub fn advance_to(&self, target: OffsetDateTime) {
        while self.run_next_due(target.unix_timestamp()) {}
        if self.clock.now() < target {
            self.clock.set(target);
        }
    }

    /// The time of the next scheduled action, if any.
    pub fn next_action_at(&self) -> Option<i64> {
        self.lock().schedule.peek().map(|Reverse(s)| s.at)
    }

    /// Runs the earliest action due at or before `until`. Returns whether one ran.
    pub fn run_next_due(&self, until: i64) -> bool {
        let mut inner = self.lock();
        if inner.schedule.peek().is_none_or(|Reverse(s)| s.at > until) {
            return false;
        }
        let Some(Reverse(job)) = inner.schedule.pop() else {
            return false;
        };
        if self.clock.now().unix_timestamp() < job.at
            && let Ok(t) = OffsetDateTime::from_unix_timestamp(job.at)
        {
            self.clock.set(t);
        }
        let Some(sub) = inner.subs.get(&job.sub).cloned() else {
            return true;
        };
        if sub.generation != job.generation {
            return true;
        }
        self.run(&mut inner, sub, job.action);
        true
    }

    #[allow(clippy::unused_self)] // a method for symmetry with the other emitters
    fn schedule(&self, inner: &mut Inner, sub: &str, at: i64, action: Action) {
        let Some(s) = inner.subs.get_mut(sub) else {
            return;
        };
        if !matches!(action, Action::TrialWillEnd) {
            s.generation += 1;
        }
        let generation = s.generation;
        inner.counter += 1;
        let seq = inner.counter;
        inner.schedule.push(Reverse(Scheduled {
            at,
            seq,
            sub: sub.to_owned(),
            generation,
            action,
        }));
    }

    fn schedule_retry(&self, inner: &mut Inner, sub: &Sub) {
        let retries = sub.dunning.as_ref().map_or(0, |d| d.1);
        if let Some(delay) = self.config.retry_delays.get(retries) {
            let at = self.now() + delay.whole_seconds();
            self.schedule(inner, &sub.id, at, Action::Retry);
        } else {
            self.exhausted(inner, sub.clone());
        }
    }

    fn exhausted(&self, inner: &mut Inner, mut sub: Sub) {
        let before = sub.clone();
        sub.dunning = None;
        sub.generation += 1;
        match self.config.after_retries {
            AfterRetries::Unpaid => {
                sub.status = SubscriptionStatus::Unpaid;
                inner.subs.insert(sub.id.clone(), sub.clone());
                self.emit_sub(inner, "customer.subscription.updated", &sub, Some(&before));
            }
            AfterRetries::Cancel => {
                let now = self.now();
                sub.status = SubscriptionStatus::Canceled;
                sub.canceled_at = Some(now);
                sub.ended_at = Some(now);
                inner.subs.insert(sub.id.clone(), sub.clone());
                self.emit_sub(inner, "customer.subscription.deleted", &sub, Some(&before));
            }
        }
        let customer = sub.customer.clone();
        self.sync_entitlements(inner, &customer);
    }

    fn run(&self, inner: &mut Inner, mut sub: Sub, action: Action) {
        let now = self.now();
        let card = inner
            .customers
            .get(&sub.customer)
            .copied()
            .unwrap_or_default();
        let period = self.config.period.whole_seconds();
        match action {
            Action::TrialWillEnd => {
                if sub.status == SubscriptionStatus::Trialing {
                    self.emit_sub(inner, "customer.subscription.trial_will_end", &sub, None);
                }
            }
            Action::ExpireIncomplete => {
                if sub.status == SubscriptionStatus::Incomplete {
                    let before = sub.clone();
                    sub.status = SubscriptionStatus::IncompleteExpired;
                    sub.ended_at = Some(now);
                    inner.subs.insert(sub.id.clone(), sub.clone());
                    self.emit_sub(inner, "customer.subscription.updated", &sub, Some(&before));
                }
            }
            Action::CancelAtPeriodEnd => {
                if !sub.status.is_terminal() {
                    let before = sub.clone();
                    sub.status = SubscriptionStatus::Canceled;
                    sub.ended_at = Some(now);
                    inner.subs.insert(sub.id.clone(), sub.clone());
                    self.emit_sub(inner, "customer.subscription.deleted", &sub, Some(&before));
                    let customer = sub.customer.clone();
                    self.sync_entitlements(inner, &customer);
                }
            }
            Action::TrialEnd => {
                if sub.status != SubscriptionStatus::Trialing {
                    return;
                }
                if sub.cancel_at_period_end {
                    self.run(inner, sub, Action::CancelAtPeriodEnd);
                    return;
                }
                let before = sub.clone();
                if card == Card::Missing {
                    sub.status = SubscriptionStatus::Paused;
                    inner.subs.insert(sub.id.clone(), sub.clone());
                    self.emit_sub(inner, "customer.subscription.paused", &sub, Some(&before));
                    let customer = sub.customer.clone();
                    self.sync_entitlements(inner, &customer);
                    return;
                }
                self.renew(inner, sub, &before, card, period);
            }
            Action::Renew => {
                if !matches!(
                    sub.status,
                    SubscriptionStatus::Active | SubscriptionStatus::PastDue
                ) {
                    return;
                }
                if sub.cancel_at_period_end {
                    self.run(inner, sub, Action::CancelAtPeriodEnd);
                    return;
                }
                let before = sub.clone();
                self.renew(inner, sub, &before, card, period);
            }
            Action::Retry => {
                let Some((invoice, retries)) = sub.dunning.clone() else {
                    return;
                };
                if !matches!(sub.status, SubscriptionStatus::PastDue) {
                    return;
                }
                if card == Card::Works {
                    self.emit_paid(
                        inner,
                        &sub,
                        &invoice,
                        "subscription_cycle",
                        (sub.period_start, sub.period_end),
                    );
                    let before = sub.clone();
                    sub.status = SubscriptionStatus::Active;
                    sub.dunning = None;
                    inner.subs.insert(sub.id.clone(), sub.clone());
                    self.emit_sub(inner, "customer.subscription.updated", &sub, Some(&before));
                    let end = sub.period_end;
                    self.schedule(inner, &sub.id, end.max(now + 1), Action::Renew);
                    let customer = sub.customer.clone();
                    self.sync_entitlements(inner, &customer);
                } else {
                    sub.dunning = Some((invoice.clone(), retries + 1));
                    inner.subs.insert(sub.id.clone(), sub.clone());
                    self.emit_invoice(
                        inner,
                        "invoice.payment_failed",
                        &sub,
                        &invoice,
                        false,
                        "subscription_cycle",
                        (sub.period_start, sub.period_end),
                    );
                    self.schedule_retry(inner, &sub);
                }
            }
        }
    }

    /// A new period starts now (the renewal or the trial's end) and its
    /// invoice is charged (or not, with paused collection).
    fn renew(&self, inner: &mut Inner, mut sub: Sub, before: &Sub, card: Card, period: i64) {
        let now = self.now();
        let invoice = next_id(inner, "in");
        sub.period_start = now;
        sub.period_end = now + period;
        sub.latest_invoice = Some(invoice.clone());
        if sub.status == SubscriptionStatus::Trialing {
            sub.status = SubscriptionStatus::Active;
        }
        if self.config.noise_events {
            self.emit_noise(inner, "invoice.created", &sub, &invoice);
        }
        if sub.pause_collection.is_some() {
            // No payment while collection is paused; the status stays.
            inner.subs.insert(sub.id.clone(), sub.clone());
            self.emit_sub(inner, "customer.subscription.updated", &sub, Some(before));
            self.schedule(inner, &sub.id, sub.period_end, Action::Renew);
            return;
        }
        if card == Card::Works {
            inner.subs.insert(sub.id.clone(), sub.clone());
            self.emit_sub(inner, "customer.subscription.updated", &sub, Some(before));
            if self.config.noise_events {
                self.emit_noise(inner, "invoice.finalized", &sub, &invoice);
            }
            self.emit_paid(
                inner,
                &sub,
                &invoice,
                "subscription_cycle",
                (sub.period_start, sub.period_end),
            );
            self.schedule(inner, &sub.id, sub.period_end, Action::Renew);
        } else {
            sub.status = SubscriptionStatus::PastDue;
            sub.dunning = Some((invoice.clone(), 0));
            inner.subs.insert(sub.id.clone(), sub.clone());
            self.emit_invoice(
                inner,
                "invoice.payment_failed",
                &sub,
                &invoice,
                false,
                "subscription_cycle",
                (sub.period_start, sub.period_end),
            );
            self.emit_sub(inner, "customer.subscription.updated", &sub, Some(before));
            self.schedule_retry(inner, &sub);
        }
        let customer = sub.customer.clone();
        self.sync_entitlements(inner, &customer);
    }

    fn shape(&self, inner: &mut Inner) -> ApiShape {
        match self.config.shapes {
            ShapeMix::Only(s) => s,
            ShapeMix::Mixed => {
                if inner.rng.next_u64().is_multiple_of(2) {
                    ApiShape::PreBasil
                } else {
                    ApiShape::Basil
                }
            }
        }
    }

    fn emit(
        &self,
        inner: &mut Inner,
        event_type: &str,
        shape: ApiShape,
        object: Value,
        previous: Option<Value>,
    ) {
        let id = next_id(inner, "evt");
        let mut data = serde_json::Map::new();
        data.insert("object".into(), object);
        let mut data = Value::Object(data);
        if let Some(p) = previous.filter(|p| p.as_object().is_some_and(|o| !o.is_empty())) {
            data["previous_attributes"] = p;
        }
        let body = json!({
            "id": id,
            "object": "event",
            "api_version": api_version(shape),
            "created": self.now(),
            "data": data,
            "livemode": false,
            "pending_webhooks": 1,
            "request": { "id": null, "idempotency_key": null },
            "type": event_type,
        })
        .to_string();
        // The body is built here from valid JSON, so it always parses.
        if let Ok(event) = Event::parse_unverified_with_limit(body.as_bytes(), usize::MAX) {
            let index = inner.log.len();
            inner.by_event.insert(event.id().to_owned(), index);
            inner.log.push(Logged {
                event,
                body,
                delivered: false,
            });
        }
    }

    fn emit_sub(&self, inner: &mut Inner, event_type: &str, sub: &Sub, before: Option<&Sub>) {
        let shape = self.shape(inner);
        let object = render_subscription(sub, shape);
        let previous = before.map(|b| previous_attributes(&render_subscription(b, shape), &object));
        self.emit(inner, event_type, shape, object, previous);
    }

    /// A successful payment: `invoice.paid` then `invoice.payment_succeeded`,
    /// in the same second, as Stripe sends them.
    fn emit_paid(
        &self,
        inner: &mut Inner,
        sub: &Sub,
        invoice: &str,
        reason: &str,
        period: (i64, i64),
    ) {
        self.emit_invoice(inner, "invoice.paid", sub, invoice, true, reason, period);
        self.emit_invoice(
            inner,
            "invoice.payment_succeeded",
            sub,
            invoice,
            true,
            reason,
            period,
        );
    }

    #[allow(clippy::too_many_arguments)]
    fn emit_invoice(
        &self,
        inner: &mut Inner,
        event_type: &str,
        sub: &Sub,
        invoice: &str,
        paid: bool,
        reason: &str,
        period: (i64, i64),
    ) {
        let shape = self.shape(inner);
        let object = render_invoice(sub, invoice, paid, reason, period, self.now(), shape);
        self.emit(inner, event_type, shape, object, None);
    }

    fn emit_noise(&self, inner: &mut Inner, event_type: &str, sub: &Sub, invoice: &str) {
        let shape = self.shape(inner);
        let mut object = render_invoice(
            sub,
            invoice,
            false,
            "subscription_cycle",
            (sub.period_start, sub.period_end),
            self.now(),
            shape,
        );
        object["status"] = json!(if event_type == "invoice.created" {
            "draft"
        } else {
            "open"
        });
        self.emit(inner, event_type, shape, object, None);
    }

    fn emit_checkout(
        &self,
        inner: &mut Inner,
        session: &str,
        sub: &Sub,
        reference: Option<&str>,
        payment_status: &str,
    ) {
        let shape = self.shape(inner);
        let object = json!({
            "id": session,
            "object": "checkout.session",
            "client_reference_id": reference,
            "customer": sub.customer,
            "subscription": sub.id,
            "mode": "subscription",
            "status": "complete",
            "payment_status": payment_status,
            "created": self.now(),
            "livemode": false,
        });
        self.emit(inner, "checkout.session.completed", shape, object, None);
    }

    fn sync_entitlements(&self, inner: &mut Inner, customer: &str) {
        if self.config.features.is_empty() {
            return;
        }
        let mut keys: Vec<String> = inner
            .subs
            .values()
            .filter(|s| s.customer == customer)
            .filter(|s| {
                matches!(
                    s.status,
                    SubscriptionStatus::Active
                        | SubscriptionStatus::Trialing
                        | SubscriptionStatus::PastDue
                )
            })
            .flat_map(|s| {
                self.config
                    .features
                    .get(&s.price)
                    .cloned()
                    .unwrap_or_default()
            })
            .collect();
        keys.sort();
        keys.dedup();
        if inner.entitlements.get(customer) == Some(&keys) {
            return;
        }
        inner.entitlements.insert(customer.to_owned(), keys.clone());
        let shape = self.shape(inner);
        let data: Vec<Value> = keys
            .iter()
            .map(|k| json!({"id": format!("ent_{k}"), "object": "entitlements.active_entitlement", "feature": format!("feat_{k}"), "lookup_key": k, "livemode": false}))
            .collect();
        let object = json!({
            "object": "entitlements.active_entitlement_summary",
            "customer": customer,
            "livemode": false,
            "entitlements": {"object": "list", "data": data, "has_more": false, "url": "/v1/customer/entitlements"},
        });
        self.emit(
            inner,
            "entitlements.active_entitlement_summary.updated",
            shape,
            object,
            None,
        );
    }

    fn gate(&self) -> Result<(), ClientError> {
        let n = self.requests.fetch_add(1, Ordering::Relaxed) + 1;
        let every = self.lock().rate_limit_every;
        if every > 0 && n.is_multiple_of(every) {
            self.rate_limited.fetch_add(1, Ordering::Relaxed);
            return Err(
                ClientError::new(ClientErrorKind::RateLimited, "rate limited (fake)")
                    .with_status(429)
                    .with_retry_after(Duration::seconds(1)),
            );
        }
        Ok(())
    }
}

fn next_id(inner: &mut Inner, prefix: &str) -> String {
    inner.counter += 1;
    let r = inner.rng.next_u64();
    format!("{prefix}_{}{:06}", base62(r), inner.counter)
}

fn base62(mut n: u64) -> String {
    const ALPHABET: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    let mut out = Vec::with_capacity(11);
    for _ in 0..10 {
        out.push(ALPHABET[(n % 62) as usize]);
        n /= 62;
    }
    String::from_utf8(out).unwrap_or_default()
}

fn render_subscription(s: &Sub, shape: ApiShape) -> Value {
    let mut item = json!({
        "id": s.item_id,
        "object": "subscription_item",
        "price": {"id": s.price, "object": "price"},
        "quantity": 1,
        "subscription": s.id,
    });
    let mut object = json!({
        "id": s.id,
        "object": "subscription",
        "customer": s.customer,
        "status": s.status.as_str(),
        "created": s.created,
        "cancel_at_period_end": s.cancel_at_period_end,
        "cancel_at": s.cancel_at,
        "canceled_at": s.canceled_at,
        "ended_at": s.ended_at,
        "trial_start": s.trial_start,
        "trial_end": s.trial_end,
        "latest_invoice": s.latest_invoice,
        "livemode": false,
        "pause_collection": s.pause_collection.as_ref().map(|b| json!({"behavior": b, "resumes_at": null})),
    });
    match shape {
        ApiShape::PreBasil => {
            object["current_period_start"] = json!(s.period_start);
            object["current_period_end"] = json!(s.period_end);
        }
        ApiShape::Basil => {
            item["current_period_start"] = json!(s.period_start);
            item["current_period_end"] = json!(s.period_end);
        }
    }
    object["items"] = json!({"object": "list", "data": [item], "has_more": false});
    object
}

fn render_invoice(
    s: &Sub,
    invoice: &str,
    paid: bool,
    reason: &str,
    period: (i64, i64),
    now: i64,
    shape: ApiShape,
) -> Value {
    let status = if paid { "paid" } else { "open" };
    match shape {
        ApiShape::PreBasil => json!({
            "id": invoice, "object": "invoice", "customer": s.customer, "subscription": s.id,
            "status": status, "paid": paid, "billing_reason": reason, "created": now,
            "amount_paid": if paid { 2000 } else { 0 },
            "lines": {"object": "list", "data": [{
                "id": format!("il_{invoice}"), "object": "line_item", "type": "subscription",
                "subscription": s.id, "period": {"start": period.0, "end": period.1}}]},
        }),
        ApiShape::Basil => json!({
            "id": invoice, "object": "invoice", "customer": s.customer, "subscription": null,
            "parent": {"type": "subscription_details", "subscription_details": {"subscription": s.id}},
            "status": status, "billing_reason": reason, "created": now,
            "amount_paid": if paid { 2000 } else { 0 },
            "lines": {"object": "list", "data": [{
                "id": format!("il_{invoice}"), "object": "line_item",
                "parent": {"type": "subscription_item_details",
                    "subscription_item_details": {"subscription": s.id, "subscription_item": s.item_id}},
                "period": {"start": period.0, "end": period.1}}]},
        }),
    }
}

/// The top-level fields of `before` that differ from `after` (Stripe's
/// `previous_attributes`).
fn previous_attributes(before: &Value, after: &Value) -> Value {
    let (Some(b), Some(a)) = (before.as_object(), after.as_object()) else {
        return json!({});
    };
    let diff: serde_json::Map<String, Value> = b
        .iter()
        .filter(|(k, v)| a.get(*k) != Some(*v))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    Value::Object(diff)
}

#[async_trait]
impl StripeClient for FakeStripe {
    async fn retrieve_subscription(&self, id: &str) -> Result<SubscriptionView, ClientError> {
        self.gate()?;
        if self.lock().fail_retrieve {
            return Err(ClientError::new(
                ClientErrorKind::Transport,
                "connection reset (fake)",
            ));
        }
        self.truth(id).ok_or_else(|| {
            ClientError::new(ClientErrorKind::NotFound, "no such subscription").with_status(404)
        })
    }

    async fn list_subscriptions(
        &self,
        query: &SubscriptionListQuery,
    ) -> Result<Page<SubscriptionView>, ClientError> {
        self.gate()?;
        let limit = if query.limit == 0 {
            100
        } else {
            query.limit.min(100)
        } as usize;
        let inner = self.lock();
        // Newest first, like Stripe.
        let mut subs: Vec<&Sub> = inner
            .subs
            .values()
            .filter(|s| query.customer.as_ref().is_none_or(|c| *c == s.customer))
            .collect();
        subs.sort_by(|a, b| (b.created, &b.id).cmp(&(a.created, &a.id)));
        let start = match &query.starting_after {
            Some(after) => subs
                .iter()
                .position(|s| s.id == *after)
                .map_or(subs.len(), |p| p + 1),
            None => 0,
        };
        let page: Vec<SubscriptionView> = subs
            .iter()
            .skip(start)
            .take(limit)
            .filter_map(|s| {
                SubscriptionView::from_json(
                    &render_subscription(s, self.config.api_shape).to_string(),
                )
                .ok()
            })
            .collect();
        Ok(Page {
            has_more: start + page.len() < subs.len(),
            data: page,
        })
    }

    async fn list_events(&self, query: &EventListQuery) -> Result<Page<Event>, ClientError> {
        self.gate()?;
        let limit = if query.limit == 0 {
            100
        } else {
            query.limit.min(100)
        } as usize;
        let now = self.now();
        let inner = self.lock();
        // Stripe keeps events for 30 days and lists them newest first.
        let matching: Vec<&Logged> = inner
            .log
            .iter()
            .rev()
            .filter(|l| l.event.created() >= now - 30 * DAY)
            .filter(|l| query.created_gte.is_none_or(|g| l.event.created() >= g))
            .filter(|l| {
                query.types.is_empty()
                    || query
                        .types
                        .iter()
                        .any(|t| t == l.event.event_type().as_str())
            })
            .filter(|l| query.delivery_success.is_none_or(|d| l.delivered == d))
            .collect();
        let start = match &query.starting_after {
            Some(after) => matching
                .iter()
                .position(|l| l.event.id() == after)
                .map_or(matching.len(), |p| p + 1),
            None => 0,
        };
        let data: Vec<Event> = matching
            .iter()
            .skip(start)
            .take(limit)
            .map(|l| l.event.clone())
            .collect();
        Ok(Page {
            has_more: start + data.len() < matching.len(),
            data,
        })
    }

    async fn retrieve_event(&self, id: &str) -> Result<Event, ClientError> {
        self.gate()?;
        let now = self.now();
        let inner = self.lock();
        inner
            .by_event
            .get(id)
            .and_then(|&i| inner.log.get(i))
            .filter(|l| l.event.created() >= now - 30 * DAY)
            .map(|l| l.event.clone())
            .ok_or_else(|| {
                ClientError::new(ClientErrorKind::NotFound, "no such event").with_status(404)
            })
    }
}
