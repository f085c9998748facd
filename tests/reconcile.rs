//! Reconciliation: outages of 1 hour, 4 days and 31 days; catch-up racing
//! live webhooks; rate limits; notifications.
#![cfg(feature = "test-util")]

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use common::world::World;
use stripe_webhook_guard::access::{Access, AccessPolicy};
use stripe_webhook_guard::client::fake::{Card, FakeConfig, FakeStripe, ShapeMix, Subscribe};
use stripe_webhook_guard::clock::{Clock, ManualClock};
use stripe_webhook_guard::processor::WebhookProcessor;
use stripe_webhook_guard::reconcile::{
    BudgetConfig, Change, ChangeKind, Notifier, ReconcileConfig, Reconciler, SweepScope,
};
use stripe_webhook_guard::signature::Verifier;
use stripe_webhook_guard::sim::SimConfig;
use stripe_webhook_guard::store::{MemoryStore, SubscriptionStore};
use time::Duration;

#[derive(Default)]
struct Collect(Mutex<Vec<Change>>);

#[async_trait]
impl Notifier for Collect {
    async fn notify(&self, change: &Change) {
        self.0.lock().unwrap().push(change.clone());
    }
}

fn reconciler(w: &World, notifier: Option<Arc<Collect>>) -> Reconciler {
    let mut r = Reconciler::new(w.sim.processor().clone(), w.store.clone(), w.fake.clone())
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
    let mut sim = stripe_webhook_guard::sim::Simulator::new(
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
    let r =
        Reconciler::new(processor.clone(), store.clone(), fake.clone()).config(ReconcileConfig {
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
    let r = Reconciler::new(w.sim.processor().clone(), w.store.clone(), w.fake.clone())
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
    let r = Reconciler::new(p.clone(), store.clone(), fake);
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
