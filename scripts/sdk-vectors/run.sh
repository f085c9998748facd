#!/usr/bin/env bash
# Decides the `expected` verdict of every case in
# tests/data/vectors/signatures.json by running Stripe's official SDKs:
# stripe-python (WebhookSignature.verify_header) and stripe-node
# (stripe.webhooks.signature.verifyHeader), at the pinned versions below.
# A case is "ok" only when both SDKs accept it; see cases.py for how
# refusals map to the crate's error kinds. Never uses this crate.
#
#   scripts/sdk-vectors/run.sh [OUT.json]   (default: rewrite the vector file)
#
# Needs python3 (with venv), node and npm, and access to PyPI and npm.
# SCRATCH=/some/dir reuses an install directory.
set -euo pipefail

STRIPE_PYTHON_VERSION=16.1.0
STRIPE_NODE_VERSION=23.1.0

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
VECTORS="$ROOT/tests/data/vectors/signatures.json"
OUT="${1:-$VECTORS}"
SCRATCH="${SCRATCH:-$(mktemp -d)}"
mkdir -p "$SCRATCH"
cd "$SCRATCH"

if [ ! -x venv/bin/python ]; then python3 -m venv venv; fi
venv/bin/pip install --quiet "stripe==$STRIPE_PYTHON_VERSION"
[ -f package.json ] || echo '{"private": true}' > package.json
npm install --silent --no-audit --no-fund "stripe@$STRIPE_NODE_VERSION" >/dev/null

echo "python $(venv/bin/python -c 'import sys; print(sys.version.split()[0])')," \
  "stripe-python $(venv/bin/python -c 'import stripe; print(stripe.VERSION)')"
echo "node $(node --version)," \
  "stripe-node $(node -p 'require("./node_modules/stripe/package.json").version')"

python3 "$HERE/cases.py" templates "$VECTORS" > templates.json
venv/bin/python "$HERE/verdicts.py" record templates.json > rec_py.json
NODE_PATH="$SCRATCH/node_modules" node "$HERE/verdicts.js" record templates.json > rec_node.json
python3 "$HERE/cases.py" fill templates.json rec_py.json rec_node.json > new.json
python3 - "$VECTORS" new.json > all.json <<'PY'
import json, sys
old = json.load(open(sys.argv[1], encoding="utf-8"))
new = json.load(open(sys.argv[2], encoding="utf-8"))
names = {c["name"] for c in new}
json.dump([c for c in old if c["name"] not in names] + new, sys.stdout)
PY
venv/bin/python "$HERE/verdicts.py" verdicts all.json > v_py.json
NODE_PATH="$SCRATCH/node_modules" node "$HERE/verdicts.js" verdicts all.json > v_node.json
python3 "$HERE/cases.py" finish "$VECTORS" new.json v_py.json v_node.json "$OUT"
echo "wrote $OUT"
