#!/usr/bin/env bash
# Set up .venv if needed, then run the main job on its built-in default (see README): the end-to-end demo
# (pretrain a small RAT, LoRA fine-tune it on code summarization, ROUGE, stage a Hub folder). Extra arguments go to
# examples/demo.py, e.g. `bash scripts/demo.sh --quick`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" TOKENIZERS_PARALLELISM=false
exec .venv/bin/python examples/demo.py "$@"
