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
        (dict(rope_theta=0.0), "`rope_theta` must be a finite number > 0"),
        (dict(rope_theta="abc"), "`rope_theta` must be a finite number > 0, got 'abc'"),
        (dict(rope_theta=float("nan")), "`rope_theta` must be a finite number"),
        (dict(rope_theta=float("inf")), "`rope_theta` must be a finite number"),
        (dict(rope_theta=True), "`rope_theta` must be a finite number"),
        (dict(rms_norm_eps="1e-6"), "`rms_norm_eps` must be a finite number > 0"),
        (dict(rms_norm_eps=0), "`rms_norm_eps` must be a finite number > 0"),
        (dict(initializer_range=-0.1), "`initializer_range` must be a finite number >= 0"),
        (dict(hidden_act="geluu"), "`hidden_act` 'geluu' is not an activation transformers knows: use one of"),
        (dict(hidden_act=None), "`hidden_act` None is not an activation"),
        (dict(vocab_size=100, pad_token_id=100), r"`pad_token_id` must be None or a token id in \[0, 100\)"),
        (dict(vocab_size=100, pad_token_id=-1), "`pad_token_id` must be None or a token id"),
        (dict(vocab_size=100, pad_token_id=1.0), "`pad_token_id` must be None or a token id"),
        (dict(vocab_size=100, bos_token_id=250), "`bos_token_id` must be None or a token id"),
        (dict(vocab_size=100, eos_token_id=[2, 100]), "`eos_token_id` must be None or a token id"),
        (dict(vocab_size=100, eos_token_id=[2, None]), "`eos_token_id` must be None or a token id"),
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
    assert (tmp_path / "configuration_rat.py").is_file()  # the configuration's code (the model's comes with the model)


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


def test_valid_special_tokens_and_activations_are_accepted():
    config = RatConfig(vocab_size=100, pad_token_id=0, bos_token_id=1, eos_token_id=[2, 99], hidden_act="silu")
    assert (config.pad_token_id, config.bos_token_id, config.eos_token_id, config.hidden_act) == (0, 1, [2, 99], "silu")


def test_special_tokens_set_after_construction_are_checked_when_saving(tmp_path):
    config = RatConfig.from_preset("rat", "tiny")
    config.pad_token_id = config.vocab_size
    with pytest.raises(ValueError, match="`pad_token_id` must be None or a token id"):
        config.save_pretrained(tmp_path)


@pytest.mark.parametrize("missing", ["hidden_size", "num_attention_heads"])
def test_a_config_json_without_a_width_field_names_it(missing, tmp_path):
    """A hand-edited or truncated config.json: the error names the missing field, not `head_dim` derived from it."""
    RatConfig.from_preset("rat", "tiny").save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    saved = json.loads(path.read_text())
    del saved[missing]
    path.write_text(json.dumps(saved))
    with pytest.raises(ValueError, match=f"`{missing}` not given.*set `{missing}`"):
        RatConfig.from_pretrained(tmp_path)


def test_the_layer_count_follows_the_layer_types():
    assert RatConfig(layer_types=["rat", "rnn", "rat"], hidden_size=64, num_attention_heads=4).num_hidden_layers == 3
    with pytest.raises(ValueError, match="one entry per layer"):
        RatConfig(layer_types=["rat", "rnn"], num_hidden_layers=3, hidden_size=64, num_attention_heads=4)
