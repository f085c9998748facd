//! Recovering from missed webhooks: converge to Stripe's truth after
//! downtime, lost events, and customers who arrive before their webhook.
//!
//! Webhooks alone are not enough. An endpoint can be down longer than
//! Stripe's three days of retries, Stripe occasionally fails to send an
//! event at all, and a customer may open the app a second after paying. The
//! [`Reconciler`] has four tools, all reporting what they changed.
//!
//! # Catch-up: `/v1/events`
//!
//! [`Reconciler::catch_up`] pages `/v1/events` from a stored cursor
//! ([`EVENTS_CURSOR`] in the [`CursorStore`]) and
//! feeds every event through the **same processor path, with its real event
//! id**, so an event that also arrives by webhook is processed once.
//!
//! - The first run looks back [`ReconcileConfig::lookback`], at most
//!   [`EVENT_RETENTION`] (30 days, Stripe's retention). Later runs start
//!   [`ReconcileConfig::overlap`] before the cursor (events can appear in the
//!   list shortly after their `created`), never before the retention.
//! - The cursor only moves past events that were processed, deliberately
//!   ignored, or failed permanently (reported by id in
//!   [`ReconcileReport::events_failed_permanently`]). An event whose failure
//!   is retryable holds it back to its `created` for the next run. Without
//!   failures the cursor moves to the time the run started.
//!
//! # Sweep: subscriptions
//!
//! [`Reconciler::sweep`] compares subscriptions with Stripe's objects and
//! repairs them; beyond 30 days it is the only source of truth.
//! [`SweepScope::All`] lists every subscription and flags local records
//! Stripe did not list (except those created while the listing ran);
//! [`SweepScope::StaleFor`] retrieves the records not verified recently.
//! [`Reconciler::refresh_customer`] does the same for one customer: call it
//! at login or from a "restore purchase" button. Both also refresh
//! customers' entitlements (see below).
//!
//! Each object is compared with the local record by the pure [`plan()`]
//! **at the time it was fetched**:
//!
//! - a matching record is in sync, and is re-stamped as verified only when
//!   its last verification is older than [`ReconcileConfig::reverify_after`]
//!   (so a second run right after the first writes nothing);
//! - a differing record is repaired from Stripe's object, and the change is
//!   classified by deciding access before and after with the
//!   [`AccessPolicy`](crate::access::AccessPolicy);
//! - a record that did not exist locally is [`ChangeKind::Discovered`];
//! - a terminal record Stripe reports live, or a record with another
//!   customer, is repaired but flagged `needs_review`.
//!
//! A save that loses a race with a concurrent writer (a webhook) is planned
//! again from the new record, a few times at most.
//!
//! # Connect accounts
//!
//! A platform lists the connected accounts to reconcile in
//! [`ReconcileConfig::connected_accounts`] (and whether the platform's own
//! objects are reconciled, [`ReconcileConfig::platform`]). Each account is
//! reconciled on its own, with the platform's key and the `Stripe-Account`
//! header: catch-up pages that account's `/v1/events` from a cursor of its
//! own ([`events_cursor`]), a sweep lists or retrieves that account's
//! subscriptions and flags only that account's local records, and
//! [`Reconciler::refresh_customer_in`] refreshes one of its customers. All
//! accounts share the reconciler's request budget, one account after the
//! other. A connected account whose run fails (say it was disconnected,
//! and Stripe answers 403) does not stop the others: the failure is
//! reported in [`ReconcileReport::account_failures`] and the account is
//! tried again on the next run; a failure on the platform is returned as
//! an error, as before. Records of accounts not listed are left alone.
//!
//! # Entitlements
//!
//! A customer's entitlements ([`CustomerEntitlements`]) that are
//! unverified — a summary event whose list was incomplete (`has_more`) or
//! tied with the stored one in the same second, and that could not be
//! completed from the API when it arrived — are fetched again from
//! `/v1/entitlements/active_entitlements` by every sweep. `refresh_customer`
//! always refetches the customer's entitlements.
//!
//! # Event generation failures
//!
//! When Stripe fails to generate events it later sends the thin event
//! `v2.core.health.event_generation_failure.resolved`. The processor records
//! it as a [`RecoveryRequest`] (in the cursor store) and the next
//! [`Reconciler::catch_up`] goes back over the affected window: from
//! [`ReconcileConfig::generation_failure_window`] before the alert, for the
//! account it concerns (its `context`). The event that failed is never
//! listed by `/v1/events`, so that run also retrieves the account's records
//! not verified with Stripe since the window's start, which repairs what the
//! lost event would have changed.
//!
//! # Replay
//!
//! [`Reconciler::replay`] and [`Reconciler::replay_dead_letters`] re-run
//! stored failed or dead events after a fix, from the stored payload or,
//! failing that, from Stripe.
//!
//! # Reports and notifications
//!
//! Every change is a [`Change`] (access restored, access revoked, status
//! changed, repaired, needs review, discovered) in the [`ReconcileReport`],
//! handed to the application's [`Notifier`] ("your access is restored",
//! "please update your card") after it was saved, also when the run fails
//! part-way: what was saved before the error is notified before the error is
//! returned. A dry run ([`ReconcileConfig::dry_run`]) reports without
//! writing, processing or notifying.
//!
//! # Requests
//!
//! Requests go through a [`RequestBudget`](crate::client::RequestBudget)
//! ([`Reconciler::with_budget`] or [`Reconciler::with_shared_budget`]): a
//! request rate and a concurrency limit (defaults well under Stripe's
//! test-mode limit of 25/s), and the only layer that retries, with jittered
//! back-off on 429, 5xx and transport failures. The report counts the
//! budget's requests (each retry counts) and rate limits.

use std::collections::HashMap;

use async_trait::async_trait;
use serde::Serialize;
use time::Duration;

use crate::access::Access;
use crate::client::ClientError;
use crate::event::{Event, SubscriptionStatus};
use crate::processor::Error as ProcessError;
use crate::store::{CursorStore, StoreError};
#[cfg(doc)]
use crate::subscription::CustomerEntitlements;

mod clocks;
mod driver;
mod entitlements;
mod plan;
mod replay;

pub use driver::Reconciler;
pub use plan::{Plan, PlanKind, plan};

/// The cursor name `catch_up` keeps in the [`CursorStore`].
pub const EVENTS_CURSOR: &str = "stripe_webhook_guard.events";

/// Stripe keeps events for 30 days.
pub const EVENT_RETENTION: Duration = Duration::days(30);

/// The type of the thin event Stripe sends after it failed to generate
/// events and recovered.
pub const GENERATION_FAILURE_RESOLVED: &str = "v2.core.health.event_generation_failure.resolved";

/// The name of the events cursor of `account` (`None`: the platform's,
/// [`EVENTS_CURSOR`]; a connected account's is `EVENTS_CURSOR.acct_…`).
///
/// ```
/// use stripe_webhook_guard::reconcile::{events_cursor, EVENTS_CURSOR};
/// assert_eq!(events_cursor(None), EVENTS_CURSOR);
/// assert_eq!(events_cursor(Some("acct_1")), "stripe_webhook_guard.events.acct_1");
/// ```
pub fn events_cursor(account: Option<&str>) -> String {
    match account {
        None => EVENTS_CURSOR.to_owned(),
        Some(a) => format!("{EVENTS_CURSOR}.{a}"),
    }
}

/// A catch-up the reconciler owes an account after Stripe reported that it
/// failed to generate events ([`GENERATION_FAILURE_RESOLVED`]). Kept in the
/// cursor store (`stripe_webhook_guard.recover`, `.acct_…` for a connected
/// account) as the `created` of the earliest alert not yet recovered.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// use stripe_webhook_guard::event::Event;
/// use stripe_webhook_guard::reconcile::RecoveryRequest;
/// use stripe_webhook_guard::store::MemoryStore;
///
/// // The thin event as delivered: no data, the account in `context`.
/// let alert = Event::parse_unverified(br#"{"id":"evt_test_65R1","object":"v2.core.event",
///   "type":"v2.core.health.event_generation_failure.resolved",
///   "created":"2026-01-01T00:10:00.000Z","livemode":false,"context":"acct_1"}"#).unwrap();
/// let request = RecoveryRequest::from_event(&alert).unwrap();
/// assert_eq!(request.account.as_deref(), Some("acct_1"));
///
/// let store = MemoryStore::new();
/// request.record(&store).await.unwrap();
/// assert_eq!(RecoveryRequest::pending(&store, Some("acct_1")).await.unwrap(), Some(request.alert_at));
/// # }
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecoveryRequest {
    /// The account whose events failed (`None`: the platform).
    pub account: Option<String>,
    /// When the alert was created (Unix seconds, Stripe's clock): the
    /// window ends here and starts
    /// [`ReconcileConfig::generation_failure_window`] before.
    pub alert_at: i64,
}

impl RecoveryRequest {
    /// The request an event asks for: `Some` for
    /// [`GENERATION_FAILURE_RESOLVED`], `None` for any other type.
    pub fn from_event(event: &Event) -> Option<Self> {
        (event.event_type().as_str() == GENERATION_FAILURE_RESOLVED).then(|| Self {
            account: event.account().map(str::to_owned),
            alert_at: event.created(),
        })
    }

    /// Whether events of this type are recovery triggers.
    pub fn is_trigger(event_type: &crate::event::EventType) -> bool {
        event_type.as_str() == GENERATION_FAILURE_RESOLVED
    }

    fn cursor(account: Option<&str>) -> String {
        match account {
            None => RECOVERY_CURSOR.to_owned(),
            Some(a) => format!("{RECOVERY_CURSOR}.{a}"),
        }
    }

    /// Records the request, merged with a pending one (the earliest alert
    /// wins, so the window covers both).
    ///
    /// # Errors
    ///
    /// [`StoreError`] when the store fails.
    pub async fn record(&self, store: &dyn CursorStore) -> Result<(), StoreError> {
        let name = Self::cursor(self.account.as_deref());
        let pending = Self::pending(store, self.account.as_deref()).await?;
        if pending.is_some_and(|p| p <= self.alert_at) {
            return Ok(());
        }
        store.save_cursor(&name, &self.alert_at.to_string()).await
    }

    /// The earliest alert time of a pending request of `account`.
    ///
    /// # Errors
    ///
    /// [`StoreError`] when the store fails.
    pub async fn pending(
        store: &dyn CursorStore,
        account: Option<&str>,
    ) -> Result<Option<i64>, StoreError> {
        Ok(store
            .load_cursor(&Self::cursor(account))
            .await?
            .and_then(|v| v.parse::<i64>().ok()))
    }

    /// Clears the pending request of `account` when it is still the one
    /// that was recovered (`alert_at`); a different one recorded meanwhile
    /// is kept for the next run.
    async fn settle(
        store: &dyn CursorStore,
        account: Option<&str>,
        alert_at: i64,
    ) -> Result<(), StoreError> {
        if Self::pending(store, account).await? == Some(alert_at) {
            store.save_cursor(&Self::cursor(account), "").await?;
        }
        Ok(())
    }
}

/// The cursor-store key of pending recovery requests.
const RECOVERY_CURSOR: &str = "stripe_webhook_guard.recover";

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
    /// The Connect account of the subscription (`None`: the platform's).
    pub account: Option<String>,
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
    /// The platform's events cursor after the run (Unix seconds).
    pub cursor: Option<i64>,
    /// Each connected account's events cursor after the run.
    pub account_cursors: std::collections::BTreeMap<String, i64>,
    /// Customers whose entitlements were refetched from Stripe.
    pub entitlements_refreshed: u64,
    /// Catch-ups over a window after an event generation failure.
    pub recoveries: u64,
    /// Connected accounts whose part of the run failed (the others went
    /// on): the account and the error. They are tried again next run.
    pub account_failures: Vec<AccountFailure>,
}

/// A connected account whose part of a run failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AccountFailure {
    /// The account.
    pub account: String,
    /// What failed (the error's text).
    pub error: String,
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
        self.account_cursors.extend(other.account_cursors);
        self.entitlements_refreshed += other.entitlements_refreshed;
        self.recoveries += other.recoveries;
        self.account_failures.extend(other.account_failures);
    }

    /// Changes of one kind.
    pub fn changes_of(&self, kind: ChangeKind) -> impl Iterator<Item = &Change> {
        self.changes.iter().filter(move |c| c.kind == kind)
    }
}

/// Reconciliation settings.
// Four independent switches, not a state machine in disguise.
#[allow(clippy::struct_excessive_bools)]
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
    /// Reconcile the platform's own objects and events (default `true`).
    /// A platform that processes only its connected accounts' events sets
    /// it to `false`.
    pub platform: bool,
    /// Connected accounts (`acct_…`) to reconcile too, each with its own
    /// events cursor, through `Stripe-Account` (default: none).
    pub connected_accounts: Vec<String>,
    /// Whether `refresh_customer` also refetches the customer's
    /// entitlements (one more request; default `true`). Sweeps refetch only
    /// entitlements already stored.
    pub entitlements: bool,
    /// After an event generation failure, catch-up starts this long before
    /// the alert (default 1 day; the alert does not say when the failure
    /// began).
    pub generation_failure_window: Duration,
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
            platform: true,
            connected_accounts: Vec::new(),
            entitlements: true,
            generation_failure_window: Duration::days(1),
        }
    }
}

/// Which subscriptions [`Reconciler::sweep`] checks, in each reconciled
/// account (the platform when [`ReconcileConfig::platform`], and every
/// [`ReconcileConfig::connected_accounts`] entry). Local records of other
/// accounts are neither retrieved nor flagged as unknown to Stripe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SweepScope {
    /// Every subscription Stripe lists in each reconciled account (and the
    /// local records of those accounts it does not list).
    All,
    /// Local records never verified, verified before `now - threshold`, or
    /// flagged `needs_reconcile`; one retrieve each. The store is read in
    /// pages of 500 ids. Skipped: records already flagged `needs_review` (a
    /// human has them; [`SweepScope::All`] still compares them), terminal
    /// records (`canceled`, `incomplete_expired`) verified with Stripe at
    /// least once and not flagged `needs_reconcile` (their status cannot
    /// change), and records of accounts not reconciled.
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

/// Access gained or lost between two decisions.
fn access_change(before: Access, after: Access) -> Option<ChangeKind> {
    match (before.allows(), after.allows()) {
        (false, true) => Some(ChangeKind::AccessRestored),
        (true, false) => Some(ChangeKind::AccessRevoked),
        _ => None,
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
