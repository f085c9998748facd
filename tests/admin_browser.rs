//! The operator console driven in headless Chromium through WebDriver
//! (`chromedriver`), as an operator would use it, on the in-memory store and
//! on PostgreSQL: sign in, see a dead letter and a record needing review,
//! replay the dead letter and watch it leave the list and the subscription
//! change, resolve the review item, refresh a customer from (a fake) Stripe.
//! A forged POST without the CSRF token is refused, and an event id holding
//! `<script>` renders as text. Screenshots of the overview and the
//! dead-letter page go to `target/admin-screenshots/`.
//!
//! Needs Debian's `chromium` and `chromium-driver` (`.ci/run` installs them
//! when absent); `CHROMEDRIVER` names another driver binary.
#![cfg(all(feature = "admin", feature = "test-util"))]

mod common;
#[cfg(feature = "postgres")]
mod sql_support;

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use fantoccini::{Client, ClientBuilder, Locator};
use stripe_webhook_guard::event::Event;
use stripe_webhook_guard::integrations::admin::{AdminConsole, AdminToken};
use stripe_webhook_guard::ledger::{ClaimOutcome, ClaimRequest, EventKey, Failure, LedgerState};
use stripe_webhook_guard::subscription::{AnomalyKind, SubscriptionRecord};
use stripe_webhook_guard::testing::{FakeConfig, FakeStripe, Subscribe};
use stripe_webhook_guard::{
    Clock, ManualClock, MemoryStore, Reconciler, Storage, SubscriptionStatus, Verifier,
    WebhookProcessor,
};

const TOKEN: &str = "browser-test-admin-token-0123456789";
const SCRIPT_ID: &str = "evt_<script>alert(1)</script>";
const ANOMALY_HTML: &str = "<img src=x onerror=alert(2)>";

/// chromedriver on a free port; killed on drop.
struct Driver {
    child: Child,
    url: String,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

async fn start_driver() -> Driver {
    let binary = std::env::var("CHROMEDRIVER").unwrap_or_else(|_| "chromedriver".to_owned());
    let port = free_port();
    let child = Command::new(&binary)
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "cannot start {binary} ({e}): install Debian's chromium and chromium-driver \
                 (`apt-get install chromium chromium-driver`; .ci/run does) or set CHROMEDRIVER"
            )
        });
    let driver = Driver {
        child,
        url: format!("http://127.0.0.1:{port}"),
    };
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return driver;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("chromedriver did not listen on port {port}");
}

async fn browser(driver: &Driver) -> Client {
    let mut caps = serde_json::Map::new();
    let mut args = vec![
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1280,900",
    ];
    if let Ok(path) = std::env::var("CHROMIUM") {
        caps.insert(
            "goog:chromeOptions".into(),
            serde_json::json!({ "args": args, "binary": path }),
        );
    } else {
        args.push("--lang=en");
        caps.insert(
            "goog:chromeOptions".into(),
            serde_json::json!({ "args": args }),
        );
    }
    let connector = hyper_util::client::legacy::connect::HttpConnector::new();
    ClientBuilder::new(connector)
        .capabilities(caps)
        .connect(&driver.url)
        .await
        .expect("a WebDriver session")
}

/// The application: the console nested at `/admin`.
async fn serve(console: &AdminConsole) -> SocketAddr {
    let app = axum::Router::new().nest("/admin", console.router());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}

/// Stores `body` as a dead letter (claimed, then failed permanently with
/// its payload kept), the way the processor leaves a poison event.
async fn seed_dead_letter(store: &dyn Storage, body: &str, error: &str) {
    let event = Event::parse_unverified(body.as_bytes()).expect("event");
    let request = ClaimRequest::for_event(&event, time::Duration::minutes(5), 5);
    let ClaimOutcome::Claimed(lease) = store.claim(&request).await.expect("claim") else {
        panic!("claim")
    };
    let failure = Failure {
        error: error.to_owned(),
        retryable: false,
        max_attempts: 5,
        payload: Some(body.to_owned()),
    };
    store.fail(&lease, &failure).await.expect("fail");
}

struct World {
    store: Arc<dyn Storage>,
    stripe: Arc<FakeStripe>,
    console: AdminConsole,
    refresh_customer: String,
}

/// A processor and console over `store`: `sub_dead` stored past_due with
/// its `active` update dead-lettered, a script-named dead letter,
/// `sub_review` flagged for review with a hostile anomaly text, and a
/// customer only Stripe knows.
async fn world(store: Arc<dyn Storage>, clock: ManualClock) -> World {
    let now = clock.now().unix_timestamp();
    let processor = WebhookProcessor::builder(Verifier::new(common::SECRET))
        .store(store.clone())
        .clock(Arc::new(clock.clone()))
        .build();
    let created = common::sub_event(
        "evt_dead_0",
        "customer.subscription.created",
        now - 120,
        "sub_dead",
        "past_due",
    );
    let outcome = processor
        .process_event(&Event::parse_unverified(created.as_bytes()).expect("event"))
        .await
        .expect("processed");
    assert_eq!(outcome.as_str(), "applied");
    let update = common::sub_event(
        "evt_dead",
        "customer.subscription.updated",
        now - 60,
        "sub_dead",
        "active",
    );
    seed_dead_letter(
        store.as_ref(),
        &update,
        "handler: provisioning service answered 500",
    )
    .await;
    let script = common::sub_event(
        SCRIPT_ID,
        "customer.subscription.updated",
        now - 30,
        "sub_other",
        "active",
    );
    seed_dead_letter(store.as_ref(), &script, "error with <b>markup</b>").await;

    let mut review = SubscriptionRecord::new("sub_review");
    review.state.customer = Some("cus_review".into());
    review.state.status = SubscriptionStatus::Active;
    review.needs_review = true;
    review.note(
        now - 10,
        Some("evt_odd"),
        AnomalyKind::ImpossibleTransition,
        ANOMALY_HTML,
    );
    store.save(&review).await.expect("save");

    let stripe = Arc::new(FakeStripe::new(clock.clone(), FakeConfig::default()));
    let refresh_customer = stripe.create_customer();
    stripe.subscribe(&refresh_customer, &Subscribe::default());
    let reconciler = Arc::new(Reconciler::new(processor.clone(), stripe.clone()));
    let console = AdminConsole::builder(processor, AdminToken::new(TOKEN))
        .reconciler(reconciler)
        .build();
    World {
        store,
        stripe,
        console,
        refresh_customer,
    }
}

/// The text of the element `css`, waiting up to ten seconds for it to
/// appear: after a click that submits a form, the next page may not have
/// replaced the current one yet.
async fn text_of(client: &Client, css: &str) -> String {
    appeared(client, css).await.text().await.expect("text")
}

/// The element `css`, once it is on the page (at most ten seconds).
async fn appeared(client: &Client, css: &str) -> fantoccini::elements::Element {
    client
        .wait()
        .at_most(std::time::Duration::from_secs(10))
        .for_element(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("no {css}: {e}"))
}

async fn screenshot(client: &Client, name: &str) {
    let png = client.screenshot().await.expect("screenshot");
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/admin-screenshots");
    std::fs::create_dir_all(&dir).expect("screenshot dir");
    std::fs::write(dir.join(format!("{name}.png")), png).expect("write screenshot");
}

/// Clicks the link or button `css`, then `#confirm` on the confirmation
/// page; returns the result text.
async fn act(client: &Client, css: &str) -> String {
    appeared(client, css).await.click().await.expect("click");
    appeared(client, "#confirm")
        .await
        .click()
        .await
        .expect("confirm");
    text_of(client, "#result").await
}

async fn run_scenario(w: World, label: &str) {
    let addr = serve(&w.console).await;
    let base = format!("http://{addr}/admin");
    let driver = start_driver().await;
    let client = browser(&driver).await;

    // Not signed in: the console sends the browser to the sign-in form.
    client.goto(&base).await.expect("goto");
    assert!(
        client
            .current_url()
            .await
            .expect("url")
            .path()
            .ends_with("/admin/login")
    );
    client
        .find(Locator::Css("input[name=token]"))
        .await
        .expect("token field")
        .send_keys(TOKEN)
        .await
        .expect("type");
    client
        .find(Locator::Css("input[name=name]"))
        .await
        .expect("name field")
        .send_keys("Ada")
        .await
        .expect("type");
    client
        .find(Locator::Css("#sign-in"))
        .await
        .expect("button")
        .click()
        .await
        .expect("sign in");

    // The overview counts both dead letters and the review item.
    assert_eq!(text_of(&client, "#card-dead b").await, "2");
    assert_eq!(text_of(&client, "#card-review b").await, "1");
    assert!(
        text_of(&client, "header")
            .await
            .contains("Signed in as Ada")
    );
    screenshot(&client, &format!("{label}-overview")).await;

    // The dead letters, the script-named one as text.
    client.goto(&format!("{base}/events")).await.expect("goto");
    let table = text_of(&client, "#events").await;
    assert!(table.contains("evt_dead"), "{table}");
    assert!(table.contains(SCRIPT_ID), "the id renders as text: {table}");
    assert!(table.contains("error with <b>markup</b>"), "{table}");
    let source = client.source().await.expect("source");
    assert!(source.contains("evt_&lt;script&gt;alert(1)&lt;/script&gt;"));
    assert!(
        !source.contains("<script>"),
        "no script element on the page"
    );
    assert!(client.get_alert_text().await.is_err(), "no alert ran");
    screenshot(&client, &format!("{label}-dead-letters")).await;

    // A forged POST with the operator's own session cookie but no (or a
    // wrong) CSRF token is refused, and changes nothing.
    let cookie = client
        .get_named_cookie("swg_admin")
        .await
        .expect("session cookie");
    assert_eq!(cookie.http_only(), Some(true));
    assert_eq!(
        cookie.same_site().map(|s| s.to_string()).as_deref(),
        Some("Strict")
    );
    let http = reqwest::Client::new();
    for form in [vec![], vec![("csrf", "forged")]] {
        let response = http
            .post(format!("{base}/events/evt_dead/replay"))
            .header("Cookie", format!("swg_admin={}", cookie.value()))
            .form(&form)
            .send()
            .await
            .expect("post");
        assert_eq!(response.status(), reqwest::StatusCode::FORBIDDEN);
    }
    let dead = w
        .store
        .get(&EventKey::new("evt_dead", None))
        .await
        .expect("get");
    assert_eq!(
        dead.expect("entry").state,
        LedgerState::Dead,
        "the forged POST did nothing"
    );
    // The confirmation page itself (a GET) changes nothing either.
    client
        .goto(&format!("{base}/events/evt_dead/replay"))
        .await
        .expect("goto");
    let dead = w
        .store
        .get(&EventKey::new("evt_dead", None))
        .await
        .expect("get");
    assert_eq!(dead.expect("entry").state, LedgerState::Dead);

    // Replay the dead letter from the list: it leaves the list and the
    // subscription becomes active.
    client.goto(&format!("{base}/events")).await.expect("goto");
    let result = act(&client, "a[href$='/events/evt_dead/replay']").await;
    assert!(result.contains("replayed: applied"), "{result}");
    client.goto(&format!("{base}/events")).await.expect("goto");
    let table = text_of(&client, "#events").await;
    assert!(!table.contains("evt_dead"), "{table}");
    assert!(table.contains(SCRIPT_ID));
    client
        .goto(&format!("{base}/customers/cus_sub_dead"))
        .await
        .expect("goto");
    assert!(text_of(&client, "#subscriptions").await.contains("active"));
    assert!(text_of(&client, "#access").await.contains("granted"));
    let record = w
        .store
        .load("sub_dead")
        .await
        .expect("load")
        .expect("record");
    assert_eq!(record.state.status, SubscriptionStatus::Active);

    // The review item, its hostile anomaly text shown as text; resolve it.
    client.goto(&format!("{base}/review")).await.expect("goto");
    let section = text_of(&client, "#sub-sub_review").await;
    assert!(section.contains(ANOMALY_HTML), "{section}");
    assert!(section.contains("impossible_transition"));
    let result = act(&client, "a[href$='/subscriptions/sub_review/resolve']").await;
    assert!(result.contains("resolved"), "{result}");
    client.goto(&format!("{base}/review")).await.expect("goto");
    text_of(&client, "#empty").await;
    assert!(
        !w.store
            .load("sub_review")
            .await
            .expect("load")
            .expect("record")
            .needs_review
    );

    // A customer only Stripe knows: refresh it, and its subscription appears
    // with access granted.
    let cus = &w.refresh_customer;
    client
        .goto(&format!("{base}/customers/{cus}"))
        .await
        .expect("goto");
    text_of(&client, "#empty").await;
    assert!(text_of(&client, "#access").await.contains("denied"));
    let result = act(&client, "a[href$='/refresh']").await;
    assert!(
        result.contains("1 subscriptions checked, 1 changes"),
        "{result}"
    );
    client
        .goto(&format!("{base}/customers/{cus}"))
        .await
        .expect("goto");
    assert!(text_of(&client, "#access").await.contains("granted"));
    assert!(w.stripe.request_count() > 0);

    // Every action is in the audit log, with who.
    client.goto(&base).await.expect("goto");
    let audit = text_of(&client, "#audit").await;
    for action in ["sign_in", "replay", "resolve_review", "refresh_customer"] {
        assert!(audit.contains(action), "{action} in {audit}");
    }
    assert!(w.console.audit_log().iter().all(|a| a.who == "Ada"));
    assert_eq!(text_of(&client, "#card-dead b").await, "1");
    screenshot(&client, &format!("{label}-overview-after")).await;
    client.close().await.expect("close");
}

fn clock_now() -> ManualClock {
    ManualClock::new(time::OffsetDateTime::now_utc())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_in_a_browser_on_the_memory_store() {
    let clock = clock_now();
    let store: Arc<dyn Storage> = Arc::new(MemoryStore::with_clock(Arc::new(clock.clone())));
    run_scenario(world(store, clock).await, "memory").await;
}

#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_in_a_browser_on_postgres() {
    use stripe_webhook_guard::store::PgStore;
    let (schema, admin, _guard) = sql_support::pg::fresh_schema().await;
    let store: Arc<dyn Storage> = Arc::new(PgStore::with_schema(admin, &schema).expect("schema"));
    run_scenario(world(store, clock_now()).await, "postgres").await;
}
