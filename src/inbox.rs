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
//! **Shutdown.** [`Inbox::shutdown`] stops the inbox gracefully: workers
//! take no new events, events taken but not started are given back at
//! once, running events get until the deadline to finish, and the ones
//! still running then are cut off (at their next await) and their claims
//! given back ([`WebhookProcessor::release_held`]), so the next worker (or
//! the next process) takes them at once instead of waiting for the lease to
//! run out. Every event a worker takes is registered with its processor's
//! held claims until it is settled, so `release_held` also gives back the
//! events of a worker whose task the application aborted.
//!
//! Use inbox mode when handlers are slow or call other services, or when
//! bursts must not turn into Stripe retries; use synchronous mode
//! ([`WebhookProcessor::handle`]) when the simplest deployment matters more.

use std::future::Future;
use std::pin::pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::Instant;

use serde::Serialize;
use time::Duration;

use crate::event::Event;
use crate::ledger::Failure;
use crate::processor::{Error, Outcome, Screened, WebhookProcessor};
use crate::rt::catch_unwind::poll_now;
use crate::rt::join::{BoxedFuture, join_all};
use crate::rt::semaphore::Semaphore;
use crate::store::{
    EnqueueOutcome, InboxItem, InboxRequest, InboxStore, StoreError, StoreErrorKind,
};
use crate::subscription;

/// Inbox settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InboxConfig {
    /// Events a worker takes per round.
    pub batch: usize,
    /// Events of a round a worker runs at the same time (default 1: one
    /// after another; at most `batch`). The events of one round belong to
    /// different subscriptions (the store hands out one event per
    /// subscription at a time), so they never race each other; the
    /// application's handler then runs up to this many times at once, as
    /// it does for concurrent requests in synchronous mode. A worker's
    /// throughput is otherwise bound by one event's round trips to the
    /// store, one after another.
    pub concurrency: usize,
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
            concurrency: 1,
            base_backoff: Duration::seconds(5),
            max_backoff: Duration::minutes(30),
            idle_sleep: Duration::milliseconds(200),
            keep_payloads: false,
        }
    }
}

/// The receiving side of inbox mode. Cheap to clone (clones share the
/// workers' shutdown state).
#[derive(Clone)]
pub struct Inbox {
    processor: WebhookProcessor,
    store: Arc<dyn InboxStore>,
    config: InboxConfig,
    life: Arc<Lifecycle>,
}

/// What [`Inbox::shutdown`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct Stopped {
    /// Events still running at the deadline, cut off.
    pub cancelled: usize,
    /// Claims given back to the ledger: events taken but not started when
    /// the inbox closed, and the ones cut off (see
    /// [`WebhookProcessor::release_held`]).
    pub released: usize,
}

/// The workers' shared shutdown state: closed (take nothing new),
/// cancelled (cut running events off), and how many events are running.
#[derive(Debug, Default)]
struct Lifecycle {
    state: Mutex<LifeState>,
}

#[derive(Debug, Default)]
struct LifeState {
    closed: bool,
    cancelled: bool,
    running: usize,
    /// Released at close, before the shutdown's own release.
    released_at_close: usize,
    waiters: Vec<Waker>,
}

impl Lifecycle {
    fn lock(&self) -> MutexGuard<'_, LifeState> {
        // Nothing here can be left half-updated by a panic.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn wake(state: &mut LifeState) {
        for w in state.waiters.drain(..) {
            w.wake();
        }
    }

    fn set(&self, f: impl FnOnce(&mut LifeState)) {
        let mut state = self.lock();
        f(&mut state);
        Self::wake(&mut state);
    }

    /// Ready when `ready` holds.
    fn until(&self, ready: fn(&LifeState) -> bool) -> impl Future<Output = ()> + '_ {
        std::future::poll_fn(move |cx: &mut Context<'_>| {
            let mut state = self.lock();
            if ready(&state) {
                return Poll::Ready(());
            }
            if !state.waiters.iter().any(|w| w.will_wake(cx.waker())) {
                state.waiters.push(cx.waker().clone());
            }
            Poll::Pending
        })
    }

    /// Counts an event as running until the guard is dropped; `None` once
    /// closed.
    fn enter(self: &Arc<Self>) -> Option<Running> {
        let mut state = self.lock();
        if state.closed {
            return None;
        }
        state.running += 1;
        Some(Running(self.clone()))
    }
}

/// One running event (see [`Lifecycle::enter`]).
struct Running(Arc<Lifecycle>);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.set(|s| s.running = s.running.saturating_sub(1));
    }
}

/// Whether a lease running out at `deadline` has less than seven eighths
/// of `lease` left at `now` (both on the same monotonic clock).
fn needs_renewal(deadline: Instant, now: Instant, lease: Duration) -> bool {
    let full = std::time::Duration::try_from(lease).unwrap_or_default();
    deadline.saturating_duration_since(now) < full.saturating_sub(full / 8)
}

/// Runs `work` unless `stop` completes first (then `work` is dropped at its
/// current await and `None` is returned).
async fn unless<T>(work: impl Future<Output = T>, stop: impl Future<Output = ()>) -> Option<T> {
    let mut work = pin!(work);
    let mut stop = pin!(stop);
    std::future::poll_fn(move |cx| {
        if let Poll::Ready(v) = work.as_mut().poll(cx) {
            return Poll::Ready(Some(v));
        }
        if stop.as_mut().poll(cx).is_ready() {
            return Poll::Ready(None);
        }
        Poll::Pending
    })
    .await
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
            life: Arc::default(),
        }
    }

    /// Stops taking new events: from now on a worker's round takes nothing
    /// ([`Worker::run`] returns after its current event, `run_until_idle`
    /// after its current round), events a worker took but has not started
    /// are given back at once, and events already running go on. Deliveries
    /// are still received and stored ([`Inbox::receive`]); the next process
    /// works them off.
    pub fn close(&self) {
        self.life.set(|s| s.closed = true);
    }

    /// Whether [`Inbox::close`] (or `shutdown`) was called.
    pub fn is_closed(&self) -> bool {
        self.life.lock().closed
    }

    /// Events workers are running now.
    pub fn running(&self) -> usize {
        self.life.lock().running
    }

    /// Stops the inbox gracefully: [`Inbox::close`]s it, waits up to
    /// `deadline` (on the processor's clock) for the running events to
    /// finish, cuts off the ones still running then (their futures are
    /// dropped at their next await; their effects are fenced by the lease,
    /// so a cut-off event is processed again in full by the next worker),
    /// and gives back every claim this inbox's processor still holds with
    /// [`WebhookProcessor::release_held`]: the events become `failed`
    /// without spending an attempt and the next worker takes them at once.
    /// Call it on SIGTERM, then let the workers' tasks end.
    ///
    /// # Errors
    ///
    /// The [`StoreError`] of a release that failed (that claim stays until
    /// its lease runs out).
    pub async fn shutdown(&self, deadline: Duration) -> Result<Stopped, StoreError> {
        self.close();
        let idle = self.life.until(|s| s.running == 0);
        let mut cancelled = 0;
        if unless(idle, self.processor.clock().sleep(deadline))
            .await
            .is_none()
        {
            self.life.set(|s| {
                cancelled = s.running;
                s.cancelled = true;
            });
            // Cut-off events stop at their next await; give their workers
            // a moment to drop them, so that nothing settles after the
            // release.
            let idle = self.life.until(|s| s.running == 0);
            let _ = unless(
                idle,
                self.processor.clock().sleep(Duration::milliseconds(500)),
            )
            .await;
        }
        let released = self.processor.release_held().await?;
        let at_close = std::mem::take(&mut self.life.lock().released_at_close);
        Ok(Stopped {
            cancelled,
            released: released + at_close,
        })
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
    /// Takes up to [`InboxConfig::batch`] events and processes them,
    /// [`InboxConfig::concurrency`] at a time (one after another by
    /// default). An event that had to wait for its turn and whose lease has
    /// less than seven eighths of its length left has it renewed to the
    /// full lease just before it runs, so every event of a batch starts with
    /// at least seven eighths of the lease: slow events never eat into a
    /// later event's lease, and a batch of fast events costs no renewal
    /// round trips. An event whose lease was taken over meanwhile (it ran
    /// out and another worker took it) is left to that worker.
    ///
    /// # Errors
    ///
    /// [`StoreError`] when taking from the store fails; failures of single
    /// events are retried or dead-lettered instead.
    pub async fn run_once(&self) -> Result<RoundStats, StoreError> {
        let inbox = &self.inbox;
        if inbox.is_closed() {
            return Ok(RoundStats::default());
        }
        let p = &inbox.processor;
        let held = p.held();
        // Read before the store's clock is: a deadline derived from it
        // never outlasts the lease the store grants.
        let asked = p.clock().monotonic();
        let items = inbox
            .store
            .take(inbox.config.batch, p.lease_duration(), p.max_attempts())
            .await?;
        // Registered until settled, so that a shutdown (or a worker task
        // aborted by the application) gives back what it took.
        let now = p.clock().monotonic();
        for item in &items {
            held.hold(&item.lease, item.lease.deadline(asked), now);
        }
        let taken = items.len();
        let concurrency = inbox.config.concurrency.clamp(1, taken.max(1));
        let permits = Arc::new(Semaphore::new(concurrency));
        let runs: Vec<BoxedFuture<RoundStats>> = items
            .into_iter()
            .enumerate()
            .map(|(i, item)| -> BoxedFuture<RoundStats> {
                let (worker, permits) = (self.clone(), permits.clone());
                Box::pin(async move {
                    let _permit = permits.acquire().await;
                    worker.start_item(i > 0, item, asked).await
                })
            })
            .collect();
        let mut stats = RoundStats {
            taken,
            ..RoundStats::default()
        };
        for round in join_all(runs).await {
            stats.processed += round.processed;
            stats.retried += round.retried;
            stats.dead += round.dead;
        }
        Ok(stats)
    }

    /// Starts one taken event (`asked`: the monotonic time read before the
    /// take): gives it back when the inbox closed meanwhile, renews its
    /// lease when it waited (`waited`: not the round's first) and less than
    /// seven eighths is left, then runs it.
    async fn start_item(&self, waited: bool, mut item: InboxItem, asked: Instant) -> RoundStats {
        let inbox = &self.inbox;
        let p = &inbox.processor;
        let mut stats = RoundStats::default();
        let Some(running) = inbox.life.enter() else {
            // Closed meanwhile: what was not started goes back now.
            self.give_back(std::iter::once(item)).await;
            return stats;
        };
        let mut deadline = item.lease.deadline(asked);
        if waited && needs_renewal(deadline, p.clock().monotonic(), p.lease_duration()) {
            let asked = p.clock().monotonic();
            match inbox.store.renew(&item.lease, p.lease_duration()).await {
                Ok(lease) => {
                    deadline = lease.deadline(asked);
                    p.held().hold(&lease, deadline, p.clock().monotonic());
                    item.lease = lease;
                }
                // Taken over by another worker: theirs now.
                Err(e) if e.kind() == StoreErrorKind::LeaseLost => {
                    p.held().settle(&item.lease);
                    return stats;
                }
                // The store could not renew: run with the time left (the
                // pipeline checks the deadline before the handler runs).
                Err(_) => {}
            }
        }
        self.run_item(item, deadline, &mut stats).await;
        drop(running);
        stats
    }

    /// Gives back taken events that were not started (the inbox closed):
    /// released without spending an attempt. One that cannot be released
    /// now stays registered for the shutdown's release.
    async fn give_back(&self, items: impl Iterator<Item = InboxItem>) {
        let inbox = &self.inbox;
        for item in items {
            match inbox.store.release(&item.lease).await {
                Ok(()) => {
                    inbox.processor.held().settle(&item.lease);
                    inbox.life.lock().released_at_close += 1;
                }
                Err(e) if e.kind() == StoreErrorKind::LeaseLost => {
                    inbox.processor.held().settle(&item.lease);
                }
                Err(_) => {}
            }
        }
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
                p.held().settle(&item.lease);
                stats.dead += 1;
                return;
            }
        };
        let work = p.run_claimed(&event, Some(&item.payload), &item.lease, deadline);
        // Cut off at the shutdown deadline: the claim stays registered and
        // the shutdown gives it back.
        let Some(outcome) = unless(work, inbox.life.until(|s| s.cancelled)).await else {
            return;
        };
        p.held().settle(&item.lease);
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

    /// Runs until `shutdown` completes or the inbox is closed
    /// ([`Inbox::close`], [`Inbox::shutdown`]), sleeping on the processor's
    /// clock when idle. A round in progress finishes before it returns
    /// (after a close, the round's events not yet started are given back;
    /// see [`Inbox::shutdown`] to bound the wait for the running one).
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
            if poll_now(shutdown.as_mut()) || self.inbox.is_closed() {
                return last_error.map_or(Ok(()), Err);
            }
            match self.run_once().await {
                Ok(round) if round.taken > 0 => last_error = None,
                Ok(_) => self.idle().await,
                Err(e) => {
                    last_error = Some(e);
                    self.idle().await;
                }
            }
        }
    }

    /// The idle sleep, cut short when the inbox closes.
    async fn idle(&self) {
        let inbox = &self.inbox;
        let sleep = inbox.processor.clock().sleep(inbox.config.idle_sleep);
        let _ = unless(sleep, inbox.life.until(|s| s.closed)).await;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_is_renewed_below_seven_eighths_of_its_length() {
        let now = Instant::now();
        let lease = Duration::seconds(80);
        let at = |s| now + std::time::Duration::from_secs(s);
        assert!(!needs_renewal(at(80), now, lease), "full");
        assert!(!needs_renewal(at(70), now, lease), "exactly 7/8 left");
        assert!(needs_renewal(at(69), now, lease), "less than 7/8 left");
        assert!(needs_renewal(now, at(5), lease), "run out");
    }
}
