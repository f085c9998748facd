//! The delivery simulator: delivers FakeStripe's events to a processor the
//! way Stripe's webhook system does at its worst — each event 1–3 times,
//! reordered, sometimes never, with a fresh signature timestamp per attempt,
//! retries after non-2xx answers for up to three days, and endpoint outages —
//! all on the fake's virtual clock. The fake's connected accounts' events
//! are delivered to the same processor, as to a Connect endpoint.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashSet};
use std::sync::Arc;

use time::{Duration, OffsetDateTime};

use crate::clock::{Clock, ManualClock};
use crate::processor::{Outcome, WebhookProcessor};
use crate::signature::{WebhookSecret, test_header};

use super::fake_stripe::FakeStripe;
use super::rng::Rng;

/// How deliveries misbehave.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Seed.
    pub seed: u64,
    /// Each event is delivered between 1 and this many times (at most 3 is
    /// realistic).
    pub max_copies: u32,
    /// Each copy waits a random delay in `[0, max_delay]`: larger delays
    /// reorder more.
    pub max_delay: Duration,
    /// Probability that an event is never sent at all.
    pub drop_rate: f64,
    /// Delays between Stripe's retries after a non-2xx answer.
    pub retry_delays: Vec<Duration>,
    /// Stripe stops retrying this long after the first attempt (3 days).
    pub give_up_after: Duration,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            seed: 7,
            max_copies: 3,
            max_delay: Duration::seconds(90),
            drop_rate: 0.0,
            retry_delays: [1, 5, 30, 120, 300, 600, 1440, 1440, 1440]
                .into_iter()
                .map(Duration::minutes)
                .collect(),
            give_up_after: Duration::days(3),
        }
    }
}

/// What happened to one delivery attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeliveryResult {
    /// 2xx with this outcome.
    Acknowledged(Outcome),
    /// A non-2xx answer.
    Refused {
        /// The HTTP status.
        status: u16,
        /// The error label.
        label: &'static str,
    },
    /// The endpoint was down.
    EndpointDown,
}

/// One delivery attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryRecord {
    /// When (virtual time, Unix seconds).
    pub at: i64,
    /// The event.
    pub event_id: String,
    /// Its type.
    pub event_type: String,
    /// Its `created`.
    pub created: i64,
    /// Attempt number of this copy (1 for the first try).
    pub attempt: u32,
    /// What happened.
    pub result: DeliveryResult,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Delivery {
    at: i64,
    seq: u64,
    event_id: String,
    event_type: String,
    created: i64,
    body: String,
    first_attempt_at: i64,
    attempt: u32,
}

/// Delivers a [`FakeStripe`]'s events to a [`WebhookProcessor`], signed with
/// a fresh timestamp per attempt, duplicated, reordered, dropped and retried
/// as [`SimConfig`] says, on the fake's virtual clock. The
/// [`testing`](crate::testing) module docs show a whole run.
pub struct Simulator {
    processor: WebhookProcessor,
    fake: Arc<FakeStripe>,
    clock: ManualClock,
    secret: WebhookSecret,
    rng: Rng,
    config: SimConfig,
    queue: BinaryHeap<Reverse<Delivery>>,
    busy: std::time::Duration,
    seq: u64,
    down: Vec<(i64, i64)>,
    log: Vec<DeliveryRecord>,
    dropped: HashSet<String>,
}

impl std::fmt::Debug for Simulator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Simulator")
            .field("queued", &self.queue.len())
            .field("delivered", &self.log.len())
            .finish_non_exhaustive()
    }
}

impl Simulator {
    /// A simulator signing with `secret` (the processor's), on the fake's clock.
    pub fn new(
        processor: WebhookProcessor,
        fake: Arc<FakeStripe>,
        secret: WebhookSecret,
        config: SimConfig,
    ) -> Self {
        Self {
            processor,
            clock: fake.clock().clone(),
            fake,
            secret,
            rng: Rng::new(config.seed),
            config,
            queue: BinaryHeap::new(),
            busy: std::time::Duration::ZERO,
            seq: 0,
            down: Vec::new(),
            log: Vec::new(),
            dropped: HashSet::new(),
        }
    }

    /// The processor.
    pub fn processor(&self) -> &WebhookProcessor {
        &self.processor
    }

    /// The fake.
    pub fn fake(&self) -> &Arc<FakeStripe> {
        &self.fake
    }

    /// Every delivery attempt so far.
    pub fn log(&self) -> &[DeliveryRecord] {
        &self.log
    }

    /// Takes the attempts logged so far.
    pub fn take_log(&mut self) -> Vec<DeliveryRecord> {
        std::mem::take(&mut self.log)
    }

    /// Events that were never sent (dropped on purpose).
    pub fn dropped(&self) -> &HashSet<String> {
        &self.dropped
    }

    /// Wall-clock time spent inside [`WebhookProcessor::handle`] (the
    /// crate's own work, without the fake's).
    pub fn processing_time(&self) -> std::time::Duration {
        self.busy
    }

    /// Deliveries still waiting.
    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    /// The endpoint is down between `from` and `to` (virtual Unix seconds).
    pub fn endpoint_down(&mut self, from: i64, to: i64) {
        self.down.push((from, to));
    }

    fn now(&self) -> i64 {
        self.clock.now().unix_timestamp()
    }

    /// Schedules deliveries for the events FakeStripe and its connected
    /// accounts emitted since the last call.
    pub fn collect(&mut self) {
        let mut new = self.fake.take_new_events();
        new.extend(self.fake.take_new_account_events());
        for fe in new {
            if self.rng.chance(self.config.drop_rate) {
                self.dropped.insert(fe.event.id().to_owned());
                continue;
            }
            let copies = 1 + self.rng.below(u64::from(self.config.max_copies.max(1)));
            for _ in 0..copies {
                let delay = self.rng.below(
                    u64::try_from(self.config.max_delay.whole_seconds().max(0)).unwrap_or(0) + 1,
                );
                // Sent when emitted on the real clock (an event of a test
                // clock carries a simulated `created`).
                let at = fe.emitted_at + i64::try_from(delay).unwrap_or(0);
                self.seq += 1;
                self.queue.push(Reverse(Delivery {
                    at,
                    seq: self.rng.next_u64() ^ self.seq,
                    event_id: fe.event.id().to_owned(),
                    event_type: fe.event.event_type().as_str().to_owned(),
                    created: fe.event.created(),
                    body: fe.body.clone(),
                    first_attempt_at: at,
                    attempt: 1,
                }));
            }
        }
    }

    /// Runs FakeStripe's scheduled actions and the deliveries in time order
    /// up to `until`, then sets the clock there.
    pub async fn run_until(&mut self, until: OffsetDateTime) {
        let until = until.unix_timestamp();
        self.collect();
        loop {
            let next_delivery = self.queue.peek().map(|Reverse(d)| (d.at, d.seq));
            let next_action = self.fake.next_action_anywhere();
            match (next_delivery, next_action) {
                (Some((d, _)), a) if d <= until && a.is_none_or(|a| d < a) => {
                    self.deliver_next().await;
                }
                (_, Some(a)) if a <= until => {
                    self.fake.run_next_due_anywhere(a);
                    self.collect();
                }
                _ => break,
            }
        }
        if let Ok(t) = OffsetDateTime::from_unix_timestamp(until)
            && self.clock.now() < t
        {
            self.clock.set(t);
        }
    }

    /// [`Simulator::run_until`] `now + by`.
    pub async fn advance(&mut self, by: Duration) {
        let target = self.clock.now().saturating_add(by);
        self.run_until(target).await;
    }

    /// Delivers everything queued (advancing the clock, and running the
    /// fake's actions that fall due meanwhile) until nothing is queued.
    pub async fn flush(&mut self) {
        self.collect();
        while let Some(last) = self.queue.iter().map(|Reverse(d)| d.at).max() {
            let t = OffsetDateTime::from_unix_timestamp(last.max(self.now()))
                .unwrap_or_else(|_| self.clock.now());
            self.run_until(t).await;
        }
    }

    async fn deliver_next(&mut self) {
        let Some(Reverse(d)) = self.queue.pop() else {
            return;
        };
        if let Ok(t) = OffsetDateTime::from_unix_timestamp(d.at)
            && self.clock.now() < t
        {
            self.clock.set(t);
        }
        let now = self.now();
        let down = self.down.iter().any(|(a, b)| *a <= now && now < *b);
        let result = if down {
            DeliveryResult::EndpointDown
        } else {
            let header = test_header(&self.secret, d.body.as_bytes(), self.clock.now());
            let started = std::time::Instant::now();
            let result = self
                .processor
                .handle(d.body.as_bytes(), Some(&header))
                .await;
            self.busy += started.elapsed();
            match result {
                Ok(outcome) => {
                    self.fake.mark_delivered(&d.event_id);
                    DeliveryResult::Acknowledged(outcome)
                }
                Err(e) => DeliveryResult::Refused {
                    status: e.http_status(),
                    label: e.as_str(),
                },
            }
        };
        let retry = !matches!(result, DeliveryResult::Acknowledged(_));
        self.log.push(DeliveryRecord {
            at: now,
            event_id: d.event_id.clone(),
            event_type: d.event_type.clone(),
            created: d.created,
            attempt: d.attempt,
            result,
        });
        if retry {
            let index = usize::try_from(d.attempt.saturating_sub(1)).unwrap_or(usize::MAX);
            if let Some(delay) = self.config.retry_delays.get(index) {
                let at = now + delay.whole_seconds();
                if at - d.first_attempt_at <= self.config.give_up_after.whole_seconds() {
                    self.seq += 1;
                    self.queue.push(Reverse(Delivery {
                        at,
                        seq: self.rng.next_u64() ^ self.seq,
                        attempt: d.attempt + 1,
                        ..d
                    }));
                }
            }
        }
    }
}
