//! The fake Stripe: the state it owns and its public API.
//!
//! The files of this module split one type, [`FakeStripe`]:
//! - this file: the settings, the true state (customers, subscriptions, the
//!   schedule of future actions, the event log), the queries on that state,
//!   driving the virtual clock, and how a subscription renders as Stripe's
//!   JSON;
//! - `lifecycle.rs`: the moves a customer or an operator makes (subscribe,
//!   pay, cancel, pause, resume, trials) and the scheduled actions Stripe runs
//!   on its own (renewals, trial ends, payment retries, expiry);
//! - `events.rs`: the events each move emits, in Stripe's order and shapes,
//!   and the entitlement summaries;
//! - `client.rs`: the [`StripeClient`](crate::client::StripeClient)
//!   implementation, answered from the same truth, with the fake's clock as
//!   the server time of every answer;
//! - `accounts.rs`: Connect: connected accounts, each a fake of its own on
//!   the same clock, answered when a call names the account.
//!
//! The fake knows nothing of webhook delivery: a delivery simulator (or a
//! test) takes the emitted events with [`FakeStripe::take_new_events`] and
//! reports successful deliveries with [`FakeStripe::mark_delivered`].

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use serde_json::{Value, json};
use time::{Duration, OffsetDateTime};

use super::rng::Rng;
use crate::clock::{Clock, ManualClock};
use crate::event::{ApiShape, Event, SubscriptionStatus, SubscriptionView};

mod accounts;
mod client;
mod events;
mod lifecycle;

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
    /// Show at most this many entitlements in an
    /// `entitlements.active_entitlement_summary.updated` event (with
    /// `has_more: true` when more are active), as Stripe does for long
    /// lists; `None` shows them all. The API lists all of them.
    pub entitlement_summary_limit: Option<usize>,
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
            entitlement_summary_limit: None,
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
    /// Connected accounts (on a platform).
    accounts: BTreeMap<String, Arc<FakeStripe>>,
}

/// A stateful fake Stripe: it owns the true subscription states, performs
/// Stripe's lifecycle moves on a virtual clock, emits the events Stripe would
/// (several in the same second, in either API shape), and answers
/// [`StripeClient`](crate::client::StripeClient) from its own truth.
///
/// Share it as `Arc<FakeStripe>`; every method takes `&self`.
///
/// ```
/// use stripe_webhook_guard::clock::ManualClock;
/// use stripe_webhook_guard::event::SubscriptionStatus;
/// use stripe_webhook_guard::testing::{FakeConfig, FakeStripe, Subscribe};
///
/// let clock = ManualClock::at_unix(1_700_000_000);
/// let stripe = FakeStripe::new(clock.clone(), FakeConfig::default());
/// let customer = stripe.create_customer();
/// let sub = stripe.subscribe(&customer, &Subscribe::default());
/// assert_eq!(stripe.truth(&sub).unwrap().status, SubscriptionStatus::Active);
/// // Checkout: created (incomplete), invoice paid, updated (active), session completed…
/// assert!(stripe.take_new_events().len() >= 4);
/// ```
pub struct FakeStripe {
    inner: Mutex<Inner>,
    /// The connected account this fake is (`None`: a platform).
    account: Option<String>,
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
                accounts: BTreeMap::new(),
            }),
            account: None,
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

    /// Moves the clock forward by `by`, running every scheduled action on
    /// the way at its own time.
    pub fn advance(&self, by: Duration) {
        let target = self.clock.now().saturating_add(by);
        self.advance_to(target);
    }

    /// Moves the clock to `target`, running scheduled actions due on the way
    /// (its connected accounts' too, in time order).
    pub fn advance_to(&self, target: OffsetDateTime) {
        while self.run_next_due_anywhere(target.unix_timestamp()) {}
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
