//! The [`Reconciler`]: the async driver that lists, retrieves, plans,
//! saves and notifies (the rules are in the [module documentation](super)).

use std::collections::{BTreeMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use time::OffsetDateTime;

use super::clocks::ClockMarks;
use super::{
    AccountFailure, Change, ChangeKind, ChangeSource, EVENT_RETENTION, Notifier, ReconcileConfig,
    ReconcileError, ReconcileReport, RecoveryRequest, STORE_PAGE, SweepScope, access_change,
    events_cursor, plan,
};
use crate::access::AccessPolicy;
use crate::client::{
    BudgetConfig, ClientError, ClientErrorKind, EventListQuery, RequestBudget, Response,
    StripeClient, SubscriptionListQuery,
};
use crate::event::SubscriptionView;
use crate::ledger::EventKey;
use crate::processor::{Outcome, WebhookProcessor};
use crate::rt::join::join_all;
use crate::store::{StoreError, StoreErrorKind, SubscriptionQuery};
use crate::subscription::FetchTime;
use crate::subscription::{self, AnomalyKind, SubscriptionRecord};

/// The reconciliation driver. Build with [`Reconciler::new`].
pub struct Reconciler {
    pub(super) processor: WebhookProcessor,
    pub(super) client: Arc<dyn StripeClient>,
    pub(super) notifier: Option<Arc<dyn Notifier>>,
    pub(super) policy: AccessPolicy,
    pub(super) config: ReconcileConfig,
    pub(super) budget: Option<Arc<RequestBudget>>,
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

    pub(super) fn store(&self) -> &Arc<dyn crate::store::Storage> {
        self.processor.store()
    }

    pub(super) fn now(&self) -> OffsetDateTime {
        self.processor.clock().now()
    }

    pub(super) fn counters(&self) -> (u64, u64) {
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

    /// Lists `/v1/events` from the stored cursor of each reconciled account
    /// and processes every event through the processor (same ids, same
    /// ledger), going back over the window of a pending
    /// [`RecoveryRequest`] first.
    ///
    /// Events whose failure is retryable hold the cursor back; events that
    /// fail permanently are listed in
    /// [`ReconcileReport::events_failed_permanently`] and let it move.
    ///
    /// **Test clocks.** The cursor never moves past the time the run
    /// started (the host's clock). Events of objects on a Stripe test clock
    /// carry the clock's simulated time as `created`, possibly far ahead;
    /// such an event (dated after the run's start and naming its clock in
    /// its object's `test_clock`) is tracked by a mark per clock (the cursor
    /// `"{events cursor}.test_clock.{clock id}"`: the latest such `created`
    /// read, held back before a retryable failure of that clock). A later
    /// run skips the clock's events older than its mark minus
    /// [`ReconcileConfig::overlap`] (counted as duplicates), so an event read
    /// before is not processed again even after the ledger pruned it; the
    /// events within the overlap are read again, as the overlap always does.
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
        let mut result = Ok(());
        for account in self.accounts() {
            let done = self
                .catch_up_account(account.as_deref(), &mut report, &mut before)
                .await;
            if let Err(e) = settle_account(account, done, &mut report) {
                result = Err(e);
                break;
            }
        }
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

    /// The accounts a run covers: the platform (`None`) when configured,
    /// then each connected account.
    pub(super) fn accounts(&self) -> Vec<Option<String>> {
        let platform = self.config.platform.then_some(None);
        platform
            .into_iter()
            .chain(self.config.connected_accounts.iter().cloned().map(Some))
            .collect()
    }

    /// Whether records of `account` are reconciled.
    pub(super) fn reconciles(&self, account: Option<&str>) -> bool {
        match account {
            None => self.config.platform,
            Some(a) => self.config.connected_accounts.iter().any(|c| c == a),
        }
    }

    /// Catch-up of one account, over a recovery window too when one is
    /// pending (then also re-verifying the account's records not verified
    /// since the window's start, since the event that failed to generate
    /// is never listed).
    pub(super) async fn catch_up_account(
        &self,
        account: Option<&str>,
        report: &mut ReconcileReport,
        before: &mut BTreeMap<String, Option<SubscriptionRecord>>,
    ) -> Result<(), ReconcileError> {
        let pending = RecoveryRequest::pending(self.store().as_ref(), account).await?;
        let window_start =
            pending.map(|at| at - self.config.generation_failure_window.whole_seconds());
        self.catch_up_events(account, window_start, report, before)
            .await?;
        if let (Some(alert_at), Some(from)) = (pending, window_start)
            && !self.config.dry_run
        {
            let from = OffsetDateTime::from_unix_timestamp(from).unwrap_or(self.now());
            self.sweep_stale(from, |a| a == account, report).await?;
            RecoveryRequest::settle(self.store().as_ref(), account, alert_at).await?;
            report.recoveries += 1;
        }
        Ok(())
    }

    /// Lists and processes one account's events (from `window_start` at the
    /// latest); records each touched subscription's record as it was before
    /// its first event in `before`.
    pub(super) async fn catch_up_events(
        &self,
        account: Option<&str>,
        window_start: Option<i64>,
        report: &mut ReconcileReport,
        before: &mut BTreeMap<String, Option<SubscriptionRecord>>,
    ) -> Result<(), ReconcileError> {
        let started = self.now();
        let floor = (started - EVENT_RETENTION).unix_timestamp();
        let cursor_name = events_cursor(account);
        let cursor = match self.processor.store().load_cursor(&cursor_name).await? {
            Some(text) => text.parse::<i64>().ok(),
            None => None,
        };
        let from = cursor
            .map_or_else(
                || (started - self.config.lookback.min(EVENT_RETENTION)).unix_timestamp(),
                |c| c - self.config.overlap.whole_seconds(),
            )
            .min(window_start.unwrap_or(i64::MAX))
            .max(floor);
        let mut oldest_failure: Option<i64> = None;
        let mut clocks = ClockMarks::default();
        let overlap = self.config.overlap.whole_seconds();
        let mut query = EventListQuery {
            created_gte: Some(from),
            starting_after: None,
            types: self.config.event_types.clone(),
            delivery_success: self.config.only_failed_deliveries.then_some(false),
            limit: 100,
        };
        loop {
            let mut page = self.client.list_events(account, &query).await?.data;
            if let Some(account) = account {
                for event in &mut page.data {
                    event.assume_account(account);
                }
            }
            for event in &page.data {
                report.events_seen += 1;
                // An event dated ahead of the run (a test clock's simulated
                // time) already read by an earlier run: skipped, even if the
                // ledger has forgotten it.
                let clock = (event.created() > started.unix_timestamp())
                    .then(|| event.test_clock())
                    .flatten();
                if let Some(clock) = &clock
                    && clocks
                        .read_before(self.store().as_ref(), &cursor_name, clock)
                        .await?
                        .is_some_and(|mark| event.created() < mark - overlap)
                {
                    report.events_duplicate += 1;
                    continue;
                }
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
                let result = self.processor.process_event(event).await;
                let retry = result
                    .as_ref()
                    .is_err_and(crate::processor::Error::is_retryable);
                if let Some(clock) = clock {
                    clocks.note(clock, event.created(), retry);
                }
                match result {
                    Ok(Outcome::Duplicate { .. }) => report.events_duplicate += 1,
                    Ok(_) => report.events_processed += 1,
                    Err(_) if retry => {
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
            // Never past the run's start: an event of a test clock that
            // failed is held back by its clock's mark, not by this cursor.
            let next = oldest_failure.map_or(started.unix_timestamp(), |f| {
                f.min(started.unix_timestamp())
            });
            clocks.save(self.store().as_ref(), &cursor_name).await?;
            self.processor
                .store()
                .save_cursor(&cursor_name, &next.to_string())
                .await?;
            match account {
                None => report.cursor = Some(next),
                Some(a) => {
                    report.account_cursors.insert(a.to_owned(), next);
                }
            }
        }
        Ok(())
    }

    /// Diffs every subscription catch-up touched with its record now. A
    /// record that cannot be reloaded is skipped (and the first such error
    /// returned after the others were diffed).
    pub(super) async fn catch_up_changes(
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

    /// Compares subscriptions with Stripe and repairs them, in each
    /// reconciled account (see [`SweepScope`]). Each object is planned at
    /// the time it was fetched. Then refetches customers' stored
    /// entitlements that are unverified, or older than the scope's
    /// threshold (30 days for [`SweepScope::All`], beyond which catch-up
    /// cannot have seen their summaries).
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
            SweepScope::StaleFor(threshold) => {
                self.sweep_stale(self.now() - threshold, |a| self.reconciles(a), &mut report)
                    .await
            }
        };
        let entitlements_older_than = match scope {
            SweepScope::All => EVENT_RETENTION,
            SweepScope::StaleFor(threshold) => threshold,
        };
        let result = match result {
            Ok(()) => {
                self.sweep_entitlements(entitlements_older_than, &mut report)
                    .await
            }
            e => e,
        };
        self.notify(&report.changes).await;
        result?;
        self.count_requests(&mut report, requests0, limited0);
        Ok(report)
    }

    pub(super) async fn sweep_all(
        &self,
        report: &mut ReconcileReport,
    ) -> Result<(), ReconcileError> {
        let started = self.now();
        let mut seen = HashSet::new();
        let mut swept = HashSet::new();
        for account in self.accounts() {
            let done = self
                .sweep_all_in(account.as_deref(), &mut seen, report)
                .await;
            if done.is_ok() {
                swept.insert(account.clone());
            }
            settle_account(account, done, report)?;
        }
        self.flag_unknown_to_stripe(&seen, &swept, started, self.now(), report)
            .await
    }

    /// Lists every subscription of one account and applies each; the ids
    /// seen go to `seen`.
    pub(super) async fn sweep_all_in(
        &self,
        account: Option<&str>,
        seen: &mut HashSet<String>,
        report: &mut ReconcileReport,
    ) -> Result<(), ReconcileError> {
        let mut query = SubscriptionListQuery {
            customer: None,
            starting_after: None,
            limit: 100,
        };
        loop {
            let answer = self.client.list_subscriptions(account, &query).await?;
            let fetched_at = self.fetch_time(&answer);
            let page = answer.data;
            for view in &page.data {
                if let Some(id) = &view.id {
                    seen.insert(id.clone());
                }
                self.apply_plan(view, account, fetched_at, ChangeSource::Sweep, report)
                    .await?;
            }
            match (page.has_more, page.data.last().and_then(|s| s.id.clone())) {
                (true, Some(last)) => query.starting_after = Some(last),
                _ => return Ok(()),
            }
        }
    }

    /// When an answer was read: now by the host's clock, and the answer's
    /// `Date` (Stripe's clock).
    pub(super) fn fetch_time<T>(&self, answer: &Response<T>) -> FetchTime {
        FetchTime {
            local: self.now(),
            stripe: answer.date,
        }
    }

    /// Retrieves the records of the accounts `include` accepts that were
    /// never verified or verified before `verified_before`, and the flagged
    /// ones (see [`SweepScope::StaleFor`]), each in its own account.
    pub(super) async fn sweep_stale(
        &self,
        verified_before: OffsetDateTime,
        include: impl Fn(Option<&str>) -> bool,
        report: &mut ReconcileReport,
    ) -> Result<(), ReconcileError> {
        let stale = SubscriptionQuery {
            verified_before: Some(verified_before),
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
                let ids: Vec<(String, Option<String>)> = page
                    .into_iter()
                    // `stale` has no paging bound, so this is its filter.
                    .filter(|r| pass == 0 || !stale.matches(r))
                    .filter(|r| include(r.account.as_deref()) && worth_retrieving(r))
                    .map(|r| (r.id, r.account))
                    .collect();
                self.retrieve_and_apply(&ids, report).await?;
            }
        }
        Ok(())
    }

    /// Retrieves `ids` (as many at once as the budget lets in flight) and
    /// applies each object at the time it arrived.
    pub(super) async fn retrieve_and_apply(
        &self,
        ids: &[(String, Option<String>)],
        report: &mut ReconcileReport,
    ) -> Result<(), ReconcileError> {
        let max_in_flight = self
            .budget
            .as_ref()
            .map_or(4, |b| b.config().max_in_flight.max(1));
        for chunk in ids.chunks(max_in_flight) {
            let fetches: Vec<Fetch> = chunk
                .iter()
                .map(|(id, account)| {
                    let client = self.client.clone();
                    let clock = self.processor.clock().clone();
                    let (id, account) = (id.clone(), account.clone());
                    Box::pin(async move {
                        let result = client.retrieve_subscription(account.as_deref(), &id).await;
                        (id, account, clock.now(), result)
                    }) as Fetch
                })
                .collect();
            for (id, account, local, result) in join_all(fetches).await {
                match result {
                    Ok(answer) => {
                        let fetched_at = FetchTime {
                            local,
                            stripe: answer.date,
                        };
                        let account = account.as_deref();
                        self.apply_plan(
                            &answer.data,
                            account,
                            fetched_at,
                            ChangeSource::Sweep,
                            report,
                        )
                        .await?;
                    }
                    Err(e) if e.kind() == ClientErrorKind::NotFound => {
                        self.flag_missing(&id, local, report).await?;
                    }
                    Err(e) => return Err(e.into()),
                }
            }
        }
        Ok(())
    }

    /// Refreshes one of the platform's customers from Stripe: call it when
    /// a customer logs in or presses "restore purchase". Bounded to that
    /// customer: one list request for the subscriptions and, unless
    /// [`ReconcileConfig::entitlements`] is off, one for the entitlements
    /// (plus retries and further pages).
    ///
    /// # Errors
    ///
    /// [`ReconcileError`] when the API or the store fails; changes saved
    /// before the error are notified first.
    pub async fn refresh_customer(
        &self,
        customer: &str,
    ) -> Result<ReconcileReport, ReconcileError> {
        self.refresh_customer_in(None, customer).await
    }

    /// [`Reconciler::refresh_customer`] for a customer of a connected
    /// account (`Some("acct_…")`; `None` is the platform).
    ///
    /// # Errors
    ///
    /// As [`Reconciler::refresh_customer`].
    pub async fn refresh_customer_in(
        &self,
        account: Option<&str>,
        customer: &str,
    ) -> Result<ReconcileReport, ReconcileError> {
        let (requests0, limited0) = self.counters();
        let mut report = ReconcileReport {
            dry_run: self.config.dry_run,
            ..ReconcileReport::default()
        };
        let result = self.refresh_inner(account, customer, &mut report).await;
        self.notify(&report.changes).await;
        result?;
        self.count_requests(&mut report, requests0, limited0);
        Ok(report)
    }

    pub(super) async fn refresh_inner(
        &self,
        account: Option<&str>,
        customer: &str,
        report: &mut ReconcileReport,
    ) -> Result<(), ReconcileError> {
        let answer = self
            .client
            .list_customer_subscriptions(account, customer)
            .await?;
        let fetched_at = self.fetch_time(&answer);
        let mut seen = HashSet::new();
        for view in &answer.data {
            if let Some(id) = &view.id {
                seen.insert(id.clone());
            }
            self.apply_plan(view, account, fetched_at, ChangeSource::Refresh, report)
                .await?;
        }
        for r in self.store().find_by_customer(customer).await? {
            if !seen.contains(&r.id) && r.account.as_deref() == account {
                self.flag_missing(&r.id, fetched_at.local, report).await?;
            }
        }
        if self.config.entitlements {
            self.refresh_entitlements(account, customer, report).await?;
        }
        Ok(())
    }

    /// The next page of every local record, in id order, after `after`
    /// (moved to the page's last id); empty at the end.
    pub(super) async fn next_records(
        &self,
        after: &mut Option<String>,
    ) -> Result<Vec<SubscriptionRecord>, StoreError> {
        let page = self
            .store()
            .list_subscriptions(&SubscriptionQuery {
                after: after.clone(),
                limit: STORE_PAGE,
                ..SubscriptionQuery::default()
            })
            .await?;
        if let Some(last) = page.last() {
            *after = Some(last.id.clone());
        }
        Ok(page)
    }

    pub(super) fn count_requests(
        &self,
        report: &mut ReconcileReport,
        requests0: u64,
        limited0: u64,
    ) {
        let (requests1, limited1) = self.counters();
        report.requests = requests1 - requests0;
        report.rate_limited = limited1 - limited0;
    }

    pub(super) async fn apply_plan(
        &self,
        view: &SubscriptionView,
        account: Option<&str>,
        fetched_at: FetchTime,
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
                account,
                fetched_at,
                &self.policy,
                self.config.reverify_after,
            );
            let change = p.change.map(|kind| Change {
                kind,
                source,
                account: account.map(str::to_owned),
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
    pub(super) async fn flag_unknown_to_stripe(
        &self,
        seen: &HashSet<String>,
        swept: &HashSet<Option<String>>,
        listed_from: OffsetDateTime,
        now: OffsetDateTime,
        report: &mut ReconcileReport,
    ) -> Result<(), ReconcileError> {
        let mut after = None;
        loop {
            let page = self.next_records(&mut after).await?;
            if page.is_empty() {
                break;
            }
            for r in page {
                // Only records of the accounts whose listing completed.
                let listed_before_it_existed = r
                    .watermark
                    .as_ref()
                    .is_none_or(|w| w.created >= listed_from.unix_timestamp());
                if !seen.contains(&r.id)
                    && !r.needs_review
                    && swept.contains(&r.account)
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
    pub(super) async fn flag_missing(
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
            account: record.account.clone(),
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

    pub(super) fn diff(
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
            account: after.account.clone(),
            subscription_id: after.id.clone(),
            customer: after.state.customer.clone(),
            before_status,
            after_status: after.state.status.clone(),
            before_access,
            after_access,
            detail: None,
        })
    }

    pub(super) async fn notify(&self, changes: &[Change]) {
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

/// Whether [`SweepScope::StaleFor`] retrieves `record` (of an account it
/// reconciles).
fn worth_retrieving(record: &SubscriptionRecord) -> bool {
    let settled = record.state.status.is_terminal()
        && record.last_verified_with_stripe.is_some()
        && !record.needs_reconcile;
    !record.needs_review && !settled
}

/// A retrieve's id and account, when its answer arrived (host clock), and
/// the answer.
type Fetched = (
    String,
    Option<String>,
    OffsetDateTime,
    Result<Response<SubscriptionView>, ClientError>,
);

/// A retrieve in flight.
type Fetch = Pin<Box<dyn Future<Output = Fetched> + Send>>;

/// One account's part of a run is over: a connected account's failure
/// is reported and the run goes on; the platform's is returned.
pub(super) fn settle_account(
    account: Option<String>,
    done: Result<(), ReconcileError>,
    report: &mut ReconcileReport,
) -> Result<(), ReconcileError> {
    match (done, account) {
        (Ok(()), _) => Ok(()),
        (Err(e), Some(account)) => {
            report.account_failures.push(AccountFailure {
                account,
                error: e.to_string(),
            });
            Ok(())
        }
        (Err(e), None) => Err(e),
    }
}
