//! `Stripe-Signature` verification that agrees with Stripe's official SDKs.
//!
//! Stripe signs every webhook delivery with HMAC-SHA256 over
//! `"{t}.{raw body}"`, keyed with the endpoint's signing secret (`whsec_…`),
//! and sends `Stripe-Signature: t=<unix seconds>,v1=<hex>[,v1=<hex>…][,v0=…]`.
//! [`Verifier::verify`] checks a delivery step by step, in this order (the
//! order decides which error a request that is wrong in several ways gets):
//!
//! 0. The body is larger than [`Verifier::max_body_bytes`] →
//!    [`VerifyError::BodyTooLarge`] (checked before anything is hashed).
//! 1. The header is absent or empty → [`VerifyError::MissingHeader`].
//! 2. No usable secret (every one empty or only ASCII whitespace) →
//!    [`VerifyError::MissingSecret`]. Secrets are used verbatim as UTF-8 key
//!    bytes, `whsec_` included: never trimmed, never base64-decoded.
//! 3. The header is split on `,` only and never trimmed. An item without `=`
//!    is ignored unless it is exactly `t` or `v1`
//!    ([`VerifyError::MalformedHeader`]). The key is the text before the first
//!    `=`, the value the text after it up to the next `=`. Keys are exact and
//!    case-sensitive: only `t` and `v1` count (`v0`, `V1`, ` v1` are ignored).
//! 4. No `t`, or a first `t` that is not optional surrounding ASCII whitespace,
//!    an optional sign and ASCII digits, or that is `-1`, or whose value the
//!    SDKs would not turn back into the same decimal digits (see below) →
//!    [`VerifyError::MalformedHeader`].
//! 5. No `v1` → [`VerifyError::NoV1Signature`].
//! 6. A body that is not UTF-8 → [`VerifyError::InvalidPayloadEncoding`]; a
//!    body starting with a UTF-8 byte-order mark →
//!    [`VerifyError::SignatureMismatch`].
//! 7. A later `t` with a different (or unreadable) value →
//!    [`VerifyError::SignatureMismatch`] (stripe-python uses the first `t`,
//!    stripe-node the last; we accept only headers on which both agree).
//! 8. For each secret, the lower-case hex HMAC-SHA256 of `"{n}.{body}"` is
//!    compared with each `v1` in order, in constant time. Upper-case or
//!    malformed values simply do not match; a non-ASCII `v1` reached before a
//!    match → [`VerifyError::MalformedHeader`]. No match →
//!    [`VerifyError::SignatureMismatch`].
//! 9. Only then the age: with a non-zero tolerance, `now - n > tolerance` →
//!    [`VerifyError::TimestampExpired`] (an age equal to the tolerance
//!    passes). Timestamps in the future pass, as in the SDKs, unless
//!    [`Verifier::max_future_skew`] is set ([`VerifyError::TimestampInFuture`]).
//!
//! Timestamps: `n` is signed as its canonical decimal digits. stripe-python
//! prints the exact integer, stripe-node the shortest decimal that round-trips
//! through an `f64`; the two agree for every `|n| ≤ 2^53` and for some larger
//! values. We accept exactly the values on which they agree and that fit in an
//! `i64`; anything else is [`VerifyError::MalformedHeader`].
//!
//! The behaviour is pinned by the 44 cases of `tests/data/vectors/signatures.json`,
//! whose expected results were decided by running stripe-python and
//! stripe-node on each case.
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
/// [`VerifyError::kind_str`] gives the `snake_case` name used in the vector
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
    /// The body exceeds [`Verifier::max_body_bytes`]; it was not hashed.
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
    pub fn kind_str(&self) -> &'static str {
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
    /// Checked to be UTF-8 by `verify`.
    payload: &'p [u8],
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
        self.payload
    }

    /// The verified body as text. Verification checked that it is UTF-8;
    /// this converts again (a fast scan), so prefer [`Verified::payload`]
    /// where bytes will do.
    pub fn payload_str(&self) -> &'p str {
        // Invariant: `verify` only builds a `Verified` over valid UTF-8.
        std::str::from_utf8(self.payload).unwrap_or_default()
    }

    /// The signed timestamp `t`, in Unix seconds.
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
    max_body_bytes: usize,
}

impl fmt::Debug for Verifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Verifier")
            .field("secrets", &self.configured)
            .field("usable_secrets", &self.keys.len())
            .field("tolerance", &self.tolerance)
            .field("max_future_skew", &self.max_future_skew)
            .field("max_body_bytes", &self.max_body_bytes)
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
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
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

    /// The largest body that will be hashed (default 1 MiB). Larger bodies are
    /// refused with [`VerifyError::BodyTooLarge`] before any work is done.
    #[must_use]
    pub fn max_body_bytes(mut self, limit: usize) -> Self {
        self.max_body_bytes = limit;
        self
    }

    /// The configured body cap in bytes.
    pub fn body_limit(&self) -> usize {
        self.max_body_bytes
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
    /// assert_eq!(err.kind_str(), "timestamp_expired");
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
        if payload.len() > self.max_body_bytes {
            return Err(VerifyError::BodyTooLarge {
                len: payload.len(),
                limit: self.max_body_bytes,
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
        // Rule 6.
        // Most bodies are ASCII, which `is_ascii` checks about twice as fast
        // as a full UTF-8 validation.
        if !payload.is_ascii() && std::str::from_utf8(payload).is_err() {
            return Err(VerifyError::InvalidPayloadEncoding);
        }
        if payload.starts_with(UTF8_BOM) {
            return Err(VerifyError::SignatureMismatch);
        }
        // Rule 7.
        if parsed.later_t_differs {
            return Err(VerifyError::SignatureMismatch);
        }
        // Rule 8. The signed text is the canonical decimal of `t`, which is
        // the header's own text unless it had a sign, spaces or leading zeros.
        let mut digits = [0u8; 20];
        let t_text = if is_canonical_digits(parsed.t_text) {
            parsed.t_text
        } else {
            format_i64(parsed.timestamp, &mut digits)
        };
        let secret_index = self.match_signature(header, &parsed, t_text, payload)?;
        // Rule 9.
        check_age(
            parsed.timestamp,
            now.unix_timestamp(),
            self.tolerance,
            self.max_future_skew,
        )?;
        Ok(Verified {
            payload,
            timestamp: parsed.timestamp,
            secret_index,
        })
    }

    fn match_signature(
        &self,
        header: &str,
        parsed: &ParsedHeader<'_>,
        t_text: &[u8],
        payload: &[u8],
    ) -> Result<usize, VerifyError> {
        for (index, keyed) in &self.keys {
            let mut mac = keyed.clone();
            mac.update(t_text);
            mac.update(b".");
            mac.update(payload);
            let tag = mac.finalize().into_bytes();
            let expected = hex_words(tag.as_slice());
            for candidate in parsed.signatures(header) {
                if !candidate.is_ascii() {
                    return Err(VerifyError::MalformedHeader);
                }
                let Some(candidate) = hex_text_words(candidate) else {
                    continue; // not 64 characters: cannot match
                };
                if bool::from(candidate.ct_eq(&expected)) {
                    return Ok(*index);
                }
            }
        }
        Err(VerifyError::SignatureMismatch)
    }
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
const INLINE_V1: usize = 4;

struct ParsedHeader<'h> {
    timestamp: i64,
    t_text: &'h [u8],
    later_t_differs: bool,
    v1: [&'h [u8]; INLINE_V1],
    v1_count: usize,
}

impl<'h> ParsedHeader<'h> {
    /// Every `v1` value in header order, without allocating.
    fn signatures(&self, header: &'h str) -> impl Iterator<Item = &'h [u8]> + '_ {
        let inline = self.v1.iter().take(self.v1_count).copied();
        let spilled = (self.v1_count > INLINE_V1).then(|| {
            items(header)
                .filter_map(|(k, v)| (k == b"v1").then_some(v).flatten())
                .skip(INLINE_V1)
        });
        inline.chain(spilled.into_iter().flatten())
    }
}

/// The header's items as `(key, value)`: `value` is `None` for an item
/// without `=`, else the text after the first `=` up to the next `=`.
fn items(header: &str) -> Items<'_> {
    Items {
        rest: Some(header.as_bytes()),
    }
}

/// Iterator behind [`items`]. It finds delimiters eight bytes at a time: a
/// header is mostly 64-character hex signatures, and a byte-by-byte scan of
/// them costs more than everything else in `verify` except the HMAC.
struct Items<'h> {
    rest: Option<&'h [u8]>,
}

impl<'h> Iterator for Items<'h> {
    type Item = (&'h [u8], Option<&'h [u8]>);

    fn next(&mut self) -> Option<Self::Item> {
        let rest = self.rest?;
        let Some(first) = find_delimiter(rest, DelimiterSet::CommaOrEquals) else {
            self.rest = None;
            return Some((rest, None));
        };
        if rest[first] == b',' {
            self.rest = Some(&rest[first + 1..]);
            return Some((&rest[..first], None));
        }
        let key = &rest[..first];
        let after_eq = &rest[first + 1..];
        let Some(second) = find_delimiter(after_eq, DelimiterSet::CommaOrEquals) else {
            self.rest = None;
            return Some((key, Some(after_eq)));
        };
        let value = &after_eq[..second];
        if after_eq[second] == b',' {
            self.rest = Some(&after_eq[second + 1..]);
        } else {
            let tail = &after_eq[second..];
            self.rest = find_delimiter(tail, DelimiterSet::Comma).map(|c| &tail[c + 1..]);
        }
        Some((key, Some(value)))
    }
}

#[derive(Clone, Copy)]
enum DelimiterSet {
    Comma,
    CommaOrEquals,
}

/// Index of the first `,` (or `=`) in `bytes`, eight bytes at a time.
fn find_delimiter(bytes: &[u8], set: DelimiterSet) -> Option<usize> {
    const LO: u64 = 0x0101_0101_0101_0101;
    const HI: u64 = 0x8080_8080_8080_8080;
    // Marks bytes of `w` equal to zero; the lowest mark is always exact.
    let zero_bytes = |w: u64| w.wrapping_sub(LO) & !w & HI;
    let is_delim = |b: u8| b == b',' || (matches!(set, DelimiterSet::CommaOrEquals) && b == b'=');
    let (words, tail) = bytes.as_chunks::<8>();
    for (i, chunk) in words.iter().enumerate() {
        let w = u64::from_le_bytes(*chunk);
        let mut marks = zero_bytes(w ^ (LO * u64::from(b',')));
        if matches!(set, DelimiterSet::CommaOrEquals) {
            marks |= zero_bytes(w ^ (LO * u64::from(b'=')));
        }
        if marks != 0 {
            // trailing_zeros is below 64, so the index fits.
            return Some(i * 8 + (marks.trailing_zeros() / 8) as usize);
        }
    }
    let offset = words.len() * 8;
    tail.iter().position(|&b| is_delim(b)).map(|p| offset + p)
}

/// Rules 3–5 and the input to rule 7, in one pass, without allocating.
fn parse_header(header: &str) -> Result<ParsedHeader<'_>, VerifyError> {
    let mut first_t: Option<&[u8]> = None;
    let mut later_t = false;
    let mut v1: [&[u8]; INLINE_V1] = [&[]; INLINE_V1];
    let mut v1_count = 0usize;
    for (key, value) in items(header) {
        match (key, value) {
            (b"t" | b"v1", None) => return Err(VerifyError::MalformedHeader),
            (b"t", Some(v)) if first_t.is_none() => first_t = Some(v),
            (b"t", Some(_)) => later_t = true,
            (b"v1", Some(v)) => {
                if let Some(slot) = v1.get_mut(v1_count) {
                    *slot = v;
                }
                v1_count += 1;
            }
            _ => {}
        }
    }
    let Some(first) = first_t else {
        return Err(VerifyError::MalformedHeader);
    };
    let timestamp = parse_timestamp(first).ok_or(VerifyError::MalformedHeader)?;
    if v1_count == 0 {
        return Err(VerifyError::NoV1Signature);
    }
    let later_t_differs = later_t
        && items(header)
            .filter_map(|(k, v)| (k == b"t").then_some(v).flatten())
            .skip(1)
            .any(|v| parse_timestamp(v) != Some(timestamp));
    Ok(ParsedHeader {
        timestamp,
        t_text: first,
        later_t_differs,
        v1,
        v1_count,
    })
}

/// Whitespace that both stripe-python's `int()` and stripe-node's `parseInt`
/// skip: ASCII space, tab, line feed, vertical tab, form feed, carriage return.
fn is_sdk_whitespace(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | 0x0b | 0x0c | b'\r')
}

/// Rule 4: `[ws][+-]digits[ws]`, not -1, in `i64`, and printed the same way by
/// stripe-python (exact integer) and stripe-node (shortest `f64` round trip).
fn parse_timestamp(bytes: &[u8]) -> Option<i64> {
    let start = bytes.iter().position(|&b| !is_sdk_whitespace(b))?;
    let end = bytes.iter().rposition(|&b| !is_sdk_whitespace(b))? + 1;
    let mut digits = &bytes[start..end];
    let negative = match digits.first() {
        Some(b'-') => {
            digits = &digits[1..];
            true
        }
        Some(b'+') => {
            digits = &digits[1..];
            false
        }
        _ => false,
    };
    if digits.is_empty() {
        return None;
    }
    let mut magnitude: u64 = 0;
    for &d in digits {
        if !d.is_ascii_digit() {
            return None;
        }
        magnitude = magnitude
            .checked_mul(10)?
            .checked_add(u64::from(d - b'0'))?;
    }
    let n = if negative {
        0i64.checked_sub_unsigned(magnitude)?
    } else {
        i64::try_from(magnitude).ok()?
    };
    if n == -1 {
        return None;
    }
    if n.unsigned_abs() > (1u64 << 53) && !same_in_both_sdks(n) {
        return None;
    }
    Some(n)
}

/// For `|n| > 2^53`: is `n` an exact `f64` whose shortest round-trip decimal
/// (what JavaScript prints) is `n`'s own digits (what Python prints)?
#[allow(clippy::cast_precision_loss, clippy::cast_possible_truncation)]
fn same_in_both_sdks(n: i64) -> bool {
    let as_float = n as f64;
    // `as i128` of an f64 below 2^127 is exact when the f64 is an integer.
    if as_float as i128 != i128::from(n) {
        return false;
    }
    // Rust's `Display` for f64 prints the shortest round-trip digits padded
    // with zeros, like JavaScript's `Number#toString` below 1e21.
    format!("{as_float}") == n.to_string()
}

/// Rule 9, overflow-safe.
fn check_age(
    signed: i64,
    now: i64,
    tolerance: Duration,
    max_future_skew: Option<Duration>,
) -> Result<(), VerifyError> {
    let age = i128::from(now) - i128::from(signed);
    if tolerance.is_positive() && age * 1_000_000_000 > tolerance.whole_nanoseconds() {
        return Err(VerifyError::TimestampExpired {
            age_seconds: saturate(age),
            tolerance_seconds: tolerance.whole_seconds(),
        });
    }
    if let Some(skew) = max_future_skew {
        let ahead = -age;
        if ahead * 1_000_000_000 > skew.whole_nanoseconds().max(0) {
            return Err(VerifyError::TimestampInFuture {
                ahead_seconds: saturate(ahead),
            });
        }
    }
    Ok(())
}

fn saturate(v: i128) -> i64 {
    i64::try_from(v).unwrap_or(if v < 0 { i64::MIN } else { i64::MAX })
}

/// Plain digits without a leading zero (or exactly `0`): already canonical.
fn is_canonical_digits(text: &[u8]) -> bool {
    !text.is_empty() && text.iter().all(u8::is_ascii_digit) && (text[0] != b'0' || text.len() == 1)
}

/// Formats `n` into `buf` without allocating; returns the digits.
fn format_i64(n: i64, buf: &mut [u8; 20]) -> &[u8] {
    let mut pos = buf.len();
    let mut magnitude = n.unsigned_abs();
    loop {
        pos -= 1;
        // `magnitude % 10` is below 10, so the cast is lossless.
        #[allow(clippy::cast_possible_truncation)]
        let digit = (magnitude % 10) as u8;
        buf[pos] = b'0' + digit;
        magnitude /= 10;
        if magnitude == 0 {
            break;
        }
    }
    if n < 0 {
        pos -= 1;
        buf[pos] = b'-';
    }
    &buf[pos..]
}

fn hex_lower(bytes: &[u8]) -> [u8; 64] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = [0u8; 64];
    for (i, b) in bytes.iter().take(32).enumerate() {
        out[2 * i] = HEX[usize::from(b >> 4)];
        out[2 * i + 1] = HEX[usize::from(b & 0x0f)];
    }
    out
}

/// The lower-case hex of a MAC as eight words, so the constant-time compare
/// runs over 8 words instead of 64 bytes.
fn hex_words(tag: &[u8]) -> [u64; 8] {
    let hex = hex_lower(tag);
    let mut words = [0u64; 8];
    for (word, chunk) in words.iter_mut().zip(hex.chunks_exact(8)) {
        let mut bytes = [0u8; 8];
        bytes.copy_from_slice(chunk);
        *word = u64::from_ne_bytes(bytes);
    }
    words
}

/// A 64-character `v1` value as eight words (byte-for-byte, no decoding), or
/// `None` when it has another length.
fn hex_text_words(text: &[u8]) -> Option<[u64; 8]> {
    if text.len() != 64 {
        return None;
    }
    let mut words = [0u64; 8];
    for (word, chunk) in words.iter_mut().zip(text.chunks_exact(8)) {
        let mut bytes = [0u8; 8];
        bytes.copy_from_slice(chunk);
        *word = u64::from_ne_bytes(bytes);
    }
    Some(words)
}

#[cfg(test)]
mod tests {
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

    #[test]
    fn timestamp_rules() {
        assert_eq!(
            parse_timestamp("1700000000".as_bytes()),
            Some(1_700_000_000)
        );
        assert_eq!(
            parse_timestamp(" 1700000000 ".as_bytes()),
            Some(1_700_000_000)
        );
        assert_eq!(parse_timestamp("+17".as_bytes()), Some(17));
        assert_eq!(parse_timestamp("0017".as_bytes()), Some(17));
        assert_eq!(parse_timestamp("-5".as_bytes()), Some(-5));
        assert_eq!(parse_timestamp("-0".as_bytes()), Some(0));
        assert_eq!(parse_timestamp("-1".as_bytes()), None);
        assert_eq!(parse_timestamp("".as_bytes()), None);
        assert_eq!(parse_timestamp("+".as_bytes()), None);
        assert_eq!(parse_timestamp("1_000".as_bytes()), None);
        assert_eq!(parse_timestamp("17abc".as_bytes()), None);
        assert_eq!(parse_timestamp("1 7".as_bytes()), None);
        assert_eq!(parse_timestamp("\u{a0}17".as_bytes()), None);
        assert_eq!(parse_timestamp("99999999999999999999".as_bytes()), None);
        assert_eq!(parse_timestamp("9".repeat(60).as_bytes()), None);
        // 2^53 and 2^53 + 2 are fine; 2^53 + 1 is not an f64.
        assert_eq!(
            parse_timestamp("9007199254740992".as_bytes()),
            Some(1 << 53)
        );
        assert_eq!(parse_timestamp("9007199254740993".as_bytes()), None);
        assert_eq!(
            parse_timestamp("9007199254740994".as_bytes()),
            Some((1 << 53) + 2)
        );
        // 2^60 is an exact f64, but JavaScript prints 1152921504606847000.
        assert_eq!(parse_timestamp("1152921504606846976".as_bytes()), None);
        // 10^18 is exact and printed the same by both.
        assert_eq!(
            parse_timestamp("1000000000000000000".as_bytes()),
            Some(1_000_000_000_000_000_000)
        );
        assert_eq!(parse_timestamp("9223372036854775807".as_bytes()), None);
        assert_eq!(parse_timestamp("-9223372036854775808".as_bytes()), None);
    }

    #[test]
    fn age_is_overflow_safe() {
        let tol = Duration::seconds(300);
        assert!(check_age(i64::MIN, i64::MAX, tol, None).is_err());
        assert!(check_age(i64::MAX, i64::MIN, tol, None).is_ok());
        assert!(check_age(i64::MAX, i64::MIN, tol, Some(Duration::ZERO)).is_err());
        assert!(check_age(i64::MIN, i64::MAX, Duration::ZERO, None).is_ok());
        assert!(check_age(i64::MIN, i64::MAX, Duration::MIN, None).is_ok());
        assert!(check_age(0, 300, tol, None).is_ok());
        assert!(check_age(0, 301, tol, None).is_err());
        // Sub-second tolerances still count.
        assert!(check_age(0, 1, Duration::milliseconds(500), None).is_err());
        assert!(check_age(0, 0, Duration::milliseconds(500), None).is_ok());
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
        let v = Verifier::new(s.clone()).max_body_bytes(4);
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
