//! Customer entitlements from `entitlements.active_entitlement_summary.updated`
//! events and from `/v1/entitlements/active_entitlements`, as a sans-IO
//! machine: [`step_entitlements`] decides from (stored, event); when it asks
//! Stripe ([`EntitlementStep::Fetch`]) the caller lists the customer's
//! active entitlements and [`resume_entitlements`] with the answer.
//!
//! # Rules
//!
//! - Ordering is by `(created, event id)` of the summary event, or by the
//!   time Stripe answered (its `Date`) for a list fetched from the API.
//!   An older summary is stale; the same event again changes nothing.
//! - **Ties are never guessed.** A summary of the same second as the stored
//!   one, from another event (or a fetch), is refetched from the API: event
//!   ids are not time-ordered. Without a client the larger id wins (an
//!   arbitrary but order-independent rule) and the result is marked
//!   unverified (`verified == false`).
//! - **Incomplete lists are completed.** The summary carries one page of
//!   entitlements; when it says `has_more`, the full list is fetched from the
//!   API. Without a client the page is stored, marked unverified: a key it
//!   shows is active, a key it does not show may be on a later page.
//! - A fetch that fails leaves the stored entitlements as they are and fails
//!   the event retryably, so Stripe's redelivery tries again.
//! - Unverified entitlements are refetched by the reconciler's sweeps and by
//!   `refresh_customer`.
//!
//! ```
//! use stripe_webhook_guard::event::Event;
//! use stripe_webhook_guard::subscription::{
//!     EntitlementFetchOutcome, EntitlementStep, resume_entitlements, step_entitlements,
//! };
//! use time::OffsetDateTime;
//!
//! let summary = Event::parse_unverified(br#"{"id":"evt_1","object":"event",
//!   "type":"entitlements.active_entitlement_summary.updated","created":1700000000,
//!   "livemode":false,"data":{"object":{"object":"entitlements.active_entitlement_summary",
//!   "customer":"cus_1","entitlements":{"object":"list","has_more":true,
//!   "data":[{"id":"ent_1","lookup_key":"alpha","feature":"feat_1"}]}}}}"#).unwrap();
//! // One page of several: the machine asks for the whole list.
//! let EntitlementStep::Fetch(fetch) = step_entitlements(None, &summary).unwrap() else { panic!() };
//! let at = OffsetDateTime::from_unix_timestamp(1_700_000_003).unwrap();
//! let answer = EntitlementFetchOutcome::Fetched {
//!     lookup_keys: vec!["alpha".into(), "beta".into()],
//!     at: at.into(),
//! };
//! let EntitlementStep::Save(saved) = resume_entitlements(fetch, answer).unwrap() else { panic!() };
//! assert!(saved.has("beta") && saved.verified);
//! ```

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use super::FetchTime;
use crate::client::ClientError;
use crate::event::{Event, ParseError};

/// A customer's active entitlements, as last reported by Stripe.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CustomerEntitlements {
    /// The customer id.
    pub customer: String,
    /// Active feature lookup keys, sorted.
    pub lookup_keys: Vec<String>,
    /// The `(created, event id)` of the summary event, or `(Stripe's time,
    /// "")` of a list fetched from the API.
    pub watermark: (i64, String),
    /// Optimistic-concurrency version (0 before the first save).
    pub version: u64,
    /// The Connect account of the customer (`None`: the platform's).
    #[serde(default)]
    pub account: Option<String>,
    /// Whether `lookup_keys` is known to be the complete, current list.
    /// `false` after a summary with `has_more` or a same-second tie that
    /// could not be checked with Stripe: keys present are active, keys
    /// absent may not be. The reconciler refetches unverified entitlements.
    #[serde(default = "verified_by_default")]
    pub verified: bool,
    /// When the list was last fetched from Stripe (the host's clock).
    #[serde(default)]
    pub last_verified_with_stripe: Option<OffsetDateTime>,
}

fn verified_by_default() -> bool {
    true
}

impl CustomerEntitlements {
    /// Whether `lookup_key` is active.
    pub fn has(&self, lookup_key: &str) -> bool {
        self.lookup_keys.iter().any(|k| k == lookup_key)
    }
}

/// Why the machine asks Stripe for a customer's entitlements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum EntitlementFetchReason {
    /// The summary's list had more pages (`has_more`).
    Incomplete,
    /// The summary has the same second as the stored entitlements.
    Tie,
}

/// The next thing to do for an entitlement summary.
#[derive(Debug)]
#[non_exhaustive]
pub enum EntitlementStep {
    /// Nothing to save: the summary is older, or the same event again.
    Unchanged,
    /// Save these entitlements (optimistic concurrency on `version`; on a
    /// conflict, load again and start over).
    Save(CustomerEntitlements),
    /// List the customer's active entitlements from Stripe (in the account
    /// of [`EntitlementFetch::account`]), then call [`resume_entitlements`].
    Fetch(EntitlementFetch),
}

/// A pending request for a customer's entitlements.
#[derive(Debug, Clone)]
pub struct EntitlementFetch {
    /// Why.
    pub reason: EntitlementFetchReason,
    /// What is saved without a client: the summary's page (or the tie's
    /// winner by id), marked unverified; its `version` is the stored one.
    fallback: CustomerEntitlements,
    /// The summary's `(created, id)`: the fetched list is at least this new.
    mark: (i64, String),
    /// Whether the fallback changes nothing stored (a tie lost by id).
    fallback_unchanged: bool,
}

impl EntitlementFetch {
    /// The customer to list.
    pub fn customer(&self) -> &str {
        &self.fallback.customer
    }

    /// The account to ask (`None`: the platform).
    pub fn account(&self) -> Option<&str> {
        self.fallback.account.as_deref()
    }
}

/// What Stripe answered to an [`EntitlementFetch`].
#[derive(Debug)]
#[non_exhaustive]
pub enum EntitlementFetchOutcome {
    /// Every active entitlement's lookup key.
    Fetched {
        /// The keys (any order, repeats allowed).
        lookup_keys: Vec<String>,
        /// When the answer was read (host clock and Stripe's `Date`).
        at: FetchTime,
    },
    /// The request failed.
    Failed(ClientError),
    /// No Stripe client is configured.
    NoClient,
}

/// Decides what an entitlement summary event does to the stored
/// entitlements. Pure. The rules:
///
/// - Ordering is by `(created, event id)` of the summary event, or by the
///   time Stripe answered (its `Date`) for a list fetched from the API.
///   An older summary is stale; the same event again changes nothing.
/// - **Ties are never guessed.** A summary of the same second as the stored
///   one, from another event (or a fetch), is refetched from the API: event
///   ids are not time-ordered. Without a client the larger id wins (an
///   arbitrary but order-independent rule) and the result is marked
///   unverified (`verified == false`).
/// - **Incomplete lists are completed.** The summary carries one page of
///   entitlements; when it says `has_more`, the full list is fetched from the
///   API. Without a client the page is stored, marked unverified: a key it
///   shows is active, a key it does not show may be on a later page.
/// - A fetch that fails leaves the stored entitlements as they are and fails
///   the event retryably, so Stripe's redelivery tries again.
/// - Unverified entitlements are refetched by the reconciler's sweeps and by
///   `refresh_customer`.
///
/// # Errors
///
/// [`ParseError`] when the object is not an entitlement summary.
pub fn step_entitlements(
    current: Option<&CustomerEntitlements>,
    event: &Event,
) -> Result<EntitlementStep, ParseError> {
    let view = event.entitlement_summary()?;
    let mark = (event.created(), event.id().to_owned());
    let stored = current.map(|c| &c.watermark);
    if stored.is_some_and(|w| w.0 > mark.0 || *w == mark) {
        return Ok(EntitlementStep::Unchanged);
    }
    let tie = stored.is_some_and(|w| w.0 == mark.0);
    let mut page = CustomerEntitlements {
        customer: view.customer,
        lookup_keys: sorted(view.lookup_keys),
        watermark: mark.clone(),
        version: current.map_or(0, |c| c.version),
        account: current
            .and_then(|c| c.account.clone())
            .or_else(|| event.account().map(str::to_owned)),
        verified: view.complete,
        last_verified_with_stripe: current.and_then(|c| c.last_verified_with_stripe),
    };
    if !tie && view.complete {
        return Ok(EntitlementStep::Save(page));
    }
    let reason = if tie {
        EntitlementFetchReason::Tie
    } else {
        EntitlementFetchReason::Incomplete
    };
    // Without a client: the larger id wins the tie, unverified either way.
    let mut fallback_unchanged = false;
    if tie && let Some(c) = current.filter(|c| c.watermark > mark) {
        page = CustomerEntitlements {
            verified: false,
            ..c.clone()
        };
        fallback_unchanged = !c.verified;
    }
    page.verified = false;
    Ok(EntitlementStep::Fetch(EntitlementFetch {
        reason,
        fallback: page,
        mark,
        fallback_unchanged,
    }))
}

/// Continues after the request an [`EntitlementStep::Fetch`] asked for:
/// Stripe's list is saved, verified and stamped with Stripe's time (never
/// older than the summary); without a client the fallback is saved,
/// unverified.
///
/// # Errors
///
/// The client's error when the request failed: nothing is saved, and the
/// event should fail (retryably when the error is) so it is tried again.
pub fn resume_entitlements(
    fetch: EntitlementFetch,
    outcome: EntitlementFetchOutcome,
) -> Result<EntitlementStep, ClientError> {
    match outcome {
        EntitlementFetchOutcome::Fetched { lookup_keys, at } => {
            let fetched = entitlements_from_fetch(
                Some(&fetch.fallback),
                &fetch.fallback.customer,
                fetch.fallback.account.as_deref(),
                lookup_keys,
                at,
            );
            Ok(EntitlementStep::Save(CustomerEntitlements {
                watermark: fetched.watermark.max((fetch.mark.0, String::new())),
                ..fetched
            }))
        }
        EntitlementFetchOutcome::NoClient if fetch.fallback_unchanged => {
            Ok(EntitlementStep::Unchanged)
        }
        EntitlementFetchOutcome::NoClient => Ok(EntitlementStep::Save(fetch.fallback)),
        EntitlementFetchOutcome::Failed(e) => Err(e),
    }
}

/// The entitlements of a list fetched from Stripe (by the reconciler or
/// after a summary): verified, stamped `(Stripe's time, "")` — never older
/// than the stored watermark — and `last_verified_with_stripe` = the host's
/// time. `current` gives the version (and the account when `account` is
/// `None`).
pub fn entitlements_from_fetch(
    current: Option<&CustomerEntitlements>,
    customer: &str,
    account: Option<&str>,
    lookup_keys: Vec<String>,
    at: FetchTime,
) -> CustomerEntitlements {
    let stamp = (at.stamp().unix_timestamp(), String::new());
    CustomerEntitlements {
        customer: customer.to_owned(),
        lookup_keys: sorted(lookup_keys),
        watermark: current
            .map_or(stamp.clone(), |c| c.watermark.clone())
            .max(stamp),
        version: current.map_or(0, |c| c.version),
        account: account
            .map(str::to_owned)
            .or_else(|| current.and_then(|c| c.account.clone())),
        verified: true,
        last_verified_with_stripe: Some(at.local),
    }
}

/// Decides an entitlement summary without a Stripe client: the summary
/// applied by the rules above, with ties decided by id and incomplete
/// lists kept as the page shown, both unverified. `None` when the stored
/// entitlements are newer or the same.
///
/// # Errors
///
/// [`ParseError`] when the object is not an entitlement summary.
pub fn decide_entitlements(
    current: Option<&CustomerEntitlements>,
    event: &Event,
) -> Result<Option<CustomerEntitlements>, ParseError> {
    Ok(match step_entitlements(current, event)? {
        EntitlementStep::Unchanged => None,
        EntitlementStep::Save(e) => Some(e),
        EntitlementStep::Fetch(f) => {
            match resume_entitlements(f, EntitlementFetchOutcome::NoClient) {
                Ok(EntitlementStep::Save(e)) => Some(e),
                _ => None,
            }
        }
    })
}

fn sorted(mut keys: Vec<String>) -> Vec<String> {
    keys.sort();
    keys.dedup();
    keys
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::ClientErrorKind;

    fn summary(id: &str, created: i64, keys: &[&str], has_more: bool) -> Event {
        let data: Vec<String> = keys
            .iter()
            .map(|k| format!(r#"{{"id":"ent_{k}","lookup_key":"{k}","feature":"feat_{k}"}}"#))
            .collect();
        Event::parse_unverified(
            format!(
                r#"{{"id":"{id}","object":"event","type":"entitlements.active_entitlement_summary.updated",
                "created":{created},"livemode":false,"data":{{"object":{{"object":"entitlements.active_entitlement_summary",
                "customer":"cus_1","entitlements":{{"object":"list","has_more":{has_more},"data":[{}]}}}}}}}}"#,
                data.join(",")
            )
            .as_bytes(),
        )
        .unwrap()
    }

    fn at(local: i64, stripe: Option<i64>) -> FetchTime {
        FetchTime {
            local: OffsetDateTime::from_unix_timestamp(local).unwrap(),
            stripe: stripe.map(|s| OffsetDateTime::from_unix_timestamp(s).unwrap()),
        }
    }

    fn saved(step: EntitlementStep) -> CustomerEntitlements {
        match step {
            EntitlementStep::Save(e) => e,
            other => panic!("{other:?}"),
        }
    }

    /// Regression: a feature on the summary's second page used to be
    /// `NotEntitled`, because `has_more` was never read.
    #[test]
    fn an_incomplete_summary_is_completed_from_the_api() {
        let e = summary("evt_1", 100, &["a"], true);
        let EntitlementStep::Fetch(fetch) = step_entitlements(None, &e).unwrap() else {
            panic!("an incomplete list must be fetched")
        };
        assert_eq!(fetch.reason, EntitlementFetchReason::Incomplete);
        assert_eq!(fetch.customer(), "cus_1");
        let done = saved(
            resume_entitlements(
                fetch.clone(),
                EntitlementFetchOutcome::Fetched {
                    lookup_keys: vec!["b".into(), "a".into()],
                    at: at(160, Some(101)),
                },
            )
            .unwrap(),
        );
        assert_eq!(done.lookup_keys, ["a", "b"]);
        assert!(done.verified);
        // Stripe's time stamps it; the host's (a minute ahead) verifies it.
        assert_eq!(done.watermark, (101, String::new()));
        assert_eq!(
            done.last_verified_with_stripe
                .map(OffsetDateTime::unix_timestamp),
            Some(160)
        );
        // Without a client: the page, unverified.
        let page =
            saved(resume_entitlements(fetch.clone(), EntitlementFetchOutcome::NoClient).unwrap());
        assert_eq!(
            (page.lookup_keys.clone(), page.verified),
            (vec!["a".to_owned()], false)
        );
        // A failed fetch saves nothing and hands the error back.
        let err = resume_entitlements(
            fetch,
            EntitlementFetchOutcome::Failed(ClientError::new(ClientErrorKind::Transport, "x")),
        )
        .unwrap_err();
        assert!(err.is_retryable());
    }

    /// Regression: two summaries of one second were ordered by event id,
    /// which is not time-ordered.
    #[test]
    fn a_same_second_summary_is_refetched_not_guessed() {
        let first = decide_entitlements(None, &summary("evt_b", 100, &["a"], false))
            .unwrap()
            .unwrap();
        assert!(first.verified);
        let tie = summary("evt_a", 100, &["z"], false);
        let EntitlementStep::Fetch(fetch) = step_entitlements(Some(&first), &tie).unwrap() else {
            panic!("a tie must be refetched")
        };
        assert_eq!(fetch.reason, EntitlementFetchReason::Tie);
        let done = saved(
            resume_entitlements(
                fetch,
                EntitlementFetchOutcome::Fetched {
                    lookup_keys: vec!["z".into()],
                    at: at(100, None),
                },
            )
            .unwrap(),
        );
        assert_eq!(
            (done.lookup_keys, done.verified),
            (vec!["z".to_owned()], true)
        );
        // Without a client, the rule is by id (evt_b > evt_a keeps "a"),
        // and the record says it was not checked; in either arrival order.
        let kept = decide_entitlements(Some(&first), &tie).unwrap().unwrap();
        assert_eq!(
            (kept.lookup_keys.clone(), kept.verified),
            (vec!["a".to_owned()], false)
        );
        let other_first = decide_entitlements(None, &tie).unwrap().unwrap();
        let won = decide_entitlements(Some(&other_first), &summary("evt_b", 100, &["a"], false))
            .unwrap()
            .unwrap();
        assert_eq!(
            (won.lookup_keys, won.verified),
            (vec!["a".to_owned()], false)
        );
        // Older and identical summaries change nothing.
        assert!(
            decide_entitlements(Some(&first), &summary("evt_c", 99, &["q"], false))
                .unwrap()
                .is_none()
        );
        assert!(
            decide_entitlements(Some(&first), &summary("evt_b", 100, &["a"], false))
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn a_fetch_is_never_older_than_what_is_stored() {
        let stored = decide_entitlements(None, &summary("evt_1", 200, &["a"], false))
            .unwrap()
            .unwrap();
        // Stripe's time says 150 (a skewed proxy, say): the watermark stays.
        let fetched = entitlements_from_fetch(
            Some(&stored),
            "cus_1",
            None,
            vec!["b".into()],
            at(210, Some(150)),
        );
        assert_eq!(fetched.watermark, stored.watermark);
        assert_eq!(fetched.lookup_keys, ["b"]);
    }
}
