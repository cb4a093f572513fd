#!/usr/bin/env bash
# The two commands of the README:
#   ./run.sh pipeline [ARGS]   run the whole default recipe end to end (embedded defaults, no servers)
#   ./run.sh test [PYTEST ARGS]  run the test suite
# Both create or reuse .venv and install what they need first.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
bash scripts/setup.sh
source scripts/env.sh
command=${1:-}
shift || true
case "$command" in
  pipeline) exec posttrain run "$@" ;;
  test) exec python -m pytest "$@" ;;
  *) echo "usage: ./run.sh pipeline|test [ARGS]" >&2; exit 2 ;;
esac
