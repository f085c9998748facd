//! Parsing, the in-memory pipeline and access decisions.
//!
//! Groups (ratios are read off one run):
//! - `parse_2KiB`: raw HMAC-SHA256 (key set up per call) vs `verify` vs
//!   `verify` + `Event::parse` (what the SDKs call `construct_event`) over a
//!   2 KiB `customer.subscription.updated` event;
//! - `pipeline_2KiB`: `WebhookProcessor::handle` on the in-memory store: a
//!   new event each iteration (verify, parse, claim, subscription effect,
//!   save, complete), and a duplicate delivery;
//! - `access`: `AccessPolicy::decide` on one record.

use std::future::Future;
use std::hint::black_box;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use stripe_webhook_guard::access::AccessPolicy;
use stripe_webhook_guard::clock::ManualClock;
use stripe_webhook_guard::event::{Event, SubscriptionView};
use stripe_webhook_guard::processor::WebhookProcessor;
use stripe_webhook_guard::signature::{Verifier, WebhookSecret, test_header};
use stripe_webhook_guard::store::MemoryStore;
use stripe_webhook_guard::subscription::from_stripe;
use time::OffsetDateTime;

const SECRET: &str = "whsec_bench_0123456789abcdefghijklmnop";
const T: i64 = 1_700_000_000;

/// A realistic 2 KiB subscription event (basil shape), padded with metadata.
fn event_body(event_id: &str, sub: &str, created: i64, size: usize) -> String {
    let head = format!(
        r#"{{"id":"{event_id}","object":"event","api_version":"2025-03-31.basil","created":{created},"data":{{"object":{{"id":"{sub}","object":"subscription","application":null,"billing_cycle_anchor":{created},"cancel_at":null,"cancel_at_period_end":false,"canceled_at":null,"collection_method":"charge_automatically","created":{created},"currency":"usd","customer":"cus_{sub}","days_until_due":null,"default_payment_method":"pm_1PgcBench","description":null,"discounts":[],"ended_at":null,"items":{{"object":"list","data":[{{"id":"si_{sub}","object":"subscription_item","created":{created},"current_period_end":{},"current_period_start":{created},"metadata":{{}},"price":{{"id":"price_1PgafmB7WZ01zgkW6dKueIc5","object":"price","active":true,"currency":"usd","product":"prod_QXg1hqf4jFNsqG","recurring":{{"interval":"month","interval_count":1,"usage_type":"licensed"}},"type":"recurring","unit_amount":2000}},"quantity":1,"subscription":"{sub}"}}],"has_more":false,"total_count":1,"url":"/v1/subscription_items?subscription={sub}"}},"latest_invoice":"in_1PgcBench","livemode":false,"metadata":{{"pad":""#,
        created + 2_592_000
    );
    let tail = r#""},"pause_collection":null,"start_date":1700000000,"status":"active","trial_end":null,"trial_start":null},"previous_attributes":{"status":"past_due"}},"livemode":false,"pending_webhooks":1,"request":{"id":null,"idempotency_key":null},"type":"customer.subscription.updated"}"#;
    let pad = size.saturating_sub(head.len() + tail.len());
    format!("{head}{}{tail}", "x".repeat(pad))
}

/// Runs a future that never waits on I/O (the in-memory store) to completion.
fn block_on<F: Future>(fut: F) -> F::Output {
    let mut fut = std::pin::pin!(fut);
    let mut cx = Context::from_waker(Waker::noop());
    loop {
        if let Poll::Ready(v) = fut.as_mut().poll(&mut cx) {
            return v;
        }
    }
}

fn raw_hmac(key: &[u8], t: &[u8], body: &[u8]) -> [u8; 32] {
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(key).expect("any key length");
    mac.update(t);
    mac.update(b".");
    mac.update(body);
    mac.finalize().into_bytes().into()
}

fn bench_parse(c: &mut Criterion) {
    let now = OffsetDateTime::from_unix_timestamp(T).expect("in range");
    let secret = WebhookSecret::new(SECRET);
    let verifier = Verifier::new(secret.clone());
    let body = event_body("evt_1PgcBench0000000000", "sub_1PgcBench", T, 2048);
    assert_eq!(body.len(), 2048);
    let header = test_header(&secret, body.as_bytes(), now);
    let t_text = T.to_string();
    let mut group = c.benchmark_group("parse_2KiB");
    group.throughput(Throughput::Bytes(2048));
    group.bench_function("raw_hmac_sha256", |b| {
        b.iter(|| {
            raw_hmac(
                black_box(SECRET.as_bytes()),
                black_box(t_text.as_bytes()),
                black_box(body.as_bytes()),
            )
        });
    });
    group.bench_function("verify", |b| {
        b.iter(|| {
            verifier.verify(
                black_box(body.as_bytes()),
                black_box(Some(header.as_str())),
                now,
            )
        });
    });
    group.bench_function("verify_and_parse", |b| {
        b.iter(|| {
            let v = verifier
                .verify(
                    black_box(body.as_bytes()),
                    black_box(Some(header.as_str())),
                    now,
                )
                .expect("valid");
            Event::parse(v).expect("parses")
        });
    });
    let event = Event::parse_unverified(body.as_bytes()).expect("parses");
    group.bench_function("subscription_view", |b| {
        b.iter(|| black_box(&event).subscription().expect("a subscription"));
    });
    group.finish();
}

fn bench_pipeline(c: &mut Criterion) {
    let secret = WebhookSecret::new(SECRET);
    let mut group = c.benchmark_group("pipeline_2KiB");
    group.throughput(Throughput::Elements(1));
    group.bench_function("new_event", |b| {
        b.iter_custom(|iters| {
            let clock = ManualClock::at_unix(T);
            let store = Arc::new(MemoryStore::with_clock(Arc::new(clock.clone())));
            let p = WebhookProcessor::builder(Verifier::new(secret.clone()))
                .store(store)
                .clock(Arc::new(clock))
                .build();
            let now = OffsetDateTime::from_unix_timestamp(T).expect("in range");
            // 1,000 subscriptions, each event newer than the last one of its subscription.
            let deliveries: Vec<(String, String)> = (0..iters)
                .map(|i| {
                    let body = event_body(
                        &format!("evt_bench_{i:012}"),
                        &format!("sub_bench_{:04}", i % 1000),
                        T - 1_000_000 + i64::try_from(i).unwrap_or(0),
                        2048,
                    );
                    let header = test_header(&secret, body.as_bytes(), now);
                    (body, header)
                })
                .collect();
            let start = Instant::now();
            for (body, header) in &deliveries {
                let out = block_on(p.handle(body.as_bytes(), Some(header)));
                black_box(out.expect("processed"));
            }
            start.elapsed()
        });
    });
    group.bench_function("duplicate", |b| {
        let clock = ManualClock::at_unix(T);
        let p = WebhookProcessor::builder(Verifier::new(secret.clone()))
            .store(Arc::new(MemoryStore::with_clock(Arc::new(clock.clone()))))
            .clock(Arc::new(clock))
            .build();
        let now = OffsetDateTime::from_unix_timestamp(T).expect("in range");
        let body = event_body("evt_dup", "sub_dup", T, 2048);
        let header = test_header(&secret, body.as_bytes(), now);
        block_on(p.handle(body.as_bytes(), Some(&header))).expect("first");
        b.iter(|| {
            block_on(p.handle(black_box(body.as_bytes()), Some(&header))).expect("duplicate")
        });
    });
    group.finish();
}

fn bench_access(c: &mut Criterion) {
    let view = SubscriptionView::from_json(
        r#"{"id":"sub_1","object":"subscription","customer":"cus_1","status":"past_due",
        "current_period_start":1700000000,"current_period_end":1702592000}"#,
    )
    .expect("a subscription");
    let now = OffsetDateTime::from_unix_timestamp(T).expect("in range");
    let mut record = from_stripe(None, &view, now, None).record;
    record.last_payment_failed_at = Some(T);
    let policy = AccessPolicy::default();
    let later = OffsetDateTime::from_unix_timestamp(T + 86_400).expect("in range");
    let mut group = c.benchmark_group("access");
    group.bench_function("decide", |b| {
        b.iter(|| policy.decide(black_box(&record), black_box(later)));
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    targets = bench_parse, bench_pipeline, bench_access
}
criterion_main!(benches);
