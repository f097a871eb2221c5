"""PEFT LoRA on RAT models: default targets, merge, save/load, gradient checkpointing, for every layer type."""

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from conftest import LAYER_PATTERNS, random_ids, tiny_model
from modeling_rat.training import LORA_TARGET_MODULES, default_lora_config, lora_target_modules


PATTERNS = ["rat", "rnn", "attention", "rat+sliding"]


def enable_activation_checkpointing(model):
    """`activation_checkpointing_enable` where transformers has it (5.24; the old name warns), else the old name."""
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()


def lora_model(pattern, seed=0, **lora_kwargs):
    """A tiny model with LoRA on the default targets, adapters made non-zero so that they change the output."""
    model = tiny_model(LAYER_PATTERNS[pattern], seed=seed)
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=LORA_TARGET_MODULES, task_type="CAUSAL_LM", **lora_kwargs
    )
    peft_model = get_peft_model(model, config)
    torch.manual_seed(seed + 1)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:  # PEFT starts B at zero (adapter = identity); make it matter
                parameter.normal_(0, 0.2)
    return peft_model.eval()


@pytest.mark.parametrize("pattern", PATTERNS)
def test_default_targets_cover_every_projection(pattern):
    model = lora_model(pattern)
    base = model.get_base_model()
    linear_names = [name for name, module in base.named_modules() if isinstance(module, nn.Linear)]
    adapted = {name for name, module in base.named_modules() if hasattr(module, "lora_A")}
    # Every linear layer but the LM head (tied to the embedding) carries an adapter.
    expected = {name.rsplit(".base_layer", 1)[0] for name in linear_names if "lm_head" not in name and "lora_" not in name}
    assert adapted == expected
    assert len(adapted) == len(base.model.layers) * 2 + sum(
        4 if layer.layer_type in ("full_attention", "sliding_attention", "rnn") else 6 for layer in base.model.layers
    )
    trainable = [name for name, parameter in model.named_parameters() if parameter.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)


def test_lora_target_modules_are_derived_from_the_modules():
    """The targets are read off the model (every linear layer but the LM head), for a model or a configuration, so
    they follow the modules of each layer type without a hand-kept list."""
    attention = tiny_model(LAYER_PATTERNS["attention"])
    rnn = tiny_model(LAYER_PATTERNS["rnn"]).config
    hybrid = tiny_model(LAYER_PATTERNS["rat+sliding"]).config
    assert set(lora_target_modules(attention)) == {"q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"}
    assert lora_target_modules(attention) == lora_target_modules(attention.config)
    assert set(lora_target_modules(rnn)) == {"v_proj", "o_proj", "output_gate_proj", "forget_gate_proj", "up_proj",
                                            "down_proj"}
    assert set(lora_target_modules(hybrid)) == set(LORA_TARGET_MODULES)
    assert set(lora_target_modules(hybrid, include_mlp=False)) == set(LORA_TARGET_MODULES) - {"up_proj", "down_proj"}
    assert len(LORA_TARGET_MODULES) == len(set(LORA_TARGET_MODULES)) == 8
    assert "lm_head" not in LORA_TARGET_MODULES and "embed_tokens" not in LORA_TARGET_MODULES
    config = default_lora_config(rnn, r=8)
    assert set(config.target_modules) == set(lora_target_modules(rnn)) and config.r == 8


def test_lora_target_modules_follow_a_new_projection():
    """A projection added to a mixer becomes a target without any list being edited."""
    model = tiny_model(LAYER_PATTERNS["rat"])
    model.model.layers[0].mixer.extra_proj = nn.Linear(4, 4)
    assert "extra_proj" in lora_target_modules(model)


@pytest.mark.parametrize("pattern", PATTERNS)
def test_merge_and_unload_matches_adapted_model(pattern):
    model = lora_model(pattern)
    ids = random_ids(2, 23)
    base_class = type(model.get_base_model())
    with torch.no_grad():
        adapted = model(ids).logits
        with model.disable_adapter():
            plain = model(ids).logits
    assert (adapted - plain).abs().max() > 1e-2, "the adapters should change the output"
    merged = model.merge_and_unload()
    assert isinstance(merged, base_class)
    assert not any("lora_" in name for name, _ in merged.named_parameters())
    with torch.no_grad():
        merged_logits = merged(ids).logits
    torch.testing.assert_close(merged_logits, adapted, rtol=1e-5, atol=1e-5 * adapted.abs().max().item())


@pytest.mark.parametrize("pattern", ["rat", "rat+sliding"])
def test_adapter_save_and_load(pattern, tmp_path):
    model = lora_model(pattern)
    ids = random_ids(2, 19)
    with torch.no_grad():
        expected = model(ids).logits
    model.save_pretrained(tmp_path / "adapter")
    saved = sorted(path.name for path in (tmp_path / "adapter").iterdir())
    assert "adapter_config.json" in saved and "adapter_model.safetensors" in saved
    fresh_base = tiny_model(LAYER_PATTERNS[pattern], seed=0)  # same base weights, no adapters
    loaded = PeftModel.from_pretrained(fresh_base, tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, expected, rtol=0, atol=0)


@pytest.mark.parametrize("pattern", PATTERNS)
def test_gradient_checkpointing_with_lora_trains(pattern):
    ids = random_ids(2, 21)
    gradients = {}
    for checkpointing in (False, True):
        model = lora_model(pattern, lora_dropout=0.0)
        model.train()
        if checkpointing:
            enable_activation_checkpointing(model)
            model.enable_input_require_grads()
            assert model.get_base_model().model.gradient_checkpointing
            # enable_input_require_grads makes the embedding output require grad, so that checkpointed blocks
            # whose only trainable parameters are adapters still get gradients.
            assert model.get_input_embeddings()(ids).requires_grad
        loss = model(ids, labels=ids, use_cache=False).loss
        loss.backward()
        gradients[checkpointing] = {
            name: parameter.grad.clone() for name, parameter in model.named_parameters() if parameter.requires_grad
        }
        frozen = [name for name, parameter in model.named_parameters() if not parameter.requires_grad]
        assert all(model.get_parameter(name).grad is None for name in frozen)
    assert gradients[True].keys() == gradients[False].keys()
    for name, gradient in gradients[True].items():
        if "lora_A" in name:  # with B != 0, every A gets a gradient
            assert gradient.abs().sum() > 0, f"no gradient reached {name}"
        torch.testing.assert_close(gradient, gradients[False][name], rtol=1e-4, atol=1e-6)


def test_lora_training_step_reduces_loss():
    model = lora_model("rat+sliding", lora_dropout=0.0)
    model.train()
    enable_activation_checkpointing(model)
    model.enable_input_require_grads()
    ids = random_ids(4, 16)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(8):
        loss = model(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses
