//! Property tests for signature verification.

use proptest::prelude::*;
use stripe_webhook_guard::signature::{Verifier, VerifyError, WebhookSecret, test_header};
use time::{Duration, OffsetDateTime};

fn at(t: i64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp(t).unwrap()
}

/// Whitespace that stripe-python's `int()` strips and stripe-node's
/// `parseInt` skips before a number (it ignores anything after one).
fn sdk_space() -> impl Strategy<Value = char> {
    prop::sample::select(vec![
        ' ', '\t', '\n', '\u{b}', '\u{c}', '\r', '\u{a0}', '\u{1680}', '\u{2000}', '\u{2003}',
        '\u{200a}', '\u{2028}', '\u{2029}', '\u{202f}', '\u{205f}', '\u{3000}',
    ])
}

fn secret_strategy() -> impl Strategy<Value = String> {
    "whsec_[A-Za-z0-9]{1,40}"
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn signed_then_verified(secret in secret_strategy(), body in ".{0,512}", t in 0i64..4_102_444_800) {
        let s = WebhookSecret::new(&secret);
        let header = test_header(&s, body.as_bytes(), at(t));
        let v = Verifier::new(s);
        if body.starts_with('\u{feff}') {
            // Rule 6: a body starting with a byte-order mark never verifies (as in the SDKs).
            prop_assert_eq!(v.verify(body.as_bytes(), Some(&header), at(t)).unwrap_err(), VerifyError::SignatureMismatch);
            return Ok(());
        }
        let verified = v.verify(body.as_bytes(), Some(&header), at(t)).unwrap();
        prop_assert_eq!(verified.timestamp(), t);
        prop_assert_eq!(verified.payload(), body.as_bytes());
    }

    #[test]
    fn any_flipped_body_byte_fails(body in "[ -~]{1,256}", idx in any::<prop::sample::Index>(), bit in 0u8..7) {
        let s = WebhookSecret::new("whsec_prop");
        let header = test_header(&s, body.as_bytes(), at(1_700_000_000));
        let mut tampered = body.into_bytes();
        let i = idx.index(tampered.len());
        // Flip one of the low 7 bits so the byte stays ASCII (valid UTF-8) and changes.
        tampered[i] ^= 1 << bit;
        let err = Verifier::new(s).verify(&tampered, Some(&header), at(1_700_000_000)).unwrap_err();
        prop_assert_eq!(err, VerifyError::SignatureMismatch);
    }

    #[test]
    fn any_flipped_signature_char_fails(body in "[ -~]{0,128}", idx in 0usize..64, replacement in "[0-9a-f]") {
        let s = WebhookSecret::new("whsec_prop");
        let header = test_header(&s, body.as_bytes(), at(1_700_000_000));
        let (prefix, sig) = header.split_once("v1=").unwrap();
        let mut sig = sig.as_bytes().to_vec();
        let r = replacement.as_bytes()[0];
        prop_assume!(sig[idx] != r);
        sig[idx] = r;
        let tampered = format!("{prefix}v1={}", String::from_utf8(sig).unwrap());
        let err = Verifier::new(s).verify(body.as_bytes(), Some(&tampered), at(1_700_000_000)).unwrap_err();
        prop_assert_eq!(err, VerifyError::SignatureMismatch);
    }

    #[test]
    fn any_changed_timestamp_fails(body in "[ -~]{0,128}", t in 0i64..4_000_000_000, delta in 1i64..1_000_000) {
        let s = WebhookSecret::new("whsec_prop");
        let header = test_header(&s, body.as_bytes(), at(t));
        let sig = header.split_once(",v1=").unwrap().1;
        let tampered = format!("t={},v1={sig}", t + delta);
        let v = Verifier::new(s).tolerance(Duration::ZERO);
        let err = v.verify(body.as_bytes(), Some(&tampered), at(t)).unwrap_err();
        prop_assert_eq!(err, VerifyError::SignatureMismatch);
    }

    #[test]
    fn parser_never_panics(header in ".{0,200}", body in proptest::collection::vec(any::<u8>(), 0..64), now in any::<i32>()) {
        let v = Verifier::new("whsec_prop");
        let _ = v.verify(&body, Some(&header), at(i64::from(now)));
    }

    #[test]
    fn structured_headers_never_panic(
        items in proptest::collection::vec(
            prop_oneof![
                "t=[ +-]?[0-9]{0,25}[ ]?",
                "v1=[0-9a-fA-F]{0,70}",
                "v1=.{0,5}",
                "[tv01 ]{0,3}",
                "[a-z=]{0,6}",
            ],
            0..8,
        ),
        now in any::<i64>(),
    ) {
        let header = items.join(",");
        let now = OffsetDateTime::from_unix_timestamp(now.clamp(-377_705_116_800, 253_402_300_799)).unwrap();
        let v = Verifier::new("whsec_prop").max_future_skew(Some(Duration::seconds(5)));
        let _ = v.verify(b"{}", Some(&header), now);
    }

    #[test]
    fn whitespace_both_sdks_skip_around_t_verifies(
        t in 0i64..4_102_444_800,
        before in proptest::collection::vec(sdk_space(), 0..4),
        after in proptest::collection::vec(sdk_space(), 0..4),
        zeros in 0usize..3,
        plus in any::<bool>(),
    ) {
        let s = WebhookSecret::new("whsec_prop");
        let header = test_header(&s, b"{}", at(t));
        let sig = header.split_once(",v1=").unwrap().1;
        let before: String = before.into_iter().collect();
        let after: String = after.into_iter().collect();
        let sign = if plus { "+" } else { "" };
        let zeros = "0".repeat(zeros);
        let h = format!("t={before}{sign}{zeros}{t}{after},v1={sig}");
        let verified = Verifier::new(s).tolerance(Duration::ZERO).verify(b"{}", Some(&h), at(0)).unwrap();
        prop_assert_eq!(verified.timestamp(), t);
    }

    #[test]
    fn arbitrary_t_text_never_panics(
        t in prop_oneof![
            "[\\s\u{85}\u{a0}\u{feff}\u{3000}+_-]{0,3}[0-9\u{660}-\u{669}\u{ff10}-\u{ff19}_]{0,40}[\\s\u{85}a.e]{0,3}",
            "[0-9]{15,400}",
            ".{0,30}",
        ],
        last_t in proptest::option::of("[ -]?[0-9]{0,30}"),
        body in proptest::collection::vec(any::<u8>(), 0..16),
        now in -377_705_116_800i64..253_402_300_799,
    ) {
        let s = WebhookSecret::new("whsec_prop");
        let good = test_header(&s, &body, at(0));
        let sig = good.split_once(",v1=").unwrap().1;
        let last = last_t.map(|l| format!(",t={l}")).unwrap_or_default();
        let h = format!("t={t}{last},v1={sig},v1={sig}");
        let v = Verifier::new(s).max_future_skew(Some(Duration::seconds(5)));
        let _ = v.verify(&body, Some(&h), at(now));
    }

    #[test]
    fn age_arithmetic_at_extremes(t in prop_oneof![Just(i64::MIN), Just(i64::MAX), Just(-(1i64 << 53)), Just(1i64 << 53), any::<i64>()],
                                  tol in prop_oneof![Just(Duration::MAX), Just(Duration::MIN), Just(Duration::ZERO), any::<i64>().prop_map(Duration::seconds)]) {
        let v = Verifier::new("whsec_prop").tolerance(tol).max_future_skew(Some(tol));
        let header = format!("t={t},v1=00");
        for now in [-377_705_116_800i64, 0, 253_402_300_799] {
            let r = v.verify(b"{}", Some(&header), at(now));
            prop_assert!(matches!(r, Err(VerifyError::SignatureMismatch | VerifyError::MalformedHeader)));
        }
    }
}

#[test]
fn extreme_valid_timestamps_expire_or_pass_without_overflow() {
    let s = WebhookSecret::new("whsec_prop");
    // 2^53 is beyond `time`'s range, so these are signed by hand.
    for t in [0i64, 1 << 53, -(1 << 53), 253_402_300_799] {
        let v = Verifier::new(s.clone());
        let header = sign_raw(b"whsec_prop", b"{}", t);
        let now = at(1_700_000_000);
        let r = v.verify(b"{}", Some(&header), now);
        if t < 1_700_000_000 - 300 {
            assert_eq!(r.unwrap_err().as_str(), "timestamp_expired", "t={t}");
        } else {
            assert_eq!(r.unwrap().timestamp(), t);
        }
    }
}

/// Signs like Stripe (HMAC-SHA256 over `"{t}.{body}"`) for timestamps beyond
/// the range `test_header`'s `OffsetDateTime` can hold.
fn sign_raw(key: &[u8], body: &[u8], t: i64) -> String {
    use hmac::{Hmac, KeyInit, Mac};
    let mut mac = <Hmac<sha2::Sha256> as KeyInit>::new_from_slice(key).unwrap();
    mac.update(format!("{t}.").as_bytes());
    mac.update(body);
    let tag = mac.finalize().into_bytes();
    let hex: String = tag.iter().fold(String::new(), |mut acc, b| {
        use std::fmt::Write;
        let _ = write!(acc, "{b:02x}");
        acc
    });
    format!("t={t},v1={hex}")
}
