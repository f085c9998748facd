//! Helpers shared by the benchmarks: the 2 KiB event, a poll-to-completion
//! executor for futures that never wait, raw HMAC, and processors over the
//! in-memory store.
#![allow(dead_code)]

use std::future::Future;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use stripe_webhook_guard::access::AccessPolicy;
use stripe_webhook_guard::clock::ManualClock;
use stripe_webhook_guard::event::SubscriptionView;
use stripe_webhook_guard::processor::WebhookProcessor;
use stripe_webhook_guard::signature::{Verifier, WebhookSecret, test_header};
use stripe_webhook_guard::store::MemoryStore;
use stripe_webhook_guard::subscription::{SubscriptionRecord, from_stripe};
use time::OffsetDateTime;

/// The signing secret of every benchmark.
pub const SECRET: &str = "whsec_bench_0123456789abcdefghijklmnop";
/// The benchmarks' "now", in Unix seconds.
pub const T: i64 = 1_700_000_000;

/// [`T`] as a date.
pub fn now() -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp(T).expect("in range")
}

/// A realistic subscription event (basil shape) of exactly `size` bytes,
/// padded with metadata.
pub fn event_body(event_id: &str, sub: &str, created: i64, size: usize) -> String {
    let head = format!(
        r#"{{"id":"{event_id}","object":"event","api_version":"2025-03-31.basil","created":{created},"data":{{"object":{{"id":"{sub}","object":"subscription","application":null,"billing_cycle_anchor":{created},"cancel_at":null,"cancel_at_period_end":false,"canceled_at":null,"collection_method":"charge_automatically","created":{created},"currency":"usd","customer":"cus_{sub}","days_until_due":null,"default_payment_method":"pm_1PgcBench","description":null,"discounts":[],"ended_at":null,"items":{{"object":"list","data":[{{"id":"si_{sub}","object":"subscription_item","created":{created},"current_period_end":{},"current_period_start":{created},"metadata":{{}},"price":{{"id":"price_1PgafmB7WZ01zgkW6dKueIc5","object":"price","active":true,"currency":"usd","product":"prod_QXg1hqf4jFNsqG","recurring":{{"interval":"month","interval_count":1,"usage_type":"licensed"}},"type":"recurring","unit_amount":2000}},"quantity":1,"subscription":"{sub}"}}],"has_more":false,"total_count":1,"url":"/v1/subscription_items?subscription={sub}"}},"latest_invoice":"in_1PgcBench","livemode":false,"metadata":{{"pad":""#,
        created + 2_592_000
    );
    let tail = r#""},"pause_collection":null,"start_date":1700000000,"status":"active","trial_end":null,"trial_start":null},"previous_attributes":{"status":"past_due"}},"livemode":false,"pending_webhooks":1,"request":{"id":null,"idempotency_key":null},"type":"customer.subscription.updated"}"#;
    let pad = size.saturating_sub(head.len() + tail.len());
    format!("{head}{}{tail}", "x".repeat(pad))
}

/// The 2 KiB event of `parse_2KiB` with its signature header.
pub fn signed_2kib() -> (String, String) {
    let body = event_body("evt_1PgcBench0000000000", "sub_1PgcBench", T, 2048);
    assert_eq!(body.len(), 2048);
    let header = test_header(&WebhookSecret::new(SECRET), body.as_bytes(), now());
    (body, header)
}

/// `n` signed deliveries of new events over 1,000 subscriptions, each event
/// newer than the last one of its subscription.
pub fn new_deliveries(first: u64, n: u64) -> Vec<(String, String)> {
    let secret = WebhookSecret::new(SECRET);
    (first..first + n)
        .map(|i| {
            let body = event_body(
                &format!("evt_bench_{i:012}"),
                &format!("sub_bench_{:04}", i % 1000),
                T - 1_000_000 + i64::try_from(i).unwrap_or(0),
                2048,
            );
            let header = test_header(&secret, body.as_bytes(), now());
            (body, header)
        })
        .collect()
}

/// A processor over a fresh in-memory store on a manual clock at [`T`].
pub fn memory_processor() -> WebhookProcessor {
    let clock = ManualClock::at_unix(T);
    WebhookProcessor::builder(Verifier::new(SECRET))
        .store(Arc::new(MemoryStore::with_clock(Arc::new(clock.clone()))))
        .clock(Arc::new(clock))
        .build()
}

/// Runs a future that never waits on I/O (the in-memory store) to completion.
pub fn block_on<F: Future>(fut: F) -> F::Output {
    let mut fut = std::pin::pin!(fut);
    let mut cx = Context::from_waker(Waker::noop());
    loop {
        if let Poll::Ready(v) = fut.as_mut().poll(&mut cx) {
            return v;
        }
    }
}

/// HMAC-SHA256 of `t.body` with the key set up per call: the floor any
/// verifier pays.
pub fn raw_hmac(key: &[u8], t: &[u8], body: &[u8]) -> [u8; 32] {
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(key).expect("any key length");
    mac.update(t);
    mac.update(b".");
    mac.update(body);
    mac.finalize().into_bytes().into()
}

/// The `access/decide` case: the default policy, a past-due record whose
/// last payment failed at [`T`], and a moment one day later.
pub fn access_case() -> (AccessPolicy, SubscriptionRecord, OffsetDateTime) {
    let view = SubscriptionView::from_json(
        r#"{"id":"sub_1","object":"subscription","customer":"cus_1","status":"past_due",
        "current_period_start":1700000000,"current_period_end":1702592000}"#,
    )
    .expect("a subscription");
    let mut record = from_stripe(None, &view, now(), None).record;
    record.last_payment_failed_at = Some(T);
    let later = OffsetDateTime::from_unix_timestamp(T + 86_400).expect("in range");
    (AccessPolicy::default(), record, later)
}
