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
//! - Invoice events first decide whether their invoice is the
//!   subscription's **latest** (Stripe decides `past_due` by the latest
//!   invoice): the same invoice as the record's latest, or a newer one
//!   (compared by the invoices' own `created`; against an invoice named
//!   only by a subscription snapshot, one created at or after that snapshot
//!   is newer). The latest invoice's facts are kept: its id, whether it is
//!   paid, its creation time, its due date (`send_invoice`) and the planned
//!   retry (`next_payment_attempt`).
//! - `invoice.paid` / `invoice.payment_succeeded` of the latest invoice
//!   extend `paid_through` (a maximum, so order does not matter), move
//!   `last_paid_at` forward, and restore a `past_due`, `unpaid` or
//!   `incomplete` record to `active` when the payment is newer than the
//!   snapshot that said so. A payment of an **older** invoice is recorded
//!   (in `paid_invoices`) and changes nothing else: no status, no latest
//!   invoice, no payment clock.
//! - Every payment is recorded once, with the event that reported it first
//!   ([`SubscriptionRecord::payment_first_reported_by`]): Stripe reports
//!   one payment with both `invoice.paid` and `invoice.payment_succeeded`,
//!   so a handler that sends a receipt acts when that is `Some` and sends
//!   one per payment.
//! - `invoice.payment_failed` / `invoice.payment_action_required` of the
//!   latest invoice start the dunning clock (`payment_failures`, cleared
//!   when a newer invoice becomes the latest); status changes come from the
//!   subscription events Stripe sends with them.
//! - `invoice.finalized` and `invoice.overdue` of the latest invoice record
//!   its facts (its id, unpaid, its due date: `due_date`, or `days_until_due`
//!   days after `status_transitions.finalized_at`) and nothing else: no
//!   status, no payment clock, no failure. For an invoiced subscription
//!   (`send_invoice`) this is how the due date of an unpaid invoice becomes
//!   known, since Stripe sends no `invoice.payment_failed` for an invoice
//!   that is not paid by its due date; the past-due grace then counts from
//!   that due date. A paid invoice is never made unpaid again by an event of
//!   the same invoice (`invoice.finalized` is often in its payment's second).
//! - `checkout.session.*` links `client_reference_id` and the customer to the
//!   subscription and never sets a status by itself.
//! - `entitlements.active_entitlement_summary.updated` is per customer; see
//!   [`step_entitlements`]: incomplete lists and same-second summaries are
//!   fetched from Stripe, never guessed.
//!
//! # What a record keeps for the application
//!
//! Besides the status and periods: the subscription's `metadata`, each
//! item's price id, product id and quantity
//! ([`SubscriptionRecord::has_price`], [`SubscriptionRecord::has_product`],
//! [`SubscriptionRecord::quantity_of`], [`SubscriptionRecord::is_named`]),
//! the collection method and `days_until_due`, the Checkout
//! `client_reference_id`, and the test clock the subscription runs on.
//!
//! # Test clocks
//!
//! A subscription on a Stripe test clock emits events whose `created` is the
//! clock's simulated time, which runs ahead of real time. Ordering compares
//! only `created` values of the subscription's own events, so it is
//! unaffected. A refetch is stamped with the latest of the fetch time
//! (Stripe's `Date`, real time), the record's watermark, the triggering
//! event's `created` and, when the fetched object carries its expanded test
//! clock, the clock's `frozen_time` (`HttpStripeClient` asks for it with
//! `expand[]=test_clock` on every subscription it retrieves or lists); so
//! events older than the fetched state stay stale even when simulated time
//! is ahead. The reconciler's catch-up cursor stays on real time and tracks
//! events dated ahead of it by a mark per test clock
//! ([`Reconciler::catch_up`](crate::Reconciler::catch_up)). Access decisions
//! take `now` from the caller: decide with the test clock's time for such a
//! subscription ([`SubscriptionState::test_clock`] names the clock). The
//! record's `last_verified_with_stripe` stays on the host's clock (the
//! reconciler's sweeps compare it with the host's time), so a time-based
//! denial decided at a simulated time ahead of it gets the stale-data grace
//! ([`AccessReason::Unverified`](crate::access::AccessReason::Unverified))
//! even right after a refetch; statuses Stripe reported (`unpaid`,
//! `canceled`) are denied at once.
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
    Anomaly, AnomalyKind, MAX_ANOMALIES, MAX_FAILURES, MAX_PAID_INVOICES, PaidInvoice,
    PauseCollection, StatusChange, SubscriptionItem, SubscriptionRecord, SubscriptionState,
    TieRank, Watermark, WatermarkSource,
};
pub use step::{
    Effect, Fetch, FetchOutcome, FetchTarget, Step, StepError, Subject, resume, step, subject,
};
