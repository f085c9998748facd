//! The in-memory store: always compiled, the embedded default, and the
//! reference the conformance suite is written against.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::ops::Bound;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use async_trait::async_trait;
use time::{Duration, OffsetDateTime};

use super::{
    CursorStore, EnqueueOutcome, EventLedger, InboxItem, InboxRequest, InboxStore, StoreError,
    StoreErrorKind, SubscriptionQuery, SubscriptionStore,
};
use crate::clock::{Clock, SystemClock};
use crate::ledger::{
    ClaimDecision, ClaimOutcome, ClaimRequest, EventKey, FailOutcome, Failure, IgnoreOutcome,
    IgnoreRequest, Lease, LeaseToken, LedgerEntry, LedgerQuery, LedgerState, check_completion,
    check_fence, decide_claim, lease_is_live, state_after_failure,
};
use crate::subscription::{CustomerEntitlements, SubscriptionRecord};

/// Everything in process memory behind one mutex (never held across an
/// `await`). Safe to share between tasks and threads (`Arc<MemoryStore>`).
/// Lease expiry uses the store's [`Clock`] (the system clock by default).
///
/// ```
/// use std::sync::Arc;
/// use stripe_webhook_guard::store::MemoryStore;
/// let store = Arc::new(MemoryStore::new());
/// # let _ = store;
/// ```
pub struct MemoryStore {
    inner: Mutex<Inner>,
    clock: Arc<dyn Clock>,
    next_token: AtomicU64,
}

#[derive(Default)]
struct Inner {
    /// Hashed, not ordered: every delivery looks its key up two to four
    /// times, and a lookup must not grow with the ledger; `list` sorts what
    /// it returns.
    ledger: HashMap<EventKey, LedgerEntry>,
    subscriptions: BTreeMap<String, SubscriptionRecord>,
    by_customer: HashMap<String, BTreeSet<String>>,
    by_reference: HashMap<String, BTreeSet<String>>,
    entitlements: HashMap<String, CustomerEntitlements>,
    cursors: HashMap<String, String>,
}

impl Inner {
    /// The records whose ids an index entry lists.
    fn records(&self, ids: Option<&BTreeSet<String>>) -> Vec<SubscriptionRecord> {
        ids.into_iter()
            .flatten()
            .filter_map(|id| self.subscriptions.get(id).cloned())
            .collect()
    }
}

/// A query's `limit`, where 0 means no limit.
fn no_limit_if_zero(limit: usize) -> usize {
    if limit == 0 { usize::MAX } else { limit }
}

impl fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let inner = self.lock();
        f.debug_struct("MemoryStore")
            .field("events", &inner.ledger.len())
            .field("subscriptions", &inner.subscriptions.len())
            .finish_non_exhaustive()
    }
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryStore {
    /// An empty store on the system clock.
    pub fn new() -> Self {
        Self::with_clock(Arc::new(SystemClock))
    }

    /// An empty store whose leases expire on `clock`.
    pub fn with_clock(clock: Arc<dyn Clock>) -> Self {
        Self {
            inner: Mutex::new(Inner::default()),
            clock,
            next_token: AtomicU64::new(1),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave an entry half-written:
        // every mutation below is a single insert or field assignment.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn token(&self) -> LeaseToken {
        LeaseToken(self.next_token.fetch_add(1, Ordering::Relaxed))
    }

    /// Number of ledger entries in each state (for stats and tests).
    pub fn ledger_counts(&self) -> BTreeMap<&'static str, usize> {
        let inner = self.lock();
        let mut out = BTreeMap::new();
        for e in inner.ledger.values() {
            *out.entry(e.state.as_str()).or_insert(0) += 1;
        }
        out
    }

    /// Every subscription record (for tests and demos).
    pub fn all_subscriptions(&self) -> Vec<SubscriptionRecord> {
        self.lock().subscriptions.values().cloned().collect()
    }

    fn lease_for(
        &self,
        key: &EventKey,
        attempt: u32,
        lease: Duration,
        now: OffsetDateTime,
    ) -> Lease {
        let expires_at = now.saturating_add(lease);
        Lease {
            key: key.clone(),
            token: self.token(),
            attempt,
            expires_at,
            remaining: expires_at - now,
        }
    }

    fn new_entry(request: &ClaimRequest, state: LedgerState, now: OffsetDateTime) -> LedgerEntry {
        LedgerEntry {
            key: request.key.clone(),
            event_type: request.event_type.clone(),
            event_created: request.event_created,
            fingerprint: request.fingerprint,
            state,
            attempts: 0,
            lease_token: None,
            lease_expires_at: None,
            last_error: None,
            ignore_reason: None,
            payload: None,
            subscription_id: None,
            available_at: None,
            first_seen_at: now,
            updated_at: now,
        }
    }

    /// Applies a claim decision to the map; shared by `claim` and `take`.
    fn claim_locked(
        &self,
        inner: &mut Inner,
        request: &ClaimRequest,
        now: OffsetDateTime,
    ) -> ClaimOutcome {
        let existing = inner.ledger.get(&request.key);
        match decide_claim(existing, &request.fingerprint, now, request.max_attempts) {
            ClaimDecision::Insert => {
                let lease = self.lease_for(&request.key, 1, request.lease, now);
                let mut entry = Self::new_entry(request, LedgerState::Processing, now);
                entry.attempts = 1;
                entry.lease_token = Some(lease.token);
                entry.lease_expires_at = Some(lease.expires_at);
                inner.ledger.insert(request.key.clone(), entry);
                ClaimOutcome::Claimed(lease)
            }
            ClaimDecision::Reclaim { attempt } => {
                let lease = self.lease_for(&request.key, attempt, request.lease, now);
                if let Some(entry) = inner.ledger.get_mut(&request.key) {
                    entry.state = LedgerState::Processing;
                    entry.attempts = attempt;
                    entry.lease_token = Some(lease.token);
                    entry.lease_expires_at = Some(lease.expires_at);
                    entry.updated_at = now;
                }
                ClaimOutcome::Claimed(lease)
            }
            ClaimDecision::Duplicate(state) => ClaimOutcome::Duplicate { state },
            ClaimDecision::InFlight { until } => ClaimOutcome::InFlight { until },
            ClaimDecision::Conflict => ClaimOutcome::Conflict {
                stored: existing.map_or(request.fingerprint, |e| e.fingerprint),
            },
            ClaimDecision::ExpireToDead => {
                let mut attempts = 0;
                if let Some(entry) = inner.ledger.get_mut(&request.key) {
                    entry.state = LedgerState::Dead;
                    entry.lease_expires_at = None;
                    entry.last_error = Some(format!(
                        "lease expired on attempt {} of {}: the worker never finished",
                        entry.attempts, request.max_attempts
                    ));
                    entry.updated_at = now;
                    attempts = entry.attempts;
                }
                ClaimOutcome::DeadLettered { attempts }
            }
        }
    }

    fn fenced<'a>(inner: &'a mut Inner, lease: &Lease) -> Result<&'a mut LedgerEntry, StoreError> {
        let entry = inner
            .ledger
            .get_mut(&lease.key)
            .ok_or_else(|| StoreError::new(StoreErrorKind::NotFound, "no ledger entry"))?;
        check_fence(entry, lease)
            .map_err(|e| StoreError::new(StoreErrorKind::LeaseLost, e.to_string()))?;
        Ok(entry)
    }

    fn index(inner: &mut Inner, old: Option<&SubscriptionRecord>, new: &SubscriptionRecord) {
        if let Some(old) = old {
            if let Some(c) = &old.state.customer
                && let Some(set) = inner.by_customer.get_mut(c)
            {
                set.remove(&old.id);
            }
            if let Some(r) = &old.client_reference_id
                && let Some(set) = inner.by_reference.get_mut(r)
            {
                set.remove(&old.id);
            }
        }
        if let Some(c) = &new.state.customer {
            inner
                .by_customer
                .entry(c.clone())
                .or_default()
                .insert(new.id.clone());
        }
        if let Some(r) = &new.client_reference_id {
            inner
                .by_reference
                .entry(r.clone())
                .or_default()
                .insert(new.id.clone());
        }
    }
}

#[async_trait]
impl EventLedger for MemoryStore {
    async fn claim(&self, request: &ClaimRequest) -> Result<ClaimOutcome, StoreError> {
        let now = self.clock.now();
        let mut inner = self.lock();
        Ok(self.claim_locked(&mut inner, request, now))
    }

    async fn settled_state(
        &self,
        request: &ClaimRequest,
    ) -> Result<Option<LedgerState>, StoreError> {
        let inner = self.lock();
        Ok(inner
            .ledger
            .get(&request.key)
            .filter(|e| e.fingerprint == request.fingerprint && e.state.is_settled())
            .map(|e| e.state))
    }

    async fn complete(&self, lease: &Lease) -> Result<(), StoreError> {
        let now = self.clock.now();
        let mut inner = self.lock();
        let entry = inner
            .ledger
            .get_mut(&lease.key)
            .ok_or_else(|| StoreError::new(StoreErrorKind::NotFound, "no ledger entry"))?;
        let pending = check_completion(entry, lease)
            .map_err(|e| StoreError::new(StoreErrorKind::LeaseLost, e.to_string()))?;
        if !pending {
            return Ok(());
        }
        entry.state = LedgerState::Processed;
        entry.lease_expires_at = None;
        entry.payload = None;
        entry.last_error = None;
        entry.updated_at = now;
        Ok(())
    }

    async fn fail(&self, lease: &Lease, failure: &Failure) -> Result<FailOutcome, StoreError> {
        let now = self.clock.now();
        let mut inner = self.lock();
        let entry = Self::fenced(&mut inner, lease)?;
        let state = state_after_failure(entry.attempts, failure.max_attempts, failure.retryable);
        entry.state = state;
        entry.lease_expires_at = None;
        entry.last_error = Some(failure.error.clone());
        if failure.payload.is_some() {
            entry.payload.clone_from(&failure.payload);
        }
        entry.updated_at = now;
        Ok(match state {
            LedgerState::Dead => FailOutcome::Dead {
                attempts: entry.attempts,
            },
            _ => FailOutcome::Failed {
                attempts: entry.attempts,
            },
        })
    }

    async fn release(&self, lease: &Lease) -> Result<(), StoreError> {
        let now = self.clock.now();
        let mut inner = self.lock();
        let entry = Self::fenced(&mut inner, lease)?;
        entry.state = LedgerState::Failed;
        entry.attempts = entry.attempts.saturating_sub(1);
        entry.lease_expires_at = None;
        entry.last_error = Some("released before completion (shutdown)".to_owned());
        entry.updated_at = now;
        Ok(())
    }

    async fn ignore(&self, request: &IgnoreRequest) -> Result<IgnoreOutcome, StoreError> {
        let now = self.clock.now();
        let mut inner = self.lock();
        if let Some(e) = inner.ledger.get(&request.key) {
            return Ok(IgnoreOutcome::Known(e.state));
        }
        let mut entry = LedgerEntry {
            key: request.key.clone(),
            event_type: request.event_type.clone(),
            event_created: request.event_created,
            fingerprint: request.fingerprint,
            state: LedgerState::Ignored,
            attempts: 0,
            lease_token: None,
            lease_expires_at: None,
            last_error: None,
            ignore_reason: None,
            payload: None,
            subscription_id: None,
            available_at: None,
            first_seen_at: now,
            updated_at: now,
        };
        entry.ignore_reason = Some(request.reason.clone());
        inner.ledger.insert(request.key.clone(), entry);
        Ok(IgnoreOutcome::Recorded)
    }

    async fn get(&self, key: &EventKey) -> Result<Option<LedgerEntry>, StoreError> {
        Ok(self.lock().ledger.get(key).cloned())
    }

    async fn list(&self, query: &LedgerQuery) -> Result<Vec<LedgerEntry>, StoreError> {
        let inner = self.lock();
        let mut matching: Vec<&LedgerEntry> =
            inner.ledger.values().filter(|e| query.matches(e)).collect();
        matching.sort_unstable_by(|a, b| a.key.cmp(&b.key));
        matching.truncate(no_limit_if_zero(query.limit));
        Ok(matching.into_iter().cloned().collect())
    }

    async fn requeue(&self, key: &EventKey) -> Result<bool, StoreError> {
        let now = self.clock.now();
        let mut inner = self.lock();
        match inner.ledger.get_mut(key) {
            Some(e) if matches!(e.state, LedgerState::Dead | LedgerState::Failed) => {
                e.state = LedgerState::Failed;
                e.attempts = 0;
                e.available_at = None;
                e.updated_at = now;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    async fn prune(&self, before: OffsetDateTime) -> Result<u64, StoreError> {
        let mut inner = self.lock();
        let n = inner.ledger.len();
        inner.ledger.retain(|_, e| {
            !(matches!(e.state, LedgerState::Processed | LedgerState::Ignored)
                && e.updated_at < before)
        });
        Ok((n - inner.ledger.len()) as u64)
    }
}

#[async_trait]
impl SubscriptionStore for MemoryStore {
    async fn load(&self, id: &str) -> Result<Option<SubscriptionRecord>, StoreError> {
        Ok(self.lock().subscriptions.get(id).cloned())
    }

    async fn save(&self, record: &SubscriptionRecord) -> Result<u64, StoreError> {
        let mut inner = self.lock();
        let stored = inner.subscriptions.get(&record.id).map_or(0, |r| r.version);
        if stored != record.version {
            return Err(StoreError::new(
                StoreErrorKind::Conflict,
                format!(
                    "subscription {} is at version {stored}, not {}",
                    record.id, record.version
                ),
            ));
        }
        // One clone of the record; the key and the indexes are only
        // touched when the record is new or its customer or reference
        // changed.
        let version = record.version + 1;
        let mut saved = record.clone();
        saved.version = version;
        let inner = &mut *inner;
        if let Some(slot) = inner.subscriptions.get_mut(&record.id) {
            let old = std::mem::replace(slot, saved);
            if old.state.customer != record.state.customer
                || old.client_reference_id != record.client_reference_id
            {
                Self::index(inner, Some(&old), record);
            }
        } else {
            inner.subscriptions.insert(record.id.clone(), saved);
            Self::index(inner, None, record);
        }
        Ok(version)
    }

    async fn find_by_customer(
        &self,
        customer: &str,
    ) -> Result<Vec<SubscriptionRecord>, StoreError> {
        let inner = self.lock();
        Ok(inner.records(inner.by_customer.get(customer)))
    }

    async fn find_by_client_reference(
        &self,
        reference: &str,
    ) -> Result<Vec<SubscriptionRecord>, StoreError> {
        let inner = self.lock();
        Ok(inner.records(inner.by_reference.get(reference)))
    }

    async fn list_subscriptions(
        &self,
        query: &SubscriptionQuery,
    ) -> Result<Vec<SubscriptionRecord>, StoreError> {
        let inner = self.lock();
        // From the page's start: a page costs its own records, not all
        // those before it (paging through n records stays linear).
        let from = query
            .after
            .clone()
            .map_or(Bound::Unbounded, Bound::Excluded);
        Ok(inner
            .subscriptions
            .range((from, Bound::Unbounded))
            .map(|(_, r)| r)
            .filter(|r| query.matches(r))
            .take(no_limit_if_zero(query.limit))
            .cloned()
            .collect())
    }

    async fn load_entitlements(
        &self,
        customer: &str,
    ) -> Result<Option<CustomerEntitlements>, StoreError> {
        Ok(self.lock().entitlements.get(customer).cloned())
    }

    async fn save_entitlements(
        &self,
        entitlements: &CustomerEntitlements,
    ) -> Result<u64, StoreError> {
        let mut inner = self.lock();
        let stored = inner
            .entitlements
            .get(&entitlements.customer)
            .map_or(0, |e| e.version);
        if stored != entitlements.version {
            return Err(StoreError::new(
                StoreErrorKind::Conflict,
                "entitlements were saved by another writer",
            ));
        }
        let mut saved = entitlements.clone();
        saved.version += 1;
        let v = saved.version;
        inner.entitlements.insert(saved.customer.clone(), saved);
        Ok(v)
    }
}

#[async_trait]
impl CursorStore for MemoryStore {
    async fn load_cursor(&self, name: &str) -> Result<Option<String>, StoreError> {
        Ok(self.lock().cursors.get(name).cloned())
    }

    async fn save_cursor(&self, name: &str, value: &str) -> Result<(), StoreError> {
        self.lock()
            .cursors
            .insert(name.to_owned(), value.to_owned());
        Ok(())
    }
}

#[async_trait]
impl InboxStore for MemoryStore {
    async fn enqueue(&self, request: &InboxRequest) -> Result<EnqueueOutcome, StoreError> {
        let now = self.clock.now();
        let mut inner = self.lock();
        if let Some(e) = inner.ledger.get_mut(&request.claim.key) {
            if e.fingerprint != request.claim.fingerprint {
                return Ok(EnqueueOutcome::Conflict);
            }
            // An unsettled entry without a payload (claimed by a synchronous
            // delivery) gets this one, so a worker can take it over once the
            // lease expires.
            let unsettled = matches!(
                e.state,
                LedgerState::Pending | LedgerState::Processing | LedgerState::Failed
            );
            if unsettled && e.payload.is_none() {
                e.payload = Some(request.payload.clone());
                if e.subscription_id.is_none() {
                    e.subscription_id.clone_from(&request.subscription_id);
                }
            }
            return Ok(EnqueueOutcome::Duplicate { state: e.state });
        }
        let mut entry = Self::new_entry(&request.claim, LedgerState::Pending, now);
        entry.payload = Some(request.payload.clone());
        entry.subscription_id.clone_from(&request.subscription_id);
        inner.ledger.insert(request.claim.key.clone(), entry);
        Ok(EnqueueOutcome::Queued)
    }

    async fn take(
        &self,
        limit: usize,
        lease: Duration,
        max_attempts: u32,
    ) -> Result<Vec<InboxItem>, StoreError> {
        let now = self.clock.now();
        let mut inner = self.lock();
        // Subscriptions with an event in processing are off limits.
        let busy: BTreeSet<String> = inner
            .ledger
            .values()
            .filter(|e| lease_is_live(e, now))
            .filter_map(|e| e.subscription_id.clone())
            .collect();
        let mut candidates: Vec<&LedgerEntry> = inner
            .ledger
            .values()
            .filter(|e| e.payload.is_some())
            .filter(|e| match e.state {
                LedgerState::Pending | LedgerState::Failed => true,
                LedgerState::Processing => !lease_is_live(e, now),
                _ => false,
            })
            .filter(|e| e.available_at.is_none_or(|a| a <= now))
            .collect();
        candidates.sort_by(|a, b| (a.event_created, &a.key).cmp(&(b.event_created, &b.key)));
        let mut chosen_subs = busy;
        let mut keys = Vec::new();
        for e in candidates {
            if keys.len() >= limit {
                break;
            }
            if let Some(s) = &e.subscription_id
                && !chosen_subs.insert(s.clone())
            {
                continue;
            }
            keys.push(e.key.clone());
        }
        let mut out = Vec::with_capacity(keys.len());
        for key in keys {
            let Some(e) = inner.ledger.get(&key) else {
                continue;
            };
            let request = ClaimRequest {
                key: key.clone(),
                event_type: e.event_type.clone(),
                event_created: e.event_created,
                fingerprint: e.fingerprint,
                lease,
                max_attempts,
            };
            let payload = e.payload.clone().unwrap_or_default();
            let subscription_id = e.subscription_id.clone();
            if let ClaimOutcome::Claimed(l) = self.claim_locked(&mut inner, &request, now) {
                out.push(InboxItem {
                    lease: l,
                    payload,
                    subscription_id,
                });
            }
        }
        Ok(out)
    }

    async fn renew(&self, lease: &Lease, lease_for: Duration) -> Result<Lease, StoreError> {
        let now = self.clock.now();
        let mut inner = self.lock();
        let entry = Self::fenced(&mut inner, lease)?;
        let expires_at = now.saturating_add(lease_for);
        entry.lease_expires_at = Some(expires_at);
        entry.updated_at = now;
        Ok(Lease {
            expires_at,
            remaining: expires_at - now,
            ..lease.clone()
        })
    }

    async fn retry_after(&self, key: &EventKey, delay: Duration) -> Result<(), StoreError> {
        let at = self.clock.now().saturating_add(delay);
        if let Some(e) = self.lock().ledger.get_mut(key) {
            e.available_at = Some(at);
        }
        Ok(())
    }

    async fn keep_payload(&self, key: &EventKey, payload: &str) -> Result<(), StoreError> {
        if let Some(e) = self.lock().ledger.get_mut(key)
            && e.state == LedgerState::Processed
        {
            e.payload = Some(payload.to_owned());
        }
        Ok(())
    }

    async fn backlog(&self) -> Result<u64, StoreError> {
        let inner = self.lock();
        Ok(inner
            .ledger
            .values()
            .filter(|e| {
                matches!(
                    e.state,
                    LedgerState::Pending | LedgerState::Processing | LedgerState::Failed
                )
            })
            .count() as u64)
    }
}
