#!/usr/bin/env bash
# What bench/rollout_check.sh needs on a GPU machine that has torch and transformers but no TRL, no
# datasets and no network: the wheels below (versions from constraints.txt, CPython 3.12, x86-64
# Linux) and the SmolLM2 tokenizer files, in .whl/rollout/ (git-ignored). Carry that folder with the
# check; its measured size is in docs/generation.md ("The GPU check"). vLLM's wheel (hundreds of MB, plus
# its own CUDA build of torch) cannot travel within the 64 MiB a call may carry: the check measures
# hf against paged only.
#
#   bench/rollout_wheels.sh [PYTHON_VERSION]     # default 3.12, the lent GPU machine's
set -euo pipefail
cd "$(dirname "$0")/.."
PY_VERSION="${1:-3.12}"
OUT="${ROLLOUT_WHEELS:-.whl/rollout}"   # another folder: e.g. to try the kit for another Python here
# TRL and datasets, and what they import that a torch + transformers + accelerate machine lacks.
PACKAGES=(trl datasets pyarrow pandas dill multiprocess xxhash fsspec python-dateutil six pytz tzdata)

pin() {  # the version constraints.txt locks for package $1
  grep -i -E "^$1==" constraints.txt | head -1
}

rm -rf "$OUT" && mkdir -p "$OUT/tokenizer"
PYTHON="${PYTHON:-python}"
for package in "${PACKAGES[@]}"; do
  spec="$(pin "$package")"
  [ -n "$spec" ] || { echo "rollout_wheels: $package is not pinned in constraints.txt" >&2; exit 1; }
  "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --dest "$OUT" \
    --python-version "$PY_VERSION" --implementation cp --platform manylinux_2_28_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 "$spec"
done
# pyarrow's wheel alone is 50 MB: Arrow Flight (RPC; neither datasets nor TRL imports it, and unlike
# Substrait, pyarrow.lib does not link it), the C++ headers, sources and tests are dropped from it
# (-13 MB). The check unpacks the wheels itself (no pip install): the trimmed wheel's RECORD is not read.
"$PYTHON" - "$OUT"/pyarrow-*.whl <<'TRIM'
import re, sys, zipfile
path = sys.argv[1]
drop = re.compile(r"flight|^pyarrow/(include|tests|src)/")
with zipfile.ZipFile(path) as source:
    members = [(i, source.read(i)) for i in source.infolist() if not drop.search(i.filename)]
with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as target:
    for info, data in members:
        target.writestr(info, data)
print(f"trimmed {path}: {len(members)} members kept")
TRIM
TOKENIZER=models/smollm2-135m-instruct
[ -d "$TOKENIZER" ] || { echo "rollout_wheels: $TOKENIZER missing; run python scripts/fetch_smollm2.py" >&2; exit 1; }
for name in tokenizer.json tokenizer_config.json special_tokens_map.json vocab.json merges.txt; do
  [ -f "$TOKENIZER/$name" ] && cp "$TOKENIZER/$name" "$OUT/tokenizer/"
done
ls -l "$OUT" "$OUT/tokenizer"
echo "rollout_wheels: $(du -sb "$OUT" | cut -f1) bytes in $OUT ($(du -sh "$OUT" | cut -f1)); the carry limit is 64 MiB"
