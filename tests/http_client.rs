//! `HttpStripeClient` against a small HTTP/1.1 server started inside each
//! test: the bundled Stripe fixtures in both API shapes, the query strings
//! and headers sent, error mapping, redaction of the key, and retries, which
//! happen in a `RequestBudget` around the client (the client itself sends
//! one request per call).
#![cfg(feature = "reqwest")]

use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use stripe_webhook_guard::client::http::{DEFAULT_STRIPE_VERSION, HttpStripeClient};
use stripe_webhook_guard::client::{
    BudgetConfig, ClientError, ClientErrorKind, EventListQuery, RequestBudget, StripeClient,
    SubscriptionListQuery,
};
use stripe_webhook_guard::clock::SystemClock;
use stripe_webhook_guard::event::{ApiShape, Event, EventType, SubscriptionStatus};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const KEY: &str = "sk_test_51HttpClientTestKey0123456789abcdefXYZ";
const SUB_ID: &str = "sub_1Pgc6rB7WZ01zgkWNy0Cn5nw";
const CUSTOMER: &str = "cus_QXg1o8vcGmoR32";
const VERSIONS: [&str; 3] = ["2025-02-24.acacia", "2025-03-31.basil", "2026-07-29.dahlia"];

// ---------------------------------------------------------------- fixtures

fn fixture(name: &str) -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/fixtures/stripe")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn subscription(version: &str) -> String {
    fixture(&format!("subscription.{version}.json"))
}

fn event_fixture_names() -> Vec<String> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/fixtures/stripe");
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| {
            n.starts_with("event.")
                && std::path::Path::new(n)
                    .extension()
                    .is_some_and(|x| x == "json")
        })
        .collect();
    names.sort();
    names
}

fn list(items: &[String], has_more: bool) -> String {
    format!(
        r#"{{"object":"list","url":"/v1/x","has_more":{has_more},"data":[{}]}}"#,
        items.join(",")
    )
}

fn stripe_error(kind: &str, code: &str, message: &str) -> String {
    serde_json::json!({
        "error": {
            "type": kind,
            "code": code,
            "message": message,
            "doc_url": "https://stripe.com/docs/error-codes/SECRET_DOC_MARKER",
            "request_log_url": "https://dashboard.stripe.com/LOG_MARKER",
        }
    })
    .to_string()
}

// ------------------------------------------------------------ test server

/// One request as the server saw it (query decoded, header names lowercase).
#[derive(Debug, Clone)]
struct Request {
    method: String,
    path: String,
    query: Vec<(String, String)>,
    headers: Vec<(String, String)>,
}

impl Request {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    fn query_all(&self, name: &str) -> Vec<&str> {
        self.query
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }

    fn query(&self, name: &str) -> Option<&str> {
        let all = self.query_all(name);
        assert!(all.len() <= 1, "{name} sent {} times", all.len());
        all.first().copied()
    }

    fn query_names(&self) -> Vec<&str> {
        self.query.iter().map(|(n, _)| n.as_str()).collect()
    }
}

/// A canned answer.
struct Reply {
    status: u16,
    headers: Vec<(&'static str, String)>,
    body: Vec<u8>,
    delay: Duration,
}

impl Reply {
    fn json(status: u16, body: impl Into<Vec<u8>>) -> Self {
        Self {
            status,
            headers: vec![("Content-Type", "application/json".to_owned())],
            body: body.into(),
            delay: Duration::ZERO,
        }
    }

    fn header(mut self, name: &'static str, value: &str) -> Self {
        self.headers.push((name, value.to_owned()));
        self
    }

    fn delayed(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }
}

type Handler = dyn Fn(&Request, usize) -> Reply + Send + Sync;

/// A one-request-per-connection HTTP/1.1 server on 127.0.0.1:0 that records
/// every request and answers with `handler(request, index)`.
struct Server {
    base: String,
    log: Arc<Mutex<Vec<Request>>>,
}

impl Server {
    async fn start(handler: impl Fn(&Request, usize) -> Reply + Send + Sync + 'static) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let log = Arc::new(Mutex::new(Vec::new()));
        let handler: Arc<Handler> = Arc::new(handler);
        let task_log = Arc::clone(&log);
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let log = Arc::clone(&task_log);
                let handler = Arc::clone(&handler);
                tokio::spawn(async move {
                    let _ = serve(stream, &log, &*handler).await;
                });
            }
        });
        Self { base, log }
    }

    fn requests(&self) -> Vec<Request> {
        self.log.lock().unwrap().clone()
    }

    fn client(&self) -> HttpStripeClient {
        HttpStripeClient::new(KEY)
            .unwrap()
            .base_url(&self.base)
            .unwrap()
    }

    /// [`Server::client`] in a budget that retries `max_retries` times with
    /// a 2 ms base back-off, on the system clock.
    fn budget(&self, max_retries: u32) -> RequestBudget {
        budget(self.client(), max_retries)
    }
}

/// `client` in a budget that retries `max_retries` times with a 2 ms base
/// back-off and no noticeable pacing, on the system clock.
fn budget(client: HttpStripeClient, max_retries: u32) -> RequestBudget {
    RequestBudget::new(
        Arc::new(client),
        Arc::new(SystemClock),
        BudgetConfig {
            requests_per_second: 1000,
            max_retries,
            base_backoff: time::Duration::milliseconds(2),
            ..BudgetConfig::default()
        },
    )
}

async fn serve(
    mut stream: TcpStream,
    log: &Mutex<Vec<Request>>,
    handler: &Handler,
) -> std::io::Result<()> {
    let mut buf = Vec::new();
    let mut chunk = [0_u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        let n = stream.read(&mut chunk).await?;
        if n == 0 || buf.len() > 64 * 1024 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let mut request_line = lines.next().unwrap_or_default().split(' ');
    let method = request_line.next().unwrap_or_default().to_owned();
    let target = request_line.next().unwrap_or_default().to_owned();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let url = reqwest::Url::parse(&format!("http://server{target}")).unwrap();
    let request = Request {
        method,
        path: url.path().to_owned(),
        query: url.query_pairs().into_owned().collect(),
        headers,
    };
    let reply = {
        let mut log = log.lock().unwrap();
        let index = log.len();
        log.push(request.clone());
        drop(log);
        handler(&request, index)
    };
    if !reply.delay.is_zero() {
        tokio::time::sleep(reply.delay).await;
    }
    let mut out = format!(
        "HTTP/1.1 {} Status\r\nContent-Length: {}\r\nConnection: close\r\n",
        reply.status,
        reply.body.len()
    );
    for (name, value) in &reply.headers {
        writeln!(out, "{name}: {value}\r").unwrap();
    }
    out.push_str("\r\n");
    stream.write_all(out.as_bytes()).await?;
    stream.write_all(&reply.body).await?;
    stream.shutdown().await
}

// --------------------------------------------------------------- asserts

/// Every request is a GET with the key and the pinned version.
fn assert_headers(requests: &[Request], version: &str) {
    assert!(!requests.is_empty());
    for r in requests {
        assert_eq!(r.method, "GET", "{r:?}");
        assert_eq!(
            r.header("authorization"),
            Some(format!("Bearer {KEY}").as_str()),
            "{}",
            r.path
        );
        assert_eq!(r.header("stripe-version"), Some(version), "{}", r.path);
    }
}

/// The key appears nowhere in the error, its debug output or its sources.
fn assert_no_key(err: &ClientError) {
    let mut texts = vec![err.to_string(), format!("{err:?}"), format!("{err:#?}")];
    let mut source = std::error::Error::source(err);
    while let Some(s) = source {
        texts.push(s.to_string());
        texts.push(format!("{s:?}"));
        source = s.source();
    }
    for text in texts {
        assert!(!text.contains(KEY), "key leaked: {text}");
        assert!(!text.contains("0123456789abcdef"), "key leaked: {text}");
    }
}

// ----------------------------------------------------------------- tests

#[tokio::test]
async fn retrieve_subscription_reads_every_api_shape() {
    let server = Server::start(|r, i| {
        assert_eq!(r.path, format!("/v1/subscriptions/{SUB_ID}"));
        Reply::json(200, subscription(VERSIONS[i % 3]))
    })
    .await;
    let client = server.client();
    for version in VERSIONS {
        let s = client
            .retrieve_subscription(None, SUB_ID)
            .await
            .unwrap()
            .data;
        assert_eq!(s.id.as_deref(), Some(SUB_ID), "{version}");
        assert_eq!(s.customer.as_deref(), Some(CUSTOMER), "{version}");
        assert_eq!(s.status, SubscriptionStatus::Active, "{version}");
        if version == "2025-02-24.acacia" {
            // Top-level period, none on the item.
            assert_eq!(s.shape, ApiShape::PreBasil);
            assert_eq!(s.current_period_end, Some(1_234_567_890));
            assert_eq!(s.items[0].current_period_end, None);
        } else {
            // Item-level period (the fixtures' placeholder end precedes the start).
            assert_eq!(s.shape, ApiShape::Basil, "{version}");
            assert_eq!(s.current_period_end, Some(976_287_773), "{version}");
            assert_eq!(s.items[0].current_period_end, Some(976_287_773));
        }
    }
    let requests = server.requests();
    assert_eq!(requests.len(), 3);
    assert_headers(&requests, DEFAULT_STRIPE_VERSION);
    // Only the test clock is expanded (its `frozen_time` stamps a refetch).
    assert!(
        requests
            .iter()
            .all(|r| r.query == [("expand[]".to_owned(), "test_clock".to_owned())])
    );
}

#[tokio::test]
async fn customer_subscriptions_are_paged_with_starting_after() {
    let server = Server::start(|r, _| {
        assert_eq!(r.path, "/v1/subscriptions");
        match r.query("starting_after") {
            None => Reply::json(
                200,
                list(
                    &[
                        subscription(VERSIONS[0]).replace(SUB_ID, "sub_A"),
                        subscription(VERSIONS[1]).replace(SUB_ID, "sub_B"),
                    ],
                    true,
                ),
            ),
            Some("sub_B") => Reply::json(
                200,
                list(&[subscription(VERSIONS[2]).replace(SUB_ID, "sub_C")], false),
            ),
            Some(_) => Reply::json(400, stripe_error("invalid_request_error", "x", "bad")),
        }
    })
    .await;
    let subs = server
        .client()
        .list_customer_subscriptions(None, CUSTOMER)
        .await
        .unwrap()
        .data;
    let ids: Vec<_> = subs.iter().map(|s| s.id.as_deref().unwrap()).collect();
    assert_eq!(ids, ["sub_A", "sub_B", "sub_C"]);
    assert_eq!(subs[0].shape, ApiShape::PreBasil);
    assert_eq!(subs[0].current_period_end, Some(1_234_567_890));
    assert_eq!(subs[1].shape, ApiShape::Basil);
    assert_eq!(subs[1].current_period_end, Some(976_287_773));
    assert_eq!(subs[2].shape, ApiShape::Basil);
    assert_eq!(subs[2].current_period_end, Some(976_287_773));
    assert!(subs[2].cancel_at_period_end);

    let requests = server.requests();
    assert_eq!(requests.len(), 2);
    assert_headers(&requests, DEFAULT_STRIPE_VERSION);
    for r in &requests {
        assert_eq!(r.query("status"), Some("all"));
        assert_eq!(r.query("customer"), Some(CUSTOMER));
        assert_eq!(r.query("limit"), Some("100"));
        assert_eq!(r.query("expand[]"), Some("data.test_clock"));
    }
    assert_eq!(requests[0].query("starting_after"), None);
    assert_eq!(requests[1].query("starting_after"), Some("sub_B"));
}

#[tokio::test]
async fn list_subscriptions_query_and_limits() {
    let server = Server::start(|_, _| Reply::json(200, list(&[], false))).await;
    let client = server.client();
    for (limit, sent) in [(0, "100"), (7, "7"), (100, "100"), (500, "100")] {
        let page = client
            .list_subscriptions(
                None,
                &SubscriptionListQuery {
                    customer: None,
                    starting_after: Some("sub_x".to_owned()),
                    limit,
                },
            )
            .await
            .unwrap()
            .data;
        assert!(page.data.is_empty() && !page.has_more);
        let r = server.requests().pop().unwrap();
        assert_eq!(
            r.query_names(),
            ["status", "expand[]", "starting_after", "limit"]
        );
        assert_eq!(r.query("status"), Some("all"));
        assert_eq!(r.query("starting_after"), Some("sub_x"));
        assert_eq!(r.query("limit"), Some(sent), "limit {limit}");
    }
    // Values are encoded, never spliced into the URL.
    client
        .list_subscriptions(
            None,
            &SubscriptionListQuery {
                customer: Some("cus_1&status=active#x".to_owned()),
                ..SubscriptionListQuery::default()
            },
        )
        .await
        .unwrap();
    let r = server.requests().pop().unwrap();
    assert_eq!(r.query("customer"), Some("cus_1&status=active#x"));
    assert_eq!(r.query("status"), Some("all"));
    assert_headers(&server.requests(), DEFAULT_STRIPE_VERSION);
}

#[tokio::test]
async fn list_events_sends_every_filter_and_parses_every_fixture() {
    let names = event_fixture_names();
    assert_eq!(names.len(), 11);
    let bodies: Vec<String> = names.iter().map(|n| fixture(n)).collect();
    let expected: Vec<Event> = bodies
        .iter()
        .map(|b| Event::parse_unverified(b.as_bytes()).unwrap())
        .collect();
    let page_body = list(&bodies, true);
    let server = Server::start(move |r, _| {
        assert_eq!(r.path, "/v1/events");
        Reply::json(200, page_body.clone())
    })
    .await;
    let client = server.client();
    let page = client
        .list_events(
            None,
            &EventListQuery {
                created_gte: Some(1_700_000_000),
                starting_after: Some("evt_prev".to_owned()),
                types: vec![
                    "customer.subscription.updated".to_owned(),
                    "invoice.paid".to_owned(),
                ],
                delivery_success: Some(false),
                limit: 0,
            },
        )
        .await
        .unwrap()
        .data;
    assert!(page.has_more);
    assert_eq!(page.data, expected);
    assert!(
        page.data
            .iter()
            .any(|e| *e.event_type() == EventType::SubscriptionUpdated)
    );

    let r = server.requests().pop().unwrap();
    assert_eq!(r.query("created[gte]"), Some("1700000000"));
    assert_eq!(r.query("starting_after"), Some("evt_prev"));
    assert_eq!(
        r.query_all("types[]"),
        ["customer.subscription.updated", "invoice.paid"]
    );
    assert_eq!(r.query("delivery_success"), Some("false"));
    assert_eq!(r.query("limit"), Some("100"));

    // No filters: only the page size.
    client
        .list_events(
            None,
            &EventListQuery {
                limit: 25,
                delivery_success: Some(true),
                ..EventListQuery::default()
            },
        )
        .await
        .unwrap();
    let r = server.requests().pop().unwrap();
    assert_eq!(r.query_names(), ["delivery_success", "limit"]);
    assert_eq!(r.query("delivery_success"), Some("true"));
    assert_eq!(r.query("limit"), Some("25"));
    assert_headers(&server.requests(), DEFAULT_STRIPE_VERSION);
}

#[tokio::test]
async fn retrieve_event_of_every_version() {
    let server = Server::start(|r, i| {
        assert_eq!(r.path, "/v1/events/evt_1Pgc76B7WZ01zgkWwyRHS12y");
        Reply::json(
            200,
            fixture(&format!("event.plan.created.{}.json", VERSIONS[i % 3])),
        )
    })
    .await;
    let client = server.client();
    for _ in VERSIONS {
        let e = client
            .retrieve_event(None, "evt_1Pgc76B7WZ01zgkWwyRHS12y")
            .await
            .unwrap()
            .data;
        assert_eq!(e.id(), "evt_1Pgc76B7WZ01zgkWwyRHS12y");
        assert_eq!(e.event_type().as_str(), "plan.created");
        assert_eq!(e.created(), 1_234_567_890);
    }
    assert_headers(&server.requests(), DEFAULT_STRIPE_VERSION);
}

#[tokio::test]
async fn pinned_version_and_path_prefix() {
    let server = Server::start(|r, _| {
        assert_eq!(
            r.path,
            "/proxy/stripe/v1/events/evt_1ADKLLLWlyqCpbLp0qRyqExL"
        );
        Reply::json(
            200,
            fixture("event.invoiceitem.updated.2017-04-06.stripe-dotnet.json"),
        )
    })
    .await;
    let client = HttpStripeClient::new(KEY)
        .unwrap()
        .base_url(&format!("{}/proxy/stripe/", server.base))
        .unwrap()
        .stripe_version("2026-07-29.dahlia")
        .unwrap();
    assert_eq!(client.api_version(), "2026-07-29.dahlia");
    let e = client
        .retrieve_event(None, "evt_1ADKLLLWlyqCpbLp0qRyqExL")
        .await
        .unwrap()
        .data;
    assert_eq!(e.api_version(), Some("2017-04-06"));
    assert_headers(&server.requests(), "2026-07-29.dahlia");
    assert!(
        HttpStripeClient::new(KEY)
            .unwrap()
            .stripe_version("2025-03-31\r\nX-Evil: 1")
            .is_err()
    );
}

#[tokio::test]
async fn rate_limits_and_server_errors_are_retried() {
    let server = Server::start(|_, i| match i {
        0 => Reply::json(
            429,
            stripe_error("rate_limit_error", "rate_limit", "Too many"),
        )
        .header("Retry-After", "0"),
        1 => Reply::json(500, stripe_error("api_error", "x", "oops")),
        _ => Reply::json(200, subscription(VERSIONS[1])),
    })
    .await;
    let budget = server.budget(BudgetConfig::default().max_retries);
    let s = budget
        .retrieve_subscription(None, SUB_ID)
        .await
        .unwrap()
        .data;
    assert_eq!(s.id.as_deref(), Some(SUB_ID));
    let requests = server.requests();
    assert_eq!(requests.len(), 3);
    assert_eq!(budget.requests(), 3);
    assert_eq!(budget.rate_limited(), 1);
    assert_headers(&requests, DEFAULT_STRIPE_VERSION);
}

#[tokio::test]
async fn retry_after_is_honoured() {
    let server = Server::start(|_, i| match i {
        0 => Reply::json(
            429,
            stripe_error("rate_limit_error", "rate_limit", "Slow down"),
        )
        .header("Retry-After", "1"),
        _ => Reply::json(200, list(&[], false)),
    })
    .await;
    let started = Instant::now();
    server
        .budget(BudgetConfig::default().max_retries)
        .list_events(None, &EventListQuery::default())
        .await
        .unwrap();
    let elapsed = started.elapsed();
    assert!(elapsed >= Duration::from_millis(950), "{elapsed:?}");
    assert!(elapsed < Duration::from_secs(5), "{elapsed:?}");
    assert_eq!(server.requests().len(), 2);
}

#[tokio::test]
async fn rate_limit_error_after_retries_carries_retry_after() {
    let server = Server::start(|_, _| {
        Reply::json(
            429,
            stripe_error("rate_limit_error", "rate_limit", "Slow down"),
        )
        .header("Retry-After", "0")
    })
    .await;
    let err = server
        .budget(1)
        .retrieve_event(None, "evt_1")
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ClientErrorKind::RateLimited);
    assert_eq!(err.status(), Some(429));
    assert_eq!(err.retry_after(), Some(time::Duration::ZERO));
    assert!(err.is_retryable());
    assert_eq!(server.requests().len(), 2);
    assert_no_key(&err);
}

#[tokio::test]
async fn server_errors_beyond_max_retries_fail_with_the_status() {
    let server = Server::start(|_, _| {
        Reply::json(
            500,
            stripe_error("api_error", "internal", "Something broke"),
        )
        .header("Request-Id", "req_TestRequest123")
    })
    .await;
    let err = server
        .budget(2)
        .retrieve_subscription(None, SUB_ID)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ClientErrorKind::Api);
    assert_eq!(err.status(), Some(500));
    let text = err.to_string();
    assert!(
        text.contains("api_error/internal: Something broke"),
        "{text}"
    );
    assert!(text.contains("req_TestRequest123"), "{text}");
    assert!(!text.contains("MARKER"), "body leaked: {text}");
    assert_eq!(server.requests().len(), 3);
    assert_headers(&server.requests(), DEFAULT_STRIPE_VERSION);
    assert_no_key(&err);

    // The budget's default is five retries.
    let server = Server::start(|_, _| Reply::json(503, "Service Unavailable")).await;
    let err = server
        .budget(BudgetConfig::default().max_retries)
        .retrieve_event(None, "evt_1")
        .await
        .unwrap_err();
    assert_eq!(
        (err.kind(), err.status()),
        (ClientErrorKind::Api, Some(503))
    );
    assert!(!err.to_string().contains("Service Unavailable"));
    assert_eq!(BudgetConfig::default().max_retries, 5);
    assert_eq!(server.requests().len(), 6);
}

#[tokio::test]
async fn stripe_should_retry_header_decides() {
    // false: a 500 is not retried.
    let server = Server::start(|_, _| {
        Reply::json(500, stripe_error("api_error", "x", "no"))
            .header("Stripe-Should-Retry", "false")
    })
    .await;
    let err = server
        .budget(BudgetConfig::default().max_retries)
        .retrieve_subscription(None, SUB_ID)
        .await
        .unwrap_err();
    assert_eq!(
        (err.kind(), err.status()),
        (ClientErrorKind::Api, Some(500))
    );
    assert!(!err.is_retryable());
    assert_eq!(server.requests().len(), 1);

    // false: not even a 429 with Retry-After.
    let server = Server::start(|_, _| {
        Reply::json(429, stripe_error("rate_limit_error", "x", "no"))
            .header("Stripe-Should-Retry", "false")
            .header("Retry-After", "0")
    })
    .await;
    let err = server
        .budget(BudgetConfig::default().max_retries)
        .retrieve_event(None, "evt_1")
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ClientErrorKind::RateLimited);
    assert_eq!(err.retry_after(), Some(time::Duration::ZERO));
    assert!(!err.is_retryable());
    assert_eq!(server.requests().len(), 1);

    // true: even a 400 is retried.
    let server = Server::start(|_, i| match i {
        0 => Reply::json(
            400,
            stripe_error("invalid_request_error", "lock_timeout", "x"),
        )
        .header("Stripe-Should-Retry", "true"),
        _ => Reply::json(200, subscription(VERSIONS[0])),
    })
    .await;
    server
        .budget(BudgetConfig::default().max_retries)
        .retrieve_subscription(None, SUB_ID)
        .await
        .unwrap();
    assert_eq!(server.requests().len(), 2);
}

#[tokio::test]
async fn not_found_is_not_retried() {
    let server = Server::start(|_, _| {
        Reply::json(
            404,
            stripe_error(
                "invalid_request_error",
                "resource_missing",
                "No such subscription: 'sub_gone'",
            ),
        )
    })
    .await;
    let err = server
        .client()
        .retrieve_subscription(None, "sub_gone")
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ClientErrorKind::NotFound);
    assert_eq!(err.status(), Some(404));
    assert!(!err.is_retryable());
    let text = err.to_string();
    assert!(
        text.contains("invalid_request_error/resource_missing: No such subscription: 'sub_gone'"),
        "{text}"
    );
    assert!(
        !text.contains("MARKER") && !text.contains("doc_url"),
        "{text}"
    );
    assert_eq!(server.requests().len(), 1);
    assert_no_key(&err);
}

#[tokio::test]
async fn unauthorized_never_echoes_the_key() {
    for status in [401, 403] {
        let server = Server::start(move |_, _| {
            Reply::json(
                status,
                stripe_error(
                    "invalid_request_error",
                    "api_key_expired",
                    &format!("Expired API Key provided: {KEY}"),
                ),
            )
        })
        .await;
        let err = server
            .client()
            .list_events(None, &EventListQuery::default())
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ClientErrorKind::Unauthorized, "{status}");
        assert_eq!(err.status(), Some(status));
        assert!(err.to_string().contains("[redacted]"), "{err}");
        assert_eq!(server.requests().len(), 1);
        assert_no_key(&err);
    }
}

#[tokio::test]
async fn undecodable_answers_are_invalid_responses() {
    let wrong_id = subscription(VERSIONS[1]).replace(SUB_ID, "sub_other");
    let cases: Vec<(&str, String)> = vec![
        ("sub", "<html>not json</html>".to_owned()),
        ("sub", "{}".to_owned()),
        ("sub", wrong_id),
        (
            "subs",
            r#"{"object":"list","data":[{"id":"sub_1"}],"has_more":false}"#.to_owned(),
        ),
        (
            "subs",
            r#"{"object":"customer","data":[],"has_more":false}"#.to_owned(),
        ),
        ("subs", r#"{"object":"list","data":[]}"#.to_owned()),
        (
            "events",
            r#"{"object":"list","data":[[1]],"has_more":false}"#.to_owned(),
        ),
        ("events", "\u{0}\u{1}garbage".to_owned()),
        ("event", fixture("event.plan.created.2025-03-31.basil.json")),
    ];
    for (call, body) in cases {
        let reply_body = body.clone();
        let server = Server::start(move |_, _| Reply::json(200, reply_body.clone())).await;
        let client = server.client();
        let err = match call {
            "sub" => client.retrieve_subscription(None, SUB_ID).await.map(|_| ()),
            "subs" => client
                .list_subscriptions(None, &SubscriptionListQuery::default())
                .await
                .map(|_| ()),
            "events" => client
                .list_events(None, &EventListQuery::default())
                .await
                .map(|_| ()),
            // The answer names another event.
            _ => client
                .retrieve_event(None, "evt_requested")
                .await
                .map(|_| ()),
        }
        .unwrap_err();
        assert_eq!(
            err.kind(),
            ClientErrorKind::InvalidResponse,
            "{call}: {body}"
        );
        assert!(!err.is_retryable());
        assert_eq!(server.requests().len(), 1, "{call}: not retried");
        let text = err.to_string();
        assert!(
            !text.contains("garbage") && !text.contains("<html>"),
            "{text}"
        );
        assert_no_key(&err);
    }
}

#[tokio::test]
async fn closed_port_is_a_transport_error() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let client = HttpStripeClient::new(KEY)
        .unwrap()
        .base_url(&format!("http://{addr}"))
        .unwrap();
    let err = client
        .retrieve_subscription(None, SUB_ID)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ClientErrorKind::Transport);
    assert_eq!(err.status(), None);
    assert!(err.is_retryable());
    assert_no_key(&err);
}

#[tokio::test]
async fn a_slow_answer_times_out_as_transport() {
    let server = Server::start(|_, _| {
        Reply::json(200, subscription(VERSIONS[0])).delayed(Duration::from_secs(5))
    })
    .await;
    let started = Instant::now();
    let err = budget(server.client().timeout(Duration::from_millis(100)), 1)
        .retrieve_subscription(None, SUB_ID)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ClientErrorKind::Transport);
    assert!(err.to_string().contains("timed out"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(server.requests().len(), 2, "a timeout is retried");
    assert_no_key(&err);
}

/// The client alone never retries: one request per call, whatever the
/// answer, and the error says what the server asked for.
#[tokio::test]
async fn the_client_alone_sends_one_request_per_call() {
    let server = Server::start(|_, i| match i {
        0 => Reply::json(500, stripe_error("api_error", "x", "oops")),
        1 => Reply::json(
            429,
            stripe_error("rate_limit_error", "rate_limit", "Slow down"),
        )
        .header("Retry-After", "7"),
        2 => Reply::json(
            400,
            stripe_error("invalid_request_error", "lock_timeout", "x"),
        )
        .header("Stripe-Should-Retry", "true"),
        _ => Reply::json(503, "x").header("Stripe-Should-Retry", "false"),
    })
    .await;
    let client = server.client();

    let err = client
        .retrieve_subscription(None, SUB_ID)
        .await
        .unwrap_err();
    assert_eq!(err.status(), Some(500));
    assert!(err.is_retryable());
    assert_eq!(err.retry_after(), None);
    assert_eq!(server.requests().len(), 1);

    let err = client.retrieve_event(None, "evt_1").await.unwrap_err();
    assert_eq!(err.kind(), ClientErrorKind::RateLimited);
    assert_eq!(err.retry_after(), Some(time::Duration::seconds(7)));
    assert!(err.is_retryable());
    assert_eq!(server.requests().len(), 2);

    let err = client
        .list_events(None, &EventListQuery::default())
        .await
        .unwrap_err();
    assert_eq!(err.status(), Some(400));
    assert!(
        err.is_retryable(),
        "Stripe-Should-Retry: true overrides 400"
    );
    assert_eq!(server.requests().len(), 3);

    let err = client
        .list_subscriptions(None, &SubscriptionListQuery::default())
        .await
        .unwrap_err();
    assert_eq!(err.status(), Some(503));
    assert!(
        !err.is_retryable(),
        "Stripe-Should-Retry: false overrides 503"
    );
    assert_eq!(server.requests().len(), 4);

    // A timeout is not retried by the client either.
    let slow = Server::start(|_, _| {
        Reply::json(200, subscription(VERSIONS[0])).delayed(Duration::from_secs(5))
    })
    .await;
    let err = slow
        .client()
        .timeout(Duration::from_millis(100))
        .retrieve_subscription(None, SUB_ID)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ClientErrorKind::Transport);
    assert!(err.is_retryable());
    assert_eq!(slow.requests().len(), 1);
}

/// One call through a budget around the HTTP client sends at most
/// `max_retries + 1` requests: only the budget retries.
#[tokio::test]
async fn one_call_through_budget_and_client_sends_at_most_max_retries_plus_one() {
    for max_retries in [0, 1, 3, BudgetConfig::default().max_retries] {
        let server = Server::start(|_, _| Reply::json(503, "unavailable")).await;
        let budget = server.budget(max_retries);
        let err = budget.retrieve_event(None, "evt_1").await.unwrap_err();
        assert_eq!(err.status(), Some(503));
        let expected = usize::try_from(max_retries).unwrap() + 1;
        assert_eq!(
            server.requests().len(),
            expected,
            "max_retries {max_retries}"
        );
        assert_eq!(budget.requests(), u64::from(max_retries) + 1);
    }
}

#[tokio::test]
async fn unsafe_ids_are_refused_without_a_request() {
    let server = Server::start(|_, _| Reply::json(200, subscription(VERSIONS[0]))).await;
    let client = server.client();
    for id in [
        "",
        ".",
        "..",
        "sub_1/../../v1/events",
        "sub_1?status=all",
        "sub_1#x",
        "sub 1",
        "sub_%2e%2e",
        "sub_é",
    ] {
        let err = client.retrieve_subscription(None, id).await.unwrap_err();
        assert_eq!(err.kind(), ClientErrorKind::NotFound, "{id:?}");
        assert!(!err.is_retryable());
        let err = client.retrieve_event(None, id).await.unwrap_err();
        assert_eq!(err.kind(), ClientErrorKind::NotFound, "{id:?}");
    }
    assert!(server.requests().is_empty());
}

#[tokio::test]
async fn debug_output_redacts_the_key() {
    let client = HttpStripeClient::new(KEY)
        .unwrap()
        .base_url("http://127.0.0.1:9")
        .unwrap();
    for text in [format!("{client:?}"), format!("{client:#?}")] {
        assert!(!text.contains(KEY), "{text}");
        assert!(!text.contains("sk_test_"), "{text}");
        assert!(text.contains("[redacted]"), "{text}");
        assert!(text.contains(DEFAULT_STRIPE_VERSION), "{text}");
    }
}

#[test]
fn bad_keys_and_settings_are_refused() {
    for key in ["", "   ", "sk_test_a\nb", "sk_test_\u{7f}x", "sk_test_é"] {
        let err = HttpStripeClient::new(key).unwrap_err();
        assert_eq!(err.kind(), ClientErrorKind::Unauthorized, "{key:?}");
        assert!(!err.is_retryable());
        assert!(key.trim().is_empty() || !err.to_string().contains(key));
    }
    let client = HttpStripeClient::new(KEY).unwrap();
    for url in [
        "",
        "ftp://example.com",
        "http://user:pw@example.com",
        "https://x/?a=b",
    ] {
        let err = client.clone().base_url(url).unwrap_err();
        assert!(!err.is_retryable(), "{url}");
        assert_no_key(&err);
    }
    for version in ["", "2025 03", "v\u{0}"] {
        assert!(
            client.clone().stripe_version(version).is_err(),
            "{version:?}"
        );
    }
}

// ----------------------------------------------------- Connect and Date

/// Every call about a connected account carries `Stripe-Account`; calls
/// about the platform carry none.
#[tokio::test]
async fn stripe_account_is_sent_for_connected_accounts_only() {
    let server = Server::start(|r, _| match r.path.as_str() {
        "/v1/events" | "/v1/subscriptions" | "/v1/entitlements/active_entitlements" => {
            Reply::json(200, list(&[], false))
        }
        p if p.starts_with("/v1/subscriptions/") => Reply::json(200, subscription(VERSIONS[1])),
        other => panic!("unexpected path {other}"),
    })
    .await;
    let client = server.client();
    for account in [None, Some("acct_1Connected")] {
        client.retrieve_subscription(account, SUB_ID).await.unwrap();
        client
            .list_subscriptions(account, &SubscriptionListQuery::default())
            .await
            .unwrap();
        client
            .list_events(account, &EventListQuery::default())
            .await
            .unwrap();
        client
            .list_customer_entitlements(account, CUSTOMER)
            .await
            .unwrap();
        let requests = server.requests();
        let last_four = &requests[requests.len() - 4..];
        assert_headers(last_four, DEFAULT_STRIPE_VERSION);
        for r in last_four {
            assert_eq!(r.header("stripe-account"), account, "{}", r.path);
        }
    }
    // An account id that is not an id is refused without a request.
    let before = server.requests().len();
    let err = client
        .retrieve_subscription(Some("acct_1\r\nX-Evil: 1"), SUB_ID)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ClientErrorKind::NotFound);
    assert!(!err.is_retryable());
    assert_eq!(server.requests().len(), before);
}

/// The server's `Date` header comes back as Stripe's clock; a missing or
/// unreadable one as `None`.
#[tokio::test]
async fn the_date_header_is_read_as_stripes_clock() {
    let server = Server::start(|_, i| {
        let reply = Reply::json(200, subscription(VERSIONS[1]));
        match i {
            0 => reply.header("Date", "Thu, 01 Jan 2026 00:00:05 GMT"),
            1 => reply.header("Date", "not a date"),
            _ => reply,
        }
    })
    .await;
    let client = server.client();
    let dated = client.retrieve_subscription(None, SUB_ID).await.unwrap();
    assert_eq!(
        dated.date.map(time::OffsetDateTime::unix_timestamp),
        Some(1_767_225_605)
    );
    assert_eq!(dated.data.id.as_deref(), Some(SUB_ID));
    for _ in 0..2 {
        let undated = client.retrieve_subscription(None, SUB_ID).await.unwrap();
        assert_eq!(undated.date, None);
    }
}

/// `/v1/entitlements/active_entitlements` is paged with `starting_after`
/// until `has_more` is false; the keys come back sorted, without repeats.
#[tokio::test]
async fn active_entitlements_are_listed_over_every_page() {
    let entitlement = |id: &str, key: &str| {
        format!(
            r#"{{"id":"{id}","object":"entitlements.active_entitlement","feature":"feat_{key}","livemode":false,"lookup_key":"{key}"}}"#
        )
    };
    let first = list(
        &[entitlement("ent_1", "gamma"), entitlement("ent_2", "alpha")],
        true,
    );
    let second = list(&[entitlement("ent_3", "beta")], false);
    let server = Server::start(move |r, _| {
        assert_eq!(r.path, "/v1/entitlements/active_entitlements");
        assert_eq!(r.query("customer"), Some(CUSTOMER));
        assert_eq!(r.query("limit"), Some("100"));
        match r.query("starting_after") {
            None => Reply::json(200, first.clone()),
            Some("ent_2") => Reply::json(200, second.clone()),
            Some(other) => panic!("unexpected starting_after {other}"),
        }
    })
    .await;
    let keys = server
        .client()
        .list_customer_entitlements(None, CUSTOMER)
        .await
        .unwrap()
        .data;
    assert_eq!(keys, ["alpha", "beta", "gamma"]);
    assert_eq!(server.requests().len(), 2);
}
