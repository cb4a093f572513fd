# Sourced by run.sh and .ci/run: the project's venv first on PATH (DVC stage commands find
# `python` through PATH) and every tool's telemetry off, so nothing tries to reach the internet.
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export PATH="$root/.venv/bin:$PATH"
export MLFLOW_DISABLE_TELEMETRY=true
export DO_NOT_TRACK=true
export PREFECT_SERVER_ANALYTICS_ENABLED=false
export DVC_NO_ANALYTICS=1
export HF_HUB_DISABLE_TELEMETRY=1
export PYTHONUNBUFFERED=1
