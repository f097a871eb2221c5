"""LoRA defaults for RAT models, derived from the model's own modules (nothing restates projection names)."""

from __future__ import annotations

import torch
from torch import nn

from configuration_rat import RatConfig


def lora_target_modules(model_or_config, include_mlp: bool = True) -> list[str]:
    """
    LoRA `target_modules` for a model: the names of all its `nn.Linear` layers except the output embedding (LM head),
    in the order they first appear, as the suffixes PEFT matches (`"q_proj"`, `"up_proj"`, ...). With
    `include_mlp=False` the layers of the blocks' `mlp` are left out, so only the token mixers are adapted.

    Takes a model or a configuration; a configuration is instantiated on the meta device (no memory, no weights).
    LoRA adapts linear layers only: the RAT forget-gate bias (a plain parameter), the norms and the embedding stay
    frozen.
    """
    model = model_or_config if isinstance(model_or_config, nn.Module) else _meta_model(model_or_config)
    output_embeddings = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = []
    for qualified_name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or module is output_embeddings:
            continue
        if not include_mlp and "mlp" in qualified_name.split("."):
            continue
        name = qualified_name.rsplit(".", 1)[-1]
        if name not in names:
            names.append(name)
    return names


def _meta_model(config) -> nn.Module:
    from transformers import AutoModelForCausalLM  # knows "rat": importing this package registered it

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def _every_layer_type_config() -> RatConfig:
    layer_types = ["rat", "rnn", "full_attention", "sliding_attention"]
    return RatConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_attention_heads=2, chunk_size=2,
                     num_hidden_layers=len(layer_types), layer_types=layer_types, sliding_window=4)


# Every projection of every mixer type and of the MLPs (all linear layers but the LM head). PEFT matches these names
# as suffixes of module names and skips names a model lacks, so this list fits every RAT configuration.
LORA_TARGET_MODULES = lora_target_modules(_every_layer_type_config())


def default_lora_config(model_or_config, r: int = 16, lora_alpha: int = 32, lora_dropout: float = 0.05, **kwargs):
    """A `peft.LoraConfig` for causal language modelling on every projection of the model (`lora_target_modules`)."""
    from peft import LoraConfig

    return LoraConfig(
        r=r,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        target_modules=lora_target_modules(model_or_config),
        task_type="CAUSAL_LM",
        **kwargs,
    )
