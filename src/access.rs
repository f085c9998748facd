//! "May this customer use the product now?" — a pure, clock-injected
//! decision that never locks out someone who paid because a webhook was late
//! or lost.
//!
//! [`AccessPolicy::decide`] maps a [`SubscriptionRecord`] and `now` to
//! [`Access::Granted`], [`Access::Grace`] (allowed, but something is off:
//! show a banner) or [`Access::Denied`], with a reason and the instant the
//! answer stops holding. Every boundary is one comparison, `now < end` means
//! before the end:
//!
//! | record | decision |
//! |---|---|
//! | `active` | granted while `now < max(current_period_end, paid_through)` |
//! | `active`, `cancel_at_period_end` or `cancel_at` | granted until that end, then denied (scheduled; no grace) |
//! | `active`, `pause_collection` set | as `active` (Stripe keeps the status and the periods; the service continues unpaid), reason `collection_paused`; with [`PausedCollectionAccess::UntilPaidPeriodEnds`], granted while `now < paid_through` (the current period end when no paid invoice was seen), then denied, reason `collection_paused` |
//! | `active`, period over | grace for [`AccessPolicy::renewal_grace`] (the renewal is usually on its way), then denied |
//! | `trialing` | granted while `now < max(trial_end, paid_through)`, then as a period that ended |
//! | `past_due`, charged automatically | grace for [`AccessPolicy::past_due_grace`] after the first failed payment of the latest invoice since the last payment (the period start when no failure was seen), then denied |
//! | `past_due`, invoiced (`collection_method = send_invoice`) | grace for [`AccessPolicy::past_due_grace`] after the unpaid invoice's due date, then denied (Stripe sends no payment failure for an invoice that is not paid by its due date) |
//! | `past_due`, with [`DunningGrace::WhileRetrying`] | as above, but while Stripe plans a retry (`next_payment_attempt`), grace until [`AccessPolicy::past_due_grace`] after that retry, capped at `cap` after the dunning cycle started |
//! | `incomplete` with a paid invoice covering `now` | grace until that invoice's period ends |
//! | `unpaid`, `incomplete`, `incomplete_expired`, `canceled`, `paused` | denied, with the status as the reason |
//! | an unknown status | denied, unless a paid invoice covers `now` (grace) |
//! | no snapshot yet, but a payment seen | grace for [`AccessPolicy::pending_grace`] after the payment |
//!
//! **Collection methods.** A subscription charged automatically
//! (`charge_automatically`, the default) turns `past_due` when a payment
//! fails, and Stripe sends `invoice.payment_failed`: the grace clock starts
//! at the first failure of the latest invoice after the last successful
//! payment. An invoiced subscription (`send_invoice`) turns `past_due` when
//! its invoice is not paid by the due date, and no failure is sent: the
//! grace clock starts at the due date, the later of the latest invoice's
//! `due_date` (from its invoice events: `invoice.finalized`, sent when the
//! invoice goes out, `invoice.overdue`, and payment events) and the current
//! period's start plus the subscription's `days_until_due` (Stripe
//! finalises a renewal invoice
//! about an hour after the period starts, and the invoice is due
//! `days_until_due` days after that). Without either, it starts at the
//! subscription event that reported `past_due`.
//!
//! **Which payment restores.** Stripe decides `past_due` by the latest
//! invoice: only a payment of the latest invoice (or of a newer one)
//! restores access; paying an older invoice is recorded and changes nothing
//! else.
//!
//! **Products, prices and named subscriptions.**
//! [`AccessPolicy::decide_product`], [`AccessPolicy::decide_price`] and
//! [`AccessPolicy::decide_named`] decide over the customer's subscriptions
//! that include a product or a price, or that carry a name under a metadata
//! key the application chooses (several kinds of subscription per customer,
//! like Cashier's subscription types and Pay's names).
//!
//! **Stale data.** When a denial comes only from time passing (a period or a
//! grace window ended) and the record was not verified with Stripe since that
//! moment, the answer is grace for [`AccessPolicy::stale_grace`] more: the
//! renewal or the recovering payment may have happened and its webhook been
//! lost. The reconciler's sweep settles it. Scheduled cancellations and
//! statuses Stripe reported are not stretched. The verification time is on
//! the host's clock: for a subscription on a Stripe test clock decided at
//! the clock's simulated time, a time-based denial is stretched this way
//! even right after a refetch.
//!
//! For a fixed record, access never grows as `now` grows (property-tested).
//! [`AccessPolicy::decide`] allocates nothing.

use serde::{Deserialize, Serialize};
use time::{Duration, OffsetDateTime};

use crate::event::SubscriptionStatus;
use crate::subscription::{CustomerEntitlements, SubscriptionRecord};

/// The answer, from best to worst.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Access {
    /// No access.
    Denied,
    /// Access, but a payment or a confirmation is outstanding.
    Grace,
    /// Full access.
    Granted,
}

impl Access {
    /// `granted`, `grace` or `denied`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Granted => "granted",
            Self::Grace => "grace",
            Self::Denied => "denied",
        }
    }

    /// Granted or in grace: let the customer in.
    pub fn allows(self) -> bool {
        self != Self::Denied
    }
}

/// Why.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum AccessReason {
    /// Active and paid for the current period.
    Active,
    /// In a trial.
    Trialing,
    /// Active until a scheduled cancellation.
    CancelScheduled,
    /// Active, collection paused: until the period end.
    CollectionPaused,
    /// The period ended; the renewal is expected.
    RenewalPending,
    /// A payment failed; Stripe is retrying.
    PastDueGrace,
    /// Our data may be stale: not verified with Stripe since it expired.
    Unverified,
    /// A payment was seen, the subscription's own event not yet.
    AwaitingSubscription,
    /// Canceled.
    Canceled,
    /// The first payment was never made (`incomplete_expired`).
    Expired,
    /// Retries exhausted (`unpaid`).
    Unpaid,
    /// First payment outstanding (`incomplete`).
    Incomplete,
    /// Paused (`paused` status).
    Paused,
    /// The paid period ended without a renewal.
    PeriodEnded,
    /// The past-due grace window ended.
    PaymentFailed,
    /// A status this crate does not know.
    UnknownStatus,
    /// No subscription on record.
    NoSubscription,
    /// The customer's entitlements include the feature.
    Entitled,
    /// The customer's entitlements do not include the feature.
    NotEntitled,
}

impl AccessReason {
    /// `snake_case` name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Trialing => "trialing",
            Self::CancelScheduled => "cancel_scheduled",
            Self::CollectionPaused => "collection_paused",
            Self::RenewalPending => "renewal_pending",
            Self::PastDueGrace => "past_due_grace",
            Self::Unverified => "unverified",
            Self::AwaitingSubscription => "awaiting_subscription",
            Self::Canceled => "canceled",
            Self::Expired => "expired",
            Self::Unpaid => "unpaid",
            Self::Incomplete => "incomplete",
            Self::Paused => "paused",
            Self::PeriodEnded => "period_ended",
            Self::PaymentFailed => "payment_failed",
            Self::UnknownStatus => "unknown_status",
            Self::NoSubscription => "no_subscription",
            Self::Entitled => "entitled",
            Self::NotEntitled => "not_entitled",
        }
    }
}

/// An access decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct AccessDecision {
    /// Granted, grace or denied.
    pub access: Access,
    /// Why.
    pub reason: AccessReason,
    /// Until when this access level holds (exclusive); `None` for denials
    /// and for answers with no time limit. Within that window the reason may
    /// become more specific (a pending renewal becomes unverified data).
    #[serde(with = "time::serde::rfc3339::option")]
    pub valid_until: Option<OffsetDateTime>,
}

impl AccessDecision {
    fn new(access: Access, reason: AccessReason, until: Option<i64>) -> Self {
        Self {
            access,
            reason,
            valid_until: until.and_then(|u| OffsetDateTime::from_unix_timestamp(u).ok()),
        }
    }

    fn denied(reason: AccessReason) -> Self {
        Self {
            access: Access::Denied,
            reason,
            valid_until: None,
        }
    }
}

/// How long a `past_due` subscription keeps access
/// ([`AccessPolicy::dunning`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum DunningGrace {
    /// Grace for [`AccessPolicy::past_due_grace`] from the start of the
    /// dunning cycle, then denied (the default).
    #[default]
    FixedWindow,
    /// Grace for as long as Stripe still plans to retry the payment: until
    /// [`AccessPolicy::past_due_grace`] after the planned retry
    /// (`next_payment_attempt` of the latest invoice), but never beyond
    /// `cap` after the dunning cycle started, and never shorter than the
    /// fixed window. Stripe's recommended Smart Retries make 8 attempts in 2
    /// weeks; when Stripe gives up it clears `next_payment_attempt` (and
    /// moves the subscription to `unpaid` or `canceled`).
    WhileRetrying {
        /// The longest past-due grace, from the start of the dunning cycle.
        cap: Duration,
    },
}

/// Access while collection is paused (`pause_collection` set; Stripe keeps
/// the status `active` and stops charging) ([`AccessPolicy::paused_collection`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum PausedCollectionAccess {
    /// Access as if active, for as long as collection is paused: Stripe's
    /// documented behaviour (the merchant offers the service without
    /// charging). The default.
    #[default]
    KeepAccess,
    /// Access until the paid period ends: the furthest service-period end
    /// of a paid invoice (`paid_through`; the current period's end when no
    /// paid invoice was seen), then denied with reason
    /// [`AccessReason::CollectionPaused`], like a scheduled cancellation (no
    /// grace).
    UntilPaidPeriodEnds,
}

/// The access rules; every window is configurable. See the [module docs](self).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AccessPolicy {
    /// Grace while `past_due` (default 3 days), from the first failed
    /// payment of the dunning cycle, or, for an invoiced subscription
    /// (`collection_method = send_invoice`), from the unpaid invoice's due
    /// date.
    pub past_due_grace: Duration,
    /// Whether past-due grace also lasts while Stripe still plans a retry
    /// (default: the fixed window only).
    pub dunning: DunningGrace,
    /// Access while collection is paused (default: kept).
    pub paused_collection: PausedCollectionAccess,
    /// Grace after an active period ends before the renewal is seen
    /// (default 1 day; Stripe finalizes renewal invoices about an hour after
    /// the period starts, and retries webhooks for days).
    pub renewal_grace: Duration,
    /// Extra grace when a time-based denial was never confirmed with Stripe
    /// (default 3 days, Stripe's webhook retry window).
    pub stale_grace: Duration,
    /// Grace after a payment is seen for a subscription whose own event has
    /// not arrived (default 1 day).
    pub pending_grace: Duration,
}

impl Default for AccessPolicy {
    fn default() -> Self {
        Self {
            past_due_grace: Duration::days(3),
            dunning: DunningGrace::FixedWindow,
            paused_collection: PausedCollectionAccess::KeepAccess,
            renewal_grace: Duration::days(1),
            stale_grace: Duration::days(3),
            pending_grace: Duration::days(1),
        }
    }
}

/// What ends a time-limited grant.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Ending {
    /// A scheduled cancellation or paused collection: denied after, no grace.
    Scheduled(AccessReason),
    /// A renewal is expected: renewal grace, then (if unverified) stale grace.
    Renewal,
}

impl AccessPolicy {
    /// Decides access for one subscription at `now`.
    ///
    /// ```
    /// use stripe_webhook_guard::access::{Access, AccessPolicy, AccessReason};
    /// use stripe_webhook_guard::event::SubscriptionView;
    /// use stripe_webhook_guard::subscription::from_stripe;
    /// use time::OffsetDateTime;
    ///
    /// let at = |t| OffsetDateTime::from_unix_timestamp(t).unwrap();
    /// // Stripe's object after a failed renewal payment.
    /// let stripe = SubscriptionView::from_json(r#"{"id":"sub_1","object":"subscription",
    ///     "customer":"cus_1","status":"past_due","current_period_start":1700000000,
    ///     "current_period_end":1702592000}"#).unwrap();
    /// let mut record = from_stripe(None, &stripe, at(1_700_000_000), None).record;
    /// record.last_payment_failed_at = Some(1_700_000_000);
    ///
    /// let policy = AccessPolicy::default();
    /// let d = policy.decide(&record, at(1_700_000_000 + 86_400));
    /// assert_eq!((d.access, d.reason), (Access::Grace, AccessReason::PastDueGrace));
    /// assert_eq!(d.valid_until.unwrap().unix_timestamp(), 1_700_000_000 + 3 * 86_400);
    ///
    /// // Three days after the failure, and verified with Stripe since: denied.
    /// record.last_verified_with_stripe = Some(at(1_700_000_000 + 3 * 86_400));
    /// let d = policy.decide(&record, at(1_700_000_000 + 3 * 86_400));
    /// assert_eq!((d.access, d.reason), (Access::Denied, AccessReason::PaymentFailed));
    /// ```
    pub fn decide(&self, record: &SubscriptionRecord, now: OffsetDateTime) -> AccessDecision {
        use SubscriptionStatus as S;
        let t = now.unix_timestamp();
        if !record.has_snapshot() {
            return self.decide_without_snapshot(record, t);
        }
        match &record.state.status {
            S::Canceled => AccessDecision::denied(AccessReason::Canceled),
            S::IncompleteExpired => AccessDecision::denied(AccessReason::Expired),
            S::Unpaid => AccessDecision::denied(AccessReason::Unpaid),
            S::Incomplete => match record.paid_through {
                // The first invoice was paid, the subscription's own update
                // not seen yet.
                Some(end) if t < end => AccessDecision::new(
                    Access::Grace,
                    AccessReason::AwaitingSubscription,
                    Some(end),
                ),
                _ => AccessDecision::denied(AccessReason::Incomplete),
            },
            S::Paused => AccessDecision::denied(AccessReason::Paused),
            S::Unknown(_) => match record.paid_through {
                Some(end) if t < end => {
                    AccessDecision::new(Access::Grace, AccessReason::UnknownStatus, Some(end))
                }
                _ => AccessDecision::denied(AccessReason::UnknownStatus),
            },
            // A paid invoice that reaches further than the period we know of
            // (the renewal's own update was lost or is late) counts.
            S::Active => {
                let end = later(record.state.current_period_end, record.paid_through);
                self.time_limited(record, t, end, AccessReason::Active)
            }
            S::Trialing => {
                let end = later(
                    record.state.trial_end.or(record.state.current_period_end),
                    record.paid_through,
                );
                self.time_limited(record, t, end, AccessReason::Trialing)
            }
            S::PastDue => self.past_due(record, t),
        }
    }

    /// `past_due`: grace from the start of the dunning cycle. For a
    /// subscription charged automatically that is the first failed payment
    /// after the last successful one; for an invoiced one (`send_invoice`,
    /// where no failure is ever reported) the unpaid invoice's due date.
    fn past_due(&self, record: &SubscriptionRecord, t: i64) -> AccessDecision {
        let snapshot = record.watermark.as_ref().map(|w| w.created);
        let start = if record.state.is_invoiced() {
            // The due date; else a failed attempt; else the snapshot that
            // said past_due, which Stripe sends once the due date passed.
            record
                .invoice_due_at()
                .or(record.dunning_since())
                .or(snapshot)
        } else {
            // Without a failure on record, the period's start (a renewal's
            // payment fails when the period starts).
            record
                .dunning_since()
                .or(record.state.current_period_start)
                .or(snapshot)
        };
        let Some(start) = start else {
            return AccessDecision::denied(AccessReason::PaymentFailed);
        };
        let window = self.past_due_grace.whole_seconds();
        let fixed_end = start.saturating_add(window);
        let end = match (self.dunning, record.next_payment_attempt) {
            (DunningGrace::WhileRetrying { cap }, Some(next)) => fixed_end.max(
                next.saturating_add(window)
                    .min(start.saturating_add(cap.whole_seconds())),
            ),
            _ => fixed_end,
        };
        if t < end {
            return AccessDecision::new(Access::Grace, AccessReason::PastDueGrace, Some(end));
        }
        self.after_boundary(record, t, end, AccessReason::PaymentFailed)
    }

    fn decide_without_snapshot(&self, record: &SubscriptionRecord, t: i64) -> AccessDecision {
        match record.last_paid_at {
            Some(paid) => {
                let end = paid.saturating_add(self.pending_grace.whole_seconds());
                if t < end {
                    AccessDecision::new(
                        Access::Grace,
                        AccessReason::AwaitingSubscription,
                        Some(end),
                    )
                } else {
                    AccessDecision::denied(AccessReason::AwaitingSubscription)
                }
            }
            None => AccessDecision::denied(AccessReason::NoSubscription),
        }
    }

    fn time_limited(
        &self,
        record: &SubscriptionRecord,
        t: i64,
        period_end: Option<i64>,
        reason: AccessReason,
    ) -> AccessDecision {
        let cancel = [
            record
                .state
                .cancel_at_period_end
                .then_some(record.state.current_period_end)
                .flatten(),
            record.state.cancel_at,
        ]
        .into_iter()
        .flatten()
        .min()
        .map(|at| (at, AccessReason::Canceled));
        let paused = (self.paused_collection == PausedCollectionAccess::UntilPaidPeriodEnds
            && record.state.pause_collection.is_some())
        .then_some(record.paid_through.or(record.state.current_period_end))
        .flatten()
        .map(|at| (at, AccessReason::CollectionPaused));
        let scheduled = match (cancel, paused) {
            (Some(c), Some(p)) => Some(if p.0 < c.0 { p } else { c }),
            (c, p) => c.or(p),
        };
        let (end, ending) = match (scheduled, period_end) {
            (Some((s, why)), Some(p)) if s <= p => (Some(s), Ending::Scheduled(why)),
            (Some((s, why)), None) => (Some(s), Ending::Scheduled(why)),
            (_, p) => (p, Ending::Renewal),
        };
        let Some(end) = end else {
            // Active without any period (should not happen): trust the status.
            return AccessDecision::new(Access::Granted, reason, None);
        };
        if t < end {
            let shown = match ending {
                Ending::Scheduled(AccessReason::CollectionPaused) => AccessReason::CollectionPaused,
                Ending::Scheduled(_) => AccessReason::CancelScheduled,
                // Paused collection: Stripe keeps the status and the periods;
                // the merchant offers the service without charging.
                Ending::Renewal if record.state.pause_collection.is_some() => {
                    AccessReason::CollectionPaused
                }
                Ending::Renewal => reason,
            };
            return AccessDecision::new(Access::Granted, shown, Some(end));
        }
        match ending {
            Ending::Scheduled(after) => AccessDecision::denied(after),
            Ending::Renewal => {
                let renewal_end = end.saturating_add(self.renewal_grace.whole_seconds());
                if t < renewal_end {
                    return self.stretch(record, t, end, renewal_end).unwrap_or(
                        AccessDecision::new(
                            Access::Grace,
                            AccessReason::RenewalPending,
                            Some(renewal_end),
                        ),
                    );
                }
                self.after_boundary(record, t, end, AccessReason::PeriodEnded)
            }
        }
    }

    /// Stale-data grace: a time-based denial at `boundary` that was never
    /// confirmed with Stripe lasts `stale_grace` longer.
    fn after_boundary(
        &self,
        record: &SubscriptionRecord,
        t: i64,
        boundary: i64,
        reason: AccessReason,
    ) -> AccessDecision {
        let stale_end = boundary.saturating_add(self.stale_grace.whole_seconds());
        if !verified_since(record, boundary) && t < stale_end {
            return AccessDecision::new(Access::Grace, AccessReason::Unverified, Some(stale_end));
        }
        AccessDecision::denied(reason)
    }

    /// When the stale window outlasts the renewal window, the grace shown is
    /// the longer one.
    fn stretch(
        &self,
        record: &SubscriptionRecord,
        _t: i64,
        boundary: i64,
        renewal_end: i64,
    ) -> Option<AccessDecision> {
        let stale_end = boundary.saturating_add(self.stale_grace.whole_seconds());
        (!verified_since(record, boundary) && stale_end > renewal_end).then(|| {
            AccessDecision::new(Access::Grace, AccessReason::RenewalPending, Some(stale_end))
        })
    }

    /// Decides for a customer over all their subscriptions: the best access
    /// wins, then the latest `valid_until` (no limit beats any limit).
    pub fn decide_customer<'a, I>(&self, records: I, now: OffsetDateTime) -> AccessDecision
    where
        I: IntoIterator<Item = &'a SubscriptionRecord>,
    {
        records
            .into_iter()
            .map(|r| self.decide(r, now))
            .max_by_key(|d| {
                (
                    d.access,
                    d.valid_until.is_none() && d.access.allows(),
                    d.valid_until,
                )
            })
            .unwrap_or(AccessDecision::denied(AccessReason::NoSubscription))
    }

    /// Decides for a customer over those of their subscriptions that
    /// `include` accepts: the best access wins, as in
    /// [`AccessPolicy::decide_customer`]; none accepted is
    /// [`AccessReason::NoSubscription`].
    pub fn decide_where<'a, I, F>(
        &self,
        records: I,
        include: F,
        now: OffsetDateTime,
    ) -> AccessDecision
    where
        I: IntoIterator<Item = &'a SubscriptionRecord>,
        F: Fn(&SubscriptionRecord) -> bool,
    {
        self.decide_customer(records.into_iter().filter(|r| include(r)), now)
    }

    /// Decides for a product: over the customer's subscriptions with an
    /// item whose price belongs to `product_id` (`price.product`).
    ///
    /// ```
    /// use stripe_webhook_guard::access::{Access, AccessPolicy, AccessReason};
    /// use stripe_webhook_guard::event::SubscriptionView;
    /// use stripe_webhook_guard::subscription::from_stripe;
    /// use time::OffsetDateTime;
    ///
    /// let at = |t| OffsetDateTime::from_unix_timestamp(t).unwrap();
    /// let stripe = SubscriptionView::from_json(r#"{"id":"sub_1","object":"subscription",
    ///     "customer":"cus_1","status":"active","metadata":{"type":"team"},
    ///     "items":{"data":[{"id":"si_1","quantity":5,
    ///         "price":{"id":"price_team_monthly","product":"prod_team"},
    ///         "current_period_start":1700000000,"current_period_end":1702592000}]}}"#).unwrap();
    /// let record = from_stripe(None, &stripe, at(1_700_000_000), None).record;
    /// assert!(record.has_product("prod_team") && record.has_price("price_team_monthly"));
    /// assert_eq!(record.quantity_of("price_team_monthly"), 5);
    ///
    /// let policy = AccessPolicy::default();
    /// let now = at(1_700_100_000);
    /// assert_eq!(policy.decide_product([&record], "prod_team", now).access, Access::Granted);
    /// assert_eq!(policy.decide_price([&record], "price_team_monthly", now).access, Access::Granted);
    /// assert_eq!(policy.decide_named([&record], "type", "team", now).access, Access::Granted);
    /// let other = policy.decide_product([&record], "prod_solo", now);
    /// assert_eq!((other.access, other.reason), (Access::Denied, AccessReason::NoSubscription));
    /// ```
    pub fn decide_product<'a, I>(
        &self,
        records: I,
        product_id: &str,
        now: OffsetDateTime,
    ) -> AccessDecision
    where
        I: IntoIterator<Item = &'a SubscriptionRecord>,
    {
        self.decide_where(records, |r| r.has_product(product_id), now)
    }

    /// Decides for a price: over the customer's subscriptions with an item
    /// for `price_id`.
    pub fn decide_price<'a, I>(
        &self,
        records: I,
        price_id: &str,
        now: OffsetDateTime,
    ) -> AccessDecision
    where
        I: IntoIterator<Item = &'a SubscriptionRecord>,
    {
        self.decide_where(records, |r| r.has_price(price_id), now)
    }

    /// Decides for a named subscription: over the customer's subscriptions
    /// whose metadata holds `name` under `key` (the application sets it when
    /// it creates the subscription, for example `metadata[type] = "team"` on
    /// Checkout's `subscription_data`), so a customer with a "team" and a
    /// "personal" subscription gets an answer for each.
    pub fn decide_named<'a, I>(
        &self,
        records: I,
        key: &str,
        name: &str,
        now: OffsetDateTime,
    ) -> AccessDecision
    where
        I: IntoIterator<Item = &'a SubscriptionRecord>,
    {
        self.decide_where(records, |r| r.is_named(key, name), now)
    }

    /// Decides for one feature (an entitlement `lookup_key`). Where Stripe
    /// has reported the customer's entitlements, they decide: the key present
    /// is granted, absent is denied. Without an entitlement summary, the
    /// customer-level decision over their subscriptions applies.
    pub fn decide_feature<'a, I>(
        &self,
        entitlements: Option<&CustomerEntitlements>,
        records: I,
        lookup_key: &str,
        now: OffsetDateTime,
    ) -> AccessDecision
    where
        I: IntoIterator<Item = &'a SubscriptionRecord>,
    {
        match entitlements {
            Some(e) if e.has(lookup_key) => {
                AccessDecision::new(Access::Granted, AccessReason::Entitled, None)
            }
            Some(_) => AccessDecision::denied(AccessReason::NotEntitled),
            None => self.decide_customer(records, now),
        }
    }
}

/// `has_feature`: whether the customer's reported entitlements include
/// `lookup_key` (false when none were reported).
pub fn has_feature(entitlements: Option<&CustomerEntitlements>, lookup_key: &str) -> bool {
    entitlements.is_some_and(|e| e.has(lookup_key))
}

fn later(a: Option<i64>, b: Option<i64>) -> Option<i64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    }
}

fn verified_since(record: &SubscriptionRecord, boundary: i64) -> bool {
    record
        .last_verified_with_stripe
        .is_some_and(|v| v.unix_timestamp() >= boundary)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::CollectionMethod;
    use crate::subscription::{TieRank, Watermark, WatermarkSource};
    use SubscriptionStatus as S;

    const DAY: i64 = 86_400;
    const T0: i64 = 1_700_000_000;

    fn at(t: i64) -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp(t).unwrap()
    }

    fn record(status: S) -> SubscriptionRecord {
        let mut r = SubscriptionRecord::new("sub_1");
        r.state.status = status;
        r.state.current_period_start = Some(T0 - 30 * DAY);
        r.state.current_period_end = Some(T0);
        r.state.trial_end = Some(T0);
        r.watermark = Some(Watermark {
            created: T0 - 30 * DAY,
            event_id: "evt_1".into(),
            rank: TieRank {
                terminal: status_terminal(&r.state.status),
                period_end: T0,
                phase: 1,
            },
            source: WatermarkSource::Event,
        });
        r
    }

    fn status_terminal(s: &S) -> bool {
        s.is_terminal()
    }

    fn decide(r: &SubscriptionRecord, t: i64) -> (Access, AccessReason, Option<i64>) {
        let d = AccessPolicy::default().decide(r, at(t));
        (
            d.access,
            d.reason,
            d.valid_until.map(OffsetDateTime::unix_timestamp),
        )
    }

    #[test]
    fn every_status_before_at_and_after_its_boundary() {
        use Access::*;
        use AccessReason as R;
        type Point = (i64, (Access, R, Option<i64>));
        // (record, [(now, expected)])
        let verified_late = |mut r: SubscriptionRecord| {
            r.last_verified_with_stripe = Some(at(T0 + 10 * DAY));
            r
        };
        let cases: Vec<(&str, SubscriptionRecord, Vec<Point>)> = vec![
            (
                "active, unverified",
                record(S::Active),
                vec![
                    (T0 - 1, (Granted, R::Active, Some(T0))),
                    (T0, (Grace, R::RenewalPending, Some(T0 + 3 * DAY))),
                    (T0 + 3 * DAY - 1, (Grace, R::Unverified, Some(T0 + 3 * DAY))),
                    (T0 + 3 * DAY, (Denied, R::PeriodEnded, None)),
                ],
            ),
            (
                "active, verified after the period end",
                verified_late(record(S::Active)),
                vec![
                    (T0 - 1, (Granted, R::Active, Some(T0))),
                    (T0, (Grace, R::RenewalPending, Some(T0 + DAY))),
                    (T0 + DAY - 1, (Grace, R::RenewalPending, Some(T0 + DAY))),
                    (T0 + DAY, (Denied, R::PeriodEnded, None)),
                ],
            ),
            (
                "active, cancel at period end",
                {
                    let mut r = record(S::Active);
                    r.state.cancel_at_period_end = true;
                    r
                },
                vec![
                    (T0 - 1, (Granted, R::CancelScheduled, Some(T0))),
                    (T0, (Denied, R::Canceled, None)),
                    (T0 + 1, (Denied, R::Canceled, None)),
                ],
            ),
            (
                "active, cancel_at before the period end",
                {
                    let mut r = record(S::Active);
                    r.state.cancel_at = Some(T0 - DAY);
                    r
                },
                vec![
                    (T0 - DAY - 1, (Granted, R::CancelScheduled, Some(T0 - DAY))),
                    (T0 - DAY, (Denied, R::Canceled, None)),
                ],
            ),
            (
                "active, collection paused",
                {
                    let mut r = record(S::Active);
                    r.state.pause_collection = Some(crate::subscription::PauseCollection {
                        behavior: Some("void".into()),
                        resumes_at: None,
                    });
                    r
                },
                vec![
                    (T0 - 1, (Granted, R::CollectionPaused, Some(T0))),
                    (T0, (Grace, R::RenewalPending, Some(T0 + 3 * DAY))),
                    (T0 + 3 * DAY, (Denied, R::PeriodEnded, None)),
                ],
            ),
            (
                "trialing",
                verified_late(record(S::Trialing)),
                vec![
                    (T0 - 1, (Granted, R::Trialing, Some(T0))),
                    (T0, (Grace, R::RenewalPending, Some(T0 + DAY))),
                    (T0 + DAY, (Denied, R::PeriodEnded, None)),
                ],
            ),
            (
                "past_due from the failure",
                {
                    let mut r = verified_late(record(S::PastDue));
                    r.payment_failures = vec![T0, T0 + DAY];
                    r
                },
                vec![
                    (T0 - 1, (Grace, R::PastDueGrace, Some(T0 + 3 * DAY))),
                    (T0, (Grace, R::PastDueGrace, Some(T0 + 3 * DAY))),
                    (
                        T0 + 3 * DAY - 1,
                        (Grace, R::PastDueGrace, Some(T0 + 3 * DAY)),
                    ),
                    (T0 + 3 * DAY, (Denied, R::PaymentFailed, None)),
                ],
            ),
            (
                "past_due, unverified",
                {
                    let mut r = record(S::PastDue);
                    r.payment_failures = vec![T0];
                    r
                },
                vec![
                    (T0 + 3 * DAY, (Grace, R::Unverified, Some(T0 + 6 * DAY))),
                    (T0 + 6 * DAY, (Denied, R::PaymentFailed, None)),
                ],
            ),
            (
                "past_due, invoiced: from the due date, not the period start",
                {
                    let mut r = verified_late(record(S::PastDue));
                    r.state.collection_method = Some(CollectionMethod::SendInvoice);
                    r.state.days_until_due = Some(30);
                    r.latest_invoice_due = Some(T0 + DAY);
                    r
                },
                vec![
                    (T0, (Grace, R::PastDueGrace, Some(T0 + 4 * DAY))),
                    (
                        T0 + 4 * DAY - 1,
                        (Grace, R::PastDueGrace, Some(T0 + 4 * DAY)),
                    ),
                    (T0 + 4 * DAY, (Denied, R::PaymentFailed, None)),
                ],
            ),
            (
                "past_due, invoiced, due date unknown: period start + days_until_due",
                {
                    let mut r = verified_late(record(S::PastDue));
                    r.state.collection_method = Some(CollectionMethod::SendInvoice);
                    r.state.days_until_due = Some(30);
                    r
                },
                vec![
                    (T0 + 2 * DAY, (Grace, R::PastDueGrace, Some(T0 + 3 * DAY))),
                    (T0 + 3 * DAY, (Denied, R::PaymentFailed, None)),
                ],
            ),
            (
                "unpaid",
                record(S::Unpaid),
                vec![
                    (T0 - 1, (Denied, R::Unpaid, None)),
                    (T0, (Denied, R::Unpaid, None)),
                ],
            ),
            (
                "incomplete",
                record(S::Incomplete),
                vec![
                    (T0 - 1, (Denied, R::Incomplete, None)),
                    (T0 + 1, (Denied, R::Incomplete, None)),
                ],
            ),
            (
                "incomplete with its first invoice paid",
                {
                    let mut r = record(S::Incomplete);
                    r.paid_through = Some(T0);
                    r
                },
                vec![
                    (T0 - 1, (Grace, R::AwaitingSubscription, Some(T0))),
                    (T0, (Denied, R::Incomplete, None)),
                ],
            ),
            (
                "active, renewal paid but its update lost",
                {
                    let mut r = verified_late(record(S::Active));
                    r.paid_through = Some(T0 + 30 * DAY);
                    r
                },
                vec![
                    (T0, (Granted, R::Active, Some(T0 + 30 * DAY))),
                    (T0 + 30 * DAY - 1, (Granted, R::Active, Some(T0 + 30 * DAY))),
                    (
                        T0 + 30 * DAY,
                        (Grace, R::RenewalPending, Some(T0 + 33 * DAY)),
                    ),
                ],
            ),
            (
                "incomplete_expired",
                record(S::IncompleteExpired),
                vec![(T0, (Denied, R::Expired, None))],
            ),
            (
                "canceled",
                record(S::Canceled),
                vec![
                    (T0 - 1, (Denied, R::Canceled, None)),
                    (T0, (Denied, R::Canceled, None)),
                ],
            ),
            (
                "paused",
                record(S::Paused),
                vec![
                    (T0 - 1, (Denied, R::Paused, None)),
                    (T0 + 1, (Denied, R::Paused, None)),
                ],
            ),
            (
                "unknown status with a paid invoice",
                {
                    let mut r = record(S::Unknown("frozen".into()));
                    r.paid_through = Some(T0);
                    r
                },
                vec![
                    (T0 - 1, (Grace, R::UnknownStatus, Some(T0))),
                    (T0, (Denied, R::UnknownStatus, None)),
                ],
            ),
            (
                "no snapshot, payment seen",
                {
                    let mut r = SubscriptionRecord::new("sub_1");
                    r.last_paid_at = Some(T0);
                    r
                },
                vec![
                    (T0, (Grace, R::AwaitingSubscription, Some(T0 + DAY))),
                    (
                        T0 + DAY - 1,
                        (Grace, R::AwaitingSubscription, Some(T0 + DAY)),
                    ),
                    (T0 + DAY, (Denied, R::AwaitingSubscription, None)),
                ],
            ),
            (
                "nothing known",
                SubscriptionRecord::new("sub_1"),
                vec![(T0, (Denied, R::NoSubscription, None))],
            ),
        ];
        for (name, r, points) in cases {
            for (t, want) in points {
                assert_eq!(decide(&r, t), want, "{name} at T0{:+}", t - T0);
            }
        }
    }

    /// Grace while Stripe plans a retry: until `past_due_grace` after the
    /// planned retry, capped from the dunning cycle's start, never shorter
    /// than the fixed window.
    #[test]
    fn dunning_grace_while_stripe_retries() {
        let policy = AccessPolicy {
            dunning: DunningGrace::WhileRetrying {
                cap: Duration::days(14),
            },
            ..AccessPolicy::default()
        };
        let mut r = record(S::PastDue);
        r.payment_failures = vec![T0];
        r.last_verified_with_stripe = Some(at(T0 + 30 * DAY));
        let grace = |r: &SubscriptionRecord, t| {
            let d = policy.decide(r, at(t));
            (
                d.access,
                d.reason,
                d.valid_until.map(OffsetDateTime::unix_timestamp),
            )
        };
        // Retry planned in 5 days: grace until 3 days after it.
        r.next_payment_attempt = Some(T0 + 5 * DAY);
        assert_eq!(
            grace(&r, T0 + 4 * DAY),
            (
                Access::Grace,
                AccessReason::PastDueGrace,
                Some(T0 + 8 * DAY)
            )
        );
        assert_eq!(grace(&r, T0 + 8 * DAY).0, Access::Denied);
        // A retry far out: capped at 14 days from the first failure.
        r.next_payment_attempt = Some(T0 + 20 * DAY);
        assert_eq!(grace(&r, T0 + 13 * DAY).2, Some(T0 + 14 * DAY));
        assert_eq!(grace(&r, T0 + 14 * DAY).0, Access::Denied);
        // Stripe gave up (no retry planned): the fixed window.
        r.next_payment_attempt = None;
        assert_eq!(grace(&r, T0 + DAY).2, Some(T0 + 3 * DAY));
        // The default policy ignores planned retries.
        r.next_payment_attempt = Some(T0 + 5 * DAY);
        assert_eq!(decide(&r, T0 + DAY).2, Some(T0 + 3 * DAY));
    }

    /// Paused collection: access kept by default; with
    /// `UntilPaidPeriodEnds`, until the paid period ends, then denied.
    #[test]
    fn paused_collection_until_the_paid_period_ends() {
        let until_paid = AccessPolicy {
            paused_collection: PausedCollectionAccess::UntilPaidPeriodEnds,
            ..AccessPolicy::default()
        };
        let mut r = record(S::Active);
        r.state.pause_collection = Some(crate::subscription::PauseCollection {
            behavior: Some("void".into()),
            resumes_at: None,
        });
        // Stripe renewed the period while paused; the last paid invoice
        // covered up to T0 - 10 days.
        r.state.current_period_end = Some(T0 + 20 * DAY);
        r.paid_through = Some(T0 - 10 * DAY);
        let at_policy = |p: &AccessPolicy, r: &SubscriptionRecord, t| {
            let d = p.decide(r, at(t));
            (
                d.access,
                d.reason,
                d.valid_until.map(OffsetDateTime::unix_timestamp),
            )
        };
        assert_eq!(
            at_policy(&AccessPolicy::default(), &r, T0),
            (
                Access::Granted,
                AccessReason::CollectionPaused,
                Some(T0 + 20 * DAY)
            )
        );
        assert_eq!(
            at_policy(&until_paid, &r, T0 - 10 * DAY - 1),
            (
                Access::Granted,
                AccessReason::CollectionPaused,
                Some(T0 - 10 * DAY)
            )
        );
        assert_eq!(
            at_policy(&until_paid, &r, T0 - 10 * DAY),
            (Access::Denied, AccessReason::CollectionPaused, None)
        );
        // No paid invoice seen: the current period's end.
        r.paid_through = None;
        assert_eq!(at_policy(&until_paid, &r, T0).2, Some(T0 + 20 * DAY));
        // A cancellation scheduled earlier still ends it first.
        r.state.cancel_at = Some(T0 + DAY);
        assert_eq!(
            at_policy(&until_paid, &r, T0),
            (
                Access::Granted,
                AccessReason::CancelScheduled,
                Some(T0 + DAY)
            )
        );
    }

    #[test]
    fn product_price_and_named_subscriptions() {
        let p = AccessPolicy::default();
        let mut team = record(S::Active);
        team.state.items = vec![crate::subscription::SubscriptionItem {
            id: Some("si_1".into()),
            price_id: Some("price_team".into()),
            product_id: Some("prod_team".into()),
            quantity: Some(5),
            current_period_start: None,
            current_period_end: None,
        }];
        team.state.metadata = [("type".to_owned(), "team".to_owned())].into();
        let mut solo = record(S::Canceled);
        solo.id = "sub_2".into();
        solo.state.items = vec![crate::subscription::SubscriptionItem {
            price_id: Some("price_solo".into()),
            product_id: Some("prod_solo".into()),
            ..team.state.items[0].clone()
        }];
        solo.state.metadata = [("type".to_owned(), "personal".to_owned())].into();
        let both = [&team, &solo];
        let now = at(T0 - 1);
        assert_eq!(
            p.decide_product(both, "prod_team", now).access,
            Access::Granted
        );
        assert_eq!(
            p.decide_product(both, "prod_solo", now).reason,
            AccessReason::Canceled
        );
        assert_eq!(
            p.decide_price(both, "price_team", now).access,
            Access::Granted
        );
        assert_eq!(
            p.decide_price(both, "price_none", now).reason,
            AccessReason::NoSubscription
        );
        assert_eq!(
            p.decide_named(both, "type", "team", now).access,
            Access::Granted
        );
        assert_eq!(
            p.decide_named(both, "type", "personal", now).access,
            Access::Denied
        );
        assert_eq!(team.quantity_of("price_team"), 5);
        assert_eq!(solo.quantity_of("price_team"), 0);
    }

    #[test]
    fn customer_best_access_wins() {
        let p = AccessPolicy::default();
        let canceled = record(S::Canceled);
        let active = record(S::Active);
        let d = p.decide_customer([&canceled, &active], at(T0 - 1));
        assert_eq!(d.access, Access::Granted);
        let none: [&SubscriptionRecord; 0] = [];
        assert_eq!(
            p.decide_customer(none, at(T0)).reason,
            AccessReason::NoSubscription
        );
    }

    #[test]
    fn features_follow_entitlements() {
        let p = AccessPolicy::default();
        let e = CustomerEntitlements {
            customer: "cus_1".into(),
            lookup_keys: vec!["pro".into()],
            watermark: (1, "evt_1".into()),
            version: 1,
            account: None,
            verified: true,
            last_verified_with_stripe: None,
        };
        let canceled = record(S::Canceled);
        assert_eq!(
            p.decide_feature(Some(&e), [&canceled], "pro", at(T0))
                .access,
            Access::Granted
        );
        assert_eq!(
            p.decide_feature(Some(&e), [&canceled], "team", at(T0))
                .access,
            Access::Denied
        );
        let active = record(S::Active);
        assert_eq!(
            p.decide_feature(None, [&active], "team", at(T0 - 1)).access,
            Access::Granted
        );
        assert!(has_feature(Some(&e), "pro"));
        assert!(!has_feature(None, "pro"));
    }
}
