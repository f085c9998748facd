//! Instruction counts per operation under `valgrind --tool=callgrind`: the
//! figures wall-clock time cannot give on a busy machine (callgrind counts
//! the same for the same binary and input whatever else runs).
//!
//! Run `benches/instructions.sh` (it builds this bench and runs each
//! operation under callgrind, collecting only inside `measured`). By itself,
//! `instructions OP N` runs OP N times; under `cargo bench` it does nothing.
//!
//! Operations: `raw_hmac_sha256`, `verify`, `verify_and_parse`,
//! `subscription_view`, `new_event`, `duplicate`, `access_decide`.

mod common;

use std::hint::black_box;

use common::{
    SECRET, T, access_case, block_on, memory_processor, new_deliveries, now, raw_hmac, signed_2kib,
};
use stripe_webhook_guard::event::Event;
use stripe_webhook_guard::signature::Verifier;

/// The only code callgrind counts (`--toggle-collect=*measured*`).
#[inline(never)]
fn measured(n: usize, f: &mut dyn FnMut(usize)) {
    for i in 0..n {
        f(i);
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(op), Some(n)) = (
        args.first(),
        args.get(1).and_then(|n| n.parse::<usize>().ok()),
    ) else {
        eprintln!("usage: instructions OP N (see benches/instructions.sh)");
        return;
    };
    let verifier = Verifier::new(SECRET);
    let (body, header) = signed_2kib();
    let t_text = T.to_string();
    match op.as_str() {
        "raw_hmac_sha256" => measured(n, &mut |_| {
            black_box(raw_hmac(
                black_box(SECRET.as_bytes()),
                black_box(t_text.as_bytes()),
                black_box(body.as_bytes()),
            ));
        }),
        "verify" => measured(n, &mut |_| {
            black_box(
                verifier
                    .verify(black_box(body.as_bytes()), Some(&header), now())
                    .is_ok(),
            );
        }),
        "verify_and_parse" => measured(n, &mut |_| {
            let v = verifier
                .verify(black_box(body.as_bytes()), Some(&header), now())
                .expect("valid");
            black_box(Event::parse(v).expect("parses"));
        }),
        "subscription_view" => {
            let events: Vec<Event> = (0..n)
                .map(|_| Event::parse_unverified(body.as_bytes()).expect("parses"))
                .collect();
            measured(n, &mut |i| {
                black_box(events[i].subscription().expect("a subscription"));
            });
        }
        "new_event" => {
            let p = memory_processor();
            for (body, header) in &new_deliveries(0, 1000) {
                block_on(p.handle(body.as_bytes(), Some(header))).expect("processed");
            }
            let deliveries = new_deliveries(1000, n as u64);
            measured(n, &mut |i| {
                let (body, header) = &deliveries[i];
                black_box(block_on(p.handle(body.as_bytes(), Some(header))).expect("processed"));
            });
        }
        "duplicate" => {
            let p = memory_processor();
            block_on(p.handle(body.as_bytes(), Some(&header))).expect("first");
            measured(n, &mut |_| {
                black_box(block_on(p.handle(body.as_bytes(), Some(&header))).expect("answered"));
            });
        }
        "access_decide" => {
            let (policy, record, later) = access_case();
            measured(n, &mut |_| {
                black_box(policy.decide(black_box(&record), black_box(later)));
            });
        }
        other => eprintln!("unknown operation {other}"),
    }
}
