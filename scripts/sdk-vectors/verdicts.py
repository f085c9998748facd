"""Runs stripe-python's own verification on vector cases.

    python verdicts.py record CASES.json   -> {name: signed content or null}
    python verdicts.py verdicts CASES.json -> {name: verdict}

`record` reports the exact string stripe-python feeds to HMAC (the signed
payload `"%d.%s" % (timestamp, payload)`), captured by wrapping
`WebhookSignature._compute_signature`. `verdicts` runs
`WebhookSignature.verify_header` once per configured secret with `time.time()`
pinned to the case's `now`, and maps the SDK's refusal to the crate's kinds.
Placeholders `{py}` / `{node}` in a header are replaced by 64 zeros.
"""

import base64
import json
import sys
import types

import stripe
import stripe._webhook as webhook_module
from stripe import WebhookSignature

MESSAGES = [
    ("No Stripe-Signature header", "missing_header"),
    ("No webhook secret", "missing_secret"),
    ("Unable to extract timestamp", "malformed_header"),
    ("No signatures found with expected scheme", "no_v1_signature"),
    ("No signatures found matching", "signature_mismatch"),
    ("Timestamp outside the tolerance zone", "timestamp_expired"),
]


def payload_of(case):
    if case.get("payload_b64") is not None:
        return base64.b64decode(case["payload_b64"])
    return case["payload"].encode("utf-8")


def header_of(case):
    h = case["header"]
    if h is None:
        return None
    return h.replace("{py}", "0" * 64).replace("{node}", "0" * 64)


def verdict_one(payload, header, secret, tolerance, now):
    webhook_module.time = types.SimpleNamespace(time=lambda: float(now))
    try:
        WebhookSignature.verify_header(payload, header, secret, tolerance)
        return "ok"
    except stripe.SignatureVerificationError as e:
        msg = str(e)
        for needle, kind in MESSAGES:
            if needle in msg:
                return kind
        return "error:SignatureVerificationError:" + msg[:60]
    except UnicodeDecodeError:
        return "invalid_payload_encoding"
    except TypeError as e:
        # hmac.compare_digest refuses non-ASCII str: an unreadable v1.
        if "comparing strings with non-ASCII" in str(e) or "unsupported operand" in str(e):
            return "malformed_header"
        return "error:TypeError:" + str(e)[:60]
    except Exception as e:  # noqa: BLE001 - report anything else verbatim
        return "error:%s:%s" % (type(e).__name__, str(e)[:60])


def main():
    mode, path = sys.argv[1], sys.argv[2]
    cases = json.load(open(path, encoding="utf-8"))
    out = {}
    for case in cases:
        payload = payload_of(case)
        header = header_of(case)
        if mode == "record":
            seen = []
            original = WebhookSignature._compute_signature

            def recording(signed, secret, _orig=original, _seen=seen):
                _seen.append(signed)
                return _orig(signed, secret)

            WebhookSignature._compute_signature = staticmethod(recording)
            try:
                verdict_one(payload, header, "whsec_record", 0, case["now"])
            finally:
                WebhookSignature._compute_signature = staticmethod(original)
            out[case["name"]] = seen[0] if seen else None
        else:
            out[case["name"]] = [
                verdict_one(payload, header, s, case["tolerance"], case["now"])
                for s in case["secrets"]
            ]
    json.dump(out, sys.stdout, ensure_ascii=True)


if __name__ == "__main__":
    main()
