//! What this crate stores about a subscription: a model of its own,
//! independent of the parse types of [`crate::event`], so that the storage
//! format does not change when the parser does. Views are converted into the
//! model once, in [`SubscriptionState::from_view`].

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::event::{CollectionMethod, ItemView, SubscriptionStatus, SubscriptionView};

/// How many anomalies a record keeps (the oldest are dropped).
pub const MAX_ANOMALIES: usize = 16;

/// How many failed payments a record remembers per dunning cycle.
pub const MAX_FAILURES: usize = 32;

/// A subscription item as stored: its id, price, product and quantity, and
/// (on API versions 2025-03-31.basil and later) its own billing period. The
/// same type as the view's item: its fields are only ever added, each
/// readable when absent, so records stored by earlier versions load.
pub type SubscriptionItem = ItemView;

/// Paused collection, as stored. Pausing collection does not change a
/// subscription's `status`: Stripe keeps it `active` and stops charging.
/// The same type as the view's.
pub use crate::event::PauseCollection;

/// How many paid invoices a record remembers (the oldest are dropped), to
/// tell the first notification of a payment from the second.
pub const MAX_PAID_INVOICES: usize = 16;

/// A paid invoice of the subscription and the event that first reported
/// the payment. Stripe reports one payment twice (`invoice.paid` and
/// `invoice.payment_succeeded`, often in the same second and in either
/// order); the first one processed records it here, so a handler acts once
/// per payment ([`SubscriptionRecord::payment_first_reported_by`]).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PaidInvoice {
    /// The invoice id.
    pub invoice: String,
    /// The event that first reported the payment.
    pub event_id: String,
    /// That event's `created` (Unix seconds).
    pub created: i64,
    /// Whether the invoice was the subscription's latest when its payment
    /// was recorded (only such a payment restores a past-due subscription).
    pub latest: bool,
}

/// A status change and the event that made it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusChange {
    /// The event (empty for a refetch or a repair).
    pub event_id: String,
    /// The status before.
    pub from: SubscriptionStatus,
    /// The status after.
    pub to: SubscriptionStatus,
}

/// The fields of a record that mirror Stripe's subscription object: what
/// "equals Stripe's truth" compares. Times are Unix seconds, as Stripe sends
/// them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubscriptionState {
    /// The customer id.
    pub customer: Option<String>,
    /// The status.
    pub status: SubscriptionStatus,
    /// Items with price and product ids, quantities and (basil and later)
    /// per-item periods.
    pub items: Vec<SubscriptionItem>,
    /// The current period's start.
    pub current_period_start: Option<i64>,
    /// The current period's end; the earliest item end on basil and later.
    pub current_period_end: Option<i64>,
    /// Trial start.
    pub trial_start: Option<i64>,
    /// Trial end.
    pub trial_end: Option<i64>,
    /// Cancels at period end.
    pub cancel_at_period_end: bool,
    /// Scheduled cancellation.
    pub cancel_at: Option<i64>,
    /// When cancellation was requested.
    pub canceled_at: Option<i64>,
    /// When it ended.
    pub ended_at: Option<i64>,
    /// Paused collection (does not change `status`).
    pub pause_collection: Option<PauseCollection>,
    /// The latest invoice id. On a [`SubscriptionRecord`] it is a
    /// last-writer-wins field shared by subscription and invoice events,
    /// ordered on its own watermark ([`SubscriptionRecord::invoice_watermark`]).
    pub latest_invoice: Option<String>,
    /// How Stripe collects payment (`None` on records stored before this
    /// field existed, and on 2012-era objects: read as charging
    /// automatically).
    #[serde(default)]
    pub collection_method: Option<CollectionMethod>,
    /// With `send_invoice`: days from an invoice's finalisation to its due
    /// date.
    #[serde(default)]
    pub days_until_due: Option<i64>,
    /// The subscription's metadata, as the application set it in Stripe.
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    /// The test clock the subscription runs on (test mode only); its
    /// times are simulated.
    #[serde(default)]
    pub test_clock: Option<String>,
}

impl SubscriptionState {
    /// The state a subscription object describes.
    pub fn from_view(view: &SubscriptionView) -> Self {
        Self {
            customer: view.customer.clone(),
            status: view.status.clone(),
            items: view.items.clone(),
            current_period_start: view.current_period_start,
            current_period_end: view.current_period_end,
            trial_start: view.trial_start,
            trial_end: view.trial_end,
            cancel_at_period_end: view.cancel_at_period_end,
            cancel_at: view.cancel_at,
            canceled_at: view.canceled_at,
            ended_at: view.ended_at,
            pause_collection: view.pause_collection.clone(),
            latest_invoice: view.latest_invoice.clone(),
            collection_method: view.collection_method,
            days_until_due: view.days_until_due,
            metadata: view.metadata.clone(),
            test_clock: view.test_clock.clone(),
        }
    }

    /// Nothing known yet: `incomplete`, no items, no dates.
    pub fn placeholder() -> Self {
        Self {
            customer: None,
            status: SubscriptionStatus::Incomplete,
            items: Vec::new(),
            current_period_start: None,
            current_period_end: None,
            trial_start: None,
            trial_end: None,
            cancel_at_period_end: false,
            cancel_at: None,
            canceled_at: None,
            ended_at: None,
            pause_collection: None,
            latest_invoice: None,
            collection_method: None,
            days_until_due: None,
            metadata: BTreeMap::new(),
            test_clock: None,
        }
    }

    /// Whether Stripe sends this subscription's invoices to be paid by a
    /// due date (`collection_method = send_invoice`) rather than charging a
    /// card.
    pub fn is_invoiced(&self) -> bool {
        self.collection_method == Some(CollectionMethod::SendInvoice)
    }
}

/// Where a watermark came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WatermarkSource {
    /// A subscription event's snapshot.
    Event,
    /// An invoice payment that restored a past-due record.
    Payment,
    /// Stripe's object, fetched at `created` (our clock).
    Refetch,
}

/// The deterministic order of events within one second: compared field by
/// field, in declaration order (a terminal status first, then the later
/// period end, then the event kind).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct TieRank {
    /// A terminal status ranks above any other.
    pub terminal: bool,
    /// The later current-period end ranks higher (`i64::MIN` when unknown).
    pub period_end: i64,
    /// `0` created / payment restore, `1` other subscription events, `2` deleted.
    pub phase: u8,
}

/// What a record's subscription fields reflect: the `created` second and id
/// of the event (or refetch) that last set them.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Watermark {
    /// Unix seconds (Stripe's `created`, or our clock for a refetch).
    pub created: i64,
    /// The event id (empty for a refetch).
    pub event_id: String,
    /// The tie rank of that event.
    pub rank: TieRank,
    /// Where it came from.
    pub source: WatermarkSource,
}

impl Watermark {
    /// The total order of the deterministic rule: `created`, then the tie
    /// rank, then the event id.
    pub fn order_key(&self) -> (i64, TieRank, &str) {
        (self.created, self.rank, &self.event_id)
    }
}

/// Something a human (or the reconciler) should look at.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Anomaly {
    /// When it was recorded (our clock, Unix seconds).
    pub at: i64,
    /// The event that caused it.
    pub event_id: Option<String>,
    /// What kind.
    pub kind: AnomalyKind,
    /// Details (statuses, ids; never a body).
    pub detail: String,
}

/// Kinds of [`Anomaly`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum AnomalyKind {
    /// A status that cannot follow the current one.
    ImpossibleTransition,
    /// A status reachable only through statuses we never saw.
    MissedTransition,
    /// A status this crate does not know.
    UnknownStatus,
    /// A refetch from Stripe failed; a fallback was applied.
    RefetchFailed,
    /// Stripe's object disagreed with the record (found by a refetch or the
    /// reconciler).
    Diverged,
    /// Events disagree about the customer.
    CustomerMismatch,
    /// Stripe does not know the subscription.
    NotFoundAtStripe,
}

/// A subscription as this crate keeps it: Stripe's fields
/// ([`SubscriptionRecord::state`]) plus what the crate learned from
/// invoices, Checkout and its own checks.
///
/// Serialized flat: the fields of `state` sit beside the others, so stores
/// that keep the record as JSON read records written before `state` existed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubscriptionRecord {
    /// `sub_…`
    pub id: String,
    /// The fields that mirror Stripe's subscription object.
    #[serde(flatten)]
    pub state: SubscriptionState,
    /// Whether the latest invoice is known to be paid.
    pub latest_invoice_paid: Option<bool>,
    /// The furthest service-period end any paid invoice covered.
    pub paid_through: Option<i64>,
    /// The newest successful payment's event time.
    pub last_paid_at: Option<i64>,
    /// The newest failed payment's event time.
    pub last_payment_failed_at: Option<i64>,
    /// Failed payments of the latest invoice newer than the last successful
    /// payment (event times, ascending, at most [`MAX_FAILURES`]): the
    /// first one started the dunning clock
    /// ([`SubscriptionRecord::dunning_since`]). Cleared when a newer
    /// invoice becomes the latest.
    #[serde(default)]
    pub payment_failures: Vec<i64>,
    /// The last status change and the event that made it, so a retried event
    /// can still tell its handler what it changed.
    #[serde(default)]
    pub last_change: Option<StatusChange>,
    /// The ordering watermark of the subscription fields (`None` until a
    /// snapshot or a refetch set them).
    pub watermark: Option<Watermark>,
    /// The watermark `(created, event id)` of `state.latest_invoice` and
    /// `latest_invoice_paid`.
    pub invoice_watermark: Option<(i64, String)>,
    /// The latest invoice's own `created` time, when an invoice event told
    /// it (a subscription snapshot names the invoice without it). An
    /// invoice created earlier is an older invoice.
    #[serde(default)]
    pub latest_invoice_created: Option<i64>,
    /// With `send_invoice`: when the latest invoice is due
    /// ([`InvoiceView::due_at`](crate::event::InvoiceView::due_at)).
    #[serde(default)]
    pub latest_invoice_due: Option<i64>,
    /// When Stripe plans to retry the latest invoice's payment (`None`
    /// once paid, or when Stripe has given up).
    #[serde(default)]
    pub next_payment_attempt: Option<i64>,
    /// The most recent paid invoices and the event that first reported each
    /// payment (at most [`MAX_PAID_INVOICES`], oldest first).
    #[serde(default)]
    pub paid_invoices: Vec<PaidInvoice>,
    /// When the record last matched Stripe's object (a refetch or a sweep).
    #[serde(with = "time::serde::rfc3339::option")]
    pub last_verified_with_stripe: Option<OffsetDateTime>,
    /// The application's reference from Checkout (a user id, say).
    pub client_reference_id: Option<String>,
    /// The Checkout Session that created it.
    pub checkout_session: Option<String>,
    /// Live or test mode.
    pub livemode: Option<bool>,
    /// The Connect account, if any.
    pub account: Option<String>,
    /// Recent anomalies, oldest first (at most [`MAX_ANOMALIES`]).
    pub anomalies: Vec<Anomaly>,
    /// A human should look at this record.
    pub needs_review: bool,
    /// The record holds a guess (a tie decided by rule, a failed refetch):
    /// the reconciler should confirm it with Stripe.
    pub needs_reconcile: bool,
    /// Optimistic-concurrency version: 0 before the first save; stores
    /// refuse a save whose version is not the stored one.
    pub version: u64,
}

impl SubscriptionRecord {
    /// A record for `id` with nothing known yet (no snapshot).
    pub fn new(id: &str) -> Self {
        Self {
            id: id.to_owned(),
            state: SubscriptionState::placeholder(),
            latest_invoice_paid: None,
            paid_through: None,
            last_paid_at: None,
            last_payment_failed_at: None,
            payment_failures: Vec::new(),
            last_change: None,
            watermark: None,
            invoice_watermark: None,
            latest_invoice_created: None,
            latest_invoice_due: None,
            next_payment_attempt: None,
            paid_invoices: Vec::new(),
            last_verified_with_stripe: None,
            client_reference_id: None,
            checkout_session: None,
            livemode: None,
            account: None,
            anomalies: Vec::new(),
            needs_review: false,
            needs_reconcile: false,
            version: 0,
        }
    }

    /// The status (shorthand for `self.state.status`).
    pub fn status(&self) -> &SubscriptionStatus {
        &self.state.status
    }

    /// The customer id (shorthand for `self.state.customer`).
    pub fn customer(&self) -> Option<&str> {
        self.state.customer.as_deref()
    }

    /// When the current dunning cycle started: the first failed payment
    /// after the last successful one, if any.
    pub fn dunning_since(&self) -> Option<i64> {
        self.payment_failures.first().copied()
    }

    /// Whether a subscription snapshot (event or Stripe object) has set the
    /// status; before that, the record only holds invoice or Checkout facts.
    pub fn has_snapshot(&self) -> bool {
        self.watermark.is_some()
    }

    /// Takes the subscription fields of `incoming`, except that a known
    /// customer is never forgotten (2012-era and thin objects may omit it)
    /// and the latest invoice stays on its own watermark.
    pub(crate) fn set_state(&mut self, incoming: SubscriptionState) {
        let customer = incoming.customer.or_else(|| self.state.customer.take());
        let latest_invoice = self.state.latest_invoice.take();
        self.state = SubscriptionState {
            customer,
            latest_invoice,
            ..incoming
        };
    }

    /// Whether the subscription fields equal `state`, independent of the API
    /// shape either side was read from: the customer is compared when both
    /// know it, items by id, price and quantity (and their own periods when
    /// both sides have them), and the latest invoice is left out (invoice
    /// events track it on their own clock).
    pub fn matches(&self, state: &SubscriptionState) -> bool {
        let mine = &self.state;
        let customer_ok = match (&mine.customer, &state.customer) {
            (Some(a), Some(b)) => a == b,
            _ => true,
        };
        let same_option = |a: Option<i64>, b: Option<i64>| a.is_none() || b.is_none() || a == b;
        let items_ok = mine.items.len() == state.items.len()
            && mine.items.iter().zip(&state.items).all(|(a, b)| {
                a.id == b.id
                    && a.price_id == b.price_id
                    && (a.product_id.is_none()
                        || b.product_id.is_none()
                        || a.product_id == b.product_id)
                    && a.quantity == b.quantity
                    && same_option(a.current_period_start, b.current_period_start)
                    && same_option(a.current_period_end, b.current_period_end)
            });
        customer_ok
            && items_ok
            && mine.status == state.status
            && mine.current_period_start == state.current_period_start
            && mine.current_period_end == state.current_period_end
            && mine.trial_start == state.trial_start
            && mine.trial_end == state.trial_end
            && mine.cancel_at_period_end == state.cancel_at_period_end
            && mine.cancel_at == state.cancel_at
            && mine.canceled_at == state.canceled_at
            && mine.ended_at == state.ended_at
            && mine.pause_collection == state.pause_collection
            && mine.metadata == state.metadata
            && (mine.collection_method.is_none()
                || state.collection_method.is_none()
                || mine.collection_method == state.collection_method)
            && same_option(mine.days_until_due, state.days_until_due)
    }

    /// Whether an item of the subscription is for `price_id`.
    pub fn has_price(&self, price_id: &str) -> bool {
        self.state
            .items
            .iter()
            .any(|i| i.price_id.as_deref() == Some(price_id))
    }

    /// Whether an item of the subscription is for a price of `product_id`.
    pub fn has_product(&self, product_id: &str) -> bool {
        self.state
            .items
            .iter()
            .any(|i| i.product_id.as_deref() == Some(product_id))
    }

    /// The total quantity of the items for `price_id` (an item without a
    /// quantity counts as 1); 0 when no item is for it.
    pub fn quantity_of(&self, price_id: &str) -> u64 {
        self.state
            .items
            .iter()
            .filter(|i| i.price_id.as_deref() == Some(price_id))
            .map(|i| i.quantity.unwrap_or(1))
            .fold(0, u64::saturating_add)
    }

    /// A metadata value of the subscription.
    pub fn metadata(&self, key: &str) -> Option<&str> {
        self.state.metadata.get(key).map(String::as_str)
    }

    /// Whether the subscription carries the name `name` under the metadata
    /// key `key`: how an application keeps several kinds of subscription
    /// per customer apart (a "type" or "name" it sets when subscribing).
    pub fn is_named(&self, key: &str, name: &str) -> bool {
        self.metadata(key) == Some(name)
    }

    /// The payment that `event_id` reported first, if it did: Stripe sends
    /// `invoice.paid` and `invoice.payment_succeeded` for one payment, and
    /// only the first one processed answers `Some` (a retry of that event
    /// still does). Act on a payment (a receipt, a provisioning step) when
    /// this is `Some`, and the action happens once per payment.
    pub fn payment_first_reported_by(&self, event_id: &str) -> Option<&PaidInvoice> {
        self.paid_invoices.iter().find(|p| p.event_id == event_id)
    }

    /// With `send_invoice`: when the unpaid invoice became due, the later of
    /// the latest invoice's due date and the current period's start plus
    /// `days_until_due` (Stripe finalises a renewal invoice about an hour
    /// after the period starts, so the second is at most that early, and it
    /// is what is known when no invoice event of the period was seen).
    /// `None` when the subscription is charged automatically or neither is
    /// known.
    pub fn invoice_due_at(&self) -> Option<i64> {
        if !self.state.is_invoiced() {
            return None;
        }
        let from_period = self
            .state
            .current_period_start
            .zip(self.state.days_until_due)
            .and_then(|(start, days)| start.checked_add(days.checked_mul(86_400)?));
        match (self.latest_invoice_due, from_period) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        }
    }

    /// Records an anomaly, keeping the newest [`MAX_ANOMALIES`]. The one
    /// place anomalies are added.
    pub fn note(
        &mut self,
        at: i64,
        event_id: Option<&str>,
        kind: AnomalyKind,
        detail: impl Into<String>,
    ) {
        self.anomalies.push(Anomaly {
            at,
            event_id: event_id.map(str::to_owned),
            kind,
            detail: detail.into(),
        });
        if self.anomalies.len() > MAX_ANOMALIES {
            let excess = self.anomalies.len() - MAX_ANOMALIES;
            self.anomalies.drain(..excess);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_json_is_flat_and_reads_the_layout_stored_before_the_state_field() {
        let mut r = SubscriptionRecord::new("sub_1");
        r.state.customer = Some("cus_1".into());
        r.state.status = SubscriptionStatus::Active;
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["customer"], "cus_1");
        assert_eq!(json["status"], "active");
        assert!(json.get("state").is_none());
        // The flat layout written by earlier versions reads back.
        let back: SubscriptionRecord = serde_json::from_value(json).unwrap();
        assert_eq!(back, r);
    }

    /// Stores keep the record as JSON: a row written before the billing
    /// fields existed (no collection method, metadata, product ids, invoice
    /// facts or paid invoices) still loads, with those fields empty.
    #[test]
    fn rows_stored_before_the_billing_fields_still_load() {
        let mut r = SubscriptionRecord::new("sub_1");
        r.state.status = SubscriptionStatus::PastDue;
        r.state.items = vec![SubscriptionItem {
            id: Some("si_1".into()),
            price_id: Some("price_1".into()),
            product_id: Some("prod_1".into()),
            quantity: Some(3),
            current_period_start: None,
            current_period_end: None,
        }];
        let mut json = serde_json::to_value(&r).unwrap();
        let row = json.as_object_mut().unwrap();
        for key in [
            "collection_method",
            "days_until_due",
            "metadata",
            "test_clock",
            "latest_invoice_created",
            "latest_invoice_due",
            "next_payment_attempt",
            "paid_invoices",
        ] {
            assert!(row.remove(key).is_some(), "{key} is stored");
        }
        row["items"][0]
            .as_object_mut()
            .unwrap()
            .remove("product_id");
        let old: SubscriptionRecord = serde_json::from_value(json).unwrap();
        assert_eq!(old.state.items[0].product_id, None);
        assert_eq!(old.state.items[0].quantity, Some(3));
        assert!(old.state.metadata.is_empty() && old.paid_invoices.is_empty());
        assert_eq!(old.state.collection_method, None);
        assert!(!old.state.is_invoiced());
    }

    #[test]
    fn set_state_keeps_a_known_customer_and_the_latest_invoice() {
        let mut r = SubscriptionRecord::new("sub_1");
        r.state.customer = Some("cus_1".into());
        r.state.latest_invoice = Some("in_1".into());
        let mut incoming = SubscriptionState::placeholder();
        incoming.status = SubscriptionStatus::Active;
        incoming.latest_invoice = Some("in_2".into());
        r.set_state(incoming);
        assert_eq!(r.customer(), Some("cus_1"));
        assert_eq!(r.state.latest_invoice.as_deref(), Some("in_1"));
        assert_eq!(r.status(), &SubscriptionStatus::Active);
    }

    #[test]
    fn anomalies_are_bounded_oldest_first_out() {
        let mut r = SubscriptionRecord::new("sub_1");
        for i in 0..40 {
            r.note(i, None, AnomalyKind::Diverged, format!("{i}"));
        }
        assert_eq!(r.anomalies.len(), MAX_ANOMALIES);
        assert_eq!(
            r.anomalies[0].at,
            40 - i64::try_from(MAX_ANOMALIES).unwrap()
        );
    }
}
