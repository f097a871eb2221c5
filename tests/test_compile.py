"""
Compilation: the model trained under `torch.compile` (inductor, the default backend) equals eager training, and the
Triton kernels compiled ahead of time for Hopper (sm_90) as they launch fit the GPU: no 16-bit kernel spills, shared
memory within the limit, every grid within CUDA's limits, one compilation whatever the length or history size.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import random_ids, tiny_model


ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.parametrize("implementation", ["fast", pytest.param("triton", marks=pytest.mark.triton)])
def test_compiled_training_equals_eager(implementation):
    """
    Loss and every parameter gradient of a training step of `torch.compile(model)` (inductor) equal eager's. Inductor
    checks the strides of what custom ops return against their fake implementations, which `aot_eager` does not.
    """
    if implementation == "triton":
        pytest.importorskip("triton")
    model = tiny_model(["rat", "sliding_attention", "rat"]).train()
    model.set_rat_implementation(implementation)
    ids = random_ids(2, 11)  # not a multiple of the chunk size: the last chunk is incomplete

    def training_step(module):
        model.zero_grad()
        loss = module(ids, labels=ids, use_cache=False).loss
        loss.backward()
        return loss.detach(), {name: parameter.grad.clone() for name, parameter in model.named_parameters()}

    eager_loss, eager_grads = training_step(model)
    torch._dynamo.reset()
    compiled_loss, compiled_grads = training_step(torch.compile(model))
    # inductor fuses and reorders float32 arithmetic: equal up to rounding
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-5, atol=1e-6)
    for name, grad in eager_grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.slow
@pytest.mark.triton
def test_kernels_compile_for_hopper_without_spills(tmp_path):
    """
    `scripts/compile_triton_kernels.py` for sm_90 in bfloat16 and float16 at head sizes 64 and 128 (the kernels as
    they launch, in a process without TRITON_INTERPRET, no GPU needed): every kernel compiles, no 16-bit kernel
    spills registers (--no-spill), products run on wgmma, shared memory fits, grids fit CUDA's limits even for 8,192
    packed sequences and a 4M-token sequence, and lengths and history sizes never cause a recompilation.
    """
    pytest.importorskip("triton")
    environment = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    environment["PYTHONPATH"] = str(ROOT)  # this tree's kernels, whatever package is installed
    environment["TRITON_DEFAULT_FP_FUSION"] = "1"
    environment["TRITON_CACHE_DIR"] = str(tmp_path / "cache")  # compile for real, not from an earlier run's cache
    records_path = tmp_path / "records.json"
    completed = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "compile_triton_kernels.py"), "--arch", "90", "--dtype", "bfloat16",
         "float16", "--head-dim", "64", "128", "--no-spill", "--json", str(records_path)],
        cwd=ROOT, env=environment, capture_output=True, text=True, timeout=1800,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    records = json.loads(records_path.read_text())
    kernels = {record["kernel"] for record in records}
    assert kernels == {
        "gated_scan_forward", "gated_scan_forward[initial]", "gated_scan_backward", "gated_scan_backward[initial]",
        "chunk_attention_forward", "chunk_attention_forward[history]", "chunk_attention_rows[history]",
        "chunk_attention_backward_query", "chunk_attention_backward_key",
    }
    assert len(records) == 2 * 2 * len(kernels)
    for record in records:
        where = f"{record['kernel']} {record['dtype']} d {record['head_dim']}"
        assert record["arch"] == 90 and record["spill_bytes"] == 0 and 0 < record["registers"] <= 255, where
        assert 0 <= record["shared_bytes"] <= record["shared_limit"], where
        assert record["grid_ok"] and record["specializations"] == 1, where
        if "attention" in record["kernel"] and "rows" not in record["kernel"]:
            assert record["matrix_units"] == "wgmma", where


@pytest.mark.triton
def test_compile_script_refuses_a_head_size_it_cannot_report():
    pytest.importorskip("triton")
    environment = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    environment["PYTHONPATH"] = str(ROOT)
    completed = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "compile_triton_kernels.py"), "--head-dim", "256"],
        cwd=ROOT, env=environment, capture_output=True, text=True, timeout=600,
    )
    assert completed.returncode == 2 and "error: --head-dim 256: must divide 2048 and be at most 128" in completed.stderr
