"""
The Triton kernels of `modeling_rat/rat_triton.py` against the PyTorch references: values and all gradients; their
launches (grids, devices, offsets), dispatch and custom-op registration.

On machines without a GPU they run on CPU tensors under Triton's interpreter (`TRITON_INTERPRET=1`, set by
conftest.py before anything imports the kernels); on a CUDA machine the same tests run the compiled kernels.
Under the interpreter the kernels use small tiles (16) unless a test asks for a GPU's launch configurations
(`gpu_tiles`), which it then runs with shapes larger than those tiles.
Every kernel output buffer is allocated full of NaN in these tests (`rat_triton.POISON_OUTPUTS`), so an element a
kernel fails to write shows as NaN and fails the comparison.

Tolerances. References run in float64 on the very values given to the kernels.
* float32: the kernels accumulate in fp32 and use exact fp32 products, so differences are fp32 rounding (~1e-6).
* bfloat16 (scans): the states are fp32 (accumulated in fp32 from the bf16 values, as fp32 inputs would be), so they
  match like fp32; the gradients are returned in bfloat16, the inputs' dtype: one bf16 rounding, 2^-8 relative
  (2^-7 under the interpreter, whose conversion to bfloat16 truncates).
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
from modeling_rat.rat_ops import chunk_scan_reference  # noqa: E402
from modeling_rat.rat_ops import decode_attention as torch_decode_attention  # noqa: E402
from modeling_rat.rat_ops import gated_chunk_scan as torch_gated_chunk_scan  # noqa: E402


pytestmark = pytest.mark.triton

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(autouse=True)
def _poisoned_outputs(monkeypatch):
    monkeypatch.setattr(rat_triton, "POISON_OUTPUTS", True)
    yield


@pytest.fixture(params=[(9, 0), (8, 0)], ids=["sm90_tiles", "sm80_tiles"])
def gpu_tiles(request, monkeypatch):
    """The launch configurations of a GPU (Hopper, Ampere) instead of the interpreter's small tiles."""
    monkeypatch.setattr(rat_triton, "_tile_capability", lambda device: request.param)
    return request.param


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


# ================================================================================================ chunk scans


def _gated_scan_inputs(num_rows, num_chunks, chunk_size, num_heads, num_groups, head_dim, dtype, with_initial, seed=0):
    generator = torch.Generator().manual_seed(seed)
    hidden_size = num_heads * head_dim
    gates = torch.rand(num_rows, num_chunks, chunk_size, hidden_size, generator=generator)
    value = torch.randn(num_rows, num_chunks, chunk_size, hidden_size, generator=generator).to(dtype)
    key = torch.randn(num_rows, num_chunks, chunk_size, num_groups * head_dim, generator=generator).to(dtype)
    leaves = [gates, value, key]
    if with_initial:
        leaves.append(torch.randn(num_rows, 2, hidden_size, generator=generator))
    return [leaf.to(DEVICE).requires_grad_() for leaf in leaves]


def _check_gated_scan(leaves, gradient_tolerance):
    """The kernel against `rat_ops.gated_chunk_scan` in float64 on the same values: states and every gradient."""
    initial = leaves[3] if len(leaves) == 4 else None
    exact = [leaf.detach().double().requires_grad_() for leaf in leaves]
    states = rat_triton.gated_chunk_scan(*leaves[:3], initial)
    expected = torch_gated_chunk_scan(*exact[:3], exact[3] if initial is not None else None)
    assert states.dtype == torch.float32 and states.shape == expected.shape
    _assert_finite(states)
    torch.testing.assert_close(states.double(), expected, rtol=1e-5, atol=1e-5)
    weight = torch.randn_like(expected)
    names = ["gates", "value", "key", "initial_state"]
    for name, leaf, got, want in zip(names, leaves, _grads(states, leaves, weight), _grads(expected, exact, weight)):
        assert got.dtype == leaf.dtype and got.shape == leaf.shape, name
        _assert_finite(got)
        torch.testing.assert_close(got.double(), want, rtol=gradient_tolerance, atol=gradient_tolerance, msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_initial_state", [False, True])
@pytest.mark.parametrize(
    "chunk_size, num_heads, num_groups, head_dim",
    [(1, 4, 2, 8), (4, 6, 3, 4), (5, 4, 4, 6), (16, 8, 2, 4), (64, 2, 1, 8)],  # G in {1, 2, 3, H}; L not a power of 2
)
def test_triton_gated_chunk_scan_matches_fp64_reference(chunk_size, num_heads, num_groups, head_dim,
                                                        with_initial_state, dtype):
    num_rows, num_chunks = (2, 3) if chunk_size <= 16 else (2, 2)
    leaves = _gated_scan_inputs(num_rows, num_chunks, chunk_size, num_heads, num_groups, head_dim, dtype,
                                with_initial_state, seed=chunk_size)
    _check_gated_scan(leaves, 1e-5 if dtype == torch.float32 else 1e-2)


def test_triton_gated_chunk_scan_keeps_only_its_inputs_for_the_backward():
    """Autograd holds the gate, value, key and initial state, not the (N, C, L, 2, D) fp32 states."""
    leaves = _gated_scan_inputs(1, 2, 4, 2, 1, 8, torch.float32, with_initial=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda tensor: saved.append(tensor) or tensor, lambda tensor: tensor):
        states = rat_triton.gated_chunk_scan(*leaves)
    assert sorted(tuple(t.shape) for t in saved) == sorted(tuple(t.shape) for t in leaves)
    assert all(t.data_ptr() != states.data_ptr() for t in saved)


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
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2  # bf16 gradients: one bf16 rounding
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


def _check_chunk_attention(leaves, history_count, scale, dtype):
    """The kernels against the written-out softmax in float64 on the same values: outputs and every gradient."""
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk_size, num_chunks, num_history, counts", ATTENTION_SHAPES)
def test_triton_chunk_attention_matches_explicit_softmax(chunk_size, num_chunks, num_history, counts, dtype):
    num_rows = len(counts) if counts is not None else 2
    num_heads, head_dim = 2, 12  # head size not a power of 2: the kernels pad it to 16
    leaves = _attention_inputs(num_rows, chunk_size, num_heads, num_chunks, head_dim, num_history, dtype)
    history_count = torch.tensor(counts, device=DEVICE) if counts is not None else None
    _check_chunk_attention(leaves, history_count, 1 / math.sqrt(head_dim), dtype)


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


def test_triton_decode_attention_equals_fast_path():
    """The decode step: (B, H, d) queries over the (B, H, P, d) cache, history_count = completed chunks per row."""
    batch, num_heads, head_dim, capacity = 4, 3, 8, 19
    generator = torch.Generator().manual_seed(5)
    query, own_value = (torch.randn(batch, num_heads, head_dim, generator=generator).to(DEVICE) for _ in range(2))
    own_score = torch.randn(batch, num_heads, generator=generator).to(DEVICE)
    keys, values = (torch.randn(batch, num_heads, capacity, head_dim, generator=generator).to(DEVICE) for _ in range(2))
    history_count = torch.tensor([0, 19, 6, 16], device=DEVICE)
    got = rat_triton.decode_attention(query, own_score, own_value, keys, values, history_count, 0.35)
    want = torch_decode_attention(query, own_score, own_value, keys, values, history_count, 0.35)
    assert got.shape == (batch, num_heads, head_dim)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # the slots past each row's count do not matter
    keys_poisoned = keys.clone()
    for row, count in enumerate(history_count.tolist()):
        keys_poisoned[row, :, count:] = 1e4
    again = rat_triton.decode_attention(query, own_score, own_value, keys_poisoned, values, history_count, 0.35)
    torch.testing.assert_close(again, got, rtol=0, atol=0)
    with pytest.raises(ValueError, match="decode_attention takes query"):
        rat_triton.decode_attention(query[:, :, None], own_score, own_value, keys, values, history_count, 0.35)


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


# ================================================================================= GPU launch configurations


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("head_dim", [40, 96])  # padded to 64 and 128: both tile tables, and masked head columns
def test_triton_attention_on_gpu_tiles(gpu_tiles, head_dim, dtype):
    """
    The GPU launch configurations (tiles up to 128 queries x 128 summaries) with more query rows and summaries than
    one tile: 2 x 150 query rows per head over 149 summaries, and 16-token chunks over a 140-slot history.
    """
    for chunk_size, num_chunks, num_history, counts in ((1, 150, 0, None), (16, 10, 140, [140, 3])):
        leaves = _attention_inputs(2, chunk_size, 1, num_chunks, head_dim, num_history, dtype, seed=head_dim)
        history_count = torch.tensor(counts, device=DEVICE) if counts is not None else None
        _check_chunk_attention(leaves, history_count, 1 / math.sqrt(head_dim), dtype)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_scans_on_gpu_tiles(gpu_tiles, dtype):
    """
    The GPU tiles of the gated scan (16 steps x 8 copies x 16 key features at the paper's L and H / G) with several
    blocks of key features and a copy count that is not a power of 2, and the ungated scan's 256-feature blocks.
    """
    _check_gated_scan(_gated_scan_inputs(2, 2, 16, 16, 2, 20, dtype, with_initial=True), 1e-5 if dtype == torch.float32 else 1e-2)
    _check_gated_scan(_gated_scan_inputs(1, 2, 12, 12, 2, 6, dtype, with_initial=False), 1e-5 if dtype == torch.float32 else 1e-2)
    gates = torch.rand(1, 2, 3, 300, device=DEVICE).to(dtype).requires_grad_()
    inputs = torch.randn(1, 2, 3, 2, 300, device=DEVICE).to(dtype).requires_grad_()
    states = rat_triton.chunk_scan(gates, inputs)
    torch.testing.assert_close(states.double(), chunk_scan_reference(gates.double(), inputs.double()), rtol=1e-5,
                               atol=1e-5)
    states.sum().backward()
    _assert_finite(gates.grad, inputs.grad)


# ============================================================================= launches: grids, devices, offsets


def _recorded_launches(run):
    """[(kernel name, grid)] of the launches `run()` makes, recorded instead of run (on meta tensors: no memory)."""
    launches = []

    def record(kernel, grid, *args, **meta):
        launches.append((kernel.__name__, grid))

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(rat_triton, "_launch", record)
        run()
    return launches


def test_triton_launch_grids_fit_cuda_limits(gpu_tiles):
    """
    8,192 packed sequences x 16 heads (rows x heads above the 65,535 of a grid's y axis) and one 4M-token sequence:
    every launch, forward and backward, has a grid within CUDA's limits.
    """
    def run_all(num_rows, num_chunks, num_heads=16, head_dim=128):
        grid = (num_rows, num_chunks, 16, num_heads)
        meta = dict(device="meta")
        query = torch.empty(*grid, head_dim, dtype=torch.bfloat16, **meta).permute(0, 2, 3, 1, 4)
        own_score = torch.empty(*grid, **meta).permute(0, 2, 3, 1)
        summaries = torch.empty(num_rows, num_heads, num_chunks - 1, head_dim, dtype=torch.bfloat16, **meta)
        out, lse = rat_triton._chunk_attention_forward(query, own_score, query, summaries, summaries, None, 0.1)
        rat_triton._chunk_attention_backward(out, query, own_score, query, summaries, summaries, None, out, lse, 0.1)
        gates = torch.empty(num_rows, num_chunks, 16, num_heads * head_dim, **meta)
        key = torch.empty(num_rows, num_chunks, 16, 2 * head_dim, dtype=torch.bfloat16, **meta)
        states = rat_triton._gated_scan_forward(gates, gates.bfloat16(), key, None)
        rat_triton._gated_scan_backward(states, gates, gates.bfloat16(), key, None)

    for num_rows, num_chunks in ((8192, 2), (1, 2**18)):
        launches = _recorded_launches(lambda: run_all(num_rows, num_chunks))
        assert len(launches) == 5
        for name, grid in launches:
            assert all(size <= limit for size, limit in zip(grid, rat_triton.CUDA_GRID_LIMITS)), (name, grid)


def test_triton_launch_refuses_grids_beyond_cuda_limits():
    with pytest.raises(rat_triton.TritonKernelError, match="grid \\(1, 65536\\) exceeds CUDA's limit of 65535 on axis 1"):
        rat_triton._launch(rat_triton._chunk_scan_forward_kernel, (1, 65536), torch.zeros(1))


def test_triton_launches_run_on_the_tensors_device(monkeypatch):
    """With layers on cuda:1 (device_map="auto"), kernels launch inside `torch.cuda.device(cuda:1)`, not on cuda:0."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    entered, launched = [], []

    class RecordingDeviceGuard:
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            entered.append(self.device)

        def __exit__(self, *exc):
            entered.append(None)

    class Kernel:
        __name__ = "kernel"

        def __getitem__(self, grid):
            return lambda *args, **meta: launched.append(list(entered))

    monkeypatch.setattr(torch.cuda, "device", RecordingDeviceGuard)
    with FakeTensorMode():
        tensor = torch.empty(4, device="cuda:1")
    rat_triton._launch(Kernel(), (1,), 3, tensor)
    assert launched == [[torch.device("cuda", 1)]] and entered[-1] is None


def test_triton_offsets_past_2_31_elements():
    """
    Query, own value and decode rows more than 2^31 elements into their storage (a sequence of more than 1M tokens at
    D 2048 puts its last chunks there): 64-bit offsets read the right elements. The storage is reserved, not
    touched: only the few elements the views cover are written. Its first 2^31 elements lie before the views, so
    that offsets wrapped to 32 bits would still read inside it (wrong values, not a crash).
    """
    chunk_stride = 2**30 + 64  # chunk 2 starts at 2^31 + 128 elements past the views' first element
    storage = torch.empty(2**31 + 2 * chunk_stride + 4096, dtype=torch.float16, device=DEVICE)
    generator = torch.Generator().manual_seed(0)

    def far_view(shape, strides, offset):
        view = storage.as_strided(shape, strides, 2**31 + offset)
        view.copy_(torch.randn(shape, generator=generator))
        return view

    chunk_size, num_chunks, head_dim = 2, 3, 16
    shape, strides = (1, chunk_size, 1, num_chunks, head_dim), (0, head_dim, head_dim, chunk_stride, 1)
    query, own_value = far_view(shape, strides, 0), far_view(shape, strides, chunk_size * head_dim)
    own_score = torch.randn(1, chunk_size, 1, num_chunks, generator=generator).to(DEVICE)
    keys, values = (torch.randn(1, 1, num_chunks - 1, head_dim, generator=generator).to(DEVICE).half() for _ in range(2))
    out = rat_triton.chunk_attention(query, own_score, own_value, keys, values, None, 0.25)
    dense = rat_triton.chunk_attention(query.contiguous(), own_score, own_value.contiguous(), keys, values, None, 0.25)
    torch.testing.assert_close(out, dense, rtol=0, atol=0)
    exact = [t.double() for t in (query, own_score, own_value, keys, values)]
    _assert_close_to_scale(out, _explicit_chunk_attention(*exact, None, 0.25), 1e-2, "out")  # float16 roundings

    decode_query = far_view((3, 1, head_dim), (chunk_stride, head_dim, 1), 4 * chunk_size * head_dim)
    cache = torch.randn(3, 1, 5, head_dim, generator=generator).to(DEVICE).half()
    arguments = (torch.randn(3, 1, generator=generator).to(DEVICE), torch.randn(3, 1, head_dim, generator=generator)
                 .to(DEVICE).half(), cache, cache, torch.tensor([5, 2, 4], device=DEVICE), 0.25)
    torch.testing.assert_close(rat_triton.decode_attention(decode_query, *arguments),
                               rat_triton.decode_attention(decode_query.contiguous(), *arguments), rtol=0, atol=0)


# =========================================================================================== dispatch, fallback


def test_triton_unavailable_reason(monkeypatch):
    reason = rat_triton.triton_unavailable_reason
    assert reason(DEVICE, torch.bfloat16, 128, automatic=False) is None
    assert "float64" in reason(DEVICE, torch.float64, 64, automatic=False)
    assert "head size 256" in reason(DEVICE, torch.bfloat16, 256, automatic=False)
    if DEVICE.type == "cpu":  # the interpreter is for tests: never chosen automatically
        assert "TRITON_INTERPRET" in reason("cpu", torch.bfloat16, 64, automatic=True)
    # on GPUs, without one: pretend to compile (no interpreter) on a CUDA machine of a given capability
    monkeypatch.setattr(rat_triton, "KERNELS_INTERPRETED", False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert "not on cpu" in reason("cpu", torch.bfloat16, 64, automatic=False)
    for capability, automatic_ok in (((7, 5), False), ((8, 0), True), ((9, 0), True)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        assert reason("cuda", torch.bfloat16, 128, automatic=False) is None  # asked for: allowed
        assert (reason("cuda", torch.bfloat16, 128, automatic=True) is None) == automatic_ok, capability
        if not automatic_ok:
            assert "compute capability 7.5" in reason("cuda", torch.float16, 128, automatic=True)
    # float32 under "auto": the PyTorch path unless TF32 is allowed
    assert "float32 with exact products" in reason("cuda", torch.float32, 64, automatic=True)
    assert reason("cuda", torch.float32, 64, automatic=False) is None
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "high")
    assert reason("cuda", torch.float32, 64, automatic=True) is None


def test_triton_float32_products_follow_the_matmul_precision(monkeypatch):
    """Exact (IEEE) float32 products by default, TF32 when torch.set_float32_matmul_precision allows it."""
    assert rat_triton._attention_config("forward", 64, torch.float32, (9, 0))["PRECISION"] == "ieee"
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "high")
    assert rat_triton._attention_config("forward", 64, torch.float32, (9, 0))["PRECISION"] == "tf32"


def test_triton_self_check_runs_every_kernel_and_reports_failures(monkeypatch):
    launched = set()
    launch = rat_triton._launch

    def recording_launch(kernel, grid, *args, **meta):
        launched.add(kernel.__name__)
        return launch(kernel, grid, *args, **meta)

    monkeypatch.setattr(rat_triton, "_launch", recording_launch)
    check = rat_triton.triton_self_check.__wrapped__  # uncached
    assert check(DEVICE, torch.float32, 2, 16, 1, 4) is None
    assert launched == {name for name in dir(rat_triton) if name.endswith("_kernel") and "chunk_scan_" not in name}

    def broken(kernel, grid, *args, **meta):
        raise rat_triton.TritonKernelError(f"Triton kernel {kernel.__name__} failed to compile: out of resource")

    monkeypatch.setattr(rat_triton, "_launch", broken)
    assert "failed to compile: out of resource" in check(DEVICE, torch.float32, 2, 16, 1, 4)


# ============================================================================================ errors, custom ops


def test_triton_kernels_reject_bad_input_with_clear_errors():
    gates = torch.rand(1, 2, 3, 4, device=DEVICE)
    inputs = torch.randn(1, 2, 3, 2, 4, device=DEVICE)
    with pytest.raises(ValueError, match="gates .* do not match inputs"):
        rat_triton.chunk_scan(gates[:, :, :2], inputs)
    with pytest.raises(ValueError, match="initial_state has shape"):
        rat_triton.chunk_scan(gates, inputs, torch.zeros(1, 2, 5, device=DEVICE))
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        rat_triton.chunk_scan(gates.double(), inputs.double())
    with pytest.raises(ValueError, match="value .* must have the gates' shape"):
        rat_triton.gated_chunk_scan(gates, gates[..., :2], gates)
    with pytest.raises(ValueError, match="G \\* d dividing D = 4"):
        rat_triton.gated_chunk_scan(gates, gates, gates[..., :3])
    with pytest.raises(ValueError, match="expected \\(1, 2, 4\\) \\(N, 2, D\\)"):
        rat_triton.gated_chunk_scan(gates, gates, gates, torch.zeros(1, 4, device=DEVICE))
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
    """
    Schema, fake (meta) implementations, autograd registration: consistent, with the inputs laid out as the model
    passes them (permuted views, non-contiguous summaries), so the fake outputs' strides are checked against the
    real ones, the backward ops' included.
    """
    leaves = _gated_scan_inputs(2, 2, 3, 4, 2, 4, torch.float32, with_initial=True)
    torch.library.opcheck(rat_triton._gated_chunk_scan_op, tuple(leaves))
    detached = [leaf.detach() for leaf in leaves]  # the backward ops have no backward of their own
    torch.library.opcheck(rat_triton._gated_chunk_scan_backward_op,
                          (torch.randn(2, 2, 3, 2, 16, device=DEVICE), *detached))
    gates = torch.rand(2, 2, 3, 5, device=DEVICE, requires_grad=True)
    inputs = torch.randn(2, 2, 3, 2, 5, device=DEVICE, requires_grad=True)
    torch.library.opcheck(rat_triton._chunk_scan_op, (gates, inputs, torch.randn(2, 2, 5, device=DEVICE)))

    query, own_score, own_value, keys, values = _attention_inputs(2, 2, 2, 3, 8, 0, torch.float32)
    summaries = torch.randn(2, 3, 2, 8, device=DEVICE)[:, :-1].transpose(1, 2)  # the model's (N, H, C - 1, d) view
    arguments = (query, own_score, own_value, summaries, summaries * 2, None, 0.3)
    torch.library.opcheck(rat_triton._chunk_attention_op, arguments)
    out, lse = rat_triton._chunk_attention_op(*arguments)
    grad_out = torch.randn_like(query.detach())  # the query's permuted strides, as autograd passes it
    detached = [t.detach() for t in (query, own_score, own_value, summaries, summaries * 2)]
    torch.library.opcheck(rat_triton._chunk_attention_backward_op,
                          (grad_out, *detached, None, out.detach(), lse, 0.3))
    counts = torch.tensor([1, 2], device=DEVICE)
    history = [t.contiguous().detach().requires_grad_() for t in _attention_inputs(2, 2, 2, 3, 8, 2, torch.float32)]
    torch.library.opcheck(rat_triton._chunk_attention_op, (*history, counts, 0.3))


def test_triton_ops_compile_without_graph_breaks():
    """torch.compile(fullgraph=True) traces through the ops, forward and backward, and gives the eager results."""
    leaves = _gated_scan_inputs(2, 3, 4, 2, 1, 4, torch.float32, with_initial=False)
    keys = torch.randn(2, 2, 2, 4, device=DEVICE, requires_grad=True)

    def layer(gates, value, key, keys):
        states = rat_triton.gated_chunk_scan(gates, value, key)  # (N, C, L, 2, 8): two heads of 4 per stream
        value = states[..., 0, :].reshape(2, 3, 4, 2, 4).permute(0, 2, 3, 1, 4)
        query = states[..., 1, :].reshape(2, 3, 4, 2, 4).permute(0, 2, 3, 1, 4)
        own_score = (query * value).sum(-1)
        return rat_triton.chunk_attention(query, own_score, value, keys, keys * 2, None, 0.5)

    inputs = [*leaves, keys]
    eager = layer(*inputs)
    eager_grads = torch.autograd.grad(eager.square().sum(), inputs)
    torch._dynamo.reset()
    compiled_layer = torch.compile(layer, fullgraph=True, backend="aot_eager")
    compiled = compiled_layer(*inputs)
    compiled_grads = torch.autograd.grad(compiled.square().sum(), inputs)
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
    """Left padding and packed sequences, for RAT layers and for rnn layers (the Triton chunk scan under the
    whole-sequence recurrence)."""
    model = tiny_model(["rat", "rnn"]).to(DEVICE)
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
    model = tiny_model(["rat", "rnn"]).to(DEVICE)
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


def test_triton_dispatch_auto_picks_triton_on_cuda_and_fast_elsewhere(monkeypatch, caplog):
    from configuration_rat import RatConfig
    from modeling_rat.rat_backends import select_rat_backend

    config = RatConfig(hidden_size=32, num_attention_heads=4, num_hidden_layers=1, layer_types=["rat"], vocab_size=8)
    assert select_rat_backend(config, torch.device("cpu")).name == "fast"
    config.rat_implementation = "triton"
    assert select_rat_backend(config, DEVICE, torch.float32).name == "triton"
    with pytest.raises(ValueError, match="rat_implementation='triton' cannot run here: .*float64"):
        select_rat_backend(config, DEVICE, torch.float64)
    # "auto" on CUDA (no GPU needed to check the decision): triton when the kernels are fast there and pass the
    # self-check, else the fast path, saying why
    config.rat_implementation = "auto"
    monkeypatch.setattr(rat_triton, "triton_unavailable_reason", lambda *args, **kwargs: None)
    monkeypatch.setattr(rat_triton, "triton_self_check", lambda *args: None)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert select_rat_backend(config, torch.device("cuda"), torch.bfloat16).name == "triton"
    monkeypatch.setattr(rat_triton, "triton_self_check", lambda *args: "ptxas failed (a test reason)")
    assert select_rat_backend(config, torch.device("cuda"), torch.bfloat16).name == "fast"
    monkeypatch.setattr(rat_triton, "triton_unavailable_reason", lambda *args, **kwargs: "compute capability 7.5 (a test reason)")
    assert select_rat_backend(config, torch.device("cuda"), torch.bfloat16).name == "fast"


def test_triton_backend_falls_back_to_pytorch_when_a_kernel_cannot_launch(monkeypatch):
    """A kernel that fails to compile or launch (TritonKernelError) is replaced by the PyTorch function, with one log
    line, and the model's outputs are the PyTorch path's."""
    from modeling_rat import rat_backends

    def broken(*args, **kwargs):
        raise rat_triton.TritonKernelError("no kernel image for this device (a test failure)")

    rat_backends._triton_backend.cache_clear()
    monkeypatch.setattr(rat_triton, "chunk_attention", broken)
    try:
        model = tiny_model(["rat", "rat"]).to(DEVICE)
        ids = random_ids(2, 11).to(DEVICE)
        model.set_rat_implementation("triton")
        with torch.no_grad():
            logits = model(ids, use_cache=False).logits
        model.set_rat_implementation("fast")
        with torch.no_grad():
            expected = model(ids, use_cache=False).logits
        torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-5)
    finally:
        rat_backends._triton_backend.cache_clear()


@pytest.mark.slow
def test_gpu_check_smoke_runs_every_section(tmp_path):
    """
    `scripts/gpu_check.py --smoke` (tiny shapes, CPU, interpreter) runs every section of the GPU check, the benchmark
    `benchmarks/bench_triton.py` included, and writes its JSON and PNG; without a GPU and without --smoke it refuses
    with a clear error.
    """
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    environment = dict(os.environ, PYTHONPATH=str(root), TRITON_INTERPRET="1")
    command = [sys.executable, str(root / "scripts" / "gpu_check.py"), "--output", str(tmp_path)]
    completed = subprocess.run(command + ["--smoke"], cwd=root, env=environment, capture_output=True, text=True,
                               timeout=3600)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["smoke"] and report["ok"] and (tmp_path / "gpu_check.png").is_file()
    sections = report["sections"]
    assert list(sections) == ["versions", "tests", "correctness", "grid", "float32_routing", "speed"]
    assert all(section["ok"] for section in sections.values())
    assert sections["versions"]["self_check"] is None and sections["tests"]["tests"] == 1
    # 4 precisions x (gated scan, attention, attention with history, decode, layer), each within its tolerance
    checks = sections["correctness"]["checks"]
    assert len(checks) == 20 and all(check["max_relative_error"] <= check["tolerance"] for check in checks.values())
    assert sections["grid"]["rows_times_heads"] > 65535
    assert {"triton_exact_ms", "triton_tf32_ms", "pytorch_exact_ms"} <= set(sections["float32_routing"])
    # the benchmark ran, checked its paths against each other, and timed them
    bench = json.loads((tmp_path / "bench_triton" / "bench_triton.json").read_text())
    assert bench["reference_check_max_error_over_scale"] < 1e-4
    entry = sections["speed"]["training"][0]
    for key in ("train_rat_triton", "train_rat_fast", "train_attention", "prefill_rat_triton", "prefill_attention"):
        assert entry[key]["time_ms"] > 0
    assert all(error < 2e-2 for error in entry["checks_max_error_over_scale"].values())
    assert sections["speed"]["decode"]["decode_rat_triton"]["time_ms"] > 0
    if not torch.cuda.is_available():
        completed = subprocess.run(command, cwd=root, env=environment, capture_output=True, text=True, timeout=600)
        assert completed.returncode == 1 and "error: no CUDA GPU here" in completed.stderr
