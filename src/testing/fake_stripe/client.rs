//! [`FakeStripe`] answers the [`StripeClient`] trait from its own truth:
//! subscriptions in the pinned API shape, newest first; events kept for 30
//! days, newest first, filterable by type and delivery success; a
//! customer's active entitlements. A call naming a connected account is
//! answered from that account's fake. Every answer is dated with the fake's
//! real clock (Stripe's `Date` header, never a test clock's simulated time).
//! Subscriptions are answered with their test clock expanded (as
//! `expand[]=test_clock` asks), so its `frozen_time` is the simulated time.
//! It can be told to rate-limit every n-th request or to fail retrievals.

use std::sync::atomic::Ordering;

use async_trait::async_trait;
use time::{Duration, OffsetDateTime};

use super::{DAY, FakeStripe, Logged, Sub, render_subscription};
use crate::client::{
    ActiveEntitlement, ClientError, ClientErrorKind, EntitlementListQuery, EventListQuery, Page,
    Response, StripeClient, SubscriptionListQuery,
};
use crate::event::{Event, SubscriptionView};

impl FakeStripe {
    fn gate(&self) -> Result<(), ClientError> {
        let n = self.requests.fetch_add(1, Ordering::Relaxed) + 1;
        let every = self.lock().rate_limit_every;
        if every > 0 && n.is_multiple_of(every) {
            self.rate_limited.fetch_add(1, Ordering::Relaxed);
            return Err(
                ClientError::new(ClientErrorKind::RateLimited, "rate limited (fake)")
                    .with_status(429)
                    .with_retry_after(Duration::seconds(1)),
            );
        }
        Ok(())
    }

    /// An answer dated now by the fake's real clock (a test clock does not
    /// move Stripe's `Date`), at the header's one-second resolution.
    fn dated<T>(&self, data: T) -> Response<T> {
        Response::new(data).with_date(OffsetDateTime::from_unix_timestamp(self.real_now()).ok())
    }

    /// A subscription as the API answers it, its test clock expanded.
    fn render(&self, s: &Sub) -> Option<SubscriptionView> {
        let mut object = render_subscription(s, self.config.api_shape);
        if let Some(clock) = &s.test_clock {
            object["test_clock"] = serde_json::json!({
                "id": clock, "object": "test_helpers.test_clock", "livemode": false,
                "frozen_time": self.now(), "status": "ready",
            });
        }
        SubscriptionView::from_json(&object.to_string()).ok()
    }
}

/// One page of `items` (already in Stripe's order): after the item whose id
/// is `starting_after` (none left when that id is unknown), at most `limit`
/// (0 means 100, at most 100).
fn page_of<T: Clone, U>(
    items: &[T],
    id: impl Fn(&T) -> &str,
    starting_after: Option<&str>,
    limit: u32,
    render: impl Fn(&T) -> Option<U>,
) -> Page<U> {
    let limit = if limit == 0 { 100 } else { limit.min(100) } as usize;
    let start = match starting_after {
        Some(after) => items
            .iter()
            .position(|x| id(x) == after)
            .map_or(items.len(), |p| p + 1),
        None => 0,
    };
    let taken = &items[start..(start + limit).min(items.len())];
    Page {
        has_more: start + taken.len() < items.len(),
        data: taken.iter().filter_map(render).collect(),
    }
}

#[async_trait]
impl StripeClient for FakeStripe {
    async fn retrieve_subscription(
        &self,
        account: Option<&str>,
        id: &str,
    ) -> Result<Response<SubscriptionView>, ClientError> {
        self.gate()?;
        if self.lock().fail_retrieve {
            return Err(ClientError::new(
                ClientErrorKind::Transport,
                "connection reset (fake)",
            ));
        }
        let scope = self.scope(account)?;
        let sub = scope.lock().subs.get(id).cloned();
        let view = sub.and_then(|s| scope.render(&s)).ok_or_else(|| {
            ClientError::new(ClientErrorKind::NotFound, "no such subscription").with_status(404)
        })?;
        Ok(self.dated(view))
    }

    async fn list_subscriptions(
        &self,
        account: Option<&str>,
        query: &SubscriptionListQuery,
    ) -> Result<Response<Page<SubscriptionView>>, ClientError> {
        self.gate()?;
        let scope = self.scope(account)?;
        let inner = scope.lock();
        // Newest first, like Stripe.
        let mut subs: Vec<&Sub> = inner
            .subs
            .values()
            .filter(|s| query.customer.as_ref().is_none_or(|c| *c == s.customer))
            .collect();
        subs.sort_by(|a, b| (b.created, &b.id).cmp(&(a.created, &a.id)));
        let page = page_of(
            &subs,
            |s| &s.id,
            query.starting_after.as_deref(),
            query.limit,
            |s| scope.render(s),
        );
        Ok(self.dated(page))
    }

    async fn list_events(
        &self,
        account: Option<&str>,
        query: &EventListQuery,
    ) -> Result<Response<Page<Event>>, ClientError> {
        self.gate()?;
        let now = self.now();
        let scope = self.scope(account)?;
        let inner = scope.lock();
        // Stripe keeps events for 30 days and lists them newest first.
        let matching: Vec<&Logged> = inner
            .log
            .iter()
            .rev()
            .filter(|l| l.event.created() >= now - 30 * DAY)
            .filter(|l| query.created_gte.is_none_or(|g| l.event.created() >= g))
            .filter(|l| {
                query.types.is_empty()
                    || query
                        .types
                        .iter()
                        .any(|t| t == l.event.event_type().as_str())
            })
            .filter(|l| query.delivery_success.is_none_or(|d| l.delivered == d))
            .collect();
        let page = page_of(
            &matching,
            |l| l.event.id(),
            query.starting_after.as_deref(),
            query.limit,
            |l| Some(l.event.clone()),
        );
        Ok(self.dated(page))
    }

    async fn retrieve_event(
        &self,
        account: Option<&str>,
        id: &str,
    ) -> Result<Response<Event>, ClientError> {
        self.gate()?;
        let now = self.now();
        let scope = self.scope(account)?;
        let inner = scope.lock();
        let event = inner
            .by_event
            .get(id)
            .and_then(|&i| inner.log.get(i))
            .filter(|l| l.event.created() >= now - 30 * DAY)
            .map(|l| l.event.clone())
            .ok_or_else(|| {
                ClientError::new(ClientErrorKind::NotFound, "no such event").with_status(404)
            })?;
        Ok(self.dated(event))
    }

    async fn list_active_entitlements(
        &self,
        account: Option<&str>,
        query: &EntitlementListQuery,
    ) -> Result<Response<Page<ActiveEntitlement>>, ClientError> {
        self.gate()?;
        let scope = self.scope(account)?;
        let keys = scope.entitlements(&query.customer);
        let page = page_of(
            &keys,
            String::as_str,
            query
                .starting_after
                .as_deref()
                .map(|a| a.strip_prefix("ent_").unwrap_or(a)),
            query.limit,
            |k| {
                Some(ActiveEntitlement {
                    id: format!("ent_{k}"),
                    lookup_key: k.clone(),
                })
            },
        );
        Ok(self.dated(page))
    }
}
