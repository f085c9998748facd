//! Runs a file of `Stripe-Signature` test vectors through [`Verifier`].
//!
//! ```text
//! cargo run --release --example verify_vectors -- tests/data/vectors/signatures.json
//! ```
//!
//! The file is a JSON array of cases `{name, payload | payload_b64, header
//! (string or null), secrets[], tolerance, now, expected}` where `expected` is
//! `"ok"` or an error kind (`signature_mismatch`, …). One JSON line is printed
//! per case, then `N passed, M failed`; the exit status is 1 if any failed.

use std::process::ExitCode;

use serde::Deserialize;
use stripe_webhook_guard::signature::Verifier;
use time::{Duration, OffsetDateTime};

/// One case of a vector file.
#[derive(Debug, Deserialize)]
pub struct Case {
    /// Case name.
    pub name: String,
    /// Body as text.
    #[serde(default)]
    pub payload: Option<String>,
    /// Body as standard base64, for bodies that are not UTF-8.
    #[serde(default)]
    pub payload_b64: Option<String>,
    /// The `Stripe-Signature` header, or null for an absent header.
    pub header: Option<String>,
    /// Secrets the endpoint is configured with.
    pub secrets: Vec<String>,
    /// Tolerance in seconds (0 disables the age check).
    pub tolerance: i64,
    /// The verifier's "now", in Unix seconds.
    pub now: i64,
    /// `"ok"` or an error kind.
    pub expected: String,
}

/// The verdict for one case.
#[derive(Debug)]
pub struct Verdict {
    /// Case name.
    pub name: String,
    /// What the file expects.
    pub expected: String,
    /// What the verifier said (`ok` or an error kind).
    pub got: String,
}

impl Verdict {
    /// Whether the verifier agreed with the file.
    pub fn passed(&self) -> bool {
        self.expected == self.got
    }
}

/// Decodes standard base64 (with or without padding).
///
/// # Errors
///
/// A message naming the first byte that is not base64, or a truncated input.
pub fn decode_base64(text: &str) -> Result<Vec<u8>, String> {
    fn value(c: u8) -> Option<u32> {
        match c {
            b'A'..=b'Z' => Some(u32::from(c - b'A')),
            b'a'..=b'z' => Some(u32::from(c - b'a') + 26),
            b'0'..=b'9' => Some(u32::from(c - b'0') + 52),
            b'+' => Some(62),
            b'/' => Some(63),
            _ => None,
        }
    }
    let clean: Vec<u8> = text.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
    let trimmed = clean
        .strip_suffix(b"==")
        .or_else(|| clean.strip_suffix(b"="))
        .unwrap_or(&clean);
    let mut out = Vec::with_capacity(trimmed.len() * 3 / 4);
    for chunk in trimmed.chunks(4) {
        let mut acc = 0u32;
        for &c in chunk {
            acc = (acc << 6) | value(c).ok_or_else(|| format!("invalid base64 byte {c:#x}"))?;
        }
        // 2, 3 or 4 characters carry 1, 2 or 3 bytes in their top bits.
        let carried = match chunk.len() {
            4 => 3,
            3 => 2,
            2 => 1,
            _ => return Err("truncated base64".into()),
        };
        let bytes = (acc << (6 * (4 - chunk.len()))).to_be_bytes();
        out.extend_from_slice(&bytes[1..=carried]);
    }
    Ok(out)
}

/// Runs one case through a [`Verifier`] configured as the case says.
///
/// # Errors
///
/// A message when the case is not well-formed (both or neither payload
/// fields, bad base64, `now` out of range).
pub fn run_case(case: &Case) -> Result<Verdict, String> {
    let payload = match (&case.payload, &case.payload_b64) {
        (Some(text), None) => text.as_bytes().to_vec(),
        (None, Some(b64)) => decode_base64(b64)?,
        _ => {
            return Err(format!(
                "{}: exactly one of payload, payload_b64",
                case.name
            ));
        }
    };
    let mut secrets = case.secrets.iter();
    let first = secrets.next().map_or("", String::as_str);
    let verifier = secrets
        .fold(Verifier::new(first), |v, s| v.with_secret(s.as_str()))
        .tolerance(Duration::seconds(case.tolerance));
    let now = OffsetDateTime::from_unix_timestamp(case.now)
        .map_err(|e| format!("{}: now out of range: {e}", case.name))?;
    let got = match verifier.verify(&payload, case.header.as_deref(), now) {
        Ok(_) => "ok".to_owned(),
        Err(e) => e.as_str().to_owned(),
    };
    Ok(Verdict {
        name: case.name.clone(),
        expected: case.expected.clone(),
        got,
    })
}

/// Reads and runs a whole vector file.
///
/// # Errors
///
/// A message when the file cannot be read or parsed, or a case is malformed.
pub fn run_file(path: &str) -> Result<Vec<Verdict>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{path}: {e}"))?;
    let cases: Vec<Case> = serde_json::from_str(&text).map_err(|e| format!("{path}: {e}"))?;
    cases.iter().map(run_case).collect()
}

#[allow(dead_code)]
fn main() -> ExitCode {
    let path = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "tests/data/vectors/signatures.json".to_owned());
    let verdicts = match run_file(&path) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let mut failed = 0;
    for v in &verdicts {
        if !v.passed() {
            failed += 1;
        }
        println!(
            "{}",
            serde_json::json!({"name": v.name, "expected": v.expected, "got": v.got})
        );
    }
    println!("{} passed, {} failed", verdicts.len() - failed, failed);
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
