//! A store whose subscription records live apart from its ledger and
//! cursors: for tests that wrap the subscription store (to make it fail,
//! stall or page: see [`Hooked`]) while the ledger stays a plain
//! `MemoryStore`.

use std::sync::Arc;

use async_trait::async_trait;
use stripe_webhook_guard::ledger::{
    ClaimOutcome, ClaimRequest, EventKey, FailOutcome, Failure, IgnoreOutcome, IgnoreRequest,
    Lease, LedgerEntry, LedgerQuery,
};
use stripe_webhook_guard::store::{
    CursorStore, EventLedger, MemoryStore, StoreError, SubscriptionQuery, SubscriptionStore,
};
use stripe_webhook_guard::subscription::{CustomerEntitlements, SubscriptionRecord};
use time::OffsetDateTime;

/// The ledger and cursors of `ledger`, the records of `records`.
pub struct Split {
    pub ledger: Arc<MemoryStore>,
    pub records: Arc<dyn SubscriptionStore>,
    /// Refuse every cursor save (an injected store failure).
    pub fail_cursor_saves: bool,
}

impl Split {
    pub fn new(ledger: Arc<MemoryStore>, records: Arc<dyn SubscriptionStore>) -> Arc<Self> {
        Arc::new(Self {
            ledger,
            records,
            fail_cursor_saves: false,
        })
    }
}

#[async_trait]
impl EventLedger for Split {
    async fn claim(&self, r: &ClaimRequest) -> Result<ClaimOutcome, StoreError> {
        self.ledger.claim(r).await
    }
    async fn complete(&self, lease: &Lease) -> Result<(), StoreError> {
        self.ledger.complete(lease).await
    }
    async fn fail(&self, lease: &Lease, f: &Failure) -> Result<FailOutcome, StoreError> {
        self.ledger.fail(lease, f).await
    }
    async fn release(&self, lease: &Lease) -> Result<(), StoreError> {
        self.ledger.release(lease).await
    }
    async fn ignore(&self, r: &IgnoreRequest) -> Result<IgnoreOutcome, StoreError> {
        self.ledger.ignore(r).await
    }
    async fn get(&self, key: &EventKey) -> Result<Option<LedgerEntry>, StoreError> {
        self.ledger.get(key).await
    }
    async fn list(&self, q: &LedgerQuery) -> Result<Vec<LedgerEntry>, StoreError> {
        self.ledger.list(q).await
    }
    async fn requeue(&self, key: &EventKey) -> Result<bool, StoreError> {
        self.ledger.requeue(key).await
    }
    async fn prune(&self, before: OffsetDateTime) -> Result<u64, StoreError> {
        self.ledger.prune(before).await
    }
}

#[async_trait]
impl SubscriptionStore for Split {
    async fn load(&self, id: &str) -> Result<Option<SubscriptionRecord>, StoreError> {
        self.records.load(id).await
    }
    async fn save(&self, record: &SubscriptionRecord) -> Result<u64, StoreError> {
        self.records.save(record).await
    }
    async fn find_by_customer(&self, c: &str) -> Result<Vec<SubscriptionRecord>, StoreError> {
        self.records.find_by_customer(c).await
    }
    async fn find_by_client_reference(
        &self,
        r: &str,
    ) -> Result<Vec<SubscriptionRecord>, StoreError> {
        self.records.find_by_client_reference(r).await
    }
    async fn list_subscriptions(
        &self,
        q: &SubscriptionQuery,
    ) -> Result<Vec<SubscriptionRecord>, StoreError> {
        self.records.list_subscriptions(q).await
    }
    async fn load_entitlements(&self, c: &str) -> Result<Option<CustomerEntitlements>, StoreError> {
        self.records.load_entitlements(c).await
    }
    async fn save_entitlements(&self, e: &CustomerEntitlements) -> Result<u64, StoreError> {
        self.records.save_entitlements(e).await
    }
}

#[async_trait]
impl CursorStore for Split {
    async fn load_cursor(&self, name: &str) -> Result<Option<String>, StoreError> {
        self.ledger.load_cursor(name).await
    }
    async fn save_cursor(&self, name: &str, value: &str) -> Result<(), StoreError> {
        if self.fail_cursor_saves {
            return Err(StoreError::new(
                stripe_webhook_guard::store::StoreErrorKind::Unavailable,
                "injected",
            ));
        }
        self.ledger.save_cursor(name, value).await
    }
}

/// A subscription-store call, as [`Hooked`] shows it to its hook.
#[derive(Debug)]
pub enum RecordOp<'a> {
    Load(&'a str),
    Save(&'a SubscriptionRecord),
    FindByCustomer(&'a str),
    FindByClientReference(&'a str),
    List(&'a SubscriptionQuery),
    LoadEntitlements(&'a str),
    SaveEntitlements(&'a CustomerEntitlements),
}

type Hook = Box<dyn Fn(RecordOp<'_>) -> Result<(), StoreError> + Send + Sync>;

/// Subscription records kept by `inner`, with `hook` run before each call:
/// it may fail the call, stall it (move a clock) or record it.
pub struct Hooked {
    inner: Arc<dyn SubscriptionStore>,
    hook: Hook,
}

impl Hooked {
    pub fn new(
        inner: Arc<dyn SubscriptionStore>,
        hook: impl Fn(RecordOp<'_>) -> Result<(), StoreError> + Send + Sync + 'static,
    ) -> Arc<Self> {
        Arc::new(Self {
            inner,
            hook: Box::new(hook),
        })
    }
}

#[async_trait]
impl SubscriptionStore for Hooked {
    async fn load(&self, id: &str) -> Result<Option<SubscriptionRecord>, StoreError> {
        (self.hook)(RecordOp::Load(id))?;
        self.inner.load(id).await
    }
    async fn save(&self, record: &SubscriptionRecord) -> Result<u64, StoreError> {
        (self.hook)(RecordOp::Save(record))?;
        self.inner.save(record).await
    }
    async fn find_by_customer(&self, c: &str) -> Result<Vec<SubscriptionRecord>, StoreError> {
        (self.hook)(RecordOp::FindByCustomer(c))?;
        self.inner.find_by_customer(c).await
    }
    async fn find_by_client_reference(
        &self,
        r: &str,
    ) -> Result<Vec<SubscriptionRecord>, StoreError> {
        (self.hook)(RecordOp::FindByClientReference(r))?;
        self.inner.find_by_client_reference(r).await
    }
    async fn list_subscriptions(
        &self,
        q: &SubscriptionQuery,
    ) -> Result<Vec<SubscriptionRecord>, StoreError> {
        (self.hook)(RecordOp::List(q))?;
        self.inner.list_subscriptions(q).await
    }
    async fn load_entitlements(&self, c: &str) -> Result<Option<CustomerEntitlements>, StoreError> {
        (self.hook)(RecordOp::LoadEntitlements(c))?;
        self.inner.load_entitlements(c).await
    }
    async fn save_entitlements(&self, e: &CustomerEntitlements) -> Result<u64, StoreError> {
        (self.hook)(RecordOp::SaveEntitlements(e))?;
        self.inner.save_entitlements(e).await
    }
}
