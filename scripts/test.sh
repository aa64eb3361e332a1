#!/usr/bin/env bash
# Runs the test suite (CPU). Triton kernels run under the interpreter here.
set -euo pipefail
cd "$(dirname "$0")/.."
. "${PDSERVE_VENV:-.venv}/bin/activate"
if ! command -v nvidia-smi >/dev/null 2>&1; then
  export TRITON_INTERPRET=1
fi
python -m pytest -q -m "not gpu" --timeout=900 "$@"
