"""Candidate cases and the bookkeeping around the two SDK runs (stdlib only).

    python3 cases.py templates VECTORS.json > templates.json
    python3 cases.py fill templates.json rec_py.json rec_node.json > new.json
    python3 cases.py finish VECTORS.json new.json v_py.json v_node.json OUT.json

`templates` lists the new cases. Their headers may hold `{py}` and `{node}`:
`fill` replaces them by the lower-case hex HMAC-SHA256, under the case's first
secret, of the exact string stripe-python / stripe-node fed to HMAC for that
case (recorded by verdicts.py / verdicts.js), so a signature is right for
what that SDK compares. `finish` turns the per-secret SDK verdicts into
`expected` (see `combine`), keeps the old cases in their order, and prints
every case whose SDK verdicts or `expected` changed.
"""

import hashlib
import hmac
import json
import sys

ORDER = [
    "missing_header",
    "missing_secret",
    "malformed_header",
    "no_v1_signature",
    "invalid_payload_encoding",
    "signature_mismatch",
    "timestamp_expired",
]
SECRET = "whsec_test_vectors_endpoint_A_2c1f9e"
T = 1700000000
NOW = 1700000000


def rank(kind):
    return ORDER.index(kind) if kind in ORDER else -1


def per_sdk(verdicts):
    """One SDK, several secrets (a rotation): ok if any secret verifies; else
    expired if any signature matched but was old; else the earliest kind in
    the crate's check order, ignoring secrets the SDK calls blank when
    another secret got further."""
    if "ok" in verdicts:
        return "ok"
    if "timestamp_expired" in verdicts:
        return "timestamp_expired"
    rest = [v for v in verdicts if v != "missing_secret"] or verdicts
    return min(rest, key=rank)


def combine(python, node):
    """Both SDKs: ok only when both accept; the refusal of the one that
    refuses; when both refuse, the earlier kind in the crate's check order."""
    if python == "ok" and node == "ok":
        return "ok"
    refusals = [v for v in (python, node) if v != "ok"]
    return min(refusals, key=rank)


def agreement(python, node):
    if python == node:
        return "full"
    if "ok" in (python, node):
        return "none"
    return "verdict"


def case(name, description, header, **kw):
    c = {
        "name": name,
        "description": description,
        "payload": kw.pop("payload", None),
        "header": header,
        "secrets": kw.pop("secrets", [SECRET]),
        "tolerance": kw.pop("tolerance", 300),
        "now": kw.pop("now", NOW),
    }
    assert not kw, kw
    return c


def templates(base_payload):
    out = []
    add = out.append
    ws = [
        ("nbsp", "\u00a0"), ("em_space", "\u2003"), ("ideographic_space", "\u3000"),
        ("ogham_space", "\u1680"), ("narrow_nbsp", "\u202f"), ("math_space", "\u205f"),
        ("line_separator", "\u2028"), ("paragraph_separator", "\u2029"),
        ("tab", "\t"), ("newline", "\n"), ("carriage_return", "\r"),
        ("vertical_tab", "\x0b"), ("form_feed", "\x0c"),
        ("next_line", "\x85"), ("bom", "\ufeff"), ("unit_separator", "\x1f"),
        ("zero_width_space", "\u200b"),
    ]
    for label, ch in ws:
        code = "U+%04X" % ord(ch)
        add(case(f"t_unicode_ws_{label}_before", f"{code} before the t value; v1 signs what stripe-python signs.",
                 f"t={ch}{T},v1={{py}}"))
        add(case(f"t_unicode_ws_{label}_after", f"{code} after the t value; v1 signs what stripe-python signs.",
                 f"t={T}{ch},v1={{py}}"))
    add(case("t_unicode_ws_mixed_around", "Several kinds of whitespace on both sides of t.",
             f"t= \u00a0\t\u3000{T}\u2003\n,v1={{py}}"))
    add(case("t_unicode_ws_next_line_before_two_sigs",
             "U+0085 before t: stripe-node reads NaN; one v1 per SDK's signed text.",
             f"t=\x85{T},v1={{py}},v1={{node}}"))
    add(case("t_unicode_ws_bom_before_two_sigs", "U+FEFF before t: stripe-python cannot read it.",
             f"t=\ufeff{T},v1={{py}},v1={{node}}"))
    add(case("t_trailing_text", "t followed by letters: stripe-node reads the leading digits.",
             f"t={T}abc,v1={{node}}"))
    add(case("t_plus_sign", "Explicit plus sign.", f"t=+{T},v1={{py}}"))
    add(case("t_leading_zeros", "Leading zeros.", f"t=000{T},v1={{py}}"))
    add(case("t_plus_sign_leading_zeros_and_spaces", "Sign, zeros and whitespace together.",
             f"t=\u3000+00{T}\u00a0,v1={{py}}"))
    add(case("t_minus_zero", "t=-0, signed as 0 by both; age check disabled.", "t=-0,v1={py}", tolerance=0))
    add(case("t_minus_one", "t=-1: stripe-node treats -1 as 'no timestamp'.", "t=-1,v1={py}", tolerance=0))
    add(case("t_minus_zero_one", "t=-01 is -1 too.", "t=-01,v1={py}", tolerance=0))
    add(case("t_sign_then_space", "Whitespace between sign and digits.", f"t=+ {T},v1={{py}},v1={{node}}"))
    add(case("t_decimal_point", "A fractional t.", f"t={T}.0,v1={{py}},v1={{node}}"))
    add(case("t_underscores_python_sig", "Digit separators: stripe-python reads 1700000000, stripe-node 1.",
             "t=1_700_000_000,v1={py}"))
    add(case("t_underscores_two_sigs", "Digit separators with one v1 per SDK; node's t=1 is far too old.",
             "t=1_700_000_000,v1={py},v1={node}"))
    add(case("t_underscores_two_sigs_tolerance0", "As above with the age check disabled.",
             "t=1_700_000_000,v1={py},v1={node}", tolerance=0))
    add(case("t_double_underscore", "Two separators in a row.", "t=1__700000000,v1={py},v1={node}", tolerance=0))
    add(case("t_arabic_indic_digits_python_sig", "U+0661.. digits: stripe-python reads them, stripe-node reads NaN.",
             "t=\u0661\u0667\u0660\u0660\u0660\u0660\u0660\u0660\u0660\u0660,v1={py}"))
    add(case("t_arabic_indic_digits_two_sigs", "U+0661.. digits with one v1 per SDK.",
             "t=\u0661\u0667\u0660\u0660\u0660\u0660\u0660\u0660\u0660\u0660,v1={py},v1={node}"))
    add(case("t_fullwidth_digits_two_sigs", "Full-width digits with one v1 per SDK.",
             "t=" + "".join(chr(0xFF10 + int(d)) for d in str(T)) + ",v1={py},v1={node}"))
    add(case("t_mixed_digits_two_sigs", "ASCII then Devanagari digits: stripe-node reads the ASCII prefix.",
             "t=17\u0966\u0966000000,v1={py},v1={node}", tolerance=0))
    big = [
        ("2pow53_plus1", "9007199254740993"),
        ("2pow60", "1152921504606846976"),
        ("i64_max", "9223372036854775807"),
        ("2pow63", "9223372036854775808"),
        ("1e20", "100000000000000000000"),
        ("1e21", "1000000000000000000000"),
        ("20_nines", "99999999999999999999"),
        ("400_digits", "7" * 400),
        ("4300_digits", "1" + "0" * 4299),
    ]
    for label, digits in big:
        add(case(f"t_beyond_i64_{label}_python_sig", f"t={digits[:24]}...: v1 signs what stripe-python signs.",
                 f"t={digits},v1={{py}}"))
        add(case(f"t_beyond_i64_{label}_node_sig", f"t={digits[:24]}...: v1 signs what stripe-node signs.",
                 f"t={digits},v1={{node}}"))
        add(case(f"t_beyond_i64_{label}_two_sigs", f"t={digits[:24]}...: one v1 per SDK.",
                 f"t={digits},v1={{py}},v1={{node}}"))
    add(case("t_beyond_i64_4301_digits", "More digits than stripe-python's int() reads.",
             "t=1" + "0" * 4300 + ",v1={py},v1={node}"))
    add(case("t_beyond_i64_negative_2pow63_two_sigs", "A very old t: both SDKs find it too old.",
             "t=-9223372036854775809,v1={py},v1={node}"))
    add(case("t_beyond_i64_negative_2pow63_tolerance0", "A very old t with the age check disabled.",
             "t=-9223372036854775809,v1={py},v1={node}", tolerance=0))
    add(case("t_beyond_i64_negative_400_digits_tolerance0", "Very negative: stripe-node signs -Infinity.",
             "t=-" + "3" * 400 + ",v1={py},v1={node}", tolerance=0))
    add(case("t_first_and_last_differ_two_sigs", "stripe-python reads the first t, stripe-node the last.",
             f"t={T},t={T - 10},v1={{py}},v1={{node}}"))
    add(case("t_last_is_bare_number_word", "A later t that stripe-node reads as NaN.",
             f"t={T},t=abc,v1={{py}},v1={{node}}"))
    add(case("t_first_old_last_new_two_sigs", "First t too old (python), last t fresh (node).",
             f"t={T - 1000},t={T},v1={{py}},v1={{node}}"))
    bom = "\ufeff" + base_payload
    add(case("bom_body_python_sig", "Body starts with a BOM; v1 signs it with the BOM.", f"t={T},v1={{py}}", payload=bom))
    add(case("bom_body_node_sig", "Body starts with a BOM; v1 signs it without.", f"t={T},v1={{node}}", payload=bom))
    add(case("bom_body_two_sigs", "Body starts with a BOM; one v1 per SDK.", f"t={T},v1={{py}},v1={{node}}", payload=bom))
    add(case("v1_empty_after_match", "An empty v1 after the matching one.", f"t={T},v1={{py}},v1="))
    add(case("v1_short_non_ascii_after_match", "A short non-ASCII v1 after the matching one.", f"t={T},v1={{py}},v1=\u00e9"))
    add(case("v1_64_units_non_ascii_after_match", "A 64-character non-ASCII v1 after the matching one.",
             f"t={T},v1={{py}},v1=\u00e9" + "a" * 63))
    add(case("v1_astral_64_units_after_match", "32 emoji (64 UTF-16 units) after the matching v1.",
             f"t={T},v1={{py}},v1=" + "\U0001F600" * 32))
    add(case("v1_astral_64_chars_after_match", "64 emoji (128 UTF-16 units) after the matching v1.",
             f"t={T},v1={{py}},v1=" + "\U0001F600" * 64))
    for c in out:
        if c["payload"] is None:
            c["payload"] = base_payload
    return out


def sign(secret, content):
    return hmac.new(secret.encode("utf-8"), content.encode("utf-8"), hashlib.sha256).hexdigest()


def fill(tpls, rec_py, rec_node):
    for c in tpls:
        py, node = rec_py.get(c["name"]), rec_node.get(c["name"])
        py_c = py if py is not None else node
        node_c = node if node is not None else py
        sig_py = sign(c["secrets"][0], py_c) if py_c is not None else "0" * 64
        sig_node = sign(c["secrets"][0], node_c) if node_c is not None else "0" * 64
        c["header"] = c["header"].replace("{py}", sig_py).replace("{node}", sig_node)
    return tpls


def finish(old, new, v_py, v_node):
    names = {c["name"] for c in new}
    cases = [c for c in old if c["name"] not in names] + new
    out = []
    changes = 0
    for c in cases:
        py, node = per_sdk(v_py[c["name"]]), per_sdk(v_node[c["name"]])
        expected = combine(py, node)
        before = {"python": c.get("sdk", {}).get("python"), "node": c.get("sdk", {}).get("node"),
                  "expected": c.get("expected")}
        after = {"python": py, "node": node, "expected": expected}
        if c["name"] not in names and before != after:
            changes += 1
            print(f"CHANGED {c['name']}: {before} -> {after}", file=sys.stderr)
        for v in (py, node):
            if v.startswith("error:"):
                print(f"UNMAPPED {c['name']}: {v}", file=sys.stderr)
        c = dict(c)
        c["expected"] = expected
        c["sdk"] = {"python": py, "node": node}
        c["sdk_agreement"] = agreement(py, node)
        out.append(c)
    print(f"{len(old)} existing cases re-run: {changes} changed; {len(new)} new cases", file=sys.stderr)
    return out


def load(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def main():
    cmd = sys.argv[1]
    if cmd == "templates":
        old = load(sys.argv[2])
        base = next(c["payload"] for c in old if c["name"] == "valid_basic")
        json.dump(templates(base), sys.stdout, ensure_ascii=False, indent=1)
    elif cmd == "fill":
        json.dump(fill(load(sys.argv[2]), load(sys.argv[3]), load(sys.argv[4])), sys.stdout,
                  ensure_ascii=False, indent=1)
    elif cmd == "finish":
        out = finish(load(sys.argv[2]), load(sys.argv[3]), load(sys.argv[4]), load(sys.argv[5]))
        with open(sys.argv[6], "w", encoding="utf-8") as f:
            json.dump(out, f, ensure_ascii=True, indent=1)
            f.write("\n")
    else:
        sys.exit(f"unknown command {cmd}")


if __name__ == "__main__":
    main()
