//! Invoice and Checkout events: payment facts (the latest invoice, paid
//! through, the dunning clock, paid invoices) and Checkout links.
//! `invoice.finalized` and `invoice.overdue` only report the latest
//! invoice's facts (its id, unpaid, its due date). They never
//! set a status by themselves, except a payment of the latest invoice newer
//! than the snapshot that said `past_due`, `unpaid` or `incomplete`, which
//! restores `active` (and is confirmed with Stripe when a client is
//! configured). See the [parent module](super) for the rules.

use super::machine::{Applied, ApplyReason, Decision, RefetchReason, change};
use super::model::{
    MAX_FAILURES, MAX_PAID_INVOICES, PaidInvoice, SubscriptionRecord, TieRank, Watermark,
    WatermarkSource,
};
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

    let latest = is_latest_invoice(&record, event, view);
    if latest {
        take_invoice_facts(&mut record, event, view);
    }
    let mut reason = ApplyReason::Payment;
    if paid_event {
        record_payment(&mut record, event, view, latest);
    }
    if paid_event && latest {
        if let Some(end) = view.service_period_end {
            record.paid_through = Some(record.paid_through.map_or(end, |p| p.max(end)));
        }
        record.last_paid_at = Some(record.last_paid_at.map_or(created, |p| p.max(created)));
        // Every failure on record is the latest invoice's (they are
        // cleared when a newer invoice becomes the latest): it is paid.
        record.payment_failures.clear();
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
    if failed_event && latest {
        record.last_payment_failed_at = Some(
            record
                .last_payment_failed_at
                .map_or(created, |p| p.max(created)),
        );
        // Failures of the latest invoice while it is unpaid make the
        // dunning cycle (a paid invoice does not fail again: a failure that
        // arrives after its payment is older); kept as a set so the first
        // one does not depend on arrival order.
        if record.latest_invoice_paid != Some(true)
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

/// Whether `view` is the subscription's latest invoice (or one newer than
/// it), so its payment or failure decides the dunning state. Stripe defines
/// `past_due` by the latest finalised invoice: paying an older invoice
/// settles that invoice and nothing else.
///
/// - The same invoice as the record's latest, or no latest known: yes.
/// - Another invoice: compared by the invoices' own `created`. Against a
///   latest invoice whose `created` an invoice event told, the later
///   invoice is the latest (the same second: the later event). Against a
///   latest invoice named only by a subscription snapshot, an invoice
///   created at or after that snapshot is newer, and one created before it
///   is older (the snapshot named the latest invoice of its time).
/// - An invoice without `created` (2012-era): the later event wins.
fn is_latest_invoice(record: &SubscriptionRecord, event: &Event, view: &InvoiceView) -> bool {
    let (Some(latest), Some(id)) = (&record.state.latest_invoice, &view.id) else {
        return true;
    };
    if latest == id {
        return true;
    }
    let event_newer = || {
        record
            .invoice_watermark
            .as_ref()
            .is_none_or(|w| (event.created(), event.id()) > (w.0, w.1.as_str()))
    };
    match (view.created, record.latest_invoice_created) {
        (Some(c), Some(latest_created)) if c != latest_created => c > latest_created,
        (Some(c), None) => record.invoice_watermark.as_ref().is_none_or(|w| c >= w.0),
        _ => event_newer(),
    }
}

/// Takes the latest invoice's facts (id, paid, due date, planned retry)
/// from an invoice event: always for a newer invoice, and for the same
/// invoice only from a newer event (last writer wins by `(created, event
/// id)`), except that a paid invoice is never made unpaid again (paid is
/// final in Stripe's invoice lifecycle).
fn take_invoice_facts(record: &mut SubscriptionRecord, event: &Event, view: &InvoiceView) {
    let Some(id) = &view.id else {
        return;
    };
    let mark = (event.created(), event.id().to_owned());
    let same = record.state.latest_invoice.as_ref() == Some(id);
    if same
        && record
            .invoice_watermark
            .as_ref()
            .is_some_and(|w| mark <= *w)
    {
        // An older event of the same invoice: what a snapshot does not say
        // (whether it is paid, its creation time and due date) is taken
        // when unknown, and a payment it reports is kept.
        // A payment reported by an older event still happened.
        if view.paid {
            record.latest_invoice_paid = Some(true);
            record.next_payment_attempt = None;
        } else {
            record.latest_invoice_paid = record.latest_invoice_paid.or(Some(false));
        }
        record.latest_invoice_created = record.latest_invoice_created.or(view.created);
        record.latest_invoice_due = record
            .latest_invoice_due
            .or_else(|| view.due_at(record.state.days_until_due));
        return;
    }
    if !same {
        // The dunning cycle is the latest invoice's: failures of an older
        // invoice do not count once a newer one is known.
        record.payment_failures.clear();
    }
    record.state.latest_invoice = Some(id.clone());
    // A paid invoice stays paid: an event of the same invoice that says
    // otherwise (`invoice.finalized` in the payment's second, ranked after
    // it by event id) describes it before its payment.
    let paid = view.paid || (same && record.latest_invoice_paid == Some(true));
    record.latest_invoice_paid = Some(paid);
    record.latest_invoice_created = view
        .created
        .or(record.latest_invoice_created.filter(|_| same));
    record.latest_invoice_due = view.due_at(record.state.days_until_due);
    record.next_payment_attempt = if paid {
        None
    } else {
        view.next_payment_attempt
    };
    if record.invoice_watermark.as_ref().is_none_or(|w| mark > *w) {
        record.invoice_watermark = Some(mark);
    }
}

/// Records a paid invoice and the event that first reported its payment
/// (`invoice.paid` and `invoice.payment_succeeded` report the same one).
fn record_payment(
    record: &mut SubscriptionRecord,
    event: &Event,
    view: &InvoiceView,
    latest: bool,
) {
    let Some(id) = &view.id else {
        return;
    };
    if record.paid_invoices.iter().any(|p| &p.invoice == id) {
        return;
    }
    record.paid_invoices.push(PaidInvoice {
        invoice: id.clone(),
        event_id: event.id().to_owned(),
        created: event.created(),
        latest,
    });
    if record.paid_invoices.len() > MAX_PAID_INVOICES {
        let excess = record.paid_invoices.len() - MAX_PAID_INVOICES;
        record.paid_invoices.drain(..excess);
    }
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
