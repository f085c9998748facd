//! Reading the `Stripe-Signature` header and its `t` value exactly as each
//! of Stripe's SDKs does, and the hex helpers of the comparison.

use std::fmt;

use hmac::Mac;
use time::Duration;

use super::{HmacSha256, VerifyError};

pub(super) const INLINE_V1: usize = 4;

pub(super) struct ParsedHeader<'h> {
    /// The first `t`, as stripe-python reads it.
    pub(super) python: PyInt<'h>,
    /// The last `t`, as stripe-node reads it (`NaN` included).
    pub(super) node: f64,
    /// stripe-node's signed text for `t`, when it differs from stripe-python's.
    pub(super) node_text: Option<StackText>,
    pub(super) v1: [&'h [u8]; INLINE_V1],
    pub(super) v1_count: usize,
}

impl<'h> ParsedHeader<'h> {
    /// Every `v1` value in header order, without allocating.
    pub(super) fn signatures(&self, header: &'h str) -> impl Iterator<Item = &'h [u8]> + '_ {
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
pub(super) fn items(header: &str) -> Items<'_> {
    Items {
        rest: Some(header.as_bytes()),
    }
}

/// Iterator behind [`items`]. It finds delimiters eight bytes at a time: a
/// header is mostly 64-character hex signatures, and a byte-by-byte scan of
/// them costs more than everything else in `verify` except the HMAC.
pub(super) struct Items<'h> {
    pub(super) rest: Option<&'h [u8]>,
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
pub(super) enum DelimiterSet {
    Comma,
    CommaOrEquals,
}

/// Index of the first `,` (or `=`) in `bytes`, eight bytes at a time.
pub(super) fn find_delimiter(bytes: &[u8], set: DelimiterSet) -> Option<usize> {
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

/// Rules 3–5 in one pass, without allocating on the usual header.
pub(super) fn parse_header(header: &str) -> Result<ParsedHeader<'_>, VerifyError> {
    let mut first_t: Option<&[u8]> = None;
    let mut last_t: &[u8] = &[];
    let mut v1: [&[u8]; INLINE_V1] = [&[]; INLINE_V1];
    let mut v1_count = 0usize;
    for (key, value) in items(header) {
        match (key, value) {
            (b"t" | b"v1", None) => return Err(VerifyError::MalformedHeader),
            (b"t", Some(v)) => {
                first_t.get_or_insert(v);
                last_t = v;
            }
            (b"v1", Some(v)) => {
                if v.is_empty() || utf16_len(v) == 64 && !v.is_ascii() {
                    // stripe-node's compare throws on these wherever they are.
                    return Err(VerifyError::MalformedHeader);
                }
                if let Some(slot) = v1.get_mut(v1_count) {
                    *slot = v;
                }
                v1_count += 1;
            }
            _ => {}
        }
    }
    let Some(first_t) = first_t else {
        return Err(VerifyError::MalformedHeader);
    };
    let python = PyInt::parse(first_t).ok_or(VerifyError::MalformedHeader)?;
    let simple = first_t == last_t && is_canonical_digits(first_t) && first_t.len() <= 15;
    let (node, node_text) = if simple {
        // Below 10^15 every integer is an exact `f64` printed as its digits,
        // so stripe-node signs the same text as stripe-python.
        #[allow(clippy::cast_precision_loss)]
        (python.clamped() as f64, None)
    } else {
        let node = node_parse_int(last_t);
        #[allow(clippy::float_cmp)] // stripe-node tests `timestamp === -1`
        if node == -1.0 {
            return Err(VerifyError::MalformedHeader);
        }
        let text = node_number_text(node).ok_or(VerifyError::MalformedHeader)?;
        let same = python.canonical_bytes().eq(text.as_bytes().iter().copied());
        (node, (!same).then_some(text))
    };
    if v1_count == 0 {
        return Err(VerifyError::NoV1Signature);
    }
    Ok(ParsedHeader {
        python,
        node,
        node_text,
        v1,
        v1_count,
    })
}

/// A `v1` value's length in UTF-16 code units (what JavaScript's `length`
/// counts): one per character, two for characters outside the BMP.
pub(super) fn utf16_len(text: &[u8]) -> usize {
    text.iter()
        .map(|&b| match b {
            0x80..=0xBF => 0, // continuation byte
            0xF0..=0xFF => 2, // starts a four-byte character
            _ => 1,
        })
        .sum()
}

/// Whitespace both SDKs ignore in a secret: ASCII space, tab, line feed,
/// vertical tab, form feed, carriage return.
pub(super) fn is_sdk_whitespace(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | 0x0b | 0x0c | b'\r')
}

/// Whitespace both Python's `int()` and JavaScript's `parseInt` skip: ASCII
/// tab to carriage return and space, U+00A0, U+1680, U+2000–U+200A, U+2028,
/// U+2029, U+202F, U+205F and U+3000.
fn is_shared_space(c: char) -> bool {
    matches!(
        c,
        '\t'..='\r'
            | ' '
            | '\u{a0}'
            | '\u{1680}'
            | '\u{2000}'..='\u{200a}'
            | '\u{2028}'
            | '\u{2029}'
            | '\u{202f}'
            | '\u{205f}'
            | '\u{3000}'
    )
}

/// Whitespace Python's `int()` strips around a number: the shared set and
/// U+0085 (not U+FEFF, not U+001C–U+001F).
pub(super) fn is_python_int_space(c: char) -> bool {
    is_shared_space(c) || c == '\u{85}'
}

/// Whitespace JavaScript's `parseInt` skips before a number: the shared set
/// and U+FEFF (not U+0085).
pub(super) fn is_node_space(c: char) -> bool {
    is_shared_space(c) || c == '\u{feff}'
}

/// The zero of every run of ten Unicode decimal digits (category `Nd`) that
/// Python's `int()` reads, in Unicode 14.0 (Python 3.11).
pub(super) const DECIMAL_ZEROS: [u32; 66] = [
    0x30, 0x660, 0x6F0, 0x7C0, 0x966, 0x9E6, 0xA66, 0xAE6, 0xB66, 0xBE6, 0xC66, 0xCE6, 0xD66,
    0xDE6, 0xE50, 0xED0, 0xF20, 0x1040, 0x1090, 0x17E0, 0x1810, 0x1946, 0x19D0, 0x1A80, 0x1A90,
    0x1B50, 0x1BB0, 0x1C40, 0x1C50, 0xA620, 0xA8D0, 0xA900, 0xA9D0, 0xA9F0, 0xAA50, 0xABF0, 0xFF10,
    0x104A0, 0x10D30, 0x11066, 0x110F0, 0x11136, 0x111D0, 0x112F0, 0x11450, 0x114D0, 0x11650,
    0x116C0, 0x11730, 0x118E0, 0x11950, 0x11C50, 0x11D50, 0x11DA0, 0x16A60, 0x16AC0, 0x16B50,
    0x1D7CE, 0x1D7D8, 0x1D7E2, 0x1D7EC, 0x1D7F6, 0x1E140, 0x1E2F0, 0x1E950, 0x1FBF0,
];

/// The value of a decimal digit as Python's `int()` reads it (any `Nd`).
pub(super) fn python_digit(c: char) -> Option<u8> {
    let code = u32::from(c);
    let run = DECIMAL_ZEROS.partition_point(|&zero| zero <= code);
    let zero = *DECIMAL_ZEROS.get(run.checked_sub(1)?)?;
    // Below 10, so the cast is lossless.
    #[allow(clippy::cast_possible_truncation)]
    (code - zero < 10).then_some((code - zero) as u8)
}

/// Python's `int()` refuses decimal strings with more digits than this.
pub(super) const PYTHON_MAX_DIGITS: usize = 4300;

/// An integer as stripe-python's `int(text)` reads it: the text between the
/// sign and the trailing whitespace, already checked.
#[derive(Clone, Copy)]
pub(super) struct PyInt<'h> {
    pub(super) negative: bool,
    /// Decimal digits (any `Nd`) with single `_` between them.
    pub(super) body: &'h str,
}

impl<'h> PyInt<'h> {
    /// `[ws][+-]digit[[_]digit]…[ws]`, at most 4300 digits.
    pub(super) fn parse(text: &'h [u8]) -> Option<Self> {
        let text = std::str::from_utf8(text)
            .ok()?
            .trim_matches(is_python_int_space);
        let (negative, body) = match text.as_bytes().first() {
            Some(b'-') => (true, &text[1..]),
            Some(b'+') => (false, &text[1..]),
            _ => (false, text),
        };
        let mut digits = 0usize;
        let mut after_digit = false;
        for c in body.chars() {
            if c == '_' && after_digit {
                after_digit = false;
            } else if python_digit(c).is_some() {
                after_digit = true;
                digits += 1;
            } else {
                return None;
            }
        }
        (after_digit && digits <= PYTHON_MAX_DIGITS).then_some(Self { negative, body })
    }

    /// The digits as ASCII, underscores dropped, leading zeros kept.
    pub(super) fn digits(self) -> impl Iterator<Item = u8> + 'h {
        self.body.chars().filter_map(python_digit).map(|d| b'0' + d)
    }

    /// What stripe-python signs: `"%d" % int(text)`.
    pub(super) fn canonical_bytes(self) -> impl Iterator<Item = u8> + 'h {
        let mut digits = self.digits().skip_while(|&d| d == b'0').peekable();
        let zero = digits.peek().is_none();
        let sign = (self.negative && !zero).then_some(b'-');
        sign.into_iter().chain(digits).chain(zero.then_some(b'0'))
    }

    /// The value, clamped to ±10^20 (beyond any `now` plus tolerance).
    pub(super) fn clamped(self) -> i128 {
        const LIMIT: i128 = 100_000_000_000_000_000_000;
        let magnitude = self
            .digits()
            .fold(0i128, |acc, d| (acc * 10 + i128::from(d - b'0')).min(LIMIT));
        if self.negative { -magnitude } else { magnitude }
    }

    /// Feeds the signed text into `mac` without allocating.
    pub(super) fn feed(self, mac: &mut HmacSha256) {
        if is_canonical_digits(self.body.as_bytes()) && !self.negative {
            mac.update(self.body.as_bytes());
            return;
        }
        let mut chunk = [0u8; 64];
        let mut len = 0;
        for b in self.canonical_bytes() {
            if len == chunk.len() {
                mac.update(&chunk);
                len = 0;
            }
            chunk[len] = b;
            len += 1;
        }
        mac.update(&chunk[..len]);
    }
}

/// JavaScript's `parseInt(text, 10)`: skip leading whitespace, an optional
/// sign, then the longest run of ASCII digits (the rest is ignored), rounded
/// to the nearest `f64`; `NaN` when there is no digit.
pub(super) fn node_parse_int(text: &[u8]) -> f64 {
    let Ok(text) = std::str::from_utf8(text) else {
        return f64::NAN;
    };
    let text = text.trim_start_matches(is_node_space);
    let (negative, rest) = match text.as_bytes().first() {
        Some(b'-') => (true, &text[1..]),
        Some(b'+') => (false, &text[1..]),
        _ => (false, text),
    };
    let end = rest
        .bytes()
        .position(|b| !b.is_ascii_digit())
        .unwrap_or(rest.len());
    // Rust parses decimal digits correctly rounded, as V8 does.
    let Ok(magnitude) = rest[..end].parse::<f64>() else {
        return f64::NAN;
    };
    if negative { -magnitude } else { magnitude }
}

/// A short text on the stack.
#[derive(Clone, Copy)]
pub(super) struct StackText {
    pub(super) buf: [u8; 32],
    pub(super) len: usize,
}

impl StackText {
    pub(super) fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl fmt::Write for StackText {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let end = self.len + s.len();
        self.buf
            .get_mut(self.len..end)
            .ok_or(fmt::Error)?
            .copy_from_slice(s.as_bytes());
        self.len = end;
        Ok(())
    }
}

/// JavaScript's `String(n)` for the integer-valued (or non-finite) `n` that
/// `parseInt` returns: `NaN`, `Infinity`, `-Infinity`, `0` for ±0, the
/// digits below 10^21 (shortest round-trip digits padded with zeros), and
/// `d.ddde+NN` from 10^21 on. `None` only if the text would not fit, which
/// no `f64` does.
pub(super) fn node_number_text(n: f64) -> Option<StackText> {
    use fmt::Write;
    let mut out = StackText {
        buf: [0; 32],
        len: 0,
    };
    let written = if n.is_nan() {
        out.write_str("NaN")
    } else if n.is_infinite() {
        out.write_str(if n > 0.0 { "Infinity" } else { "-Infinity" })
    } else if n == 0.0 {
        out.write_str("0")
    } else if n.abs() < 1e21 {
        // Rust prints the shortest round-trip digits padded with zeros.
        write!(out, "{n}")
    } else {
        // Rust writes `1.5e21`; JavaScript writes `1.5e+21`.
        write!(out, "{n:e}").and_then(|()| {
            let e = out
                .as_bytes()
                .iter()
                .position(|&b| b == b'e')
                .ok_or(fmt::Error)?;
            let len = out.len;
            if len + 1 > out.buf.len() {
                return Err(fmt::Error);
            }
            out.buf.copy_within(e + 1..len, e + 2);
            out.buf[e + 1] = b'+';
            out.len += 1;
            Ok(())
        })
    };
    written.ok().map(|()| out)
}

/// Rule 9, overflow-safe. `python` is stripe-python's timestamp (clamped),
/// `node` stripe-node's, `now_nanos` the current time in nanoseconds.
#[allow(clippy::cast_precision_loss, clippy::cast_possible_truncation)]
pub(super) fn check_age(
    python: i128,
    node: f64,
    now_nanos: i128,
    tolerance: Duration,
    max_future_skew: Option<Duration>,
) -> Result<(), VerifyError> {
    const NANOS: i128 = 1_000_000_000;
    let signed_nanos = python * NANOS;
    // JavaScript floors `receivedAt` to whole seconds.
    let now_seconds = now_nanos.div_euclid(NANOS);
    let node_age = now_seconds as f64 - node;
    if tolerance.is_positive()
        && (signed_nanos + tolerance.whole_nanoseconds() < now_nanos
            || node_age > tolerance.as_seconds_f64())
    {
        let python_age = saturate(now_seconds - python);
        return Err(VerifyError::TimestampExpired {
            age_seconds: python_age.max(node_age as i64),
            tolerance_seconds: tolerance.whole_seconds(),
        });
    }
    if let Some(skew) = max_future_skew {
        let skew_nanos = skew.whole_nanoseconds().max(0);
        let node_ahead = -node_age;
        if signed_nanos - now_nanos > skew_nanos || node_ahead > skew_nanos as f64 / 1e9 {
            let python_ahead = saturate(python - now_seconds);
            return Err(VerifyError::TimestampInFuture {
                ahead_seconds: python_ahead.max(node_ahead as i64),
            });
        }
    }
    Ok(())
}

pub(super) fn saturate(v: i128) -> i64 {
    i64::try_from(v).unwrap_or(if v < 0 { i64::MIN } else { i64::MAX })
}

/// Plain digits without a leading zero (or exactly `0`): already canonical.
pub(super) fn is_canonical_digits(text: &[u8]) -> bool {
    !text.is_empty() && text.iter().all(u8::is_ascii_digit) && (text[0] != b'0' || text.len() == 1)
}

/// Formats `n` into `buf` without allocating; returns the digits.
pub(super) fn format_i64(n: i64, buf: &mut [u8; 20]) -> &[u8] {
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

pub(super) fn hex_lower(bytes: &[u8]) -> [u8; 64] {
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
pub(super) fn hex_words(tag: &[u8]) -> [u64; 8] {
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
pub(super) fn hex_text_words(text: &[u8]) -> Option<[u64; 8]> {
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
