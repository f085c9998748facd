//! The store conformance suite against the in-memory store.
#![cfg(feature = "test-util")]

use std::sync::Arc;

use stripe_webhook_guard::clock::ManualClock;
use stripe_webhook_guard::store::MemoryStore;

stripe_webhook_guard::store_conformance_tests!(memory, {
    let clock = Arc::new(ManualClock::at_unix(1_700_000_000));
    (Arc::new(MemoryStore::with_clock(clock.clone())), clock)
});
