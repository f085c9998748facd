//! Fuzzes `Verifier::verify`: arbitrary headers and bodies never panic, and
//! a header made by `test_header` for the body always verifies (unless the
//! body is not UTF-8 or starts with a byte-order mark, as in the SDKs).
#![no_main]

use libfuzzer_sys::fuzz_target;
use stripe_webhook_guard::signature::{Verifier, VerifyError, WebhookSecret, test_header};
use time::{Duration, OffsetDateTime};

fuzz_target!(|data: &[u8]| {
    let split = data.iter().position(|&b| b == b'\n').unwrap_or(data.len());
    let (header, body) = data.split_at(split);
    let body = body.get(1..).unwrap_or_default();
    let now = OffsetDateTime::from_unix_timestamp(1_700_000_000).unwrap();
    let secret = WebhookSecret::new("whsec_fuzz");
    let verifier = Verifier::new(secret.clone())
        .with_secret("whsec_other")
        .max_future_skew(Some(Duration::seconds(5)));
    if let Ok(h) = std::str::from_utf8(header) {
        let _ = verifier.verify(body, Some(h), now);
    }
    let good = test_header(&secret, body, now);
    match verifier.verify(body, Some(&good), now) {
        Ok(v) => assert_eq!(v.payload(), body),
        Err(VerifyError::InvalidPayloadEncoding) => assert!(std::str::from_utf8(body).is_err()),
        Err(VerifyError::SignatureMismatch) => assert!(body.starts_with(b"\xEF\xBB\xBF")),
        Err(other) => panic!("a signed body failed: {other:?}"),
    }
});
