//! Step 5, the effect of an event on what the store holds: the
//! subscription and entitlement state machines decide; this module only
//! loads, asks Stripe and saves (again from a fresh load when another writer
//! saved first).

use time::OffsetDateTime;

use super::{MAX_SAVE_RACES, WebhookProcessor};
use crate::event::Event;
use crate::store::{StoreError, StoreErrorKind};
use crate::subscription::{
    self, Effect, EntitlementFetch, EntitlementFetchOutcome, EntitlementStep, FetchOutcome,
    FetchTarget, Step, StepError, Subject, SubscriptionRecord,
};

impl WebhookProcessor {
    /// Step 5: the subscription effect. The decisions are the state
    /// machine's ([`subscription::step`] and [`subscription::resume`]); this
    /// only loads, asks Stripe and saves (again from a fresh load when
    /// another writer saved first).
    pub(super) async fn subscription_effect(
        &self,
        event: &Event,
        now: OffsetDateTime,
        last_attempt: bool,
    ) -> Result<(Effect, Option<SubscriptionRecord>), EffectError> {
        let store = &self.inner.store;
        // Stripe failed to generate events: the reconciler's next catch-up
        // goes back over the window.
        if let Some(request) = crate::reconcile::RecoveryRequest::from_event(event) {
            request.record(store.as_ref()).await?;
            return Ok((Effect::None, None));
        }
        let id = match subscription::subject(event).map_err(StepError::Object)? {
            Subject::None => return Ok((Effect::None, None)),
            Subject::Entitlements(customer) => {
                return self.entitlements_effect(event, customer).await;
            }
            Subject::Subscription(id) => id,
        };
        for _ in 0..MAX_SAVE_RACES {
            let current = match &id {
                Some(id) => store.load(id).await?,
                None => None,
            };
            let mut step = subscription::step(current.as_ref(), event, now);
            while let Step::Fetch(fetch) = step {
                let outcome = self
                    .fetch(fetch.target(), event.account(), last_attempt)
                    .await;
                let stored = match fetch.record_to_load(&outcome) {
                    Some(id) => store.load(id).await?,
                    None => None,
                };
                step = subscription::resume(fetch, event, outcome, stored, now);
            }
            match step {
                Step::Done(effect) => return Ok((effect, current)),
                Step::Failed(e) => return Err(EffectError::Step(e)),
                Step::Save { mut record, effect } => {
                    failpoint!(
                        "during_save",
                        EffectError::Store(StoreError::new(
                            StoreErrorKind::Unavailable,
                            "failpoint during_save",
                        ))
                    );
                    match store.save(&record).await {
                        Ok(version) => {
                            record.version = version;
                            return Ok((effect, Some(record)));
                        }
                        Err(e) if e.kind() == StoreErrorKind::Conflict => {}
                        Err(e) => return Err(EffectError::Store(e)),
                    }
                }
                _ => unreachable!("fetches are resumed above"),
            }
        }
        Err(EffectError::Store(StoreError::new(
            StoreErrorKind::Conflict,
            "subscription kept changing under concurrent writers",
        )))
    }

    /// Asks Stripe what a fetch step wants, about the event's account (a
    /// connected account's event is refetched with `Stripe-Account`).
    /// `last_attempt`: this is the event's last attempt (a failure is then
    /// decided by the fallback rule instead of retried).
    async fn fetch(
        &self,
        target: &FetchTarget,
        account: Option<&str>,
        last_attempt: bool,
    ) -> FetchOutcome {
        let Some(client) = &self.inner.client else {
            return FetchOutcome::NoClient;
        };
        let objects = match target {
            FetchTarget::Subscription(id) => client
                .retrieve_subscription(account, id)
                .await
                .map(|s| s.map(|s| vec![s])),
            FetchTarget::NewestOfCustomer(customer) => {
                client.list_customer_subscriptions(account, customer).await
            }
        };
        crate::metrics::refetch(objects.is_ok());
        match objects {
            // Stamped with the time the answer was read, not when the
            // request began (it may have waited for the budget or retries),
            // and with Stripe's own time for the watermark.
            Ok(answer) => FetchOutcome::Fetched {
                at: self.inner.clock.now(),
                stripe_time: answer.date,
                objects: answer.data,
            },
            Err(error) => FetchOutcome::Failed {
                error,
                last_attempt,
            },
        }
    }

    /// Lists a customer's active entitlements for an entitlement step.
    async fn fetch_entitlements(&self, fetch: &EntitlementFetch) -> EntitlementFetchOutcome {
        let Some(client) = &self.inner.client else {
            return EntitlementFetchOutcome::NoClient;
        };
        match client
            .list_customer_entitlements(fetch.account(), fetch.customer())
            .await
        {
            Ok(answer) => EntitlementFetchOutcome::Fetched {
                at: subscription::FetchTime {
                    local: self.inner.clock.now(),
                    stripe: answer.date,
                },
                lookup_keys: answer.data,
            },
            Err(e) => EntitlementFetchOutcome::Failed(e),
        }
    }

    pub(super) async fn entitlements_effect(
        &self,
        event: &Event,
        customer: String,
    ) -> Result<(Effect, Option<SubscriptionRecord>), EffectError> {
        let store = &self.inner.store;
        for _ in 0..MAX_SAVE_RACES {
            let current = store.load_entitlements(&customer).await?;
            let mut step = subscription::step_entitlements(current.as_ref(), event)
                .map_err(StepError::Object)?;
            if let EntitlementStep::Fetch(fetch) = step {
                let outcome = self.fetch_entitlements(&fetch).await;
                step = subscription::resume_entitlements(fetch, outcome)
                    .map_err(StepError::Refetch)?;
            }
            let EntitlementStep::Save(next) = step else {
                let effect = Effect::Entitlements {
                    customer,
                    changed: false,
                };
                return Ok((effect, None));
            };
            match store.save_entitlements(&next).await {
                Ok(_) => {
                    let effect = Effect::Entitlements {
                        customer,
                        changed: true,
                    };
                    return Ok((effect, None));
                }
                Err(e) if e.kind() == StoreErrorKind::Conflict => {}
                Err(e) => return Err(EffectError::Store(e)),
            }
        }
        Err(EffectError::Store(StoreError::new(
            StoreErrorKind::Conflict,
            "entitlements kept changing under concurrent writers",
        )))
    }
}

/// Why a subscription effect failed.
pub(super) enum EffectError {
    /// The store failed.
    Store(StoreError),
    /// The state machine could not apply the event.
    Step(StepError),
}

impl From<StoreError> for EffectError {
    fn from(e: StoreError) -> Self {
        Self::Store(e)
    }
}

impl From<StepError> for EffectError {
    fn from(e: StepError) -> Self {
        Self::Step(e)
    }
}
