"""
Conventions of transformers models that transformers' own common tests (`ModelTesterMixin`, `GenerationTesterMixin`,
run against RAT by tests/transformers_suite) found RAT breaking, one small test per kind of failure.

Each test is marked `xfail(strict=True)` until the model is fixed: the fix makes it pass, and the strict mark then
fails the run until it is removed.
"""

import copy
import warnings

import pytest
import torch
from transformers.cache_utils import DynamicCache
from transformers.generation import CompileConfig

from conftest import LAYER_PATTERNS, random_ids, tiny_config, tiny_model
from modeling_rat import RatForCausalLM, RatModel
from modeling_rat.modeling_rat import CACHE_FIELD


PATTERNS = ["rat", "rnn", "rat+sliding", "rat+full"]


def right_padded_mask(batch_size, length):
    """Row i holds i + 1 real tokens then padding (the masks of transformers' model testers)."""
    return torch.tril(torch.ones(batch_size, length, dtype=torch.long))


# ------------------------------------------------------------------------------------------------ return_dict


@pytest.mark.xfail(strict=True, reason="RatModel.forward ignores `return_dict`: it always returns a ModelOutput")
def test_base_model_returns_a_tuple_when_asked():
    config = tiny_config()
    torch.manual_seed(0)
    model = RatModel(config).eval()
    ids = random_ids(2, 7)
    with torch.no_grad():
        as_dict = model(ids, use_cache=False, return_dict=True)
        as_tuple = model(ids, use_cache=False, return_dict=False)
    assert isinstance(as_tuple, tuple)
    torch.testing.assert_close(as_tuple[0], as_dict.last_hidden_state)


@pytest.mark.xfail(strict=True, reason="`config.return_dict=False` is ignored by RatModel and RatForCausalLM")
@pytest.mark.parametrize("model_class", [RatModel, RatForCausalLM])
def test_config_return_dict_false_gives_tuples(model_class):
    config = tiny_config(return_dict=False)
    torch.manual_seed(0)
    model = model_class(config).eval()
    with torch.no_grad():
        output = model(random_ids(2, 7), use_cache=False)
    assert isinstance(output, tuple)


# --------------------------------------------------------------------------------------- cache argument name


@pytest.mark.skipif(CACHE_FIELD != "cache", reason="before transformers 5.24 the cache argument is `past_key_values`")
@pytest.mark.xfail(strict=True, reason="`past_key_values=` is accepted without the deprecation warning of 5.24 models")
@pytest.mark.parametrize("model_class", [RatModel, RatForCausalLM])
def test_past_key_values_argument_is_deprecated(model_class):
    config = tiny_config()
    torch.manual_seed(0)
    model = model_class(config).eval()
    ids = random_ids(2, 7)
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        old_name = model(ids, past_key_values=DynamicCache(config=config), use_cache=True)
    assert any("`past_key_values` is deprecated" in str(warning.message) for warning in caught)
    with torch.no_grad():
        new_name = model(ids, cache=DynamicCache(config=config), use_cache=True)
    torch.testing.assert_close(old_name[0], new_name[0])


# ------------------------------------------------------------------------------------------------ torch.export


@pytest.mark.slow
@pytest.mark.parametrize("dynamic", [False, True], ids=["static-shapes", "dynamic-shapes"])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_torch_export_of_the_forward_matches_eager(pattern, dynamic, request):
    if dynamic and pattern != "rnn":
        request.applymarker(pytest.mark.xfail(
            strict=True,
            reason="with dynamic shapes, torch.export still meets data-dependent branches in the RAT layers' path",
        ))
    model = tiny_model(LAYER_PATTERNS[pattern])
    inputs = {"input_ids": random_ids(3, 7), "attention_mask": right_padded_mask(3, 7), "use_cache": False}
    dynamic_shapes = None
    if dynamic:
        batch, length = torch.export.Dim("batch", min=1, max=8), torch.export.Dim("length", min=2, max=32)
        dynamic_shapes = {
            "input_ids": {0: batch, 1: length}, "attention_mask": {0: batch, 1: length}, "use_cache": None
        }
    program = torch.export.export(model, (), kwargs=inputs, dynamic_shapes=dynamic_shapes, strict=False)
    checks = [inputs]
    if dynamic:  # another batch size and length than the traced ones, left padding this time
        mask = torch.ones(2, 11, dtype=torch.long)
        mask[1, :4] = 0
        checks.append({"input_ids": random_ids(2, 11, seed=5), "attention_mask": mask, "use_cache": False})
    for check in checks:
        with torch.no_grad():
            expected = model(**check).logits
            exported = program.module()(**check).logits
        torch.testing.assert_close(exported, expected)


@pytest.mark.slow
@pytest.mark.xfail(
    strict=True,
    reason="under torch.export the cache is rebuilt from its tensors and transformers' sliding-window layer then "
    "reports only the window it keeps; RatAttention._check_cache_layer takes that for a foreign cache",
)
def test_torch_export_of_a_decode_step_with_a_sliding_window_layer():
    from transformers.exporters.exporter_dynamo import DynamoConfig, DynamoExporter

    model = tiny_model(LAYER_PATTERNS["rat+sliding"])
    ids = random_ids(2, 9)
    with torch.no_grad():
        cache = getattr(model(ids[:, :8], use_cache=True), CACHE_FIELD)
        step = {"input_ids": ids[:, 8:], "attention_mask": torch.ones(2, 9, dtype=torch.long), "cache": cache}
        expected = model(**copy.deepcopy(step)).logits
        exported = DynamoExporter().export(model, copy.deepcopy(step), config=DynamoConfig(dynamic=False))
        outputs = exported(**copy.deepcopy(step))
    torch.testing.assert_close(outputs["logits"], expected)


# --------------------------------------------------------------------------------------------- torch.compile


@pytest.mark.xfail(strict=True, reason="RatForCausalLM does not declare `_can_compile_fullgraph`")
def test_declares_that_it_compiles_without_graph_breaks():
    assert RatForCausalLM._can_compile_fullgraph


@pytest.mark.slow
@pytest.mark.xfail(
    strict=True,
    reason="with a static cache the compiled decode step recompiles at every token: generate() passes RAT the 2-D "
    "attention mask, one column longer each step, and transformers builds no fixed-size mask for RAT's layer types",
)
def test_compiled_decode_step_compiles_once():
    model = tiny_model(LAYER_PATTERNS["rat"])
    ids = random_ids(2, 7)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        expected = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    compile_config = CompileConfig(fullgraph=True, dynamic=False)  # as transformers' fullgraph test compiles
    compile_config._compile_all_devices = True  # compile on the CPU too
    torch.compiler.reset()
    try:
        with torch.compiler.set_stance("fail_on_recompile"), torch.no_grad():
            compiled = model.generate(
                ids, attention_mask=mask, max_new_tokens=4, do_sample=False, cache_implementation="static",
                compile_config=compile_config,
            )
    finally:
        torch.compiler.reset()
    assert hasattr(model, "_compiled_call"), "generate() did not compile the decode step"
    torch.testing.assert_close(compiled, expected)


# ---------------------------------------------------------------------------------------------- position ids


@pytest.mark.xfail(
    strict=True,
    reason="for a right-padded row, generate() gives the new tokens positions that do not continue the row's real "
    "tokens; RAT's one-token step ignores them but a multi-token continuation refuses them "
    "(RatSequenceLayout._find_segments)",
)
@pytest.mark.parametrize("pattern", PATTERNS)
def test_continuation_with_generate_positions_is_one_call_or_token_by_token(pattern):
    """Two new tokens in one call (as transformers' export tests feed them) give what two one-token calls give."""
    model = tiny_model(LAYER_PATTERNS[pattern])
    ids = random_ids(2, 7)
    mask = torch.tensor([[1] * 7, [1, 1, 0, 0, 0, 1, 1]])  # row 1: a prompt of 2 real tokens, right padded to 5
    positions = torch.tensor([[5, 6], [1, 2]])  # generate()'s position ids for the two new tokens of each row
    with torch.no_grad():
        prompt_cache = getattr(model(ids[:, :5], attention_mask=mask[:, :5], use_cache=True), CACHE_FIELD)
        step_cache = copy.deepcopy(prompt_cache)
        token_by_token = []
        for new in (0, 1):
            column = 5 + new
            output = model(
                ids[:, column : column + 1], attention_mask=mask[:, : column + 1],
                position_ids=positions[:, new : new + 1], cache=step_cache,
            )
            token_by_token.append(output.logits)
        together = model(ids[:, 5:], attention_mask=mask, position_ids=positions, cache=prompt_cache).logits
    torch.testing.assert_close(together, torch.cat(token_by_token, dim=1), rtol=1e-4, atol=1e-5)
