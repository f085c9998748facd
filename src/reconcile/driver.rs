//! The [`Reconciler`]: the async driver that lists, retrieves, plans,
//! saves and notifies (the rules are in the [module documentation](super)).

use std::collections::{BTreeMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use time::{Duration, OffsetDateTime};

use super::{
    Change, ChangeKind, ChangeSource, EVENT_RETENTION, EVENTS_CURSOR, Notifier, ReconcileConfig,
    ReconcileError, ReconcileReport, STORE_PAGE, SweepScope, access_change, plan,
};
use crate::access::AccessPolicy;
use crate::client::{
    BudgetConfig, ClientError, ClientErrorKind, EventListQuery, RequestBudget, StripeClient,
    SubscriptionListQuery,
};
use crate::event::{Event, SubscriptionView};
use crate::ledger::{EventKey, LedgerQuery, LedgerState};
use crate::processor::{Outcome, WebhookProcessor};
use crate::rt::join::join_all;
use crate::store::{StoreError, StoreErrorKind, SubscriptionQuery};
use crate::subscription::{self, AnomalyKind, SubscriptionRecord};

/// The reconciliation driver. Build with [`Reconciler::new`].
pub struct Reconciler {
    processor: WebhookProcessor,
    client: Arc<dyn StripeClient>,
    notifier: Option<Arc<dyn Notifier>>,
    policy: AccessPolicy,
    config: ReconcileConfig,
    budget: Option<Arc<RequestBudget>>,
}

impl std::fmt::Debug for Reconciler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reconciler")
            .field("config", &self.config)
            .field("notifier", &self.notifier.is_some())
            .finish_non_exhaustive()
    }
}

impl Reconciler {
    /// A reconciler built from `processor`: it reads and writes the
    /// processor's store (records, ledger and the events cursor) and feeds
    /// replayed events through the processor, so it cannot be pointed at
    /// another store by mistake. `client` is the Stripe API (wrap it in a
    /// [`RequestBudget`], or use [`Reconciler::with_budget`]).
    pub fn new(processor: WebhookProcessor, client: Arc<dyn StripeClient>) -> Self {
        Self {
            processor,
            client,
            notifier: None,
            policy: AccessPolicy::default(),
            config: ReconcileConfig::default(),
            budget: None,
        }
    }

    /// Wraps the client in a [`RequestBudget`] with `config` (the report
    /// then counts requests and rate limits).
    #[must_use]
    pub fn with_budget(mut self, config: BudgetConfig) -> Self {
        let budget = Arc::new(RequestBudget::new(
            self.client.clone(),
            self.processor.clock().clone(),
            config,
        ));
        self.client = budget.clone();
        self.budget = Some(budget);
        self
    }

    /// Uses a [`RequestBudget`] shared with other users of the API (the
    /// processor's refetches, say) as the client. The report's `requests` and
    /// `rate_limited` are then the budget's counts during the run, which
    /// include those other users' requests made meanwhile.
    #[must_use]
    pub fn with_shared_budget(mut self, budget: Arc<RequestBudget>) -> Self {
        self.client = budget.clone();
        self.budget = Some(budget);
        self
    }

    /// The notifier.
    #[must_use]
    pub fn notifier(mut self, notifier: Arc<dyn Notifier>) -> Self {
        self.notifier = Some(notifier);
        self
    }

    /// The access policy used to classify changes.
    #[must_use]
    pub fn policy(mut self, policy: AccessPolicy) -> Self {
        self.policy = policy;
        self
    }

    /// The settings.
    #[must_use]
    pub fn config(mut self, config: ReconcileConfig) -> Self {
        self.config = config;
        self
    }

    /// The budget, when [`Reconciler::with_budget`] set one.
    pub fn budget(&self) -> Option<&Arc<RequestBudget>> {
        self.budget.as_ref()
    }

    fn store(&self) -> &Arc<dyn crate::store::Storage> {
        self.processor.store()
    }

    fn now(&self) -> OffsetDateTime {
        self.processor.clock().now()
    }

    fn counters(&self) -> (u64, u64) {
        self.budget
            .as_ref()
            .map_or((0, 0), |b| (b.requests(), b.rate_limited()))
    }

    /// Catch-up, then a sweep of `scope`: the usual scheduled job.
    ///
    /// # Errors
    ///
    /// As [`Reconciler::catch_up`] and [`Reconciler::sweep`].
    pub async fn run(&self, scope: SweepScope) -> Result<ReconcileReport, ReconcileError> {
        let mut report = self.catch_up().await?;
        report.merge(self.sweep(scope).await?);
        Ok(report)
    }

    /// Lists `/v1/events` from the stored cursor and processes every event
    /// through the processor (same ids, same ledger).
    ///
    /// Events whose failure is retryable hold the cursor back; events that
    /// fail permanently are listed in
    /// [`ReconcileReport::events_failed_permanently`] and let it move.
    ///
    /// # Errors
    ///
    /// [`ReconcileError`] when listing, the cursor store or the subscription
    /// store fails; changes saved before the error are notified first.
    /// Events that fail to process are counted instead.
    pub async fn catch_up(&self) -> Result<ReconcileReport, ReconcileError> {
        let (requests0, limited0) = self.counters();
        let mut report = ReconcileReport {
            dry_run: self.config.dry_run,
            ..ReconcileReport::default()
        };
        let mut before = BTreeMap::new();
        let result = self.catch_up_events(&mut report, &mut before).await;
        // Whatever was saved is reported and notified, even when the run
        // failed part-way: the next run would find it in sync.
        let diffed = if self.config.dry_run {
            Ok(())
        } else {
            self.catch_up_changes(before, &mut report).await
        };
        self.notify(&report.changes).await;
        result?;
        diffed?;
        self.count_requests(&mut report, requests0, limited0);
        Ok(report)
    }

    /// Lists and processes the events; records each touched subscription's
    /// record as it was before its first event in `before`.
    async fn catch_up_events(
        &self,
        report: &mut ReconcileReport,
        before: &mut BTreeMap<String, Option<SubscriptionRecord>>,
    ) -> Result<(), ReconcileError> {
        let started = self.now();
        let floor = (started - EVENT_RETENTION).unix_timestamp();
        let cursor = match self.processor.store().load_cursor(EVENTS_CURSOR).await? {
            Some(text) => text.parse::<i64>().ok(),
            None => None,
        };
        let from = cursor
            .map_or_else(
                || (started - self.config.lookback.min(EVENT_RETENTION)).unix_timestamp(),
                |c| c - self.config.overlap.whole_seconds(),
            )
            .max(floor);
        let mut oldest_failure: Option<i64> = None;
        let mut query = EventListQuery {
            created_gte: Some(from),
            starting_after: None,
            types: self.config.event_types.clone(),
            delivery_success: self.config.only_failed_deliveries.then_some(false),
            limit: 100,
        };
        loop {
            let page = self.client.list_events(&query).await?;
            for event in &page.data {
                report.events_seen += 1;
                if self.config.dry_run {
                    let known = self
                        .processor
                        .store()
                        .get(&EventKey::of(event))
                        .await?
                        .is_some_and(|e| e.state.is_settled());
                    if !known {
                        report.events_missing.push(event.id().to_owned());
                    }
                    continue;
                }
                if let Ok(Some(id)) = subscription::subscription_id_of(event)
                    && !before.contains_key(&id)
                {
                    let record = self.store().load(&id).await?;
                    before.insert(id, record);
                }
                match self.processor.process_event(event).await {
                    Ok(Outcome::Duplicate { .. }) => report.events_duplicate += 1,
                    Ok(_) => report.events_processed += 1,
                    Err(e) if e.is_retryable() => {
                        report.events_failed += 1;
                        oldest_failure = Some(
                            oldest_failure.map_or(event.created(), |o| o.min(event.created())),
                        );
                    }
                    Err(_) => {
                        // Failing again next run would not help; holding the
                        // cursor would pin it for up to 30 days.
                        report.events_failed += 1;
                        report.events_failed_permanently.push(event.id().to_owned());
                    }
                }
            }
            match (page.has_more, page.data.last()) {
                (true, Some(last)) => query.starting_after = Some(last.id().to_owned()),
                _ => break,
            }
        }
        if !self.config.dry_run {
            let next = oldest_failure.unwrap_or_else(|| started.unix_timestamp());
            self.processor
                .store()
                .save_cursor(EVENTS_CURSOR, &next.to_string())
                .await?;
            report.cursor = Some(next);
        }
        Ok(())
    }

    /// Diffs every subscription catch-up touched with its record now. A
    /// record that cannot be reloaded is skipped (and the first such error
    /// returned after the others were diffed).
    async fn catch_up_changes(
        &self,
        before: BTreeMap<String, Option<SubscriptionRecord>>,
        report: &mut ReconcileReport,
    ) -> Result<(), ReconcileError> {
        let mut first_error = None;
        for (id, old) in before {
            match self.store().load(&id).await {
                Ok(Some(new)) => {
                    if let Some(change) = self.diff(old.as_ref(), &new, ChangeSource::CatchUp) {
                        report.changes.push(change);
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        first_error.map_or(Ok(()), |e| Err(e.into()))
    }

    /// Compares subscriptions with Stripe and repairs them. Each object is
    /// planned at the time it was fetched. Connect records (`account` set)
    /// are not reconciled (see [`SweepScope`]).
    ///
    /// # Errors
    ///
    /// [`ReconcileError`] when the API or the store fails; changes saved
    /// before the error are notified first.
    pub async fn sweep(&self, scope: SweepScope) -> Result<ReconcileReport, ReconcileError> {
        let (requests0, limited0) = self.counters();
        let mut report = ReconcileReport {
            dry_run: self.config.dry_run,
            ..ReconcileReport::default()
        };
        let result = match scope {
            SweepScope::All => self.sweep_all(&mut report).await,
            SweepScope::StaleFor(threshold) => self.sweep_stale(threshold, &mut report).await,
        };
        self.notify(&report.changes).await;
        result?;
        self.count_requests(&mut report, requests0, limited0);
        Ok(report)
    }

    async fn sweep_all(&self, report: &mut ReconcileReport) -> Result<(), ReconcileError> {
        let started = self.now();
        let mut seen = HashSet::new();
        let mut query = SubscriptionListQuery {
            customer: None,
            starting_after: None,
            limit: 100,
        };
        loop {
            let page = self.client.list_subscriptions(&query).await?;
            let fetched_at = self.now();
            for view in &page.data {
                if let Some(id) = &view.id {
                    seen.insert(id.clone());
                }
                self.apply_plan(view, fetched_at, ChangeSource::Sweep, report)
                    .await?;
            }
            match (page.has_more, page.data.last().and_then(|s| s.id.clone())) {
                (true, Some(last)) => query.starting_after = Some(last),
                _ => break,
            }
        }
        self.flag_unknown_to_stripe(&seen, started, self.now(), report)
            .await
    }

    async fn sweep_stale(
        &self,
        threshold: Duration,
        report: &mut ReconcileReport,
    ) -> Result<(), ReconcileError> {
        let stale = SubscriptionQuery {
            verified_before: Some(self.now() - threshold),
            limit: STORE_PAGE,
            ..SubscriptionQuery::default()
        };
        let flagged = SubscriptionQuery {
            needs_reconcile: true,
            limit: STORE_PAGE,
            ..SubscriptionQuery::default()
        };
        // Stale records first, then flagged ones the first pass did not
        // cover; each read a page at a time.
        for (pass, query) in [&stale, &flagged].into_iter().enumerate() {
            let mut query = query.clone();
            loop {
                let page = self.store().list_subscriptions(&query).await?;
                let Some(last) = page.last() else { break };
                query.after = Some(last.id.clone());
                let ids: Vec<String> = page
                    .into_iter()
                    // `stale` has no paging bound, so this is its filter.
                    .filter(|r| pass == 0 || !stale.matches(r))
                    .filter(worth_retrieving)
                    .map(|r| r.id)
                    .collect();
                self.retrieve_and_apply(&ids, report).await?;
            }
        }
        Ok(())
    }

    /// Retrieves `ids` (as many at once as the budget lets in flight) and
    /// applies each object at the time it arrived.
    async fn retrieve_and_apply(
        &self,
        ids: &[String],
        report: &mut ReconcileReport,
    ) -> Result<(), ReconcileError> {
        let max_in_flight = self
            .budget
            .as_ref()
            .map_or(4, |b| b.config().max_in_flight.max(1));
        for chunk in ids.chunks(max_in_flight) {
            let fetches: Vec<Fetch> = chunk
                .iter()
                .map(|id| {
                    let client = self.client.clone();
                    let clock = self.processor.clock().clone();
                    let id = id.clone();
                    Box::pin(async move {
                        let result = client.retrieve_subscription(&id).await;
                        (id, clock.now(), result)
                    }) as Fetch
                })
                .collect();
            for (id, fetched_at, result) in join_all(fetches).await {
                match result {
                    Ok(view) => {
                        self.apply_plan(&view, fetched_at, ChangeSource::Sweep, report)
                            .await?;
                    }
                    Err(e) if e.kind() == ClientErrorKind::NotFound => {
                        self.flag_missing(&id, fetched_at, report).await?;
                    }
                    Err(e) => return Err(e.into()),
                }
            }
        }
        Ok(())
    }

    /// Refreshes one customer's subscriptions from Stripe: call it when a
    /// customer logs in or presses "restore purchase". Bounded to that
    /// customer (one list request, plus retries). Connect records are left
    /// alone.
    ///
    /// # Errors
    ///
    /// [`ReconcileError`] when the API or the store fails; changes saved
    /// before the error are notified first.
    pub async fn refresh_customer(
        &self,
        customer: &str,
    ) -> Result<ReconcileReport, ReconcileError> {
        let (requests0, limited0) = self.counters();
        let mut report = ReconcileReport {
            dry_run: self.config.dry_run,
            ..ReconcileReport::default()
        };
        let result = self.refresh_inner(customer, &mut report).await;
        self.notify(&report.changes).await;
        result?;
        self.count_requests(&mut report, requests0, limited0);
        Ok(report)
    }

    async fn refresh_inner(
        &self,
        customer: &str,
        report: &mut ReconcileReport,
    ) -> Result<(), ReconcileError> {
        let views = self.client.list_customer_subscriptions(customer).await?;
        let fetched_at = self.now();
        let mut seen = HashSet::new();
        for view in &views {
            if let Some(id) = &view.id {
                seen.insert(id.clone());
            }
            self.apply_plan(view, fetched_at, ChangeSource::Refresh, report)
                .await?;
        }
        for r in self.store().find_by_customer(customer).await? {
            if !seen.contains(&r.id) && r.account.is_none() {
                self.flag_missing(&r.id, fetched_at, report).await?;
            }
        }
        Ok(())
    }

    fn count_requests(&self, report: &mut ReconcileReport, requests0: u64, limited0: u64) {
        let (requests1, limited1) = self.counters();
        report.requests = requests1 - requests0;
        report.rate_limited = limited1 - limited0;
    }

    /// Re-runs one stored event (failed or dead) through the processor, from
    /// its stored payload or, failing that, from Stripe.
    ///
    /// # Errors
    ///
    /// [`ReconcileError`] when the event cannot be found or processing fails.
    pub async fn replay(
        &self,
        event_id: &str,
        account: Option<&str>,
    ) -> Result<Outcome, ReconcileError> {
        let key = EventKey::new(event_id, account);
        let entry = self.processor.store().get(&key).await?;
        let event = match entry.as_ref().and_then(|e| e.payload.clone()) {
            Some(payload) => Event::from_bytes(payload.as_bytes())
                .map_err(|_| ReconcileError::NotReplayable(event_id.to_owned()))?,
            None => self
                .client
                .retrieve_event(event_id)
                .await
                .map_err(|_| ReconcileError::NotReplayable(event_id.to_owned()))?,
        };
        if self.config.dry_run {
            return Ok(Outcome::Duplicate {
                event_id: event_id.to_owned(),
                state: entry.map_or(LedgerState::Failed, |e| e.state),
            });
        }
        self.processor.store().requeue(&key).await?;
        let sub = subscription::subscription_id_of(&event).ok().flatten();
        let before = match &sub {
            Some(id) => self.store().load(id).await?,
            None => None,
        };
        let outcome = self.processor.process_event(&event).await?;
        if let Some(id) = sub
            && let Some(after) = self.store().load(&id).await?
            && let Some(change) = self.diff(before.as_ref(), &after, ChangeSource::Replay)
        {
            self.notify(std::slice::from_ref(&change)).await;
        }
        Ok(outcome)
    }

    /// Replays every dead-lettered event; returns each id with its outcome.
    ///
    /// # Errors
    ///
    /// [`ReconcileError`] when listing the ledger fails; per-event failures
    /// are returned in the list.
    pub async fn replay_dead_letters(
        &self,
    ) -> Result<Vec<(String, Result<Outcome, ReconcileError>)>, ReconcileError> {
        let mut out = Vec::new();
        let mut after = None;
        loop {
            let page = self
                .processor
                .store()
                .list(&LedgerQuery {
                    states: vec![LedgerState::Dead],
                    after: after.clone(),
                    limit: 100,
                })
                .await?;
            let Some(last) = page.last() else { break };
            after = Some(last.key.event_id.clone());
            for entry in page {
                let result = self
                    .replay(&entry.key.event_id, entry.key.account.as_deref())
                    .await;
                out.push((entry.key.event_id, result));
            }
        }
        Ok(out)
    }

    async fn apply_plan(
        &self,
        view: &SubscriptionView,
        now: OffsetDateTime,
        source: ChangeSource,
        report: &mut ReconcileReport,
    ) -> Result<(), ReconcileError> {
        let Some(id) = view.id.clone() else {
            return Ok(());
        };
        report.subscriptions_checked += 1;
        for _ in 0..8 {
            let local = self.store().load(&id).await?;
            let p = plan(
                local.as_ref(),
                view,
                now,
                &self.policy,
                self.config.reverify_after,
            );
            let change = p.change.map(|kind| Change {
                kind,
                source,
                subscription_id: id.clone(),
                customer: view
                    .customer
                    .clone()
                    .or(local.as_ref().and_then(|l| l.state.customer.clone())),
                before_status: p.before.as_ref().map(|b| b.0.clone()),
                after_status: p.after.0.clone(),
                before_access: p.before.as_ref().map(|b| b.1),
                after_access: p.after.1,
                detail: p.detail.clone(),
            });
            let Some(record) = p.record else {
                return Ok(());
            };
            if self.config.dry_run {
                report.changes.extend(change);
                return Ok(());
            }
            match self.store().save(&record).await {
                Ok(_) => {
                    report.writes += 1;
                    report.changes.extend(change);
                    return Ok(());
                }
                Err(e) if e.kind() == StoreErrorKind::Conflict => {}
                Err(e) => return Err(e.into()),
            }
        }
        Err(StoreError::new(
            StoreErrorKind::Conflict,
            "subscription kept changing during the sweep",
        )
        .into())
    }

    /// Flags local records the listing (started at `listed_from`) did not
    /// return. Records whose snapshot is newer than the listing's start were
    /// created (by a webhook) while it ran, so their absence proves nothing.
    async fn flag_unknown_to_stripe(
        &self,
        seen: &HashSet<String>,
        listed_from: OffsetDateTime,
        now: OffsetDateTime,
        report: &mut ReconcileReport,
    ) -> Result<(), ReconcileError> {
        let mut after = None;
        loop {
            let page = self
                .store()
                .list_subscriptions(&SubscriptionQuery {
                    after: after.clone(),
                    limit: STORE_PAGE,
                    ..SubscriptionQuery::default()
                })
                .await?;
            let Some(last) = page.last() else { break };
            after = Some(last.id.clone());
            for r in page {
                // Connect records: the platform key does not list them.
                let listed_before_it_existed = r
                    .watermark
                    .as_ref()
                    .is_none_or(|w| w.created >= listed_from.unix_timestamp());
                if !seen.contains(&r.id)
                    && !r.needs_review
                    && r.account.is_none()
                    && !listed_before_it_existed
                {
                    self.flag_missing(&r.id, now, report).await?;
                }
            }
        }
        Ok(())
    }

    /// A local record Stripe does not know (another account or mode, or
    /// data from elsewhere): flag it for review, once.
    async fn flag_missing(
        &self,
        id: &str,
        now: OffsetDateTime,
        report: &mut ReconcileReport,
    ) -> Result<(), ReconcileError> {
        let Some(mut record) = self.store().load(id).await? else {
            return Ok(());
        };
        if record.needs_review {
            return Ok(());
        }
        let access = self.policy.decide(&record, now).access;
        let change = Change {
            kind: ChangeKind::NeedsReview,
            source: ChangeSource::Sweep,
            subscription_id: id.to_owned(),
            customer: record.state.customer.clone(),
            before_status: Some(record.state.status.clone()),
            after_status: record.state.status.clone(),
            before_access: Some(access),
            after_access: access,
            detail: Some("Stripe does not know this subscription".to_owned()),
        };
        if !self.config.dry_run {
            record.needs_review = true;
            record.note(
                now.unix_timestamp(),
                None,
                AnomalyKind::NotFoundAtStripe,
                "not found at Stripe".to_owned(),
            );
            match self.store().save(&record).await {
                Ok(_) => report.writes += 1,
                Err(e) if e.kind() == StoreErrorKind::Conflict => return Ok(()),
                Err(e) => return Err(e.into()),
            }
        }
        report.changes.push(change);
        Ok(())
    }

    fn diff(
        &self,
        before: Option<&SubscriptionRecord>,
        after: &SubscriptionRecord,
        source: ChangeSource,
    ) -> Option<Change> {
        let now = self.now();
        let before_access = before.map(|b| self.policy.decide(b, now).access);
        let after_access = self.policy.decide(after, now).access;
        let before_status = before.map(|b| b.state.status.clone());
        let kind = match (before_access, &before_status) {
            _ if after.needs_review && !before.is_some_and(|b| b.needs_review) => {
                ChangeKind::NeedsReview
            }
            (None, _) => ChangeKind::Discovered,
            (Some(b), Some(s)) => match access_change(b, after_access) {
                Some(kind) => kind,
                None if *s != after.state.status => ChangeKind::StatusChanged,
                None => return None,
            },
            (Some(_), None) => return None,
        };
        Some(Change {
            kind,
            source,
            subscription_id: after.id.clone(),
            customer: after.state.customer.clone(),
            before_status,
            after_status: after.state.status.clone(),
            before_access,
            after_access,
            detail: None,
        })
    }

    async fn notify(&self, changes: &[Change]) {
        if self.config.dry_run {
            return;
        }
        for c in changes {
            crate::metrics::reconcile_change(c.kind, c.source);
        }
        if let Some(n) = &self.notifier {
            for c in changes {
                n.notify(c).await;
            }
        }
    }
}

/// Whether [`SweepScope::StaleFor`] retrieves `record`.
fn worth_retrieving(record: &SubscriptionRecord) -> bool {
    let settled = record.state.status.is_terminal()
        && record.last_verified_with_stripe.is_some()
        && !record.needs_reconcile;
    record.account.is_none() && !record.needs_review && !settled
}

/// A retrieve's id, when its answer arrived, and the answer.
type Fetched = (
    String,
    OffsetDateTime,
    Result<SubscriptionView, ClientError>,
);

/// A retrieve in flight.
type Fetch = Pin<Box<dyn Future<Output = Fetched> + Send>>;
