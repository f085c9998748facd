//! Views: the raw `data.object` of an [`Event`] typed lazily, only when an
//! event needs it, and each object read by the shape it has.
//!
//! An event keeps `data.object` as raw JSON. The first call to
//! [`Event::subscription`], [`Event::invoice`] or [`Event::checkout_session`]
//! types it and keeps the result in the event, so each view is typed at most
//! once per event; [`Event::entitlement_summary`] types it on every call.
//! A view refuses an object whose `object` member names another kind
//! ([`ParseError::WrongObject`]) rather than reporting a missing field.
//!
//! # API versions
//!
//! Every view reads each object by the shape it has (up to
//! 2025-02-24.acacia, or 2025-03-31.basil and later), never by a
//! per-deployment setting, because one endpoint receives both (a replay from
//! `/v1/events` mixes versions). The field paths each view reads are
//! documented on [`SubscriptionView`] and [`InvoiceView`]; the shape read is
//! recorded as an [`ApiShape`].

use std::fmt;
use std::sync::OnceLock;

use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::{Deserialize, Serialize};

use super::{Event, ParseError};

mod checkout;
mod entitlement;
mod invoice;
mod subscription;

pub use checkout::CheckoutSessionView;
pub use entitlement::EntitlementSummaryView;
pub use invoice::InvoiceView;
pub use subscription::{ItemView, PauseCollection, SubscriptionView};

/// How Stripe collects a subscription's or an invoice's payments
/// (`collection_method`).
///
/// With [`CollectionMethod::ChargeAutomatically`] Stripe charges the
/// payment method on file and reports a failure with
/// `invoice.payment_failed`. With [`CollectionMethod::SendInvoice`] Stripe
/// e-mails an invoice that is due `days_until_due` days after it is
/// finalised; the subscription turns `past_due` when the due date passes
/// unpaid, and no payment failure is ever reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum CollectionMethod {
    /// `charge_automatically` (the default).
    ChargeAutomatically,
    /// `send_invoice`: the customer pays each invoice by its due date.
    SendInvoice,
    /// A value this crate does not know.
    #[serde(other)]
    Other,
}

/// Views already typed from this event's object (each typed at most once).
/// Not `Debug`: an event's `Debug` output never shows what its object holds.
#[derive(Clone, Default)]
pub(super) struct ViewCache {
    identity: OnceLock<Result<ObjectIdentity, ParseError>>,
    subscription: OnceLock<Result<SubscriptionView, ParseError>>,
    invoice: OnceLock<Result<InvoiceView, ParseError>>,
    checkout: OnceLock<Result<CheckoutSessionView, ParseError>>,
}

/// A view typed from `data.object`: it says what kind of object it read.
trait ObjectView: for<'de> Deserialize<'de> {
    const KIND: &'static str;
    fn identity(&self) -> ObjectIdentity;
    fn finish(&mut self) {}
}

/// Typing the raw object into views, once per event.
impl Event {
    /// The `object` and `id` members of `data.object`, read without typing
    /// the rest.
    ///
    /// # Errors
    ///
    /// [`ParseError`] when the object is not a JSON object.
    pub fn object_identity(&self) -> Result<ObjectIdentity, ParseError> {
        self.view_cache()
            .identity
            .get_or_init(|| {
                let Some(raw) = self.object_json() else {
                    return Ok(ObjectIdentity {
                        object: self.related_object().map(|r| r.object_type.clone()),
                        id: self.related_object().map(|r| r.id.clone()),
                    });
                };
                // Type the object once for the view this event needs, and
                // take the identity from it.
                let t = self.event_type();
                let from_view = if t.is_subscription() {
                    self.subscription().ok().map(|v| v.identity())
                } else if t.is_invoice() {
                    self.invoice().ok().map(|v| v.identity())
                } else if t.is_checkout() {
                    self.checkout_session().ok().map(|v| v.identity())
                } else {
                    None
                };
                match from_view {
                    Some(identity) => Ok(identity),
                    None => {
                        serde_json::from_str(raw).map_err(|e| ParseError::from_json("object", &e))
                    }
                }
            })
            .clone()
    }

    /// Whether the view this event's type needs (subscription, invoice or
    /// Checkout Session) types without error; typed once and kept, never
    /// cloned here. `false` for types without such a view.
    pub(super) fn typed_view_ok(&self) -> bool {
        let t = self.event_type();
        let cache = self.view_cache();
        if t.is_subscription() {
            cache
                .subscription
                .get_or_init(|| self.typed_object())
                .is_ok()
        } else if t.is_invoice() {
            cache.invoice.get_or_init(|| self.typed_object()).is_ok()
        } else if t.is_checkout() {
            cache.checkout.get_or_init(|| self.typed_object()).is_ok()
        } else {
            false
        }
    }

    fn typed_object<T: ObjectView>(&self) -> Result<T, ParseError> {
        let raw = self.object_json().ok_or(ParseError::MissingObject)?;
        let mut view: T = match serde_json::from_str(raw) {
            Ok(v) => v,
            Err(e) => {
                // Say "wrong kind of object" rather than "missing field" when
                // that is the real problem.
                let ident: Result<ObjectIdentity, _> = serde_json::from_str(raw);
                if let Ok(ObjectIdentity {
                    object: Some(found),
                    ..
                }) = ident
                    && found != T::KIND
                {
                    return Err(ParseError::WrongObject {
                        expected: T::KIND,
                        found: Some(found),
                    });
                }
                return Err(ParseError::from_json(T::KIND, &e));
            }
        };
        if let Some(found) = view.identity().object
            && found != T::KIND
        {
            return Err(ParseError::WrongObject {
                expected: T::KIND,
                found: Some(found),
            });
        }
        view.finish();
        Ok(view)
    }

    /// The object as a subscription (`customer.subscription.*` events).
    ///
    /// # Errors
    ///
    /// [`ParseError`] when the object is missing, of another kind, or malformed.
    pub fn subscription(&self) -> Result<SubscriptionView, ParseError> {
        self.view_cache()
            .subscription
            .get_or_init(|| self.typed_object())
            .clone()
    }

    /// The object as an invoice (`invoice.*` events).
    ///
    /// # Errors
    ///
    /// [`ParseError`] when the object is missing, of another kind, or malformed.
    pub fn invoice(&self) -> Result<InvoiceView, ParseError> {
        self.view_cache()
            .invoice
            .get_or_init(|| self.typed_object())
            .clone()
    }

    /// The object as a Checkout Session (`checkout.session.*` events).
    ///
    /// # Errors
    ///
    /// [`ParseError`] when the object is missing, of another kind, or malformed.
    pub fn checkout_session(&self) -> Result<CheckoutSessionView, ParseError> {
        self.view_cache()
            .checkout
            .get_or_init(|| self.typed_object())
            .clone()
    }

    /// `data.object` deserialised into any type the application brings: its
    /// own struct with just the fields it needs, or another crate's Stripe
    /// types. Unlike the views, nothing is cached: each call reads the raw
    /// object again. Thin events carry no object
    /// ([`ParseError::MissingObject`]).
    ///
    /// ```
    /// use serde::Deserialize;
    /// use stripe_webhook_guard::event::Event;
    ///
    /// #[derive(Deserialize)]
    /// struct Invoice {
    ///     id: String,
    ///     amount_paid: i64,
    ///     currency: String,
    ///     customer_email: Option<String>,
    /// }
    ///
    /// let event = Event::parse_unverified(
    ///     br#"{"id":"evt_1","object":"event","type":"invoice.paid","created":1700000000,
    ///         "livemode":false,"data":{"object":{"id":"in_1","object":"invoice",
    ///         "amount_paid":2000,"currency":"eur","customer_email":"a@example.com"}}}"#,
    /// )
    /// .unwrap();
    /// let invoice: Invoice = event.object_as().unwrap();
    /// assert_eq!((invoice.id.as_str(), invoice.amount_paid), ("in_1", 2000));
    /// assert_eq!(invoice.currency, "eur");
    /// assert_eq!(invoice.customer_email.as_deref(), Some("a@example.com"));
    /// ```
    ///
    /// # Errors
    ///
    /// [`ParseError::MissingObject`] for a thin event, [`ParseError::Shape`]
    /// when the object does not fit `T` (the error never quotes the object).
    pub fn object_as<T: de::DeserializeOwned>(&self) -> Result<T, ParseError> {
        let raw = self.object_json().ok_or(ParseError::MissingObject)?;
        serde_json::from_str(raw).map_err(|e| ParseError::from_json("object", &e))
    }

    /// The Stripe test clock the event's object runs on: its `test_clock`
    /// member (an id or the expanded clock), which subscriptions, invoices
    /// and customers carry. `None` for an object without one (live mode,
    /// thin events, other kinds, a malformed member). Such an object's
    /// events carry the clock's simulated time as `created`.
    ///
    /// ```
    /// use stripe_webhook_guard::event::Event;
    ///
    /// let event = Event::parse_unverified(br#"{"id":"evt_1","object":"event",
    ///     "type":"invoice.paid","created":1900000000,"livemode":false,
    ///     "data":{"object":{"id":"in_1","object":"invoice","test_clock":"clock_1"}}}"#).unwrap();
    /// assert_eq!(event.test_clock().as_deref(), Some("clock_1"));
    /// ```
    pub fn test_clock(&self) -> Option<String> {
        #[derive(Deserialize)]
        struct WithClock {
            #[serde(default)]
            test_clock: Option<subscription::RawTestClock>,
        }
        match self.object_as::<WithClock>().ok()?.test_clock? {
            subscription::RawTestClock::Id(id) => Some(id),
            subscription::RawTestClock::Expanded { id, .. } => id,
        }
    }

    /// The object as an active-entitlement summary
    /// (`entitlements.active_entitlement_summary.updated`).
    ///
    /// # Errors
    ///
    /// [`ParseError`] when the object is missing, of another kind, or malformed.
    pub fn entitlement_summary(&self) -> Result<EntitlementSummaryView, ParseError> {
        let raw = self.object_json().ok_or(ParseError::MissingObject)?;
        let kind = "entitlements.active_entitlement_summary";
        let ident: ObjectIdentity =
            serde_json::from_str(raw).map_err(|e| ParseError::from_json(kind, &e))?;
        if let Some(found) = ident.object
            && found != kind
        {
            return Err(ParseError::WrongObject {
                expected: kind,
                found: Some(found),
            });
        }
        serde_json::from_str(raw).map_err(|e| ParseError::from_json(kind, &e))
    }
}

/// The `object` and `id` members of an object.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct ObjectIdentity {
    /// `subscription`, `invoice`, … (absent on 2012-era objects).
    #[serde(default, deserialize_with = "opt_string")]
    pub object: Option<String>,
    /// The object's id (absent on 2012-era subscriptions).
    #[serde(default, deserialize_with = "opt_string")]
    pub id: Option<String>,
}

/// A string, `null`, or an expanded object whose `id` is taken.
fn id_or_object<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    struct V;
    impl<'de> Visitor<'de> for V {
        type Value = Option<String>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("an id, an expanded object or null")
        }
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_some<D2: Deserializer<'de>>(self, d: D2) -> Result<Self::Value, D2::Error> {
            d.deserialize_any(self)
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
            Ok(Some(v.to_owned()))
        }
        fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
            let ident = ObjectIdentity::deserialize(de::value::MapAccessDeserializer::new(map))?;
            Ok(ident.id)
        }
    }
    d.deserialize_any(V)
}

fn opt_string<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    Option::<String>::deserialize(d)
}

/// Metadata: a string map; `null` or absent reads as empty, and a value
/// that is not a string (Stripe never sends one) is skipped.
fn metadata_map<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<std::collections::BTreeMap<String, String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Value {
        Text(String),
        Other(de::IgnoredAny),
    }
    let map: Option<std::collections::BTreeMap<String, Value>> = Option::deserialize(d)?;
    Ok(map
        .unwrap_or_default()
        .into_iter()
        .filter_map(|(k, v)| match v {
            Value::Text(t) => Some((k, t)),
            Value::Other(_) => None,
        })
        .collect())
}

fn opt_bool_false<'de, D: Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    Ok(Option::<bool>::deserialize(d)?.unwrap_or(false))
}

/// Which API shape an object was rendered in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ApiShape {
    /// Up to 2025-02-24.acacia (including 2012-era objects).
    PreBasil,
    /// 2025-03-31.basil and later.
    Basil,
}

/// The shape a view starts with, before its fields show basil's.
fn pre_basil() -> ApiShape {
    ApiShape::PreBasil
}
