//! `HttpStripeClient`: the Stripe API over reqwest (feature `reqwest`).
//!
//! [`HttpStripeClient`] implements [`StripeClient`] with five `GET` calls
//! (`/v1/subscriptions`, `/v1/subscriptions/{id}`, `/v1/events`,
//! `/v1/events/{id}`, `/v1/entitlements/active_entitlements`). Every request
//! carries:
//!
//! - `Authorization: Bearer <secret key>` (the header value is marked
//!   sensitive; the key never appears in `Debug` output or in errors);
//! - a pinned `Stripe-Version` ([`DEFAULT_STRIPE_VERSION`] unless set with
//!   [`HttpStripeClient::stripe_version`]), so objects come back in a known
//!   shape. The views read both shapes anyway, because events listed from
//!   `/v1/events` keep the version they were rendered in;
//! - for a call about a connected account (`account: Some("acct_…")`), the
//!   `Stripe-Account` header, so the platform's key acts on that account.
//!
//! Every answer carries the server's `Date` header, read as Stripe's clock
//! ([`Response::date`]; `None` when absent or not an RFC 9110 date).
//! Subscriptions are retrieved with `expand[]=test_clock` and listed with
//! `expand[]=data.test_clock`: for a subscription on a Stripe test clock the
//! clock's `frozen_time` (its simulated time) then stamps the refetch.
//!
//! # Failures and retries
//!
//! HTTP statuses map to [`ClientErrorKind`]s: 404 → `NotFound`, 429 →
//! `RateLimited`, 401/403 → `Unauthorized`, any other non-2xx → `Api` (with
//! [`ClientError::status`]); connection failures and timeouts → `Transport`;
//! a 2xx body that cannot be read → `InvalidResponse`. Error messages carry
//! Stripe's error `type`, `code` and (shortened, sanitised) `message` and the
//! `Request-Id`, never the response body itself.
//!
//! **This client does not retry**: every call sends exactly one request (none
//! when an id is refused, see below) and returns what the server said. A
//! non-2xx answer's [`ClientError`] carries the server's `Retry-After`
//! (seconds, [`ClientError::retry_after`]) and `Stripe-Should-Retry`
//! (`true`/`false`, which overrides the status-based
//! [`ClientError::is_retryable`] both ways). Wrap the client in a
//! [`RequestBudget`](super::RequestBudget) to get retries: the budget is the
//! crate's one retrying layer, honours both headers, and also paces requests
//! and bounds how many are in flight. All four calls are `GET`s, so retrying
//! them is always safe.
//!
//! # Ids
//!
//! Object ids are put into URL paths only after validation: 1 to
//! [`MAX_ID_LEN`] characters of `[A-Za-z0-9_]`, which every Stripe id
//! satisfies. Anything else fails with [`ClientErrorKind::NotFound`] (no
//! Stripe object can have such an id) without sending a request. Account
//! ids for `Stripe-Account` are validated the same way. Query parameters
//! are form-encoded.

use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use reqwest::Url;
use reqwest::header::{ACCEPT, AUTHORIZATION, HeaderMap, HeaderName, HeaderValue, USER_AGENT};
use serde::Deserialize;
use serde_json::value::RawValue;

use super::{
    ActiveEntitlement, ClientError, ClientErrorKind, EntitlementListQuery, EventListQuery, Page,
    Response, StripeClient, SubscriptionListQuery, parse_http_date,
};
use crate::event::{Event, SubscriptionView};

/// The `Stripe-Version` sent by default: the API version the crate's views
/// were tested with (the bundled `*.2025-03-31.basil.json` fixtures). The
/// views also read the older (acacia and before) and newer (dahlia) shapes.
pub const DEFAULT_STRIPE_VERSION: &str = "2025-03-31.basil";

/// The default API base URL.
pub const DEFAULT_BASE_URL: &str = "https://api.stripe.com";

/// The default total time allowed for one request (connect, send, read).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// The largest single event accepted from the API (4 MiB).
pub const MAX_EVENT_BYTES: usize = 4 * 1024 * 1024;

/// The largest response body read (64 MiB); larger answers are
/// [`ClientErrorKind::InvalidResponse`].
pub const MAX_RESPONSE_BYTES: usize = 64 * 1024 * 1024;

/// The longest object id accepted.
pub const MAX_ID_LEN: usize = 255;

/// The most of an error response's body that is read to find Stripe's
/// error message.
const MAX_ERROR_BODY_BYTES: usize = 64 * 1024;

/// Stripe's error messages are shortened to this many characters.
const MAX_MESSAGE_CHARS: usize = 300;

/// Page size used when a query asks for 0 (and the most Stripe allows).
const MAX_PAGE_SIZE: u32 = 100;

/// What `Debug` prints instead of the secret key.
const REDACTED: &str = "[redacted]";

/// The Stripe API over reqwest (rustls).
///
/// Cheap to clone (the connection pool is shared). Configure it with the
/// builder methods; every request then carries the secret key and the
/// pinned `Stripe-Version`.
///
/// **It does not retry**: each call makes exactly one request, and a failed
/// one returns a [`ClientError`] with the server's `Retry-After` and
/// `Stripe-Should-Retry`. Wrapping it in a
/// [`RequestBudget`](super::RequestBudget) gives retries (with back-off that
/// honours both headers), pacing and a bound on requests in flight.
///
/// ```no_run
/// use std::sync::Arc;
/// use std::time::Duration;
/// use stripe_webhook_guard::client::{BudgetConfig, RequestBudget, StripeClient};
/// use stripe_webhook_guard::client::http::HttpStripeClient;
/// use stripe_webhook_guard::clock::SystemClock;
///
/// # async fn demo() -> Result<(), stripe_webhook_guard::client::ClientError> {
/// let client = HttpStripeClient::new("sk_test_…")?.timeout(Duration::from_secs(10));
/// // The budget retries (at most 5 times by default); the client never does.
/// let budgeted = RequestBudget::new(
///     Arc::new(client.clone()),
///     Arc::new(SystemClock),
///     BudgetConfig { max_retries: 2, ..BudgetConfig::default() },
/// );
/// let subscription = budgeted.retrieve_subscription(None, "sub_123").await?.data;
/// println!("{:?} until {:?}", subscription.status, subscription.current_period_end);
/// // A connected account's subscription: the same call with its account,
/// // sent as `Stripe-Account`; `date` is Stripe's clock (its `Date` header).
/// let theirs = budgeted.retrieve_subscription(Some("acct_123"), "sub_456").await?;
/// println!("as of {:?}", theirs.date);
///
/// // The key never shows up in debug output.
/// assert!(!format!("{client:?}").contains("sk_test_"));
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct HttpStripeClient {
    http: reqwest::Client,
    /// `Bearer <key>`, marked sensitive.
    authorization: HeaderValue,
    base_url: Url,
    stripe_version: HeaderValue,
    timeout: Duration,
}

impl fmt::Debug for HttpStripeClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpStripeClient")
            .field("secret_key", &format_args!("{REDACTED}"))
            .field("base_url", &self.base_url.as_str())
            .field("stripe_version", &self.stripe_version)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl HttpStripeClient {
    /// A client for `https://api.stripe.com` with `secret_key` (`sk_…` or a
    /// restricted `rk_…` key), [`DEFAULT_STRIPE_VERSION`] and
    /// [`DEFAULT_TIMEOUT`]. Its own reqwest client follows no
    /// redirects, so the key is only ever sent to the base URL. Surrounding
    /// whitespace (a trailing newline from a secrets file) is ignored.
    ///
    /// # Errors
    ///
    /// [`ClientErrorKind::Unauthorized`] when the key is empty or not a valid
    /// header value; [`ClientErrorKind::Transport`] when the HTTP client
    /// cannot be built (TLS initialisation).
    pub fn new(secret_key: &str) -> Result<Self, ClientError> {
        let key = secret_key.trim();
        if key.is_empty() || !key.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(ClientError::new(
                ClientErrorKind::Unauthorized,
                "the secret key is empty or contains characters no Stripe key has",
            )
            .with_should_retry(false));
        }
        let mut authorization = HeaderValue::try_from(format!("Bearer {key}")).map_err(|_| {
            ClientError::new(
                ClientErrorKind::Unauthorized,
                "the secret key is not a valid header value",
            )
            .with_should_retry(false)
        })?;
        authorization.set_sensitive(true);
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(DEFAULT_TIMEOUT)
            .build()
            .map_err(|e| {
                ClientError::new(ClientErrorKind::Transport, "cannot build the HTTP client")
                    .with_should_retry(false)
                    .with_source(e.without_url())
            })?;
        let base_url =
            Url::parse(DEFAULT_BASE_URL).map_err(|_| config_error("invalid base URL"))?;
        Ok(Self {
            http,
            authorization,
            base_url,
            stripe_version: HeaderValue::from_static(DEFAULT_STRIPE_VERSION),
            timeout: DEFAULT_TIMEOUT,
        })
    }

    /// Sends requests to `url` instead of `https://api.stripe.com` (for
    /// `stripe-mock`, tests and proxies). A path prefix is kept:
    /// `https://proxy.example/stripe` sends `/stripe/v1/…`.
    ///
    /// Plain `http` is accepted for local test servers; the secret key then
    /// crosses the network unencrypted, so use it for test keys only.
    ///
    /// # Errors
    ///
    /// [`ClientErrorKind::Transport`] (not retryable) when `url` is not an
    /// absolute `http`/`https` URL, or carries credentials, a query or a
    /// fragment.
    pub fn base_url(mut self, url: &str) -> Result<Self, ClientError> {
        let parsed =
            Url::parse(url).map_err(|_| config_error("the base URL is not a valid URL"))?;
        if !matches!(parsed.scheme(), "http" | "https") || parsed.cannot_be_a_base() {
            return Err(config_error("the base URL must be an http or https URL"));
        }
        if parsed.host_str().is_none_or(str::is_empty) {
            return Err(config_error("the base URL has no host"));
        }
        if !parsed.username().is_empty() || parsed.password().is_some() {
            return Err(config_error("the base URL must not carry credentials"));
        }
        if parsed.query().is_some() || parsed.fragment().is_some() {
            return Err(config_error(
                "the base URL must not have a query or a fragment",
            ));
        }
        self.base_url = parsed;
        Ok(self)
    }

    /// Pins the `Stripe-Version` header sent on every request (default
    /// [`DEFAULT_STRIPE_VERSION`]).
    ///
    /// # Errors
    ///
    /// [`ClientErrorKind::Transport`] (not retryable) when `version` is empty
    /// or has characters other than `[A-Za-z0-9._-]`.
    pub fn stripe_version(mut self, version: &str) -> Result<Self, ClientError> {
        let valid = !version.is_empty()
            && version.len() <= 64
            && version
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        if !valid {
            return Err(config_error(
                "the Stripe-Version is not a valid API version",
            ));
        }
        self.stripe_version = HeaderValue::from_str(version)
            .map_err(|_| config_error("the Stripe-Version is not a valid API version"))?;
        Ok(self)
    }

    /// The total time allowed for one request: connecting, sending and
    /// reading the whole answer (default [`DEFAULT_TIMEOUT`]). A timeout is
    /// a retryable [`ClientErrorKind::Transport`] error; a
    /// [`RequestBudget`](super::RequestBudget) around the client retries it
    /// with the same allowance.
    #[must_use]
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Uses `client` (for shared pools, proxies or custom TLS roots) instead
    /// of the client built by [`HttpStripeClient::new`]. The per-request
    /// [`timeout`](Self::timeout) still applies. The given client's redirect
    /// policy is kept; disable redirects on it so the key cannot follow one.
    #[must_use]
    pub fn with_http_client(mut self, client: reqwest::Client) -> Self {
        self.http = client;
        self
    }

    /// The configured `Stripe-Version`.
    pub fn api_version(&self) -> &str {
        self.stripe_version
            .to_str()
            .unwrap_or(DEFAULT_STRIPE_VERSION)
    }

    /// The configured base URL.
    pub fn api_base_url(&self) -> &str {
        self.base_url.as_str()
    }

    /// `base_url` + `segments`. Callers validate every variable segment.
    fn url(&self, segments: &[&str]) -> Url {
        let mut url = self.base_url.clone();
        if let Ok(mut path) = url.path_segments_mut() {
            path.pop_if_empty().extend(segments);
        }
        url
    }

    fn headers(&self) -> HeaderMap {
        let mut headers = HeaderMap::with_capacity(5);
        headers.insert(AUTHORIZATION, self.authorization.clone());
        headers.insert(
            HeaderName::from_static("stripe-version"),
            self.stripe_version.clone(),
        );
        headers.insert(ACCEPT, HeaderValue::from_static("application/json"));
        headers.insert(
            USER_AGENT,
            HeaderValue::from_static(concat!("stripe-webhook-guard/", env!("CARGO_PKG_VERSION"))),
        );
        headers
    }

    /// `GET url`, one request (never retried), about `account` (sent as
    /// `Stripe-Account`); the 2xx body (at most `limit` bytes) with the
    /// server's `Date`, or the error with what the server said about
    /// retrying.
    async fn get(
        &self,
        url: &Url,
        account: Option<&str>,
        limit: usize,
    ) -> Result<Response<Vec<u8>>, ClientError> {
        let mut headers = self.headers();
        if let Some(account) = account {
            check_id("account", account)?;
            let value = HeaderValue::from_str(account)
                .map_err(|_| config_error("the account id is not a valid header value"))?;
            headers.insert(HeaderName::from_static("stripe-account"), value);
        }
        let response = self
            .http
            .get(url.clone())
            .headers(headers)
            .timeout(self.timeout)
            .send()
            .await
            .map_err(transport_error)?;
        if response.status().is_success() {
            let date = response
                .headers()
                .get(reqwest::header::DATE)
                .and_then(|v| v.to_str().ok())
                .and_then(parse_http_date);
            let body = read_body(response, limit).await?;
            Ok(Response::new(body).with_date(date))
        } else {
            Err(self.error_from_response(response).await)
        }
    }

    /// The [`ClientError`] for a non-2xx answer.
    async fn error_from_response(&self, response: reqwest::Response) -> ClientError {
        let status = response.status().as_u16();
        let headers = response.headers();
        let retry_after = headers
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(|secs| time::Duration::seconds(i64::try_from(secs).unwrap_or(i64::MAX)));
        let should_retry = headers
            .get("stripe-should-retry")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| match v.trim() {
                t if t.eq_ignore_ascii_case("true") => Some(true),
                t if t.eq_ignore_ascii_case("false") => Some(false),
                _ => None,
            });
        let request_id = headers
            .get("request-id")
            .and_then(|v| v.to_str().ok())
            .filter(|v| is_valid_id(v))
            .map(str::to_owned);
        let kind = match status {
            404 => ClientErrorKind::NotFound,
            429 => ClientErrorKind::RateLimited,
            401 | 403 => ClientErrorKind::Unauthorized,
            _ => ClientErrorKind::Api,
        };
        let detail = read_body(response, MAX_ERROR_BODY_BYTES)
            .await
            .ok()
            .and_then(|body| stripe_error_detail(&body, self.secret_key()));
        let mut message = detail.unwrap_or_else(|| format!("HTTP {status} without a Stripe error"));
        if let Some(id) = request_id {
            message.push_str(" (request ");
            message.push_str(&id);
            message.push(')');
        }
        let mut err = ClientError::new(kind, message).with_status(status);
        if let Some(retry_after) = retry_after {
            err = err.with_retry_after(retry_after);
        }
        if let Some(should_retry) = should_retry {
            err = err.with_should_retry(should_retry);
        }
        err
    }

    /// The key itself, for scrubbing it from Stripe's messages.
    fn secret_key(&self) -> Option<&str> {
        self.authorization
            .to_str()
            .ok()
            .and_then(|v| v.strip_prefix("Bearer "))
    }

    /// One page of a list: each item is read by `item` (`what` names it in
    /// errors).
    async fn get_list<T>(
        &self,
        url: &Url,
        account: Option<&str>,
        what: &str,
        item: impl Fn(&str) -> Result<T, String>,
    ) -> Result<Response<Page<T>>, ClientError> {
        let answer = self.get(url, account, MAX_RESPONSE_BYTES).await?;
        let list = parse_list(&answer.data)?;
        let data = list
            .data
            .iter()
            .enumerate()
            .map(|(i, raw)| {
                item(raw.get())
                    .map_err(|e| invalid_response(format!("{what} {i} of the list: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Response::new(Page {
            data,
            has_more: list.has_more,
        })
        .with_date(answer.date))
    }
}

#[async_trait]
impl StripeClient for HttpStripeClient {
    async fn retrieve_subscription(
        &self,
        account: Option<&str>,
        id: &str,
    ) -> Result<Response<SubscriptionView>, ClientError> {
        check_id("subscription", id)?;
        let mut url = self.url(&["v1", "subscriptions", id]);
        // A test clock's simulated time (`frozen_time`) stamps the refetch.
        url.query_pairs_mut().append_pair("expand[]", "test_clock");
        let answer = self.get(&url, account, MAX_RESPONSE_BYTES).await?;
        let text = std::str::from_utf8(&answer.data)
            .map_err(|_| invalid_response("the subscription is not UTF-8".to_owned()))?;
        let view = SubscriptionView::from_json(text)
            .map_err(|e| invalid_response(format!("subscription: {e}")))?;
        if view.id.as_deref() != Some(id) {
            return Err(invalid_response(
                "the answer is not the requested subscription".to_owned(),
            ));
        }
        Ok(Response::new(view).with_date(answer.date))
    }

    async fn list_subscriptions(
        &self,
        account: Option<&str>,
        query: &SubscriptionListQuery,
    ) -> Result<Response<Page<SubscriptionView>>, ClientError> {
        let mut url = self.url(&["v1", "subscriptions"]);
        {
            let mut pairs = url.query_pairs_mut();
            pairs.append_pair("status", "all");
            pairs.append_pair("expand[]", "data.test_clock");
            if let Some(customer) = &query.customer {
                pairs.append_pair("customer", customer);
            }
            if let Some(after) = &query.starting_after {
                pairs.append_pair("starting_after", after);
            }
            pairs.append_pair("limit", &page_size(query.limit).to_string());
        }
        self.get_list(&url, account, "subscription", |raw| {
            SubscriptionView::from_json(raw).map_err(|e| e.to_string())
        })
        .await
    }

    async fn list_events(
        &self,
        account: Option<&str>,
        query: &EventListQuery,
    ) -> Result<Response<Page<Event>>, ClientError> {
        let mut url = self.url(&["v1", "events"]);
        {
            let mut pairs = url.query_pairs_mut();
            if let Some(gte) = query.created_gte {
                pairs.append_pair("created[gte]", &gte.to_string());
            }
            if let Some(after) = &query.starting_after {
                pairs.append_pair("starting_after", after);
            }
            for event_type in &query.types {
                pairs.append_pair("types[]", event_type);
            }
            if let Some(success) = query.delivery_success {
                pairs.append_pair("delivery_success", if success { "true" } else { "false" });
            }
            pairs.append_pair("limit", &page_size(query.limit).to_string());
        }
        self.get_list(&url, account, "event", |raw| {
            Event::parse_unverified_with_limit(raw.as_bytes(), MAX_EVENT_BYTES)
                .map_err(|e| e.to_string())
        })
        .await
    }

    async fn retrieve_event(
        &self,
        account: Option<&str>,
        id: &str,
    ) -> Result<Response<Event>, ClientError> {
        check_id("event", id)?;
        let url = self.url(&["v1", "events", id]);
        let answer = self.get(&url, account, MAX_EVENT_BYTES).await?;
        let event = Event::parse_unverified_with_limit(&answer.data, MAX_EVENT_BYTES)
            .map_err(|e| invalid_response(format!("event: {e}")))?;
        if event.id() != id {
            return Err(invalid_response(
                "the answer is not the requested event".to_owned(),
            ));
        }
        Ok(Response::new(event).with_date(answer.date))
    }

    async fn list_active_entitlements(
        &self,
        account: Option<&str>,
        query: &EntitlementListQuery,
    ) -> Result<Response<Page<ActiveEntitlement>>, ClientError> {
        let mut url = self.url(&["v1", "entitlements", "active_entitlements"]);
        {
            let mut pairs = url.query_pairs_mut();
            pairs.append_pair("customer", &query.customer);
            if let Some(after) = &query.starting_after {
                pairs.append_pair("starting_after", after);
            }
            pairs.append_pair("limit", &page_size(query.limit).to_string());
        }
        self.get_list(&url, account, "entitlement", |raw| {
            serde_json::from_str::<ActiveEntitlement>(raw)
                .map_err(|e| format!("the entitlement {}", json_problem(&e)))
        })
        .await
    }
}

/// `{"object":"list","data":[…],"has_more":…}` with the items kept raw.
#[derive(Deserialize)]
struct ListEnvelope<'a> {
    #[serde(default)]
    object: Option<String>,
    #[serde(borrow)]
    data: Vec<&'a RawValue>,
    has_more: bool,
}

fn parse_list(body: &[u8]) -> Result<ListEnvelope<'_>, ClientError> {
    let list: ListEnvelope<'_> = serde_json::from_slice(body)
        .map_err(|e| invalid_response(format!("the list {}", json_problem(&e))))?;
    match list.object.as_deref() {
        None | Some("list") => Ok(list),
        Some(_) => Err(invalid_response(
            "the answer is not a list object".to_owned(),
        )),
    }
}

/// `{"error":{"type","code","message",…}}`.
#[derive(Deserialize)]
struct ErrorEnvelope {
    error: StripeErrorBody,
}

#[derive(Deserialize)]
struct StripeErrorBody {
    #[serde(default, rename = "type")]
    error_type: Option<String>,
    #[serde(default)]
    code: Option<String>,
    #[serde(default)]
    message: Option<String>,
}

/// `type/code: message` from Stripe's error JSON: codes only when they look
/// like codes, the message shortened, stripped of control characters and of
/// anything that looks like an API key.
fn stripe_error_detail(body: &[u8], secret_key: Option<&str>) -> Option<String> {
    let envelope: ErrorEnvelope = serde_json::from_slice(body).ok()?;
    let error = envelope.error;
    let is_code = |s: &&String| {
        !s.is_empty()
            && s.len() <= 64
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
    };
    let label = match (
        error.error_type.as_ref().filter(is_code),
        error.code.as_ref().filter(is_code),
    ) {
        (Some(t), Some(c)) => format!("{t}/{c}"),
        (Some(t), None) => t.clone(),
        (None, Some(c)) => c.clone(),
        (None, None) => "stripe_error".to_owned(),
    };
    match error
        .message
        .as_deref()
        .map(|m| sanitize_message(m, secret_key))
    {
        Some(message) if !message.is_empty() => Some(format!("{label}: {message}")),
        _ => Some(label),
    }
}

/// Removes control characters and key-like words, and shortens.
fn sanitize_message(message: &str, secret_key: Option<&str>) -> String {
    let mut text = message.to_owned();
    if let Some(key) = secret_key.filter(|k| !k.is_empty()) {
        text = text.replace(key, REDACTED);
    }
    let words: Vec<&str> = text
        .split(|c: char| c.is_whitespace() || c.is_control())
        .filter(|w| !w.is_empty())
        .map(|w| if looks_like_key(w) { REDACTED } else { w })
        .collect();
    let joined = words.join(" ");
    match joined.char_indices().nth(MAX_MESSAGE_CHARS) {
        Some((cut, _)) => format!("{}…", &joined[..cut]),
        None => joined,
    }
}

/// Secret and restricted keys (`sk_…`, `rk_…`), possibly quoted.
fn looks_like_key(word: &str) -> bool {
    let word = word.trim_start_matches(|c: char| !c.is_ascii_alphanumeric());
    ["sk_live_", "sk_test_", "rk_live_", "rk_test_"]
        .iter()
        .any(|prefix| word.starts_with(prefix))
}

/// Reads at most `limit` bytes of body.
async fn read_body(mut response: reqwest::Response, limit: usize) -> Result<Vec<u8>, ClientError> {
    if let Some(len) = response.content_length()
        && usize::try_from(len).map_or(true, |len| len > limit)
    {
        return Err(too_large(limit));
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(transport_error)? {
        if body.len().saturating_add(chunk.len()) > limit {
            return Err(too_large(limit));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

fn too_large(limit: usize) -> ClientError {
    invalid_response(format!("the response body exceeds {limit} bytes"))
}

fn transport_error(e: reqwest::Error) -> ClientError {
    let what = if e.is_timeout() {
        "the request timed out"
    } else if e.is_connect() {
        "cannot connect"
    } else if e.is_body() || e.is_decode() {
        "the connection failed while reading the answer"
    } else if e.is_builder() {
        return ClientError::new(ClientErrorKind::Transport, "cannot build the request")
            .with_should_retry(false)
            .with_source(e.without_url());
    } else {
        "the request failed"
    };
    ClientError::new(ClientErrorKind::Transport, what).with_source(e)
}

fn invalid_response(message: String) -> ClientError {
    ClientError::new(ClientErrorKind::InvalidResponse, message)
}

fn config_error(message: &str) -> ClientError {
    ClientError::new(ClientErrorKind::Transport, message).with_should_retry(false)
}

/// A `serde_json` error described without quoting the input.
fn json_problem(e: &serde_json::Error) -> String {
    use serde_json::error::Category;
    let (line, column) = (e.line(), e.column());
    match e.classify() {
        Category::Syntax | Category::Eof | Category::Io => {
            format!("is not valid JSON (line {line}, column {column})")
        }
        Category::Data => {
            let text = e.to_string();
            let detail = ["missing field", "duplicate field"]
                .iter()
                .find(|p| text.starts_with(*p))
                .and_then(|_| text.split(" at line ").next())
                .unwrap_or("unexpected type or value");
            format!("does not have the expected shape: {detail} (line {line}, column {column})")
        }
    }
}

fn is_valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

fn check_id(what: &str, id: &str) -> Result<(), ClientError> {
    if is_valid_id(id) {
        Ok(())
    } else {
        Err(ClientError::new(
            ClientErrorKind::NotFound,
            format!("not a valid {what} id (1 to {MAX_ID_LEN} characters of [A-Za-z0-9_])"),
        )
        .with_should_retry(false))
    }
}

/// 0 → 100; Stripe allows 1–100.
fn page_size(limit: u32) -> u32 {
    if limit == 0 {
        MAX_PAGE_SIZE
    } else {
        limit.min(MAX_PAGE_SIZE)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_validated() {
        assert!(is_valid_id("sub_1Pgc6rB7WZ01zgkWNy0Cn5nw"));
        for bad in ["", "..", ".", "a/b", "a?b", "a#b", "a%2F", "a b", "é"] {
            assert!(!is_valid_id(bad), "{bad:?}");
        }
        assert!(!is_valid_id(&"a".repeat(MAX_ID_LEN + 1)));
    }

    #[test]
    fn messages_are_scrubbed() {
        let body = br#"{"error":{"type":"invalid_request_error","code":"api_key_expired",
            "message":"Expired API Key provided: sk_test_abc123.\nAlso 'rk_live_zzz' and\u0007bell"}}"#;
        let detail = stripe_error_detail(body, Some("sk_test_abc123")).unwrap();
        assert_eq!(
            detail,
            "invalid_request_error/api_key_expired: Expired API Key provided: [redacted]. Also [redacted] and bell"
        );
        let long = format!(r#"{{"error":{{"message":"{}"}}}}"#, "x".repeat(1000));
        let detail = stripe_error_detail(long.as_bytes(), None).unwrap();
        assert!(detail.chars().count() < MAX_MESSAGE_CHARS + 40);
        assert_eq!(stripe_error_detail(b"<html>", None), None);
    }

    #[test]
    fn urls_keep_a_path_prefix() {
        let client = HttpStripeClient::new("sk_test_x")
            .unwrap()
            .base_url("http://127.0.0.1:9/proxy/")
            .unwrap();
        assert_eq!(
            client.url(&["v1", "events", "evt_1"]).as_str(),
            "http://127.0.0.1:9/proxy/v1/events/evt_1"
        );
        for bad in [
            "ftp://x",
            "not a url",
            "http://u:p@host",
            "http://host/?q=1",
            "mailto:a@b",
        ] {
            assert!(
                HttpStripeClient::new("sk_test_x")
                    .unwrap()
                    .base_url(bad)
                    .is_err(),
                "{bad}"
            );
        }
    }
}
