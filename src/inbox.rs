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

use serde::Serialize;
use time::Duration;

use crate::event::Event;
use crate::ledger::{ClaimRequest, Failure, IgnoreRequest, LedgerState};
use crate::processor::{Error, IgnoreReason, Outcome, WebhookProcessor};
use crate::store::{EnqueueOutcome, InboxRequest, InboxStore, StoreError};
use crate::subscription;

/// What [`Inbox::receive`] did. Every receipt is answered with 200.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "receipt", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Receipt {
    /// Stored; a worker will process it.
    Queued {
        /// The event.
        event_id: String,
    },
    /// Known already (queued, processing, done, or dead).
    Duplicate {
        /// The event.
        event_id: String,
        /// Its state.
        state: LedgerState,
    },
    /// Filtered out (livemode, account, type).
    Ignored {
        /// The event.
        event_id: String,
        /// Why.
        reason: IgnoreReason,
    },
}

impl Receipt {
    /// Always 200.
    pub fn http_status(&self) -> u16 {
        200
    }
}

/// Inbox settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InboxConfig {
    /// Events a worker takes per round.
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
    /// An inbox over `store`, processing with `processor`.
    ///
    /// # Panics
    ///
    /// When `store` is not the processor's ledger: workers take events from
    /// `store` and complete them through the processor, so two different
    /// stores would leave every event claimed and never completed.
    pub fn new(processor: WebhookProcessor, store: Arc<dyn InboxStore>) -> Self {
        let same = std::ptr::addr_eq(Arc::as_ptr(&store), Arc::as_ptr(processor.ledger()));
        assert!(
            same,
            "Inbox::new: the inbox store must be the processor's ledger (build the processor with .store(same_store))"
        );
        Self {
            processor,
            store,
            config: InboxConfig::default(),
        }
    }

    /// The settings.
    #[must_use]
    pub fn config(mut self, config: InboxConfig) -> Self {
        self.config = config;
        self
    }

    /// Verifies, parses and stores a delivery; answer Stripe with 200 on
    /// `Ok`.
    ///
    /// # Errors
    ///
    /// As [`WebhookProcessor::handle`]: bad signature or body (400),
    /// a conflicting payload (409), a store failure (503).
    pub async fn receive(&self, body: &[u8], signature: Option<&str>) -> Result<Receipt, Error> {
        let now = self.processor.clock().now();
        let verified = self.processor.verifier().verify(body, signature, now)?;
        let event = Event::parse(verified).map_err(Error::Parse)?;
        let event_id = event.id().to_owned();
        let store_err = |source: StoreError| Error::Store {
            event_id: event_id.clone(),
            source,
        };
        if let Some(reason) = self.processor.filter_reason(&event) {
            self.store
                .ignore(&IgnoreRequest::for_event(&event, reason.as_str()))
                .await
                .map_err(store_err)?;
            return Ok(Receipt::Ignored { event_id, reason });
        }
        let request = InboxRequest {
            claim: ClaimRequest::for_event(
                &event,
                self.processor.lease_duration(),
                self.processor.max_attempts(),
            ),
            payload: verified.payload_str().to_owned(),
            subscription_id: subscription::subscription_id_of(&event).ok().flatten(),
            available_at: now,
        };
        match self.store.enqueue(&request).await.map_err(store_err)? {
            EnqueueOutcome::Queued => Ok(Receipt::Queued { event_id }),
            EnqueueOutcome::Duplicate { state } => Ok(Receipt::Duplicate { event_id, state }),
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
        self.store.backlog().await
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
    /// Takes one batch and processes it, item after item; an item whose
    /// lease ran out before its turn is left for the next round.
    ///
    /// # Errors
    ///
    /// [`StoreError`] when taking from the store fails; failures of single
    /// events are retried or dead-lettered instead.
    pub async fn run_once(&self) -> Result<RoundStats, StoreError> {
        let inbox = &self.inbox;
        let p = &inbox.processor;
        let items = inbox
            .store
            .take(inbox.config.batch, p.lease_duration(), p.max_attempts())
            .await?;
        let mut stats = RoundStats {
            taken: items.len(),
            ..RoundStats::default()
        };
        for item in items {
            let key = item.lease.key.clone();
            let attempt = item.lease.attempt;
            if p.clock().now() >= item.lease.expires_at {
                // The batch took longer than this item's lease; another
                // worker may have it now. Leave it to whoever holds it.
                continue;
            }
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
                    continue;
                }
            };
            match p.run_claimed(&event, Some(&item.payload), item.lease).await {
                Ok(Outcome::DeadLettered { .. }) => stats.dead += 1,
                Ok(_) => {
                    stats.processed += 1;
                    if inbox.config.keep_payloads {
                        // The event is processed either way; a lost copy of
                        // its body must not abort the rest of the batch.
                        let _ = inbox.store.keep_payload(&key, &item.payload).await;
                    }
                }
                Err(_) => {
                    stats.retried += 1;
                    let at = p.clock().now() + self.backoff(attempt);
                    // Without the back-off time the event is simply due at
                    // once; the rest of the batch still runs.
                    let _ = inbox.store.retry_at(&key, at).await;
                }
            }
        }
        Ok(stats)
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

    fn backoff(&self, attempt: u32) -> Duration {
        let c = &self.inbox.config;
        let factor = 1i32 << attempt.saturating_sub(1).min(20);
        (c.base_backoff * factor).min(c.max_backoff)
    }
}

/// Whether a future is ready, polled once with a no-op waker.
fn poll_now<F: std::future::Future<Output = ()>>(fut: std::pin::Pin<&mut F>) -> bool {
    use std::task::{Context, Poll, Waker};
    let mut cx = Context::from_waker(Waker::noop());
    matches!(fut.poll(&mut cx), Poll::Ready(()))
}
