#!/usr/bin/env bash
# Set up .venv if needed, then run the whole test suite (slow tests included), and the cache and generation tests
# again against the oldest supported transformers (in .venv-oldest), as CI does.
# Extra arguments go to the main pytest run, e.g. `bash scripts/test.sh -m "not slow"`, and skip the second run.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OLDEST_TRANSFORMERS="transformers==5.18.0"
cd "$ROOT"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
bash scripts/setup_env.sh
.venv/bin/python -m pytest "$@"
if [ "$#" -eq 0 ]; then
  echo "[test] cache and generation tests with the oldest supported $OLDEST_TRANSFORMERS"
  VENV=.venv-oldest EXTRA_PINS="$OLDEST_TRANSFORMERS" bash scripts/setup_env.sh
  .venv-oldest/bin/python -c "import transformers; print('[test] transformers', transformers.__version__)"
  .venv-oldest/bin/python -m pytest tests/test_cache.py tests/test_generation.py
fi
