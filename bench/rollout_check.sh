#!/usr/bin/env bash
# GPU check of the generation engines (docs/generation.md): hf against paged rollouts (256 x 256
# tokens on a ~0.5B Llama) and the GRPO step split with each; one JSON in artifacts/bench/.
#
#   bench/rollout_check.sh               # one H100/H200 (planned <= 8 min)
#   bench/rollout_check.sh --cpu-smoke   # the same code at toy size on CPU (tests/integration/test_rollout_check.py)
#
# Needs python with torch and transformers >= 5.8. Where TRL or datasets are missing (the lent GPU
# machine: no TRL, no datasets, no network), the wheels of .whl/rollout/ (bench/rollout_wheels.sh,
# carried with the check; ROLLOUT_WHEELS=DIR for another folder) are unpacked into .whl/rollout.site-packages/
# and put on PYTHONPATH; nothing is installed into the machine's own environment.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
WHEELS="${ROLLOUT_WHEELS:-.whl/rollout}"
# "site-packages" in the name matters: dill (datasets' fingerprints) pickles modules from any other
# folder by value, and pickling pyarrow's that way fails (Can't pickle <class 'MonthDayNano'>).
if ! "$PYTHON" -c "import trl, datasets" 2>/dev/null; then
  [ -d "$WHEELS" ] || { echo "rollout_check: TRL/datasets not importable and no $WHEELS/ (run bench/rollout_wheels.sh)" >&2; exit 2; }
  SITE="$(cd "$(dirname "$WHEELS")" && pwd)/$(basename "$WHEELS").site-packages"
  rm -rf "$SITE" && mkdir -p "$SITE"
  for wheel in "$WHEELS"/*.whl; do
    "$PYTHON" -m zipfile -e "$wheel" "$SITE"
  done
  export PYTHONPATH="$SITE:$PYTHONPATH"
  "$PYTHON" -c "import trl, datasets; print('rollout_check: trl', trl.__version__, 'datasets', datasets.__version__, 'from $SITE')"
fi
exec "$PYTHON" bench/rollout_check.py "$@"
