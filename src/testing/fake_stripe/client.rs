//! [`FakeStripe`] answers the [`StripeClient`] trait from its own truth:
//! subscriptions in the pinned API shape, newest first; events kept for 30
//! days, newest first, filterable by type and delivery success. It can be
//! told to rate-limit every n-th request or to fail retrievals.

use std::sync::atomic::Ordering;

use async_trait::async_trait;
use time::Duration;

use super::{DAY, FakeStripe, Logged, Sub, render_subscription};
use crate::client::{
    ClientError, ClientErrorKind, EventListQuery, Page, StripeClient, SubscriptionListQuery,
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
}

#[async_trait]
impl StripeClient for FakeStripe {
    async fn retrieve_subscription(&self, id: &str) -> Result<SubscriptionView, ClientError> {
        self.gate()?;
        if self.lock().fail_retrieve {
            return Err(ClientError::new(
                ClientErrorKind::Transport,
                "connection reset (fake)",
            ));
        }
        self.truth(id).ok_or_else(|| {
            ClientError::new(ClientErrorKind::NotFound, "no such subscription").with_status(404)
        })
    }

    async fn list_subscriptions(
        &self,
        query: &SubscriptionListQuery,
    ) -> Result<Page<SubscriptionView>, ClientError> {
        self.gate()?;
        let limit = if query.limit == 0 {
            100
        } else {
            query.limit.min(100)
        } as usize;
        let inner = self.lock();
        // Newest first, like Stripe.
        let mut subs: Vec<&Sub> = inner
            .subs
            .values()
            .filter(|s| query.customer.as_ref().is_none_or(|c| *c == s.customer))
            .collect();
        subs.sort_by(|a, b| (b.created, &b.id).cmp(&(a.created, &a.id)));
        let start = match &query.starting_after {
            Some(after) => subs
                .iter()
                .position(|s| s.id == *after)
                .map_or(subs.len(), |p| p + 1),
            None => 0,
        };
        let page: Vec<SubscriptionView> = subs
            .iter()
            .skip(start)
            .take(limit)
            .filter_map(|s| {
                SubscriptionView::from_json(
                    &render_subscription(s, self.config.api_shape).to_string(),
                )
                .ok()
            })
            .collect();
        Ok(Page {
            has_more: start + page.len() < subs.len(),
            data: page,
        })
    }

    async fn list_events(&self, query: &EventListQuery) -> Result<Page<Event>, ClientError> {
        self.gate()?;
        let limit = if query.limit == 0 {
            100
        } else {
            query.limit.min(100)
        } as usize;
        let now = self.now();
        let inner = self.lock();
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
        let start = match &query.starting_after {
            Some(after) => matching
                .iter()
                .position(|l| l.event.id() == after)
                .map_or(matching.len(), |p| p + 1),
            None => 0,
        };
        let data: Vec<Event> = matching
            .iter()
            .skip(start)
            .take(limit)
            .map(|l| l.event.clone())
            .collect();
        Ok(Page {
            has_more: start + data.len() < matching.len(),
            data,
        })
    }

    async fn retrieve_event(&self, id: &str) -> Result<Event, ClientError> {
        self.gate()?;
        let now = self.now();
        let inner = self.lock();
        inner
            .by_event
            .get(id)
            .and_then(|&i| inner.log.get(i))
            .filter(|l| l.event.created() >= now - 30 * DAY)
            .map(|l| l.event.clone())
            .ok_or_else(|| {
                ClientError::new(ClientErrorKind::NotFound, "no such event").with_status(404)
            })
    }
}
