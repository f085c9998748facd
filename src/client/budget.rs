//! [`RequestBudget`]: the one layer that retries Stripe calls, and the one
//! that paces them and bounds how many are in flight.
//!
//! See [`RequestBudget`] for the rules.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use async_trait::async_trait;
use time::{Duration, OffsetDateTime};

use super::{
    ActiveEntitlement, ClientError, ClientErrorKind, EntitlementListQuery, EventListQuery, Page,
    Response, StripeClient, SubscriptionListQuery,
};
use crate::clock::Clock;
use crate::event::{Event, SubscriptionView};
use crate::rt::semaphore::{Permit, Semaphore};

/// Limits on API use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BudgetConfig {
    /// Requests per second (default 10; Stripe allows 25/s in test mode and
    /// 100/s in live mode, shared with the rest of your application). Every
    /// retry counts as a request.
    pub requests_per_second: u32,
    /// Requests in flight at once (default 4).
    pub max_in_flight: usize,
    /// Retries of a retryable failure after the first request (default 5);
    /// 0 disables retries.
    pub max_retries: u32,
    /// The back-off before the first retry (default 500 ms), doubled per
    /// retry, jittered (between half and all of it), capped at
    /// [`RequestBudget::MAX_BACKOFF`] (or at this base, if larger); a
    /// `Retry-After` longer than that wins, up to
    /// [`RequestBudget::MAX_RETRY_AFTER`].
    pub base_backoff: Duration,
}

impl Default for BudgetConfig {
    fn default() -> Self {
        Self {
            requests_per_second: 10,
            max_in_flight: 4,
            max_retries: 5,
            base_backoff: Duration::milliseconds(500),
        }
    }
}

/// How many request timestamps [`RequestBudget::peak_per_second`] keeps.
const ISSUED_WINDOW: usize = 4096;

/// A [`StripeClient`] wrapper that paces requests, bounds how many are in
/// flight, and is the one layer that retries: rate limits, transport
/// failures and server errors, with jittered exponential back-off that
/// honours `Retry-After` and `Stripe-Should-Retry`. Give the same budgeted
/// client to the processor and the reconciler so refetches share the budget.
///
/// The rules, in the order a call goes through them:
///
/// 1. **In-flight bound.** A call first waits for one of
///    [`BudgetConfig::max_in_flight`] permits. The wait is an async
///    semaphore, first come first served: a waiting call sleeps until a
///    permit is returned (no polling), and a call that is cancelled (dropped
///    by a timeout, say) or panics returns its permit.
/// 2. **Pacing.** Holding the permit, it takes the next free slot of
///    [`BudgetConfig::requests_per_second`] and sleeps (on the budget's
///    [`Clock`]) until that slot; then the request is sent.
/// 3. **Retries.** When the answer is an error for which
///    [`ClientError::is_retryable`] holds (rate limits, transport failures,
///    409 and 5xx; Stripe's `Stripe-Should-Retry` header overrides that
///    both ways, so `false` is never retried and `true` always is), the
///    permit is returned, the call waits out a back-off, and starts again at
///    step 1: a retry takes a new permit and a new pacing slot. At most
///    [`BudgetConfig::max_retries`] retries follow the first request, so one
///    call sends at most `max_retries + 1` requests.
/// 4. **Back-off.** Retry `n` (1 for the first) waits between half and all
///    of `base_backoff × 2^(n−1)`, capped at [`RequestBudget::MAX_BACKOFF`]
///    (or at `base_backoff`, if that is larger). When the server sent
///    `Retry-After`, the wait is at least that long, up to
///    [`RequestBudget::MAX_RETRY_AFTER`].
///
/// The HTTP client (`HttpStripeClient`, feature `reqwest`) does not retry:
/// it sends one request per call and reports `Retry-After` and
/// `Stripe-Should-Retry` in its [`ClientError`], so wrapping it in a
/// `RequestBudget` is what gives retries.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// use std::sync::Arc;
/// use std::sync::atomic::{AtomicU32, Ordering};
/// use async_trait::async_trait;
/// use stripe_webhook_guard::client::{
///     ActiveEntitlement, BudgetConfig, ClientError, ClientErrorKind, EntitlementListQuery,
///     EventListQuery, Page, RequestBudget, Response, StripeClient, SubscriptionListQuery,
/// };
/// use stripe_webhook_guard::clock::ManualClock;
/// use stripe_webhook_guard::event::{Event, SubscriptionView};
///
/// /// Answers 503 to the first two calls, then 404.
/// #[derive(Default)]
/// struct Flaky(AtomicU32);
///
/// fn unused() -> ClientError {
///     ClientError::new(ClientErrorKind::Api, "not used here")
/// }
///
/// #[async_trait]
/// impl StripeClient for Flaky {
///     async fn retrieve_subscription(&self, _: Option<&str>, _: &str)
///         -> Result<Response<SubscriptionView>, ClientError> {
///         if self.0.fetch_add(1, Ordering::Relaxed) < 2 {
///             Err(ClientError::new(ClientErrorKind::Api, "unavailable").with_status(503))
///         } else {
///             Err(ClientError::new(ClientErrorKind::NotFound, "no such subscription"))
///         }
///     }
///     async fn list_subscriptions(&self, _: Option<&str>, _: &SubscriptionListQuery)
///         -> Result<Response<Page<SubscriptionView>>, ClientError> { Err(unused()) }
///     async fn list_events(&self, _: Option<&str>, _: &EventListQuery)
///         -> Result<Response<Page<Event>>, ClientError> { Err(unused()) }
///     async fn retrieve_event(&self, _: Option<&str>, _: &str)
///         -> Result<Response<Event>, ClientError> { Err(unused()) }
///     async fn list_active_entitlements(&self, _: Option<&str>, _: &EntitlementListQuery)
///         -> Result<Response<Page<ActiveEntitlement>>, ClientError> { Err(unused()) }
/// }
///
/// // A manual clock: back-off and pacing sleeps return at once.
/// let clock = Arc::new(ManualClock::at_unix(1_767_225_600));
/// let budget = RequestBudget::new(Arc::new(Flaky::default()), clock, BudgetConfig::default());
/// let err = budget.retrieve_subscription(None, "sub_1").await.unwrap_err();
/// // Two 503s were retried; the 404 is not retryable and is returned.
/// assert_eq!(err.kind(), ClientErrorKind::NotFound);
/// assert_eq!(budget.requests(), 3);
/// # }
/// ```
pub struct RequestBudget {
    inner: Arc<dyn StripeClient>,
    clock: Arc<dyn Clock>,
    config: BudgetConfig,
    next_slot: Mutex<OffsetDateTime>,
    permits: Semaphore,
    requests: AtomicU64,
    rate_limited: AtomicU64,
    issued: Mutex<VecDeque<OffsetDateTime>>,
}

impl std::fmt::Debug for RequestBudget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestBudget")
            .field("config", &self.config)
            .field("requests", &self.requests.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl RequestBudget {
    /// The back-off (before any `Retry-After`) never grows past this (or
    /// past [`BudgetConfig::base_backoff`], if that is larger).
    pub const MAX_BACKOFF: Duration = Duration::seconds(30);

    /// A server's `Retry-After` is honoured up to this long; longer requests
    /// are capped to it.
    pub const MAX_RETRY_AFTER: Duration = Duration::seconds(60);

    /// Wraps `inner`; pacing and back-off sleeps use `clock`.
    pub fn new(inner: Arc<dyn StripeClient>, clock: Arc<dyn Clock>, config: BudgetConfig) -> Self {
        Self {
            inner,
            next_slot: Mutex::new(clock.now()),
            clock,
            config,
            permits: Semaphore::new(config.max_in_flight.max(1)),
            requests: AtomicU64::new(0),
            rate_limited: AtomicU64::new(0),
            issued: Mutex::new(VecDeque::with_capacity(ISSUED_WINDOW)),
        }
    }

    /// The limits this budget applies.
    pub fn config(&self) -> &BudgetConfig {
        &self.config
    }

    /// Requests issued so far (each retry counts).
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// Requests answered with 429 so far.
    pub fn rate_limited(&self) -> u64 {
        self.rate_limited.load(Ordering::Relaxed)
    }

    /// The most requests issued within any one second (to check the pace),
    /// over the last 4,096 requests (older timestamps are not kept).
    pub fn peak_per_second(&self) -> usize {
        let issued = self.issued.lock().unwrap_or_else(PoisonError::into_inner);
        let mut peak = 0;
        let mut start = 0;
        for (end, t) in issued.iter().enumerate() {
            while *t - issued[start] >= Duration::SECOND {
                start += 1;
            }
            peak = peak.max(end - start + 1);
        }
        peak
    }

    /// Waits for an in-flight permit, then for a pacing slot. The permit is
    /// returned when the guard drops (also on cancellation or panic).
    async fn acquire(&self) -> Permit<'_> {
        let asked = self.clock.now();
        let permit = self.permits.acquire().await;
        let interval = Duration::seconds(1) / self.config.requests_per_second.max(1);
        let slot = {
            let mut next = self
                .next_slot
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            let now = self.clock.now();
            let slot = if *next > now { *next } else { now };
            *next = slot + interval;
            slot
        };
        let now = self.clock.now();
        if slot > now {
            self.clock.sleep(slot - now).await;
        }
        {
            let mut issued = self.issued.lock().unwrap_or_else(PoisonError::into_inner);
            if issued.len() >= ISSUED_WINDOW {
                issued.pop_front();
            }
            issued.push_back(self.clock.now());
        }
        self.requests.fetch_add(1, Ordering::Relaxed);
        crate::metrics::budget_wait((self.clock.now() - asked).unsigned_abs());
        permit
    }

    /// How long to wait before retry number `retry` (1 for the first): the
    /// crate's jittered exponential back-off, and at least the server's
    /// `Retry-After` (capped at [`Self::MAX_RETRY_AFTER`]) when it sent one.
    fn retry_delay(&self, retry: u32, retry_after: Option<Duration>) -> Duration {
        let to_std = |d: Duration| std::time::Duration::try_from(d).unwrap_or_default();
        let backoff = crate::rt::backoff(
            retry,
            to_std(self.config.base_backoff),
            to_std(Self::MAX_BACKOFF),
        );
        let wait = match retry_after {
            Some(hint) => to_std(hint.min(Self::MAX_RETRY_AFTER)).max(backoff),
            None => backoff,
        };
        Duration::try_from(wait).unwrap_or(Self::MAX_RETRY_AFTER)
    }

    #[allow(clippy::needless_lifetimes)] // 'a ties the futures to the borrow of self
    async fn call<'a, T, F>(&'a self, mut f: F) -> Result<T, ClientError>
    where
        F: FnMut() -> Pin<Box<dyn Future<Output = Result<T, ClientError>> + Send + 'a>>,
        T: Send,
    {
        let mut retries = 0;
        loop {
            // The permit is held for the request only, not for the back-off.
            let result = {
                let _permit = self.acquire().await;
                f().await
            };
            let err = match result {
                Ok(v) => return Ok(v),
                Err(e) => e,
            };
            if err.kind() == ClientErrorKind::RateLimited {
                self.rate_limited.fetch_add(1, Ordering::Relaxed);
                crate::metrics::rate_limited();
            }
            if !err.is_retryable() || retries >= self.config.max_retries {
                return Err(err);
            }
            retries += 1;
            let wait = self.retry_delay(retries, err.retry_after());
            trace_retry(&err, retries, wait);
            self.clock.sleep(wait).await;
        }
    }
}

#[cfg(feature = "tracing")]
fn trace_retry(err: &ClientError, retry: u32, delay: Duration) {
    tracing::debug!(
        kind = %err.kind(),
        status = err.status(),
        retry,
        delay_ms = i64::try_from(delay.whole_milliseconds()).unwrap_or(i64::MAX),
        "retrying Stripe API request"
    );
}

#[cfg(not(feature = "tracing"))]
fn trace_retry(_err: &ClientError, _retry: u32, _delay: Duration) {}

#[async_trait]
impl StripeClient for RequestBudget {
    async fn retrieve_subscription(
        &self,
        account: Option<&str>,
        id: &str,
    ) -> Result<Response<SubscriptionView>, ClientError> {
        self.call(|| Box::pin(self.inner.retrieve_subscription(account, id)))
            .await
    }

    async fn list_subscriptions(
        &self,
        account: Option<&str>,
        query: &SubscriptionListQuery,
    ) -> Result<Response<Page<SubscriptionView>>, ClientError> {
        self.call(|| Box::pin(self.inner.list_subscriptions(account, query)))
            .await
    }

    async fn list_events(
        &self,
        account: Option<&str>,
        query: &EventListQuery,
    ) -> Result<Response<Page<Event>>, ClientError> {
        self.call(|| Box::pin(self.inner.list_events(account, query)))
            .await
    }

    async fn retrieve_event(
        &self,
        account: Option<&str>,
        id: &str,
    ) -> Result<Response<Event>, ClientError> {
        self.call(|| Box::pin(self.inner.retrieve_event(account, id)))
            .await
    }

    async fn list_active_entitlements(
        &self,
        account: Option<&str>,
        query: &EntitlementListQuery,
    ) -> Result<Response<Page<ActiveEntitlement>>, ClientError> {
        self.call(|| Box::pin(self.inner.list_active_entitlements(account, query)))
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::StubClient;
    use crate::clock::ManualClock;

    /// When each `retrieve_event` call reached the scripted client.
    struct Log(Arc<Mutex<Vec<OffsetDateTime>>>);

    impl Log {
        fn calls(&self) -> Vec<OffsetDateTime> {
            self.0.lock().unwrap().clone()
        }
    }

    /// A budget over a client that answers `retrieve_event` from a script
    /// (the last answer repeats) and logs when each call arrived.
    fn setup(
        answers: Vec<fn() -> ClientError>,
        config: BudgetConfig,
    ) -> (Log, RequestBudget, ManualClock) {
        let clock = ManualClock::at_unix(1_767_225_600);
        let log = Arc::new(Mutex::new(Vec::new()));
        let (at, times) = (clock.clone(), log.clone());
        let inner = StubClient::new().on_retrieve_event(move |_, _| {
            let mut calls = times.lock().unwrap();
            calls.push(at.now());
            let i = (calls.len() - 1).min(answers.len() - 1);
            std::future::ready(Err((answers[i])()))
        });
        let budget = RequestBudget::new(Arc::new(inner), Arc::new(clock.clone()), config);
        (Log(log), budget, clock)
    }

    fn unavailable() -> ClientError {
        ClientError::new(ClientErrorKind::Api, "unavailable").with_status(503)
    }

    fn not_found() -> ClientError {
        ClientError::new(ClientErrorKind::NotFound, "gone").with_status(404)
    }

    fn fast() -> BudgetConfig {
        BudgetConfig {
            requests_per_second: 1000,
            base_backoff: Duration::milliseconds(1),
            ..BudgetConfig::default()
        }
    }

    #[tokio::test]
    async fn retryable_failures_are_retried_max_retries_times() {
        let config = BudgetConfig {
            max_retries: 2,
            ..fast()
        };
        let (inner, budget, _) = setup(vec![unavailable], config);
        let err = budget.retrieve_event(None, "evt_1").await.unwrap_err();
        assert_eq!(err.status(), Some(503));
        assert_eq!(inner.calls().len(), 3);
        assert_eq!(budget.requests(), 3);

        // 0 disables retries.
        let config = BudgetConfig {
            max_retries: 0,
            ..fast()
        };
        let (inner, budget, _) = setup(vec![unavailable], config);
        budget.retrieve_event(None, "evt_1").await.unwrap_err();
        assert_eq!(inner.calls().len(), 1);

        // A non-retryable answer ends the retries.
        let (inner, budget, _) = setup(vec![unavailable, not_found], fast());
        let err = budget.retrieve_event(None, "evt_1").await.unwrap_err();
        assert_eq!(err.kind(), ClientErrorKind::NotFound);
        assert_eq!(inner.calls().len(), 2);
    }

    #[tokio::test]
    async fn stripe_should_retry_decides_both_ways() {
        let (inner, budget, _) = setup(vec![|| unavailable().with_should_retry(false)], fast());
        budget.retrieve_event(None, "evt_1").await.unwrap_err();
        assert_eq!(inner.calls().len(), 1, "false: a 503 is not retried");

        let limited = || {
            ClientError::new(ClientErrorKind::RateLimited, "slow down")
                .with_status(429)
                .with_retry_after(Duration::ZERO)
                .with_should_retry(false)
        };
        let (inner, budget, _) = setup(vec![limited], fast());
        budget.retrieve_event(None, "evt_1").await.unwrap_err();
        assert_eq!(inner.calls().len(), 1, "false: not even a 429");
        assert_eq!(budget.rate_limited(), 1);

        let conflict = || {
            ClientError::new(ClientErrorKind::Api, "lock_timeout")
                .with_status(400)
                .with_should_retry(true)
        };
        let (inner, budget, _) = setup(vec![conflict, not_found], fast());
        budget.retrieve_event(None, "evt_1").await.unwrap_err();
        assert_eq!(inner.calls().len(), 2, "true: even a 400 is retried");
    }

    #[tokio::test]
    async fn retry_after_is_waited_at_least_and_capped() {
        let seven = || {
            ClientError::new(ClientErrorKind::RateLimited, "slow down")
                .with_status(429)
                .with_retry_after(Duration::seconds(7))
        };
        let (inner, budget, _) = setup(vec![seven, not_found], fast());
        budget.retrieve_event(None, "evt_1").await.unwrap_err();
        let calls = inner.calls();
        assert_eq!(calls.len(), 2);
        assert!(calls[1] - calls[0] >= Duration::seconds(7));
        assert!(calls[1] - calls[0] < Duration::seconds(8));

        let hours = || {
            ClientError::new(ClientErrorKind::RateLimited, "slow down")
                .with_status(429)
                .with_retry_after(Duration::hours(2))
        };
        let (inner, budget, _) = setup(vec![hours, not_found], fast());
        budget.retrieve_event(None, "evt_1").await.unwrap_err();
        let calls = inner.calls();
        assert_eq!(calls[1] - calls[0], RequestBudget::MAX_RETRY_AFTER);
    }

    #[test]
    fn retry_delay_is_the_backoff_or_the_capped_hint() {
        let (_, budget, _) = setup(
            vec![unavailable],
            BudgetConfig {
                base_backoff: Duration::milliseconds(100),
                ..BudgetConfig::default()
            },
        );
        for retry in 1..=40 {
            let full = (Duration::milliseconds(100) * (1_i32 << (retry - 1).min(20)))
                .min(RequestBudget::MAX_BACKOFF);
            for _ in 0..20 {
                let d = budget.retry_delay(retry, None);
                assert!(d >= full / 2 && d <= full, "{retry}: {d:?}");
            }
        }
        assert_eq!(
            budget.retry_delay(1, Some(Duration::hours(2))),
            RequestBudget::MAX_RETRY_AFTER
        );
        assert!(budget.retry_delay(1, Some(Duration::ZERO)) >= Duration::milliseconds(50));
        assert!(budget.retry_delay(1, Some(Duration::seconds(-5))) >= Duration::milliseconds(50));
        assert_eq!(
            budget.retry_delay(1, Some(Duration::seconds(3))),
            Duration::seconds(3)
        );
    }

    /// The back-off (1 ms) is far shorter than the pacing interval (1 s):
    /// the retry still waits for its own slot.
    #[tokio::test]
    async fn a_retry_takes_a_new_pacing_slot() {
        let config = BudgetConfig {
            requests_per_second: 1,
            base_backoff: Duration::milliseconds(1),
            ..BudgetConfig::default()
        };
        let (inner, budget, _) = setup(vec![unavailable, not_found], config);
        budget.retrieve_event(None, "evt_1").await.unwrap_err();
        let calls = inner.calls();
        assert_eq!(calls.len(), 2);
        assert!(calls[1] - calls[0] >= Duration::SECOND, "{calls:?}");
        assert_eq!(budget.peak_per_second(), 1);
    }
}
