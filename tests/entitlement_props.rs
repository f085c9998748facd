//! Property tests for entitlement ordering (issue 13, item 3): a customer's
//! `entitlements.active_entitlement_summary.updated` events, delivered in any
//! order, each 1–3 times, with many summaries in the same second and some
//! lists shown only in part (`has_more`), end with Stripe's final
//! entitlements when a client answers the refetches; same-second summaries
//! are always refetched, never ordered by event id. Without a client the
//! result does not depend on the delivery order, and it is marked verified
//! only when it is Stripe's final state.
//!
//! The history is generated in Stripe's order: each summary replaces the
//! previous one, `created` never decreases and often repeats (one-second
//! resolution), and event ids are random (not time-ordered), as Stripe's are.
//! Stripe's final state is the last summary's complete list; a refetch
//! answers it, dated at or after the last summary. The rules are checked on
//! the sans-IO machine (`step_entitlements` / `resume_entitlements`) and end
//! to end through the `WebhookProcessor` and its store.

use std::sync::Arc;

use proptest::prelude::*;
use stripe_webhook_guard::client::{
    ActiveEntitlement, ClientError, ClientErrorKind, EntitlementListQuery, EventListQuery, Page,
    RefusingClient, Response, StripeClient, SubscriptionListQuery,
};
use stripe_webhook_guard::event::{Event, SubscriptionView};
use stripe_webhook_guard::processor::WebhookProcessor;
use stripe_webhook_guard::signature::Verifier;
use stripe_webhook_guard::store::{MemoryStore, SubscriptionStore};
use stripe_webhook_guard::subscription::{
    CustomerEntitlements, EntitlementFetchOutcome, EntitlementFetchReason, EntitlementStep,
    FetchTime, resume_entitlements, step_entitlements,
};
use time::OffsetDateTime;

const START: i64 = 1_767_225_600;
const KEYS: [&str; 6] = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta"];

/// One summary as Stripe generated it.
#[derive(Debug, Clone)]
struct Summary {
    id: String,
    created: i64,
    /// Every active key (sorted): Stripe's state after this summary.
    keys: Vec<String>,
    /// How many keys the event shows (`has_more` when fewer than all).
    shown: usize,
}

impl Summary {
    fn event(&self) -> Event {
        let data: Vec<String> = self
            .keys
            .iter()
            .take(self.shown)
            .map(|k| {
                format!(
                    r#"{{"id":"ent_{k}","object":"entitlements.active_entitlement","feature":"feat_{k}","lookup_key":"{k}","livemode":false}}"#
                )
            })
            .collect();
        let has_more = self.shown < self.keys.len();
        let body = format!(
            r#"{{"id":"{}","object":"event","type":"entitlements.active_entitlement_summary.updated","created":{},"livemode":false,"api_version":"2025-03-31.basil","data":{{"object":{{"object":"entitlements.active_entitlement_summary","customer":"cus_1","livemode":false,"entitlements":{{"object":"list","url":"/v1/customer/entitlements","has_more":{has_more},"data":[{}]}}}}}}}}"#,
            self.id,
            self.created,
            data.join(",")
        );
        Event::parse_unverified(body.as_bytes()).expect("a well-formed summary")
    }
}

/// A history of 1–10 summaries: gaps of 0 s (a tie) to 2 s, random ids,
/// random key sets, some shown in part.
fn history() -> impl Strategy<Value = Vec<Summary>> {
    let one = (
        prop_oneof![3 => Just(0i64), 2 => Just(1i64), 1 => Just(2i64)],
        "[a-zA-Z0-9]{14}",
        proptest::collection::btree_set(0usize..KEYS.len(), 0..=KEYS.len()),
        0usize..=KEYS.len(),
        any::<bool>(),
    );
    proptest::collection::vec(one, 1..10).prop_map(|raw| {
        let mut created = START;
        raw.into_iter()
            .enumerate()
            .map(|(n, (gap, id, keys, limit, partial))| {
                created += gap;
                let mut keys: Vec<String> = keys.into_iter().map(|k| KEYS[k].to_owned()).collect();
                keys.sort();
                Summary {
                    // A position suffix keeps ids unique; the random part
                    // decides their order.
                    id: format!("evt_{id}{n:02}"),
                    created,
                    shown: if partial {
                        limit.min(keys.len())
                    } else {
                        keys.len()
                    },
                    keys,
                }
            })
            .collect()
    })
}

/// The delivery: every summary 1–3 times, in an order chosen by `order`.
fn delivery(history: &[Summary], copies: &[u8], order: &[usize]) -> Vec<Event> {
    let mut out: Vec<Event> = Vec::new();
    for (s, n) in history.iter().zip(copies.iter().cycle()) {
        for _ in 0..=(*n % 3) {
            out.push(s.event());
        }
    }
    // A permutation driven by the generated indices (Fisher–Yates).
    for (i, pick) in (0..out.len()).rev().zip(order.iter().cycle()) {
        out.swap(i, pick % (i + 1));
    }
    out
}

/// Applies `events` in order through the sans-IO machine. With `truth`
/// (a client), refetches answer Stripe's final keys dated `answered_at`;
/// without, the fallback is saved. Checks on every step that a summary of
/// the stored second from another event is refetched, never decided by id.
fn run(
    events: &[Event],
    truth: Option<(&[String], i64)>,
) -> Result<(Option<CustomerEntitlements>, usize), TestCaseError> {
    let mut stored: Option<CustomerEntitlements> = None;
    let mut tie_fetches = 0;
    for event in events {
        let step = step_entitlements(stored.as_ref(), event)
            .map_err(|e| TestCaseError::fail(format!("step: {e}")))?;
        let tied = stored
            .as_ref()
            .is_some_and(|s| s.watermark.0 == event.created() && s.watermark.1 != event.id());
        let step = match step {
            EntitlementStep::Fetch(fetch) => {
                prop_assert_eq!(
                    fetch.reason == EntitlementFetchReason::Tie,
                    tied,
                    "a refetch is a tie exactly when the seconds are equal"
                );
                if tied {
                    tie_fetches += 1;
                }
                let outcome = match truth {
                    Some((keys, at)) => EntitlementFetchOutcome::Fetched {
                        lookup_keys: keys.to_vec(),
                        at: FetchTime {
                            local: OffsetDateTime::from_unix_timestamp(at + 1).unwrap(),
                            stripe: Some(OffsetDateTime::from_unix_timestamp(at).unwrap()),
                        },
                    },
                    None => EntitlementFetchOutcome::NoClient,
                };
                resume_entitlements(fetch, outcome)
                    .map_err(|e| TestCaseError::fail(format!("resume: {e}")))?
            }
            other => {
                prop_assert!(!tied, "a same-second summary was decided without a refetch");
                other
            }
        };
        if let EntitlementStep::Save(mut saved) = step {
            saved.version += 1;
            stored = Some(saved);
        }
    }
    Ok((stored, tie_fetches))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    /// With a client: any order, any duplication, same-second ties and
    /// partial pages end with exactly Stripe's final entitlements, verified.
    #[test]
    fn any_order_ends_in_stripes_final_entitlements(
        h in history(),
        copies in proptest::collection::vec(any::<u8>(), 1..8),
        order in proptest::collection::vec(any::<usize>(), 1..32),
        answer_delay in 0i64..3,
    ) {
        let last = h.last().unwrap();
        let events = delivery(&h, &copies, &order);
        let (stored, _) = run(&events, Some((&last.keys, last.created + answer_delay)))?;
        let stored = stored.unwrap();
        prop_assert_eq!(&stored.lookup_keys, &last.keys);
        prop_assert!(stored.verified);
        prop_assert!(stored.watermark.0 >= last.created);
        // Delivering everything again changes nothing.
        let (again, _) = run(&[events.clone(), events].concat(), Some((&last.keys, last.created + answer_delay)))?;
        prop_assert_eq!(&again.unwrap().lookup_keys, &last.keys);
    }

    /// Without a client: the result does not depend on the delivery order
    /// or duplication, and it says `verified` only when it is Stripe's final
    /// state (a tie decided by id or a partial page is unverified).
    #[test]
    fn without_a_client_the_result_is_order_independent_and_honest(
        h in history(),
        copies in proptest::collection::vec(any::<u8>(), 1..8),
        order in proptest::collection::vec(any::<usize>(), 1..32),
        other_order in proptest::collection::vec(any::<usize>(), 1..32),
    ) {
        let last = h.last().unwrap();
        let (a, _) = run(&delivery(&h, &copies, &order), None)?;
        let (b, _) = run(&delivery(&h, &[0], &other_order), None)?;
        let (a, b) = (a.unwrap(), b.unwrap());
        prop_assert_eq!(&a.lookup_keys, &b.lookup_keys);
        prop_assert_eq!(&a.watermark, &b.watermark);
        prop_assert_eq!(a.verified, b.verified);
        if a.verified {
            prop_assert_eq!(&a.lookup_keys, &last.keys);
        }
        // The newest second is kept.
        prop_assert_eq!(a.watermark.0, last.created);
        // A lone, complete last summary is Stripe's final state, verified.
        let alone = h.iter().filter(|s| s.created == last.created).count() == 1;
        if alone && last.shown == last.keys.len() {
            prop_assert!(a.verified);
            prop_assert_eq!(&a.lookup_keys, &last.keys);
        }
    }
}

/// Stripe for the processor: lists the customer's final entitlements,
/// dated `date`; refuses everything else.
struct FinalEntitlements {
    keys: Vec<String>,
    date: i64,
    refuse: RefusingClient,
}

#[async_trait::async_trait]
impl StripeClient for FinalEntitlements {
    async fn retrieve_subscription(
        &self,
        account: Option<&str>,
        id: &str,
    ) -> Result<Response<SubscriptionView>, ClientError> {
        self.refuse.retrieve_subscription(account, id).await
    }
    async fn list_subscriptions(
        &self,
        account: Option<&str>,
        query: &SubscriptionListQuery,
    ) -> Result<Response<Page<SubscriptionView>>, ClientError> {
        self.refuse.list_subscriptions(account, query).await
    }
    async fn list_events(
        &self,
        account: Option<&str>,
        query: &EventListQuery,
    ) -> Result<Response<Page<Event>>, ClientError> {
        self.refuse.list_events(account, query).await
    }
    async fn retrieve_event(
        &self,
        account: Option<&str>,
        id: &str,
    ) -> Result<Response<Event>, ClientError> {
        self.refuse.retrieve_event(account, id).await
    }
    async fn list_active_entitlements(
        &self,
        _: Option<&str>,
        query: &EntitlementListQuery,
    ) -> Result<Response<Page<ActiveEntitlement>>, ClientError> {
        assert_eq!(query.customer, "cus_1");
        let data = self
            .keys
            .iter()
            .map(|k| ActiveEntitlement {
                id: format!("ent_{k}"),
                lookup_key: k.clone(),
            })
            .collect();
        Ok(Response::new(Page {
            data,
            has_more: false,
        })
        .with_date(OffsetDateTime::from_unix_timestamp(self.date).ok()))
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// The same through the [`WebhookProcessor`] and its store (load, step,
    /// fetch through the client, resume, save): the stored entitlements end
    /// as Stripe's final ones, and every summary is processed without error.
    #[test]
    fn through_the_processor_any_order_ends_in_stripes_final_entitlements(
        h in history(),
        copies in proptest::collection::vec(any::<u8>(), 1..8),
        order in proptest::collection::vec(any::<usize>(), 1..32),
    ) {
        let last = h.last().unwrap().clone();
        let events = delivery(&h, &copies, &order);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let stored = runtime.block_on(async {
            let store = Arc::new(MemoryStore::new());
            let client = FinalEntitlements {
                keys: last.keys.clone(),
                date: last.created,
                refuse: RefusingClient::new(ClientErrorKind::Api, "not in this test"),
            };
            let processor = WebhookProcessor::builder(Verifier::new("whsec_props"))
                .store(store.clone())
                .client(Arc::new(client))
                .build();
            for event in &events {
                processor.process_event(event).await.expect("processed");
            }
            store.load_entitlements("cus_1").await.unwrap()
        });
        let stored = stored.unwrap();
        prop_assert_eq!(&stored.lookup_keys, &last.keys);
        prop_assert!(stored.verified);
    }
}

/// A fixed case of what the properties cover: two summaries of the last
/// second, the later one (Stripe's final state) with the smaller id,
/// delivered newest first.
#[test]
fn a_tie_in_the_last_second_is_refetched() {
    let h = [
        Summary {
            id: "evt_zz".into(),
            created: START,
            keys: vec!["alpha".into(), "beta".into()],
            shown: 2,
        },
        Summary {
            id: "evt_aa".into(),
            created: START,
            keys: vec!["gamma".into()],
            shown: 1,
        },
    ];
    let events: Vec<Event> = h.iter().rev().map(Summary::event).collect();
    let truth = vec!["gamma".to_owned()];
    let (stored, ties) = run(&events, Some((&truth, START))).unwrap();
    let stored = stored.unwrap();
    assert_eq!(ties, 1);
    assert_eq!(stored.lookup_keys, truth);
    assert!(stored.verified);
    // Without a client the larger id wins and is marked unverified: a
    // guess, never presented as Stripe's state.
    let (guess, _) = run(&events, None).unwrap();
    let guess = guess.unwrap();
    assert_eq!(guess.lookup_keys, ["alpha", "beta"]);
    assert!(!guess.verified);
}
