"""The PyTorch kernels of the RAT mixer against their plain references: values and gradients."""

import math

import pytest
import torch

from modeling_rat.rat_ops import (
    ChunkScan,
    apply_rotary,
    chunk_attention,
    chunk_attention_reference,
    chunk_scan,
    chunk_scan_reference,
    decode_attention,
    linear_recurrence,
    rotary_cos_sin,
    rotate_half,
)


def _grads(output, inputs, weight):
    return torch.autograd.grad((output * weight).sum(), inputs)


@pytest.mark.parametrize("chunk_size", [1, 3, 4, 16])
@pytest.mark.parametrize("with_initial_state", [False, True])
def test_chunk_scan_matches_reference_fp64(chunk_size, with_initial_state):
    torch.manual_seed(chunk_size)
    gates = torch.rand(2, 3, chunk_size, 5, dtype=torch.float64, requires_grad=True)
    inputs = torch.randn(2, 3, chunk_size, 2, 5, dtype=torch.float64, requires_grad=True)
    initial = torch.randn(2, 2, 5, dtype=torch.float64, requires_grad=True) if with_initial_state else None
    differentiable = [gates, inputs] + ([initial] if with_initial_state else [])
    expected = chunk_scan_reference(gates, inputs, initial)
    actual = ChunkScan.apply(gates, inputs, initial)
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-12)
    weight = torch.randn_like(expected)
    for got, want in zip(_grads(actual, differentiable, weight), _grads(expected, differentiable, weight)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    # and the analytic backward agrees with finite differences
    assert torch.autograd.gradcheck(lambda *xs: ChunkScan.apply(*xs) if len(xs) == 3 else ChunkScan.apply(*xs, None),
                                    tuple(differentiable))


def test_chunk_scan_bf16_inputs_accumulate_in_fp32():
    torch.manual_seed(0)
    gates = torch.rand(1, 4, 16, 8).bfloat16()
    inputs = torch.randn(1, 4, 16, 2, 8).bfloat16()
    out = chunk_scan(gates, inputs)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, chunk_scan_reference(gates.float(), inputs.float()), rtol=0, atol=1e-6)


@pytest.mark.parametrize("length, block", [(1, 4), (7, 4), (64, 16), (65, 8)])
def test_linear_recurrence_matches_sequential_loop(length, block):
    torch.manual_seed(length)
    gates = torch.rand(3, length, 6, dtype=torch.float64, requires_grad=True)
    inputs = torch.randn(3, length, 2, 6, dtype=torch.float64, requires_grad=True)
    initial = torch.randn(3, 2, 6, dtype=torch.float64, requires_grad=True)
    state, expected = initial, []
    for t in range(length):
        state = gates[:, t].unsqueeze(-2) * state + inputs[:, t]
        expected.append(state)
    expected = torch.stack(expected, dim=1)
    actual = linear_recurrence(gates, inputs, initial, block_size=block)
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-10)
    weight = torch.randn_like(expected)
    for got, want in zip(_grads(actual, [gates, inputs, initial], weight), _grads(expected, [gates, inputs, initial], weight)):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def test_rotary_convention_is_rotate_half():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert torch.equal(rotate_half(x), torch.tensor([-3.0, -4.0, 1.0, 2.0]))
    cos, sin = rotary_cos_sin(torch.tensor(3), 4, 10000.0, torch.float64)
    theta = torch.tensor([1.0, 10000 ** (-2 / 4)], dtype=torch.float64)
    torch.testing.assert_close(cos, torch.cat([torch.cos(3 * theta)] * 2))
    rotated = apply_rotary(x.double(), cos, sin)
    # cos/sin are computed in fp32 (as transformers does for rotary), so cos^2 + sin^2 = 1 only to ~1e-7
    assert math.isclose(rotated.norm().item(), x.norm().item(), rel_tol=1e-6)


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 2e-6), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("masked", [False, True])
def test_chunk_attention_is_one_softmax_over_summaries_and_own_term(dtype, tolerance, masked):
    torch.manual_seed(0)
    rows, chunk, heads, chunks, head_dim = 2, 3, 2, 5, 8
    query = torch.randn(rows, chunk, heads, chunks, head_dim, requires_grad=True)
    own_score = torch.randn(rows, chunk, heads, chunks, requires_grad=True)
    own_value = torch.randn(rows, chunk, heads, chunks, head_dim, requires_grad=True)
    num_keys = (3 if masked else 0) + chunks - 1
    keys = torch.randn(rows, heads, num_keys, head_dim, requires_grad=True)
    values = torch.randn(rows, heads, num_keys, head_dim, requires_grad=True)
    num_cached_chunks = torch.tensor([2, 0]) if masked else None
    leaves = [query, own_score, own_value, keys, values]
    # the written-out softmax with explicit masks (the reference backend), in fp32
    expected = chunk_attention_reference(*leaves, num_cached_chunks, 0.3)
    actual = chunk_attention(*(t.to(dtype) if t is not own_score else t for t in leaves), num_cached_chunks, scale=0.3)
    torch.testing.assert_close(actual.float(), expected, rtol=tolerance, atol=tolerance)
    weight = torch.randn_like(expected)
    for got, want in zip(_grads(actual.float(), leaves, weight), _grads(expected, leaves, weight)):
        torch.testing.assert_close(got, want, rtol=tolerance * 5, atol=tolerance * 5)


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 2e-6), (torch.bfloat16, 3e-2)])
def test_decode_attention_equals_chunk_attention_for_one_token(dtype, tolerance):
    torch.manual_seed(0)
    batch, heads, slots, head_dim = 3, 2, 5, 8
    query = torch.randn(batch, heads, head_dim)
    own_score = torch.randn(batch, heads)
    own_value = torch.randn(batch, heads, head_dim)
    keys = torch.randn(batch, heads, slots, head_dim)
    values = torch.randn(batch, heads, slots, head_dim)
    count = torch.tensor([0, 2, 5])
    expected = chunk_attention(query[:, None, :, None], own_score[:, None, :, None], own_value[:, None, :, None],
                               keys, values, count, scale=0.4)[:, 0, :, 0]
    actual = decode_attention(query.to(dtype), own_score, own_value.to(dtype), keys.to(dtype), values.to(dtype), count, scale=0.4)
    torch.testing.assert_close(actual.float(), expected, rtol=tolerance, atol=tolerance)
    torch.testing.assert_close(decode_attention(query, own_score, own_value, keys, values, count, 0.4)[0], own_value[0])


@pytest.mark.parametrize("length, window, block", [(50, 7, 8), (64, 16, 16), (33, 1, 5), (40, 64, 128)])
def test_blocked_sliding_window_attention_equals_the_masked_one(length, window, block):
    from modeling_rat.rat_ops import sliding_window_attention

    torch.manual_seed(length)
    query, key, value = (torch.randn(2, 3, length, 8, requires_grad=True) for _ in range(3))
    columns = torch.arange(length)
    allowed = (columns[None, :] <= columns[:, None]) & (columns[:, None] - columns[None, :] < window)
    expected = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=allowed)
    actual = sliding_window_attention(query, key, value, window, block_size=block)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)
    weight = torch.randn_like(expected)
    for got, want in zip(_grads(actual, [query, key, value], weight), _grads(expected, [query, key, value], weight)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("with_initial_state", [False, True])
def test_gated_chunk_scan_forms_the_gated_inputs_like_the_plain_scan(with_initial_state):
    from modeling_rat.rat_ops import GatedChunkScan, gated_chunk_scan, tile_groups

    torch.manual_seed(1)
    gates = torch.rand(2, 3, 4, 8, dtype=torch.float64, requires_grad=True)
    value = torch.randn(2, 3, 4, 8, dtype=torch.float64, requires_grad=True)
    key = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)  # 2 groups of 2, tiled twice
    initial = torch.randn(2, 2, 8, dtype=torch.float64, requires_grad=True) if with_initial_state else None
    leaves = [gates, value, key] + ([initial] if with_initial_state else [])
    inputs = torch.stack([(1 - gates) * value, (1 - gates) * tile_groups(key, 2, 4)], dim=-2)
    expected = chunk_scan_reference(gates, inputs, initial)
    actual = gated_chunk_scan(gates, value, key, initial)
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-12)
    weight = torch.randn_like(expected)
    for got, want in zip(_grads(actual, leaves, weight), _grads(expected, leaves, weight)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    assert torch.autograd.gradcheck(lambda g, v, k: GatedChunkScan.apply(g, v, k, None), (gates, value, key))


# --------------------------------------------------------------------------------------- fused chunk mixing


def _mixing_inputs(rows, chunks, chunk_size, heads, head_dim, groups, dtype, num_cached=0, initial_state=False, seed=0):
    """Leaves of `chunk_mixing` (gates, value, key, query, optional initial state and cached slots) and cos/sin."""
    from modeling_rat.rat_ops import rotary_cos_sin

    generator = torch.Generator().manual_seed(seed)

    def draw(*shape, low_precision=True, uniform=False):
        sample = torch.rand(*shape, generator=generator, dtype=torch.float64) if uniform else torch.randn(
            *shape, generator=generator, dtype=torch.float64
        )
        return sample.to(dtype if low_precision else torch.promote_types(dtype, torch.float32))

    hidden = heads * head_dim
    leaves = {
        "gates": draw(rows, chunks, chunk_size, hidden, low_precision=False, uniform=True),
        "value": draw(rows, chunks, chunk_size, hidden),
        "key": draw(rows, chunks, chunk_size, groups * head_dim),
        "query": draw(rows, chunks, chunk_size, groups * head_dim),
    }
    if initial_state:
        leaves["initial_state"] = draw(rows, 2, hidden, low_precision=False)
    if num_cached:
        leaves["cached_keys"] = draw(rows, heads, num_cached, head_dim)
        leaves["cached_values"] = draw(rows, heads, num_cached, head_dim)
    first_chunk = torch.randint(0, 4, (rows,), generator=generator)
    cos, sin = rotary_cos_sin(first_chunk[:, None] + torch.arange(chunks), head_dim, 10000.0, torch.float32)
    extra = {"cos": cos.to(leaves["gates"].dtype), "sin": sin.to(leaves["gates"].dtype)}
    if num_cached:
        extra["num_cached_chunks"] = torch.arange(rows) % (num_cached + 1)  # 0 .. num_cached valid slots per row
    return leaves, extra


def _reference_mixing(composition=None, **kwargs):
    """`composed_chunk_mixing` of the plain references (or of the functions `composition` names)."""
    from modeling_rat.rat_ops import composed_chunk_mixing, gated_chunk_scan_reference

    return composed_chunk_mixing(*(composition or (gated_chunk_scan_reference, chunk_attention_reference)), **kwargs)


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 2e-5), (torch.bfloat16, 4e-2)])
@pytest.mark.parametrize("block_tokens", [4, 24, 4096])
@pytest.mark.parametrize(
    "rows, chunks, chunk_size, heads, groups, num_cached, initial_state",
    [(2, 5, 3, 4, 2, 0, False), (3, 7, 1, 2, 2, 3, True), (1, 9, 4, 4, 1, 0, True), (2, 4, 16, 2, 1, 2, False)],
)
def test_chunk_mixing_equals_the_composed_reference(
    monkeypatch, dtype, tolerance, block_tokens, rows, chunks, chunk_size, heads, groups, num_cached, initial_state
):
    """The fused CPU mixing (blocks of chunks, hand-written backward) against the plain references composed as the
    model composed them: outputs, summaries, states and the gradient of every input, at odd sizes, from one block to
    blocks of one chunk, with and without an initial state and cached summaries."""
    from modeling_rat import rat_ops

    monkeypatch.setattr(rat_ops, "MIXING_BLOCK_TOKENS", block_tokens)
    leaves, extra = _mixing_inputs(rows, chunks, chunk_size, heads, 8, groups, dtype, num_cached, initial_state)
    fused_leaves = {name: leaf.clone().requires_grad_() for name, leaf in leaves.items()}
    reference_leaves = {name: leaf.float().requires_grad_() for name, leaf in leaves.items()}
    reference_extra = {name: value.float() if value.is_floating_point() else value for name, value in extra.items()}
    actual = rat_ops.chunk_mixing(**fused_leaves, **extra, scale=0.3, return_states=True)
    expected = _reference_mixing(**reference_leaves, **reference_extra, scale=0.3, return_states=True)
    assert actual.mixed.dtype == dtype and actual.states.dtype == torch.float32
    for name in ("mixed", "key_summaries", "value_summaries", "states"):
        torch.testing.assert_close(getattr(actual, name).float(), getattr(expected, name).float(), rtol=tolerance, atol=tolerance, msg=name)
    weight = torch.randn(expected.mixed.shape, generator=torch.Generator().manual_seed(1))
    actual_grads = _grads(actual.mixed.float(), list(fused_leaves.values()), weight)
    expected_grads = _grads(expected.mixed, list(reference_leaves.values()), weight)
    for name, got, want in zip(fused_leaves, actual_grads, expected_grads):
        assert got.dtype == fused_leaves[name].dtype, name
        # relative to the largest gradient: bf16 rounds the inputs of both sides the same way, not the steps
        torch.testing.assert_close(got.float(), want, rtol=0, atol=tolerance * want.abs().max().item(), msg=name)
    with torch.no_grad():  # without gradients the forward itself runs block by block
        inference = rat_ops.chunk_mixing(**leaves, **extra, scale=0.3, return_states=True)
    for name in ("mixed", "key_summaries", "value_summaries", "states"):
        torch.testing.assert_close(getattr(inference, name).float(), getattr(expected, name).float(), rtol=tolerance, atol=tolerance, msg=name)


@pytest.mark.parametrize("block_tokens", [3, 4096])
def test_chunk_mixing_contains_faults_like_the_fast_composition(monkeypatch, block_tokens):
    """A NaN or inf in a token's summary reaches the later chunks of its row and head, never the earlier ones (the
    kernel multiplies the hidden slots by zero weights, 0 * NaN = NaN); a faulty cached slot reaches its row only if
    valid. The same NaN pattern and the same finite values as `chunk_attention`'s containment, from blocks of one
    chunk (the fault then crosses blocks) to one block."""
    from modeling_rat import rat_ops

    monkeypatch.setattr(rat_ops, "MIXING_BLOCK_TOKENS", block_tokens)
    leaves, extra = _mixing_inputs(3, 6, 3, 2, 4, 1, torch.float32, num_cached=2, initial_state=True)
    assert extra["num_cached_chunks"].tolist() == [0, 1, 2]
    leaves["value"][0, 2, 1, 5] = float("nan")  # row 0, chunk 2, token 1, head 1
    leaves["cached_keys"][1, 0, 1] = float("inf")  # row 1: slot 1 of head 0, beyond its one valid slot
    leaves["cached_values"][2, 1, 1] = float("nan")  # row 2: slot 1 of head 1, valid
    with torch.no_grad():
        actual = rat_ops.chunk_mixing(**leaves, **extra, scale=0.3).mixed.unflatten(-1, (2, 4))
        expected = _reference_mixing(**leaves, **extra, scale=0.3, composition=(rat_ops.gated_chunk_scan, chunk_attention))
    expected = expected.mixed.unflatten(-1, (2, 4))  # (N, C, L, H, d)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5, equal_nan=True)
    fault = torch.isnan(actual).any(-1)  # (N, C, L, H)
    assert fault[0, 2, 1:, 1].all() and fault[0, 3:, :, 1].all() and not fault[0, :, :, 0].any()
    assert not fault[0, :2].any() and not fault[0, 2, 0].any()
    assert not fault[1].any()
    assert fault[2, :, :, 1].all() and not fault[2, :, :, 0].any()


@pytest.mark.parametrize("num_cached, initial_state", [(0, False), (2, True)])
def test_chunk_mixing_gradients_pass_gradcheck(monkeypatch, num_cached, initial_state):
    """fp64 finite differences through several blocks (a chunk and a half per block), the cache slots included."""
    from modeling_rat import rat_ops

    monkeypatch.setattr(rat_ops, "MIXING_BLOCK_TOKENS", 6)
    leaves, extra = _mixing_inputs(2, 4, 2, 2, 4, 1, torch.float64, num_cached, initial_state, seed=3)
    names = list(leaves)

    def mixing(*tensors):
        return rat_ops.chunk_mixing(**dict(zip(names, tensors)), **extra, scale=0.5).mixed

    assert torch.autograd.gradcheck(mixing, tuple(leaf.requires_grad_() for leaf in leaves.values()))


def test_chunk_mixing_keeps_no_per_token_intermediate(monkeypatch):
    """What autograd keeps for the backward: the inputs, and per chunk (not per token) a few slots, so that a
    training step holds no states, gated inputs, augmented queries or attention outputs."""
    from modeling_rat import rat_ops

    monkeypatch.setattr(rat_ops, "MIXING_BLOCK_TOKENS", 32)
    rows, chunks, chunk_size, heads, head_dim = 2, 8, 16, 4, 8
    leaves, extra = _mixing_inputs(rows, chunks, chunk_size, heads, head_dim, 2, torch.float32)
    leaves = {name: leaf.requires_grad_() for name, leaf in leaves.items()}
    inputs = {leaf.untyped_storage().data_ptr() for leaf in [*leaves.values(), *extra.values()]}
    saved = {}

    def pack(tensor):
        saved[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        mixed = rat_ops.chunk_mixing(**leaves, **extra, scale=0.3).mixed
    kept = sum(size for pointer, size in saved.items() if pointer not in inputs and pointer != mixed.untyped_storage().data_ptr())
    # per chunk: key and value slots (H x (d + 2) each); per token and head: the log-sum-exp (fp32)
    per_chunk_slots = 2 * heads * (head_dim + 2) * 4
    assert kept <= rows * chunks * per_chunk_slots + rows * chunks * chunk_size * heads * 4 + rows * heads * 2 * per_chunk_slots
    mixed.sum().backward()
    assert all(leaf.grad is not None for leaf in leaves.values())


def test_chunk_mixing_refuses_tensors_off_the_cpu():
    from modeling_rat.rat_ops import chunk_mixing

    leaves, extra = _mixing_inputs(1, 2, 2, 2, 4, 1, torch.float32)
    on_meta = {name: tensor.to("meta") for name, tensor in {**leaves, **extra}.items()}
    with pytest.raises(ValueError, match="CPU tensors only"):
        chunk_mixing(**on_meta, scale=0.5)


def test_chunk_mixing_without_gradients_and_with_states_is_the_same_computation():
    from modeling_rat.rat_ops import chunk_mixing

    leaves, extra = _mixing_inputs(2, 6, 4, 2, 8, 2, torch.float32, num_cached=2, initial_state=True)
    with torch.no_grad():
        plain = chunk_mixing(**leaves, **extra, scale=0.3)
        with_states = chunk_mixing(**leaves, **extra, scale=0.3, return_states=True)
    assert plain.states is None
    torch.testing.assert_close(plain.mixed, with_states.mixed, rtol=0, atol=0)
    expected = _reference_mixing(**leaves, **extra, scale=0.3, return_states=True)
    torch.testing.assert_close(with_states.states, expected.states, rtol=1e-6, atol=1e-6)


def test_the_fast_backend_runs_the_fused_mixing_on_eager_cpu_tensors_and_the_composed_one_when_compiled(monkeypatch):
    """Which mixing each backend gives the model: the fused one only where it can run (eager CPU tensors)."""
    from conftest import random_ids, tiny_model
    from modeling_rat import rat_backends, rat_ops

    calls = []

    def spy(name, function):
        def run(*args, **kwargs):
            calls.append(name)
            return function(*args, **kwargs)
        return run

    monkeypatch.setattr(rat_backends, "chunk_mixing", spy("fused", rat_ops.chunk_mixing))
    monkeypatch.setattr(rat_backends, "composed_chunk_mixing", spy("composed", rat_ops.composed_chunk_mixing))
    model = tiny_model(("rat", "rnn", "rat"), rat_implementation="fast")
    ids = random_ids(1, 9)
    with torch.no_grad():
        model(ids)
        assert calls == ["fused", "fused"]
        calls.clear()
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)  # as inside torch.compile / torch.export
        model(ids)
    assert calls == ["composed", "composed"]
    reference = rat_backends.REFERENCE.chunk_mixing
    assert reference.func is rat_ops.composed_chunk_mixing
    assert reference.args == (rat_ops.gated_chunk_scan_reference, rat_ops.chunk_attention_reference)
