#!/usr/bin/env bash
# Install everything the tests need (project, test tools, the bundled dataset), lint, run the tests.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/setup.sh
"$DIST_COOP_PY" -m ruff check dist_coop tests benchmarks experiments launch
"$DIST_COOP_PY" -m ruff format --check dist_coop tests benchmarks experiments launch
# two test files at a time (pytest-xdist; DIST_COOP_TEST_WORKERS=1 for one), whole files per worker so that
# a module's shared fixture (a multi-process run) is made once; the 15 slowest tests listed at the end
workers="${DIST_COOP_TEST_WORKERS:-2}"
if [ "$workers" -gt 1 ]; then
    exec "$DIST_COOP_PY" -m pytest -q -n "$workers" --dist loadfile --durations=15 "$@"
fi
exec "$DIST_COOP_PY" -m pytest -q --durations=15 "$@"
