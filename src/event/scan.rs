//! A structural scan of a verified event body: the envelope's fields are read
//! strictly, and `data.object` is only delimited.
//!
//! Delimiting `data.object` follows strings (a `"` inside a string, escaped
//! or not, never ends the object) and counts brackets against
//! [`MAX_NESTING`], but does not check the JSON grammar inside it: that is
//! done once, lazily, by the first view that types the object or by
//! [`Event::validate_object`](super::Event::validate_object). Everything else
//! — the envelope's own members, `data.previous_attributes`, members this
//! crate does not read — is checked as strictly as `serde_json` checks it
//! (the small or unknown values are handed to `serde_json` itself).

use std::borrow::Cow;

use serde::de::IgnoredAny;

use super::envelope::{EventRequest, MAX_NESTING, ParseError, RelatedObject, RequestField};

/// The envelope as found in the body. Strings are decoded; the object and
/// the previous attributes are slices of the body (`null` is `None`).
#[derive(Default)]
pub(super) struct Scanned<'a> {
    pub id: Option<Cow<'a, str>>,
    pub object: Option<Cow<'a, str>>,
    pub event_type: Option<Cow<'a, str>>,
    pub created: Option<i64>,
    pub livemode: Option<bool>,
    pub api_version: Option<Cow<'a, str>>,
    pub account: Option<Cow<'a, str>>,
    pub context: Option<Cow<'a, str>>,
    pub request: Option<EventRequest>,
    pub data_object: Option<&'a str>,
    pub previous_attributes: Option<&'a str>,
    pub related_object: Option<RelatedObject>,
}

/// The envelope member `key` as its bit in the "seen" set (a second one is
/// an error), or `None` for members this crate does not read.
fn envelope_bit(key: &str) -> Option<u16> {
    Some(match key {
        "id" => 1,
        "object" => 1 << 1,
        "type" => 1 << 2,
        "created" => 1 << 3,
        "livemode" => 1 << 4,
        "api_version" => 1 << 5,
        "account" => 1 << 6,
        "context" => 1 << 7,
        "request" => 1 << 8,
        "data" => 1 << 9,
        "related_object" => 1 << 10,
        _ => return None,
    })
}

/// Scans `text` (a whole body, already known to be UTF-8).
pub(super) fn scan(text: &str) -> Result<Scanned<'_>, ParseError> {
    let mut s = Scanner {
        text,
        bytes: text.as_bytes(),
        pos: 0,
    };
    let mut out = Scanned::default();
    s.skip_ws();
    s.expect(b'{', "expected value")?;
    let mut seen = 0u16;
    s.members(|s, key| {
        let Some(bit) = envelope_bit(key) else {
            return s.validated_value(1).map(drop);
        };
        if seen & bit != 0 {
            return Err(shape(format!("duplicate field `{key}`")));
        }
        seen |= bit;
        match key {
            "id" => out.id = Some(s.string_value(key)?),
            "object" => out.object = s.opt_string_value(key)?,
            "type" => out.event_type = Some(s.string_value(key)?),
            "created" => out.created = Some(s.created()?),
            "livemode" => out.livemode = s.opt_bool_value(key)?,
            "api_version" => out.api_version = s.opt_string_value(key)?,
            "account" => out.account = s.opt_string_value(key)?,
            "context" => out.context = s.opt_string_value(key)?,
            "request" => out.request = s.decoded_value::<RequestField>()?.0,
            "related_object" => out.related_object = s.decoded_value()?,
            _ => s.data(&mut out)?,
        }
        Ok(())
    })?;
    s.skip_ws();
    if s.pos != s.bytes.len() {
        return Err(s.syntax_at(s.pos, "trailing characters"));
    }
    Ok(out)
}

/// Reads an envelope value handed to `serde_json` as `T`.
fn decode<T: serde::de::DeserializeOwned>(raw: &str) -> Result<T, ParseError> {
    serde_json::from_str(raw).map_err(|e| ParseError::from_json("event", &e))
}

fn shape(reason: String) -> ParseError {
    ParseError::Shape {
        what: "event",
        reason,
    }
}

struct Scanner<'a> {
    text: &'a str,
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Scanner<'a> {
    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.pos).copied()
    }

    /// JSON whitespace (space, tab, line feed, carriage return).
    fn skip_ws(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.peek() {
            self.pos += 1;
        }
    }

    fn syntax_at(&self, index: usize, reason: &str) -> ParseError {
        let (line, column) = super::envelope::position(self.bytes, index);
        ParseError::Syntax {
            line,
            column,
            reason: reason.to_owned(),
        }
    }

    fn eof(&self) -> ParseError {
        self.syntax_at(self.bytes.len(), "EOF while parsing a value")
    }

    fn expect(&mut self, byte: u8, reason: &str) -> Result<(), ParseError> {
        match self.peek() {
            Some(b) if b == byte => {
                self.pos += 1;
                Ok(())
            }
            Some(_) => Err(self.syntax_at(self.pos, reason)),
            None => Err(self.eof()),
        }
    }

    /// The members of an object whose `{` was just read: `each` is called
    /// with the decoded key, positioned before the value, and must read the
    /// value.
    fn members(
        &mut self,
        mut each: impl FnMut(&mut Self, &str) -> Result<(), ParseError>,
    ) -> Result<(), ParseError> {
        self.skip_ws();
        if self.peek() == Some(b'}') {
            self.pos += 1;
            return Ok(());
        }
        loop {
            self.skip_ws();
            match self.peek() {
                Some(b'"') => {}
                Some(_) => return Err(self.syntax_at(self.pos, "key must be a string")),
                None => return Err(self.eof()),
            }
            let key = self.string()?;
            self.skip_ws();
            self.expect(b':', "expected `:`")?;
            self.skip_ws();
            each(self, &key)?;
            self.skip_ws();
            match self.peek() {
                Some(b',') => self.pos += 1,
                Some(b'}') => {
                    self.pos += 1;
                    return Ok(());
                }
                Some(_) => {
                    return Err(self.syntax_at(self.pos, "expected `,` or `}`"));
                }
                None => return Err(self.eof()),
            }
        }
    }

    /// A string at `pos` (on its opening quote), decoded. Strings without
    /// escapes are borrowed from the body; others go through `serde_json`.
    fn string(&mut self) -> Result<Cow<'a, str>, ParseError> {
        let start = self.pos;
        let i = find_string_stop(self.bytes, start + 1, true).ok_or_else(|| self.eof())?;
        match self.bytes[i] {
            b'"' => {
                self.pos = i + 1;
                return Ok(Cow::Borrowed(&self.text[start + 1..i]));
            }
            b'\\' => {}
            _ => {
                return Err(self.syntax_at(
                    i,
                    "control character (\\u0000-\\u001F) found while parsing a string",
                ));
            }
        }
        let end = end_of_string(self.bytes, start + 1).ok_or_else(|| self.eof())?;
        self.pos = end;
        let raw = &self.text[start..end];
        let decoded: String = serde_json::from_str(raw).map_err(|e| self.relocate(&e, start))?;
        Ok(Cow::Owned(decoded))
    }

    /// A `serde_json` error about the value at `start` as an error about
    /// the body (its position counted in the body).
    fn relocate(&self, e: &serde_json::Error, start: usize) -> ParseError {
        match ParseError::from_json("event", e) {
            ParseError::Syntax { reason, .. } => {
                let at = start + offset_of(&self.text[start..], e.line(), e.column());
                let (line, column) = super::envelope::position(self.bytes, at);
                ParseError::Syntax {
                    line,
                    column,
                    reason,
                }
            }
            other => other,
        }
    }

    fn type_error(&self, key: &str, expected: &str) -> ParseError {
        let _ = self;
        shape(format!("invalid type for `{key}`, expected {expected}"))
    }

    fn string_value(&mut self, key: &str) -> Result<Cow<'a, str>, ParseError> {
        match self.peek() {
            Some(b'"') => self.string(),
            Some(_) => {
                self.validated_value(1)?;
                Err(self.type_error(key, "a string"))
            }
            None => Err(self.eof()),
        }
    }

    fn null(&mut self) -> Result<bool, ParseError> {
        if self.bytes[self.pos..].starts_with(b"null") {
            self.pos += 4;
            self.check_literal_end()?;
            return Ok(true);
        }
        Ok(false)
    }

    fn check_literal_end(&self) -> Result<(), ParseError> {
        match self.peek() {
            None | Some(b' ' | b'\t' | b'\n' | b'\r' | b',' | b'}' | b']') => Ok(()),
            Some(_) => Err(self.syntax_at(self.pos, "expected `,` or `}`")),
        }
    }

    fn opt_string_value(&mut self, key: &str) -> Result<Option<Cow<'a, str>>, ParseError> {
        if self.null()? {
            return Ok(None);
        }
        self.string_value(key).map(Some)
    }

    fn opt_bool_value(&mut self, key: &str) -> Result<Option<bool>, ParseError> {
        for (word, value) in [("null", None), ("true", Some(true)), ("false", Some(false))] {
            if self.bytes[self.pos..].starts_with(word.as_bytes()) {
                self.pos += word.len();
                self.check_literal_end()?;
                return Ok(value);
            }
        }
        self.validated_value(1)?;
        Err(self.type_error(key, "a boolean"))
    }

    /// `created`: Unix seconds, or an RFC 3339 string (thin events).
    fn created(&mut self) -> Result<i64, ParseError> {
        let start = self.pos;
        let digits = self.bytes[start..]
            .iter()
            .take_while(|b| b.is_ascii_digit())
            .count();
        // The common case: 1 to 18 digits, no sign, no fraction, no leading
        // zero (which JSON forbids).
        if (1..=18).contains(&digits) && !(digits > 1 && self.bytes[start] == b'0') {
            let end = start + digits;
            if !matches!(self.bytes.get(end), Some(b'.' | b'e' | b'E')) {
                let value = self.bytes[start..end]
                    .iter()
                    .fold(0i64, |n, &d| n * 10 + i64::from(d - b'0'));
                self.pos = end;
                self.check_literal_end()?;
                return Ok(value);
            }
        }
        let raw = self.validated_value(1)?;
        let created: super::envelope::Created = decode(raw)?;
        Ok(created.0)
    }

    /// `data`: `object` and `previous_attributes`; other members are checked
    /// and skipped.
    fn data(&mut self, out: &mut Scanned<'a>) -> Result<(), ParseError> {
        if self.null()? {
            return Ok(());
        }
        match self.peek() {
            Some(b'{') => self.pos += 1,
            Some(_) => {
                // Not an object: it holds no `object` member.
                self.validated_value(1)?;
                return Ok(());
            }
            None => return Err(self.eof()),
        }
        let mut seen = [false; 2];
        self.members(|s, key| {
            let index = match key {
                "object" => 0,
                "previous_attributes" => 1,
                _ => return s.validated_value(2).map(drop),
            };
            if std::mem::replace(&mut seen[index], true) {
                return Err(shape(format!("duplicate field `{key}`")));
            }
            let raw = if index == 0 && s.peek() == Some(b'{') {
                // The object is only delimited here: it is checked once,
                // when first typed.
                s.delimited_value(2)?
            } else {
                s.validated_value(2)?
            };
            let raw = (raw != "null").then_some(raw);
            if index == 0 {
                out.data_object = raw;
            } else {
                out.previous_attributes = raw;
            }
            Ok(())
        })
    }

    /// An envelope value at `pos` read by `serde_json` as `T` in one pass
    /// (reading checks it). When reading fails, the value is checked again
    /// by [`Scanner::validated_value`] first, so a syntax error wins over a
    /// shape error and is reported at its position in the body, as for
    /// every other envelope value.
    fn decoded_value<T: serde::de::DeserializeOwned>(&mut self) -> Result<T, ParseError> {
        let start = self.pos;
        let raw = self.delimited_value(1)?;
        serde_json::from_str::<T>(raw).or_else(|e| {
            self.pos = start;
            self.validated_value(1)?;
            Err(ParseError::from_json("event", &e))
        })
    }

    /// A value at `pos`, member of a container at nesting `depth`, checked
    /// by `serde_json`; returns its text.
    fn validated_value(&mut self, depth: usize) -> Result<&'a str, ParseError> {
        let start = self.pos;
        let raw = self.delimited_value(depth)?;
        if let Err(e) = serde_json::from_str::<IgnoredAny>(raw) {
            // A cut-short literal (`tru`) is an EOF to serde_json on its own;
            // with the delimiter after it, the error names the real problem.
            let e = match self.text.get(start..=self.pos) {
                Some(longer) if e.is_eof() => serde_json::from_str::<IgnoredAny>(longer)
                    .err()
                    .filter(|longer| !longer.is_eof() && longer.column() <= raw.len() + 1)
                    .unwrap_or(e),
                _ => e,
            };
            return Err(self.relocate(&e, start));
        }
        Ok(raw)
    }

    /// A value at `pos`, member of a container at nesting `depth`: its
    /// extent, following strings and counting brackets (nesting above
    /// [`MAX_NESTING`] in all is refused), without checking the grammar
    /// inside it.
    fn delimited_value(&mut self, depth: usize) -> Result<&'a str, ParseError> {
        let start = self.pos;
        let end = match self.peek() {
            None => return Err(self.eof()),
            Some(b'{' | b'[') => self.container_end(start, depth)?,
            Some(b'"') => end_of_string(self.bytes, start + 1).ok_or_else(|| self.eof())?,
            Some(_) => {
                // A number or a literal: up to the next delimiter.
                start
                    + self.bytes[start..]
                        .iter()
                        .position(|b| {
                            matches!(b, b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r')
                        })
                        .unwrap_or(self.bytes.len() - start)
            }
        };
        self.pos = end;
        Ok(&self.text[start..end])
    }

    /// The end (one past the closing bracket) of the container opening at
    /// `start`, inside a container at nesting `depth`.
    fn container_end(&self, start: usize, depth: usize) -> Result<usize, ParseError> {
        let bytes = self.bytes;
        let mut level = depth;
        let mut i = start;
        while let Some(&b) = bytes.get(i) {
            if !STRUCTURAL[usize::from(b)] {
                i += 1;
                continue;
            }
            match b {
                b'"' => {
                    i = end_of_string(bytes, i + 1).ok_or_else(|| self.eof())?;
                    continue;
                }
                b'{' | b'[' => {
                    level += 1;
                    if level > MAX_NESTING {
                        return Err(self.syntax_at(i, "recursion limit exceeded"));
                    }
                }
                b'}' | b']' => {
                    level -= 1;
                    if level == depth {
                        return Ok(i + 1);
                    }
                }
                _ => {}
            }
            i += 1;
        }
        Err(self.eof())
    }
}

/// Bytes the delimiting loop stops at: `"`, `{`, `[`, `}`, `]`.
const STRUCTURAL: [bool; 256] = {
    let mut table = [false; 256];
    table[b'"' as usize] = true;
    table[b'{' as usize] = true;
    table[b'[' as usize] = true;
    table[b'}' as usize] = true;
    table[b']' as usize] = true;
    table
};

/// One past the closing quote of the string whose content starts at `from`
/// (escapes followed), or `None` when the input ends first.
fn end_of_string(bytes: &[u8], from: usize) -> Option<usize> {
    let mut i = from;
    loop {
        i = find_string_stop(bytes, i, false)?;
        if bytes[i] == b'"' {
            return Some(i + 1);
        }
        i += 2;
    }
}

const ONES: u64 = 0x0101_0101_0101_0101;
const HIGHS: u64 = 0x8080_8080_8080_8080;

/// Where `word` holds `byte`: the lowest set high bit marks the first such
/// byte exactly (higher marks may be false).
#[inline]
fn bytes_equal(word: u64, byte: u8) -> u64 {
    let x = word ^ (ONES * u64::from(byte));
    x.wrapping_sub(ONES) & !x & HIGHS
}

/// The index of the first `"` or `\` at or after `from` (and, with
/// `control`, of the first byte below 0x20), eight bytes at a time.
#[inline]
fn find_string_stop(bytes: &[u8], from: usize, control: bool) -> Option<usize> {
    let mut i = from;
    while let Some(chunk) = bytes.get(i..i + 8) {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        let word = u64::from_le_bytes(word);
        let mut stops = bytes_equal(word, b'"') | bytes_equal(word, b'\\');
        if control {
            stops |= word.wrapping_sub(ONES * 0x20) & !word & HIGHS;
        }
        if stops != 0 {
            return Some(i + (stops.trailing_zeros() / 8) as usize);
        }
        i += 8;
    }
    let rest = bytes.get(i..)?;
    rest.iter()
        .position(|&b| b == b'"' || b == b'\\' || (control && b < 0x20))
        .map(|p| i + p)
}

/// The byte offset in `text` of 1-based `line` and `column` (as `serde_json`
/// reports them; column 0 means before the line's first character).
fn offset_of(text: &str, line: usize, column: usize) -> usize {
    let line_start = if line <= 1 {
        0
    } else {
        text.match_indices('\n')
            .nth(line - 2)
            .map_or(text.len(), |(i, _)| i + 1)
    };
    (line_start + column.saturating_sub(1)).min(text.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scanned(json: &str) -> Result<Scanned<'_>, ParseError> {
        scan(json)
    }

    #[test]
    fn reads_the_envelope_and_delimits_the_object() {
        let json = r#" {"id":"evt_1","type":"x","created":17,"livemode":true,"pending_webhooks":1,
            "data":{"object":{"s":"a\"}{","n":[1,{"b":2}]},"previous_attributes":null}} "#;
        let s = scanned(json).unwrap();
        assert_eq!(s.id.as_deref(), Some("evt_1"));
        assert_eq!(s.created, Some(17));
        assert_eq!(s.livemode, Some(true));
        assert_eq!(s.data_object, Some(r#"{"s":"a\"}{","n":[1,{"b":2}]}"#));
        assert_eq!(s.previous_attributes, None);
    }

    #[test]
    fn delimiting_finds_every_bracket_at_any_offset() {
        // Brackets, quotes and escapes at every position of an eight-byte
        // word, inside and outside strings, and a control byte outside
        // strings (delimiting does not check the grammar).
        let parts = [
            r#"[1,[2,{"a":[]}]]"#,
            r#""x]}\"{[""#,
            r#"{"k\\":"v\\\"]"}"#,
            "\"\\u0002\"",
            "[\u{2}]",
            "\"é]}\"",
        ];
        for pad in 0..17 {
            for part in parts {
                let object = format!(r#"{{"p":"{}","v":{part},"w":[{{}}]}}"#, "y".repeat(pad));
                let json =
                    format!(r#"{{"id":"e","type":"x","created":1,"data":{{"object":{object}}}}}"#);
                let s = scanned(&json).unwrap_or_else(|e| panic!("{json}: {e}"));
                assert_eq!(s.data_object, Some(object.as_str()), "{json}");
            }
        }
        // Unbalanced: an unclosed bracket inside the object runs to EOF.
        let err = scanned(r#"{"id":"e","type":"x","created":1,"data":{"object":{"a":[}}"#)
            .err()
            .map(|e| e.to_string());
        assert!(err.is_some_and(|e| e.contains("EOF")));
    }

    #[test]
    fn request_is_read_in_one_pass_with_the_same_errors() {
        let with = |request: &str| {
            scanned_owned(&format!(
                r#"{{"id":"e","type":"x","created":1,"request":{request}}}"#
            ))
        };
        let ok = with(r#"{"id":"req_1","idempotency_key":null}"#).unwrap();
        assert_eq!(ok.as_deref(), Some("req_1"));
        assert_eq!(with(r#""req_2""#).unwrap().as_deref(), Some("req_2"));
        assert_eq!(with("null").unwrap(), None);
        // A syntax error after a shape error is still the syntax error, at
        // its position in the body.
        let json = r#"{"id":"e","type":"x","created":1,"request":{"id":5,}}"#;
        let whole = serde_json::from_str::<IgnoredAny>(json).unwrap_err();
        match scan(json).err() {
            Some(ParseError::Syntax { line, column, .. }) => {
                assert_eq!((line, column), (whole.line(), whole.column()));
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            with(r#"{"id":5}"#),
            Err(ParseError::Shape { what: "event", .. })
        ));
    }

    fn scanned_owned(json: &str) -> Result<Option<String>, ParseError> {
        scan(json).map(|s| s.request.and_then(|r| r.id))
    }

    #[test]
    fn escaped_keys_and_values_are_decoded() {
        let s = scanned(r#"{"i\u0064":"evt_\u0031","type":"x","created":1}"#).unwrap();
        assert_eq!(s.id.as_deref(), Some("evt_1"));
    }

    #[test]
    fn the_object_is_delimited_not_checked() {
        // Well delimited, not JSON inside: found here, refused when typed.
        let s =
            scanned(r#"{"id":"e","type":"x","created":1,"data":{"object":{"a" 1 2}}}"#).unwrap();
        assert_eq!(s.data_object, Some(r#"{"a" 1 2}"#));
    }

    #[test]
    fn everything_outside_the_object_is_checked() {
        for (json, reason) in [
            (
                r#"{"id":"e","type":"x","created":1,"extra":[1,]}"#,
                "expected value",
            ),
            (
                r#"{"id":"e","type":"x","created":1,"extra":01}"#,
                "invalid number",
            ),
            (
                r#"{"id":"e","type":"x","created":1} x"#,
                "trailing characters",
            ),
            (
                "{\"id\":\"e\u{1}\",\"type\":\"x\",\"created\":1}",
                "control character",
            ),
            (
                r#"{"id":"e","type":"x","created":1,"livemode":tru}"#,
                "expected",
            ),
            (
                r#"{"id":"e","type":"x","created":1,"data":{"previous_attributes":{"a":}}}"#,
                "expected value",
            ),
            (
                r#"{"id":"e","type":"x","created":1,"data":{"object":{"a":"b}}}"#,
                "EOF",
            ),
        ] {
            let err = scanned(json)
                .err()
                .unwrap_or_else(|| panic!("{json} accepted"));
            assert!(err.to_string().contains(reason), "{json}: {err}");
        }
    }

    #[test]
    fn positions_are_counted_in_the_body() {
        // Where serde_json, reading the whole body, puts the same error.
        for json in [
            "{\"id\":\"e\",\n\"type\":\"x\",\"created\":1,\"x\":[1,]}",
            "{\"id\":\"e\",\n\"type\":\"x\",\n  \"created\":1,\"x\":{\n\"a\":\n  01}}",
            "{\"id\":\"e\\q\",\"type\":\"x\",\"created\":1}",
        ] {
            let whole = serde_json::from_str::<IgnoredAny>(json).unwrap_err();
            let Err(ParseError::Syntax { line, column, .. }) = scanned(json) else {
                panic!("not a syntax error: {json}")
            };
            assert_eq!((line, column), (whole.line(), whole.column()), "{json}");
        }
    }

    #[test]
    fn created_reads_seconds_and_dates() {
        let created = |v: &str| {
            scanned(&format!(r#"{{"id":"e","type":"x","created":{v}}}"#)).map(|s| s.created)
        };
        assert_eq!(created("0").unwrap(), Some(0));
        assert_eq!(created("1700000000").unwrap(), Some(1_700_000_000));
        assert_eq!(created("-5").unwrap(), Some(-5));
        assert_eq!(created(r#""1970-01-01T00:00:10Z""#).unwrap(), Some(10));
        assert_eq!(created("9223372036854775807").unwrap(), Some(i64::MAX));
        assert!(created("9223372036854775808").is_err());
        assert!(created("1.5").is_err());
        assert!(created("1e3").is_err());
        assert!(created("012").is_err());
        assert!(created("12x").is_err());
    }
}
