//! Helpers shared by the integration tests.
#![allow(dead_code)]

pub mod split;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use stripe_webhook_guard::event::Event;
use stripe_webhook_guard::processor::{EventHandler, HandlerContext, HandlerError};
use stripe_webhook_guard::signature::{WebhookSecret, test_header};
use time::OffsetDateTime;

pub const SECRET: &str = "whsec_integration_tests";

pub fn secret() -> WebhookSecret {
    WebhookSecret::new(SECRET)
}

pub fn at(t: i64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp(t).unwrap()
}

/// Signs `body` at `t` the way Stripe does.
pub fn sign(body: &str, t: i64) -> String {
    test_header(&secret(), body.as_bytes(), at(t))
}

/// A `customer.subscription.*` event body.
pub fn sub_event(id: &str, ty: &str, created: i64, sub: &str, status: &str) -> String {
    format!(
        r#"{{"id":"{id}","object":"event","type":"{ty}","created":{created},"livemode":false,
        "api_version":"2025-03-31.basil","data":{{"object":{{"id":"{sub}","object":"subscription",
        "customer":"cus_{sub}","status":"{status}","cancel_at_period_end":false,
        "items":{{"object":"list","data":[{{"id":"si_{sub}","price":{{"id":"price_1"}},
        "current_period_start":{created},"current_period_end":{}}}]}}}}}}}}"#,
        created + 30 * 86_400
    )
}

/// An event with no subscription effect.
pub fn other_event(id: &str, created: i64) -> String {
    format!(
        r#"{{"id":"{id}","object":"event","type":"customer.updated","created":{created},"livemode":false,
        "data":{{"object":{{"id":"cus_1","object":"customer"}}}}}}"#
    )
}

/// Counts successful effects per event id; can be told to fail an event a
/// number of times (or forever) first.
#[derive(Default)]
pub struct CountingHandler {
    pub effects: Mutex<HashMap<String, u32>>,
    pub calls: AtomicU32,
    pub fail_first: Mutex<HashMap<String, u32>>,
    pub always_fail: Mutex<Vec<String>>,
    pub panic_first: Mutex<HashMap<String, u32>>,
}

impl CountingHandler {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    pub fn effects_of(&self, id: &str) -> u32 {
        self.effects.lock().unwrap().get(id).copied().unwrap_or(0)
    }

    pub fn total_effects(&self) -> u32 {
        self.effects.lock().unwrap().values().sum()
    }
}

#[async_trait]
impl EventHandler for CountingHandler {
    async fn handle(&self, event: &Event, ctx: &HandlerContext) -> Result<(), HandlerError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        tokio::task::yield_now().await;
        if self
            .always_fail
            .lock()
            .unwrap()
            .iter()
            .any(|e| e == event.id())
        {
            return Err(HandlerError::retryable("poison"));
        }
        if let Some(n) = self.fail_first.lock().unwrap().get_mut(event.id())
            && *n > 0
        {
            *n -= 1;
            return Err(HandlerError::retryable(format!(
                "transient failure on attempt {}",
                ctx.attempt
            )));
        }
        let panic_now = {
            let mut p = self.panic_first.lock().unwrap();
            match p.get_mut(event.id()) {
                Some(n) if *n > 0 => {
                    *n -= 1;
                    true
                }
                _ => false,
            }
        };
        assert!(!panic_now, "handler bug");
        *self
            .effects
            .lock()
            .unwrap()
            .entry(event.id().to_owned())
            .or_insert(0) += 1;
        Ok(())
    }
}

#[cfg(feature = "test-util")]
pub mod world {
    use std::sync::Arc;

    use stripe_webhook_guard::clock::ManualClock;
    use stripe_webhook_guard::processor::WebhookProcessor;
    use stripe_webhook_guard::signature::Verifier;
    use stripe_webhook_guard::store::MemoryStore;
    use stripe_webhook_guard::subscription::{SubscriptionRecord, SubscriptionState};
    use stripe_webhook_guard::testing::{
        Card, FakeConfig, FakeEvent, FakeStripe, Rng, ShapeMix, SimConfig, Simulator, Subscribe,
    };
    use time::Duration;

    pub const START: i64 = 1_767_225_600; // 2026-01-01

    /// A FakeStripe's history, and its deliveries as Stripe makes them.
    pub struct History {
        pub clock: ManualClock,
        pub fake: Arc<FakeStripe>,
        pub events: Vec<FakeEvent>,
        /// Every event's body one to three times, shuffled (so each
        /// subscription's events arrive out of order).
        pub deliveries: Vec<String>,
    }

    /// `subscriptions` subscriptions (every third with a 14-day trial,
    /// every fifth customer's card declining, every seventh cancelling at
    /// period end) on a FakeStripe in both API shapes, 75 days on: about 14
    /// events per subscription. `seed` seeds the fake and the deliveries.
    pub fn history(seed: u64, subscriptions: usize) -> History {
        let clock = ManualClock::at_unix(START);
        let fake = Arc::new(FakeStripe::new(
            clock.clone(),
            FakeConfig {
                seed,
                shapes: ShapeMix::Mixed,
                ..FakeConfig::default()
            },
        ));
        for i in 0..subscriptions {
            let c = fake.create_customer();
            let s = fake.subscribe(
                &c,
                &Subscribe {
                    trial_days: (i % 3 == 0).then_some(14),
                    ..Subscribe::default()
                },
            );
            if i % 5 == 0 {
                fake.set_card(&c, Card::Declines);
            }
            if i % 7 == 0 {
                fake.cancel_at_period_end(&s, true);
            }
        }
        fake.advance(Duration::days(75));
        let events = fake.take_new_events();
        let mut rng = Rng::new(seed);
        let mut deliveries = Vec::new();
        for fe in &events {
            for _ in 0..=rng.below(3) {
                deliveries.push(fe.body.clone());
            }
        }
        rng.shuffle(&mut deliveries);
        History {
            clock,
            fake,
            events,
            deliveries,
        }
    }

    pub struct World {
        pub clock: ManualClock,
        pub fake: Arc<FakeStripe>,
        pub store: Arc<MemoryStore>,
        pub sim: Simulator,
    }

    impl World {
        pub fn new(fake_config: FakeConfig, sim_config: SimConfig, with_client: bool) -> Self {
            let clock = ManualClock::at_unix(START);
            let fake = Arc::new(FakeStripe::new(clock.clone(), fake_config));
            let store = Arc::new(MemoryStore::with_clock(Arc::new(clock.clone())));
            let mut builder = WebhookProcessor::builder(Verifier::new(super::secret()))
                .store(store.clone())
                .clock(Arc::new(clock.clone()));
            if with_client {
                builder = builder.client(fake.clone());
            }
            let processor = builder.build();
            let sim = Simulator::new(processor, fake.clone(), super::secret(), sim_config);
            Self {
                clock,
                fake,
                store,
                sim,
            }
        }

        /// Subscriptions whose record differs from FakeStripe's truth.
        pub fn mismatches(&self) -> Vec<(String, Option<SubscriptionRecord>, SubscriptionState)> {
            let records = self.store.all_subscriptions();
            self.fake
                .truths()
                .into_iter()
                .filter_map(|truth| {
                    let id = truth.id.clone().unwrap_or_default();
                    let state = SubscriptionState::from_view(&truth);
                    let record = records.iter().find(|r| r.id == id).cloned();
                    match &record {
                        Some(r) if r.matches(&state) => None,
                        _ => Some((id, record, state)),
                    }
                })
                .collect()
        }
    }
}
