//! The subscription lifecycle of [`FakeStripe`]: the moves a customer or an
//! operator makes, and the actions Stripe schedules and runs on its own
//! (renewals, trial ends, payment retries, expiry of incomplete
//! subscriptions, cancellation at the period's end). Each move changes the
//! true state first, then emits the events Stripe would, in Stripe's order.

use std::cmp::Reverse;

use super::{
    Action, AfterRetries, Card, DAY, FakeStripe, HOUR, Inner, Scheduled, Sub, Subscribe, next_id,
};
use crate::event::SubscriptionStatus;

impl FakeStripe {
    /// Subscribes a customer. Payment follows the customer's card: works →
    /// active; declines → incomplete (expires after 23 hours); with a trial
    /// the card is charged at the trial's end.
    pub fn subscribe(&self, customer: &str, opts: &Subscribe) -> String {
        let now = self.now();
        let mut inner = self.lock();
        let card = inner.customers.get(customer).copied().unwrap_or_default();
        let id = next_id(&mut inner, "sub");
        let item_id = next_id(&mut inner, "si");
        let period = self.config.period.whole_seconds();
        let mut sub = Sub {
            id: id.clone(),
            customer: customer.to_owned(),
            price: opts.price.clone(),
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
                inner.subs.insert(id.clone(), sub.clone());
                self.emit_sub(
                    &mut inner,
                    "customer.subscription.updated",
                    &sub,
                    Some(&before),
                );
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
                self.emit_invoice(
                    &mut inner,
                    "invoice.payment_failed",
                    &sub,
                    &invoice,
                    false,
                    "subscription_create",
                    (now, sub.period_end),
                );
                self.schedule(&mut inner, &id, now + 23 * HOUR, Action::ExpireIncomplete);
            }
        }
        self.sync_entitlements(&mut inner, customer);
        id
    }

    /// The customer pays the open invoice now (after updating their card):
    /// a past-due, unpaid or incomplete subscription becomes active.
    pub fn pay_open_invoice(&self, sub_id: &str) {
        let now = self.now();
        let mut inner = self.lock();
        let Some(mut sub) = inner.subs.get(sub_id).cloned() else {
            return;
        };
        if !matches!(
            sub.status,
            SubscriptionStatus::PastDue
                | SubscriptionStatus::Unpaid
                | SubscriptionStatus::Incomplete
        ) {
            return;
        }
        inner.customers.insert(sub.customer.clone(), Card::Works);
        let invoice = sub
            .latest_invoice
            .clone()
            .unwrap_or_else(|| next_id(&mut inner, "in"));
        self.emit_paid(
            &mut inner,
            &sub,
            &invoice,
            "subscription_cycle",
            (sub.period_start, sub.period_end),
        );
        let before = sub.clone();
        sub.status = SubscriptionStatus::Active;
        sub.dunning = None;
        sub.generation += 1;
        inner.subs.insert(sub.id.clone(), sub.clone());
        self.emit_sub(
            &mut inner,
            "customer.subscription.updated",
            &sub,
            Some(&before),
        );
        let end = sub.period_end.max(now + 1);
        self.schedule(&mut inner, sub_id, end, Action::Renew);
        let customer = sub.customer.clone();
        self.sync_entitlements(&mut inner, &customer);
    }

    /// Cancels now.
    pub fn cancel_now(&self, sub_id: &str) {
        let now = self.now();
        let mut inner = self.lock();
        let Some(mut sub) = inner.subs.get(sub_id).cloned() else {
            return;
        };
        if sub.status.is_terminal() {
            return;
        }
        let before = sub.clone();
        sub.status = SubscriptionStatus::Canceled;
        sub.canceled_at = Some(now);
        sub.ended_at = Some(now);
        sub.generation += 1;
        inner.subs.insert(sub.id.clone(), sub.clone());
        self.emit_sub(
            &mut inner,
            "customer.subscription.deleted",
            &sub,
            Some(&before),
        );
        let customer = sub.customer.clone();
        self.sync_entitlements(&mut inner, &customer);
    }

    /// Sets or clears `cancel_at_period_end`.
    pub fn cancel_at_period_end(&self, sub_id: &str, cancel: bool) {
        let now = self.now();
        let mut inner = self.lock();
        let Some(mut sub) = inner.subs.get(sub_id).cloned() else {
            return;
        };
        if sub.status.is_terminal() || sub.cancel_at_period_end == cancel {
            return;
        }
        let before = sub.clone();
        sub.cancel_at_period_end = cancel;
        sub.cancel_at = cancel.then_some(sub.period_end);
        sub.canceled_at = cancel.then_some(now);
        sub.generation += 1;
        inner.subs.insert(sub.id.clone(), sub.clone());
        self.emit_sub(
            &mut inner,
            "customer.subscription.updated",
            &sub,
            Some(&before),
        );
        let (at, action) = if cancel {
            (sub.period_end, Action::CancelAtPeriodEnd)
        } else {
            (sub.period_end, Action::Renew)
        };
        if matches!(sub.status, SubscriptionStatus::Trialing) && !cancel {
            self.schedule(&mut inner, sub_id, at, Action::TrialEnd);
        } else {
            self.schedule(&mut inner, sub_id, at, action);
        }
    }

    /// Pauses the subscription (status `paused`, `customer.subscription.paused`).
    pub fn pause(&self, sub_id: &str) {
        let mut inner = self.lock();
        let Some(mut sub) = inner.subs.get(sub_id).cloned() else {
            return;
        };
        if !matches!(
            sub.status,
            SubscriptionStatus::Active | SubscriptionStatus::Trialing | SubscriptionStatus::PastDue
        ) {
            return;
        }
        let before = sub.clone();
        sub.status = SubscriptionStatus::Paused;
        sub.dunning = None;
        sub.generation += 1;
        inner.subs.insert(sub.id.clone(), sub.clone());
        self.emit_sub(
            &mut inner,
            "customer.subscription.paused",
            &sub,
            Some(&before),
        );
        let customer = sub.customer.clone();
        self.sync_entitlements(&mut inner, &customer);
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
                "subscription_cycle",
                (now, sub.period_end),
            );
            self.emit_sub(
                &mut inner,
                "customer.subscription.resumed",
                &sub,
                Some(&before),
            );
            self.schedule(&mut inner, sub_id, sub.period_end, Action::Renew);
        } else {
            sub.status = SubscriptionStatus::PastDue;
            sub.dunning = Some((invoice.clone(), 0));
            inner.subs.insert(sub.id.clone(), sub.clone());
            self.emit_invoice(
                &mut inner,
                "invoice.payment_failed",
                &sub,
                &invoice,
                false,
                "subscription_cycle",
                (now, sub.period_end),
            );
            self.emit_sub(
                &mut inner,
                "customer.subscription.resumed",
                &sub,
                Some(&before),
            );
            self.schedule_retry(&mut inner, &sub);
        }
        let customer = sub.customer.clone();
        self.sync_entitlements(&mut inner, &customer);
    }

    /// Sets (`Some(behavior)`) or clears `pause_collection`; the status is
    /// unchanged and renewals go unpaid while it is set.
    pub fn pause_collection(&self, sub_id: &str, behavior: Option<&str>) {
        let mut inner = self.lock();
        let Some(mut sub) = inner.subs.get(sub_id).cloned() else {
            return;
        };
        if sub.status.is_terminal() {
            return;
        }
        let before = sub.clone();
        sub.pause_collection = behavior.map(str::to_owned);
        inner.subs.insert(sub.id.clone(), sub.clone());
        self.emit_sub(
            &mut inner,
            "customer.subscription.updated",
            &sub,
            Some(&before),
        );
    }

    /// Puts an active subscription on a trial until `days` from now.
    pub fn set_trial(&self, sub_id: &str, days: u32) {
        let now = self.now();
        let mut inner = self.lock();
        let Some(mut sub) = inner.subs.get(sub_id).cloned() else {
            return;
        };
        if sub.status != SubscriptionStatus::Active {
            return;
        }
        let before = sub.clone();
        let end = now + i64::from(days) * DAY;
        sub.status = SubscriptionStatus::Trialing;
        sub.trial_start = Some(now);
        sub.trial_end = Some(end);
        sub.period_start = now;
        sub.period_end = end;
        sub.generation += 1;
        inner.subs.insert(sub.id.clone(), sub.clone());
        self.emit_sub(
            &mut inner,
            "customer.subscription.updated",
            &sub,
            Some(&before),
        );
        self.schedule(&mut inner, sub_id, end, Action::TrialEnd);
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
                inner.subs.insert(sub.id.clone(), sub.clone());
                self.emit_sub(inner, "customer.subscription.updated", &sub, Some(&before));
            }
            AfterRetries::Cancel => {
                let now = self.now();
                sub.status = SubscriptionStatus::Canceled;
                sub.canceled_at = Some(now);
                sub.ended_at = Some(now);
                inner.subs.insert(sub.id.clone(), sub.clone());
                self.emit_sub(inner, "customer.subscription.deleted", &sub, Some(&before));
            }
        }
        let customer = sub.customer.clone();
        self.sync_entitlements(inner, &customer);
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
                    inner.subs.insert(sub.id.clone(), sub.clone());
                    self.emit_sub(inner, "customer.subscription.updated", &sub, Some(&before));
                }
            }
            Action::CancelAtPeriodEnd => {
                if !sub.status.is_terminal() {
                    let before = sub.clone();
                    sub.status = SubscriptionStatus::Canceled;
                    sub.ended_at = Some(now);
                    inner.subs.insert(sub.id.clone(), sub.clone());
                    self.emit_sub(inner, "customer.subscription.deleted", &sub, Some(&before));
                    let customer = sub.customer.clone();
                    self.sync_entitlements(inner, &customer);
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
                if card == Card::Missing {
                    sub.status = SubscriptionStatus::Paused;
                    inner.subs.insert(sub.id.clone(), sub.clone());
                    self.emit_sub(inner, "customer.subscription.paused", &sub, Some(&before));
                    let customer = sub.customer.clone();
                    self.sync_entitlements(inner, &customer);
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
            Action::Retry => {
                let Some((invoice, retries)) = sub.dunning.clone() else {
                    return;
                };
                if !matches!(sub.status, SubscriptionStatus::PastDue) {
                    return;
                }
                if card == Card::Works {
                    self.emit_paid(
                        inner,
                        &sub,
                        &invoice,
                        "subscription_cycle",
                        (sub.period_start, sub.period_end),
                    );
                    let before = sub.clone();
                    sub.status = SubscriptionStatus::Active;
                    sub.dunning = None;
                    inner.subs.insert(sub.id.clone(), sub.clone());
                    self.emit_sub(inner, "customer.subscription.updated", &sub, Some(&before));
                    let end = sub.period_end;
                    self.schedule(inner, &sub.id, end.max(now + 1), Action::Renew);
                    let customer = sub.customer.clone();
                    self.sync_entitlements(inner, &customer);
                } else {
                    sub.dunning = Some((invoice.clone(), retries + 1));
                    inner.subs.insert(sub.id.clone(), sub.clone());
                    self.emit_invoice(
                        inner,
                        "invoice.payment_failed",
                        &sub,
                        &invoice,
                        false,
                        "subscription_cycle",
                        (sub.period_start, sub.period_end),
                    );
                    self.schedule_retry(inner, &sub);
                }
            }
        }
    }

    /// A new period starts now (the renewal or the trial's end) and its
    /// invoice is charged (or not, with paused collection).
    fn renew(&self, inner: &mut Inner, mut sub: Sub, before: &Sub, card: Card, period: i64) {
        let now = self.now();
        let invoice = next_id(inner, "in");
        sub.period_start = now;
        sub.period_end = now + period;
        sub.latest_invoice = Some(invoice.clone());
        if sub.status == SubscriptionStatus::Trialing {
            sub.status = SubscriptionStatus::Active;
        }
        if self.config.noise_events {
            self.emit_noise(inner, "invoice.created", &sub, &invoice);
        }
        if sub.pause_collection.is_some() {
            // No payment while collection is paused; the status stays.
            inner.subs.insert(sub.id.clone(), sub.clone());
            self.emit_sub(inner, "customer.subscription.updated", &sub, Some(before));
            self.schedule(inner, &sub.id, sub.period_end, Action::Renew);
            return;
        }
        if card == Card::Works {
            inner.subs.insert(sub.id.clone(), sub.clone());
            self.emit_sub(inner, "customer.subscription.updated", &sub, Some(before));
            if self.config.noise_events {
                self.emit_noise(inner, "invoice.finalized", &sub, &invoice);
            }
            self.emit_paid(
                inner,
                &sub,
                &invoice,
                "subscription_cycle",
                (sub.period_start, sub.period_end),
            );
            self.schedule(inner, &sub.id, sub.period_end, Action::Renew);
        } else {
            sub.status = SubscriptionStatus::PastDue;
            sub.dunning = Some((invoice.clone(), 0));
            inner.subs.insert(sub.id.clone(), sub.clone());
            self.emit_invoice(
                inner,
                "invoice.payment_failed",
                &sub,
                &invoice,
                false,
                "subscription_cycle",
                (sub.period_start, sub.period_end),
            );
            self.emit_sub(inner, "customer.subscription.updated", &sub, Some(before));
            self.schedule_retry(inner, &sub);
        }
        let customer = sub.customer.clone();
        self.sync_entitlements(inner, &customer);
    }
}
