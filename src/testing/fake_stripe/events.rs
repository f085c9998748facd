//! The events [`FakeStripe`] emits: webhook bodies in Stripe's shapes
//! (one shape, or a random shape per event for a replay across an API
//! upgrade), with `previous_attributes` on updates, and the entitlement
//! summaries that follow subscription changes.

use serde_json::{Value, json};

use super::{FakeStripe, Inner, Logged, ShapeMix, Sub, api_version, next_id, render_subscription};
use crate::event::{ApiShape, Event, SubscriptionStatus};

impl FakeStripe {
    fn shape(&self, inner: &mut Inner) -> ApiShape {
        match self.config.shapes {
            ShapeMix::Only(s) => s,
            ShapeMix::Mixed => {
                if inner.rng.next_u64().is_multiple_of(2) {
                    ApiShape::PreBasil
                } else {
                    ApiShape::Basil
                }
            }
        }
    }

    fn emit(
        &self,
        inner: &mut Inner,
        event_type: &str,
        shape: ApiShape,
        object: Value,
        previous: Option<Value>,
    ) {
        let id = next_id(inner, "evt");
        let mut data = serde_json::Map::new();
        data.insert("object".into(), object);
        let mut data = Value::Object(data);
        if let Some(p) = previous.filter(|p| p.as_object().is_some_and(|o| !o.is_empty())) {
            data["previous_attributes"] = p;
        }
        let mut body = json!({
            "id": id,
            "object": "event",
            "api_version": api_version(shape),
            "created": self.now(),
            "data": data,
            "livemode": false,
            "pending_webhooks": 1,
            "request": { "id": null, "idempotency_key": null },
            "type": event_type,
        });
        if let Some(account) = &self.account {
            body["account"] = json!(account);
        }
        let body = body.to_string();
        // The body is built here from valid JSON, so it always parses.
        if let Ok(event) = Event::parse_unverified_with_limit(body.as_bytes(), usize::MAX) {
            let index = inner.log.len();
            inner.by_event.insert(event.id().to_owned(), index);
            inner.log.push(Logged {
                event,
                body,
                emitted_at: self.real_now(),
                delivered: false,
            });
        }
    }

    pub(super) fn emit_sub(
        &self,
        inner: &mut Inner,
        event_type: &str,
        sub: &Sub,
        before: Option<&Sub>,
    ) {
        let shape = self.shape(inner);
        let object = render_subscription(sub, shape);
        let previous = before.map(|b| previous_attributes(&render_subscription(b, shape), &object));
        self.emit(inner, event_type, shape, object, previous);
    }

    /// A successful payment: `invoice.paid` then `invoice.payment_succeeded`,
    /// in the same second, as Stripe sends them.
    pub(super) fn emit_paid(
        &self,
        inner: &mut Inner,
        sub: &Sub,
        invoice: &str,
        reason: &str,
        period: (i64, i64),
    ) {
        self.emit_invoice(inner, "invoice.paid", sub, invoice, true, reason, period);
        self.emit_invoice(
            inner,
            "invoice.payment_succeeded",
            sub,
            invoice,
            true,
            reason,
            period,
        );
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn emit_invoice(
        &self,
        inner: &mut Inner,
        event_type: &str,
        sub: &Sub,
        invoice: &str,
        paid: bool,
        reason: &str,
        period: (i64, i64),
    ) {
        let shape = self.shape(inner);
        let now = self.now();
        let mut object = render_invoice(sub, invoice, paid, reason, period, now, shape);
        // A failed charge in a dunning cycle: Stripe says when it retries
        // (null once it has given up).
        if !paid
            && sub.days_until_due.is_none()
            && let Some((_, retries)) = &sub.dunning
        {
            object["next_payment_attempt"] = json!(
                self.config
                    .retry_delays
                    .get(*retries)
                    .map(|d| now + d.whole_seconds())
            );
        }
        self.emit(inner, event_type, shape, object, None);
    }

    pub(super) fn emit_noise(&self, inner: &mut Inner, event_type: &str, sub: &Sub, invoice: &str) {
        let shape = self.shape(inner);
        let mut object = render_invoice(
            sub,
            invoice,
            false,
            "subscription_cycle",
            (sub.period_start, sub.period_end),
            self.now(),
            shape,
        );
        object["status"] = json!(if event_type == "invoice.created" {
            "draft"
        } else {
            "open"
        });
        self.emit(inner, event_type, shape, object, None);
    }

    pub(super) fn emit_checkout(
        &self,
        inner: &mut Inner,
        session: &str,
        sub: &Sub,
        reference: Option<&str>,
        payment_status: &str,
    ) {
        let shape = self.shape(inner);
        let object = json!({
            "id": session,
            "object": "checkout.session",
            "client_reference_id": reference,
            "customer": sub.customer,
            "subscription": sub.id,
            "mode": "subscription",
            "status": "complete",
            "payment_status": payment_status,
            "created": self.now(),
            "livemode": false,
        });
        self.emit(inner, "checkout.session.completed", shape, object, None);
    }

    pub(super) fn sync_entitlements(&self, inner: &mut Inner, customer: &str) {
        if self.config.features.is_empty() {
            return;
        }
        let mut keys: Vec<String> = inner
            .subs
            .values()
            .filter(|s| s.customer == customer)
            .filter(|s| {
                matches!(
                    s.status,
                    SubscriptionStatus::Active
                        | SubscriptionStatus::Trialing
                        | SubscriptionStatus::PastDue
                )
            })
            .flat_map(|s| {
                self.config
                    .features
                    .get(&s.price)
                    .cloned()
                    .unwrap_or_default()
            })
            .collect();
        keys.sort();
        keys.dedup();
        if inner.entitlements.get(customer) == Some(&keys) {
            return;
        }
        inner.entitlements.insert(customer.to_owned(), keys.clone());
        let shape = self.shape(inner);
        let shown = self.config.entitlement_summary_limit.unwrap_or(usize::MAX);
        let data: Vec<Value> = keys
            .iter()
            .take(shown)
            .map(|k| json!({"id": format!("ent_{k}"), "object": "entitlements.active_entitlement", "feature": format!("feat_{k}"), "lookup_key": k, "livemode": false}))
            .collect();
        let object = json!({
            "object": "entitlements.active_entitlement_summary",
            "customer": customer,
            "livemode": false,
            "entitlements": {"object": "list", "data": data, "has_more": keys.len() > shown, "url": "/v1/customer/entitlements"},
        });
        self.emit(
            inner,
            "entitlements.active_entitlement_summary.updated",
            shape,
            object,
            None,
        );
    }
}

fn render_invoice(
    s: &Sub,
    invoice: &str,
    paid: bool,
    reason: &str,
    period: (i64, i64),
    now: i64,
    shape: ApiShape,
) -> Value {
    let status = if paid { "paid" } else { "open" };
    let mut object = match shape {
        ApiShape::PreBasil => json!({
            "id": invoice, "object": "invoice", "customer": s.customer, "subscription": s.id,
            "status": status, "paid": paid, "billing_reason": reason, "created": now,
            "amount_paid": if paid { 2000 } else { 0 },
            "lines": {"object": "list", "data": [{
                "id": format!("il_{invoice}"), "object": "line_item", "type": "subscription",
                "subscription": s.id, "period": {"start": period.0, "end": period.1}}]},
        }),
        ApiShape::Basil => json!({
            "id": invoice, "object": "invoice", "customer": s.customer, "subscription": null,
            "parent": {"type": "subscription_details", "subscription_details": {"subscription": s.id}},
            "status": status, "billing_reason": reason, "created": now,
            "amount_paid": if paid { 2000 } else { 0 },
            "lines": {"object": "list", "data": [{
                "id": format!("il_{invoice}"), "object": "line_item",
                "parent": {"type": "subscription_item_details",
                    "subscription_item_details": {"subscription": s.id, "subscription_item": s.item_id}},
                "period": {"start": period.0, "end": period.1}}]},
        }),
    };
    let (finalized, due) = s.invoice_dates.unzip();
    object["collection_method"] = json!(if s.days_until_due.is_some() {
        "send_invoice"
    } else {
        "charge_automatically"
    });
    object["due_date"] = json!(due);
    object["test_clock"] = json!(s.test_clock);
    object["next_payment_attempt"] = Value::Null;
    object["status_transitions"] = json!({
        "finalized_at": finalized.unwrap_or(now),
        "paid_at": if paid { Some(now) } else { None },
    });
    object
}

/// The top-level fields of `before` that differ from `after` (Stripe's
/// `previous_attributes`).
fn previous_attributes(before: &Value, after: &Value) -> Value {
    let (Some(b), Some(a)) = (before.as_object(), after.as_object()) else {
        return json!({});
    };
    let diff: serde_json::Map<String, Value> = b
        .iter()
        .filter(|(k, v)| a.get(*k) != Some(*v))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    Value::Object(diff)
}
