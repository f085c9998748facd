//! [`InvoiceView`]: an invoice read from either API shape, with the raw
//! serde structs it is read through. The field paths of each shape are
//! documented on the type.

use serde::Deserialize;

use super::{
    ApiShape, CollectionMethod, ObjectIdentity, ObjectView, id_or_object, opt_string, pre_basil,
};
use crate::event::ParseError;

/// An invoice, read from either API shape.
///
/// | concept | up to 2025-02-24.acacia | 2025-03-31.basil and later |
/// |---|---|---|
/// | invoice → subscription | `invoice.subscription` | `invoice.parent.subscription_details.subscription` |
/// | invoice paid? | `invoice.paid` | `invoice.status == "paid"` |
/// | line → subscription | `line.subscription` | `line.parent.subscription_item_details.subscription` |
///
/// A basil-or-later invoice may carry `"subscription": null` at the top
/// level: the subscription is then taken from `parent`, and failing that
/// from the first line that names one. 2012-era invoices list subscription
/// lines under `lines.subscriptions` and are read too.
///
/// ```
/// use stripe_webhook_guard::event::{ApiShape, InvoiceView};
///
/// let basil = InvoiceView::from_json(
///     r#"{"id":"in_1","object":"invoice","status":"paid","subscription":null,
///         "parent":{"type":"subscription_details","subscription_details":{"subscription":"sub_1"}}}"#,
/// )
/// .unwrap();
/// assert_eq!(basil.subscription_id.as_deref(), Some("sub_1"));
/// assert!(basil.paid);
/// assert_eq!(basil.shape, ApiShape::Basil);
///
/// let acacia = InvoiceView::from_json(
///     r#"{"id":"in_1","object":"invoice","status":"open","paid":false,"subscription":"sub_1"}"#,
/// )
/// .unwrap();
/// assert_eq!(acacia.subscription_id.as_deref(), Some("sub_1"));
/// assert!(!acacia.paid);
/// assert_eq!(acacia.shape, ApiShape::PreBasil);
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct InvoiceView {
    /// `in_…`.
    #[serde(default, deserialize_with = "opt_string")]
    pub id: Option<String>,
    /// The customer id.
    #[serde(default, deserialize_with = "id_or_object")]
    pub customer: Option<String>,
    /// The subscription this invoice bills, from whichever field the shape
    /// has (`subscription`, `parent.subscription_details.subscription`, or a
    /// line's subscription).
    #[serde(skip)]
    pub subscription_id: Option<String>,
    /// `draft`, `open`, `paid`, `uncollectible` or `void`.
    #[serde(default, deserialize_with = "opt_string")]
    pub status: Option<String>,
    /// Paid: `paid` before basil, `status == "paid"` from basil on.
    #[serde(skip)]
    pub paid: bool,
    /// Why the invoice was created (`subscription_cycle`, `subscription_create`, …).
    #[serde(default, deserialize_with = "opt_string")]
    pub billing_reason: Option<String>,
    /// The latest end of the service periods of this invoice's subscription
    /// lines: how far a payment of this invoice pays for.
    #[serde(skip)]
    pub service_period_end: Option<i64>,
    /// Invoice-level `period_end` (the usage period; not the service period).
    #[serde(default)]
    pub period_end: Option<i64>,
    /// Creation time.
    #[serde(default)]
    pub created: Option<i64>,
    /// Number of payment attempts.
    #[serde(default)]
    pub attempt_count: Option<u64>,
    /// When Stripe will retry, if it will.
    #[serde(default)]
    pub next_payment_attempt: Option<i64>,
    /// Amount paid, in the smallest currency unit.
    #[serde(default)]
    pub amount_paid: Option<i64>,
    /// How the invoice is collected (`charge_automatically` or
    /// `send_invoice`).
    #[serde(default)]
    pub collection_method: Option<CollectionMethod>,
    /// With `send_invoice`: when the invoice is due (Unix seconds). Stripe
    /// sets it at finalisation.
    #[serde(default)]
    pub due_date: Option<i64>,
    /// When the invoice was finalised (`status_transitions.finalized_at`).
    #[serde(skip)]
    pub finalized_at: Option<i64>,
    /// The shape it was rendered in.
    #[serde(skip, default = "pre_basil")]
    pub shape: ApiShape,
    #[serde(default, rename = "object", deserialize_with = "opt_string")]
    kind: Option<String>,
    #[serde(default, rename = "paid")]
    raw_paid: Option<bool>,
    #[serde(default, rename = "subscription", deserialize_with = "id_or_object")]
    raw_subscription: Option<String>,
    #[serde(default, rename = "parent")]
    raw_parent: Option<RawInvoiceParent>,
    #[serde(default, rename = "lines")]
    raw_lines: Option<RawLines>,
    #[serde(default, rename = "status_transitions")]
    raw_transitions: Option<RawTransitions>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
struct RawTransitions {
    #[serde(default)]
    finalized_at: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
struct RawInvoiceParent {
    #[serde(default)]
    subscription_details: Option<RawSubscriptionDetails>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
struct RawSubscriptionDetails {
    #[serde(default, deserialize_with = "id_or_object")]
    subscription: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
struct RawLines {
    #[serde(default)]
    data: Vec<RawLine>,
    /// 2012-era invoices list subscription lines here.
    #[serde(default)]
    subscriptions: Vec<RawLine>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
struct RawLine {
    #[serde(default, deserialize_with = "id_or_object")]
    subscription: Option<String>,
    #[serde(default)]
    parent: Option<RawLineParent>,
    #[serde(default, rename = "type", deserialize_with = "opt_string")]
    line_type: Option<String>,
    #[serde(default)]
    period: Option<RawPeriod>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
struct RawLineParent {
    #[serde(default)]
    subscription_item_details: Option<RawSubscriptionDetails>,
    #[serde(default, rename = "type", deserialize_with = "opt_string")]
    parent_type: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
struct RawPeriod {
    #[serde(default)]
    end: Option<i64>,
}

impl RawLine {
    fn subscription_id(&self) -> Option<&str> {
        self.subscription.as_deref().or_else(|| {
            self.parent
                .as_ref()?
                .subscription_item_details
                .as_ref()?
                .subscription
                .as_deref()
        })
    }

    fn is_subscription_line(&self) -> bool {
        self.line_type.as_deref() == Some("subscription")
            || self.subscription_id().is_some()
            || self.parent.as_ref().is_some_and(|p| {
                p.parent_type.as_deref() == Some("subscription_item_details")
                    || p.subscription_item_details.is_some()
            })
    }
}

impl InvoiceView {
    /// Reads an invoice object (from the API or a fixture).
    ///
    /// # Errors
    ///
    /// [`ParseError`] when the JSON is not an invoice.
    pub fn from_json(json: &str) -> Result<Self, ParseError> {
        let mut view: Self =
            serde_json::from_str(json).map_err(|e| ParseError::from_json("invoice", &e))?;
        view.finish();
        Ok(view)
    }

    /// When the invoice is due: its `due_date`, or, when Stripe did not
    /// set one, `days_until_due` days (the subscription's setting) after it
    /// was finalised. `None` for an invoice charged automatically, or when
    /// neither is known.
    ///
    /// ```
    /// use stripe_webhook_guard::event::InvoiceView;
    ///
    /// let due = InvoiceView::from_json(r#"{"id":"in_1","object":"invoice",
    ///     "collection_method":"send_invoice","due_date":1700864000}"#).unwrap();
    /// assert_eq!(due.due_at(None), Some(1_700_864_000));
    /// let finalised = InvoiceView::from_json(r#"{"id":"in_1","object":"invoice",
    ///     "collection_method":"send_invoice","due_date":null,
    ///     "status_transitions":{"finalized_at":1700000000}}"#).unwrap();
    /// assert_eq!(finalised.due_at(Some(10)), Some(1_700_000_000 + 10 * 86_400));
    /// ```
    pub fn due_at(&self, days_until_due: Option<i64>) -> Option<i64> {
        if self.collection_method != Some(CollectionMethod::SendInvoice) {
            return None;
        }
        self.due_date.or_else(|| {
            let days = days_until_due?;
            self.finalized_at?.checked_add(days.checked_mul(86_400)?)
        })
    }

    fn finish(&mut self) {
        self.finalized_at = self.raw_transitions.take().and_then(|t| t.finalized_at);
        let from_parent = self
            .raw_parent
            .as_ref()
            .and_then(|p| p.subscription_details.as_ref())
            .and_then(|d| d.subscription.clone());
        self.shape =
            if self.raw_parent.is_some() || self.raw_paid.is_none() && self.status.is_some() {
                ApiShape::Basil
            } else {
                ApiShape::PreBasil
            };
        // (line, listed under 2012-era `lines.subscriptions`)
        let lines: Vec<(&RawLine, bool)> = self
            .raw_lines
            .as_ref()
            .map(|l| {
                l.data
                    .iter()
                    .map(|line| (line, false))
                    .chain(l.subscriptions.iter().map(|line| (line, true)))
                    .collect()
            })
            .unwrap_or_default();
        let from_lines = lines
            .iter()
            .find_map(|(l, _)| l.subscription_id().map(str::to_owned));
        self.subscription_id = self.raw_subscription.take().or(from_parent).or(from_lines);
        self.paid = match self.raw_paid {
            Some(paid) => paid,
            None => self.status.as_deref() == Some("paid"),
        };
        let sub = self.subscription_id.as_deref();
        self.service_period_end = lines
            .iter()
            .filter(|(l, legacy)| *legacy || l.is_subscription_line())
            .filter(|(l, _)| match (sub, l.subscription_id()) {
                (Some(s), Some(ls)) => s == ls,
                _ => true,
            })
            .filter_map(|(l, _)| l.period.as_ref().and_then(|p| p.end))
            .max();
    }
}
impl ObjectView for InvoiceView {
    const KIND: &'static str = "invoice";
    fn identity(&self) -> ObjectIdentity {
        ObjectIdentity {
            object: self.kind.clone(),
            id: self.id.clone(),
        }
    }
    fn finish(&mut self) {
        InvoiceView::finish(self);
    }
}
