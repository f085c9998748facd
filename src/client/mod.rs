//! The narrow slice of the Stripe API this crate needs, as a trait.
//!
//! [`StripeClient`] is implemented by `HttpStripeClient` (feature `reqwest`)
//! and by `FakeStripe` (feature `test-util`); an application may implement it
//! over its own HTTP stack. Errors are opaque [`ClientError`]s with a
//! [`kind`](ClientError::kind), and carry what the server said about
//! retrying (`Retry-After`, `Stripe-Should-Retry`).
//!
//! # Accounts and server time
//!
//! Every call names the account it concerns: `None` for the platform's own
//! objects, `Some("acct_…")` for a Connect account's, which the HTTP client
//! sends as the `Stripe-Account` header (the platform's key acting on the
//! connected account). Every answer is a [`Response`]: the data plus the
//! time the server stamped on it (its `Date` header), so records refreshed
//! from Stripe are stamped with Stripe's clock rather than the host's, which
//! may run ahead and would then make newer events look stale.
//!
//! Exactly one layer retries: [`RequestBudget`], a [`StripeClient`] wrapper
//! that also paces requests and bounds how many are in flight. The clients
//! themselves make one request per call, so wrap them in a budget to get
//! retries.

use std::fmt;

use async_trait::async_trait;
use serde::Deserialize;
use time::{Duration, OffsetDateTime};

use crate::event::{Event, SubscriptionView};

mod budget;
#[cfg(any(test, feature = "test-util"))]
mod stub;

#[cfg(feature = "reqwest")]
#[cfg_attr(docsrs, doc(cfg(feature = "reqwest")))]
pub mod http;

pub use budget::{BudgetConfig, RequestBudget};
#[cfg(any(test, feature = "test-util"))]
#[cfg_attr(docsrs, doc(cfg(feature = "test-util")))]
pub use stub::{StubCall, StubClient, StubMethod};

/// What kind of API failure happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ClientErrorKind {
    /// 404: no such object (in this mode and account).
    NotFound,
    /// 429: slow down.
    RateLimited,
    /// 401/403: the key is wrong or lacks permission.
    Unauthorized,
    /// The request never got an answer (connection, TLS, DNS, timeout).
    Transport,
    /// Any other API error (4xx/5xx); see [`ClientError::status`].
    Api,
    /// The answer could not be read.
    InvalidResponse,
}

impl ClientErrorKind {
    /// `snake_case` name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NotFound => "not_found",
            Self::RateLimited => "rate_limited",
            Self::Unauthorized => "unauthorized",
            Self::Transport => "transport",
            Self::Api => "api",
            Self::InvalidResponse => "invalid_response",
        }
    }
}

impl fmt::Display for ClientErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An opaque API error: never contains the secret key.
#[derive(Debug, thiserror::Error)]
#[error("Stripe API error ({kind}{}): {message}", status.map(|s| format!(", HTTP {s}")).unwrap_or_default())]
pub struct ClientError {
    kind: ClientErrorKind,
    status: Option<u16>,
    message: String,
    retry_after: Option<Duration>,
    should_retry: Option<bool>,
    #[source]
    source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

impl ClientError {
    /// An error of `kind`.
    pub fn new(kind: ClientErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            status: None,
            message: message.into(),
            retry_after: None,
            should_retry: None,
            source: None,
        }
    }

    /// With the HTTP status.
    #[must_use]
    pub fn with_status(mut self, status: u16) -> Self {
        self.status = Some(status);
        self
    }

    /// With the server's `Retry-After`.
    #[must_use]
    pub fn with_retry_after(mut self, retry_after: Duration) -> Self {
        self.retry_after = Some(retry_after);
        self
    }

    /// With Stripe's `Stripe-Should-Retry` header.
    #[must_use]
    pub fn with_should_retry(mut self, should_retry: bool) -> Self {
        self.should_retry = Some(should_retry);
        self
    }

    /// With the underlying error.
    #[must_use]
    pub fn with_source(mut self, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        self.source = Some(Box::new(source));
        self
    }

    /// The kind.
    pub fn kind(&self) -> ClientErrorKind {
        self.kind
    }

    /// The HTTP status, when there was one.
    pub fn status(&self) -> Option<u16> {
        self.status
    }

    /// How long the server asked to wait before another attempt (its
    /// `Retry-After` header, in seconds), when it said so. [`RequestBudget`]
    /// waits at least this long (up to [`RequestBudget::MAX_RETRY_AFTER`])
    /// before retrying.
    pub fn retry_after(&self) -> Option<Duration> {
        self.retry_after
    }

    /// Whether another attempt may succeed: Stripe's `Stripe-Should-Retry`
    /// when it sent one (`false` is never retried, `true` always may be),
    /// else rate limits, transport failures, 409 and 5xx.
    ///
    /// ```
    /// use stripe_webhook_guard::client::{ClientError, ClientErrorKind};
    /// let unavailable = ClientError::new(ClientErrorKind::Api, "x").with_status(503);
    /// assert!(unavailable.is_retryable());
    /// assert!(!unavailable.with_should_retry(false).is_retryable());
    /// let lock_timeout = ClientError::new(ClientErrorKind::Api, "x").with_status(400);
    /// assert!(!lock_timeout.is_retryable());
    /// assert!(lock_timeout.with_should_retry(true).is_retryable());
    /// ```
    pub fn is_retryable(&self) -> bool {
        if let Some(s) = self.should_retry {
            return s;
        }
        match self.kind {
            ClientErrorKind::RateLimited | ClientErrorKind::Transport => true,
            ClientErrorKind::Api => self.status.is_none_or(|s| s == 409 || s >= 500),
            _ => false,
        }
    }
}

/// One page of a list.
#[derive(Debug, Clone, PartialEq)]
pub struct Page<T> {
    /// The items, in Stripe's order (newest first).
    pub data: Vec<T>,
    /// Whether more pages follow.
    pub has_more: bool,
}

/// An answer of the Stripe API: the data, and the time the server stamped
/// on the answer (its `Date` header, one-second resolution), when it sent
/// one that could be read.
///
/// Build one with [`Response::new`] and [`Response::with_date`]:
///
/// ```
/// use stripe_webhook_guard::client::Response;
/// use time::OffsetDateTime;
///
/// let stripe_now = OffsetDateTime::from_unix_timestamp(1_767_225_600).unwrap();
/// let answer = Response::new(vec!["pro".to_owned()]).with_date(Some(stripe_now));
/// assert_eq!(answer.date, Some(stripe_now));
/// // Without a server time, the caller's clock is the fallback.
/// let local = OffsetDateTime::from_unix_timestamp(1_767_225_660).unwrap();
/// assert_eq!(answer.date_or(local), stripe_now);
/// assert_eq!(Response::new(()).date_or(local), local);
/// ```
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Response<T> {
    /// What the server answered.
    pub data: T,
    /// The server's `Date`, when it sent a readable one.
    pub date: Option<OffsetDateTime>,
}

impl<T> Response<T> {
    /// An answer without a server time.
    pub fn new(data: T) -> Self {
        Self { data, date: None }
    }

    /// With the server's time.
    #[must_use]
    pub fn with_date(mut self, date: Option<OffsetDateTime>) -> Self {
        self.date = date;
        self
    }

    /// The server's time, or `fallback` (the local clock) without one.
    pub fn date_or(&self, fallback: OffsetDateTime) -> OffsetDateTime {
        self.date.unwrap_or(fallback)
    }

    /// The data, dropping the time.
    pub fn into_data(self) -> T {
        self.data
    }

    /// The same answer with its data mapped.
    pub fn map<U>(self, f: impl FnOnce(T) -> U) -> Response<U> {
        Response {
            data: f(self.data),
            date: self.date,
        }
    }
}

/// Paging for `/v1/subscriptions`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SubscriptionListQuery {
    /// Only this customer's.
    pub customer: Option<String>,
    /// The id to start after (the last id of the previous page).
    pub starting_after: Option<String>,
    /// Page size (Stripe allows 1–100; 0 means 100).
    pub limit: u32,
}

/// Filters and paging for `/v1/events` (newest first).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EventListQuery {
    /// `created[gte]`, Unix seconds.
    pub created_gte: Option<i64>,
    /// The id to start after (the last, oldest id of the previous page).
    pub starting_after: Option<String>,
    /// Only these types (`types[]`).
    pub types: Vec<String>,
    /// `delivery_success`: `Some(false)` for events whose webhooks failed.
    pub delivery_success: Option<bool>,
    /// Page size (1–100; 0 means 100).
    pub limit: u32,
}

/// Paging for `/v1/entitlements/active_entitlements` (one customer's).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EntitlementListQuery {
    /// The customer (required by Stripe).
    pub customer: String,
    /// The id to start after (the last id of the previous page).
    pub starting_after: Option<String>,
    /// Page size (1–100; 0 means 100).
    pub limit: u32,
}

/// One of a customer's active entitlements
/// (`entitlements.active_entitlement`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ActiveEntitlement {
    /// The entitlement id (`ent_…`).
    pub id: String,
    /// The feature's `lookup_key`: what `has_feature` asks about.
    pub lookup_key: String,
}

/// The Stripe API calls this crate makes. Subscriptions are always listed
/// with `status=all` (canceled ones included).
///
/// Every call takes the account it concerns: `None` for the platform,
/// `Some("acct_…")` for a connected account (sent as `Stripe-Account`). Every
/// answer is a [`Response`] carrying the server's `Date` when there was one;
/// an implementation that cannot read it answers `date: None` and the crate
/// falls back to its own clock.
#[async_trait]
pub trait StripeClient: Send + Sync {
    /// `GET /v1/subscriptions/{id}`.
    ///
    /// # Errors
    ///
    /// [`ClientError`]; [`ClientErrorKind::NotFound`] when there is no such
    /// subscription.
    async fn retrieve_subscription(
        &self,
        account: Option<&str>,
        id: &str,
    ) -> Result<Response<SubscriptionView>, ClientError>;

    /// `GET /v1/subscriptions?status=all` (optionally one customer's), one page.
    ///
    /// # Errors
    ///
    /// [`ClientError`].
    async fn list_subscriptions(
        &self,
        account: Option<&str>,
        query: &SubscriptionListQuery,
    ) -> Result<Response<Page<SubscriptionView>>, ClientError>;

    /// `GET /v1/events`, one page, newest first.
    ///
    /// # Errors
    ///
    /// [`ClientError`].
    async fn list_events(
        &self,
        account: Option<&str>,
        query: &EventListQuery,
    ) -> Result<Response<Page<Event>>, ClientError>;

    /// `GET /v1/events/{id}`.
    ///
    /// # Errors
    ///
    /// [`ClientError`]; [`ClientErrorKind::NotFound`] after Stripe's 30 days.
    async fn retrieve_event(
        &self,
        account: Option<&str>,
        id: &str,
    ) -> Result<Response<Event>, ClientError>;

    /// `GET /v1/entitlements/active_entitlements?customer=…`, one page.
    ///
    /// # Errors
    ///
    /// [`ClientError`].
    async fn list_active_entitlements(
        &self,
        account: Option<&str>,
        query: &EntitlementListQuery,
    ) -> Result<Response<Page<ActiveEntitlement>>, ClientError>;

    /// Every subscription of one customer (all pages). The date is the
    /// last page's.
    ///
    /// # Errors
    ///
    /// [`ClientError`].
    async fn list_customer_subscriptions(
        &self,
        account: Option<&str>,
        customer: &str,
    ) -> Result<Response<Vec<SubscriptionView>>, ClientError> {
        let mut query = SubscriptionListQuery {
            customer: Some(customer.to_owned()),
            starting_after: None,
            limit: 100,
        };
        collect_pages(
            |after| {
                query.starting_after = after;
                let query = query.clone();
                async move { self.list_subscriptions(account, &query).await }
            },
            |s: &SubscriptionView| s.id.clone(),
        )
        .await
    }

    /// The lookup keys of every active entitlement of one customer (all
    /// pages), sorted and without repeats. The date is the last page's.
    ///
    /// # Errors
    ///
    /// [`ClientError`].
    async fn list_customer_entitlements(
        &self,
        account: Option<&str>,
        customer: &str,
    ) -> Result<Response<Vec<String>>, ClientError> {
        let mut query = EntitlementListQuery {
            customer: customer.to_owned(),
            starting_after: None,
            limit: 100,
        };
        let all = collect_pages(
            |after| {
                query.starting_after = after;
                let query = query.clone();
                async move { self.list_active_entitlements(account, &query).await }
            },
            |e: &ActiveEntitlement| Some(e.id.clone()),
        )
        .await?;
        Ok(all.map(|list| {
            let mut keys: Vec<String> = list.into_iter().map(|e| e.lookup_key).collect();
            keys.sort();
            keys.dedup();
            keys
        }))
    }
}

/// A client that refuses every call with one error: for a deployment
/// without a Stripe key (replays then use stored payloads only; refetches
/// fail and are retried as any failed refetch), and for tests of failures
/// such as a revoked key.
///
/// ```
/// use stripe_webhook_guard::client::{ClientErrorKind, RefusingClient, StripeClient};
/// # tokio_test_block_on(async {
/// let client = RefusingClient::new(ClientErrorKind::Unauthorized, "no Stripe key is configured");
/// let err = client.retrieve_subscription(None, "sub_1").await.unwrap_err();
/// assert_eq!(err.kind(), ClientErrorKind::Unauthorized);
/// # });
/// # fn tokio_test_block_on<F: std::future::Future>(f: F) -> F::Output {
/// #     let mut f = std::pin::pin!(f);
/// #     match f.as_mut().poll(&mut std::task::Context::from_waker(std::task::Waker::noop())) {
/// #         std::task::Poll::Ready(v) => v,
/// #         std::task::Poll::Pending => unreachable!("answers at once"),
/// #     }
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct RefusingClient {
    kind: ClientErrorKind,
    message: String,
}

impl RefusingClient {
    /// Refuses every call with `kind` and `message`.
    pub fn new(kind: ClientErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }

    fn refuse<T>(&self) -> Result<T, ClientError> {
        Err(ClientError::new(self.kind, self.message.clone()))
    }
}

#[async_trait]
impl StripeClient for RefusingClient {
    async fn retrieve_subscription(
        &self,
        _: Option<&str>,
        _: &str,
    ) -> Result<Response<SubscriptionView>, ClientError> {
        self.refuse()
    }
    async fn list_subscriptions(
        &self,
        _: Option<&str>,
        _: &SubscriptionListQuery,
    ) -> Result<Response<Page<SubscriptionView>>, ClientError> {
        self.refuse()
    }
    async fn list_events(
        &self,
        _: Option<&str>,
        _: &EventListQuery,
    ) -> Result<Response<Page<Event>>, ClientError> {
        self.refuse()
    }
    async fn retrieve_event(
        &self,
        _: Option<&str>,
        _: &str,
    ) -> Result<Response<Event>, ClientError> {
        self.refuse()
    }
    async fn list_active_entitlements(
        &self,
        _: Option<&str>,
        _: &EntitlementListQuery,
    ) -> Result<Response<Page<ActiveEntitlement>>, ClientError> {
        self.refuse()
    }
}

/// Follows `starting_after` paging: `page(after)` fetches the page after an
/// id (`None`: the first), `id` names an item. Stops at the first page
/// without `has_more` (or whose last item has no id).
async fn collect_pages<T, F, Fut>(
    mut page: F,
    id: impl Fn(&T) -> Option<String>,
) -> Result<Response<Vec<T>>, ClientError>
where
    F: FnMut(Option<String>) -> Fut,
    Fut: std::future::Future<Output = Result<Response<Page<T>>, ClientError>>,
{
    let mut out = Vec::new();
    let mut after = None;
    loop {
        let Response { data, date } = page(after.clone()).await?;
        let last = data.data.last().and_then(&id);
        out.extend(data.data);
        match (data.has_more, last) {
            // A page that does not move on (a misbehaving server) ends it.
            (true, Some(last)) if after.as_ref() != Some(&last) => after = Some(last),
            _ => return Ok(Response::new(out).with_date(date)),
        }
    }
}

/// Reads an HTTP `Date` header value (RFC 9110's preferred
/// `IMF-fixdate`, `Sun, 06 Nov 1994 08:49:37 GMT`, which is what Stripe
/// sends). `None` for anything else; callers then fall back to their own
/// clock.
///
/// ```
/// use stripe_webhook_guard::client::parse_http_date;
/// let t = parse_http_date("Thu, 01 Jan 2026 00:00:05 GMT").unwrap();
/// assert_eq!(t.unix_timestamp(), 1_767_225_605);
/// assert_eq!(parse_http_date("yesterday"), None);
/// ```
pub fn parse_http_date(value: &str) -> Option<OffsetDateTime> {
    let format = time::macros::format_description!(
        "[weekday repr:short], [day] [month repr:short] [year] [hour]:[minute]:[second] GMT"
    );
    time::PrimitiveDateTime::parse(value.trim(), &format)
        .ok()
        .map(time::PrimitiveDateTime::assume_utc)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_dates_are_read_strictly() {
        let t = parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT").unwrap();
        assert_eq!(t.unix_timestamp(), 784_111_777);
        for bad in [
            "",
            "Sunday, 06-Nov-94 08:49:37 GMT",
            "Sun Nov  6 08:49:37 1994",
            "Sun, 06 Nov 1994 08:49:37 +0200",
            "Sun, 31 Feb 1994 08:49:37 GMT",
            "Sun, 06 Nov 1994 25:49:37 GMT",
        ] {
            assert_eq!(parse_http_date(bad), None, "{bad:?}");
        }
    }

    /// A client serving one list of lookup keys in pages of two.
    fn paged(keys: Vec<&'static str>) -> StubClient {
        StubClient::new().on_list_active_entitlements(move |account, query| {
            assert_eq!(
                (account.as_deref(), query.customer.as_str()),
                (Some("acct_1"), "cus_1")
            );
            // Ids are positions, so a repeated key is still a new item.
            let start = query.starting_after.as_ref().map_or(0, |after| {
                after
                    .strip_prefix("ent_")
                    .and_then(|i| i.parse::<usize>().ok())
                    .map_or(keys.len(), |i| i + 1)
            });
            let data: Vec<ActiveEntitlement> = keys
                .iter()
                .enumerate()
                .skip(start)
                .take(2)
                .map(|(i, k)| ActiveEntitlement {
                    id: format!("ent_{i}"),
                    lookup_key: (*k).to_owned(),
                })
                .collect();
            let page = Page {
                has_more: start + data.len() < keys.len(),
                data,
            };
            let served_at =
                OffsetDateTime::from_unix_timestamp(1_000 + i64::try_from(start).unwrap_or(0)).ok();
            std::future::ready(Ok(Response::new(page).with_date(served_at)))
        })
    }

    #[tokio::test]
    async fn entitlements_are_collected_over_every_page() {
        let client = paged(vec!["b", "a", "c", "a", "d"]);
        let all = client
            .list_customer_entitlements(Some("acct_1"), "cus_1")
            .await
            .unwrap();
        assert_eq!(all.data, ["a", "b", "c", "d"]);
        // The last page (starting at index 4) dated the answer.
        assert_eq!(all.date.map(OffsetDateTime::unix_timestamp), Some(1_004));
    }
}
