#!/usr/bin/env bash
# Install everything the tests need (project, test tools, the bundled dataset), lint, run the tests.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/setup.sh
"$DIST_COOP_PY" -m ruff check dist_coop tests benchmarks launch
"$DIST_COOP_PY" -m ruff format --check dist_coop tests benchmarks launch
exec "$DIST_COOP_PY" -m pytest -q --durations=15 "$@"
