#!/usr/bin/env bash
# Create (or reuse) .venv and install the project with the exact versions in constraints.txt.
# Where no NVIDIA GPU is present, the CPU build of PyTorch goes in first, so nothing pulls the
# multi-GB CUDA build; on a GPU machine the ordinary install brings the CUDA build.
#   PYTHON=python3.11        interpreter used to create the venv
#   TORCH_INDEX_URL=URL      where the CPU torch build comes from (e.g. https://download.pytorch.org/whl/cpu);
#                            unset: pip's configured sources
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $($python --version 2>&1)"
  "$python" -m venv .venv
fi

stamp=.venv/.posttrain-installed
want=$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
  exit 0
fi

start=$(date +%s)
pip=(.venv/bin/python -m pip install --disable-pip-version-check)
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "setup: NVIDIA GPU found: the CUDA build of torch comes with the project install"
  else
    torch_version=$(grep -E '^torch==' constraints.txt | cut -d= -f3)
    echo "setup: no GPU found: installing the CPU build of torch $torch_version first"
    if [ -n "${TORCH_INDEX_URL:-}" ]; then
      "${pip[@]}" -c constraints.txt "torch==$torch_version" --index-url "$TORCH_INDEX_URL"
    else
      "${pip[@]}" -c constraints.txt "torch==$torch_version"
    fi
  fi
fi
echo "setup: installing the project and its locked dependencies"
"${pip[@]}" -q -c constraints.txt -e ".[dev]"
echo "$want" > "$stamp"
echo "setup: done in $(( $(date +%s) - start )) s"
