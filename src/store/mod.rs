//! Storage traits, the opaque [`StoreError`], and the in-memory store.
//!
//! An application plugs in its own database by implementing these traits
//! (all `async_trait`, dyn-compatible, `Send + Sync`). Every implementation
//! must pass the conformance suite in `testing::conformance` (feature `test-util`),
//! which is the executable form of the rules documented on each method.
//!
//! - [`EventLedger`]: the exactly-once ledger of [`crate::ledger`].
//! - [`SubscriptionStore`]: subscription records with optimistic
//!   concurrency, customer entitlements, and lookups.
//! - [`CursorStore`]: named cursors for the reconciler.
//! - [`InboxStore`]: durable queue of received events for inbox mode.

use std::fmt;

use async_trait::async_trait;
use time::OffsetDateTime;

use crate::ledger::{
    ClaimOutcome, ClaimRequest, EventKey, FailOutcome, Failure, IgnoreOutcome, IgnoreRequest,
    Lease, LedgerEntry, LedgerQuery, LedgerState,
};
use crate::subscription::{CustomerEntitlements, SubscriptionRecord};

mod memory;
pub use memory::MemoryStore;

#[cfg(any(feature = "postgres", feature = "sqlite"))]
mod sql;

#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
pub use sql::postgres::{self, PgStore};

#[cfg(feature = "sqlite")]
#[cfg_attr(docsrs, doc(cfg(feature = "sqlite")))]
pub use sql::sqlite::{self, SqliteStore};

/// What kind of storage failure happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum StoreErrorKind {
    /// An optimistic-concurrency save lost the race (version mismatch).
    Conflict,
    /// A completion or failure was refused because the lease was taken over
    /// (or the entry is not processing).
    LeaseLost,
    /// The thing operated on does not exist.
    NotFound,
    /// The store cannot be reached or is overloaded (connection refused or
    /// dropped, pool exhausted, serialization failure after retries).
    Unavailable,
    /// The store answered too slowly.
    Timeout,
    /// Stored data could not be read back.
    Corrupt,
    /// Anything else.
    Other,
}

impl StoreErrorKind {
    /// `snake_case` name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Conflict => "conflict",
            Self::LeaseLost => "lease_lost",
            Self::NotFound => "not_found",
            Self::Unavailable => "unavailable",
            Self::Timeout => "timeout",
            Self::Corrupt => "corrupt",
            Self::Other => "other",
        }
    }
}

impl fmt::Display for StoreErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An opaque storage error: a [`kind`](StoreError::kind) to act on, a message
/// for logs (never a payload or a secret), and the driver's error as source.
#[derive(Debug, thiserror::Error)]
#[error("store error ({kind}): {message}")]
pub struct StoreError {
    kind: StoreErrorKind,
    message: String,
    #[source]
    source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

impl StoreError {
    /// An error of `kind` with a message.
    pub fn new(kind: StoreErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
            source: None,
        }
    }

    /// Attaches the underlying error.
    #[must_use]
    pub fn with_source(mut self, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        self.source = Some(Box::new(source));
        self
    }

    /// The kind.
    pub fn kind(&self) -> StoreErrorKind {
        self.kind
    }

    /// Whether retrying later may succeed (unavailable, timeout, conflict,
    /// lease lost).
    pub fn is_retryable(&self) -> bool {
        matches!(
            self.kind,
            StoreErrorKind::Unavailable
                | StoreErrorKind::Timeout
                | StoreErrorKind::Conflict
                | StoreErrorKind::LeaseLost
        )
    }
}

/// The exactly-once ledger. Implementations apply the rules of
/// [`crate::ledger`] atomically per event key.
#[async_trait]
pub trait EventLedger: Send + Sync {
    /// Claims an event (rules 1, 2, 4, 5): inserts a `processing` entry with
    /// a lease, or reclaims a failed, pending or expired one, or answers
    /// duplicate, in flight, conflict or dead-lettered. Lease expiry is on the
    /// store's clock.
    ///
    /// # Errors
    ///
    /// [`StoreError`] when the store fails.
    async fn claim(&self, request: &ClaimRequest) -> Result<ClaimOutcome, StoreError>;

    /// The settled state (`processed`, `ignored` or `dead`) of the entry
    /// `request` would claim, when the fingerprints match and the store can
    /// tell without a round trip to a server; `None` means "not settled, or
    /// not known here: claim to find out". Writes nothing. The processor
    /// asks this before it checks an event's object, so a duplicate
    /// delivery costs a lookup rather than typing the object. The default
    /// answers `None` (a database store answers in `claim` instead of
    /// paying a round trip more for every new event); `MemoryStore`
    /// answers from its map.
    ///
    /// # Errors
    ///
    /// [`StoreError`] when the store fails.
    async fn settled_state(
        &self,
        request: &ClaimRequest,
    ) -> Result<Option<LedgerState>, StoreError> {
        let _ = request;
        Ok(None)
    }

    /// Marks a claimed event processed (rule 3: fenced by the lease token;
    /// drops any stored payload). Completing again with the same lease is a
    /// no-op success ([`crate::ledger::check_completion`]).
    ///
    /// # Errors
    ///
    /// [`StoreErrorKind::LeaseLost`] when the lease was superseded or the
    /// entry is not processing; other kinds when the store fails.
    async fn complete(&self, lease: &Lease) -> Result<(), StoreError>;

    /// Records a failed attempt (fenced): `failed` while attempts remain and
    /// the failure is retryable, else `dead`. Keeps the payload, if given.
    ///
    /// # Errors
    ///
    /// As [`EventLedger::complete`].
    async fn fail(&self, lease: &Lease, failure: &Failure) -> Result<FailOutcome, StoreError>;

    /// Gives a claim back without counting the attempt (graceful shutdown):
    /// the entry becomes `failed` with its attempt count restored, so the
    /// next delivery claims it at once.
    ///
    /// # Errors
    ///
    /// As [`EventLedger::complete`].
    async fn release(&self, lease: &Lease) -> Result<(), StoreError>;

    /// Records an event filtered out on purpose, insert-if-absent:
    /// [`IgnoreOutcome::Recorded`] when it was new, else
    /// [`IgnoreOutcome::Known`] with the existing entry's state (left as it
    /// is), so that an already-ignored event is counted as a duplicate.
    ///
    /// # Errors
    ///
    /// [`StoreError`] when the store fails.
    async fn ignore(&self, request: &IgnoreRequest) -> Result<IgnoreOutcome, StoreError>;

    /// One entry.
    ///
    /// # Errors
    ///
    /// [`StoreError`] when the store fails.
    async fn get(&self, key: &EventKey) -> Result<Option<LedgerEntry>, StoreError>;

    /// Entries matching `query`, ordered by event id.
    ///
    /// # Errors
    ///
    /// [`StoreError`] when the store fails.
    async fn list(&self, query: &LedgerQuery) -> Result<Vec<LedgerEntry>, StoreError>;

    /// Makes a `dead` or `failed` entry claimable again with its attempt
    /// count reset to zero (for replay after a fix). Returns whether the
    /// entry was changed.
    ///
    /// # Errors
    ///
    /// [`StoreError`] when the store fails.
    async fn requeue(&self, key: &EventKey) -> Result<bool, StoreError>;

    /// Deletes `processed` and `ignored` entries last updated before
    /// `before`. Keep at least 30 days (Stripe retries and lists events that
    /// long). Dead and failed entries are kept. Returns how many went.
    ///
    /// # Errors
    ///
    /// [`StoreError`] when the store fails.
    async fn prune(&self, before: OffsetDateTime) -> Result<u64, StoreError>;
}

/// Which subscription records to list.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SubscriptionQuery {
    /// Only records never verified with Stripe or last verified before this.
    pub verified_before: Option<OffsetDateTime>,
    /// Only records flagged `needs_review`.
    pub needs_review: bool,
    /// Only records flagged `needs_reconcile`.
    pub needs_reconcile: bool,
    /// Start after this subscription id (ordering is by id).
    pub after: Option<String>,
    /// At most this many (0 means no limit).
    pub limit: usize,
}

impl SubscriptionQuery {
    /// Whether `record` passes the filters (not the paging).
    pub fn matches(&self, record: &SubscriptionRecord) -> bool {
        self.verified_before
            .is_none_or(|cutoff| record.last_verified_with_stripe.is_none_or(|v| v < cutoff))
            && (!self.needs_review || record.needs_review)
            && (!self.needs_reconcile || record.needs_reconcile)
            && self.after.as_ref().is_none_or(|a| record.id > *a)
    }
}

/// Subscription records and customer entitlements.
#[async_trait]
pub trait SubscriptionStore: Send + Sync {
    /// One record.
    ///
    /// # Errors
    ///
    /// [`StoreError`] when the store fails.
    async fn load(&self, id: &str) -> Result<Option<SubscriptionRecord>, StoreError>;

    /// Saves with optimistic concurrency: `record.version` must equal the
    /// stored version (0: must not exist yet). The stored copy gets version
    /// `record.version + 1`, which is returned.
    ///
    /// # Errors
    ///
    /// [`StoreErrorKind::Conflict`] when another writer saved first.
    async fn save(&self, record: &SubscriptionRecord) -> Result<u64, StoreError>;

    /// A customer's records, ordered by id.
    ///
    /// # Errors
    ///
    /// [`StoreError`] when the store fails.
    async fn find_by_customer(&self, customer: &str)
    -> Result<Vec<SubscriptionRecord>, StoreError>;

    /// Records linked to a Checkout `client_reference_id`, ordered by id.
    ///
    /// # Errors
    ///
    /// [`StoreError`] when the store fails.
    async fn find_by_client_reference(
        &self,
        reference: &str,
    ) -> Result<Vec<SubscriptionRecord>, StoreError>;

    /// Records matching `query`, ordered by id.
    ///
    /// # Errors
    ///
    /// [`StoreError`] when the store fails.
    async fn list_subscriptions(
        &self,
        query: &SubscriptionQuery,
    ) -> Result<Vec<SubscriptionRecord>, StoreError>;

    /// A customer's entitlements.
    ///
    /// # Errors
    ///
    /// [`StoreError`] when the store fails.
    async fn load_entitlements(
        &self,
        customer: &str,
    ) -> Result<Option<CustomerEntitlements>, StoreError>;

    /// Saves entitlements with optimistic concurrency, like
    /// [`SubscriptionStore::save`].
    ///
    /// # Errors
    ///
    /// [`StoreErrorKind::Conflict`] when another writer saved first.
    async fn save_entitlements(
        &self,
        entitlements: &CustomerEntitlements,
    ) -> Result<u64, StoreError>;
}

/// Named cursors (the reconciler's position in `/v1/events`).
#[async_trait]
pub trait CursorStore: Send + Sync {
    /// The cursor's value.
    ///
    /// # Errors
    ///
    /// [`StoreError`] when the store fails.
    async fn load_cursor(&self, name: &str) -> Result<Option<String>, StoreError>;

    /// Sets the cursor.
    ///
    /// # Errors
    ///
    /// [`StoreError`] when the store fails.
    async fn save_cursor(&self, name: &str, value: &str) -> Result<(), StoreError>;
}

/// An event taken from the inbox by a worker.
#[derive(Clone, PartialEq, Eq)]
pub struct InboxItem {
    /// The lease over the event (as from [`EventLedger::claim`]).
    pub lease: Lease,
    /// The stored payload.
    pub payload: String,
    /// The subscription the event is about, if known (serialization key).
    pub subscription_id: Option<String>,
}

/// An event to enqueue.
#[derive(Clone, PartialEq, Eq)]
pub struct InboxRequest {
    /// Key, type, created and fingerprint, as for a claim.
    pub claim: ClaimRequest,
    /// The verified payload.
    pub payload: String,
    /// The subscription it is about, if known: a worker never takes an event
    /// whose subscription has another event in processing.
    pub subscription_id: Option<String>,
}

impl fmt::Debug for InboxItem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InboxItem")
            .field("lease", &self.lease)
            .field("payload_len", &self.payload.len())
            .field("subscription_id", &self.subscription_id)
            .finish()
    }
}

impl fmt::Debug for InboxRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InboxRequest")
            .field("claim", &self.claim)
            .field("payload_len", &self.payload.len())
            .field("subscription_id", &self.subscription_id)
            .finish()
    }
}

/// What enqueueing did.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum EnqueueOutcome {
    /// Stored as pending.
    Queued,
    /// Already known (queued, processing, settled or failed): nothing to do.
    Duplicate {
        /// The existing state.
        state: LedgerState,
    },
    /// Same id, different content.
    Conflict,
}

/// Durable storage for inbox mode: events are stored on receipt and processed
/// by workers, one at a time per subscription.
#[async_trait]
pub trait InboxStore: EventLedger {
    /// Stores a verified event as `pending` (insert-if-absent), due at once.
    ///
    /// An event already known answers [`EnqueueOutcome::Duplicate`] with its
    /// state (or [`EnqueueOutcome::Conflict`] for different content). If that
    /// entry is unsettled (`pending`, `processing` or `failed`) and has no
    /// payload, as after a synchronous [`EventLedger::claim`], the payload
    /// (and the subscription, where the entry has none) is attached to it,
    /// so that once its lease expires a worker takes it: a synchronous
    /// worker that dies cannot strand the event.
    ///
    /// # Errors
    ///
    /// [`StoreError`] when the store fails.
    async fn enqueue(&self, request: &InboxRequest) -> Result<EnqueueOutcome, StoreError>;

    /// Takes up to `limit` events that are pending (or failed and due, or
    /// whose lease expired) and whose subscription has no other event in
    /// processing, oldest `created` first, leasing each for `lease`. Events of
    /// one subscription are handed out one at a time (SKIP LOCKED semantics).
    /// Due times and lease expiry are judged on the store's clock, and each
    /// lease reports its [`Lease::remaining`] time on that clock.
    ///
    /// # Errors
    ///
    /// [`StoreError`] when the store fails.
    async fn take(
        &self,
        limit: usize,
        lease: time::Duration,
        max_attempts: u32,
    ) -> Result<Vec<InboxItem>, StoreError>;

    /// Extends a lease this worker holds to `lease` from now on the store's
    /// clock, fenced by the token like [`EventLedger::complete`]: the same
    /// token, a new expiry, and the [`Lease::remaining`] time measured on the
    /// store's clock. A lease that ran out but was not taken over may be
    /// renewed (nobody else holds the event). Workers renew each event of a
    /// batch just before running it, so every event starts with a full
    /// lease.
    ///
    /// # Errors
    ///
    /// [`StoreErrorKind::LeaseLost`] when another claim took the event over
    /// or it is no longer processing; other kinds when the store fails.
    async fn renew(&self, lease: &Lease, lease_for: time::Duration) -> Result<Lease, StoreError>;

    /// Makes a failed event due again `delay` from now on the store's own
    /// clock (back-off): `now + delay` is computed where the due time is
    /// compared, so an application clock that is off the database's neither
    /// delays nor hastens retries. A delay of zero or less makes it due at
    /// once.
    ///
    /// # Errors
    ///
    /// [`StoreError`] when the store fails.
    async fn retry_after(&self, key: &EventKey, delay: time::Duration) -> Result<(), StoreError>;

    /// Stores `payload` again on a processed entry (completion drops it): for
    /// applications that ask inbox mode to keep processed bodies. Entries in
    /// other states are left alone.
    ///
    /// # Errors
    ///
    /// [`StoreError`] when the store fails.
    async fn keep_payload(&self, key: &EventKey, payload: &str) -> Result<(), StoreError>;

    /// Number of events not yet settled (pending, processing, failed).
    ///
    /// # Errors
    ///
    /// [`StoreError`] when the store fails.
    async fn backlog(&self) -> Result<u64, StoreError>;
}

/// Everything the pipeline stores, handed over once: the ledger, the
/// subscription records and the reconciler's cursors. Implemented for every
/// type that implements the three traits (`MemoryStore`, the database
/// stores, your own), and usable as `Arc<dyn Storage>` when the store is
/// chosen at run time.
pub trait Storage: EventLedger + SubscriptionStore + CursorStore + 'static {}

impl<T> Storage for T where T: EventLedger + SubscriptionStore + CursorStore + ?Sized + 'static {}

/// A [`Storage`] that can also queue events for inbox mode, usable as
/// `Arc<dyn InboxStorage>` when the store is chosen at run time.
pub trait InboxStorage: Storage + InboxStore {}

impl<T> InboxStorage for T where T: Storage + InboxStore + ?Sized {}

mod sealed {
    pub trait Sealed {}
    impl<T: super::Storage> Sealed for std::sync::Arc<T> {}
    impl Sealed for std::sync::Arc<dyn super::Storage> {}
    impl Sealed for std::sync::Arc<dyn super::InboxStorage> {}
}

/// A shared handle to a [`Storage`]: `Arc<S>` for a concrete store,
/// `Arc<dyn Storage>` or `Arc<dyn InboxStorage>`. Sealed.
pub trait StoreHandle: sealed::Sealed {
    /// The store as the pipeline holds it.
    fn storage(&self) -> std::sync::Arc<dyn Storage>;
}

/// A [`StoreHandle`] whose store can queue events (inbox mode). Sealed.
pub trait InboxHandle: StoreHandle {
    /// The store as the inbox holds it.
    fn queue(&self) -> std::sync::Arc<dyn InboxStore>;
}

impl<T: Storage> StoreHandle for std::sync::Arc<T> {
    fn storage(&self) -> std::sync::Arc<dyn Storage> {
        self.clone()
    }
}

impl StoreHandle for std::sync::Arc<dyn Storage> {
    fn storage(&self) -> std::sync::Arc<dyn Storage> {
        self.clone()
    }
}

impl StoreHandle for std::sync::Arc<dyn InboxStorage> {
    fn storage(&self) -> std::sync::Arc<dyn Storage> {
        self.clone()
    }
}

impl<T: Storage + InboxStore> InboxHandle for std::sync::Arc<T> {
    fn queue(&self) -> std::sync::Arc<dyn InboxStore> {
        self.clone()
    }
}

impl InboxHandle for std::sync::Arc<dyn InboxStorage> {
    fn queue(&self) -> std::sync::Arc<dyn InboxStore> {
        self.clone()
    }
}
