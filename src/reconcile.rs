//! Recovering from missed webhooks: converge to Stripe's truth after
//! downtime, lost events, and customers who arrive before their webhook.
//!
//! Webhooks alone are not enough. An endpoint can be down longer than
//! Stripe's three days of retries, Stripe occasionally fails to send an
//! event at all, and a customer may open the app a second after paying. The
//! [`Reconciler`] has four tools, all reporting what they changed:
//!
//! - [`Reconciler::catch_up`] pages `/v1/events` forward from a stored
//!   cursor (first run: a look-back of at most 30 days, Stripe's retention)
//!   and feeds every event through the **same processor path, with its real
//!   event id**, so an event that also arrives by webhook is processed once.
//!   The cursor only moves past events that were processed, deliberately
//!   ignored, or failed permanently (reported by id); an event whose failure
//!   is retryable holds it back for the next run.
//! - [`Reconciler::sweep`] compares subscriptions with Stripe's objects and
//!   repairs them. Beyond 30 days it is the only source of truth. Records of
//!   Connect accounts (`account` set) are not reconciled by this version: the
//!   platform key cannot list connected accounts' subscriptions.
//! - [`Reconciler::refresh_customer`] does that for one customer: call it at
//!   login or from a "restore purchase" button.
//! - [`Reconciler::replay`] and [`Reconciler::replay_dead_letters`] re-run
//!   stored failed or dead events after a fix.
//!
//! Every change is a [`Change`] (access restored, access revoked, status
//! changed, repaired, needs review, discovered) in the [`ReconcileReport`],
//! handed to the application's [`Notifier`] ("your access is restored",
//! "please update your card"), also when the run fails part-way: what was
//! saved before the error is notified before the error is returned.
//!
//! Requests go through a [`RequestBudget`]: a request rate and a concurrency
//! limit (defaults well under Stripe's test-mode limit of 25/s), with
//! jittered back-off on 429 and 5xx. A dry run reports without writing.
//!
//! The comparison itself is the pure [`plan`].

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};

use async_trait::async_trait;
use serde::Serialize;
use time::{Duration, OffsetDateTime};

use crate::access::{Access, AccessPolicy};
use crate::client::{ClientError, EventListQuery, Page, StripeClient, SubscriptionListQuery};
use crate::clock::Clock;
use crate::event::{Event, SubscriptionStatus, SubscriptionView};
use crate::ledger::{EventKey, LedgerQuery, LedgerState};
use crate::processor::{Error as ProcessError, Outcome, WebhookProcessor};
use crate::store::{CursorStore, StoreError, StoreErrorKind, SubscriptionQuery};
use crate::subscription::{self, Anomaly, AnomalyKind, SubscriptionRecord, SubscriptionState};

/// The cursor name `catch_up` keeps in the [`CursorStore`].
pub const EVENTS_CURSOR: &str = "stripe_webhook_guard.events";

/// Stripe keeps events for 30 days.
pub const EVENT_RETENTION: Duration = Duration::days(30);

/// What a change means for the customer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ChangeKind {
    /// They had no access and now have it (they paid while we were not
    /// listening, say).
    AccessRestored,
    /// They had access and no longer do (a payment failed, a cancellation).
    AccessRevoked,
    /// The status changed without changing access.
    StatusChanged,
    /// Other fields were repaired (period, cancellation schedule, …).
    Repaired,
    /// A human should look at it (`needs_review` was set).
    NeedsReview,
    /// The record did not exist locally and was created from Stripe's
    /// object (a subscription whose events were all missed, or the first
    /// [`SweepScope::All`] over an existing account). Nothing was taken from
    /// or given back to the customer as far as we had told them; the
    /// application decides whether to notify (`after_access` says what they
    /// have now). A new record that needs review is reported as
    /// [`ChangeKind::NeedsReview`] instead.
    Discovered,
}

/// Where a change was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ChangeSource {
    /// `/v1/events` catch-up.
    CatchUp,
    /// Subscription sweep.
    Sweep,
    /// One customer's refresh.
    Refresh,
    /// A replayed event.
    Replay,
}

/// One change, as reported and notified.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Change {
    /// What it means.
    pub kind: ChangeKind,
    /// Where it was found.
    pub source: ChangeSource,
    /// The subscription.
    pub subscription_id: String,
    /// The customer.
    pub customer: Option<String>,
    /// The status before (`None`: the record did not exist).
    pub before_status: Option<SubscriptionStatus>,
    /// The status after.
    pub after_status: SubscriptionStatus,
    /// Access before (`None`: the record did not exist).
    pub before_access: Option<Access>,
    /// Access after.
    pub after_access: Access,
    /// Details (anomaly text), when any.
    pub detail: Option<String>,
}

/// The application's side of notifications.
#[async_trait]
pub trait Notifier: Send + Sync {
    /// Called once per change of a (non-dry) run, after it was saved. A run
    /// that fails part-way still notifies the changes it saved before the
    /// error, then returns the error.
    async fn notify(&self, change: &Change);
}

/// What a reconciliation run did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ReconcileReport {
    /// Whether nothing was written.
    pub dry_run: bool,
    /// Events listed from Stripe.
    pub events_seen: u64,
    /// Events processed now (they had been missed).
    pub events_processed: u64,
    /// Events already processed or settled (received by webhook).
    pub events_duplicate: u64,
    /// Events that failed to process. Retryable failures hold the cursor
    /// back; permanent ones are also listed in `events_failed_permanently`.
    pub events_failed: u64,
    /// Ids of events that failed permanently (a payload conflict, a
    /// non-retryable store error), included in `events_failed`. They do not
    /// hold the cursor back (catch-up would fail them again on every run),
    /// so catch-up will not retry them: investigate them (after fixing a
    /// store error, [`Reconciler::replay`] re-runs one).
    pub events_failed_permanently: Vec<String>,
    /// Events that would be processed (dry run).
    pub events_missing: Vec<String>,
    /// Subscriptions compared with Stripe.
    pub subscriptions_checked: u64,
    /// Records written (repairs, verification stamps).
    pub writes: u64,
    /// Every change.
    pub changes: Vec<Change>,
    /// API requests made (each retry counts).
    pub requests: u64,
    /// Requests answered with 429.
    pub rate_limited: u64,
    /// The events cursor after the run (Unix seconds).
    pub cursor: Option<i64>,
}

impl ReconcileReport {
    fn merge(&mut self, other: ReconcileReport) {
        self.events_seen += other.events_seen;
        self.events_processed += other.events_processed;
        self.events_duplicate += other.events_duplicate;
        self.events_failed += other.events_failed;
        self.events_failed_permanently
            .extend(other.events_failed_permanently);
        self.events_missing.extend(other.events_missing);
        self.subscriptions_checked += other.subscriptions_checked;
        self.writes += other.writes;
        self.changes.extend(other.changes);
        self.requests += other.requests;
        self.rate_limited += other.rate_limited;
        self.cursor = other.cursor.or(self.cursor);
    }

    /// Changes of one kind.
    pub fn changes_of(&self, kind: ChangeKind) -> impl Iterator<Item = &Change> {
        self.changes.iter().filter(move |c| c.kind == kind)
    }
}

/// What [`plan`] decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PlanKind {
    /// The record matches Stripe.
    InSync,
    /// The record differs; save the repaired one.
    Repair,
    /// Stripe's object conflicts with the record in a way a human should
    /// see (a terminal record Stripe reports live, another customer); the
    /// repair is saved with `needs_review`.
    Review,
}

/// The planner's answer for one subscription.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// What to do.
    pub kind: PlanKind,
    /// The customer-facing consequence of saving `record`, if any. An
    /// in-sync record has one when re-stamping it as verified changes its
    /// access (a grace given for unverified data ends).
    pub change: Option<ChangeKind>,
    /// The record to save (`None` when in sync and recently verified).
    pub record: Option<SubscriptionRecord>,
    /// Status and access before (`None`: no local record).
    pub before: Option<(SubscriptionStatus, Access)>,
    /// Status and access of the record saved (of the local record when
    /// nothing is saved).
    pub after: (SubscriptionStatus, Access),
    /// Why a review is needed.
    pub detail: Option<String>,
}

/// Compares a local record with Stripe's object at `now` (pure).
///
/// - Matching records are in sync; they are re-stamped as verified only when
///   their last verification is older than `reverify_after` (so a second run
///   right after the first writes nothing). Re-stamping can end a grace
///   given for unverified data: that is reported as
///   [`ChangeKind::AccessRevoked`].
/// - A differing record is repaired from Stripe's object; the consequence is
///   computed by deciding access before and after with `policy`, for the
///   record actually saved.
/// - A record that did not exist locally is [`ChangeKind::Discovered`].
/// - A terminal record that Stripe reports live, or a different customer,
///   is repaired but flagged for review.
pub fn plan(
    local: Option<&SubscriptionRecord>,
    stripe: &SubscriptionView,
    now: OffsetDateTime,
    policy: &AccessPolicy,
    reverify_after: Duration,
) -> Plan {
    let truth = SubscriptionState::from_view(stripe);
    let before = local.map(|r| (r.state.status.clone(), policy.decide(r, now).access));
    if let Some(r) = local
        && r.has_snapshot()
        && r.matches(&truth)
    {
        let stale = r
            .last_verified_with_stripe
            .is_none_or(|v| v + reverify_after <= now);
        let record = (stale || r.needs_reconcile).then(|| {
            let mut touched = r.clone();
            touched.last_verified_with_stripe = Some(now);
            touched.needs_reconcile = false;
            touched
        });
        let saved = record.as_ref().unwrap_or(r);
        let after = (saved.state.status.clone(), policy.decide(saved, now).access);
        let change = before
            .as_ref()
            .and_then(|(_, b)| access_change(*b, after.1));
        return Plan {
            kind: PlanKind::InSync,
            change,
            record,
            before,
            after,
            detail: None,
        };
    }
    let mut repaired = subscription::from_stripe(local, stripe, now, None).record;
    let mut detail = None;
    if let Some(r) = local {
        if r.state.status.is_terminal() && !truth.status.is_terminal() {
            detail = Some(format!(
                "record was {}, Stripe says {}",
                r.state.status, truth.status
            ));
        } else if let (Some(a), Some(b)) = (&r.state.customer, &truth.customer)
            && a != b
        {
            detail = Some(format!("record had customer {a}, Stripe says {b}"));
        }
        if r.has_snapshot() {
            let text = format!(
                "record said {}, Stripe says {}",
                r.state.status, truth.status
            );
            push_anomaly(&mut repaired, now, AnomalyKind::Diverged, text);
        }
    }
    let kind = if detail.is_some() {
        repaired.needs_review = true;
        if let Some(text) = &detail {
            push_anomaly(&mut repaired, now, AnomalyKind::Diverged, text.clone());
        }
        PlanKind::Review
    } else {
        PlanKind::Repair
    };
    let after = (
        repaired.state.status.clone(),
        policy.decide(&repaired, now).access,
    );
    let change = match (&before, kind) {
        (_, PlanKind::Review) => ChangeKind::NeedsReview,
        (None, _) => ChangeKind::Discovered,
        (Some((s, b)), _) => access_change(*b, after.1).unwrap_or(if *s == after.0 {
            ChangeKind::Repaired
        } else {
            ChangeKind::StatusChanged
        }),
    };
    Plan {
        kind,
        change: Some(change),
        record: Some(repaired),
        before,
        after,
        detail,
    }
}

/// Access gained or lost between two decisions.
fn access_change(before: Access, after: Access) -> Option<ChangeKind> {
    match (before.allows(), after.allows()) {
        (false, true) => Some(ChangeKind::AccessRestored),
        (true, false) => Some(ChangeKind::AccessRevoked),
        _ => None,
    }
}

fn push_anomaly(
    record: &mut SubscriptionRecord,
    now: OffsetDateTime,
    kind: AnomalyKind,
    detail: String,
) {
    record.anomalies.push(Anomaly {
        at: now.unix_timestamp(),
        event_id: None,
        kind,
        detail,
    });
    let max = subscription::MAX_ANOMALIES;
    if record.anomalies.len() > max {
        let excess = record.anomalies.len() - max;
        record.anomalies.drain(..excess);
    }
}

/// Limits on API use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BudgetConfig {
    /// Requests per second (default 10; Stripe allows 25/s in test mode and
    /// 100/s in live mode, shared with the rest of your application).
    pub requests_per_second: u32,
    /// Requests in flight at once (default 4).
    pub max_in_flight: usize,
    /// Retries of a retryable failure (default 5).
    pub max_retries: u32,
    /// First back-off (default 500 ms), doubled per retry, jittered, capped
    /// at 30 s; a `Retry-After` longer than that wins.
    pub base_backoff: Duration,
}

impl Default for BudgetConfig {
    fn default() -> Self {
        Self {
            requests_per_second: 10,
            max_in_flight: 4,
            max_retries: 5,
            base_backoff: Duration::milliseconds(500),
        }
    }
}

/// How many request timestamps [`RequestBudget::peak_per_second`] keeps.
const ISSUED_WINDOW: usize = 4096;

/// A [`StripeClient`] wrapper that paces requests, bounds how many are in
/// flight, and retries rate limits and server errors with jittered
/// exponential back-off. Give the same budgeted client to the processor and
/// the reconciler so refetches share the budget.
///
/// The in-flight bound is an async semaphore: a waiting call sleeps until a
/// permit is returned (no polling), and a call that is cancelled (dropped by
/// a timeout, say) or panics returns its permit.
pub struct RequestBudget {
    inner: Arc<dyn StripeClient>,
    clock: Arc<dyn Clock>,
    config: BudgetConfig,
    next_slot: Mutex<OffsetDateTime>,
    permits: Semaphore,
    requests: AtomicU64,
    rate_limited: AtomicU64,
    jitter: AtomicU64,
    issued: Mutex<VecDeque<OffsetDateTime>>,
}

impl std::fmt::Debug for RequestBudget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestBudget")
            .field("config", &self.config)
            .field("requests", &self.requests.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl RequestBudget {
    /// Wraps `inner`.
    pub fn new(inner: Arc<dyn StripeClient>, clock: Arc<dyn Clock>, config: BudgetConfig) -> Self {
        let seed = u64::try_from(
            clock
                .now()
                .unix_timestamp_nanos()
                .rem_euclid(i128::from(u64::MAX)),
        )
        .unwrap_or(7);
        Self {
            inner,
            next_slot: Mutex::new(clock.now()),
            clock,
            config,
            permits: Semaphore::new(config.max_in_flight.max(1)),
            requests: AtomicU64::new(0),
            rate_limited: AtomicU64::new(0),
            jitter: AtomicU64::new(seed),
            issued: Mutex::new(VecDeque::with_capacity(ISSUED_WINDOW)),
        }
    }

    /// Requests issued so far (each retry counts).
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// Requests answered with 429 so far.
    pub fn rate_limited(&self) -> u64 {
        self.rate_limited.load(Ordering::Relaxed)
    }

    /// The most requests issued within any one second (to check the pace),
    /// over the last 4,096 requests (older timestamps are not kept).
    pub fn peak_per_second(&self) -> usize {
        let issued = self.issued.lock().unwrap_or_else(PoisonError::into_inner);
        let mut peak = 0;
        let mut start = 0;
        for (end, t) in issued.iter().enumerate() {
            while *t - issued[start] >= Duration::SECOND {
                start += 1;
            }
            peak = peak.max(end - start + 1);
        }
        peak
    }

    /// Waits for an in-flight permit, then for a pacing slot. The permit is
    /// returned when the guard drops (also on cancellation or panic).
    async fn acquire(&self) -> Permit<'_> {
        let permit = self.permits.acquire().await;
        let interval = Duration::seconds(1) / self.config.requests_per_second.max(1);
        let slot = {
            let mut next = self
                .next_slot
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            let now = self.clock.now();
            let slot = if *next > now { *next } else { now };
            *next = slot + interval;
            slot
        };
        let now = self.clock.now();
        if slot > now {
            self.clock.sleep(slot - now).await;
        }
        {
            let mut issued = self.issued.lock().unwrap_or_else(PoisonError::into_inner);
            if issued.len() >= ISSUED_WINDOW {
                issued.pop_front();
            }
            issued.push_back(self.clock.now());
        }
        self.requests.fetch_add(1, Ordering::Relaxed);
        permit
    }

    fn backoff(&self, attempt: u32, retry_after: Option<Duration>) -> Duration {
        let base = self.config.base_backoff.whole_milliseconds().max(1);
        let exp = base.saturating_mul(1i128 << attempt.min(16)).min(30_000);
        // xorshift on a shared counter: cheap, good enough for jitter.
        let mut x = self
            .jitter
            .fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed);
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let half = exp / 2;
        let jitter = i128::from(x % u64::try_from(half.max(1)).unwrap_or(1));
        let ms = i64::try_from(half + jitter).unwrap_or(30_000);
        let d = Duration::milliseconds(ms);
        match retry_after {
            Some(r) if r > d => r.min(Duration::seconds(60)),
            _ => d,
        }
    }

    #[allow(clippy::needless_lifetimes)] // 'a ties the futures to the borrow of self
    async fn call<'a, T, F>(&'a self, mut f: F) -> Result<T, ClientError>
    where
        F: FnMut() -> Pin<Box<dyn Future<Output = Result<T, ClientError>> + Send + 'a>>,
        T: Send,
    {
        let mut attempt = 0;
        loop {
            let result = {
                let _permit = self.acquire().await;
                f().await
            };
            match result {
                Ok(v) => return Ok(v),
                Err(e) => {
                    if e.kind() == crate::client::ClientErrorKind::RateLimited {
                        self.rate_limited.fetch_add(1, Ordering::Relaxed);
                    }
                    if !e.is_retryable() || attempt >= self.config.max_retries {
                        return Err(e);
                    }
                    let wait = self.backoff(attempt, e.retry_after());
                    self.clock.sleep(wait).await;
                    attempt += 1;
                }
            }
        }
    }
}

/// A fair (first come, first served) async semaphore that needs no runtime.
/// A returned permit is handed straight to the longest waiter.
struct Semaphore {
    state: Mutex<SemaphoreState>,
}

struct SemaphoreState {
    /// Permits nobody holds (only while nobody waits).
    available: usize,
    /// Waiting [`Acquire`]s, oldest first.
    waiters: VecDeque<Waiter>,
    /// Waiters handed a permit that have not collected it yet.
    granted: Vec<u64>,
    next_id: u64,
}

struct Waiter {
    id: u64,
    waker: Waker,
}

impl Semaphore {
    fn new(permits: usize) -> Self {
        Self {
            state: Mutex::new(SemaphoreState {
                available: permits,
                waiters: VecDeque::new(),
                granted: Vec::new(),
                next_id: 0,
            }),
        }
    }

    // The lock is never held across user code or an await, so poisoning
    // can only come from a bug here; the state is still consistent.
    fn lock(&self) -> MutexGuard<'_, SemaphoreState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn acquire(&self) -> Acquire<'_> {
        Acquire {
            semaphore: self,
            queued: None,
        }
    }

    /// Returns a permit: to the oldest waiter (woken), else to the pool.
    fn release(&self) {
        let waker = {
            let mut state = self.lock();
            if let Some(next) = state.waiters.pop_front() {
                state.granted.push(next.id);
                Some(next.waker)
            } else {
                state.available += 1;
                None
            }
        };
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    #[cfg(test)]
    fn available(&self) -> usize {
        self.lock().available
    }
}

/// The future of [`Semaphore::acquire`]. Dropped while queued it leaves the
/// queue; dropped after being handed a permit it passes the permit on.
struct Acquire<'a> {
    semaphore: &'a Semaphore,
    /// The waiter id once queued.
    queued: Option<u64>,
}

impl<'a> Future for Acquire<'a> {
    type Output = Permit<'a>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Permit<'a>> {
        let this = self.get_mut();
        let semaphore = this.semaphore;
        let mut state = semaphore.lock();
        match this.queued {
            None => {
                if state.available > 0 && state.waiters.is_empty() {
                    state.available -= 1;
                    return Poll::Ready(Permit { semaphore });
                }
                let id = state.next_id;
                state.next_id = state.next_id.wrapping_add(1);
                state.waiters.push_back(Waiter {
                    id,
                    waker: cx.waker().clone(),
                });
                this.queued = Some(id);
                Poll::Pending
            }
            Some(id) => {
                if let Some(i) = state.granted.iter().position(|g| *g == id) {
                    state.granted.swap_remove(i);
                    this.queued = None;
                    return Poll::Ready(Permit { semaphore });
                }
                // Polled again by another task, say: wake that one.
                if let Some(w) = state.waiters.iter_mut().find(|w| w.id == id) {
                    w.waker.clone_from(cx.waker());
                }
                Poll::Pending
            }
        }
    }
}

impl Drop for Acquire<'_> {
    fn drop(&mut self) {
        let Some(id) = self.queued.take() else {
            return;
        };
        let handed = {
            let mut state = self.semaphore.lock();
            if let Some(i) = state.granted.iter().position(|g| *g == id) {
                state.granted.swap_remove(i);
                true
            } else {
                state.waiters.retain(|w| w.id != id);
                false
            }
        };
        if handed {
            self.semaphore.release();
        }
    }
}

/// An in-flight permit; dropping it returns the permit.
struct Permit<'a> {
    semaphore: &'a Semaphore,
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        self.semaphore.release();
    }
}

#[async_trait]
impl StripeClient for RequestBudget {
    async fn retrieve_subscription(&self, id: &str) -> Result<SubscriptionView, ClientError> {
        self.call(|| Box::pin(self.inner.retrieve_subscription(id)))
            .await
    }

    async fn list_subscriptions(
        &self,
        query: &SubscriptionListQuery,
    ) -> Result<Page<SubscriptionView>, ClientError> {
        self.call(|| Box::pin(self.inner.list_subscriptions(query)))
            .await
    }

    async fn list_events(&self, query: &EventListQuery) -> Result<Page<Event>, ClientError> {
        self.call(|| Box::pin(self.inner.list_events(query))).await
    }

    async fn retrieve_event(&self, id: &str) -> Result<Event, ClientError> {
        self.call(|| Box::pin(self.inner.retrieve_event(id))).await
    }
}

/// Reconciliation settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReconcileConfig {
    /// First catch-up run: how far back to list events (capped at 30 days).
    pub lookback: Duration,
    /// Re-list this much before the cursor (events can appear in the list
    /// shortly after their `created`).
    pub overlap: Duration,
    /// Only events whose webhook delivery failed (`delivery_success=false`).
    pub only_failed_deliveries: bool,
    /// Only these event types (empty: all).
    pub event_types: Vec<String>,
    /// In-sync records are re-stamped as verified when their last
    /// verification is older than this (default 1 hour).
    pub reverify_after: Duration,
    /// Report without writing, processing or notifying.
    pub dry_run: bool,
}

impl Default for ReconcileConfig {
    fn default() -> Self {
        Self {
            lookback: Duration::days(3),
            overlap: Duration::minutes(5),
            only_failed_deliveries: false,
            event_types: Vec::new(),
            reverify_after: Duration::hours(1),
            dry_run: false,
        }
    }
}

/// Which subscriptions [`Reconciler::sweep`] checks.
///
/// Connect accounts are not reconciled by this version: the platform key
/// lists and retrieves the platform's own subscriptions only, so local
/// records with an `account` are neither retrieved nor flagged as unknown to
/// Stripe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SweepScope {
    /// Every subscription Stripe lists (and local ones it does not, except
    /// Connect records).
    All,
    /// Local records never verified, verified before `now - threshold`, or
    /// flagged `needs_reconcile`; one retrieve each. The store is read in
    /// pages of 500 ids. Skipped: records already flagged `needs_review` (a
    /// human has them; [`SweepScope::All`] still compares them), terminal
    /// records (`canceled`, `incomplete_expired`) verified with Stripe at
    /// least once and not flagged `needs_reconcile` (their status cannot
    /// change), and Connect records.
    StaleFor(Duration),
}

/// Page size for reading the subscription store.
const STORE_PAGE: usize = 500;

/// Why a reconciliation step failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReconcileError {
    /// The Stripe API failed (after the budget's retries).
    #[error(transparent)]
    Client(#[from] ClientError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// No stored payload and Stripe no longer has the event.
    #[error("event {0} cannot be replayed: no stored payload and Stripe does not return it")]
    NotReplayable(String),
    /// Processing a replayed event failed.
    #[error(transparent)]
    Process(#[from] ProcessError),
}

/// The reconciliation driver. Build with [`Reconciler::new`].
pub struct Reconciler {
    processor: WebhookProcessor,
    cursors: Arc<dyn CursorStore>,
    client: Arc<dyn StripeClient>,
    notifier: Option<Arc<dyn Notifier>>,
    policy: AccessPolicy,
    config: ReconcileConfig,
    budget: Option<Arc<RequestBudget>>,
}

impl std::fmt::Debug for Reconciler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reconciler")
            .field("config", &self.config)
            .field("notifier", &self.notifier.is_some())
            .finish_non_exhaustive()
    }
}

impl Reconciler {
    /// A reconciler over the processor's stores, with `cursors` for the
    /// events cursor and `client` for the API (wrap it in a
    /// [`RequestBudget`], or use [`Reconciler::with_budget`]).
    pub fn new(
        processor: WebhookProcessor,
        cursors: Arc<dyn CursorStore>,
        client: Arc<dyn StripeClient>,
    ) -> Self {
        Self {
            processor,
            cursors,
            client,
            notifier: None,
            policy: AccessPolicy::default(),
            config: ReconcileConfig::default(),
            budget: None,
        }
    }

    /// Wraps the client in a [`RequestBudget`] with `config` (the report
    /// then counts requests and rate limits).
    #[must_use]
    pub fn with_budget(mut self, config: BudgetConfig) -> Self {
        let budget = Arc::new(RequestBudget::new(
            self.client.clone(),
            self.processor.clock().clone(),
            config,
        ));
        self.client = budget.clone();
        self.budget = Some(budget);
        self
    }

    /// Uses a [`RequestBudget`] shared with other users of the API (the
    /// processor's refetches, say) as the client. The report's `requests` and
    /// `rate_limited` are then the budget's counts during the run, which
    /// include those other users' requests made meanwhile.
    #[must_use]
    pub fn with_shared_budget(mut self, budget: Arc<RequestBudget>) -> Self {
        self.client = budget.clone();
        self.budget = Some(budget);
        self
    }

    /// The notifier.
    #[must_use]
    pub fn notifier(mut self, notifier: Arc<dyn Notifier>) -> Self {
        self.notifier = Some(notifier);
        self
    }

    /// The access policy used to classify changes.
    #[must_use]
    pub fn policy(mut self, policy: AccessPolicy) -> Self {
        self.policy = policy;
        self
    }

    /// The settings.
    #[must_use]
    pub fn config(mut self, config: ReconcileConfig) -> Self {
        self.config = config;
        self
    }

    /// The budget, when [`Reconciler::with_budget`] set one.
    pub fn budget(&self) -> Option<&Arc<RequestBudget>> {
        self.budget.as_ref()
    }

    fn store(&self) -> &Arc<dyn crate::store::Storage> {
        self.processor.store()
    }

    fn now(&self) -> OffsetDateTime {
        self.processor.clock().now()
    }

    fn counters(&self) -> (u64, u64) {
        self.budget
            .as_ref()
            .map_or((0, 0), |b| (b.requests(), b.rate_limited()))
    }

    /// Catch-up, then a sweep of `scope`: the usual scheduled job.
    ///
    /// # Errors
    ///
    /// As [`Reconciler::catch_up`] and [`Reconciler::sweep`].
    pub async fn run(&self, scope: SweepScope) -> Result<ReconcileReport, ReconcileError> {
        let mut report = self.catch_up().await?;
        report.merge(self.sweep(scope).await?);
        Ok(report)
    }

    /// Lists `/v1/events` from the stored cursor and processes every event
    /// through the processor (same ids, same ledger).
    ///
    /// Events whose failure is retryable hold the cursor back; events that
    /// fail permanently are listed in
    /// [`ReconcileReport::events_failed_permanently`] and let it move.
    ///
    /// # Errors
    ///
    /// [`ReconcileError`] when listing, the cursor store or the subscription
    /// store fails; changes saved before the error are notified first.
    /// Events that fail to process are counted instead.
    pub async fn catch_up(&self) -> Result<ReconcileReport, ReconcileError> {
        let (requests0, limited0) = self.counters();
        let mut report = ReconcileReport {
            dry_run: self.config.dry_run,
            ..ReconcileReport::default()
        };
        let mut before = BTreeMap::new();
        let result = self.catch_up_events(&mut report, &mut before).await;
        // Whatever was saved is reported and notified, even when the run
        // failed part-way: the next run would find it in sync.
        let diffed = if self.config.dry_run {
            Ok(())
        } else {
            self.catch_up_changes(before, &mut report).await
        };
        self.notify(&report.changes).await;
        result?;
        diffed?;
        self.count_requests(&mut report, requests0, limited0);
        Ok(report)
    }

    /// Lists and processes the events; records each touched subscription's
    /// record as it was before its first event in `before`.
    async fn catch_up_events(
        &self,
        report: &mut ReconcileReport,
        before: &mut BTreeMap<String, Option<SubscriptionRecord>>,
    ) -> Result<(), ReconcileError> {
        let started = self.now();
        let floor = (started - EVENT_RETENTION).unix_timestamp();
        let cursor = match self.cursors.load_cursor(EVENTS_CURSOR).await? {
            Some(text) => text.parse::<i64>().ok(),
            None => None,
        };
        let from = cursor
            .map_or_else(
                || (started - self.config.lookback.min(EVENT_RETENTION)).unix_timestamp(),
                |c| c - self.config.overlap.whole_seconds(),
            )
            .max(floor);
        let mut oldest_failure: Option<i64> = None;
        let mut query = EventListQuery {
            created_gte: Some(from),
            starting_after: None,
            types: self.config.event_types.clone(),
            delivery_success: self.config.only_failed_deliveries.then_some(false),
            limit: 100,
        };
        loop {
            let page = self.client.list_events(&query).await?;
            for event in &page.data {
                report.events_seen += 1;
                if self.config.dry_run {
                    let known = self
                        .processor
                        .store()
                        .get(&EventKey::of(event))
                        .await?
                        .is_some_and(|e| e.state.is_settled());
                    if !known {
                        report.events_missing.push(event.id().to_owned());
                    }
                    continue;
                }
                if let Ok(Some(id)) = subscription::subscription_id_of(event)
                    && !before.contains_key(&id)
                {
                    let record = self.store().load(&id).await?;
                    before.insert(id, record);
                }
                match self.processor.process_event(event).await {
                    Ok(Outcome::Duplicate { .. }) => report.events_duplicate += 1,
                    Ok(_) => report.events_processed += 1,
                    Err(e) if e.is_retryable() => {
                        report.events_failed += 1;
                        oldest_failure = Some(
                            oldest_failure.map_or(event.created(), |o| o.min(event.created())),
                        );
                    }
                    Err(_) => {
                        // Failing again next run would not help; holding the
                        // cursor would pin it for up to 30 days.
                        report.events_failed += 1;
                        report.events_failed_permanently.push(event.id().to_owned());
                    }
                }
            }
            match (page.has_more, page.data.last()) {
                (true, Some(last)) => query.starting_after = Some(last.id().to_owned()),
                _ => break,
            }
        }
        if !self.config.dry_run {
            let next = oldest_failure.unwrap_or_else(|| started.unix_timestamp());
            self.cursors
                .save_cursor(EVENTS_CURSOR, &next.to_string())
                .await?;
            report.cursor = Some(next);
        }
        Ok(())
    }

    /// Diffs every subscription catch-up touched with its record now. A
    /// record that cannot be reloaded is skipped (and the first such error
    /// returned after the others were diffed).
    async fn catch_up_changes(
        &self,
        before: BTreeMap<String, Option<SubscriptionRecord>>,
        report: &mut ReconcileReport,
    ) -> Result<(), ReconcileError> {
        let mut first_error = None;
        for (id, old) in before {
            match self.store().load(&id).await {
                Ok(Some(new)) => {
                    if let Some(change) = self.diff(old.as_ref(), &new, ChangeSource::CatchUp) {
                        report.changes.push(change);
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        first_error.map_or(Ok(()), |e| Err(e.into()))
    }

    /// Compares subscriptions with Stripe and repairs them. Each object is
    /// planned at the time it was fetched. Connect records (`account` set)
    /// are not reconciled (see [`SweepScope`]).
    ///
    /// # Errors
    ///
    /// [`ReconcileError`] when the API or the store fails; changes saved
    /// before the error are notified first.
    pub async fn sweep(&self, scope: SweepScope) -> Result<ReconcileReport, ReconcileError> {
        let (requests0, limited0) = self.counters();
        let mut report = ReconcileReport {
            dry_run: self.config.dry_run,
            ..ReconcileReport::default()
        };
        let result = match scope {
            SweepScope::All => self.sweep_all(&mut report).await,
            SweepScope::StaleFor(threshold) => self.sweep_stale(threshold, &mut report).await,
        };
        self.notify(&report.changes).await;
        result?;
        self.count_requests(&mut report, requests0, limited0);
        Ok(report)
    }

    async fn sweep_all(&self, report: &mut ReconcileReport) -> Result<(), ReconcileError> {
        let started = self.now();
        let mut seen = HashSet::new();
        let mut query = SubscriptionListQuery {
            customer: None,
            starting_after: None,
            limit: 100,
        };
        loop {
            let page = self.client.list_subscriptions(&query).await?;
            let fetched_at = self.now();
            for view in &page.data {
                if let Some(id) = &view.id {
                    seen.insert(id.clone());
                }
                self.apply_plan(view, fetched_at, ChangeSource::Sweep, report)
                    .await?;
            }
            match (page.has_more, page.data.last().and_then(|s| s.id.clone())) {
                (true, Some(last)) => query.starting_after = Some(last),
                _ => break,
            }
        }
        self.flag_unknown_to_stripe(&seen, started, self.now(), report)
            .await
    }

    async fn sweep_stale(
        &self,
        threshold: Duration,
        report: &mut ReconcileReport,
    ) -> Result<(), ReconcileError> {
        let stale = SubscriptionQuery {
            verified_before: Some(self.now() - threshold),
            limit: STORE_PAGE,
            ..SubscriptionQuery::default()
        };
        let flagged = SubscriptionQuery {
            needs_reconcile: true,
            limit: STORE_PAGE,
            ..SubscriptionQuery::default()
        };
        // Stale records first, then flagged ones the first pass did not
        // cover; each read a page at a time.
        for (pass, query) in [&stale, &flagged].into_iter().enumerate() {
            let mut query = query.clone();
            loop {
                let page = self.store().list_subscriptions(&query).await?;
                let Some(last) = page.last() else { break };
                query.after = Some(last.id.clone());
                let ids: Vec<String> = page
                    .into_iter()
                    // `stale` has no paging bound, so this is its filter.
                    .filter(|r| pass == 0 || !stale.matches(r))
                    .filter(worth_retrieving)
                    .map(|r| r.id)
                    .collect();
                self.retrieve_and_apply(&ids, report).await?;
            }
        }
        Ok(())
    }

    /// Retrieves `ids` (as many at once as the budget lets in flight) and
    /// applies each object at the time it arrived.
    async fn retrieve_and_apply(
        &self,
        ids: &[String],
        report: &mut ReconcileReport,
    ) -> Result<(), ReconcileError> {
        let max_in_flight = self
            .budget
            .as_ref()
            .map_or(4, |b| b.config.max_in_flight.max(1));
        for chunk in ids.chunks(max_in_flight) {
            let fetches: Vec<Fetch> = chunk
                .iter()
                .map(|id| {
                    let client = self.client.clone();
                    let clock = self.processor.clock().clone();
                    let id = id.clone();
                    Box::pin(async move {
                        let result = client.retrieve_subscription(&id).await;
                        (id, clock.now(), result)
                    }) as Fetch
                })
                .collect();
            for (id, fetched_at, result) in join_all(fetches).await {
                match result {
                    Ok(view) => {
                        self.apply_plan(&view, fetched_at, ChangeSource::Sweep, report)
                            .await?;
                    }
                    Err(e) if e.kind() == crate::client::ClientErrorKind::NotFound => {
                        self.flag_missing(&id, fetched_at, report).await?;
                    }
                    Err(e) => return Err(e.into()),
                }
            }
        }
        Ok(())
    }

    /// Refreshes one customer's subscriptions from Stripe: call it when a
    /// customer logs in or presses "restore purchase". Bounded to that
    /// customer (one list request, plus retries). Connect records are left
    /// alone.
    ///
    /// # Errors
    ///
    /// [`ReconcileError`] when the API or the store fails; changes saved
    /// before the error are notified first.
    pub async fn refresh_customer(
        &self,
        customer: &str,
    ) -> Result<ReconcileReport, ReconcileError> {
        let (requests0, limited0) = self.counters();
        let mut report = ReconcileReport {
            dry_run: self.config.dry_run,
            ..ReconcileReport::default()
        };
        let result = self.refresh_inner(customer, &mut report).await;
        self.notify(&report.changes).await;
        result?;
        self.count_requests(&mut report, requests0, limited0);
        Ok(report)
    }

    async fn refresh_inner(
        &self,
        customer: &str,
        report: &mut ReconcileReport,
    ) -> Result<(), ReconcileError> {
        let views = self.client.list_customer_subscriptions(customer).await?;
        let fetched_at = self.now();
        let mut seen = HashSet::new();
        for view in &views {
            if let Some(id) = &view.id {
                seen.insert(id.clone());
            }
            self.apply_plan(view, fetched_at, ChangeSource::Refresh, report)
                .await?;
        }
        for r in self.store().find_by_customer(customer).await? {
            if !seen.contains(&r.id) && r.account.is_none() {
                self.flag_missing(&r.id, fetched_at, report).await?;
            }
        }
        Ok(())
    }

    fn count_requests(&self, report: &mut ReconcileReport, requests0: u64, limited0: u64) {
        let (requests1, limited1) = self.counters();
        report.requests = requests1 - requests0;
        report.rate_limited = limited1 - limited0;
    }

    /// Re-runs one stored event (failed or dead) through the processor, from
    /// its stored payload or, failing that, from Stripe.
    ///
    /// # Errors
    ///
    /// [`ReconcileError`] when the event cannot be found or processing fails.
    pub async fn replay(
        &self,
        event_id: &str,
        account: Option<&str>,
    ) -> Result<Outcome, ReconcileError> {
        let key = EventKey::new(event_id, account);
        let entry = self.processor.store().get(&key).await?;
        let event = match entry.as_ref().and_then(|e| e.payload.clone()) {
            Some(payload) => Event::from_bytes(payload.as_bytes())
                .map_err(|_| ReconcileError::NotReplayable(event_id.to_owned()))?,
            None => self
                .client
                .retrieve_event(event_id)
                .await
                .map_err(|_| ReconcileError::NotReplayable(event_id.to_owned()))?,
        };
        if self.config.dry_run {
            return Ok(Outcome::Duplicate {
                event_id: event_id.to_owned(),
                state: entry.map_or(LedgerState::Failed, |e| e.state),
            });
        }
        self.processor.store().requeue(&key).await?;
        let sub = subscription::subscription_id_of(&event).ok().flatten();
        let before = match &sub {
            Some(id) => self.store().load(id).await?,
            None => None,
        };
        let outcome = self.processor.process_event(&event).await?;
        if let Some(id) = sub
            && let Some(after) = self.store().load(&id).await?
            && let Some(change) = self.diff(before.as_ref(), &after, ChangeSource::Replay)
        {
            self.notify(std::slice::from_ref(&change)).await;
        }
        Ok(outcome)
    }

    /// Replays every dead-lettered event; returns each id with its outcome.
    ///
    /// # Errors
    ///
    /// [`ReconcileError`] when listing the ledger fails; per-event failures
    /// are returned in the list.
    pub async fn replay_dead_letters(
        &self,
    ) -> Result<Vec<(String, Result<Outcome, ReconcileError>)>, ReconcileError> {
        let mut out = Vec::new();
        let mut after = None;
        loop {
            let page = self
                .processor
                .store()
                .list(&LedgerQuery {
                    states: vec![LedgerState::Dead],
                    after: after.clone(),
                    limit: 100,
                })
                .await?;
            let Some(last) = page.last() else { break };
            after = Some(last.key.event_id.clone());
            for entry in page {
                let result = self
                    .replay(&entry.key.event_id, entry.key.account.as_deref())
                    .await;
                out.push((entry.key.event_id, result));
            }
        }
        Ok(out)
    }

    async fn apply_plan(
        &self,
        view: &SubscriptionView,
        now: OffsetDateTime,
        source: ChangeSource,
        report: &mut ReconcileReport,
    ) -> Result<(), ReconcileError> {
        let Some(id) = view.id.clone() else {
            return Ok(());
        };
        report.subscriptions_checked += 1;
        for _ in 0..8 {
            let local = self.store().load(&id).await?;
            let p = plan(
                local.as_ref(),
                view,
                now,
                &self.policy,
                self.config.reverify_after,
            );
            let change = p.change.map(|kind| Change {
                kind,
                source,
                subscription_id: id.clone(),
                customer: view
                    .customer
                    .clone()
                    .or(local.as_ref().and_then(|l| l.state.customer.clone())),
                before_status: p.before.as_ref().map(|b| b.0.clone()),
                after_status: p.after.0.clone(),
                before_access: p.before.as_ref().map(|b| b.1),
                after_access: p.after.1,
                detail: p.detail.clone(),
            });
            let Some(record) = p.record else {
                return Ok(());
            };
            if self.config.dry_run {
                report.changes.extend(change);
                return Ok(());
            }
            match self.store().save(&record).await {
                Ok(_) => {
                    report.writes += 1;
                    report.changes.extend(change);
                    return Ok(());
                }
                Err(e) if e.kind() == StoreErrorKind::Conflict => {}
                Err(e) => return Err(e.into()),
            }
        }
        Err(StoreError::new(
            StoreErrorKind::Conflict,
            "subscription kept changing during the sweep",
        )
        .into())
    }

    /// Flags local records the listing (started at `listed_from`) did not
    /// return. Records whose snapshot is newer than the listing's start were
    /// created (by a webhook) while it ran, so their absence proves nothing.
    async fn flag_unknown_to_stripe(
        &self,
        seen: &HashSet<String>,
        listed_from: OffsetDateTime,
        now: OffsetDateTime,
        report: &mut ReconcileReport,
    ) -> Result<(), ReconcileError> {
        let mut after = None;
        loop {
            let page = self
                .store()
                .list_subscriptions(&SubscriptionQuery {
                    after: after.clone(),
                    limit: STORE_PAGE,
                    ..SubscriptionQuery::default()
                })
                .await?;
            let Some(last) = page.last() else { break };
            after = Some(last.id.clone());
            for r in page {
                // Connect records: the platform key does not list them.
                let listed_before_it_existed = r
                    .watermark
                    .as_ref()
                    .is_none_or(|w| w.created >= listed_from.unix_timestamp());
                if !seen.contains(&r.id)
                    && !r.needs_review
                    && r.account.is_none()
                    && !listed_before_it_existed
                {
                    self.flag_missing(&r.id, now, report).await?;
                }
            }
        }
        Ok(())
    }

    /// A local record Stripe does not know (another account or mode, or
    /// data from elsewhere): flag it for review, once.
    async fn flag_missing(
        &self,
        id: &str,
        now: OffsetDateTime,
        report: &mut ReconcileReport,
    ) -> Result<(), ReconcileError> {
        let Some(mut record) = self.store().load(id).await? else {
            return Ok(());
        };
        if record.needs_review {
            return Ok(());
        }
        let access = self.policy.decide(&record, now).access;
        let change = Change {
            kind: ChangeKind::NeedsReview,
            source: ChangeSource::Sweep,
            subscription_id: id.to_owned(),
            customer: record.state.customer.clone(),
            before_status: Some(record.state.status.clone()),
            after_status: record.state.status.clone(),
            before_access: Some(access),
            after_access: access,
            detail: Some("Stripe does not know this subscription".to_owned()),
        };
        if !self.config.dry_run {
            record.needs_review = true;
            push_anomaly(
                &mut record,
                now,
                AnomalyKind::NotFoundAtStripe,
                "not found at Stripe".to_owned(),
            );
            match self.store().save(&record).await {
                Ok(_) => report.writes += 1,
                Err(e) if e.kind() == StoreErrorKind::Conflict => return Ok(()),
                Err(e) => return Err(e.into()),
            }
        }
        report.changes.push(change);
        Ok(())
    }

    fn diff(
        &self,
        before: Option<&SubscriptionRecord>,
        after: &SubscriptionRecord,
        source: ChangeSource,
    ) -> Option<Change> {
        let now = self.now();
        let before_access = before.map(|b| self.policy.decide(b, now).access);
        let after_access = self.policy.decide(after, now).access;
        let before_status = before.map(|b| b.state.status.clone());
        let kind = match (before_access, &before_status) {
            _ if after.needs_review && !before.is_some_and(|b| b.needs_review) => {
                ChangeKind::NeedsReview
            }
            (None, _) => ChangeKind::Discovered,
            (Some(b), Some(s)) => match access_change(b, after_access) {
                Some(kind) => kind,
                None if *s != after.state.status => ChangeKind::StatusChanged,
                None => return None,
            },
            (Some(_), None) => return None,
        };
        Some(Change {
            kind,
            source,
            subscription_id: after.id.clone(),
            customer: after.state.customer.clone(),
            before_status,
            after_status: after.state.status.clone(),
            before_access,
            after_access,
            detail: None,
        })
    }

    async fn notify(&self, changes: &[Change]) {
        if self.config.dry_run {
            return;
        }
        if let Some(n) = &self.notifier {
            for c in changes {
                n.notify(c).await;
            }
        }
    }
}

/// Whether [`SweepScope::StaleFor`] retrieves `record`.
fn worth_retrieving(record: &SubscriptionRecord) -> bool {
    let settled = record.state.status.is_terminal()
        && record.last_verified_with_stripe.is_some()
        && !record.needs_reconcile;
    record.account.is_none() && !record.needs_review && !settled
}

/// A retrieve's id, when its answer arrived, and the answer.
type Fetched = (
    String,
    OffsetDateTime,
    Result<SubscriptionView, ClientError>,
);

/// A retrieve in flight.
type Fetch = Pin<Box<dyn Future<Output = Fetched> + Send>>;

/// Polls futures together until all are done (no runtime needed).
fn join_all<T>(futures: Vec<Pin<Box<dyn Future<Output = T> + Send>>>) -> JoinAll<T> {
    let n = futures.len();
    JoinAll {
        futures: futures.into_iter().map(Some).collect(),
        results: (0..n).map(|_| None).collect(),
    }
}

struct JoinAll<T> {
    futures: Vec<Option<Pin<Box<dyn Future<Output = T> + Send>>>>,
    results: Vec<Option<T>>,
}

// The results are plain values moved out at the end; nothing is pinned in
// place except the boxed futures, which are pinned by their boxes.
impl<T> Unpin for JoinAll<T> {}

impl<T> Future for JoinAll<T> {
    type Output = Vec<T>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Vec<T>> {
        let this = self.get_mut();
        let mut pending = false;
        for (slot, result) in this.futures.iter_mut().zip(this.results.iter_mut()) {
            if let Some(fut) = slot {
                match fut.as_mut().poll(cx) {
                    Poll::Ready(v) => {
                        *result = Some(v);
                        *slot = None;
                    }
                    Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            return Poll::Pending;
        }
        Poll::Ready(this.results.iter_mut().filter_map(Option::take).collect())
    }
}

/// Per-customer grouping helper for reports: changes by customer.
pub fn changes_by_customer(changes: &[Change]) -> HashMap<String, Vec<&Change>> {
    let mut out: HashMap<String, Vec<&Change>> = HashMap::new();
    for c in changes {
        out.entry(c.customer.clone().unwrap_or_default())
            .or_default()
            .push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(status: &str, end: i64) -> SubscriptionView {
        SubscriptionView::from_json(&format!(
            r#"{{"id":"sub_1","object":"subscription","customer":"cus_1","status":"{status}",
            "current_period_start":{},"current_period_end":{end}}}"#,
            end - 1000
        ))
        .unwrap()
    }

    fn at(t: i64) -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp(t).unwrap()
    }

    #[test]
    fn planner_classifies_consequences() {
        let p = AccessPolicy::default();
        let now = at(10_000);
        let hour = Duration::hours(1);
        // Unknown locally, active at Stripe: discovered (not "restored":
        // nothing was taken away that we know of).
        let plan_new = plan(None, &view("active", 20_000), now, &p, hour);
        assert_eq!(plan_new.kind, PlanKind::Repair);
        assert_eq!(plan_new.change, Some(ChangeKind::Discovered));
        assert_eq!(plan_new.before, None);
        let record = plan_new.record.unwrap();
        // In sync and just verified: nothing to write.
        let same = plan(Some(&record), &view("active", 20_000), now, &p, hour);
        assert_eq!(
            (same.kind, same.change, same.record.is_none()),
            (PlanKind::InSync, None, true)
        );
        // An hour later it is re-stamped, still without a change.
        let later = plan(
            Some(&record),
            &view("active", 20_000),
            at(10_000 + 3600),
            &p,
            hour,
        );
        assert_eq!((later.kind, later.change), (PlanKind::InSync, None));
        assert!(later.record.is_some());
        // Stripe says unpaid: revoked.
        let revoked = plan(Some(&record), &view("unpaid", 20_000), now, &p, hour);
        assert_eq!(revoked.change, Some(ChangeKind::AccessRevoked));
        // Period moved only: repaired.
        let moved = plan(Some(&record), &view("active", 25_000), now, &p, hour);
        assert_eq!(moved.change, Some(ChangeKind::Repaired));
        // Past due at Stripe while we had active: status change, access kept (grace).
        let past_due = plan(Some(&record), &view("past_due", 20_000), now, &p, hour);
        assert_eq!(past_due.change, Some(ChangeKind::StatusChanged));
        // A canceled record that Stripe reports active: review.
        let mut canceled = record.clone();
        canceled.state.status = SubscriptionStatus::Canceled;
        let review = plan(Some(&canceled), &view("active", 20_000), now, &p, hour);
        assert_eq!(review.kind, PlanKind::Review);
        assert!(review.record.unwrap().needs_review);
    }

    /// An in-sync record in stale-data grace: re-stamping it as verified
    /// ends the grace, which is a revocation to report, and `after`
    /// describes the record saved.
    #[test]
    fn restamping_an_in_sync_record_reports_the_access_it_ends() {
        let p = AccessPolicy::default();
        let hour = Duration::hours(1);
        let record = plan(None, &view("active", 20_000), at(10_000), &p, hour)
            .record
            .unwrap();
        // Two days after the period end, never verified since: grace.
        let now = at(20_000 + 2 * 86_400);
        assert_eq!(p.decide(&record, now).access, Access::Grace);
        // Stripe's object is still the same (the renewal failed quietly).
        let same = plan(Some(&record), &view("active", 20_000), now, &p, hour);
        assert_eq!(same.kind, PlanKind::InSync);
        let saved = same.record.clone().unwrap();
        assert_eq!(saved.last_verified_with_stripe, Some(now));
        assert_eq!(same.change, Some(ChangeKind::AccessRevoked));
        assert_eq!(
            same.before,
            Some((SubscriptionStatus::Active, Access::Grace))
        );
        assert_eq!(
            same.after,
            (saved.state.status.clone(), p.decide(&saved, now).access)
        );
        assert_eq!(same.after.1, Access::Denied);
        // Recently verified and unchanged: nothing saved, nothing reported,
        // `after` is the local record.
        let again = plan(Some(&saved), &view("active", 20_000), now, &p, hour);
        assert_eq!((again.change, again.record), (None, None));
        assert_eq!(again.after, (SubscriptionStatus::Active, Access::Denied));
    }

    fn poll_once<F: Future + Unpin>(f: &mut F) -> Poll<F::Output> {
        Pin::new(f).poll(&mut Context::from_waker(Waker::noop()))
    }

    #[test]
    fn semaphore_permits_return_on_drop_and_cancellation() {
        let s = Semaphore::new(1);
        let held = match poll_once(&mut s.acquire()) {
            Poll::Ready(p) => p,
            Poll::Pending => panic!("a free permit"),
        };
        // Queued, then cancelled before being handed the permit.
        let mut queued = s.acquire();
        assert!(poll_once(&mut queued).is_pending());
        drop(queued);
        // Two more queue; the first is handed the permit and cancelled
        // before collecting it: the permit passes to the next.
        let mut b = s.acquire();
        let mut c = s.acquire();
        assert!(poll_once(&mut b).is_pending());
        assert!(poll_once(&mut c).is_pending());
        drop(held);
        drop(b);
        let from_c = match poll_once(&mut c) {
            Poll::Ready(p) => p,
            Poll::Pending => panic!("the cancelled waiter's permit was passed on"),
        };
        drop(c);
        assert_eq!(s.available(), 0);
        drop(from_c);
        assert_eq!(s.available(), 1);
        assert!(s.lock().waiters.is_empty() && s.lock().granted.is_empty());
        // A fresh acquire gets it at once.
        assert!(poll_once(&mut s.acquire()).is_ready());
        assert_eq!(s.available(), 1);
    }

    #[test]
    fn semaphore_is_first_come_first_served() {
        let s = Semaphore::new(1);
        let Poll::Ready(held) = poll_once(&mut s.acquire()) else {
            panic!("a free permit")
        };
        let mut first = s.acquire();
        let mut second = s.acquire();
        assert!(poll_once(&mut first).is_pending());
        assert!(poll_once(&mut second).is_pending());
        drop(held);
        // Polled out of order, the permit still goes to the first waiter.
        assert!(poll_once(&mut second).is_pending());
        assert!(poll_once(&mut first).is_ready());
    }
}
