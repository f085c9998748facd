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

mod common;

use std::hint::black_box;
use std::time::{Duration, Instant};

use common::{
    SECRET, T, access_case, block_on, memory_processor, new_deliveries, now, raw_hmac, signed_2kib,
};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use stripe_webhook_guard::event::Event;
use stripe_webhook_guard::signature::Verifier;

fn bench_parse(c: &mut Criterion) {
    let now = now();
    let verifier = Verifier::new(SECRET);
    let (body, header) = signed_2kib();
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
    let mut group = c.benchmark_group("pipeline_2KiB");
    group.throughput(Throughput::Elements(1));
    group.bench_function("new_event", |b| {
        b.iter_custom(|iters| {
            let p = memory_processor();
            let deliveries = new_deliveries(0, iters);
            let start = Instant::now();
            for (body, header) in &deliveries {
                let out = block_on(p.handle(body.as_bytes(), Some(header)));
                black_box(out.expect("processed"));
            }
            start.elapsed()
        });
    });
    group.bench_function("duplicate", |b| {
        let p = memory_processor();
        let (body, header) = signed_2kib();
        block_on(p.handle(body.as_bytes(), Some(&header))).expect("first");
        b.iter(|| {
            block_on(p.handle(black_box(body.as_bytes()), Some(&header))).expect("duplicate")
        });
    });
    group.finish();
}

fn bench_access(c: &mut Criterion) {
    let (policy, record, later) = access_case();
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
