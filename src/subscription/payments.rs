//! Invoice and Checkout events: payment facts (paid through, the dunning
//! clock, the latest invoice) and Checkout links. They never set a status by
//! themselves, except a payment newer than the snapshot that said `past_due`,
//! `unpaid` or `incomplete`, which restores `active` (and is confirmed with
//! Stripe when a client is configured).

use super::machine::{Applied, ApplyReason, Decision, RefetchReason, change};
use super::model::{MAX_FAILURES, SubscriptionRecord, TieRank, Watermark, WatermarkSource};
use crate::event::{CheckoutSessionView, Event, EventType, InvoiceView, SubscriptionStatus};

pub(super) fn apply_invoice(
    current: Option<&SubscriptionRecord>,
    event: &Event,
    view: &InvoiceView,
) -> Decision {
    let Some(sub_id) = view
        .subscription_id
        .clone()
        .or_else(|| current.map(|c| c.id.clone()))
    else {
        return Decision::NotApplicable {
            reason: "invoice is not for a subscription",
        };
    };
    let fresh = current.is_none();
    let mut record = current
        .cloned()
        .unwrap_or_else(|| SubscriptionRecord::new(&sub_id));
    if fresh {
        record.state.customer.clone_from(&view.customer);
        record.account = event.account().map(str::to_owned);
        record.livemode = Some(event.livemode());
    }
    let before = record.clone();
    let created = event.created();
    let paid_event = matches!(
        event.event_type(),
        EventType::InvoicePaid | EventType::InvoicePaymentSucceeded
    ) && view.paid;
    let failed_event = matches!(
        event.event_type(),
        EventType::InvoicePaymentFailed | EventType::InvoicePaymentActionRequired
    );

    // Latest invoice: last writer wins by (created, event id).
    let inv_mark = (created, event.id().to_owned());
    if view.id.is_some()
        && record
            .invoice_watermark
            .as_ref()
            .is_none_or(|w| inv_mark > *w)
    {
        record.state.latest_invoice.clone_from(&view.id);
        record.latest_invoice_paid = Some(view.paid);
        record.invoice_watermark = Some(inv_mark);
    }
    let mut reason = ApplyReason::Payment;
    if paid_event {
        if let Some(end) = view.service_period_end {
            record.paid_through = Some(record.paid_through.map_or(end, |p| p.max(end)));
        }
        record.last_paid_at = Some(record.last_paid_at.map_or(created, |p| p.max(created)));
        let paid = record.last_paid_at.unwrap_or(created);
        record.payment_failures.retain(|f| *f > paid);
        // A payment newer than the snapshot that said past_due / unpaid, by
        // the same total order as snapshots (a payment ranks below any
        // subscription event of its second).
        let mark = Watermark {
            created,
            event_id: event.id().to_owned(),
            rank: TieRank {
                terminal: false,
                period_end: view.service_period_end.unwrap_or(i64::MIN),
                phase: 0,
            },
            source: WatermarkSource::Payment,
        };
        let newer = record
            .watermark
            .as_ref()
            .is_some_and(|w| mark.order_key() > w.order_key());
        if newer
            && matches!(
                record.state.status,
                SubscriptionStatus::PastDue
                    | SubscriptionStatus::Unpaid
                    | SubscriptionStatus::Incomplete
            )
        {
            record.state.status = SubscriptionStatus::Active;
            record.watermark = Some(mark);
            reason = ApplyReason::PaymentRestored;
        }
    }
    if failed_event {
        record.last_payment_failed_at = Some(
            record
                .last_payment_failed_at
                .map_or(created, |p| p.max(created)),
        );
        // Only failures after the last payment belong to the dunning cycle;
        // kept as a set so the first one does not depend on arrival order.
        if record.last_paid_at.is_none_or(|p| created > p)
            && let Err(pos) = record.payment_failures.binary_search(&created)
            && pos < MAX_FAILURES
        {
            record.payment_failures.insert(pos, created);
            record.payment_failures.truncate(MAX_FAILURES);
        }
    }
    if record == before && !fresh {
        return Decision::NoChange;
    }
    let applied = Applied {
        status_change: change(&before.state.status, &record.state.status),
        record,
        reason,
    };
    if fresh {
        return Decision::Refetch {
            subscription_id: Some(sub_id),
            customer: view.customer.clone(),
            reason: RefetchReason::UnknownSubscription,
            fallback: Some(Box::new(applied)),
        };
    }
    if reason == ApplyReason::PaymentRestored {
        // The status came from a payment, not from Stripe's subscription:
        // confirm it when a client is configured.
        let mut fallback = applied.clone();
        fallback.record.needs_reconcile = true;
        return Decision::Refetch {
            subscription_id: Some(sub_id),
            customer: applied.record.state.customer.clone(),
            reason: RefetchReason::ConfirmRestore,
            fallback: Some(Box::new(fallback)),
        };
    }
    Decision::Apply(Box::new(applied))
}

pub(super) fn apply_checkout(
    current: Option<&SubscriptionRecord>,
    event: &Event,
    view: &CheckoutSessionView,
) -> Decision {
    let Some(sub_id) = view.subscription.clone() else {
        return Decision::NotApplicable {
            reason: "Checkout Session has no subscription",
        };
    };
    let fresh = current.is_none();
    let mut record = current
        .cloned()
        .unwrap_or_else(|| SubscriptionRecord::new(&sub_id));
    let before = record.clone();
    if record.state.customer.is_none() {
        record.state.customer.clone_from(&view.customer);
    }
    if record.client_reference_id.is_none() {
        record
            .client_reference_id
            .clone_from(&view.client_reference_id);
    }
    if record.checkout_session.is_none() {
        record.checkout_session.clone_from(&view.id);
    }
    if fresh {
        record.account = event.account().map(str::to_owned);
        record.livemode = Some(event.livemode());
    }
    if record == before && !fresh {
        return Decision::NoChange;
    }
    let applied = Applied {
        record,
        reason: ApplyReason::CheckoutLinked,
        status_change: None,
    };
    if fresh {
        return Decision::Refetch {
            subscription_id: Some(sub_id),
            customer: view.customer.clone(),
            reason: RefetchReason::UnknownSubscription,
            fallback: Some(Box::new(applied)),
        };
    }
    Decision::Apply(Box::new(applied))
}
