"""RatConfig: fields, presets, validation errors, exact round trips."""

import json

import pytest

from configuration_rat import PAPER_LAYER_PATTERNS, PRESET_SIZES, RatConfig


def test_defaults_are_the_papers_rat_model():
    config = RatConfig()
    assert config.model_type == "rat"
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (2048, 24, 16)
    assert config.head_dim == 128 and config.num_qk_groups == 2 and config.chunk_size == 16
    assert config.layer_types == ["rat"] * 24
    assert config.intermediate_size == 4 * 2048
    assert config.rope_theta == 10000.0 and config.rms_norm_eps == 1e-6 and config.hidden_act == "gelu"
    assert config.initializer_range == 0.02 and config.tie_word_embeddings is True and config.use_cache is True
    for name in ("pad_token_id", "bos_token_id", "eos_token_id", "sliding_window"):
        assert hasattr(config, name)


@pytest.mark.parametrize("model", list(PAPER_LAYER_PATTERNS))
@pytest.mark.parametrize("size", list(PRESET_SIZES))
def test_presets_build_the_five_paper_models(model, size):
    config = RatConfig.from_preset(model, size)
    types = config.layer_types
    assert len(types) == config.num_hidden_layers == PRESET_SIZES[size]["num_hidden_layers"]
    expected_even = {"attention": "full_attention", "rnn": "rnn", "rat": "rat", "attention-swa": "full_attention", "rat-swa": "rat"}[model]
    expected_odd = "sliding_attention" if model.endswith("swa") else expected_even
    assert set(types[0::2]) == {expected_even} and set(types[1::2]) == {expected_odd}
    if model.endswith("swa"):
        assert config.sliding_window == 1025  # official window_size 1024 + the query itself


def test_preset_overrides_and_unknown_names():
    config = RatConfig.from_preset("rat-swa", "tiny", vocab_size=100, sliding_window=9)
    assert config.vocab_size == 100 and config.sliding_window == 9
    with pytest.raises(ValueError, match="Unknown model"):
        RatConfig.from_preset("mamba")
    with pytest.raises(ValueError, match="Unknown size"):
        RatConfig.from_preset("rat", "7b")


@pytest.mark.parametrize(
    "arguments, message",
    [
        (dict(hidden_size=65, num_attention_heads=4), "must be divisible by `num_attention_heads`"),
        (dict(hidden_size=64, num_attention_heads=4, num_qk_groups=3), "must be divisible by `num_qk_groups`"),
        (dict(chunk_size=0), "`chunk_size` must be an integer >= 1"),
        (dict(chunk_size=-3), "`chunk_size` must be an integer >= 1"),
        (dict(num_hidden_layers=2, layer_types=["rat", "mamba"]), "Unknown layer type"),
        (dict(num_hidden_layers=3, layer_types=["rat", "rat"]), "one entry per layer"),
        (dict(num_hidden_layers=2, layer_types=["rat", "sliding_attention"]), "`sliding_window` is not set"),
        (dict(num_hidden_layers=2, layer_types=["rat", "sliding_attention"], sliding_window=0), "`sliding_window` must be a positive"),
        (dict(vocab_size=0), "`vocab_size` must be a positive integer"),
        (dict(hidden_size=-8), "`hidden_size` must be a positive integer"),
        (dict(intermediate_size=0), "`intermediate_size` must be a positive integer"),
        (dict(num_hidden_layers=0, layer_types=[]), "`num_hidden_layers` must be a positive integer"),
        (dict(num_attention_heads=0), "`num_attention_heads` must be a positive integer"),
        (dict(num_qk_groups=0), "`num_qk_groups` must be a positive integer"),
        (dict(hidden_size=64, num_attention_heads=4, head_dim=32), "`head_dim` is derived"),
        (dict(hidden_size=12, num_attention_heads=4), "must be even for rotary"),
        (dict(rope_theta=0.0), "`rope_theta` must be positive"),
        (dict(rat_implementation="cuda"), "`rat_implementation` must be one of"),
    ],
)
def test_invalid_configs_say_what_to_change(arguments, message):
    with pytest.raises(ValueError, match=message):
        RatConfig(**arguments)


def test_round_trip_save_load_and_to_dict(tmp_path):
    config = RatConfig.from_preset("rat-swa", "tiny", chunk_size=5, num_qk_groups=4, pad_token_id=0, eos_token_id=3)
    config.save_pretrained(tmp_path)
    loaded = RatConfig.from_pretrained(tmp_path)
    assert loaded.to_dict() == config.to_dict()
    assert RatConfig.from_dict(config.to_dict()).to_dict() == config.to_dict()
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["rat_layer_types"] == config.layer_types and saved["model_type"] == "rat"
    assert "layer_types" not in saved  # see test_generic_config_class_reads_a_saved_config
    assert saved["auto_map"]["AutoModelForCausalLM"] == "modeling_rat.RatForCausalLM"
    assert (tmp_path / "configuration_rat.py").is_file() and (tmp_path / "modeling_rat.py").is_file()


def test_auto_config_knows_rat(tmp_path):
    from transformers import AutoConfig

    RatConfig.from_preset("rat", "tiny").save_pretrained(tmp_path)
    assert type(AutoConfig.from_pretrained(tmp_path)) is RatConfig
    assert isinstance(AutoConfig.for_model("rat", hidden_size=64, num_attention_heads=4), RatConfig)


def test_generic_config_class_reads_a_saved_config(tmp_path):
    """
    transformers' Trainer re-reads `config.json` with the generic `PreTrainedConfig` when resuming, and tokenizer loading
    without `trust_remote_code` does the same: that class refuses layer types it does not know, so the RAT layer
    pattern is stored as `rat_layer_types`, and both keys load into `RatConfig`.
    """
    from transformers import PreTrainedConfig

    config = RatConfig.from_preset("rat-swa", "tiny", layer_types=["rnn", "rat"], sliding_window=None)
    config.save_pretrained(tmp_path)
    generic = PreTrainedConfig.from_json_file(str(tmp_path / "config.json"))
    assert generic.rat_layer_types == ["rnn", "rat"]
    legacy = config.to_dict()
    legacy["layer_types"] = legacy.pop("rat_layer_types")  # checkpoints written before the rename
    assert RatConfig.from_dict(legacy).layer_types == ["rnn", "rat"]
    with pytest.raises(ValueError, match="disagree"):
        RatConfig(layer_types=["rat"], rat_layer_types=["rnn"], num_hidden_layers=1, hidden_size=64, num_attention_heads=4)
