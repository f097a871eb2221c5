"""One process of the FSDP2 check (tests/test_examples.py starts two with torchrun, gloo on CPU).

Applies the sharding plan of examples/configs/fsdp.yaml with torch's FSDP2 (`fully_shard` on every module of the
wrap class, then on the root; reshard after forward as configured), trains a few steps on this process's half of
each batch, and checks against the same model trained unsharded on whole batches in this process: the losses, the
full state dict gathered as the config's FULL_STATE_DICT asks, and a remote-code checkpoint saved from it.

accelerate (1.15) cannot run this configuration on CPUs: it applies FSDP to GPU-type processes only and trains CPU
processes as plain data parallel. So the plan is applied here with torch directly, as accelerate would on GPUs.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate.commands.config.config_args import load_config_from_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import fully_shard
from transformers import AutoModelForCausalLM

from conftest import ROOT, tiny_model


STEPS, BATCH, LENGTH = 3, 4, 24


def main(output_dir: Path) -> None:
    config = load_config_from_file(str(ROOT / "examples" / "configs" / "fsdp.yaml")).fsdp_config
    assert config["fsdp_version"] == 2 and config["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()

    layer_types = ("rat", "sliding_attention", "rnn", "full_attention")
    model = tiny_model(layer_types, seed=0).train()
    reference = tiny_model(layer_types, seed=0).train()
    wrap_class = config["fsdp_transformer_layer_cls_to_wrap"]
    wrapped = [module for module in model.modules() if type(module).__name__ == wrap_class]
    assert len(wrapped) == len(layer_types)
    for module in wrapped:
        fully_shard(module, reshard_after_forward=config["fsdp_reshard_after_forward"])
    fully_shard(model, reshard_after_forward=config["fsdp_reshard_after_forward"])
    sharded = [parameter for parameter in model.parameters() if parameter.to_local().numel() < parameter.numel()]
    assert sharded, "FSDP2 sharded no parameter"

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    reference_optimizer = torch.optim.AdamW(reference.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(STEPS):
        ids = torch.randint(1, 61, (BATCH, LENGTH), generator=generator)
        local = ids.chunk(world_size)[rank]
        loss = model(local, labels=local).loss
        loss.backward()  # FSDP2 averages the gradients of the processes: the gradient of the whole batch
        optimizer.step()
        optimizer.zero_grad()
        reference_loss = reference(ids, labels=ids).loss
        reference_loss.backward()
        reference_optimizer.step()
        reference_optimizer.zero_grad()
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        losses.append((mean_loss.item() / world_size, reference_loss.item()))

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        expected = reference.state_dict()
        differences = {name: (full[name] - tensor).abs().max().item()
                       for name, tensor in expected.items() if name in full}
        assert set(full) <= set(expected) and len(full) >= len(expected) - 1  # the tied LM head may be left out
        reference.save_pretrained(output_dir / "reference")
        reference.save_pretrained(output_dir / "fsdp", state_dict=full)
        ids = torch.randint(1, 61, (2, LENGTH), generator=generator)
        with torch.no_grad():
            loaded = AutoModelForCausalLM.from_pretrained(output_dir / "fsdp", trust_remote_code=True).eval()
            logits_difference = (loaded(ids).logits - reference.eval()(ids).logits).abs().max().item()
        report = {"losses": losses, "max_weight_difference": max(differences.values()),
                  "logits_difference": logits_difference, "sharded_parameters": len(sharded)}
        (output_dir / "fsdp2_report.json").write_text(json.dumps(report))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
