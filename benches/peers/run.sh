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

results="$work/out/results.txt"
"$work/rust/target/release/peers-rust" "$work/out" > "$results"
NODE_PATH="$work/node/node_modules" node "$repo/benches/peers/node.js" "$work/out" >> "$results"
"$work/pyenv/bin/python" "$repo/benches/peers/python.py" "$work/out" >> "$results"

echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), load $(cut -d' ' -f1-3 /proc/loadavg)"
grep -v '^[a-z_/.-]* [0-9.]*$' "$results" || true
awk '
  /^[a-z_\/.-]+ [0-9.]+$/ { name[NR] = $1; ns[NR] = $2; if ($1 == "raw_hmac_sha256") base = $2; order[++n] = NR }
  END {
    printf "| %-30s | %12s | %8s |\n", "operation (2 KiB event)", "median", "× HMAC"
    printf "|%s|%s|%s|\n", "--------------------------------", "-------------:", "---------:"
    for (i = 1; i <= n; i++) {
      r = order[i]; t = ns[r]
      unit = (t >= 1000) ? sprintf("%.2f µs", t / 1000) : sprintf("%.0f ns", t)
      printf "| %-30s | %12s | %8.2f |\n", name[r], unit, t / base
    }
  }' "$results"
