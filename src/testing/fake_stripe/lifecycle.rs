//! The subscription lifecycle of [`FakeStripe`]: the moves a customer or an
//! operator makes, and the actions Stripe schedules and runs on its own
//! (renewals, trial ends, payment retries, invoice due dates, expiry of
//! incomplete subscriptions, cancellation at the period's end). Each move
//! changes the true state first, then emits the events Stripe would, in
//! Stripe's order.

use std::cmp::Reverse;

use super::{
    Action, AfterRetries, Card, Collection, DAY, FakeStripe, HOUR, Inner, Scheduled, Sub,
    Subscribe, next_id,
};
use crate::event::SubscriptionStatus;

/// The event type of a subscription change.
const UPDATED: &str = "customer.subscription.updated";
const DELETED: &str = "customer.subscription.deleted";
const PAUSED: &str = "customer.subscription.paused";
const SUBSCRIPTION_CYCLE: &str = "subscription_cycle";

impl FakeStripe {
    /// Subscribes a customer. Charged automatically, payment follows the
    /// customer's card: works → active; declines → incomplete (expires after
    /// 23 hours); with a trial the card is charged at the trial's end.
    /// Invoiced ([`Collection::SendInvoice`]): active at once, with an open
    /// invoice due `days_until_due` days later.
    pub fn subscribe(&self, customer: &str, opts: &Subscribe) -> String {
        let now = self.now();
        let mut inner = self.lock();
        let card = inner.customers.get(customer).copied().unwrap_or_default();
        let id = next_id(&mut inner, "sub");
        let item_id = next_id(&mut inner, "si");
        let period = self.config.period.whole_seconds();
        let days_until_due = match opts.collection {
            Collection::Automatic => None,
            Collection::SendInvoice { days_until_due } => Some(days_until_due),
        };
        let mut sub = Sub {
            id: id.clone(),
            customer: customer.to_owned(),
            price: opts.price.clone(),
            quantity: opts.quantity,
            metadata: opts.metadata.clone(),
            days_until_due,
            invoice_dates: None,
            test_clock: self
                .config
                .test_clock_ahead
                .map(|_| "clock_fake".to_owned()),
            item_id,
            status: SubscriptionStatus::Incomplete,
            created: now,
            period_start: now,
            period_end: now + period,
            trial_start: None,
            trial_end: None,
            cancel_at_period_end: false,
            cancel_at: None,
            canceled_at: None,
            ended_at: None,
            pause_collection: None,
            latest_invoice: None,
            dunning: None,
            generation: 0,
        };
        let invoice = next_id(&mut inner, "in");
        sub.latest_invoice = Some(invoice.clone());
        let session = next_id(&mut inner, "cs");
        if let Some(days) = opts.trial_days {
            let end = now + i64::from(days) * DAY;
            sub.status = SubscriptionStatus::Trialing;
            sub.trial_start = Some(now);
            sub.trial_end = Some(end);
            sub.period_end = end;
            inner.subs.insert(id.clone(), sub.clone());
            self.emit_sub(&mut inner, "customer.subscription.created", &sub, None);
            self.emit_paid(
                &mut inner,
                &sub,
                &invoice,
                "subscription_create",
                (now, end),
            );
            if opts.checkout {
                self.emit_checkout(
                    &mut inner,
                    &session,
                    &sub,
                    opts.client_reference_id.as_deref(),
                    "no_payment_required",
                );
            }
            // TrialEnd first: scheduling it starts a new generation, which
            // TrialWillEnd (scheduled without one) then belongs to.
            self.schedule(&mut inner, &id, end, Action::TrialEnd);
            self.schedule(&mut inner, &id, end - 3 * DAY, Action::TrialWillEnd);
        } else if sub.days_until_due.is_some() {
            sub.status = SubscriptionStatus::Active;
            inner.subs.insert(id.clone(), sub.clone());
            self.schedule(&mut inner, &id, sub.period_end, Action::Renew);
            self.open_invoice(&mut inner, &mut sub, &invoice);
            self.emit_sub(&mut inner, "customer.subscription.created", &sub, None);
            self.invoice_sent(&mut inner, &sub, &invoice);
        } else {
            inner.subs.insert(id.clone(), sub.clone());
            self.emit_sub(&mut inner, "customer.subscription.created", &sub, None);
            if card == Card::Works {
                self.emit_paid(
                    &mut inner,
                    &sub,
                    &invoice,
                    "subscription_create",
                    (now, sub.period_end),
                );
                let before = sub.clone();
                sub.status = SubscriptionStatus::Active;
                self.update(&mut inner, UPDATED, &sub, &before);
                if opts.checkout {
                    self.emit_checkout(
                        &mut inner,
                        &session,
                        &sub,
                        opts.client_reference_id.as_deref(),
                        "paid",
                    );
                }
                self.schedule(&mut inner, &id, sub.period_end, Action::Renew);
            } else {
                self.emit_failed(&mut inner, &sub, &invoice, "subscription_create");
                self.schedule(&mut inner, &id, now + 23 * HOUR, Action::ExpireIncomplete);
            }
        }
        self.sync_entitlements(&mut inner, customer);
        id
    }

    /// The customer pays the open invoice now (after updating their card, or
    /// by bank transfer for an invoiced subscription): a past-due, unpaid or
    /// incomplete subscription becomes active; an invoiced active one stays
    /// active with its invoice paid.
    pub fn pay_open_invoice(&self, sub_id: &str) {
        let now = self.now();
        let mut inner = self.lock();
        let Some(mut sub) = inner.subs.get(sub_id).cloned() else {
            return;
        };
        let invoiced_open = sub.status == SubscriptionStatus::Active && sub.dunning.is_some();
        if !invoiced_open
            && !matches!(
                sub.status,
                SubscriptionStatus::PastDue
                    | SubscriptionStatus::Unpaid
                    | SubscriptionStatus::Incomplete
            )
        {
            return;
        }
        inner.customers.insert(sub.customer.clone(), Card::Works);
        let invoice = sub
            .latest_invoice
            .clone()
            .unwrap_or_else(|| next_id(&mut inner, "in"));
        self.emit_paid_cycle(&mut inner, &sub, &invoice);
        let before = sub.clone();
        sub.status = SubscriptionStatus::Active;
        sub.dunning = None;
        if invoiced_open {
            inner.subs.insert(sub.id.clone(), sub.clone());
            return;
        }
        sub.generation += 1;
        self.update(&mut inner, UPDATED, &sub, &before);
        let end = sub.period_end.max(now + 1);
        self.schedule(&mut inner, sub_id, end, Action::Renew);
        self.sync_of(&mut inner, &sub);
    }

    /// Cancels now.
    pub fn cancel_now(&self, sub_id: &str) {
        let now = self.now();
        self.change(
            sub_id,
            |sub| !sub.status.is_terminal(),
            |this, inner, sub, before| {
                sub.status = SubscriptionStatus::Canceled;
                sub.canceled_at = Some(now);
                sub.ended_at = Some(now);
                sub.generation += 1;
                this.update(inner, DELETED, sub, before);
                this.sync_of(inner, sub);
            },
        );
    }

    /// Sets or clears `cancel_at_period_end`.
    pub fn cancel_at_period_end(&self, sub_id: &str, cancel: bool) {
        let now = self.now();
        let applies = |sub: &Sub| !sub.status.is_terminal() && sub.cancel_at_period_end != cancel;
        self.change(sub_id, applies, |this, inner, sub, before| {
            sub.cancel_at_period_end = cancel;
            sub.cancel_at = cancel.then_some(sub.period_end);
            sub.canceled_at = cancel.then_some(now);
            sub.generation += 1;
            this.update(inner, UPDATED, sub, before);
            let action = match (cancel, &sub.status) {
                (true, _) => Action::CancelAtPeriodEnd,
                (false, SubscriptionStatus::Trialing) => Action::TrialEnd,
                (false, _) => Action::Renew,
            };
            this.schedule(inner, &sub.id, sub.period_end, action);
        });
    }

    /// Pauses the subscription (status `paused`, `customer.subscription.paused`).
    pub fn pause(&self, sub_id: &str) {
        let applies = |sub: &Sub| {
            matches!(
                sub.status,
                SubscriptionStatus::Active
                    | SubscriptionStatus::Trialing
                    | SubscriptionStatus::PastDue
            )
        };
        self.change(sub_id, applies, |this, inner, sub, before| {
            sub.status = SubscriptionStatus::Paused;
            sub.dunning = None;
            sub.generation += 1;
            this.update(inner, PAUSED, sub, before);
            this.sync_of(inner, sub);
        });
    }

    /// Resumes a paused subscription: a new period starts now and is charged.
    pub fn resume(&self, sub_id: &str) {
        let now = self.now();
        let mut inner = self.lock();
        let Some(mut sub) = inner.subs.get(sub_id).cloned() else {
            return;
        };
        if sub.status != SubscriptionStatus::Paused {
            return;
        }
        let card = inner
            .customers
            .get(&sub.customer)
            .copied()
            .unwrap_or_default();
        let before = sub.clone();
        let invoice = next_id(&mut inner, "in");
        sub.latest_invoice = Some(invoice.clone());
        sub.period_start = now;
        sub.period_end = now + self.config.period.whole_seconds();
        sub.generation += 1;
        if card == Card::Works {
            sub.status = SubscriptionStatus::Active;
            inner.subs.insert(sub.id.clone(), sub.clone());
            self.emit_invoice(
                &mut inner,
                "invoice.paid",
                &sub,
                &invoice,
                true,
                SUBSCRIPTION_CYCLE,
                (now, sub.period_end),
            );
            self.update(&mut inner, "customer.subscription.resumed", &sub, &before);
            self.schedule(&mut inner, sub_id, sub.period_end, Action::Renew);
        } else {
            sub.status = SubscriptionStatus::PastDue;
            sub.dunning = Some((invoice.clone(), 0));
            inner.subs.insert(sub.id.clone(), sub.clone());
            self.emit_failed(&mut inner, &sub, &invoice, SUBSCRIPTION_CYCLE);
            self.update(&mut inner, "customer.subscription.resumed", &sub, &before);
            self.schedule_retry(&mut inner, &sub);
        }
        self.sync_of(&mut inner, &sub);
    }

    /// Sets (`Some(behavior)`) or clears `pause_collection`; the status is
    /// unchanged and renewals go unpaid while it is set.
    pub fn pause_collection(&self, sub_id: &str, behavior: Option<&str>) {
        self.change(
            sub_id,
            |sub| !sub.status.is_terminal(),
            |this, inner, sub, before| {
                sub.pause_collection = behavior.map(str::to_owned);
                this.update(inner, UPDATED, sub, before);
            },
        );
    }

    /// Sets (`Some`) or removes (`None`) a metadata key of the subscription.
    pub fn set_metadata(&self, sub_id: &str, key: &str, value: Option<&str>) {
        self.change(
            sub_id,
            |sub| !sub.status.is_terminal(),
            |this, inner, sub, before| {
                match value {
                    Some(v) => sub.metadata.insert(key.to_owned(), v.to_owned()),
                    None => sub.metadata.remove(key),
                };
                this.update(inner, UPDATED, sub, before);
            },
        );
    }

    /// Puts an active subscription on a trial until `days` from now.
    pub fn set_trial(&self, sub_id: &str, days: u32) {
        let now = self.now();
        let applies = |sub: &Sub| sub.status == SubscriptionStatus::Active;
        self.change(sub_id, applies, |this, inner, sub, before| {
            let end = now + i64::from(days) * DAY;
            sub.status = SubscriptionStatus::Trialing;
            sub.trial_start = Some(now);
            sub.trial_end = Some(end);
            sub.period_start = now;
            sub.period_end = end;
            sub.generation += 1;
            this.update(inner, UPDATED, sub, before);
            this.schedule(inner, &sub.id, end, Action::TrialEnd);
        });
    }

    /// Runs `then` on the subscription (with a copy of it as it was) when it
    /// exists and `applies` to it.
    fn change(
        &self,
        sub_id: &str,
        applies: impl FnOnce(&Sub) -> bool,
        then: impl FnOnce(&Self, &mut Inner, &mut Sub, &Sub),
    ) {
        let mut inner = self.lock();
        let Some(mut sub) = inner.subs.get(sub_id).cloned() else {
            return;
        };
        if !applies(&sub) {
            return;
        }
        let before = sub.clone();
        then(self, &mut inner, &mut sub, &before);
    }

    /// Stores the subscription's new state and emits `event_type` for it.
    fn update(&self, inner: &mut Inner, event_type: &str, sub: &Sub, before: &Sub) {
        inner.subs.insert(sub.id.clone(), sub.clone());
        self.emit_sub(inner, event_type, sub, Some(before));
    }

    /// Brings the customer's entitlements up to date.
    fn sync_of(&self, inner: &mut Inner, sub: &Sub) {
        let customer = sub.customer.clone();
        self.sync_entitlements(inner, &customer);
    }

    /// A failed charge of `invoice` for the current period.
    fn emit_failed(&self, inner: &mut Inner, sub: &Sub, invoice: &str, reason: &str) {
        self.emit_invoice(
            inner,
            "invoice.payment_failed",
            sub,
            invoice,
            false,
            reason,
            (sub.period_start, sub.period_end),
        );
    }

    /// A successful payment of `invoice` for the current period.
    fn emit_paid_cycle(&self, inner: &mut Inner, sub: &Sub, invoice: &str) {
        self.emit_paid(
            inner,
            sub,
            invoice,
            SUBSCRIPTION_CYCLE,
            (sub.period_start, sub.period_end),
        );
    }

    /// Invoiced: `invoice` is finalised now and due `days_until_due` later;
    /// the due date is scheduled in the subscription's current generation
    /// (the renewal scheduled just before keeps its own), and `sub` stored.
    fn open_invoice(&self, inner: &mut Inner, sub: &mut Sub, invoice: &str) {
        let now = self.now();
        if let Some(stored) = inner.subs.get(&sub.id) {
            sub.generation = stored.generation;
        }
        let days = i64::from(sub.days_until_due.unwrap_or(0));
        let due = now + days * DAY;
        sub.invoice_dates = Some((now, due));
        sub.dunning = Some((invoice.to_owned(), 0));
        sub.latest_invoice = Some(invoice.to_owned());
        inner.counter += 1;
        let seq = inner.counter;
        inner.schedule.push(Reverse(Scheduled {
            at: due,
            seq,
            sub: sub.id.clone(),
            generation: sub.generation,
            action: Action::InvoiceDue,
        }));
        inner.subs.insert(sub.id.clone(), sub.clone());
    }

    /// Invoiced: the finalised invoice goes out (`invoice.finalized`).
    fn invoice_sent(&self, inner: &mut Inner, sub: &Sub, invoice: &str) {
        if self.config.noise_events {
            self.emit_noise(inner, "invoice.finalized", sub, invoice);
        }
    }

    #[allow(clippy::unused_self)] // a method for symmetry with the other emitters
    fn schedule(&self, inner: &mut Inner, sub: &str, at: i64, action: Action) {
        let Some(s) = inner.subs.get_mut(sub) else {
            return;
        };
        if !matches!(action, Action::TrialWillEnd) {
            s.generation += 1;
        }
        let generation = s.generation;
        inner.counter += 1;
        let seq = inner.counter;
        inner.schedule.push(Reverse(Scheduled {
            at,
            seq,
            sub: sub.to_owned(),
            generation,
            action,
        }));
    }

    fn schedule_retry(&self, inner: &mut Inner, sub: &Sub) {
        let retries = sub.dunning.as_ref().map_or(0, |d| d.1);
        if let Some(delay) = self.config.retry_delays.get(retries) {
            let at = self.now() + delay.whole_seconds();
            self.schedule(inner, &sub.id, at, Action::Retry);
        } else {
            self.exhausted(inner, sub.clone());
        }
    }

    fn exhausted(&self, inner: &mut Inner, mut sub: Sub) {
        let before = sub.clone();
        sub.dunning = None;
        sub.generation += 1;
        match self.config.after_retries {
            AfterRetries::Unpaid => {
                sub.status = SubscriptionStatus::Unpaid;
                self.update(inner, UPDATED, &sub, &before);
            }
            AfterRetries::Cancel => {
                let now = self.now();
                sub.status = SubscriptionStatus::Canceled;
                sub.canceled_at = Some(now);
                sub.ended_at = Some(now);
                self.update(inner, DELETED, &sub, &before);
            }
        }
        self.sync_of(inner, &sub);
    }

    pub(super) fn run(&self, inner: &mut Inner, mut sub: Sub, action: Action) {
        let now = self.now();
        let card = inner
            .customers
            .get(&sub.customer)
            .copied()
            .unwrap_or_default();
        let period = self.config.period.whole_seconds();
        match action {
            Action::TrialWillEnd => {
                if sub.status == SubscriptionStatus::Trialing {
                    self.emit_sub(inner, "customer.subscription.trial_will_end", &sub, None);
                }
            }
            Action::ExpireIncomplete => {
                if sub.status == SubscriptionStatus::Incomplete {
                    let before = sub.clone();
                    sub.status = SubscriptionStatus::IncompleteExpired;
                    sub.ended_at = Some(now);
                    self.update(inner, UPDATED, &sub, &before);
                }
            }
            Action::CancelAtPeriodEnd => {
                if !sub.status.is_terminal() {
                    let before = sub.clone();
                    sub.status = SubscriptionStatus::Canceled;
                    sub.ended_at = Some(now);
                    self.update(inner, DELETED, &sub, &before);
                    self.sync_of(inner, &sub);
                }
            }
            Action::TrialEnd => {
                if sub.status != SubscriptionStatus::Trialing {
                    return;
                }
                if sub.cancel_at_period_end {
                    self.run(inner, sub, Action::CancelAtPeriodEnd);
                    return;
                }
                let before = sub.clone();
                if card == Card::Missing && sub.days_until_due.is_none() {
                    sub.status = SubscriptionStatus::Paused;
                    self.update(inner, PAUSED, &sub, &before);
                    self.sync_of(inner, &sub);
                    return;
                }
                self.renew(inner, sub, &before, card, period);
            }
            Action::Renew => {
                if !matches!(
                    sub.status,
                    SubscriptionStatus::Active | SubscriptionStatus::PastDue
                ) {
                    return;
                }
                if sub.cancel_at_period_end {
                    self.run(inner, sub, Action::CancelAtPeriodEnd);
                    return;
                }
                let before = sub.clone();
                self.renew(inner, sub, &before, card, period);
            }
            Action::InvoiceDue => {
                // Invoiced: unpaid at its due date, the invoice is overdue
                // and the subscription past due. Stripe sends no payment
                // failure.
                let overdue = sub.status == SubscriptionStatus::Active
                    && sub.dunning.as_ref().map(|d| &d.0) == sub.latest_invoice.as_ref();
                if !overdue {
                    return;
                }
                let before = sub.clone();
                sub.status = SubscriptionStatus::PastDue;
                if self.config.noise_events
                    && let Some(invoice) = sub.latest_invoice.clone()
                {
                    self.emit_noise(inner, "invoice.overdue", &sub, &invoice);
                }
                self.update(inner, UPDATED, &sub, &before);
                self.schedule_retry(inner, &sub);
            }
            Action::Retry => {
                let Some((invoice, retries)) = sub.dunning.clone() else {
                    return;
                };
                if !matches!(sub.status, SubscriptionStatus::PastDue) {
                    return;
                }
                if sub.days_until_due.is_some() {
                    // Invoiced: nothing is charged; the customer may still
                    // pay until the last "retry" gives up.
                    sub.dunning = Some((invoice, retries + 1));
                    inner.subs.insert(sub.id.clone(), sub.clone());
                    self.schedule_retry(inner, &sub);
                } else if card == Card::Works {
                    self.emit_paid_cycle(inner, &sub, &invoice);
                    let before = sub.clone();
                    sub.status = SubscriptionStatus::Active;
                    sub.dunning = None;
                    self.update(inner, UPDATED, &sub, &before);
                    let end = sub.period_end;
                    self.schedule(inner, &sub.id, end.max(now + 1), Action::Renew);
                    self.sync_of(inner, &sub);
                } else {
                    sub.dunning = Some((invoice.clone(), retries + 1));
                    inner.subs.insert(sub.id.clone(), sub.clone());
                    self.emit_failed(inner, &sub, &invoice, SUBSCRIPTION_CYCLE);
                    self.schedule_retry(inner, &sub);
                }
            }
        }
    }

    /// A new period starts now (the renewal or the trial's end) and its
    /// invoice is charged (or not, with paused collection), or, invoiced,
    /// sent to be paid by its due date.
    fn renew(&self, inner: &mut Inner, mut sub: Sub, before: &Sub, card: Card, period: i64) {
        let invoice = next_id(inner, "in");
        sub.period_start = self.now();
        sub.period_end = sub.period_start + period;
        sub.latest_invoice = Some(invoice.clone());
        if sub.status == SubscriptionStatus::Trialing {
            sub.status = SubscriptionStatus::Active;
        }
        if self.config.noise_events {
            self.emit_noise(inner, "invoice.created", &sub, &invoice);
        }
        if sub.pause_collection.is_some() {
            // No payment while collection is paused; the status stays.
            self.update(inner, UPDATED, &sub, before);
            self.schedule(inner, &sub.id, sub.period_end, Action::Renew);
            return;
        }
        if sub.days_until_due.is_some() {
            self.schedule(inner, &sub.id, sub.period_end, Action::Renew);
            self.open_invoice(inner, &mut sub, &invoice);
            self.update(inner, UPDATED, &sub, before);
            self.invoice_sent(inner, &sub, &invoice);
            return;
        }
        if card == Card::Works {
            self.update(inner, UPDATED, &sub, before);
            if self.config.noise_events {
                self.emit_noise(inner, "invoice.finalized", &sub, &invoice);
            }
            self.emit_paid_cycle(inner, &sub, &invoice);
            self.schedule(inner, &sub.id, sub.period_end, Action::Renew);
        } else {
            sub.status = SubscriptionStatus::PastDue;
            sub.dunning = Some((invoice.clone(), 0));
            inner.subs.insert(sub.id.clone(), sub.clone());
            self.emit_failed(inner, &sub, &invoice, SUBSCRIPTION_CYCLE);
            self.update(inner, UPDATED, &sub, before);
            self.schedule_retry(inner, &sub);
        }
        self.sync_of(inner, &sub);
    }
}
