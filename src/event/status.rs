//! [`SubscriptionStatus`]: a subscription's `status`, with the statuses
//! this crate does not know kept verbatim.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A subscription's `status`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(from = "String", into = "String")]
#[non_exhaustive]
pub enum SubscriptionStatus {
    /// First payment not (yet) made; expires after 23 hours.
    Incomplete,
    /// First payment never made: terminal.
    IncompleteExpired,
    /// In a free trial.
    Trialing,
    /// Paid and current.
    Active,
    /// A renewal payment failed; Stripe is retrying.
    PastDue,
    /// Retries exhausted; invoices left open.
    Unpaid,
    /// Trial ended without a payment method (status `paused`).
    Paused,
    /// Ended: terminal.
    Canceled,
    /// A status this version of the crate does not know, verbatim.
    Unknown(String),
}

impl SubscriptionStatus {
    /// Reads Stripe's spelling.
    pub fn parse(text: &str) -> Self {
        match text {
            "incomplete" => Self::Incomplete,
            "incomplete_expired" => Self::IncompleteExpired,
            "trialing" => Self::Trialing,
            "active" => Self::Active,
            "past_due" => Self::PastDue,
            "unpaid" => Self::Unpaid,
            "paused" => Self::Paused,
            "canceled" => Self::Canceled,
            other => Self::Unknown(other.to_owned()),
        }
    }

    /// Stripe's spelling.
    pub fn as_str(&self) -> &str {
        match self {
            Self::Incomplete => "incomplete",
            Self::IncompleteExpired => "incomplete_expired",
            Self::Trialing => "trialing",
            Self::Active => "active",
            Self::PastDue => "past_due",
            Self::Unpaid => "unpaid",
            Self::Paused => "paused",
            Self::Canceled => "canceled",
            Self::Unknown(s) => s,
        }
    }

    /// `canceled` and `incomplete_expired`: nothing follows them (a
    /// resubscription is a new `sub_` id).
    pub fn is_terminal(&self) -> bool {
        matches!(self, Self::Canceled | Self::IncompleteExpired)
    }

    /// The eight statuses Stripe documents.
    pub const ALL: [SubscriptionStatus; 8] = [
        Self::Incomplete,
        Self::IncompleteExpired,
        Self::Trialing,
        Self::Active,
        Self::PastDue,
        Self::Unpaid,
        Self::Paused,
        Self::Canceled,
    ];
}

impl From<String> for SubscriptionStatus {
    fn from(s: String) -> Self {
        Self::parse(&s)
    }
}

impl From<SubscriptionStatus> for String {
    fn from(s: SubscriptionStatus) -> Self {
        s.as_str().to_owned()
    }
}

impl fmt::Display for SubscriptionStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
