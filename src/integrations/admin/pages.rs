//! The console's HTML, as `maud` templates: every spliced value is escaped
//! at compile time, so attacker-influenced text (event ids, error texts,
//! anomaly details) renders as text. No JavaScript.

use std::fmt::Write;

use maud::{DOCTYPE, Markup, html};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::auth::Operator;
use super::{AuditEntry, RunSummary};
use crate::access::AccessDecision;
use crate::ledger::{LedgerEntry, LedgerState};
use crate::metrics::LedgerSnapshot;
use crate::processor::Stats;
use crate::reconcile::Change;
use crate::subscription::{AnomalyKind, CustomerEntitlements, SubscriptionRecord};

const STYLE: &str = "
body{font:14px/1.45 system-ui,sans-serif;margin:0;color:#1d1d1f;background:#f6f7f9}
header{background:#24292f;color:#fff;padding:.6em 1.2em;display:flex;gap:1.2em;align-items:center;flex-wrap:wrap}
header a{color:#fff;text-decoration:none}header a:hover{text-decoration:underline}
header .who{margin-left:auto;opacity:.85}header form{display:inline}
main{padding:1em 1.4em;max-width:1200px}
h1{font-size:1.4em;margin:.3em 0 .6em}h2{font-size:1.1em;margin:1.4em 0 .4em}
table{border-collapse:collapse;background:#fff;width:100%;margin:.4em 0}
th,td{border:1px solid #d0d7de;padding:.3em .5em;text-align:left;vertical-align:top}
th{background:#eef1f4}td.num{text-align:right;font-variant-numeric:tabular-nums}
code,.id{font-family:ui-monospace,monospace;word-break:break-all}
.cards{display:flex;gap:.8em;flex-wrap:wrap}
.card{background:#fff;border:1px solid #d0d7de;border-radius:6px;padding:.6em 1em;min-width:9em}
.card b{display:block;font-size:1.6em}
.warn{color:#9a6700}.bad{color:#cf222e}.ok{color:#1a7f37}
.flash{background:#fff8c5;border:1px solid #d4a72c;padding:.5em 1em;border-radius:6px}
.error{background:#ffebe9;border:1px solid #cf222e;padding:.5em 1em;border-radius:6px}
button,.button{background:#0969da;color:#fff;border:0;border-radius:6px;padding:.4em .9em;font:inherit;cursor:pointer;text-decoration:none;display:inline-block}
button.danger{background:#cf222e}
form.inline{display:inline}input,select{font:inherit;padding:.25em}
pre{background:#fff;border:1px solid #d0d7de;padding:.6em;overflow:auto;max-height:30em}
ol.timeline li{margin:.2em 0}
";

/// Percent-encodes `text` for a path segment or a query value: everything
/// but unreserved characters.
pub(super) fn enc(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

pub(super) fn time(t: OffsetDateTime) -> String {
    t.format(&Rfc3339)
        .unwrap_or_else(|_| t.unix_timestamp().to_string())
}

pub(super) fn unix(t: Option<i64>) -> String {
    t.and_then(|s| OffsetDateTime::from_unix_timestamp(s).ok())
        .map_or_else(|| "—".to_owned(), time)
}

/// "3d 4h", "12m 5s": the largest two units.
pub(super) fn age(now: OffsetDateTime, then: OffsetDateTime) -> String {
    let s = (now - then).whole_seconds().max(0);
    let (d, h, m, sec) = (s / 86_400, s / 3600 % 24, s / 60 % 60, s % 60);
    if d > 0 {
        format!("{d}d {h}h")
    } else if h > 0 {
        format!("{h}h {m}m")
    } else if m > 0 {
        format!("{m}m {sec}s")
    } else {
        format!("{sec}s")
    }
}

fn anomaly_kind(kind: AnomalyKind) -> &'static str {
    match kind {
        AnomalyKind::ImpossibleTransition => "impossible_transition",
        AnomalyKind::MissedTransition => "missed_transition",
        AnomalyKind::UnknownStatus => "unknown_status",
        AnomalyKind::RefetchFailed => "refetch_failed",
        AnomalyKind::Diverged => "diverged",
        AnomalyKind::CustomerMismatch => "customer_mismatch",
        AnomalyKind::NotFoundAtStripe => "not_found_at_stripe",
    }
}

fn event_href(base: &str, key_id: &str, account: Option<&str>) -> String {
    let mut href = format!("{base}/events/{}", enc(key_id));
    if let Some(a) = account {
        let _ = write!(href, "?account={}", enc(a));
    }
    href
}

fn replay_href(base: &str, key_id: &str, account: Option<&str>) -> String {
    let mut href = format!("{base}/events/{}/replay", enc(key_id));
    if let Some(a) = account {
        let _ = write!(href, "?account={}", enc(a));
    }
    href
}

/// The page frame: navigation, who is signed in, sign-out.
pub(super) fn layout(base: &str, title: &str, op: Option<&Operator>, body: &Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · Stripe webhooks console" }
                style { (maud::PreEscaped(STYLE)) }
            }
            body {
                header {
                    strong { "Stripe webhooks" }
                    @if let Some(op) = op {
                        a href=(super::routes::home(base)) { "Overview" }
                        a href={ (base) "/events" } { "Dead letters & failed" }
                        a href={ (base) "/review" } { "Needs review" }
                        form.inline method="get" action={ (base) "/customers" } {
                            input name="id" placeholder="cus_…" aria-label="Customer id" size="16";
                            " " button type="submit" { "Find customer" }
                        }
                        span.who {
                            "Signed in as " (op.name) " "
                            form.inline method="post" action={ (base) "/logout" } {
                                input type="hidden" name="csrf" value=(op.csrf);
                                button type="submit" { "Sign out" }
                            }
                        }
                    }
                }
                main { (body) }
            }
        }
    }
}

pub(super) fn login(base: &str, csrf: &str, error: Option<&str>) -> Markup {
    let body = html! {
        h1 { "Sign in" }
        @if let Some(e) = error { p.error { (e) } }
        form method="post" action={ (base) "/login" } {
            input type="hidden" name="csrf" value=(csrf);
            p { label { "Admin token " input type="password" name="token" autocomplete="current-password" required; } }
            p { label { "Your name (for the audit log) " input type="text" name="name" maxlength="64"; } }
            p { button type="submit" id="sign-in" { "Sign in" } }
        }
    };
    layout(base, "Sign in", None, &body)
}

/// A message page (errors, results).
pub(super) fn message(
    base: &str,
    op: Option<&Operator>,
    title: &str,
    text: &str,
    error: bool,
    back: Option<(&str, &str)>,
) -> Markup {
    let body = html! {
        h1 { (title) }
        p class=(if error { "error" } else { "flash" }) id="result" { (text) }
        @if let Some((href, label)) = back { p { a href=(href) { (label) } } }
    };
    layout(base, title, op, &body)
}

/// A confirmation page: the form posts to `action` with `hidden` fields.
pub(super) fn confirm(
    base: &str,
    op: &Operator,
    title: &str,
    question: &Markup,
    action: &str,
    hidden: &[(&str, &str)],
) -> Markup {
    let body = html! {
        h1 { (title) }
        p { (question) }
        form method="post" action=(action) {
            input type="hidden" name="csrf" value=(op.csrf);
            @for (name, value) in hidden { input type="hidden" name=(name) value=(value); }
            button type="submit" id="confirm" class="danger" { "Confirm" }
            " " a href=(super::routes::home(base)) { "Cancel" }
        }
    };
    layout(base, title, Some(op), &body)
}

/// What the overview shows.
pub(super) struct Overview<'a> {
    pub now: OffsetDateTime,
    pub stats: Stats,
    pub ledger: &'a LedgerSnapshot,
    pub needs_review: usize,
    pub needs_reconcile: usize,
    pub cursor: Option<i64>,
    pub last_run: Option<RunSummary>,
    pub audit: Vec<AuditEntry>,
    pub has_client: bool,
}

pub(super) fn overview(base: &str, op: &Operator, o: &Overview<'_>) -> Markup {
    let s = &o.stats;
    let more = if o.ledger.truncated { "+" } else { "" };
    let body = html! {
        h1 { "Overview" }
        div.cards {
            div.card id="card-dead" { b class=(if o.ledger.dead > 0 { "bad" } else { "ok" }) { (o.ledger.dead) (more) } "dead letters" }
            div.card id="card-failed" { b class=(if o.ledger.failed > 0 { "warn" } else { "ok" }) { (o.ledger.failed) (more) } "failed, will retry" }
            div.card id="card-backlog" { b { (o.ledger.unsettled) (more) } "unsettled (backlog)" }
            div.card id="card-review" { b class=(if o.needs_review > 0 { "warn" } else { "ok" }) { (o.needs_review) } "need review" }
            div.card { b { (o.needs_reconcile) } "await reconciliation" }
        }
        h2 { "Oldest unsettled event" }
        @match &o.ledger.oldest_unsettled {
            Some((id, seen)) => p {
                a.id href=(event_href(base, id, None)) { (id) }
                " — waiting " (age(o.now, *seen)) " (first seen " (time(*seen)) ")"
            },
            None => p.ok { "Nothing waiting." },
        }
        h2 { "Reconciliation" }
        p {
            "Events cursor: " (unix(o.cursor))
            @if let Some(r) = &o.last_run {
                br; "Last run from this console: " (r.kind) " at " (time(r.at)) " by " (r.who) ": " (r.summary)
            }
        }
        p {
            @if o.has_client {
                a.button href={ (base) "/catch-up" } { "Run a catch-up…" } " "
            } @else {
                span.warn { "No Stripe client configured: catch-up and customer refresh are off. " }
            }
            a.button href={ (base) "/dead-letters/replay-all" } { "Replay all dead letters…" }
        }
        h2 { "Processor counters since start" }
        table {
            tr { th { "received" } th { "applied" } th { "duplicates" } th { "stale" } th { "no change" } th { "ignored" } th { "refetches" } th { "in flight" } th { "failed" } th { "dead" } th { "rejected" } }
            tr {
                @for v in [s.received, s.applied, s.duplicates, s.stale, s.no_change, s.ignored, s.refetches, s.in_flight, s.failed, s.dead, s.rejected] {
                    td.num { (v) }
                }
            }
        }
        h2 { "Recent operator actions" }
        @if o.audit.is_empty() { p { "None yet." } } @else {
            table id="audit" {
                tr { th { "when" } th { "who" } th { "action" } th { "on" } th { "result" } }
                @for a in o.audit.iter().rev().take(20) {
                    tr { td { (time(a.at)) } td { (a.who) } td { (a.action) } td.id { (a.target) } td { (a.result) } }
                }
            }
        }
    };
    layout(base, "Overview", Some(op), &body)
}

/// The filters of the event list, as given.
#[derive(Debug, Default, Clone)]
pub(super) struct EventFilter {
    pub state: String,
    pub event_type: String,
    pub account: String,
}

pub(super) fn events(
    base: &str,
    op: &Operator,
    now: OffsetDateTime,
    filter: &EventFilter,
    rows: &[LedgerEntry],
    next: Option<&str>,
) -> Markup {
    let next_href = next.map(|after| {
        format!(
            "{base}/events?state={}&type={}&account={}&after={}",
            enc(&filter.state),
            enc(&filter.event_type),
            enc(&filter.account),
            enc(after)
        )
    });
    let body = html! {
        h1 { "Dead-lettered and failed events" }
        p {
            "Dead letters ran out of attempts (or failed permanently): Stripe was answered 200 and will not send them again. "
            "Fix the cause, then replay them. Failed events are retried by Stripe's next delivery or by an inbox worker."
        }
        form method="get" action={ (base) "/events" } {
            label { "State " select name="state" {
                @for (v, l) in [("", "dead and failed"), ("dead", "dead"), ("failed", "failed"), ("unsettled", "unsettled (pending, processing, failed)")] {
                    option value=(v) selected[filter.state == v] { (l) }
                }
            } } " "
            label { "Type " input name="type" value=(filter.event_type) placeholder="invoice." size="22"; } " "
            label { "Account " input name="account" value=(filter.account) placeholder="acct_…" size="16"; } " "
            button type="submit" { "Filter" }
        }
        @if rows.is_empty() { p.ok id="empty" { "No events match." } } @else {
            table id="events" {
                tr { th { "event" } th { "type" } th { "account" } th { "state" } th { "attempts" } th { "last error" } th { "age" } th {} }
                @for e in rows {
                    tr {
                        td.id { a href=(event_href(base, &e.key.event_id, e.key.account.as_deref())) { (e.key.event_id) } }
                        td { (e.event_type) }
                        td.id { (e.key.account.as_deref().unwrap_or("—")) }
                        td class=(if e.state == LedgerState::Dead { "bad" } else { "warn" }) { (e.state.as_str()) }
                        td.num { (e.attempts) }
                        td { (e.last_error.as_deref().unwrap_or("")) }
                        td { (age(now, e.first_seen_at)) }
                        td {
                            @if matches!(e.state, LedgerState::Dead | LedgerState::Failed) {
                                a.button href=(replay_href(base, &e.key.event_id, e.key.account.as_deref())) { "Replay…" }
                            }
                        }
                    }
                }
            }
        }
        @if let Some(href) = next_href { p { a href=(href) { "Next page →" } } }
    };
    layout(base, "Dead letters and failed events", Some(op), &body)
}

pub(super) fn event(
    base: &str,
    op: &Operator,
    now: OffsetDateTime,
    e: &LedgerEntry,
    history: &[AuditEntry],
) -> Markup {
    let replay = replay_href(base, &e.key.event_id, e.key.account.as_deref());
    let body = html! {
        h1 { "Event " span.id { (e.key.event_id) } }
        table id="event" {
            tr { th { "type" } td { (e.event_type) } }
            tr { th { "account" } td.id { (e.key.account.as_deref().unwrap_or("— (platform)")) } }
            tr { th { "created at Stripe" } td { (unix(Some(e.event_created))) } }
            tr { th { "state" } td id="state" { (e.state.as_str()) } }
            tr { th { "attempts" } td { (e.attempts) } }
            tr { th { "first seen" } td { (time(e.first_seen_at)) " (" (age(now, e.first_seen_at)) " ago)" } }
            tr { th { "last change" } td { (time(e.updated_at)) } }
            @if let Some(t) = e.lease_expires_at { tr { th { "lease until" } td { (time(t)) } } }
            @if let Some(t) = e.available_at { tr { th { "next try not before" } td { (time(t)) } } }
            tr { th { "last error" } td { (e.last_error.as_deref().unwrap_or("—")) } }
            @if let Some(r) = &e.ignore_reason { tr { th { "ignored because" } td { (r) } } }
            @if let Some(s) = &e.subscription_id { tr { th { "subscription" } td.id { (s) } } }
            tr { th { "fingerprint" } td.id { (e.fingerprint.to_hex()) } }
        }
        @if matches!(e.state, LedgerState::Dead | LedgerState::Failed) {
            p { a.button href=(replay) { "Replay this event…" } }
        }
        h2 { "Operator actions on this event" }
        @if history.is_empty() { p { "None." } } @else {
            ol.timeline { @for a in history { li { (time(a.at)) " — " (a.who) ": " (a.action) " → " (a.result) } } }
        }
        h2 { "Payload" }
        @match &e.payload {
            Some(p) => details { summary { "Stored payload (" (p.len()) " bytes; kept while the event is pending, failed or dead)" } pre { (p) } },
            None => p { "Not kept: the store drops a payload once the event is processed." },
        }
    };
    layout(base, "Event", Some(op), &body)
}

fn record_row(base: &str, r: &SubscriptionRecord) -> Markup {
    html! {
        tr {
            td.id { (r.id) }
            td.id { @if let Some(c) = r.customer() { a href={ (base) "/customers/" (enc(c)) } { (c) } } @else { "—" } }
            td { (r.status().to_string()) }
            td { (unix(r.state.current_period_end)) }
            td { (unix(r.paid_through)) }
            td { @if r.state.cancel_at_period_end { "cancels at period end" } }
            td {
                @if r.needs_review { span.warn { "needs review " } }
                @if r.needs_reconcile { span { "awaits reconciliation" } }
            }
            td { (r.last_verified_with_stripe.map_or_else(|| "never".to_owned(), time)) }
        }
    }
}

const RECORD_HEAD: [&str; 8] = [
    "subscription",
    "customer",
    "status",
    "period end",
    "paid through",
    "",
    "flags",
    "verified with Stripe",
];

pub(super) fn review(
    base: &str,
    op: &Operator,
    reconcile: bool,
    rows: &[SubscriptionRecord],
    next: Option<&str>,
) -> Markup {
    let flag = if reconcile { "reconcile" } else { "review" };
    let body = html! {
        h1 { @if reconcile { "Subscriptions awaiting reconciliation" } @else { "Subscriptions needing review" } }
        p {
            @if reconcile {
                "These records hold a guess (a same-second tie decided by rule, a failed refetch). The next catch-up or sweep checks them with Stripe; "
                "refresh the customer to check one now."
            } @else {
                "A human should look at these: an impossible transition, a customer mismatch, a record Stripe no longer knows. "
                "Compare with the Stripe dashboard, refresh the customer from Stripe, then mark the item resolved."
            }
            " " a href={ (base) "/review?flag=" (if reconcile { "review" } else { "reconcile" }) } {
                @if reconcile { "Show those needing review" } @else { "Show those awaiting reconciliation" }
            }
        }
        @if rows.is_empty() { p.ok id="empty" { "Nothing here." } }
        @for r in rows {
            section.record id={ "sub-" (enc(&r.id)) } {
                h2.id { (r.id) }
                table { tr { @for h in RECORD_HEAD { th { (h) } } } (record_row(base, r)) }
                @if r.anomalies.is_empty() { p { "No anomalies recorded." } } @else {
                    ol.timeline {
                        @for a in &r.anomalies {
                            li {
                                (unix(Some(a.at))) " — " strong { (anomaly_kind(a.kind)) }
                                @if let Some(id) = &a.event_id { " (event " a.id href=(event_href(base, id, r.account.as_deref())) { (id) } ")" }
                                ": " (a.detail)
                            }
                        }
                    }
                }
                p {
                    @if r.needs_review { a.button href={ (base) "/subscriptions/" (enc(&r.id)) "/resolve" } { "Mark resolved…" } " " }
                    @if let Some(c) = r.customer() { a.button href={ (base) "/customers/" (enc(c)) "/refresh" } { "Refresh customer from Stripe…" } }
                }
            }
        }
        @if let Some(after) = next { p { a href={ (base) "/review?flag=" (flag) "&after=" (enc(after)) } { "Next page →" } } }
    };
    layout(base, "Needs review", Some(op), &body)
}

/// What the customer page shows.
pub(super) struct CustomerView<'a> {
    pub id: &'a str,
    pub records: &'a [SubscriptionRecord],
    pub decision: AccessDecision,
    pub entitlements: Option<CustomerEntitlements>,
    pub changes: Vec<Change>,
    pub history: Vec<AuditEntry>,
    pub has_client: bool,
}

pub(super) fn customer(base: &str, op: &Operator, c: &CustomerView<'_>) -> Markup {
    let d = &c.decision;
    let class = match d.access {
        crate::access::Access::Granted => "ok",
        crate::access::Access::Grace => "warn",
        crate::access::Access::Denied => "bad",
    };
    let body = html! {
        h1 { "Customer " span.id { (c.id) } }
        p id="access" {
            "Access: " strong class=(class) { (d.access.as_str()) }
            " — reason " code { (d.reason.as_str()) }
            @if let Some(t) = d.valid_until { ", valid until " (time(t)) }
        }
        @if c.has_client {
            p { a.button href={ (base) "/customers/" (enc(c.id)) "/refresh" } { "Refresh from Stripe…" } }
        }
        h2 { "Subscriptions" }
        @if c.records.is_empty() { p id="empty" { "No subscription stored for this customer." } } @else {
            table id="subscriptions" {
                tr { @for h in RECORD_HEAD { th { (h) } } }
                @for r in c.records { (record_row(base, r)) }
            }
        }
        h2 { "Entitlements" }
        @match &c.entitlements {
            Some(e) if !e.lookup_keys.is_empty() => ul { @for k in &e.lookup_keys { li { code { (k) } } } },
            Some(_) => p { "Stripe reported no active entitlement." },
            None => p { "No entitlement summary received." },
        }
        h2 { "Recent changes" }
        ol.timeline {
            @for r in c.records {
                @if let Some(ch) = &r.last_change {
                    li { "Last status change of " span.id { (r.id) } ": " (ch.from.to_string()) " → " (ch.to.to_string())
                        @if !ch.event_id.is_empty() { " (event " span.id { (ch.event_id) } ")" } }
                }
                @for a in &r.anomalies {
                    li { (unix(Some(a.at))) " — " span.id { (r.id) } ": " (anomaly_kind(a.kind)) ": " (a.detail) }
                }
            }
            @for ch in &c.changes {
                li { "Reconciliation (" (format!("{:?}", ch.source)) "): " span.id { (ch.subscription_id) } " " (format!("{:?}", ch.kind))
                    " — " (ch.before_status.as_ref().map_or_else(|| "new".to_owned(), ToString::to_string)) " → " (ch.after_status.to_string())
                    @if let Some(d) = &ch.detail { ": " (d) } }
            }
            @for a in &c.history { li { (time(a.at)) " — " (a.who) ": " (a.action) " → " (a.result) } }
        }
    };
    layout(base, "Customer", Some(op), &body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_encoding_keeps_only_unreserved_bytes() {
        assert_eq!(enc("evt_1"), "evt_1");
        assert_eq!(enc("evt_<script>/x?y"), "evt_%3Cscript%3E%2Fx%3Fy");
        assert_eq!(enc("é"), "%C3%A9");
    }

    #[test]
    fn ages_show_two_units() {
        let t = OffsetDateTime::UNIX_EPOCH;
        assert_eq!(age(t + time::Duration::seconds(5), t), "5s");
        assert_eq!(age(t + time::Duration::seconds(125), t), "2m 5s");
        assert_eq!(
            age(t + time::Duration::seconds(3 * 86_400 + 4 * 3600 + 7), t),
            "3d 4h"
        );
        assert_eq!(
            age(t, t + time::Duration::seconds(9)),
            "0s",
            "never negative"
        );
    }

    #[test]
    fn spliced_text_is_escaped() {
        let page =
            message("/admin", None, "t", "<script>alert(1)</script>", true, None).into_string();
        assert!(page.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
        assert!(!page.contains("<script>"));
    }
}
