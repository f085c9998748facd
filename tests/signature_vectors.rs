//! Every case of `tests/data/vectors/signatures.json` (decided by running
//! stripe-python and stripe-node) must give the same verdict here.

#[path = "../examples/verify_vectors.rs"]
mod verify_vectors;

#[test]
fn all_sdk_vectors_agree() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/vectors/signatures.json"
    );
    let verdicts = verify_vectors::run_file(path).expect("vector file loads");
    assert_eq!(verdicts.len(), 140, "the vector file has 140 cases");
    let failures: Vec<_> = verdicts.iter().filter(|v| !v.passed()).collect();
    assert!(failures.is_empty(), "disagreements: {failures:#?}");
}

#[test]
fn every_expected_kind_is_exercised() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/vectors/signatures.json"
    );
    let verdicts = verify_vectors::run_file(path).expect("vector file loads");
    for kind in [
        "ok",
        "missing_header",
        "missing_secret",
        "malformed_header",
        "no_v1_signature",
        "signature_mismatch",
        "timestamp_expired",
    ] {
        assert!(
            verdicts.iter().any(|v| v.expected == kind && v.passed()),
            "no passing case expects {kind}"
        );
    }
}

#[test]
fn base64_payloads_decode() {
    assert_eq!(verify_vectors::decode_base64("aGVsbG8=").unwrap(), b"hello");
    assert_eq!(
        verify_vectors::decode_base64("aGVsbG8h").unwrap(),
        b"hello!"
    );
    assert_eq!(verify_vectors::decode_base64("aGk").unwrap(), b"hi");
    assert_eq!(verify_vectors::decode_base64("/w==").unwrap(), [0xff]);
    assert!(verify_vectors::decode_base64("a").is_err());
}

#[test]
fn base64_case_runs() {
    let case: verify_vectors::Case = serde_json::from_value(serde_json::json!({
        "name": "bytes", "payload_b64": "/w==", "header": "t=1,v1=00",
        "secrets": ["whsec_x"], "tolerance": 300, "now": 1, "expected": "invalid_payload_encoding"
    }))
    .unwrap();
    assert!(verify_vectors::run_case(&case).unwrap().passed());
}
