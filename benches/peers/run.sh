#!/usr/bin/env bash
# Peers side by side, in one sitting: this crate's verify and verify + parse,
# async-stripe's construct_event (cargo), stripe-node's constructEvent (npm)
# and stripe-python's construct_event (pip), on the 2 KiB event and secret
# of benches/pipeline.rs, each as a ratio to the raw HMAC-SHA256 of the same
# 2 KiB measured in the same sitting.
#
# Usage: benches/peers/run.sh
# Installs everything under target/peers/ (outside the sources; nothing is
# vendored): a scratch cargo crate built from benches/peers/Cargo.toml.in,
# stripe@23.1.0 from npm, stripe==16.1.0 from PyPI in a virtualenv.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
work="$repo/target/peers"
mkdir -p "$work/rust" "$work/node" "$work/out"

# async-stripe (and this crate, by path), built in release.
sed "s|@REPO@|$repo|g" "$repo/benches/peers/Cargo.toml.in" > "$work/rust/Cargo.toml"
(cd "$work/rust" && cargo build --release --quiet)
# stripe-node.
if [ ! -d "$work/node/node_modules/stripe" ]; then
  (cd "$work/node" && npm init -y >/dev/null && npm install --silent stripe@23.1.0)
fi
# stripe-python.
if [ ! -x "$work/pyenv/bin/python" ]; then
  python3 -m venv "$work/pyenv"
  "$work/pyenv/bin/pip" install --quiet stripe==16.1.0
fi

# ROUNDS rounds (default 3) of the three harnesses one after the other;
# the table gives each operation's median over the rounds (the machine's
# load moves single runs a lot).
results="$work/out/results.txt"
: > "$results"
for round in $(seq "${ROUNDS:-3}"); do
  "$work/rust/target/release/peers-rust" "$work/out" >> "$results"
  NODE_PATH="$work/node/node_modules" node "$repo/benches/peers/node.js" "$work/out" >> "$results"
  "$work/pyenv/bin/python" "$repo/benches/peers/python.py" "$work/out" >> "$results"
done

echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), load $(cut -d' ' -f1-3 /proc/loadavg)"
grep -Ev '^[A-Za-z0-9_/.()-]+ [0-9.]+$' "$results" | sort -u || true
sort -k1,1 -k2,2n "$results" | awk '
  /^[A-Za-z0-9_\/.()-]+ [0-9.]+$/ { v[$1, ++c[$1]] = $2 }
  END {
    # The median of each operation (values arrive sorted per name).
    for (k in c) med[k] = (c[k] % 2) ? v[k, (c[k] + 1) / 2] : (v[k, c[k] / 2] + v[k, c[k] / 2 + 1]) / 2
    print_table()
  }
  function print_table(   i, r, t, unit, names, n) {
    n = split("raw_hmac_sha256 ours/verify ours/verify_and_parse async-stripe/construct_event async-stripe/construct_event(refused) stripe-node/constructEvent stripe-python/construct_event", names, " ")
    base = med["raw_hmac_sha256"]
    printf "| %-38s | %12s | %8s |\n", "operation (2 KiB event)", "median", "× HMAC"
    printf "|%s|%s|%s|\n", "----------------------------------------", "-------------:", "---------:"
    for (i = 1; i <= n; i++) {
      r = names[i]
      if (!(r in med)) continue
      t = med[r]
      unit = (t >= 1000) ? sprintf("%.2f µs", t / 1000) : sprintf("%.0f ns", t)
      printf "| %-38s | %12s | %8.2f |\n", "`" r "`", unit, t / base
    }
  }'
