//! What the two crash matrices share (`tests/crash_matrix.rs`, faults at
//! the store boundary; `tests/failpoints.rs`, failpoints in the processor):
//! the event, Stripe's retries until a 2xx, and the checks of one cell.

use std::time::{Duration as StdDuration, Instant};

use stripe_webhook_guard::ledger::{EventKey, LedgerQuery, LedgerState};
use stripe_webhook_guard::processor::Outcome;
use stripe_webhook_guard::signature::test_header;
use stripe_webhook_guard::store::Storage;
use stripe_webhook_guard::{SubscriptionStatus, WebhookProcessor};
use time::OffsetDateTime;

/// One `customer.subscription.created` event for a new subscription:
/// `(event id, subscription id, body)`, ids tagged with `tag` and `n`.
pub fn event_body(tag: &str, n: usize) -> (String, String, String) {
    let now = OffsetDateTime::now_utc().unix_timestamp();
    let event_id = format!("evt_{tag}_{n}_{now}");
    let sub_id = format!("sub_{tag}_{n}_{now}");
    let body = format!(
        r#"{{"id":"{event_id}","object":"event","type":"customer.subscription.created",
        "created":{now},"livemode":false,"api_version":"2024-06-20","data":{{"object":
        {{"id":"{sub_id}","object":"subscription","customer":"cus_{tag}_{n}","status":"active",
        "created":{now},"current_period_start":{now},"current_period_end":{},
        "cancel_at_period_end":false,"items":{{"object":"list","data":[]}}}}}}}}"#,
        now + 30 * 86_400
    );
    (event_id, sub_id, body)
}

/// Keeps the injected panics (whose message contains `marker`) out of the
/// test output; other panics print as usual. Set once per process.
pub fn quiet_injected_panics(marker: &'static str) {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let message = info
                .payload()
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| {
                    info.payload()
                        .downcast_ref::<&str>()
                        .map(|s| (*s).to_owned())
                })
                .unwrap_or_default();
            if !message.contains(marker) {
                default(info);
            }
        }));
    });
}

/// Delivers `body` as Stripe would until it is acknowledged (2xx), each
/// delivery in a task of its own (a panic kills that task only, as a crash
/// kills a process), waiting out `lease` between deliveries; returns how
/// many deliveries it took. Fails `cell` after 30 s.
pub async fn deliver_until_acknowledged(
    processor: &WebhookProcessor,
    body: &str,
    lease: StdDuration,
    cell: &str,
) -> u32 {
    let started = Instant::now();
    let mut deliveries = 0;
    loop {
        deliveries += 1;
        let p = processor.clone();
        let b = body.to_owned();
        let header = test_header(
            &super::common::secret(),
            b.as_bytes(),
            OffsetDateTime::now_utc(),
        );
        let answer = tokio::spawn(async move { p.handle(b.as_bytes(), Some(&header)).await }).await;
        if let Ok(Ok(outcome)) = &answer
            && outcome.http_status() < 300
        {
            assert!(
                matches!(
                    outcome,
                    Outcome::Processed { .. } | Outcome::Duplicate { .. }
                ),
                "{cell}: acknowledged as {outcome:?}"
            );
            return deliveries;
        }
        assert!(
            started.elapsed() < StdDuration::from_secs(30),
            "{cell}: not acknowledged after {deliveries} deliveries: {answer:?}"
        );
        // Stripe waits before retrying; an attempt that died still holds
        // its lease until it expires.
        tokio::time::sleep(lease + StdDuration::from_millis(100)).await;
    }
}

/// The checks of one cell, read from `store`: the event is `processed`
/// (lost 0) and its subscription record was written exactly once and is
/// the event's snapshot (double effects 0). Returns the record's saves.
pub async fn check_cell(store: &dyn Storage, event_id: &str, sub_id: &str, cell: &str) -> u32 {
    let key = EventKey::new(event_id, None);
    let entry = store.get(&key).await.unwrap().expect("ledger entry");
    assert_eq!(entry.state, LedgerState::Processed, "{cell}");
    let record = store.load(sub_id).await.unwrap().expect("record");
    let saves = u32::try_from(record.version).unwrap();
    assert_eq!(saves, 1, "{cell}: saves");
    assert_eq!(record.status(), &SubscriptionStatus::Active, "{cell}");
    saves
}

/// Stuck 0: once `lease` has passed, no entry of `store` is `processing`.
pub async fn assert_nothing_stuck(store: &dyn Storage, lease: StdDuration, backend: &str) {
    tokio::time::sleep(lease).await;
    let processing = store
        .list(&LedgerQuery::states(&[LedgerState::Processing], 0))
        .await
        .unwrap();
    assert!(processing.is_empty(), "{backend}: stuck {processing:?}");
}

/// What one cell of a crash matrix found.
#[derive(Debug, Clone, Copy, Default)]
pub struct Cell {
    pub deliveries: u32,
    pub handler_runs: u32,
    pub saves: u32,
}

/// Prints a matrix's cells (labelled by where and what struck) and its
/// summary line.
pub fn print_cells<'a>(
    title: &str,
    backend: &str,
    cells: impl ExactSizeIterator<Item = (&'a str, &'a str, &'a Cell)>,
) {
    println!("{title}, {backend}: deliveries until 2xx, handler successes, record saves");
    let (n, mut reruns) = (cells.len(), 0);
    for (at, fault, c) in cells {
        println!(
            "  {at:<18} {fault:<10} deliveries {}  handler {}  saves {}",
            c.deliveries, c.handler_runs, c.saves
        );
        reruns += c.handler_runs - 1;
    }
    println!(
        "  {backend}: {n} cells, lost 0, double record writes 0, stuck processing 0, handler re-runs {reruns}"
    );
}
