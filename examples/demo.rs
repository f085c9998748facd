//! The whole lifecycle in a minute, on the in-memory store and a fake Stripe.
//!
//! ```text
//! cargo run --release --features test-util --example demo
//! cargo run --release --features test-util --example demo -- --seed 7 --customers 10000
//! ```
//!
//! A month for a handful of customers plays on FakeStripe's virtual clock:
//! checkout with and without a trial, renewals, a failed payment that enters
//! the past-due grace period and recovers, one that ends unpaid, a
//! cancellation at period end, a pause and resume, an invoiced customer
//! (`send_invoice`) whose renewal invoice goes overdue and keeps grace from
//! its due date, a customer of a shop on the platform (a Connect connected
//! account: its events carry `account`, and refetches and reconciliation ask
//! Stripe with `Stripe-Account`), and a four-day endpoint outage that
//! reconciliation repairs. Every event is delivered up to three times,
//! reordered, with same-second ties. The demo prints what the crate decided
//! for each delivery, who has access at key moments, and finally compares
//! every local record with Stripe's truth (the connected account's too).
//!
//! With `--customers N` (more than the eight named ones) the same program is
//! a load run: random lifecycles, no timeline, events per second at the end.

use std::collections::HashMap;
use std::io::{IsTerminal, Write};
use std::sync::Arc;
use std::time::Instant;

use stripe_webhook_guard::access::{Access, AccessPolicy};
use stripe_webhook_guard::client::BudgetConfig;
use stripe_webhook_guard::clock::{Clock, ManualClock};
use stripe_webhook_guard::event::SubscriptionView;
use stripe_webhook_guard::processor::{AccountFilter, Outcome, WebhookProcessor};
use stripe_webhook_guard::reconcile::{ReconcileConfig, Reconciler, SweepScope};
use stripe_webhook_guard::signature::{Verifier, WebhookSecret};
use stripe_webhook_guard::store::MemoryStore;
use stripe_webhook_guard::subscription::SubscriptionState;
use stripe_webhook_guard::testing::{
    Card, Collection, DeliveryRecord, DeliveryResult, FakeConfig, FakeStripe, Rng, ShapeMix,
    SimConfig, Simulator, Subscribe,
};
use time::{Duration, OffsetDateTime};

const START: i64 = 1_767_225_600; // 2026-01-01T00:00:00Z
const SECRET: &str = "whsec_demo_0123456789";

struct Style {
    color: bool,
}

impl Style {
    fn paint(&self, code: &str, text: &str) -> String {
        if self.color {
            format!("\x1b[{code}m{text}\x1b[0m")
        } else {
            text.to_owned()
        }
    }
    fn bold(&self, t: &str) -> String {
        self.paint("1", t)
    }
    fn dim(&self, t: &str) -> String {
        self.paint("2", t)
    }
    fn green(&self, t: &str) -> String {
        self.paint("32", t)
    }
    fn yellow(&self, t: &str) -> String {
        self.paint("33", t)
    }
    fn red(&self, t: &str) -> String {
        self.paint("31", t)
    }
    fn cyan(&self, t: &str) -> String {
        self.paint("36", t)
    }
    fn access(&self, a: Access) -> String {
        match a {
            Access::Granted => self.green("granted"),
            Access::Grace => self.yellow("grace  "),
            Access::Denied => self.red("denied "),
        }
    }
}

struct Args {
    seed: u64,
    customers: usize,
}

fn args() -> Result<Args, String> {
    let mut out = Args {
        seed: 42,
        customers: 6,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value = |name: &str| it.next().ok_or(format!("{name} needs a value"));
        match a.as_str() {
            "--seed" => {
                out.seed = value("--seed")?
                    .parse()
                    .map_err(|e| format!("--seed: {e}"))?;
            }
            "--customers" => {
                out.customers = value("--customers")?
                    .parse()
                    .map_err(|e| format!("--customers: {e}"))?;
            }
            "-h" | "--help" => {
                return Err("usage: demo [--seed N] [--customers N]".to_owned());
            }
            other => {
                return Err(format!(
                    "unknown argument {other}; usage: demo [--seed N] [--customers N]"
                ));
            }
        }
    }
    Ok(out)
}

fn day(t: i64) -> String {
    let d = (t - START) / 86_400;
    let secs = (t - START).rem_euclid(86_400);
    format!("day {:>2} {:02}:{:02}", d, secs / 3600, (secs % 3600) / 60)
}

struct Demo {
    fake: Arc<FakeStripe>,
    clock: ManualClock,
    store: Arc<MemoryStore>,
    sim: Simulator,
    reconciler: Reconciler,
    names: HashMap<String, String>,
    /// The connected account (a shop on the platform) of the scripted run.
    shop: Option<String>,
    style: Style,
    verbose: bool,
    deliveries: usize,
    outcome_counts: HashMap<&'static str, usize>,
}

impl Demo {
    fn new(seed: u64, verbose: bool, style: Style) -> Self {
        let clock = ManualClock::at_unix(START);
        let fake = Arc::new(FakeStripe::new(
            clock.clone(),
            FakeConfig {
                seed,
                shapes: ShapeMix::Mixed,
                retry_delays: vec![Duration::days(2), Duration::days(2)],
                ..FakeConfig::default()
            },
        ));
        let store = Arc::new(MemoryStore::with_clock(Arc::new(clock.clone())));
        let secret = WebhookSecret::new(SECRET);
        let processor = WebhookProcessor::builder(Verifier::new(secret.clone()))
            .store(store.clone())
            .client(fake.clone())
            .clock(Arc::new(clock.clone()))
            // One endpoint for the platform's events and its connected
            // accounts' (Connect) events.
            .accounts(AccountFilter::Any)
            .build();
        let sim = Simulator::new(
            processor.clone(),
            fake.clone(),
            secret,
            SimConfig {
                seed,
                max_copies: 3,
                max_delay: Duration::minutes(3),
                ..SimConfig::default()
            },
        );
        let reconciler = Reconciler::new(processor, fake.clone())
            .with_budget(BudgetConfig::default())
            .config(ReconcileConfig {
                lookback: Duration::days(30),
                ..ReconcileConfig::default()
            });
        Self {
            fake,
            clock,
            store,
            sim,
            reconciler,
            names: HashMap::new(),
            shop: None,
            style,
            verbose,
            deliveries: 0,
            outcome_counts: HashMap::new(),
        }
    }

    fn customer(&mut self, name: &str) -> String {
        let id = self.fake.create_customer();
        self.names.insert(id.clone(), name.to_owned());
        id
    }

    /// Opens a connected account (a shop on the platform) and reconciles
    /// it with the platform; returns its fake Stripe.
    fn open_shop(&mut self) -> Arc<FakeStripe> {
        let acct = self.fake.create_account();
        self.reconciler = Reconciler::new(self.sim.processor().clone(), self.fake.clone())
            .with_budget(BudgetConfig::default())
            .config(ReconcileConfig {
                lookback: Duration::days(30),
                connected_accounts: vec![acct.clone()],
                ..ReconcileConfig::default()
            });
        let shop = self.fake.account(&acct).expect("just created");
        self.shop = Some(acct);
        shop
    }

    /// Stripe's truth of every subscription: the platform's and the
    /// connected account's, with the account.
    fn truths(&self) -> Vec<(Option<String>, SubscriptionView)> {
        let mut out: Vec<_> = self.fake.truths().into_iter().map(|t| (None, t)).collect();
        for acct in self.fake.account_ids() {
            if let Some(shop) = self.fake.account(&acct) {
                out.extend(shop.truths().into_iter().map(|t| (Some(acct.clone()), t)));
            }
        }
        out
    }

    fn name_of_sub(&self, sub: &str) -> String {
        self.truths()
            .into_iter()
            .find(|(_, t)| t.id.as_deref() == Some(sub))
            .and_then(|(_, t)| t.customer)
            .and_then(|c| self.names.get(&c).cloned())
            .unwrap_or_else(|| sub.to_owned())
    }

    fn say(&self, text: &str) {
        if self.verbose {
            println!("\n{} {}", self.style.cyan("▸"), self.style.bold(text));
        }
    }

    async fn advance(&mut self, by: Duration) {
        self.sim.advance(by).await;
        self.print_log();
    }

    async fn flush(&mut self) {
        self.sim.flush().await;
        self.print_log();
    }

    fn label(result: &DeliveryResult) -> &'static str {
        match result {
            DeliveryResult::Acknowledged(o) => match o {
                Outcome::Processed { effect, .. } => match effect.as_str() {
                    "applied" | "entitlements" => "applied",
                    "refetched" => "refetched",
                    "stale" => "stale",
                    "no_change" => "no change",
                    _ => "ignored",
                },
                Outcome::Duplicate { .. } => "duplicate",
                Outcome::Ignored { .. } => "ignored",
                Outcome::DeadLettered { .. } => "dead-lettered",
                _ => "other",
            },
            DeliveryResult::Refused { .. } => "retry later",
            DeliveryResult::EndpointDown => "endpoint down",
        }
    }

    fn print_log(&mut self) {
        let log: Vec<DeliveryRecord> = self.sim.take_log();
        for rec in &log {
            self.deliveries += 1;
            let label = Self::label(&rec.result);
            *self.outcome_counts.entry(label).or_insert(0) += 1;
            if !self.verbose {
                continue;
            }
            if matches!(rec.result, DeliveryResult::EndpointDown) && rec.attempt > 1 {
                // Stripe keeps retrying with back-off; one line per event is enough.
                continue;
            }
            let who = self.delivery_subject(rec);
            let shown = match label {
                "applied" | "refetched" => self.style.green(label),
                "duplicate" | "no change" | "ignored" => self.style.dim(label),
                "stale" => self.style.yellow(label),
                _ => self.style.red(label),
            };
            let tie = if rec.at == rec.created {
                String::new()
            } else {
                format!("+{}s", rec.at - rec.created)
            };
            println!(
                "  {}  {:<48} {:<6} #{} {:<6} -> {}",
                self.style.dim(&day(rec.at)),
                rec.event_type,
                who,
                rec.attempt,
                self.style.dim(&tie),
                shown
            );
        }
    }

    fn delivery_subject(&self, rec: &DeliveryRecord) -> String {
        let mut events = self.fake.all_events();
        for acct in self.fake.account_ids() {
            if let Some(shop) = self.fake.account(&acct) {
                events.extend(shop.all_events());
            }
        }
        let Some(fe) = events.iter().find(|e| e.event.id() == rec.event_id) else {
            return String::new();
        };
        let sub = stripe_webhook_guard::subscription::subscription_id_of(&fe.event)
            .ok()
            .flatten();
        let sub = sub.or_else(|| {
            fe.event
                .event_type()
                .as_str()
                .starts_with("invoice.")
                .then(|| fe.event.invoice().ok().and_then(|i| i.subscription_id))
                .flatten()
        });
        match sub {
            Some(s) => self.name_of_sub(&s),
            None => fe
                .event
                .entitlement_summary()
                .ok()
                .and_then(|e| self.names.get(&e.customer).cloned())
                .unwrap_or_default(),
        }
    }

    fn access_table(&self, title: &str) {
        if !self.verbose {
            return;
        }
        let policy = AccessPolicy::default();
        let now = self.clock.now();
        println!("  {} {}", self.style.bold("access:"), self.style.dim(title));
        let mut rows: Vec<(String, String)> = self
            .names
            .iter()
            .map(|(c, n)| (n.clone(), c.clone()))
            .collect();
        rows.sort();
        for (name, customer) in rows {
            let records: Vec<_> = self
                .store
                .all_subscriptions()
                .into_iter()
                .filter(|r| r.state.customer.as_deref() == Some(customer.as_str()))
                .collect();
            let d = policy.decide_customer(&records, now);
            let status = records
                .iter()
                .map(|r| r.state.status.as_str().to_owned())
                .collect::<Vec<_>>()
                .join(",");
            let until = d
                .valid_until
                .map(|u| format!("until {}", day(u.unix_timestamp())))
                .unwrap_or_default();
            println!(
                "    {:<6} {}  {:<22} {:<20} {}",
                name,
                self.style.access(d.access),
                d.reason.as_str(),
                self.style.dim(&status),
                self.style.dim(&until)
            );
        }
    }

    /// Compares every record with Stripe's truth; prints the table when verbose.
    fn final_table(&self) -> (usize, usize) {
        let policy = AccessPolicy::default();
        let now = self.clock.now();
        let records = self.store.all_subscriptions();
        let mut matched = 0;
        let mut total = 0;
        if self.verbose {
            println!(
                "\n{}\n  {:<6} {:<22} {:<9} {:<12} {:<12} {:<8} match",
                self.style.bold("Local records against FakeStripe's truth"),
                "who",
                "subscription",
                "account",
                "local",
                "stripe",
                "access",
            );
        }
        let mut truths = self.truths();
        truths.sort_by_key(|(_, t)| self.name_of_sub(t.id.as_deref().unwrap_or_default()));
        for (account, truth) in truths {
            total += 1;
            let id = truth.id.clone().unwrap_or_default();
            let state = SubscriptionState::from_view(&truth);
            let record = records.iter().find(|r| r.id == id);
            // The same state, in the same account.
            let ok = record.is_some_and(|r| r.matches(&state) && r.account == account);
            if ok {
                matched += 1;
            }
            if self.verbose {
                let local =
                    record.map_or("missing".to_owned(), |r| r.state.status.as_str().to_owned());
                let access = record.map_or(Access::Denied, |r| policy.decide(r, now).access);
                println!(
                    "  {:<6} {:<22} {:<9} {:<12} {:<12} {} {}",
                    self.name_of_sub(&id),
                    id,
                    if account.is_some() {
                        "connect"
                    } else {
                        "platform"
                    },
                    local,
                    truth.status.as_str(),
                    self.style.access(access),
                    if ok {
                        self.style.green("yes")
                    } else {
                        self.style.red("NO")
                    }
                );
            }
        }
        (matched, total)
    }
}

async fn scripted_month(demo: &mut Demo) -> Result<(), String> {
    let s = &demo.style;
    println!(
        "{}\n{}",
        s.bold("stripe-webhook-guard demo: one month, eight customers (one invoiced, one of a Connect shop), a fake Stripe that misbehaves"),
        s.dim("Every event is delivered 1-3 times, up to 3 minutes late (so out of order), many in the same second.")
    );
    println!(
        "{}",
        s.dim("  delivered at   event type                                       customer #try  late  -> what the crate decided")
    );
    let ada = demo.customer("Ada");
    let brook = demo.customer("Brook");
    let cruz = demo.customer("Cruz");
    let dee = demo.customer("Dee");
    let eli = demo.customer("Eli");
    let fay = demo.customer("Fay");
    let gus = demo.customer("Gus");
    let subscribe = |trial: Option<u32>, who: &str| Subscribe {
        trial_days: trial,
        client_reference_id: Some(format!("user_{who}")),
        ..Subscribe::default()
    };

    demo.say("Checkout: Ada, Cruz, Dee, Eli and Fay pay; Brook starts a 7-day trial");
    for (c, who) in [
        (&ada, "ada"),
        (&cruz, "cruz"),
        (&dee, "dee"),
        (&eli, "eli"),
        (&fay, "fay"),
    ] {
        demo.fake.subscribe(c, &subscribe(None, who));
    }
    let brook_sub = demo.fake.subscribe(&brook, &subscribe(Some(7), "brook"));
    let _ = brook_sub;
    demo.say("Gus is invoiced (send_invoice): each invoice is due 3 days after it is sent");
    let gus_sub = demo.fake.subscribe(
        &gus,
        &Subscribe {
            collection: Collection::SendInvoice { days_until_due: 3 },
            metadata: [("subscription_type".to_owned(), "team".to_owned())].into(),
            quantity: 5,
            ..subscribe(None, "gus")
        },
    );
    demo.say("Hal subscribes at a shop on the platform (a Connect connected account): its events carry `account`");
    let shop = demo.open_shop();
    let hal = shop.create_customer();
    demo.names.insert(hal.clone(), "Hal".to_owned());
    let hal_sub = shop.subscribe(&hal, &subscribe(None, "hal"));
    demo.advance(Duration::hours(1)).await;
    demo.access_table("after checkout");

    demo.say("Eli schedules a cancellation at period end; Cruz's and Dee's cards start declining");
    let eli_sub = sub_of(demo, &eli)?;
    demo.fake.cancel_at_period_end(&eli_sub, true);
    demo.fake.set_card(&cruz, Card::Declines);
    demo.fake.set_card(&dee, Card::Declines);
    demo.advance(Duration::days(2)).await;
    demo.say("Gus pays his first invoice by bank transfer, before its due date");
    demo.fake.pay_open_invoice(&gus_sub);
    demo.advance(Duration::days(2)).await;

    demo.say("Brook's trial converts (the trial_will_end notice came first)");
    demo.advance(Duration::days(5)).await;

    demo.say("Fay pauses her subscription");
    let fay_sub = sub_of(demo, &fay)?;
    demo.fake.pause(&fay_sub);
    demo.advance(Duration::days(4)).await;

    let down_from = demo.clock.now().unix_timestamp();
    demo.say("The webhook endpoint goes down for four days (Stripe retries with back-off and gives up after three)");
    demo.sim.endpoint_down(down_from, down_from + 4 * 86_400);
    demo.advance(Duration::days(1)).await;
    demo.say("While nobody listens, Fay resumes (and pays), and Hal cancels at the shop");
    demo.fake.resume(&fay_sub);
    shop.cancel_now(&hal_sub);
    demo.advance(Duration::days(2)).await;
    demo.access_table(
        "during the outage: Fay paid, but the record still says paused; Hal's still says active",
    );
    demo.advance(Duration::days(1) + Duration::hours(1)).await;

    demo.say("The endpoint is back; the reconciler catches up from /v1/events and sweeps, the platform and the shop (with Stripe-Account)");
    let report = demo
        .reconciler
        .run(SweepScope::All)
        .await
        .map_err(|e| e.to_string())?;
    if demo.verbose {
        println!(
            "  catch-up: {} events listed, {} were missing and are processed now, {} already seen",
            report.events_seen, report.events_processed, report.events_duplicate
        );
        for (acct, cursor) in &report.account_cursors {
            println!(
                "  connected account {acct}: caught up from its own cursor, now at {}",
                day(*cursor)
            );
        }
        for c in &report.changes {
            println!(
                "  {} {:<6} {} -> {}{}",
                demo.style.bold(&format!("{:?}", c.kind)),
                demo.names
                    .get(c.customer.as_deref().unwrap_or_default())
                    .cloned()
                    .unwrap_or_default(),
                c.before_status.as_ref().map_or("-", |s| s.as_str()),
                c.after_status,
                c.account
                    .as_ref()
                    .map(|a| demo.style.dim(&format!("  (in {a})")))
                    .unwrap_or_default()
            );
        }
    }
    demo.access_table("after reconciliation");

    demo.advance(Duration::days(13) - Duration::hours(2)).await;
    demo.say("Renewal day: Ada renews; Cruz's and Dee's payments fail (past due, grace period); Eli's cancellation takes effect");
    demo.advance(Duration::hours(2)).await;
    demo.access_table("the day after renewals");

    demo.say("Cruz updates his card and pays the open invoice");
    let cruz_sub = sub_of(demo, &cruz)?;
    demo.fake.pay_open_invoice(&cruz_sub);
    demo.advance(Duration::days(4)).await;
    demo.flush().await;
    demo.access_table(
        "end of the month: Dee's retries are exhausted (unpaid); Gus's renewal invoice is overdue since yesterday (grace from its due date)",
    );
    Ok(())
}

fn sub_of(demo: &Demo, customer: &str) -> Result<String, String> {
    demo.fake
        .truths()
        .into_iter()
        .find(|t| t.customer.as_deref() == Some(customer))
        .and_then(|t| t.id)
        .ok_or_else(|| format!("no subscription for {customer}"))
}

async fn load_run(demo: &mut Demo, customers: usize, seed: u64) -> Result<(), String> {
    let mut rng = Rng::new(seed);
    let progress = std::io::stderr().is_terminal();
    println!("load run: {customers} customers, one month of random lifecycles (seed {seed})");
    let mut subs = Vec::with_capacity(customers);
    for i in 0..customers {
        let c = demo.customer(&format!("c{i}"));
        let trial = rng
            .chance(0.3)
            .then_some(7 + u32::try_from(rng.below(7)).unwrap_or(0));
        let s = demo.fake.subscribe(
            &c,
            &Subscribe {
                trial_days: trial,
                ..Subscribe::default()
            },
        );
        if rng.chance(0.15) {
            demo.fake.set_card(&c, Card::Declines);
        }
        subs.push((c, s));
    }
    let days = 32;
    for d in 0..days {
        for (c, s) in &subs {
            match rng.below(400) {
                0 => demo.fake.cancel_at_period_end(s, true),
                1 => demo.fake.cancel_now(s),
                2 => demo.fake.pause(s),
                3 => demo.fake.resume(s),
                4 => demo.fake.pay_open_invoice(s),
                5 => demo.fake.set_card(c, Card::Works),
                _ => {}
            }
        }
        demo.advance(Duration::days(1)).await;
        if progress {
            let filled = (d + 1) * 30 / days;
            eprint!(
                "\r  [{}{}] day {:>2}/{days}  {} deliveries",
                "#".repeat(filled),
                " ".repeat(30 - filled),
                d + 1,
                demo.deliveries
            );
            let _ = std::io::stderr().flush();
        }
    }
    demo.flush().await;
    if progress {
        eprintln!();
    }
    Ok(())
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::process::ExitCode {
    let args = match args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            return std::process::ExitCode::from(2);
        }
    };
    let color = std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let scripted = args.customers <= 6;
    let mut demo = Demo::new(args.seed, scripted, Style { color });
    let wall = Instant::now();
    let result = if scripted {
        scripted_month(&mut demo).await
    } else {
        load_run(&mut demo, args.customers, args.seed).await
    };
    if let Err(e) = result {
        eprintln!("demo failed: {e}");
        return std::process::ExitCode::FAILURE;
    }
    let (matched, total) = demo.final_table();
    let mut counts: Vec<_> = demo.outcome_counts.iter().collect();
    counts.sort_by(|a, b| b.1.cmp(a.1));
    let summary: Vec<String> = counts.iter().map(|(k, v)| format!("{v} {k}")).collect();
    println!("\n{} deliveries: {}", demo.deliveries, summary.join(", "));
    let secs = demo.sim.processing_time().as_secs_f64().max(1e-9);
    #[allow(clippy::cast_precision_loss)]
    let rate = demo.deliveries as f64 / secs;
    println!(
        "{} deliveries in {:.2} s inside the processor ({:.0} deliveries/s on one core; {:.2} s wall clock including the fake Stripe)",
        demo.deliveries,
        secs,
        rate,
        wall.elapsed().as_secs_f64()
    );
    let _ = OffsetDateTime::now_utc();
    if matched == total {
        println!(
            "{}",
            demo.style
                .green(&format!("All {total} subscriptions match Stripe's truth."))
        );
        std::process::ExitCode::SUCCESS
    } else {
        println!(
            "{}",
            demo.style.red(&format!(
                "{} of {total} subscriptions differ from Stripe's truth.",
                total - matched
            ))
        );
        std::process::ExitCode::FAILURE
    }
}
