//! # stripe-webhook-guard
//!
//! Consume Stripe webhooks correctly: verify signatures exactly as Stripe's
//! SDKs do, process each event exactly once, keep a subscription's state
//! right when events arrive late, twice, out of order or never, reconcile from
//! the Stripe API, and answer "does this customer have access right now?"
//! without locking out people who paid.
//!
//! The core is sans-IO: [`signature`], [`event`], [`ledger`],
//! [`subscription`], [`access`] and the planner in [`reconcile`] are pure
//! functions and state machines that take time and data as arguments. Storage
//! ([`store`]) and the Stripe API ([`client`]) sit behind `async_trait`
//! traits; [`processor`], [`inbox`] and [`reconcile`] are the only async glue.
//!
//! From a signed test event to an access decision:
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! use std::sync::Arc;
//! use stripe_webhook_guard::{
//!     test_header, Access, AccessPolicy, MemoryStore, SubscriptionStore, Verifier,
//!     WebhookProcessor, WebhookSecret,
//! };
//! use time::OffsetDateTime;
//!
//! let secret = WebhookSecret::new("whsec_doc");
//! let store = Arc::new(MemoryStore::new());
//! let processor = WebhookProcessor::builder(Verifier::new(secret.clone()))
//!     .store(store.clone())
//!     .build();
//!
//! let now = OffsetDateTime::now_utc();
//! let t = now.unix_timestamp();
//! let body = format!(r#"{{"id":"evt_1","object":"event","type":"customer.subscription.created",
//!   "created":{t},"livemode":false,"data":{{"object":{{"id":"sub_1","object":"subscription",
//!   "customer":"cus_1","status":"active","current_period_start":{t},
//!   "current_period_end":{}}}}}}}"#, t + 30 * 86_400);
//! let header = test_header(&secret, body.as_bytes(), now);
//!
//! // Stripe delivers it twice: one effect, two 200s.
//! let first = processor.handle(body.as_bytes(), Some(&header)).await.unwrap();
//! let again = processor.handle(body.as_bytes(), Some(&header)).await.unwrap();
//! assert_eq!((first.as_str(), again.as_str()), ("applied", "duplicate"));
//!
//! let records = store.find_by_customer("cus_1").await.unwrap();
//! let decision = AccessPolicy::default().decide_customer(&records, now);
//! assert_eq!(decision.access, Access::Granted);
//! # }
//! ```
//!
//! # Pipeline
//!
//! [`processor::WebhookProcessor::handle`] runs a fixed order, and each step's
//! invariant is what makes the next one safe:
//!
//! 1. **Verify before parse.** Nothing of an unsigned body is parsed; a bad
//!    signature is a 400 and never reaches the ledger.
//! 2. **Parse** the envelope into typed fields; the object stays raw JSON
//!    until a view needs it.
//! 3. **Filter** livemode, Connect account and types nobody acts on: recorded
//!    as ignored, acknowledged.
//! 4. **Claim before effects.** One atomic insert-if-absent per event id;
//!    concurrent deliveries see "in flight" (503, Stripe retries) or
//!    "duplicate" (200).
//! 5. **Subscription effect**, then the application's handler, both under the
//!    claim's lease.
//! 6. **Complete after effects**; on any error **fail** instead. A failed
//!    event is claimed again by Stripe's retry and is never answered
//!    "duplicate" before it succeeded; after `max_attempts` it is
//!    dead-lettered (acknowledged, kept for [`reconcile::Reconciler::replay`]).
//!
//! Completion and failure are fenced by the lease token, so a worker that
//! stalled past its lease cannot complete over the one that took over.
//! [`inbox::Inbox`] splits the same pipeline at step 4: it stores the
//! verified event and acknowledges at once; workers run steps 4–6.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! use std::sync::Arc;
//! use stripe_webhook_guard::{Error, MemoryStore, Verifier, WebhookProcessor};
//!
//! let processor = WebhookProcessor::builder(Verifier::new("whsec_doc"))
//!     .store(Arc::new(MemoryStore::new()))
//!     .build();
//! // An unsigned request never gets further than step 1.
//! let err = processor.handle(br#"{"id":"evt_1"}"#, None).await.unwrap_err();
//! assert!(matches!(err, Error::Verify(_)));
//! assert_eq!(err.http_status(), 400);
//! assert!(!err.is_retryable());
//! # }
//! ```
//!
//! # Ordering
//!
//! Stripe guarantees no order. Each record keeps a watermark — the `created`
//! second and id of the snapshot it reflects — and an older snapshot is
//! stale. `created` has one-second resolution and one payment emits several
//! events in one second, so a **tie** (same second, another event) is never
//! guessed silently: with a Stripe client the subscription is refetched;
//! without one a documented deterministic rule picks the winner (terminal
//! status, then the later period end, then the event kind, then the id) and
//! the record is flagged for the reconciler. Statuses follow Stripe's
//! transition table; terminal statuses are absorbing; an impossible
//! transition keeps the state, records an anomaly and asks Stripe. See
//! [`subscription`] for the table and the rules, which property tests check
//! over thousands of permuted, duplicated histories in mixed API shapes.
//!
//! # Access policy
//!
//! [`access::AccessPolicy::decide`] is a pure function of a record and `now`:
//! granted (active or trialing, until the period or trial end), grace (a
//! failed payment within its window, a renewal not yet seen, data not
//! verified since it expired) or denied (with the reason). Every boundary is
//! one comparison, every window is configurable, and access never grows as
//! time passes for a fixed record. Per customer, the best subscription wins;
//! per feature, Stripe's entitlements decide when reported.
//!
//! # Recovering from missed webhooks
//!
//! Webhooks alone are not enough: endpoints go down for longer than Stripe
//! retries, and customers log in before their webhook lands. Schedule the
//! [`reconcile::Reconciler`]: `catch_up` replays `/v1/events` through the same
//! processor (same ids, so nothing is applied twice), `sweep` compares
//! subscriptions with Stripe (the only source beyond 30 days), and
//! `refresh_customer` checks one customer at login.
//!
//! ```
//! # #[cfg(feature = "test-util")]
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! use std::sync::Arc;
//! use stripe_webhook_guard::testing::{FakeConfig, FakeStripe, Subscribe};
//! use stripe_webhook_guard::{
//!     BudgetConfig, ManualClock, MemoryStore, Reconciler, SweepScope, Verifier, WebhookProcessor,
//! };
//! use time::Duration;
//!
//! // A fake Stripe stands in for `HttpStripeClient` (feature `reqwest`).
//! let clock = ManualClock::at_unix(1_767_225_600);
//! let stripe = Arc::new(FakeStripe::new(clock.clone(), FakeConfig::default()));
//! let store = Arc::new(MemoryStore::with_clock(Arc::new(clock.clone())));
//! let processor = WebhookProcessor::builder(Verifier::new("whsec_doc"))
//!     .store(store.clone())
//!     .clock(Arc::new(clock.clone()))
//!     .build();
//! let reconciler = Reconciler::new(processor, stripe.clone())
//!     .with_budget(BudgetConfig::default());
//!
//! // A customer subscribes while the webhook endpoint is down.
//! let customer = stripe.create_customer();
//! stripe.subscribe(&customer, &Subscribe::default());
//!
//! // Every 15 minutes: catch up from /v1/events. Every hour: sweep the
//! // records not verified for a day.
//! let report = reconciler.catch_up().await.unwrap();
//! assert!(report.events_processed > 0);
//! let report = reconciler.sweep(SweepScope::StaleFor(Duration::days(1))).await.unwrap();
//! assert!(report.changes.is_empty(), "catch-up already repaired everything");
//! assert_eq!(store.all_subscriptions().len(), 1);
//! # }
//! # #[cfg(not(feature = "test-util"))] fn main() {}
//! ```
//!
//! # Security
//!
//! - Verify before parse; constant-time signature comparison (`subtle`);
//!   a body cap checked before hashing; several secrets for rotation.
//! - [`signature::WebhookSecret`] prints `[redacted]`; errors and logs never
//!   contain a body, a header or a secret; the API key is redacted too.
//! - Livemode and Connect-account filters (the platform's own events only,
//!   by default).
//! - Verified JSON is still untrusted: nesting beyond serde_json's limit is
//!   refused for the whole body, fields are typed, SQL is parameterised, and
//!   URLs in payloads are never fetched (refetches use ids only).
//! - No panic on any input: hostile-input tests and property tests over
//!   arbitrary bytes; a handler panic is caught and recorded as a failure.
//!
//! # Crate features
//!
//! | feature | adds |
//! |---|---|
//! | *(default: none)* | everything above, with [`store::MemoryStore`] |
//! | `postgres` | `store::PgStore` (sqlx, embedded migrations, `SKIP LOCKED` inbox) |
//! | `sqlite` | `store::SqliteStore` (sqlx, embedded migrations) |
//! | `reqwest` | `client::http::HttpStripeClient` |
//! | `axum` | `integrations::axum`: the webhook route |
//! | `test-util` | `testing::FakeStripe`, `testing::Simulator`, `testing::Rng`, `testing::conformance` (the store conformance suite) |
//! | `tracing` | one log line per event with its id and type (never bodies) |
//! | `tokio` | tokio timers for back-off sleeps (a small thread timer otherwise); enabled by `postgres`, `sqlite`, `reqwest`, `axum` and `test-util` |
//! | `admin` | `integrations::admin`: the operator console (an axum router of server-rendered pages) |
//! | `metrics` | recording through the `metrics` facade; the names are in [`metrics`] |
// `unsafe_code = "forbid"` and `missing_docs = "deny"` are set once, for
// every target, in Cargo.toml's `[lints]`.
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod access;
pub mod client;
pub mod clock;
pub mod event;
pub mod inbox;
pub mod integrations;
pub mod ledger;
pub mod metrics;
pub mod processor;
pub mod reconcile;
mod rt;
pub mod signature;
pub mod store;
pub mod subscription;
#[cfg(feature = "test-util")]
#[cfg_attr(docsrs, doc(cfg(feature = "test-util")))]
pub mod testing;

// The names a quick start needs, at the root.
pub use access::{Access, AccessDecision, AccessPolicy, AccessReason};
pub use client::{BudgetConfig, ClientError, RequestBudget, StripeClient};
pub use clock::{Clock, ManualClock, SystemClock};
pub use event::{Event, EventType, SubscriptionStatus};
pub use inbox::{Inbox, InboxConfig};
pub use processor::{
    Error, EventHandler, HandlerContext, HandlerError, Outcome, ProcessorBuilder, WebhookProcessor,
};
pub use reconcile::{ReconcileConfig, Reconciler, SweepScope};
pub use signature::{Verifier, WebhookSecret, test_header};
pub use store::{
    CursorStore, EventLedger, InboxStorage, InboxStore, MemoryStore, Storage, StoreError,
    SubscriptionStore,
};
pub use subscription::{Effect, SubscriptionRecord};

// Compile every code block of the README as a doc test (they use every
// feature).
#[cfg(all(
    doctest,
    feature = "postgres",
    feature = "test-util",
    feature = "axum",
    feature = "reqwest",
    feature = "admin"
))]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
