#!/usr/bin/env bash
# Before/after in one sitting: runs two builds of benches/pipeline.rs
# alternately (A B A B ...), ROUNDS times each, and prints for every bench
# id the median over the rounds of criterion's point estimate, and of its
# ratio to raw_hmac_sha256 of the same run.
#
# Usage: benches/compare.sh BEFORE_BINARY AFTER_BINARY [ROUNDS (default 3)]
# Build a binary with `cargo bench --bench pipeline --no-run` at each commit
# and copy it out of target/release/deps/ first.
set -euo pipefail
before=$1 after=$2 rounds=${3:-3}
out=$(mktemp -d)
run() { # binary -> "id nanoseconds" per bench
  "$1" --bench --noplot 2>&1 | awk '
    /^[a-zA-Z_0-9]+\/[a-zA-Z_0-9\/]+/ { id = $1 }
    /time:/ && id != "" {
      # time:   [low unit mid unit high unit]; keep the middle estimate.
      s = $0; sub(/.*time: *\[/, "", s); split(s, f, " ")
      v = f[3]; u = f[4]
      m = (u == "ns") ? 1 : (u == "µs" || u == "us") ? 1000 : (u == "ms") ? 1e6 : (u == "ps") ? 0.001 : 1e9
      printf "%s %.3f\n", id, v * m; id = ""
    }'
}
for r in $(seq "$rounds"); do
  echo "round $r/$rounds, load $(cut -d' ' -f1 /proc/loadavg)" >&2
  run "$before" > "$out/before.$r"
  run "$after" > "$out/after.$r"
done
python3 - "$out" "$rounds" <<'PY'
import statistics, sys
out, rounds = sys.argv[1], int(sys.argv[2])
def load(side):
    runs = []
    for r in range(1, rounds + 1):
        runs.append(dict(l.split() for l in open(f"{out}/{side}.{r}") if l.strip()))
    return runs
def fmt(ns):
    return f"{ns/1000:.2f} µs" if ns >= 1000 else f"{ns:.1f} ns"
b, a = load("before"), load("after")
ids = [i for i in b[0] if i in a[0]]
print("| bench | before | ratio | after | ratio |")
print("|---|---:|---:|---:|---:|")
for i in ids:
    row = []
    for runs in (b, a):
        t = statistics.median(float(x[i]) for x in runs)
        rt = statistics.median(float(x[i]) / float(x["parse_2KiB/raw_hmac_sha256"]) for x in runs)
        row += [fmt(t), f"{rt:.2f}"]
    print(f"| `{i}` | " + " | ".join(row) + " |")
PY
