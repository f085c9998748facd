//! The console's axum handlers: sign-in, pages, and the confirmed actions.

use std::collections::HashMap;
use std::sync::Arc;

use axum::Router;
use axum::extract::{FromRequest, OriginalUri, Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Form};
use maud::Markup;

use super::actions::{
    catch_up, catch_up_confirm, refresh, refresh_confirm, replay, replay_all, replay_all_confirm,
    replay_confirm, resolve, resolve_confirm,
};
use super::auth::{self, Operator};
use super::pages::{self, EventFilter, enc};
use super::{Inner, lock};
use crate::ledger::{EventKey, LedgerEntry, LedgerQuery, LedgerState};
use crate::metrics::observe_ledger;
use crate::reconcile::EVENTS_CURSOR;
use crate::store::{StoreError, SubscriptionQuery};

type Shared = Arc<Inner>;

const SESSION_COOKIE: &str = "swg_admin";
const LOGIN_COOKIE: &str = "swg_admin_login";
/// How long the sign-in form's double-submit token lives.
const LOGIN_FORM_TTL: std::time::Duration = std::time::Duration::from_secs(600);
/// The most records the overview counts per flag.
const COUNT_LIMIT: usize = 10_000;
/// The most store pages one list page reads while filtering.
const MAX_SCAN_PAGES: usize = 20;

pub(super) fn router(inner: Shared) -> Router {
    if !inner.token.is_configured() {
        // Off unless configured: nothing here exists.
        return Router::new().fallback(|| async { StatusCode::NOT_FOUND });
    }
    let protected = Router::new()
        .route("/", get(overview))
        .route("/events", get(events))
        .route("/events/{id}", get(event))
        .route("/events/{id}/replay", get(replay_confirm).post(replay))
        .route(
            "/dead-letters/replay-all",
            get(replay_all_confirm).post(replay_all),
        )
        .route("/review", get(review))
        .route(
            "/subscriptions/{id}/resolve",
            get(resolve_confirm).post(resolve),
        )
        .route("/customers", get(find_customer))
        .route("/customers/{id}", get(customer))
        .route(
            "/customers/{id}/refresh",
            get(refresh_confirm).post(refresh),
        )
        .route("/catch-up", get(catch_up_confirm).post(catch_up))
        .route("/logout", post(logout))
        .route_layer(middleware::from_fn_with_state(
            inner.clone(),
            require_operator,
        ));
    Router::new()
        .route("/login", get(login_form).post(login))
        .merge(protected)
        .fallback(not_found)
        .layer(middleware::from_fn(security_headers))
        .with_state(inner)
}

// ---------------------------------------------------------------------------
// Plumbing
// ---------------------------------------------------------------------------

/// The prefix the console is mounted at ("" at the root), from the
/// original and the nested request paths.
fn base_of(original: Option<&OriginalUri>, inner_path: &str) -> String {
    let outer = original.map_or(inner_path, |o| o.0.path());
    let base = if inner_path == "/" {
        outer.trim_end_matches('/')
    } else {
        outer.strip_suffix(inner_path).unwrap_or("")
    };
    base.to_owned()
}

pub(super) fn home(base: &str) -> String {
    if base.is_empty() {
        "/".to_owned()
    } else {
        base.to_owned()
    }
}

/// Where a request came from: the mount prefix and the host.
pub(super) struct Ctx {
    pub(super) base: String,
    pub(super) host: Option<String>,
}

impl Ctx {
    fn of(original: Option<&OriginalUri>, path: &str, headers: &HeaderMap) -> Self {
        Self {
            base: base_of(original, path),
            host: headers
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_owned),
        }
    }

    fn cookie_path(&self) -> &str {
        if self.base.is_empty() {
            "/"
        } else {
            &self.base
        }
    }

    /// The overview: the mount path itself (a nested router's `/` answers
    /// the prefix without a trailing slash).
    pub(super) fn home(&self) -> String {
        home(&self.base)
    }
}

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for Ctx {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _: &S,
    ) -> Result<Self, Self::Rejection> {
        Ok(Ctx::of(
            parts.extensions.get::<OriginalUri>(),
            parts.uri.path(),
            &parts.headers,
        ))
    }
}

pub(super) fn page(status: StatusCode, markup: &Markup) -> Response {
    (status, Html(markup.clone().into_string())).into_response()
}

pub(super) fn ok(markup: &Markup) -> Response {
    page(StatusCode::OK, markup)
}

fn see_other(location: &str) -> Response {
    let mut r = StatusCode::SEE_OTHER.into_response();
    if let Ok(v) = HeaderValue::from_str(location) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    r
}

fn with_cookie(mut response: Response, cookie: &str) -> Response {
    if let Ok(v) = HeaderValue::from_str(cookie) {
        response.headers_mut().append(header::SET_COOKIE, v);
    }
    response
}

pub(super) fn error_page(
    ctx: &Ctx,
    op: Option<&Operator>,
    status: StatusCode,
    text: &str,
) -> Response {
    let home = ctx.home();
    page(
        status,
        &pages::message(
            &ctx.base,
            op,
            status.canonical_reason().unwrap_or("Error"),
            text,
            true,
            Some((&home, "Back to the overview")),
        ),
    )
}

pub(super) fn store_failed(ctx: &Ctx, op: &Operator, e: &StoreError) -> Response {
    error_page(
        ctx,
        Some(op),
        StatusCode::SERVICE_UNAVAILABLE,
        &format!("The store failed: {e}. Try again."),
    )
}

async fn not_found(ctx: Ctx) -> Response {
    error_page(&ctx, None, StatusCode::NOT_FOUND, "No such page.")
}

/// Headers on every answer: no scripts, no framing, no caching, no
/// sniffing.
async fn security_headers(request: Request, next: Next) -> Response {
    let mut response = next.run(request).await;
    let h = response.headers_mut();
    for (name, value) in [
        (
            header::CONTENT_SECURITY_POLICY,
            "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; \
             frame-ancestors 'none'; base-uri 'none'",
        ),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::REFERRER_POLICY, "same-origin"),
        (header::CACHE_CONTROL, "no-store"),
        (header::X_FRAME_OPTIONS, "DENY"),
    ] {
        h.insert(name, HeaderValue::from_static(value));
    }
    response
}

/// A name for the audit log: printable, at most 64 characters.
fn clean_name(name: &str, fallback: &str) -> String {
    let name: String = name
        .trim()
        .chars()
        .filter(|c| !c.is_control())
        .take(64)
        .collect();
    if name.is_empty() {
        fallback.to_owned()
    } else {
        name
    }
}

/// Signs the request in (bearer token or session cookie) and hands the
/// [`Operator`] to the handler; otherwise sends a browser to the sign-in
/// form (GET) or refuses (401).
async fn require_operator(
    State(inner): State<Shared>,
    mut request: Request,
    next: Next,
) -> Response {
    let ctx = Ctx::of(
        request.extensions().get::<OriginalUri>(),
        request.uri().path(),
        request.headers(),
    );
    let headers = request.headers();
    let operator = if let Some(value) = headers.get(header::AUTHORIZATION) {
        let presented = value
            .to_str()
            .ok()
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or_default();
        if !inner.token.matches(presented) {
            return error_page(&ctx, None, StatusCode::UNAUTHORIZED, "Wrong admin token.");
        }
        let who = headers
            .get("x-operator")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        Some(Operator {
            name: clean_name(who, "bearer"),
            csrf: inner.bearer_csrf.clone(),
            session: None,
        })
    } else {
        headers
            .get(header::COOKIE)
            .and_then(|v| v.to_str().ok())
            .and_then(|c| auth::cookie(c, SESSION_COOKIE))
            .and_then(|id| inner.sessions.get(id))
    };
    let Some(operator) = operator else {
        return if request.method() == Method::GET {
            see_other(&format!("{}/login", ctx.base))
        } else {
            error_page(&ctx, None, StatusCode::UNAUTHORIZED, "Sign in first.")
        };
    };
    request.extensions_mut().insert(operator);
    next.run(request).await
}

/// A confirmed `POST`: the operator and the form, whose `csrf` field was
/// checked against the operator's token (403 otherwise).
pub(super) struct Confirmed {
    pub(super) ctx: Ctx,
    pub(super) op: Operator,
    form: HashMap<String, String>,
}

impl<S: Send + Sync> FromRequest<S> for Confirmed {
    type Rejection = Response;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        let ctx = Ctx::of(
            request.extensions().get::<OriginalUri>(),
            request.uri().path(),
            request.headers(),
        );
        let op = request.extensions().get::<Operator>().cloned();
        let form = Form::<HashMap<String, String>>::from_request(request, state)
            .await
            .map(|Form(f)| f)
            .unwrap_or_default();
        let Some(op) = op else {
            return Err(error_page(
                &ctx,
                None,
                StatusCode::UNAUTHORIZED,
                "Sign in first.",
            ));
        };
        let presented = form.get("csrf").map_or("", String::as_str);
        if presented.is_empty() || !auth::same(presented, &op.csrf) {
            return Err(error_page(
                &ctx,
                Some(&op),
                StatusCode::FORBIDDEN,
                "Refused: the form's CSRF token is missing or wrong. Reload the page and try again.",
            ));
        }
        Ok(Self { ctx, op, form })
    }
}

impl Confirmed {
    pub(super) fn field(&self, name: &str) -> Option<&str> {
        self.form
            .get(name)
            .map(String::as_str)
            .filter(|v| !v.is_empty())
    }

    /// Logs the action (who, what, on what, how it ended) and answers with
    /// its result page, or its error page with `status`.
    pub(super) fn conclude(
        &self,
        inner: &Inner,
        action: &'static str,
        target: &str,
        title: &str,
        back: (&str, &str),
        result: Result<String, (StatusCode, String)>,
    ) -> Response {
        let text = match &result {
            Ok(t) | Err((_, t)) => t.clone(),
        };
        inner.audit(&self.op.name, action, target, text.clone());
        match result {
            Ok(t) => self.done(title, &t, back),
            Err((status, t)) => self.failed(status, &t),
        }
    }

    fn done(&self, title: &str, text: &str, back: (&str, &str)) -> Response {
        ok(&pages::message(
            &self.ctx.base,
            Some(&self.op),
            title,
            text,
            false,
            Some(back),
        ))
    }

    pub(super) fn failed(&self, status: StatusCode, text: &str) -> Response {
        error_page(&self.ctx, Some(&self.op), status, text)
    }
}

// ---------------------------------------------------------------------------
// Sign-in
// ---------------------------------------------------------------------------

fn login_page(inner: &Inner, ctx: &Ctx, status: StatusCode, error: Option<&str>) -> Response {
    let nonce = auth::random_token();
    let secure = inner.config.cookie_security.secure_for(ctx.host.as_deref());
    let cookie = auth::set_cookie(
        LOGIN_COOKIE,
        &nonce,
        ctx.cookie_path(),
        Some(LOGIN_FORM_TTL),
        secure,
    );
    with_cookie(
        page(status, &pages::login(&ctx.base, &nonce, error)),
        &cookie,
    )
}

async fn login_form(State(inner): State<Shared>, ctx: Ctx, headers: HeaderMap) -> Response {
    let signed_in = headers
        .get(header::COOKIE)
        .and_then(|v| v.to_str().ok())
        .and_then(|c| auth::cookie(c, SESSION_COOKIE))
        .and_then(|id| inner.sessions.get(id))
        .is_some();
    if signed_in {
        return see_other(&ctx.home());
    }
    login_page(&inner, &ctx, StatusCode::OK, None)
}

async fn login(
    State(inner): State<Shared>,
    ctx: Ctx,
    headers: HeaderMap,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    let field = |k: &str| form.get(k).map_or("", String::as_str);
    let expected = headers
        .get(header::COOKIE)
        .and_then(|v| v.to_str().ok())
        .and_then(|c| auth::cookie(c, LOGIN_COOKIE))
        .unwrap_or_default();
    if expected.is_empty() || !auth::same(field("csrf"), expected) {
        return login_page(
            &inner,
            &ctx,
            StatusCode::FORBIDDEN,
            Some("The sign-in form expired or was not ours: try again."),
        );
    }
    if !inner.token.matches(field("token")) {
        return login_page(
            &inner,
            &ctx,
            StatusCode::UNAUTHORIZED,
            Some("Wrong admin token."),
        );
    }
    let name = clean_name(field("name"), "operator");
    let id = inner.sessions.open(&name);
    inner.audit(&name, "sign_in", "", "signed in".to_owned());
    let secure = inner.config.cookie_security.secure_for(ctx.host.as_deref());
    let session = auth::set_cookie(
        SESSION_COOKIE,
        &id,
        ctx.cookie_path(),
        Some(inner.config.session_ttl),
        secure,
    );
    let clear = auth::set_cookie(
        LOGIN_COOKIE,
        "",
        ctx.cookie_path(),
        Some(std::time::Duration::ZERO),
        secure,
    );
    with_cookie(with_cookie(see_other(&ctx.home()), &session), &clear)
}

async fn logout(State(inner): State<Shared>, c: Confirmed) -> Response {
    if let Some(id) = &c.op.session {
        inner.sessions.close(id);
    }
    inner.audit(&c.op.name, "sign_out", "", "signed out".to_owned());
    let secure = inner
        .config
        .cookie_security
        .secure_for(c.ctx.host.as_deref());
    let clear = auth::set_cookie(
        SESSION_COOKIE,
        "",
        c.ctx.cookie_path(),
        Some(std::time::Duration::ZERO),
        secure,
    );
    with_cookie(see_other(&format!("{}/login", c.ctx.base)), &clear)
}

// ---------------------------------------------------------------------------
// Pages
// ---------------------------------------------------------------------------

async fn count_flagged(inner: &Inner, review: bool) -> Result<usize, StoreError> {
    let query = SubscriptionQuery {
        needs_review: review,
        needs_reconcile: !review,
        limit: COUNT_LIMIT,
        ..SubscriptionQuery::default()
    };
    Ok(inner
        .processor
        .store()
        .list_subscriptions(&query)
        .await?
        .len())
}

async fn overview(
    State(inner): State<Shared>,
    ctx: Ctx,
    Extension(op): Extension<Operator>,
) -> Response {
    let now = inner.now();
    let store = inner.processor.store();
    let loaded = async {
        let ledger = observe_ledger(store.as_ref(), now).await?;
        let needs_review = count_flagged(&inner, true).await?;
        let needs_reconcile = count_flagged(&inner, false).await?;
        let cursor = store
            .load_cursor(EVENTS_CURSOR)
            .await?
            .and_then(|c| c.parse::<i64>().ok());
        Ok::<_, StoreError>((ledger, needs_review, needs_reconcile, cursor))
    }
    .await;
    match loaded {
        Ok((ledger, needs_review, needs_reconcile, cursor)) => ok(&pages::overview(
            &ctx.base,
            &op,
            &pages::Overview {
                now,
                stats: inner.processor.stats(),
                ledger: &ledger,
                needs_review,
                needs_reconcile,
                cursor,
                last_run: lock(&inner.last_run).clone(),
                audit: lock(&inner.audit).iter().cloned().collect(),
                has_client: inner.has_client,
            },
        )),
        Err(e) => store_failed(&ctx, &op, &e),
    }
}

fn states_for(filter: &str) -> Vec<LedgerState> {
    match filter {
        "dead" => vec![LedgerState::Dead],
        "failed" => vec![LedgerState::Failed],
        "unsettled" => vec![
            LedgerState::Pending,
            LedgerState::Processing,
            LedgerState::Failed,
        ],
        _ => vec![LedgerState::Dead, LedgerState::Failed],
    }
}

/// One page of ledger entries matching the filter, and the id to continue
/// after when there may be more.
async fn filtered_entries(
    inner: &Inner,
    filter: &EventFilter,
    after: Option<String>,
) -> Result<(Vec<LedgerEntry>, Option<String>), StoreError> {
    let size = inner.config.page_size.max(1);
    let mut query = LedgerQuery {
        states: states_for(&filter.state),
        after,
        limit: size,
    };
    let mut rows = Vec::new();
    for _ in 0..MAX_SCAN_PAGES {
        let batch = inner.processor.store().list(&query).await?;
        let full = batch.len() == size;
        for entry in batch {
            query.after = Some(entry.key.event_id.clone());
            let type_ok = filter.event_type.is_empty()
                || entry.event_type.starts_with(filter.event_type.as_str());
            let account_ok = filter.account.is_empty()
                || entry.key.account.as_deref() == Some(filter.account.as_str());
            if type_ok && account_ok {
                rows.push(entry);
                if rows.len() == size {
                    return Ok((rows, query.after));
                }
            }
        }
        if !full {
            return Ok((rows, None));
        }
    }
    Ok((rows, query.after))
}

async fn events(
    State(inner): State<Shared>,
    ctx: Ctx,
    Extension(op): Extension<Operator>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let get = |k: &str| q.get(k).map(|v| v.trim().to_owned()).unwrap_or_default();
    let filter = EventFilter {
        state: get("state"),
        event_type: get("type"),
        account: get("account"),
    };
    let after = Some(get("after")).filter(|a| !a.is_empty());
    match filtered_entries(&inner, &filter, after).await {
        Ok((rows, next)) => ok(&pages::events(
            &ctx.base,
            &op,
            inner.now(),
            &filter,
            &rows,
            next.as_deref(),
        )),
        Err(e) => store_failed(&ctx, &op, &e),
    }
}

pub(super) fn key_of(id: &str, q: &HashMap<String, String>) -> EventKey {
    EventKey::new(
        id,
        q.get("account")
            .map(String::as_str)
            .filter(|a| !a.is_empty()),
    )
}

fn history(inner: &Inner, target: &str) -> Vec<super::AuditEntry> {
    lock(&inner.audit)
        .iter()
        .filter(|a| a.target == target)
        .cloned()
        .collect()
}

async fn event(
    State(inner): State<Shared>,
    ctx: Ctx,
    Extension(op): Extension<Operator>,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    match inner.processor.store().get(&key_of(&id, &q)).await {
        Ok(Some(entry)) => ok(&pages::event(
            &ctx.base,
            &op,
            inner.now(),
            &entry,
            &history(&inner, &id),
        )),
        Ok(None) => error_page(
            &ctx,
            Some(&op),
            StatusCode::NOT_FOUND,
            "No such event in the ledger.",
        ),
        Err(e) => store_failed(&ctx, &op, &e),
    }
}

async fn review(
    State(inner): State<Shared>,
    ctx: Ctx,
    Extension(op): Extension<Operator>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let reconcile = q.get("flag").is_some_and(|f| f == "reconcile");
    let size = inner.config.page_size.max(1);
    let query = SubscriptionQuery {
        needs_review: !reconcile,
        needs_reconcile: reconcile,
        after: q.get("after").filter(|a| !a.is_empty()).cloned(),
        limit: size,
        ..SubscriptionQuery::default()
    };
    match inner.processor.store().list_subscriptions(&query).await {
        Ok(rows) => {
            let next = (rows.len() == size)
                .then(|| rows.last().map(|r| r.id.clone()))
                .flatten();
            ok(&pages::review(
                &ctx.base,
                &op,
                reconcile,
                &rows,
                next.as_deref(),
            ))
        }
        Err(e) => store_failed(&ctx, &op, &e),
    }
}

async fn find_customer(ctx: Ctx, Query(q): Query<HashMap<String, String>>) -> Response {
    match q.get("id").map(|s| s.trim()).filter(|s| !s.is_empty()) {
        Some(id) => see_other(&format!("{}/customers/{}", ctx.base, enc(id))),
        None => see_other(&ctx.home()),
    }
}

async fn customer(
    State(inner): State<Shared>,
    ctx: Ctx,
    Extension(op): Extension<Operator>,
    Path(id): Path<String>,
) -> Response {
    let store = inner.processor.store();
    let loaded = async {
        let records = store.find_by_customer(&id).await?;
        let entitlements = store.load_entitlements(&id).await?;
        Ok::<_, StoreError>((records, entitlements))
    }
    .await;
    let (records, entitlements) = match loaded {
        Ok(v) => v,
        Err(e) => return store_failed(&ctx, &op, &e),
    };
    let decision = inner.config.policy.decide_customer(&records, inner.now());
    let changes = lock(&inner.changes)
        .iter()
        .filter(|c| c.customer.as_deref() == Some(id.as_str()))
        .cloned()
        .collect();
    ok(&pages::customer(
        &ctx.base,
        &op,
        &pages::CustomerView {
            id: &id,
            records: &records,
            decision,
            entitlements,
            changes,
            history: history(&inner, &id),
            has_client: inner.has_client,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mount_prefix_is_what_nesting_stripped() {
        let orig = |p: &str| OriginalUri(p.parse().unwrap());
        assert_eq!(base_of(Some(&orig("/admin/events")), "/events"), "/admin");
        assert_eq!(base_of(Some(&orig("/admin")), "/"), "/admin");
        assert_eq!(base_of(Some(&orig("/admin/")), "/"), "/admin");
        assert_eq!(
            base_of(Some(&orig("/ops/billing/review")), "/review"),
            "/ops/billing"
        );
        assert_eq!(base_of(Some(&orig("/events")), "/events"), "");
        assert_eq!(base_of(None, "/events"), "");
    }

    #[test]
    fn audit_names_are_printable_and_short() {
        assert_eq!(clean_name("  ann\u{7}\n ", "x"), "ann");
        assert_eq!(clean_name("", "bearer"), "bearer");
        assert_eq!(clean_name(&"a".repeat(100), "x").len(), 64);
    }
}
