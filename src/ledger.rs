//! Deduplication that never loses an event: the ledger's states and its pure
//! rules.
//!
//! Every event id (with its Connect account) has at most one ledger entry:
//!
//! | state | meaning | a new delivery gets |
//! |---|---|---|
//! | [`LedgerState::Processing`] | claimed, lease running | *in flight* (non-2xx: Stripe retries later) |
//! | [`LedgerState::Processing`], lease expired | the worker died | claimed again |
//! | [`LedgerState::Failed`] | an attempt failed, retryable | claimed again |
//! | [`LedgerState::Processed`] | done | *duplicate* (2xx) |
//! | [`LedgerState::Ignored`] | filtered out on purpose | *duplicate* (2xx) |
//! | [`LedgerState::Dead`] | attempts exhausted | *duplicate* (2xx); kept for replay |
//! | [`LedgerState::Pending`] | stored by inbox mode, not yet processed | *duplicate* (2xx): already queued |
//!
//! The rules, which every [`EventLedger`](crate::store::EventLedger)
//! implementation applies atomically and the conformance suite checks:
//!
//! 1. A claim is one atomic insert-if-absent keyed by event id and account.
//!    It returns a lease token with an expiry; `attempts` counts claims.
//! 2. "Seen" is never "done": a failed event is claimed again, never
//!    acknowledged as a duplicate (the naive insert-then-process ledger loses
//!    it).
//! 3. Completion and failure are fenced by the token: a worker whose lease
//!    expired and was taken over cannot complete over the new holder.
//! 4. After `max_attempts` claims the event is [`LedgerState::Dead`]:
//!    acknowledged, kept with its error for inspection and replay, never
//!    blocking other events. A lease that expires on the last attempt (a
//!    worker that crashes on this event every time) also ends dead.
//! 5. The fingerprint of the first delivery is stored; the same id with a
//!    different fingerprint is refused ([`ClaimDecision::Conflict`]).
//! 6. Lease expiry is judged on the store's clock (the database's, where
//!    there is one).
//!
//! The functions here are those rules as pure functions over an entry and
//! `now`; [`MemoryStore`](crate::store::MemoryStore) calls them under its
//! lock, and SQL stores encode the same decisions in their statements.

use std::fmt;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

use crate::event::Event;

/// The ledger key: event id plus the Connect account it belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct EventKey {
    /// `evt_…`
    pub event_id: String,
    /// `acct_…` for Connect events, `None` for the platform's own.
    pub account: Option<String>,
}

impl EventKey {
    /// The key of `event`.
    pub fn of(event: &Event) -> Self {
        Self {
            event_id: event.id().to_owned(),
            account: event.account().map(str::to_owned),
        }
    }

    /// A key from parts.
    pub fn new(event_id: impl Into<String>, account: Option<&str>) -> Self {
        Self {
            event_id: event_id.into(),
            account: account.map(str::to_owned),
        }
    }
}

impl fmt::Display for EventKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.account {
            Some(a) => write!(f, "{}@{a}", self.event_id),
            None => f.write_str(&self.event_id),
        }
    }
}

/// What identifies an event's content, independent of how it was rendered.
///
/// SHA-256 over the envelope: event id, type, `created`, livemode, account,
/// and a thin event's related object. Deliberately not over the raw bytes or
/// the object: Stripe renders one event differently for a webhook endpoint
/// pinned to one API version and for an API request pinned to another, and a
/// catch-up copy of an event that also arrived by webhook must be recognised
/// as the same event, not refused. (Events with the same id and envelope but
/// a different object are not produced by Stripe; the envelope alone catches
/// the id collisions that happen in practice, such as test fixtures reusing
/// one id for several types, and needs no second pass over the object.)
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Fingerprint(pub [u8; 32]);

impl Fingerprint {
    /// The fingerprint of `event`.
    pub fn of(event: &Event) -> Self {
        let related = event.related_object();
        let mut created = [0u8; 20];
        let mut h = Sha256::new();
        for part in [
            Some(event.id()),
            Some(event.event_type().as_str()),
            Some(decimal(event.created(), &mut created)),
            Some(if event.livemode() { "live" } else { "test" }),
            event.account(),
            related.map(|r| r.object_type.as_str()),
            related.map(|r| r.id.as_str()),
        ] {
            match part {
                Some(p) => {
                    h.update((p.len() as u64).to_le_bytes());
                    h.update(p.as_bytes());
                }
                None => h.update(u64::MAX.to_le_bytes()),
            }
        }
        Fingerprint(h.finalize().into())
    }

    /// Lower-case hex.
    pub fn to_hex(&self) -> String {
        use fmt::Write;
        self.0.iter().fold(String::with_capacity(64), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
    }

    /// Parses lower- or upper-case hex.
    pub fn from_hex(text: &str) -> Option<Self> {
        if text.len() != 64 {
            return None;
        }
        let mut out = [0u8; 32];
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
        }
        Some(Fingerprint(out))
    }
}

/// `n` in decimal (as `n.to_string()` spells it), written into `buf`
/// without allocating; 20 bytes hold every `i64`.
fn decimal(n: i64, buf: &mut [u8; 20]) -> &str {
    let mut i = buf.len();
    let mut rest = n.unsigned_abs();
    loop {
        i -= 1;
        // `rest % 10` is below 10: the cast cannot truncate.
        #[allow(clippy::cast_possible_truncation)]
        let digit = (rest % 10) as u8;
        buf[i] = b'0' + digit;
        rest /= 10;
        if rest == 0 {
            break;
        }
    }
    if n < 0 {
        i -= 1;
        buf[i] = b'-';
    }
    std::str::from_utf8(&buf[i..]).unwrap_or_default()
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({})", &self.to_hex()[..16])
    }
}

/// A ledger entry's state. See the [module docs](self).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum LedgerState {
    /// Stored by inbox mode; waiting for a worker.
    Pending,
    /// Claimed by a worker; see the lease.
    Processing,
    /// Done.
    Processed,
    /// An attempt failed and may be retried.
    Failed,
    /// Attempts exhausted (or failed permanently); kept for replay.
    Dead,
    /// Filtered out on purpose (livemode, account, type).
    Ignored,
}

impl LedgerState {
    /// Stripe's spelling-style name (`processed`, …), used by SQL stores.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Processing => "processing",
            Self::Processed => "processed",
            Self::Failed => "failed",
            Self::Dead => "dead",
            Self::Ignored => "ignored",
        }
    }

    /// Reads [`LedgerState::as_str`]'s spelling.
    pub fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "pending" => Self::Pending,
            "processing" => Self::Processing,
            "processed" => Self::Processed,
            "failed" => Self::Failed,
            "dead" => Self::Dead,
            "ignored" => Self::Ignored,
            _ => return None,
        })
    }

    /// States a new delivery is acknowledged for (2xx, no processing).
    pub fn is_settled(self) -> bool {
        matches!(self, Self::Processed | Self::Ignored | Self::Dead)
    }
}

impl fmt::Display for LedgerState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An opaque fencing token, unique per claim of an entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct LeaseToken(pub u64);

/// Proof of a claim: present it to complete or fail the event.
///
/// The lease lasts [`Lease::remaining`] from when the store granted it,
/// measured on the store's clock. Whoever holds it turns that into a local
/// monotonic deadline ([`Lease::deadline`]) and never compares
/// [`Lease::expires_at`] (a timestamp on the store's clock, the database's)
/// with its own wall clock: the two clocks can be minutes apart.
///
/// ```
/// use std::time::Instant;
/// use stripe_webhook_guard::ledger::{EventKey, Lease, LeaseToken};
/// use time::{Duration, OffsetDateTime};
///
/// let asked = Instant::now(); // read before asking the store
/// let lease = Lease {
///     key: EventKey::new("evt_1", None),
///     token: LeaseToken(1),
///     attempt: 1,
///     expires_at: OffsetDateTime::UNIX_EPOCH + Duration::seconds(60),
///     remaining: Duration::seconds(60),
/// };
/// assert_eq!(lease.deadline(asked) - asked, std::time::Duration::from_secs(60));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// The claimed event.
    pub key: EventKey,
    /// The fencing token.
    pub token: LeaseToken,
    /// Which attempt this is (1 for the first claim).
    pub attempt: u32,
    /// When the lease runs out, on the store's clock. For display and for
    /// the store's own comparisons only: compare [`Lease::deadline`] with a
    /// monotonic clock instead.
    pub expires_at: OffsetDateTime,
    /// How long the lease had left when the store granted it, measured on
    /// the store's clock (`expires_at` minus the store's `now`).
    pub remaining: time::Duration,
}

impl Lease {
    /// The local monotonic deadline of this lease, for a holder that read
    /// `asked` from its monotonic clock before asking the store for the
    /// lease. The store's `now` was read after `asked`, so the deadline is
    /// never later than the store's expiry, whatever the two wall clocks
    /// say. A lease with no time left has its deadline at `asked`.
    pub fn deadline(&self, asked: std::time::Instant) -> std::time::Instant {
        let left = std::time::Duration::try_from(self.remaining).unwrap_or_default();
        asked.checked_add(left).unwrap_or(asked)
    }
}

/// One event's ledger entry. Its `Debug` shows the payload's length, not
/// the payload.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerEntry {
    /// The key.
    pub key: EventKey,
    /// The event type as Stripe spells it.
    pub event_type: String,
    /// The event's `created`, Unix seconds.
    pub event_created: i64,
    /// The first delivery's fingerprint.
    pub fingerprint: Fingerprint,
    /// The state.
    pub state: LedgerState,
    /// Claims so far.
    pub attempts: u32,
    /// The current (or last) lease token.
    pub lease_token: Option<LeaseToken>,
    /// When the current lease runs out.
    #[serde(with = "time::serde::rfc3339::option")]
    pub lease_expires_at: Option<OffsetDateTime>,
    /// The last failure's message (never a body or a secret).
    pub last_error: Option<String>,
    /// Why the event was ignored.
    pub ignore_reason: Option<String>,
    /// The raw payload, kept while the event is pending, failed or dead so it
    /// can be processed or replayed without Stripe.
    pub payload: Option<String>,
    /// Inbox mode: the subscription the event is about (one event per
    /// subscription is processed at a time).
    #[serde(default)]
    pub subscription_id: Option<String>,
    /// Inbox mode: earliest time a worker may take the event (back-off).
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub available_at: Option<OffsetDateTime>,
    /// First time this store saw the event.
    #[serde(with = "time::serde::rfc3339")]
    pub first_seen_at: OffsetDateTime,
    /// Last change.
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: OffsetDateTime,
}

impl fmt::Debug for LedgerEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LedgerEntry")
            .field("key", &self.key)
            .field("event_type", &self.event_type)
            .field("event_created", &self.event_created)
            .field("fingerprint", &self.fingerprint)
            .field("state", &self.state)
            .field("attempts", &self.attempts)
            .field("lease_token", &self.lease_token)
            .field("lease_expires_at", &self.lease_expires_at)
            .field("last_error", &self.last_error)
            .field("ignore_reason", &self.ignore_reason)
            .field("payload_len", &self.payload.as_ref().map(String::len))
            .field("subscription_id", &self.subscription_id)
            .field("available_at", &self.available_at)
            .field("first_seen_at", &self.first_seen_at)
            .field("updated_at", &self.updated_at)
            .finish()
    }
}

/// What a claim should do, given the current entry. Rules 1, 2, 4, 5.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClaimDecision {
    /// No entry: insert one in `Processing` with attempt 1.
    Insert,
    /// A failed entry, an expired lease or a pending inbox entry: take it,
    /// as attempt `attempt`.
    Reclaim {
        /// The attempt number this claim gets.
        attempt: u32,
    },
    /// Settled: acknowledge, do nothing.
    Duplicate(LedgerState),
    /// Another worker holds a live lease until `until`.
    InFlight {
        /// When that lease runs out.
        until: OffsetDateTime,
    },
    /// Same id, different content: refuse.
    Conflict,
    /// The lease expired on the last allowed attempt: mark dead.
    ExpireToDead,
}

/// Rule 2 and 6: is this entry's lease live at `now`?
pub fn lease_is_live(entry: &LedgerEntry, now: OffsetDateTime) -> bool {
    entry.state == LedgerState::Processing && entry.lease_expires_at.is_some_and(|t| t > now)
}

/// Decides a claim (rules 1, 2, 4, 5). `max_attempts` of 0 is treated as 1.
pub fn decide_claim(
    existing: Option<&LedgerEntry>,
    fingerprint: &Fingerprint,
    now: OffsetDateTime,
    max_attempts: u32,
) -> ClaimDecision {
    let Some(entry) = existing else {
        return ClaimDecision::Insert;
    };
    if entry.fingerprint != *fingerprint {
        return ClaimDecision::Conflict;
    }
    match entry.state {
        LedgerState::Processed | LedgerState::Ignored | LedgerState::Dead => {
            ClaimDecision::Duplicate(entry.state)
        }
        LedgerState::Processing if lease_is_live(entry, now) => ClaimDecision::InFlight {
            until: entry.lease_expires_at.unwrap_or(now),
        },
        LedgerState::Processing if entry.attempts >= max_attempts.max(1) => {
            ClaimDecision::ExpireToDead
        }
        LedgerState::Processing | LedgerState::Failed | LedgerState::Pending => {
            ClaimDecision::Reclaim {
                attempt: entry.attempts.saturating_add(1),
            }
        }
    }
}

/// Rule 3: may the holder of `lease` complete or fail `entry`?
///
/// # Errors
///
/// [`FenceError`] when the entry is not processing under this token.
pub fn check_fence(entry: &LedgerEntry, lease: &Lease) -> Result<(), FenceError> {
    if entry.state != LedgerState::Processing {
        return Err(FenceError::NotProcessing(entry.state));
    }
    if entry.lease_token != Some(lease.token) {
        return Err(FenceError::Superseded);
    }
    Ok(())
}

/// Rule 3 for completion: like [`check_fence`], but a completion repeated by
/// the same holder (its first answer was lost, or the application completed
/// the event inside its own transaction) is accepted as already done.
///
/// Returns `Ok(true)` when the entry still has to be marked processed,
/// `Ok(false)` when it already is, by this lease.
///
/// # Errors
///
/// [`FenceError`] when another claim holds the entry, or it is in another state.
pub fn check_completion(entry: &LedgerEntry, lease: &Lease) -> Result<bool, FenceError> {
    if entry.state == LedgerState::Processed && entry.lease_token == Some(lease.token) {
        return Ok(false);
    }
    check_fence(entry, lease).map(|()| true)
}

/// Why a completion or failure was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FenceError {
    /// Another worker claimed the event after this lease expired.
    #[error("lease superseded by a newer claim")]
    Superseded,
    /// The entry is no longer processing.
    #[error("event is {0}, not processing")]
    NotProcessing(LedgerState),
}

/// Rule 4: the state after a failed attempt.
pub fn state_after_failure(attempts: u32, max_attempts: u32, retryable: bool) -> LedgerState {
    if !retryable || attempts >= max_attempts.max(1) {
        LedgerState::Dead
    } else {
        LedgerState::Failed
    }
}

/// A claim request: the event to claim and the lease to take.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimRequest {
    /// The key.
    pub key: EventKey,
    /// The event type as Stripe spells it.
    pub event_type: String,
    /// The event's `created`.
    pub event_created: i64,
    /// The event's fingerprint.
    pub fingerprint: Fingerprint,
    /// How long the lease lasts, on the store's clock.
    pub lease: time::Duration,
    /// Claims allowed before the event is dead.
    pub max_attempts: u32,
}

impl ClaimRequest {
    /// A request for `event` with the given lease and attempt limit.
    pub fn for_event(event: &Event, lease: time::Duration, max_attempts: u32) -> Self {
        Self {
            key: EventKey::of(event),
            event_type: event.event_type().as_str().to_owned(),
            event_created: event.created(),
            fingerprint: Fingerprint::of(event),
            lease,
            max_attempts,
        }
    }
}

/// What a claim got.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ClaimOutcome {
    /// This worker holds the event now.
    Claimed(Lease),
    /// Settled before: acknowledge.
    Duplicate {
        /// The settled state.
        state: LedgerState,
    },
    /// Another worker holds it.
    InFlight {
        /// When that lease runs out.
        until: OffsetDateTime,
    },
    /// Same id, different content.
    Conflict {
        /// The stored fingerprint.
        stored: Fingerprint,
    },
    /// The lease expired on the last attempt; now dead.
    DeadLettered {
        /// Attempts made.
        attempts: u32,
    },
}

/// A failed attempt. Its `Debug` shows the payload's length only.
#[derive(Clone, PartialEq, Eq)]
pub struct Failure {
    /// What went wrong (never a body or a secret).
    pub error: String,
    /// Whether another attempt may succeed.
    pub retryable: bool,
    /// Claims allowed before the event is dead.
    pub max_attempts: u32,
    /// The raw payload, kept for replay.
    pub payload: Option<String>,
}

impl fmt::Debug for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Failure")
            .field("error", &self.error)
            .field("retryable", &self.retryable)
            .field("max_attempts", &self.max_attempts)
            .field("payload_len", &self.payload.as_ref().map(String::len))
            .finish()
    }
}

/// The state a failure left the event in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailOutcome {
    /// Retryable: the next delivery claims it again.
    Failed {
        /// Attempts so far.
        attempts: u32,
    },
    /// Dead-lettered.
    Dead {
        /// Attempts made.
        attempts: u32,
    },
}

/// An event filtered out on purpose.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IgnoreRequest {
    /// The key.
    pub key: EventKey,
    /// The event type.
    pub event_type: String,
    /// The event's `created`.
    pub event_created: i64,
    /// The fingerprint.
    pub fingerprint: Fingerprint,
    /// Why.
    pub reason: String,
}

impl IgnoreRequest {
    /// A request to record `event` as ignored for `reason`.
    pub fn for_event(event: &Event, reason: &str) -> Self {
        Self {
            key: EventKey::of(event),
            event_type: event.event_type().as_str().to_owned(),
            event_created: event.created(),
            fingerprint: Fingerprint::of(event),
            reason: reason.to_owned(),
        }
    }
}

/// What recording an ignored event did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum IgnoreOutcome {
    /// Recorded now: the first time the store sees the event.
    Recorded,
    /// The event was known already (ignored, processed, in processing, …):
    /// its entry is left as it was, in this state. An already-ignored event
    /// is a duplicate, not a new ignore.
    Known(LedgerState),
}

impl IgnoreOutcome {
    /// The entry's state after the call.
    pub fn state(self) -> LedgerState {
        match self {
            Self::Recorded => LedgerState::Ignored,
            Self::Known(state) => state,
        }
    }
}

/// Which entries to list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerQuery {
    /// States to include (empty: all).
    pub states: Vec<LedgerState>,
    /// Start after this event id (ordering is by event id).
    pub after: Option<String>,
    /// At most this many.
    pub limit: usize,
}

impl LedgerQuery {
    /// Entries in any of `states`, first page of `limit`.
    pub fn states(states: &[LedgerState], limit: usize) -> Self {
        Self {
            states: states.to_vec(),
            after: None,
            limit,
        }
    }

    /// Whether `entry` matches the query's filters (not its paging).
    pub fn matches(&self, entry: &LedgerEntry) -> bool {
        (self.states.is_empty() || self.states.contains(&entry.state))
            && self.after.as_ref().is_none_or(|a| entry.key.event_id > *a)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::Duration;

    #[test]
    fn decimal_spells_created_as_to_string_does() {
        let mut buf = [0u8; 20];
        for n in [
            0,
            7,
            -7,
            10,
            1_700_000_000,
            -1_700_000_001,
            i64::MAX,
            i64::MIN,
        ] {
            assert_eq!(decimal(n, &mut buf), n.to_string());
        }
    }

    #[test]
    fn fingerprint_is_unchanged() {
        // Stored fingerprints must keep matching: the value of one event,
        // computed by the formula before `created` was formatted in place.
        let event = Event::parse_unverified(
            br#"{"id":"evt_fp","type":"invoice.paid","created":1700000000,"livemode":true,
            "account":"acct_1","data":{"object":{"id":"in_1","object":"invoice"}}}"#,
        )
        .expect("an event");
        let mut h = Sha256::new();
        for p in ["evt_fp", "invoice.paid", "1700000000", "live", "acct_1"] {
            h.update((p.len() as u64).to_le_bytes());
            h.update(p.as_bytes());
        }
        h.update(u64::MAX.to_le_bytes());
        h.update(u64::MAX.to_le_bytes());
        assert_eq!(Fingerprint::of(&event), Fingerprint(h.finalize().into()));
    }

    fn now() -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp(1_700_000_000).unwrap()
    }

    fn entry(state: LedgerState, attempts: u32, expires_in: Option<i64>) -> LedgerEntry {
        LedgerEntry {
            key: EventKey::new("evt_1", None),
            event_type: "invoice.paid".into(),
            event_created: 1,
            fingerprint: Fingerprint([1; 32]),
            state,
            attempts,
            lease_token: Some(LeaseToken(7)),
            lease_expires_at: expires_in.map(|s| now() + Duration::seconds(s)),
            last_error: None,
            ignore_reason: None,
            payload: None,
            subscription_id: None,
            available_at: None,
            first_seen_at: now(),
            updated_at: now(),
        }
    }

    const FP: Fingerprint = Fingerprint([1; 32]);

    #[test]
    fn absent_is_inserted() {
        assert_eq!(decide_claim(None, &FP, now(), 5), ClaimDecision::Insert);
    }

    #[test]
    fn settled_states_are_duplicates() {
        for s in [
            LedgerState::Processed,
            LedgerState::Ignored,
            LedgerState::Dead,
        ] {
            assert_eq!(
                decide_claim(Some(&entry(s, 1, None)), &FP, now(), 5),
                ClaimDecision::Duplicate(s)
            );
        }
    }

    #[test]
    fn failed_is_never_a_duplicate() {
        assert_eq!(
            decide_claim(Some(&entry(LedgerState::Failed, 2, None)), &FP, now(), 5),
            ClaimDecision::Reclaim { attempt: 3 }
        );
    }

    #[test]
    fn pending_is_claimed() {
        assert_eq!(
            decide_claim(Some(&entry(LedgerState::Pending, 0, None)), &FP, now(), 5),
            ClaimDecision::Reclaim { attempt: 1 }
        );
    }

    #[test]
    fn live_lease_is_in_flight_and_expiry_is_exclusive() {
        let live = entry(LedgerState::Processing, 1, Some(1));
        assert_eq!(
            decide_claim(Some(&live), &FP, now(), 5),
            ClaimDecision::InFlight {
                until: now() + Duration::seconds(1)
            }
        );
        // At the expiry instant the lease is over.
        let at = entry(LedgerState::Processing, 1, Some(0));
        assert!(!lease_is_live(&at, now()));
        assert_eq!(
            decide_claim(Some(&at), &FP, now(), 5),
            ClaimDecision::Reclaim { attempt: 2 }
        );
    }

    #[test]
    fn expired_on_last_attempt_is_dead() {
        let e = entry(LedgerState::Processing, 5, Some(-1));
        assert_eq!(
            decide_claim(Some(&e), &FP, now(), 5),
            ClaimDecision::ExpireToDead
        );
        let e = entry(LedgerState::Processing, 4, Some(-1));
        assert_eq!(
            decide_claim(Some(&e), &FP, now(), 5),
            ClaimDecision::Reclaim { attempt: 5 }
        );
    }

    #[test]
    fn different_fingerprint_conflicts() {
        let e = entry(LedgerState::Processed, 1, None);
        assert_eq!(
            decide_claim(Some(&e), &Fingerprint([2; 32]), now(), 5),
            ClaimDecision::Conflict
        );
    }

    #[test]
    fn fencing() {
        let e = entry(LedgerState::Processing, 2, Some(10));
        let mine = Lease {
            key: e.key.clone(),
            token: LeaseToken(7),
            attempt: 2,
            expires_at: now(),
            remaining: Duration::seconds(10),
        };
        assert_eq!(check_fence(&e, &mine), Ok(()));
        let stale = Lease {
            token: LeaseToken(6),
            ..mine.clone()
        };
        assert_eq!(check_fence(&e, &stale), Err(FenceError::Superseded));
        let done = entry(LedgerState::Processed, 2, None);
        assert_eq!(
            check_fence(&done, &mine),
            Err(FenceError::NotProcessing(LedgerState::Processed))
        );
        // Completing twice with the same token is idempotent; a zombie is not.
        assert_eq!(check_completion(&done, &mine), Ok(false));
        assert_eq!(
            check_completion(&done, &stale),
            Err(FenceError::NotProcessing(LedgerState::Processed))
        );
        assert_eq!(check_completion(&e, &mine), Ok(true));
    }

    #[test]
    fn failure_states() {
        assert_eq!(state_after_failure(1, 5, true), LedgerState::Failed);
        assert_eq!(state_after_failure(5, 5, true), LedgerState::Dead);
        assert_eq!(state_after_failure(1, 5, false), LedgerState::Dead);
        assert_eq!(state_after_failure(1, 0, true), LedgerState::Dead);
    }

    #[test]
    fn fingerprint_ignores_rendering_but_not_identity() {
        let a = Event::parse_unverified(
            br#"{"id":"evt_1","type":"invoice.paid","created":5,"data":{"object":{"object":"invoice","id":"in_1","paid":true}}}"#,
        )
        .unwrap();
        // The same event rendered in another API version.
        let b = Event::parse_unverified(
            br#"{"id":"evt_1","type":"invoice.paid","created":5,"api_version":"2025-03-31.basil",
            "data":{"object":{"id":"in_1","object":"invoice","status":"paid"}}}"#,
        )
        .unwrap();
        assert_eq!(Fingerprint::of(&a), Fingerprint::of(&b));
        let c = Event::parse_unverified(
            br#"{"id":"evt_1","type":"invoice.paid","created":6,"data":{"object":{"object":"invoice","id":"in_1"}}}"#,
        )
        .unwrap();
        assert_ne!(Fingerprint::of(&a), Fingerprint::of(&c));
        let d = Event::parse_unverified(
            br#"{"id":"evt_1","type":"invoice.created","created":5,"data":{"object":{"object":"invoice","id":"in_1"}}}"#,
        )
        .unwrap();
        assert_ne!(Fingerprint::of(&a), Fingerprint::of(&d));
        let fp = Fingerprint::of(&a);
        assert_eq!(Fingerprint::from_hex(&fp.to_hex()), Some(fp));
        assert_eq!(Fingerprint::from_hex("zz"), None);
    }

    #[test]
    fn state_names_round_trip() {
        for s in [
            LedgerState::Pending,
            LedgerState::Processing,
            LedgerState::Processed,
            LedgerState::Failed,
            LedgerState::Dead,
            LedgerState::Ignored,
        ] {
            assert_eq!(LedgerState::parse(s.as_str()), Some(s));
        }
    }
}
