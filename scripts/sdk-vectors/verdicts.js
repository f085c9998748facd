// Runs stripe-node's own verification on vector cases.
//
//   node verdicts.js record CASES.json   -> {name: signed content or null}
//   node verdicts.js verdicts CASES.json -> {name: [verdict per secret]}
//
// `record` reports the exact string stripe-node feeds to HMAC, captured by a
// CryptoProvider that wraps the SDK's own Node provider. `verdicts` runs
// `stripe.webhooks.signature.verifyHeader` once per configured secret with
// the payload as a Buffer (the raw body) and `receivedAt` = the case's `now`.
// Placeholders {py} / {node} in a header are replaced by 64 zeros.
'use strict';
const fs = require('fs');
const Stripe = require('stripe');

const stripe = new Stripe('sk_test_vectors_offline');
const real = Stripe.createNodeCryptoProvider();

const MESSAGES = [
  ['No stripe-signature header', 'missing_header'],
  ['No webhook payload', 'missing_header'],
  ['No webhook secret', 'missing_secret'],
  ['Unable to extract timestamp', 'malformed_header'],
  ['No signatures found with expected scheme', 'no_v1_signature'],
  ['No signatures found matching', 'signature_mismatch'],
  ['Timestamp outside the tolerance zone', 'timestamp_expired'],
];

function payloadOf(c) {
  if (c.payload_b64 != null) return Buffer.from(c.payload_b64, 'base64');
  return Buffer.from(c.payload, 'utf8');
}

function headerOf(c) {
  if (c.header == null) return null;
  return c.header.split('{py}').join('0'.repeat(64)).split('{node}').join('0'.repeat(64));
}

function verdictOne(payload, header, secret, tolerance, now, provider) {
  try {
    stripe.webhooks.signature.verifyHeader(payload, header, secret, tolerance, provider, now * 1000);
    return 'ok';
  } catch (e) {
    const msg = String(e && e.message);
    if (e instanceof Stripe.errors.StripeSignatureVerificationError) {
      for (const [needle, kind] of MESSAGES) if (msg.includes(needle)) return kind;
      return 'error:StripeSignatureVerificationError:' + msg.slice(0, 60);
    }
    // secureCompare throws on an empty v1 ("must receive two arguments") and
    // crypto.timingSafeEqual on a 64-unit non-ASCII v1 (byte lengths differ).
    if (msg.includes('secureCompare must receive two arguments')) return 'malformed_header';
    if (e instanceof RangeError && msg.includes('same byte length')) return 'malformed_header';
    return 'error:' + (e && e.name) + ':' + msg.slice(0, 60);
  }
}

const [mode, path] = process.argv.slice(2);
const cases = JSON.parse(fs.readFileSync(path, 'utf8'));
const out = {};
for (const c of cases) {
  const payload = payloadOf(c);
  const header = headerOf(c);
  if (mode === 'record') {
    let seen = null;
    const recording = {
      computeHMACSignature(content, secret) {
        if (seen === null) seen = content;
        return real.computeHMACSignature(content, secret);
      },
    };
    verdictOne(payload, header, 'whsec_record', 0, c.now, recording);
    out[c.name] = seen;
  } else {
    out[c.name] = c.secrets.map((s) => verdictOne(payload, header, s, c.tolerance, c.now, undefined));
  }
}
process.stdout.write(JSON.stringify(out));
