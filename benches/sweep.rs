//! `Reconciler::sweep(SweepScope::All)` against the fake Stripe
//! (`testing::FakeStripe`, in process) over the in-memory store, with 10³,
//! 10⁴ and 10⁵ active subscriptions that the store already holds (a first,
//! untimed sweep discovers them): what a periodic full sweep costs on top of
//! Stripe's answers, and whether it stays linear.
//!
//! Criterion ids `sweep/{1e3,1e4,1e5}` (time per sweep; divide by the count
//! for time per subscription). Before each size's measurement it prints the
//! Stripe requests and store writes of one sweep.
//!
//! ```text
//! cargo bench --bench sweep
//! ```

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{SECRET, T};
use criterion::{Criterion, SamplingMode, Throughput};
use stripe_webhook_guard::clock::ManualClock;
use stripe_webhook_guard::processor::WebhookProcessor;
use stripe_webhook_guard::reconcile::{Reconciler, SweepScope};
use stripe_webhook_guard::signature::Verifier;
use stripe_webhook_guard::store::{MemoryStore, SubscriptionQuery, SubscriptionStore};
use stripe_webhook_guard::testing::{FakeConfig, FakeStripe, Subscribe};

/// Time this thread has spent on a CPU (`/proc/thread-self/schedstat`,
/// nanoseconds; zero where it is not available): unlike wall time, it does
/// not count waiting for a CPU on a loaded machine.
fn on_cpu() -> Duration {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .map_or(Duration::ZERO, Duration::from_nanos)
}

const SIZES: [(&str, u64); 3] = [("1e3", 1_000), ("1e4", 10_000), ("1e5", 100_000)];

fn main() {
    let mut c = Criterion::default().configure_from_args();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let clock = ManualClock::at_unix(T);
    let fake = Arc::new(FakeStripe::new(clock.clone(), FakeConfig::default()));
    let store = Arc::new(MemoryStore::with_clock(Arc::new(clock.clone())));
    let p = WebhookProcessor::builder(Verifier::new(SECRET))
        .store(store.clone())
        .client(fake.clone())
        .clock(Arc::new(clock.clone()))
        .build();
    let reconciler = Reconciler::new(p, fake.clone());
    let mut group = c.benchmark_group("sweep");
    group.sampling_mode(SamplingMode::Flat);
    group.sample_size(10);
    group.warm_up_time(Duration::from_secs(1));
    group.measurement_time(Duration::from_secs(10));
    let mut have = 0;
    for (label, size) in SIZES {
        let t0 = Instant::now();
        for _ in have..size {
            let customer = fake.create_customer();
            fake.subscribe(&customer, &Subscribe::default());
        }
        have = size;
        // Discover the new ones (untimed), then one sweep as measured.
        let first = rt
            .block_on(reconciler.sweep(SweepScope::All))
            .expect("sweep");
        let requests0 = fake.request_count();
        let (cpu0, wall0) = (on_cpu(), Instant::now());
        let report = rt
            .block_on(reconciler.sweep(SweepScope::All))
            .expect("sweep");
        let (cpu, wall) = (on_cpu().saturating_sub(cpu0), wall0.elapsed());
        let requests = fake.request_count() - requests0;
        // The store's part: paging through every local record, as the
        // sweep does twice (unknown-to-Stripe check, entitlements).
        let cpu1 = on_cpu();
        let mut after = None;
        let mut records = 0;
        loop {
            let query = SubscriptionQuery {
                after: after.clone(),
                limit: 500,
                ..SubscriptionQuery::default()
            };
            let page = rt.block_on(store.list_subscriptions(&query)).expect("list");
            let Some(last) = page.last() else { break };
            after = Some(last.id.clone());
            records += page.len();
        }
        let paging = on_cpu().saturating_sub(cpu1);
        #[allow(clippy::cast_precision_loss)]
        let per = requests as f64 / size as f64;
        println!(
            "sweep/{label}: set up in {:.1} s; first sweep wrote {} records; a sweep checks {} \
             subscriptions with {requests} Stripe requests ({per:.3} per subscription) and \
             {} writes",
            t0.elapsed().as_secs_f64(),
            first.writes,
            report.subscriptions_checked,
            report.writes,
        );
        #[allow(clippy::cast_precision_loss)]
        let us_per = |d: Duration| d.as_secs_f64() * 1e6 / size as f64;
        println!(
            "sweep/{label}: one sweep took {:.3} s wall, {:.3} s on this thread's CPU \
             ({:.1} µs per subscription); paging through the store's {records} records \
             once took {:.3} s on CPU ({:.1} µs per record)",
            wall.as_secs_f64(),
            cpu.as_secs_f64(),
            us_per(cpu),
            paging.as_secs_f64(),
            us_per(paging),
        );
        group.throughput(Throughput::Elements(size));
        group.bench_function(label, |b| {
            b.iter_custom(|iters| {
                let start = Instant::now();
                for _ in 0..iters {
                    rt.block_on(reconciler.sweep(SweepScope::All))
                        .expect("sweep");
                }
                start.elapsed()
            });
        });
    }
    group.finish();
    c.final_summary();
}
