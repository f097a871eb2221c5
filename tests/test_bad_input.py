"""Bad input: every case gives a clear error that says what to change, or a result that is right.

Sections: model inputs (ids, embeddings), attention masks, position ids, generate(), labels and logits_to_keep, the
cache, and faults (NaN or inf in one token) that must never reach earlier tokens, other rows or other sequences.
"""

import copy

import pytest
import torch
from transformers import DynamicCache
from transformers.testing_utils import CaptureLogger
from transformers.utils import logging as transformers_logging

from conftest import LAYER_PATTERNS, random_ids, tiny_model
from modeling_rat.modeling_rat import CACHE_FIELD
from modeling_rat.rat_inputs import logger as inputs_logger
from oracles import token_by_token_mixers


_MODELS = {}


def model_for(pattern, **overrides):
    key = (pattern, tuple(sorted(overrides.items())))
    if key not in _MODELS:
        _MODELS[key] = tiny_model(LAYER_PATTERNS.get(pattern, pattern.split(",")), **overrides)
    model = _MODELS[key]
    model.set_rat_implementation("fast")
    return model


def logits_of(model, *args, **kwargs):
    with torch.no_grad():
        return model(*args, **kwargs).logits


def cache_of(output):
    return getattr(output, CACHE_FIELD)


def padded_mask(lengths, total, side="left"):
    mask = torch.zeros(len(lengths), total, dtype=torch.long)
    for row, length in enumerate(lengths):
        if side == "left":
            mask[row, total - length :] = 1
        else:
            mask[row, :length] = 1
    return mask


# ------------------------------------------------------------------------------------------------ model inputs


def _embeds(model, ids):
    return model.get_input_embeddings()(ids).detach()


MODEL_INPUT_CASES = {
    "id >= vocab": (lambda m, ids: dict(input_ids=ids + 61), ValueError, "id \\d+, outside the vocabulary \\[0, 61\\)"),
    "negative id": (lambda m, ids: dict(input_ids=-ids), ValueError, "id -.* outside the vocabulary"),
    "1-D ids": (lambda m, ids: dict(input_ids=ids[0]), ValueError, "shape \\(batch, tokens\\).*input_ids\\[None\\]"),
    "3-D ids": (lambda m, ids: dict(input_ids=ids[None]), ValueError, "shape \\(batch, tokens\\), got \\(1, 2, 7\\)"),
    "float ids": (lambda m, ids: dict(input_ids=ids.float()), TypeError, "integer tensor \\(token ids\\), got torch.float32"),
    "bool ids": (lambda m, ids: dict(input_ids=ids > 3), TypeError, "integer tensor \\(token ids\\), got torch.bool"),
    "list of ids": (lambda m, ids: dict(input_ids=ids.tolist()), TypeError, "integer tensor \\(token ids\\), got list"),
    "ids and embeds": (lambda m, ids: dict(input_ids=ids, inputs_embeds=_embeds(m, ids)), ValueError, "exactly one"),
    "neither": (lambda m, ids: dict(), ValueError, "exactly one"),
    "embeds too narrow": (
        lambda m, ids: dict(inputs_embeds=_embeds(m, ids)[..., :31]), ValueError, "\\(batch, tokens, 32\\).*got \\(2, 7, 31\\)"
    ),
    "2-D embeds": (lambda m, ids: dict(inputs_embeds=_embeds(m, ids)[0]), ValueError, "\\(batch, tokens, 32\\)"),
    "integer embeds": (lambda m, ids: dict(inputs_embeds=_embeds(m, ids).long()), TypeError, "floating-point tensor"),
    "float64 embeds": (lambda m, ids: dict(inputs_embeds=_embeds(m, ids).double()), TypeError, "torch.float64 but the model computes in torch.float32"),
    "bfloat16 embeds": (lambda m, ids: dict(inputs_embeds=_embeds(m, ids).bfloat16()), TypeError, "inputs_embeds.to\\(model.dtype\\)"),
    "batch 0": (lambda m, ids: dict(input_ids=ids[:0]), ValueError, "no rows \\(batch size 0\\)"),
    "no token": (lambda m, ids: dict(input_ids=ids[:, :0]), ValueError, "no new token"),
    "attention weights": (lambda m, ids: dict(input_ids=ids, output_attentions=True), ValueError, "attention weights"),
    "cache of another kind": (lambda m, ids: dict(input_ids=ids, cache=[(ids, ids)]), TypeError, "transformers `Cache`"),
}


@pytest.mark.parametrize("case", MODEL_INPUT_CASES)
def test_bad_model_inputs_get_clear_errors(case):
    model = model_for("rat+full")
    make_inputs, error, message = MODEL_INPUT_CASES[case]
    with pytest.raises(error, match=message):
        model(**make_inputs(model, random_ids(2, 7)))


def test_generate_with_batch_0_is_refused():
    with pytest.raises(ValueError, match="no rows"):
        model_for("rat").generate(random_ids(2, 5)[:0], max_new_tokens=2, pad_token_id=0)


def test_embeddings_of_another_dtype_run_under_autocast():
    """Correct behaviour, not an error: under autocast, embeddings of another floating dtype are what autocast mixes."""
    model = model_for("rat+full")
    ids = random_ids(2, 7)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(inputs_embeds=_embeds(model, ids).bfloat16(), use_cache=False).logits
    assert torch.isfinite(out).all()


# ------------------------------------------------------------------------------------------------ attention masks


MASK_CASES = {
    "additive 0/-inf": (lambda mask: torch.zeros(mask.shape).masked_fill(mask == 0, float("-inf")), ValueError, "additive mask.*\\(mask == 0\\)"),
    "additive 0/min": (lambda mask: torch.zeros(mask.shape).masked_fill(mask == 0, torch.finfo(torch.float32).min), ValueError, "additive mask"),
    "values 0/2": (lambda mask: mask * 2, ValueError, "must hold 1 for real tokens and 0 for padding, but it holds 2"),
    "uint8 0/255": (lambda mask: (mask * 255).to(torch.uint8), ValueError, "but it holds 255"),
    "values 0/-1": (lambda mask: -mask, ValueError, "but it holds -1: this looks like an additive mask"),
    "values 0/0.5": (lambda mask: mask * 0.5, ValueError, "but it holds 0.5"),
    "a NaN": (lambda mask: mask.float().masked_fill(mask == 0, float("nan")), ValueError, "but it holds nan"),
    "float zeros only": (lambda mask: torch.zeros(mask.shape), ValueError, "zeros only.*torch.ones_like"),
    "complex": (lambda mask: mask.to(torch.complex64), TypeError, "must hold 0 and 1"),
    "a list": (lambda mask: mask.tolist(), TypeError, "must be a tensor"),
}


@pytest.mark.parametrize("case", MASK_CASES)
def test_masks_that_are_not_zero_one_are_refused(case):
    """An additive mask read as booleans would turn padding into real tokens: refused, with the conversion to use."""
    make_mask, error, message = MASK_CASES[case]
    mask = padded_mask([7, 4], 7)
    with pytest.raises(error, match=message):
        model_for("rat+full")(random_ids(2, 7), attention_mask=make_mask(mask))


@pytest.mark.parametrize("dtype", [torch.bool, torch.uint8, torch.int32, torch.float16, torch.float32])
def test_zero_one_masks_of_any_dtype_give_the_same_logits(dtype):
    model = model_for("rat+full")
    ids, mask = random_ids(2, 7), padded_mask([7, 4], 7)
    torch.testing.assert_close(logits_of(model, ids, attention_mask=mask.to(dtype)), logits_of(model, ids, attention_mask=mask))


def test_an_integer_mask_of_zeros_only_is_all_padding():
    """Correct behaviour, not an error: a left-padded batch fed in pieces starts with pieces of padding only."""
    model = model_for("rat+full")
    ids, mask = random_ids(2, 7), padded_mask([4, 3], 7)
    with torch.no_grad():
        first = model(ids[:, :2], attention_mask=mask[:, :2], use_cache=True)
        rest = model(ids[:, 2:], attention_mask=mask, cache=cache_of(first)).logits
    torch.testing.assert_close(rest[:, -3:], logits_of(model, ids, attention_mask=mask)[:, -3:], rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------- position ids


POSITION_CASES = {
    "negative": (lambda positions: positions - 1, ValueError, "must be >= 0.*got -1"),
    "fractional": (lambda positions: positions * 1.5, TypeError, "integer tensor.*torch.float32"),
    "integral floats": (lambda positions: positions.double(), TypeError, "integer tensor.*torch.float64"),
    "booleans": (lambda positions: positions > 2, TypeError, "integer tensor.*torch.bool"),
    "a list": (lambda positions: positions.tolist(), TypeError, "integer tensor.*list"),
}


@pytest.mark.parametrize("case", POSITION_CASES)
def test_bad_position_ids_are_refused(case):
    make_positions, error, message = POSITION_CASES[case]
    positions = torch.arange(7)[None].expand(2, -1)
    with pytest.raises(error, match=message):
        model_for("rat+full")(random_ids(2, 7), position_ids=make_positions(positions))


@pytest.mark.parametrize("pattern", ["rat", "rnn", "rat+full", "rat+sliding"])
@pytest.mark.parametrize("given", [3, 10])
def test_decoding_one_token_at_a_position_that_does_not_continue_the_cache_is_refused(pattern, given):
    model = model_for(pattern)
    ids = random_ids(2, 10)
    with torch.no_grad():
        cache = cache_of(model(ids[:, :9], use_cache=True))
        with pytest.raises(ValueError, match=f"holding 9 tokens, so its next position is 9, but `position_ids` give {given}"):
            model(ids[:, 9:], cache=copy.deepcopy(cache), position_ids=torch.tensor([[9], [given]]))
        continued = model(ids[:, 9:], cache=cache, position_ids=torch.full((2, 1), 9)).logits
    torch.testing.assert_close(continued[:, 0], logits_of(model, ids, use_cache=False)[:, 9], rtol=1e-5, atol=1e-5)


def test_positions_that_start_after_zero_without_a_cache_follow_the_equations():
    """Correct behaviour, not an error: a sequence may start at any position p (chunk p // L, rotary angle of p)."""
    model = model_for("rat+sliding")
    ids = random_ids(2, 9)
    positions = torch.arange(9)[None].expand(2, -1) + torch.tensor([[5], [0]])
    with token_by_token_mixers(model):
        expected = logits_of(model, ids, position_ids=positions, use_cache=False)
    torch.testing.assert_close(logits_of(model, ids, position_ids=positions, use_cache=False), expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------- generate()


@pytest.mark.parametrize("pattern", ["rat", "rnn", "rat+sliding", "rat+full"])
@pytest.mark.parametrize("max_new_tokens", [1, 4])
def test_generate_refuses_a_right_padded_prompt(pattern, max_new_tokens):
    """generate() reads the logits of the last column, padding for a right-padded row: refused before any token."""
    mask = padded_mask([8, 5], 8, side="right")
    with pytest.raises(ValueError, match="Row 1 .*\\(right padding\\).*padding_side"):
        model_for(pattern).generate(random_ids(2, 8), attention_mask=mask, max_new_tokens=max_new_tokens, pad_token_id=0)


@pytest.mark.parametrize("pattern", ["rat", "rnn", "rat+sliding"])
def test_generate_refuses_an_empty_prompt_row(pattern):
    """Refused at the first decode step: generate() numbers the first new token of an all-padding row 1, after no real
    token. (With max_new_tokens=1 there is no decode step, and a prefill of padding only cannot be told from the first
    piece of a chunked prefill of a left-padded prompt, which is right: that case needs a check inside generate().)"""
    mask = padded_mask([8, 0], 8)
    with pytest.raises(ValueError, match="Row 1 has no real token before this one.*empty prompt.*BOS"):
        model_for(pattern).generate(random_ids(2, 8), attention_mask=mask, max_new_tokens=3, pad_token_id=0)


@pytest.mark.parametrize("pattern", ["rat", "rat+sliding"])
def test_chunked_prefill_of_a_left_padded_prompt_starts_with_padding_only(pattern):
    """Correct behaviour, not an error: the first pieces of a row's prompt may be padding only."""
    model = model_for(pattern)
    ids, mask = random_ids(2, 10), padded_mask([10, 4], 10)
    kwargs = dict(attention_mask=mask, max_new_tokens=4, pad_token_id=0, do_sample=False)
    with torch.no_grad():
        assert torch.equal(model.generate(ids, prefill_chunk_size=3, **kwargs), model.generate(ids, **kwargs))


@pytest.mark.parametrize("pattern", ["rat", "rnn", "rat+sliding"])
def test_a_right_padded_batch_runs_but_its_cache_cannot_be_continued(pattern):
    """A right-padded batch in a plain forward is correct (eval mode: the model builds a cache, which is not refused);
    continuing that cache is refused, with or without position ids: a sliding-window cache keeps the last columns,
    padding included, so the continued rows would lose real tokens from their window."""
    model = model_for(pattern)
    ids, mask = random_ids(2, 9), padded_mask([9, 5], 9, side="right")
    with torch.no_grad():
        out = model(ids[:, :8], attention_mask=mask[:, :8])  # eval mode: use_cache defaults to True
        alone = model(ids[1:, :5], use_cache=False).logits
        torch.testing.assert_close(out.logits[1, :5], alone[0], rtol=1e-5, atol=1e-5)
        with pytest.raises(ValueError, match="Row 1 .*\\(right padding\\)"):
            model(ids[:, 8:], attention_mask=torch.cat([mask[:, :8], torch.ones(2, 1, dtype=torch.long)], 1),
                  cache=cache_of(out))


HOLE_MASK = torch.tensor([[1, 1, 1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 1, 1, 0, 1]])  # row 1: padding between real tokens


@pytest.mark.parametrize("pattern", ["rat", "rnn", "rat+full"])
def test_padding_between_real_tokens_is_continued_correctly(pattern):
    """Correct behaviour, not an error (as transformers' generation tests use masks): a row with padding between its
    real tokens, continued through a given cache token by token, gives the logits of its real tokens alone."""
    model = model_for(pattern)
    ids = random_ids(2, 10)
    mask = torch.cat([HOLE_MASK, torch.ones(2, 2, dtype=torch.long)], dim=1)
    with torch.no_grad():
        output = model(ids[:, :8], attention_mask=mask[:, :8], use_cache=True)
        cache, steps = cache_of(output), []
        for column in (8, 9):
            steps.append(model(ids[:, column : column + 1], attention_mask=mask[:, : column + 1], cache=cache).logits)
        real = mask[1].bool()
        alone = model(ids[1:, real], use_cache=False).logits[0]
    torch.testing.assert_close(torch.cat(steps, dim=1)[1], alone[-2:], rtol=1e-5, atol=1e-5)


def test_padding_between_real_tokens_is_refused_where_a_sliding_window_cache_would_keep_it():
    """A sliding-window layer's cache keeps the last columns, padding included: with padding between real tokens,
    real tokens would leave the window early. Refused when such a cache is continued, with what to do."""
    model = model_for("rat+sliding")
    ids = random_ids(2, 9)
    with torch.no_grad():
        cache = cache_of(model(ids[:, :8], attention_mask=HOLE_MASK, use_cache=True))
        with pytest.raises(ValueError, match="Row 1 .*padding after real tokens.*sliding-window layers.*padding_side"):
            model(ids[:, 8:], attention_mask=torch.cat([HOLE_MASK, torch.ones(2, 1, dtype=torch.long)], 1), cache=cache)


# ----------------------------------------------------------------------------------------- labels, logits_to_keep


LOSS_CASES = {
    "labels shorter": (dict(labels=lambda ids: ids[:, :5]), ValueError, "`labels` has shape \\(2, 5\\) but the input has shape \\(2, 7\\)"),
    "labels of another batch": (dict(labels=lambda ids: ids[:1]), ValueError, "`labels` has shape \\(1, 7\\)"),
    "flat labels": (dict(labels=lambda ids: ids.reshape(-1)), ValueError, "`labels` has shape \\(14,\\)"),
    "float labels": (dict(labels=lambda ids: ids.float()), TypeError, "integer tensor \\(token ids, -100 for ignored tokens\\), got torch.float32"),
    "label >= vocab": (dict(labels=lambda ids: ids + 61), ValueError, "holds \\d+, which is neither a token id in \\[0, 61\\) nor the ignored label -100"),
    "label -1": (dict(labels=lambda ids: ids - ids - 1), ValueError, "holds -1, which is neither"),
    "shift_labels of another shape": (dict(labels=lambda ids: ids, shift_labels=lambda ids: ids[:, 1:]), ValueError, "`shift_labels` has shape \\(2, 6\\)"),
    "labels with logits_to_keep": (dict(labels=lambda ids: ids, logits_to_keep=lambda ids: 1), ValueError, "must be 0 when `labels`"),
    "negative logits_to_keep": (dict(logits_to_keep=lambda ids: -1), ValueError, "must be >= 0"),
    "float logits_to_keep": (dict(logits_to_keep=lambda ids: 1.5), TypeError, "an int or a tensor of indices"),
    "boolean logits_to_keep": (dict(logits_to_keep=lambda ids: True), TypeError, "an int or a tensor"),
    "float tensor logits_to_keep": (dict(logits_to_keep=lambda ids: torch.tensor([0.0])), TypeError, "integer tensor \\(indices of tokens\\)"),
    "2-D logits_to_keep": (dict(logits_to_keep=lambda ids: torch.tensor([[0, 1]])), ValueError, "must be 1-D"),
    "logits_to_keep out of range": (dict(logits_to_keep=lambda ids: torch.tensor([0, 7])), ValueError, "outside the 7 tokens"),
}


@pytest.mark.parametrize("case", LOSS_CASES)
def test_bad_labels_and_logits_to_keep_get_clear_errors(case):
    arguments, error, message = LOSS_CASES[case]
    ids = random_ids(2, 7)
    with pytest.raises(error, match=message):
        model_for("rat")(ids, use_cache=False, **{name: make(ids) for name, make in arguments.items()})


def test_logits_to_keep_beyond_the_input_keeps_every_token():
    """Correct behaviour, not an error: "keep the last n" keeps all when there are fewer (transformers' meaning)."""
    model = model_for("rat")
    ids = random_ids(2, 7)
    torch.testing.assert_close(logits_of(model, ids, logits_to_keep=100), logits_of(model, ids))
    torch.testing.assert_close(logits_of(model, ids, logits_to_keep=torch.tensor([-1, 0])), logits_of(model, ids)[:, [6, 0]])


def test_labels_that_ignore_every_target_warn_that_the_loss_is_nan():
    """A warning, not an error: the loss is NaN (a mean over no token) but its gradients are exactly zero."""
    model = model_for("rat").train()
    ids = random_ids(2, 7)
    labels = torch.full_like(ids, -100)
    labels[:, 0] = ids[:, 0]  # labels[:, 0] is never a target (token t predicts token t + 1)
    transformers_logging.warning_once.cache_clear()
    try:
        with CaptureLogger(inputs_logger) as captured:
            loss = model(ids, labels=labels, use_cache=False).loss
        loss.backward()
        assert torch.isnan(loss) and "Every target of a batch is ignored (-100" in captured.out
        assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in model.parameters() if p.grad is not None)
        with CaptureLogger(inputs_logger) as captured:  # other micro-batches hold supervised tokens: loss 0, no word
            counted = model(ids, labels=labels, use_cache=False, num_items_in_batch=torch.tensor(5)).loss
        assert counted.item() == 0.0 and captured.out == ""
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()


def test_a_custom_ignore_index_is_respected():
    model = model_for("rat")
    ids = random_ids(2, 7)
    labels = ids.masked_fill(ids % 2 == 0, -1)
    loss = model(ids, labels=labels, ignore_index=-1, use_cache=False).loss
    with torch.no_grad():
        logits = model(ids, use_cache=False).logits
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 61), labels[:, 1:].reshape(-1), ignore_index=-1)
    torch.testing.assert_close(loss.detach(), expected)


# -------------------------------------------------------------------------------------------------------- cache


@pytest.mark.parametrize("pattern", ["rat", "rnn", "rat+full", "rat+sliding"])
def test_a_cache_filled_with_gradients_on_is_stored_detached_and_copies(pattern):
    model = model_for(pattern)
    ids = random_ids(2, 9)
    out = model(ids, use_cache=True)
    cache = cache_of(out)
    for layer in cache.layers:
        for name in ("keys", "values", "running_state"):
            tensor = getattr(layer, name, None)
            assert not (torch.is_tensor(tensor) and tensor.requires_grad), f"{type(layer).__name__}.{name} keeps a graph"
    copied = copy.deepcopy(cache)
    # the forward's own gradients are unchanged by detaching what the cache keeps
    out.logits.square().mean().backward()
    with_cache = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    model(ids, use_cache=False).logits.square().mean().backward()
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(with_cache[name], parameter.grad, msg=name)
    model.zero_grad(set_to_none=True)
    with torch.no_grad():  # the copy continues like the original
        step = ids[:, :1]
        torch.testing.assert_close(model(step, cache=copied).logits, model(step, cache=cache).logits)


@pytest.mark.parametrize("pattern", ["rat", "rnn", "rat+full", "rat+sliding"])
def test_decoding_with_a_cache_of_another_batch_size_is_refused(pattern):
    model = model_for(pattern)
    with torch.no_grad():
        cache = cache_of(model(random_ids(2, 9), use_cache=True))
        with pytest.raises(ValueError, match="holds 2 sequences but the input has batch size 3"):
            model(random_ids(3, 1), cache=cache)


@pytest.mark.parametrize("pattern", ["rat", "rat+full"])
@pytest.mark.parametrize("change", ["autocast off", "autocast on", "model converted"])
@pytest.mark.parametrize("new_tokens", [1, 3])
def test_a_cache_continued_in_another_dtype_is_refused(pattern, change, new_tokens):
    model = model_for(pattern)
    ids = random_ids(2, 9)
    autocast_first = change == "autocast off"
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast_first):
        cache = cache_of(model(ids, use_cache=True))
    continuing = copy.deepcopy(model).to(torch.bfloat16) if change == "model converted" else model
    filled, computed = ("bfloat16", "float32") if autocast_first else ("float32", "bfloat16")
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=change == "autocast on"):
        with pytest.raises(ValueError, match=f"filled in torch.{filled} but the model now computes in torch.{computed}"):
            continuing(ids[:, :new_tokens], cache=cache)


def test_an_rnn_cache_continues_in_any_dtype():
    """Correct behaviour, not an error: an rnn layer's cache is its fp32 state, whatever dtype the model computes in."""
    model = model_for("rnn")
    ids = random_ids(2, 10)
    with torch.no_grad():
        cache = cache_of(model(ids[:, :9], use_cache=True))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            continued = model(ids[:, 9:], cache=cache).logits[:, 0]
            expected = model(ids, use_cache=False).logits[:, 9]
    torch.testing.assert_close(continued.float(), expected.float(), rtol=0.05, atol=0.05)  # bf16: 8 bits of mantissa


# ------------------------------------------------------------------------------- faults never travel backwards


FAULT_PATTERNS = {  # layer types, whether RAT backends matter
    "rat": (["rat", "rat"], True),
    "rnn": (["rnn", "rnn"], True),
    "full": (["full_attention", "full_attention"], False),
    "sliding": (["sliding_attention", "sliding_attention"], False),  # 13 tokens > 2 windows: attended block by block
    "rat+sliding": (["rat", "sliding_attention"], True),
}


def fault_cases():
    for pattern, (layer_types, has_rat) in FAULT_PATTERNS.items():
        for backend in ("reference", "fast", "triton") if has_rat else ("fast",):
            marks = [pytest.mark.triton] if backend == "triton" else []
            yield pytest.param(pattern, backend, marks=marks, id=f"{pattern}-{backend}")


def fault_model(pattern, backend):
    model = model_for(",".join(FAULT_PATTERNS[pattern][0]))
    model.set_rat_implementation(backend)
    return model


def with_fault(embeds, row, column, value=float("nan")):
    faulty = embeds.clone()
    faulty[row, column] = value
    return faulty


def assert_same(actual, expected):
    """Tokens the fault must not reach: the same logits as without it (finite, to tight tolerance)."""
    assert torch.isfinite(actual).all(), "a fault reached tokens that do not see it"
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pattern, backend", fault_cases())
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_fault_in_one_token_never_reaches_earlier_tokens_or_other_rows(pattern, backend, value):
    model = fault_model(pattern, backend)
    embeds = _embeds(model, random_ids(2, 13))
    clean = logits_of(model, inputs_embeds=embeds, use_cache=False)
    faulty = logits_of(model, inputs_embeds=with_fault(embeds, 0, 6, value), use_cache=False)
    assert_same(faulty[0, :6], clean[0, :6])
    assert_same(faulty[1], clean[1])
    assert torch.isnan(faulty[0, 6]).all(), "the fault was swallowed instead of reaching its own token"


@pytest.mark.parametrize("pattern, backend", fault_cases())
def test_a_fault_stays_inside_its_packed_sequence_and_out_of_padding(pattern, backend):
    model = fault_model(pattern, backend)
    embeds = _embeds(model, random_ids(2, 13))
    positions = torch.tensor([list(range(6)) + list(range(7)), list(range(13))])
    packed_clean = logits_of(model, inputs_embeds=embeds, position_ids=positions, use_cache=False)
    packed = logits_of(model, inputs_embeds=with_fault(embeds, 0, 2), position_ids=positions, use_cache=False)
    assert_same(packed[0, :2], packed_clean[0, :2])
    assert_same(packed[0, 6:], packed_clean[0, 6:])  # the next sequence of the row
    assert_same(packed[1], packed_clean[1])
    mask = padded_mask([9, 13], 13)
    padded_clean = logits_of(model, inputs_embeds=embeds, attention_mask=mask, use_cache=False)
    in_padding = logits_of(model, inputs_embeds=with_fault(embeds, 0, 1), attention_mask=mask, use_cache=False)
    assert_same(in_padding[mask.bool()], padded_clean[mask.bool()])
    after_padding = logits_of(model, inputs_embeds=with_fault(embeds, 0, 8), attention_mask=mask, use_cache=False)
    assert_same(after_padding[0, 4:8], padded_clean[0, 4:8])


@pytest.mark.parametrize("pattern, backend", fault_cases())
def test_a_fault_never_reaches_earlier_tokens_through_the_cache(pattern, backend):
    """Prefill, a piece of several tokens, then decoding: a fault in a row reaches only its own later tokens, and a
    fault in the padding of a left-padded prompt reaches nothing."""
    model = fault_model(pattern, backend)
    embeds = _embeds(model, random_ids(2, 16))
    mask = padded_mask([16, 13], 16)
    embeds_with_faults = with_fault(with_fault(embeds, 1, 1), 0, 11)  # padding of row 1; token 11 of row 0

    def run(inputs):
        logits, cache = [], None
        with torch.no_grad():
            for start, end in [(0, 5), (5, 13), *((t, t + 1) for t in range(13, 16))]:
                out = model(inputs_embeds=inputs[:, start:end], attention_mask=mask[:, :end], cache=cache, use_cache=True)
                logits.append(out.logits)
                cache = cache_of(out)
        return torch.cat(logits, dim=1)

    clean, faulty = run(embeds), run(embeds_with_faults)
    assert_same(faulty[0, :11], clean[0, :11])
    assert_same(faulty[1, 3:], clean[1, 3:])
    assert torch.isnan(faulty[0, 11:]).all()


@pytest.mark.parametrize("pattern, backend", fault_cases())
def test_a_fault_in_rolled_back_tokens_does_not_survive_the_rollback(pattern, backend):
    """Assisted decoding rolls back rejected draft tokens; one of them with a NaN (here the token completing a chunk,
    whose summary the cache wrote) must leave no trace in the tokens fed after the rollback."""
    model = fault_model(pattern, backend)
    embeds = _embeds(model, random_ids(2, 12))
    with torch.no_grad():
        expected = model(inputs_embeds=embeds, use_cache=False).logits
        cache = DynamicCache(config=model.config)
        cache.activate_past_recording()
        model(inputs_embeds=embeds[:, :5], cache=cache)
        draft = with_fault(embeds[:, 5:8], 0, 2)  # position 7 completes chunk 1 (chunk size 4)
        model(inputs_embeds=draft, cache=cache)
        cache.crop(-3)
        after = [model(inputs_embeds=embeds[:, 5:7], cache=cache).logits]
        after += [model(inputs_embeds=embeds[:, t : t + 1], cache=cache).logits for t in range(7, 12)]
    assert_same(torch.cat(after, dim=1), expected[:, 5:])
