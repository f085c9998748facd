//! The subscription state machine: a pure function from (what we hold, an
//! event, now) to what to do.
//!
//! # Statuses and transitions
//!
//! Stripe's eight statuses ([`SubscriptionStatus`](crate::event::SubscriptionStatus)) move only along these
//! edges ([`transition`]):
//!
//! | from | to |
//! |---|---|
//! | (new) | incomplete, trialing, active |
//! | incomplete | active, incomplete_expired |
//! | trialing | active, past_due, paused, canceled |
//! | active | past_due, canceled, trialing (a future `trial_end` was set), paused |
//! | past_due | active, canceled, unpaid, paused |
//! | unpaid | active, canceled |
//! | paused | active, past_due, canceled |
//! | canceled, incomplete_expired | nothing: terminal and absorbing |
//!
//! A newer event whose status is reachable only through statuses we never
//! saw (active → unpaid, missing the past_due in between) is applied and
//! reported as a [`TransitionKind::Gap`]: events get lost, and the newest
//! state is still Stripe's. A status that cannot follow at all (anything out
//! of a terminal status, anything into `incomplete`, `incomplete_expired`
//! from anything but `incomplete`) is **impossible**: the state is kept, an
//! [`Anomaly`] recorded, and the record refetched from Stripe when a client
//! is configured (or flagged `needs_review` when not).
//! `pause_collection` and `cancel_at_period_end` do not change `status`; they
//! are recorded as they are.
//!
//! # Ordering
//!
//! Every record keeps a watermark: the `created` time and id of the
//! subscription snapshot it reflects ([`Watermark`]). For a
//! `customer.subscription.*` event:
//!
//! - same event id as the watermark → [`Decision::NoChange`] (a duplicate);
//! - older `created` → [`Decision::Stale`], ignored;
//! - newer `created` → applied (subject to the transition check);
//! - same second, different event → a **tie**. `created` has one-second
//!   resolution and one payment emits several events in the same second, so
//!   the order of a tie is unknown. A tie that would change nothing is a
//!   no-op. Otherwise the decision is [`Decision::Refetch`]: with a Stripe
//!   client the record is replaced by Stripe's current object; without one,
//!   the deterministic rule below picks a winner and the record is flagged
//!   `needs_reconcile` so the reconciler checks it first. Ties are never
//!   silently dropped.
//!
//! The deterministic tie rule ([`TieRank`]) orders events of the same second
//! by: a terminal status first, then the later current-period end (a renewal
//! moves the period forward, never back), then the event kind
//! (`customer.subscription.created` < other updates < `deleted`), then the
//! event id. It is a total order computed from each event alone, so the
//! winner does not depend on arrival order. A record in a terminal status is
//! never taken out of it by a tie (a terminal status ranks first); two
//! different terminal statuses in the same second, which Stripe does not
//! produce, are ranked the same way and flagged like every other tie.
//!
//! An unknown subscription is refetched and upserted (with a client) or
//! created from the event's snapshot (without one). Thin events carry no
//! snapshot and always need a refetch.
//!
//! # Other events
//!
//! - `invoice.paid` / `invoice.payment_succeeded` extend `paid_through` (a
//!   maximum, so order does not matter), move `last_paid_at` forward, and
//!   restore a `past_due` or `unpaid` record to `active` when the payment is
//!   newer than the snapshot that said so.
//! - `invoice.payment_failed` / `invoice.payment_action_required` start the
//!   dunning clock (`last_payment_failed_at`); status changes come from the
//!   subscription events Stripe sends with them.
//! - `checkout.session.*` links `client_reference_id` and the customer to the
//!   subscription and never sets a status by itself.
//! - `entitlements.active_entitlement_summary.updated` is per customer; see
//!   [`step_entitlements`]: incomplete lists and same-second summaries are
//!   fetched from Stripe, never guessed.
//!
//! # Layout
//!
//! - [`model`]: what is stored ([`SubscriptionRecord`] with its
//!   [`SubscriptionState`]), independent of the parse types.
//! - the transition table and [`decide`]: what one event does to a record;
//! - [`step`] and [`resume`]: the whole effect of an event as a sans-IO
//!   machine, including refetches from Stripe and their failures — the
//!   processor only loads, fetches and saves;
//! - [`step_entitlements`] and [`resume_entitlements`]: customer
//!   entitlements, with their refetches.

mod entitlements;
mod machine;
pub mod model;
mod payments;
mod step;

pub use entitlements::{
    CustomerEntitlements, EntitlementFetch, EntitlementFetchOutcome, EntitlementFetchReason,
    EntitlementStep, decide_entitlements, entitlements_from_fetch, resume_entitlements,
    step_entitlements,
};
pub use machine::{
    Applied, ApplyReason, Decision, FetchTime, RefetchReason, TransitionKind, decide, from_stripe,
    subscription_id_of, tie_rank, transition,
};
pub use model::{
    Anomaly, AnomalyKind, MAX_ANOMALIES, MAX_FAILURES, PauseCollection, StatusChange,
    SubscriptionItem, SubscriptionRecord, SubscriptionState, TieRank, Watermark, WatermarkSource,
};
pub use step::{
    Effect, Fetch, FetchOutcome, FetchTarget, Step, StepError, Subject, resume, step, subject,
};
