"""The Python side of benches/peers/run.sh: stripe-python's
stripe.Webhook.construct_event on the payload, header and secret written by
the Rust harness (directory given as the first argument). Same method:
calibrate a batch to ~20 ms, time 15 batches, print the median ns per call."""
import pathlib
import sys
import time

import stripe

d = pathlib.Path(sys.argv[1])
payload = (d / "payload.json").read_text()
header = (d / "header.txt").read_text()
secret = (d / "secret.txt").read_text()


def median_ns(f):
    n = 1
    while True:
        start = time.perf_counter_ns()
        for _ in range(n):
            f()
        if time.perf_counter_ns() - start >= 20_000_000:
            break
        n *= 2
    samples = []
    for _ in range(15):
        start = time.perf_counter_ns()
        for _ in range(n):
            f()
        samples.append((time.perf_counter_ns() - start) / n)
    samples.sort()
    return samples[len(samples) // 2]


# Must succeed before it is timed.
event = stripe.Webhook.construct_event(payload, header, secret)
assert event.id == "evt_1PgcBench0000000000", event.id
ns = median_ns(lambda: stripe.Webhook.construct_event(payload, header, secret))
print(f"stripe-python/construct_event {ns:.1f}")
