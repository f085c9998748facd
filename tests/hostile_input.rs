//! Hostile and malformed event bodies: always a clear `ParseError`, never a panic.

use stripe_webhook_guard::event::{Event, ParseError};

fn parse(body: &str) -> Result<Event, ParseError> {
    Event::parse_unverified(body.as_bytes())
}

fn nested(depth: usize) -> String {
    format!("{}1{}", "[".repeat(depth), "]".repeat(depth))
}

#[test]
fn duplicate_envelope_keys_are_refused() {
    let err = parse(r#"{"id":"evt_1","id":"evt_2","type":"x","created":1,"data":{"object":{}}}"#)
        .unwrap_err();
    assert!(
        matches!(&err, ParseError::Shape { reason, .. } if reason == "duplicate field `id`"),
        "{err:?}"
    );
    let err = parse(r#"{"id":"evt_1","type":"a","type":"b","created":1,"data":{"object":{}}}"#)
        .unwrap_err();
    assert!(err.to_string().contains("duplicate field `type`"), "{err}");
    let err = parse(r#"{"id":"evt_1","type":"a","created":1,"data":{"object":{},"object":{}}}"#)
        .unwrap_err();
    assert!(
        err.to_string().contains("duplicate field `object`"),
        "{err}"
    );
}

#[test]
fn duplicate_object_keys_are_refused_by_the_views() {
    let e = parse(
        r#"{"id":"evt_1","type":"customer.subscription.updated","created":1,
        "data":{"object":{"object":"subscription","id":"sub_1","status":"active","status":"canceled"}}}"#,
    )
    .unwrap();
    let err = e.subscription().unwrap_err();
    assert!(
        err.to_string().contains("duplicate field `status`"),
        "{err}"
    );
}

#[test]
fn nesting_at_and_past_the_recursion_limit() {
    // serde_json accepts 127 levels and refuses 128; the envelope is one
    // level, `data` two, `object` three.
    let at_limit = format!(
        r#"{{"id":"evt_1","type":"x","created":1,"data":{{"object":{{"deep":{}}}}}}}"#,
        nested(124)
    );
    let e = parse(&at_limit).expect("127 levels in all are accepted");
    assert!(e.object_identity().is_ok());
    // Brackets inside strings do not count.
    let in_strings = format!(
        r#"{{"id":"evt_1","type":"x","created":1,"data":{{"object":{{"s":"{}\"{}"}}}}}}"#,
        "[".repeat(300),
        "{".repeat(300)
    );
    assert!(parse(&in_strings).is_ok());

    for depth in [125, 126, 200, 10_000, 100_000] {
        let body = format!(
            r#"{{"id":"evt_1","type":"x","created":1,"data":{{"object":{{"deep":{}}}}}}}"#,
            nested(depth)
        );
        let err = parse(&body).unwrap_err();
        assert!(
            matches!(&err, ParseError::Syntax { reason, .. } if reason.contains("recursion limit")),
            "depth {depth}: {err:?}"
        );
    }
    // Deep nesting in the envelope itself.
    let err = parse(&format!(r#"{{"id":"evt_1","x":{}}}"#, nested(50_000))).unwrap_err();
    assert!(err.to_string().contains("recursion limit"), "{err}");
}

#[test]
fn wrong_types() {
    let cases = [
        (
            r#"{"id":1,"type":"x","created":1,"data":{"object":{}}}"#,
            "invalid type",
        ),
        (
            r#"{"id":"evt_1","type":["x"],"created":1,"data":{"object":{}}}"#,
            "invalid type",
        ),
        (
            r#"{"id":"evt_1","type":"x","created":"yesterday","data":{"object":{}}}"#,
            "RFC 3339",
        ),
        (
            r#"{"id":"evt_1","type":"x","created":1.5,"data":{"object":{}}}"#,
            "invalid type",
        ),
        (
            r#"{"id":"evt_1","type":"x","created":1,"livemode":"yes","data":{"object":{}}}"#,
            "invalid type",
        ),
        (
            r#"{"id":"evt_1","type":"x","created":1,"data":[]}"#,
            "no data.object",
        ),
        (
            r#"{"id":"evt_1","type":"x","created":1,"data":{"object":[1]}}"#,
            "not a JSON object",
        ),
        (
            r#"{"id":"evt_1","type":"x","created":18446744073709551615,"data":{"object":{}}}"#,
            "out of range",
        ),
        ("[]", "not a JSON object"),
        (r#""evt""#, "not a JSON object"),
        ("null", "not a JSON object"),
    ];
    for (body, needle) in cases {
        let err = parse(body).unwrap_err();
        assert!(err.to_string().contains(needle), "{body}: {err}");
    }
    let e = parse(
        r#"{"id":"evt_1","type":"invoice.paid","created":1,
        "data":{"object":{"object":"invoice","id":"in_1","paid":"yes"}}}"#,
    )
    .unwrap();
    assert!(
        e.invoice()
            .unwrap_err()
            .to_string()
            .contains("invalid type, expected a boolean")
    );
}

#[test]
fn missing_fields() {
    assert_eq!(
        parse(r#"{"id":"evt_1","type":"x","created":1}"#).unwrap_err(),
        ParseError::MissingObject
    );
    assert_eq!(
        parse(r#"{"id":"evt_1","type":"x","created":1,"data":{}}"#).unwrap_err(),
        ParseError::MissingObject
    );
    assert_eq!(
        parse(r#"{"id":"evt_1","type":"x","created":1,"data":{"object":null}}"#).unwrap_err(),
        ParseError::MissingObject
    );
    for field in ["id", "type", "created"] {
        let mut v = serde_json::json!({"id":"evt_1","type":"x","created":1,"data":{"object":{}}});
        v.as_object_mut().unwrap().remove(field);
        let err = parse(&v.to_string()).unwrap_err();
        assert!(
            err.to_string()
                .contains(&format!("missing field `{field}`")),
            "{err}"
        );
    }
    let e = parse(r#"{"id":"evt_1","type":"customer.subscription.updated","created":1,"data":{"object":{"object":"subscription"}}}"#).unwrap();
    assert!(
        e.subscription()
            .unwrap_err()
            .to_string()
            .contains("missing field `status`")
    );
}

#[test]
fn sixteen_mebibytes_is_refused_before_parsing() {
    let mut body =
        String::from(r#"{"id":"evt_1","type":"x","created":1,"data":{"object":{"pad":""#);
    body.push_str(&"a".repeat(16 * 1024 * 1024));
    body.push_str(r#""}}}"#);
    let err = parse(&body).unwrap_err();
    assert!(
        matches!(
            err,
            ParseError::TooLarge {
                limit: 1_048_576,
                ..
            }
        ),
        "{err:?}"
    );
    // With an explicit limit it parses, and the object stays raw (not copied into a tree).
    let e = Event::parse_unverified_with_limit(body.as_bytes(), 32 * 1024 * 1024).unwrap();
    assert_eq!(e.object_json().unwrap().len(), 16 * 1024 * 1024 + 10);
}

#[test]
fn garbage_never_panics() {
    let samples: [&[u8]; 9] = [
        b"",
        b"{",
        b"\xff\xfe",
        b"{\"id\":\"\xff\"}",
        b"{\"id\":\"evt\\ud800\",\"type\":\"x\",\"created\":1,\"data\":{\"object\":{}}}",
        b"{\"id\":\"\",\"type\":\"x\",\"created\":1,\"data\":{\"object\":{}}}",
        b"{\"id\":\"evt_1\",\"type\":\"x\",\"created\":1,\"data\":{\"object\":{}}} trailing",
        b"\xef\xbb\xbf{}",
        b"{\"id\":\"evt_1\",\"type\":\"x\",\"created\":-99999999999999,\"data\":{\"object\":{}}}",
    ];
    for s in samples {
        let r = Event::parse_unverified(s);
        if let Ok(e) = r {
            // Out-of-range timestamps are caught when turned into dates.
            assert!(e.created_at().is_err());
        }
    }
}

#[test]
fn malformed_objects_are_delimited_then_refused_when_checked() {
    for object in [
        r#"{"id":"ch_1" "object":"charge"}"#,
        r#"{"id":"ch_1","amount":01}"#,
        r#"{"id":"ch_1","a":[1,]}"#,
        r#"{"id":"ch_1","a":tru}"#,
        r#"{"id":"ch_1","a":"\q"}"#,
        "{\"id\":\"ch_\u{1}\"}",
        r#"{"id":"ch_1","a":[}"#,
    ] {
        let body = format!(
            r#"{{"id":"evt_1","type":"charge.refunded","created":1,"data":{{"object":{object}}}}}"#
        );
        let Ok(e) = parse(&body) else {
            // Unbalanced brackets may already break the envelope.
            continue;
        };
        assert_eq!(e.object_json(), Some(object));
        let err = e.validate_object().unwrap_err();
        assert!(
            matches!(&err, ParseError::Syntax { reason, .. } if reason.starts_with("data.object:")),
            "{object}: {err:?}"
        );
        // Checked once: the same answer again.
        assert_eq!(e.validate_object().unwrap_err(), err);
        assert!(e.entitlement_summary().is_err());
    }
    // Well-formed but of the wrong shape passes the check: the view says why.
    let e = parse(
        r#"{"id":"evt_1","type":"customer.subscription.updated","created":1,
        "data":{"object":{"object":"subscription","id":"sub_1","status":5}}}"#,
    )
    .unwrap();
    assert!(e.validate_object().is_ok());
    assert!(matches!(e.subscription(), Err(ParseError::Shape { .. })));
}

mod prop {
    use proptest::prelude::*;
    use stripe_webhook_guard::event::Event;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1000))]
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            if let Ok(e) = Event::parse_unverified(&bytes) {
                let _ = e.subscription();
                let _ = e.invoice();
                let _ = e.checkout_session();
                let _ = e.entitlement_summary();
            }
        }

        /// A valid event with one byte replaced or dropped: whenever
        /// parsing and the object check both accept it, it is JSON (so
        /// whenever it is not JSON, one of them refuses it).
        #[test]
        fn the_scan_and_the_check_refuse_what_serde_json_refuses(
            at in 0usize..400,
            with in proptest::sample::select(vec![
                None, Some(b'{'), Some(b'}'), Some(b'['), Some(b']'), Some(b'"'),
                Some(b':'), Some(b','), Some(b'\\'), Some(b' '), Some(b'1'), Some(b'x'),
                Some(0x01),
            ]),
        ) {
            let valid = br#"{"id":"evt_1","object":"event","type":"charge.refunded","created":1700000000,
              "livemode":false,"pending_webhooks":1,"request":{"id":"req_1","idempotency_key":null},
              "data":{"object":{"id":"ch_1","object":"charge","amount":2000,"refunded":true,
              "metadata":{"note":"a \"quoted\" [bracket] {brace}"},"refunds":{"data":[{"id":"re_1"}]}},
              "previous_attributes":{"refunded":false}},"extra":[1,2.5e3,null,{"k":"v"}]}"#;
            let mut body = valid.to_vec();
            let at = at % body.len();
            match with {
                Some(b) => body[at] = b,
                None => { body.remove(at); }
            }
            let ours = Event::parse_unverified(&body).and_then(|e| e.validate_object());
            let json = serde_json::from_slice::<serde::de::IgnoredAny>(&body);
            if ours.is_ok() {
                prop_assert!(json.is_ok(), "accepted non-JSON: {}", String::from_utf8_lossy(&body));
            }
        }

        #[test]
        fn arbitrary_objects_never_panic(object in "\\{(\"[a-z_]{1,12}\":(null|true|1|-1|\"[a-z_]{0,8}\"|\\{\\}|\\[\\]|\\{\"id\":\"x\"\\}|\\{\"data\":\\[\\{\\}\\]\\}),?){0,10}\\}") {
            let body = format!(r#"{{"id":"evt_1","type":"x","created":1,"data":{{"object":{object}}}}}"#);
            if let Ok(e) = Event::parse_unverified(body.as_bytes()) {
                let _ = e.subscription();
                let _ = e.invoice();
                let _ = e.checkout_session();
                let _ = e.entitlement_summary();
            }
        }
    }
}
