//! A reconciliation job: catch up from `/v1/events` every 15 minutes and
//! sweep subscriptions not verified for a day, every hour.
//!
//! ```text
//! STRIPE_SECRET_KEY=sk_test_… STRIPE_WEBHOOK_SECRET=whsec_… \
//!   cargo run --features reqwest --example reconcile_job -- --once
//! ```
//!
//! It shares the processor (and so the ledger and the subscription store)
//! with the webhook endpoint: an event that arrives both ways is processed
//! once. Here the store is in memory; in production it is the same database
//! the webhook server uses (`PgStore`), and the job runs in one instance or
//! under a lock.

use std::sync::Arc;

use async_trait::async_trait;
use stripe_webhook_guard::client::http::HttpStripeClient;
use stripe_webhook_guard::client::{BudgetConfig, RequestBudget};
use stripe_webhook_guard::clock::SystemClock;
use stripe_webhook_guard::processor::WebhookProcessor;
use stripe_webhook_guard::reconcile::{
    Change, ChangeKind, Notifier, ReconcileConfig, Reconciler, SweepScope,
};
use stripe_webhook_guard::signature::Verifier;
use stripe_webhook_guard::store::MemoryStore;
use time::Duration;

/// Where the application would send e-mails.
struct EmailNotifier;

#[async_trait]
impl Notifier for EmailNotifier {
    async fn notify(&self, change: &Change) {
        let customer = change.customer.as_deref().unwrap_or("?");
        match change.kind {
            ChangeKind::AccessRestored => println!("mail {customer}: your access is restored"),
            ChangeKind::AccessRevoked => println!("mail {customer}: please update your card"),
            ChangeKind::NeedsReview => println!(
                "alert: {} needs review ({})",
                change.subscription_id,
                change.detail.as_deref().unwrap_or("")
            ),
            _ => println!(
                "{}: {:?} -> {}",
                change.subscription_id, change.before_status, change.after_status
            ),
        }
    }
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let (Ok(key), Ok(webhook_secret)) = (
        std::env::var("STRIPE_SECRET_KEY"),
        std::env::var("STRIPE_WEBHOOK_SECRET"),
    ) else {
        eprintln!("set STRIPE_SECRET_KEY and STRIPE_WEBHOOK_SECRET (test-mode keys are fine)");
        return std::process::ExitCode::from(2);
    };
    let once = std::env::args().any(|a| a == "--once");
    // The budget below retries; the HTTP client itself never does.
    let http = match HttpStripeClient::new(&key) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("cannot build the Stripe client: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    let clock = Arc::new(SystemClock);
    // One budget for every call this process makes, webhook refetches included.
    let budget = Arc::new(RequestBudget::new(
        Arc::new(http),
        clock.clone(),
        BudgetConfig::default(),
    ));
    let store = Arc::new(MemoryStore::new());
    let processor = WebhookProcessor::builder(Verifier::new(webhook_secret.as_str()))
        .store(store.clone())
        .client(budget.clone())
        .build();
    let reconciler = Reconciler::new(processor, budget.clone())
        .with_shared_budget(budget)
        .notifier(Arc::new(EmailNotifier))
        .config(ReconcileConfig {
            lookback: Duration::days(3),
            ..ReconcileConfig::default()
        });

    let mut catch_up = tokio::time::interval(std::time::Duration::from_secs(15 * 60));
    let mut sweep = tokio::time::interval(std::time::Duration::from_secs(60 * 60));
    loop {
        tokio::select! {
            _ = catch_up.tick() => match reconciler.catch_up().await {
                Ok(r) => println!(
                    "catch-up: {} events, {} processed now, {} already seen, {} failed",
                    r.events_seen, r.events_processed, r.events_duplicate, r.events_failed
                ),
                Err(e) => eprintln!("catch-up failed (will retry): {e}"),
            },
            _ = sweep.tick() => match reconciler.sweep(SweepScope::StaleFor(Duration::days(1))).await {
                Ok(r) => println!("sweep: {} checked, {} changes", r.subscriptions_checked, r.changes.len()),
                Err(e) => eprintln!("sweep failed (will retry): {e}"),
            },
            _ = tokio::signal::ctrl_c() => return std::process::ExitCode::SUCCESS,
        }
        if once {
            return std::process::ExitCode::SUCCESS;
        }
    }
}
