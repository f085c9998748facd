//! Customer entitlements from `entitlements.active_entitlement_summary.updated`.

use serde::{Deserialize, Serialize};

use crate::event::{Event, ParseError};

/// A customer's active entitlements, as last reported by Stripe.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CustomerEntitlements {
    /// The customer id.
    pub customer: String,
    /// Active feature lookup keys.
    pub lookup_keys: Vec<String>,
    /// The `(created, event id)` of the summary event.
    pub watermark: (i64, String),
    /// Optimistic-concurrency version (0 before the first save).
    pub version: u64,
}

impl CustomerEntitlements {
    /// Whether `lookup_key` is active.
    pub fn has(&self, lookup_key: &str) -> bool {
        self.lookup_keys.iter().any(|k| k == lookup_key)
    }
}

/// Last-writer-wins on `(created, event id)` for an entitlement summary
/// event. `None` when the stored summary is newer or the same.
///
/// # Errors
///
/// [`ParseError`] when the object is not an entitlement summary.
pub fn decide_entitlements(
    current: Option<&CustomerEntitlements>,
    event: &Event,
) -> Result<Option<CustomerEntitlements>, ParseError> {
    let view = event.entitlement_summary()?;
    let mark = (event.created(), event.id().to_owned());
    if current.is_some_and(|c| c.watermark >= mark) {
        return Ok(None);
    }
    let mut keys = view.lookup_keys;
    keys.sort();
    keys.dedup();
    Ok(Some(CustomerEntitlements {
        customer: view.customer,
        lookup_keys: keys,
        watermark: mark,
        version: current.map_or(0, |c| c.version),
    }))
}
