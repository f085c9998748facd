#!/usr/bin/env bash
# Instructions per operation under callgrind (see benches/instructions.rs).
# Usage: benches/instructions.sh [BINARY]  (default: build the bench and use it)
# Prints "operation instructions/call" for each operation.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bin="${1:-}"
if [ -z "$bin" ]; then
  bin=$(cargo bench --bench instructions --no-run --message-format=json 2>/dev/null \
    | sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | tail -n 1)
fi
count() { # op n -> instructions collected inside `measured`
  valgrind --tool=callgrind --toggle-collect='*measured*' --callgrind-out-file=/dev/null \
    "$bin" "$1" "$2" 2>&1 | sed -n 's/.*Collected : \([0-9]*\).*/\1/p'
}
printf '%-22s %14s\n' operation instructions/call
for spec in raw_hmac_sha256:2000 verify:2000 verify_and_parse:2000 subscription_view:1000 \
            new_event:1000 duplicate:2000 access_decide:2000; do
  op=${spec%%:*}; n=${spec##*:}
  total=$(count "$op" "$n")
  printf '%-22s %14d\n' "$op" "$(( total / n ))"
done
