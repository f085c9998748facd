//! Inbox mode: acknowledge Stripe in milliseconds, process in the background.
//!
//! [`Inbox::receive`] verifies and parses a delivery, stores it durably as
//! `pending` in an [`InboxStore`] and returns: the HTTP answer no longer
//! waits for the subscription effect, a Stripe refetch or the application's
//! handler. [`Worker`]s take pending events (one event per subscription at a
//! time, oldest first, `FOR UPDATE SKIP LOCKED` semantics), run them through
//! the same pipeline as synchronous mode (subscription effect, handler,
//! completion, all fenced by the lease), retry failures with exponential
//! back-off, and dead-letter after `max_attempts`. The stored body is kept
//! until the event is processed, then dropped.
//!
//! Use inbox mode when handlers are slow or call other services, or when
//! bursts must not turn into Stripe retries; use synchronous mode
//! ([`WebhookProcessor::handle`]) when the simplest deployment matters more.

use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;
use time::Duration;

use crate::event::Event;
use crate::ledger::Failure;
use crate::processor::{Error, Outcome, Screened, WebhookProcessor};
use crate::rt::catch_unwind::poll_now;
use crate::store::{
    EnqueueOutcome, InboxItem, InboxRequest, InboxStore, StoreError, StoreErrorKind,
};
use crate::subscription;

/// Inbox settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InboxConfig {
    /// Events a worker processes per round (each taken and leased just
    /// before it runs).
    pub batch: usize,
    /// First retry delay after a failure (doubled per attempt).
    pub base_backoff: Duration,
    /// Longest retry delay.
    pub max_backoff: Duration,
    /// How long a worker sleeps when there is nothing to take.
    pub idle_sleep: Duration,
    /// Keep the body of processed events (default: dropped once processed).
    pub keep_payloads: bool,
}

impl Default for InboxConfig {
    fn default() -> Self {
        Self {
            batch: 16,
            base_backoff: Duration::seconds(5),
            max_backoff: Duration::minutes(30),
            idle_sleep: Duration::milliseconds(200),
            keep_payloads: false,
        }
    }
}

/// The receiving side of inbox mode. Cheap to clone.
#[derive(Clone)]
pub struct Inbox {
    processor: WebhookProcessor,
    store: Arc<dyn InboxStore>,
    config: InboxConfig,
}

impl std::fmt::Debug for Inbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inbox")
            .field("processor", &self.processor)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Inbox {
    /// Built by `ProcessorBuilder::build_inbox`, which guarantees that the
    /// queue is the processor's own store.
    pub(crate) fn from_parts(
        processor: WebhookProcessor,
        store: Arc<dyn InboxStore>,
        config: InboxConfig,
    ) -> Self {
        Self {
            processor,
            store,
            config,
        }
    }

    /// The processor that workers run events through.
    pub fn processor(&self) -> &WebhookProcessor {
        &self.processor
    }

    /// The settings.
    pub fn config(&self) -> &InboxConfig {
        &self.config
    }

    /// Verifies, parses, filters and stores a delivery, exactly as
    /// [`WebhookProcessor::handle`] does up to the claim; answer Stripe with
    /// 200 on `Ok`: [`Outcome::Queued`] (a worker will process it),
    /// [`Outcome::Duplicate`] or [`Outcome::Ignored`].
    ///
    /// # Errors
    ///
    /// As [`WebhookProcessor::handle`]: bad signature or body (400),
    /// a conflicting payload (409), a store failure (503).
    pub async fn receive(&self, body: &[u8], signature: Option<&str>) -> Result<Outcome, Error> {
        let result = self.receive_inner(body, signature).await;
        crate::metrics::delivered(&result);
        result
    }

    async fn receive_inner(&self, body: &[u8], signature: Option<&str>) -> Result<Outcome, Error> {
        let (event, verified, claim) = match self.processor.screen(body, signature).await? {
            Screened::Answered(outcome) => return Ok(outcome),
            Screened::Admit {
                event,
                verified,
                request,
            } => (event, verified, request),
        };
        let event_id = event.id().to_owned();
        let request = InboxRequest {
            claim,
            payload: verified.payload_str().to_owned(),
            subscription_id: subscription::subscription_id_of(&event).ok().flatten(),
        };
        let queued = self.store.enqueue(&request).await;
        match queued.map_err(|source| Error::Store {
            event_id: event_id.clone(),
            source,
        })? {
            EnqueueOutcome::Queued => Ok(Outcome::Queued { event_id }),
            EnqueueOutcome::Duplicate { state } => Ok(Outcome::Duplicate { event_id, state }),
            EnqueueOutcome::Conflict => Err(Error::PayloadConflict { event_id }),
        }
    }

    /// A worker for this inbox.
    pub fn worker(&self) -> Worker {
        Worker {
            inbox: self.clone(),
        }
    }

    /// Events not yet settled.
    ///
    /// # Errors
    ///
    /// [`StoreError`] when the store fails.
    pub async fn backlog(&self) -> Result<u64, StoreError> {
        self.store
            .backlog()
            .await
            .inspect(|n| crate::metrics::inbox_backlog(*n))
    }
}

/// What one worker round did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct RoundStats {
    /// Events taken.
    pub taken: usize,
    /// Processed successfully (including stale, duplicate and no-op effects).
    pub processed: usize,
    /// Failed and scheduled for a retry.
    pub retried: usize,
    /// Dead-lettered.
    pub dead: usize,
}

/// Processes inbox events. Run several (in one process or many): the store
/// hands each event to one worker at a time.
#[derive(Debug, Clone)]
pub struct Worker {
    inbox: Inbox,
}

impl Worker {
    /// Takes up to [`InboxConfig::batch`] events and processes them one
    /// after another. Each event after the first has its lease renewed to
    /// the full lease just before it runs, so the last event of a batch
    /// starts with as full a lease as the first: slow events never eat into
    /// a later event's lease. An event whose lease was taken over meanwhile
    /// (it ran out and another worker took it) is left to that worker.
    ///
    /// # Errors
    ///
    /// [`StoreError`] when taking from the store fails; failures of single
    /// events are retried or dead-lettered instead.
    pub async fn run_once(&self) -> Result<RoundStats, StoreError> {
        let inbox = &self.inbox;
        let p = &inbox.processor;
        // Read before the store's clock is: a deadline derived from it
        // never outlasts the lease the store grants.
        let asked = p.clock().monotonic();
        let items = inbox
            .store
            .take(inbox.config.batch, p.lease_duration(), p.max_attempts())
            .await?;
        let mut stats = RoundStats {
            taken: items.len(),
            ..RoundStats::default()
        };
        for (i, mut item) in items.into_iter().enumerate() {
            let mut deadline = item.lease.deadline(asked);
            if i > 0 {
                let asked = p.clock().monotonic();
                match inbox.store.renew(&item.lease, p.lease_duration()).await {
                    Ok(lease) => {
                        deadline = lease.deadline(asked);
                        item.lease = lease;
                    }
                    // Taken over by another worker: theirs now.
                    Err(e) if e.kind() == StoreErrorKind::LeaseLost => continue,
                    // The store could not renew: run with the time left (the
                    // pipeline checks the deadline before the handler runs).
                    Err(_) => {}
                }
            }
            self.run_item(item, deadline, &mut stats).await;
        }
        Ok(stats)
    }

    /// Runs one taken event through the pipeline and schedules its retry
    /// when it failed.
    async fn run_item(&self, item: InboxItem, deadline: Instant, stats: &mut RoundStats) {
        let inbox = &self.inbox;
        let p = &inbox.processor;
        let key = item.lease.key.clone();
        let attempt = item.lease.attempt;
        let event = match Event::from_bytes(item.payload.as_bytes()) {
            Ok(e) => e,
            Err(e) => {
                // Verified when received; unreadable now means a bug or
                // corruption: no retry will help.
                let failure = Failure {
                    error: format!("stored payload unreadable: {e}"),
                    retryable: false,
                    max_attempts: p.max_attempts(),
                    payload: None,
                };
                let _ = inbox.store.fail(&item.lease, &failure).await;
                stats.dead += 1;
                return;
            }
        };
        let outcome = p
            .run_claimed(&event, Some(&item.payload), &item.lease, deadline)
            .await;
        crate::metrics::delivered(&outcome);
        match outcome {
            Ok(Outcome::DeadLettered { .. }) => stats.dead += 1,
            Ok(_) => {
                stats.processed += 1;
                if inbox.config.keep_payloads {
                    // The event is processed either way; a lost copy of
                    // its body must not abort the rest of the round.
                    let _ = inbox.store.keep_payload(&key, &item.payload).await;
                }
            }
            Err(_) => {
                stats.retried += 1;
                // The due time is computed on the store's clock. Without it
                // the event is simply due at once; the round goes on.
                let _ = inbox.store.retry_after(&key, self.backoff(attempt)).await;
            }
        }
    }

    /// Runs rounds until a round takes nothing and nothing is pending.
    /// (Events waiting for a retry time keep the backlog non-zero; this
    /// returns when only such events remain and none is due.)
    ///
    /// # Errors
    ///
    /// [`StoreError`] when the store fails.
    pub async fn run_until_idle(&self) -> Result<RoundStats, StoreError> {
        let mut total = RoundStats::default();
        loop {
            let round = self.run_once().await?;
            total.taken += round.taken;
            total.processed += round.processed;
            total.retried += round.retried;
            total.dead += round.dead;
            if round.taken == 0 {
                return Ok(total);
            }
        }
    }

    /// Runs until `shutdown` completes, sleeping on the processor's clock
    /// when idle. A round in progress finishes before it returns.
    ///
    /// # Errors
    ///
    /// [`StoreError`] when the store keeps failing (after the idle sleep,
    /// errors are retried; the last one is returned at shutdown).
    pub async fn run(
        &self,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> Result<(), StoreError> {
        let mut shutdown = std::pin::pin!(shutdown);
        let mut last_error = None;
        loop {
            if poll_now(shutdown.as_mut()) {
                return last_error.map_or(Ok(()), Err);
            }
            match self.run_once().await {
                Ok(round) if round.taken > 0 => last_error = None,
                Ok(_) => {
                    self.inbox
                        .processor
                        .clock()
                        .sleep(self.inbox.config.idle_sleep)
                        .await;
                }
                Err(e) => {
                    last_error = Some(e);
                    self.inbox
                        .processor
                        .clock()
                        .sleep(self.inbox.config.idle_sleep)
                        .await;
                }
            }
        }
    }

    /// The delay before retrying an event whose attempt `attempt` failed:
    /// the crate's back-off with jitter over the configured base and cap.
    fn backoff(&self, attempt: u32) -> Duration {
        let c = &self.inbox.config;
        let std = |d: Duration| d.try_into().unwrap_or(std::time::Duration::ZERO);
        let delay = crate::rt::backoff(attempt, std(c.base_backoff), std(c.max_backoff));
        Duration::try_from(delay).unwrap_or(c.max_backoff)
    }
}
