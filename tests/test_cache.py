"""The RAT cache: decode == forward (SPEC section 6, properties 2 and 3), rollback, batch operations, size."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import DynamicCache

from conftest import LAYER_PATTERNS, random_ids, tiny_model
from modeling_rat import cache_nbytes
from modeling_rat.modeling_rat import CACHE_FIELD
from modeling_rat.cache_rat import RatChunkCacheLayer, RatRecurrentCacheLayer


CACHE_PATTERNS = ["rat", "rnn", "rat+sliding", "rat+full"]
_MODELS = {}


def model_for(pattern, dtype=torch.float32):
    key = (pattern, dtype)
    if key not in _MODELS:
        _MODELS[key] = tiny_model(LAYER_PATTERNS[pattern], dtype=dtype)
    return _MODELS[key]


def cache_of(output):
    return getattr(output, "cache", None) if hasattr(output, "cache") else output.past_key_values


def run_in_pieces(model, ids, pieces, attention_mask=None):
    """Feed `ids` in consecutive pieces of the given sizes through one cache; return the concatenated logits."""
    cache, logits, start = None, [], 0
    for size in pieces:
        end = start + size
        kwargs = {}
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask[:, :end]
        with torch.no_grad():
            out = model(ids[:, start:end], cache=cache, use_cache=True, **kwargs)
        cache = cache_of(out)
        logits.append(out.logits)
        start = end
    return torch.cat(logits, dim=1), cache


def split_strategy(total):
    return st.lists(st.integers(1, total), min_size=1, max_size=6).map(lambda sizes: _normalise(sizes, total))


def _normalise(sizes, total):
    pieces, remaining = [], total
    for size in sizes:
        if remaining == 0:
            break
        size = min(size, remaining)
        pieces.append(size)
        remaining -= size
    if remaining:
        pieces.append(remaining)
    return pieces


@pytest.mark.parametrize("pattern", CACHE_PATTERNS)
@pytest.mark.parametrize("prefill", [0, 1, 3, 4, 7, 12])
def test_prefill_then_token_by_token_equals_forward(pattern, prefill):
    model = model_for(pattern)
    ids = random_ids(2, 19)
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
    pieces = ([prefill] if prefill else []) + [1] * (ids.shape[1] - prefill)
    stepped, cache = run_in_pieces(model, ids, pieces)
    torch.testing.assert_close(stepped, full, rtol=1e-5, atol=1e-5)
    assert cache.get_seq_length() == ids.shape[1]


@pytest.mark.parametrize("pattern", CACHE_PATTERNS)
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_split_gives_the_same_logits(pattern, data):
    model = model_for(pattern)
    total = data.draw(st.integers(1, 23), label="total")
    pieces = data.draw(split_strategy(total), label="pieces")
    ids = random_ids(2, total, seed=total)
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
    stepped, _ = run_in_pieces(model, ids, pieces)
    torch.testing.assert_close(stepped, full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pattern", CACHE_PATTERNS)
@settings(max_examples=8, deadline=None)
@given(data=st.data())
def test_any_split_with_left_padding(pattern, data):
    model = model_for(pattern)
    total = data.draw(st.integers(6, 20), label="total")
    pads = [data.draw(st.integers(0, total - 1), label="pad0"), data.draw(st.integers(0, total - 1), label="pad1")]
    pieces = data.draw(split_strategy(total), label="pieces")
    ids = random_ids(2, total, seed=total)
    mask = torch.ones_like(ids)
    for row, pad in enumerate(pads):
        mask[row, :pad] = 0
    stepped, _ = run_in_pieces(model, ids, pieces, attention_mask=mask)
    for row, pad in enumerate(pads):
        with torch.no_grad():
            alone = model(ids[row:row + 1, pad:], use_cache=False).logits[0]
        torch.testing.assert_close(stepped[row, pad:], alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pattern", CACHE_PATTERNS)
def test_decode_equals_forward_in_bfloat16(pattern):
    model = model_for(pattern, torch.bfloat16)
    ids = random_ids(2, 21)
    with torch.no_grad():
        full = model(ids, use_cache=False).logits.float()
    stepped, _ = run_in_pieces(model, ids, [5] + [1] * 16)
    # bf16 rounds every matmul output to 8 mantissa bits; the cached path rounds at other points (one token at a
    # time vs whole chunks), so logits of magnitude ~5 differ by a few bf16 ulps.
    torch.testing.assert_close(stepped.float(), full, rtol=0.05, atol=0.1)


# ------------------------------------------------------------------------------------------------- rollback


@pytest.mark.parametrize("pattern", CACHE_PATTERNS)
@pytest.mark.parametrize("rollback", [1, 3, 4, 20])  # 20 = chunk_size + 16
def test_crop_rolls_back_exactly(pattern, rollback):
    model = model_for(pattern)
    ids = random_ids(2, 45)
    prefix = 45 - rollback - 3
    _, cache = run_in_pieces(model, ids, [prefix])
    cache.activate_past_recording()
    assert all(layer.is_croppable for layer in cache.layers)
    # feed tokens that will be rejected, then roll back and feed the true continuation
    wrong = random_ids(2, rollback, seed=99)
    with torch.no_grad():
        model(wrong[:, : rollback // 2 + 1], cache=cache)
        if rollback > 1:
            model(wrong[:, rollback // 2 + 1 :], cache=cache)
    cache.crop(-rollback)
    assert cache.get_seq_length() == prefix
    with torch.no_grad():
        continued = model(ids[:, prefix:], cache=cache).logits
        expected = model(ids, use_cache=False).logits[:, prefix:]
    torch.testing.assert_close(continued, expected, rtol=1e-5, atol=1e-5)


def test_crop_without_recording_is_refused_clearly():
    model = model_for("rat")
    _, cache = run_in_pieces(model, random_ids(1, 10), [10])
    assert not cache.layers[0].is_croppable
    with pytest.raises(ValueError, match="activate_past_recording"):
        cache.crop(-2)


# ------------------------------------------------------------------------------------------ batch operations


@pytest.mark.parametrize("pattern", CACHE_PATTERNS)
def test_reorder_select_repeat_and_reset(pattern):
    model = model_for(pattern)
    ids = random_ids(3, 14)
    _, cache = run_in_pieces(model, ids, [9])
    order = torch.tensor([2, 0, 0])
    cache.reorder_cache(order)
    with torch.no_grad():
        continued = model(ids[order, 9:], cache=cache).logits
        expected = model(ids[order], use_cache=False).logits[:, 9:]
    torch.testing.assert_close(continued, expected, rtol=1e-5, atol=1e-5)

    _, cache = run_in_pieces(model, ids, [9])
    cache.batch_select_indices(torch.tensor([1]))
    cache.batch_repeat_interleave(2)
    with torch.no_grad():
        continued = model(ids[[1, 1], 9:], cache=cache).logits
    torch.testing.assert_close(continued, expected[[1, 1]] if False else model(ids[[1, 1]], use_cache=False).logits[:, 9:], rtol=1e-5, atol=1e-5)

    cache.reset()
    assert cache.get_seq_length() == 0
    with torch.no_grad():
        again = model(ids[:2, :5], cache=cache).logits
    torch.testing.assert_close(again, model(ids[:2, :5], use_cache=False).logits, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------------ size


def test_cache_is_one_chunk_size_of_a_kv_cache_plus_the_running_state():
    chunk_size, hidden = 4, 32
    model = tiny_model(["rat", "rat"], chunk_size=chunk_size)
    for length in (4, 17, 64):
        _, cache = run_in_pieces(model, random_ids(1, length), [length])
        kv_bytes = 2 * length * hidden * 4 * 2  # keys + values, fp32, two layers (a Llama-style KV cache)
        expected = 2 * (2 * (length // chunk_size) * hidden * 4 + 2 * hidden * 4)
        assert cache_nbytes(cache) == expected
        if length % chunk_size == 0:
            assert cache_nbytes(cache) == kv_bytes // chunk_size + 2 * 2 * hidden * 4


def test_dynamic_cache_from_config_builds_rat_layers():
    model = model_for("rat+full")
    cache = DynamicCache(config=model.config)
    assert isinstance(cache.layers[0], RatChunkCacheLayer)
    rnn_cache = DynamicCache(config=model_for("rnn").config)
    assert isinstance(rnn_cache.layers[0], RatRecurrentCacheLayer)


# ------------------------------------------------------------------------------------------------- bad input


def test_cache_of_another_model_or_batch_size_is_refused():
    small = model_for("rat")
    other = tiny_model(["rat", "rat"], chunk_size=3)
    _, cache = run_in_pieces(small, random_ids(2, 9), [9])
    with pytest.raises(ValueError, match="another model|belongs to one model"):
        other(random_ids(2, 1), cache=cache)
    with pytest.raises(ValueError, match="batch size"):
        small(random_ids(3, 1), cache=cache)
    with pytest.raises(ValueError, match="layers"):
        tiny_model(["rat", "rat", "rat"])(random_ids(2, 1), cache=cache)
    _, attention_cache = run_in_pieces(model_for("rat+full"), random_ids(2, 9), [9])
    with pytest.raises(ValueError):
        model_for("rat+sliding")(random_ids(2, 1), cache=attention_cache)


def test_attention_mask_must_cover_cache_and_new_tokens():
    model = model_for("rat")
    _, cache = run_in_pieces(model, random_ids(2, 9), [9])
    with pytest.raises(ValueError, match="expected \\(2, 11\\)"):
        model(random_ids(2, 2), cache=cache, attention_mask=torch.ones(2, 2, dtype=torch.long))


def test_padded_cache_requires_the_mask_afterwards():
    model = model_for("rat")
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[0, :3] = 0
    _, cache = run_in_pieces(model, random_ids(2, 9), [9], attention_mask=mask)
    with pytest.raises(ValueError, match="full `attention_mask`"):
        model(random_ids(2, 1), cache=cache)


def test_position_ids_that_do_not_continue_the_cache_are_refused():
    model = model_for("rat")
    _, cache = run_in_pieces(model, random_ids(2, 9), [9])
    with pytest.raises(ValueError, match="continue"):
        model(random_ids(2, 3), cache=cache, position_ids=torch.arange(3)[None].expand(2, -1))


# ---------------------------------------------------------------------------------------------- static cache


@pytest.mark.parametrize("pattern", CACHE_PATTERNS)
def test_static_cache_generation_equals_dynamic(pattern):
    model = model_for(pattern)
    ids = random_ids(2, 9)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    kwargs = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        static = model.generate(ids, cache_implementation="static", **kwargs)
        dynamic = model.generate(ids, **kwargs)
    assert torch.equal(static, dynamic)


@pytest.mark.parametrize("pattern", CACHE_PATTERNS)
def test_compiled_decode_step_with_a_static_cache_does_not_recompile_per_token(pattern):
    """Dynamo traces the decode step once for a fixed mask length, once more when the length becomes dynamic,
    then never again: no graph breaks, no per-token recompilation (checked with a counting backend, which
    exercises exactly what torch.compile's front end does without paying for code generation)."""
    from torch._dynamo.testing import CompileCounter
    from transformers import StaticCache

    torch._dynamo.reset()
    model = model_for(pattern)
    ids = random_ids(2, 7)
    counter = CompileCounter()
    compiled_forward = torch.compile(model.forward, backend=counter)

    def decode(forward, steps=12):
        cache = StaticCache(config=model.config, max_cache_len=32)
        with torch.no_grad():
            out = model(ids, cache=cache, attention_mask=torch.ones_like(ids))
            token, tokens = out.logits[:, -1:].argmax(-1), []
            for step in range(steps):
                mask = torch.ones(2, ids.shape[1] + step + 1, dtype=torch.long)
                out = forward(token, attention_mask=mask, cache=cache)
                token = out.logits[:, -1:].argmax(-1)
                tokens.append(token)
        return torch.cat(tokens, dim=1)

    eager = decode(model.forward)
    compiled = decode(compiled_forward)
    assert torch.equal(compiled, eager)
    assert counter.frame_count <= 2, f"{counter.frame_count} compilations for 12 decode steps"
    again = decode(compiled_forward)  # a new cache object of the same shapes reuses the compiled code
    assert torch.equal(again, eager) and counter.frame_count <= 2


def test_cache_longer_than_the_inputs_imply_is_refused():
    model = model_for("rat+full")
    ids = random_ids(2, 9)
    _, cache = run_in_pieces(model, ids, [9])
    # generate() takes the cache under the name of the installed transformers (`cache` from 5.24 on)
    with pytest.raises(ValueError, match="already holds 9 tokens"):
        model.generate(ids[:, :4], max_new_tokens=3, pad_token_id=0, **{CACHE_FIELD: cache})
    with pytest.raises(ValueError, match="one position per new token"):
        model(ids[:, :3], position_ids=torch.arange(5)[None], use_cache=False)


def test_rat_cache_is_one_chunk_size_of_llamas_cache_plus_the_running_state():
    """A real Llama of the same width, depth and heads, prefilled with the same number of tokens."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, heads, layers, chunk_size = 32, 4, 2, 4
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=61, hidden_size=hidden, intermediate_size=4 * hidden,
                                         num_hidden_layers=layers, num_attention_heads=heads,
                                         num_key_value_heads=heads)).eval()
    rat = tiny_model(["rat"] * layers, chunk_size=chunk_size)
    for length in (8, 16, 64):
        ids = random_ids(3, length)
        with torch.no_grad():
            llama_out = llama(ids, use_cache=True)
        llama_cache = getattr(llama_out, "cache", None) if "cache" in llama_out else llama_out.past_key_values
        _, rat_cache = run_in_pieces(rat, ids, [length])
        per_sequence_state = 2 * hidden * 4 * layers  # running value and key sums, fp32
        assert cache_nbytes(rat_cache) == cache_nbytes(llama_cache) // chunk_size + 3 * per_sequence_state
