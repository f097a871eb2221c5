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
