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
        let mut guard = scope.lock();
        let inner = &mut *guard;
        // Newest first, like Stripe: `(created, id)` descending, kept sorted
        // in `sub_order` (rebuilt only when a subscription was added, as
        // none is ever removed and `created` never changes), so a page costs
        // a binary search and the page's items, not a sort of them all.
        if inner.sub_order.len() != inner.subs.len() {
            let mut order: Vec<(i64, String)> = inner
                .subs
                .values()
                .map(|s| (s.created, s.id.clone()))
                .collect();
            order.sort_unstable_by(|a, b| b.cmp(a));
            inner.sub_order = order;
        }
        let wanted = |s: &Sub| query.customer.as_ref().is_none_or(|c| *c == s.customer);
        let order = &inner.sub_order;
        // After the item whose id is `starting_after` (none left when that
        // id is unknown or not in the filtered list).
        let start = match query.starting_after.as_deref() {
            None => 0,
            Some(after) => inner
                .subs
                .get(after)
                .filter(|s| wanted(s))
                .and_then(|s| {
                    order
                        .binary_search_by(|(c, id)| (s.created, after).cmp(&(*c, id.as_str())))
                        .ok()
                })
                .map_or(order.len(), |p| p + 1),
        };
        let limit = if query.limit == 0 {
            100
        } else {
            query.limit.min(100)
        } as usize;
        let mut rest = order[start..]
            .iter()
            .filter_map(|(_, id)| inner.subs.get(id))
            .filter(|s| wanted(s));
        let taken: Vec<&Sub> = rest.by_ref().take(limit).collect();
        let page = Page {
            has_more: rest.next().is_some(),
            data: taken.into_iter().filter_map(|s| scope.render(s)).collect(),
        };
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use crate::testing::{FakeConfig, Subscribe};

    /// Every id of a listing, page by page (`limit` per page).
    async fn all_pages(fake: &FakeStripe, customer: Option<&str>, limit: u32) -> Vec<String> {
        let mut query = SubscriptionListQuery {
            customer: customer.map(str::to_owned),
            starting_after: None,
            limit,
        };
        let mut ids = Vec::new();
        loop {
            let page = fake.list_subscriptions(None, &query).await.unwrap().data;
            assert!(page.data.len() <= limit as usize);
            ids.extend(page.data.iter().map(|s| s.id.clone().unwrap()));
            if !page.has_more {
                return ids;
            }
            query.starting_after = ids.last().cloned();
        }
    }

    /// Listing subscriptions pages through each exactly once in Stripe's
    /// order (newest `created` first, ties by id descending), with and
    /// without a customer filter, and again after more were added; a cursor
    /// that is unknown (or another customer's) gives an empty last page.
    #[tokio::test]
    async fn subscription_pages_follow_stripes_order() {
        let clock = ManualClock::at_unix(1_700_000_000);
        let fake = FakeStripe::new(clock.clone(), FakeConfig::default());
        let a = fake.create_customer();
        let b = fake.create_customer();
        let expected = |customer: Option<&str>| {
            let inner = fake.lock();
            let mut subs: Vec<&Sub> = inner
                .subs
                .values()
                .filter(|s| customer.is_none_or(|c| c == s.customer))
                .collect();
            subs.sort_by(|x, y| (y.created, &y.id).cmp(&(x.created, &x.id)));
            subs.iter().map(|s| s.id.clone()).collect::<Vec<_>>()
        };
        for round in 0..2 {
            for i in 0..7 {
                fake.subscribe(if i % 2 == 0 { &a } else { &b }, &Subscribe::default());
                if i % 3 == 0 {
                    clock.advance(Duration::seconds(1));
                }
            }
            let all = expected(None);
            assert_eq!(all.len(), 7 * (round + 1));
            for limit in [1, 2, 3, 100] {
                assert_eq!(all_pages(&fake, None, limit).await, all);
                assert_eq!(all_pages(&fake, Some(&a), limit).await, expected(Some(&a)));
                assert_eq!(all_pages(&fake, Some(&b), limit).await, expected(Some(&b)));
            }
        }
        let other = expected(Some(&b))[0].clone();
        for (customer, after) in [(None, "sub_unknown".to_owned()), (Some(a.clone()), other)] {
            let query = SubscriptionListQuery {
                customer,
                starting_after: Some(after),
                limit: 10,
            };
            let page = fake.list_subscriptions(None, &query).await.unwrap().data;
            assert!(page.data.is_empty() && !page.has_more);
        }
    }
}
