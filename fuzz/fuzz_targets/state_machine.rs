//! Fuzzes the subscription state machine with arbitrary sequences of
//! subscription and invoice events (statuses, times, ids and delivery order
//! chosen by the fuzzer) and checks its invariants after every event:
//!
//! - a terminal status (`canceled`, `incomplete_expired`) is absorbing: no
//!   later event moves the record out of it (a same-second tie between two
//!   terminal statuses is decided by the deterministic rule and flagged);
//! - applying the same event again changes nothing;
//! - the watermark never moves back;
//! - the access decision is total (never panics) and, for a fixed record,
//!   never grows as `now` grows.
#![no_main]

use libfuzzer_sys::fuzz_target;
use stripe_webhook_guard::event::Event;
use stripe_webhook_guard::subscription::{Decision, SubscriptionRecord, decide};
use stripe_webhook_guard::{AccessPolicy, SubscriptionStatus};
use time::{Duration, OffsetDateTime};

const STATUSES: [&str; 9] = [
    "incomplete",
    "incomplete_expired",
    "trialing",
    "active",
    "past_due",
    "unpaid",
    "paused",
    "canceled",
    "something_new",
];
const TYPES: [&str; 6] = [
    "customer.subscription.created",
    "customer.subscription.updated",
    "customer.subscription.deleted",
    "invoice.paid",
    "invoice.payment_failed",
    "customer.subscription.paused",
];

fn event(bytes: &[u8; 6], n: usize) -> Option<Event> {
    let base = 1_700_000_000i64;
    // Few distinct seconds, so ties are common.
    let created = base + i64::from(bytes[0] % 8);
    let kind = TYPES[usize::from(bytes[1]) % TYPES.len()];
    let status = STATUSES[usize::from(bytes[2]) % STATUSES.len()];
    let period_start = base - 86_400 + i64::from(bytes[3] % 4) * 86_400;
    let period_end = period_start + 30 * 86_400;
    let cancel = bytes[4] & 1 == 1;
    let id = format!("evt_{n}_{:02x}", bytes[5]);
    let object = if kind.starts_with("invoice.") {
        let paid = kind == "invoice.paid";
        format!(
            r#"{{"id":"in_{n}","object":"invoice","customer":"cus_1","subscription":"sub_1",
            "status":"{}","paid":{paid},"amount_paid":100,"created":{created},
            "period_start":{period_start},"period_end":{period_end},
            "lines":{{"object":"list","data":[{{"id":"il_1","period":{{"start":{period_start},"end":{period_end}}}}}]}}}}"#,
            if paid { "paid" } else { "open" }
        )
    } else {
        format!(
            r#"{{"id":"sub_1","object":"subscription","customer":"cus_1","status":"{status}",
            "created":{base},"current_period_start":{period_start},"current_period_end":{period_end},
            "cancel_at_period_end":{cancel},"items":{{"object":"list","data":[]}}}}"#
        )
    };
    let json = format!(
        r#"{{"id":"{id}","object":"event","type":"{kind}","created":{created},"livemode":false,
        "api_version":"2024-06-20","data":{{"object":{object}}}}}"#
    );
    Event::parse_unverified(json.as_bytes()).ok()
}

fn is_terminal(s: &SubscriptionStatus) -> bool {
    matches!(
        s,
        SubscriptionStatus::Canceled | SubscriptionStatus::IncompleteExpired
    )
}

fn applied(decision: Decision) -> Option<SubscriptionRecord> {
    match decision {
        Decision::Apply(a) => Some(a.record),
        Decision::Refetch {
            fallback: Some(f), ..
        } => Some(f.record),
        _ => None,
    }
}

fuzz_target!(|data: &[u8]| {
    let now = OffsetDateTime::from_unix_timestamp(1_700_000_100).expect("in range");
    let policy = AccessPolicy::default();
    let mut record: Option<SubscriptionRecord> = None;
    for (n, chunk) in data.chunks_exact(6).take(64).enumerate() {
        let bytes: &[u8; 6] = chunk.try_into().expect("chunks of six");
        let Some(event) = event(bytes, n) else {
            continue;
        };
        let Ok(decision) = decide(record.as_ref(), &event, now) else {
            continue;
        };
        let Some(next) = applied(decision) else {
            continue;
        };
        if let Some(before) = &record {
            if is_terminal(&before.state.status) && before.state.status != next.state.status {
                // Only a same-second tie between two terminal statuses
                // (which Stripe cannot produce) is decided by rule, and
                // flagged for the reconciler.
                assert!(
                    is_terminal(&next.state.status) && next.needs_reconcile,
                    "left a terminal status: {:?} -> {:?}",
                    before.state.status,
                    next.state.status
                );
            }
            if let (Some(a), Some(b)) = (&before.watermark, &next.watermark) {
                assert!(b.created >= a.created, "watermark moved back");
            }
        }
        let again = decide(Some(&next), &event, now).expect("parsed once already");
        if let Some(twice) = applied(again) {
            assert_eq!(
                twice.state, next.state,
                "the same event applied twice changed the record"
            );
        }
        let mut last = None;
        for hours in [0i64, 1, 24, 24 * 40, 24 * 400] {
            let at = now + Duration::hours(hours);
            let access = policy.decide(&next, at).access;
            if let Some(prev) = last {
                assert!(
                    access <= prev,
                    "access grew with time: {prev:?} then {access:?}"
                );
            }
            last = Some(access);
        }
        record = Some(next);
    }
});
