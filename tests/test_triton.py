"""
The Triton kernels of `modeling_rat/rat_triton.py` against the PyTorch references: values and all gradients.

On machines without a GPU they run on CPU tensors under Triton's interpreter (`TRITON_INTERPRET=1`, set by
conftest.py before anything imports the kernels); on a CUDA machine the same tests run the compiled kernels.
Every kernel output buffer is allocated full of NaN in these tests (`rat_triton.POISON_OUTPUTS`), so an element a
kernel fails to write shows as NaN and fails the comparison.

Tolerances. References run in float64 on the very values given to the kernels.
* float32: the kernels accumulate in fp32 and use exact fp32 products, so differences are fp32 rounding (~1e-6).
* bfloat16 (scan): the states are fp32 (accumulated in fp32 from the bf16 values, as fp32 inputs would be), so they
  match like fp32; the gradients are returned in bfloat16, the inputs' dtype: one bf16 rounding, 2^-9 relative.
* bfloat16 (attention): products of bf16 values are exact in fp32 and sums are fp32, but as in every flash-attention
  kernel the softmax weights (and the score gradients) are rounded to bf16 before the second matrix product, and the
  outputs and gradients are stored in bf16: a few bf16 roundings (2^-9 = 0.2% relative each). The tests allow 2% of
  each tensor's largest magnitude (measured: up to 1.1%; the PyTorch path in bf16 reaches 0.6%).
"""

import math

import pytest
import torch

from conftest import LAYER_PATTERNS, random_ids, tiny_model


triton = pytest.importorskip("triton", reason="the Triton kernels need the `triton` package (pip install triton)")

from modeling_rat import rat_triton  # noqa: E402
from modeling_rat.rat_ops import chunk_attention as torch_chunk_attention  # noqa: E402
from modeling_rat.rat_ops import chunk_scan_reference  # noqa: E402


pytestmark = pytest.mark.triton

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(autouse=True)
def _poisoned_outputs(monkeypatch):
    monkeypatch.setattr(rat_triton, "POISON_OUTPUTS", True)
    yield


def _grads(output, inputs, weight):
    return torch.autograd.grad((output.double() * weight).sum(), inputs)


def _assert_close_to_scale(got, want, fraction, name=""):
    """max |got - want| <= fraction * max |want|: errors measured against the tensor's scale (bf16 roundings)."""
    error = (got.double() - want).abs().max().item()
    scale = want.abs().max().item()
    assert error <= fraction * scale, f"{name}: max error {error:.3g} exceeds {fraction} x scale {scale:.3g}"


def _assert_finite(*tensors):
    for tensor in tensors:
        assert torch.isfinite(tensor).all(), "a kernel left elements unwritten (NaN) or overflowed"


def test_triton_kernels_are_usable_here():
    # On the CPU the kernels must have been built by the interpreter (TRITON_INTERPRET=1 before import).
    assert rat_triton.triton_is_usable(DEVICE), (
        "Triton kernels cannot run on this machine: without CUDA, TRITON_INTERPRET=1 must be set before "
        "`modeling_rat.rat_triton` is imported (tests/conftest.py does this)."
    )
    assert rat_triton.KERNELS_INTERPRETED == (DEVICE.type == "cpu")
    assert not rat_triton.triton_is_usable(DEVICE, torch.float64)


# ================================================================================================ chunk scan


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_initial_state", [False, True])
@pytest.mark.parametrize("chunk_size, num_streams", [(1, 2), (4, 2), (16, 1), (64, 2)])
def test_triton_chunk_scan_matches_reference(chunk_size, num_streams, with_initial_state, dtype):
    torch.manual_seed(chunk_size)
    # Feature counts not a power of 2; 70 is more than one block of features under the interpreter. Long chunks get
    # fewer chunks and features: the interpreter runs every step of every chunk in Python.
    num_rows, num_chunks, num_features = (2, 3, 70) if chunk_size <= 4 else (2, 2, 40)
    gates = torch.rand(num_rows, num_chunks, chunk_size, num_features, device=DEVICE).to(dtype).requires_grad_()
    inputs = torch.randn(num_rows, num_chunks, chunk_size, num_streams, num_features, device=DEVICE).to(dtype)
    inputs.requires_grad_()
    initial = None
    if with_initial_state:
        initial = torch.randn(num_rows, num_streams, num_features, device=DEVICE).to(dtype).requires_grad_()
    leaves = [gates, inputs] + ([initial] if with_initial_state else [])
    exact = [leaf.detach().double().requires_grad_() for leaf in leaves]

    states = rat_triton.chunk_scan(gates, inputs, initial)
    expected = chunk_scan_reference(*exact, *([] if with_initial_state else [None]))
    assert states.dtype == torch.float32 and states.shape == inputs.shape
    _assert_finite(states)
    torch.testing.assert_close(states.double(), expected, rtol=1e-5, atol=1e-5)

    weight = torch.randn_like(expected)
    grads = _grads(states, leaves, weight)
    expected_grads = _grads(expected, exact, weight)
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2  # bf16 gradients: one bf16 rounding (2^-9 relative)
    for name, leaf, got, want in zip(["gates", "inputs", "initial_state"], leaves, grads, expected_grads):
        assert got.dtype == leaf.dtype, name
        _assert_finite(got)
        torch.testing.assert_close(got.double(), want, rtol=tolerance, atol=tolerance, msg=name)


def test_triton_chunk_scan_equals_fast_path_with_gradients():
    """Same function as `rat_ops.chunk_scan` (the model switches between them), initial state included."""
    from modeling_rat.rat_ops import chunk_scan as torch_chunk_scan

    torch.manual_seed(0)
    gates = torch.rand(2, 5, 3, 9, device=DEVICE, requires_grad=True)
    inputs = torch.randn(2, 5, 3, 2, 9, device=DEVICE, requires_grad=True)
    initial = torch.randn(2, 2, 9, device=DEVICE, requires_grad=True)
    for initial_state in (None, initial):
        got = rat_triton.chunk_scan(gates, inputs, initial_state)
        want = torch_chunk_scan(gates, inputs, initial_state)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        leaves = [gates, inputs] + ([initial] if initial_state is not None else [])
        weight = torch.randn_like(want).double()
        for got_grad, want_grad in zip(_grads(got, leaves, weight), _grads(want, leaves, weight)):
            torch.testing.assert_close(got_grad, want_grad, rtol=1e-6, atol=1e-6)


# ============================================================================================ chunk attention


def _explicit_chunk_attention(query, own_score, own_value, keys, values, history_count, scale):
    """The SPEC's single softmax, written out: [own, history slots < count, new summaries < i] per query chunk i."""
    num_rows, chunk_size, num_heads, num_chunks, head_dim = query.shape
    num_history = keys.shape[2] - (num_chunks - 1)
    allowed = torch.zeros(num_rows, num_chunks, 1 + keys.shape[2], dtype=torch.bool, device=query.device)
    allowed[..., 0] = True
    for row in range(num_rows):
        count = 0 if history_count is None else int(history_count[row])
        allowed[row, :, 1 : 1 + count] = True
        for chunk in range(num_chunks):
            allowed[row, chunk, 1 + num_history : 1 + num_history + chunk] = True
    scores = torch.einsum("nlhcd,nhkd->nlhck", query, keys) * scale
    scores = torch.cat([own_score.unsqueeze(-1) * scale, scores], dim=-1)
    scores = scores.masked_fill(~allowed[:, None, None], float("-inf"))
    weights = scores.softmax(-1)
    return weights[..., :1] * own_value + torch.einsum("nlhck,nhkd->nlhcd", weights[..., 1:], values)


def _attention_inputs(num_rows, chunk_size, num_heads, num_chunks, head_dim, num_history, dtype, seed=0):
    """Inputs laid out as the model passes them: query and own terms are permuted views of (N, C, L, H, d)."""
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(DEVICE)

    query = randn(num_rows, num_chunks, chunk_size, num_heads, head_dim).to(dtype).permute(0, 2, 3, 1, 4)
    own_score = (2 * randn(num_rows, num_chunks, chunk_size, num_heads)).permute(0, 2, 3, 1)
    own_value = randn(num_rows, num_chunks, chunk_size, num_heads, head_dim).to(dtype).permute(0, 2, 3, 1, 4)
    # larger keys: peaked softmaxes, so that a wrong mask or a lost term moves the outputs by O(1)
    keys = (2 * randn(num_rows, num_heads, num_history + num_chunks - 1, head_dim)).to(dtype)
    values = randn(num_rows, num_heads, num_history + num_chunks - 1, head_dim).to(dtype)
    return [t.requires_grad_() for t in (query, own_score, own_value, keys, values)]


ATTENTION_SHAPES = [
    # (chunk_size L, query chunks C, history slots P, per-row history counts or None)
    (1, 37, 0, None),  # more than one block of queries and of summaries
    (1, 5, 20, [20, 0, 7]),  # history longer than a block; rows with full, empty, partial history
    (4, 9, 3, [2, 3, 0]),
    (16, 3, 0, None),
    (16, 2, 18, [17, 18, 1]),
    (64, 2, 2, [0, 2]),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk_size, num_chunks, num_history, counts", ATTENTION_SHAPES)
def test_triton_chunk_attention_matches_explicit_softmax(chunk_size, num_chunks, num_history, counts, dtype):
    num_rows = len(counts) if counts is not None else 2
    num_heads, head_dim = 2, 12  # head size not a power of 2: the kernels pad it to 16
    leaves = _attention_inputs(num_rows, chunk_size, num_heads, num_chunks, head_dim, num_history, dtype)
    history_count = torch.tensor(counts, device=DEVICE) if counts is not None else None
    scale = 1 / math.sqrt(head_dim)
    exact = [leaf.detach().double().requires_grad_() for leaf in leaves]

    out = rat_triton.chunk_attention(*leaves, history_count, scale)
    expected = _explicit_chunk_attention(*exact, history_count, scale)
    assert out.dtype == dtype and out.shape == leaves[0].shape
    _assert_finite(out)
    if dtype == torch.float32:
        torch.testing.assert_close(out.double(), expected, rtol=2e-5, atol=2e-5)
    else:
        _assert_close_to_scale(out, expected, 2e-2, "out")

    weight = torch.randn_like(expected)
    names = ["query", "own_score", "own_value", "key_summaries", "value_summaries"]
    for name, leaf, got, want in zip(names, leaves, _grads(out, leaves, weight), _grads(expected, exact, weight)):
        assert got.dtype == leaf.dtype and got.shape == leaf.shape, name
        _assert_finite(got)
        if dtype == torch.float32:
            torch.testing.assert_close(got.double(), want, rtol=5e-5, atol=5e-5, msg=name)
        else:
            _assert_close_to_scale(got, want, 2e-2, name)


@pytest.mark.parametrize("kernel", ["rows", "blocked"])
@pytest.mark.parametrize("chunk_size, num_chunks, num_history, counts", [(1, 1, 21, [0, 7, 21]), (4, 3, 2, [1, 0, 2])])
def test_triton_attention_forward_kernels_agree_with_log_sum_exp(kernel, chunk_size, num_chunks, num_history, counts):
    """Both forward kernels (one program per query row, e.g. decode; blocked) give the outputs and the lse."""
    num_rows, num_heads, head_dim = 3, 2, 8
    leaves = [t.detach() for t in _attention_inputs(num_rows, chunk_size, num_heads, num_chunks, head_dim,
                                                     num_history, torch.float32, seed=3)]
    history_count = torch.tensor(counts, device=DEVICE)
    out, lse = rat_triton._chunk_attention_forward(*leaves, history_count, 0.35, kernel=kernel)
    _assert_finite(out, lse)
    expected = _explicit_chunk_attention(*[t.double() for t in leaves], history_count, 0.35)
    torch.testing.assert_close(out.double(), expected, rtol=2e-5, atol=2e-5)
    # lse (N, H, C, L) = log of the softmax denominator over [own, visible summaries]
    query, own_score, _, keys, _ = [t.double() for t in leaves]
    scores = torch.einsum("nlhcd,nhkd->nhclk", query, keys) * 0.35
    own = own_score.permute(0, 2, 3, 1).unsqueeze(-1) * 0.35
    visible = torch.zeros(num_rows, num_chunks, keys.shape[2], dtype=torch.bool, device=DEVICE)
    for row in range(num_rows):
        visible[row, :, : counts[row]] = True
        for chunk in range(num_chunks):
            visible[row, chunk, num_history : num_history + chunk] = True
    scores = scores.masked_fill(~visible[:, None, :, None, :], float("-inf"))
    expected_lse = torch.cat([own, scores], dim=-1).logsumexp(-1)
    torch.testing.assert_close(lse.double(), expected_lse, rtol=1e-5, atol=1e-5)


def test_triton_decode_shape_matches_fast_path():
    """The decode step's call: L = C = 1, P = cache capacity, history_count = completed chunks per row."""
    num_rows, num_heads, head_dim, capacity = 4, 3, 8, 19
    query, own_score, own_value, keys, values = [
        t.detach() for t in _attention_inputs(num_rows, 1, num_heads, 1, head_dim, capacity, torch.float32, seed=5)
    ]
    history_count = torch.tensor([0, 19, 6, 16], device=DEVICE)
    got = rat_triton.chunk_attention(query, own_score, own_value, keys, values, history_count, 0.35)
    want = torch_chunk_attention(query, own_score, own_value, keys, values, history_count, 0.35)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # the slots past each row's count do not matter
    keys_poisoned = keys.clone()
    for row, count in enumerate(history_count.tolist()):
        keys_poisoned[row, :, count:] = 1e4
    again = rat_triton.chunk_attention(query, own_score, own_value, keys_poisoned, values, history_count, 0.35)
    torch.testing.assert_close(again, got, rtol=0, atol=0)


def test_triton_summaries_nobody_sees_get_zero_gradients():
    """History slots past a row's count and the last chunk's summary slots get gradient 0, written by the kernel."""
    leaves = _attention_inputs(2, 2, 1, 3, 8, 5, torch.float32, seed=7)
    history_count = torch.tensor([1, 5], device=DEVICE)
    out = rat_triton.chunk_attention(*leaves, history_count, 0.3)
    out.square().sum().backward()
    grad_keys, grad_values = leaves[3].grad, leaves[4].grad
    _assert_finite(grad_keys, grad_values)
    assert (grad_keys[0, :, 1:5] == 0).all() and (grad_values[0, :, 1:5] == 0).all()
    assert (grad_keys[1, :, :5] != 0).all() and (grad_values[:, :, 5:] != 0).all()


# ============================================================================================ errors, compile


def test_triton_kernels_reject_bad_input_with_clear_errors():
    gates = torch.rand(1, 2, 3, 4, device=DEVICE)
    inputs = torch.randn(1, 2, 3, 2, 4, device=DEVICE)
    with pytest.raises(ValueError, match="gates .* do not match inputs"):
        rat_triton.chunk_scan(gates[:, :, :2], inputs)
    with pytest.raises(ValueError, match="initial_state has shape"):
        rat_triton.chunk_scan(gates, inputs, torch.zeros(1, 2, 5, device=DEVICE))
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        rat_triton.chunk_scan(gates.double(), inputs.double())
    query, own_score, own_value, keys, values = [t.detach() for t in _attention_inputs(1, 2, 1, 3, 8, 2, torch.float32)]
    with pytest.raises(ValueError, match="pass history_count"):
        rat_triton.chunk_attention(query, own_score, own_value, keys, values, None, 0.3)
    with pytest.raises(ValueError, match="history_count must be"):
        rat_triton.chunk_attention(query, own_score, own_value, keys, values, torch.tensor([1.0]), 0.3)
    with pytest.raises(TypeError, match="share one dtype"):
        rat_triton.chunk_attention(query, own_score, own_value.bfloat16(), keys, values, torch.tensor([1]), 0.3)
    with pytest.raises(ValueError, match="own_score must be"):
        rat_triton.chunk_attention(query, own_score[..., :1], own_value, keys, values, torch.tensor([1]), 0.3)


def test_triton_custom_ops_pass_opcheck():
    """Schema, fake (meta) implementations and autograd registration of the custom ops are consistent."""
    gates = torch.rand(2, 2, 3, 5, device=DEVICE, requires_grad=True)
    inputs = torch.randn(2, 2, 3, 2, 5, device=DEVICE, requires_grad=True)
    initial = torch.randn(2, 2, 5, device=DEVICE, requires_grad=True)
    torch.library.opcheck(rat_triton._chunk_scan_op, (gates, inputs, initial))
    leaves = [t.contiguous().detach().requires_grad_() for t in _attention_inputs(2, 2, 2, 3, 8, 2, torch.float32)]
    torch.library.opcheck(rat_triton._chunk_attention_op, (*leaves, torch.tensor([1, 2], device=DEVICE), 0.3))


def test_triton_ops_compile_without_graph_breaks():
    """torch.compile(fullgraph=True) traces through both ops, forward and backward, and gives the eager results."""
    gates = torch.rand(2, 3, 4, 8, device=DEVICE, requires_grad=True)
    inputs = torch.randn(2, 3, 4, 2, 8, device=DEVICE, requires_grad=True)
    keys = torch.randn(2, 2, 2, 4, device=DEVICE, requires_grad=True)

    def layer(gates, inputs, keys):
        states = rat_triton.chunk_scan(gates, inputs)  # (N, C, L, 2, 8): two heads of 4 per stream
        value = states[..., 0, :].reshape(2, 3, 4, 2, 4).permute(0, 2, 3, 1, 4)
        query = states[..., 1, :].reshape(2, 3, 4, 2, 4).permute(0, 2, 3, 1, 4)
        own_score = (query * value).sum(-1)
        return rat_triton.chunk_attention(query, own_score, value, keys, keys * 2, None, 0.5)

    eager = layer(gates, inputs, keys)
    eager_grads = torch.autograd.grad(eager.square().sum(), [gates, inputs, keys])
    torch._dynamo.reset()
    compiled_layer = torch.compile(layer, fullgraph=True, backend="aot_eager")
    compiled = compiled_layer(gates, inputs, keys)
    compiled_grads = torch.autograd.grad(compiled.square().sum(), [gates, inputs, keys])
    torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-6)
    for got, want in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


# ================================================================================================= the model


@pytest.mark.parametrize("chunk_size, num_qk_groups", [(1, 4), (4, 1), (16, 2)])  # G in {1, 2, H = 4}
def test_triton_model_equals_reference_forward_and_gradients(chunk_size, num_qk_groups):
    model = tiny_model(LAYER_PATTERNS["rat+sliding"], chunk_size=chunk_size, num_qk_groups=num_qk_groups).train()
    model.to(DEVICE)
    ids = random_ids(2, 17, seed=chunk_size).to(DEVICE)  # odd length: the last chunk is incomplete
    results = {}
    for implementation in ("triton", "reference"):
        model.set_rat_implementation(implementation)
        model.zero_grad()
        output = model(ids, labels=ids, use_cache=False)
        (output.loss + output.logits.square().mean()).backward()
        results[implementation] = output.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}
    torch.testing.assert_close(results["triton"][0], results["reference"][0], rtol=1e-4, atol=1e-5)
    for name, grad in results["triton"][1].items():
        torch.testing.assert_close(grad, results["reference"][1][name], rtol=1e-4, atol=1e-6, msg=name)


def test_triton_model_with_padding_and_packing_equals_reference():
    """Left padding and packed sequences: each sequence is its own grid row, with its own history count."""
    model = tiny_model(["rat"]).to(DEVICE)
    ids = random_ids(3, 14).to(DEVICE)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    mask[2, :9] = 0
    positions = torch.tensor([list(range(5)) + list(range(9)), list(range(14)), list(range(3)) + list(range(11))])
    for kwargs in (dict(attention_mask=mask), dict(position_ids=positions.to(DEVICE))):
        logits = {}
        for implementation in ("triton", "reference"):
            model.set_rat_implementation(implementation)
            with torch.no_grad():
                logits[implementation] = model(ids, use_cache=False, **kwargs).logits
        valid = mask.bool() if "attention_mask" in kwargs else torch.ones_like(mask, dtype=torch.bool)
        torch.testing.assert_close(logits["triton"][valid], logits["reference"][valid], rtol=1e-4, atol=1e-5)


def test_triton_model_decoding_equals_full_forward():
    """Prefill in pieces, then token-by-token decoding (the decode kernel over cached summaries), left padding."""
    model = tiny_model(["rat"]).to(DEVICE)
    model.set_rat_implementation("triton")
    ids = random_ids(2, 12).to(DEVICE)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    with torch.no_grad():
        full = model(ids, attention_mask=mask, use_cache=False).logits
        output = model(ids[:, :5], attention_mask=mask[:, :5], use_cache=True)
        pieces = [output.logits]
        cache = output.cache if hasattr(output, "cache") else output.past_key_values
        output = model(ids[:, 5:7], attention_mask=mask[:, :7], cache=cache)
        pieces.append(output.logits)
        for column in range(7, 12):  # row 0 completes a chunk at column 7, row 1 (3 pads) at column 10
            output = model(ids[:, column : column + 1], attention_mask=mask[:, : column + 1], cache=cache)
            pieces.append(output.logits)
    stepwise = torch.cat(pieces, dim=1)
    valid = mask.bool()
    torch.testing.assert_close(stepwise[valid], full[valid], rtol=1e-4, atol=1e-5)
    model.set_rat_implementation("fast")
    with torch.no_grad():
        fast = model(ids, attention_mask=mask, use_cache=False).logits
    torch.testing.assert_close(full[valid], fast[valid], rtol=1e-4, atol=1e-5)


def test_triton_model_bfloat16_is_close_to_float32():
    model = tiny_model(["rat", "rat"]).to(DEVICE)
    ids = random_ids(2, 12).to(DEVICE)
    model.set_rat_implementation("reference")
    with torch.no_grad():
        reference = model(ids, use_cache=False).logits
    model.to(torch.bfloat16).set_rat_implementation("triton")
    with torch.no_grad():
        logits = model(ids, use_cache=False).logits.float()
    # bf16 weights and activations through two layers: about 1% of the logits' scale
    scale = reference.abs().max()
    assert (logits - reference).abs().max() < 3e-2 * scale


def test_triton_dispatch_auto_picks_triton_on_cuda_and_fast_elsewhere(monkeypatch):
    from configuration_rat import RatConfig
    from modeling_rat.rat_backends import select_rat_backend

    def resolve_rat_implementation(config, device, dtype=None):
        return select_rat_backend(config, device, dtype).name

    config = RatConfig(hidden_size=32, num_attention_heads=4, num_hidden_layers=1, layer_types=["rat"], vocab_size=8)
    assert resolve_rat_implementation(config, torch.device("cpu")) == "fast"
    config.rat_implementation = "triton"
    assert resolve_rat_implementation(config, DEVICE, torch.float32) == "triton"
    with pytest.raises(ValueError, match="rat_implementation='triton' cannot run here"):
        resolve_rat_implementation(config, DEVICE, torch.float64)
    # "auto" on CUDA: triton when usable, else the fast path (no GPU needed to check the decision)
    config.rat_implementation = "auto"
    monkeypatch.setattr(rat_triton, "triton_is_usable", lambda device, dtype=None: True)
    assert resolve_rat_implementation(config, torch.device("cuda"), torch.bfloat16) == "triton"
    monkeypatch.setattr(rat_triton, "triton_is_usable", lambda device, dtype=None: False)
    assert resolve_rat_implementation(config, torch.device("cuda"), torch.bfloat16) == "fast"


@pytest.mark.slow
def test_triton_benchmark_script_runs_and_checks_on_cpu(tmp_path):
    """benchmarks/bench_triton.py at tiny shapes: it checks agreement before timing and writes its JSON and PNG."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_triton.py"
    spec = importlib.util.spec_from_file_location("bench_triton", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    results = bench.main([
        "--quick", "--seq-lens", "32", "--tokens-per-batch", "64", "--hidden-size", "32", "--num-heads", "2",
        "--decode-batch", "2", "--decode-context", "40", "--repeats", "1", "--warmup", "0", "--output-dir", str(tmp_path),
    ])
    written = json.loads((tmp_path / "bench_triton.json").read_text())
    assert written["gpu"] == torch.cuda.is_available() and (tmp_path / "bench_triton.png").is_file()
    assert written["reference_check_max_error_over_scale"] < 1e-4
    entry = results["training"][0]
    assert entry["seq_len"] == 32 and entry["batch"] == 2
    for key in ("train_rat_triton", "train_rat_fast", "train_attention", "prefill_rat_triton", "prefill_attention"):
        assert entry[key]["time_ms"] > 0
    assert all(error < 2e-2 for error in entry["checks_max_error_over_scale"].values())
    assert results["decode"]["decode_rat_triton"]["time_ms"] > 0


@pytest.mark.slow
def test_triton_kernels_compile_for_hopper(tmp_path):
    """
    The interpreter cannot see compiler errors (typing, tile shapes the tensor cores refuse, shared memory overflow):
    compile every kernel for sm_90 (H100/H200) in bf16 at the paper's head size 128, without a GPU (Triton's front
    end and its bundled ptxas), in a process without TRITON_INTERPRET. `scripts/compile_triton_kernels.py` covers
    sm_80/sm_90 x fp32/fp16/bf16 x d in {64, 128}.
    """
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    environment = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    environment["TRITON_DEFAULT_FP_FUSION"] = "1"
    environment["TRITON_CACHE_DIR"] = str(tmp_path / "cache")  # compile for real, not from an earlier run's cache
    records_path = tmp_path / "records.json"
    completed = subprocess.run(
        [sys.executable, str(root / "scripts" / "compile_triton_kernels.py"), "--arch", "90", "--dtype", "bfloat16",
         "--head-dim", "128", "--json", str(records_path)],
        cwd=root, env=environment, capture_output=True, text=True, timeout=900,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    records = json.loads(records_path.read_text())
    assert len(records) == 12  # 2 scan kernels, 4 attention kernels, each with and without initial state / history
    assert all(0 <= record["shared_bytes"] <= record["shared_limit"] for record in records)
