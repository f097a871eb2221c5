"""How the example jobs set up the `Trainer` on the machine they find: CPU-only machines, several processes,
activation checkpointing under every supported transformers release."""

from __future__ import annotations

import os

import torch


def no_accelerator() -> bool:
    """True on CPU-only machines: the Trainer is then told `use_cpu=True`, which is also what makes several
    processes (`accelerate launch --multi_gpu --num_processes N` or `torchrun`) train together over gloo."""
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None:
        return not accelerator.is_available()
    return not torch.cuda.is_available()


def activation_checkpointing_argument(enabled: bool) -> dict:
    """
    The training argument that turns activation (gradient) checkpointing on or off: `activation_checkpointing` where
    the installed transformers has it (its old name `gradient_checkpointing` then warns on every run), else
    `gradient_checkpointing`. Given explicitly either way, since TRL's configs default it to True.
    """
    from transformers import TrainingArguments

    fields = TrainingArguments.__dataclass_fields__
    return {"activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing": enabled}


def check_distribution(training_args) -> None:
    """
    Refuse a CPU run that `accelerate launch --config_file` set up for FSDP or DeepSpeed. accelerate (1.15) applies
    them to GPU processes only: processes told `use_cpu` train as plain data parallel (MULTI_CPU, gloo), and the
    sharding settings are dropped without a word.
    """
    requested = [name for name, variable in (("FSDP", "ACCELERATE_USE_FSDP"), ("DeepSpeed", "ACCELERATE_USE_DEEPSPEED"))
                 if os.environ.get(variable, "false").lower() == "true"]
    if requested and training_args.use_cpu:
        name = requested[0]
        raise ValueError(
            f"The launch configuration asks for {name}, but this machine has no GPU: accelerate applies {name} to GPU "
            f"processes only and would train these CPU processes as plain data parallel, the {name} settings ignored. "
            "Launch without the config (`accelerate launch --multi_gpu --num_processes N`) for data-parallel CPU "
            "training, or run on GPUs."
        )
