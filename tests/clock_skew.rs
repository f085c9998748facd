//! Clock skew between the application and its store: leases and retry times
//! run on the store's clock, the application holds a lease by a monotonic
//! deadline, and every event is processed exactly once whether the
//! application's wall clock is 10 minutes (or 90 seconds) ahead of the
//! database's or behind it.
//!
//! Two ways:
//! - in process: a `MemoryStore` on one clock, the processor on a clock
//!   `skew` off it (both moved by one virtual time);
//! - as in production: this test binary is started again under `faketime`
//!   (libfaketime shifts every clock of the process) and processes events
//!   against the PostgreSQL server at `DATABASE_URL`, whose clock is real.
//!   Without `faketime` installed the check is skipped with a message,
//!   except in CI (`CI` set), where that is a failure.
//!
//! Rerun: `cargo test --all-features --test clock_skew -- --nocapture`.

mod common;
#[cfg(feature = "postgres")]
mod sql_support;

use std::sync::Arc;
use std::time::Instant;

use common::{CountingHandler, secret, sign, sub_event};
use stripe_webhook_guard::clock::{BoxFuture, Clock, ManualClock};
use stripe_webhook_guard::event::Event;
use stripe_webhook_guard::inbox::InboxConfig;
use stripe_webhook_guard::ledger::{EventKey, LedgerState};
use stripe_webhook_guard::processor::{
    EventHandler, HandlerContext, HandlerError, Outcome, WebhookProcessor,
};
use stripe_webhook_guard::signature::Verifier;
use stripe_webhook_guard::store::{EventLedger, InboxStore, MemoryStore};
use time::{Duration, OffsetDateTime};

const T0: i64 = 1_700_000_000;

/// The application's skews from the database's clock, in seconds.
const SKEWS: [i64; 4] = [-600, -90, 90, 600];

/// Events per mode and skew.
const EVENTS: usize = 20;

/// The application's clock: `skew` off the store's wall clock, with the
/// same monotonic face and the same sleeps (one virtual time for both).
#[derive(Debug)]
struct Skewed {
    base: ManualClock,
    skew: Duration,
}

impl Clock for Skewed {
    fn now(&self) -> OffsetDateTime {
        self.base.now() + self.skew
    }

    fn sleep(&self, duration: Duration) -> BoxFuture<'_, ()> {
        self.base.sleep(duration)
    }

    fn monotonic(&self) -> Instant {
        self.base.monotonic()
    }
}

/// A store on `db`'s clock and a processor `skew` seconds off it.
fn skewed_pipeline(
    db: &ManualClock,
    skew: i64,
    handler: Arc<dyn EventHandler>,
) -> (
    Arc<Skewed>,
    Arc<MemoryStore>,
    stripe_webhook_guard::processor::ProcessorBuilder<Arc<MemoryStore>>,
) {
    let app = Arc::new(Skewed {
        base: db.clone(),
        skew: Duration::seconds(skew),
    });
    let store = Arc::new(MemoryStore::with_clock(Arc::new(db.clone())));
    let builder = WebhookProcessor::builder(Verifier::new(secret()))
        .store(store.clone())
        .handler(handler)
        .clock(app.clone())
        .lease(Duration::seconds(60))
        .max_attempts(8);
    (app, store, builder)
}

fn event_body(skew: i64, i: usize) -> (String, String) {
    let id = format!("evt_skew_{skew}_{i}");
    let created = T0 + i64::try_from(i).unwrap_or(0);
    let body = sub_event(
        &id,
        "customer.subscription.updated",
        created,
        &format!("sub_skew_{i}"),
        "active",
    );
    (id, body)
}

/// Synchronous mode with the application ±10 min and ±90 s off the store's
/// clock: every event is processed on its first delivery, the handler runs
/// once per event, and the redelivery is a duplicate. (With the lease judged
/// by comparing the application's clock with the store's expiry, +90 s
/// answered "lease lost" and finally dead-lettered without the handler.)
#[tokio::test]
async fn synchronous_mode_processes_each_event_once_under_skew() {
    for skew in SKEWS {
        let handler = CountingHandler::new();
        let db = ManualClock::at_unix(T0);
        let (app, store, builder) = skewed_pipeline(&db, skew, handler.clone());
        let p = builder.build();
        for i in 0..EVENTS {
            let (id, body) = event_body(skew, i);
            // Stripe signs with the real time, which the application's
            // clock shows here.
            let header = sign(&body, app.now().unix_timestamp());
            let first = p.handle(body.as_bytes(), Some(&header)).await;
            assert!(
                matches!(first, Ok(Outcome::Processed { handled: true, .. })),
                "skew {skew} s, {id}: {first:?}"
            );
            let again = p.handle(body.as_bytes(), Some(&header)).await;
            assert!(
                matches!(
                    again,
                    Ok(Outcome::Duplicate {
                        state: LedgerState::Processed,
                        ..
                    })
                ),
                "skew {skew} s, {id} again: {again:?}"
            );
            assert_eq!(handler.effects_of(&id), 1, "skew {skew} s, {id}");
            db.advance(Duration::seconds(1));
        }
        assert_eq!(
            handler.calls.load(std::sync::atomic::Ordering::SeqCst) as usize,
            EVENTS,
            "skew {skew} s: handler calls"
        );
        let counts = store.ledger_counts();
        assert_eq!(counts.get("processed").copied(), Some(EVENTS), "{counts:?}");
        assert_eq!(p.stats().dead, 0, "skew {skew} s");
    }
}

/// Inbox mode under the same skews: every event is taken at once (its due
/// time is the store's now, not the application's), processed once, and a
/// failed event waits for its back-off on the store's clock: not retried
/// before it (an application clock behind the database's used to make it
/// due at once), retried after it (one ahead used to push it minutes out).
#[tokio::test]
async fn inbox_mode_processes_each_event_once_under_skew() {
    for skew in SKEWS {
        let handler = CountingHandler::new();
        let db = ManualClock::at_unix(T0);
        let (app, store, builder) = skewed_pipeline(&db, skew, handler.clone());
        let config = InboxConfig {
            base_backoff: Duration::seconds(10),
            max_backoff: Duration::seconds(20),
            ..InboxConfig::default()
        };
        let inbox = builder.build_inbox(config);
        let (flaky, _) = event_body(skew, 0);
        handler.fail_first.lock().unwrap().insert(flaky.clone(), 1);
        for i in 0..EVENTS {
            let (id, body) = event_body(skew, i);
            let header = sign(&body, app.now().unix_timestamp());
            for _ in 0..2 {
                let answer = inbox.receive(body.as_bytes(), Some(&header)).await;
                assert!(
                    matches!(
                        answer,
                        Ok(Outcome::Queued { .. } | Outcome::Duplicate { .. })
                    ),
                    "skew {skew} s, {id}: {answer:?}"
                );
            }
        }
        let worker = inbox.worker();
        let first = worker.run_until_idle().await.expect("worker");
        assert_eq!(first.processed, EVENTS - 1, "skew {skew} s: {first:?}");
        assert_eq!(first.retried, 1, "skew {skew} s: {first:?}");
        let entry = store
            .get(&EventKey::new(&flaky, None))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            entry.state,
            LedgerState::Failed,
            "skew {skew} s: retried before its back-off"
        );
        // Due between 5 and 20 s from the store's now (jittered back-off of
        // 10 s, capped at 20 s).
        let due_in = entry.available_at.expect("a retry time") - db.now();
        assert!(
            due_in > Duration::seconds(4) && due_in <= Duration::seconds(20),
            "skew {skew} s: due in {due_in}"
        );
        db.advance(Duration::seconds(21));
        let second = worker.run_until_idle().await.expect("worker");
        assert_eq!(second.processed, 1, "skew {skew} s: {second:?}");
        for i in 0..EVENTS {
            let (id, _) = event_body(skew, i);
            assert_eq!(handler.effects_of(&id), 1, "skew {skew} s, {id}");
        }
        assert_eq!(inbox.backlog().await.unwrap(), 0);
        assert_eq!(
            store.ledger_counts().get("processed").copied(),
            Some(EVENTS)
        );
    }
}

/// Asserts the lease's length as the handler sees it: valid until the
/// store's lease runs out, not a moment longer, whatever the skew.
struct LeaseProbe {
    clock: ManualClock,
    seen: std::sync::Mutex<Vec<(bool, std::time::Duration)>>,
}

#[async_trait::async_trait]
impl EventHandler for LeaseProbe {
    async fn handle(&self, _event: &Event, ctx: &HandlerContext) -> Result<(), HandlerError> {
        let mut seen = self.seen.lock().unwrap();
        seen.push((ctx.lease_valid(), ctx.lease_remaining()));
        self.clock.advance(Duration::seconds(59));
        seen.push((ctx.lease_valid(), ctx.lease_remaining()));
        self.clock.advance(Duration::seconds(1));
        seen.push((ctx.lease_valid(), ctx.lease_remaining()));
        Ok(())
    }
}

/// A 60 s lease lasts 60 s for the handler with the application ±10 min off
/// the store's clock: valid with 60 s left at the start, valid with 1 s left
/// after 59 s, over at 60 s.
#[tokio::test]
async fn lease_lasts_its_full_length_under_skew() {
    for skew in SKEWS {
        let db = ManualClock::at_unix(T0);
        let probe = Arc::new(LeaseProbe {
            clock: db.clone(),
            seen: std::sync::Mutex::new(Vec::new()),
        });
        let (app, _store, builder) = skewed_pipeline(&db, skew, probe.clone());
        let p = builder.build();
        let (_, body) = event_body(skew, 0);
        let header = sign(&body, app.now().unix_timestamp());
        let out = p.handle(body.as_bytes(), Some(&header)).await;
        assert!(matches!(out, Ok(Outcome::Processed { .. })), "{out:?}");
        let seen = probe.seen.lock().unwrap().clone();
        let secs = std::time::Duration::from_secs;
        assert_eq!(
            seen,
            vec![(true, secs(60)), (true, secs(1)), (false, secs(0))],
            "skew {skew} s"
        );
    }
}

/// Whether an executable named `name` is on the `PATH`.
#[cfg(feature = "postgres")]
fn on_path(name: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(name).is_file()))
}

/// The production case: this test binary runs [`faketime_child`] under
/// `faketime` with the application's clocks 10 minutes ahead, 10 minutes
/// behind and 90 s ahead of PostgreSQL's (which `faketime` does not touch:
/// the server is another process).
#[cfg(feature = "postgres")]
#[test]
fn faketime_process_against_postgres_processes_each_event_once() {
    if !on_path("faketime") {
        let in_ci = std::env::var_os("CI").is_some_and(|v| !v.is_empty() && v != "false");
        assert!(
            !in_ci,
            "faketime is not installed: CI must run the clock-skew check (apt-get install faketime)"
        );
        eprintln!(
            "SKIPPED faketime_process_against_postgres_processes_each_event_once: \
             faketime is not installed (apt-get install faketime); CI runs it"
        );
        return;
    }
    let exe = std::env::current_exe().expect("the test binary");
    for (offset, seconds) in [("+600s", 600), ("-600s", -600), ("+90s", 90)] {
        let out = std::process::Command::new("faketime")
            .arg("-f")
            .arg(offset)
            .arg(&exe)
            .args([
                "--ignored",
                "--exact",
                "faketime_child",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("SWG_EXPECTED_SKEW", seconds.to_string())
            .env("DATABASE_URL", sql_support::pg::database_url())
            .output()
            .expect("run faketime");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && stdout.contains("1 passed"),
            "faketime {offset}: {}\n{stdout}\n{stderr}",
            out.status
        );
        println!("faketime {offset}: every event processed once against PostgreSQL");
    }
}

/// Run by [`faketime_process_against_postgres_processes_each_event_once`]
/// under `faketime`: checks that the process's clock is off PostgreSQL's by
/// `SWG_EXPECTED_SKEW` seconds, then processes events in synchronous and in
/// inbox mode on the system clock against a fresh schema.
#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run under faketime by faketime_process_against_postgres_processes_each_event_once"]
async fn faketime_child() {
    use sqlx::Row;
    use stripe_webhook_guard::clock::SystemClock;
    use stripe_webhook_guard::store::PgStore;

    let expected: i64 = std::env::var("SWG_EXPECTED_SKEW")
        .expect("SWG_EXPECTED_SKEW")
        .parse()
        .expect("seconds");
    let (schema, admin, _guard) = sql_support::pg::fresh_schema().await;
    let db_now: f64 =
        sqlx::query("SELECT CAST(extract(epoch FROM clock_timestamp()) AS float8) AS t")
            .fetch_one(&admin)
            .await
            .expect("the database's clock")
            .get("t");
    #[allow(clippy::cast_precision_loss)]
    let skew = OffsetDateTime::now_utc().unix_timestamp() as f64 - db_now;
    #[allow(clippy::cast_precision_loss)]
    let off = (skew - expected as f64).abs();
    assert!(
        off < 30.0,
        "the process is {skew:.0} s off the database, not {expected} s"
    );

    let store = Arc::new(PgStore::with_schema(admin.clone(), &schema).expect("schema"));
    let now = || OffsetDateTime::now_utc().unix_timestamp();

    // Synchronous mode.
    let handler = CountingHandler::new();
    let p = WebhookProcessor::builder(Verifier::new(secret()))
        .store(store.clone())
        .handler(handler.clone())
        .clock(Arc::new(SystemClock))
        .build();
    for i in 0..EVENTS {
        let id = format!("evt_ft_sync_{i}");
        let body = sub_event(
            &id,
            "customer.subscription.updated",
            now(),
            &format!("sub_fts_{i}"),
            "active",
        );
        let header = sign(&body, now());
        let first = p.handle(body.as_bytes(), Some(&header)).await;
        assert!(
            matches!(first, Ok(Outcome::Processed { handled: true, .. })),
            "{id}: {first:?}"
        );
        let again = p.handle(body.as_bytes(), Some(&header)).await;
        assert!(
            matches!(again, Ok(Outcome::Duplicate { .. })),
            "{id}: {again:?}"
        );
        assert_eq!(handler.effects_of(&id), 1, "{id}");
    }

    // Inbox mode: one event fails once; its retry time is on the
    // database's clock.
    let handler = CountingHandler::new();
    let inbox = WebhookProcessor::builder(Verifier::new(secret()))
        .store(store.clone())
        .handler(handler.clone())
        .clock(Arc::new(SystemClock))
        .build_inbox(InboxConfig {
            base_backoff: Duration::seconds(2),
            max_backoff: Duration::seconds(4),
            idle_sleep: Duration::milliseconds(50),
            ..InboxConfig::default()
        });
    let worker = inbox.worker();
    let ids: Vec<String> = (0..EVENTS).map(|i| format!("evt_ft_inbox_{i}")).collect();
    handler.fail_first.lock().unwrap().insert(ids[0].clone(), 1);
    let deliver = |id: &String| {
        let body = sub_event(
            id,
            "customer.subscription.updated",
            now(),
            &format!("sub_{id}"),
            "active",
        );
        let header = sign(&body, now());
        (body, header)
    };
    let (body, header) = deliver(&ids[0]);
    let queued = inbox.receive(body.as_bytes(), Some(&header)).await;
    assert!(matches!(queued, Ok(Outcome::Queued { .. })), "{queued:?}");
    let round = worker.run_once().await.expect("round");
    assert_eq!(
        (round.taken, round.retried),
        (1, 1),
        "taken at once: {round:?}"
    );
    let entry = store
        .get(&EventKey::new(&ids[0], None))
        .await
        .unwrap()
        .unwrap();
    let db_now: OffsetDateTime = sqlx::query("SELECT clock_timestamp() AS t")
        .fetch_one(&admin)
        .await
        .expect("the database's clock")
        .get("t");
    let due_in = entry.available_at.expect("retry time") - db_now;
    assert!(
        due_in > Duration::ZERO && due_in <= Duration::seconds(4),
        "retry due in {due_in} on the database's clock"
    );
    for id in &ids[1..] {
        let (body, header) = deliver(id);
        for _ in 0..2 {
            let answer = inbox.receive(body.as_bytes(), Some(&header)).await;
            assert!(
                matches!(
                    answer,
                    Ok(Outcome::Queued { .. } | Outcome::Duplicate { .. })
                ),
                "{id}: {answer:?}"
            );
        }
    }
    let started = Instant::now();
    while inbox.backlog().await.expect("backlog") > 0 {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(30),
            "inbox not drained in 30 s"
        );
        worker.run_until_idle().await.expect("worker");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    for id in &ids {
        assert_eq!(handler.effects_of(id), 1, "{id}");
    }
    assert_eq!(
        handler.calls.load(std::sync::atomic::Ordering::SeqCst) as usize,
        EVENTS + 1
    );
    let _ = store.backlog().await;
}
