//! Test utilities (feature `test-util`): a fake Stripe, a hostile webhook
//! delivery simulator and a seeded random generator, to test an application
//! (or this crate) against Stripe's real behaviour without the network.
//!
//! - [`FakeStripe`] is a stateful fake Stripe. It owns the true state of
//!   every subscription, performs Stripe's lifecycle moves (checkout, trials,
//!   renewals, failed payments and their retries, cancellations, pauses) on a
//!   virtual clock, emits the events Stripe would emit (several in the same
//!   second, in either API shape), and answers the
//!   [`StripeClient`](crate::client::StripeClient) trait from its truth, so
//!   the reconciler and the processor's refetches can run against it.
//!   Configure it with [`FakeConfig`]; subscribe with [`Subscribe`].
//! - [`Simulator`] delivers the fake's events to a
//!   [`WebhookProcessor`](crate::processor::WebhookProcessor) the way Stripe's
//!   webhook system does at its worst: each event 1–3 times, reordered,
//!   sometimes never, signed with a fresh timestamp per attempt, retried after
//!   non-2xx answers for up to three days, with endpoint outages, all on the
//!   same virtual clock. Configure it with [`SimConfig`]; every attempt is
//!   logged as a [`DeliveryRecord`].
//! - [`Rng`] is the small deterministic generator both use (SplitMix64, no
//!   `rand` dependency): a seed replays a run exactly.
//!
//! The dependencies go one way: the simulator uses the fake and the
//! generator, the fake uses the generator, and the generator uses nothing.
//! None of the crate's other modules depends on this one.
//!
//! A month of a subscription, delivered badly, ends with the local record
//! equal to Stripe's truth:
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! use std::sync::Arc;
//! use stripe_webhook_guard::clock::ManualClock;
//! use stripe_webhook_guard::processor::WebhookProcessor;
//! use stripe_webhook_guard::signature::{Verifier, WebhookSecret};
//! use stripe_webhook_guard::store::MemoryStore;
//! use stripe_webhook_guard::subscription::SubscriptionState;
//! use stripe_webhook_guard::testing::{FakeConfig, FakeStripe, SimConfig, Simulator, Subscribe};
//! use time::Duration;
//!
//! let clock = ManualClock::at_unix(1_767_225_600);
//! let stripe = Arc::new(FakeStripe::new(clock.clone(), FakeConfig::default()));
//! let store = Arc::new(MemoryStore::with_clock(Arc::new(clock.clone())));
//! let secret = WebhookSecret::new("whsec_doc");
//! let processor = WebhookProcessor::builder(Verifier::new(secret.clone()))
//!     .store(store.clone())
//!     .clock(Arc::new(clock.clone()))
//!     .client(stripe.clone())
//!     .build();
//! let mut sim = Simulator::new(processor, stripe.clone(), secret, SimConfig::default());
//!
//! let customer = stripe.create_customer();
//! let sub = stripe.subscribe(&customer, &Subscribe::default());
//! // Forty days: one renewal, every event delivered 1–3 times, reordered.
//! sim.advance(Duration::days(40)).await;
//! sim.flush().await;
//!
//! let truth = SubscriptionState::from_view(&stripe.truth(&sub).unwrap());
//! let record = store.all_subscriptions().into_iter().find(|r| r.id == sub).unwrap();
//! assert!(record.matches(&truth));
//! assert!(sim.log().len() >= stripe.all_events().len());
//! # }
//! ```

pub mod conformance;
mod fake_stripe;
mod rng;
mod simulator;

pub use fake_stripe::{
    AfterRetries, Card, Collection, FakeConfig, FakeEvent, FakeStripe, ShapeMix, Subscribe,
    api_version,
};
pub use rng::Rng;
pub use simulator::{DeliveryRecord, DeliveryResult, SimConfig, Simulator};
