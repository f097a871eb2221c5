#!/usr/bin/env bash
# Create (or reuse) the virtual environment .venv in the repository root and install rat-transformers into it.
# On machines without CUDA the CPU build of torch is installed first, so that no multi-GB CUDA build is pulled.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
VENV_PY="$ROOT/.venv/bin/python"
if ! "$VENV_PY" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
    echo "[setup] CUDA found: installing torch with CUDA support"
    "$VENV_PY" -m pip install -q "torch>=2.4"
  else
    echo "[setup] no CUDA: installing the CPU build of torch 2.13.0"
    "$VENV_PY" -m pip install -q --no-index "torch==2.13.0" 2>/dev/null \
      || "$VENV_PY" -m pip install -q "torch==2.13.0" --extra-index-url https://download.pytorch.org/whl/cpu
  fi
fi
STAMP=".venv/.rat-installed"
if [ ! -f "$STAMP" ] || [ setup.py -nt "$STAMP" ]; then
  echo "[setup] installing rat-transformers[dev] (editable) and its dependencies"
  "$VENV_PY" -m pip install -q -e ".[dev]"
  if command -v nvidia-smi >/dev/null 2>&1; then "$VENV_PY" -m pip install -q -e ".[triton]"; fi
  touch "$STAMP"
fi
