#!/usr/bin/env bash
# On the GPU machine: install the carried kit (bench/gpu_kit.py) into /tmp/site and run
# bench/gpu_validate.py with it, keeping the JSON and the whole log under $OUT.
#
#   bash bench/gpu_device.sh --calls 2                  # what bench/README.md's device command runs
#   bash bench/gpu_device.sh --calls 2 --batches 1,4    # fewer batch sizes
#
# Arguments go to gpu_validate.py. PYTHON (python3: the device's, which holds torch),
# SITE (/tmp/site), KIT (.whl) and LIMIT_S (560: under the device's 10 minutes a command,
# so the log is closed before the tool's own limit) can be changed; CI's dry run
# (tests/e2e/test_gpu_kit.py) runs this script with a CPU stand-in for the device's Python.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
SITE=${SITE:-/tmp/site}
KIT=${KIT:-.whl}
LIMIT_S=${LIMIT_S:-560}
: "${OUT:?OUT must name the folder for the results (the device tool sets it)}"
if ! compgen -G "$KIT/*.whl" >/dev/null; then
  echo "no wheels in $KIT: run 'python bench/gpu_kit.py' first and carry $KIT" >&2
  exit 2
fi
"$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$KIT"/*.whl || exit 1
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$OUT/nvidia-smi.csv" 2>&1
fi
# HF_HUB_OFFLINE: nothing there reaches the hub, so a stray hub call fails at once instead of waiting.
PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONPATH="$SITE:." timeout "$LIMIT_S" \
  "$PYTHON" bench/gpu_validate.py --json "$OUT/gpu_validate.json" "$@" 2>&1 | tee "$OUT/gpu_validate.log"
