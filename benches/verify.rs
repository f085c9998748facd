//! Signature verification against the hardware limit.
//!
//! Each group holds, over the same signed bytes (`"{t}." + body`):
//! - `raw_hmac_sha256`: HMAC-SHA256 with hmac + sha2, key set up per call —
//!   the floor any verifier has to pay;
//! - `verify`: [`Verifier::verify`] on a valid delivery (header parse, UTF-8
//!   check, HMAC, constant-time compare, age check);
//! - `verify_rotation_3_secrets_last_matches` and `verify_reject_bad_signature`.
//!
//! Read the ratio `verify / raw_hmac_sha256` off one run; absolute numbers
//! depend on the machine (and on SHA-NI, printed at start).

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use stripe_webhook_guard::signature::{Verifier, WebhookSecret, test_header};
use time::OffsetDateTime;

const SECRET: &str = "whsec_bench_0123456789abcdefghijklmnop";
const T: i64 = 1_700_000_000;

/// A realistic event body padded to exactly `size` bytes with metadata.
fn body(size: usize) -> Vec<u8> {
    let head = r#"{"id":"evt_1PgcBenchmark0000000000","object":"event","api_version":"2025-03-31.basil","created":1700000000,"data":{"object":{"id":"sub_1PgcBench","object":"subscription","customer":"cus_Bench","status":"active","cancel_at_period_end":false,"metadata":{"pad":""#;
    let tail = r#""}}},"livemode":false,"pending_webhooks":1,"request":{"id":null,"idempotency_key":null},"type":"customer.subscription.updated"}"#;
    let pad = size.saturating_sub(head.len() + tail.len());
    let mut out = Vec::with_capacity(size);
    out.extend_from_slice(head.as_bytes());
    out.extend(std::iter::repeat_n(b'x', pad));
    out.extend_from_slice(tail.as_bytes());
    out
}

fn raw_hmac(key: &[u8], t: &[u8], body: &[u8]) -> [u8; 32] {
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(key).expect("any key length");
    mac.update(t);
    mac.update(b".");
    mac.update(body);
    mac.finalize().into_bytes().into()
}

fn print_cpu() {
    #[cfg(target_arch = "x86_64")]
    {
        let sha_ni = std::arch::is_x86_feature_detected!("sha");
        eprintln!(
            "sha2 backend: {}",
            if sha_ni {
                "SHA-NI (x86 SHA extensions)"
            } else {
                "software (no SHA-NI)"
            }
        );
    }
    #[cfg(not(target_arch = "x86_64"))]
    eprintln!("sha2 backend: see sha2's cpu detection for this architecture");
}

fn bench_verify(c: &mut Criterion) {
    print_cpu();
    let now = OffsetDateTime::from_unix_timestamp(T).expect("in range");
    let secret = WebhookSecret::new(SECRET);
    let verifier = Verifier::new(secret.clone());
    let rotation = Verifier::new("whsec_old_one_0000000000000000000000")
        .with_secret("whsec_old_two_0000000000000000000000")
        .with_secret(secret.clone());
    let t_text = T.to_string();

    for size in [512usize, 2048, 8192, 65536] {
        let payload = body(size);
        let header = test_header(&secret, &payload, now);
        let bad = format!("t={T},v1={}", "0".repeat(64));
        let mut group = c.benchmark_group(format!("verify_{}", human(size)));
        group.throughput(Throughput::Bytes(size as u64));
        group.bench_function(BenchmarkId::new("raw_hmac_sha256", size), |b| {
            b.iter(|| {
                raw_hmac(
                    black_box(SECRET.as_bytes()),
                    black_box(t_text.as_bytes()),
                    black_box(&payload),
                )
            });
        });
        group.bench_function(BenchmarkId::new("verify", size), |b| {
            b.iter(|| verifier.verify(black_box(&payload), black_box(Some(header.as_str())), now));
        });
        group.bench_function(
            BenchmarkId::new("verify_rotation_3_secrets_last_matches", size),
            |b| {
                b.iter(|| {
                    rotation.verify(black_box(&payload), black_box(Some(header.as_str())), now)
                });
            },
        );
        group.bench_function(BenchmarkId::new("verify_reject_bad_signature", size), |b| {
            b.iter(|| verifier.verify(black_box(&payload), black_box(Some(bad.as_str())), now));
        });
        group.finish();
    }
}

fn human(size: usize) -> String {
    if size >= 1024 {
        format!("{}KiB", size / 1024)
    } else {
        format!("{size}B")
    }
}

criterion_group!(benches, bench_verify);
criterion_main!(benches);
