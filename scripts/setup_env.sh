#!/usr/bin/env bash
# Create (or reuse) a virtual environment (default .venv in the repository root) and install rat-transformers into
# it. On machines without CUDA the CPU build of torch is installed first, so that no multi-GB CUDA build is pulled.
#   VENV=.venv-oldest EXTRA_PINS="transformers==5.18.0" bash scripts/setup_env.sh   # another environment
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3}"
VENV="${VENV:-.venv}"
EXTRA_PINS="${EXTRA_PINS:-}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV with $($PYTHON --version)"
  "$PYTHON" -m venv "$VENV"
fi
VENV_PY="$ROOT/$VENV/bin/python"
if ! "$VENV_PY" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
    echo "[setup] CUDA found: installing torch with CUDA support"
    "$VENV_PY" -m pip install -q "torch>=2.5"
  else
    # pip's own configuration decides where torch comes from. Where the default index serves the CUDA build, point
    # pip at an index of CPU builds first, e.g. `PIP_INDEX_URL=<index of CPU wheels> bash scripts/setup_env.sh`
    # (or `PIP_EXTRA_INDEX_URL`, or `pip config set global.index-url ...`); a local CPU wheel on pip's find-links
    # (`PIP_FIND_LINKS`) is taken as it is.
    echo "[setup] no CUDA: installing torch 2.13.0 as pip is configured (set PIP_INDEX_URL to an index of CPU builds to avoid the CUDA build)"
    "$VENV_PY" -m pip install -q "torch==2.13.0"
  fi
fi
STAMP="$VENV/.rat-installed"
if [ ! -f "$STAMP" ] || [ setup.py -nt "$STAMP" ] || [ "$(cat "$STAMP")" != "$EXTRA_PINS" ]; then
  echo "[setup] installing rat-transformers[dev] (editable) ${EXTRA_PINS:+with $EXTRA_PINS }into $VENV"
  # shellcheck disable=SC2086
  "$VENV_PY" -m pip install -q -e ".[dev]" $EXTRA_PINS
  if command -v nvidia-smi >/dev/null 2>&1; then "$VENV_PY" -m pip install -q -e ".[triton]"; fi
  echo -n "$EXTRA_PINS" > "$STAMP"
fi
