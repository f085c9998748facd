//! `GET /metrics` of `examples/server.rs` after a scripted run: the counters
//! in the Prometheus text format match what the run did, the route sits
//! behind the admin token, and no label carries an id.
#![cfg(all(
    feature = "axum",
    feature = "reqwest",
    feature = "tracing",
    feature = "metrics"
))]

#[allow(dead_code)]
#[path = "../examples/server.rs"]
mod server;

mod common;

use std::collections::HashMap;

use reqwest::StatusCode;
use server::Config;

const TOKEN: &str = "metrics-test-admin-token";

/// `name{labels} value` lines of a Prometheus text rendering, by series
/// (values as whole numbers: every value checked here is a count).
fn series(text: &str) -> HashMap<String, u64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            Some((name.to_owned(), value.parse().ok()?))
        })
        .collect()
}

fn value(all: &HashMap<String, u64>, name: &str) -> u64 {
    all.get(name)
        .copied()
        .unwrap_or_else(|| panic!("no series {name} in {all:#?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_a_scripted_run() {
    let mut config = Config::new(common::SECRET);
    config.admin_token = Some(TOKEN.to_owned());
    let state = server::build_state(&config).await.expect("state");
    let app = server::app(state, &config);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(server::serve(listener, app, std::future::pending()));
    let http = reqwest::Client::new();
    let deliver = |body: String, header: String| {
        let request = http
            .post(format!("{base}/webhooks/stripe"))
            .header("Stripe-Signature", header)
            .body(body);
        async move { request.send().await.expect("delivery").status() }
    };

    // The script: three new subscriptions, one duplicate delivery, one
    // stale snapshot, one forged signature.
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    for i in 1..=3 {
        let body = common::sub_event(
            &format!("evt_m{i}"),
            "customer.subscription.created",
            now - 100,
            &format!("sub_m{i}"),
            "active",
        );
        let header = common::sign(&body, now);
        assert_eq!(deliver(body, header).await, StatusCode::OK);
    }
    let again = common::sub_event(
        "evt_m1",
        "customer.subscription.created",
        now - 100,
        "sub_m1",
        "active",
    );
    assert_eq!(
        deliver(again.clone(), common::sign(&again, now)).await,
        StatusCode::OK
    );
    let older = common::sub_event(
        "evt_m0",
        "customer.subscription.updated",
        now - 500,
        "sub_m1",
        "trialing",
    );
    assert_eq!(
        deliver(older.clone(), common::sign(&older, now)).await,
        StatusCode::OK
    );
    let forged = "t=1,v1=00".to_owned();
    assert_eq!(deliver(again, forged).await, StatusCode::BAD_REQUEST);

    // Behind the admin token.
    let anonymous = http
        .get(format!("{base}/metrics"))
        .send()
        .await
        .expect("get");
    assert_eq!(anonymous.status(), StatusCode::UNAUTHORIZED);
    let response = http
        .get(format!("{base}/metrics"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .expect("get");
    assert_eq!(response.status(), StatusCode::OK);
    assert!(
        response.headers()[reqwest::header::CONTENT_TYPE]
            .to_str()
            .is_ok_and(|c| c.starts_with("text/plain"))
    );
    let text = response.text().await.expect("text");
    let all = series(&text);

    let deliveries = |outcome: &str| {
        value(
            &all,
            &format!("stripe_webhook_guard_deliveries_total{{outcome=\"{outcome}\"}}"),
        )
    };
    assert_eq!(deliveries("applied"), 3, "{text}");
    assert_eq!(deliveries("duplicate"), 1);
    assert_eq!(deliveries("stale"), 1);
    assert_eq!(deliveries("signature_mismatch"), 1);
    // Four attempts reached completion (three applied, one stale).
    assert_eq!(
        value(&all, "stripe_webhook_guard_handler_duration_seconds_count"),
        4
    );
    assert_eq!(value(&all, "stripe_webhook_guard_inbox_backlog"), 0);
    assert_eq!(
        value(&all, "stripe_webhook_guard_inbox_oldest_age_seconds"),
        0
    );
    assert_eq!(value(&all, "stripe_webhook_guard_dead_letters_stored"), 0);
    assert!(
        !text.contains("stripe_webhook_guard_dead_letters_total"),
        "none dead-lettered"
    );
    // No label holds an id.
    for id in ["evt_", "sub_", "cus_"] {
        assert!(!text.contains(id), "{id} in {text}");
    }
}
