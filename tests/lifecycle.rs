//! Whole lifecycles through FakeStripe, the simulator and the processor.
#![cfg(feature = "test-util")]

mod common;

use common::world::World;
use stripe_webhook_guard::event::SubscriptionStatus as S;
use stripe_webhook_guard::testing::{
    AfterRetries, Card, FakeConfig, ShapeMix, SimConfig, Subscribe,
};
use time::Duration;

fn config(seed: u64) -> FakeConfig {
    FakeConfig {
        seed,
        shapes: ShapeMix::Mixed,
        ..FakeConfig::default()
    }
}

async fn three_months(with_client: bool, seed: u64) -> World {
    let mut w = World::new(
        config(seed),
        SimConfig {
            seed,
            max_delay: Duration::minutes(10),
            ..SimConfig::default()
        },
        with_client,
    );
    let f = w.fake.clone();
    let happy = f.create_customer();
    let trial = f.create_customer();
    let recovering = f.create_customer();
    let lapsing = f.create_customer();
    let leaving = f.create_customer();
    let pausing = f.create_customer();
    let s_happy = f.subscribe(&happy, &Subscribe::default());
    let s_trial = f.subscribe(
        &trial,
        &Subscribe {
            trial_days: Some(14),
            ..Subscribe::default()
        },
    );
    let s_recovering = f.subscribe(&recovering, &Subscribe::default());
    let s_lapsing = f.subscribe(&lapsing, &Subscribe::default());
    let s_leaving = f.subscribe(&leaving, &Subscribe::default());
    let s_pausing = f.subscribe(&pausing, &Subscribe::default());
    w.sim.advance(Duration::days(10)).await;
    f.set_card(&recovering, Card::Declines);
    f.set_card(&lapsing, Card::Declines);
    f.cancel_at_period_end(&s_leaving, true);
    f.pause(&s_pausing);
    w.sim.advance(Duration::days(22)).await; // renewals: two fail
    assert_eq!(f.truth(&s_recovering).unwrap().status, S::PastDue);
    f.pay_open_invoice(&s_recovering);
    f.resume(&s_pausing);
    w.sim.advance(Duration::days(60)).await;
    w.sim.flush().await;
    assert_eq!(f.truth(&s_happy).unwrap().status, S::Active);
    assert_eq!(f.truth(&s_trial).unwrap().status, S::Active);
    assert_eq!(f.truth(&s_recovering).unwrap().status, S::Active);
    assert_eq!(f.truth(&s_lapsing).unwrap().status, S::Unpaid);
    assert_eq!(f.truth(&s_leaving).unwrap().status, S::Canceled);
    assert_eq!(f.truth(&s_pausing).unwrap().status, S::Active);
    w
}

#[tokio::test]
async fn with_a_client_every_record_matches_stripe() {
    for seed in 1..=5 {
        let w = three_months(true, seed).await;
        let m = w.mismatches();
        assert!(m.is_empty(), "seed {seed}: {m:#?}");
    }
}

#[tokio::test]
async fn without_a_client_every_record_matches_the_newest_event() {
    for seed in 1..=5 {
        let w = three_months(false, seed).await;
        let m = w.mismatches();
        assert!(m.is_empty(), "seed {seed}: {m:#?}");
    }
}

#[tokio::test]
async fn cancel_after_retries_setting() {
    let mut w = World::new(
        FakeConfig {
            after_retries: AfterRetries::Cancel,
            ..config(3)
        },
        SimConfig::default(),
        true,
    );
    let c = w.fake.create_customer();
    let s = w.fake.subscribe(&c, &Subscribe::default());
    w.fake.set_card(&c, Card::Declines);
    w.sim.advance(Duration::days(50)).await;
    w.sim.flush().await;
    assert_eq!(w.fake.truth(&s).unwrap().status, S::Canceled);
    assert!(w.mismatches().is_empty());
}

/// With a client, an impossible transition is settled by Stripe's answer:
/// the anomaly stays on record, the review flag does not.
#[tokio::test]
async fn a_refetch_settles_an_impossible_transition() {
    use std::sync::Arc;
    use stripe_webhook_guard::clock::ManualClock;
    use stripe_webhook_guard::processor::WebhookProcessor;
    use stripe_webhook_guard::signature::{Verifier, test_header};
    use stripe_webhook_guard::store::{MemoryStore, SubscriptionStore};
    use stripe_webhook_guard::subscription::AnomalyKind;
    let clock = ManualClock::at_unix(common::world::START);
    let fake = Arc::new(stripe_webhook_guard::testing::FakeStripe::new(
        clock.clone(),
        config(5),
    ));
    let c = fake.create_customer();
    let sub = fake.subscribe(&c, &Subscribe::default());
    let store = Arc::new(MemoryStore::with_clock(Arc::new(clock.clone())));
    let p = WebhookProcessor::builder(Verifier::new(common::secret()))
        .store(store.clone())
        .client(fake.clone())
        .clock(Arc::new(clock.clone()))
        .build();
    for fe in fake.take_new_events() {
        p.process_event(&fe.event).await.unwrap();
    }
    // A forged-looking but signed event claims the active subscription went
    // back to incomplete: impossible.
    clock.advance(Duration::minutes(5));
    let t = common::world::START + 300;
    let body = common::sub_event(
        "evt_impossible",
        "customer.subscription.updated",
        t,
        &sub,
        "incomplete",
    )
    .replace(&format!("cus_{sub}"), &c);
    let header = test_header(
        &common::secret(),
        body.as_bytes(),
        stripe_webhook_guard::clock::Clock::now(&clock),
    );
    p.handle(body.as_bytes(), Some(&header)).await.unwrap();
    let r = store.load(&sub).await.unwrap().unwrap();
    assert_eq!(r.state.status, S::Active, "Stripe's truth");
    assert!(
        r.anomalies
            .iter()
            .any(|a| a.kind == AnomalyKind::ImpossibleTransition)
    );
    assert!(!r.needs_review);
}

/// An invoiced customer (`send_invoice`, due in 14 days) pays the first
/// invoice, then lets the renewal's invoice go overdue: Stripe turns the
/// subscription past due at the due date and sends no payment failure. The
/// grace counts from the due date (regression, issue 13 item 1: it counted
/// from the period's start, so the customer was denied at once), and paying
/// restores access.
#[tokio::test]
async fn invoiced_customer_keeps_grace_from_the_due_date() {
    use stripe_webhook_guard::access::{Access, AccessPolicy, AccessReason};
    use stripe_webhook_guard::testing::Collection;
    for with_client in [true, false] {
        let mut w = World::new(config(7), SimConfig::default(), with_client);
        let f = w.fake.clone();
        let customer = f.create_customer();
        let invoiced = Subscribe {
            collection: Collection::SendInvoice { days_until_due: 14 },
            ..Subscribe::default()
        };
        let sub = f.subscribe(&customer, &invoiced);
        w.sim.advance(Duration::days(5)).await;
        f.pay_open_invoice(&sub);
        // The renewal at day 30 sends an invoice due at day 44; unpaid.
        w.sim.advance(Duration::days(35)).await;
        assert_eq!(f.truth(&sub).unwrap().status, S::Active);
        w.sim.advance(Duration::days(6)).await;
        w.sim.flush().await;
        assert_eq!(f.truth(&sub).unwrap().status, S::PastDue);
        assert!(w.mismatches().is_empty(), "{:#?}", w.mismatches());
        let record = w.store.all_subscriptions().pop().unwrap();
        assert!(record.state.is_invoiced());
        let renewal = record.state.current_period_start.unwrap();
        let due = renewal + 14 * 86_400;
        // The invoice's own due date, from `invoice.finalized` and
        // `invoice.overdue` (no payment failure is sent).
        assert_eq!(
            record.latest_invoice_due,
            Some(due),
            "with_client {with_client}"
        );
        assert!(record.payment_failures.is_empty());
        let now = stripe_webhook_guard::clock::Clock::now(&w.clock);
        assert!(now.unix_timestamp() > due + 86_400);
        let decision = AccessPolicy::default().decide(&record, now);
        assert_eq!(
            (decision.access, decision.reason),
            (Access::Grace, AccessReason::PastDueGrace),
            "with_client {with_client}"
        );
        assert_eq!(
            decision.valid_until.unwrap().unix_timestamp(),
            due + 3 * 86_400
        );
        f.pay_open_invoice(&sub);
        w.sim.flush().await;
        let record = w.store.all_subscriptions().pop().unwrap();
        assert_eq!(record.status(), &S::Active);
        let decision = AccessPolicy::default()
            .decide(&record, stripe_webhook_guard::clock::Clock::now(&w.clock));
        assert_eq!(decision.access, Access::Granted);
        assert!(w.mismatches().is_empty());
    }
}

/// Records what the handler saw: how many times it was told a payment was
/// reported first, per invoice.
#[derive(Default)]
struct Receipts(std::sync::Mutex<std::collections::HashMap<String, u32>>);

#[async_trait::async_trait]
impl stripe_webhook_guard::processor::EventHandler for Receipts {
    async fn handle(
        &self,
        _event: &stripe_webhook_guard::event::Event,
        ctx: &stripe_webhook_guard::processor::HandlerContext,
    ) -> Result<(), stripe_webhook_guard::processor::HandlerError> {
        if let Some(paid) = ctx.first_payment_report() {
            *self
                .0
                .lock()
                .unwrap()
                .entry(paid.invoice.clone())
                .or_insert(0) += 1;
        }
        Ok(())
    }
}

/// One payment, one notification (issue 13 item 9): Stripe reports each
/// payment with `invoice.paid` and `invoice.payment_succeeded`, delivered
/// up to three times each in any order; a handler acting on
/// `first_payment_report` acts exactly once per paid invoice.
#[tokio::test]
async fn one_payment_one_notification() {
    use std::collections::BTreeSet;
    use std::sync::Arc;
    use stripe_webhook_guard::processor::WebhookProcessor;
    use stripe_webhook_guard::signature::Verifier;
    use stripe_webhook_guard::store::MemoryStore;
    use stripe_webhook_guard::testing::{FakeStripe, Simulator};
    for seed in 1..=3 {
        let clock = stripe_webhook_guard::clock::ManualClock::at_unix(common::world::START);
        let fake = Arc::new(FakeStripe::new(clock.clone(), config(seed)));
        let store = Arc::new(MemoryStore::with_clock(Arc::new(clock.clone())));
        let receipts = Arc::new(Receipts::default());
        let processor = WebhookProcessor::builder(Verifier::new(common::secret()))
            .store(store)
            .clock(Arc::new(clock.clone()))
            .handler(receipts.clone())
            .build();
        let mut sim = Simulator::new(
            processor,
            fake.clone(),
            common::secret(),
            SimConfig {
                seed,
                max_copies: 3,
                max_delay: Duration::minutes(30),
                ..SimConfig::default()
            },
        );
        let a = fake.create_customer();
        let b = fake.create_customer();
        fake.subscribe(&a, &Subscribe::default());
        let sb = fake.subscribe(&b, &Subscribe::default());
        sim.advance(Duration::days(20)).await;
        fake.set_card(&b, Card::Declines);
        sim.advance(Duration::days(15)).await;
        fake.pay_open_invoice(&sb);
        sim.advance(Duration::days(40)).await;
        sim.flush().await;
        let paid: BTreeSet<String> = fake
            .all_events()
            .iter()
            .filter(|e| e.event.event_type().as_str() == "invoice.paid")
            .filter_map(|e| e.event.invoice().ok()?.id)
            .collect();
        let seen = receipts.0.lock().unwrap().clone();
        assert!(paid.len() >= 5, "seed {seed}: {paid:?}");
        assert_eq!(
            seen.keys().cloned().collect::<BTreeSet<_>>(),
            paid,
            "seed {seed}"
        );
        assert!(seen.values().all(|n| *n == 1), "seed {seed}: {seen:?}");
    }
}

/// Test clocks (issue 13 item 12): every subscription runs on a test clock
/// 40 days ahead of the real clock, so every event's `created` and every
/// period is in the real clock's future. Ordering, refetches (stamped with
/// at least the triggering event's simulated `created`) and access decided
/// at the simulated time stay consistent with Stripe's state.
#[tokio::test]
async fn test_clock_ahead_of_real_time() {
    use stripe_webhook_guard::access::AccessPolicy;
    for with_client in [true, false] {
        let mut w = World::new(
            FakeConfig {
                test_clock_ahead: Some(Duration::days(40)),
                ..config(11)
            },
            SimConfig {
                seed: 11,
                max_delay: Duration::minutes(10),
                ..SimConfig::default()
            },
            with_client,
        );
        let f = w.fake.clone();
        let ok = f.create_customer();
        let lapsing = f.create_customer();
        let s_ok = f.subscribe(&ok, &Subscribe::default());
        let s_lapsing = f.subscribe(&lapsing, &Subscribe::default());
        w.sim.advance(Duration::days(10)).await;
        f.set_card(&lapsing, Card::Declines);
        w.sim.advance(Duration::days(50)).await;
        w.sim.flush().await;
        assert!(w.mismatches().is_empty(), "{:#?}", w.mismatches());
        let real = stripe_webhook_guard::clock::Clock::now(&w.clock);
        let simulated = f.test_clock_time().unwrap();
        let policy = AccessPolicy::default();
        for (id, allowed) in [(&s_ok, true), (&s_lapsing, false)] {
            let record = w
                .store
                .all_subscriptions()
                .into_iter()
                .find(|r| &r.id == id)
                .unwrap();
            assert_eq!(record.state.test_clock.as_deref(), Some("clock_fake"));
            // Every watermark is in simulated time, ahead of the real clock.
            assert!(record.watermark.unwrap().created > real.unix_timestamp());
            let d = policy.decide(
                &w.store
                    .all_subscriptions()
                    .into_iter()
                    .find(|r| &r.id == id)
                    .unwrap(),
                simulated,
            );
            assert_eq!(
                d.access.allows(),
                allowed,
                "{id} with_client {with_client}: {d:?}"
            );
        }
    }
}

/// Test clocks and catch-up (issue 13 item 12): every event is dated 40 days
/// ahead of the real clock and every webhook is lost. Catch-up repairs the
/// records; its cursor never moves past the run's start on the real clock,
/// even when an event dated in the future fails (that event is held back by
/// its clock's mark instead); and a later run does not process an event it
/// already read again, even after the ledger forgot it (ledger entries are
/// pruned by their real age, and a test clock can run further ahead than the
/// retention).
#[tokio::test]
async fn catch_up_with_a_test_clock_ahead_of_real_time() {
    use std::sync::Arc;
    use stripe_webhook_guard::client::StripeClient;
    use stripe_webhook_guard::clock::{Clock, ManualClock};
    use stripe_webhook_guard::processor::WebhookProcessor;
    use stripe_webhook_guard::reconcile::{EVENTS_CURSOR, ReconcileConfig, Reconciler};
    use stripe_webhook_guard::signature::Verifier;
    use stripe_webhook_guard::store::{CursorStore, EventLedger, MemoryStore, SubscriptionStore};
    use stripe_webhook_guard::subscription::{FetchTime, SubscriptionState, from_stripe};
    use stripe_webhook_guard::testing::FakeStripe;

    let clock = ManualClock::at_unix(1_767_225_600);
    let fake = Arc::new(FakeStripe::new(
        clock.clone(),
        FakeConfig {
            test_clock_ahead: Some(Duration::days(40)),
            ..FakeConfig::default()
        },
    ));
    let store = Arc::new(MemoryStore::with_clock(Arc::new(clock.clone())));
    let processor = WebhookProcessor::builder(Verifier::new("whsec_clock"))
        .store(store.clone())
        .client(fake.clone())
        .clock(Arc::new(clock.clone()))
        .build();
    let reconciler = Reconciler::new(processor, fake.clone()).config(ReconcileConfig {
        lookback: Duration::days(30),
        ..ReconcileConfig::default()
    });
    let paying = fake.create_customer();
    let lapsing = fake.create_customer();
    let subs = [
        fake.subscribe(&paying, &Subscribe::default()),
        fake.subscribe(&lapsing, &Subscribe::default()),
    ];
    fake.advance(Duration::days(3));
    fake.set_card(&lapsing, Card::Declines);
    fake.advance(Duration::days(30));
    // Every webhook is lost.
    let lost = fake.take_new_events();
    let real = clock.now().unix_timestamp();
    assert!(lost.iter().all(|e| e.event.created() > real));

    // Run 1: Stripe cannot be reached for refetches; events fail retryably.
    fake.fail_retrievals(true);
    let first = reconciler.catch_up().await.unwrap();
    assert!(first.events_failed > 0, "{first:?}");
    let cursor: i64 = store
        .load_cursor(EVENTS_CURSOR)
        .await
        .unwrap()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        cursor <= real,
        "the cursor ran into simulated time: {cursor} > {real}"
    );

    // Run 2: the failed events are read again and every record matches.
    fake.fail_retrievals(false);
    let second = reconciler.catch_up().await.unwrap();
    assert_eq!(second.events_failed, 0, "{second:?}");
    assert!(second.events_processed > 0);
    for id in &subs {
        let truth = SubscriptionState::from_view(&fake.truth(id).unwrap());
        let record = store.load(id).await.unwrap().unwrap();
        assert!(record.matches(&truth), "{id}: {record:?}");
    }

    // Run 3, after the ledger forgot every processed entry: the clock's
    // mark (not the ledger) says what was read. Only the events within the
    // overlap (5 minutes) of the newest one read are read again, as the
    // overlap always does; without the mark every event would be.
    let far = clock.now() + Duration::days(400);
    assert!(store.prune(far).await.unwrap() > 0);
    let third = reconciler.catch_up().await.unwrap();
    let newest = lost.iter().map(|e| e.event.created()).max().unwrap();
    let in_overlap = lost
        .iter()
        .filter(|e| e.event.created() >= newest - 300)
        .count();
    assert_eq!(
        usize::try_from(third.events_processed).unwrap(),
        in_overlap,
        "{third:?}"
    );
    assert_eq!(third.events_failed, 0);
    assert_eq!(
        third.events_duplicate,
        third.events_seen - third.events_processed
    );
    assert!(third.events_processed < third.events_seen);

    // A refetch is answered with Stripe's real `Date` and the expanded
    // clock: the record is stamped with the clock's simulated time, so
    // events older than what was fetched stay stale.
    let answer = fake.retrieve_subscription(None, &subs[0]).await.unwrap();
    let now = clock.now();
    assert_eq!(answer.date, Some(now));
    let simulated = fake.test_clock_time().unwrap().unix_timestamp();
    assert!(simulated > now.unix_timestamp());
    assert_eq!(answer.data.test_clock_frozen_time, Some(simulated));
    let fetched = from_stripe(
        None,
        &answer.data,
        FetchTime {
            local: now,
            stripe: answer.date,
        },
        None,
    )
    .record;
    assert_eq!(fetched.watermark.unwrap().created, simulated);
}
