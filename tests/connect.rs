//! Connect accounts, Stripe's clock on refetches, entitlement pages and
//! event generation failures, end to end against the fake Stripe (a
//! platform holding several connected accounts).
#![cfg(feature = "test-util")]

use std::collections::HashMap;
use std::sync::Arc;

use stripe_webhook_guard::client::{BudgetConfig, RequestBudget, StripeClient};
use stripe_webhook_guard::clock::ManualClock;
use stripe_webhook_guard::event::{Event, SubscriptionStatus};
use stripe_webhook_guard::processor::{AccountFilter, WebhookProcessor};
use stripe_webhook_guard::reconcile::{
    EVENTS_CURSOR, ReconcileConfig, Reconciler, RecoveryRequest, SweepScope, events_cursor,
};
use stripe_webhook_guard::signature::Verifier;
use stripe_webhook_guard::store::{CursorStore, EventLedger, MemoryStore, SubscriptionStore};
use stripe_webhook_guard::testing::{FakeConfig, FakeStripe, Subscribe};
use time::Duration;

const START: i64 = 1_767_225_600; // 2026-01-01

struct Platform {
    clock: ManualClock,
    fake: Arc<FakeStripe>,
    store: Arc<MemoryStore>,
    processor: WebhookProcessor,
    /// The one request budget of the platform's key: the processor's
    /// refetches and the reconciler share it.
    budget: Arc<RequestBudget>,
}

/// A platform fake and a processor of every account's events, on one clock
/// (`processor_clock` lets the host run ahead of Stripe).
fn platform(config: FakeConfig, processor_clock: Option<ManualClock>, client: bool) -> Platform {
    let clock = ManualClock::at_unix(START);
    let fake = Arc::new(FakeStripe::new(clock.clone(), config));
    let host = processor_clock.unwrap_or_else(|| clock.clone());
    let budget = Arc::new(RequestBudget::new(
        fake.clone(),
        Arc::new(clock.clone()),
        BudgetConfig {
            requests_per_second: 1000,
            ..BudgetConfig::default()
        },
    ));
    let store = Arc::new(MemoryStore::with_clock(Arc::new(host.clone())));
    let mut builder = WebhookProcessor::builder(Verifier::new("whsec_connect"))
        .store(store.clone())
        .clock(Arc::new(host))
        .accounts(AccountFilter::Any);
    if client {
        builder = builder.client(budget.clone());
    }
    Platform {
        clock,
        fake,
        store,
        processor: builder.build(),
        budget,
    }
}

fn reconciler(p: &Platform, accounts: &[String]) -> Reconciler {
    Reconciler::new(p.processor.clone(), p.fake.clone())
        .with_shared_budget(p.budget.clone())
        .config(ReconcileConfig {
            lookback: Duration::days(30),
            connected_accounts: accounts.to_vec(),
            ..ReconcileConfig::default()
        })
}

fn accounts_of_records(store: &MemoryStore) -> HashMap<String, Option<String>> {
    store
        .all_subscriptions()
        .into_iter()
        .map(|r| (r.id, r.account))
        .collect()
}

#[tokio::test]
async fn catch_up_and_sweep_cover_each_connected_account_with_one_budget() {
    let p = platform(FakeConfig::default(), None, true);
    let (a1, a2) = (p.fake.create_account(), p.fake.create_account());
    let mut expected = HashMap::new();
    for (account, n) in [(None, 1), (Some(&a1), 2), (Some(&a2), 3)] {
        let fake = account.map_or_else(|| p.fake.clone(), |a| p.fake.account(a).unwrap());
        for _ in 0..n {
            let c = fake.create_customer();
            let sub = fake.subscribe(&c, &Subscribe::default());
            expected.insert(sub, account.cloned());
        }
    }
    let r = reconciler(&p, &[a1.clone(), a2.clone()]);
    let report = r.catch_up().await.unwrap();
    assert!(report.account_failures.is_empty(), "{report:?}");
    // Every subscription, in its account.
    assert_eq!(accounts_of_records(&p.store), expected);
    // Each account has its own cursor.
    assert_eq!(report.cursor, Some(START));
    assert_eq!(report.account_cursors.len(), 2);
    for a in [&a1, &a2] {
        assert_eq!(
            p.store.load_cursor(&events_cursor(Some(a))).await.unwrap(),
            Some(START.to_string())
        );
    }
    // The same events arrive by webhook: duplicates (same ledger key).
    for a in [&a1, &a2] {
        for fe in p.fake.account(a).unwrap().take_new_events() {
            assert_eq!(fe.event.account(), Some(a.as_str()));
            let outcome = p.processor.process_event(&fe.event).await.unwrap();
            assert_eq!(outcome.as_str(), "duplicate", "{}", fe.event.id());
        }
    }
    // One budget: every request of the run (listings in three accounts and
    // the processor's refetches) went through it and was counted.
    assert_eq!(report.requests, p.fake.request_count());
    assert!(
        report.requests >= 3 + 6,
        "a listing per account, a refetch per subscription"
    );

    // A sweep over every account finds everything in sync.
    p.clock.advance(Duration::hours(2));
    let sweep = r.sweep(SweepScope::All).await.unwrap();
    assert_eq!(sweep.subscriptions_checked, 6);
    assert!(sweep.changes.is_empty(), "{:?}", sweep.changes);
    // A change made in one account while we were not listening is repaired
    // there, and reported with its account.
    let shop = p.fake.account(&a2).unwrap();
    let sub = expected
        .iter()
        .find(|(_, a)| a.as_ref() == Some(&a2))
        .unwrap()
        .0;
    shop.cancel_now(sub);
    let sweep = r.sweep(SweepScope::All).await.unwrap();
    let change = sweep
        .changes
        .iter()
        .find(|c| &c.subscription_id == sub)
        .unwrap();
    assert_eq!(change.account.as_deref(), Some(a2.as_str()));
    assert_eq!(
        p.store.load(sub).await.unwrap().unwrap().state.status,
        SubscriptionStatus::Canceled
    );
}

#[tokio::test]
async fn an_account_that_fails_does_not_stop_the_others_and_only_swept_records_are_flagged() {
    let p = platform(FakeConfig::default(), None, true);
    let a1 = p.fake.create_account();
    let shop = p.fake.account(&a1).unwrap();
    let c = shop.create_customer();
    let sub = shop.subscribe(&c, &Subscribe::default());
    // An account the platform is not connected to (or no longer is).
    let gone = "acct_disconnected".to_owned();
    let r = reconciler(&p, &[gone.clone(), a1.clone()]);
    let report = r.catch_up().await.unwrap();
    assert_eq!(report.account_failures.len(), 1);
    assert_eq!(report.account_failures[0].account, gone);
    assert!(report.account_failures[0].error.contains("403"));
    assert_eq!(
        accounts_of_records(&p.store).get(&sub),
        Some(&Some(a1.clone()))
    );
    // A local record of the failed account is not flagged as unknown to
    // Stripe by a full sweep (its listing never completed).
    let mut orphan = p.store.load(&sub).await.unwrap().unwrap();
    orphan.id = "sub_of_gone".into();
    orphan.account = Some(gone.clone());
    orphan.version = 0;
    p.store.save(&orphan).await.unwrap();
    p.clock.advance(Duration::hours(2));
    let sweep = r.sweep(SweepScope::All).await.unwrap();
    assert!(
        !p.store
            .load("sub_of_gone")
            .await
            .unwrap()
            .unwrap()
            .needs_review
    );
    assert_eq!(sweep.account_failures.len(), 1);
}

/// Regression (refetches of a connected account's event used the
/// platform): an unknown subscription of a connected account is refetched
/// with its account and saved as Stripe's object.
#[tokio::test]
async fn a_connected_accounts_event_is_refetched_in_its_account() {
    let p = platform(FakeConfig::default(), None, true);
    let a1 = p.fake.create_account();
    let shop = p.fake.account(&a1).unwrap();
    let c = shop.create_customer();
    let sub = shop.subscribe(&c, &Subscribe::default());
    let events = shop.take_new_events();
    let first = events
        .iter()
        .find(|e| e.event.event_type().as_str() == "customer.subscription.created")
        .unwrap();
    let outcome = p.processor.process_event(&first.event).await.unwrap();
    assert_eq!(outcome.as_str(), "refetched");
    let record = p.store.load(&sub).await.unwrap().unwrap();
    assert!(
        !record.needs_reconcile,
        "the refetch failed: {:?} {outcome:?}",
        record.anomalies
    );
    assert_eq!(record.account.as_deref(), Some(a1.as_str()));
    // Stripe's current object (active after checkout), not the created
    // event's `incomplete` snapshot.
    assert_eq!(record.state.status, SubscriptionStatus::Active);
    // The platform cannot see that subscription without the header.
    let err = p.fake.retrieve_subscription(None, &sub).await.unwrap_err();
    assert_eq!(err.status(), Some(404));
}

/// Regression (refetch watermarks were stamped with the local clock): with
/// the host a minute ahead of Stripe, an event Stripe creates 30 s after a
/// refetch was stale; stamped with Stripe's `Date` it applies.
#[tokio::test]
async fn refetch_watermarks_follow_stripes_clock_not_the_hosts() {
    let host = ManualClock::at_unix(START + 60);
    let p = platform(FakeConfig::default(), Some(host.clone()), true);
    let c = p.fake.create_customer();
    let sub = p.fake.subscribe(&c, &Subscribe::default());
    let events = p.fake.take_new_events();
    // The first event is of an unknown subscription: refetched.
    let created = events
        .iter()
        .find(|e| e.event.event_type().as_str() == "customer.subscription.created")
        .unwrap();
    let outcome = p.processor.process_event(&created.event).await.unwrap();
    assert_eq!(outcome.as_str(), "refetched");
    let record = p.store.load(&sub).await.unwrap().unwrap();
    assert_eq!(record.watermark.as_ref().unwrap().created, START);
    assert_eq!(
        record
            .last_verified_with_stripe
            .map(time::OffsetDateTime::unix_timestamp),
        Some(START + 60),
        "verification is the host's time, for the host's access decisions"
    );
    // 30 s later (Stripe's clock) the customer cancels at period end.
    p.clock.advance(Duration::seconds(30));
    host.advance(Duration::seconds(30));
    p.fake.cancel_at_period_end(&sub, true);
    let update = p
        .fake
        .take_new_events()
        .into_iter()
        .find(|e| e.event.event_type().as_str() == "customer.subscription.updated")
        .unwrap();
    assert_eq!(update.event.created(), START + 30);
    let outcome = p.processor.process_event(&update.event).await.unwrap();
    assert_eq!(outcome.as_str(), "applied", "{outcome:?}");
    assert!(
        p.store
            .load(&sub)
            .await
            .unwrap()
            .unwrap()
            .state
            .cancel_at_period_end
    );
}

fn features() -> FakeConfig {
    FakeConfig {
        features: [(
            "price_basic".to_owned(),
            vec!["alpha".to_owned(), "beta".to_owned(), "gamma".to_owned()],
        )]
        .into_iter()
        .collect(),
        // The summary event shows one entitlement of three (`has_more`).
        entitlement_summary_limit: Some(1),
        ..FakeConfig::default()
    }
}

fn summary_events(fake: &FakeStripe) -> Vec<Event> {
    fake.take_new_events()
        .into_iter()
        .map(|e| e.event)
        .filter(|e| e.event_type().as_str() == "entitlements.active_entitlement_summary.updated")
        .collect()
}

/// Regression: a feature past the summary's first page was `NotEntitled`.
#[tokio::test]
async fn an_incomplete_entitlement_summary_is_completed_from_the_api() {
    let p = platform(features(), None, true);
    let c = p.fake.create_customer();
    p.fake.subscribe(&c, &Subscribe::default());
    let summaries = summary_events(&p.fake);
    assert_eq!(summaries.len(), 1);
    assert!(
        summaries[0]
            .entitlement_summary()
            .unwrap()
            .lookup_keys
            .len()
            == 1
    );
    p.processor.process_event(&summaries[0]).await.unwrap();
    let stored = p.store.load_entitlements(&c).await.unwrap().unwrap();
    assert_eq!(stored.lookup_keys, ["alpha", "beta", "gamma"]);
    assert!(stored.verified);
}

#[tokio::test]
async fn unverified_entitlements_are_repaired_by_sweep_and_refresh() {
    // No client on the processor: the page is kept, unverified.
    let p = platform(features(), None, false);
    let c = p.fake.create_customer();
    p.fake.subscribe(&c, &Subscribe::default());
    for e in p.fake.take_new_events() {
        p.processor.process_event(&e.event).await.unwrap();
    }
    let stored = p.store.load_entitlements(&c).await.unwrap().unwrap();
    assert_eq!((stored.lookup_keys.len(), stored.verified), (1, false));
    // A stale sweep (the record was just verified, so not retrieved)
    // still refetches the unverified entitlements.
    let r = reconciler(&p, &[]);
    let report = r
        .sweep(SweepScope::StaleFor(Duration::days(1)))
        .await
        .unwrap();
    assert_eq!(report.entitlements_refreshed, 1);
    let stored = p.store.load_entitlements(&c).await.unwrap().unwrap();
    assert_eq!(stored.lookup_keys, ["alpha", "beta", "gamma"]);
    assert!(stored.verified);
    // A second sweep leaves verified entitlements alone.
    let again = r
        .sweep(SweepScope::StaleFor(Duration::days(1)))
        .await
        .unwrap();
    assert_eq!(again.entitlements_refreshed, 0);

    // A summary missed for good (no event, ever) is repaired at login.
    p.fake.cancel_now(&p.fake.subscription_ids()[0]);
    p.fake.take_new_events();
    p.clock.advance(Duration::hours(2));
    let refreshed = r.refresh_customer(&c).await.unwrap();
    assert_eq!(refreshed.entitlements_refreshed, 1);
    let stored = p.store.load_entitlements(&c).await.unwrap().unwrap();
    assert!(stored.lookup_keys.is_empty(), "{stored:?}");
}

#[tokio::test]
async fn a_connected_customers_entitlements_are_fetched_in_its_account() {
    let p = platform(features(), None, true);
    let a1 = p.fake.create_account();
    let shop = p.fake.account(&a1).unwrap();
    let c = shop.create_customer();
    shop.subscribe(&c, &Subscribe::default());
    for e in summary_events(&shop) {
        p.processor.process_event(&e).await.unwrap();
    }
    let stored = p.store.load_entitlements(&c).await.unwrap().unwrap();
    assert_eq!(stored.lookup_keys, ["alpha", "beta", "gamma"]);
    assert_eq!(stored.account.as_deref(), Some(a1.as_str()));
    let r = reconciler(&p, std::slice::from_ref(&a1));
    let report = r.refresh_customer_in(Some(&a1), &c).await.unwrap();
    assert_eq!(report.entitlements_refreshed, 1);
    assert!(report.account_failures.is_empty());
}

fn generation_failure(id: &str, created: i64, account: Option<&str>) -> Event {
    let created = time::OffsetDateTime::from_unix_timestamp(created)
        .unwrap()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    let context = account.map_or(String::new(), |a| format!(r#","context":"{a}""#));
    Event::parse_unverified(
        format!(
            r#"{{"id":"{id}","object":"v2.core.event","type":"v2.core.health.event_generation_failure.resolved",
            "created":"{created}","livemode":false{context}}}"#
        )
        .as_bytes(),
    )
    .unwrap()
}

/// Stripe reports that it failed to generate events: the next catch-up goes
/// back over the window, in the account the alert names, although its
/// cursor had moved past it.
#[tokio::test]
async fn an_event_generation_failure_triggers_a_catch_up_over_its_window() {
    let p = platform(FakeConfig::default(), None, true);
    let a1 = p.fake.create_account();
    let shop = p.fake.account(&a1).unwrap();
    let c = shop.create_customer();
    let sub = shop.subscribe(&c, &Subscribe::default());
    shop.take_new_events();
    p.clock.advance(Duration::hours(3));
    // The cursor is already past those events (as if they had been listed
    // before they appeared, or lost).
    let now = START + 3 * 3600;
    p.store
        .save_cursor(&events_cursor(Some(&a1)), &now.to_string())
        .await
        .unwrap();
    p.store
        .save_cursor(EVENTS_CURSOR, &now.to_string())
        .await
        .unwrap();
    let r = reconciler(&p, std::slice::from_ref(&a1));
    let before = r.catch_up().await.unwrap();
    assert_eq!(before.events_processed, 0);
    assert!(p.store.load(&sub).await.unwrap().is_none());

    // The alert arrives by webhook (a thin event, the account in
    // `context`): recorded, acknowledged.
    let alert = generation_failure("evt_test_65Rhealth", now, Some(&a1));
    let outcome = p.processor.process_event(&alert).await.unwrap();
    assert_eq!(outcome.as_str(), "none", "{outcome:?}");
    assert_eq!(
        RecoveryRequest::pending(p.store.as_ref(), Some(&a1))
            .await
            .unwrap(),
        Some(now)
    );
    let report = r.catch_up().await.unwrap();
    assert_eq!(report.recoveries, 1);
    assert!(report.events_processed > 0);
    assert_eq!(
        p.store
            .load(&sub)
            .await
            .unwrap()
            .unwrap()
            .account
            .as_deref(),
        Some(a1.as_str())
    );
    // Settled: the next run does not go back again.
    assert_eq!(
        RecoveryRequest::pending(p.store.as_ref(), Some(&a1))
            .await
            .unwrap(),
        None
    );
    let next = r.catch_up().await.unwrap();
    assert_eq!((next.recoveries, next.events_processed), (0, 0));
    // The alert itself is in the ledger once.
    let again = p.processor.process_event(&alert).await.unwrap();
    assert_eq!(again.as_str(), "duplicate");
    assert!(
        p.store
            .get(&stripe_webhook_guard::ledger::EventKey::of(&alert))
            .await
            .unwrap()
            .is_some()
    );
}
