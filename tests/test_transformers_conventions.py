"""
Conventions of transformers models that RAT once broke, most of them found by transformers' own common tests
(`ModelTesterMixin`, `GenerationTesterMixin`, run against RAT by tests/transformers_suite): one small test per kind of
failure.

A test marked `xfail(strict=True)` documents a failure not fixed yet: the fix makes it pass, and the strict mark then
fails the run until it is removed.
"""

import copy
import warnings

import pytest
import torch
from transformers.cache_utils import DynamicCache
from transformers.generation import CompileConfig
from transformers.testing_utils import CaptureLogger
from transformers.utils import logging

from conftest import LAYER_PATTERNS, random_ids, tiny_config, tiny_model
from modeling_rat import RatConfig, RatForCausalLM, RatModel
from modeling_rat.modeling_rat import CACHE_FIELD


PATTERNS = ["rat", "rnn", "rat+sliding", "rat+full"]


def right_padded_mask(batch_size, length):
    """Row i holds i + 1 real tokens then padding (the masks of transformers' model testers)."""
    return torch.tril(torch.ones(batch_size, length, dtype=torch.long))


# ------------------------------------------------------------------------------------------------ return_dict


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


@pytest.mark.parametrize("model_class", [RatModel, RatForCausalLM])
def test_config_return_dict_false_gives_tuples(model_class):
    config = tiny_config(return_dict=False)
    torch.manual_seed(0)
    model = model_class(config).eval()
    with torch.no_grad():
        output = model(random_ids(2, 7), use_cache=False)
    assert isinstance(output, tuple)


# --------------------------------------------------------------------------------------- cache argument name


@pytest.mark.parametrize("model_class", [RatModel, RatForCausalLM])
def test_past_key_values_argument_follows_the_transformers_version(model_class):
    """
    transformers 5.24 renamed the cache argument to `cache`: the old name `past_key_values` still works, with 5.24's
    deprecation warning; before 5.24 it is the plain name (what generate() passes), without a warning.
    """
    config = tiny_config()
    torch.manual_seed(0)
    model = model_class(config).eval()
    ids = random_ids(2, 7)
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        old_name = model(ids, past_key_values=DynamicCache(config=config), use_cache=True)
    deprecated = any("`past_key_values` is deprecated" in str(warning.message) for warning in caught)
    assert deprecated == (CACHE_FIELD == "cache")
    with torch.no_grad():
        new_name = model(ids, cache=DynamicCache(config=config), use_cache=True)
    torch.testing.assert_close(old_name[0], new_name[0])
    assert getattr(old_name, CACHE_FIELD).get_seq_length() == 7


# ------------------------------------------------------------------------------------------------ torch.export


@pytest.mark.slow
@pytest.mark.parametrize("dynamic", [False, True], ids=["static-shapes", "dynamic-shapes"])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_torch_export_of_the_forward_matches_eager(pattern, dynamic):
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
    if dynamic:  # other batch sizes and lengths than the traced ones (a single chunk among them), left padding
        for batch_size, length in ((2, 11), (1, 2)):
            mask = torch.ones(batch_size, length, dtype=torch.long)
            mask[-1, : length // 3] = 0
            checks.append({"input_ids": random_ids(batch_size, length, seed=5), "attention_mask": mask, "use_cache": False})
    for check in checks:
        with torch.no_grad():
            expected = model(**check).logits
            exported = program.module()(**check).logits
        torch.testing.assert_close(exported, expected)


@pytest.mark.slow
@pytest.mark.parametrize("dynamic", [False, True], ids=["static-shapes", "dynamic-shapes"])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_torch_export_of_the_forward_that_fills_a_new_cache(pattern, dynamic):
    """As transformers' exporter runs a forward: `use_cache` left to the config, so that the forward fills a new cache."""
    from transformers.exporters.exporter_dynamo import DynamoConfig, DynamoExporter

    model = tiny_model(LAYER_PATTERNS[pattern])
    inputs = {"input_ids": random_ids(3, 7), "attention_mask": right_padded_mask(3, 7)}
    with torch.no_grad():
        expected = model(**copy.deepcopy(inputs))
        exported = DynamoExporter().export(model, copy.deepcopy(inputs), config=DynamoConfig(dynamic=dynamic))
        outputs = exported(**copy.deepcopy(inputs))
    torch.testing.assert_close(outputs["logits"], expected.logits)


@pytest.mark.slow
@pytest.mark.parametrize("pattern", PATTERNS)
def test_torch_export_with_position_ids_matches_eager_and_refuses_packed_inputs(pattern):
    """
    As transformers' exporter exports a prefill (with position ids): whether a row holds several sequences (packing)
    cannot be read while exporting, so the exported program assumes one sequence per row and checks it when it runs.
    """
    model = tiny_model(LAYER_PATTERNS[pattern])
    ids, positions = random_ids(2, 8), torch.arange(8).expand(2, -1)
    inputs = {"input_ids": ids, "position_ids": positions, "use_cache": False}
    program = torch.export.export(model, (), kwargs=inputs, strict=False)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(**inputs).logits, model(**inputs).logits)
        packed = torch.cat([torch.arange(5), torch.arange(3)]).expand(2, -1)
        with pytest.raises(RuntimeError, match="Packed sequences .* not supported by an exported RAT program"):
            program.module()(input_ids=ids, position_ids=packed, use_cache=False)


@pytest.mark.slow
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


def test_declares_that_it_compiles_without_graph_breaks():
    assert RatForCausalLM._can_compile_fullgraph


@pytest.mark.slow
@pytest.mark.parametrize("pattern", PATTERNS)
def test_compiled_decode_step_compiles_once(pattern):
    """
    generate() with a static cache compiles the decode step without graph breaks (fullgraph, static shapes, as
    transformers' test_generate_compile_model_forward_fullgraph runs it), once for every token and every later call
    with the same shapes, padded rows included, and gives what eager decoding gives. (transformers' static
    sliding-window layer counts its tokens in Python, so patterns with sliding layers recompile by design.)
    """
    model = tiny_model(LAYER_PATTERNS[pattern])
    prompts = [random_ids(2, 7, seed=seed) for seed in (1, 2)]
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, :3] = 0  # a left-padded row
    with torch.no_grad():
        expected = [model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False) for ids in prompts]
    graphs = []

    def counting_backend(graph_module, example_inputs, **options):  # runs the graphs as they are, without codegen
        graphs.append(graph_module)
        return graph_module.forward

    # generate() deep-copies the compile config: a function (unlike an object with a counter) stays the same
    compile_config = CompileConfig(fullgraph=True, dynamic=False, backend=counting_backend)
    compile_config._compile_all_devices = True  # compile on the CPU too
    torch.compiler.reset()
    try:
        with torch.no_grad():
            compiled = [
                model.generate(
                    ids, attention_mask=mask, max_new_tokens=6, do_sample=False, cache_implementation="static",
                    compile_config=compile_config,
                )
                for ids in prompts
            ]
    finally:
        torch.compiler.reset()
    assert hasattr(model, "_compiled_call"), "generate() did not compile the decode step"
    if "sliding" not in pattern:
        assert len(graphs) == 1, f"the decode step was compiled {len(graphs)} times"
    for compiled_tokens, expected_tokens in zip(compiled, expected):
        torch.testing.assert_close(compiled_tokens, expected_tokens)


# ---------------------------------------------------------------------------------------------- position limit


def test_generation_length_has_no_position_limit():
    """
    transformers caps generate()'s default length by `config.max_position_embeddings` and warns once a generation
    exceeds it. RAT models have no position limit: their config has no such field, and the key of older config.json
    files (the length the rnn forget gates are initialised for) is read as `rnn_forget_gate_init_length`.
    """
    older_config = tiny_config(LAYER_PATTERNS["rat+sliding"]).to_dict()  # as in a config.json of an older version
    older_config["max_position_embeddings"] = 16
    del older_config["rnn_forget_gate_init_length"]
    config = RatConfig.from_dict(older_config)
    assert config.rnn_forget_gate_init_length == 16
    assert not hasattr(config, "max_position_embeddings")
    torch.manual_seed(0)
    model = RatForCausalLM(config).eval()
    ids = random_ids(1, 12)
    with torch.no_grad():
        default_length = model.generate(ids, do_sample=False, min_new_tokens=8)
    assert default_length.shape[1] == 12 + 20  # generate()'s default: 20 new tokens, not capped at 16 in all
    logger = logging.get_logger("transformers.generation.stopping_criteria")
    with CaptureLogger(logger) as captured, torch.no_grad():
        long_generation = model.generate(ids, do_sample=False, max_new_tokens=30, min_new_tokens=30)
    assert long_generation.shape[1] == 42
    assert "maximum length" not in captured.out


# ---------------------------------------------------------------------------------------------- position ids


@pytest.mark.parametrize("new_tokens", [1, 2])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_a_right_padded_prompt_is_not_continued(pattern, new_tokens):
    """
    transformers' export tests continue a right-padded prompt by one and by two tokens with generate()'s position ids
    (class E of the common-suite report): the new tokens would follow the padding, and the logits read at the last
    column would be a padding token's. Refused with a message that names the row, for one token and for several.
    """
    model = tiny_model(LAYER_PATTERNS[pattern])
    ids = random_ids(2, 7)
    mask = torch.tensor([[1] * 7, [1, 1, 0, 0, 0, 1, 1]])  # row 1: a prompt of 2 real tokens, right padded to 5
    positions = torch.tensor([[5, 6], [2, 3]])  # the positions that continue each row's real tokens
    with torch.no_grad():
        cache = getattr(model(ids[:, :5], attention_mask=mask[:, :5], use_cache=True), CACHE_FIELD)
        end = 5 + new_tokens
        with pytest.raises(ValueError, match="Row 1 of `attention_mask` has padding after its real tokens"):
            model(ids[:, 5:end], attention_mask=mask[:, :end], position_ids=positions[:, :new_tokens], cache=cache)
