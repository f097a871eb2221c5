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


def check_distribution(trainer) -> None:
    """
    Refuse a run in which `accelerate launch --config_file` asked for FSDP or DeepSpeed but the Trainer's accelerator
    does not use it. accelerate (1.15) selects FSDP and DeepSpeed only for GPU-type processes: on a CPU-only machine
    the processes train as plain data parallel (MULTI_CPU, gloo) and the sharding settings are silently dropped.
    """
    requested = [name for name, variable in (("FSDP", "ACCELERATE_USE_FSDP"), ("DEEPSPEED", "ACCELERATE_USE_DEEPSPEED"))
                 if os.environ.get(variable, "false").lower() == "true"]
    used = trainer.accelerator.distributed_type.value
    for name in requested:
        if used != name:
            raise ValueError(
                f"The launch configuration asks for {name}, but the processes run as {used}: accelerate applies "
                f"{name} to GPU processes only, so on this machine the sharding settings would be ignored. Launch "
                "without the config (`accelerate launch --multi_gpu --num_processes N`) for data-parallel CPU "
                "training, or run on GPUs."
            )
