//! The PostgreSQL store under load (runs when `DATABASE_URL` is set; prints
//! why and exits otherwise).
//!
//! Criterion ids (8 operations in flight through one sqlx pool of 8
//! connections, sqlx's default pool options; a fresh schema per operation
//! and run; time per operation = wall time / operations):
//! - `postgres/insert_on_conflict`: the floor, a plain single-row
//!   `INSERT … ON CONFLICT DO NOTHING` of an event id and the 2 KiB body;
//! - `postgres/inbox_receive`: `Inbox::receive` of a new 2 KiB event
//!   (verify, parse, enqueue);
//! - `postgres/sync_new_event`: `WebhookProcessor::handle` of a new 2 KiB
//!   event (verify, parse, claim, subscription effect, save, complete).
//!
//! With `BENCH_LATENCY=1` it prints instead p50/p99 latency and throughput
//! of the three operations at concurrency 1, 8 and 32 (a pool of as many
//! connections), and the round trips, statements and prepares per operation
//! counted by a proxy on the wire, with sqlx's ping on acquire and without:
//!
//! ```text
//! DATABASE_URL=postgres://postgres@127.0.0.1:5432/test cargo bench --bench postgres
//! BENCH_LATENCY=1 DATABASE_URL=postgres://postgres@127.0.0.1:5432/test cargo bench --bench postgres
//! ```

mod common;
#[path = "common/pg.rs"]
mod pg;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use common::new_deliveries;
use criterion::{Criterion, SamplingMode, Throughput};
use pg::{CountingProxy, Schema};
use sqlx::postgres::{PgConnectOptions, PgPool};
use stripe_webhook_guard::processor::{Outcome, WebhookProcessor};

/// In flight for the criterion ids.
const IN_FLIGHT: usize = 8;

/// The first event number not used yet (each operation needs new events).
static NEXT_EVENT: AtomicU64 = AtomicU64::new(0);

fn take_events(n: u64) -> u64 {
    NEXT_EVENT.fetch_add(n, Ordering::Relaxed)
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Op {
    Floor,
    Receive,
    Sync,
    /// Not a criterion id: a redelivery of a processed event.
    Duplicate,
}

impl Op {
    /// The criterion ids.
    const IDS: [Op; 3] = [Op::Floor, Op::Receive, Op::Sync];
    /// The latency and wire tables.
    const ALL: [Op; 4] = [Op::Floor, Op::Receive, Op::Sync, Op::Duplicate];

    fn id(self) -> &'static str {
        match self {
            Op::Floor => "insert_on_conflict",
            Op::Receive => "inbox_receive",
            Op::Sync => "sync_new_event",
            Op::Duplicate => "sync_duplicate",
        }
    }
}

/// One operation over its own fresh schema.
struct Target {
    op: Op,
    schema: Schema,
    pool: PgPool,
}

impl Target {
    async fn new(op: Op, admin: &PgPool, pool: PgPool) -> Self {
        let schema = Schema::fresh(admin).await;
        if op == Op::Floor {
            schema.sql(pg::FLOOR_TABLE).await;
        }
        Self { op, schema, pool }
    }

    /// Runs `n` new events with `concurrency` in flight (for
    /// `Op::Duplicate`, processed first, untimed, then redelivered).
    async fn run(&self, n: u64, concurrency: usize, latencies: bool) -> (Duration, Vec<Duration>) {
        let work = self.prepare(n, concurrency).await;
        self.timed(work, concurrency, latencies).await
    }

    /// New deliveries, and for `Op::Duplicate` their first processing.
    async fn prepare(&self, n: u64, concurrency: usize) -> Work {
        let first = take_events(n);
        let deliveries = Arc::new(new_deliveries(first, n));
        let work = Work {
            first,
            n,
            deliveries,
        };
        if self.op == Op::Duplicate {
            let p = pg::processor(self.schema.store(&self.pool));
            let op = handle(p, Arc::clone(&work.deliveries), false);
            pg::run_concurrent(concurrency, n, false, op).await;
        }
        work
    }

    /// The measured part.
    async fn timed(
        &self,
        work: Work,
        concurrency: usize,
        latencies: bool,
    ) -> (Duration, Vec<Duration>) {
        let Work {
            first,
            n,
            deliveries,
        } = work;
        match self.op {
            Op::Floor => {
                let pool = self.pool.clone();
                let sql: Arc<str> = pg::floor_insert(&self.schema.name).into();
                pg::run_concurrent(concurrency, n, latencies, move |i| {
                    let pool = pool.clone();
                    let sql = Arc::clone(&sql);
                    let deliveries = Arc::clone(&deliveries);
                    async move {
                        let (body, _) = &deliveries[usize::try_from(i).expect("fits")];
                        let id = format!("evt_bench_{:012}", first + i);
                        sqlx::query(sqlx::AssertSqlSafe(sql))
                            .bind(id)
                            .bind(body.as_str())
                            .execute(&pool)
                            .await
                            .expect("insert");
                    }
                })
                .await
            }
            Op::Receive => {
                let inbox = pg::inbox(self.schema.store(&self.pool));
                pg::run_concurrent(concurrency, n, latencies, move |i| {
                    let inbox = inbox.clone();
                    let deliveries = Arc::clone(&deliveries);
                    async move {
                        let (body, header) = &deliveries[usize::try_from(i).expect("fits")];
                        let out = inbox.receive(body.as_bytes(), Some(header)).await;
                        assert!(matches!(out, Ok(Outcome::Queued { .. })), "{out:?}");
                    }
                })
                .await
            }
            Op::Sync | Op::Duplicate => {
                let p = pg::processor(self.schema.store(&self.pool));
                let op = handle(p, deliveries, self.op == Op::Duplicate);
                pg::run_concurrent(concurrency, n, latencies, op).await
            }
        }
    }
}

/// Signed deliveries of new events `first..first + n`.
struct Work {
    first: u64,
    n: u64,
    deliveries: Arc<Vec<(String, String)>>,
}

/// `WebhookProcessor::handle` of delivery `i`, expecting it processed (or,
/// with `duplicate`, answered as a duplicate).
fn handle(
    p: WebhookProcessor,
    deliveries: Arc<Vec<(String, String)>>,
    duplicate: bool,
) -> impl Fn(u64) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync + 'static {
    move |i| {
        let p = p.clone();
        let deliveries = Arc::clone(&deliveries);
        Box::pin(async move {
            let (body, header) = &deliveries[usize::try_from(i).expect("fits")];
            let out = p.handle(body.as_bytes(), Some(header)).await;
            if duplicate {
                assert!(matches!(out, Ok(Outcome::Duplicate { .. })), "{out:?}");
            } else {
                assert!(matches!(out, Ok(Outcome::Processed { .. })), "{out:?}");
            }
        })
    }
}

fn criterion_ids(c: &mut Criterion, rt: &tokio::runtime::Runtime, options: &PgConnectOptions) {
    let admin = rt.block_on(pg::pool(options, 2, true));
    let mut group = c.benchmark_group("postgres");
    group.throughput(Throughput::Elements(1));
    group.sampling_mode(SamplingMode::Flat);
    group.sample_size(20);
    group.warm_up_time(Duration::from_secs(2));
    group.measurement_time(Duration::from_secs(8));
    for op in Op::IDS {
        let pool = rt.block_on(pg::pool(
            options,
            u32::try_from(IN_FLIGHT).expect("fits"),
            true,
        ));
        let target = rt.block_on(Target::new(op, &admin, pool));
        group.bench_function(op.id(), |b| {
            b.iter_custom(|iters| rt.block_on(target.run(iters, IN_FLIGHT, false)).0);
        });
        rt.block_on(target.schema.drop_now());
    }
    group.finish();
}

/// p50/p99 and throughput at concurrency 1, 8 and 32.
async fn latency_table(options: &PgConnectOptions, admin: &PgPool, n: u64) {
    println!("operation | concurrency | p50 | p99 | operations/s");
    for concurrency in [1usize, 8, 32] {
        for op in Op::ALL {
            let pool = pg::pool(options, u32::try_from(concurrency).expect("fits"), true).await;
            let target = Target::new(op, admin, pool).await;
            // Warm-up: connections open, statements prepared, the
            // subscriptions' first saves (inserts) done.
            target.run(1000, concurrency, false).await;
            let (wall, mut lat) = target.run(n, concurrency, true).await;
            lat.sort_unstable();
            #[allow(clippy::cast_precision_loss)]
            let rate = n as f64 / wall.as_secs_f64();
            println!(
                "{} | {concurrency} | {:.0} µs | {:.0} µs | {rate:.0}",
                op.id(),
                pg::quantile(&lat, 0.50).as_secs_f64() * 1e6,
                pg::quantile(&lat, 0.99).as_secs_f64() * 1e6,
            );
            target.pool.close().await;
            target.schema.drop_now().await;
        }
    }
}

/// Round trips, statements and prepares per operation, counted on the wire
/// at concurrency 1 after a warm-up.
async fn round_trips(options: &PgConnectOptions, admin: &PgPool, n: u64) {
    let proxy = CountingProxy::start(options).await;
    println!("operation | ping on acquire | round trips/op | statements/op | prepares/op");
    for ping in [true, false] {
        for op in Op::ALL {
            let pool = pg::pool(&proxy.options, 1, ping).await;
            let target = Target::new(op, admin, pool).await;
            target.run(1000, 1, false).await;
            let work = target.prepare(n, 1).await;
            let (r0, s0, p0) = proxy.counts.snapshot();
            target.timed(work, 1, false).await;
            let (r1, s1, p1) = proxy.counts.snapshot();
            #[allow(clippy::cast_precision_loss)]
            let per = |a: u64, b: u64| (b - a) as f64 / n as f64;
            println!(
                "{} | {ping} | {:.2} | {:.2} | {:.2}",
                op.id(),
                per(r0, r1),
                per(s0, s1),
                per(p0, p1)
            );
            target.pool.close().await;
            target.schema.drop_now().await;
        }
    }
}

fn main() {
    let Some(url) = pg::database_url() else {
        pg::skip_message("postgres");
        return;
    };
    let options = pg::options(&url);
    let rt = pg::runtime();
    if std::env::var_os("BENCH_LATENCY").is_some() {
        let n = std::env::var("BENCH_LATENCY_OPS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(4000);
        rt.block_on(async {
            let admin = pg::pool(&options, 2, true).await;
            latency_table(&options, &admin, n).await;
            round_trips(&options, &admin, 1000).await;
        });
        return;
    }
    let mut c = Criterion::default().configure_from_args();
    criterion_ids(&mut c, &rt, &options);
    c.final_summary();
}
