//! The state machine: the transition table and the pure decision of what a
//! subscription event does to a record (see the [parent module](super) for
//! the rules).

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use super::model::{
    AnomalyKind, SubscriptionRecord, SubscriptionState, TieRank, Watermark, WatermarkSource,
};
use super::payments::{apply_checkout, apply_invoice};
use crate::event::{Event, EventType, ParseError, SubscriptionStatus, SubscriptionView};

/// How one status relates to the next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransitionKind {
    /// The same status.
    Same,
    /// An edge of the table.
    Direct,
    /// Reachable only through statuses in between (an event was missed), or
    /// involving a status this crate does not know.
    Gap,
    /// Cannot happen: out of a terminal status, or into a status that only
    /// starts a subscription.
    Impossible,
}

/// The transition table of the [module docs](super). `from == None` is a new
/// subscription.
pub fn transition(from: Option<&SubscriptionStatus>, to: &SubscriptionStatus) -> TransitionKind {
    use SubscriptionStatus as S;
    let Some(from) = from else {
        return match to {
            S::Incomplete | S::Trialing | S::Active => TransitionKind::Direct,
            _ => TransitionKind::Gap,
        };
    };
    if from == to {
        return TransitionKind::Same;
    }
    // Nothing leaves a terminal status, not even a status this crate does
    // not know yet (a resubscription is a new subscription id).
    if from.is_terminal() {
        return TransitionKind::Impossible;
    }
    if matches!(from, S::Unknown(_)) || matches!(to, S::Unknown(_)) {
        return TransitionKind::Gap;
    }
    let direct = match from {
        S::Incomplete => matches!(to, S::Active | S::IncompleteExpired),
        S::Trialing => matches!(to, S::Active | S::PastDue | S::Paused | S::Canceled),
        S::Active => matches!(to, S::PastDue | S::Canceled | S::Trialing | S::Paused),
        S::PastDue => matches!(to, S::Active | S::Canceled | S::Unpaid | S::Paused),
        S::Unpaid => matches!(to, S::Active | S::Canceled),
        S::Paused => matches!(to, S::Active | S::PastDue | S::Canceled),
        S::Canceled | S::IncompleteExpired | S::Unknown(_) => false,
    };
    if direct {
        return TransitionKind::Direct;
    }
    // Everything below is reachable from every live status except the two
    // that only start a subscription; nothing leaves a terminal status.
    let reachable = !from.is_terminal()
        && !matches!(to, S::Incomplete)
        && (!matches!(to, S::IncompleteExpired) || matches!(from, S::Incomplete));
    if reachable {
        TransitionKind::Gap
    } else {
        TransitionKind::Impossible
    }
}

/// Why a decision asks Stripe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum RefetchReason {
    /// Two different events of the same second disagree.
    Tie,
    /// The status cannot follow the current one.
    ImpossibleTransition,
    /// The subscription is not in the store yet.
    UnknownSubscription,
    /// A thin event carries no snapshot.
    ThinEvent,
    /// A 2012-era event names no subscription id; ask by customer.
    NoSubscriptionId,
    /// A payment restored a past-due record; confirm the status.
    ConfirmRestore,
}

/// Why a decision saves a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ApplyReason {
    /// A newer snapshot.
    Snapshot,
    /// A new subscription created from its snapshot (no client).
    Created,
    /// A tie decided by the deterministic rule (no client).
    TieRule,
    /// A payment fact (paid through, dunning clock, latest invoice).
    Payment,
    /// A payment restored a past-due or unpaid record.
    PaymentRestored,
    /// A Checkout Session linked the subscription.
    CheckoutLinked,
    /// An impossible transition was recorded as an anomaly; state kept.
    AnomalyRecorded,
    /// Stripe's object replaced the record.
    Refetched,
    /// This event was applied by an earlier attempt (which then failed);
    /// the change reported is the one it made.
    AlreadyApplied,
}

/// A record to save, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    /// The new record (its `version` is the one loaded, for the CAS save).
    pub record: SubscriptionRecord,
    /// Why.
    pub reason: ApplyReason,
    /// The status before and after, when it changed.
    pub status_change: Option<(SubscriptionStatus, SubscriptionStatus)>,
}

/// What to do with an event, from [`decide`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Decision {
    /// Save this record.
    Apply(Box<Applied>),
    /// Older than the record's watermark: ignore.
    Stale {
        /// The watermark that is newer.
        watermark: Watermark,
    },
    /// Changes nothing (the same event again, or a tie that agrees).
    NoChange,
    /// Ask Stripe for the subscription. With no client (or if the fetch
    /// fails), save `fallback` when there is one.
    Refetch {
        /// The subscription to fetch, when known.
        subscription_id: Option<String>,
        /// The customer, to list by when the id is unknown.
        customer: Option<String>,
        /// Why.
        reason: RefetchReason,
        /// What to save without Stripe's answer.
        fallback: Option<Box<Applied>>,
    },
    /// The event has no effect on subscriptions.
    NotApplicable {
        /// Why.
        reason: &'static str,
    },
}

/// Decides what `event` does to `current` (the stored record of the
/// subscription the event is about, if any). Pure: `now` is only used to
/// timestamp anomalies.
///
/// # Errors
///
/// [`ParseError`] when the event's object cannot be read as
/// the kind its type promises.
pub fn decide(
    current: Option<&SubscriptionRecord>,
    event: &Event,
    now: OffsetDateTime,
) -> Result<Decision, ParseError> {
    let t = event.event_type();
    if event.is_thin() {
        if !t.has_subscription_effect() {
            return Ok(Decision::NotApplicable {
                reason: "event type has no subscription effect",
            });
        }
        let related = event.related_object();
        let id = related
            .filter(|r| r.object_type == "subscription")
            .map(|r| r.id.clone());
        return Ok(Decision::Refetch {
            subscription_id: id.or_else(|| current.map(|c| c.id.clone())),
            customer: None,
            reason: RefetchReason::ThinEvent,
            fallback: None,
        });
    }
    if t.is_subscription() {
        let view = event.subscription()?;
        Ok(apply_snapshot(current, event, &view, now))
    } else if t.is_invoice() {
        let view = event.invoice()?;
        Ok(apply_invoice(current, event, &view))
    } else if t.is_checkout() {
        let view = event.checkout_session()?;
        Ok(apply_checkout(current, event, &view))
    } else {
        Ok(Decision::NotApplicable {
            reason: "event type has no subscription effect",
        })
    }
}

/// The subscription id an event is about, when it names one: the object id
/// of a subscription event, the subscription of an invoice or Checkout
/// Session, or a thin event's related subscription.
///
/// # Errors
///
/// [`ParseError`] when the object cannot be read.
pub fn subscription_id_of(event: &Event) -> Result<Option<String>, ParseError> {
    let t = event.event_type();
    if event.is_thin() {
        return Ok(event
            .related_object()
            .filter(|r| r.object_type == "subscription")
            .map(|r| r.id.clone()));
    }
    Ok(if t.is_subscription() {
        event.subscription()?.id
    } else if t.is_invoice() {
        event.invoice()?.subscription_id
    } else if t.is_checkout() {
        event.checkout_session()?.subscription
    } else {
        None
    })
}

/// The tie rank of a subscription event.
pub fn tie_rank(event_type: &EventType, view: &SubscriptionView) -> TieRank {
    TieRank {
        terminal: view.status.is_terminal(),
        period_end: view.current_period_end.unwrap_or(i64::MIN),
        phase: match event_type {
            EventType::SubscriptionCreated => 0,
            EventType::SubscriptionDeleted => 2,
            _ => 1,
        },
    }
}

fn apply_snapshot(
    current: Option<&SubscriptionRecord>,
    event: &Event,
    view: &SubscriptionView,
    now: OffsetDateTime,
) -> Decision {
    let Some(id) = view.id.clone().or_else(|| current.map(|c| c.id.clone())) else {
        // 2012-era events name only the customer.
        return Decision::Refetch {
            subscription_id: None,
            customer: view.customer.clone(),
            reason: RefetchReason::NoSubscriptionId,
            fallback: None,
        };
    };
    let mark = Watermark {
        created: event.created(),
        event_id: event.id().to_owned(),
        rank: tie_rank(event.event_type(), view),
        source: WatermarkSource::Event,
    };
    let incoming = SubscriptionState::from_view(view);
    let now_s = now.unix_timestamp();

    let Some(cur) = current else {
        let mut record = SubscriptionRecord::new(&id);
        record.account = event.account().map(str::to_owned);
        record.livemode = Some(event.livemode());
        let kind = transition(None, &incoming.status);
        adopt(&mut record, incoming, mark);
        if kind == TransitionKind::Gap {
            // Not a first status: earlier events are missing. Fine, but say so.
            let detail = format!("first event seen shows status {}", record.state.status);
            record.note(
                now_s,
                Some(event.id()),
                AnomalyKind::MissedTransition,
                detail,
            );
        }
        return Decision::Refetch {
            subscription_id: Some(id),
            customer: view.customer.clone(),
            reason: RefetchReason::UnknownSubscription,
            fallback: Some(Box::new(Applied {
                status_change: Some((SubscriptionStatus::Incomplete, record.state.status.clone()))
                    .filter(|(a, b)| a != b),
                record,
                reason: ApplyReason::Created,
            })),
        };
    };

    let Some(wm) = &cur.watermark else {
        // A stub made from invoice or Checkout facts: the first snapshot.
        let mut record = cur.clone();
        let before = record.state.status.clone();
        adopt(&mut record, incoming, mark);
        restore_if_paid_since(&mut record);
        return Decision::Apply(Box::new(Applied {
            status_change: change(&before, &record.state.status),
            record,
            reason: ApplyReason::Created,
        }));
    };

    if wm.event_id == event.id() {
        return Decision::NoChange;
    }
    if event.created() < wm.created {
        return Decision::Stale {
            watermark: wm.clone(),
        };
    }
    if event.created() == wm.created {
        return decide_tie(cur, wm, incoming, mark);
    }

    // Newer.
    let kind = transition(Some(&cur.state.status), &incoming.status);
    if kind == TransitionKind::Impossible {
        let mut record = cur.clone();
        let detail = format!(
            "{} -> {} is impossible; state kept",
            cur.state.status, incoming.status
        );
        record.note(
            now_s,
            Some(event.id()),
            AnomalyKind::ImpossibleTransition,
            detail,
        );
        record.needs_review = true;
        return Decision::Refetch {
            subscription_id: Some(cur.id.clone()),
            customer: cur.state.customer.clone(),
            reason: RefetchReason::ImpossibleTransition,
            fallback: Some(Box::new(Applied {
                record,
                reason: ApplyReason::AnomalyRecorded,
                status_change: None,
            })),
        };
    }
    let mut record = cur.clone();
    let before = record.state.status.clone();
    if kind == TransitionKind::Gap {
        let (anomaly, detail) = if matches!(incoming.status, SubscriptionStatus::Unknown(_))
            || matches!(before, SubscriptionStatus::Unknown(_))
        {
            (
                AnomalyKind::UnknownStatus,
                format!("status {} -> {}", before, incoming.status),
            )
        } else {
            (
                AnomalyKind::MissedTransition,
                format!(
                    "{} -> {} skips a status: an event was missed",
                    before, incoming.status
                ),
            )
        };
        record.note(now_s, Some(event.id()), anomaly, detail);
    }
    check_customer(&mut record, incoming.customer.as_deref(), now_s, event.id());
    adopt(&mut record, incoming, mark);
    restore_if_paid_since(&mut record);
    Decision::Apply(Box::new(Applied {
        status_change: change(&before, &record.state.status),
        record,
        reason: ApplyReason::Snapshot,
    }))
}

fn decide_tie(
    cur: &SubscriptionRecord,
    wm: &Watermark,
    incoming: SubscriptionState,
    mark: Watermark,
) -> Decision {
    let incoming_wins = mark.order_key() > wm.order_key();
    if cur.matches(&incoming) {
        if !incoming_wins {
            return Decision::NoChange;
        }
        // An agreeing tie changes no state, but the watermark must move to
        // the winner, or a third event of the same second could be judged
        // against the wrong one (and the result depend on arrival order).
        let mut record = cur.clone();
        adopt(&mut record, incoming, mark);
        return Decision::Apply(Box::new(Applied {
            record,
            reason: ApplyReason::Snapshot,
            status_change: None,
        }));
    }
    let mut record = cur.clone();
    let before = record.state.status.clone();
    if incoming_wins {
        adopt(&mut record, incoming, mark);
    }
    record.needs_reconcile = true;
    Decision::Refetch {
        subscription_id: Some(cur.id.clone()),
        customer: cur.state.customer.clone(),
        reason: RefetchReason::Tie,
        fallback: Some(Box::new(Applied {
            status_change: change(&before, &record.state.status),
            record,
            reason: ApplyReason::TieRule,
        })),
    }
}

/// Takes a snapshot's state and watermark. The latest invoice is a
/// last-writer-wins field shared with invoice events, ordered by
/// `(created, event id)` on its own watermark.
fn adopt(record: &mut SubscriptionRecord, state: SubscriptionState, mark: Watermark) {
    let invoice_mark = (mark.created, mark.event_id.clone());
    // The snapshot names the latest invoice of its time: it replaces a
    // latest invoice created before that time (an older invoice), and
    // otherwise the later writer wins.
    let replaces_older = state.latest_invoice.is_some()
        && state.latest_invoice != record.state.latest_invoice
        && record
            .latest_invoice_created
            .is_some_and(|created| created < mark.created);
    if state.latest_invoice.is_some()
        && (replaces_older
            || record
                .invoice_watermark
                .as_ref()
                .is_none_or(|w| invoice_mark > *w))
    {
        if state.latest_invoice != record.state.latest_invoice {
            // Another invoice: what was known of the old one does not hold,
            // and the dunning cycle is the new invoice's.
            record.latest_invoice_paid = None;
            record.payment_failures.clear();
            record.latest_invoice_created = None;
            record.latest_invoice_due = None;
            record.next_payment_attempt = None;
        }
        record
            .state
            .latest_invoice
            .clone_from(&state.latest_invoice);
        if record
            .invoice_watermark
            .as_ref()
            .is_none_or(|w| invoice_mark > *w)
        {
            record.invoice_watermark = Some(invoice_mark);
        }
    }
    record.set_state(state);
    record.watermark = Some(mark);
}

/// A snapshot that says `past_due`, `unpaid` or `incomplete` while the
/// payment of the invoice it names as the latest was reported after it
/// (the payment arrived first): the payment wins, as it would have had it
/// arrived second. The record is flagged for the reconciler (the status
/// comes from a payment, not from Stripe's subscription).
fn restore_if_paid_since(record: &mut SubscriptionRecord) {
    let (Some(latest), Some(mark)) = (&record.state.latest_invoice, &record.watermark) else {
        return;
    };
    if !matches!(
        record.state.status,
        SubscriptionStatus::PastDue | SubscriptionStatus::Unpaid | SubscriptionStatus::Incomplete
    ) {
        return;
    }
    let Some(paid) = record.paid_invoices.iter().find(|p| &p.invoice == latest) else {
        return;
    };
    let payment = Watermark {
        created: paid.created,
        event_id: paid.event_id.clone(),
        rank: TieRank {
            terminal: false,
            period_end: i64::MIN,
            phase: 0,
        },
        source: WatermarkSource::Payment,
    };
    if payment.order_key() > mark.order_key() {
        record.state.status = SubscriptionStatus::Active;
        record.watermark = Some(payment);
        record.needs_reconcile = true;
    }
}

pub(super) fn change(
    before: &SubscriptionStatus,
    after: &SubscriptionStatus,
) -> Option<(SubscriptionStatus, SubscriptionStatus)> {
    (before != after).then(|| (before.clone(), after.clone()))
}

fn check_customer(
    record: &mut SubscriptionRecord,
    incoming: Option<&str>,
    now: i64,
    event_id: &str,
) {
    if let (Some(have), Some(got)) = (record.state.customer.as_deref(), incoming)
        && have != got
    {
        let detail = format!("customer {have} -> {got}");
        record.note(now, Some(event_id), AnomalyKind::CustomerMismatch, detail);
        record.needs_review = true;
    }
}

/// When Stripe's object was read, by both clocks: `local` (the host's)
/// stamps `last_verified_with_stripe`, which the access policy compares with
/// the host's `now`; `stripe` (the answer's `Date` header) stamps the
/// watermark, which is compared with events' `created` — Stripe's clock. A
/// host clock running ahead of Stripe's would otherwise stamp refetches in
/// Stripe's future and make the next events look stale. Without a server
/// time the local time stamps both.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FetchTime {
    /// The host's clock when the answer was read.
    pub local: OffsetDateTime,
    /// The server's `Date` on the answer, when it had one.
    pub stripe: Option<OffsetDateTime>,
}

impl FetchTime {
    /// What stamps the watermark: Stripe's time, else the local one.
    pub fn stamp(&self) -> OffsetDateTime {
        self.stripe.unwrap_or(self.local)
    }
}

impl From<OffsetDateTime> for FetchTime {
    /// A fetch known by the local clock only.
    fn from(local: OffsetDateTime) -> Self {
        Self {
            local,
            stripe: None,
        }
    }
}

/// Replaces the subscription fields of `current` (or a new record) with
/// Stripe's object, fetched at `fetched_at` on our clock, possibly because of
/// `trigger`. Payment facts, links and anomalies are kept. The watermark
/// becomes the latest of `fetched_at`, the old watermark, the trigger's
/// `created` and, for a subscription on a test clock fetched with the clock
/// expanded, the clock's `frozen_time` (its events carry simulated times,
/// possibly far ahead of `fetched_at`), so events older than the fetch are
/// stale afterwards and events of the same second are ties (refetched
/// again).
pub fn from_stripe(
    current: Option<&SubscriptionRecord>,
    truth: &SubscriptionView,
    fetched_at: impl Into<FetchTime>,
    trigger: Option<&Event>,
) -> Applied {
    let fetched_at: FetchTime = fetched_at.into();
    let id = truth
        .id
        .clone()
        .or_else(|| current.map(|c| c.id.clone()))
        .unwrap_or_default();
    let mut record = current
        .cloned()
        .unwrap_or_else(|| SubscriptionRecord::new(&id));
    let before = record.state.status.clone();
    let incoming = SubscriptionState::from_view(truth);
    let created = [
        Some(fetched_at.stamp().unix_timestamp()),
        record.watermark.as_ref().map(|w| w.created),
        trigger.map(Event::created),
        truth.test_clock_frozen_time,
    ]
    .into_iter()
    .flatten()
    .max()
    .unwrap_or_default();
    if let Some(trigger) = trigger {
        record.account = record
            .account
            .take()
            .or(trigger.account().map(str::to_owned));
        record.livemode = record.livemode.or(Some(trigger.livemode()));
    }
    if let Some(live) = truth.livemode {
        record.livemode = Some(live);
    }
    let mark = Watermark {
        created,
        event_id: String::new(),
        rank: TieRank {
            terminal: incoming.status.is_terminal(),
            period_end: incoming.current_period_end.unwrap_or(i64::MIN),
            phase: 0,
        },
        source: WatermarkSource::Refetch,
    };
    adopt(&mut record, incoming, mark);
    record.last_verified_with_stripe = Some(fetched_at.local);
    record.needs_reconcile = false;
    Applied {
        status_change: change(&before, &record.state.status),
        record,
        reason: ApplyReason::Refetched,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::subscription::MAX_ANOMALIES;
    use SubscriptionStatus as S;

    fn now() -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp(1_700_000_000).unwrap()
    }

    fn sub_event(id: &str, ty: &str, created: i64, status: &str, period_end: i64) -> Event {
        let json = format!(
            r#"{{"id":"{id}","object":"event","type":"{ty}","created":{created},"livemode":false,
            "data":{{"object":{{"id":"sub_1","object":"subscription","customer":"cus_1","status":"{status}",
            "current_period_start":{},"current_period_end":{period_end},"cancel_at_period_end":false,
            "items":{{"data":[{{"id":"si_1","price":{{"id":"price_1"}}}}]}}}}}}}}"#,
            period_end - 100
        );
        Event::parse_unverified(json.as_bytes()).unwrap()
    }

    /// The record after a `customer.subscription.updated` (period end 1000)
    /// is applied over `prev`.
    fn updated(
        prev: Option<&SubscriptionRecord>,
        id: &str,
        created: i64,
        status: &str,
    ) -> SubscriptionRecord {
        let event = sub_event(id, "customer.subscription.updated", created, status, 1000);
        applied(decide(prev, &event, now()).unwrap())
    }

    fn applied(d: Decision) -> SubscriptionRecord {
        match d {
            Decision::Apply(a)
            | Decision::Refetch {
                fallback: Some(a), ..
            } => a.record,
            other => panic!("expected a record, got {other:?}"),
        }
    }

    #[test]
    fn transition_table() {
        use TransitionKind::*;
        let cases = [
            (None, S::Incomplete, Direct),
            (None, S::Trialing, Direct),
            (None, S::Active, Direct),
            (None, S::PastDue, Gap),
            (Some(S::Incomplete), S::Active, Direct),
            (Some(S::Incomplete), S::IncompleteExpired, Direct),
            (Some(S::Incomplete), S::Canceled, Gap),
            (Some(S::Trialing), S::Active, Direct),
            (Some(S::Trialing), S::PastDue, Direct),
            (Some(S::Trialing), S::Paused, Direct),
            (Some(S::Trialing), S::Canceled, Direct),
            (Some(S::Trialing), S::Unpaid, Gap),
            (Some(S::Active), S::PastDue, Direct),
            (Some(S::Active), S::Canceled, Direct),
            (Some(S::Active), S::Trialing, Direct),
            (Some(S::Active), S::Paused, Direct),
            (Some(S::Active), S::Unpaid, Gap),
            (Some(S::Active), S::Incomplete, Impossible),
            (Some(S::Active), S::IncompleteExpired, Impossible),
            (Some(S::PastDue), S::Active, Direct),
            (Some(S::PastDue), S::Canceled, Direct),
            (Some(S::PastDue), S::Unpaid, Direct),
            (Some(S::PastDue), S::Paused, Direct),
            (Some(S::PastDue), S::Trialing, Gap),
            (Some(S::Unpaid), S::Active, Direct),
            (Some(S::Unpaid), S::Canceled, Direct),
            (Some(S::Unpaid), S::PastDue, Gap),
            (Some(S::Paused), S::Active, Direct),
            (Some(S::Paused), S::PastDue, Direct),
            (Some(S::Paused), S::Canceled, Direct),
            (Some(S::Paused), S::Unpaid, Gap),
            (Some(S::Canceled), S::Active, Impossible),
            (Some(S::Canceled), S::IncompleteExpired, Impossible),
            (Some(S::IncompleteExpired), S::Active, Impossible),
            (Some(S::Canceled), S::Canceled, Same),
            (Some(S::Active), S::Unknown("new".into()), Gap),
            // Found by the state-machine fuzz target: a status this crate
            // does not know must not lead out of a terminal one.
            (
                Some(S::IncompleteExpired),
                S::Unknown("new".into()),
                Impossible,
            ),
            (Some(S::Canceled), S::Unknown("new".into()), Impossible),
            (Some(S::Unknown("new".into())), S::Active, Gap),
        ];
        for (from, to, want) in cases {
            assert_eq!(transition(from.as_ref(), &to), want, "{from:?} -> {to:?}");
        }
        // Terminal states are absorbing: nothing else follows them.
        for terminal in [S::Canceled, S::IncompleteExpired] {
            for to in S::ALL {
                if to != terminal {
                    assert_eq!(
                        transition(Some(&terminal), &to),
                        Impossible,
                        "{terminal} -> {to}"
                    );
                }
            }
        }
    }

    #[test]
    fn unknown_subscription_asks_for_refetch_with_a_fallback() {
        let e = sub_event(
            "evt_1",
            "customer.subscription.created",
            100,
            "active",
            1000,
        );
        match decide(None, &e, now()).unwrap() {
            Decision::Refetch {
                subscription_id,
                reason: RefetchReason::UnknownSubscription,
                fallback: Some(f),
                ..
            } => {
                assert_eq!(subscription_id.as_deref(), Some("sub_1"));
                assert_eq!(f.record.state.status, S::Active);
                assert_eq!(f.record.watermark.as_ref().unwrap().created, 100);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn newer_applies_older_is_stale_same_is_noop() {
        let r = updated(None, "evt_1", 100, "active");
        let newer = sub_event(
            "evt_2",
            "customer.subscription.updated",
            200,
            "past_due",
            1000,
        );
        let r2 = applied(decide(Some(&r), &newer, now()).unwrap());
        assert_eq!(r2.state.status, S::PastDue);
        let older = sub_event(
            "evt_0",
            "customer.subscription.updated",
            50,
            "incomplete",
            1000,
        );
        assert!(matches!(
            decide(Some(&r2), &older, now()).unwrap(),
            Decision::Stale { .. }
        ));
        assert_eq!(
            decide(Some(&r2), &newer, now()).unwrap(),
            Decision::NoChange
        );
    }

    #[test]
    fn ties_are_never_dropped() {
        let r = applied(
            decide(
                None,
                &sub_event(
                    "evt_a",
                    "customer.subscription.created",
                    100,
                    "incomplete",
                    1000,
                ),
                now(),
            )
            .unwrap(),
        );
        let tie = sub_event(
            "evt_b",
            "customer.subscription.updated",
            100,
            "active",
            1000,
        );
        match decide(Some(&r), &tie, now()).unwrap() {
            Decision::Refetch {
                reason: RefetchReason::Tie,
                fallback: Some(f),
                ..
            } => {
                // `updated` outranks `created` within a second.
                assert_eq!(f.record.state.status, S::Active);
                assert!(f.record.needs_reconcile);
            }
            other => panic!("{other:?}"),
        }
        // The reverse arrival order gives the same winner.
        let r = applied(decide(None, &tie, now()).unwrap());
        let created = sub_event(
            "evt_a",
            "customer.subscription.created",
            100,
            "incomplete",
            1000,
        );
        match decide(Some(&r), &created, now()).unwrap() {
            Decision::Refetch {
                reason: RefetchReason::Tie,
                fallback: Some(f),
                ..
            } => assert_eq!(f.record.state.status, S::Active),
            other => panic!("{other:?}"),
        }
        // A tie that agrees changes no state; a winning one moves the
        // watermark so a third event is judged against the right one.
        let same = sub_event(
            "evt_c",
            "customer.subscription.updated",
            100,
            "active",
            1000,
        );
        match decide(Some(&r), &same, now()).unwrap() {
            Decision::Apply(a) => {
                assert_eq!(a.record.state.status, S::Active);
                assert!(!a.record.needs_reconcile);
                assert_eq!(a.record.watermark.unwrap().event_id, "evt_c");
                assert_eq!(a.status_change, None);
            }
            other => panic!("{other:?}"),
        }
        let losing = sub_event(
            "evt_0",
            "customer.subscription.updated",
            100,
            "active",
            1000,
        );
        assert_eq!(
            decide(Some(&r), &losing, now()).unwrap(),
            Decision::NoChange
        );
    }

    #[test]
    fn impossible_transitions_keep_state_and_ask_stripe() {
        let r = applied(
            decide(
                None,
                &sub_event(
                    "evt_1",
                    "customer.subscription.deleted",
                    100,
                    "canceled",
                    1000,
                ),
                now(),
            )
            .unwrap(),
        );
        let back = sub_event(
            "evt_2",
            "customer.subscription.updated",
            200,
            "active",
            2000,
        );
        match decide(Some(&r), &back, now()).unwrap() {
            Decision::Refetch {
                reason: RefetchReason::ImpossibleTransition,
                fallback: Some(f),
                ..
            } => {
                assert_eq!(f.record.state.status, S::Canceled);
                assert!(f.record.needs_review);
                assert_eq!(
                    f.record.anomalies.last().unwrap().kind,
                    AnomalyKind::ImpossibleTransition
                );
                assert_eq!(f.record.watermark, r.watermark, "watermark not advanced");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn gaps_apply_with_a_note() {
        let r = updated(None, "evt_1", 100, "active");
        let r2 = updated(Some(&r), "evt_2", 200, "unpaid");
        assert_eq!(r2.state.status, S::Unpaid);
        assert_eq!(
            r2.anomalies.last().unwrap().kind,
            AnomalyKind::MissedTransition
        );
    }

    /// An event about `invoice` (created at `created` when it is new).
    fn invoice_event(id: &str, invoice: &str, ty: &str, created: i64, paid: bool) -> Event {
        let json = format!(
            r#"{{"id":"{id}","object":"event","type":"{ty}","created":{created},"livemode":false,
            "data":{{"object":{{"id":"{invoice}","object":"invoice","customer":"cus_1","subscription":"sub_1",
            "paid":{paid},"status":"{}","lines":{{"data":[{{"type":"subscription","subscription":"sub_1",
            "period":{{"start":{created},"end":{}}}}}]}}}}}}}}"#,
            if paid { "paid" } else { "open" },
            created + 1000
        );
        Event::parse_unverified(json.as_bytes()).unwrap()
    }

    /// The dunning clock starts at the first failure of the latest invoice
    /// after the last payment, whatever order the events arrive in: the
    /// retries of one invoice (in_b) after the previous one (in_a) was
    /// paid.
    #[test]
    fn dunning_clock_is_order_independent() {
        let base = applied(
            decide(
                None,
                &sub_event(
                    "evt_s",
                    "customer.subscription.updated",
                    1,
                    "past_due",
                    5000,
                ),
                now(),
            )
            .unwrap(),
        );
        let events = [
            invoice_event("evt_f1", "in_a", "invoice.payment_failed", 10, false),
            invoice_event("evt_p", "in_a", "invoice.paid", 15, true),
            invoice_event("evt_f2", "in_b", "invoice.payment_failed", 20, false),
            invoice_event("evt_f3", "in_b", "invoice.payment_failed", 30, false),
        ];
        let orders: [[usize; 4]; 6] = [
            [0, 1, 2, 3],
            [3, 2, 1, 0],
            [1, 0, 3, 2],
            [2, 0, 3, 1],
            [0, 2, 3, 1],
            [3, 1, 0, 2],
        ];
        for order in orders {
            let mut r = base.clone();
            for i in order {
                match decide(Some(&r), &events[i], now()).unwrap() {
                    Decision::Apply(a) => r = a.record,
                    Decision::Refetch {
                        fallback: Some(f), ..
                    } => r = f.record,
                    _ => {}
                }
            }
            assert_eq!(r.dunning_since(), Some(20), "{order:?}");
            assert_eq!(r.state.latest_invoice.as_deref(), Some("in_b"));
            // in_a's payment is recorded in every order; it moved the
            // payment clock only when in_a was the latest invoice seen.
            assert!(r.payment_first_reported_by("evt_p").is_some());
        }
    }

    /// A paid first invoice restores an incomplete subscription (when newer
    /// than the snapshot that said incomplete), flagged for confirmation.
    #[test]
    fn paid_first_invoice_restores_incomplete() {
        let r = applied(
            decide(
                None,
                &sub_event(
                    "evt_c",
                    "customer.subscription.created",
                    100,
                    "incomplete",
                    5000,
                ),
                now(),
            )
            .unwrap(),
        );
        match decide(
            Some(&r),
            &invoice_event("evt_paid", "in_1", "invoice.paid", 101, true),
            now(),
        )
        .unwrap()
        {
            Decision::Refetch {
                reason: RefetchReason::ConfirmRestore,
                fallback: Some(f),
                ..
            } => {
                assert_eq!(f.record.state.status, S::Active);
                assert!(f.record.needs_reconcile);
                assert_eq!(f.record.paid_through, Some(1101));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn anomalies_are_bounded() {
        let mut r = SubscriptionRecord::new("sub_1");
        for i in 0..40 {
            r.note(i, None, AnomalyKind::Diverged, String::new());
        }
        assert_eq!(r.anomalies.len(), MAX_ANOMALIES);
        assert_eq!(
            r.anomalies[0].at,
            40 - i64::try_from(MAX_ANOMALIES).unwrap()
        );
    }
}
