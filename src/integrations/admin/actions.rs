//! The console's actions: each a `GET` confirmation page and a `POST`
//! (CSRF-checked by [`Confirmed`]) that acts, logs who did what, and answers
//! with the result.

use std::collections::HashMap;
use std::sync::Arc;

use axum::Extension;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use maud::html;

use super::Inner;
use super::auth::Operator;
use super::pages::{self, enc};
use super::routes::{Confirmed, Ctx, error_page, key_of, ok, store_failed};
use crate::processor::Outcome;
use crate::reconcile::{ReconcileError, ReconcileReport};
use crate::store::{StoreError, StoreErrorKind};

type Shared = Arc<Inner>;

// ---------------------------------------------------------------------------
// Actions: a GET confirmation, a POST that acts
// ---------------------------------------------------------------------------

pub(super) async fn replay_confirm(
    State(inner): State<Shared>,
    ctx: Ctx,
    Extension(op): Extension<Operator>,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let key = key_of(&id, &q);
    let entry = match inner.processor.store().get(&key).await {
        Ok(Some(e)) => e,
        Ok(None) => {
            return error_page(
                &ctx,
                Some(&op),
                StatusCode::NOT_FOUND,
                "No such event in the ledger.",
            );
        }
        Err(e) => return store_failed(&ctx, &op, &e),
    };
    let question = html! {
        "Replay event " span.id { (entry.key.event_id) } " (" (entry.event_type) ", " (entry.state.as_str())
        " after " (entry.attempts) " attempts)? It is requeued with its attempts reset and processed now, "
        "from the stored payload or, without one, from Stripe. Replaying an event that was processed since changes nothing."
    };
    let action = format!("{}/events/{}/replay", ctx.base, enc(&id));
    let account = entry.key.account.clone().unwrap_or_default();
    ok(&pages::confirm(
        &ctx.base,
        &op,
        "Replay an event",
        &question,
        &action,
        &[("account", &account)],
    ))
}

pub(super) async fn replay(
    State(inner): State<Shared>,
    Path(id): Path<String>,
    c: Confirmed,
) -> Response {
    let account = c.field("account").map(str::to_owned);
    let result = inner.reconciler.replay(&id, account.as_deref()).await;
    let result = match result {
        Ok(outcome) => Ok(format!("{id}: replayed: {}", outcome_text(&outcome))),
        Err(e) => Err((reconcile_status(&e), format!("{id}: replay failed: {e}"))),
    };
    let back = format!("{}/events", c.ctx.base);
    c.conclude(
        &inner,
        "replay",
        &id,
        "Event replayed",
        (&back, "Back to dead letters"),
        result,
    )
}

fn outcome_text(outcome: &Outcome) -> String {
    match outcome {
        Outcome::DeadLettered { error, .. } => format!("dead-lettered again ({error})"),
        other => other.as_str().to_owned(),
    }
}

fn reconcile_status(e: &ReconcileError) -> StatusCode {
    match e {
        ReconcileError::NotReplayable(_) => StatusCode::NOT_FOUND,
        ReconcileError::Store(s) if s.kind() == StoreErrorKind::NotFound => StatusCode::NOT_FOUND,
        ReconcileError::Client(_) => StatusCode::BAD_GATEWAY,
        _ => StatusCode::SERVICE_UNAVAILABLE,
    }
}

pub(super) async fn replay_all_confirm(ctx: Ctx, Extension(op): Extension<Operator>) -> Response {
    let question = html! {
        "Replay every dead-lettered event? Each is requeued and processed now; those that fail again go back to the dead letters."
    };
    let action = format!("{}/dead-letters/replay-all", ctx.base);
    ok(&pages::confirm(
        &ctx.base,
        &op,
        "Replay all dead letters",
        &question,
        &action,
        &[],
    ))
}

pub(super) async fn replay_all(State(inner): State<Shared>, c: Confirmed) -> Response {
    let result = inner.reconciler.replay_dead_letters().await;
    let result = match result {
        Ok(list) => Ok({
            let mut by: std::collections::BTreeMap<String, usize> =
                std::collections::BTreeMap::new();
            for (_, r) in &list {
                let label = match r {
                    Ok(o) => o.as_str().to_owned(),
                    Err(_) => "error".to_owned(),
                };
                *by.entry(label).or_default() += 1;
            }
            let parts: Vec<String> = by.iter().map(|(k, n)| format!("{n} {k}")).collect();
            format!(
                "{} dead letters replayed: {}",
                list.len(),
                if parts.is_empty() {
                    "none".to_owned()
                } else {
                    parts.join(", ")
                }
            )
        }),
        Err(e) => Err((reconcile_status(&e), format!("replay failed: {e}"))),
    };
    let back = format!("{}/events", c.ctx.base);
    let title = "Dead letters replayed";
    c.conclude(
        &inner,
        "replay_dead_letters",
        "",
        title,
        (&back, "Back to dead letters"),
        result,
    )
}

pub(super) async fn resolve_confirm(
    State(inner): State<Shared>,
    ctx: Ctx,
    Extension(op): Extension<Operator>,
    Path(id): Path<String>,
) -> Response {
    match inner.processor.store().load(&id).await {
        Ok(Some(r)) => {
            let question = html! {
                "Mark subscription " span.id { (r.id) } " resolved? Its needs-review flag is cleared; its "
                (r.anomalies.len()) " recorded anomalies stay as history."
            };
            let action = format!("{}/subscriptions/{}/resolve", ctx.base, enc(&id));
            ok(&pages::confirm(
                &ctx.base,
                &op,
                "Resolve a review item",
                &question,
                &action,
                &[],
            ))
        }
        Ok(None) => error_page(
            &ctx,
            Some(&op),
            StatusCode::NOT_FOUND,
            "No such subscription.",
        ),
        Err(e) => store_failed(&ctx, &op, &e),
    }
}

pub(super) async fn resolve(
    State(inner): State<Shared>,
    Path(id): Path<String>,
    c: Confirmed,
) -> Response {
    let store = inner.processor.store();
    let mut result = Err(StoreError::new(StoreErrorKind::Conflict, "busy record"));
    // A webhook may save the record meanwhile: reload and try again.
    for _ in 0..5 {
        result = match store.load(&id).await {
            Ok(Some(mut r)) if r.needs_review => {
                r.needs_review = false;
                match store.save(&r).await {
                    Ok(_) => Ok("resolved".to_owned()),
                    Err(e) if e.kind() == StoreErrorKind::Conflict => continue,
                    Err(e) => Err(e),
                }
            }
            Ok(Some(_)) => Ok("already resolved".to_owned()),
            Ok(None) => Err(StoreError::new(
                StoreErrorKind::NotFound,
                "no such subscription",
            )),
            Err(e) => Err(e),
        };
        break;
    }
    let result = match result {
        Ok(t) => Ok(format!("{id}: {t}")),
        Err(e) if e.kind() == StoreErrorKind::NotFound => {
            Err((StatusCode::NOT_FOUND, format!("{id}: not resolved: {e}")))
        }
        Err(e) => Err((
            StatusCode::SERVICE_UNAVAILABLE,
            format!("{id}: not resolved: {e}"),
        )),
    };
    let back = format!("{}/review", c.ctx.base);
    let title = "Review item";
    c.conclude(
        &inner,
        "resolve_review",
        &id,
        title,
        (&back, "Back to the review list"),
        result,
    )
}

fn no_client(ctx: &Ctx, op: &Operator) -> Response {
    error_page(
        ctx,
        Some(op),
        StatusCode::NOT_IMPLEMENTED,
        "No Stripe client is configured for the console: set a Stripe secret key to refresh customers and run catch-ups.",
    )
}

pub(super) async fn refresh_confirm(
    State(inner): State<Shared>,
    ctx: Ctx,
    Extension(op): Extension<Operator>,
    Path(id): Path<String>,
) -> Response {
    if !inner.has_client {
        return no_client(&ctx, &op);
    }
    let question = html! {
        "Refresh customer " span.id { (id) } " from Stripe? Their subscriptions are listed from Stripe and the stored records repaired to match."
    };
    let action = format!("{}/customers/{}/refresh", ctx.base, enc(&id));
    ok(&pages::confirm(
        &ctx.base,
        &op,
        "Refresh a customer",
        &question,
        &action,
        &[],
    ))
}

/// Remembers a reconciliation run (its changes for the customer pages, its
/// summary for the overview) and words its result.
fn ran(
    inner: &Inner,
    c: &Confirmed,
    kind: &'static str,
    result: Result<ReconcileReport, ReconcileError>,
) -> Result<String, (StatusCode, String)> {
    let result = match result {
        Ok(report) => {
            inner.remember_changes(&report.changes);
            Ok(report_text(&report))
        }
        Err(e) => Err((reconcile_status(&e), format!("{kind} failed: {e}"))),
    };
    let summary = match &result {
        Ok(t) | Err((_, t)) => t.clone(),
    };
    inner.set_last_run(kind, &c.op.name, summary);
    result
}

fn report_text(r: &ReconcileReport) -> String {
    format!(
        "{} events seen, {} processed, {} failed; {} subscriptions checked, {} changes, {} writes; {} Stripe requests",
        r.events_seen,
        r.events_processed,
        r.events_failed,
        r.subscriptions_checked,
        r.changes.len(),
        r.writes,
        r.requests
    )
}

pub(super) async fn refresh(
    State(inner): State<Shared>,
    Path(id): Path<String>,
    c: Confirmed,
) -> Response {
    if !inner.has_client {
        return no_client(&c.ctx, &c.op);
    }
    let result = ran(
        &inner,
        &c,
        "refresh_customer",
        inner.reconciler.refresh_customer(&id).await,
    );
    let back = format!("{}/customers/{}", c.ctx.base, enc(&id));
    let title = "Customer refreshed";
    c.conclude(
        &inner,
        "refresh_customer",
        &id,
        title,
        (&back, "Back to the customer"),
        result,
    )
}

pub(super) async fn catch_up_confirm(
    State(inner): State<Shared>,
    ctx: Ctx,
    Extension(op): Extension<Operator>,
) -> Response {
    if !inner.has_client {
        return no_client(&ctx, &op);
    }
    let question = html! {
        "Run a catch-up now? Events are listed from Stripe since the stored cursor and every missed one is processed "
        "(with its real id, so nothing is applied twice). It uses the Stripe request budget."
    };
    let action = format!("{}/catch-up", ctx.base);
    ok(&pages::confirm(
        &ctx.base,
        &op,
        "Run a catch-up",
        &question,
        &action,
        &[],
    ))
}

pub(super) async fn catch_up(State(inner): State<Shared>, c: Confirmed) -> Response {
    if !inner.has_client {
        return no_client(&c.ctx, &c.op);
    }
    let Ok(_running) = inner.running.try_lock() else {
        return c.failed(
            StatusCode::CONFLICT,
            "A catch-up is already running: wait for it to finish.",
        );
    };
    let result = ran(&inner, &c, "catch_up", inner.reconciler.catch_up().await);
    let home = c.ctx.home();
    let title = "Catch-up finished";
    c.conclude(
        &inner,
        "catch_up",
        "",
        title,
        (&home, "Back to the overview"),
        result,
    )
}
