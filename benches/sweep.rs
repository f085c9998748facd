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
use stripe_webhook_guard::store::MemoryStore;
use stripe_webhook_guard::testing::{FakeConfig, FakeStripe, Subscribe};

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
        .store(store)
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
        let report = rt
            .block_on(reconciler.sweep(SweepScope::All))
            .expect("sweep");
        let requests = fake.request_count() - requests0;
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
