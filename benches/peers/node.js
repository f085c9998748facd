// The Node side of benches/peers/run.sh: stripe-node's
// stripe.webhooks.constructEvent on the payload, header and secret written
// by the Rust harness (directory given as the first argument). Same method:
// calibrate a batch to ~20 ms, time 15 batches, print the median ns per call.
'use strict';
const fs = require('fs');
const path = require('path');
const Stripe = require('stripe');

const dir = process.argv[2];
const payload = fs.readFileSync(path.join(dir, 'payload.json'), 'utf8');
const header = fs.readFileSync(path.join(dir, 'header.txt'), 'utf8');
const secret = fs.readFileSync(path.join(dir, 'secret.txt'), 'utf8');
const stripe = new Stripe('sk_test_unused');

function medianNs(f) {
  let n = 1;
  for (;;) {
    const start = process.hrtime.bigint();
    for (let i = 0; i < n; i++) f();
    if (process.hrtime.bigint() - start >= 20000000n) break;
    n *= 2;
  }
  const samples = [];
  for (let s = 0; s < 15; s++) {
    const start = process.hrtime.bigint();
    for (let i = 0; i < n; i++) f();
    samples.push(Number(process.hrtime.bigint() - start) / n);
  }
  samples.sort((a, b) => a - b);
  return samples[Math.floor(samples.length / 2)];
}

// Must succeed before it is timed.
const event = stripe.webhooks.constructEvent(payload, header, secret);
if (event.id !== 'evt_1PgcBench0000000000') throw new Error('unexpected event');
let sink = 0;
const ns = medianNs(() => {
  sink += stripe.webhooks.constructEvent(payload, header, secret).created;
});
console.log(`stripe-node/constructEvent ${ns.toFixed(1)}`);
if (sink === 0) console.error('unreachable');
