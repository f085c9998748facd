//! The Stripe event envelope and version-tolerant views of the objects the
//! crate acts on.
//!
//! # The typed envelope
//!
//! [`Event::parse`] reads the envelope into typed fields (`id`, `type`,
//! `created`, `livemode`, `api_version`, `account`, `request`) and keeps
//! `data.object` and `data.previous_attributes` as raw JSON, byte for byte.
//! The type is an [`EventType`]: the kinds this crate acts on are variants,
//! every other type is kept verbatim in [`EventType::Other`].
//!
//! # Verify before parse
//!
//! A webhook body is parsed only after its signature was checked:
//! [`Event::parse`] takes a [`Verified`](crate::signature::Verified)
//! delivery, which only a successful signature check produces, so no byte of
//! an unauthenticated body reaches the JSON parser. [`Event::parse_unverified`]
//! exists for tests and for events fetched from the Stripe API (authenticated
//! by TLS and the secret key instead); it refuses inputs over 1 MiB unless
//! given another limit, and must never be called on a webhook request body.
//!
//! # The raw object, typed lazily
//!
//! Views type `data.object` only when something asks for them:
//! [`SubscriptionView`] ([`Event::subscription`]), [`InvoiceView`]
//! ([`Event::invoice`]), [`CheckoutSessionView`]
//! ([`Event::checkout_session`]) and [`EntitlementSummaryView`]
//! ([`Event::entitlement_summary`]). The first three are typed at most once
//! per event and kept in it; the entitlement summary is typed on each call.
//! Nothing types the object of an event nobody asks about, so an event of a
//! type the crate does not act on costs only its envelope. A view asked for
//! the wrong kind of object says so ([`ParseError::WrongObject`]) rather than
//! reporting a missing field.
//!
//! # API versions
//!
//! A webhook endpoint receives events rendered in its own API version, and a
//! 30-day replay from `/v1/events` mixes versions, so every view reads each
//! object by the shape it has, never by a per-deployment setting:
//!
//! | concept | up to 2025-02-24.acacia | 2025-03-31.basil and later |
//! |---|---|---|
//! | invoice → subscription | `invoice.subscription` | `invoice.parent.subscription_details.subscription` |
//! | billing period | `subscription.current_period_start/_end` | `subscription.items.data[].current_period_start/_end` (per item) |
//! | invoice paid? | `invoice.paid` | `invoice.status == "paid"` |
//! | line → subscription | `line.subscription` | `line.parent.subscription_item_details.subscription` |
//!
//! A basil-or-later invoice may carry `"subscription": null` at the top
//! level; the subscription is then read from `parent`. Where items carry
//! their own periods (flexible billing lets them differ), the subscription's
//! period end is the **earliest** item end: it is the next moment a payment
//! can be due, so access never outlives what was paid for. The 2012-era shape
//! (no subscription id, `plan` instead of `items`, `lines.subscriptions[]` on
//! invoices) is read too. Each view records the shape it read in
//! [`ApiShape`].
//!
//! # Thin events
//!
//! An event whose `object` is `"v2.core.event"` is a thin event: it carries no
//! snapshot of the object, only a [`RelatedObject`] (id, type, API path) to
//! fetch, so [`Event::is_thin`] is true, [`Event::object_json`] is `None` and
//! the views answer [`ParseError::MissingObject`]. Its type names v1 types
//! with a `v1.` prefix (`v1.customer.subscription.updated`), which is
//! accepted; its `created` is an RFC 3339 date, read as Unix seconds; its
//! `context` is read as the connected account.
//!
//! # Hostile input
//!
//! Parsing never panics. Nesting deeper than [`MAX_NESTING`] is refused
//! anywhere in the body, including inside the raw object; a duplicated
//! envelope field is an error, wrong types are errors, and a [`ParseError`]
//! never quotes the body. An event's `Debug` output shows its id, type,
//! `created`, `livemode`, account and the lengths of the raw object and
//! previous attributes, never their content (objects hold names, e-mail and
//! postal addresses).

mod envelope;
mod scan;
mod status;
mod views;

pub use envelope::{Event, EventRequest, EventType, MAX_NESTING, ParseError, RelatedObject};
pub use status::SubscriptionStatus;
pub use views::{
    ApiShape, CheckoutSessionView, CollectionMethod, EntitlementSummaryView, InvoiceView, ItemView,
    ObjectIdentity, PauseCollection, SubscriptionView,
};
