//! Helpers shared by the integration tests.
#![allow(dead_code)]

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
        if panic_now {
            panic!("handler bug");
        }
        *self
            .effects
            .lock()
            .unwrap()
            .entry(event.id().to_owned())
            .or_insert(0) += 1;
        Ok(())
    }
}
