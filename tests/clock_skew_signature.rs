//! Clock skew between the application and Stripe (±600 s and the edges):
//! the signature decision follows the documented rules exactly.
//!
//! - the application clock **behind** Stripe's: the signature's timestamp is
//!   in the future; accepted (as by Stripe's SDKs) unless
//!   `Verifier::max_future_skew` is set, then refused with
//!   `TimestampInFuture` beyond that skew;
//! - the application clock **ahead** of Stripe's: the delivery looks older
//!   than it is; accepted while the apparent age is within the tolerance
//!   (default 300 s, an age equal to it passes), refused with
//!   `TimestampExpired` beyond it. A skew larger than the tolerance refuses
//!   every delivery: raise the tolerance or fix the host's clock (NTP).

use stripe_webhook_guard::signature::{Verifier, VerifyError, WebhookSecret, test_header};
use time::{Duration, OffsetDateTime};

const BODY: &[u8] = br#"{"id":"evt_skew","object":"event","type":"customer.created","created":1,"livemode":false,"data":{"object":{}}}"#;

fn stripe_now() -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp(1_767_225_600).unwrap()
}

/// Verifies a delivery signed at Stripe's `now`, on an application clock
/// `skew` seconds ahead of Stripe's (negative: behind).
fn verify_with_skew(verifier: &Verifier, skew: i64) -> Result<(), VerifyError> {
    let secret = WebhookSecret::new("whsec_skew");
    let header = test_header(&secret, BODY, stripe_now());
    verifier
        .verify(BODY, Some(&header), stripe_now() + Duration::seconds(skew))
        .map(|_| ())
}

#[test]
fn application_behind_stripe_accepts_future_timestamps_by_default() {
    let v = Verifier::new(WebhookSecret::new("whsec_skew"));
    for skew in [-1, -60, -300, -301, -600, -86_400] {
        assert_eq!(verify_with_skew(&v, skew), Ok(()), "skew {skew}");
    }
}

#[test]
fn application_behind_stripe_refused_beyond_max_future_skew() {
    let v = Verifier::new(WebhookSecret::new("whsec_skew"))
        .max_future_skew(Some(Duration::seconds(300)));
    for skew in [0, -1, -299, -300] {
        assert_eq!(verify_with_skew(&v, skew), Ok(()), "skew {skew}");
    }
    for skew in [-301, -600] {
        assert!(
            matches!(
                verify_with_skew(&v, skew),
                Err(VerifyError::TimestampInFuture { .. })
            ),
            "skew {skew}"
        );
    }
}

#[test]
fn application_ahead_of_stripe_within_tolerance_accepts() {
    let v = Verifier::new(WebhookSecret::new("whsec_skew"));
    for skew in [1, 60, 299, 300] {
        assert_eq!(verify_with_skew(&v, skew), Ok(()), "skew {skew}");
    }
}

#[test]
fn application_ahead_of_stripe_beyond_tolerance_is_expired() {
    let v = Verifier::new(WebhookSecret::new("whsec_skew"));
    for skew in [301, 600, 3_600] {
        assert!(
            matches!(
                verify_with_skew(&v, skew),
                Err(VerifyError::TimestampExpired { .. })
            ),
            "skew {skew}"
        );
    }
    // A wider tolerance absorbs a known skew of 600 s.
    let wide = Verifier::new(WebhookSecret::new("whsec_skew")).tolerance(Duration::seconds(900));
    assert_eq!(verify_with_skew(&wide, 600), Ok(()));
}
