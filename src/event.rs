//! The Stripe event envelope and version-tolerant views of the objects the
//! crate acts on.
//!
//! [`Event::parse`] reads the envelope into typed fields (`id`, `type`,
//! `created`, `livemode`, `api_version`, `account`, `request`) and keeps
//! `data.object` and `data.previous_attributes` as raw JSON. Views type the
//! object lazily, only when an event needs it:
//! [`SubscriptionView`], [`InvoiceView`], [`CheckoutSessionView`] and
//! [`EntitlementSummaryView`].
//!
//! # API versions
//!
//! A webhook endpoint receives events rendered in its own API version, and a
//! 30-day replay from `/v1/events` mixes versions, so every view reads each
//! object by the shape it has, never by a per-deployment setting:
//!
//! | concept | ≤ 2025-02-24.acacia | 2025-03-31.basil and later |
//! |---|---|---|
//! | invoice → subscription | `invoice.subscription` | `invoice.parent.subscription_details.subscription` |
//! | billing period | `subscription.current_period_start/_end` | `subscription.items.data[].current_period_start/_end` |
//! | invoice paid? | `invoice.paid` | `invoice.status == "paid"` |
//! | line → subscription | `line.subscription` | `line.parent.subscription_item_details.subscription` |
//!
//! Where items carry their own periods (flexible billing lets them differ),
//! the subscription's period end is the **earliest** item end: it is the next
//! moment a payment can be due, so access never outlives what was paid for.
//! The 2012-era shape (no subscription id, `plan` instead of `items`,
//! `lines.subscriptions[]` on invoices) is read too.
//!
//! # Hostile input
//!
//! Parsing never panics. `serde_json`'s recursion limit (128) is kept, a
//! duplicated envelope field is an error, wrong types are errors, and a
//! [`ParseError`] never quotes the body.

use std::fmt;
use std::sync::OnceLock;

use serde::de::{self, Deserializer, IgnoredAny, MapAccess, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use time::OffsetDateTime;

use crate::signature::{DEFAULT_MAX_BODY_BYTES, Verified};

/// Why an event or an object could not be read. Never contains any part of
/// the body: messages name the field or the syntax problem only.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ParseError {
    /// The bytes are not well-formed JSON (or nest deeper than 128 levels).
    #[error("invalid JSON at line {line}, column {column}: {reason}")]
    Syntax {
        /// 1-based line of the error.
        line: usize,
        /// 1-based column of the error.
        column: usize,
        /// What is wrong, without quoting the input.
        reason: String,
    },
    /// Well-formed JSON that is not a Stripe event or object of the expected
    /// shape (a missing or duplicated field, a wrong type).
    #[error("{what} does not have the expected shape: {reason}")]
    Shape {
        /// What was being read (`event`, `subscription`, …).
        what: &'static str,
        /// What is wrong, without quoting the input.
        reason: String,
    },
    /// A snapshot event without `data.object`.
    #[error("event has no data.object")]
    MissingObject,
    /// The event carries no object of the kind a view asked for.
    #[error("event object is a {found:?}, not a {expected}")]
    WrongObject {
        /// The view's object kind.
        expected: &'static str,
        /// The object's `object` field, when present.
        found: Option<String>,
    },
    /// A timestamp outside the range this crate represents (years ±9999).
    #[error("{field} is out of range")]
    TimestampOutOfRange {
        /// The field's name.
        field: &'static str,
    },
    /// The input exceeds the size limit for unverified parsing.
    #[error("input of {len} bytes exceeds the limit of {limit} bytes")]
    TooLarge {
        /// Input length.
        len: usize,
        /// The limit.
        limit: usize,
    },
}

impl ParseError {
    fn from_json(what: &'static str, e: &serde_json::Error) -> Self {
        use serde_json::error::Category;
        match e.classify() {
            Category::Syntax | Category::Eof | Category::Io => ParseError::Syntax {
                line: e.line(),
                column: e.column(),
                // serde_json's syntax messages never quote the input.
                reason: syntax_reason(e),
            },
            Category::Data => ParseError::Shape {
                what,
                reason: data_reason(e),
            },
        }
    }
}

/// The message of a syntax error without its " at line L column C" suffix.
fn syntax_reason(e: &serde_json::Error) -> String {
    let text = e.to_string();
    match text.rfind(" at line ") {
        Some(i) => text[..i].to_owned(),
        None => text,
    }
}

/// A data error's message with any quoted input removed. serde's messages
/// have the forms "missing field `x`", "duplicate field `x`", "invalid type:
/// <input>, expected <ours>", "invalid value: <input>, expected <ours>",
/// "invalid length N, expected <ours>", and our own custom texts.
fn data_reason(e: &serde_json::Error) -> String {
    let text = e.to_string();
    let text = match text.rfind(" at line ") {
        Some(i) => &text[..i],
        None => &text[..],
    };
    for prefix in ["missing field", "duplicate field"] {
        if text.starts_with(prefix) {
            return text.to_owned();
        }
    }
    for prefix in ["invalid type", "invalid value", "invalid length"] {
        if text.starts_with(prefix) {
            return match text.rfind(", expected ") {
                Some(i) => format!("{prefix}, expected {}", &text[i + 11..]),
                None => prefix.to_owned(),
            };
        }
    }
    if let Some(own) = text.strip_prefix(OWN_MESSAGE) {
        return own.to_owned();
    }
    "unexpected data".to_owned()
}

/// Prefix of messages this module raises itself (known not to quote input).
const OWN_MESSAGE: &str = "swg: ";

/// The kinds of events this crate acts on, plus [`EventType::Other`] for every
/// other type (which applications may still handle themselves).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum EventType {
    /// `customer.subscription.created`
    SubscriptionCreated,
    /// `customer.subscription.updated`
    SubscriptionUpdated,
    /// `customer.subscription.deleted` (the subscription ended: `canceled`).
    SubscriptionDeleted,
    /// `customer.subscription.paused`
    SubscriptionPaused,
    /// `customer.subscription.resumed`
    SubscriptionResumed,
    /// `customer.subscription.trial_will_end` (three days before).
    SubscriptionTrialWillEnd,
    /// `customer.subscription.pending_update_applied`
    SubscriptionPendingUpdateApplied,
    /// `customer.subscription.pending_update_expired`
    SubscriptionPendingUpdateExpired,
    /// `invoice.paid`
    InvoicePaid,
    /// `invoice.payment_succeeded`
    InvoicePaymentSucceeded,
    /// `invoice.payment_failed`
    InvoicePaymentFailed,
    /// `invoice.payment_action_required`
    InvoicePaymentActionRequired,
    /// `checkout.session.completed`
    CheckoutSessionCompleted,
    /// `checkout.session.async_payment_succeeded`
    CheckoutSessionAsyncPaymentSucceeded,
    /// `checkout.session.async_payment_failed`
    CheckoutSessionAsyncPaymentFailed,
    /// `entitlements.active_entitlement_summary.updated`
    EntitlementSummaryUpdated,
    /// Any other type, verbatim.
    Other(String),
}

const KNOWN_TYPES: [(&str, EventType); 16] = [
    (
        "customer.subscription.created",
        EventType::SubscriptionCreated,
    ),
    (
        "customer.subscription.updated",
        EventType::SubscriptionUpdated,
    ),
    (
        "customer.subscription.deleted",
        EventType::SubscriptionDeleted,
    ),
    (
        "customer.subscription.paused",
        EventType::SubscriptionPaused,
    ),
    (
        "customer.subscription.resumed",
        EventType::SubscriptionResumed,
    ),
    (
        "customer.subscription.trial_will_end",
        EventType::SubscriptionTrialWillEnd,
    ),
    (
        "customer.subscription.pending_update_applied",
        EventType::SubscriptionPendingUpdateApplied,
    ),
    (
        "customer.subscription.pending_update_expired",
        EventType::SubscriptionPendingUpdateExpired,
    ),
    ("invoice.paid", EventType::InvoicePaid),
    (
        "invoice.payment_succeeded",
        EventType::InvoicePaymentSucceeded,
    ),
    ("invoice.payment_failed", EventType::InvoicePaymentFailed),
    (
        "invoice.payment_action_required",
        EventType::InvoicePaymentActionRequired,
    ),
    (
        "checkout.session.completed",
        EventType::CheckoutSessionCompleted,
    ),
    (
        "checkout.session.async_payment_succeeded",
        EventType::CheckoutSessionAsyncPaymentSucceeded,
    ),
    (
        "checkout.session.async_payment_failed",
        EventType::CheckoutSessionAsyncPaymentFailed,
    ),
    (
        "entitlements.active_entitlement_summary.updated",
        EventType::EntitlementSummaryUpdated,
    ),
];

impl EventType {
    /// Reads a type string. Thin events name v1 types with a `v1.` prefix
    /// (`v1.customer.subscription.updated`); the prefix is accepted.
    pub fn parse(text: &str) -> Self {
        let bare = text.strip_prefix("v1.").unwrap_or(text);
        KNOWN_TYPES
            .iter()
            .find(|(name, _)| *name == bare)
            .map_or_else(|| EventType::Other(text.to_owned()), |(_, t)| t.clone())
    }

    /// The type string as Stripe spells it (without a thin `v1.` prefix).
    pub fn as_str(&self) -> &str {
        if let EventType::Other(s) = self {
            return s;
        }
        KNOWN_TYPES
            .iter()
            .find(|(_, t)| t == self)
            .map_or("", |(name, _)| name)
    }

    /// Every known (non-`Other`) type.
    pub fn known() -> impl Iterator<Item = EventType> {
        KNOWN_TYPES.iter().map(|(_, t)| t.clone())
    }

    /// `customer.subscription.*`: the object is a subscription snapshot.
    pub fn is_subscription(&self) -> bool {
        matches!(
            self,
            EventType::SubscriptionCreated
                | EventType::SubscriptionUpdated
                | EventType::SubscriptionDeleted
                | EventType::SubscriptionPaused
                | EventType::SubscriptionResumed
                | EventType::SubscriptionTrialWillEnd
                | EventType::SubscriptionPendingUpdateApplied
                | EventType::SubscriptionPendingUpdateExpired
        )
    }

    /// `invoice.*` types the crate acts on.
    pub fn is_invoice(&self) -> bool {
        matches!(
            self,
            EventType::InvoicePaid
                | EventType::InvoicePaymentSucceeded
                | EventType::InvoicePaymentFailed
                | EventType::InvoicePaymentActionRequired
        )
    }

    /// `checkout.session.*` types the crate acts on.
    pub fn is_checkout(&self) -> bool {
        matches!(
            self,
            EventType::CheckoutSessionCompleted
                | EventType::CheckoutSessionAsyncPaymentSucceeded
                | EventType::CheckoutSessionAsyncPaymentFailed
        )
    }

    /// Whether the crate's subscription machine acts on this type.
    pub fn has_subscription_effect(&self) -> bool {
        self.is_subscription()
            || self.is_invoice()
            || self.is_checkout()
            || *self == EventType::EntitlementSummaryUpdated
    }
}

impl fmt::Display for EventType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The `request` member: the API request that caused the event, if any.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventRequest {
    /// `req_…`, or `None` for automatic actions (renewals, retries).
    pub id: Option<String>,
    /// The idempotency key of that request, if one was sent.
    pub idempotency_key: Option<String>,
}

/// `related_object` of a thin event: what to fetch to learn what happened.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelatedObject {
    /// The object's id (`sub_…`).
    pub id: String,
    /// The object's type (`subscription`).
    #[serde(rename = "type")]
    pub object_type: String,
    /// The API path to retrieve it.
    #[serde(default)]
    pub url: Option<String>,
}

/// Views already typed from this event's object (each typed at most once).
#[derive(Debug, Clone, Default)]
struct ViewCache {
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

/// A Stripe event: a typed envelope with the object kept as raw JSON.
///
/// Build one with [`Event::parse`] from a [`Verified`] delivery. Fields are
/// read through accessors; the raw object is typed on demand by the views.
#[derive(Debug, Clone)]
pub struct Event {
    id: String,
    event_type: EventType,
    created: i64,
    livemode: bool,
    api_version: Option<String>,
    account: Option<String>,
    request: Option<EventRequest>,
    object: Option<Box<RawValue>>,
    previous_attributes: Option<Box<RawValue>>,
    related_object: Option<RelatedObject>,
    thin: bool,
    views: ViewCache,
}

impl PartialEq for Event {
    fn eq(&self, other: &Self) -> bool {
        self.id == other.id
            && self.event_type == other.event_type
            && self.created == other.created
            && self.livemode == other.livemode
            && self.api_version == other.api_version
            && self.account == other.account
            && self.request == other.request
            && self.object.as_ref().map(|r| r.get()) == other.object.as_ref().map(|r| r.get())
            && self.previous_attributes.as_ref().map(|r| r.get())
                == other.previous_attributes.as_ref().map(|r| r.get())
            && self.related_object == other.related_object
            && self.thin == other.thin
    }
}

impl Event {
    /// Parses a verified delivery.
    ///
    /// # Errors
    ///
    /// [`ParseError`] when the body is not a Stripe event.
    ///
    /// ```
    /// use stripe_webhook_guard::event::{Event, EventType};
    /// use stripe_webhook_guard::signature::{test_header, Verifier, WebhookSecret};
    /// use time::OffsetDateTime;
    ///
    /// let secret = WebhookSecret::new("whsec_doc");
    /// let body = br#"{"id":"evt_1","object":"event","type":"invoice.paid","created":1700000000,
    ///   "livemode":false,"data":{"object":{"id":"in_1","object":"invoice","status":"paid"}}}"#;
    /// let now = OffsetDateTime::from_unix_timestamp(1_700_000_000).unwrap();
    /// let header = test_header(&secret, body, now);
    /// let verified = Verifier::new(secret).verify(body, Some(&header), now).unwrap();
    ///
    /// let event = Event::parse(verified).unwrap();
    /// assert_eq!(event.id(), "evt_1");
    /// assert_eq!(*event.event_type(), EventType::InvoicePaid);
    /// assert!(event.invoice().unwrap().paid);
    /// ```
    pub fn parse(verified: Verified<'_>) -> Result<Self, ParseError> {
        Self::from_bytes(verified.payload())
    }

    /// Parses bytes that were **not** verified here: for tests, and for
    /// events fetched from the Stripe API (which are authenticated by TLS and
    /// the secret key instead). Never call this on a webhook request body.
    ///
    /// Inputs over 1 MiB ([`DEFAULT_MAX_BODY_BYTES`]) are refused; use
    /// [`Event::parse_unverified_with_limit`] for another limit.
    ///
    /// # Errors
    ///
    /// [`ParseError`] when the input is too large or not a Stripe event.
    pub fn parse_unverified(bytes: &[u8]) -> Result<Self, ParseError> {
        Self::parse_unverified_with_limit(bytes, DEFAULT_MAX_BODY_BYTES)
    }

    /// [`Event::parse_unverified`] with an explicit size limit in bytes.
    ///
    /// # Errors
    ///
    /// [`ParseError`] when the input is too large or not a Stripe event.
    pub fn parse_unverified_with_limit(bytes: &[u8], limit: usize) -> Result<Self, ParseError> {
        if bytes.len() > limit {
            return Err(ParseError::TooLarge {
                len: bytes.len(),
                limit,
            });
        }
        Self::from_bytes(bytes)
    }

    pub(crate) fn from_bytes(bytes: &[u8]) -> Result<Self, ParseError> {
        check_depth(bytes)?;
        let first = bytes.iter().find(|b| !b.is_ascii_whitespace());
        if first != Some(&b'{') {
            return Err(match first {
                None => ParseError::Syntax {
                    line: 1,
                    column: 1,
                    reason: "EOF while parsing a value".to_owned(),
                },
                Some(_) => ParseError::Shape {
                    what: "event",
                    reason: "not a JSON object".to_owned(),
                },
            });
        }
        // Parsing from `&str` lets the object stay borrowed (no copy, no
        // second UTF-8 check) until it is copied once into the event.
        let text = std::str::from_utf8(bytes).map_err(|e| {
            let (line, column) = position(bytes, e.valid_up_to());
            ParseError::Syntax {
                line,
                column,
                reason: "invalid UTF-8".to_owned(),
            }
        })?;
        let raw: RawEvent<'_> =
            serde_json::from_str(text).map_err(|e| ParseError::from_json("event", &e))?;
        raw.into_event()
    }

    /// Builds a snapshot event from parts: for fakes, tests and tools that
    /// synthesise events. `object` must be a JSON object.
    ///
    /// # Errors
    ///
    /// [`ParseError`] when `object` or `previous_attributes` is not valid JSON.
    #[allow(clippy::too_many_arguments)]
    pub fn from_parts(
        id: &str,
        event_type: EventType,
        created: i64,
        livemode: bool,
        api_version: Option<&str>,
        account: Option<&str>,
        object: &str,
        previous_attributes: Option<&str>,
    ) -> Result<Self, ParseError> {
        let object = RawValue::from_string(object.to_owned())
            .map_err(|e| ParseError::from_json("object", &e))?;
        let previous_attributes = previous_attributes
            .map(|p| RawValue::from_string(p.to_owned()))
            .transpose()
            .map_err(|e| ParseError::from_json("previous_attributes", &e))?;
        Ok(Self {
            id: id.to_owned(),
            event_type,
            created,
            livemode,
            api_version: api_version.map(str::to_owned),
            account: account.map(str::to_owned),
            request: None,
            object: Some(object),
            previous_attributes,
            related_object: None,
            thin: false,
            views: ViewCache::default(),
        })
    }

    /// The event as JSON again: the envelope fields this type reads, with
    /// `data.object` and `data.previous_attributes` byte for byte. Parsing
    /// the result gives an equal event (used to keep failed events for
    /// replay when the original bytes are not at hand).
    pub fn to_json(&self) -> String {
        let mut out = serde_json::Map::new();
        out.insert("id".into(), self.id.clone().into());
        out.insert(
            "object".into(),
            if self.thin { "v2.core.event" } else { "event" }.into(),
        );
        let type_text = if self.thin && !matches!(self.event_type, EventType::Other(_)) {
            format!("v1.{}", self.event_type.as_str())
        } else {
            self.event_type.as_str().to_owned()
        };
        out.insert("type".into(), type_text.into());
        out.insert("created".into(), self.created.into());
        out.insert("livemode".into(), self.livemode.into());
        if let Some(v) = &self.api_version {
            out.insert("api_version".into(), v.clone().into());
        }
        if let Some(a) = &self.account {
            out.insert("account".into(), a.clone().into());
        }
        if let Some(r) = &self.request {
            out.insert(
                "request".into(),
                serde_json::json!({"id": r.id, "idempotency_key": r.idempotency_key}),
            );
        }
        if let Some(r) = &self.related_object {
            out.insert(
                "related_object".into(),
                serde_json::json!({"id": r.id, "type": r.object_type, "url": r.url}),
            );
        }
        let head = serde_json::Value::Object(out).to_string();
        let members: Vec<(&str, &RawValue)> = [
            ("object", self.object.as_deref()),
            ("previous_attributes", self.previous_attributes.as_deref()),
        ]
        .into_iter()
        .filter_map(|(k, v)| v.map(|v| (k, v)))
        .collect();
        if members.is_empty() {
            return head;
        }
        // Splice the raw JSON in without re-encoding it.
        let mut text = head;
        text.pop(); // the closing brace
        text.push_str(r#","data":{"#);
        for (i, (key, value)) in members.iter().enumerate() {
            if i > 0 {
                text.push(',');
            }
            text.push('"');
            text.push_str(key);
            text.push_str("\":");
            text.push_str(value.get());
        }
        text.push_str("}}");
        text
    }

    /// The event id (`evt_…`): the deduplication key.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The event type.
    pub fn event_type(&self) -> &EventType {
        &self.event_type
    }

    /// When Stripe created the event, in Unix seconds (one-second resolution:
    /// several events of one payment share a second).
    pub fn created(&self) -> i64 {
        self.created
    }

    /// [`Event::created`] as a date.
    ///
    /// # Errors
    ///
    /// [`ParseError::TimestampOutOfRange`] beyond years ±9999.
    pub fn created_at(&self) -> Result<OffsetDateTime, ParseError> {
        OffsetDateTime::from_unix_timestamp(self.created)
            .map_err(|_| ParseError::TimestampOutOfRange { field: "created" })
    }

    /// Whether the event comes from live mode.
    pub fn livemode(&self) -> bool {
        self.livemode
    }

    /// The API version the object is rendered in (absent on very old events).
    pub fn api_version(&self) -> Option<&str> {
        self.api_version.as_deref()
    }

    /// The connected account (`acct_…`) for Connect events; `None` for the
    /// platform's own events.
    pub fn account(&self) -> Option<&str> {
        self.account.as_deref()
    }

    /// The API request that caused the event, if any.
    pub fn request(&self) -> Option<&EventRequest> {
        self.request.as_ref()
    }

    /// `data.object` as raw JSON text (`None` for thin events).
    pub fn object_json(&self) -> Option<&str> {
        self.object.as_deref().map(RawValue::get)
    }

    /// `data.previous_attributes` as raw JSON text, on `*.updated` events.
    pub fn previous_attributes_json(&self) -> Option<&str> {
        self.previous_attributes.as_deref().map(RawValue::get)
    }

    /// Whether this is a thin event (`object: "v2.core.event"`): it carries
    /// no snapshot, only [`Event::related_object`], so it must be refetched.
    pub fn is_thin(&self) -> bool {
        self.thin
    }

    /// The object a thin event refers to.
    pub fn related_object(&self) -> Option<&RelatedObject> {
        self.related_object.as_ref()
    }

    /// The `object` and `id` members of `data.object`, read without typing
    /// the rest.
    ///
    /// # Errors
    ///
    /// [`ParseError`] when the object is not a JSON object.
    pub fn object_identity(&self) -> Result<ObjectIdentity, ParseError> {
        self.views
            .identity
            .get_or_init(|| {
                let Some(raw) = &self.object else {
                    return Ok(ObjectIdentity {
                        object: self.related_object.as_ref().map(|r| r.object_type.clone()),
                        id: self.related_object.as_ref().map(|r| r.id.clone()),
                    });
                };
                // Type the object once for the view this event needs, and
                // take the identity from it.
                let t = &self.event_type;
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
                    None => serde_json::from_str(raw.get())
                        .map_err(|e| ParseError::from_json("object", &e)),
                }
            })
            .clone()
    }

    fn typed_object<T: ObjectView>(&self) -> Result<T, ParseError> {
        let raw = self.object.as_deref().ok_or(ParseError::MissingObject)?;
        let mut view: T = match serde_json::from_str(raw.get()) {
            Ok(v) => v,
            Err(e) => {
                // Say "wrong kind of object" rather than "missing field" when
                // that is the real problem.
                let ident: Result<ObjectIdentity, _> = serde_json::from_str(raw.get());
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
        self.views
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
        self.views
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
        self.views
            .checkout
            .get_or_init(|| self.typed_object())
            .clone()
    }

    /// The object as an active-entitlement summary
    /// (`entitlements.active_entitlement_summary.updated`).
    ///
    /// # Errors
    ///
    /// [`ParseError`] when the object is missing, of another kind, or malformed.
    pub fn entitlement_summary(&self) -> Result<EntitlementSummaryView, ParseError> {
        let raw = self.object.as_deref().ok_or(ParseError::MissingObject)?;
        let kind = "entitlements.active_entitlement_summary";
        let ident: ObjectIdentity =
            serde_json::from_str(raw.get()).map_err(|e| ParseError::from_json(kind, &e))?;
        if let Some(found) = ident.object
            && found != kind
        {
            return Err(ParseError::WrongObject {
                expected: kind,
                found: Some(found),
            });
        }
        serde_json::from_str(raw.get()).map_err(|e| ParseError::from_json(kind, &e))
    }
}

/// The deepest nesting accepted anywhere in an event: `serde_json`'s own limit
/// (it refuses 128 levels), applied to the whole body, including the parts
/// `serde_json` skips without recursing (`data.object` is kept raw).
pub const MAX_NESTING: usize = 127;

/// Refuses bodies nested deeper than [`MAX_NESTING`]. The count of opening
/// brackets bounds the depth, and a typical event has far fewer than the
/// limit, so the string-aware scan runs only for large or odd bodies.
fn check_depth(bytes: &[u8]) -> Result<(), ParseError> {
    // Counted in u8 lanes per 255-byte chunk, which the compiler vectorizes
    // to 16–32 bytes per instruction.
    let openings: usize = bytes
        .chunks(255)
        .map(|chunk| {
            usize::from(
                chunk
                    .iter()
                    .fold(0u8, |n, &b| n + u8::from(b == b'{' || b == b'[')),
            )
        })
        .sum();
    if openings <= MAX_NESTING {
        return Ok(());
    }
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    for (i, &b) in bytes.iter().enumerate() {
        if in_string {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'{' | b'[' => {
                depth += 1;
                if depth > MAX_NESTING {
                    let (line, column) = position(bytes, i);
                    return Err(ParseError::Syntax {
                        line,
                        column,
                        reason: "recursion limit exceeded".to_owned(),
                    });
                }
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    Ok(())
}

/// 1-based line and column of byte `index` (only on the error path).
#[allow(clippy::naive_bytecount)]
fn position(bytes: &[u8], index: usize) -> (usize, usize) {
    let before = &bytes[..index];
    let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
    let column = index
        - before
            .iter()
            .rposition(|&b| b == b'\n')
            .map_or(0, |p| p + 1)
        + 1;
    (line, column)
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

/// The envelope as it arrives. `deny_unknown_fields` is deliberately off:
/// Stripe adds fields without a version change.
#[derive(Deserialize)]
struct RawEvent<'a> {
    id: String,
    #[serde(default)]
    object: Option<String>,
    #[serde(rename = "type")]
    event_type: String,
    created: Created,
    #[serde(default)]
    livemode: Option<bool>,
    #[serde(default)]
    api_version: Option<String>,
    #[serde(default)]
    account: Option<String>,
    /// Thin events carry the account as `context`.
    #[serde(default)]
    context: Option<String>,
    #[serde(default)]
    request: Option<RequestField>,
    #[serde(default, borrow)]
    data: Option<RawData<'a>>,
    #[serde(default)]
    related_object: Option<RelatedObject>,
}

#[derive(Deserialize)]
struct RawData<'a> {
    #[serde(default, borrow)]
    object: Option<&'a RawValue>,
    #[serde(default, borrow)]
    previous_attributes: Option<&'a RawValue>,
}

impl RawEvent<'_> {
    fn into_event(self) -> Result<Event, ParseError> {
        let thin = self.object.as_deref() == Some("v2.core.event");
        let (object, previous_attributes) = match self.data {
            Some(d) => (d.object, d.previous_attributes),
            None => (None, None),
        };
        // `"object": null` arrives as a RawValue holding `null`.
        let object = object.filter(|o| o.get() != "null").map(ToOwned::to_owned);
        let previous_attributes = previous_attributes
            .filter(|o| o.get() != "null")
            .map(ToOwned::to_owned);
        if !thin {
            match &object {
                None => return Err(ParseError::MissingObject),
                Some(o) if !o.get().starts_with('{') => {
                    return Err(ParseError::Shape {
                        what: "event",
                        reason: "data.object is not a JSON object".to_owned(),
                    });
                }
                Some(_) => {}
            }
        }
        if self.id.is_empty() {
            return Err(ParseError::Shape {
                what: "event",
                reason: "empty id".to_owned(),
            });
        }
        Ok(Event {
            id: self.id,
            event_type: EventType::parse(&self.event_type),
            created: self.created.0,
            livemode: self.livemode.unwrap_or(false),
            api_version: self.api_version,
            account: self.account.or(if thin { self.context } else { None }),
            request: self.request.and_then(|r| r.0),
            object,
            previous_attributes,
            related_object: self.related_object,
            thin,
            views: ViewCache::default(),
        })
    }
}

/// `created`: Unix seconds (v1 events) or an RFC 3339 string (thin events).
struct Created(i64);

impl<'de> Deserialize<'de> for Created {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Created;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("Unix seconds or an RFC 3339 date")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Created, E> {
                Ok(Created(v))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Created, E> {
                i64::try_from(v)
                    .map(Created)
                    .map_err(|_| E::custom(format!("{OWN_MESSAGE}created is out of range")))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Created, E> {
                OffsetDateTime::parse(v, &time::format_description::well_known::Rfc3339)
                    .map(|t| Created(t.unix_timestamp()))
                    .map_err(|_| E::custom(format!("{OWN_MESSAGE}created is not an RFC 3339 date")))
            }
        }
        d.deserialize_any(V)
    }
}

/// `request`: `{id, idempotency_key}` since 2017-05-25, a bare id before.
struct RequestField(Option<EventRequest>);

impl<'de> Deserialize<'de> for RequestField {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RequestField;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a request object, a request id or null")
            }
            fn visit_unit<E: de::Error>(self) -> Result<RequestField, E> {
                Ok(RequestField(None))
            }
            fn visit_none<E: de::Error>(self) -> Result<RequestField, E> {
                Ok(RequestField(None))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<RequestField, E> {
                Ok(RequestField(Some(EventRequest {
                    id: Some(v.to_owned()),
                    idempotency_key: None,
                })))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<RequestField, A::Error> {
                let r = EventRequest::deserialize(de::value::MapAccessDeserializer::new(map))?;
                Ok(RequestField(Some(r)))
            }
        }
        d.deserialize_any(V)
    }
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

fn opt_bool_false<'de, D: Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    Ok(Option::<bool>::deserialize(d)?.unwrap_or(false))
}

/// A subscription's `status`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(from = "String", into = "String")]
#[non_exhaustive]
pub enum SubscriptionStatus {
    /// First payment not (yet) made; expires after 23 hours.
    Incomplete,
    /// First payment never made: terminal.
    IncompleteExpired,
    /// In a free trial.
    Trialing,
    /// Paid and current.
    Active,
    /// A renewal payment failed; Stripe is retrying.
    PastDue,
    /// Retries exhausted; invoices left open.
    Unpaid,
    /// Trial ended without a payment method (status `paused`).
    Paused,
    /// Ended: terminal.
    Canceled,
    /// A status this version of the crate does not know, verbatim.
    Unknown(String),
}

impl SubscriptionStatus {
    /// Reads Stripe's spelling.
    pub fn parse(text: &str) -> Self {
        match text {
            "incomplete" => Self::Incomplete,
            "incomplete_expired" => Self::IncompleteExpired,
            "trialing" => Self::Trialing,
            "active" => Self::Active,
            "past_due" => Self::PastDue,
            "unpaid" => Self::Unpaid,
            "paused" => Self::Paused,
            "canceled" => Self::Canceled,
            other => Self::Unknown(other.to_owned()),
        }
    }

    /// Stripe's spelling.
    pub fn as_str(&self) -> &str {
        match self {
            Self::Incomplete => "incomplete",
            Self::IncompleteExpired => "incomplete_expired",
            Self::Trialing => "trialing",
            Self::Active => "active",
            Self::PastDue => "past_due",
            Self::Unpaid => "unpaid",
            Self::Paused => "paused",
            Self::Canceled => "canceled",
            Self::Unknown(s) => s,
        }
    }

    /// `canceled` and `incomplete_expired`: nothing follows them (a
    /// resubscription is a new `sub_` id).
    pub fn is_terminal(&self) -> bool {
        matches!(self, Self::Canceled | Self::IncompleteExpired)
    }

    /// The eight statuses Stripe documents.
    pub const ALL: [SubscriptionStatus; 8] = [
        Self::Incomplete,
        Self::IncompleteExpired,
        Self::Trialing,
        Self::Active,
        Self::PastDue,
        Self::Unpaid,
        Self::Paused,
        Self::Canceled,
    ];
}

impl From<String> for SubscriptionStatus {
    fn from(s: String) -> Self {
        Self::parse(&s)
    }
}

impl From<SubscriptionStatus> for String {
    fn from(s: SubscriptionStatus) -> Self {
        s.as_str().to_owned()
    }
}

impl fmt::Display for SubscriptionStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which API shape an object was rendered in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ApiShape {
    /// ≤ 2025-02-24.acacia (including 2012-era objects).
    PreBasil,
    /// 2025-03-31.basil and later.
    Basil,
}

/// `pause_collection` on a subscription.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PauseCollection {
    /// `keep_as_draft`, `mark_uncollectible` or `void`.
    #[serde(default)]
    pub behavior: Option<String>,
    /// When collection resumes automatically, in Unix seconds.
    #[serde(default)]
    pub resumes_at: Option<i64>,
}

/// One subscription item.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ItemView {
    /// `si_…` (absent on 2012-era objects).
    pub id: Option<String>,
    /// The price (or legacy plan) id.
    pub price_id: Option<String>,
    /// Quantity, when given.
    pub quantity: Option<u64>,
    /// The item's own period start (basil and later).
    pub current_period_start: Option<i64>,
    /// The item's own period end (basil and later).
    pub current_period_end: Option<i64>,
}

/// A subscription, read from either API shape.
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
    raw_plan: Option<ObjectIdentity>,
}

fn pre_basil() -> ApiShape {
    ApiShape::PreBasil
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
    price: Option<ObjectIdentity>,
    #[serde(default)]
    plan: Option<ObjectIdentity>,
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
        let raw_items = self.raw_items.take().map(|l| l.data).unwrap_or_default();
        self.items = raw_items
            .into_iter()
            .map(|i| ItemView {
                id: i.id,
                price_id: i.price.and_then(|p| p.id).or(i.plan.and_then(|p| p.id)),
                quantity: i.quantity,
                current_period_start: i.current_period_start,
                current_period_end: i.current_period_end,
            })
            .collect();
        if self.items.is_empty()
            && let Some(plan) = self.raw_plan.take()
        {
            // 2012-era: a single plan, no items.
            self.items.push(ItemView {
                id: None,
                price_id: plan.id,
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

/// An invoice, read from either API shape.
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

    fn finish(&mut self) {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn event(json: &str) -> Result<Event, ParseError> {
        Event::parse_unverified(json.as_bytes())
    }

    #[test]
    fn envelope_fields() {
        let e = event(
            r#"{"id":"evt_1","object":"event","type":"customer.subscription.updated","created":1700000000,
            "livemode":true,"api_version":"2025-03-31.basil","account":"acct_1",
            "request":{"id":"req_1","idempotency_key":"k"},
            "data":{"object":{"id":"sub_1","object":"subscription","status":"active"},
                    "previous_attributes":{"status":"past_due"}}}"#,
        )
        .unwrap();
        assert_eq!(e.id(), "evt_1");
        assert_eq!(*e.event_type(), EventType::SubscriptionUpdated);
        assert_eq!(e.created(), 1_700_000_000);
        assert!(e.livemode());
        assert_eq!(e.api_version(), Some("2025-03-31.basil"));
        assert_eq!(e.account(), Some("acct_1"));
        assert_eq!(e.request().unwrap().idempotency_key.as_deref(), Some("k"));
        assert_eq!(
            e.previous_attributes_json(),
            Some(r#"{"status":"past_due"}"#)
        );
        assert!(!e.is_thin());
    }

    #[test]
    fn to_json_round_trips() {
        for json in [
            r#"{"id":"evt_1","object":"event","type":"customer.subscription.updated","created":1700000000,
            "livemode":true,"api_version":"2025-03-31.basil","account":"acct_1",
            "request":{"id":"req_1","idempotency_key":null},
            "data":{"object":{"id":"sub_1","object":"subscription","status":"active"},
                    "previous_attributes":{"status":"past_due"}}}"#,
            r#"{"id":"evt_2","type":"charge.refunded","created":1,"data":{"object":{"a":[1,2]}}}"#,
            // Found by fuzzing: a thin event with previous attributes only.
            r#"{"id":"evt_4","object":"v2.core.event","type":"invoiceitem.updated","created":1,
            "data":{"previous_attributes":{"invoice":null}}}"#,
            r#"{"id":"evt_3","object":"v2.core.event","type":"v1.customer.subscription.updated",
            "created":"2024-09-17T06:20:52Z","livemode":false,
            "related_object":{"id":"sub_1","type":"subscription","url":"/v1/subscriptions/sub_1"}}"#,
        ] {
            let e = event(json).unwrap();
            let again = event(&e.to_json()).unwrap();
            assert_eq!(e, again, "{}", e.to_json());
        }
    }

    #[test]
    fn old_request_field_is_a_string() {
        let e = event(
            r#"{"id":"evt_1","type":"x","created":1,"request":"req_9","data":{"object":{}}}"#,
        )
        .unwrap();
        assert_eq!(e.request().unwrap().id.as_deref(), Some("req_9"));
    }

    #[test]
    fn thin_events() {
        let e = event(
            r#"{"id":"evt_test_65R","object":"v2.core.event","type":"v1.customer.subscription.updated",
            "created":"2024-09-17T06:20:52.246Z","livemode":false,"context":"acct_9",
            "related_object":{"id":"sub_1","type":"subscription","url":"/v1/subscriptions/sub_1"}}"#,
        )
        .unwrap();
        assert!(e.is_thin());
        assert_eq!(*e.event_type(), EventType::SubscriptionUpdated);
        assert_eq!(e.created(), 1_726_554_052);
        assert_eq!(e.account(), Some("acct_9"));
        assert_eq!(e.related_object().unwrap().id, "sub_1");
        assert_eq!(e.object_json(), None);
        assert_eq!(e.subscription().unwrap_err(), ParseError::MissingObject);
    }

    #[test]
    fn event_type_round_trip() {
        for t in EventType::known() {
            assert_eq!(EventType::parse(t.as_str()), t);
        }
        assert_eq!(
            EventType::parse("charge.refunded"),
            EventType::Other("charge.refunded".into())
        );
        assert_eq!(
            EventType::parse("charge.refunded").as_str(),
            "charge.refunded"
        );
    }

    #[test]
    fn errors_never_quote_the_body() {
        let secretish = "SECRET_BODY_CONTENT";
        let cases = [
            format!(
                r#"{{"id":"evt_1","type":"x","created":"{secretish}","data":{{"object":{{}}}}}}"#
            ),
            format!(
                r#"{{"id":"evt_1","type":"x","created":1,"livemode":"{secretish}","data":{{"object":{{}}}}}}"#
            ),
            format!(r#"{{"id":["{secretish}"],"type":"x","created":1,"data":{{"object":{{}}}}}}"#),
            format!(r#"{{"id":"evt_1","type":"x","created":1,"data":{{"object":"{secretish}"}}}}"#),
            format!(r#"{{"{secretish}"#),
        ];
        for c in &cases {
            let err = event(c).unwrap_err();
            assert!(!err.to_string().contains(secretish), "{err}");
            assert!(!format!("{err:?}").contains(secretish), "{err:?}");
        }
        let e = event(
            &format!(r#"{{"id":"evt_1","type":"customer.subscription.updated","created":1,"data":{{"object":{{"object":"subscription","status":5,"customer":"{secretish}"}}}}}}"#),
        )
        .unwrap();
        let err = e.subscription().unwrap_err();
        assert!(!err.to_string().contains(secretish), "{err}");
    }
}
