//! The views against every real Stripe object bundled under
//! `tests/data/fixtures/stripe/` (three API versions and the legacy events).

use std::path::PathBuf;

use stripe_webhook_guard::event::{
    ApiShape, CheckoutSessionView, Event, EventType, InvoiceView, SubscriptionStatus,
    SubscriptionView,
};
use stripe_webhook_guard::signature::{Verifier, WebhookSecret};
use time::OffsetDateTime;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/fixtures/stripe")
}

fn read(name: &str) -> String {
    std::fs::read_to_string(dir().join(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn files(prefix: &str) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| {
            n.starts_with(prefix)
                && std::path::Path::new(n)
                    .extension()
                    .is_some_and(|x| x == "json")
        })
        .collect();
    names.sort();
    names
}

const VERSIONS: [&str; 3] = ["2025-02-24.acacia", "2025-03-31.basil", "2026-07-29.dahlia"];

#[test]
fn subscriptions_of_every_version() {
    assert_eq!(files("subscription.").len(), 3);
    for version in VERSIONS {
        let name = format!("subscription.{version}.json");
        let v = SubscriptionView::from_json(&read(&name)).unwrap();
        assert_eq!(
            v.id.as_deref(),
            Some("sub_1Pgc6rB7WZ01zgkWNy0Cn5nw"),
            "{name}"
        );
        assert_eq!(v.customer.as_deref(), Some("cus_QXg1o8vcGmoR32"), "{name}");
        assert_eq!(v.status, SubscriptionStatus::Active, "{name}");
        assert_eq!(v.items.len(), 1, "{name}");
        assert_eq!(
            v.items[0].price_id.as_deref(),
            Some("price_1PgafmB7WZ01zgkW6dKueIc5"),
            "{name}"
        );
        assert_eq!(v.trial_end, Some(1_234_567_890));
        match version {
            "2025-02-24.acacia" => {
                // Top-level period; items carry none.
                assert_eq!(v.shape, ApiShape::PreBasil);
                assert_eq!(v.current_period_end, Some(1_234_567_890));
                assert_eq!(v.items[0].current_period_end, None);
                assert!(!v.cancel_at_period_end);
                assert_eq!(v.pause_collection, None);
            }
            "2025-03-31.basil" => {
                // Item-level period (the fixture's placeholder end precedes its start).
                assert_eq!(v.shape, ApiShape::Basil);
                assert_eq!(v.current_period_end, Some(976_287_773));
                assert_eq!(v.current_period_start, Some(1_896_570_518));
                assert!(!v.cancel_at_period_end, "null reads as false");
                assert_eq!(v.pause_collection, None);
            }
            _ => {
                assert_eq!(v.shape, ApiShape::Basil);
                assert_eq!(v.current_period_end, Some(976_287_773));
                assert!(v.cancel_at_period_end);
                let pause = v.pause_collection.as_ref().unwrap();
                assert_eq!(pause.behavior.as_deref(), Some("mark_uncollectible"));
                assert_eq!(pause.resumes_at, None);
            }
        }
    }
}

#[test]
fn earliest_item_end_is_the_subscription_period_end() {
    let json = r#"{"id":"sub_1","object":"subscription","status":"active","customer":"cus_1",
      "items":{"object":"list","data":[
        {"id":"si_a","price":{"id":"price_a"},"current_period_start":100,"current_period_end":500},
        {"id":"si_b","price":{"id":"price_b"},"current_period_start":200,"current_period_end":300}]}}"#;
    let v = SubscriptionView::from_json(json).unwrap();
    assert_eq!(v.current_period_end, Some(300));
    assert_eq!(v.current_period_start, Some(200));
    assert_eq!(v.items.len(), 2);
}

#[test]
fn invoices_of_every_version() {
    assert_eq!(files("invoice.").len(), 3);
    for version in VERSIONS {
        let name = format!("invoice.{version}.json");
        let v = InvoiceView::from_json(&read(&name)).unwrap();
        assert_eq!(
            v.id.as_deref(),
            Some("in_1Pgc6tB7WZ01zgkWu9fdqL6I"),
            "{name}"
        );
        assert_eq!(v.customer.as_deref(), Some("cus_QXg1o8vcGmoR32"), "{name}");
        assert_eq!(v.status.as_deref(), Some("draft"), "{name}");
        assert!(!v.paid, "{name}: a draft is not paid");
        match version {
            "2025-02-24.acacia" => {
                assert_eq!(v.shape, ApiShape::PreBasil);
                // `subscription: null` and an invoice-item line: no subscription.
                assert_eq!(v.subscription_id, None);
                assert_eq!(v.service_period_end, None);
            }
            "2025-03-31.basil" => {
                assert_eq!(v.shape, ApiShape::Basil);
                // `parent: null` (and the leftover `subscription: null`).
                assert_eq!(v.subscription_id, None);
            }
            _ => {
                assert_eq!(v.shape, ApiShape::Basil);
                // Found through parent.subscription_details even though the top-level
                // `subscription` key is still present and null.
                assert_eq!(v.subscription_id.as_deref(), Some("subscription"));
                assert_eq!(v.service_period_end, Some(1_721_954_054));
            }
        }
    }
}

#[test]
fn invoice_paid_reads_both_shapes() {
    let pre = InvoiceView::from_json(
        r#"{"id":"in_1","object":"invoice","paid":true,"status":"paid","subscription":"sub_1",
        "lines":{"data":[{"type":"subscription","subscription":"sub_1","period":{"start":1,"end":2592000}}]}}"#,
    )
    .unwrap();
    assert!(pre.paid);
    assert_eq!(pre.shape, ApiShape::PreBasil);
    assert_eq!(pre.subscription_id.as_deref(), Some("sub_1"));
    assert_eq!(pre.service_period_end, Some(2_592_000));

    let basil = InvoiceView::from_json(
        r#"{"id":"in_1","object":"invoice","status":"paid","subscription":null,
        "parent":{"type":"subscription_details","subscription_details":{"subscription":"sub_2"}},
        "lines":{"data":[{"parent":{"type":"subscription_item_details",
          "subscription_item_details":{"subscription":"sub_2","subscription_item":"si_1"}},
          "period":{"start":1,"end":99}}]}}"#,
    )
    .unwrap();
    assert!(basil.paid);
    assert_eq!(basil.shape, ApiShape::Basil);
    assert_eq!(basil.subscription_id.as_deref(), Some("sub_2"));
    assert_eq!(basil.service_period_end, Some(99));

    let open =
        InvoiceView::from_json(r#"{"id":"in_1","object":"invoice","status":"open","parent":null}"#)
            .unwrap();
    assert!(!open.paid);
}

#[test]
fn checkout_sessions_of_every_version() {
    assert_eq!(files("checkout.session.").len(), 3);
    for version in VERSIONS {
        let name = format!("checkout.session.{version}.json");
        let v = CheckoutSessionView::from_json(&read(&name)).unwrap();
        assert_eq!(
            v.id.as_deref(),
            Some("cs_test_a1YS1URlnyQCN5fUUduORoQ7Pw41PJqDWkIVQCpJPqkfIhd6tVY8XB1OLY")
        );
        assert_eq!(v.mode.as_deref(), Some("payment"));
        assert_eq!(v.status.as_deref(), Some("open"));
        assert_eq!(v.payment_status.as_deref(), Some("unpaid"));
        assert_eq!(v.customer, None);
        assert_eq!(v.subscription, None);
        assert_eq!(v.client_reference_id, None);
    }
}

#[test]
fn every_event_fixture_parses() {
    let names = files("event.");
    assert_eq!(names.len(), 11);
    for name in &names {
        let e = Event::parse_unverified(read(name).as_bytes())
            .unwrap_or_else(|err| panic!("{name}: {err}"));
        assert!(e.id().starts_with("evt_"), "{name}");
        assert!(!e.livemode(), "{name}");
        let ident = e.object_identity().unwrap();
        match e.event_type().clone() {
            EventType::SubscriptionCreated
            | EventType::SubscriptionUpdated
            | EventType::SubscriptionDeleted
            | EventType::SubscriptionTrialWillEnd => {
                let s = e.subscription().unwrap();
                // 2012-era subscriptions had no id of their own.
                assert_eq!(s.id, None, "{name}");
                assert_eq!(s.customer.as_deref(), Some("cus_00000000000000"), "{name}");
                assert_eq!(s.shape, ApiShape::PreBasil);
                assert!(s.current_period_end.is_some(), "{name}");
                assert_eq!(ident.object.as_deref(), Some("subscription"));
            }
            EventType::InvoicePaymentSucceeded | EventType::InvoicePaymentFailed => {
                let i = e.invoice().unwrap();
                assert_eq!(i.id.as_deref(), Some("in_00000000000000"), "{name}");
                assert_eq!(i.customer.as_deref(), Some("cus_00000000000000"));
                assert_eq!(
                    i.subscription_id, None,
                    "2012 lines name no subscription id"
                );
                // The old `lines.subscriptions[]` period is the service period.
                assert_eq!(i.service_period_end, Some(1_392_578_541), "{name}");
                let paid = *e.event_type() == EventType::InvoicePaymentSucceeded;
                assert_eq!(i.paid, paid, "{name}");
            }
            EventType::Other(t) => {
                assert!(
                    ["customer.created", "invoiceitem.updated", "plan.created"]
                        .contains(&t.as_str()),
                    "{name}: {t}"
                );
                assert!(ident.id.is_some());
            }
            other => panic!("{name}: unexpected type {other}"),
        }
    }
    let legacy = Event::parse_unverified(
        read("event.customer.subscription.updated.legacy-2012.stripe-java.json").as_bytes(),
    )
    .unwrap();
    assert_eq!(legacy.created(), 1_326_853_478);
    assert_eq!(legacy.api_version(), None);
    assert!(
        legacy
            .previous_attributes_json()
            .unwrap()
            .contains("OLD_PLAN_ID")
    );
    let s = legacy.subscription().unwrap();
    assert_eq!(s.items[0].price_id.as_deref(), Some("FR010_00000000000000"));
    assert_eq!(s.current_period_end, Some(1_361_042_541));

    let dotnet = Event::parse_unverified(
        read("event.invoiceitem.updated.2017-04-06.stripe-dotnet.json").as_bytes(),
    )
    .unwrap();
    assert_eq!(dotnet.api_version(), Some("2017-04-06"));
    assert_eq!(dotnet.request(), None);
    assert_eq!(dotnet.created(), 1_493_329_207);
    assert_eq!(
        dotnet.subscription().unwrap_err().to_string(),
        "event object is a Some(\"invoiceitem\"), not a subscription"
    );
}

#[test]
fn async_stripe_known_answer_vector() {
    #[derive(serde::Deserialize)]
    struct Vector {
        secret: String,
        timestamp: i64,
        header: String,
        payload: String,
    }
    let v: Vector = serde_json::from_str(&read(
        "signature-vector.invoiceitem.created.async-stripe.json",
    ))
    .unwrap();
    let now = OffsetDateTime::from_unix_timestamp(v.timestamp).unwrap();
    let verified = Verifier::new(WebhookSecret::new(&v.secret))
        .verify(v.payload.as_bytes(), Some(&v.header), now)
        .unwrap();
    let event = Event::parse(verified).unwrap();
    assert_eq!(event.event_type().as_str(), "invoiceitem.created");
    assert_eq!(event.api_version(), Some("2017-05-25"));
}
