#!/usr/bin/env bash
# The prepared GPU check (docs/gpu.md): bench/gpu_check.py after installing the carried wheels.
#
#   bench/gpu_wheels.sh                      # beforehand, where the registry is reachable: .gpu-payload/
#   bench/gpu_check.sh                       # on the GPU machine, from a fresh copy of the repo + .gpu-payload/
#   bench/gpu_check.sh --recipe configs/gpu-throughput-1.5b.yaml --stages cpt,sft
#   bench/gpu_check.sh --cpu-smoke           # the same code at toy size on CPU (CI); installs nothing
#
# Offline throughout (HF_HUB_OFFLINE, HF_DATASETS_OFFLINE). The wheels are installed against what the
# machine has (pip resolves, nothing from an index); where a pin conflicts with an installed version,
# they are installed without resolution and `pip check` is logged. Log: .gpu-payload/pip-install.log.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-$(command -v python || command -v python3)}
PAYLOAD=${GPU_PAYLOAD:-.gpu-payload}
# The check's time budget (--budget-seconds) counts from here: the wheels' install included.
export GPU_CHECK_T0=${GPU_CHECK_T0:-$(date +%s)}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" GPU_PAYLOAD="$PAYLOAD"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 DO_NOT_TRACK=true MLFLOW_DISABLE_TELEMETRY=true

if [[ " $* " != *" --cpu-smoke "* && -f "$PAYLOAD/wheels/requirements.txt" ]]; then
  started=$(date +%s)
  if ! "$PYTHON" -m pip install --no-index --find-links "$PAYLOAD/wheels" -r "$PAYLOAD/wheels/requirements.txt" \
      > "$PAYLOAD/pip-install.log" 2>&1; then
    echo "gpu_check: the wheels do not resolve against this machine (see $PAYLOAD/pip-install.log); installing them without resolution"
    "$PYTHON" -m pip install --no-index --no-deps "$PAYLOAD"/wheels/*.whl >> "$PAYLOAD/pip-install.log" 2>&1
    "$PYTHON" -m pip check >> "$PAYLOAD/pip-install.log" 2>&1 || true
  fi
  echo "gpu_check: wheels installed in $(( $(date +%s) - started )) s"
fi
exec "$PYTHON" bench/gpu_check.py "$@"
