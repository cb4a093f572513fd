#!/usr/bin/env bash
# The two commands of the README:
#   ./run.sh pipeline [ARGS]     run the whole default recipe end to end (embedded defaults, no servers)
#   ./run.sh test [PYTEST ARGS]  run the test suite: the fast lane (unit tests, stops at the first
#                                failure), then the integration tests on every core (pytest-xdist, one
#                                test file per worker); with arguments, pytest runs exactly those
#   ./run.sh test-fast           the fast lane alone: unit tests, no trainer, no service (about a minute)
# Each creates or reuses .venv and installs what it needs first.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
bash scripts/setup.sh
source scripts/env.sh
command=${1:-}
shift || true
workers=${POSTTRAIN_TEST_WORKERS:-auto}  # pytest-xdist workers for the integration lane
fast_lane=(python -m pytest tests/unit -x -q -n "$workers")
case "$command" in
  pipeline) exec posttrain run "$@" ;;
  test)
    if [ $# -gt 0 ]; then exec python -m pytest "$@"; fi
    "${fast_lane[@]}"
    exec python -m pytest tests/integration -q -n "$workers" --dist loadfile
    ;;
  test-fast) exec "${fast_lane[@]}" "$@" ;;
  *) echo "usage: ./run.sh pipeline|test|test-fast [ARGS]" >&2; exit 2 ;;
esac
