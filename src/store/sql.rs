//! Error plumbing shared by the SQL stores.

use super::{StoreError, StoreErrorKind};

/// Why an operation stopped: a driver error (classified, maybe retried) or a
/// decided store error.
pub(super) enum Fail {
    Db(sqlx::Error),
    Store(StoreError),
}

impl From<sqlx::Error> for Fail {
    fn from(e: sqlx::Error) -> Self {
        Fail::Db(e)
    }
}

impl From<StoreError> for Fail {
    fn from(e: StoreError) -> Self {
        Fail::Store(e)
    }
}

/// A stored value that cannot be read back.
pub(super) fn corrupt(backend: &str, what: &str) -> Fail {
    Fail::Store(StoreError::new(
        StoreErrorKind::Corrupt,
        format!("{backend}: stored {what} is invalid"),
    ))
}

pub(super) fn other(message: impl Into<String>) -> Fail {
    Fail::Store(StoreError::new(StoreErrorKind::Other, message))
}

pub(super) fn lease_lost(e: crate::ledger::FenceError) -> Fail {
    Fail::Store(StoreError::new(StoreErrorKind::LeaseLost, e.to_string()))
}

pub(super) fn not_found() -> Fail {
    Fail::Store(StoreError::new(StoreErrorKind::NotFound, "no ledger entry"))
}
