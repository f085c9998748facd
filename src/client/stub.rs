//! [`StubClient`]: a [`StripeClient`] for tests, answering each call from a
//! closure the test gives, or from another client, and recording every call.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;

use super::{
    ActiveEntitlement, ClientError, ClientErrorKind, EntitlementListQuery, EventListQuery, Page,
    RefusingClient, Response, StripeClient, SubscriptionListQuery,
};
use crate::event::{Event, SubscriptionView};

/// Which [`StripeClient`] method a [`StubCall`] was.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum StubMethod {
    /// [`StripeClient::retrieve_subscription`].
    RetrieveSubscription,
    /// [`StripeClient::list_subscriptions`].
    ListSubscriptions,
    /// [`StripeClient::list_events`].
    ListEvents,
    /// [`StripeClient::retrieve_event`].
    RetrieveEvent,
    /// [`StripeClient::list_active_entitlements`].
    ListActiveEntitlements,
}

/// One call a [`StubClient`] received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StubCall {
    /// The method called.
    pub method: StubMethod,
    /// The account it concerned (`None`: the platform).
    pub account: Option<String>,
    /// The id retrieved, the customer a list was filtered by, or `""`.
    pub key: String,
    /// 1 for the first call of this method, 2 for the second, …
    pub nth: usize,
}

type Answer<Q, T> = Box<
    dyn Fn(
            Option<String>,
            Q,
        ) -> Pin<Box<dyn Future<Output = Result<Response<T>, ClientError>> + Send>>
        + Send
        + Sync,
>;
type Before = Box<dyn Fn(&StubCall) -> Result<(), ClientError> + Send + Sync>;

fn answer<Q, T, F, Fut>(f: F) -> Answer<Q, T>
where
    F: Fn(Option<String>, Q) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Response<T>, ClientError>> + Send + 'static,
{
    Box::new(move |account, query| Box::pin(f(account, query)))
}

/// One builder method per [`StripeClient`] method, each setting the closure
/// that answers it.
macro_rules! answers {
    ($($(#[$doc:meta])* $setter:ident => $method:ident($arg:ty) -> $answer:ty;)*) => {$(
        $(#[$doc])*
        #[must_use]
        pub fn $setter<F, Fut>(mut self, f: F) -> Self
        where
            F: Fn(Option<String>, $arg) -> Fut + Send + Sync + 'static,
            Fut: Future<Output = Result<Response<$answer>, ClientError>> + Send + 'static,
        {
            self.$method = Some(answer(f));
            self
        }
    )*};
}

/// A [`StripeClient`] for tests: each method answers from a closure set with
/// the `on_` method of the same name, or else from the client it was built over
/// ([`StubClient::over`]; [`StubClient::new`] refuses every call it was not
/// told to answer with [`ClientErrorKind::NotFound`]). Every call is
/// recorded ([`StubClient::calls`]), and a hook run before each call
/// ([`StubClient::before_each`]) can fail it or move a clock.
///
/// The closures take owned arguments (the account and the id or query) and
/// return a future, so they may wait (a slow or stalled API) or panic (a
/// client bug).
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// use stripe_webhook_guard::client::{Page, Response, StripeClient, StubClient, StubMethod};
///
/// let client = StubClient::new().on_list_events(|_account, _query| async {
///     Ok(Response::new(Page { data: Vec::new(), has_more: false }))
/// });
/// let query = Default::default();
/// assert!(client.list_events(None, &query).await.unwrap().data.data.is_empty());
/// assert!(client.retrieve_subscription(None, "sub_1").await.is_err());
/// assert_eq!(client.calls_of(StubMethod::RetrieveSubscription), ["sub_1"]);
/// # }
/// ```
pub struct StubClient {
    fallback: Arc<dyn StripeClient>,
    calls: Mutex<Vec<StubCall>>,
    before: Option<Before>,
    retrieve_subscription: Option<Answer<String, SubscriptionView>>,
    list_subscriptions: Option<Answer<SubscriptionListQuery, Page<SubscriptionView>>>,
    list_events: Option<Answer<EventListQuery, Page<Event>>>,
    retrieve_event: Option<Answer<String, Event>>,
    list_active_entitlements: Option<Answer<EntitlementListQuery, Page<ActiveEntitlement>>>,
}

impl std::fmt::Debug for StubClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StubClient")
            .field("calls", &self.lock().len())
            .finish_non_exhaustive()
    }
}

impl Default for StubClient {
    fn default() -> Self {
        Self::new()
    }
}

impl StubClient {
    /// A client that answers nothing yet: every call fails with
    /// [`ClientErrorKind::NotFound`] ("not stubbed") until told otherwise.
    pub fn new() -> Self {
        Self::over(Arc::new(RefusingClient::new(
            ClientErrorKind::NotFound,
            "not stubbed",
        )))
    }

    /// A client that passes every call it was not told to answer to `inner`.
    pub fn over(inner: Arc<dyn StripeClient>) -> Self {
        Self {
            fallback: inner,
            calls: Mutex::new(Vec::new()),
            before: None,
            retrieve_subscription: None,
            list_subscriptions: None,
            list_events: None,
            retrieve_event: None,
            list_active_entitlements: None,
        }
    }

    /// Runs `hook` before every call, after recording it; an error it
    /// returns is the call's answer.
    #[must_use]
    pub fn before_each(
        mut self,
        hook: impl Fn(&StubCall) -> Result<(), ClientError> + Send + Sync + 'static,
    ) -> Self {
        self.before = Some(Box::new(hook));
        self
    }

    answers! {
        /// Answers [`StripeClient::retrieve_subscription`] with `f(account, id)`.
        on_retrieve_subscription => retrieve_subscription(String) -> SubscriptionView;
        /// Answers [`StripeClient::list_subscriptions`] with `f(account, query)`.
        on_list_subscriptions => list_subscriptions(SubscriptionListQuery) -> Page<SubscriptionView>;
        /// Answers [`StripeClient::list_events`] with `f(account, query)`.
        on_list_events => list_events(EventListQuery) -> Page<Event>;
        /// Answers [`StripeClient::retrieve_event`] with `f(account, id)`.
        on_retrieve_event => retrieve_event(String) -> Event;
        /// Answers [`StripeClient::list_active_entitlements`] with
        /// `f(account, query)`.
        on_list_active_entitlements => list_active_entitlements(EntitlementListQuery) -> Page<ActiveEntitlement>;
    }

    /// Every call received so far, in order.
    pub fn calls(&self) -> Vec<StubCall> {
        self.lock().clone()
    }

    /// The keys (ids, or the customer a list was filtered by) of every call
    /// of `method` so far, in order.
    pub fn calls_of(&self, method: StubMethod) -> Vec<String> {
        self.lock()
            .iter()
            .filter(|c| c.method == method)
            .map(|c| c.key.clone())
            .collect()
    }

    fn lock(&self) -> MutexGuard<'_, Vec<StubCall>> {
        // A test that panicked while holding the log poisons nothing worth
        // refusing: the log is append-only.
        self.calls
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn record(
        &self,
        method: StubMethod,
        account: Option<&str>,
        key: &str,
    ) -> Result<(), ClientError> {
        let call = {
            let mut calls = self.lock();
            let nth = 1 + calls.iter().filter(|c| c.method == method).count();
            let call = StubCall {
                method,
                account: account.map(str::to_owned),
                key: key.to_owned(),
                nth,
            };
            calls.push(call.clone());
            call
        };
        match &self.before {
            Some(hook) => hook(&call),
            None => Ok(()),
        }
    }
}

#[async_trait]
impl StripeClient for StubClient {
    async fn retrieve_subscription(
        &self,
        account: Option<&str>,
        id: &str,
    ) -> Result<Response<SubscriptionView>, ClientError> {
        self.record(StubMethod::RetrieveSubscription, account, id)?;
        match &self.retrieve_subscription {
            Some(f) => f(account.map(str::to_owned), id.to_owned()).await,
            None => self.fallback.retrieve_subscription(account, id).await,
        }
    }

    async fn list_subscriptions(
        &self,
        account: Option<&str>,
        query: &SubscriptionListQuery,
    ) -> Result<Response<Page<SubscriptionView>>, ClientError> {
        let key = query.customer.as_deref().unwrap_or("");
        self.record(StubMethod::ListSubscriptions, account, key)?;
        match &self.list_subscriptions {
            Some(f) => f(account.map(str::to_owned), query.clone()).await,
            None => self.fallback.list_subscriptions(account, query).await,
        }
    }

    async fn list_events(
        &self,
        account: Option<&str>,
        query: &EventListQuery,
    ) -> Result<Response<Page<Event>>, ClientError> {
        self.record(StubMethod::ListEvents, account, "")?;
        match &self.list_events {
            Some(f) => f(account.map(str::to_owned), query.clone()).await,
            None => self.fallback.list_events(account, query).await,
        }
    }

    async fn retrieve_event(
        &self,
        account: Option<&str>,
        id: &str,
    ) -> Result<Response<Event>, ClientError> {
        self.record(StubMethod::RetrieveEvent, account, id)?;
        match &self.retrieve_event {
            Some(f) => f(account.map(str::to_owned), id.to_owned()).await,
            None => self.fallback.retrieve_event(account, id).await,
        }
    }

    async fn list_active_entitlements(
        &self,
        account: Option<&str>,
        query: &EntitlementListQuery,
    ) -> Result<Response<Page<ActiveEntitlement>>, ClientError> {
        self.record(StubMethod::ListActiveEntitlements, account, &query.customer)?;
        match &self.list_active_entitlements {
            Some(f) => f(account.map(str::to_owned), query.clone()).await,
            None => self.fallback.list_active_entitlements(account, query).await,
        }
    }
}
