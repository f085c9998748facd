//! Catch-up over events of Stripe test clocks, which carry the clock's
//! simulated time as `created` (see
//! [`Reconciler::catch_up`](super::Reconciler::catch_up)).

use std::collections::BTreeMap;

use super::ReconcileError;

/// Per test clock, how far catch-up has read the events dated ahead of the
/// run (simulated time): the cursor `"{events cursor}.test_clock.{id}"`
/// holds the latest such `created` read, never past a retryable failure of
/// that clock. A later run skips the clock's events older than the mark
/// minus the overlap (events of one clock are generated in its time order).
#[derive(Default)]
pub(super) struct ClockMarks {
    marks: BTreeMap<String, ClockMark>,
}

/// One clock's mark in a run: (the stored mark, the latest `created` read,
/// the oldest retryable failure).
type ClockMark = (Option<i64>, Option<i64>, Option<i64>);

impl ClockMarks {
    fn cursor(events_cursor: &str, clock: &str) -> String {
        format!("{events_cursor}.test_clock.{clock}")
    }

    /// The stored mark of `clock` (loaded once per run).
    pub(super) async fn read_before(
        &mut self,
        store: &dyn crate::store::Storage,
        events_cursor: &str,
        clock: &str,
    ) -> Result<Option<i64>, ReconcileError> {
        if let Some((stored, ..)) = self.marks.get(clock) {
            return Ok(*stored);
        }
        let stored = store
            .load_cursor(&Self::cursor(events_cursor, clock))
            .await?
            .and_then(|t| t.parse::<i64>().ok());
        self.marks.insert(clock.to_owned(), (stored, None, None));
        Ok(stored)
    }

    pub(super) fn note(&mut self, clock: String, created: i64, failed: bool) {
        let (_, read, failure) = self.marks.entry(clock).or_default();
        let slot = if failed { failure } else { read };
        *slot = Some(slot.map_or(created, |t| {
            if failed {
                t.min(created)
            } else {
                t.max(created)
            }
        }));
    }

    pub(super) async fn save(
        &self,
        store: &dyn crate::store::Storage,
        events_cursor: &str,
    ) -> Result<(), ReconcileError> {
        for (clock, (stored, read, failure)) in &self.marks {
            let mut mark = (*stored).max(*read);
            if let Some(f) = failure {
                mark = mark.map(|m| m.min(f - 1));
            }
            if let Some(m) = mark.filter(|m| Some(*m) != *stored) {
                store
                    .save_cursor(&Self::cursor(events_cursor, clock), &m.to_string())
                    .await?;
            }
        }
        Ok(())
    }
}
