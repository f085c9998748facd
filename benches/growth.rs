//! Per-event cost as the ledger grows: `WebhookProcessor::handle` of a new
//! 2 KiB event with 10³, 10⁵ and 10⁶ processed events already in the
//! ledger, on the in-memory store and on PostgreSQL (when `DATABASE_URL`
//! is set; skipped with a message otherwise).
//!
//! Criterion ids: `growth/memory/{1e3,1e5,1e6}` (one event at a time, as
//! `pipeline_2KiB/new_event`) and `growth/postgres/{1e3,1e5,1e6}` (8 in
//! flight through a pool of 8, as `postgres/sync_new_event`). After each
//! sample the events it added are removed again (memory: `prune`, they are
//! older than the seeded ones; PostgreSQL: a `DELETE` of their id range),
//! so the ledger holds the nominal count plus at most one sample's events.
//! PostgreSQL is seeded with one `INSERT … SELECT generate_series` per step.
//!
//! ```text
//! DATABASE_URL=postgres://postgres@127.0.0.1:5432/test cargo bench --bench growth
//! ```

mod common;
#[path = "common/pg.rs"]
mod pg;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::{SECRET, T, block_on, new_deliveries};
use criterion::{Criterion, SamplingMode, Throughput};
use pg::Schema;
use stripe_webhook_guard::clock::ManualClock;
use stripe_webhook_guard::ledger::{ClaimOutcome, ClaimRequest, EventKey, Fingerprint};
use stripe_webhook_guard::processor::{Outcome, WebhookProcessor};
use stripe_webhook_guard::signature::Verifier;
use stripe_webhook_guard::store::{EventLedger, MemoryStore};
use time::OffsetDateTime;

/// The ledger sizes measured.
const SIZES: [(&str, u64); 3] = [("1e3", 1_000), ("1e5", 100_000), ("1e6", 1_000_000)];

static NEXT_EVENT: AtomicU64 = AtomicU64::new(0);

fn at(unix: i64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp(unix).expect("in range")
}

/// Seeded entries are completed ten days after [`T`], the measured ones at
/// `T`: `prune(T + 1 day)` removes exactly the measured ones.
const SEED_AT: i64 = T + 10 * 86_400;

/// Claims and completes seeded events `from..to` directly on the store.
fn seed_memory(store: &MemoryStore, from: u64, to: u64) {
    for i in from..to {
        let mut fingerprint = [0u8; 32];
        fingerprint[..8].copy_from_slice(&i.to_be_bytes());
        let request = ClaimRequest {
            key: EventKey {
                event_id: format!("evt_seed_{i:012}"),
                account: None,
            },
            event_type: "customer.subscription.updated".to_owned(),
            event_created: T - 2_000_000 + i64::try_from(i).expect("fits"),
            fingerprint: Fingerprint(fingerprint),
            lease: time::Duration::minutes(1),
            max_attempts: 5,
        };
        let ClaimOutcome::Claimed(lease) = block_on(store.claim(&request)).expect("claim") else {
            panic!("seeded events are new");
        };
        block_on(store.complete(&lease)).expect("complete");
    }
}

fn memory(c: &mut Criterion) {
    let clock = ManualClock::at_unix(T);
    let store = Arc::new(MemoryStore::with_clock(Arc::new(clock.clone())));
    let p = WebhookProcessor::builder(Verifier::new(SECRET))
        .store(store.clone())
        .clock(Arc::new(clock.clone()))
        .build();
    let mut group = c.benchmark_group("growth/memory");
    group.throughput(Throughput::Elements(1));
    group.sampling_mode(SamplingMode::Flat);
    group.sample_size(20);
    group.warm_up_time(Duration::from_secs(1));
    group.measurement_time(Duration::from_secs(4));
    let mut seeded = 0;
    for (label, size) in SIZES {
        clock.set(at(SEED_AT));
        seed_memory(&store, seeded, size);
        seeded = size;
        clock.set(at(T));
        group.bench_function(label, |b| {
            b.iter_custom(|iters| {
                let first = NEXT_EVENT.fetch_add(iters, Ordering::Relaxed);
                let deliveries = new_deliveries(first, iters);
                let start = Instant::now();
                for (body, header) in &deliveries {
                    let out = block_on(p.handle(body.as_bytes(), Some(header)));
                    assert!(matches!(out, Ok(Outcome::Processed { .. })), "{out:?}");
                }
                let elapsed = start.elapsed();
                let pruned = block_on(store.prune(at(T + 86_400))).expect("prune");
                assert_eq!(pruned, iters, "only the measured events are pruned");
                elapsed
            });
        });
    }
    group.finish();
}

/// Seeds processed events `from..to` into the ledger in one statement.
async fn seed_pg(schema: &Schema, from: u64, to: u64) {
    schema
        .sql(&format!(
            "INSERT INTO {{s}}.ledger (event_id, account, event_type, event_created, \
             fingerprint, state, attempts, lease_token, first_seen_at, updated_at) \
             SELECT 'evt_seed_' || lpad(g::text, 12, '0'), '', \
             'customer.subscription.updated', {base} + g, sha256(g::text::bytea), \
             'processed', 1, g, clock_timestamp(), clock_timestamp() \
             FROM generate_series({from}::bigint, {last}::bigint) AS g",
            base = T - 2_000_000,
            last = to - 1,
        ))
        .await;
    schema.sql("VACUUM ANALYZE {s}.ledger").await;
}

fn postgres(c: &mut Criterion) {
    let Some(url) = pg::database_url() else {
        pg::skip_message("growth");
        return;
    };
    let options = pg::options(&url);
    let rt = pg::runtime();
    let admin = rt.block_on(pg::pool(&options, 2, true));
    let pool = rt.block_on(pg::pool(&options, 8, true));
    let schema = rt.block_on(Schema::fresh(&admin));
    let p = pg::processor(schema.store(&pool));
    let mut group = c.benchmark_group("growth/postgres");
    group.throughput(Throughput::Elements(1));
    group.sampling_mode(SamplingMode::Flat);
    group.sample_size(20);
    group.warm_up_time(Duration::from_secs(2));
    group.measurement_time(Duration::from_secs(8));
    let mut seeded = 0;
    for (label, size) in SIZES {
        let t0 = Instant::now();
        rt.block_on(seed_pg(&schema, seeded, size));
        println!(
            "growth/postgres: seeded {} rows in {:.1} s",
            size - seeded,
            t0.elapsed().as_secs_f64()
        );
        seeded = size;
        group.bench_function(label, |b| {
            b.iter_custom(|iters| {
                let first = NEXT_EVENT.fetch_add(iters, Ordering::Relaxed);
                let deliveries = Arc::new(new_deliveries(first, iters));
                let p = p.clone();
                let (elapsed, _) = rt.block_on(pg::run_concurrent(8, iters, false, move |i| {
                    let p = p.clone();
                    let deliveries = Arc::clone(&deliveries);
                    async move {
                        let (body, header) = &deliveries[usize::try_from(i).expect("fits")];
                        let out = p.handle(body.as_bytes(), Some(header)).await;
                        assert!(matches!(out, Ok(Outcome::Processed { .. })), "{out:?}");
                    }
                }));
                rt.block_on(schema.sql(
                    "DELETE FROM {s}.ledger WHERE event_id >= 'evt_bench_' \
                     AND event_id < 'evt_bench`'",
                ));
                elapsed
            });
        });
    }
    group.finish();
    rt.block_on(schema.drop_now());
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    memory(&mut c);
    postgres(&mut c);
    c.final_summary();
}
