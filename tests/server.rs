//! End-to-end tests of `examples/server.rs`: the same server `main` runs,
//! started on an ephemeral port and driven over real HTTP (and raw TCP)
//! with signed events — a duplicate storm, an out-of-order history, bad
//! deliveries, the JSON routes, timeouts, limits, admin authentication,
//! dead-letter replay, retention and graceful shutdown. The same server in a
//! child process stopped with SIGTERM is in `tests/server_process.rs`.
#![cfg(all(feature = "axum", feature = "reqwest", feature = "tracing"))]

#[allow(dead_code)]
#[path = "../examples/server.rs"]
mod server;

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::Value;
use server::Config;
use stripe_webhook_guard::integrations::axum::Drained;
use stripe_webhook_guard::processor::WebhookProcessor;
use stripe_webhook_guard::signature::{WebhookSecret, test_header};
use time::OffsetDateTime;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

const PATH: &str = "/webhooks/stripe";

/// A server on 127.0.0.1:0 and a client for it.
struct Running {
    base: String,
    addr: std::net::SocketAddr,
    http: reqwest::Client,
    shutdown: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<Drained, server::StartError>>,
    processor: WebhookProcessor,
}

fn config() -> Config {
    Config::new(common::SECRET)
}

async fn start(config: Config) -> Running {
    let state = server::build_state(&config).await.expect("server state");
    let processor = state.processor().clone();
    let app = server::app(state, &config);
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local addr");
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(server::serve(listener, app, async move {
        let _ = rx.await;
    }));
    Running {
        base: format!("http://{addr}"),
        addr,
        http: reqwest::Client::new(),
        shutdown: Some(tx),
        task,
        processor,
    }
}

fn now() -> i64 {
    OffsetDateTime::now_utc().unix_timestamp()
}

impl Running {
    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Posts `body` with `header` (if any); returns the status and the JSON
    /// answer.
    async fn post_raw(&self, body: Vec<u8>, header: Option<&str>) -> (StatusCode, Value) {
        let mut request = self.http.post(self.url(PATH)).body(body);
        if let Some(h) = header {
            request = request.header("Stripe-Signature", h);
        }
        let response = request.send().await.expect("request");
        let status = response.status();
        let text = response.text().await.expect("body");
        let json = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {status} {text:?}"));
        (status, json)
    }

    /// Delivers `body` signed now, as Stripe would.
    async fn deliver(&self, body: &str) -> (StatusCode, Value) {
        let header = common::sign(body, now());
        self.post_raw(body.as_bytes().to_vec(), Some(&header)).await
    }

    async fn get(&self, path: &str) -> (StatusCode, Value) {
        let response = self.http.get(self.url(path)).send().await.expect("GET");
        let status = response.status();
        (status, response.json().await.expect("JSON"))
    }

    async fn post(&self, path: &str) -> (StatusCode, Value) {
        let response = self.http.post(self.url(path)).send().await.expect("POST");
        let status = response.status();
        (status, response.json().await.expect("JSON"))
    }

    /// Any method on `path`, with the admin token if given.
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        token: Option<&str>,
    ) -> (StatusCode, Value) {
        let mut request = self.http.request(method, self.url(path));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await.expect("request");
        let status = response.status();
        (status, response.json().await.expect("JSON"))
    }

    async fn stats(&self) -> HashMap<String, Value> {
        let (status, json) = self.get("/stats").await;
        assert_eq!(status, StatusCode::OK);
        serde_json::from_value(json).expect("stats object")
    }

    async fn stat(&self, name: &str) -> u64 {
        self.stats()
            .await
            .get(name)
            .and_then(Value::as_u64)
            .unwrap_or_else(|| panic!("no counter {name}"))
    }

    /// Triggers the graceful shutdown and waits for the server to stop.
    async fn stop(mut self) -> Drained {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("server stops")
            .expect("server task")
            .expect("server result")
    }
}

fn sub_event(id: &str, ty: &str, created: i64, sub: &str, status: &str) -> String {
    common::sub_event(id, ty, created, sub, status)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn duplicate_storm_is_processed_once() {
    // A slow handler keeps the claim held while the storm arrives, so
    // concurrent copies see it in flight.
    let mut config = config();
    config.handler_delay = Duration::from_millis(150);
    let server = Arc::new(start(config).await);
    let body = sub_event(
        "evt_storm",
        "customer.subscription.created",
        now() - 60,
        "sub_storm",
        "active",
    );

    let mut tasks = Vec::new();
    for _ in 0..50 {
        let server = server.clone();
        let body = body.clone();
        tasks.push(tokio::spawn(async move { server.deliver(&body).await }));
    }
    let mut processed = 0;
    let mut duplicates = 0;
    let mut in_flight = 0;
    for task in tasks {
        let (status, json) = task.await.expect("delivery task");
        match (
            status.as_u16(),
            json["outcome"].as_str(),
            json["error"].as_str(),
        ) {
            (200, Some("applied"), _) => {
                assert_eq!(json["event_id"], "evt_storm");
                processed += 1;
            }
            (200, Some("duplicate"), _) => duplicates += 1,
            (503, _, Some("in_flight")) => {
                assert_eq!(json["retryable"], true);
                in_flight += 1;
            }
            other => panic!("unexpected answer {other:?}: {json}"),
        }
    }
    eprintln!("storm: {processed} processed, {duplicates} duplicate, {in_flight} in flight");
    assert_eq!(processed, 1, "exactly one delivery processes the event");
    assert_eq!(duplicates + in_flight, 49);

    // Stripe retries the ones that got 503: now they are duplicates.
    let (status, json) = server.deliver(&body).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(json["outcome"], "duplicate");

    let counters = server.stats().await;
    assert_eq!(counters["received"], 51);
    assert_eq!(counters["applied"], 1);
    assert_eq!(counters["handler_effects"], 1);
    assert_eq!(counters["provisioned"], 1);
    assert_eq!(counters["duplicates"], duplicates + 1);
    assert_eq!(counters["in_flight"], in_flight);
    assert_eq!(counters["failed"], 0);
    assert_eq!(counters["dead"], 0);

    let (status, record) = server.get("/subscriptions/sub_storm").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(record["status"], "active");

    let server = Arc::into_inner(server).expect("all tasks done");
    server.stop().await;
}

#[tokio::test]
async fn out_of_order_history_keeps_the_newer_state() {
    let server = start(config()).await;
    let t = now();
    let newer = sub_event(
        "evt_newer",
        "customer.subscription.updated",
        t - 50,
        "sub_ooo",
        "past_due",
    );
    let older = sub_event(
        "evt_older",
        "customer.subscription.updated",
        t - 100,
        "sub_ooo",
        "active",
    );

    let (status, json) = server.deliver(&newer).await;
    assert_eq!(status, StatusCode::OK, "{json}");
    assert_eq!(json["outcome"], "applied");
    assert_eq!(json["event_id"], "evt_newer");

    let (status, json) = server.deliver(&older).await;
    assert_eq!(status, StatusCode::OK, "{json}");
    assert_eq!(json["outcome"], "stale");
    assert_eq!(json["event_id"], "evt_older");

    let (status, record) = server.get("/subscriptions/sub_ooo").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(record["id"], "sub_ooo");
    assert_eq!(record["status"], "past_due");
    assert_eq!(record["customer"], "cus_sub_ooo");

    let (status, access) = server.get("/customers/cus_sub_ooo/access").await;
    assert_eq!(status, StatusCode::OK);
    // past_due: allowed during the grace window, never "active".
    assert_eq!(access["access"], "grace", "{access}");
    assert_eq!(access["reason"], "past_due_grace", "{access}");
    assert!(access["valid_until"].is_string(), "{access}");

    // A customer with nothing on record.
    let (status, access) = server.get("/customers/cus_nobody/access").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(access["access"], "denied");
    assert_eq!(access["reason"], "no_subscription");
    assert_eq!(access["valid_until"], Value::Null);

    let counters = server.stats().await;
    assert_eq!(counters["applied"], 1);
    assert_eq!(counters["stale"], 1);
    // The handler runs for the stale event too (its effect is "stale").
    assert_eq!(counters["handler_effects"], 2);
    server.stop().await;
}

#[tokio::test]
async fn bad_deliveries_are_refused_without_echo() {
    let mut config = config();
    config.max_body_bytes = 64 * 1024;
    let server = start(config).await;
    let body = sub_event(
        "evt_secretive_payload",
        "customer.subscription.created",
        now(),
        "sub_bad",
        "active",
    );

    // Signed with another secret.
    let forged = test_header(
        &WebhookSecret::new("whsec_attacker"),
        body.as_bytes(),
        OffsetDateTime::now_utc(),
    );
    let response = server
        .http
        .post(server.url(PATH))
        .header("Stripe-Signature", &forged)
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    assert_eq!(
        response.headers()["content-type"],
        "application/json",
        "JSON answer"
    );
    let text = response.text().await.unwrap();
    let json: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(json["error"], "signature_mismatch");
    assert_eq!(json["retryable"], false);
    for leaked in [
        "evt_secretive_payload",
        "sub_bad",
        forged.as_str(),
        "v1=",
        common::SECRET,
    ] {
        assert!(!text.contains(leaked), "answer echoes {leaked:?}: {text}");
    }

    // A body changed after signing.
    let header = common::sign(&body, now());
    let tampered = body.replace("active", "canceled");
    let (status, json) = server.post_raw(tampered.into_bytes(), Some(&header)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(json["error"], "signature_mismatch");

    // No header.
    let (status, json) = server.post_raw(body.as_bytes().to_vec(), None).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(json["error"], "missing_header");

    // A header that is not UTF-8 counts as missing.
    let response = server
        .http
        .post(server.url(PATH))
        .header(
            "Stripe-Signature",
            reqwest::header::HeaderValue::from_bytes(b"t=1,v1=\xff\xfe").unwrap(),
        )
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let json: Value = response.json().await.unwrap();
    assert_eq!(json["error"], "missing_header");

    // A malformed header.
    let (status, json) = server
        .post_raw(body.as_bytes().to_vec(), Some("v1=abc"))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(json["error"], "malformed_header");

    // Correctly signed, but not an event.
    let junk = r#"{"hello":"world"}"#;
    let (status, json) = server.deliver(junk).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(json["error"], "parse_error");

    // One byte over the verifier's cap: 413 before anything is hashed.
    let big = vec![b' '; 64 * 1024 + 1];
    let header = test_header(&common::secret(), &big, OffsetDateTime::now_utc());
    let (status, json) = server.post_raw(big, Some(&header)).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(json["error"], "body_too_large");
    assert_eq!(json["retryable"], false);

    // Exactly the cap is read and verified (then fails to parse).
    let exact = vec![b' '; 64 * 1024];
    let header = test_header(&common::secret(), &exact, OffsetDateTime::now_utc());
    let (status, json) = server.post_raw(exact, Some(&header)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(json["error"], "parse_error");

    // Nothing above reached the ledger.
    let counters = server.stats().await;
    assert_eq!(counters["applied"], 0);
    assert_eq!(counters["handler_effects"], 0);
    assert_eq!(counters["rejected"], 7, "{counters:?}");
    server.stop().await;
}

/// A chunked body has no length to check up front: the helper stops
/// reading as soon as it passes the cap.
#[tokio::test]
async fn chunked_body_over_the_cap_is_cut_off() {
    let mut config = config();
    config.max_body_bytes = 16 * 1024;
    let server = start(config).await;

    let head = format!(
        "POST {PATH} HTTP/1.1\r\nHost: {}\r\nStripe-Signature: t=1,v1=00\r\n\
         Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n",
        server.addr
    );
    let mut stream = send_raw(server.addr, head.as_bytes()).await;
    let chunk = vec![b'x'; 4096];
    for _ in 0..5 {
        let mut frame = format!("{:x}\r\n", chunk.len()).into_bytes();
        frame.extend_from_slice(&chunk);
        frame.extend_from_slice(b"\r\n");
        if stream.write_all(&frame).await.is_err() {
            break; // the server may already have answered and closed
        }
    }
    let _ = stream.write_all(b"0\r\n\r\n").await;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer)).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.starts_with("HTTP/1.1 413"),
        "expected 413, got {answer:?}"
    );
    assert!(answer.contains(r#""error":"body_too_large""#), "{answer}");
    server.stop().await;
}

#[tokio::test]
async fn routes_answer_json() {
    let server = start(config()).await;

    let (status, json) = server.get("/healthz").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(json["status"], "ok");
    assert_eq!(json["store"], "memory");
    assert_eq!(
        json["durable"], false,
        "the in-memory store is named as such"
    );

    let (status, json) = server.get("/subscriptions/sub_missing").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(json["error"], "not_found");

    let (status, json) = server.get("/no/such/route").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(json["error"], "not_found");

    // No secret key: reconciliation is not available.
    let (status, json) = server.post("/reconcile").await;
    assert_eq!(status, StatusCode::NOT_IMPLEMENTED);
    assert_eq!(json["error"], "reconcile_not_configured");
    assert_eq!(json["retryable"], false);

    // Fresh counters.
    let counters = server.stats().await;
    for name in [
        "received",
        "applied",
        "duplicates",
        "stale",
        "ignored",
        "refetches",
        "failed",
        "dead",
        "handler_effects",
    ] {
        assert_eq!(counters[name], 0, "{name}");
    }

    // Processed, duplicate, ignored.
    let created = sub_event(
        "evt_route_1",
        "customer.subscription.created",
        now() - 10,
        "sub_route",
        "trialing",
    );
    let (status, json) = server.deliver(&created).await;
    assert_eq!(
        (status, json["outcome"].as_str()),
        (StatusCode::OK, Some("applied"))
    );
    let (status, json) = server.deliver(&created).await;
    assert_eq!(
        (status, json["outcome"].as_str()),
        (StatusCode::OK, Some("duplicate"))
    );
    let other = common::other_event("evt_route_2", now());
    let (status, json) = server.deliver(&other).await;
    assert_eq!(
        (status, json["outcome"].as_str()),
        (StatusCode::OK, Some("ignored"))
    );
    assert_eq!(json["event_id"], "evt_route_2");

    let (status, json) = server.get("/subscriptions/sub_route").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(json["status"], "trialing");

    let counters = server.stats().await;
    assert_eq!(counters["received"], 3);
    assert_eq!(counters["applied"], 1);
    assert_eq!(counters["duplicates"], 1);
    assert_eq!(counters["ignored"], 1);
    assert_eq!(counters["handler_effects"], 1);
    assert_eq!(counters["refetches"], 0);
    assert_eq!(counters["stripe_requests"], Value::Null);
    server.stop().await;
}

#[tokio::test]
async fn rotated_secrets_from_the_environment() {
    let env: HashMap<&str, &str> = [
        ("STRIPE_WEBHOOK_SECRET", "whsec_old, whsec_new"),
        ("BIND", "127.0.0.1:0"),
        ("STRIPE_LIVEMODE", "false"),
    ]
    .into_iter()
    .collect();
    let config = Config::from_lookup(|k| env.get(k).map(|v| (*v).to_owned())).unwrap();
    assert_eq!(config.webhook_secrets, ["whsec_old", "whsec_new"]);
    assert_eq!(config.livemode, Some(false));
    let debug = format!("{config:?}");
    assert!(!debug.contains("whsec_"), "{debug}");

    let server = start(config).await;
    let body = sub_event(
        "evt_rotated",
        "customer.subscription.created",
        now(),
        "sub_rot",
        "active",
    );
    for (i, secret) in ["whsec_new", "whsec_old"].into_iter().enumerate() {
        let header = test_header(
            &WebhookSecret::new(secret),
            body.as_bytes(),
            OffsetDateTime::now_utc(),
        );
        let (status, json) = server
            .post_raw(body.as_bytes().to_vec(), Some(&header))
            .await;
        assert_eq!(status, StatusCode::OK, "{secret}: {json}");
        assert_eq!(
            json["outcome"],
            if i == 0 { "applied" } else { "duplicate" }
        );
    }
    server.stop().await;
}

#[tokio::test]
async fn configuration_errors_are_clear() {
    let lookup = |pairs: &'static [(&'static str, &'static str)]| {
        move |k: &str| {
            pairs
                .iter()
                .find(|(name, _)| *name == k)
                .map(|(_, v)| (*v).to_owned())
        }
    };
    let err = Config::from_lookup(lookup(&[])).unwrap_err();
    assert!(err.to_string().contains("STRIPE_WEBHOOK_SECRET"), "{err}");
    let err = Config::from_lookup(lookup(&[("STRIPE_WEBHOOK_SECRET", " , ")])).unwrap_err();
    assert!(err.to_string().contains("STRIPE_WEBHOOK_SECRET"), "{err}");
    let err = Config::from_lookup(lookup(&[
        ("STRIPE_WEBHOOK_SECRET", "whsec_x"),
        ("BIND", "localhost"),
    ]))
    .unwrap_err();
    assert!(err.to_string().contains("BIND"), "{err}");

    let mut config = config();
    config.database_url = Some("mysql://user:hunter2@db/app".to_owned());
    let err = server::build_state(&config).await.unwrap_err().to_string();
    assert!(err.contains("DATABASE_URL"), "{err}");
    assert!(!err.contains("hunter2"), "the URL is not echoed: {err}");

    let mut config = self::config();
    config.secret_key = Some("sk_test_x".to_owned());
    config.api_base = "ftp://example.com".to_owned();
    let err = server::build_state(&config).await.unwrap_err().to_string();
    assert!(err.contains("Stripe client"), "{err}");
    assert!(!err.contains("sk_test_x"), "{err}");
}

/// The request timeout answers 503 (Stripe retries), but the processor
/// finishes in its own task: the retry is a duplicate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeout_answers_503_and_processing_still_completes() {
    let mut config = config();
    config.request_timeout = Duration::from_millis(200);
    config.handler_delay = Duration::from_millis(800);
    let server = start(config).await;
    let body = sub_event(
        "evt_slow",
        "customer.subscription.created",
        now(),
        "sub_slow",
        "active",
    );
    let (status, json) = server.deliver(&body).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(json["error"], "timeout");
    assert_eq!(json["retryable"], true);

    let mut waited = Duration::ZERO;
    while server.stat("handler_effects").await == 0 {
        assert!(
            waited < Duration::from_secs(5),
            "the handler never finished"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        waited += Duration::from_millis(50);
    }
    let (status, json) = server.deliver(&body).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(json["outcome"], "duplicate");
    server.stop().await;
}

/// SIGTERM-style shutdown while a delivery is in the handler: the delivery
/// completes with 200, then the server stops and refuses new connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_finishes_in_flight_requests() {
    let mut config = config();
    config.handler_delay = Duration::from_millis(500);
    let server = start(config).await;
    let body = sub_event(
        "evt_shutdown",
        "customer.subscription.created",
        now(),
        "sub_shutdown",
        "active",
    );
    let http = server.http.clone();
    let url = server.url(PATH);
    let header = common::sign(&body, now());
    let delivery = tokio::spawn(async move {
        let response = http
            .post(url)
            .header("Stripe-Signature", header)
            .body(body)
            .send()
            .await
            .expect("in-flight request completes");
        let status = response.status();
        (status, response.json::<Value>().await.expect("JSON"))
    });

    // Wait until the delivery is inside the processor.
    let mut waited = Duration::ZERO;
    while server.stat("received").await == 0 {
        assert!(
            waited < Duration::from_secs(5),
            "the delivery never arrived"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
        waited += Duration::from_millis(10);
    }

    let base = server.base.clone();
    server.stop().await;

    let (status, json) = delivery.await.unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(json["outcome"], "applied");
    assert_eq!(json["event_id"], "evt_shutdown");

    let after = reqwest::Client::new()
        .get(format!("{base}/healthz"))
        .send()
        .await;
    assert!(after.is_err(), "the listener is closed after shutdown");
}

/// `DATABASE_URL=sqlite:…` wires the SQLite store (migrated at start); the
/// ledger survives a restart.
#[cfg(feature = "sqlite")]
#[tokio::test]
async fn sqlite_store_from_database_url() {
    let dir = std::env::temp_dir().join(format!(
        "swg-server-test-{}-{}",
        std::process::id(),
        OffsetDateTime::now_utc().unix_timestamp_nanos()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let db = dir.join("billing.db");
    let mut config = config();
    config.database_url = Some(format!("sqlite://{}", db.display()));

    let body = sub_event(
        "evt_sqlite",
        "customer.subscription.created",
        now(),
        "sub_sqlite",
        "active",
    );
    let server = start(config.clone()).await;
    let (status, json) = server.get("/healthz").await;
    assert_eq!(
        (status, json["store"].as_str()),
        (StatusCode::OK, Some("sqlite"))
    );
    let (status, json) = server.deliver(&body).await;
    assert_eq!(
        (status, json["outcome"].as_str()),
        (StatusCode::OK, Some("applied"))
    );
    server.stop().await;

    // Restarted on the same file: the event is a duplicate, the record is there.
    let server = start(config).await;
    let (status, json) = server.deliver(&body).await;
    assert_eq!(
        (status, json["outcome"].as_str()),
        (StatusCode::OK, Some("duplicate"))
    );
    let (status, json) = server.get("/subscriptions/sub_sqlite").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(json["status"], "active");
    server.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// With `STRIPE_SECRET_KEY` (and `STRIPE_API_BASE` pointing at a local
/// stand-in for Stripe that lists nothing), `POST /reconcile` runs
/// catch-up and sweep and answers the report.
#[tokio::test]
async fn reconcile_with_a_secret_key_returns_the_report() {
    use axum::http::Uri;

    let seen = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let paths = seen.clone();
    let fake = axum::Router::new().fallback(move |uri: Uri| {
        let paths = paths.clone();
        async move {
            paths.lock().unwrap().push(uri.path().to_owned());
            axum::Json(serde_json::json!({
                "object": "list", "data": [], "has_more": false, "url": uri.path()
            }))
        }
    });
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let fake_addr = listener.local_addr().unwrap();
    let fake_task = tokio::spawn(async move { axum::serve(listener, fake).await });

    let mut config = config();
    config.secret_key = Some("sk_test_local".to_owned());
    config.api_base = format!("http://{fake_addr}");
    let server = start(config).await;

    let (status, report) = server.post("/reconcile").await;
    assert_eq!(status, StatusCode::OK, "{report}");
    assert_eq!(report["dry_run"], false);
    assert_eq!(report["events_seen"], 0);
    assert_eq!(report["subscriptions_checked"], 0);
    assert!(report["changes"].as_array().is_some_and(Vec::is_empty));
    assert!(
        report["requests"].as_u64().is_some_and(|n| n >= 2),
        "{report}"
    );

    let paths = seen.lock().unwrap().clone();
    assert!(paths.iter().any(|p| p == "/v1/events"), "{paths:?}");
    assert!(paths.iter().any(|p| p == "/v1/subscriptions"), "{paths:?}");
    let stripe_requests = server.stat("stripe_requests").await;
    assert!(stripe_requests >= 2);
    server.stop().await;
    fake_task.abort();
}

#[tokio::test]
async fn admin_routes_need_the_token_when_one_is_set() {
    let mut cfg = config();
    cfg.admin_token = Some("s3cret-admin-token-0123".to_owned());
    let server = start(cfg).await;
    let http = &server.http;
    // The webhook and the health check stay open.
    assert_eq!(
        http.get(server.url("/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let (status, _) = server.post_raw(b"{}".to_vec(), None).await;
    assert_eq!(
        status, 400,
        "the webhook route answers without the admin token"
    );
    for path in ["/stats", "/subscriptions/sub_1", "/customers/cus_1/access"] {
        let r = http.get(server.url(path)).send().await.unwrap();
        assert_eq!(r.status(), 401, "{path} without a token");
        let r = http
            .get(server.url(path))
            .bearer_auth("wrong")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401, "{path} with a wrong token");
    }
    let r = http.post(server.url("/reconcile")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let r = http
        .get(server.url("/stats"))
        .bearer_auth("s3cret-admin-token-0123")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = http
        .get(server.url("/subscriptions/sub_1"))
        .bearer_auth("s3cret-admin-token-0123")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
}

// ---------------------------------------------------------------------------
// Hard to hold open: raw TCP clients
// ---------------------------------------------------------------------------

/// A raw connection to the server that has sent `bytes`.
async fn send_raw(addr: std::net::SocketAddr, bytes: &[u8]) -> TcpStream {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(bytes).await.unwrap();
    stream
}

/// Reads what the server sends until it closes the connection or `limit`
/// passes; `None` when it was still open at `limit`.
async fn read_until_closed(stream: &mut TcpStream, limit: Duration) -> Option<String> {
    let mut answer = Vec::new();
    match tokio::time::timeout(limit, stream.read_to_end(&mut answer)).await {
        Ok(_) => Some(String::from_utf8_lossy(&answer).into_owned()),
        Err(_) => None,
    }
}

/// Reads until one whole answer (head and a JSON body) arrived.
async fn read_answer(stream: &mut TcpStream, limit: Duration) -> String {
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    let result = tokio::time::timeout(limit, async {
        loop {
            let n = stream.read(&mut buf).await.unwrap_or(0);
            answer.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&answer);
            if n == 0 || (text.contains("\r\n\r\n") && text.trim_end().ends_with('}')) {
                return;
            }
        }
    })
    .await;
    assert!(result.is_ok(), "no answer within {limit:?}: {answer:?}");
    String::from_utf8_lossy(&answer).into_owned()
}

/// Regression (issue 12 item 3): a delivery without `Stripe-Signature` is
/// answered 400 without the server waiting for (or buffering) its body.
#[tokio::test]
async fn missing_signature_header_is_refused_before_the_body_is_read() {
    let server = start(config()).await;
    // Declares 900 KB and sends none of it.
    let head = format!(
        "POST {PATH} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\n\
         Content-Length: 900000\r\n\r\n",
        server.addr
    );
    let mut stream = send_raw(server.addr, head.as_bytes()).await;
    let started = std::time::Instant::now();
    let answer = read_answer(&mut stream, Duration::from_secs(5)).await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains(r#""error":"missing_header""#), "{answer}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "answered without the body"
    );
    assert_eq!(server.stat("rejected").await, 1);

    // An empty header counts as missing too.
    let head = format!(
        "POST {PATH} HTTP/1.1\r\nHost: {}\r\nStripe-Signature: \r\nContent-Length: 900000\r\n\r\n",
        server.addr
    );
    let mut stream = send_raw(server.addr, head.as_bytes()).await;
    let answer = read_answer(&mut stream, Duration::from_secs(5)).await;
    assert!(answer.contains(r#""error":"missing_header""#), "{answer}");
    server.stop().await;
}

/// Regression (issue 12 item 3): a half-sent request head is closed after
/// the header timeout (it stayed open 40 s before).
#[tokio::test]
async fn half_sent_request_head_is_closed_after_the_header_timeout() {
    let mut config = config();
    config.header_timeout = Duration::from_secs(1);
    let server = start(config).await;
    let mut stream = send_raw(
        server.addr,
        format!("POST {PATH} HTTP/1.1\r\nHost: x\r\nStripe-Sig").as_bytes(),
    )
    .await;
    let started = std::time::Instant::now();
    let closed = read_until_closed(&mut stream, Duration::from_secs(8)).await;
    assert!(closed.is_some(), "the connection is still open after 8 s");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(5),
        "closed after {waited:?}, expected about 1 s"
    );
    server.stop().await;
}

/// Regression (issue 12 item 3): a body that trickles in is cut off at the
/// body timeout with 408, and nothing reaches the ledger.
#[tokio::test]
async fn trickled_body_is_answered_408_at_the_body_timeout() {
    let mut config = config();
    config.body_timeout = Duration::from_secs(1);
    let server = start(config).await;
    let head = format!(
        "POST {PATH} HTTP/1.1\r\nHost: x\r\nStripe-Signature: t=1,v1=00\r\n\
         Content-Length: 1000\r\n\r\n{{\"id\":"
    );
    let mut stream = send_raw(server.addr, head.as_bytes()).await;
    let started = std::time::Instant::now();
    let answer = read_answer(&mut stream, Duration::from_secs(6)).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains(r#""error":"body_timeout""#), "{answer}");
    assert!(started.elapsed() < Duration::from_secs(4));
    assert_eq!(
        server.stat("received").await,
        0,
        "never reached the processor"
    );
    server.stop().await;
}

/// Above `MAX_CONCURRENT_REQUESTS`, requests are answered 503 `overloaded`
/// at once (Stripe retries) instead of queueing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrency_limit_sheds_load_with_503() {
    let mut config = config();
    config.max_concurrent_requests = 1;
    config.handler_delay = Duration::from_millis(1500);
    let server = Arc::new(start(config).await);
    let body = sub_event(
        "evt_limit",
        "customer.subscription.created",
        now(),
        "sub_limit",
        "active",
    );
    let slow = {
        let server = server.clone();
        tokio::spawn(async move { server.deliver(&body).await })
    };
    let mut waited = Duration::ZERO;
    while server.processor.stats().received == 0 {
        assert!(
            waited < Duration::from_secs(5),
            "the delivery never arrived"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
        waited += Duration::from_millis(10);
    }
    let response = server
        .http
        .get(server.url("/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    let json: Value = response.json().await.unwrap();
    assert_eq!(json["error"], "overloaded");
    assert_eq!(json["retryable"], true);

    let (status, json) = slow.await.unwrap();
    assert_eq!(
        (status, json["outcome"].as_str()),
        (StatusCode::OK, Some("applied"))
    );
    // Free again.
    let (status, _) = server.get("/healthz").await;
    assert_eq!(status, StatusCode::OK);
    Arc::into_inner(server).expect("one owner").stop().await;
}

/// Above `MAX_CONNECTIONS`, a connection waits in the listen backlog
/// until one closes.
#[tokio::test]
async fn connection_limit_holds_further_connections() {
    let mut config = config();
    config.max_connections = 1;
    let server = start(config).await;
    let request = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n";
    let mut first = send_raw(server.addr, request).await;
    let answer = read_answer(&mut first, Duration::from_secs(5)).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");

    // The first connection stays open (keep-alive): the second is not served.
    let mut second = send_raw(server.addr, request).await;
    let mut buf = [0u8; 64];
    let early = tokio::time::timeout(Duration::from_millis(700), second.read(&mut buf)).await;
    assert!(early.is_err(), "served beyond the connection limit");

    drop(first);
    let answer = read_answer(&mut second, Duration::from_secs(5)).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    drop(second);
    server.stop().await;
}

/// Regression (issue 12 item 3): shutdown does not wait for a stalled
/// client beyond the deadline.
#[tokio::test]
async fn shutdown_does_not_wait_for_a_stalled_client_beyond_the_deadline() {
    let mut config = config();
    config.header_timeout = Duration::from_secs(60);
    config.body_timeout = Duration::from_secs(60);
    config.request_timeout = Duration::from_secs(60);
    config.shutdown_deadline = Duration::from_secs(1);
    let server = start(config).await;
    // One client stalls in its head, another in its body.
    let mut head = send_raw(
        server.addr,
        b"POST /webhooks/stripe HTTP/1.1\r\nHost: x\r\n",
    )
    .await;
    let mut body = send_raw(
        server.addr,
        b"POST /webhooks/stripe HTTP/1.1\r\nHost: x\r\nStripe-Signature: t=1,v1=00\r\n\
          Content-Length: 100\r\n\r\n{",
    )
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = std::time::Instant::now();
    server.stop().await;
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(3),
        "shutdown waited {took:?} for stalled clients (deadline 1 s)"
    );
    assert!(
        read_until_closed(&mut head, Duration::from_secs(2))
            .await
            .is_some()
    );
    assert!(
        read_until_closed(&mut body, Duration::from_secs(2))
            .await
            .is_some()
    );
}

// ---------------------------------------------------------------------------
// Shutdown settles claims
// ---------------------------------------------------------------------------

/// Regression (issue 12 item 2): work that outlived its request (the
/// request timeout answered 503) is waited for until the shutdown deadline,
/// then aborted and its claim released, so the retry is processed at once
/// (before: 503 "in flight" until the lease ran out).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_releases_the_claim_of_work_cut_off_at_the_deadline() {
    let mut config = config();
    config.request_timeout = Duration::from_millis(300);
    config.handler_delay = Duration::from_secs(30);
    config.shutdown_deadline = Duration::from_millis(500);
    let server = start(config).await;
    let processor = server.processor.clone();
    let body = sub_event(
        "evt_cut_off",
        "customer.subscription.created",
        now(),
        "sub_cut_off",
        "active",
    );
    let (status, json) = server.deliver(&body).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(json["error"], "timeout");
    assert_eq!(server.stat("webhooks_in_flight").await, 1, "still working");
    assert_eq!(processor.held_leases().len(), 1);

    let started = std::time::Instant::now();
    let drained = server.stop().await;
    assert!(started.elapsed() < Duration::from_secs(3));
    assert_eq!((drained.cancelled, drained.released), (1, 1));
    assert!(processor.held_leases().is_empty());

    let key = stripe_webhook_guard::ledger::EventKey::new("evt_cut_off", None);
    let entry = processor.store().get(&key).await.unwrap().expect("entry");
    assert_eq!(
        entry.state,
        stripe_webhook_guard::ledger::LedgerState::Failed
    );
    assert_eq!(entry.attempts, 0, "a released claim spends no attempt");

    // Stripe's retry (to a fresh processor on the same store) runs at once.
    let header = common::sign(&body, now());
    let outcome = processor
        .handle(body.as_bytes(), Some(&header))
        .await
        .expect("processed, not in flight");
    assert_eq!(outcome.as_str(), "applied");
}

// ---------------------------------------------------------------------------
// JSON everywhere
// ---------------------------------------------------------------------------

/// Regression (issue 12 item 10): path and query rejections, and a wrong
/// method, answer JSON like every other answer.
#[tokio::test]
async fn path_and_query_rejections_answer_json() {
    let server = start(config()).await;
    for (method, path, status, error) in [
        ("GET", "/subscriptions/%FF", 400, "invalid_path"),
        ("GET", "/customers/%C3%28/access", 400, "invalid_path"),
        ("POST", "/dead-letters/%FF/replay", 400, "invalid_path"),
        ("GET", "/dead-letters?after=a&after=b", 400, "invalid_query"),
        ("GET", PATH, 405, "method_not_allowed"),
        ("DELETE", "/healthz", 405, "method_not_allowed"),
    ] {
        let method = Method::from_bytes(method.as_bytes()).unwrap();
        let response = server
            .http
            .request(method.clone(), server.url(path))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), status, "{method} {path}");
        assert_eq!(
            response.headers()["content-type"],
            "application/json",
            "{method} {path}"
        );
        let json: Value = response.json().await.unwrap();
        assert_eq!(json["error"], error, "{method} {path}: {json}");
        assert_eq!(json["retryable"], false);
    }
    server.stop().await;
}

// ---------------------------------------------------------------------------
// Admin authentication
// ---------------------------------------------------------------------------

/// Regression (issue 12 item 4): the admin routes cannot be open beyond
/// loopback, and a short token is refused.
#[test]
fn open_admin_routes_on_a_public_bind_refuse_to_start() {
    let lookup = |pairs: &'static [(&'static str, &'static str)]| {
        move |k: &str| {
            pairs
                .iter()
                .find(|(name, _)| *name == k)
                .map(|(_, v)| (*v).to_owned())
        }
    };
    for bind in ["0.0.0.0:4242", "10.1.2.3:80", "[::]:4242"] {
        let pairs: &'static [(&str, &str)] = Box::leak(Box::new([
            ("STRIPE_WEBHOOK_SECRET", "whsec_x"),
            ("BIND", bind),
        ]));
        let err = Config::from_lookup(lookup(pairs)).unwrap_err().to_string();
        assert!(err.contains("ADMIN_TOKEN"), "{bind}: {err}");
        assert!(err.contains("loopback"), "{bind}: {err}");
    }
    for bind in ["127.0.0.1:4242", "[::1]:4242"] {
        let pairs: &'static [(&str, &str)] = Box::leak(Box::new([
            ("STRIPE_WEBHOOK_SECRET", "whsec_x"),
            ("BIND", bind),
        ]));
        assert!(Config::from_lookup(lookup(pairs)).is_ok(), "{bind}");
    }
    let config = Config::from_lookup(lookup(&[
        ("STRIPE_WEBHOOK_SECRET", "whsec_x"),
        ("BIND", "0.0.0.0:4242"),
        ("ADMIN_TOKEN", "a-long-enough-admin-token"),
    ]))
    .unwrap();
    assert!(!format!("{config:?}").contains("a-long-enough"));
    let err = Config::from_lookup(lookup(&[
        ("STRIPE_WEBHOOK_SECRET", "whsec_x"),
        ("ADMIN_TOKEN", "short"),
    ]))
    .unwrap_err();
    assert!(err.to_string().contains("at least 16"), "{err}");
}

/// The token is compared as SHA-256 digests: a prefix, an extension, a
/// different length or nothing is refused; the token itself passes.
#[test]
fn admin_token_is_compared_by_digest() {
    let token = "s3cret-admin-token-0123";
    let auth = server::AdminAuth::new(Some(token), Duration::ZERO);
    assert!(auth.accepts(Some(token)));
    for wrong in [
        "",
        "s3cret",
        "s3cret-admin-token-012",
        "s3cret-admin-token-01234",
        "S3CRET-ADMIN-TOKEN-0123",
    ] {
        assert!(!auth.accepts(Some(wrong)), "{wrong:?}");
    }
    assert!(!auth.accepts(None));
    // No token configured (loopback only): open.
    assert!(server::AdminAuth::new(None, Duration::ZERO).accepts(None));
}

/// Regression (issue 12 item 4): failed attempts are answered one at a
/// time, each after a delay that grows with the failures in a row; the
/// right token is not slowed and resets the count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_admin_attempts_are_slowed() {
    let mut cfg = config();
    cfg.admin_token = Some("s3cret-admin-token-0123".to_owned());
    cfg.admin_failure_delay = Duration::from_millis(150);
    let server = Arc::new(start(cfg).await);
    let started = std::time::Instant::now();
    let mut attempts = Vec::new();
    for _ in 0..3 {
        let server = server.clone();
        attempts.push(tokio::spawn(async move {
            server
                .http
                .get(server.url("/stats"))
                .bearer_auth("guess")
                .send()
                .await
                .unwrap()
                .status()
        }));
    }
    for attempt in attempts {
        assert_eq!(attempt.await.unwrap(), StatusCode::UNAUTHORIZED);
    }
    // 150 + 300 + 450 ms, one after another.
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(850),
        "three failures took {took:?}"
    );

    let started = std::time::Instant::now();
    let ok = server
        .http
        .get(server.url("/stats"))
        .bearer_auth("s3cret-admin-token-0123")
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), StatusCode::OK);
    assert!(
        started.elapsed() < Duration::from_millis(450),
        "the right token is not slowed"
    );
    // The count starts again: one failure, one step.
    let started = std::time::Instant::now();
    let wrong = server.http.get(server.url("/stats")).send().await.unwrap();
    assert_eq!(wrong.status(), StatusCode::UNAUTHORIZED);
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(140) && took < Duration::from_millis(440),
        "{took:?}"
    );
    Arc::into_inner(server).expect("one owner").stop().await;
}

// ---------------------------------------------------------------------------
// Dead letters
// ---------------------------------------------------------------------------

/// Puts `body` in the ledger as a dead letter (one attempt, failed for
/// good), as a handler that kept failing would.
async fn seed_dead_letter(processor: &WebhookProcessor, body: &str) {
    use stripe_webhook_guard::Event;
    use stripe_webhook_guard::ledger::{ClaimOutcome, ClaimRequest, FailOutcome, Failure};
    let event = Event::parse_unverified(body.as_bytes()).expect("event");
    let request = ClaimRequest::for_event(&event, time::Duration::seconds(60), 1);
    let ClaimOutcome::Claimed(lease) = processor.store().claim(&request).await.unwrap() else {
        panic!("not claimed");
    };
    let failure = Failure {
        error: "handler failed: the mail server refused".to_owned(),
        retryable: false,
        max_attempts: 1,
        payload: Some(body.to_owned()),
    };
    let outcome = processor.store().fail(&lease, &failure).await.unwrap();
    assert!(matches!(outcome, FailOutcome::Dead { .. }), "{outcome:?}");
}

/// Dead letters are listed and replayed (one, then all) through the
/// authenticated admin routes, from their stored payloads, without a
/// Stripe key.
#[tokio::test]
async fn dead_letters_are_replayed_from_the_admin_routes() {
    let mut cfg = config();
    let token = "s3cret-admin-token-0123";
    cfg.admin_token = Some(token.to_owned());
    let server = start(cfg).await;
    let t = now();
    let bodies = [
        sub_event(
            "evt_dead_1",
            "customer.subscription.created",
            t - 30,
            "sub_dead_1",
            "active",
        ),
        sub_event(
            "evt_dead_2",
            "customer.subscription.created",
            t - 20,
            "sub_dead_2",
            "trialing",
        ),
        sub_event(
            "evt_dead_3",
            "customer.subscription.created",
            t - 10,
            "sub_dead_3",
            "active",
        ),
    ];
    for body in &bodies {
        seed_dead_letter(&server.processor, body).await;
    }
    let call = |method: Method, path: &'static str, token: Option<&'static str>| {
        server.call(method, path, token)
    };

    // Without the token: refused, nothing replayed.
    for path in ["/dead-letters/evt_dead_1/replay", "/dead-letters/replay"] {
        let (status, _) = call(Method::POST, path, None).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{path}");
    }

    let (status, listed) = call(Method::GET, "/dead-letters", Some(token)).await;
    assert_eq!(status, StatusCode::OK);
    let ids: Vec<&str> = listed["dead_letters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["event_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["evt_dead_1", "evt_dead_2", "evt_dead_3"]);
    assert_eq!(listed["dead_letters"][0]["payload_stored"], true);
    assert!(
        !listed.to_string().contains("cus_sub_dead"),
        "no payload in the listing"
    );

    // One.
    let (status, json) = call(Method::POST, "/dead-letters/evt_dead_1/replay", Some(token)).await;
    assert_eq!(status, StatusCode::OK, "{json}");
    assert_eq!(json["event_id"], "evt_dead_1");
    assert_eq!(json["outcome"], "applied");
    let (status, record) = call(Method::GET, "/subscriptions/sub_dead_1", Some(token)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(record["status"], "active");

    // An unknown id: nothing stored, no Stripe key to fetch it.
    let (status, json) = call(
        Method::POST,
        "/dead-letters/evt_nowhere/replay",
        Some(token),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(json["error"], "not_replayable");

    // All the rest.
    let (status, json) = call(Method::POST, "/dead-letters/replay", Some(token)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(json["replayed"], 2, "{json}");
    assert_eq!(json["failed"], 0, "{json}");
    let (_, listed) = call(Method::GET, "/dead-letters", Some(token)).await;
    assert_eq!(listed["dead_letters"], serde_json::json!([]));
    assert_eq!(server.processor.stats().handler_effects, 3);
    server.stop().await;
}

// ---------------------------------------------------------------------------
// Retention
// ---------------------------------------------------------------------------

/// Regression (issue 12 item 5): the scheduled prune removes processed and
/// ignored entries older than the retention and keeps recent ones and dead
/// letters; a retention shorter than Stripe's windows is refused.
#[tokio::test]
async fn prune_keeps_recent_entries_and_dead_letters() {
    let server = start(config()).await;
    let t = now();
    let (status, _) = server
        .deliver(&sub_event(
            "evt_old_1",
            "customer.subscription.created",
            t,
            "sub_old",
            "active",
        ))
        .await;
    assert_eq!(status, StatusCode::OK);
    server.deliver(&common::other_event("evt_old_2", t)).await;
    seed_dead_letter(
        &server.processor,
        &sub_event(
            "evt_old_dead",
            "customer.subscription.created",
            t,
            "sub_old_dead",
            "active",
        ),
    )
    .await;
    let retention = Config::new("whsec_x").retention;
    assert_eq!(
        retention,
        Duration::from_secs(35 * 86_400),
        "documented default"
    );
    let now = OffsetDateTime::now_utc();

    // Within the retention: nothing goes.
    assert_eq!(
        server::prune_once(&server.processor, now, retention)
            .await
            .unwrap(),
        0
    );
    // 36 days later: the processed and the ignored entries go, the dead one stays.
    let later = now + time::Duration::days(36);
    assert_eq!(
        server::prune_once(&server.processor, later, retention)
            .await
            .unwrap(),
        2
    );
    let get = |id: &'static str| {
        let processor = server.processor.clone();
        async move {
            processor
                .store()
                .get(&stripe_webhook_guard::ledger::EventKey::new(id, None))
                .await
                .unwrap()
        }
    };
    assert!(get("evt_old_1").await.is_none());
    assert!(get("evt_old_2").await.is_none());
    assert!(get("evt_old_dead").await.is_some());
    server.stop().await;

    let err = Config::from_lookup(|k| match k {
        "STRIPE_WEBHOOK_SECRET" => Some("whsec_x".to_owned()),
        "RETENTION_DAYS" => Some("7".to_owned()),
        _ => None,
    })
    .unwrap_err();
    assert!(err.to_string().contains("RETENTION_DAYS"), "{err}");
}
