//! Rules of subscription records, entitlements and cursors.

// One suite in several files: the parent's helpers are this file's too.
#[allow(clippy::wildcard_imports)]
use super::*;

/// A record with every field set, to check nothing is lost in storage.
pub fn full_record(id: &str, customer: &str) -> SubscriptionRecord {
    let mut r = SubscriptionRecord::new(id);
    r.state.customer = Some(customer.into());
    r.state.status = SubscriptionStatus::PastDue;
    r.state.items = vec![
        SubscriptionItem {
            id: Some("si_1".into()),
            price_id: Some("price_1".into()),
            product_id: Some("prod_1".into()),
            quantity: Some(2),
            current_period_start: Some(1_700_000_000),
            current_period_end: Some(1_702_592_000),
        },
        SubscriptionItem {
            id: Some("si_2".into()),
            price_id: None,
            product_id: None,
            quantity: None,
            current_period_start: None,
            current_period_end: None,
        },
    ];
    r.state.current_period_start = Some(1_700_000_000);
    r.state.current_period_end = Some(1_702_592_000);
    r.state.trial_start = Some(1);
    r.state.trial_end = Some(2);
    r.state.cancel_at_period_end = true;
    r.state.cancel_at = Some(3);
    r.state.canceled_at = Some(4);
    r.state.ended_at = None;
    r.state.pause_collection = Some(PauseCollection {
        behavior: Some("void".into()),
        resumes_at: Some(5),
    });
    r.state.latest_invoice = Some("in_1".into());
    r.state.collection_method = Some(crate::event::CollectionMethod::SendInvoice);
    r.state.days_until_due = Some(30);
    r.state.metadata = [("plan".to_owned(), "team".to_owned())].into();
    r.latest_invoice_created = Some(1_700_000_040);
    r.latest_invoice_due = Some(1_702_592_000);
    r.next_payment_attempt = Some(1_700_259_200);
    r.paid_invoices = vec![crate::subscription::PaidInvoice {
        invoice: "in_0".into(),
        event_id: "evt_p".into(),
        created: 1_699_000_000,
        latest: true,
    }];
    r.latest_invoice_paid = Some(false);
    r.paid_through = Some(1_702_592_000);
    r.last_paid_at = Some(6);
    r.last_payment_failed_at = Some(7);
    r.watermark = Some(Watermark {
        created: 1_700_000_100,
        event_id: "evt_w".into(),
        rank: TieRank {
            terminal: false,
            period_end: 1_702_592_000,
            phase: 1,
        },
        source: WatermarkSource::Event,
    });
    r.invoice_watermark = Some((1_700_000_050, "evt_i".into()));
    r.last_verified_with_stripe = OffsetDateTime::from_unix_timestamp(1_700_000_200).ok();
    r.client_reference_id = Some(format!("user_{customer}"));
    r.checkout_session = Some("cs_1".into());
    r.livemode = Some(false);
    r.account = None;
    r.anomalies = vec![Anomaly {
        at: 8,
        event_id: Some("evt_a".into()),
        kind: AnomalyKind::MissedTransition,
        detail: "active -> unpaid".into(),
    }];
    r.needs_review = true;
    r.needs_reconcile = true;
    r
}

/// Records round-trip with every field intact; saves are compare-and-set on
/// the version.
pub async fn subscription_save_is_versioned<S: SubscriptionStore + ?Sized>(store: &S) {
    let record = full_record("sub_conf_a", "cus_conf_a");
    assert_eq!(store.save(&record).await.unwrap(), 1);
    let loaded = store.load("sub_conf_a").await.unwrap().expect("saved");
    assert_eq!(
        loaded,
        SubscriptionRecord {
            version: 1,
            ..record.clone()
        }
    );
    // A save based on version 0 again loses.
    let err = store.save(&record).await.unwrap_err();
    assert_eq!(err.kind(), StoreErrorKind::Conflict);
    let mut next = loaded.clone();
    next.state.status = SubscriptionStatus::Active;
    assert_eq!(store.save(&next).await.unwrap(), 2);
    // A stale writer loses.
    let err = store.save(&loaded).await.unwrap_err();
    assert_eq!(err.kind(), StoreErrorKind::Conflict);
    assert_eq!(
        store
            .load("sub_conf_a")
            .await
            .unwrap()
            .unwrap()
            .state
            .status,
        SubscriptionStatus::Active
    );
    assert!(store.load("sub_conf_missing").await.unwrap().is_none());
    // Unknown statuses survive storage.
    let mut odd = full_record("sub_conf_odd", "cus_conf_odd");
    odd.state.status = SubscriptionStatus::Unknown("frozen".into());
    store.save(&odd).await.unwrap();
    assert_eq!(
        store
            .load("sub_conf_odd")
            .await
            .unwrap()
            .unwrap()
            .state
            .status,
        SubscriptionStatus::Unknown("frozen".into())
    );
}

/// Of concurrent saves from the same version, exactly one wins.
pub async fn concurrent_saves_have_one_winner<S: SubscriptionStore + ?Sized + 'static>(
    store: Arc<S>,
) {
    let base = full_record("sub_conf_race", "cus_conf_race");
    store.save(&base).await.unwrap();
    let loaded = store.load("sub_conf_race").await.unwrap().unwrap();
    let mut tasks = Vec::new();
    for i in 0..16 {
        let store = store.clone();
        let mut r = loaded.clone();
        r.paid_through = Some(i);
        tasks.push(tokio::spawn(async move { store.save(&r).await }));
    }
    let mut wins = 0;
    for t in tasks {
        match t.await.expect("task") {
            Ok(v) => {
                assert_eq!(v, 2);
                wins += 1;
            }
            Err(e) => assert_eq!(e.kind(), StoreErrorKind::Conflict),
        }
    }
    assert_eq!(wins, 1);
}

/// Lookups by customer and Checkout reference follow changes.
pub async fn subscription_lookups<S: SubscriptionStore + ?Sized>(store: &S) {
    store
        .save(&full_record("sub_conf_l1", "cus_conf_l"))
        .await
        .unwrap();
    store
        .save(&full_record("sub_conf_l2", "cus_conf_l"))
        .await
        .unwrap();
    store
        .save(&full_record("sub_conf_l3", "cus_conf_other"))
        .await
        .unwrap();
    let ids = |v: Vec<SubscriptionRecord>| v.into_iter().map(|r| r.id).collect::<Vec<_>>();
    assert_eq!(
        ids(store.find_by_customer("cus_conf_l").await.unwrap()),
        ["sub_conf_l1", "sub_conf_l2"]
    );
    assert_eq!(
        ids(store
            .find_by_client_reference("user_cus_conf_l")
            .await
            .unwrap()),
        ["sub_conf_l1", "sub_conf_l2"]
    );
    // Moving a record to another customer updates both lookups.
    let mut moved = store.load("sub_conf_l2").await.unwrap().unwrap();
    moved.state.customer = Some("cus_conf_other".into());
    moved.client_reference_id = Some("user_moved".into());
    store.save(&moved).await.unwrap();
    assert_eq!(
        ids(store.find_by_customer("cus_conf_l").await.unwrap()),
        ["sub_conf_l1"]
    );
    assert_eq!(
        ids(store.find_by_customer("cus_conf_other").await.unwrap()),
        ["sub_conf_l2", "sub_conf_l3"]
    );
    assert_eq!(
        ids(store.find_by_client_reference("user_moved").await.unwrap()),
        ["sub_conf_l2"]
    );
    assert!(
        store
            .find_by_customer("cus_conf_none")
            .await
            .unwrap()
            .is_empty()
    );
}

/// Listing filters and pages by id.
pub async fn subscription_listing<S: SubscriptionStore + ?Sized>(store: &S) {
    let at = |t: i64| OffsetDateTime::from_unix_timestamp(t).ok();
    for (id, verified, review, reconcile) in [
        ("sub_conf_q1", at(100), false, false),
        ("sub_conf_q2", at(300), true, false),
        ("sub_conf_q3", None, false, true),
        ("sub_conf_q4", at(200), false, false),
    ] {
        let mut r = full_record(id, "cus_conf_q");
        r.last_verified_with_stripe = verified;
        r.needs_review = review;
        r.needs_reconcile = reconcile;
        store.save(&r).await.unwrap();
    }
    let ids = |v: Vec<SubscriptionRecord>| v.into_iter().map(|r| r.id).collect::<Vec<_>>();
    let q = |f: &dyn Fn(&mut SubscriptionQuery)| {
        let mut q = SubscriptionQuery {
            after: Some("sub_conf_q".into()),
            ..SubscriptionQuery::default()
        };
        f(&mut q);
        q
    };
    let listed = ids(store.list_subscriptions(&q(&|_| {})).await.unwrap());
    assert_eq!(
        listed,
        ["sub_conf_q1", "sub_conf_q2", "sub_conf_q3", "sub_conf_q4"]
    );
    let stale = ids(store
        .list_subscriptions(&q(&|q| q.verified_before = at(250)))
        .await
        .unwrap());
    assert_eq!(stale, ["sub_conf_q1", "sub_conf_q3", "sub_conf_q4"]);
    assert_eq!(
        ids(store
            .list_subscriptions(&q(&|q| q.needs_review = true))
            .await
            .unwrap()),
        ["sub_conf_q2"]
    );
    assert_eq!(
        ids(store
            .list_subscriptions(&q(&|q| q.needs_reconcile = true))
            .await
            .unwrap()),
        ["sub_conf_q3"]
    );
    let page = ids(store
        .list_subscriptions(&q(&|q| {
            q.after = Some("sub_conf_q1".into());
            q.limit = 2;
        }))
        .await
        .unwrap());
    assert_eq!(page, ["sub_conf_q2", "sub_conf_q3"]);
}

/// Entitlements are saved with the same compare-and-set rule.
pub async fn entitlements_are_versioned<S: SubscriptionStore + ?Sized>(store: &S) {
    assert!(
        store
            .load_entitlements("cus_conf_e")
            .await
            .unwrap()
            .is_none()
    );
    let e = CustomerEntitlements {
        customer: "cus_conf_e".into(),
        lookup_keys: vec!["a".into(), "b".into()],
        watermark: (10, "evt_e".into()),
        version: 0,
        account: Some("acct_conf_e".into()),
        verified: false,
        last_verified_with_stripe: time::OffsetDateTime::from_unix_timestamp(1_767_225_600).ok(),
    };
    assert_eq!(store.save_entitlements(&e).await.unwrap(), 1);
    let loaded = store
        .load_entitlements("cus_conf_e")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        loaded,
        CustomerEntitlements {
            version: 1,
            ..e.clone()
        }
    );
    let err = store.save_entitlements(&e).await.unwrap_err();
    assert_eq!(err.kind(), StoreErrorKind::Conflict);
    let next = CustomerEntitlements {
        lookup_keys: vec![],
        ..loaded
    };
    assert_eq!(store.save_entitlements(&next).await.unwrap(), 2);
}

/// Cursors are stored and overwritten.
pub async fn cursors_round_trip<S: CursorStore + ?Sized>(store: &S) {
    assert_eq!(store.load_cursor("conf").await.unwrap(), None);
    store.save_cursor("conf", "one").await.unwrap();
    store.save_cursor("conf", "two").await.unwrap();
    store.save_cursor("conf_other", "x").await.unwrap();
    assert_eq!(
        store.load_cursor("conf").await.unwrap().as_deref(),
        Some("two")
    );
}
