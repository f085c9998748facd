//! Property tests: any permutation of a history, each event delivered 1–3
//! times, in mixed API shapes, ends in Stripe's state (with a client) or the
//! newest event's state (without); terminal states stay terminal; applying
//! every event again changes nothing.
#![cfg(feature = "test-util")]

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use proptest::prelude::*;
use stripe_webhook_guard::clock::{Clock, ManualClock};
use stripe_webhook_guard::event::Event;
use stripe_webhook_guard::processor::{Outcome, WebhookProcessor};
use stripe_webhook_guard::signature::{Verifier, test_header};
use stripe_webhook_guard::store::{MemoryStore, SubscriptionStore};
use stripe_webhook_guard::subscription::{SubscriptionState, tie_rank};
use stripe_webhook_guard::testing::{
    Card, FakeConfig, FakeEvent, FakeStripe, Rng, ShapeMix, Subscribe,
};
use time::Duration;

const START: i64 = 1_767_225_600;

#[derive(Debug, Clone)]
enum Move {
    Advance(u32),
    Card(Card),
    PayOpen,
    CancelNow,
    CancelAtPeriodEnd(bool),
    Pause,
    Resume,
    PauseCollection(bool),
    SetTrial,
}

fn moves() -> impl Strategy<Value = Vec<Move>> {
    let m = prop_oneof![
        4 => (1u32..24 * 40).prop_map(Move::Advance),
        2 => prop_oneof![Just(Card::Works), Just(Card::Declines), Just(Card::Missing)].prop_map(Move::Card),
        1 => Just(Move::PayOpen),
        1 => Just(Move::CancelNow),
        1 => any::<bool>().prop_map(Move::CancelAtPeriodEnd),
        1 => Just(Move::Pause),
        1 => Just(Move::Resume),
        1 => any::<bool>().prop_map(Move::PauseCollection),
        1 => Just(Move::SetTrial),
    ];
    proptest::collection::vec(m, 1..14)
}

/// Plays a history on FakeStripe; returns the fake and its events (at most
/// about 30 per subscription).
fn history(
    seed: u64,
    subs: usize,
    trial: bool,
    declines_first: bool,
    plan: &[Move],
) -> (Arc<FakeStripe>, ManualClock, Vec<FakeEvent>) {
    let clock = ManualClock::at_unix(START);
    let fake = Arc::new(FakeStripe::new(
        clock.clone(),
        FakeConfig {
            seed,
            shapes: ShapeMix::Mixed,
            noise_events: seed.is_multiple_of(3),
            ..FakeConfig::default()
        },
    ));
    let mut ids = Vec::new();
    for i in 0..subs {
        let c = fake.create_customer();
        if declines_first && i == 0 {
            fake.set_card(&c, Card::Declines);
        }
        let opts = Subscribe {
            trial_days: trial.then_some(7),
            client_reference_id: Some(format!("user_{i}")),
            ..Subscribe::default()
        };
        ids.push((c.clone(), fake.subscribe(&c, &opts)));
    }
    let budget = 28 * subs;
    for (n, mv) in plan.iter().enumerate() {
        if fake.all_events().len() >= budget {
            break;
        }
        let (customer, sub) = &ids[n % ids.len()];
        match mv {
            Move::Advance(h) => fake.advance(Duration::hours(i64::from(*h))),
            Move::Card(c) => fake.set_card(customer, *c),
            Move::PayOpen => fake.pay_open_invoice(sub),
            Move::CancelNow => fake.cancel_now(sub),
            Move::CancelAtPeriodEnd(b) => fake.cancel_at_period_end(sub, *b),
            Move::Pause => fake.pause(sub),
            Move::Resume => fake.resume(sub),
            Move::PauseCollection(on) => fake.pause_collection(sub, on.then_some("void")),
            Move::SetTrial => fake.set_trial(sub, 10),
        }
    }
    let events = fake.take_new_events();
    (fake, clock, events)
}

/// The state of the newest snapshot event of each subscription, by the
/// documented order: `created`, then the tie rank, then the event id.
fn newest_states(events: &[FakeEvent]) -> HashMap<String, SubscriptionState> {
    let mut best: HashMap<
        String,
        (
            i64,
            stripe_webhook_guard::subscription::TieRank,
            String,
            SubscriptionState,
        ),
    > = HashMap::new();
    for fe in events {
        let e = &fe.event;
        if !e.event_type().is_subscription() {
            continue;
        }
        let view = e.subscription().unwrap();
        let id = view.id.clone().unwrap();
        let key = (
            e.created(),
            tie_rank(e.event_type(), &view),
            e.id().to_owned(),
        );
        let replace = best
            .get(&id)
            .is_none_or(|(c, r, i, _)| key > (*c, *r, i.clone()));
        if replace {
            best.insert(
                id,
                (key.0, key.1, key.2, SubscriptionState::from_view(&view)),
            );
        }
    }
    best.into_iter().map(|(k, v)| (k, v.3)).collect()
}

static TIES: AtomicU32 = AtomicU32::new(0);
static HISTORIES: AtomicU32 = AtomicU32::new(0);

fn has_tie(events: &[FakeEvent]) -> bool {
    let mut seen = HashSet::new();
    events
        .iter()
        .filter(|e| e.event.event_type().is_subscription())
        .any(|e| {
            let sub = e.event.subscription().unwrap().id.unwrap();
            !seen.insert((sub, e.event.created()))
        })
}

async fn deliver(
    with_client: bool,
    fake: &Arc<FakeStripe>,
    clock: &ManualClock,
    events: &[FakeEvent],
    order_seed: u64,
    copies_seed: u64,
) -> Result<(), TestCaseError> {
    let store = Arc::new(MemoryStore::with_clock(Arc::new(clock.clone())));
    let mut builder = WebhookProcessor::builder(Verifier::new(common::secret()))
        .store(store.clone())
        .clock(Arc::new(clock.clone()));
    if with_client {
        builder = builder.client(fake.clone());
    }
    let processor = builder.build();
    // Each event 1–3 times, all in a random order.
    let mut rng = Rng::new(copies_seed);
    let mut deliveries: Vec<&FakeEvent> = Vec::new();
    for fe in events {
        for _ in 0..=rng.below(3) {
            deliveries.push(fe);
        }
    }
    Rng::new(order_seed).shuffle(&mut deliveries);
    let mut terminal_seen: HashSet<String> = HashSet::new();
    let secret = common::secret();
    for fe in &deliveries {
        let header = test_header(&secret, fe.body.as_bytes(), clock.now());
        let out = processor.handle(fe.body.as_bytes(), Some(&header)).await;
        prop_assert!(out.is_ok(), "delivery failed: {out:?}");
        let dead = matches!(out, Ok(Outcome::DeadLettered { .. }));
        prop_assert!(!dead, "dead-lettered: {:?}", out);
        // Terminal states stay terminal.
        for r in store.all_subscriptions() {
            if terminal_seen.contains(&r.id) {
                prop_assert!(
                    r.state.status.is_terminal(),
                    "{} left a terminal state: {}",
                    r.id,
                    r.state.status
                );
            }
            if r.state.status.is_terminal() {
                terminal_seen.insert(r.id.clone());
            }
        }
    }
    // Every subscription ends where it should.
    let expected: HashMap<String, SubscriptionState> = if with_client {
        fake.truths()
            .into_iter()
            .map(|t| (t.id.clone().unwrap(), SubscriptionState::from_view(&t)))
            .collect()
    } else {
        newest_states(events)
    };
    for (id, state) in &expected {
        let record = store.load(id).await.unwrap();
        prop_assert!(record.is_some(), "{id} missing");
        let record = record.unwrap();
        prop_assert!(
            record.matches(state),
            "{id}: record {:?} != expected {:?}",
            record.state.clone(),
            state
        );
    }
    // Applying every event again (a fresh ledger over the same records)
    // changes no record's state.
    let before: HashMap<String, SubscriptionState> = store
        .all_subscriptions()
        .into_iter()
        .map(|r| (r.id.clone(), r.state.clone()))
        .collect();
    let fresh_ledger = Arc::new(MemoryStore::with_clock(Arc::new(clock.clone())));
    let mut builder = WebhookProcessor::builder(Verifier::new(common::secret()))
        .store(common::split::Split::new(fresh_ledger, store.clone()))
        .clock(Arc::new(clock.clone()));
    if with_client {
        builder = builder.client(fake.clone());
    }
    let again = builder.build();
    for fe in events {
        let e = Event::parse_unverified(fe.body.as_bytes()).unwrap();
        again.process_event(&e).await.unwrap();
    }
    for r in store.all_subscriptions() {
        let was = before.get(&r.id).unwrap();
        prop_assert!(
            r.matches(was),
            "{} changed on re-application: {:?} -> {:?}",
            r.id,
            was,
            r.state.clone()
        );
    }
    Ok(())
}

fn run(with_client: bool, cases: u32) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let config = ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    };
    proptest!(config, |(seed in any::<u64>(), subs in 1usize..3, trial in any::<bool>(), declines in any::<bool>(),
                        plan in moves(), order in any::<u64>(), copies in any::<u64>())| {
        let (fake, clock, events) = history(seed, subs, trial, declines, &plan);
        HISTORIES.fetch_add(1, Ordering::Relaxed);
        if has_tie(&events) {
            TIES.fetch_add(1, Ordering::Relaxed);
        }
        rt.block_on(deliver(with_client, &fake, &clock, &events, order, copies))?;
    });
}

#[test]
fn permutations_with_a_client_end_in_stripes_state() {
    run(true, 1000);
    let (t, h) = (
        TIES.load(Ordering::Relaxed),
        HISTORIES.load(Ordering::Relaxed),
    );
    println!("{h} histories, {t} with same-second ties");
}

#[test]
fn permutations_without_a_client_end_in_the_newest_events_state() {
    run(false, 1000);
}

#[test]
fn histories_have_enough_ties_and_events() {
    let mut ties = 0;
    let mut counts = Vec::new();
    for seed in 0..200u64 {
        let plan = vec![
            Move::Advance(24 * 31),
            Move::Card(Card::Declines),
            Move::Advance(24 * 40),
            Move::PayOpen,
            Move::Advance(24 * 20),
        ];
        let (_, _, events) = history(seed, 1, seed % 2 == 0, seed % 5 == 0, &plan);
        counts.push(events.len());
        if has_tie(&events) {
            ties += 1;
        }
    }
    assert!(
        ties >= 40,
        "at least 20% of histories have same-second ties ({ties}/200)"
    );
    assert!(counts.iter().all(|&n| (2..=40).contains(&n)), "{counts:?}");
}

/// Shrunk counterexamples the property tests found, kept as regular tests.
mod regressions {
    use super::*;

    #[allow(clippy::too_many_arguments)]
    fn check(
        with_client: bool,
        seed: u64,
        subs: usize,
        trial: bool,
        declines: bool,
        plan: &[Move],
        order: u64,
        copies: u64,
    ) {
        let (fake, clock, events) = history(seed, subs, trial, declines, plan);
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(deliver(with_client, &fake, &clock, &events, order, copies))
            .unwrap();
    }

    /// Two agreeing updates of one second must still move the watermark, or
    /// a third update of that second is judged against the wrong event.
    #[test]
    fn agreeing_tie_moves_the_watermark() {
        check(
            false,
            257_585_570_737_936_304,
            1,
            false,
            false,
            &[
                Move::CancelAtPeriodEnd(true),
                Move::CancelAtPeriodEnd(false),
            ],
            1_754_421_874_655_921_875,
            11_065_085_348_158_653_167,
        );
    }

    /// A payment restores past_due only when it is newer by the full order
    /// (created, rank, id), not merely of the same second.
    #[test]
    fn payment_restore_follows_the_total_order() {
        check(
            false,
            3_563_497_975_524_738_094,
            1,
            true,
            true,
            &[Move::Pause, Move::Resume, Move::PayOpen],
            0,
            0,
        );
    }

    /// The latest invoice is one last-writer-wins field for snapshots and
    /// invoice events alike.
    #[test]
    fn latest_invoice_has_one_clock() {
        check(
            true,
            50_380_891_101_244_215,
            1,
            true,
            true,
            &[
                Move::Advance(349),
                Move::Advance(275),
                Move::PauseCollection(true),
                Move::PayOpen,
                Move::Advance(264),
                Move::Card(Card::Works),
                Move::CancelNow,
            ],
            2_324_551_322_037_340_867,
            10_283_387_550_181_370_383,
        );
    }

    /// Re-applying events rendered in another API shape changes no state.
    #[test]
    fn reapplication_across_shapes() {
        check(
            true,
            11_217_091_953_874_554_720,
            1,
            false,
            true,
            &[Move::PayOpen],
            1_188_518_200_625_321_105,
            1_508_213_849_138_210_040,
        );
    }
}

/// Payments in any order (issue 13 items 2 and 9), pure: a past-due
/// subscription whose latest invoice `in_new` failed, a late payment of an
/// older invoice `in_old`, and maybe the payment of `in_new`, each reported
/// by `invoice.paid` and `invoice.payment_succeeded`, every event delivered
/// 1–3 times in any order and in either API shape. The older payment never
/// restores nor replaces the latest invoice; each payment has exactly one
/// first report; the end state does not depend on the order.
mod payments {
    use proptest::prelude::*;
    use stripe_webhook_guard::event::{Event, SubscriptionStatus};
    use stripe_webhook_guard::subscription::{Decision, SubscriptionRecord, decide};
    use time::OffsetDateTime;

    const T: i64 = 1_767_225_600;

    fn invoice(
        id: &str,
        ty: &str,
        at: i64,
        invoice: &str,
        created: i64,
        paid: bool,
        basil: bool,
    ) -> Event {
        let status = if paid { "paid" } else { "open" };
        let link = if basil {
            r#""subscription":null,"parent":{"type":"subscription_details","subscription_details":{"subscription":"sub_1"}}"#
                .to_owned()
        } else {
            format!(r#""subscription":"sub_1","paid":{paid}"#)
        };
        let body = format!(
            r#"{{"id":"{id}","object":"event","type":"{ty}","created":{at},"livemode":false,
            "data":{{"object":{{"id":"{invoice}","object":"invoice","customer":"cus_1",{link},
            "status":"{status}","created":{created},"lines":{{"data":[{{"type":"subscription",
            "subscription":"sub_1","period":{{"start":{created},"end":{}}}}}]}}}}}}}}"#,
            created + 30 * 86_400
        );
        Event::parse_unverified(body.as_bytes()).unwrap()
    }

    fn past_due(basil: bool) -> Event {
        let period = if basil {
            format!(
                r#""items":{{"data":[{{"id":"si_1","price":{{"id":"price_1","product":"prod_1"}},
                "current_period_start":{T},"current_period_end":{}}}]}}"#,
                T + 30 * 86_400
            )
        } else {
            format!(
                r#""current_period_start":{T},"current_period_end":{},
                "items":{{"data":[{{"id":"si_1","price":{{"id":"price_1","product":"prod_1"}}}}]}}"#,
                T + 30 * 86_400
            )
        };
        let body = format!(
            r#"{{"id":"evt_pd","object":"event","type":"customer.subscription.updated","created":{},
            "livemode":false,"data":{{"object":{{"id":"sub_1","object":"subscription","customer":"cus_1",
            "status":"past_due","latest_invoice":"in_new",{period}}}}}}}"#,
            T + 60
        );
        Event::parse_unverified(body.as_bytes()).unwrap()
    }

    fn history(pay_new: bool, shapes: &[bool]) -> Vec<Event> {
        let old = T - 30 * 86_400;
        let mut events = vec![
            past_due(shapes[0]),
            invoice(
                "evt_fail",
                "invoice.payment_failed",
                T + 60,
                "in_new",
                T,
                false,
                shapes[1],
            ),
            invoice(
                "evt_old_paid",
                "invoice.paid",
                T + 3_600,
                "in_old",
                old,
                true,
                shapes[2],
            ),
            invoice(
                "evt_old_ok",
                "invoice.payment_succeeded",
                T + 3_600,
                "in_old",
                old,
                true,
                shapes[3],
            ),
        ];
        if pay_new {
            events.push(invoice(
                "evt_new_paid",
                "invoice.paid",
                T + 7_200,
                "in_new",
                T,
                true,
                shapes[4],
            ));
            events.push(invoice(
                "evt_new_ok",
                "invoice.payment_succeeded",
                T + 7_200,
                "in_new",
                T,
                true,
                shapes[5],
            ));
        }
        events
    }

    fn apply(events: &[&Event]) -> SubscriptionRecord {
        let mut record: Option<SubscriptionRecord> = None;
        for e in events {
            let now = OffsetDateTime::from_unix_timestamp(e.created()).unwrap();
            match decide(record.as_ref(), e, now).unwrap() {
                Decision::Apply(a) => record = Some(a.record),
                Decision::Refetch {
                    fallback: Some(f), ..
                } => record = Some(f.record),
                _ => {}
            }
        }
        record.unwrap()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(500))]

        #[test]
        fn any_order_any_shape(pay_new in any::<bool>(), shapes in prop::collection::vec(any::<bool>(), 6),
                               copies in prop::collection::vec(1usize..=3, 6), keys in prop::collection::vec(any::<u64>(), 18)) {
            let events = history(pay_new, &shapes);
            let mut deliveries: Vec<(u64, &Event)> = Vec::new();
            for (i, e) in events.iter().enumerate() {
                for c in 0..copies[i] {
                    deliveries.push((keys[i * 3 + c], e));
                }
            }
            deliveries.sort_by_key(|(k, _)| *k);
            let order: Vec<&Event> = deliveries.into_iter().map(|(_, e)| e).collect();
            let r = apply(&order);
            prop_assert_eq!(r.state.latest_invoice.as_deref(), Some("in_new"));
            if pay_new {
                prop_assert_eq!(r.status(), &SubscriptionStatus::Active);
                prop_assert_eq!(r.latest_invoice_paid, Some(true));
                prop_assert_eq!(r.dunning_since(), None);
            } else {
                prop_assert_eq!(r.status(), &SubscriptionStatus::PastDue);
                prop_assert_eq!(r.dunning_since(), Some(T + 60));
                prop_assert_eq!(r.latest_invoice_paid, Some(false));
            }
            // One first report per payment.
            for (invoice, a, b) in [("in_old", "evt_old_paid", "evt_old_ok"), ("in_new", "evt_new_paid", "evt_new_ok")] {
                let reports = [a, b].iter().filter(|e| r.payment_first_reported_by(e).is_some()).count();
                let paid = invoice == "in_old" || pay_new;
                prop_assert_eq!(reports, usize::from(paid), "{}", invoice);
            }
        }
    }
}
