//! Heap allocations per operation, counted with dhat's heap profiler as the
//! global allocator (no `unsafe` here).
//!
//! `cargo bench --bench allocations` prints, for each operation, the heap
//! blocks allocated and the bytes allocated per call, averaged over many
//! calls after a warm-up: `verify_and_parse` (the SDKs' `construct_event`),
//! `pipeline_2KiB/new_event` and `pipeline_2KiB/duplicate` on the in-memory
//! store, and `access/decide` (which must allocate nothing).

mod common;

use std::hint::black_box;

use common::{SECRET, access_case, block_on, memory_processor, new_deliveries, now, signed_2kib};
use stripe_webhook_guard::event::Event;
use stripe_webhook_guard::signature::Verifier;

#[global_allocator]
static ALLOC: dhat::Alloc = dhat::Alloc;

/// Blocks and bytes allocated per call of `f`, over `n` calls.
fn per_call(n: u64, mut f: impl FnMut(u64)) -> (f64, f64) {
    let before = dhat::HeapStats::get();
    for i in 0..n {
        f(i);
    }
    let after = dhat::HeapStats::get();
    #[allow(clippy::cast_precision_loss)]
    let per = |a: u64, b: u64| (b - a) as f64 / n as f64;
    (
        per(before.total_blocks, after.total_blocks),
        per(before.total_bytes, after.total_bytes),
    )
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let _profiler = dhat::Profiler::builder().testing().build();
    let mut rows: Vec<(&str, (f64, f64))> = Vec::new();

    let verifier = Verifier::new(SECRET);
    let (body, header) = signed_2kib();
    rows.push((
        "parse_2KiB/verify_and_parse",
        per_call(1000, |_| {
            let v = verifier
                .verify(body.as_bytes(), Some(&header), now())
                .expect("valid");
            black_box(Event::parse(v).expect("parses"));
        }),
    ));

    // New events: the deliveries are built before counting starts; the
    // first 1,000 (one per subscription) warm the store up.
    let p = memory_processor();
    for (body, header) in &new_deliveries(0, 1000) {
        block_on(p.handle(body.as_bytes(), Some(header))).expect("processed");
    }
    let deliveries = new_deliveries(1000, 2000);
    rows.push((
        "pipeline_2KiB/new_event",
        per_call(2000, |i| {
            let (body, header) = &deliveries[usize::try_from(i).expect("small")];
            black_box(block_on(p.handle(body.as_bytes(), Some(header))).expect("processed"));
        }),
    ));
    rows.push((
        "pipeline_2KiB/duplicate",
        per_call(1000, |_| {
            black_box(block_on(p.handle(body.as_bytes(), Some(&header))).expect("answered"));
        }),
    ));

    let (policy, record, later) = access_case();
    rows.push((
        "access/decide",
        per_call(1000, |_| {
            black_box(policy.decide(black_box(&record), black_box(later)));
        }),
    ));

    println!(
        "{:<30} {:>12} {:>12}",
        "operation", "allocs/call", "bytes/call"
    );
    for (name, (blocks, bytes)) in rows {
        println!("{name:<30} {blocks:>12.2} {bytes:>12.0}");
    }
}
