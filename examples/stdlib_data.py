"""Datasets built from text present on every machine: the Python standard library's sources.

* `standard_library_corpus`: one document per module source file, for language-model pretraining.
* `code_summarization_dataset`: code summarization as in CodeXGLUE code-to-text: a function's code (its docstring
  removed) -> the first sentence of its docstring.

Both split the standard library the same way, by top-level package (`email.*` stays together), with a stable hash:
80% train, 10% validation, 10% test. Pretraining uses the train packages (validation loss on the validation
packages), fine-tuning draws its train/validation/test functions from the same packages, so no stage ever sees a
test function, not even in pretraining. Function bodies are deduplicated across the whole library before the split,
so no body appears in two splits.
"""

from __future__ import annotations

import ast
import copy
import hashlib
import os
import re
import sysconfig
from dataclasses import dataclass
from pathlib import Path


SPLITS = ("train", "validation", "test")
# Folders that are not library code (tests, bundled wheels, demos, an old parser with syntax-error test data).
EXCLUDED_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "lib2to3", "idlelib",
                 "turtledemo", "ensurepip", "pydoc_data", "venv"}


@dataclass(frozen=True)
class LibraryModule:
    name: str  # dotted module name, e.g. "email.parser"
    path: Path

    @property
    def package(self) -> str:
        return self.name.split(".")[0]


def standard_library_dir() -> Path:
    """The folder of the running interpreter's standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def standard_library_modules(root: Path | None = None) -> list[LibraryModule]:
    """The standard library's pure-Python modules (tests and bundled third-party code excluded), sorted by name."""
    root = Path(root) if root is not None else standard_library_dir()
    if not root.is_dir():
        raise FileNotFoundError(f"Standard library folder {root} not found (sysconfig stdlib path).")
    modules = []
    for directory, subdirectories, files in os.walk(root):
        subdirectories[:] = sorted(
            d for d in subdirectories if d not in EXCLUDED_DIRS and not d.startswith(("config-", "plat-", "."))
        )
        relative = Path(directory).relative_to(root)
        for file_name in sorted(files):
            if not file_name.endswith(".py") or file_name.startswith(("test_", "_test")):
                continue
            parts = list(relative.parts) + [file_name[:-3]]
            if parts[-1] == "__init__":
                parts = parts[:-1] or ["__init__"]
            modules.append(LibraryModule(".".join(parts), Path(directory) / file_name))
    return sorted(modules, key=lambda module: module.name)


def split_of(package: str, validation_fraction: float = 0.1, test_fraction: float = 0.1) -> str:
    """The split of a top-level package: a stable hash (the same on every machine and Python version)."""
    if not (0 <= validation_fraction and 0 <= test_fraction and validation_fraction + test_fraction < 1):
        raise ValueError(
            f"Split fractions must be >= 0 and leave room for training: validation {validation_fraction}, "
            f"test {test_fraction}."
        )
    bucket = int(hashlib.sha256(package.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    if bucket < test_fraction:
        return "test"
    if bucket < test_fraction + validation_fraction:
        return "validation"
    return "train"


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None


def standard_library_corpus(validation_fraction: float = 0.1, test_fraction: float = 0.1,
                            root: Path | None = None) -> dict[str, list[dict]]:
    """
    Pretraining documents, one per module source file: {"train": [...], "validation": [...], "test": [...]}, each
    a list of {"module": name, "text": source}.
    """
    corpus = {split: [] for split in SPLITS}
    for module in standard_library_modules(root):
        text = _read(module.path)
        if text and text.strip():
            corpus[split_of(module.package, validation_fraction, test_fraction)].append({"module": module.name, "text": text})
    return corpus


# ========================================================================================== code summarization

_SENTENCE_END = re.compile(r"(?<=[a-z0-9_)\]`'\"])[.!?](\s|$)")


def docstring_summary(docstring: str) -> str | None:
    """The first sentence of a docstring's first paragraph, on one line, or None if it does not look like one."""
    paragraph = docstring.strip().split("\n\n")[0]
    text = " ".join(line.strip() for line in paragraph.splitlines()).strip()
    match = _SENTENCE_END.search(text)
    if match:
        text = text[: match.start() + 1]
    words = text.split()
    if not 3 <= len(words) <= 40 or ">>>" in text or text.startswith((":", "@", "-", "*", "=")):
        return None
    return text


def _without_docstring(function: ast.AST) -> ast.AST | None:
    function = copy.deepcopy(function)
    body = function.body
    if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) \
            and isinstance(body[0].value.value, str):
        body = body[1:]
    if not body:
        return None
    function.body = body
    return function


def module_functions(module: LibraryModule, max_code_chars: int = 3000) -> list[dict]:
    """
    Code summarization examples of one module: every function and method with a usable docstring summary, as
    {"module", "name", "code", "body", "summary"}; `code` is the function re-printed from its syntax tree without
    its own docstring and without comments (`ast.unparse`); `body` is its statements only (for deduplication).
    """
    source = _read(module.path)
    if source is None:
        return []
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    examples = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or node.name.startswith("test"):
            continue
        docstring = ast.get_docstring(node, clean=True)
        if not docstring:
            continue
        summary = docstring_summary(docstring)
        stripped = _without_docstring(node) if summary else None
        if stripped is None:
            continue
        code = ast.unparse(stripped)
        if len(code) > max_code_chars:
            continue
        body = "\n".join(ast.unparse(statement) for statement in stripped.body)
        examples.append({"module": module.name, "name": node.name, "code": code, "body": body, "summary": summary})
    return examples


def code_summarization_dataset(validation_fraction: float = 0.1, test_fraction: float = 0.1,
                               max_code_chars: int = 3000, root: Path | None = None):
    """
    The code-to-text task on the standard library as a `datasets.DatasetDict` with train/validation/test splits and
    columns "code" and "summary" (plus "module" and "name"). Split by top-level package; function bodies are
    deduplicated across the library (the first occurrence in module-name order is kept), so no body and no module
    appears in two splits.
    """
    from datasets import Dataset, DatasetDict

    rows = {split: [] for split in SPLITS}
    seen_bodies = set()
    for module in standard_library_modules(root):
        split = split_of(module.package, validation_fraction, test_fraction)
        for example in module_functions(module, max_code_chars):
            key = hashlib.sha256(example.pop("body").encode()).hexdigest()
            if key in seen_bodies:
                continue
            seen_bodies.add(key)
            rows[split].append(example)
    columns = ["module", "name", "code", "summary"]
    return DatasetDict(
        {split: Dataset.from_dict({column: [row[column] for row in rows[split]] for column in columns}) for split in SPLITS}
    )
