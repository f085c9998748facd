//! Access never grows as time passes, for any record.

use proptest::prelude::*;
use stripe_webhook_guard::access::{Access, AccessPolicy, DunningGrace, PausedCollectionAccess};
use stripe_webhook_guard::event::{CollectionMethod, SubscriptionStatus};
use stripe_webhook_guard::subscription::PauseCollection;
use stripe_webhook_guard::subscription::{SubscriptionRecord, TieRank, Watermark, WatermarkSource};
use time::{Duration, OffsetDateTime};

const T0: i64 = 1_700_000_000;

fn status() -> impl Strategy<Value = SubscriptionStatus> {
    prop_oneof![
        Just(SubscriptionStatus::Incomplete),
        Just(SubscriptionStatus::IncompleteExpired),
        Just(SubscriptionStatus::Trialing),
        Just(SubscriptionStatus::Active),
        Just(SubscriptionStatus::PastDue),
        Just(SubscriptionStatus::Unpaid),
        Just(SubscriptionStatus::Paused),
        Just(SubscriptionStatus::Canceled),
        Just(SubscriptionStatus::Unknown("frozen".into())),
    ]
}

fn opt_time() -> impl Strategy<Value = Option<i64>> {
    prop::option::of(T0 - 60 * 86_400..T0 + 60 * 86_400)
}

prop_compose! {
    fn record()(status in status(), snapshot in any::<bool>(),
                period_end in opt_time(), trial_end in opt_time(), cancel_at in opt_time(),
                cancel_at_period_end in any::<bool>(), paused in any::<bool>(),
                paid_through in opt_time(), last_paid in opt_time(), failed in opt_time(),
                verified in opt_time(), seen in T0 - 60 * 86_400..T0 + 60 * 86_400,
                invoiced in any::<bool>(), days_until_due in prop::option::of(0i64..60),
                invoice_due in opt_time(), next_attempt in opt_time()) -> SubscriptionRecord {
        let mut r = SubscriptionRecord::new("sub_p");
        r.state.status = status;
        r.state.current_period_end = period_end;
        r.state.current_period_start = period_end.map(|e| e - 30 * 86_400);
        r.state.trial_end = trial_end;
        r.state.cancel_at = cancel_at;
        r.state.cancel_at_period_end = cancel_at_period_end;
        r.state.pause_collection = paused.then(|| PauseCollection { behavior: Some("void".into()), resumes_at: None });
        r.paid_through = paid_through;
        r.last_paid_at = last_paid;
        r.last_payment_failed_at = failed;
        r.payment_failures = failed.into_iter().collect();
        r.state.collection_method = Some(if invoiced {
            CollectionMethod::SendInvoice
        } else {
            CollectionMethod::ChargeAutomatically
        });
        r.state.days_until_due = days_until_due;
        r.latest_invoice_due = invoice_due;
        r.next_payment_attempt = next_attempt;
        r.last_verified_with_stripe = verified.and_then(|v| OffsetDateTime::from_unix_timestamp(v).ok());
        if snapshot {
            r.watermark = Some(Watermark {
                created: seen,
                event_id: "evt_p".into(),
                rank: TieRank { terminal: false, period_end: period_end.unwrap_or(i64::MIN), phase: 1 },
                source: WatermarkSource::Event,
            });
        }
        r
    }
}

/// A policy with the given windows (days), dunning cap (days: grace while
/// Stripe retries) and paused-collection setting.
fn policy(windows: (i64, i64, i64, i64), cap: Option<i64>, until_paid: bool) -> AccessPolicy {
    let mut policy = AccessPolicy {
        past_due_grace: Duration::days(windows.0),
        renewal_grace: Duration::days(windows.1),
        stale_grace: Duration::days(windows.2),
        pending_grace: Duration::days(windows.3),
        ..AccessPolicy::default()
    };
    if let Some(cap) = cap {
        policy.dunning = DunningGrace::WhileRetrying {
            cap: Duration::days(cap),
        };
    }
    if until_paid {
        policy.paused_collection = PausedCollectionAccess::UntilPaidPeriodEnds;
    }
    policy
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn access_never_increases_with_time(r in record(), start in T0 - 90 * 86_400..T0 + 90 * 86_400,
                                        steps in proptest::collection::vec(1i64..10 * 86_400, 1..12),
                                        windows in (0i64..10, 0i64..10, 0i64..10, 0i64..10),
                                        cap in prop::option::of(0i64..30), until_paid in any::<bool>()) {
        let policy = policy(windows, cap, until_paid);
        let mut t = start;
        let mut last = policy.decide(&r, OffsetDateTime::from_unix_timestamp(t).unwrap());
        for step in steps {
            t += step;
            let now = OffsetDateTime::from_unix_timestamp(t).unwrap();
            let d = policy.decide(&r, now);
            prop_assert!(d.access <= last.access, "{:?} at {} after {:?}", d, t, last);
            // valid_until is an exclusive bound in the future.
            if let Some(until) = d.valid_until {
                prop_assert!(until > now, "{:?} at {}", d, t);
            }
            if d.access == Access::Denied {
                prop_assert!(d.valid_until.is_none());
            }
            last = d;
        }
    }

    /// `valid_until` is where the access level ends: one second before, the
    /// same level with the same limit; at it, a different answer no better.
    #[test]
    fn valid_until_is_where_the_answer_ends(r in record(), t in T0 - 90 * 86_400..T0 + 90 * 86_400,
                                            cap in prop::option::of(0i64..30), until_paid in any::<bool>()) {
        let policy = policy((3, 1, 3, 1), cap, until_paid);
        let now = OffsetDateTime::from_unix_timestamp(t).unwrap();
        let d = policy.decide(&r, now);
        if let Some(until) = d.valid_until {
            let before = policy.decide(&r, until - Duration::SECOND);
            prop_assert_eq!((before.access, before.valid_until), (d.access, d.valid_until));
            let after = policy.decide(&r, until);
            prop_assert!(after != d && after.access <= d.access, "{:?} then {:?}", d, after);
        }
    }
}
