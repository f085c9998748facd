//! Implementing the store traits over an application's own storage.
//!
//! ```text
//! cargo run --example custom_store
//! ```
//!
//! The application here keeps everything in a key-value store (think Redis
//! or DynamoDB) with one primitive: compare-and-swap on a key. That is all
//! the ledger and the subscription store need, because the rules themselves
//! are pure functions in `stripe_webhook_guard::ledger` (`decide_claim`,
//! `check_fence`, `check_completion`, `state_after_failure`): a store only
//! has to apply their decision atomically per key.
//!
//! A real implementation should also run the conformance suite (feature
//! `test-util`), which checks every rule:
//!
//! ```ignore
//! stripe_webhook_guard::store_conformance_tests!(my_store, {
//!     let clock = std::sync::Arc::new(stripe_webhook_guard::clock::SystemClock);
//!     (std::sync::Arc::new(MyStore::connect().await), clock)
//! });
//! ```

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};

use async_trait::async_trait;
use stripe_webhook_guard::clock::{Clock, SystemClock};
use stripe_webhook_guard::ledger::{
    ClaimDecision, ClaimOutcome, ClaimRequest, EventKey, FailOutcome, Failure, IgnoreOutcome,
    IgnoreRequest, Lease, LeaseToken, LedgerEntry, LedgerQuery, LedgerState, check_completion,
    check_fence, decide_claim, state_after_failure,
};
use stripe_webhook_guard::processor::WebhookProcessor;
use stripe_webhook_guard::signature::{Verifier, WebhookSecret, test_header};
use stripe_webhook_guard::store::{
    CursorStore, EventLedger, StoreError, StoreErrorKind, SubscriptionQuery, SubscriptionStore,
};
use stripe_webhook_guard::subscription::{CustomerEntitlements, SubscriptionRecord};
use time::OffsetDateTime;

/// The application's storage: bytes under keys, with a version per key and
/// compare-and-swap. (Here in memory; the shape is what matters.)
#[derive(Default)]
struct KvStore {
    data: Mutex<BTreeMap<String, (u64, Vec<u8>)>>,
}

impl KvStore {
    fn get(&self, key: &str) -> Option<(u64, Vec<u8>)> {
        self.data
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(key)
            .cloned()
    }

    /// Writes `value` if the key is still at `version` (0: absent).
    fn cas(&self, key: &str, version: u64, value: Vec<u8>) -> bool {
        let mut data = self.data.lock().unwrap_or_else(PoisonError::into_inner);
        let current = data.get(key).map_or(0, |(v, _)| *v);
        if current != version {
            return false;
        }
        data.insert(key.to_owned(), (version + 1, value));
        true
    }

    fn scan(&self, prefix: &str) -> Vec<(String, Vec<u8>)> {
        let data = self.data.lock().unwrap_or_else(PoisonError::into_inner);
        data.range(prefix.to_owned()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, (_, v))| (k.clone(), v.clone()))
            .collect()
    }
}

/// The adapter: the crate's traits over `KvStore`.
struct AppStore {
    kv: KvStore,
    clock: Arc<dyn Clock>,
    tokens: std::sync::atomic::AtomicU64,
}

fn corrupt(e: &serde_json::Error) -> StoreError {
    StoreError::new(StoreErrorKind::Corrupt, format!("undecodable value: {e}"))
}

fn ledger_key(key: &EventKey) -> String {
    format!(
        "ledger/{}/{}",
        key.account.as_deref().unwrap_or(""),
        key.event_id
    )
}

impl AppStore {
    fn load_entry(&self, key: &EventKey) -> Result<Option<(u64, LedgerEntry)>, StoreError> {
        match self.kv.get(&ledger_key(key)) {
            None => Ok(None),
            Some((v, bytes)) => Ok(Some((
                v,
                serde_json::from_slice(&bytes).map_err(|e| corrupt(&e))?,
            ))),
        }
    }

    /// Read, decide with a pure rule, compare-and-swap; retry on a race.
    fn update<T>(
        &self,
        key: &EventKey,
        mut decide: impl FnMut(Option<LedgerEntry>) -> Result<(Option<LedgerEntry>, T), StoreError>,
    ) -> Result<T, StoreError> {
        for _ in 0..16 {
            let (version, entry) = match self.load_entry(key)? {
                Some((v, e)) => (v, Some(e)),
                None => (0, None),
            };
            let (next, answer) = decide(entry)?;
            let Some(next) = next else { return Ok(answer) };
            let bytes = serde_json::to_vec(&next).map_err(|e| corrupt(&e))?;
            if self.kv.cas(&ledger_key(key), version, bytes) {
                return Ok(answer);
            }
        }
        Err(StoreError::new(
            StoreErrorKind::Unavailable,
            "too much contention",
        ))
    }
}

#[async_trait]
impl EventLedger for AppStore {
    async fn claim(&self, request: &ClaimRequest) -> Result<ClaimOutcome, StoreError> {
        let now = self.clock.now();
        self.update(&request.key, |entry| {
            let token = LeaseToken(
                self.tokens
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            );
            let expires_at = now + request.lease;
            let lease = |attempt| Lease {
                key: request.key.clone(),
                token,
                attempt,
                expires_at,
                remaining: request.lease,
            };
            Ok(
                match decide_claim(
                    entry.as_ref(),
                    &request.fingerprint,
                    now,
                    request.max_attempts,
                ) {
                    ClaimDecision::Insert => {
                        let e = LedgerEntry {
                            key: request.key.clone(),
                            event_type: request.event_type.clone(),
                            event_created: request.event_created,
                            fingerprint: request.fingerprint,
                            state: LedgerState::Processing,
                            attempts: 1,
                            lease_token: Some(token),
                            lease_expires_at: Some(expires_at),
                            last_error: None,
                            ignore_reason: None,
                            payload: None,
                            subscription_id: None,
                            available_at: None,
                            first_seen_at: now,
                            updated_at: now,
                        };
                        (Some(e), ClaimOutcome::Claimed(lease(1)))
                    }
                    ClaimDecision::Reclaim { attempt } => {
                        let mut e = entry.unwrap_or_else(|| unreachable!("reclaim needs an entry"));
                        e.state = LedgerState::Processing;
                        e.attempts = attempt;
                        e.lease_token = Some(token);
                        e.lease_expires_at = Some(expires_at);
                        e.updated_at = now;
                        (Some(e), ClaimOutcome::Claimed(lease(attempt)))
                    }
                    ClaimDecision::Duplicate(state) => (None, ClaimOutcome::Duplicate { state }),
                    ClaimDecision::InFlight { until } => (None, ClaimOutcome::InFlight { until }),
                    ClaimDecision::Conflict => {
                        let stored = entry.map_or(request.fingerprint, |e| e.fingerprint);
                        (None, ClaimOutcome::Conflict { stored })
                    }
                    ClaimDecision::ExpireToDead => {
                        let mut e = entry.unwrap_or_else(|| unreachable!("expiry needs an entry"));
                        e.state = LedgerState::Dead;
                        e.last_error = Some("lease expired on the last attempt".into());
                        let attempts = e.attempts;
                        (Some(e), ClaimOutcome::DeadLettered { attempts })
                    }
                },
            )
        })
    }

    async fn complete(&self, lease: &Lease) -> Result<(), StoreError> {
        let now = self.clock.now();
        self.update(&lease.key, |entry| {
            let mut e =
                entry.ok_or_else(|| StoreError::new(StoreErrorKind::NotFound, "no entry"))?;
            let pending = check_completion(&e, lease)
                .map_err(|f| StoreError::new(StoreErrorKind::LeaseLost, f.to_string()))?;
            if !pending {
                return Ok((None, ()));
            }
            e.state = LedgerState::Processed;
            e.payload = None;
            e.updated_at = now;
            Ok((Some(e), ()))
        })
    }

    async fn fail(&self, lease: &Lease, failure: &Failure) -> Result<FailOutcome, StoreError> {
        let now = self.clock.now();
        self.update(&lease.key, |entry| {
            let mut e =
                entry.ok_or_else(|| StoreError::new(StoreErrorKind::NotFound, "no entry"))?;
            check_fence(&e, lease)
                .map_err(|f| StoreError::new(StoreErrorKind::LeaseLost, f.to_string()))?;
            e.state = state_after_failure(e.attempts, failure.max_attempts, failure.retryable);
            e.last_error = Some(failure.error.clone());
            e.payload.clone_from(&failure.payload);
            e.updated_at = now;
            let out = if e.state == LedgerState::Dead {
                FailOutcome::Dead {
                    attempts: e.attempts,
                }
            } else {
                FailOutcome::Failed {
                    attempts: e.attempts,
                }
            };
            Ok((Some(e), out))
        })
    }

    async fn release(&self, lease: &Lease) -> Result<(), StoreError> {
        self.update(&lease.key, |entry| {
            let mut e =
                entry.ok_or_else(|| StoreError::new(StoreErrorKind::NotFound, "no entry"))?;
            check_fence(&e, lease)
                .map_err(|f| StoreError::new(StoreErrorKind::LeaseLost, f.to_string()))?;
            e.state = LedgerState::Failed;
            e.attempts = e.attempts.saturating_sub(1);
            Ok((Some(e), ()))
        })
    }

    async fn ignore(&self, request: &IgnoreRequest) -> Result<IgnoreOutcome, StoreError> {
        let now: OffsetDateTime = self.clock.now();
        self.update(&request.key, |entry| {
            if let Some(e) = entry {
                return Ok((None, IgnoreOutcome::Known(e.state)));
            }
            let e = LedgerEntry {
                key: request.key.clone(),
                event_type: request.event_type.clone(),
                event_created: request.event_created,
                fingerprint: request.fingerprint,
                state: LedgerState::Ignored,
                attempts: 0,
                lease_token: None,
                lease_expires_at: None,
                last_error: None,
                ignore_reason: Some(request.reason.clone()),
                payload: None,
                subscription_id: None,
                available_at: None,
                first_seen_at: now,
                updated_at: now,
            };
            Ok((Some(e), IgnoreOutcome::Recorded))
        })
    }

    async fn get(&self, key: &EventKey) -> Result<Option<LedgerEntry>, StoreError> {
        Ok(self.load_entry(key)?.map(|(_, e)| e))
    }

    async fn list(&self, query: &LedgerQuery) -> Result<Vec<LedgerEntry>, StoreError> {
        let mut out: Vec<LedgerEntry> = self
            .kv
            .scan("ledger/")
            .into_iter()
            .filter_map(|(_, v)| serde_json::from_slice(&v).ok())
            .filter(|e| query.matches(e))
            .collect();
        out.sort_by(|a, b| a.key.cmp(&b.key));
        out.truncate(if query.limit == 0 {
            usize::MAX
        } else {
            query.limit
        });
        Ok(out)
    }

    async fn requeue(&self, key: &EventKey) -> Result<bool, StoreError> {
        self.update(key, |entry| match entry {
            Some(mut e) if matches!(e.state, LedgerState::Dead | LedgerState::Failed) => {
                e.state = LedgerState::Failed;
                e.attempts = 0;
                Ok((Some(e), true))
            }
            _ => Ok((None, false)),
        })
    }

    async fn prune(&self, _before: OffsetDateTime) -> Result<u64, StoreError> {
        // A KV store with TTLs would set one on completion instead.
        Ok(0)
    }
}

/// The reconciler's position in `/v1/events`: one key per cursor, written
/// over (no race to arbitrate: one reconciler owns each cursor).
#[async_trait]
impl CursorStore for AppStore {
    async fn load_cursor(&self, name: &str) -> Result<Option<String>, StoreError> {
        self.kv
            .get(&format!("cursor/{name}"))
            .map(|(_, bytes)| String::from_utf8(bytes))
            .transpose()
            .map_err(|_| StoreError::new(StoreErrorKind::Corrupt, "cursor is not UTF-8"))
    }

    async fn save_cursor(&self, name: &str, value: &str) -> Result<(), StoreError> {
        let key = format!("cursor/{name}");
        for _ in 0..16 {
            let version = self.kv.get(&key).map_or(0, |(v, _)| v);
            if self.kv.cas(&key, version, value.as_bytes().to_vec()) {
                return Ok(());
            }
        }
        Err(StoreError::new(
            StoreErrorKind::Unavailable,
            "too much contention",
        ))
    }
}

#[async_trait]
impl SubscriptionStore for AppStore {
    async fn load(&self, id: &str) -> Result<Option<SubscriptionRecord>, StoreError> {
        match self.kv.get(&format!("sub/{id}")) {
            None => Ok(None),
            Some((version, bytes)) => {
                let mut r: SubscriptionRecord =
                    serde_json::from_slice(&bytes).map_err(|e| corrupt(&e))?;
                r.version = version;
                Ok(Some(r))
            }
        }
    }

    async fn save(&self, record: &SubscriptionRecord) -> Result<u64, StoreError> {
        let bytes = serde_json::to_vec(record).map_err(|e| corrupt(&e))?;
        if self
            .kv
            .cas(&format!("sub/{}", record.id), record.version, bytes)
        {
            Ok(record.version + 1)
        } else {
            Err(StoreError::new(
                StoreErrorKind::Conflict,
                "another writer saved first",
            ))
        }
    }

    async fn find_by_customer(
        &self,
        customer: &str,
    ) -> Result<Vec<SubscriptionRecord>, StoreError> {
        // A real store keeps an index; scanning keeps the example short.
        let all = self
            .list_subscriptions(&SubscriptionQuery::default())
            .await?;
        Ok(all
            .into_iter()
            .filter(|r| r.state.customer.as_deref() == Some(customer))
            .collect())
    }

    async fn find_by_client_reference(
        &self,
        reference: &str,
    ) -> Result<Vec<SubscriptionRecord>, StoreError> {
        let all = self
            .list_subscriptions(&SubscriptionQuery::default())
            .await?;
        Ok(all
            .into_iter()
            .filter(|r| r.client_reference_id.as_deref() == Some(reference))
            .collect())
    }

    async fn list_subscriptions(
        &self,
        query: &SubscriptionQuery,
    ) -> Result<Vec<SubscriptionRecord>, StoreError> {
        let mut out = Vec::new();
        for (key, _) in self.kv.scan("sub/") {
            if let Some(r) = self.load(&key["sub/".len()..]).await?
                && query.matches(&r)
            {
                out.push(r);
            }
        }
        out.truncate(if query.limit == 0 {
            usize::MAX
        } else {
            query.limit
        });
        Ok(out)
    }

    async fn load_entitlements(
        &self,
        customer: &str,
    ) -> Result<Option<CustomerEntitlements>, StoreError> {
        match self.kv.get(&format!("ent/{customer}")) {
            None => Ok(None),
            Some((version, bytes)) => {
                let mut e: CustomerEntitlements =
                    serde_json::from_slice(&bytes).map_err(|e| corrupt(&e))?;
                e.version = version;
                Ok(Some(e))
            }
        }
    }

    async fn save_entitlements(&self, e: &CustomerEntitlements) -> Result<u64, StoreError> {
        let bytes = serde_json::to_vec(e).map_err(|e| corrupt(&e))?;
        if self
            .kv
            .cas(&format!("ent/{}", e.customer), e.version, bytes)
        {
            Ok(e.version + 1)
        } else {
            Err(StoreError::new(
                StoreErrorKind::Conflict,
                "another writer saved first",
            ))
        }
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let store = Arc::new(AppStore {
        kv: KvStore::default(),
        clock: Arc::new(SystemClock),
        tokens: 1.into(),
    });
    let secret = WebhookSecret::new("whsec_custom_store_example");
    let processor = WebhookProcessor::builder(Verifier::new(secret.clone()))
        .store(store.clone())
        .build();
    let now = OffsetDateTime::now_utc();
    let body = format!(
        r#"{{"id":"evt_custom_1","object":"event","type":"customer.subscription.created","created":{},
        "livemode":false,"data":{{"object":{{"id":"sub_custom","object":"subscription","customer":"cus_custom",
        "status":"active","current_period_start":{},"current_period_end":{}}}}}}}"#,
        now.unix_timestamp(),
        now.unix_timestamp(),
        now.unix_timestamp() + 30 * 86_400
    );
    let header = test_header(&secret, body.as_bytes(), now);
    for delivery in 1..=2 {
        match processor.handle(body.as_bytes(), Some(&header)).await {
            Ok(outcome) => println!(
                "delivery {delivery}: {} ({})",
                outcome.as_str(),
                outcome.http_status()
            ),
            Err(e) => println!("delivery {delivery}: error {e} ({})", e.http_status()),
        }
    }
    let record = store.load("sub_custom").await.ok().flatten();
    println!(
        "stored: {:?} for {:?}, version {}",
        record.as_ref().map(|r| r.state.status.as_str().to_owned()),
        record.as_ref().and_then(|r| r.state.customer.clone()),
        record.as_ref().map_or(0, |r| r.version)
    );
}
