#!/usr/bin/env bash
# Regenerate constraints.txt (the lock) from a fresh resolve of pyproject.toml's ranges.
# Run on Linux x86-64; the torch pin is written without its local build tag (+cpu/+cuXXX) so the
# same lock serves CPU and GPU machines.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
tmp=$(mktemp -d)
python3 -m venv "$tmp/venv"
"$tmp/venv/bin/pip" install -q --upgrade pip
"$tmp/venv/bin/pip" install -q "torch==$(grep -E '^torch==' constraints.txt | cut -d= -f3)"
# Prefect's own metadata admits versions that break it (see README, Reproducibility).
"$tmp/venv/bin/pip" install -q -e ".[dev]" "fastapi==0.150.0" "sqlalchemy<2.1"
{
  echo "# Exact versions of every dependency, resolved on Linux x86-64 / Python $("$tmp/venv/bin/python" -c 'import platform; print(platform.python_version())') (CPU torch build)."
  echo "# scripts/setup.sh installs with \`-c constraints.txt\`; regenerate with scripts/lock.sh."
  echo "# Prefect 3.8.8 needs fastapi==0.150.0 and SQLAlchemy<2.1 (see README, Reproducibility)."
  "$tmp/venv/bin/pip" freeze --exclude-editable | sed -E 's/^(torch==[^+]+)\+.*/\1/' | grep -v -E '^nvidia-|^triton=='
} > constraints.txt
rm -rf "$tmp"
echo "constraints.txt: $(grep -c '==' constraints.txt) pins"
