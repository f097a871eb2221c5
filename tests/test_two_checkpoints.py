"""Several RAT checkpoints in one process: remote-code bundles, the installed package, in any order.

transformers keeps one global table of cache-layer classes per layer type; every copy of the RAT code (each
remote-code folder is its own module, and the installed package another) registers its classes for "rat" and "rnn",
and the last one wins. Each model must still generate with the cache the table builds for it.
"""

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import ROOT, random_ids, tiny_model


pytestmark = pytest.mark.slow

# Run in a fresh interpreter in which the installed package cannot be imported until `allow_package()` is called.
PRELUDE = textwrap.dedent(
    """
    import json, sys, torch
    from transformers import AutoModelForCausalLM
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    class _BlockPackage:
        blocked = True
        def find_spec(self, name, path=None, target=None):
            if self.blocked and name.split(".")[0] in ("modeling_rat", "configuration_rat", "hub_upload"):
                raise ImportError(f"{name} is blocked: this process stands for a machine without the package")
            return None

    _blocker = _BlockPackage()
    sys.meta_path.insert(0, _blocker)

    def allow_package():
        _blocker.blocked = False

    def remote(folder):
        # the folder's own code, even where the installed package is registered with the Auto classes
        model_class = get_class_from_dynamic_module("modeling_rat.RatForCausalLM", folder)
        model = model_class.from_pretrained(folder).eval()
        assert "transformers_modules" in type(model).__module__, type(model).__module__
        return model

    def generate(model, ids):
        return model.generate(torch.tensor(ids), max_new_tokens=6, do_sample=False).tolist()
    """
)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Two folders of different models (layer patterns, chunk sizes, widths) and their greedy continuations."""
    ids = random_ids(2, 9).tolist()
    folders = {}
    for name, layer_types, overrides in (
        ("a", ["rat", "rnn"], dict(chunk_size=3)),
        ("b", ["rat", "sliding_attention", "rat"], dict(chunk_size=4, hidden_size=48)),
    ):
        model = tiny_model(layer_types, seed=len(name) + len(layer_types), **overrides)
        folder = tmp_path_factory.mktemp(name)
        model.save_pretrained(folder)
        with torch.no_grad():
            expected = model.generate(torch.tensor(ids), max_new_tokens=6, do_sample=False).tolist()
        folders[name] = (str(folder), expected)
    return ids, folders


def _run(script: str):
    result = subprocess.run(
        [sys.executable, "-c", PRELUDE + textwrap.dedent(script)], capture_output=True, text=True, cwd=ROOT, timeout=600
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


LOAD_REMOTE_A = "a = remote(FOLDER_A)"
LOAD_REMOTE_B = "b = remote(FOLDER_B)"
LOAD_PACKAGE_B = "allow_package(); from modeling_rat import RatForCausalLM; b = RatForCausalLM.from_pretrained(FOLDER_B).eval()"


@pytest.mark.parametrize(
    "loads",
    [[LOAD_REMOTE_A, LOAD_REMOTE_B], [LOAD_REMOTE_A, LOAD_PACKAGE_B], [LOAD_PACKAGE_B, LOAD_REMOTE_A]],
    ids=["remote then remote", "remote then package", "package then remote"],
)
def test_two_models_generate_in_any_order(checkpoints, loads):
    ids, folders = checkpoints
    (folder_a, expected_a), (folder_b, expected_b) = folders["a"], folders["b"]
    outputs = _run(
        f"FOLDER_A, FOLDER_B, ids = {folder_a!r}, {folder_b!r}, {ids!r}\n"
        + "\n".join(loads)
        # each model generates twice, interleaved, so that each one meets the cache classes the other registered last
        + "\nprint(json.dumps([generate(a, ids), generate(b, ids), generate(a, ids), generate(b, ids)]))"
    )
    assert outputs == [expected_a, expected_b, expected_a, expected_b]


def test_a_cache_filled_by_another_copy_of_the_code_is_refused(checkpoints):
    ids, folders = checkpoints
    folder_a = folders["a"][0]
    outputs = _run(
        f"""
        a = remote({folder_a!r})
        allow_package()
        from modeling_rat import RatForCausalLM
        b = RatForCausalLM.from_pretrained({folder_a!r}).eval()
        out = a(torch.tensor({ids!r}), use_cache=True)
        cache = getattr(out, "cache", None) or out.past_key_values
        try:
            b(torch.tensor({ids!r})[:, :1], cache=cache)
            print(json.dumps("accepted"))
        except ValueError as error:
            print(json.dumps(str(error)))
        """
    )
    assert "another copy of the RAT code" in outputs
