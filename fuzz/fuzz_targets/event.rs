//! Fuzzes event parsing and the state machine: arbitrary bytes never panic;
//! a parsed event survives `to_json` and the views and `decide` never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use stripe_webhook_guard::event::Event;
use stripe_webhook_guard::ledger::Fingerprint;
use stripe_webhook_guard::subscription::{Decision, decide, subscription_id_of};
use time::OffsetDateTime;

fuzz_target!(|data: &[u8]| {
    let Ok(event) = Event::parse_unverified(data) else {
        return;
    };
    let again = Event::parse_unverified(event.to_json().as_bytes()).expect("to_json parses");
    assert_eq!(again, event);
    let _ = Fingerprint::of(&event);
    let _ = event.object_identity();
    let _ = event.subscription();
    let _ = event.invoice();
    let _ = event.checkout_session();
    let _ = event.entitlement_summary();
    let _ = subscription_id_of(&event);
    let now = OffsetDateTime::from_unix_timestamp(1_700_000_000).unwrap();
    if let Ok(decision) = decide(None, &event, now) {
        let record = match decision {
            Decision::Apply(a) => Some(a.record),
            Decision::Refetch {
                fallback: Some(f), ..
            } => Some(f.record),
            _ => None,
        };
        if let Some(record) = record {
            // The same event again changes nothing.
            let twice = decide(Some(&record), &event, now).expect("parsed once already");
            assert!(
                matches!(twice, Decision::NoChange | Decision::NotApplicable { .. }),
                "applying an event twice changed the record: {twice:?}"
            );
        }
    }
});
