//! The reconciler's entitlement repair: refetching stored entitlement lists
//! that are unverified or old (sweeps) and a customer's (refresh).

use std::collections::BTreeMap;

use time::{Duration, OffsetDateTime};

use super::{ReconcileError, ReconcileReport};
use crate::store::{StoreError, StoreErrorKind};
use crate::subscription::entitlements_from_fetch;

use super::driver::{Reconciler, settle_account};

impl Reconciler {
    /// Refetches the stored entitlements of the customers of reconciled
    /// accounts that are unverified or not verified for `older_than`.
    pub(super) async fn sweep_entitlements(
        &self,
        older_than: Duration,
        report: &mut ReconcileReport,
    ) -> Result<(), ReconcileError> {
        let cutoff = (self.now() - older_than).unix_timestamp();
        let mut customers = BTreeMap::new();
        let mut after = None;
        loop {
            let page = self.next_records(&mut after).await?;
            if page.is_empty() {
                break;
            }
            for r in page {
                if let Some(c) = r.state.customer
                    && self.reconciles(r.account.as_deref())
                {
                    customers.entry(c).or_insert(r.account);
                }
            }
        }
        for (customer, account) in customers {
            let Some(stored) = self.store().load_entitlements(&customer).await? else {
                continue;
            };
            let known_at = stored
                .last_verified_with_stripe
                .map_or(stored.watermark.0, OffsetDateTime::unix_timestamp)
                .max(stored.watermark.0);
            if stored.verified && known_at >= cutoff {
                continue;
            }
            let done = self
                .refresh_entitlements(account.as_deref(), &customer, report)
                .await;
            settle_account(account, done, report)?;
        }
        Ok(())
    }

    /// Lists one customer's active entitlements and saves them (unless in a
    /// dry run), over concurrent writers.
    pub(super) async fn refresh_entitlements(
        &self,
        account: Option<&str>,
        customer: &str,
        report: &mut ReconcileReport,
    ) -> Result<(), ReconcileError> {
        let answer = self
            .client
            .list_customer_entitlements(account, customer)
            .await?;
        let fetched_at = self.fetch_time(&answer);
        report.entitlements_refreshed += 1;
        if self.config.dry_run {
            return Ok(());
        }
        for _ in 0..8 {
            let stored = self.store().load_entitlements(customer).await?;
            // No entitlements stored and none active: nothing to record (a
            // stored empty list would read as "entitled to nothing" where
            // the policy otherwise falls back to the subscriptions).
            if stored.is_none() && answer.data.is_empty() {
                return Ok(());
            }
            let next = entitlements_from_fetch(
                stored.as_ref(),
                customer,
                account,
                answer.data.clone(),
                fetched_at,
            );
            if stored.as_ref().is_some_and(|s| {
                s.verified
                    && s.lookup_keys == next.lookup_keys
                    && s.last_verified_with_stripe
                        .is_some_and(|v| v + self.config.reverify_after > fetched_at.local)
            }) {
                return Ok(());
            }
            match self.store().save_entitlements(&next).await {
                Ok(_) => {
                    report.writes += 1;
                    return Ok(());
                }
                Err(e) if e.kind() == StoreErrorKind::Conflict => {}
                Err(e) => return Err(e.into()),
            }
        }
        Err(StoreError::new(
            StoreErrorKind::Conflict,
            "entitlements kept changing during the refresh",
        )
        .into())
    }
}
