//! Counters, gauges and histograms for Prometheus and other dashboards,
//! recorded through the [`metrics`](https://docs.rs/metrics) facade (feature
//! `metrics`).
//!
//! The crate records; the application chooses the exporter. With
//! `metrics-exporter-prometheus`, install its recorder once at start and
//! serve its rendering on `GET /metrics` (the server example does, behind
//! its admin token). Without the feature every recording function here
//! compiles to nothing; the metric names below are always available.
//!
//! | name | type | labels | what |
//! |---|---|---|---|
//! | `stripe_webhook_guard_deliveries_total` | counter | `outcome` | every delivery or replayed event and how it ended: `applied`, `refetched`, `stale`, `no_change`, `none`, `entitlements`, `duplicate`, `ignored`, `queued`, `dead_lettered`, or the error label (`signature_mismatch`, `in_flight`, `store_error`, `failed`, …) |
//! | `stripe_webhook_guard_handler_duration_seconds` | histogram | | time spent in the subscription effect and the application's handler, per attempt that completed |
//! | `stripe_webhook_guard_lease_losses_total` | counter | | completions or failures refused because another worker took the event over |
//! | `stripe_webhook_guard_refetches_total` | counter | | subscriptions fetched from Stripe while processing an event |
//! | `stripe_webhook_guard_refetch_failures_total` | counter | | of those, the fetches that failed |
//! | `stripe_webhook_guard_dead_letters_total` | counter | | events dead-lettered (attempts exhausted or a permanent failure) |
//! | `stripe_webhook_guard_inbox_backlog` | gauge | | events not yet settled (pending, processing, failed) |
//! | `stripe_webhook_guard_inbox_oldest_age_seconds` | gauge | | how long the oldest of them has waited (0 when none) |
//! | `stripe_webhook_guard_dead_letters_stored` | gauge | | dead-lettered events kept for replay |
//! | `stripe_webhook_guard_reconcile_changes_total` | counter | `kind`, `source` | reconciliation changes: `kind` is `access_restored`, `access_revoked`, `status_changed`, `repaired`, `needs_review` or `discovered`; `source` is `catch_up`, `sweep`, `refresh` or `replay` |
//! | `stripe_webhook_guard_stripe_budget_wait_seconds` | histogram | | how long a Stripe request waited for the request budget (pacing and the in-flight limit) |
//! | `stripe_webhook_guard_stripe_rate_limited_total` | counter | | Stripe answers with 429 |
//!
//! No label ever holds a customer, subscription or event id: labels are
//! drawn from the fixed sets above, so the number of series stays bounded.
//!
//! The three gauges are set by [`observe_ledger`], which scans the ledger's
//! unsettled and dead entries; call it when the metrics are scraped (the
//! server example does) or on a timer. [`Inbox::backlog`](crate::inbox::Inbox::backlog)
//! sets the backlog gauge too.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! use std::sync::Arc;
//! use stripe_webhook_guard::metrics::{LedgerSnapshot, observe_ledger};
//! use stripe_webhook_guard::MemoryStore;
//!
//! let store = Arc::new(MemoryStore::new());
//! let now = time::OffsetDateTime::now_utc();
//! let snapshot = observe_ledger(store.as_ref(), now).await.unwrap();
//! assert_eq!(snapshot, LedgerSnapshot { now: Some(now), ..LedgerSnapshot::default() });
//! # }
//! ```

use time::OffsetDateTime;

use crate::ledger::{LedgerEntry, LedgerQuery, LedgerState};
use crate::processor::{Error, Outcome};
use crate::reconcile::{ChangeKind, ChangeSource};
use crate::store::{EventLedger, StoreError};

/// Counter: deliveries by `outcome`.
pub const DELIVERIES: &str = "stripe_webhook_guard_deliveries_total";
/// Histogram: seconds in the subscription effect and the handler.
pub const HANDLER_SECONDS: &str = "stripe_webhook_guard_handler_duration_seconds";
/// Counter: lease losses.
pub const LEASE_LOSSES: &str = "stripe_webhook_guard_lease_losses_total";
/// Counter: refetches from Stripe.
pub const REFETCHES: &str = "stripe_webhook_guard_refetches_total";
/// Counter: refetches that failed.
pub const REFETCH_FAILURES: &str = "stripe_webhook_guard_refetch_failures_total";
/// Counter: events dead-lettered.
pub const DEAD_LETTERS: &str = "stripe_webhook_guard_dead_letters_total";
/// Gauge: unsettled events.
pub const INBOX_BACKLOG: &str = "stripe_webhook_guard_inbox_backlog";
/// Gauge: age of the oldest unsettled event, seconds.
pub const INBOX_OLDEST_AGE: &str = "stripe_webhook_guard_inbox_oldest_age_seconds";
/// Gauge: dead letters kept.
pub const DEAD_LETTERS_STORED: &str = "stripe_webhook_guard_dead_letters_stored";
/// Counter: reconciliation changes by `kind` and `source`.
pub const RECONCILE_CHANGES: &str = "stripe_webhook_guard_reconcile_changes_total";
/// Histogram: seconds a Stripe request waited for the request budget.
pub const BUDGET_WAIT_SECONDS: &str = "stripe_webhook_guard_stripe_budget_wait_seconds";
/// Counter: Stripe answers with 429.
pub const RATE_LIMITED: &str = "stripe_webhook_guard_stripe_rate_limited_total";

/// How many ledger entries [`observe_ledger`] reads at most per state group
/// before it stops counting (the snapshot then says `truncated`).
pub const SCAN_LIMIT: usize = 10_000;

/// Records how a delivery (or a replayed or caught-up event, or an inbox
/// worker's attempt) ended: the outcome's or the error's label. A
/// `dead_lettered` outcome also counts a dead letter, a `lease_lost` error a
/// lease loss.
#[inline]
pub(crate) fn delivered(result: &Result<Outcome, Error>) {
    let outcome = match result {
        Ok(o) => o.as_str(),
        Err(e) => e.as_str(),
    };
    delivery(outcome);
}

#[inline]
fn delivery(outcome: &'static str) {
    #[cfg(feature = "metrics")]
    {
        ::metrics::counter!(DELIVERIES, "outcome" => outcome).increment(1);
        match outcome {
            "dead_lettered" => ::metrics::counter!(DEAD_LETTERS).increment(1),
            "lease_lost" => ::metrics::counter!(LEASE_LOSSES).increment(1),
            _ => {}
        }
    }
    #[cfg(not(feature = "metrics"))]
    let _ = outcome;
}

/// Records the time one attempt spent in the effect and the handler
/// (attempts that reached completion).
#[inline]
pub(crate) fn handler_latency(elapsed: std::time::Duration) {
    #[cfg(feature = "metrics")]
    ::metrics::histogram!(HANDLER_SECONDS).record(elapsed.as_secs_f64());
    #[cfg(not(feature = "metrics"))]
    let _ = elapsed;
}

/// Records a refetch from Stripe and whether it succeeded.
#[inline]
pub(crate) fn refetch(ok: bool) {
    #[cfg(feature = "metrics")]
    {
        ::metrics::counter!(REFETCHES).increment(1);
        if !ok {
            ::metrics::counter!(REFETCH_FAILURES).increment(1);
        }
    }
    #[cfg(not(feature = "metrics"))]
    let _ = ok;
}

/// Sets the backlog gauge.
#[inline]
pub(crate) fn inbox_backlog(count: u64) {
    #[cfg(feature = "metrics")]
    #[allow(clippy::cast_precision_loss)] // a gauge; exact below 2^53
    ::metrics::gauge!(INBOX_BACKLOG).set(count as f64);
    #[cfg(not(feature = "metrics"))]
    let _ = count;
}

/// Records one reconciliation change.
#[inline]
pub(crate) fn reconcile_change(kind: ChangeKind, source: ChangeSource) {
    #[cfg(feature = "metrics")]
    ::metrics::counter!(
        RECONCILE_CHANGES,
        "kind" => change_kind_label(kind),
        "source" => change_source_label(source)
    )
    .increment(1);
    #[cfg(not(feature = "metrics"))]
    let _ = (kind, source);
}

/// Records how long a Stripe request waited for the budget.
#[inline]
pub(crate) fn budget_wait(waited: std::time::Duration) {
    #[cfg(feature = "metrics")]
    ::metrics::histogram!(BUDGET_WAIT_SECONDS).record(waited.as_secs_f64());
    #[cfg(not(feature = "metrics"))]
    let _ = waited;
}

/// Records a 429 from Stripe.
#[inline]
pub(crate) fn rate_limited() {
    #[cfg(feature = "metrics")]
    ::metrics::counter!(RATE_LIMITED).increment(1);
}

/// The `kind` label of a reconciliation change.
pub fn change_kind_label(kind: ChangeKind) -> &'static str {
    match kind {
        ChangeKind::AccessRestored => "access_restored",
        ChangeKind::AccessRevoked => "access_revoked",
        ChangeKind::StatusChanged => "status_changed",
        ChangeKind::Repaired => "repaired",
        ChangeKind::NeedsReview => "needs_review",
        ChangeKind::Discovered => "discovered",
    }
}

/// The `source` label of a reconciliation change.
pub fn change_source_label(source: ChangeSource) -> &'static str {
    match source {
        ChangeSource::CatchUp => "catch_up",
        ChangeSource::Sweep => "sweep",
        ChangeSource::Refresh => "refresh",
        ChangeSource::Replay => "replay",
    }
}

/// What [`observe_ledger`] found.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LedgerSnapshot {
    /// When it looked (the `now` it was given).
    pub now: Option<OffsetDateTime>,
    /// Events not yet settled: pending, processing or failed.
    pub unsettled: u64,
    /// Of those, failed (retryable) ones.
    pub failed: u64,
    /// Dead-lettered events kept for replay.
    pub dead: u64,
    /// The oldest unsettled event: its id and when this store first saw it.
    pub oldest_unsettled: Option<(String, OffsetDateTime)>,
    /// Whether a count stopped at [`SCAN_LIMIT`] (the true number is larger).
    pub truncated: bool,
}

impl LedgerSnapshot {
    /// How long the oldest unsettled event has waited, in whole seconds
    /// (0 when there is none).
    pub fn oldest_age_seconds(&self) -> i64 {
        match (&self.oldest_unsettled, self.now) {
            (Some((_, seen)), Some(now)) => (now - *seen).whole_seconds().max(0),
            _ => 0,
        }
    }
}

/// Reads the ledger's unsettled and dead entries (at most [`SCAN_LIMIT`]
/// of each), and sets the backlog, oldest-age and dead-letter gauges.
///
/// Ages are measured from `now` to each entry's `first_seen_at`, both taken
/// as given (pass the processor's clock).
///
/// # Errors
///
/// [`StoreError`] when listing the ledger fails.
pub async fn observe_ledger(
    ledger: &dyn EventLedger,
    now: OffsetDateTime,
) -> Result<LedgerSnapshot, StoreError> {
    let mut snapshot = LedgerSnapshot {
        now: Some(now),
        ..LedgerSnapshot::default()
    };
    let unsettled = [
        LedgerState::Pending,
        LedgerState::Processing,
        LedgerState::Failed,
    ];
    let truncated_unsettled = scan(ledger, &unsettled, |entry| {
        snapshot.unsettled += 1;
        if entry.state == LedgerState::Failed {
            snapshot.failed += 1;
        }
        let older = snapshot
            .oldest_unsettled
            .as_ref()
            .is_none_or(|(_, seen)| entry.first_seen_at < *seen);
        if older {
            snapshot.oldest_unsettled = Some((entry.key.event_id.clone(), entry.first_seen_at));
        }
    })
    .await?;
    let truncated_dead = scan(ledger, &[LedgerState::Dead], |_| snapshot.dead += 1).await?;
    snapshot.truncated = truncated_unsettled || truncated_dead;
    inbox_backlog(snapshot.unsettled);
    #[cfg(feature = "metrics")]
    {
        #[allow(clippy::cast_precision_loss)] // gauges; exact below 2^53
        {
            ::metrics::gauge!(INBOX_OLDEST_AGE).set(snapshot.oldest_age_seconds() as f64);
            ::metrics::gauge!(DEAD_LETTERS_STORED).set(snapshot.dead as f64);
        }
    }
    Ok(snapshot)
}

/// Calls `visit` on every entry in `states`, page by page, stopping after
/// [`SCAN_LIMIT`]; returns whether it stopped early.
async fn scan(
    ledger: &dyn EventLedger,
    states: &[LedgerState],
    mut visit: impl FnMut(&LedgerEntry),
) -> Result<bool, StoreError> {
    const PAGE: usize = 500;
    let mut query = LedgerQuery::states(states, PAGE);
    let mut seen = 0usize;
    loop {
        let page = ledger.list(&query).await?;
        for entry in &page {
            if seen == SCAN_LIMIT {
                return Ok(true);
            }
            seen += 1;
            visit(entry);
        }
        match page.last() {
            Some(last) if page.len() == PAGE => query.after = Some(last.key.event_id.clone()),
            _ => return Ok(false),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::Clock;
    use crate::ledger::{ClaimOutcome, ClaimRequest, EventKey, Failure, Fingerprint};
    use crate::store::MemoryStore;

    fn claim(id: &str) -> ClaimRequest {
        ClaimRequest {
            key: EventKey::new(id, None),
            event_type: "customer.subscription.updated".into(),
            event_created: 1_767_225_600,
            fingerprint: Fingerprint([7; 32]),
            lease: time::Duration::minutes(5),
            max_attempts: 5,
        }
    }

    #[tokio::test]
    async fn snapshot_counts_unsettled_and_dead_and_finds_the_oldest() {
        let clock = crate::clock::ManualClock::at_unix(1_767_225_600);
        let store = MemoryStore::with_clock(std::sync::Arc::new(clock.clone()));
        // evt_b is seen first, then evt_a: the oldest is by first sight,
        // not by id.
        let ClaimOutcome::Claimed(lease_b) = store.claim(&claim("evt_b")).await.unwrap() else {
            panic!("claim")
        };
        clock.advance(time::Duration::seconds(30));
        let ClaimOutcome::Claimed(lease_a) = store.claim(&claim("evt_a")).await.unwrap() else {
            panic!("claim")
        };
        store
            .fail(
                &lease_a,
                &Failure {
                    error: "boom".into(),
                    retryable: false,
                    max_attempts: 5,
                    payload: None,
                },
            )
            .await
            .unwrap();
        clock.advance(time::Duration::seconds(15));
        let snap = observe_ledger(&store, clock.now()).await.unwrap();
        assert_eq!(snap.unsettled, 1, "evt_b still processing");
        assert_eq!(snap.dead, 1, "evt_a dead");
        assert_eq!(snap.oldest_unsettled.as_ref().unwrap().0, "evt_b");
        assert_eq!(snap.oldest_age_seconds(), 45);
        assert!(!snap.truncated);
        let _ = lease_b;
    }

    #[test]
    fn labels_are_snake_case_and_never_ids() {
        assert_eq!(
            change_kind_label(ChangeKind::AccessRestored),
            "access_restored"
        );
        assert_eq!(change_source_label(ChangeSource::CatchUp), "catch_up");
    }
}
