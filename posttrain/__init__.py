"""posttrain: reproducible multi-stage LLM post-training on TRL, DVC, Prefect and MLflow."""

import os

# Nothing may try to reach the internet by default (offline users, locked-down clusters): every
# tool's telemetry is off unless the user's environment says otherwise.
for _key, _value in {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DVC_NO_ANALYTICS": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    # Prefect's ephemeral server can take ~27 s to start on a fresh database; 20 s is its default.
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
}.items():
    os.environ.setdefault(_key, _value)

__version__ = "0.1.0"
