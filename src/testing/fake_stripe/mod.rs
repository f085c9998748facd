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
    /// Emit `invoice.created` / `invoice.finalized` / `invoice.overdue`
    /// (types with no subscription effect) too.
    pub noise_events: bool,
    /// Show at most this many entitlements in an
    /// `entitlements.active_entitlement_summary.updated` event (with
    /// `has_more: true` when more are active), as Stripe does for long
    /// lists; `None` shows them all. The API lists all of them.
    pub entitlement_summary_limit: Option<usize>,
    /// Run every subscription on one Stripe test clock this far ahead of
    /// the real clock (the [`ManualClock`] the fake was given): events and
    /// objects carry simulated times (`created`, periods), objects name the
    /// clock (`test_clock`, as an id), and scheduled actions run when the
    /// simulated time reaches them. `None`: no test clock.
    pub test_clock_ahead: Option<Duration>,
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
            test_clock_ahead: None,
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

/// How Stripe collects a subscription's payments.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Collection {
    /// Charge the customer's card (`charge_automatically`).
    #[default]
    Automatic,
    /// Send each invoice, due this many days after it is finalised
    /// (`send_invoice`). The customer pays with
    /// [`FakeStripe::pay_open_invoice`]; an invoice unpaid at its due date
    /// makes the subscription `past_due` (no payment failure is sent), and
    /// after the retry delays' total it turns `unpaid` or `canceled`
    /// ([`FakeConfig::after_retries`]).
    SendInvoice {
        /// `days_until_due`.
        days_until_due: u32,
    },
}

/// How to subscribe.
#[derive(Debug, Clone)]
pub struct Subscribe {
    /// The price. Its product is `prod_` followed by what comes after
    /// `price_` (`price_basic` → `prod_basic`).
    pub price: String,
    /// The item's quantity.
    pub quantity: u64,
    /// The subscription's metadata.
    pub metadata: BTreeMap<String, String>,
    /// How payments are collected (an invoiced subscription does not go
    /// through Checkout).
    pub collection: Collection,
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
            quantity: 1,
            metadata: BTreeMap::new(),
            collection: Collection::Automatic,
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
    /// When Stripe sent it, on the real clock (Unix seconds): the event's
    /// `created`, except on a test clock, whose `created` is simulated.
    pub emitted_at: i64,
}

#[derive(Debug, Clone)]
struct Sub {
    id: String,
    customer: String,
    price: String,
    quantity: u64,
    metadata: BTreeMap<String, String>,
    /// `days_until_due` of an invoiced subscription (`None`: charged
    /// automatically).
    days_until_due: Option<u32>,
    /// The open invoice's finalisation time and due date (invoiced).
    invoice_dates: Option<(i64, i64)>,
    test_clock: Option<String>,
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
    /// An invoiced subscription's open invoice reaches its due date.
    InvoiceDue,
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
    emitted_at: i64,
    delivered: bool,
}

struct Inner {
    rng: Rng,
    counter: u64,
    customers: BTreeMap<String, Card>,
    subs: BTreeMap<String, Sub>,
    /// `(created, id)` of every subscription, newest first (Stripe's list
    /// order); rebuilt by `list_subscriptions` when its length differs.
    sub_order: Vec<(i64, String)>,
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
                sub_order: Vec::new(),
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

    /// Stripe's time for the subscriptions: the real clock, or the test
    /// clock's simulated time.
    fn now(&self) -> i64 {
        self.real_now() + self.ahead()
    }

    /// The real clock's time (Unix seconds).
    fn real_now(&self) -> i64 {
        self.clock.now().unix_timestamp()
    }

    /// How far the test clock runs ahead of the real clock (0 without one).
    fn ahead(&self) -> i64 {
        self.config
            .test_clock_ahead
            .map_or(0, Duration::whole_seconds)
    }

    /// The test clock's simulated time, when subscriptions run on one.
    pub fn test_clock_time(&self) -> Option<OffsetDateTime> {
        self.config
            .test_clock_ahead
            .map(|ahead| self.clock.now().saturating_add(ahead))
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
        inner.log[start..].iter().map(Logged::to_fake).collect()
    }

    /// Every event emitted so far.
    pub fn all_events(&self) -> Vec<FakeEvent> {
        self.lock().log.iter().map(Logged::to_fake).collect()
    }

    /// Records that a webhook delivery of `event_id` got a 2xx (for the
    /// `delivery_success` filter), in this fake or the connected account
    /// that emitted it.
    pub fn mark_delivered(&self, event_id: &str) {
        let accounts: Vec<Arc<FakeStripe>> = {
            let mut inner = self.lock();
            if let Some(&i) = inner.by_event.get(event_id)
                && let Some(l) = inner.log.get_mut(i)
            {
                l.delivered = true;
                return;
            }
            inner.accounts.values().cloned().collect()
        };
        for account in accounts {
            account.mark_delivered(event_id);
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

    /// The time of the next scheduled action, if any (on the real clock).
    pub fn next_action_at(&self) -> Option<i64> {
        let ahead = self.ahead();
        self.lock().schedule.peek().map(|Reverse(s)| s.at - ahead)
    }

    /// Runs the earliest action due at or before `until` (on the real
    /// clock). Returns whether one ran.
    pub fn run_next_due(&self, until: i64) -> bool {
        let ahead = self.ahead();
        let mut inner = self.lock();
        if inner
            .schedule
            .peek()
            .is_none_or(|Reverse(s)| s.at - ahead > until)
        {
            return false;
        }
        let Some(Reverse(job)) = inner.schedule.pop() else {
            return false;
        };
        if self.clock.now().unix_timestamp() < job.at - ahead
            && let Ok(t) = OffsetDateTime::from_unix_timestamp(job.at - ahead)
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

impl Logged {
    fn to_fake(&self) -> FakeEvent {
        FakeEvent {
            event: self.event.clone(),
            body: self.body.clone(),
            emitted_at: self.emitted_at,
        }
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

/// The product of a price: `price_basic` → `prod_basic`.
fn product_of(price: &str) -> String {
    format!("prod_{}", price.strip_prefix("price_").unwrap_or(price))
}

fn render_subscription(s: &Sub, shape: ApiShape) -> Value {
    let mut item = json!({
        "id": s.item_id,
        "object": "subscription_item",
        "price": {"id": s.price, "object": "price", "product": product_of(&s.price)},
        "quantity": s.quantity,
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
        "metadata": s.metadata,
        "collection_method": if s.days_until_due.is_some() { "send_invoice" } else { "charge_automatically" },
        "days_until_due": s.days_until_due,
        "test_clock": s.test_clock,
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
