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
