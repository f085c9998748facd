//! [`SubscriptionView`]: a subscription read from either API shape, with
//! the raw serde structs it is read through. The field paths of each shape
//! are documented on the type.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{
    ApiShape, CollectionMethod, ObjectIdentity, ObjectView, id_or_object, metadata_map,
    opt_bool_false, opt_string, pre_basil,
};
use crate::event::{ParseError, SubscriptionStatus};

/// `pause_collection` on a subscription. Also the stored form
/// ([`crate::subscription::PauseCollection`]): fields are only ever added,
/// each readable when absent, so stored records keep loading.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PauseCollection {
    /// `keep_as_draft`, `mark_uncollectible` or `void`.
    #[serde(default)]
    pub behavior: Option<String>,
    /// When collection resumes automatically, in Unix seconds.
    #[serde(default)]
    pub resumes_at: Option<i64>,
}

/// One subscription item: its id, price, product and quantity, and (on API
/// versions 2025-03-31.basil and later) its own billing period. Also the
/// stored form ([`crate::subscription::SubscriptionItem`]): fields are only
/// ever added, each readable when absent, so stored records keep loading.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ItemView {
    /// `si_…` (absent on 2012-era objects).
    pub id: Option<String>,
    /// The price (or legacy plan) id.
    pub price_id: Option<String>,
    /// The product of the price (or plan), `price.product`.
    #[serde(default)]
    pub product_id: Option<String>,
    /// Quantity, when given.
    pub quantity: Option<u64>,
    /// The item's own period start (basil and later).
    pub current_period_start: Option<i64>,
    /// The item's own period end (basil and later).
    pub current_period_end: Option<i64>,
}

/// A subscription, read from either API shape.
///
/// The billing period is read from where the object's shape keeps it:
///
/// | up to 2025-02-24.acacia | 2025-03-31.basil and later |
/// |---|---|
/// | `subscription.current_period_start/_end` | `subscription.items.data[].current_period_start/_end` (per item) |
///
/// When the items carry the periods (flexible billing lets them differ), the
/// subscription's period is that of the item with the **earliest** end: it
/// is the next moment a payment can be due, so access never outlives what
/// was paid for. A 2012-era subscription (no id, a single `plan` instead of
/// `items`) is read as one item.
///
/// ```
/// use stripe_webhook_guard::event::{ApiShape, SubscriptionStatus, SubscriptionView};
///
/// let basil = SubscriptionView::from_json(
///     r#"{"id":"sub_1","object":"subscription","status":"active","items":{"data":[
///         {"id":"si_1","price":{"id":"price_a"},"current_period_start":100,"current_period_end":300},
///         {"id":"si_2","price":{"id":"price_b"},"current_period_start":100,"current_period_end":200}]}}"#,
/// )
/// .unwrap();
/// assert_eq!(basil.status, SubscriptionStatus::Active);
/// assert_eq!(basil.shape, ApiShape::Basil);
/// assert_eq!(basil.current_period_end, Some(200)); // the earliest item end
///
/// let acacia = SubscriptionView::from_json(
///     r#"{"id":"sub_1","object":"subscription","status":"active",
///         "current_period_start":100,"current_period_end":300}"#,
/// )
/// .unwrap();
/// assert_eq!(acacia.shape, ApiShape::PreBasil);
/// assert_eq!(acacia.current_period_end, Some(300));
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct SubscriptionView {
    /// `sub_…`; `None` only on 2012-era events, which had no subscription id.
    #[serde(default, deserialize_with = "opt_string")]
    pub id: Option<String>,
    /// The customer id (expanded customers are reduced to their id).
    #[serde(default, deserialize_with = "id_or_object")]
    pub customer: Option<String>,
    /// The status.
    pub status: SubscriptionStatus,
    /// Items with their prices and (basil and later) periods.
    #[serde(skip)]
    pub items: Vec<ItemView>,
    /// The period start: top-level before basil, else the item with the
    /// earliest end.
    #[serde(default)]
    pub current_period_start: Option<i64>,
    /// The period end: top-level before basil, else the earliest item end.
    #[serde(default)]
    pub current_period_end: Option<i64>,
    /// Trial start, if any.
    #[serde(default)]
    pub trial_start: Option<i64>,
    /// Trial end, if any.
    #[serde(default)]
    pub trial_end: Option<i64>,
    /// Cancels at the end of the current period.
    #[serde(default, deserialize_with = "opt_bool_false")]
    pub cancel_at_period_end: bool,
    /// A scheduled cancellation time.
    #[serde(default)]
    pub cancel_at: Option<i64>,
    /// When cancellation was requested.
    #[serde(default)]
    pub canceled_at: Option<i64>,
    /// When the subscription ended.
    #[serde(default)]
    pub ended_at: Option<i64>,
    /// Paused collection, if set (does not change `status`).
    #[serde(default)]
    pub pause_collection: Option<PauseCollection>,
    /// The latest invoice's id.
    #[serde(default, deserialize_with = "id_or_object")]
    pub latest_invoice: Option<String>,
    /// How Stripe collects payment: charging the card on file, or sending
    /// an invoice the customer pays by its due date.
    #[serde(default)]
    pub collection_method: Option<CollectionMethod>,
    /// With `send_invoice`: days from an invoice's finalisation to its due
    /// date.
    #[serde(default)]
    pub days_until_due: Option<i64>,
    /// The subscription's metadata (what the application set: a plan name,
    /// a user id, a subscription "type").
    #[serde(default, deserialize_with = "metadata_map")]
    pub metadata: BTreeMap<String, String>,
    /// The test clock the subscription runs on (test mode only): its events
    /// carry simulated `created` times.
    #[serde(skip)]
    pub test_clock: Option<String>,
    /// The test clock's simulated time, when the clock was expanded
    /// (`expand[]=test_clock`).
    #[serde(skip)]
    pub test_clock_frozen_time: Option<i64>,
    /// Creation time.
    #[serde(default)]
    pub created: Option<i64>,
    /// Live or test mode.
    #[serde(default)]
    pub livemode: Option<bool>,
    /// The shape it was rendered in.
    #[serde(skip, default = "pre_basil")]
    pub shape: ApiShape,
    #[serde(default, rename = "object", deserialize_with = "opt_string")]
    kind: Option<String>,
    #[serde(default, rename = "items")]
    raw_items: Option<RawItemList>,
    #[serde(default, rename = "plan")]
    raw_plan: Option<RawPrice>,
    #[serde(default, rename = "test_clock")]
    raw_test_clock: Option<RawTestClock>,
}

/// `test_clock`: an id, or the expanded clock.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub(super) enum RawTestClock {
    Id(String),
    Expanded {
        #[serde(default, deserialize_with = "opt_string")]
        id: Option<String>,
        #[serde(default)]
        frozen_time: Option<i64>,
    },
}

/// A price or a legacy plan: its id and product.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
struct RawPrice {
    #[serde(default, deserialize_with = "opt_string")]
    id: Option<String>,
    #[serde(default, deserialize_with = "id_or_object")]
    product: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
struct RawItemList {
    #[serde(default)]
    data: Vec<RawItem>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
struct RawItem {
    #[serde(default, deserialize_with = "opt_string")]
    id: Option<String>,
    #[serde(default)]
    price: Option<RawPrice>,
    #[serde(default)]
    plan: Option<RawPrice>,
    #[serde(default)]
    quantity: Option<u64>,
    #[serde(default)]
    current_period_start: Option<i64>,
    #[serde(default)]
    current_period_end: Option<i64>,
}

impl SubscriptionView {
    /// Reads a subscription object (from the API or a fixture).
    ///
    /// # Errors
    ///
    /// [`ParseError`] when the JSON is not a subscription.
    pub fn from_json(json: &str) -> Result<Self, ParseError> {
        let mut view: Self =
            serde_json::from_str(json).map_err(|e| ParseError::from_json("subscription", &e))?;
        view.finish();
        Ok(view)
    }

    fn finish(&mut self) {
        match self.raw_test_clock.take() {
            Some(RawTestClock::Id(id)) => self.test_clock = Some(id),
            Some(RawTestClock::Expanded { id, frozen_time }) => {
                self.test_clock = id;
                self.test_clock_frozen_time = frozen_time;
            }
            None => {}
        }
        let raw_items = self.raw_items.take().map(|l| l.data).unwrap_or_default();
        self.items = raw_items
            .into_iter()
            .map(|i| {
                let (price_id, product_id) = price_and_product(i.price, i.plan);
                ItemView {
                    id: i.id,
                    price_id,
                    product_id,
                    quantity: i.quantity,
                    current_period_start: i.current_period_start,
                    current_period_end: i.current_period_end,
                }
            })
            .collect();
        if self.items.is_empty()
            && let Some(plan) = self.raw_plan.take()
        {
            // 2012-era: a single plan, no items.
            let (price_id, product_id) = price_and_product(Some(plan), None);
            self.items.push(ItemView {
                id: None,
                price_id,
                product_id,
                quantity: None,
                current_period_start: None,
                current_period_end: None,
            });
        }
        let item_periods = self.items.iter().any(|i| i.current_period_end.is_some());
        if self.current_period_end.is_none() && item_periods {
            self.shape = ApiShape::Basil;
            let earliest = self
                .items
                .iter()
                .filter(|i| i.current_period_end.is_some())
                .min_by_key(|i| i.current_period_end);
            if let Some(item) = earliest {
                self.current_period_end = item.current_period_end;
                self.current_period_start = item.current_period_start;
            }
        } else if self.current_period_end.is_none() && !self.items.is_empty() {
            // Neither shape's period fields: a basil object without periods
            // is possible (incomplete_expired), as is a sparse pre-basil one.
            self.shape = if self.raw_plan.is_none() && self.items.iter().all(|i| i.id.is_some()) {
                ApiShape::Basil
            } else {
                ApiShape::PreBasil
            };
        }
    }
}
/// The price id and product of an item: from `price`, else the legacy
/// `plan` (each field from whichever has it).
fn price_and_product(
    price: Option<RawPrice>,
    plan: Option<RawPrice>,
) -> (Option<String>, Option<String>) {
    let (price_id, price_product) = price.map_or((None, None), |p| (p.id, p.product));
    let (plan_id, plan_product) = plan.map_or((None, None), |p| (p.id, p.product));
    (price_id.or(plan_id), price_product.or(plan_product))
}

impl SubscriptionView {
    /// Whether Stripe sends this subscription's invoices to be paid by a
    /// due date (`collection_method = send_invoice`).
    pub fn is_invoiced(&self) -> bool {
        self.collection_method == Some(CollectionMethod::SendInvoice)
    }
}

impl ObjectView for SubscriptionView {
    const KIND: &'static str = "subscription";
    fn identity(&self) -> ObjectIdentity {
        ObjectIdentity {
            object: self.kind.clone(),
            id: self.id.clone(),
        }
    }
    fn finish(&mut self) {
        SubscriptionView::finish(self);
    }
}
