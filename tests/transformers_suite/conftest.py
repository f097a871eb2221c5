"""
Runs transformers' own common test mixins against RAT, from a copy of transformers' test folder outside this
repository (see `scripts/run_transformers_suite.sh`).

The tests here are collected only when `TRANSFORMERS_TESTS_DIR` names that folder: a transformers `tests/` directory
(or a source tree holding one) with `test_modeling_common.py` and `generation/test_utils.py`. It is loaded as the
package `tests`, the name its modules import each other by.
"""

import importlib.machinery
import importlib.util
import os
import sys
from pathlib import Path

import pytest


TESTS_DIR_VARIABLE = "TRANSFORMERS_TESTS_DIR"
REQUIRED_FILES = (
    "test_modeling_common.py",
    "test_configuration_common.py",
    "utils/test_configuration_utils.py",
    "generation/test_utils.py",
)
# Packages transformers' test modules import beyond what RAT itself needs.
TEST_PACKAGES = ("parameterized", "httpx")
# Markers that transformers' mixins put on their tests (transformers registers them in its own conftest; this
# repository runs pytest with --strict-markers).
TRANSFORMERS_MARKERS = (
    "generate",
    "torch_compile_test",
    "torch_export_test",
    "onnx_export_test",
    "executorch_export_test",
    "flash_attn_test",
    "flash_attn_3_test",
    "flash_attn_4_test",
    "accelerate_tests",
    "is_training_test",
    "is_tensor_parallel_test",
    "is_fsdp_test",
    "is_expert_parallel_test",
    "is_pipeline_test",
    "is_staging_test",
    "is_agent_test",
    "order",
)


def setup_problem() -> str | None:
    """What keeps transformers' tests from running here (folder or packages missing), or None."""
    value = os.environ[TESTS_DIR_VARIABLE]
    folder = transformers_tests_dir()
    missing_files = [name for name in REQUIRED_FILES if not (folder / name).is_file()]
    if missing_files:
        return (
            f"{TESTS_DIR_VARIABLE}={value} is not a transformers test folder: {', '.join(missing_files)} missing "
            "there. Point it at the `tests` folder of a transformers checkout (the release's source distribution "
            "lacks `generation/`, `exporters/` and `utils/`: copy them in from the repository at the same tag)."
        )
    missing_packages = [name for name in TEST_PACKAGES if importlib.util.find_spec(name) is None]
    if missing_packages:
        return (
            f"transformers' test modules import {', '.join(missing_packages)}, which this environment lacks: "
            f"pip install {' '.join(missing_packages)}"
        )
    loaded = sys.modules.get("tests")
    if loaded is not None and list(getattr(loaded, "__path__", [])) != [str(folder)]:
        return f"a package `tests` is already imported from {list(loaded.__path__)}, not from {folder}"
    return None


def transformers_tests_dir() -> Path:
    """The folder TRANSFORMERS_TESTS_DIR names, or its `tests` subfolder when it names a source tree."""
    folder = Path(os.environ[TESTS_DIR_VARIABLE]).expanduser().resolve()
    return folder / "tests" if (folder / "tests" / "test_modeling_common.py").is_file() else folder


def load_as_tests_package(folder: Path):
    """Make `import tests.<module>` resolve inside `folder`, as transformers' tests expect."""
    if "tests" in sys.modules:
        return
    spec = importlib.machinery.ModuleSpec("tests", None, is_package=True)
    spec.submodule_search_locations = [str(folder)]
    sys.modules["tests"] = importlib.util.module_from_spec(spec)


SETUP_PROBLEM = setup_problem() if os.environ.get(TESTS_DIR_VARIABLE) else None
if not os.environ.get(TESTS_DIR_VARIABLE) or SETUP_PROBLEM:
    collect_ignore_glob = ["test_*.py"]
else:
    load_as_tests_package(transformers_tests_dir())


def pytest_configure(config):
    for marker in TRANSFORMERS_MARKERS:
        config.addinivalue_line("markers", f"{marker}: set by transformers' test mixins")


def pytest_collection_finish(session):
    if SETUP_PROBLEM:  # after collection, so that the run stops with this one line rather than a traceback
        pytest.exit(f"error: {SETUP_PROBLEM}", returncode=pytest.ExitCode.USAGE_ERROR)
