//! [`CheckoutSessionView`]: a Checkout Session (`checkout.session.*` events).

use serde::Deserialize;

use super::{ObjectIdentity, ObjectView, id_or_object, opt_string};
use crate::event::ParseError;

/// A Checkout Session.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct CheckoutSessionView {
    /// `cs_…`.
    #[serde(default, deserialize_with = "opt_string")]
    pub id: Option<String>,
    /// The application's own reference (a user id, say) passed to Checkout.
    #[serde(default, deserialize_with = "opt_string")]
    pub client_reference_id: Option<String>,
    /// The customer id, once there is one.
    #[serde(default, deserialize_with = "id_or_object")]
    pub customer: Option<String>,
    /// The subscription id (`mode == "subscription"`).
    #[serde(default, deserialize_with = "id_or_object")]
    pub subscription: Option<String>,
    /// `payment`, `setup` or `subscription`.
    #[serde(default, deserialize_with = "opt_string")]
    pub mode: Option<String>,
    /// `open`, `complete` or `expired`.
    #[serde(default, deserialize_with = "opt_string")]
    pub status: Option<String>,
    /// `paid`, `unpaid` or `no_payment_required`.
    #[serde(default, deserialize_with = "opt_string")]
    pub payment_status: Option<String>,
    /// Creation time.
    #[serde(default)]
    pub created: Option<i64>,
    #[serde(default, rename = "object", deserialize_with = "opt_string")]
    kind: Option<String>,
}
impl ObjectView for CheckoutSessionView {
    const KIND: &'static str = "checkout.session";
    fn identity(&self) -> ObjectIdentity {
        ObjectIdentity {
            object: self.kind.clone(),
            id: self.id.clone(),
        }
    }
}

impl CheckoutSessionView {
    /// Reads a Checkout Session object.
    ///
    /// # Errors
    ///
    /// [`ParseError`] when the JSON is not a Checkout Session.
    pub fn from_json(json: &str) -> Result<Self, ParseError> {
        serde_json::from_str(json).map_err(|e| ParseError::from_json("checkout.session", &e))
    }
}
