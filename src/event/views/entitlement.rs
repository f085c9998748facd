//! [`EntitlementSummaryView`]: a customer's active entitlements
//! (`entitlements.active_entitlement_summary.updated` events).

use serde::Deserialize;
use serde::de::{Deserializer, IgnoredAny};

use crate::event::ParseError;

/// A customer's active entitlements.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntitlementSummaryView {
    /// The customer id.
    pub customer: String,
    /// The `lookup_key` of every active entitlement's feature.
    pub lookup_keys: Vec<String>,
    /// Whether the list was complete (`has_more == false`).
    pub complete: bool,
}

impl<'de> Deserialize<'de> for EntitlementSummaryView {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        struct Raw {
            customer: String,
            #[serde(default)]
            entitlements: Option<RawList>,
        }
        #[derive(Deserialize)]
        struct RawList {
            #[serde(default)]
            data: Vec<RawEntitlement>,
            #[serde(default)]
            has_more: bool,
        }
        #[derive(Deserialize)]
        struct RawEntitlement {
            lookup_key: String,
            #[serde(default, rename = "feature")]
            _feature: IgnoredAny,
        }
        let raw = Raw::deserialize(d)?;
        let (lookup_keys, complete) = match raw.entitlements {
            Some(list) => (
                list.data.into_iter().map(|e| e.lookup_key).collect(),
                !list.has_more,
            ),
            None => (Vec::new(), true),
        };
        Ok(Self {
            customer: raw.customer,
            lookup_keys,
            complete,
        })
    }
}

impl EntitlementSummaryView {
    /// Reads an `entitlements.active_entitlement_summary` object.
    ///
    /// # Errors
    ///
    /// [`ParseError`] when the JSON is not an entitlement summary.
    pub fn from_json(json: &str) -> Result<Self, ParseError> {
        serde_json::from_str(json)
            .map_err(|e| ParseError::from_json("entitlements.active_entitlement_summary", &e))
    }
}
