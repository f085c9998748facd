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
//! ([`EVENTS_CURSOR`] in the [`CursorStore`](crate::store::CursorStore)) and
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
//! Records of Connect accounts (`account` set) are not reconciled by this
//! version: the platform key cannot list connected accounts'
//! subscriptions. [`Reconciler::refresh_customer`] does the same for one
//! customer: call it at login or from a "restore purchase" button.
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
use crate::event::SubscriptionStatus;
use crate::processor::Error as ProcessError;
use crate::store::StoreError;

mod driver;
mod plan;

pub use driver::Reconciler;
pub use plan::{Plan, PlanKind, plan};

/// The cursor name `catch_up` keeps in the [`CursorStore`](crate::store::CursorStore).
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
