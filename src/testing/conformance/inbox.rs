//! Rules of the inbox queue.

// One suite in several files: the parent's helpers are this file's too.
#[allow(clippy::wildcard_imports)]
use super::*;
use crate::store::InboxItem;
use std::future::Future;

fn inbox_request(id: &str, sub: Option<&str>, created: i64) -> InboxRequest {
    InboxRequest {
        claim: ClaimRequest {
            event_created: created,
            ..request(id, 3)
        },
        payload: format!(r#"{{"id":"{id}"}}"#),
        subscription_id: sub.map(str::to_owned),
    }
}

/// Inbox: enqueue is insert-if-absent; workers take the oldest first, one
/// event per subscription at a time, and a completed event frees its
/// subscription.
pub async fn inbox_orders_and_serializes<S: InboxStore + ?Sized>(store: &S, clock: &dyn Clock) {
    let _ = clock;
    let reqs = [
        inbox_request("evt_conf_in_3", Some("sub_x"), 30),
        inbox_request("evt_conf_in_1", Some("sub_x"), 10),
        inbox_request("evt_conf_in_2", Some("sub_y"), 20),
        inbox_request("evt_conf_in_4", None, 40),
    ];
    for r in &reqs {
        assert_eq!(store.enqueue(r).await.unwrap(), EnqueueOutcome::Queued);
    }
    assert_eq!(
        store.enqueue(&reqs[0]).await.unwrap(),
        EnqueueOutcome::Duplicate {
            state: LedgerState::Pending
        }
    );
    let mut conflicting = reqs[0].clone();
    conflicting.claim.fingerprint = fp(9);
    assert_eq!(
        store.enqueue(&conflicting).await.unwrap(),
        EnqueueOutcome::Conflict
    );
    assert_eq!(store.backlog().await.unwrap(), 4);

    let first = store.take(10, LEASE, 3).await.unwrap();
    let ids: Vec<_> = first
        .iter()
        .map(|i| i.lease.key.event_id.as_str())
        .collect();
    // Oldest first; evt_conf_in_3 waits for evt_conf_in_1 (same subscription).
    assert_eq!(ids, ["evt_conf_in_1", "evt_conf_in_2", "evt_conf_in_4"]);
    assert_eq!(first[0].payload, r#"{"id":"evt_conf_in_1"}"#);
    assert!(store.take(10, LEASE, 3).await.unwrap().is_empty());
    store.complete(&first[0].lease).await.unwrap();
    let second = store.take(10, LEASE, 3).await.unwrap();
    assert_eq!(second.len(), 1);
    assert_eq!(second[0].lease.key.event_id, "evt_conf_in_3");
    for item in first.iter().skip(1).chain(second.iter()) {
        store.complete(&item.lease).await.unwrap();
    }
    assert_eq!(store.backlog().await.unwrap(), 0);
    // Completion dropped the body; an application may ask to keep it.
    let done_key = reqs[0].claim.key.clone();
    assert_eq!(store.get(&done_key).await.unwrap().unwrap().payload, None);
    store.keep_payload(&done_key, "kept").await.unwrap();
    assert_eq!(
        store
            .get(&done_key)
            .await
            .unwrap()
            .unwrap()
            .payload
            .as_deref(),
        Some("kept")
    );
    // A webhook redelivery of a queued-and-done event is a duplicate.
    assert_eq!(
        store.claim(&reqs[0].claim).await.unwrap(),
        ClaimOutcome::Duplicate {
            state: LedgerState::Processed
        }
    );
}

/// Inbox: failed events come back after their retry time; expired leases are
/// taken again.
pub async fn inbox_retries_and_recovers<S: InboxStore + ?Sized>(store: &S, clock: &dyn Clock) {
    store
        .enqueue(&inbox_request("evt_conf_in_retry", Some("sub_r"), 1))
        .await
        .unwrap();
    let item = store.take(1, LEASE, 3).await.unwrap().remove(0);
    store.fail(&item.lease, &failure(true, 3)).await.unwrap();
    let key = item.lease.key.clone();
    store
        .retry_after(&key, Duration::seconds(60))
        .await
        .unwrap();
    assert!(
        store.take(1, LEASE, 3).await.unwrap().is_empty(),
        "not due yet"
    );
    store
        .retry_after(&key, Duration::seconds(-1))
        .await
        .unwrap();
    let again = store.take(1, LEASE, 3).await.unwrap().remove(0);
    assert_eq!(again.lease.attempt, 2);
    assert_eq!(again.lease.remaining, LEASE, "time left on a taken lease");
    // The worker dies; after the lease, another takes it.
    expire(clock).await;
    let third = store.take(1, LEASE, 3).await.unwrap().remove(0);
    assert_eq!(third.lease.attempt, 3);
    store.complete(&third.lease).await.unwrap();
}

/// Inbox: a held lease is renewed to its full length on the store's clock
/// (same token, the whole lease left); a lease taken over by another worker
/// cannot be renewed.
pub async fn inbox_renew_extends_a_held_lease<S: InboxStore + ?Sized>(
    store: &S,
    clock: &dyn Clock,
) {
    store
        .enqueue(&inbox_request("evt_conf_in_renew", Some("sub_renew"), 1))
        .await
        .unwrap();
    // A lease long enough for the margins below to hold on a busy machine.
    let lease = Duration::seconds(1);
    let item = store.take(1, lease, 5).await.unwrap().remove(0);
    clock.sleep(Duration::milliseconds(500)).await;
    let renewed = store.renew(&item.lease, lease).await.unwrap();
    assert_eq!(renewed.token, item.lease.token);
    assert_eq!(renewed.attempt, item.lease.attempt);
    assert_eq!(
        renewed.remaining, lease,
        "a renewed lease has all of it left"
    );
    assert!(renewed.expires_at > item.lease.expires_at);
    // Past the first expiry, within the renewed one: still held.
    clock.sleep(Duration::milliseconds(700)).await;
    assert!(
        store.take(1, lease, 5).await.unwrap().is_empty(),
        "a renewed lease is not taken over"
    );
    // Past the renewed lease: another worker takes it; the old holder can
    // neither renew nor complete.
    clock.sleep(Duration::milliseconds(600)).await;
    let other = store.take(1, lease, 5).await.unwrap().remove(0);
    assert_eq!(other.lease.attempt, 2);
    let err = store.renew(&renewed, LEASE).await.unwrap_err();
    assert_eq!(err.kind(), StoreErrorKind::LeaseLost);
    store.complete(&other.lease).await.unwrap();
    let err = store.renew(&other.lease, LEASE).await.unwrap_err();
    assert_eq!(err.kind(), StoreErrorKind::LeaseLost);
}

/// Inbox: concurrent workers never receive the same event twice.
pub async fn inbox_concurrent_takes_are_disjoint<S: InboxStore + ?Sized + 'static>(
    store: Arc<S>,
    clock: &dyn Clock,
) {
    let _ = clock;
    for i in 0..60 {
        let id = format!("evt_conf_in_c{i:03}");
        let sub = format!("sub_c{}", i % 20);
        store
            .enqueue(&inbox_request(&id, Some(&sub), i))
            .await
            .unwrap();
    }
    let mut tasks = Vec::new();
    for _ in 0..6 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let mut seen = Vec::new();
            loop {
                let items = store.take(4, Duration::seconds(30), 3).await.expect("take");
                if items.is_empty() {
                    let backlog = store.backlog().await.expect("backlog");
                    if backlog == 0 {
                        return seen;
                    }
                    tokio::task::yield_now().await;
                    continue;
                }
                for item in items {
                    seen.push(item.lease.key.event_id.clone());
                    store.complete(&item.lease).await.expect("complete");
                }
            }
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("task"));
    }
    let unique: BTreeSet<_> = all.iter().cloned().collect();
    assert_eq!(all.len(), 60, "each event handed out exactly once");
    assert_eq!(unique.len(), 60);
}

/// Inbox: an event claimed by a synchronous delivery (which stores no
/// payload) and then received by the inbox is not stranded when the
/// synchronous worker dies: `enqueue` answers `Duplicate` with its state and
/// attaches the payload, so once the lease expires a worker takes the event
/// with that payload.
pub async fn inbox_adopts_an_abandoned_synchronous_claim<S: InboxStore + ?Sized>(
    store: &S,
    clock: &dyn Clock,
) {
    let id = "evt_conf_in_sync";
    let req = request(id, 5);
    let _abandoned = claimed(store, &req).await;
    let enqueued = InboxRequest {
        claim: req.clone(),
        ..inbox_request(id, Some("sub_sync"), 1_700_000_000)
    };
    assert_eq!(
        store.enqueue(&enqueued).await.unwrap(),
        EnqueueOutcome::Duplicate {
            state: LedgerState::Processing
        }
    );
    assert!(
        store.take(10, LEASE, 5).await.unwrap().is_empty(),
        "the synchronous lease is still live"
    );
    expire(clock).await;
    let items = store.take(10, LEASE, 5).await.unwrap();
    assert_eq!(items.len(), 1, "the abandoned event is taken over");
    assert_eq!(items[0].lease.key, req.key);
    assert_eq!(items[0].lease.attempt, 2);
    assert_eq!(items[0].payload, enqueued.payload);
    assert_eq!(items[0].subscription_id.as_deref(), Some("sub_sync"));
    store.complete(&items[0].lease).await.unwrap();
    assert_eq!(store.backlog().await.unwrap(), 0);
    // A settled event is left as it is: no payload is attached to it.
    let e = store.get(&req.key).await.unwrap().expect("entry");
    assert_eq!(e.state, LedgerState::Processed);
    assert_eq!(
        store.enqueue(&enqueued).await.unwrap(),
        EnqueueOutcome::Duplicate {
            state: LedgerState::Processed
        }
    );
    let e = store.get(&req.key).await.unwrap().expect("entry");
    assert_eq!(e.payload, None);
}

/// Waits a little when a worker found nothing to take: on the suite's clock
/// (so a virtual clock moves on and retries become due) and on the runtime
/// (so other workers run).
async fn idle<C: Clock + ?Sized>(clock: &C) {
    clock.sleep(Duration::milliseconds(1)).await;
    tokio::task::yield_now().await;
}

/// Eight workers take up to `batch` items at a time until the backlog is
/// empty. Each item of a subscription is marked busy (asserting that no
/// other worker holds one of that subscription) while `hold` runs, then
/// settled by `settle`, which answers whether it completed the item.
/// Returns how many items were completed.
async fn drain_with_eight_workers<S, C, H, HF, T, TF>(
    store: Arc<S>,
    clock: Arc<C>,
    batch: usize,
    max_attempts: u32,
    hold: H,
    settle: T,
) -> u32
where
    S: InboxStore + ?Sized + 'static,
    C: Clock + ?Sized + 'static,
    H: Fn(Arc<S>, InboxItem) -> HF + Clone + Send + Sync + 'static,
    HF: Future<Output = ()> + Send,
    T: Fn(Arc<S>, InboxItem) -> TF + Clone + Send + Sync + 'static,
    TF: Future<Output = bool> + Send,
{
    let busy: Arc<Mutex<HashSet<String>>> = Arc::default();
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (store, clock, busy) = (store.clone(), clock.clone(), busy.clone());
        let (hold, settle) = (hold.clone(), settle.clone());
        tasks.push(tokio::spawn(async move {
            let mut done = 0;
            loop {
                let items = store
                    .take(batch, Duration::seconds(30), max_attempts)
                    .await
                    .expect("take");
                if items.is_empty() {
                    if store.backlog().await.expect("backlog") == 0 {
                        return done;
                    }
                    idle(&*clock).await;
                    continue;
                }
                for item in items {
                    if let Some(sub) = &item.subscription_id {
                        assert!(
                            busy.lock().unwrap().insert(sub.clone()),
                            "two events of {sub} at once"
                        );
                    }
                    hold(store.clone(), item.clone()).await;
                    if let Some(sub) = &item.subscription_id {
                        busy.lock().unwrap().remove(sub);
                    }
                    if settle(store.clone(), item).await {
                        done += 1;
                    }
                }
            }
        }));
    }
    let mut done = 0;
    for t in tasks {
        done += t.await.unwrap();
    }
    done
}

/// Inbox: many workers over few subscriptions never hold two events of one
/// subscription at once, and take each subscription's events in `created`
/// order (events without a subscription are taken freely).
pub async fn take_serializes_each_subscription_under_contention<S, C>(store: Arc<S>, clock: Arc<C>)
where
    S: InboxStore + ?Sized + 'static,
    C: Clock + ?Sized + 'static,
{
    let total = 120;
    for i in 0..total {
        let id = format!("evt_ser_{i:04}");
        let sub = (i % 10 != 9).then(|| format!("sub_ser_{}", i % 6));
        let req = inbox_request(&id, sub.as_deref(), i64::from(i));
        store.enqueue(&req).await.unwrap();
    }
    let order: Arc<Mutex<BTreeMap<String, Vec<i64>>>> = Arc::default();
    let recorded = order.clone();
    let hold = move |store: Arc<S>, item: InboxItem| {
        let order = recorded.clone();
        async move {
            if let Some(sub) = &item.subscription_id {
                let created = store
                    .get(&item.lease.key)
                    .await
                    .unwrap()
                    .unwrap()
                    .event_created;
                order
                    .lock()
                    .unwrap()
                    .entry(sub.clone())
                    .or_default()
                    .push(created);
            }
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        }
    };
    let settle = |store: Arc<S>, item: InboxItem| async move {
        store.complete(&item.lease).await.expect("complete");
        true
    };
    let done = drain_with_eight_workers(store, clock, 3, 3, hold, settle).await;
    assert_eq!(done, total);
    for (sub, created) in order.lock().unwrap().iter() {
        let mut sorted = created.clone();
        sorted.sort_unstable();
        assert_eq!(*created, sorted, "{sub} out of order");
    }
}

/// Inbox: like the above, with failures retried a few milliseconds later:
/// events become due while other workers are taking, so two concurrent takes
/// can see different oldest events of one subscription. Still never two
/// events of one subscription at once.
pub async fn take_serializes_each_subscription_with_retries<S, C>(store: Arc<S>, clock: Arc<C>)
where
    S: InboxStore + ?Sized + 'static,
    C: Clock + ?Sized + 'static,
{
    let total = 90;
    for i in 0..total {
        let id = format!("evt_retry_{i:04}");
        let sub = format!("sub_retry_{}", i % 3);
        let req = inbox_request(&id, Some(&sub), i64::from(i));
        store.enqueue(&req).await.unwrap();
    }
    let hold = |_: Arc<S>, item: InboxItem| async move {
        assert!(item.subscription_id.is_some(), "every event has one");
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    };
    let settle = |store: Arc<S>, item: InboxItem| async move {
        if item.lease.attempt < 3 {
            let failure = Failure {
                error: "try again".into(),
                retryable: true,
                max_attempts: 10,
                payload: None,
            };
            store.fail(&item.lease, &failure).await.expect("fail");
            let delay = Duration::milliseconds(3);
            store
                .retry_after(&item.lease.key, delay)
                .await
                .expect("retry_after");
            false
        } else {
            store.complete(&item.lease).await.expect("complete");
            true
        }
    };
    let done = drain_with_eight_workers(store, clock, 2, 10, hold, settle).await;
    assert_eq!(done, total);
}
