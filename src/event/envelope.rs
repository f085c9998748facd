//! The event envelope: reading a delivery into an [`Event`] (with the
//! structural scan of [`super::scan`]), the lazy check of `data.object`,
//! thin-event recognition, and [`ParseError`].

use std::borrow::Cow;
use std::fmt;
use std::sync::OnceLock;

use serde::de::{self, Deserializer, IgnoredAny, MapAccess, Visitor};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use super::scan::{Scanned, scan};
use super::views::ViewCache;
use crate::signature::{DEFAULT_MAX_BODY_BYTES, Verified};

/// Why an event or an object could not be read. Never contains any part of
/// the body: messages name the field or the syntax problem only.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ParseError {
    /// The bytes are not well-formed JSON (or nest deeper than
    /// [`MAX_NESTING`] levels). For an error inside `data.object`, found
    /// when the object is first checked ([`Event::validate_object`]), the
    /// reason starts with `data.object:` and the line and column count from
    /// the start of the object.
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
    /// Turns a `serde_json` error about `what` into a [`ParseError`] that
    /// never quotes the input.
    pub(super) fn from_json(what: &'static str, e: &serde_json::Error) -> Self {
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
/// have the forms `missing field X`, `duplicate field X` (X is our field name),
/// `invalid type: INPUT, expected OURS`, `invalid value: INPUT, expected OURS`,
/// `invalid length N, expected OURS`, and our own custom texts; INPUT is
/// dropped, OURS (what this crate expected) is kept.
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
    /// `invoice.finalized` (the invoice is open: its due date is known).
    InvoiceFinalized,
    /// `invoice.overdue` (an open invoice passed its due date).
    InvoiceOverdue,
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

const KNOWN_TYPES: [(&str, EventType); 18] = [
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
    ("invoice.finalized", EventType::InvoiceFinalized),
    ("invoice.overdue", EventType::InvoiceOverdue),
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
                | EventType::InvoiceFinalized
                | EventType::InvoiceOverdue
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

/// A Stripe event: a typed envelope with the object kept as raw JSON.
///
/// Build one with [`Event::parse`] from a [`Verified`] delivery. Fields are
/// read through accessors; the raw object is typed on demand by the views.
///
/// Its `Debug` output shows the id, the type, `created`, `livemode`, the
/// account and the **lengths** of `data.object` and
/// `data.previous_attributes`, never their content: objects hold customers'
/// names, e-mail and postal addresses, and `Debug` output ends up in logs.
#[derive(Clone)]
pub struct Event {
    id: String,
    event_type: EventType,
    created: i64,
    livemode: bool,
    api_version: Option<String>,
    account: Option<String>,
    request: Option<EventRequest>,
    object: Option<Box<str>>,
    previous_attributes: Option<Box<str>>,
    related_object: Option<RelatedObject>,
    thin: bool,
    /// Whether `object` is well-formed JSON, once checked.
    object_checked: OnceLock<Result<(), ParseError>>,
    views: ViewCache,
}

impl fmt::Debug for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Event")
            .field("id", &self.id)
            .field("event_type", &self.event_type.as_str())
            .field("created", &self.created)
            .field("livemode", &self.livemode)
            .field("account", &self.account)
            .field("object_len", &self.object.as_ref().map(|o| o.len()))
            .field(
                "previous_attributes_len",
                &self.previous_attributes.as_ref().map(|p| p.len()),
            )
            .finish_non_exhaustive()
    }
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
            && self.object == other.object
            && self.previous_attributes == other.previous_attributes
            && self.related_object == other.related_object
            && self.thin == other.thin
    }
}

impl Event {
    /// Parses a verified delivery.
    ///
    /// The envelope is read and checked in full; `data.object` is only
    /// delimited (strings followed, nesting counted against
    /// [`MAX_NESTING`]) and kept as delivered. Its JSON is checked once, the
    /// first time a view types it or [`Event::validate_object`] runs;
    /// `WebhookProcessor` runs that check before it claims or records an
    /// event, so a malformed object is refused before anything is marked in
    /// the ledger.
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
        Self::from_text(verified.payload_str())
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

    /// Names the Connect account an event listed through `Stripe-Account`
    /// belongs to, when the listing left it out (so its ledger key is the
    /// one its webhook delivery has).
    pub(crate) fn assume_account(&mut self, account: &str) {
        if self.account.is_none() {
            self.account = Some(account.to_owned());
        }
    }

    pub(crate) fn from_bytes(bytes: &[u8]) -> Result<Self, ParseError> {
        let text = std::str::from_utf8(bytes).map_err(|e| {
            let (line, column) = position(bytes, e.valid_up_to());
            ParseError::Syntax {
                line,
                column,
                reason: "invalid UTF-8".to_owned(),
            }
        })?;
        Self::from_text(text)
    }

    /// [`Event::from_bytes`] on text already known to be UTF-8.
    fn from_text(text: &str) -> Result<Self, ParseError> {
        let first = text
            .bytes()
            .find(|b| !matches!(b, b' ' | b'\t' | b'\n' | b'\r'));
        if first != Some(b'{') {
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
        Self::from_scanned(scan(text)?)
    }

    /// Checks `data.object` as JSON, once per event: the envelope was
    /// checked by [`Event::parse`], the object only delimited. A view that
    /// types the object checks it too, so for the types this crate acts on
    /// the check is the typing of the view the event needs (kept for later).
    /// A well-formed object of the wrong shape passes here: the view reports
    /// that when asked.
    ///
    /// `WebhookProcessor` calls this before it claims, ignores or queues an
    /// event, and refuses the delivery (HTTP 400) when it fails.
    ///
    /// # Errors
    ///
    /// [`ParseError::Syntax`] when the object is not well-formed JSON (its
    /// reason starts with `data.object:`; line and column count from the
    /// start of the object).
    ///
    /// ```
    /// use stripe_webhook_guard::event::{Event, ParseError};
    ///
    /// let good = Event::parse_unverified(
    ///     br#"{"id":"evt_1","type":"charge.refunded","created":1,"data":{"object":{"id":"ch_1"}}}"#,
    /// ).unwrap();
    /// assert!(good.validate_object().is_ok());
    ///
    /// // Well delimited but not JSON inside: found when first checked.
    /// let bad = Event::parse_unverified(
    ///     br#"{"id":"evt_2","type":"charge.refunded","created":1,"data":{"object":{"id" "ch_1"}}}"#,
    /// ).unwrap();
    /// assert!(matches!(bad.validate_object(), Err(ParseError::Syntax { .. })));
    /// ```
    pub fn validate_object(&self) -> Result<(), ParseError> {
        self.object_checked
            .get_or_init(|| {
                let Some(raw) = self.object_json() else {
                    return Ok(());
                };
                if self.typed_view_ok() {
                    return Ok(());
                }
                check_json(raw).map_err(|e| match e {
                    ParseError::Syntax {
                        line,
                        column,
                        reason,
                    } => ParseError::Syntax {
                        line,
                        column,
                        reason: format!("data.object: {reason}"),
                    },
                    other => other,
                })
            })
            .clone()
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
        check_json(object).map_err(|e| relabel(e, "object"))?;
        if let Some(p) = previous_attributes {
            check_json(p).map_err(|e| relabel(e, "previous_attributes"))?;
        }
        Ok(Self {
            id: id.to_owned(),
            event_type,
            created,
            livemode,
            api_version: api_version.map(str::to_owned),
            account: account.map(str::to_owned),
            request: None,
            object: Some(object.into()),
            previous_attributes: previous_attributes.map(Into::into),
            related_object: None,
            thin: false,
            object_checked: OnceLock::from(Ok(())),
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
        let members: Vec<(&str, &str)> = [
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
            text.push_str(value);
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
    ///
    /// The text is the object as delivered; [`Event::parse`] delimits it
    /// and [`Event::validate_object`] checks that it is well-formed JSON
    /// (the views check it too when they type it).
    pub fn object_json(&self) -> Option<&str> {
        self.object.as_deref()
    }

    /// `data.previous_attributes` as raw JSON text, on `*.updated` events.
    pub fn previous_attributes_json(&self) -> Option<&str> {
        self.previous_attributes.as_deref()
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

    /// The views already typed from this event's object.
    pub(super) fn view_cache(&self) -> &ViewCache {
        &self.views
    }
}

/// The deepest nesting accepted anywhere in an event: `serde_json`'s own limit
/// (it refuses 128 levels), applied to the whole body, including the parts
/// `serde_json` skips without recursing (`data.object` is kept raw).
pub const MAX_NESTING: usize = 127;

/// 1-based line and column of byte `index` (only on the error path).
#[allow(clippy::naive_bytecount)]
pub(super) fn position(bytes: &[u8], index: usize) -> (usize, usize) {
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
/// Checks that `text` is one well-formed JSON value.
fn check_json(text: &str) -> Result<(), ParseError> {
    serde_json::from_str::<IgnoredAny>(text)
        .map(drop)
        .map_err(|e| ParseError::from_json("object", &e))
}

/// A [`check_json`] error about `field` of [`Event::from_parts`].
fn relabel(e: ParseError, field: &'static str) -> ParseError {
    match e {
        ParseError::Shape { reason, .. } => ParseError::Shape {
            what: field,
            reason,
        },
        other => other,
    }
}

impl Event {
    /// The event from the envelope the scan found. Unknown members are
    /// ignored (Stripe adds fields without a version change).
    fn from_scanned(raw: Scanned<'_>) -> Result<Event, ParseError> {
        let missing = |field: &str| ParseError::Shape {
            what: "event",
            reason: format!("missing field `{field}`"),
        };
        let id = raw.id.ok_or_else(|| missing("id"))?;
        let event_type = raw.event_type.ok_or_else(|| missing("type"))?;
        let created = raw.created.ok_or_else(|| missing("created"))?;
        let thin = raw.object.as_deref() == Some("v2.core.event");
        let context = raw.context.map(Cow::into_owned);
        if !thin {
            match raw.data_object {
                None => return Err(ParseError::MissingObject),
                Some(o) if !o.starts_with('{') => {
                    return Err(ParseError::Shape {
                        what: "event",
                        reason: "data.object is not a JSON object".to_owned(),
                    });
                }
                Some(_) => {}
            }
        }
        if id.is_empty() {
            return Err(ParseError::Shape {
                what: "event",
                reason: "empty id".to_owned(),
            });
        }
        Ok(Event {
            id: id.into_owned(),
            event_type: EventType::parse(&event_type),
            created,
            livemode: raw.livemode.unwrap_or(false),
            api_version: raw.api_version.map(Cow::into_owned),
            account: raw
                .account
                .map(Cow::into_owned)
                .or(if thin { context } else { None }),
            request: raw.request,
            object: raw.data_object.map(Into::into),
            previous_attributes: raw.previous_attributes.map(Into::into),
            related_object: raw.related_object,
            thin,
            object_checked: OnceLock::new(),
            views: ViewCache::default(),
        })
    }
}

/// `created`: Unix seconds (v1 events) or an RFC 3339 string (thin events).
pub(super) struct Created(pub(super) i64);

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
pub(super) struct RequestField(pub(super) Option<EventRequest>);

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

    #[test]
    fn event_debug_never_prints_the_object() {
        let e = event(
            r#"{"id":"evt_pii","object":"event","type":"customer.updated","created":1700000000,
            "livemode":true,"account":"acct_7",
            "data":{"object":{"id":"cus_1","object":"customer","email":"jane.doe@example.com",
                    "name":"Jane Doe","address":{"line1":"1 Secret Street"}},
                    "previous_attributes":{"email":"old.address@example.com","name":"Jane Roe"}}}"#,
        )
        .unwrap();
        // Type a view too: cached views must not leak through Debug either.
        let _ = e.object_identity();
        let text = format!("{e:?}");
        assert!(text.contains("evt_pii"), "{text}");
        assert!(text.contains("customer.updated"), "{text}");
        assert!(text.contains("acct_7"), "{text}");
        let object_len = e.object_json().unwrap().len().to_string();
        assert!(text.contains(&object_len), "{text}");
        for secret in [
            "jane.doe@example.com",
            "Jane Doe",
            "1 Secret Street",
            "old.address@example.com",
            "Jane Roe",
            "cus_1",
        ] {
            assert!(!text.contains(secret), "{secret} in {text}");
        }
        let pretty = format!("{e:#?}");
        assert!(!pretty.contains("jane.doe@example.com"), "{pretty}");
    }
}
