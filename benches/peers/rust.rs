//! The Rust side of `benches/peers/run.sh`: times, in one process and with
//! one method, the raw HMAC-SHA256 of the 2 KiB bench event (the floor every
//! verifier pays), this crate's `verify` and `verify` + `Event::parse`, and
//! async-stripe's `Webhook::construct_event_with_timestamp` on the same
//! payload, header and secret. Writes the payload and a header signed at the
//! current time to the directory given as the first argument, for the Node
//! and Python harnesses.
//!
//! Method (the same in all three harnesses): calibrate a batch to ~20 ms,
//! then time 15 batches; print the median nanoseconds per call.

#[path = "../common/mod.rs"]
mod common;

use std::hint::black_box;
use std::time::Instant;

use common::{SECRET, T, now, raw_hmac, signed_2kib};
use stripe_webhook::Webhook;
use stripe_webhook_guard::event::Event;
use stripe_webhook_guard::signature::{Verifier, WebhookSecret, test_header};

fn median_ns(mut f: impl FnMut()) -> f64 {
    let mut n = 1u64;
    loop {
        let start = Instant::now();
        for _ in 0..n {
            f();
        }
        if start.elapsed().as_millis() >= 20 {
            break;
        }
        n *= 2;
    }
    let mut samples: Vec<f64> = (0..15)
        .map(|_| {
            let start = Instant::now();
            for _ in 0..n {
                f();
            }
            start.elapsed().as_nanos() as f64 / n as f64
        })
        .collect();
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

fn main() {
    let out = std::env::args().nth(1).expect("usage: peers-rust OUT_DIR");
    let (body, header) = signed_2kib();
    let live = test_header(
        &WebhookSecret::new(SECRET),
        body.as_bytes(),
        time::OffsetDateTime::now_utc(),
    );
    std::fs::write(format!("{out}/payload.json"), &body).expect("write payload");
    std::fs::write(format!("{out}/header.txt"), &live).expect("write header");
    std::fs::write(format!("{out}/secret.txt"), SECRET).expect("write secret");

    let verifier = Verifier::new(SECRET);
    let t_text = T.to_string();
    // Every operation must succeed on this payload before it is timed.
    verifier
        .verify(body.as_bytes(), Some(&header), now())
        .expect("our verify accepts the payload");
    // async-stripe types the object strictly: a subscription without every
    // field its schema requires is refused after the signature check and
    // the parse, and the row says so (it is then the time to the refusal).
    let parsed = Webhook::construct_event_with_timestamp(&body, &header, SECRET, T);
    let async_stripe = match &parsed {
        Ok(_) => "async-stripe/construct_event",
        Err(e) => {
            println!("note: async-stripe refuses the payload ({e}); its row times the refusal");
            "async-stripe/construct_event(refused)"
        }
    };
    let rows: [(&str, f64); 4] = [
        (
            "raw_hmac_sha256",
            median_ns(|| {
                black_box(raw_hmac(
                    black_box(SECRET.as_bytes()),
                    black_box(t_text.as_bytes()),
                    black_box(body.as_bytes()),
                ));
            }),
        ),
        (
            "ours/verify",
            median_ns(|| {
                black_box(
                    verifier
                        .verify(black_box(body.as_bytes()), Some(&header), now())
                        .is_ok(),
                );
            }),
        ),
        (
            "ours/verify_and_parse",
            median_ns(|| {
                let v = verifier
                    .verify(black_box(body.as_bytes()), Some(&header), now())
                    .expect("valid");
                black_box(Event::parse(v).expect("parses"));
            }),
        ),
        (
            async_stripe,
            median_ns(|| {
                black_box(
                    Webhook::construct_event_with_timestamp(black_box(&body), &header, SECRET, T)
                        .is_ok(),
                );
            }),
        ),
    ];
    for (name, ns) in rows {
        println!("{name} {ns:.1}");
    }
}
