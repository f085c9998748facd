//! The pure planner: what to do with one subscription, given the local
//! record and Stripe's object at a given time. No IO and no clock: `now` is
//! an argument, so the same inputs always give the same plan.

use serde::Serialize;
use time::Duration;

use super::{ChangeKind, access_change};
use crate::access::{Access, AccessPolicy};
use crate::event::{SubscriptionStatus, SubscriptionView};
use crate::subscription::{self, AnomalyKind, FetchTime, SubscriptionRecord, SubscriptionState};

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

/// Compares a local record with Stripe's object, fetched from `account`
/// (`None`: the platform) at `fetched_at` (pure). The host's time of the
/// fetch is the `now` of every access decision and of the verification
/// stamp; Stripe's time (the answer's `Date`), when known, stamps the
/// repaired record's watermark, so a host clock ahead of Stripe's does not
/// make the next events look stale. A plain `OffsetDateTime` is a fetch
/// known by the host's clock only.
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
/// - A terminal record that Stripe reports live, a different customer, or a
///   record of another Connect account, is repaired but flagged for review.
/// - A record created or repaired from a connected account's object belongs
///   to that account.
pub fn plan(
    local: Option<&SubscriptionRecord>,
    stripe: &SubscriptionView,
    account: Option<&str>,
    fetched_at: impl Into<FetchTime>,
    policy: &AccessPolicy,
    reverify_after: Duration,
) -> Plan {
    let fetched_at: FetchTime = fetched_at.into();
    let now = fetched_at.local;
    let truth = SubscriptionState::from_view(stripe);
    let before = local.map(|r| (r.state.status.clone(), policy.decide(r, now).access));
    if let Some(r) = local
        && r.has_snapshot()
        && r.matches(&truth)
        && r.account.as_deref() == account
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
    let mut repaired = subscription::from_stripe(local, stripe, fetched_at, None).record;
    let mut detail = None;
    if repaired.account.is_none() {
        repaired.account = account.map(str::to_owned);
    }
    if let Some(r) = local {
        if let Some(theirs) = r.account.as_deref().filter(|a| Some(*a) != account) {
            detail = Some(format!(
                "record belongs to account {theirs}, Stripe listed it in {}",
                account.unwrap_or("the platform")
            ));
        } else if r.state.status.is_terminal() && !truth.status.is_terminal() {
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
            repaired.note(now.unix_timestamp(), None, AnomalyKind::Diverged, text);
        }
    }
    let kind = if detail.is_some() {
        repaired.needs_review = true;
        if let Some(text) = &detail {
            repaired.note(
                now.unix_timestamp(),
                None,
                AnomalyKind::Diverged,
                text.clone(),
            );
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

#[cfg(test)]
mod tests {
    use super::*;
    use time::OffsetDateTime;

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

    /// A platform object fetched at `now` by the host's clock only.
    fn plan_at(
        local: Option<&SubscriptionRecord>,
        stripe: &SubscriptionView,
        now: OffsetDateTime,
        policy: &AccessPolicy,
        reverify_after: Duration,
    ) -> Plan {
        plan(local, stripe, None, now, policy, reverify_after)
    }

    #[test]
    fn planner_classifies_consequences() {
        let p = AccessPolicy::default();
        let now = at(10_000);
        let hour = Duration::hours(1);
        // Unknown locally, active at Stripe: discovered (not "restored":
        // nothing was taken away that we know of).
        let plan_new = plan(None, &view("active", 20_000), None, now, &p, hour);
        assert_eq!(plan_new.kind, PlanKind::Repair);
        assert_eq!(plan_new.change, Some(ChangeKind::Discovered));
        assert_eq!(plan_new.before, None);
        let record = plan_new.record.unwrap();
        // In sync and just verified: nothing to write.
        let same = plan_at(Some(&record), &view("active", 20_000), now, &p, hour);
        assert_eq!(
            (same.kind, same.change, same.record.is_none()),
            (PlanKind::InSync, None, true)
        );
        // An hour later it is re-stamped, still without a change.
        let later = plan_at(
            Some(&record),
            &view("active", 20_000),
            at(10_000 + 3600),
            &p,
            hour,
        );
        assert_eq!((later.kind, later.change), (PlanKind::InSync, None));
        assert!(later.record.is_some());
        // Stripe says unpaid: revoked.
        let revoked = plan_at(Some(&record), &view("unpaid", 20_000), now, &p, hour);
        assert_eq!(revoked.change, Some(ChangeKind::AccessRevoked));
        // Period moved only: repaired.
        let moved = plan_at(Some(&record), &view("active", 25_000), now, &p, hour);
        assert_eq!(moved.change, Some(ChangeKind::Repaired));
        // Past due at Stripe while we had active: status change, access kept (grace).
        let past_due = plan_at(Some(&record), &view("past_due", 20_000), now, &p, hour);
        assert_eq!(past_due.change, Some(ChangeKind::StatusChanged));
        // A canceled record that Stripe reports active: review.
        let mut canceled = record.clone();
        canceled.state.status = SubscriptionStatus::Canceled;
        let review = plan_at(Some(&canceled), &view("active", 20_000), now, &p, hour);
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
        let record = plan(None, &view("active", 20_000), None, at(10_000), &p, hour)
            .record
            .unwrap();
        // Two days after the period end, never verified since: grace.
        let now = at(20_000 + 2 * 86_400);
        assert_eq!(p.decide(&record, now).access, Access::Grace);
        // Stripe's object is still the same (the renewal failed quietly).
        let same = plan_at(Some(&record), &view("active", 20_000), now, &p, hour);
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
        let again = plan_at(Some(&saved), &view("active", 20_000), now, &p, hour);
        assert_eq!((again.change, again.record), (None, None));
        assert_eq!(again.after, (SubscriptionStatus::Active, Access::Denied));
    }

    /// A host clock a minute ahead of Stripe's: the repaired record's
    /// watermark is Stripe's time, its verification stamp the host's.
    #[test]
    fn stripe_time_stamps_the_watermark_and_the_host_time_the_verification() {
        let p = AccessPolicy::default();
        let host = at(10_060);
        let fetched = FetchTime {
            local: host,
            stripe: Some(at(10_000)),
        };
        let plan_new = plan(
            None,
            &view("active", 20_000),
            None,
            fetched,
            &p,
            Duration::hours(1),
        );
        let record = plan_new.record.unwrap();
        assert_eq!(record.watermark.unwrap().created, 10_000);
        assert_eq!(record.last_verified_with_stripe, Some(host));
    }

    #[test]
    fn connected_objects_belong_to_their_account() {
        let p = AccessPolicy::default();
        let hour = Duration::hours(1);
        let new = plan(
            None,
            &view("active", 20_000),
            Some("acct_1"),
            at(10_000),
            &p,
            hour,
        );
        let record = new.record.unwrap();
        assert_eq!(record.account.as_deref(), Some("acct_1"));
        // In sync within its account.
        let same = plan(
            Some(&record),
            &view("active", 20_000),
            Some("acct_1"),
            at(10_000),
            &p,
            hour,
        );
        assert_eq!((same.kind, same.record), (PlanKind::InSync, None));
        // Listed in another account: a human looks.
        let other = plan(
            Some(&record),
            &view("active", 20_000),
            Some("acct_2"),
            at(10_000),
            &p,
            hour,
        );
        assert_eq!(other.kind, PlanKind::Review);
        assert!(other.detail.unwrap().contains("acct_1"));
    }
}
