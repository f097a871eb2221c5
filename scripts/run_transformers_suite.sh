#!/usr/bin/env bash
# Run transformers' own common model and generation tests (ModelTesterMixin, GenerationTesterMixin, ConfigTester)
# against RAT: tests/transformers_suite/test_modeling_rat.py, with the mixins taken from a transformers test folder.
#
#   bash scripts/run_transformers_suite.sh DIR [pytest arguments...]
#
# DIR is the `tests` folder of a transformers checkout at the installed version (or the checkout itself). The
# release's source distribution holds `tests/test_modeling_common.py` but not `tests/generation/`,
# `tests/exporters/` or `tests/utils/`: copy those in from the repository at the same tag (see
# docs/transformers_suite.md). Slow tests (torch.export among them) run with RUN_SLOW=1, as in transformers' CI.
# PYTHON selects the interpreter (default: .venv/bin/python).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ "$#" -lt 1 ]; then
  echo "error: give the transformers tests folder: bash scripts/run_transformers_suite.sh DIR [pytest arguments...]" >&2
  exit 2
fi
TESTS_DIR="$1"
shift
if [ ! -d "$TESTS_DIR" ]; then
  echo "error: $TESTS_DIR is not a folder: give the tests folder of a transformers checkout" >&2
  exit 2
fi
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
if [ ! -x "$PYTHON" ]; then
  echo "error: no Python interpreter at $PYTHON: run scripts/setup_env.sh or set PYTHON" >&2
  exit 2
fi
cd "$ROOT"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export TRANSFORMERS_TESTS_DIR="$(cd "$TESTS_DIR" && pwd)"
"$PYTHON" -c "import transformers; print('[transformers suite] transformers', transformers.__version__, 'tests from', '$TRANSFORMERS_TESTS_DIR')"
exec "$PYTHON" -m pytest tests/transformers_suite -p no:cacheprovider "$@"
