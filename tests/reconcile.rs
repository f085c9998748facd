//! Reconciliation: outages of 1 hour, 4 days and 31 days; catch-up racing
//! live webhooks; rate limits; notifications.
#![cfg(feature = "test-util")]

mod common;

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use common::split::RecordOp;
use common::world::World;
use stripe_webhook_guard::access::{Access, AccessPolicy};
use stripe_webhook_guard::client::{
    BudgetConfig, ClientError, ClientErrorKind, Page, RequestBudget, Response, StripeClient,
    StubClient, StubMethod,
};
use stripe_webhook_guard::clock::{BoxFuture, Clock, ManualClock};
use stripe_webhook_guard::event::{Event, SubscriptionStatus, SubscriptionView};
use stripe_webhook_guard::processor::WebhookProcessor;
use stripe_webhook_guard::reconcile::{
    Change, ChangeKind, EVENTS_CURSOR, Notifier, ReconcileConfig, ReconcileError, Reconciler,
    SweepScope,
};
use stripe_webhook_guard::signature::Verifier;
use stripe_webhook_guard::store::{CursorStore, MemoryStore, SubscriptionStore};
use stripe_webhook_guard::subscription::{SubscriptionRecord, from_stripe};
use stripe_webhook_guard::testing::{Card, FakeConfig, FakeStripe, ShapeMix, SimConfig, Subscribe};
use time::{Duration, OffsetDateTime};

#[derive(Default)]
struct Collect(Mutex<Vec<Change>>);

#[async_trait]
impl Notifier for Collect {
    async fn notify(&self, change: &Change) {
        self.0.lock().unwrap().push(change.clone());
    }
}

fn reconciler(w: &World, notifier: Option<Arc<Collect>>) -> Reconciler {
    let mut r = Reconciler::new(w.sim.processor().clone(), w.fake.clone())
        .with_budget(BudgetConfig::default())
        .config(ReconcileConfig {
            lookback: Duration::days(30),
            ..ReconcileConfig::default()
        });
    if let Some(n) = notifier {
        r = r.notifier(n);
    }
    r
}

/// Every event, in order, to a fresh processor with the client: the access
/// decisions an endpoint that never went down would make.
async fn control_decisions(fake: &Arc<FakeStripe>, clock: &ManualClock) -> HashMap<String, Access> {
    let store = Arc::new(MemoryStore::with_clock(Arc::new(clock.clone())));
    let p = WebhookProcessor::builder(Verifier::new(common::secret()))
        .store(store.clone())
        .client(fake.clone())
        .clock(Arc::new(clock.clone()))
        .build();
    for fe in fake.all_events() {
        p.process_event(&fe.event).await.unwrap();
    }
    let policy = AccessPolicy::default();
    store
        .all_subscriptions()
        .into_iter()
        .map(|r| (r.id.clone(), policy.decide(&r, clock.now()).access))
        .collect()
}

/// A month of varied customers with the endpoint down for `outage`.
async fn outage_world(outage: Duration, seed: u64) -> World {
    let mut w = World::new(
        FakeConfig {
            seed,
            shapes: ShapeMix::Mixed,
            retry_delays: vec![Duration::days(2), Duration::days(2)],
            ..FakeConfig::default()
        },
        SimConfig {
            seed,
            ..SimConfig::default()
        },
        true,
    );
    let f = w.fake.clone();
    let mut subs = Vec::new();
    for i in 0..12u32 {
        let c = f.create_customer();
        let trial = (i % 4 == 1).then_some(10);
        subs.push((
            c.clone(),
            f.subscribe(
                &c,
                &Subscribe {
                    trial_days: trial,
                    ..Subscribe::default()
                },
            ),
        ));
        w.sim.advance(Duration::hours(7)).await;
    }
    w.sim.advance(Duration::days(5)).await;
    let start = w.clock.now().unix_timestamp();
    w.sim.endpoint_down(start, start + outage.whole_seconds());
    // Things happen while nobody listens.
    f.set_card(&subs[2].0, Card::Declines);
    f.set_card(&subs[3].0, Card::Declines);
    f.cancel_at_period_end(&subs[4].1, true);
    f.pause(&subs[5].1);
    f.cancel_now(&subs[6].1);
    w.sim.advance(outage / 2).await;
    f.pay_open_invoice(&subs[2].1);
    f.set_card(&subs[2].0, Card::Works);
    f.resume(&subs[5].1);
    w.sim.advance(outage / 2 + Duration::minutes(1)).await;
    w.sim.flush().await;
    w
}

async fn outage_then_reconcile(outage: Duration) {
    for seed in [11, 12] {
        let w = outage_world(outage, seed).await;
        let before = w.mismatches().len();
        let r = reconciler(&w, None);
        let report = r.run(SweepScope::All).await.unwrap();
        let m = w.mismatches();
        assert!(
            m.is_empty(),
            "outage {outage}, seed {seed}: {before} mismatches before, after: {m:#?}"
        );
        // Access matches an endpoint that never went down.
        let control = control_decisions(&w.fake, &w.clock).await;
        let policy = AccessPolicy::default();
        for rec in w.store.all_subscriptions() {
            let got = policy.decide(&rec, w.clock.now()).access;
            assert_eq!(Some(&got), control.get(&rec.id), "{} access", rec.id);
        }
        // A second run writes nothing and reports nothing.
        let again = r.run(SweepScope::All).await.unwrap();
        assert_eq!(again.writes, 0, "{again:#?}");
        assert!(again.changes.is_empty(), "{:#?}", again.changes);
        assert_eq!(again.events_processed, 0);
        println!(
            "outage {outage}: {before} records wrong before; catch-up processed {} events ({} duplicates), sweep checked {}, {} changes, {} requests",
            report.events_processed,
            report.events_duplicate,
            report.subscriptions_checked,
            report.changes.len(),
            report.requests
        );
    }
}

#[tokio::test]
async fn outage_of_one_hour() {
    outage_then_reconcile(Duration::hours(1)).await;
}

#[tokio::test]
async fn outage_of_four_days() {
    outage_then_reconcile(Duration::days(4)).await;
}

#[tokio::test]
async fn outage_of_thirty_one_days() {
    outage_then_reconcile(Duration::days(31)).await;
}

#[tokio::test]
async fn catch_up_alone_recovers_a_four_day_outage() {
    let w = outage_world(Duration::days(4), 3).await;
    assert!(!w.mismatches().is_empty(), "the outage lost events");
    let report = reconciler(&w, None).catch_up().await.unwrap();
    assert!(report.events_processed > 0);
    assert!(w.mismatches().is_empty(), "{:#?}", w.mismatches());
}

#[tokio::test]
async fn dry_run_reports_without_writing() {
    let w = outage_world(Duration::days(4), 5).await;
    let before = w.store.all_subscriptions();
    let r = reconciler(&w, None).config(ReconcileConfig {
        dry_run: true,
        lookback: Duration::days(30),
        ..ReconcileConfig::default()
    });
    let report = r.run(SweepScope::All).await.unwrap();
    assert!(report.dry_run);
    assert!(!report.events_missing.is_empty());
    assert!(!report.changes.is_empty());
    assert_eq!(report.writes, 0);
    assert_eq!(w.store.all_subscriptions(), before, "nothing written");
}

/// Catch-up and live webhooks for the same subscriptions at once: no
/// regression, each event's application effect once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catch_up_racing_live_webhooks() {
    let clock = ManualClock::at_unix(common::world::START);
    let fake = Arc::new(FakeStripe::new(
        clock.clone(),
        FakeConfig {
            seed: 9,
            shapes: ShapeMix::Mixed,
            ..FakeConfig::default()
        },
    ));
    let store = Arc::new(MemoryStore::with_clock(Arc::new(clock.clone())));
    let handler = common::CountingHandler::new();
    let processor = WebhookProcessor::builder(Verifier::new(common::secret()))
        .store(store.clone())
        .client(fake.clone())
        .handler(handler.clone())
        .clock(Arc::new(clock.clone()))
        .build();
    let mut sim = stripe_webhook_guard::testing::Simulator::new(
        processor.clone(),
        fake.clone(),
        common::secret(),
        SimConfig {
            seed: 9,
            max_delay: Duration::hours(2),
            ..SimConfig::default()
        },
    );
    for _ in 0..20 {
        let c = fake.create_customer();
        fake.subscribe(&c, &Subscribe::default());
    }
    fake.advance(Duration::days(40));
    sim.collect();
    let r = Reconciler::new(processor.clone(), fake.clone()).config(ReconcileConfig {
        lookback: Duration::days(30),
        ..ReconcileConfig::default()
    });
    let ((), report) = tokio::join!(sim.flush(), r.catch_up());
    let report = report.unwrap();
    sim.flush().await;
    let events = fake.all_events();
    for fe in &events {
        if fe.event.created() >= clock.now().unix_timestamp() - 30 * 86_400 {
            assert_eq!(
                handler.effects_of(fe.event.id()),
                1,
                "{} handled once",
                fe.event.id()
            );
        }
    }
    assert!(handler.effects.lock().unwrap().values().all(|&n| n == 1));
    let w_mismatch: Vec<_> = fake
        .truths()
        .into_iter()
        .filter(|t| {
            let rec = store
                .all_subscriptions()
                .into_iter()
                .find(|r| Some(&r.id) == t.id.as_ref());
            !rec.is_some_and(|r| {
                r.matches(&stripe_webhook_guard::subscription::SubscriptionState::from_view(t))
            })
        })
        .collect();
    assert!(w_mismatch.is_empty(), "no regression: {w_mismatch:#?}");
    println!(
        "catch-up processed {} and skipped {} duplicates while webhooks arrived",
        report.events_processed, report.events_duplicate
    );
}

/// 429s on every other call: the runs still converge, at the budget's pace.
#[tokio::test]
async fn rate_limits_are_absorbed_within_the_budget() {
    let w = outage_world(Duration::days(4), 21).await;
    w.fake.rate_limit_every(2);
    let budget = BudgetConfig {
        requests_per_second: 5,
        max_in_flight: 2,
        ..BudgetConfig::default()
    };
    let r = Reconciler::new(w.sim.processor().clone(), w.fake.clone())
        .with_budget(budget)
        .config(ReconcileConfig {
            lookback: Duration::days(30),
            ..ReconcileConfig::default()
        });
    let mut report = r.run(SweepScope::All).await.unwrap();
    assert!(w.mismatches().is_empty(), "{:#?}", w.mismatches());
    // One retrieve per subscription: enough calls to be rate-limited often.
    let swept = r.sweep(SweepScope::StaleFor(Duration::ZERO)).await.unwrap();
    assert!(swept.changes.is_empty());
    report.rate_limited += swept.rate_limited;
    report.requests += swept.requests;
    assert!(
        report.rate_limited > 0,
        "the fake did rate-limit: {report:#?}"
    );
    assert!(w.mismatches().is_empty());
    let b = r.budget().unwrap();
    assert!(
        b.peak_per_second() <= 5,
        "peak {} per second",
        b.peak_per_second()
    );
    println!(
        "{} requests, {} answered 429, peak {}/s",
        report.requests,
        report.rate_limited,
        b.peak_per_second()
    );
}

/// One customer pays while the endpoint is down, another's payment fails:
/// exactly one AccessRestored and one AccessRevoked.
#[tokio::test]
async fn notifier_hears_about_restored_and_revoked_access() {
    let mut w = World::new(
        FakeConfig {
            seed: 31,
            retry_delays: vec![Duration::hours(12)],
            ..FakeConfig::default()
        },
        SimConfig::default(),
        true,
    );
    let f = w.fake.clone();
    let payer = f.create_customer();
    let lapser = f.create_customer();
    let bystander = f.create_customer();
    // Day 0: the payer subscribes; their card starts declining.
    let s_payer = f.subscribe(&payer, &Subscribe::default());
    f.set_card(&payer, Card::Declines);
    w.sim.advance(Duration::days(2)).await;
    // Day 2: the lapser and a bystander subscribe.
    let s_lapser = f.subscribe(&lapser, &Subscribe::default());
    f.subscribe(&bystander, &Subscribe::default());
    // Day 30: the payer's renewal fails; after the one retry, unpaid.
    w.sim.advance(Duration::days(29)).await;
    assert_eq!(f.truth(&s_payer).unwrap().status.as_str(), "unpaid");
    let policy = AccessPolicy::default();
    let denied = |w: &World, id: &str| {
        let rec = w
            .store
            .all_subscriptions()
            .into_iter()
            .find(|r| r.id == id)
            .unwrap();
        policy.decide(&rec, w.clock.now()).access
    };
    assert_eq!(denied(&w, &s_payer), Access::Denied);
    // Day 31, down for 3 days: the payer pays; the lapser's renewal (day 32)
    // fails for good.
    let start = w.clock.now().unix_timestamp();
    w.sim.endpoint_down(start, start + 3 * 86_400);
    f.set_card(&lapser, Card::Declines);
    f.pay_open_invoice(&s_payer);
    w.sim.advance(Duration::days(3)).await;
    assert_eq!(f.truth(&s_lapser).unwrap().status.as_str(), "unpaid");
    assert_eq!(
        denied(&w, &s_lapser),
        Access::Grace,
        "before reconciling, the lapser gets the benefit of the doubt"
    );
    let notes = Arc::new(Collect::default());
    let r = reconciler(&w, Some(notes.clone()));
    r.run(SweepScope::All).await.unwrap();
    let changes = notes.0.lock().unwrap().clone();
    let restored: Vec<_> = changes
        .iter()
        .filter(|c| c.kind == ChangeKind::AccessRestored)
        .collect();
    let revoked: Vec<_> = changes
        .iter()
        .filter(|c| c.kind == ChangeKind::AccessRevoked)
        .collect();
    assert_eq!(restored.len(), 1, "{changes:#?}");
    assert_eq!(restored[0].customer.as_deref(), Some(payer.as_str()));
    assert_eq!(revoked.len(), 1, "{changes:#?}");
    assert_eq!(revoked[0].customer.as_deref(), Some(lapser.as_str()));
    // Nothing more on a second run.
    r.run(SweepScope::All).await.unwrap();
    assert_eq!(notes.0.lock().unwrap().len(), changes.len());
    let _ = w.store.load(&s_lapser).await;
}

#[tokio::test]
async fn refresh_customer_at_login() {
    let w = outage_world(Duration::days(4), 41).await;
    let r = reconciler(&w, None);
    // Pick a customer whose record is wrong; refresh only them.
    let wrong = w.mismatches();
    assert!(!wrong.is_empty());
    let customer = wrong[0].2.customer.clone().unwrap();
    let report = r.refresh_customer(&customer).await.unwrap();
    assert!(
        report.requests <= 2,
        "one list request (plus a retry at most)"
    );
    assert!(
        w.mismatches()
            .iter()
            .all(|(_, _, s)| s.customer.as_deref() != Some(customer.as_str()))
    );
}

#[tokio::test]
async fn dead_letters_are_replayed_after_a_fix() {
    use stripe_webhook_guard::ledger::{EventKey, LedgerState};
    use stripe_webhook_guard::store::EventLedger;
    let clock = ManualClock::at_unix(common::world::START);
    let store = Arc::new(MemoryStore::with_clock(Arc::new(clock.clone())));
    let handler = common::CountingHandler::new();
    handler
        .always_fail
        .lock()
        .unwrap()
        .push("evt_replay".into());
    let p = WebhookProcessor::builder(Verifier::new(common::secret()))
        .store(store.clone())
        .handler(handler.clone())
        .clock(Arc::new(clock.clone()))
        .max_attempts(2)
        .build();
    let body = common::sub_event(
        "evt_replay",
        "customer.subscription.updated",
        common::world::START,
        "sub_r",
        "active",
    );
    for _ in 0..2 {
        let _ = p
            .handle(
                body.as_bytes(),
                Some(&common::sign(&body, common::world::START)),
            )
            .await;
    }
    assert_eq!(
        store
            .get(&EventKey::new("evt_replay", None))
            .await
            .unwrap()
            .unwrap()
            .state,
        LedgerState::Dead
    );
    // The bug is fixed.
    handler.always_fail.lock().unwrap().clear();
    let fake = Arc::new(FakeStripe::new(clock.clone(), FakeConfig::default()));
    let r = Reconciler::new(p.clone(), fake);
    let replayed = r.replay_dead_letters().await.unwrap();
    assert_eq!(replayed.len(), 1);
    assert!(replayed[0].1.is_ok(), "{:?}", replayed[0].1);
    assert_eq!(handler.effects_of("evt_replay"), 1);
    assert_eq!(
        store
            .get(&EventKey::new("evt_replay", None))
            .await
            .unwrap()
            .unwrap()
            .state,
        LedgerState::Processed
    );
    assert!(r.replay_dead_letters().await.unwrap().is_empty());
}

// ---------------------------------------------------------------------------
// Review fixes: budget permits, notifications on errors, Discovered, fetch
// times, permanent catch-up failures, Connect records, stale-sweep paging.
// ---------------------------------------------------------------------------

/// The system clock with tokio's timer (the crate's own uses a thread per
/// sleep without the `tokio` feature).
#[derive(Debug)]
struct TokioClock;

impl Clock for TokioClock {
    fn now(&self) -> OffsetDateTime {
        OffsetDateTime::now_utc()
    }

    fn sleep(&self, duration: Duration) -> BoxFuture<'_, ()> {
        Box::pin(tokio::time::sleep(
            std::time::Duration::try_from(duration).unwrap_or_default(),
        ))
    }
}

/// `sub_hang` never answers, `sub_panic` panics, anything else answers once
/// `barrier`'s party is complete (so the calls must be in flight together).
fn stalls(party: usize) -> StubClient {
    let barrier = Arc::new(tokio::sync::Barrier::new(party));
    StubClient::new().on_retrieve_subscription(move |_, id| {
        let barrier = barrier.clone();
        async move {
            match id.as_str() {
                "sub_hang" => std::future::pending().await,
                "sub_panic" => panic!("client bug"),
                _ => {
                    barrier.wait().await;
                    Ok(Response::new(
                        SubscriptionView::from_json(&format!(
                            r#"{{"id":"{id}","object":"subscription","status":"active"}}"#
                        ))
                        .unwrap(),
                    ))
                }
            }
        }
    })
}

/// Cancelled (timed out, including while queued for a permit) and panicking
/// calls give their in-flight permits back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_and_panicking_calls_do_not_shrink_the_budget() {
    let in_flight = 2;
    let budget = Arc::new(RequestBudget::new(
        Arc::new(stalls(in_flight)),
        Arc::new(TokioClock),
        BudgetConfig {
            requests_per_second: 1000,
            max_in_flight: in_flight,
            ..BudgetConfig::default()
        },
    ));
    let short = std::time::Duration::from_millis(30);
    for _ in 0..3 {
        // Two calls hold the permits and one waits for a permit; all three
        // are dropped by the timeout.
        let hung = tokio::time::timeout(short, async {
            tokio::join!(
                budget.retrieve_subscription(None, "sub_hang"),
                budget.retrieve_subscription(None, "sub_hang"),
                budget.retrieve_subscription(None, "sub_hang"),
            )
        })
        .await;
        assert!(hung.is_err(), "the calls never answer");
    }
    for _ in 0..in_flight {
        let b = budget.clone();
        let panicked = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            tokio::spawn(async move { b.retrieve_subscription(None, "sub_panic").await }),
        )
        .await
        .expect("the cancelled calls gave their permits back");
        assert!(panicked.unwrap_err().is_panic());
    }
    // Both permits are free: two calls can be in flight together.
    let answered = tokio::time::timeout(std::time::Duration::from_secs(5), async {
        tokio::join!(
            budget.retrieve_subscription(None, "sub_1"),
            budget.retrieve_subscription(None, "sub_2"),
        )
    })
    .await
    .expect("the budget still has its capacity");
    assert!(answered.0.is_ok() && answered.1.is_ok());
    // Only calls holding a permit were issued (not the queued ones).
    assert_eq!(budget.requests(), 3 * 2 + 2 + 2);
}

/// A client around another that records calls, can fail the n-th call of a
/// kind, and can move a manual clock on each call (a slow, paced API).
fn probe(
    inner: Arc<dyn StripeClient>,
    fail_at: Option<(StubMethod, usize)>,
    advance: Option<(ManualClock, Duration)>,
) -> StubClient {
    StubClient::over(inner).before_each(move |call| {
        if let Some((clock, by)) = &advance {
            clock.advance(*by);
        }
        if fail_at == Some((call.method, call.nth)) {
            return Err(ClientError::new(
                ClientErrorKind::Unauthorized,
                "injected failure",
            ));
        }
        Ok(())
    })
}

fn access_snapshot(w: &World) -> HashMap<String, (SubscriptionStatus, Access)> {
    let policy = AccessPolicy::default();
    w.store
        .all_subscriptions()
        .into_iter()
        .map(|r| {
            let access = policy.decide(&r, w.clock.now()).access;
            (r.id.clone(), (r.state.status.clone(), access))
        })
        .collect()
}

/// Every record whose status or access changed was notified, and every
/// notification describes what is stored now.
fn assert_saved_changes_notified(
    before: &HashMap<String, (SubscriptionStatus, Access)>,
    after: &HashMap<String, (SubscriptionStatus, Access)>,
    notes: &[Change],
) {
    let changed: Vec<&String> = after
        .iter()
        .filter(|(id, now)| before.get(*id) != Some(*now))
        .map(|(id, _)| id)
        .collect();
    assert!(!changed.is_empty(), "the run changed something first");
    for id in changed {
        assert!(
            notes.iter().any(|c| &c.subscription_id == id),
            "{id} changed ({:?} -> {:?}) but was not notified: {notes:#?}",
            before.get(id),
            after[id]
        );
    }
    for c in notes {
        let now = &after[&c.subscription_id];
        assert_eq!((&c.after_status, c.after_access), (&now.0, now.1), "{c:#?}");
    }
}

/// A sweep whose API fails part-way notifies the repairs it saved before.
#[tokio::test]
async fn a_sweep_failing_part_way_notifies_what_it_saved() {
    let w = outage_world(Duration::days(4), 51).await;
    let n = w.store.all_subscriptions().len();
    assert!(n >= 10, "{n} records");
    let before = access_snapshot(&w);
    let probe = probe(
        w.fake.clone(),
        Some((StubMethod::RetrieveSubscription, n - 1)),
        None,
    );
    let notes = Arc::new(Collect::default());
    let r = Reconciler::new(w.sim.processor().clone(), Arc::new(probe)).notifier(notes.clone());
    let result = r.sweep(SweepScope::StaleFor(Duration::ZERO)).await;
    assert!(
        matches!(result, Err(ReconcileError::Client(_))),
        "{result:?}"
    );
    let notes = notes.0.lock().unwrap().clone();
    assert_saved_changes_notified(&before, &access_snapshot(&w), &notes);
}

/// Catch-up processed events (and saved their effects) but failed to save
/// its cursor: the changes are still notified before the error.
#[tokio::test]
async fn a_catch_up_failing_at_the_end_notifies_what_it_saved() {
    let w = outage_world(Duration::days(4), 52).await;
    let before = access_snapshot(&w);
    let notes = Arc::new(Collect::default());
    // The same store, except that cursor saves fail.
    let failing = Arc::new(common::split::Split {
        ledger: w.store.clone(),
        records: w.store.clone(),
        fail_cursor_saves: true,
    });
    let processor = WebhookProcessor::builder(Verifier::new(common::secret()))
        .store(failing)
        .clock(Arc::new(w.clock.clone()))
        .client(w.fake.clone())
        .build();
    let r = Reconciler::new(processor, w.fake.clone())
        .config(ReconcileConfig {
            lookback: Duration::days(30),
            ..ReconcileConfig::default()
        })
        .notifier(notes.clone());
    let result = r.catch_up().await;
    assert!(
        matches!(result, Err(ReconcileError::Store(_))),
        "{result:?}"
    );
    let notes = notes.0.lock().unwrap().clone();
    assert_saved_changes_notified(&before, &access_snapshot(&w), &notes);
}

/// Subscriptions we never heard of are Discovered, not "restored", both by
/// the sweep and by catch-up.
#[tokio::test]
async fn records_unknown_locally_are_discovered_not_restored() {
    let clock = ManualClock::at_unix(common::world::START);
    let fake = Arc::new(FakeStripe::new(clock.clone(), FakeConfig::default()));
    for _ in 0..3 {
        let c = fake.create_customer();
        fake.subscribe(&c, &Subscribe::default());
    }
    fake.advance(Duration::days(1));
    for sweep in [true, false] {
        let store = Arc::new(MemoryStore::with_clock(Arc::new(clock.clone())));
        let p = WebhookProcessor::builder(Verifier::new(common::secret()))
            .store(store.clone())
            .client(fake.clone())
            .clock(Arc::new(clock.clone()))
            .build();
        let notes = Arc::new(Collect::default());
        let r = Reconciler::new(p, fake.clone())
            .config(ReconcileConfig {
                lookback: Duration::days(30),
                ..ReconcileConfig::default()
            })
            .notifier(notes.clone());
        let report = if sweep {
            r.sweep(SweepScope::All).await.unwrap()
        } else {
            r.catch_up().await.unwrap()
        };
        let notes = notes.0.lock().unwrap().clone();
        assert_eq!(notes, report.changes);
        assert_eq!(notes.len(), 3, "sweep {sweep}: {notes:#?}");
        for c in &notes {
            assert_eq!(c.kind, ChangeKind::Discovered, "sweep {sweep}: {c:#?}");
            assert_eq!((c.before_status.as_ref(), c.before_access), (None, None));
            assert_eq!(c.after_access, Access::Granted);
        }
    }
}

/// Each object is planned at the time it arrived, not when the sweep
/// started: the verification stamps say when Stripe was asked.
#[tokio::test]
async fn sweeps_stamp_each_object_with_its_fetch_time() {
    let step = Duration::minutes(10);
    for scope in [SweepScope::All, SweepScope::StaleFor(Duration::ZERO)] {
        let w = outage_world(Duration::days(4), 53).await;
        let probe = Arc::new(probe(w.fake.clone(), None, Some((w.clock.clone(), step))));
        let r = Reconciler::new(w.sim.processor().clone(), probe.clone()).config(ReconcileConfig {
            reverify_after: Duration::ZERO,
            ..ReconcileConfig::default()
        });
        let start = w.clock.now();
        r.sweep(scope).await.unwrap();
        let stamps: BTreeSet<OffsetDateTime> = w
            .store
            .all_subscriptions()
            .iter()
            .filter_map(|r| r.last_verified_with_stripe)
            .filter(|v| *v >= start)
            .collect();
        let expected: BTreeSet<OffsetDateTime> = match scope {
            // One list page, answered one step later.
            SweepScope::All => [start + step].into(),
            // One retrieve each, a step apart.
            SweepScope::StaleFor(_) => {
                let n = probe.calls_of(StubMethod::RetrieveSubscription).len();
                assert!(n >= 5, "{n} retrieved");
                (1..=n)
                    .map(|k| start + step * u32::try_from(k).unwrap())
                    .collect()
            }
        };
        assert_eq!(stamps, expected, "{scope:?}");
    }
}

/// A client that lists a fixed set of events.
fn listing(listed: Vec<Event>) -> StubClient {
    StubClient::new().on_list_events(move |_, _| {
        std::future::ready(Ok(Response::new(Page {
            data: listed.clone(),
            has_more: false,
        })))
    })
}

/// A permanent failure (a payload conflict) is reported and lets the cursor
/// move; a retryable one still holds it back.
#[tokio::test]
async fn only_retryable_catch_up_failures_hold_the_cursor() {
    let t0 = common::world::START;
    let clock = ManualClock::at_unix(t0 + 86_400);
    let store = Arc::new(MemoryStore::with_clock(Arc::new(clock.clone())));
    let handler = common::CountingHandler::new();
    handler.always_fail.lock().unwrap().push("evt_retry".into());
    let p = WebhookProcessor::builder(Verifier::new(common::secret()))
        .store(store.clone())
        .handler(handler.clone())
        .clock(Arc::new(clock.clone()))
        .build();
    let event = |id: &str, ty: &str, created: i64, sub: &str| {
        let body = common::sub_event(id, ty, created, sub, "active");
        Event::parse_unverified(body.as_bytes()).unwrap()
    };
    let updated = "customer.subscription.updated";
    // evt_conflict arrived by webhook as a `created` event; Stripe's list
    // says it is an `updated` one: the same id with other content, refused
    // for good.
    p.process_event(&event(
        "evt_conflict",
        "customer.subscription.created",
        t0,
        "sub_a",
    ))
    .await
    .unwrap();
    let listed = vec![
        event("evt_ok", updated, t0 + 200, "sub_ok"),
        event("evt_retry", updated, t0 + 100, "sub_r"),
        event("evt_conflict", updated, t0, "sub_a"),
    ];
    let r = Reconciler::new(p.clone(), Arc::new(listing(listed.clone())));
    let report = r.catch_up().await.unwrap();
    assert_eq!(report.events_processed, 1);
    assert_eq!(report.events_failed, 2);
    assert_eq!(report.events_failed_permanently, vec!["evt_conflict"]);
    assert_eq!(report.cursor, Some(t0 + 100), "held by evt_retry only");
    // Once evt_retry goes through, the cursor moves to the run's start
    // although evt_conflict fails again.
    handler.always_fail.lock().unwrap().clear();
    let report = r.catch_up().await.unwrap();
    assert_eq!(report.events_failed_permanently, vec!["evt_conflict"]);
    assert_eq!(report.cursor, Some(clock.now().unix_timestamp()));
    assert_eq!(
        store.load_cursor(EVENTS_CURSOR).await.unwrap(),
        Some(clock.now().unix_timestamp().to_string())
    );
}

fn record_at(id: &str, status: &str, verified: OffsetDateTime) -> SubscriptionRecord {
    let end = verified.unix_timestamp() + 30 * 86_400;
    let view = SubscriptionView::from_json(&format!(
        r#"{{"id":"{id}","object":"subscription","customer":"cus_{id}","status":"{status}",
        "current_period_start":{},"current_period_end":{end}}}"#,
        verified.unix_timestamp()
    ))
    .unwrap();
    from_stripe(None, &view, verified, None).record
}

/// Records of Connect accounts the reconciler is not told to reconcile
/// (`ReconcileConfig::connected_accounts`) are neither retrieved nor
/// flagged as unknown to Stripe.
#[tokio::test]
async fn connect_records_are_left_alone() {
    let clock = ManualClock::at_unix(common::world::START);
    let fake = Arc::new(FakeStripe::new(clock.clone(), FakeConfig::default()));
    let store = Arc::new(MemoryStore::with_clock(Arc::new(clock.clone())));
    let mut record = record_at("sub_connect", "active", clock.now() - Duration::days(10));
    record.account = Some("acct_1".into());
    store.save(&record).await.unwrap();
    let saved = store.load("sub_connect").await.unwrap().unwrap();
    let p = WebhookProcessor::builder(Verifier::new(common::secret()))
        .store(store.clone())
        .clock(Arc::new(clock.clone()))
        .build();
    let probe = Arc::new(probe(fake.clone(), None, None));
    let r = Reconciler::new(p, probe.clone());
    let all = r.sweep(SweepScope::All).await.unwrap();
    let stale = r.sweep(SweepScope::StaleFor(Duration::ZERO)).await.unwrap();
    let refresh = r.refresh_customer("cus_sub_connect").await.unwrap();
    for report in [all, stale, refresh] {
        assert!(report.changes.is_empty(), "{report:#?}");
        assert_eq!(report.writes, 0);
    }
    assert!(
        probe.calls_of(StubMethod::RetrieveSubscription).is_empty(),
        "{:?}",
        probe.calls_of(StubMethod::RetrieveSubscription)
    );
    assert_eq!(store.load("sub_connect").await.unwrap().unwrap(), saved);
}

async fn paged_reconciler(
    clock: &ManualClock,
    records: &[SubscriptionRecord],
) -> (Reconciler, Arc<Mutex<Vec<usize>>>, Arc<StubClient>) {
    let store = Arc::new(MemoryStore::with_clock(Arc::new(clock.clone())));
    for r in records {
        store.save(r).await.unwrap();
    }
    // Records the page sizes asked of the subscription store.
    let limits = Arc::new(Mutex::new(Vec::new()));
    let asked = limits.clone();
    let paged = common::split::Hooked::new(store.clone(), move |op| {
        if let RecordOp::List(query) = op {
            asked.lock().unwrap().push(query.limit);
        }
        Ok(())
    });
    let p = WebhookProcessor::builder(Verifier::new(common::secret()))
        .store(common::split::Split::new(store.clone(), paged))
        .clock(Arc::new(clock.clone()))
        .build();
    let fake = Arc::new(FakeStripe::new(clock.clone(), FakeConfig::default()));
    let probe = Arc::new(probe(fake, None, None));
    let r = Reconciler::new(p, probe.clone());
    (r, limits, probe)
}

/// The stale sweep reads the store in pages, and covers every record.
#[tokio::test]
async fn the_stale_sweep_reads_the_store_in_pages() {
    let clock = ManualClock::at_unix(common::world::START);
    let old = clock.now() - Duration::days(10);
    let records: Vec<_> = (0..1_100)
        .map(|i| record_at(&format!("sub_{i:04}"), "active", old))
        .collect();
    let (r, paged, probe) = paged_reconciler(&clock, &records).await;
    r.sweep(SweepScope::StaleFor(Duration::hours(1)))
        .await
        .unwrap();
    let limits = paged.lock().unwrap().clone();
    assert!(limits.len() >= 3, "{limits:?}");
    assert!(limits.iter().all(|l| (1..=500).contains(l)), "{limits:?}");
    let retrieved: BTreeSet<String> = probe
        .calls_of(StubMethod::RetrieveSubscription)
        .into_iter()
        .collect();
    assert_eq!(retrieved.len(), 1_100);
    assert_eq!(
        probe.calls_of(StubMethod::RetrieveSubscription).len(),
        1_100,
        "each once"
    );
}

/// Terminal records verified with Stripe cannot change and records under
/// review belong to a human: the stale sweep does not retrieve them.
#[tokio::test]
async fn the_stale_sweep_skips_settled_and_reviewed_records() {
    let clock = ManualClock::at_unix(common::world::START);
    let old = clock.now() - Duration::days(10);
    let settled = record_at("sub_a_settled", "canceled", old);
    let mut never_verified = record_at("sub_b_never_verified", "canceled", old);
    never_verified.last_verified_with_stripe = None;
    let mut reviewed = record_at("sub_c_reviewed", "active", old);
    reviewed.needs_review = true;
    let mut guessed = record_at("sub_d_guessed", "incomplete_expired", old);
    guessed.needs_reconcile = true;
    let stale = record_at("sub_e_stale", "active", old);
    let mut fresh_but_flagged = record_at("sub_f_flagged", "active", clock.now());
    fresh_but_flagged.needs_reconcile = true;
    let (r, _, probe) = paged_reconciler(
        &clock,
        &[
            settled,
            never_verified,
            reviewed,
            guessed,
            stale,
            fresh_but_flagged,
        ],
    )
    .await;
    r.sweep(SweepScope::StaleFor(Duration::hours(1)))
        .await
        .unwrap();
    assert_eq!(
        probe.calls_of(StubMethod::RetrieveSubscription),
        vec![
            "sub_b_never_verified",
            "sub_d_guessed",
            "sub_e_stale",
            "sub_f_flagged"
        ]
    );
}

/// A subscription a webhook creates while a full sweep is listing Stripe is
/// not in that listing; it must not be flagged "unknown to Stripe".
#[tokio::test]
async fn records_created_during_the_listing_are_not_flagged() {
    let clock = ManualClock::at_unix(common::world::START);
    let fake = Arc::new(FakeStripe::new(clock.clone(), FakeConfig::default()));
    let store = Arc::new(MemoryStore::with_clock(Arc::new(clock.clone())));
    let processor = WebhookProcessor::builder(Verifier::new(common::secret()))
        .store(store.clone())
        .clock(Arc::new(clock.clone()))
        .build();
    let c = fake.create_customer();
    fake.subscribe(&c, &Subscribe::default());
    for fe in fake.take_new_events() {
        processor.process_event(&fe.event).await.unwrap();
    }
    // The listing answers; meanwhile a new customer checks out and its
    // webhook lands.
    let (racing, p, at) = (fake.clone(), processor.clone(), clock.clone());
    let client = Arc::new(StubClient::over(fake.clone()).on_list_subscriptions(
        move |account, query| {
            let (fake, processor, clock) = (racing.clone(), p.clone(), at.clone());
            async move {
                let page = fake.list_subscriptions(account.as_deref(), &query).await;
                clock.advance(Duration::seconds(5));
                let c = fake.create_customer();
                fake.subscribe(&c, &Subscribe::default());
                for fe in fake.take_new_events() {
                    processor.process_event(&fe.event).await.unwrap();
                }
                page
            }
        },
    ));
    let report = Reconciler::new(processor, client)
        .sweep(SweepScope::All)
        .await
        .unwrap();
    assert!(
        report.changes_of(ChangeKind::NeedsReview).next().is_none(),
        "{:#?}",
        report.changes
    );
    assert_eq!(store.all_subscriptions().len(), 2);
    assert!(store.all_subscriptions().iter().all(|r| !r.needs_review));
}

/// Regression: an event of a type the application ignores was recorded as
/// ignored again and counted as processed every time catch-up listed it (a
/// second run with nothing new reported every such event as processed, and
/// the processor's counters counted it twice). Now an already-ignored event
/// is a duplicate: the second run reports 0 processed, and the counters say
/// exactly what was new.
#[tokio::test]
async fn a_second_catch_up_counts_ignored_events_as_duplicates() {
    let clock = ManualClock::at_unix(1_767_225_600);
    let store = Arc::new(MemoryStore::with_clock(Arc::new(clock.clone())));
    let processor = WebhookProcessor::builder(Verifier::new(common::secret()))
        .store(store)
        .clock(Arc::new(clock.clone()))
        .build();
    let created = clock.now().unix_timestamp() - 3600;
    let events: Vec<Event> = [
        "customer.updated",
        "invoice.created",
        "payment_intent.created",
    ]
    .iter()
    .enumerate()
    .map(|(i, ty)| {
        Event::parse_unverified(
            format!(
                r#"{{"id":"evt_ignored_{i}","object":"event","type":"{ty}","created":{created},
                    "livemode":false,"data":{{"object":{{"id":"obj_{i}"}}}}}}"#
            )
            .as_bytes(),
        )
        .unwrap()
    })
    .collect();
    let r = Reconciler::new(processor.clone(), Arc::new(listing(events)));
    let first = r.catch_up().await.unwrap();
    assert_eq!((first.events_seen, first.events_processed), (3, 3));
    assert_eq!(first.events_duplicate, 0);
    let second = r.catch_up().await.unwrap();
    assert_eq!(second.events_seen, 3);
    assert_eq!(second.events_processed, 0, "nothing new: {second:#?}");
    assert_eq!(second.events_duplicate, 3);
    let stats = processor.stats();
    assert_eq!(stats.ignored, 3, "each ignored event counted once");
    assert_eq!(stats.duplicates, 3);
}
