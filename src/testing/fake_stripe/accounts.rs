//! Connect: a platform [`FakeStripe`] holds connected accounts, each a fake
//! Stripe of its own (customers, subscriptions, schedule and event log) on
//! the platform's clock, whose events carry `"account": "acct_…"` as Connect
//! deliveries do.
//!
//! The platform answers [`StripeClient`](crate::client::StripeClient) calls
//! made with `account: Some("acct_…")` from that account's state, as Stripe
//! answers a platform key sending `Stripe-Account`; an account the platform
//! does not hold answers 403 (`account_invalid`), as Stripe does for an
//! account that is not connected. Every such request counts against the
//! platform's request counter and rate limit: it is one API key.

use std::sync::Arc;

use super::{FakeConfig, FakeEvent, FakeStripe, next_id};
use crate::client::{ClientError, ClientErrorKind};

impl FakeStripe {
    /// Creates a connected account and returns its id (`acct_…`). Its fake
    /// shares this one's clock and settings (with another seed); drive it
    /// through [`FakeStripe::account`].
    ///
    /// ```
    /// use stripe_webhook_guard::clock::ManualClock;
    /// use stripe_webhook_guard::testing::{FakeConfig, FakeStripe, Subscribe};
    ///
    /// let platform = FakeStripe::new(ManualClock::at_unix(1_767_225_600), FakeConfig::default());
    /// let acct = platform.create_account();
    /// let shop = platform.account(&acct).unwrap();
    /// let customer = shop.create_customer();
    /// shop.subscribe(&customer, &Subscribe::default());
    /// // The connected account's events say whose they are.
    /// let events = shop.take_new_events();
    /// assert!(events.iter().all(|e| e.event.account() == Some(acct.as_str())));
    /// // The platform's own state is untouched.
    /// assert!(platform.subscription_ids().is_empty());
    /// ```
    pub fn create_account(&self) -> String {
        let mut inner = self.lock();
        let id = next_id(&mut inner, "acct");
        let seed = inner.rng.next_u64();
        let config = FakeConfig {
            seed,
            ..self.config.clone()
        };
        let mut fake = FakeStripe::new(self.clock.clone(), config);
        fake.account = Some(id.clone());
        inner.accounts.insert(id.clone(), Arc::new(fake));
        id
    }

    /// The fake of a connected account created by
    /// [`FakeStripe::create_account`].
    pub fn account(&self, id: &str) -> Option<Arc<FakeStripe>> {
        self.lock().accounts.get(id).cloned()
    }

    /// The connected accounts' ids, in creation order of their ids.
    pub fn account_ids(&self) -> Vec<String> {
        self.lock().accounts.keys().cloned().collect()
    }

    /// The account this fake is (`None`: a platform).
    pub fn account_id(&self) -> Option<&str> {
        self.account.as_deref()
    }

    /// The fake that answers a request about `account`: this one for
    /// `None` (or its own id), a connected account's, or 403 when the
    /// account is not connected to this one.
    pub(super) fn scope(&self, account: Option<&str>) -> Result<Scope<'_>, ClientError> {
        match account {
            None => Ok(Scope::Own(self)),
            Some(a) if self.account.as_deref() == Some(a) => Ok(Scope::Own(self)),
            Some(a) => self.account(a).map(Scope::Connected).ok_or_else(|| {
                ClientError::new(
                    ClientErrorKind::Unauthorized,
                    "account_invalid: the key does not have access to this account (fake)",
                )
                .with_status(403)
            }),
        }
    }

    /// The time of the next scheduled action of this fake or of one of its
    /// connected accounts (on the real clock).
    pub fn next_action_anywhere(&self) -> Option<i64> {
        let accounts: Vec<Arc<FakeStripe>> = self.lock().accounts.values().cloned().collect();
        accounts
            .iter()
            .filter_map(|a| a.next_action_at())
            .chain(self.next_action_at())
            .min()
    }

    /// The events the connected accounts emitted since the last call, as
    /// a Connect endpoint receives them (each carries its `account`).
    pub fn take_new_account_events(&self) -> Vec<FakeEvent> {
        let accounts: Vec<Arc<FakeStripe>> = self.lock().accounts.values().cloned().collect();
        accounts.iter().flat_map(|a| a.take_new_events()).collect()
    }

    /// Runs the earliest scheduled action of this fake or of its connected
    /// accounts due at or before `until` (ties: this one first, then
    /// accounts in id order). Returns whether one ran.
    pub fn run_next_due_anywhere(&self, until: i64) -> bool {
        let accounts: Vec<Arc<FakeStripe>> = self.lock().accounts.values().cloned().collect();
        let own = self.next_action_at().filter(|at| *at <= until);
        let other = accounts
            .iter()
            .filter_map(|a| {
                a.next_action_at()
                    .filter(|at| *at <= until)
                    .map(|at| (at, a))
            })
            .min_by_key(|(at, _)| *at);
        match (own, other) {
            (Some(mine), Some((theirs, account))) if theirs < mine => account.run_next_due(until),
            (Some(_), _) => self.run_next_due(until),
            (None, Some((_, account))) => account.run_next_due(until),
            (None, None) => false,
        }
    }
}

/// Whose state answers a request.
pub(super) enum Scope<'a> {
    /// The fake that was called.
    Own(&'a FakeStripe),
    /// One of its connected accounts.
    Connected(Arc<FakeStripe>),
}

impl std::ops::Deref for Scope<'_> {
    type Target = FakeStripe;

    fn deref(&self) -> &FakeStripe {
        match self {
            Scope::Own(f) => f,
            Scope::Connected(f) => f,
        }
    }
}
