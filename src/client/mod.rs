//! The narrow slice of the Stripe API this crate needs, as a trait.
//!
//! [`StripeClient`] is implemented by `HttpStripeClient` (feature `reqwest`)
//! and by `FakeStripe` (feature `test-util`); an application may implement it
//! over its own HTTP stack. Errors are opaque [`ClientError`]s with a
//! [`kind`](ClientError::kind), and carry what the server said about
//! retrying (`Retry-After`, `Stripe-Should-Retry`).
//!
//! Exactly one layer retries: [`RequestBudget`], a [`StripeClient`] wrapper
//! that also paces requests and bounds how many are in flight. The clients
//! themselves make one request per call, so wrap them in a budget to get
//! retries.

use std::fmt;

use async_trait::async_trait;
use time::Duration;

use crate::event::{Event, SubscriptionView};

mod budget;

#[cfg(feature = "reqwest")]
#[cfg_attr(docsrs, doc(cfg(feature = "reqwest")))]
pub mod http;

pub use budget::{BudgetConfig, RequestBudget};

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

/// The Stripe API calls this crate makes. Subscriptions are always listed
/// with `status=all` (canceled ones included).
#[async_trait]
pub trait StripeClient: Send + Sync {
    /// `GET /v1/subscriptions/{id}`.
    ///
    /// # Errors
    ///
    /// [`ClientError`]; [`ClientErrorKind::NotFound`] when there is no such
    /// subscription.
    async fn retrieve_subscription(&self, id: &str) -> Result<SubscriptionView, ClientError>;

    /// `GET /v1/subscriptions?status=all` (optionally one customer's), one page.
    ///
    /// # Errors
    ///
    /// [`ClientError`].
    async fn list_subscriptions(
        &self,
        query: &SubscriptionListQuery,
    ) -> Result<Page<SubscriptionView>, ClientError>;

    /// `GET /v1/events`, one page, newest first.
    ///
    /// # Errors
    ///
    /// [`ClientError`].
    async fn list_events(&self, query: &EventListQuery) -> Result<Page<Event>, ClientError>;

    /// `GET /v1/events/{id}`.
    ///
    /// # Errors
    ///
    /// [`ClientError`]; [`ClientErrorKind::NotFound`] after Stripe's 30 days.
    async fn retrieve_event(&self, id: &str) -> Result<Event, ClientError>;

    /// Every subscription of one customer (all pages).
    ///
    /// # Errors
    ///
    /// [`ClientError`].
    async fn list_customer_subscriptions(
        &self,
        customer: &str,
    ) -> Result<Vec<SubscriptionView>, ClientError> {
        let mut out = Vec::new();
        let mut query = SubscriptionListQuery {
            customer: Some(customer.to_owned()),
            starting_after: None,
            limit: 100,
        };
        loop {
            let page = self.list_subscriptions(&query).await?;
            let last = page.data.last().and_then(|s| s.id.clone());
            out.extend(page.data);
            match (page.has_more, last) {
                (true, Some(last)) => query.starting_after = Some(last),
                _ => return Ok(out),
            }
        }
    }
}
