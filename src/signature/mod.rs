//! `Stripe-Signature` verification that agrees with Stripe's official SDKs.
//!
//! Stripe signs every webhook delivery with HMAC-SHA256 over
//! `"{t}.{raw body}"`, keyed with the endpoint's signing secret (`whsec_…`),
//! and sends `Stripe-Signature: t=<unix seconds>,v1=<hex>[,v1=<hex>…][,v0=…]`.
//!
//! [`Verifier::verify`] accepts a delivery exactly when both stripe-python
//! (`WebhookSignature.verify_header`) and stripe-node
//! (`webhooks.signature.verifyHeader`) would accept it with one of the
//! configured secrets, and refuses it when either would refuse it. It checks
//! these rules in this order (the order decides which error a delivery that
//! is wrong in several ways gets):
//!
//! 0. The body is larger than [`Verifier::body_limit`] →
//!    [`VerifyError::BodyTooLarge`] (checked before anything is hashed).
//! 1. The header is absent or empty → [`VerifyError::MissingHeader`].
//! 2. No usable secret (every one empty or only ASCII space, tab, line feed,
//!    vertical tab, form feed or carriage return) →
//!    [`VerifyError::MissingSecret`]. Secrets are used verbatim as UTF-8 key
//!    bytes, `whsec_` included: never trimmed, never base64-decoded. Any
//!    usable secret may match (for secret rotation).
//! 3. The header is split on `,` only and never trimmed. The key of an item
//!    is the text before its first `=`, the value the text after that `=` up
//!    to the next `=`. Keys are exact and case-sensitive: only `t` and `v1`
//!    count (`v0`, `V1`, ` v1` are ignored). An item without `=` is ignored
//!    unless it is exactly `t` or `v1`. [`VerifyError::MalformedHeader`] when
//!    an item is exactly `t` or `v1`, when a `v1` value is empty, or when a
//!    `v1` value is not ASCII and is 64 UTF-16 code units long (stripe-node's
//!    comparison throws on those two, wherever they are in the header).
//! 4. [`VerifyError::MalformedHeader`] when there is no `t`, or when the first
//!    `t` is not what Python's `int()` reads: optional whitespace, an
//!    optional `+` or `-`, at most 4300 decimal digits with single `_`
//!    between digits, optional whitespace. Whitespace here is ASCII tab to
//!    carriage return, space, U+0085, U+00A0, U+1680, U+2000–U+200A, U+2028,
//!    U+2029, U+202F, U+205F or U+3000; digits are any Unicode decimal digit
//!    (category `Nd`, Unicode 14.0). Also when the last `t` reads as -1 the
//!    way JavaScript's `parseInt(value, 10)` reads it (stripe-node's "no
//!    timestamp" marker), e.g. `-1`, `-01` or `-1x`. Any size is accepted: both
//!    SDKs bound only the age of a timestamp, not its size.
//! 5. No `v1` → [`VerifyError::NoV1Signature`].
//! 6. A body that is not UTF-8 → [`VerifyError::InvalidPayloadEncoding`].
//! 7. stripe-python's check: the lower-case hex HMAC-SHA256 of
//!    `"{P}.{body}"`, where `P` is the first `t`'s integer printed as plain
//!    decimal digits (a `-` for negatives, no `+`, no leading zeros, ASCII
//!    digits; `-0` is `0`), must equal a `v1`, compared in order, in constant
//!    time, for some secret. A non-ASCII `v1` reached before a match ends the
//!    search for that secret; if no secret matched and one was reached →
//!    [`VerifyError::MalformedHeader`], else
//!    [`VerifyError::SignatureMismatch`].
//! 8. stripe-node's check: the same, over `"{N}.{body without a leading
//!    byte-order mark}"`, where `N` is JavaScript's `String(parseInt(v, 10))`
//!    of the *last* `t` value `v`: leading whitespace (ASCII tab to carriage
//!    return, space, U+00A0, U+1680, U+2000–U+200A, U+2028, U+2029, U+202F,
//!    U+205F, U+3000, U+FEFF) is skipped, then an optional sign and the
//!    longest run of ASCII digits, rounded to the nearest `f64`; anything after
//!    them is ignored. `N` is `NaN` without digits, `Infinity` beyond the `f64`
//!    range, the shortest round-trip digits padded with zeros below 10^21
//!    (so `9007199254740993` signs as `9007199254740992`), and `1e+21` style
//!    from 10^21 on. No match → [`VerifyError::SignatureMismatch`]. For the
//!    headers Stripe sends (one `t` of plain digits, a body without BOM) `N`
//!    and `P` are the same text and the MAC is computed once.
//! 9. Only then the age: with a positive tolerance, a signature is expired
//!    when `P + tolerance < now` (exactly, sub-seconds included:
//!    stripe-python) or when `floor(now) - N > tolerance` in `f64`
//!    (stripe-node; never for `NaN`) → [`VerifyError::TimestampExpired`]. An
//!    age equal to the tolerance passes. Timestamps in the future pass, as in
//!    the SDKs, unless [`Verifier::max_future_skew`] is set: then `P` or `N`
//!    more than the skew after `now` → [`VerifyError::TimestampInFuture`].
//!
//! The behaviour is pinned by `tests/data/vectors/signatures.json`, whose
//! expected results come from running stripe-python and stripe-node on each
//! case (`scripts/sdk-vectors/run.sh`): a case is `ok` only when both SDKs
//! accept it; otherwise it expects the refusing SDK's error, or the one that
//! comes first in the order above when both refuse.
//!
//! # Performance
//!
//! The HMAC key schedule is computed once per secret in [`Verifier::new`] and
//! cloned per request; the header is parsed without allocating and the body is
//! never copied. Verifying a delivery costs about one HMAC over its bytes.

use std::fmt;

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;
use time::{Duration, OffsetDateTime};

type HmacSha256 = Hmac<Sha256>;

/// The default tolerance between the signed timestamp and `now`: 300 seconds,
/// as in every Stripe SDK.
pub const DEFAULT_TOLERANCE: Duration = Duration::seconds(300);

/// The default largest body [`Verifier::verify`] will hash: 1 MiB.
///
/// Stripe's event payloads are far smaller (a few KiB; the largest, with many
/// invoice lines, stay well under 256 KiB).
pub const DEFAULT_MAX_BODY_BYTES: usize = 1024 * 1024;

mod header;

use header::{
    ParsedHeader, StackText, check_age, format_i64, hex_lower, hex_text_words, hex_words,
    is_sdk_whitespace, parse_header, saturate,
};

const UTF8_BOM: &[u8] = b"\xEF\xBB\xBF";

/// A webhook endpoint's signing secret (`whsec_…`).
///
/// The secret is kept verbatim: it is the HMAC key as UTF-8 bytes, `whsec_`
/// prefix included. It never appears in `Debug` output, errors or logs, and
/// the type deliberately has no `Display`.
///
/// ```
/// use stripe_webhook_guard::signature::WebhookSecret;
/// let secret = WebhookSecret::new("whsec_test_secret");
/// assert_eq!(format!("{secret:?}"), "WebhookSecret([redacted])");
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct WebhookSecret(Box<str>);

impl WebhookSecret {
    /// Wraps a signing secret, exactly as given (no trimming, no decoding).
    pub fn new(secret: &str) -> Self {
        Self(secret.into())
    }

    /// Whether this secret can verify anything: not empty and not only ASCII
    /// whitespace (Stripe's SDKs refuse such secrets).
    pub fn is_usable(&self) -> bool {
        self.0.bytes().any(|b| !is_sdk_whitespace(b))
    }

    fn key(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

impl fmt::Debug for WebhookSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("WebhookSecret([redacted])")
    }
}

impl From<&str> for WebhookSecret {
    fn from(secret: &str) -> Self {
        Self::new(secret)
    }
}

impl From<String> for WebhookSecret {
    fn from(secret: String) -> Self {
        Self(secret.into_boxed_str())
    }
}

/// Why a delivery was refused. Never contains the body, the header or a
/// secret.
///
/// [`VerifyError::as_str`] gives the `snake_case` name used in the vector
/// files and in metrics.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum VerifyError {
    /// The `Stripe-Signature` header is absent or empty.
    #[error("missing Stripe-Signature header")]
    MissingHeader,
    /// No configured secret is usable (all empty or whitespace).
    #[error("no usable webhook signing secret is configured")]
    MissingSecret,
    /// The header cannot be read: no `t`, an unreadable `t`, a bare `t` or
    /// `v1` item, or a non-ASCII `v1` value.
    #[error("malformed Stripe-Signature header")]
    MalformedHeader,
    /// The header has no `v1` signature (only `v0` test-mode ones, say).
    #[error("no v1 signature in Stripe-Signature header")]
    NoV1Signature,
    /// The body is not valid UTF-8.
    #[error("webhook payload is not valid UTF-8")]
    InvalidPayloadEncoding,
    /// No `v1` signature matches any secret (or the header is inconsistent).
    #[error("no signature matches the payload")]
    SignatureMismatch,
    /// The signature is valid but older than the tolerance (a replay, or a
    /// delivery that waited too long in a queue).
    #[error("signature timestamp is {age_seconds} s old, tolerance is {tolerance_seconds} s")]
    TimestampExpired {
        /// Seconds between the signed timestamp and `now`.
        age_seconds: i64,
        /// The configured tolerance, in whole seconds.
        tolerance_seconds: i64,
    },
    /// The signature is valid but its timestamp is further in the future than
    /// [`Verifier::max_future_skew`] allows (only when that is set).
    #[error("signature timestamp is {ahead_seconds} s in the future")]
    TimestampInFuture {
        /// Seconds between `now` and the signed timestamp.
        ahead_seconds: i64,
    },
    /// The body exceeds [`Verifier::body_limit`]; it was not hashed.
    #[error("webhook payload of {len} bytes exceeds the limit of {limit} bytes")]
    BodyTooLarge {
        /// The body's length in bytes.
        len: usize,
        /// The configured limit in bytes.
        limit: usize,
    },
}

impl VerifyError {
    /// The `snake_case` name of this kind, as in `signatures.json`
    /// (`missing_header`, `signature_mismatch`, …).
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::MissingHeader => "missing_header",
            Self::MissingSecret => "missing_secret",
            Self::MalformedHeader => "malformed_header",
            Self::NoV1Signature => "no_v1_signature",
            Self::InvalidPayloadEncoding => "invalid_payload_encoding",
            Self::SignatureMismatch => "signature_mismatch",
            Self::TimestampExpired { .. } => "timestamp_expired",
            Self::TimestampInFuture { .. } => "timestamp_in_future",
            Self::BodyTooLarge { .. } => "body_too_large",
        }
    }
}

/// A delivery whose signature checked out. Only [`Verifier::verify`] builds
/// one, so a function that takes a `Verified` cannot be handed unverified
/// bytes by mistake.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Verified<'p> {
    /// Checked to be UTF-8 by `verify`, and kept as text so that nothing
    /// checks it again.
    payload: &'p str,
    timestamp: i64,
    secret_index: usize,
}

/// Shows the length, never the body.
impl std::fmt::Debug for Verified<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verified")
            .field("payload_len", &self.payload.len())
            .field("timestamp", &self.timestamp)
            .field("secret_index", &self.secret_index)
            .finish()
    }
}

impl<'p> Verified<'p> {
    /// The verified body bytes (the same slice that was passed in).
    pub fn payload(&self) -> &'p [u8] {
        self.payload.as_bytes()
    }

    /// The verified body as text (verification checked that it is UTF-8).
    pub fn payload_str(&self) -> &'p str {
        self.payload
    }

    /// The signed timestamp: the first `t`, in Unix seconds. A header may carry
    /// any integer (both SDKs bound only its age), so values beyond `i64` are
    /// reported as `i64::MIN` or `i64::MAX`.
    pub fn timestamp(&self) -> i64 {
        self.timestamp
    }

    /// The signed timestamp as a date, when it is within `time`'s range.
    pub fn signed_at(&self) -> Option<OffsetDateTime> {
        OffsetDateTime::from_unix_timestamp(self.timestamp).ok()
    }

    /// Which configured secret matched: 0 for the one given to
    /// [`Verifier::new`], then one per [`Verifier::with_secret`] in order.
    /// Useful to see when an old secret can be retired after a rotation.
    pub fn secret_index(&self) -> usize {
        self.secret_index
    }
}

/// Checks `Stripe-Signature` headers against one or more signing secrets.
///
/// Build it once at start-up and share it: it holds one pre-keyed HMAC state
/// per secret. See the [module docs](self) for the exact rules.
#[derive(Clone)]
pub struct Verifier {
    keys: Vec<(usize, HmacSha256)>,
    configured: usize,
    tolerance: Duration,
    max_future_skew: Option<Duration>,
    body_limit: usize,
}

impl fmt::Debug for Verifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Verifier")
            .field("secrets", &self.configured)
            .field("usable_secrets", &self.keys.len())
            .field("tolerance", &self.tolerance)
            .field("max_future_skew", &self.max_future_skew)
            .field("body_limit", &self.body_limit)
            .finish()
    }
}

impl Verifier {
    /// A verifier for one secret, with the SDKs' defaults: a 300 s tolerance,
    /// no limit on future timestamps, and a 1 MiB body cap.
    pub fn new(secret: impl Into<WebhookSecret>) -> Self {
        let verifier = Self {
            keys: Vec::with_capacity(1),
            configured: 0,
            tolerance: DEFAULT_TOLERANCE,
            max_future_skew: None,
            body_limit: DEFAULT_MAX_BODY_BYTES,
        };
        verifier.with_secret(secret)
    }

    /// Adds another secret; a delivery passes if any secret matches. Use it
    /// while rolling a secret: Stripe signs with both the old and the new one
    /// for a while, and either alone must be accepted.
    #[must_use]
    pub fn with_secret(mut self, secret: impl Into<WebhookSecret>) -> Self {
        let secret = secret.into();
        let index = self.configured;
        self.configured += 1;
        if secret.is_usable() {
            // HMAC accepts keys of any length, so this cannot fail; an
            // unusable key would only make the secret never match.
            if let Ok(mac) = <HmacSha256 as KeyInit>::new_from_slice(secret.key()) {
                self.keys.push((index, mac));
            }
        }
        self
    }

    /// The largest accepted age of a signature. The default is 300 s; zero
    /// (or a negative duration) disables the age check, as in the SDKs.
    #[must_use]
    pub fn tolerance(mut self, tolerance: Duration) -> Self {
        self.tolerance = tolerance;
        self
    }

    /// Rejects signatures dated more than this far after `now`. `None` (the
    /// default) accepts any future timestamp, as the SDKs do.
    #[must_use]
    pub fn max_future_skew(mut self, skew: Option<Duration>) -> Self {
        self.max_future_skew = skew;
        self
    }

    /// Sets the largest body, in bytes, that will be hashed (default 1 MiB,
    /// [`DEFAULT_MAX_BODY_BYTES`]). Larger bodies are refused with
    /// [`VerifyError::BodyTooLarge`] before any work is done; read the limit
    /// back with [`Verifier::body_limit`].
    ///
    /// ```
    /// use stripe_webhook_guard::signature::Verifier;
    /// let verifier = Verifier::new("whsec_test_secret").with_body_limit(64 * 1024);
    /// assert_eq!(verifier.body_limit(), 64 * 1024);
    /// ```
    #[must_use]
    pub fn with_body_limit(mut self, bytes: usize) -> Self {
        self.body_limit = bytes;
        self
    }

    /// The largest body, in bytes, that will be hashed (set with
    /// [`Verifier::with_body_limit`]).
    pub fn body_limit(&self) -> usize {
        self.body_limit
    }

    /// Verifies one delivery: the raw body exactly as received, the value of
    /// the `Stripe-Signature` header, and the current time. Pure: it never
    /// reads a clock.
    ///
    /// # Errors
    ///
    /// A [`VerifyError`] naming the first rule the delivery breaks, in the
    /// order given in the [module docs](self).
    ///
    /// # Example
    ///
    /// ```
    /// use stripe_webhook_guard::signature::{test_header, Verifier, VerifyError, WebhookSecret};
    /// use time::OffsetDateTime;
    ///
    /// let secret = WebhookSecret::new("whsec_test_secret");
    /// let verifier = Verifier::new(secret.clone());
    /// let body = br#"{"id":"evt_1","object":"event"}"#;
    /// let now = OffsetDateTime::from_unix_timestamp(1_700_000_000).unwrap();
    ///
    /// let header = test_header(&secret, body, now);
    /// let verified = verifier.verify(body, Some(&header), now).unwrap();
    /// assert_eq!(verified.timestamp(), 1_700_000_000);
    ///
    /// // The same delivery ten minutes later is a replay.
    /// let later = now + time::Duration::minutes(10);
    /// let err = verifier.verify(body, Some(&header), later).unwrap_err();
    /// assert_eq!(err.as_str(), "timestamp_expired");
    ///
    /// // A changed body does not match.
    /// let err = verifier.verify(b"{}", Some(&header), now).unwrap_err();
    /// assert_eq!(err, VerifyError::SignatureMismatch);
    /// ```
    pub fn verify<'p>(
        &self,
        payload: &'p [u8],
        header: Option<&str>,
        now: OffsetDateTime,
    ) -> Result<Verified<'p>, VerifyError> {
        if payload.len() > self.body_limit {
            return Err(VerifyError::BodyTooLarge {
                len: payload.len(),
                limit: self.body_limit,
            });
        }
        // Rule 1.
        let header = match header {
            Some(h) if !h.is_empty() => h,
            _ => return Err(VerifyError::MissingHeader),
        };
        // Rule 2.
        if self.keys.is_empty() {
            return Err(VerifyError::MissingSecret);
        }
        // Rules 3–5.
        let parsed = parse_header(header)?;
        // Rule 6. The text is kept: parsing reads it without a second check.
        let Ok(text) = std::str::from_utf8(payload) else {
            return Err(VerifyError::InvalidPayloadEncoding);
        };
        // Rule 7: what stripe-python signs and compares.
        let python = self.match_python(header, &parsed, payload)?;
        // Rule 8: what stripe-node signs and compares. It decodes the body
        // with `TextDecoder`, which drops one leading byte-order mark.
        let node_body = payload.strip_prefix(UTF8_BOM).unwrap_or(payload);
        let node_matches = match (&parsed.node_text, node_body.len() == payload.len()) {
            (None, true) => python.is_some(), // the very same text was checked
            (text, _) => self.match_node(header, &parsed, text.as_ref(), node_body),
        };
        let (Some(secret_index), true) = (python, node_matches) else {
            return Err(VerifyError::SignatureMismatch);
        };
        // Rule 9.
        let timestamp = parsed.python.clamped();
        check_age(
            timestamp,
            parsed.node,
            now.unix_timestamp_nanos(),
            self.tolerance,
            self.max_future_skew,
        )?;
        Ok(Verified {
            payload: text,
            timestamp: saturate(timestamp),
            secret_index,
        })
    }

    /// Rule 7: the first secret whose MAC over stripe-python's signed text
    /// equals a `v1` met before any non-ASCII `v1`. `Ok(None)`: no match;
    /// `Err(MalformedHeader)`: no match and a non-ASCII `v1` was reached.
    fn match_python(
        &self,
        header: &str,
        parsed: &ParsedHeader<'_>,
        payload: &[u8],
    ) -> Result<Option<usize>, VerifyError> {
        let mut non_ascii = false;
        for (index, keyed) in &self.keys {
            let mut mac = keyed.clone();
            parsed.python.feed(&mut mac);
            mac.update(b".");
            mac.update(payload);
            let expected = hex_words(mac.finalize().into_bytes().as_slice());
            for candidate in parsed.signatures(header) {
                if !candidate.is_ascii() {
                    non_ascii = true;
                    break; // Python's compare_digest raises here
                }
                if matches_hex(candidate, &expected) {
                    return Ok(Some(*index));
                }
            }
        }
        if non_ascii {
            Err(VerifyError::MalformedHeader)
        } else {
            Ok(None)
        }
    }

    /// Rule 8: whether any secret's MAC over stripe-node's signed text
    /// (`text`, or stripe-python's when `None`) equals any `v1`.
    fn match_node(
        &self,
        header: &str,
        parsed: &ParsedHeader<'_>,
        text: Option<&StackText>,
        body: &[u8],
    ) -> bool {
        self.keys.iter().any(|(_, keyed)| {
            let mut mac = keyed.clone();
            match text {
                Some(text) => mac.update(text.as_bytes()),
                None => parsed.python.feed(&mut mac),
            }
            mac.update(b".");
            mac.update(body);
            let expected = hex_words(mac.finalize().into_bytes().as_slice());
            // Evaluated for every candidate, like stripe-node's `filter`.
            parsed
                .signatures(header)
                .fold(false, |found, c| found | matches_hex(c, &expected))
        })
    }
}

/// Constant-time comparison of a `v1` value with the expected hex; values
/// that are not 64 bytes long cannot match.
fn matches_hex(candidate: &[u8], expected: &[u64; 8]) -> bool {
    hex_text_words(candidate).is_some_and(|words| bool::from(words.ct_eq(expected)))
}

/// Builds a `Stripe-Signature` header value (`t=…,v1=…`) for `payload`, as
/// Stripe would sign it at `timestamp`. For tests, examples and local tools.
///
/// ```
/// use stripe_webhook_guard::signature::{test_header, WebhookSecret};
/// use time::OffsetDateTime;
/// let header = test_header(
///     &WebhookSecret::new("whsec_test_vectors_endpoint_A_2c1f9e"),
///     br#"{"id":"evt_test_vectors_0001","object":"event","type":"customer.subscription.updated"}"#,
///     OffsetDateTime::from_unix_timestamp(1_700_000_000).unwrap(),
/// );
/// assert!(header.starts_with("t=1700000000,v1="));
/// ```
pub fn test_header(secret: &WebhookSecret, payload: &[u8], timestamp: OffsetDateTime) -> String {
    let t = timestamp.unix_timestamp();
    let mut digits = [0u8; 20];
    let t_text = format_i64(t, &mut digits);
    // HMAC takes keys of any length; an empty secret signs with an empty key.
    let mut mac = <HmacSha256 as KeyInit>::new_from_slice(secret.key())
        .unwrap_or_else(|_| unreachable!("HMAC accepts keys of any length"));
    mac.update(t_text);
    mac.update(b".");
    mac.update(payload);
    let tag = mac.finalize().into_bytes();
    let hex = hex_lower(tag.as_slice());
    let mut out = String::with_capacity(2 + t_text.len() + 4 + 64);
    out.push_str("t=");
    out.push_str(&t.to_string());
    out.push_str(",v1=");
    out.extend(hex.iter().map(|&b| char::from(b)));
    out
}

/// How many `v1` values are remembered from the parse; headers with more are
/// walked again (Stripe sends one, or two during a secret rotation).
#[cfg(test)]
mod tests {
    use super::header::*;
    use super::*;

    fn at(t: i64) -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp(t).unwrap()
    }

    #[test]
    fn format_i64_matches_to_string() {
        for n in [0, 1, -1, 9, 10, -10, 1_700_000_000, i64::MAX, i64::MIN] {
            let mut buf = [0u8; 20];
            assert_eq!(format_i64(n, &mut buf), n.to_string().as_bytes(), "{n}");
        }
    }

    #[test]
    fn items_split_like_the_sdks() {
        let got: Vec<_> = items("t=1,v1=ab=cd,x,,=q,v0=,v1=z=,t").collect();
        let want: Vec<(&[u8], Option<&[u8]>)> = vec![
            (b"t", Some(b"1")),
            (b"v1", Some(b"ab")),
            (b"x", None),
            (b"", None),
            (b"", Some(b"q")),
            (b"v0", Some(b"")),
            (b"v1", Some(b"z")),
            (b"t", None),
        ];
        assert_eq!(got, want);
        assert_eq!(items("").collect::<Vec<_>>(), vec![(&b""[..], None)]);
        assert_eq!(
            items("a,").collect::<Vec<_>>(),
            vec![(&b"a"[..], None), (&b""[..], None)]
        );
        // Long items cross the eight-byte words.
        let long = format!("v1={},t={}", "a".repeat(64), "9".repeat(17));
        let got: Vec<_> = items(&long).collect();
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].1.unwrap().len(), 64);
        assert_eq!(got[1].1.unwrap().len(), 17);
    }

    #[test]
    fn find_delimiter_is_exact() {
        for len in 0..40 {
            for pos in 0..len {
                for d in [b',', b'='] {
                    let mut v = vec![b'x'; len];
                    v[pos] = d;
                    // A '+' (0x2b) beside ',' (0x2c) must not confuse the scan.
                    if pos > 0 {
                        v[pos - 1] = b'+';
                    }
                    let want_any = Some(pos);
                    assert_eq!(find_delimiter(&v, DelimiterSet::CommaOrEquals), want_any);
                    let want_comma = (d == b',').then_some(pos);
                    assert_eq!(find_delimiter(&v, DelimiterSet::Comma), want_comma);
                }
            }
        }
    }

    fn python_text(t: &str) -> Option<String> {
        PyInt::parse(t.as_bytes())
            .map(|p| String::from_utf8(p.canonical_bytes().collect()).unwrap())
    }

    fn node_text(t: &str) -> String {
        let text = node_number_text(node_parse_int(t.as_bytes())).unwrap();
        String::from_utf8(text.as_bytes().to_vec()).unwrap()
    }

    #[test]
    fn python_reads_t_like_int() {
        let nines = "9".repeat(60);
        let cases: Vec<(&str, Option<&str>)> = vec![
            ("1700000000", Some("1700000000")),
            (" 1700000000 ", Some("1700000000")),
            ("+17", Some("17")),
            ("0017", Some("17")),
            ("-5", Some("-5")),
            ("-0", Some("0")),
            ("-000", Some("0")),
            ("-1", Some("-1")),
            ("", None),
            ("+", None),
            ("-", None),
            ("1_000", Some("1000")),
            ("0_0", Some("0")),
            ("_1", None),
            ("1_", None),
            ("1__0", None),
            ("+_1", None),
            ("17abc", None),
            ("1 7", None),
            ("+ 1", None),
            ("17.0", None),
            ("1e3", None),
            ("\u{a0}17\u{3000}", Some("17")),
            ("\u{85}17\u{2003}", Some("17")),
            ("\t\n\u{b}\u{c}\r 17", Some("17")),
            ("\u{feff}17", None),
            ("\u{1f}17", None),
            ("\u{200b}17", None),
            ("\u{661}\u{667}", Some("17")),
            ("\u{ff11}\u{ff17}", Some("17")),
            ("1\u{1D7CF}", Some("11")),
            ("\u{2461}", None), // circled digit: numeric but not decimal
            ("99999999999999999999", Some("99999999999999999999")),
            (&nines, Some(&nines)),
        ];
        for (t, want) in cases {
            assert_eq!(python_text(t).as_deref(), want, "{t:?}");
        }
        assert!(python_text(&"1".repeat(PYTHON_MAX_DIGITS)).is_some());
        assert!(python_text(&"1".repeat(PYTHON_MAX_DIGITS + 1)).is_none());
        assert!(python_text(&"0".repeat(PYTHON_MAX_DIGITS + 1)).is_none());
        assert!(python_text(&format!("1{}", "_0".repeat(PYTHON_MAX_DIGITS - 1))).is_some());
        assert_eq!(PyInt::parse(b"-12").unwrap().clamped(), -12);
        assert_eq!(
            PyInt::parse(nines.as_bytes()).unwrap().clamped(),
            100_000_000_000_000_000_000
        );
    }

    #[test]
    fn node_reads_t_like_parse_int() {
        let cases = [
            ("1700000000", "1700000000"),
            (" 1700000000", "1700000000"),
            ("\u{feff}\u{3000}17", "17"),
            ("\u{85}17", "NaN"),
            ("17abc", "17"),
            ("17 ", "17"),
            ("1_000", "1"),
            ("+17", "17"),
            ("-0", "0"),
            ("-5", "-5"),
            ("", "NaN"),
            ("abc", "NaN"),
            ("+ 1", "NaN"),
            ("\u{661}\u{667}", "NaN"),
            ("9007199254740992", "9007199254740992"),
            ("9007199254740993", "9007199254740992"),
            ("9007199254740994", "9007199254740994"),
            ("1152921504606846976", "1152921504606847000"),
            ("1000000000000000000", "1000000000000000000"),
            ("9223372036854775807", "9223372036854776000"),
            ("100000000000000000000", "100000000000000000000"),
            ("999999999999999999999", "1e+21"),
            ("1000000000000000000000", "1e+21"),
            ("-1000000000000000000000", "-1e+21"),
            ("12345678901234567890123", "1.2345678901234568e+22"),
        ];
        for (t, want) in cases {
            assert_eq!(node_text(t), want, "{t:?}");
        }
        assert_eq!(node_text(&"9".repeat(400)), "Infinity");
        assert_eq!(node_text(&format!("-{}", "9".repeat(400))), "-Infinity");
        assert_eq!(node_text(&"9".repeat(308)), "1e+308");
    }

    #[test]
    fn minus_one_for_stripe_node_is_malformed() {
        let v = Verifier::new("whsec_a").tolerance(Duration::ZERO);
        for t in ["-1", "-01", "-1x", " -1", "-1.5", "-1_000"] {
            let header = format!("t={t},v1={}", "0".repeat(64));
            assert_eq!(
                v.verify(b"{}", Some(&header), at(0)),
                Err(VerifyError::MalformedHeader),
                "{t}"
            );
        }
        // stripe-node reads the last t; a first -1 is fine for both.
        let s = WebhookSecret::new("whsec_a");
        let good = test_header(&s, b"{}", at(5));
        let sig = good.split("v1=").nth(1).unwrap();
        let h = format!("t=5,t=-1,v1={sig}");
        assert_eq!(
            v.verify(b"{}", Some(&h), at(5)),
            Err(VerifyError::MalformedHeader)
        );
    }

    /// Both SDKs' timestamps equal to `signed`, `now` in whole seconds.
    fn age(
        signed: i64,
        now: i64,
        tolerance: Duration,
        skew: Option<Duration>,
    ) -> Result<(), VerifyError> {
        #[allow(clippy::cast_precision_loss)]
        check_age(
            i128::from(signed),
            signed as f64,
            i128::from(now) * 1_000_000_000,
            tolerance,
            skew,
        )
    }

    #[test]
    fn age_is_overflow_safe() {
        let tol = Duration::seconds(300);
        assert!(age(i64::MIN, i64::MAX, tol, None).is_err());
        assert!(age(i64::MAX, i64::MIN, tol, None).is_ok());
        assert!(age(i64::MAX, i64::MIN, tol, Some(Duration::ZERO)).is_err());
        assert!(age(i64::MIN, i64::MAX, Duration::ZERO, None).is_ok());
        assert!(age(i64::MIN, i64::MAX, Duration::MIN, None).is_ok());
        assert!(age(0, 300, tol, None).is_ok());
        assert!(age(0, 301, tol, None).is_err());
        // Sub-second tolerances still count.
        assert!(age(0, 1, Duration::milliseconds(500), None).is_err());
        assert!(age(0, 0, Duration::milliseconds(500), None).is_ok());
    }

    #[test]
    fn age_follows_each_sdk() {
        let tol = Duration::seconds(300);
        let ns = 1_000_000_000i128;
        // stripe-python compares with the exact time: half a second past the
        // tolerance is expired (stripe-node, flooring `now`, would pass it).
        assert!(check_age(0, 0.0, 300 * ns + ns / 2, tol, None).is_err());
        assert!(check_age(0, 0.0, 300 * ns, tol, None).is_ok());
        // stripe-node's own (last, or differently read) t can expire alone.
        assert_eq!(
            check_age(1_700_000_000, 1.0, 1_700_000_000 * ns, tol, None),
            Err(VerifyError::TimestampExpired {
                age_seconds: 1_699_999_999,
                tolerance_seconds: 300
            })
        );
        // NaN never expires in stripe-node; Infinity is in the future.
        assert!(check_age(1_700_000_000, f64::NAN, 1_700_000_000 * ns, tol, None).is_ok());
        assert!(check_age(1_700_000_000, f64::INFINITY, 1_700_000_000 * ns, tol, None).is_ok());
        assert!(
            check_age(
                1_700_000_000,
                f64::NEG_INFINITY,
                1_700_000_000 * ns,
                tol,
                None
            )
            .is_err()
        );
        assert!(
            check_age(
                1_700_000_000,
                f64::INFINITY,
                1_700_000_000 * ns,
                tol,
                Some(Duration::seconds(60))
            )
            .is_err()
        );
    }

    #[test]
    fn t_beyond_i64_verifies_with_one_signature_per_sdk() {
        let s = WebhookSecret::new("whsec_a");
        let v = Verifier::new(s.clone());
        let sign = |text: &str| {
            let mut mac = <HmacSha256 as KeyInit>::new_from_slice(s.key()).unwrap();
            mac.update(text.as_bytes());
            mac.update(b".{}");
            let hex = hex_lower(mac.finalize().into_bytes().as_slice());
            String::from_utf8(hex.to_vec()).unwrap()
        };
        let t = "9223372036854775808"; // 2^63
        let py = sign(t);
        let node = sign("9223372036854776000");
        let both = format!("t={t},v1={py},v1={node}");
        let verified = v.verify(b"{}", Some(&both), at(0)).unwrap();
        assert_eq!(verified.timestamp(), i64::MAX);
        for one in [&py, &node] {
            let h = format!("t={t},v1={one}");
            assert_eq!(
                v.verify(b"{}", Some(&h), at(0)),
                Err(VerifyError::SignatureMismatch)
            );
        }
        // 10^20 is printed the same by both: one signature is enough.
        let t = "100000000000000000000";
        let h = format!("t={t},v1={}", sign(t));
        assert!(v.verify(b"{}", Some(&h), at(0)).is_ok());
    }

    #[test]
    fn unicode_whitespace_around_t() {
        let s = WebhookSecret::new("whsec_a");
        let v = Verifier::new(s.clone());
        let good = test_header(&s, b"{}", at(1_700_000_000));
        let sig = good.split("v1=").nth(1).unwrap();
        for (t, ok) in [
            ("\u{a0}1700000000", true),
            ("1700000000\u{3000}", true),
            ("\u{2003}1700000000\u{2028}", true),
            ("\u{85}1700000000", false),   // stripe-node: NaN
            ("\u{feff}1700000000", false), // stripe-python: not whitespace
            ("1700000000\u{85}", true),
        ] {
            let h = format!("t={t},v1={sig}");
            let r = v.verify(b"{}", Some(&h), at(1_700_000_000));
            assert_eq!(r.is_ok(), ok, "{t:?}: {r:?}");
        }
    }

    #[test]
    fn verified_debug_shows_no_body() {
        let s = WebhookSecret::new("whsec_a");
        let body = br#"{"card":"4242 secret body"}"#;
        let h = test_header(&s, body, at(0));
        let v = Verifier::new(s).verify(body, Some(&h), at(0)).unwrap();
        let dbg = format!("{v:?}");
        assert!(!dbg.contains("secret body"), "{dbg}");
        assert!(dbg.contains("payload_len"));
    }

    #[test]
    fn secret_is_redacted_everywhere() {
        let v = Verifier::new("whsec_supersecret").with_secret("whsec_other");
        let dbg = format!("{v:?}");
        assert!(!dbg.contains("supersecret"), "{dbg}");
        assert!(!format!("{:?}", WebhookSecret::new("whsec_x")).contains("whsec_x"));
    }

    #[test]
    fn secret_index_reports_the_matching_secret() {
        let a = WebhookSecret::new("whsec_a");
        let b = WebhookSecret::new("whsec_b");
        let v = Verifier::new(a).with_secret("  ").with_secret(b.clone());
        let body = b"{}";
        let h = test_header(&b, body, at(10));
        assert_eq!(v.verify(body, Some(&h), at(10)).unwrap().secret_index(), 2);
    }

    #[test]
    fn body_cap_is_checked_first() {
        let s = WebhookSecret::new("whsec_a");
        let v = Verifier::new(s.clone()).with_body_limit(4);
        let h = test_header(&s, b"12345", at(0));
        assert_eq!(
            v.verify(b"12345", Some(&h), at(0)),
            Err(VerifyError::BodyTooLarge { len: 5, limit: 4 })
        );
        assert!(
            v.verify(b"1234", Some(&test_header(&s, b"1234", at(0))), at(0))
                .is_ok()
        );
    }

    #[test]
    fn future_skew_is_opt_in() {
        let s = WebhookSecret::new("whsec_a");
        let h = test_header(&s, b"{}", at(1000));
        assert!(
            Verifier::new(s.clone())
                .verify(b"{}", Some(&h), at(0))
                .is_ok()
        );
        let v = Verifier::new(s).max_future_skew(Some(Duration::seconds(60)));
        assert_eq!(
            v.verify(b"{}", Some(&h), at(0)),
            Err(VerifyError::TimestampInFuture {
                ahead_seconds: 1000
            })
        );
        assert!(v.verify(b"{}", Some(&h), at(940)).is_ok());
    }

    #[test]
    fn bom_and_invalid_utf8() {
        let s = WebhookSecret::new("whsec_a");
        let v = Verifier::new(s.clone());
        let body = b"\xEF\xBB\xBF{}";
        let h = test_header(&s, body, at(0));
        assert_eq!(
            v.verify(body, Some(&h), at(0)),
            Err(VerifyError::SignatureMismatch)
        );
        let body = b"{\xff}";
        let h = test_header(&s, body, at(0));
        assert_eq!(
            v.verify(body, Some(&h), at(0)),
            Err(VerifyError::InvalidPayloadEncoding)
        );
    }

    #[test]
    fn non_ascii_v1_before_a_match_is_malformed() {
        let s = WebhookSecret::new("whsec_a");
        let v = Verifier::new(s.clone());
        let good = test_header(&s, b"{}", at(0));
        let sig = good.split("v1=").nth(1).unwrap();
        let h = format!("t=0,v1=é,v1={sig}");
        assert_eq!(
            v.verify(b"{}", Some(&h), at(0)),
            Err(VerifyError::MalformedHeader)
        );
        let h = format!("t=0,v1={sig},v1=é");
        assert!(v.verify(b"{}", Some(&h), at(0)).is_ok());
    }

    #[test]
    fn value_stops_at_the_next_equals_sign() {
        let s = WebhookSecret::new("whsec_a");
        let v = Verifier::new(s.clone());
        let good = test_header(&s, b"{}", at(0));
        let h = format!("{good}=trailing");
        assert!(v.verify(b"{}", Some(&h), at(0)).is_ok());
        assert_eq!(
            v.verify(b"{}", Some("t=0,v1"), at(0)),
            Err(VerifyError::MalformedHeader)
        );
        assert_eq!(
            v.verify(b"{}", Some("t,t=0,v1=ab"), at(0)),
            Err(VerifyError::MalformedHeader)
        );
        assert_eq!(
            v.verify(b"{}", Some("t=0,v1x,v1=ab"), at(0)),
            Err(VerifyError::SignatureMismatch)
        );
    }
}
