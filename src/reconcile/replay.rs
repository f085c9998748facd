//! Replaying stored events (failed or dead-lettered) through the processor.

use super::{ChangeSource, ReconcileError};
use crate::event::Event;
use crate::ledger::{EventKey, LedgerQuery, LedgerState};
use crate::processor::Outcome;
use crate::subscription;

use super::driver::Reconciler;

impl Reconciler {
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
                .retrieve_event(account, event_id)
                .await
                .map(|answer| {
                    let mut event = answer.data;
                    if let Some(account) = account {
                        event.assume_account(account);
                    }
                    event
                })
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
}
