#!/usr/bin/env bash
# Install everything, then run the full cooperative training on the bundled data.
# Extra arguments are config overrides, e.g. --train.epochs=1. Each quick start trains afresh: an earlier one in
# runs/quickstart is moved aside to runs/quickstart.replaced-<time> (train.overwrite), never deleted.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/setup.sh
exec "$DIST_COOP_PY" -m dist_coop.cli train --config configs/quickstart.yaml --train.overwrite=true "$@"
